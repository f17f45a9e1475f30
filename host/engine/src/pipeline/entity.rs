//! One entity's fold, in its three uses: a batch ([`fold_one`]: the events
//! the batch brings, after whatever gap the state has not caught up with), a
//! rebuild ([`refold`]: an entity's history into a new generation) and a
//! retry ([`retry`]: the events a quarantine held). Each sets the head the
//! record moves to and the head its write is fenced on, so that no caller
//! patches the result afterwards.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use refold_runtime::fold::{self, FoldOutcome};
use refold_runtime::{CallError, Plugin, Sandbox};
use refold_store::{
    ChangeKind, ChangeRecord, EntityRecord, EntityUpdate, QuarantineRecord, StoredEvent,
};
use refold_types::Generation;
use refold_types::clock::now_rfc3339;
use refold_types::event::EntityKey;

use crate::registry::{Active, plugin_ref};

/// One entity's share of a batch.
pub(crate) struct Work {
    pub(crate) record: EntityRecord,
    /// Stored events the state has not caught up with yet (after a swap of
    /// generations, or a deferral), folded before the new ones.
    pub(crate) gap: Vec<StoredEvent>,
    /// The batch's new events, positioned after the record's head.
    pub(crate) events: Vec<StoredEvent>,
    /// The live position change records were made up to: the record's own
    /// position, or the live one it had before a generation move (the gap
    /// a moved state catches up on was reported by the generation left,
    /// and a replay must not re-fire it).
    pub(crate) reported: u64,
}

/// Which change records a fold makes, and what they carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeDetail {
    /// Make a record when the entity's position advances.
    pub emit: bool,
    /// Include the state before the change.
    pub previous: bool,
    /// Include the ids of the events applied.
    pub event_ids: bool,
}

impl ChangeDetail {
    /// What `[changes]` asks the records on `store` to carry.
    pub fn of(c: &crate::config::ChangesConfig, store: crate::config::StoreKind) -> Self {
        ChangeDetail {
            emit: c.recorded_on(store),
            previous: c.previous,
            event_ids: c.event_ids,
        }
    }
}

/// What folding did to one entity.
pub(crate) struct Done {
    pub(crate) update: EntityUpdate,
    /// The change record, when the position advanced and records are made.
    pub(crate) change: Option<ChangeRecord>,
    pub(crate) outcome: Option<FoldOutcome>,
    pub(crate) failed_event: Option<(StoredEvent, CallError)>,
    pub(crate) plugin: Arc<Plugin>,
}

impl Done {
    /// The quarantine record of a failure, if any (filed under the key the
    /// update is written to).
    pub(crate) fn quarantine(&self) -> Option<QuarantineRecord> {
        self.failed_event
            .as_ref()
            .map(|(ev, err)| QuarantineRecord {
                key: self.update.key.clone(),
                event_id: ev.id.clone(),
                event_position: ev.position,
                kind: err.kind().to_string(),
                error: err.to_string(),
                plugin: plugin_ref(&self.plugin),
                recorded_at: now_rfc3339(),
            })
    }
}

/// The write fence of one fold: where the record's head goes, and the head
/// the store must still hold for the write to land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fence {
    head: u64,
    expected_head: u64,
}

/// Fold a batch's share of one entity with the active plugin of its type:
/// the gap first, then the new events. The head moves to the last new event
/// and the write is fenced on the head the record was loaded with.
pub(crate) fn fold_one(
    sandboxes: &mut HashMap<String, Sandbox>,
    plugins: &Active,
    w: Work,
    detail: ChangeDetail,
) -> Done {
    let Work {
        record,
        gap,
        events,
        reported,
    } = w;
    let fence = Fence {
        head: events.last().map(|e| e.position).unwrap_or(record.head),
        expected_head: record.head,
    };
    let events: Vec<StoredEvent> = gap.into_iter().chain(events).collect();
    let plugin = plugins
        .get(&record.key.entity_type)
        .expect("events of types without a plugin were dead-lettered")
        .clone();
    let sandbox = sandbox_for(sandboxes, &plugin);
    let key = record.key.clone();
    let mut d = fold_entity(sandbox, plugin, &key, record, events, fence, detail);
    // Only what lies past the reported position is news.
    if let Some(c) = &mut d.change {
        if c.last_position <= reported {
            d.change = None;
        } else {
            c.first_position = c.first_position.max(reported + 1);
        }
    }
    d
}

/// Fold an entity's stored events into `generation`, a generation being
/// built by a rebuild. `target` is what that generation holds for the entity
/// (its key in the generation's namespace; a new record when it holds
/// nothing), `events` the live history after `target.position`. The plugin
/// folds under the live entity type, which it owns; the update and any
/// quarantine are filed under `target.key`, with the head at the last event
/// and fenced on what the generation holds.
pub(crate) fn refold(
    sandbox: &mut Sandbox,
    generation: &Generation,
    target: EntityRecord,
    events: Vec<StoredEvent>,
) -> Done {
    let plugin = sandbox.plugin().clone();
    let live = EntityKey::new(
        plugin.info.entity_type.clone(),
        target.key.entity_id.clone(),
    );
    let fence = Fence {
        head: events.last().map(|e| e.position).unwrap_or(target.position),
        expected_head: target.head,
    };
    let target = EntityRecord {
        generation: generation.clone(),
        ..target
    };
    // A rebuild's history is not news: its records would re-fire what
    // consumers saw when the events first arrived.
    fold_entity(
        sandbox,
        plugin,
        &live,
        target,
        events,
        fence,
        ChangeDetail::default(),
    )
}

/// Fold the events a quarantine held (`held`, after `record.position`) with
/// the sandbox's plugin, as if the entity were not quarantined. The head
/// stays where it is: nothing new is stored, and the write is fenced on it.
pub(crate) fn retry(
    sandbox: &mut Sandbox,
    record: EntityRecord,
    held: Vec<StoredEvent>,
    detail: ChangeDetail,
) -> Done {
    let plugin = sandbox.plugin().clone();
    let fence = Fence {
        head: record.head,
        expected_head: record.head,
    };
    let key = record.key.clone();
    let free = EntityRecord {
        quarantined: false,
        ..record
    };
    fold_entity(sandbox, plugin, &key, free, held, fence, detail)
}

/// Fold `events` onto `record`'s state, the plugin seeing `live`'s id; the
/// update is written to `record.key` under `fence`. A quarantined record
/// holds its events and applies nothing.
fn fold_entity(
    sandbox: &mut Sandbox,
    plugin: Arc<Plugin>,
    live: &EntityKey,
    record: EntityRecord,
    events: Vec<StoredEvent>,
    fence: Fence,
    detail: ChangeDetail,
) -> Done {
    let before_position = record.position;
    let previous = if detail.emit && detail.previous {
        Some(record.state.clone().unwrap_or(Value::Null))
    } else {
        None
    };
    let mut update = EntityUpdate {
        key: record.key.clone(),
        state: Value::Null,
        position: record.position,
        head: fence.head,
        expected_head: fence.expected_head,
        plugin: record.plugin.clone(),
        quarantined: record.quarantined,
        generation: record.generation.clone(),
    };
    if record.quarantined {
        // Held: store the events, apply nothing until the entity is retried.
        update.state = record.state.unwrap_or(Value::Null);
        return Done {
            update,
            change: None,
            outcome: None,
            failed_event: None,
            plugin,
        };
    }
    // Position 0 with a `null` state: nothing was ever folded (the entity was
    // deferred, or quarantined in `init`), so it starts from `init`.
    let state = match record.state.filter(|s| record.position > 0 || !s.is_null()) {
        Some(s) => s,
        None => match fold::init_state(sandbox, &live.entity_id) {
            Ok(s) => s,
            Err(e) => {
                update.quarantined = true;
                let first = events.first().cloned();
                return Done {
                    update,
                    change: None,
                    outcome: None,
                    failed_event: first.map(|f| (f, e)),
                    plugin,
                };
            }
        },
    };
    let mut outcome = fold::fold_and_project(sandbox, &live.entity_id, state, &events, true);
    // The update carries the state; the outcome keeps the rest.
    update.state = std::mem::take(&mut outcome.state);
    update.position = record.position + outcome.applied as u64;
    if outcome.applied > 0 {
        update.plugin = Some(plugin_ref(&plugin));
    }
    let failed_event = outcome
        .failure
        .as_ref()
        .map(|(i, e)| (events[*i].clone(), e.clone()));
    if failed_event.is_some() {
        update.quarantined = true;
    }
    // Every advance of the position is a record, also one that left the
    // state as it was (events of types the plugin ignores): a consumer
    // must see each position the entity reached.
    let change = (detail.emit && update.position > before_position).then(|| {
        let applied = (update.position - before_position) as usize;
        ChangeRecord {
            kind: ChangeKind::Changed,
            key: live.clone(),
            first_position: before_position + 1,
            last_position: update.position,
            generation: update.generation.clone(),
            activation: None,
            plugin: update.plugin.clone(),
            state: update.state.clone(),
            previous,
            event_ids: detail
                .event_ids
                .then(|| events.iter().take(applied).map(|e| e.id.clone()).collect()),
            time: now_rfc3339(),
        }
    });
    Done {
        update,
        change,
        outcome: Some(outcome),
        failed_event,
        plugin,
    }
}

/// The sandbox of an entity type, rebuilt when the active version changed.
pub fn sandbox_for<'a>(
    sandboxes: &'a mut HashMap<String, Sandbox>,
    plugin: &Arc<Plugin>,
) -> &'a mut Sandbox {
    let entry = sandboxes
        .entry(plugin.info.entity_type.clone())
        .or_insert_with(|| Sandbox::new(plugin.clone()));
    if !Arc::ptr_eq(entry.plugin(), plugin) {
        *entry = Sandbox::new(plugin.clone());
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::testing::{bank_host, stored_deposit};

    fn event(key: &EntityKey, position: u64, amount: u64) -> StoredEvent {
        stored_deposit(key, position, amount)
    }

    #[test]
    fn a_batch_fold_moves_the_head_to_its_last_event_fenced_on_the_loaded_head() {
        let host = bank_host();
        let key = EntityKey::new("account", "a");
        let record = EntityRecord {
            head: 2,
            ..EntityRecord::new(key.clone())
        };
        let w = Work {
            record,
            gap: vec![event(&key, 1, 1), event(&key, 2, 2)],
            events: vec![event(&key, 3, 4)],
            reported: 0,
        };
        let d = fold_one(
            &mut HashMap::new(),
            &host.registry.snapshot(),
            w,
            ChangeDetail::default(),
        );
        let u = &d.update;
        assert_eq!((u.position, u.head, u.expected_head), (3, 3, 2));
        assert_eq!(u.state["balance"], 7);
        assert!(d.quarantine().is_none());
    }

    #[test]
    fn a_refold_files_the_state_under_the_generation_fenced_on_what_it_holds() {
        let host = bank_host();
        let plugin = host.registry.get("account").unwrap();
        let live = EntityKey::new("account", "a");
        let generation = Generation::from("account#feed.1");
        let target = EntityRecord::new(EntityKey::new(generation.as_str(), "a"));
        let d = refold(
            &mut Sandbox::new(plugin),
            &generation,
            target.clone(),
            vec![event(&live, 1, 5), event(&live, 2, 6)],
        );
        let u = &d.update;
        assert_eq!(u.key, target.key);
        assert_eq!(u.generation, generation);
        assert_eq!((u.position, u.head, u.expected_head), (2, 2, 0));
        assert_eq!(u.state["balance"], 11);

        // Caught up later: on from what the generation holds.
        let held = EntityRecord {
            state: Some(u.state.clone()),
            position: 2,
            head: 2,
            generation: generation.clone(),
            ..target
        };
        let d = refold(
            &mut Sandbox::new(host.registry.get("account").unwrap()),
            &generation,
            held,
            vec![event(&live, 3, 1)],
        );
        assert_eq!(
            (d.update.position, d.update.head, d.update.expected_head),
            (3, 3, 2)
        );
        assert_eq!(d.update.state["balance"], 12);
    }

    #[test]
    fn a_retry_folds_the_held_events_and_keeps_the_head() {
        let host = bank_host();
        let key = EntityKey::new("account", "a");
        let record = EntityRecord {
            state: Some(
                serde_json::json!({"owner":null,"balance":1,"transactions":1,"open":false}),
            ),
            position: 1,
            head: 3,
            quarantined: true,
            ..EntityRecord::new(key.clone())
        };
        let held = vec![event(&key, 2, 2), event(&key, 3, 3)];
        let d = retry(
            &mut Sandbox::new(host.registry.get("account").unwrap()),
            record.clone(),
            held,
            ChangeDetail::default(),
        );
        let u = &d.update;
        assert!(!u.quarantined);
        assert_eq!((u.position, u.head, u.expected_head), (3, 3, 3));
        assert_eq!(u.state["balance"], 6);
        // While quarantined, a batch holds the events and applies nothing.
        let w = Work {
            record,
            gap: Vec::new(),
            events: vec![event(&key, 4, 1)],
            reported: 1,
        };
        let d = fold_one(
            &mut HashMap::new(),
            &host.registry.snapshot(),
            w,
            ChangeDetail::default(),
        );
        assert!(d.outcome.is_none() && d.failed_event.is_none());
        assert_eq!(
            (d.update.position, d.update.head, d.update.expected_head),
            (1, 4, 3)
        );
    }
}

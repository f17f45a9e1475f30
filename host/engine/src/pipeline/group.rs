//! Step 3 of a batch: group the new events by entity in arrival order, bring
//! along entities earlier batches deferred, load their records (moved into
//! the active generation of their type), and position each entity's new
//! events after its head.

use std::collections::{HashMap, HashSet};

use futures::{StreamExt as _, stream};
use refold_store::{EntityRecord, Origin, Storage, StoreError, StoredEvent};
use refold_types::Generation;
use refold_types::event::{EntityKey, Envelope};

use super::cache::{FILL_IDS_UPTO, StateCache};
use super::entity::Work;
use crate::generation::{self, Moves};
use crate::registry::{Active, Generations};

/// New events by entity, entities in the order their first event arrived.
#[derive(Default)]
pub(crate) struct Groups {
    pub(crate) order: Vec<EntityKey>,
    pub(crate) events: HashMap<EntityKey, Vec<(Envelope, Origin)>>,
}

impl Groups {
    /// Group `fresh` by entity, keeping arrival order.
    pub(crate) fn of(fresh: Vec<(Envelope, Origin)>) -> Groups {
        let mut g = Groups::default();
        for (e, o) in fresh {
            g.events
                .entry(e.key.clone())
                .or_insert_with(|| {
                    g.order.push(e.key.clone());
                    Vec::new()
                })
                .push((e, o));
        }
        g
    }

    /// Entities left behind by earlier batches come along with no new
    /// events (their gap is folded), unless the batch has their events
    /// anyway or their type has no plugin any more.
    pub(crate) fn bring_along(
        &mut self,
        behind: impl IntoIterator<Item = EntityKey>,
        plugins: &Active,
    ) {
        for key in behind {
            if !self.events.contains_key(&key) && plugins.contains_key(&key.entity_type) {
                self.events.insert(key.clone(), Vec::new());
                self.order.push(key);
            }
        }
    }
}

/// The entities of a batch, ready to fold.
pub(crate) struct Loaded {
    /// Per entity, in arrival order.
    pub(crate) work: Vec<Work>,
    /// The batch's new events, positioned, in the same order.
    pub(crate) events: Vec<StoredEvent>,
    /// What moving records into their active generation writes besides them.
    pub(crate) moves: Moves,
    /// The hashes of the ids of all the stored events of the entities where
    /// they are known: from the cache, or read on a first touch (see
    /// [`cache`](super::cache)).
    pub(crate) known_ids: HashMap<EntityKey, HashSet<u64>>,
}

/// Id reads in flight while entities are first touched.
const FIRST_TOUCH_READS: usize = 8;

/// Load the records of `groups` and make each entity's [`Work`]: from the
/// cache where it holds them, else from the store. Records another
/// generation wrote (before a cut-over, or by a host that had not seen it
/// yet) continue from the active generation's own state; theirs is saved
/// for a rollback. An entity whose state is behind its head gets the stored
/// events in between as its gap (none while quarantined: they are held).
pub(crate) async fn load(
    storage: &dyn Storage,
    generations: &Generations,
    mut groups: Groups,
    cache: &mut StateCache,
) -> Result<Loaded, StoreError> {
    let base = Generation::default();
    let active = |t: &str| generations.get(t).unwrap_or(&base);
    let mut records = HashMap::with_capacity(groups.order.len());
    let mut cached_ids = HashMap::new();
    let mut misses = Vec::new();
    for key in &groups.order {
        match cache.take(key, active(&key.entity_type)) {
            Some((r, ids)) => {
                records.insert(key.clone(), r);
                if let Some(ids) = ids {
                    cached_ids.insert(key.clone(), ids);
                }
            }
            None => misses.push(key.clone()),
        }
    }
    let mut fetched = if misses.is_empty() {
        HashMap::new()
    } else {
        storage.load(&misses).await?
    };
    // Live positions of the records about to move to the active
    // generation: what change records reported (a record that stays has
    // its own position, read below).
    let reported: HashMap<EntityKey, u64> = fetched
        .iter()
        .filter(|(k, r)| r.generation != *active(&k.entity_type))
        .map(|(k, r)| (k.clone(), r.position))
        .collect();
    let moves = generation::resolve(storage, generations, &mut fetched, true).await?;
    let mut known_ids = first_touch_ids(storage, cache, &misses, &fetched).await?;
    known_ids.extend(cached_ids);
    records.extend(fetched);
    let mut loaded = Loaded {
        work: Vec::with_capacity(groups.order.len()),
        events: Vec::new(),
        moves,
        known_ids,
    };
    for key in &groups.order {
        let record = records.remove(key).unwrap_or_else(|| EntityRecord {
            generation: active(&key.entity_type).clone(),
            ..EntityRecord::new(key.clone())
        });
        let events = position(&record, groups.events.remove(key).unwrap_or_default());
        loaded.events.extend(events.iter().cloned());
        let gap = if !record.quarantined && record.position < record.head {
            storage
                .history(key, record.position, Some(record.head))
                .await?
        } else {
            Vec::new()
        };
        let reported = reported.get(key).copied().unwrap_or(0).max(record.position);
        loaded.work.push(Work {
            record,
            gap,
            events,
            reported,
        });
    }
    Ok(loaded)
}

/// The id hashes of the entities met for the first time, so that their
/// next events need no read to be known new: none for one the store does
/// not hold, all of them (one id read each, concurrently) for one with
/// at most [`FILL_IDS_UPTO`] events; a bigger or quarantined one is left
/// out and its ids are asked of the store each time.
async fn first_touch_ids(
    storage: &dyn Storage,
    cache: &StateCache,
    misses: &[EntityKey],
    fetched: &HashMap<EntityKey, EntityRecord>,
) -> Result<HashMap<EntityKey, HashSet<u64>>, StoreError> {
    let mut known = HashMap::with_capacity(misses.len());
    let mut reads = Vec::new();
    for key in misses {
        match fetched.get(key) {
            None => {
                known.insert(key.clone(), HashSet::new());
            }
            Some(r) if !r.quarantined && r.head <= FILL_IDS_UPTO => {
                reads.push(async move {
                    let ids = storage.event_ids(key, r.head).await?;
                    Ok::<_, StoreError>((key, ids))
                });
            }
            Some(_) => {}
        }
    }
    let mut read = stream::iter(reads).buffer_unordered(FIRST_TOUCH_READS);
    while let Some(r) = read.next().await {
        let (key, ids) = r?;
        let ids = ids.iter().map(|id| cache.id_hash(id)).collect();
        known.insert(key.clone(), ids);
    }
    Ok(known)
}

/// An entity's new events as stored: positioned one after another from the
/// record's head.
pub(crate) fn position(record: &EntityRecord, new: Vec<(Envelope, Origin)>) -> Vec<StoredEvent> {
    new.into_iter()
        .enumerate()
        .map(|(i, (e, origin))| StoredEvent {
            key: record.key.clone(),
            position: record.head + 1 + i as u64,
            id: e.id,
            source: e.source,
            event_type: e.event_type,
            time: e.time,
            data: e.data,
            origin: Some(origin),
            record: Some(e.record),
            digest: Some(e.digest),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::testing::{bank_host, deposit};
    use crate::pipeline::validate::validate;

    fn fresh(
        host: &crate::host::Host,
        records: &[refold_source::SourceRecord],
    ) -> Vec<(Envelope, Origin)> {
        let (valid, _) = validate(records, &host.registry.snapshot(), 1 << 20);
        valid
            .into_iter()
            .map(|(e, r)| (e, r.origin.clone()))
            .collect()
    }

    #[test]
    fn groups_keep_arrival_order_and_bring_along_only_deferred_entities_of_known_types() {
        let host = bank_host();
        let records = [
            deposit(0, "b", "1", 1),
            deposit(1, "a", "1", 1),
            deposit(2, "b", "2", 1),
        ];
        let mut g = Groups::of(fresh(&host, &records));
        let ids: Vec<&str> = g.order.iter().map(|k| k.entity_id.as_str()).collect();
        assert_eq!(ids, ["b", "a"]);
        assert_eq!(g.events[&EntityKey::new("account", "b")].len(), 2);
        g.bring_along(
            [
                EntityKey::new("account", "a"),
                EntityKey::new("account", "c"),
                EntityKey::new("order", "x"),
            ],
            &host.registry.snapshot(),
        );
        let ids: Vec<String> = g.order.iter().map(|k| k.to_string()).collect();
        assert_eq!(ids.len(), 3, "{ids:?}");
        assert!(g.events[&EntityKey::new("account", "c")].is_empty());
        assert_eq!(g.events[&EntityKey::new("account", "a")].len(), 1);
    }

    #[test]
    fn new_events_are_positioned_after_the_head() {
        let host = bank_host();
        let records = [deposit(0, "a", "1", 1), deposit(1, "a", "2", 1)];
        let record = EntityRecord {
            head: 7,
            ..EntityRecord::new(EntityKey::new("account", "a"))
        };
        let events = position(&record, fresh(&host, &records));
        let at: Vec<(u64, &str)> = events.iter().map(|e| (e.position, e.id.as_str())).collect();
        assert_eq!(at, [(8, "1"), (9, "2")]);
        assert_eq!(events[1].origin.as_ref().unwrap().offset, 1);
        assert!(
            events
                .iter()
                .all(|e| e.digest.is_some() && e.record.is_some())
        );
    }

    #[tokio::test]
    async fn load_gives_a_deferred_entity_its_gap_and_a_new_one_none() {
        let host = bank_host();
        let mut p = crate::pipeline::Pipeline::new(
            host.storage.clone(),
            host.registry.clone(),
            crate::pipeline::PipelineConfig {
                fold_budget: std::time::Duration::ZERO,
                ..Default::default()
            },
            host.metrics.clone(),
        );
        p.process(&[deposit(0, "a", "1", 1), deposit(1, "a", "2", 1)])
            .await
            .unwrap();
        let records = [deposit(2, "a", "3", 1), deposit(3, "b", "1", 1)];
        let loaded = load(
            &*host.storage,
            &host.registry.generations(),
            Groups::of(fresh(&host, &records)),
            &mut StateCache::new(0),
        )
        .await
        .unwrap();
        assert_eq!(loaded.work.len(), 2);
        let a = &loaded.work[0];
        assert_eq!((a.record.position, a.record.head), (0, 2));
        assert_eq!(a.gap.iter().map(|e| e.position).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(a.events[0].position, 3);
        let b = &loaded.work[1];
        assert!(b.gap.is_empty());
        assert_eq!(b.events[0].position, 1);
        assert_eq!(loaded.events.len(), 2);
        assert!(loaded.moves.saved.is_empty());
        // First touches: "a" has two events, read for their ids; "b" none.
        assert_eq!(loaded.known_ids[&a.record.key].len(), 2);
        assert!(loaded.known_ids[&b.record.key].is_empty());
    }
}

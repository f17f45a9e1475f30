//! Corrections: what a change of generation changed, entity by entity.
//!
//! A rebuild's cut-over and a rollback across generations replace the state
//! a query answers for an entity with another lineage's. Consumers of the
//! change records hear of each entity whose answer differs, once, with the
//! old and the new state (`refold.state.corrected`), and of none of the
//! others: nothing a replay merely refolded re-fires.
//!
//! Both sides are computed as a query computes them ([`crate::query`]): the
//! live record, moved (read-only) into the side's generation, caught up from
//! the raw events with the side's plugin. So a state that moves lazily
//! (saved under its namespace, behind its head) is compared where it will
//! be answered, not where it happens to be stored.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt as _;

use refold_runtime::{Plugin, Sandbox, fold};
use refold_store::{ChangeKind, ChangeRecord, Commit, EntityRecord, StoredEvent};
use refold_types::Generation;
use refold_types::clock::now_rfc3339;
use refold_types::event::EntityKey;

use super::PluginManager;
use crate::generation;
use crate::registry::Generations;

/// Entities compared per round: two loads and one commit each.
const CHUNK: usize = 256;

/// History reads in flight while catching a side up.
const HISTORY_READS: usize = 16;

/// One side of a change of generation: the generation and the plugin that
/// folds it (none: states are taken as stored).
pub(super) struct Side {
    pub generation: Generation,
    pub plugin: Option<Arc<Plugin>>,
}

impl PluginManager {
    /// One `refold.state.corrected` record per entity of `entity_type` whose
    /// state differs between `from` and `to`, made by activation `seq` (part
    /// of each record's id). Nothing when the store does not record changes.
    /// Call under the batch gate, after the activation row: a record of a
    /// correction that a crash then undid would tell consumers of a state
    /// no query ever answers, while a crash in between loses these records
    /// (the one window, ARCHITECTURE.md "Change records").
    pub(super) async fn record_corrections(
        &self,
        entity_type: &str,
        from: &Side,
        to: &Side,
        seq: u64,
    ) -> anyhow::Result<u64> {
        let host = &self.host;
        if !host.config.changes.recorded_on(host.config.store.kind) {
            return Ok(0);
        }
        let ids = host.storage.entity_ids(entity_type).await?;
        let mut total = 0u64;
        for chunk in ids.chunks(CHUNK) {
            let keys: Vec<EntityKey> = chunk
                .iter()
                .map(|id| EntityKey::new(entity_type, id.clone()))
                .collect();
            let live = host.storage.load(&keys).await?;
            let old = self.answers(entity_type, &live, from).await?;
            let new = self.answers(entity_type, &live, to).await?;
            let mut commit = Commit::default();
            for key in &keys {
                let (Some(o), Some(n)) = (old.get(key), new.get(key)) else {
                    continue;
                };
                let Some(state) = n.state.clone() else {
                    continue;
                };
                if o.state.as_ref() == Some(&state) {
                    continue;
                }
                commit.changes.push(ChangeRecord {
                    kind: ChangeKind::Corrected,
                    key: key.clone(),
                    first_position: n.position,
                    last_position: n.position,
                    generation: to.generation.clone(),
                    activation: Some(seq),
                    plugin: n.plugin.clone(),
                    state,
                    previous: Some(o.state.clone().unwrap_or(serde_json::Value::Null)),
                    event_ids: None,
                    time: now_rfc3339(),
                });
            }
            if commit.changes.is_empty() {
                continue;
            }
            total += commit.changes.len() as u64;
            host.storage.commit(commit).await?;
        }
        if total > 0 {
            crate::pipeline::announce(
                &host.metrics,
                &host.changes,
                vec![(ChangeKind::Corrected.as_type(), total)],
            );
        }
        Ok(total)
    }

    /// The records of `live` as a query under `side` answers them: moved
    /// into its generation without writing, and caught up to their heads.
    /// An entity whose catch-up fails keeps its last good state, as a
    /// query shows it until a batch quarantines it.
    async fn answers(
        &self,
        entity_type: &str,
        live: &HashMap<EntityKey, EntityRecord>,
        side: &Side,
    ) -> anyhow::Result<HashMap<EntityKey, EntityRecord>> {
        let storage = &self.host.storage;
        let mut recs = live.clone();
        let mut g = Generations::new();
        g.insert(entity_type.to_string(), side.generation.clone());
        generation::resolve(&**storage, &g, &mut recs, false).await?;
        let Some(plugin) = side.plugin.clone() else {
            return Ok(recs);
        };
        let behind: Vec<EntityRecord> = recs
            .values()
            .filter(|r| !r.quarantined && r.position < r.head)
            .cloned()
            .collect();
        if behind.is_empty() {
            return Ok(recs);
        }
        let mut reads = futures::stream::iter(behind.into_iter().map(|r| {
            let storage = storage.clone();
            async move {
                let gap = storage.history(&r.key, r.position, Some(r.head)).await?;
                anyhow::Ok((r, gap))
            }
        }))
        .buffer_unordered(HISTORY_READS);
        let mut work: Vec<(EntityRecord, Vec<StoredEvent>)> = Vec::new();
        while let Some(r) = reads.next().await {
            work.push(r?);
        }
        drop(reads);
        let caught = tokio::task::spawn_blocking(move || {
            let mut sandbox = Sandbox::new(plugin.clone());
            let by = crate::registry::plugin_ref(&plugin);
            work.into_iter()
                .map(|(mut rec, gap)| {
                    let start = match rec.state.clone() {
                        Some(s) => Some(s),
                        None => fold::init_state(&mut sandbox, &rec.key.entity_id).ok(),
                    };
                    if let Some(start) = start {
                        let r = fold::fold_events(
                            &mut sandbox,
                            &rec.key.entity_id,
                            start,
                            &gap,
                            false,
                            None,
                        );
                        if r.applied > 0 || rec.state.is_none() {
                            rec.state = Some(r.state);
                            rec.position += r.applied as u64;
                            rec.plugin = Some(by.clone());
                        }
                    }
                    rec
                })
                .collect::<Vec<_>>()
        })
        .await?;
        for rec in caught {
            recs.insert(rec.key.clone(), rec);
        }
        Ok(recs)
    }
}

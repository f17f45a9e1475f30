//! Step 4 of a batch: fold, off the async threads (guest calls are
//! CPU-bound). Each entity type folds on a blocking thread of its own (a
//! sandbox serves one type), a bounded number at once, under one budget for
//! the batch: a slow or looping type costs the others at most the budget
//! plus one entity's calls, not the sum of every deadline it runs into.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use refold_runtime::Sandbox;
use refold_store::{EntityUpdate, StoreError};

use super::entity::{ChangeDetail, Done, Work, fold_one};
use crate::registry::Active;

/// What one batch may still spend on folding, shared by the threads that
/// fold its entity types: time, and read-model output (which lives in host
/// memory until the commit). Checked before each entity, so a batch ends
/// within the budget plus one entity's calls, each under its deadline.
pub(crate) struct FoldBudget {
    until: Instant,
    ops: AtomicUsize,
    bytes: AtomicUsize,
    max_ops: usize,
    max_bytes: usize,
}

impl FoldBudget {
    /// `time` from now, at most `max_ops` read-model operations and
    /// `max_bytes` of them.
    pub(crate) fn new(time: Duration, max_ops: usize, max_bytes: usize) -> FoldBudget {
        FoldBudget {
            until: Instant::now() + time,
            ops: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_ops,
            max_bytes,
        }
    }

    fn exhausted(&self) -> bool {
        Instant::now() >= self.until
            || self.ops.load(Ordering::Relaxed) >= self.max_ops
            || self.bytes.load(Ordering::Relaxed) >= self.max_bytes
    }

    fn charge(&self, d: &Done) {
        // Measured by the sandbox as it lifted the ops (names, keys, bodies
        // and a per-op overhead), the same measure as the per-call limit.
        if let Some(o) = &d.outcome {
            let size = o.projection_size;
            self.ops.fetch_add(size.ops, Ordering::Relaxed);
            self.bytes.fetch_add(
                usize::try_from(size.bytes).unwrap_or(usize::MAX),
                Ordering::Relaxed,
            );
        }
    }
}

/// What folding a batch did.
#[derive(Default)]
pub(crate) struct Folded {
    /// Entities folded (or held, when quarantined).
    pub(crate) done: Vec<Done>,
    /// Entities the budget did not reach: their events are stored, their
    /// state stays.
    pub(crate) deferred: Vec<EntityUpdate>,
}

/// Fold `work` with `plugins`, each entity type on a blocking thread, at
/// most `threads` at once, under `budget`. The sandboxes of the types folded
/// are taken from `sandboxes` and put back, recycled.
pub(crate) async fn fold(
    sandboxes: &mut HashMap<String, Sandbox>,
    plugins: &Arc<Active>,
    work: Vec<Work>,
    threads: usize,
    budget: FoldBudget,
    detail: ChangeDetail,
) -> Result<Folded, StoreError> {
    let budget = Arc::new(budget);
    let permits = Arc::new(tokio::sync::Semaphore::new(threads));
    let mut tasks = Vec::new();
    for (entity_type, works) in by_type(work) {
        let sandbox = sandboxes.remove(&entity_type);
        let (plugins, budget, permits) = (plugins.clone(), budget.clone(), permits.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            tokio::task::spawn_blocking(move || {
                let mut sandboxes = HashMap::new();
                if let Some(s) = sandbox {
                    sandboxes.insert(entity_type, s);
                }
                let mut folded = Folded {
                    done: Vec::with_capacity(works.len()),
                    deferred: Vec::new(),
                };
                for w in works {
                    if budget.exhausted() {
                        folded.deferred.push(defer(w));
                        continue;
                    }
                    let d = fold_one(&mut sandboxes, &plugins, w, detail);
                    budget.charge(&d);
                    folded.done.push(d);
                }
                for s in sandboxes.values_mut() {
                    s.recycle();
                }
                (sandboxes, folded)
            })
            .await
        }));
    }
    let mut all = Folded::default();
    for t in tasks {
        let (boxes, folded) = t
            .await
            .map_err(|e| StoreError::Other(anyhow::anyhow!("fold task failed: {e}")))?
            .map_err(|e| StoreError::Other(anyhow::anyhow!("fold task failed: {e}")))?;
        sandboxes.extend(boxes);
        all.done.extend(folded.done);
        all.deferred.extend(folded.deferred);
    }
    Ok(all)
}

/// `work` by entity type, types in the order they first appear.
fn by_type(work: Vec<Work>) -> Vec<(String, Vec<Work>)> {
    let mut by_type: Vec<(String, Vec<Work>)> = Vec::new();
    for w in work {
        let t = &w.record.key.entity_type;
        match by_type.iter_mut().find(|(have, _)| have == t) {
            Some((_, ws)) => ws.push(w),
            None => by_type.push((t.clone(), vec![w])),
        }
    }
    by_type
}

/// An entity left for later: its events are stored (its head moves on), its
/// state stays where it was, so the next batch or query that meets it folds
/// the gap first.
pub(crate) fn defer(w: Work) -> EntityUpdate {
    let r = w.record;
    EntityUpdate {
        head: w.events.last().map(|e| e.position).unwrap_or(r.head),
        expected_head: r.head,
        state: r.state.unwrap_or(Value::Null),
        position: r.position,
        plugin: r.plugin,
        quarantined: r.quarantined,
        generation: r.generation,
        key: r.key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::testing::{bank_host, stored_deposit};
    use refold_store::EntityRecord;
    use refold_types::event::EntityKey;

    fn work(id: &str, positions: &[u64]) -> Work {
        let key = EntityKey::new("account", id);
        Work {
            record: EntityRecord::new(key.clone()),
            gap: Vec::new(),
            events: positions
                .iter()
                .map(|&position| stored_deposit(&key, position, 1))
                .collect(),
            reported: 0,
        }
    }

    #[tokio::test]
    async fn within_the_budget_every_entity_folds_and_its_sandbox_is_kept() {
        let host = bank_host();
        let mut sandboxes = HashMap::new();
        let folded = fold(
            &mut sandboxes,
            &host.registry.snapshot(),
            vec![work("a", &[1, 2]), work("b", &[1])],
            2,
            FoldBudget::new(Duration::from_secs(30), 100, 1 << 20),
            ChangeDetail::default(),
        )
        .await
        .unwrap();
        assert!(folded.deferred.is_empty());
        let positions: Vec<(String, u64)> = folded
            .done
            .iter()
            .map(|d| (d.update.key.entity_id.clone(), d.update.position))
            .collect();
        assert_eq!(positions, [("a".to_string(), 2), ("b".to_string(), 1)]);
        assert!(sandboxes.contains_key("account"));
    }

    #[tokio::test]
    async fn a_spent_budget_defers_the_entities_with_their_events_stored() {
        let host = bank_host();
        let folded = fold(
            &mut HashMap::new(),
            &host.registry.snapshot(),
            vec![work("a", &[1, 2])],
            1,
            FoldBudget::new(Duration::ZERO, 100, 1 << 20),
            ChangeDetail::default(),
        )
        .await
        .unwrap();
        assert!(folded.done.is_empty());
        let d = &folded.deferred[0];
        assert_eq!((d.position, d.head, d.expected_head), (0, 2, 0));
        assert_eq!(d.state, Value::Null);
    }

    #[test]
    fn work_is_grouped_by_type_in_order_of_first_appearance() {
        let mut order = work("o", &[1]);
        order.record.key = EntityKey::new("order", "o");
        let types: Vec<(String, usize)> = by_type(vec![work("a", &[1]), order, work("b", &[1])])
            .into_iter()
            .map(|(t, ws)| (t, ws.len()))
            .collect();
        assert_eq!(
            types,
            [("account".to_string(), 2), ("order".to_string(), 1)]
        );
    }
}

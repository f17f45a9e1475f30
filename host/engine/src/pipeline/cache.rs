//! The owned-state cache: the records of the entities this pipeline writes,
//! and what deduplication needs of them, kept between batches so that the
//! steady state reads nothing per entity. Bounded in bytes, least recently
//! used out first.
//!
//! The cache only ever saves reads; the store stays the judge of every
//! write. An entry is the record as this pipeline last committed it, so a
//! write computed from it is fenced on the head it holds: if anything else
//! moved the entity on (another host after a rebalance, a re-submitted dead
//! letter), the commit is refused as fenced and the batch's entries are
//! dropped, so its re-run takes the slow path (load, ask the store). What
//! could change a record without moving its head is kept out: quarantined
//! entities are not cached (a release or retry flips them in place), and
//! an entry of another generation than the active one is a miss (a cut-over
//! or rollback moves records in place).
//!
//! Deduplication asks the cache whether an event id is certainly new: each
//! entry holds 64-bit hashes of the ids of all its stored events when it
//! knows all of them (an entity this pipeline created, or one small enough
//! to have its ids read on first touch). An id whose hash is absent is new;
//! one whose hash is present (a re-delivery, or a collision) is asked of
//! the store like before, so a collision costs a read, never an event.
//!
//! Each entry remembers the source partition its last events came from, so
//! that the entries of partitions a rebalance took away are dropped
//! ([`forget_partitions`](StateCache::forget_partitions)): their new owner
//! writes them from now on, and what this host holds of them would only
//! cost a lost fence (and memory) should the partitions come back.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};

use lru::LruCache;
use serde_json::Value;

use refold_store::{EntityRecord, EntityUpdate};
use refold_types::event::EntityKey;
use refold_types::{Generation, stable_hash};

/// Stored events an entity may have for its ids to be read on its first
/// touch (one read of its event ids, not its events); beyond it its
/// re-deliveries are asked of the store each time. An id is bounded only by
/// `max_record_bytes`, so this and the reads in flight bound the memory of
/// what a hostile input of huge ids could make a first touch hold.
pub(crate) const FILL_IDS_UPTO: u64 = 128;

/// Bytes an entry costs besides the text of its key, plugin and generation,
/// its state and its ids: the LRU node and map slot, the record's fixed
/// fields, the key held twice, and the allocator's share of each
/// allocation (calibrated against the RSS of 100k cached entities).
const ENTRY_OVERHEAD: usize = 448;

/// One cached entity.
struct Entry {
    record: EntityRecord,
    /// Hashes of the ids of every event stored for the entity; `None` when
    /// the cache does not know all of them.
    ids: Option<HashSet<u64>>,
    /// [`partition_tag`] of the source partition of the entity's last
    /// events (`None`: none seen by this cache, e.g. a retried entity).
    part: Option<u64>,
    bytes: usize,
}

/// A source partition as an entry remembers it: a hash, since an entry
/// tagged wrongly by a collision is only dropped early or kept longer
/// (the cache saves reads, it never decides a write).
pub(crate) fn partition_tag(source: &str, partition: i32) -> u64 {
    stable_hash(source.bytes().chain(partition.to_le_bytes()))
}

/// What the cache did since the last look (for metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheStats {
    /// Entities found.
    pub(crate) hits: u64,
    /// Entities not found (or found stale).
    pub(crate) misses: u64,
    /// Entries dropped to stay within the budget.
    pub(crate) evictions: u64,
}

/// The cache itself. One per pipeline; not shared (a pipeline is the only
/// writer of what it caches).
pub(crate) struct StateCache {
    entries: LruCache<EntityKey, Entry>,
    budget: usize,
    used: usize,
    hasher: RandomState,
    stats: CacheStats,
}

impl StateCache {
    /// A cache of at most `budget` bytes (0: caches nothing).
    pub(crate) fn new(budget: usize) -> Self {
        StateCache {
            entries: LruCache::unbounded(),
            budget,
            used: 0,
            hasher: RandomState::new(),
            stats: CacheStats::default(),
        }
    }

    /// The hash an id is kept as.
    pub(crate) fn id_hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    /// Take the entry of `key` out, if it is of `generation` (the active
    /// one of its type): its record, and its id hashes when complete. The
    /// batch puts it back with [`committed`](Self::committed); a batch that
    /// fails before leaves it out, so the next one reads the store. An
    /// entry of another generation is dropped.
    pub(crate) fn take(
        &mut self,
        key: &EntityKey,
        generation: &Generation,
    ) -> Option<(EntityRecord, Option<HashSet<u64>>)> {
        let Some(e) = self.entries.pop(key) else {
            self.stats.misses += 1;
            return None;
        };
        self.used -= e.bytes;
        if e.record.generation == *generation {
            self.stats.hits += 1;
            Some((e.record, e.ids))
        } else {
            self.stats.misses += 1;
            None
        }
    }

    /// Whether `id` is certainly not an event of `key` already stored.
    /// `false` means "ask the store", not "known".
    pub(crate) fn certainly_new(&self, key: &EntityKey, id: &str) -> bool {
        match self.entries.peek(key).and_then(|e| e.ids.as_ref()) {
            Some(ids) => !ids.contains(&self.id_hash(id)),
            None => false,
        }
    }

    /// The id hashes of a cached entity when complete (for an entry about to
    /// be replaced after a commit).
    fn take_ids(&mut self, key: &EntityKey) -> (Option<HashSet<u64>>, Option<u64>) {
        let Some(e) = self.entries.pop(key) else {
            return (None, None);
        };
        self.used -= e.bytes;
        (e.ids, e.part)
    }

    /// After a commit is durable: the entity's new record, with the ids of
    /// the events the commit stored for it. `known` are the entity's ids
    /// before the commit when they are all known: read on a first touch, or
    /// those of the entry [`take`](Self::take) gave. `part` is the
    /// [`partition_tag`] of the partition the commit's events came from
    /// (`None`: it stored none, the entry keeps the one it had).
    pub(crate) fn committed(
        &mut self,
        update: &EntityUpdate,
        new_ids: impl IntoIterator<Item = u64>,
        known: Option<HashSet<u64>>,
        part: Option<u64>,
    ) {
        let (held, held_part) = self.take_ids(&update.key);
        let before = held.or(known);
        let part = part.or(held_part);
        if update.quarantined || self.budget == 0 {
            return;
        }
        let ids = before.map(|mut ids| {
            ids.extend(new_ids);
            ids
        });
        let record = EntityRecord {
            key: update.key.clone(),
            state: Some(update.state.clone()),
            position: update.position,
            head: update.head,
            plugin: update.plugin.clone(),
            quarantined: false,
            generation: update.generation.clone(),
        };
        let bytes = ENTRY_OVERHEAD
            + 2 * (record.key.entity_type.len() + record.key.entity_id.len())
            + record
                .plugin
                .as_ref()
                .map_or(0, |p| p.name.len() + p.version.len() + p.digest.len())
            + record.generation.as_str().len()
            + record.state.as_ref().map_or(0, value_bytes)
            + ids.as_ref().map_or(0, |i| 64 + i.capacity() * 16);
        self.used += bytes;
        self.entries.put(
            update.key.clone(),
            Entry {
                record,
                ids,
                part,
                bytes,
            },
        );
        while self.used > self.budget {
            let Some((_, e)) = self.entries.pop_lru() else {
                break;
            };
            self.used -= e.bytes;
            self.stats.evictions += 1;
        }
    }

    /// Whether `key` is held (in any generation).
    #[cfg(test)]
    pub(crate) fn holds(&self, key: &EntityKey) -> bool {
        self.entries.contains(key)
    }

    /// Whether `key` is held with its state caught up to its head (a
    /// deferred entity is not: its next batch reads the stored events in
    /// between).
    pub(crate) fn holds_caught_up(&self, key: &EntityKey) -> bool {
        self.entries
            .peek(key)
            .is_some_and(|e| e.record.position >= e.record.head)
    }

    /// Drop the entries whose last events came from one of these
    /// partitions ([`partition_tag`]s), and those that never saw a
    /// partition; returns how many went.
    pub(crate) fn forget_partitions(&mut self, parts: &HashSet<u64>) -> usize {
        let gone: Vec<EntityKey> = self
            .entries
            .iter()
            .filter(|(_, e)| e.part.is_none_or(|p| parts.contains(&p)))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            if let Some(e) = self.entries.pop(k) {
                self.used -= e.bytes;
            }
        }
        gone.len()
    }

    /// Forget everything.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.used = 0;
    }

    /// Bytes held, by the estimate the budget is kept with.
    pub(crate) fn bytes(&self) -> usize {
        self.used
    }

    /// Entities held.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Hits, misses and evictions since the last call.
    pub(crate) fn take_stats(&mut self) -> CacheStats {
        std::mem::take(&mut self.stats)
    }
}

/// A JSON value's heap footprint, estimated: 32 bytes a `Value`, its text,
/// and for an object a B-tree node (about 640 bytes) per 11 entries, which
/// is what a small state costs most of.
fn value_bytes(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => 32,
        Value::String(s) => 48 + s.len(),
        Value::Array(a) => 48 + a.iter().map(value_bytes).sum::<usize>(),
        Value::Object(m) => {
            32 + 640 * m.len().div_ceil(11)
                + m.iter()
                    .map(|(k, v)| 16 + k.len() + value_bytes(v))
                    .sum::<usize>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn update(id: &str, head: u64) -> EntityUpdate {
        EntityUpdate {
            key: EntityKey::new("account", id),
            state: json!({"balance": head}),
            position: head,
            head,
            expected_head: head.saturating_sub(1),
            plugin: None,
            quarantined: false,
            generation: Generation::base(),
        }
    }

    #[test]
    fn a_committed_record_is_found_in_its_generation_only() {
        let mut c = StateCache::new(1 << 20);
        let u = update("a", 3);
        c.committed(&u, [], Some(HashSet::new()), None);
        let (r, ids) = c.take(&u.key, &Generation::base()).unwrap();
        assert_eq!((r.head, r.state), (3, Some(json!({"balance": 3}))));
        assert_eq!(ids, Some(HashSet::new()));
        // Taken out until the batch puts it back.
        assert!(c.take(&u.key, &Generation::base()).is_none());
        c.committed(&u, [], ids, None);
        assert!(c.take(&u.key, &Generation::from("account#x.1")).is_none());
        // The stale entry is gone.
        assert!(c.take(&u.key, &Generation::base()).is_none());
        let s = c.take_stats();
        assert_eq!((s.hits, s.misses, s.evictions), (1, 3, 0));
    }

    #[test]
    fn ids_are_certainly_new_only_when_all_are_known() {
        let mut c = StateCache::new(1 << 20);
        let (a, b) = (update("a", 1), update("b", 1));
        let h = c.id_hash("e1");
        c.committed(&a, [h], Some(HashSet::new()), None);
        c.committed(&b, [h], None, None);
        assert!(!c.certainly_new(&a.key, "e1"));
        assert!(c.certainly_new(&a.key, "e2"));
        // b's earlier ids are not known: every id is asked of the store.
        assert!(!c.certainly_new(&b.key, "e2"));
        // A later commit adds to what a cached entry knows.
        let h2 = c.id_hash("e2");
        c.committed(&update("a", 2), [h2], None, None);
        assert!(!c.certainly_new(&a.key, "e2"));
        assert!(c.certainly_new(&a.key, "e3"));
        assert!(!c.certainly_new(&EntityKey::new("account", "z"), "e1"));
    }

    #[test]
    fn quarantined_entities_are_not_kept() {
        let mut c = StateCache::new(1 << 20);
        c.committed(&update("a", 1), [], Some(HashSet::new()), None);
        let q = EntityUpdate {
            quarantined: true,
            ..update("a", 2)
        };
        c.committed(&q, [], None, None);
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }

    #[test]
    fn the_budget_holds_and_the_least_recent_go_first() {
        let one = {
            let mut c = StateCache::new(usize::MAX);
            c.committed(&update("0", 1), [], Some(HashSet::new()), None);
            c.bytes()
        };
        let mut c = StateCache::new(one * 3);
        for i in 0..3 {
            c.committed(&update(&i.to_string(), 1), [], Some(HashSet::new()), None);
        }
        // A batch takes "0" and puts it back: "1" is now the least recent.
        let zero = EntityKey::new("account", "0");
        let (_, ids) = c.take(&zero, &Generation::base()).unwrap();
        c.committed(&update("0", 2), [], ids, None);
        c.committed(&update("3", 1), [], Some(HashSet::new()), None);
        assert_eq!(c.len(), 3);
        assert!(c.bytes() <= one * 3);
        assert!(!c.holds(&EntityKey::new("account", "1")));
        assert!(c.holds(&zero));
        assert_eq!(c.take_stats().evictions, 1);
        // A zero budget keeps nothing.
        let mut none = StateCache::new(0);
        none.committed(&update("a", 1), [], Some(HashSet::new()), None);
        assert_eq!(none.len(), 0);
    }

    #[test]
    fn the_entries_of_revoked_partitions_go_and_the_others_stay() {
        let mut c = StateCache::new(1 << 20);
        let (p0, p1) = (partition_tag("t", 0), partition_tag("t", 1));
        assert_ne!(p0, partition_tag("u", 0));
        c.committed(&update("a", 1), [], Some(HashSet::new()), Some(p0));
        c.committed(&update("b", 1), [], Some(HashSet::new()), Some(p1));
        // A later commit without events keeps the partition it had.
        c.committed(&update("b", 2), [], None, None);
        c.committed(&update("c", 1), [], Some(HashSet::new()), None);
        let one = c.bytes() / 3;
        assert_eq!(
            c.forget_partitions(&[p0].into()),
            2,
            "a, and c of no partition"
        );
        assert_eq!((c.len(), c.bytes()), (1, one));
        assert!(c.holds(&EntityKey::new("account", "b")));
        assert_eq!(c.forget_partitions(&[p0].into()), 0);
        assert_eq!(c.forget_partitions(&[p1].into()), 1);
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }

    #[test]
    fn clearing_forgets_entries_and_their_bytes() {
        let mut c = StateCache::new(1 << 20);
        let u = update("a", 1);
        c.committed(&u, [], Some(HashSet::new()), None);
        c.clear();
        assert_eq!((c.len(), c.bytes()), (0, 0));
        assert!(!c.certainly_new(&u.key, "x"));
    }
}

//! Step 2 of a batch: deduplicate by identity (entity type, entity id, event
//! id), within the batch and against the store. The same bytes again are a
//! re-delivery; other bytes under a known identity are a conflict, kept as a
//! dead letter naming both digests: never dropped silently.

use std::collections::HashMap;

use refold_store::{DeadLetter, EventIdentity, Origin, Storage, StoreError};
use refold_types::event::Envelope;

use super::cache::StateCache;
use super::validate::{Valid, conflict, dead_letter};

/// What deduplication kept and dropped.
#[derive(Default)]
pub(crate) struct Deduped {
    /// Events seen for the first time, in arrival order, with their origin.
    pub(crate) fresh: Vec<(Envelope, Origin)>,
    /// Re-deliveries (same identity, same bytes) dropped.
    pub(crate) duplicates: usize,
    /// Conflicting duplicates (same identity, other bytes).
    pub(crate) dead_letters: Vec<DeadLetter>,
}

/// Drop re-deliveries and dead-letter conflicts, first within the batch,
/// then against what the store already holds: one `known_ids` read for the
/// ids the cache cannot vouch for as new, none when there are none. The
/// events of the batch being written (`in_flight`) count as stored.
pub(crate) async fn dedup(
    storage: &dyn Storage,
    cache: &StateCache,
    in_flight: &HashMap<EventIdentity, Option<String>>,
    valid: Vec<Valid<'_>>,
) -> Result<Deduped, StoreError> {
    let (unique, mut deduped) = within_batch(valid);
    let mut from_flight = HashMap::new();
    let mut ask: Vec<EventIdentity> = Vec::new();
    for (e, _) in &unique {
        if cache.certainly_new(&e.key, &e.id) {
            continue;
        }
        let identity = (e.key.clone(), e.id.clone());
        match in_flight.get(&identity) {
            Some(d) => {
                from_flight.insert(identity, d.clone());
            }
            None => ask.push(identity),
        }
    }
    let mut known = if ask.is_empty() {
        HashMap::new()
    } else {
        storage.known_ids(&ask).await?
    };
    known.extend(from_flight);
    against_store(unique, &known, &mut deduped);
    Ok(deduped)
}

/// The first of each identity in the batch; later copies are duplicates or
/// conflicts.
fn within_batch(valid: Vec<Valid<'_>>) -> (Vec<Valid<'_>>, Deduped) {
    let mut deduped = Deduped::default();
    let mut seen: HashMap<EventIdentity, String> = HashMap::with_capacity(valid.len());
    let mut unique = Vec::with_capacity(valid.len());
    for (e, r) in valid {
        let identity = (e.key.clone(), e.id.clone());
        match seen.get(&identity) {
            None => {
                seen.insert(identity, e.digest.clone());
                unique.push((e, r));
            }
            Some(d) if *d == e.digest => deduped.duplicates += 1,
            Some(d) => deduped.dead_letters.push(dead_letter(r, &conflict(&e, d))),
        }
    }
    (unique, deduped)
}

/// Of `unique`, the identities the store does not know yet. A stored event
/// without a digest (kept before digests were) counts as the same bytes.
fn against_store(
    unique: Vec<Valid<'_>>,
    known: &HashMap<EventIdentity, Option<String>>,
    deduped: &mut Deduped,
) {
    deduped.fresh.reserve(unique.len());
    for (e, r) in unique {
        match known.get(&(e.key.clone(), e.id.clone())) {
            None => deduped.fresh.push((e, r.origin.clone())),
            Some(None) => deduped.duplicates += 1,
            Some(Some(d)) if *d == e.digest => deduped.duplicates += 1,
            Some(Some(d)) => deduped.dead_letters.push(dead_letter(r, &conflict(&e, d))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::testing::{bank_host, deposit};
    use crate::pipeline::validate::validate;

    #[test]
    fn within_a_batch_the_first_of_an_identity_stays() {
        let host = bank_host();
        let records = [
            deposit(0, "a", "1", 10),
            deposit(1, "a", "1", 10), // re-delivered
            deposit(2, "b", "1", 10), // same id, other entity
            deposit(3, "a", "1", 99), // other bytes
        ];
        let (v, _) = validate(&records, &host.registry.snapshot(), 1 << 20);
        let (unique, deduped) = within_batch(v);
        let kept: Vec<i64> = unique.iter().map(|(_, r)| r.origin.offset).collect();
        assert_eq!(kept, [0, 2]);
        assert_eq!(deduped.duplicates, 1);
        assert_eq!(deduped.dead_letters.len(), 1);
        assert_eq!(deduped.dead_letters[0].code, "conflicting_duplicate");
        assert_eq!(deduped.dead_letters[0].origin.as_ref().unwrap().offset, 3);
    }

    #[test]
    fn against_the_store_known_bytes_are_duplicates_and_other_bytes_conflicts() {
        let host = bank_host();
        let records = [
            deposit(0, "a", "1", 10),
            deposit(1, "a", "2", 10),
            deposit(2, "a", "3", 10),
            deposit(3, "a", "4", 10),
        ];
        let (v, _) = validate(&records, &host.registry.snapshot(), 1 << 20);
        let id = |e: &Envelope| (e.key.clone(), e.id.clone());
        let mut known = HashMap::new();
        known.insert(id(&v[1].0), Some(v[1].0.digest.clone()));
        known.insert(id(&v[2].0), None);
        known.insert(id(&v[3].0), Some("0".repeat(64)));
        let mut deduped = Deduped::default();
        against_store(v, &known, &mut deduped);
        let fresh: Vec<&str> = deduped.fresh.iter().map(|(e, _)| e.id.as_str()).collect();
        assert_eq!(fresh, ["1"]);
        assert_eq!(deduped.duplicates, 2);
        assert_eq!(deduped.dead_letters.len(), 1);
        assert!(deduped.dead_letters[0].reason.contains(&"0".repeat(64)));
    }

    #[tokio::test]
    async fn dedup_reads_the_store_once_and_only_when_something_is_left() {
        let host = bank_host();
        let first = [deposit(0, "a", "1", 10)];
        crate::pipeline::Pipeline::for_host(&host)
            .process(&first)
            .await
            .unwrap();
        let records = [deposit(1, "a", "1", 10), deposit(2, "a", "2", 1)];
        let (v, _) = validate(&records, &host.registry.snapshot(), 1 << 20);
        let (cache, flight) = (StateCache::new(0), HashMap::new());
        let d = dedup(&*host.storage, &cache, &flight, v).await.unwrap();
        assert_eq!((d.fresh.len(), d.duplicates), (1, 1));
        assert_eq!(d.fresh[0].1.offset, 2);
        let none = dedup(&*host.storage, &cache, &flight, Vec::new())
            .await
            .unwrap();
        assert!(none.fresh.is_empty());
    }
}

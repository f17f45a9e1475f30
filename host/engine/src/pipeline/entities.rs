//! Every entity of a type, with its record: the ids the event store knows,
//! as keys, loaded in one read.

use std::collections::HashMap;

use refold_store::{EntityRecord, Storage, StoreError};
use refold_types::event::EntityKey;

/// The entities of one type and their records.
#[derive(Debug, Default)]
pub struct Entities {
    /// Every entity that has events, in the store's id order.
    pub keys: Vec<EntityKey>,
    /// Their records (an entity whose events were never committed with a
    /// state has none).
    pub records: HashMap<EntityKey, EntityRecord>,
}

impl Entities {
    /// The records in the order of `keys`, skipping keys without one.
    pub fn in_order(&self) -> impl Iterator<Item = &EntityRecord> {
        self.keys.iter().filter_map(|k| self.records.get(k))
    }
}

/// The first `limit` entities of `entity_type` that have events (all of
/// them with `usize::MAX`), and their records.
pub async fn entities_of(
    storage: &dyn Storage,
    entity_type: &str,
    limit: usize,
) -> Result<Entities, StoreError> {
    let keys: Vec<EntityKey> = storage
        .entity_ids(entity_type)
        .await?
        .into_iter()
        .take(limit)
        .map(|id| EntityKey::new(entity_type, id))
        .collect();
    let records = if keys.is_empty() {
        HashMap::new()
    } else {
        storage.load(&keys).await?
    };
    Ok(Entities { keys, records })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Pipeline;
    use crate::pipeline::testing::{bank_host, deposit};

    #[tokio::test]
    async fn every_entity_of_a_type_comes_with_its_record_up_to_the_limit() {
        let host = bank_host();
        Pipeline::for_host(&host)
            .process(&[
                deposit(0, "b", "1", 1),
                deposit(1, "a", "1", 2),
                deposit(2, "c", "1", 3),
            ])
            .await
            .unwrap();
        let all = entities_of(&*host.storage, "account", usize::MAX)
            .await
            .unwrap();
        assert_eq!(all.keys.len(), 3);
        let positions: Vec<(String, u64)> = all
            .in_order()
            .map(|r| (r.key.entity_id.clone(), r.position))
            .collect();
        assert_eq!(positions.len(), 3);
        assert!(positions.iter().all(|(_, p)| *p == 1));
        let two = entities_of(&*host.storage, "account", 2).await.unwrap();
        assert_eq!((two.keys.len(), two.records.len()), (2, 2));
        assert_eq!(two.keys, all.keys[..2]);
        let none = entities_of(&*host.storage, "order", usize::MAX)
            .await
            .unwrap();
        assert!(none.keys.is_empty() && none.records.is_empty());
    }
}

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

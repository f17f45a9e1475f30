//! [`EventStore`]: raw events, read per entity.

use std::collections::HashMap;

use async_trait::async_trait;
use refold_store::{
    EntityKey, EventIdentity, EventStore, Paged, Result, StoredEvent, decode_cursor, encode_cursor,
};
use rusqlite::{OptionalExtension, named_params};

use crate::open::SqliteStore;
use crate::rows;

#[async_trait]
impl EventStore for SqliteStore {
    async fn known_ids(
        &self,
        ids: &[EventIdentity],
    ) -> Result<HashMap<EventIdentity, Option<String>>> {
        let ids = ids.to_vec();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT digest FROM events
                 WHERE entity_type = :entity_type AND entity_id = :entity_id AND event_id = :event_id",
            )?;
            let mut known = HashMap::new();
            for identity in ids {
                let (k, id) = &identity;
                let found: Option<Option<String>> = st
                    .query_row(
                        named_params! {
                            ":entity_type": k.entity_type,
                            ":entity_id": k.entity_id,
                            ":event_id": id,
                        },
                        |r| r.get("digest"),
                    )
                    .optional()?;
                if let Some(digest) = found {
                    known.insert(identity, digest);
                }
            }
            Ok(known)
        })
        .await
    }

    async fn event_ids(&self, key: &EntityKey, upto: u64) -> Result<Vec<String>> {
        let key = key.clone();
        let upto = upto.min(i64::MAX as u64) as i64;
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT event_id FROM events
                 WHERE entity_type = :entity_type AND entity_id = :entity_id
                   AND position <= :upto
                 ORDER BY position",
            )?;
            let ids = st.query_map(
                named_params! {
                    ":entity_type": key.entity_type,
                    ":entity_id": key.entity_id,
                    ":upto": upto,
                },
                |r| r.get::<_, String>(0),
            )?;
            ids.collect()
        })
        .await
    }

    async fn history(
        &self,
        key: &EntityKey,
        after: u64,
        upto: Option<u64>,
    ) -> Result<Vec<StoredEvent>> {
        let key = key.clone();
        let after = after.min(i64::MAX as u64) as i64;
        let upto = upto.unwrap_or(i64::MAX as u64).min(i64::MAX as u64) as i64;
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT position, event_id, source, event_type, time, data, origin, record, digest
                 FROM events
                 WHERE entity_type = :entity_type AND entity_id = :entity_id
                   AND position > :after AND position <= :upto
                 ORDER BY position",
            )?;
            let rows = st.query_map(
                named_params! {
                    ":entity_type": key.entity_type,
                    ":entity_id": key.entity_id,
                    ":after": after,
                    ":upto": upto,
                },
                |r| rows::event(&key, r),
            )?;
            rows.collect()
        })
        .await
    }

    async fn entity_ids(&self, entity_type: &str) -> Result<Vec<String>> {
        let t = entity_type.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT DISTINCT entity_id FROM events WHERE entity_type = :entity_type ORDER BY entity_id",
            )?;
            let rows = st.query_map(named_params! {":entity_type": t}, |r| r.get("entity_id"))?;
            rows.collect()
        })
        .await
    }

    async fn entity_page(
        &self,
        entity_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<String>>> {
        // The cursor is the last id seen; "" sorts before every id. The
        // entities table has a row for every entity with an event (a
        // commit writes both), keyed for this range read.
        let after: String = after.map(decode_cursor).transpose()?.unwrap_or_default();
        let t = entity_type.to_string();
        let limit = limit.min(i64::MAX as usize) as i64;
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT entity_id FROM entities WHERE entity_type = :entity_type AND entity_id > :after
                 ORDER BY entity_id LIMIT :limit",
            )?;
            let rows = st.query_map(
                named_params! {":entity_type": t, ":after": after, ":limit": limit},
                |r| {
                    let id: String = r.get("entity_id")?;
                    Ok(Paged {
                        cursor: encode_cursor(&id),
                        item: id,
                    })
                },
            )?;
            rows.collect()
        })
        .await
    }
}

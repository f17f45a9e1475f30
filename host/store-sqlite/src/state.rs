//! [`StateStore`]: entity states, projections, dead letters, quarantine,
//! checkpoints, generations' namespaces and replay snapshots. Everything a
//! batch writes goes through `commit`; what is here reads, or changes one
//! thing an operator or a rebuild asked for.

use std::collections::HashMap;

use async_trait::async_trait;
use refold_store::{
    Checkpoint, DeadLetter, EntityKey, EntityRecord, Paged, QuarantineRecord, Result, StateStore,
    StoredChange, decode_cursor, encode_cursor,
};
use rusqlite::{OptionalExtension, named_params};
use serde_json::Value;

use crate::open::SqliteStore;
use crate::rows;

/// `projection` ends with `:suffix` (SQLite has no `ends_with`).
const HAS_SUFFIX: &str = "substr(projection, length(projection) - length(:suffix) + 1) = :suffix";

#[async_trait]
impl StateStore for SqliteStore {
    async fn load(&self, keys: &[EntityKey]) -> Result<HashMap<EntityKey, EntityRecord>> {
        let keys = keys.to_vec();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT state, position, head, plugin_name, plugin_version, plugin_digest,
                        quarantined, generation
                 FROM entities WHERE entity_type = :entity_type AND entity_id = :entity_id",
            )?;
            let mut out = HashMap::new();
            for k in keys {
                let rec = st
                    .query_row(
                        named_params! {":entity_type": k.entity_type, ":entity_id": k.entity_id},
                        |r| rows::entity(&k, r),
                    )
                    .optional()?;
                if let Some(rec) = rec {
                    out.insert(k, rec);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn projection(&self, name: &str, key: &str) -> Result<Option<Value>> {
        let (n, k) = (name.to_string(), key.to_string());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT body FROM projections WHERE projection = :projection AND key = :key",
            )?
            .query_row(
                named_params! {":projection": n, ":key": k},
                rows::projection_body,
            )
            .optional()
        })
        .await
    }

    async fn projection_page(
        &self,
        name: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<(String, Value)>>> {
        // The cursor is the last key seen; "" sorts before every key.
        let after: String = after.map(decode_cursor).transpose()?.unwrap_or_default();
        let n = name.to_string();
        let limit = limit.min(i64::MAX as usize) as i64;
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT key, body FROM projections WHERE projection = :projection AND key > :after
                 ORDER BY key LIMIT :limit",
            )?;
            let rows = st.query_map(
                named_params! {":projection": n, ":after": after, ":limit": limit},
                |r| {
                    let key: String = r.get("key")?;
                    Ok(Paged {
                        cursor: encode_cursor(&key),
                        item: (key, rows::projection_body(r)?),
                    })
                },
            )?;
            rows.collect()
        })
        .await
    }

    async fn dead_letter_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<DeadLetter>>> {
        // The cursor is the arrival sequence number of the last item seen.
        let after: i64 = after.map(decode_cursor).transpose()?.unwrap_or(0);
        let limit = limit.min(i64::MAX as usize) as i64;
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT seq, id, code, reason, payload, origin, event_id, entity_type, recorded_at
                 FROM dead_letters WHERE seq > :after ORDER BY seq LIMIT :limit",
            )?;
            let rows = st.query_map(named_params! {":after": after, ":limit": limit}, |r| {
                Ok(Paged {
                    cursor: encode_cursor(&r.get::<_, i64>("seq")?),
                    item: rows::dead_letter(r)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>> {
        let id = id.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT id, code, reason, payload, origin, event_id, entity_type, recorded_at
                 FROM dead_letters WHERE id = :id",
            )?
            .query_row(named_params! {":id": id}, rows::dead_letter)
            .optional()
        })
        .await
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool> {
        let id = id.to_string();
        self.write(move |c| {
            c.execute(
                "DELETE FROM dead_letters WHERE id = :id",
                named_params! {":id": id},
            )
            .map(|n| n > 0)
        })
        .await
    }

    async fn quarantine_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<QuarantineRecord>>> {
        // The cursor is the primary key (entity type, entity id) of the last
        // item seen; the empty key sorts before every real one.
        let (t, id): (String, String) = after.map(decode_cursor).transpose()?.unwrap_or_default();
        let limit = limit.min(i64::MAX as usize) as i64;
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT entity_type, entity_id, event_id, event_position, kind, error,
                        plugin_name, plugin_version, plugin_digest, recorded_at
                 FROM quarantine WHERE (entity_type, entity_id) > (:entity_type, :entity_id)
                 ORDER BY entity_type, entity_id LIMIT :limit",
            )?;
            let rows = st.query_map(
                named_params! {":entity_type": t, ":entity_id": id, ":limit": limit},
                |r| {
                    let item = rows::quarantine(r)?;
                    Ok(Paged {
                        cursor: encode_cursor(&(&item.key.entity_type, &item.key.entity_id)),
                        item,
                    })
                },
            )?;
            rows.collect()
        })
        .await
    }

    async fn quarantine(&self, key: &EntityKey) -> Result<Option<QuarantineRecord>> {
        let key = key.clone();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT entity_type, entity_id, event_id, event_position, kind, error,
                        plugin_name, plugin_version, plugin_digest, recorded_at
                 FROM quarantine WHERE entity_type = :entity_type AND entity_id = :entity_id",
            )?
            .query_row(
                named_params! {":entity_type": key.entity_type, ":entity_id": key.entity_id},
                rows::quarantine,
            )
            .optional()
        })
        .await
    }

    async fn release(&self, key: &EntityKey) -> Result<()> {
        let key = key.clone();
        self.write(move |c| {
            let tx = c.transaction()?;
            let at = named_params! {":entity_type": key.entity_type, ":entity_id": key.entity_id};
            tx.execute(
                "DELETE FROM quarantine WHERE entity_type = :entity_type AND entity_id = :entity_id",
                at,
            )?;
            tx.execute(
                "UPDATE entities SET quarantined = 0
                 WHERE entity_type = :entity_type AND entity_id = :entity_id",
                at,
            )?;
            tx.commit()
        })
        .await
    }

    async fn checkpoints(&self, source: &str) -> Result<Vec<Checkpoint>> {
        let s = source.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT partition, offset FROM checkpoints WHERE source = :source ORDER BY partition",
            )?;
            let rows = st.query_map(named_params! {":source": s}, |r| {
                Ok(Checkpoint {
                    source: s.clone(),
                    partition: r.get("partition")?,
                    offset: r.get("offset")?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn adopt_projections(&self, ns: &str, archive: &str) -> Result<()> {
        let (suffix, keep) = (format!("@{ns}"), format!("@{archive}"));
        self.write(move |c| {
            let tx = c.transaction()?;
            // The archive of the previous adoption goes: the live documents
            // about to be replaced take its place, for a rollback.
            tx.execute(
                &format!("DELETE FROM projections WHERE {HAS_SUFFIX}"),
                named_params! {":suffix": keep},
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO projections (projection, key, body)
                 SELECT live.projection || :keep, live.key, live.body
                 FROM projections AS built JOIN projections AS live
                   ON live.projection = substr(built.projection, 1, length(built.projection) - length(:suffix))
                  AND live.key = built.key
                 WHERE substr(built.projection, length(built.projection) - length(:suffix) + 1) = :suffix",
                named_params! {":suffix": suffix, ":keep": keep},
            )?;
            tx.execute(
                &format!(
                    "INSERT OR REPLACE INTO projections (projection, key, body)
                     SELECT substr(projection, 1, length(projection) - length(:suffix)), key, body
                     FROM projections WHERE {HAS_SUFFIX}"
                ),
                named_params! {":suffix": suffix},
            )?;
            tx.execute(
                &format!("DELETE FROM projections WHERE {HAS_SUFFIX}"),
                named_params! {":suffix": suffix},
            )?;
            tx.commit()
        })
        .await
    }

    async fn drop_namespace(&self, ns: &str) -> Result<()> {
        let (ns, suffix) = (ns.to_string(), format!("@{ns}"));
        self.write(move |c| {
            let tx = c.transaction()?;
            // A namespace's states and quarantines are kept under the
            // namespace as their entity type.
            tx.execute(
                "DELETE FROM entities WHERE entity_type = :ns",
                named_params! {":ns": ns},
            )?;
            tx.execute(
                "DELETE FROM quarantine WHERE entity_type = :ns",
                named_params! {":ns": ns},
            )?;
            tx.execute(
                &format!("DELETE FROM projections WHERE {HAS_SUFFIX}"),
                named_params! {":suffix": suffix},
            )?;
            tx.commit()
        })
        .await
    }

    async fn snapshot_before(
        &self,
        key: &EntityKey,
        digest: &str,
        at: u64,
    ) -> Result<Option<(u64, Value)>> {
        let (key, digest) = (key.clone(), digest.to_string());
        let at = at.min(i64::MAX as u64) as i64;
        self.read(move |c| {
            let found = c
                .prepare_cached(
                    "SELECT position, state FROM snapshots
                     WHERE entity_type = :entity_type AND entity_id = :entity_id
                       AND digest = :digest AND position <= :at
                     ORDER BY position DESC LIMIT 1",
                )?
                .query_row(
                    named_params! {
                        ":entity_type": key.entity_type,
                        ":entity_id": key.entity_id,
                        ":digest": digest,
                        ":at": at,
                    },
                    rows::snapshot,
                )
                .optional()?;
            Ok(found.flatten())
        })
        .await
    }

    async fn put_snapshots(
        &self,
        key: &EntityKey,
        digest: &str,
        snapshots: &[(u64, Value)],
    ) -> Result<()> {
        if snapshots.is_empty() {
            return Ok(());
        }
        let (key, digest) = (key.clone(), digest.to_string());
        let snaps: Vec<(i64, String)> = snapshots
            .iter()
            .map(|(p, v)| (*p as i64, v.to_string()))
            .collect();
        self.write(move |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT OR REPLACE INTO snapshots (entity_type, entity_id, digest, position, state)
                     VALUES (:entity_type, :entity_id, :digest, :position, :state)",
                )?;
                for (position, state) in &snaps {
                    st.execute(named_params! {
                        ":entity_type": key.entity_type,
                        ":entity_id": key.entity_id,
                        ":digest": digest,
                        ":position": position,
                        ":state": state,
                    })?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn changes_after(&self, after: u64, limit: usize) -> Result<Vec<StoredChange>> {
        let after = after.min(i64::MAX as u64) as i64;
        let limit = limit.min(i64::MAX as usize) as i64;
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT seq, kind, entity_type, entity_id, first_position, last_position,
                        generation, activation, plugin_name, plugin_version, plugin_digest,
                        state, previous, event_ids, time
                 FROM changes WHERE seq > :after ORDER BY seq LIMIT :limit",
            )?;
            let rows = st.query_map(named_params! {":after": after, ":limit": limit}, |r| {
                let (cursor, record) = rows::change(r)?;
                Ok(record.into_stored(cursor))
            })?;
            rows.collect()
        })
        .await
    }

    async fn changes_head(&self) -> Result<u64> {
        self.read(|c| {
            c.query_row("SELECT COALESCE(MAX(seq), 0) FROM changes", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .await
        .map(|n| n.max(0) as u64)
    }

    async fn prune_changes(&self, before_ms: i64) -> Result<u64> {
        self.write(move |c| {
            // The newest record stays, whatever its age: a cursor is the
            // rowid, which SQLite issues as the largest plus one, so while
            // the newest is kept no removed cursor is ever issued again.
            // By cursor, not by time alone: a clock that stepped back must
            // not punch a hole in the middle of the feed, where a reader
            // could not tell it from records never made.
            c.execute(
                "DELETE FROM changes WHERE seq < COALESCE(
                     (SELECT MIN(seq) FROM changes WHERE recorded_ms >= :before),
                     (SELECT MAX(seq) FROM changes))",
                named_params! {":before": before_ms},
            )
        })
        .await
        .map(|n| n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state column that is not JSON is corrupt data naming the entity,
    /// never a silent `null`.
    #[tokio::test]
    async fn a_rotted_state_is_corrupt_not_null() {
        let s = SqliteStore::in_memory().unwrap();
        s.write(|c| {
            c.execute(
                "INSERT INTO entities (entity_type, entity_id, state, position, head)
                 VALUES ('account', 'a1', '{rot', 1, 1)",
                [],
            )
        })
        .await
        .unwrap();
        let err = s
            .load(&[EntityKey::new("account", "a1")])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, refold_store::StoreError::Corrupt(why) if why.contains("account/a1")),
            "{err:#}"
        );
    }
}

#[cfg(test)]
mod feed_tests {
    use refold_store::{
        ChangeKind, ChangeRecord, Commit, EntityKey, EntityUpdate, Generation, StateStore, Storage,
    };
    use serde_json::json;

    use crate::open::SqliteStore;

    fn change(id: &str, last: u64) -> ChangeRecord {
        ChangeRecord {
            kind: ChangeKind::Changed,
            key: EntityKey::new("account", id),
            first_position: last,
            last_position: last,
            generation: Generation::base(),
            activation: None,
            plugin: None,
            state: json!({"n": last}),
            previous: None,
            event_ids: None,
            time: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn update(id: &str, head: u64) -> EntityUpdate {
        EntityUpdate {
            key: EntityKey::new("account", id),
            state: json!({"n": head}),
            position: head,
            head,
            expected_head: head - 1,
            plugin: None,
            quarantined: false,
            generation: Generation::base(),
        }
    }

    /// Records come back in commit order with increasing cursors that
    /// survive a reopen, as they were committed; a fenced commit leaves no
    /// record; pruning keeps the newest, and cursors never go back.
    #[tokio::test]
    async fn the_feed_is_in_commit_order_exact_and_stable_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            assert_eq!(s.changes_head().await.unwrap(), 0);
            s.commit(Commit {
                entities: vec![update("a", 1), update("b", 1)],
                changes: vec![change("a", 1), change("b", 1)],
                ..Default::default()
            })
            .await
            .unwrap();
            // Fenced (a is at 1, not 4): nothing of it, its record included.
            let fenced = s
                .commit(Commit {
                    entities: vec![update("a", 5)],
                    changes: vec![change("a", 5)],
                    ..Default::default()
                })
                .await;
            assert!(fenced.is_err());
            s.commit(Commit {
                entities: vec![update("a", 2)],
                changes: vec![change("a", 2)],
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let all = s.changes_after(0, 10).await.unwrap();
        let seen: Vec<(String, u64)> = all
            .iter()
            .map(|c| {
                (
                    c.key.entity_id.clone(),
                    c.event["lastposition"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(seen, [("a".into(), 1), ("b".into(), 1), ("a".into(), 2)]);
        assert_eq!(all[2].event["data"]["state"], json!({"n": 2}));
        assert_eq!(all[2].event, change("a", 2).to_cloudevent());
        assert!(all.windows(2).all(|w| w[0].cursor < w[1].cursor));
        assert_eq!(all[0].id, change("a", 1).id());
        assert_eq!(s.changes_head().await.unwrap(), all[2].cursor);
        let rest = s.changes_after(all[0].cursor, 1).await.unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].cursor, all[1].cursor);

        // Everything is old: all but the newest go, and a new record's
        // cursor still follows the newest ever issued.
        assert_eq!(s.prune_changes(i64::MAX).await.unwrap(), 2);
        let left = s.changes_after(0, 10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].cursor, all[2].cursor);
        s.commit(Commit {
            entities: vec![update("b", 2)],
            changes: vec![change("b", 2)],
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(s.changes_head().await.unwrap() > all[2].cursor);
    }
}

//! [`PluginStore`]: uploaded versions, activations (conditional on their
//! predecessor) and rebuild records (compare-and-set on the heartbeat).

use async_trait::async_trait;
use refold_store::{
    Activation, Generation, PluginStore, PluginVersion, RebuildRecord, Result, StoreError,
};
use rusqlite::types::ToSql;
use rusqlite::{OptionalExtension, named_params};

use crate::open::SqliteStore;
use crate::rows;

#[async_trait]
impl PluginStore for SqliteStore {
    async fn put_plugin(&self, v: &PluginVersion, bytes: &[u8]) -> Result<()> {
        let (v, bytes) = (v.clone(), bytes.to_vec());
        self.write(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO plugin_versions
                        (digest, entity_type, name, version, size, uploaded_at, seq, bytes)
                 VALUES (:digest, :entity_type, :name, :version, :size, :uploaded_at,
                         (SELECT COALESCE(MAX(seq), 0) + 1 FROM plugin_versions), :bytes)",
                named_params! {
                    ":digest": v.digest,
                    ":entity_type": v.entity_type,
                    ":name": v.name,
                    ":version": v.version,
                    ":size": v.size as i64,
                    ":uploaded_at": v.uploaded_at,
                    ":bytes": bytes,
                },
            )
            .map(|_| ())
        })
        .await
    }

    async fn plugin_versions(&self, entity_type: &str) -> Result<Vec<PluginVersion>> {
        let t = entity_type.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT entity_type, name, version, digest, size, uploaded_at FROM plugin_versions
                 WHERE entity_type = :entity_type ORDER BY seq",
            )?;
            let rows = st.query_map(named_params! {":entity_type": t}, rows::plugin_version)?;
            rows.collect()
        })
        .await
    }

    async fn plugin_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        let d = digest.to_string();
        self.read(move |c| {
            c.prepare_cached("SELECT bytes FROM plugin_versions WHERE digest = :digest")?
                .query_row(named_params! {":digest": d}, |r| r.get("bytes"))
                .optional()
        })
        .await
    }

    async fn activation(&self, entity_type: &str) -> Result<Option<Activation>> {
        let t = entity_type.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT entity_type, digest, previous, mode, seq, activated_at, generation,
                        previous_generation, rolled_back
                 FROM activations WHERE entity_type = :entity_type",
            )?
            .query_row(named_params! {":entity_type": t}, rows::activation)
            .optional()
        })
        .await
    }

    async fn activations(&self) -> Result<Vec<Activation>> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT entity_type, digest, previous, mode, seq, activated_at, generation,
                        previous_generation, rolled_back
                 FROM activations ORDER BY entity_type",
            )?;
            let rows = st.query_map([], rows::activation)?;
            rows.collect()
        })
        .await
    }

    async fn put_activation(&self, a: &Activation) -> Result<()> {
        let a = a.clone();
        let t = a.entity_type.clone();
        let changed = self
            .write(move |c| {
                let rolled_back = rows::join_digests(&a.rolled_back);
                let (mode, generation) = (a.mode.as_str(), a.generation.as_str());
                let previous_generation = a.previous_generation.as_ref().map(Generation::as_str);
                let row: [(&str, &dyn ToSql); 9] = [
                    (":entity_type", &a.entity_type),
                    (":digest", &a.digest),
                    (":previous", &a.previous),
                    (":mode", &mode),
                    (":seq", &a.seq),
                    (":activated_at", &a.activated_at),
                    (":generation", &generation),
                    (":previous_generation", &previous_generation),
                    (":rolled_back", &rolled_back),
                ];
                let tx = c.transaction()?;
                let changed = if a.seq <= 1 {
                    // The first of its entity type: only if there is none.
                    tx.execute(
                        "INSERT OR IGNORE INTO activations (entity_type, digest, previous, mode, seq,
                                activated_at, generation, previous_generation, rolled_back)
                         VALUES (:entity_type, :digest, :previous, :mode, :seq,
                                 :activated_at, :generation, :previous_generation, :rolled_back)",
                        &row[..],
                    )?
                } else {
                    // The successor: only over the predecessor it was built on.
                    let predecessor = a.seq - 1;
                    let mut fenced = row.to_vec();
                    fenced.push((":predecessor", &predecessor));
                    tx.execute(
                        "UPDATE activations SET digest = :digest, previous = :previous, mode = :mode,
                                seq = :seq, activated_at = :activated_at, generation = :generation,
                                previous_generation = :previous_generation, rolled_back = :rolled_back
                         WHERE entity_type = :entity_type AND seq = :predecessor",
                        fenced.as_slice(),
                    )?
                };
                // In the same transaction: the history has an entry for
                // every activation recorded, and none for a fenced one.
                if changed == 1 {
                    let kept = refold_store::plugins::history_entry(&a).map_err(|e| {
                        rusqlite::Error::ToSqlConversionFailure(Box::new(e))
                    })?;
                    tx.execute(
                        "INSERT OR REPLACE INTO activation_history (entity_type, seq, activation)
                         VALUES (?1, ?2, ?3)",
                        rusqlite::params![a.entity_type, a.seq, kept],
                    )?;
                }
                tx.commit()?;
                Ok(changed)
            })
            .await?;
        if changed != 1 {
            return Err(StoreError::Fenced(format!(
                "another activation of {t} was recorded meanwhile"
            )));
        }
        Ok(())
    }

    async fn activation_history(
        &self,
        entity_type: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Activation>> {
        let t = entity_type.to_string();
        let current = self.activation(entity_type).await?;
        let n = limit.min(i64::MAX as usize) as i64;
        let kept: Vec<String> = self
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT activation FROM activation_history
                     WHERE entity_type = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
                )?;
                let rows = st
                    .query_map(rusqlite::params![t, before.unwrap_or(i64::MAX), n], |r| {
                        r.get(0)
                    })?;
                rows.collect()
            })
            .await?;
        refold_store::plugins::merge_history(&kept, current, before, limit)
    }

    async fn put_rebuild(
        &self,
        r: &RebuildRecord,
        expected_heartbeat: Option<i64>,
    ) -> Result<bool> {
        let r = r.clone();
        let changed = self
            .write(move |c| {
                let (generation, state) = (r.generation.as_str(), r.state.as_str());
                let row: [(&str, &dyn ToSql); 15] = [
                    (":id", &r.id),
                    (":entity_type", &r.entity_type),
                    (":digest", &r.digest),
                    (":generation", &generation),
                    (":state", &state),
                    (":entities_done", &r.entities_done),
                    (":entities_total", &r.entities_total),
                    (":events_done", &r.events_done),
                    (":events_total", &r.events_total),
                    (":quarantined", &r.quarantined),
                    (":error", &r.error),
                    (":owner", &r.owner),
                    (":started_at", &r.started_at),
                    (":finished_at", &r.finished_at),
                    (":heartbeat_ms", &r.heartbeat_ms),
                ];
                match &expected_heartbeat {
                    None => c.execute(
                        "INSERT OR IGNORE INTO rebuilds (id, entity_type, digest, generation, state,
                                entities_done, entities_total, events_done, events_total, quarantined,
                                error, owner, started_at, finished_at, heartbeat_ms)
                         VALUES (:id, :entity_type, :digest, :generation, :state,
                                 :entities_done, :entities_total, :events_done, :events_total, :quarantined,
                                 :error, :owner, :started_at, :finished_at, :heartbeat_ms)",
                        &row[..],
                    ),
                    Some(seen) => {
                        let mut fenced = row.to_vec();
                        fenced.push((":expected_heartbeat", seen));
                        c.execute(
                            "UPDATE rebuilds SET entity_type = :entity_type, digest = :digest,
                                    generation = :generation, state = :state,
                                    entities_done = :entities_done, entities_total = :entities_total,
                                    events_done = :events_done, events_total = :events_total,
                                    quarantined = :quarantined, error = :error, owner = :owner,
                                    started_at = :started_at, finished_at = :finished_at,
                                    heartbeat_ms = :heartbeat_ms
                             WHERE id = :id AND heartbeat_ms = :expected_heartbeat",
                            fenced.as_slice(),
                        )
                    }
                }
            })
            .await?;
        Ok(changed == 1)
    }

    async fn rebuilds(&self) -> Result<Vec<RebuildRecord>> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, entity_type, digest, generation, state, entities_done, entities_total,
                        events_done, events_total, quarantined, error, owner, started_at,
                        finished_at, heartbeat_ms
                 FROM rebuilds ORDER BY started_at, id",
            )?;
            let rows = st.query_map([], rows::rebuild)?;
            rows.collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stored text that names no mode is corrupt data, never a default.
    #[tokio::test]
    async fn an_unknown_stored_mode_is_corrupt() {
        let s = SqliteStore::in_memory().unwrap();
        s.write(|c| {
            c.execute(
                "INSERT INTO activations (entity_type, digest, mode, seq, activated_at)
                 VALUES ('account', 'd1', 'sideways', 1, '2026-01-01T00:00:00Z')",
                [],
            )
        })
        .await
        .unwrap();
        let err = s.activation("account").await.unwrap_err();
        assert!(
            matches!(&err, refold_store::StoreError::Corrupt(why) if why.contains("sideways")),
            "{err:#}"
        );
        assert!(matches!(
            s.activations().await,
            Err(refold_store::StoreError::Corrupt(_))
        ));
    }
}

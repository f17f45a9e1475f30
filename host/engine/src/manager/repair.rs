//! Repair: what an operator does about one entity or one record that went
//! wrong. Retry a quarantined entity with the active version, export it as a
//! fixture for `refold test`, re-submit a dead letter (as received or
//! corrected). Each lands between two batches.

use std::sync::atomic::{AtomicU64, Ordering};

use refold_runtime::Sandbox;
use refold_source::SourceRecord;
use refold_store::{Commit, EntityRecord, EntityUpdate};
use refold_types::event::{EntityKey, RawJson};

use super::PluginManager;
use super::types::{ExpectedState, Fixture, InstallError, Resubmitted, Retried};
use crate::generation;
use crate::pipeline::{Pipeline, entity};
use crate::registry::plugin_ref;

impl PluginManager {
    /// An entity's record in the active generation of its type (see
    /// [`generation::resolve`]), with what must be written if it is committed.
    async fn load_active(
        &self,
        key: &EntityKey,
        save: bool,
    ) -> Result<(EntityRecord, generation::Moves), InstallError> {
        let mut recs = self.host.storage.load(std::slice::from_ref(key)).await?;
        let moves = generation::resolve(
            &*self.host.storage,
            &self.host.registry.generations(),
            &mut recs,
            save,
        )
        .await?;
        let rec = recs
            .remove(key)
            .ok_or_else(|| InstallError::NotFound(format!("no entity {key}")))?;
        Ok((rec, moves))
    }

    /// Re-apply a quarantined entity's held events with the active version.
    pub async fn retry(&self, key: &EntityKey) -> Result<Retried, InstallError> {
        let plugin = self.host.registry.get(&key.entity_type).ok_or_else(|| {
            InstallError::NotFound(format!("no active plugin for {}", key.entity_type))
        })?;
        let _gate = self.gate.write().await;
        let (rec, moves) = self.load_active(key, true).await?;
        if !rec.quarantined {
            return Err(InstallError::NotFound(format!("{key} is not quarantined")));
        }
        let held = self.host.storage.history(key, rec.position, None).await?;
        let held_events = held.len();
        let p = plugin.clone();
        let detail =
            entity::ChangeDetail::of(&self.host.config.changes, self.host.config.store.kind);
        let mut d = tokio::task::spawn_blocking(move || {
            entity::retry(&mut Sandbox::new(p), rec, held, detail)
        })
        .await
        .map_err(|e| anyhow::anyhow!("retry task: {e}"))?;
        let q = d.quarantine();
        let mut commit = Commit {
            released: vec![key.clone()],
            entities: moves.saved,
            quarantines: moves.quarantines,
            ..Default::default()
        };
        if let Some(o) = &d.outcome {
            commit.projections.extend(o.projections.iter().cloned());
        }
        let update: EntityUpdate = d.update.clone();
        // The events a retry applies are news like any batch's.
        commit.changes.extend(d.change.take());
        commit.entities.push(d.update);
        commit.quarantines.extend(q.clone());
        let counts = crate::pipeline::change_counts(&commit.changes);
        self.host.storage.commit(commit).await?;
        crate::pipeline::announce(&self.host.metrics, &self.host.changes, counts);
        Ok(Retried {
            entity_type: key.entity_type.clone(),
            entity_id: key.entity_id.clone(),
            held_events,
            position: update.position,
            head: update.head,
            quarantined: update.quarantined,
            plugin: plugin_ref(&plugin),
            error: q.map(|q| q.error),
            state: update.state,
        })
    }

    /// A quarantined case as a fixture: the entity's stored events and the
    /// state it is held at, ready for `refold test`.
    pub async fn fixture(&self, key: &EntityKey) -> Result<Fixture, InstallError> {
        let (rec, _) = self.load_active(key, false).await?;
        let q = self.host.storage.quarantine(key).await?;
        let events = self.host.storage.history(key, 0, None).await?;
        // Rebuilt from the attributes and the data's text as received, so a
        // binary-mode event becomes a structured one that `refold test` reads.
        let events: Vec<RawJson> = events
            .iter()
            .map(|e| RawJson::parse(&e.to_structured()).unwrap_or_else(|_| RawJson::null()))
            .collect();
        Ok(Fixture {
            entity_type: key.entity_type.clone(),
            entity_id: key.entity_id.clone(),
            quarantine: q,
            state_before: rec.state.clone(),
            position: rec.position,
            events,
            expected: vec![ExpectedState {
                entity_type: key.entity_type.clone(),
                entity_id: key.entity_id.clone(),
                state: rec.state,
            }],
        })
    }

    /// Re-submit a dead letter: its original record, or a corrected one.
    pub async fn resubmit(
        &self,
        id: &str,
        corrected: Option<Vec<u8>>,
    ) -> Result<Resubmitted, InstallError> {
        let dl = self
            .host
            .storage
            .dead_letter(id)
            .await?
            .ok_or_else(|| InstallError::NotFound(format!("no dead letter {id}")))?;
        let payload = corrected.unwrap_or_else(|| dl.payload.clone().into_bytes());
        static SEQ: AtomicU64 = AtomicU64::new(0);
        // Microseconds, times 16 slots: two re-submissions get distinct
        // origins (and so distinct dead-letter ids, should they fail again).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let offset =
            (now.as_micros() as i64) * 16 + (SEQ.fetch_add(1, Ordering::Relaxed) % 16) as i64;
        let record = SourceRecord::at("resubmit", 0, offset, payload);
        let _gate = self.gate.write().await;
        let mut pipeline = Pipeline::for_host(&self.host);
        let report = pipeline.process(std::slice::from_ref(&record)).await?;
        if report.dead_lettered == 0 {
            self.host.storage.remove_dead_letter(id).await?;
        }
        Ok(Resubmitted {
            dead_letter: id.to_string(),
            accepted: report.dead_lettered == 0,
            stored: report.stored,
            duplicates: report.duplicates,
            applied: report.applied,
            quarantined: report.quarantined,
        })
    }
}

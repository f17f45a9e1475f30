//! Activate: which version of an entity type applies, and in which
//! generation. A forward activation and a rollback land between two batches;
//! each is one write of the type's activation row, which carries the version,
//! its generation and the digests a rollback moved away from.

use std::sync::Arc;

use refold_runtime::Plugin;
use refold_store::{Activation, ActivationMode, StoreError};
use refold_types::Generation;
use refold_types::clock::now_rfc3339;

use super::PluginManager;
use super::corrections::Side;
use super::types::InstallError;
use crate::generation;

/// Rolled-back digests remembered per entity type.
const ROLLED_BACK_KEPT: usize = 32;

impl PluginManager {
    /// The stored activation of `entity_type`: a point read.
    pub(super) async fn current_activation(
        &self,
        entity_type: &str,
    ) -> Result<Option<Activation>, StoreError> {
        self.host.plugin_store.activation(entity_type).await
    }

    /// Make `plugin` the active version of its entity type from the next
    /// batch on, in the generation already active: the new version continues
    /// from the states the previous one computed. Nothing is written when it
    /// is active already.
    pub(super) async fn activate_forward(&self, plugin: Arc<Plugin>) -> Result<(), InstallError> {
        let entity_type = plugin.info.entity_type.clone();
        let digest = plugin.digest.clone();
        let _gate = self.gate.write().await;
        let cur = self.current_activation(&entity_type).await?;
        if cur.as_ref().is_some_and(|c| c.digest == digest)
            && self
                .host
                .registry
                .get(&entity_type)
                .is_some_and(|p| p.digest == digest)
        {
            return Ok(());
        }
        let generation = cur
            .as_ref()
            .map(|c| c.generation.clone())
            .unwrap_or_else(|| self.host.registry.generation(&entity_type));
        self.record_activation(
            &entity_type,
            &digest,
            cur,
            ActivationMode::Forward,
            &generation,
        )
        .await?;
        self.host.registry.activate_in(plugin, &generation);
        self.host
            .metrics
            .swapped(&entity_type, ActivationMode::Forward.as_str());
        Ok(())
    }

    /// Record `digest` as the active version of `entity_type`, successor of
    /// `cur`: the one row whose write is the whole change of version. A
    /// concurrent activation makes it a [`InstallError::Conflict`]. Returns
    /// the row written.
    pub(super) async fn record_activation(
        &self,
        entity_type: &str,
        digest: &str,
        cur: Option<Activation>,
        mode: ActivationMode,
        generation: &Generation,
    ) -> Result<Activation, InstallError> {
        // A digest chosen again is no longer "rolled back"; the one a rollback
        // leaves is, until an activation chooses it again.
        let mut rolled_back = cur
            .as_ref()
            .map(|c| c.rolled_back.clone())
            .unwrap_or_default();
        rolled_back.retain(|d| d != digest);
        if mode == ActivationMode::Rollback
            && let Some(c) = cur.as_ref().filter(|c| c.digest != digest)
        {
            rolled_back.retain(|d| d != &c.digest);
            rolled_back.push(c.digest.clone());
        }
        // The row stays small: the oldest marks go first.
        let excess = rolled_back.len().saturating_sub(ROLLED_BACK_KEPT);
        rolled_back.drain(..excess);
        let a = Activation {
            entity_type: entity_type.to_string(),
            digest: digest.to_string(),
            previous: cur
                .as_ref()
                .map(|c| c.digest.clone())
                .filter(|d| d != digest),
            mode,
            generation: generation.clone(),
            previous_generation: cur.as_ref().map(|c| c.generation.clone()),
            seq: cur.map(|c| c.seq + 1).unwrap_or(1),
            activated_at: now_rfc3339(),
            rolled_back,
        };
        self.host
            .plugin_store
            .put_activation(&a)
            .await
            .map_err(|e| match e {
                StoreError::Fenced(why) => {
                    InstallError::Conflict(format!("{why}; nothing changed, try again"))
                }
                e => InstallError::Store(e),
            })?;
        Ok(a)
    }

    /// Return to the previously active version, and to its generation: after a
    /// rebuild that is one row write, like the cut-over. States move back lazily
    /// (each record saved when the rebuild's generation took it over is taken
    /// back, caught up from the raw events), so nothing is refolded from the
    /// start. The read-model documents the rebuild replaced are put back.
    pub async fn rollback(&self, entity_type: &str) -> Result<Activation, InstallError> {
        let cur = self.current_activation(entity_type).await?.ok_or_else(|| {
            InstallError::NotFound(format!("no active version for {entity_type}"))
        })?;
        let prev = cur.previous.clone().ok_or_else(|| {
            InstallError::NotFound(format!("nothing to roll back to for {entity_type}"))
        })?;
        // Rows written before generations were recorded: a forward swap.
        let prev_generation = cur
            .previous_generation
            .clone()
            .unwrap_or_else(|| cur.generation.clone());
        let plugin = self.compiled(&prev).await?;
        let _gate = self.gate.write().await;
        let left = Side {
            generation: cur.generation.clone(),
            plugin: self.host.registry.get(entity_type),
        };
        if prev_generation != cur.generation {
            self.host
                .storage
                .adopt_projections(
                    &generation::namespace(entity_type, &prev_generation),
                    &generation::namespace(entity_type, &cur.generation),
                )
                .await?;
        }
        let a = self
            .record_activation(
                entity_type,
                &prev,
                Some(cur),
                ActivationMode::Rollback,
                &prev_generation,
            )
            .await?;
        self.host
            .registry
            .activate_in(plugin.clone(), &prev_generation);
        self.host
            .metrics
            .swapped(entity_type, ActivationMode::Rollback.as_str());
        // A rollback within one generation (of a forward swap) moves no
        // state: there is nothing to correct.
        if prev_generation != left.generation {
            let reached = Side {
                generation: prev_generation,
                plugin: Some(plugin),
            };
            self.record_corrections(entity_type, &left, &reached, a.seq.max(0) as u64)
                .await
                .map_err(|e| {
                    InstallError::Internal(e.context(format!(
                        "{entity_type} is rolled back, but the records of what it corrected \
                         could not be written"
                    )))
                })?;
        }
        Ok(a)
    }
}

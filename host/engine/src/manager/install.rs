//! Install: compile and validate a component (its world, `describe()`, the
//! entity type it names, a sample fold over stored events), store it, and
//! keep it compiled by digest.

use std::sync::Arc;

use refold_runtime::fold;
use refold_runtime::{LoadError, Plugin, Sandbox};
use refold_store::PluginVersion;
use refold_types::clock::now_rfc3339;

use super::PluginManager;
use super::types::{InstallError, SampleReport};
use crate::pipeline::entities_of;

/// The stored identity of a compiled plugin, uploaded now.
pub(super) fn version_of(p: &Plugin) -> PluginVersion {
    PluginVersion {
        entity_type: p.info.entity_type.clone(),
        name: p.info.name.clone(),
        version: p.info.version.clone(),
        digest: p.digest.clone(),
        size: p.size as u64,
        uploaded_at: now_rfc3339(),
    }
}

impl PluginManager {
    /// Compile and validate bytes; `expected` is the entity type the caller
    /// meant (the upload URL or the watched file name).
    pub async fn validate(
        &self,
        bytes: Vec<u8>,
        expected: Option<&str>,
    ) -> Result<(Arc<Plugin>, SampleReport), InstallError> {
        self.validate_as(bytes, |got| match expected {
            Some(expected) if expected != got => Err(InstallError::WrongEntityType {
                expected: expected.to_string(),
                got: got.to_string(),
            }),
            _ => Ok(()),
        })
        .await
    }

    /// Compile, let `admit` judge the entity type `describe()` names (before
    /// the sample fold, which is the expensive part), then fold the sample.
    pub(super) async fn validate_as(
        &self,
        bytes: Vec<u8>,
        admit: impl FnOnce(&str) -> Result<(), InstallError>,
    ) -> Result<(Arc<Plugin>, SampleReport), InstallError> {
        let manager = self.clone();
        let plugin = tokio::task::spawn_blocking(move || manager.host.load_plugin_bytes(&bytes))
            .await
            .map_err(|e| anyhow::anyhow!("compile task: {e}"))?
            .map_err(|e| match e.downcast::<LoadError>() {
                Ok(l) => InstallError::Invalid(l),
                Err(e) => InstallError::Internal(e),
            })?;
        admit(&plugin.info.entity_type)?;
        let sample = self.sample_fold(&plugin).await?;
        Ok((plugin, sample))
    }

    /// Fold up to 16 entities' first 256 events with the candidate. A trap or
    /// an output over the limits refuses it; so does a plugin error on an event
    /// the active version applied.
    async fn sample_fold(&self, plugin: &Arc<Plugin>) -> Result<SampleReport, InstallError> {
        let sample = entities_of(&*self.host.storage, &plugin.info.entity_type, 16).await?;
        let mut cases = Vec::new();
        for k in sample.keys {
            let applied = sample.records.get(&k).map(|r| r.position).unwrap_or(0);
            let events = self.host.storage.history(&k, 0, Some(256)).await?;
            cases.push((k, applied, events));
        }
        let p = plugin.clone();
        tokio::task::spawn_blocking(move || {
            let mut report = SampleReport::default();
            let mut sandbox = Sandbox::new(p);
            for (k, applied, events) in cases {
                let init = fold::init_state(&mut sandbox, &k.entity_id).map_err(|e| {
                    InstallError::SampleFold(format!("init({}) failed: {e}", k.entity_id))
                })?;
                let o = fold::fold_events(&mut sandbox, &k.entity_id, init, &events, true, None);
                report.entities += 1;
                report.events += o.applied;
                if let Some((i, e)) = o.failure {
                    let is_plugin_error = matches!(e, refold_runtime::CallError::Plugin(_));
                    if !is_plugin_error || events[i].position <= applied {
                        return Err(InstallError::SampleFold(format!(
                            "{k} event {} (position {}): {e}",
                            events[i].id, events[i].position
                        )));
                    }
                }
                sandbox.recycle();
            }
            Ok(report)
        })
        .await
        .map_err(|e| anyhow::anyhow!("sample fold task: {e}"))?
    }

    /// Store a validated version and keep it compiled. Idempotent by
    /// digest: the same bytes again are the same version.
    pub(super) async fn keep(
        &self,
        raw: &[u8],
        plugin: Arc<Plugin>,
    ) -> Result<PluginVersion, InstallError> {
        let version = version_of(&plugin);
        self.host.plugin_store.put_plugin(&version, raw).await?;
        self.remember(plugin);
        Ok(version)
    }

    /// Keep `plugin` compiled, by its digest.
    pub(super) fn remember(&self, plugin: Arc<Plugin>) {
        self.compiled_cache().insert(plugin.digest.clone(), plugin);
    }

    /// A compiled plugin by digest, from the cache or the plugin store.
    pub async fn compiled(&self, digest: &str) -> Result<Arc<Plugin>, InstallError> {
        if let Some(p) = self.compiled_cache().get(digest) {
            return Ok(p.clone());
        }
        let bytes = self
            .host
            .plugin_store
            .plugin_bytes(digest)
            .await?
            .ok_or_else(|| {
                InstallError::NotFound(format!("no plugin version with digest {digest}"))
            })?;
        let manager = self.clone();
        let p = tokio::task::spawn_blocking(move || manager.host.load_plugin_bytes(&bytes))
            .await
            .map_err(|e| anyhow::anyhow!("compile task: {e}"))??;
        self.compiled_cache().insert(digest.to_string(), p.clone());
        Ok(p)
    }
}

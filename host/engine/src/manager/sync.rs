//! Sync: the local registry kept in line with the stored activations (so
//! that an activation made on one host reaches every host), the configured
//! plugin files stored and activated at start, and a watched directory's
//! files installed, unless the store already decided about their bytes.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use anyhow::Context as _;

use refold_store::ActivationMode;
use refold_types::Generation;
use refold_types::clock::unix_ms;

use super::PluginManager;
use super::install::version_of;
use super::types::InstallError;

/// How often `sync_registry` looks for orphaned rebuilds.
const ORPHAN_SWEEP_MS: i64 = 30_000;

/// The registry poll interval.
pub const REGISTRY_POLL: Duration = Duration::from_millis(1000);

/// Whether a watched file named `file` may hold a plugin of `entity_type`.
/// `@` cannot appear in an entity type (`describe()` is held to
/// `[A-Za-z0-9._-]`), so it separates the type from anything else:
/// * `<type>.wasm` and `<type>@<anything>.wasm` name exactly `<type>`;
/// * without an `@`, the older `<type>-<suffix>.wasm` naming is kept: the
///   type is the whole stem or a part of it ending before a `-`. As types
///   may contain `-` themselves, which part is told by what the component
///   describes (`bank-account-v2.wasm` admits `bank-account-v2`,
///   `bank-account` and `bank`).
pub fn file_admits(file: &str, entity_type: &str) -> bool {
    let Some(stem) = file.strip_suffix(".wasm") else {
        return false;
    };
    if entity_type.is_empty() {
        return false;
    }
    match stem.split_once('@') {
        Some((named, _)) => named == entity_type,
        None => {
            stem == entity_type
                || stem
                    .strip_prefix(entity_type)
                    .is_some_and(|rest| rest.starts_with('-'))
        }
    }
}

/// Read a component file, refusing one over `max` bytes without reading
/// more than that (it may still be growing while it is copied in).
pub(super) async fn read_capped(path: &std::path::Path, max: u64) -> anyhow::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let too_big = |n: u64| {
        anyhow::anyhow!(
            "{} is {n} bytes or more, over plugins.max_upload_bytes ({max} bytes)",
            path.display()
        )
    };
    let f = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    if len > max {
        return Err(too_big(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .await
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > max {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

impl PluginManager {
    /// Bring the local registry in line with the stored activations (newer
    /// `seq` wins). Run at start and then every `poll`, so an activation made
    /// on one host reaches every host within `poll` plus compile time.
    pub async fn sync_registry(&self) -> anyhow::Result<()> {
        // Every ORPHAN_SWEEP_MS, look for rebuilds whose host died after this
        // one started (at start, `register_configured` looks once).
        static LAST_SWEEP: AtomicI64 = AtomicI64::new(0);
        let now = unix_ms();
        let last = LAST_SWEEP.load(Ordering::Relaxed);
        if now - last >= ORPHAN_SWEEP_MS
            && LAST_SWEEP
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            && let Err(e) = self.recover_rebuilds().await
        {
            tracing::warn!(error = %format!("{e:#}"), "could not clean up orphaned rebuilds");
        }
        for a in self.host.plugin_store.activations().await? {
            let local = self.host.registry.get(&a.entity_type);
            if local.as_ref().is_some_and(|p| p.digest == a.digest)
                && self.host.registry.generation(&a.entity_type) == a.generation
            {
                continue;
            }
            match self.compiled(&a.digest).await {
                Ok(p) => {
                    let _gate = self.gate.write().await;
                    // The list was read before the gate: an activation made
                    // here meanwhile (under the gate) is newer than `a`, and
                    // applying `a` would undo it until the next poll.
                    let now = self.current_activation(&a.entity_type).await?;
                    if now
                        .as_ref()
                        .is_none_or(|n| n.seq != a.seq || n.digest != a.digest)
                    {
                        continue;
                    }
                    self.host.registry.activate_in(p, &a.generation);
                    tracing::info!(entity_type = %a.entity_type, digest = %a.digest, "activation picked up from the registry");
                }
                Err(e) => {
                    tracing::error!(entity_type = %a.entity_type, error = %e, "cannot load the activated version")
                }
            }
        }
        Ok(())
    }

    /// At start: store the configured plugin files and activate each one whose
    /// entity type has no activation yet (a rollback made through the API
    /// survives restarts).
    pub async fn register_configured(&self) -> anyhow::Result<()> {
        let actives = self.host.plugin_store.activations().await?;
        let loaded = self.host.registry.snapshot();
        for f in &self.host.config.plugins.files {
            let bytes = tokio::fs::read(f).await?;
            let digest = refold_runtime::digest_of(&bytes);
            let Some(p) = loaded.values().find(|p| p.digest == digest) else {
                continue;
            };
            self.host
                .plugin_store
                .put_plugin(&version_of(p), &bytes)
                .await?;
            self.remember(p.clone());
            if !actives.iter().any(|a| a.entity_type == p.info.entity_type) {
                match self
                    .record_activation(
                        &p.info.entity_type,
                        &p.digest,
                        None,
                        ActivationMode::Forward,
                        &Generation::base(),
                    )
                    .await
                {
                    // Another host registered its configured version first; the
                    // registry sync below adopts that one.
                    Ok(_) | Err(InstallError::Conflict(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        // Housekeeping: a failure here must not keep the host from starting.
        match self.recover_rebuilds().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rebuilds = n, "orphaned rebuilds cleaned up"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not clean up orphaned rebuilds")
            }
        }
        self.sync_registry().await
    }

    /// Watched directory: load `path` and activate it forward, unless the
    /// store already decided about these bytes (see below). `at_start`: the
    /// file was found by the first scan, not dropped in while running. The
    /// message says what was done; an error says why the file was refused (the
    /// active version keeps running either way).
    ///
    /// The file name says which entity type the file is for (see
    /// [`file_admits`]); its size is capped by `plugins.max_upload_bytes`, as an
    /// upload is.
    ///
    /// A file outlives the decisions taken after it was dropped in, so bytes
    /// the store knows are not activated blindly:
    /// * a digest a rollback moved away from (`Activation::rolled_back`) is
    ///   never activated from the directory, at start or later: the rollback
    ///   would be undone by the file that is still there. The API can
    ///   activate it again.
    /// * at start, a digest already stored for an entity type that has an
    ///   activation is left alone: the stored activation is the later decision
    ///   (an API activation or rollback made after the file was dropped in),
    ///   and several files of one type would otherwise each be re-activated in
    ///   name order. A new file (new digest) is activated as before.
    pub async fn install_file(
        &self,
        path: &std::path::Path,
        at_start: bool,
    ) -> anyhow::Result<String> {
        let file = path
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let bytes = read_capped(path, self.host.config.plugins.max_upload_bytes as u64).await?;
        let digest = refold_runtime::digest_of(&bytes);
        let actives = self.host.plugin_store.activations().await?;
        if let Some(a) = actives.iter().find(|a| a.digest == digest) {
            return Ok(format!(
                "left alone: {} is already the active version of {}",
                &digest[..12],
                a.entity_type
            ));
        }
        if let Some(a) = actives.iter().find(|a| a.rolled_back.contains(&digest)) {
            return Ok(format!(
                "left alone: version {} of {} was rolled back from; activate it through the admin API to use it again",
                &digest[..12],
                a.entity_type
            ));
        }
        if at_start {
            for a in &actives {
                let stored = self
                    .host
                    .plugin_store
                    .plugin_versions(&a.entity_type)
                    .await?;
                if stored.iter().any(|v| v.digest == digest) {
                    return Ok(format!(
                        "left alone: version {} of {} is already stored, and the stored activation ({}) stands",
                        &digest[..12],
                        a.entity_type,
                        &a.digest[..a.digest.len().min(12)]
                    ));
                }
            }
        }
        let raw = bytes.clone();
        let (plugin, _sample) = self.validate_as(bytes, |got| {
            if file_admits(&file, got) {
                return Ok(());
            }
            Err(InstallError::Internal(anyhow::anyhow!(
                "the component describes entity type `{got}`, which the file name `{file}` does not name \
                 (name it `{got}.wasm` or `{got}@<anything>.wasm`)"
            )))
        })
        .await?;
        let version = self.keep(&raw, plugin.clone()).await?;
        self.activate_forward(plugin).await?;
        Ok(format!(
            "activated {}@{} ({}) for entity type {}",
            version.name,
            version.version,
            &version.digest[..12],
            version.entity_type
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watched_file_name_admits_every_entity_type_describe_allows() {
        // `<type>.wasm` and `<type>@<anything>.wasm`: exactly that type.
        assert!(file_admits("account.wasm", "account"));
        assert!(file_admits("bank-account.wasm", "bank-account"));
        assert!(file_admits("bank-account@v2.wasm", "bank-account"));
        assert!(file_admits("a.b_c-d@x-y@z.wasm", "a.b_c-d"));
        assert!(!file_admits("bank-account@v2.wasm", "bank"));
        assert!(!file_admits("account@v2.wasm", "account-v2"));
        // The older `<type>-<suffix>.wasm`: the stem or a part of it that
        // ends before a `-`.
        assert!(file_admits("account-v2.wasm", "account"));
        assert!(file_admits("bank-account-v2.wasm", "bank-account"));
        assert!(file_admits("bank-account-v2.wasm", "bank"));
        assert!(!file_admits("accounts.wasm", "account"));
        assert!(!file_admits("account.wasm", "bank-account"));
        assert!(!file_admits("account.wasm.tmp", "account"));
        assert!(!file_admits("@x.wasm", ""));
    }
}

//! Plugin versions over time: install (validate → store), activate
//! (forward or rebuild), roll back, retry a quarantined entity, re-submit a
//! dead letter, and keep the local registry in line with the stored one.
//!
//! Everything that changes which version applies, or that writes states
//! outside the consume loop, takes the manager's batch gate: it lands between
//! two batches, never inside one.
//!
//! One module per use case, each adding methods to [`PluginManager`]:
//! * [`types`]: the errors and typed results of every operation;
//! * `install`: validate (compile, `describe()`, sample fold), store, and the
//!   compiled cache by digest;
//! * `activate`: forward activation, rollback, and the activation row every
//!   change of version writes;
//! * `corrections`: the `refold.state.corrected` records of a cut-over or a
//!   rollback, for the entities whose answer it changed;
//! * `rebuild`: a new generation refolded in the background, its lease on its
//!   stored record, the cleanup of orphaned ones, status;
//! * `repair`: retry a quarantined entity, export it as a fixture, re-submit
//!   a dead letter;
//! * `sync`: the registry kept in line with the store, the configured files
//!   at start, a watched directory's files;
//! * [`watch`]: the watched directory itself.
//!
//! Direction (a module calls only those after it): `watch` → `sync` →
//! `rebuild` → `activate` → `corrections`, `install` → `types`; `repair` →
//! `types`. This
//! file holds the type and the two entry points that combine use cases
//! ([`PluginManager::install`]: install then activate;
//! [`PluginManager::activate`]: forward or by rebuild); no submodule calls
//! them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use refold_runtime::Plugin;

use crate::host::Host;

mod activate;
mod corrections;
mod install;
mod rebuild;
mod repair;
mod sync;
#[cfg(test)]
mod tests;
pub mod types;
pub mod watch;

pub use sync::{REGISTRY_POLL, file_admits};
pub use types::{
    ExpectedState, Fixture, InstallError, Installed, RebuildStatus, Resubmitted, Retried,
    SampleReport, SwapMode,
};

/// Plugin versions over time, for one host: owns the compiled versions by
/// digest, the rebuilds by id, and the batch gate that the consume loop
/// holds for each batch and every change of state outside it takes.
#[derive(Clone)]
pub struct PluginManager {
    /// The host whose plugins these are.
    pub host: Host,
    /// Compiled plugin versions by digest.
    compiled: Arc<Mutex<HashMap<String, Arc<Plugin>>>>,
    /// Rebuilds by id.
    rebuilds: Arc<Mutex<HashMap<String, RebuildStatus>>>,
    /// Held shared by each batch of the consume loop from its first read to
    /// its durable commit (two overlap: one folding, one being written), and
    /// exclusively by anything that must land between batches (swaps,
    /// retries, re-submissions). Write-preferring: a change waiting keeps
    /// new batches out until the ones in flight are durable.
    gate: Arc<tokio::sync::RwLock<()>>,
}

impl PluginManager {
    /// The manager of `host`'s plugins, with nothing compiled yet.
    pub fn new(host: Host) -> Self {
        PluginManager {
            host,
            compiled: Arc::new(Mutex::new(HashMap::new())),
            rebuilds: Arc::new(Mutex::new(HashMap::new())),
            gate: Arc::new(tokio::sync::RwLock::new(())),
        }
    }

    /// The batch gate (see the type's doc).
    pub fn gate(&self) -> &Arc<tokio::sync::RwLock<()>> {
        &self.gate
    }

    /// Validate, store, and activate when `mode` says so.
    pub async fn install(
        &self,
        bytes: Vec<u8>,
        expected: Option<&str>,
        mode: Option<SwapMode>,
    ) -> Result<Installed, InstallError> {
        let raw = bytes.clone();
        let (plugin, sample) = self.validate(bytes, expected).await?;
        let version = self.keep(&raw, plugin).await?;
        let rebuild = match mode {
            None => None,
            Some(m) => {
                self.activate(&version.entity_type, &version.digest, m)
                    .await?
            }
        };
        Ok(Installed {
            version,
            sample,
            activation: mode.map(SwapMode::activation_mode),
            rebuild,
        })
    }

    /// Make `digest` the active version of `entity_type`. Forward: at the next
    /// batch boundary. Rebuild: starts a background rebuild and returns its id.
    pub async fn activate(
        &self,
        entity_type: &str,
        digest: &str,
        mode: SwapMode,
    ) -> Result<Option<String>, InstallError> {
        let plugin = self.compiled(digest).await?;
        if plugin.info.entity_type != entity_type {
            return Err(InstallError::WrongEntityType {
                expected: entity_type.to_string(),
                got: plugin.info.entity_type.clone(),
            });
        }
        match mode {
            SwapMode::Forward => self.activate_forward(plugin).await.map(|()| None),
            SwapMode::Rebuild => self.start_rebuild(plugin).await.map(Some),
        }
    }

    /// The compiled cache, locked (a poisoned lock still holds a usable map:
    /// entries are inserted whole).
    fn compiled_cache(&self) -> MutexGuard<'_, HashMap<String, Arc<Plugin>>> {
        self.compiled.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The rebuilds this process runs, locked (as above: every update
    /// leaves a whole status).
    fn rebuild_table(&self) -> MutexGuard<'_, HashMap<String, RebuildStatus>> {
        self.rebuilds.lock().unwrap_or_else(|e| e.into_inner())
    }
}

//! The shared core of a running host: configuration, storage, the active
//! plugins, the wasmtime engine, metrics and liveness. Everything the
//! pipeline, the plugin manager and the queries read; none of them owns it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use refold_runtime::{Engine, Plugin};
use refold_store::{PluginStore, Storage};
use refold_store_cassandra::CassandraStore;
use refold_store_sqlite::SqliteStore;

use crate::config::{HostConfig, StoreKind};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// The core of the host. Cloning is cheap (`Arc`s inside).
#[derive(Clone)]
pub struct Host {
    /// Configuration in force.
    pub config: Arc<HostConfig>,
    /// Where events and states live.
    pub storage: Arc<dyn Storage>,
    /// The plugin registry's persistence.
    pub plugin_store: Arc<dyn PluginStore>,
    /// Active plugins.
    pub registry: Arc<Registry>,
    /// The wasmtime engine.
    pub engine: Engine,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Liveness.
    pub health: Arc<Health>,
    /// Woken after every commit that added change records (the change
    /// feed's long polls wait on it).
    pub changes: Arc<tokio::sync::Notify>,
}

impl Host {
    /// Open the configured storage and load the configured plugin files.
    pub async fn open(config: HostConfig) -> anyhow::Result<Host> {
        let (storage, plugin_store): (Arc<dyn Storage>, Arc<dyn PluginStore>) =
            match config.store.kind {
                StoreKind::Sqlite => {
                    let s = Arc::new(SqliteStore::open_capped(
                        &config.store.path,
                        config.store.max_bytes,
                    )?);
                    (s.clone(), s)
                }
                StoreKind::Cassandra => {
                    let s = Arc::new(CassandraStore::open(&config.cassandra).await?);
                    (s.clone(), s)
                }
            };
        Self::with_storage(config, storage, plugin_store)
    }

    /// Build on an already opened storage, loading the configured plugin
    /// files (activated in the base generation).
    pub fn with_storage(
        config: HostConfig,
        storage: Arc<dyn Storage>,
        plugin_store: Arc<dyn PluginStore>,
    ) -> anyhow::Result<Host> {
        let host = Host {
            health: Arc::new(Health::new(Duration::from_secs(
                config.engine.stall_seconds,
            ))),
            config: Arc::new(config),
            storage,
            plugin_store,
            registry: Arc::new(Registry::new()),
            engine: Engine::new()?,
            metrics: Arc::new(Metrics::new()),
            changes: Arc::new(tokio::sync::Notify::new()),
        };
        for f in host.config.plugins.files.clone() {
            let p = host.load_plugin_file(&f)?;
            host.registry.activate(p);
        }
        Ok(host)
    }

    /// Compile and validate a component file (not activated).
    pub fn load_plugin_file(&self, path: &Path) -> anyhow::Result<Arc<Plugin>> {
        let bytes =
            std::fs::read(path).with_context(|| format!("reading plugin {}", path.display()))?;
        self.load_plugin_bytes(&bytes)
            .with_context(|| format!("loading plugin {}", path.display()))
    }

    /// Compile and validate component bytes (not activated). Limits come
    /// from the config for the entity type the component describes
    /// (`describe()` itself runs under the default limits).
    pub fn load_plugin_bytes(&self, bytes: &[u8]) -> anyhow::Result<Arc<Plugin>> {
        let plugin = Plugin::load(&self.engine, bytes, self.config.plugins.limits)?;
        let limits = self.config.plugins.limits_for(&plugin.info.entity_type);
        if limits == plugin.limits {
            return Ok(plugin);
        }
        Ok(plugin.with_limits(limits))
    }

    /// Warn through `/healthz` while the embedded database's disk is nearly
    /// full, before writes start to fail (ingest goes on until they do).
    pub fn check_disk(&self) {
        let min = self.config.engine.min_free_disk_bytes;
        if min == 0 || self.config.store.kind != StoreKind::Sqlite {
            return;
        }
        let dir = match self.config.store.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        match rustix::fs::statvfs(&dir) {
            Ok(v) => {
                let free = v.f_bavail.saturating_mul(v.f_frsize);
                if free < min {
                    self.health.fault(
                        "disk",
                        format!(
                            "disk nearly full: {free} bytes free under {} (engine.min_free_disk_bytes = {min})",
                            dir.display()
                        ),
                    );
                } else {
                    self.health.clear("disk");
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read free disk space"),
        }
    }
}

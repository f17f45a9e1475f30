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
    /// Each partition's lag and committed offset over the last minutes.
    pub trend: Arc<crate::trend::Trend>,
    /// Woken after every commit that added change records (the change
    /// feed's long polls wait on it).
    pub changes: Arc<tokio::sync::Notify>,
    /// The feed cursor each running sink has delivered up to.
    pub sinks: Arc<SinkCursors>,
}

/// Where each sink of the change feed stands, for back-pressure.
#[derive(Debug, Default)]
pub struct SinkCursors(std::sync::Mutex<std::collections::BTreeMap<String, u64>>);

impl SinkCursors {
    /// Sink `name` has delivered every record up to `cursor`.
    pub fn set(&self, name: &str, cursor: u64) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), cursor);
    }

    /// The sink furthest behind and its cursor, if any sink runs.
    pub fn slowest(&self) -> Option<(String, u64)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .min_by_key(|(_, c)| **c)
            .map(|(n, c)| (n.clone(), *c))
    }
}

impl Host {
    /// Why ingest must wait for a sink (`changes.backpressure_records`),
    /// if it must: the slowest sink is that many records behind the feed.
    pub async fn held_back_by_sink(&self) -> Option<String> {
        let limit = self.config.changes.backpressure_records;
        if limit == 0 {
            return None;
        }
        let (name, cursor) = self.sinks.slowest()?;
        let head = self.storage.changes_head().await.ok()?;
        let behind = head.saturating_sub(cursor);
        (behind > limit).then(|| {
            format!(
                "sink {name} is {behind} change records behind (changes.backpressure_records = {limit}); ingest waits for it"
            )
        })
    }

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
        let engine = config.plugins.engine()?;
        let host = Host {
            health: Arc::new(Health::new(Duration::from_secs(
                config.engine.stall_seconds,
            ))),
            // Ten minutes in five-second steps.
            trend: Arc::new(crate::trend::Trend::new(Duration::from_secs(5), 120)),
            config: Arc::new(config),
            storage,
            plugin_store,
            registry: Arc::new(Registry::new()),
            engine,
            metrics: Arc::new(Metrics::new()),
            changes: Arc::new(tokio::sync::Notify::new()),
            sinks: Arc::new(SinkCursors::default()),
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
        Ok(self.config.plugins.load_plugin(&self.engine, bytes)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use refold_store::{ChangeKind, ChangeRecord, Commit, EntityKey, Generation};

    fn host(backpressure_records: u64) -> Host {
        let mut config = HostConfig::default();
        config.changes.backpressure_records = backpressure_records;
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        Host::with_storage(config, store.clone(), store).unwrap()
    }

    async fn record(h: &Host, n: u64) {
        let changes = (1..=n)
            .map(|i| ChangeRecord {
                kind: ChangeKind::Changed,
                key: EntityKey::new("account", format!("a{i}")),
                first_position: 1,
                last_position: 1,
                generation: Generation::base(),
                activation: None,
                plugin: None,
                state: serde_json::json!({}),
                previous: None,
                event_ids: None,
                time: "2026-01-01T00:00:00Z".into(),
            })
            .collect();
        h.storage
            .commit(Commit {
                changes,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Ingest waits for the slowest sink only past the configured lag, and
    /// never without the setting or without a sink.
    #[tokio::test]
    async fn a_sink_holds_ingest_back_only_past_its_configured_lag() {
        let h = host(2);
        record(&h, 3).await;
        assert_eq!(h.held_back_by_sink().await, None, "no sink runs");
        h.sinks.set("fast", 3);
        h.sinks.set("slow", 0);
        let why = h.held_back_by_sink().await.expect("3 behind, limit 2");
        assert!(
            why.contains("sink slow is 3 change records behind"),
            "{why}"
        );
        h.sinks.set("slow", 1);
        assert_eq!(h.held_back_by_sink().await, None, "2 behind is within");

        let off = host(0);
        record(&off, 3).await;
        off.sinks.set("slow", 0);
        assert_eq!(off.held_back_by_sink().await, None, "off by default");
    }
}

//! The assembled engine: storage, registry, metrics, liveness, and the
//! consume loop that drives the pipeline from a source.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::watch;

use crate::config::{Config, StoreKind};
use crate::lifecycle::RebuildStatus;
use crate::metrics::Metrics;
use crate::pipeline::{BatchReport, Pipeline, PipelineConfig};
use crate::registry::Registry;
use crate::runtime::{Engine, Plugin};
use crate::source::EventSource;
use crate::store::sqlite::SqliteStore;
use crate::store::{PluginStore, Storage, StoreError};

/// Progress of one partition, for `/healthz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionHealth {
    /// Records or bytes behind.
    pub lag: i64,
    /// Seconds since the last committed batch (or since start).
    pub idle_seconds: f64,
    /// Lag and no progress for longer than the stall limit.
    pub stalled: bool,
}

/// Liveness facts gathered by the consume loop.
pub struct Health {
    started: Instant,
    stall_after: Duration,
    partitions: Mutex<HashMap<(String, i32), (i64, Instant)>>,
    loop_beat: Mutex<Instant>,
    /// Faults being waited out, by where they are (`source`, `store`,
    /// `disk`): each makes `/healthz` answer 503 with its reason until the
    /// loop gets past it.
    faults: Mutex<std::collections::BTreeMap<&'static str, (String, Instant)>>,
}

impl Health {
    fn new(stall_after: Duration) -> Self {
        Health {
            started: Instant::now(),
            stall_after,
            partitions: Mutex::new(HashMap::new()),
            loop_beat: Mutex::new(Instant::now()),
            faults: Mutex::new(Default::default()),
        }
    }

    /// A fault at `site` is being waited out.
    pub fn fault(&self, site: &'static str, reason: impl Into<String>) {
        let mut f = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let reason = reason.into();
        match f.get_mut(site) {
            Some(have) => have.0 = reason,
            None => {
                f.insert(site, (reason, Instant::now()));
            }
        }
    }

    /// The fault at `site` is over.
    pub fn clear(&self, site: &'static str) {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(site);
    }

    fn lag(&self, source: &str, partition: i32, lag: i64) {
        let mut p = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let e = p
            .entry((source.to_string(), partition))
            .or_insert((lag, Instant::now()));
        e.0 = lag;
    }

    fn progressed(&self, source: &str, partition: i32) {
        let mut p = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let e = p
            .entry((source.to_string(), partition))
            .or_insert((0, Instant::now()));
        e.1 = Instant::now();
    }

    fn beat(&self) {
        *self.loop_beat.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// `(healthy, per-partition details)`. A partition is stalled when it has
    /// lag and made no progress within the stall limit; the loop itself is
    /// stalled when it has not come around for that long.
    pub fn report(&self) -> (bool, serde_json::Value) {
        let p = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let mut parts = serde_json::Map::new();
        let mut healthy = true;
        for ((source, partition), (lag, at)) in p.iter() {
            let idle = at.elapsed();
            let stalled = *lag > 0 && idle > self.stall_after;
            healthy &= !stalled;
            parts.insert(
                format!("{source}#{partition}"),
                serde_json::to_value(PartitionHealth {
                    lag: *lag,
                    idle_seconds: idle.as_secs_f64(),
                    stalled,
                })
                .unwrap_or_default(),
            );
        }
        let beat = self
            .loop_beat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        let loop_alive = beat <= self.stall_after.max(Duration::from_secs(5)) * 2;
        healthy &= loop_alive;
        let faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        healthy &= faults.is_empty();
        let faults: serde_json::Map<String, serde_json::Value> = faults
            .iter()
            .map(|(site, (reason, since))| {
                (
                    site.to_string(),
                    serde_json::json!({"reason": reason, "seconds": since.elapsed().as_secs_f64()}),
                )
            })
            .collect();
        let reason = faults
            .values()
            .filter_map(|f| f["reason"].as_str())
            .collect::<Vec<_>>()
            .join("; ");
        (
            healthy,
            serde_json::json!({
                "status": if healthy { "ok" } else { "unhealthy" },
                "reason": if reason.is_empty() { serde_json::Value::Null } else { reason.into() },
                "faults": faults,
                "uptime_seconds": self.started.elapsed().as_secs_f64(),
                "loop_idle_seconds": beat.as_secs_f64(),
                "partitions": parts,
            }),
        )
    }
}

/// The engine and everything it shares with the API.
#[derive(Clone)]
pub struct App {
    /// Configuration in force.
    pub config: Arc<Config>,
    /// Where events and states live.
    pub storage: Arc<dyn Storage>,
    /// Active plugins.
    pub registry: Arc<Registry>,
    /// The wasmtime engine.
    pub engine: Engine,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Liveness.
    pub health: Arc<Health>,
    /// The plugin registry's persistence.
    pub plugin_store: Arc<dyn PluginStore>,
    /// Compiled plugin versions by digest.
    pub compiled: Arc<Mutex<HashMap<String, Arc<Plugin>>>>,
    /// Rebuilds by id.
    pub rebuilds: Arc<Mutex<HashMap<String, RebuildStatus>>>,
    /// Held by the consume loop for each batch, and by anything that must
    /// land between two batches (swaps, retries, re-submissions).
    pub gate: Arc<tokio::sync::Mutex<()>>,
}

impl App {
    /// Open the configured storage and load the configured plugin files.
    pub async fn open(config: Config) -> anyhow::Result<App> {
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
                    let s = crate::store::open_cassandra(&config.cassandra).await?;
                    (s.clone(), s)
                }
            };
        let app = Self::with_storage(config, storage, plugin_store)?;
        crate::lifecycle::register_configured(&app).await?;
        Ok(app)
    }

    /// Build on an already opened storage.
    pub fn with_storage(
        config: Config,
        storage: Arc<dyn Storage>,
        plugin_store: Arc<dyn PluginStore>,
    ) -> anyhow::Result<App> {
        let engine = Engine::new()?;
        let app = App {
            health: Arc::new(Health::new(Duration::from_secs(
                config.engine.stall_seconds,
            ))),
            config: Arc::new(config),
            storage,
            registry: Arc::new(Registry::new()),
            engine,
            metrics: Arc::new(Metrics::new()),
            plugin_store,
            compiled: Arc::new(Mutex::new(HashMap::new())),
            rebuilds: Arc::new(Mutex::new(HashMap::new())),
            gate: Arc::new(tokio::sync::Mutex::new(())),
        };
        for f in app.config.plugins.files.clone() {
            let p = app.load_plugin_file(&f)?;
            app.registry.activate(p);
        }
        Ok(app)
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

    /// A pipeline over this app's storage and registry.
    pub fn pipeline(&self) -> Pipeline {
        Pipeline::new(
            self.storage.clone(),
            self.registry.clone(),
            PipelineConfig {
                max_record_bytes: self.config.engine.max_record_bytes,
                fold_threads: self.config.engine.fold_threads,
                fold_budget: Duration::from_millis(self.config.engine.batch_fold_budget_ms),
                max_batch_projection_ops: self.config.engine.max_batch_projection_ops,
                max_batch_projection_bytes: self.config.engine.max_batch_projection_bytes,
            },
            self.metrics.clone(),
        )
    }

    /// Warn through `/healthz` while the embedded database's disk is nearly
    /// full, before writes start to fail (ingest goes on until they do).
    fn check_disk(&self) {
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

    /// Consume `source` until it is exhausted or `shutdown` turns true.
    /// Each batch is committed before the source is told to move on; a
    /// store outage is waited out with backoff, never skipped.
    pub async fn consume(
        &self,
        mut source: Box<dyn EventSource>,
        mut shutdown: watch::Receiver<bool>,
        mut on_batch: impl FnMut(&BatchReport) + Send,
    ) -> anyhow::Result<BatchReport> {
        let mut pipeline = self.pipeline();
        let mut total = BatchReport::default();
        let batch_size = self.config.source.batch_size.max(1);
        let mut source_backoff: Option<Duration> = None;
        let mut disk_checked: Option<Instant> = None;
        loop {
            self.health.beat();
            if disk_checked.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                self.check_disk();
                disk_checked = Some(Instant::now());
            }
            if *shutdown.borrow() {
                break;
            }
            let batch = tokio::select! {
                b = source.next_batch(batch_size) => b,
                _ = shutdown.changed() => continue,
            };
            let batch = match batch {
                Ok(b) => {
                    if source_backoff.is_some() {
                        tracing::info!("source readable again");
                        self.health.clear("source");
                        source_backoff = None;
                    }
                    b
                }
                Err(e) if crate::source::is_transient(&e) => {
                    // A fault of the machine, not of the data (too many open
                    // files, a permission being fixed, a file not there yet):
                    // wait it out; nothing was consumed, so nothing is skipped.
                    let wait = source_backoff.unwrap_or(Duration::from_millis(100));
                    tracing::warn!(error = %format!("{e:#}"), retry_in = ?wait, "source unavailable; retrying");
                    self.health.fault("source", format!("source: {e:#}"));
                    source_backoff = Some((wait * 2).min(Duration::from_secs(5)));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {},
                        _ = shutdown.changed() => {},
                    }
                    continue;
                }
                Err(e) => return Err(e.context("reading from the source")),
            };
            for l in source.lag() {
                self.metrics.set_lag(&l.source, l.partition, l.lag);
                self.health.lag(&l.source, l.partition, l.lag);
            }
            let Some(records) = batch else { break };
            if records.is_empty() && !pipeline.has_deferred() {
                continue;
            }
            let produced_at: Vec<i64> = records.iter().filter_map(|r| r.produced_at_ms).collect();
            let checkpoints = crate::source::checkpoints_of(&records);
            let mut per_source: HashMap<&str, u64> = HashMap::new();
            for r in &records {
                *per_source.entry(r.origin.source.as_str()).or_default() += 1;
            }
            for (s, n) in per_source {
                self.metrics.consumed(s, n);
            }
            let mut backoff = Duration::from_millis(100);
            let report = loop {
                let gate = self.gate.lock().await;
                let result = pipeline.process(&records).await;
                drop(gate);
                match result {
                    Ok(r) => {
                        self.health.clear("store");
                        // `process` returns after the store commit: from here on
                        // the batch's events and states are durable.
                        self.metrics.committed(r.applied as u64);
                        self.metrics
                            .observe_produce_to_commit(&produced_at, unix_ms());
                        break r;
                    }
                    Err(StoreError::Unavailable(e)) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "store unavailable; retrying the batch");
                        self.health.fault("store", format!("store: {e}"));
                        self.health.beat();
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        if *shutdown.borrow() {
                            return Ok(total);
                        }
                    }
                    Err(StoreError::Fenced(e)) => {
                        // Another writer moved an entity on (a rebalance race or a
                        // redelivery): re-run the batch; it reloads the entities and
                        // drops the events that are already stored.
                        tracing::warn!(error = %e, "batch fenced; re-running it");
                        self.health.beat();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(anyhow::Error::new(e).context("committing a batch")),
                }
            };
            // The batch is durable and its checkpoint is in the store; a
            // failed offset commit only means the batch may be read again,
            // and its events are then found already stored.
            if let Err(e) = source.commit(&checkpoints).await {
                tracing::warn!(error = %format!("{e:#}"), "committing source offsets failed; the batch may be re-read");
            }
            for c in &checkpoints {
                self.metrics.progressed(&c.source, c.partition);
                self.health.progressed(&c.source, c.partition);
            }
            for l in source.lag() {
                self.metrics.set_lag(&l.source, l.partition, l.lag);
                self.health.lag(&l.source, l.partition, l.lag);
            }
            on_batch(&report);
            merge(&mut total, &report);
        }
        Ok(total)
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn merge(total: &mut BatchReport, r: &BatchReport) {
    total.records += r.records;
    total.stored += r.stored;
    total.applied += r.applied;
    total.duplicates += r.duplicates;
    total.dead_lettered += r.dead_lettered;
    total.held += r.held;
    total.deferred += r.deferred;
    total.quarantined.extend(r.quarantined.iter().cloned());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{PartitionLag, SourceRecord};
    use crate::store::{Checkpoint, Origin};

    /// One batch of records, then the end.
    struct Stamped {
        batch: Option<Vec<SourceRecord>>,
    }

    #[async_trait::async_trait]
    impl EventSource for Stamped {
        async fn next_batch(&mut self, _max: usize) -> anyhow::Result<Option<Vec<SourceRecord>>> {
            Ok(self.batch.take())
        }
        async fn commit(&mut self, _c: &[Checkpoint]) -> anyhow::Result<()> {
            Ok(())
        }
        fn lag(&self) -> Vec<PartitionLag> {
            Vec::new()
        }
    }

    fn metric(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    #[tokio::test]
    async fn committed_events_and_produce_to_commit_are_counted_after_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.plugins.files =
            vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bank/bank.wasm")];
        let store = Arc::new(SqliteStore::open(&dir.path().join("r.db")).unwrap());
        let app = App::with_storage(config, store.clone(), store).unwrap();
        let stamp = unix_ms() - 20;
        let stamps = [Some(stamp), Some(stamp), None];
        let event = |i: usize| SourceRecord {
            origin: Origin {
                source: "t".into(),
                partition: 0,
                offset: i as i64,
            },
            next_offset: i as i64 + 1,
            key: Some("acc-1".into()),
            headers: Vec::new(),
            payload: serde_json::json!({"specversion": "1.0", "id": format!("e{i}"),
                "source": "/t", "type": "account.deposited", "subject": "acc-1",
                "entitytype": "account", "data": {"amount": 5}})
            .to_string()
            .into_bytes(),
            produced_at_ms: stamps[i],
        };
        let source = Stamped {
            batch: Some((0..3).map(event).collect()),
        };
        let (_tx, rx) = watch::channel(false);
        let total = app.consume(Box::new(source), rx, |_| {}).await.unwrap();
        assert_eq!(total.applied, 3);
        let text = app.metrics.render();
        assert_eq!(metric(&text, "refold_events_committed_total"), 3.0);
        // Two stamped records, at least 20 ms old; the unstamped one is skipped.
        assert_eq!(metric(&text, "refold_produce_to_commit_seconds_count"), 2.0);
        assert!(metric(&text, "refold_produce_to_commit_seconds_sum") >= 0.04);
    }
}

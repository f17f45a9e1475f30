//! The assembled host ([`App`]): its core, its plugin manager, and the
//! consume loop that drives the pipeline from a source.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use refold_source::{EventSource, SourceRecord, checkpoints_of};
use refold_store::{PluginStore, Storage, StoreError};
use refold_types::clock;
use tokio::sync::watch;

use crate::config::HostConfig;
use crate::host::Host;
use crate::manager::PluginManager;
use crate::pipeline::{BatchReport, Pipeline, Prepare};

/// The engine and everything it shares with the API.
#[derive(Clone)]
pub struct App {
    /// Configuration, storage, registry, engine, metrics, liveness.
    pub host: Host,
    /// Installs, activations, rollbacks, rebuilds, repairs.
    pub plugins: PluginManager,
}

impl App {
    /// Open the configured storage, load the configured plugin files and
    /// register them with the plugin registry.
    pub async fn open(config: HostConfig) -> anyhow::Result<App> {
        let app = App::new(Host::open(config).await?);
        app.plugins.register_configured().await?;
        Ok(app)
    }

    /// Build on an already opened storage.
    pub fn with_storage(
        config: HostConfig,
        storage: Arc<dyn Storage>,
        plugin_store: Arc<dyn PluginStore>,
    ) -> anyhow::Result<App> {
        Ok(App::new(Host::with_storage(config, storage, plugin_store)?))
    }

    /// The host with its plugin manager.
    pub fn new(host: Host) -> App {
        App {
            plugins: PluginManager::new(host.clone()),
            host,
        }
    }

    /// Consume `source` until it is exhausted or `shutdown` turns true.
    /// The next batch is read, deduplicated and folded while the one before
    /// it is written; a batch's source offsets are committed only once it
    /// and every batch before it are durable, in order. A store outage is
    /// waited out with backoff, never skipped.
    pub async fn consume(
        &self,
        mut source: Box<dyn EventSource>,
        mut shutdown: watch::Receiver<bool>,
        mut on_batch: impl FnMut(&BatchReport) + Send,
    ) -> anyhow::Result<BatchReport> {
        let host = &self.host;
        let mut run = Run {
            pipeline: Pipeline::for_host(host),
            total: BatchReport::default(),
            on_batch: &mut on_batch,
        };
        let mut pending: Option<Pending> = None;
        let mut reader = Reader::new(host.config.source.batch_size);
        let mut disk_checked: Option<Instant> = None;
        loop {
            host.health.beat();
            if disk_checked.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                host.check_disk();
                disk_checked = Some(Instant::now());
            }
            if *shutdown.borrow() {
                break;
            }
            let records = match reader.next(host, &mut *source, &mut shutdown).await? {
                Read::Records(r) => r,
                Read::Again => continue,
                Read::End => break,
            };
            if records.is_empty() && !run.pipeline.has_deferred() {
                // Idle: let the write in flight land and its offsets go.
                if self
                    .settle(&mut pending, &mut run, &mut *source, &shutdown)
                    .await?
                    == Settled::Shutdown
                {
                    return Ok(run.total);
                }
                continue;
            }
            count_consumed(host, &records);
            match self
                .overlap(records, &mut pending, &mut run, &mut *source, &shutdown)
                .await?
            {
                Settled::Shutdown => return Ok(run.total),
                Settled::Nothing | Settled::Durable | Settled::Redone => {}
            }
        }
        self.settle(&mut pending, &mut run, &mut *source, &shutdown)
            .await?;
        Ok(run.total)
    }

    /// Prepare `records` while the write in `pending` runs, settle that
    /// write, then hand this batch's to a task of its own (left in
    /// `pending`). When the write in flight failed, what was prepared on top
    /// of it is dropped and the batch is processed again on its own.
    async fn overlap(
        &self,
        records: Vec<SourceRecord>,
        pending: &mut Option<Pending>,
        run: &mut Run<'_>,
        source: &mut dyn EventSource,
        shutdown: &watch::Receiver<bool>,
    ) -> anyhow::Result<Settled> {
        let gate = self.plugins.gate().clone();
        let guard = match gate.clone().try_read_owned() {
            Ok(g) => g,
            Err(_) => {
                // A change waits for the gate: let the batch in flight land
                // first (it holds the gate too), then queue behind the change.
                if self.settle(pending, run, source, shutdown).await? == Settled::Shutdown {
                    return Ok(Settled::Shutdown);
                }
                gate.read_owned().await
            }
        };
        loop {
            let prepared = match run.pipeline.prepare(&records).await {
                Ok(Prepare::Ready(p)) => p,
                Ok(Prepare::Settle) => match self.settle(pending, run, source, shutdown).await? {
                    Settled::Shutdown => return Ok(Settled::Shutdown),
                    Settled::Durable | Settled::Redone => continue,
                    // It waits on no write known: processed on its own.
                    Settled::Nothing => {
                        drop(guard);
                        return self.redo(records, run, source, shutdown).await;
                    }
                },
                Err(_) => {
                    // A read failed: the one-batch-at-a-time path retries it
                    // with backoff, after the write in flight.
                    drop(guard);
                    if self.settle(pending, run, source, shutdown).await? == Settled::Shutdown {
                        return Ok(Settled::Shutdown);
                    }
                    return self.redo(records, run, source, shutdown).await;
                }
            };
            match self.settle(pending, run, source, shutdown).await? {
                Settled::Shutdown => return Ok(Settled::Shutdown),
                Settled::Redone => {
                    // Prepared on top of a write that failed: void.
                    run.pipeline.void(prepared);
                    drop(guard);
                    return self.redo(records, run, source, shutdown).await;
                }
                Settled::Nothing | Settled::Durable => {}
            }
            let produced_at = produced_at(&records);
            let (commit, report) = run.pipeline.submit(prepared);
            let storage = run.pipeline.storage().clone();
            *pending = Some(Pending {
                write: tokio::spawn(async move { storage.commit(commit).await }),
                records,
                report,
                produced_at,
                _gate: guard,
            });
            return Ok(Settled::Durable);
        }
    }

    /// Wait for the write in flight, if there is one (`Nothing` if not).
    /// Durable: its offsets are committed and it is reported. Failed: the
    /// cache is emptied and the batch processed again on its own until it
    /// is durable.
    async fn settle(
        &self,
        pending: &mut Option<Pending>,
        run: &mut Run<'_>,
        source: &mut dyn EventSource,
        shutdown: &watch::Receiver<bool>,
    ) -> anyhow::Result<Settled> {
        let Some(p) = pending.take() else {
            return Ok(Settled::Nothing);
        };
        let Pending {
            write,
            records,
            report,
            produced_at,
            _gate,
        } = p;
        let result = write
            .await
            .map_err(|e| anyhow::anyhow!("the batch write task failed: {e}"))?;
        run.pipeline.settled(result.is_ok());
        drop(_gate);
        match result {
            Ok(()) => {
                self.host.health.clear("store");
                self.durable(&records, &report, &produced_at, run, source)
                    .await;
                Ok(Settled::Durable)
            }
            Err(e @ (StoreError::Unavailable(_) | StoreError::Fenced(_))) => {
                if matches!(e, StoreError::Unavailable(_)) {
                    tracing::warn!(error = %e, "store unavailable; processing the batch again");
                    self.host.health.fault("store", format!("store: {e}"));
                } else {
                    tracing::warn!(error = %e, "batch fenced; processing it again");
                }
                match self.redo(records, run, source, shutdown).await? {
                    Settled::Shutdown => Ok(Settled::Shutdown),
                    _ => Ok(Settled::Redone),
                }
            }
            Err(e) => Err(anyhow::Error::new(e).context("committing a batch")),
        }
    }

    /// Process one batch on its own until it is durable, then report it.
    async fn redo(
        &self,
        records: Vec<SourceRecord>,
        run: &mut Run<'_>,
        source: &mut dyn EventSource,
        shutdown: &watch::Receiver<bool>,
    ) -> anyhow::Result<Settled> {
        let produced_at = produced_at(&records);
        let Some(report) = self
            .commit_batch(&mut run.pipeline, &records, shutdown)
            .await?
        else {
            return Ok(Settled::Shutdown);
        };
        self.durable(&records, &report, &produced_at, run, source)
            .await;
        Ok(Settled::Redone)
    }

    /// A batch is durable: count it, tell the source, report it.
    async fn durable(
        &self,
        records: &[SourceRecord],
        report: &BatchReport,
        produced_at: &[i64],
        run: &mut Run<'_>,
        source: &mut dyn EventSource,
    ) {
        let host = &self.host;
        host.metrics.committed(report.applied as u64);
        host.metrics
            .observe_produce_to_commit(produced_at, clock::unix_ms());
        let checkpoints = checkpoints_of(records);
        // The batch is durable and its checkpoint is in the store; a
        // failed offset commit only means the batch may be read again,
        // and its events are then found already stored.
        if let Err(e) = source.commit(&checkpoints).await {
            tracing::warn!(error = %format!("{e:#}"), "committing source offsets failed; the batch may be re-read");
        }
        for c in &checkpoints {
            host.metrics.progressed(&c.source, c.partition);
            host.health.progressed(&c.source, c.partition);
        }
        report_lag(host, source);
        (run.on_batch)(report);
        merge(&mut run.total, report);
    }

    /// Process one batch and commit it, under the batch gate, until it is
    /// committed: a store outage is retried with backoff, a lost fence
    /// re-runs the batch. `None` when shutdown came during an outage
    /// (nothing of the batch was committed; it is read again at start).
    async fn commit_batch(
        &self,
        pipeline: &mut Pipeline,
        records: &[SourceRecord],
        shutdown: &watch::Receiver<bool>,
    ) -> anyhow::Result<Option<BatchReport>> {
        let host = &self.host;
        let mut backoff = Duration::from_millis(100);
        loop {
            let gate = self.plugins.gate().read().await;
            let result = pipeline.process(records).await;
            drop(gate);
            match result {
                Ok(r) => {
                    host.health.clear("store");
                    return Ok(Some(r));
                }
                Err(StoreError::Unavailable(e)) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "store unavailable; retrying the batch");
                    host.health.fault("store", format!("store: {e}"));
                    host.health.beat();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    if *shutdown.borrow() {
                        return Ok(None);
                    }
                }
                Err(StoreError::Fenced(e)) => {
                    // Another writer moved an entity on (a rebalance race or a
                    // redelivery): re-run the batch; it reloads the entities and
                    // drops the events that are already stored.
                    tracing::warn!(error = %e, "batch fenced; re-running it");
                    host.health.beat();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(anyhow::Error::new(e).context("committing a batch")),
            }
        }
    }
}

/// The consume loop's own state.
struct Run<'a> {
    pipeline: Pipeline,
    total: BatchReport,
    on_batch: &'a mut (dyn FnMut(&BatchReport) + Send),
}

/// A batch whose write runs in a task of its own.
struct Pending {
    write: tokio::task::JoinHandle<Result<(), StoreError>>,
    records: Vec<SourceRecord>,
    report: BatchReport,
    produced_at: Vec<i64>,
    /// The batch gate, shared, until the write is durable.
    _gate: tokio::sync::OwnedRwLockReadGuard<()>,
}

/// How a batch in flight ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// No write was in flight.
    Nothing,
    /// Its write landed.
    Durable,
    /// Its write failed; it was processed again on its own and is durable.
    Redone,
    /// Shutdown came while an outage was waited out: nothing of the batch
    /// is committed, and it is read again at start.
    Shutdown,
}

/// When the records were produced, where the source says.
fn produced_at(records: &[SourceRecord]) -> Vec<i64> {
    records.iter().filter_map(|r| r.produced_at_ms).collect()
}

/// What one read of the source gave.
enum Read {
    /// A batch (maybe empty: nothing arrived within the linger time).
    Records(Vec<SourceRecord>),
    /// Nothing, after waiting out a transient fault or a shutdown signal:
    /// go round the loop again.
    Again,
    /// The source is exhausted.
    End,
}

/// Reads batches, waiting out the source's transient faults with backoff.
struct Reader {
    batch_size: usize,
    backoff: Option<Duration>,
}

impl Reader {
    fn new(batch_size: usize) -> Self {
        Reader {
            batch_size: batch_size.max(1),
            backoff: None,
        }
    }

    async fn next(
        &mut self,
        host: &Host,
        source: &mut dyn EventSource,
        shutdown: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Read> {
        let batch = tokio::select! {
            b = source.next_batch(self.batch_size) => b,
            _ = shutdown.changed() => return Ok(Read::Again),
        };
        let batch = match batch {
            Ok(b) => {
                if self.backoff.take().is_some() {
                    tracing::info!("source readable again");
                    host.health.clear("source");
                }
                b
            }
            Err(e) if refold_source::is_transient(&e) => {
                // A fault of the machine, not of the data (too many open
                // files, a permission being fixed, a file not there yet):
                // wait it out; nothing was consumed, so nothing is skipped.
                let wait = self.backoff.unwrap_or(Duration::from_millis(100));
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?wait, "source unavailable; retrying");
                host.health.fault("source", format!("source: {e:#}"));
                self.backoff = Some((wait * 2).min(Duration::from_secs(5)));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {},
                    _ = shutdown.changed() => {},
                }
                return Ok(Read::Again);
            }
            Err(e) => return Err(e.context("reading from the source")),
        };
        report_lag(host, source);
        Ok(match batch {
            Some(r) => Read::Records(r),
            None => Read::End,
        })
    }
}

/// Lag of every partition, to metrics and liveness.
fn report_lag(host: &Host, source: &dyn EventSource) {
    for l in source.lag() {
        host.metrics.set_lag(&l.source, l.partition, l.lag);
        host.health.lag(&l.source, l.partition, l.lag);
    }
}

/// Records read, per source, to metrics.
fn count_consumed(host: &Host, records: &[SourceRecord]) {
    let mut per_source: HashMap<&str, u64> = HashMap::new();
    for r in records {
        *per_source.entry(r.origin.source.as_str()).or_default() += 1;
    }
    for (s, n) in per_source {
        host.metrics.consumed(s, n);
    }
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
    use refold_source::{PartitionLag, SourceRecord};
    use refold_store::{Checkpoint, Origin, StateStore as _};
    use refold_store_sqlite::SqliteStore;
    use std::path::Path;

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

    /// Batches in order, then the end; records what was committed, and
    /// checks that each commit comes after the store holds its batch.
    struct Batches {
        batches: std::collections::VecDeque<Vec<SourceRecord>>,
        committed: Arc<std::sync::Mutex<Vec<i64>>>,
        store: Arc<SqliteStore>,
    }

    #[async_trait::async_trait]
    impl EventSource for Batches {
        async fn next_batch(&mut self, _max: usize) -> anyhow::Result<Option<Vec<SourceRecord>>> {
            Ok(self.batches.pop_front())
        }
        async fn commit(&mut self, c: &[Checkpoint]) -> anyhow::Result<()> {
            let stored = self.store.checkpoints("t").await?;
            for c in c {
                let durable = stored.iter().find(|s| s.partition == c.partition);
                assert!(
                    durable.is_some_and(|d| d.offset >= c.offset),
                    "offset {} committed before it was durable",
                    c.offset
                );
                self.committed.lock().unwrap().push(c.offset);
            }
            Ok(())
        }
        fn lag(&self) -> Vec<PartitionLag> {
            Vec::new()
        }
    }

    fn deposit(i: usize, account: &str, id: &str, amount: u64) -> SourceRecord {
        SourceRecord {
            origin: Origin {
                source: "t".into(),
                partition: 0,
                offset: i as i64,
            },
            next_offset: i as i64 + 1,
            key: Some(account.into()),
            headers: Vec::new(),
            payload: serde_json::json!({"specversion": "1.0", "id": id,
                "source": "/t", "type": "account.deposited", "subject": account,
                "entitytype": "account", "data": {"amount": amount}})
            .to_string()
            .into_bytes(),
            produced_at_ms: None,
        }
    }

    /// With a batch folded while the one before is written, a re-delivery
    /// of an event still being written is a duplicate, each batch builds on
    /// the one before, and offsets are committed in order, each once its
    /// batch is durable.
    #[tokio::test]
    async fn overlapped_batches_are_exact_and_commit_offsets_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = HostConfig::default();
        config.plugins.files =
            vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bank/bank.wasm")];
        let store = Arc::new(SqliteStore::open(&dir.path().join("r.db")).unwrap());
        let app = App::with_storage(config, store.clone(), store.clone()).unwrap();
        let mut offset = 0;
        let mut next = |account: &str, id: &str, amount| {
            offset += 1;
            deposit(offset - 1, account, id, amount)
        };
        let batches = vec![
            vec![next("a", "1", 10), next("b", "1", 1)],
            // "a"/"1" again while the first batch may still be written.
            vec![next("a", "1", 10), next("a", "2", 5)],
            vec![next("a", "2", 5), next("b", "2", 2), next("c", "1", 3)],
            vec![next("c", "1", 3)],
        ];
        let committed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let source = Batches {
            batches: batches.into(),
            committed: committed.clone(),
            store: store.clone(),
        };
        let (_tx, rx) = watch::channel(false);
        let total = app.consume(Box::new(source), rx, |_| {}).await.unwrap();
        assert_eq!((total.applied, total.duplicates), (5, 3));
        assert_eq!(*committed.lock().unwrap(), [2, 4, 7, 8]);
        let balance = |id: &str| {
            let k = refold_store::EntityKey::new("account", id);
            let store = store.clone();
            async move {
                let r = store.load(std::slice::from_ref(&k)).await.unwrap();
                r[&k].state.as_ref().unwrap()["balance"].as_u64().unwrap()
            }
        };
        assert_eq!(
            (balance("a").await, balance("b").await, balance("c").await),
            (15, 3, 3)
        );
    }

    fn metric(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    #[tokio::test]
    async fn committed_events_and_produce_to_commit_are_counted_after_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = HostConfig::default();
        config.plugins.files =
            vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bank/bank.wasm")];
        let store = Arc::new(SqliteStore::open(&dir.path().join("r.db")).unwrap());
        let app = App::with_storage(config, store.clone(), store).unwrap();
        let stamp = clock::unix_ms() - 20;
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
        let text = app.host.metrics.render();
        assert_eq!(metric(&text, "refold_events_committed_total"), 3.0);
        // Two stamped records, at least 20 ms old; the unstamped one is skipped.
        assert_eq!(metric(&text, "refold_produce_to_commit_seconds_count"), 2.0);
        assert!(metric(&text, "refold_produce_to_commit_seconds_sum") >= 0.04);
    }
}

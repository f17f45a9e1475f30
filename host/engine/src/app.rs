//! The assembled host ([`App`]): its core, its plugin manager, and the
//! consume loop that drives the pipeline from a source.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use refold_source::{EventSource, SourceRecord, checkpoints_of};
use refold_store::{Checkpoint, PluginStore, Storage, StoreError};
use refold_types::{clock, stable_hash};
use tokio::sync::{mpsc, watch};

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
    /// Records are dealt out to lanes by partition (each partition always
    /// to the same lane, so its order is kept); on each lane the next batch
    /// is read, deduplicated and folded while the one before it is written.
    /// A batch's source offsets are committed only once it and every batch
    /// of its lane before it are durable, in order. A store outage is
    /// waited out with backoff, never skipped.
    pub async fn consume(
        &self,
        mut source: Box<dyn EventSource>,
        mut shutdown: watch::Receiver<bool>,
        mut on_batch: impl FnMut(&BatchReport) + Send,
    ) -> anyhow::Result<BatchReport> {
        let host = &self.host;
        let lanes = host.config.engine.lane_count();
        let independent = source.independent_partitions();
        let (done_tx, mut done) = mpsc::unbounded_channel();
        let mut inboxes = Vec::with_capacity(lanes);
        let mut tasks = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            // One batch queued per lane: the reader runs at most one batch
            // ahead of the slowest lane it feeds.
            let (tx, rx) = mpsc::channel(1);
            let lane = Lane {
                app: self.clone(),
                pipeline: Pipeline::for_lane(host, lanes),
                pending: None,
                done: done_tx.clone(),
                shutdown: shutdown.clone(),
            };
            tasks.push(tokio::spawn(lane.run(rx)));
            inboxes.push(tx);
        }
        drop(done_tx);
        let mut total = BatchReport::default();
        // Each lane gets about a batch per read: dealt out by partition, a
        // read of one batch would give each of N lanes a batch 1/N the size
        // (and N times the per-batch work per event).
        let read_size = if independent {
            host.config.source.batch_size.saturating_mul(lanes)
        } else {
            host.config.source.batch_size
        };
        let mut reader = Reader::new(read_size);
        let mut disk_checked: Option<Instant> = None;
        'read: loop {
            host.health.beat();
            if disk_checked.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                host.check_disk();
                disk_checked = Some(Instant::now());
            }
            while let Ok(d) = done.try_recv() {
                deliver(host, d, &mut *source, &mut on_batch, &mut total).await;
            }
            // A lane that stopped stopped on an error: collected below.
            if *shutdown.borrow() || tasks.iter().any(|t| t.is_finished()) {
                break;
            }
            if let Some(why) = host.held_back_by_sink().await {
                host.health.fault("sink", why);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            host.health.clear("sink");
            let records = match reader.next(host, &mut *source, &mut shutdown).await? {
                Read::Records(r) => r,
                Read::Again => continue,
                Read::End => break,
            };
            // Read after the batch: records of partitions revoked during
            // the read were dropped by the source, so what lanes are told
            // to forget is never followed by a record of it from this read.
            let revoked = source.revoked();
            if !revoked.is_empty() {
                host.health.forget(&revoked);
                host.trend.forget(&revoked);
                for (topic, partition) in &revoked {
                    host.metrics.forget_partition(topic, *partition);
                }
                for inbox in &inboxes {
                    if inbox.send(Work::Forget(revoked.clone())).await.is_err() {
                        break 'read;
                    }
                }
            }
            if records.is_empty() {
                continue;
            }
            count_consumed(host, &records);
            for (lane, batch) in deal(records, lanes, independent) {
                if inboxes[lane].send(Work::Batch(batch)).await.is_err() {
                    break 'read;
                }
            }
        }
        // Lanes finish what they were given (or, on shutdown, only the
        // write in flight), then their last batches are delivered.
        drop(inboxes);
        let mut error = None;
        for t in tasks {
            let r = t
                .await
                .map_err(|e| anyhow::anyhow!("a consume lane failed: {e}"))
                .and_then(|r| r);
            if let Err(e) = r {
                error.get_or_insert(e);
            }
        }
        while let Some(d) = done.recv().await {
            deliver(host, d, &mut *source, &mut on_batch, &mut total).await;
        }
        match error {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }
}

/// Catch-up passes over deferred entities once the source ended.
const MAX_CATCH_UP_PASSES: usize = 100_000;

/// One lane of the consume loop: its own pipeline (sandboxes, state
/// cache) over the partitions dealt to it, and its write in flight.
struct Lane {
    app: App,
    pipeline: Pipeline,
    pending: Option<Pending>,
    /// Where durable batches go, in order, for their offsets.
    done: mpsc::UnboundedSender<Durable>,
    shutdown: watch::Receiver<bool>,
}

/// A batch of one lane that is durable: the checkpoints to tell the
/// source, and what it did.
struct Durable {
    checkpoints: Vec<Checkpoint>,
    report: BatchReport,
}

impl Lane {
    /// Process the batches dealt to this lane until there are no more (or
    /// shutdown); when no batch comes within the linger time, the write in
    /// flight is let land (and entities deferred by earlier batches are
    /// folded).
    async fn run(mut self, mut inbox: mpsc::Receiver<Work>) -> anyhow::Result<()> {
        let idle = Duration::from_millis(self.app.host.config.source.linger_ms.max(1));
        loop {
            if *self.shutdown.borrow() {
                break;
            }
            let waiting = self.pending.is_some() || self.pipeline.has_deferred();
            let next = if waiting {
                tokio::select! {
                    r = inbox.recv() => r,
                    _ = tokio::time::sleep(idle) => Some(Work::Batch(Vec::new())),
                }
            } else {
                inbox.recv().await
            };
            let records = match next {
                None => break,
                Some(Work::Batch(records)) => records,
                Some(Work::Forget(partitions)) => {
                    // The write in flight first: its entities are cached
                    // as it settles.
                    if self.settle().await? == Settled::Shutdown {
                        return Ok(());
                    }
                    let n = self.pipeline.forget_partitions(&partitions);
                    tracing::info!(
                        entities = n,
                        ?partitions,
                        "dropped the cached entities of revoked partitions"
                    );
                    continue;
                }
            };
            if *self.shutdown.borrow() {
                break;
            }
            let settled = if records.is_empty() && !self.pipeline.has_deferred() {
                self.settle().await?
            } else {
                self.overlap(records).await?
            };
            if settled == Settled::Shutdown {
                return Ok(());
            }
        }
        // The inbox closed: the source ended (a file read without
        // following, `refold test`, a demo). Entities that earlier batches
        // deferred (out of their time or output budget) are folded now, or
        // the run would end with states behind their head. Each pass folds
        // at least the first entity it takes; the bound is a backstop.
        let mut passes = 0usize;
        while self.pipeline.has_deferred() && !*self.shutdown.borrow() {
            passes += 1;
            if passes > MAX_CATCH_UP_PASSES {
                tracing::warn!("entities deferred at the end of the source stay behind their head");
                break;
            }
            if self.overlap(Vec::new()).await? == Settled::Shutdown {
                return Ok(());
            }
        }
        self.settle().await?;
        Ok(())
    }

    /// Prepare `records` while the write in flight runs, settle that
    /// write, then hand this batch's to a task of its own (left in
    /// `pending`). When the write in flight failed, what was prepared on top
    /// of it is dropped and the batch is processed again on its own.
    async fn overlap(&mut self, records: Vec<SourceRecord>) -> anyhow::Result<Settled> {
        let gate = self.app.plugins.gate().clone();
        let guard = match gate.clone().try_read_owned() {
            Ok(g) => g,
            Err(_) => {
                // A change waits for the gate: let the batch in flight land
                // first (it holds the gate too), then queue behind the change.
                if self.settle().await? == Settled::Shutdown {
                    return Ok(Settled::Shutdown);
                }
                gate.read_owned().await
            }
        };
        loop {
            let prepared = match self.pipeline.prepare(&records).await {
                Ok(Prepare::Ready(p)) => p,
                Ok(Prepare::Settle) => match self.settle().await? {
                    Settled::Shutdown => return Ok(Settled::Shutdown),
                    Settled::Durable | Settled::Redone => continue,
                    // It waits on no write known: processed on its own.
                    Settled::Nothing => {
                        drop(guard);
                        return self.redo(records).await;
                    }
                },
                Err(_) => {
                    // A read failed: the one-batch-at-a-time path retries it
                    // with backoff, after the write in flight.
                    drop(guard);
                    if self.settle().await? == Settled::Shutdown {
                        return Ok(Settled::Shutdown);
                    }
                    return self.redo(records).await;
                }
            };
            match self.settle().await? {
                Settled::Shutdown => return Ok(Settled::Shutdown),
                Settled::Redone => {
                    // Prepared on top of a write that failed: void.
                    self.pipeline.void(prepared);
                    drop(guard);
                    return self.redo(records).await;
                }
                Settled::Nothing | Settled::Durable => {}
            }
            let produced_at = produced_at(&records);
            let (commit, report) = self.pipeline.submit(prepared);
            self.pending = Some(Pending {
                write: tokio::spawn(self.pipeline.write(commit)),
                records,
                report,
                produced_at,
                _gate: guard,
            });
            return Ok(Settled::Durable);
        }
    }

    /// Wait for the write in flight, if there is one (`Nothing` if not).
    /// Durable: it is handed on for its offsets. Failed: the cache is
    /// emptied and the batch processed again on its own until it is
    /// durable.
    async fn settle(&mut self) -> anyhow::Result<Settled> {
        let Some(p) = self.pending.take() else {
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
        self.pipeline.settled(result.is_ok());
        drop(_gate);
        match result {
            Ok(()) => {
                self.app.host.health.clear("store");
                self.durable(&records, report, &produced_at);
                Ok(Settled::Durable)
            }
            Err(e @ (StoreError::Unavailable(_) | StoreError::Fenced(_))) => {
                if matches!(e, StoreError::Unavailable(_)) {
                    tracing::warn!(error = %e, "store unavailable; processing the batch again");
                    self.app.host.health.fault("store", format!("store: {e}"));
                } else {
                    tracing::warn!(error = %e, "batch fenced; processing it again");
                }
                match self.redo(records).await? {
                    Settled::Shutdown => Ok(Settled::Shutdown),
                    _ => Ok(Settled::Redone),
                }
            }
            Err(e) => Err(anyhow::Error::new(e).context("committing a batch")),
        }
    }

    /// Process one batch on its own until it is durable, then hand it on.
    async fn redo(&mut self, records: Vec<SourceRecord>) -> anyhow::Result<Settled> {
        let produced_at = produced_at(&records);
        let Some(report) = self.commit_batch(&records).await? else {
            return Ok(Settled::Shutdown);
        };
        self.durable(&records, report, &produced_at);
        Ok(Settled::Redone)
    }

    /// A batch is durable: count it and hand it on for its offsets.
    fn durable(&self, records: &[SourceRecord], report: BatchReport, produced_at: &[i64]) {
        let host = &self.app.host;
        host.metrics.committed(report.applied as u64);
        host.metrics
            .observe_produce_to_commit(produced_at, clock::unix_ms());
        // The consume loop is gone only once every lane has stopped.
        let _ = self.done.send(Durable {
            checkpoints: checkpoints_of(records),
            report,
        });
    }

    /// Process one batch and commit it, under the batch gate, until it is
    /// committed: a store outage is retried with backoff, a lost fence
    /// re-runs the batch. `None` when shutdown came during an outage
    /// (nothing of the batch was committed; it is read again at start).
    async fn commit_batch(
        &mut self,
        records: &[SourceRecord],
    ) -> anyhow::Result<Option<BatchReport>> {
        let host = &self.app.host;
        let mut backoff = Duration::from_millis(100);
        loop {
            let gate = self.app.plugins.gate().read().await;
            let result = self.pipeline.process(records).await;
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
                    if *self.shutdown.borrow() {
                        return Ok(None);
                    }
                }
                Err(StoreError::Fenced(e)) => {
                    // Another writer moved an entity on (a rebalance race,
                    // a redelivery, or another lane writing an entity whose
                    // events come on two partitions): re-run the batch; it
                    // reloads the entities and drops the events that are
                    // already stored.
                    tracing::warn!(error = %e, "batch fenced; re-running it");
                    host.health.beat();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(anyhow::Error::new(e).context("committing a batch")),
            }
        }
    }
}

/// A lane's durable batch reaches the source (its offsets), the metrics
/// and health (its partitions progressed) and the caller.
async fn deliver(
    host: &Host,
    d: Durable,
    source: &mut dyn EventSource,
    on_batch: &mut (dyn FnMut(&BatchReport) + Send),
    total: &mut BatchReport,
) {
    // The batch is durable and its checkpoint is in the store; a failed
    // offset commit only means the batch may be read again, and its events
    // are then found already stored.
    if let Err(e) = source.commit(&d.checkpoints).await {
        tracing::warn!(error = %format!("{e:#}"), "committing source offsets failed; the batch may be re-read");
    }
    for c in &d.checkpoints {
        host.metrics.progressed(&c.source, c.partition, c.offset);
        host.health.progressed(&c.source, c.partition);
        host.trend.progressed(&c.source, c.partition, c.offset);
    }
    report_lag(host, source);
    on_batch(&d.report);
    merge(total, &d.report);
}

/// Deal `records` out to `lanes` lanes, keeping their order within each:
/// by partition (consecutive partitions to consecutive lanes), or by
/// source when its partitions are not independent.
fn deal(
    records: Vec<SourceRecord>,
    lanes: usize,
    independent: bool,
) -> Vec<(usize, Vec<SourceRecord>)> {
    if lanes <= 1 {
        return vec![(0, records)];
    }
    let mut out: Vec<Vec<SourceRecord>> = (0..lanes).map(|_| Vec::new()).collect();
    for r in records {
        let mut lane = stable_hash(r.origin.source.bytes());
        if independent {
            lane = lane.wrapping_add(u64::from(r.origin.partition.unsigned_abs()));
        }
        out[(lane % lanes as u64) as usize].push(r);
    }
    out.into_iter()
        .enumerate()
        .filter(|(_, b)| !b.is_empty())
        .collect()
}

/// What the reader hands a lane.
enum Work {
    /// Records of the lane's partitions, in order.
    Batch(Vec<SourceRecord>),
    /// Partitions a rebalance took away: drop what is cached of them.
    Forget(Vec<(String, i32)>),
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
        host.trend.lag(&l.source, l.partition, l.lag);
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
        committed: Arc<std::sync::Mutex<Vec<(i32, i64)>>>,
        store: Arc<SqliteStore>,
        /// Whether its partitions are independent (Kafka-like).
        partitions: bool,
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
                self.committed.lock().unwrap().push((c.partition, c.offset));
            }
            Ok(())
        }
        fn lag(&self) -> Vec<PartitionLag> {
            Vec::new()
        }
        fn independent_partitions(&self) -> bool {
            self.partitions
        }
    }

    /// Consume `batches` from a Kafka-like [`Batches`] source to the end:
    /// the total, and the (partition, offset) commits in the order made.
    async fn consume_batches(
        app: &App,
        store: &Arc<SqliteStore>,
        batches: Vec<Vec<SourceRecord>>,
    ) -> (BatchReport, Vec<(i32, i64)>) {
        let committed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let source = Batches {
            batches: batches.into(),
            committed: committed.clone(),
            store: store.clone(),
            partitions: true,
        };
        let (_tx, rx) = watch::channel(false);
        let total = app.consume(Box::new(source), rx, |_| {}).await.unwrap();
        let committed = committed.lock().unwrap().clone();
        (total, committed)
    }

    /// An app with the bank plugin over a fresh SQLite store, on `lanes`
    /// lanes (0: the default).
    fn bank_app(lanes: usize) -> (tempfile::TempDir, Arc<SqliteStore>, App) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = HostConfig::default();
        config.engine.lanes = lanes;
        config.plugins.files =
            vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bank/bank.wasm")];
        let store = Arc::new(SqliteStore::open(&dir.path().join("r.db")).unwrap());
        let app = App::with_storage(config, store.clone(), store.clone()).unwrap();
        (dir, store, app)
    }

    /// An account's balance as stored.
    async fn balance(store: &SqliteStore, account: &str) -> Option<u64> {
        let k = refold_store::EntityKey::new("account", account);
        let r = store.load(std::slice::from_ref(&k)).await.unwrap();
        r.get(&k)?.state.as_ref()?["balance"].as_u64()
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

    /// Batches with a pause before each (so that each lane has settled
    /// the one before), then the end; says a partition was revoked after
    /// the first, and samples the state cache's entry gauge before each
    /// later batch.
    struct Revoking {
        batches: std::collections::VecDeque<Vec<SourceRecord>>,
        reads: usize,
        metrics: Arc<crate::metrics::Metrics>,
        cached: Arc<std::sync::Mutex<Vec<i64>>>,
    }

    #[async_trait::async_trait]
    impl EventSource for Revoking {
        async fn next_batch(&mut self, _max: usize) -> anyhow::Result<Option<Vec<SourceRecord>>> {
            self.reads += 1;
            if self.reads > 1 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                let text = self.metrics.render();
                let line = text
                    .lines()
                    .find(|l| l.starts_with("refold_state_cache_entries "))
                    .unwrap();
                let n = line.rsplit(' ').next().unwrap().parse().unwrap();
                self.cached.lock().unwrap().push(n);
            }
            Ok(self.batches.pop_front())
        }
        async fn commit(&mut self, _c: &[Checkpoint]) -> anyhow::Result<()> {
            Ok(())
        }
        fn lag(&self) -> Vec<PartitionLag> {
            Vec::new()
        }
        fn revoked(&mut self) -> Vec<(String, i32)> {
            if self.reads == 2 {
                vec![("t".into(), 0)]
            } else {
                Vec::new()
            }
        }
    }

    /// The entities of a revoked partition leave the state cache, those of
    /// the others stay; a revoked partition that comes back is read from
    /// the store again, exactly.
    #[tokio::test]
    async fn a_revoked_partitions_entities_leave_the_cache() {
        let (_dir, store, app) = bank_app(1);
        let on = |partition: i32, offset: usize, account: &str, id: &str| {
            let mut r = deposit(offset, account, id, 10);
            r.origin.partition = partition;
            r
        };
        let batches = vec![
            vec![on(0, 0, "a", "1"), on(0, 1, "c", "1"), on(1, 0, "b", "1")],
            // p0 is revoked before this batch is dealt.
            vec![on(1, 1, "b", "2")],
            // And comes back, with a re-delivery.
            vec![on(0, 1, "c", "1"), on(0, 2, "a", "2")],
        ];
        let cached = Arc::new(std::sync::Mutex::new(Vec::new()));
        let source = Revoking {
            batches: batches.into(),
            reads: 0,
            metrics: app.host.metrics.clone(),
            cached: cached.clone(),
        };
        let (_tx, rx) = watch::channel(false);
        let total = app.consume(Box::new(source), rx, |_| {}).await.unwrap();
        assert_eq!((total.applied, total.duplicates), (5, 1));
        // Before the 2nd batch: a, b, c; before the 3rd: b; at the end b
        // and a (c's re-delivery is found in the store and changes nothing).
        assert_eq!(*cached.lock().unwrap(), [3, 1, 2]);
        assert_eq!(balance(&store, "a").await, Some(20));
        assert_eq!(balance(&store, "c").await, Some(10));
    }

    /// With a batch folded while the one before is written, a re-delivery
    /// of an event still being written is a duplicate, each batch builds on
    /// the one before, and offsets are committed in order, each once its
    /// batch is durable.
    #[tokio::test]
    async fn overlapped_batches_are_exact_and_commit_offsets_in_order() {
        let (_dir, store, app) = bank_app(0);
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
        let (total, committed) = consume_batches(&app, &store, batches).await;
        assert_eq!((total.applied, total.duplicates), (5, 3));
        let offsets: Vec<i64> = committed.iter().map(|c| c.1).collect();
        assert_eq!(offsets, [2, 4, 7, 8]);
        assert_eq!(
            (
                balance(&store, "a").await,
                balance(&store, "b").await,
                balance(&store, "c").await
            ),
            (Some(15), Some(3), Some(3))
        );
    }

    /// With two lanes, each partition's offsets are committed in order and
    /// only once durable, and an entity whose events arrive on partitions
    /// of both lanes (its writes then race between the lanes) still gets
    /// every event once.
    #[tokio::test]
    async fn two_lanes_keep_partition_order_and_an_entity_on_both_lanes_exact() {
        let (_dir, store, app) = bank_app(2);
        let mut offsets = [0usize; 4];
        let mut at = |partition: usize, account: &str, id: &str, amount| {
            let mut r = deposit(offsets[partition], account, id, amount);
            r.origin.partition = partition as i32;
            offsets[partition] += 1;
            r
        };
        let mut batches = Vec::new();
        let mut expected: HashMap<String, u64> = HashMap::new();
        for round in 0..30u64 {
            let mut batch = Vec::new();
            for p in 0..4 {
                let own = format!("p{p}");
                batch.push(at(p, &own, &format!("{round}"), round + 1));
                *expected.entry(own.clone()).or_default() += round + 1;
                // "x" on partitions 0 and 1: two lanes write it.
                if p < 2 {
                    batch.push(at(p, "x", &format!("{p}-{round}"), 1));
                    *expected.entry("x".into()).or_default() += 1;
                }
                if round > 0 {
                    // A re-delivery of the round before: a duplicate.
                    batch.push(at(p, &own, &format!("{}", round - 1), round));
                }
            }
            batches.push(batch);
        }
        let (total, committed) = consume_batches(&app, &store, batches).await;
        assert_eq!(total.applied, 30 * 6);
        assert_eq!(total.duplicates, 29 * 4);
        for p in 0..4i32 {
            let of_p: Vec<i64> = committed
                .iter()
                .filter(|(q, _)| *q == p)
                .map(|(_, o)| *o)
                .collect();
            assert!(of_p.windows(2).all(|w| w[0] < w[1]), "{p}: {of_p:?}");
            assert_eq!(of_p.last().copied(), Some(offsets[p as usize] as i64));
        }
        for (account, want) in expected {
            assert_eq!(balance(&store, &account).await, Some(want), "{account}");
        }
    }

    #[test]
    fn partitions_are_dealt_round_robin_and_files_of_one_source_stay_together() {
        let rec = |source: &str, partition: i32| {
            let mut r = deposit(0, "a", "1", 1);
            r.origin.source = source.into();
            r.origin.partition = partition;
            r
        };
        let records: Vec<SourceRecord> = (0..12).map(|p| rec("t", p)).collect();
        let dealt = deal(records.clone(), 3, true);
        assert_eq!(dealt.len(), 3);
        assert!(dealt.iter().all(|(_, b)| b.len() == 4));
        let dealt = deal(records, 3, false);
        assert_eq!(dealt.len(), 1, "one source: one lane");
        assert_eq!(dealt[0].1.len(), 12);
        assert_eq!(deal(vec![rec("t", 5)], 1, true)[0].0, 0);
    }

    fn metric(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    #[tokio::test]
    async fn committed_events_and_produce_to_commit_are_counted_after_the_commit() {
        let (_dir, _store, app) = bank_app(0);
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

//! Prometheus metrics of the engine. One `Metrics` per engine instance, with
//! its own registry, rendered at `/metrics`.

use std::time::Duration;

use prometheus::{
    Encoder as _, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use refold_runtime::CallStats;

/// Bounds of `refold_produce_to_commit_seconds`: fine enough between 1 ms
/// and 10 s that percentiles interpolated from them are close, since a
/// commit takes milliseconds and a backlog takes seconds.
const PRODUCE_TO_COMMIT_BUCKETS: [f64; 30] = [
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075,
    0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
];

/// All metrics of one engine.
pub struct Metrics {
    registry: Registry,
    consumed: IntCounterVec,
    applied: IntCounterVec,
    committed: IntCounter,
    duplicates: IntCounter,
    deferred: IntCounter,
    produce_to_commit: Histogram,
    dead_letters: IntCounterVec,
    change_records: IntCounterVec,
    sink_delivered: IntCounterVec,
    sink_failures: IntCounterVec,
    sink_dead_letters: IntCounterVec,
    sink_lag: IntGaugeVec,
    quarantined: IntCounterVec,
    fold_seconds: Histogram,
    stage_seconds: HistogramVec,
    lag: IntGaugeVec,
    last_progress: GaugeVec,
    offset: IntGaugeVec,
    plugin_memory: IntGaugeVec,
    plugin_cpu: GaugeVec,
    plugin_calls: IntGaugeVec,
    plugin_log_dropped: IntGaugeVec,
    plugin_deadlines: IntGaugeVec,
    swaps: IntCounterVec,
    rebuilds: IntCounterVec,
    cache_lookups: IntCounterVec,
    cache_evictions: IntCounter,
    cache_entries: prometheus::IntGauge,
    cache_bytes: prometheus::IntGauge,
    outbox_records: prometheus::IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

macro_rules! reg {
    ($r:expr, $m:expr) => {{
        let m = $m.expect("metric definition is valid");
        $r.register(Box::new(m.clone()))
            .expect("metric registered once");
        m
    }};
}

impl Metrics {
    /// Fresh metrics with their own registry.
    pub fn new() -> Self {
        let r = Registry::new();
        Metrics {
            consumed: reg!(
                r,
                IntCounterVec::new(
                    Opts::new("refold_events_consumed_total", "Records read from sources"),
                    &["source"]
                )
            ),
            applied: reg!(
                r,
                IntCounterVec::new(
                    Opts::new("refold_events_applied_total", "Events folded into states"),
                    &["entity_type", "plugin_version"]
                )
            ),
            // `applied` moves when a batch is folded, before its store commit;
            // this one moves after the commit, so it says what is durable.
            committed: reg!(
                r,
                IntCounter::new(
                    "refold_events_committed_total",
                    "Events applied by batches whose store commit completed"
                )
            ),
            duplicates: reg!(
                r,
                IntCounter::new(
                    "refold_events_duplicate_total",
                    "Records ignored as re-deliveries of a stored event (same identity, same bytes)"
                )
            ),
            deferred: reg!(
                r,
                IntCounter::new(
                    "refold_entities_deferred_total",
                    "Entities whose events a batch stored but left to fold later (batch fold budget spent)"
                )
            ),
            produce_to_commit: reg!(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "refold_produce_to_commit_seconds",
                        "Record timestamp (Kafka: producer create time) to its batch committed in the store"
                    )
                    .buckets(PRODUCE_TO_COMMIT_BUCKETS.to_vec())
                )
            ),
            sink_delivered: reg!(
                r,
                IntCounterVec::new(
                    Opts::new("refold_sink_delivered_total", "Change records a sink delivered"),
                    &["sink"]
                )
            ),
            sink_failures: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "refold_sink_failures_total",
                        "Failed delivery attempts of a sink"
                    ),
                    &["sink"]
                )
            ),
            sink_dead_letters: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "refold_sink_dead_letters_total",
                        "Change records a sink gave up on (kept in its dead-letter file)"
                    ),
                    &["sink"]
                )
            ),
            sink_lag: reg!(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "refold_sink_lag_records",
                        "Change records in the feed that a sink has not delivered yet"
                    ),
                    &["sink"]
                )
            ),
            change_records: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "refold_change_records_total",
                        "Change records committed to the change feed, by CloudEvents type"
                    ),
                    &["type"]
                )
            ),
            dead_letters: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "refold_dead_letters_total",
                        "Records dead-lettered, by reason"
                    ),
                    &["reason"]
                )
            ),
            quarantined: reg!(
                r,
                IntCounterVec::new(
                    Opts::new("refold_quarantined_total", "Entities quarantined"),
                    &["entity_type", "plugin_version"]
                )
            ),
            fold_seconds: reg!(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "refold_fold_seconds",
                        "Time to fold one batch (all entities)"
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0
                    ])
                )
            ),
            stage_seconds: reg!(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "refold_batch_stage_seconds",
                        "Time a batch spends in a stage of the consume loop: prepare (validate, \
                         deduplicate, load, fold) or write (the store commit)"
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0
                    ]),
                    &["stage"]
                )
            ),
            lag: reg!(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "refold_partition_lag",
                        "Records (Kafka) or bytes (files) not yet consumed"
                    ),
                    &["source", "partition"]
                )
            ),
            last_progress: reg!(
                r,
                GaugeVec::new(
                    Opts::new(
                        "refold_partition_last_progress_seconds",
                        "Unix time of the last committed batch of a partition"
                    ),
                    &["source", "partition"]
                )
            ),
            // In the unit of the lag, so that a reader (the console) derives
            // a partition's throughput beside its lag from two scrapes.
            offset: reg!(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "refold_partition_committed_offset",
                        "Next offset to read (records for Kafka, bytes for files) of a partition's last committed batch"
                    ),
                    &["source", "partition"]
                )
            ),
            plugin_memory: reg!(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "refold_plugin_memory_peak_bytes",
                        "Largest linear memory of a plugin instance"
                    ),
                    &["entity_type", "plugin_version"]
                )
            ),
            plugin_cpu: reg!(
                r,
                GaugeVec::new(
                    Opts::new(
                        "refold_plugin_cpu_seconds",
                        "Time spent inside plugin calls"
                    ),
                    &["entity_type", "plugin_version"]
                )
            ),
            plugin_calls: reg!(
                r,
                IntGaugeVec::new(
                    Opts::new("refold_plugin_calls", "Guest calls made"),
                    &["entity_type", "plugin_version"]
                )
            ),
            plugin_log_dropped: reg!(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "refold_plugin_log_lines_dropped",
                        "Guest log lines dropped by the per-call log budget"
                    ),
                    &["entity_type", "plugin_version"]
                )
            ),
            plugin_deadlines: reg!(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "refold_plugin_deadlines",
                        "Guest calls that ran out of their CPU budget"
                    ),
                    &["entity_type", "plugin_version"]
                )
            ),
            swaps: reg!(
                r,
                IntCounterVec::new(
                    Opts::new("refold_plugin_swaps_total", "Plugin activations"),
                    &["entity_type", "mode"]
                )
            ),
            rebuilds: reg!(
                r,
                IntCounterVec::new(
                    Opts::new("refold_rebuilds_total", "Rebuilds by outcome"),
                    &["entity_type", "outcome"]
                )
            ),
            cache_lookups: reg!(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "refold_state_cache_lookups_total",
                        "Entities of batches looked up in the owned-state cache, by result"
                    ),
                    &["result"]
                )
            ),
            cache_evictions: reg!(
                r,
                IntCounter::new(
                    "refold_state_cache_evictions_total",
                    "Entities dropped from the owned-state cache to keep within its budget"
                )
            ),
            cache_entries: reg!(
                r,
                prometheus::IntGauge::new(
                    "refold_state_cache_entries",
                    "Entities held by the owned-state cache"
                )
            ),
            cache_bytes: reg!(
                r,
                prometheus::IntGauge::new(
                    "refold_state_cache_bytes",
                    "Bytes held by the owned-state cache (estimated, as its budget is kept)"
                )
            ),
            outbox_records: reg!(
                r,
                prometheus::IntGauge::new(
                    "refold_change_outbox_records",
                    "Change records of this host's partitions committed and not yet published to Kafka"
                )
            ),
            registry: r,
        }
    }

    /// Records read from a source.
    pub fn consumed(&self, source: &str, n: u64) {
        self.consumed.with_label_values(&[source]).inc_by(n);
    }
    /// Events applied.
    pub fn applied(&self, entity_type: &str, version: &str, n: u64) {
        self.applied
            .with_label_values(&[entity_type, version])
            .inc_by(n);
    }
    /// Events of a batch whose store commit completed.
    pub fn committed(&self, n: u64) {
        self.committed.inc_by(n);
    }
    /// The records stamped `timestamps_ms` (Unix ms) were committed at
    /// `now_ms`. Unknown stamps (<= 0) are skipped; a stamp from the future
    /// (clocks of producer and host differ) counts as zero.
    pub fn observe_produce_to_commit(&self, timestamps_ms: &[i64], now_ms: i64) {
        for &t in timestamps_ms.iter().filter(|&&t| t > 0) {
            self.produce_to_commit
                .observe((now_ms - t).max(0) as f64 / 1000.0);
        }
    }
    /// Entities deferred by a batch.
    pub fn deferred(&self, n: u64) {
        self.deferred.inc_by(n);
    }
    /// Re-deliveries ignored.
    pub fn duplicates(&self, n: u64) {
        self.duplicates.inc_by(n);
    }
    /// A dead letter.
    pub fn dead_lettered(&self, reason: &str) {
        self.dead_letters.with_label_values(&[reason]).inc();
    }
    /// Change records committed, of one type.
    pub fn change_records(&self, kind: &str, n: u64) {
        self.change_records.with_label_values(&[kind]).inc_by(n);
    }
    /// A sink delivered a record.
    pub fn sink_delivered(&self, sink: &str) {
        self.sink_delivered_many(sink, 1);
    }
    /// A sink delivered `n` records at once.
    pub fn sink_delivered_many(&self, sink: &str, n: u64) {
        self.sink_delivered.with_label_values(&[sink]).inc_by(n);
    }
    /// Change records waiting in the outbox for this host to publish.
    pub fn outbox_records(&self, n: u64) {
        self.outbox_records
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    /// A sink's delivery attempt failed.
    pub fn sink_failed(&self, sink: &str) {
        self.sink_failures.with_label_values(&[sink]).inc();
    }
    /// A sink gave up on a record.
    pub fn sink_dead_lettered(&self, sink: &str) {
        self.sink_dead_letters.with_label_values(&[sink]).inc();
    }
    /// Records a sink has yet to deliver.
    pub fn sink_lag(&self, sink: &str, lag: u64) {
        self.sink_lag
            .with_label_values(&[sink])
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
    }
    /// A quarantine.
    pub fn quarantined(&self, entity_type: &str, version: &str) {
        self.quarantined
            .with_label_values(&[entity_type, version])
            .inc();
    }
    /// Fold time of a batch.
    pub fn observe_fold(&self, d: Duration) {
        self.fold_seconds.observe(d.as_secs_f64());
    }
    /// Time one batch spent in a stage of the consume loop (`prepare`, `write`).
    pub fn observe_stage(&self, stage: &str, d: Duration) {
        self.stage_seconds
            .with_label_values(&[stage])
            .observe(d.as_secs_f64());
    }
    /// Lag of a partition.
    pub fn set_lag(&self, source: &str, partition: i32, lag: i64) {
        self.lag
            .with_label_values(&[source, &partition.to_string()])
            .set(lag);
    }
    /// A partition's batch up to `offset` was committed now.
    pub fn progressed(&self, source: &str, partition: i32, offset: i64) {
        let now = refold_types::clock::unix_ms() as f64 / 1000.0;
        let l = [source, &partition.to_string()];
        self.last_progress.with_label_values(&l).set(now);
        self.offset.with_label_values(&l).set(offset);
    }
    /// This host no longer reads the partition: its gauges go, so that
    /// a scrape does not show a revoked partition's last lag as current.
    pub fn forget_partition(&self, source: &str, partition: i32) {
        let l = [source, &partition.to_string()];
        let _ = self.lag.remove_label_values(&l);
        let _ = self.last_progress.remove_label_values(&l);
        let _ = self.offset.remove_label_values(&l);
    }
    /// Sandbox counters (cumulative per sandbox).
    pub fn sandbox(&self, entity_type: &str, version: &str, s: &CallStats) {
        let l = [entity_type, version];
        self.plugin_memory
            .with_label_values(&l)
            .set(s.peak_memory as i64);
        self.plugin_cpu
            .with_label_values(&l)
            .set(s.busy.as_secs_f64());
        self.plugin_calls.with_label_values(&l).set(s.calls as i64);
        self.plugin_log_dropped
            .with_label_values(&l)
            .set(s.log_lines_dropped as i64);
        self.plugin_deadlines
            .with_label_values(&l)
            .set(s.deadlines as i64);
    }
    /// A plugin activation.
    pub fn swapped(&self, entity_type: &str, mode: &str) {
        self.swaps.with_label_values(&[entity_type, mode]).inc();
    }
    /// A rebuild ended.
    pub fn rebuilt(&self, entity_type: &str, outcome: &str) {
        self.rebuilds
            .with_label_values(&[entity_type, outcome])
            .inc();
    }

    /// What an owned-state cache did in a batch (entities found, not
    /// found, dropped for room), and by how much what it holds changed.
    /// Changes, not totals: each lane has a cache of its own and the gauges
    /// are their sum.
    pub fn state_cache(&self, lookups: (u64, u64, u64), entries_change: i64, bytes_change: i64) {
        let (hits, misses, evictions) = lookups;
        self.cache_lookups.with_label_values(&["hit"]).inc_by(hits);
        self.cache_lookups
            .with_label_values(&["miss"])
            .inc_by(misses);
        self.cache_evictions.inc_by(evictions);
        self.cache_entries.add(entries_change);
        self.cache_bytes.add(bytes_change);
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    }

    #[test]
    fn produce_to_commit_counts_known_stamps_and_clamps_future_ones() {
        let m = Metrics::new();
        // 4 ms, 40 ms, a stamp 5 ms in the future, and an unknown one.
        m.observe_produce_to_commit(&[9_996, 9_960, 10_005, 0], 10_000);
        let text = m.render();
        assert_eq!(
            line(&text, "refold_produce_to_commit_seconds_count"),
            "refold_produce_to_commit_seconds_count 3"
        );
        assert!(
            text.contains("refold_produce_to_commit_seconds_bucket{le=\"0.001\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("refold_produce_to_commit_seconds_bucket{le=\"0.005\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("refold_produce_to_commit_seconds_bucket{le=\"0.04\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn batch_stages_are_timed_apart() {
        let m = Metrics::new();
        m.observe_stage("prepare", Duration::from_millis(3));
        m.observe_stage("write", Duration::from_millis(40));
        m.observe_stage("write", Duration::from_millis(60));
        let text = m.render();
        assert_eq!(
            line(&text, "refold_batch_stage_seconds_count{stage=\"prepare\"}"),
            "refold_batch_stage_seconds_count{stage=\"prepare\"} 1"
        );
        assert_eq!(
            line(&text, "refold_batch_stage_seconds_count{stage=\"write\"}"),
            "refold_batch_stage_seconds_count{stage=\"write\"} 2"
        );
        assert!(
            text.contains("refold_batch_stage_seconds_bucket{stage=\"write\",le=\"0.05\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn committed_counts_events() {
        let m = Metrics::new();
        m.committed(3);
        m.committed(4);
        assert_eq!(
            line(&m.render(), "refold_events_committed_total"),
            "refold_events_committed_total 7"
        );
    }
}

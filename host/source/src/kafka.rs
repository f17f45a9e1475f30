//! The cluster source: the configured topics, consumed by a Kafka consumer
//! group (rdkafka).
//!
//! - Wire format: the value is a CloudEvent in structured JSON and the key is
//!   the entity id; binary mode (`ce_*` headers, `data` as the value) is
//!   accepted too. Keys and headers are passed on; the pipeline parses both.
//! - Offsets are committed by hand (`enable.auto.commit=false`), exactly the
//!   checkpoints the consume loop hands to [`EventSource::commit`], which it
//!   does only after the batch is durable in the store. A crash in between
//!   redelivers the batch; the store's event-id dedup and position fence
//!   make the redelivery harmless.
//! - Rebalances: the consumer context keeps the set of assigned partitions,
//!   each with an epoch that changes whenever the partition is (re)assigned.
//!   A batch keeps only records whose partition still has the epoch it had
//!   when the record was read, so records of a revoked partition are never
//!   returned; commits for partitions no longer assigned are skipped (the
//!   new owner re-reads from the last committed offset and deduplicates).
//!   Rebalance callbacks run inside `recv`, so they never interrupt a batch
//!   being stored: that batch is finished, and its commit for a revoked
//!   partition is dropped.
//! - Back-pressure: the consumer is polled only inside `next_batch`, which
//!   returns at most `max` records within the linger time, so nothing is
//!   read while a batch is being stored; librdkafka's prefetch queue is
//!   bounded by `queued.max.messages.kbytes`.
//! - Lag: high watermarks come from librdkafka's statistics (no extra broker
//!   requests), positions from the records handed out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Headers, Message, Timestamp};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use refold_types::{Checkpoint, Origin};

use crate::config::KafkaConfig;
use crate::event_source::EventSource;
use crate::record::{PartitionLag, SourceRecord};

type Tp = (String, i32);

/// State shared between the consumer's callbacks and the source.
#[derive(Default)]
struct Shared {
    /// Assigned partitions and the epoch of their assignment.
    assigned: Mutex<HashMap<Tp, u64>>,
    next_epoch: AtomicU64,
    /// Revoked since the source last handed them out.
    revoked: Mutex<Vec<Tp>>,
    /// From the statistics: (high watermark, committed offset, app offset).
    offsets: Mutex<HashMap<Tp, (i64, i64, i64)>>,
}

/// The consumer context: rebalance hooks, statistics, logs.
struct Ctx {
    shared: Arc<Shared>,
}

impl ClientContext for Ctx {
    fn stats(&self, statistics: Statistics) {
        let mut offsets = self
            .shared
            .offsets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (topic, t) in statistics.topics {
            for (partition, p) in t.partitions {
                if partition >= 0 && p.hi_offset >= 0 {
                    offsets.insert(
                        (topic.clone(), partition),
                        (p.hi_offset, p.committed_offset, p.app_offset),
                    );
                }
            }
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, "{log_message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, "{reason}");
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let mut assigned = self
                    .shared
                    .assigned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let mut gone = self
                    .shared
                    .revoked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let revoked: Vec<String> = tpl
                    .elements()
                    .iter()
                    .map(|e| {
                        let tp = (e.topic().to_string(), e.partition());
                        assigned.remove(&tp);
                        gone.push(tp);
                        format!("{}#{}", e.topic(), e.partition())
                    })
                    .collect();
                tracing::info!(partitions = ?revoked, "Kafka partitions revoked");
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "Kafka rebalance error"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut assigned = self
                .shared
                .assigned
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut added = Vec::new();
            for e in tpl.elements() {
                let epoch = self.shared.next_epoch.fetch_add(1, Ordering::Relaxed);
                assigned.insert((e.topic().to_string(), e.partition()), epoch);
                added.push(format!("{}#{}", e.topic(), e.partition()));
            }
            tracing::info!(partitions = ?added, "Kafka partitions assigned");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "Kafka offset commit failed; the records will be redelivered and deduplicated");
        }
    }
}

/// The partitions a [`KafkaSource`] holds right now, as its rebalance
/// callbacks see them: for what else follows partition ownership (the
/// change outbox's publishers).
#[derive(Clone)]
pub struct Assignment(Arc<Shared>);

impl Assignment {
    /// (topic, partition) of every partition assigned, sorted.
    pub fn partitions(&self) -> Vec<(String, i32)> {
        let mut v: Vec<(String, i32)> = self
            .0
            .assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// Reads the configured topics as a member of the configured consumer group.
pub struct KafkaSource {
    consumer: Arc<StreamConsumer<Ctx>>,
    shared: Arc<Shared>,
    linger: Duration,
    /// Next offset per partition, after the records handed out.
    positions: HashMap<Tp, i64>,
}

/// A message timestamp in Unix ms, if the message has one.
fn timestamp_ms(t: Timestamp) -> Option<i64> {
    t.to_millis().filter(|&ms| ms > 0)
}

impl KafkaSource {
    /// Join the consumer group of `config` and subscribe to its topics.
    pub fn new(config: &KafkaConfig, linger: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(!config.topics.is_empty(), "[kafka] topics is empty");
        anyhow::ensure!(!config.group_id.is_empty(), "[kafka] group_id is empty");
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "2000")
            .set("statistics.interval.ms", "2000")
            .set("queued.max.messages.kbytes", "16384")
            .set("client.id", "refold");
        for (k, v) in &config.properties {
            cc.set(k, v);
        }
        let shared = Arc::new(Shared::default());
        let consumer: StreamConsumer<Ctx> = cc
            .create_with_context(Ctx {
                shared: shared.clone(),
            })
            .map_err(|e| {
                anyhow::anyhow!("creating the Kafka consumer for {}: {e}", config.brokers)
            })?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| anyhow::anyhow!("subscribing to {topics:?}: {e}"))?;
        tracing::info!(brokers = %config.brokers, group = %config.group_id, ?topics, "Kafka consumer subscribed");
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            shared,
            linger,
            positions: HashMap::new(),
        })
    }

    /// A handle on the partitions this source holds.
    pub fn assignment(&self) -> Assignment {
        Assignment(self.shared.clone())
    }

    fn assigned(&self) -> HashMap<Tp, u64> {
        self.shared
            .assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[async_trait]
impl EventSource for KafkaSource {
    async fn next_batch(&mut self, max: usize) -> anyhow::Result<Option<Vec<SourceRecord>>> {
        let deadline = tokio::time::Instant::now() + self.linger;
        let mut out: Vec<(u64, SourceRecord)> = Vec::new();
        while out.len() < max.max(1) {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let msg = match tokio::time::timeout(deadline - now, self.consumer.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    if let KafkaError::MessageConsumption(code) = &e {
                        tracing::warn!(error = %code, "Kafka consumer error");
                    } else {
                        tracing::warn!(error = %e, "Kafka consumer error");
                    }
                    tokio::time::sleep(
                        Duration::from_millis(50).min(deadline.saturating_duration_since(now)),
                    )
                    .await;
                    continue;
                }
                Ok(Ok(m)) => m,
            };
            let tp = (msg.topic().to_string(), msg.partition());
            // Read after the callbacks that `recv` ran: a record of a partition
            // that is not (or no longer) ours is dropped here.
            let Some(epoch) = self
                .shared
                .assigned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&tp)
                .copied()
            else {
                continue;
            };
            let headers = msg
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let offset = msg.offset();
            out.push((
                epoch,
                SourceRecord {
                    origin: Origin {
                        source: tp.0,
                        partition: tp.1,
                        offset,
                    },
                    next_offset: offset + 1,
                    key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    headers,
                    payload: msg.payload().unwrap_or_default().to_vec(),
                    produced_at_ms: timestamp_ms(msg.timestamp()),
                },
            ));
        }
        // A rebalance during the batch: drop what was read from partitions
        // revoked (or revoked and assigned again) meanwhile.
        let assigned = self.assigned();
        let before = out.len();
        let records: Vec<SourceRecord> = out
            .into_iter()
            .filter(|(epoch, r)| {
                assigned.get(&(r.origin.source.clone(), r.origin.partition)) == Some(epoch)
            })
            .map(|(_, r)| r)
            .collect();
        if records.len() < before {
            tracing::info!(
                dropped = before - records.len(),
                "dropped records of revoked Kafka partitions"
            );
        }
        self.positions.retain(|tp, _| assigned.contains_key(tp));
        for r in &records {
            let p = self
                .positions
                .entry((r.origin.source.clone(), r.origin.partition))
                .or_insert(0);
            *p = (*p).max(r.next_offset);
        }
        Ok(Some(records))
    }

    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> anyhow::Result<()> {
        let assigned = self.assigned();
        let mut tpl = TopicPartitionList::new();
        for c in checkpoints {
            if !assigned.contains_key(&(c.source.clone(), c.partition)) {
                tracing::debug!(topic = %c.source, partition = c.partition, "not committing an offset of a partition no longer assigned");
                continue;
            }
            tpl.add_partition_offset(&c.source, c.partition, Offset::Offset(c.offset))?;
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        let consumer = self.consumer.clone();
        match tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync)).await {
            Ok(Ok(())) => {}
            // Not fatal: the batch is stored; whoever reads these records
            // again finds them known and skips them.
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Kafka offset commit failed; records may be redelivered")
            }
            Err(e) => tracing::warn!(error = %e, "Kafka offset commit task failed"),
        }
        Ok(())
    }

    fn lag(&self) -> Vec<PartitionLag> {
        let offsets = self
            .shared
            .offsets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<PartitionLag> = self
            .assigned()
            .into_keys()
            .filter_map(|tp| {
                let (hi, committed, app) = offsets.get(&tp).copied()?;
                let pos = self
                    .positions
                    .get(&tp)
                    .copied()
                    .unwrap_or_else(|| committed.max(app));
                (pos >= 0).then(|| PartitionLag {
                    source: tp.0.clone(),
                    partition: tp.1,
                    lag: (hi - pos).max(0),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.source, a.partition).cmp(&(&b.source, b.partition)));
        out
    }

    fn revoked(&mut self) -> Vec<(String, i32)> {
        let mut revoked = std::mem::take(
            &mut *self
                .shared
                .revoked
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        revoked.sort();
        revoked.dedup();
        revoked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_unix_ms_or_zero() {
        assert_eq!(
            timestamp_ms(Timestamp::CreateTime(1_700_000_000_123)),
            Some(1_700_000_000_123)
        );
        assert_eq!(timestamp_ms(Timestamp::LogAppendTime(42)), Some(42));
        assert_eq!(timestamp_ms(Timestamp::NotAvailable), None);
        assert_eq!(timestamp_ms(Timestamp::CreateTime(-1)), None);
    }
}

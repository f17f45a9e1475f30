//! `[changes.kafka]`: the publisher of a cluster's change records. For
//! each source partition this host holds (and, on the holder of the first
//! topic's partition 0, for the records of no partition), it drains that
//! partition's outbox in Kafka transactions under a `transactional.id` of
//! the partition's own: whoever holds the partition next initialises the
//! same id, which aborts this host's open transaction and fences its
//! producer, so a host that lost a partition cannot publish for it any
//! more. Each transaction also writes a marker (what it published) to the
//! cursor topic; the next holder reads the last committed marker and
//! deletes what it names instead of publishing it again. The argument is
//! in `host/store-cassandra/CASSANDRA.md`, "The change stream of a cluster".

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::watch;

use refold_engine::config::ChangeTopicConfig;
use refold_engine::host::Host;
use refold_source::config::KafkaConfig;
use refold_source::kafka::Assignment;
use refold_store::{OutboxBatch, OutboxPartition, PublishedBatch};

type Producer = Arc<ThreadedProducer<DefaultProducerContext>>;

/// Longest a transaction call may block.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a partition whose publishing failed waits before it is
/// claimed again (with a new producer, which aborts what the old one had
/// open).
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Transactions one partition gets per round of the publisher.
const ROUND_TRANSACTIONS: usize = 4;
/// Metric label of this sink.
const SINK: &str = "kafka";
/// Its site in `/healthz`.
pub const HEALTH_SITE: &str = "sink:kafka";

/// What the publisher needs to know of the configuration.
pub struct Settings {
    pub topic: ChangeTopicConfig,
    pub brokers: String,
    /// Prefix of every `transactional.id`.
    pub txn_prefix: String,
    /// The source partition whose holder also publishes the records of no
    /// partition (the first topic's partition 0).
    pub control_owner: (String, i32),
}

impl Settings {
    pub fn of(topic: &ChangeTopicConfig, kafka: &KafkaConfig) -> Self {
        let mut topics = kafka.topics.clone();
        topics.sort();
        Settings {
            brokers: topic
                .brokers
                .clone()
                .unwrap_or_else(|| kafka.brokers.clone()),
            txn_prefix: topic
                .transactional_id_prefix
                .clone()
                .unwrap_or_else(|| format!("refold-changes-{}-", kafka.group_id)),
            control_owner: (topics.first().cloned().unwrap_or_default(), 0),
            topic: topic.clone(),
        }
    }
}

/// Publish until `stop`; an error is one that no retry mends (a client
/// that cannot be made from the configuration).
pub async fn run(
    host: Host,
    settings: Settings,
    assignment: Assignment,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .create()
        .context("creating the Kafka admin client of the change publisher")?;
    let mut p = Publisher {
        host,
        settings,
        admin,
        held: HashMap::new(),
        retry_at: HashMap::new(),
        failing: HashMap::new(),
        topics: std::sync::Mutex::new(HashSet::new()),
    };
    // Brokers that are down or refuse the topic now may not later: keep
    // trying, and say so in `/healthz` once it has lasted.
    let cursor = p.settings.topic.cursor_topic.clone();
    let started = Instant::now();
    while let Err(e) = p.ensure_topic(&cursor, true).await {
        let why = format!("creating the change cursor topic {cursor}: {e:#}");
        tracing::warn!("{why}; trying again");
        if started.elapsed() >= Duration::from_secs(p.settings.topic.stuck_after_seconds) {
            p.host.health.fault(HEALTH_SITE, why);
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_AFTER * 5) => {}
            r = stop.changed() => if r.is_err() || *stop.borrow() { return Ok(()) },
        }
    }
    let changes = p.host.changes.clone();
    loop {
        // Made before the drains, so that a commit during them wakes the
        // wait below instead of leaving its records for the next tick.
        let notified = changes.notified();
        p.reconcile(&assignment).await;
        // Every partition at once: each has its own producer, and a
        // transaction's commit is a round trip that one partition after
        // another would add up.
        let parts: Vec<OutboxPartition> = p.held.keys().cloned().collect();
        let drained = futures::future::join_all(parts.iter().map(|part| p.drain(part))).await;
        let mut more = false;
        for (part, r) in parts.into_iter().zip(drained) {
            match r {
                Ok(left) => {
                    more |= left;
                    p.failing.remove(&part);
                }
                Err(e) => {
                    tracing::warn!(partition = %part.name(), error = %format!("{e:#}"), "publishing change records failed; the partition is claimed again");
                    p.host.metrics.sink_failed(SINK);
                    p.failed(&part, &e);
                    p.give_up(&part);
                    p.retry_at.insert(part, Instant::now() + RETRY_AFTER);
                }
            }
        }
        p.report_health();
        p.host.metrics.outbox_records(p.host.storage.outbox_depth());
        if more && !*stop.borrow() {
            continue;
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            r = stop.changed() => if r.is_err() || *stop.borrow() { break },
        }
    }
    let parts: Vec<OutboxPartition> = p.held.keys().cloned().collect();
    for part in parts {
        p.give_up(&part);
    }
    Ok(())
}

struct Publisher {
    host: Host,
    settings: Settings,
    admin: AdminClient<DefaultClientContext>,
    /// Claimed partitions and their producers.
    held: HashMap<OutboxPartition, Producer>,
    /// Partitions not to claim again before then.
    retry_at: HashMap<OutboxPartition, Instant>,
    /// Partitions whose last claim or drain failed: since when they have
    /// been failing, and the last error.
    failing: HashMap<OutboxPartition, (Instant, String)>,
    /// Topics known to exist.
    topics: std::sync::Mutex<HashSet<String>>,
}

impl Publisher {
    /// Claim the partitions this host now holds, give up the others.
    async fn reconcile(&mut self, assignment: &Assignment) {
        let assigned = assignment.partitions();
        let mut wanted: BTreeSet<OutboxPartition> = assigned
            .iter()
            .map(|(t, p)| OutboxPartition {
                source: t.clone(),
                partition: *p,
            })
            .collect();
        if assigned.contains(&self.settings.control_owner) {
            wanted.insert(OutboxPartition::control());
        }
        let gone: Vec<OutboxPartition> = self
            .held
            .keys()
            .filter(|p| !wanted.contains(*p))
            .cloned()
            .collect();
        for part in gone {
            tracing::info!(partition = %part.name(), "no longer publishing this partition's change records");
            self.give_up(&part);
        }
        // Another host's to publish (and to report) now.
        self.failing.retain(|p, _| wanted.contains(p));
        let now = Instant::now();
        let new: Vec<OutboxPartition> = wanted
            .into_iter()
            .filter(|p| !self.held.contains_key(p))
            .filter(|p| self.retry_at.get(p).is_none_or(|t| *t <= now))
            .collect();
        if new.is_empty() {
            return;
        }
        match self.claim(&new).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "claiming change outbox partitions failed; trying again");
                for part in new {
                    self.failed(&part, &e);
                    self.give_up(&part);
                    self.retry_at.insert(part, now + RETRY_AFTER);
                }
            }
        }
    }

    /// Note that `part` failed with `e` (keeping when it began to).
    fn failed(&mut self, part: &OutboxPartition, e: &anyhow::Error) {
        let why = format!("{e:#}");
        self.failing
            .entry(part.clone())
            .and_modify(|f| f.1 = why.clone())
            .or_insert_with(|| (Instant::now(), why));
    }

    /// `/healthz` unhealthy while a partition has been failing for longer
    /// than `stuck_after_seconds`: its records wait in the outbox, and only
    /// an operator can mend what a second of retrying every second did not
    /// (brokers gone, a topic refused, credentials).
    fn report_health(&self) {
        let limit = Duration::from_secs(self.settings.topic.stuck_after_seconds);
        let stuck = self
            .failing
            .iter()
            .filter(|(_, (since, _))| since.elapsed() >= limit)
            .max_by_key(|(_, (since, _))| since.elapsed());
        match stuck {
            Some((part, (since, why))) => self.host.health.fault(
                HEALTH_SITE,
                format!(
                    "publishing the change records of partition {} has failed for {} s \
                     ({} partition(s) failing): {why}",
                    part.name(),
                    since.elapsed().as_secs(),
                    self.failing.len()
                ),
            ),
            None => self.host.health.clear(HEALTH_SITE),
        }
    }

    fn give_up(&mut self, part: &OutboxPartition) {
        self.held.remove(part);
        self.host.storage.outbox_release(part);
    }

    /// Take over `parts`: a producer each, initialised (fencing the last
    /// holder's), then the last committed markers read, then the store told.
    async fn claim(&mut self, parts: &[OutboxPartition]) -> anyhow::Result<()> {
        let mut producers = Vec::new();
        for part in parts {
            let txn_id = format!("{}{}", self.settings.txn_prefix, part.name());
            let mut cc = ClientConfig::new();
            cc.set("bootstrap.servers", &self.settings.brokers)
                .set("transactional.id", &txn_id)
                .set("enable.idempotence", "true")
                // A host that dies with a transaction open holds back
                // read_committed readers of its topics until this passes.
                .set("transaction.timeout.ms", "10000")
                .set("linger.ms", "5")
                .set("client.id", "refold-changes");
            for (k, v) in &self.settings.topic.properties {
                cc.set(k, v);
            }
            let producer: ThreadedProducer<DefaultProducerContext> = cc
                .create()
                .with_context(|| format!("creating the producer {txn_id}"))?;
            let producer = Arc::new(producer);
            let pr = producer.clone();
            tokio::task::spawn_blocking(move || pr.init_transactions(TXN_TIMEOUT))
                .await?
                .with_context(|| format!("initialising transactions of {txn_id}"))?;
            producers.push((part.clone(), producer));
        }
        let markers = {
            let brokers = self.settings.brokers.clone();
            let topic = self.settings.topic.cursor_topic.clone();
            tokio::task::spawn_blocking(move || read_markers(&brokers, &topic)).await??
        };
        for (part, producer) in producers {
            let published = markers.get(&part.name()).cloned().unwrap_or_default();
            self.host
                .storage
                .outbox_claim(&part, &published)
                .await
                .with_context(|| format!("claiming change outbox partition {}", part.name()))?;
            tracing::info!(partition = %part.name(), skipped = published.len(), "publishing this partition's change records");
            self.retry_at.remove(&part);
            self.held.insert(part, producer);
        }
        Ok(())
    }

    /// Publish what the partition's outbox holds, a transaction at a time,
    /// at most `ROUND_TRANSACTIONS` of them, so that a busy partition does
    /// not hold back the others. Returns whether records are left.
    async fn drain(&self, part: &OutboxPartition) -> anyhow::Result<bool> {
        let Some(producer) = self.held.get(part).cloned() else {
            return Ok(false);
        };
        for _ in 0..ROUND_TRANSACTIONS {
            let batches = self
                .host
                .storage
                .outbox_next(part, self.settings.topic.max_transaction_records)
                .await?;
            if batches.is_empty() {
                return Ok(false);
            }
            let mut messages = Vec::new();
            for b in &batches {
                for r in &b.records {
                    let topic = self.settings.topic.topic_of(&r.key.entity_type);
                    if !self.topic_known(&topic) {
                        self.ensure_topic(&topic, false).await?;
                    }
                    messages.push((
                        topic,
                        r.key.entity_id.clone(),
                        r.id.clone(),
                        r.event.clone(),
                    ));
                }
            }
            let published: Vec<PublishedBatch> =
                batches.iter().map(OutboxBatch::published).collect();
            let marker = (
                self.settings.topic.cursor_topic.clone(),
                part.name(),
                serde_json::to_string(&published)?,
            );
            let n = messages.len() as u64;
            let pr = producer.clone();
            tokio::task::spawn_blocking(move || transact(&pr, &messages, &marker)).await??;
            self.host.storage.outbox_done(part, &published).await?;
            self.host.metrics.sink_delivered_many(SINK, n);
        }
        Ok(true)
    }

    /// Create `topic` unless it exists (the cursor topic compacted, with
    /// one partition).
    fn topic_known(&self, topic: &str) -> bool {
        self.topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(topic)
    }

    async fn ensure_topic(&self, topic: &str, cursor: bool) -> anyhow::Result<()> {
        let t = &self.settings.topic;
        let new = if cursor {
            NewTopic::new(topic, 1, TopicReplication::Fixed(t.replication_factor))
                .set("cleanup.policy", "compact")
                .set("segment.ms", "600000")
        } else {
            NewTopic::new(
                topic,
                t.partitions,
                TopicReplication::Fixed(t.replication_factor),
            )
        };
        let results = self
            .admin
            .create_topics(
                &[new],
                &AdminOptions::new().operation_timeout(Some(TXN_TIMEOUT)),
            )
            .await?;
        for r in results {
            match r {
                Ok(_) => tracing::info!(topic, "created a change topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
            }
        }
        self.topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_string());
        Ok(())
    }
}

/// One transaction: the records, then the marker naming their batches.
fn transact(
    producer: &ThreadedProducer<DefaultProducerContext>,
    messages: &[(String, String, String, String)],
    marker: &(String, String, String),
) -> anyhow::Result<()> {
    producer.begin_transaction()?;
    let sent = (|| {
        for (topic, key, id, payload) in messages {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "content-type",
                    value: Some("application/cloudevents+json; charset=UTF-8"),
                })
                .insert(Header {
                    key: "ce_id",
                    value: Some(id.as_str()),
                });
            send(
                producer,
                BaseRecord::to(topic)
                    .key(key.as_str())
                    .payload(payload.as_str())
                    .headers(headers),
            )?;
        }
        send(
            producer,
            BaseRecord::to(&marker.0)
                .key(marker.1.as_str())
                .payload(marker.2.as_str()),
        )?;
        producer.commit_transaction(TXN_TIMEOUT)?;
        Ok::<(), anyhow::Error>(())
    })();
    if let Err(e) = sent {
        // Best effort: a fenced producer cannot abort, and the next
        // holder's initialisation aborts it anyway.
        let _ = producer.abort_transaction(TXN_TIMEOUT);
        return Err(e);
    }
    Ok(())
}

/// Send one record, waiting while the producer's queue is full.
fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    mut record: BaseRecord<'_, str, str>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + TXN_TIMEOUT;
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                if Instant::now() < deadline =>
            {
                record = r;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// The last committed marker of every publisher, by partition name, from
/// the (one-partition) cursor topic read to its end with read_committed.
fn read_markers(
    brokers: &str,
    topic: &str,
) -> anyhow::Result<HashMap<String, Vec<PublishedBatch>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "refold-changes-markers")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .create()
        .context("creating the change cursor reader")?;
    let (_, high) = consumer
        .fetch_watermarks(topic, 0, TXN_TIMEOUT)
        .with_context(|| format!("reading the end of {topic}"))?;
    let mut out = HashMap::new();
    if high <= 0 {
        return Ok(out);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    // Open transactions of other publishers hold a read_committed reader
    // back until they end (at most `transaction.timeout.ms`).
    let deadline = Instant::now() + TXN_TIMEOUT;
    loop {
        let at = consumer
            .position()?
            .find_partition(topic, 0)
            .and_then(|p| p.offset().to_raw())
            .unwrap_or(0);
        if at >= high {
            return Ok(out);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the change cursor topic {topic} was not read to its end (offset {at} of {high}) in {TXN_TIMEOUT:?}"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let (Some(key), Some(value)) = (m.key(), m.payload()) else {
                    continue;
                };
                match serde_json::from_slice::<Vec<PublishedBatch>>(value) {
                    Ok(v) => {
                        out.insert(String::from_utf8_lossy(key).into_owned(), v);
                    }
                    Err(e) => tracing::warn!(error = %e, "skipping an unreadable change marker"),
                }
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
}

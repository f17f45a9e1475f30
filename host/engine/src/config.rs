//! The engine's configuration: `[store]`, `[plugins]`, `[engine]`, and
//! the sections of the crates it assembles (`[source]`, `[kafka]`,
//! `[cassandra]`), gathered in [`HostConfig`]. The command line reads the
//! file and the environment; the engine only receives the result.

use std::collections::HashMap;
use std::path::PathBuf;

use refold_runtime::Limits;
use refold_source::config::{KafkaConfig, SourceConfig};
use refold_store_cassandra::CassandraConfig;
use serde::{Deserialize, Serialize};

/// What the assembled host needs to know.
#[derive(Debug, Clone, Default)]
pub struct HostConfig {
    /// Where records come from.
    pub source: SourceConfig,
    /// Kafka settings (source kind `kafka`).
    pub kafka: KafkaConfig,
    /// Where state lives.
    pub store: StoreConfig,
    /// Cassandra settings (store kind `cassandra`).
    pub cassandra: CassandraConfig,
    /// Plugins to load and their limits.
    pub plugins: PluginsConfig,
    /// Pipeline tuning.
    pub engine: EngineConfig,
    /// The change feed and its sinks.
    pub changes: ChangesConfig,
}

/// `[changes]`: the change records committed batches make (one per entity
/// whose position advanced, a CloudEvent), and where they go besides the
/// store's feed (`GET /v1/changes`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChangesConfig {
    /// Make change records at all.
    pub enabled: bool,
    /// Include each entity's state before the change (`data.previous`).
    pub previous: bool,
    /// Include the ids of the events applied (`data.event_ids`).
    pub event_ids: bool,
    /// Records older than this many hours are pruned from the feed (the
    /// newest is always kept). 0 keeps them forever.
    pub retention_hours: u64,
    /// Also append every record, in feed order, to this JSONL file. The
    /// file is its own cursor: after a restart (or a crash mid-line) it is
    /// continued after its last complete record.
    pub jsonl: Option<PathBuf>,
    /// Longest wait of a long poll (`GET /v1/changes?wait=`), in seconds.
    pub max_wait_seconds: u64,
    /// Webhook sinks: every record POSTed, in feed order.
    pub webhooks: Vec<WebhookConfig>,
    /// Back-pressure: when a sink is more than this many records behind
    /// the feed, ingest waits for it (and `/healthz` says so). 0, the
    /// default, never holds ingest back: a stuck sink only lags, and the
    /// feed keeps its records for `retention_hours`.
    pub backpressure_records: u64,
    /// `[changes.kafka]`: publish every record to Kafka (cluster mode,
    /// where the store keeps no feed). Without it a cluster makes no
    /// records at all, and pays nothing for them.
    pub kafka: Option<ChangeTopicConfig>,
}

/// `[changes.kafka]`: each source partition's holder publishes the records
/// of that partition's batches from the store's outbox, in Kafka
/// transactions (`transactional.id` per source partition, so that the
/// next holder fences the last one), with a marker of what each
/// transaction published on `cursor_topic`. Read the topics with
/// `isolation.level = read_committed` to see each record once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChangeTopicConfig {
    /// Topic of an entity type's records, `{entity_type}` standing for it
    /// (characters Kafka refuses in a topic name become `_`). Records are
    /// keyed by entity id, so a topic can be compacted.
    pub topic: String,
    /// Compacted topic of the publishers' markers (one partition).
    pub cursor_topic: String,
    /// Brokers (default: `[kafka] brokers`).
    pub brokers: Option<String>,
    /// Prefix of the publishers' `transactional.id`s, one per source
    /// partition (default: `refold-changes-<kafka.group_id>-`).
    pub transactional_id_prefix: Option<String>,
    /// Records per Kafka transaction (whole batches, so at least one).
    pub max_transaction_records: usize,
    /// Partitions of a topic refold creates (-1: the broker's default).
    pub partitions: i32,
    /// Replication factor of a topic refold creates (-1: the broker's default).
    pub replication_factor: i32,
    /// More librdkafka producer properties.
    pub properties: HashMap<String, String>,
    /// A partition whose publishing has failed for this long (the outbox
    /// keeps its records; the publisher keeps retrying) makes `/healthz`
    /// unhealthy with the reason.
    pub stuck_after_seconds: u64,
}

impl Default for ChangeTopicConfig {
    fn default() -> Self {
        ChangeTopicConfig {
            topic: "refold.changes.{entity_type}".into(),
            cursor_topic: "refold.changes.cursor".into(),
            brokers: None,
            transactional_id_prefix: None,
            max_transaction_records: 5_000,
            partitions: -1,
            replication_factor: -1,
            properties: HashMap::new(),
            stuck_after_seconds: 60,
        }
    }
}

/// Kafka's longest topic name.
const MAX_TOPIC_NAME: usize = 249;

/// Whether Kafka takes `c` in a topic name.
fn topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Why Kafka would refuse `name` as a topic name, if it would.
fn topic_name_fault(name: &str) -> Option<String> {
    if name.is_empty() || name == "." || name == ".." {
        return Some("is not a topic name".into());
    }
    if name.len() > MAX_TOPIC_NAME {
        return Some(format!(
            "is {} characters long, over Kafka's {MAX_TOPIC_NAME}",
            name.len()
        ));
    }
    name.chars()
        .find(|c| !topic_char(*c))
        .map(|c| format!("has {c:?}; a topic name is made of [A-Za-z0-9._-]"))
}

impl ChangeTopicConfig {
    /// The topic of `entity_type`'s records.
    pub fn topic_of(&self, entity_type: &str) -> String {
        let clean: String = entity_type
            .chars()
            .map(|c| if topic_char(c) { c } else { '_' })
            .collect();
        self.topic.replace("{entity_type}", &clean)
    }
}

impl ChangesConfig {
    /// Whether batches make change records on `store`: a cluster store
    /// keeps none unless they are published to Kafka.
    pub fn recorded_on(&self, store: StoreKind) -> bool {
        self.enabled && (store != StoreKind::Cassandra || self.kafka.is_some())
    }

    /// Refuse `[changes.kafka]` where it cannot work: it publishes a
    /// cluster store's outbox by Kafka partition ownership.
    pub fn validate_for(&self, store: StoreKind, kafka_source: bool) -> anyhow::Result<()> {
        self.validate()?;
        if let Some(k) = &self.kafka {
            anyhow::ensure!(
                store == StoreKind::Cassandra && kafka_source,
                "changes.kafka needs store.kind = \"cassandra\" and source.kind = \"kafka\" \
                 (an embedded store serves its records from GET /v1/changes and the JSONL and webhook sinks)"
            );
            anyhow::ensure!(
                !k.topic.is_empty() && !k.cursor_topic.is_empty() && k.topic != k.cursor_topic,
                "changes.kafka: topic and cursor_topic must be two non-empty topic names"
            );
            if let Some(why) = topic_name_fault(&k.cursor_topic) {
                anyhow::bail!("changes.kafka.cursor_topic {:?} {why}", k.cursor_topic);
            }
            // Checked with the longest entity type there can be (128
            // characters), so that no plugin uploaded later stalls its
            // records on a name Kafka refuses.
            let longest = k.topic.replace("{entity_type}", &"x".repeat(128));
            if let Some(why) = topic_name_fault(&longest) {
                anyhow::bail!(
                    "changes.kafka.topic {:?}, with the longest entity type (128 characters), {why}",
                    k.topic
                );
            }
            anyhow::ensure!(
                k.max_transaction_records > 0,
                "changes.kafka.max_transaction_records must be at least 1"
            );
        }
        Ok(())
    }

    /// Refuse what cannot work, before anything starts: a webhook without
    /// a URL, or two webhooks of one name (they would share a cursor file
    /// and each skip what the other delivered).
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut names = std::collections::HashSet::new();
        for w in &self.webhooks {
            anyhow::ensure!(
                !w.url.is_empty(),
                "changes.webhooks: the webhook {:?} has no url",
                w.name
            );
            anyhow::ensure!(
                names.insert(w.name.as_str()),
                "changes.webhooks: two webhooks are named {:?}; each needs its own name",
                w.name
            );
        }
        Ok(())
    }
}

/// `[[changes.webhooks]]`: POST each change record as a structured
/// CloudEvent (`application/cloudevents+json`) with an `Idempotency-Key`
/// equal to its id, in feed order (so each entity's in position order),
/// one at a time. A record refused (not 2xx) or unanswered is retried with
/// exponential backoff; after `max_attempts` it becomes a sink dead letter
/// (a line of `<cursor_file>.dead.jsonl`, with the last error) and the
/// sink moves on. The sink lags instead of holding ingest back: the feed
/// keeps its records for `retention_hours`, and `/healthz` reports a sink
/// stuck on one record beyond `stuck_after_seconds`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Name, for metrics, logs and the default cursor file.
    pub name: String,
    /// Where to POST.
    pub url: String,
    /// `Authorization: Bearer` value, if any.
    pub token: Option<String>,
    /// Attempts per record before it is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay, in milliseconds (doubling, at most 30 s).
    pub backoff_ms: u64,
    /// Time one POST may take, in milliseconds.
    pub timeout_ms: u64,
    /// A record failing for longer than this makes `/healthz` unhealthy.
    pub stuck_after_seconds: u64,
    /// Where the sink keeps the cursor of the last record delivered
    /// (default: beside the store, `<store.path>.webhook-<name>.cursor`).
    pub cursor_file: Option<PathBuf>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            name: "webhook".into(),
            url: String::new(),
            token: None,
            max_attempts: 8,
            backoff_ms: 200,
            timeout_ms: 10_000,
            stuck_after_seconds: 60,
            cursor_file: None,
        }
    }
}

impl Default for ChangesConfig {
    fn default() -> Self {
        ChangesConfig {
            enabled: true,
            previous: false,
            event_ids: false,
            retention_hours: 168,
            jsonl: None,
            max_wait_seconds: 30,
            webhooks: Vec::new(),
            backpressure_records: 0,
            kafka: None,
        }
    }
}

/// Kinds of store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Embedded SQLite.
    #[default]
    Sqlite,
    /// Apache Cassandra (or ScyllaDB).
    Cassandra,
}

/// `[store]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite` or `cassandra`.
    pub kind: StoreKind,
    /// SQLite file.
    pub path: PathBuf,
    /// Largest size the SQLite file may grow to, in bytes (0: no cap). At
    /// the cap, writes fail like on a full disk: ingest waits, `/healthz`
    /// says why, queries go on.
    pub max_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Sqlite,
            path: "refold-data/refold.db".into(),
            max_bytes: 0,
        }
    }
}

/// `[plugins]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    /// Watched directory: a `.wasm` dropped here is loaded.
    pub dir: Option<PathBuf>,
    /// Components loaded at start.
    pub files: Vec<PathBuf>,
    /// Default limits.
    pub limits: Limits,
    /// Limits per entity type, replacing the defaults for that type.
    pub entity_limits: HashMap<String, Limits>,
    /// Debounce of the watched directory, in milliseconds.
    pub debounce_ms: u64,
    /// Largest component accepted, by the admin API and from the watched
    /// directory, in bytes.
    pub max_upload_bytes: usize,
    /// Where compiled components are kept by digest, so that a restart or
    /// a swap to a known version loads instead of compiling (default:
    /// `$XDG_CACHE_HOME/refold/compiled` or `~/.cache/refold/compiled`;
    /// `""` turns it off).
    pub compile_cache_dir: Option<PathBuf>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: None,
            files: vec![],
            limits: Limits::default(),
            entity_limits: HashMap::new(),
            debounce_ms: 200,
            max_upload_bytes: 64 << 20,
            compile_cache_dir: refold_runtime::compile_cache::default_dir(),
        }
    }
}

impl PluginsConfig {
    /// The engine plugins are compiled by, with the configured cache.
    pub fn engine(&self) -> anyhow::Result<refold_runtime::Engine> {
        let engine = refold_runtime::Engine::new()?;
        Ok(match &self.compile_cache_dir {
            Some(d) if !d.as_os_str().is_empty() => engine.with_compile_cache(d),
            _ => engine,
        })
    }

    /// Compile and validate component bytes under these limits: `describe()`
    /// runs under the defaults, the plugin then gets its entity type's.
    pub fn load_plugin(
        &self,
        engine: &refold_runtime::Engine,
        bytes: &[u8],
    ) -> Result<std::sync::Arc<refold_runtime::Plugin>, refold_runtime::LoadError> {
        let plugin = refold_runtime::Plugin::load(engine, bytes, self.limits)?;
        let limits = self.limits_for(&plugin.info.entity_type);
        if limits == plugin.limits {
            return Ok(plugin);
        }
        Ok(plugin.with_limits(limits))
    }

    /// Limits for an entity type.
    pub fn limits_for(&self, entity_type: &str) -> Limits {
        self.entity_limits
            .get(entity_type)
            .copied()
            .unwrap_or(self.limits)
    }
}

/// `[engine]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Largest record accepted at all, in bytes.
    pub max_record_bytes: usize,
    /// A partition with lag and no progress for this long is unhealthy.
    pub stall_seconds: u64,
    /// Chunks of 64 entities a rebuild works on at once (each reads its
    /// histories, folds on a blocking thread, then commits).
    pub rebuild_workers: usize,
    /// Entity types of one batch folded at once, each on its own thread
    /// (0: one per core).
    pub fold_threads: usize,
    /// Time one batch may spend folding, in milliseconds. Entities not
    /// reached by then have their events stored and are folded by a later
    /// batch or query, so a slow entity type cannot hold the others back
    /// for longer than this (plus one plugin deadline).
    pub batch_fold_budget_ms: u64,
    /// Read-model operations one batch may produce in all (each costs host
    /// memory until the commit). Entities beyond it are deferred like those
    /// beyond the time budget.
    pub max_batch_projection_ops: usize,
    /// Bytes of read-model output one batch may produce in all.
    pub max_batch_projection_bytes: usize,
    /// Bytes the owned-state cache may hold: the records of the entities
    /// the consume loop writes, and their event-id hashes, kept between
    /// batches so that the steady state reads nothing per entity (least
    /// recently used out first; 0 turns it off).
    pub state_cache_bytes: usize,
    /// Lanes the consume loop runs partitions on (0: one per core; at most
    /// [`MAX_LANES`]). Each lane has its own sandboxes, one queued batch
    /// and an equal share of the state cache;
    /// a partition (for files: a source, whose files follow each other)
    /// always goes to the same lane, so its order is kept.
    pub lanes: usize,
    /// Free space below which `/healthz` warns (503, with the reason)
    /// while ingest goes on, in bytes; 0 turns the check off.
    pub min_free_disk_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_record_bytes: refold_types::event::DEFAULT_MAX_RECORD_BYTES,
            stall_seconds: 30,
            rebuild_workers: 4,
            fold_threads: 0,
            batch_fold_budget_ms: 2_000,
            max_batch_projection_ops: 200_000,
            max_batch_projection_bytes: 64 << 20,
            state_cache_bytes: 256 << 20,
            lanes: 0,
            min_free_disk_bytes: 256 << 20,
        }
    }
}

/// Most lanes one host runs: each costs a pipeline with its sandboxes and a
/// queued batch, so a mistyped `lanes` must not multiply them without end.
pub const MAX_LANES: usize = 64;

impl EngineConfig {
    /// The lanes to run: `lanes`, or one per core; at most [`MAX_LANES`].
    pub fn lane_count(&self) -> usize {
        let n = if self.lanes > 0 {
            self.lanes
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        };
        n.min(MAX_LANES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_without_url_or_with_a_shared_name_are_refused() {
        let hook = |name: &str, url: &str| WebhookConfig {
            name: name.into(),
            url: url.into(),
            ..Default::default()
        };
        let mut c = ChangesConfig::default();
        assert!(c.validate().is_ok());
        c.webhooks = vec![hook("a", "http://x/"), hook("b", "")];
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("\"b\" has no url")
        );
        c.webhooks = vec![hook("a", "http://x/"), hook("a", "http://y/")];
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("two webhooks")
        );
    }

    #[test]
    fn a_change_topic_needs_a_cluster_and_a_cluster_records_only_with_one() {
        let mut c = ChangesConfig::default();
        assert!(c.recorded_on(StoreKind::Sqlite));
        assert!(!c.recorded_on(StoreKind::Cassandra));
        c.kafka = Some(ChangeTopicConfig::default());
        assert!(c.recorded_on(StoreKind::Cassandra));
        assert!(c.validate_for(StoreKind::Cassandra, true).is_ok());
        let e = c.validate_for(StoreKind::Sqlite, false).unwrap_err();
        assert!(e.to_string().contains("needs store.kind"), "{e}");
        c.kafka.as_mut().unwrap().cursor_topic = "refold.changes.{entity_type}".into();
        assert!(c.validate_for(StoreKind::Cassandra, true).is_err());
        let k = ChangeTopicConfig::default();
        assert_eq!(k.topic_of("order line/2"), "refold.changes.order_line_2");
        // Names Kafka would refuse, refused before anything starts rather
        // than retried forever by the publisher.
        for (topic, cursor, why) in [
            ("refold.changes.{entity_type}", "cursor topic", "has ' '"),
            ("refold.changes.{entity_type}", "..", "is not a topic name"),
            ("changes/{entity_type}", "cursor", "has '/'"),
            (
                &*format!("{}{{entity_type}}", "t".repeat(122)),
                "cursor",
                "over Kafka's 249",
            ),
        ] {
            let k = c.kafka.as_mut().unwrap();
            (k.topic, k.cursor_topic) = (topic.to_string(), cursor.to_string());
            let e = c.validate_for(StoreKind::Cassandra, true).unwrap_err();
            assert!(e.to_string().contains(why), "{topic} {cursor}: {e}");
        }
        let k = c.kafka.as_mut().unwrap();
        (k.topic, k.cursor_topic) = (format!("{}{{entity_type}}", "t".repeat(121)), "c".into());
        assert!(c.validate_for(StoreKind::Cassandra, true).is_ok());
        c.enabled = false;
        assert!(!c.recorded_on(StoreKind::Sqlite));
    }

    #[test]
    fn lanes_default_to_the_cores_and_are_bounded() {
        let mut e = EngineConfig::default();
        assert!(e.lane_count() >= 1);
        e.lanes = 3;
        assert_eq!(e.lane_count(), 3);
        e.lanes = 100_000;
        assert_eq!(e.lane_count(), MAX_LANES);
    }
}

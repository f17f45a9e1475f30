//! The sources' configuration: `[source]` and `[kafka]`.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Kinds of source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// JSONL files (embedded mode).
    #[default]
    Jsonl,
    /// Kafka topics (cluster mode).
    Kafka,
}

/// `[source]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    /// `jsonl` or `kafka`.
    pub kind: SourceKind,
    /// JSONL files, one partition each.
    pub paths: Vec<PathBuf>,
    /// Keep reading files as they grow.
    pub follow: bool,
    /// Largest batch, in records (per lane: a read of a source whose
    /// partitions are independent takes up to this many per lane).
    pub batch_size: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    pub linger_ms: u64,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            kind: SourceKind::Jsonl,
            paths: vec![],
            follow: true,
            batch_size: 500,
            linger_ms: 50,
        }
    }
}

/// `[kafka]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group id.
    pub group_id: String,
    /// Extra librdkafka properties.
    pub properties: HashMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topics: vec!["refold-events".into()],
            group_id: "refold".into(),
            properties: HashMap::new(),
        }
    }
}

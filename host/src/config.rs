//! Configuration: a TOML file, every key overridable by an environment
//! variable `REFOLD_<SECTION>__<KEY>` (e.g. `REFOLD_HTTP__LISTEN`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::runtime::Limits;

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where records come from.
    pub source: SourceConfig,
    /// Kafka settings (source kind `kafka`).
    pub kafka: KafkaConfig,
    /// Where state lives.
    pub store: StoreConfig,
    /// Cassandra settings (store kind `cassandra`).
    pub cassandra: CassandraConfig,
    /// The HTTP API.
    pub http: HttpConfig,
    /// Plugins to load and their limits.
    pub plugins: PluginsConfig,
    /// The admin API.
    pub admin: AdminConfig,
    /// Pipeline tuning.
    pub engine: EngineConfig,
}

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
    /// Largest batch, in records.
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
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Sqlite,
            path: "refold-data/refold.db".into(),
        }
    }
}

/// `[cassandra]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CassandraConfig {
    /// Contact points `host:port`.
    pub nodes: Vec<String>,
    /// Keyspace (created if missing).
    pub keyspace: String,
    /// Replication factor of the keyspace (SimpleStrategy) when created.
    pub replication_factor: u32,
    /// Full replication map, overriding `replication_factor`, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'dc1': 3}`.
    pub replication: Option<String>,
    /// Largest number of concurrent writes.
    pub concurrency: usize,
    /// Events per partition bucket of an entity's history.
    pub bucket_size: u64,
}

impl Default for CassandraConfig {
    fn default() -> Self {
        CassandraConfig {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "refold".into(),
            replication_factor: 1,
            replication: None,
            concurrency: 64,
            bucket_size: 1000,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address; empty disables the API.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".into(),
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
    /// Largest component accepted, in bytes, whichever way it comes in
    /// (admin upload or watched directory). Missing: 64 MiB (the struct's
    /// `serde(default)` takes it from `Default`).
    pub max_upload_bytes: u64,
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
        }
    }
}

impl PluginsConfig {
    /// Limits for an entity type.
    pub fn limits_for(&self, entity_type: &str) -> Limits {
        self.entity_limits
            .get(entity_type)
            .copied()
            .unwrap_or(self.limits)
    }
}

/// `[admin]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token for the admin API. Without one (and without
    /// `disable_auth`), admin requests are refused.
    pub token: Option<String>,
    /// Accept admin requests without a token. Only ever set explicitly.
    pub disable_auth: bool,
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_record_bytes: 1 << 20,
            stall_seconds: 30,
            rebuild_workers: 4,
        }
    }
}

impl Config {
    /// Load from a file (optional) and the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            anyhow::ensure!(f.exists(), "config file {} does not exist", f.display());
            fig = fig.merge(Toml::file(f));
        }
        // Only `REFOLD_<SECTION>__<KEY>` variables are configuration; others
        // with the prefix (REFOLD_LOG, test and deploy script settings) are not.
        fig = fig.merge(
            Env::prefixed("REFOLD_")
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        );
        fig.extract().context("reading the configuration")
    }
}

#[cfg(test)]
// figment's Jail returns its own large error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "r.toml",
                "[http]\nlisten = \"1.2.3.4:1\"\n[store]\npath = \"x.db\"\n",
            )?;
            jail.set_env("REFOLD_HTTP__LISTEN", "127.0.0.1:9999");
            jail.set_env("REFOLD_PLUGINS__LIMITS__CPU_MS", "7");
            jail.set_env("REFOLD_LOG", "debug");
            let c = Config::load(Some(Path::new("r.toml"))).expect("loads");
            assert_eq!(c.http.listen, "127.0.0.1:9999");
            assert_eq!(c.store.path, PathBuf::from("x.db"));
            assert_eq!(c.plugins.limits.cpu_ms, 7);
            assert_eq!(c.plugins.limits.memory_bytes, 64 << 20);
            Ok(())
        });
    }

    #[test]
    fn the_shipped_configs_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for f in ["examples/refold.toml", "deploy/k8s/refold.toml"] {
            let c = Config::load(Some(&root.join(f))).unwrap_or_else(|e| panic!("{f}: {e:#}"));
            assert!(!c.http.listen.is_empty(), "{f}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("r.toml", "[http]\nlisten_typo = 1\n")?;
            assert!(Config::load(Some(Path::new("r.toml"))).is_err());
            Ok(())
        });
    }
}

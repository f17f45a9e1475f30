//! Configuration: a TOML file, every key overridable by an environment
//! variable `REFOLD_<SECTION>__<KEY>` (e.g. `REFOLD_HTTP__LISTEN`).

use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;

use anyhow::Context as _;
use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub use refold_engine::config::{
    ChangesConfig, EngineConfig, HostConfig, PluginsConfig, StoreConfig, StoreKind,
};
pub use refold_source::config::{KafkaConfig, SourceConfig, SourceKind};
pub use refold_store_cassandra::CassandraConfig;

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
    /// The change feed and its sinks.
    pub changes: ChangesConfig,
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address; empty disables the API.
    pub listen: String,
    /// Bearer token the `/v1` query routes require when set (the admin
    /// token is accepted too). `/healthz` and `/metrics` stay open.
    pub read_token: Option<String>,
    /// Most items one page of a listing holds; `?limit=` is capped to it.
    pub max_page_items: usize,
    /// Most bytes of items one page of a listing holds: a page ends before
    /// the item that would pass it (a single larger item is still served
    /// alone, so that a listing always moves on).
    pub max_page_bytes: usize,
    /// Query requests (`/v1` reads) served at once; the others wait their
    /// turn, so readers cannot take every core from ingest.
    pub max_concurrent_queries: usize,
    /// `?at=` replays running at once; beyond it a query is answered 429
    /// with `Retry-After`.
    pub max_concurrent_replays: usize,
    /// Time budget of one replay (`?at=`, or catching a state up after a
    /// cut-over), in milliseconds; beyond it the query is answered 503.
    pub replay_timeout_ms: u64,
    /// `GET /v1/changes` requests open at once (a long poll stays open
    /// until a record comes or its wait ends, and each commit wakes them
    /// all); beyond it a request is answered 429 with `Retry-After`.
    pub max_change_polls: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".into(),
            read_token: None,
            max_page_items: 100,
            max_page_bytes: 4 << 20,
            max_concurrent_queries: 4,
            max_concurrent_replays: 2,
            replay_timeout_ms: 10_000,
            max_change_polls: 64,
        }
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

impl Config {
    /// The sections the engine reads.
    pub fn host(&self) -> HostConfig {
        HostConfig {
            source: self.source.clone(),
            kafka: self.kafka.clone(),
            store: self.store.clone(),
            cassandra: self.cassandra.clone(),
            plugins: self.plugins.clone(),
            engine: self.engine.clone(),
            changes: self.changes.clone(),
        }
    }

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
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
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

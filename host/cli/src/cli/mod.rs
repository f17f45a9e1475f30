//! The `refold` command line. `main.rs` only parses and dispatches here.

pub mod demo;
pub mod inspect;
pub mod listen;
pub mod new;

pub(crate) mod out;
pub mod plugin;
pub mod produce;
pub mod run;
pub mod testkit;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// refold: a WebAssembly-pluggable projection engine for event sourcing.
#[derive(Debug, Parser)]
#[command(name = "refold", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the engine with its HTTP API until interrupted.
    Run {
        /// Config file (TOML); every key can be overridden by REFOLD_<SECTION>__<KEY>.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Quick start: fold the bank and orders examples and print the states.
    Demo {
        /// Examples directory (default: ./examples, or the one in the source tree).
        #[arg(long)]
        examples: Option<PathBuf>,
        /// Also fold N generated bank events and report the rate.
        #[arg(long, default_value_t = 0)]
        generate: usize,
        /// Write the measured figures as JSON to this file.
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// Test a plugin against a fixture directory (events.jsonl + expected.jsonl).
    Test {
        /// The component to test.
        #[arg(long)]
        plugin: PathBuf,
        /// Directory with events.jsonl and expected.jsonl.
        fixture_dir: PathBuf,
        /// Print one JSON summary object instead of text.
        #[arg(long)]
        json: bool,
        /// A host config file: its `[plugins]` limits (and `REFOLD_*`
        /// environment overrides) apply.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override one plugin limit, e.g. `--limit memory_bytes=268435456`
        /// (repeatable; names as in `[plugins.limits]`).
        #[arg(long = "limit", value_name = "KEY=VALUE")]
        limits: Vec<String>,
        /// Events per pipeline batch.
        #[arg(long, default_value_t = 10_000)]
        batch_size: usize,
        /// Skip the determinism folds (faster for big fixtures).
        #[arg(long)]
        no_determinism: bool,
    },
    /// Create a plugin project (SDK and WIT vendored, a fixture that passes).
    New {
        /// The language: rust or js. (Python: no SDK yet.)
        #[arg(long, value_enum)]
        lang: new::Lang,
        /// The plugin's name (lowercase, digits, '-'); also its directory and,
        /// with '_' for '-', its entity type.
        name: String,
    },
    /// Show what a component describes and whether it matches the WIT world.
    Inspect {
        /// The component.
        file: PathBuf,
    },
    /// Manage plugin versions through a host's admin API.
    Plugin {
        /// Which host.
        #[command(flatten)]
        endpoint: plugin::Endpoint,
        /// What to do.
        #[command(subcommand)]
        action: PluginAction,
    },
    /// Work with quarantined entities through a host's admin API.
    Quarantine {
        /// Which host.
        #[command(flatten)]
        endpoint: plugin::Endpoint,
        /// What to do.
        #[command(subcommand)]
        action: QuarantineAction,
    },
    /// Print change records (CloudEvents) as JSONL: a host's change feed
    /// (embedded), or with `--kafka` a cluster's change topics, read_committed.
    Listen {
        /// Which host.
        #[command(flatten)]
        endpoint: plugin::Endpoint,
        /// Read these brokers' change topics instead of a host's feed.
        #[arg(long, value_name = "BROKERS")]
        kafka: Option<String>,
        /// A change topic to read (with `--kafka`; repeatable).
        #[arg(long = "topic", requires = "kafka")]
        topics: Vec<String>,
        /// Start after this feed cursor (the `refoldcursor` of the last record seen).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep waiting for new records instead of stopping at the end of the feed.
        #[arg(long, short)]
        follow: bool,
        /// Stop after this many records.
        #[arg(long)]
        max: Option<u64>,
    },
    /// Re-send the change records a webhook sink gave up on (its `.dead.jsonl` file).
    Resend {
        /// The sink's dead-letter file.
        file: PathBuf,
        /// Where to POST them.
        #[arg(long)]
        url: String,
        /// `Authorization: Bearer` value for the endpoint.
        #[arg(long)]
        token: Option<String>,
    },
    /// Load a JSONL file of CloudEvents into a Kafka topic, keyed by entity id.
    Produce {
        /// Bootstrap servers, comma-separated.
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        /// The topic.
        #[arg(long)]
        topic: String,
        /// The events, one per line (lines that are not events are sent as they are).
        file: PathBuf,
        /// Send CloudEvents Kafka binary mode (`ce_*` headers, data as the value).
        #[arg(long)]
        binary: bool,
        /// Send at most this many records per second, evenly spaced (a steady
        /// load for latency measurements); unlimited by default.
        #[arg(long)]
        rate: Option<f64>,
    },
}

/// `refold plugin ...`
#[derive(Debug, Subcommand)]
pub enum PluginAction {
    /// Upload a component (validated before anything changes).
    Push {
        /// The component.
        file: PathBuf,
        /// Entity type it is for (default: what it describes, read locally).
        #[arg(long)]
        entity_type: Option<String>,
        /// forward, rebuild, or none (store only).
        #[arg(long, default_value = "forward")]
        mode: String,
    },
    /// List versions.
    List {
        /// Only this entity type.
        entity_type: Option<String>,
    },
    /// Activate a stored version.
    Activate {
        /// Entity type.
        entity_type: String,
        /// Digest (sha256 hex) of the version.
        digest: String,
        /// forward or rebuild.
        #[arg(long, default_value = "forward")]
        mode: String,
    },
    /// Return to the previously active version.
    Rollback {
        /// Entity type.
        entity_type: String,
    },
    /// Follow a rebuild's progress.
    Status {
        /// Rebuild id.
        id: String,
    },
}

/// `refold quarantine ...`
#[derive(Debug, Subcommand)]
pub enum QuarantineAction {
    /// Write a quarantined case as a fixture directory for `refold test`.
    Export {
        /// Entity type.
        entity_type: String,
        /// Entity id.
        entity_id: String,
        /// Output directory.
        dir: PathBuf,
    },
    /// Replay a quarantined entity's held events with the active version.
    Retry {
        /// Entity type.
        entity_type: String,
        /// Entity id.
        entity_id: String,
    },
}

/// Run a `plugin` action.
pub async fn dispatch_plugin(ep: &plugin::Endpoint, action: PluginAction) -> anyhow::Result<()> {
    match action {
        PluginAction::Push {
            file,
            entity_type,
            mode,
        } => {
            let t = match entity_type {
                Some(t) => t,
                None => {
                    let bytes = std::fs::read(&file)?;
                    let engine = refold_engine::config::PluginsConfig::default().engine()?;
                    refold_runtime::Plugin::load(&engine, &bytes, Default::default())?
                        .info
                        .entity_type
                        .clone()
                }
            };
            plugin::push(ep, &file, &t, &mode).await
        }
        PluginAction::List { entity_type } => plugin::list(ep, entity_type.as_deref()).await,
        PluginAction::Activate {
            entity_type,
            digest,
            mode,
        } => plugin::activate(ep, &entity_type, &digest, &mode).await,
        PluginAction::Rollback { entity_type } => plugin::rollback(ep, &entity_type).await,
        PluginAction::Status { id } => plugin::follow_rebuild(ep, &id).await,
    }
}

/// Run a `quarantine` action.
pub async fn dispatch_quarantine(
    ep: &plugin::Endpoint,
    action: QuarantineAction,
) -> anyhow::Result<()> {
    match action {
        QuarantineAction::Export {
            entity_type,
            entity_id,
            dir,
        } => plugin::export(ep, &entity_type, &entity_id, &dir).await,
        QuarantineAction::Retry {
            entity_type,
            entity_id,
        } => plugin::retry(ep, &entity_type, &entity_id).await,
    }
}

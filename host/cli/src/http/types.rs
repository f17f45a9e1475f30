//! The bodies of the API's answers, as the server writes them and the
//! command line reads them back: one definition of each for both sides.
//! Results of the engine's operations are the engine's own types,
//! re-exported here (the manager's results, and the entities now and at a
//! past position of [`refold_engine::query`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use refold_engine::manager::SwapMode;
pub use refold_engine::manager::{
    ExpectedState, Fixture, Installed, RebuildStatus, Resubmitted, Retried, SampleReport,
};
pub use refold_engine::trend::{PartitionTrend, Sample};
use refold_store::plugins::{Activation, PluginVersion};

/// Every error: `{"error": code, "message": text}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Named after the status (`not_found`, `too_large`, ...).
    pub error: String,
    /// What went wrong, for a person.
    pub message: String,
}

/// `GET /v1/partitions`: every partition's lag and committed offset over
/// the last minutes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Partitions {
    /// The length of one sample's step.
    pub step_seconds: u64,
    /// How far back the samples reach.
    pub window_seconds: u64,
    /// By source and partition.
    pub partitions: Vec<PartitionTrend>,
}

/// `GET /v1/projections/{name}/{key}`: one document of a read model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProjectionDocument {
    /// The projection.
    pub projection: String,
    /// The document's key.
    pub key: String,
    /// The document.
    pub document: Value,
}

/// An item of `GET /v1/entities/{type}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EntityItem {
    /// The entity's id (its state: `GET /v1/entities/{type}/{id}`).
    pub entity_id: String,
}

/// `GET /v1/plugins/{type}`: the versions of one entity type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PluginType {
    /// Entity type.
    pub entity_type: String,
    /// The stored activation, if any.
    pub active: Option<Activation>,
    /// The digest this host runs.
    pub running_digest: Option<String>,
    /// Every stored version.
    pub versions: Vec<PluginVersion>,
}

/// `GET /v1/plugins`: every entity type known, stored or running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PluginList {
    /// By entity type, sorted.
    pub plugins: Vec<PluginType>,
}

/// The body of `POST /v1/plugins/{type}/activate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ActivateRequest {
    /// The version to activate.
    pub digest: String,
    /// `forward` (default) or `rebuild`.
    pub mode: Option<String>,
}

/// `POST /v1/plugins/{type}/activate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Activated {
    /// Entity type.
    pub entity_type: String,
    /// The version activated.
    pub digest: String,
    /// How.
    pub mode: SwapMode,
    /// The rebuild started, for a rebuild.
    pub rebuild: Option<String>,
}

/// `POST /v1/plugins/{type}/rollback`: the activation now in force.
pub type RolledBack = Activation;

/// `GET /v1/rebuilds`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RebuildList {
    /// Every rebuild known.
    pub rebuilds: Vec<RebuildStatus>,
}

/// `GET /v1/admin/limits`: what this host accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    /// `[plugins]`.
    pub plugins: PluginLimits,
    /// `[http]`.
    pub http: HttpLimits,
}

/// The `[plugins]` limits a client can check locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PluginLimits {
    /// The largest component an upload takes.
    pub max_upload_bytes: usize,
}

/// The `[http]` limits of queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HttpLimits {
    /// Items per listing page at most.
    pub max_page_items: usize,
    /// Bytes of items per listing page at most.
    pub max_page_bytes: usize,
    /// Query requests served at once.
    pub max_concurrent_queries: usize,
    /// `?at=` replays running at once.
    pub max_concurrent_replays: usize,
    /// Time budget of one replay, in milliseconds.
    pub replay_timeout_ms: u64,
}

/// A listing page: `next` is the cursor of the following page (`?after=`,
/// or `?from=` for an entity's events), `null` on the last.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    /// The items, at most `http.max_page_items` and `http.max_page_bytes`.
    pub items: Vec<T>,
    /// How many.
    pub count: usize,
    /// The cursor of the following page.
    pub next: Option<String>,
}

/// `GET /v1/changes`: change records in commit order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChangesPage {
    /// The records.
    pub changes: Vec<ChangeItem>,
    /// Pass as `?after=` for what follows.
    pub next: u64,
}

/// One change record with its cursor.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChangeItem {
    /// Its place in the feed.
    pub cursor: u64,
    /// The record, a CloudEvent.
    pub event: Value,
}

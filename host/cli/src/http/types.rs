//! The bodies of the API's answers, as the server writes them and the
//! command line reads them back: one definition of each for both sides.
//! (Entities now and at a past position are the engine's own
//! [`refold_engine::query`] types.)

use serde::{Deserialize, Serialize};
use serde_json::Value;

use refold_engine::manager::{self, SwapMode};
use refold_store::QuarantineRecord;
use refold_store::plugins::{Activation, PluginVersion, RebuildState};
use refold_types::{EntityKey, Generation, PluginRef};

/// Every error: `{"error": code, "message": text}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Named after the status (`not_found`, `too_large`, ...).
    pub error: String,
    /// What went wrong, for a person.
    pub message: String,
}

/// `GET /v1/projections/{name}/{key}`: one document of a read model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionDocument {
    /// The projection.
    pub projection: String,
    /// The document's key.
    pub key: String,
    /// The document.
    pub document: Value,
}

/// `PUT /v1/plugins/{type}`: the stored version and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Installed {
    /// The stored version.
    pub version: PluginVersion,
    /// What the validation fold did.
    pub sample: SampleReport,
    /// The activation mode, when it was activated.
    pub activation: Option<String>,
    /// The rebuild started, if any.
    pub rebuild: Option<String>,
}

/// What the validation fold of an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SampleReport {
    /// Entities folded.
    pub entities: usize,
    /// Events folded.
    pub events: usize,
}

impl From<manager::Installed> for Installed {
    fn from(i: manager::Installed) -> Self {
        let manager::Installed {
            version,
            sample,
            activation,
            rebuild,
        } = i;
        let manager::SampleReport { entities, events } = sample;
        Installed {
            version,
            sample: SampleReport { entities, events },
            activation,
            rebuild,
        }
    }
}

/// `GET /v1/plugins/{type}`: the versions of one entity type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginList {
    /// By entity type, sorted.
    pub plugins: Vec<PluginType>,
}

/// The body of `POST /v1/plugins/{type}/activate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateRequest {
    /// The version to activate.
    pub digest: String,
    /// `forward` (default) or `rebuild`.
    pub mode: Option<String>,
}

/// `POST /v1/plugins/{type}/activate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// `GET /v1/rebuilds/{id}`: progress of a rebuild.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebuildStatus {
    /// Rebuild id.
    pub id: String,
    /// Entity type.
    pub entity_type: String,
    /// Digest being built.
    pub digest: String,
    /// Where it is.
    pub state: RebuildState,
    /// Entities refolded.
    pub entities_done: u64,
    /// Entities to refold.
    pub entities_total: u64,
    /// Events refolded.
    pub events_done: u64,
    /// Events to refold (at start).
    pub events_total: u64,
    /// Events per second so far.
    pub rate: f64,
    /// Estimated seconds left.
    pub eta_seconds: Option<f64>,
    /// Entities the new version quarantined.
    pub quarantined: u64,
    /// Error, when failed.
    pub error: Option<String>,
    /// Seconds since start.
    pub elapsed_seconds: f64,
    /// Id of the generation being built.
    pub generation: Generation,
    /// The host process running it.
    pub owner: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it ended (RFC 3339).
    pub finished_at: Option<String>,
}

impl From<manager::RebuildStatus> for RebuildStatus {
    fn from(s: manager::RebuildStatus) -> Self {
        // Every field named, so that a new one cannot be left off the wire.
        let manager::RebuildStatus {
            id,
            entity_type,
            digest,
            state,
            entities_done,
            entities_total,
            events_done,
            events_total,
            rate,
            eta_seconds,
            quarantined,
            error,
            elapsed_seconds,
            generation,
            owner,
            started_at,
            finished_at,
        } = s;
        RebuildStatus {
            id,
            entity_type,
            digest,
            state,
            entities_done,
            entities_total,
            events_done,
            events_total,
            rate,
            eta_seconds,
            quarantined,
            error,
            elapsed_seconds,
            generation,
            owner,
            started_at,
            finished_at,
        }
    }
}

/// `GET /v1/rebuilds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebuildList {
    /// Every rebuild known.
    pub rebuilds: Vec<RebuildStatus>,
}

/// `GET /v1/admin/limits`: what this host accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// `[plugins]`.
    pub plugins: PluginLimits,
    /// `[http]`.
    pub http: HttpLimits,
}

/// The `[plugins]` limits a client can check locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginLimits {
    /// The largest component an upload takes.
    pub max_upload_bytes: usize,
}

/// The `[http]` limits of queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// `POST /v1/quarantine/{type}/{id}/retry`: the entity after its held
/// events were applied again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retried {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
    /// Events that were held.
    pub held_events: usize,
    /// Position of the last event applied.
    pub position: u64,
    /// Position of the last event stored.
    pub head: u64,
    /// Whether it is quarantined again.
    pub quarantined: bool,
    /// The version that applied them.
    pub plugin: PluginRef,
    /// Why it is quarantined again, if it is.
    pub error: Option<String>,
    /// The state now.
    pub state: Value,
}

/// `GET /v1/quarantine/{type}/{id}/fixture`: a quarantined case, ready for
/// `refold test`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fixture {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
    /// Why it is quarantined.
    pub quarantine: Option<QuarantineRecord>,
    /// The state it is held at.
    pub state_before: Option<Value>,
    /// Position of that state.
    pub position: u64,
    /// Its stored events, as structured CloudEvents.
    pub events: Vec<Value>,
    /// What `refold test` expects of them.
    pub expected: Vec<FixtureExpectation>,
}

/// One expectation of a fixture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FixtureExpectation {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
    /// The state expected.
    pub state: Option<Value>,
}

/// `POST /v1/dead-letters/{id}/resubmit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resubmitted {
    /// The dead letter.
    pub dead_letter: String,
    /// Whether it became an event this time (and was removed).
    pub accepted: bool,
    /// Events stored.
    pub stored: usize,
    /// Duplicates skipped.
    pub duplicates: usize,
    /// Events applied.
    pub applied: usize,
    /// Entities it quarantined.
    pub quarantined: Vec<EntityKey>,
}

//! What the plugin manager's operations return, and why they refuse: plain
//! serializable data, so that the HTTP layer sends it as it is and the
//! command line reads the same types back.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use refold_runtime::LoadError;
use refold_store::{
    ActivationMode, PluginVersion, QuarantineRecord, RebuildRecord, RebuildState, StoreError,
};
use refold_types::event::{EntityKey, RawJson};
use refold_types::{Generation, PluginRef};

/// How a new version takes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SwapMode {
    /// From the next batch on; states already computed stay.
    Forward,
    /// Refold every entity from its raw events into a new generation in the
    /// background, then cut over in one step.
    Rebuild,
}

impl SwapMode {
    /// How the activation it makes is recorded.
    pub fn activation_mode(self) -> ActivationMode {
        match self {
            SwapMode::Forward => ActivationMode::Forward,
            SwapMode::Rebuild => ActivationMode::Rebuild,
        }
    }
}

/// Why an upload or an activation was refused.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Not a component of our world, or `describe()` failed.
    #[error(transparent)]
    Invalid(#[from] LoadError),
    /// `describe()` names another entity type than the one uploaded to.
    #[error("the component describes entity type `{got}`, not `{expected}`")]
    WrongEntityType {
        /// Entity type of the request.
        expected: String,
        /// Entity type the component describes.
        got: String,
    },
    /// It failed to fold a sample of stored events within its limits.
    #[error("sample fold failed: {0}")]
    SampleFold(String),
    /// No such version, or nothing to roll back to.
    #[error("{0}")]
    NotFound(String),
    /// A rebuild of this entity type is already running.
    #[error("{0}")]
    Conflict(String),
    /// The store failed (an outage is `StoreError::Unavailable`).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Internal failure.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Outcome of an install.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Installed {
    /// The stored version.
    pub version: PluginVersion,
    /// What the sample fold did.
    pub sample: SampleReport,
    /// Whether it is now active (forward) or being rebuilt.
    pub activation: Option<ActivationMode>,
    /// The rebuild started, if any.
    pub rebuild: Option<String>,
}

/// What the validation fold did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SampleReport {
    /// Entities folded.
    pub entities: usize,
    /// Events folded.
    pub events: usize,
}

/// Progress of a rebuild.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
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

impl RebuildStatus {
    /// The record the store keeps of it.
    pub(super) fn record(&self, heartbeat_ms: i64) -> RebuildRecord {
        RebuildRecord {
            id: self.id.clone(),
            entity_type: self.entity_type.clone(),
            digest: self.digest.clone(),
            generation: self.generation.clone(),
            state: self.state,
            entities_done: self.entities_done,
            entities_total: self.entities_total,
            events_done: self.events_done,
            events_total: self.events_total,
            quarantined: self.quarantined,
            error: self.error.clone(),
            owner: self.owner.clone(),
            started_at: self.started_at.clone(),
            finished_at: self.finished_at.clone(),
            heartbeat_ms,
        }
    }

    /// The status of a rebuild this process does not run: as stored. Rate,
    /// ETA and elapsed time are only known to the process running it.
    pub(super) fn from_record(r: &RebuildRecord) -> RebuildStatus {
        RebuildStatus {
            id: r.id.clone(),
            entity_type: r.entity_type.clone(),
            digest: r.digest.clone(),
            state: r.state,
            entities_done: r.entities_done,
            entities_total: r.entities_total,
            events_done: r.events_done,
            events_total: r.events_total,
            rate: 0.0,
            eta_seconds: None,
            quarantined: r.quarantined,
            error: r.error.clone(),
            elapsed_seconds: 0.0,
            generation: r.generation.clone(),
            owner: r.owner.clone(),
            started_at: r.started_at.clone(),
            finished_at: r.finished_at.clone(),
        }
    }
}

/// Outcome of a retry of a quarantined entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Retried {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
    /// Events the quarantine held, folded again.
    pub held_events: usize,
    /// Position of the last event applied.
    pub position: u64,
    /// Position of the last event stored.
    pub head: u64,
    /// Whether it is quarantined again (an event failed once more).
    pub quarantined: bool,
    /// The version that folded.
    pub plugin: PluginRef,
    /// Why it is quarantined again.
    pub error: Option<String>,
    /// The state now.
    pub state: Value,
}

/// A quarantined case as a fixture for `refold test`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Fixture {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
    /// Why it is quarantined (none when it is not).
    pub quarantine: Option<QuarantineRecord>,
    /// The state it is held at.
    pub state_before: Option<Value>,
    /// The position of that state.
    pub position: u64,
    /// Its stored events, each as a structured-mode record.
    pub events: Vec<RawJson>,
    /// The expected states, for `expected.jsonl`: the state it is held at.
    pub expected: Vec<ExpectedState>,
}

/// One expected state of a fixture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExpectedState {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
    /// The state.
    pub state: Option<Value>,
}

/// Outcome of a re-submission of a dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Resubmitted {
    /// The dead letter's id.
    pub dead_letter: String,
    /// Whether the record became an event (the dead letter is then gone).
    pub accepted: bool,
    /// Events stored.
    pub stored: usize,
    /// Events found already stored.
    pub duplicates: usize,
    /// Events folded.
    pub applied: usize,
    /// Entities quarantined by it.
    pub quarantined: Vec<EntityKey>,
}

//! The plugin registry's persistence: every uploaded version (bytes and
//! identity) and the activation of each entity type. Kept in the same
//! backend as the states, so in cluster mode every host sees one registry.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// One stored plugin version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginVersion {
    /// The entity type it owns.
    pub entity_type: String,
    /// Plugin name.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// sha256 of the component, hex: the identity.
    pub digest: String,
    /// Component size in bytes.
    pub size: u64,
    /// When it was uploaded (RFC 3339).
    pub uploaded_at: String,
}

/// Which version of an entity type is active, and what it replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    /// Entity type.
    pub entity_type: String,
    /// Active digest.
    pub digest: String,
    /// Digest active before this one (the rollback target).
    pub previous: Option<String>,
    /// `forward`, `rebuild` or `rollback`.
    pub mode: String,
    /// The generation of states this version serves: kept by a forward
    /// swap, new with each rebuild. Writing this row is the cut-over.
    #[serde(default)]
    pub generation: String,
    /// The generation active before (restored by a rollback).
    #[serde(default)]
    pub previous_generation: Option<String>,
    /// Monotonic per entity type: hosts apply an activation only if newer.
    pub seq: i64,
    /// When (RFC 3339).
    pub activated_at: String,
}

/// Persistence of the plugin registry.
#[async_trait]
pub trait PluginStore: Send + Sync {
    /// Store a version (idempotent by digest).
    async fn put_plugin(&self, v: &PluginVersion, bytes: &[u8]) -> anyhow::Result<()>;
    /// Versions of an entity type, oldest first.
    async fn plugin_versions(&self, entity_type: &str) -> anyhow::Result<Vec<PluginVersion>>;
    /// The bytes of a version.
    async fn plugin_bytes(&self, digest: &str) -> anyhow::Result<Option<Vec<u8>>>;
    /// The current activation of every entity type.
    async fn activations(&self) -> anyhow::Result<Vec<Activation>>;
    /// Record an activation: the first of its entity type (`seq` 1), or the
    /// successor of the one with `seq - 1`. Conditional, so that two hosts
    /// activating at once cannot both win: the loser gets
    /// [`StoreError::Fenced`](super::StoreError::Fenced) inside the error.
    async fn put_activation(&self, a: &Activation) -> anyhow::Result<()>;
}

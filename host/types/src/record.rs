//! Records as the host keeps them: stored events and their identity, their
//! origin in a source, checkpoints, the plugin version behind a state, and
//! resolved read-model writes.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::{EntityKey, RawJson};

/// Which plugin version produced a state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginRef {
    /// Plugin name.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// sha256 of the component.
    pub digest: String,
}

/// Where a record came from: source name, partition and offset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Origin {
    /// Source name (a file path, or a Kafka topic).
    pub source: String,
    /// Partition (file index, or Kafka partition).
    pub partition: i32,
    /// Offset within the partition (byte offset, or Kafka offset).
    pub offset: i64,
}

/// A raw event as kept in the event store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredEvent {
    /// Its entity.
    pub key: EntityKey,
    /// Position in the entity's history, from 1.
    pub position: u64,
    /// CloudEvents `id`.
    pub id: String,
    /// CloudEvents `source`.
    pub source: String,
    /// CloudEvents `type`.
    pub event_type: String,
    /// CloudEvents `time`.
    pub time: Option<String>,
    /// CloudEvents `data`, as received.
    pub data: RawJson,
    /// Where it was read from.
    pub origin: Option<Origin>,
    /// The record as received (see [`crate::event::Envelope::record`]);
    /// `None` for events stored before records were kept.
    #[serde(default)]
    pub record: Option<RawJson>,
    /// sha256 of `record`; `None` for events stored before digests were kept
    /// (a re-delivery of one of those is taken as a duplicate).
    #[serde(default)]
    pub digest: Option<String>,
}

impl StoredEvent {
    /// The event as a structured-mode CloudEvent (for export, fixtures and
    /// `refold produce`). `data` keeps its text.
    pub fn to_structured(&self) -> String {
        let mut head = serde_json::json!({
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.event_type,
            "subject": self.key.entity_id,
            "entitytype": self.key.entity_type,
        });
        if let Some(t) = &self.time {
            head["time"] = Value::String(t.clone());
        }
        let mut out = head.to_string();
        out.pop();
        out.push_str(",\"data\":");
        out.push_str(self.data.as_str());
        out.push('}');
        out
    }
}

/// An event's identity: entity and event id. Two records with one identity
/// are one event (when their bytes agree) or a conflict (when they do not).
pub type EventIdentity = (EntityKey, String);

/// A read-model operation, resolved to JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum ProjectionWrite {
    /// Insert or replace a document.
    Upsert {
        /// Projection name.
        projection: String,
        /// Document key.
        key: String,
        /// Document body.
        body: Value,
    },
    /// Delete a document.
    Delete {
        /// Projection name.
        projection: String,
        /// Document key.
        key: String,
    },
}

/// How far a source partition has been consumed: the next offset to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Source name.
    pub source: String,
    /// Partition.
    pub partition: i32,
    /// Next offset to read.
    pub offset: i64,
}

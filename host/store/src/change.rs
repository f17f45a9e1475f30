//! Change records: what a committed batch did to each entity's state, as a
//! CloudEvent (JSON format, spec 1.0). A backend stores them in the same
//! commit as the states they describe, so that a record exists if and only
//! if its batch committed; consumers read them in order from the store's
//! change feed ([`crate::StateStore::changes_after`]) or from what a sink
//! forwarded.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use refold_types::{EntityKey, Generation, PluginRef, digest_of};

/// CloudEvents `type` of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChangeKind {
    /// A batch (or a retry, or a re-submission) advanced the entity's
    /// position: `refold.state.changed`.
    Changed,
    /// A rebuild's cut-over or a rollback replaced the entity's state with
    /// another generation's: `refold.state.corrected`.
    Corrected,
}

impl ChangeKind {
    /// The CloudEvents `type`.
    pub fn as_type(self) -> &'static str {
        match self {
            ChangeKind::Changed => "refold.state.changed",
            ChangeKind::Corrected => "refold.state.corrected",
        }
    }
}

/// One entity's change in one commit.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRecord {
    /// Changed or corrected.
    pub kind: ChangeKind,
    /// The entity (its live key: type and id).
    pub key: EntityKey,
    /// First position applied by this change (for a correction: the
    /// position both states are at).
    pub first_position: u64,
    /// Last position applied.
    pub last_position: u64,
    /// The generation the new state belongs to.
    pub generation: Generation,
    /// For a correction: the sequence number of the activation that made
    /// it (a cut-over or a rollback). Part of the id, because a rollback
    /// and then a rollback of that rollback can correct an entity to the
    /// same generation at the same position twice, and the second must not
    /// look like a duplicate of the first.
    pub activation: Option<u64>,
    /// The plugin version that produced the new state.
    pub plugin: Option<PluginRef>,
    /// The new state.
    pub state: Value,
    /// The state before, when configured (always for a correction).
    pub previous: Option<Value>,
    /// Ids of the events applied, when configured.
    pub event_ids: Option<Vec<String>>,
    /// When the record was made (RFC 3339).
    pub time: String,
}

impl ChangeRecord {
    /// The record's id: a function of its kind, entity, last position,
    /// generation and (for a correction) activation only, so that a consumer can deduplicate by it and a
    /// re-publication of the same commit carries the same id.
    pub fn id(&self) -> String {
        let mut b = Vec::new();
        for part in [
            self.kind.as_type(),
            &self.key.entity_type,
            &self.key.entity_id,
            &self.last_position.to_string(),
            self.generation.as_str(),
        ] {
            // Length-prefixed: no two tuples share an encoding.
            b.extend_from_slice(&(part.len() as u64).to_be_bytes());
            b.extend_from_slice(part.as_bytes());
        }
        if let Some(seq) = self.activation {
            b.extend_from_slice(&seq.to_be_bytes());
        }
        digest_of(&b)[..32].to_string()
    }

    /// The record as a structured CloudEvent (`application/cloudevents+json`).
    /// Extension attributes: `entitytype`, `firstposition`, `lastposition`,
    /// `generation` (empty for the base one), `plugindigest`, `pluginversion`,
    /// and `activation` on a correction.
    pub fn to_cloudevent(&self) -> Value {
        self.cloudevent_with_id(self.id())
    }

    /// The record's id and its CloudEvent, the id computed once.
    pub fn id_and_cloudevent(&self) -> (String, Value) {
        let id = self.id();
        (id.clone(), self.cloudevent_with_id(id))
    }

    /// The record at `cursor` of a feed, its id computed once.
    pub fn into_stored(self, cursor: u64) -> StoredChange {
        let id = self.id();
        StoredChange {
            cursor,
            event: self.cloudevent_with_id(id.clone()),
            id,
            key: self.key,
        }
    }

    fn cloudevent_with_id(&self, id: String) -> Value {
        let mut data = Map::new();
        data.insert("state".into(), self.state.clone());
        if let Some(p) = &self.previous {
            data.insert("previous".into(), p.clone());
        }
        if let Some(ids) = &self.event_ids {
            data.insert("event_ids".into(), json!(ids));
        }
        let mut ce = json!({
            "specversion": "1.0",
            "id": id,
            "source": format!("/refold/{}", self.key.entity_type),
            "type": self.kind.as_type(),
            "subject": self.key.entity_id,
            "time": self.time,
            "datacontenttype": "application/json",
            "entitytype": self.key.entity_type,
            "firstposition": self.first_position,
            "lastposition": self.last_position,
            "generation": self.generation.as_str(),
            "data": Value::Object(data),
        });
        if let Some(seq) = self.activation {
            ce["activation"] = json!(seq);
        }
        if let Some(p) = &self.plugin {
            ce["plugindigest"] = json!(p.digest);
            ce["pluginversion"] = json!(p.version);
        }
        ce
    }
}

/// A stored change record and its place in the store's change feed.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredChange {
    /// Position in the feed: increasing in commit order, never reused;
    /// pass as `after` to read what follows.
    pub cursor: u64,
    /// The record's id (see [`ChangeRecord::id`]).
    pub id: String,
    /// The entity.
    pub key: EntityKey,
    /// The record as a structured CloudEvent, as stored.
    pub event: Value,
}

/// A partition of a cluster store's change outbox: the records of one
/// source partition (the partition of each entity's last event in its
/// commit), drained by that partition's holder. `source` empty: the
/// records of no source partition (a quarantine retry, a correction).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutboxPartition {
    /// Source name (a Kafka topic); empty for [`OutboxPartition::control`].
    pub source: String,
    /// Partition within the source.
    pub partition: i32,
}

impl OutboxPartition {
    /// The partition of records that no source partition carries.
    pub fn control() -> Self {
        OutboxPartition {
            source: String::new(),
            partition: 0,
        }
    }

    /// A stable name for the partition (transactional ids, markers).
    pub fn name(&self) -> String {
        if self.source.is_empty() {
            "control".into()
        } else {
            format!("{}-{}", self.source, self.partition)
        }
    }
}

/// One record waiting in an outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingChange {
    /// The record's id (see [`ChangeRecord::id`]).
    pub id: String,
    /// The entity.
    pub key: EntityKey,
    /// The record as a structured CloudEvent, in JSON (as it is kept and
    /// as it is published).
    pub event: String,
}

/// The records of one commit in one outbox partition, published together
/// in one transaction: all of them, or (`whole` false) those of its
/// records whose commit is known to have applied, the others still in
/// doubt.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxBatch {
    /// The commit's outbox id (unique, never reused).
    pub id: String,
    /// Whether `records` is every record the batch holds.
    pub whole: bool,
    /// The records, each entity's in position order.
    pub records: Vec<PendingChange>,
}

impl OutboxBatch {
    /// What to delete once the batch is published, and what a publisher's
    /// marker names so that its successor deletes it too.
    pub fn published(&self) -> PublishedBatch {
        PublishedBatch {
            id: self.id.clone(),
            keys: (!self.whole).then(|| self.records.iter().map(|r| r.key.clone()).collect()),
        }
    }
}

/// A batch (or, with `keys`, those entities' records of it) published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedBatch {
    /// The batch's outbox id.
    pub id: String,
    /// `None`: the whole batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<EntityKey>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(last: u64) -> ChangeRecord {
        ChangeRecord {
            kind: ChangeKind::Changed,
            key: EntityKey::new("account", "a-1"),
            first_position: 1,
            last_position: last,
            generation: Generation::base(),
            activation: None,
            plugin: None,
            state: json!({"balance": 3}),
            previous: None,
            event_ids: None,
            time: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn the_id_depends_on_the_entity_position_generation_and_kind_only() {
        let a = record(3);
        let mut same = record(3);
        same.state = json!({"balance": 4});
        same.time = "2027-01-01T00:00:00Z".into();
        same.first_position = 2;
        assert_eq!(a.id(), same.id());
        assert_ne!(a.id(), record(4).id());
        let mut corrected = record(3);
        corrected.kind = ChangeKind::Corrected;
        assert_ne!(a.id(), corrected.id());
        // Two corrections to one state, by two activations, are two records.
        let mut again = corrected.clone();
        corrected.activation = Some(4);
        again.activation = Some(6);
        assert_ne!(corrected.id(), again.id());
        assert_eq!(corrected.to_cloudevent()["activation"], 4);
        // No separator trick makes two entities share an id.
        let mut b = record(3);
        b.key = EntityKey::new("accoun", "ta-1");
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn a_record_is_a_cloudevent_with_its_positions() {
        let mut r = record(3);
        r.previous = Some(json!({"balance": 1}));
        let ce = r.to_cloudevent();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["type"], "refold.state.changed");
        assert_eq!(ce["subject"], "a-1");
        assert_eq!(ce["entitytype"], "account");
        assert_eq!(ce["lastposition"], 3);
        assert_eq!(ce["data"]["state"]["balance"], 3);
        assert_eq!(ce["data"]["previous"]["balance"], 1);
        assert!(ce["data"].get("event_ids").is_none());
    }
}

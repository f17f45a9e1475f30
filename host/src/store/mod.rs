//! The storage traits the pipeline is written against, and their shared types.
//!
//! Two implementations: [`sqlite`] (embedded, one machine) and [`cassandra`]
//! (cluster). The pipeline computes one [`Commit`] per batch and hands it
//! over whole, so each backend can make it as atomic as it is able to:
//! SQLite in one transaction, Cassandra in one single-partition batch per
//! entity (raw events + state together), fenced by position.

pub mod cassandra;
pub mod plugins;
pub mod sqlite;

pub use plugins::{Activation, PluginStore, PluginVersion};

use std::collections::HashMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::{EntityKey, RawJson};

/// Which plugin version produced a state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRef {
    /// Plugin name.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// sha256 of the component.
    pub digest: String,
}

/// Where a record came from: source name, partition and offset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// Source name (a file path, or a Kafka topic).
    pub source: String,
    /// Partition (file index, or Kafka partition).
    pub partition: i32,
    /// Offset within the partition (byte offset, or Kafka offset).
    pub offset: i64,
}

/// A raw event as kept in the event store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// What the store knows about one entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityRecord {
    /// The entity.
    pub key: EntityKey,
    /// Last good state; `None` before the first successful fold.
    pub state: Option<Value>,
    /// Position of the last event folded into `state`.
    pub position: u64,
    /// Position of the last event stored (>= `position`; greater while
    /// quarantined: the events in between are held).
    pub head: u64,
    /// The plugin version that produced `state`.
    pub plugin: Option<PluginRef>,
    /// Whether the entity is quarantined.
    pub quarantined: bool,
    /// The generation (lineage of states) `state` belongs to: `""` for the
    /// first one, else the id a rebuild gave it. A state is only ever folded
    /// forward within its own generation.
    #[serde(default)]
    pub generation: String,
}

impl EntityRecord {
    /// A record for an entity the store has never seen.
    pub fn new(key: EntityKey) -> Self {
        EntityRecord {
            key,
            state: None,
            position: 0,
            head: 0,
            plugin: None,
            quarantined: false,
            generation: String::new(),
        }
    }
}

/// A dead letter: input that could not become an event, with its reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Stable id (derived from the origin, so re-reading after a crash does
    /// not duplicate it).
    pub id: String,
    /// Machine-readable reason.
    pub code: String,
    /// Human-readable reason.
    pub reason: String,
    /// The record as received (lossy UTF-8).
    pub payload: String,
    /// Where it came from.
    pub origin: Option<Origin>,
    /// Event id, if one could be read.
    pub event_id: Option<String>,
    /// Entity type, if one could be read.
    pub entity_type: Option<String>,
    /// When it was recorded (RFC 3339).
    pub recorded_at: String,
}

/// Why an entity is quarantined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    /// The entity.
    pub key: EntityKey,
    /// The event that failed.
    pub event_id: String,
    /// Its position.
    pub event_position: u64,
    /// Kind of failure (`panic`, `deadline`, `memory`, `plugin_error`, ...).
    pub kind: String,
    /// The error, with the panic message when there was one.
    pub error: String,
    /// The plugin version that failed.
    pub plugin: PluginRef,
    /// When it was recorded (RFC 3339).
    pub recorded_at: String,
}

/// The new state of one entity after a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityUpdate {
    /// The entity.
    pub key: EntityKey,
    /// Its last good state (unchanged when nothing was applied).
    pub state: Value,
    /// Position of the last applied event.
    pub position: u64,
    /// Position of the last stored event.
    pub head: u64,
    /// `head` before this batch: the write is fenced on it, so a stale
    /// writer cannot overwrite a newer state.
    pub expected_head: u64,
    /// The plugin version that produced `state`.
    pub plugin: Option<PluginRef>,
    /// Whether the entity is (now) quarantined.
    pub quarantined: bool,
    /// The generation `state` belongs to (see [`EntityRecord::generation`]).
    pub generation: String,
}

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

/// Everything one batch changes. Applied whole by [`Storage::commit`].
#[derive(Debug, Default, Clone)]
pub struct Commit {
    /// New raw events, deduplicated and positioned.
    pub events: Vec<StoredEvent>,
    /// New entity states.
    pub entities: Vec<EntityUpdate>,
    /// Read-model writes, in order.
    pub projections: Vec<ProjectionWrite>,
    /// New dead letters.
    pub dead_letters: Vec<DeadLetter>,
    /// New quarantine records.
    pub quarantines: Vec<QuarantineRecord>,
    /// Source positions reached by this batch.
    pub checkpoints: Vec<Checkpoint>,
    /// Entities whose quarantine is lifted by this commit (their records are
    /// removed; their `EntityUpdate` carries the new flag).
    pub released: Vec<EntityKey>,
    /// The committer is the only writer of these entities' states (a
    /// rebuild filling its own new generation, which nothing else writes
    /// until it is active): a backend may skip the fence on state-only
    /// updates where fencing costs a round of consensus.
    pub exclusive: bool,
}

/// One item of a listing page, with the cursor that resumes right after it
/// (so that a page cut short by its size in bytes can still be resumed).
#[derive(Debug, Clone, PartialEq)]
pub struct Paged<T> {
    /// Pass as `after` to list what follows this item.
    pub cursor: String,
    /// The item.
    pub item: T,
}

/// Page size of the unpaged listings built on the paged ones.
const INTERNAL_PAGE: usize = 256;

/// A listing cursor the store did not issue (or cannot read back).
#[derive(Debug, thiserror::Error)]
#[error("invalid cursor {0:?}: pass back the `next` of a previous page")]
pub struct BadCursor(pub String);

/// A cursor from a store's position: opaque to clients and safe in a URL
/// (hex of its JSON).
pub fn encode_cursor<T: Serialize>(position: &T) -> String {
    hex::encode(serde_json::to_vec(position).unwrap_or_default())
}

/// The position a cursor from [`encode_cursor`] holds.
pub fn decode_cursor<T: serde::de::DeserializeOwned>(cursor: &str) -> Result<T, BadCursor> {
    hex::decode(cursor)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| BadCursor(cursor.chars().take(64).collect()))
}

/// Failure of a storage operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or timed out: retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A fenced write lost: another writer is ahead of us for this entity.
    #[error("write fenced: {0}")]
    Fenced(String),
    /// Anything else.
    #[error(transparent)]
    Other(anyhow::Error),
}

impl From<anyhow::Error> for StoreError {
    /// A read that failed with a typed `StoreError` inside keeps its kind, so
    /// an outage during a read is retried like one during a write.
    fn from(e: anyhow::Error) -> Self {
        e.downcast::<StoreError>().unwrap_or_else(StoreError::Other)
    }
}

/// Raw events: append-only, idempotent by event id, read per entity.
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Of these identities, the ones already stored, each with the digest of
    /// the stored record (`None` when it was stored without one).
    async fn known_ids(
        &self,
        ids: &[EventIdentity],
    ) -> anyhow::Result<HashMap<EventIdentity, Option<String>>>;
    /// An entity's events with `after < position <= upto`, in order.
    async fn history(
        &self,
        key: &EntityKey,
        after: u64,
        upto: Option<u64>,
    ) -> anyhow::Result<Vec<StoredEvent>>;
    /// Ids of all entities of a type that have events.
    async fn entity_ids(&self, entity_type: &str) -> anyhow::Result<Vec<String>>;
}

/// Entity states, projections, dead letters, quarantine and checkpoints.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Records for these entities (absent ones are omitted).
    async fn load(&self, keys: &[EntityKey]) -> anyhow::Result<HashMap<EntityKey, EntityRecord>>;
    /// One document of a projection.
    async fn projection(&self, name: &str, key: &str) -> anyhow::Result<Option<Value>>;
    /// One page of dead letters: those after the cursor `after` (from the
    /// start when `None`), at most `limit`, in the store's listing order
    /// (SQLite: arrival; Cassandra: by shard, then id), each with the cursor
    /// that resumes right after it. Reads no more than `limit` records, so a
    /// listing costs a page of memory however many there are. A cursor the
    /// store did not issue is a [`BadCursor`].
    async fn dead_letter_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<Vec<Paged<DeadLetter>>>;
    /// Up to `limit` dead letters in listing order, read page by page.
    async fn dead_letters(&self, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        while out.len() < limit {
            let page = self
                .dead_letter_page(after.as_deref(), (limit - out.len()).min(INTERNAL_PAGE))
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.cursor.clone());
            out.extend(page.into_iter().map(|p| p.item));
        }
        Ok(out)
    }
    /// Remove a dead letter (after it was re-submitted).
    async fn remove_dead_letter(&self, id: &str) -> anyhow::Result<bool>;
    /// One page of quarantine records, like [`StateStore::dead_letter_page`]
    /// (SQLite: by entity type and id; Cassandra: by partition token).
    async fn quarantine_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<Vec<Paged<QuarantineRecord>>>;
    /// All quarantine records, read page by page.
    async fn quarantined(&self) -> anyhow::Result<Vec<QuarantineRecord>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .quarantine_page(after.as_deref(), INTERNAL_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.cursor.clone());
            out.extend(page.into_iter().map(|p| p.item));
        }
        Ok(out)
    }
    /// Lift a quarantine: the record is removed and the entity flagged free.
    async fn release(&self, key: &EntityKey) -> anyhow::Result<()>;
    /// Checkpoints recorded for a source.
    async fn checkpoints(&self, source: &str) -> anyhow::Result<Vec<Checkpoint>>;
    /// Merge the read model a generation built apart (documents under
    /// `name@ns`) into the live one (`name`), keeping each live document it
    /// replaces under `name@archive` so that a rollback can put it back.
    /// Runs after the cut-over, which is the activation itself: states move
    /// lazily (see ARCHITECTURE.md, "Generations").
    async fn adopt_projections(&self, ns: &str, archive: &str) -> anyhow::Result<()>;
    /// Forget every state, quarantine and projection of namespace `ns`.
    async fn drop_namespace(&self, ns: &str) -> anyhow::Result<()>;
    /// The latest replay snapshot of `key` by plugin `digest` at a position
    /// `<= at`: the state folded from the entity's first event up to that
    /// position by that plugin alone. Lets a past-position query replay a
    /// bounded stretch instead of the whole history.
    async fn snapshot_before(
        &self,
        key: &EntityKey,
        digest: &str,
        at: u64,
    ) -> anyhow::Result<Option<(u64, Value)>>;
    /// Keep replay snapshots of `key` by plugin `digest` (position, state).
    /// Idempotent: a snapshot is a pure function of the events and the
    /// plugin, so writing one twice writes the same value.
    async fn put_snapshots(
        &self,
        key: &EntityKey,
        digest: &str,
        snapshots: &[(u64, Value)],
    ) -> anyhow::Result<()>;
}

/// A complete backend: both stores, the plugin registry, plus the atomic
/// batch commit.
#[async_trait]
pub trait Storage: EventStore + StateStore + PluginStore {
    /// Apply a batch: raw events, states (fenced by `expected_head`),
    /// quarantines, projections, dead letters, then checkpoints. When this
    /// returns `Ok`, all of it is durable.
    async fn commit(&self, commit: Commit) -> Result<(), StoreError>;
}

/// Current time as RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Open the Cassandra storage.
pub async fn open_cassandra(
    config: &crate::config::CassandraConfig,
) -> anyhow::Result<std::sync::Arc<dyn Storage>> {
    Ok(std::sync::Arc::new(
        cassandra::CassandraStore::open(config).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn dead_letter(i: usize) -> DeadLetter {
        DeadLetter {
            id: format!("dl-{i:03}"),
            code: "invalid_json".into(),
            reason: "not JSON".into(),
            payload: "x".repeat(i),
            origin: None,
            event_id: None,
            entity_type: None,
            recorded_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn quarantine(i: usize) -> QuarantineRecord {
        QuarantineRecord {
            key: EntityKey::new(if i % 2 == 0 { "a" } else { "b" }, format!("e-{i}")),
            event_id: format!("ev-{i}"),
            event_position: 1,
            kind: "panic".into(),
            error: "boom".into(),
            plugin: PluginRef {
                name: "p".into(),
                version: "1".into(),
                digest: "d".into(),
            },
            recorded_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    /// Pages of at most `limit`, each resumed from the last item's cursor,
    /// list everything exactly once; the unpaged listings still see it all.
    #[tokio::test]
    async fn listings_page_through_everything_once() {
        let s = sqlite::SqliteStore::in_memory().unwrap();
        s.commit(Commit {
            dead_letters: (0..23).map(dead_letter).collect(),
            quarantines: (0..11).map(quarantine).collect(),
            ..Commit::default()
        })
        .await
        .unwrap();
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = s.dead_letter_page(after.as_deref(), 5).await.unwrap();
            assert!(page.len() <= 5);
            let Some(last) = page.last() else { break };
            after = Some(last.cursor.clone());
            seen.extend(page.into_iter().map(|p| p.item.id));
        }
        let want: Vec<String> = (0..23).map(|i| format!("dl-{i:03}")).collect();
        assert_eq!(seen, want, "arrival order, each once");
        assert_eq!(s.dead_letters(7).await.unwrap().len(), 7);
        assert_eq!(s.dead_letters(1000).await.unwrap().len(), 23);

        let mut keys = HashSet::new();
        let mut after: Option<String> = None;
        loop {
            let page = s.quarantine_page(after.as_deref(), 4).await.unwrap();
            assert!(page.len() <= 4);
            let Some(last) = page.last() else { break };
            after = Some(last.cursor.clone());
            for p in page {
                assert!(keys.insert(p.item.key), "listed twice");
            }
        }
        assert_eq!(keys.len(), 11);
        assert_eq!(s.quarantined().await.unwrap().len(), 11);

        let e = s.dead_letter_page(Some("not-hex"), 5).await.unwrap_err();
        assert!(e.downcast_ref::<BadCursor>().is_some(), "{e:#}");
        let e = s
            .quarantine_page(Some(&encode_cursor(&7)), 5)
            .await
            .unwrap_err();
        assert!(e.downcast_ref::<BadCursor>().is_some(), "{e:#}");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_454), (2026, 1, 1));
    }
}

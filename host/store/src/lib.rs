//! The storage traits the pipeline is written against, their records, and
//! the one error every storage method returns.
//!
//! Two implementations, each a crate of its own: `refold-store-sqlite`
//! (embedded, one machine) and `refold-store-cassandra` (cluster). This crate
//! depends on neither; with the `conformance` feature it holds the suite both
//! run ([`conformance`]). The pipeline computes one [`Commit`] per batch and hands it
//! over whole, so each backend can make it as atomic as it is able to:
//! SQLite in one transaction, Cassandra in one single-partition batch per
//! entity (raw events + state together), fenced by position.

pub mod change;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod plugins;

pub mod error;
pub use change::{
    ChangeKind, ChangeRecord, OutboxBatch, OutboxPartition, PendingChange, PublishedBatch,
    StoredChange,
};
pub use error::{BadCursor, Result, StoreError, decode_cursor, encode_cursor};
pub use plugins::{
    Activation, ActivationMode, PluginStore, PluginVersion, RebuildRecord, RebuildState,
    UnknownVariant,
};
pub use refold_types::{
    Checkpoint, EntityKey, EventIdentity, Generation, Origin, PluginRef, ProjectionWrite, RawJson,
    StoredEvent,
};

use std::collections::HashMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    /// The generation (lineage of states) `state` belongs to: the base one
    /// until a rebuild gives it another. A state is only ever folded
    /// forward within its own generation.
    #[serde(default)]
    pub generation: Generation,
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
            generation: Generation::base(),
        }
    }
}

/// A dead letter: input that could not become an event, with its reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    pub generation: Generation,
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
    /// Change records of this commit, at most one per entity, stored with
    /// it (all of them or none) in the store's change feed.
    pub changes: Vec<ChangeRecord>,
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

/// Raw events: append-only, idempotent by event id, read per entity.
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Of these identities, the ones already stored, each with the digest of
    /// the stored record (`None` when it was stored without one). An
    /// identity is the entity key and the event id: the same id under
    /// another entity is another event.
    async fn known_ids(
        &self,
        ids: &[EventIdentity],
    ) -> Result<HashMap<EventIdentity, Option<String>>>;
    /// An entity's events with `after < position <= upto`, in position
    /// order, as stored (the basis of a past-position query).
    async fn history(
        &self,
        key: &EntityKey,
        after: u64,
        upto: Option<u64>,
    ) -> Result<Vec<StoredEvent>>;
    /// The ids of an entity's events with `position <= upto`, in position
    /// order: what [`history`](Self::history) would give, without the
    /// events (a first touch learns what deduplication needs from it).
    async fn event_ids(&self, key: &EntityKey, upto: u64) -> Result<Vec<String>>;
    /// Ids of all entities of a type that have events, in no promised order.
    async fn entity_ids(&self, entity_type: &str) -> Result<Vec<String>>;
    /// One page of the ids of a type's entities that have events, like
    /// [`StateStore::dead_letter_page`] (SQLite: by id; Cassandra: by
    /// shard, then id).
    async fn entity_page(
        &self,
        entity_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<String>>>;
}

/// Entity states, projections, dead letters, quarantine and checkpoints.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Records for these entities (absent ones are omitted).
    async fn load(&self, keys: &[EntityKey]) -> Result<HashMap<EntityKey, EntityRecord>>;
    /// One document of a projection.
    async fn projection(&self, name: &str, key: &str) -> Result<Option<Value>>;
    /// One page of a projection's documents as (key, document), like
    /// [`StateStore::dead_letter_page`] (SQLite: by key; Cassandra: by
    /// shard of the key, then key).
    async fn projection_page(
        &self,
        name: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<(String, Value)>>>;
    /// One page of dead letters: those after the cursor `after` (from the
    /// start when `None`), at most `limit`, in the store's listing order
    /// (SQLite: arrival; Cassandra: by shard, then id), each with the cursor
    /// that resumes right after it. Reads no more than `limit` records, so a
    /// listing costs a page of memory however many there are. A cursor
    /// that is not of the shape the store issues is a [`BadCursor`].
    async fn dead_letter_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<DeadLetter>>>;
    /// Up to `limit` dead letters in listing order, read page by page.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
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
    /// One dead letter by id: a point read however many there are.
    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>>;
    /// Remove a dead letter (after it was re-submitted).
    async fn remove_dead_letter(&self, id: &str) -> Result<bool>;
    /// One page of quarantine records, like [`StateStore::dead_letter_page`]
    /// (SQLite: by entity type and id; Cassandra: by partition token).
    async fn quarantine_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<QuarantineRecord>>>;
    /// All quarantine records, read page by page.
    async fn quarantined(&self) -> Result<Vec<QuarantineRecord>> {
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
    /// Why one entity is quarantined, if it is: a point read.
    async fn quarantine(&self, key: &EntityKey) -> Result<Option<QuarantineRecord>>;
    /// Lift a quarantine: the record is removed and the entity flagged free.
    async fn release(&self, key: &EntityKey) -> Result<()>;
    /// Checkpoints recorded for a source, one per partition, as the last
    /// successful commit wrote them; in no promised order.
    async fn checkpoints(&self, source: &str) -> Result<Vec<Checkpoint>>;
    /// Merge the read model a generation built apart (documents under
    /// `name@ns`) into the live one (`name`), keeping each live document it
    /// replaces under `name@archive` so that a rollback can put it back.
    /// Runs after the cut-over, which is the activation itself: states move
    /// lazily (see ARCHITECTURE.md, "Generations").
    async fn adopt_projections(&self, ns: &str, archive: &str) -> Result<()>;
    /// Forget every state, quarantine and projection of namespace `ns`.
    async fn drop_namespace(&self, ns: &str) -> Result<()>;
    /// The latest replay snapshot of `key` by plugin `digest` at a position
    /// `<= at`: the state folded from the entity's first event up to that
    /// position by that plugin alone. Lets a past-position query replay a
    /// bounded stretch instead of the whole history.
    async fn snapshot_before(
        &self,
        key: &EntityKey,
        digest: &str,
        at: u64,
    ) -> Result<Option<(u64, Value)>>;
    /// Keep replay snapshots of `key` by plugin `digest` (position, state).
    /// Idempotent: a snapshot is a pure function of the events and the
    /// plugin, so writing one twice writes the same value.
    async fn put_snapshots(
        &self,
        key: &EntityKey,
        digest: &str,
        snapshots: &[(u64, Value)],
    ) -> Result<()>;
    /// Change records after `after` (0: from the oldest kept), at most
    /// `limit`, in feed order: commit order, and within a commit the order
    /// of [`Commit::changes`]. A record is in the feed once, however often
    /// its commit was attempted.
    async fn changes_after(&self, after: u64, limit: usize) -> Result<Vec<StoredChange>>;
    /// The cursor of the newest record in the feed (0 when empty).
    async fn changes_head(&self) -> Result<u64>;
    /// Forget the oldest records, up to the first committed at or after
    /// `before_ms` (Unix milliseconds), keeping the newest one whatever its
    /// age so that the feed's cursor never goes back. What is kept is
    /// contiguous: cursors follow each other with no hole, so a reader
    /// whose next record is not `after + 1` knows records were pruned.
    /// Returns how many were removed.
    async fn prune_changes(&self, before_ms: i64) -> Result<u64>;

    /// A store whose change records wait in an outbox for a publisher (a
    /// cluster store: there is no one commit order to number a feed by)
    /// says so; the others answer the feed calls above instead.
    fn has_outbox(&self) -> bool {
        false
    }
    /// Take over outbox partition `part` for publishing. `published` are
    /// the batches the last holder published but may not have deleted
    /// (they are deleted now, not handed out again); every other batch
    /// found is in doubt, and is handed out only once its entities show
    /// that its commit applied.
    async fn outbox_claim(
        &self,
        _part: &OutboxPartition,
        _published: &[PublishedBatch],
    ) -> Result<()> {
        Err(no_outbox())
    }
    /// The next batches of a claimed partition to publish, in order:
    /// whole batches, about `max` records (at least one batch if any).
    async fn outbox_next(&self, _part: &OutboxPartition, _max: usize) -> Result<Vec<OutboxBatch>> {
        Err(no_outbox())
    }
    /// Batches published (in the transaction whose marker names them):
    /// delete them.
    async fn outbox_done(
        &self,
        _part: &OutboxPartition,
        _published: &[PublishedBatch],
    ) -> Result<()> {
        Err(no_outbox())
    }
    /// Give up a partition (it moved to another holder): forget what this
    /// process holds of it. Its batches stay for the next holder.
    fn outbox_release(&self, _part: &OutboxPartition) {}
    /// Records this process holds ready to publish (a gauge).
    fn outbox_depth(&self) -> u64 {
        0
    }
}

fn no_outbox() -> StoreError {
    StoreError::Unsupported("this store has no change outbox".into())
}

/// A complete backend: both stores, the plugin registry, plus the atomic
/// batch commit.
#[async_trait]
pub trait Storage: EventStore + StateStore + PluginStore {
    /// Apply a batch: raw events, states (fenced by `expected_head`),
    /// quarantines, projections, dead letters, then checkpoints. When this
    /// returns `Ok`, all of it is durable. A state whose head is no longer
    /// `expected_head` (or that exists when `expected_head` is 0), or an
    /// event row that is already stored, fails the commit with
    /// [`StoreError::Fenced`], and a fenced commit leaves no part of itself
    /// behind.
    async fn commit(&self, commit: Commit) -> Result<(), StoreError>;
}

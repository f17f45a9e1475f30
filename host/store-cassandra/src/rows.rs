//! The rows the store writes and reads, bound by name: a struct deriving
//! `SerializeRow` fills the statement's `:name` bind markers, one deriving
//! `DeserializeRow` takes a result's columns by name (the CQL of each is in
//! `statements.rs`, under the name of its statement). The driver checks the
//! names against the prepared statement's metadata, so a column added is one
//! field here and one name in the CQL.

use scylla::{DeserializeRow, SerializeRow};

use refold_store::{
    Activation, DeadLetter, EntityKey, EntityUpdate, PluginRef, PluginVersion, QuarantineRecord,
    RawJson, RebuildRecord, StoreError, StoredEvent,
};
use refold_types::Generation;

use crate::error::stored;

/// A count kept as `bigint`: saturates instead of wrapping.
fn bigint(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored `bigint` count or position: never negative.
fn count(v: Option<i64>) -> u64 {
    v.unwrap_or(0).max(0) as u64
}

// ---- entity_log -------------------------------------------------------------

/// Where an entity's live bucket is, and its head there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Located {
    pub(crate) bucket: i64,
    pub(crate) base: u64,
    pub(crate) cap: u64,
    pub(crate) head: u64,
}

impl Located {
    pub(crate) fn full(&self) -> bool {
        self.head.saturating_sub(self.base) >= self.cap
    }
}

/// The static columns of one bucket, as the store uses them.
#[derive(Debug, Clone)]
pub(crate) struct StaticRow {
    pub(crate) base: u64,
    pub(crate) cap: u64,
    pub(crate) head: u64,
    pub(crate) state: Option<String>,
    pub(crate) position: u64,
    pub(crate) plugin: Option<PluginRef>,
    pub(crate) quarantined: bool,
    pub(crate) live: i64,
    pub(crate) generation: String,
}

impl StaticRow {
    pub(crate) fn located(&self, bucket: i64) -> Located {
        Located {
            bucket,
            base: self.base,
            cap: self.cap.max(1),
            head: self.head,
        }
    }
}

/// An entity's live bucket and its static row.
pub(crate) type Found = (Located, StaticRow);

/// `read_static`: the static columns of one bucket as stored.
#[derive(DeserializeRow)]
pub(crate) struct StaticColumns {
    base: Option<i64>,
    cap: Option<i64>,
    head: Option<i64>,
    state: Option<String>,
    state_position: Option<i64>,
    plugin_name: Option<String>,
    plugin_version: Option<String>,
    plugin_digest: Option<String>,
    quarantined: Option<bool>,
    live: Option<i64>,
    generation: Option<String>,
}

impl StaticColumns {
    /// `None` when the bucket holds no head: it was never opened.
    pub(crate) fn into_static(self, bucket_size: u64) -> Option<StaticRow> {
        Some(StaticRow {
            base: count(self.base),
            cap: self.cap.unwrap_or(bigint(bucket_size)).max(1) as u64,
            head: self.head?.max(0) as u64,
            state: self.state,
            position: count(self.state_position),
            plugin: match (self.plugin_name, self.plugin_version, self.plugin_digest) {
                (Some(name), Some(version), Some(digest)) => Some(PluginRef {
                    name,
                    version,
                    digest,
                }),
                _ => None,
            },
            quarantined: self.quarantined.unwrap_or(false),
            live: self.live.unwrap_or(0).max(0),
            generation: self.generation.unwrap_or_default(),
        })
    }
}

/// The state columns shared by `advance`, `open_bucket` and `put_state`.
#[derive(SerializeRow)]
pub(crate) struct StateValues<'a> {
    entity_type: &'a str,
    entity_id: &'a str,
    head: i64,
    state: String,
    state_position: i64,
    plugin_name: Option<&'a str>,
    plugin_version: Option<&'a str>,
    plugin_digest: Option<&'a str>,
    quarantined: bool,
    generation: &'a str,
}

impl<'a> StateValues<'a> {
    pub(crate) fn of(u: &'a EntityUpdate) -> Self {
        let p = u.plugin.as_ref();
        StateValues {
            entity_type: &u.key.entity_type,
            entity_id: &u.key.entity_id,
            head: bigint(u.head),
            state: u.state.to_string(),
            state_position: bigint(u.position),
            plugin_name: p.map(|p| p.name.as_str()),
            plugin_version: p.map(|p| p.version.as_str()),
            plugin_digest: p.map(|p| p.digest.as_str()),
            quarantined: u.quarantined,
            generation: u.generation.as_str(),
        }
    }
}

/// `advance`: the new state in the live bucket, fenced on its head.
#[derive(SerializeRow)]
pub(crate) struct AdvanceValues<'a> {
    #[scylla(flatten)]
    pub(crate) state: StateValues<'a>,
    pub(crate) bucket: i64,
    pub(crate) expected_head: i64,
}

/// `open_bucket`: the first state of a new bucket.
#[derive(SerializeRow)]
pub(crate) struct OpenBucketValues<'a> {
    #[scylla(flatten)]
    pub(crate) state: StateValues<'a>,
    pub(crate) bucket: i64,
    pub(crate) base: i64,
    pub(crate) cap: i64,
}

/// `put_state`: the state of a state-only entity, in bucket 0.
#[derive(SerializeRow)]
pub(crate) struct PutStateValues<'a> {
    #[scylla(flatten)]
    pub(crate) state: StateValues<'a>,
    pub(crate) cap: i64,
}

/// `insert_event`: one raw event row.
#[derive(SerializeRow)]
pub(crate) struct EventValues<'a> {
    entity_type: &'a str,
    entity_id: &'a str,
    bucket: i64,
    position: i64,
    event_id: &'a str,
    source: &'a str,
    event_type: &'a str,
    event_time: Option<&'a str>,
    data: &'a str,
    origin: Option<String>,
    record: Option<&'a str>,
    digest: Option<&'a str>,
}

impl<'a> EventValues<'a> {
    pub(crate) fn of(e: &'a StoredEvent, bucket: i64) -> Self {
        EventValues {
            entity_type: &e.key.entity_type,
            entity_id: &e.key.entity_id,
            bucket,
            position: bigint(e.position),
            event_id: &e.id,
            source: &e.source,
            event_type: &e.event_type,
            event_time: e.time.as_deref(),
            data: e.data.as_str(),
            origin: e
                .origin
                .as_ref()
                .map(|o| serde_json::to_string(o).unwrap_or_default()),
            record: e.record.as_ref().map(RawJson::as_str),
            digest: e.digest.as_deref(),
        }
    }
}

/// `insert_id`: one row of the event-id index.
#[derive(SerializeRow)]
pub(crate) struct IdValues<'a> {
    entity_type: &'a str,
    entity_id: &'a str,
    bucket: i64,
    event_id: &'a str,
    digest: Option<&'a str>,
}

impl<'a> IdValues<'a> {
    pub(crate) fn of(e: &'a StoredEvent, bucket: i64) -> Self {
        IdValues {
            entity_type: &e.key.entity_type,
            entity_id: &e.key.entity_id,
            bucket,
            event_id: &e.id,
            digest: e.digest.as_deref(),
        }
    }
}

/// `read_ids`: an event id found in the index, with its digest.
#[derive(DeserializeRow)]
pub(crate) struct IdRow {
    pub(crate) event_id: String,
    pub(crate) digest: Option<String>,
}

/// `read_events`: one raw event of a bucket.
#[derive(DeserializeRow)]
pub(crate) struct EventRow {
    position: i64,
    event_id: String,
    source: Option<String>,
    event_type: Option<String>,
    event_time: Option<String>,
    data: Option<String>,
    origin: Option<String>,
    record: Option<String>,
    digest: Option<String>,
}

impl EventRow {
    /// Data that is not JSON is damage to report; an origin or a record
    /// that does not parse is only lost metadata, as it always was.
    pub(crate) fn into_event(self, key: &EntityKey) -> Result<StoredEvent, StoreError> {
        let data = match self.data {
            None => RawJson::null(),
            Some(d) => RawJson::parse(&d).map_err(|e| {
                StoreError::Corrupt(format!(
                    "data of event {key} at position {} is not JSON ({e}); the keyspace is damaged",
                    self.position
                ))
            })?,
        };
        Ok(StoredEvent {
            key: key.clone(),
            position: self.position.max(0) as u64,
            id: self.event_id,
            source: self.source.unwrap_or_default(),
            event_type: self.event_type.unwrap_or_default(),
            time: self.event_time,
            data,
            origin: self.origin.and_then(|o| serde_json::from_str(&o).ok()),
            record: self.record.and_then(|r| RawJson::parse(&r).ok()),
            digest: self.digest,
        })
    }
}

// ---- read model, snapshots, checkpoints, intents -----------------------------

/// `projection_upsert`: one read-model document, at a client timestamp.
#[derive(SerializeRow)]
pub(crate) struct DocumentValues<'a> {
    pub(crate) projection: &'a str,
    pub(crate) doc_key: &'a str,
    pub(crate) body: &'a str,
    pub(crate) ts: i64,
}

/// `projection_delete`: a document removed, at a client timestamp.
#[derive(SerializeRow)]
pub(crate) struct DocumentKeyValues<'a> {
    pub(crate) projection: &'a str,
    pub(crate) doc_key: &'a str,
    pub(crate) ts: i64,
}

/// `projection_scan`: one read-model document.
#[derive(DeserializeRow)]
pub(crate) struct DocumentRow {
    pub(crate) projection: String,
    pub(crate) doc_key: String,
    pub(crate) body: Option<String>,
}

/// `snapshot_insert`: a replay snapshot.
#[derive(SerializeRow)]
pub(crate) struct SnapshotValues<'a> {
    pub(crate) entity_type: &'a str,
    pub(crate) entity_id: &'a str,
    pub(crate) digest: &'a str,
    pub(crate) position: i64,
    pub(crate) state: String,
}

/// `snapshot_read`: the latest snapshot at or before a position.
#[derive(DeserializeRow)]
pub(crate) struct SnapshotRow {
    pub(crate) position: i64,
    pub(crate) state: String,
}

/// `checkpoint_upsert`: a source position reached.
#[derive(SerializeRow)]
pub(crate) struct CheckpointValues<'a> {
    pub(crate) source: &'a str,
    pub(crate) part: i32,
    pub(crate) next_offset: i64,
    pub(crate) ts: i64,
}

/// `checkpoint_read`: one partition's position.
#[derive(DeserializeRow)]
pub(crate) struct CheckpointRow {
    pub(crate) part: i32,
    pub(crate) next_offset: i64,
}

/// `intent_insert`: one chunk of an intent.
#[derive(SerializeRow)]
pub(crate) struct IntentValues<'a> {
    pub(crate) id: &'a str,
    pub(crate) seq: i32,
    pub(crate) ts: i64,
    pub(crate) chunk: &'a str,
}

/// `insert_change`: the change row of an entity batch (kind 2, at the
/// record's last position, the commit's outbox id in `event_id`).
#[derive(SerializeRow)]
pub(crate) struct ChangeRowValues<'a> {
    pub(crate) entity_type: &'a str,
    pub(crate) entity_id: &'a str,
    pub(crate) bucket: i64,
    pub(crate) position: i64,
    pub(crate) batch_id: &'a str,
    pub(crate) ttl: i32,
}

/// `outbox_insert`: one record of a commit in its outbox partition.
#[derive(SerializeRow, Clone)]
pub(crate) struct OutboxValues {
    pub(crate) source: String,
    pub(crate) part: i32,
    pub(crate) batch_id: String,
    pub(crate) entity_type: String,
    pub(crate) entity_id: String,
    pub(crate) change_id: String,
    pub(crate) last_position: i64,
    pub(crate) expected_head: i64,
    pub(crate) certain: bool,
    pub(crate) event: String,
}

/// `outbox_read`: one record found in an outbox partition.
#[derive(DeserializeRow)]
pub(crate) struct OutboxRow {
    pub(crate) batch_id: String,
    pub(crate) entity_type: String,
    pub(crate) entity_id: String,
    pub(crate) change_id: Option<String>,
    pub(crate) last_position: Option<i64>,
    pub(crate) expected_head: Option<i64>,
    pub(crate) certain: Option<bool>,
    pub(crate) event: Option<String>,
}

/// `intent_read`: one chunk of an intent.
#[derive(DeserializeRow)]
pub(crate) struct IntentRow {
    pub(crate) id: String,
    pub(crate) seq: i32,
    pub(crate) chunk: Option<String>,
}

// ---- dead letters and quarantine ---------------------------------------------

/// `dead_letter_insert`: a dead letter in its shard.
#[derive(SerializeRow)]
pub(crate) struct DeadLetterValues<'a> {
    shard: i32,
    id: &'a str,
    code: &'a str,
    reason: &'a str,
    payload: &'a str,
    origin: Option<String>,
    event_id: Option<&'a str>,
    entity_type: Option<&'a str>,
    recorded_at: &'a str,
    ts: i64,
}

impl<'a> DeadLetterValues<'a> {
    pub(crate) fn of(d: &'a DeadLetter, shard: i32, ts: i64) -> Self {
        DeadLetterValues {
            shard,
            id: &d.id,
            code: &d.code,
            reason: &d.reason,
            payload: &d.payload,
            origin: d
                .origin
                .as_ref()
                .map(|o| serde_json::to_string(o).unwrap_or_default()),
            event_id: d.event_id.as_deref(),
            entity_type: d.entity_type.as_deref(),
            recorded_at: &d.recorded_at,
            ts,
        }
    }
}

/// `dead_letter_read`, `dead_letter_get`: one dead letter.
#[derive(DeserializeRow)]
pub(crate) struct DeadLetterRow {
    id: String,
    code: String,
    reason: String,
    payload: String,
    origin: Option<String>,
    event_id: Option<String>,
    entity_type: Option<String>,
    recorded_at: String,
}

impl DeadLetterRow {
    pub(crate) fn into_record(self) -> DeadLetter {
        DeadLetter {
            id: self.id,
            code: self.code,
            reason: self.reason,
            payload: self.payload,
            origin: self.origin.and_then(|o| serde_json::from_str(&o).ok()),
            event_id: self.event_id,
            entity_type: self.entity_type,
            recorded_at: self.recorded_at,
        }
    }
}

/// `quarantine_insert`: why an entity is quarantined, at a client timestamp.
#[derive(SerializeRow)]
pub(crate) struct QuarantineValues<'a> {
    entity_type: &'a str,
    entity_id: &'a str,
    event_id: &'a str,
    event_position: i64,
    failure_kind: &'a str,
    error: &'a str,
    plugin_name: &'a str,
    plugin_version: &'a str,
    plugin_digest: &'a str,
    recorded_at: &'a str,
    ts: i64,
}

impl<'a> QuarantineValues<'a> {
    pub(crate) fn of(q: &'a QuarantineRecord, ts: i64) -> Self {
        QuarantineValues {
            entity_type: &q.key.entity_type,
            entity_id: &q.key.entity_id,
            event_id: &q.event_id,
            event_position: bigint(q.event_position),
            failure_kind: &q.kind,
            error: &q.error,
            plugin_name: &q.plugin.name,
            plugin_version: &q.plugin.version,
            plugin_digest: &q.plugin.digest,
            recorded_at: &q.recorded_at,
            ts,
        }
    }
}

/// `quarantine_read`, `quarantine_get`: one quarantine record.
#[derive(DeserializeRow)]
pub(crate) struct QuarantineRow {
    entity_type: String,
    entity_id: String,
    event_id: String,
    event_position: i64,
    failure_kind: String,
    error: String,
    plugin_name: String,
    plugin_version: String,
    plugin_digest: String,
    recorded_at: String,
}

impl QuarantineRow {
    pub(crate) fn into_record(self) -> QuarantineRecord {
        QuarantineRecord {
            key: EntityKey::new(self.entity_type, self.entity_id),
            event_id: self.event_id,
            event_position: self.event_position.max(0) as u64,
            kind: self.failure_kind,
            error: self.error,
            plugin: PluginRef {
                name: self.plugin_name,
                version: self.plugin_version,
                digest: self.plugin_digest,
            },
            recorded_at: self.recorded_at,
        }
    }
}

/// `quarantine_page`: one quarantine record and its partition token (the
/// listing's cursor). The driver derives no flattening for reads, hence the
/// columns of [`QuarantineRow`] again.
#[derive(DeserializeRow)]
pub(crate) struct QuarantinePageRow {
    pub(crate) cursor_token: i64,
    entity_type: String,
    entity_id: String,
    event_id: String,
    event_position: i64,
    failure_kind: String,
    error: String,
    plugin_name: String,
    plugin_version: String,
    plugin_digest: String,
    recorded_at: String,
}

impl QuarantinePageRow {
    pub(crate) fn into_record(self) -> QuarantineRecord {
        QuarantineRow {
            entity_type: self.entity_type,
            entity_id: self.entity_id,
            event_id: self.event_id,
            event_position: self.event_position,
            failure_kind: self.failure_kind,
            error: self.error,
            plugin_name: self.plugin_name,
            plugin_version: self.plugin_version,
            plugin_digest: self.plugin_digest,
            recorded_at: self.recorded_at,
        }
        .into_record()
    }
}

// ---- plugin registry ----------------------------------------------------------

/// `plugin_version_insert`: an uploaded version, ordered by `seq`.
#[derive(SerializeRow)]
pub(crate) struct PluginVersionValues<'a> {
    entity_type: &'a str,
    digest: &'a str,
    name: &'a str,
    version: &'a str,
    size: i64,
    uploaded_at: &'a str,
    seq: i64,
}

impl<'a> PluginVersionValues<'a> {
    pub(crate) fn of(v: &'a PluginVersion, seq: i64) -> Self {
        PluginVersionValues {
            entity_type: &v.entity_type,
            digest: &v.digest,
            name: &v.name,
            version: &v.version,
            size: bigint(v.size),
            uploaded_at: &v.uploaded_at,
            seq,
        }
    }
}

/// `plugin_versions_read`: an uploaded version.
#[derive(DeserializeRow)]
pub(crate) struct PluginVersionRow {
    entity_type: String,
    name: String,
    version: String,
    digest: String,
    size: Option<i64>,
    uploaded_at: Option<String>,
    seq: Option<i64>,
}

impl PluginVersionRow {
    /// The version, and its upload sequence number.
    pub(crate) fn into_record(self) -> (i64, PluginVersion) {
        (
            self.seq.unwrap_or(0),
            PluginVersion {
                entity_type: self.entity_type,
                name: self.name,
                version: self.version,
                digest: self.digest,
                size: count(self.size),
                uploaded_at: self.uploaded_at.unwrap_or_default(),
            },
        )
    }
}

/// `plugin_blob_insert`: one chunk of a component.
#[derive(SerializeRow)]
pub(crate) struct BlobValues<'a> {
    pub(crate) digest: &'a str,
    pub(crate) chunk: i32,
    pub(crate) bytes: &'a [u8],
}

/// `plugin_blob_read`: one chunk of a component.
#[derive(DeserializeRow)]
pub(crate) struct BlobRow {
    pub(crate) chunk: i32,
    pub(crate) bytes: Option<Vec<u8>>,
}

/// `activation_insert`: the first activation of an entity type.
#[derive(SerializeRow)]
pub(crate) struct ActivationValues<'a> {
    entity_type: &'a str,
    digest: &'a str,
    previous: Option<&'a str>,
    mode: &'a str,
    seq: i64,
    activated_at: &'a str,
    generation: &'a str,
    previous_generation: Option<&'a str>,
    rolled_back: &'a [String],
}

impl<'a> ActivationValues<'a> {
    pub(crate) fn of(a: &'a Activation) -> Self {
        ActivationValues {
            entity_type: &a.entity_type,
            digest: &a.digest,
            previous: a.previous.as_deref(),
            mode: a.mode.as_str(),
            seq: a.seq,
            activated_at: &a.activated_at,
            generation: a.generation.as_str(),
            previous_generation: a.previous_generation.as_ref().map(Generation::as_str),
            rolled_back: &a.rolled_back,
        }
    }
}

/// `activation_update`: a later activation, fenced on the one it follows.
#[derive(SerializeRow)]
pub(crate) struct ActivationUpdateValues<'a> {
    #[scylla(flatten)]
    pub(crate) activation: ActivationValues<'a>,
    pub(crate) expected_seq: i64,
}

/// `activations_read`, `activation_get`: the active version of a type.
#[derive(DeserializeRow)]
pub(crate) struct ActivationRow {
    entity_type: String,
    digest: Option<String>,
    previous: Option<String>,
    mode: Option<String>,
    seq: Option<i64>,
    activated_at: Option<String>,
    generation: Option<String>,
    previous_generation: Option<String>,
    rolled_back: Option<Vec<String>>,
}

impl ActivationRow {
    pub(crate) fn into_record(self) -> Result<Activation, StoreError> {
        Ok(Activation {
            entity_type: self.entity_type,
            digest: self.digest.unwrap_or_default(),
            previous: self.previous,
            mode: stored(self.mode.as_deref().unwrap_or_default())?,
            seq: self.seq.unwrap_or(0),
            activated_at: self.activated_at.unwrap_or_default(),
            generation: self.generation.unwrap_or_default().into(),
            previous_generation: self.previous_generation.map(Generation::from),
            rolled_back: self.rolled_back.unwrap_or_default(),
        })
    }
}

/// `rebuild_insert`: a rebuild's record.
#[derive(SerializeRow)]
pub(crate) struct RebuildValues<'a> {
    id: &'a str,
    entity_type: &'a str,
    digest: &'a str,
    generation: &'a str,
    state: &'a str,
    entities_done: i64,
    entities_total: i64,
    events_done: i64,
    events_total: i64,
    quarantined: i64,
    error: Option<&'a str>,
    owner: &'a str,
    started_at: &'a str,
    finished_at: Option<&'a str>,
    heartbeat_ms: i64,
}

impl<'a> RebuildValues<'a> {
    pub(crate) fn of(r: &'a RebuildRecord) -> Self {
        RebuildValues {
            id: &r.id,
            entity_type: &r.entity_type,
            digest: &r.digest,
            generation: r.generation.as_str(),
            state: r.state.as_str(),
            entities_done: bigint(r.entities_done),
            entities_total: bigint(r.entities_total),
            events_done: bigint(r.events_done),
            events_total: bigint(r.events_total),
            quarantined: bigint(r.quarantined),
            error: r.error.as_deref(),
            owner: &r.owner,
            started_at: &r.started_at,
            finished_at: r.finished_at.as_deref(),
            heartbeat_ms: r.heartbeat_ms,
        }
    }
}

/// `rebuild_update`: a rebuild's record, fenced on the heartbeat its
/// writer last saw.
#[derive(SerializeRow)]
pub(crate) struct RebuildUpdateValues<'a> {
    #[scylla(flatten)]
    pub(crate) rebuild: RebuildValues<'a>,
    pub(crate) expected_heartbeat: i64,
}

/// `rebuilds_read`: a rebuild's record.
#[derive(DeserializeRow)]
pub(crate) struct RebuildRow {
    id: String,
    entity_type: Option<String>,
    digest: Option<String>,
    generation: Option<String>,
    state: Option<String>,
    entities_done: Option<i64>,
    entities_total: Option<i64>,
    events_done: Option<i64>,
    events_total: Option<i64>,
    quarantined: Option<i64>,
    error: Option<String>,
    owner: Option<String>,
    started_at: Option<String>,
    finished_at: Option<String>,
    heartbeat_ms: Option<i64>,
}

impl RebuildRow {
    pub(crate) fn into_record(self) -> Result<RebuildRecord, StoreError> {
        Ok(RebuildRecord {
            id: self.id,
            entity_type: self.entity_type.unwrap_or_default(),
            digest: self.digest.unwrap_or_default(),
            generation: self.generation.unwrap_or_default().into(),
            state: stored(self.state.as_deref().unwrap_or_default())?,
            entities_done: count(self.entities_done),
            entities_total: count(self.entities_total),
            events_done: count(self.events_done),
            events_total: count(self.events_total),
            quarantined: count(self.quarantined),
            error: self.error,
            owner: self.owner.unwrap_or_default(),
            started_at: self.started_at.unwrap_or_default(),
            finished_at: self.finished_at,
            heartbeat_ms: self.heartbeat_ms.unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_is_full_at_its_capacity() {
        let at = |bucket, base, cap, head| Located {
            bucket,
            base,
            cap,
            head,
        };
        assert!(!at(0, 0, 3, 2).full());
        assert!(at(0, 0, 3, 3).full());
        assert!(at(1, 4, 3, 7).full());
        assert!(!at(1, 4, 3, 5).full());
    }

    #[test]
    fn a_bucket_without_a_head_was_never_opened() {
        let cols = StaticColumns {
            base: None,
            cap: None,
            head: None,
            state: None,
            state_position: None,
            plugin_name: None,
            plugin_version: None,
            plugin_digest: None,
            quarantined: None,
            live: None,
            generation: None,
        };
        assert!(cols.into_static(10).is_none());
    }

    #[test]
    fn a_rebuild_in_an_unknown_state_is_corrupt() {
        let row = RebuildRow {
            id: "r".into(),
            entity_type: None,
            digest: None,
            generation: None,
            state: Some("paused".into()),
            entities_done: None,
            entities_total: None,
            events_done: None,
            events_total: None,
            quarantined: None,
            error: None,
            owner: None,
            started_at: None,
            finished_at: None,
            heartbeat_ms: None,
        };
        assert!(matches!(row.into_record(), Err(StoreError::Corrupt(_))));
    }
}

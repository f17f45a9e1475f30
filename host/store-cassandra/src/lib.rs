//! The cluster backend: Apache Cassandra (or ScyllaDB) through the `scylla`
//! driver. The schema and the reasons for its shape are in `CASSANDRA.md`
//! next to this file; in short:
//!
//! - An entity's raw events, its event-id index and its state share one
//!   partition per *bucket* of its history (`entity_log`, partition key
//!   `(entity_type, entity_id, bucket)`). The state lives in static columns
//!   of the entity's last ("live") bucket. A batch's effect on one entity is
//!   one single-partition conditional batch: the new event rows, their id
//!   rows and the new state, applied only `IF head = expected_head`. So the
//!   events and the state of an entity advance together or not at all, and a
//!   stale writer can neither overwrite a newer state nor clobber stored
//!   events (its whole batch is rejected).
//! - A bucket holds at least `bucket_size` events: a commit appends all of an
//!   entity's new events to the live bucket; once the live bucket holds
//!   `cap` events or more, the next commit opens the next bucket with
//!   `IF head = null` (only one writer can create it). Partitions stay
//!   bounded by `bucket_size` + one batch.
//! - Read-model writes, quarantine records, dead letters and checkpoints go
//!   to their own tables after the entity batches. Their writes carry one
//!   client timestamp per commit (`USING TIMESTAMP`), and the read-model
//!   part of a commit is first recorded as an intent (`pending_effects`), so
//!   that a commit interrupted after some entity batches applied (a crash, a
//!   timeout, a lost fence) still gets its effects written: by the next
//!   commit of this process, or by the next process that opens the store.
//!   Re-applying an intent is idempotent and, thanks to the fixed timestamp,
//!   never overwrites a newer write.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use futures::{StreamExt as _, stream};
use scylla::DeserializeRow;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{
    DbError, ExecutionError, NewSessionError, NextPageError, NextRowError, PagerExecutionError,
    PrepareError, RequestAttemptError, RequestError,
};
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod config;
pub use config::CassandraConfig;

use refold_store::{
    Activation, Checkpoint, Commit, DeadLetter, EntityKey, EntityRecord, EntityUpdate,
    EventIdentity, EventStore, Origin, Paged, PluginRef, PluginStore, PluginVersion,
    ProjectionWrite, QuarantineRecord, RawJson, RebuildRecord, StateStore, Storage, StoreError,
    StoredEvent, UnknownVariant, decode_cursor, encode_cursor,
};
use refold_types::Generation;

/// Shards of the small listing tables (entity index, dead letters).
const INDEX_SHARDS: i32 = 16;
const DEAD_LETTER_SHARDS: i32 = 8;
/// Event ids per `IN (...)` lookup.
const IDS_PER_QUERY: usize = 100;
/// Largest chunk of an intent row, in bytes.
const INTENT_CHUNK: usize = 256 << 10;
/// Largest chunk of a stored component, in bytes.
const BLOB_CHUNK: usize = 512 << 10;
/// How long a read keeps retrying while the cluster is unreachable.
const READ_RETRY_BUDGET: Duration = Duration::from_secs(5);
/// Client-side timeout of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries of the location cache before it is cleared.
const LOCATION_CACHE_MAX: usize = 200_000;
/// How long a static row read by `known_ids` may serve the `load` that
/// follows it (the pipeline calls them back to back for one batch).
const FRESH_FOR: Duration = Duration::from_secs(1);

/// The CQL schema, `{ks}` standing for the keyspace. See `CASSANDRA.md`.
const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {ks}.entity_log (
        entity_type    text,
        entity_id      text,
        bucket         bigint,
        kind           tinyint,
        position       bigint,
        event_id       text,
        source         text,
        event_type     text,
        event_time     text,
        data           text,
        origin         text,
        record         text,
        digest         text,
        base           bigint static,
        cap            bigint static,
        head           bigint static,
        state          text static,
        state_position bigint static,
        plugin_name    text static,
        plugin_version text static,
        plugin_digest  text static,
        quarantined    boolean static,
        live           bigint static,
        generation     text static,
        PRIMARY KEY ((entity_type, entity_id, bucket), kind, position, event_id)
    ) WITH comment = 'refold: raw events (kind 0), event-id index (kind 1) and state (static) of one bucket of an entity'",
    "CREATE TABLE IF NOT EXISTS {ks}.entity_index (
        entity_type text,
        shard       int,
        entity_id   text,
        PRIMARY KEY ((entity_type, shard), entity_id)
    ) WITH comment = 'refold: ids of the entities of a type (for rebuilds)'",
    "CREATE TABLE IF NOT EXISTS {ks}.projections (
        projection text,
        doc_key    text,
        body       text,
        PRIMARY KEY ((projection, doc_key))
    ) WITH comment = 'refold: read-model documents'",
    "CREATE TABLE IF NOT EXISTS {ks}.dead_letters (
        shard       int,
        id          text,
        code        text,
        reason      text,
        payload     text,
        origin      text,
        event_id    text,
        entity_type text,
        recorded_at text,
        PRIMARY KEY ((shard), id)
    ) WITH comment = 'refold: input that could not become an event'",
    "CREATE TABLE IF NOT EXISTS {ks}.quarantine (
        entity_type    text,
        entity_id      text,
        event_id       text,
        event_position bigint,
        failure_kind   text,
        error          text,
        plugin_name    text,
        plugin_version text,
        plugin_digest  text,
        recorded_at    text,
        PRIMARY KEY ((entity_type, entity_id))
    ) WITH comment = 'refold: why an entity is quarantined'",
    "CREATE TABLE IF NOT EXISTS {ks}.snapshots (
        entity_type text,
        entity_id   text,
        digest      text,
        position    bigint,
        state       text,
        PRIMARY KEY ((entity_type, entity_id), digest, position)
    ) WITH CLUSTERING ORDER BY (digest ASC, position DESC)
      AND comment = 'refold: replay snapshots for past-position queries (state folded from the first event by one plugin)'",
    "CREATE TABLE IF NOT EXISTS {ks}.checkpoints (
        source      text,
        part        int,
        next_offset bigint,
        PRIMARY KEY ((source), part)
    ) WITH comment = 'refold: source positions reached by committed batches'",
    "CREATE TABLE IF NOT EXISTS {ks}.plugin_versions (
        entity_type text,
        digest      text,
        name        text,
        version     text,
        size        bigint,
        uploaded_at text,
        seq         bigint,
        PRIMARY KEY ((entity_type), digest)
    ) WITH comment = 'refold: uploaded plugin versions'",
    "CREATE TABLE IF NOT EXISTS {ks}.plugin_blobs (
        digest text,
        chunk  int,
        bytes  blob,
        PRIMARY KEY ((digest), chunk)
    ) WITH comment = 'refold: plugin components, in chunks'",
    "CREATE TABLE IF NOT EXISTS {ks}.activations (
        entity_type  text PRIMARY KEY,
        digest       text,
        previous     text,
        mode         text,
        seq          bigint,
        activated_at text,
        generation   text,
        previous_generation text,
        rolled_back  list<text>
    ) WITH comment = 'refold: the active plugin version of each entity type'",
    "CREATE TABLE IF NOT EXISTS {ks}.rebuilds (
        id             text PRIMARY KEY,
        entity_type    text,
        digest         text,
        generation     text,
        state          text,
        entities_done  bigint,
        entities_total bigint,
        events_done    bigint,
        events_total   bigint,
        quarantined    bigint,
        error          text,
        owner          text,
        started_at     text,
        finished_at    text,
        heartbeat_ms   bigint
    ) WITH comment = 'refold: rebuilds, their progress and the host running each'",
    "CREATE TABLE IF NOT EXISTS {ks}.pending_effects (
        id    text,
        seq   int,
        ts    bigint,
        chunk text,
        PRIMARY KEY ((id), seq)
    ) WITH comment = 'refold: read-model effects of commits in flight (redo intents)'
      AND gc_grace_seconds = 600 AND default_time_to_live = 604800",
];

/// Columns added after the first release, for keyspaces created before.
/// `ALTER TABLE ... ADD` fails when the column exists; that is the no-op.
const UPGRADES: &[&str] = &[
    "ALTER TABLE {ks}.entity_log ADD generation text static",
    "ALTER TABLE {ks}.activations ADD generation text",
    "ALTER TABLE {ks}.activations ADD previous_generation text",
    "ALTER TABLE {ks}.entity_log ADD record text",
    "ALTER TABLE {ks}.entity_log ADD digest text",
    "ALTER TABLE {ks}.activations ADD rolled_back list<text>",
];

/// Where an entity's live bucket is, and its head there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Located {
    bucket: i64,
    base: u64,
    cap: u64,
    head: u64,
}

impl Located {
    fn full(&self) -> bool {
        self.head.saturating_sub(self.base) >= self.cap
    }
}

/// The static columns of one bucket.
#[derive(Debug, Clone)]
struct StaticRow {
    base: u64,
    cap: u64,
    head: u64,
    state: Option<String>,
    position: u64,
    plugin: Option<PluginRef>,
    quarantined: bool,
    live: i64,
    generation: String,
}

impl StaticRow {
    fn located(&self, bucket: i64) -> Located {
        Located {
            bucket,
            base: self.base,
            cap: self.cap.max(1),
            head: self.head,
        }
    }
}

/// An entity's live bucket and its static row.
type Found = (Located, StaticRow);

type StaticTuple = (
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<bool>,
    Option<i64>,
    Option<String>,
);

/// One read-model operation, as kept in an intent.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProjOp {
    projection: String,
    key: String,
    /// `None`: delete.
    body: Option<Value>,
}

/// The read-model effects of one commit, written with one timestamp.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Effects {
    /// Write timestamp (microseconds since the epoch) of every effect.
    ts: i64,
    quarantines: Vec<QuarantineRecord>,
    projections: Vec<ProjOp>,
    /// Entities whose quarantine record is removed.
    #[serde(default)]
    released: Vec<EntityKey>,
    /// One new event per entity of the commit: if none of them is stored,
    /// none of the commit's entity batches applied, and its effects must
    /// not be applied either.
    #[serde(default)]
    probes: Vec<(EntityKey, String)>,
}

impl Effects {
    fn is_empty(&self) -> bool {
        self.quarantines.is_empty() && self.projections.is_empty() && self.released.is_empty()
    }
}

/// An intent: effects recorded before the entity batches, under an id.
#[derive(Debug, Clone)]
struct Intent {
    id: String,
    effects: Effects,
}

struct Statements {
    read_static: PreparedStatement,
    read_ids: PreparedStatement,
    read_events: PreparedStatement,
    insert_event: PreparedStatement,
    insert_id: PreparedStatement,
    advance: PreparedStatement,
    open_bucket: PreparedStatement,
    set_live: PreparedStatement,
    release: PreparedStatement,
    index_insert: PreparedStatement,
    put_state: PreparedStatement,
    index_read: PreparedStatement,
    projection_upsert: PreparedStatement,
    projection_delete: PreparedStatement,
    projection_read: PreparedStatement,
    dead_letter_insert: PreparedStatement,
    dead_letter_read: PreparedStatement,
    dead_letter_get: PreparedStatement,
    dead_letter_exists: PreparedStatement,
    dead_letter_delete: PreparedStatement,
    quarantine_insert: PreparedStatement,
    quarantine_read: PreparedStatement,
    quarantine_get: PreparedStatement,
    quarantine_page: PreparedStatement,
    quarantine_delete: PreparedStatement,
    quarantine_release: PreparedStatement,
    checkpoint_upsert: PreparedStatement,
    checkpoint_read: PreparedStatement,
    snapshot_read: PreparedStatement,
    snapshot_insert: PreparedStatement,
    intent_insert: PreparedStatement,
    intent_delete: PreparedStatement,
    intent_read: PreparedStatement,
    delete_bucket: PreparedStatement,
    index_drop: PreparedStatement,
    projection_scan: PreparedStatement,
    plugin_version_insert: PreparedStatement,
    plugin_versions_read: PreparedStatement,
    plugin_blob_insert: PreparedStatement,
    plugin_blob_read: PreparedStatement,
    activation_insert: PreparedStatement,
    activation_update: PreparedStatement,
    rebuild_insert: PreparedStatement,
    rebuild_update: PreparedStatement,
    rebuilds_read: PreparedStatement,
    activations_read: PreparedStatement,
    activation_get: PreparedStatement,
}

/// Cassandra-backed [`Storage`].
pub struct CassandraStore {
    session: Session,
    st: Statements,
    bucket_size: u64,
    concurrency: usize,
    /// Live bucket of entities recently loaded or written by this process.
    /// Only a hint for `commit`: the conditional batch checks it.
    located: Mutex<HashMap<EntityKey, Located>>,
    /// Entity rows read by `known_ids`, taken (once) by the `load` that
    /// follows: it saves a read per entity and batch. A row gone stale
    /// meanwhile only costs a lost fence and a re-run.
    fresh: Mutex<HashMap<EntityKey, (Instant, Option<Found>)>>,
    /// Intents of failed commits of this process, re-applied by the next commit.
    carry: tokio::sync::Mutex<Vec<Intent>>,
    /// Last client timestamp handed out.
    clock: AtomicI64,
}

impl CassandraStore {
    /// Connect, create the keyspace and tables if missing, prepare every
    /// statement, and re-apply the intents left by interrupted commits.
    pub async fn open(config: &CassandraConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(!config.nodes.is_empty(), "[cassandra] nodes is empty");
        let ks = &config.keyspace;
        anyhow::ensure!(
            !ks.is_empty()
                && ks.len() <= 48
                && ks.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "[cassandra] keyspace {ks:?} must be 1 to 48 letters, digits or underscores"
        );
        let profile = ExecutionProfile::builder()
            .consistency(Consistency::LocalQuorum)
            .serial_consistency(Some(SerialConsistency::Serial))
            .request_timeout(Some(REQUEST_TIMEOUT))
            .build();
        let session = SessionBuilder::new()
            .known_nodes(&config.nodes)
            .connection_timeout(Duration::from_secs(5))
            .default_execution_profile_handle(profile.into_handle())
            .build()
            .await
            .map_err(|e: NewSessionError| anyhow::anyhow!(e))
            .with_context(|| format!("connecting to Cassandra at {}", config.nodes.join(",")))?;

        let replication = match &config.replication {
            Some(r) => r.clone(),
            None => format!(
                "{{'class': 'SimpleStrategy', 'replication_factor': {}}}",
                config.replication_factor.max(1)
            ),
        };
        session
            .query_unpaged(
                format!("CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {replication}"),
                (),
            )
            .await
            .with_context(|| format!("creating keyspace {ks}"))?;
        for ddl in SCHEMA {
            session
                .query_unpaged(ddl.replace("{ks}", ks), ())
                .await
                .with_context(|| format!("creating the schema in keyspace {ks}"))?;
        }
        for ddl in UPGRADES {
            if let Err(e) = session.query_unpaged(ddl.replace("{ks}", ks), ()).await {
                let msg = e.to_string();
                anyhow::ensure!(
                    msg.contains("already exist") || msg.contains("conflicts with"),
                    "upgrading the schema in keyspace {ks}: {msg}"
                );
            }
        }
        let st = prepare_all(&session, ks)
            .await
            .context("preparing statements")?;
        let store = CassandraStore {
            session,
            st,
            bucket_size: config.bucket_size.max(1),
            concurrency: config.concurrency.max(1),
            located: Mutex::new(HashMap::new()),
            fresh: Mutex::new(HashMap::new()),
            carry: tokio::sync::Mutex::new(Vec::new()),
            clock: AtomicI64::new(0),
        };
        let n = store
            .recover_intents()
            .await
            .context("re-applying interrupted commits")?;
        if n > 0 {
            tracing::info!(intents = n, "re-applied the effects of interrupted commits");
        }
        Ok(store)
    }

    /// A client write timestamp, strictly increasing within this process.
    fn next_ts(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let mut prev = self.clock.load(Ordering::Relaxed);
        loop {
            let ts = now.max(prev + 1);
            match self
                .clock
                .compare_exchange_weak(prev, ts, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return ts,
                Err(p) => prev = p,
            }
        }
    }

    fn remember(&self, key: &EntityKey, loc: Option<Located>) {
        let mut m = self.located.lock().unwrap_or_else(|e| e.into_inner());
        match loc {
            Some(l) => {
                if m.len() >= LOCATION_CACHE_MAX {
                    m.clear();
                }
                m.insert(key.clone(), l);
            }
            None => {
                m.remove(key);
            }
        }
    }

    fn stash(&self, key: &EntityKey, row: Option<Found>) {
        let mut m = self.fresh.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= LOCATION_CACHE_MAX {
            m.clear();
        }
        m.insert(key.clone(), (Instant::now(), row));
    }

    fn take_fresh(&self, key: &EntityKey) -> Option<Option<Found>> {
        let (at, row) = self
            .fresh
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)?;
        (at.elapsed() < FRESH_FOR).then_some(row)
    }

    fn cached(&self, key: &EntityKey) -> Option<Located> {
        self.located
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
    }

    // ---- reads --------------------------------------------------------------

    async fn read_static(
        &self,
        key: &EntityKey,
        bucket: i64,
    ) -> Result<Option<StaticRow>, StoreError> {
        let r = self
            .session
            .execute_unpaged(
                &self.st.read_static,
                (&key.entity_type, &key.entity_id, bucket),
            )
            .await
            .map_err(exec_err)?;
        let rows = r.into_rows_result().map_err(other)?;
        let row: Option<StaticTuple> = rows.maybe_first_row().map_err(other)?;
        Ok(row.and_then(
            |(base, cap, head, state, position, pn, pv, pd, q, live, generation)| {
                Some(StaticRow {
                    base: base.unwrap_or(0).max(0) as u64,
                    cap: cap.unwrap_or(self.bucket_size as i64).max(1) as u64,
                    head: head?.max(0) as u64,
                    state,
                    position: position.unwrap_or(0).max(0) as u64,
                    plugin: match (pn, pv, pd) {
                        (Some(name), Some(version), Some(digest)) => Some(PluginRef {
                            name,
                            version,
                            digest,
                        }),
                        _ => None,
                    },
                    quarantined: q.unwrap_or(false),
                    live: live.unwrap_or(0).max(0),
                    generation: generation.unwrap_or_default(),
                })
            },
        ))
    }

    /// Find the live bucket of an entity: bucket 0, or the one its `live`
    /// hint names, then forward past full buckets.
    async fn locate(&self, key: &EntityKey) -> Result<Option<Found>, StoreError> {
        let Some(s0) = self.read_static(key, 0).await? else {
            return Ok(None);
        };
        let hint = s0.live;
        let (mut bucket, mut s) = (0i64, s0);
        if hint > 0
            && let Some(sh) = self.read_static(key, hint).await?
        {
            bucket = hint;
            s = sh;
        }
        while s.located(bucket).full() {
            match self.read_static(key, bucket + 1).await? {
                Some(next) => {
                    bucket += 1;
                    s = next;
                }
                None => break,
            }
        }
        if bucket > hint {
            self.write_hint(key, bucket).await;
        }
        let loc = s.located(bucket);
        Ok(Some((loc, s)))
    }

    /// Record the live bucket in bucket 0 (best effort: it is only a hint,
    /// always a lower bound, and `locate` walks forward from it).
    async fn write_hint(&self, key: &EntityKey, bucket: i64) {
        if let Err(e) = self
            .session
            .execute_unpaged(
                &self.st.set_live,
                (bucket, &key.entity_type, &key.entity_id, 0i64),
            )
            .await
        {
            tracing::debug!(entity = %key, error = %e, "could not record the live bucket");
        }
    }

    /// Which of `ids` are stored in `buckets` of an entity.
    /// Of `ids`, those stored for `key` in these buckets, with their digests.
    async fn ids_in(
        &self,
        key: &EntityKey,
        buckets: Vec<i64>,
        ids: &[String],
    ) -> Result<HashMap<String, Option<String>>, StoreError> {
        let mut found = HashMap::new();
        for chunk in ids.chunks(IDS_PER_QUERY) {
            let r = self
                .session
                .execute_unpaged(
                    &self.st.read_ids,
                    (&key.entity_type, &key.entity_id, &buckets, chunk),
                )
                .await
                .map_err(exec_err)?;
            let rows = r.into_rows_result().map_err(other)?;
            for row in rows.rows::<(String, Option<String>)>().map_err(other)? {
                let (id, digest) = row.map_err(other)?;
                found.insert(id, digest);
            }
        }
        Ok(found)
    }

    async fn known_for(
        &self,
        key: &EntityKey,
        ids: Vec<String>,
    ) -> Result<HashMap<String, Option<String>>, StoreError> {
        let (s0, in0) = tokio::join!(self.read_static(key, 0), self.ids_in(key, vec![0], &ids));
        let Some(s0) = s0? else {
            self.stash(key, None);
            return Ok(HashMap::new());
        };
        let mut found = in0?;
        if s0.live == 0 && !s0.located(0).full() {
            self.stash(key, Some((s0.located(0), s0)));
            return Ok(found);
        }
        let Some((loc, row)) = self.locate(key).await? else {
            return Ok(found);
        };
        self.stash(key, Some((loc, row)));
        if loc.bucket > 0 {
            let rest: Vec<String> = ids.into_iter().filter(|i| !found.contains_key(i)).collect();
            if !rest.is_empty() {
                found.extend(self.ids_in(key, (1..=loc.bucket).collect(), &rest).await?);
            }
        }
        Ok(found)
    }

    async fn history_inner(
        &self,
        key: &EntityKey,
        after: u64,
        upto: Option<u64>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let Some((loc, _)) = self.locate(key).await? else {
            return Ok(Vec::new());
        };
        let upto = upto.unwrap_or(i64::MAX as u64).min(i64::MAX as u64) as i64;
        let after = after.min(i64::MAX as u64) as i64;
        let mut out = Vec::new();
        for bucket in 0..=loc.bucket {
            let pager = self
                .session
                .execute_iter(
                    self.st.read_events.clone(),
                    (&key.entity_type, &key.entity_id, bucket, after, upto),
                )
                .await
                .map_err(pager_err)?;
            type EventRow = (
                i64,
                String,
                Option<String>,
                Option<String>,
                Option<String>,
                Option<String>,
                Option<String>,
                Option<String>,
                Option<String>,
            );
            let mut rows = pager.rows_stream::<EventRow>().map_err(other)?;
            while let Some(row) = rows.next().await {
                let (position, id, source, event_type, time, data, origin, record, digest) =
                    row.map_err(row_err)?;
                let data = match data {
                    None => RawJson::null(),
                    Some(d) => RawJson::parse(&d).map_err(|e| {
                        StoreError::Other(anyhow::anyhow!(
                            "data of event {key} at position {position} is not JSON ({e}); the keyspace is damaged"
                        ))
                    })?,
                };
                out.push(StoredEvent {
                    key: key.clone(),
                    position: position.max(0) as u64,
                    id,
                    source: source.unwrap_or_default(),
                    event_type: event_type.unwrap_or_default(),
                    time,
                    data,
                    origin: origin.and_then(|o| serde_json::from_str::<Origin>(&o).ok()),
                    record: record.and_then(|r| RawJson::parse(&r).ok()),
                    digest,
                });
            }
        }
        Ok(out)
    }

    /// Run a read, retrying while the cluster is unreachable (up to
    /// [`READ_RETRY_BUDGET`]); a store outage shorter than that is waited out.
    async fn read<T, F, Fut>(&self, what: &str, mut f: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, StoreError>> + Send,
    {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(StoreError::Unavailable(e)) if started.elapsed() < READ_RETRY_BUDGET => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "Cassandra unavailable while {what}; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("Cassandra: {what}"))),
            }
        }
    }

    // ---- writes -------------------------------------------------------------

    /// Run `futs` with at most `concurrency` in flight; the first error wins.
    async fn all<F>(&self, futs: Vec<F>) -> Result<(), StoreError>
    where
        F: Future<Output = Result<QueryResult, ExecutionError>>,
    {
        let mut s = stream::iter(futs).buffer_unordered(self.concurrency);
        while let Some(r) = s.next().await {
            r.map_err(exec_err)?;
        }
        Ok(())
    }

    /// One entity's new events, id rows and state, as one conditional
    /// single-partition batch fenced on `expected_head`.
    /// A state-only partition written by its only writer: one plain write
    /// in a single bucket that never fills (no events are ever appended to
    /// it), instead of a conditional batch.
    async fn put_state(&self, u: &EntityUpdate) -> Result<(), StoreError> {
        let (t, id) = (&u.key.entity_type, &u.key.entity_id);
        if u.expected_head == 0 {
            let shard = shard_of(id, INDEX_SHARDS);
            self.session
                .execute_unpaged(&self.st.index_insert, (t, shard, id))
                .await
                .map_err(exec_err)?;
        }
        let p = u.plugin.as_ref();
        self.session
            .execute_unpaged(
                &self.st.put_state,
                (
                    i64::MAX / 2,
                    u.head as i64,
                    u.state.to_string(),
                    u.position as i64,
                    p.map(|p| p.name.as_str()),
                    p.map(|p| p.version.as_str()),
                    p.map(|p| p.digest.as_str()),
                    u.quarantined,
                    u.generation.as_str(),
                    t,
                    id,
                ),
            )
            .await
            .map_err(exec_err)?;
        self.remember(&u.key, None);
        Ok(())
    }

    async fn write_entity(
        &self,
        u: &EntityUpdate,
        events: &[&StoredEvent],
    ) -> Result<(), StoreError> {
        self.fresh
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&u.key);
        let loc = match self.cached(&u.key) {
            Some(l) if l.head == u.expected_head => Some(l),
            _ => self.locate(&u.key).await?.map(|(l, _)| l),
        };
        let loc_head = loc.map(|l| l.head).unwrap_or(0);
        if loc_head != u.expected_head {
            self.remember(&u.key, None);
            return Err(StoreError::Fenced(format!(
                "{} is at head {loc_head}, expected {}",
                u.key, u.expected_head
            )));
        }
        // Where the new events go, and on what the batch is conditioned.
        let (bucket, opens) = match loc {
            None => (0, true),
            Some(l) if l.full() => (l.bucket + 1, true),
            Some(l) => (l.bucket, false),
        };
        let (t, id) = (u.key.entity_type.as_str(), u.key.entity_id.as_str());
        if u.expected_head == 0 {
            // Listed before it exists: a superset is harmless, a gap is not.
            let shard = shard_of(id, INDEX_SHARDS);
            self.session
                .execute_unpaged(&self.st.index_insert, (t, shard, id))
                .await
                .map_err(exec_err)?;
        }

        let mut batch = Batch::new(BatchType::Unlogged);
        let mut values: Vec<Box<dyn SerializeRow + Send + Sync + '_>> =
            Vec::with_capacity(events.len() * 2 + 1);
        for e in events {
            batch.append_statement(self.st.insert_event.clone());
            values.push(Box::new((
                t,
                id,
                bucket,
                e.position as i64,
                e.id.as_str(),
                e.source.as_str(),
                e.event_type.as_str(),
                e.time.as_deref(),
                e.data.as_str(),
                e.origin
                    .as_ref()
                    .map(|o| serde_json::to_string(o).unwrap_or_default()),
                e.record.as_ref().map(RawJson::as_str),
                e.digest.as_deref(),
            )));
            batch.append_statement(self.st.insert_id.clone());
            values.push(Box::new((
                t,
                id,
                bucket,
                e.id.as_str(),
                e.digest.as_deref(),
            )));
        }
        let p = u.plugin.as_ref();
        let (pn, pv, pd) = (
            p.map(|p| p.name.as_str()),
            p.map(|p| p.version.as_str()),
            p.map(|p| p.digest.as_str()),
        );
        let state = u.state.to_string();
        if opens {
            batch.append_statement(self.st.open_bucket.clone());
            values.push(Box::new((
                u.expected_head as i64,
                self.bucket_size as i64,
                u.head as i64,
                state,
                u.position as i64,
                pn,
                pv,
                pd,
                u.quarantined,
                u.generation.as_str(),
                t,
                id,
                bucket,
            )));
        } else {
            batch.append_statement(self.st.advance.clone());
            values.push(Box::new((
                u.head as i64,
                state,
                u.position as i64,
                pn,
                pv,
                pd,
                u.quarantined,
                u.generation.as_str(),
                t,
                id,
                bucket,
                u.expected_head as i64,
            )));
        }
        batch.set_serial_consistency(Some(SerialConsistency::Serial));
        let r = self.session.batch(&batch, values).await.map_err(exec_err)?;
        if !applied(r)? {
            self.remember(&u.key, None);
            return Err(StoreError::Fenced(format!(
                "{} moved past head {} under us (bucket {bucket})",
                u.key, u.expected_head
            )));
        }
        let base = if opens {
            u.expected_head
        } else {
            loc.map(|l| l.base).unwrap_or(0)
        };
        let cap = if opens {
            self.bucket_size
        } else {
            loc.map(|l| l.cap).unwrap_or(self.bucket_size)
        };
        self.remember(
            &u.key,
            Some(Located {
                bucket,
                base,
                cap,
                head: u.head,
            }),
        );
        if opens && bucket > 0 {
            self.write_hint(&u.key, bucket).await;
        }
        Ok(())
    }

    /// Record an intent before the entity batches.
    async fn write_intent(&self, intent: &Intent) -> Result<(), StoreError> {
        let json = serde_json::to_string(&intent.effects).map_err(other)?;
        let chunks = split_utf8(&json, INTENT_CHUNK);
        let futs: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                self.session.execute_unpaged(
                    &self.st.intent_insert,
                    (&intent.id, i as i32, intent.effects.ts, *c),
                )
            })
            .collect();
        self.all(futs).await
    }

    async fn forget_intent(&self, id: &str) {
        if let Err(e) = self
            .session
            .execute_unpaged(&self.st.intent_delete, (id,))
            .await
        {
            tracing::debug!(intent = id, error = %e, "could not delete an applied intent");
        }
    }

    /// Quarantine records, then read-model writes (the last operation per
    /// document: the batch's net effect), all at the intent's timestamp.
    async fn apply_effects(&self, e: &Effects) -> Result<(), StoreError> {
        let ts = e.ts;
        // Releases first, one microsecond earlier: a record released and
        // quarantined again by the same commit stays.
        let futs: Vec<_> = e
            .released
            .iter()
            .map(|k| {
                self.session.execute_unpaged(
                    &self.st.quarantine_release,
                    (ts - 1, &k.entity_type, &k.entity_id),
                )
            })
            .collect();
        self.all(futs).await?;
        let futs: Vec<_> = e
            .quarantines
            .iter()
            .map(|q| {
                self.session.execute_unpaged(
                    &self.st.quarantine_insert,
                    (
                        &q.key.entity_type,
                        &q.key.entity_id,
                        &q.event_id,
                        q.event_position as i64,
                        &q.kind,
                        &q.error,
                        &q.plugin.name,
                        &q.plugin.version,
                        &q.plugin.digest,
                        &q.recorded_at,
                        ts,
                    ),
                )
            })
            .collect();
        self.all(futs).await?;
        let mut last: HashMap<(&str, &str), &ProjOp> = HashMap::new();
        for op in &e.projections {
            last.insert((op.projection.as_str(), op.key.as_str()), op);
        }
        let futs: Vec<_> = last
            .into_values()
            .map(|op| async move {
                match &op.body {
                    Some(body) => {
                        self.session
                            .execute_unpaged(
                                &self.st.projection_upsert,
                                (&op.projection, &op.key, body.to_string(), ts),
                            )
                            .await
                    }
                    None => {
                        self.session
                            .execute_unpaged(
                                &self.st.projection_delete,
                                (ts, &op.projection, &op.key),
                            )
                            .await
                    }
                }
            })
            .collect();
        self.all(futs).await
    }

    /// Apply (and delete) the intents left by commits that failed in this process.
    async fn apply_carried(&self) -> Result<(), StoreError> {
        let mut carry = self.carry.lock().await;
        while let Some(intent) = carry.first() {
            self.apply_if_committed(&intent.effects).await?;
            self.forget_intent(&intent.id).await;
            carry.remove(0);
        }
        Ok(())
    }

    /// Apply an interrupted commit's effects if any of its entity batches
    /// applied (or it had no events to tell).
    async fn apply_if_committed(&self, e: &Effects) -> Result<(), StoreError> {
        let mut applied = e.probes.is_empty();
        for (key, id) in &e.probes {
            if self
                .known_for(key, vec![id.clone()])
                .await?
                .contains_key(id)
            {
                applied = true;
                break;
            }
        }
        if applied {
            self.apply_effects(e).await
        } else {
            tracing::info!("dropping the effects of a commit that stored nothing");
            Ok(())
        }
    }

    /// Apply every intent found in the table (left by crashed or failed
    /// commits of any process). Idempotent; returns how many there were.
    async fn recover_intents(&self) -> anyhow::Result<usize> {
        let pager = self
            .session
            .execute_iter(self.st.intent_read.clone(), ())
            .await
            .map_err(pager_err)?;
        let mut rows = pager
            .rows_stream::<(String, i32, Option<i64>, Option<String>)>()
            .map_err(other)?;
        let mut intents: BTreeMap<String, BTreeMap<i32, String>> = BTreeMap::new();
        while let Some(row) = rows.next().await {
            let (id, seq, _ts, chunk) = row.map_err(row_err)?;
            intents
                .entry(id)
                .or_default()
                .insert(seq, chunk.unwrap_or_default());
        }
        let n = intents.len();
        for (id, chunks) in intents {
            let json: String = chunks.into_values().collect();
            match serde_json::from_str::<Effects>(&json) {
                Ok(effects) => self.apply_if_committed(&effects).await?,
                // A partial intent: its commit never got to the entity batches.
                Err(e) => tracing::warn!(intent = %id, error = %e, "dropping an incomplete intent"),
            }
            self.forget_intent(&id).await;
        }
        Ok(n)
    }

    async fn commit_inner(
        &self,
        commit: &Commit,
        intent: Option<&Intent>,
    ) -> Result<(), StoreError> {
        // 1. Events + state, per entity, fenced.
        let mut by_key: HashMap<&EntityKey, Vec<&StoredEvent>> = HashMap::new();
        for e in &commit.events {
            by_key.entry(&e.key).or_default().push(e);
        }
        let updated: HashSet<&EntityKey> = commit.entities.iter().map(|u| &u.key).collect();
        if let Some(k) = by_key.keys().find(|k| !updated.contains(**k)) {
            // Events are only ever stored together with their entity's state.
            return Err(StoreError::Other(anyhow::anyhow!(
                "events of {k} come without an entity update"
            )));
        }
        let futs: Vec<_> = commit
            .entities
            .iter()
            .map(|u| {
                let events = by_key.get(&u.key).map(Vec::as_slice).unwrap_or(&[]);
                async move {
                    if commit.exclusive && events.is_empty() {
                        self.put_state(u).await
                    } else {
                        self.write_entity(u, events).await
                    }
                }
            })
            .collect();
        let mut results = stream::iter(futs).buffer_unordered(self.concurrency);
        let mut failure: Option<StoreError> = None;
        while let Some(r) = results.next().await {
            if let Err(e) = r {
                failure = Some(match (failure, e) {
                    (Some(StoreError::Other(a)), _) | (_, StoreError::Other(a)) => {
                        StoreError::Other(a)
                    }
                    (Some(StoreError::Unavailable(a)), _) | (_, StoreError::Unavailable(a)) => {
                        StoreError::Unavailable(a)
                    }
                    (_, f) => f,
                });
            }
        }
        drop(results);
        if let Some(f) = failure {
            return Err(f);
        }
        // 2. Quarantine records and read-model writes.
        if let Some(i) = intent {
            self.apply_effects(&i.effects).await?;
        }
        let ts = intent
            .map(|i| i.effects.ts)
            .unwrap_or_else(|| self.next_ts());
        // 3. Dead letters (deterministic ids: re-inserting one is harmless).
        let futs: Vec<_> = commit
            .dead_letters
            .iter()
            .map(|d| {
                self.session.execute_unpaged(
                    &self.st.dead_letter_insert,
                    (
                        shard_of(&d.id, DEAD_LETTER_SHARDS),
                        &d.id,
                        &d.code,
                        &d.reason,
                        &d.payload,
                        d.origin
                            .as_ref()
                            .map(|o| serde_json::to_string(o).unwrap_or_default()),
                        d.event_id.as_deref(),
                        d.entity_type.as_deref(),
                        &d.recorded_at,
                        ts,
                    ),
                )
            })
            .collect();
        self.all(futs).await?;
        // 4. Checkpoints.
        let futs: Vec<_> = commit
            .checkpoints
            .iter()
            .map(|c| {
                self.session.execute_unpaged(
                    &self.st.checkpoint_upsert,
                    (&c.source, c.partition, c.offset, ts),
                )
            })
            .collect();
        self.all(futs).await
    }

    // ---- generations (namespaces) -------------------------------------------

    fn forget_locations(&self) {
        self.located
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.fresh.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    async fn index_ids(&self, entity_type: &str) -> Result<BTreeSet<String>, StoreError> {
        let mut ids = BTreeSet::new();
        for shard in 0..INDEX_SHARDS {
            let pager = self
                .session
                .execute_iter(self.st.index_read.clone(), (entity_type, shard))
                .await
                .map_err(pager_err)?;
            let mut rows = pager.rows_stream::<(String,)>().map_err(other)?;
            while let Some(r) = rows.next().await {
                ids.insert(r.map_err(row_err)?.0);
            }
        }
        Ok(ids)
    }

    async fn drop_index(&self, entity_type: &str) -> Result<(), StoreError> {
        let futs: Vec<_> = (0..INDEX_SHARDS)
            .map(|shard| {
                self.session
                    .execute_unpaged(&self.st.index_drop, (entity_type, shard))
            })
            .collect();
        self.all(futs).await
    }

    /// Delete every bucket of one entity (a namespace's state).
    async fn drop_entity(&self, key: &EntityKey) -> Result<(), StoreError> {
        let Some((loc, _)) = self.locate(key).await? else {
            return Ok(());
        };
        let futs: Vec<_> = (0..=loc.bucket)
            .map(|b| {
                self.session.execute_unpaged(
                    &self.st.delete_bucket,
                    (&key.entity_type, &key.entity_id, b),
                )
            })
            .collect();
        self.all(futs).await
    }

    async fn all_quarantine(&self) -> Result<Vec<QuarantineRecord>, StoreError> {
        let pager = self
            .session
            .execute_iter(self.st.quarantine_read.clone(), ())
            .await
            .map_err(pager_err)?;
        type QRow = (
            String,
            String,
            String,
            i64,
            String,
            String,
            String,
            String,
            String,
            String,
        );
        let mut rows = pager.rows_stream::<QRow>().map_err(other)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().await {
            let (t, id, event_id, pos, kind, error, pn, pv, pd, at) = r.map_err(row_err)?;
            out.push(QuarantineRecord {
                key: EntityKey::new(t, id),
                event_id,
                event_position: pos.max(0) as u64,
                kind,
                error,
                plugin: PluginRef {
                    name: pn,
                    version: pv,
                    digest: pd,
                },
                recorded_at: at,
            });
        }
        Ok(out)
    }

    async fn drop_quarantine(&self, key: &EntityKey, ts: i64) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(
                &self.st.quarantine_release,
                (ts, &key.entity_type, &key.entity_id),
            )
            .await
            .map_err(exec_err)?;
        Ok(())
    }

    /// Every read-model document whose projection name ends with `@ns`.
    async fn namespace_documents(
        &self,
        ns: &str,
    ) -> Result<Vec<(String, String, Option<String>)>, StoreError> {
        let suffix = format!("@{ns}");
        let pager = self
            .session
            .execute_iter(self.st.projection_scan.clone(), ())
            .await
            .map_err(pager_err)?;
        let mut rows = pager
            .rows_stream::<(String, String, Option<String>)>()
            .map_err(other)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().await {
            let row = r.map_err(row_err)?;
            if row.0.ends_with(&suffix) {
                out.push(row);
            }
        }
        Ok(out)
    }

    async fn drop_namespace_inner(&self, ns: &str) -> Result<(), StoreError> {
        self.forget_locations();
        let ts = self.next_ts();
        let ids = self.index_ids(ns).await?;
        let keys: Vec<EntityKey> = ids.into_iter().map(|i| EntityKey::new(ns, i)).collect();
        let futs: Vec<_> = keys.iter().map(|k| self.drop_entity(k)).collect();
        let mut s = stream::iter(futs).buffer_unordered(self.concurrency);
        while let Some(r) = s.next().await {
            r?;
        }
        drop(s);
        self.drop_index(ns).await?;
        for q in self.all_quarantine().await? {
            if q.key.entity_type == ns {
                self.drop_quarantine(&q.key, ts).await?;
            }
        }
        let docs = self.namespace_documents(ns).await?;
        let futs: Vec<_> = docs
            .iter()
            .map(|(p, k, _)| {
                self.session
                    .execute_unpaged(&self.st.projection_delete, (ts, p, k))
            })
            .collect();
        self.all(futs).await?;
        self.forget_locations();
        Ok(())
    }

    /// Move the documents under `name@ns` to `name`, first keeping each
    /// live document they replace under `name@archive`.
    async fn adopt_projections_inner(&self, ns: &str, archive: &str) -> Result<(), StoreError> {
        let (ts, ts2) = (self.next_ts(), self.next_ts());
        let kept = self.namespace_documents(archive).await?;
        let futs: Vec<_> = kept
            .iter()
            .map(|(p, k, _)| {
                self.session
                    .execute_unpaged(&self.st.projection_delete, (ts, p, k))
            })
            .collect();
        self.all(futs).await?;
        let docs = self.namespace_documents(ns).await?;
        let suffix_len = ns.len() + 1;
        let futs: Vec<_> = docs
            .iter()
            .map(|(p, k, body)| async move {
                let live = &p[..p.len() - suffix_len];
                let r = self
                    .session
                    .execute_unpaged(&self.st.projection_read, (live, k))
                    .await?;
                let old: Option<(Option<String>,)> = r
                    .into_rows_result()
                    .ok()
                    .and_then(|rows| rows.maybe_first_row().ok().flatten());
                if let Some((Some(old),)) = old {
                    let keep = format!("{live}@{archive}");
                    self.session
                        .execute_unpaged(&self.st.projection_upsert, (&keep, k, old.as_str(), ts))
                        .await?;
                }
                if let Some(b) = body {
                    self.session
                        .execute_unpaged(&self.st.projection_upsert, (live, k, b.as_str(), ts2))
                        .await?;
                }
                self.session
                    .execute_unpaged(&self.st.projection_delete, (ts2, p, k))
                    .await
            })
            .collect();
        self.all(futs).await?;
        Ok(())
    }
}

#[async_trait]
impl EventStore for CassandraStore {
    async fn known_ids(
        &self,
        ids: &[EventIdentity],
    ) -> Result<HashMap<EventIdentity, Option<String>>, StoreError> {
        let r: anyhow::Result<HashMap<EventIdentity, Option<String>>> = async {
            let mut per: HashMap<&EntityKey, Vec<String>> = HashMap::new();
            for (k, id) in ids {
                per.entry(k).or_default().push(id.clone());
            }
            let per: Vec<(&EntityKey, Vec<String>)> = per.into_iter().collect();
            self.read("looking up event ids", || async {
                let futs: Vec<_> = per
                    .iter()
                    .map(|(k, ids)| async move { (*k, self.known_for(k, ids.clone()).await) })
                    .collect();
                let mut s = stream::iter(futs).buffer_unordered(self.concurrency);
                // Keyed by the whole identity: an id known for one entity says
                // nothing about another entity's event with the same id.
                let mut known = HashMap::new();
                while let Some((k, r)) = s.next().await {
                    for (id, digest) in r? {
                        known.insert((k.clone(), id), digest);
                    }
                }
                Ok(known)
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn history(
        &self,
        key: &EntityKey,
        after: u64,
        upto: Option<u64>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let r: anyhow::Result<Vec<StoredEvent>> = async {
            self.read("reading a history", || self.history_inner(key, after, upto))
                .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn entity_ids(&self, entity_type: &str) -> Result<Vec<String>, StoreError> {
        let r: anyhow::Result<Vec<String>> = async {
            self.read("listing entities", || async {
                let mut ids = Vec::new();
                for shard in 0..INDEX_SHARDS {
                    let pager = self
                        .session
                        .execute_iter(self.st.index_read.clone(), (entity_type, shard))
                        .await
                        .map_err(pager_err)?;
                    let mut rows = pager.rows_stream::<(String,)>().map_err(other)?;
                    while let Some(r) = rows.next().await {
                        ids.push(r.map_err(row_err)?.0);
                    }
                }
                ids.sort();
                ids.dedup();
                Ok(ids)
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }
}

#[async_trait]
impl StateStore for CassandraStore {
    async fn load(
        &self,
        keys: &[EntityKey],
    ) -> Result<HashMap<EntityKey, EntityRecord>, StoreError> {
        let r: anyhow::Result<HashMap<EntityKey, EntityRecord>> = async {
            self.read("loading entities", || async {
                let futs: Vec<_> = keys
                    .iter()
                    .map(|k| async move {
                        match self.take_fresh(k) {
                            Some(row) => (k, Ok(row)),
                            None => (k, self.locate(k).await),
                        }
                    })
                    .collect();
                let mut s = stream::iter(futs).buffer_unordered(self.concurrency);
                let mut out = HashMap::new();
                while let Some((k, r)) = s.next().await {
                    let Some((loc, row)) = r? else {
                        self.remember(k, None);
                        continue;
                    };
                    self.remember(k, Some(loc));
                    // A state that is not JSON is damage to report, never a
                    // silent `null` that a fold would start over from.
                    let state = match row.state.as_deref() {
                        None => None,
                        Some(s) => Some(serde_json::from_str(s).map_err(|e| {
                            StoreError::Other(anyhow::anyhow!(
                                "the state of {k} is not JSON ({e}); the keyspace is damaged"
                            ))
                        })?),
                    };
                    out.insert(
                        k.clone(),
                        EntityRecord {
                            key: k.clone(),
                            state,
                            position: row.position,
                            head: row.head,
                            plugin: row.plugin,
                            quarantined: row.quarantined,
                            generation: row.generation.into(),
                        },
                    );
                }
                Ok(out)
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn projection(&self, name: &str, key: &str) -> Result<Option<Value>, StoreError> {
        let r: anyhow::Result<Option<Value>> = async {
            self.read("reading a projection", || async {
                let r = self
                    .session
                    .execute_unpaged(&self.st.projection_read, (name, key))
                    .await
                    .map_err(exec_err)?;
                let row: Option<(Option<String>,)> = r
                    .into_rows_result()
                    .map_err(other)?
                    .maybe_first_row()
                    .map_err(other)?;
                Ok(row
                    .and_then(|(b,)| b)
                    .map(|b| serde_json::from_str(&b).unwrap_or(Value::Null)))
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn dead_letter_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<DeadLetter>>, StoreError> {
        let r: anyhow::Result<Vec<Paged<DeadLetter>>> = async {
            // The cursor is (shard, id) of the last item seen: each shard is one
            // partition clustered by id, read in order, shard after shard, so a
            // page is at most `limit` rows whatever the table holds.
            let (first_shard, first_id): (i32, String) =
                after.map(decode_cursor).transpose()?.unwrap_or_default();
            let limit = limit.min(i32::MAX as usize);
            self.read("listing dead letters", || async {
            let mut page = Vec::new();
            for shard in first_shard.max(0)..DEAD_LETTER_SHARDS {
                if page.len() >= limit {
                    break;
                }
                // "" sorts before every id: the whole next shard.
                let after_id = if shard == first_shard {
                    first_id.as_str()
                } else {
                    ""
                };
                let r = self
                    .session
                    .execute_unpaged(
                        &self.st.dead_letter_read,
                        (shard, after_id, (limit - page.len()) as i32),
                    )
                    .await
                    .map_err(exec_err)?;
                type DlRow = (
                    String,
                    String,
                    String,
                    String,
                    Option<String>,
                    Option<String>,
                    Option<String>,
                    String,
                );
                let rows = r.into_rows_result().map_err(other)?;
                for row in rows.rows::<DlRow>().map_err(other)? {
                    let (id, code, reason, payload, origin, event_id, entity_type, recorded_at) =
                        row.map_err(other)?;
                    page.push(Paged {
                        cursor: encode_cursor(&(shard, &id)),
                        item: DeadLetter {
                            id,
                            code,
                            reason,
                            payload,
                            origin: origin.and_then(|o| serde_json::from_str(&o).ok()),
                            event_id,
                            entity_type,
                            recorded_at,
                        },
                    });
                }
            }
            Ok(page)
        })
        .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        let shard = shard_of(id, DEAD_LETTER_SHARDS);
        self.read("reading a dead letter", || async {
            let r = self
                .session
                .execute_unpaged(&self.st.dead_letter_get, (shard, id))
                .await
                .map_err(exec_err)?;
            let row: Option<DeadLetterRow> = r
                .into_rows_result()
                .map_err(other)?
                .maybe_first_row()
                .map_err(other)?;
            Ok(row.map(DeadLetterRow::into_record))
        })
        .await
        .map_err(cql_error)
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool, StoreError> {
        let r: anyhow::Result<bool> = async {
            let shard = shard_of(id, DEAD_LETTER_SHARDS);
            self.read("removing a dead letter", || async {
                let r = self
                    .session
                    .execute_unpaged(&self.st.dead_letter_exists, (shard, id))
                    .await
                    .map_err(exec_err)?;
                let found: Option<(String,)> = r
                    .into_rows_result()
                    .map_err(other)?
                    .maybe_first_row()
                    .map_err(other)?;
                if found.is_none() {
                    return Ok(false);
                }
                self.session
                    .execute_unpaged(&self.st.dead_letter_delete, (shard, id))
                    .await
                    .map_err(exec_err)?;
                Ok(true)
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn quarantine(&self, key: &EntityKey) -> Result<Option<QuarantineRecord>, StoreError> {
        self.read("reading a quarantine record", || async {
            let r = self
                .session
                .execute_unpaged(&self.st.quarantine_get, (&key.entity_type, &key.entity_id))
                .await
                .map_err(exec_err)?;
            let row: Option<QuarantineRow> = r
                .into_rows_result()
                .map_err(other)?
                .maybe_first_row()
                .map_err(other)?;
            Ok(row.map(|q| q.into_record(key.clone())))
        })
        .await
        .map_err(cql_error)
    }

    async fn quarantine_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<QuarantineRecord>>, StoreError> {
        let r: anyhow::Result<Vec<Paged<QuarantineRecord>>> = async {
            // The cursor is the partition token of the last item seen (one
            // partition per entity): a range scan from it reads at most `limit`
            // rows. No key hashes to i64::MIN under Murmur3, so `> MIN` is the
            // whole table. Two entities sharing a 64-bit token across a page
            // boundary would lose the second; the odds are negligible.
            let after: i64 = after.map(decode_cursor).transpose()?.unwrap_or(i64::MIN);
            let limit = limit.min(i32::MAX as usize) as i32;
            self.read("listing quarantined entities", || async {
                let r = self
                    .session
                    .execute_unpaged(&self.st.quarantine_page, (after, limit))
                    .await
                    .map_err(exec_err)?;
                type QRow = (
                    i64,
                    String,
                    String,
                    String,
                    i64,
                    String,
                    String,
                    String,
                    String,
                    String,
                    String,
                );
                let rows = r.into_rows_result().map_err(other)?;
                let mut page = Vec::new();
                for row in rows.rows::<QRow>().map_err(other)? {
                    let (token, t, id, event_id, pos, kind, error, pn, pv, pd, at) =
                        row.map_err(other)?;
                    page.push(Paged {
                        cursor: encode_cursor(&token),
                        item: QuarantineRecord {
                            key: EntityKey::new(t, id),
                            event_id,
                            event_position: pos.max(0) as u64,
                            kind,
                            error,
                            plugin: PluginRef {
                                name: pn,
                                version: pv,
                                digest: pd,
                            },
                            recorded_at: at,
                        },
                    });
                }
                Ok(page)
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn release(&self, key: &EntityKey) -> Result<(), StoreError> {
        let r: anyhow::Result<()> = async {
            self.read("releasing an entity", || async {
                self.fresh
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(key);
                // Clear the flag in the live bucket, fenced on its head so that a
                // concurrent commit is not half-overwritten; retry if it moved.
                for _ in 0..20 {
                    let Some((loc, _)) = self.locate(key).await? else {
                        break;
                    };
                    let r = self
                        .session
                        .execute_unpaged(
                            &self.st.release,
                            (
                                &key.entity_type,
                                &key.entity_id,
                                loc.bucket,
                                loc.head as i64,
                            ),
                        )
                        .await
                        .map_err(exec_err)?;
                    if applied(r)? {
                        break;
                    }
                }
                self.session
                    .execute_unpaged(
                        &self.st.quarantine_delete,
                        (&key.entity_type, &key.entity_id),
                    )
                    .await
                    .map_err(exec_err)?;
                Ok(())
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn adopt_projections(&self, ns: &str, archive: &str) -> Result<(), StoreError> {
        let r: anyhow::Result<()> = async {
            self.read("adopting a generation's read model", || {
                self.adopt_projections_inner(ns, archive)
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn drop_namespace(&self, ns: &str) -> Result<(), StoreError> {
        let r: anyhow::Result<()> = async {
            self.read("dropping a generation", || self.drop_namespace_inner(ns))
                .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn snapshot_before(
        &self,
        key: &EntityKey,
        digest: &str,
        at: u64,
    ) -> Result<Option<(u64, Value)>, StoreError> {
        let r: anyhow::Result<Option<(u64, Value)>> = async {
            let at = at.min(i64::MAX as u64) as i64;
            self.read("reading a snapshot", || async {
                let r = self
                    .session
                    .execute_unpaged(
                        &self.st.snapshot_read,
                        (&key.entity_type, &key.entity_id, digest, at),
                    )
                    .await
                    .map_err(exec_err)?;
                let rows = r.into_rows_result().map_err(other)?;
                let row = rows.maybe_first_row::<(i64, String)>().map_err(other)?;
                // A snapshot that does not parse is only a lost shortcut.
                Ok(row
                    .and_then(|(p, s)| serde_json::from_str(&s).ok().map(|v| (p.max(0) as u64, v))))
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn put_snapshots(
        &self,
        key: &EntityKey,
        digest: &str,
        snapshots: &[(u64, Value)],
    ) -> Result<(), StoreError> {
        let r: anyhow::Result<()> = async {
            let futs: Vec<_> = snapshots
                .iter()
                .map(|(p, v)| {
                    self.session.execute_unpaged(
                        &self.st.snapshot_insert,
                        (
                            &key.entity_type,
                            &key.entity_id,
                            digest,
                            *p as i64,
                            v.to_string(),
                        ),
                    )
                })
                .collect();
            self.all(futs).await?;
            Ok(())
        }
        .await;
        r.map_err(cql_error)
    }

    async fn checkpoints(&self, source: &str) -> Result<Vec<Checkpoint>, StoreError> {
        let r: anyhow::Result<Vec<Checkpoint>> = async {
            self.read("reading checkpoints", || async {
                let r = self
                    .session
                    .execute_unpaged(&self.st.checkpoint_read, (source,))
                    .await
                    .map_err(exec_err)?;
                let rows = r.into_rows_result().map_err(other)?;
                let mut out = Vec::new();
                for row in rows.rows::<(i32, i64)>().map_err(other)? {
                    let (partition, offset) = row.map_err(other)?;
                    out.push(Checkpoint {
                        source: source.to_string(),
                        partition,
                        offset,
                    });
                }
                Ok(out)
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }
}

#[async_trait]
impl Storage for CassandraStore {
    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        // Effects of an earlier commit that failed after some of its entity
        // batches may have applied.
        self.apply_carried().await?;

        let effects = Effects {
            ts: self.next_ts(),
            quarantines: commit.quarantines.clone(),
            released: commit.released.clone(),
            probes: {
                let mut seen = HashSet::new();
                commit
                    .events
                    .iter()
                    .filter(|e| seen.insert(&e.key))
                    .map(|e| (e.key.clone(), e.id.clone()))
                    .collect()
            },
            projections: commit
                .projections
                .iter()
                .map(|p| match p {
                    ProjectionWrite::Upsert {
                        projection,
                        key,
                        body,
                    } => ProjOp {
                        projection: projection.clone(),
                        key: key.clone(),
                        body: Some(body.clone()),
                    },
                    ProjectionWrite::Delete { projection, key } => ProjOp {
                        projection: projection.clone(),
                        key: key.clone(),
                        body: None,
                    },
                })
                .collect(),
        };
        let intent = if effects.is_empty() {
            None
        } else {
            let intent = Intent {
                id: format!(
                    "{:016x}{:016x}",
                    rand::random::<u64>(),
                    rand::random::<u64>()
                ),
                effects,
            };
            // Nothing is written yet: a failure here needs no carrying over.
            self.write_intent(&intent).await?;
            Some(intent)
        };
        match self.commit_inner(&commit, intent.as_ref()).await {
            Ok(()) => {
                if let Some(i) = &intent {
                    self.forget_intent(&i.id).await;
                }
                Ok(())
            }
            Err(e) => {
                if let Some(i) = intent {
                    self.carry.lock().await.push(i);
                }
                Err(e)
            }
        }
    }
}

#[async_trait]
impl PluginStore for CassandraStore {
    async fn put_plugin(&self, v: &PluginVersion, bytes: &[u8]) -> Result<(), StoreError> {
        let r: anyhow::Result<()> = async {
            let seq = self.next_ts();
            self.read("storing a plugin", || async {
                // The bytes first: a listed version always has them.
                let futs: Vec<_> = bytes
                    .chunks(BLOB_CHUNK)
                    .enumerate()
                    .map(|(i, c)| {
                        self.session
                            .execute_unpaged(&self.st.plugin_blob_insert, (&v.digest, i as i32, c))
                    })
                    .collect();
                self.all(futs).await?;
                self.session
                    .execute_unpaged(
                        &self.st.plugin_version_insert,
                        (
                            &v.entity_type,
                            &v.digest,
                            &v.name,
                            &v.version,
                            v.size as i64,
                            &v.uploaded_at,
                            seq,
                        ),
                    )
                    .await
                    .map_err(exec_err)?;
                Ok(())
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn plugin_versions(&self, entity_type: &str) -> Result<Vec<PluginVersion>, StoreError> {
        let r: anyhow::Result<Vec<PluginVersion>> = async {
            self.read("listing plugin versions", || async {
                let pager = self
                    .session
                    .execute_iter(self.st.plugin_versions_read.clone(), (entity_type,))
                    .await
                    .map_err(pager_err)?;
                type VRow = (
                    String,
                    String,
                    String,
                    String,
                    Option<i64>,
                    Option<String>,
                    Option<i64>,
                );
                let mut rows = pager.rows_stream::<VRow>().map_err(other)?;
                let mut out = Vec::new();
                while let Some(r) = rows.next().await {
                    let (entity_type, name, version, digest, size, uploaded_at, seq) =
                        r.map_err(row_err)?;
                    out.push((
                        seq.unwrap_or(0),
                        PluginVersion {
                            entity_type,
                            name,
                            version,
                            digest,
                            size: size.unwrap_or(0).max(0) as u64,
                            uploaded_at: uploaded_at.unwrap_or_default(),
                        },
                    ));
                }
                out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.digest.cmp(&b.1.digest)));
                Ok(out.into_iter().map(|(_, v)| v).collect())
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn plugin_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let r: anyhow::Result<Option<Vec<u8>>> = async {
            self.read("reading a plugin", || async {
                let pager = self
                    .session
                    .execute_iter(self.st.plugin_blob_read.clone(), (digest,))
                    .await
                    .map_err(pager_err)?;
                let mut rows = pager
                    .rows_stream::<(i32, Option<Vec<u8>>)>()
                    .map_err(other)?;
                let mut chunks = BTreeMap::new();
                while let Some(r) = rows.next().await {
                    let (i, b) = r.map_err(row_err)?;
                    chunks.insert(i, b.unwrap_or_default());
                }
                if chunks.is_empty() {
                    return Ok(None);
                }
                Ok(Some(chunks.into_values().flatten().collect()))
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn activation(&self, entity_type: &str) -> Result<Option<Activation>, StoreError> {
        self.read("reading an activation", || async {
            let r = self
                .session
                .execute_unpaged(&self.st.activation_get, (entity_type,))
                .await
                .map_err(exec_err)?;
            let row: Option<ActivationRow> = r
                .into_rows_result()
                .map_err(other)?
                .maybe_first_row()
                .map_err(other)?;
            row.map(ActivationRow::into_record).transpose()
        })
        .await
        .map_err(cql_error)
    }

    async fn activations(&self) -> Result<Vec<Activation>, StoreError> {
        let r: anyhow::Result<Vec<Activation>> = async {
            self.read("reading activations", || async {
                let pager = self
                    .session
                    .execute_iter(self.st.activations_read.clone(), ())
                    .await
                    .map_err(pager_err)?;
                let mut rows = pager.rows_stream::<ActivationRow>().map_err(other)?;
                let mut out = Vec::new();
                while let Some(r) = rows.next().await {
                    out.push(r.map_err(row_err)?.into_record()?);
                }
                out.sort_by(|a, b| a.entity_type.cmp(&b.entity_type));
                Ok(out)
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }

    async fn put_activation(&self, a: &Activation) -> Result<(), StoreError> {
        let r: anyhow::Result<()> = async {
            let r = if a.seq <= 1 {
                self.session
                    .execute_unpaged(
                        &self.st.activation_insert,
                        (
                            &a.entity_type,
                            &a.digest,
                            a.previous.as_deref(),
                            a.mode.as_str(),
                            a.seq,
                            &a.activated_at,
                            a.generation.as_str(),
                            a.previous_generation.as_ref().map(Generation::as_str),
                            &a.rolled_back,
                        ),
                    )
                    .await
            } else {
                self.session
                    .execute_unpaged(
                        &self.st.activation_update,
                        (
                            &a.digest,
                            a.previous.as_deref(),
                            a.mode.as_str(),
                            a.seq,
                            &a.activated_at,
                            a.generation.as_str(),
                            a.previous_generation.as_ref().map(Generation::as_str),
                            &a.rolled_back,
                            &a.entity_type,
                            a.seq - 1,
                        ),
                    )
                    .await
            };
            // Not retried: a conditional write that timed out has an unknown
            // outcome, which the caller sees as an error and can check.
            let r = r.map_err(exec_err)?;
            if !applied(r)? {
                return Err(StoreError::Fenced(format!(
                    "another activation of {} was recorded meanwhile",
                    a.entity_type
                ))
                .into());
            }
            Ok(())
        }
        .await;
        r.map_err(cql_error)
    }

    async fn put_rebuild(
        &self,
        r: &RebuildRecord,
        expected_heartbeat: Option<i64>,
    ) -> Result<bool, StoreError> {
        let r: anyhow::Result<bool> = async {
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            let res = match expected_heartbeat {
                None => {
                    self.session
                        .execute_unpaged(
                            &self.st.rebuild_insert,
                            (
                                &r.id,
                                &r.entity_type,
                                &r.digest,
                                r.generation.as_str(),
                                r.state.as_str(),
                                n(r.entities_done),
                                n(r.entities_total),
                                n(r.events_done),
                                n(r.events_total),
                                n(r.quarantined),
                                r.error.as_deref(),
                                &r.owner,
                                &r.started_at,
                                r.finished_at.as_deref(),
                                r.heartbeat_ms,
                            ),
                        )
                        .await
                }
                Some(h) => {
                    self.session
                        .execute_unpaged(
                            &self.st.rebuild_update,
                            (
                                &r.entity_type,
                                &r.digest,
                                r.generation.as_str(),
                                r.state.as_str(),
                                n(r.entities_done),
                                n(r.entities_total),
                                n(r.events_done),
                                n(r.events_total),
                                n(r.quarantined),
                                r.error.as_deref(),
                                &r.owner,
                                &r.started_at,
                                r.finished_at.as_deref(),
                                r.heartbeat_ms,
                                &r.id,
                                h,
                            ),
                        )
                        .await
                }
            };
            // Not retried, like the activation: a conditional write that timed
            // out has an unknown outcome; the next write's condition sorts it out.
            let res = res.map_err(exec_err).map_err(|e| {
                anyhow::Error::new(e).context("Cassandra: writing a rebuild record")
            })?;
            Ok(applied(res)?)
        }
        .await;
        r.map_err(cql_error)
    }

    async fn rebuilds(&self) -> Result<Vec<RebuildRecord>, StoreError> {
        let r: anyhow::Result<Vec<RebuildRecord>> = async {
            self.read("reading rebuilds", || async {
                let pager = self
                    .session
                    .execute_iter(self.st.rebuilds_read.clone(), ())
                    .await
                    .map_err(pager_err)?;
                type RRow = (
                    String,
                    Option<String>,
                    Option<String>,
                    Option<String>,
                    Option<String>,
                    Option<i64>,
                    Option<i64>,
                    Option<i64>,
                    Option<i64>,
                    Option<i64>,
                    Option<String>,
                    Option<String>,
                    Option<String>,
                    Option<String>,
                    Option<i64>,
                );
                let n = |v: Option<i64>| v.unwrap_or(0).max(0) as u64;
                let mut rows = pager.rows_stream::<RRow>().map_err(other)?;
                let mut out = Vec::new();
                while let Some(r) = rows.next().await {
                    let (
                        id,
                        t,
                        digest,
                        generation,
                        state,
                        ed,
                        et,
                        vd,
                        vt,
                        q,
                        error,
                        owner,
                        sa,
                        fa,
                        hb,
                    ) = r.map_err(row_err)?;
                    out.push(RebuildRecord {
                        id,
                        entity_type: t.unwrap_or_default(),
                        digest: digest.unwrap_or_default(),
                        generation: generation.unwrap_or_default().into(),
                        state: stored(state.as_deref().unwrap_or_default())?,
                        entities_done: n(ed),
                        entities_total: n(et),
                        events_done: n(vd),
                        events_total: n(vt),
                        quarantined: n(q),
                        error,
                        owner: owner.unwrap_or_default(),
                        started_at: sa.unwrap_or_default(),
                        finished_at: fa,
                        heartbeat_ms: hb.unwrap_or(0),
                    });
                }
                out.sort_by(|a, b| (&a.started_at, &a.id).cmp(&(&b.started_at, &b.id)));
                Ok(out)
            })
            .await
        }
        .await;
        r.map_err(cql_error)
    }
}

async fn prepare_all(session: &Session, ks: &str) -> Result<Statements, PrepareError> {
    let p = |q: &str| {
        let q = q.replace("{ks}", ks);
        async move {
            let mut s = session.prepare(q).await?;
            s.set_is_idempotent(true);
            Ok::<_, PrepareError>(s)
        }
    };
    let mut st = Statements {
        read_static: p("SELECT base, cap, head, state, state_position, plugin_name, plugin_version, plugin_digest, quarantined, live, generation
                        FROM {ks}.entity_log WHERE entity_type = ? AND entity_id = ? AND bucket = ? LIMIT 1").await?,
        read_ids: p("SELECT event_id, digest FROM {ks}.entity_log
                     WHERE entity_type = ? AND entity_id = ? AND bucket IN ? AND kind = 1 AND position = 0 AND event_id IN ?").await?,
        read_events: p("SELECT position, event_id, source, event_type, event_time, data, origin, record, digest FROM {ks}.entity_log
                        WHERE entity_type = ? AND entity_id = ? AND bucket = ? AND kind = 0 AND position > ? AND position <= ?").await?,
        insert_event: p("INSERT INTO {ks}.entity_log (entity_type, entity_id, bucket, kind, position, event_id, source, event_type, event_time, data, origin, record, digest)
                         VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?)").await?,
        insert_id: p("INSERT INTO {ks}.entity_log (entity_type, entity_id, bucket, kind, position, event_id, digest) VALUES (?, ?, ?, 1, 0, ?, ?)").await?,
        advance: p("UPDATE {ks}.entity_log SET head = ?, state = ?, state_position = ?, plugin_name = ?, plugin_version = ?, plugin_digest = ?, quarantined = ?, generation = ?
                    WHERE entity_type = ? AND entity_id = ? AND bucket = ? IF head = ?").await?,
        open_bucket: p("UPDATE {ks}.entity_log SET base = ?, cap = ?, head = ?, state = ?, state_position = ?, plugin_name = ?, plugin_version = ?, plugin_digest = ?, quarantined = ?, generation = ?
                        WHERE entity_type = ? AND entity_id = ? AND bucket = ? IF head = null").await?,
        set_live: p("UPDATE {ks}.entity_log SET live = ? WHERE entity_type = ? AND entity_id = ? AND bucket = ?").await?,
        release: p("UPDATE {ks}.entity_log SET quarantined = false WHERE entity_type = ? AND entity_id = ? AND bucket = ? IF head = ?").await?,
        put_state: p("UPDATE {ks}.entity_log SET base = 0, cap = ?, head = ?, state = ?, state_position = ?, plugin_name = ?, plugin_version = ?, plugin_digest = ?, quarantined = ?, generation = ?
                       WHERE entity_type = ? AND entity_id = ? AND bucket = 0").await?,
        index_insert: p("INSERT INTO {ks}.entity_index (entity_type, shard, entity_id) VALUES (?, ?, ?)").await?,
        index_read: p("SELECT entity_id FROM {ks}.entity_index WHERE entity_type = ? AND shard = ?").await?,
        projection_upsert: p("INSERT INTO {ks}.projections (projection, doc_key, body) VALUES (?, ?, ?) USING TIMESTAMP ?").await?,
        projection_delete: p("DELETE FROM {ks}.projections USING TIMESTAMP ? WHERE projection = ? AND doc_key = ?").await?,
        projection_read: p("SELECT body FROM {ks}.projections WHERE projection = ? AND doc_key = ?").await?,
        dead_letter_insert: p("INSERT INTO {ks}.dead_letters (shard, id, code, reason, payload, origin, event_id, entity_type, recorded_at)
                               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?").await?,
        dead_letter_read: p("SELECT id, code, reason, payload, origin, event_id, entity_type, recorded_at
                             FROM {ks}.dead_letters WHERE shard = ? AND id > ? LIMIT ?").await?,
        dead_letter_get: p("SELECT id, code, reason, payload, origin, event_id, entity_type, recorded_at
                            FROM {ks}.dead_letters WHERE shard = ? AND id = ?").await?,
        dead_letter_exists: p("SELECT id FROM {ks}.dead_letters WHERE shard = ? AND id = ?").await?,
        dead_letter_delete: p("DELETE FROM {ks}.dead_letters WHERE shard = ? AND id = ?").await?,
        quarantine_insert: p("INSERT INTO {ks}.quarantine (entity_type, entity_id, event_id, event_position, failure_kind, error, plugin_name, plugin_version, plugin_digest, recorded_at)
                              VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?").await?,
        quarantine_read: p("SELECT entity_type, entity_id, event_id, event_position, failure_kind, error, plugin_name, plugin_version, plugin_digest, recorded_at
                            FROM {ks}.quarantine").await?,
        quarantine_get: p("SELECT event_id, event_position, failure_kind, error, plugin_name, plugin_version, plugin_digest, recorded_at
                           FROM {ks}.quarantine WHERE entity_type = ? AND entity_id = ?").await?,
        quarantine_page: p("SELECT token(entity_type, entity_id), entity_type, entity_id, event_id, event_position, failure_kind, error, plugin_name, plugin_version, plugin_digest, recorded_at
                            FROM {ks}.quarantine WHERE token(entity_type, entity_id) > ? LIMIT ?").await?,
        quarantine_delete: p("DELETE FROM {ks}.quarantine WHERE entity_type = ? AND entity_id = ?").await?,
        quarantine_release: p("DELETE FROM {ks}.quarantine USING TIMESTAMP ? WHERE entity_type = ? AND entity_id = ?").await?,
        checkpoint_upsert: p("INSERT INTO {ks}.checkpoints (source, part, next_offset) VALUES (?, ?, ?) USING TIMESTAMP ?").await?,
        checkpoint_read: p("SELECT part, next_offset FROM {ks}.checkpoints WHERE source = ?").await?,
        snapshot_read: p("SELECT position, state FROM {ks}.snapshots
                          WHERE entity_type = ? AND entity_id = ? AND digest = ? AND position <= ? LIMIT 1").await?,
        snapshot_insert: p("INSERT INTO {ks}.snapshots (entity_type, entity_id, digest, position, state) VALUES (?, ?, ?, ?, ?)").await?,
        intent_insert: p("INSERT INTO {ks}.pending_effects (id, seq, ts, chunk) VALUES (?, ?, ?, ?)").await?,
        intent_delete: p("DELETE FROM {ks}.pending_effects WHERE id = ?").await?,
        intent_read: p("SELECT id, seq, ts, chunk FROM {ks}.pending_effects").await?,
        delete_bucket: p("DELETE FROM {ks}.entity_log WHERE entity_type = ? AND entity_id = ? AND bucket = ?").await?,
        index_drop: p("DELETE FROM {ks}.entity_index WHERE entity_type = ? AND shard = ?").await?,
        projection_scan: p("SELECT projection, doc_key, body FROM {ks}.projections").await?,
        plugin_version_insert: p("INSERT INTO {ks}.plugin_versions (entity_type, digest, name, version, size, uploaded_at, seq)
                                  VALUES (?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS").await?,
        plugin_versions_read: p("SELECT entity_type, name, version, digest, size, uploaded_at, seq FROM {ks}.plugin_versions WHERE entity_type = ?").await?,
        plugin_blob_insert: p("INSERT INTO {ks}.plugin_blobs (digest, chunk, bytes) VALUES (?, ?, ?)").await?,
        plugin_blob_read: p("SELECT chunk, bytes FROM {ks}.plugin_blobs WHERE digest = ?").await?,
        activation_insert: p("INSERT INTO {ks}.activations (entity_type, digest, previous, mode, seq, activated_at, generation, previous_generation, rolled_back)
                               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS").await?,
        activation_update: p("UPDATE {ks}.activations SET digest = ?, previous = ?, mode = ?, seq = ?, activated_at = ?, generation = ?, previous_generation = ?, rolled_back = ?
                              WHERE entity_type = ? IF seq = ?").await?,
        rebuild_insert: p("INSERT INTO {ks}.rebuilds (id, entity_type, digest, generation, state, entities_done, entities_total, events_done, events_total,
                                  quarantined, error, owner, started_at, finished_at, heartbeat_ms)
                           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS").await?,
        rebuild_update: p("UPDATE {ks}.rebuilds SET entity_type = ?, digest = ?, generation = ?, state = ?, entities_done = ?, entities_total = ?, events_done = ?,
                                  events_total = ?, quarantined = ?, error = ?, owner = ?, started_at = ?, finished_at = ?, heartbeat_ms = ?
                           WHERE id = ? IF heartbeat_ms = ?").await?,
        rebuilds_read: p("SELECT id, entity_type, digest, generation, state, entities_done, entities_total, events_done, events_total,
                                 quarantined, error, owner, started_at, finished_at, heartbeat_ms FROM {ks}.rebuilds").await?,
        activation_get: p("SELECT entity_type, digest, previous, mode, seq, activated_at, generation, previous_generation, rolled_back FROM {ks}.activations WHERE entity_type = ?").await?,
        activations_read: p("SELECT entity_type, digest, previous, mode, seq, activated_at, generation, previous_generation, rolled_back FROM {ks}.activations").await?,
    };
    // Conditional statements are not idempotent: a retried LWT that had
    // applied reports "not applied".
    for s in [
        &mut st.advance,
        &mut st.open_bucket,
        &mut st.release,
        &mut st.plugin_version_insert,
        &mut st.activation_insert,
        &mut st.activation_update,
        &mut st.rebuild_insert,
        &mut st.rebuild_update,
    ] {
        s.set_is_idempotent(false);
    }
    Ok(st)
}

/// Stable shard of a string (FNV-1a).
fn shard_of(s: &str, shards: i32) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards as u64) as i32
}

/// Split `s` into pieces of at most `max` bytes, on character boundaries.
fn split_utf8(s: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while rest.len() > max {
        let mut cut = max;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (a, b) = rest.split_at(cut);
        out.push(a);
        rest = b;
    }
    out.push(rest);
    out
}

/// `[applied]` of a conditional statement's result.
fn applied(r: QueryResult) -> Result<bool, StoreError> {
    let rows = r.into_rows_result().map_err(other)?;
    let row: Option<Row> = rows.maybe_first_row().map_err(other)?;
    match row.as_ref().and_then(|r| r.columns.first()) {
        Some(Some(CqlValue::Boolean(b))) => Ok(*b),
        _ => Err(StoreError::Other(anyhow::anyhow!(
            "a conditional write returned no [applied] column"
        ))),
    }
}

fn other<E: std::error::Error + Send + Sync + 'static>(e: E) -> StoreError {
    StoreError::Other(anyhow::Error::new(e))
}

/// A failure that retrying later can cure: the node is down, overloaded,
/// unreachable or timed out (for a conditional write: outcome unknown, which
/// the fence sorts out on the retry).
fn transient_attempt(e: &RequestAttemptError) -> bool {
    match e {
        RequestAttemptError::BrokenConnectionError(_)
        | RequestAttemptError::UnableToAllocStreamId => true,
        RequestAttemptError::DbError(db, _) => matches!(
            db,
            DbError::Unavailable { .. }
                | DbError::Overloaded
                | DbError::IsBootstrapping
                | DbError::ReadTimeout { .. }
                | DbError::WriteTimeout { .. }
                | DbError::ReadFailure { .. }
                | DbError::WriteFailure { .. }
                | DbError::TruncateError
                | DbError::ServerError
                | DbError::RateLimitReached { .. }
        ),
        _ => false,
    }
}

/// A `dead_letters` row, bound by column name.
#[derive(DeserializeRow)]
struct DeadLetterRow {
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
    fn into_record(self) -> DeadLetter {
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

/// A `quarantine` row without its key, bound by column name.
#[derive(DeserializeRow)]
struct QuarantineRow {
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
    fn into_record(self, key: EntityKey) -> QuarantineRecord {
        QuarantineRecord {
            key,
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

/// An `activations` row, bound by column name.
#[derive(DeserializeRow)]
struct ActivationRow {
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
    fn into_record(self) -> Result<Activation, StoreError> {
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

/// An enum read back from its stored text; text that names no variant is
/// corrupt data, never a default.
fn stored<T: std::str::FromStr<Err = UnknownVariant>>(text: &str) -> Result<T, StoreError> {
    text.parse()
        .map_err(|e: UnknownVariant| StoreError::Corrupt(e.to_string()))
}

fn transient_prepare(e: &PrepareError) -> bool {
    match e {
        PrepareError::ConnectionPoolError(_) => true,
        PrepareError::AllAttemptsFailed { first_attempt } => transient_attempt(first_attempt),
        _ => false,
    }
}

fn transient_exec(e: &ExecutionError) -> bool {
    match e {
        ExecutionError::ConnectionPoolError(_)
        | ExecutionError::RequestTimeout(_)
        | ExecutionError::EmptyPlan
        | ExecutionError::UseKeyspaceError(_)
        | ExecutionError::SchemaAgreementError(_)
        | ExecutionError::MetadataError(_) => true,
        ExecutionError::PrepareError(p) => transient_prepare(p),
        ExecutionError::LastAttemptError(a) => transient_attempt(a),
        _ => false,
    }
}

fn transient_page(e: &NextPageError) -> bool {
    match e {
        NextPageError::RequestFailure(r) => match r {
            RequestError::EmptyPlan
            | RequestError::ConnectionPoolError(_)
            | RequestError::RequestTimeout(_) => true,
            RequestError::LastAttemptError(a) => transient_attempt(a),
            _ => false,
        },
        _ => false,
    }
}

/// A read's or a plain write's error, by kind: the driver's errors that
/// mean "not reachable now" are an outage; the rest keep their kind.
fn cql_error(e: anyhow::Error) -> StoreError {
    let e = match e.downcast::<ExecutionError>() {
        Ok(e) => return exec_err(e),
        Err(e) => e,
    };
    let e = match e.downcast::<PagerExecutionError>() {
        Ok(e) => return pager_err(e),
        Err(e) => e,
    };
    match e.downcast::<NextRowError>() {
        Ok(e) => row_err(e),
        Err(e) => StoreError::from(e),
    }
}

fn exec_err(e: ExecutionError) -> StoreError {
    if transient_exec(&e) {
        StoreError::Unavailable(e.to_string())
    } else {
        other(e)
    }
}

fn pager_err(e: PagerExecutionError) -> StoreError {
    let transient = match &e {
        PagerExecutionError::PrepareError(p) => transient_prepare(p),
        PagerExecutionError::NextPageError(n) => transient_page(n),
        PagerExecutionError::SchemaAgreementError(_) | PagerExecutionError::MetadataError(_) => {
            true
        }
        _ => false,
    };
    if transient {
        StoreError::Unavailable(e.to_string())
    } else {
        other(e)
    }
}

fn row_err(e: NextRowError) -> StoreError {
    let transient = matches!(&e, NextRowError::NextPageError(n) if transient_page(n));
    if transient {
        StoreError::Unavailable(e.to_string())
    } else {
        other(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_in_range() {
        assert_eq!(shard_of("acc-1", 16), shard_of("acc-1", 16));
        for i in 0..1000 {
            let s = shard_of(&format!("e-{i}"), 8);
            assert!((0..8).contains(&s));
        }
    }

    #[test]
    fn utf8_split_keeps_characters_whole() {
        let s = "aé".repeat(1000);
        let parts = split_utf8(&s, 7);
        assert!(parts.iter().all(|p| p.len() <= 7 && !p.is_empty()));
        assert_eq!(parts.concat(), s);
        assert_eq!(split_utf8("", 5), vec![""]);
    }

    #[test]
    fn a_bucket_is_full_at_its_capacity() {
        assert!(
            !Located {
                bucket: 0,
                base: 0,
                cap: 3,
                head: 2
            }
            .full()
        );
        assert!(
            Located {
                bucket: 0,
                base: 0,
                cap: 3,
                head: 3
            }
            .full()
        );
        assert!(
            Located {
                bucket: 1,
                base: 4,
                cap: 3,
                head: 7
            }
            .full()
        );
        assert!(
            !Located {
                bucket: 1,
                base: 4,
                cap: 3,
                head: 5
            }
            .full()
        );
    }
}

//! [`CassandraStore`]: the session, its prepared statements, the caches that
//! save reads between the calls of one batch, and the request helpers every
//! other module runs its CQL through (the read retry, bounded concurrency,
//! the one paged read).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt as _, stream};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::{ExecutionError, NewSessionError};
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};

use refold_store::{EntityKey, StoreError};

use crate::config::CassandraConfig;
use crate::error::{exec_err, other, pager_err, row_err};
use crate::intents::Intent;
use crate::rows::{Found, Located};
use crate::schema;
use crate::statements::Statements;

/// Shards of the small listing tables (entity index, dead letters).
pub(crate) const INDEX_SHARDS: i32 = 16;
pub(crate) const DEAD_LETTER_SHARDS: i32 = 8;
/// How long a read keeps retrying while the cluster is unreachable.
const READ_RETRY_BUDGET: Duration = Duration::from_secs(5);
/// Client-side timeout of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries of the location cache before it is cleared.
const LOCATION_CACHE_MAX: usize = 200_000;
/// How long a static row read by `known_ids` may serve the `load` that
/// follows it (the pipeline calls them back to back for one batch).
const FRESH_FOR: Duration = Duration::from_secs(1);

/// Cassandra-backed [`refold_store::Storage`].
pub struct CassandraStore {
    pub(crate) session: Session,
    pub(crate) st: Statements,
    pub(crate) bucket_size: u64,
    pub(crate) concurrency: usize,
    /// Live bucket of entities recently loaded or written by this process.
    /// Only a hint for `commit`: the conditional batch checks it.
    located: Mutex<HashMap<EntityKey, Located>>,
    /// Entity rows read by `known_ids`, taken (once) by the `load` that
    /// follows: it saves a read per entity and batch. A row gone stale
    /// meanwhile only costs a lost fence and a re-run.
    fresh: Mutex<HashMap<EntityKey, (Instant, Option<Found>)>>,
    /// Intents of failed commits of this process, re-applied by the next commit.
    pub(crate) carry: tokio::sync::Mutex<Vec<Intent>>,
    /// Last client timestamp handed out.
    clock: AtomicI64,
    /// The change outbox's batches in flight and those held for publishing.
    pub(crate) outbox: Mutex<crate::outbox::OutboxState>,
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
        schema::create(&session, config).await?;
        let st = Statements::prepare(&session, ks)
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
            outbox: Mutex::new(Default::default()),
        };
        let n = store
            .recover_intents()
            .await
            .context("re-applying interrupted commits")?;
        if n > 0 {
            tracing::info!(intents = n, "re-applied the effects of interrupted commits");
        }
        let n = store
            .backfill_document_index()
            .await
            .context("indexing the documents of an older release")?;
        if n > 0 {
            tracing::info!(documents = n, "indexed the documents of an older release");
        }
        Ok(store)
    }

    /// A client write timestamp, strictly increasing within this process.
    pub(crate) fn next_ts(&self) -> i64 {
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

    // ---- caches -------------------------------------------------------------

    pub(crate) fn remember(&self, key: &EntityKey, loc: Option<Located>) {
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

    pub(crate) fn cached(&self, key: &EntityKey) -> Option<Located> {
        self.located
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
    }

    pub(crate) fn stash(&self, key: &EntityKey, row: Option<Found>) {
        let mut m = self.fresh.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= LOCATION_CACHE_MAX {
            m.clear();
        }
        m.insert(key.clone(), (Instant::now(), row));
    }

    pub(crate) fn take_fresh(&self, key: &EntityKey) -> Option<Option<Found>> {
        let (at, row) = self
            .fresh
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)?;
        (at.elapsed() < FRESH_FOR).then_some(row)
    }

    /// Drop the row `known_ids` read for `key`: it is about to change.
    pub(crate) fn unstash(&self, key: &EntityKey) {
        self.fresh
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Forget every cached location and row (a namespace is being dropped).
    pub(crate) fn forget_locations(&self) {
        self.located
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.fresh.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    // ---- requests -----------------------------------------------------------

    /// Run a read, retrying while the cluster is unreachable (up to
    /// [`READ_RETRY_BUDGET`]); a store outage shorter than that is waited out.
    pub(crate) async fn read<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, StoreError>
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
                Err(StoreError::Other(e)) => {
                    return Err(StoreError::Other(e.context(format!("Cassandra: {what}"))));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Run `futs` with at most `concurrency` in flight; the first error wins.
    pub(crate) async fn all<F>(&self, futs: Vec<F>) -> Result<(), StoreError>
    where
        F: Future<Output = Result<QueryResult, ExecutionError>>,
    {
        let mut s = stream::iter(futs).buffer_unordered(self.concurrency);
        while let Some(r) = s.next().await {
            r.map_err(exec_err)?;
        }
        Ok(())
    }

    /// Like [`all`](Self::all), for steps of several requests each.
    pub(crate) async fn each<F>(&self, futs: Vec<F>) -> Result<(), StoreError>
    where
        F: Future<Output = Result<(), StoreError>>,
    {
        let mut s = stream::iter(futs).buffer_unordered(self.concurrency);
        while let Some(r) = s.next().await {
            r?;
        }
        Ok(())
    }

    /// One request, its driver error classified.
    pub(crate) async fn run(
        &self,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<QueryResult, StoreError> {
        self.session
            .execute_unpaged(st, values)
            .await
            .map_err(exec_err)
    }

    /// The first row of a single-page read (a point lookup), by name.
    pub(crate) async fn one<R>(
        &self,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Option<R>, StoreError>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        let r = self.run(st, values).await?;
        r.into_rows_result()
            .map_err(other)?
            .maybe_first_row::<R>()
            .map_err(other)
    }

    /// Every row of a single-page read (`LIMIT`ed or one small partition).
    pub(crate) async fn page<R>(
        &self,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        let r = self.run(st, values).await?;
        let rows = r.into_rows_result().map_err(other)?;
        rows.rows::<R>()
            .map_err(other)?
            .map(|row| row.map_err(other))
            .collect()
    }

    /// Every row of a read, page after page; a page that fails to come is
    /// classified like any request (an outage is `Unavailable`).
    pub(crate) async fn rows<R>(
        &self,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<R>, StoreError>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        let pager = self
            .session
            .execute_iter(st.clone(), values)
            .await
            .map_err(pager_err)?;
        let mut rows = pager.rows_stream::<R>().map_err(other)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().await {
            out.push(row.map_err(row_err)?);
        }
        Ok(out)
    }
}

/// Stable shard of a string (FNV-1a).
pub(crate) fn shard_of(s: &str, shards: i32) -> i32 {
    (refold_types::stable_hash(s.bytes()) % shards as u64) as i32
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
}

//! One batch, start to finish, as named steps: [`validate`] (parse, size,
//! dead letters) → [`dedup`] (within the batch and against the store) →
//! [`group`] (by entity; records loaded, new events positioned) → [`fold`]
//! (per entity type, under the batch's budget) → [`commit`] (the one
//! [`Commit`] of the batch). The source checkpoint is part of the same
//! commit, so state and checkpoint advance together.
//!
//! Module direction: `mod` (the [`Pipeline`]) uses every step; `dedup` uses
//! `validate`'s dead letters; `group`, `fold` and `commit` use `entity`, the
//! per-entity fold (also used by the plugin manager's rebuild and retry);
//! `entities` (every entity of a type) stands alone. No step uses `mod`
//! except for [`BatchReport`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use refold_runtime::Sandbox;
use refold_source::{SourceRecord, checkpoints_of};
use refold_store::{Commit, EventIdentity, Storage, StoreError};
use refold_types::event::EntityKey;

use crate::host::Host;
use crate::metrics::Metrics;
use crate::registry::Registry;

pub(crate) mod cache;
pub(crate) mod commit;
pub(crate) mod dedup;
pub mod entities;
pub(crate) mod entity;
pub(crate) mod fold;
pub(crate) mod group;
#[cfg(test)]
mod testing;
pub(crate) mod validate;

pub use entities::{Entities, entities_of};
pub use entity::{ChangeDetail, sandbox_for};

/// What one batch did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct BatchReport {
    /// Records read.
    pub records: usize,
    /// Events stored for the first time.
    pub stored: usize,
    /// Events folded into states.
    pub applied: usize,
    /// Events seen before (same identity and bytes), ignored.
    pub duplicates: usize,
    /// Records turned into dead letters.
    pub dead_lettered: usize,
    /// Events held for quarantined entities.
    pub held: usize,
    /// Entities newly quarantined.
    pub quarantined: Vec<EntityKey>,
    /// Entities whose events were stored but not folded yet: the batch ran
    /// out of its time or output budget before reaching them. A later batch
    /// or a query folds them (they are behind their head).
    pub deferred: usize,
}

/// A batch ready to be written (see [`Pipeline::prepare`]).
pub struct Prepared {
    commit: Commit,
    report: BatchReport,
    /// The identities of the events it stores, with their digests.
    identities: HashMap<EventIdentity, Option<String>>,
    /// The entities it writes.
    keys: HashSet<EntityKey>,
    /// The deferred entities it took along.
    brought: Vec<EntityKey>,
}

/// What [`Pipeline::prepare`] gave.
pub enum Prepare {
    /// The batch, ready to be written.
    Ready(Box<Prepared>),
    /// The batch needs what the write in flight is storing: settle it and
    /// prepare the batch again.
    Settle,
}

/// Settings of the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Largest record accepted before any plugin sees it, in bytes.
    pub max_record_bytes: usize,
    /// Entity types folded at once (each on its own blocking thread).
    pub fold_threads: usize,
    /// Time a batch may spend folding before the entities not reached yet
    /// are deferred.
    pub fold_budget: Duration,
    /// Read-model operations a batch may produce in all.
    pub max_batch_projection_ops: usize,
    /// Bytes of read-model output a batch may produce in all.
    pub max_batch_projection_bytes: usize,
    /// Bytes the owned-state cache may hold (0: none; every batch then
    /// reads its entities).
    pub state_cache_bytes: usize,
    /// The change records batches make.
    pub changes: ChangeDetail,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_record_bytes: 1 << 20,
            fold_threads: 0,
            fold_budget: Duration::from_secs(2),
            max_batch_projection_ops: 200_000,
            max_batch_projection_bytes: 64 << 20,
            state_cache_bytes: 64 << 20,
            changes: ChangeDetail {
                emit: true,
                ..Default::default()
            },
        }
    }
}

impl PipelineConfig {
    fn threads(&self) -> usize {
        if self.fold_threads > 0 {
            return self.fold_threads;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    }
}

/// The ingest pipeline. Owns one sandbox per entity type.
pub struct Pipeline {
    storage: Arc<dyn Storage>,
    registry: Arc<Registry>,
    sandboxes: HashMap<String, Sandbox>,
    /// Records of the entities this pipeline wrote, between batches.
    cache: cache::StateCache,
    /// Entries and bytes of the cache as last added to the gauges.
    cache_reported: (i64, i64),
    /// The events of the batch being written, and its entities.
    in_flight: HashMap<EventIdentity, Option<String>>,
    in_flight_keys: HashSet<EntityKey>,
    in_flight_brought: Vec<EntityKey>,
    /// Entities a batch deferred, to be folded by the next ones even when no
    /// new event of theirs arrives (so their read models catch up too).
    behind: std::collections::VecDeque<EntityKey>,
    config: PipelineConfig,
    metrics: Arc<Metrics>,
    /// Woken after a commit with change records.
    changes: Arc<tokio::sync::Notify>,
}

impl Pipeline {
    /// A pipeline over the host's storage and registry, tuned by its
    /// `[engine]` settings.
    pub fn for_host(host: &Host) -> Self {
        let e = &host.config.engine;
        Pipeline::new(
            host.storage.clone(),
            host.registry.clone(),
            PipelineConfig {
                max_record_bytes: e.max_record_bytes,
                fold_threads: e.fold_threads,
                fold_budget: Duration::from_millis(e.batch_fold_budget_ms),
                max_batch_projection_ops: e.max_batch_projection_ops,
                max_batch_projection_bytes: e.max_batch_projection_bytes,
                state_cache_bytes: e.state_cache_bytes,
                changes: ChangeDetail::of(&host.config.changes, host.config.store.kind),
            },
            host.metrics.clone(),
        )
        .signalling(host.changes.clone())
    }

    /// Wake `signal` after each commit that added change records.
    pub fn signalling(mut self, signal: Arc<tokio::sync::Notify>) -> Self {
        self.changes = signal;
        self
    }

    /// A pipeline of one of `lanes` lanes: the host's settings, with an
    /// equal share of the state cache's budget.
    pub fn for_lane(host: &Host, lanes: usize) -> Self {
        let mut p = Pipeline::for_host(host);
        let share = host.config.engine.state_cache_bytes / lanes.max(1);
        p.cache = cache::StateCache::new(share);
        p.config.state_cache_bytes = share;
        p
    }

    /// A pipeline over `storage` with the plugins of `registry`.
    pub fn new(
        storage: Arc<dyn Storage>,
        registry: Arc<Registry>,
        config: PipelineConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Pipeline {
            storage,
            registry,
            sandboxes: HashMap::new(),
            cache: cache::StateCache::new(config.state_cache_bytes),
            cache_reported: (0, 0),
            in_flight: HashMap::new(),
            in_flight_keys: HashSet::new(),
            in_flight_brought: Vec::new(),
            behind: Default::default(),
            config,
            metrics,
            changes: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Process one batch of records and commit its effects with the
    /// checkpoints it reached. On `Err` nothing of the batch is committed and
    /// the caller must retry it (or re-read it from the last checkpoint).
    pub async fn process(&mut self, records: &[SourceRecord]) -> Result<BatchReport, StoreError> {
        let prepared = match self.prepare(records).await? {
            Prepare::Ready(p) => p,
            Prepare::Settle => {
                return Err(StoreError::Other(anyhow::anyhow!(
                    "a batch was processed while another one's write was in flight"
                )));
            }
        };
        let (commit, report) = self.submit(prepared);
        let result = self.write(commit).await;
        self.settled(result.is_ok());
        result.map(|()| report)
    }

    /// Everything of a batch but its write: validate, deduplicate, load,
    /// fold, and the [`Commit`] that makes it durable. The cache then holds
    /// the batch's records as if committed, so that the next batch can be
    /// prepared while this one is written; [`settled`](Self::settled) says
    /// how the write went. [`Prepare::Settle`] when the batch needs an
    /// entity of the write in flight that the cache no longer holds: settle
    /// that write, then prepare again.
    pub async fn prepare(&mut self, records: &[SourceRecord]) -> Result<Prepare, StoreError> {
        let started = Instant::now();
        let plugins = self.registry.snapshot();
        let generations = self.registry.generations();
        let mut report = BatchReport {
            records: records.len(),
            ..Default::default()
        };
        let mut commit = Commit {
            checkpoints: checkpoints_of(records),
            ..Default::default()
        };

        let (valid, dead) = validate::validate(records, &plugins, self.config.max_record_bytes);
        commit.dead_letters.extend(dead);
        let deduped = dedup::dedup(&*self.storage, &self.cache, &self.in_flight, valid).await?;
        commit.dead_letters.extend(deduped.dead_letters);
        report.duplicates = deduped.duplicates;
        report.dead_lettered = commit.dead_letters.len();

        let mut groups = group::Groups::of(deduped.fresh);
        // A bounded number of deferred entities per batch.
        let take = self.behind.len().min(records.len().max(MIN_CATCH_UP));
        // An entity of the write in flight must be read from the store when
        // the cache no longer holds it (evicted, quarantined) or holds it
        // behind its head (deferred: its events in between are read back),
        // and the store does not hold that write yet.
        let needs_settling =
            |k: &EntityKey| self.in_flight_keys.contains(k) && !self.cache.holds_caught_up(k);
        if groups.order.iter().any(needs_settling)
            || self.behind.iter().take(take).any(needs_settling)
        {
            return Ok(Prepare::Settle);
        }
        let brought: Vec<EntityKey> = self.behind.drain(..take).collect();
        groups.bring_along(brought.iter().cloned(), &plugins);
        for d in &commit.dead_letters {
            self.metrics.dead_lettered(&d.code);
        }
        self.metrics.duplicates(report.duplicates as u64);
        match self
            .fold_batch(groups, commit, report, &generations, &plugins)
            .await
        {
            Ok(mut p) => {
                p.brought = brought;
                self.metrics.observe_stage("prepare", started.elapsed());
                Ok(Prepare::Ready(p))
            }
            Err(e) => {
                // Deferred entities the batch took along wait for the next.
                self.behind.extend(brought);
                Err(e)
            }
        }
    }

    /// The second half of [`prepare`](Self::prepare): load, position, fold
    /// and collect the batch's entities, and cache them as it leaves them.
    async fn fold_batch(
        &mut self,
        groups: group::Groups,
        mut commit: Commit,
        mut report: BatchReport,
        generations: &crate::registry::Generations,
        plugins: &Arc<crate::registry::Active>,
    ) -> Result<Box<Prepared>, StoreError> {
        let mut loaded = group::load(&*self.storage, generations, groups, &mut self.cache).await?;
        let mut known_ids = std::mem::take(&mut loaded.known_ids);
        let mut new_ids: HashMap<EntityKey, Vec<u64>> = HashMap::new();
        // The partition each entity's last new event came from.
        let mut parts: HashMap<EntityKey, u64> = HashMap::new();
        let mut identities = HashMap::with_capacity(loaded.events.len());
        for e in &loaded.events {
            new_ids
                .entry(e.key.clone())
                .or_default()
                .push(self.cache.id_hash(&e.id));
            if let Some(o) = &e.origin {
                parts.insert(e.key.clone(), cache::partition_tag(&o.source, o.partition));
            }
            identities.insert((e.key.clone(), e.id.clone()), e.digest.clone());
        }
        let batch_keys: HashSet<EntityKey> =
            loaded.work.iter().map(|w| w.record.key.clone()).collect();
        commit.entities.extend(loaded.moves.saved);
        commit.quarantines.extend(loaded.moves.quarantines);
        commit.released.extend(loaded.moves.released);
        report.stored = loaded.events.len();
        commit.events.extend(loaded.events);

        let started = Instant::now();
        let budget = fold::FoldBudget::new(
            self.config.fold_budget,
            self.config.max_batch_projection_ops,
            self.config.max_batch_projection_bytes,
        );
        let folded = fold::fold(
            &mut self.sandboxes,
            plugins,
            loaded.work,
            self.config.threads(),
            budget,
            self.config.changes,
        )
        .await?;
        self.remember_deferred(&folded.deferred);
        report.deferred = folded.deferred.len();
        commit.entities.extend(folded.deferred);
        if report.deferred > 0 {
            self.metrics.deferred(report.deferred as u64);
            tracing::info!(
                deferred = report.deferred,
                "batch fold budget spent; the remaining entities are folded later"
            );
        }
        self.metrics.observe_fold(started.elapsed());

        commit::collect(folded.done, &mut commit, &mut report, &self.metrics);
        for s in self.sandboxes.values() {
            self.metrics.sandbox(
                &s.plugin().info.entity_type,
                &s.plugin().info.version,
                &s.stats,
            );
        }
        // The batch's own entities (not the records a generation move saves
        // under other keys) are cached as this commit leaves them.
        for u in commit
            .entities
            .iter()
            .filter(|u| batch_keys.contains(&u.key))
        {
            let ids = new_ids.remove(&u.key).unwrap_or_default();
            let part = parts.get(&u.key).copied();
            self.cache.committed(u, ids, known_ids.remove(&u.key), part);
        }
        self.report_cache();
        Ok(Box::new(Prepared {
            commit,
            report,
            identities,
            keys: batch_keys,
            brought: Vec::new(),
        }))
    }

    /// A prepared batch that will not be written (the write before it
    /// failed): the deferred entities it took along wait for the next.
    pub fn void(&mut self, prepared: Box<Prepared>) {
        self.behind.extend(prepared.brought);
    }

    /// The prepared batch is being written: until [`settled`](Self::settled),
    /// the next batch takes its events as stored (a re-delivery of one of
    /// them is a duplicate, not a new event).
    pub fn submit(&mut self, prepared: Box<Prepared>) -> (Commit, BatchReport) {
        let prepared = *prepared;
        self.in_flight = prepared.identities;
        self.in_flight_keys = prepared.keys;
        self.in_flight_brought = prepared.brought;
        (prepared.commit, prepared.report)
    }

    /// The write handed out by [`submit`](Self::submit) ended. After a
    /// failure the cache is emptied: what the store holds of the batch's
    /// entities is not known (a commit may fail half-way), and any batch
    /// prepared on top of it is void and must be prepared again; the
    /// deferred entities the batch took along wait for the next one.
    pub fn settled(&mut self, ok: bool) {
        self.in_flight.clear();
        self.in_flight_keys.clear();
        let brought = std::mem::take(&mut self.in_flight_brought);
        if !ok {
            self.cache.clear();
            self.report_cache();
            self.behind.extend(brought);
        }
    }

    /// A rebalance took these source partitions away: drop the cached
    /// entities whose last events came from them (their new owner writes
    /// them now). Call between batches, with no write in flight (its
    /// entities would be cached again as it settles).
    pub fn forget_partitions(&mut self, partitions: &[(String, i32)]) -> usize {
        let tags: HashSet<u64> = partitions
            .iter()
            .map(|(s, p)| cache::partition_tag(s, *p))
            .collect();
        let n = self.cache.forget_partitions(&tags);
        self.report_cache();
        n
    }

    /// What the cache did since the last report, and how much it holds
    /// now, to metrics.
    fn report_cache(&mut self) {
        let s = self.cache.take_stats();
        let now = (self.cache.len() as i64, self.cache.bytes() as i64);
        self.metrics.state_cache(
            (s.hits, s.misses, s.evictions),
            now.0 - self.cache_reported.0,
            now.1 - self.cache_reported.1,
        );
        self.cache_reported = now;
    }

    /// The write of a [`submit`](Self::submit)ted batch, timed, as a
    /// future of its own (the consume loop runs it beside the next
    /// batch's prepare).
    pub fn write(
        &self,
        commit: Commit,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let (storage, metrics) = (self.storage.clone(), self.metrics.clone());
        let signal = self.changes.clone();
        async move {
            let started = Instant::now();
            let changes = change_counts(&commit.changes);
            let result = storage.commit(commit).await;
            metrics.observe_stage("write", started.elapsed());
            if result.is_ok() {
                announce(&metrics, &signal, changes);
            }
            result
        }
    }

    /// Keep the deferred entities for the next batches (up to
    /// [`MAX_BEHIND`]).
    fn remember_deferred(&mut self, deferred: &[refold_store::EntityUpdate]) {
        for d in deferred {
            if self.behind.len() < MAX_BEHIND {
                self.behind.push_back(d.key.clone());
            }
        }
    }
}

/// Change records by CloudEvents type.
pub(crate) fn change_counts(changes: &[refold_store::ChangeRecord]) -> Vec<(&'static str, u64)> {
    let mut out: Vec<(&'static str, u64)> = Vec::new();
    for c in changes {
        let kind = c.kind.as_type();
        match out.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => out.push((kind, 1)),
        }
    }
    out
}

/// After a commit with change records landed: count them, and wake what
/// waits on the feed (long polls, sinks).
pub(crate) fn announce(
    metrics: &Metrics,
    signal: &tokio::sync::Notify,
    counts: Vec<(&'static str, u64)>,
) {
    if counts.is_empty() {
        return;
    }
    for (kind, n) in counts {
        metrics.change_records(kind, n);
    }
    signal.notify_waiters();
}

/// Deferred entities remembered for catching up; beyond it they are folded
/// by their own next batch or a query, like any entity behind its head.
const MAX_BEHIND: usize = 100_000;
/// Deferred entities a batch takes along at least (an idle poll has none of
/// its own records).
const MIN_CATCH_UP: usize = 256;

impl Pipeline {
    /// Whether entities deferred by earlier batches wait to be folded (the
    /// consume loop then runs a batch even when the source is idle).
    pub fn has_deferred(&self) -> bool {
        !self.behind.is_empty()
    }
}

impl Drop for Pipeline {
    /// What this pipeline's cache held leaves the gauges with it.
    fn drop(&mut self) {
        let (entries, bytes) = self.cache_reported;
        self.metrics.state_cache((0, 0, 0), -entries, -bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{bank_host, deposit, opened, record};
    use super::*;

    fn app() -> Host {
        bank_host()
    }

    fn pipeline_with(app: &Host, config: PipelineConfig) -> Pipeline {
        Pipeline::new(
            app.storage.clone(),
            app.registry.clone(),
            config,
            app.metrics.clone(),
        )
    }

    async fn balance(app: &Host, account: &str) -> Option<u64> {
        let k = EntityKey::new("account", account);
        let rec = app.storage.load(std::slice::from_ref(&k)).await.unwrap();
        rec.get(&k)
            .and_then(|r| r.state.as_ref())
            .and_then(|s| s["balance"].as_u64())
    }

    /// Event ids that repeat across entities ("1", "2", … per entity) are
    /// distinct events: a re-delivery of (A, "7") in the batch that brings
    /// (B, "7") drops only A's copy.
    #[tokio::test]
    async fn dedup_is_by_entity_and_event_id() {
        let app = app();
        let mut p = Pipeline::for_host(&app);
        let r = p
            .process(&[deposit(0, "a", "1", 10), deposit(1, "a", "2", 20)])
            .await
            .unwrap();
        assert_eq!(r.applied, 2);
        let r = p
            .process(&[
                deposit(2, "a", "2", 20), // re-delivered
                deposit(3, "b", "2", 5),  // same id, other entity: new
                deposit(4, "b", "1", 7),
                deposit(5, "b", "1", 7), // re-delivered within the batch
            ])
            .await
            .unwrap();
        assert_eq!((r.applied, r.duplicates, r.dead_lettered), (2, 2, 0));
        assert_eq!(balance(&app, "a").await, Some(30));
        assert_eq!(balance(&app, "b").await, Some(12));
    }

    /// One change record per entity per committed batch, in the feed with
    /// its positions; a re-delivery advances nothing and makes none; an
    /// event the plugin ignores still advances the position, and is a
    /// record with the state unchanged.
    #[tokio::test]
    async fn each_position_advance_is_one_change_record() {
        let app = app();
        let mut p = Pipeline::for_host(&app);
        p.process(&[
            deposit(0, "a", "1", 10),
            deposit(1, "a", "2", 20),
            deposit(2, "b", "1", 5),
        ])
        .await
        .unwrap();
        p.process(&[deposit(3, "a", "2", 20)]).await.unwrap();
        let ignored = testing::record(
            4,
            r#"{"specversion":"1.0","id":"n1","source":"/t","type":"account.noted","subject":"b","entitytype":"account","data":{}}"#.into(),
        );
        let r = p.process(&[ignored]).await.unwrap();
        assert_eq!(r.dead_lettered, 0);
        let feed = app.storage.changes_after(0, 100).await.unwrap();
        let seen: Vec<(String, u64, u64, u64)> = feed
            .iter()
            .map(|c| {
                let e = &c.event;
                (
                    e["subject"].as_str().unwrap().to_string(),
                    e["firstposition"].as_u64().unwrap(),
                    e["lastposition"].as_u64().unwrap(),
                    e["data"]["state"]["balance"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("a".into(), 1, 2, 30),
                ("b".into(), 1, 1, 5),
                ("b".into(), 2, 2, 5)
            ]
        );
        assert!(
            feed.iter()
                .all(|c| c.event["type"] == "refold.state.changed")
        );
        let ids: HashSet<&str> = feed.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids.len(), 3);
    }

    /// With `changes.enabled = false` nothing is recorded.
    #[tokio::test]
    async fn no_records_when_changes_are_off() {
        let app = app();
        let mut p = pipeline_with(
            &app,
            PipelineConfig {
                changes: ChangeDetail::default(),
                ..Default::default()
            },
        );
        p.process(&[deposit(0, "a", "1", 10)]).await.unwrap();
        assert!(app.storage.changes_after(0, 10).await.unwrap().is_empty());
    }

    /// The same identity with other bytes is a conflict: dead-lettered with
    /// both digests, never dropped or applied.
    #[tokio::test]
    async fn a_conflicting_duplicate_is_dead_lettered_with_both_digests() {
        let app = app();
        let mut p = Pipeline::for_host(&app);
        p.process(&[deposit(0, "a", "1", 10)]).await.unwrap();
        let r = p
            .process(&[deposit(1, "a", "1", 99), deposit(2, "a", "2", 1)])
            .await
            .unwrap();
        assert_eq!((r.applied, r.duplicates, r.dead_lettered), (1, 0, 1));
        // Within one batch too.
        let r = p
            .process(&[deposit(3, "c", "1", 1), deposit(4, "c", "1", 2)])
            .await
            .unwrap();
        assert_eq!((r.applied, r.dead_lettered), (1, 1));
        let dl = app.storage.dead_letters(10).await.unwrap();
        assert_eq!(dl.len(), 2);
        assert!(dl.iter().all(|d| d.code == "conflicting_duplicate"));
        let stored = refold_runtime::digest_of(&deposit(0, "a", "1", 10).payload);
        let received = refold_runtime::digest_of(&deposit(1, "a", "1", 99).payload);
        assert!(dl[0].reason.contains(&stored), "{}", dl[0].reason);
        assert!(dl[0].reason.contains(&received), "{}", dl[0].reason);
        assert_eq!(balance(&app, "a").await, Some(11));
    }

    /// The stored event is what was received: big integers and key order
    /// survive, and the plugin reads the same text.
    #[tokio::test]
    async fn raw_events_are_kept_as_received() {
        let app = app();
        let mut p = Pipeline::for_host(&app);
        let text = r#"{"specversion":"1.0","id":"x1","source":"/t","type":"account.noted","subject":"a","entitytype":"account","zeta":1,"alpha":2,"data":{"big":123456789012345678901234567890,"b":1,"a":2}}"#;
        p.process(&[record(0, text.to_string())]).await.unwrap();
        let h = app
            .storage
            .history(&EntityKey::new("account", "a"), 0, None)
            .await
            .unwrap();
        assert_eq!(
            h[0].data.as_str(),
            r#"{"big":123456789012345678901234567890,"b":1,"a":2}"#
        );
        assert_eq!(h[0].record.as_ref().unwrap().as_str(), text);
        assert_eq!(
            h[0].digest.as_deref(),
            Some(refold_runtime::digest_of(text.as_bytes()).as_str())
        );
    }

    /// With no time left in the batch, entities are deferred: their events
    /// are stored, their state is folded by the next batch that meets them.
    #[tokio::test]
    async fn entities_beyond_the_batch_budget_are_deferred_then_caught_up() {
        let app = app();
        let mut p = pipeline_with(
            &app,
            PipelineConfig {
                fold_budget: Duration::ZERO,
                ..Default::default()
            },
        );
        let r = p
            .process(&[deposit(0, "a", "1", 10), deposit(1, "b", "1", 5)])
            .await
            .unwrap();
        assert_eq!((r.applied, r.deferred, r.stored), (0, 2, 2));
        assert_eq!(balance(&app, "a").await, None);
        let mut p = Pipeline::for_host(&app);
        let r = p.process(&[deposit(2, "a", "2", 1)]).await.unwrap();
        assert_eq!((r.applied, r.deferred), (2, 0));
        assert_eq!(balance(&app, "a").await, Some(11));
    }

    /// Deferred entities are folded by the next batches even when none of
    /// their events arrives again (an idle poll runs with no records).
    #[tokio::test]
    async fn deferred_entities_catch_up_without_new_events() {
        let app = app();
        let mut p = pipeline_with(
            &app,
            PipelineConfig {
                fold_budget: Duration::ZERO,
                ..Default::default()
            },
        );
        let r = p
            .process(&[deposit(0, "a", "1", 10), deposit(1, "b", "1", 5)])
            .await
            .unwrap();
        assert_eq!(r.deferred, 2);
        assert!(p.has_deferred());
        p.config.fold_budget = Duration::from_secs(5);
        let r = p.process(&[]).await.unwrap();
        assert_eq!((r.applied, r.deferred), (2, 0));
        assert!(!p.has_deferred());
        assert_eq!(balance(&app, "b").await, Some(5));
    }

    /// Output beyond the batch's read-model budget defers the rest.
    #[tokio::test]
    async fn the_batch_projection_budget_defers_the_rest() {
        let app = app();
        let mut p = pipeline_with(
            &app,
            PipelineConfig {
                max_batch_projection_ops: 1,
                ..Default::default()
            },
        );
        let r = p.process(&[opened(0, "a"), opened(1, "b")]).await.unwrap();
        assert_eq!((r.applied, r.deferred), (1, 1));
    }

    /// Cached records only save reads: an entity another writer moved on
    /// (another host after a rebalance, a re-submitted dead letter) fences
    /// the batch that used its stale entry, the entry is dropped, and the
    /// re-run folds from what the store holds.
    #[tokio::test]
    async fn a_stale_cached_entity_fences_its_batch_and_the_rerun_is_exact() {
        let app = app();
        let mut mine = Pipeline::for_host(&app);
        mine.process(&[deposit(0, "a", "1", 10)]).await.unwrap();
        // Behind its back, another writer appends to "a".
        let mut other = Pipeline::for_host(&app);
        other.process(&[deposit(1, "a", "2", 5)]).await.unwrap();
        let batch = [deposit(2, "a", "3", 1), deposit(3, "b", "1", 7)];
        let err = mine.process(&batch).await.unwrap_err();
        assert!(matches!(err, StoreError::Fenced(_)), "{err}");
        let r = mine.process(&batch).await.unwrap();
        assert_eq!(r.applied, 2);
        assert_eq!(balance(&app, "a").await, Some(16));
        assert_eq!(balance(&app, "b").await, Some(7));
        // A re-delivery of what the other writer stored is known from the
        // store even though this pipeline's cache had never seen it.
        let r = mine.process(&[deposit(4, "a", "2", 5)]).await.unwrap();
        assert_eq!((r.applied, r.duplicates), (0, 1));
    }

    /// Re-deliveries and conflicts are found for cached entities too: an id
    /// the entry knows is asked of the store, whose digest decides.
    #[tokio::test]
    async fn cached_entities_still_see_re_deliveries_and_conflicts() {
        let app = app();
        let mut p = Pipeline::for_host(&app);
        p.process(&[deposit(0, "a", "1", 10)]).await.unwrap();
        let r = p
            .process(&[deposit(1, "a", "1", 10), deposit(2, "a", "2", 1)])
            .await
            .unwrap();
        assert_eq!((r.applied, r.duplicates), (1, 1));
        let r = p.process(&[deposit(3, "a", "2", 99)]).await.unwrap();
        assert_eq!((r.applied, r.dead_lettered), (0, 1));
        assert_eq!(balance(&app, "a").await, Some(11));
        let text = app.metrics.render();
        assert!(
            text.contains("refold_state_cache_lookups_total{result=\"hit\"} 1"),
            "{text}"
        );
    }

    /// An entity first met by this pipeline but already stored (a restart,
    /// a rebalance) has its ids read once, so its re-deliveries are found.
    #[tokio::test]
    async fn an_entity_stored_before_the_pipeline_started_is_deduplicated() {
        let app = app();
        Pipeline::for_host(&app)
            .process(&[deposit(0, "a", "1", 10), deposit(1, "a", "2", 10)])
            .await
            .unwrap();
        let mut p = Pipeline::for_host(&app);
        let r = p.process(&[deposit(2, "a", "3", 1)]).await.unwrap();
        assert_eq!(r.applied, 1);
        let r = p
            .process(&[
                deposit(3, "a", "1", 10),
                deposit(4, "a", "2", 10),
                deposit(5, "a", "4", 1),
            ])
            .await
            .unwrap();
        assert_eq!((r.applied, r.duplicates), (1, 2));
        assert_eq!(balance(&app, "a").await, Some(22));
    }

    /// A cache far too small for the input (one entry, or none) gives the
    /// same states as one that holds everything.
    #[tokio::test]
    async fn a_cache_too_small_for_the_input_gives_the_same_states() {
        let input: Vec<SourceRecord> = (0..300)
            .map(|i| {
                deposit(
                    i,
                    &format!("acc-{}", (i * 7) % 23),
                    &format!("e{}", i % 40),
                    1 + i as u64 % 5,
                )
            })
            .collect();
        let mut results = Vec::new();
        for budget in [0, 400, 64 << 20] {
            let app = app();
            let mut p = pipeline_with(
                &app,
                PipelineConfig {
                    state_cache_bytes: budget,
                    ..Default::default()
                },
            );
            for (n, chunk) in input.chunks(17).enumerate() {
                p.process(chunk).await.unwrap();
                // Re-deliver a window now and then, as after a crash.
                if n % 4 == 3 {
                    p.process(&input[n * 17 - 20..n * 17]).await.unwrap();
                }
            }
            let mut balances = Vec::new();
            for a in 0..23 {
                balances.push(balance(&app, &format!("acc-{a}")).await);
            }
            results.push(balances);
        }
        assert_eq!(results[0], results[1]);
        assert_eq!(results[0], results[2]);
        assert!(results[0].iter().all(Option::is_some));
    }
    /// A deferred entity of the batch being written has its events in
    /// between read back from the store: the next batch waits for that
    /// write instead of reading a store that does not hold it yet.
    #[tokio::test]
    async fn a_deferred_entity_of_the_write_in_flight_waits_for_it() {
        let app = app();
        let mut p = pipeline_with(
            &app,
            PipelineConfig {
                fold_budget: Duration::ZERO,
                ..Default::default()
            },
        );
        let Prepare::Ready(first) = p.prepare(&[deposit(0, "a", "1", 10)]).await.unwrap() else {
            panic!("nothing is in flight yet");
        };
        let (commit, report) = p.submit(first);
        assert_eq!(report.deferred, 1);
        p.config.fold_budget = Duration::from_secs(5);
        // "a" is brought along, but its event is not stored yet.
        assert!(matches!(p.prepare(&[]).await.unwrap(), Prepare::Settle));
        app.storage.commit(commit).await.unwrap();
        p.settled(true);
        let Prepare::Ready(second) = p.prepare(&[]).await.unwrap() else {
            panic!("nothing is in flight any more");
        };
        let (commit, report) = p.submit(second);
        assert_eq!((report.applied, report.deferred), (1, 0));
        app.storage.commit(commit).await.unwrap();
        p.settled(true);
        assert_eq!(balance(&app, "a").await, Some(10));
    }
}

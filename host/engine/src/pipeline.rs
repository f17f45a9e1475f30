//! One batch, start to finish: validate → dedup → group → fold → project →
//! commit. The source checkpoint is part of the same commit, so state and
//! checkpoint advance together.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use refold_runtime::fold::{self, FoldOutcome};
use refold_runtime::{CallError, Plugin, Sandbox};
use refold_source::{SourceRecord, checkpoints_of};
use refold_store::{
    Commit, DeadLetter, EntityRecord, EntityUpdate, EventIdentity, QuarantineRecord, Storage,
    StoreError, StoredEvent,
};
use refold_types::clock::now_rfc3339;
use refold_types::event::{self, EntityKey, Envelope, Rejection};

use crate::generation;
use crate::host::Host;
use crate::metrics::Metrics;
use crate::registry::{Active, Registry, plugin_ref};

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
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_record_bytes: 1 << 20,
            fold_threads: 0,
            fold_budget: Duration::from_secs(2),
            max_batch_projection_ops: 200_000,
            max_batch_projection_bytes: 64 << 20,
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

/// What one batch may still spend on folding, shared by the threads that
/// fold its entity types: time, and read-model output (which lives in host
/// memory until the commit). Checked before each entity, so a batch ends
/// within the budget plus one entity's calls, each under its deadline.
struct FoldBudget {
    until: Instant,
    ops: AtomicUsize,
    bytes: AtomicUsize,
    max_ops: usize,
    max_bytes: usize,
}

impl FoldBudget {
    fn exhausted(&self) -> bool {
        Instant::now() >= self.until
            || self.ops.load(Ordering::Relaxed) >= self.max_ops
            || self.bytes.load(Ordering::Relaxed) >= self.max_bytes
    }

    fn charge(&self, d: &Done) {
        // Measured by the sandbox as it lifted the ops (names, keys, bodies
        // and a per-op overhead), the same measure as the per-call limit.
        if let Some(o) = &d.outcome {
            let size = o.projection_size;
            self.ops.fetch_add(size.ops, Ordering::Relaxed);
            self.bytes.fetch_add(
                usize::try_from(size.bytes).unwrap_or(usize::MAX),
                Ordering::Relaxed,
            );
        }
    }
}

/// The ingest pipeline. Owns one sandbox per entity type.
pub struct Pipeline {
    storage: Arc<dyn Storage>,
    registry: Arc<Registry>,
    sandboxes: HashMap<String, Sandbox>,
    /// Entities a batch deferred, to be folded by the next ones even when no
    /// new event of theirs arrives (so their read models catch up too).
    behind: std::collections::VecDeque<EntityKey>,
    config: PipelineConfig,
    metrics: Arc<Metrics>,
}

/// One entity's share of a batch.
pub(crate) struct Work {
    pub(crate) record: EntityRecord,
    /// Stored events the state has not caught up with yet (after a swap of
    /// generations), folded before the new ones.
    pub(crate) gap: Vec<StoredEvent>,
    pub(crate) events: Vec<StoredEvent>,
}

/// What folding did to one entity.
pub(crate) struct Done {
    pub(crate) update: EntityUpdate,
    pub(crate) outcome: Option<FoldOutcome>,
    pub(crate) failed_event: Option<(StoredEvent, CallError)>,
    pub(crate) plugin: Arc<Plugin>,
}

impl Done {
    /// The quarantine record of a failure, if any.
    pub(crate) fn quarantine(&self) -> Option<QuarantineRecord> {
        self.failed_event
            .as_ref()
            .map(|(ev, err)| QuarantineRecord {
                key: self.update.key.clone(),
                event_id: ev.id.clone(),
                event_position: ev.position,
                kind: err.kind().to_string(),
                error: err.to_string(),
                plugin: plugin_ref(&self.plugin),
                recorded_at: now_rfc3339(),
            })
    }
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
            },
            host.metrics.clone(),
        )
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
            behind: Default::default(),
            config,
            metrics,
        }
    }

    /// Process one batch of records and commit its effects with the
    /// checkpoints it reached. On `Err` nothing of the batch is committed and
    /// the caller must retry it (or re-read it from the last checkpoint).
    pub async fn process(&mut self, records: &[SourceRecord]) -> Result<BatchReport, StoreError> {
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

        // 1. Validate envelopes; whatever fails becomes a dead letter.
        let mut envelopes: Vec<(Envelope, &SourceRecord)> = Vec::with_capacity(records.len());
        for r in records {
            let parsed = if event::is_binary_mode(&r.headers) {
                event::parse_binary(
                    &r.headers,
                    r.key.as_deref(),
                    &r.payload,
                    self.config.max_record_bytes,
                )
            } else {
                event::parse_structured(&r.payload, self.config.max_record_bytes)
            };
            let checked = parsed.and_then(|e| match plugins.get(&e.key.entity_type) {
                None => Err(Rejection::UnknownEntityType(e.key.entity_type.clone())),
                Some(p) => {
                    let size = r.payload.len();
                    let max = p.limits.max_event_bytes as usize;
                    if size > max {
                        Err(Rejection::TooLarge { size, max })
                    } else {
                        Ok(e)
                    }
                }
            });
            match checked {
                Ok(e) => envelopes.push((e, r)),
                Err(why) => {
                    self.metrics.dead_lettered(why.code());
                    commit.dead_letters.push(dead_letter(r, &why));
                }
            }
        }

        // 2. Deduplicate by identity (entity type, entity id, event id),
        // within the batch and against the store. The same bytes again are a
        // re-delivery; other bytes under a known identity are a conflict,
        // kept as a dead letter naming both digests: never dropped silently.
        let mut seen: HashMap<EventIdentity, String> = HashMap::with_capacity(envelopes.len());
        let mut unique = Vec::with_capacity(envelopes.len());
        for (e, r) in envelopes {
            let identity = (e.key.clone(), e.id.clone());
            match seen.get(&identity) {
                None => {
                    seen.insert(identity, e.digest.clone());
                    unique.push((e, r));
                }
                Some(d) if *d == e.digest => report.duplicates += 1,
                Some(d) => {
                    let why = conflict(&e, d);
                    self.metrics.dead_lettered(why.code());
                    commit.dead_letters.push(dead_letter(r, &why));
                }
            }
        }
        let known = if unique.is_empty() {
            HashMap::new()
        } else {
            let ids: Vec<EventIdentity> = seen.into_keys().collect();
            self.storage.known_ids(&ids).await?
        };
        let mut envelopes: Vec<(Envelope, refold_store::Origin)> = Vec::with_capacity(unique.len());
        for (e, r) in unique {
            match known.get(&(e.key.clone(), e.id.clone())) {
                None => envelopes.push((e, r.origin.clone())),
                Some(None) => report.duplicates += 1,
                Some(Some(d)) if *d == e.digest => report.duplicates += 1,
                Some(Some(d)) => {
                    let why = conflict(&e, d);
                    self.metrics.dead_lettered(why.code());
                    commit.dead_letters.push(dead_letter(r, &why));
                }
            }
        }
        report.dead_lettered = commit.dead_letters.len();
        self.metrics.duplicates(report.duplicates as u64);

        // 3. Group by entity, keeping arrival order.
        let mut order: Vec<EntityKey> = Vec::new();
        let mut groups: HashMap<EntityKey, Vec<(Envelope, refold_store::Origin)>> = HashMap::new();
        for (e, o) in envelopes {
            groups
                .entry(e.key.clone())
                .or_insert_with(|| {
                    order.push(e.key.clone());
                    Vec::new()
                })
                .push((e, o));
        }
        // Entities left behind by earlier batches come along (a bounded
        // number per batch), with no new events: their gap is folded.
        let take = self.behind.len().min(records.len().max(MIN_CATCH_UP));
        for key in self.behind.drain(..take) {
            if !groups.contains_key(&key) && plugins.contains_key(&key.entity_type) {
                groups.insert(key.clone(), Vec::new());
                order.push(key);
            }
        }
        let mut records_by_key = if order.is_empty() {
            HashMap::new()
        } else {
            self.storage.load(&order).await?
        };
        // Records another generation wrote (before a cut-over, or by a host
        // that had not seen it yet) continue from the active generation's own
        // state; theirs is saved for a rollback.
        let moves =
            generation::resolve(&*self.storage, &generations, &mut records_by_key, true).await?;
        commit.entities.extend(moves.saved);
        commit.quarantines.extend(moves.quarantines);
        commit.released.extend(moves.released);

        // 4. Position the new events after each entity's head.
        let mut work = Vec::with_capacity(order.len());
        for key in &order {
            let record = records_by_key.remove(key).unwrap_or_else(|| EntityRecord {
                generation: generations
                    .get(&key.entity_type)
                    .cloned()
                    .unwrap_or_default(),
                ..EntityRecord::new(key.clone())
            });
            let events: Vec<StoredEvent> = groups
                .remove(key)
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(i, (e, origin))| StoredEvent {
                    key: key.clone(),
                    position: record.head + 1 + i as u64,
                    id: e.id,
                    source: e.source,
                    event_type: e.event_type,
                    time: e.time,
                    data: e.data,
                    origin: Some(origin),
                    record: Some(e.record),
                    digest: Some(e.digest),
                })
                .collect();
            report.stored += events.len();
            commit.events.extend(events.iter().cloned());
            let gap = if !record.quarantined && record.position < record.head {
                self.storage
                    .history(key, record.position, Some(record.head))
                    .await?
            } else {
                Vec::new()
            };
            work.push(Work {
                record,
                gap,
                events,
            });
        }

        // 5. Fold, off the async threads: guest calls are CPU-bound. Each
        // entity type folds on a blocking thread of its own (a sandbox serves
        // one type), a bounded number at once, under one budget for the
        // batch: a slow or looping type costs the others at most the budget
        // plus one entity's calls, not the sum of every deadline it runs into.
        let started = Instant::now();
        let budget = Arc::new(FoldBudget {
            until: started + self.config.fold_budget,
            ops: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_ops: self.config.max_batch_projection_ops,
            max_bytes: self.config.max_batch_projection_bytes,
        });
        let mut by_type: Vec<(String, Vec<Work>)> = Vec::new();
        for w in work {
            let t = &w.record.key.entity_type;
            match by_type.iter_mut().find(|(have, _)| have == t) {
                Some((_, ws)) => ws.push(w),
                None => by_type.push((t.clone(), vec![w])),
            }
        }
        let permits = Arc::new(tokio::sync::Semaphore::new(self.config.threads()));
        let mut tasks = Vec::with_capacity(by_type.len());
        for (entity_type, works) in by_type {
            let sandbox = self.sandboxes.remove(&entity_type);
            let (plugins, budget, permits) = (plugins.clone(), budget.clone(), permits.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = permits.acquire_owned().await;
                tokio::task::spawn_blocking(move || {
                    let mut sandboxes = HashMap::new();
                    if let Some(s) = sandbox {
                        sandboxes.insert(entity_type, s);
                    }
                    let mut done = Vec::with_capacity(works.len());
                    let mut deferred = Vec::new();
                    for w in works {
                        if budget.exhausted() {
                            deferred.push(defer(w));
                            continue;
                        }
                        let d = fold_one(&mut sandboxes, &plugins, w);
                        budget.charge(&d);
                        done.push(d);
                    }
                    for s in sandboxes.values_mut() {
                        s.recycle();
                    }
                    (sandboxes, done, deferred)
                })
                .await
            }));
        }
        let mut done = Vec::new();
        for t in tasks {
            let (sandboxes, d, deferred) = t
                .await
                .map_err(|e| StoreError::Other(anyhow::anyhow!("fold task failed: {e}")))?
                .map_err(|e| StoreError::Other(anyhow::anyhow!("fold task failed: {e}")))?;
            self.sandboxes.extend(sandboxes);
            done.extend(d);
            report.deferred += deferred.len();
            for d in &deferred {
                if self.behind.len() < MAX_BEHIND {
                    self.behind.push_back(d.key.clone());
                }
            }
            commit.entities.extend(deferred);
        }
        if report.deferred > 0 {
            self.metrics.deferred(report.deferred as u64);
            tracing::info!(
                deferred = report.deferred,
                "batch fold budget spent; the remaining entities are folded later"
            );
        }
        self.metrics.observe_fold(started.elapsed());

        // 6. Collect the effects.
        for d in done {
            let tag = (
                d.plugin.info.entity_type.as_str(),
                d.plugin.info.version.as_str(),
            );
            if let Some(o) = &d.outcome {
                report.applied += o.applied;
                self.metrics.applied(tag.0, tag.1, o.applied as u64);
                commit.projections.extend(o.projections.iter().cloned());
            }
            if d.outcome.is_none() && d.failed_event.is_none() {
                report.held += (d.update.head - d.update.expected_head) as usize;
            }
            if let Some((ev, err)) = &d.failed_event {
                self.metrics.quarantined(tag.0, tag.1);
                tracing::warn!(entity = %d.update.key, event = %ev.id, error = %err, "entity quarantined");
                report.quarantined.push(d.update.key.clone());
            }
            if let Some(q) = d.quarantine() {
                commit.quarantines.push(q);
            }
            commit.entities.push(d.update);
        }
        for s in self.sandboxes.values() {
            self.metrics.sandbox(
                &s.plugin().info.entity_type,
                &s.plugin().info.version,
                &s.stats,
            );
        }

        self.storage.commit(commit).await?;
        Ok(report)
    }
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

/// An entity left for later: its events are stored (its head moves on), its
/// state stays where it was, so the next batch or query that meets it folds
/// the gap first.
fn defer(w: Work) -> EntityUpdate {
    let r = w.record;
    EntityUpdate {
        head: w.events.last().map(|e| e.position).unwrap_or(r.head),
        expected_head: r.head,
        state: r.state.unwrap_or(Value::Null),
        position: r.position,
        plugin: r.plugin,
        quarantined: r.quarantined,
        generation: r.generation,
        key: r.key,
    }
}

/// Fold one entity's new events with the active plugin of its type.
pub(crate) fn fold_one(
    sandboxes: &mut HashMap<String, Sandbox>,
    plugins: &Active,
    w: Work,
) -> Done {
    let Work {
        record,
        gap,
        events,
    } = w;
    let head = events.last().map(|e| e.position).unwrap_or(record.head);
    let events: Vec<StoredEvent> = gap.into_iter().chain(events).collect();
    let plugin = plugins
        .get(&record.key.entity_type)
        .expect("events of types without a plugin were dead-lettered")
        .clone();
    let sandbox = sandbox_for(sandboxes, &plugin);
    let mut update = EntityUpdate {
        key: record.key.clone(),
        state: record.state.clone().unwrap_or(Value::Null),
        position: record.position,
        head,
        expected_head: record.head,
        plugin: record.plugin.clone(),
        quarantined: record.quarantined,
        generation: record.generation.clone(),
    };
    if record.quarantined {
        // Held: store the events, apply nothing until the entity is retried.
        update.quarantined = true;
        return Done {
            update,
            outcome: None,
            failed_event: None,
            plugin,
        };
    }
    // Position 0 with a `null` state: nothing was ever folded (the entity was
    // deferred, or quarantined in `init`), so it starts from `init`.
    let state = match record.state.filter(|s| record.position > 0 || !s.is_null()) {
        Some(s) => s,
        None => match fold::init_state(sandbox, &record.key.entity_id) {
            Ok(s) => s,
            Err(e) => {
                update.quarantined = true;
                let first = events.first().cloned();
                return Done {
                    update,
                    outcome: None,
                    failed_event: first.map(|f| (f, e)),
                    plugin,
                };
            }
        },
    };
    let outcome = fold::fold_and_project(sandbox, &record.key.entity_id, state, &events, true);
    update.state = outcome.state.clone();
    update.position = record.position + outcome.applied as u64;
    if outcome.applied > 0 {
        update.plugin = Some(plugin_ref(&plugin));
    }
    let failed_event = outcome
        .failure
        .as_ref()
        .map(|(i, e)| (events[*i].clone(), e.clone()));
    if failed_event.is_some() {
        update.quarantined = true;
    }
    Done {
        update,
        outcome: Some(outcome),
        failed_event,
        plugin,
    }
}

/// The sandbox of an entity type, rebuilt when the active version changed.
pub fn sandbox_for<'a>(
    sandboxes: &'a mut HashMap<String, Sandbox>,
    plugin: &Arc<Plugin>,
) -> &'a mut Sandbox {
    let entry = sandboxes
        .entry(plugin.info.entity_type.clone())
        .or_insert_with(|| Sandbox::new(plugin.clone()));
    if !Arc::ptr_eq(entry.plugin(), plugin) {
        *entry = Sandbox::new(plugin.clone());
    }
    entry
}

fn conflict(e: &Envelope, stored: &str) -> Rejection {
    Rejection::ConflictingDuplicate {
        entity: e.key.to_string(),
        id: e.id.clone(),
        stored: stored.to_string(),
        received: e.digest.clone(),
    }
}

fn dead_letter(r: &SourceRecord, why: &Rejection) -> DeadLetter {
    let peek: Option<Value> = serde_json::from_slice(&r.payload).ok();
    let attr = |name: &str| {
        peek.as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let header = |name: &str| {
        r.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let mut payload = String::from_utf8_lossy(&r.payload).into_owned();
    if payload.len() > 64 << 10 {
        // Keep the dead letter listable; the head of the record shows what it was.
        let mut cut = 64 << 10;
        while !payload.is_char_boundary(cut) {
            cut -= 1;
        }
        payload.truncate(cut);
        payload.push_str("…(truncated)");
    }
    DeadLetter {
        // Derived from the origin, so re-reading the record after a crash
        // yields the same id; hashed, so it is safe in a URL.
        id: format!(
            "dl-{}",
            &refold_runtime::digest_of(
                format!(
                    "{}\u{0}{}\u{0}{}",
                    r.origin.source, r.origin.partition, r.origin.offset
                )
                .as_bytes()
            )[..20]
        ),
        code: why.code().to_string(),
        reason: why.to_string(),
        payload,
        origin: Some(r.origin.clone()),
        event_id: attr("id").or_else(|| header("ce_id")),
        entity_type: attr("entitytype").or_else(|| header("ce_entitytype")),
        recorded_at: now_rfc3339(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::HostConfig;
    use refold_store::Origin;
    use refold_store_sqlite::SqliteStore;

    fn app() -> Host {
        let mut config = HostConfig::default();
        config.plugins.files =
            vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bank/bank.wasm")];
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        Host::with_storage(config, store.clone(), store).unwrap()
    }

    fn pipeline_with(app: &Host, config: PipelineConfig) -> Pipeline {
        Pipeline::new(
            app.storage.clone(),
            app.registry.clone(),
            config,
            app.metrics.clone(),
        )
    }

    fn record(offset: i64, payload: String) -> SourceRecord {
        SourceRecord {
            origin: Origin {
                source: "t".into(),
                partition: 0,
                offset,
            },
            next_offset: offset + 1,
            key: None,
            headers: Vec::new(),
            payload: payload.into_bytes(),
            produced_at_ms: None,
        }
    }

    fn deposit(offset: i64, account: &str, id: &str, amount: u64) -> SourceRecord {
        record(
            offset,
            format!(
                r#"{{"specversion":"1.0","id":"{id}","source":"/t","type":"account.deposited","subject":"{account}","entitytype":"account","data":{{"amount":{amount}}}}}"#
            ),
        )
    }

    fn opened(offset: i64, account: &str) -> SourceRecord {
        record(
            offset,
            format!(
                r#"{{"specversion":"1.0","id":"o-{account}","source":"/t","type":"account.opened","subject":"{account}","entitytype":"account","data":{{"owner":"owner-{account}"}}}}"#
            ),
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
}

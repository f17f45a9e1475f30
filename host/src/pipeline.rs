//! One batch, start to finish: validate → dedup → group → fold → project →
//! commit. The source checkpoint is part of the same commit, so state and
//! checkpoint advance together.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::event::{self, EntityKey, Envelope, Rejection};
use crate::fold::{self, FoldOutcome};
use crate::generation;
use crate::metrics::Metrics;
use crate::registry::{Active, Registry, plugin_ref};
use crate::runtime::{CallError, Plugin, Sandbox};
use crate::source::{SourceRecord, checkpoints_of};
use crate::store::{
    Commit, DeadLetter, EntityRecord, EntityUpdate, QuarantineRecord, Storage, StoreError,
    StoredEvent, now_rfc3339,
};

/// What one batch did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct BatchReport {
    /// Records read.
    pub records: usize,
    /// Events stored for the first time.
    pub stored: usize,
    /// Events folded into states.
    pub applied: usize,
    /// Events seen before (same id), ignored.
    pub duplicates: usize,
    /// Records turned into dead letters.
    pub dead_lettered: usize,
    /// Events held for quarantined entities.
    pub held: usize,
    /// Entities newly quarantined.
    pub quarantined: Vec<EntityKey>,
}

/// Settings of the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Largest record accepted before any plugin sees it, in bytes.
    pub max_record_bytes: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_record_bytes: 1 << 20,
        }
    }
}

/// The ingest pipeline. Owns one sandbox per entity type.
pub struct Pipeline {
    storage: Arc<dyn Storage>,
    registry: Arc<Registry>,
    sandboxes: HashMap<String, Sandbox>,
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
        let mut envelopes: Vec<(Envelope, crate::store::Origin)> =
            Vec::with_capacity(records.len());
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
                Ok(e) => envelopes.push((e, r.origin.clone())),
                Err(why) => {
                    self.metrics.dead_lettered(why.code());
                    commit.dead_letters.push(dead_letter(r, &why));
                }
            }
        }
        report.dead_lettered = commit.dead_letters.len();

        // 2. Deduplicate by event id: within the batch, then against the store.
        let mut seen = HashSet::new();
        envelopes.retain(|(e, _)| seen.insert((e.key.clone(), e.id.clone())));
        let pairs: Vec<(EntityKey, String)> = envelopes
            .iter()
            .map(|(e, _)| (e.key.clone(), e.id.clone()))
            .collect();
        let known = if pairs.is_empty() {
            HashSet::new()
        } else {
            self.storage.known_ids(&pairs).await?
        };
        envelopes.retain(|(e, _)| !known.contains(&e.id));
        report.duplicates = records.len() - report.dead_lettered - envelopes.len();

        // 3. Group by entity, keeping arrival order.
        let mut order: Vec<EntityKey> = Vec::new();
        let mut groups: HashMap<EntityKey, Vec<(Envelope, crate::store::Origin)>> = HashMap::new();
        for (e, o) in envelopes {
            groups
                .entry(e.key.clone())
                .or_insert_with(|| {
                    order.push(e.key.clone());
                    Vec::new()
                })
                .push((e, o));
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

        // 5. Fold, off the async threads: guest calls are CPU-bound.
        let mut sandboxes = std::mem::take(&mut self.sandboxes);
        let started = Instant::now();
        let (sandboxes, done) = tokio::task::spawn_blocking(move || {
            let done: Vec<Done> = work
                .into_iter()
                .map(|w| fold_one(&mut sandboxes, &plugins, w))
                .collect();
            for s in sandboxes.values_mut() {
                s.recycle();
            }
            (sandboxes, done)
        })
        .await
        .map_err(|e| StoreError::Other(anyhow::anyhow!("fold task failed: {e}")))?;
        self.sandboxes = sandboxes;
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
    let state = match record.state {
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
            &crate::runtime::digest_of(
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

//! Rebuild: refold every entity of a type from its raw events into a new
//! generation in the background, catch up with what arrived meanwhile, then
//! cut over between two batches with one write of the activation row. The
//! rebuild's stored record is its lease (see [`Lease`]); a rebuild whose
//! process died is cleaned up by [`PluginManager::recover_rebuilds`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;

use refold_runtime::{Plugin, Sandbox};
use refold_store::{
    Activation, ActivationMode, Commit, EntityRecord, ProjectionWrite, RebuildState,
};
use refold_types::Generation;
use refold_types::clock::{now_rfc3339, unix_ms};
use refold_types::event::EntityKey;

use super::PluginManager;
use super::corrections::Side;
use super::types::{InstallError, RebuildStatus};
use crate::generation;
use crate::pipeline::{entities_of, entity};

/// History reads in flight per rebuild chunk.
const HISTORY_READS: usize = 16;

/// A rebuild's owner writes its record at least this often while it runs.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// A running rebuild whose record has not moved for this long has lost its
/// process, and may be cleaned up by any host. Generous (24 heartbeats),
/// because cleaning up a live rebuild wastes it, and because heartbeats are
/// stamped with the owner's clock and compared with the reader's: clock
/// skew between hosts must stay well below it.
const ORPHANED_AFTER_MS: i64 = 120_000;

/// This process, as the owner of the rebuilds it runs: host name, process
/// id and a random part (a restarted process may get the same pid).
fn host_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "host".into());
        format!(
            "{host}/{}/{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )
    })
}

/// The running rebuild's hold on its stored record. Every write is a
/// compare-and-set on the heartbeat it wrote last: if a cleanup claimed the
/// record meanwhile (the owner looked dead), the owner learns it from the
/// failed write and stops before it could cut over to a generation being
/// dropped.
struct Lease {
    manager: PluginManager,
    id: String,
    last: tokio::sync::Mutex<i64>,
    lost: AtomicBool,
}

impl Lease {
    /// Store the current status; `false` once the record was claimed.
    async fn beat(&self) -> anyhow::Result<bool> {
        let mut last = self.last.lock().await;
        if self.is_lost() {
            return Ok(false);
        }
        let status = self.manager.rebuild_table().get(&self.id).cloned();
        let Some(status) = status else {
            return Ok(true);
        };
        let beat = unix_ms().max(*last + 1);
        let written = self
            .manager
            .host
            .plugin_store
            .put_rebuild(&status.record(beat), Some(*last))
            .await?;
        if written {
            *last = beat;
        } else {
            self.lost.store(true, Ordering::SeqCst);
        }
        Ok(written)
    }

    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// An error once the record was claimed.
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.is_lost(),
            "the rebuild's record was claimed as orphaned by another host"
        );
        Ok(())
    }
}

/// Projections built by a generation that is not live yet are kept apart
/// under `name@ns` and merged into `name` when the generation is promoted.
fn suffix_projection(w: &ProjectionWrite, ns: &str) -> ProjectionWrite {
    match w {
        ProjectionWrite::Upsert {
            projection,
            key,
            body,
        } => ProjectionWrite::Upsert {
            projection: format!("{projection}@{ns}"),
            key: key.clone(),
            body: body.clone(),
        },
        ProjectionWrite::Delete { projection, key } => ProjectionWrite::Delete {
            projection: format!("{projection}@{ns}"),
            key: key.clone(),
        },
    }
}

impl PluginManager {
    pub(super) async fn start_rebuild(&self, plugin: Arc<Plugin>) -> Result<String, InstallError> {
        let t = plugin.info.entity_type.clone();
        {
            let r = self.rebuild_table();
            if r.values().any(|s| {
                s.entity_type == t
                    && matches!(s.state, RebuildState::Running | RebuildState::CatchingUp)
            }) {
                return Err(InstallError::Conflict(format!(
                    "a rebuild of {t} is already running"
                )));
            }
        }
        // Ids outlive the process (the record is stored): the start time keeps
        // them unique across restarts, the counter within one millisecond.
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = format!(
            "rb-{}-{}-{}",
            t,
            unix_ms(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status = RebuildStatus {
            id: id.clone(),
            entity_type: t.clone(),
            digest: plugin.digest.clone(),
            state: RebuildState::Running,
            entities_done: 0,
            entities_total: 0,
            events_done: 0,
            events_total: 0,
            rate: 0.0,
            eta_seconds: None,
            quarantined: 0,
            error: None,
            elapsed_seconds: 0.0,
            generation: Generation::base(),
            owner: host_id().to_string(),
            started_at: now_rfc3339(),
            finished_at: None,
        };
        let first_beat = unix_ms();
        // Stored before anything is built: a rebuild the store does not know of
        // could leave a generation nobody finds again.
        let created = self
            .host
            .plugin_store
            .put_rebuild(&status.record(first_beat), None)
            .await
            .context("recording the rebuild")?;
        if !created {
            return Err(InstallError::Conflict(format!(
                "a rebuild with id {id} is already recorded; try again"
            )));
        }
        self.rebuilds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), status);
        let lease = Arc::new(Lease {
            manager: self.clone(),
            id: id.clone(),
            last: tokio::sync::Mutex::new(first_beat),
            lost: AtomicBool::new(false),
        });
        let manager = self.clone();
        let id2 = id.clone();
        tokio::spawn(async move {
            let beating = lease.clone();
            let beats = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(HEARTBEAT).await;
                    match beating.beat().await {
                        Ok(true) => {}
                        Ok(false) => break,
                        // The store may come back; a record that stops moving
                        // for long is only cleaned up after ORPHANED_AFTER_MS.
                        Err(e) => {
                            tracing::warn!(rebuild = %beating.id, error = %format!("{e:#}"), "could not record rebuild progress")
                        }
                    }
                }
            });
            let result = manager.run_rebuild(&plugin, &id2, &lease).await;
            beats.abort();
            if lease.is_lost() {
                // Another host took the record over as orphaned and drops the
                // generation itself; nothing of ours may be written any more.
                tracing::error!(rebuild = %id2, "rebuild abandoned: its record was claimed as orphaned by another host; the old generation keeps serving");
                manager.update_status(&id2, |s| {
                    s.state = RebuildState::Abandoned;
                    s.error = Some("its record was claimed as orphaned (no heartbeat for too long) by another host, which drops its generation".into());
                    s.finished_at = Some(now_rfc3339());
                });
                manager
                    .host
                    .metrics
                    .rebuilt(&plugin.info.entity_type, RebuildState::Abandoned.as_str());
                return;
            }
            if result.is_err() {
                // A failed build is never activated: its states are garbage.
                let ns = manager
                    .rebuild_table()
                    .get(&id2)
                    .map(|s| s.generation.clone())
                    .unwrap_or_default();
                if !ns.is_base()
                    && let Err(e) = manager.host.storage.drop_namespace(ns.as_str()).await
                {
                    tracing::warn!(generation = %ns, error = %format!("{e:#}"), "could not drop a failed generation");
                }
            }
            manager.update_status(&id2, |s| {
                s.finished_at = Some(now_rfc3339());
                match result {
                    Ok(()) => {
                        s.state = RebuildState::Done;
                        s.eta_seconds = Some(0.0);
                        manager.host.metrics.rebuilt(&s.entity_type, RebuildState::Done.as_str());
                    }
                    Err(e) => {
                        tracing::error!(rebuild = %id2, error = %format!("{e:#}"), "rebuild failed; the old generation keeps serving");
                        s.state = RebuildState::Failed;
                        s.error = Some(format!("{e:#}"));
                        manager.host.metrics.rebuilt(&s.entity_type, RebuildState::Failed.as_str());
                    }
                }
            });
            // The outcome outlives the process. If this write is lost, the
            // record stays `running` and a later cleanup finds the generation
            // either active (recorded as done) or not (dropped, abandoned).
            if let Err(e) = lease.beat().await {
                tracing::warn!(rebuild = %id2, error = %format!("{e:#}"), "could not record the rebuild's outcome");
            }
        });
        Ok(id)
    }

    /// Clean up rebuilds whose process is gone; returns how many.
    ///
    /// A rebuild is orphaned when its state says it is still going (`running`,
    /// `catching_up`, or `abandoning`: claimed by a cleanup that did not
    /// finish) and its owner is not alive: with SQLite, the host is the only
    /// one on its database, so at start any such rebuild of another process is
    /// orphaned; with Cassandra, its heartbeat must be older than
    /// [`ORPHANED_AFTER_MS`].
    ///
    /// Cleaned up rather than resumed: resuming would need the refold's
    /// bookkeeping (which chunks committed, how far each entity was caught up)
    /// and a new owner taking over a half-written generation, all to save a
    /// refold that the operator can start again with one call. Cleanup is
    /// claim the record (compare-and-set on its heartbeat, so two hosts, or a
    /// host and an owner that was only slow, cannot both act), drop the
    /// generation's namespace, mark it `abandoned` with the reason.
    ///
    /// A rebuild whose generation an activation names was cut over before its
    /// process stopped: it is recorded as `done` and nothing is dropped.
    pub async fn recover_rebuilds(&self) -> anyhow::Result<usize> {
        let sole = matches!(
            self.host.config.store.kind,
            crate::config::StoreKind::Sqlite
        );
        let records = self.host.plugin_store.rebuilds().await?;
        let mut cleaned = 0;
        let mut actives: Option<Vec<Activation>> = None;
        for r in records {
            if !matches!(
                r.state,
                RebuildState::Running | RebuildState::CatchingUp | RebuildState::Abandoning
            ) || r.owner == host_id()
            {
                continue;
            }
            let now = unix_ms();
            let silent_ms = now.saturating_sub(r.heartbeat_ms);
            if !sole && silent_ms <= ORPHANED_AFTER_MS {
                continue;
            }
            if actives.is_none() {
                actives = Some(self.host.plugin_store.activations().await?);
            }
            let cut_over = !r.generation.is_base()
                && actives.iter().flatten().any(|a| {
                    a.generation == r.generation
                        || a.previous_generation.as_ref() == Some(&r.generation)
                });
            let why = if sole {
                format!(
                    "its host process ({}) stopped while it was {}",
                    r.owner, r.state
                )
            } else {
                format!(
                    "its host ({}) was not heard of for {} s while it was {}",
                    r.owner,
                    silent_ms / 1000,
                    r.state
                )
            };
            if cut_over {
                let mut done = r.clone();
                done.state = RebuildState::Done;
                done.entities_done = done.entities_total;
                done.events_done = done.events_done.max(done.events_total);
                done.finished_at = Some(now_rfc3339());
                done.error = Some(format!("{why}, after its cut-over"));
                done.heartbeat_ms = now.max(r.heartbeat_ms + 1);
                self.host
                    .plugin_store
                    .put_rebuild(&done, Some(r.heartbeat_ms))
                    .await?;
                continue;
            }
            let mut claim = r.clone();
            claim.state = RebuildState::Abandoning;
            claim.error = Some(format!(
                "abandoned: {why}, with {} of {} entities refolded; its generation {} is dropped. Start the rebuild again to redo it",
                r.entities_done,
                r.entities_total,
                if r.generation.is_base() {
                    "(none yet)"
                } else {
                    r.generation.as_str()
                }
            ));
            claim.heartbeat_ms = now.max(r.heartbeat_ms + 1);
            if !self
                .host
                .plugin_store
                .put_rebuild(&claim, Some(r.heartbeat_ms))
                .await?
            {
                // Its owner, or another host's cleanup, wrote it meanwhile.
                continue;
            }
            if !r.generation.is_base() {
                // Left `abandoning` on failure: the next sweep retries it.
                self.host
                    .storage
                    .drop_namespace(r.generation.as_str())
                    .await
                    .with_context(|| {
                        format!("dropping generation {} of rebuild {}", r.generation, r.id)
                    })?;
            }
            let mut done = claim.clone();
            done.state = RebuildState::Abandoned;
            done.finished_at = Some(now_rfc3339());
            done.heartbeat_ms = unix_ms().max(claim.heartbeat_ms + 1);
            self.host
                .plugin_store
                .put_rebuild(&done, Some(claim.heartbeat_ms))
                .await?;
            self.host
                .metrics
                .rebuilt(&r.entity_type, RebuildState::Abandoned.as_str());
            tracing::warn!(rebuild = %r.id, generation = %r.generation, reason = %why, "orphaned rebuild cleaned up: its generation was dropped");
            cleaned += 1;
        }
        Ok(cleaned)
    }

    /// A rebuild's status: live from this process, else as stored (which is
    /// how a rebuild's outcome is still known after a restart, or on another
    /// host).
    pub async fn rebuild_status(&self, id: &str) -> anyhow::Result<Option<RebuildStatus>> {
        let live = self.rebuild_table().get(id).cloned();
        if live.is_some() {
            return Ok(live);
        }
        Ok(self
            .host
            .plugin_store
            .rebuilds()
            .await?
            .iter()
            .find(|r| r.id == id)
            .map(RebuildStatus::from_record))
    }

    /// Every rebuild the store knows of, live ones from this process, by id.
    pub async fn rebuild_list(&self) -> anyhow::Result<Vec<RebuildStatus>> {
        let mut all: HashMap<String, RebuildStatus> = self
            .host
            .plugin_store
            .rebuilds()
            .await?
            .iter()
            .map(|r| (r.id.clone(), RebuildStatus::from_record(r)))
            .collect();
        for (id, s) in self.rebuild_table().iter() {
            all.insert(id.clone(), s.clone());
        }
        let mut all: Vec<RebuildStatus> = all.into_values().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    fn update_status(&self, id: &str, f: impl FnOnce(&mut RebuildStatus)) {
        if let Some(s) = self.rebuild_table().get_mut(id) {
            f(s);
        }
    }

    async fn run_rebuild(
        &self,
        plugin: &Arc<Plugin>,
        id: &str,
        lease: &Lease,
    ) -> anyhow::Result<()> {
        let t = plugin.info.entity_type.clone();
        let shadow = generation::new_id(&t, &plugin.digest);
        let started = Instant::now();
        self.update_status(id, |s| s.generation = shadow.clone());
        // Recorded before a state is written under it: a generation the store
        // does not name could not be found again by a cleanup.
        anyhow::ensure!(
            lease.beat().await.context("recording the generation")?,
            "the rebuild's record was claimed as orphaned by another host"
        );
        let live = entities_of(&*self.host.storage, &t, usize::MAX).await?;
        let ids: Vec<String> = live.keys.iter().map(|k| k.entity_id.clone()).collect();
        let heads = live.records;
        let events_total: u64 = heads.values().map(|r| r.head).sum();
        self.update_status(id, |s| {
            s.entities_total = ids.len() as u64;
            s.events_total = events_total;
        });
        let done_events = Arc::new(AtomicU64::new(0));
        let done_entities = Arc::new(AtomicU64::new(0));
        let quarantined = Arc::new(AtomicU64::new(0));
        let workers = self.host.config.engine.rebuild_workers.max(1);
        // Entities are refolded in chunks, `workers` chunks at a time; each
        // chunk gets one sandbox on a blocking thread.
        let chunks: Vec<Vec<String>> = ids.chunks(64).map(|c| c.to_vec()).collect();
        let mut stream = futures::stream::iter(chunks.into_iter().map(|chunk| {
            let (manager, plugin, shadow) = (self.clone(), plugin.clone(), shadow.clone());
            let (de, dn, q) = (
                done_events.clone(),
                done_entities.clone(),
                quarantined.clone(),
            );
            async move {
                // A new generation holds nothing yet: no state to read first.
                let n = manager
                    .refold_into(&plugin, &shadow, &chunk, &HashMap::new())
                    .await?;
                de.fetch_add(n.0, Ordering::Relaxed);
                dn.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                q.fetch_add(n.1, Ordering::Relaxed);
                anyhow::Ok(())
            }
        }))
        .buffer_unordered(workers);
        while let Some(r) = stream.next().await {
            r?;
            lease.check()?;
            let (ev, en) = (
                done_events.load(Ordering::Relaxed),
                done_entities.load(Ordering::Relaxed),
            );
            let secs = started.elapsed().as_secs_f64().max(1e-6);
            let rate = ev as f64 / secs;
            self.update_status(id, |s| {
                s.events_done = ev;
                s.entities_done = en;
                s.rate = rate;
                s.quarantined = quarantined.load(Ordering::Relaxed);
                s.elapsed_seconds = secs;
                s.eta_seconds =
                    (rate > 0.0).then(|| (events_total.saturating_sub(ev)) as f64 / rate);
            });
        }
        // Catch up with what arrived meanwhile, without holding the live loop.
        // Every entity was folded up to at least its head at the start.
        self.update_status(id, |s| s.state = RebuildState::CatchingUp);
        let mut folded_to: HashMap<String, u64> = heads
            .into_iter()
            .map(|(k, r)| (k.entity_id, r.head))
            .collect();
        for _ in 0..5 {
            lease.check()?;
            if self.catch_up(plugin, &t, &shadow, &mut folded_to).await? < 50 {
                break;
            }
        }
        // Cut over between two batches: the last few events, the read model,
        // then the one row that makes the new generation the active one.
        let _gate = self.gate.write().await;
        self.catch_up(plugin, &t, &shadow, &mut folded_to).await?;
        // A fresh heartbeat just before the cut-over: no cleanup can claim the
        // record (and drop the generation) for ORPHANED_AFTER_MS after it.
        anyhow::ensure!(
            lease
                .beat()
                .await
                .context("renewing the rebuild's record")?,
            "the rebuild's record was claimed as orphaned by another host"
        );
        let cur = self.current_activation(&t).await?;
        let left = Side {
            generation: cur
                .as_ref()
                .map(|c| c.generation.clone())
                .unwrap_or_else(|| self.host.registry.generation(&t)),
            plugin: self.host.registry.get(&t),
        };
        self.host
            .storage
            .adopt_projections(
                shadow.as_str(),
                &generation::namespace(&t, &left.generation),
            )
            .await?;
        let a = self
            .record_activation(&t, &plugin.digest, cur, ActivationMode::Rebuild, &shadow)
            .await?;
        self.host.registry.activate_in(plugin.clone(), &shadow);
        self.host
            .metrics
            .swapped(&t, ActivationMode::Rebuild.as_str());
        let reached = Side {
            generation: shadow.clone(),
            plugin: Some(plugin.clone()),
        };
        self.record_corrections(&t, &left, &reached, a.seq.max(0) as u64)
            .await?;
        self.update_status(id, |s| {
            s.elapsed_seconds = started.elapsed().as_secs_f64();
            s.events_done = s.events_done.max(s.events_total);
            s.entities_done = s.entities_total;
        });
        Ok(())
    }

    /// Bring generation `ns` of `entity_type` up to the live heads. `folded_to`
    /// holds, per entity, the live head it was last folded up to; only entities
    /// whose head moved past it (or that are new) are read from `ns` and folded
    /// on, so a pass costs one read of each live head. Returns how many
    /// entities were behind.
    async fn catch_up(
        &self,
        plugin: &Arc<Plugin>,
        entity_type: &str,
        generation: &Generation,
        folded_to: &mut HashMap<String, u64>,
    ) -> anyhow::Result<usize> {
        let live = entities_of(&*self.host.storage, entity_type, usize::MAX).await?;
        let behind: Vec<(String, u64)> = live
            .records
            .into_values()
            .filter(|r| r.head > folded_to.get(&r.key.entity_id).copied().unwrap_or(0))
            .map(|r| (r.key.entity_id, r.head))
            .collect();
        for chunk in behind.chunks(64) {
            let ids: Vec<String> = chunk.iter().map(|(i, _)| i.clone()).collect();
            let keys: Vec<EntityKey> = ids
                .iter()
                .map(|i| EntityKey::new(generation.as_str(), i.clone()))
                .collect();
            let there = self.host.storage.load(&keys).await?;
            let todo: Vec<String> = ids
                .into_iter()
                .filter(|i| {
                    there
                        .get(&EntityKey::new(generation.as_str(), i.clone()))
                        .is_none_or(|s| !s.quarantined)
                })
                .collect();
            self.refold_into(plugin, generation, &todo, &there).await?;
            folded_to.extend(chunk.iter().cloned());
        }
        Ok(behind.len())
    }

    /// Fold `ids` into `generation` from where each stands there: `there`
    /// holds the generation's records of them (keyed in its namespace; none
    /// for an entity it holds nothing of). Returns (events applied, entities
    /// quarantined).
    async fn refold_into(
        &self,
        plugin: &Arc<Plugin>,
        generation: &Generation,
        ids: &[String],
        there: &HashMap<EntityKey, EntityRecord>,
    ) -> anyhow::Result<(u64, u64)> {
        let t = plugin.info.entity_type.clone();
        // Histories are read concurrently: on Cassandra each is a round trip.
        let mut reads = Vec::with_capacity(ids.len());
        for id in ids {
            let key = EntityKey::new(generation.as_str(), id.clone());
            let rec = there
                .get(&key)
                .cloned()
                .unwrap_or_else(|| EntityRecord::new(key.clone()));
            let live = EntityKey::new(t.clone(), id.clone());
            let storage = self.host.storage.clone();
            reads.push(async move {
                let events = storage.history(&live, rec.position, None).await?;
                anyhow::Ok((rec, events))
            });
        }
        let mut work = Vec::new();
        let mut read = futures::stream::iter(reads).buffered(HISTORY_READS);
        while let Some(r) = read.next().await {
            let (rec, events) = r?;
            if !events.is_empty() {
                work.push((rec, events));
            }
        }
        drop(read);
        let p = plugin.clone();
        let generation = generation.clone();
        let (commit, applied, quarantined) = tokio::task::spawn_blocking(move || {
            let mut sandbox = Sandbox::new(p);
            // Nothing else writes a generation that is being built.
            let mut commit = Commit {
                exclusive: true,
                ..Default::default()
            };
            let (mut applied, mut quarantined) = (0u64, 0u64);
            for (rec, events) in work {
                let d = entity::refold(&mut sandbox, &generation, rec, events);
                if let Some(q) = d.quarantine() {
                    commit.quarantines.push(q);
                    quarantined += 1;
                }
                if let Some(o) = &d.outcome {
                    applied += o.applied as u64;
                    commit.projections.extend(
                        o.projections
                            .iter()
                            .map(|w| suffix_projection(w, generation.as_str())),
                    );
                }
                commit.entities.push(d.update);
            }
            (commit, applied, quarantined)
        })
        .await?;
        self.host.storage.commit(commit).await?;
        Ok((applied, quarantined))
    }
}

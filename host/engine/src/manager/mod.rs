//! Plugin versions over time: install (validate → store), activate
//! (forward or rebuild), roll back, retry a quarantined entity, re-submit a
//! dead letter, and keep the local registry in line with the stored one.
//!
//! Everything that changes which version applies, or that writes states
//! outside the consume loop, takes the app's batch gate: it lands between
//! two batches, never inside one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use serde::Serialize;
use serde_json::Value;

use refold_runtime::fold;
use refold_runtime::{LoadError, Plugin, Sandbox};
use refold_source::SourceRecord;
use refold_store::{
    Activation, ActivationMode, Commit, EntityRecord, EntityUpdate, Origin, PluginVersion,
    ProjectionWrite, RebuildRecord, RebuildState, StoreError,
};
use refold_types::Generation;
use refold_types::clock::now_rfc3339;
use refold_types::event::EntityKey;

use crate::generation;
use crate::host::Host;
use crate::pipeline::{Pipeline, Work, fold_one};
use crate::registry::plugin_ref;

pub mod watch;

/// Plugin versions over time, for one host: owns the compiled versions by
/// digest, the rebuilds by id, and the batch gate that the consume loop
/// holds for each batch and every change of state outside it takes.
#[derive(Clone)]
pub struct PluginManager {
    /// The host whose plugins these are.
    pub host: Host,
    /// Compiled plugin versions by digest.
    compiled: Arc<Mutex<HashMap<String, Arc<Plugin>>>>,
    /// Rebuilds by id.
    rebuilds: Arc<Mutex<HashMap<String, RebuildStatus>>>,
    /// Held by the consume loop for each batch, and by anything that must
    /// land between two batches (swaps, retries, re-submissions).
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl PluginManager {
    /// The manager of `host`'s plugins, with nothing compiled yet.
    pub fn new(host: Host) -> Self {
        PluginManager {
            host,
            compiled: Arc::new(Mutex::new(HashMap::new())),
            rebuilds: Arc::new(Mutex::new(HashMap::new())),
            gate: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The batch gate (see the type's doc).
    pub fn gate(&self) -> &tokio::sync::Mutex<()> {
        &self.gate
    }
}

/// How a new version takes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SwapMode {
    /// From the next batch on; states already computed stay.
    Forward,
    /// Refold every entity from its raw events into a new generation in the
    /// background, then cut over in one step.
    Rebuild,
}

impl SwapMode {
    fn as_str(self) -> &'static str {
        self.activation_mode().as_str()
    }

    /// How the activation it makes is recorded.
    pub fn activation_mode(self) -> ActivationMode {
        match self {
            SwapMode::Forward => ActivationMode::Forward,
            SwapMode::Rebuild => ActivationMode::Rebuild,
        }
    }
}

/// Why an upload or an activation was refused.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Not a component of our world, or `describe()` failed.
    #[error(transparent)]
    Invalid(#[from] LoadError),
    /// `describe()` names another entity type than the one uploaded to.
    #[error("the component describes entity type `{got}`, not `{expected}`")]
    WrongEntityType {
        /// Entity type of the request.
        expected: String,
        /// Entity type the component describes.
        got: String,
    },
    /// It failed to fold a sample of stored events within its limits.
    #[error("sample fold failed: {0}")]
    SampleFold(String),
    /// No such version, or nothing to roll back to.
    #[error("{0}")]
    NotFound(String),
    /// A rebuild of this entity type is already running.
    #[error("{0}")]
    Conflict(String),
    /// The store failed (an outage is `StoreError::Unavailable`).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Internal failure.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Outcome of an install.
#[derive(Debug, Clone, Serialize)]
pub struct Installed {
    /// The stored version.
    pub version: PluginVersion,
    /// What the sample fold did.
    pub sample: SampleReport,
    /// Whether it is now active (forward) or being rebuilt.
    pub activation: Option<String>,
    /// The rebuild started, if any.
    pub rebuild: Option<String>,
}

/// What the validation fold did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SampleReport {
    /// Entities folded.
    pub entities: usize,
    /// Events folded.
    pub events: usize,
}

/// Progress of a rebuild.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildStatus {
    /// Rebuild id.
    pub id: String,
    /// Entity type.
    pub entity_type: String,
    /// Digest being built.
    pub digest: String,
    /// Where it is.
    pub state: RebuildState,
    /// Entities refolded.
    pub entities_done: u64,
    /// Entities to refold.
    pub entities_total: u64,
    /// Events refolded.
    pub events_done: u64,
    /// Events to refold (at start).
    pub events_total: u64,
    /// Events per second so far.
    pub rate: f64,
    /// Estimated seconds left.
    pub eta_seconds: Option<f64>,
    /// Entities the new version quarantined.
    pub quarantined: u64,
    /// Error, when failed.
    pub error: Option<String>,
    /// Seconds since start.
    pub elapsed_seconds: f64,
    /// Id of the generation being built.
    pub generation: Generation,
    /// The host process running it.
    pub owner: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it ended (RFC 3339).
    pub finished_at: Option<String>,
}

impl RebuildStatus {
    /// The record the store keeps of it.
    fn record(&self, heartbeat_ms: i64) -> RebuildRecord {
        RebuildRecord {
            id: self.id.clone(),
            entity_type: self.entity_type.clone(),
            digest: self.digest.clone(),
            generation: self.generation.clone(),
            state: self.state,
            entities_done: self.entities_done,
            entities_total: self.entities_total,
            events_done: self.events_done,
            events_total: self.events_total,
            quarantined: self.quarantined,
            error: self.error.clone(),
            owner: self.owner.clone(),
            started_at: self.started_at.clone(),
            finished_at: self.finished_at.clone(),
            heartbeat_ms,
        }
    }

    /// The status of a rebuild this process does not run: as stored. Rate,
    /// ETA and elapsed time are only known to the process running it.
    fn from_record(r: &RebuildRecord) -> RebuildStatus {
        RebuildStatus {
            id: r.id.clone(),
            entity_type: r.entity_type.clone(),
            digest: r.digest.clone(),
            state: r.state,
            entities_done: r.entities_done,
            entities_total: r.entities_total,
            events_done: r.events_done,
            events_total: r.events_total,
            rate: 0.0,
            eta_seconds: None,
            quarantined: r.quarantined,
            error: r.error.clone(),
            elapsed_seconds: 0.0,
            generation: r.generation.clone(),
            owner: r.owner.clone(),
            started_at: r.started_at.clone(),
            finished_at: r.finished_at.clone(),
        }
    }
}

/// The stored identity of a compiled plugin, uploaded now.
fn version_of(p: &Plugin) -> PluginVersion {
    PluginVersion {
        entity_type: p.info.entity_type.clone(),
        name: p.info.name.clone(),
        version: p.info.version.clone(),
        digest: p.digest.clone(),
        size: p.size as u64,
        uploaded_at: now_rfc3339(),
    }
}

/// Rolled-back digests remembered per entity type.
const ROLLED_BACK_KEPT: usize = 32;

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

/// How often `sync_registry` looks for orphaned rebuilds.
const ORPHAN_SWEEP_MS: i64 = 30_000;

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

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
    app: PluginManager,
    id: String,
    last: tokio::sync::Mutex<i64>,
    lost: std::sync::atomic::AtomicBool,
}

impl Lease {
    /// Store the current status; `false` once the record was claimed.
    async fn beat(&self) -> anyhow::Result<bool> {
        let mut last = self.last.lock().await;
        if self.is_lost() {
            return Ok(false);
        }
        let status = self
            .app
            .rebuilds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&self.id)
            .cloned();
        let Some(status) = status else {
            return Ok(true);
        };
        let beat = now_ms().max(*last + 1);
        let written = self
            .app
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

/// Whether a watched file named `file` may hold a plugin of `entity_type`.
/// `@` cannot appear in an entity type (`describe()` is held to
/// `[A-Za-z0-9._-]`), so it separates the type from anything else:
/// * `<type>.wasm` and `<type>@<anything>.wasm` name exactly `<type>`;
/// * without an `@`, the older `<type>-<suffix>.wasm` naming is kept: the
///   type is the whole stem or a part of it ending before a `-`. As types
///   may contain `-` themselves, which part is told by what the component
///   describes (`bank-account-v2.wasm` admits `bank-account-v2`,
///   `bank-account` and `bank`).
pub fn file_admits(file: &str, entity_type: &str) -> bool {
    let Some(stem) = file.strip_suffix(".wasm") else {
        return false;
    };
    if entity_type.is_empty() {
        return false;
    }
    match stem.split_once('@') {
        Some((named, _)) => named == entity_type,
        None => {
            stem == entity_type
                || stem
                    .strip_prefix(entity_type)
                    .is_some_and(|rest| rest.starts_with('-'))
        }
    }
}

/// Read a component file, refusing one over `max` bytes without reading
/// more than that (it may still be growing while it is copied in).
async fn read_capped(path: &std::path::Path, max: u64) -> anyhow::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let too_big = |n: u64| {
        anyhow::anyhow!(
            "{} is {n} bytes or more, over plugins.max_upload_bytes ({max} bytes)",
            path.display()
        )
    };
    let f = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    if len > max {
        return Err(too_big(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .await
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > max {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// The registry poll interval.
pub const REGISTRY_POLL: Duration = Duration::from_millis(1000);

impl PluginManager {
    /// Compile and validate bytes; `expected` is the entity type the caller
    /// meant (the upload URL or the watched file name).
    pub async fn validate(
        &self,
        bytes: Vec<u8>,
        expected: Option<&str>,
    ) -> Result<(Arc<Plugin>, SampleReport), InstallError> {
        let app = self;
        app.validate_as(bytes, |got| match expected {
            Some(expected) if expected != got => Err(InstallError::WrongEntityType {
                expected: expected.to_string(),
                got: got.to_string(),
            }),
            _ => Ok(()),
        })
        .await
    }

    /// Compile, let `admit` judge the entity type `describe()` names (before
    /// the sample fold, which is the expensive part), then fold the sample.
    async fn validate_as(
        &self,
        bytes: Vec<u8>,
        admit: impl FnOnce(&str) -> Result<(), InstallError>,
    ) -> Result<(Arc<Plugin>, SampleReport), InstallError> {
        let app = self;
        let app2 = app.clone();
        let plugin = tokio::task::spawn_blocking(move || app2.host.load_plugin_bytes(&bytes))
            .await
            .map_err(|e| anyhow::anyhow!("compile task: {e}"))?
            .map_err(|e| match e.downcast::<LoadError>() {
                Ok(l) => InstallError::Invalid(l),
                Err(e) => InstallError::Internal(e),
            })?;
        admit(&plugin.info.entity_type)?;
        let sample = app.sample_fold(&plugin).await?;
        Ok((plugin, sample))
    }

    /// Fold up to 16 entities' first 256 events with the candidate. A trap or
    /// an output over the limits refuses it; so does a plugin error on an event
    /// the active version applied.
    async fn sample_fold(&self, plugin: &Arc<Plugin>) -> Result<SampleReport, InstallError> {
        let app = self;
        let t = plugin.info.entity_type.clone();
        let ids = app.host.storage.entity_ids(&t).await?;
        let keys: Vec<EntityKey> = ids
            .into_iter()
            .take(16)
            .map(|id| EntityKey::new(t.clone(), id))
            .collect();
        let records = app.host.storage.load(&keys).await?;
        let mut cases = Vec::new();
        for k in keys {
            let applied = records.get(&k).map(|r| r.position).unwrap_or(0);
            let events = app.host.storage.history(&k, 0, Some(256)).await?;
            cases.push((k, applied, events));
        }
        let p = plugin.clone();
        tokio::task::spawn_blocking(move || {
            let mut report = SampleReport::default();
            let mut sandbox = Sandbox::new(p);
            for (k, applied, events) in cases {
                let init = fold::init_state(&mut sandbox, &k.entity_id).map_err(|e| {
                    InstallError::SampleFold(format!("init({}) failed: {e}", k.entity_id))
                })?;
                let o = fold::fold_and_project(&mut sandbox, &k.entity_id, init, &events, true);
                report.entities += 1;
                report.events += o.applied;
                if let Some((i, e)) = o.failure {
                    let is_plugin_error = matches!(e, refold_runtime::CallError::Plugin(_));
                    if !is_plugin_error || events[i].position <= applied {
                        return Err(InstallError::SampleFold(format!(
                            "{k} event {} (position {}): {e}",
                            events[i].id, events[i].position
                        )));
                    }
                }
                sandbox.recycle();
            }
            Ok(report)
        })
        .await
        .map_err(|e| anyhow::anyhow!("sample fold task: {e}"))?
    }

    /// Validate, store, and optionally activate.
    pub async fn install(
        &self,
        bytes: Vec<u8>,
        expected: Option<&str>,
        mode: Option<SwapMode>,
    ) -> Result<Installed, InstallError> {
        let app = self;
        let raw = bytes.clone();
        let (plugin, sample) = app.validate(bytes, expected).await?;
        app.keep(&raw, plugin, sample, mode).await
    }

    /// Store a validated version, and activate it when `mode` says so.
    async fn keep(
        &self,
        raw: &[u8],
        plugin: Arc<Plugin>,
        sample: SampleReport,
        mode: Option<SwapMode>,
    ) -> Result<Installed, InstallError> {
        let app = self;
        let version = version_of(&plugin);
        app.host.plugin_store.put_plugin(&version, raw).await?;
        app.compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(plugin.digest.clone(), plugin.clone());
        let (activation, rebuild) = match mode {
            None => (None, None),
            Some(m) => {
                let r = app
                    .activate(&version.entity_type, &version.digest, m)
                    .await?;
                (Some(m.as_str().to_string()), r)
            }
        };
        Ok(Installed {
            version,
            sample,
            activation,
            rebuild,
        })
    }

    /// A compiled plugin by digest, from the cache or the plugin store.
    pub async fn compiled(&self, digest: &str) -> Result<Arc<Plugin>, InstallError> {
        let app = self;
        if let Some(p) = app
            .compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
        {
            return Ok(p.clone());
        }
        let bytes = app
            .host
            .plugin_store
            .plugin_bytes(digest)
            .await?
            .ok_or_else(|| {
                InstallError::NotFound(format!("no plugin version with digest {digest}"))
            })?;
        let app2 = app.clone();
        let p = tokio::task::spawn_blocking(move || app2.host.load_plugin_bytes(&bytes))
            .await
            .map_err(|e| anyhow::anyhow!("compile task: {e}"))??;
        app.compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest.to_string(), p.clone());
        Ok(p)
    }

    async fn current_activation(&self, entity_type: &str) -> anyhow::Result<Option<Activation>> {
        let app = self;
        Ok(app.host.plugin_store.activation(entity_type).await?)
    }

    /// Make `digest` the active version of `entity_type`. Forward: at the next
    /// batch boundary. Rebuild: starts a background rebuild and returns its id.
    pub async fn activate(
        &self,
        entity_type: &str,
        digest: &str,
        mode: SwapMode,
    ) -> Result<Option<String>, InstallError> {
        let app = self;
        let plugin = app.compiled(digest).await?;
        if plugin.info.entity_type != entity_type {
            return Err(InstallError::WrongEntityType {
                expected: entity_type.to_string(),
                got: plugin.info.entity_type.clone(),
            });
        }
        match mode {
            SwapMode::Forward => {
                let _gate = app.gate.lock().await;
                let cur = app.current_activation(entity_type).await?;
                if cur.as_ref().is_some_and(|c| c.digest == digest)
                    && app
                        .host
                        .registry
                        .get(entity_type)
                        .is_some_and(|p| p.digest == digest)
                {
                    return Ok(None);
                }
                // A forward swap keeps the generation: the new version continues
                // from the states the previous one computed.
                let generation = cur
                    .as_ref()
                    .map(|c| c.generation.clone())
                    .unwrap_or_else(|| app.host.registry.generation(entity_type));
                app.record_activation(
                    entity_type,
                    digest,
                    cur,
                    ActivationMode::Forward,
                    &generation,
                )
                .await?;
                app.host.registry.activate_in(plugin, &generation);
                app.host.metrics.swapped(entity_type, "forward");
                Ok(None)
            }
            SwapMode::Rebuild => app.start_rebuild(plugin).await.map(Some),
        }
    }

    async fn record_activation(
        &self,
        entity_type: &str,
        digest: &str,
        cur: Option<Activation>,
        mode: ActivationMode,
        generation: &Generation,
    ) -> Result<(), InstallError> {
        let app = self;
        // A digest chosen again is no longer "rolled back"; the one a rollback
        // leaves is, until an activation chooses it again.
        let mut rolled_back = cur
            .as_ref()
            .map(|c| c.rolled_back.clone())
            .unwrap_or_default();
        rolled_back.retain(|d| d != digest);
        if mode == ActivationMode::Rollback
            && let Some(c) = cur.as_ref().filter(|c| c.digest != digest)
        {
            rolled_back.retain(|d| d != &c.digest);
            rolled_back.push(c.digest.clone());
        }
        // The row stays small: the oldest marks go first.
        let excess = rolled_back.len().saturating_sub(ROLLED_BACK_KEPT);
        rolled_back.drain(..excess);
        let a = Activation {
            entity_type: entity_type.to_string(),
            digest: digest.to_string(),
            previous: cur
                .as_ref()
                .map(|c| c.digest.clone())
                .filter(|d| d != digest),
            mode,
            generation: generation.clone(),
            previous_generation: cur.as_ref().map(|c| c.generation.clone()),
            seq: cur.map(|c| c.seq + 1).unwrap_or(1),
            activated_at: now_rfc3339(),
            rolled_back,
        };
        app.host
            .plugin_store
            .put_activation(&a)
            .await
            .map_err(|e| match e {
                StoreError::Fenced(why) => {
                    InstallError::Conflict(format!("{why}; nothing changed, try again"))
                }
                e => InstallError::Store(e),
            })
    }

    /// Return to the previously active version, and to its generation: after a
    /// rebuild that is one row write, like the cut-over. States move back lazily
    /// (each record saved when the rebuild's generation took it over is taken
    /// back, caught up from the raw events), so nothing is refolded from the
    /// start. The read-model documents the rebuild replaced are put back.
    pub async fn rollback(&self, entity_type: &str) -> Result<Activation, InstallError> {
        let app = self;
        let cur = app.current_activation(entity_type).await?.ok_or_else(|| {
            InstallError::NotFound(format!("no active version for {entity_type}"))
        })?;
        let prev = cur.previous.clone().ok_or_else(|| {
            InstallError::NotFound(format!("nothing to roll back to for {entity_type}"))
        })?;
        // Rows written before generations were recorded: a forward swap.
        let prev_generation = cur
            .previous_generation
            .clone()
            .unwrap_or_else(|| cur.generation.clone());
        let plugin = app.compiled(&prev).await?;
        let _gate = app.gate.lock().await;
        if prev_generation != cur.generation {
            app.host
                .storage
                .adopt_projections(
                    &generation::namespace(entity_type, &prev_generation),
                    &generation::namespace(entity_type, &cur.generation),
                )
                .await?;
        }
        app.record_activation(
            entity_type,
            &prev,
            Some(cur),
            ActivationMode::Rollback,
            &prev_generation,
        )
        .await?;
        app.host.registry.activate_in(plugin, &prev_generation);
        app.host.metrics.swapped(entity_type, "rollback");
        Ok(app
            .current_activation(entity_type)
            .await?
            .expect("just recorded"))
    }

    async fn start_rebuild(&self, plugin: Arc<Plugin>) -> Result<String, InstallError> {
        let app = self;
        let t = plugin.info.entity_type.clone();
        {
            let r = app.rebuilds.lock().unwrap_or_else(|e| e.into_inner());
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
            now_ms(),
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
        let first_beat = now_ms();
        // Stored before anything is built: a rebuild the store does not know of
        // could leave a generation nobody finds again.
        let created = app
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
        app.rebuilds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), status);
        let lease = Arc::new(Lease {
            app: app.clone(),
            id: id.clone(),
            last: tokio::sync::Mutex::new(first_beat),
            lost: std::sync::atomic::AtomicBool::new(false),
        });
        let app2 = app.clone();
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
            let result = app2.run_rebuild(&plugin, &id2, &lease).await;
            beats.abort();
            if lease.is_lost() {
                // Another host took the record over as orphaned and drops the
                // generation itself; nothing of ours may be written any more.
                tracing::error!(rebuild = %id2, "rebuild abandoned: its record was claimed as orphaned by another host; the old generation keeps serving");
                app2.update_status(&id2, |s| {
                    s.state = RebuildState::Abandoned;
                    s.error = Some("its record was claimed as orphaned (no heartbeat for too long) by another host, which drops its generation".into());
                    s.finished_at = Some(now_rfc3339());
                });
                app2.host
                    .metrics
                    .rebuilt(&plugin.info.entity_type, "abandoned");
                return;
            }
            if result.is_err() {
                // A failed build is never activated: its states are garbage.
                let ns = app2
                    .rebuilds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&id2)
                    .map(|s| s.generation.clone())
                    .unwrap_or_default();
                if !ns.is_base()
                    && let Err(e) = app2.host.storage.drop_namespace(ns.as_str()).await
                {
                    tracing::warn!(generation = %ns, error = %format!("{e:#}"), "could not drop a failed generation");
                }
            }
            app2.update_status(&id2, |s| {
                s.finished_at = Some(now_rfc3339());
                match result {
                    Ok(()) => {
                        s.state = RebuildState::Done;
                        s.eta_seconds = Some(0.0);
                        app2.host.metrics.rebuilt(&s.entity_type, "done");
                    }
                    Err(e) => {
                        tracing::error!(rebuild = %id2, error = %format!("{e:#}"), "rebuild failed; the old generation keeps serving");
                        s.state = RebuildState::Failed;
                        s.error = Some(format!("{e:#}"));
                        app2.host.metrics.rebuilt(&s.entity_type, "failed");
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
        let app = self;
        let sole = matches!(app.host.config.store.kind, crate::config::StoreKind::Sqlite);
        let records = app.host.plugin_store.rebuilds().await?;
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
            let now = now_ms();
            let silent_ms = now.saturating_sub(r.heartbeat_ms);
            if !sole && silent_ms <= ORPHANED_AFTER_MS {
                continue;
            }
            if actives.is_none() {
                actives = Some(app.host.plugin_store.activations().await?);
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
                app.host
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
            if !app
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
                app.host
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
            done.heartbeat_ms = now_ms().max(claim.heartbeat_ms + 1);
            app.host
                .plugin_store
                .put_rebuild(&done, Some(claim.heartbeat_ms))
                .await?;
            app.host.metrics.rebuilt(&r.entity_type, "abandoned");
            tracing::warn!(rebuild = %r.id, generation = %r.generation, reason = %why, "orphaned rebuild cleaned up: its generation was dropped");
            cleaned += 1;
        }
        Ok(cleaned)
    }

    /// A rebuild's status: live from this process, else as stored (which is
    /// how a rebuild's outcome is still known after a restart, or on another
    /// host).
    pub async fn rebuild_status(&self, id: &str) -> anyhow::Result<Option<RebuildStatus>> {
        let app = self;
        let live = app
            .rebuilds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        if live.is_some() {
            return Ok(live);
        }
        Ok(app
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
        let app = self;
        let mut all: HashMap<String, RebuildStatus> = app
            .host
            .plugin_store
            .rebuilds()
            .await?
            .iter()
            .map(|r| (r.id.clone(), RebuildStatus::from_record(r)))
            .collect();
        for (id, s) in app
            .rebuilds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            all.insert(id.clone(), s.clone());
        }
        let mut all: Vec<RebuildStatus> = all.into_values().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    fn update_status(&self, id: &str, f: impl FnOnce(&mut RebuildStatus)) {
        let app = self;
        if let Some(s) = app
            .rebuilds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(id)
        {
            f(s);
        }
    }

    async fn run_rebuild(
        &self,
        plugin: &Arc<Plugin>,
        id: &str,
        lease: &Lease,
    ) -> anyhow::Result<()> {
        let app = self;
        let t = plugin.info.entity_type.clone();
        let shadow = generation::new_id(&t, &plugin.digest);
        let started = Instant::now();
        app.update_status(id, |s| s.generation = shadow.clone());
        // Recorded before a state is written under it: a generation the store
        // does not name could not be found again by a cleanup.
        anyhow::ensure!(
            lease.beat().await.context("recording the generation")?,
            "the rebuild's record was claimed as orphaned by another host"
        );
        let ids = app.host.storage.entity_ids(&t).await?;
        let live: Vec<EntityKey> = ids
            .iter()
            .map(|i| EntityKey::new(t.clone(), i.clone()))
            .collect();
        let heads = app.host.storage.load(&live).await?;
        let events_total: u64 = heads.values().map(|r| r.head).sum();
        app.update_status(id, |s| {
            s.entities_total = ids.len() as u64;
            s.events_total = events_total;
        });
        let done_events = Arc::new(AtomicU64::new(0));
        let done_entities = Arc::new(AtomicU64::new(0));
        let quarantined = Arc::new(AtomicU64::new(0));
        let workers = app.host.config.engine.rebuild_workers.max(1);
        // Entities are refolded in chunks, `workers` chunks at a time; each
        // chunk gets one sandbox on a blocking thread.
        let chunks: Vec<Vec<String>> = ids.chunks(64).map(|c| c.to_vec()).collect();
        let mut stream = futures::stream::iter(chunks.into_iter().map(|chunk| {
            let (app, plugin, shadow) = (app.clone(), plugin.clone(), shadow.clone());
            let (de, dn, q) = (
                done_events.clone(),
                done_entities.clone(),
                quarantined.clone(),
            );
            async move {
                // A new generation holds nothing yet: no state to read first.
                let n = app
                    .refold_into(&plugin, &shadow, &chunk, Some(&HashMap::new()))
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
            app.update_status(id, |s| {
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
        app.update_status(id, |s| s.state = RebuildState::CatchingUp);
        let mut folded_to: HashMap<String, u64> = heads
            .into_iter()
            .map(|(k, r)| (k.entity_id, r.head))
            .collect();
        for _ in 0..5 {
            lease.check()?;
            if app.catch_up(plugin, &t, &shadow, &mut folded_to).await? < 50 {
                break;
            }
        }
        // Cut over between two batches: the last few events, the read model,
        // then the one row that makes the new generation the active one.
        let _gate = app.gate.lock().await;
        app.catch_up(plugin, &t, &shadow, &mut folded_to).await?;
        // A fresh heartbeat just before the cut-over: no cleanup can claim the
        // record (and drop the generation) for ORPHANED_AFTER_MS after it.
        anyhow::ensure!(
            lease
                .beat()
                .await
                .context("renewing the rebuild's record")?,
            "the rebuild's record was claimed as orphaned by another host"
        );
        let cur = app.current_activation(&t).await?;
        let old_generation = cur
            .as_ref()
            .map(|c| c.generation.clone())
            .unwrap_or_else(|| app.host.registry.generation(&t));
        app.host
            .storage
            .adopt_projections(shadow.as_str(), &generation::namespace(&t, &old_generation))
            .await?;
        app.record_activation(&t, &plugin.digest, cur, ActivationMode::Rebuild, &shadow)
            .await?;
        app.host.registry.activate_in(plugin.clone(), &shadow);
        app.host.metrics.swapped(&t, "rebuild");
        app.update_status(id, |s| {
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
        let app = self;
        let ids = app.host.storage.entity_ids(entity_type).await?;
        let live: Vec<EntityKey> = ids
            .iter()
            .map(|i| EntityKey::new(entity_type, i.clone()))
            .collect();
        let live_recs = app.host.storage.load(&live).await?;
        let behind: Vec<(String, u64)> = live_recs
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
            let there = app.host.storage.load(&keys).await?;
            let todo: Vec<String> = ids
                .into_iter()
                .filter(|i| {
                    there
                        .get(&EntityKey::new(generation.as_str(), i.clone()))
                        .is_none_or(|s| !s.quarantined)
                })
                .collect();
            app.refold_into(plugin, generation, &todo, Some(&there))
                .await?;
            folded_to.extend(chunk.iter().cloned());
        }
        Ok(behind.len())
    }

    /// Fold `ids` into namespace `ns` from where each stands there. Returns
    /// (events applied, entities quarantined).
    async fn refold_into(
        &self,
        plugin: &Arc<Plugin>,
        generation: &Generation,
        ids: &[String],
        known: Option<&HashMap<EntityKey, EntityRecord>>,
    ) -> anyhow::Result<(u64, u64)> {
        let app = self;
        let t = plugin.info.entity_type.clone();
        let keys: Vec<EntityKey> = ids
            .iter()
            .map(|i| EntityKey::new(generation.as_str(), i.clone()))
            .collect();
        let recs = match known {
            Some(k) => keys
                .iter()
                .filter_map(|key| k.get(key).map(|r| (key.clone(), r.clone())))
                .collect(),
            None => app.host.storage.load(&keys).await?,
        };
        // Histories are read concurrently: on Cassandra each is a round trip.
        let mut reads = Vec::with_capacity(ids.len());
        for id in ids {
            let key = EntityKey::new(generation.as_str(), id.clone());
            let rec = recs
                .get(&key)
                .cloned()
                .unwrap_or_else(|| EntityRecord::new(key.clone()));
            let live = EntityKey::new(t.clone(), id.clone());
            let storage = app.host.storage.clone();
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
        let ns2 = generation.as_str().to_string();
        let generation = generation.clone();
        let (commit, applied, quarantined) = tokio::task::spawn_blocking(move || {
            let mut boxes = HashMap::new();
            let mut plugins = HashMap::new();
            plugins.insert(t.clone(), p.clone());
            // Nothing else writes a generation that is being built.
            let mut commit = Commit {
                exclusive: true,
                ..Default::default()
            };
            let (mut applied, mut quarantined) = (0u64, 0u64);
            for (rec, events) in work {
                let expected_head = rec.head;
                // Fold under the real entity type (the plugin owns it), then
                // file the result under the generation's namespace.
                let mut real = rec.clone();
                real.key = EntityKey::new(t.clone(), rec.key.entity_id.clone());
                real.head = real.position;
                let head = events.last().map(|e| e.position).unwrap_or(rec.position);
                let mut d = fold_one(
                    &mut boxes,
                    &plugins,
                    Work {
                        record: real,
                        gap: Vec::new(),
                        events,
                    },
                );
                let q = d.quarantine();
                if let Some(mut q) = q {
                    q.key = rec.key.clone();
                    commit.quarantines.push(q);
                    quarantined += 1;
                }
                if let Some(o) = &d.outcome {
                    applied += o.applied as u64;
                    commit
                        .projections
                        .extend(o.projections.iter().map(|w| suffix_projection(w, &ns2)));
                }
                d.update.key = rec.key.clone();
                d.update.generation = generation.clone();
                d.update.expected_head = expected_head;
                d.update.head = head;
                commit.entities.push(d.update);
            }
            (commit, applied, quarantined)
        })
        .await?;
        app.host.storage.commit(commit).await?;
        Ok((applied, quarantined))
    }

    /// An entity's record in the active generation of its type (see
    /// [`generation::resolve`]), with what must be written if it is committed.
    async fn load_active(
        &self,
        key: &EntityKey,
        save: bool,
    ) -> Result<(EntityRecord, generation::Moves), InstallError> {
        let app = self;
        let mut recs = app.host.storage.load(std::slice::from_ref(key)).await?;
        let moves = generation::resolve(
            &*app.host.storage,
            &app.host.registry.generations(),
            &mut recs,
            save,
        )
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
        let rec = recs
            .remove(key)
            .ok_or_else(|| InstallError::NotFound(format!("no entity {key}")))?;
        Ok((rec, moves))
    }

    /// Re-apply a quarantined entity's held events with the active version.
    pub async fn retry(&self, key: &EntityKey) -> Result<Value, InstallError> {
        let app = self;
        let plugin = app.host.registry.get(&key.entity_type).ok_or_else(|| {
            InstallError::NotFound(format!("no active plugin for {}", key.entity_type))
        })?;
        let _gate = app.gate.lock().await;
        let (rec, moves) = app.load_active(key, true).await?;
        if !rec.quarantined {
            return Err(InstallError::NotFound(format!("{key} is not quarantined")));
        }
        let held = app.host.storage.history(key, rec.position, None).await?;
        let held_count = held.len();
        let p = plugin.clone();
        let mut free = rec.clone();
        free.quarantined = false;
        let d = tokio::task::spawn_blocking(move || {
            let mut boxes = HashMap::new();
            let mut plugins = HashMap::new();
            plugins.insert(p.info.entity_type.clone(), p.clone());
            let head = free.head;
            free.head = free.position;
            let mut d = fold_one(
                &mut boxes,
                &plugins,
                Work {
                    record: free,
                    gap: Vec::new(),
                    events: held,
                },
            );
            d.update.head = head;
            d.update.expected_head = head;
            d
        })
        .await
        .map_err(|e| anyhow::anyhow!("retry task: {e}"))?;
        let mut commit = Commit {
            released: vec![key.clone()],
            entities: moves.saved,
            quarantines: moves.quarantines,
            ..Default::default()
        };
        let q = d.quarantine();
        if let Some(o) = &d.outcome {
            commit.projections.extend(o.projections.iter().cloned());
        }
        let update: EntityUpdate = d.update.clone();
        commit.entities.push(d.update);
        if let Some(q) = &q {
            commit.quarantines.push(q.clone());
        }
        app.host
            .storage
            .commit(commit)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok(serde_json::json!({
            "entity_type": key.entity_type,
            "entity_id": key.entity_id,
            "held_events": held_count,
            "position": update.position,
            "head": update.head,
            "quarantined": update.quarantined,
            "plugin": plugin_ref(&plugin),
            "error": q.map(|q| q.error),
            "state": update.state,
        }))
    }

    /// A quarantined case as a fixture: the entity's stored events and the
    /// state it is held at, ready for `refold test`.
    pub async fn fixture(&self, key: &EntityKey) -> Result<Value, InstallError> {
        let app = self;
        let (rec, _) = app.load_active(key, false).await?;
        let q = app.host.storage.quarantine(key).await?;
        let events = app.host.storage.history(key, 0, None).await?;
        // Rebuilt from the attributes and the data's text as received, so a
        // binary-mode event becomes a structured one that `refold test` reads.
        let lines: Vec<refold_types::event::RawJson> = events
            .iter()
            .map(|e| {
                refold_types::event::RawJson::parse(&e.to_structured())
                    .unwrap_or_else(|_| refold_types::event::RawJson::null())
            })
            .collect();
        Ok(serde_json::json!({
            "entity_type": key.entity_type,
            "entity_id": key.entity_id,
            "quarantine": q,
            "state_before": rec.state,
            "position": rec.position,
            "events": lines,
            "expected": [{"entity_type": key.entity_type, "entity_id": key.entity_id, "state": rec.state}],
        }))
    }

    /// Re-submit a dead letter: its original record, or a corrected one.
    pub async fn resubmit(
        &self,
        id: &str,
        corrected: Option<Vec<u8>>,
    ) -> Result<Value, InstallError> {
        let app = self;
        let dl = app
            .host
            .storage
            .dead_letter(id)
            .await?
            .ok_or_else(|| InstallError::NotFound(format!("no dead letter {id}")))?;
        let payload = corrected.unwrap_or_else(|| dl.payload.clone().into_bytes());
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let offset =
            (now.as_micros() as i64) * 16 + (SEQ.fetch_add(1, Ordering::Relaxed) % 16) as i64;
        let record = SourceRecord {
            origin: Origin {
                source: "resubmit".into(),
                partition: 0,
                offset,
            },
            next_offset: offset + 1,
            key: None,
            headers: Vec::new(),
            payload,
            produced_at_ms: None,
        };
        let _gate = app.gate.lock().await;
        let mut pipeline = Pipeline::for_host(&app.host);
        let report = pipeline
            .process(std::slice::from_ref(&record))
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        if report.dead_lettered == 0 {
            app.host.storage.remove_dead_letter(id).await?;
        }
        Ok(serde_json::json!({
            "dead_letter": id,
            "accepted": report.dead_lettered == 0,
            "stored": report.stored,
            "duplicates": report.duplicates,
            "applied": report.applied,
            "quarantined": report.quarantined,
        }))
    }

    /// Bring the local registry in line with the stored activations (newer
    /// `seq` wins). Run at start and then every `poll`, so an activation made
    /// on one host reaches every host within `poll` plus compile time.
    pub async fn sync_registry(&self) -> anyhow::Result<()> {
        let app = self;
        // Every ORPHAN_SWEEP_MS, look for rebuilds whose host died after this
        // one started (at start, `register_configured` looks once).
        static LAST_SWEEP: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
        let now = now_ms();
        let last = LAST_SWEEP.load(Ordering::Relaxed);
        if now - last >= ORPHAN_SWEEP_MS
            && LAST_SWEEP
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            && let Err(e) = app.recover_rebuilds().await
        {
            tracing::warn!(error = %format!("{e:#}"), "could not clean up orphaned rebuilds");
        }
        for a in app.host.plugin_store.activations().await? {
            let local = app.host.registry.get(&a.entity_type);
            if local.as_ref().is_some_and(|p| p.digest == a.digest)
                && app.host.registry.generation(&a.entity_type) == a.generation
            {
                continue;
            }
            match app.compiled(&a.digest).await {
                Ok(p) => {
                    let _gate = app.gate.lock().await;
                    app.host.registry.activate_in(p, &a.generation);
                    tracing::info!(entity_type = %a.entity_type, digest = %a.digest, "activation picked up from the registry");
                }
                Err(e) => {
                    tracing::error!(entity_type = %a.entity_type, error = %e, "cannot load the activated version")
                }
            }
        }
        Ok(())
    }

    /// At start: store the configured plugin files and activate each one whose
    /// entity type has no activation yet (a rollback made through the API
    /// survives restarts).
    pub async fn register_configured(&self) -> anyhow::Result<()> {
        let app = self;
        let actives = app.host.plugin_store.activations().await?;
        let loaded = app.host.registry.snapshot();
        for f in &app.host.config.plugins.files {
            let bytes = tokio::fs::read(f).await?;
            let digest = refold_runtime::digest_of(&bytes);
            let Some(p) = loaded.values().find(|p| p.digest == digest) else {
                continue;
            };
            app.host
                .plugin_store
                .put_plugin(&version_of(p), &bytes)
                .await?;
            app.compiled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(p.digest.clone(), p.clone());
            if !actives.iter().any(|a| a.entity_type == p.info.entity_type) {
                match app
                    .record_activation(
                        &p.info.entity_type,
                        &p.digest,
                        None,
                        ActivationMode::Forward,
                        &Generation::base(),
                    )
                    .await
                {
                    // Another host registered its configured version first; the
                    // registry sync below adopts that one.
                    Ok(()) | Err(InstallError::Conflict(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        // Housekeeping: a failure here must not keep the host from starting.
        match app.recover_rebuilds().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rebuilds = n, "orphaned rebuilds cleaned up"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not clean up orphaned rebuilds")
            }
        }
        app.sync_registry().await
    }

    /// Watched directory: load `path` and activate it forward, unless the
    /// store already decided about these bytes (see below). `at_start`: the
    /// file was found by the first scan, not dropped in while running. The
    /// message says what was done; an error says why the file was refused (the
    /// active version keeps running either way).
    ///
    /// The file name says which entity type the file is for (see
    /// [`file_admits`]); its size is capped by `plugins.max_upload_bytes`, as an
    /// upload is.
    ///
    /// A file outlives the decisions taken after it was dropped in, so bytes
    /// the store knows are not activated blindly:
    /// * a digest a rollback moved away from (`Activation::rolled_back`) is
    ///   never activated from the directory, at start or later: the rollback
    ///   would be undone by the file that is still there. The API can
    ///   activate it again.
    /// * at start, a digest already stored for an entity type that has an
    ///   activation is left alone: the stored activation is the later decision
    ///   (an API activation or rollback made after the file was dropped in),
    ///   and several files of one type would otherwise each be re-activated in
    ///   name order. A new file (new digest) is activated as before.
    pub async fn install_file(
        &self,
        path: &std::path::Path,
        at_start: bool,
    ) -> anyhow::Result<String> {
        let app = self;
        let file = path
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let bytes = read_capped(path, app.host.config.plugins.max_upload_bytes as u64).await?;
        let digest = refold_runtime::digest_of(&bytes);
        let actives = app.host.plugin_store.activations().await?;
        if let Some(a) = actives.iter().find(|a| a.digest == digest) {
            return Ok(format!(
                "left alone: {} is already the active version of {}",
                &digest[..12],
                a.entity_type
            ));
        }
        if let Some(a) = actives.iter().find(|a| a.rolled_back.contains(&digest)) {
            return Ok(format!(
                "left alone: version {} of {} was rolled back from; activate it through the admin API to use it again",
                &digest[..12],
                a.entity_type
            ));
        }
        if at_start {
            for a in &actives {
                let stored = app
                    .host
                    .plugin_store
                    .plugin_versions(&a.entity_type)
                    .await?;
                if stored.iter().any(|v| v.digest == digest) {
                    return Ok(format!(
                        "left alone: version {} of {} is already stored, and the stored activation ({}) stands",
                        &digest[..12],
                        a.entity_type,
                        &a.digest[..a.digest.len().min(12)]
                    ));
                }
            }
        }
        let raw = bytes.clone();
        let (plugin, sample) = app.validate_as(bytes, |got| {
            if file_admits(&file, got) {
                return Ok(());
            }
            Err(InstallError::Internal(anyhow::anyhow!(
                "the component describes entity type `{got}`, which the file name `{file}` does not name \
                 (name it `{got}.wasm` or `{got}@<anything>.wasm`)"
            )))
        })
        .await?;
        let installed = app
            .keep(&raw, plugin, sample, Some(SwapMode::Forward))
            .await?;
        Ok(format!(
            "activated {}@{} ({}) for entity type {}",
            installed.version.name,
            installed.version.version,
            &installed.version.digest[..12],
            installed.version.entity_type
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watched_file_name_admits_every_entity_type_describe_allows() {
        // `<type>.wasm` and `<type>@<anything>.wasm`: exactly that type.
        assert!(file_admits("account.wasm", "account"));
        assert!(file_admits("bank-account.wasm", "bank-account"));
        assert!(file_admits("bank-account@v2.wasm", "bank-account"));
        assert!(file_admits("a.b_c-d@x-y@z.wasm", "a.b_c-d"));
        assert!(!file_admits("bank-account@v2.wasm", "bank"));
        assert!(!file_admits("account@v2.wasm", "account-v2"));
        // The older `<type>-<suffix>.wasm`: the stem or a part of it that
        // ends before a `-`.
        assert!(file_admits("account-v2.wasm", "account"));
        assert!(file_admits("bank-account-v2.wasm", "bank-account"));
        assert!(file_admits("bank-account-v2.wasm", "bank"));
        assert!(!file_admits("accounts.wasm", "account"));
        assert!(!file_admits("account.wasm", "bank-account"));
        assert!(!file_admits("account.wasm.tmp", "account"));
        assert!(!file_admits("@x.wasm", ""));
    }
}

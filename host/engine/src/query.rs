//! Read-only query operations: the current state of an entity (in the
//! generation its type has active, caught up from the raw events when it is
//! behind), and its state at a past position (`?at=`), both folded in
//! throwaway sandboxes under a time budget, and the replays in a bounded
//! number of slots. Nothing here is stored, except the replay snapshots of
//! [`crate::snapshot`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::app::App;
use crate::host::Host;
use crate::manager::PluginManager;
use crate::registry::{Generations, plugin_ref};
use refold_runtime::fold::{self, Replayed, fold_events};
use refold_runtime::{Plugin, Sandbox};
use refold_store::{EntityRecord, StoreError};
use refold_types::{EntityKey, Generation, PluginRef, StoredEvent};

/// What bounds the replays of queries. The command line fills it from its
/// `[http]` settings of the same names, which hold the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    /// Time budget of one replay (`?at=`, or catching a state up), in
    /// milliseconds.
    pub replay_timeout_ms: u64,
    /// `?at=` replays running at once; beyond it a query is refused with
    /// [`QueryError::Busy`].
    pub max_concurrent_replays: usize,
}

/// Why a query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No such entity, state, plugin or events.
    #[error("{0}")]
    NotFound(String),
    /// Every replay slot is taken.
    #[error("{running} replays are running; retry later")]
    Busy {
        /// How many replays run at once at most.
        running: usize,
    },
    /// The replay did not finish within its time budget.
    #[error("replaying {key} took longer than its budget of {budget_ms} ms")]
    OverBudget {
        /// The entity replayed.
        key: EntityKey,
        /// The budget, in milliseconds.
        budget_ms: u128,
    },
    /// The active plugin fails on an event before the position asked for.
    #[error("cannot fold {key} up to {at}: {reason}")]
    Unfoldable {
        /// The entity.
        key: EntityKey,
        /// The position asked for.
        at: u64,
        /// The failure.
        reason: String,
    },
    /// The record could not be brought into its active generation: the
    /// store did not answer as needed, which is worth a retry.
    #[error("{0}")]
    Generation(StoreError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Internal failure.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// The current state of an entity, as `GET /v1/entities/{type}/{id}`
/// answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EntityView {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
    /// Position of the last event folded into `state`.
    pub position: u64,
    /// Position of the last event stored.
    pub head: u64,
    /// Whether the entity is quarantined.
    pub quarantined: bool,
    /// The plugin version that produced `state`.
    pub plugin: Option<PluginRef>,
    /// The generation `state` belongs to.
    pub generation: Generation,
    /// The state.
    pub state: Value,
}

/// The state of an entity at a past position, as `?at=` answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StateAt {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
    /// Position of the last event applied (at most the one asked for).
    pub position: u64,
    /// The plugin version that folded it.
    pub plugin: PluginRef,
    /// The state.
    pub state: Value,
}

/// The read-only query operations of a host. Cloning is cheap; the clones
/// share the replay slots.
#[derive(Clone)]
pub struct Queries {
    host: Host,
    manager: PluginManager,
    /// `?at=` replays running at once.
    replays: Arc<Semaphore>,
    /// `limits.max_concurrent_replays`, at least 1.
    max_replays: usize,
    /// Time budget of one replay.
    budget: Duration,
}

impl Queries {
    /// The queries of `app` under `limits`. A limit of 0 would refuse
    /// everything, so 1 is the least.
    pub fn new(app: &App, limits: QueryLimits) -> Self {
        let max_replays = limits.max_concurrent_replays.max(1);
        Queries {
            host: app.host.clone(),
            manager: app.plugins.clone(),
            replays: Arc::new(Semaphore::new(max_replays)),
            max_replays,
            budget: Duration::from_millis(limits.replay_timeout_ms.max(1)),
        }
    }

    /// The time budget of one replay.
    pub fn replay_budget(&self) -> Duration {
        self.budget
    }

    fn over_budget(&self, key: &EntityKey) -> QueryError {
        QueryError::OverBudget {
            key: key.clone(),
            budget_ms: self.budget.as_millis(),
        }
    }

    /// `f`, or [`QueryError::OverBudget`] if `deadline` comes first.
    async fn within<T>(
        &self,
        deadline: Instant,
        key: &EntityKey,
        f: impl std::future::Future<Output = T>,
    ) -> Result<T, QueryError> {
        tokio::time::timeout_at(deadline.into(), f)
            .await
            .map_err(|_| self.over_budget(key))
    }

    /// The current state of `key`; [`QueryError::NotFound`] when it has
    /// none (never folded, or unknown).
    pub async fn entity(&self, key: &EntityKey) -> Result<EntityView, QueryError> {
        let rec = self.current(key).await?;
        let Some(rec) = rec else {
            return Err(QueryError::NotFound(format!("no state for {key}")));
        };
        let Some(state) = rec.state else {
            return Err(QueryError::NotFound(format!("no state for {key}")));
        };
        Ok(EntityView {
            entity_type: key.entity_type.clone(),
            entity_id: key.entity_id.clone(),
            position: rec.position,
            head: rec.head,
            quarantined: rec.quarantined,
            plugin: rec.plugin,
            generation: rec.generation,
            state,
        })
    }

    /// The record of `key` as the active generation of its type has it:
    /// taken from the generation's own namespace when another generation
    /// wrote the live record last, and caught up from the raw events when it
    /// is behind (after a cut-over, until a batch touches the entity).
    /// Read-only.
    ///
    /// The active version and generation are read from the stored
    /// activation, not this host's registry, so that every host answers
    /// from the new generation from the moment its activation row is
    /// written, including a host whose registry has not caught up yet.
    pub async fn current(&self, key: &EntityKey) -> Result<Option<EntityRecord>, QueryError> {
        let host = &self.host;
        let t = &key.entity_type;
        let stored = host.plugin_store.activation(t).await?;
        let (generations, plugin) = match stored {
            Some(a) => {
                let plugin = match host.registry.get(t) {
                    Some(p) if p.digest == a.digest => Some(p),
                    _ => self.manager.compiled(&a.digest).await.ok(),
                };
                let mut g = Generations::new();
                g.insert(t.clone(), a.generation);
                (Arc::new(g), plugin)
            }
            None => (host.registry.generations(), host.registry.get(t)),
        };
        let mut recs = host.storage.load(std::slice::from_ref(key)).await?;
        crate::generation::resolve(&*host.storage, &generations, &mut recs, false)
            .await
            .map_err(QueryError::Generation)?;
        let Some(mut rec) = recs.remove(key) else {
            return Ok(None);
        };
        if rec.quarantined || rec.position >= rec.head {
            return Ok(Some(rec));
        }
        let Some(plugin) = plugin else {
            return Ok(Some(rec));
        };
        // Catching up is a replay too, so it has the same time budget; it
        // takes no replay slot, since plain reads of an entity must not be
        // refused because of someone else's `?at=`.
        let deadline = Instant::now() + self.budget;
        let gap = self
            .within(
                deadline,
                key,
                host.storage.history(key, rec.position, Some(rec.head)),
            )
            .await??;
        // A failing event shows the last good state; the batch that meets
        // it will quarantine the entity.
        let r = replay(&plugin, key, rec.state.clone(), gap, Some(deadline), None).await?;
        if r.timed_out {
            return Err(self.over_budget(key));
        }
        if r.applied > 0 {
            rec.state = Some(r.state);
            rec.position += r.applied as u64;
            rec.plugin = Some(plugin_ref(&plugin));
        }
        Ok(Some(rec))
    }

    /// The state of `key` after the event at position `at`, folded from the
    /// stored raw events with the active plugin of its type. Takes one of
    /// the replay slots ([`QueryError::Busy`] when none is free) and gives
    /// up past the replay budget ([`QueryError::OverBudget`]).
    pub async fn state_at(&self, key: &EntityKey, at: u64) -> Result<StateAt, QueryError> {
        let plugin = self.host.registry.get(&key.entity_type).ok_or_else(|| {
            QueryError::NotFound(format!("no plugin for entity type {}", key.entity_type))
        })?;
        let slot = self
            .replays
            .clone()
            .try_acquire_owned()
            .map_err(|_| QueryError::Busy {
                running: self.max_replays,
            })?;
        let deadline = Instant::now() + self.budget;
        // From the replay snapshot before `at`: a bounded stretch of
        // history, not all of it (see `snapshot`); the fold stops at the
        // deadline.
        let answer = self
            .within(
                deadline,
                key,
                crate::snapshot::state_at(&*self.host.storage, &plugin, key, at, Some(deadline)),
            )
            .await??;
        drop(slot);
        let Some(r) = answer else {
            return Err(QueryError::NotFound(format!(
                "no events for {key} up to position {at}"
            )));
        };
        if r.timed_out {
            return Err(self.over_budget(key));
        }
        if let Some(reason) = r.failure {
            return Err(QueryError::Unfoldable {
                key: key.clone(),
                at,
                reason,
            });
        }
        Ok(StateAt {
            entity_type: key.entity_type.clone(),
            entity_id: key.entity_id.clone(),
            position: r.position,
            plugin: plugin_ref(&plugin),
            state: r.state,
        })
    }
}

/// Fold `events` onto `start` (the plugin's initial state when `None`; a
/// null state, nothing applied, when that fails) in a throwaway sandbox,
/// off the async threads, stopping at `deadline`. Nothing is stored. `slot`
/// (a replay permit) is held until the fold has stopped, even when the
/// caller has gone.
pub async fn replay(
    plugin: &Arc<Plugin>,
    key: &EntityKey,
    start: Option<Value>,
    events: Vec<StoredEvent>,
    deadline: Option<Instant>,
    slot: Option<OwnedSemaphorePermit>,
) -> Result<Replayed, QueryError> {
    let id = key.entity_id.clone();
    let p = plugin.clone();
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let sandbox = &mut Sandbox::new(p);
        let start = match start {
            Some(s) => s,
            None => match fold::init_state(sandbox, &id) {
                Ok(s) => s,
                Err(e) => {
                    return Replayed {
                        state: Value::Null,
                        applied: 0,
                        failure: Some((0, e)),
                        timed_out: false,
                    };
                }
            },
        };
        fold_events(sandbox, &id, start, &events, false, deadline)
    })
    .await
    .map_err(|e| QueryError::Internal(anyhow::anyhow!("replay task: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostConfig;
    use crate::pipeline::Pipeline;
    use refold_source::SourceRecord;
    use refold_store_sqlite::SqliteStore;
    use refold_types::Origin;
    use serde_json::json;
    use std::path::Path;

    /// The bank example over an in-memory store, with acc-1 opened and
    /// given two deposits.
    async fn bank() -> App {
        let mut config = HostConfig::default();
        config.plugins.files =
            vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bank/bank.wasm")];
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let app = App::with_storage(config, store.clone(), store).unwrap();
        let events = [
            ("account.opened", json!({"owner": "ann"})),
            ("account.deposited", json!({"amount": 100})),
            ("account.deposited", json!({"amount": 50})),
        ];
        let records: Vec<SourceRecord> = events
            .iter()
            .enumerate()
            .map(|(i, (ty, data))| SourceRecord {
                origin: Origin {
                    source: "t".into(),
                    partition: 0,
                    offset: i as i64,
                },
                next_offset: i as i64 + 1,
                key: None,
                headers: Vec::new(),
                payload: json!({"specversion": "1.0", "id": format!("e{i}"), "source": "/t",
                    "type": ty, "subject": "acc-1", "entitytype": "account", "data": data})
                .to_string()
                .into_bytes(),
                produced_at_ms: None,
            })
            .collect();
        let report = Pipeline::for_host(&app.host)
            .process(&records)
            .await
            .unwrap();
        assert_eq!(report.applied, 3);
        app
    }

    fn limits() -> QueryLimits {
        QueryLimits {
            replay_timeout_ms: 10_000,
            max_concurrent_replays: 1,
        }
    }

    #[tokio::test]
    async fn an_entity_now_and_at_a_past_position() {
        let app = bank().await;
        let q = Queries::new(&app, limits());
        let key = EntityKey::new("account", "acc-1");
        let now = q.entity(&key).await.unwrap();
        assert_eq!((now.position, now.head), (3, 3));
        assert_eq!(now.state["balance"], 150);
        let at = q.state_at(&key, 2).await.unwrap();
        assert_eq!(at.position, 2);
        assert_eq!(at.state["balance"], 100);
        let missing = EntityKey::new("account", "acc-9");
        assert!(matches!(
            q.entity(&missing).await,
            Err(QueryError::NotFound(_))
        ));
        assert!(matches!(
            q.state_at(&missing, 1).await,
            Err(QueryError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_replay_needs_a_free_slot() {
        let app = bank().await;
        let q = Queries::new(&app, limits());
        let key = EntityKey::new("account", "acc-1");
        let held = q.replays.clone().try_acquire_owned().unwrap();
        assert!(matches!(
            q.state_at(&key, 1).await,
            Err(QueryError::Busy { running: 1 })
        ));
        // Reads of the current state take no slot.
        assert_eq!(q.entity(&key).await.unwrap().position, 3);
        drop(held);
        assert_eq!(q.state_at(&key, 1).await.unwrap().position, 1);
    }

    #[tokio::test]
    async fn a_fold_stops_at_its_deadline() {
        let app = bank().await;
        let key = EntityKey::new("account", "acc-1");
        let plugin = app.host.registry.get("account").unwrap();
        let events = app.host.storage.history(&key, 0, None).await.unwrap();
        assert_eq!(events.len(), 3);
        let mut sandbox = Sandbox::new(plugin.clone());
        let init = fold::init_state(&mut sandbox, "acc-1").unwrap();
        let all = fold_events(&mut sandbox, "acc-1", init.clone(), &events, false, None);
        assert_eq!((all.applied, all.timed_out), (3, false));
        assert!(all.failure.is_none());
        assert_eq!(all.state["balance"], 150);
        // A deadline already passed: nothing is folded.
        let late = fold_events(
            &mut sandbox,
            "acc-1",
            init.clone(),
            &events,
            false,
            Some(Instant::now()),
        );
        assert_eq!((late.applied, late.timed_out), (0, true));
        assert_eq!(late.state, init);
        // The throwaway fold from the initial state.
        let r = replay(&plugin, &key, None, events, None, None)
            .await
            .unwrap();
        assert_eq!(r.applied, 3);
        assert_eq!(r.state, all.state);
    }
}

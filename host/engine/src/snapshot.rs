//! Past-position answers from replay snapshots: the state of an entity at a
//! position, folded by one plugin version from the entity's first event, is
//! a pure function of the stored events and that version (plugins get no
//! clock, randomness or I/O). So it is kept every [`EVERY`] positions as a
//! replay passes them, and a later question about a position replays only
//! from the snapshot before it: at most about `EVERY` events plus what
//! arrived since, instead of the whole history.

use std::sync::Arc;

use serde_json::Value;

use refold_runtime::fold;
use refold_runtime::{Plugin, Sandbox};
use refold_store::Storage;
use refold_types::event::EntityKey;

/// Positions between two replay snapshots of an entity.
pub const EVERY: u64 = 1_000;

/// The state of an entity at a position, as one plugin folds it.
#[derive(Debug)]
pub struct StateAt {
    /// The state after the last event applied.
    pub state: Value,
    /// The position of that event (0: none).
    pub position: u64,
    /// Why folding stopped before the position asked for, if it did.
    pub failure: Option<String>,
    /// Events replayed to answer (after the snapshot it started from).
    pub replayed: usize,
    /// The deadline passed before `at` was reached (`state` is as far as
    /// it got; the snapshots passed are kept all the same).
    pub timed_out: bool,
}

/// Fold `key` up to position `at` with `plugin`, starting from the latest
/// replay snapshot at or before `at`, and keep the snapshots this replay
/// passes. `Ok(None)` when the entity has no events up to `at`.
pub async fn state_at(
    storage: &dyn Storage,
    plugin: &Arc<Plugin>,
    key: &EntityKey,
    at: u64,
    deadline: Option<std::time::Instant>,
) -> anyhow::Result<Option<StateAt>> {
    let snap = storage.snapshot_before(key, &plugin.digest, at).await?;
    let (from, start) = match snap {
        Some((p, s)) => (p, Some(s)),
        None => (0, None),
    };
    let events = storage.history(key, from, Some(at)).await?;
    if events.is_empty() && start.is_none() {
        return Ok(None);
    }
    let id = key.entity_id.clone();
    let p = plugin.clone();
    let (answer, snapshots) = tokio::task::spawn_blocking(move || {
        let sandbox = &mut Sandbox::new(p);
        let mut state = match start {
            Some(s) => s,
            None => match fold::init_state(sandbox, &id) {
                Ok(s) => s,
                Err(e) => {
                    let answer = StateAt {
                        state: Value::Null,
                        position: 0,
                        failure: Some(format!("init failed: {e}")),
                        replayed: 0,
                        timed_out: false,
                    };
                    return (answer, Vec::new());
                }
            },
        };
        let mut position = from;
        let mut snapshots = Vec::new();
        let mut failure = None;
        let mut timed_out = false;
        let mut rest = &events[..];
        while !rest.is_empty() {
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                timed_out = true;
                break;
            }
            // Up to the next multiple of EVERY, so snapshots land on it.
            let next_mark = (position / EVERY + 1) * EVERY;
            let n = rest
                .iter()
                .take_while(|e| e.position <= next_mark)
                .count()
                .max(1);
            let (chunk, tail) = rest.split_at(n);
            let o = fold::fold_and_project(sandbox, &id, state, chunk, false);
            state = o.state;
            if o.applied > 0 {
                position = chunk[o.applied - 1].position;
            }
            if let Some((i, e)) = o.failure {
                failure = Some(format!("event {} failed: {e}", chunk[i].id));
                break;
            }
            if position % EVERY == 0 && position > from {
                snapshots.push((position, state.clone()));
            }
            rest = tail;
        }
        let answer = StateAt {
            state,
            position,
            failure,
            replayed: events.len(),
            timed_out,
        };
        (answer, snapshots)
    })
    .await?;
    if let Err(e) = storage.put_snapshots(key, &plugin.digest, &snapshots).await {
        // Only a shortcut lost: the next question replays further.
        tracing::debug!(entity = %key, error = %format!("{e:#}"), "keeping replay snapshots failed");
    }
    Ok(Some(answer))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::HostConfig;
    use crate::host::Host;
    use refold_source::SourceRecord;
    use refold_store::Origin;
    use refold_store_sqlite::SqliteStore;

    fn deposit(i: i64) -> SourceRecord {
        SourceRecord {
            origin: Origin {
                source: "t".into(),
                partition: 0,
                offset: i,
            },
            next_offset: i + 1,
            key: None,
            headers: Vec::new(),
            payload: format!(
                r#"{{"specversion":"1.0","id":"e{i}","source":"/t","type":"account.deposited","subject":"a","entitytype":"account","data":{{"amount":{}}}}}"#,
                i + 1
            )
            .into_bytes(),
            produced_at_ms: None,
        }
    }

    /// A second question starts from the snapshot the first one kept, and
    /// gets the same answer as a replay from the first event.
    #[tokio::test]
    async fn past_positions_replay_from_the_snapshot_before_them() {
        let mut config = HostConfig::default();
        config.plugins.files =
            vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bank/bank.wasm")];
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let app = Host::with_storage(config, store.clone(), store).unwrap();
        let records: Vec<SourceRecord> = (0..2_500).map(deposit).collect();
        crate::pipeline::Pipeline::for_host(&app)
            .process(&records)
            .await
            .unwrap();
        let plugin = app.registry.get("account").unwrap();
        let key = EntityKey::new("account", "a");

        let first = state_at(&*app.storage, &plugin, &key, 2_400, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((first.position, first.replayed), (2_400, 2_400));
        assert_eq!(first.state["balance"], 2_400 * 2_401 / 2);

        let again = state_at(&*app.storage, &plugin, &key, 2_300, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((again.position, again.replayed), (2_300, 300));
        assert_eq!(again.state["balance"], 2_300 * 2_301 / 2);

        let exact = state_at(&*app.storage, &plugin, &key, 1_000, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((exact.position, exact.replayed), (1_000, 0));
        assert_eq!(exact.state["balance"], 1_000 * 1_001 / 2);
    }
}

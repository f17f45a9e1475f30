//! Folding one entity's events through a sandbox: one guest call per batch,
//! and, when the batch fails, splitting it to find the failing event.

use serde_json::Value;

use crate::bindings::ProjectionOp;
use crate::runtime::{CallError, Sandbox};
use crate::store::{ProjectionWrite, StoredEvent};

/// What folding a batch of one entity produced.
#[derive(Debug)]
pub struct FoldOutcome {
    /// The last good state.
    pub state: Value,
    /// How many events of the batch were applied (a prefix).
    pub applied: usize,
    /// Read-model writes for the applied prefix.
    pub projections: Vec<ProjectionWrite>,
    /// The event (index into the batch) that failed, and why.
    pub failure: Option<(usize, CallError)>,
}

/// The initial state of an entity, as JSON.
pub fn init_state(sandbox: &mut Sandbox, entity_id: &str) -> Result<Value, CallError> {
    let bytes = sandbox.init(entity_id)?;
    parse_state(&bytes)
}

fn parse_state(bytes: &[u8]) -> Result<Value, CallError> {
    serde_json::from_slice(bytes).map_err(|e| CallError::Trap {
        kind: crate::runtime::TrapKind::Other,
        message: format!("plugin returned a state that is not JSON: {e}"),
    })
}

/// Fold `events` (in position order) onto `state`, then project. On failure
/// the state stays at the last good event; no projection of a failed batch is
/// kept, so the read model never runs ahead of the state.
pub fn fold_and_project(
    sandbox: &mut Sandbox,
    entity_id: &str,
    state: Value,
    events: &[StoredEvent],
    project: bool,
) -> FoldOutcome {
    let before = serde_json::to_vec(&state).unwrap_or_default();
    let (after, applied, failure) = fold_split(sandbox, entity_id, before.clone(), events, 0);
    let mut out = FoldOutcome {
        state,
        applied,
        projections: Vec::new(),
        failure,
    };
    if applied == 0 {
        return out;
    }
    let new_state = match parse_state(&after) {
        Ok(v) => v,
        Err(e) => {
            out.applied = 0;
            out.failure = Some((0, e));
            return out;
        }
    };
    if project {
        match sandbox.project(entity_id, &before, &after, &events[..applied]) {
            Ok(ops) => out.projections = ops.into_iter().filter_map(resolve_op).collect(),
            Err(e) => {
                // Projections advance with the state or not at all.
                let idx = match &e {
                    CallError::Plugin(pe) => pe.event_index as usize,
                    _ => 0,
                };
                out.applied = 0;
                out.failure = Some((idx.min(applied - 1), e));
                return out;
            }
        }
    }
    out.state = new_state;
    out
}

/// Upsert bodies must be JSON; a body that is not is dropped with a warning
/// rather than stored as something the query API cannot serve.
fn resolve_op(op: ProjectionOp) -> Option<ProjectionWrite> {
    match op {
        ProjectionOp::Upsert(d) => match serde_json::from_slice(&d.body) {
            Ok(body) => Some(ProjectionWrite::Upsert {
                projection: d.projection,
                key: d.key,
                body,
            }),
            Err(e) => {
                tracing::warn!(projection = %d.projection, key = %d.key, error = %e, "projection body is not JSON; skipped");
                None
            }
        },
        ProjectionOp::Delete((projection, key)) => {
            Some(ProjectionWrite::Delete { projection, key })
        }
    }
}

/// Returns (state bytes, events applied, failure with its batch index).
fn fold_split(
    sandbox: &mut Sandbox,
    entity_id: &str,
    state: Vec<u8>,
    events: &[StoredEvent],
    offset: usize,
) -> (Vec<u8>, usize, Option<(usize, CallError)>) {
    if events.is_empty() {
        return (state, 0, None);
    }
    match sandbox.fold(entity_id, &state, events) {
        Ok(s) => (s, events.len(), None),
        Err(CallError::Plugin(pe)) => {
            // The plugin named the failing event: apply what precedes it.
            let idx = pe.event_index as usize;
            let err = CallError::Plugin(pe);
            if idx == 0 {
                return (state, 0, Some((offset, err)));
            }
            let (s, applied, f) = fold_split(sandbox, entity_id, state, &events[..idx], offset);
            match f {
                Some(f) => (s, applied, Some(f)),
                None => (s, applied, Some((offset + idx, err))),
            }
        }
        Err(e) if events.len() == 1 => (state, 0, Some((offset, e))),
        Err(_) => {
            // A trap or an oversized output says nothing about which event is
            // to blame: split the batch until one event is left.
            let mid = events.len() / 2;
            let (s, a, f) = fold_split(sandbox, entity_id, state, &events[..mid], offset);
            if f.is_some() {
                return (s, a, f);
            }
            let (s, b, f) = fold_split(sandbox, entity_id, s, &events[mid..], offset + mid);
            (s, a + b, f)
        }
    }
}

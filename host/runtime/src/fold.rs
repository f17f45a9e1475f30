//! Folding one entity's events through a sandbox: one guest call per batch,
//! and, when the batch fails, a replay of its events one call each under one
//! shared deadline to find the failing event.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bindings::ProjectionOp;
use crate::sandbox::PROJECTION_OP_OVERHEAD;
use crate::sandbox::Sandbox;
use crate::trap::{CallError, TrapKind};
use refold_types::{ProjectionWrite, StoredEvent};

/// What folding a batch of one entity produced.
#[derive(Debug)]
pub struct FoldOutcome {
    /// The last good state.
    pub state: Value,
    /// How many events of the batch were applied (a prefix).
    pub applied: usize,
    /// Read-model writes for the applied prefix.
    pub projections: Vec<ProjectionWrite>,
    /// The size of `projections` as the host holds them, for a budget over
    /// several entities (e.g. per pipeline batch).
    pub projection_size: ProjectionSize,
    /// The event (index into the batch) that failed, and why.
    pub failure: Option<(usize, CallError)>,
}

/// How much a set of projection writes weighs on the host.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionSize {
    /// Number of writes.
    pub ops: usize,
    /// Names, keys and bodies (as the plugin returned them, before they were
    /// parsed) plus `PROJECTION_OP_OVERHEAD` per write: the figure that
    /// `Limits::max_projection_bytes` bounds per call.
    pub bytes: u64,
}

/// The sum of two sizes (for a budget over several entities).
impl std::ops::Add for ProjectionSize {
    type Output = ProjectionSize;

    fn add(self, other: ProjectionSize) -> ProjectionSize {
        ProjectionSize {
            ops: self.ops + other.ops,
            bytes: self.bytes.saturating_add(other.bytes),
        }
    }
}

/// The initial state of an entity, as JSON.
pub fn init_state(sandbox: &mut Sandbox, entity_id: &str) -> Result<Value, CallError> {
    let bytes = sandbox.init(entity_id)?;
    parse_state(&bytes)
}

fn parse_state(bytes: &[u8]) -> Result<Value, CallError> {
    serde_json::from_slice(bytes).map_err(|e| CallError::Trap {
        kind: TrapKind::Other,
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
    let (after, applied, failure) = fold_locating(sandbox, entity_id, before.clone(), events);
    let mut out = FoldOutcome {
        state,
        applied,
        projections: Vec::new(),
        projection_size: ProjectionSize::default(),
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
            Ok(ops) => {
                for op in ops {
                    let (size, write) = resolve_op(op);
                    if let Some(w) = write {
                        out.projection_size = out.projection_size + size;
                        out.projections.push(w);
                    }
                }
            }
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

/// The size one op weighs on the host (see `ProjectionSize::bytes`).
fn op_size(op: &ProjectionOp) -> ProjectionSize {
    let bytes = match op {
        ProjectionOp::Upsert(d) => d.projection.len() + d.key.len() + d.body.len(),
        ProjectionOp::Delete((p, k)) => p.len() + k.len(),
    };
    ProjectionSize {
        ops: 1,
        bytes: bytes as u64 + PROJECTION_OP_OVERHEAD,
    }
}

/// Upsert bodies must be JSON; a body that is not is dropped with a warning
/// rather than stored as something the query API cannot serve.
fn resolve_op(op: ProjectionOp) -> (ProjectionSize, Option<ProjectionWrite>) {
    let size = op_size(&op);
    let write = match op {
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
    };
    (size, write)
}

/// (state bytes, events applied, failure with its batch index).
type Folded = (Vec<u8>, usize, Option<(usize, CallError)>);

/// Fold the batch in one call; when it fails, find the failing event.
///
/// A plugin error names its event: the prefix before it is folded in one
/// more call. Anything else (a trap, an oversized state, or a plugin error
/// whose prefix fails too) says nothing about which event is to blame, and
/// `replay` finds it at the cost of about one deadline.
fn fold_locating(
    sandbox: &mut Sandbox,
    entity_id: &str,
    state: Vec<u8>,
    events: &[StoredEvent],
) -> Folded {
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
                return (state, 0, Some((0, err)));
            }
            match sandbox.fold(entity_id, &state, &events[..idx]) {
                Ok(s) => (s, idx, Some((idx, err))),
                // The plugin was wrong about its own batch; do not ask it
                // again, replay.
                Err(_) => replay(sandbox, entity_id, state, &events[..idx]),
            }
        }
        Err(_) => replay(sandbox, entity_id, state, events),
    }
}

/// Fold `events` one call per event in a fresh instance, under one deadline
/// of `cpu_ms` shared by the whole replay: the event during which a call
/// traps, returns too much or runs out of the budget is the culprit, and the
/// events before it are applied.
///
/// A call that runs out having started with less than half the budget left
/// may be a legal event that the ones before it crowded out: it is given one
/// more try with a fresh budget (a window starting at it). A looping event
/// thus costs at most one and a half deadlines here, and a batch of slow but
/// legal events is folded, one window at a time, instead of being blamed.
fn replay(
    sandbox: &mut Sandbox,
    entity_id: &str,
    state: Vec<u8>,
    events: &[StoredEvent],
) -> Folded {
    let budget = Duration::from_millis(sandbox.plugin().limits.cpu_ms);
    sandbox.recycle();
    let mut state = state;
    let mut spent = Duration::ZERO;
    let mut i = 0;
    while i < events.len() {
        let left = budget.saturating_sub(spent);
        let one = std::slice::from_ref(&events[i]);
        let result = sandbox.fold_within(entity_id, &state, one, Some(left));
        spent += sandbox.last_call();
        match result {
            Ok(s) => {
                state = s;
                i += 1;
            }
            Err(e) if e.is_trap(TrapKind::Deadline) && left < budget / 2 => {
                // Crowded out, maybe: a new window from this event.
                match sandbox.fold_within(entity_id, &state, one, Some(budget)) {
                    Ok(s) => {
                        spent = sandbox.last_call();
                        state = s;
                        i += 1;
                    }
                    Err(e) => return (state, i, Some((i, e))),
                }
            }
            Err(e) => {
                let e = match e {
                    CallError::Trap {
                        kind: TrapKind::Deadline,
                        ..
                    } => CallError::Trap {
                        kind: TrapKind::Deadline,
                        message: format!(
                            "CPU time limit exceeded in fold, limit cpu_ms = {} (shared by the replay that located this event)",
                            budget.as_millis()
                        ),
                    },
                    other => other,
                };
                return (state, i, Some((i, e)));
            }
        }
    }
    (state, events.len(), None)
}

/// Events folded per guest call of a replay: the deadline is checked
/// between calls, so this bounds how far past its budget a replay runs.
pub const REPLAY_CHUNK: usize = 1024;

/// What [`fold_events`] did.
#[derive(Debug)]
pub struct Replayed {
    /// The state after the events applied (the start state when none was).
    pub state: Value,
    /// How many events were applied (a prefix of them).
    pub applied: usize,
    /// The event (index into the whole list) that failed, and why.
    pub failure: Option<(usize, CallError)>,
    /// The deadline passed before every event was folded.
    pub timed_out: bool,
}

/// Fold `events` (in position order) onto `start` in `sandbox`, in guest
/// calls of [`REPLAY_CHUNK`] events, stopping at the first failing event or
/// once `deadline` has passed (checked between calls). With `project`, each
/// chunk is projected as well, so a failing projection counts as a failure.
/// Nothing is stored. Blocking: run it off the async threads.
pub fn fold_events(
    sandbox: &mut Sandbox,
    entity_id: &str,
    start: Value,
    events: &[StoredEvent],
    project: bool,
    deadline: Option<Instant>,
) -> Replayed {
    let mut out = Replayed {
        state: start,
        applied: 0,
        failure: None,
        timed_out: false,
    };
    for chunk in events.chunks(REPLAY_CHUNK) {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            out.timed_out = true;
            break;
        }
        let state = std::mem::take(&mut out.state);
        let o = fold_and_project(sandbox, entity_id, state, chunk, project);
        out.state = o.state;
        let offset = out.applied;
        out.applied += o.applied;
        if let Some((i, e)) = o.failure {
            out.failure = Some((offset + i, e));
            break;
        }
    }
    out
}

//! The typed outcome of a failed guest call, and how a wasmtime error is
//! classified into one.
//!
//! A trap and a plugin-reported error are different things: a trap
//! (deadline, memory, panic) poisons the instance, so its store is
//! discarded; a plugin error is an answer, the instance is fine.

use wasmtime::Store;

use crate::bindings::PluginError;
use crate::host_state::HostState;
use crate::limits::{Limits, MemoryLimiter};

/// Why a trap happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrapKind {
    /// The call ran past its CPU budget.
    Deadline,
    /// The guest asked for more linear memory than allowed.
    Memory,
    /// The guest panicked (message captured from its stderr).
    Panic,
    /// Any other trap (unreachable, out-of-bounds access, stack overflow, ...).
    Other,
}

/// The failure of one guest call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The guest trapped; the instance was discarded.
    #[error("{kind:?} trap: {message}")]
    Trap {
        /// Classified cause.
        kind: TrapKind,
        /// Short human-readable message: which export, which limit, the
        /// panic message (never a whole wasm backtrace).
        message: String,
    },
    /// The guest returned its own error for one event of the batch.
    #[error("plugin error on event {}: {}", .0.event_id, .0.message)]
    Plugin(PluginError),
    /// The guest returned more than the limits allow; the host refused it.
    #[error("{what} {size} {unit}, limit {limit} = {max}")]
    Output {
        /// What was returned, e.g. "project returned".
        what: &'static str,
        /// Size returned (as far as the host looked: it stops counting at
        /// the first op past the limit).
        size: u64,
        /// Unit of `size`, e.g. "ops".
        unit: &'static str,
        /// The `Limits` key that refused it.
        limit: &'static str,
        /// Allowed size.
        max: u64,
    },
}

impl CallError {
    /// Short machine-readable kind, for records and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Trap {
                kind: TrapKind::Deadline,
                ..
            } => "deadline",
            CallError::Trap {
                kind: TrapKind::Memory,
                ..
            } => "memory",
            CallError::Trap {
                kind: TrapKind::Panic,
                ..
            } => "panic",
            CallError::Trap {
                kind: TrapKind::Other,
                ..
            } => "trap",
            CallError::Plugin(_) => "plugin_error",
            CallError::Output { .. } => "output_too_large",
        }
    }

    /// Whether this is a trap of kind `kind`.
    pub fn is_trap(&self, kind: TrapKind) -> bool {
        matches!(self, CallError::Trap { kind: k, .. } if *k == kind)
    }
}

/// Classify the failure of a call of `export` on the store it ran in.
pub(crate) fn fail(
    store: &mut Store<HostState>,
    export: &str,
    limits: &Limits,
    err: wasmtime::Error,
) -> CallError {
    let state = store.data_mut();
    let stderr = state.drain_stdio();
    state.end_call(export);
    classify(export, &state.limiter, limits, &stderr, &err)
}

pub(crate) fn classify(
    export: &str,
    limiter: &MemoryLimiter,
    limits: &Limits,
    stderr: &str,
    err: &wasmtime::Error,
) -> CallError {
    let trap = err.downcast_ref::<wasmtime::Trap>().copied();
    // A refused grow comes first: a guest that catches the failure may go on
    // to spin into the deadline or trap somewhere else, but the cause is
    // still memory.
    if let Some((requested, max)) = limiter.exceeded {
        return CallError::Trap {
            kind: TrapKind::Memory,
            message: format!(
                "memory limit exceeded in {export}: requested {requested} bytes of linear memory, limit memory_bytes = {max}"
            ),
        };
    }
    if let Some((requested, max)) = limiter.table_exceeded {
        return CallError::Trap {
            kind: TrapKind::Other,
            message: format!(
                "table limit exceeded in {export}: requested {requested} table elements, limit max_table_elements = {max}"
            ),
        };
    }
    if let Some(message) = count_exceeded(export, limits, err) {
        return CallError::Trap {
            kind: TrapKind::Other,
            message,
        };
    }
    if trap == Some(wasmtime::Trap::Interrupt) {
        return CallError::Trap {
            kind: TrapKind::Deadline,
            message: format!(
                "CPU time limit exceeded in {export}, limit cpu_ms = {}",
                limits.cpu_ms
            ),
        };
    }
    if trap == Some(wasmtime::Trap::StackOverflow) {
        return CallError::Trap {
            kind: TrapKind::Other,
            message: format!("stack overflow in {export}"),
        };
    }
    if let Some(msg) = panic_message(stderr) {
        return CallError::Trap {
            kind: TrapKind::Panic,
            message: msg,
        };
    }
    // The root cause, not `{err:#}`: the chain carries the whole wasm
    // backtrace, which says nothing to whoever reads a quarantine.
    let mut message = match trap {
        Some(t) => format!("{t} in {export}"),
        None => format!("{} in {export}", err.root_cause()),
    };
    let stderr = stderr.trim();
    if !stderr.is_empty() {
        message.push_str("; stderr: ");
        message.extend(stderr.chars().take(1024));
    }
    CallError::Trap {
        kind: TrapKind::Other,
        message: message.chars().take(4096).collect(),
    }
}

/// How wasmtime refuses an instantiation past `ResourceLimiter::instances`,
/// `tables` or `memories` (it counts them itself, so its text is all there is
/// to go by): `resource limit exceeded: {what} count too high at {n}`.
const COUNT_EXCEEDED: &str = "resource limit exceeded: ";

/// The message for an instantiation refused by a count limit, naming its key.
fn count_exceeded(export: &str, limits: &Limits, err: &wasmtime::Error) -> Option<String> {
    let root = err.root_cause().to_string();
    let what = root.strip_prefix(COUNT_EXCEEDED)?;
    let (key, max) = if what.starts_with("instance count") {
        ("max_instances", limits.max_instances)
    } else if what.starts_with("table count") {
        ("max_tables", limits.max_tables)
    } else if what.starts_with("memory count") {
        ("max_memories", limits.max_memories)
    } else {
        return None;
    };
    Some(format!("{what} in {export}, limit {key} = {max}"))
}

/// Rust's panic hook writes `thread '…' panicked at FILE:LINE:COL:\nMESSAGE`.
pub(crate) fn panic_message(stderr: &str) -> Option<String> {
    let at = stderr.find("panicked at")?;
    let rest = &stderr[at..];
    let mut lines = rest.lines();
    let location = lines.next().unwrap_or_default().trim_end_matches(':');
    let message: Vec<&str> = lines.take_while(|l| !l.starts_with("note:")).collect();
    let message = message.join("\n");
    Some(
        format!("{} ({location})", message.trim())
            .chars()
            .take(4096)
            .collect(),
    )
}

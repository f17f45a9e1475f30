//! One plugin instance in its own `Store`, and the typed outcome of each call.
//!
//! A trap and a plugin-reported error are different things: a trap (deadline,
//! memory, panic) poisons the instance, so the store is discarded and a fresh
//! one is built on the next call; a plugin error is an answer, the instance is
//! fine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::Store;

use super::batch;
use super::engine::Engine;
use super::host_state::HostState;
use super::plugin::Plugin;
use crate::bindings::{Descriptor, EventBatch, PluginError, ProjectionOp, Projector};
use crate::store::StoredEvent;

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
        /// Human-readable message (panic message, limit, wasm backtrace).
        message: String,
    },
    /// The guest returned its own error for one event of the batch.
    #[error("plugin error on event {}: {}", .0.event_id, .0.message)]
    Plugin(PluginError),
    /// The guest returned more than the limits allow; the host refused it.
    #[error("{what} of {size} bytes exceeds the limit of {max} bytes")]
    Output {
        /// What was too large.
        what: &'static str,
        /// Size returned.
        size: u64,
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
}

/// Counters of the work done in one sandbox, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct CallStats {
    /// Guest calls made.
    pub calls: u64,
    /// Time spent inside the guest.
    pub busy: Duration,
    /// Largest linear memory seen.
    pub peak_memory: usize,
}

struct Live {
    store: Store<HostState>,
    bindings: Projector,
}

/// A plugin instance with its own store (the sandbox is per entity type).
pub struct Sandbox {
    plugin: Arc<Plugin>,
    live: Option<Live>,
    /// Work done so far.
    pub stats: CallStats,
    /// The encoding buffers of the last batch, reused by the next one.
    scratch: EventBatch,
}

impl Sandbox {
    /// A sandbox for `plugin`; the instance is created on first use.
    pub fn new(plugin: Arc<Plugin>) -> Self {
        Sandbox {
            plugin,
            live: None,
            stats: CallStats::default(),
            scratch: batch::empty(),
        }
    }

    /// The plugin version this sandbox runs.
    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// Drop the instance; the next call starts from a fresh one. Called
    /// between pipeline batches so no guest global state leaks across batches
    /// and memory grown by one batch is returned.
    pub fn recycle(&mut self) {
        self.live = None;
    }

    fn live(&mut self) -> Result<&mut Live, CallError> {
        if self.live.is_none() {
            let mut store = Store::new(
                self.plugin.engine().wasmtime(),
                HostState::new(self.plugin.tag(), &self.plugin.limits),
            );
            store.limiter(|s| &mut s.limiter);
            store.epoch_deadline_trap();
            store.set_epoch_deadline(Engine::ticks_for(self.plugin.limits.cpu_ms));
            let bindings = self
                .plugin
                .pre()
                .instantiate(&mut store)
                .map_err(|e| classify(&mut store, e))?;
            self.live = Some(Live { store, bindings });
        }
        Ok(self.live.as_mut().expect("just created"))
    }

    /// Run `f` against the instance under the CPU deadline, classifying traps.
    fn call<R>(
        &mut self,
        f: impl FnOnce(&Projector, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let ticks = Engine::ticks_for(self.plugin.limits.cpu_ms);
        let live = self.live()?;
        live.store.set_epoch_deadline(ticks);
        let started = Instant::now();
        let result = f(&live.bindings, &mut live.store);
        let elapsed = started.elapsed();
        self.stats.calls += 1;
        self.stats.busy += elapsed;
        let live = self.live.as_mut().expect("live during call");
        self.stats.peak_memory = self.stats.peak_memory.max(live.store.data().limiter.peak);
        match result {
            Ok(r) => {
                live.store.data_mut().drain_stdio();
                Ok(r)
            }
            Err(e) => {
                let mut live = self.live.take().expect("live during call");
                Err(classify(&mut live.store, e))
            }
        }
    }

    /// `describe()`.
    pub fn describe(&mut self) -> Result<Descriptor, CallError> {
        self.call(|b, s| b.call_describe(s))
    }

    /// `init(entity-id)`, checked against the state size limit.
    pub fn init(&mut self, entity_id: &str) -> Result<Vec<u8>, CallError> {
        let out = self.call(|b, s| b.call_init(s, entity_id))?;
        self.check_state(out)
    }

    /// `fold(entity-id, state, events)`: one call for the whole batch,
    /// encoded as one `event-batch` (see `batch`).
    pub fn fold(
        &mut self,
        entity_id: &str,
        state: &[u8],
        events: &[StoredEvent],
    ) -> Result<Vec<u8>, CallError> {
        let encoded = self.encode(events)?;
        let out = self.call(|b, s| b.call_fold(s, entity_id, state, &encoded));
        self.scratch = encoded;
        match out? {
            Ok(state) => self.check_state(state),
            Err(e) => Err(CallError::Plugin(sanitize(e, events))),
        }
    }

    /// `project(entity-id, before, after, events)`, checked against the
    /// projection output limit.
    pub fn project(
        &mut self,
        entity_id: &str,
        before: &[u8],
        after: &[u8],
        events: &[StoredEvent],
    ) -> Result<Vec<ProjectionOp>, CallError> {
        let encoded = self.encode(events)?;
        let out = self.call(|b, s| b.call_project(s, entity_id, before, after, &encoded));
        self.scratch = encoded;
        let ops = out?.map_err(|e| CallError::Plugin(sanitize(e, events)))?;
        let size: u64 = ops
            .iter()
            .map(|op| match op {
                ProjectionOp::Upsert(d) => (d.projection.len() + d.key.len() + d.body.len()) as u64,
                ProjectionOp::Delete((p, k)) => (p.len() + k.len()) as u64,
            })
            .sum();
        let max = self.plugin.limits.max_projection_bytes;
        if size > max {
            return Err(CallError::Output {
                what: "projection output",
                size,
                max,
            });
        }
        Ok(ops)
    }

    /// Encode into the scratch buffers, taken out of `self` for the call.
    fn encode(&mut self, events: &[StoredEvent]) -> Result<EventBatch, CallError> {
        let mut encoded = std::mem::replace(&mut self.scratch, batch::empty());
        batch::encode_into(&mut encoded, events).map_err(|e| CallError::Trap {
            kind: TrapKind::Other,
            message: e.to_string(),
        })?;
        Ok(encoded)
    }

    fn check_state(&self, state: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let max = self.plugin.limits.max_state_bytes;
        let size = state.len() as u64;
        if size > max {
            return Err(CallError::Output {
                what: "state",
                size,
                max,
            });
        }
        Ok(state)
    }
}

/// The host never trusts what a plugin says about its own error: clamp the
/// index into the batch and make the id agree with it.
fn sanitize(mut e: PluginError, events: &[StoredEvent]) -> PluginError {
    if events.is_empty() {
        e.event_index = 0;
        e.event_id = String::new();
    } else {
        let i = (e.event_index as usize).min(events.len() - 1);
        e.event_index = i as u32;
        e.event_id = events[i].id.clone();
    }
    e.message = e.message.chars().take(4096).collect();
    e
}

fn classify(store: &mut Store<HostState>, err: wasmtime::Error) -> CallError {
    let stderr = store.data_mut().drain_stdio();
    let trap = err.downcast_ref::<wasmtime::Trap>().copied();
    let exceeded = store.data().limiter.exceeded;
    if trap == Some(wasmtime::Trap::Interrupt) {
        return CallError::Trap {
            kind: TrapKind::Deadline,
            message: "CPU time limit exceeded (epoch deadline)".into(),
        };
    }
    if let Some((requested, max)) = exceeded {
        return CallError::Trap {
            kind: TrapKind::Memory,
            message: format!(
                "memory limit exceeded: requested {requested} bytes, limit {max} bytes"
            ),
        };
    }
    if let Some(msg) = panic_message(&stderr) {
        return CallError::Trap {
            kind: TrapKind::Panic,
            message: msg,
        };
    }
    let mut message = format!("{err:#}");
    if !stderr.trim().is_empty() {
        message.push_str("; stderr: ");
        message.push_str(stderr.trim());
    }
    CallError::Trap {
        kind: TrapKind::Other,
        message: message.chars().take(4096).collect(),
    }
}

/// Rust's panic hook writes `thread '…' panicked at FILE:LINE:COL:\nMESSAGE`.
fn panic_message(stderr: &str) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_rust_panic_message() {
        let stderr = "\nthread '<unnamed>' panicked at src/lib.rs:10:5:\nboom here\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(
            panic_message(stderr).unwrap(),
            "boom here (panicked at src/lib.rs:10:5)"
        );
        assert_eq!(panic_message("nothing"), None);
    }
}

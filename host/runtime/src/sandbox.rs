//! One plugin instance in its own `Store`, and the typed outcome of each call.
//!
//! A trap and a plugin-reported error are different things: a trap (deadline,
//! memory, panic) poisons the instance, so the store is discarded and a fresh
//! one is built on the next call; a plugin error is an answer, the instance is
//! fine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::Store;

use refold_types::{ProjectionWrite, StoredEvent};

use crate::batch;
use crate::bindings::{EventBatch, PluginError, ProjectionOp, Projector};
use crate::engine::Engine;
use crate::host_state::HostState;
use crate::limits::Limits;
use crate::plugin::Plugin;
use crate::trap::{CallError, TrapKind, fail};

/// Counters of the work done in one sandbox, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct CallStats {
    /// Guest calls made.
    pub calls: u64,
    /// Time spent inside the guest.
    pub busy: Duration,
    /// Largest linear memory seen (all memories of an instance).
    pub peak_memory: usize,
    /// Guest log lines dropped by the per-call log budget.
    pub log_lines_dropped: u64,
    /// Calls that ran out of their CPU budget.
    pub deadlines: u64,
}

/// What one projection op costs the host beyond its names, key and body:
/// the op as the sandbox returns it, the write the pipeline stores, and an
/// allocation for each of its three buffers. A 3-byte op is mostly this.
pub const PROJECTION_OP_OVERHEAD: u64 =
    (std::mem::size_of::<ProjectionOp>() + std::mem::size_of::<ProjectionWrite>() + 3 * 16) as u64;

/// How wasmtime says that lifting a result ran out of hostcall fuel (its
/// error type is private, so the text is all there is to go by).
const HOSTCALL_FUEL_EXHAUSTED: &str = "fuel allocated for hostcalls has been exhausted";

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
    /// How long the last guest call ran.
    last_call: Duration,
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
            last_call: Duration::ZERO,
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

    /// How long the last guest call ran (for budgets shared by several calls).
    pub fn last_call(&self) -> Duration {
        self.last_call
    }

    fn live(&mut self) -> Result<&mut Live, CallError> {
        if self.live.is_none() {
            let limits = self.plugin.limits;
            let mut store = Store::new(
                self.plugin.engine().wasmtime(),
                HostState::new(self.plugin.tag(), &limits),
            );
            store.limiter(|s| &mut s.limiter);
            store.epoch_deadline_trap();
            store.set_epoch_deadline(Engine::ticks_for(limits.cpu_ms));
            store.data_mut().begin_call();
            let bindings = match self.plugin.pre().instantiate(&mut store) {
                Ok(b) => b,
                Err(e) => return Err(fail(&mut store, "instantiation", &limits, e)),
            };
            self.live = Some(Live { store, bindings });
        }
        self.live.as_mut().ok_or_else(|| CallError::Trap {
            kind: TrapKind::Other,
            message: "no instance".into(),
        })
    }

    /// Run `f` against the instance under the CPU deadline (the whole
    /// `cpu_ms`, or what is left of a shared `budget`), classifying traps.
    fn call<R>(
        &mut self,
        export: &'static str,
        budget: Option<Duration>,
        f: impl FnOnce(&mut Live) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let limits = self.plugin.limits;
        let ticks = match budget {
            Some(left) => Engine::ticks_for_duration(left),
            None => Engine::ticks_for(limits.cpu_ms),
        };
        let live = self.live()?;
        live.store.data_mut().begin_call();
        live.store.set_epoch_deadline(ticks);
        let started = Instant::now();
        let result = f(live);
        let elapsed = started.elapsed();
        self.last_call = elapsed;
        self.stats.calls += 1;
        self.stats.busy += elapsed;
        let Some(live) = self.live.as_mut() else {
            return Err(CallError::Trap {
                kind: TrapKind::Other,
                message: "instance lost during a call".into(),
            });
        };
        let state = live.store.data_mut();
        self.stats.peak_memory = self.stats.peak_memory.max(state.limiter.peak);
        match result {
            Ok(r) => {
                state.drain_stdio();
                self.stats.log_lines_dropped += state.end_call(export);
                Ok(r)
            }
            Err(e) => {
                let err = fail(&mut live.store, export, &limits, e);
                self.stats.log_lines_dropped += live.store.data().log_budget.dropped;
                if err.is_trap(TrapKind::Deadline) {
                    self.stats.deadlines += 1;
                }
                // A trap poisons the instance: the next call gets a new one.
                self.live = None;
                Err(err)
            }
        }
    }

    /// `init(entity-id)`, checked against the state size limit.
    pub fn init(&mut self, entity_id: &str) -> Result<Vec<u8>, CallError> {
        let out = self.call("init", None, |l| {
            l.bindings.call_init(&mut l.store, entity_id)
        })?;
        self.check_state("init returned a state of", out)
    }

    /// `fold(entity-id, state, events)`: one call for the whole batch,
    /// encoded as one `event-batch` (see `batch`).
    pub fn fold(
        &mut self,
        entity_id: &str,
        state: &[u8],
        events: &[StoredEvent],
    ) -> Result<Vec<u8>, CallError> {
        self.fold_within(entity_id, state, events, None)
    }

    /// `fold` under what is left of a budget shared with other calls (the
    /// deadline is `left`, not a fresh `cpu_ms`); `None` is the usual
    /// per-call deadline.
    pub fn fold_within(
        &mut self,
        entity_id: &str,
        state: &[u8],
        events: &[StoredEvent],
        left: Option<Duration>,
    ) -> Result<Vec<u8>, CallError> {
        let encoded = self.encode(events)?;
        let out = self.call("fold", left, |l| {
            l.bindings
                .call_fold(&mut l.store, entity_id, state, &encoded)
        });
        self.scratch = encoded;
        match out? {
            Ok(state) => self.check_state("fold returned a state of", state),
            Err(e) => Err(CallError::Plugin(sanitize(e, events))),
        }
    }

    /// `project(entity-id, before, after, events)`, checked against the
    /// projection limits.
    ///
    /// The result is bounded before the host allocates it: lifting it from
    /// guest memory runs on wasmtime's hostcall fuel, which charges each list
    /// at its length times the size of the host type (here `ProjectionOp`)
    /// and each string at its length, before anything is copied. With the
    /// fuel at `max_projection_bytes`, a million 3-byte ops are refused
    /// before a million host ops exist. What is accepted is then checked op
    /// by op: their number against `max_projection_ops`, their size as the
    /// host holds them (with `PROJECTION_OP_OVERHEAD`) against
    /// `max_projection_bytes`.
    pub fn project(
        &mut self,
        entity_id: &str,
        before: &[u8],
        after: &[u8],
        events: &[StoredEvent],
    ) -> Result<Vec<ProjectionOp>, CallError> {
        let limits = self.plugin.limits;
        let fuel = usize::try_from(limits.max_projection_bytes).unwrap_or(usize::MAX);
        let encoded = self.encode(events)?;
        let out = self.call("project", None, |l| {
            let usual = l.store.hostcall_fuel();
            l.store.set_hostcall_fuel(fuel);
            let r = l
                .bindings
                .call_project(&mut l.store, entity_id, before, after, &encoded);
            l.store.set_hostcall_fuel(usual);
            r
        });
        self.scratch = encoded;
        let ops = match out {
            Err(CallError::Trap {
                kind: TrapKind::Other,
                message,
            }) if message.contains(HOSTCALL_FUEL_EXHAUSTED) => {
                return Err(CallError::Output {
                    what: "project returned more than",
                    size: limits.max_projection_bytes,
                    unit: "bytes of projection output as the host holds it (counted before copying)",
                    limit: "max_projection_bytes",
                    max: limits.max_projection_bytes,
                });
            }
            other => other?.map_err(|e| CallError::Plugin(sanitize(e, events)))?,
        };
        check_ops(&ops, &limits)?;
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

    fn check_state(&self, what: &'static str, state: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let max = self.plugin.limits.max_state_bytes;
        let size = state.len() as u64;
        if size > max {
            return Err(CallError::Output {
                what,
                size,
                unit: "bytes",
                limit: "max_state_bytes",
                max,
            });
        }
        Ok(state)
    }
}

/// The limits on a `project` result: the number of ops, then their size as
/// the host holds them.
fn check_ops(ops: &[ProjectionOp], limits: &Limits) -> Result<(), CallError> {
    let count = ops.len() as u64;
    if count > limits.max_projection_ops {
        return Err(CallError::Output {
            what: "project returned",
            size: count,
            unit: "ops",
            limit: "max_projection_ops",
            max: limits.max_projection_ops,
        });
    }
    let mut bytes = 0;
    for op in ops {
        let size = match op {
            ProjectionOp::Upsert(d) => d.projection.len() + d.key.len() + d.body.len(),
            ProjectionOp::Delete((p, k)) => p.len() + k.len(),
        };
        charge(&mut bytes, size, limits.max_projection_bytes)?;
    }
    Ok(())
}

/// Add one op of `size` bytes to the running total of a `project` result,
/// refusing it past `max`.
fn charge(total: &mut u64, size: usize, max: u64) -> Result<(), CallError> {
    *total = total.saturating_add(size as u64 + PROJECTION_OP_OVERHEAD);
    if *total > max {
        return Err(CallError::Output {
            what: "project returned",
            size: *total,
            unit: "bytes of projection output (as the host holds it)",
            limit: "max_projection_bytes",
            max,
        });
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MemoryLimiter;
    use crate::trap::{classify, panic_message};
    use wasmtime::component::{Component, Linker};

    #[test]
    fn extracts_rust_panic_message() {
        let stderr = "\nthread '<unnamed>' panicked at src/lib.rs:10:5:\nboom here\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(
            panic_message(stderr).unwrap(),
            "boom here (panicked at src/lib.rs:10:5)"
        );
        assert_eq!(panic_message("nothing"), None);
    }

    fn limits(memory: u64) -> Limits {
        Limits {
            memory_bytes: memory,
            ..Limits::default()
        }
    }

    /// A store like a sandbox's: the limiter installed, an epoch deadline.
    fn store(engine: &Engine, limits: &Limits) -> Store<HostState> {
        let mut store = Store::new(engine.wasmtime(), HostState::new("t@1".into(), limits));
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(Engine::ticks_for(limits.cpu_ms));
        store.data_mut().begin_call();
        store
    }

    /// A component whose core module has three memories of one page and a
    /// `grow` that grows each by `pages`, returning how many grows succeeded.
    const THREE_MEMORIES: &str = r#"
        (component
          (core module $m
            (memory $a 1)
            (memory $b 1)
            (memory $c 1)
            (func (export "grow") (param $p i32) (result i32)
              (local $ok i32)
              (if (i32.ne (memory.grow $a (local.get $p)) (i32.const -1))
                (then (local.set $ok (i32.add (local.get $ok) (i32.const 1)))))
              (if (i32.ne (memory.grow $b (local.get $p)) (i32.const -1))
                (then (local.set $ok (i32.add (local.get $ok) (i32.const 1)))))
              (if (i32.ne (memory.grow $c (local.get $p)) (i32.const -1))
                (then (local.set $ok (i32.add (local.get $ok) (i32.const 1)))))
              (local.get $ok)))
          (core instance $i (instantiate $m))
          (func (export "grow") (param "pages" u32) (result u32)
            (canon lift (core func $i "grow"))))
    "#;

    #[test]
    fn the_memory_limit_is_the_sum_of_all_memories() {
        let engine = Engine::new().unwrap();
        // 16 pages of 64 KiB; three memories of 1 page to start with.
        let limits = limits(1 << 20);
        let mut store = store(&engine, &limits);
        let component = Component::new(engine.wasmtime(), THREE_MEMORIES).unwrap();
        let instance = Linker::new(engine.wasmtime())
            .instantiate(&mut store, &component)
            .unwrap();
        let grow = instance
            .get_typed_func::<(u32,), (u32,)>(&mut store, "grow")
            .unwrap();
        // 3 + 3 x 4 = 15 pages: all three grows fit.
        assert_eq!(grow.call(&mut store, (4,)).unwrap(), (3,));
        assert_eq!(store.data().limiter.exceeded, None);
        // One more page each: only the first fits (16 pages in all), though
        // each memory alone is far below the limit.
        assert_eq!(grow.call(&mut store, (1,)).unwrap(), (1,));
        assert_eq!(
            store.data().limiter.exceeded,
            Some(((16 + 1) << 16, 1 << 20))
        );
        assert_eq!(store.data().limiter.total_memory(), 1 << 20);
    }

    #[test]
    fn the_number_of_memories_is_capped() {
        let engine = Engine::new().unwrap();
        let limits = Limits {
            max_memories: 2,
            ..Limits::default()
        };
        let mut store = store(&engine, &limits);
        let component = Component::new(engine.wasmtime(), THREE_MEMORIES).unwrap();
        let err = Linker::new(engine.wasmtime())
            .instantiate(&mut store, &component)
            .map(|_| ())
            .unwrap_err();
        assert!(format!("{err:#}").contains("memor"), "{err:#}");
    }

    /// A guest that asks for too much, ignores the refusal and spins.
    const GRAB_THEN_SPIN: &str = r#"
        (component
          (core module $m
            (memory 1)
            (func (export "grab")
              (drop (memory.grow (i32.const 1000)))
              (loop $l (br $l))))
          (core instance $i (instantiate $m))
          (func (export "grab") (canon lift (core func $i "grab"))))
    "#;

    #[test]
    fn a_refused_grow_is_reported_as_memory_even_when_the_guest_then_spins() {
        let engine = Engine::new().unwrap();
        let limits = Limits {
            memory_bytes: 1 << 20,
            cpu_ms: 20,
            ..Limits::default()
        };
        let mut store = store(&engine, &limits);
        let component = Component::new(engine.wasmtime(), GRAB_THEN_SPIN).unwrap();
        let instance = Linker::new(engine.wasmtime())
            .instantiate(&mut store, &component)
            .unwrap();
        let grab = instance
            .get_typed_func::<(), ()>(&mut store, "grab")
            .unwrap();
        // The deadline counts from here, as in `Sandbox::call`, not from
        // before the component was compiled.
        store.set_epoch_deadline(Engine::ticks_for(limits.cpu_ms));
        let err = grab.call(&mut store, ()).unwrap_err();
        assert_eq!(
            err.downcast_ref::<wasmtime::Trap>(),
            Some(&wasmtime::Trap::Interrupt)
        );
        let e = fail(&mut store, "fold", &limits, err);
        assert!(e.is_trap(TrapKind::Memory), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "Memory trap: memory limit exceeded in fold: requested {} bytes of linear memory, limit memory_bytes = 1048576",
                1001 << 16
            )
        );
    }

    #[test]
    fn messages_name_the_export_and_the_limit() {
        let limits = Limits {
            cpu_ms: 250,
            ..Limits::default()
        };
        let limiter = MemoryLimiter::new(&limits);
        let deadline = classify(
            "init",
            &limiter,
            &limits,
            "",
            &wasmtime::Error::from(wasmtime::Trap::Interrupt),
        );
        assert_eq!(
            deadline.to_string(),
            "Deadline trap: CPU time limit exceeded in init, limit cpu_ms = 250"
        );
        let overflow = classify(
            "fold",
            &limiter,
            &limits,
            "",
            &wasmtime::Error::from(wasmtime::Trap::StackOverflow)
                .context("wasm backtrace:\n  0: frame\n  1: frame"),
        );
        assert_eq!(overflow.to_string(), "Other trap: stack overflow in fold");
    }

    #[test]
    fn count_and_table_limits_are_named_by_their_key() {
        let limits = Limits {
            max_instances: 2,
            max_table_elements: 10,
            ..Limits::default()
        };
        let mut limiter = MemoryLimiter::new(&limits);
        // wasmtime's own wording for a count past `ResourceLimiter::instances`.
        let count = wasmtime::Error::msg("resource limit exceeded: instance count too high at 3");
        assert_eq!(
            classify("instantiation", &limiter, &limits, "", &count).to_string(),
            "Other trap: instance count too high at 3 in instantiation, limit max_instances = 2"
        );
        let other = wasmtime::Error::msg("resource limit exceeded: something else");
        assert_eq!(
            classify("fold", &limiter, &limits, "", &other).to_string(),
            "Other trap: resource limit exceeded: something else in fold"
        );
        limiter.table_exceeded = Some((23, 10));
        let table = wasmtime::Error::msg("table minimum size of 23 elements exceeds table limits");
        assert_eq!(
            classify("instantiation", &limiter, &limits, "", &table).to_string(),
            "Other trap: table limit exceeded in instantiation: requested 23 table elements, limit max_table_elements = 10"
        );
    }

    #[test]
    fn output_errors_name_the_limit() {
        let e = CallError::Output {
            what: "project returned",
            size: 1_000_000,
            unit: "ops",
            limit: "max_projection_ops",
            max: 10_000,
        };
        assert_eq!(
            e.to_string(),
            "project returned 1000000 ops, limit max_projection_ops = 10000"
        );
        assert_eq!(e.kind(), "output_too_large");
    }

    #[test]
    fn ops_are_counted_then_weighed() {
        let op = |key: &str| {
            ProjectionOp::Upsert(crate::bindings::Document {
                projection: "p".into(),
                key: key.into(),
                body: b"1".to_vec(),
            })
        };
        let limits = Limits {
            max_projection_ops: 2,
            ..Limits::default()
        };
        assert!(check_ops(&[op("a"), op("b")], &limits).is_ok());
        let e = check_ops(&[op("a"), op("b"), op("c")], &limits).unwrap_err();
        assert_eq!(
            e.to_string(),
            "project returned 3 ops, limit max_projection_ops = 2"
        );
        let small = Limits {
            max_projection_bytes: 2 * (3 + PROJECTION_OP_OVERHEAD),
            ..Limits::default()
        };
        assert!(check_ops(&[op("a"), op("b")], &small).is_ok());
        assert!(check_ops(&[op("a"), op("bb")], &small).is_err());
    }

    #[test]
    fn charging_ops_counts_the_host_overhead() {
        let mut total = 0;
        let max = 10 * (3 + PROJECTION_OP_OVERHEAD);
        for _ in 0..10 {
            charge(&mut total, 3, max).unwrap();
        }
        let e = charge(&mut total, 3, max).unwrap_err();
        assert!(e.to_string().contains("limit max_projection_bytes"), "{e}");
    }
}

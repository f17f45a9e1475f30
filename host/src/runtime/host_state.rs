//! What a plugin's `Store` carries: an empty WASI context, the memory limiter,
//! captured stdio and the `log` import.

use std::time::Duration;

use rand::SeedableRng as _;
use rand::rngs::StdRng;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::limits::{Limits, MemoryLimiter};
use crate::bindings::{self, LogLevel};

/// Per-store state of one plugin instance.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// Enforces `Limits::memory_bytes`.
    pub limiter: MemoryLimiter,
    /// Guest stdout, drained into `tracing` after each call.
    pub stdout: MemoryOutputPipe,
    /// Guest stderr; a Rust guest's panic message lands here.
    pub stderr: MemoryOutputPipe,
    /// How much of each pipe was already forwarded to `tracing`.
    pub forwarded: (usize, usize),
    /// `plugin@version`, the tag on every guest log line.
    pub tag: String,
}

/// A wall clock frozen at the Unix epoch: folds must not depend on time.
struct FrozenWallClock;
impl wasmtime_wasi::HostWallClock for FrozenWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// A monotonic clock that never moves.
struct FrozenMonotonicClock;
impl wasmtime_wasi::HostMonotonicClock for FrozenMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

impl HostState {
    /// A state granting nothing: no preopens, env, args, network; frozen
    /// clocks and constant randomness; stdio captured up to the log limit.
    pub fn new(tag: String, limits: &Limits) -> Self {
        let cap = usize::try_from(limits.max_log_bytes).unwrap_or(64 << 10);
        let stdout = MemoryOutputPipe::new(cap);
        let stderr = MemoryOutputPipe::new(cap);
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(FrozenWallClock)
            .monotonic_clock(FrozenMonotonicClock)
            // std needs *some* random source (e.g. for `HashMap` seeds); a
            // fixed seed keeps replays deterministic.
            .secure_random(StdRng::seed_from_u64(1))
            .insecure_random(StdRng::seed_from_u64(2))
            .insecure_random_seed(0)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(limits.memory_bytes),
            stdout,
            stderr,
            forwarded: (0, 0),
            tag,
        }
    }

    /// Forward guest output written since the last call to `tracing` and
    /// return the new stderr text (which holds a panic message, if any).
    pub fn drain_stdio(&mut self) -> String {
        let out = self.stdout.contents();
        let err = self.stderr.contents();
        let new_out = String::from_utf8_lossy(&out[self.forwarded.0.min(out.len())..]).into_owned();
        let new_err = String::from_utf8_lossy(&err[self.forwarded.1.min(err.len())..]).into_owned();
        self.forwarded = (out.len(), err.len());
        for line in new_out.lines().filter(|l| !l.is_empty()) {
            tracing::info!(target: "refold::guest", plugin = %self.tag, stream = "stdout", "{line}");
        }
        for line in new_err.lines().filter(|l| !l.is_empty()) {
            tracing::warn!(target: "refold::guest", plugin = %self.tag, stream = "stderr", "{line}");
        }
        new_err
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::refold::plugin::log::Host for HostState {
    fn log(&mut self, level: LogLevel, message: String) {
        // The guest controls the message: cap it so a plugin cannot flood logs.
        let message: String = message.chars().take(4096).collect();
        let tag = &self.tag;
        match level {
            LogLevel::Trace => tracing::trace!(target: "refold::guest", plugin = %tag, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "refold::guest", plugin = %tag, "{message}"),
            LogLevel::Info => tracing::info!(target: "refold::guest", plugin = %tag, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "refold::guest", plugin = %tag, "{message}"),
            LogLevel::Error => tracing::error!(target: "refold::guest", plugin = %tag, "{message}"),
        }
    }
}

impl bindings::refold::plugin::types::Host for HostState {}

//! What a plugin's `Store` carries: an empty WASI context, a `wasi:http` that
//! refuses every request, the memory limiter, captured stdio and the `log`
//! import.

use std::time::Duration;

use rand::SeedableRng as _;
use rand::rngs::StdRng;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::bindings::{self, LogLevel};
use crate::limits::{Limits, MemoryLimiter};

/// Per-store state of one plugin instance.
pub struct HostState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    http_hooks: DenyHttp,
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
    /// What the current call may still log.
    pub log_budget: LogBudget,
}

/// The per-call budget on guest log output (the `log` import and the lines
/// of stdout/stderr). One event once produced 44 MB of host log inside its
/// deadline; with this a call costs at most a bounded amount of log, plus one
/// line saying how much was dropped.
#[derive(Debug, Clone, Copy)]
pub struct LogBudget {
    max_lines: u64,
    max_bytes: u64,
    lines: u64,
    bytes: u64,
    /// Lines dropped during the current call.
    pub dropped: u64,
}

impl LogBudget {
    /// A fresh budget for one call under `limits`.
    pub fn new(limits: &Limits) -> Self {
        LogBudget {
            max_lines: limits.max_log_lines_per_call,
            max_bytes: limits.max_log_bytes_per_call,
            lines: 0,
            bytes: 0,
            dropped: 0,
        }
    }

    /// Whether a line of `len` bytes may still be forwarded; counts it either way.
    pub fn admit(&mut self, len: usize) -> bool {
        let len = len as u64;
        if self.lines < self.max_lines && self.bytes.saturating_add(len) <= self.max_bytes {
            self.lines += 1;
            self.bytes += len;
            true
        } else {
            self.dropped += 1;
            false
        }
    }

    /// Start a new call.
    pub fn reset(&mut self) {
        self.lines = 0;
        self.bytes = 0;
        self.dropped = 0;
    }
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
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(HTTP_FIELDS_BYTES);
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        HostState {
            wasi,
            http,
            http_hooks: DenyHttp,
            table,
            limiter: MemoryLimiter::new(limits),
            stdout,
            stderr,
            forwarded: (0, 0),
            tag,
            log_budget: LogBudget::new(limits),
        }
    }

    /// Reset what describes one call: the refused grow and the log budget.
    pub fn begin_call(&mut self) {
        self.limiter.exceeded = None;
        self.limiter.table_exceeded = None;
        self.log_budget.reset();
    }

    /// End a call of `export`: say once how many log lines were dropped, and
    /// return that number (for metrics).
    pub fn end_call(&mut self, export: &str) -> u64 {
        let dropped = self.log_budget.dropped;
        if dropped > 0 {
            tracing::warn!(
                target: "refold::guest",
                plugin = %self.tag,
                "log truncated: {dropped} lines dropped in {export} (limit max_log_lines_per_call = {}, max_log_bytes_per_call = {})",
                self.log_budget.max_lines,
                self.log_budget.max_bytes,
            );
        }
        dropped
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
            if !self.log_budget.admit(line.len()) {
                continue;
            }
            tracing::info!(target: "refold::guest", plugin = %self.tag, stream = "stdout", "{line}");
        }
        for line in new_err.lines().filter(|l| !l.is_empty()) {
            if !self.log_budget.admit(line.len()) {
                continue;
            }
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

/// Most resources a plugin instance may hold at once (streams, `wasi:http`
/// fields and requests, ...). The guest's memory limit does not see host-side
/// resources, so without a cap a loop creating them inside one call's CPU
/// deadline grows the host's memory. A plugin needs a handful (its stdio
/// streams); past the cap the constructor traps.
pub const MAX_RESOURCES: usize = 1024;

/// Bytes of headers one `wasi:http` `fields` resource may hold; with
/// [`MAX_RESOURCES`] and [`HTTP_BODY_CHUNK_BYTES`], what `wasi:http` can make
/// the host hold for a plugin stays in the low megabytes.
pub const HTTP_FIELDS_BYTES: usize = 4 << 10;

/// Bytes one write to an outgoing request body may carry (one chunk buffered).
pub const HTTP_BODY_CHUNK_BYTES: usize = 1 << 10;

/// `wasi:http` for plugins: every interface links, so components built with a
/// toolchain's defaults (componentize-js and jco import `wasi:http` for
/// `fetch`) load without flags, and every outgoing request is answered with
/// `HTTP-request-denied`. Nothing leaves the sandbox: this crate is built
/// without wasmtime-wasi-http's default client.
#[derive(Debug, Clone, Copy)]
struct DenyHttp;

impl WasiHttpHooks for DenyHttp {
    fn send_request(
        &mut self,
        _request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<
        dyn Future<
                Output = wasmtime_wasi_http::Result<(
                    http::Response<wasmtime_wasi_http::WasiBody>,
                    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
                )>,
            > + Send,
    > {
        Box::new(std::future::ready(Err(
            wasmtime_wasi_http::Error::HttpRequestDenied,
        )))
    }

    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        HTTP_BODY_CHUNK_BYTES
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_hooks,
        }
    }
}

impl bindings::refold::plugin::log::Host for HostState {
    fn log(&mut self, level: LogLevel, message: String) {
        // The guest controls the message: cap it so a plugin cannot flood logs.
        let message: String = message.chars().take(4096).collect();
        if !self.log_budget.admit(message.len()) {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::refold::plugin::log::Host as _;

    #[test]
    fn the_log_budget_drops_lines_past_the_limit_and_counts_them() {
        let limits = Limits {
            max_log_lines_per_call: 3,
            max_log_bytes_per_call: 1_000,
            ..Limits::default()
        };
        let mut s = HostState::new("probe@1".into(), &limits);
        s.begin_call();
        for i in 0..10 {
            s.log(LogLevel::Info, format!("line {i}"));
        }
        assert_eq!(s.log_budget.dropped, 7);
        assert_eq!(s.end_call("fold"), 7);
        // The next call starts with a fresh budget.
        s.begin_call();
        s.log(LogLevel::Info, "again".into());
        assert_eq!(s.end_call("fold"), 0);
    }

    #[test]
    fn the_log_budget_counts_bytes_too() {
        let mut b = LogBudget::new(&Limits {
            max_log_lines_per_call: 100,
            max_log_bytes_per_call: 10,
            ..Limits::default()
        });
        assert!(b.admit(6));
        assert!(!b.admit(6));
        assert!(b.admit(4));
        assert_eq!(b.dropped, 1);
    }
}

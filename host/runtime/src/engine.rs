//! The one wasmtime `Engine` of the process, the one `Linker` every plugin
//! is instantiated through, and the epoch ticker.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use wasmtime::component::{HasSelf, Linker};

use crate::bindings::Projector;
use crate::compile_cache::CompileCache;
use crate::host_state::HostState;

/// How often the epoch advances. CPU deadlines are expressed in ticks of this
/// length, so it bounds how late an over-budget guest is interrupted.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The shared engine. Cloning is cheap (it is an `Arc` inside).
#[derive(Clone)]
pub struct Engine {
    inner: wasmtime::Engine,
    /// WASI (no files, env, args, network; frozen clocks) and the host's
    /// `log` import: all a plugin may import.
    linker: Arc<Linker<HostState>>,
    /// Compiled components kept on disk by digest, when configured.
    cache: Option<Arc<CompileCache>>,
    _ticker: Arc<Ticker>,
}

struct Ticker {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Engine {
    /// Build the engine with the settings every plugin runs under.
    pub fn new() -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        // Plugins are components (WIT world `projector`).
        config.wasm_component_model(true);
        // Epoch interruption is the cheap way to bound CPU time per call: a
        // ticker thread bumps the epoch, each call sets a deadline in ticks.
        config.epoch_interruption(true);
        let inner = wasmtime::Engine::new(&config)
            .map_err(|e| anyhow::anyhow!("creating the wasmtime engine: {e:#}"))?;
        let mut linker: Linker<HostState> = Linker::new(&inner);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| anyhow::anyhow!("linking WASI: {e:#}"))?;
        // Deny-all (see `HostState`'s `WasiHttpView`): links so that
        // components importing it load, and refuses every request.
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker)
            .map_err(|e| anyhow::anyhow!("linking wasi:http: {e:#}"))?;
        Projector::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| anyhow::anyhow!("linking the host's imports: {e:#}"))?;

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let weak = inner.weak();
        let stop2 = stop.clone();
        std::thread::Builder::new()
            .name("refold-epoch".into())
            .spawn(move || {
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .context("spawning the epoch ticker")?;
        Ok(Engine {
            inner,
            linker: Arc::new(linker),
            cache: None,
            _ticker: Arc::new(Ticker { stop }),
        })
    }

    /// The same engine, keeping the components it compiles in `dir` and
    /// loading them from there by digest.
    pub fn with_compile_cache(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.cache = Some(Arc::new(CompileCache::new(dir, &self.inner)));
        self
    }

    /// The compile cache, when there is one.
    pub fn compile_cache(&self) -> Option<&CompileCache> {
        self.cache.as_deref()
    }

    /// The wasmtime engine.
    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner
    }

    /// The linker every plugin is instantiated through.
    pub fn linker(&self) -> &Linker<HostState> {
        &self.linker
    }

    /// Deadline in epoch ticks for a CPU budget in milliseconds (at least one).
    pub fn ticks_for(cpu_ms: u64) -> u64 {
        (cpu_ms / EPOCH_TICK.as_millis() as u64).max(1)
    }

    /// Deadline in epoch ticks for what is left of a budget (at least one).
    pub fn ticks_for_duration(left: Duration) -> u64 {
        let tick = EPOCH_TICK.as_micros().max(1);
        u64::try_from(left.as_micros().div_ceil(tick))
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

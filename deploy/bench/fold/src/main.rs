//! `fold` benchmark: the bank plugin's fold as WebAssembly components (through
//! the host's runtime, conversions included; one or more builds, e.g. the
//! plugin written in Rust, JavaScript and Python) versus the same Rust logic
//! compiled natively, over the same in-memory events, at several batch sizes.
//! Per component also its compile time, its load time from the compile cache
//! and the memory one loaded plugin with one instance adds.
//!
//! Rounds of all sides alternate, so that machine noise lands on each and
//! cancels in the ratios. See README.md.

mod native;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use refold_runtime::{Engine, Limits, Plugin, Sandbox};
use refold_types::StoredEvent;
use refold_types::event::EntityKey;
use serde_json::{Value, json};

/// Events in the pool the batches are cut from.
const POOL: usize = 4096;
const ENTITY: &str = "acc-000042";

struct Args {
    json: PathBuf,
    components: Vec<PathBuf>,
    rounds: usize,
    round: Duration,
    sizes: Vec<usize>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../..")
}

fn usage() -> &'static str {
    "usage: refold-bench-fold [--json FILE] [--component FILE]... [--rounds N] [--round-ms MS] [--sizes 1,16,256,4096]"
}

fn parse_args() -> anyhow::Result<Args> {
    let root = repo_root();
    let mut a = Args {
        json: root.join("target/bench/fold.json"),
        components: Vec::new(),
        rounds: 5,
        round: Duration::from_millis(200),
        sizes: vec![1, 16, 256, 4096],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{arg} needs a value\n{}", usage()))
        };
        match arg.as_str() {
            "--json" => a.json = value()?.into(),
            "--component" => a.components.push(value()?.into()),
            "--rounds" => a.rounds = value()?.parse()?,
            "--round-ms" => a.round = Duration::from_millis(value()?.parse()?),
            "--sizes" => {
                a.sizes = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()?
            }
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{}", usage()),
        }
    }
    if a.components.is_empty() {
        a.components.push(root.join("examples/bank/bank.wasm"));
    }
    if a.rounds == 0 || a.sizes.iter().any(|&s| s == 0 || s > POOL) {
        bail!("rounds must be > 0 and sizes within 1..={POOL}");
    }
    Ok(a)
}

/// A deterministic pseudo-random sequence (xorshift), so that every run folds
/// the same events.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One account's history, shaped like deploy/local/bench's generator: an
/// opening, then deposits and withdrawals, with UUID-like ids, a source per
/// branch and RFC 3339 times.
fn generate() -> Vec<StoredEvent> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..POOL)
        .map(|i| {
            let r = rng.next();
            let (event_type, data) = if i == 0 {
                ("account.opened", json!({ "owner": "owner-42" }))
            } else if i % 3 == 0 {
                ("account.withdrawn", json!({ "amount": 100 + r % 900 }))
            } else {
                ("account.deposited", json!({ "amount": 250 + r % 5000 }))
            };
            let secs = 1_735_689_600 + i as u64 * 37;
            let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
            StoredEvent {
                key: EntityKey::new("account", ENTITY),
                position: i as u64 + 1,
                id: format!(
                    "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
                    r >> 32,
                    (r >> 16) & 0xffff,
                    r & 0xfff,
                    (r >> 20) & 0xfff,
                    rng.next() & 0xffff_ffff_ffff
                ),
                source: format!("/bank/branch-{}/teller", r % 17),
                event_type: event_type.into(),
                time: Some(format!(
                    "2025-01-{:02}T{h:02}:{m:02}:{s:02}.{:03}Z",
                    1 + (secs - 1_735_689_600) / 86_400,
                    r % 1000
                )),
                data: refold_types::event::RawJson::from_value(&data),
                origin: None,
                record: None,
                digest: None,
            }
        })
        .collect()
}

/// Runs `step` (one batch of `size` events) until `round` has passed; events/s.
fn round(
    round: Duration,
    size: usize,
    mut step: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut n = 0usize;
    let mut events = 0usize;
    loop {
        step(n)?;
        n += 1;
        events += size;
        let elapsed = started.elapsed();
        if elapsed >= round {
            return Ok(events as f64 / elapsed.as_secs_f64());
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Resident set size of this process, in bytes (VmRSS of /proc/self/status).
fn rss_bytes() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .context("no VmRSS in /proc/self/status")?;
    Ok(kb * 1024)
}

fn mib(bytes: f64) -> f64 {
    (bytes / (1024.0 * 1024.0) * 10.0).round() / 10.0
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// One component under test: loaded from its compile cache, with the
/// instance the rounds run in.
struct Component {
    label: String,
    path: PathBuf,
    bytes: usize,
    plugin: std::sync::Arc<Plugin>,
    sandbox: Sandbox,
    compile: Duration,
    cached_loads: Vec<Duration>,
    rss_before: u64,
    rss_after: u64,
    /// Events/s of each round, per batch size.
    rounds: Vec<Vec<f64>>,
    /// The first call after each recycle, per batch size.
    first_calls: Vec<Vec<Duration>>,
    init_rate: f64,
    /// Keeps the engine (and its epoch ticker) of the sandbox alive.
    _engine: Engine,
}

fn load(engine: &Engine, bytes: &[u8], limits: Limits) -> anyhow::Result<std::sync::Arc<Plugin>> {
    Plugin::load(engine, bytes, limits).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Cached loads timed per component (each on a new engine, as a host start).
const CACHED_LOADS: usize = 5;

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // The bench's batches are large and run back to back: lift the per-call
    // CPU budget so that a slow machine does not turn a round into a trap.
    let limits = Limits {
        cpu_ms: 60_000,
        ..Limits::default()
    };

    // Labels: file stems, made unique.
    let mut labels: Vec<String> = Vec::new();
    for p in &args.components {
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "component".into());
        let mut label = stem.clone();
        let mut k = 2;
        while labels.contains(&label) {
            label = format!("{stem}-{k}");
            k += 1;
        }
        labels.push(label);
    }
    let cache_root = std::env::temp_dir().join(format!("refold-bench-fold-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache_root);
    let result = run(&args, &labels, &cache_root, limits);
    let _ = std::fs::remove_dir_all(&cache_root);
    result
}

fn run(args: &Args, labels: &[String], cache_root: &Path, limits: Limits) -> anyhow::Result<()> {
    // Compile and cached-load times, one component after the other, each in
    // a compile cache of its own that starts empty.
    let mut files = Vec::new();
    let mut timings = Vec::new();
    for (path, label) in args.components.iter().zip(labels) {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let dir = cache_root.join(label);
        let compile = {
            let engine = Engine::new()?.with_compile_cache(&dir);
            let t = Instant::now();
            let plugin = load(&engine, &bytes, limits)?;
            let d = t.elapsed();
            let (hits, misses) = engine.compile_cache().map_or((0, 0), |c| c.counts());
            if hits != 0 || misses != 1 {
                bail!(
                    "{label}: the first load should miss an empty cache (hits {hits}, misses {misses})"
                );
            }
            drop(plugin);
            d
        };
        let mut cached_loads = Vec::new();
        for _ in 0..CACHED_LOADS {
            let engine = Engine::new()?.with_compile_cache(&dir);
            let t = Instant::now();
            let plugin = load(&engine, &bytes, limits)?;
            cached_loads.push(t.elapsed());
            let (hits, misses) = engine.compile_cache().map_or((0, 0), |c| c.counts());
            if hits != 1 || misses != 0 {
                bail!(
                    "{label}: a load after the first should hit the cache (hits {hits}, misses {misses})"
                );
            }
            drop(plugin);
        }
        eprintln!(
            "{label}: {} bytes, compile {:.1} ms, cached load {:.1} ms",
            bytes.len(),
            ms(compile),
            median(cached_loads.iter().map(|d| ms(*d)).collect())
        );
        timings.push((compile, cached_loads));
        files.push(bytes);
    }

    // Memory of one loaded plugin with one instance, in the order given:
    // RSS before and after a cached load, a sandbox and one `init` call, in
    // this one process (every earlier plugin stays loaded).
    let mut comps = Vec::new();
    for (((path, label), bytes), (compile, cached_loads)) in
        args.components.iter().zip(labels).zip(&files).zip(timings)
    {
        let engine = Engine::new()?.with_compile_cache(cache_root.join(label));
        let rss_before = rss_bytes()?;
        let plugin = load(&engine, bytes, limits)?;
        let mut sandbox = Sandbox::new(plugin.clone());
        std::hint::black_box(
            refold_runtime::fold::init_state(&mut sandbox, ENTITY)
                .map_err(|e| anyhow::anyhow!("{label}: init: {e}"))?,
        );
        let rss_after = rss_bytes()?;
        comps.push(Component {
            label: label.clone(),
            path: path.clone(),
            bytes: bytes.len(),
            plugin,
            sandbox,
            compile,
            cached_loads,
            rss_before,
            rss_after,
            rounds: Vec::new(),
            first_calls: Vec::new(),
            init_rate: 0.0,
            _engine: engine,
        });
    }

    let events = generate();
    // Batches start from an opened account with some history.
    let start: Value =
        json!({ "owner": "owner-42", "balance": 125_000, "transactions": 17, "open": true });
    let start_bytes = serde_json::to_vec(&start)?;

    let mut rows = Vec::new();
    for &size in &args.sizes {
        let slices: Vec<&[StoredEvent]> = events.chunks_exact(size).collect();
        let natives = slices
            .iter()
            .map(|s| native::Batch::new(s))
            .collect::<anyhow::Result<Vec<_>>>()?;

        // Every component must compute native's state before its speed means anything.
        for (s, n) in slices.iter().zip(&natives).take(4) {
            let n: Value = serde_json::from_slice(&native::fold(&start_bytes, n)?)?;
            for c in &mut comps {
                let o = refold_runtime::fold::fold_and_project(
                    &mut c.sandbox,
                    ENTITY,
                    start.clone(),
                    s,
                    false,
                );
                if let Some((i, e)) = o.failure {
                    bail!("{}: component fold failed at event {i}: {e}", c.label);
                }
                if n != o.state {
                    bail!("native and {} disagree: {n} vs {}", c.label, o.state);
                }
            }
        }

        let mut nat = Vec::new();
        for c in &mut comps {
            c.rounds.push(Vec::new());
            c.first_calls.push(Vec::new());
        }
        for _ in 0..args.rounds {
            nat.push(round(args.round, size, |i| {
                let out = native::fold(&start_bytes, &natives[i % natives.len()])?;
                std::hint::black_box(out);
                Ok(())
            })?);
            for c in &mut comps {
                // The pipeline recycles instances between its batches; a
                // round stands for one long pipeline batch. The first call
                // on the new instance (instantiation and the guest's first
                // touches of its memory) is timed apart, not in the round.
                c.sandbox.recycle();
                let label = c.label.clone();
                let sandbox = &mut c.sandbox;
                let mut step = |i: usize| {
                    let o = refold_runtime::fold::fold_and_project(
                        sandbox,
                        ENTITY,
                        start.clone(),
                        slices[i % slices.len()],
                        false,
                    );
                    if let Some((i, e)) = o.failure {
                        bail!("{label}: component fold failed at event {i}: {e}");
                    }
                    std::hint::black_box(o.state);
                    Ok(())
                };
                let t = Instant::now();
                step(0)?;
                let first = t.elapsed();
                let rate = round(args.round, size, |i| step(i + 1))?;
                c.rounds.last_mut().expect("pushed above").push(rate);
                c.first_calls.last_mut().expect("pushed above").push(first);
            }
        }
        let n = median(nat.clone());
        let per: Vec<Value> = comps
            .iter()
            .map(|c| {
                let r = c.rounds.last().expect("pushed above");
                let f = c.first_calls.last().expect("pushed above");
                let m = median(r.clone());
                json!({
                    "label": c.label,
                    "events_per_s": m.round() as u64,
                    "ratio": (m / n * 1000.0).round() / 1000.0,
                    "rounds": r.iter().map(|x| x.round() as u64).collect::<Vec<_>>(),
                    "first_call_ms": median(f.iter().map(|d| ms(*d)).collect()),
                    "first_call_rounds_ms": f.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut row = json!({
            "batch": size,
            "native_events_per_s": n.round() as u64,
            "native_rounds": nat.iter().map(|x| x.round() as u64).collect::<Vec<_>>(),
        });
        // The first component also under the keys of the one-component JSON.
        if let Some(first) = per.first() {
            row["component_events_per_s"] = first["events_per_s"].clone();
            row["ratio"] = first["ratio"].clone();
            row["component_rounds"] = first["rounds"].clone();
        }
        row["components"] = Value::Array(per);
        rows.push(row);
    }

    // `init` runs once per new entity: its rate says whether it matters at batch 1.
    for c in &mut comps {
        c.sandbox.recycle();
        let sandbox = &mut c.sandbox;
        c.init_rate = median(
            (0..args.rounds)
                .map(|_| {
                    round(args.round, 1, |_| {
                        std::hint::black_box(
                            refold_runtime::fold::init_state(sandbox, ENTITY)
                                .map_err(|e| anyhow::anyhow!("{e}"))?,
                        );
                        Ok(())
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
        );
    }

    println!(
        "fold: bank plugin, {} component(s) vs native; median of {} alternating rounds of {} ms",
        comps.len(),
        args.rounds,
        args.round.as_millis()
    );
    let mut head = format!("{:>6}  {:>12}", "batch", "native ev/s");
    for c in &comps {
        head += &format!(
            "  {:>14}  {:>7}  {:>9}",
            format!("{} ev/s", c.label),
            "ratio",
            "1st ms"
        );
    }
    println!("{head}");
    for r in &rows {
        let mut line = format!(
            "{:>6}  {:>12}",
            r["batch"].to_string(),
            r["native_events_per_s"].to_string()
        );
        for c in r["components"].as_array().into_iter().flatten() {
            line += &format!(
                "  {:>14}  {:>6.3}x  {:>9.1}",
                c["events_per_s"].to_string(),
                c["ratio"].as_f64().unwrap_or(0.0),
                c["first_call_ms"].as_f64().unwrap_or(0.0)
            );
        }
        println!("{line}");
    }
    println!(
        "(1st ms: the first fold after each recycle, instantiation included, not in the rate)"
    );
    println!();
    println!(
        "{:<10}  {:>10}  {:>11}  {:>15}  {:>13}  {:>12}",
        "component", "bytes", "compile ms", "cached load ms", "RSS delta MiB", "init calls/s"
    );
    for c in &comps {
        println!(
            "{:<10}  {:>10}  {:>11.1}  {:>15.1}  {:>13.1}  {:>12.0}",
            c.label,
            c.bytes,
            ms(c.compile),
            median(c.cached_loads.iter().map(|d| ms(*d)).collect()),
            mib(c.rss_after as f64 - c.rss_before as f64),
            c.init_rate
        );
    }

    let components: Vec<Value> = comps
        .iter()
        .map(|c| {
            json!({
                "label": c.label,
                "path": c.path.display().to_string(),
                "plugin": c.plugin.tag(),
                "bytes": c.bytes,
                "sha256": c.plugin.digest,
                "compile_ms": ms(c.compile),
                "cached_load_ms": median(c.cached_loads.iter().map(|d| ms(*d)).collect()),
                "cached_load_rounds_ms": c.cached_loads.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
                "rss_before_mib": mib(c.rss_before as f64),
                "rss_after_mib": mib(c.rss_after as f64),
                "rss_delta_mib": mib(c.rss_after as f64 - c.rss_before as f64),
                "init_calls_per_s": c.init_rate.round() as u64,
            })
        })
        .collect();
    let first = &comps[0];
    let out = json!({
        "scenario": "fold",
        "plugin": first.plugin.tag(),
        "component": {
            "path": first.path.display().to_string(),
            "bytes": first.bytes,
            "sha256": first.plugin.digest,
        },
        "components": components,
        "rounds": args.rounds,
        "round_ms": args.round.as_millis() as u64,
        "results": rows,
        "init_calls_per_s": first.init_rate.round() as u64,
        "method": {
            "compile_ms": "Plugin::load on a new Engine with an empty compile cache directory (compile, store in the cache, describe)",
            "cached_load_ms": format!("median of {CACHED_LOADS} Plugin::load on a new Engine each, on the filled cache directory"),
            "first_call_ms": "the first fold_and_project after each recycle (instantiation included), median over the rounds; not counted in events_per_s",
            "rss_delta_mib": "VmRSS before and after a cached Plugin::load, Sandbox::new and one init call, in one process, components in the order given, earlier ones still loaded",
        },
        "machine": {
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
            "rustc": env!("BENCH_RUSTC_VERSION"),
            "wasmtime": env!("BENCH_WASMTIME_VERSION"),
        },
    });
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&out)? + "\n")
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("wrote {}", args.json.display());
    Ok(())
}

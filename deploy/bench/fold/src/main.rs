//! `fold` benchmark: the bank plugin's fold as a WebAssembly component (through
//! the host's runtime, conversions included) versus the same Rust logic
//! compiled natively, over the same in-memory events, at several batch sizes.
//!
//! Rounds of the two sides alternate, so that machine noise lands on both and
//! cancels in the ratio. See README.md.

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
    component: PathBuf,
    rounds: usize,
    round: Duration,
    sizes: Vec<usize>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../..")
}

fn usage() -> &'static str {
    "usage: refold-bench-fold [--json FILE] [--component FILE] [--rounds N] [--round-ms MS] [--sizes 1,16,256,4096]"
}

fn parse_args() -> anyhow::Result<Args> {
    let root = repo_root();
    let mut a = Args {
        json: root.join("target/bench/fold.json"),
        component: root.join("examples/bank/bank.wasm"),
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
            "--component" => a.component = value()?.into(),
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

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let bytes = std::fs::read(&args.component)
        .with_context(|| format!("reading {}", args.component.display()))?;
    let engine = Engine::new()?;
    // The bench's batches are large and run back to back: lift the per-call
    // CPU budget so that a slow machine does not turn a round into a trap.
    let limits = Limits {
        cpu_ms: 60_000,
        ..Limits::default()
    };
    let plugin = Plugin::load(&engine, &bytes, limits).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut sandbox = Sandbox::new(plugin.clone());

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

        // Both sides must compute the same state before their speed means anything.
        for (s, n) in slices.iter().zip(&natives).take(4) {
            let c = refold_runtime::fold::fold_and_project(
                &mut sandbox,
                ENTITY,
                start.clone(),
                s,
                false,
            );
            if let Some((i, e)) = c.failure {
                bail!("component fold failed at event {i}: {e}");
            }
            let n: Value = serde_json::from_slice(&native::fold(&start_bytes, n)?)?;
            if n != c.state {
                bail!("native and component disagree: {n} vs {}", c.state);
            }
        }

        let (mut nat, mut comp) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            nat.push(round(args.round, size, |i| {
                let out = native::fold(&start_bytes, &natives[i % natives.len()])?;
                std::hint::black_box(out);
                Ok(())
            })?);
            // The pipeline recycles instances between its batches; a round
            // stands for one long pipeline batch.
            sandbox.recycle();
            comp.push(round(args.round, size, |i| {
                let o = refold_runtime::fold::fold_and_project(
                    &mut sandbox,
                    ENTITY,
                    start.clone(),
                    slices[i % slices.len()],
                    false,
                );
                if let Some((i, e)) = o.failure {
                    bail!("component fold failed at event {i}: {e}");
                }
                std::hint::black_box(o.state);
                Ok(())
            })?);
        }
        let (n, c) = (median(nat.clone()), median(comp.clone()));
        rows.push(json!({
            "batch": size,
            "native_events_per_s": n.round() as u64,
            "component_events_per_s": c.round() as u64,
            "ratio": (c / n * 1000.0).round() / 1000.0,
            "native_rounds": nat.iter().map(|x| x.round() as u64).collect::<Vec<_>>(),
            "component_rounds": comp.iter().map(|x| x.round() as u64).collect::<Vec<_>>(),
        }));
    }

    // `init` runs once per new entity: its rate says whether it matters at batch 1.
    sandbox.recycle();
    let init_rate = median(
        (0..args.rounds)
            .map(|_| {
                round(args.round, 1, |_| {
                    std::hint::black_box(
                        refold_runtime::fold::init_state(&mut sandbox, ENTITY)
                            .map_err(|e| anyhow::anyhow!("{e}"))?,
                    );
                    Ok(())
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
    );

    println!(
        "fold: bank plugin, component ({}) vs native; median of {} alternating rounds of {} ms",
        args.component.display(),
        args.rounds,
        args.round.as_millis()
    );
    println!(
        "{:>6}  {:>14}  {:>14}  {:>6}",
        "batch", "native ev/s", "component ev/s", "ratio"
    );
    for r in &rows {
        println!(
            "{:>6}  {:>14}  {:>14}  {:>5.3}x",
            r["batch"].to_string(),
            r["native_events_per_s"].to_string(),
            r["component_events_per_s"].to_string(),
            r["ratio"].as_f64().unwrap_or(0.0)
        );
    }
    println!("init: {:.0} calls/s", init_rate);

    let out = json!({
        "scenario": "fold",
        "plugin": plugin.tag(),
        "component": {
            "path": args.component.display().to_string(),
            "bytes": bytes.len(),
            "sha256": plugin.digest,
        },
        "rounds": args.rounds,
        "round_ms": args.round.as_millis() as u64,
        "results": rows,
        "init_calls_per_s": init_rate.round() as u64,
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

//! `refold demo`: the quick start. Folds the bank and orders examples with
//! the embedded pipeline and prints the states as a table.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use serde_json::json;

use refold_engine::app::App;
use refold_engine::config::HostConfig as Config;
use refold_engine::pipeline::{Entities, entities_of};
use refold_source::jsonl::JsonlSource;

/// Find the examples directory.
pub fn examples_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d.to_path_buf());
    }
    let here = PathBuf::from("examples");
    if here.join("bank").exists() {
        return Ok(here);
    }
    let tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    anyhow::ensure!(
        tree.join("bank").exists(),
        "no examples directory found; pass --examples DIR"
    );
    Ok(tree)
}

/// Run the demo.
pub async fn demo(
    examples: Option<&Path>,
    generate: usize,
    json_out: Option<&Path>,
) -> anyhow::Result<()> {
    let dir = examples_dir(examples)?;
    let work = tempdir()?;
    let mut config = Config::default();
    config.store.path = work.join("demo.db");
    config.plugins.files = vec![dir.join("bank/bank.wasm"), dir.join("orders/orders.wasm")];
    for f in &config.plugins.files {
        anyhow::ensure!(
            f.exists(),
            "{} is missing: build it with plugins/build.sh",
            f.display()
        );
    }
    let paths = vec![
        dir.join("bank/events.jsonl"),
        dir.join("orders/events.jsonl"),
    ];
    let app = App::open(config.clone()).await?;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let source = JsonlSource::new(&paths, &[], false, std::time::Duration::ZERO);
    let report = app.consume(Box::new(source), rx.clone(), |_| {}).await?;
    let took = started.elapsed();

    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<8} {:<10} {:>4}  STATE", "TYPE", "ID", "POS")?;
    for entity_type in ["account", "order"] {
        let Entities {
            keys,
            records: recs,
        } = entities_of(&*app.host.storage, entity_type, usize::MAX).await?;
        for k in &keys {
            let Some(r) = recs.get(k) else { continue };
            let mut state = r
                .state
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into());
            if r.quarantined {
                state.push_str("  [quarantined]");
            }
            writeln!(
                out,
                "{:<8} {:<10} {:>4}  {}",
                entity_type, k.entity_id, r.position, state
            )?;
        }
    }
    let dead = app.host.storage.dead_letters(10_000).await?;
    let quarantined = app.host.storage.quarantined().await?;
    writeln!(out)?;
    writeln!(
        out,
        "{} records: {} applied, {} duplicates ignored, {} dead letters, {} quarantined, in {:.1} ms",
        report.records,
        report.applied,
        report.duplicates,
        dead.len(),
        quarantined.len(),
        took.as_secs_f64() * 1000.0
    )?;
    for d in dead.iter().take(10) {
        writeln!(out, "  dead letter {}: {}", d.id, d.reason)?;
    }
    for q in &quarantined {
        writeln!(
            out,
            "  quarantined {} at event {}: {}",
            q.key, q.event_id, q.error
        )?;
    }
    drop(out);

    let mut figures =
        json!({"examples": {"records": report.records, "seconds": took.as_secs_f64()}});
    if generate > 0 {
        let file = work.join("generated.jsonl");
        generate_bank(&file, generate)?;
        let mut cfg = config;
        cfg.store.path = work.join("bench.db");
        cfg.source.batch_size = 1000;
        let app = App::open(cfg).await?;
        let started = Instant::now();
        let source = JsonlSource::new(&[file], &[], false, std::time::Duration::ZERO);
        let r = app.consume(Box::new(source), rx, |_| {}).await?;
        let secs = started.elapsed().as_secs_f64();
        let rate = r.applied as f64 / secs;
        crate::cli::out::outln!(
            "generated: {} events folded in {:.2} s = {:.0} events/s (batch 1000, SQLite FULL sync)",
            r.applied,
            secs,
            rate
        );
        figures["generated"] = json!({"events": r.applied, "seconds": secs, "events_per_second": rate, "batch_size": 1000});
    }
    if let Some(p) = json_out {
        std::fs::write(p, serde_json::to_string_pretty(&figures)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("refold-demo-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Write `n` bank events over `n / 50 + 1` accounts: one open, then deposits
/// and withdrawals.
pub fn generate_bank(path: &Path, n: usize) -> anyhow::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    let accounts = n / 50 + 1;
    for i in 0..n {
        let acc = i % accounts;
        let (ty, data) = if i < accounts {
            ("account.opened", json!({"owner": format!("owner-{acc}")}))
        } else if i % 3 == 0 {
            ("account.withdrawn", json!({"amount": 100}))
        } else {
            ("account.deposited", json!({"amount": 250}))
        };
        let e = json!({"specversion":"1.0","id":format!("g-{i}"),"source":"/gen","type":ty,
                       "subject":format!("gen-{acc}"),"entitytype":"account","data":data});
        writeln!(w, "{e}")?;
    }
    w.flush()?;
    Ok(())
}

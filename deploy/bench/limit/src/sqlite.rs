//! The limit pipeline of the embedded benchmark: the fastest plain loop
//! that makes every line of a JSONL file durable in SQLite, with the same
//! driver and durability as the host's embedded store (rusqlite, WAL,
//! `synchronous=FULL`, one transaction per batch) and none of its work: no
//! validation, no deduplication, no fold, no state, no projections.
//! refold embedded's rate divided by this one says what the engine costs on
//! top of making the bytes durable.
//!
//! ```text
//! refold-bench-limit-sqlite --file EVENTS.jsonl --db FILE [--batch N] [--json FILE]
//! ```
//!
//! Each line is inserted as it was read into `raw_events (seq, record)` with
//! one prepared statement; every `batch` lines are one committed
//! transaction. It prints one JSON line `{"events","seconds",
//! "events_per_second",...}`; `seconds` runs from the first line read to the
//! last transaction committed.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "refold-bench-limit-sqlite", about)]
struct Args {
    /// The JSONL file to persist.
    #[arg(long)]
    file: PathBuf,
    /// The SQLite file to write (must not exist).
    #[arg(long)]
    db: PathBuf,
    /// Lines per transaction (the host's `source.batch_size`).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Also write the result to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.batch > 0, "--batch must be positive");
    anyhow::ensure!(
        !args.db.exists(),
        "{} exists: the limit writes a fresh database",
        args.db.display()
    );
    let mut db = rusqlite::Connection::open(&args.db)
        .with_context(|| format!("opening {}", args.db.display()))?;
    // The host's embedded store: write-ahead log, a full sync per commit.
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.execute_batch("CREATE TABLE raw_events (seq INTEGER PRIMARY KEY, record TEXT NOT NULL)")?;
    let file = std::fs::File::open(&args.file)
        .with_context(|| format!("opening {}", args.file.display()))?;
    let mut lines = std::io::BufReader::new(file).lines();
    let mut events: u64 = 0;
    let mut transactions: u64 = 0;
    let mut started: Option<Instant> = None;
    loop {
        let tx = db.transaction()?;
        let mut n = 0;
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO raw_events (seq, record) VALUES (:seq, :record)")?;
            for line in lines.by_ref() {
                let line = line.context("reading the events")?;
                if line.trim().is_empty() {
                    continue;
                }
                started.get_or_insert_with(Instant::now);
                events += 1;
                insert.execute(rusqlite::named_params! {":seq": events as i64, ":record": line})?;
                n += 1;
                if n == args.batch {
                    break;
                }
            }
        }
        tx.commit()?;
        if n == 0 {
            break;
        }
        transactions += 1;
    }
    let seconds = started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
    let out = serde_json::json!({
        "events": events,
        "transactions": transactions,
        "batch": args.batch,
        "seconds": seconds,
        "events_per_second": if seconds > 0.0 { events as f64 / seconds } else { 0.0 },
        "durability": "WAL, synchronous=FULL, one transaction per batch",
    });
    println!("{out}");
    if let Some(p) = &args.json {
        std::fs::write(p, out.to_string()).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

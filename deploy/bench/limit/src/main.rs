//! The limit pipeline of the cluster benchmark: the fastest plain consumer
//! that reads a topic and makes every record durable in Cassandra, with the
//! same clients as the host (rdkafka, scylla) and none of its work: no
//! validation, no deduplication, no fold, no state, no projections, no
//! lightweight transactions. refold's rate divided by this one says what
//! the engine costs on top of moving the bytes.
//!
//! ```text
//! refold-bench-limit --topic T --events N [--brokers B] [--nodes H:P]
//!     [--keyspace K] [--mode single|batch] [--concurrency C] [--json FILE]
//! ```
//!
//! It joins its own consumer group (a fresh name, from the earliest offset),
//! writes each record to `raw_events ((entity_id), part, kafka_offset)` with a
//! prepared statement (token-aware routing is the driver's default for
//! prepared statements with their partition key), at most `concurrency` writes
//! in flight, and stops once `events` writes are acknowledged at LOCAL_QUORUM
//! (the host's consistency). `--mode batch` instead groups each chunk of
//! records by entity into unlogged single-partition batches. It prints one
//! JSON line `{"events","seconds","events_per_second",...}`; `seconds` runs
//! from the first record received to the last write acknowledged.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use futures::StreamExt as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::Consistency;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

/// How records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// One INSERT per record.
    Single,
    /// One unlogged batch per entity within each chunk of records.
    Batch,
}

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "refold-bench-limit", about)]
struct Args {
    /// Bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The topic to read.
    #[arg(long)]
    topic: String,
    /// Stop after this many records are durable.
    #[arg(long)]
    events: u64,
    /// Cassandra contact points, comma-separated.
    #[arg(long, default_value = "127.0.0.1:9042")]
    nodes: String,
    /// Keyspace (created if missing, SimpleStrategy, replication 1).
    #[arg(long, default_value = "bench_limit")]
    keyspace: String,
    /// Consumer group (default: a fresh one, so the whole topic is read).
    #[arg(long)]
    group: Option<String>,
    /// Writes (statements or batches) in flight.
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// single or batch.
    #[arg(long, value_enum, default_value = "single")]
    mode: Mode,
    /// Records per chunk in batch mode.
    #[arg(long, default_value_t = 2000)]
    chunk: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// Also write the result to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One record to write.
struct Row {
    entity: String,
    part: i32,
    offset: i64,
    payload: Vec<u8>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.events > 0, "--events must be positive");
    anyhow::ensure!(
        args.keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "--keyspace must be letters, digits and underscores"
    );
    let started = Instant::now();
    let session = connect(&args).await?;
    let insert = session
        .prepare(format!(
            "INSERT INTO {}.raw_events (entity_id, part, kafka_offset, payload) VALUES (?, ?, ?, ?)",
            args.keyspace
        ))
        .await
        .context("preparing the insert")?;

    let group = args.group.clone().unwrap_or_else(|| {
        format!(
            "refold-bench-limit-{}-{}",
            std::process::id(),
            started.elapsed().as_nanos()
        )
    });
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("client.id", "refold-bench-limit")
        .create()
        .with_context(|| format!("creating a Kafka consumer for {}", args.brokers))?;
    consumer
        .subscribe(&[&args.topic])
        .with_context(|| format!("subscribing to {}", args.topic))?;

    let run = pump(&args, &session, &insert, &consumer);
    let (first, done) = tokio::time::timeout(Duration::from_secs(args.timeout), run)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "not {} records durable within {} s",
                args.events,
                args.timeout
            )
        })??;
    let seconds = done.duration_since(first).as_secs_f64();
    let out = serde_json::json!({
        "events": args.events,
        "seconds": seconds,
        "events_per_second": args.events as f64 / seconds,
        "startup_seconds": first.duration_since(started).as_secs_f64(),
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "concurrency": args.concurrency,
        "chunk": (args.mode == Mode::Batch).then_some(args.chunk),
        "consistency": "LOCAL_QUORUM",
        "table": format!("{}.raw_events ((entity_id), part, kafka_offset)", args.keyspace),
    });
    println!("{out}");
    if let Some(f) = &args.json {
        std::fs::write(f, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("writing {}", f.display()))?;
    }
    Ok(())
}

async fn connect(args: &Args) -> anyhow::Result<Session> {
    let profile = ExecutionProfile::builder()
        .consistency(Consistency::LocalQuorum)
        .request_timeout(Some(Duration::from_secs(10)))
        .build();
    let nodes: Vec<&str> = args.nodes.split(',').collect();
    let session = SessionBuilder::new()
        .known_nodes(&nodes)
        .connection_timeout(Duration::from_secs(5))
        .default_execution_profile_handle(profile.into_handle())
        .build()
        .await
        .with_context(|| format!("connecting to Cassandra at {}", args.nodes))?;
    let ks = &args.keyspace;
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = \
                 {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
            ),
            (),
        )
        .await
        .context("creating the keyspace")?;
    session
        .query_unpaged(
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.raw_events (entity_id text, part int, \
                 kafka_offset bigint, payload blob, PRIMARY KEY ((entity_id), part, kafka_offset))"
            ),
            (),
        )
        .await
        .context("creating the table")?;
    Ok(session)
}

/// Read and write until `events` writes are acknowledged; returns when the
/// first record arrived and when the last write was acknowledged.
async fn pump(
    args: &Args,
    session: &Session,
    insert: &PreparedStatement,
    consumer: &StreamConsumer,
) -> anyhow::Result<(Instant, Instant)> {
    let mut first: Option<Instant> = None;
    let first_ref = &mut first;
    let rows = consumer.stream().map(move |m| {
        let m = m.context("reading from Kafka")?;
        first_ref.get_or_insert_with(Instant::now);
        Ok::<_, anyhow::Error>(Row {
            entity: m
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default(),
            part: m.partition(),
            offset: m.offset(),
            payload: m.payload().unwrap_or_default().to_vec(),
        })
    });
    let mut done: u64 = 0;
    let target = args.events;
    // Writes are issued in record order and complete in any order; at most
    // `concurrency` are pending, and reading pauses while they are.
    match args.mode {
        Mode::Single => {
            let mut writes = rows
                .take(target as usize)
                .map(|r| async move {
                    let r = r?;
                    write_one(session, insert, &r).await?;
                    Ok::<u64, anyhow::Error>(1)
                })
                .buffer_unordered(args.concurrency.max(1));
            while let Some(n) = writes.next().await {
                done += n?;
                if done >= target {
                    break;
                }
            }
        }
        Mode::Batch => {
            let mut writes = rows
                .take(target as usize)
                .ready_chunks(args.chunk.max(1))
                .flat_map(|chunk| {
                    let mut by_entity: HashMap<String, Vec<Row>> = HashMap::new();
                    let mut failed = Vec::new();
                    for r in chunk {
                        match r {
                            Ok(r) => by_entity.entry(r.entity.clone()).or_default().push(r),
                            Err(e) => failed.push(Err(e)),
                        }
                    }
                    let groups = by_entity.into_values().map(Ok);
                    futures::stream::iter(failed.into_iter().chain(groups).collect::<Vec<_>>())
                })
                .map(|g: anyhow::Result<Vec<Row>>| async move {
                    let g = g?;
                    write_batch(session, insert, &g).await?;
                    Ok::<u64, anyhow::Error>(g.len() as u64)
                })
                .buffer_unordered(args.concurrency.max(1));
            while let Some(n) = writes.next().await {
                done += n?;
                if done >= target {
                    break;
                }
            }
        }
    }
    let end = Instant::now();
    anyhow::ensure!(
        done >= target,
        "the topic ended after {done} of {target} records"
    );
    Ok((first.unwrap_or(end), end))
}

/// A few attempts: a timeout on a loaded single node is not a reason to
/// abort a measurement, but a persistent error is.
const ATTEMPTS: u32 = 5;

async fn write_one(session: &Session, insert: &PreparedStatement, r: &Row) -> anyhow::Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match session
            .execute_unpaged(insert, (&r.entity, r.part, r.offset, &r.payload))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if attempt < ATTEMPTS => {
                eprintln!("write failed (attempt {attempt}): {e}");
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            }
            Err(e) => return Err(anyhow::anyhow!(e).context("writing a record")),
        }
    }
}

async fn write_batch(
    session: &Session,
    insert: &PreparedStatement,
    rows: &[Row],
) -> anyhow::Result<()> {
    if let [r] = rows {
        return write_one(session, insert, r).await;
    }
    let mut batch = Batch::new(BatchType::Unlogged);
    for _ in rows {
        batch.append_statement(insert.clone());
    }
    let values: Vec<_> = rows
        .iter()
        .map(|r| (&r.entity, r.part, r.offset, &r.payload))
        .collect();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match session.batch(&batch, &values).await {
            Ok(_) => return Ok(()),
            Err(e) if attempt < ATTEMPTS => {
                eprintln!("batch failed (attempt {attempt}): {e}");
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            }
            Err(e) => return Err(anyhow::anyhow!(e).context("writing a batch")),
        }
    }
}

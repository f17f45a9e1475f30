//! `refold produce --brokers B --topic T FILE.jsonl [--binary] [--rate N]`:
//! load a JSONL file of CloudEvents into a Kafka topic, keyed by entity id.
//!
//! Every non-empty line becomes one record, in file order. A line that is a
//! valid event is keyed by its `subject` (the entity id), so that all events
//! of an entity land in one partition, in order. With `--binary` it is sent
//! in CloudEvents Kafka binary mode: the attributes as `ce_*` headers and
//! `data` as the value. Any other line is sent as it is (structured mode),
//! keyed by its `subject` if it has one and unkeyed otherwise, so that the
//! engine's dead-lettering can be exercised. With `--rate N` record `i` is
//! sent no earlier than `i / N` seconds after the first, so the load is
//! steady rather than one burst.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use serde_json::Value;

use refold_types::event;

/// Records in flight before waiting for the oldest delivery.
const IN_FLIGHT: usize = 20_000;

/// What was sent.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Produced {
    /// Records delivered.
    pub records: usize,
    /// Of which valid events (keyed by entity id).
    pub events: usize,
    /// Of which sent as they were because they are not valid events.
    pub raw: usize,
    /// From the first send to the last delivery report.
    pub seconds: f64,
}

/// How long to wait before sending record number `sent` (0-based) so that
/// records leave at `rate` per second from `start`; `None` when it is due.
/// Waits shorter than a millisecond are skipped: timers are not that fine,
/// and the next record catches up.
fn pace(start: Instant, sent: usize, rate: f64, now: Instant) -> Option<Duration> {
    let due = start + Duration::from_secs_f64(sent as f64 / rate);
    let wait = due.saturating_duration_since(now);
    (wait >= Duration::from_millis(1)).then_some(wait)
}

/// Produce the lines of `file` to `topic`.
pub async fn produce(
    brokers: &str,
    topic: &str,
    file: &Path,
    binary: bool,
    rate: Option<f64>,
) -> anyhow::Result<Produced> {
    if let Some(r) = rate {
        anyhow::ensure!(
            r.is_finite() && r > 0.0,
            "--rate must be a positive number, not {r}"
        );
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .set("client.id", "refold-produce")
        .create()
        .with_context(|| format!("creating a Kafka producer for {brokers}"))?;

    let mut out = Produced::default();
    let mut pending: VecDeque<DeliveryFuture> = VecDeque::new();
    let start = Instant::now();
    let mut sent = 0usize;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(wait) = rate.and_then(|r| pace(start, sent, r, Instant::now())) {
            tokio::time::sleep(wait).await;
        }
        sent += 1;
        let (key, value, headers) = match event::parse_structured(line.as_bytes(), usize::MAX) {
            Ok(e) => {
                out.events += 1;
                if binary {
                    let mut h = OwnedHeaders::new();
                    let mut add = |k: &str, v: &str| {
                        h = std::mem::take(&mut h).insert(Header {
                            key: k,
                            value: Some(v),
                        });
                    };
                    add("ce_specversion", "1.0");
                    add("ce_id", &e.id);
                    add("ce_source", &e.source);
                    add("ce_type", &e.event_type);
                    add("ce_subject", &e.key.entity_id);
                    add("ce_entitytype", &e.key.entity_type);
                    if let Some(t) = &e.time {
                        add("ce_time", t);
                    }
                    add("content-type", "application/json");
                    let data = if e.data.is_null() {
                        Vec::new()
                    } else {
                        e.data.to_string().into_bytes()
                    };
                    (Some(e.key.entity_id), data, Some(h))
                } else {
                    (Some(e.key.entity_id), line.as_bytes().to_vec(), None)
                }
            }
            Err(_) => {
                out.raw += 1;
                let subject = serde_json::from_str::<Value>(line)
                    .ok()
                    .and_then(|v| v.get("subject").and_then(Value::as_str).map(str::to_owned))
                    .filter(|s| !s.is_empty());
                (subject, line.as_bytes().to_vec(), None)
            }
        };
        loop {
            let mut record: FutureRecord<'_, String, Vec<u8>> =
                FutureRecord::to(topic).payload(&value);
            if let Some(k) = &key {
                record = record.key(k);
            }
            if let Some(h) = &headers {
                record = record.headers(h.clone());
            }
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push_back(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    match pending.pop_front() {
                        Some(f) => out.records += delivered(f).await?,
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((e, _)) => return Err(anyhow::anyhow!("producing to {topic}: {e}")),
            }
        }
        if pending.len() >= IN_FLIGHT
            && let Some(f) = pending.pop_front()
        {
            out.records += delivered(f).await?;
        }
    }
    while let Some(f) = pending.pop_front() {
        out.records += delivered(f).await?;
    }
    producer
        .flush(Duration::from_secs(30))
        .context("flushing the Kafka producer")?;
    out.seconds = start.elapsed().as_secs_f64();
    Ok(out)
}

async fn delivered(f: DeliveryFuture) -> anyhow::Result<usize> {
    match f.await {
        Ok(Ok(_)) => Ok(1),
        Ok(Err((e, _))) => Err(anyhow::anyhow!("a record was not delivered: {e}")),
        Err(_) => Err(anyhow::anyhow!(
            "the producer was dropped before a delivery report"
        )),
    }
}

/// `refold produce`: produce, then print what was sent as one JSON line.
pub async fn run(
    brokers: &str,
    topic: &str,
    file: &Path,
    binary: bool,
    rate: Option<f64>,
) -> anyhow::Result<()> {
    let p = produce(brokers, topic, file, binary, rate).await?;
    crate::cli::out::outln!(
        "{}",
        serde_json::json!({"topic": topic, "records": p.records, "events": p.events, "raw": p.raw,
                           "mode": if binary { "binary" } else { "structured" },
                           "seconds": p.seconds, "rate_limit": rate})
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_spaces_records_evenly_from_the_start() {
        let t0 = Instant::now();
        // 1000/s: record 500 is due at 0.5 s.
        assert_eq!(pace(t0, 500, 1000.0, t0), Some(Duration::from_millis(500)));
        assert_eq!(
            pace(t0, 500, 1000.0, t0 + Duration::from_millis(200)),
            Some(Duration::from_millis(300))
        );
        // Due or late: send at once.
        assert_eq!(pace(t0, 500, 1000.0, t0 + Duration::from_millis(500)), None);
        assert_eq!(pace(t0, 500, 1000.0, t0 + Duration::from_secs(2)), None);
        // Less than a millisecond ahead: not worth a timer.
        assert_eq!(pace(t0, 1, 2000.0, t0), None);
        assert_eq!(pace(t0, 0, 1.0, t0), None);
    }
}

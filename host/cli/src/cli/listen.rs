//! `refold listen`: change records as JSONL on standard output, for
//! scripts. From a host's feed, each line is a structured CloudEvent with
//! its feed cursor (`refoldcursor`), and `--after` takes the last one seen,
//! so a script that stops can continue where it was. From a cluster's
//! change topics (`--kafka`), each line carries where it was read
//! (`refoldtopic`, `refoldpartition`, `refoldoffset`, `refoldtimestamp`); only committed
//! transactions are read, so each record is printed once.

use std::io::Write as _;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::cli::plugin::Endpoint;

#[derive(Debug, Deserialize)]
struct Page {
    changes: Vec<Item>,
    next: u64,
}

#[derive(Debug, Deserialize)]
struct Item {
    cursor: u64,
    event: Value,
}

/// Print the records after `after` as JSONL. With `follow`, wait for new
/// ones (long polls of `wait` seconds) until interrupted; without, stop at
/// the end of the feed. Stops after `max` records when given.
pub async fn run(ep: &Endpoint, after: u64, follow: bool, max: Option<u64>) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()?;
    let url = format!("{}/v1/changes", ep.api.trim_end_matches('/'));
    let mut after = after;
    let mut printed = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        let wait = if follow { 25 } else { 0 };
        let page: Page = ep
            .send(
                client
                    .get(&url)
                    .query(&[("after", after), ("wait", wait), ("limit", 1000)]),
            )
            .await?;
        let empty = page.changes.is_empty();
        for mut item in page.changes {
            if let Some(o) = item.event.as_object_mut() {
                o.insert(
                    refold_engine::changes::CURSOR_ATTRIBUTE.into(),
                    item.cursor.into(),
                );
            }
            writeln!(out, "{}", item.event)?;
            printed += 1;
            if max.is_some_and(|m| printed >= m) {
                out.flush()?;
                return Ok(());
            }
        }
        out.flush()?;
        after = page.next.max(after);
        if empty && !follow {
            return Ok(());
        }
    }
}

/// Print the records of `topics` from their beginning, read_committed. With
/// `follow`, keep reading; without, stop at the ends the topics had when
/// reading began. Stops after `max` records when given.
/// `f` again while it fails the way a topic just created or a leader just
/// moved does, for up to ten seconds; a topic that does not exist is said
/// at once.
fn settled<T>(
    mut f: impl FnMut() -> rdkafka::error::KafkaResult<T>,
) -> rdkafka::error::KafkaResult<T> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match f() {
            Err(e)
                if std::time::Instant::now() < until
                    && !matches!(
                        e.rdkafka_error_code(),
                        Some(Code::UnknownTopicOrPartition | Code::UnknownTopic)
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            r => return r,
        }
    }
}

pub fn run_kafka(
    brokers: &str,
    topics: &[String],
    follow: bool,
    max: Option<u64>,
) -> anyhow::Result<()> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::message::Message as _;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

    anyhow::ensure!(!topics.is_empty(), "--kafka needs at least one --topic");
    let timeout = Duration::from_secs(30);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "refold-listen")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    // Where each partition ended when reading began.
    let mut ends: Vec<(String, i32, i64)> = Vec::new();
    for t in topics {
        let md = settled(|| consumer.fetch_metadata(Some(t), timeout))?;
        for mt in md.topics() {
            if let Some(e) = mt.error() {
                anyhow::bail!("topic {t}: {e:?}");
            }
            for p in mt.partitions() {
                let (_, high) = settled(|| consumer.fetch_watermarks(t, p.id(), timeout))?;
                ends.push((t.clone(), p.id(), high));
                tpl.add_partition_offset(t, p.id(), Offset::Beginning)?;
            }
        }
    }
    consumer.assign(&tpl)?;
    let mut out = std::io::stdout().lock();
    let mut printed = 0u64;
    // A read_committed reader passes the end of a partition only once the
    // transactions open there end.
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if !follow {
            let pos = consumer.position()?;
            let done = ends.iter().all(|(t, p, high)| {
                *high <= 0
                    || pos
                        .find_partition(t, *p)
                        .and_then(|e| e.offset().to_raw())
                        .is_some_and(|at| at >= *high)
            });
            if done {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the change topics were not read to their ends in {timeout:?}"
            );
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        let Some(payload) = m.payload() else { continue };
        let mut event: Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(topic = m.topic(), offset = m.offset(), error = %e, "skipping a record that is not JSON");
                continue;
            }
        };
        if let Some(o) = event.as_object_mut() {
            o.insert("refoldtopic".into(), m.topic().into());
            o.insert("refoldpartition".into(), m.partition().into());
            o.insert("refoldoffset".into(), m.offset().into());
            if let Some(ms) = m.timestamp().to_millis() {
                o.insert("refoldtimestamp".into(), ms.into());
            }
        }
        writeln!(out, "{event}")?;
        printed += 1;
        if max.is_some_and(|n| printed >= n) {
            break;
        }
    }
    out.flush()?;
    Ok(())
}

//! Event sources: where records come from, and how consumption is checkpointed.

mod fault;
pub mod jsonl;
pub mod kafka;

use anyhow::Context as _;
use async_trait::async_trait;

use crate::store::{Checkpoint, Origin};

/// One record as read from a source, not yet validated.
#[derive(Debug, Clone)]
pub struct SourceRecord {
    /// Where it was read.
    pub origin: Origin,
    /// Offset to resume from once this record is durable.
    pub next_offset: i64,
    /// Message key (Kafka: the entity id).
    pub key: Option<String>,
    /// Message headers (Kafka binary mode: `ce_*`).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The bytes.
    pub payload: Vec<u8>,
    /// When the producer made it (Unix ms), where the source says so (Kafka
    /// message timestamps); feeds the produce-to-commit latency metric.
    pub produced_at_ms: Option<i64>,
}

/// Lag of one partition, for metrics and liveness.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionLag {
    /// Source name.
    pub source: String,
    /// Partition.
    pub partition: i32,
    /// Records (Kafka) or bytes (files) not yet consumed.
    pub lag: i64,
}

/// Why a source could not deliver a batch. `next_batch` returns it inside its
/// `anyhow::Error` (find it with [`SourceError::of`] or [`is_transient`]).
///
/// Either way nothing was handed out and nothing was skipped: the next call
/// resumes exactly where the last delivered batch ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// Likely to clear up by itself (a followed file that does not exist
    /// yet or was deleted, a permission being fixed, the process out of file
    /// descriptors, an I/O error): call `next_batch` again, after a pause.
    #[error("source unavailable: {reason}")]
    Transient {
        /// What is wrong, naming the file.
        reason: String,
    },
    /// Will not clear up without a change of configuration (a file that is
    /// not followed and does not exist, a directory given as an input file).
    #[error("source failed: {reason}")]
    Fatal {
        /// What is wrong, naming the file.
        reason: String,
    },
}

impl SourceError {
    /// The `SourceError` somewhere in `e`'s chain, if any.
    pub fn of(e: &anyhow::Error) -> Option<&SourceError> {
        e.chain().find_map(|c| c.downcast_ref::<SourceError>())
    }

    /// Retrying can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Transient { .. })
    }

    /// What is wrong.
    pub fn reason(&self) -> &str {
        match self {
            SourceError::Transient { reason } | SourceError::Fatal { reason } => reason,
        }
    }
}

/// The caller should wait and call `next_batch` again rather than stop: `e`
/// carries a [`SourceError::Transient`], or, from a source that does not
/// type its errors (librdkafka's), an I/O error of the machine.
pub fn is_transient(e: &anyhow::Error) -> bool {
    match SourceError::of(e) {
        Some(se) => se.is_transient(),
        None => fault::io_transient(e),
    }
}

/// A partitioned, per-entity-ordered stream of records.
#[async_trait]
pub trait EventSource: Send {
    /// Up to `max` records. `Ok(None)` when the source is exhausted (a file
    /// source not following); `Ok(Some(vec![]))` when nothing arrived within
    /// the linger time. An error carrying a [`SourceError`] says whether to
    /// retry; a failed call hands out nothing and moves nothing on.
    async fn next_batch(&mut self, max: usize) -> anyhow::Result<Option<Vec<SourceRecord>>>;
    /// The effects of everything before these checkpoints are durable.
    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> anyhow::Result<()>;
    /// Current lag per partition.
    fn lag(&self) -> Vec<PartitionLag>;
}

/// The highest checkpoint per (source, partition) reached by `records`.
pub fn checkpoints_of(records: &[SourceRecord]) -> Vec<Checkpoint> {
    let mut out: Vec<Checkpoint> = Vec::new();
    for r in records {
        match out
            .iter_mut()
            .find(|c| c.source == r.origin.source && c.partition == r.origin.partition)
        {
            Some(c) => c.offset = c.offset.max(r.next_offset),
            None => out.push(Checkpoint {
                source: r.origin.source.clone(),
                partition: r.origin.partition,
                offset: r.next_offset,
            }),
        }
    }
    out
}

/// Raise this process's soft limit on open files (`RLIMIT_NOFILE`) to its
/// hard limit, so that a host following files, holding SQLite and sockets
/// open, does not run out of descriptors at a low default soft limit.
/// Returns the (old, new) soft limits; `None` stands for unlimited. Failing
/// to raise it is not fatal (the old limit stays), so callers log the error
/// and go on.
pub fn raise_open_files_limit() -> anyhow::Result<(Option<u64>, Option<u64>)> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current == lim.maximum {
        return Ok((lim.current, lim.current));
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    )
    .map_err(std::io::Error::from)
    .with_context(|| {
        format!(
            "raising the open files limit from {:?} to {:?}",
            lim.current, lim.maximum
        )
    })?;
    Ok((lim.current, lim.maximum))
}

/// Open the Kafka source of the configured consumer group.
pub async fn open_kafka(app: &crate::app::App) -> anyhow::Result<Box<dyn EventSource>> {
    let linger = std::time::Duration::from_millis(app.config.source.linger_ms);
    Ok(Box::new(kafka::KafkaSource::new(
        &app.config.kafka,
        linger,
    )?))
}

//! Records as a source hands them out, and the checkpoints they reach.

use refold_types::{Checkpoint, Origin};

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

impl SourceRecord {
    /// A record of `payload` alone, read at `offset` of `source`'s
    /// `partition` (no key, headers or producer time): what a resubmission
    /// or a test feeds the pipeline.
    pub fn at(source: &str, partition: i32, offset: i64, payload: Vec<u8>) -> Self {
        SourceRecord {
            origin: Origin {
                source: source.into(),
                partition,
                offset,
            },
            next_offset: offset + 1,
            key: None,
            headers: Vec::new(),
            payload,
            produced_at_ms: None,
        }
    }
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

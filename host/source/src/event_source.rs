//! The contract of every source.

use async_trait::async_trait;
use refold_types::Checkpoint;

use crate::record::{PartitionLag, SourceRecord};

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
    /// Whether records of different partitions of one source may be
    /// processed independently of each other (Kafka partitions: yes; the
    /// files of one JSONL source, a rotated file and its successor, follow
    /// each other: no).
    fn independent_partitions(&self) -> bool {
        true
    }
    /// The partitions taken away from this reader (by a rebalance) since
    /// the last call, for the caller to drop what it holds of them. A
    /// source whose partitions never move returns none.
    fn revoked(&mut self) -> Vec<(String, i32)> {
        Vec::new()
    }
}

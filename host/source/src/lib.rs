//! Event sources: where records come from, and how consumption is
//! checkpointed. A source takes its own configuration ([`config`]), never
//! the host's. Kafka is behind the `kafka` feature (on by default), so a
//! build that only follows files does not compile librdkafka.

pub mod config;
pub mod error;
pub mod event_source;
mod fault;
pub mod jsonl;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod open_files;
pub mod record;

pub use error::{SourceError, is_transient};
pub use event_source::EventSource;
pub use open_files::raise_open_files_limit;
pub use record::{PartitionLag, SourceRecord, checkpoints_of};

/// Open the Kafka source of `kafka`'s consumer group, waiting at most
/// `source.linger_ms` for a batch to fill.
#[cfg(feature = "kafka")]
pub fn open_kafka(
    kafka: &config::KafkaConfig,
    source: &config::SourceConfig,
) -> anyhow::Result<kafka::KafkaSource> {
    let linger = std::time::Duration::from_millis(source.linger_ms);
    kafka::KafkaSource::new(kafka, linger)
}

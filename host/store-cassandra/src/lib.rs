//! The cluster backend: Apache Cassandra (or ScyllaDB) through the `scylla`
//! driver. The schema and the reasons for its shape are in `CASSANDRA.md`
//! next to this file; in short:
//!
//! - An entity's raw events, its event-id index and its state share one
//!   partition per *bucket* of its history (`entity_log`, partition key
//!   `(entity_type, entity_id, bucket)`). The state lives in static columns
//!   of the entity's last ("live") bucket. A batch's effect on one entity is
//!   one single-partition conditional batch: the new event rows, their id
//!   rows and the new state, applied only `IF head = expected_head`. So the
//!   events and the state of an entity advance together or not at all, and a
//!   stale writer can neither overwrite a newer state nor clobber stored
//!   events (its whole batch is rejected).
//! - A bucket holds at least `bucket_size` events: a commit appends all of an
//!   entity's new events to the live bucket; once the live bucket holds
//!   `cap` events or more, the next commit opens the next bucket with
//!   `IF head = null` (only one writer can create it). Partitions stay
//!   bounded by `bucket_size` + one batch.
//! - Read-model writes, quarantine records, dead letters and checkpoints go
//!   to their own tables after the entity batches. Their writes carry one
//!   client timestamp per commit (`USING TIMESTAMP`), and the read-model
//!   part of a commit is first recorded as an intent (`pending_effects`), so
//!   that a commit interrupted after some entity batches applied (a crash, a
//!   timeout, a lost fence) still gets its effects written: by the next
//!   commit of this process, or by the next process that opens the store.
//!   Re-applying an intent is idempotent and, thanks to the fixed timestamp,
//!   never overwrites a newer write.

mod changes;
mod commit;
pub mod config;
mod documents;
mod error;
mod generations;
mod intents;
mod outbox;
mod plugins;
mod reads;
mod rows;
mod schema;
mod statements;
mod store;

pub use config::CassandraConfig;
pub use store::CassandraStore;

//! `[cassandra]`: where the cluster is and how the keyspace is laid out.

use serde::{Deserialize, Serialize};

/// `[cassandra]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CassandraConfig {
    /// Contact points `host:port`.
    pub nodes: Vec<String>,
    /// Keyspace (created if missing).
    pub keyspace: String,
    /// Replication factor of the keyspace (SimpleStrategy) when created.
    pub replication_factor: u32,
    /// Full replication map, overriding `replication_factor`, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'dc1': 3}`.
    pub replication: Option<String>,
    /// Largest number of concurrent requests of one kind within a commit
    /// (entity batches, documents, checkpoints) or a load. 256 by default:
    /// against one node on 2 cores, 64 left the node idle between waves of
    /// conditional batches (about 15 % fewer events/s), 512 gained nothing.
    pub concurrency: usize,
    /// Events per partition bucket of an entity's history.
    pub bucket_size: u64,
}

impl Default for CassandraConfig {
    fn default() -> Self {
        CassandraConfig {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "refold".into(),
            replication_factor: 1,
            replication: None,
            concurrency: 256,
            bucket_size: 1000,
        }
    }
}

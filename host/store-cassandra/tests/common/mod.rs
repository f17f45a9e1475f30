//! What the tests against the real server share: where it is (a test
//! fails without it, never passes), throwaway keyspaces, and their cleanup.

use std::sync::{Arc, Mutex};

use refold_store_cassandra::{CassandraConfig, CassandraStore};
use scylla::client::session_builder::SessionBuilder;

/// The nodes of `REFOLD_TEST_CASSANDRA`; panics with how to set it.
pub fn nodes() -> Vec<String> {
    let nodes = std::env::var("REFOLD_TEST_CASSANDRA").unwrap_or_default();
    assert!(
        !nodes.trim().is_empty(),
        "REFOLD_TEST_CASSANDRA is not set: the Cassandra store's tests need a server, \
         e.g. REFOLD_TEST_CASSANDRA=127.0.0.1:9042 (comma-separated host:port)"
    );
    nodes.split(',').map(|n| n.trim().to_string()).collect()
}

/// Keyspaces opened by a test, to drop at its end.
#[derive(Clone, Default)]
pub struct Keyspaces(Arc<Mutex<Vec<String>>>);

impl Keyspaces {
    /// A store on a new keyspace of a random name (replication factor 1).
    pub async fn open(&self, nodes: &[String], bucket_size: u64) -> CassandraStore {
        let keyspace = format!("refold_conf_{:016x}", rand::random::<u64>());
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(keyspace.clone());
        let config = CassandraConfig {
            nodes: nodes.to_vec(),
            keyspace,
            replication_factor: 1,
            bucket_size,
            ..CassandraConfig::default()
        };
        CassandraStore::open(&config)
            .await
            .unwrap_or_else(|e| panic!("opening keyspace {}: {e:#}", config.keyspace))
    }

    /// Two stores (two hosts') on one new keyspace.
    // Shared by the test binaries; only the layout tests use it.
    #[allow(dead_code)]
    pub async fn open_pair(
        &self,
        nodes: &[String],
        bucket_size: u64,
    ) -> (CassandraStore, CassandraStore) {
        let first = self.open(nodes, bucket_size).await;
        let second = self.reopen(nodes, bucket_size).await;
        (first, second)
    }

    /// Another store on the keyspace opened last (another host's, or the
    /// same host's after a restart).
    #[allow(dead_code)]
    pub async fn reopen(&self, nodes: &[String], bucket_size: u64) -> CassandraStore {
        let keyspace = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .cloned();
        let config = CassandraConfig {
            nodes: nodes.to_vec(),
            keyspace: keyspace.unwrap_or_default(),
            replication_factor: 1,
            bucket_size,
            ..CassandraConfig::default()
        };
        CassandraStore::open(&config)
            .await
            .unwrap_or_else(|e| panic!("opening keyspace {} again: {e:#}", config.keyspace))
    }

    /// The name of the keyspace opened last.
    #[allow(dead_code)]
    pub fn last(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .cloned()
            .unwrap_or_default()
    }

    /// Drop them all. Best effort: one left behind is only clutter on a
    /// test server.
    pub async fn drop_all(&self, nodes: &[String]) {
        let keyspaces = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let session = match SessionBuilder::new().known_nodes(nodes).build().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("could not connect to drop the test keyspaces: {e}");
                return;
            }
        };
        for ks in keyspaces {
            if let Err(e) = session
                .query_unpaged(format!("DROP KEYSPACE IF EXISTS {ks}"), ())
                .await
            {
                eprintln!("could not drop keyspace {ks}: {e}");
            }
        }
    }
}

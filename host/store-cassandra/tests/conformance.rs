//! The storage conformance suite against a real Cassandra: each check gets
//! a keyspace of its own (random name, replication factor 1), dropped at
//! the end. Needs `REFOLD_TEST_CASSANDRA` (`host:port`); without it the
//! test fails, so that a run without the server cannot pass for a run with.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures::FutureExt as _;
use refold_store::Storage;
use refold_store_cassandra::{CassandraConfig, CassandraStore};
use scylla::client::session_builder::SessionBuilder;

fn nodes() -> Vec<String> {
    let nodes = std::env::var("REFOLD_TEST_CASSANDRA").unwrap_or_default();
    assert!(
        !nodes.trim().is_empty(),
        "REFOLD_TEST_CASSANDRA is not set: the Cassandra conformance suite needs a server, \
         e.g. REFOLD_TEST_CASSANDRA=127.0.0.1:9042 (comma-separated host:port)"
    );
    nodes.split(',').map(|n| n.trim().to_string()).collect()
}

/// The suite's checks. Stands in for `refold_store::conformance::run`,
/// whose signature it has, until the suite's entry point exists.
async fn run<F, Fut>(mut fresh: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Arc<dyn Storage>>,
{
    refold_store::conformance::listings_page_through_everything_once(&*fresh().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_passes_the_storage_conformance_suite() {
    let nodes = nodes();
    let created: Arc<Mutex<Vec<String>>> = Arc::default();
    let fresh = {
        let (nodes, created) = (nodes.clone(), created.clone());
        move || {
            let keyspace = format!("refold_conf_{:016x}", rand::random::<u64>());
            created
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(keyspace.clone());
            let config = CassandraConfig {
                nodes: nodes.clone(),
                keyspace,
                replication_factor: 1,
                // Small buckets, so that the checks cross bucket boundaries.
                bucket_size: 4,
                ..CassandraConfig::default()
            };
            async move {
                let store = CassandraStore::open(&config)
                    .await
                    .unwrap_or_else(|e| panic!("opening keyspace {}: {e:#}", config.keyspace));
                Arc::new(store) as Arc<dyn Storage>
            }
        }
    };
    // A panicking check still drops the keyspaces: the panic is caught,
    // the cleanup runs, then the panic goes on.
    let outcome = AssertUnwindSafe(run(fresh)).catch_unwind().await;
    let keyspaces = created.lock().unwrap_or_else(|e| e.into_inner()).clone();
    drop_keyspaces(&nodes, &keyspaces).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Best effort: a keyspace left behind is only clutter on a test server.
async fn drop_keyspaces(nodes: &[String], keyspaces: &[String]) {
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

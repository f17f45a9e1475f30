//! The storage conformance suite against a real Cassandra: each check gets
//! a keyspace of its own (random name, replication factor 1), dropped at
//! the end. Needs `REFOLD_TEST_CASSANDRA` (`host:port`); without it the
//! test fails, so that a run without the server cannot pass for a run with.

mod common;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt as _;
use refold_store::Storage;
use refold_store::conformance::run;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_passes_the_storage_conformance_suite() {
    let nodes = common::nodes();
    let keyspaces = common::Keyspaces::default();
    let fresh = {
        let (nodes, keyspaces) = (nodes.clone(), keyspaces.clone());
        move || {
            let (nodes, keyspaces) = (nodes.clone(), keyspaces.clone());
            // Small buckets, so that the checks cross bucket boundaries.
            async move { Arc::new(keyspaces.open(&nodes, 4).await) as Arc<dyn Storage> }
        }
    };
    // A panicking check still drops the keyspaces: the panic is caught,
    // the cleanup runs, then the panic goes on.
    let outcome = AssertUnwindSafe(run(fresh)).catch_unwind().await;
    keyspaces.drop_all(&nodes).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

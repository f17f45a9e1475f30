//! The storage conformance suite over SQLite, each check on a fresh
//! in-memory database.

use std::sync::Arc;

use refold_store::Storage;
use refold_store_sqlite::SqliteStore;

#[tokio::test]
async fn conformance() {
    refold_store::conformance::run(|| async {
        Arc::new(SqliteStore::in_memory().expect("an in-memory database")) as Arc<dyn Storage>
    })
    .await;
}

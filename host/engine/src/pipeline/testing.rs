//! Fixtures shared by the pipeline's unit tests: a host with the bank
//! component over an in-memory SQLite store, and its records.

use std::path::Path;
use std::sync::Arc;

use refold_source::SourceRecord;
use refold_store::{EntityKey, RawJson, StoredEvent};
use refold_store_sqlite::SqliteStore;

use crate::config::HostConfig;
use crate::host::Host;

/// A host with `examples/bank/bank.wasm` (entity type `account`) active.
pub(crate) fn bank_host() -> Host {
    let mut config = HostConfig::default();
    config.plugins.files =
        vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bank/bank.wasm")];
    let store = Arc::new(SqliteStore::in_memory().unwrap());
    Host::with_storage(config, store.clone(), store).unwrap()
}

/// A record read at `offset` of source `t`.
pub(crate) fn record(offset: i64, payload: String) -> SourceRecord {
    SourceRecord::at("t", 0, offset, payload.into_bytes())
}

/// A deposit of `amount` into `account`, event id `id`.
pub(crate) fn deposit(offset: i64, account: &str, id: &str, amount: u64) -> SourceRecord {
    record(
        offset,
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/t","type":"account.deposited","subject":"{account}","entitytype":"account","data":{{"amount":{amount}}}}}"#
        ),
    )
}

/// The opening of `account` by `owner-<account>`.
pub(crate) fn opened(offset: i64, account: &str) -> SourceRecord {
    record(
        offset,
        format!(
            r#"{{"specversion":"1.0","id":"o-{account}","source":"/t","type":"account.opened","subject":"{account}","entitytype":"account","data":{{"owner":"owner-{account}"}}}}"#
        ),
    )
}

/// A stored deposit of `amount` at `position` of `key`, event id
/// `e<position>`.
pub(crate) fn stored_deposit(key: &EntityKey, position: u64, amount: u64) -> StoredEvent {
    StoredEvent {
        key: key.clone(),
        position,
        id: format!("e{position}"),
        source: "/t".into(),
        event_type: "account.deposited".into(),
        time: None,
        data: RawJson::parse(&format!(r#"{{"amount":{amount}}}"#)).unwrap(),
        origin: None,
        record: None,
        digest: None,
    }
}

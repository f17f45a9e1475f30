//! What the suite cannot see of the Cassandra layout: an entity's history
//! spread over several bucket partitions. Needs `REFOLD_TEST_CASSANDRA`.

mod common;

use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;
use refold_store::{
    Commit, EntityKey, EntityUpdate, Generation, RawJson, Storage, StoreError, StoredEvent,
};
use serde_json::json;

fn event(key: &EntityKey, position: u64, id: &str) -> StoredEvent {
    StoredEvent {
        key: key.clone(),
        position,
        id: id.into(),
        source: "/buckets".into(),
        event_type: "deposited".into(),
        time: None,
        data: RawJson::from_value(&json!({ "n": position })),
        origin: None,
        record: None,
        digest: None,
    }
}

/// Events `ids` at the positions after `head`, and the state moved past them.
fn append(key: &EntityKey, head: u64, ids: &[&str]) -> Commit {
    let events: Vec<StoredEvent> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| event(key, head + 1 + i as u64, id))
        .collect();
    let to = head + ids.len() as u64;
    Commit {
        events,
        entities: vec![EntityUpdate {
            key: key.clone(),
            state: json!({ "head": to }),
            position: to,
            head: to,
            expected_head: head,
            plugin: None,
            quarantined: false,
            generation: Generation::base(),
        }],
        ..Commit::default()
    }
}

async fn an_event_is_never_stored_twice_across_buckets(s: &dyn Storage) {
    let k = EntityKey::new("account", "a1");
    // Buckets of 2: the first commit fills bucket 0, the second opens bucket 1.
    s.commit(append(&k, 0, &["e1", "e2", "e3"])).await.unwrap();
    s.commit(append(&k, 3, &["e4"])).await.unwrap();
    for id in ["e1", "e4"] {
        let again = s.commit(append(&k, 4, &[id])).await;
        assert!(
            matches!(again, Err(StoreError::Fenced(_))),
            "{id} stored again: {again:?}"
        );
    }
    s.commit(append(&k, 4, &["e5"])).await.unwrap();
    let ids: Vec<String> = s
        .history(&k, 0, None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["e1", "e2", "e3", "e4", "e5"]);
    let rec = &s.load(std::slice::from_ref(&k)).await.unwrap()[&k];
    assert_eq!(
        (rec.head, rec.state.clone()),
        (5, Some(json!({ "head": 5 })))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_across_buckets_keeps_events_unique() {
    let nodes = common::nodes();
    let keyspaces = common::Keyspaces::default();
    let store = keyspaces.open(&nodes, 2).await;
    let outcome = AssertUnwindSafe(an_event_is_never_stored_twice_across_buckets(&store))
        .catch_unwind()
        .await;
    drop(store);
    keyspaces.drop_all(&nodes).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

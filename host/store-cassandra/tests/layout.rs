//! What the suite cannot see of the Cassandra layout: an entity's history
//! spread over several bucket partitions, and the change outbox. Needs
//! `REFOLD_TEST_CASSANDRA`.

mod common;

use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;
use refold_store::{
    ChangeKind, ChangeRecord, Commit, EntityKey, EntityUpdate, Generation, Origin, OutboxPartition,
    RawJson, Storage, StoreError, StoredEvent,
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

/// Run `check` on a store of a fresh keyspace with buckets of 2 events,
/// dropping the keyspace whatever the outcome.
async fn on_fresh_store<F>(check: impl FnOnce(std::sync::Arc<dyn Storage>) -> F)
where
    F: std::future::Future<Output = ()>,
{
    let nodes = common::nodes();
    let keyspaces = common::Keyspaces::default();
    let store: std::sync::Arc<dyn Storage> = std::sync::Arc::new(keyspaces.open(&nodes, 2).await);
    let outcome = AssertUnwindSafe(check(store)).catch_unwind().await;
    keyspaces.drop_all(&nodes).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_across_buckets_keeps_events_unique() {
    on_fresh_store(|s| async move { an_event_is_never_stored_twice_across_buckets(&*s).await })
        .await;
}

/// `append` with the events from `part` of source `t` and the record the
/// pipeline would make of it.
fn recorded(key: &EntityKey, head: u64, ids: &[&str], part: i32) -> Commit {
    let mut c = append(key, head, ids);
    for e in &mut c.events {
        e.origin = Some(Origin {
            source: "t".into(),
            partition: part,
            offset: e.position as i64,
        });
    }
    c.changes.push(ChangeRecord {
        kind: ChangeKind::Changed,
        key: key.clone(),
        first_position: head + 1,
        last_position: head + ids.len() as u64,
        generation: Generation::base(),
        activation: None,
        plugin: None,
        state: json!({ "head": head + ids.len() as u64 }),
        previous: None,
        event_ids: None,
        time: "2026-01-01T00:00:00Z".into(),
    });
    c
}

async fn drain(s: &dyn Storage, part: &OutboxPartition) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    loop {
        let batches = s.outbox_next(part, 100).await.unwrap();
        if batches.is_empty() {
            return out;
        }
        for b in &batches {
            for r in &b.records {
                out.push((
                    r.key.entity_id.clone(),
                    serde_json::from_str::<serde_json::Value>(&r.event).unwrap()["lastposition"]
                        .as_u64()
                        .unwrap(),
                ));
            }
        }
        let published: Vec<_> = batches.iter().map(|b| b.published()).collect();
        s.outbox_done(part, &published).await.unwrap();
    }
}

/// Records of commits made before the claim are found in the table and
/// checked; those of a commit that failed part-way are handed out exactly
/// for the entities whose batches applied; those committed after the claim
/// come from memory; what a marker names is deleted, not handed out.
async fn the_outbox_hands_out_exactly_what_applied(s: &dyn Storage) {
    let p0 = OutboxPartition {
        source: "t".into(),
        partition: 0,
    };
    let (a, b, c) = (
        EntityKey::new("account", "a"),
        EntityKey::new("account", "b"),
        EntityKey::new("account", "c"),
    );
    // Before any claim: nothing held in memory.
    s.commit(recorded(&a, 0, &["a1", "a2"], 0)).await.unwrap();
    // A commit that fails part-way: b's batch applies, c's is fenced
    // (c claims a head it does not have).
    let mut partial = recorded(&b, 0, &["b1"], 0);
    let fenced = recorded(&c, 4, &["c5"], 0);
    partial.events.extend(fenced.events);
    partial.entities.extend(fenced.entities);
    partial.changes.extend(fenced.changes);
    assert!(matches!(
        s.commit(partial).await,
        Err(StoreError::Fenced(_))
    ));
    // The next holder finds a's and b's records, not c's.
    s.outbox_claim(&p0, &[]).await.unwrap();
    assert_eq!(
        drain(s, &p0).await,
        vec![("a".to_string(), 2), ("b".to_string(), 1)]
    );
    // After the claim, from memory, in commit order.
    s.commit(recorded(&a, 2, &["a3"], 0)).await.unwrap();
    s.commit(recorded(&b, 1, &["b2", "b3"], 0)).await.unwrap();
    assert_eq!(s.outbox_depth(), 2);
    assert_eq!(
        drain(s, &p0).await,
        vec![("a".to_string(), 3), ("b".to_string(), 3)]
    );
    assert_eq!(s.outbox_depth(), 0);
    // A batch published by a holder that died before deleting it: the
    // marker names it, and the next holder deletes it unpublished.
    s.outbox_release(&p0);
    s.commit(recorded(&a, 3, &["a4"], 0)).await.unwrap();
    s.outbox_claim(&p0, &[]).await.unwrap();
    let batches = s.outbox_next(&p0, 100).await.unwrap();
    assert_eq!(batches.len(), 1);
    let marker: Vec<_> = batches.iter().map(|b| b.published()).collect();
    s.outbox_release(&p0);
    s.outbox_claim(&p0, &marker).await.unwrap();
    assert!(drain(s, &p0).await.is_empty());
    // Another partition's records are that partition's.
    let p1 = OutboxPartition {
        source: "t".into(),
        partition: 1,
    };
    s.commit(recorded(&c, 0, &["c1"], 1)).await.unwrap();
    assert!(drain(s, &p0).await.is_empty());
    s.outbox_claim(&p1, &[]).await.unwrap();
    assert_eq!(drain(s, &p1).await, vec![("c".to_string(), 1)]);
    // An unclaimed partition is refused, not silently empty.
    s.outbox_release(&p1);
    assert!(s.outbox_next(&p1, 10).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_outbox_hands_out_what_applied_once() {
    on_fresh_store(|s| async move { the_outbox_hands_out_exactly_what_applied(&*s).await }).await;
}

/// More records committed after a claim, and before the first read, than
/// one scan of the table takes (2,000 rows): the scan pages past the
/// batches memory holds, finds nothing in doubt, and memory is handed out.
/// (Counted against the scan's limit, they kept the partition in doubt and
/// its records unpublished for good.)
async fn memory_beyond_one_scan_is_handed_out(s: &dyn Storage) {
    let p = OutboxPartition {
        source: "t".into(),
        partition: 2,
    };
    s.outbox_claim(&p, &[]).await.unwrap();
    let mut commit = Commit::default();
    for i in 0..2_100 {
        let c = recorded(&EntityKey::new("account", format!("m{i}")), 0, &["x"], 2);
        commit.events.extend(c.events.into_iter().map(|mut e| {
            e.id = format!("m{i}-1");
            e
        }));
        commit.entities.extend(c.entities);
        commit.changes.extend(c.changes);
    }
    s.commit(commit).await.unwrap();
    assert_eq!(s.outbox_depth(), 2_100);
    let out = drain(s, &p).await;
    assert_eq!(out.len(), 2_100);
    assert_eq!(s.outbox_depth(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_holding_more_than_one_scan_in_memory_is_handed_out() {
    on_fresh_store(|s| async move { memory_beyond_one_scan_is_handed_out(&*s).await }).await;
}

/// The previous holder of a partition commits after the new holder's
/// first read of it (its lanes finish the batches they hold when the
/// partition moves): a sweep of the rows written since finds the record,
/// which is handed out once, and the new holder's own records follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_holders_late_commit_is_swept_up() {
    let nodes = common::nodes();
    let keyspaces = common::Keyspaces::default();
    let (holder, previous) = keyspaces.open_pair(&nodes, 2).await;
    let (holder, previous): (&dyn Storage, &dyn Storage) = (&holder, &previous);
    let outcome = AssertUnwindSafe(async {
        let p = OutboxPartition {
            source: "t".into(),
            partition: 3,
        };
        let a = EntityKey::new("account", "late");
        holder.outbox_claim(&p, &[]).await.unwrap();
        assert!(drain(holder, &p).await.is_empty());
        previous
            .commit(recorded(&a, 0, &["l1", "l2"], 3))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut found = Vec::new();
        while found.is_empty() && started.elapsed() < std::time::Duration::from_secs(20) {
            found = drain(holder, &p).await;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert_eq!(found, vec![("late".to_string(), 2)], "never swept up");
        holder.commit(recorded(&a, 2, &["l3"], 3)).await.unwrap();
        assert_eq!(drain(holder, &p).await, vec![("late".to_string(), 3)]);
        // Published rows are deleted: later sweeps find nothing again.
        tokio::time::sleep(std::time::Duration::from_secs(6)).await;
        assert!(drain(holder, &p).await.is_empty());
    })
    .catch_unwind()
    .await;
    keyspaces.drop_all(&nodes).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// A keyspace of an older release has documents and no key index: the
/// first start of this release indexes them (once, marked as done), so
/// that listings show documents written before the index existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_written_before_the_key_index_are_listed_after_a_start() {
    let nodes = common::nodes();
    let keyspaces = common::Keyspaces::default();
    let old = keyspaces.open(&nodes, 2).await;
    let outcome = AssertUnwindSafe(async {
        let upsert = |key: &str| refold_store::ProjectionWrite::Upsert {
            projection: "balances".into(),
            key: key.into(),
            body: serde_json::json!({"key": key}),
        };
        old.commit(refold_store::Commit {
            projections: (0..40).map(|i| upsert(&format!("k{i:02}"))).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
        // What a keyspace of the older release looks like: no index rows,
        // and no mark that the backfill ran.
        let session = scylla::client::session_builder::SessionBuilder::new()
            .known_nodes(&nodes)
            .build()
            .await
            .unwrap();
        session
            .query_unpaged(
                format!("TRUNCATE {}.projection_index", keyspaces.last()),
                (),
            )
            .await
            .unwrap();
        let list = |s: std::sync::Arc<dyn Storage>| async move {
            let mut keys = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = s
                    .projection_page("balances", after.as_deref(), 7)
                    .await
                    .unwrap();
                let Some(last) = page.last() else { break };
                after = Some(last.cursor.clone());
                keys.extend(page.into_iter().map(|p| p.item.0));
            }
            keys.sort();
            keys
        };
        let old: std::sync::Arc<dyn Storage> = std::sync::Arc::new(old);
        assert!(list(old.clone()).await.is_empty(), "the index is gone");
        let new: std::sync::Arc<dyn Storage> =
            std::sync::Arc::new(keyspaces.reopen(&nodes, 2).await);
        let want: Vec<String> = (0..40).map(|i| format!("k{i:02}")).collect();
        assert_eq!(list(new.clone()).await, want);
        // Deleted later: gone from the listing as from the table.
        new.commit(refold_store::Commit {
            projections: vec![refold_store::ProjectionWrite::Delete {
                projection: "balances".into(),
                key: "k00".into(),
            }],
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(list(new).await.len(), 39);
    })
    .catch_unwind()
    .await;
    keyspaces.drop_all(&nodes).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

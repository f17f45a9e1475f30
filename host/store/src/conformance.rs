//! The storage conformance suite: what every backend must do, written once
//! against the traits and run by each backend's own tests (SQLite in its
//! crate's tests, Cassandra against the real server in the README's test
//! command).
//!
//! [`run`] runs every check, each on a fresh, empty store, and a failing
//! check panics with its name. Each check is also a function of its own,
//! to run alone while a backend is being fixed. Where the backends
//! legitimately differ (listing order, say), a check asserts only what the
//! trait promises.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde_json::{Value, json};

use crate::*;

/// Run every check, each on a fresh empty store from `fresh()`. Panics on
/// the first failing check, naming it.
pub async fn run<F, Fut>(mut fresh: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Arc<dyn Storage>>,
{
    macro_rules! checks {
        ($($check:ident),+ $(,)?) => {$(
            let store = fresh().await;
            named(stringify!($check), $check(&*store)).await;
        )+};
    }
    checks!(
        a_fenced_commit_leaves_nothing_behind,
        stale_writers_are_fenced_by_expected_head,
        an_event_row_written_meanwhile_fences_the_commit,
        known_ids_are_per_entity_and_return_the_stored_digest,
        history_is_ordered_and_bounded,
        load_omits_absent_keys,
        projections_follow_commits,
        generations_round_trip,
        adopting_projections_keeps_what_they_replace,
        dropping_a_namespace_forgets_its_states_quarantines_and_projections,
        quarantine_is_read_listed_and_released,
        dead_letters_are_read_by_id_and_removed_once,
        listings_page_through_everything_once,
        checkpoints_move_as_committed,
        snapshots_answer_the_latest_at_or_before,
        plugin_versions_round_trip,
        activations_are_conditional_on_their_predecessor,
        every_activation_is_kept_in_its_history,
        rebuild_records_are_compare_and_set_on_their_heartbeat,
    );
}

/// Await `check`; if it panics, panic again with a message that names it.
async fn named(name: &'static str, check: impl Future<Output = ()>) {
    let outcome = CatchUnwind(Box::pin(check)).await;
    if let Err(payload) = outcome {
        let why = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        panic!("storage conformance check `{name}` failed: {why}");
    }
}

/// A future whose panic is returned instead of unwinding (std has
/// `catch_unwind` for closures only).
struct CatchUnwind<'a>(Pin<Box<dyn Future<Output = ()> + 'a>>);

impl Future for CatchUnwind<'_> {
    type Output = std::thread::Result<()>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(())) => Poll::Ready(Ok(())),
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}

// ---- fixtures ---------------------------------------------------------------

fn account(id: &str) -> EntityKey {
    EntityKey::new("account", id)
}

fn event(key: &EntityKey, position: u64, id: &str) -> StoredEvent {
    StoredEvent {
        key: key.clone(),
        position,
        id: id.into(),
        source: "/conformance".into(),
        event_type: "deposited".into(),
        time: Some("2026-01-01T00:00:00Z".into()),
        data: RawJson::from_value(&json!({"n": position, "id": id})),
        origin: Some(Origin {
            source: "events.jsonl".into(),
            partition: 0,
            offset: position as i64 * 100,
        }),
        record: Some(RawJson::from_value(&json!({"id": id}))),
        digest: Some(format!("digest-{id}")),
    }
}

fn plugin(digest: &str) -> PluginRef {
    PluginRef {
        name: "bank".into(),
        version: "1.0.0".into(),
        digest: digest.into(),
    }
}

/// The state `head` of an entity, written over `expected_head`.
fn update(key: &EntityKey, head: u64, expected_head: u64) -> EntityUpdate {
    EntityUpdate {
        key: key.clone(),
        state: json!({"head": head}),
        position: head,
        head,
        expected_head,
        plugin: Some(plugin("d1")),
        quarantined: false,
        generation: Generation::base(),
    }
}

/// Events `from..=to` of `key` with its state moved from `from - 1` to `to`.
fn batch(key: &EntityKey, from: u64, to: u64) -> Commit {
    Commit {
        events: (from..=to)
            .map(|p| event(key, p, &format!("{}-e{p}", key.entity_id)))
            .collect(),
        entities: vec![update(key, to, from - 1)],
        ..Commit::default()
    }
}

fn checkpoint(source: &str, partition: i32, offset: i64) -> Checkpoint {
    Checkpoint {
        source: source.into(),
        partition,
        offset,
    }
}

fn upsert(projection: &str, key: &str, body: Value) -> ProjectionWrite {
    ProjectionWrite::Upsert {
        projection: projection.into(),
        key: key.into(),
        body,
    }
}

fn held(key: &EntityKey, position: u64) -> QuarantineRecord {
    QuarantineRecord {
        key: key.clone(),
        event_id: format!("{}-e{position}", key.entity_id),
        event_position: position,
        kind: "panic".into(),
        error: "boom".into(),
        plugin: plugin("d1"),
        recorded_at: "2026-01-01T00:00:00Z".into(),
    }
}

pub(crate) fn dead_letter(i: usize) -> DeadLetter {
    DeadLetter {
        id: format!("dl-{i:03}"),
        code: "invalid_json".into(),
        reason: "not JSON".into(),
        payload: "x".repeat(i),
        origin: None,
        event_id: None,
        entity_type: None,
        recorded_at: "2026-01-01T00:00:00Z".into(),
    }
}

pub(crate) fn quarantine(i: usize) -> QuarantineRecord {
    QuarantineRecord {
        key: EntityKey::new(
            if i.is_multiple_of(2) { "a" } else { "b" },
            format!("e-{i}"),
        ),
        event_id: format!("ev-{i}"),
        event_position: 1,
        kind: "panic".into(),
        error: "boom".into(),
        plugin: PluginRef {
            name: "p".into(),
            version: "1".into(),
            digest: "d".into(),
        },
        recorded_at: "2026-01-01T00:00:00Z".into(),
    }
}

async fn head_of(s: &dyn Storage, key: &EntityKey) -> Option<u64> {
    s.load(std::slice::from_ref(key))
        .await
        .unwrap()
        .get(key)
        .map(|r| r.head)
}

async fn event_ids(s: &dyn Storage, key: &EntityKey) -> Vec<String> {
    s.history(key, 0, None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

fn assert_fenced(r: Result<()>, what: &str) {
    match r {
        Err(StoreError::Fenced(_)) => {}
        other => panic!("{what}: expected StoreError::Fenced, got {other:?}"),
    }
}

// ---- commits ----------------------------------------------------------------

/// A commit that is fenced leaves no part behind: none of its events,
/// states, quarantines, projections, dead letters or checkpoints.
pub async fn a_fenced_commit_leaves_nothing_behind(s: &dyn Storage) {
    let k = account("a1");
    let mut first = batch(&k, 1, 2);
    first.checkpoints = vec![checkpoint("f", 0, 10)];
    first.projections = vec![upsert("balances", "a1", json!({"n": 2}))];
    s.commit(first).await.unwrap();

    // Computed on head 1, but the head is 2.
    let stale = Commit {
        events: vec![event(&k, 3, "a1-e3")],
        entities: vec![EntityUpdate {
            quarantined: true,
            ..update(&k, 3, 1)
        }],
        projections: vec![
            upsert("balances", "a1", json!({"n": 3})),
            upsert("balances", "a2", json!({"n": 1})),
        ],
        dead_letters: vec![dead_letter(1)],
        quarantines: vec![held(&k, 3)],
        checkpoints: vec![checkpoint("f", 0, 99), checkpoint("f", 1, 5)],
        ..Commit::default()
    };
    assert_fenced(s.commit(stale).await, "a commit on a stale head");

    assert_eq!(event_ids(s, &k).await, ["a1-e1", "a1-e2"], "events");
    assert!(
        s.known_ids(&[(k.clone(), "a1-e3".into())])
            .await
            .unwrap()
            .is_empty(),
        "the fenced event is unknown"
    );
    let rec = &s.load(std::slice::from_ref(&k)).await.unwrap()[&k];
    assert_eq!(
        (rec.head, rec.state.clone(), rec.quarantined),
        (2, Some(json!({"head": 2})), false),
        "state"
    );
    assert_eq!(s.quarantine(&k).await.unwrap(), None, "quarantine");
    assert_eq!(
        s.projection("balances", "a1").await.unwrap(),
        Some(json!({"n": 2})),
        "projection"
    );
    assert_eq!(s.projection("balances", "a2").await.unwrap(), None);
    assert_eq!(s.dead_letter("dl-001").await.unwrap(), None, "dead letter");
    assert!(s.dead_letters(10).await.unwrap().is_empty());
    assert_eq!(
        s.checkpoints("f").await.unwrap(),
        vec![checkpoint("f", 0, 10)],
        "checkpoints"
    );
}

/// A state is written only over the head it was computed on: a second
/// creation, a guess and a writer that lost a race are all fenced, and
/// leave the winner's state as it was.
pub async fn stale_writers_are_fenced_by_expected_head(s: &dyn Storage) {
    let k = account("a1");
    s.commit(batch(&k, 1, 1)).await.unwrap();
    assert_eq!(head_of(s, &k).await, Some(1));

    let recreate = Commit {
        entities: vec![update(&k, 7, 0)],
        ..Commit::default()
    };
    assert_fenced(s.commit(recreate).await, "creating an entity that exists");
    let guess = Commit {
        entities: vec![update(&k, 7, 5)],
        ..Commit::default()
    };
    assert_fenced(s.commit(guess).await, "writing over a head never stored");

    s.commit(batch(&k, 2, 2)).await.unwrap();
    // Another writer computed on head 1 too, and comes second.
    let late = Commit {
        events: vec![event(&k, 2, "late-e2")],
        entities: vec![update(&k, 2, 1)],
        ..Commit::default()
    };
    assert_fenced(s.commit(late).await, "the loser of a race");
    let rec = &s.load(std::slice::from_ref(&k)).await.unwrap()[&k];
    assert_eq!((rec.head, rec.state.clone()), (2, Some(json!({"head": 2}))));
    assert_eq!(event_ids(s, &k).await, ["a1-e1", "a1-e2"]);
}

/// An event row already stored fails the whole commit, even when the head
/// it is fenced on matches: no state advances past an event this writer
/// did not store.
pub async fn an_event_row_written_meanwhile_fences_the_commit(s: &dyn Storage) {
    let k = account("a1");
    s.commit(Commit {
        events: vec![event(&k, 1, "e1")],
        entities: vec![update(&k, 1, 0)],
        ..Commit::default()
    })
    .await
    .unwrap();
    // The same event again at the next position, on the current head.
    let again = Commit {
        events: vec![event(&k, 2, "e1")],
        entities: vec![update(&k, 2, 1)],
        ..Commit::default()
    };
    assert_fenced(s.commit(again).await, "an event stored twice");
    assert_eq!(head_of(s, &k).await, Some(1));
    assert_eq!(event_ids(s, &k).await, ["e1"]);
}

/// Dedup: an event's identity is its entity key and its id, and the store
/// answers with the digest it stored (`None` when it stored none).
pub async fn known_ids_are_per_entity_and_return_the_stored_digest(s: &dyn Storage) {
    let (k1, k2) = (account("a1"), account("a2"));
    let other_type = EntityKey::new("ledger", "a1");
    let undigested = StoredEvent {
        digest: None,
        ..event(&k1, 2, "e2")
    };
    s.commit(Commit {
        events: vec![event(&k1, 1, "e1"), undigested, event(&k2, 1, "e9")],
        entities: vec![update(&k1, 2, 0), update(&k2, 1, 0)],
        ..Commit::default()
    })
    .await
    .unwrap();
    let asked: Vec<EventIdentity> = vec![
        (k1.clone(), "e1".into()),
        (k1.clone(), "e2".into()),
        (k1.clone(), "zz".into()),
        (k2.clone(), "e1".into()),
        (k2.clone(), "e9".into()),
        (other_type.clone(), "e1".into()),
    ];
    let known = s.known_ids(&asked).await.unwrap();
    let want: HashMap<EventIdentity, Option<String>> = [
        (
            (k1.clone(), "e1".to_string()),
            Some("digest-e1".to_string()),
        ),
        ((k1.clone(), "e2".to_string()), None),
        (
            (k2.clone(), "e9".to_string()),
            Some("digest-e9".to_string()),
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(known, want);
    assert!(s.known_ids(&[]).await.unwrap().is_empty());
}

/// `history(key, after, upto)` is the entity's events with
/// `after < position <= upto`, in order, as stored: the basis of `?at=`.
pub async fn history_is_ordered_and_bounded(s: &dyn Storage) {
    let (k, other) = (account("a1"), account("a2"));
    // Committed out of order, to see that the store orders them.
    let mut c = batch(&k, 1, 5);
    c.events.reverse();
    c.events.extend(batch(&other, 1, 1).events);
    c.entities.push(update(&other, 1, 0));
    s.commit(c).await.unwrap();

    let all = s.history(&k, 0, None).await.unwrap();
    let want: Vec<StoredEvent> = batch(&k, 1, 5).events;
    assert_eq!(all, want, "every field round-trips, in position order");
    let positions = |h: Vec<StoredEvent>| h.into_iter().map(|e| e.position).collect::<Vec<_>>();
    for (after, upto, want) in [
        (2, None, vec![3, 4, 5]),
        (0, Some(3), vec![1, 2, 3]),
        (2, Some(4), vec![3, 4]),
        (4, Some(4), vec![]),
        (0, Some(0), vec![]),
        (5, None, vec![]),
        (0, Some(99), vec![1, 2, 3, 4, 5]),
    ] {
        assert_eq!(
            positions(s.history(&k, after, upto).await.unwrap()),
            want,
            "history after {after} upto {upto:?}"
        );
    }
    assert!(
        s.history(&account("nobody"), 0, None)
            .await
            .unwrap()
            .is_empty()
    );
    // `event_ids` is what `history` gives, ids only.
    let ids_of = |h: Vec<StoredEvent>| h.into_iter().map(|e| e.id).collect::<Vec<_>>();
    for upto in [0, 3, 5, 99] {
        assert_eq!(
            s.event_ids(&k, upto).await.unwrap(),
            ids_of(s.history(&k, 0, Some(upto)).await.unwrap()),
            "event ids upto {upto}"
        );
    }
    assert_eq!(s.event_ids(&k, 99).await.unwrap().len(), 5);
    assert!(
        s.event_ids(&account("nobody"), 99)
            .await
            .unwrap()
            .is_empty()
    );
    let mut ids = s.entity_ids("account").await.unwrap();
    ids.sort();
    assert_eq!(ids, ["a1", "a2"]);
    assert!(s.entity_ids("ledger").await.unwrap().is_empty());
}

/// `load` answers the records it has, every field as written, and omits
/// the keys it has not.
pub async fn load_omits_absent_keys(s: &dyn Storage) {
    let k = account("a1");
    let mut c = batch(&k, 1, 3);
    c.entities[0].position = 2;
    s.commit(c).await.unwrap();
    let got = s
        .load(&[k.clone(), account("absent"), EntityKey::new("ledger", "a1")])
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[&k],
        EntityRecord {
            key: k.clone(),
            state: Some(json!({"head": 3})),
            position: 2,
            head: 3,
            plugin: Some(plugin("d1")),
            quarantined: false,
            generation: Generation::base(),
        }
    );
    assert!(s.load(&[]).await.unwrap().is_empty());
}

/// A commit's projection writes apply in order: upserts replace, deletes
/// remove.
pub async fn projections_follow_commits(s: &dyn Storage) {
    let mut c = batch(&account("a1"), 1, 1);
    c.projections = vec![
        upsert("balances", "a1", json!({"n": 1})),
        upsert("balances", "a2", json!({"n": 2})),
        upsert("balances", "a1", json!({"n": 3})),
        ProjectionWrite::Delete {
            projection: "balances".into(),
            key: "a2".into(),
        },
    ];
    s.commit(c).await.unwrap();
    assert_eq!(
        s.projection("balances", "a1").await.unwrap(),
        Some(json!({"n": 3}))
    );
    assert_eq!(s.projection("balances", "a2").await.unwrap(), None);
    assert_eq!(s.projection("owners", "a1").await.unwrap(), None);
}

// ---- generations and namespaces --------------------------------------------

/// A state's generation is stored with it and read back as written.
pub async fn generations_round_trip(s: &dyn Storage) {
    let (k1, k2) = (account("a1"), account("a2"));
    let rebuilt = Generation::from("account#d2.1");
    let mut c = batch(&k1, 1, 1);
    c.entities[0].generation = rebuilt.clone();
    c.events.extend(batch(&k2, 1, 1).events);
    c.entities.push(update(&k2, 1, 0));
    s.commit(c).await.unwrap();
    let got = s.load(&[k1.clone(), k2.clone()]).await.unwrap();
    assert_eq!(got[&k1].generation, rebuilt);
    assert!(got[&k2].generation.is_base());

    let mut back = batch(&k1, 2, 2);
    back.entities[0].generation = Generation::base();
    s.commit(back).await.unwrap();
    assert!(
        s.load(std::slice::from_ref(&k1)).await.unwrap()[&k1]
            .generation
            .is_base()
    );
}

/// Adopting a namespace's read model: every `name@ns` document becomes
/// `name`'s, each live document it replaces is kept under `name@archive`
/// (whatever the archive held before goes), live documents it does not
/// replace stay, and nothing is left under `name@ns`.
pub async fn adopting_projections_keeps_what_they_replace(s: &dyn Storage) {
    let (ns, archive) = ("account#d2.1", "account#base");
    let built = format!("balances@{ns}");
    let kept = format!("balances@{archive}");
    let mut c = batch(&account("a1"), 1, 1);
    c.projections = vec![
        upsert("balances", "a1", json!({"live": 1})),
        upsert("balances", "a3", json!({"live": 3})),
        upsert(&built, "a1", json!({"built": 1})),
        upsert(&built, "a2", json!({"built": 2})),
        upsert(&kept, "a9", json!({"archived": 9})),
        upsert("owners@account#d3.1", "a1", json!({"other": 1})),
    ];
    s.commit(c).await.unwrap();
    s.adopt_projections(ns, archive).await.unwrap();

    let doc = |p: String, k: &'static str| async move { s.projection(&p, k).await.unwrap() };
    assert_eq!(
        doc("balances".into(), "a1").await,
        Some(json!({"built": 1}))
    );
    assert_eq!(
        doc("balances".into(), "a2").await,
        Some(json!({"built": 2}))
    );
    assert_eq!(
        doc("balances".into(), "a3").await,
        Some(json!({"live": 3})),
        "a live document nothing replaces stays"
    );
    assert_eq!(
        doc(kept.clone(), "a1").await,
        Some(json!({"live": 1})),
        "the replaced document is archived"
    );
    assert_eq!(doc(kept.clone(), "a2").await, None, "nothing was replaced");
    assert_eq!(
        doc(kept.clone(), "a9").await,
        None,
        "the older archive goes"
    );
    assert_eq!(doc(built.clone(), "a1").await, None);
    assert_eq!(doc(built.clone(), "a2").await, None);
    assert_eq!(
        doc("owners@account#d3.1".into(), "a1").await,
        Some(json!({"other": 1})),
        "another namespace is untouched"
    );
}

/// Dropping a namespace forgets the states, quarantines and projections
/// kept under it (states and quarantines under the namespace as their
/// entity type, projections as `name@ns`), and nothing else.
pub async fn dropping_a_namespace_forgets_its_states_quarantines_and_projections(s: &dyn Storage) {
    let ns = "account#d2.1";
    let other_ns = "account#d3.1";
    let (live, saved, other) = (
        account("a1"),
        EntityKey::new(ns, "a1"),
        EntityKey::new(other_ns, "a1"),
    );
    let mut c = batch(&live, 1, 1);
    c.entities.push(EntityUpdate {
        quarantined: true,
        ..update(&saved, 1, 0)
    });
    c.entities.push(EntityUpdate {
        quarantined: true,
        ..update(&other, 1, 0)
    });
    c.quarantines = vec![held(&saved, 1), held(&other, 1)];
    c.projections = vec![
        upsert("balances", "a1", json!({"live": 1})),
        upsert(&format!("balances@{ns}"), "a1", json!({"saved": 1})),
        upsert(&format!("owners@{ns}"), "a1", json!({"saved": 1})),
        upsert(&format!("balances@{other_ns}"), "a1", json!({"other": 1})),
    ];
    s.commit(c).await.unwrap();
    s.drop_namespace(ns).await.unwrap();

    let got = s
        .load(&[live.clone(), saved.clone(), other.clone()])
        .await
        .unwrap();
    assert!(!got.contains_key(&saved), "the namespace's state is gone");
    assert!(got.contains_key(&live) && got.contains_key(&other));
    assert_eq!(s.quarantine(&saved).await.unwrap(), None);
    assert_eq!(s.quarantine(&other).await.unwrap(), Some(held(&other, 1)));
    let listed: Vec<EntityKey> = s
        .quarantined()
        .await
        .unwrap()
        .into_iter()
        .map(|q| q.key)
        .collect();
    assert_eq!(listed, vec![other.clone()]);
    for p in [format!("balances@{ns}"), format!("owners@{ns}")] {
        assert_eq!(s.projection(&p, "a1").await.unwrap(), None, "{p}");
    }
    assert_eq!(
        s.projection("balances", "a1").await.unwrap(),
        Some(json!({"live": 1}))
    );
    assert_eq!(
        s.projection(&format!("balances@{other_ns}"), "a1")
            .await
            .unwrap(),
        Some(json!({"other": 1}))
    );
    // The raw events are never a namespace's.
    assert_eq!(event_ids(s, &live).await, ["a1-e1"]);
}

// ---- repair -----------------------------------------------------------------

/// A quarantine committed with its state is a point read and listed;
/// `release` removes it and clears the flag, and so does a commit that
/// names the entity in `released`.
pub async fn quarantine_is_read_listed_and_released(s: &dyn Storage) {
    let (k1, k2) = (account("a1"), account("a2"));
    let stuck = |k: &EntityKey| EntityUpdate {
        state: json!({"head": 0}),
        position: 0,
        quarantined: true,
        ..update(k, 1, 0)
    };
    let mut c = batch(&k1, 1, 1);
    c.entities = vec![stuck(&k1), stuck(&k2)];
    c.events.extend(batch(&k2, 1, 1).events);
    c.quarantines = vec![held(&k1, 1), held(&k2, 1)];
    s.commit(c).await.unwrap();

    assert_eq!(s.quarantine(&k1).await.unwrap(), Some(held(&k1, 1)));
    assert_eq!(s.quarantine(&account("a3")).await.unwrap(), None);
    let page = s.quarantine_page(None, 10).await.unwrap();
    let listed: HashSet<EntityKey> = page.into_iter().map(|p| p.item.key).collect();
    assert_eq!(listed, HashSet::from([k1.clone(), k2.clone()]));
    let rec = &s.load(std::slice::from_ref(&k1)).await.unwrap()[&k1];
    assert!(rec.quarantined);
    assert_eq!((rec.position, rec.head), (0, 1), "the event is held");

    s.release(&k1).await.unwrap();
    assert_eq!(s.quarantine(&k1).await.unwrap(), None);
    assert!(!s.load(std::slice::from_ref(&k1)).await.unwrap()[&k1].quarantined);

    s.commit(Commit {
        entities: vec![update(&k2, 1, 1)],
        released: vec![k2.clone()],
        ..Commit::default()
    })
    .await
    .unwrap();
    assert_eq!(s.quarantine(&k2).await.unwrap(), None);
    assert!(!s.load(std::slice::from_ref(&k2)).await.unwrap()[&k2].quarantined);
    assert!(s.quarantined().await.unwrap().is_empty());
}

/// A dead letter is a point read by id, stored once however often it is
/// committed, and removed once.
pub async fn dead_letters_are_read_by_id_and_removed_once(s: &dyn Storage) {
    let traced = DeadLetter {
        origin: Some(Origin {
            source: "events.jsonl".into(),
            partition: 2,
            offset: 512,
        }),
        event_id: Some("e7".into()),
        entity_type: Some("account".into()),
        ..dead_letter(1)
    };
    let c = Commit {
        dead_letters: vec![traced.clone(), dead_letter(2)],
        ..Commit::default()
    };
    s.commit(c.clone()).await.unwrap();
    // Read again after a crash: the same ids.
    s.commit(c).await.unwrap();

    assert_eq!(s.dead_letter("dl-001").await.unwrap(), Some(traced));
    assert_eq!(s.dead_letter("dl-999").await.unwrap(), None);
    assert_eq!(s.dead_letters(100).await.unwrap().len(), 2, "stored once");
    assert!(s.remove_dead_letter("dl-001").await.unwrap());
    assert!(
        !s.remove_dead_letter("dl-001").await.unwrap(),
        "already gone"
    );
    assert_eq!(s.dead_letter("dl-001").await.unwrap(), None);
    let left: Vec<String> = s
        .dead_letters(100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left, ["dl-002"]);
}

/// Pages of at most `limit`, each resumed from the last item's cursor,
/// list everything exactly once; the unpaged listings still see it all.
/// A cursor that is not of the store's making is refused as such.
pub async fn listings_page_through_everything_once(s: &dyn Storage) {
    s.commit(Commit {
        dead_letters: (0..23).map(dead_letter).collect(),
        quarantines: (0..11).map(quarantine).collect(),
        ..Commit::default()
    })
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.dead_letter_page(after.as_deref(), 5).await.unwrap();
        assert!(page.len() <= 5);
        let Some(last) = page.last() else { break };
        after = Some(last.cursor.clone());
        seen.extend(page.into_iter().map(|p| p.item.id));
    }
    let want: Vec<String> = (0..23).map(|i| format!("dl-{i:03}")).collect();
    assert_eq!(seen.len(), want.len(), "each once");
    let distinct: HashSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), want.len(), "each once");
    assert_eq!(s.dead_letters(7).await.unwrap().len(), 7);
    assert_eq!(s.dead_letters(1000).await.unwrap().len(), 23);

    let mut keys = HashSet::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.quarantine_page(after.as_deref(), 4).await.unwrap();
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = Some(last.cursor.clone());
        for p in page {
            assert!(keys.insert(p.item.key), "listed twice");
        }
    }
    assert_eq!(keys.len(), 11);
    assert_eq!(s.quarantined().await.unwrap().len(), 11);

    // Entities of a type: 13 accounts with events, and a ledger that must
    // not show among them. Ids with characters that sort before letters.
    let ids: Vec<String> = (0..13).map(|i| format!("acc {i:02}/x")).collect();
    for id in &ids {
        s.commit(batch(&account(id), 1, 2)).await.unwrap();
    }
    s.commit(batch(&EntityKey::new("ledger", "l-1"), 1, 1))
        .await
        .unwrap();
    let mut seen = HashSet::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.entity_page("account", after.as_deref(), 4).await.unwrap();
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = Some(last.cursor.clone());
        for p in page {
            assert!(seen.insert(p.item), "listed twice");
        }
    }
    assert_eq!(seen, ids.iter().cloned().collect::<HashSet<_>>());

    // Documents of one projection: 17 written, one of them deleted, and
    // another projection's documents that must not show.
    let mut writes: Vec<ProjectionWrite> = (0..17)
        .map(|i| upsert("balances", &format!("k{i:02}"), json!({"i": i})))
        .collect();
    writes.extend((0..3).map(|i| upsert("owners", &format!("k{i:02}"), json!({"o": i}))));
    s.commit(Commit {
        projections: writes,
        ..Commit::default()
    })
    .await
    .unwrap();
    s.commit(Commit {
        projections: vec![ProjectionWrite::Delete {
            projection: "balances".into(),
            key: "k05".into(),
        }],
        ..Commit::default()
    })
    .await
    .unwrap();
    let mut docs = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = s
            .projection_page("balances", after.as_deref(), 5)
            .await
            .unwrap();
        assert!(page.len() <= 5);
        let Some(last) = page.last() else { break };
        after = Some(last.cursor.clone());
        for p in page {
            let (k, body) = p.item;
            assert!(docs.insert(k, body).is_none(), "listed twice");
        }
    }
    assert_eq!(docs.len(), 16, "{docs:?}");
    assert!(
        !docs.contains_key("k05"),
        "a deleted document is not listed"
    );
    assert_eq!(docs["k16"], json!({"i": 16}));
    assert!(
        s.projection_page("nothing", None, 5)
            .await
            .unwrap()
            .is_empty()
    );

    // Not hex, and well-formed but of a shape no backend issues (a store
    // cannot tell a forged cursor of its own shape from one it issued).
    let forged = encode_cursor(&"forged");
    for cursor in ["not-hex", forged.as_str()] {
        let e = s.dead_letter_page(Some(cursor), 5).await.unwrap_err();
        assert!(matches!(e, StoreError::BadCursor(_)), "{cursor}: {e:#}");
        let e = s.quarantine_page(Some(cursor), 5).await.unwrap_err();
        assert!(matches!(e, StoreError::BadCursor(_)), "{cursor}: {e:#}");
    }
    let e = s
        .entity_page("account", Some("not-hex"), 5)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::BadCursor(_)), "{e:#}");
    let e = s
        .projection_page("balances", Some("not-hex"), 5)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::BadCursor(_)), "{e:#}");
}

// ---- positions --------------------------------------------------------------

/// Checkpoints are what the last successful commit wrote, per source and
/// partition; a fenced commit does not move them.
pub async fn checkpoints_move_as_committed(s: &dyn Storage) {
    let sorted = |mut v: Vec<Checkpoint>| {
        v.sort_by_key(|c| c.partition);
        v
    };
    s.commit(Commit {
        checkpoints: vec![
            checkpoint("f", 0, 10),
            checkpoint("f", 1, 3),
            checkpoint("g", 0, 7),
        ],
        ..Commit::default()
    })
    .await
    .unwrap();
    assert_eq!(
        sorted(s.checkpoints("f").await.unwrap()),
        [checkpoint("f", 0, 10), checkpoint("f", 1, 3)]
    );
    assert_eq!(s.checkpoints("g").await.unwrap(), [checkpoint("g", 0, 7)]);
    assert!(s.checkpoints("h").await.unwrap().is_empty());

    let k = account("a1");
    let mut c = batch(&k, 1, 1);
    c.checkpoints = vec![checkpoint("f", 0, 20)];
    s.commit(c).await.unwrap();
    assert_eq!(
        sorted(s.checkpoints("f").await.unwrap()),
        [checkpoint("f", 0, 20), checkpoint("f", 1, 3)]
    );

    let mut stale = batch(&k, 1, 1);
    stale.checkpoints = vec![checkpoint("f", 0, 99)];
    assert_fenced(s.commit(stale).await, "a second creation");
    assert_eq!(
        sorted(s.checkpoints("f").await.unwrap()),
        [checkpoint("f", 0, 20), checkpoint("f", 1, 3)],
        "a fenced commit moves no checkpoint"
    );

    // A source of many partitions, all moved by one commit.
    let many: Vec<Checkpoint> = (0..100)
        .map(|p| checkpoint("wide", p, 1000 + i64::from(p)))
        .collect();
    s.commit(Commit {
        checkpoints: many.clone(),
        ..Commit::default()
    })
    .await
    .unwrap();
    assert_eq!(sorted(s.checkpoints("wide").await.unwrap()), many);
}

/// `snapshot_before` answers the latest snapshot at or before a position,
/// of that entity by that plugin digest only.
pub async fn snapshots_answer_the_latest_at_or_before(s: &dyn Storage) {
    let (k, other) = (account("a1"), account("a2"));
    let snaps = [(2, json!({"at": 2})), (5, json!({"at": 5}))];
    s.put_snapshots(&k, "d1", &snaps).await.unwrap();
    s.put_snapshots(&k, "d2", &[(3, json!({"by": "d2"}))])
        .await
        .unwrap();
    s.put_snapshots(&other, "d1", &[]).await.unwrap();
    for (at, want) in [
        (1, None),
        (2, Some((2, json!({"at": 2})))),
        (4, Some((2, json!({"at": 2})))),
        (5, Some((5, json!({"at": 5})))),
        (1000, Some((5, json!({"at": 5})))),
    ] {
        assert_eq!(
            s.snapshot_before(&k, "d1", at).await.unwrap(),
            want,
            "at {at}"
        );
    }
    assert_eq!(
        s.snapshot_before(&k, "d2", 10).await.unwrap(),
        Some((3, json!({"by": "d2"})))
    );
    assert_eq!(s.snapshot_before(&k, "d3", 10).await.unwrap(), None);
    assert_eq!(s.snapshot_before(&other, "d1", 10).await.unwrap(), None);
    // Idempotent: the same snapshots again change nothing.
    s.put_snapshots(&k, "d1", &snaps).await.unwrap();
    assert_eq!(
        s.snapshot_before(&k, "d1", 4).await.unwrap(),
        Some((2, json!({"at": 2})))
    );
}

// ---- plugin registry --------------------------------------------------------

fn version(entity_type: &str, n: u32, bytes: &[u8]) -> PluginVersion {
    PluginVersion {
        entity_type: entity_type.into(),
        name: "bank".into(),
        version: format!("1.{n}.0"),
        digest: format!("{entity_type}-digest-{n}"),
        size: bytes.len() as u64,
        uploaded_at: format!("2026-01-01T00:00:0{n}Z"),
    }
}

/// Versions and their bytes round-trip (a component is megabytes), listed
/// per entity type oldest first, stored once per digest.
pub async fn plugin_versions_round_trip(s: &dyn Storage) {
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
    let small = b"\0asm component".to_vec();
    let (v1, v2) = (version("account", 1, &big), version("account", 2, &small));
    let v3 = version("ledger", 3, &small);
    s.put_plugin(&v1, &big).await.unwrap();
    s.put_plugin(&v2, &small).await.unwrap();
    s.put_plugin(&v3, &small).await.unwrap();
    s.put_plugin(&v1, &big).await.unwrap();

    assert_eq!(
        s.plugin_versions("account").await.unwrap(),
        [v1.clone(), v2.clone()]
    );
    assert_eq!(s.plugin_versions("ledger").await.unwrap(), [v3]);
    assert!(s.plugin_versions("nothing").await.unwrap().is_empty());
    let got = s.plugin_bytes(&v1.digest).await.unwrap().expect("stored");
    assert!(got == big, "{} bytes back of {}", got.len(), big.len());
    assert_eq!(s.plugin_bytes(&v2.digest).await.unwrap(), Some(small));
    assert_eq!(s.plugin_bytes("no-such-digest").await.unwrap(), None);
}

fn activation(entity_type: &str, digest: &str, seq: i64) -> Activation {
    Activation {
        entity_type: entity_type.into(),
        digest: digest.into(),
        previous: None,
        mode: ActivationMode::Forward,
        generation: Generation::base(),
        previous_generation: None,
        seq,
        activated_at: "2026-01-01T00:00:00Z".into(),
        rolled_back: vec![],
    }
}

/// An activation is written only as the first of its entity type or as
/// the successor of the stored one: two built on the same predecessor
/// cannot both win, and the loser is told it was fenced. Activations are
/// point reads, listed sorted by entity type, every field as written.
pub async fn activations_are_conditional_on_their_predecessor(s: &dyn Storage) {
    s.put_activation(&activation("account", "d1", 1))
        .await
        .unwrap();
    assert_fenced(
        s.put_activation(&activation("account", "d0", 1)).await,
        "a second first activation",
    );
    let rebuilt = Activation {
        previous: Some("d1".into()),
        mode: ActivationMode::Rebuild,
        generation: Generation::from("account#d2.1"),
        previous_generation: Some(Generation::base()),
        rolled_back: vec!["d0".into(), "d9".into()],
        ..activation("account", "d2", 2)
    };
    s.put_activation(&rebuilt).await.unwrap();
    assert_fenced(
        s.put_activation(&activation("account", "d3", 2)).await,
        "a successor of a replaced activation",
    );
    assert_fenced(
        s.put_activation(&activation("account", "d4", 4)).await,
        "an activation that skips one",
    );
    assert_eq!(
        s.activation("account").await.unwrap(),
        Some(rebuilt.clone())
    );
    assert_eq!(s.activation("ledger").await.unwrap(), None);

    s.put_activation(&activation("zeta", "z1", 1))
        .await
        .unwrap();
    s.put_activation(&activation("ledger", "l1", 1))
        .await
        .unwrap();
    let all = s.activations().await.unwrap();
    let types: Vec<&str> = all.iter().map(|a| a.entity_type.as_str()).collect();
    assert_eq!(
        types,
        ["account", "ledger", "zeta"],
        "sorted by entity type"
    );
    assert_eq!(all[0], rebuilt);
}

/// Every activation recorded is kept, newest first, paged by `seq`; a
/// fenced one is not; types do not mix.
pub async fn every_activation_is_kept_in_its_history(s: &dyn Storage) {
    assert!(
        s.activation_history("ledger", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let mut written = Vec::new();
    for seq in 1..=5 {
        let a = Activation {
            previous: (seq > 1).then(|| format!("d{}", seq - 1)),
            mode: if seq == 3 {
                ActivationMode::Rebuild
            } else {
                ActivationMode::Forward
            },
            ..activation("ledger", &format!("d{seq}"), seq)
        };
        s.put_activation(&a).await.unwrap();
        written.push(a);
        if seq == 2 {
            assert_fenced(
                s.put_activation(&activation("ledger", "lost", 2)).await,
                "a second activation 2",
            );
        }
    }
    s.put_activation(&activation("other", "o1", 1))
        .await
        .unwrap();
    written.reverse();
    assert_eq!(
        s.activation_history("ledger", None, 100).await.unwrap(),
        written,
        "every one, newest first, every field, the fenced one not"
    );
    let first = s.activation_history("ledger", None, 2).await.unwrap();
    assert_eq!(first, written[..2]);
    let rest = s
        .activation_history("ledger", Some(first[1].seq), 100)
        .await
        .unwrap();
    assert_eq!(rest, written[2..], "the page below seq 4");
    assert!(
        s.activation_history("ledger", Some(1), 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.activation_history("other", None, 10).await.unwrap(),
        [activation("other", "o1", 1)]
    );
}

fn rebuild(id: &str, state: RebuildState, heartbeat_ms: i64) -> RebuildRecord {
    RebuildRecord {
        id: id.into(),
        entity_type: "account".into(),
        digest: "d1".into(),
        generation: Generation::from("account#d1.1"),
        state,
        entities_done: 3,
        entities_total: 10,
        events_done: 30,
        events_total: 100,
        quarantined: 0,
        error: None,
        owner: "h/1/0".into(),
        started_at: "2026-01-01T00:00:00Z".into(),
        finished_at: None,
        heartbeat_ms,
    }
}

/// A rebuild record is created once, then replaced only over the heartbeat
/// its writer last saw: a writer that missed a write loses, and is told.
pub async fn rebuild_records_are_compare_and_set_on_their_heartbeat(s: &dyn Storage) {
    use RebuildState::*;
    let id = "rb-account-1";
    assert!(
        s.put_rebuild(&rebuild(id, Running, 10), None)
            .await
            .unwrap()
    );
    assert!(
        !s.put_rebuild(&rebuild(id, Running, 11), None)
            .await
            .unwrap(),
        "created twice"
    );
    assert!(
        s.put_rebuild(&rebuild(id, CatchingUp, 20), Some(10))
            .await
            .unwrap()
    );
    assert!(
        !s.put_rebuild(&rebuild(id, Done, 30), Some(10))
            .await
            .unwrap(),
        "a writer that missed the last write"
    );
    assert!(
        !s.put_rebuild(&rebuild("rb-none", Done, 30), Some(1))
            .await
            .unwrap(),
        "replacing a record that does not exist"
    );
    let failed = RebuildRecord {
        error: Some("boom".into()),
        finished_at: Some("2026-01-01T00:01:00Z".into()),
        ..rebuild("rb-account-2", Failed, 5)
    };
    assert!(s.put_rebuild(&failed, None).await.unwrap());
    let mut all = s.rebuilds().await.unwrap();
    all.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(all, [rebuild(id, CatchingUp, 20), failed]);
}

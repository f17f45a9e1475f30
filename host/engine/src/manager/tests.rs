//! The plugin manager's use cases over an in-memory SQLite store, with the
//! real bank components: version 1 (`examples/bank/bank.wasm`, configured)
//! and version 2 (`plugins/target/components/bank-v2.wasm`, installed).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use refold_source::SourceRecord;
use refold_store::{ActivationMode, RebuildState};
use refold_store_sqlite::SqliteStore;
use refold_types::event::EntityKey;

use super::*;
use crate::config::HostConfig;
use crate::pipeline::{BatchReport, Pipeline};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn bank_v2() -> Vec<u8> {
    let p = repo("plugins/target/components/bank-v2.wasm");
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "{} cannot be read ({e}): build the guest components with plugins/build.sh",
            p.display()
        )
    })
}

fn config() -> HostConfig {
    let mut config = HostConfig::default();
    config.plugins.files = vec![repo("examples/bank/bank.wasm")];
    config
}

/// A manager over `store` with bank v1 configured, as a host starts.
async fn manager_on(store: Arc<SqliteStore>, config: HostConfig) -> PluginManager {
    let host = Host::with_storage(config, store.clone(), store).unwrap();
    let m = PluginManager::new(host);
    m.register_configured().await.unwrap();
    m
}

async fn manager() -> PluginManager {
    manager_on(Arc::new(SqliteStore::in_memory().unwrap()), config()).await
}

fn record(offset: i64, payload: Value) -> SourceRecord {
    SourceRecord::at("t", 0, offset, payload.to_string().into_bytes())
}

fn event(offset: i64, account: &str, event_type: &str, data: Value) -> SourceRecord {
    record(
        offset,
        json!({"specversion": "1.0", "id": format!("e{offset}"), "source": "/t",
            "type": event_type, "subject": account, "entitytype": "account", "data": data}),
    )
}

fn opened(offset: i64, account: &str) -> SourceRecord {
    event(
        offset,
        account,
        "account.opened",
        json!({"owner": format!("owner-{account}")}),
    )
}

fn deposit(offset: i64, account: &str, amount: i64) -> SourceRecord {
    event(
        offset,
        account,
        "account.deposited",
        json!({ "amount": amount }),
    )
}

/// One batch through the pipeline, between two batches of anything else.
async fn ingest(m: &PluginManager, records: &[SourceRecord]) -> BatchReport {
    let _gate = m.gate().read().await;
    Pipeline::for_host(&m.host).process(records).await.unwrap()
}

async fn record_of(m: &PluginManager, key: &EntityKey) -> refold_store::EntityRecord {
    m.host
        .storage
        .load(std::slice::from_ref(key))
        .await
        .unwrap()
        .remove(key)
        .unwrap_or_else(|| panic!("no record of {key}"))
}

fn account(id: &str) -> EntityKey {
    EntityKey::new("account", id)
}

fn active_digest(m: &PluginManager) -> String {
    m.host.registry.get("account").unwrap().digest.clone()
}

async fn wait_for(m: &PluginManager, rebuild: &str) -> RebuildStatus {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let s = m.rebuild_status(rebuild).await.unwrap().unwrap();
        if s.state.is_final() {
            return s;
        }
        assert!(
            Instant::now() < until,
            "rebuild still {} after 60 s",
            s.state
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn install_refuses_what_is_not_a_bank_component_and_keeps_one_version_per_digest() {
    let m = manager().await;
    let v1 = active_digest(&m);
    ingest(&m, &[opened(0, "a"), deposit(1, "a", 10), opened(2, "b")]).await;

    let err = m
        .install(b"not a component".to_vec(), Some("account"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, InstallError::Invalid(_)), "{err}");
    let err = m.install(bank_v2(), Some("order"), None).await.unwrap_err();
    assert!(
        matches!(&err, InstallError::WrongEntityType { expected, got } if expected == "order" && got == "account"),
        "{err}"
    );

    let first = m.install(bank_v2(), Some("account"), None).await.unwrap();
    assert_eq!(first.version.version, "2.0.0");
    assert_eq!(
        first.sample,
        SampleReport {
            entities: 2,
            events: 3
        }
    );
    assert_eq!((first.activation, first.rebuild.as_deref()), (None, None));
    let again = m.install(bank_v2(), Some("account"), None).await.unwrap();
    assert_eq!(again.version.digest, first.version.digest);
    let versions = m
        .host
        .plugin_store
        .plugin_versions("account")
        .await
        .unwrap();
    let digests: Vec<&str> = versions.iter().map(|v| v.digest.as_str()).collect();
    assert_eq!(digests.len(), 2, "{digests:?}");
    assert!(digests.contains(&v1.as_str()) && digests.contains(&first.version.digest.as_str()));
    // Installed without a mode: stored, not active.
    assert_eq!(active_digest(&m), v1);
}

#[tokio::test]
async fn a_forward_activation_keeps_the_states_and_folds_on_with_the_new_version() {
    let m = manager().await;
    let v1 = active_digest(&m);
    ingest(&m, &[opened(0, "a"), deposit(1, "a", 10)]).await;

    let installed = m
        .install(bank_v2(), Some("account"), Some(SwapMode::Forward))
        .await
        .unwrap();
    assert_eq!(installed.activation, Some(ActivationMode::Forward));
    assert_eq!(installed.rebuild, None);
    let v2 = installed.version.digest;
    assert_eq!(active_digest(&m), v2);
    let a = m
        .host
        .plugin_store
        .activation("account")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (a.mode, a.previous.as_deref(), a.generation.is_base()),
        (ActivationMode::Forward, Some(v1.as_str()), true)
    );
    // The state v1 computed stays until the next event, which v2 folds on.
    let before = record_of(&m, &account("a")).await;
    assert_eq!(before.state.as_ref().unwrap().get("tier"), None);
    ingest(&m, &[deposit(2, "a", 5)]).await;
    let after = record_of(&m, &account("a")).await;
    let state = after.state.unwrap();
    assert_eq!(
        (&state["balance"], &state["tier"]),
        (&json!(15), &json!("standard"))
    );
    assert_eq!(after.plugin.unwrap().version, "2.0.0");

    // The same version again changes nothing.
    assert_eq!(
        m.activate("account", &v2, SwapMode::Forward).await.unwrap(),
        None
    );
    let same = m
        .host
        .plugin_store
        .activation("account")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(same.seq, a.seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_refolds_every_entity_into_a_new_generation_then_cuts_over_at_once() {
    let m = manager().await;
    let v1 = active_digest(&m);
    ingest(
        &m,
        &[
            opened(0, "a"),
            deposit(1, "a", 200_000),
            opened(2, "b"),
            deposit(3, "b", 7),
            deposit(4, "b", 8),
        ],
    )
    .await;

    let installed = m
        .install(bank_v2(), Some("account"), Some(SwapMode::Rebuild))
        .await
        .unwrap();
    assert_eq!(installed.activation, Some(ActivationMode::Rebuild));
    let id = installed.rebuild.expect("a rebuild id");
    let status = wait_for(&m, &id).await;
    assert_eq!(status.state, RebuildState::Done, "{:?}", status.error);
    assert_eq!((status.entities_done, status.entities_total), (2, 2));
    assert_eq!((status.events_total, status.quarantined), (5, 0));
    assert!(status.events_done >= 5);
    assert!(!status.generation.is_base());

    // The cut-over: version and generation change together, in the row and
    // in the registry.
    let a = m
        .host
        .plugin_store
        .activation("account")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (a.mode, a.digest.as_str(), &a.generation),
        (
            ActivationMode::Rebuild,
            installed.version.digest.as_str(),
            &status.generation
        )
    );
    assert!(a.previous_generation.as_ref().is_some_and(|g| g.is_base()));
    assert_eq!(active_digest(&m), installed.version.digest);
    assert_eq!(m.host.registry.generation("account"), status.generation);

    // Every entity was refolded by v2 into the new generation.
    let rebuilt = record_of(&m, &EntityKey::new(status.generation.as_str(), "a")).await;
    assert_eq!((rebuilt.position, rebuilt.head), (2, 2));
    assert_eq!(rebuilt.generation, status.generation);
    assert_eq!(rebuilt.state.unwrap()["tier"], "gold");
    let b = record_of(&m, &EntityKey::new(status.generation.as_str(), "b")).await;
    assert_eq!(b.state.unwrap()["balance"], 15);
    // Its read model replaced the old one.
    let doc = m
        .host
        .storage
        .projection("balances", "owner-a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(doc["tier"], "gold");
    // The rebuild refolded five events of history and recorded none of
    // them; its cut-over recorded one correction per entity whose state v2
    // sees otherwise (both: v2 adds a tier), old and new state in each.
    let before = m.host.storage.changes_head().await.unwrap();
    let feed = m.host.storage.changes_after(0, 100).await.unwrap();
    let kinds: Vec<&str> = feed
        .iter()
        .map(|c| c.event["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "refold.state.changed",
            "refold.state.changed",
            "refold.state.corrected",
            "refold.state.corrected"
        ]
    );
    let corrected_a = feed
        .iter()
        .find(|c| c.event["type"] == "refold.state.corrected" && c.event["subject"] == "a")
        .unwrap();
    assert_eq!(corrected_a.event["data"]["state"]["tier"], "gold");
    assert!(corrected_a.event["data"]["previous"].get("tier").is_none());
    assert_eq!(corrected_a.event["lastposition"], 2);
    assert_eq!(
        corrected_a.event["generation"],
        json!(status.generation.as_str())
    );
    // The live record moves to the new generation when a batch meets it.
    ingest(&m, &[deposit(5, "a", 1)]).await;
    let live = record_of(&m, &account("a")).await;
    assert_eq!(live.generation, status.generation);
    assert_eq!(live.state.clone().unwrap()["balance"], 200_001);
    // The move's catch-up is not news: one record, for the new event only,
    // tagged with the new generation and digest.
    let after = m.host.storage.changes_after(before, 100).await.unwrap();
    assert_eq!(after.len(), 1, "{after:?}");
    let e = &after[0].event;
    assert_eq!(
        (&e["firstposition"], &e["lastposition"]),
        (&json!(3), &json!(3))
    );
    assert_eq!(e["generation"], json!(status.generation.as_str()));
    assert_eq!(e["plugindigest"], json!(installed.version.digest));
    assert_eq!(e["data"]["state"], live.state.unwrap());

    let listed = m.rebuild_list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id.as_str(), listed[0].state),
        (id.as_str(), RebuildState::Done)
    );

    // A rollback corrects in the other direction: every entity whose answer
    // goes back to the first generation's, old and new state in each, with
    // the new one as a query answers it (a's first-generation state was
    // saved at position 2 when the batch moved it, and is caught up to 3).
    let before = m.host.storage.changes_head().await.unwrap();
    let back = m.rollback("account").await.unwrap();
    let corrections = m.host.storage.changes_after(before, 100).await.unwrap();
    assert_eq!(corrections.len(), 2, "{corrections:?}");
    let answers = [("a", 200_001, 3), ("b", 15, 3)];
    for c in &corrections {
        let e = &c.event;
        assert_eq!(e["type"], "refold.state.corrected");
        assert_eq!(e["generation"], json!(""));
        assert_eq!(e["activation"], json!(back.seq));
        assert_eq!(e["plugindigest"], json!(v1));
        assert!(e["data"]["previous"].get("tier").is_some(), "{e}");
        assert!(e["data"]["state"].get("tier").is_none(), "{e}");
        let (_, balance, position) = answers.iter().find(|(id, ..)| e["subject"] == *id).unwrap();
        assert_eq!(e["data"]["state"]["balance"], json!(balance), "{e}");
        assert_eq!(e["lastposition"], json!(position), "{e}");
    }
    // Rolling the rollback back corrects again, with records of their own:
    // b stands where the cut-over left it, so only the activation tells
    // its two corrections to the same state apart.
    let before = m.host.storage.changes_head().await.unwrap();
    let forth = m.rollback("account").await.unwrap();
    let again = m.host.storage.changes_after(before, 100).await.unwrap();
    assert_eq!(again.len(), 2, "{again:?}");
    let b_then = feed
        .iter()
        .find(|c| c.event["type"] == "refold.state.corrected" && c.event["subject"] == "b")
        .unwrap();
    let b_now = again.iter().find(|c| c.event["subject"] == "b").unwrap();
    assert_eq!(b_now.event["data"]["state"], b_then.event["data"]["state"]);
    assert_eq!(b_now.event["lastposition"], b_then.event["lastposition"]);
    assert_eq!(b_now.event["activation"], json!(forth.seq));
    assert_ne!(b_now.id, b_then.id);
    // A rollback of a forward swap stays in its generation: nothing to
    // correct.
    let before = m.host.storage.changes_head().await.unwrap();
    m.activate("account", &v1, SwapMode::Forward).await.unwrap();
    m.rollback("account").await.unwrap();
    assert_eq!(m.host.storage.changes_head().await.unwrap(), before);
}

/// A rebuild whose version folds every entity as before corrects nothing:
/// the history it refolds is not news, and neither is an equal state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_that_changes_no_state_records_no_correction() {
    let m = manager().await;
    let v1 = active_digest(&m);
    ingest(&m, &[opened(0, "a"), deposit(1, "a", 5), opened(2, "b")]).await;
    let before = m.host.storage.changes_head().await.unwrap();
    let id = m
        .activate("account", &v1, SwapMode::Rebuild)
        .await
        .unwrap()
        .expect("a rebuild id");
    let status = wait_for(&m, &id).await;
    assert_eq!(status.state, RebuildState::Done, "{:?}", status.error);
    assert_eq!(m.host.registry.generation("account"), status.generation);
    let after = m.host.storage.changes_after(before, 100).await.unwrap();
    assert!(after.is_empty(), "{after:?}");
}

#[tokio::test]
async fn a_rollback_goes_one_step_back_and_the_watched_file_does_not_undo_it() {
    let m = manager().await;
    let v1 = active_digest(&m);
    let err = m.rollback("account").await.unwrap_err();
    assert!(matches!(err, InstallError::NotFound(_)), "{err}");
    assert!(matches!(
        m.rollback("order").await.unwrap_err(),
        InstallError::NotFound(_)
    ));

    let v2 = m
        .install(bank_v2(), Some("account"), Some(SwapMode::Forward))
        .await
        .unwrap()
        .version
        .digest;
    let back = m.rollback("account").await.unwrap();
    assert_eq!(back.mode, ActivationMode::Rollback);
    assert_eq!(
        (back.digest.as_str(), back.previous.as_deref()),
        (v1.as_str(), Some(v2.as_str()))
    );
    assert_eq!(back.rolled_back, vec![v2.clone()]);
    assert_eq!(active_digest(&m), v1);

    // The file of the version rolled back from is left alone, at start and
    // while running.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("account@v2.wasm");
    std::fs::write(&file, bank_v2()).unwrap();
    for at_start in [true, false] {
        let msg = m.install_file(&file, at_start).await.unwrap();
        assert!(msg.contains("rolled back"), "{msg}");
        assert_eq!(active_digest(&m), v1);
    }
    // The API may choose it again, which clears the mark.
    m.activate("account", &v2, SwapMode::Forward).await.unwrap();
    let again = m
        .host
        .plugin_store
        .activation("account")
        .await
        .unwrap()
        .unwrap();
    assert!(again.rolled_back.is_empty(), "{:?}", again.rolled_back);
    assert_eq!(active_digest(&m), v2);
}

#[tokio::test]
async fn a_watched_file_is_activated_when_its_name_admits_its_type_and_it_fits() {
    let m = manager().await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("order.wasm");
    std::fs::write(&wrong, bank_v2()).unwrap();
    let err = m.install_file(&wrong, false).await.unwrap_err();
    assert!(format!("{err:#}").contains("does not name"), "{err:#}");

    let right = dir.path().join("account-v2.wasm");
    std::fs::write(&right, bank_v2()).unwrap();
    let msg = m.install_file(&right, false).await.unwrap();
    assert!(msg.starts_with("activated bank@2.0.0"), "{msg}");
    assert_eq!(active_digest(&m), refold_runtime::digest_of(&bank_v2()));
    let msg = m.install_file(&right, false).await.unwrap();
    assert!(msg.contains("already the active version"), "{msg}");

    let mut small = config();
    small.plugins.max_upload_bytes = 1024;
    let m = manager_on(Arc::new(SqliteStore::in_memory().unwrap()), small).await;
    let err = m.install_file(&right, false).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("over plugins.max_upload_bytes (1024 bytes)"),
        "{err:#}"
    );
}

#[tokio::test]
async fn a_retry_refolds_the_held_events_with_the_active_version_and_a_fixture_shows_them() {
    // Version 1 under a limit that refuses every read-model write: opening an
    // account quarantines it.
    let mut tight = config();
    let limits = tight.plugins.limits;
    tight.plugins.entity_limits.insert(
        "account".into(),
        refold_runtime::Limits {
            max_projection_ops: 0,
            ..limits
        },
    );
    let m = manager_on(Arc::new(SqliteStore::in_memory().unwrap()), tight).await;
    let key = account("a");
    let r = ingest(&m, &[opened(0, "a"), deposit(1, "a", 5)]).await;
    assert_eq!(r.quarantined, vec![key.clone()]);
    ingest(&m, &[deposit(2, "a", 7)]).await;
    let held = record_of(&m, &key).await;
    assert!(held.quarantined);
    assert_eq!(held.head, 3);

    let fixture = m.fixture(&key).await.unwrap();
    assert_eq!(fixture.events.len(), 3);
    assert!(fixture.events[0].as_str().contains("account.opened"));
    let q = fixture.quarantine.as_ref().expect("the quarantine record");
    assert!(q.error.contains("max_projection_ops"), "{}", q.error);
    assert_eq!(fixture.position, held.position);
    assert_eq!(fixture.state_before, held.state);
    assert_eq!(fixture.expected[0].state, held.state);

    // Retried under the same limit: quarantined again, with the reason.
    let again = m.retry(&key).await.unwrap();
    assert!(again.quarantined);
    assert!(again.error.unwrap().contains("max_projection_ops"));
    assert_eq!((again.held_events, again.head), (3, 3));

    // The operator raises the limit: the held events fold, the read model
    // follows, the quarantine is lifted.
    let plugin = m.host.registry.get("account").unwrap();
    m.host.registry.activate(plugin.with_limits(limits));
    let retried = m.retry(&key).await.unwrap();
    assert!(!retried.quarantined, "{:?}", retried.error);
    assert_eq!((retried.position, retried.head), (3, 3));
    assert_eq!(
        (&retried.state["balance"], &retried.state["owner"]),
        (&json!(12), &json!("owner-a"))
    );
    assert_eq!(retried.plugin.version, "1.0.0");
    let rec = record_of(&m, &key).await;
    assert!(!rec.quarantined);
    assert_eq!(rec.position, 3);
    assert_eq!(m.host.storage.quarantine(&key).await.unwrap(), None);
    // Quarantined at its first event, the entity advanced nothing until
    // the retry; the retry's record covers every event it applied.
    let feed = m.host.storage.changes_after(0, 10).await.unwrap();
    assert_eq!(feed.len(), 1, "{feed:?}");
    let e = &feed[0].event;
    assert_eq!(
        (&e["firstposition"], &e["lastposition"]),
        (&json!(1), &json!(3))
    );
    assert_eq!(e["data"]["state"], retried.state);
    let doc = m
        .host
        .storage
        .projection("balances", "owner-a")
        .await
        .unwrap();
    assert_eq!(doc.unwrap()["balance"], 12);
    // Nothing to retry any more.
    assert!(matches!(
        m.retry(&key).await.unwrap_err(),
        InstallError::NotFound(_)
    ));
}

#[tokio::test]
async fn a_dead_letter_resubmitted_corrected_becomes_an_event_and_is_removed() {
    let m = manager().await;
    let bad = record(
        0,
        json!({"specversion": "1.0", "id": "x1", "source": "/t", "type": "account.deposited",
            "subject": "a", "entitytype": "acount", "data": {"amount": 3}}),
    );
    assert_eq!(ingest(&m, &[bad]).await.dead_lettered, 1);
    let dl = m.host.storage.dead_letters(10).await.unwrap().remove(0);
    assert_eq!(dl.code, "unknown_entity_type");

    // As received it is refused again, and the dead letter stays.
    let same = m.resubmit(&dl.id, None).await.unwrap();
    assert!(!same.accepted);
    assert!(m.host.storage.dead_letter(&dl.id).await.unwrap().is_some());

    let corrected = dl.payload.replace("\"acount\"", "\"account\"").into_bytes();
    let fixed = m.resubmit(&dl.id, Some(corrected)).await.unwrap();
    assert_eq!(
        (
            fixed.accepted,
            fixed.stored,
            fixed.applied,
            fixed.duplicates
        ),
        (true, 1, 1, 0)
    );
    assert_eq!(fixed.dead_letter, dl.id);
    assert_eq!(m.host.storage.dead_letter(&dl.id).await.unwrap(), None);
    assert_eq!(
        record_of(&m, &account("a")).await.state.unwrap()["balance"],
        3
    );

    assert!(matches!(
        m.resubmit("dl-none", None).await.unwrap_err(),
        InstallError::NotFound(_)
    ));
}

#[tokio::test]
async fn sync_registry_picks_up_an_activation_another_host_wrote_to_the_store() {
    let store = Arc::new(SqliteStore::in_memory().unwrap());
    let here = manager_on(store.clone(), config()).await;
    let there = manager_on(store, config()).await;
    let v1 = active_digest(&here);

    let v2 = there
        .install(bank_v2(), Some("account"), Some(SwapMode::Forward))
        .await
        .unwrap()
        .version
        .digest;
    assert_eq!(active_digest(&here), v1, "not before the sync");
    here.sync_registry().await.unwrap();
    assert_eq!(active_digest(&here), v2);

    there.rollback("account").await.unwrap();
    here.sync_registry().await.unwrap();
    assert_eq!(active_digest(&here), v1);
    // Each host folds with the version the store names.
    ingest(&here, &[deposit(0, "a", 1)]).await;
    assert_eq!(
        record_of(&here, &account("a")).await.plugin.unwrap().digest,
        v1
    );
}

/// The direction written in the module docs, checked on the sources: a
/// module calls no method defined in a module it may not use, and no
/// submodule calls the entry points of `mod.rs`.
#[test]
fn no_module_of_the_manager_calls_one_above_it() {
    let sources: [(&str, &str, &[&str]); 7] = [
        ("watch", include_str!("watch.rs"), &["sync"]),
        (
            "sync",
            include_str!("sync.rs"),
            &["install", "activate", "rebuild"],
        ),
        (
            "rebuild",
            include_str!("rebuild.rs"),
            &["activate", "corrections"],
        ),
        (
            "activate",
            include_str!("activate.rs"),
            &["install", "corrections"],
        ),
        ("corrections", include_str!("corrections.rs"), &[]),
        ("install", include_str!("install.rs"), &[]),
        ("repair", include_str!("repair.rs"), &[]),
    ];
    let code = |src: &'static str| src.split("#[cfg(test)]").next().unwrap_or(src);
    let defined = |src: &'static str| -> Vec<String> {
        code(src)
            .split("fn ")
            .skip(1)
            .filter_map(|s| s.split(['(', '<']).next())
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .map(str::to_string)
            .collect()
    };
    for (name, src, may_use) in sources {
        let own = defined(src);
        let mut forbidden: Vec<(String, &str)> = ["install", "activate"]
            .iter()
            .map(|f| (f.to_string(), "mod"))
            .collect();
        for (other, other_src, _) in sources {
            if other != name && !may_use.contains(&other) {
                forbidden.extend(defined(other_src).into_iter().map(|f| (f, other)));
            }
        }
        for (f, home) in forbidden {
            if own.contains(&f) {
                continue;
            }
            assert!(
                !code(src).contains(&format!(".{f}(")),
                "manager::{name} calls `{f}` of `{home}`, which it may not use"
            );
        }
    }
}

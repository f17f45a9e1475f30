//! The router over an in-memory SQLite store, driven request by request.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::config::{AdminConfig, HttpConfig};
use crate::http::router;
use crate::http::state::Api;
use crate::http::types::{ErrorBody, Installed, Limits, PluginList, ProjectionDocument};
use refold_engine::HostConfig;
use refold_engine::app::App;
use refold_engine::pipeline::Pipeline;
use refold_engine::query::{EntityView, StateAt};
use refold_source::SourceRecord;
use refold_store_sqlite::SqliteStore;

const ADMIN: &str = "admin-secret";
const READER: &str = "reader-secret";

fn bank_wasm() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bank/bank.wasm")
}

/// A host running the bank example over a fresh in-memory store.
fn app(max_upload_bytes: Option<usize>) -> App {
    let mut config = HostConfig::default();
    config.plugins.files = vec![bank_wasm()];
    if let Some(n) = max_upload_bytes {
        config.plugins.max_upload_bytes = n;
    }
    let store = Arc::new(SqliteStore::in_memory().expect("an in-memory store"));
    App::with_storage(config, store.clone(), store).expect("the bank host")
}

fn admin_token() -> AdminConfig {
    AdminConfig {
        token: Some(ADMIN.into()),
        disable_auth: false,
    }
}

fn server(app: &App, http: HttpConfig, admin: AdminConfig) -> Router {
    router(Api::with(app.clone(), http, admin))
}

fn record(offset: i64, payload: Vec<u8>) -> SourceRecord {
    SourceRecord::at("test", 0, offset, payload)
}

fn event(offset: i64, id: &str, ty: &str, data: Value) -> SourceRecord {
    let ce = json!({"specversion": "1.0", "id": id, "source": "/test", "type": ty,
        "subject": "acc-1", "entitytype": "account", "data": data});
    record(offset, ce.to_string().into_bytes())
}

/// Three events of acc-1 (opened, two deposits) and three records that
/// are not events, consumed as one batch.
async fn consume_batch(app: &App) {
    let mut records = vec![
        event(0, "e1", "account.opened", json!({"owner": "ann"})),
        event(1, "e2", "account.deposited", json!({"amount": 100})),
        event(2, "e3", "account.deposited", json!({"amount": 50})),
    ];
    for i in 3..6 {
        records.push(record(i, format!("not json {i}").into_bytes()));
    }
    let report = Pipeline::for_host(&app.host)
        .process(&records)
        .await
        .expect("the batch commits");
    assert_eq!(report.applied, 3, "{report:?}");
    assert_eq!(report.dead_lettered, 3, "{report:?}");
}

/// Send one request; the status, the headers and the body as JSON.
async fn call(
    r: &Router,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Body,
) -> (StatusCode, HeaderMap, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = r
        .clone()
        .oneshot(req.body(body).expect("a request"))
        .await
        .expect("an answer");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("a body");
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, headers, v)
}

async fn get(r: &Router, path: &str, token: Option<&str>) -> (StatusCode, Value) {
    let (s, _, v) = call(r, Method::GET, path, token, Body::empty()).await;
    (s, v)
}

fn error(v: &Value) -> ErrorBody {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("not an error body ({e}): {v}"))
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json_errors() {
    let app = app(None);
    let r = server(&app, HttpConfig::default(), admin_token());
    for token in [None, Some(ADMIN), Some("wrong")] {
        let (s, v) = get(&r, "/v1/xyz", token).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        assert_eq!(
            error(&v),
            ErrorBody {
                error: "not_found".into(),
                message: "no route GET /v1/xyz".into(),
            }
        );
    }
    let (s, _, v) = call(&r, Method::POST, "/healthz", None, Body::empty()).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{v}");
    let e = error(&v);
    assert_eq!(e.error, "method_not_allowed");
    assert_eq!(e.message, "/healthz does not take POST");
}

#[tokio::test]
async fn the_admin_api_needs_its_token() {
    let app = app(None);
    let r = server(&app, HttpConfig::default(), admin_token());
    let (s, v) = get(&r, "/v1/plugins", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(error(&v).message, "missing bearer token");
    let (s, v) = get(&r, "/v1/plugins", Some("wrong")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(error(&v).message, "invalid admin token");
    let (s, v) = get(&r, "/v1/plugins", Some(ADMIN)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let list: PluginList = serde_json::from_value(v).expect("a plugin list");
    let types: Vec<&str> = list
        .plugins
        .iter()
        .map(|p| p.entity_type.as_str())
        .collect();
    assert_eq!(types, ["account"]);
    assert!(list.plugins[0].running_digest.is_some());

    // No token configured: refused whatever is sent, unless disabled.
    let r = server(&app, HttpConfig::default(), AdminConfig::default());
    let (s, v) = get(&r, "/v1/plugins", Some(ADMIN)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(error(&v).error, "forbidden");
    let open = AdminConfig {
        token: None,
        disable_auth: true,
    };
    let r = server(&app, HttpConfig::default(), open);
    let (s, v) = get(&r, "/v1/plugins", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn queries_need_the_read_token_when_one_is_set() {
    let app = app(None);
    consume_batch(&app).await;
    let http = HttpConfig {
        read_token: Some(READER.into()),
        ..HttpConfig::default()
    };
    let r = server(&app, http, admin_token());
    for path in [
        "/v1/entities/account/acc-1",
        "/v1/entities/account/acc-1?at=1",
        "/v1/dead-letters",
        "/v1/quarantine",
    ] {
        let (s, v) = get(&r, path, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}: {v}");
        assert!(error(&v).message.contains("bearer"), "{v}");
        let (s, v) = get(&r, path, Some("wrong")).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}: {v}");
        assert_eq!(error(&v).message, "invalid read token");
        let (s, v) = get(&r, path, Some(READER)).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
        let (s, v) = get(&r, path, Some(ADMIN)).await;
        assert_eq!(s, StatusCode::OK, "the admin token reads too: {path}: {v}");
    }
    // The read token is not an admin token; probes stay open.
    let (s, _) = get(&r, "/v1/plugins", Some(READER)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = get(&r, "/healthz", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, v) = call(&r, Method::GET, "/metrics", None, Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        v.as_str().is_some_and(|t| t.contains("refold_")),
        "metrics text: {v}"
    );
}

#[tokio::test]
async fn an_entity_after_a_batch_now_and_at_a_past_position() {
    let app = app(None);
    let r = server(&app, HttpConfig::default(), admin_token());
    let (s, v) = get(&r, "/v1/entities/account/acc-1", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "before any event: {v}");
    assert_eq!(error(&v).message, "no state for account/acc-1");

    consume_batch(&app).await;
    let (s, v) = get(&r, "/v1/entities/account/acc-1", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let e: EntityView = serde_json::from_value(v.clone()).expect("an entity");
    assert_eq!(
        (e.entity_type.as_str(), e.entity_id.as_str()),
        ("account", "acc-1")
    );
    assert_eq!((e.position, e.head, e.quarantined), (3, 3, false));
    assert_eq!(e.state["owner"], "ann");
    assert_eq!(e.state["balance"], 150);
    assert_eq!(e.plugin.expect("a plugin").name, "bank");
    // Exactly these fields, as the black-box clients read them.
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "entity_id",
            "entity_type",
            "generation",
            "head",
            "plugin",
            "position",
            "quarantined",
            "state"
        ]
    );

    let (s, v) = get(&r, "/v1/entities/account/acc-1?at=2", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let at: StateAt = serde_json::from_value(v).expect("a past state");
    assert_eq!(at.position, 2);
    assert_eq!(at.state["balance"], 100);
    assert_eq!(at.plugin.name, "bank");

    let (s, v) = get(&r, "/v1/entities/account/acc-1?at=zero", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(error(&v).error, "bad_request");
    let (s, v) = get(&r, "/v1/entities/account/acc-9?at=1", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(
        error(&v).message,
        "no events for account/acc-9 up to position 1"
    );
    let (s, v) = get(&r, "/v1/entities/ledger/l-1?at=1", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(error(&v).message, "no plugin for entity type ledger");

    let (s, v) = get(&r, "/v1/projections/balances/ann", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let doc: ProjectionDocument = serde_json::from_value(v).expect("a document");
    assert_eq!(
        (doc.projection.as_str(), doc.key.as_str()),
        ("balances", "ann")
    );
    let (s, v) = get(&r, "/v1/projections/balances/nobody", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
}

#[tokio::test]
async fn listings_are_paged_by_cursor() {
    let app = app(None);
    consume_batch(&app).await;
    let r = server(&app, HttpConfig::default(), admin_token());
    let (s, v) = get(&r, "/v1/dead-letters?limit=2", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["count"], 2, "{v}");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(2));
    let next = v["next"].as_str().expect("a next page").to_string();
    let (s, v) = get(&r, &format!("/v1/dead-letters?limit=2&after={next}"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["count"], 1, "{v}");
    assert!(v["next"].is_null(), "the last page: {v}");
    let (s, v) = get(&r, "/v1/dead-letters", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["count"], 3, "{v}");

    // `limit` is capped to `max_page_items`.
    let small = HttpConfig {
        max_page_items: 1,
        ..HttpConfig::default()
    };
    let capped = server(&app, small, admin_token());
    let (_, v) = get(&capped, "/v1/dead-letters?limit=50", None).await;
    assert_eq!(v["count"], 1, "{v}");

    // A cursor the store did not issue is the client's error (the store's
    // BadCursor), as is a limit that is not a number.
    for path in [
        "/v1/dead-letters?after=not-a-cursor",
        "/v1/quarantine?after=not-a-cursor",
        "/v1/dead-letters?limit=many",
    ] {
        let (s, v) = get(&r, path, None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert_eq!(error(&v).error, "bad_request", "{path}");
    }
    let (s, v) = get(&r, "/v1/quarantine", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!({"items": [], "count": 0, "next": null}));
}

/// Three accounts with two events each, in one batch.
async fn three_accounts(app: &App) {
    let mut records = Vec::new();
    for (i, acc) in ["acc-b", "acc-a", "acc-c"].iter().enumerate() {
        for (j, (ty, data)) in [
            ("account.opened", json!({"owner": acc})),
            ("account.deposited", json!({"amount": 10})),
        ]
        .into_iter()
        .enumerate()
        {
            let ce = json!({"specversion": "1.0", "id": format!("{acc}-{j}"), "source": "/test",
                "type": ty, "subject": acc, "entitytype": "account", "data": data});
            records.push(record((i * 2 + j) as i64, ce.to_string().into_bytes()));
        }
    }
    let report = Pipeline::for_host(&app.host)
        .process(&records)
        .await
        .expect("the batch commits");
    assert_eq!(report.applied, 6, "{report:?}");
}

/// Every item of a listing, page by page with `limit`, and the pages.
async fn all_pages(r: &Router, path: &str, cursor: &str, limit: usize) -> (Vec<Value>, usize) {
    let (mut items, mut pages) = (Vec::new(), 0);
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut next: Option<String> = None;
    loop {
        let url = match &next {
            None => format!("{path}{sep}limit={limit}"),
            Some(n) => format!("{path}{sep}limit={limit}&{cursor}={n}"),
        };
        let (s, v) = get(r, &url, Some(ADMIN)).await;
        assert_eq!(s, StatusCode::OK, "{url}: {v}");
        pages += 1;
        items.extend(v["items"].as_array().cloned().unwrap_or_default());
        match v["next"].as_str() {
            Some(n) => next = Some(n.to_string()),
            None => break,
        }
        assert!(pages < 100, "{url}: the listing does not end");
    }
    (items, pages)
}

#[tokio::test]
async fn entities_events_documents_and_versions_are_listed_in_pages() {
    let app = app(None);
    three_accounts(&app).await;
    let r = server(&app, HttpConfig::default(), admin_token());

    let (items, pages) = all_pages(&r, "/v1/entities/account", "after", 2).await;
    let ids: Vec<&str> = items
        .iter()
        .filter_map(|i| i["entity_id"].as_str())
        .collect();
    assert_eq!(ids, ["acc-a", "acc-b", "acc-c"]);
    assert_eq!(pages, 2);
    let (items, _) = all_pages(&r, "/v1/entities/ledger", "after", 2).await;
    assert!(items.is_empty(), "a type with no entities lists none");

    let (items, pages) = all_pages(&r, "/v1/entities/account/acc-a/events", "from", 1).await;
    let positions: Vec<u64> = items
        .iter()
        .filter_map(|e| e["position"].as_u64())
        .collect();
    assert_eq!(positions, [1, 2]);
    assert_eq!(pages, 2);
    assert_eq!(items[0]["event_type"], "account.opened");
    assert_eq!(items[1]["data"], json!({"amount": 10}));
    let (s, v) = get(&r, "/v1/entities/account/acc-a/events?from=2", None).await;
    assert_eq!((s, v["count"].as_u64()), (StatusCode::OK, Some(1)), "{v}");
    let (s, v) = get(&r, "/v1/entities/account/acc-a/events?from=two", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    let (items, _) = all_pages(&r, "/v1/projections/balances", "after", 2).await;
    let keys: Vec<&str> = items.iter().filter_map(|d| d["key"].as_str()).collect();
    assert_eq!(keys.len(), 3, "{items:?}");
    assert!(
        items
            .iter()
            .all(|d| d["projection"] == "balances" && d["document"]["balance"] == 10)
    );

    // A version stored through the API (the configured file is not).
    let bytes = std::fs::read(bank_wasm()).expect("bank.wasm");
    let (s, _, v) = call(
        &r,
        Method::PUT,
        "/v1/plugins/account?mode=none",
        Some(ADMIN),
        Body::from(bytes),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (items, _) = all_pages(&r, "/v1/plugins/account/versions", "after", 1).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["name"], "bank");
    let (s, _) = get(&r, "/v1/plugins/account/versions", None).await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "versions are behind the admin token"
    );
    let (s, v) = get(&r, "/v1/plugins/account/versions?after=nope", Some(ADMIN)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // The hard maximum: a page never holds more than `max_page_items`.
    let small = HttpConfig {
        max_page_items: 1,
        ..HttpConfig::default()
    };
    let capped = server(&app, small, admin_token());
    for path in [
        "/v1/entities/account?limit=1000",
        "/v1/entities/account/acc-a/events?limit=1000",
        "/v1/projections/balances?limit=1000",
    ] {
        let (s, v) = get(&capped, path, None).await;
        assert_eq!(
            (s, v["count"].as_u64()),
            (StatusCode::OK, Some(1)),
            "{path}: {v}"
        );
        assert!(v["next"].is_string(), "{path}: {v}");
    }
}

#[tokio::test]
async fn an_upload_over_the_limit_is_a_413() {
    let app = app(Some(1000));
    let r = server(&app, HttpConfig::default(), admin_token());
    // Declared too large: refused before the body is read.
    let req = Request::builder()
        .method(Method::PUT)
        .uri("/v1/plugins/account")
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
        .header(header::CONTENT_LENGTH, "2000")
        .body(Body::from(vec![0u8; 2000]))
        .unwrap();
    let resp = r.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let b = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let e: ErrorBody = serde_json::from_slice(&b).unwrap();
    assert_eq!(e.error, "too_large");
    assert_eq!(
        e.message,
        "component is 2000 bytes; limit plugins.max_upload_bytes = 1000"
    );
    // Undeclared: refused once the limit is passed while reading.
    let (s, _, v) = call(
        &r,
        Method::PUT,
        "/v1/plugins/account",
        Some(ADMIN),
        Body::from(vec![0u8; 2000]),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(
        error(&v).message,
        "component is more than 1000 bytes; limit plugins.max_upload_bytes = 1000"
    );
    // Within the limit but not a component.
    let (s, _, v) = call(
        &r,
        Method::PUT,
        "/v1/plugins/account",
        Some(ADMIN),
        Body::from(vec![0u8; 10]),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(error(&v).error, "unprocessable");
}

#[tokio::test]
async fn an_upload_stores_the_version() {
    let app = app(None);
    consume_batch(&app).await;
    let r = server(&app, HttpConfig::default(), admin_token());
    let bytes = std::fs::read(bank_wasm()).unwrap();
    let (s, _, v) = call(
        &r,
        Method::PUT,
        "/v1/plugins/account?mode=none",
        Some(ADMIN),
        Body::from(bytes),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let i: Installed = serde_json::from_value(v).expect("an install result");
    assert_eq!(i.version.entity_type, "account");
    assert_eq!(i.version.name, "bank");
    assert_eq!((i.sample.entities, i.sample.events), (1, 3));
    assert_eq!((i.activation, i.rebuild), (None, None));
    let (s, _, v) = call(
        &r,
        Method::PUT,
        "/v1/plugins/account?mode=sideways",
        Some(ADMIN),
        Body::from(vec![1u8]),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}

#[tokio::test]
async fn the_limits_are_what_is_configured() {
    let app = app(Some(12345));
    let http = HttpConfig {
        max_page_items: 7,
        max_page_bytes: 7000,
        max_concurrent_queries: 3,
        max_concurrent_replays: 1,
        replay_timeout_ms: 250,
        ..HttpConfig::default()
    };
    let r = server(&app, http, admin_token());
    let (s, v) = get(&r, "/v1/admin/limits", Some(ADMIN)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({
            "plugins": {"max_upload_bytes": 12345},
            "http": {"max_page_items": 7, "max_page_bytes": 7000, "max_concurrent_queries": 3,
                "max_concurrent_replays": 1, "replay_timeout_ms": 250},
        })
    );
    let l: Limits = serde_json::from_value(v).unwrap();
    assert_eq!(l.plugins.max_upload_bytes, 12345);
    let (s, _) = get(&r, "/v1/admin/limits", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

/// The change feed: records in order from a cursor, the read token asked
/// for when one is set, and a long poll that answers as soon as a commit
/// adds a record (without holding the query slots other readers need).
#[tokio::test]
async fn the_change_feed_pages_by_cursor_and_long_polls() {
    let app = app(None);
    let http = HttpConfig {
        read_token: Some(READER.into()),
        max_concurrent_queries: 1,
        max_change_polls: 3,
        ..HttpConfig::default()
    };
    let r = server(&app, http, admin_token());
    let (s, _) = get(&r, "/v1/changes", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = get(&r, "/v1/changes", Some(READER)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"changes": [], "next": 0}));

    consume_batch(&app).await;
    let (_, v) = get(&r, "/v1/changes?after=0", Some(READER)).await;
    let changes = v["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "one entity, one batch: {v}");
    let e = &changes[0]["event"];
    assert_eq!(e["type"], "refold.state.changed");
    assert_eq!(e["subject"], "acc-1");
    assert_eq!(
        (&e["firstposition"], &e["lastposition"]),
        (&json!(1), &json!(3))
    );
    assert_eq!(e["data"]["state"]["balance"], 150);
    let next = v["next"].as_u64().unwrap();
    assert_eq!(next, changes[0]["cursor"].as_u64().unwrap());

    // Nothing after `next`: a long poll waits; two more poll at once while
    // the only query slot stays free for an ordinary read.
    let poll = |r: Router| async move {
        get(
            &r,
            &format!("/v1/changes?after={next}&wait=20"),
            Some(READER),
        )
        .await
    };
    let waiting: Vec<_> = (0..3).map(|_| tokio::spawn(poll(r.clone()))).collect();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (s, _) = get(&r, "/v1/entities/account/acc-1", Some(READER)).await;
    assert_eq!(s, StatusCode::OK);
    // A fourth is one past `http.max_change_polls`: refused, not queued.
    let (s, headers, v) = call(
        &r,
        Method::GET,
        "/v1/changes?wait=20",
        Some(READER),
        Body::empty(),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(error(&v).message.contains("http.max_change_polls"), "{v}");
    assert!(headers.contains_key(header::RETRY_AFTER));
    assert!(waiting.iter().all(|w| !w.is_finished()));
    let started = std::time::Instant::now();
    Pipeline::for_host(&app.host)
        .process(&[event(6, "e4", "account.deposited", json!({"amount": 1}))])
        .await
        .unwrap();
    for w in waiting {
        let (s, v) = w.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["changes"][0]["event"]["lastposition"], 4, "{v}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    // A bad cursor is the client's error.
    let (s, _) = get(&r, "/v1/changes?after=minus", Some(READER)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Pruned past a consumer's cursor: it hears what it lost.
    Pipeline::for_host(&app.host)
        .process(&[event(7, "e5", "account.deposited", json!({"amount": 1}))])
        .await
        .unwrap();
    assert_eq!(app.host.storage.prune_changes(i64::MAX).await.unwrap(), 2);
    let (s, v) = get(&r, &format!("/v1/changes?after={next}"), Some(READER)).await;
    assert_eq!(s, StatusCode::GONE, "{v}");
    assert!(error(&v).message.contains("were pruned"), "{v}");
    let (s, v) = get(&r, "/v1/changes?after=0", Some(READER)).await;
    assert_eq!(
        (s, v["changes"].as_array().unwrap().len()),
        (StatusCode::OK, 1)
    );
}

/// `(METHOD, path)` with every `{parameter}` written `{}`.
fn normal(method: &str, path: &str) -> (String, String) {
    let mut out = String::new();
    let mut inside = false;
    for c in path.split('?').next().unwrap_or_default().chars() {
        match c {
            '{' => {
                inside = true;
                out.push_str("{}");
            }
            '}' => inside = false,
            _ if inside => {}
            _ => out.push(c),
        }
    }
    (method.to_uppercase(), out)
}

/// The operations of the served OpenAPI document.
async fn documented(r: &Router) -> std::collections::BTreeSet<(String, String)> {
    let (s, doc) = get(r, "/v1/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK, "{doc}");
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    // Every reference resolves: a type named in an answer is described.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    refs(&doc, &mut found);
    assert!(found.len() > 20, "{found:?}");
    for r in &found {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or(r);
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "{r} is not described: {}",
            doc["components"]["schemas"]
        );
    }
    let entity = &doc["components"]["schemas"]["EntityView"]["properties"];
    assert!(
        entity.get("position").is_some() && entity.get("state").is_some(),
        "{entity}"
    );
    let mut ops = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "put", "post", "delete", "patch"] {
            if item.get(method).is_some() {
                ops.insert(normal(method, path));
            }
        }
    }
    ops
}

/// Every operation the document describes is served (a request to it is
/// not the router's 404 or 405), and every `/v1` route the README lists is
/// described and the other way round: a handler added without its
/// description, or a description without its route, fails here.
#[tokio::test]
async fn the_openapi_document_matches_the_router_and_the_readme() {
    let app = app(None);
    let r = server(&app, HttpConfig::default(), admin_token());
    let ops = documented(&r).await;
    assert!(ops.len() >= 20, "{ops:?}");
    for (method, path) in &ops {
        let concrete = path.replace("{}", "x");
        let (s, _, v) = call(
            &r,
            Method::from_bytes(method.as_bytes()).unwrap(),
            &concrete,
            Some(ADMIN),
            Body::empty(),
        )
        .await;
        let message = v["message"].as_str().unwrap_or_default();
        let fallback = (s == StatusCode::NOT_FOUND && message.starts_with("no route"))
            || (s == StatusCode::METHOD_NOT_ALLOWED && message.contains("does not take"));
        assert!(
            !fallback,
            "{method} {path} is documented but not routed: {s} {v}"
        );
    }
    // And an undocumented path is the router's 404: the probe above tells
    // the two apart.
    let (s, v) = get(&r, "/v1/not-a-route", Some(ADMIN)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(error(&v).message.starts_with("no route"), "{v}");

    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .expect("README.md");
    let mut listed = std::collections::BTreeSet::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let [_, method, paths, ..] = cells.as_slice() else {
            continue;
        };
        if !["GET", "PUT", "POST", "DELETE", "PATCH"].contains(method) {
            continue;
        }
        for (i, part) in paths.split('`').enumerate() {
            if i % 2 == 1 && part.starts_with('/') {
                listed.insert(normal(method, part));
            }
        }
    }
    let v1 = |set: &std::collections::BTreeSet<(String, String)>| {
        set.iter()
            .filter(|(_, p)| p.starts_with("/v1/") && p != "/v1/openapi.json")
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    };
    let (doc, readme) = (v1(&ops), v1(&listed));
    let missing: Vec<_> = readme.difference(&doc).collect();
    let unlisted: Vec<_> = doc.difference(&readme).collect();
    assert!(
        missing.is_empty(),
        "in the README, not in the document: {missing:?}"
    );
    assert!(
        unlisted.is_empty(),
        "in the document, not in the README: {unlisted:?}"
    );
}

#[tokio::test]
async fn activations_are_listed_newest_first_in_pages() {
    let app = app(None);
    let r = server(&app, HttpConfig::default(), admin_token());
    let (s, _) = get(&r, "/v1/plugins/account/activations", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "behind the admin token");
    let (s, v) = get(
        &r,
        "/v1/plugins/account/activations?after=nope",
        Some(ADMIN),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let bytes = std::fs::read(bank_wasm()).expect("bank.wasm");
    let (s, _, v) = call(
        &r,
        Method::PUT,
        "/v1/plugins/account?mode=forward",
        Some(ADMIN),
        Body::from(bytes),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (items, pages) = all_pages(&r, "/v1/plugins/account/activations", "after", 1).await;
    assert!(!items.is_empty());
    assert_eq!(pages, items.len(), "one per page");
    assert_eq!(items[0]["digest"], v["version"]["digest"], "{items:?}");
    let seqs: Vec<i64> = items.iter().map(|a| a["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] > w[1]), "{seqs:?}");
}

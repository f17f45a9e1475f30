//! The HTTP API's bounds, from the outside: listings are paged by cursor
//! within an item and a byte budget, `?at=` replays are limited in number
//! and in time, the query API can require a read token, unknown routes are
//! a JSON 404 for anyone, and uploads have one size limit that the API and
//! `refold plugin push` both state.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

const ADMIN: &str = "api-admin-token";

/// A GET with an optional bearer token: (status, headers, JSON body).
fn get_with(
    host: &Host,
    path: &str,
    token: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut r = http().get(format!("{}{path}", host.base));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().expect("GET");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().unwrap_or(Value::Null))
}

/// Every item of a listing, page by page; also returns the pages.
fn walk(host: &Host, path: &str) -> (Vec<Value>, Vec<Value>) {
    let mut items = Vec::new();
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let url = match &after {
            Some(c) => format!("{path}?limit=1000&after={c}"),
            None => format!("{path}?limit=1000"),
        };
        let (c, page) = host.get(&url);
        assert_eq!(c, 200, "{url}: {page}");
        items.extend(page["items"].as_array().expect("items").iter().cloned());
        let next = page["next"].as_str().map(str::to_owned);
        pages.push(page);
        match next {
            Some(n) => after = Some(n),
            None => return (items, pages),
        }
        assert!(pages.len() < 100, "a listing that never ends: {pages:?}");
    }
}

#[test]
fn listings_are_paged_by_cursor_within_an_item_and_a_byte_budget() {
    check_listings(&[]);
}

/// The same on the cluster backend (a JSONL source, so Kafka is not needed).
#[test]
fn listings_on_cassandra_are_paged_by_cursor() {
    let addr = std::env::var("REFOLD_TEST_CASSANDRA").unwrap_or_else(|_| "127.0.0.1:9042".into());
    let keyspace = format!(
        "it_api_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let nodes = format!("[{addr:?}]");
    check_listings(&[
        ("REFOLD_STORE__KIND", "cassandra"),
        ("REFOLD_CASSANDRA__NODES", &nodes),
        ("REFOLD_CASSANDRA__KEYSPACE", &keyspace),
    ]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let dropped = rt.block_on(async {
        let s = scylla::client::session_builder::SessionBuilder::new()
            .known_node(&addr)
            .build()
            .await?;
        s.query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
            .await?;
        anyhow::Ok(())
    });
    if let Err(e) = dropped {
        eprintln!("could not drop keyspace {keyspace}: {e}");
    }
}

fn check_listings(env: &[(&str, &str)]) {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    // 5 small dead letters, then 4 of about 13 KB each: two of those pass
    // the page budget of 25000 bytes, so 4 of them cannot fit in the 3
    // pages that the item limit alone would make of 9, in any order.
    let mut lines: Vec<String> = (0..5).map(|i| format!("{{not json {i}")).collect();
    lines.extend((0..4).map(|i| format!("{{big {i} {}", "x".repeat(13_000))));
    // 3 quarantined entities.
    for i in 0..3 {
        lines.push(ce(
            &format!("q{i}"),
            "probe",
            &format!("p-q{i}"),
            "probe.panic",
            json!({"message": format!("boom {i}")}),
        ));
    }
    append(&events, &lines);
    let cfg = embedded_config(
        dir.path(),
        &[events],
        &[component("probe")],
        "[http]\nmax_page_items = 3\nmax_page_bytes = 25000\n",
    );
    let host = Host::start(&cfg, dir.path(), env);
    wait_for(Duration::from_secs(60), "every bad record listed", || {
        (walk(&host, "/v1/dead-letters").0.len() == 9 && walk(&host, "/v1/quarantine").0.len() == 3)
            .then_some(())
    });

    let (items, pages) = walk(&host, "/v1/dead-letters");
    let ids: HashSet<&str> = items.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 9, "each dead letter once: {items:?}");
    for p in &pages {
        let n = p["items"].as_array().unwrap().len();
        assert!(n <= 3, "?limit=1000 is capped to http.max_page_items: {p}");
        assert_eq!(p["count"], n, "{p}");
        assert!(
            n == 1 || p.to_string().len() <= 25_000 + 200,
            "a page stays within http.max_page_bytes: {} bytes",
            p.to_string().len()
        );
    }
    assert!(
        pages
            .iter()
            .any(|p| p["items"].as_array().unwrap().len() < 3 && !p["next"].is_null()),
        "the byte budget ended a page before the item limit"
    );
    assert!(pages.last().unwrap()["next"].is_null());

    let (items, pages) = walk(&host, "/v1/quarantine");
    let keys: HashSet<&str> = items
        .iter()
        .map(|q| q["key"]["entity_id"].as_str().unwrap())
        .collect();
    assert_eq!(keys, HashSet::from(["p-q0", "p-q1", "p-q2"]));
    assert!(
        pages
            .iter()
            .all(|p| p["items"].as_array().unwrap().len() <= 3)
    );

    let (c, v) = host.get("/v1/quarantine?limit=2");
    assert_eq!(c, 200);
    assert_eq!(v["items"].as_array().unwrap().len(), 2, "{v}");
    assert!(v["next"].is_string(), "{v}");

    // A cursor the store did not issue, and a limit that is not a number.
    let (c, v) = host.get("/v1/dead-letters?after=zz-not-a-cursor");
    assert_eq!(c, 400, "{v}");
    assert_eq!(v["error"], "bad_request", "{v}");
    let (c, v) = host.get("/v1/quarantine?limit=lots");
    assert_eq!(c, 400, "{v}");
    assert_eq!(v["error"], "bad_request", "{v}");
}

#[test]
fn replays_beyond_the_limit_get_429_and_beyond_the_budget_503() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    // p-loop's only event spins until the CPU limit: replaying it holds the
    // one replay slot for about that long.
    let mut lines = vec![
        ce("l1", "probe", "p-loop", "probe.loop", json!({})),
        ce("c0", "probe", "p-ok", "probe.count", json!({})),
    ];
    lines.extend((0..3000).map(|i| {
        ce(
            &format!("h{i}"),
            "probe",
            "p-long",
            "probe.count",
            json!({}),
        )
    }));
    append(&events, &lines);
    let cfg = embedded_config(
        dir.path(),
        &[events],
        &[component("probe")],
        "[plugins.entity_limits.probe]\ncpu_ms = 2000\n[http]\nmax_concurrent_replays = 1\nreplay_timeout_ms = 600000\n",
    );
    let host = Host::start(&cfg, dir.path(), &[]);
    wait_for(Duration::from_secs(60), "p-loop quarantined", || {
        let (_, q) = host.get("/v1/quarantine");
        q["items"]
            .as_array()?
            .iter()
            .any(|i| i["key"]["entity_id"] == "p-loop")
            .then_some(())
    });
    let (c, v) = host.get("/v1/entities/probe/p-ok?at=1");
    assert_eq!(c, 200, "a free slot serves a replay: {v}");

    let refused = wait_for(
        Duration::from_secs(120),
        "a 429 while a replay runs",
        || {
            let base = host.base.clone();
            let slow = std::thread::spawn(move || {
                http()
                    .get(format!("{base}/v1/entities/probe/p-loop?at=1"))
                    .send()
                    .map(|r| r.status().as_u16())
            });
            let mut seen = None;
            while !slow.is_finished() {
                let (c, h, v) = get_with(&host, "/v1/entities/probe/p-ok?at=1", None);
                if c == 429 {
                    seen = Some((h, v));
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = slow.join();
            seen
        },
    );
    let (headers, body) = refused;
    assert_eq!(body["error"], "too_many_requests", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("http.max_concurrent_replays"),
        "{body}"
    );
    assert!(headers.get("retry-after").is_some(), "{headers:?}");
    drop(host);

    // The same store with a budget of 1 ms: replaying 3000 events cannot
    // make it.
    let cfg = embedded_config(
        dir.path(),
        &[dir.path().join("events.jsonl")],
        &[component("probe")],
        "[plugins.entity_limits.probe]\ncpu_ms = 2000\n[http]\nreplay_timeout_ms = 1\n",
    );
    let host = Host::start(&cfg, dir.path(), &[]);
    let (c, v) = host.get("/v1/entities/probe/p-long?at=3000");
    assert_eq!(c, 503, "{v}");
    assert_eq!(v["error"], "unavailable", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("http.replay_timeout_ms"),
        "{v}"
    );
}

#[test]
fn a_read_token_guards_the_query_api_and_unknown_routes_are_a_json_404() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(
        &events,
        &[ce(
            "a1",
            "account",
            "acc-1",
            "account.opened",
            json!({"owner": "ann"}),
        )],
    );
    let cfg = embedded_config(
        dir.path(),
        &[events],
        &[component("bank")],
        &format!("[http]\nread_token = \"reader\"\n[admin]\ntoken = \"{ADMIN}\"\n"),
    );
    let host = Host::start(&cfg, dir.path(), &[]);
    wait_for(Duration::from_secs(60), "acc-1 folded", || {
        let (c, _, _) = get_with(&host, "/v1/entities/account/acc-1", Some("reader"));
        (c == 200).then_some(())
    });

    for path in [
        "/v1/entities/account/acc-1",
        "/v1/entities/account/acc-1?at=1",
        "/v1/projections/balances/ann",
        "/v1/dead-letters",
        "/v1/quarantine",
    ] {
        let (c, _, v) = get_with(&host, path, None);
        assert_eq!(c, 401, "{path}: {v}");
        assert_eq!(v["error"], "unauthorized", "{path}: {v}");
        assert!(v["message"].as_str().unwrap().contains("bearer"), "{v}");
        let (c, _, v) = get_with(&host, path, Some("wrong"));
        assert_eq!(c, 401, "{path}: {v}");
        let (c, _, v) = get_with(&host, path, Some("reader"));
        assert_eq!(c, 200, "{path}: {v}");
        let (c, _, v) = get_with(&host, path, Some(ADMIN));
        assert_eq!(c, 200, "the admin token reads too: {path}: {v}");
    }
    // The read token is not an admin token.
    let (c, _, v) = get_with(&host, "/v1/plugins", Some("reader"));
    assert_eq!(c, 401, "{v}");
    // Probes and scrapes stay open.
    let (c, _, _) = get_with(&host, "/healthz", None);
    assert_eq!(c, 200);
    let r = http().get(format!("{}/metrics", host.base)).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);

    for token in [None, Some("reader"), Some(ADMIN), Some("wrong")] {
        let (c, _, v) = get_with(&host, "/v1/xyz", token);
        assert_eq!(c, 404, "{token:?}: {v}");
        assert_eq!(
            v,
            json!({"error": "not_found", "message": "no route GET /v1/xyz"}),
            "{token:?}"
        );
    }
    let r = http()
        .delete(format!("{}/v1/entities/account/acc-1", host.base))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"], "method_not_allowed", "{v}");
}

#[test]
fn uploads_have_one_size_limit_that_the_api_and_push_state() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(&events, &[]);
    let cfg = embedded_config(
        dir.path(),
        &[events],
        &[component("bank")],
        &format!("[admin]\ntoken = \"{ADMIN}\"\n"),
    );
    let host = Host::start(
        &cfg,
        dir.path(),
        &[("REFOLD_PLUGINS__MAX_UPLOAD_BYTES", "100000")],
    );
    let put = |bytes: Vec<u8>| {
        let r = http()
            .put(format!("{}/v1/plugins/account?mode=none", host.base))
            .bearer_auth(ADMIN)
            .body(bytes)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap_or(Value::Null))
    };
    let (c, v) = put(vec![0u8; 150_000]);
    assert_eq!(c, 413, "{v}");
    assert_eq!(
        v,
        json!({"error": "too_large",
               "message": "component is 150000 bytes; limit plugins.max_upload_bytes = 100000"})
    );
    // Under the limit it is looked at (and refused for what it is).
    let (c, v) = put(vec![0u8; 90_000]);
    assert_eq!(c, 422, "{v}");

    let (c, _, v) = get_with(&host, "/v1/admin/limits", Some(ADMIN));
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["plugins"]["max_upload_bytes"], 100_000, "{v}");

    // The CLI refuses locally, naming the limit.
    let big = dir.path().join("big.wasm");
    std::fs::write(&big, vec![0u8; 150_000]).unwrap();
    let big_s = big.display().to_string();
    let (code, _, err) = refold(
        &[
            "plugin",
            "--api",
            &host.base,
            "--token",
            ADMIN,
            "push",
            "--entity-type",
            "account",
            &big_s,
        ],
        dir.path(),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("150000 bytes") && err.contains("plugins.max_upload_bytes"),
        "{err}"
    );
    drop(host);

    // By default a component over axum's 2 MiB is accepted for a look.
    let host = Host::start(&cfg, dir.path(), &[]);
    let r = http()
        .put(format!("{}/v1/plugins/account?mode=none", host.base))
        .bearer_auth(ADMIN)
        .body(vec![0u8; 3 << 20])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
}

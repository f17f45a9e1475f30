//! Live plugin lifecycle: uploads refused with a reason, swaps under load
//! (forward and rebuild) with exact final states, rollback, quarantine retry
//! after a fix, dead-letter re-submission, the watched directory, metrics and
//! truthful liveness.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;
use crate::embedded::generated_bank;

const TOKEN: &str = "s3cret-admin";

fn admin_config(
    dir: &Path,
    events: &Path,
    plugins: &[std::path::PathBuf],
    extra: &str,
) -> std::path::PathBuf {
    embedded_config(
        dir,
        &[events.to_path_buf()],
        plugins,
        &format!("[admin]\ntoken = \"{TOKEN}\"\n{extra}"),
    )
}

fn put_plugin(
    host: &Host,
    entity_type: &str,
    file: &Path,
    mode: &str,
    token: Option<&str>,
) -> (u16, Value) {
    Admin { host, token }.put_plugin(entity_type, file, mode)
}

fn post(host: &Host, path: &str, body: Option<Value>) -> (u16, Value) {
    Admin::new(host, TOKEN).post(path, body)
}

fn admin_get(host: &Host, path: &str) -> Value {
    Admin::new(host, TOKEN).get(path)
}

fn running_digest(host: &Host, t: &str) -> String {
    Admin::new(host, TOKEN).running_digest(t)
}

/// Wait until every expected account has exactly the reference balance,
/// transactions, owner and open flag.
fn assert_bank_states(
    host: &Host,
    expected: &std::collections::BTreeMap<String, Value>,
    check: impl Fn(&Value),
) {
    for (id, want) in expected {
        let path = format!("/v1/entities/account/{id}");
        let got = wait_for(Duration::from_secs(120), &path, || {
            let (c, v) = host.get(&path);
            let s = &v["state"];
            (c == 200
                && s["balance"] == want["balance"]
                && s["transactions"] == want["transactions"]
                && s["owner"] == want["owner"]
                && s["open"] == want["open"])
                .then_some(v)
        });
        assert_eq!(got["quarantined"], false, "{got}");
        check(&got["state"]);
    }
}

#[test]
fn bad_uploads_are_refused_with_the_reason_and_the_active_version_keeps_running() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(
        &events,
        &[
            ce("p1", "probe", "p-1", "probe.count", json!({})),
            ce("p2", "probe", "p-1", "probe.count", json!({})),
        ],
    );
    let host = Host::start(
        &admin_config(dir.path(), &events, &[component("probe")], ""),
        dir.path(),
        &[],
    );
    state_at_least(&host, "/v1/entities/probe/p-1", 2);
    let active = running_digest(&host, "probe");
    assert_eq!(active.len(), 64);

    // Missing and wrong tokens.
    let (c, v) = put_plugin(&host, "probe", &component("probe"), "forward", None);
    assert_eq!(c, 401, "{v}");
    let (c, _) = put_plugin(&host, "probe", &component("probe"), "forward", Some("nope"));
    assert_eq!(c, 401);

    // Not a component of our world.
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm\x01\0\0\0").unwrap();
    let (c, v) = put_plugin(&host, "probe", &junk, "forward", Some(TOKEN));
    assert_eq!(c, 422, "{v}");
    assert!(v["message"].as_str().unwrap().contains("component"), "{v}");

    // Describes another entity type.
    let (c, v) = put_plugin(
        &host,
        "probe",
        &component("probe-entity-orders"),
        "forward",
        Some(TOKEN),
    );
    assert_eq!(c, 422, "{v}");
    assert!(v["message"].as_str().unwrap().contains("`order`"), "{v}");

    // Traps in describe().
    let (c, v) = put_plugin(
        &host,
        "probe",
        &component("probe-trap-describe"),
        "forward",
        Some(TOKEN),
    );
    assert_eq!(c, 422, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("describe exploded"),
        "{v}"
    );

    // Fails the sample fold of stored events.
    let (c, v) = put_plugin(
        &host,
        "probe",
        &component("probe-fail-all"),
        "forward",
        Some(TOKEN),
    );
    assert_eq!(c, 422, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("sample fold"),
        "{v}"
    );

    assert_eq!(
        running_digest(&host, "probe"),
        active,
        "the active version keeps running"
    );
    append(
        &events,
        &[ce("p3", "probe", "p-1", "probe.count", json!({}))],
    );
    assert_eq!(
        state_at_least(&host, "/v1/entities/probe/p-1", 3)["state"]["count"],
        3
    );
}

#[test]
fn admin_api_is_refused_without_a_configured_token() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(&events, &[]);
    let cfg = embedded_config(dir.path(), &[events], &[component("probe")], "");
    let host = Host::start(&cfg, dir.path(), &[]);
    let (c, v) = put_plugin(
        &host,
        "probe",
        &component("probe"),
        "forward",
        Some("anything"),
    );
    assert_eq!(c, 403, "{v}");
}

fn state_at_least(host: &Host, path: &str, pos: u64) -> Value {
    wait_for(Duration::from_secs(60), &format!("{path} at {pos}"), || {
        let (c, v) = host.get(path);
        (c == 200 && v["position"].as_u64() >= Some(pos)).then_some(v)
    })
}

/// Appends `lines` to `file` in chunks while a test does something else.
fn feed(
    file: std::path::PathBuf,
    lines: Vec<String>,
    chunk: usize,
    pause: Duration,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let h = std::thread::spawn(move || {
        for c in lines.chunks(chunk) {
            append(&file, c);
            std::thread::sleep(pause);
        }
        d2.store(true, Ordering::SeqCst);
    });
    (done, h)
}

#[test]
fn forward_swaps_under_load_lose_nothing_and_apply_nothing_twice() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    let (lines, expected) = generated_bank(12_000, 120, 11);
    let host = Host::start(
        &admin_config(dir.path(), &events, &[component("bank")], ""),
        dir.path(),
        &[],
    );
    let v1 = digest_of(&component("bank"));
    let (c, v) = put_plugin(&host, "account", &component("bank-v2"), "none", Some(TOKEN));
    assert_eq!(c, 201, "{v}");
    let v2 = v["version"]["digest"].as_str().unwrap().to_string();
    let (done, feeder) = feed(events.clone(), lines, 400, Duration::from_millis(40));
    let mut swaps = 0;
    while !done.load(Ordering::SeqCst) {
        let target = if swaps % 2 == 0 { &v2 } else { &v1 };
        let (c, v) = post(
            &host,
            "/v1/plugins/account/activate",
            Some(json!({"digest": target, "mode": "forward"})),
        );
        assert_eq!(c, 200, "{v}");
        swaps += 1;
        std::thread::sleep(Duration::from_millis(150));
    }
    feeder.join().unwrap();
    // End on v2, so that the next touch of each entity shows the tier.
    let (c, _) = post(
        &host,
        "/v1/plugins/account/activate",
        Some(json!({"digest": v2, "mode": "forward"})),
    );
    assert_eq!(c, 200);
    assert!(swaps >= 5, "only {swaps} swaps happened");
    assert_bank_states(&host, &expected, |_| {});
    let (_, q) = host.get("/v1/quarantine");
    assert_eq!(q["count"], 0, "{q}");
    // The query API tells which version produced each state.
    let (_, s) = host.get("/v1/entities/account/c-0");
    assert!(
        s["plugin"]["digest"] == v1 || s["plugin"]["digest"] == v2,
        "{s}"
    );
    let m = host.metrics();
    assert!(
        m.contains("refold_plugin_swaps_total{entity_type=\"account\",mode=\"forward\"}"),
        "{m}"
    );
    assert!(
        m.contains("refold_events_applied_total{entity_type=\"account\",plugin_version=\"2.0.0\"}"),
        "{m}"
    );
    assert!(m.contains("refold_fold_seconds_bucket"), "{m}");
}

#[test]
fn rebuild_under_load_cuts_over_exactly_and_rollback_restores_the_old_generation() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    let (lines, expected) = generated_bank(10_000, 100, 23);
    let (head, tail) = lines.split_at(6_000);
    append(&events, head);
    let host = Host::start(
        &admin_config(dir.path(), &events, &[component("bank")], ""),
        dir.path(),
        &[],
    );
    state_at_least(&host, "/v1/entities/account/c-0", 1);
    let (done, feeder) = feed(
        events.clone(),
        tail.to_vec(),
        200,
        Duration::from_millis(30),
    );
    let (c, v) = put_plugin(
        &host,
        "account",
        &component("bank-v2"),
        "rebuild",
        Some(TOKEN),
    );
    assert_eq!(c, 201, "{v}");
    let id = v["rebuild"].as_str().expect("a rebuild id").to_string();
    // The old generation keeps serving while the rebuild runs.
    let (c, s) = host.get("/v1/entities/account/c-1");
    assert_eq!(c, 200);
    let status = wait_for(Duration::from_secs(180), "rebuild done", || {
        let s = admin_get(&host, &format!("/v1/rebuilds/{id}"));
        assert_ne!(s["state"], "failed", "{s}");
        (s["state"] == "done").then_some(s)
    });
    let _ = s;
    assert!(status["events_done"].as_u64().unwrap() > 0, "{status}");
    assert_eq!(
        status["entities_done"], status["entities_total"],
        "{status}"
    );
    feeder.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    // Every state is the new version's, exactly once per event.
    assert_bank_states(&host, &expected, |s| {
        let tier = if s["balance"].as_i64().unwrap() >= 100_000 {
            "gold"
        } else {
            "standard"
        };
        assert_eq!(s["tier"], tier, "{s}");
    });
    // Roll back: the previous generation returns, caught up, without tiers.
    let (c, v) = post(&host, "/v1/plugins/account/rollback", None);
    assert_eq!(c, 200, "{v}");
    assert_bank_states(&host, &expected, |s| {
        assert!(s.get("tier").is_none(), "{s}")
    });
    let more = vec![ce(
        "after-rb",
        "account",
        "c-3",
        "account.deposited",
        json!({"amount": 5}),
    )];
    append(&events, &more);
    let want = expected["c-3"]["balance"].as_i64().unwrap() + 5;
    wait_for(
        Duration::from_secs(30),
        "live events after rollback",
        || {
            let (_, v) = host.get("/v1/entities/account/c-3");
            (v["state"]["balance"] == want).then_some(())
        },
    );
}

#[test]
fn a_quarantined_entity_is_retried_after_a_fixed_version_is_pushed() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(&events, &[]);
    let host = Host::start(
        &admin_config(dir.path(), &events, &[component("probe-fail-all")], ""),
        dir.path(),
        &[],
    );
    append(
        &events,
        &[
            ce("q1", "probe", "p-q", "probe.count", json!({})),
            ce("q2", "probe", "p-q", "probe.count", json!({})),
            ce("q3", "probe", "p-q", "probe.count", json!({})),
        ],
    );
    let q = wait_for(Duration::from_secs(30), "quarantine", || {
        quarantine_of(&host, "probe", "p-q")
    });
    assert!(q["error"].as_str().unwrap().contains("always fails"), "{q}");
    // Held events: the last one arrived after the entity was quarantined.
    let s = wait_for(Duration::from_secs(30), "head 3", || {
        let (_, v) = host.get("/v1/entities/probe/p-q");
        (v["head"] == 3).then_some(v)
    });
    assert_eq!(s["position"], 0);

    // Export the case as a fixture; `refold test` reproduces the quarantine.
    let fx = dir.path().join("fixture");
    let (c, out, err) = refold(
        &[
            "quarantine",
            "--api",
            &host.base,
            "--token",
            TOKEN,
            "export",
            "probe",
            "p-q",
            fx.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(c, 0, "{out}{err}");
    let (v, out) = refold_test(&component("probe-fail-all"), &fx, dir.path());
    assert_eq!(v["quarantined"], json!(["p-q"]), "{out}");

    // Push the fixed version, retry, and the held events apply.
    let (c, v) = put_plugin(&host, "probe", &component("probe"), "forward", Some(TOKEN));
    assert_eq!(c, 201, "{v}");
    let (c, v) = post(&host, "/v1/quarantine/probe/p-q/retry", None);
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["quarantined"], false, "{v}");
    let s = state_at_least(&host, "/v1/entities/probe/p-q", 3);
    assert_eq!(s["state"]["count"], 3);
    assert_eq!(s["quarantined"], false);
    let (_, q) = host.get("/v1/quarantine");
    assert_eq!(q["count"], 0, "{q}");
    append(
        &events,
        &[ce("q4", "probe", "p-q", "probe.count", json!({}))],
    );
    assert_eq!(
        state_at_least(&host, "/v1/entities/probe/p-q", 4)["state"]["count"],
        4
    );
}

#[test]
fn a_dead_letter_is_resubmitted_once_fixed() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(&events, &[
        ce("d1", "probe", "p-d", "probe.count", json!({})),
        json!({"specversion":"1.0","id":"d2","type":"probe.count","entitytype":"probe","data":{}}).to_string(),
    ]);
    // No probe plugin yet: the first is dead-lettered as an unknown type.
    let host = Host::start(
        &admin_config(dir.path(), &events, &[component("bank")], ""),
        dir.path(),
        &[],
    );
    let dl = wait_for(Duration::from_secs(30), "2 dead letters", || {
        let (_, v) = host.get("/v1/dead-letters");
        (v["count"] == 2).then_some(v)
    });
    let unknown = dl["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["code"] == "unknown_entity_type")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let missing = dl["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["code"] == "missing_attribute")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (c, v) = put_plugin(&host, "probe", &component("probe"), "forward", Some(TOKEN));
    assert_eq!(c, 201, "{v}");
    let (c, v) = post(&host, &format!("/v1/dead-letters/{unknown}/resubmit"), None);
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["accepted"], true, "{v}");
    // The other one needs a correction: send the fixed record.
    let fixed = json!({"specversion":"1.0","id":"d2","type":"probe.count","subject":"p-d","entitytype":"probe","data":{}});
    let resp = http()
        .post(format!("{}/v1/dead-letters/{missing}/resubmit", host.base))
        .bearer_auth(TOKEN)
        .body(fixed.to_string())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        state_at_least(&host, "/v1/entities/probe/p-d", 2)["state"]["count"],
        2
    );
    let (_, v) = host.get("/v1/dead-letters");
    assert_eq!(v["count"], 0, "{v}");
}

#[test]
fn the_watched_directory_swaps_versions_and_the_cli_drives_the_admin_api() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(
        &events,
        &[ce(
            "w1",
            "account",
            "w-1",
            "account.opened",
            json!({"owner": "wes"}),
        )],
    );
    let pdir = dir.path().join("plugins.d");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::copy(component("bank"), pdir.join("account.wasm")).unwrap();
    let cfg = admin_config(
        dir.path(),
        &events,
        &[],
        &format!(
            "[plugins]\ndir = {:?}\ndebounce_ms = 50\n",
            pdir.display().to_string()
        ),
    );
    // `[plugins]` appears twice otherwise: keep one table.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replacen("[plugins]\nfiles = []\n", "", 1);
    std::fs::write(&cfg, text).unwrap();
    let host = Host::start(&cfg, dir.path(), &[]);
    let v1 = digest_of(&component("bank"));
    let v2 = digest_of(&component("bank-v2"));
    wait_for(
        Duration::from_secs(30),
        "v1 loaded from the directory",
        || (running_digest(&host, "account") == v1).then_some(()),
    );
    let mut latencies = Vec::new();
    for i in 0..10 {
        let (src, want) = if i % 2 == 0 {
            (component("bank-v2"), &v2)
        } else {
            (component("bank"), &v1)
        };
        let tmp = pdir.join("account.wasm.tmp");
        std::fs::copy(&src, &tmp).unwrap();
        let t0 = Instant::now();
        std::fs::rename(&tmp, pdir.join("account.wasm")).unwrap();
        wait_for(Duration::from_secs(30), "the new version applying", || {
            (running_digest(&host, "account") == *want).then_some(())
        });
        latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let report = json!({"swaps": latencies.len(), "median_ms": latencies[latencies.len() / 2], "worst_ms": latencies[latencies.len() - 1], "all_ms": latencies});
    eprintln!("watched-directory swap latency: {report}");
    let _ = std::fs::write(root().join("target/swap-latency.json"), report.to_string());

    // A bad file in the directory is refused; the active version stays.
    std::fs::write(pdir.join("account.wasm"), b"not wasm at all").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(running_digest(&host, "account"), v1);

    // The CLI: list, push, rollback.
    let api = ["--api", host.base.as_str(), "--token", TOKEN];
    let (c, out, err) = refold(&[&["plugin"][..], &api, &["list"]].concat(), dir.path());
    assert_eq!(c, 0, "{out}{err}");
    assert!(out.contains(&v1[..12]) && out.contains(&v2[..12]), "{out}");
    let (c, out, err) = refold(
        &[
            &["plugin"][..],
            &api,
            &["push", component("bank-v2").to_str().unwrap()],
        ]
        .concat(),
        dir.path(),
    );
    assert_eq!(c, 0, "{out}{err}");
    assert_eq!(running_digest(&host, "account"), v2);
    let (c, out, err) = refold(
        &[&["plugin"][..], &api, &["rollback", "account"]].concat(),
        dir.path(),
    );
    assert_eq!(c, 0, "{out}{err}");
    assert_eq!(running_digest(&host, "account"), v1);
}

#[test]
fn healthz_reports_a_stalled_partition() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(
        &events,
        &[ce("s1", "probe", "p-s", "probe.count", json!({}))],
    );
    let cfg = admin_config(
        dir.path(),
        &events,
        &[component("probe")],
        "[engine]\nstall_seconds = 1\n[plugins.entity_limits.probe]\ncpu_ms = 60000\n",
    );
    let host = Host::start(&cfg, dir.path(), &[]);
    state_at_least(&host, "/v1/entities/probe/p-s", 1);
    let (c, _) = host.get("/healthz");
    assert_eq!(c, 200);
    // A guest that spins keeps the loop busy: lag grows, progress stops.
    append(
        &events,
        &[
            ce("s2", "probe", "p-s", "probe.loop", json!({})),
            ce("s3", "probe", "p-s", "probe.count", json!({})),
        ],
    );
    let body = wait_for(Duration::from_secs(20), "healthz 503", || {
        let (c, v) = host.get("/healthz");
        (c == 503).then_some(v)
    });
    assert_eq!(body["status"], "unhealthy", "{body}");
}

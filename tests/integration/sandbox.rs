//! The sandbox, from the outside: every limit is enforced, a failing plugin
//! quarantines only its entity, and a plugin reaches no ambient capability.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

const LIMITS: &str = "[plugins.entity_limits.probe]\nmemory_bytes = 33554432\ncpu_ms = 300\nmax_state_bytes = 65536\nmax_projection_bytes = 65536\nmax_event_bytes = 65536\nmax_log_bytes = 65536\n";

/// Start a host with the probe and bank plugins over `lines`.
fn host_with(lines: &[String]) -> (tempfile::TempDir, Host) {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(&events, lines);
    let cfg = embedded_config(
        dir.path(),
        &[events],
        &[component("probe"), component("bank")],
        LIMITS,
    );
    let host = Host::start(&cfg, dir.path(), &[]);
    (dir, host)
}

fn quarantine_of(host: &Host, id: &str) -> Value {
    wait_for(
        Duration::from_secs(60),
        &format!("quarantine of {id}"),
        || {
            let (_, q) = host.get("/v1/quarantine");
            q["items"]
                .as_array()?
                .iter()
                .find(|i| i["key"]["entity_id"] == id)
                .cloned()
        },
    )
}

fn state_of(host: &Host, path: &str, pos: u64) -> Value {
    wait_for(
        Duration::from_secs(60),
        &format!("{path} at position {pos}"),
        || {
            let (s, v) = host.get(path);
            (s == 200 && v["position"].as_u64() >= Some(pos)).then_some(v)
        },
    )
}

fn bank_lines(n: usize) -> Vec<String> {
    let mut v = vec![ce(
        "b0",
        "account",
        "iso-1",
        "account.opened",
        json!({"owner": "iso"}),
    )];
    for i in 1..n {
        v.push(ce(
            &format!("b{i}"),
            "account",
            "iso-1",
            "account.deposited",
            json!({"amount": 10}),
        ));
    }
    v
}

#[test]
fn an_infinite_loop_is_interrupted_and_only_its_entity_stops() {
    let mut lines = vec![
        ce("l1", "probe", "p-loop", "probe.count", json!({})),
        ce("l2", "probe", "p-loop", "probe.loop", json!({})),
        ce("l3", "probe", "p-loop", "probe.count", json!({})),
    ];
    lines.extend(bank_lines(5));
    lines.push(ce("ok1", "probe", "p-fine", "probe.count", json!({})));
    let (_d, host) = host_with(&lines);
    let q = quarantine_of(&host, "p-loop");
    assert_eq!(q["kind"], "deadline", "{q}");
    assert_eq!(q["event_id"], "l2");
    let error = q["error"].as_str().unwrap();
    assert!(
        error.contains("in fold") && error.contains("cpu_ms = 300"),
        "{q}"
    );
    let s = state_of(&host, "/v1/entities/probe/p-loop", 1);
    assert_eq!(s["state"]["count"], 1, "stays at the last good state");
    assert_eq!(s["position"], 1);
    assert_eq!(s["head"], 3, "the later event is kept, held");
    // Other entities, of this type and of another, kept flowing.
    assert_eq!(
        state_of(&host, "/v1/entities/account/iso-1", 5)["state"]["balance"],
        40
    );
    assert_eq!(
        state_of(&host, "/v1/entities/probe/p-fine", 1)["state"]["count"],
        1
    );
}

#[test]
fn a_memory_bomb_hits_the_limit() {
    let lines = vec![
        ce("m0", "probe", "p-mem", "probe.alloc", json!({"mib": 4})),
        ce("m1", "probe", "p-mem", "probe.alloc", json!({"mib": 200})),
    ];
    let (_d, host) = host_with(&lines);
    let q = quarantine_of(&host, "p-mem");
    assert_eq!(q["kind"], "memory", "{q}");
    assert_eq!(q["event_id"], "m1");
    assert!(
        q["error"]
            .as_str()
            .unwrap()
            .contains("limit memory_bytes = 33554432"),
        "{q}"
    );
    assert_eq!(
        state_of(&host, "/v1/entities/probe/p-mem", 1)["state"]["count"],
        1
    );
}

#[test]
fn a_panic_quarantines_the_entity_with_its_message() {
    let lines = vec![
        ce("x1", "probe", "p-panic", "probe.count", json!({})),
        ce("x2", "probe", "p-panic", "probe.count", json!({})),
        ce(
            "x3",
            "probe",
            "p-panic",
            "probe.panic",
            json!({"message": "kaboom 42"}),
        ),
        ce("x4", "probe", "p-panic", "probe.count", json!({})),
    ];
    let (_d, host) = host_with(&lines);
    let q = quarantine_of(&host, "p-panic");
    assert_eq!(q["kind"], "panic", "{q}");
    assert_eq!(q["event_id"], "x3");
    assert_eq!(q["event_position"], 3);
    assert!(q["error"].as_str().unwrap().contains("kaboom 42"), "{q}");
    assert_eq!(q["plugin"]["name"], "probe");
    assert_eq!(q["plugin"]["version"], "1.0.0");
    let s = state_of(&host, "/v1/entities/probe/p-panic", 2);
    assert_eq!(s["state"]["count"], 2);
    assert_eq!(s["head"], 4);
    assert_eq!(s["quarantined"], true);
}

#[test]
fn oversized_output_is_refused() {
    let lines = vec![
        ce("o1", "probe", "p-big", "probe.big", json!({"bytes": 100})),
        ce(
            "o2",
            "probe",
            "p-big",
            "probe.big",
            json!({"bytes": 200000}),
        ),
    ];
    let (_d, host) = host_with(&lines);
    let q = quarantine_of(&host, "p-big");
    assert_eq!(q["kind"], "output_too_large", "{q}");
    assert_eq!(q["event_id"], "o2");
    let s = state_of(&host, "/v1/entities/probe/p-big", 1);
    assert_eq!(s["state"]["blob"].as_str().unwrap().len(), 100);
}

#[test]
fn a_plugin_reaches_no_file_env_clock_or_randomness() {
    let lines = vec![ce("k1", "probe", "p-peek", "probe.peek", json!({}))];
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(&events, &lines);
    let cfg = embedded_config(dir.path(), &[events], &[component("probe")], LIMITS);
    let host = Host::start(
        &cfg,
        dir.path(),
        &[("HOME", "/root"), ("SECRET_TOKEN", "s3cr3t")],
    );
    let s = state_of(&host, "/v1/entities/probe/p-peek", 1);
    let peek = &s["state"]["peek"];
    let text = peek.to_string();
    assert!(!text.contains("s3cr3t"), "{peek}");
    assert_eq!(peek["env"], 0, "{peek}");
    assert_eq!(peek["args"], 0, "{peek}");
    assert!(
        peek["home"].to_string().to_lowercase().contains("err"),
        "{peek}"
    );
    assert!(
        peek["file"].to_string().to_lowercase().contains("err"),
        "{peek}"
    );
    assert!(
        peek["dir"].to_string().to_lowercase().contains("err"),
        "{peek}"
    );
    assert_eq!(
        peek["time"],
        json!({"ok": 0}),
        "the clock is frozen: {peek}"
    );
    // wasi:http links (toolchains import it by default) and denies.
    assert!(
        peek["http"]["err"]
            .as_str()
            .is_some_and(|e| e.contains("HttpRequestDenied")),
        "{peek}"
    );
}

/// Resources a plugin makes the host hold (here `wasi:http` `fields` and
/// their headers) live outside its memory limit: past the caps, the call
/// traps and only that entity is quarantined; a plugin within them runs on.
#[test]
fn a_plugin_holding_too_many_host_resources_is_stopped() {
    let lines = vec![
        ce("r1", "probe", "p-res", "probe.fields", json!({"n": 100})),
        ce("r2", "probe", "p-res", "probe.fields", json!({"n": 5000})),
        ce("r3", "probe", "p-ok", "probe.fields", json!({"n": 500})),
        ce("r4", "probe", "p-ok", "probe.fields", json!({"n": 500})),
        ce(
            "h1",
            "probe",
            "p-hdr",
            "probe.header",
            json!({"bytes": 1024}),
        ),
        ce(
            "h2",
            "probe",
            "p-hdr",
            "probe.header",
            json!({"bytes": 8192}),
        ),
    ];
    let (_d, host) = host_with(&lines);
    let q = quarantine_of(&host, "p-res");
    assert_eq!(q["event_id"], "r2", "{q}");
    assert_eq!(q["kind"], "trap", "{q}");
    assert_eq!(
        state_of(&host, "/v1/entities/probe/p-res", 1)["state"]["count"],
        1
    );
    assert_eq!(
        state_of(&host, "/v1/entities/probe/p-ok", 2)["state"]["count"],
        2,
        "resources are freed after each call"
    );
    // Headers are host memory too: 4 KiB per `fields`.
    let q = quarantine_of(&host, "p-hdr");
    assert_eq!(q["event_id"], "h2", "{q}");
    assert!(
        q["error"]
            .as_str()
            .unwrap_or("")
            .contains("fields exceeds limit"),
        "{q}"
    );
    assert_eq!(
        state_of(&host, "/v1/entities/probe/p-hdr", 1)["state"]["count"],
        1
    );
}

#[test]
fn guest_logs_reach_the_host_log_tagged_with_the_plugin() {
    let lines = vec![ce(
        "g1",
        "probe",
        "p-log",
        "probe.log",
        json!({"message": "hello-from-guest"}),
    )];
    let (_d, host) = host_with(&lines);
    state_of(&host, "/v1/entities/probe/p-log", 1);
    let log = wait_for(Duration::from_secs(10), "guest log line", || {
        let t = host.log_text();
        t.contains("hello-from-guest").then_some(t)
    });
    assert!(
        log.lines()
            .any(|l| l.contains("hello-from-guest") && l.contains("probe@1.0.0")),
        "{log}"
    );
}

/// A host with the probe (or one of its variants) and bank, the probe's
/// limits at their defaults except the CPU budget.
fn host_with_probe(probe: &str, lines: &[String]) -> (tempfile::TempDir, Host) {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(&events, lines);
    let cfg = embedded_config(
        dir.path(),
        &[events],
        &[component(probe), component("bank")],
        "[plugins.entity_limits.probe]\ncpu_ms = 300\n",
    );
    let host = Host::start(&cfg, dir.path(), &[]);
    (dir, host)
}

/// The value of a metric line for the probe's entity type.
fn probe_metric(host: &Host, name: &str) -> Option<f64> {
    let r = http()
        .get(format!("{}/metrics", host.base))
        .send()
        .ok()?
        .text()
        .ok()?;
    r.lines()
        .find(|l| l.starts_with(name) && l.contains("entity_type=\"probe\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn too_many_projection_ops_quarantine_only_their_entity() {
    let mut lines = vec![
        ce("p1", "probe", "p-ops", "probe.ops", json!({"n": 10})),
        ce("p2", "probe", "p-ops", "probe.ops", json!({"n": 20000})),
    ];
    lines.extend(bank_lines(3));
    lines.push(ce("ok1", "probe", "p-fine", "probe.count", json!({})));
    let (_d, host) = host_with_probe("probe", &lines);
    let q = quarantine_of(&host, "p-ops");
    assert_eq!(q["kind"], "output_too_large", "{q}");
    // 20010 ops when both events share a batch, 20000 when they do not.
    let error = q["error"].as_str().unwrap();
    assert!(
        error.contains("project returned 200")
            && error.contains(" ops, limit max_projection_ops = 10000"),
        "{q}"
    );
    // The whole batch's projection failed, so the state stays where it was.
    let (_, s) = host.get("/v1/entities/probe/p-ops");
    assert_eq!(s["quarantined"], true, "{s}");
    assert_eq!(
        state_of(&host, "/v1/entities/account/iso-1", 3)["state"]["balance"],
        20
    );
    assert_eq!(
        state_of(&host, "/v1/entities/probe/p-fine", 1)["state"]["count"],
        1
    );
}

#[test]
fn projection_bytes_are_refused_before_the_host_copies_them() {
    // 100k ops of 3 to 7 bytes: far below the byte limit as the guest sees
    // them, several MiB as host ops. Guest memory is raised so that the
    // guest can build them.
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    let mut lines = vec![ce(
        "q1",
        "probe",
        "p-wide",
        "probe.ops",
        json!({"n": 100000}),
    )];
    lines.extend(bank_lines(3));
    append(&events, &lines);
    let cfg = embedded_config(
        dir.path(),
        &[events],
        &[component("probe"), component("bank")],
        "[plugins.entity_limits.probe]\nmemory_bytes = 268435456\nmax_projection_ops = 1000000\n",
    );
    let host = Host::start(&cfg, dir.path(), &[]);
    let q = quarantine_of(&host, "p-wide");
    assert_eq!(q["kind"], "output_too_large", "{q}");
    assert!(
        q["error"]
            .as_str()
            .unwrap()
            .contains("limit max_projection_bytes = 4194304"),
        "{q}"
    );
    assert_eq!(
        state_of(&host, "/v1/entities/account/iso-1", 3)["state"]["balance"],
        20
    );
}

#[test]
fn a_log_flood_is_cut_to_the_per_call_budget_and_counted() {
    let lines = vec![
        ce(
            "f1",
            "probe",
            "p-flood",
            "probe.flood",
            json!({"lines": 5000}),
        ),
        ce("f2", "probe", "p-flood", "probe.count", json!({})),
    ];
    let (_d, host) = host_with_probe("probe", &lines);
    assert_eq!(
        state_of(&host, "/v1/entities/probe/p-flood", 2)["state"]["count"],
        1
    );
    let log = wait_for(Duration::from_secs(10), "the truncation line", || {
        let t = host.log_text();
        t.contains("log truncated").then_some(t)
    });
    let forwarded = log.lines().filter(|l| l.contains("flood line")).count();
    assert_eq!(forwarded, 100, "the default budget is 100 lines per call");
    assert!(
        log.contains("log truncated: 4900 lines dropped in fold (limit max_log_lines_per_call = 100, max_log_bytes_per_call = 65536)"),
        "{}",
        log.lines().filter(|l| l.contains("truncated")).collect::<Vec<_>>().join("\n")
    );
    let dropped = wait_for(Duration::from_secs(10), "the dropped-lines metric", || {
        probe_metric(&host, "refold_plugin_log_lines_dropped")
    });
    assert_eq!(dropped, 4900.0);
}

#[test]
fn a_looping_init_is_a_deadline_in_init() {
    let mut lines = vec![ce("i1", "probe", "p-init", "probe.count", json!({}))];
    lines.extend(bank_lines(3));
    let (_d, host) = host_with_probe("probe-loop-init", &lines);
    let q = quarantine_of(&host, "p-init");
    assert_eq!(q["kind"], "deadline", "{q}");
    assert_eq!(q["event_id"], "i1");
    let error = q["error"].as_str().unwrap();
    assert!(
        error.contains("in init") && error.contains("cpu_ms = 300"),
        "{q}"
    );
    assert_eq!(
        state_of(&host, "/v1/entities/account/iso-1", 3)["state"]["balance"],
        20
    );
}

#[test]
fn a_stack_overflow_is_one_short_line() {
    let lines = vec![
        ce("r1", "probe", "p-deep", "probe.count", json!({})),
        ce("r2", "probe", "p-deep", "probe.recurse", json!({})),
    ];
    let (_d, host) = host_with_probe("probe", &lines);
    let q = quarantine_of(&host, "p-deep");
    assert_eq!(q["kind"], "trap", "{q}");
    assert_eq!(q["event_id"], "r2");
    assert_eq!(q["error"], "Other trap: stack overflow in fold", "{q}");
    assert_eq!(
        state_of(&host, "/v1/entities/probe/p-deep", 1)["state"]["count"],
        1
    );
}

#[test]
fn a_refused_grow_the_guest_survives_is_still_memory() {
    let lines = vec![
        ce("g1", "probe", "p-grab", "probe.count", json!({})),
        ce("g2", "probe", "p-grab", "probe.grab", json!({"mib": 200})),
    ];
    let (_d, host) = host_with_probe("probe", &lines);
    let q = quarantine_of(&host, "p-grab");
    assert_eq!(q["kind"], "memory", "{q}");
    assert_eq!(q["event_id"], "g2");
    assert!(
        q["error"].as_str().unwrap().contains("in fold: requested"),
        "{q}"
    );
    assert!(
        q["error"]
            .as_str()
            .unwrap()
            .contains("limit memory_bytes = 67108864"),
        "{q}"
    );
}

#[test]
fn locating_a_looping_event_costs_one_more_deadline() {
    // Seven good events and a looping one, in one batch: the batch call runs
    // out once, and the replay that finds the culprit once more (bisection
    // ran out once per step).
    let mut lines: Vec<String> = (0..7)
        .map(|i| {
            ce(
                &format!("c{i}"),
                "probe",
                "p-late",
                "probe.count",
                json!({}),
            )
        })
        .collect();
    lines.push(ce("c7", "probe", "p-late", "probe.loop", json!({})));
    let (_d, host) = host_with_probe("probe", &lines);
    let q = quarantine_of(&host, "p-late");
    assert_eq!(q["kind"], "deadline", "{q}");
    assert_eq!(q["event_id"], "c7");
    assert_eq!(
        state_of(&host, "/v1/entities/probe/p-late", 7)["state"]["count"],
        7,
        "the events before the culprit are applied"
    );
    let deadlines = wait_for(Duration::from_secs(10), "the deadlines metric", || {
        probe_metric(&host, "refold_plugin_deadlines")
    });
    assert_eq!(deadlines, 2.0);
}

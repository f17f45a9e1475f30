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

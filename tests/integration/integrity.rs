//! The "nothing lost, nothing applied twice" promise under hostile input on
//! the embedded engine: event ids that repeat across entities with
//! re-deliveries and SIGKILLs, and a second writer on one database.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use crate::embedded::generated_bank_local_ids;

/// Per-entity event ids and re-deliveries, through four SIGKILLs: every
/// account ends at its reference state with every distinct event stored
/// and applied once, and nothing is dead-lettered.
#[test]
fn per_entity_ids_with_redeliveries_lose_nothing_across_sigkills() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    let (lines, expected) = generated_bank_local_ids(12_000, 120, 21);
    assert!(lines.len() > 12_050, "the input has re-deliveries");
    append(&events, &lines);
    let cfg = embedded_config(
        dir.path(),
        &[events],
        &[root().join("examples/bank/bank.wasm")],
        "",
    );
    let mut rng = 99u64;
    for round in 0..4 {
        let mut host = Host::start(&cfg, dir.path(), &[]);
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
        std::thread::sleep(Duration::from_millis(150 + (rng >> 33) % 600));
        host.kill();
        eprintln!("crash round {round}: killed");
    }
    let host = Host::start(&cfg, dir.path(), &[]);
    let mut distinct: std::collections::BTreeMap<String, std::collections::HashSet<String>> =
        Default::default();
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        distinct
            .entry(v["subject"].as_str().unwrap().to_string())
            .or_default()
            .insert(v["id"].as_str().unwrap().to_string());
    }
    for (id, want) in &expected {
        let path = format!("/v1/entities/account/{id}");
        let got = wait_for(Duration::from_secs(120), &path, || {
            let (c, v) = host.get(&path);
            (c == 200 && v["state"] == *want).then_some(v)
        });
        let n = distinct[id].len() as u64;
        assert_eq!(
            got["head"], n,
            "{id}: every distinct event stored once: {got}"
        );
        assert_eq!(got["position"], n, "{id}: every event applied once: {got}");
    }
    let text = host.metrics();
    assert!(
        !text.contains("refold_dead_letters_total{"),
        "no dead letters: {}",
        text.lines()
            .filter(|l| l.contains("dead_letters"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A second `refold run` on the same SQLite file refuses to start, says
/// why, and the first keeps running.
#[test]
fn a_second_host_on_one_database_refuses_to_start() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    let (lines, _) = generated_bank_local_ids(200, 10, 3);
    append(&events, &lines);
    let cfg = embedded_config(
        dir.path(),
        &[events],
        &[root().join("examples/bank/bank.wasm")],
        "",
    );
    let host = Host::start(&cfg, dir.path(), &[]);
    let out = Command::new(refold_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .current_dir(dir.path())
        .env("REFOLD_HTTP__LISTEN", format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another refold process"),
        "stderr: {err}"
    );
    let (c, h) = host.get("/healthz");
    assert!(c == 200 || c == 503, "{h}");
    let (c, _) = host.get("/v1/entities/account/l-0");
    assert_eq!(c, 200);
}

/// A full store (here the database's own size cap, which fails writes with
/// SQLite's "database or disk is full" exactly as a full disk does) is
/// waited out: `/healthz` turns 503 and says why, queries keep being
/// answered, a restart on the still-full store keeps serving instead of
/// exiting, and once there is room every event arrives exactly once.
#[test]
fn a_full_store_is_waited_out_and_loses_nothing() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    let (lines, expected) = generated_bank_local_ids(12_000, 100, 8);
    append(&events, &lines);
    let cfg = embedded_config(
        dir.path(),
        &[events],
        &[root().join("examples/bank/bank.wasm")],
        "",
    );
    let cap = [("REFOLD_STORE__MAX_BYTES", "1500000")];
    let mut host = Host::start(&cfg, dir.path(), &cap);
    let health = wait_for(
        Duration::from_secs(90),
        "healthz to report the full store",
        || {
            let (c, h) = host.get("/healthz");
            (c == 503 && h["reason"].as_str().is_some_and(|r| r.contains("full"))).then_some(h)
        },
    );
    eprintln!("full: {health}");
    let (c, v) = host.get("/v1/entities/account/l-0");
    assert_eq!(c, 200, "queries go on while writes wait: {v}");
    host.kill();

    // Restarted on the still-full store: it stays up and says why.
    let mut host = Host::start(&cfg, dir.path(), &cap);
    wait_for(
        Duration::from_secs(60),
        "healthz 503 after the restart",
        || {
            let (c, h) = host.get("/healthz");
            (c == 503).then_some(h)
        },
    );
    assert!(
        host.child.try_wait().unwrap().is_none(),
        "the host stays up"
    );
    host.kill();

    let host = Host::start(&cfg, dir.path(), &[("REFOLD_STORE__MAX_BYTES", "0")]);
    wait_for_accounts(&host, &expected, Duration::from_secs(120));
    wait_for_health(&host, 200, Duration::from_secs(30));
}

/// A followed input that is not there yet (or gone) is a fault to wait
/// out, not a reason to exit: `/healthz` says which file, queries are
/// answered, and the events are read once the file appears.
#[test]
fn a_missing_input_file_is_waited_out() {
    let dir = tempdir();
    let events = dir.path().join("later.jsonl");
    let cfg = embedded_config(
        dir.path(),
        std::slice::from_ref(&events),
        &[root().join("examples/bank/bank.wasm")],
        "",
    );
    let mut host = Host::start(&cfg, dir.path(), &[]);
    let h = wait_for(
        Duration::from_secs(30),
        "healthz to name the missing file",
        || {
            let (c, h) = host.get("/healthz");
            (c == 503
                && h["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("later.jsonl")))
            .then_some(h)
        },
    );
    eprintln!("{h}");
    assert!(
        host.child.try_wait().unwrap().is_none(),
        "the host stays up"
    );
    let (lines, expected) = generated_bank_local_ids(300, 10, 4);
    append(&events, &lines);
    wait_for_accounts(&host, &expected, Duration::from_secs(60));
    wait_for_health(&host, 200, Duration::from_secs(30));
}

/// An entity type whose `init` never returns does not hold the others back:
/// every bank account is folded while most of the looping entities are
/// still waiting their turn (each costs a deadline), and those are then
/// quarantined one by one in later batches, each naming `init`.
#[test]
fn a_looping_entity_type_does_not_stall_the_others() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    let looping = 60;
    let mut lines: Vec<String> = (0..looping)
        .map(|i| {
            ce(
                &format!("p{i}"),
                "probe",
                &format!("p-{i}"),
                "probe.count",
                serde_json::json!({}),
            )
        })
        .collect();
    let (bank, expected) = generated_bank_local_ids(300, 10, 9);
    lines.extend(bank);
    append(&events, &lines);
    let cfg = embedded_config(
        dir.path(),
        &[events],
        &[
            root().join("examples/bank/bank.wasm"),
            component("probe-loop-init"),
        ],
        "[plugins.entity_limits.probe]\ncpu_ms = 300\n",
    );
    let host = Host::start(&cfg, dir.path(), &[]);
    wait_for_accounts(&host, &expected, Duration::from_secs(60));
    let (_, q) = host.get("/v1/quarantine?limit=100");
    let n = q["items"].as_array().map_or(0, Vec::len);
    assert!(
        n < looping,
        "the bank was done before the looping type was: {n} of {looping} quarantined"
    );
    let q = wait_for(
        Duration::from_secs(120),
        "every looping entity quarantined",
        || {
            let (_, q) = host.get("/v1/quarantine?limit=100");
            (q["items"].as_array().map_or(0, Vec::len) == looping).then_some(q)
        },
    );
    let first = &q["items"][0];
    assert!(
        first["error"].as_str().is_some_and(|e| e.contains("init")),
        "the quarantine says which export ran out: {first}"
    );
}

//! Embedded mode end to end: quick start, plugin testing, inspection, the
//! query API over a followed file, and crash safety.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

#[test]
fn demo_prints_the_example_states() {
    let (code, out, err) = refold(&["demo"], &root());
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("account") && out.contains("order"), "{out}");
    assert!(
        out.contains("dead letters") && out.contains("quarantined"),
        "{out}"
    );
}

#[test]
fn example_fixtures_pass_refold_test() {
    for (plugin, dir) in [
        ("examples/bank/bank.wasm", "examples/bank"),
        ("examples/orders/orders.wasm", "examples/orders"),
    ] {
        let (code, out, err) = refold(&["test", "--plugin", plugin, dir, "--json"], &root());
        assert_eq!(code, 0, "{dir}: stdout:\n{out}\nstderr:\n{err}");
        let v: Value = serde_json::from_str(&out).expect("--json prints one JSON object");
        assert_eq!(v["mismatches"], 0, "{v}");
        assert!(v["entities_checked"].as_u64().unwrap() >= 5, "{v}");
        assert!(
            v["dead_letters"].as_u64().unwrap() >= 4,
            "fixtures carry malformed lines: {v}"
        );
        assert_eq!(
            v["quarantined"].as_array().unwrap().len(),
            1,
            "one poison event: {v}"
        );
        assert!(v["duplicates"].as_u64().unwrap() >= 1, "{v}");
        assert_eq!(v["deterministic"], true);
    }
}

#[test]
fn the_bank_in_rust_javascript_and_python_passes_the_same_fixtures() {
    // bank-js is built with componentize-js's defaults, so it imports
    // wasi:http: this also shows that the host's deny-all wasi:http lets it load.
    let mut seen = Vec::new();
    for name in ["bank", "bank-js", "bank-py"] {
        let plugin = component(name);
        let (code, out, err) = refold(
            &[
                "test",
                "--plugin",
                plugin.to_str().unwrap(),
                "examples/bank",
                "--json",
            ],
            &root(),
        );
        assert_eq!(code, 0, "{name}: stdout:\n{out}\nstderr:\n{err}");
        let v: Value = serde_json::from_str(&out).expect("--json prints one JSON object");
        assert_eq!(v["passed"], true, "{name}: {v}");
        assert_eq!(v["deterministic"], true, "{name}: {v}");
        assert_eq!(v["determinism_checked"], true, "{name}: {v}");
        let reason = v["quarantine"][0]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("account.deposited") && reason.contains("12.50"),
            "{name}: the quarantine names the real error: {v}"
        );
        seen.push((
            v["applied"].clone(),
            v["duplicates"].clone(),
            v["dead_lettered"].clone(),
            v["quarantined"].clone(),
        ));
    }
    assert_eq!(seen[0], seen[1], "Rust and JavaScript handle the log alike");
    assert_eq!(seen[0], seen[2], "Rust and Python handle the log alike");
}

/// Entities a batch defers (past its fold budget) have their events
/// stored and are folded by later batches; when the input ends, the last
/// batches' deferred entities are folded before the run stops. With room
/// for one read-model operation per batch, a batch folds the entity that
/// spends it and defers the rest (the bank writes a document per account),
/// and the fixture still passes: nothing is left behind its head.
#[test]
fn a_run_that_ends_folds_what_its_batches_deferred() {
    let dir = tempdir();
    let config = dir.path().join("budget.toml");
    std::fs::write(&config, "[engine]\nmax_batch_projection_ops = 1\n").unwrap();
    let plugin = component("bank");
    let (code, out, err) = refold(
        &[
            "test",
            "--plugin",
            plugin.to_str().unwrap(),
            "examples/bank",
            "--config",
            config.to_str().unwrap(),
            "--batch-size",
            "7",
            "--no-determinism",
            "--json",
        ],
        &root(),
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let v: Value = serde_json::from_str(&out).expect("--json prints one JSON object");
    assert_eq!(v["passed"], true, "{v}");
    assert_eq!(v["mismatches"], 0, "{v}");
}

#[test]
fn refold_test_checks_projections_quarantine_and_dead_letters_and_its_options() {
    let dir = tempdir();
    for f in [
        "events.jsonl",
        "expected.jsonl",
        "expected-projections.jsonl",
        "expected-quarantine.jsonl",
        "expected-dead-letters.jsonl",
    ] {
        std::fs::copy(root().join("examples/bank").join(f), dir.path().join(f)).unwrap();
    }
    let plugin = root().join("examples/bank/bank.wasm");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "test",
            "--plugin",
            plugin.to_str().unwrap(),
            dir.path().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        refold(&args, &root())
    };
    let (code, out, err) = run(&[]);
    assert_eq!(code, 0, "{out}{err}");
    for want in [
        "ok    projection balances/alice",
        "ok    projection balances/grace (absent)",
        "ok    quarantine acc-5",
        "ok    dead letter line 11",
        "dead letter line 38 (unknown_entity_type): no plugin for entity type `ledger`",
        "quarantined account/acc-5 at position 4",
        "timing: load",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }

    // Wrong expectations of each kind fail, each with a line saying why.
    let edit = |f: &str, from: &str, to: &str| {
        let p = dir.path().join(f);
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(t.contains(from), "{f} holds {from}");
        std::fs::write(&p, t.replacen(from, to, 1)).unwrap();
    };
    edit("expected-dead-letters.jsonl", "\"line\":11", "\"line\":12");
    edit(
        "expected-quarantine.jsonl",
        "account.deposited",
        "something else",
    );
    edit(
        "expected-projections.jsonl",
        "\"key\":\"grace\"",
        "\"key\":\"nobody\"",
    );
    edit(
        "expected-projections.jsonl",
        "\"key\":\"alice\"",
        "\"key\":\"zed\"",
    );
    std::fs::write(
        dir.path().join("expected.jsonl"),
        std::fs::read_to_string(dir.path().join("expected.jsonl"))
            .unwrap()
            .replacen(
                "\"entity_type\":\"account\"",
                "\"entity_type\":\"acount\"",
                1,
            ),
    )
    .unwrap();
    let (code, out, _) = run(&["--no-determinism", "--batch-size", "3"]);
    assert_ne!(code, 0, "{out}");
    for want in [
        "FAIL  dead letter line 11: not expected",
        "FAIL  dead letter line 12: expected, not dead-lettered",
        "FAIL  quarantine acc-5: reason does not contain \"something else\"",
        "ok    projection balances/nobody (absent)",
        "FAIL  projection balances/zed: missing",
        "the plugin owns entity type `account`, not `acount`",
        "determinism: not checked (--no-determinism)",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }

    // Limits: an unknown one is refused with the known names, a value that
    // is not a number is refused, and a tight one applies to the run.
    let (code, _, err) = run(&["--limit", "memory_megs=1"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no limit `memory_megs`") && err.contains("memory_bytes"),
        "{err}"
    );
    let (code, _, err) = run(&["--limit", "memory_bytes=lots"]);
    assert_ne!(code, 0);
    assert!(err.contains("not a whole number"), "{err}");
    let (_, out, _) = run(&[
        "--limit",
        "max_state_bytes=16",
        "--json",
        "--no-determinism",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["passed"], false,
        "a 16-byte state limit fails every entity: {v}"
    );
    assert!(v["quarantine"].as_array().unwrap().len() >= 7, "{v}");
}

#[test]
fn refold_new_projects_build_and_pass_their_own_fixture() {
    let dir = tempdir();
    let (code, _, err) = refold(&["new", "--lang", "rust", "Bad_Name"], dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("lowercase letters"), "{err}");

    for (lang, name) in [
        ("rust", "tally-up"),
        ("python", "tally-py"),
        ("js", "tally-js"),
    ] {
        let (code, out, err) = refold(&["new", "--lang", lang, name], dir.path());
        assert_eq!(code, 0, "{lang}: {out}{err}");
        let proj = dir.path().join(name);
        let (code, _, err) = refold(&["new", "--lang", lang, name], dir.path());
        assert_ne!(code, 0, "an existing directory is refused");
        assert!(err.contains("already exists"), "{err}");

        let wasm = match lang {
            "rust" => {
                // A target directory kept between runs: the scaffold's
                // dependencies (serde, wit-bindgen) build once per machine.
                let target = root().join("target/scaffold");
                let status = std::process::Command::new("cargo")
                    .args(["build", "--release", "--quiet", "--target", "wasm32-wasip2"])
                    .env("CARGO_TARGET_DIR", &target)
                    .current_dir(&proj)
                    .status()
                    .expect("running cargo");
                assert!(status.success(), "the Rust scaffold builds");
                target.join("wasm32-wasip2/release/tally_up.wasm")
            }
            _ => {
                let status = std::process::Command::new("bash")
                    .arg("build.sh")
                    .current_dir(&proj)
                    .status()
                    .expect("running build.sh");
                assert!(status.success(), "the {lang} scaffold builds");
                proj.join(format!("{name}.wasm"))
            }
        };
        let (code, out, err) = refold(
            &[
                "test",
                "--plugin",
                wasm.to_str().unwrap(),
                "fixture",
                "--json",
            ],
            &proj,
        );
        assert_eq!(code, 0, "{lang}: {out}{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["passed"], true, "{lang}: {v}");
        assert_eq!(v["quarantined"], json!(["c"]), "{lang}: {v}");
    }
}

#[test]
fn the_committed_example_components_are_reproducible_from_source() {
    for name in ["bank", "orders"] {
        let built = std::fs::read(component(name)).unwrap();
        let committed = std::fs::read(root().join(format!("examples/{name}/{name}.wasm"))).unwrap();
        assert!(
            built == committed,
            "examples/{name}/{name}.wasm differs from a build of plugins/{name}: run plugins/build.sh --examples"
        );
    }
}

#[test]
fn refold_test_reports_a_mismatch_with_a_readable_diff() {
    let dir = tempdir();
    std::fs::copy(
        root().join("examples/bank/events.jsonl"),
        dir.path().join("events.jsonl"),
    )
    .unwrap();
    let expected = std::fs::read_to_string(root().join("examples/bank/expected.jsonl")).unwrap();
    let mut lines: Vec<Value> = expected
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let victim = lines
        .iter()
        .position(|l| l["state"]["balance"].as_i64().is_some())
        .unwrap();
    let old = lines[victim]["state"]["balance"].as_i64().unwrap();
    lines[victim]["state"]["balance"] = json!(old + 1);
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(dir.path().join("expected.jsonl"), text.join("\n")).unwrap();
    let plugin = root().join("examples/bank/bank.wasm");
    let (code, out, _) = refold(
        &[
            "test",
            "--plugin",
            plugin.to_str().unwrap(),
            dir.path().to_str().unwrap(),
        ],
        &root(),
    );
    assert_ne!(code, 0, "a mismatch must fail: {out}");
    assert!(
        out.contains(&format!("$.balance: expected {}, got {old}", old + 1)),
        "{out}"
    );
    let (code, out, _) = refold(
        &[
            "test",
            "--plugin",
            plugin.to_str().unwrap(),
            dir.path().to_str().unwrap(),
            "--json",
        ],
        &root(),
    );
    assert_ne!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["mismatches"], 1, "{v}");
}

#[test]
fn inspect_tells_what_a_component_is() {
    let (code, out, _) = refold(&["inspect", "examples/bank/bank.wasm"], &root());
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["matches_world"], true);
    assert_eq!(v["describe"]["entity_type"], "account");
    assert_eq!(v["describe"]["name"], "bank");
    assert!(v["digest"].as_str().unwrap().starts_with("sha256:"));

    let dir = tempdir();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm\x01\0\0\0").unwrap(); // a core module, not a component
    let (code, out, _) = refold(&["inspect", junk.to_str().unwrap()], &root());
    assert_eq!(code, 1, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["matches_world"], false);
}

/// Bank semantics, as the reference the engine's results are checked against.
fn reference_bank(events: &[(String, String, Value)]) -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    for (id, ty, data) in events {
        let s = out.entry(id.clone()).or_insert_with(
            || json!({"owner": null, "balance": 0, "transactions": 0, "open": false}),
        );
        match ty.as_str() {
            "account.opened" => {
                s["owner"] = data["owner"].clone();
                s["open"] = json!(true);
            }
            "account.deposited" => {
                s["balance"] =
                    json!(s["balance"].as_i64().unwrap() + data["amount"].as_i64().unwrap());
                s["transactions"] = json!(s["transactions"].as_i64().unwrap() + 1);
            }
            "account.withdrawn" => {
                s["balance"] =
                    json!(s["balance"].as_i64().unwrap() - data["amount"].as_i64().unwrap());
                s["transactions"] = json!(s["transactions"].as_i64().unwrap() + 1);
            }
            "account.closed" => s["open"] = json!(false),
            _ => {}
        }
    }
    out
}

/// `n` bank events over `accounts` accounts, with some exact duplicates.
pub fn generated_bank(
    n: usize,
    accounts: usize,
    seed: u64,
) -> (Vec<String>, BTreeMap<String, Value>) {
    let mut lines = Vec::new();
    let mut applied = Vec::new();
    let mut x = seed;
    for i in 0..n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let acc = format!(
            "c-{}",
            if i < accounts {
                i
            } else {
                (x >> 33) as usize % accounts
            }
        );
        let (ty, data) = if i < accounts {
            ("account.opened", json!({"owner": format!("o-{i}")}))
        } else if (x >> 20).is_multiple_of(3) {
            ("account.withdrawn", json!({"amount": (x >> 40) % 500}))
        } else {
            ("account.deposited", json!({"amount": (x >> 40) % 1000}))
        };
        let line = ce(&format!("e-{i}"), "account", &acc, ty, data.clone());
        lines.push(line.clone());
        applied.push((acc, ty.to_string(), data));
        if i % 97 == 0 {
            lines.push(line); // an exact duplicate: must be applied once
        }
    }
    (lines, reference_bank(&applied))
}

/// `n` bank events over `accounts` accounts whose ids count per account
/// ("1", "2", … for each: the same id names a different event in every
/// account), with 1 % re-deliveries of a random earlier event of any account.
pub fn generated_bank_local_ids(
    n: usize,
    accounts: usize,
    seed: u64,
) -> (Vec<String>, BTreeMap<String, Value>) {
    let mut lines: Vec<String> = Vec::new();
    let mut applied = Vec::new();
    let mut next_id = vec![1u64; accounts];
    let mut x = seed;
    for i in 0..n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let a = if i < accounts {
            i
        } else {
            (x >> 33) as usize % accounts
        };
        let acc = format!("l-{a}");
        let (ty, data) = if i < accounts {
            ("account.opened", json!({"owner": format!("o-{a}")}))
        } else if (x >> 20).is_multiple_of(3) {
            ("account.withdrawn", json!({"amount": (x >> 40) % 500}))
        } else {
            ("account.deposited", json!({"amount": (x >> 40) % 1000}))
        };
        let id = next_id[a].to_string();
        next_id[a] += 1;
        lines.push(ce(&id, "account", &acc, ty, data.clone()));
        applied.push((acc, ty.to_string(), data));
        if (x >> 12).is_multiple_of(100) {
            let again = lines[(x >> 7) as usize % lines.len()].clone();
            lines.push(again);
        }
    }
    (lines, reference_bank(&applied))
}

#[test]
fn run_serves_states_history_projections_dead_letters_and_follows_the_file() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(&events, &[
        ce("a1", "account", "acc-1", "account.opened", json!({"owner": "ann"})),
        ce("a2", "account", "acc-1", "account.deposited", json!({"amount": 1500})),
        ce("a2", "account", "acc-1", "account.deposited", json!({"amount": 1500})),
        "{this is not json".to_string(),
        ce("u1", "ledger", "l-1", "ledger.posted", json!({})),
        json!({"specversion":"1.0","id":"m1","type":"account.deposited","entitytype":"account","data":{}}).to_string(),
    ]);
    let cfg = embedded_config(
        dir.path(),
        std::slice::from_ref(&events),
        &[root().join("examples/bank/bank.wasm")],
        "",
    );
    let host = Host::start(&cfg, dir.path(), &[]);
    let s = wait_for(Duration::from_secs(30), "acc-1 at position 2", || {
        let (c, v) = host.get("/v1/entities/account/acc-1");
        (c == 200 && v["position"] == 2).then_some(v)
    });
    assert_eq!(
        s["state"],
        json!({"owner": "ann", "balance": 1500, "transactions": 1, "open": true})
    );
    assert_eq!(s["plugin"]["name"], "bank");
    assert_eq!(s["plugin"]["version"], "1.0.0");
    assert_eq!(s["plugin"]["digest"].as_str().unwrap().len(), 64);

    // The file grows: the host follows it.
    append(
        &events,
        &[ce(
            "a3",
            "account",
            "acc-1",
            "account.withdrawn",
            json!({"amount": 500}),
        )],
    );
    let s = wait_for(Duration::from_secs(30), "acc-1 at position 3", || {
        let (c, v) = host.get("/v1/entities/account/acc-1");
        (c == 200 && v["position"] == 3).then_some(v)
    });
    assert_eq!(s["state"]["balance"], 1000);

    // Point in time: folded from the stored raw events.
    let (c, past) = host.get("/v1/entities/account/acc-1?at=1");
    assert_eq!(c, 200, "{past}");
    assert_eq!(past["position"], 1);
    assert_eq!(
        past["state"],
        json!({"owner": "ann", "balance": 0, "transactions": 0, "open": true})
    );
    let (_, past2) = host.get("/v1/entities/account/acc-1?at=2");
    assert_eq!(past2["state"]["balance"], 1500);

    let (c, doc) = host.get("/v1/projections/balances/ann");
    assert_eq!(c, 200, "{doc}");
    assert_eq!(doc["document"]["balance"], 1000);

    let (_, dl) = host.get("/v1/dead-letters");
    let codes: Vec<&str> = dl["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["code"].as_str().unwrap())
        .collect();
    assert_eq!(dl["count"], 3, "{dl}");
    assert!(
        codes.contains(&"malformed_json")
            && codes.contains(&"unknown_entity_type")
            && codes.contains(&"missing_attribute"),
        "{dl}"
    );
    let missing = dl["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["code"] == "missing_attribute")
        .unwrap();
    assert!(
        missing["reason"].as_str().unwrap().contains("subject"),
        "{missing}"
    );
    assert!(
        missing["payload"].as_str().unwrap().contains("\"m1\""),
        "the record is kept: {missing}"
    );

    let (c, _) = host.get("/v1/entities/account/nobody");
    assert_eq!(c, 404);
    let (c, h) = host.get("/healthz");
    assert_eq!(c, 200, "{h}");
}

#[test]
fn sigkill_in_the_middle_loses_nothing_and_applies_nothing_twice() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    let (lines, expected) = generated_bank(20_000, 150, 7);
    append(&events, &lines);
    let sink = dir.path().join("changes.jsonl");
    let cfg = embedded_config(
        dir.path(),
        &[events],
        &[root().join("examples/bank/bank.wasm")],
        &format!("[changes]\njsonl = {:?}\n", sink.display().to_string()),
    );
    let mut rng = 12345u64;
    for round in 0..4 {
        let mut host = Host::start(&cfg, dir.path(), &[]);
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
        std::thread::sleep(Duration::from_millis(150 + (rng >> 33) % 700));
        host.kill();
        eprintln!("crash round {round}: killed");
    }
    let host = Host::start(&cfg, dir.path(), &[]);
    for (id, want) in &expected {
        let path = format!("/v1/entities/account/{id}");
        let got = wait_for(Duration::from_secs(120), &path, || {
            let (c, v) = host.get(&path);
            (c == 200 && v["state"] == *want).then_some(v)
        });
        assert_eq!(got["quarantined"], false);
    }
    // Each event stored once: the head of every entity equals its number of distinct events.
    let (_, dl) = host.get("/v1/dead-letters");
    assert_eq!(dl["count"], 0, "{dl}");

    // The change records, through the kills: one per position advance,
    // each entity's in order and without gap or overlap, ending at its
    // queried state; the JSONL sink holds exactly the store's feed.
    let mut feed: Vec<Value> = Vec::new();
    let mut after = 0u64;
    loop {
        let (c, page) = host.get(&format!("/v1/changes?after={after}&limit=100"));
        assert_eq!(c, 200, "{page}");
        let items = page["changes"].as_array().unwrap().clone();
        if items.is_empty() {
            break;
        }
        after = page["next"].as_u64().unwrap();
        feed.extend(items.into_iter().map(|i| i["event"].clone()));
    }
    check_change_records(&feed, &expected);
    let filed = wait_for(
        Duration::from_secs(30),
        "the JSONL sink to catch up",
        || {
            let text = std::fs::read_to_string(&sink).unwrap_or_default();
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("a complete JSON line"))
                .collect();
            (lines.len() >= feed.len()).then_some(lines)
        },
    );
    let ids = |v: &[Value]| v.iter().map(|e| e["id"].clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&filed),
        ids(&feed),
        "the file is the feed, record for record"
    );

    // `refold listen` prints the same feed, and resumes after a cursor.
    let listen = |args: &[&str]| -> Vec<Value> {
        let out = std::process::Command::new(refold_bin())
            .args(["listen", "--api", &host.base])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let heard = listen(&[]);
    assert_eq!(ids(&heard), ids(&feed));
    let tenth = heard[9]["refoldcursor"].as_u64().unwrap().to_string();
    let rest = listen(&["--after", &tenth, "--max", "5"]);
    assert_eq!(ids(&rest), ids(&feed[10..15]));
}

/// Change records of bank accounts: ids unique; per entity, the ranges
/// `firstposition..=lastposition` follow each other from 1 without gap or
/// overlap; the last record's state is the entity's final state.
fn check_change_records(feed: &[Value], expected: &std::collections::BTreeMap<String, Value>) {
    let mut ids = std::collections::HashSet::new();
    let mut at: std::collections::HashMap<String, (u64, Value)> = Default::default();
    for e in feed {
        assert_eq!(e["type"], "refold.state.changed", "{e}");
        assert!(
            ids.insert(e["id"].as_str().unwrap().to_string()),
            "two records with one id: {e}"
        );
        let subject = e["subject"].as_str().unwrap().to_string();
        let (first, last) = (
            e["firstposition"].as_u64().unwrap(),
            e["lastposition"].as_u64().unwrap(),
        );
        let reached = at.get(&subject).map(|(p, _)| *p).unwrap_or(0);
        assert_eq!(first, reached + 1, "{subject}: a gap or an overlap at {e}");
        assert!(last >= first, "{e}");
        at.insert(subject, (last, e["data"]["state"].clone()));
    }
    assert_eq!(at.len(), expected.len(), "a record for every entity");
    for (id, want) in expected {
        assert_eq!(&at[id].1, want, "{id}: its last record is its state");
    }
}

//! Plugin operations across restarts: a rollback is not undone by the file
//! still in the watched directory, entity types with `-` install from it,
//! one size limit for every way in, and a rebuild killed mid-way is found
//! and cleaned up by the next start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

const TOKEN: &str = "ops-admin-token";

/// An embedded config with the admin API, a watched directory and `extra`
/// (which must not open another `[plugins]` table).
fn config(dir: &Path, events: &Path, pdir: &Path, plugins_extra: &str, extra: &str) -> PathBuf {
    let cfg = embedded_config(
        dir,
        &[events.to_path_buf()],
        &[],
        &format!("[admin]\ntoken = \"{TOKEN}\"\n{extra}"),
    );
    // One `[plugins]` table: the directory goes into the one written above.
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        "[plugins]\nfiles = []\n",
        &format!(
            "[plugins]\nfiles = []\ndir = {:?}\ndebounce_ms = 50\n{plugins_extra}",
            pdir.display().to_string()
        ),
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn admin(host: &Host, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("{}{path}", host.base);
    let c = http();
    let mut r = match method {
        "POST" => c.post(url),
        _ => c.get(url),
    }
    .bearer_auth(TOKEN);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn plugin_view(host: &Host, t: &str) -> Value {
    admin(host, "GET", &format!("/v1/plugins/{t}"), None).1
}

fn running(host: &Host, t: &str) -> String {
    plugin_view(host, t)["running_digest"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `src` with a custom section of `pad` bytes appended: the same plugin
/// under a new digest (a component's custom sections do not change it).
fn padded(src: &Path, dest: &Path, pad: usize) {
    let mut bytes = std::fs::read(src).unwrap();
    let name = b"refold-test-pad";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend(std::iter::repeat_n(0u8, pad));
    bytes.push(0); // custom section id
    let mut n = payload.len();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            bytes.push(b);
            break;
        }
        bytes.push(b | 0x80);
    }
    bytes.extend(payload);
    std::fs::write(dest, bytes).unwrap();
}

/// Put `src` at `dest` in one step (as an operator's `mv` does), so the
/// watcher never sees half a file.
fn drop_in(src: &Path, dest: &Path) {
    let tmp = dest.with_extension("part");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dest).unwrap();
}

fn wait_running(host: &Host, t: &str, digest: &str, what: &str) {
    wait_for(Duration::from_secs(60), what, || {
        (running(host, t) == digest).then_some(())
    });
}

fn wait_state(host: &Host, path: &str, f: impl Fn(&Value) -> bool) -> Value {
    wait_for(Duration::from_secs(60), path, || {
        let (c, v) = host.get(path);
        (c == 200 && f(&v)).then_some(v)
    })
}

#[test]
fn a_rollback_is_not_undone_by_the_directory_after_a_restart_and_a_new_file_still_applies() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(
        &events,
        &[ce(
            "r1",
            "account",
            "r-1",
            "account.opened",
            json!({"owner": "ro"}),
        )],
    );
    let pdir = dir.path().join("plugins.d");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::copy(component("bank"), pdir.join("account.wasm")).unwrap();
    let cfg = config(dir.path(), &events, &pdir, "", "");
    let v1 = digest_of(&component("bank"));
    let v2 = digest_of(&component("bank-v2"));
    let v3_file = dir.path().join("bank-v3.wasm");
    padded(&component("bank-v2"), &v3_file, 16);
    let v3 = digest_of(&v3_file);
    assert!(v3 != v2 && v3 != v1);

    let mut host = Host::start(&cfg, dir.path(), &[]);
    wait_running(&host, "account", &v1, "v1 from the directory");
    // The operator replaces the file: only v2 is left in the directory.
    drop_in(&component("bank-v2"), &pdir.join("account.wasm"));
    wait_running(&host, "account", &v2, "v2 from the directory");
    let (c, v) = admin(&host, "POST", "/v1/plugins/account/rollback", None);
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["digest"], v1, "{v}");
    host.kill();

    // The first scan ends before the first event is read: once the new
    // event is applied, the directory has had its say.
    let host = Host::start(&cfg, dir.path(), &[]);
    append(
        &events,
        &[ce(
            "r2",
            "account",
            "r-2",
            "account.opened",
            json!({"owner": "ry"}),
        )],
    );
    wait_state(&host, "/v1/entities/account/r-2", |_| true);
    assert_eq!(running(&host, "account"), v1, "{}", host.log_text());
    let view = plugin_view(&host, "account");
    assert_eq!(view["active"]["digest"], v1, "{view}");
    assert_eq!(view["active"]["rolled_back"], json!([v2]), "{view}");

    // Rewriting the rolled-back file does not bring it back; a new file
    // (a new digest) is activated, on top of v1.
    drop_in(&component("bank-v2"), &pdir.join("account.wasm"));
    drop_in(&v3_file, &pdir.join("account-v3.wasm"));
    wait_running(&host, "account", &v3, "v3 from the directory");
    let view = plugin_view(&host, "account");
    assert_eq!(view["active"]["previous"], v1, "{view}");

    // The API can still choose the rolled-back version.
    let (c, v) = admin(
        &host,
        "POST",
        "/v1/plugins/account/activate",
        Some(json!({"digest": v2, "mode": "forward"})),
    );
    assert_eq!(c, 200, "{v}");
    wait_running(&host, "account", &v2, "v2 through the API");
    assert_eq!(
        plugin_view(&host, "account")["active"]["rolled_back"],
        json!([])
    );
}

#[test]
fn an_entity_type_with_a_dash_installs_from_the_directory() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(
        &events,
        &[ce("d1", "probe-dashed", "pd-1", "probe.count", json!({}))],
    );
    let pdir = dir.path().join("plugins.d");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::copy(
        component("probe-entity-dashed"),
        pdir.join("probe-dashed.wasm"),
    )
    .unwrap();
    let cfg = config(dir.path(), &events, &pdir, "", "");
    let host = Host::start(&cfg, dir.path(), &[]);
    let v = wait_state(&host, "/v1/entities/probe-dashed/pd-1", |v| {
        v["state"]["count"] == 1
    });
    assert_eq!(v["quarantined"], false, "{v}");

    // `<type>@<anything>.wasm` names the type exactly, dashes and all.
    let next = dir.path().join("next.wasm");
    padded(&component("probe-entity-dashed"), &next, 8);
    drop_in(&next, &pdir.join("probe-dashed@next.wasm"));
    wait_running(&host, "probe-dashed", &digest_of(&next), "the @-named file");
    let (_, dl) = host.get("/v1/dead-letters");
    assert_eq!(dl["count"], 0, "{dl}");
}

#[test]
fn a_watched_file_over_the_upload_limit_is_refused_naming_the_key() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    append(
        &events,
        &[ce(
            "s1",
            "account",
            "s-1",
            "account.opened",
            json!({"owner": "sy"}),
        )],
    );
    let pdir = dir.path().join("plugins.d");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::copy(component("bank"), pdir.join("account.wasm")).unwrap();
    let v1 = digest_of(&component("bank"));
    let v1_len = std::fs::metadata(component("bank")).unwrap().len();
    let v2_len = std::fs::metadata(component("bank-v2")).unwrap().len();
    let limit = v1_len.max(v2_len) + 1024;
    let big = dir.path().join("big.wasm");
    padded(&component("bank-v2"), &big, 64 << 10);
    let cfg = config(
        dir.path(),
        &events,
        &pdir,
        &format!("max_upload_bytes = {limit}\n"),
        "",
    );
    let host = Host::start(&cfg, dir.path(), &[]);
    wait_running(&host, "account", &v1, "v1 under the limit");
    drop_in(&big, &pdir.join("account@big.wasm"));
    wait_for(Duration::from_secs(60), "the refusal in the log", || {
        host.log_text()
            .contains("over plugins.max_upload_bytes")
            .then_some(())
    });
    assert_eq!(running(&host, "account"), v1);
    wait_state(&host, "/v1/entities/account/s-1", |v| {
        v["state"]["owner"] == "sy"
    });
}

/// Rows of the SQLite store whose entity type is `ns` (a generation's
/// namespace), read beside the running host (WAL allows it).
fn namespace_rows(db: &Path, ns: &str) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.query_row(
        "SELECT count(*) FROM entities WHERE entity_type = ?1",
        [ns],
        |r| r.get(0),
    )
    .unwrap()
}

#[test]
fn a_rebuild_killed_mid_way_is_cleaned_up_at_the_next_start_and_its_status_kept() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    // Sorted by id, the first chunk of 64 entities folds at once, the
    // second spins to the CPU limit on every entity: with a limit of
    // seconds, the rebuild is reliably mid-way once the first is in.
    let mut lines = Vec::new();
    for i in 0..64 {
        lines.push(ce(
            &format!("a{i}"),
            "probe",
            &format!("a-{i:02}"),
            "probe.count",
            json!({}),
        ));
    }
    for i in 0..64 {
        lines.push(ce(
            &format!("z{i}"),
            "probe",
            &format!("z-{i:02}"),
            "probe.loop",
            json!({}),
        ));
    }
    append(&events, &lines);
    let pdir = dir.path().join("plugins.d");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::copy(component("probe"), pdir.join("probe.wasm")).unwrap();
    let limits = |ms: u64| format!("[plugins.entity_limits.probe]\ncpu_ms = {ms}\n");
    // Ingest with a short limit: the spinning events are quarantined quickly.
    let extra = |ms: u64| format!("[engine]\nrebuild_workers = 2\n{}", limits(ms));
    let cfg = config(dir.path(), &events, &pdir, "", &extra(20));
    let mut host = Host::start(&cfg, dir.path(), &[]);
    wait_state(&host, "/v1/entities/probe/a-63", |v| {
        v["state"]["count"] == 1
    });
    wait_for(Duration::from_secs(60), "64 quarantined", || {
        let (_, v) = host.get("/v1/quarantine");
        (v["count"] == 64).then_some(())
    });
    host.kill();

    let cfg = config(dir.path(), &events, &pdir, "", &extra(5000));
    let mut host = Host::start(&cfg, dir.path(), &[]);
    let digest = digest_of(&component("probe"));
    let (c, v) = admin(
        &host,
        "POST",
        "/v1/plugins/probe/activate",
        Some(json!({"digest": digest, "mode": "rebuild"})),
    );
    assert_eq!(c, 200, "{v}");
    let id = v["rebuild"].as_str().unwrap().to_string();
    let status = wait_for(Duration::from_secs(60), "the first chunk rebuilt", || {
        let (_, s) = admin(&host, "GET", &format!("/v1/rebuilds/{id}"), None);
        (s["entities_done"].as_u64().unwrap_or(0) >= 64).then_some(s)
    });
    assert_eq!(status["state"], "running", "{status}");
    let generation = status["generation"].as_str().unwrap().to_string();
    let db = dir.path().join("state/refold.db");
    assert_eq!(namespace_rows(&db, &generation), 64);
    host.kill();

    let host = Host::start(&cfg, dir.path(), &[]);
    let (c, s) = admin(&host, "GET", &format!("/v1/rebuilds/{id}"), None);
    assert_eq!(c, 200, "{s}");
    assert_eq!(s["state"], "abandoned", "{s}");
    assert_eq!(s["generation"], generation, "{s}");
    assert!(s["finished_at"].is_string(), "{s}");
    assert!(
        s["error"].as_str().unwrap_or_default().contains("stopped"),
        "{s}"
    );
    assert_eq!(namespace_rows(&db, &generation), 0);
    let (_, all) = admin(&host, "GET", "/v1/rebuilds", None);
    assert_eq!(
        all["rebuilds"].as_array().map(|a| a.len()),
        Some(1),
        "{all}"
    );
    // The old generation kept serving throughout.
    let v = wait_state(&host, "/v1/entities/probe/a-00", |_| true);
    assert_eq!(v["state"]["count"], 1, "{v}");
}

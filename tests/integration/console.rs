//! The operator console in a real browser: headless Chromium driven over
//! WebDriver (chromedriver). An operator signs in, sees the bank plugin and
//! the quarantined entities, downloads a quarantined case as a fixture that
//! `refold test` reproduces, pushes a fixed version and retries a
//! quarantined entity from the page, uploads a new version and rolls it
//! back, rebuilds and follows the rebuild, reads an entity now and at a past
//! position, reads dead letters whose payloads try to script the page, and
//! corrects one and resubmits it. A host with a read token has the page ask
//! for it. Every step is checked against the API; screenshots go to
//! `target/console-screenshots/`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::error::CmdError;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::common::*;

const TOKEN: &str = "console-admin";
const WAIT: Duration = Duration::from_secs(30);

/// A program on `PATH` (or the path in `env`, when set).
fn program(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .find(|p| p.is_file())
}

/// chromedriver and one headless Chromium session; both end on drop.
struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
    shots: PathBuf,
    downloads: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let driver_bin = program("REFOLD_TEST_CHROMEDRIVER", &["chromedriver"]).expect(
            "chromedriver is missing: the console test needs Chromium and chromedriver \
             (Debian: apt-get install chromium chromium-driver; deploy/local/test installs them)",
        );
        let port = free_port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", driver_bin.display()));
        let url = format!("http://127.0.0.1:{port}");
        wait_for(WAIT, "chromedriver /status", || {
            http()
                .get(format!("{url}/status"))
                .send()
                .ok()
                .filter(|r| r.status().is_success())
        });
        let mut options = json!({
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,1000",
            ],
        });
        // Downloads (the quarantine's fixture: two files from one click)
        // land in a directory of this browser's, without asking.
        let downloads = tempdir();
        options["prefs"] = json!({
            "download.default_directory": downloads.path().display().to_string(),
            "download.prompt_for_download": false,
            "profile.default_content_setting_values.automatic_downloads": 1,
        });
        if let Some(bin) = program(
            "REFOLD_TEST_CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        ) {
            options["binary"] = json!(bin.display().to_string());
        }
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), options);
        // A confirm() stays open until the test answers it.
        caps.insert("unhandledPromptBehavior".into(), json!("ignore"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&url),
            )
            .expect("a Chromium session through chromedriver");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("target"));
        let shots = target.join("console-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            rt,
            client: Some(client),
            driver,
            shots,
            downloads,
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    fn run<T>(&self, what: &str, f: impl Future<Output = Result<T, CmdError>>) -> T {
        self.rt
            .block_on(f)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    fn goto(&self, url: &str) {
        self.run(url, self.c().goto(url));
    }

    /// Poll until `css` matches an element whose text satisfies `ok`; the
    /// text. A view redraws whole every poll, so an element may go stale
    /// between looks: every look starts again from the document.
    fn text_of(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        let mut last;
        loop {
            let got = self.rt.block_on(async {
                let e = self.c().find(Locator::Css(css)).await?;
                e.text().await
            });
            match got {
                Ok(t) if ok(&t) => return t,
                Ok(t) => last = format!("text {t:?}"),
                Err(e) => last = e.to_string(),
            }
            if start.elapsed() > WAIT {
                let page = self.rt.block_on(self.c().source()).unwrap_or_default();
                panic!(
                    "{css}: not as expected within {WAIT:?} (last: {last}); page:\n{}",
                    &page[..page.floor_char_boundary(6000)]
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Wait for `css` to match.
    fn present(&self, css: &str) {
        self.text_of(css, |_| true);
    }

    /// How many elements match `css` now.
    fn count(&self, css: &str) -> usize {
        self.run(css, self.c().find_all(Locator::Css(css))).len()
    }

    /// Click the element `css` matches, once it does.
    fn click(&self, css: &str) {
        let start = Instant::now();
        loop {
            let r = self.rt.block_on(async {
                let e = self.c().find(Locator::Css(css)).await?;
                e.click().await
            });
            match r {
                Ok(()) => return,
                Err(e) if start.elapsed() > WAIT => panic!("clicking {css}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Type `text` into the input `css` after clearing it.
    fn fill(&self, css: &str, text: &str) {
        self.present(css);
        self.run(css, async {
            let e = self.c().find(Locator::Css(css)).await?;
            if e.attr("type").await?.as_deref() != Some("file") {
                e.clear().await?;
            }
            e.send_keys(text).await
        });
    }

    /// Wait until the browser has finished downloading `name`; its path.
    fn downloaded(&self, name: &str) -> PathBuf {
        let p = self.downloads.path().join(name);
        wait_for(WAIT, &format!("download {name}"), || {
            let partial = std::fs::read_dir(self.downloads.path())
                .ok()?
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".crdownload"));
            (p.is_file() && !partial).then(|| p.clone())
        })
    }

    fn eval(&self, script: &str) -> Value {
        self.run(script, self.c().execute(script, vec![]))
    }

    fn shot(&self, name: &str) -> PathBuf {
        let png = self.run("screenshot", self.c().screenshot());
        assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
        let p = self.shots.join(format!("{name}.png"));
        std::fs::write(&p, png).unwrap();
        p
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(c.close());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Sign in through the page's dialog, which the first admin view asks for.
fn sign_in(b: &Browser) {
    b.present("#signin[open]");
    b.fill("#admin-token", TOKEN);
    b.click("#signin-ok");
}

/// Upload `file` for `entity_type` through the page's file picker (mode
/// forward), and wait until the host runs it and the page says so.
fn upload(b: &Browser, admin: &Admin, entity_type: &str, file: &Path) {
    b.fill("#upload-type", entity_type);
    b.fill("#upload-file", file.to_str().unwrap());
    b.run("upload mode", async {
        let mode = b.c().find(Locator::Css("#upload-mode")).await?;
        mode.select_by_value("forward").await
    });
    b.click("#upload-submit");
    let digest = digest_of(file);
    wait_for(WAIT, &format!("{} running", file.display()), || {
        (admin.running_digest(entity_type) == digest).then_some(())
    });
    b.text_of(
        &format!(".card.plugin[data-entity-type={entity_type}] .running-digest"),
        |t| t == digest,
    );
}

/// Answer the confirm() the page opened, after checking what it asks.
fn confirm(b: &Browser, asks: &str) {
    let asked = b.run("confirm text", b.c().get_alert_text());
    assert!(asked.contains(asks), "{asked}");
    b.run("confirm", b.c().accept_alert());
}

/// Wait until the number of elements `css` matches satisfies `ok`.
fn count_until(b: &Browser, css: &str, ok: impl Fn(usize) -> bool) -> usize {
    let start = Instant::now();
    loop {
        let n = b.count(css);
        if ok(n) {
            return n;
        }
        assert!(start.elapsed() < WAIT, "{css}: {n} elements after {WAIT:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_operator_retries_and_rolls_back_from_the_console() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    std::fs::copy(root().join("examples/bank/events.jsonl"), &events).unwrap();
    // A record that is not JSON and tries to script whoever reads it.
    append(
        &events,
        &["<img src=x onerror=\"document.title='scripted'\"> {".to_string()],
    );
    let host = Host::start(
        &embedded_config(
            dir.path(),
            std::slice::from_ref(&events),
            &[component("bank"), component("probe-fail-all")],
            &format!("[admin]\ntoken = \"{TOKEN}\"\n"),
        ),
        dir.path(),
        &[],
    );
    append(
        &events,
        &[
            ce("q1", "probe", "p-q", "probe.count", json!({})),
            ce("q2", "probe", "p-q", "probe.count", json!({})),
            // No subject: a dead letter, corrected from the page below.
            json!({"specversion": "1.0", "id": "d-edit", "source": "/t", "type": "probe.count",
                "entitytype": "probe", "data": {}})
            .to_string(),
        ],
    );
    wait_for(WAIT, "p-q and acc-5 quarantined", || {
        (quarantine_of(&host, "probe", "p-q").is_some()
            && quarantine_of(&host, "account", "acc-5").is_some())
        .then_some(())
    });
    let expected: std::collections::BTreeMap<String, Value> =
        std::fs::read_to_string(root().join("examples/bank/expected.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    v["entity_id"].as_str().unwrap().to_string(),
                    v["state"].clone(),
                )
            })
            .collect();
    wait_for_accounts(&host, &expected, WAIT);
    let admin = Admin::new(&host, TOKEN);
    let bank_v1 = digest_of(&component("bank"));
    assert_eq!(admin.running_digest("account"), bank_v1);

    // The host keeps each partition's recent past: the file's committed
    // offset reaches its length (bytes, for files) with no lag.
    let len = std::fs::metadata(&events).unwrap().len() as i64;
    wait_for(
        WAIT,
        "the file committed to its end in /v1/partitions",
        || {
            let (_, t) = host.get("/v1/partitions");
            t["partitions"].as_array()?.iter().find_map(|p| {
                let last = p["samples"].as_array()?.last()?;
                (last["committed_offset"] == len && last["lag"] == 0).then_some(())
            })
        },
    );

    let b = Browser::start();
    let mut shots = Vec::new();

    // `/` leads to the console; the overview draws health and the file
    // partition from /metrics.
    b.goto(&format!("{}/", host.base));
    let url = b.run("url", b.c().current_url());
    assert_eq!(url.path(), "/ui/", "{url}");
    b.present("#view[data-view=overview] #health-verdict");
    b.text_of("#health", |t| t == "healthy" || t == "unhealthy");
    b.present("#partitions .card.partition .lag");
    // Two of the host's five-second steps draw the lines.
    b.present("#partitions .card.partition svg.chart polyline");
    shots.push(b.shot("overview"));

    // Queries need no token on a host without a read token: no dialog.
    b.goto(&format!("{}/ui/#/entity/account/acc-2", host.base));
    let now: Value =
        serde_json::from_str(&b.text_of("#state-now", |t| t.starts_with('{'))).unwrap();
    assert_eq!(now, expected["acc-2"]);
    assert_eq!(b.count("#signin[open]"), 0);

    // Plugins need the admin token, asked once through the page.
    b.goto(&format!("{}/ui/#/plugins", host.base));
    b.click("#view[data-view=plugins] button.primary");
    sign_in(&b);
    let running = b.text_of(
        ".card.plugin[data-entity-type=account] .running-digest",
        |t| !t.is_empty(),
    );
    assert_eq!(running, bank_v1);
    b.present(".card.plugin[data-entity-type=probe]");
    shots.push(b.shot("plugins"));

    // Both quarantined entities are listed with their reasons.
    b.goto(&format!("{}/ui/#/quarantine", host.base));
    let why = b.text_of(
        ".card.quarantined[data-entity=\"probe/p-q\"] .reason",
        |t| !t.is_empty(),
    );
    assert!(why.contains("always fails"), "{why}");
    b.present(".card.quarantined[data-entity=\"account/acc-5\"]");
    shots.push(b.shot("quarantine"));

    // The fixture download is a case `refold test` reproduces.
    b.click(".card.quarantined[data-entity=\"account/acc-5\"] .fixture");
    let fx = dir.path().join("fixture");
    std::fs::create_dir_all(&fx).unwrap();
    std::fs::copy(
        b.downloaded("account-acc-5-events.jsonl"),
        fx.join("events.jsonl"),
    )
    .unwrap();
    std::fs::copy(
        b.downloaded("account-acc-5-expected.jsonl"),
        fx.join("expected.jsonl"),
    )
    .unwrap();
    let (v, out) = refold_test(&component("bank"), &fx, dir.path());
    assert_eq!(v["quarantined"], json!(["acc-5"]), "{out}");

    // Push the fixed probe from the file picker, then Retry from the page:
    // the held events fold and the entity leaves quarantine.
    b.goto(&format!("{}/ui/#/plugins", host.base));
    upload(&b, &admin, "probe", &component("probe"));
    b.goto(&format!("{}/ui/#/quarantine", host.base));
    b.click(".card.quarantined[data-entity=\"probe/p-q\"] .retry");
    wait_for(WAIT, "p-q out of quarantine", || {
        quarantine_of(&host, "probe", "p-q").is_none().then_some(())
    });
    let (_, s) = host.get("/v1/entities/probe/p-q");
    assert_eq!(s["state"]["count"], 2, "{s}");
    assert_eq!(s["quarantined"], false, "{s}");
    count_until(&b, ".card.quarantined[data-entity=\"probe/p-q\"]", |n| {
        n == 0
    });
    b.present(".card.quarantined[data-entity=\"account/acc-5\"]");
    shots.push(b.shot("quarantine-after-retry"));

    // Upload bank v2, then roll back from the page (it asks to confirm).
    b.goto(&format!("{}/ui/#/plugins", host.base));
    upload(&b, &admin, "account", &component("bank-v2"));
    b.click(".card.plugin[data-entity-type=account] .rollback");
    confirm(&b, "Roll account back");
    wait_for(WAIT, "bank v1 running again", || {
        (admin.running_digest("account") == bank_v1).then_some(())
    });
    b.text_of(
        ".card.plugin[data-entity-type=account] .running-digest",
        |t| t == bank_v1,
    );
    // The history shows upload and rollback, newest first.
    let history = b.text_of(
        ".card.plugin[data-entity-type=account] table.history",
        |t| t.contains("rollback"),
    );
    assert!(history.contains("forward"), "{history}");
    shots.push(b.shot("plugins-after-rollback"));

    // Rebuild every account from its history with the active version; the
    // rebuilds view shows it done, and the states are exactly as before.
    b.click(".card.plugin[data-entity-type=account] .rebuild");
    confirm(&b, "Rebuild every account");
    let rebuild = wait_for(WAIT, "the rebuild done", || {
        let r = admin.get("/v1/rebuilds");
        r["rebuilds"]
            .as_array()?
            .iter()
            .find(|r| r["entity_type"] == "account" && r["state"] == "done")
            .cloned()
    });
    b.goto(&format!("{}/ui/#/rebuilds", host.base));
    let row = format!("tr[data-rebuild=\"{}\"]", rebuild["id"].as_str().unwrap());
    b.text_of(&row, |t| t.contains("done"));
    let bar = b.eval(&format!(
        "return document.querySelector('{row} .bar span').style.width"
    ));
    assert_eq!(bar, json!("100%"));
    shots.push(b.shot("rebuilds"));
    wait_for_accounts(&host, &expected, WAIT);
    assert_eq!(admin.running_digest("account"), bank_v1);

    // An entity now and at a past position, as the API answers them.
    b.goto(&format!("{}/ui/#/entity/account/acc-1", host.base));
    let now: Value =
        serde_json::from_str(&b.text_of("#state-now", |t| t.starts_with('{'))).unwrap();
    assert_eq!(now, expected["acc-1"]);
    b.eval("const s = document.querySelector('#at'); s.value = 1; s.dispatchEvent(new Event('input'));");
    b.present("#state-at[data-position=\"1\"]");
    let at1: Value = serde_json::from_str(&b.text_of("#state-at", |t| t.starts_with('{'))).unwrap();
    let (_, api_at1) = host.get("/v1/entities/account/acc-1?at=1");
    assert_eq!(at1, api_at1["state"]);
    assert_ne!(at1, now);
    shots.push(b.shot("entity"));

    // Dead letters: every one listed, payloads shown as text, never run.
    let dl = admin.get("/v1/dead-letters?limit=100")["items"]
        .as_array()
        .map_or(0, Vec::len);
    // The example's five, and the two records above.
    assert_eq!(dl, 7);
    b.goto(&format!("{}/ui/#/dead-letters", host.base));
    count_until(&b, ".card.dead-letter", |n| n >= dl);
    assert_eq!(b.count(".card.dead-letter"), dl);
    assert_eq!(b.count("#view img"), 0);
    assert_eq!(b.eval("return document.title"), json!("refold console"));
    let payloads = b.eval(
        "return [...document.querySelectorAll('.card.dead-letter .payload')].map(p => p.textContent)",
    );
    assert!(
        payloads
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("<img src=x")),
        "{payloads}"
    );
    shots.push(b.shot("dead-letters"));

    // Correct the record without a subject in the page and resubmit it:
    // it becomes an event of its entity and leaves the dead letters.
    let id = admin.get("/v1/dead-letters?limit=100")["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["payload"].as_str().is_some_and(|p| p.contains("d-edit")))
        .expect("the d-edit dead letter")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let card = format!(".card.dead-letter[data-id=\"{id}\"]");
    b.click(&format!("{card} .start-edit"));
    let fixed = json!({"specversion": "1.0", "id": "d-edit", "source": "/t", "type": "probe.count",
        "subject": "p-e", "entitytype": "probe", "data": {}});
    b.fill(&format!("{card} textarea.edit"), &fixed.to_string());
    b.click(&format!("{card} .send-edited"));
    let s = wait_for(WAIT, "p-e folded", || {
        let (c, v) = host.get("/v1/entities/probe/p-e");
        (c == 200 && v["position"] == 1).then_some(v)
    });
    assert_eq!(s["state"]["count"], 1, "{s}");
    count_until(&b, ".card.dead-letter", |n| n == dl - 1);
    assert_eq!(b.count(&card), 0);
    let left = admin.get("/v1/dead-letters?limit=100");
    assert_eq!(left["items"].as_array().unwrap().len(), dl - 1, "{left}");

    // Nothing the page drew was blocked by its own security policy.
    assert_eq!(
        b.eval("return document.documentElement.dataset.cspViolations || '0'"),
        json!("0")
    );
    for s in &shots {
        assert!(
            std::fs::metadata(s).unwrap().len() > 1000,
            "{}",
            s.display()
        );
    }
}

#[test]
fn the_console_asks_for_the_read_token_a_host_sets_and_keeps_it_for_the_tab() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    std::fs::copy(root().join("examples/bank/events.jsonl"), &events).unwrap();
    let host = Host::start(
        &embedded_config(
            dir.path(),
            std::slice::from_ref(&events),
            &[component("bank")],
            &format!("[admin]\ntoken = \"{TOKEN}\"\n[http]\nread_token = \"reader\"\n"),
        ),
        dir.path(),
        &[],
    );
    let b = Browser::start();
    // Without the token the page asks for it, saying why, and shows no
    // state until it has it.
    b.goto(&format!("{}/ui/#/entity/account/acc-1", host.base));
    let why = b.text_of("#signin[open] #signin-why", |t| !t.is_empty());
    assert!(why.contains("read token"), "{why}");
    assert_eq!(b.count("#state-now"), 0);
    b.fill("#read-token", "reader");
    b.click("#signin-ok");
    let state = b.text_of("#state-now", |t| t.starts_with('{'));
    let http = reqwest::blocking::Client::new();
    let api: Value = http
        .get(format!("{}/v1/entities/account/acc-1", host.base))
        .bearer_auth("reader")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(serde_json::from_str::<Value>(&state).unwrap(), api["state"]);
    // The tab keeps it: another view asks nothing.
    b.goto(&format!("{}/ui/#/dead-letters", host.base));
    count_until(&b, ".card.dead-letter", |n| n == 5);
    assert_eq!(b.count("#signin[open]"), 0);
    // A read token opens no admin action: the plugins view asks for the
    // admin token instead of listing anything.
    b.goto(&format!("{}/ui/#/plugins", host.base));
    b.text_of("#view[data-view=plugins]", |t| {
        t.contains("need the admin token")
    });
    assert_eq!(b.count(".card.plugin"), 0);
    b.shot("read-token");
}

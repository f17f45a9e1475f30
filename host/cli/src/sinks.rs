//! Side-effect sinks of the change feed: the webhook sink. It reads the
//! store's feed in order from its own cursor (a file, replaced atomically
//! after each delivery), so a restart continues after the last record the
//! endpoint acknowledged; a crash between the acknowledgement and the
//! cursor write re-sends that one record with the same `Idempotency-Key`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::watch;

use refold_engine::Host;
use refold_engine::changes::{next_page, with_cursor};
use refold_engine::config::WebhookConfig;
use refold_store::StoredChange;

/// Records read from the feed per step.
const PAGE: usize = 64;
/// Longest backoff between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The cursor file of a sink: as configured, or beside the store.
pub fn cursor_file(host: &Host, w: &WebhookConfig) -> PathBuf {
    w.cursor_file.clone().unwrap_or_else(|| {
        let mut p = host.config.store.path.clone().into_os_string();
        p.push(format!(".webhook-{}.cursor", w.name));
        PathBuf::from(p)
    })
}

/// The dead-letter file of a sink: its cursor file's name plus `.dead.jsonl`.
pub fn dead_letter_file(cursor: &Path) -> PathBuf {
    let mut p = cursor.as_os_str().to_owned();
    p.push(".dead.jsonl");
    PathBuf::from(p)
}

fn read_cursor(path: &Path) -> anyhow::Result<u64> {
    match std::fs::read_to_string(path) {
        Ok(t) => t
            .trim()
            .parse()
            .with_context(|| format!("{} does not hold a cursor", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_cursor(path: &Path, cursor: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, cursor.to_string())?;
    std::fs::rename(&tmp, path)
}

/// How one record's delivery ended.
enum Outcome {
    Delivered,
    /// Given up after the last attempt's error.
    Failed(String),
    Stopped,
}

/// Run one webhook sink until `stop`. A sink that stops on an error (its
/// cursor or dead-letter file cannot be written) leaves `/healthz`
/// unhealthy with the reason.
pub async fn run_webhook(
    host: Host,
    w: WebhookConfig,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // One health site per sink, named once for the process.
    let site: &'static str = Box::leak(format!("sink:{}", w.name).into_boxed_str());
    let health = host.health.clone();
    let r = deliver_all(host, &w, site, stop).await;
    if let Err(e) = &r {
        health.fault(site, format!("the webhook sink {} stopped: {e:#}", w.name));
    }
    r
}

async fn deliver_all(
    host: Host,
    w: &WebhookConfig,
    site: &'static str,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    anyhow::ensure!(!w.url.is_empty(), "changes.webhooks[{}]: no url", w.name);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(w.timeout_ms.max(1)))
        .build()?;
    let cursor_path = cursor_file(&host, w);
    let dead_path = dead_letter_file(&cursor_path);
    let mut cursor = read_cursor(&cursor_path)?;
    tracing::info!(sink = %w.name, url = %w.url, after = cursor, "webhook sink started");
    host.sinks.set(&w.name, cursor);
    while let Some(page) = next_page(&host, cursor, PAGE, &mut stop, &w.name).await {
        for c in page {
            match deliver(&client, &host, w, site, &c, &mut stop).await {
                Outcome::Delivered => host.metrics.sink_delivered(&w.name),
                Outcome::Failed(why) => {
                    tracing::error!(sink = %w.name, record = %c.id, error = %why,
                        "change record dead-lettered by its sink");
                    let line = serde_json::json!({
                        "sink": w.name,
                        "error": why,
                        "failed_at": refold_types::clock::now_rfc3339(),
                        "record": with_cursor(&c),
                    });
                    append_line(&dead_path, &line.to_string())
                        .with_context(|| format!("writing {}", dead_path.display()))?;
                    host.metrics.sink_dead_lettered(&w.name);
                }
                Outcome::Stopped => return Ok(()),
            }
            host.health.clear(site);
            cursor = c.cursor;
            write_cursor(&cursor_path, cursor)
                .with_context(|| format!("writing {}", cursor_path.display()))?;
            host.sinks.set(&w.name, cursor);
        }
        if let Ok(head) = host.storage.changes_head().await {
            host.metrics.sink_lag(&w.name, head.saturating_sub(cursor));
        }
    }
    Ok(())
}

fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(line.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_data()
}

/// POST one record as a structured CloudEvent with its id as
/// `Idempotency-Key`: `Ok` on a 2xx, else why not.
async fn post_record(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    id: &str,
    body: String,
) -> Result<(), String> {
    let mut r = client
        .post(url)
        .header("content-type", "application/cloudevents+json")
        .header("idempotency-key", id)
        .body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    match r.send().await {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => Err(format!("{url} answered {}", resp.status())),
        Err(e) => Err(format!("{url}: {e}")),
    }
}

/// POST one record until it is acknowledged (2xx), `max_attempts` fail, or
/// the host stops.
async fn deliver(
    client: &reqwest::Client,
    host: &Host,
    w: &WebhookConfig,
    site: &'static str,
    c: &StoredChange,
    stop: &mut watch::Receiver<bool>,
) -> Outcome {
    let body = c.event.to_string();
    let started = Instant::now();
    let mut backoff = Duration::from_millis(w.backoff_ms.max(1));
    let attempts = w.max_attempts.max(1);
    let mut last = String::new();
    for attempt in 1..=attempts {
        match post_record(client, &w.url, w.token.as_deref(), &c.id, body.clone()).await {
            Ok(()) => return Outcome::Delivered,
            Err(e) => last = e,
        }
        host.metrics.sink_failed(&w.name);
        tracing::warn!(sink = %w.name, record = %c.id, attempt, error = %last, "delivery failed");
        if started.elapsed() >= Duration::from_secs(w.stuck_after_seconds) {
            host.health.fault(
                site,
                format!("webhook sink {} stuck on record {}: {last}", w.name, c.id),
            );
        }
        if attempt == attempts {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            r = stop.changed() => if r.is_err() || *stop.borrow() { return Outcome::Stopped },
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    Outcome::Failed(last)
}

/// Re-send the records of a sink's dead-letter file to `url` (the
/// sink's, or another), each once, with its `Idempotency-Key`; the file
/// keeps only those refused again, with their new error. Returns (sent,
/// still failing).
pub async fn resend_dead_letters(
    file: &Path,
    url: &str,
    token: Option<&str>,
) -> anyhow::Result<(usize, usize)> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let (mut sent, mut kept) = (0usize, Vec::new());
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let mut dead: serde_json::Value = serde_json::from_str(line).with_context(|| {
            format!("{} line {}: not a sink dead letter", file.display(), n + 1)
        })?;
        let mut record = dead["record"].clone();
        let id = record["id"]
            .as_str()
            .with_context(|| format!("{} line {}: a record without an id", file.display(), n + 1))?
            .to_string();
        if let Some(o) = record.as_object_mut() {
            o.remove(refold_engine::changes::CURSOR_ATTRIBUTE);
        }
        match post_record(&client, url, token, &id, record.to_string()).await {
            Ok(()) => sent += 1,
            Err(e) => {
                dead["error"] = e.into();
                dead["failed_at"] = refold_types::clock::now_rfc3339().into();
                kept.push(dead.to_string());
            }
        }
    }
    let tmp = file.with_extension("tmp");
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, file)?;
    Ok((sent, kept.len()))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;

    use super::*;
    use refold_engine::pipeline::Pipeline;
    use refold_source::SourceRecord;
    use refold_store_sqlite::SqliteStore;

    type Seen = Arc<Mutex<Vec<(String, String, serde_json::Value)>>>;

    /// An endpoint that refuses the first `fail` requests, then accepts.
    async fn endpoint(fail: usize) -> (String, Seen) {
        let seen: Seen = Default::default();
        let calls = Arc::new(Mutex::new(0usize));
        let app = axum::Router::new()
            .route(
                "/hook",
                post(
                    move |State((seen, calls)): State<(Seen, Arc<Mutex<usize>>)>,
                          headers: HeaderMap,
                          body: String| async move {
                        let n = {
                            let mut c = calls.lock().unwrap();
                            *c += 1;
                            *c
                        };
                        if n <= fail {
                            return StatusCode::SERVICE_UNAVAILABLE;
                        }
                        let h = |k: &str| {
                            headers
                                .get(k)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string()
                        };
                        seen.lock().unwrap().push((
                            h("idempotency-key"),
                            h("content-type"),
                            serde_json::from_str(&body).unwrap(),
                        ));
                        StatusCode::OK
                    },
                ),
            )
            .with_state((seen.clone(), calls));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        (format!("http://{addr}/hook"), seen)
    }

    fn deposit(offset: i64, account: &str, id: &str) -> SourceRecord {
        let ce = format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/t","type":"account.deposited","subject":"{account}","entitytype":"account","data":{{"amount":1}}}}"#
        );
        SourceRecord::at("t", 0, offset, ce.into_bytes())
    }

    fn bank_host() -> Host {
        let mut config = refold_engine::HostConfig::default();
        config.plugins.files =
            vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bank/bank.wasm")];
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        Host::with_storage(config, store.clone(), store).unwrap()
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(20), "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Refused twice, the first record is retried and then delivered; all
    /// go in feed order with their ids as idempotency keys; a restarted
    /// sink continues after the last acknowledged record.
    #[tokio::test]
    async fn records_are_retried_delivered_in_order_and_resumed_after_a_restart() {
        let host = bank_host();
        let (url, seen) = endpoint(2).await;
        let dir = tempfile::tempdir().unwrap();
        let w = WebhookConfig {
            url,
            backoff_ms: 10,
            cursor_file: Some(dir.path().join("hook.cursor")),
            ..Default::default()
        };
        let mut p = Pipeline::for_host(&host);
        p.process(&[deposit(0, "a", "1"), deposit(1, "b", "1")])
            .await
            .unwrap();
        p.process(&[deposit(2, "a", "2")]).await.unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(run_webhook(host.clone(), w.clone(), stop));
        until("three deliveries", || seen.lock().unwrap().len() == 3).await;
        stop_tx.send(true).unwrap();
        task.await.unwrap().unwrap();
        let feed = host.storage.changes_after(0, 10).await.unwrap();
        {
            let got = seen.lock().unwrap();
            let keys: Vec<&str> = got.iter().map(|(k, _, _)| k.as_str()).collect();
            let ids: Vec<&str> = feed.iter().map(|c| c.id.as_str()).collect();
            assert_eq!(keys, ids);
            assert!(
                got.iter()
                    .all(|(_, ct, _)| ct == "application/cloudevents+json")
            );
            assert_eq!(got[2].2["subject"], "a");
            assert_eq!(got[2].2["lastposition"], 2);
        }
        assert_eq!(
            read_cursor(&dir.path().join("hook.cursor")).unwrap(),
            feed[2].cursor
        );

        // Restarted: only what is new goes out.
        p.process(&[deposit(3, "b", "2")]).await.unwrap();
        let (_stop_tx, stop) = watch::channel(false);
        tokio::spawn(run_webhook(host.clone(), w, stop));
        until("the fourth delivery", || seen.lock().unwrap().len() == 4).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = seen.lock().unwrap();
        assert_eq!(got.len(), 4, "nothing delivered twice");
        assert_eq!(got[3].2["subject"], "b");
    }

    /// An endpoint that never accepts: after `max_attempts` the record is a
    /// sink dead letter, kept with its error, and the sink moves on.
    #[tokio::test]
    async fn a_record_refused_every_time_is_dead_lettered_and_the_sink_moves_on() {
        let host = bank_host();
        let (url, _seen) = endpoint(usize::MAX).await;
        let dir = tempfile::tempdir().unwrap();
        let cursor = dir.path().join("hook.cursor");
        let w = WebhookConfig {
            url,
            max_attempts: 3,
            backoff_ms: 10,
            stuck_after_seconds: 0,
            cursor_file: Some(cursor.clone()),
            ..Default::default()
        };
        Pipeline::for_host(&host)
            .process(&[deposit(0, "a", "1"), deposit(1, "b", "1")])
            .await
            .unwrap();
        let (_stop_tx, stop) = watch::channel(false);
        tokio::spawn(run_webhook(host.clone(), w, stop));
        let dead = dead_letter_file(&cursor);
        until("two dead letters", || {
            std::fs::read_to_string(&dead)
                .map(|t| t.lines().count() == 2)
                .unwrap_or(false)
        })
        .await;
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&dead)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(
            lines[0]["error"].as_str().unwrap().contains("503"),
            "{}",
            lines[0]
        );
        assert_eq!(lines[0]["record"]["subject"], "a");
        assert_eq!(lines[1]["record"]["subject"], "b");
        let feed = host.storage.changes_after(0, 10).await.unwrap();
        until("the cursor past both", || {
            read_cursor(&cursor).unwrap() == feed[1].cursor
        })
        .await;

        // Re-sent once the receiver works: both go, with their ids, and the
        // file is left empty; to one that still refuses, they stay.
        let (refusing, _) = endpoint(usize::MAX).await;
        assert_eq!(
            resend_dead_letters(&dead, &refusing, None).await.unwrap(),
            (0, 2)
        );
        assert_eq!(std::fs::read_to_string(&dead).unwrap().lines().count(), 2);
        let (good, seen) = endpoint(0).await;
        assert_eq!(
            resend_dead_letters(&dead, &good, None).await.unwrap(),
            (2, 0)
        );
        let got = seen.lock().unwrap();
        assert_eq!(got[0].0, feed[0].id);
        assert!(
            got[0]
                .2
                .get(refold_engine::changes::CURSOR_ATTRIBUTE)
                .is_none()
        );
        assert_eq!(std::fs::read_to_string(&dead).unwrap(), "");
    }

    #[test]
    fn a_cursor_file_that_is_not_a_number_is_an_error_not_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        std::fs::write(&p, "garbage").unwrap();
        assert!(read_cursor(&p).is_err());
        assert_eq!(read_cursor(&dir.path().join("none")).unwrap(), 0);
    }
}

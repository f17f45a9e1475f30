//! `refold test --plugin FILE.wasm FIXTURE_DIR`: run a fixture through the
//! real ingest pipeline (dedup, dead letters, quarantine) and compare what it
//! produced with the fixture's expectations:
//!
//! - `expected.jsonl` (required): `{"entity_type","entity_id","state"}` per entity;
//! - `expected-projections.jsonl`: `{"projection","key","body"}`, `body: null`
//!   meaning the document must not exist;
//! - `expected-quarantine.jsonl`: `{"entity_id","reason"}`: exactly these
//!   entities are quarantined, each with an error containing `reason`;
//! - `expected-dead-letters.jsonl`: `{"line","code"}`: exactly these lines of
//!   `events.jsonl` are dead-lettered, with these codes.
//!
//! The component is compiled once per run. Determinism is checked without
//! the pipeline: every entity's stored events are folded again in one fresh
//! instance per entity and in long-lived instances shared by the entities in
//! turn (batches of 1 and of 7 events, never an instance per event; started
//! again after `--batch-size` calls, the most one pipeline batch makes on an
//! instance), and every way must agree with the pipeline's state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use refold_engine::app::App;
use refold_engine::pipeline::BatchReport;
use refold_engine::pipeline::entities_of;
use refold_runtime::{Limits, Plugin, Sandbox, fold};
use refold_source::jsonl::JsonlSource;
use refold_store::{DeadLetter, QuarantineRecord, StateStore as _};
use refold_store_sqlite::SqliteStore;
use refold_types::event::EntityKey;

use crate::cli::out::outln;

/// What `refold test` is asked to do.
#[derive(Debug, Clone)]
pub struct TestOptions {
    /// The component.
    pub plugin: PathBuf,
    /// The fixture directory.
    pub dir: PathBuf,
    /// One JSON summary instead of text.
    pub json: bool,
    /// A host config file whose `[plugins]` limits (and environment) apply.
    pub config: Option<PathBuf>,
    /// `KEY=VALUE` overrides of the plugin's limits.
    pub limits: Vec<String>,
    /// Events per pipeline batch.
    pub batch_size: usize,
    /// Skip the determinism folds.
    pub determinism: bool,
}

/// States by entity after a run, plus what the run reported.
pub struct FixtureRun {
    /// Final state of every entity of the plugin's type.
    pub states: BTreeMap<EntityKey, Value>,
    /// Totals of the run.
    pub report: BatchReport,
    /// Dead letters recorded.
    pub dead_letters: Vec<DeadLetter>,
    /// Quarantined entities.
    pub quarantined: Vec<QuarantineRecord>,
    /// Entities not quarantined whose state ended behind their head
    /// (position, head): events stored and never folded, which a run that
    /// reached the end of its input must not leave.
    pub behind: Vec<(EntityKey, u64, u64)>,
    /// The store the run wrote (for projections and histories).
    pub store: Arc<SqliteStore>,
}

/// Run `events` through a fresh embedded pipeline with batches of
/// `batch_size`, with the already compiled `plugin`.
pub async fn run_fixture(
    mut config: refold_engine::config::HostConfig,
    plugin: Arc<Plugin>,
    events: &Path,
    batch_size: usize,
) -> anyhow::Result<FixtureRun> {
    config.plugins.files = Vec::new();
    config.source.batch_size = batch_size;
    let store = Arc::new(SqliteStore::in_memory()?);
    let app = App::with_storage(config, store.clone(), store.clone())?;
    app.host.registry.activate(plugin);
    let source = JsonlSource::new(&[events.to_path_buf()], &[], false, Duration::ZERO);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let report = app.consume(Box::new(source), rx, |_| {}).await?;
    let mut states = BTreeMap::new();
    let mut behind = Vec::new();
    for (entity_type, _) in app.host.registry.snapshot().iter() {
        let found = entities_of(&*app.host.storage, entity_type, usize::MAX).await?;
        for (k, rec) in found.records {
            if rec.position < rec.head && !rec.quarantined {
                behind.push((k.clone(), rec.position, rec.head));
            }
            if let Some(s) = rec.state {
                states.insert(k, s);
            }
        }
    }
    let dead_letters = app.host.storage.dead_letters(usize::MAX >> 1).await?;
    let quarantined = app.host.storage.quarantined().await?;
    Ok(FixtureRun {
        states,
        report,
        dead_letters,
        quarantined,
        behind,
        store,
    })
}

/// A JSON path step: `.key` for identifier-like keys, `["…"]` otherwise.
fn step(key: &str) -> String {
    let plain = !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        format!(".{key}")
    } else {
        format!("[{}]", Value::String(key.to_owned()))
    }
}

/// Differences between two JSON values, as `path: expected X, got Y` lines.
pub fn diff(path: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let p = format!("{path}{}", step(k));
                match a.get(k) {
                    Some(av) => diff(&p, ev, av, out),
                    None => out.push(format!("{p}: expected {ev}, missing")),
                }
            }
            for (k, av) in a {
                if !e.contains_key(k) {
                    out.push(format!("{path}{}: unexpected {av}", step(k)));
                }
            }
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                diff(&format!("{path}[{i}]"), ev, av, out);
            }
        }
        _ if expected == actual => {}
        _ => out.push(format!("{path}: expected {expected}, got {actual}")),
    }
}

/// The JSON objects of a JSONL file, with their line numbers; `None` when
/// the file does not exist and is optional.
fn read_jsonl(path: &Path, required: bool) -> anyhow::Result<Option<Vec<(usize, Value)>>> {
    if !required && !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
        anyhow::ensure!(
            v.is_object(),
            "{}:{}: not a JSON object",
            path.display(),
            n + 1
        );
        out.push((n + 1, v));
    }
    Ok(Some(out))
}

fn field<'a>(path: &Path, n: usize, v: &'a Value, k: &str) -> anyhow::Result<&'a Value> {
    v.get(k)
        .with_context(|| format!("{}:{n}: missing `{k}`", path.display()))
}

fn str_field(path: &Path, n: usize, v: &Value, k: &str) -> anyhow::Result<String> {
    field(path, n, v, k)?
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{}:{n}: `{k}` must be a string", path.display()))
}

fn read_expected(path: &Path) -> anyhow::Result<BTreeMap<EntityKey, Value>> {
    let mut out = BTreeMap::new();
    for (n, v) in read_jsonl(path, true)?.unwrap_or_default() {
        let key = EntityKey::new(
            str_field(path, n, &v, "entity_type")?,
            str_field(path, n, &v, "entity_id")?,
        );
        out.insert(key, field(path, n, &v, "state")?.clone());
    }
    Ok(out)
}

/// Apply `--config` and `--limit KEY=VALUE` to the default host config.
fn host_config(opts: &TestOptions) -> anyhow::Result<refold_engine::config::HostConfig> {
    let mut config = if opts.config.is_some() {
        crate::config::Config::load(opts.config.as_deref())?.host()
    } else {
        refold_engine::config::HostConfig::default()
    };
    if !opts.limits.is_empty() {
        let mut limits = serde_json::to_value(config.plugins.limits)?;
        let known: Vec<String> = limits
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        for kv in &opts.limits {
            let (k, val) = kv
                .split_once('=')
                .with_context(|| format!("--limit {kv}: expected KEY=VALUE"))?;
            anyhow::ensure!(
                known.iter().any(|n| n == k),
                "--limit {kv}: no limit `{k}` (known: {})",
                known.join(", ")
            );
            let parsed: Value = val
                .parse::<u64>()
                .map(Value::from)
                .with_context(|| format!("--limit {kv}: `{val}` is not a whole number"))?;
            limits[k] = parsed;
        }
        config.plugins.limits = serde_json::from_value::<Limits>(limits)?;
        config.plugins.entity_limits.clear();
    }
    Ok(config)
}

/// The line of `text` that byte `offset` falls on (1-based).
fn line_of(text: &[u8], offset: i64) -> usize {
    let end = usize::try_from(offset).unwrap_or(0).min(text.len());
    text[..end].iter().filter(|b| **b == b'\n').count() + 1
}

/// The state a fold ended with, and where and why it failed, if it did.
type Folded = (Value, Option<(u64, String)>);

fn fold_history(
    sandbox: &mut Sandbox,
    entity_id: &str,
    events: &[refold_types::StoredEvent],
    chunk: usize,
) -> Result<Folded, String> {
    let mut state = fold::init_state(sandbox, entity_id).map_err(|e| e.to_string())?;
    for (c, part) in events.chunks(chunk.max(1)).enumerate() {
        let o = fold::fold_and_project(sandbox, entity_id, state, part, false);
        state = o.state;
        if let Some((i, e)) = o.failure {
            let at = events.get(c * chunk.max(1) + i).map_or(0, |e| e.position);
            return Ok((state, Some((at, e.to_string()))));
        }
    }
    Ok((state, None))
}

/// An entity whose folds disagree, and how each way that disagrees went.
#[derive(Debug, Clone, serde::Serialize)]
struct Nondeterministic {
    entity: String,
    reasons: Vec<String>,
}

/// Why one way of folding disagrees with the pipeline, if it does.
fn disagreement(
    way: &str,
    result: &Result<Folded, String>,
    expect_fail: Option<u64>,
    want: Option<&Value>,
) -> Option<String> {
    match result {
        Err(e) => Some(format!("{way}: init failed: {e}")),
        Ok((state, failed)) => match (failed, expect_fail) {
            (Some((at, e)), Some(want_at)) if *at != want_at => Some(format!(
                "{way}: failed at position {at}, not {want_at}: {e}"
            )),
            (Some((at, e)), None) => {
                let hint = if e.contains("out of memory") {
                    " (its memory ran out: the plugin keeps memory across calls, or needs a \
                     larger memory_bytes, --limit memory_bytes=N)"
                } else {
                    ""
                };
                Some(format!("{way}: failed at position {at}: {e}{hint}"))
            }
            (None, Some(want_at)) => Some(format!(
                "{way}: did not fail at position {want_at} as the pipeline's fold did"
            )),
            _ => want.filter(|w| *w != state).map(|_| {
                let mut got = state.to_string();
                if got.len() > 300 {
                    got.truncate(got.floor_char_boundary(300));
                    got.push('…');
                }
                format!("{way}: ended with another state: {got}")
            }),
        },
    }
}

/// An instance shared by the entities folded in turn, `chunk` events per
/// call, started again before it passes `max_calls`.
struct Shared {
    sandbox: Sandbox,
    chunk: usize,
    max_calls: usize,
    calls: usize,
}

impl Shared {
    fn new(plugin: &Arc<Plugin>, max_calls: usize, chunk: usize) -> Shared {
        Shared {
            sandbox: Sandbox::new(plugin.clone()),
            chunk,
            max_calls: max_calls.max(1),
            calls: 0,
        }
    }

    fn fold(
        &mut self,
        entity_id: &str,
        events: &[refold_types::StoredEvent],
    ) -> Result<Folded, String> {
        let calls = 1 + events.len().div_ceil(self.chunk);
        if self.calls > 0 && self.calls + calls > self.max_calls {
            self.sandbox.recycle();
            self.calls = 0;
        }
        self.calls += calls;
        fold_history(&mut self.sandbox, entity_id, events, self.chunk)
    }
}

/// Fold every entity's stored events again, in fresh and in shared
/// instances; the entities where any way disagrees with the pipeline, with
/// how.
async fn determinism(
    run: &FixtureRun,
    plugin: &Arc<Plugin>,
    entity_type: &str,
    calls_per_instance: usize,
) -> anyhow::Result<Vec<Nondeterministic>> {
    use refold_store::EventStore as _;
    let mut histories = Vec::new();
    let mut ids = run.store.entity_ids(entity_type).await?;
    ids.sort();
    for id in ids {
        let key = EntityKey::new(entity_type, id);
        let events = run.store.history(&key, 0, None).await?;
        histories.push((key, events));
    }
    let quarantined: BTreeMap<String, u64> = run
        .quarantined
        .iter()
        .map(|q| (q.key.entity_id.clone(), q.event_position))
        .collect();
    let plugin = plugin.clone();
    let wanted: Vec<(EntityKey, Option<Value>)> = histories
        .iter()
        .map(|(k, _)| (k.clone(), run.states.get(k).cloned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut bad = Vec::new();
        // The shared instances go from entity to entity, as the pipeline's
        // do within a batch, and are started again after as many calls as
        // one pipeline batch may make (one per event at most): state kept
        // across calls shows, and an instance lives no longer than the
        // pipeline ever keeps one (a runtime whose heap grows with every
        // call, as a JavaScript engine's does, is then judged by what it
        // will meet).
        let mut long_1 = Shared::new(&plugin, calls_per_instance, 1);
        let mut long_7 = Shared::new(&plugin, calls_per_instance, 7);
        for ((key, events), (_, want)) in histories.iter().zip(&wanted) {
            let id = key.entity_id.as_str();
            let fresh = fold_history(&mut Sandbox::new(plugin.clone()), id, events, usize::MAX);
            let one = long_1.fold(id, events);
            let seven = long_7.fold(id, events);
            let expect_fail = quarantined.get(id).copied();
            let reasons: Vec<String> = [
                ("a fresh instance, all events in one call", &fresh),
                (
                    "one instance shared by the entities in turn, 1 event per call",
                    &one,
                ),
                (
                    "one instance shared by the entities in turn, 7 events per call",
                    &seven,
                ),
            ]
            .into_iter()
            .filter_map(|(way, r)| disagreement(way, r, expect_fail, want.as_ref()))
            .collect();
            if !reasons.is_empty() {
                bad.push(Nondeterministic {
                    entity: key.to_string(),
                    reasons,
                });
            }
        }
        bad
    })
    .await
    .context("the determinism folds panicked")
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// The command. `Ok(false)` on any mismatch or non-determinism.
pub async fn test(opts: &TestOptions) -> anyhow::Result<bool> {
    let dir = &opts.dir;
    let events: PathBuf = dir.join("events.jsonl");
    anyhow::ensure!(events.exists(), "{} does not exist", events.display());
    let expected = read_expected(&dir.join("expected.jsonl"))?;
    let projections_path = dir.join("expected-projections.jsonl");
    let quarantine_path = dir.join("expected-quarantine.jsonl");
    let dead_path = dir.join("expected-dead-letters.jsonl");
    let want_projections = read_jsonl(&projections_path, false)?;
    let want_quarantine = read_jsonl(&quarantine_path, false)?;
    let want_dead = read_jsonl(&dead_path, false)?;
    anyhow::ensure!(opts.batch_size > 0, "--batch-size must be at least 1");
    let config = host_config(opts)?;

    let started = Instant::now();
    let plugin = {
        let engine = config.plugins.engine()?;
        let bytes = std::fs::read(&opts.plugin)
            .with_context(|| format!("reading {}", opts.plugin.display()))?;
        config
            .plugins
            .load_plugin(&engine, &bytes)
            .with_context(|| format!("loading {}", opts.plugin.display()))?
    };
    let t_load = started.elapsed();
    let entity_type = plugin.info.entity_type.clone();

    let t0 = Instant::now();
    let run = run_fixture(config, plugin.clone(), &events, opts.batch_size).await?;
    let t_run = t0.elapsed();

    let mut failures: Vec<Value> = Vec::new();
    let mut lines = Vec::new();
    for (key, want) in &expected {
        match run.states.get(key) {
            Some(got) if got == want => lines.push(format!("  ok    {key}")),
            Some(got) => {
                let mut d = Vec::new();
                diff("$", want, got, &mut d);
                lines.push(format!("  FAIL  {key}"));
                lines.extend(d.iter().map(|l| format!("          {l}")));
                failures.push(json!({"entity": key.to_string(), "diff": d}));
            }
            None => {
                let hint = if key.entity_type != entity_type {
                    format!(
                        " (the plugin owns entity type `{entity_type}`, not `{}`)",
                        key.entity_type
                    )
                } else {
                    " (never folded)".to_owned()
                };
                lines.push(format!("  FAIL  {key}: no state{hint}"));
                failures
                    .push(json!({"entity": key.to_string(), "diff": [format!("no state{hint}")]}));
            }
        }
    }
    for key in run.states.keys().filter(|k| !expected.contains_key(*k)) {
        lines.push(format!("  FAIL  {key}: not in expected.jsonl"));
        failures.push(json!({"entity": key.to_string(), "diff": ["unexpected entity"]}));
    }

    if let Some(want) = &want_projections {
        for (n, v) in want {
            let name = str_field(&projections_path, *n, v, "projection")?;
            let key = str_field(&projections_path, *n, v, "key")?;
            let body = field(&projections_path, *n, v, "body")?;
            let got = run.store.projection(&name, &key).await?;
            let label = format!("projection {name}/{key}");
            match (body, &got) {
                (Value::Null, None) => lines.push(format!("  ok    {label} (absent)")),
                (Value::Null, Some(g)) => {
                    lines.push(format!("  FAIL  {label}: expected absent, got {g}"));
                    failures.push(json!({"projection": label, "diff": ["expected absent"]}));
                }
                (_, None) => {
                    lines.push(format!("  FAIL  {label}: missing"));
                    failures.push(json!({"projection": label, "diff": ["missing"]}));
                }
                (w, Some(g)) if w == g => lines.push(format!("  ok    {label}")),
                (w, Some(g)) => {
                    let mut d = Vec::new();
                    diff("$", w, g, &mut d);
                    lines.push(format!("  FAIL  {label}"));
                    lines.extend(d.iter().map(|l| format!("          {l}")));
                    failures.push(json!({"projection": label, "diff": d}));
                }
            }
        }
    }

    if let Some(want) = &want_quarantine {
        let mut wanted = BTreeMap::new();
        for (n, v) in want {
            wanted.insert(
                str_field(&quarantine_path, *n, v, "entity_id")?,
                str_field(&quarantine_path, *n, v, "reason")?,
            );
        }
        for q in &run.quarantined {
            let id = &q.key.entity_id;
            match wanted.remove(id) {
                Some(reason) if q.error.contains(&reason) => {
                    lines.push(format!("  ok    quarantine {id}"));
                }
                Some(reason) => {
                    lines.push(format!(
                        "  FAIL  quarantine {id}: reason does not contain {reason:?}"
                    ));
                    failures.push(json!({"quarantine": id, "diff": [format!("reason does not contain {reason:?}")]}));
                }
                None => {
                    lines.push(format!("  FAIL  quarantine {id}: not expected"));
                    failures.push(json!({"quarantine": id, "diff": ["not expected"]}));
                }
            }
        }
        for id in wanted.keys() {
            lines.push(format!(
                "  FAIL  quarantine {id}: expected, not quarantined"
            ));
            failures.push(json!({"quarantine": id, "diff": ["not quarantined"]}));
        }
    }

    let text = std::fs::read(&events).with_context(|| format!("reading {}", events.display()))?;
    let dead_lines: Vec<(usize, &DeadLetter)> = run
        .dead_letters
        .iter()
        .map(|d| (d.origin.as_ref().map_or(0, |o| line_of(&text, o.offset)), d))
        .collect();
    if let Some(want) = &want_dead {
        let mut wanted = BTreeMap::new();
        for (n, v) in want {
            let line = field(&dead_path, *n, v, "line")?
                .as_u64()
                .with_context(|| format!("{}:{n}: `line` must be a number", dead_path.display()))?;
            wanted.insert(line as usize, str_field(&dead_path, *n, v, "code")?);
        }
        for (line, d) in &dead_lines {
            match wanted.remove(line) {
                Some(code) if code == d.code => {
                    lines.push(format!("  ok    dead letter line {line}"))
                }
                Some(code) => {
                    lines.push(format!(
                        "  FAIL  dead letter line {line}: expected code {code}, got {}",
                        d.code
                    ));
                    failures.push(json!({"dead_letter": line, "diff": [format!("expected code {code}, got {}", d.code)]}));
                }
                None => {
                    lines.push(format!("  FAIL  dead letter line {line}: not expected"));
                    failures.push(json!({"dead_letter": line, "diff": ["not expected"]}));
                }
            }
        }
        for line in wanted.keys() {
            lines.push(format!(
                "  FAIL  dead letter line {line}: expected, not dead-lettered"
            ));
            failures.push(json!({"dead_letter": line, "diff": ["not dead-lettered"]}));
        }
    }

    for (key, position, head) in &run.behind {
        lines.push(format!(
            "  FAIL  {key}: folded to position {position} of {head}: the run ended with events stored and not folded"
        ));
        failures.push(json!({"entity": key.to_string(), "diff": [format!("folded to position {position} of {head}")]}));
    }

    let t1 = Instant::now();
    let nondeterministic = if opts.determinism {
        Some(determinism(&run, &plugin, &entity_type, opts.batch_size).await?)
    } else {
        None
    };
    let t_det = t1.elapsed();
    let deterministic = nondeterministic.as_ref().is_none_or(Vec::is_empty);
    let passed = failures.is_empty() && deterministic;

    let quarantine_json: Vec<Value> = run
        .quarantined
        .iter()
        .map(|q| {
            json!({"entity_id": q.key.entity_id, "event_id": q.event_id,
                   "position": q.event_position, "kind": q.kind, "reason": q.error})
        })
        .collect();
    let dead_json: Vec<Value> = dead_lines
        .iter()
        .map(|(line, d)| json!({"line": line, "code": d.code, "reason": d.reason, "event_id": d.event_id}))
        .collect();
    if opts.json {
        let summary = json!({
            "plugin": plugin.info,
            "digest": format!("sha256:{}", plugin.digest),
            "fixture": dir.display().to_string(),
            "passed": passed,
            "entities_checked": expected.len(),
            "mismatches": failures.len(),
            "mismatched": failures,
            "dead_letters": run.dead_letters.len(),
            "dead_lettered": dead_json,
            "quarantined": run.quarantined.iter().map(|q| q.key.entity_id.clone()).collect::<Vec<_>>(),
            "quarantine": quarantine_json,
            "duplicates": run.report.duplicates,
            "records": run.report.records,
            "applied": run.report.applied,
            "deterministic": deterministic,
            "determinism_checked": nondeterministic.is_some(),
            "nondeterministic_entities": nondeterministic.iter().flatten().map(|n| n.entity.clone()).collect::<Vec<_>>(),
            "nondeterministic": nondeterministic.clone().unwrap_or_default(),
            "timing_ms": {"load": ms(t_load), "run": ms(t_run), "determinism": ms(t_det)},
        });
        outln!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(passed);
    }
    outln!(
        "refold test: {} (sha256:{}) on {}",
        plugin.tag(),
        &plugin.digest[..12],
        dir.display()
    );
    outln!(
        "  {} records: {} applied, {} duplicates, {} dead letters, {} quarantined",
        run.report.records,
        run.report.applied,
        run.report.duplicates,
        run.dead_letters.len(),
        run.quarantined.len(),
    );
    for q in &run.quarantined {
        outln!(
            "  quarantined {} at position {} (event {}, {}): {}",
            q.key,
            q.event_position,
            q.event_id,
            q.kind,
            q.error
        );
    }
    for (line, d) in &dead_lines {
        outln!("  dead letter line {line} ({}): {}", d.code, d.reason);
    }
    for l in &lines {
        outln!("{l}");
    }
    match &nondeterministic {
        None => outln!("  determinism: not checked (--no-determinism)"),
        Some(bad) if bad.is_empty() => outln!(
            "  determinism: ok (fresh instances, shared instances, batches of 1, 7 and all events agree)"
        ),
        Some(bad) => {
            outln!("  determinism: FAILED for {} entities", bad.len());
            for n in bad {
                outln!("  FAIL  {} folds differently:", n.entity);
                for r in &n.reasons {
                    outln!("          {r}");
                }
            }
        }
    }
    outln!(
        "  timing: load {} ms, run {} ms, determinism {} ms",
        ms(t_load),
        ms(t_run),
        ms(t_det)
    );
    outln!(
        "result: {} entities checked, {} mismatches{}",
        expected.len(),
        failures.len(),
        if deterministic {
            ""
        } else {
            ", non-deterministic"
        }
    );
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_paths() {
        let mut d = Vec::new();
        diff(
            "$",
            &json!({"a": 1, "b": {"c": 2}, "x": 0, "a b": 1}),
            &json!({"a": 1, "b": {"c": 3}, "y": 1, "a b": 2}),
            &mut d,
        );
        assert_eq!(
            d,
            vec![
                "$[\"a b\"]: expected 1, got 2",
                "$.b.c: expected 2, got 3",
                "$.x: expected 0, missing",
                "$.y: unexpected 1"
            ]
        );
    }

    #[test]
    fn line_of_counts_newlines_before_the_offset() {
        let text = b"a\nbb\nccc\n";
        assert_eq!(line_of(text, 0), 1);
        assert_eq!(line_of(text, 2), 2);
        assert_eq!(line_of(text, 5), 3);
        assert_eq!(line_of(text, 999), 4);
    }
}

//! `refold test --plugin FILE.wasm FIXTURE_DIR [--json]`: run a fixture
//! through the real ingest pipeline (dedup, dead letters, quarantine) and
//! compare every entity's state with `expected.jsonl`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use serde_json::{Value, json};

use refold_engine::app::App;
use refold_engine::config::HostConfig as Config;
use refold_engine::pipeline::BatchReport;
use refold_engine::pipeline::entities_of;
use refold_source::jsonl::JsonlSource;
use refold_store_sqlite::SqliteStore;
use refold_types::event::EntityKey;

/// States by entity after a run, plus what the run reported.
pub struct FixtureRun {
    /// Final state of every entity of the plugin's type.
    pub states: BTreeMap<EntityKey, Value>,
    /// Totals of the run.
    pub report: BatchReport,
    /// Dead letters recorded.
    pub dead_letters: usize,
    /// Entity ids quarantined.
    pub quarantined: Vec<String>,
}

/// Run `events` through a fresh embedded pipeline with batches of `batch_size`.
pub async fn run_fixture(
    plugin: &Path,
    events: &Path,
    batch_size: usize,
) -> anyhow::Result<FixtureRun> {
    let mut config = Config::default();
    config.plugins.files = vec![plugin.to_path_buf()];
    config.source.batch_size = batch_size;
    let store = Arc::new(SqliteStore::in_memory()?);
    let app = App::with_storage(config, store.clone(), store)?;
    let source = JsonlSource::new(
        &[events.to_path_buf()],
        &[],
        false,
        std::time::Duration::ZERO,
    );
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let report = app.consume(Box::new(source), rx, |_| {}).await?;
    let mut states = BTreeMap::new();
    for (entity_type, _) in app.host.registry.snapshot().iter() {
        let found = entities_of(&*app.host.storage, entity_type, usize::MAX).await?;
        for (k, rec) in found.records {
            if let Some(s) = rec.state {
                states.insert(k, s);
            }
        }
    }
    let dead_letters = app.host.storage.dead_letters(usize::MAX >> 1).await?.len();
    let quarantined = app
        .host
        .storage
        .quarantined()
        .await?
        .into_iter()
        .map(|q| q.key.entity_id)
        .collect();
    Ok(FixtureRun {
        states,
        report,
        dead_letters,
        quarantined,
    })
}

/// Differences between two JSON values, as `path: expected X, got Y` lines.
pub fn diff(path: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let p = format!("{path}.{k}");
                match a.get(k) {
                    Some(av) => diff(&p, ev, av, out),
                    None => out.push(format!("{p}: expected {ev}, missing")),
                }
            }
            for (k, av) in a {
                if !e.contains_key(k) {
                    out.push(format!("{path}.{k}: unexpected {av}"));
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

fn read_expected(path: &Path) -> anyhow::Result<BTreeMap<EntityKey, Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = BTreeMap::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
        let get = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .with_context(|| format!("{}:{}: missing string `{k}`", path.display(), n + 1))
        };
        let state = v
            .get("state")
            .cloned()
            .with_context(|| format!("{}:{}: missing `state`", path.display(), n + 1))?;
        out.insert(
            EntityKey::new(get("entity_type")?, get("entity_id")?),
            state,
        );
    }
    Ok(out)
}

/// The command. `Ok(false)` on any mismatch or non-determinism.
pub async fn test(plugin: &Path, dir: &Path, as_json: bool) -> anyhow::Result<bool> {
    let events: PathBuf = dir.join("events.jsonl");
    let expected = read_expected(&dir.join("expected.jsonl"))?;
    anyhow::ensure!(events.exists(), "{} does not exist", events.display());

    let info = {
        let engine = refold_engine::config::PluginsConfig::default().engine()?;
        let bytes =
            std::fs::read(plugin).with_context(|| format!("reading {}", plugin.display()))?;
        refold_runtime::Plugin::load(&engine, &bytes, Default::default())
            .with_context(|| format!("loading {}", plugin.display()))?
    };
    let big = run_fixture(plugin, &events, 10_000).await?;
    let single = run_fixture(plugin, &events, 1).await?;

    let mut mismatches: Vec<Value> = Vec::new();
    let mut lines = Vec::new();
    for (key, want) in &expected {
        match big.states.get(key) {
            Some(got) if got == want => lines.push(format!("  ok    {key}")),
            Some(got) => {
                let mut d = Vec::new();
                diff("$", want, got, &mut d);
                lines.push(format!("  FAIL  {key}"));
                lines.extend(d.iter().map(|l| format!("          {l}")));
                mismatches.push(json!({"entity": key.to_string(), "diff": d}));
            }
            None => {
                lines.push(format!("  FAIL  {key}: no state (never folded)"));
                mismatches.push(json!({"entity": key.to_string(), "diff": ["no state"]}));
            }
        }
    }
    for key in big.states.keys().filter(|k| !expected.contains_key(*k)) {
        lines.push(format!("  FAIL  {key}: not in expected.jsonl"));
        mismatches.push(json!({"entity": key.to_string(), "diff": ["unexpected entity"]}));
    }
    let mut nondeterministic = Vec::new();
    for (key, s) in &big.states {
        if single.states.get(key) != Some(s) {
            nondeterministic.push(key.to_string());
        }
    }
    for key in single
        .states
        .keys()
        .filter(|k| !big.states.contains_key(*k))
    {
        nondeterministic.push(key.to_string());
    }
    let deterministic = nondeterministic.is_empty() && big.quarantined == single.quarantined;
    let passed = mismatches.is_empty() && deterministic;

    if as_json {
        let summary = json!({
            "plugin": info.info,
            "digest": format!("sha256:{}", info.digest),
            "fixture": dir.display().to_string(),
            "passed": passed,
            "entities_checked": expected.len(),
            "mismatches": mismatches.len(),
            "mismatched": mismatches,
            "dead_letters": big.dead_letters,
            "quarantined": big.quarantined,
            "duplicates": big.report.duplicates,
            "records": big.report.records,
            "applied": big.report.applied,
            "deterministic": deterministic,
            "nondeterministic_entities": nondeterministic,
        });
        crate::cli::out::outln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        crate::cli::out::outln!(
            "refold test: {} (sha256:{}) on {}",
            info.tag(),
            &info.digest[..12],
            dir.display()
        );
        crate::cli::out::outln!(
            "  {} records: {} applied, {} duplicates, {} dead letters, {} quarantined {:?}",
            big.report.records,
            big.report.applied,
            big.report.duplicates,
            big.dead_letters,
            big.quarantined.len(),
            big.quarantined
        );
        for l in &lines {
            crate::cli::out::outln!("{l}");
        }
        if deterministic {
            crate::cli::out::outln!(
                "  determinism: ok (one event per batch and one batch of all events agree)"
            );
        } else {
            crate::cli::out::outln!("  determinism: FAILED for {nondeterministic:?}");
        }
        crate::cli::out::outln!(
            "result: {} entities checked, {} mismatches{}",
            expected.len(),
            mismatches.len(),
            if deterministic {
                ""
            } else {
                ", non-deterministic"
            }
        );
    }
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
            &json!({"a": 1, "b": {"c": 2}, "x": 0}),
            &json!({"a": 1, "b": {"c": 3}, "y": 1}),
            &mut d,
        );
        assert_eq!(
            d,
            vec![
                "$.b.c: expected 2, got 3",
                "$.x: expected 0, missing",
                "$.y: unexpected 1"
            ]
        );
    }
}

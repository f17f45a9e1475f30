//! `refold plugin push|list|activate|rollback|status` and
//! `refold quarantine export`: thin clients of the admin API.

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::http::types::{
    ActivateRequest, Activated, Fixture, Installed, Limits, PluginList, PluginType, RebuildStatus,
    Retried, RolledBack,
};
use refold_store::RebuildState;

/// Where the admin API is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct Endpoint {
    /// Base URL of a refold host.
    #[arg(long, env = "REFOLD_API", default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// Admin bearer token.
    #[arg(long, env = "REFOLD_TOKEN")]
    pub token: Option<String>,
}

impl Endpoint {
    fn client(&self) -> anyhow::Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()?)
    }

    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Send `r` and read the answer as `T`; an error status is an error
    /// naming its message.
    pub(crate) async fn send<T: DeserializeOwned>(
        &self,
        r: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let resp = self
            .auth(r)
            .send()
            .await
            .with_context(|| format!("calling {}", self.api))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            // `{"error": code, "message": text}`; older hosts put the text
            // in `error`.
            let msg = body
                .get("message")
                .or_else(|| body.get("error"))
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
                .to_string();
            anyhow::bail!("{status}: {msg}");
        }
        serde_json::from_value(body)
            .with_context(|| format!("reading the answer of {} ({status})", self.api))
    }

    /// The largest component the host accepts (`plugins.max_upload_bytes`,
    /// from `GET /v1/admin/limits`); `None` from a host without that route.
    async fn max_upload_bytes(&self, c: &reqwest::Client) -> anyhow::Result<Option<u64>> {
        let resp = self
            .auth(c.get(self.url("/v1/admin/limits")))
            .send()
            .await
            .with_context(|| format!("calling {}", self.api))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = body["message"].as_str().unwrap_or("(no message)");
            anyhow::bail!("{status}: {msg}");
        }
        let limits: Limits = serde_json::from_value(body)
            .with_context(|| format!("reading the limits of {}", self.api))?;
        Ok(Some(limits.plugins.max_upload_bytes as u64))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api.trim_end_matches('/'))
    }
}

/// `plugin push`: upload, then (for a rebuild) follow its progress.
///
/// The file's size is checked against the host's upload limit first, so
/// that an oversized component is refused here with the limit named rather
/// than sent whole to be refused.
pub async fn push(ep: &Endpoint, file: &Path, entity_type: &str, mode: &str) -> anyhow::Result<()> {
    let size = std::fs::metadata(file)
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    let c = ep.client()?;
    if let Some(limit) = ep.max_upload_bytes(&c).await?
        && size > limit
    {
        anyhow::bail!(
            "{} is {size} bytes; {} accepts components up to {limit} bytes (plugins.max_upload_bytes)",
            file.display(),
            ep.api
        );
    }
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let body: Installed = ep
        .send(
            c.put(ep.url(&format!("/v1/plugins/{entity_type}?mode={mode}")))
                .body(bytes),
        )
        .await?;
    crate::cli::out::outln!(
        "stored {}@{} sha256:{} (sample fold: {} entities, {} events)",
        body.version.name,
        body.version.version,
        body.version.digest,
        body.sample.entities,
        body.sample.events,
    );
    if let Some(id) = &body.rebuild {
        follow_rebuild(ep, id).await?;
    } else if let Some(m) = &body.activation {
        crate::cli::out::outln!("activated ({m})");
    }
    Ok(())
}

/// Print a progress bar until the rebuild ends.
pub async fn follow_rebuild(ep: &Endpoint, id: &str) -> anyhow::Result<()> {
    let c = ep.client()?;
    loop {
        let s: RebuildStatus = ep
            .send(c.get(ep.url(&format!("/v1/rebuilds/{id}"))))
            .await?;
        let done = s.events_done as f64;
        let total = (s.events_total as f64).max(1.0);
        let frac = (done / total).min(1.0);
        let width = 30;
        let filled = (frac * width as f64) as usize;
        let eta = s
            .eta_seconds
            .map(|e| format!("{e:.0}s"))
            .unwrap_or_else(|| "?".into());
        print!(
            "\r{id} [{}{}] {:>3.0}% {}/{} events, {} entities, {:.0} ev/s, ETA {eta}, {}   ",
            "#".repeat(filled),
            " ".repeat(width - filled),
            frac * 100.0,
            done,
            total,
            s.entities_done,
            s.rate,
            s.state,
        );
        let _ = std::io::stdout().flush();
        match s.state {
            RebuildState::Done => {
                crate::cli::out::outln!("\ncut over");
                return Ok(());
            }
            RebuildState::Failed => {
                crate::cli::out::outln!();
                anyhow::bail!("rebuild failed: {}", s.error.as_deref().unwrap_or("?"));
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// `plugin list [TYPE]`
pub async fn list(ep: &Endpoint, entity_type: Option<&str>) -> anyhow::Result<()> {
    let c = ep.client()?;
    let items: Vec<PluginType> = match entity_type {
        Some(t) => vec![ep.send(c.get(ep.url(&format!("/v1/plugins/{t}")))).await?],
        None => {
            let all: PluginList = ep.send(c.get(ep.url("/v1/plugins"))).await?;
            all.plugins
        }
    };
    crate::cli::out::outln!(
        "{:<10} {:<10} {:<10} {:<14} {:<8}",
        "TYPE",
        "NAME",
        "VERSION",
        "DIGEST",
        "ACTIVE"
    );
    for t in items {
        let active = t.active.as_ref().map(|a| a.digest.as_str());
        for ver in &t.versions {
            let d = ver.digest.as_str();
            crate::cli::out::outln!(
                "{:<10} {:<10} {:<10} {:<14} {:<8}",
                ver.entity_type,
                ver.name,
                ver.version,
                d.get(..12).unwrap_or(d),
                if Some(d) == active { "*" } else { "" }
            );
        }
    }
    Ok(())
}

/// `plugin activate TYPE DIGEST [--mode]`
pub async fn activate(
    ep: &Endpoint,
    entity_type: &str,
    digest: &str,
    mode: &str,
) -> anyhow::Result<()> {
    let c = ep.client()?;
    let request = ActivateRequest {
        digest: digest.to_string(),
        mode: Some(mode.to_string()),
    };
    let v: Activated = ep
        .send(
            c.post(ep.url(&format!("/v1/plugins/{entity_type}/activate")))
                .json(&request),
        )
        .await?;
    if let Some(id) = &v.rebuild {
        follow_rebuild(ep, id).await
    } else {
        crate::cli::out::outln!("activated {digest} for {entity_type}");
        Ok(())
    }
}

/// `plugin rollback TYPE`
pub async fn rollback(ep: &Endpoint, entity_type: &str) -> anyhow::Result<()> {
    let c = ep.client()?;
    let v: RolledBack = ep
        .send(c.post(ep.url(&format!("/v1/plugins/{entity_type}/rollback"))))
        .await?;
    crate::cli::out::outln!("rolled back {entity_type} to {}", v.digest);
    Ok(())
}

/// `quarantine export TYPE ID DIR`: a fixture directory `refold test` runs.
pub async fn export(
    ep: &Endpoint,
    entity_type: &str,
    entity_id: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    let c = ep.client()?;
    let v: Fixture = ep
        .send(c.get(ep.url(&format!("/v1/quarantine/{entity_type}/{entity_id}/fixture"))))
        .await?;
    std::fs::create_dir_all(dir)?;
    write_jsonl(&dir.join("events.jsonl"), &v.events)?;
    write_jsonl(&dir.join("expected.jsonl"), &v.expected)?;
    std::fs::write(
        dir.join("state_before.json"),
        serde_json::to_string_pretty(&v.state_before)?,
    )?;
    std::fs::write(
        dir.join("quarantine.json"),
        serde_json::to_string_pretty(&v.quarantine)?,
    )?;
    crate::cli::out::outln!(
        "wrote {} (run: refold test --plugin PLUGIN.wasm {})",
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// One JSON value per line.
fn write_jsonl<T: serde::Serialize>(path: &Path, items: &[T]) -> anyhow::Result<()> {
    let mut text = String::new();
    for e in items {
        text.push_str(&serde_json::to_string(e)?);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `quarantine retry TYPE ID`
pub async fn retry(ep: &Endpoint, entity_type: &str, entity_id: &str) -> anyhow::Result<()> {
    let c = ep.client()?;
    let v: Retried = ep
        .send(c.post(ep.url(&format!("/v1/quarantine/{entity_type}/{entity_id}/retry"))))
        .await?;
    crate::cli::out::outln!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

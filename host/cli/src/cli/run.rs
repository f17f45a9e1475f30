//! `refold run --config FILE`

use std::path::Path;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::config::{Config, SourceKind};
use refold_engine::app::App;
use refold_source::EventSource;
use refold_source::jsonl::JsonlSource;

/// Run until SIGINT/SIGTERM.
pub async fn run(config_file: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config_file)?;
    config
        .changes
        .validate_for(config.store.kind, config.source.kind == SourceKind::Kafka)?;
    // Idle connections, followed files and the database all take
    // descriptors; a low default soft limit must not stop the engine.
    match refold_source::raise_open_files_limit() {
        Ok((from, to)) if from != to => {
            tracing::info!(?from, ?to, "raised the open files limit")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "open files limit unchanged"),
    }
    let app = App::open(config.host()).await?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut http_stop = stop_rx.clone();
    if !config.http.listen.is_empty() {
        let addr = crate::http::serve(
            crate::http::state::Api::new(app.clone(), &config),
            &config.http.listen,
            async move {
                let _ = http_stop.wait_for(|s| *s).await;
            },
        )
        .await?;
        tracing::info!(%addr, "HTTP API listening");
        println!("refold: HTTP API on http://{addr}");
    }
    // Activations made on any host (or before a restart) reach this one.
    {
        let app = app.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(refold_engine::manager::REGISTRY_POLL) => {}
                    r = stop.changed() => if r.is_err() || *stop.borrow() { break },
                }
                if let Err(e) = app.plugins.sync_registry().await {
                    tracing::warn!(error = %format!("{e:#}"), "registry poll failed");
                }
            }
        });
    }
    // The change feed: old records pruned, and the optional file sink.
    tokio::spawn(refold_engine::changes::run_pruning(
        app.host.clone(),
        stop_rx.clone(),
    ));
    if let Some(path) = config.changes.jsonl.clone() {
        let (host, stop) = (app.host.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let health = host.health.clone();
            if let Err(e) = refold_engine::changes::run_jsonl_sink(host, path, stop).await {
                let why = format!("the JSONL change sink stopped: {e:#}");
                tracing::error!("{why}");
                health.fault("sink:jsonl", why);
            }
        });
    }
    for w in config.changes.webhooks.clone() {
        let (host, stop) = (app.host.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let name = w.name.clone();
            if let Err(e) = crate::sinks::run_webhook(host, w, stop).await {
                tracing::error!(sink = %name, error = %format!("{e:#}"), "a webhook sink stopped");
            }
        });
    }
    if let Some(dir) = &config.plugins.dir {
        refold_engine::manager::watch::watch_dir(app.plugins.clone(), dir.clone(), stop_rx.clone())
            .await?;
    }

    let source: Box<dyn EventSource> = match config.source.kind {
        SourceKind::Jsonl => {
            let names = JsonlSource::source_names(&config.source.paths);
            let mut cps = Vec::new();
            for n in &names {
                cps.extend(app.host.storage.checkpoints(n).await?);
            }
            Box::new(
                JsonlSource::new(
                    &config.source.paths,
                    &cps,
                    config.source.follow,
                    std::time::Duration::from_millis(config.source.linger_ms),
                )
                .with_max_record_bytes(config.engine.max_record_bytes),
            )
        }
        SourceKind::Kafka => {
            let source = refold_source::open_kafka(&config.kafka, &config.source)?;
            if let Some(topic) = &config.changes.kafka {
                let settings = crate::change_topic::Settings::of(topic, &config.kafka);
                let (host, stop, assignment) =
                    (app.host.clone(), stop_rx.clone(), source.assignment());
                tokio::spawn(async move {
                    let health = host.health.clone();
                    if let Err(e) = crate::change_topic::run(host, settings, assignment, stop).await
                    {
                        let why = format!("the Kafka change publisher stopped: {e:#}");
                        tracing::error!("{why}");
                        health.fault(crate::change_topic::HEALTH_SITE, why);
                    }
                });
            }
            Box::new(source)
        }
    };

    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let total = app
        .consume(source, stop_rx.clone(), |r| {
            tracing::debug!(records = r.records, applied = r.applied, "batch committed")
        })
        .await
        .context("consuming")?;
    tracing::info!(?total, "source finished");
    // A finished (non-following) source keeps serving queries until stopped.
    let mut rx = stop_rx;
    let _ = rx.wait_for(|s| *s).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

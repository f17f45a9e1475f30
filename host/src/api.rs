//! The HTTP query API (and, merged in from [`crate::admin`], the admin API).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::App;
use crate::event::EntityKey;
use crate::fold;
use crate::store::{EntityRecord, StoredEvent};

/// An API error: a status and a message, rendered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

/// The query routes.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/entities/{entity_type}/{entity_id}", get(entity))
        .route("/v1/projections/{name}/{key}", get(projection))
        .route("/v1/dead-letters", get(dead_letters))
        .route("/v1/quarantine", get(quarantine))
        .merge(crate::admin::router(app.clone()))
        .with_state(app)
}

async fn healthz(State(app): State<App>) -> Response {
    let (ok, body) = app.health.report();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        app.metrics.render(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct AtQuery {
    at: Option<u64>,
}

async fn entity(
    State(app): State<App>,
    Path((entity_type, entity_id)): Path<(String, String)>,
    Query(q): Query<AtQuery>,
) -> ApiResult<Json<Value>> {
    let key = EntityKey::new(entity_type, entity_id);
    match q.at {
        None => {
            let rec = current(&app, &key).await?;
            let Some(rec) = rec.filter(|r| r.state.is_some()) else {
                return Err(ApiError(
                    StatusCode::NOT_FOUND,
                    format!("no state for {key}"),
                ));
            };
            Ok(Json(json!({
                "entity_type": key.entity_type,
                "entity_id": key.entity_id,
                "position": rec.position,
                "head": rec.head,
                "quarantined": rec.quarantined,
                "plugin": rec.plugin,
                "generation": rec.generation,
                "state": rec.state,
            })))
        }
        Some(at) => Ok(Json(state_at(&app, &key, at).await?)),
    }
}

/// The record of `key` as the active generation of its type has it: taken
/// from the generation's own namespace when another generation wrote the live
/// record last, and caught up from the raw events when it is behind (after a
/// cut-over, until a batch touches the entity). Read-only.
///
/// The active version and generation are read from the stored activation,
/// not this host's registry, so that every host answers from the new
/// generation from the moment its activation row is written, including a
/// host whose registry has not caught up yet.
async fn current(app: &App, key: &EntityKey) -> ApiResult<Option<EntityRecord>> {
    let t = &key.entity_type;
    let stored = app
        .plugin_store
        .activations()
        .await?
        .into_iter()
        .find(|a| &a.entity_type == t);
    let (generations, plugin) = match stored {
        Some(a) => {
            let plugin = match app.registry.get(t) {
                Some(p) if p.digest == a.digest => Some(p),
                _ => crate::lifecycle::compiled(app, &a.digest).await.ok(),
            };
            let mut g = crate::registry::Generations::new();
            g.insert(t.clone(), a.generation);
            (std::sync::Arc::new(g), plugin)
        }
        None => (app.registry.generations(), app.registry.get(t)),
    };
    let mut recs = app.storage.load(std::slice::from_ref(key)).await?;
    crate::generation::resolve(&*app.storage, &generations, &mut recs, false)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let Some(mut rec) = recs.remove(key) else {
        return Ok(None);
    };
    if rec.quarantined || rec.position >= rec.head {
        return Ok(Some(rec));
    }
    let Some(plugin) = plugin else {
        return Ok(Some(rec));
    };
    let gap = app
        .storage
        .history(key, rec.position, Some(rec.head))
        .await?;
    // A failing event shows the last good state; the batch that meets it
    // will quarantine the entity.
    let r = replay(&plugin, key, rec.state.clone(), gap).await?;
    if r.applied > 0 {
        rec.state = Some(r.state);
        rec.position += r.applied as u64;
        rec.plugin = Some(crate::registry::plugin_ref(&plugin));
    }
    Ok(Some(rec))
}

/// What a read-only replay did.
struct Replay {
    /// The state after the events applied.
    state: Value,
    /// How many of them were applied.
    applied: usize,
}

/// Fold `events` onto `start` (the plugin's initial state when `None`) in a
/// throwaway sandbox, off the async threads. Nothing is stored.
async fn replay(
    plugin: &std::sync::Arc<crate::runtime::Plugin>,
    key: &EntityKey,
    start: Option<Value>,
    events: Vec<StoredEvent>,
) -> ApiResult<Replay> {
    let id = key.entity_id.clone();
    let p = plugin.clone();
    tokio::task::spawn_blocking(move || {
        let sandbox = &mut crate::runtime::Sandbox::new(p);
        let state = match start {
            Some(s) => s,
            None => match fold::init_state(sandbox, &id) {
                Ok(s) => s,
                Err(_) => {
                    return Replay {
                        state: Value::Null,
                        applied: 0,
                    };
                }
            },
        };
        let o = fold::fold_and_project(sandbox, &id, state, &events, false);
        Replay {
            state: o.state,
            applied: o.applied,
        }
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// The state of `key` after the event at position `at`, folded from the
/// stored raw events with the active plugin of its type.
pub async fn state_at(app: &App, key: &EntityKey, at: u64) -> ApiResult<Value> {
    let plugin = app.registry.get(&key.entity_type).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no plugin for entity type {}", key.entity_type),
        )
    })?;
    // From the replay snapshot before `at`: a bounded stretch of history,
    // not all of it (see `snapshot`).
    let Some(r) = crate::snapshot::state_at(&*app.storage, &plugin, key, at).await? else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no events for {key} up to position {at}"),
        ));
    };
    if let Some(f) = r.failure {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("cannot fold {key} up to {at}: {f}"),
        ));
    }
    let (state, applied) = (r.state, r.position);
    Ok(json!({
        "entity_type": key.entity_type,
        "entity_id": key.entity_id,
        "position": applied,
        "plugin": crate::registry::plugin_ref(&plugin),
        "state": state,
    }))
}

async fn projection(
    State(app): State<App>,
    Path((name, key)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    match app.storage.projection(&name, &key).await? {
        Some(doc) => Ok(Json(
            json!({ "projection": name, "key": key, "document": doc }),
        )),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no document {key} in projection {name}"),
        )),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn dead_letters(
    State(app): State<App>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let items = app
        .storage
        .dead_letters(q.limit.unwrap_or(1000).min(10_000))
        .await?;
    Ok(Json(json!({ "count": items.len(), "items": items })))
}

async fn quarantine(State(app): State<App>) -> ApiResult<Json<Value>> {
    let items = app.storage.quarantined().await?;
    Ok(Json(json!({ "count": items.len(), "items": items })))
}

/// Serve `router` on `listen` until `shutdown` resolves.
pub async fn serve(
    app: App,
    listen: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding the HTTP API to {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let router = router(app);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "HTTP API stopped");
        }
    });
    Ok(addr)
}

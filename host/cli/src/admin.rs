//! The admin API: plugin upload, versions, activation, rollback, rebuild
//! status, quarantine retry and export, dead-letter re-submission. Every
//! route requires `Authorization: Bearer <admin.token>`; without a
//! configured token the admin API refuses everything unless
//! `admin.disable_auth` is set explicitly. `GET /v1/admin/limits` tells a
//! client what the host accepts (the upload size, the page limits).

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest as _, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{ApiError, ApiResult};
use crate::server::Api;
use refold_engine::manager::{Fixture, InstallError, Resubmitted, Retried, SwapMode};
use refold_types::event::EntityKey;

/// The admin routes, behind the token check.
pub fn router(app: Api) -> Router<Api> {
    // The upload takes components up to `plugins.max_upload_bytes` rather
    // than axum's default of 2 MiB; `upload` answers past it.
    let max_upload = DefaultBodyLimit::max(app.host().config.plugins.max_upload_bytes);
    Router::new()
        .route("/v1/admin/limits", get(limits))
        .route("/v1/plugins", get(list_all))
        .route(
            "/v1/plugins/{entity_type}",
            put(upload).layer(max_upload).get(list_type),
        )
        .route("/v1/plugins/{entity_type}/activate", post(activate))
        .route("/v1/plugins/{entity_type}/rollback", post(rollback))
        .route("/v1/rebuilds", get(rebuilds))
        .route("/v1/rebuilds/{id}", get(rebuild))
        .route(
            "/v1/quarantine/{entity_type}/{entity_id}/retry",
            post(retry),
        )
        .route(
            "/v1/quarantine/{entity_type}/{entity_id}/fixture",
            get(fixture),
        )
        .route("/v1/dead-letters/{id}/resubmit", post(resubmit))
        // `route_layer`: only these routes need the token; an unknown path
        // is a 404 for anyone.
        .route_layer(middleware::from_fn_with_state(app, require_token))
}

async fn require_token(
    State(app): State<Api>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if app.admin.disable_auth {
        return Ok(next.run(req).await);
    }
    let Some(token) = app.admin.token.as_deref().filter(|t| !t.is_empty()) else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "the admin API is disabled: set admin.token (or admin.disable_auth = true)".into(),
        ));
    };
    match crate::api::bearer(&req) {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(next.run(req).await),
        Some(_) => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "invalid admin token".into(),
        )),
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing bearer token".into(),
        )),
    }
}

/// Compare without an early exit, so timing does not reveal the prefix.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl From<InstallError> for ApiError {
    fn from(e: InstallError) -> Self {
        let status = match &e {
            InstallError::Invalid(_)
            | InstallError::WrongEntityType { .. }
            | InstallError::SampleFold(_) => StatusCode::UNPROCESSABLE_ENTITY,
            InstallError::NotFound(_) => StatusCode::NOT_FOUND,
            InstallError::Conflict(_) => StatusCode::CONFLICT,
            InstallError::Store(_) => match e {
                InstallError::Store(s) => return ApiError::from(s),
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            InstallError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

#[derive(Deserialize)]
struct UploadQuery {
    /// `forward` (default), `rebuild`, or `none` to only store it.
    mode: Option<String>,
}

fn parse_mode(m: Option<&str>) -> Result<Option<SwapMode>, ApiError> {
    match m.unwrap_or("forward") {
        "forward" => Ok(Some(SwapMode::Forward)),
        "rebuild" => Ok(Some(SwapMode::Rebuild)),
        "none" => Ok(None),
        other => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("unknown mode {other:?}: forward, rebuild or none"),
        )),
    }
}

/// The 413 of a component over `plugins.max_upload_bytes`.
fn too_large(size: Option<u64>, limit: usize) -> ApiError {
    let size = match size {
        Some(n) => format!("{n} bytes"),
        None => format!("more than {limit} bytes"),
    };
    ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("component is {size}; limit plugins.max_upload_bytes = {limit}"),
    )
}

async fn upload(
    State(app): State<Api>,
    Path(entity_type): Path<String>,
    q: Result<Query<UploadQuery>, QueryRejection>,
    req: Request,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let limit = app.host().config.plugins.max_upload_bytes;
    // A declared size over the limit is refused before a byte is read.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(declared, limit));
    }
    let body = match Bytes::from_request(req, &app).await {
        Ok(b) => b,
        Err(BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_))) => {
            return Err(too_large(None, limit));
        }
        Err(e) => return Err(ApiError(e.status(), e.body_text())),
    };
    let Query(q) = q?;
    let mode = parse_mode(q.mode.as_deref())?;
    if body.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "empty body: send the component bytes".into(),
        ));
    }
    let installed = app
        .plugins()
        .install(body.to_vec(), Some(&entity_type), mode)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::to_value(installed).unwrap_or_default()),
    ))
}

/// `GET /v1/admin/limits`: what this host accepts, so that a client can
/// refuse locally what would be refused here (`refold plugin push` does).
async fn limits(State(app): State<Api>) -> Json<Value> {
    let h = &app.http;
    Json(json!({
        "plugins": { "max_upload_bytes": app.host().config.plugins.max_upload_bytes },
        "http": {
            "max_page_items": h.max_page_items,
            "max_page_bytes": h.max_page_bytes,
            "max_concurrent_queries": h.max_concurrent_queries,
            "max_concurrent_replays": h.max_concurrent_replays,
            "replay_timeout_ms": h.replay_timeout_ms,
        },
    }))
}

async fn describe_type(app: &Api, entity_type: &str) -> ApiResult<Value> {
    let versions = app.host().plugin_store.plugin_versions(entity_type).await?;
    let activation = app.host().plugin_store.activation(entity_type).await?;
    let running = app
        .host()
        .registry
        .get(entity_type)
        .map(|p| p.digest.clone());
    Ok(json!({
        "entity_type": entity_type,
        "active": activation,
        "running_digest": running,
        "versions": versions,
    }))
}

async fn list_type(
    State(app): State<Api>,
    Path(entity_type): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(describe_type(&app, &entity_type).await?))
}

async fn list_all(State(app): State<Api>) -> ApiResult<Json<Value>> {
    let mut types: Vec<String> = app
        .host()
        .plugin_store
        .activations()
        .await?
        .into_iter()
        .map(|a| a.entity_type)
        .collect();
    for t in app.host().registry.snapshot().keys() {
        if !types.contains(t) {
            types.push(t.clone());
        }
    }
    types.sort();
    let mut out = Vec::new();
    for t in types {
        out.push(describe_type(&app, &t).await?);
    }
    Ok(Json(json!({ "plugins": out })))
}

#[derive(Deserialize)]
struct ActivateBody {
    digest: String,
    mode: Option<String>,
}

async fn activate(
    State(app): State<Api>,
    Path(entity_type): Path<String>,
    Json(b): Json<ActivateBody>,
) -> ApiResult<Json<Value>> {
    let mode = parse_mode(b.mode.as_deref())?.unwrap_or(SwapMode::Forward);
    let rebuild = app
        .plugins()
        .activate(&entity_type, &b.digest, mode)
        .await?;
    Ok(Json(
        json!({ "entity_type": entity_type, "digest": b.digest, "mode": mode, "rebuild": rebuild }),
    ))
}

async fn rollback(
    State(app): State<Api>,
    Path(entity_type): Path<String>,
) -> ApiResult<Json<Value>> {
    let a = app.plugins().rollback(&entity_type).await?;
    Ok(Json(serde_json::to_value(a).unwrap_or_default()))
}

async fn rebuilds(State(app): State<Api>) -> ApiResult<Json<Value>> {
    let all = app.plugins().rebuild_list().await?;
    Ok(Json(json!({ "rebuilds": all })))
}

/// Live from this host, else as stored: still known after a restart.
async fn rebuild(State(app): State<Api>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    match app.plugins().rebuild_status(&id).await? {
        Some(r) => Ok(Json(serde_json::to_value(r).unwrap_or_default())),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no rebuild {id}"))),
    }
}

async fn retry(
    State(app): State<Api>,
    Path((t, id)): Path<(String, String)>,
) -> ApiResult<Json<Retried>> {
    Ok(Json(app.plugins().retry(&EntityKey::new(t, id)).await?))
}

async fn fixture(
    State(app): State<Api>,
    Path((t, id)): Path<(String, String)>,
) -> ApiResult<Json<Fixture>> {
    Ok(Json(app.plugins().fixture(&EntityKey::new(t, id)).await?))
}

async fn resubmit(
    State(app): State<Api>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Resubmitted>> {
    let corrected = (!body.is_empty()).then(|| body.to_vec());
    Ok(Json(app.plugins().resubmit(&id, corrected).await?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_comparison() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"abcd"));
    }
}

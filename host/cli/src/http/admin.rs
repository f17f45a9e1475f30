//! The admin handlers: plugin upload, versions, activation, rollback,
//! rebuild status, quarantine retry and export, dead-letter re-submission,
//! and the limits a client can check locally. The router puts every one of
//! them behind the admin token.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody, QueryRejection};
use axum::extract::{FromRequest as _, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use serde::Deserialize;

use crate::http::error::{ApiError, ApiResult};
use crate::http::guards::{ListQuery, page};
use crate::http::state::Api;
use crate::http::types::{
    ActivateRequest, Activated, ErrorBody, Fixture, HttpLimits, Installed, Limits, Page,
    PluginLimits, PluginList, PluginType, RebuildList, RebuildStatus, Resubmitted, Retried,
    RolledBack,
};
use refold_engine::manager::SwapMode;
use refold_store::{Activation, Paged, PluginVersion};
use refold_types::EntityKey;
use utoipa::IntoParams;

/// The parameters of an upload.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// `forward` (default), `rebuild`, or `none` to only store it.
    mode: Option<String>,
}

/// `forward` (the default), `rebuild`, or `none` (no activation).
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

/// `PUT /v1/plugins/{type}[?mode=forward|rebuild|none]`: validate, store
/// and (unless `none`) activate a component.
#[utoipa::path(put, path = "/v1/plugins/{entity_type}", tag = "admin", security(("admin_token" = [])), params(("entity_type" = String, Path, description = "the entity type"), UploadQuery), request_body(content = String, content_type = "application/wasm", description = "the component's bytes"), responses((status = 201, body = Installed), (status = 400, description = "not a valid component, or it failed its sample fold", body = ErrorBody), (status = 413, description = "over `plugins.max_upload_bytes`", body = ErrorBody), (status = 401, description = "no or a wrong admin token", body = ErrorBody)))]
pub async fn upload(
    State(api): State<Api>,
    Path(entity_type): Path<String>,
    q: Result<Query<UploadQuery>, QueryRejection>,
    req: Request,
) -> ApiResult<(StatusCode, Json<Installed>)> {
    let limit = api.host().config.plugins.max_upload_bytes;
    // A declared size over the limit is refused before a byte is read.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(declared, limit));
    }
    let body = match Bytes::from_request(req, &api).await {
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
    let installed = api
        .plugins()
        .install(body.to_vec(), Some(&entity_type), mode)
        .await?;
    Ok((StatusCode::CREATED, Json(installed)))
}

/// `GET /v1/admin/limits`: what this host accepts, so that a client can
/// refuse locally what would be refused here (`refold plugin push` does).
#[utoipa::path(get, path = "/v1/admin/limits", tag = "admin", security(("admin_token" = [])), responses((status = 200, body = Limits), (status = 401, description = "no or a wrong admin token", body = ErrorBody)))]
pub async fn limits(State(api): State<Api>) -> Json<Limits> {
    let h = &api.http;
    Json(Limits {
        plugins: PluginLimits {
            max_upload_bytes: api.host().config.plugins.max_upload_bytes,
        },
        http: HttpLimits {
            max_page_items: h.max_page_items,
            max_page_bytes: h.max_page_bytes,
            max_concurrent_queries: h.max_concurrent_queries,
            max_concurrent_replays: h.max_concurrent_replays,
            replay_timeout_ms: h.replay_timeout_ms,
        },
    })
}

/// The versions of one entity type, its stored activation and the digest
/// this host runs.
async fn describe_type(api: &Api, entity_type: &str) -> ApiResult<PluginType> {
    let versions = api.host().plugin_store.plugin_versions(entity_type).await?;
    let active = api.host().plugin_store.activation(entity_type).await?;
    let running_digest = api
        .host()
        .registry
        .get(entity_type)
        .map(|p| p.digest.clone());
    Ok(PluginType {
        entity_type: entity_type.to_string(),
        active,
        running_digest,
        versions,
    })
}

/// `GET /v1/plugins/{type}`.
#[utoipa::path(get, path = "/v1/plugins/{entity_type}", tag = "admin", security(("admin_token" = [])), params(("entity_type" = String, Path, description = "the entity type")), responses((status = 200, body = PluginType), (status = 401, description = "no or a wrong admin token", body = ErrorBody)))]
pub async fn list_type(
    State(api): State<Api>,
    Path(entity_type): Path<String>,
) -> ApiResult<Json<PluginType>> {
    Ok(Json(describe_type(&api, &entity_type).await?))
}

/// `GET /v1/plugins/{type}/versions[?after=DIGEST&limit=N]`: the stored
/// versions of an entity type, oldest first, a page at a time; the cursor
/// is the digest of the last version of the page.
#[utoipa::path(get, path = "/v1/plugins/{entity_type}/versions", tag = "admin", security(("admin_token" = [])), params(("entity_type" = String, Path, description = "the entity type"), ListQuery), responses((status = 200, description = "a page of the stored versions, oldest first", body = Page<PluginVersion>), (status = 400, description = "a cursor that names no version", body = ErrorBody), (status = 401, description = "no or a wrong admin token", body = ErrorBody)))]
pub async fn versions(
    State(api): State<Api>,
    Path(entity_type): Path<String>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<axum::response::Response> {
    let Query(q) = q?;
    let limit = q.limit(&api.guards);
    // Version rows are metadata (the bytes are kept apart), a few hundred
    // bytes each: read whole, then cut to the page.
    let all = api
        .host()
        .plugin_store
        .plugin_versions(&entity_type)
        .await?;
    let start = match q.after.as_deref() {
        None | Some("") => 0,
        Some(d) => all
            .iter()
            .position(|v| v.digest == d)
            .map(|i| i + 1)
            .ok_or_else(|| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("after: no version {d} of entity type {entity_type}"),
                )
            })?,
    };
    let items = all
        .into_iter()
        .skip(start)
        .take(limit + 1)
        .map(|v| Paged {
            cursor: v.digest.clone(),
            item: v,
        })
        .collect();
    page(items, limit, api.guards.max_page_bytes)
}

/// `GET /v1/plugins/{type}/activations[?after=SEQ&limit=N]`: the
/// activations of an entity type, newest first; the cursor is the `seq`
/// of the last activation of the page.
#[utoipa::path(get, path = "/v1/plugins/{entity_type}/activations", tag = "admin", security(("admin_token" = [])), params(("entity_type" = String, Path, description = "the entity type"), ListQuery), responses((status = 200, description = "a page of the activations, newest first", body = Page<Activation>), (status = 400, description = "a cursor that is not a sequence number", body = ErrorBody), (status = 401, description = "no or a wrong admin token", body = ErrorBody)))]
pub async fn activations(
    State(api): State<Api>,
    Path(entity_type): Path<String>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<axum::response::Response> {
    let Query(q) = q?;
    let limit = q.limit(&api.guards);
    let before = match q.after.as_deref() {
        None | Some("") => None,
        Some(c) => Some(c.parse::<i64>().map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("after: {c:?} is not an activation's seq"),
            )
        })?),
    };
    let items = api
        .host()
        .plugin_store
        .activation_history(&entity_type, before, limit + 1)
        .await?
        .into_iter()
        .map(|a| Paged {
            cursor: a.seq.to_string(),
            item: a,
        })
        .collect();
    page(items, limit, api.guards.max_page_bytes)
}

/// `GET /v1/plugins`: every entity type with a stored activation or a
/// running plugin.
#[utoipa::path(get, path = "/v1/plugins", tag = "admin", security(("admin_token" = [])), responses((status = 200, body = PluginList), (status = 401, description = "no or a wrong admin token", body = ErrorBody)))]
pub async fn list_all(State(api): State<Api>) -> ApiResult<Json<PluginList>> {
    let mut types: Vec<String> = api
        .host()
        .plugin_store
        .activations()
        .await?
        .into_iter()
        .map(|a| a.entity_type)
        .collect();
    for t in api.host().registry.snapshot().keys() {
        if !types.contains(t) {
            types.push(t.clone());
        }
    }
    types.sort();
    let mut plugins = Vec::new();
    for t in types {
        plugins.push(describe_type(&api, &t).await?);
    }
    Ok(Json(PluginList { plugins }))
}

/// `POST /v1/plugins/{type}/activate` with `{"digest", "mode"}`.
#[utoipa::path(post, path = "/v1/plugins/{entity_type}/activate", tag = "admin", security(("admin_token" = [])), params(("entity_type" = String, Path, description = "the entity type")), request_body = ActivateRequest, responses((status = 200, body = Activated), (status = 404, description = "no such version", body = ErrorBody), (status = 409, description = "a conflicting change", body = ErrorBody), (status = 401, description = "no or a wrong admin token", body = ErrorBody)))]
pub async fn activate(
    State(api): State<Api>,
    Path(entity_type): Path<String>,
    Json(b): Json<ActivateRequest>,
) -> ApiResult<Json<Activated>> {
    let mode = parse_mode(b.mode.as_deref())?.unwrap_or(SwapMode::Forward);
    let rebuild = api
        .plugins()
        .activate(&entity_type, &b.digest, mode)
        .await?;
    Ok(Json(Activated {
        entity_type,
        digest: b.digest,
        mode,
        rebuild,
    }))
}

/// `POST /v1/plugins/{type}/rollback`.
#[utoipa::path(post, path = "/v1/plugins/{entity_type}/rollback", tag = "admin", security(("admin_token" = [])), params(("entity_type" = String, Path, description = "the entity type")), responses((status = 200, description = "the activation now in force", body = Activation), (status = 409, description = "nothing to roll back to", body = ErrorBody), (status = 401, description = "no or a wrong admin token", body = ErrorBody)))]
pub async fn rollback(
    State(api): State<Api>,
    Path(entity_type): Path<String>,
) -> ApiResult<Json<RolledBack>> {
    Ok(Json(api.plugins().rollback(&entity_type).await?))
}

/// `GET /v1/rebuilds`.
#[utoipa::path(get, path = "/v1/rebuilds", tag = "admin", security(("admin_token" = [])), responses((status = 200, body = RebuildList), (status = 401, description = "no or a wrong admin token", body = ErrorBody)))]
pub async fn rebuilds(State(api): State<Api>) -> ApiResult<Json<RebuildList>> {
    let all = api.plugins().rebuild_list().await?;
    Ok(Json(RebuildList { rebuilds: all }))
}

/// `GET /v1/rebuilds/{id}`: live from this host, else as stored, so that
/// it is still known after a restart.
#[utoipa::path(get, path = "/v1/rebuilds/{id}", tag = "admin", security(("admin_token" = [])), params(("id" = String, Path, description = "the rebuild")), responses((status = 200, body = RebuildStatus), (status = 404, description = "no such rebuild", body = ErrorBody), (status = 401, description = "no or a wrong admin token", body = ErrorBody)))]
pub async fn rebuild(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> ApiResult<Json<RebuildStatus>> {
    match api.plugins().rebuild_status(&id).await? {
        Some(r) => Ok(Json(r)),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no rebuild {id}"))),
    }
}

/// `POST /v1/quarantine/{type}/{id}/retry`.
#[utoipa::path(post, path = "/v1/quarantine/{entity_type}/{entity_id}/retry", tag = "admin", security(("admin_token" = [])), params(("entity_type" = String, Path, description = "the entity type"), ("entity_id" = String, Path, description = "the entity id")), responses((status = 200, body = Retried), (status = 404, description = "not quarantined", body = ErrorBody), (status = 401, description = "no or a wrong admin token", body = ErrorBody)))]
pub async fn retry(
    State(api): State<Api>,
    Path((t, id)): Path<(String, String)>,
) -> ApiResult<Json<Retried>> {
    Ok(Json(api.plugins().retry(&EntityKey::new(t, id)).await?))
}

/// `GET /v1/quarantine/{type}/{id}/fixture`.
#[utoipa::path(get, path = "/v1/quarantine/{entity_type}/{entity_id}/fixture", tag = "admin", security(("admin_token" = [])), params(("entity_type" = String, Path, description = "the entity type"), ("entity_id" = String, Path, description = "the entity id")), responses((status = 200, body = Fixture), (status = 404, description = "not quarantined", body = ErrorBody), (status = 401, description = "no or a wrong admin token", body = ErrorBody)))]
pub async fn fixture(
    State(api): State<Api>,
    Path((t, id)): Path<(String, String)>,
) -> ApiResult<Json<Fixture>> {
    Ok(Json(api.plugins().fixture(&EntityKey::new(t, id)).await?))
}

/// `POST /v1/dead-letters/{id}/resubmit`, with a corrected record as the
/// body or none to send the original again.
#[utoipa::path(post, path = "/v1/dead-letters/{id}/resubmit", tag = "admin", security(("admin_token" = [])), params(("id" = String, Path, description = "the dead letter")), request_body(content = Object, description = "a corrected record (optional: none sends the original again)"), responses((status = 200, body = Resubmitted), (status = 404, description = "no such dead letter", body = ErrorBody), (status = 401, description = "no or a wrong admin token", body = ErrorBody)))]
pub async fn resubmit(
    State(api): State<Api>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Resubmitted>> {
    let corrected = (!body.is_empty()).then(|| body.to_vec());
    Ok(Json(api.plugins().resubmit(&id, corrected).await?))
}

//! The query handlers: health, metrics, entities (now and `?at=`),
//! projections, dead letters and quarantine listings. Each one parses the
//! request, asks the engine or the store, and writes the typed answer as
//! JSON.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::http::error::{ApiError, ApiResult};
use crate::http::guards::{ListQuery, page};
use crate::http::state::Api;
use crate::http::types::ProjectionDocument;
use refold_engine::query::{EntityView, StateAt};
use refold_types::EntityKey;

/// `GET /healthz`: 200 when healthy, 503 when not, with the report.
pub async fn healthz(State(api): State<Api>) -> Response {
    let (ok, body) = api.host().health.report();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// `GET /metrics`, in the Prometheus text format.
pub async fn metrics(State(api): State<Api>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        api.host().metrics.render(),
    )
        .into_response()
}

/// The parameters of an entity query.
#[derive(Deserialize)]
pub struct AtQuery {
    /// A past position: the state after the event there.
    at: Option<u64>,
}

/// An entity now, or at a past position.
#[derive(Serialize)]
#[serde(untagged)]
pub enum EntityAnswer {
    /// Without `?at=`.
    Now(EntityView),
    /// With `?at=`.
    At(StateAt),
}

/// `GET /v1/entities/{type}/{id}[?at=POSITION]`.
pub async fn entity(
    State(api): State<Api>,
    Path((entity_type, entity_id)): Path<(String, String)>,
    q: Result<Query<AtQuery>, QueryRejection>,
) -> ApiResult<Json<EntityAnswer>> {
    let Query(q) = q?;
    let key = EntityKey::new(entity_type, entity_id);
    Ok(Json(match q.at {
        None => EntityAnswer::Now(api.queries.entity(&key).await?),
        Some(at) => EntityAnswer::At(api.queries.state_at(&key, at).await?),
    }))
}

/// `GET /v1/projections/{name}/{key}`.
pub async fn projection(
    State(api): State<Api>,
    Path((name, key)): Path<(String, String)>,
) -> ApiResult<Json<ProjectionDocument>> {
    match api.host().storage.projection(&name, &key).await? {
        Some(document) => Ok(Json(ProjectionDocument {
            projection: name,
            key,
            document,
        })),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no document {key} in projection {name}"),
        )),
    }
}

/// `GET /v1/dead-letters[?after=CURSOR&limit=N]`.
pub async fn dead_letters(
    State(api): State<Api>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let limit = q.limit(&api.guards);
    let fetched = api
        .host()
        .storage
        .dead_letter_page(q.after.as_deref(), limit + 1)
        .await?;
    page(fetched, limit, api.guards.max_page_bytes)
}

/// `GET /v1/quarantine[?after=CURSOR&limit=N]`.
pub async fn quarantine(
    State(api): State<Api>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let limit = q.limit(&api.guards);
    let fetched = api
        .host()
        .storage
        .quarantine_page(q.after.as_deref(), limit + 1)
        .await?;
    page(fetched, limit, api.guards.max_page_bytes)
}

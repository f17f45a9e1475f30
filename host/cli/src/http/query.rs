//! The query handlers: health, metrics, partitions, entities (now and `?at=`),
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
use crate::http::types::{
    ChangesPage, EntityItem, ErrorBody, Page, Partitions, ProjectionDocument,
};
use refold_engine::query::{EntityView, StateAt};
use refold_store::{DeadLetter, Paged, QuarantineRecord, StoredEvent};
use refold_types::EntityKey;
use utoipa::{IntoParams, ToSchema};

/// `GET /healthz`: 200 when healthy, 503 when not, with the report.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "healthy: the report", body = Object), (status = 503, description = "not healthy: the report with the reasons", body = Object)))]
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
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(api): State<Api>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        api.host().metrics.render(),
    )
        .into_response()
}

/// `GET /v1/partitions`: each partition's lag and committed offset over
/// the last minutes (what the console charts), from memory: no store read.
#[utoipa::path(get, path = "/v1/partitions", tag = "query", responses((status = 200, body = Partitions), (status = 401, description = "no or a wrong token", body = ErrorBody)))]
pub async fn partitions(State(api): State<Api>) -> Json<Partitions> {
    let t = &api.host().trend;
    Json(Partitions {
        step_seconds: t.step().as_secs(),
        window_seconds: t.window().as_secs(),
        partitions: t.snapshot(),
    })
}

/// The parameters of an entity query.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AtQuery {
    /// A past position: the state after the event there.
    at: Option<u64>,
}

/// An entity now, or at a past position.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum EntityAnswer {
    /// Without `?at=`.
    Now(EntityView),
    /// With `?at=`.
    At(StateAt),
}

/// `GET /v1/entities/{type}/{id}[?at=POSITION]`.
#[utoipa::path(get, path = "/v1/entities/{entity_type}/{entity_id}", tag = "query", params(("entity_type" = String, Path, description = "the entity type"), ("entity_id" = String, Path, description = "the entity id"), AtQuery), responses((status = 200, description = "the entity now (`EntityView`), or at `?at=` (`StateAt`)", body = EntityAnswer), (status = 404, description = "no such entity, or no such position", body = ErrorBody), (status = 429, description = "too many replays at once", body = ErrorBody), (status = 503, description = "the replay ran out of time", body = ErrorBody), (status = 400, description = "a bad parameter or cursor", body = ErrorBody), (status = 401, description = "no or a wrong token", body = ErrorBody)))]
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
#[utoipa::path(get, path = "/v1/projections/{name}/{key}", tag = "query", params(("name" = String, Path, description = "the projection"), ("key" = String, Path, description = "the document key")), responses((status = 200, body = ProjectionDocument), (status = 404, description = "no such document", body = ErrorBody), (status = 400, description = "a bad parameter or cursor", body = ErrorBody), (status = 401, description = "no or a wrong token", body = ErrorBody)))]
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

/// `GET /v1/entities/{type}[?after=CURSOR&limit=N]`: the entities of a
/// type that have events, `{"entity_id"}` each, in the store's order.
#[utoipa::path(get, path = "/v1/entities/{entity_type}", tag = "query", params(("entity_type" = String, Path, description = "the entity type"), ListQuery), responses((status = 200, description = "a page of the entities of the type", body = Page<EntityItem>), (status = 400, description = "a bad parameter or cursor", body = ErrorBody), (status = 401, description = "no or a wrong token", body = ErrorBody)))]
pub async fn entities(
    State(api): State<Api>,
    Path(entity_type): Path<String>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let limit = q.limit(&api.guards);
    let fetched = api
        .host()
        .storage
        .entity_page(&entity_type, q.after.as_deref(), limit + 1)
        .await?;
    let items = fetched
        .into_iter()
        .map(|p| Paged {
            cursor: p.cursor,
            item: EntityItem { entity_id: p.item },
        })
        .collect();
    page(items, limit, api.guards.max_page_bytes)
}

/// The parameters of an entity's event listing.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// The first position wanted (default 1); the `next` of the previous
    /// page.
    pub from: Option<String>,
    /// Events wanted, capped to `http.max_page_items`.
    pub limit: Option<usize>,
}

/// `GET /v1/entities/{type}/{id}/events[?from=POSITION&limit=N]`: the
/// entity's stored events in position order; `next` is the position to
/// pass as `from` for the following page.
#[utoipa::path(get, path = "/v1/entities/{entity_type}/{entity_id}/events", tag = "query", params(("entity_type" = String, Path, description = "the entity type"), ("entity_id" = String, Path, description = "the entity id"), EventsQuery), responses((status = 200, description = "a page of the entity's stored events; `next` is the next `from`", body = Page<StoredEvent>), (status = 400, description = "a bad parameter or cursor", body = ErrorBody), (status = 401, description = "no or a wrong token", body = ErrorBody)))]
pub async fn entity_events(
    State(api): State<Api>,
    Path((entity_type, entity_id)): Path<(String, String)>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let limit = q
        .limit
        .unwrap_or(api.guards.max_page_items)
        .clamp(1, api.guards.max_page_items);
    let from = match q.from.as_deref() {
        None | Some("") => 1,
        Some(s) => s.parse::<u64>().map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("from must be a position (a whole number), not {s:?}"),
            )
        })?,
    }
    .max(1);
    let key = EntityKey::new(entity_type, entity_id);
    // Positions of an entity follow each other from 1, so a page is the
    // range after `from - 1`, one more than asked to tell whether more follow.
    let after = from - 1;
    let upto = after.saturating_add(limit as u64 + 1);
    let events = api.host().storage.history(&key, after, Some(upto)).await?;
    let items = events
        .into_iter()
        .map(|e| Paged {
            cursor: (e.position + 1).to_string(),
            item: e,
        })
        .collect();
    page(items, limit, api.guards.max_page_bytes)
}

/// `GET /v1/projections/{name}[?after=CURSOR&limit=N]`: a projection's
/// documents, each as `{"projection", "key", "document"}`.
#[utoipa::path(get, path = "/v1/projections/{name}", tag = "query", params(("name" = String, Path, description = "the projection"), ListQuery), responses((status = 200, description = "a page of the projection's documents", body = Page<ProjectionDocument>), (status = 400, description = "a bad parameter or cursor", body = ErrorBody), (status = 401, description = "no or a wrong token", body = ErrorBody)))]
pub async fn projection_documents(
    State(api): State<Api>,
    Path(name): Path<String>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let limit = q.limit(&api.guards);
    let fetched = api
        .host()
        .storage
        .projection_page(&name, q.after.as_deref(), limit + 1)
        .await?;
    let items = fetched
        .into_iter()
        .map(|p| {
            let (key, document) = p.item;
            Paged {
                cursor: p.cursor,
                item: ProjectionDocument {
                    projection: name.clone(),
                    key,
                    document,
                },
            }
        })
        .collect();
    page(items, limit, api.guards.max_page_bytes)
}

/// `GET /v1/dead-letters[?after=CURSOR&limit=N]`.
#[utoipa::path(get, path = "/v1/dead-letters", tag = "query", params(ListQuery), responses((status = 200, description = "a page of dead letters", body = Page<DeadLetter>), (status = 400, description = "a bad parameter or cursor", body = ErrorBody), (status = 401, description = "no or a wrong token", body = ErrorBody)))]
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
#[utoipa::path(get, path = "/v1/quarantine", tag = "query", params(ListQuery), responses((status = 200, description = "a page of quarantine records", body = Page<QuarantineRecord>), (status = 400, description = "a bad parameter or cursor", body = ErrorBody), (status = 401, description = "no or a wrong token", body = ErrorBody)))]
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

/// `GET /v1/changes` parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChangesQuery {
    /// The `next` of the previous answer (0 or absent: from the oldest
    /// record kept).
    pub after: Option<u64>,
    /// Records wanted, capped to `http.max_page_items`.
    pub limit: Option<usize>,
    /// Seconds to wait for a record when there is none after `after`
    /// (capped to `changes.max_wait_seconds`; 0: answer at once).
    pub wait: Option<u64>,
}

/// `GET /v1/changes?after=CURSOR&limit=N&wait=S`: change records in commit
/// order, `{"changes": [{"cursor", "event"}], "next": cursor}`. With
/// `wait`, a request that finds nothing waits for the next commit that
/// adds records (a long poll); it holds no query slot meanwhile. The
/// cursor is the store's, so it stays valid across restarts.
#[utoipa::path(get, path = "/v1/changes", tag = "query", params(ChangesQuery), responses((status = 200, body = ChangesPage), (status = 410, description = "the records after the cursor were pruned", body = ErrorBody), (status = 429, description = "too many open long polls", body = ErrorBody), (status = 400, description = "a bad parameter or cursor", body = ErrorBody), (status = 401, description = "no or a wrong token", body = ErrorBody)))]
pub async fn changes(
    State(api): State<Api>,
    q: Result<Query<ChangesQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    // Bounded: every open poll is a connection, and each commit wakes them
    // all into a store read.
    let Ok(_poll) = api.guards.change_polls.clone().try_acquire_owned() else {
        return Err(ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} change-feed requests are open (http.max_change_polls); retry later",
                api.guards.max_change_polls
            ),
        ));
    };
    let limit = q
        .limit
        .unwrap_or(api.guards.max_page_items)
        .clamp(1, api.guards.max_page_items);
    let after = q.after.unwrap_or(0);
    let max_wait = api.host().config.changes.max_wait_seconds;
    let deadline = tokio::time::Instant::now()
        + std::time::Duration::from_secs(q.wait.unwrap_or(0).min(max_wait));
    let host = api.host();
    let found = loop {
        // Registered before the read: a commit landing between the read
        // and the wait still wakes this request.
        let woken = host.changes.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let found = host.storage.changes_after(after, limit).await?;
        // Cursors follow each other; a jump past `after + 1` means the
        // records in between were pruned, which a consumer must hear of
        // rather than skip silently.
        if let Some((from, to)) = refold_engine::changes::pruned_gap(after, &found) {
            return Err(ApiError(
                StatusCode::GONE,
                format!(
                    "change records {from}..={to} were pruned (changes.retention_hours); \
                     the feed holds {} onwards: read the states again, then resume after {to}",
                    to + 1
                ),
            ));
        }
        if !found.is_empty() || tokio::time::Instant::now() >= deadline {
            break found;
        }
        let _ = tokio::time::timeout_at(deadline, woken).await;
    };
    // Each record is serialised once, into the body, which ends before the
    // record that would pass `http.max_page_bytes` (the first always goes).
    let mut body = Vec::with_capacity(api.guards.max_page_bytes.min(64 << 10));
    body.extend_from_slice(b"{\"changes\":[");
    let mut next = after;
    for c in &found {
        #[derive(Serialize)]
        struct Item<'a> {
            cursor: u64,
            event: &'a serde_json::Value,
        }
        let item = serde_json::to_vec(&Item {
            cursor: c.cursor,
            event: &c.event,
        })
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let first = next == after;
        if !first && body.len() + item.len() + 1 > api.guards.max_page_bytes {
            break;
        }
        if !first {
            body.push(b',');
        }
        body.extend_from_slice(&item);
        next = c.cursor;
    }
    body.extend_from_slice(format!("],\"next\":{next}}}").as_bytes());
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

//! The HTTP query API (and, merged in from [`crate::admin`], the admin API).
//!
//! What a query may cost is bounded: listings are paged by cursor with a
//! cap on items and bytes per page, at most `http.max_concurrent_queries`
//! query requests run at once (the rest wait), and `?at=` replays are
//! limited in number (429 beyond) and in time (503 beyond), so that
//! readers cannot take the memory or the cores ingest needs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::HttpConfig;
use crate::server::Api;
use refold_runtime::fold;
use refold_store::{BadCursor, EntityRecord, Paged, StoreError, StoredEvent};
use refold_types::event::EntityKey;

/// An API error: a status and a message, rendered as
/// `{"error": "<code>", "message": "..."}` with the code named after the
/// status (`not_found`, `too_large`, ...). A 429 carries `Retry-After`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

/// The machine-readable code of an error status.
fn error_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::CONFLICT => "conflict",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::INTERNAL_SERVER_ERROR => "internal",
        _ => "error",
    }
}

/// Seconds a client is told to wait after a 429: a replay slot is usually
/// free again within about that.
const RETRY_AFTER_SECONDS: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": error_code(self.0), "message": self.1 }));
        let mut r = (self.0, body).into_response();
        if self.0 == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        r
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        // A cursor the client made up (or mangled) is its error, not ours.
        if let Some(c) = e.downcast_ref::<BadCursor>() {
            return ApiError(StatusCode::BAD_REQUEST, c.to_string());
        }
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

impl From<StoreError> for ApiError {
    /// By kind: an outage is the store's (503, retry), a cursor the client
    /// made up is the client's (400).
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::BadCursor(_) => StatusCode::BAD_REQUEST,
            StoreError::Fenced(_) => StatusCode::CONFLICT,
            StoreError::Corrupt(_) | StoreError::Other(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, e.body_text())
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

/// What bounds the cost of queries, shared by every request of a server.
struct Guards {
    /// Query requests running at once.
    queries: Arc<Semaphore>,
    /// `?at=` replays running at once.
    replays: Arc<Semaphore>,
    /// `http.max_concurrent_replays`, for the 429 message.
    max_replays: usize,
    /// Time budget of one replay.
    replay_budget: Duration,
    /// Items per listing page at most.
    max_page_items: usize,
    /// Bytes of items per listing page at most.
    max_page_bytes: usize,
}

impl Guards {
    fn new(c: &HttpConfig) -> Self {
        // A limit of 0 would refuse (or hang) everything; 1 is the least.
        Guards {
            queries: Arc::new(Semaphore::new(c.max_concurrent_queries.max(1))),
            replays: Arc::new(Semaphore::new(c.max_concurrent_replays.max(1))),
            max_replays: c.max_concurrent_replays.max(1),
            replay_budget: Duration::from_millis(c.replay_timeout_ms.max(1)),
            max_page_items: c.max_page_items.max(1),
            max_page_bytes: c.max_page_bytes.max(1),
        }
    }
}

/// The query routes, the admin routes, and a JSON 404 for anything else.
pub fn router(app: Api) -> Router {
    let guards = Arc::new(Guards::new(&app.http));
    // `route_layer`: the checks run only for these routes, so an unknown
    // path is a 404 whatever the credentials. The token is checked before
    // a query slot is taken (the later layer runs first).
    let queries = Router::new()
        .route("/v1/entities/{entity_type}/{entity_id}", get(entity))
        .route("/v1/projections/{name}/{key}", get(projection))
        .route("/v1/dead-letters", get(dead_letters))
        .route("/v1/quarantine", get(quarantine))
        .route_layer(middleware::from_fn_with_state(
            guards.clone(),
            limit_queries,
        ))
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            require_read_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(queries)
        .merge(crate::admin::router(app.clone()))
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(Extension(guards))
        .with_state(app)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no route {method} {}", uri.path()),
    )
}

async fn no_method(method: Method, uri: Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

/// The bearer token of a request, if it carries one.
pub(crate) fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// With `http.read_token` set, a query needs it (or the admin token).
async fn require_read_token(
    State(app): State<Api>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(read) = app.http.read_token.as_deref().filter(|t| !t.is_empty()) else {
        return Ok(next.run(req).await);
    };
    let admin = app.admin.token.as_deref().filter(|t| !t.is_empty());
    let eq = crate::admin::constant_time_eq;
    match bearer(&req) {
        Some(g) if eq(g.as_bytes(), read.as_bytes()) => Ok(next.run(req).await),
        Some(g) if admin.is_some_and(|a| eq(g.as_bytes(), a.as_bytes())) => Ok(next.run(req).await),
        Some(_) => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "invalid read token".into(),
        )),
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing bearer token: the query API requires Authorization: Bearer <http.read_token>"
                .into(),
        )),
    }
}

/// At most `http.max_concurrent_queries` queries run at once; the others
/// wait for a slot (waiting costs a task, not a core).
async fn limit_queries(
    State(guards): State<Arc<Guards>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let _slot = guards
        .queries
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError(StatusCode::SERVICE_UNAVAILABLE, "shutting down".into()))?;
    Ok(next.run(req).await)
}

async fn healthz(State(app): State<Api>) -> Response {
    let (ok, body) = app.host().health.report();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(app): State<Api>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        app.host().metrics.render(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct AtQuery {
    at: Option<u64>,
}

async fn entity(
    State(app): State<Api>,
    Extension(guards): Extension<Arc<Guards>>,
    Path((entity_type, entity_id)): Path<(String, String)>,
    q: Result<Query<AtQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let key = EntityKey::new(entity_type, entity_id);
    match q.at {
        None => {
            let rec = current(&app, &guards, &key).await?;
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
        Some(at) => Ok(Json(state_at(&app, &guards, &key, at).await?)),
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
async fn current(app: &Api, guards: &Guards, key: &EntityKey) -> ApiResult<Option<EntityRecord>> {
    let t = &key.entity_type;
    let stored = app.host().plugin_store.activation(t).await?;
    let (generations, plugin) = match stored {
        Some(a) => {
            let plugin = match app.host().registry.get(t) {
                Some(p) if p.digest == a.digest => Some(p),
                _ => app.plugins().compiled(&a.digest).await.ok(),
            };
            let mut g = refold_engine::registry::Generations::new();
            g.insert(t.clone(), a.generation);
            (std::sync::Arc::new(g), plugin)
        }
        None => (
            app.host().registry.generations(),
            app.host().registry.get(t),
        ),
    };
    let mut recs = app.host().storage.load(std::slice::from_ref(key)).await?;
    refold_engine::generation::resolve(&*app.host().storage, &generations, &mut recs, false)
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
    // Catching up is a replay too, so it has the same time budget; it takes
    // no replay slot, since plain reads of an entity must not be refused
    // because of someone else's `?at=`.
    let deadline = Instant::now() + guards.replay_budget;
    let gap = within(
        deadline,
        guards.replay_budget,
        key,
        app.host()
            .storage
            .history(key, rec.position, Some(rec.head)),
    )
    .await??;
    // A failing event shows the last good state; the batch that meets it
    // will quarantine the entity.
    let r = replay(
        &plugin,
        key,
        rec.state.clone(),
        gap,
        deadline,
        guards.replay_budget,
        None,
    )
    .await?;
    if r.applied > 0 {
        rec.state = Some(r.state);
        rec.position += r.applied as u64;
        rec.plugin = Some(refold_engine::registry::plugin_ref(&plugin));
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

/// Events folded per guest call of a replay: the deadline is checked
/// between calls, so this bounds how far past its budget a replay runs.
const REPLAY_CHUNK: usize = 1024;

/// The 503 of a replay past its budget.
fn over_budget(key: &EntityKey, budget: Duration) -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "replaying {key} took longer than its budget of {} ms (http.replay_timeout_ms)",
            budget.as_millis()
        ),
    )
}

/// `f`, or the 503 of a replay past its budget if `deadline` comes first.
async fn within<T>(
    deadline: Instant,
    budget: Duration,
    key: &EntityKey,
    f: impl std::future::Future<Output = T>,
) -> ApiResult<T> {
    tokio::time::timeout_at(deadline.into(), f)
        .await
        .map_err(|_| over_budget(key, budget))
}

/// Fold `events` onto `start` (the plugin's initial state when `None`) in a
/// throwaway sandbox, off the async threads, in chunks, giving up with a 503
/// once `deadline` has passed. Nothing is stored. `slot` (a replay permit)
/// is held until the fold has stopped, even when the client has gone.
async fn replay(
    plugin: &std::sync::Arc<refold_runtime::Plugin>,
    key: &EntityKey,
    start: Option<Value>,
    events: Vec<StoredEvent>,
    deadline: Instant,
    budget: Duration,
    slot: Option<OwnedSemaphorePermit>,
) -> ApiResult<Replay> {
    let id = key.entity_id.clone();
    let p = plugin.clone();
    let r = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let sandbox = &mut refold_runtime::Sandbox::new(p);
        let mut state = match start {
            Some(s) => s,
            None => match fold::init_state(sandbox, &id) {
                Ok(s) => s,
                Err(_) => {
                    return Some(Replay {
                        state: Value::Null,
                        applied: 0,
                    });
                }
            },
        };
        let mut applied = 0;
        for chunk in events.chunks(REPLAY_CHUNK) {
            if Instant::now() >= deadline {
                return None;
            }
            let o = fold::fold_and_project(sandbox, &id, state, chunk, false);
            state = o.state;
            applied += o.applied;
            if o.failure.is_some() {
                // The last good state; the batch that meets the failing
                // event quarantines the entity.
                break;
            }
        }
        Some(Replay { state, applied })
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    r.ok_or_else(|| over_budget(key, budget))
}

/// The state of `key` after the event at position `at`, folded from the
/// stored raw events with the active plugin of its type. Takes one of the
/// `http.max_concurrent_replays` slots (429 when none is free) and answers
/// 503 past `http.replay_timeout_ms`.
async fn state_at(app: &Api, guards: &Guards, key: &EntityKey, at: u64) -> ApiResult<Value> {
    let plugin = app.host().registry.get(&key.entity_type).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no plugin for entity type {}", key.entity_type),
        )
    })?;
    let slot = guards.replays.clone().try_acquire_owned().map_err(|_| {
        ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} ?at= replays are running (http.max_concurrent_replays); retry later",
                guards.max_replays
            ),
        )
    })?;
    let budget = guards.replay_budget;
    let deadline = Instant::now() + budget;
    // From the replay snapshot before `at`: a bounded stretch of history,
    // not all of it (see `snapshot`); the fold stops at the deadline.
    let answer = within(
        deadline,
        budget,
        key,
        refold_engine::snapshot::state_at(&*app.host().storage, &plugin, key, at, Some(deadline)),
    )
    .await??;
    drop(slot);
    let Some(r) = answer else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no events for {key} up to position {at}"),
        ));
    };
    if r.timed_out {
        return Err(over_budget(key, budget));
    }
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
        "plugin": refold_engine::registry::plugin_ref(&plugin),
        "state": state,
    }))
}

async fn projection(
    State(app): State<Api>,
    Path((name, key)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    match app.host().storage.projection(&name, &key).await? {
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
    /// The `next` of the previous page.
    after: Option<String>,
    /// Items wanted, capped to `http.max_page_items`.
    limit: Option<usize>,
}

impl ListQuery {
    fn limit(&self, guards: &Guards) -> usize {
        self.limit
            .unwrap_or(guards.max_page_items)
            .clamp(1, guards.max_page_items)
    }
}

/// A listing page as JSON, `{"items": [...], "count": n, "next": cursor}`,
/// from up to `limit + 1` items read from the store (the extra one only
/// tells whether there is more). Items are added while the page stays
/// within `max_bytes`; the first item always goes in, so that a listing
/// moves on even past an item larger than the budget. `next` is null on the
/// last page.
fn page<T: Serialize>(
    fetched: Vec<Paged<T>>,
    limit: usize,
    max_bytes: usize,
) -> ApiResult<Response> {
    let mut body = Vec::with_capacity(max_bytes.min(64 << 10));
    body.extend_from_slice(b"{\"items\":[");
    let mut count = 0;
    let mut last: Option<&str> = None;
    let mut cut = false;
    for p in &fetched {
        if count == limit {
            cut = true;
            break;
        }
        let item = serde_json::to_vec(&p.item)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let len = item.len() + usize::from(count > 0);
        if count > 0 && body.len() + len > max_bytes {
            cut = true;
            break;
        }
        if count > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&item);
        count += 1;
        last = Some(p.cursor.as_str());
    }
    let next = if cut { last } else { None };
    let tail = json!({ "count": count, "next": next }).to_string();
    body.extend_from_slice(b"],");
    body.extend_from_slice(&tail.as_bytes()[1..]);
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

async fn dead_letters(
    State(app): State<Api>,
    Extension(guards): Extension<Arc<Guards>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let limit = q.limit(&guards);
    let fetched = app
        .host()
        .storage
        .dead_letter_page(q.after.as_deref(), limit + 1)
        .await?;
    page(fetched, limit, guards.max_page_bytes)
}

async fn quarantine(
    State(app): State<Api>,
    Extension(guards): Extension<Arc<Guards>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q?;
    let limit = q.limit(&guards);
    let fetched = app
        .host()
        .storage
        .quarantine_page(q.after.as_deref(), limit + 1)
        .await?;
    page(fetched, limit, guards.max_page_bytes)
}

/// Serve `router` on `listen` until `shutdown` resolves.
pub async fn serve(
    app: Api,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn items(sizes: &[usize]) -> Vec<Paged<String>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, n)| Paged {
                cursor: format!("c{i}"),
                item: "x".repeat(*n),
            })
            .collect()
    }

    async fn body(r: ApiResult<Response>) -> Value {
        let b = axum::body::to_bytes(r.expect("a page").into_body(), usize::MAX)
            .await
            .expect("body");
        serde_json::from_slice(&b).expect("JSON")
    }

    #[tokio::test]
    async fn a_page_ends_at_the_item_limit_or_the_byte_budget() {
        // Fewer than the limit: the last page.
        let v = body(page(items(&[1, 1]), 3, 1000)).await;
        assert_eq!(v["count"], 2);
        assert!(v["next"].is_null(), "{v}");
        // One more than the limit was read: there is a next page.
        let v = body(page(items(&[1, 1, 1, 1]), 3, 1000)).await;
        assert_eq!(v["count"], 3);
        assert_eq!(v["next"], "c2");
        // The byte budget: 100-byte items, 250 bytes.
        let v = body(page(items(&[100, 100, 100]), 10, 250)).await;
        assert_eq!(v["count"], 2, "{v}");
        assert_eq!(v["next"], "c1");
        // An item over the budget on its own still moves the listing on.
        let v = body(page(items(&[500, 1]), 10, 250)).await;
        assert_eq!(v["count"], 1);
        assert_eq!(v["next"], "c0");
        // Nothing at all.
        let v = body(page(items(&[]), 10, 250)).await;
        assert_eq!(v, json!({"items": [], "count": 0, "next": null}));
    }
}

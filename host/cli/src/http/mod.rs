//! The HTTP API: the query routes and the admin routes, over one shared
//! [`state::Api`]. Handlers only translate (parse the request, call the
//! engine, write its typed answer as JSON); what a query may cost is
//! bounded: listings are paged by cursor with a cap on items and bytes per
//! page, at most `http.max_concurrent_queries` query requests run at once
//! (the rest wait), and `?at=` replays are limited in number (429 beyond)
//! and in time (503 beyond), so that readers cannot take the memory or the
//! cores ingest needs.
//!
//! Every route is registered with its OpenAPI description
//! (`utoipa_axum::routes!` over the handlers' `#[utoipa::path]`), so the
//! document served at `/v1/openapi.json` ([`openapi`]) is the router's own.
//!
//! Modules depend one way: this one on the handlers ([`query`],
//! [`admin`]) and [`openapi`], the handlers on [`auth`], [`guards`],
//! [`state`], [`error`] and [`types`].

pub mod admin;
pub mod auth;
pub mod console;
pub mod error;
pub mod guards;
pub mod openapi;
pub mod query;
pub mod state;
pub mod types;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware;
use axum::routing::get;
use utoipa::OpenApi as _;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt as _};
use utoipa_axum::routes;

use crate::http::error::ApiError;
use crate::http::state::Api;

/// Every described route over `api`: the query routes, the admin routes,
/// health and metrics, with their OpenAPI description.
fn described(api: &Api) -> OpenApiRouter<Api> {
    // `route_layer`: the checks run only for these routes, so an unknown
    // path is a 404 whatever the credentials. The token is checked before
    // a query slot is taken (the later layer runs first).
    let queries = OpenApiRouter::new()
        .routes(routes!(query::partitions))
        .routes(routes!(query::entities))
        .routes(routes!(query::entity))
        .routes(routes!(query::entity_events))
        .routes(routes!(query::projection_documents))
        .routes(routes!(query::projection))
        .routes(routes!(query::dead_letters))
        .routes(routes!(query::quarantine))
        .route_layer(middleware::from_fn_with_state(
            api.guards.clone(),
            guards::limit_queries,
        ))
        .route_layer(middleware::from_fn_with_state(
            api.clone(),
            auth::require_read_token,
        ));
    // The change feed's long polls wait for commits: they hold no query
    // slot, or a few listeners would starve every other reader.
    let feed = OpenApiRouter::new()
        .routes(routes!(query::changes))
        .route_layer(middleware::from_fn_with_state(
            api.clone(),
            auth::require_read_token,
        ));
    // The upload takes components up to `plugins.max_upload_bytes` rather
    // than axum's default of 2 MiB; `upload` answers past it.
    let max_upload = DefaultBodyLimit::max(api.host().config.plugins.max_upload_bytes);
    let admin = OpenApiRouter::new()
        .routes(routes!(admin::limits))
        .routes(routes!(admin::list_all))
        .routes(routes!(admin::upload).layer(max_upload))
        .routes(routes!(admin::list_type))
        .routes(routes!(admin::versions))
        .routes(routes!(admin::activations))
        .routes(routes!(admin::activate))
        .routes(routes!(admin::rollback))
        .routes(routes!(admin::rebuilds))
        .routes(routes!(admin::rebuild))
        .routes(routes!(admin::retry))
        .routes(routes!(admin::fixture))
        .routes(routes!(admin::resubmit))
        // `route_layer`: only these routes need the token; an unknown path
        // is a 404 for anyone.
        .route_layer(middleware::from_fn_with_state(
            api.clone(),
            auth::require_admin_token,
        ));
    OpenApiRouter::with_openapi(openapi::Base::openapi())
        .routes(routes!(query::healthz))
        .routes(routes!(query::metrics))
        .merge(queries)
        .merge(feed)
        .merge(admin)
}

/// The OpenAPI document of every route [`router`] serves under `/v1` and
/// of health and metrics.
pub fn document(api: &Api) -> utoipa::openapi::OpenApi {
    openapi::finish(described(api).into_openapi())
}

/// Every route: the described ones, the OpenAPI document, the console, and a JSON 404
/// (or 405) for anything else.
pub fn router(api: Api) -> Router {
    let (routes, doc) = described(&api).split_for_parts();
    // Serialised once: the document does not change while the host runs.
    let doc: Arc<str> = match serde_json::to_string(&openapi::finish(doc)) {
        Ok(s) => s.into(),
        Err(e) => format!("{{\"error\":\"internal\",\"message\":\"{e}\"}}").into(),
    };
    routes
        .route(
            openapi::PATH,
            get(move || {
                let doc = doc.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        doc.to_string(),
                    )
                }
            }),
        )
        .merge(console::routes())
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .with_state(api)
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

/// Serve [`router`] on `listen` until `shutdown` resolves; the address it
/// bound.
pub async fn serve(
    api: Api,
    listen: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding the HTTP API to {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let router = router(api);
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

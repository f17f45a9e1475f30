//! The HTTP API: the query routes and the admin routes, over one shared
//! [`state::Api`]. Handlers only translate (parse the request, call the
//! engine, write its typed answer as JSON); what a query may cost is
//! bounded: listings are paged by cursor with a cap on items and bytes per
//! page, at most `http.max_concurrent_queries` query requests run at once
//! (the rest wait), and `?at=` replays are limited in number (429 beyond)
//! and in time (503 beyond), so that readers cannot take the memory or the
//! cores ingest needs.
//!
//! Modules depend one way: this one on the handlers ([`query`],
//! [`admin`]), the handlers on [`auth`], [`guards`], [`state`], [`error`]
//! and [`types`].

pub mod admin;
pub mod auth;
pub mod error;
pub mod guards;
pub mod query;
pub mod state;
pub mod types;

#[cfg(test)]
mod tests;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode, Uri};
use axum::middleware;
use axum::routing::{get, post, put};

use crate::http::error::ApiError;
use crate::http::state::Api;

/// Every route: the query routes, the admin routes, and a JSON 404 (or
/// 405) for anything else.
pub fn router(api: Api) -> Router {
    // `route_layer`: the checks run only for these routes, so an unknown
    // path is a 404 whatever the credentials. The token is checked before
    // a query slot is taken (the later layer runs first).
    let queries = Router::new()
        .route("/v1/entities/{entity_type}", get(query::entities))
        .route("/v1/entities/{entity_type}/{entity_id}", get(query::entity))
        .route(
            "/v1/entities/{entity_type}/{entity_id}/events",
            get(query::entity_events),
        )
        .route("/v1/projections/{name}", get(query::projection_documents))
        .route("/v1/projections/{name}/{key}", get(query::projection))
        .route("/v1/dead-letters", get(query::dead_letters))
        .route("/v1/quarantine", get(query::quarantine))
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
    let feed = Router::new()
        .route("/v1/changes", get(query::changes))
        .route_layer(middleware::from_fn_with_state(
            api.clone(),
            auth::require_read_token,
        ));
    // The upload takes components up to `plugins.max_upload_bytes` rather
    // than axum's default of 2 MiB; `upload` answers past it.
    let max_upload = DefaultBodyLimit::max(api.host().config.plugins.max_upload_bytes);
    let admin = Router::new()
        .route("/v1/admin/limits", get(admin::limits))
        .route("/v1/plugins", get(admin::list_all))
        .route(
            "/v1/plugins/{entity_type}",
            put(admin::upload).layer(max_upload).get(admin::list_type),
        )
        .route("/v1/plugins/{entity_type}/versions", get(admin::versions))
        .route("/v1/plugins/{entity_type}/activate", post(admin::activate))
        .route("/v1/plugins/{entity_type}/rollback", post(admin::rollback))
        .route("/v1/rebuilds", get(admin::rebuilds))
        .route("/v1/rebuilds/{id}", get(admin::rebuild))
        .route(
            "/v1/quarantine/{entity_type}/{entity_id}/retry",
            post(admin::retry),
        )
        .route(
            "/v1/quarantine/{entity_type}/{entity_id}/fixture",
            get(admin::fixture),
        )
        .route("/v1/dead-letters/{id}/resubmit", post(admin::resubmit))
        // `route_layer`: only these routes need the token; an unknown path
        // is a 404 for anyone.
        .route_layer(middleware::from_fn_with_state(
            api.clone(),
            auth::require_admin_token,
        ));
    Router::new()
        .route("/healthz", get(query::healthz))
        .route("/metrics", get(query::metrics))
        .merge(queries)
        .merge(feed)
        .merge(admin)
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

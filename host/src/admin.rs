//! The admin API: plugin upload, versions, activation, rollback, rebuilds,
//! quarantine retry and dead-letter re-submission.

use axum::Router;

use crate::app::App;

/// The admin routes.
pub fn router(_app: App) -> Router<App> {
    Router::new()
}

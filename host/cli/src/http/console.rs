//! The operator console: a page served by the host at `/ui/` over the
//! host's own `/v1` API. Its three assets are compiled into the binary, so
//! it works offline and needs no build step; the page fetches nothing from
//! anywhere else, which the Content-Security-Policy also enforces.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// Where the console lives.
pub const PATH: &str = "/ui/";

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// Only this origin, no inline script or style, no framing: data from the
/// API is written as text, and the policy is the second line of defence.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data: blob:; form-action 'none'; \
     frame-ancestors 'none'; base-uri 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // The assets change with the binary: revalidate on each load.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `/` and `/ui` lead to the console; `/ui/` and its two assets.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to(PATH) }))
        .route("/ui", get(|| async { Redirect::to(PATH) }))
        .route(
            PATH,
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/ui/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ui/console.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

#[cfg(test)]
mod tests {
    /// Every asset the page names is one the host serves, and nothing is
    /// loaded from elsewhere.
    #[test]
    fn the_page_loads_only_its_own_assets() {
        for link in ["/ui/console.js", "/ui/console.css"] {
            assert!(super::INDEX.contains(link), "{link}");
        }
        for text in [super::INDEX, super::SCRIPT, super::STYLE] {
            assert!(!text.contains("http://") || text.contains("http://www.w3.org/2000/svg"));
            assert!(!text.contains("https://"));
            assert!(!text.contains("innerHTML"), "data is set as text only");
        }
    }
}

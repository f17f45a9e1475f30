//! Bearer tokens: the read token of the query routes and the admin token
//! of the admin routes, compared in constant time.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::http::error::ApiError;
use crate::http::state::Api;

/// The bearer token of a request, if it carries one.
pub fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Compare without an early exit, so timing does not reveal the prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A configured token: unset and empty are both none.
fn configured(t: &Option<String>) -> Option<&str> {
    t.as_deref().filter(|t| !t.is_empty())
}

/// With `http.read_token` set, a query needs it (or the admin token).
pub async fn require_read_token(
    State(api): State<Api>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(read) = configured(&api.http.read_token) else {
        return Ok(next.run(req).await);
    };
    let admin = configured(&api.admin.token);
    let eq = constant_time_eq;
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

/// Every admin route needs `admin.token`; without one configured the admin
/// API refuses everything, unless `admin.disable_auth` is set explicitly.
pub async fn require_admin_token(
    State(api): State<Api>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if api.admin.disable_auth {
        return Ok(next.run(req).await);
    }
    let Some(token) = configured(&api.admin.token) else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "the admin API is disabled: set admin.token (or admin.disable_auth = true)".into(),
        ));
    };
    match bearer(&req) {
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

#[cfg(test)]
mod tests {
    #[test]
    fn token_comparison() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"abcd"));
        assert!(!super::constant_time_eq(b"", b"a"));
    }
}

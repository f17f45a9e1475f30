//! The one error type of the HTTP layer, and how each typed error of the
//! engine and the store becomes a status.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::http::types::ErrorBody;
use refold_engine::manager::InstallError;
use refold_engine::query::QueryError;
use refold_store::StoreError;

/// An API error: a status and a message, rendered as
/// `{"error": "<code>", "message": "..."}` with the code named after the
/// status (`not_found`, `too_large`, ...). A 429 carries `Retry-After`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

/// The machine-readable code of an error status.
pub fn error_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::CONFLICT => "conflict",
        StatusCode::GONE => "gone",
        StatusCode::NOT_IMPLEMENTED => "not_implemented",
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
        let body = Json(ErrorBody {
            error: error_code(self.0).to_string(),
            message: self.1,
        });
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
    /// An untyped failure is ours (typed ones arrive as `StoreError`,
    /// `QueryError` or `InstallError` and are answered by kind).
    fn from(e: anyhow::Error) -> Self {
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
            StoreError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            StoreError::Corrupt(_) | StoreError::Other(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        let e = match e {
            QueryError::Store(s) => return ApiError::from(s),
            QueryError::Internal(a) => return ApiError::from(a),
            e => e,
        };
        // The limits are named by the settings that set them.
        let status = match &e {
            QueryError::NotFound(_) => StatusCode::NOT_FOUND,
            QueryError::Busy { running } => {
                return ApiError(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "{running} ?at= replays are running (http.max_concurrent_replays); retry later"
                    ),
                );
            }
            QueryError::OverBudget { key, budget_ms } => {
                return ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "replaying {key} took longer than its budget of {budget_ms} ms (http.replay_timeout_ms)"
                    ),
                );
            }
            QueryError::Unfoldable { .. } => StatusCode::CONFLICT,
            // Whatever the store said, the record could not be placed in
            // its generation this time: worth a retry.
            QueryError::Generation(_) => StatusCode::SERVICE_UNAVAILABLE,
            QueryError::Store(_) | QueryError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<InstallError> for ApiError {
    fn from(e: InstallError) -> Self {
        let e = match e {
            InstallError::Store(s) => return ApiError::from(s),
            e => e,
        };
        let status = match &e {
            InstallError::Invalid(_)
            | InstallError::WrongEntityType { .. }
            | InstallError::SampleFold(_) => StatusCode::UNPROCESSABLE_ENTITY,
            InstallError::NotFound(_) => StatusCode::NOT_FOUND,
            InstallError::Conflict(_) => StatusCode::CONFLICT,
            InstallError::Store(_) | InstallError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, e.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_by_kind() {
        let cases = [
            (
                StoreError::Unavailable("down".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (StoreError::NotFound("gone".into()), StatusCode::NOT_FOUND),
            (StoreError::Fenced("taken".into()), StatusCode::CONFLICT),
            (
                StoreError::Corrupt("rot".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (e, status) in cases {
            let text = e.to_string();
            let ApiError(s, m) = ApiError::from(e);
            assert_eq!(s, status, "{text}");
            assert_eq!(m, text);
        }
    }

    #[test]
    fn query_errors_map_by_kind() {
        let busy = ApiError::from(QueryError::Busy { running: 2 });
        assert_eq!(busy.0, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            busy.1,
            "2 ?at= replays are running (http.max_concurrent_replays); retry later"
        );
        let r = busy.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], RETRY_AFTER_SECONDS);
        let slow = ApiError::from(QueryError::OverBudget {
            key: refold_types::EntityKey::new("account", "acc-1"),
            budget_ms: 5,
        });
        assert_eq!(slow.0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            slow.1,
            "replaying account/acc-1 took longer than its budget of 5 ms (http.replay_timeout_ms)"
        );
        let outage = ApiError::from(QueryError::Store(StoreError::Unavailable("down".into())));
        assert_eq!(outage.0, StatusCode::SERVICE_UNAVAILABLE);
        let generation = ApiError::from(QueryError::Generation(StoreError::Other(
            anyhow::anyhow!("x"),
        )));
        assert_eq!(generation.0, StatusCode::SERVICE_UNAVAILABLE);
    }
}

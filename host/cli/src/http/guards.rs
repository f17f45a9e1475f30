//! What bounds the cost of queries besides replays (which the engine's
//! [`refold_engine::query::Queries`] bounds): how many query requests run
//! at once, and how large one page of a listing is.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::config::HttpConfig;
use crate::http::error::{ApiError, ApiResult};
use refold_store::Paged;

/// The query guards of a server, shared by every request.
#[derive(Debug)]
pub struct Guards {
    /// Query requests running at once.
    queries: Arc<Semaphore>,
    /// Change-feed requests (long polls included) open at once.
    pub change_polls: Arc<Semaphore>,
    /// Its size, for the answer past it.
    pub max_change_polls: usize,
    /// Items per listing page at most.
    pub max_page_items: usize,
    /// Bytes of items per listing page at most.
    pub max_page_bytes: usize,
}

impl Guards {
    /// The guards `[http]` sets. A limit of 0 would refuse (or hang)
    /// everything; 1 is the least.
    pub fn new(c: &HttpConfig) -> Self {
        Guards {
            queries: Arc::new(Semaphore::new(c.max_concurrent_queries.max(1))),
            change_polls: Arc::new(Semaphore::new(c.max_change_polls.max(1))),
            max_change_polls: c.max_change_polls.max(1),
            max_page_items: c.max_page_items.max(1),
            max_page_bytes: c.max_page_bytes.max(1),
        }
    }
}

/// At most `http.max_concurrent_queries` queries run at once; the others
/// wait for a slot (waiting costs a task, not a core).
pub async fn limit_queries(
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

/// The paging parameters of a listing.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// The `next` of the previous page.
    pub after: Option<String>,
    /// Items wanted, capped to `http.max_page_items`.
    pub limit: Option<usize>,
}

impl ListQuery {
    /// Items of the page: as asked, within 1..=`http.max_page_items`.
    pub fn limit(&self, guards: &Guards) -> usize {
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
/// last page. Written item by item rather than as one `Value`, so that a
/// page is never held twice.
pub fn page<T: Serialize>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

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

    #[test]
    fn the_limit_is_capped_and_at_least_one() {
        let g = Guards::new(&HttpConfig {
            max_page_items: 5,
            ..HttpConfig::default()
        });
        let q = |limit| ListQuery { after: None, limit };
        assert_eq!(q(None).limit(&g), 5);
        assert_eq!(q(Some(0)).limit(&g), 1);
        assert_eq!(q(Some(3)).limit(&g), 3);
        assert_eq!(q(Some(50)).limit(&g), 5);
    }
}

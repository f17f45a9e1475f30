//! The OpenAPI 3.1 document of the HTTP API. The paths come from the
//! handlers' `#[utoipa::path]` attributes as the router registers them
//! (`utoipa_axum::routes!`), so a route is described exactly when it is
//! served; the types are the answers' own (`utoipa::ToSchema`).

use utoipa::Modify;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};

/// Where the document is served (described in it too).
pub const PATH: &str = "/v1/openapi.json";

/// What the document says before the routes are added.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "refold",
        description = "The HTTP API of a refold host: entity states now and at a past position, \
                       read-model documents, dead letters, quarantine, the change feed, and the \
                       plugin lifecycle (upload, activate, roll back, rebuild). Listings are paged \
                       by cursor and capped at `http.max_page_items` items and \
                       `http.max_page_bytes` bytes per page."
    ),
    modifiers(&Tokens),
    tags(
        (name = "query", description = "Reads; they need the read token when `http.read_token` is set (the admin token also works)."),
        (name = "admin", description = "The plugin lifecycle and repairs; they need the admin token."),
        (name = "health", description = "Health and metrics; never a token."),
    )
)]
pub struct Base;

/// The two bearer tokens, and which operations take them.
struct Tokens;

impl Modify for Tokens {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for name in ["admin_token", "read_token"] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        }
    }
}

/// The document as served: the described routes, the read token (optional)
/// on every query operation, and the document's own path.
pub fn finish(mut doc: OpenApi) -> OpenApi {
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            let query = op
                .tags
                .as_ref()
                .is_some_and(|t| t.iter().any(|t| t == "query"));
            if query && op.security.is_none() {
                // No requirement, or the read token: whether it is needed
                // depends on the host's configuration.
                op.security = Some(vec![
                    SecurityRequirement::default(),
                    SecurityRequirement::new("read_token", Vec::<String>::new()),
                ]);
            }
        }
    }
    let (_, self_path) = utoipa::openapi::path::PathsBuilder::new()
        .path(
            PATH,
            utoipa::openapi::path::PathItem::new(
                utoipa::openapi::HttpMethod::Get,
                utoipa::openapi::path::OperationBuilder::new()
                    .tag("health")
                    .summary(Some("This document"))
                    .response(
                        "200",
                        utoipa::openapi::ResponseBuilder::new()
                            .description("the OpenAPI 3.1 document of this API"),
                    ),
            ),
        )
        .build()
        .paths
        .pop_first()
        .expect("one path was added");
    doc.paths.paths.insert(PATH.to_string(), self_path);
    doc
}

//! What the HTTP handlers share: the assembled host, its query operations,
//! the query guards, and the `[http]` and `[admin]` settings, which only
//! the HTTP layer reads.

use std::sync::Arc;

use refold_engine::app::App;
use refold_engine::host::Host;
use refold_engine::manager::PluginManager;
use refold_engine::query::{Queries, QueryLimits};

use crate::config::{AdminConfig, Config, HttpConfig};
use crate::http::guards::Guards;

/// The router's state. Cloning is cheap.
#[derive(Clone)]
pub struct Api {
    /// The host.
    pub app: App,
    /// Its read-only queries, with the replay slots of this server.
    pub queries: Queries,
    /// Query concurrency and page limits.
    pub guards: Arc<Guards>,
    /// `[http]`.
    pub http: Arc<HttpConfig>,
    /// `[admin]`.
    pub admin: Arc<AdminConfig>,
}

impl Api {
    /// The state of a router over `app` under `config`'s `[http]` and
    /// `[admin]` sections.
    pub fn new(app: App, config: &Config) -> Self {
        Api::with(app, config.http.clone(), config.admin.clone())
    }

    /// The state of a router over `app` under these sections.
    pub fn with(app: App, http: HttpConfig, admin: AdminConfig) -> Self {
        let queries = Queries::new(
            &app,
            QueryLimits {
                replay_timeout_ms: http.replay_timeout_ms,
                max_concurrent_replays: http.max_concurrent_replays,
            },
        );
        Api {
            guards: Arc::new(Guards::new(&http)),
            queries,
            app,
            http: Arc::new(http),
            admin: Arc::new(admin),
        }
    }

    /// The host's core.
    pub fn host(&self) -> &Host {
        &self.app.host
    }

    /// The host's plugin manager.
    pub fn plugins(&self) -> &PluginManager {
        &self.app.plugins
    }
}

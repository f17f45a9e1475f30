//! What the HTTP handlers share: the assembled host and the `[http]` and
//! `[admin]` settings, which only the HTTP layer reads.

use std::sync::Arc;

use refold_engine::app::App;
use refold_engine::host::Host;
use refold_engine::manager::PluginManager;

use crate::config::{AdminConfig, Config, HttpConfig};

/// The router's state. Cloning is cheap.
#[derive(Clone)]
pub struct Api {
    /// The host.
    pub app: App,
    /// `[http]`.
    pub http: Arc<HttpConfig>,
    /// `[admin]`.
    pub admin: Arc<AdminConfig>,
}

impl Api {
    /// The state of a router over `app` under `config`'s `[http]` and
    /// `[admin]` sections.
    pub fn new(app: App, config: &Config) -> Self {
        Api {
            app,
            http: Arc::new(config.http.clone()),
            admin: Arc::new(config.admin.clone()),
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

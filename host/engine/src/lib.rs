//! The assembled refold host: storage, registry, metrics and health
//! ([`host`]), the consume loop ([`app`]), one batch end to end
//! ([`pipeline`]), generations, the plugin manager ([`manager`]), repair and
//! query operations. Knows no HTTP and no JSON bodies: its operations return
//! typed, serializable results that the command line's HTTP layer
//! translates.

pub mod app;
pub mod changes;
pub mod config;
pub mod generation;
pub mod health;
pub mod host;
pub mod manager;
pub mod metrics;
pub mod pipeline;
pub mod query;
pub mod registry;
pub mod snapshot;
pub mod trend;

pub use app::App;
pub use config::HostConfig;
pub use host::Host;

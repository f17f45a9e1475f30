//! The plugin runtime: engine, limits, compiled plugins and sandboxes.

pub mod batch;
pub mod engine;
pub mod host_state;
pub mod limits;
pub mod plugin;
pub mod sandbox;

pub use engine::Engine;
pub use limits::Limits;
pub use plugin::{LoadError, Plugin, PluginInfo, digest_of};
pub use sandbox::{CallError, Sandbox, TrapKind};

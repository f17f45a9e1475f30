//! The plugin runtime: the WIT bindings, the one wasmtime engine and linker,
//! limits, compiled plugins, sandboxes, batch encoding, and the fold and
//! project calls. Knows nothing of stores or sources: it takes events as
//! [`refold_types::StoredEvent`] and returns states and
//! [`refold_types::ProjectionWrite`]s.

pub mod batch;
pub mod bindings;
pub mod compile_cache;
pub mod engine;
pub mod fold;
pub mod host_state;
pub mod limits;
pub mod plugin;
pub mod sandbox;
pub mod trap;

pub use bindings::WORLD;
pub use compile_cache::CompileCache;
pub use engine::Engine;
pub use limits::Limits;
pub use plugin::{LoadError, Plugin, PluginInfo};
pub use refold_types::digest_of;
pub use sandbox::{CallStats, Sandbox};
pub use trap::{CallError, TrapKind};

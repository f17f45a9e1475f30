//! refold: a WebAssembly-pluggable projection engine for event sourcing.
//!
//! See `ARCHITECTURE.md` at the repository root for the map.

pub mod admin;
pub mod api;
pub mod app;
pub mod bindings;
pub mod cli;
pub mod config;
pub mod event;
pub mod fold;
pub mod generation;
pub mod lifecycle;
pub mod metrics;
pub mod pipeline;
pub mod registry;
pub mod reload;
pub mod runtime;
pub mod snapshot;
pub mod source;
pub mod store;

//! refold: a WebAssembly-pluggable projection engine for event sourcing.
//! This crate is the `refold` command: the command line, the configuration
//! that gathers each crate's own section, and the HTTP layer (the only part
//! of the host that knows HTTP and JSON bodies).
//!
//! See `ARCHITECTURE.md` at the repository root for the map.

pub mod change_topic;
pub mod cli;
pub mod config;
pub mod http;
pub mod sinks;

//! The one place where the WIT world is turned into Rust types.
//!
//! Everything else in the host goes through the re-exports below, so a change
//! of the contract (or of wasmtime's bindgen) is felt in one file.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "projector",
});

pub use self::refold::plugin::log::Level as LogLevel;
pub use self::refold::plugin::types::{Document, EventHeader, Span};

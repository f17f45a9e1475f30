//! Log lines through the host, which tags them with the plugin's name and
//! version. This is the only capability a plugin gets.
//!
//! ```
//! refold_sdk::log::info("folding a batch");
//! ```
//!
//! Outside WebAssembly (in a plugin's native unit tests) the lines go to
//! stderr instead.

use crate::bindings::refold::plugin::log::{Level, log};

fn write(level: Level, message: &str) {
    if cfg!(target_arch = "wasm32") {
        log(level, message);
    } else {
        eprintln!("[{level:?}] {message}");
    }
}

/// Log at level `trace`.
pub fn trace(message: &str) {
    write(Level::Trace, message);
}

/// Log at level `debug`.
pub fn debug(message: &str) {
    write(Level::Debug, message);
}

/// Log at level `info`.
pub fn info(message: &str) {
    write(Level::Info, message);
}

/// Log at level `warn`.
pub fn warn(message: &str) {
    write(Level::Warn, message);
}

/// Log at level `error`.
pub fn error(message: &str) {
    write(Level::Error, message);
}

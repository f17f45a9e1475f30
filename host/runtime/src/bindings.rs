//! The one place where the WIT world is turned into Rust types.
//!
//! Everything else in the host goes through the re-exports below, so a change
//! of the contract (or of wasmtime's bindgen) is felt in one file.

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "projector",
});

pub use self::refold::plugin::log::Level as LogLevel;
pub use self::refold::plugin::types::{Document, EventHeader, Span};

/// The world a plugin component must implement, as `refold inspect` names it.
/// Kept beside the `bindgen!` it must agree with (`wit/plugin.wit`).
pub const WORLD: &str = "refold:plugin/projector@0.2.0";

#[cfg(test)]
mod tests {
    #[test]
    fn the_world_constant_names_the_wit_package() {
        let wit = include_str!("../../../wit/plugin.wit");
        let (package, version) = super::WORLD
            .split_once('/')
            .and_then(|(p, rest)| rest.split_once('@').map(|(_, v)| (p, v)))
            .unwrap();
        assert!(
            wit.contains(&format!("package {package}@{version};")),
            "wit/plugin.wit does not declare {}",
            super::WORLD
        );
        assert!(wit.contains("world projector"));
    }
}

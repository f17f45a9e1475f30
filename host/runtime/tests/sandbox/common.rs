//! Shared helpers: the guest components, events and limits.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use refold_runtime::{Engine, Limits, Plugin, Sandbox};
use refold_types::{EntityKey, RawJson, StoredEvent};
use serde_json::Value;

/// The directory `plugins/build.sh` writes the guest components to.
fn components_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../plugins/target/components")
}

/// The bytes of the guest component `name` (e.g. `probe`, `probe-fail-all`).
/// A missing component fails the test: these tests exist to run the real
/// guests, so passing without them would prove nothing.
pub fn component(name: &str) -> Vec<u8> {
    let path = components_dir().join(format!("{name}.wasm"));
    match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) => panic!(
            "reading the guest component {}: {e}; build the components first with \
             `bash plugins/build.sh plugins/target/components` (from the repository root)",
            path.display()
        ),
    }
}

/// One engine for the whole test binary: it owns an epoch ticker thread, and
/// compiling is what takes time, not sharing.
pub fn engine() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE
        .get_or_init(|| Engine::new().expect("creating the engine"))
        .clone()
}

/// The probe, compiled once and shared; each test picks its limits with
/// [`Plugin::with_limits`].
pub fn probe() -> Arc<Plugin> {
    static PROBE: OnceLock<Arc<Plugin>> = OnceLock::new();
    PROBE
        .get_or_init(|| load("probe", Limits::default()))
        .clone()
}

/// Load the guest component `name` under `limits`.
pub fn load(name: &str, limits: Limits) -> Arc<Plugin> {
    Plugin::load(&engine(), &component(name), limits)
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

/// A sandbox of the probe under `limits`.
pub fn probe_sandbox(limits: Limits) -> Sandbox {
    Sandbox::new(probe().with_limits(limits))
}

/// A probe event `id` of type `event_type` with `data`, at `position`.
pub fn event(id: &str, position: u64, event_type: &str, data: Value) -> StoredEvent {
    StoredEvent {
        key: EntityKey::new("probe", "p-1"),
        position,
        id: id.into(),
        source: "/tests".into(),
        event_type: event_type.into(),
        time: Some("2025-01-01T00:00:00Z".into()),
        data: RawJson::from_value(&data),
        origin: None,
        record: None,
        digest: None,
    }
}

/// The probe's initial state, as the bytes `init` returns.
pub const PROBE_INIT: &str = r#"{"count":0,"peek":null,"blob":null}"#;

/// `count` of a probe state.
pub fn count(state: &[u8]) -> u64 {
    let v: Value = serde_json::from_slice(state).expect("the probe's state is JSON");
    v["count"].as_u64().expect("the probe's state has a count")
}

/// A probe event that counts, and the check that the sandbox still folds:
/// after a trap, this call runs on a fresh instance (wasmtime refuses to
/// enter an instance that trapped, so success is the proof).
pub fn assert_folds_again(sandbox: &mut Sandbox) {
    let state = sandbox
        .fold(
            "p-1",
            PROBE_INIT.as_bytes(),
            &[event("again", 1, "probe.count", Value::Null)],
        )
        .unwrap_or_else(|e| panic!("the next call should work on a fresh instance: {e}"));
    assert_eq!(count(&state), 1);
}

/// The messages of every `tracing` event emitted on this thread while `f`
/// runs, one a line (a subscriber of a few lines rather than a formatting
/// crate: only the message is looked at).
pub fn guest_log<R>(f: impl FnOnce() -> R) -> (R, String) {
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata};

    struct Lines(Arc<Mutex<String>>);
    struct Message<'a>(&'a mut String);
    impl Visit for Message<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0.push_str(&format!("{value:?}"));
            }
        }
    }
    impl tracing::Subscriber for Lines {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut line = String::new();
            event.record(&mut Message(&mut line));
            if let Ok(mut lines) = self.0.lock() {
                lines.push_str(&line);
                lines.push('\n');
            }
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
    let lines = Arc::new(Mutex::new(String::new()));
    let r = tracing::subscriber::with_default(Lines(lines.clone()), f);
    let text = lines.lock().map(|l| l.clone()).unwrap_or_default();
    (r, text)
}

//! `Plugin::load`: what is no component, what is a component of another
//! world, what `describe()` says, and the world the runtime names.

use refold_runtime::{Limits, LoadError, Plugin, WORLD, digest_of};

use crate::common::*;

fn load_err(bytes: &[u8]) -> LoadError {
    match Plugin::load(&engine(), bytes, Limits::default()) {
        Ok(p) => panic!("expected a load error, loaded {p:?}"),
        Err(e) => e,
    }
}

#[test]
fn bytes_that_are_no_component_are_refused() {
    // A core module (the header alone), and no wasm at all.
    for bytes in [&b"\0asm\x01\0\0\0"[..], b"not wasm at all"] {
        let e = load_err(bytes);
        assert!(matches!(e, LoadError::NotAComponent(_)), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("not a valid WebAssembly component: "),
            "{e}"
        );
    }
}

#[test]
fn a_component_of_another_world_is_refused() {
    let cases = [
        // Exports nothing the world asks for.
        r#"(component
             (core module $m (func (export "hello")))
             (core instance $i (instantiate $m))
             (func (export "hello") (canon lift (core func $i "hello"))))"#,
        // Imports an interface the host does not provide.
        r#"(component
             (import "acme:other/thing@1.0.0" (instance (export "ping" (func))))
             )"#,
        // Exports `describe`, but of another type.
        r#"(component
             (core module $m (func (export "describe") (result i32) (i32.const 7)))
             (core instance $i (instantiate $m))
             (func (export "describe") (result u32) (canon lift (core func $i "describe"))))"#,
    ];
    for wat in cases {
        let e = load_err(wat.as_bytes());
        assert!(matches!(e, LoadError::WrongWorld(_)), "{e:?} for {wat}");
        assert!(
            e.to_string()
                .starts_with("component does not match the refold:plugin/projector world: "),
            "{e}"
        );
    }
}

#[test]
fn a_describe_that_traps_is_a_describe_error() {
    let e = load_err(&component("probe-trap-describe"));
    assert!(matches!(e, LoadError::Describe(_)), "{e:?}");
    assert!(e.to_string().contains("describe exploded"), "{e}");
}

#[test]
fn describe_runs_under_the_limits_it_is_loaded_with() {
    let limits = Limits {
        max_instances: 2,
        ..Limits::default()
    };
    match Plugin::load(&engine(), &component("probe"), limits) {
        Err(LoadError::Describe(message)) => assert!(
            message.contains("in instantiation, limit max_instances = 2"),
            "{message}"
        ),
        other => panic!("expected a describe error, got {other:?}"),
    }
}

#[test]
fn the_probe_describes_itself() {
    let bytes = component("probe");
    let p = Plugin::load(&engine(), &bytes, Limits::default()).unwrap();
    assert_eq!(p.info.name, "probe");
    assert_eq!(p.info.version, "1.0.0");
    assert_eq!(p.info.entity_type, "probe");
    assert_eq!(p.info.state_schema_version, 1);
    assert_eq!(p.info.event_types.len(), 12);
    for t in [
        "probe.count",
        "probe.loop",
        "probe.alloc",
        "probe.ops",
        "probe.grab",
    ] {
        assert!(p.info.event_types.iter().any(|e| e == t), "{t}");
    }
    assert_eq!(p.tag(), "probe@1.0.0");
    assert_eq!(p.digest, digest_of(&bytes));
    assert_eq!(p.size, bytes.len());
    // Other limits, same compiled version.
    let q = p.with_limits(Limits {
        cpu_ms: 5,
        ..Limits::default()
    });
    assert_eq!((q.digest.as_str(), q.limits.cpu_ms), (p.digest.as_str(), 5));
    // The variants differ where they should.
    assert_eq!(
        load("probe-entity-orders", Limits::default())
            .info
            .entity_type,
        "order"
    );
    assert_eq!(
        load("probe-entity-dashed", Limits::default())
            .info
            .entity_type,
        "probe-dashed"
    );
}

#[test]
fn the_bank_describes_itself() {
    let p = load("bank", Limits::default());
    assert_eq!(p.info.name, "bank");
    assert_eq!(p.info.version, "1.0.0");
    assert_eq!(p.info.entity_type, "account");
    assert_eq!(
        p.info.event_types,
        [
            "account.opened",
            "account.deposited",
            "account.withdrawn",
            "account.closed"
        ]
    );
    assert_eq!(p.info.state_schema_version, 1);
    let v2 = load("bank-v2", Limits::default());
    assert_eq!(
        (v2.info.version.as_str(), v2.info.state_schema_version),
        ("2.0.0", 2)
    );
    // The committed example is the same component as the build.
    let example = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bank/bank.wasm"),
    )
    .expect("examples/bank/bank.wasm is committed");
    let e = Plugin::load(&engine(), &example, Limits::default()).unwrap();
    assert_eq!(e.info, p.info);
}

/// `refold inspect` prints `WORLD`; it must be the package and version that
/// a real plugin was built against, which its imports name
/// (`refold:plugin/log@0.2.0`).
#[test]
fn the_world_constant_is_the_one_plugins_import() {
    let (package, rest) = WORLD.split_once('/').unwrap();
    let (world, version) = rest.split_once('@').unwrap();
    assert_eq!(world, "projector");
    let engine = engine();
    let component =
        wasmtime::component::Component::new(engine.wasmtime(), component("probe")).unwrap();
    let imports: Vec<String> = component
        .component_type()
        .imports(engine.wasmtime())
        .map(|(name, _)| name.to_string())
        .collect();
    let log = format!("{package}/log@{version}");
    assert!(imports.contains(&log), "{log} not among {imports:?}");
}

//! One test per sandbox limit: the probe's hostile events under a limit low
//! enough to trip it, the typed outcome, then the next call on the same
//! `Sandbox`, which must work on a fresh instance.

use std::time::{Duration, Instant};

use refold_runtime::{CallError, Limits, TrapKind};
use serde_json::{Value, json};

use crate::common::*;

/// The message of a trap of `kind`, or a failure naming what came instead.
fn trap_message(result: Result<Vec<u8>, CallError>, kind: TrapKind) -> String {
    match result {
        Err(CallError::Trap { kind: k, message }) if k == kind => message,
        other => panic!("expected a {kind:?} trap, got {other:?}"),
    }
}

fn fold_one(
    limits: Limits,
    event_type: &str,
    data: Value,
) -> (refold_runtime::Sandbox, Result<Vec<u8>, CallError>) {
    let mut sandbox = probe_sandbox(limits);
    let r = sandbox.fold(
        "p-1",
        PROBE_INIT.as_bytes(),
        &[event("e1", 1, event_type, data)],
    );
    (sandbox, r)
}

#[test]
fn memory_bytes_refuses_a_memory_bomb() {
    let limits = Limits {
        memory_bytes: 32 << 20,
        ..Limits::default()
    };
    // Within the limit, allocating is legal.
    let (_, ok) = fold_one(limits, "probe.alloc", json!({"mib": 4}));
    assert_eq!(count(&ok.unwrap()), 1);

    let (mut sandbox, r) = fold_one(limits, "probe.alloc", json!({"mib": 200}));
    let message = trap_message(r, TrapKind::Memory);
    assert!(
        message.starts_with("memory limit exceeded in fold: requested ")
            && message.ends_with("bytes of linear memory, limit memory_bytes = 33554432"),
        "{message}"
    );
    assert!(sandbox.stats.peak_memory <= 32 << 20);
    assert_folds_again(&mut sandbox);
}

#[test]
fn memory_bytes_wins_over_the_deadline_when_the_guest_survives_the_refusal() {
    let limits = Limits {
        memory_bytes: 32 << 20,
        cpu_ms: 50,
        ..Limits::default()
    };
    let (mut sandbox, r) = fold_one(limits, "probe.grab", json!({"mib": 200}));
    let message = trap_message(r, TrapKind::Memory);
    assert!(
        message.contains("in fold") && message.contains("limit memory_bytes = 33554432"),
        "{message}"
    );
    assert_folds_again(&mut sandbox);
}

#[test]
fn memory_bytes_below_the_initial_memory_fails_instantiation() {
    let mut sandbox = probe_sandbox(Limits {
        memory_bytes: 64 << 10,
        ..Limits::default()
    });
    let message = trap_message(sandbox.init("p-1"), TrapKind::Memory);
    assert!(
        message.starts_with("memory limit exceeded in instantiation")
            && message.ends_with("limit memory_bytes = 65536"),
        "{message}"
    );
}

#[test]
fn cpu_ms_interrupts_an_infinite_loop() {
    let limits = Limits {
        cpu_ms: 50,
        ..Limits::default()
    };
    // A slow but legal event fits in the budget.
    let (_, ok) = fold_one(limits, "probe.spin", json!({"iterations": 1000}));
    assert_eq!(count(&ok.unwrap()), 1);

    let started = Instant::now();
    let (mut sandbox, r) = fold_one(limits, "probe.loop", json!({}));
    let message = trap_message(r, TrapKind::Deadline);
    assert_eq!(
        message,
        "CPU time limit exceeded in fold, limit cpu_ms = 50"
    );
    // Generous: the machine may be busy, but the loop never ends by itself.
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(sandbox.stats.deadlines, 1);
    assert_folds_again(&mut sandbox);
    assert_eq!(sandbox.stats.deadlines, 1);
}

#[test]
fn a_shared_budget_cuts_the_call_before_cpu_ms() {
    let mut sandbox = probe_sandbox(Limits {
        cpu_ms: 60_000,
        ..Limits::default()
    });
    let started = Instant::now();
    let r = sandbox.fold_within(
        "p-1",
        PROBE_INIT.as_bytes(),
        &[event("e1", 1, "probe.loop", json!({}))],
        Some(Duration::from_millis(50)),
    );
    trap_message(r, TrapKind::Deadline);
    assert!(started.elapsed() < Duration::from_secs(30), "ran to cpu_ms");
    assert_folds_again(&mut sandbox);
}

#[test]
fn cpu_ms_interrupts_a_looping_init() {
    let plugin = load("probe-loop-init", Limits::default()).with_limits(Limits {
        cpu_ms: 50,
        ..Limits::default()
    });
    let mut sandbox = refold_runtime::Sandbox::new(plugin);
    let message = trap_message(sandbox.init("p-1"), TrapKind::Deadline);
    assert_eq!(
        message,
        "CPU time limit exceeded in init, limit cpu_ms = 50"
    );
}

#[test]
fn a_panic_is_a_panic_trap_with_its_message() {
    let (mut sandbox, r) = fold_one(
        Limits::default(),
        "probe.panic",
        json!({"message": "kaboom 42"}),
    );
    let message = trap_message(r, TrapKind::Panic);
    assert!(
        message.starts_with("kaboom 42 (panicked at ") && message.contains("src/lib.rs"),
        "{message}"
    );
    assert_folds_again(&mut sandbox);
}

#[test]
fn a_stack_overflow_is_one_short_line() {
    let (mut sandbox, r) = fold_one(Limits::default(), "probe.recurse", json!({}));
    let message = trap_message(r, TrapKind::Other);
    assert_eq!(message, "stack overflow in fold");
    assert_folds_again(&mut sandbox);
}

#[test]
fn max_state_bytes_refuses_a_large_state_from_fold() {
    let limits = Limits {
        max_state_bytes: 65_536,
        ..Limits::default()
    };
    let (_, ok) = fold_one(limits, "probe.big", json!({"bytes": 1000}));
    assert!(ok.unwrap().len() < 65_536);

    let (mut sandbox, r) = fold_one(limits, "probe.big", json!({"bytes": 100_000}));
    match r {
        Err(e @ CallError::Output { .. }) => {
            let CallError::Output {
                limit, size, max, ..
            } = &e
            else {
                unreachable!()
            };
            assert_eq!(*limit, "max_state_bytes");
            assert_eq!(*max, 65_536);
            assert!(*size > 100_000);
            assert_eq!(
                e.to_string(),
                format!("fold returned a state of {size} bytes, limit max_state_bytes = 65536")
            );
        }
        other => panic!("expected an output error, got {other:?}"),
    }
    assert_folds_again(&mut sandbox);
}

#[test]
fn max_state_bytes_refuses_a_large_initial_state() {
    let mut sandbox = probe_sandbox(Limits {
        max_state_bytes: 10,
        ..Limits::default()
    });
    let e = sandbox.init("p-1").unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "init returned a state of {} bytes, limit max_state_bytes = 10",
            PROBE_INIT.len()
        )
    );
    assert!(matches!(
        e,
        CallError::Output {
            limit: "max_state_bytes",
            ..
        }
    ));
}

/// `project` of one `probe.ops` event asking for `n` upserts.
fn project_ops(limits: Limits, n: u64) -> (refold_runtime::Sandbox, Result<usize, CallError>) {
    let mut sandbox = probe_sandbox(limits);
    let events = [event("o1", 1, "probe.ops", json!({"n": n}))];
    let after = sandbox.fold("p-1", PROBE_INIT.as_bytes(), &events).unwrap();
    let r = sandbox
        .project("p-1", PROBE_INIT.as_bytes(), &after, &events)
        .map(|ops| ops.len());
    (sandbox, r)
}

#[test]
fn max_projection_ops_refuses_too_many_ops() {
    let limits = Limits {
        max_projection_ops: 100,
        ..Limits::default()
    };
    assert_eq!(project_ops(limits, 100).1.unwrap(), 100);
    let (mut sandbox, r) = project_ops(limits, 200);
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            CallError::Output {
                limit: "max_projection_ops",
                size: 200,
                max: 100,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "project returned 200 ops, limit max_projection_ops = 100"
    );
    assert_folds_again(&mut sandbox);
}

#[test]
fn max_projection_bytes_weighs_the_ops_the_host_holds() {
    // Ten ops of 3 bytes ("p", a one-digit key, "1") fit exactly; an eleventh
    // does not, though the lifting fuel (charged at less per op) lets it in.
    let max = 10 * (3 + refold_runtime::sandbox::PROJECTION_OP_OVERHEAD);
    let limits = Limits {
        max_projection_bytes: max,
        ..Limits::default()
    };
    assert_eq!(project_ops(limits, 10).1.unwrap(), 10);
    let (mut sandbox, r) = project_ops(limits, 11);
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            CallError::Output {
                limit: "max_projection_bytes",
                ..
            }
        ),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.starts_with("project returned ")
            && text.ends_with(&format!("limit max_projection_bytes = {max}")),
        "{text}"
    );
    assert_folds_again(&mut sandbox);
}

#[test]
fn max_projection_bytes_refuses_a_huge_result_before_copying_it() {
    let limits = Limits {
        max_projection_bytes: 65_536,
        max_projection_ops: 1_000_000,
        ..Limits::default()
    };
    let (mut sandbox, r) = project_ops(limits, 100_000);
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            CallError::Output {
                limit: "max_projection_bytes",
                size: 65_536,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "project returned more than 65536 bytes of projection output as the host holds it (counted before copying), limit max_projection_bytes = 65536"
    );
    // Lifting ran out of fuel inside the instance: it was discarded.
    assert_folds_again(&mut sandbox);
}

#[test]
fn max_log_lines_per_call_cuts_a_flood_and_counts_it() {
    let limits = Limits {
        max_log_lines_per_call: 100,
        ..Limits::default()
    };
    let ((sandbox, r), log) = guest_log(|| fold_one(limits, "probe.flood", json!({"lines": 500})));
    r.unwrap();
    assert_eq!(sandbox.stats.log_lines_dropped, 400);
    assert_eq!(
        log.lines().filter(|l| l.starts_with("flood line")).count(),
        100
    );
    assert!(
        log.contains("log truncated: 400 lines dropped in fold (limit max_log_lines_per_call = 100, max_log_bytes_per_call = 65536)"),
        "{log}"
    );
}

#[test]
fn max_log_bytes_per_call_cuts_a_flood_and_counts_it() {
    let limits = Limits {
        max_log_bytes_per_call: 200,
        ..Limits::default()
    };
    // "flood line 0 of 100" is 19 bytes: ten fit in 200, the rest (20 bytes
    // and more) are dropped.
    let ((sandbox, r), log) = guest_log(|| fold_one(limits, "probe.flood", json!({"lines": 100})));
    r.unwrap();
    assert_eq!(sandbox.stats.log_lines_dropped, 90);
    assert_eq!(
        log.lines().filter(|l| l.starts_with("flood line")).count(),
        10
    );
    assert!(
        log.contains("log truncated: 90 lines dropped in fold (limit max_log_lines_per_call = 100, max_log_bytes_per_call = 200)"),
        "{log}"
    );
}

#[test]
fn max_log_bytes_makes_guest_writes_fail_past_the_pipe() {
    let limits = Limits {
        max_log_bytes: 4096,
        ..Limits::default()
    };
    // Within the pipe, stdout and stderr reach the log.
    let ((_, ok), log) =
        guest_log(|| fold_one(limits, "probe.log", json!({"message": "hello-from-guest"})));
    ok.unwrap();
    assert_eq!(log.matches("hello-from-guest").count(), 3, "{log}");
    // Past it, the guest's write fails: Rust's `println!` panics.
    let (mut sandbox, r) = fold_one(limits, "probe.log", json!({"message": "x".repeat(5000)}));
    let message = trap_message(r, TrapKind::Panic);
    assert!(message.contains("failed printing to stdout"), "{message}");
    assert_folds_again(&mut sandbox);
}

/// The probe under `limits` cannot even be instantiated: the first call says
/// so, naming the limit key, and so does every later one.
fn refused_instantiation(limits: Limits) -> String {
    let mut sandbox = probe_sandbox(limits);
    let message = trap_message(sandbox.init("p-1"), TrapKind::Other);
    let again = trap_message(sandbox.init("p-1"), TrapKind::Other);
    assert_eq!(message, again);
    assert!(message.contains("in instantiation"), "{message}");
    message
}

#[test]
fn max_table_elements_refuses_the_probes_tables() {
    let message = refused_instantiation(Limits {
        max_table_elements: 10,
        ..Limits::default()
    });
    assert!(
        message.starts_with("table limit exceeded in instantiation: requested ")
            && message.ends_with("table elements, limit max_table_elements = 10"),
        "{message}"
    );
}

#[test]
fn max_memories_refuses_the_probes_memory() {
    let message = refused_instantiation(Limits {
        max_memories: 0,
        ..Limits::default()
    });
    assert_eq!(
        message,
        "memory count too high at 1 in instantiation, limit max_memories = 0"
    );
}

#[test]
fn max_tables_refuses_the_probes_tables() {
    let message = refused_instantiation(Limits {
        max_tables: 1,
        ..Limits::default()
    });
    assert_eq!(
        message,
        "table count too high at 2 in instantiation, limit max_tables = 1"
    );
}

#[test]
fn max_instances_refuses_the_probes_core_instances() {
    let message = refused_instantiation(Limits {
        max_instances: 2,
        ..Limits::default()
    });
    assert_eq!(
        message,
        "instance count too high at 3 in instantiation, limit max_instances = 2"
    );
}

#[test]
fn the_default_limits_fit_the_probe() {
    let (mut sandbox, r) = fold_one(Limits::default(), "probe.count", json!({}));
    assert_eq!(count(&r.unwrap()), 1);
    assert_eq!(sandbox.init("p-1").unwrap(), PROBE_INIT.as_bytes());
}

#[test]
fn a_plugin_error_names_its_event_and_keeps_the_instance() {
    // Data that does not fit the event type is the plugin's own error.
    let mut sandbox = probe_sandbox(Limits::default());
    let events = [
        event("c1", 1, "probe.count", json!({})),
        event("c2", 2, "probe.count", json!({})),
        event("bad", 3, "probe.alloc", json!({"mib": "lots"})),
    ];
    match sandbox.fold("p-1", PROBE_INIT.as_bytes(), &events) {
        Err(CallError::Plugin(e)) => {
            assert_eq!(e.event_index, 2);
            assert_eq!(e.event_id, "bad");
            assert!(!e.message.is_empty());
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }
    assert_folds_again(&mut sandbox);
}

#[test]
fn a_plugin_that_fails_everything_is_a_plugin_error() {
    let mut sandbox = refold_runtime::Sandbox::new(load("probe-fail-all", Limits::default()));
    let r = sandbox.fold(
        "p-1",
        PROBE_INIT.as_bytes(),
        &[event("f1", 1, "probe.count", json!({}))],
    );
    match r {
        Err(e @ CallError::Plugin(_)) => {
            assert_eq!(e.kind(), "plugin_error");
            assert_eq!(e.to_string(), "plugin error on event f1: always fails");
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }
}

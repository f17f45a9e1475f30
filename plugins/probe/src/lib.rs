//! A hostile plugin for testing the host's sandbox. Entity type `probe`.
//!
//! State `{"count": int, "peek": object|null, "blob": string|null}`,
//! initially `{"count":0,"peek":null,"blob":null}`.
//!
//! | event type    | data                | behaviour                                              |
//! |---------------|---------------------|--------------------------------------------------------|
//! | `probe.count` | anything            | `count += 1` (well-behaved)                            |
//! | `probe.loop`  | anything            | spins forever                                          |
//! | `probe.alloc` | `{"mib": int}`      | allocates and touches `mib` MiB, keeps it, `count += 1` |
//! | `probe.panic` | `{"message": string}` | panics with exactly that message                     |
//! | `probe.big`   | `{"bytes": int}`    | `blob` = `"x"` repeated `bytes` times                  |
//! | `probe.peek`  | anything            | tries ambient capabilities, records results in `peek`  |
//! | `probe.log`   | `{"message": string}` | logs it at info, and prints it to stdout and stderr  |
//! | `probe.flood` | `{"lines": int}`    | logs `lines` lines at info through the `log` import    |
//! | `probe.ops`   | `{"n": int}`        | `count += 1`; `project` returns `n` upserts to `p` (keys `0`, `1`, ..., body `1`) |
//! | `probe.spin`  | `{"iterations": int}` | spins that many iterations (a slow, legal event), `count += 1` |
//! | `probe.recurse` | anything          | recurses until the stack overflows                     |
//! | `probe.grab`  | `{"mib": int}`      | tries to reserve `mib` MiB; when refused, spins forever |
//! | `probe.fields` | `{"n": int}`       | holds `n` `wasi:http` `fields` resources at once, `count += 1` |
//! | `probe.header` | `{"bytes": int}`   | appends a header of `bytes` bytes to a `wasi:http` `fields`, `count += 1` |
//! | other         | anything            | nothing                                                |
//!
//! `peek` is `{"file", "dir", "env", "home", "args", "time", "random", "http"}`:
//!
//! * `file`: reading `/etc/hostname`: `{"ok": <length in bytes>}` or `{"err": <message>}`;
//! * `dir`: listing `/` and `.`: `{"/": <result>, ".": <result>}`, each
//!   `{"ok": <number of entries>}` or `{"err": <message>}`;
//! * `env`: number of environment variables;
//! * `home`: `$HOME`: `{"ok": <value>}` or `{"err": <message>}`;
//! * `args`: number of command-line arguments;
//! * `time`: seconds since the Unix epoch by the system clock:
//!   `{"ok": <secs>}` or `{"err": <message>}`;
//! * `random`: a `u64` from std's randomly seeded hasher of a constant; equal
//!   in two peeks only if the host's randomness is not random;
//! * `http`: a `wasi:http` GET to `http://127.0.0.1:1/`: `{"ok": <status>}`
//!   or `{"err": <the error code>}`.
//!
//! A sandboxed host gives errors for `file` and `dir`, 0 for `env` and
//! `args`, an error for `home`; `time` and `random` show what its clock and
//! random source return.
//!
//! Cargo features make variants for refusal tests: `trap-describe`,
//! `fail-all`, `entity-orders`, `entity-dashed`, `loop-init` (see Cargo.toml).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::hint::black_box;
use std::time::{SystemTime, UNIX_EPOCH};

use refold_sdk::serde_json::{Value, json};
use refold_sdk::{Descriptor, Error, Event, Plugin, ProjectionOp};
use serde::{Deserialize, Serialize};
use wasip2::http;

/// The probe's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProbeState {
    /// Events counted by `probe.count` and `probe.alloc`.
    pub count: u64,
    /// What the last `probe.peek` found.
    pub peek: Option<Value>,
    /// Set by `probe.big`.
    pub blob: Option<String>,
}

#[derive(Deserialize)]
struct Mib {
    mib: usize,
}

#[derive(Deserialize)]
struct Message {
    message: String,
}

#[derive(Deserialize)]
struct Bytes {
    bytes: usize,
}

#[derive(Deserialize)]
struct Lines {
    lines: usize,
}

#[derive(Deserialize)]
struct N {
    n: usize,
}

#[derive(Deserialize)]
struct Ops {
    n: usize,
}

#[derive(Deserialize)]
struct Iterations {
    iterations: u64,
}

/// The plugin.
#[derive(Debug)]
pub struct Probe;

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;

impl Plugin for Probe {
    type State = ProbeState;

    fn describe() -> Descriptor {
        if cfg!(feature = "trap-describe") {
            panic!("describe exploded");
        }
        Descriptor {
            name: "probe".into(),
            version: "1.0.0".into(),
            entity_type: if cfg!(feature = "entity-orders") {
                "order"
            } else if cfg!(feature = "entity-dashed") {
                "probe-dashed"
            } else {
                "probe"
            }
            .into(),
            event_types: [
                "probe.count",
                "probe.loop",
                "probe.alloc",
                "probe.panic",
                "probe.big",
                "probe.peek",
                "probe.log",
                "probe.flood",
                "probe.ops",
                "probe.spin",
                "probe.recurse",
                "probe.grab",
            ]
            .map(String::from)
            .to_vec(),
            state_schema_version: 1,
        }
    }

    fn init(_entity_id: &str) -> ProbeState {
        if cfg!(feature = "loop-init") {
            spin();
        }
        ProbeState {
            count: 0,
            peek: None,
            blob: None,
        }
    }

    fn apply(state: &mut ProbeState, event: &Event) -> Result<(), Error> {
        if cfg!(feature = "fail-all") {
            return Err(Error::new("always fails"));
        }
        match event.event_type.as_str() {
            "probe.count" => state.count += 1,
            "probe.loop" => spin(),
            "probe.alloc" => {
                let Mib { mib } = event.data()?;
                let mut chunks: Vec<Vec<u8>> = Vec::with_capacity(mib);
                for _ in 0..mib {
                    let mut chunk = vec![0u8; MIB];
                    for i in (0..MIB).step_by(PAGE) {
                        chunk[i] = 1;
                    }
                    chunks.push(black_box(chunk));
                }
                black_box(&chunks);
                state.count += 1;
            }
            "probe.panic" => {
                let Message { message } = event.data()?;
                panic!("{message}");
            }
            "probe.big" => {
                let Bytes { bytes } = event.data()?;
                state.blob = Some("x".repeat(bytes));
            }
            "probe.peek" => state.peek = Some(peek()),
            "probe.log" => {
                let Message { message } = event.data()?;
                refold_sdk::log::info(&message);
                println!("{message}");
                eprintln!("{message}");
            }
            "probe.flood" => {
                let Lines { lines } = event.data()?;
                for i in 0..lines {
                    refold_sdk::log::info(&format!("flood line {i} of {lines}"));
                }
            }
            "probe.ops" => state.count += 1,
            "probe.spin" => {
                let Iterations { iterations } = event.data()?;
                let mut n: u64 = 0;
                for _ in 0..iterations {
                    n = black_box(n.wrapping_add(1));
                }
                state.count += 1;
            }
            "probe.recurse" => {
                black_box(recurse(black_box(1)));
            }
            "probe.fields" => {
                let N { n } = event.data()?;
                // Host-side resources, outside the guest's memory limit.
                let held: Vec<_> = (0..n).map(|_| http::types::Fields::new()).collect();
                black_box(&held);
                state.count += 1;
            }
            "probe.header" => {
                let Bytes { bytes } = event.data()?;
                let f = http::types::Fields::new();
                f.append("x-big", &vec![b'a'; bytes])
                    .map_err(|e| Error::new(format!("header refused: {e:?}")))?;
                state.count += 1;
            }
            "probe.grab" => {
                let Mib { mib } = event.data()?;
                let mut v: Vec<u8> = Vec::new();
                // A guest that handles the refusal and carries on: the host
                // must still report memory, not the deadline that follows.
                if v.try_reserve_exact(mib.saturating_mul(MIB)).is_err() {
                    spin();
                }
                black_box(&v);
                state.count += 1;
            }
            _ => {}
        }
        Ok(())
    }

    fn project(
        _entity_id: &str,
        _before: &ProbeState,
        _after: &ProbeState,
        events: &[Event],
    ) -> Vec<ProjectionOp> {
        let mut ops = Vec::new();
        for event in events.iter().filter(|e| e.event_type == "probe.ops") {
            let Ok(Ops { n }) = event.data() else {
                continue;
            };
            ops.extend((0..n).map(|i| ProjectionOp::Upsert {
                projection: "p".into(),
                key: i.to_string(),
                body: json!(1),
            }));
        }
        ops
    }
}

/// Recurses forever; `black_box` keeps it from being turned into a loop,
/// and frames stay small so that the engine's stack runs out first.
fn recurse(depth: u64) -> u64 {
    let d = black_box(depth);
    recurse(d + 1).wrapping_add(d)
}

/// Never returns; `black_box` keeps the optimizer from proving the loop
/// has no effect.
fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

fn result<T: Into<Value>, E: ToString>(r: Result<T, E>) -> Value {
    match r {
        Ok(v) => json!({ "ok": v.into() }),
        Err(e) => json!({ "err": e.to_string() }),
    }
}

/// A request out through `wasi:http`, and what came back.
fn fetch() -> Value {
    use http::types::{Fields, Method, OutgoingRequest, Scheme};
    let req = OutgoingRequest::new(Fields::new());
    let _ = req.set_method(&Method::Get);
    let _ = req.set_scheme(Some(&Scheme::Http));
    let _ = req.set_authority(Some("127.0.0.1:1"));
    let _ = req.set_path_with_query(Some("/"));
    match http::outgoing_handler::handle(req, None) {
        Err(e) => json!({ "err": format!("{e:?}") }),
        Ok(response) => {
            response.subscribe().block();
            match response.get() {
                Some(Ok(Ok(r))) => json!({ "ok": r.status() }),
                Some(Ok(Err(e))) => json!({ "err": format!("{e:?}") }),
                Some(Err(())) => json!({ "err": "taken twice" }),
                None => json!({ "err": "never ready" }),
            }
        }
    }
}

fn peek() -> Value {
    let dir = |path: &str| result(std::fs::read_dir(path).map(|entries| entries.count() as u64));
    json!({
        "file": result(std::fs::read_to_string("/etc/hostname").map(|s| s.len() as u64)),
        "dir": { "/": dir("/"), ".": dir(".") },
        "env": std::env::vars().count(),
        "home": result(std::env::var("HOME")),
        "args": std::env::args().count(),
        "time": result(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs())),
        "random": RandomState::new().hash_one("refold probe"),
        "http": fetch(),
    })
}

refold_sdk::export!(Probe);

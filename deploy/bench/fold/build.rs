//! Records the compiler and wasmtime versions for the benchmark's JSON.

use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc)
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BENCH_RUSTC_VERSION={version}");

    // The version actually locked, not the requirement.
    let lock = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../Cargo.lock");
    println!("cargo:rerun-if-changed={lock}");
    let text = std::fs::read_to_string(lock).unwrap_or_default();
    let mut lines = text.lines();
    let mut wasmtime = "unknown".to_owned();
    while let Some(line) = lines.next() {
        if line == "name = \"wasmtime\"" {
            if let Some(v) = lines.next().and_then(|l| l.strip_prefix("version = ")) {
                wasmtime = v.trim_matches('"').to_owned();
            }
            break;
        }
    }
    println!("cargo:rustc-env=BENCH_WASMTIME_VERSION={wasmtime}");
}

//! `refold new --lang rust|python|js NAME`: a plugin project that builds and
//! passes its own fixture out of the box. The SDK and the WIT are vendored
//! into it (embedded in this binary), so it needs no checkout of this
//! repository; only the toolchains come from their registries (crates.io for
//! Rust, PyPI for componentize-py, npm for componentize-js, pinned).

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The language of a new plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// The `refold-sdk` crate, built with cargo for wasm32-wasip2.
    Rust,
    /// The Python SDK, built with componentize-py.
    Python,
    /// The JavaScript SDK, built with componentize-js.
    Js,
}

const WIT: &str = include_str!("../../../../wit/plugin.wit");

const RUST_SDK: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../../../../plugins/sdk/Cargo.toml"),
    ),
    (
        "README.md",
        include_str!("../../../../plugins/sdk/README.md"),
    ),
    (
        "src/lib.rs",
        include_str!("../../../../plugins/sdk/src/lib.rs"),
    ),
    (
        "src/error.rs",
        include_str!("../../../../plugins/sdk/src/error.rs"),
    ),
    (
        "src/event.rs",
        include_str!("../../../../plugins/sdk/src/event.rs"),
    ),
    (
        "src/glue.rs",
        include_str!("../../../../plugins/sdk/src/glue.rs"),
    ),
    (
        "src/log.rs",
        include_str!("../../../../plugins/sdk/src/log.rs"),
    ),
    (
        "src/op.rs",
        include_str!("../../../../plugins/sdk/src/op.rs"),
    ),
];

const JS_SDK: &[(&str, &str)] = &[
    (
        "package.json",
        include_str!("../../../../plugins/js/refold-sdk/package.json"),
    ),
    (
        "index.js",
        include_str!("../../../../plugins/js/refold-sdk/index.js"),
    ),
    (
        "core.js",
        include_str!("../../../../plugins/js/refold-sdk/core.js"),
    ),
    (
        "json.js",
        include_str!("../../../../plugins/js/refold-sdk/json.js"),
    ),
];

const PY_SDK: &[(&str, &str)] = &[
    (
        "__init__.py",
        include_str!("../../../../plugins/python/refold-sdk/refold_sdk/__init__.py"),
    ),
    (
        "core.py",
        include_str!("../../../../plugins/python/refold-sdk/refold_sdk/core.py"),
    ),
    (
        "log.py",
        include_str!("../../../../plugins/python/refold-sdk/refold_sdk/log.py"),
    ),
    (
        "testing.py",
        include_str!("../../../../plugins/python/refold-sdk/refold_sdk/testing.py"),
    ),
    (
        "wit.py",
        include_str!("../../../../plugins/python/refold-sdk/refold_sdk/wit.py"),
    ),
];

/// The toolchain pinned exactly as refold's own Python plugins pin it.
const PY_REQUIREMENTS: &str = include_str!("../../../../plugins/python/requirements.txt");

const JS_LOCK: &str = include_str!("../../../../plugins/js/package-lock.json");

/// Whether `name` can name a crate, a package and an entity type.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    anyhow::ensure!(
        ok && !name.ends_with('-'),
        "plugin name {name:?}: use lowercase letters, digits and '-', starting with a letter (at most 64)"
    );
    Ok(())
}

/// `my-counter` → `MyCounter`.
fn type_name(name: &str) -> String {
    name.split('-')
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn fill(template: &str, name: &str) -> String {
    let entity = name.replace('-', "_");
    template
        .replace("{{name}}", name)
        .replace("{{entity}}", &entity)
        .replace("{{type_name}}", &type_name(name))
}

fn write(root: &Path, rel: &str, text: &str) -> anyhow::Result<()> {
    let p = root.join(rel);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
}

/// The fixture every scaffold starts with: three entities, one of which is
/// quarantined by a negative amount.
fn fixture(name: &str) -> (String, String, String) {
    let entity = name.replace('-', "_");
    let ev = |id: &str, subject: &str, ty: &str, data: &str| {
        format!(
            "{{\"specversion\":\"1.0\",\"id\":\"{id}\",\"source\":\"/{name}\",\"type\":\"{entity}.{ty}\",\"subject\":\"{subject}\",\"entitytype\":\"{entity}\",\"data\":{data}}}\n"
        )
    };
    let events = [
        ev("e1", "a", "added", "{\"n\":4}"),
        ev("e2", "b", "added", "{\"n\":3}"),
        ev("e3", "a", "added", "{\"n\":3}"),
        ev("e4", "b", "reset", "null"),
        ev("e5", "c", "added", "{\"n\":4}"),
        ev("e6", "c", "added", "{\"n\":-1}"),
        ev("e7", "a", "renamed", "{\"to\":\"x\"}"),
    ]
    .concat();
    let state = |id: &str, total: i64, count: u64| {
        format!(
            "{{\"entity_type\":\"{entity}\",\"entity_id\":\"{id}\",\"state\":{{\"total\":{total},\"count\":{count}}}}}\n"
        )
    };
    let expected = [state("a", 7, 2), state("b", 0, 2), state("c", 4, 1)].concat();
    let quarantine = "{\"entity_id\":\"c\",\"reason\":\"cannot add -1\"}\n".to_owned();
    (events, expected, quarantine)
}

/// Write the project into `./NAME`; refuses an existing directory.
pub fn new(lang: Lang, name: &str, parent: &Path) -> anyhow::Result<PathBuf> {
    check_name(name)?;
    let root = parent.join(name);
    anyhow::ensure!(
        !root.exists(),
        "{} already exists: refold new writes a new directory",
        root.display()
    );
    let (events, expected, quarantine) = fixture(name);
    write(&root, "wit/plugin.wit", WIT)?;
    write(&root, "fixture/events.jsonl", &events)?;
    write(&root, "fixture/expected.jsonl", &expected)?;
    write(&root, "fixture/expected-quarantine.jsonl", &quarantine)?;
    let crate_name = name.replace('-', "_");
    let (build, wasm) = match lang {
        Lang::Rust => {
            for (rel, text) in RUST_SDK {
                write(&root, &format!("vendor/refold-sdk/{rel}"), text)?;
            }
            write(
                &root,
                "src/lib.rs",
                &fill(include_str!("../../templates/rust-lib.rs"), name),
            )?;
            write(
                &root,
                "Cargo.toml",
                &format!(
                    r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]

[dependencies]
# Vendored by `refold new`; or a git dependency on the refold repository.
refold-sdk = {{ path = "vendor/refold-sdk" }}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

# A project of its own, even when created inside another cargo workspace.
[workspace]

[profile.release]
opt-level = 3
lto = true
strip = true
codegen-units = 1
"#
                ),
            )?;
            write(&root, ".gitignore", "/target\n")?;
            (
                "cargo build --release --target wasm32-wasip2".to_owned(),
                format!("target/wasm32-wasip2/release/{crate_name}.wasm"),
            )
        }
        Lang::Python => {
            for (rel, text) in PY_SDK {
                write(&root, &format!("refold_sdk/{rel}"), text)?;
            }
            write(
                &root,
                "app.py",
                &fill(include_str!("../../templates/plugin.py"), name),
            )?;
            write(
                &root,
                "build.sh",
                &fill(include_str!("../../templates/build-py.sh"), name),
            )?;
            write(&root, "requirements.txt", PY_REQUIREMENTS)?;
            write(
                &root,
                ".gitignore",
                "/.venv\n/.build\n/*.wasm\n__pycache__/\n",
            )?;
            ("bash build.sh".to_owned(), format!("{name}.wasm"))
        }
        Lang::Js => {
            for (rel, text) in JS_SDK {
                write(&root, &format!("refold-sdk/{rel}"), text)?;
            }
            write(
                &root,
                "plugin.js",
                &fill(include_str!("../../templates/plugin.js"), name),
            )?;
            write(
                &root,
                "build.sh",
                &fill(include_str!("../../templates/build-js.sh"), name),
            )?;
            // The toolchain pinned exactly as refold's own JavaScript plugins
            // pin it: same package.json dependencies, same lockfile.
            let mut lock: serde_json::Value =
                serde_json::from_str(JS_LOCK).context("the embedded package-lock.json")?;
            lock["name"] = name.into();
            lock["packages"][""]["name"] = name.into();
            write(
                &root,
                "package-lock.json",
                &serde_json::to_string_pretty(&lock)?,
            )?;
            let pkg = serde_json::json!({
                "name": name,
                "version": "0.1.0",
                "private": true,
                "type": "module",
                "scripts": {"build": "bash build.sh"},
                "devDependencies": lock["packages"][""]["devDependencies"].clone(),
            });
            write(&root, "package.json", &serde_json::to_string_pretty(&pkg)?)?;
            write(&root, ".gitignore", "/node_modules\n/*.wasm\n")?;
            ("bash build.sh".to_owned(), format!("{name}.wasm"))
        }
    };
    write(
        &root,
        "README.md",
        &format!(
            "# {name}\n\nA refold projection plugin (entity type `{entity}`).\n\n```\n{build}\nrefold test --plugin {wasm} fixture\n```\n\n`fixture/` holds the events, the expected states and the expected quarantine; add\n`expected-projections.jsonl` and `expected-dead-letters.jsonl` as needed.\n",
            entity = name.replace('-', "_"),
        ),
    )?;
    crate::cli::out::outln!("created {} ({lang:?})", root.display());
    crate::cli::out::outln!("  cd {name} && {build}");
    crate::cli::out::outln!("  refold test --plugin {wasm} fixture");
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_turned_into_types() {
        assert!(check_name("my-counter").is_ok());
        for bad in ["", "My", "1x", "a_b", "a-", "a b", "../x"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(type_name("my-counter2"), "MyCounter2");
    }
}

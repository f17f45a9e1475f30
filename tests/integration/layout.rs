//! The host's layout, checked from its code: the crates depend on each
//! other in one direction (cargo refuses a cycle; these tests hold the
//! boundaries ARCHITECTURE.md promises), and inside each crate no module
//! imports a module that imports it (read from the `use crate::…`,
//! `crate::…` and `super::…` paths of every source file, test modules
//! included).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::common::root;

/// The host's crates: directory under `host/` → its `[dependencies]`.
fn host_crates() -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(root().join("host")).unwrap() {
        let dir = entry.unwrap().path();
        let manifest = dir.join("Cargo.toml");
        if !manifest.exists() {
            continue;
        }
        out.insert(
            dir.file_name().unwrap().to_string_lossy().into_owned(),
            dependencies(&manifest),
        );
    }
    out
}

/// The names in the `[dependencies]` table of a manifest (not dev or build).
fn dependencies(manifest: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut deps = BTreeSet::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == "[dependencies]";
            continue;
        }
        if inside && let Some((name, _)) = line.split_once('=') {
            let name = name.trim().trim_end_matches(".workspace").trim();
            if !name.is_empty() && !name.starts_with('#') {
                deps.insert(name.to_string());
            }
        }
    }
    deps
}

/// Every crate reachable from `start` through the host's crates (by
/// package name `refold-<dir>`, or `refold` for the command line).
fn closure(
    crates: &BTreeMap<String, BTreeSet<String>>,
    start: &BTreeSet<String>,
) -> BTreeSet<String> {
    let dir_of = |package: &str| -> Option<String> {
        match package {
            "refold" => Some("cli".into()),
            p => p.strip_prefix("refold-").map(str::to_string),
        }
    };
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = start.iter().cloned().collect();
    while let Some(d) = todo.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        if let Some(dir) = dir_of(&d)
            && let Some(next) = crates.get(&dir)
        {
            todo.extend(next.iter().cloned());
        }
    }
    seen
}

#[test]
fn crate_boundaries_hold() {
    let crates = host_crates();
    for want in [
        "types",
        "runtime",
        "store",
        "store-sqlite",
        "store-cassandra",
        "source",
        "engine",
        "cli",
    ] {
        assert!(crates.contains_key(want), "host/{want} is missing");
    }
    let reach = |dir: &str| closure(&crates, &crates[dir]);
    let runtime = reach("runtime");
    for banned in [
        "refold-store",
        "refold-source",
        "rusqlite",
        "scylla",
        "rdkafka",
    ] {
        assert!(
            !runtime.contains(banned),
            "host/runtime knows nothing of stores or sources, yet depends on {banned}"
        );
    }
    let store = reach("store");
    for banned in [
        "rusqlite",
        "scylla",
        "rdkafka",
        "refold-runtime",
        "wasmtime",
    ] {
        assert!(
            !store.contains(banned),
            "host/store has no backend or runtime dependency, yet depends on {banned}"
        );
    }
    let types = reach("types");
    assert!(
        types.iter().all(|d| !d.starts_with("refold")),
        "host/types depends on no other crate of the host: {types:?}"
    );
    for http in ["axum", "reqwest"] {
        for dir in crates.keys().filter(|d| *d != "cli") {
            assert!(
                !crates[dir].contains(http),
                "only host/cli knows HTTP, yet host/{dir} depends on {http}"
            );
        }
    }
    let bench = closure(
        &crates,
        &dependencies(&root().join("deploy/bench/fold/Cargo.toml")),
    );
    assert!(
        !bench.contains("rdkafka") && !bench.contains("scylla"),
        "the fold benchmark needs the runtime only: {bench:?}"
    );
}

/// A module's path in its crate, from its file (`src/a/b.rs` and
/// `src/a/b/mod.rs` are `a::b`; `lib.rs` and `main.rs` are the root, "").
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its comments and string literals, so that a
/// path in a doc comment or a message is not taken for an import.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                    }
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    }
                }
                out.push_str("\"\"");
            }
            _ => out.push(c),
        }
    }
    out
}

/// The first segments of the paths a `use crate::{a::X, b::{Y, Z}}` names.
fn grouped_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut item = String::new();
    for c in group.chars() {
        match c {
            '{' => {
                depth += 1;
                item.push(c);
            }
            '}' => {
                depth -= 1;
                item.push(c);
            }
            ',' if depth == 0 => {
                heads.push(std::mem::take(&mut item));
            }
            _ => item.push(c),
        }
    }
    heads.push(item);
    heads
        .into_iter()
        .map(|i| i.trim().to_string())
        .filter(|i| !i.is_empty())
        .collect()
}

/// The modules a file's code names through `crate::` and `super::` paths,
/// resolved to the longest module of `modules` that is a prefix (the crate
/// root, "", when the item is defined or re-exported there). `super::` in
/// an inline `mod tests` names the file's own module.
fn imports(module: &str, code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let resolve = |path: &str| -> String {
        let segs: Vec<&str> = path
            .split("::")
            .map(str::trim)
            .take_while(|s| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_'))
            .collect();
        (0..=segs.len())
            .rev()
            .map(|n| segs[..n].join("::"))
            .find(|m| modules.contains(m))
            .unwrap_or_default()
    };
    let parent = module.rsplit_once("::").map(|(p, _)| p).unwrap_or("");
    let inline_tests = code.find("mod tests {");
    let mut out = BTreeSet::new();
    for (prefix, base) in [("crate::", ""), ("super::", parent)] {
        let mut at = 0;
        while let Some(i) = code[at..].find(prefix) {
            let start = at + i;
            at = start + prefix.len();
            // `refold_store::` and the like are other crates.
            if start > 0 {
                let before = code[..start].chars().next_back().unwrap_or(' ');
                if before.is_alphanumeric() || before == '_' {
                    continue;
                }
            }
            let base = if prefix == "super::" && inline_tests.is_some_and(|t| start > t) {
                module
            } else {
                base
            };
            let rest = &code[at..];
            let join = |p: &str| {
                if base.is_empty() {
                    p.to_string()
                } else {
                    format!("{base}::{p}")
                }
            };
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find("};").unwrap_or(group.len());
                for head in grouped_heads(&group[..end]) {
                    out.insert(resolve(&join(&head)));
                }
            } else {
                let path: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                out.insert(resolve(&join(&path)));
            }
        }
    }
    out.remove(module);
    out
}

#[test]
fn no_module_imports_its_importer() {
    let mut found = Vec::new();
    for dir in host_crates().keys() {
        let src = root().join("host").join(dir).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for f in &files {
            let m = module_of(&src, f);
            let code = code_only(&std::fs::read_to_string(f).unwrap());
            graph.insert(m.clone(), imports(&m, &code, &modules));
        }
        // Any cycle, by depth-first search.
        fn visit(
            m: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            stack: &mut Vec<String>,
            done: &mut BTreeSet<String>,
            found: &mut Vec<String>,
        ) {
            if let Some(i) = stack.iter().position(|s| s == m) {
                found.push(stack[i..].join(" -> ") + " -> " + m);
                return;
            }
            if done.contains(m) {
                return;
            }
            stack.push(m.to_string());
            for n in graph.get(m).into_iter().flatten() {
                visit(n, graph, stack, done, found);
            }
            stack.pop();
            done.insert(m.to_string());
        }
        let mut done = BTreeSet::new();
        let before = found.len();
        for m in graph.keys() {
            visit(m, &graph, &mut Vec::new(), &mut done, &mut found);
        }
        for f in &mut found[before..] {
            *f = format!("host/{dir}: {}", f.replace(" -> ->", " -> (root) ->"));
        }
    }
    assert!(
        found.is_empty(),
        "module cycles (\"\" is the crate root):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_import_reader_sees_cycles() {
    let modules: BTreeSet<String> = ["", "a", "b", "b::c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let code = "use crate::{a::X, b::c::{Y, Z}};\nfn f() { crate::b::g(); }\n// crate::nothing\n";
    let got = imports("a", &code_only(code), &modules);
    assert_eq!(
        got,
        ["b", "b::c"]
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
    );
    let got = imports(
        "b::c",
        "use super::Thing;\nmod tests {\n use super::*;\n}",
        &modules,
    );
    assert_eq!(got, ["b".to_string()].into_iter().collect::<BTreeSet<_>>());
    let strings = code_only("let s = \"crate::b\"; refold_b::x();");
    assert!(imports("a", &strings, &modules).is_empty());
}

//! `refold inspect FILE.wasm`

use std::path::Path;

use refold_runtime::{Limits, Plugin};

/// Print the descriptor and imports; `Ok(false)` when the component is unusable.
pub fn inspect(file: &Path) -> anyhow::Result<bool> {
    let bytes =
        std::fs::read(file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    let engine = refold_engine::config::PluginsConfig::default().engine()?;
    match Plugin::load(&engine, &bytes, Limits::default()) {
        Ok(p) => {
            let imports: Vec<String> =
                wasmtime::component::Component::new(engine.wasmtime(), &bytes)
                    .map(|c| {
                        c.component_type()
                            .imports(engine.wasmtime())
                            .map(|(name, _)| name.to_string())
                            .collect()
                    })
                    .unwrap_or_default();
            let out = serde_json::json!({
                "file": file.display().to_string(),
                "world": refold_runtime::WORLD,
                "matches_world": true,
                "digest": format!("sha256:{}", p.digest),
                "size_bytes": p.size,
                "describe": p.info,
                "imports": imports,
                "granted": "log only; WASI is linked with no files, env, args, network; clocks frozen, randomness constant",
            });
            crate::cli::out::outln!("{}", serde_json::to_string_pretty(&out)?);
            Ok(true)
        }
        Err(e) => {
            let out = serde_json::json!({
                "file": file.display().to_string(),
                "world": refold_runtime::WORLD,
                "matches_world": false,
                "error": e.to_string(),
            });
            crate::cli::out::outln!("{}", serde_json::to_string_pretty(&out)?);
            Ok(false)
        }
    }
}

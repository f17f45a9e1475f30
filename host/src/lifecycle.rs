//! Installing plugin versions: validate, register, activate.

use std::path::Path;

use crate::app::App;

/// Load a component file and activate it (forward mode).
pub async fn install_file(app: &App, path: &Path) -> anyhow::Result<String> {
    let bytes = tokio::fs::read(path).await?;
    let app2 = app.clone();
    let plugin = tokio::task::spawn_blocking(move || app2.load_plugin_bytes(&bytes)).await??;
    let msg = format!(
        "activated {} for entity type {}",
        plugin.tag(),
        plugin.info.entity_type
    );
    app.registry.activate(plugin);
    Ok(msg)
}

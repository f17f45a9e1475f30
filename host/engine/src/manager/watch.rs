//! Hot reload from a watched plugin directory: a debounced watcher feeds a
//! channel; one task compiles, validates, then activates. A component that
//! fails to load is refused with its reason and the active version stays.
//! What a file may be named, how large it may be and which stored versions
//! it does not re-activate: [`PluginManager::install_file`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use notify_debouncer_mini::{DebounceEventResult, new_debouncer, notify::RecursiveMode};
use tokio::sync::{mpsc, watch};

use super::PluginManager;

/// Watch `dir` for `.wasm` files until `stop` turns true. Files already
/// there are installed before this returns, so that a host started with only
/// a plugin directory has its plugins before it reads its first event
/// (otherwise those events would be dead-lettered as of an unknown type).
pub async fn watch_dir(
    manager: PluginManager,
    dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating plugin dir {}", dir.display()))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let debounce = Duration::from_millis(manager.host.config.plugins.debounce_ms.max(10));
    let tx2 = tx.clone();
    let mut debouncer = new_debouncer(debounce, move |res: DebounceEventResult| {
        if let Ok(events) = res {
            for e in events {
                let _ = tx2.send(e.path);
            }
        }
    })
    .context("creating the plugin dir watcher")?;
    debouncer
        .watcher()
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    let mut existing: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_wasm(p))
        .collect();
    existing.sort();
    let mut seen: HashMap<PathBuf, Stamp> = HashMap::new();
    for p in existing {
        let Some(stamp) = stamp(&p) else { continue };
        seen.insert(p.clone(), stamp);
        install(&manager, &p, true).await;
    }
    drop(tx);
    tokio::spawn(async move {
        // Keep the debouncer alive as long as this task runs.
        let _debouncer = debouncer;
        loop {
            tokio::select! {
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        break;
                    }
                }
                p = rx.recv() => {
                    let Some(p) = p else { break };
                    if !is_wasm(&p) || !p.exists() {
                        continue;
                    }
                    // Reading a file to install it raises watcher events of its
                    // own (open, close): without this check the same bytes would
                    // be installed again and again, recompiled each time.
                    let Some(stamp) = stamp(&p) else { continue };
                    if seen.get(&p) == Some(&stamp) {
                        continue;
                    }
                    seen.insert(p.clone(), stamp);
                    // Loads are serialized: this task handles one at a time.
                    install(&manager, &p, false).await;
                }
            }
        }
    });
    Ok(())
}

/// Install and activate one file; a refusal is logged with its reason and
/// the active version keeps running.
async fn install(manager: &PluginManager, p: &Path, at_start: bool) {
    match manager.install_file(p, at_start).await {
        Ok(msg) => tracing::info!(file = %p.display(), "{msg}"),
        Err(e) => {
            tracing::error!(file = %p.display(), error = %format!("{e:#}"), "plugin refused; the active version keeps running")
        }
    }
}

fn is_wasm(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "wasm")
}

/// One version of a file on disk: a rename onto the path changes the inode,
/// a rewrite in place the modification time (and usually the length).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

fn stamp(p: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(p).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp {
        len: m.len(),
        modified: m.modified().ok(),
        inode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_changes_with_a_new_file_not_with_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("account.wasm");
        std::fs::write(&p, b"one").unwrap();
        let first = stamp(&p).unwrap();
        let _ = std::fs::read(&p).unwrap();
        assert_eq!(stamp(&p), Some(first.clone()));
        let tmp = dir.path().join("next");
        std::fs::write(&tmp, b"two").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        assert_ne!(stamp(&p), Some(first));
        assert_eq!(stamp(&dir.path().join("gone.wasm")), None);
    }
}

//! A compiled plugin version: component, pre-instantiation and descriptor.

use std::sync::Arc;

use refold_types::digest_of;
use serde::{Deserialize, Serialize};
use wasmtime::Store;
use wasmtime::component::Component;

use crate::bindings::{Descriptor, ProjectorPre};
use crate::engine::Engine;
use crate::host_state::HostState;
use crate::limits::Limits;
use crate::trap::{CallError, fail};

/// What `describe()` said, validated and owned by the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginInfo {
    /// Plugin name.
    pub name: String,
    /// Plugin version string.
    pub version: String,
    /// The entity type it owns.
    pub entity_type: String,
    /// Event types it handles.
    pub event_types: Vec<String>,
    /// State schema version.
    pub state_schema_version: u32,
}

/// Why a component could not become a plugin.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not a WebAssembly component (or do not compile).
    #[error("not a valid WebAssembly component: {0}")]
    NotAComponent(String),
    /// It is a component, but not of the `refold:plugin/projector` world.
    #[error("component does not match the refold:plugin/projector world: {0}")]
    WrongWorld(String),
    /// `describe()` trapped.
    #[error("describe() failed: {0}")]
    Describe(String),
    /// `describe()` returned something unusable.
    #[error("describe() returned an invalid descriptor: {0}")]
    InvalidDescriptor(String),
}

/// One compiled plugin version. Compile once, instantiate often: every
/// sandbox of this version shares the `Component` and `InstancePre`.
pub struct Plugin {
    engine: Engine,
    pre: ProjectorPre<HostState>,
    /// Validated `describe()` output.
    pub info: PluginInfo,
    /// sha256 of the component bytes, hex: the identity of this version.
    pub digest: String,
    /// Size of the component in bytes.
    pub size: usize,
    /// Limits every call of this version runs under.
    pub limits: Limits,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("info", &self.info)
            .field("digest", &self.digest)
            .finish()
    }
}

impl Plugin {
    /// Compile `bytes`, check them against the WIT world and call `describe()`
    /// in a throwaway instance. Blocking and CPU-heavy: call it off the hot
    /// path.
    pub fn load(engine: &Engine, bytes: &[u8], limits: Limits) -> Result<Arc<Plugin>, LoadError> {
        let digest = digest_of(bytes);
        let cached = engine
            .compile_cache()
            .and_then(|c| c.load(engine.wasmtime(), &digest));
        let component = match cached {
            Some(c) => c,
            None => {
                let c = Component::new(engine.wasmtime(), bytes)
                    .map_err(|e| LoadError::NotAComponent(format!("{e:#}")))?;
                if let Some(cache) = engine.compile_cache() {
                    cache.store(&digest, &c);
                }
                c
            }
        };
        // Fails when the component imports anything we do not provide.
        let instance_pre = engine
            .linker()
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        // Fails when the exports do not match the world.
        let pre =
            ProjectorPre::new(instance_pre).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        let d = describe(engine, &pre, &limits).map_err(|e| match e {
            CallError::Output { .. } => LoadError::InvalidDescriptor(e.to_string()),
            _ => LoadError::Describe(e.to_string()),
        })?;
        let info = PluginInfo {
            name: d.name,
            version: d.version,
            entity_type: d.entity_type,
            event_types: d.event_types,
            state_schema_version: d.state_schema_version,
        };
        validate_info(&info).map_err(LoadError::InvalidDescriptor)?;
        Ok(Arc::new(Plugin {
            engine: engine.clone(),
            pre,
            info,
            digest,
            size: bytes.len(),
            limits,
        }))
    }

    /// The same compiled version under other limits (no recompilation: the
    /// `InstancePre` is shared).
    pub fn with_limits(&self, limits: Limits) -> Arc<Plugin> {
        Arc::new(Plugin {
            engine: self.engine.clone(),
            pre: self.pre.clone(),
            info: self.info.clone(),
            digest: self.digest.clone(),
            size: self.size,
            limits,
        })
    }

    /// The engine this plugin was compiled for.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Pre-instantiated component, ready for a new store.
    pub(crate) fn pre(&self) -> &ProjectorPre<HostState> {
        &self.pre
    }

    /// `name@version`, the tag used in logs and metrics.
    pub fn tag(&self) -> String {
        format!("{}@{}", self.info.name, self.info.version)
    }
}

/// `describe()` in an instance of its own, under `limits` (the entity type,
/// and so its own limits, are not known yet).
fn describe(
    engine: &Engine,
    pre: &ProjectorPre<HostState>,
    limits: &Limits,
) -> Result<Descriptor, CallError> {
    let mut store = Store::new(engine.wasmtime(), HostState::new("describe".into(), limits));
    store.limiter(|s| &mut s.limiter);
    store.epoch_deadline_trap();
    store.set_epoch_deadline(Engine::ticks_for(limits.cpu_ms));
    store.data_mut().begin_call();
    let bindings = match pre.instantiate(&mut store) {
        Ok(b) => b,
        Err(e) => return Err(fail(&mut store, "instantiation", limits, e)),
    };
    match bindings.call_describe(&mut store) {
        Ok(d) => {
            store.data_mut().drain_stdio();
            store.data_mut().end_call("describe");
            Ok(d)
        }
        Err(e) => Err(fail(&mut store, "describe", limits, e)),
    }
}

/// Names flow into keys, URLs and metrics labels: keep them plain.
fn validate_info(info: &PluginInfo) -> Result<(), String> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    };
    if !plain(&info.entity_type) {
        return Err(format!(
            "entity type {:?} must be 1-128 characters of [A-Za-z0-9._-]",
            info.entity_type
        ));
    }
    if !plain(&info.name) {
        return Err(format!(
            "plugin name {:?} must be 1-128 characters of [A-Za-z0-9._-]",
            info.name
        ));
    }
    if info.version.is_empty() || info.version.len() > 64 {
        return Err("plugin version must be 1-64 characters".into());
    }
    if info.event_types.len() > 1024 {
        return Err("more than 1024 event types".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> PluginInfo {
        PluginInfo {
            name: "probe".into(),
            version: "1.0.0".into(),
            entity_type: "probe-dashed".into(),
            event_types: vec!["probe.count".into()],
            state_schema_version: 1,
        }
    }

    #[test]
    fn names_must_be_plain_and_bounded() {
        assert_eq!(validate_info(&info()), Ok(()));
        let bad = [
            PluginInfo {
                entity_type: "a/b".into(),
                ..info()
            },
            PluginInfo {
                entity_type: String::new(),
                ..info()
            },
            PluginInfo {
                name: "x".repeat(129),
                ..info()
            },
            PluginInfo {
                name: "two words".into(),
                ..info()
            },
            PluginInfo {
                version: String::new(),
                ..info()
            },
            PluginInfo {
                version: "1".repeat(65),
                ..info()
            },
            PluginInfo {
                event_types: vec!["t".into(); 1025],
                ..info()
            },
        ];
        for i in bad {
            assert!(validate_info(&i).is_err(), "{i:?}");
        }
    }
}

//! The active plugin per entity type, swapped atomically.
//!
//! Readers take a snapshot once per batch, so a swap lands at a batch
//! boundary: a batch never mixes two versions.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::runtime::Plugin;
use crate::store::PluginRef;

/// Active plugins by entity type.
pub type Active = HashMap<String, Arc<Plugin>>;

/// The set of active plugins.
#[derive(Default)]
pub struct Registry {
    active: ArcSwap<Active>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// The active plugins now.
    pub fn snapshot(&self) -> Arc<Active> {
        self.active.load_full()
    }

    /// The active plugin of one entity type.
    pub fn get(&self, entity_type: &str) -> Option<Arc<Plugin>> {
        self.active.load().get(entity_type).cloned()
    }

    /// Make `plugin` the active version of its entity type.
    pub fn activate(&self, plugin: Arc<Plugin>) {
        self.active.rcu(|cur| {
            let mut next = (**cur).clone();
            next.insert(plugin.info.entity_type.clone(), plugin.clone());
            next
        });
    }
}

/// The identity of a plugin version, as stored beside each state.
pub fn plugin_ref(p: &Plugin) -> PluginRef {
    PluginRef {
        name: p.info.name.clone(),
        version: p.info.version.clone(),
        digest: p.digest.clone(),
    }
}

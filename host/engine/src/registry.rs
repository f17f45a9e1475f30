//! The active plugin per entity type, swapped atomically.
//!
//! Readers take a snapshot once per batch, so a swap lands at a batch
//! boundary: a batch never mixes two versions.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use refold_runtime::Plugin;
use refold_types::{Generation, PluginRef};

/// Active plugins by entity type.
pub type Active = HashMap<String, Arc<Plugin>>;

/// The generation each entity type's states are served from (absent: the
/// base one).
pub type Generations = HashMap<String, Generation>;

/// The set of active plugins.
#[derive(Default)]
pub struct Registry {
    active: ArcSwap<Active>,
    generations: ArcSwap<Generations>,
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

    /// The active generations now. Taken with [`Registry::snapshot`] under
    /// the batch gate, so that a batch sees a version and its generation
    /// together.
    pub fn generations(&self) -> Arc<Generations> {
        self.generations.load_full()
    }

    /// The active generation of one entity type.
    pub fn generation(&self, entity_type: &str) -> Generation {
        self.generations
            .load()
            .get(entity_type)
            .cloned()
            .unwrap_or_default()
    }

    /// Make `plugin` the active version of its entity type, serving states
    /// of `generation`.
    pub fn activate_in(&self, plugin: Arc<Plugin>, generation: &Generation) {
        let t = plugin.info.entity_type.clone();
        self.generations.rcu(|cur| {
            let mut next = (**cur).clone();
            next.insert(t.clone(), generation.clone());
            next
        });
        self.activate(plugin);
    }

    /// Make `plugin` the active version of its entity type, in the
    /// generation already active.
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

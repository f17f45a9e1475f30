//! Generations: lineages of states, and how a record moves between them.
//!
//! A generation is the set of states one lineage of plugin versions folded
//! from the raw events: a forward swap keeps the generation, a rebuild
//! starts a new one. Every stored state is tagged with its generation, and a
//! state is only ever folded forward within it. The active generation of an
//! entity type is part of its activation row, so writing that one row is the
//! whole cut-over, on every backend and across hosts.
//!
//! States move lazily. The live record of an entity holds the state of
//! whichever generation last wrote it. When a batch (or a query) meets a
//! record of another generation than the active one, the record is saved
//! under its own generation's namespace (so that a rollback finds it), and
//! the active generation's state is taken from its namespace (where the
//! rebuild left it) and caught up from the raw events. A host that has not
//! seen an activation yet keeps folding the previous generation for a
//! moment; that only moves the previous lineage on, never the new one.

use std::collections::{HashMap, HashSet};

use crate::registry::Generations;
use refold_store::{EntityRecord, EntityUpdate, QuarantineRecord, Storage, StoreError};
use refold_types::Generation;
use refold_types::event::EntityKey;

/// The id of a new generation built by a rebuild with `digest`: unique per
/// rebuild, so that two rebuilds with the same version never share states.
pub fn new_id(entity_type: &str, digest: &str) -> Generation {
    let millis = refold_types::clock::unix_ms();
    Generation::from(format!(
        "{entity_type}#{}.{millis:x}",
        &digest[..digest.len().min(12)]
    ))
}

/// Where the states of `generation` are kept while it is not the one in the
/// live records: the generation id itself, or `type#base` for the first.
pub fn namespace(entity_type: &str, generation: &Generation) -> String {
    if generation.is_base() {
        format!("{entity_type}#base")
    } else {
        generation.as_str().to_string()
    }
}

/// What bringing records into their active generation writes besides them.
#[derive(Debug, Default)]
pub struct Moves {
    /// States of the generations being left, saved under their namespaces.
    pub saved: Vec<EntityUpdate>,
    /// Quarantine records that move with their states.
    pub quarantines: Vec<QuarantineRecord>,
    /// Live entities whose quarantine belonged to the generation left.
    pub released: Vec<EntityKey>,
}

/// Bring every record of `records` into the active generation of its type,
/// in place. A record keeps its `head` (the live fence); its state and
/// position become those of the active generation, so the caller folds the
/// gap up to `head` from the raw events. Returns what must be written with
/// the records for the move to hold (nothing when `save` is false: a read
/// that only looks).
pub async fn resolve(
    storage: &dyn Storage,
    generations: &Generations,
    records: &mut HashMap<EntityKey, EntityRecord>,
    save: bool,
) -> Result<Moves, StoreError> {
    let base = Generation::base();
    let active = |t: &str| generations.get(t).unwrap_or(&base);
    let movers: Vec<EntityKey> = records
        .values()
        .filter(|r| &r.generation != active(&r.key.entity_type))
        .map(|r| r.key.clone())
        .collect();
    let mut moves = Moves::default();
    if movers.is_empty() {
        return Ok(moves);
    }
    let at = |key: &EntityKey, generation: &Generation| {
        EntityKey::new(
            namespace(&key.entity_type, generation),
            key.entity_id.clone(),
        )
    };
    let mut wanted: Vec<EntityKey> = Vec::with_capacity(movers.len() * 2);
    for k in &movers {
        let r = &records[k];
        wanted.push(at(k, active(&k.entity_type)));
        if save {
            wanted.push(at(k, &r.generation));
        }
    }
    let kept = storage.load(&wanted).await?;
    // The quarantine records a move carries along: point reads of the
    // quarantined entities among the movers, in either generation.
    let mut quarantine: HashMap<EntityKey, QuarantineRecord> = HashMap::new();
    for k in &movers {
        let there = at(k, active(&k.entity_type));
        for key in [k.clone(), there] {
            let held = if &key == k {
                records[k].quarantined
            } else {
                kept.get(&key).is_some_and(|n| n.quarantined)
            };
            if held
                && !quarantine.contains_key(&key)
                && let Some(q) = storage.quarantine(&key).await?
            {
                quarantine.insert(key, q);
            }
        }
    }
    let mut released: HashSet<EntityKey> = HashSet::new();
    for k in movers {
        let gen_now = active(&k.entity_type).clone();
        let Some(r) = records.get_mut(&k) else {
            continue;
        };
        if save && (r.state.is_some() || r.quarantined) {
            let home = at(&k, &r.generation);
            let there = kept.get(&home);
            // Saved already at this point or later (a re-run, or a host
            // that moved it back and forth): nothing to add.
            let newer = there.is_none_or(|e| {
                e.position < r.position
                    || (e.position == r.position && e.quarantined != r.quarantined)
            });
            if newer {
                moves.saved.push(EntityUpdate {
                    key: home.clone(),
                    state: r.state.clone().unwrap_or(serde_json::Value::Null),
                    position: r.position,
                    head: r.position,
                    expected_head: there.map(|e| e.head).unwrap_or(0),
                    plugin: r.plugin.clone(),
                    quarantined: r.quarantined,
                    generation: r.generation.clone(),
                });
                if r.quarantined
                    && let Some(q) = quarantine.get(&k)
                {
                    let mut q = q.clone();
                    q.key = home;
                    moves.quarantines.push(q);
                }
            }
        }
        let theirs = kept.get(&at(&k, &gen_now));
        if save {
            match theirs {
                Some(n) if n.quarantined => {
                    if let Some(q) = quarantine.get(&n.key) {
                        let mut q = q.clone();
                        q.key = k.clone();
                        moves.quarantines.push(q);
                    }
                }
                _ if r.quarantined => {
                    released.insert(k.clone());
                }
                _ => {}
            }
        }
        *r = EntityRecord {
            key: k.clone(),
            state: theirs.and_then(|n| n.state.clone()),
            position: theirs.map(|n| n.position).unwrap_or(0),
            head: r.head,
            plugin: theirs.and_then(|n| n.plugin.clone()),
            quarantined: theirs.is_some_and(|n| n.quarantined),
            generation: gen_now,
        };
    }
    moves.released = released.into_iter().collect();
    Ok(moves)
}

#[cfg(test)]
mod tests {
    use super::*;

    use refold_store::{Commit, StateStore as _};
    use refold_store_sqlite::SqliteStore;
    use serde_json::json;

    fn update(key: EntityKey, n: u64, generation: &str, expected: u64) -> EntityUpdate {
        EntityUpdate {
            key,
            state: json!({ "n": n, "g": generation }),
            position: n,
            head: n,
            expected_head: expected,
            plugin: None,
            quarantined: false,
            generation: generation.into(),
        }
    }

    /// A live record of the first generation, met when a rebuilt one is
    /// active: saved under `type#base`, replaced by the rebuilt state with the
    /// live head kept; a record already in the active generation is left.
    #[tokio::test]
    async fn a_record_of_another_generation_is_saved_and_replaced() {
        let s = SqliteStore::in_memory().unwrap();
        let live = EntityKey::new("account", "a");
        let other = EntityKey::new("account", "b");
        let g2 = "account#feed.1";
        s.commit(Commit {
            entities: vec![
                EntityUpdate {
                    head: 5,
                    ..update(live.clone(), 5, "", 0)
                },
                update(other.clone(), 2, g2, 0),
                update(EntityKey::new(g2, "a"), 3, g2, 0),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
        let gens: Generations = [("account".to_string(), Generation::from(g2))].into();
        let mut recs = s.load(&[live.clone(), other.clone()]).await.unwrap();
        let moves = resolve(&s, &gens, &mut recs, true).await.unwrap();
        let a = &recs[&live];
        assert_eq!((a.position, a.head), (3, 5), "the live head is the fence");
        assert_eq!(a.generation, g2);
        assert_eq!(a.state, Some(json!({"n": 3, "g": g2})));
        assert_eq!(recs[&other].state, Some(json!({"n": 2, "g": g2})));
        assert_eq!(moves.saved.len(), 1);
        let saved = &moves.saved[0];
        assert_eq!(saved.key, EntityKey::new("account#base", "a"));
        assert_eq!((saved.position, saved.generation.as_str()), (5, ""));

        // Saved once: a second pass (a re-run) adds nothing.
        s.commit(Commit {
            entities: moves.saved,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut again = s.load(std::slice::from_ref(&live)).await.unwrap();
        assert!(
            resolve(&s, &gens, &mut again, true)
                .await
                .unwrap()
                .saved
                .is_empty()
        );
    }

    #[test]
    fn namespaces() {
        assert_eq!(namespace("account", &Generation::base()), "account#base");
        assert_eq!(
            namespace("account", &Generation::from("account#abc.1")),
            "account#abc.1"
        );
        let id = new_id("account", "0123456789abcdef0123");
        assert!(id.as_str().starts_with("account#0123456789ab."), "{id}");
    }
}

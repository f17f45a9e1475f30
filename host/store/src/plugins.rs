//! The plugin registry's persistence: every uploaded version (bytes and
//! identity) and the activation of each entity type. Kept in the same
//! backend as the states, so in cluster mode every host sees one registry.

use async_trait::async_trait;
use refold_types::Generation;
use serde::{Deserialize, Serialize};

/// Text stored for an enum of records, and back; unknown text is an error
/// that names what was read (a store written by a newer host, or rot).
macro_rules! stored_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// As stored.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownVariant;
            fn from_str(s: &str) -> Result<Self, UnknownVariant> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownVariant {
                        what: stringify!($name),
                        text: s.chars().take(64).collect(),
                    }),
                }
            }
        }
    };
}

/// Stored text that names no variant of the enum it is read as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {text:?} in the store")]
pub struct UnknownVariant {
    /// The enum.
    pub what: &'static str,
    /// What was stored (at most 64 characters).
    pub text: String,
}

stored_enum! {
    /// How an activation took over.
    ActivationMode {
        /// The new version folds on from the states it finds.
        Forward = "forward",
        /// The new version's states were rebuilt from history first.
        Rebuild = "rebuild",
        /// The previous version came back.
        Rollback = "rollback",
    }
}

stored_enum! {
    /// Where a rebuild is.
    RebuildState {
        /// Refolding the histories.
        Running = "running",
        /// Refolded; folding what arrived meanwhile before the cut-over.
        CatchingUp = "catching_up",
        /// Cut over.
        Done = "done",
        /// Stopped by an error; its generation is dropped.
        Failed = "failed",
        /// Claimed for cleanup (its process looked dead), generation not
        /// dropped yet.
        Abandoning = "abandoning",
        /// Cleaned up.
        Abandoned = "abandoned",
    }
}

impl RebuildState {
    /// Whether it is over, one way or another.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RebuildState::Done | RebuildState::Failed | RebuildState::Abandoned
        )
    }
}

/// One stored plugin version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginVersion {
    /// The entity type it owns.
    pub entity_type: String,
    /// Plugin name.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// sha256 of the component, hex: the identity.
    pub digest: String,
    /// Component size in bytes.
    pub size: u64,
    /// When it was uploaded (RFC 3339).
    pub uploaded_at: String,
}

/// Which version of an entity type is active, and what it replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Activation {
    /// Entity type.
    pub entity_type: String,
    /// Active digest.
    pub digest: String,
    /// Digest active before this one (the rollback target).
    pub previous: Option<String>,
    /// How it took over.
    pub mode: ActivationMode,
    /// The generation of states this version serves: kept by a forward
    /// swap, new with each rebuild. Writing this row is the cut-over.
    #[serde(default)]
    pub generation: Generation,
    /// The generation active before (restored by a rollback).
    #[serde(default)]
    pub previous_generation: Option<Generation>,
    /// Monotonic per entity type: hosts apply an activation only if newer.
    pub seq: i64,
    /// When (RFC 3339).
    pub activated_at: String,
    /// Digests of this entity type that a rollback moved away from and that
    /// no activation has chosen again since, oldest first. The watched
    /// plugin directory never activates these: its file is still there
    /// after the rollback, and would otherwise undo it at the next restart.
    /// Carried from activation to activation in the same row, so that it
    /// changes atomically with the rollback that sets it.
    #[serde(default)]
    pub rolled_back: Vec<String>,
}

/// A rebuild as the store keeps it: what it builds, how far it got, and who
/// runs it, so that its status survives the process and a rebuild whose
/// process died can be found and cleaned up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildRecord {
    /// Rebuild id (unique across restarts).
    pub id: String,
    /// Entity type.
    pub entity_type: String,
    /// Digest being built.
    pub digest: String,
    /// Generation being built (empty until it is chosen).
    pub generation: Generation,
    /// Where it is.
    pub state: RebuildState,
    /// Entities refolded.
    pub entities_done: u64,
    /// Entities to refold.
    pub entities_total: u64,
    /// Events refolded.
    pub events_done: u64,
    /// Events to refold (at start).
    pub events_total: u64,
    /// Entities the new version quarantined.
    pub quarantined: u64,
    /// Why it failed or was abandoned.
    pub error: Option<String>,
    /// The host process running it.
    pub owner: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it ended (RFC 3339).
    pub finished_at: Option<String>,
    /// Last sign of life of its owner (ms since the Unix epoch, the owner's
    /// clock). Every write of the record moves it, so it is also the
    /// record's version for [`PluginStore::put_rebuild`].
    pub heartbeat_ms: i64,
}

/// An activation as a history entry keeps it (JSON: every field, and
/// fields added later read back with their defaults).
pub fn history_entry(a: &Activation) -> serde_json::Result<String> {
    serde_json::to_string(a)
}

/// The history of an entity type from its stored entries (as
/// [`history_entry`] wrote them) and the current activation: newest first,
/// `seq` below `before`, at most `limit`. The current activation stands
/// for its `seq` whatever the history holds; an entry that does not read
/// back is `Corrupt`.
pub fn merge_history<S: AsRef<str>>(
    entries: &[S],
    current: Option<Activation>,
    before: Option<i64>,
    limit: usize,
) -> crate::error::Result<Vec<Activation>> {
    let mut kept = entries
        .iter()
        .map(|j| {
            serde_json::from_str(j.as_ref()).map_err(|e| {
                crate::StoreError::Corrupt(format!("an activation_history entry: {e}"))
            })
        })
        .collect::<crate::error::Result<Vec<Activation>>>()?;
    if let Some(c) = current
        && before.is_none_or(|b| c.seq < b)
    {
        kept.retain(|a| a.seq != c.seq);
        kept.push(c);
    }
    kept.retain(|a| before.is_none_or(|b| a.seq < b));
    kept.sort_by_key(|a| std::cmp::Reverse(a.seq));
    kept.truncate(limit);
    Ok(kept)
}

/// Persistence of the plugin registry.
#[async_trait]
pub trait PluginStore: Send + Sync {
    /// Store a version (idempotent by digest).
    async fn put_plugin(&self, v: &PluginVersion, bytes: &[u8]) -> crate::error::Result<()>;
    /// Versions of an entity type, oldest first.
    async fn plugin_versions(&self, entity_type: &str) -> crate::error::Result<Vec<PluginVersion>>;
    /// The bytes of a version.
    async fn plugin_bytes(&self, digest: &str) -> crate::error::Result<Option<Vec<u8>>>;
    /// The activation of one entity type, if any: a point read.
    async fn activation(&self, entity_type: &str) -> crate::error::Result<Option<Activation>>;
    /// The current activation of every entity type, sorted by entity type.
    async fn activations(&self) -> crate::error::Result<Vec<Activation>>;
    /// Record an activation: the first of its entity type (`seq` 1), or the
    /// successor of the one with `seq - 1`. Conditional, so that two hosts
    /// activating at once cannot both win: the loser gets
    /// [`StoreError::Fenced`](super::StoreError::Fenced).
    async fn put_activation(&self, a: &Activation) -> crate::error::Result<()>;
    /// Past and current activations of an entity type, newest first, those
    /// with `seq` below `before` (all when `None`), at most `limit`.
    /// [`put_activation`](Self::put_activation) keeps each one it records;
    /// the current one is always listed, even when it was recorded before
    /// the history was kept. Where the store cannot write both in one
    /// transaction (Cassandra), a writer that died between the two leaves
    /// a gap in `seq`, never a wrong entry.
    async fn activation_history(
        &self,
        entity_type: &str,
        before: Option<i64>,
        limit: usize,
    ) -> crate::error::Result<Vec<Activation>>;
    /// Write a rebuild record. `expected_heartbeat` `None`: create it (not
    /// written if the id exists). `Some(h)`: replace it only if the stored
    /// record's `heartbeat_ms` is still `h`: a compare-and-set, so that an
    /// owner that lost its rebuild to a cleanup, or a cleanup racing an
    /// owner that came back, finds out instead of overwriting. Returns
    /// whether it was written.
    async fn put_rebuild(
        &self,
        r: &RebuildRecord,
        expected_heartbeat: Option<i64>,
    ) -> crate::error::Result<bool>;
    /// Every stored rebuild record, in no promised order.
    async fn rebuilds(&self) -> crate::error::Result<Vec<RebuildRecord>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: i64, digest: &str) -> Activation {
        Activation {
            entity_type: "t".into(),
            digest: digest.into(),
            previous: None,
            mode: ActivationMode::Forward,
            generation: Generation::default(),
            previous_generation: None,
            seq,
            activated_at: String::new(),
            rolled_back: Vec::new(),
        }
    }

    fn seqs(v: &[Activation]) -> Vec<i64> {
        v.iter().map(|a| a.seq).collect()
    }

    fn entries(v: &[Activation]) -> Vec<String> {
        v.iter().map(|a| history_entry(a).unwrap()).collect()
    }

    #[test]
    fn the_current_activation_stands_for_its_seq_and_pages_go_back() {
        // The history lost seq 3's row (a failed write after the win) and
        // holds a stale copy of seq 2: the current row wins for its seq.
        let kept = entries(&[at(1, "a"), at(2, "stale"), at(4, "d")]);
        let current = Some(at(2, "b"));
        let merge = |before, limit| merge_history(&kept, current.clone(), before, limit).unwrap();
        let all = merge(None, 10);
        assert_eq!(seqs(&all), [4, 2, 1]);
        assert_eq!(all[1].digest, "b");
        assert_eq!(seqs(&merge(None, 2)), [4, 2]);
        assert_eq!(seqs(&merge(Some(2), 10)), [1]);
        assert!(merge(Some(1), 10).is_empty());
        assert!(
            merge_history::<String>(&[], None, None, 10)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn an_entry_that_does_not_read_back_is_corrupt() {
        let e = merge_history(&["{not json"], None, None, 10).unwrap_err();
        assert!(matches!(e, crate::StoreError::Corrupt(_)), "{e:?}");
    }
}

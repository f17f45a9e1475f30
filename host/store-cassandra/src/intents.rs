//! Intents: the read-model part of a commit, recorded (as JSON, in chunks)
//! before its entity batches, so that a commit interrupted after some of
//! them applied still gets its effects written, by this process or the next.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use refold_store::{EntityKey, QuarantineRecord};

/// One read-model operation, as kept in an intent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProjOp {
    pub(crate) projection: String,
    pub(crate) key: String,
    /// `None`: delete.
    pub(crate) body: Option<Value>,
}

/// The read-model effects of one commit, written with one timestamp.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Effects {
    /// Write timestamp (microseconds since the epoch) of every effect.
    pub(crate) ts: i64,
    pub(crate) quarantines: Vec<QuarantineRecord>,
    pub(crate) projections: Vec<ProjOp>,
    /// Entities whose quarantine record is removed.
    #[serde(default)]
    pub(crate) released: Vec<EntityKey>,
    /// One new event per entity of the commit: if none of them is stored,
    /// none of the commit's entity batches applied, and its effects must
    /// not be applied either.
    #[serde(default)]
    pub(crate) probes: Vec<(EntityKey, String)>,
}

impl Effects {
    pub(crate) fn is_empty(&self) -> bool {
        self.quarantines.is_empty() && self.projections.is_empty() && self.released.is_empty()
    }
}

/// An intent: effects recorded before the entity batches, under an id.
#[derive(Debug, Clone)]
pub(crate) struct Intent {
    pub(crate) id: String,
    pub(crate) effects: Effects,
}

/// Split `s` into pieces of at most `max` bytes, on character boundaries
/// (an intent row holds one piece).
pub(crate) fn split_utf8(s: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while rest.len() > max {
        let mut cut = max;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (a, b) = rest.split_at(cut);
        out.push(a);
        rest = b;
    }
    out.push(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_keeps_characters_whole() {
        let s = "aé".repeat(1000);
        let parts = split_utf8(&s, 7);
        assert!(parts.iter().all(|p| p.len() <= 7 && !p.is_empty()));
        assert_eq!(parts.concat(), s);
        assert_eq!(split_utf8("", 5), vec![""]);
    }
}

//! The one error of every storage method, and listing cursors.

use serde::Serialize;

/// A listing cursor the store did not issue (or cannot read back).
#[derive(Debug, thiserror::Error)]
#[error("invalid cursor {0:?}: pass back the `next` of a previous page")]
pub struct BadCursor(pub String);

/// A cursor from a store's position: opaque to clients and safe in a URL
/// (hex of its JSON).
pub fn encode_cursor<T: Serialize>(position: &T) -> String {
    hex::encode(serde_json::to_vec(position).unwrap_or_default())
}

/// The position a cursor from [`encode_cursor`] holds.
pub fn decode_cursor<T: serde::de::DeserializeOwned>(cursor: &str) -> Result<T, BadCursor> {
    hex::decode(cursor)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| BadCursor(cursor.chars().take(64).collect()))
}

/// What every storage method returns.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Failure of a storage operation. Backends classify their driver's errors
/// into these at their boundary, so callers decide by kind, never by text.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached, timed out or is out of space: retry
    /// later; nothing was lost.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A fenced write lost: another writer is ahead of us for this entity.
    #[error("write fenced: {0}")]
    Fenced(String),
    /// What was asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// What the store holds cannot be read back (a rotted row, a value of
    /// the wrong shape): never taken for "absent".
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    /// A listing cursor the store did not issue.
    #[error(transparent)]
    BadCursor(#[from] BadCursor),
    /// This backend does not offer what was asked.
    #[error("not supported by this store: {0}")]
    Unsupported(String),
    /// Anything else.
    #[error(transparent)]
    Other(anyhow::Error),
}

impl StoreError {
    /// Whether retrying later may succeed (an outage, not a verdict).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

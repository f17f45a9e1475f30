//! Generations: lineages of entity states. A state is only ever folded
//! forward within its own generation; a rebuild starts a new one and the
//! activation that cuts over to it makes it current.

use serde::{Deserialize, Serialize};

/// The generation a state belongs to: the base one (every state folded
/// before any rebuild), or the id a rebuild gave its lineage. Kept as text
/// in both stores, the base generation as the empty string.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(transparent)]
pub struct Generation(String);

impl Generation {
    /// The first generation of every entity type.
    pub const fn base() -> Generation {
        Generation(String::new())
    }

    /// Whether this is the base generation.
    pub fn is_base(&self) -> bool {
        self.0.is_empty()
    }

    /// As stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for Generation {
    fn from(s: String) -> Self {
        Generation(s)
    }
}

impl From<&str> for Generation {
    fn from(s: &str) -> Self {
        Generation(s.to_string())
    }
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_base() {
            f.write_str("base")
        } else {
            f.write_str(&self.0)
        }
    }
}

impl PartialEq<str> for Generation {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Generation {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::Generation;

    #[test]
    fn the_base_generation_is_stored_as_the_empty_string() {
        assert!(Generation::base().is_base());
        assert_eq!(serde_json::to_string(&Generation::base()).unwrap(), "\"\"");
        let g: Generation = serde_json::from_str("\"account-1\"").unwrap();
        assert!(!g.is_base());
        assert_eq!(g, "account-1");
        assert_eq!(Generation::base().to_string(), "base");
    }
}

//! Content digests: a component's version id and a record's fingerprint.

use sha2::{Digest as _, Sha256};

/// sha256 of `bytes`, lowercase hex.
pub fn digest_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

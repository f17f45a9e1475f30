//! Content digests: a component's version id and a record's fingerprint;
//! and the one stable hash the host spreads things with.

use sha2::{Digest as _, Sha256};

/// sha256 of `bytes`, lowercase hex.
pub fn digest_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// FNV-1a (64-bit) of `bytes`: the same in every build, process and run
/// (std's hasher promises none of that), for what must land in the same
/// place each time: a JSONL file's partition tag, a Cassandra shard, a
/// source's lane.
pub fn stable_hash(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stable_hash_is_fnv1a() {
        // Reference values of FNV-1a 64.
        assert_eq!(stable_hash(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_hash(*b"foobar"), 0x8594_4171_f739_67e8);
    }
}

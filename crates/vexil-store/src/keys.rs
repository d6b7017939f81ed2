//! API key material: `vx_<prefix>_<secret>`, 8 random bytes of public prefix (how the key is found
//! and named in logs) and 32 of secret, both hex. Only the SHA-256 of the whole key is stored: the
//! key has 256 random bits, so a slow password hash would add nothing but latency to every request.

use sha2::{Digest, Sha256};

use crate::error::StoreError;

/// A new key: (the key to show once, its prefix, the hash to store).
pub(crate) fn generate() -> Result<(String, String, String), StoreError> {
    let mut bytes = [0u8; 40];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Internal(format!("no randomness for a key: {e}")))?;
    let prefix = hex(&bytes[..8]);
    let key = format!("vx_{prefix}_{}", hex(&bytes[8..]));
    let hash = hash(&key);
    Ok((key, prefix, hash))
}

/// The prefix of a key as presented, if it is shaped like one of ours.
pub(crate) fn prefix_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("vx_")?;
    let (prefix, secret) = rest.split_once('_')?;
    let hex_of = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex_of(prefix, 16) && hex_of(secret, 64)).then_some(prefix)
}

/// The stored form of a key.
pub(crate) fn hash(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// Compares two hashes in time independent of where they differ.
pub(crate) fn same_hash(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_has_its_prefix_and_hash() {
        let (key, prefix, stored) = generate().unwrap();
        assert_eq!(prefix_of(&key), Some(prefix.as_str()));
        assert!(same_hash(&stored, &hash(&key)));
        assert!(!same_hash(&stored, &hash(&format!("{key}x"))));
        let (other, _, _) = generate().unwrap();
        assert_ne!(key, other);
    }

    #[test]
    fn only_well_formed_keys_have_a_prefix() {
        assert_eq!(prefix_of("vx_0123456789abcdef_".to_owned().as_str()), None);
        assert_eq!(prefix_of("Bearer abc"), None);
        let key = format!("vx_0123456789abcdef_{}", "a".repeat(64));
        assert_eq!(prefix_of(&key), Some("0123456789abcdef"));
    }
}

//! Chained block keys from token ids: the helper every process of a cluster
//! uses, so that all of them name the same prefix the same way.
//!
//! # Definition (stable; a change is a format break)
//!
//! For blocks of `T` tokens, only full blocks are keyed. With a 64-bit
//! `seed` shared by the cluster (use 0 unless tenants must not share):
//!
//! ```text
//! key[0] = XXH3-128(seed, le32(t[0]) ‖ … ‖ le32(t[T-1]))
//! key[i] = XXH3-128(seed, key[i-1] ‖ le32(t[iT]) ‖ … ‖ le32(t[iT+T-1]))
//! ```
//!
//! where a key is the 16-byte big-endian encoding of the 128-bit hash and
//! `le32` is the little-endian `u32` of a token id. The parent key enters the
//! hash, so a key names its whole prefix. The Python client implements the
//! same function (`strata.keys.chain_keys`) and a shared test vector pins it.

use strata_proto::BlockKey;

/// The key of one block given its parent's key (`None` for the first block).
pub fn block_key(seed: u64, parent: Option<&BlockKey>, tokens: &[u32]) -> BlockKey {
    let mut buf = Vec::with_capacity(16 + tokens.len() * 4);
    if let Some(p) = parent {
        buf.extend_from_slice(p.as_bytes());
    }
    for t in tokens {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    let h = xxhash_rust::xxh3::xxh3_128_with_seed(&buf, seed);
    BlockKey::new(&h.to_be_bytes()).expect("16 bytes is a valid key")
}

/// Keys of every full block of `tokens` (a trailing partial block has none).
pub fn chain_keys(seed: u64, tokens: &[u32], tokens_per_block: usize) -> Vec<BlockKey> {
    assert!(tokens_per_block > 0, "tokens_per_block must be at least 1");
    let mut out: Vec<BlockKey> = Vec::with_capacity(tokens.len() / tokens_per_block);
    for block in tokens.chunks_exact(tokens_per_block) {
        let k = block_key(seed, out.last(), block);
        out.push(k);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_vector() {
        // Shared with clients/python/tests: changing these breaks every
        // cluster that mixes client versions.
        let toks: Vec<u32> = (0..8).collect();
        let k = chain_keys(0, &toks, 4);
        assert_eq!(k.len(), 2);
        assert_eq!(k[0].to_hex(), PINNED[0]);
        assert_eq!(k[1].to_hex(), PINNED[1]);
    }

    // Computed independently with Python: xxhash.xxh3_128_digest(data, seed=0).
    const PINNED: [&str; 2] = [
        "5211a8db825216270898ce701a11e56c",
        "7063b31de008879e8a93b874edee894b",
    ];

    #[test]
    fn prefix_property() {
        let a: Vec<u32> = (0..64).collect();
        let mut b = a.clone();
        b[40] = 999;
        let ka = chain_keys(7, &a, 16);
        let kb = chain_keys(7, &b, 16);
        assert_eq!(ka[..2], kb[..2]);
        assert_ne!(ka[2], kb[2]);
        assert_ne!(ka[3], kb[3], "a key names its whole prefix");
        assert_ne!(chain_keys(8, &a, 16)[0], ka[0], "seed separates");
        assert_eq!(
            chain_keys(7, &a[..63], 16).len(),
            3,
            "partial blocks are not keyed"
        );
    }
}

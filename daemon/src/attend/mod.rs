//! Attention near the data (the `Attend` RPC; COMPUTE.md §1, §3, §4).
//!
//! For one layer and a batch of sequences, each a chain of block keys and
//! that sequence's decode queries, the daemon returns per query head the
//! partial attention `(o, lse)` over the tokens of the longest present
//! prefix of the chain: dense (every token, exact), sparse (blocks or leaves chosen
//! best-first by the upper bound of `q.k` from their key abstracts, within
//! a token budget, sink and recent blocks always in) or SparF (per KV head,
//! the top-r channels of the queries score every token, the top-k tokens
//! are attended exactly). The engine merges it with its own part by
//! log-sum-exp (`strata_kernels::attention::merge_into`).
//!
//! * [`summary`]: what the store keeps per block in DRAM: per layer, KV
//!   head and leaf (`compute.leaf_tokens`; one leaf = the whole block) the
//!   min/max key abstract, and a checksum of each leaf's K and V rows per
//!   layer.
//! * [`exec`]: validation against the layout, block selection, reads in
//!   bounded waves (DRAM in place; NVMe through the tier's I/O engine, only
//!   the layer's 4 KiB-aligned ranges, coalesced), verification, and the
//!   math on a bounded blocking pool.
//! * [`runs`]: per chain and layer, the blocks' key sketches copied
//!   channel-major (`compute.sketch_runs_bytes`), so that SparF's channel
//!   scan streams; derived ranking data, checked block by block against the
//!   pinned chain before use.
//!
//! Invariants:
//! * every block is pinned while it is read; a missing block ends the
//!   covered prefix (said in the answer), it is never skipped;
//! * every byte computed on was verified since it was read: a layer's K or
//!   V (or the rows of the leaves SPARSE chose) against its leaves' summary
//!   checksums, or the whole block (whole record from
//!   NVMe) when the block has no summary; a failure is a corrupt block
//!   (dropped, counted) and ends the covered prefix there;
//! * the math never runs on the async runtime's threads, and at most
//!   `compute.threads` blocks of it run at once;
//! * memory per call is bounded: NVMe reads go in waves of at most
//!   `compute.read_wave_bytes`, each computed and released before the next.

pub mod exec;
mod fetch;
pub mod quant;
pub mod runs;
pub mod summary;
#[cfg(test)]
mod tests;

pub use summary::{Geom, SummaryRegion, SummaryView};

/// Summaries kept by the store (`compute.abstracts`, `compute.abstracts_bytes`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SummaryConfig {
    pub enabled: bool,
    /// Size of the region; 0 = [`default_region_bytes`].
    pub bytes: u64,
    /// Entries also hold key sketches for SparF (`compute.key_sketch`).
    pub sketch: bool,
    /// Tokens per summary leaf (`compute.leaf_tokens`; 0: the whole block).
    pub leaf_tokens: u32,
}

impl Default for SummaryConfig {
    fn default() -> Self {
        SummaryConfig {
            enabled: true,
            bytes: 0,
            sketch: false,
            leaf_tokens: 0,
        }
    }
}

/// The summary region's default size for tiers of `capacity` bytes in
/// all: the abstracts of 16-bit KV are `1 / leaf_tokens` of it (two f16
/// per channel per leaf against `2 * leaf_tokens` f16 of K and V; a whole
/// block counts as vLLM's 16 tokens), and the sketch section adds five
/// sixteenths (half of K, and V sums of a sixteenth at 16 tokens).
/// At least 1 MiB.
pub fn default_region_bytes(capacity: u64, sketch: bool, leaf_tokens: u32) -> u64 {
    let per = match leaf_tokens {
        0 => 16,
        t => t as u64,
    };
    let sketch_bytes = if sketch { capacity / 16 * 5 } else { 0 };
    (capacity / per + sketch_bytes).max(1 << 20)
}

/// Which leaf level SPARSE ranks at (`compute.leaf_level`), when the
/// summaries have leaves smaller than a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafLevel {
    /// Per (namespace, layer), from the skew learned from what was
    /// attended (`exec::SkewTable`).
    Adaptive,
    /// Always the leaves.
    Leaf,
    /// Always whole blocks (the leaves' union boxes).
    Block,
}

/// Limits and defaults of the Attend RPC (the `[compute]` section).
#[derive(Debug, Clone, PartialEq)]
pub struct AttendConfig {
    /// Blocking tasks of Attend math at once.
    pub threads: usize,
    /// Attend calls admitted at once (running or waiting).
    pub max_inflight: usize,
    pub max_sequences: usize,
    pub max_query_heads: usize,
    /// SPARSE default budget, a fraction of the covered tokens.
    pub sparse_budget_fraction: f64,
    /// NVMe bytes read before the math runs on them (one wave).
    pub read_wave_bytes: u64,
    /// Promote NVMe-only blocks into DRAM before reading them.
    pub promote: bool,
    /// Region of the sketch runs ([`runs`]); 0: none.
    pub sketch_runs_bytes: u64,
    /// SPARSE's leaf level (`compute.leaf_level`).
    pub leaf_level: LeafLevel,
    /// SPARF's two-stage ranking: candidate blocks per chosen block
    /// (`compute.sparf_candidates`); 0: one stage on r channels.
    pub sparf_candidates: usize,
    /// `compute.hotness` on: a block is hot, touched and (NVMe-only)
    /// promoted in the background, when it carried at least this many
    /// times an even share (1 / blocks present) of some query head's
    /// attention in an answer. None: every pinned block is touched.
    pub hot_factor: Option<f64>,
    /// Region of the quant copies ([`quant`], `compute.quant_bytes`); 0:
    /// none.
    pub quant_bytes: u64,
}

impl Default for AttendConfig {
    fn default() -> Self {
        AttendConfig {
            threads: 2,
            max_inflight: 64,
            max_sequences: 256,
            max_query_heads: 256,
            sparse_budget_fraction: 0.05,
            read_wave_bytes: 64 << 20,
            promote: false,
            sketch_runs_bytes: 0,
            leaf_level: LeafLevel::Adaptive,
            sparf_candidates: 3,
            hot_factor: Some(1.0),
            quant_bytes: 0,
        }
    }
}

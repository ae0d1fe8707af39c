//! Physical tiers: where block bytes live. A tier hands out space and moves
//! bytes; it never decides what to evict or admit (that is `store/`).
//!
//! Only the DRAM tier exists so far. The NVMe tier (log-structured segments
//! with O_DIRECT through io_uring) joins here with its own type; the store
//! addresses blocks by `(TierKind, addr)`, keeps per-tier books and policies,
//! and already counts children per tier, so it slots in without reshaping.

pub mod alloc;
pub mod dram;
pub mod nvme;

pub use dram::{DramConfig, DramError, DramTier};

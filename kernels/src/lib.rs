//! Pure compute for Strata: no I/O, no allocation per call.
//!
//! * [`checksum`]: the block checksum (XXH3-64, seed 0), vectorised with
//!   run-time AVX2 dispatch, and checked against an independent
//!   implementation in tests.
//! * [`block`]: where each layer's K and V live inside a layer-major block
//!   payload, so that clients gather and scatter layer by layer.
//!
//! Attention kernels (partial attention with log-sum-exp, key abstracts,
//! top-k) and their CUDA twins join this crate with the compute features.

pub mod block;
pub mod checksum;

//! Pure compute for Strata: no I/O, no allocation per call.
//!
//! * [`checksum`]: the block checksum (XXH3-64, seed 0), vectorised with
//!   run-time AVX2 dispatch, and checked against an independent
//!   implementation in tests.
//! * [`block`]: where each layer's K and V live inside a layer-major block
//!   payload, so that clients gather and scatter layer by layer.
//! * [`attention`]: partial attention `(o, lse)` of a GQA group over a token
//!   set, and the exact log-sum-exp merge of partials (COMPUTE.md §1).
//! * [`topk`]: deterministic top-k of scores.
//! * [`abstracts`]: per-chunk key abstracts (min/max/mean, f16) and the
//!   upper bound `UB(q) >= q.k` (LeoAM, COMPUTE.md §3).
//! * [`sparf`]: SparF channel-subset scoring over dim-major K, then exact
//!   attention over the chosen tokens (InstInfer, COMPUTE.md §4).
//! * [`quant`]: int8/int4 per-channel asymmetric quantisation of cold KV.
//! * [`retrieval`]: RetrievalAttention's index over keys (key-kNN backbone,
//!   co-retrieval edges from training queries, beam search by `q.k`,
//!   incremental inserts; COMPUTE.md §5).
//! * `gpu` (feature `cuda`): the CUDA twins of the kernels above, compiled
//!   at run time with NVRTC (`kernels/cuda/*.cu`).
//!
//! Kernels take caller-made scratch and outputs, compute in f32 whatever
//! the storage type ([`elem::KvElem`]: f32, f16, bf16), and pick AVX2+FMA
//! at run time where it pays (attention, upper bounds, SparF scoring).

pub mod abstracts;
pub mod attention;
pub mod block;
pub mod checksum;
pub mod elem;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod quant;
pub mod retrieval;
mod simd;
pub mod sketch;
pub mod sparf;
#[cfg(test)]
mod testing;
pub mod topk;

pub use elem::KvElem;

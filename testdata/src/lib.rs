//! Test data that can tell a good attention method from a naive one
//! (COMPUTE.md §2), the metrics every feature is judged by, and a reader
//! for real captured Q/K/V so that the same gates run on model data.
//!
//! * [`generator`]: the seeded synthetic KV head (semantic and needle
//!   regimes, GQA groups), calibrated to the attention skew of real heads;
//! * [`gates`]: skew, out of distribution, dynamics and index hardness,
//!   each a function returning what it measured;
//! * [`metrics`]: mass, relerr, recall@k, scan%, read%, and the oracle at a
//!   budget, with f64 references;
//! * [`ivf`]: the query-agnostic index the hardness gate measures;
//! * [`capture`] and [`npy`]: captured tensors (`meta.json` + `.npy` per
//!   layer) as [`HeadData`];
//! * [`rng`] and [`detmath`]: the platform-independent randomness and
//!   transcendental functions that make a seed give the same bits anywhere.
//!
//! Everything a consumer needs is one [`HeadData`] per KV head: keys,
//! values, training and decode queries, and what each decode step may see.

pub mod capture;
pub mod data;
pub mod detmath;
pub mod gates;
pub mod generator;
pub mod ivf;
mod json;
pub mod linalg;
pub mod metrics;
pub mod npy;
pub mod rng;

pub use data::HeadData;
pub use generator::{Config, Generator, Regime, Synthetic};

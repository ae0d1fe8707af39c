//! `stratad`: the Strata daemon as a library. `main.rs` parses flags, loads
//! the config and calls [`daemon::run`]; tests and benchmarks drive the
//! same library.

pub mod attend;
pub mod config;
pub mod metrics;
pub mod retrieval;
pub mod server;
pub mod store;
pub mod tier;

//! The NVMe tier: log-structured segment files under the data directory,
//! written and read with O_DIRECT through an I/O engine (io_uring, or psync
//! where io_uring is unavailable).

pub mod buf;
pub mod engine;

//! The Strata wire API (`strata.v1`) and the only code that knows protobuf.
//!
//! * [`pb`] is the generated prost/tonic code, used by the daemon's gRPC
//!   service and by clients.
//! * [`domain`] holds the validated domain types the rest of the system works
//!   with. They do not derive prost or serde.
//! * [`convert`] turns wire messages into domain types on receipt
//!   (`TryFrom`); every failure is a [`FieldError`] that names the field and
//!   the reason, mapped to `INVALID_ARGUMENT`.

pub mod convert;
pub mod domain;
pub mod shm;

#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod pb {
    tonic::include_proto!("strata.v1");
}

pub use convert::FieldError;
pub use domain::*;

/// XXH3-64 with seed 0: the checksum every producer writes and every reader
/// verifies. One definition (in `strata-kernels`, vectorised) so that no two
/// components disagree.
#[inline]
pub fn checksum(bytes: &[u8]) -> u64 {
    strata_kernels::checksum::xxh3_64(bytes)
}

//! The one place that maps errors to gRPC status codes.

use tonic::{Code, Status};

use crate::store::StoreError;

pub fn code_of(e: &StoreError) -> Code {
    match e {
        StoreError::Invalid(_)
        | StoreError::ChecksumMismatch { .. }
        | StoreError::LeaseUnknown(_) => Code::InvalidArgument,
        StoreError::UnknownNamespace(_)
        | StoreError::NotFound { .. }
        | StoreError::Corrupt { .. } => Code::NotFound,
        StoreError::Conflict { .. } => Code::AlreadyExists,
        StoreError::NoSpace { .. } | StoreError::Limit { .. } | StoreError::Quota { .. } => {
            Code::ResourceExhausted
        }
        StoreError::LayoutCollision(_) => Code::AlreadyExists,
        StoreError::LeaseGone(_)
        | StoreError::NotLeased { .. }
        | StoreError::ReservationGone { .. } => Code::FailedPrecondition,
        StoreError::LeaseForeign { .. } => Code::PermissionDenied,
        StoreError::Busy { .. } => Code::Aborted,
        StoreError::NoTier(_) | StoreError::LayoutNotRegistered(_) => Code::FailedPrecondition,
        StoreError::Internal(_) => Code::Internal,
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        Status::new(code_of(&e), e.to_string())
    }
}

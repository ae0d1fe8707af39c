//! Errors of the store. Each says which request field it concerns and what
//! the caller can do; `server::status` maps them to gRPC codes in one place.

use strata_proto::{BlockKey, FieldError, LeaseId, NamespaceId, ReservationId, TierKind};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Invalid(#[from] FieldError),

    #[error("namespace_id: namespace {0} is not registered; call RegisterLayout first")]
    UnknownNamespace(NamespaceId),

    #[error(
        "namespace_id: namespace {0} was recovered from disk but its layout is not registered yet; call RegisterLayout before storing"
    )]
    LayoutNotRegistered(NamespaceId),

    #[error("{field}: block {key} is not present in namespace {ns}")]
    NotFound {
        field: String,
        key: BlockKey,
        ns: NamespaceId,
    },

    #[error(
        "{field}: checksum mismatch for block {key}: the header says {expected:016x}, the bytes hash to {actual:016x}; nothing was stored"
    )]
    ChecksumMismatch {
        field: String,
        key: BlockKey,
        expected: u64,
        actual: u64,
    },

    #[error(
        "{field}: block {key} is already present with different content (length {stored_len}, checksum {stored_checksum:016x}; this put: length {len}, checksum {checksum:016x}); keys must identify content"
    )]
    Conflict {
        field: String,
        key: BlockKey,
        stored_len: u64,
        stored_checksum: u64,
        len: u64,
        checksum: u64,
    },

    #[error(
        "{tier} tier: no space for a block of {needed} bytes: {pinned_bytes} bytes are pinned by leases or reads and {reserved_bytes} bytes are reserved by puts in flight out of {capacity} bytes; release leases or raise the tier size"
    )]
    NoSpace {
        tier: &'static str,
        needed: u64,
        pinned_bytes: u64,
        reserved_bytes: u64,
        capacity: u64,
    },

    #[error(
        "tenant {tenant}: {tier} quota exceeded: this needs {needed} bytes and the tenant uses {used} of its {quota} bytes ({pinned} pinned by leases or reads, {reserved} reserved by puts in flight), and its other blocks cannot make room; release leases, delete blocks, or raise the quota ([[tenants]] {tier}_bytes)"
    )]
    Quota {
        tenant: std::sync::Arc<str>,
        tier: &'static str,
        quota: u64,
        used: u64,
        pinned: u64,
        reserved: u64,
        needed: u64,
    },

    #[error(
        "layout: namespace {0} is already registered with a different layout (a namespace id collision); change tenant_salt"
    )]
    LayoutCollision(NamespaceId),

    #[error("{limit}: {detail}")]
    Limit { limit: &'static str, detail: String },

    #[error(
        "lease_id: lease {} has expired or was released; take a new lease with Lookup",
        .0.0
    )]
    LeaseGone(LeaseId),

    #[error("lease_id: lease {} was never issued by this daemon", .0.0)]
    LeaseUnknown(LeaseId),

    #[error("lease_id: lease {} belongs to namespace {owner}, not {ns}", .lease.0)]
    LeaseForeign {
        lease: LeaseId,
        owner: NamespaceId,
        ns: NamespaceId,
    },

    #[error("{field}: block {key} is not covered by lease {}", .lease.0)]
    NotLeased {
        field: String,
        key: BlockKey,
        lease: LeaseId,
    },

    #[error(
        "{field}: reservation {} has expired, was aborted, or was already committed; reserve again",
        .id.0
    )]
    ReservationGone { field: String, id: ReservationId },

    #[error(
        "{field}: block {key} failed its checksum when read from {tier} and was dropped; treat as a miss and recompute"
    )]
    Corrupt {
        field: String,
        key: BlockKey,
        tier: &'static str,
    },

    #[error("{field}: block {key} is being dropped after a failed checksum; retry shortly")]
    Busy { field: String, key: BlockKey },

    #[error("tier {0:?} is not configured on this daemon")]
    NoTier(TierKind),

    /// A bug or a lost worker: nothing the caller did.
    #[error("internal error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether retrying the same request later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::NoSpace { .. }
                | StoreError::Limit { .. }
                | StoreError::Busy { .. }
                | StoreError::Quota { .. }
        )
    }
}

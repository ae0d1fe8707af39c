//! Conversion of received wire messages into validated domain requests.
//!
//! Each `TryFrom` checks everything that can be checked without the daemon's
//! state or configuration (key lengths, enum values, non-zero ids, layout
//! dimensions). Configured limits (keys per call, block sizes the arena can
//! hold) are checked by the server, which knows them.

use std::fmt;

use crate::domain::*;
use crate::pb;

/// A request field that failed validation: always answered with
/// `INVALID_ARGUMENT` and the message `"<field>: <reason>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for FieldError {}

impl From<FieldError> for tonic::Status {
    fn from(e: FieldError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

impl From<LayoutError> for FieldError {
    fn from(e: LayoutError) -> Self {
        FieldError::new(e.field, e.reason)
    }
}

fn key(field: &str, b: &[u8]) -> Result<BlockKey, FieldError> {
    BlockKey::new(b).map_err(|e| FieldError::new(field, e.to_string()))
}

fn keys(field: &str, v: &[bytes::Bytes]) -> Result<Vec<BlockKey>, FieldError> {
    if v.is_empty() {
        return Err(FieldError::new(field, "at least one key is required"));
    }
    // The field name is formatted only for the key that fails: this runs
    // for every key of every call (2,048 keys of a 32K-token Attend).
    v.iter()
        .enumerate()
        .map(|(i, b)| {
            BlockKey::new(b).map_err(|e| FieldError::new(format!("{field}[{i}]"), e.to_string()))
        })
        .collect()
}

fn parent(field: &str, b: &[u8]) -> Result<Option<BlockKey>, FieldError> {
    if b.is_empty() {
        Ok(None)
    } else {
        key(field, b).map(Some)
    }
}

fn namespace(v: u64) -> Result<NamespaceId, FieldError> {
    if v == 0 {
        return Err(FieldError::new(
            "namespace_id",
            "is missing (0); register a layout first to obtain one",
        ));
    }
    Ok(NamespaceId(v))
}

impl TryFrom<pb::Dtype> for Dtype {
    type Error = FieldError;
    fn try_from(d: pb::Dtype) -> Result<Self, FieldError> {
        match d {
            pb::Dtype::F32 => Ok(Dtype::F32),
            pb::Dtype::F16 => Ok(Dtype::F16),
            pb::Dtype::Bf16 => Ok(Dtype::Bf16),
            pb::Dtype::Fp8E4m3 => Ok(Dtype::Fp8E4m3),
            pb::Dtype::Unspecified => Err(FieldError::new(
                "layout.dtype",
                "is unspecified; one of f32, f16, bf16, fp8_e4m3",
            )),
        }
    }
}

impl From<Dtype> for pb::Dtype {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => pb::Dtype::F32,
            Dtype::F16 => pb::Dtype::F16,
            Dtype::Bf16 => pb::Dtype::Bf16,
            Dtype::Fp8E4m3 => pb::Dtype::Fp8E4m3,
        }
    }
}

impl From<TierKind> for pb::Tier {
    fn from(t: TierKind) -> Self {
        match t {
            TierKind::Gpu => pb::Tier::Gpu,
            TierKind::Dram => pb::Tier::Dram,
            TierKind::Cxl => pb::Tier::Cxl,
            TierKind::Nvme => pb::Tier::Nvme,
            TierKind::Remote => pb::Tier::Remote,
        }
    }
}

impl TryFrom<pb::Tier> for TierKind {
    type Error = FieldError;
    fn try_from(t: pb::Tier) -> Result<Self, FieldError> {
        Ok(match t {
            pb::Tier::Gpu => TierKind::Gpu,
            pb::Tier::Dram => TierKind::Dram,
            pb::Tier::Cxl => TierKind::Cxl,
            pb::Tier::Nvme => TierKind::Nvme,
            pb::Tier::Remote => TierKind::Remote,
            pb::Tier::Unspecified => return Err(FieldError::new("tier", "is unspecified")),
        })
    }
}

impl TryFrom<pb::Layout> for Layout {
    type Error = FieldError;
    fn try_from(l: pb::Layout) -> Result<Self, FieldError> {
        let dtype = pb::Dtype::try_from(l.dtype)
            .map_err(|_| FieldError::new("layout.dtype", format!("unknown value {}", l.dtype)))?
            .try_into()?;
        let kv_kind = match pb::KvKind::try_from(l.kv_kind) {
            Ok(pb::KvKind::Separate) => KvKind::Separate,
            Ok(pb::KvKind::Mla) => KvKind::Mla,
            Ok(pb::KvKind::Unspecified) => {
                return Err(FieldError::new(
                    "layout.kv_kind",
                    "is unspecified; SEPARATE or MLA",
                ));
            }
            Err(_) => {
                return Err(FieldError::new(
                    "layout.kv_kind",
                    format!("unknown value {}", l.kv_kind),
                ));
            }
        };
        let layout = Layout {
            model_id: l.model_id,
            dtype,
            num_layers: l.num_layers,
            num_kv_heads: l.num_kv_heads,
            head_dim: l.head_dim,
            tokens_per_block: l.tokens_per_block,
            kv_kind,
            tp_rank: l.tp_rank,
            tp_size: l.tp_size,
            tenant_salt: l.tenant_salt.to_vec(),
        };
        layout.validate()?;
        Ok(layout)
    }
}

impl From<&Layout> for pb::Layout {
    fn from(l: &Layout) -> Self {
        pb::Layout {
            model_id: l.model_id.clone(),
            dtype: pb::Dtype::from(l.dtype) as i32,
            num_layers: l.num_layers,
            num_kv_heads: l.num_kv_heads,
            head_dim: l.head_dim,
            tokens_per_block: l.tokens_per_block,
            kv_kind: match l.kv_kind {
                KvKind::Separate => pb::KvKind::Separate,
                KvKind::Mla => pb::KvKind::Mla,
            } as i32,
            tp_rank: l.tp_rank,
            tp_size: l.tp_size,
            tenant_salt: l.tenant_salt.clone().into(),
        }
    }
}

/// Lookup of a chain of keys, optionally leasing the hits.
#[derive(Debug, Clone)]
pub struct LookupReq {
    pub namespace: NamespaceId,
    pub keys: Vec<BlockKey>,
    /// 0 = no lease.
    pub lease_ttl_ms: u32,
    /// Return the arena slot of every hit (requires a lease).
    pub want_slots: bool,
}

impl TryFrom<pb::LookupRequest> for LookupReq {
    type Error = FieldError;
    fn try_from(r: pb::LookupRequest) -> Result<Self, FieldError> {
        if r.want_slots && r.lease_ttl_ms == 0 {
            return Err(FieldError::new(
                "want_slots",
                "needs lease_ttl_ms > 0: slots stay valid only under a lease",
            ));
        }
        Ok(LookupReq {
            namespace: namespace(r.namespace_id)?,
            keys: keys("keys", &r.keys)?,
            lease_ttl_ms: r.lease_ttl_ms,
            want_slots: r.want_slots,
        })
    }
}

/// The header of one block in a Put stream.
#[derive(Debug, Clone, Copy)]
pub struct PutHeader {
    pub namespace: NamespaceId,
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub length: u64,
    pub checksum: u64,
}

impl PutHeader {
    /// `block` is the index of the block within its stream, for the message.
    pub fn from_pb(h: &pb::PutHeader, block: usize) -> Result<Self, FieldError> {
        let f = |name: &str| format!("blocks[{block}].{name}");
        if h.length == 0 {
            return Err(FieldError::new(f("length"), "must be at least 1"));
        }
        Ok(PutHeader {
            namespace: namespace(h.namespace_id)
                .map_err(|e| FieldError::new(f("namespace_id"), e.reason))?,
            key: key(&f("key"), &h.key)?,
            parent: parent(&f("parent"), &h.parent)?,
            length: h.length,
            checksum: h.checksum,
        })
    }
}

#[derive(Debug, Clone)]
pub struct GetReq {
    pub namespace: NamespaceId,
    pub keys: Vec<BlockKey>,
    pub lease: Option<LeaseId>,
}

impl TryFrom<pb::GetRequest> for GetReq {
    type Error = FieldError;
    fn try_from(r: pb::GetRequest) -> Result<Self, FieldError> {
        Ok(GetReq {
            namespace: namespace(r.namespace_id)?,
            keys: keys("keys", &r.keys)?,
            lease: (r.lease_id != 0).then_some(LeaseId(r.lease_id)),
        })
    }
}

#[derive(Debug, Clone)]
pub struct DeleteReq {
    pub namespace: NamespaceId,
    pub keys: Vec<BlockKey>,
}

impl TryFrom<pb::DeleteRequest> for DeleteReq {
    type Error = FieldError;
    fn try_from(r: pb::DeleteRequest) -> Result<Self, FieldError> {
        Ok(DeleteReq {
            namespace: namespace(r.namespace_id)?,
            keys: keys("keys", &r.keys)?,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ReleaseReq {
    pub lease: LeaseId,
    /// When given, the lease must belong to this namespace.
    pub namespace: Option<NamespaceId>,
}

impl TryFrom<pb::ReleaseRequest> for ReleaseReq {
    type Error = FieldError;
    fn try_from(r: pb::ReleaseRequest) -> Result<Self, FieldError> {
        if r.lease_id == 0 {
            return Err(FieldError::new("lease_id", "is missing (0)"));
        }
        Ok(ReleaseReq {
            lease: LeaseId(r.lease_id),
            namespace: (r.namespace_id != 0).then_some(NamespaceId(r.namespace_id)),
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ReserveBlock {
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub length: u64,
}

#[derive(Debug, Clone)]
pub struct ReserveReq {
    pub namespace: NamespaceId,
    pub blocks: Vec<ReserveBlock>,
    /// 0 = daemon default.
    pub ttl_ms: u32,
}

impl TryFrom<pb::ReserveRequest> for ReserveReq {
    type Error = FieldError;
    fn try_from(r: pb::ReserveRequest) -> Result<Self, FieldError> {
        if r.blocks.is_empty() {
            return Err(FieldError::new("blocks", "at least one block is required"));
        }
        let blocks = r
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if b.length == 0 {
                    return Err(FieldError::new(
                        format!("blocks[{i}].length"),
                        "must be at least 1",
                    ));
                }
                Ok(ReserveBlock {
                    key: key(&format!("blocks[{i}].key"), &b.key)?,
                    parent: parent(&format!("blocks[{i}].parent"), &b.parent)?,
                    length: b.length,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(ReserveReq {
            namespace: namespace(r.namespace_id)?,
            blocks,
            ttl_ms: r.ttl_ms,
        })
    }
}

#[derive(Debug, Clone)]
pub struct CommitReq {
    pub blocks: Vec<(ReservationId, u64)>,
}

impl TryFrom<pb::CommitRequest> for CommitReq {
    type Error = FieldError;
    fn try_from(r: pb::CommitRequest) -> Result<Self, FieldError> {
        if r.blocks.is_empty() {
            return Err(FieldError::new("blocks", "at least one block is required"));
        }
        let blocks = r
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if b.reservation_id == 0 {
                    return Err(FieldError::new(
                        format!("blocks[{i}].reservation_id"),
                        "is missing (0)",
                    ));
                }
                Ok((ReservationId(b.reservation_id), b.checksum))
            })
            .collect::<Result<_, _>>()?;
        Ok(CommitReq { blocks })
    }
}

#[derive(Debug, Clone)]
pub struct GetSlotsReq {
    pub namespace: NamespaceId,
    pub lease: LeaseId,
    pub keys: Vec<BlockKey>,
}

impl TryFrom<pb::GetSlotsRequest> for GetSlotsReq {
    type Error = FieldError;
    fn try_from(r: pb::GetSlotsRequest) -> Result<Self, FieldError> {
        if r.lease_id == 0 {
            return Err(FieldError::new(
                "lease_id",
                "is missing (0); take a lease with Lookup(lease_ttl_ms > 0) first",
            ));
        }
        Ok(GetSlotsReq {
            namespace: namespace(r.namespace_id)?,
            lease: LeaseId(r.lease_id),
            keys: keys("keys", &r.keys)?,
        })
    }
}

/// Most namespaces one subscription may name.
pub const SUBSCRIBE_NAMESPACES_MAX: usize = 1024;
/// Largest event batch a subscriber may ask for.
pub const EVENT_BATCH_MAX: u32 = 4096;
/// Event batch size when the subscriber names none.
pub const EVENT_BATCH_DEFAULT: u32 = 256;

#[derive(Debug, Clone)]
pub struct SubscribeReq {
    /// Empty = every namespace.
    pub namespaces: Vec<NamespaceId>,
    pub after_seq: u64,
    pub snapshot: bool,
    pub max_batch: u32,
}

impl TryFrom<pb::SubscribeRequest> for SubscribeReq {
    type Error = FieldError;
    fn try_from(r: pb::SubscribeRequest) -> Result<Self, FieldError> {
        if r.namespace_ids.len() > SUBSCRIBE_NAMESPACES_MAX {
            return Err(FieldError::new(
                "namespace_ids",
                format!(
                    "{} namespaces; at most {SUBSCRIBE_NAMESPACES_MAX} (or none for all)",
                    r.namespace_ids.len()
                ),
            ));
        }
        let namespaces = r
            .namespace_ids
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                namespace(v).map_err(|e| FieldError::new(format!("namespace_ids[{i}]"), e.reason))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if r.max_batch > EVENT_BATCH_MAX {
            return Err(FieldError::new(
                "max_batch",
                format!("{} is more than {EVENT_BATCH_MAX}", r.max_batch),
            ));
        }
        Ok(SubscribeReq {
            namespaces,
            after_seq: r.after_seq,
            snapshot: r.snapshot,
            max_batch: if r.max_batch == 0 {
                EVENT_BATCH_DEFAULT
            } else {
                r.max_batch
            },
        })
    }
}

/// How an Attend call chooses the tokens it attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttendMode {
    Dense,
    Sparse,
    Sparf,
    Retrieval,
}

/// The budget of a sparse Attend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// The daemon's default fraction of the covered tokens.
    Default,
    Tokens(u32),
    /// Bytes of K and V of the layer; converted into tokens.
    Bytes(u64),
}

/// Which blocks an Attend sequence covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chain {
    /// Its keys, in chain order.
    Keys(Vec<BlockKey>),
    /// The chain ending at `tail`, `blocks` long, followed back through
    /// the parent links the daemon kept.
    Tail { tail: BlockKey, blocks: u32 },
}

impl Chain {
    /// Blocks the caller says the chain has.
    pub fn len(&self) -> usize {
        match self {
            Chain::Keys(k) => k.len(),
            Chain::Tail { blocks, .. } => *blocks as usize,
        }
    }

    /// Never: a chain has at least one block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The dtype of an Attend call's queries and outputs on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDtype {
    F32,
    F16,
    Bf16,
}

impl IoDtype {
    /// `v` as this dtype's little-endian bytes, rounded to nearest even;
    /// empty for F32 (the values go as f32 themselves).
    pub fn pack(self, v: &[f32]) -> bytes::Bytes {
        let bits = |f: fn(f32) -> u16| -> bytes::Bytes {
            v.iter().flat_map(|&x| f(x).to_le_bytes()).collect()
        };
        match self {
            IoDtype::F32 => bytes::Bytes::new(),
            IoDtype::F16 => bits(|x| half::f16::from_f32(x).to_bits()),
            IoDtype::Bf16 => bits(|x| half::bf16::from_f32(x).to_bits()),
        }
    }

    /// Little-endian values of this 2-byte dtype as f32 (a trailing odd
    /// byte is ignored: callers check the length); empty for F32.
    pub fn unpack(self, b: &[u8]) -> Vec<f32> {
        let bits = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
        match self {
            IoDtype::F32 => Vec::new(),
            IoDtype::F16 => bits.map(|x| half::f16::from_bits(x).to_f32()).collect(),
            IoDtype::Bf16 => bits.map(|x| half::bf16::from_bits(x).to_f32()).collect(),
        }
    }
}

/// One sequence of an Attend call.
#[derive(Debug, Clone)]
pub struct AttendSeq {
    pub chain: Chain,
    /// Tokens of the last key's block to attend (None: all it holds).
    pub last_block_tokens: Option<u32>,
    /// `[heads][head_dim]`, every value finite; the shape is checked
    /// against the layout by the daemon.
    pub queries: Vec<f32>,
}

/// An Attend call, checked as far as it can be without the layout.
#[derive(Debug, Clone)]
pub struct AttendReq {
    pub namespace: NamespaceId,
    pub layer: u32,
    pub mode: AttendMode,
    /// None: `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    pub sequences: Vec<AttendSeq>,
    pub budget: Budget,
    pub sparf_channels: Option<u32>,
    pub sparf_tokens: Option<u32>,
    /// SPARF: top-k single tokens instead of whole blocks.
    pub sparf_by_token: bool,
    /// SPARF: SparQ's mean-value correction (the answer is then not a
    /// mergeable partial).
    pub sparf_mean_correction: bool,
    /// SPARF: one choice of tokens for the layer across KV heads.
    pub sparf_joint_heads: bool,
    /// RETRIEVAL: top-k per query head and candidate list.
    pub retrieval: RetrievalParams,
    /// Queries came, and outputs go, in this dtype.
    pub io_dtype: IoDtype,
    /// The lowest precision the daemon may compute on for NVMe-only
    /// blocks (from its int8/int4 copies).
    pub min_precision: Precision,
}

/// The lowest precision of KV an Attend may compute on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Precision {
    /// The stored K and V only.
    Stored,
    Int8,
    Int4,
}

impl TryFrom<pb::AttendRequest> for AttendReq {
    type Error = FieldError;
    fn try_from(r: pb::AttendRequest) -> Result<Self, FieldError> {
        let namespace = namespace(r.namespace_id)?;
        let mode = match pb::AttendMode::try_from(r.mode) {
            Ok(pb::AttendMode::Dense) => AttendMode::Dense,
            Ok(pb::AttendMode::Sparse) => AttendMode::Sparse,
            Ok(pb::AttendMode::Sparf) => AttendMode::Sparf,
            Ok(pb::AttendMode::Retrieval) => AttendMode::Retrieval,
            Ok(pb::AttendMode::Unspecified) => {
                return Err(FieldError::new(
                    "mode",
                    "is unspecified; DENSE, SPARSE, SPARF or RETRIEVAL",
                ));
            }
            Err(_) => {
                return Err(FieldError::new("mode", format!("unknown value {}", r.mode)));
            }
        };
        if !r.scale.is_finite() || r.scale < 0.0 {
            return Err(FieldError::new(
                "scale",
                format!(
                    "{} is not a positive finite number (0 = 1/sqrt(head_dim))",
                    r.scale
                ),
            ));
        }
        if r.sequences.is_empty() {
            return Err(FieldError::new(
                "sequences",
                "at least one sequence is required",
            ));
        }
        let budget = match (r.budget_tokens, r.budget_bytes) {
            (0, 0) => Budget::Default,
            (t, 0) => Budget::Tokens(t),
            (0, b) => Budget::Bytes(b),
            _ => {
                return Err(FieldError::new(
                    "budget_bytes",
                    "give budget_tokens or budget_bytes, not both",
                ));
            }
        };
        if mode != AttendMode::Sparse && budget != Budget::Default {
            let f = if r.budget_tokens != 0 {
                "budget_tokens"
            } else {
                "budget_bytes"
            };
            return Err(FieldError::new(f, "only SPARSE takes a budget"));
        }
        if mode != AttendMode::Sparf {
            for (f, v) in [
                ("sparf_channels", r.sparf_channels),
                ("sparf_tokens", r.sparf_tokens),
            ] {
                if v != 0 {
                    return Err(FieldError::new(f, "only SPARF takes this parameter"));
                }
            }
            for (f, v) in [
                ("sparf_by_token", r.sparf_by_token),
                ("sparf_mean_correction", r.sparf_mean_correction),
                ("sparf_joint_heads", r.sparf_joint_heads),
            ] {
                if v {
                    return Err(FieldError::new(f, "only SPARF takes this parameter"));
                }
            }
        }
        if mode != AttendMode::Retrieval {
            for (f, v) in [
                ("retrieval_k", r.retrieval_k),
                ("retrieval_ef", r.retrieval_ef),
            ] {
                if v != 0 {
                    return Err(FieldError::new(f, "only RETRIEVAL takes this parameter"));
                }
            }
        }
        let retrieval =
            RetrievalParams::new("retrieval_k", r.retrieval_k, "retrieval_ef", r.retrieval_ef)?;
        let io_dtype = match pb::Dtype::try_from(r.io_dtype) {
            Ok(pb::Dtype::Unspecified | pb::Dtype::F32) => IoDtype::F32,
            Ok(pb::Dtype::F16) => IoDtype::F16,
            Ok(pb::Dtype::Bf16) => IoDtype::Bf16,
            Ok(pb::Dtype::Fp8E4m3) => {
                return Err(FieldError::new(
                    "io_dtype",
                    "FP8_E4M3 is not an Attend wire dtype; F32, F16 or BF16",
                ));
            }
            Err(_) => {
                return Err(FieldError::new(
                    "io_dtype",
                    format!("unknown value {}", r.io_dtype),
                ));
            }
        };
        let min_precision = match pb::Precision::try_from(r.min_precision) {
            Ok(pb::Precision::Unspecified | pb::Precision::Stored) => Precision::Stored,
            Ok(pb::Precision::Int8) => Precision::Int8,
            Ok(pb::Precision::Int4) => Precision::Int4,
            Err(_) => {
                return Err(FieldError::new(
                    "min_precision",
                    format!("unknown value {}", r.min_precision),
                ));
            }
        };
        if mode == AttendMode::Retrieval && min_precision != Precision::Stored {
            return Err(FieldError::new(
                "min_precision",
                "RETRIEVAL attends the stored K and V only; STORED or unspecified",
            ));
        }
        let mut sequences = Vec::with_capacity(r.sequences.len());
        for (i, mut s) in r.sequences.into_iter().enumerate() {
            let f = |name: &str| format!("sequences[{i}].{name}");
            let chain = attend_chain(&s, &f)?;
            let queries = attend_queries(&mut s, io_dtype, &f)?;
            sequences.push(AttendSeq {
                chain,
                last_block_tokens: (s.last_block_tokens != 0).then_some(s.last_block_tokens),
                queries,
            });
        }
        Ok(AttendReq {
            namespace,
            layer: r.layer,
            mode,
            scale: (r.scale != 0.0).then_some(r.scale),
            sequences,
            budget,
            sparf_channels: (r.sparf_channels != 0).then_some(r.sparf_channels),
            sparf_tokens: (r.sparf_tokens != 0).then_some(r.sparf_tokens),
            sparf_by_token: r.sparf_by_token,
            sparf_mean_correction: r.sparf_mean_correction,
            sparf_joint_heads: r.sparf_joint_heads,
            retrieval,
            io_dtype,
            min_precision,
        })
    }
}

/// A sequence's chain: its keys, or its tail and length.
fn attend_chain(s: &pb::AttendSequence, f: &dyn Fn(&str) -> String) -> Result<Chain, FieldError> {
    match (s.keys.is_empty(), s.chain_tail.is_empty()) {
        (false, false) => Err(FieldError::new(
            f("chain_tail"),
            "give keys or chain_tail, not both",
        )),
        (false, true) => {
            if s.chain_blocks != 0 {
                return Err(FieldError::new(
                    f("chain_blocks"),
                    "goes with chain_tail; with keys the chain is as long as they are",
                ));
            }
            Ok(Chain::Keys(keys(&f("keys"), &s.keys)?))
        }
        (true, false) => {
            if s.chain_blocks == 0 {
                return Err(FieldError::new(
                    f("chain_blocks"),
                    "is required with chain_tail: the number of blocks of the chain it ends",
                ));
            }
            Ok(Chain::Tail {
                tail: key(&f("chain_tail"), &s.chain_tail)?,
                blocks: s.chain_blocks,
            })
        }
        (true, true) => Err(FieldError::new(
            f("keys"),
            "at least one key is required (or chain_tail with chain_blocks)",
        )),
    }
}

/// A sequence's queries as f32, from `queries` or `queries_packed` as
/// `io` says; every value finite.
fn attend_queries(
    s: &mut pb::AttendSequence,
    io: IoDtype,
    f: &dyn Fn(&str) -> String,
) -> Result<Vec<f32>, FieldError> {
    let q = match io {
        IoDtype::F32 => {
            if !s.queries_packed.is_empty() {
                return Err(FieldError::new(
                    f("queries_packed"),
                    "is for io_dtype F16 or BF16; with F32 give queries",
                ));
            }
            if s.queries.is_empty() {
                return Err(FieldError::new(
                    f("queries"),
                    "is empty; [num_q_heads][head_dim] f32 values are required",
                ));
            }
            std::mem::take(&mut s.queries)
        }
        IoDtype::F16 | IoDtype::Bf16 => {
            if !s.queries.is_empty() {
                return Err(FieldError::new(
                    f("queries"),
                    "is for io_dtype F32; with F16 or BF16 give queries_packed",
                ));
            }
            let b = &s.queries_packed;
            if b.is_empty() || !b.len().is_multiple_of(2) {
                return Err(FieldError::new(
                    f("queries_packed"),
                    format!(
                        "{} bytes are not [num_q_heads][head_dim] 2-byte values",
                        b.len()
                    ),
                ));
            }
            io.unpack(b)
        }
    };
    if let Some(j) = q.iter().position(|x| !x.is_finite()) {
        let name = match io {
            IoDtype::F32 => "queries",
            _ => "queries_packed",
        };
        return Err(FieldError::new(
            f(&format!("{name}[{j}]")),
            format!("{} is not a finite number", q[j]),
        ));
    }
    Ok(q)
}

// ---- retrieval ------------------------------------------------------------

/// Largest `k` of a retrieval (the index's limit).
pub const RETRIEVAL_K_MAX: u32 = 1024;
/// Largest candidate list of a retrieval.
pub const RETRIEVAL_EF_MAX: u32 = 4096;
/// Default `k` (COMPUTE.md §5: top-100).
pub const RETRIEVAL_K_DEFAULT: u32 = 100;

/// Top-k and candidate list of a retrieval, checked (`ef`: None = the
/// index's tuned default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrievalParams {
    pub k: u32,
    pub ef: Option<u32>,
}

impl Default for RetrievalParams {
    fn default() -> Self {
        RetrievalParams {
            k: RETRIEVAL_K_DEFAULT,
            ef: None,
        }
    }
}

impl RetrievalParams {
    /// `k` (0 = 100) and `ef` (0 = tuned default), named as the caller's
    /// fields.
    pub fn new(k_field: &str, k: u32, ef_field: &str, ef: u32) -> Result<Self, FieldError> {
        let k = if k == 0 { RETRIEVAL_K_DEFAULT } else { k };
        if k > RETRIEVAL_K_MAX {
            return Err(FieldError::new(
                k_field,
                format!("{k} is above {RETRIEVAL_K_MAX}"),
            ));
        }
        if ef != 0 && (ef < k || ef > RETRIEVAL_EF_MAX) {
            return Err(FieldError::new(
                ef_field,
                format!("{ef} is outside k ({k}) to {RETRIEVAL_EF_MAX} (0 = the index's default)"),
            ));
        }
        Ok(RetrievalParams {
            k,
            ef: (ef != 0).then_some(ef),
        })
    }
}

/// Finite f32 values, or the field of the first that is not.
fn finite(field: &str, v: &[f32]) -> Result<(), FieldError> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(j) => Err(FieldError::new(
            format!("{field}[{j}]"),
            format!("{} is not a finite number", v[j]),
        )),
        None => Ok(()),
    }
}

/// Training queries of one layer: `[m][heads][d]` f32.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingQueries {
    pub layer: u32,
    pub heads: u32,
    pub queries: Vec<f32>,
}

/// A BuildIndex call, checked as far as it can be without the layout.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildIndexReq {
    pub namespace: NamespaceId,
    pub keys: Vec<BlockKey>,
    /// Empty: every layer.
    pub layers: Vec<u32>,
    /// Per layer given (shapes checked with the layout).
    pub training: Vec<TrainingQueries>,
    pub wait: bool,
    /// KV heads to index, each once (range checked with the layout).
    /// Empty: every KV head.
    pub kv_heads: Vec<u32>,
}

impl TryFrom<pb::BuildIndexRequest> for BuildIndexReq {
    type Error = FieldError;
    fn try_from(r: pb::BuildIndexRequest) -> Result<Self, FieldError> {
        let namespace = namespace(r.namespace_id)?;
        let keys = keys("keys", &r.keys)?;
        for (i, l) in r.layers.iter().enumerate() {
            if r.layers[..i].contains(l) {
                return Err(FieldError::new(
                    format!("layers[{i}]"),
                    format!("layer {l} is listed twice"),
                ));
            }
        }
        for (i, h) in r.kv_heads.iter().enumerate() {
            if r.kv_heads[..i].contains(h) {
                return Err(FieldError::new(
                    format!("kv_heads[{i}]"),
                    format!("KV head {h} is listed twice"),
                ));
            }
        }
        let mut training: Vec<TrainingQueries> = Vec::with_capacity(r.training_queries.len());
        for (i, t) in r.training_queries.into_iter().enumerate() {
            let f = format!("training_queries[{i}]");
            if training.iter().any(|x| x.layer == t.layer) {
                return Err(FieldError::new(
                    format!("{f}.layer"),
                    format!("layer {} has training queries twice", t.layer),
                ));
            }
            if !r.layers.is_empty() && !r.layers.contains(&t.layer) {
                return Err(FieldError::new(
                    format!("{f}.layer"),
                    format!("layer {} is not among the layers to index", t.layer),
                ));
            }
            finite(&format!("{f}.queries"), &t.queries)?;
            training.push(TrainingQueries {
                layer: t.layer,
                heads: t.num_q_heads,
                queries: t.queries,
            });
        }
        Ok(BuildIndexReq {
            namespace,
            keys,
            layers: r.layers,
            training,
            wait: r.wait,
            kv_heads: r.kv_heads,
        })
    }
}

/// A Retrieve call, checked as far as it can be without the layout.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrieveReq {
    pub namespace: NamespaceId,
    pub keys: Vec<BlockKey>,
    pub layer: u32,
    /// `[heads][d]` f32.
    pub queries: Vec<f32>,
    pub params: RetrievalParams,
}

impl TryFrom<pb::RetrieveRequest> for RetrieveReq {
    type Error = FieldError;
    fn try_from(r: pb::RetrieveRequest) -> Result<Self, FieldError> {
        let namespace = namespace(r.namespace_id)?;
        let keys = keys("keys", &r.keys)?;
        if r.queries.is_empty() {
            return Err(FieldError::new(
                "queries",
                "is empty; [num_q_heads][head_dim] f32 values are required",
            ));
        }
        finite("queries", &r.queries)?;
        let params = RetrievalParams::new("k", r.k, "ef", r.ef)?;
        Ok(RetrieveReq {
            namespace,
            keys,
            layer: r.layer,
            queries: r.queries,
            params,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attend_requests_are_checked_field_by_field() {
        let seq = |keys: Vec<bytes::Bytes>, queries: Vec<f32>| pb::AttendSequence {
            keys,
            last_block_tokens: 0,
            queries,
            ..Default::default()
        };
        let good = || pb::AttendRequest {
            namespace_id: 1,
            layer: 0,
            mode: pb::AttendMode::Dense as i32,
            scale: 0.0,
            sequences: vec![seq(vec![vec![1u8].into()], vec![0.5; 4])],
            ..Default::default()
        };
        let r = AttendReq::try_from(good()).unwrap();
        assert_eq!(r.mode, AttendMode::Dense);
        assert_eq!(r.scale, None);
        assert_eq!(r.budget, Budget::Default);
        let field = |r: pb::AttendRequest| AttendReq::try_from(r).unwrap_err().field;
        assert_eq!(field(pb::AttendRequest { mode: 0, ..good() }), "mode");
        assert_eq!(
            field(pb::AttendRequest {
                sequences: vec![],
                ..good()
            }),
            "sequences"
        );
        assert_eq!(
            field(pb::AttendRequest {
                sequences: vec![
                    seq(vec![vec![1u8].into()], vec![0.5; 4]),
                    seq(vec![], vec![1.0])
                ],
                ..good()
            }),
            "sequences[1].keys"
        );
        // A refused key is named with its index (formatted only then).
        assert_eq!(
            field(pb::AttendRequest {
                sequences: vec![seq(
                    vec![vec![1u8].into(), vec![0u8; 40].into()],
                    vec![0.5; 4]
                )],
                ..good()
            }),
            "sequences[0].keys[1]"
        );
        assert_eq!(
            field(pb::AttendRequest {
                sequences: vec![seq(vec![vec![1u8].into()], vec![0.5, f32::NAN])],
                ..good()
            }),
            "sequences[0].queries[1]"
        );
        assert_eq!(
            field(pb::AttendRequest {
                scale: -1.0,
                ..good()
            }),
            "scale"
        );
        assert_eq!(
            field(pb::AttendRequest {
                budget_tokens: 5,
                ..good()
            }),
            "budget_tokens"
        );
        assert_eq!(
            field(pb::AttendRequest {
                mode: pb::AttendMode::Sparse as i32,
                budget_tokens: 5,
                budget_bytes: 5,
                ..good()
            }),
            "budget_bytes"
        );
        assert_eq!(
            field(pb::AttendRequest {
                sparf_tokens: 5,
                ..good()
            }),
            "sparf_tokens"
        );
        assert_eq!(
            field(pb::AttendRequest {
                mode: pb::AttendMode::Sparse as i32,
                sparf_mean_correction: true,
                ..good()
            }),
            "sparf_mean_correction"
        );
        assert_eq!(
            field(pb::AttendRequest {
                mode: pb::AttendMode::Dense as i32,
                sparf_joint_heads: true,
                ..good()
            }),
            "sparf_joint_heads"
        );
        let r = AttendReq::try_from(pb::AttendRequest {
            mode: pb::AttendMode::Sparf as i32,
            sparf_mean_correction: true,
            ..good()
        })
        .unwrap();
        assert!(r.sparf_mean_correction && !r.sparf_by_token && !r.sparf_joint_heads);
        let r = AttendReq::try_from(pb::AttendRequest {
            mode: pb::AttendMode::Sparf as i32,
            sparf_joint_heads: true,
            ..good()
        })
        .unwrap();
        assert!(r.sparf_joint_heads);
        let r = AttendReq::try_from(pb::AttendRequest {
            mode: pb::AttendMode::Sparse as i32,
            budget_bytes: 4096,
            ..good()
        })
        .unwrap();
        assert_eq!(r.budget, Budget::Bytes(4096));
    }

    /// A chain is its keys or its tail with a length, never both or
    /// neither; queries come as f32 or packed as io_dtype says, and
    /// packing rounds to the nearest value of the dtype.
    #[test]
    fn attend_chains_by_tail_and_packed_queries() {
        let seq = |tail: &[u8], blocks: u32| pb::AttendSequence {
            chain_tail: tail.to_vec().into(),
            chain_blocks: blocks,
            queries: vec![0.5; 4],
            ..Default::default()
        };
        let req = |s: pb::AttendSequence, io: pb::Dtype| pb::AttendRequest {
            namespace_id: 1,
            mode: pb::AttendMode::Dense as i32,
            sequences: vec![s],
            io_dtype: io as i32,
            ..Default::default()
        };
        let r = AttendReq::try_from(req(seq(&[7], 2048), pb::Dtype::Unspecified)).unwrap();
        let tail = BlockKey::new(&[7]).unwrap();
        assert_eq!(r.sequences[0].chain, Chain::Tail { tail, blocks: 2048 });
        assert_eq!(r.sequences[0].chain.len(), 2048);
        assert_eq!(r.io_dtype, IoDtype::F32);
        let field = |r: pb::AttendRequest| AttendReq::try_from(r).unwrap_err().field;
        let f32_req = |s| req(s, pb::Dtype::F32);
        assert_eq!(field(f32_req(seq(&[7], 0))), "sequences[0].chain_blocks");
        assert_eq!(field(f32_req(seq(&[0; 40], 3))), "sequences[0].chain_tail");
        assert_eq!(field(f32_req(seq(&[], 0))), "sequences[0].keys");
        let both = pb::AttendSequence {
            keys: vec![vec![1u8].into()],
            ..seq(&[7], 3)
        };
        assert_eq!(field(f32_req(both)), "sequences[0].chain_tail");
        let keys_with_count = pb::AttendSequence {
            keys: vec![vec![1u8].into()],
            ..seq(&[], 3)
        };
        assert_eq!(field(f32_req(keys_with_count)), "sequences[0].chain_blocks");

        // Packed queries: f16 and bf16 values come back exactly.
        let vals = [0.5f32, -2.25, 1.0e-3, 3.0e4];
        for (io, pio) in [
            (IoDtype::F16, pb::Dtype::F16),
            (IoDtype::Bf16, pb::Dtype::Bf16),
        ] {
            let packed = io.pack(&vals);
            assert_eq!(packed.len(), 8);
            let back = io.unpack(&packed);
            for (a, b) in vals.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() * 4e-3, "{io:?}: {a} -> {b}");
            }
            assert_eq!(
                io.pack(&back),
                packed,
                "{io:?}: a packed value packs to itself"
            );
            let s = pb::AttendSequence {
                queries: vec![],
                queries_packed: packed.clone(),
                ..seq(&[7], 1)
            };
            let r = AttendReq::try_from(req(s.clone(), pio)).unwrap();
            assert_eq!(r.sequences[0].queries, back);
            assert_eq!(r.io_dtype, io);
            // f32 queries with a packed dtype, packed ones with f32, an odd
            // length, a non-finite value: each named.
            let f32_too = pb::AttendSequence {
                queries: vec![1.0],
                ..s.clone()
            };
            assert_eq!(field(req(f32_too, pio)), "sequences[0].queries");
            assert_eq!(
                field(req(s.clone(), pb::Dtype::F32)),
                "sequences[0].queries_packed"
            );
            let odd = pb::AttendSequence {
                queries_packed: packed.slice(..3),
                ..s.clone()
            };
            assert_eq!(field(req(odd, pio)), "sequences[0].queries_packed");
            let inf = pb::AttendSequence {
                queries_packed: io.pack(&[1.0, f32::INFINITY]),
                ..s.clone()
            };
            assert_eq!(field(req(inf, pio)), "sequences[0].queries_packed[1]");
        }
        assert_eq!(field(req(seq(&[7], 1), pb::Dtype::Fp8E4m3)), "io_dtype");
        assert_eq!(IoDtype::F32.pack(&vals), bytes::Bytes::new());
    }

    #[test]
    fn errors_name_the_field() {
        let r = pb::LookupRequest {
            namespace_id: 7,
            keys: vec![vec![1u8].into(), vec![0u8; 40].into()],
            ..Default::default()
        };
        let e = LookupReq::try_from(r).unwrap_err();
        assert_eq!(e.field, "keys[1]");
        assert!(e.reason.contains("40 bytes"), "{e}");

        let r = pb::LookupRequest {
            namespace_id: 0,
            keys: vec![vec![1u8].into()],
            ..Default::default()
        };
        assert_eq!(LookupReq::try_from(r).unwrap_err().field, "namespace_id");
        let r = pb::LookupRequest {
            namespace_id: 1,
            keys: vec![vec![1u8].into()],
            want_slots: true,
            ..Default::default()
        };
        assert_eq!(LookupReq::try_from(r).unwrap_err().field, "want_slots");
        let r = pb::LookupRequest {
            namespace_id: 0,
            keys: vec![vec![1u8].into()],
            ..Default::default()
        };
        assert_eq!(LookupReq::try_from(r).unwrap_err().field, "namespace_id");

        let h = pb::PutHeader {
            namespace_id: 1,
            key: vec![].into(),
            ..Default::default()
        };
        assert_eq!(
            PutHeader::from_pb(&h, 3).unwrap_err().field,
            "blocks[3].length"
        );
        let h = pb::PutHeader {
            namespace_id: 1,
            key: vec![].into(),
            length: 4,
            ..Default::default()
        };
        assert_eq!(
            PutHeader::from_pb(&h, 3).unwrap_err().field,
            "blocks[3].key"
        );

        let l = pb::Layout {
            model_id: "m".into(),
            dtype: 99,
            ..Default::default()
        };
        assert_eq!(Layout::try_from(l).unwrap_err().field, "layout.dtype");
    }

    #[test]
    fn retrieval_requests_are_checked_field_by_field() {
        let good = || pb::RetrieveRequest {
            namespace_id: 1,
            keys: vec![vec![1u8].into()],
            layer: 0,
            queries: vec![0.5; 4],
            k: 0,
            ef: 0,
        };
        let r = RetrieveReq::try_from(good()).unwrap();
        assert_eq!(r.params, RetrievalParams { k: 100, ef: None });
        let field = |r: pb::RetrieveRequest| RetrieveReq::try_from(r).unwrap_err().field;
        assert_eq!(field(pb::RetrieveRequest { k: 1025, ..good() }), "k");
        assert_eq!(field(pb::RetrieveRequest { ef: 99, ..good() }), "ef");
        assert_eq!(field(pb::RetrieveRequest { ef: 4097, ..good() }), "ef");
        assert_eq!(
            field(pb::RetrieveRequest {
                keys: vec![],
                ..good()
            }),
            "keys"
        );
        assert_eq!(
            field(pb::RetrieveRequest {
                queries: vec![],
                ..good()
            }),
            "queries"
        );
        assert_eq!(
            field(pb::RetrieveRequest {
                queries: vec![0.0, f32::NAN],
                ..good()
            }),
            "queries[1]"
        );
        assert_eq!(
            field(pb::RetrieveRequest {
                namespace_id: 0,
                ..good()
            }),
            "namespace_id"
        );
        let r = RetrieveReq::try_from(pb::RetrieveRequest {
            k: 10,
            ef: 10,
            ..good()
        })
        .unwrap();
        assert_eq!(
            r.params,
            RetrievalParams {
                k: 10,
                ef: Some(10)
            }
        );

        let build = || pb::BuildIndexRequest {
            namespace_id: 1,
            keys: vec![vec![1u8].into()],
            layers: vec![0, 1],
            training_queries: vec![pb::LayerQueries {
                layer: 1,
                queries: vec![0.5; 4],
                num_q_heads: 1,
            }],
            wait: true,
            kv_heads: vec![2, 0],
        };
        let b = BuildIndexReq::try_from(build()).unwrap();
        assert_eq!(b.training[0].layer, 1);
        assert_eq!(b.kv_heads, [2, 0]);
        let field = |r: pb::BuildIndexRequest| BuildIndexReq::try_from(r).unwrap_err().field;
        assert_eq!(
            field(pb::BuildIndexRequest {
                layers: vec![1, 1],
                ..build()
            }),
            "layers[1]"
        );
        assert_eq!(
            field(pb::BuildIndexRequest {
                kv_heads: vec![1, 0, 1],
                ..build()
            }),
            "kv_heads[2]"
        );
        let mut twice = build();
        twice
            .training_queries
            .push(twice.training_queries[0].clone());
        assert_eq!(field(twice), "training_queries[1].layer");
        assert_eq!(
            field(pb::BuildIndexRequest {
                layers: vec![0],
                ..build()
            }),
            "training_queries[0].layer"
        );
        let mut nan = build();
        nan.training_queries[0].queries[2] = f32::INFINITY;
        assert_eq!(field(nan), "training_queries[0].queries[2]");

        // Attend: RETRIEVAL's parameters belong to RETRIEVAL.
        let attend = |mode: pb::AttendMode, k: u32| pb::AttendRequest {
            namespace_id: 1,
            mode: mode as i32,
            sequences: vec![pb::AttendSequence {
                keys: vec![vec![1u8].into()],
                last_block_tokens: 0,
                queries: vec![0.5; 4],
                ..Default::default()
            }],
            retrieval_k: k,
            ..Default::default()
        };
        let field = |r: pb::AttendRequest| AttendReq::try_from(r).unwrap_err().field;
        assert_eq!(field(attend(pb::AttendMode::Sparf, 5)), "retrieval_k");
        assert_eq!(
            field(attend(pb::AttendMode::Retrieval, 5000)),
            "retrieval_k"
        );
        let r = AttendReq::try_from(attend(pb::AttendMode::Retrieval, 7)).unwrap();
        assert_eq!(r.mode, AttendMode::Retrieval);
        assert_eq!(r.retrieval, RetrievalParams { k: 7, ef: None });
    }
}

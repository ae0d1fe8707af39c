//! Retrieval indexes (RetrievalAttention, COMPUTE.md §5): `BuildIndex`
//! and `Retrieve`'s request and answer types. Attend's RETRIEVAL mode is
//! [`crate::attend::AttendMode::Retrieval`].

use strata_proto::{BlockKey, NamespaceId, pb};

/// Training queries of one layer: `[m][num_q_heads][head_dim]` f32.
#[derive(Debug, Clone)]
pub struct LayerQueries {
    pub layer: u32,
    pub num_q_heads: u32,
    pub queries: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct BuildIndexRequest {
    pub namespace: NamespaceId,
    /// The chain to index (its present prefix is).
    pub keys: Vec<BlockKey>,
    /// Empty: every layer.
    pub layers: Vec<u32>,
    pub training: Vec<LayerQueries>,
    /// Answer once every index is ready or failed.
    pub wait: bool,
    /// KV heads to index, each once. Empty: every KV head. Query heads of
    /// other KV heads are answered by an exact scan
    /// ([`RetrieveSource::ExactNoIndex`]).
    pub kv_heads: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexState {
    Building,
    Ready,
    Failed,
}

/// One (layer, KV head) index.
#[derive(Debug, Clone)]
pub struct IndexStatus {
    pub layer: u32,
    pub kv_head: u32,
    pub state: IndexState,
    pub progress: f32,
    pub tokens: u64,
    pub inserted_tokens: u64,
    pub memory_bytes: u64,
    pub default_ef: u32,
    pub error: String,
}

#[derive(Debug, Clone)]
pub struct BuildIndexOutput {
    pub keys_covered: u32,
    pub tokens_covered: u64,
    pub indexes: Vec<IndexStatus>,
}

impl BuildIndexOutput {
    /// Every index is ready.
    pub fn ready(&self) -> bool {
        self.indexes.iter().all(|i| i.state == IndexState::Ready)
    }
}

/// Where a query head's top-k came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetrieveSource {
    Index,
    /// Exact scan: no index covers the chain and layer, or its index does
    /// not hold this query head's KV head.
    ExactNoIndex,
    /// Exact scan: the index is still building (or failed).
    ExactBuilding,
    /// Exact scan: a covered block changed or is gone; the index was dropped.
    ExactStale,
}

impl RetrieveSource {
    pub(crate) fn of(v: i32) -> Result<Self, String> {
        match pb::RetrieveSource::try_from(v) {
            Ok(pb::RetrieveSource::Index) => Ok(RetrieveSource::Index),
            Ok(pb::RetrieveSource::ExactNoIndex) => Ok(RetrieveSource::ExactNoIndex),
            Ok(pb::RetrieveSource::ExactBuilding) => Ok(RetrieveSource::ExactBuilding),
            Ok(pb::RetrieveSource::ExactStale) => Ok(RetrieveSource::ExactStale),
            _ => Err(format!("unknown retrieval source {v}")),
        }
    }

    /// An exact scan answered.
    pub fn is_exact(self) -> bool {
        self != RetrieveSource::Index
    }
}

#[derive(Debug, Clone)]
pub struct RetrieveRequest {
    pub namespace: NamespaceId,
    pub keys: Vec<BlockKey>,
    pub layer: u32,
    /// `[num_q_heads][head_dim]`.
    pub queries: Vec<f32>,
    /// None: 100.
    pub k: Option<u32>,
    /// None: the index's tuned default.
    pub ef: Option<u32>,
}

/// One query head's answer.
#[derive(Debug, Clone)]
pub struct HeadHits {
    /// Token positions from the chain's first token, best first.
    pub positions: Vec<u64>,
    /// Raw `q.k` of each.
    pub scores: Vec<f32>,
    pub scanned: u32,
    pub source: RetrieveSource,
}

#[derive(Debug, Clone)]
pub struct RetrieveOutput {
    pub heads: Vec<HeadHits>,
    pub keys_present: u32,
    pub tokens_present: u64,
    pub inserted_tokens: u64,
}

fn keys_pb(keys: &[BlockKey]) -> Vec<bytes::Bytes> {
    keys.iter()
        .map(|k| bytes::Bytes::copy_from_slice(k.as_bytes()))
        .collect()
}

pub(crate) fn build_pb(r: &BuildIndexRequest) -> pb::BuildIndexRequest {
    pb::BuildIndexRequest {
        namespace_id: r.namespace.0,
        keys: keys_pb(&r.keys),
        layers: r.layers.clone(),
        training_queries: r
            .training
            .iter()
            .map(|t| pb::LayerQueries {
                layer: t.layer,
                queries: t.queries.clone(),
                num_q_heads: t.num_q_heads,
            })
            .collect(),
        wait: r.wait,
        kv_heads: r.kv_heads.clone(),
    }
}

pub(crate) fn build_output(r: pb::BuildIndexResponse) -> Result<BuildIndexOutput, String> {
    let indexes = r
        .indexes
        .into_iter()
        .map(|i| {
            let state = match pb::IndexState::try_from(i.state) {
                Ok(pb::IndexState::Building) => IndexState::Building,
                Ok(pb::IndexState::Ready) => IndexState::Ready,
                Ok(pb::IndexState::Failed) => IndexState::Failed,
                _ => return Err(format!("unknown index state {}", i.state)),
            };
            Ok(IndexStatus {
                layer: i.layer,
                kv_head: i.kv_head,
                state,
                progress: i.progress,
                tokens: i.tokens,
                inserted_tokens: i.inserted_tokens,
                memory_bytes: i.memory_bytes,
                default_ef: i.default_ef,
                error: i.error,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(BuildIndexOutput {
        keys_covered: r.keys_covered,
        tokens_covered: r.tokens_covered,
        indexes,
    })
}

pub(crate) fn retrieve_pb(r: &RetrieveRequest) -> pb::RetrieveRequest {
    pb::RetrieveRequest {
        namespace_id: r.namespace.0,
        keys: keys_pb(&r.keys),
        layer: r.layer,
        queries: r.queries.clone(),
        k: r.k.unwrap_or(0),
        ef: r.ef.unwrap_or(0),
    }
}

pub(crate) fn retrieve_output(r: pb::RetrieveResponse) -> Result<RetrieveOutput, String> {
    let heads = r
        .heads
        .into_iter()
        .map(|h| {
            if h.positions.len() != h.scores.len() {
                return Err(format!(
                    "{} positions with {} scores",
                    h.positions.len(),
                    h.scores.len()
                ));
            }
            Ok(HeadHits {
                positions: h.positions,
                scores: h.scores,
                scanned: h.scanned,
                source: RetrieveSource::of(h.source)?,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(RetrieveOutput {
        heads,
        keys_present: r.keys_present,
        tokens_present: r.tokens_present,
        inserted_tokens: r.inserted_tokens,
    })
}

//! Attention near the data: the `Attend` call's request and answer types,
//! and [`merge`], which combines the daemon's partial `(o, lse)` with the
//! engine's own part (the tokens it holds itself: sink, recent window).
//!
//! For disjoint token sets `A` and `B`, with per query head outputs `o`
//! (`[heads][head_dim]`) and log-sum-exps `lse` (`[heads]`, natural log of
//! the scaled scores, `-inf` for an empty set):
//!
//! ```text
//! lse = logaddexp(lse_A, lse_B)
//! o   = exp(lse_A - lse) * o_A + exp(lse_B - lse) * o_B   == attention over A ∪ B
//! ```
//!
//! An answer with SparF's mean-value correction
//! ([`AttendOutput::mean_corrected`]) is not such a partial: it estimates
//! attention over every present token, and [`AttendOutput::merge_with`]
//! refuses it.

use std::ops::Range;

pub use strata_proto::convert::{Chain, IoDtype, Precision};
use strata_proto::{NamespaceId, TierKind, pb};

/// How the daemon chooses the tokens it attends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttendMode {
    /// Every token of the present prefix: exact.
    Dense,
    /// Blocks best-first by the upper bound of `q.k` from their abstracts,
    /// within a budget; first (sink) and last (recent) blocks always in.
    Sparse(SparseBudget),
    /// SparF: `channels` (r, default head_dim/8) score every token; whole
    /// blocks best-first by their tokens' estimated weight until `tokens`
    /// (k, default covered/16) are in, or with `by_token` the top k single
    /// tokens, are attended exactly. `mean_correction`: SparQ's
    /// correction, `o = alpha o + (1 - alpha) mean(V)` with `alpha` the
    /// chosen set's estimated mass; the answer (when applied, see
    /// [`AttendOutput::mean_corrected`]) estimates attention over the whole
    /// prefix and cannot be merged. `joint_heads`: one choice for the
    /// layer across KV heads (blocks ranked by the sum of each head's
    /// estimated share of its softmax mass), so that the blocks read are
    /// k tokens' worth however many KV heads the layout has, instead of
    /// the union of each head's own k (a block's layer range holds every
    /// KV head); each head then has less of its own best tokens.
    Sparf {
        channels: Option<u32>,
        tokens: Option<u32>,
        by_token: bool,
        mean_correction: bool,
        joint_heads: bool,
    },
    /// RetrievalAttention: per KV head, the union of its query heads' top
    /// `k` (default 100) from the chain's retrieval index (candidate list
    /// `ef`, default the index's tuned one), or an exact scan while none is
    /// ready; attended exactly. Merge with the engine's static window.
    Retrieval { k: Option<u32>, ef: Option<u32> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseBudget {
    /// The daemon's default (`compute.sparse_budget_fraction`, 5%).
    Default,
    Tokens(u32),
    /// Bytes of K and V of the layer.
    Bytes(u64),
}

/// One sequence: the chain of blocks the daemon covers (its keys in chain
/// order, or [`Chain::Tail`]: the last key and the number of blocks, which
/// the daemon follows back through the parent links the stores named; 32
/// bytes on the wire instead of every key) and its queries
/// `[heads][head_dim]` (heads a multiple of the layout's KV heads).
#[derive(Debug, Clone)]
pub struct AttendSequence {
    pub chain: Chain,
    /// Tokens of the last key's block to attend (None: all it holds).
    pub last_block_tokens: Option<u32>,
    pub queries: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct AttendRequest {
    pub namespace: NamespaceId,
    pub layer: u32,
    pub mode: AttendMode,
    /// None: `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    pub sequences: Vec<AttendSequence>,
    /// The dtype queries go and outputs come back in on the wire (F16 or
    /// BF16: half the bytes each way; [`AttendOutput::o`] is f32 either
    /// way, converted back by the client).
    pub io_dtype: IoDtype,
    /// DENSE, SPARSE, SPARF: the lowest precision the daemon may compute on
    /// for blocks it holds only on NVMe ([`Precision::Int8`] or `Int4`:
    /// its quant copies, `compute.quant_bytes`, instead of device reads;
    /// the answer then counts them in [`AttendOutput::quantized_blocks`]
    /// and is not exact). [`Precision::Stored`]: the stored K and V only.
    pub min_precision: Precision,
}

/// What one tier gave an Attend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierReads {
    pub tier: Option<TierKind>,
    pub blocks: u32,
    pub bytes: u64,
}

/// The daemon's answer for one sequence.
#[derive(Debug, Clone)]
pub struct AttendOutput {
    pub heads: usize,
    pub head_dim: usize,
    /// `[heads][head_dim]`.
    pub o: Vec<f32>,
    /// `[heads]`; `-inf` when the set is empty.
    pub lse: Vec<f32>,
    /// Leading keys present (the prefix covered) and their tokens.
    pub keys_present: u32,
    pub tokens_present: u64,
    /// Token positions attended (union over heads), merged, in order.
    pub covered: Vec<Range<u64>>,
    /// SPARF: per KV head.
    pub head_covered: Vec<Vec<Range<u64>>>,
    pub reads: Vec<TierReads>,
    /// Attention over every present token.
    pub exact: bool,
    /// SparF's mean-value correction was applied: `(o, lse)` estimate
    /// attention over every present token (`lse`: the chosen tokens'
    /// log-sum-exp minus `ln alpha`), not a partial over `covered`; never
    /// merged (see [`mergeable`](Self::mergeable)).
    pub mean_corrected: bool,
    pub sink_included: bool,
    pub recent_included: bool,
    pub tokens_attended: u64,
    pub abstract_bytes: u64,
    /// RETRIEVAL: per KV head, where its tokens came from.
    pub retrieval_source: Vec<crate::retrieval::RetrieveSource>,
    /// RETRIEVAL: keys scanned per query head.
    pub retrieval_scanned: Vec<u32>,
    /// Blocks computed on from the daemon's int8/int4 copies (with
    /// [`AttendRequest::min_precision`]), and the copies' bytes read.
    pub quantized_blocks: u32,
    pub quantized_bytes: u64,
}

impl AttendOutput {
    /// Bytes read from `tier`.
    pub fn read_bytes(&self, tier: TierKind) -> u64 {
        self.reads
            .iter()
            .filter(|r| r.tier == Some(tier))
            .map(|r| r.bytes)
            .sum()
    }

    /// Blocks read from `tier`.
    pub fn read_blocks(&self, tier: TierKind) -> u32 {
        self.reads
            .iter()
            .filter(|r| r.tier == Some(tier))
            .map(|r| r.blocks)
            .sum()
    }

    /// Whether `(o, lse)` is an exact partial over `covered` that
    /// [`merge`] may combine with a part over a disjoint set (false for a
    /// mean-corrected answer).
    pub fn mergeable(&self) -> bool {
        !self.mean_corrected
    }

    /// Merges the engine's own partial `(o, lse)` over a disjoint token set
    /// into this answer (see [`merge`]); refuses a mean-corrected answer.
    pub fn merge_with(&mut self, o: &[f32], lse: &[f32]) -> Result<(), MergeError> {
        if !self.mergeable() {
            return Err(MergeError(
                "the answer is mean-corrected (SparF sparf_mean_correction): an estimate of attention over the whole prefix, not a partial over its covered tokens; it cannot be merged".into(),
            ));
        }
        merge(self.head_dim, &mut self.o, &mut self.lse, o, lse)
    }
}

/// The two partials do not have the same shape, or one is not a partial.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("merge: {0}")]
pub struct MergeError(String);

/// Merges the partial `(o_b, lse_b)` into `(o, lse)`, exactly, per query
/// head (a thin wrapper over `strata_kernels::attention::merge_into` that
/// checks the shapes): `o`, `o_b` are `[heads][head_dim]`, `lse`, `lse_b`
/// `[heads]`. A side with `lse = -inf` (an empty set) contributes nothing.
pub fn merge(
    head_dim: usize,
    o: &mut [f32],
    lse: &mut [f32],
    o_b: &[f32],
    lse_b: &[f32],
) -> Result<(), MergeError> {
    let heads = lse.len();
    if head_dim == 0 {
        return Err(MergeError("head_dim is 0".into()));
    }
    if lse_b.len() != heads {
        return Err(MergeError(format!(
            "{heads} heads on one side, {} on the other",
            lse_b.len()
        )));
    }
    for (name, x) in [("o", o.len()), ("o_b", o_b.len())] {
        if x != heads * head_dim {
            return Err(MergeError(format!(
                "{name} has {x} values, not {heads} heads x head_dim {head_dim}"
            )));
        }
    }
    if let Some(x) = lse
        .iter()
        .chain(lse_b)
        .find(|x| x.is_nan() || **x == f32::INFINITY)
    {
        return Err(MergeError(format!("lse {x} is not finite or -inf")));
    }
    strata_kernels::attention::merge_into(head_dim, o, lse, o_b, lse_b);
    Ok(())
}

/// The request as it goes on the wire (the benchmark measures its size).
pub fn request_pb(r: &AttendRequest) -> pb::AttendRequest {
    let (mode, budget_tokens, budget_bytes, sparf_channels, sparf_tokens) = match r.mode {
        AttendMode::Dense => (pb::AttendMode::Dense, 0, 0, 0, 0),
        AttendMode::Sparse(b) => {
            let (t, by) = match b {
                SparseBudget::Default => (0, 0),
                SparseBudget::Tokens(t) => (t, 0),
                SparseBudget::Bytes(b) => (0, b),
            };
            (pb::AttendMode::Sparse, t, by, 0, 0)
        }
        AttendMode::Sparf {
            channels, tokens, ..
        } => (
            pb::AttendMode::Sparf,
            0,
            0,
            channels.unwrap_or(0),
            tokens.unwrap_or(0),
        ),
        AttendMode::Retrieval { .. } => (pb::AttendMode::Retrieval, 0, 0, 0, 0),
    };
    let sparf_by_token = matches!(r.mode, AttendMode::Sparf { by_token: true, .. });
    let sparf_mean_correction = matches!(
        r.mode,
        AttendMode::Sparf {
            mean_correction: true,
            ..
        }
    );
    let sparf_joint_heads = matches!(
        r.mode,
        AttendMode::Sparf {
            joint_heads: true,
            ..
        }
    );
    let (retrieval_k, retrieval_ef) = match r.mode {
        AttendMode::Retrieval { k, ef } => (k.unwrap_or(0), ef.unwrap_or(0)),
        _ => (0, 0),
    };
    pb::AttendRequest {
        namespace_id: r.namespace.0,
        layer: r.layer,
        mode: mode as i32,
        scale: r.scale.unwrap_or(0.0),
        sequences: r
            .sequences
            .iter()
            .map(|s| {
                let (keys, chain_tail, chain_blocks) = match &s.chain {
                    Chain::Keys(k) => (
                        k.iter()
                            .map(|k| bytes::Bytes::copy_from_slice(k.as_bytes()))
                            .collect(),
                        bytes::Bytes::new(),
                        0,
                    ),
                    Chain::Tail { tail, blocks } => (
                        Vec::new(),
                        bytes::Bytes::copy_from_slice(tail.as_bytes()),
                        *blocks,
                    ),
                };
                let (queries, queries_packed) = match r.io_dtype {
                    IoDtype::F32 => (s.queries.clone(), bytes::Bytes::new()),
                    io => (Vec::new(), io.pack(&s.queries)),
                };
                pb::AttendSequence {
                    keys,
                    last_block_tokens: s.last_block_tokens.unwrap_or(0),
                    queries,
                    chain_tail,
                    chain_blocks,
                    queries_packed,
                }
            })
            .collect(),
        budget_tokens,
        budget_bytes,
        sparf_channels,
        sparf_tokens,
        retrieval_k,
        retrieval_ef,
        sparf_by_token,
        sparf_mean_correction,
        sparf_joint_heads,
        io_dtype: match r.io_dtype {
            IoDtype::F32 => pb::Dtype::Unspecified,
            IoDtype::F16 => pb::Dtype::F16,
            IoDtype::Bf16 => pb::Dtype::Bf16,
        } as i32,
        min_precision: match r.min_precision {
            Precision::Stored => pb::Precision::Unspecified,
            Precision::Int8 => pb::Precision::Int8,
            Precision::Int4 => pb::Precision::Int4,
        } as i32,
    }
}

fn ranges(r: &[pb::TokenRange]) -> Vec<Range<u64>> {
    r.iter().map(|r| r.start..r.end).collect()
}

/// The answer for one sequence of a request made with `io` as io_dtype.
pub(crate) fn output(mut r: pb::AttendResult, io: IoDtype) -> Result<AttendOutput, String> {
    if io != IoDtype::F32 {
        if !r.o.is_empty() || !r.o_packed.len().is_multiple_of(2) {
            return Err(format!(
                "Attend answer with {} f32 outputs and {} packed bytes for io_dtype {io:?}",
                r.o.len(),
                r.o_packed.len()
            ));
        }
        r.o = io.unpack(&r.o_packed);
    }
    let heads = r.lse.len();
    if heads == 0 || !r.o.len().is_multiple_of(heads) {
        return Err(format!(
            "Attend answer with {} outputs for {heads} heads",
            r.o.len()
        ));
    }
    Ok(AttendOutput {
        heads,
        head_dim: r.o.len() / heads,
        keys_present: r.keys_present,
        tokens_present: r.tokens_present,
        covered: ranges(&r.covered),
        head_covered: r.head_covered.iter().map(|h| ranges(&h.ranges)).collect(),
        reads: r
            .reads
            .iter()
            .map(|t| TierReads {
                tier: crate::tier(t.tier),
                blocks: t.blocks,
                bytes: t.bytes,
            })
            .collect(),
        exact: r.exact,
        mean_corrected: r.mean_corrected,
        sink_included: r.sink_included,
        recent_included: r.recent_included,
        tokens_attended: r.tokens_attended,
        abstract_bytes: r.abstract_bytes,
        retrieval_source: r
            .retrieval_source
            .iter()
            .map(|&v| crate::retrieval::RetrieveSource::of(v))
            .collect::<Result<_, _>>()?,
        retrieval_scanned: r.retrieval_scanned,
        quantized_blocks: r.quantized_blocks,
        quantized_bytes: r.quantized_bytes,
        o: r.o,
        lse: r.lse,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attention(q: &[f32], ks: &[Vec<f32>], vs: &[Vec<f32>], scale: f32) -> (Vec<f32>, f32) {
        let s: Vec<f64> = ks
            .iter()
            .map(|k| (q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale) as f64)
            .collect();
        if s.is_empty() {
            return (vec![0.0; q.len()], f32::NEG_INFINITY);
        }
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let l: f64 = w.iter().sum();
        let mut o = vec![0f64; q.len()];
        for (wi, v) in w.iter().zip(vs) {
            for (a, b) in o.iter_mut().zip(v) {
                *a += wi * *b as f64 / l;
            }
        }
        (o.iter().map(|&x| x as f32).collect(), (m + l.ln()) as f32)
    }

    #[test]
    fn merge_of_disjoint_parts_is_the_whole_and_checks_shapes() {
        let d = 4;
        let q = [0.3f32, -1.0, 0.5, 2.0];
        let ks: Vec<Vec<f32>> = (0..7)
            .map(|i| (0..d).map(|j| ((i * 7 + j * 3) % 5) as f32 - 2.0).collect())
            .collect();
        let vs: Vec<Vec<f32>> = (0..7)
            .map(|i| (0..d).map(|j| ((i + j) % 3) as f32).collect())
            .collect();
        let (o_all, lse_all) = attention(&q, &ks, &vs, 0.5);
        let (mut o, a) = attention(&q, &ks[..3], &vs[..3], 0.5);
        let (o_b, b) = attention(&q, &ks[3..], &vs[3..], 0.5);
        let mut lse = vec![a];
        merge(d, &mut o, &mut lse, &o_b, &[b]).unwrap();
        for (x, y) in o.iter().zip(&o_all) {
            assert!((x - y).abs() < 1e-5, "{o:?} vs {o_all:?}");
        }
        assert!((lse[0] - lse_all).abs() < 1e-5);
        // An empty side changes nothing; two empty sides stay empty.
        let (o_e, e) = attention(&q, &[], &[], 0.5);
        let (mut o2, mut lse2) = (o_all.clone(), vec![lse_all]);
        merge(d, &mut o2, &mut lse2, &o_e, &[e]).unwrap();
        assert_eq!((o2, lse2), (o_all.clone(), vec![lse_all]));
        let (mut o3, mut lse3) = (o_e.clone(), vec![e]);
        merge(d, &mut o3, &mut lse3, &o_e, &[e]).unwrap();
        assert_eq!(lse3[0], f32::NEG_INFINITY);
        assert!(o3.iter().all(|&x| x == 0.0));
        // Shapes.
        assert!(merge(d, &mut o.clone(), &mut [a], &o_b[..3], &[b]).is_err());
        assert!(merge(d, &mut o.clone(), &mut [a], &o_b, &[b, b]).is_err());
        assert!(merge(d, &mut o.clone(), &mut [a], &o_b, &[f32::NAN]).is_err());
    }

    /// A mean-corrected answer is refused by merge_with, and left as it
    /// was; the same answer unflagged merges.
    #[test]
    fn a_mean_corrected_answer_is_never_merged() {
        let answer = |mean_corrected| {
            output(
                pb::AttendResult {
                    o: vec![1.0, 2.0],
                    lse: vec![0.5],
                    mean_corrected,
                    ..Default::default()
                },
                IoDtype::F32,
            )
            .unwrap()
        };
        let mut out = answer(true);
        assert!(out.mean_corrected && !out.mergeable());
        let e = out.merge_with(&[3.0, 4.0], &[0.5]).unwrap_err();
        assert!(e.to_string().contains("mean-corrected"), "{e}");
        assert_eq!(
            (out.o.clone(), out.lse.clone()),
            (vec![1.0, 2.0], vec![0.5])
        );
        let mut out = answer(false);
        assert!(out.mergeable());
        out.merge_with(&[3.0, 4.0], &[0.5]).unwrap();
        assert_eq!(out.o, vec![2.0, 3.0]);
    }
}

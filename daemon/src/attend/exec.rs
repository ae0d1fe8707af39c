//! Running one Attend call: [`check`] the request against the layout and
//! the limits, then [`run`] it: pin each sequence's present prefix, choose
//! blocks (SPARSE) or tokens (SPARF), read in bounded waves, verify, and
//! compute `(o, lse)` per query head by partial attention per block merged
//! by log-sum-exp, on the blocking pool.
//!
//! GQA: query head `j` attends with KV head `j / (heads / kv_heads)`, so a
//! block's rows of one KV head are read once for all the query heads that
//! share it (the kernel's group).

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use strata_kernels::KvElem;
use strata_kernels::abstracts::{AbstractScratch, upper_bounds};
use strata_kernels::attention::{AttnScratch, AttnState, Tokens, merge_into};
use strata_kernels::quant::QuantBits;
use strata_kernels::sketch::{
    RunBoundScratch, RunScratch, Sketch, SketchRun, SketchScratch, run_scores, run_upper_bounds,
    sketch_scores, sketch_scores_with_heads, span_lse,
};
use strata_kernels::sparf::{
    HeadScores, SparfScratch, chosen_mass, mean_correct, score_temperature, sparf_scores_head,
    sparf_scores_head_with_heads, top_channels,
};
use strata_kernels::topk::top_k;
use strata_proto::convert::{AttendMode, AttendReq, Budget, Chain, IoDtype, Precision};
use strata_proto::{Dtype, FieldError, KvKind, Layout, NamespaceId, TierKind};
use tokio::sync::Semaphore;

use super::fetch::{Got, Need, What, fetch};
use super::quant::{BlockIdent, Decoded, QuantCopies, QuantCopy};
use super::runs::{RunView, SketchRuns};
use super::summary::Geom;
use super::{AttendConfig, LeafLevel};
use crate::metrics::AttendMetrics;
use crate::store::index::BlockRef;
use crate::store::{ChainPin, Store, StoreError, tiering};
use crate::tier::nvme::NvmeError;

mod sparse;

// Payloads are little-endian; kernels read them in place.
const _: () = assert!(cfg!(target_endian = "little"));

/// Shared by every Attend call of a daemon.
pub struct AttendCtx {
    pub cfg: AttendConfig,
    /// One permit per blocking task of math at once.
    compute: Arc<Semaphore>,
    /// Calls admitted (running or waiting).
    inflight: Arc<Semaphore>,
    metrics: AttendMetrics,
    /// SPARF's per-chain sketch runs (`compute.sketch_runs_bytes`).
    runs: Option<Arc<SketchRuns>>,
    /// SPARSE's leaf level per (namespace, layer), learned.
    skew: sparse::SkewTable,
    /// One background promotion of hot NVMe-only blocks at a time
    /// ([`AttendCtx::promote_hot`]).
    promoting: Arc<Semaphore>,
    /// Lower-precision copies of cold blocks (`compute.quant_bytes`).
    quant: Option<Arc<QuantCopies>>,
}

impl std::fmt::Debug for AttendCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttendCtx").field("cfg", &self.cfg).finish()
    }
}

impl AttendCtx {
    /// Fails only when the sketch-run or quant-copy region cannot be
    /// mapped.
    pub fn new(cfg: AttendConfig, metrics: AttendMetrics) -> std::io::Result<Self> {
        let runs = match cfg.sketch_runs_bytes {
            0 => None,
            b => Some(Arc::new(SketchRuns::new(b, metrics.runs.clone())?)),
        };
        let quant = match cfg.quant_bytes {
            0 => None,
            b => Some(Arc::new(QuantCopies::new(b, metrics.quant.clone())?)),
        };
        Ok(AttendCtx {
            compute: Arc::new(Semaphore::new(cfg.threads.max(1))),
            inflight: Arc::new(Semaphore::new(cfg.max_inflight.max(1))),
            cfg,
            metrics,
            runs,
            skew: sparse::SkewTable::new(),
            promoting: Arc::new(Semaphore::new(1)),
            quant,
        })
    }

    /// The quant copies a call may compute on, and the lowest precision
    /// it allows; None when it allows none or the daemon keeps none.
    fn quant_for(&self, req: &Checked) -> Option<(Arc<QuantCopies>, QuantBits)> {
        let floor = match req.min_precision {
            Precision::Stored => return None,
            Precision::Int8 => QuantBits::Int8,
            Precision::Int4 => QuantBits::Int4,
        };
        Some((self.quant.clone()?, floor))
    }

    /// Bytes held by quant copies (0 without the region).
    pub fn quant_bytes(&self) -> u64 {
        self.quant.as_ref().map_or(0, |q| q.used_bytes())
    }

    /// Promotes the hot NVMe-only blocks of `answers` into DRAM in the
    /// background (`compute.hotness`), the hottest first and at most
    /// `compute.read_wave_bytes` of them, unless `compute.promote` already
    /// promoted what was read, or a promotion started by an earlier call
    /// is still running: then these wait for a later answer that finds
    /// them hot again. At most one such task runs, so its DRAM
    /// reservations and NVMe reads stay bounded.
    fn promote_hot(&self, store: &Arc<Store>, answers: &[SeqResult]) {
        if self.cfg.promote || store.nvme().is_none() {
            return;
        }
        let mut hot: Vec<HotBlock> = answers
            .iter()
            .flat_map(|r| r.hot_nvme.iter().copied())
            .collect();
        if hot.is_empty() {
            return;
        }
        let Ok(permit) = self.promoting.clone().try_acquire_owned() else {
            return;
        };
        hot.sort_unstable_by(|a, b| b.share.total_cmp(&a.share));
        let mut bytes = 0u64;
        let refs: Vec<BlockRef> = hot
            .iter()
            .take_while(|h| {
                bytes += h.len;
                bytes <= self.cfg.read_wave_bytes || bytes == h.len
            })
            .map(|h| h.r)
            .collect();
        self.metrics.hot_promoted.increment(refs.len() as u64);
        let store = store.clone();
        tokio::spawn(async move {
            tiering::promote(&store, &refs).await;
            drop(permit);
        });
    }

    /// Admits one call, or refuses it (`compute.max_inflight`).
    pub fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, StoreError> {
        self.inflight.clone().try_acquire_owned().map_err(|_| {
            self.metrics.rejected.increment(1);
            StoreError::Limit {
                limit: "compute.max_inflight",
                detail: format!(
                    "{} Attend calls are in progress, the limit; retry later",
                    self.cfg.max_inflight
                ),
            }
        })
    }

    /// Runs `f` on the blocking pool, at most `compute.threads` at once.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let _permit = self
            .compute
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| StoreError::Internal(format!("Attend compute task failed: {e}")))
    }
}

/// One sequence of a checked request.
#[derive(Debug, Clone)]
pub struct SeqIn {
    pub chain: Chain,
    pub last_block_tokens: Option<u32>,
    /// `[heads][head_dim]`.
    pub q: Vec<f32>,
    pub heads: usize,
}

/// A request checked against its namespace's layout and the limits.
#[derive(Debug, Clone)]
pub struct Checked {
    pub namespace: NamespaceId,
    pub geom: Geom,
    pub layer: u32,
    pub mode: AttendMode,
    pub scale: f32,
    pub budget: Budget,
    pub sparf_channels: Option<u32>,
    pub sparf_tokens: Option<u32>,
    pub sparf_by_token: bool,
    /// SPARF: SparQ's mean-value correction (the answer is then not a
    /// mergeable partial).
    pub sparf_mean_correction: bool,
    /// SPARF: one choice of tokens for the layer across KV heads.
    pub sparf_joint_heads: bool,
    /// The dtype the outputs go back in (the queries were converted).
    pub io_dtype: IoDtype,
    /// The lowest precision NVMe-only blocks may be computed on at.
    pub min_precision: Precision,
    pub seqs: Vec<SeqIn>,
}

/// Checks what needs the layout and the configured limits; every error
/// names its field.
pub fn check(req: AttendReq, layout: &Layout, cfg: &AttendConfig) -> Result<Checked, FieldError> {
    if layout.kv_kind == KvKind::Mla {
        return Err(FieldError::new(
            "namespace_id",
            "the namespace's layout is MLA (one latent tensor per layer); Attend serves layouts with separate K and V",
        ));
    }
    if layout.dtype == Dtype::Fp8E4m3 {
        return Err(FieldError::new(
            "namespace_id",
            "the namespace's layout stores fp8_e4m3; Attend serves f32, f16 and bf16 KV",
        ));
    }
    let geom = Geom::of(layout).expect("separate K/V in f32/f16/bf16");
    if req.layer >= layout.num_layers {
        return Err(FieldError::new(
            "layer",
            format!(
                "{} is out of range ({} layers)",
                req.layer, layout.num_layers
            ),
        ));
    }
    if req.sequences.len() > cfg.max_sequences {
        return Err(FieldError::new(
            "sequences",
            format!(
                "{} sequences; the limit is {} (compute.max_sequences)",
                req.sequences.len(),
                cfg.max_sequences
            ),
        ));
    }
    let d = layout.head_dim as usize;
    let kv = layout.num_kv_heads as usize;
    if let Some(r) = req.sparf_channels
        && r > layout.head_dim
    {
        return Err(FieldError::new(
            "sparf_channels",
            format!("{r} is above head_dim {}", layout.head_dim),
        ));
    }
    let mut seqs = Vec::with_capacity(req.sequences.len());
    for (i, s) in req.sequences.into_iter().enumerate() {
        let f = |name: &str| format!("sequences[{i}].{name}");
        if !s.queries.len().is_multiple_of(d) {
            return Err(FieldError::new(
                f("queries"),
                format!(
                    "{} values are not whole heads of head_dim {d}",
                    s.queries.len()
                ),
            ));
        }
        let heads = s.queries.len() / d;
        if !heads.is_multiple_of(kv) {
            return Err(FieldError::new(
                f("queries"),
                format!("{heads} heads is not a multiple of the layout's {kv} KV heads"),
            ));
        }
        if heads > cfg.max_query_heads {
            return Err(FieldError::new(
                f("queries"),
                format!(
                    "{heads} heads; the limit is {} (compute.max_query_heads)",
                    cfg.max_query_heads
                ),
            ));
        }
        if let Some(t) = s.last_block_tokens
            && t > layout.tokens_per_block
        {
            return Err(FieldError::new(
                f("last_block_tokens"),
                format!(
                    "{t} is above the layout's {} tokens per block",
                    layout.tokens_per_block
                ),
            ));
        }
        seqs.push(SeqIn {
            chain: s.chain,
            last_block_tokens: s.last_block_tokens,
            q: s.queries,
            heads,
        });
    }
    Ok(Checked {
        namespace: req.namespace,
        geom,
        layer: req.layer,
        mode: req.mode,
        scale: req.scale.unwrap_or(1.0 / (d as f32).sqrt()),
        budget: req.budget,
        sparf_channels: req.sparf_channels,
        sparf_tokens: req.sparf_tokens,
        sparf_by_token: req.sparf_by_token,
        sparf_mean_correction: req.sparf_mean_correction,
        sparf_joint_heads: req.sparf_joint_heads,
        io_dtype: req.io_dtype,
        min_precision: req.min_precision,
        seqs,
    })
}

/// Blocks and bytes read from one tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierRead {
    pub blocks: u32,
    pub bytes: u64,
}

/// The answer for one sequence.
#[derive(Debug, Clone)]
pub struct SeqResult {
    /// `[heads][head_dim]` and `[heads]`.
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
    pub keys_present: u32,
    pub tokens_present: u64,
    /// Union over heads, merged, in order.
    pub covered: Vec<Range<u64>>,
    /// SPARF: per KV head.
    pub head_covered: Vec<Vec<Range<u64>>>,
    pub dram: TierRead,
    pub nvme: TierRead,
    /// Blocks computed on from quant copies, and those copies' bytes.
    pub quant: TierRead,
    pub exact: bool,
    pub sink_included: bool,
    pub recent_included: bool,
    pub tokens_attended: u64,
    pub abstract_bytes: u64,
    /// SPARF with `sparf_mean_correction`, when the correction was applied:
    /// `(o, lse)` estimate attention over every present token and are not
    /// a partial over `covered` (never merge them).
    pub mean_corrected: bool,
    /// `compute.hotness`: blocks that carried attention here (touched), and
    /// those among them held only on NVMe (to promote).
    pub hot_blocks: u32,
    pub hot_nvme: Vec<HotBlock>,
}

/// A hot block held only on NVMe, to promote ([`AttendCtx::promote_hot`]).
#[derive(Debug, Clone, Copy)]
pub struct HotBlock {
    pub r: BlockRef,
    pub len: u64,
    /// Its largest share of a query head's attention in the answer.
    pub share: f32,
}

/// Runs a checked request: all sequences are pinned first (a state error,
/// such as a last block shorter than `last_block_tokens`, then changes
/// nothing), then computed concurrently.
pub async fn run(
    ctx: &AttendCtx,
    store: &Arc<Store>,
    req: Checked,
) -> Result<Vec<SeqResult>, StoreError> {
    let req = Arc::new(req);
    let mut pins = Vec::with_capacity(req.seqs.len());
    let touch = ctx.cfg.hot_factor.is_none();
    for i in 0..req.seqs.len() {
        pins.push(pin_seq(store, &req, i, touch)?);
    }
    let out = if req.mode == AttendMode::Dense {
        dense(ctx, &req, pins).await?
    } else {
        let runs = pins
            .into_iter()
            .enumerate()
            .map(|(i, pin)| run_seq(ctx, req.clone(), i, pin));
        let out = futures_util::future::join_all(runs).await;
        out.into_iter().collect::<Result<_, _>>()?
    };
    for r in &out {
        ctx.metrics.sequences[req.mode as usize].increment(1);
        ctx.metrics.tokens.increment(r.tokens_attended);
        ctx.metrics.read_bytes[0].increment(r.dram.bytes);
        ctx.metrics.read_bytes[1].increment(r.nvme.bytes);
        ctx.metrics.read_blocks[0].increment(r.dram.blocks as u64);
        ctx.metrics.read_blocks[1].increment(r.nvme.blocks as u64);
        ctx.metrics.read_bytes[2].increment(r.quant.bytes);
        ctx.metrics.read_blocks[2].increment(r.quant.blocks as u64);
        store.count_reads(r.dram.bytes, r.nvme.bytes);
        ctx.metrics.hot_blocks.increment(r.hot_blocks as u64);
    }
    ctx.promote_hot(store, &out);
    Ok(out)
}

/// Pins sequence `i`'s chain (from its keys, or from its tail through the
/// parent links) and checks `last_block_tokens` against the last block
/// when the whole chain is present.
/// With `touch`, the pinned blocks are touched now (an access); without,
/// the answer touches the hot ones ([`settle_hot`]).
pub fn pin_seq(
    store: &Arc<Store>,
    req: &Checked,
    i: usize,
    touch: bool,
) -> Result<ChainPin, StoreError> {
    let s = &req.seqs[i];
    let pin = match &s.chain {
        Chain::Keys(keys) => store.pin_chain_with(req.namespace, keys, touch)?,
        Chain::Tail { tail, blocks } => store.pin_tail_with(
            req.namespace,
            tail,
            *blocks as usize,
            || format!("sequences[{i}].chain_blocks"),
            touch,
        )?,
    };
    if let Some(t) = s.last_block_tokens
        && pin.blocks.len() == s.chain.len()
    {
        let last = pin.blocks.last().expect("chains are never empty");
        let held = req.geom.tokens_of(last.len).unwrap_or(0);
        if t > held {
            return Err(FieldError::new(
                format!("sequences[{i}].last_block_tokens"),
                format!(
                    "{t}, but the chain's last block (block {}) holds {held} tokens",
                    s.chain.len() - 1
                ),
            )
            .into());
        }
    }
    Ok(pin)
}

/// Running `(o, lse)` of all query heads.
#[derive(Debug, Clone)]
struct Acc {
    o: Vec<f32>,
    lse: Vec<f32>,
}

/// A sequence's state, moved into each blocking step and back.
struct Seq {
    req: Arc<Checked>,
    idx: usize,
    pin: ChainPin,
    /// Tokens attended per block (the last one may be cut short).
    tokens: Vec<u32>,
    /// First token position of each block.
    starts: Vec<u64>,
    acc: Acc,
    dram: TierRead,
    nvme: TierRead,
    dram_seen: Vec<bool>,
    nvme_seen: Vec<bool>,
    /// The first block that could not be read or failed verification:
    /// the covered prefix ends there.
    cut: Option<usize>,
    /// `compute.hotness`: the hot factor, and each block's own log-sum-exp
    /// per query head over what was attended of it (`[blocks][heads]`,
    /// `-inf` where nothing was); empty when off.
    hot_factor: f64,
    mass: Vec<f32>,
    /// `min_precision` INT8/INT4 with quant copies kept: the copies and
    /// the lowest precision allowed; per block, the copy this call computes
    /// on instead of reading NVMe ([`lease_copies`]; empty without), and
    /// what was read from copies.
    quant: Option<(Arc<QuantCopies>, QuantBits)>,
    leases: Vec<Option<Arc<QuantCopy>>>,
    qread: TierRead,
    /// Blocks already counted in `qread.blocks` (a SPARSE block may come
    /// in pieces split between parts).
    qseen: Vec<bool>,
}

impl Seq {
    fn input(&self) -> &SeqIn {
        &self.req.seqs[self.idx]
    }

    fn present(&self) -> usize {
        self.cut.unwrap_or(self.pin.blocks.len())
    }

    fn count(&mut self, i: usize, tier: TierKind, bytes: u64) {
        let (read, seen) = match tier {
            TierKind::Dram => (&mut self.dram, &mut self.dram_seen),
            _ => (&mut self.nvme, &mut self.nvme_seen),
        };
        read.bytes += bytes;
        if !seen[i] {
            seen[i] = true;
            read.blocks += 1;
        }
    }

    /// The quant copy block `i` is computed on, if any.
    fn lease(&self, i: usize) -> Option<&Arc<QuantCopy>> {
        self.leases.get(i)?.as_ref()
    }

    fn cut_at(&mut self, i: usize) {
        self.cut = Some(self.cut.map_or(i, |c| c.min(i)));
    }
}

/// Which tensors of the layer a step reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    K,
    Kv,
}

/// DENSE over a batch. The sequences whose present blocks all have a DRAM
/// copy (or a quant copy this call may use) are computed as one pool of
/// work ([`dense_in_dram`]); the others go wave by wave, reading NVMe,
/// beside it.
async fn dense(
    ctx: &AttendCtx,
    req: &Arc<Checked>,
    pins: Vec<ChainPin>,
) -> Result<Vec<SeqResult>, StoreError> {
    let mut here = Vec::new();
    let mut away = Vec::new();
    for (i, pin) in pins.into_iter().enumerate() {
        let mut seq = seq_of(req.clone(), i, pin, ctx.cfg.hot_factor, ctx.quant_for(req));
        // Blocks on quant copies need no read either: such a sequence
        // joins the pool too.
        if !ctx.cfg.promote && seq.quant.is_some() {
            let all: Vec<usize> = (0..seq.present()).collect();
            lease_copies(&mut seq, &all);
        }
        let blocks = &seq.pin.blocks[..seq.present()];
        if blocks
            .iter()
            .enumerate()
            .all(|(j, b)| b.dram.is_some() || seq.lease(j).is_some())
        {
            here.push(seq);
        } else {
            away.push(seq);
        }
    }
    let away = futures_util::future::join_all(away.into_iter().map(|seq| async move {
        let all: Vec<usize> = (0..seq.present()).collect();
        let seq = attend_blocks(ctx, seq, all).await?;
        Ok::<_, StoreError>(seq)
    }));
    let (here, away) = futures_util::future::join(dense_in_dram(ctx, here), away).await;
    let mut done: Vec<Seq> = here?;
    for seq in away {
        done.push(seq?);
    }
    done.sort_by_key(|s| s.idx);
    // Each answer's hot blocks and unpinning walk its pinned blocks
    // (~40 µs a 1,024-block chain): split over the compute threads.
    let finish = |seq: Seq| {
        let all: Vec<usize> = (0..seq.present()).collect();
        finish_blocks(seq, &all, 0)
    };
    let parts = ctx.cfg.threads.max(1).min(done.len()).max(1);
    if parts == 1 {
        // One sequence: no hand-off for it.
        return Ok(done.into_iter().map(finish).collect());
    }
    let per = done.len().div_ceil(parts).max(1);
    let mut chunks = Vec::with_capacity(parts);
    while !done.is_empty() {
        let rest = done.split_off(per.min(done.len()));
        chunks.push(std::mem::replace(&mut done, rest));
    }
    let tasks = chunks
        .into_iter()
        .map(|chunk| ctx.blocking(move || chunk.into_iter().map(finish).collect::<Vec<_>>()));
    let mut out = Vec::with_capacity(req.seqs.len());
    for r in futures_util::future::join_all(tasks).await {
        out.extend(r?);
    }
    Ok(out)
}

/// Layer bytes (K and V) of one item of [`dense_in_dram`]'s pool: large
/// enough that its set-up and merge vanish beside its math (~0.1 ms), small
/// enough that the last items leave no thread idle for long.
const DENSE_ITEM_BYTES: u64 = 1 << 20;

/// DENSE over sequences held wholly in DRAM: their blocks cut into items
/// of about [`DENSE_ITEM_BYTES`], claimed in order by up to
/// `compute.threads` blocking workers, each item computed into its own
/// [`Part`] and applied to its sequence in block order, as
/// [`compute_wave`] does (a part that stops at a block ends that
/// sequence's covered prefix and drops its later parts). One hand-off to
/// the pool per worker for the whole batch: handing each sequence's parts
/// over on their own cost a third of two cores at batch 32 × 16K (1.47
/// CPUs busy, ~1,000 context switches a call). The workers hold their
/// permits for the batch, so another call's math waits for it (the pool's
/// semaphore is first come, first served).
async fn dense_in_dram(ctx: &AttendCtx, seqs: Vec<Seq>) -> Result<Vec<Seq>, StoreError> {
    let mut items: Vec<(usize, Range<usize>)> = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        let n = seq.present();
        let (geom, layer) = (seq.req.geom, seq.req.layer);
        let t = seq.tokens.first().copied().unwrap_or(1);
        let per_block = geom.tensor_range(t, layer, 0).len() + geom.tensor_range(t, layer, 1).len();
        let per = (DENSE_ITEM_BYTES as usize / per_block.max(1)).max(1);
        items.extend((0..n).step_by(per).map(|a| (s, a..(a + per).min(n))));
    }
    if items.is_empty() {
        return Ok(seqs);
    }
    let workers = (ctx.cfg.threads.max(1)).min(items.len());
    let longest = items.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
    let shared = Arc::new((seqs, items, AtomicUsize::new(0)));
    let tasks = (0..workers).map(|_| {
        let shared = shared.clone();
        ctx.blocking(move || {
            let (seqs, items, next) = &*shared;
            let none: Vec<Option<Result<Got, NvmeError>>> = (0..longest).map(|_| None).collect();
            let mut blocks = Vec::with_capacity(longest);
            let mut done = Vec::new();
            loop {
                let j = next.fetch_add(1, AtomicOrdering::Relaxed);
                let Some((s, r)) = items.get(j) else {
                    break;
                };
                blocks.clear();
                blocks.extend(r.clone());
                let part = compute_part(&seqs[*s], &blocks, &none[..blocks.len()], &RowSel::All);
                done.push((j, part));
            }
            done
        })
    });
    let done = futures_util::future::join_all(tasks).await;
    let (mut seqs, items, _) = Arc::try_unwrap(shared)
        .map_err(|_| StoreError::Internal("Attend compute worker still holds the batch".into()))?;
    let mut parts: Vec<Option<Part>> = (0..items.len()).map(|_| None).collect();
    for d in done {
        for (j, part) in d? {
            parts[j] = Some(part);
        }
    }
    let mut stopped = vec![false; seqs.len()];
    for ((s, _), part) in items.iter().zip(parts) {
        let part =
            part.ok_or_else(|| StoreError::Internal("an Attend item was not computed".into()))?;
        if !stopped[*s] && !apply_part(&mut seqs[*s], part) {
            stopped[*s] = true;
        }
    }
    Ok(seqs)
}

async fn run_seq(
    ctx: &AttendCtx,
    req: Arc<Checked>,
    idx: usize,
    pin: ChainPin,
) -> Result<SeqResult, StoreError> {
    let seq = seq_of(
        req.clone(),
        idx,
        pin,
        ctx.cfg.hot_factor,
        ctx.quant_for(&req),
    );
    match req.mode {
        // Batches go through `dense`, which pools the sequences in DRAM.
        AttendMode::Dense => Err(StoreError::Internal(
            "DENSE sequences go through `dense`".into(),
        )),
        AttendMode::Sparse => sparse::sparse(ctx, seq).await,
        AttendMode::Sparf => sparf(ctx, seq).await,
        // The service asks the retrieval registry for the tokens first and
        // attends them through `ChainReader::attend`.
        AttendMode::Retrieval => Err(StoreError::Internal(
            "RETRIEVAL sequences go through ChainReader".into(),
        )),
    }
}

/// A sequence's state before any read: tokens and start of each pinned
/// block (a block not of whole tokens ends the prefix).
fn seq_of(
    req: Arc<Checked>,
    idx: usize,
    pin: ChainPin,
    hot: Option<f64>,
    quant: Option<(Arc<QuantCopies>, QuantBits)>,
) -> Seq {
    let geom = req.geom;
    let s = &req.seqs[idx];
    let n = pin.blocks.len();
    let mut tokens = Vec::with_capacity(n);
    let mut cut = None;
    for (i, b) in pin.blocks.iter().enumerate() {
        match geom.tokens_of(b.len) {
            Some(t) => tokens.push(t),
            None => {
                // Not whole tokens of this layout (a record written under
                // another one): the prefix ends here.
                cut = Some(i);
                break;
            }
        }
    }
    if cut.is_none()
        && n == s.chain.len()
        && let (Some(t), Some(last)) = (s.last_block_tokens, tokens.last_mut())
    {
        *last = t;
    }
    let mut starts = Vec::with_capacity(tokens.len());
    let mut at = 0u64;
    for &t in &tokens {
        starts.push(at);
        at += t as u64;
    }
    let d = geom.head_dim as usize;
    let mut seq = Seq {
        idx,
        pin,
        tokens,
        starts,
        acc: Acc {
            o: vec![0.0; s.heads * d],
            lse: vec![f32::NEG_INFINITY; s.heads],
        },
        dram: TierRead::default(),
        nvme: TierRead::default(),
        dram_seen: vec![false; n],
        nvme_seen: vec![false; n],
        cut,
        hot_factor: hot.unwrap_or(0.0),
        mass: match hot {
            Some(_) => vec![f32::NEG_INFINITY; n * s.heads],
            None => Vec::new(),
        },
        leases: match quant {
            Some(_) => vec![None; n],
            None => Vec::new(),
        },
        qseen: match quant {
            Some(_) => vec![false; n],
            None => Vec::new(),
        },
        quant,
        qread: TierRead::default(),
        req: req.clone(),
    };
    if let Some(c) = cut {
        seq.pin.truncate(c);
    }
    seq
}

/// One pinned chain read for the retrieval indexes (`crate::retrieval`):
/// one layer's keys of a range of its blocks, verified like every Attend
/// read, and exact attention over chosen tokens per KV head.
pub(crate) struct ChainReader {
    seq: Seq,
}

impl ChainReader {
    /// `q`: `[heads][d]` queries (may be empty when only keys are read;
    /// `heads` is then the KV heads).
    pub(crate) fn new(
        namespace: NamespaceId,
        geom: Geom,
        layer: u32,
        scale: f32,
        q: Vec<f32>,
        pin: ChainPin,
    ) -> Self {
        let d = geom.head_dim as usize;
        let heads = if q.is_empty() {
            geom.kv_heads as usize
        } else {
            q.len() / d
        };
        let req = Arc::new(Checked {
            namespace,
            geom,
            layer,
            mode: AttendMode::Retrieval,
            scale,
            budget: Budget::Default,
            sparf_channels: None,
            sparf_tokens: None,
            sparf_by_token: false,
            sparf_mean_correction: false,
            sparf_joint_heads: false,
            io_dtype: IoDtype::F32,
            min_precision: Precision::Stored,
            seqs: vec![SeqIn {
                chain: Chain::Keys(Vec::new()),
                last_block_tokens: None,
                q: if q.is_empty() {
                    vec![0.0; heads * d]
                } else {
                    q
                },
                heads,
            }],
        });
        ChainReader {
            seq: seq_of(req, 0, pin, None, None),
        }
    }

    /// Blocks readable so far (a block that failed a read or a check ends
    /// the prefix), and their pinned records.
    pub(crate) fn present(&self) -> usize {
        self.seq.present()
    }

    pub(crate) fn blocks(&self) -> &[crate::store::ChainBlock] {
        &self.seq.pin.blocks[..self.seq.present()]
    }

    /// Tokens of each present block.
    pub(crate) fn tokens(&self) -> &[u32] {
        &self.seq.tokens[..self.seq.present()]
    }

    /// The layer's keys of blocks `range` as f32, `[kv_head][tokens][d]`,
    /// read in waves (NVMe: only the layer's K range) and verified against
    /// the summaries' per-layer checksums (whole block without one). A
    /// block that cannot be read or fails its check ends the prefix there:
    /// the keys returned stop before it (see [`ChainReader::present`]).
    pub(crate) async fn read_k(
        mut self,
        ctx: &AttendCtx,
        range: Range<usize>,
    ) -> Result<(Self, Vec<Vec<f32>>), StoreError> {
        let geom = self.seq.req.geom;
        let (d, kv) = (geom.head_dim as usize, geom.kv_heads as usize);
        let end = range.end.min(self.seq.present());
        let blocks: Vec<usize> = (range.start..end).collect();
        let total: usize = blocks.iter().map(|&i| self.seq.tokens[i] as usize).sum();
        let mut out: Vec<Vec<f32>> = (0..kv).map(|_| Vec::with_capacity(total * d)).collect();
        for wave in waves(&self.seq, &blocks, Want::K, ctx.cfg.read_wave_bytes) {
            if self.seq.cut.is_some_and(|c| wave[0] >= c) {
                break;
            }
            let got = read_wave(&mut self.seq, &wave, Want::K).await;
            let mut seq = self.seq;
            (seq, out) = ctx
                .blocking(move || {
                    for (j, &i) in wave.iter().enumerate() {
                        if seq.cut.is_some_and(|c| i >= c) {
                            break;
                        }
                        let Some((k, _)) = take_layer(&mut seq, i, Want::K, got[j].as_ref()) else {
                            break;
                        };
                        // SAFETY: as in `sparf`: the bytes are the pinned
                        // DRAM copy or this wave's buffers, alive here.
                        let k = unsafe { slice_of(k) };
                        let n = seq.tokens[i] as usize;
                        match geom.dtype {
                            Dtype::F32 => widen_k::<f32>(k, n, kv, d, &mut out),
                            Dtype::F16 => widen_k::<f16>(k, n, kv, d, &mut out),
                            Dtype::Bf16 => widen_k::<bf16>(k, n, kv, d, &mut out),
                            Dtype::Fp8E4m3 => unreachable!("checked: retrieval refuses fp8"),
                        }
                    }
                    (seq, out)
                })
                .await?;
            self.seq = seq;
        }
        Ok((self, out))
    }

    /// Exact `(o, lse)` of every query head over `chosen[h]` for its KV
    /// head `h` (token positions from the chain's first token, sorted;
    /// those past the present prefix are ignored).
    pub(crate) async fn attend(
        self,
        ctx: &AttendCtx,
        chosen: Vec<Vec<u32>>,
    ) -> Result<SeqResult, StoreError> {
        let mut seq = self.seq;
        let d = seq.req.geom.head_dim as usize;
        let heads = seq.input().heads;
        seq.acc = Acc {
            o: vec![0.0; heads * d],
            lse: vec![f32::NEG_INFINITY; heads],
        };
        finish_chosen(ctx, seq, chosen).await
    }
}

/// Appends a block's K rows (`[n][kv][d]` stored) to `out[h]` as f32.
fn widen_k<E: KvElem>(k: &[u8], n: usize, kv: usize, d: usize, out: &mut [Vec<f32>]) {
    let k = elems::<E>(k);
    let mut row = vec![0.0f32; d];
    for t in 0..n {
        for (h, o) in out.iter_mut().enumerate() {
            E::slice_to_f32(&k[(t * kv + h) * d..(t * kv + h + 1) * d], &mut row);
            o.extend_from_slice(&row);
        }
    }
}

/// The answer of DENSE and SPARSE from the blocks attended.
fn finish_blocks(seq: Seq, chosen: &[usize], abstract_bytes: u64) -> SeqResult {
    let (hot_blocks, hot_nvme) = settle_hot(&seq);
    let present = seq.present();
    let done: Vec<usize> = chosen.iter().copied().filter(|&i| i < present).collect();
    let covered = merge_ranges(done.iter().map(|&i| {
        let s = seq.starts[i];
        s..s + seq.tokens[i] as u64
    }));
    let tokens_attended = done.iter().map(|&i| seq.tokens[i] as u64).sum();
    let tokens_present = seq.tokens[..present].iter().map(|&t| t as u64).sum();
    let sparse = seq.req.mode == AttendMode::Sparse;
    SeqResult {
        o: seq.acc.o,
        lse: seq.acc.lse,
        keys_present: present as u32,
        tokens_present,
        exact: done.len() == present && seq.qread.blocks == 0,
        sink_included: sparse && present > 0 && done.first() == Some(&0),
        recent_included: sparse && present > 0 && done.last() == Some(&(present - 1)),
        covered,
        head_covered: Vec::new(),
        dram: seq.dram,
        nvme: seq.nvme,
        quant: seq.qread,
        tokens_attended,
        abstract_bytes,
        mean_corrected: false,
        hot_blocks,
        hot_nvme,
    }
}

/// `ln(x)` for a normal `x > 0`, within 1.4e-4 (a block's mass is only
/// compared with a threshold): the exponent from the bits and a quartic
/// (least squares on [0, 1)) for the mantissa's log2. A fraction of libm's
/// cost, paid a block and a query head at a time in the compute loop.
#[inline]
fn fast_ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000) - 1.0;
    let log2m = m * (1.438_548 + m * (-0.678_089_5 + m * (0.323_646_3 - m * 0.084_294_66)));
    (e as f32 + log2m) * std::f32::consts::LN_2
}

/// `log(exp(a) + exp(b))`, `-inf` for nothing.
fn log_add_exp(a: f32, b: f32) -> f32 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f32::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `compute.hotness` (COMPUTE.md §3, hotness from the exact scores of what
/// was read): the present blocks that carried at least `hot_factor` times
/// an even share (1 / present blocks) of some query head's attention over
/// what this answer attended are touched (an access: DRAM eviction order
/// follows the attention, not the pins), and the NVMe-only ones among
/// them come back for promotion; their quant copies, if leased, are
/// touched too. Returns how many were hot.
fn settle_hot(seq: &Seq) -> (u32, Vec<HotBlock>) {
    let present = seq.present();
    if seq.mass.is_empty() || present == 0 {
        return (0, Vec::new());
    }
    let heads = seq.input().heads;
    // The answer's own lse is the total over what was attended (taken
    // before SPARF's mean correction changes it); a head that attended
    // nothing has no hot block.
    let bar = (seq.hot_factor / present as f64).ln() as f32;
    let at_least: Vec<f32> = seq
        .acc
        .lse
        .iter()
        .map(|&t| {
            if t.is_finite() {
                t + bar
            } else {
                f32::INFINITY
            }
        })
        .collect();
    let hot: Vec<usize> = seq.mass[..present * heads]
        .chunks_exact(heads)
        .enumerate()
        .filter(|(_, row)| row.iter().zip(&at_least).any(|(x, t)| x >= t))
        .map(|(i, _)| i)
        .collect();
    let mut refs = Vec::with_capacity(hot.len());
    let mut nvme = Vec::new();
    for &i in &hot {
        let b = &seq.pin.blocks[i];
        refs.push(b.r);
        // A hot block's quant copy is the last to lose precision (and the
        // block itself is promoted, below).
        if let (Some((pool, _)), Some(_)) = (&seq.quant, seq.lease(i)) {
            pool.touch(seq.req.namespace, seq.req.layer, b.key);
        }
        if b.dram.is_none() && b.nvme.is_some() {
            let row = &seq.mass[i * heads..(i + 1) * heads];
            let share = row
                .iter()
                .zip(&seq.acc.lse)
                .map(|(&x, &t)| if t.is_finite() { (x - t).exp() } else { 0.0 })
                .fold(0.0f32, f32::max);
            nvme.push(HotBlock {
                r: b.r,
                len: b.len,
                share,
            });
        }
    }
    seq.pin.store().touch_refs(&refs);
    (hot.len() as u32, nvme)
}

/// Merges ranges given in increasing order of start.
fn merge_ranges(it: impl Iterator<Item = Range<u64>>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in it {
        if r.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Splits `blocks` into waves whose NVMe reads stay within the wave size.
fn waves(seq: &Seq, blocks: &[usize], want: Want, wave_bytes: u64) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0u64;
    for &i in blocks {
        let cost = match need_of(seq, i, want) {
            Some(n) => match &n.what {
                What::Span(r) => r.len() as u64 + 8192,
                What::Record(e) => n.loc.span(e.len) as u64,
            },
            None => 0,
        };
        match out.last_mut() {
            Some(w) if bytes + cost <= wave_bytes || bytes == 0 => {
                w.push(i);
                bytes += cost;
            }
            _ => {
                out.push(vec![i]);
                bytes = cost;
            }
        }
    }
    out
}

/// What block `i` needs from NVMe (None: it is read from DRAM).
fn need_of(seq: &Seq, i: usize, want: Want) -> Option<Need> {
    let b = &seq.pin.blocks[i];
    if b.dram.is_some() || seq.lease(i).is_some() {
        return None;
    }
    let (seg, loc) = b.nvme.clone()?;
    let geom = seq.req.geom;
    let tokens = geom.tokens_of(b.len)?;
    let what = if b.summary.is_some() {
        let k = geom.tensor_range(tokens, seq.req.layer, 0);
        let end = match want {
            Want::K => k.end,
            Want::Kv => geom.tensor_range(tokens, seq.req.layer, 1).end,
        };
        What::Span(k.start..end)
    } else {
        What::Record(b.expect)
    };
    Some(Need { seg, loc, what })
}

/// Reads one wave's NVMe bytes: per block of the wave, what arrived.
async fn read_wave(
    seq: &mut Seq,
    wave: &[usize],
    want: Want,
) -> Vec<Option<Result<Got, NvmeError>>> {
    let mut needs = Vec::new();
    let mut which = Vec::new();
    for (w, &i) in wave.iter().enumerate() {
        if let Some(n) = need_of(seq, i, want) {
            needs.push(n);
            which.push(w);
        } else if seq.pin.blocks[i].dram.is_none() && seq.lease(i).is_none() {
            // Neither copy is readable (NVMe fenced meanwhile): the
            // covered prefix ends here.
            seq.cut_at(i);
        }
    }
    let mut out: Vec<Option<Result<Got, NvmeError>>> = (0..wave.len()).map(|_| None).collect();
    if needs.is_empty() {
        return out;
    }
    let Some(tier) = seq.pin.store().nvme().cloned() else {
        for &w in &which {
            seq.cut_at(wave[w]);
        }
        return out;
    };
    let (got, bytes) = fetch(&tier, &needs).await;
    // Attribute the device bytes to the blocks of the wave, evenly enough
    // for the per-tier totals (the sum is exact).
    let per = bytes / needs.len() as u64;
    let mut rest = bytes - per * needs.len() as u64;
    for (&w, g) in which.iter().zip(got) {
        let extra = std::mem::take(&mut rest);
        seq.count(wave[w], TierKind::Nvme, per + extra);
        out[w] = Some(g);
    }
    out
}

/// A layer's K and V bytes (V empty when only K was asked).
type KvBytes<'a> = (&'a [u8], &'a [u8]);

/// The layer's K (and V) of block `i`, verified: from DRAM in place, or
/// from what a wave read. `Err(tier)`: the bytes failed verification there
/// (the caller drops that copy); `Ok(None)`: not readable now. `read`
/// gets the DRAM bytes verified (NVMe bytes are counted by the wave).
fn layer_bytes<'a>(
    seq: &'a Seq,
    i: usize,
    want: Want,
    got: Option<&'a Result<Got, NvmeError>>,
    read: &mut Option<(TierKind, u64)>,
) -> Result<Option<KvBytes<'a>>, TierKind> {
    let geom = seq.req.geom;
    let layer = seq.req.layer;
    let b = &seq.pin.blocks[i];
    let Some(tokens) = geom.tokens_of(b.len) else {
        return Ok(None);
    };
    let kr = geom.tensor_range(tokens, layer, 0);
    let vr = geom.tensor_range(tokens, layer, 1);
    let summary = seq.pin.summary(i, geom);
    // Every leaf of the layer against its own sum (one leaf: the layer).
    let all = 0..summary.map_or(1, |s| s.leaves());
    let verify = |k: &[u8], v: &[u8], s: &super::SummaryView<'_>| {
        s.verify(layer, 0, tokens, all.clone(), k)
            && (want == Want::K || s.verify(layer, 1, tokens, all.clone(), v))
    };
    if b.dram.is_some() {
        return match &summary {
            Some(s) => {
                let k = seq.pin.dram_bytes(i, kr.clone()).expect("DRAM copy");
                let v = match want {
                    Want::Kv => seq.pin.dram_bytes(i, vr.clone()).expect("DRAM copy"),
                    Want::K => &[][..],
                };
                *read = Some((TierKind::Dram, (k.len() + v.len()) as u64));
                if verify(k, v, s) {
                    Ok(Some((k, v)))
                } else {
                    Err(TierKind::Dram)
                }
            }
            None => {
                let all = seq.pin.dram_bytes(i, 0..b.len as usize).expect("DRAM copy");
                *read = Some((TierKind::Dram, b.len));
                if strata_proto::checksum(all) == b.checksum {
                    Ok(Some((&all[kr], &all[vr])))
                } else {
                    Err(TierKind::Dram)
                }
            }
        };
    }
    match got {
        Some(Ok(g)) => {
            let bytes = g.bytes();
            match &summary {
                Some(s) => {
                    let k = &bytes[..kr.len()];
                    let v = match want {
                        Want::Kv => &bytes[kr.len()..kr.len() + vr.len()],
                        Want::K => &[][..],
                    };
                    if verify(k, v, s) {
                        Ok(Some((k, v)))
                    } else {
                        Err(TierKind::Nvme)
                    }
                }
                // A whole record, verified by the tier.
                None => Ok(Some((&bytes[kr], &bytes[vr]))),
            }
        }
        Some(Err(NvmeError::Corrupt(_))) => Err(TierKind::Nvme),
        _ => Ok(None),
    }
}

/// [`layer_bytes`], counted; a block that cannot be read or fails its
/// check ends the covered prefix (a failed check also drops that copy).
/// The bytes come back as pointer ranges so that `seq` stays free to
/// borrow mutably (see `slice_of`).
#[allow(clippy::type_complexity)]
fn take_layer(
    seq: &mut Seq,
    i: usize,
    want: Want,
    got: Option<&Result<Got, NvmeError>>,
) -> Option<(Range<*const u8>, Range<*const u8>)> {
    let mut read = None;
    let r = layer_bytes(seq, i, want, got, &mut read)
        .map(|o| o.map(|(k, v)| (k.as_ptr_range(), v.as_ptr_range())));
    if let Some((t, n)) = read {
        seq.count(i, t, n);
    }
    match r {
        Ok(Some(p)) => Some(p),
        Ok(None) => {
            seq.cut_at(i);
            None
        }
        Err(tier) => {
            seq.pin.store().attend_corrupt(seq.pin.blocks[i].r, tier);
            seq.cut_at(i);
            None
        }
    }
}

/// Caller-made buffers of one blocking step.
struct Work {
    attn: AttnScratch,
    rows: Vec<u32>,
}

impl Work {
    fn new(g: usize, d: usize) -> Self {
        Work {
            attn: AttnScratch::new(g, d),
            rows: Vec::new(),
        }
    }
}

/// The stored bytes as elements: in place when aligned (arena extents and
/// I/O buffers are), else converted into a copy.
fn elems<E: KvElem>(b: &[u8]) -> Cow<'_, [E]> {
    // SAFETY: E is f32, f16 or bf16 (sealed): every bit pattern is a value.
    let (pre, mid, post) = unsafe { b.align_to::<E>() };
    if pre.is_empty() && post.is_empty() {
        return Cow::Borrowed(mid);
    }
    let w = std::mem::size_of::<E>();
    Cow::Owned(
        b.chunks_exact(w)
            .map(|c| {
                E::from_f32(match w {
                    4 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    _ if E::NAME == "bf16" => {
                        f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)
                    }
                    _ => f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
                })
            })
            .collect(),
    )
}

/// Partial attention of every query head over `rows(h)` (token indices of
/// the block) of the block's layer, merged into `acc`.
fn attend_rows<E: KvElem>(
    seq: &Seq,
    states: &mut [AttnState],
    k: &[u8],
    v: &[u8],
    w: &mut Work,
    rows: &dyn Fn(usize, &mut Vec<u32>),
) {
    let (k, v) = (elems::<E>(k), elems::<E>(v));
    let geom = seq.req.geom;
    let (d, kv) = (geom.head_dim as usize, geom.kv_heads as usize);
    let s = &seq.req.seqs[seq.idx];
    let g = s.heads / kv;
    for (h, state) in states.iter_mut().enumerate() {
        w.rows.clear();
        rows(h, &mut w.rows);
        if w.rows.is_empty() {
            continue;
        }
        let q = &s.q[h * g * d..(h + 1) * g * d];
        // The tensor is [token][kv_head][d]: the kernel reads head h's rows
        // in place (every row of the block: no index list at all), into
        // the head's running state (no per-block normalisation or merge).
        let tokens = if w.rows.len() * kv * d == k.len() {
            Tokens::All
        } else {
            Tokens::Rows(&w.rows)
        };
        state.feed_head(q, seq.req.scale, &k, &v, kv, h, tokens, &mut w.attn);
    }
}

fn dispatch_rows(
    seq: &Seq,
    states: &mut [AttnState],
    k: &[u8],
    v: &[u8],
    w: &mut Work,
    rows: &dyn Fn(usize, &mut Vec<u32>),
) {
    match seq.req.geom.dtype {
        Dtype::F32 => attend_rows::<f32>(seq, states, k, v, w, rows),
        Dtype::F16 => attend_rows::<f16>(seq, states, k, v, w, rows),
        Dtype::Bf16 => attend_rows::<bf16>(seq, states, k, v, w, rows),
        Dtype::Fp8E4m3 => unreachable!("checked: Attend refuses fp8"),
    }
}

/// Promotes the NVMe-only blocks among `blocks` (compute.promote).
async fn promote(seq: &mut Seq, blocks: &[usize]) {
    let refs: Vec<_> = blocks
        .iter()
        .filter(|&&i| seq.pin.blocks[i].dram.is_none())
        .map(|&i| seq.pin.blocks[i].r)
        .collect();
    if refs.is_empty() {
        return;
    }
    tiering::promote(seq.pin.store(), &refs).await;
    seq.pin.refresh_dram();
    for &i in blocks {
        let b = &seq.pin.blocks[i];
        if b.dram.is_some()
            && refs.contains(&b.r)
            && let Some((_, loc)) = &b.nvme
        {
            seq.count(i, TierKind::Nvme, loc.span(b.len as u32) as u64);
        }
    }
}

/// With `min_precision` INT8/INT4: takes the quant copy of each of
/// `blocks` that has no DRAM copy, when one of the allowed precision is
/// kept, so that its layer is computed from the copy instead of read from
/// NVMe. The call holds the copies until it is done.
fn lease_copies(seq: &mut Seq, blocks: &[usize]) {
    let Some((pool, floor)) = seq.quant.clone() else {
        return;
    };
    let (ns, layer) = (seq.req.namespace, seq.req.layer);
    for &i in blocks {
        let b = &seq.pin.blocks[i];
        if b.dram.is_none() && seq.leases[i].is_none() {
            seq.leases[i] = pool.get(ns, layer, &BlockIdent::of(b), floor);
        }
    }
}

/// Block `i`'s layer from the quant copy it leased, dequantised into `dq`
/// (`[tokens][kv][d]` f32 K and V): Some(Ok(bytes of the copy)), or
/// Some(Err) when the copy failed its check (it is dropped and counted;
/// the caller ends the covered prefix there, as for a corrupt DRAM copy).
/// None when the block has no lease.
fn leased_layer(seq: &Seq, i: usize, dq: &mut Decoded) -> Option<Result<u64, ()>> {
    let copy = seq.lease(i)?;
    if copy.decode(dq) {
        return Some(Ok(copy.bytes_len() as u64));
    }
    if let Some((pool, _)) = &seq.quant {
        pool.corrupt(
            seq.req.namespace,
            seq.req.layer,
            seq.pin.blocks[i].key,
            copy,
        );
    }
    Some(Err(()))
}

/// f32 values as their bytes (what [`attend_rows`] takes).
fn f32_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte is initialised; u8 has
    // alignment 1; the length is the same memory.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// With `min_precision` INT8/INT4: keeps an int8 copy of block `i`'s layer
/// from its K and V just read from NVMe and verified (`k`, `v`: the whole
/// layer of its stored tokens), unless one made from these bytes is kept.
fn keep_copy(seq: &Seq, i: usize, k: &[u8], v: &[u8]) {
    let Some((pool, _)) = &seq.quant else {
        return;
    };
    let b = &seq.pin.blocks[i];
    let (ns, layer, geom) = (seq.req.namespace, seq.req.layer, seq.req.geom);
    if b.dram.is_some() {
        return;
    }
    let b = &BlockIdent::of(b);
    if pool.has_int8(ns, layer, b) {
        return;
    }
    let width = geom.kv_heads as usize * geom.head_dim as usize;
    match geom.dtype {
        Dtype::F32 => pool.insert(ns, layer, b, &elems::<f32>(k), &elems::<f32>(v), width),
        Dtype::F16 => pool.insert(ns, layer, b, &elems::<f16>(k), &elems::<f16>(v), width),
        Dtype::Bf16 => pool.insert(ns, layer, b, &elems::<bf16>(k), &elems::<bf16>(v), width),
        Dtype::Fp8E4m3 => unreachable!("checked: Attend refuses fp8"),
    }
}

/// Attends over whole blocks (DENSE, SPARSE), in order, wave by wave.
async fn attend_blocks(
    ctx: &AttendCtx,
    mut seq: Seq,
    blocks: Vec<usize>,
) -> Result<Seq, StoreError> {
    if ctx.cfg.promote {
        promote(&mut seq, &blocks).await;
    }
    lease_copies(&mut seq, &blocks);
    for wave in waves(&seq, &blocks, Want::Kv, ctx.cfg.read_wave_bytes) {
        if seq.cut.is_some_and(|c| wave[0] >= c) {
            break;
        }
        let got = read_wave(&mut seq, &wave, Want::Kv).await;
        seq = compute_wave(ctx, seq, wave, got, RowSel::All).await?;
    }
    Ok(seq)
}

/// Which rows of a block a compute step attends, per KV head.
#[derive(Clone)]
enum RowSel {
    /// Every token of the block.
    All,
    /// SPARF: per KV head, the chosen token positions (sorted).
    Chosen(Arc<Vec<Vec<u32>>>),
}

impl RowSel {
    fn rows(&self, seq: &Seq, i: usize, h: usize, out: &mut Vec<u32>) {
        match self {
            RowSel::All => out.extend(0..seq.tokens[i]),
            RowSel::Chosen(chosen) => {
                let (a, b) = (seq.starts[i], seq.starts[i] + seq.tokens[i] as u64);
                let c = &chosen[h];
                let p = c.partition_point(|&t| (t as u64) < a);
                out.extend(
                    c[p..]
                        .iter()
                        .take_while(|&&t| (t as u64) < b)
                        .map(|&t| (t as u64 - a) as u32),
                );
            }
        }
    }
}

/// Blocks below which a wave is not split between compute threads: a part
/// must outweigh the hand-off to the blocking pool (~64 blocks of 16
/// tokens of one KV head at d 128 are ~50 µs of math).
const MIN_PART_BLOCKS: usize = 64;

/// How a wave of `n` blocks is split between compute threads: (parts,
/// blocks per part), at most `compute.threads` parts of at least
/// [`MIN_PART_BLOCKS`] (but one part however small the wave).
fn part_split(threads: usize, n: usize) -> (usize, usize) {
    let parts = threads.max(1).min(n.div_ceil(MIN_PART_BLOCKS)).max(1);
    (parts, n.div_ceil(parts).max(1))
}

/// What one part of a wave computed over its blocks, in order: applied to
/// the sequence once every part is done.
struct Part {
    acc: Acc,
    reads: Vec<(usize, TierKind, u64)>,
    /// Blocks computed from quant copies, and the copies' bytes.
    quant: Vec<(usize, u64)>,
    /// The block that could not be read or failed its check (the part
    /// stopped there), and the tier whose copy failed.
    cut: Option<(usize, Option<TierKind>)>,
    /// `compute.hotness`: the blocks attended, in order, and each one's own
    /// log-sum-exp per query head (`[blocks][heads]`); `m0`, `l0`: the
    /// states' running `(m, l)` before the current block. Empty when off.
    track: bool,
    mass_blocks: Vec<usize>,
    mass: Vec<f32>,
    m0: Vec<f32>,
    l0: Vec<f32>,
}

impl Part {
    /// Nothing computed yet, for `heads` query heads of `d`, room for
    /// `reads` read records.
    fn new(heads: usize, d: usize, reads: usize) -> Self {
        Part {
            acc: Acc {
                o: vec![0.0; heads * d],
                lse: vec![f32::NEG_INFINITY; heads],
            },
            reads: Vec::with_capacity(reads),
            quant: Vec::new(),
            cut: None,
            track: false,
            mass_blocks: Vec::new(),
            mass: Vec::new(),
            m0: Vec::new(),
            l0: Vec::new(),
        }
    }

    /// Records each attended block's own mass for `seq` when it tracks
    /// hotness.
    fn tracking(mut self, seq: &Seq) -> Self {
        self.track = !seq.mass.is_empty();
        self
    }

    /// Before feeding a block: the states' running `(m, l)`.
    fn before(&mut self, states: &[AttnState]) {
        if !self.track {
            return;
        }
        self.m0.clear();
        self.l0.clear();
        for st in states {
            let (m, l) = st.running();
            self.m0.extend_from_slice(m);
            self.l0.extend_from_slice(l);
        }
    }

    /// After feeding block `i`: its own log-sum-exp per query head, what
    /// the states gained since [`Part::before`] (`l1 - l0 exp(m0 - m1)`
    /// relative to `m1`; one `ln` a head, no second pass over the block).
    /// A block below ~1e-6 of the running total reads as rounding noise
    /// at that level, still a negligible share (tested).
    fn after(&mut self, i: usize, states: &[AttnState]) {
        if !self.track {
            return;
        }
        self.mass_blocks.push(i);
        let mut h = 0;
        for st in states {
            let (m1, l1) = st.running();
            for (&m, &l) in m1.iter().zip(l1) {
                let (m0, l0) = (self.m0[h], self.l0[h]);
                // The running max moves seldom: no exp when it stayed.
                let own = match (l0 > 0.0, m0 == m) {
                    (false, _) => l,
                    (true, true) => l - l0,
                    (true, false) => l - l0 * (m0 - m).exp(),
                };
                self.mass.push(if own > 0.0 {
                    m + fast_ln(own)
                } else {
                    f32::NEG_INFINITY
                });
                h += 1;
            }
        }
    }

    /// The running state of each KV head (`g` query heads of `d` each)
    /// as the part's `(o, lse)`.
    fn finish(&mut self, states: &[AttnState], g: usize, d: usize) {
        for (h, st) in states.iter().enumerate() {
            st.finish(
                &mut self.acc.o[h * g * d..(h + 1) * g * d],
                &mut self.acc.lse[h * g..(h + 1) * g],
            );
        }
    }
}

/// Verifies and attends the blocks of one wave (what `read_wave` read for
/// them beside the DRAM copies): split into contiguous parts computed on up
/// to `compute.threads` blocking threads, each with its own accumulator,
/// merged in block order. A part stops at its first unreadable or corrupt
/// block; the covered prefix then ends there and later parts are dropped.
async fn compute_wave(
    ctx: &AttendCtx,
    seq: Seq,
    wave: Vec<usize>,
    got: Vec<Option<Result<Got, NvmeError>>>,
    sel: RowSel,
) -> Result<Seq, StoreError> {
    let wave: Vec<usize> = match seq.cut {
        Some(c) => wave.into_iter().take_while(|&i| i < c).collect(),
        None => wave,
    };
    let (parts, per) = part_split(ctx.cfg.threads, wave.len());
    let seq = Arc::new(seq);
    let wave = Arc::new(wave);
    let got = Arc::new(got);
    let tasks = (0..parts).map(|p| {
        let (seq, wave, got, sel) = (seq.clone(), wave.clone(), got.clone(), sel.clone());
        ctx.blocking(move || {
            let range = (p * per).min(wave.len())..((p + 1) * per).min(wave.len());
            compute_part(&seq, &wave[range.clone()], &got[range], &sel)
        })
    });
    let done = futures_util::future::join_all(tasks).await;
    let mut seq = Arc::try_unwrap(seq)
        .map_err(|_| StoreError::Internal("Attend compute part still holds the sequence".into()))?;
    for part in done {
        if !apply_part(&mut seq, part?) {
            break;
        }
    }
    Ok(seq)
}

/// Applies one part's reads and `(o, lse)` to the sequence, in block
/// order; false when the part stopped at a block (the covered prefix ends
/// there, and a corrupt copy is reported), so later parts are dropped.
fn apply_part(seq: &mut Seq, part: Part) -> bool {
    let d = seq.req.geom.head_dim as usize;
    for &(i, tier, n) in &part.reads {
        seq.count(i, tier, n);
    }
    for &(i, n) in &part.quant {
        if !std::mem::replace(&mut seq.qseen[i], true) {
            seq.qread.blocks += 1;
            seq.qread.bytes += n;
        }
    }
    // A block attended in pieces (SPARSE leaves) sums them.
    let heads = seq.input().heads;
    for (j, &i) in part.mass_blocks.iter().enumerate() {
        let at = &mut seq.mass[i * heads..(i + 1) * heads];
        for (a, &b) in at.iter_mut().zip(&part.mass[j * heads..(j + 1) * heads]) {
            *a = log_add_exp(*a, b);
        }
    }
    merge_into(
        d,
        &mut seq.acc.o,
        &mut seq.acc.lse,
        &part.acc.o,
        &part.acc.lse,
    );
    if let Some((i, tier)) = part.cut {
        if let Some(tier) = tier {
            seq.pin.store().attend_corrupt(seq.pin.blocks[i].r, tier);
        }
        seq.cut_at(i);
        return false;
    }
    true
}

/// One part of [`compute_wave`]: `blocks` with what the wave read for each.
fn compute_part(
    seq: &Seq,
    blocks: &[usize],
    got: &[Option<Result<Got, NvmeError>>],
    sel: &RowSel,
) -> Part {
    let geom = seq.req.geom;
    let (d, heads) = (geom.head_dim as usize, seq.input().heads);
    let g = heads / geom.kv_heads as usize;
    let mut w = Work::new(g, d);
    let mut states: Vec<AttnState> = (0..geom.kv_heads).map(|_| AttnState::new(g, d)).collect();
    let mut part = Part::new(heads, d, blocks.len() * 2).tracking(seq);
    let mut dq = Decoded::default();
    for (j, &i) in blocks.iter().enumerate() {
        if let Some(&next) = blocks.get(j + 1) {
            prefetch_dram(seq, next);
        }
        match leased_layer(seq, i, &mut dq) {
            Some(Ok(n)) => {
                part.quant.push((i, n));
                part.before(&states);
                let (k, v) = (f32_bytes(&dq.k), f32_bytes(&dq.v));
                attend_rows::<f32>(seq, &mut states, k, v, &mut w, &|h, rows| {
                    sel.rows(seq, i, h, rows)
                });
                part.after(i, &states);
                continue;
            }
            Some(Err(())) => {
                part.cut = Some((i, None));
                break;
            }
            None => {}
        }
        let mut read = None;
        let r = layer_bytes(seq, i, Want::Kv, got[j].as_ref(), &mut read);
        part.reads.extend(read.map(|(t, n)| (i, t, n)));
        match r {
            Ok(Some((k, v))) => {
                part.before(&states);
                dispatch_rows(seq, &mut states, k, v, &mut w, &|h, rows| {
                    sel.rows(seq, i, h, rows)
                });
                part.after(i, &states);
                if matches!(got[j], Some(Ok(_))) {
                    keep_copy(seq, i, k, v);
                }
            }
            Ok(None) => {
                part.cut = Some((i, None));
                break;
            }
            Err(tier) => {
                part.cut = Some((i, Some(tier)));
                break;
            }
        }
    }
    part.finish(&states, g, d);
    part
}

/// Lines between two prefetches of [`prefetch_dram`]: one per KiB starts
/// the hardware's streams over the block without filling the line-fill
/// buffers (a hint for each of the 128 lines of an 8 KiB layer stalled on
/// them: 70% of `compute_part`'s own time in the batch bench). A/B,
/// 2026-11-29, three rounds each: dense scan p50 0.33–0.35 of one-thread
/// read against 0.22–0.27 prefetching every line, batch 32 × 16K the same
/// (33.6–34.0 ms against 33.1–34.3).
const PREFETCH_EVERY_LINES: usize = 16;

/// Asks the CPU to start loading block `i`'s layer from DRAM into L2 while
/// the current block is verified and computed (blocks of a chain are not
/// always adjacent in the arena, so the hardware prefetcher misses the
/// jump). A hint only: never faults, changes nothing.
fn prefetch_dram(seq: &Seq, i: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let b = &seq.pin.blocks[i];
        if b.dram.is_none() {
            return;
        }
        let geom = seq.req.geom;
        let Some(tokens) = geom.tokens_of(b.len) else {
            return;
        };
        // The checksums `verify` compares with: a line of the summary
        // region that is as cold as the block (8% of a dense call stalled
        // on it without this).
        if let Some(view) = seq.pin.summary(i, geom) {
            prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(view.layer_sums(seq.req.layer));
        }
        let (kr, vr) = (
            geom.tensor_range(tokens, seq.req.layer, 0),
            geom.tensor_range(tokens, seq.req.layer, 1),
        );
        for r in [kr, vr] {
            if let Some(bytes) = seq.pin.dram_bytes(i, r) {
                for line in bytes.chunks(64).step_by(PREFETCH_EVERY_LINES) {
                    prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr());
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (seq, i);
}

/// Asks the CPU to load the line holding `p` (`HINT`: `_MM_HINT_T0` into
/// L1, `_MM_HINT_T1` into L2). A hint only: never faults, even past a
/// mapping, and changes nothing.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch<const HINT: i32>(p: *const u8) {
    // SAFETY: a prefetch does not access memory architecturally; SSE is
    // baseline on x86-64.
    unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(p as *const i8) }
}

/// A slice from a pointer range.
///
/// # Safety
/// The range is a live, initialised byte slice for the caller's use.
unsafe fn slice_of<'a>(r: Range<*const u8>) -> &'a [u8] {
    // SAFETY: per the caller's contract.
    unsafe { std::slice::from_raw_parts(r.start, r.end.offset_from(r.start) as usize) }
}

/// SparF (InstInfer): per KV head, the top-r channels of the group's
/// queries score every token; then whole blocks are chosen best-first by
/// the log-sum-exp of their tokens' scores until k tokens are in (top-k
/// grouped by page; `sparf_by_token`: the top-k single tokens) and attended
/// exactly from the stored, verified K and V.
///
/// Phase 1 scores a block from its key sketch when the summary has one
/// (`compute.key_sketch`: r rows of 8-bit codes per KV head, no K read;
/// the rows of the next blocks are prefetched, since they are scattered);
/// other blocks are scored from their token-major K, read and verified in
/// waves. Phase 2 reads K and V of the chosen blocks.
///
/// With `sparf_mean_correction`, phase 1 also keeps each query head's own
/// scores (`[heads][total]` f32, the group's times the group size) and
/// the answer gets SparQ's correction ([`mean_correction`]).
async fn sparf(ctx: &AttendCtx, seq: Seq) -> Result<SeqResult, StoreError> {
    let mut seq = seq;
    let geom = seq.req.geom;
    let (d, kv) = (geom.head_dim as usize, geom.kv_heads as usize);
    let heads = seq.input().heads;
    let g = heads / kv;
    let r = seq
        .req
        .sparf_channels
        .map_or((d / 8).max(1), |r| r as usize)
        .min(d);
    let all: Vec<usize> = (0..seq.present()).collect();
    if ctx.cfg.promote {
        promote(&mut seq, &all).await;
    }
    let total: usize = seq.tokens[..seq.present()]
        .iter()
        .map(|&t| t as usize)
        .sum();
    let correct = seq.req.sparf_mean_correction;
    if let Some(factor) = refine_factor(&ctx.cfg, &seq) {
        // Two-stage ranking (`refined_blocks`): no r-channel scan at all.
        let k_tokens = seq
            .req
            .sparf_tokens
            .map_or(total.div_ceil(16).max(1), |k| k as usize)
            .min(total);
        let runs = ctx.runs.clone();
        let threads = ctx.cfg.threads;
        let (s, got) = ctx
            .blocking(move || {
                let mut seq = seq;
                let mut alpha = vec![0f32; if correct { heads } else { 0 }];
                let got = refined_blocks(
                    &seq,
                    factor,
                    k_tokens,
                    runs.as_deref(),
                    correct.then_some(&mut alpha[..]),
                )
                .map(|(chosen, bytes)| (attend_chosen_here(threads, &mut seq, chosen), bytes));
                (seq, got.map(|g| (g, alpha)))
            })
            .await?;
        seq = s;
        if let Some(((chosen, bytes), alpha)) = got {
            let (seq, chosen) = match chosen {
                Ok(done) => (seq, done),
                Err(chosen) => attend_chosen(ctx, seq, chosen).await?,
            };
            return finish_sparf(
                ctx,
                seq,
                chosen,
                bytes,
                correct.then_some(Alpha::Given(alpha)),
            )
            .await;
        }
    }
    // Channels per KV head; scores per KV head over all tokens, first of
    // the blocks with a sketch (`need`: those without).
    let runs = ctx.runs.clone();
    let (mut seq, channels, mut scores, mut each, need, sketch_bytes) = ctx
        .blocking(move || {
            let mut sc = SparfScratch::new(g, d, 0);
            let s = &seq.req.seqs[seq.idx];
            let mut channels = vec![0u32; kv * r];
            for h in 0..kv {
                top_channels(
                    &s.q[h * g * d..(h + 1) * g * d],
                    g,
                    d,
                    &mut sc,
                    &mut channels[h * r..(h + 1) * r],
                );
            }
            let mut scores = vec![f32::NEG_INFINITY; kv * total];
            // Each query head's own scores, for the correction only.
            let mut each = vec![f32::NEG_INFINITY; if correct { heads * total } else { 0 }];
            let (need, bytes) = score_sketches(
                &seq,
                &channels,
                r,
                total,
                &mut scores,
                correct.then_some(&mut each[..]),
                runs.as_deref(),
            );
            (seq, channels, scores, each, need, bytes)
        })
        .await?;
    let channels = Arc::new(channels);
    // With min_precision INT8/INT4, blocks with a quant copy are scored
    // from it (no K read); their chosen tokens are attended from it too.
    // Those without read K and V (not K alone) when the call allows
    // copies, so that each gets one: a decode loop's later steps then read
    // no device byte, for twice the bytes in this one.
    lease_copies(&mut seq, &need);
    let want = if seq.quant.is_some() {
        Want::Kv
    } else {
        Want::K
    };
    for wave in waves(&seq, &need, want, ctx.cfg.read_wave_bytes) {
        if seq.cut.is_some_and(|c| wave[0] >= c) {
            break;
        }
        let got = read_wave(&mut seq, &wave, want).await;
        let channels = channels.clone();
        (seq, scores, each) = ctx
            .blocking(move || {
                let mut sc = SparfScratch::new(g, d, 0);
                let mut dq = Decoded::default();
                for (j, &i) in wave.iter().enumerate() {
                    if seq.cut.is_some_and(|c| i >= c) {
                        break;
                    }
                    let (k, v, dtype) = match leased_layer(&seq, i, &mut dq) {
                        Some(Ok(n)) => {
                            // Read, not attended: bytes only (the answer
                            // stays exact over what it attends).
                            seq.qread.bytes += n;
                            (f32_bytes(&dq.k), None, Dtype::F32)
                        }
                        Some(Err(())) => {
                            seq.cut_at(i);
                            break;
                        }
                        None => {
                            // A DRAM copy needs no quant copy: K alone.
                            let w = match seq.pin.blocks[i].dram {
                                Some(_) => Want::K,
                                None => want,
                            };
                            let Some((k, v)) = take_layer(&mut seq, i, w, got[j].as_ref()) else {
                                break;
                            };
                            // SAFETY: as in `attend_blocks`.
                            let (k, v) = unsafe { (slice_of(k), slice_of(v)) };
                            let fresh = w == Want::Kv && matches!(got[j], Some(Ok(_)));
                            (k, fresh.then_some(v), geom.dtype)
                        }
                    };
                    let (start, n) = (seq.starts[i] as usize, seq.tokens[i] as usize);
                    let s = &seq.req.seqs[seq.idx];
                    let score = match dtype {
                        Dtype::F32 => score_block::<f32>,
                        Dtype::F16 => score_block::<f16>,
                        Dtype::Bf16 => score_block::<bf16>,
                        Dtype::Fp8E4m3 => unreachable!("checked"),
                    };
                    score(
                        k,
                        s,
                        &channels,
                        r,
                        seq.req.scale,
                        n,
                        start,
                        total,
                        kv,
                        d,
                        &mut sc,
                        &mut scores,
                        correct.then_some(&mut each[..]),
                    );
                    if let Some(v) = v {
                        keep_copy(&seq, i, k, v);
                    }
                }
                (seq, scores, each)
            })
            .await?;
    }
    // The blocks scored (a cut ends them) and their token spans.
    let present = seq.present();
    let spans: Vec<(usize, usize)> = (0..present)
        .map(|i| (seq.starts[i] as usize, seq.tokens[i] as usize))
        .collect();
    let scored: usize = spans.iter().map(|&(_, n)| n).sum();
    let k_tokens = seq
        .req
        .sparf_tokens
        .map_or(scored.div_ceil(16).max(1), |k| k as usize)
        .min(scored);
    let by_token = seq.req.sparf_by_token;
    let joint = seq.req.sparf_joint_heads && kv > 1;
    let (seq, chosen) = ctx
        .blocking(move || {
            let mut chosen: Vec<Vec<u32>> = Vec::with_capacity(kv);
            let mut idx = vec![0u32; k_tokens];
            let mut val = vec![0f32; k_tokens];
            if joint {
                // One set for the layer: every KV head attends it.
                let mut c = if by_token {
                    let w = joint_token_weights(&scores, total, scored, kv);
                    let got = top_k(&w, k_tokens, &mut idx, &mut val);
                    idx[..got].to_vec()
                } else {
                    joint_best_blocks(&scores, total, scored, kv, &spans, k_tokens)
                };
                c.sort_unstable();
                chosen.resize(kv, c);
                return (seq, chosen);
            }
            for h in 0..kv {
                let sc = &scores[h * total..h * total + scored];
                let mut c = if by_token {
                    let got = top_k(sc, k_tokens, &mut idx, &mut val);
                    idx[..got].to_vec()
                } else {
                    best_blocks(sc, &spans, k_tokens)
                };
                c.sort_unstable();
                chosen.push(c);
            }
            (seq, chosen)
        })
        .await?;
    let (seq, chosen) = attend_chosen(ctx, seq, chosen).await?;
    let alpha = correct.then(|| Alpha::Sketch {
        channels: Arc::unwrap_or_clone(channels),
        r,
        each,
    });
    finish_sparf(ctx, seq, chosen, sketch_bytes, alpha).await
}

/// SPARF's answer once the chosen set is attended: the mean-value
/// correction when asked for (`alpha`), and the summary bytes the ranking
/// read (`summary_bytes`, the correction's V sums added).
async fn finish_sparf(
    ctx: &AttendCtx,
    seq: Seq,
    chosen: Arc<Vec<Vec<u32>>>,
    summary_bytes: u64,
    alpha: Option<Alpha>,
) -> Result<SeqResult, StoreError> {
    let hot = settle_hot(&seq);
    let (mut seq, mut chosen) = (seq, chosen);
    let mut summary_bytes = summary_bytes;
    let mut corrected = false;
    if let Some(alpha) = alpha {
        let (s, c, outcome, bytes) = ctx
            .blocking(move || {
                let mut seq = seq;
                let (outcome, bytes) = mean_correction(&mut seq, &chosen, &alpha);
                (seq, chosen, outcome, bytes)
            })
            .await?;
        ctx.metrics.mean_correction[outcome as usize].increment(1);
        corrected = outcome == Correction::Applied;
        summary_bytes += bytes;
        (seq, chosen) = (s, c);
    }
    let mut out = chosen_result(seq, &chosen, hot);
    out.abstract_bytes = summary_bytes;
    if corrected {
        out.mean_corrected = true;
        out.exact = false;
    }
    Ok(out)
}

/// Where the mean-value correction's `alpha` (the chosen set's estimated
/// share of each query head's softmax mass) comes from.
pub(crate) enum Alpha {
    /// SparQ's: each query head's own r-channel scores over every token
    /// (`each`, `[heads][total]`), at its temperature on the group's
    /// `channels` (`[kv][r]`).
    Sketch {
        channels: Vec<u32>,
        r: usize,
        each: Vec<f32>,
    },
    /// Per query head, from the two-stage ranking ([`refined_blocks`]).
    Given(Vec<f32>),
}

/// What became of a requested mean-value correction (the metric's label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Correction {
    Applied = 0,
    /// The chosen set is every present token: the answer is exact, and
    /// the correction the identity.
    Exact = 1,
    /// A present block has no V sum (no summary, or no sketch section:
    /// `compute.key_sketch` off or the summary region was full), or it is
    /// attended only in part (`last_block_tokens`): the answer is the
    /// uncorrected, mergeable one.
    NoSums = 2,
}

/// SparQ's mean-value correction of a SparF answer whose chosen tokens
/// were attended exactly into `seq.acc`, per query head `j` of KV head
/// `h`: `alpha_j`, the softmax mass of the chosen set ([`Alpha`]: as
/// SparQ estimates it from the head's own r-channel scores at its
/// temperature, or as the two-stage ranking does), and `v_mean_h`, the mean
/// of V over every present token from the summaries' V sums (no V read);
/// then `o_j = alpha_j o_j + (1 - alpha_j) v_mean_h` and `lse_j -= ln
/// alpha_j` (`strata_kernels::sparf::mean_correct`). Everything is over
/// the present prefix as it stands after phase 2 (a block cut there leaves
/// the estimate as well). Returns what happened and the V-sum bytes read.
fn mean_correction(seq: &mut Seq, chosen: &[Vec<u32>], alpha: &Alpha) -> (Correction, u64) {
    let geom = seq.req.geom;
    let (d, kv) = (geom.head_dim as usize, geom.kv_heads as usize);
    let heads = seq.input().heads;
    let g = heads / kv;
    let present = seq.present();
    let end: usize = seq.tokens[..present].iter().map(|&t| t as usize).sum();
    // Chosen positions of each KV head inside the present prefix (sorted).
    let inside: Vec<&[u32]> = chosen
        .iter()
        .map(|c| &c[..c.partition_point(|&t| (t as usize) < end)])
        .collect();
    if inside.iter().all(|c| c.len() == end) {
        return (Correction::Exact, 0);
    }
    // Mean of V per KV head over the present prefix, from the V sums.
    let mut sum = vec![0f64; kv * d];
    let mut row = vec![0f32; d];
    let mut bytes = 0u64;
    for i in 0..present {
        let Some(view) = seq.pin.summary(i, geom) else {
            return (Correction::NoSums, bytes);
        };
        let held = geom.tokens_of(seq.pin.blocks[i].len);
        if !view.has_sketch() || held != Some(seq.tokens[i]) {
            return (Correction::NoSums, bytes);
        }
        for h in 0..kv {
            view.v_sum(seq.req.layer, h as u32, &mut row);
            for (a, &x) in sum[h * d..(h + 1) * d].iter_mut().zip(&row) {
                *a += x as f64;
            }
        }
        bytes += (kv * geom.v_sum_head_bytes()) as u64;
    }
    let mean: Vec<f32> = sum.iter().map(|&x| (x / end as f64) as f32).collect();
    let s = &seq.req.seqs[seq.idx];
    for j in 0..heads {
        let h = j / g;
        let alpha = match alpha {
            Alpha::Sketch { channels, r, each } => {
                let total = each.len() / heads;
                let ch = &channels[h * r..(h + 1) * r];
                let t = score_temperature(&s.q[j * d..(j + 1) * d], ch);
                chosen_mass(&each[j * total..j * total + end], inside[h], t)
            }
            Alpha::Given(a) => a[j],
        };
        mean_correct(
            &mut seq.acc.o[j * d..(j + 1) * d],
            &mut seq.acc.lse[j],
            alpha,
            &mean[h * d..(h + 1) * d],
        );
    }
    (Correction::Applied, bytes)
}

/// Phase 1 of SparF from the key sketches: scores of every block whose
/// summary has one, into `scores[h][start..start + n]`. Returns the blocks
/// left to score from their keys (no sketch, or a chosen channel's box is
/// not finite) and the sketch bytes read (the r code rows and their
/// bounds, per KV head). `each`: `[heads][total]` scores of every query
/// head of its own, when the mean-value correction needs them.
///
/// With sketch runs (and no correction: runs give only the group's max),
/// the leading blocks that the chain's run covers are scored from it in
/// one streaming pass, bit for bit as block by block ([`super::runs`]);
/// the rest block by block.
#[allow(clippy::too_many_arguments)]
fn score_sketches(
    seq: &Seq,
    channels: &[u32],
    r: usize,
    total: usize,
    scores: &mut [f32],
    mut each: Option<&mut [f32]>,
    runs: Option<&SketchRuns>,
) -> (Vec<usize>, u64) {
    let geom = seq.req.geom;
    let (d, kv) = (geom.head_dim as usize, geom.kv_heads as usize);
    let layer = seq.req.layer;
    let s = &seq.req.seqs[seq.idx];
    let g = s.heads / kv;
    let (mut lo, mut hi) = (vec![0f32; r], vec![0f32; r]);
    let mut acc = SketchScratch::new();
    let (mut need, mut bytes) = (Vec::new(), 0u64);
    let present = seq.present();
    let mut first = 0;
    if let (Some(runs), None) = (runs, each.as_ref()) {
        let covered = seq_run(runs, seq, |view| {
            let (m, tpb) = (view.covered, geom.tokens_per_block as usize);
            let mut rs = RunScratch::default();
            for h in 0..kv {
                // Covered blocks are full and lead the chain: tokens
                // 0..m * tpb.
                run_scores(
                    &s.q[h * g * d..(h + 1) * g * d],
                    g,
                    d,
                    &view.head(h),
                    0..m,
                    &channels[h * r..(h + 1) * r],
                    seq.req.scale,
                    &mut rs,
                    &mut scores[h * total..h * total + m * tpb],
                );
            }
            m
        });
        if let Some(m) = covered {
            first = m;
            let tpb = geom.tokens_per_block as u64;
            bytes += m as u64 * kv as u64 * (r as u64 * tpb + 4 * r as u64);
        }
    }
    // The rows a block needs are scattered over its entry (and entries over
    // the region): ask for them a few blocks ahead, so that the misses
    // overlap instead of stalling one after another.
    const AHEAD: usize = 4;
    for i in first..(first + AHEAD).min(present) {
        prefetch_sketch(seq, i, channels, r);
    }
    for i in first..present {
        if i + AHEAD < present {
            prefetch_sketch(seq, i + AHEAD, channels, r);
        }
        let (start, n) = (seq.starts[i] as usize, seq.tokens[i] as usize);
        let Some(view) = seq.pin.summary(i, geom) else {
            need.push(i);
            continue;
        };
        let mut ok = true;
        for h in 0..kv {
            let Some(codes) = view.sketch(layer, h as u32) else {
                ok = false;
                break;
            };
            let ch = &channels[h * r..(h + 1) * r];
            for (j, &c) in ch.iter().enumerate() {
                let (a, b) = view.bound(layer, h as u32, c as usize);
                // The const conversion inlines (to_f32 calls a dispatcher).
                (lo[j], hi[j]) = (a.to_f32_const(), b.to_f32_const());
            }
            let sk = Sketch {
                codes,
                stride: geom.tokens_per_block as usize,
                n,
                lo: &lo,
                hi: &hi,
            };
            let q = &s.q[h * g * d..(h + 1) * g * d];
            let out = &mut scores[h * total + start..h * total + start + n];
            let scored = match each.as_deref_mut() {
                Some(e) => sketch_scores_with_heads(
                    q,
                    g,
                    d,
                    &sk,
                    ch,
                    seq.req.scale,
                    &mut acc,
                    out,
                    HeadScores {
                        out: &mut e[h * g * total + start..],
                        pitch: total,
                    },
                ),
                None => sketch_scores(q, g, d, &sk, ch, seq.req.scale, &mut acc, out),
            };
            if !scored {
                ok = false;
                break;
            }
            bytes += (r * n + 4 * r) as u64;
        }
        if !ok {
            need.push(i);
        }
    }
    (need, bytes)
}

/// Starts loading the sketch rows and bounds of the chosen channels of
/// block `i` into L1. A hint only: never faults, changes nothing.
fn prefetch_sketch(seq: &Seq, i: usize, channels: &[u32], r: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let geom = seq.req.geom;
        let Some(view) = seq.pin.summary(i, geom) else {
            return;
        };
        let fetch = prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>;
        let tpb = geom.tokens_per_block as usize;
        for h in 0..geom.kv_heads {
            let Some(codes) = view.sketch(seq.req.layer, h) else {
                return;
            };
            for &c in &channels[h as usize * r..(h as usize + 1) * r] {
                fetch(codes[c as usize * tpb..].as_ptr());
            }
            let (lo, hi) = view.bound_ptrs(seq.req.layer, h);
            for p in [lo, hi] {
                // The head's bounds span 2 * head_dim bytes each.
                for off in (0..2 * geom.head_dim as usize).step_by(64) {
                    fetch(p.wrapping_add(off));
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (seq, i, channels, r);
}

/// Candidate blocks per chosen block of SPARF's two-stage ranking
/// (`compute.sparf_candidates`), when it applies to this call: the
/// defaults' channels (a request naming `sparf_channels` asks for SparQ's
/// ranking on that many channels) and whole blocks (`sparf_by_token` ranks
/// single tokens), per KV head or jointly. None: the one-stage r-channel
/// ranking.
fn refine_factor(cfg: &AttendConfig, seq: &Seq) -> Option<usize> {
    let req = &seq.req;
    let two_stage = cfg.sparf_candidates > 0 && req.sparf_channels.is_none() && !req.sparf_by_token;
    two_stage.then_some(cfg.sparf_candidates)
}

/// SPARF's two-stage block choice, per KV head, over the present blocks
/// (all of which must have a key sketch; None otherwise, and the caller
/// ranks on r channels):
///
/// 1. every block's upper bound `UB = sum_i max(q_i lo_i, q_i hi_i)` over
///    **all** d channels of its box (the maximum over the group's query
///    heads; from the chain's sketch run for the blocks it covers, bit for
///    bit as from the entries), and the best `factor` times as many blocks
///    as k tokens fill become candidates;
/// 2. each candidate is scored on all d channels of its key sketch (the
///    8-bit codes the entry already holds: the decoded keys within half a
///    step) and candidates are taken best-first by the log-sum-exp of
///    those scores until k tokens are in (as [`best_blocks`]). With
///    `sparf_joint_heads` and several KV heads, one set for the layer: the
///    union of every head's candidates, each head rescored on all of them,
///    ranked by the sum over heads of each head's estimated share of its
///    mass over the union (as [`joint_best_blocks`]).
///
/// Why: on r = d/8 channels of `|q|` the scores miss keys that stand out
/// in many channels but not in those (COMPUTE.md §2's needles), and even
/// on topic runs they rank blocks worse than all channels do; the bound
/// sees every channel and costs d values per block instead of r codes per
/// token, and the full-width rescoring is paid only for the candidates.
/// The set is then attended exactly, as before (bench/README "Attend").
/// Returns the chosen token positions per KV head (sorted) and the summary
/// bytes read: both bounds of every channel of every block and KV head,
/// and the code rows of every channel of each candidate.
///
/// With `alpha` (`[heads]`, for the mean-value correction), each query
/// head's share of its own estimated softmax mass over the candidates
/// that the chosen blocks hold, from its own full-width sketch scores: the
/// blocks left out of the candidates are taken to weigh nothing (their
/// bound on every channel put them below the candidates), which the
/// r-channel estimate over every token cannot match in accuracy.
fn refined_blocks(
    seq: &Seq,
    factor: usize,
    k: usize,
    runs: Option<&SketchRuns>,
    mut alpha: Option<&mut [f32]>,
) -> Option<(Vec<Vec<u32>>, u64)> {
    let joint = seq.req.sparf_joint_heads && seq.req.geom.kv_heads > 1;
    let geom = seq.req.geom;
    let (d, kv) = (geom.head_dim as usize, geom.kv_heads as usize);
    let layer = seq.req.layer;
    let s = &seq.req.seqs[seq.idx];
    let g = s.heads / kv;
    let present = seq.present();
    let spans: Vec<(usize, usize)> = (0..present)
        .map(|i| (seq.starts[i] as usize, seq.tokens[i] as usize))
        .collect();
    // Stage 1: `ub[h][i]`, the group's largest bound of block i.
    let mut ub = vec![f32::NEG_INFINITY; kv * present];
    let mut per_head = vec![0f32; g * present];
    let mut first = 0;
    if let Some(runs) = runs {
        let covered = seq_run(runs, seq, |view| {
            let m = view.covered;
            let mut rs = RunBoundScratch::default();
            for h in 0..kv {
                let out = &mut per_head[..g * m];
                run_upper_bounds(
                    &s.q[h * g * d..(h + 1) * g * d],
                    g,
                    d,
                    &view.head(h),
                    0..m,
                    &mut rs,
                    out,
                );
                group_max(out, g, m, &mut ub[h * present..h * present + m]);
            }
            m
        });
        first = covered.unwrap_or(0);
    }
    // The rest from their entries: a block's `[d]` bound rows are a run
    // of one block, so the bounds are bit for bit those a run gives.
    let mut rs = RunBoundScratch::default();
    let (mut mn, mut mx) = (vec![f16::ZERO; d], vec![f16::ZERO; d]);
    for i in first..present {
        let view = seq.pin.summary(i, geom)?;
        if !view.has_sketch() {
            return None;
        }
        for h in 0..kv {
            view.bounds(layer, h as u32, &mut mn, &mut mx);
            let one = SketchRun {
                codes: &[],
                lo: mn.reinterpret_cast(),
                hi: mx.reinterpret_cast(),
                cap: 1,
                tpb: geom.tokens_per_block as usize,
            };
            let out = &mut per_head[..g];
            run_upper_bounds(
                &s.q[h * g * d..(h + 1) * g * d],
                g,
                d,
                &one,
                0..1,
                &mut rs,
                out,
            );
            group_max(out, g, 1, &mut ub[h * present + i..h * present + i + 1]);
        }
    }
    // A non-finite box (or query) bounds nothing: rank on r channels.
    if !ub.iter().all(|x| x.is_finite()) {
        return None;
    }
    let mut bytes = (present * kv * 2 * d * 2) as u64;
    // Stage 2, per KV head.
    let least = least_span(&spans);
    // Candidates for at least the default k = N/16: a smaller k asks for
    // fewer blocks, not for a weaker filter (at k = N/32 a pool of 3 × k/16
    // blocks cost semantic heads 0.02 of mass against one stage).
    let total: usize = spans.iter().map(|s| s.1).sum();
    let m = factor
        .saturating_mul(k.max(total.div_ceil(16)).div_ceil(least))
        .max(1)
        .min(present);
    let tpb = geom.tokens_per_block as usize;
    let mut sc = Rescore::new(d, tpb, g, alpha.is_some());
    let mut chosen = Vec::with_capacity(kv);
    if joint {
        // One set for the layer: the union of every head's candidates,
        // each head rescored on all of them, blocks ranked by the sum over
        // heads of each head's estimated share of its mass over the union
        // (as `joint_best_blocks` does over every block).
        let mut union: Vec<usize> = (0..kv)
            .flat_map(|h| top_blocks(&ub[h * present..(h + 1) * present], m))
            .collect();
        union.sort_unstable();
        union.dedup();
        let cspans: Vec<(usize, usize)> = union.iter().map(|&i| spans[i]).collect();
        let mut weight = vec![0f64; union.len()];
        let mut heads_lse = Vec::with_capacity(kv);
        for h in 0..kv {
            let (w, hl) = sc.score(seq, h, &union, &spans, &mut bytes)?;
            let all = log_sum_exp_f64(&w);
            if all.is_finite() {
                for (x, &l) in weight.iter_mut().zip(&w) {
                    *x += (l - all).exp();
                }
            }
            heads_lse.push(hl);
        }
        let mut c = take_best(weight, &cspans, k);
        c.sort_unstable();
        if let Some(a) = alpha.as_deref_mut() {
            for (h, hl) in heads_lse.iter().enumerate() {
                shares(hl, &cspans, &c, &mut a[h * g..(h + 1) * g]);
            }
        }
        chosen.resize(kv, c);
        return Some((chosen, bytes));
    }
    for h in 0..kv {
        let cand = top_blocks(&ub[h * present..(h + 1) * present], m);
        let cspans: Vec<(usize, usize)> = cand.iter().map(|&i| spans[i]).collect();
        let (weight, head_lse) = sc.score(seq, h, &cand, &spans, &mut bytes)?;
        let mut c = take_best(weight, &cspans, k);
        c.sort_unstable();
        if let Some(a) = alpha.as_deref_mut() {
            shares(&head_lse, &cspans, &c, &mut a[h * g..(h + 1) * g]);
        }
        chosen.push(c);
    }
    Some((chosen, bytes))
}

/// The best `m` blocks by `ub` (ties to the earlier block), in block
/// order (entries are then read front to back).
fn top_blocks(ub: &[f32], m: usize) -> Vec<usize> {
    let mut cand: Vec<(f32, usize)> = ub.iter().copied().zip(0..).collect();
    let order = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if m < cand.len() {
        cand.select_nth_unstable_by(m.max(1) - 1, order);
        cand.truncate(m);
    }
    let mut out: Vec<usize> = cand.into_iter().map(|c| c.1).collect();
    out.sort_unstable();
    out
}

/// Each query head's share (`out`, `[g]`) of its own estimated mass over
/// the candidates (`head_lse` `[g][candidates]`, spans `cspans`) that the
/// chosen token positions `chosen` (sorted) hold: the mean-value
/// correction's `alpha` from the two-stage scores.
fn shares(head_lse: &[f64], cspans: &[(usize, usize)], chosen: &[u32], out: &mut [f32]) {
    let nc = cspans.len();
    let taken: Vec<bool> = cspans
        .iter()
        .map(|&(start, n)| n > 0 && chosen.binary_search(&(start as u32)).is_ok())
        .collect();
    for (j, a) in out.iter_mut().enumerate() {
        let l = &head_lse[j * nc..(j + 1) * nc];
        let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (mut all, mut part) = (0f64, 0f64);
        for (&x, &t) in l.iter().zip(&taken) {
            let w = if m.is_finite() { (x - m).exp() } else { 0.0 };
            all += w;
            part += if t { w } else { 0.0 };
        }
        *a = if all > 0.0 { (part / all) as f32 } else { 0.0 };
    }
}

/// `ln sum exp` of `x` (`-inf` when empty or all `-inf`).
fn log_sum_exp_f64(x: &[f64]) -> f64 {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + x.iter().map(|&v| (v - m).exp()).sum::<f64>().ln()
}

/// Stage 2 of [`refined_blocks`]: candidates rescored on every channel of
/// their key sketches, a chunk at a time from a run of their own (their
/// code rows and bounds gathered channel-major, a 16-byte copy per channel
/// and block), so that `run_scores` streams them as it streams a chain's
/// run instead of one block's d channels at a time. Scratch reused across
/// KV heads.
struct Rescore {
    d: usize,
    tpb: usize,
    g: usize,
    all: Vec<u32>,
    codes: Vec<u8>,
    lo: Vec<u16>,
    hi: Vec<u16>,
    run: RunScratch,
    group: Vec<f32>,
    /// Each query head's own scores of one candidate (for `alpha` only).
    each: Option<EachScratch>,
}

struct EachScratch {
    lo: Vec<f32>,
    hi: Vec<f32>,
    acc: SketchScratch,
    row: Vec<f32>,
    own: Vec<f32>,
}

/// Candidates per gathered chunk (`run_scores`' chunk of blocks).
const RESCORE_CHUNK: usize = 32;

impl Rescore {
    fn new(d: usize, tpb: usize, g: usize, each: bool) -> Self {
        Rescore {
            d,
            tpb,
            g,
            all: (0..d as u32).collect(),
            codes: vec![0; d * RESCORE_CHUNK * tpb],
            lo: vec![0; d * RESCORE_CHUNK],
            hi: vec![0; d * RESCORE_CHUNK],
            run: RunScratch::default(),
            group: vec![0.0; RESCORE_CHUNK * tpb],
            each: each.then(|| EachScratch {
                lo: vec![0.0; d],
                hi: vec![0.0; d],
                acc: SketchScratch::new(),
                row: vec![0.0; tpb],
                own: vec![0.0; g * tpb],
            }),
        }
    }

    /// KV head `h`'s candidates `cand` (block indices, in order; `spans`
    /// of every block): the log-sum-exp of each one's group scores on all
    /// channels, and with `each` `[g][cand]` those of each query head's own
    /// scores. Adds the code bytes read to `bytes`. None when a candidate
    /// has no sketch or a non-finite box.
    fn score(
        &mut self,
        seq: &Seq,
        h: usize,
        cand: &[usize],
        spans: &[(usize, usize)],
        bytes: &mut u64,
    ) -> Option<(Vec<f64>, Vec<f64>)> {
        let (d, tpb, g) = (self.d, self.tpb, self.g);
        let geom = seq.req.geom;
        let layer = seq.req.layer;
        let s = &seq.req.seqs[seq.idx];
        let q = &s.q[h * g * d..(h + 1) * g * d];
        let (mut mn, mut mx) = (vec![f16::ZERO; d], vec![f16::ZERO; d]);
        let mut weight = Vec::with_capacity(cand.len());
        let mut head_lse = vec![
            0f64;
            if self.each.is_some() {
                g * cand.len()
            } else {
                0
            }
        ];
        // The candidates' entries are scattered over the region: ask for
        // them a few ahead, so that the misses overlap.
        const AHEAD: usize = 4;
        for &i in cand.iter().take(AHEAD) {
            prefetch_entry(seq, i, h);
        }
        for (p, part) in cand.chunks(RESCORE_CHUNK).enumerate() {
            let cb = part.len();
            for (j, &i) in part.iter().enumerate() {
                if let Some(&next) = cand.get(p * RESCORE_CHUNK + j + AHEAD) {
                    prefetch_entry(seq, next, h);
                }
                let view = seq.pin.summary(i, geom)?;
                let codes = view.sketch(layer, h as u32)?;
                view.bounds(layer, h as u32, &mut mn, &mut mx);
                gather_rows(codes, d, tpb, &mut self.codes[j * tpb..], cb * tpb);
                for c in 0..d {
                    self.lo[c * cb + j] = mn[c].to_bits();
                    self.hi[c * cb + j] = mx[c].to_bits();
                }
            }
            let run = SketchRun {
                codes: &self.codes[..d * cb * tpb],
                lo: &self.lo[..d * cb],
                hi: &self.hi[..d * cb],
                cap: cb,
                tpb,
            };
            let out = &mut self.group[..cb * tpb];
            run_scores(
                q,
                g,
                d,
                &run,
                0..cb,
                &self.all,
                seq.req.scale,
                &mut self.run,
                out,
            );
            for (j, &i) in part.iter().enumerate() {
                // A partial last block's slots past its tokens are unused.
                let n = spans[i].1;
                weight.push(log_sum_exp(&out[j * tpb..j * tpb + n]));
                *bytes += (d * n) as u64;
            }
            let Some(e) = self.each.as_mut() else {
                continue;
            };
            for (j, &i) in part.iter().enumerate() {
                let view = seq.pin.summary(i, geom)?;
                let codes = view.sketch(layer, h as u32)?;
                let n = spans[i].1;
                for c in 0..d {
                    e.lo[c] = f16::from_bits(self.lo[c * cb + j]).to_f32_const();
                    e.hi[c] = f16::from_bits(self.hi[c * cb + j]).to_f32_const();
                }
                let sk = Sketch {
                    codes,
                    stride: tpb,
                    n,
                    lo: &e.lo,
                    hi: &e.hi,
                };
                let heads = HeadScores {
                    out: &mut e.own[..],
                    pitch: tpb,
                };
                let row = &mut e.row[..n];
                let scale = seq.req.scale;
                if !sketch_scores_with_heads(q, g, d, &sk, &self.all, scale, &mut e.acc, row, heads)
                {
                    return None;
                }
                let at = p * RESCORE_CHUNK + j;
                for jj in 0..g {
                    head_lse[jj * cand.len() + at] = log_sum_exp(&e.own[jj * tpb..jj * tpb + n]);
                }
            }
        }
        Some((weight, head_lse))
    }
}

/// [`SketchRuns::with_run`] for the sequence's present chain at its layer.
fn seq_run<R>(runs: &SketchRuns, seq: &Seq, f: impl FnOnce(RunView<'_>) -> R) -> Option<R> {
    let geom = seq.req.geom;
    runs.with_run(
        seq.req.namespace,
        seq.req.layer,
        geom,
        &seq.pin.blocks,
        seq.present(),
        &seq.tokens,
        |i| seq.pin.summary(i, geom),
        f,
    )
}

/// Starts loading block `i`'s key sketch (every channel) and bounds of KV
/// head `h` into L2. A hint only: never faults, changes nothing.
fn prefetch_entry(seq: &Seq, i: usize, h: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let geom = seq.req.geom;
        let Some(view) = seq.pin.summary(i, geom) else {
            return;
        };
        let fetch = prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>;
        if let Some(codes) = view.sketch(seq.req.layer, h as u32) {
            for off in (0..codes.len()).step_by(64) {
                fetch(codes[off..].as_ptr());
            }
        }
        let (lo, hi) = view.bound_ptrs(seq.req.layer, h as u32);
        let rows = 2 * geom.head_dim as usize * view.leaves() as usize;
        for p in [lo, hi] {
            for off in (0..rows).step_by(64) {
                fetch(p.wrapping_add(off));
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (seq, i, h);
}

/// Copies the `d` rows of `tpb` codes of `codes` to `out` at a pitch of
/// `pitch` bytes (row `c` at `out[c * pitch..]`). 16-token rows are copied
/// as fixed-size arrays: a slice copy of a run-time length is a call.
fn gather_rows(codes: &[u8], d: usize, tpb: usize, out: &mut [u8], pitch: usize) {
    const FIXED: usize = 16;
    if tpb == FIXED {
        for (c, src) in codes.chunks_exact(FIXED).take(d).enumerate() {
            let src: &[u8; FIXED] = src.try_into().expect("16 codes");
            let dst: &mut [u8; FIXED] = (&mut out[c * pitch..c * pitch + FIXED])
                .try_into()
                .expect("16 codes");
            *dst = *src;
        }
        return;
    }
    for c in 0..d {
        out[c * pitch..c * pitch + tpb].copy_from_slice(&codes[c * tpb..(c + 1) * tpb]);
    }
}

/// `out[b] = max_h x[h][b]` of `x` (`[heads][n]`), heads in order.
fn group_max(x: &[f32], heads: usize, n: usize, out: &mut [f32]) {
    out.copy_from_slice(&x[..n]);
    for h in 1..heads {
        for (o, &v) in out.iter_mut().zip(&x[h * n..(h + 1) * n]) {
            *o = if v > *o { v } else { *o };
        }
    }
}

/// Whole blocks best-first by the log-sum-exp of their tokens' scores
/// (`scores` over the blocks' `spans` (start, tokens), in order) until at
/// least `k` tokens are in; their token positions (unsorted). Ties go to
/// the earlier block.
fn best_blocks(scores: &[f32], spans: &[(usize, usize)], k: usize) -> Vec<u32> {
    let mut lse = vec![0f32; spans.len()];
    span_lse(scores, spans, &mut lse);
    take_best(lse.into_iter().map(f64::from).collect(), spans, k)
}

/// Tokens of the smallest non-empty block span (1 when all are empty): the
/// most blocks `k` tokens can take is `k.div_ceil(least_span)`.
fn least_span(spans: &[(usize, usize)]) -> usize {
    spans
        .iter()
        .map(|s| s.1)
        .filter(|&n| n > 0)
        .min()
        .unwrap_or(1)
}

/// The blocks of `spans` in descending `weight` (ties to the earlier
/// block) until at least `k` tokens are in; their token positions.
fn take_best(weight: Vec<f64>, spans: &[(usize, usize)], k: usize) -> Vec<u32> {
    let mut w: Vec<(f64, usize)> = weight.into_iter().zip(0..).collect();
    let order = |a: &(f64, usize), b: &(f64, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    // At most `m` blocks are taken (each holds at least `least` tokens):
    // order only the best `m` (a 16K-token chain has 1,024 blocks and
    // takes 64), the same prefix a full sort gives (a total order).
    // (Empty spans may come first without adding tokens: counted in.)
    let least = least_span(spans);
    let empty = spans.iter().filter(|s| s.1 == 0).count();
    let m = k.div_ceil(least).max(1) + empty;
    if m < w.len() {
        w.select_nth_unstable_by(m - 1, order);
        w.truncate(m);
    }
    w.sort_unstable_by(order);
    let mut out = Vec::with_capacity(k + spans.first().map_or(0, |s| s.1));
    for (_, i) in w {
        if out.len() >= k {
            break;
        }
        let (start, n) = spans[i];
        out.extend(start as u32..(start + n) as u32);
    }
    out
}

/// `ln sum exp` of `x` (`-inf` when empty or all `-inf`), in f64.
fn log_sum_exp(x: &[f32]) -> f64 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let s: f64 = x.iter().map(|&v| (v as f64 - m as f64).exp()).sum();
    m as f64 + s.ln()
}

/// SPARF with `sparf_joint_heads`: whole blocks for all KV heads at once,
/// best-first by the sum over heads of each head's estimated share of its
/// softmax mass, `exp(lse_block,h - lse_all,h)` from the r-channel scores
/// (`scores` `[kv][total]`, the first `scored` positions scored), until at
/// least `k` tokens are in. Shares, not raw log-sum-exps, so that a head
/// with larger logits does not take every block; the sum maximises the
/// heads' total estimated mass. One head: the order of [`best_blocks`].
fn joint_best_blocks(
    scores: &[f32],
    total: usize,
    scored: usize,
    kv: usize,
    spans: &[(usize, usize)],
    k: usize,
) -> Vec<u32> {
    let mut lse = vec![0f32; spans.len()];
    let mut weight = vec![0f64; spans.len()];
    for h in 0..kv {
        span_lse(&scores[h * total..h * total + scored], spans, &mut lse);
        let all = log_sum_exp(&lse);
        if all == f64::NEG_INFINITY {
            continue; // nothing scored for this head: no preference
        }
        for (w, &l) in weight.iter_mut().zip(&lse) {
            *w += (l as f64 - all).exp();
        }
    }
    take_best(weight, spans, k)
}

/// SPARF with `sparf_joint_heads` and `sparf_by_token`: each scored
/// token's weight for all KV heads at once, the sum over heads of its
/// estimated share of the head's softmax mass (as [`joint_best_blocks`]).
fn joint_token_weights(scores: &[f32], total: usize, scored: usize, kv: usize) -> Vec<f32> {
    let mut weight = vec![0f64; scored];
    for h in 0..kv {
        let s = &scores[h * total..h * total + scored];
        let all = log_sum_exp(s);
        if all == f64::NEG_INFINITY {
            continue;
        }
        for (w, &x) in weight.iter_mut().zip(s) {
            *w += (x as f64 - all).exp();
        }
    }
    weight.into_iter().map(|w| w as f32).collect()
}

/// Attends, per KV head, exactly the token positions `chosen[h]` (sorted,
/// counted from the chain's first token): phase 2 of SparF, and RETRIEVAL.
/// Reads K and V of the blocks holding a chosen token, in waves.
async fn finish_chosen(
    ctx: &AttendCtx,
    seq: Seq,
    chosen: Vec<Vec<u32>>,
) -> Result<SeqResult, StoreError> {
    let (seq, chosen) = attend_chosen(ctx, seq, chosen).await?;
    let hot = settle_hot(&seq);
    Ok(chosen_result(seq, &chosen, hot))
}

/// The reads and math of [`finish_chosen`]: `seq.acc` holds the exact
/// `(o, lse)` over the chosen tokens of the present prefix afterwards.
async fn attend_chosen(
    ctx: &AttendCtx,
    seq: Seq,
    chosen: Vec<Vec<u32>>,
) -> Result<(Seq, Arc<Vec<Vec<u32>>>), StoreError> {
    let chosen = Arc::new(chosen);
    let blocks = chosen_blocks(&seq, &chosen);
    let mut seq = seq;
    lease_copies(&mut seq, &blocks);
    for wave in waves(&seq, &blocks, Want::Kv, ctx.cfg.read_wave_bytes) {
        if seq.cut.is_some_and(|c| wave[0] >= c) {
            break;
        }
        let got = read_wave(&mut seq, &wave, Want::Kv).await;
        seq = compute_wave(ctx, seq, wave, got, RowSel::Chosen(chosen.clone())).await?;
    }
    Ok((seq, chosen))
}

/// The present blocks holding a chosen token of any head, in order.
fn chosen_blocks(seq: &Seq, chosen: &[Vec<u32>]) -> Vec<usize> {
    (0..seq.present())
        .filter(|&i| {
            let (a, b) = (seq.starts[i], seq.starts[i] + seq.tokens[i] as u64);
            chosen.iter().any(|c| {
                let p = c.partition_point(|&t| (t as u64) < a);
                c.get(p).is_some_and(|&t| (t as u64) < b)
            })
        })
        .collect()
}

/// [`attend_chosen`] on the calling (blocking) thread, when it is one part
/// of DRAM-resident blocks (no read to wait for, no split to make): the
/// sequence then goes to the blocking pool once instead of twice (32
/// hand-offs less per batch-32 call). Otherwise nothing is done and
/// `chosen` comes back for [`attend_chosen`].
#[allow(clippy::type_complexity)]
fn attend_chosen_here(
    threads: usize,
    seq: &mut Seq,
    chosen: Vec<Vec<u32>>,
) -> Result<Arc<Vec<Vec<u32>>>, Vec<Vec<u32>>> {
    let blocks = chosen_blocks(seq, &chosen);
    if blocks.iter().any(|&i| seq.pin.blocks[i].dram.is_none())
        || part_split(threads, blocks.len()).0 > 1
    {
        return Err(chosen);
    }
    let chosen = Arc::new(chosen);
    let got: Vec<Option<Result<Got, NvmeError>>> = blocks.iter().map(|_| None).collect();
    let part = compute_part(seq, &blocks, &got, &RowSel::Chosen(chosen.clone()));
    apply_part(seq, part);
    Ok(chosen)
}

/// The answer of [`finish_chosen`] from what [`attend_chosen`] computed.
/// `hot`: what [`settle_hot`] found, before any correction.
fn chosen_result(seq: Seq, chosen: &[Vec<u32>], hot: (u32, Vec<HotBlock>)) -> SeqResult {
    let (hot_blocks, hot_nvme) = hot;
    let present = seq.present();
    let end = seq
        .starts
        .get(present)
        .copied()
        .unwrap_or_else(|| seq.tokens[..present].iter().map(|&t| t as u64).sum());
    let head_covered: Vec<Vec<Range<u64>>> = chosen
        .iter()
        .map(|c| {
            merge_ranges(
                c.iter()
                    .map(|&t| t as u64)
                    .filter(|&t| t < end)
                    .map(|t| t..t + 1),
            )
        })
        .collect();
    let mut all_tokens: Vec<u64> = chosen
        .iter()
        .flatten()
        .map(|&t| t as u64)
        .filter(|&t| t < end)
        .collect();
    all_tokens.sort_unstable();
    all_tokens.dedup();
    let covered = merge_ranges(all_tokens.iter().map(|&t| t..t + 1));
    let tokens_attended = chosen
        .iter()
        .map(|c| c.iter().filter(|&&t| (t as u64) < end).count() as u64)
        .max()
        .unwrap_or(0);
    SeqResult {
        o: seq.acc.o,
        lse: seq.acc.lse,
        keys_present: present as u32,
        tokens_present: end,
        exact: seq.qread.blocks == 0
            && head_covered
                .iter()
                .all(|c| c.len() == 1 && c[0] == (0..end) || end == 0),
        sink_included: false,
        recent_included: false,
        covered,
        head_covered,
        dram: seq.dram,
        nvme: seq.nvme,
        quant: seq.qread,
        tokens_attended,
        abstract_bytes: 0,
        mean_corrected: false,
        hot_blocks,
        hot_nvme,
    }
}

/// SparF scores of block `i`'s tokens for every KV head, into
/// `scores[h][start..start + n]` (and each query head's own into
/// `each[j][start..start + n]` when given), read from the token-major rows
/// in place.
#[allow(clippy::too_many_arguments)]
fn score_block<E: KvElem>(
    k: &[u8],
    s: &SeqIn,
    channels: &[u32],
    r: usize,
    scale: f32,
    n: usize,
    start: usize,
    total: usize,
    kv: usize,
    d: usize,
    sc: &mut SparfScratch,
    scores: &mut [f32],
    mut each: Option<&mut [f32]>,
) {
    let k = elems::<E>(k);
    let g = s.heads / kv;
    for h in 0..kv {
        let (q, k, ch) = (
            &s.q[h * g * d..(h + 1) * g * d],
            &k[..n * kv * d],
            &channels[h * r..(h + 1) * r],
        );
        let out = &mut scores[h * total + start..h * total + start + n];
        match each.as_deref_mut() {
            Some(e) => sparf_scores_head_with_heads(
                q,
                g,
                d,
                k,
                kv,
                h,
                ch,
                scale,
                sc,
                out,
                HeadScores {
                    out: &mut e[h * g * total + start..],
                    pitch: total,
                },
            ),
            None => sparf_scores_head(q, g, d, k, kv, h, ch, scale, sc, out),
        }
    }
}

#[cfg(test)]
mod joint_tests {
    use super::*;

    /// Joint choice ranks by each head's share of its own mass, not by raw
    /// log-sum-exps: a head with larger logits does not take every block;
    /// with one head it is the per-head order.
    #[test]
    fn joint_blocks_rank_by_shares_across_heads() {
        // 4 blocks of 2 tokens; head 0's logits are offset by +50.
        let spans = [(0, 2), (2, 2), (4, 2), (6, 2)];
        let h0 = [50.0, 50.0, 53.0, 53.0, 52.0, 52.0, 40.0, 40.0];
        let h1 = [9.0, 9.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0];
        let scores: Vec<f32> = h0.iter().chain(&h1).copied().collect();
        // Raw lse per head would give head 0 both picks (blocks 1 and 2);
        // by share, block 0 (head 1's ~1.0) beats block 2 (head 0's ~0.26).
        let mut got = joint_best_blocks(&scores, 8, 8, 2, &spans, 4);
        got.sort_unstable();
        assert_eq!(got, vec![0, 1, 2, 3]);
        for h in [&h0[..], &h1[..]] {
            let mut one = joint_best_blocks(h, 8, 8, 1, &spans, 4);
            let mut own = best_blocks(h, &spans, 4);
            one.sort_unstable();
            own.sort_unstable();
            assert_eq!(one, own);
        }
        // Tokens: the same weights, per token.
        let w = joint_token_weights(&scores, 8, 8, 2);
        assert!(w[0] > w[4] && w[2] > w[4], "{w:?}");
        // A head with nothing scored adds nothing (no NaN).
        let mut none = scores.clone();
        none[8..].fill(f32::NEG_INFINITY);
        let w = joint_token_weights(&none, 8, 8, 2);
        assert!(w.iter().all(|x| x.is_finite()));
        assert_eq!(joint_best_blocks(&none, 8, 8, 2, &spans, 2), vec![2, 3]);
    }
}

#[cfg(test)]
mod take_best_tests {
    use super::take_best;

    /// Ordering only the best few blocks takes what a full sort takes:
    /// random weights with ties, uneven and empty spans, every k.
    #[test]
    fn partial_order_takes_what_a_full_sort_takes() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for case in 0..200 {
            let n = 1 + (next() % 60) as usize;
            let mut start = 0;
            let spans: Vec<(usize, usize)> = (0..n)
                .map(|_| {
                    let len = if case % 3 == 0 {
                        16
                    } else {
                        (next() % 17) as usize
                    };
                    let s = (start, len);
                    start += len;
                    s
                })
                .collect();
            let weight: Vec<f64> = (0..n).map(|_| (next() % 7) as f64 - 3.0).collect();
            let total: usize = spans.iter().map(|s| s.1).sum();
            for k in 0..=total + 1 {
                let mut w: Vec<(f64, usize)> = weight.iter().copied().zip(0..).collect();
                w.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let mut want = Vec::new();
                for (_, i) in w {
                    if want.len() >= k {
                        break;
                    }
                    want.extend(spans[i].0 as u32..(spans[i].0 + spans[i].1) as u32);
                }
                assert_eq!(
                    take_best(weight.clone(), &spans, k),
                    want,
                    "case {case} k {k}"
                );
            }
        }
    }
}

#[cfg(test)]
mod mass_tests {
    use super::*;
    use strata_kernels::attention::{AttnParams, partial_attention};

    /// A block's own log-sum-exp, read from the running state before and
    /// after feeding it ([`Part::before`], [`Part::after`]), is the
    /// log-sum-exp of that block alone: blocks whose scores raise the
    /// running max, lower it, tie it, and one far below everything.
    #[test]
    fn block_mass_from_the_running_state_is_the_blocks_own() {
        let (g, d, n) = (2usize, 16usize, 8usize);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let q: Vec<f32> = (0..g * d).map(|_| rnd()).collect();
        // Per block, a factor on its keys: scores up, down, the same, tiny.
        let factors = [1.0f32, 8.0, 0.5, 8.0, -30.0];
        let blocks: Vec<(Vec<f32>, Vec<f32>)> = factors
            .iter()
            .map(|&f| {
                let k = (0..n * d).map(|_| rnd() * f).collect();
                let v = (0..n * d).map(|_| rnd()).collect();
                (k, v)
            })
            .collect();
        let mut states = vec![AttnState::new(g, d)];
        let mut scratch = AttnScratch::new(g, d);
        let mut part = Part::new(g, d, 0);
        part.track = true;
        for (i, (k, v)) in blocks.iter().enumerate() {
            part.before(&states);
            states[0].feed_head(&q, 1.0, k, v, 1, 0, Tokens::All, &mut scratch);
            part.after(i, &states);
        }
        assert_eq!(part.mass_blocks, (0..factors.len()).collect::<Vec<_>>());
        let p = AttnParams {
            heads: g,
            d,
            scale: 1.0,
        };
        let mut running = vec![f32::NEG_INFINITY; g];
        let mut small = 0;
        for (i, (k, v)) in blocks.iter().enumerate() {
            let (mut o, mut lse) = (vec![0.0; g * d], vec![0.0; g]);
            partial_attention(&p, &q, k, v, Tokens::All, &mut scratch, &mut o, &mut lse);
            for h in 0..g {
                running[h] = log_add_exp(running[h], lse[h]);
                let got = part.mass[i * g + h];
                if lse[h] - running[h] >= (1e-4f32).ln() {
                    assert!(
                        (got - lse[h]).abs() <= 1e-3 * (1.0 + lse[h].abs()),
                        "block {i} head {h}: {got} vs {}",
                        lse[h]
                    );
                } else {
                    // Far below the running total the difference meets
                    // f32 rounding: its share is off by at most ~1e-6.
                    small += 1;
                    let (want, read) = ((lse[h] - running[h]).exp(), (got - running[h]).exp());
                    assert!(read <= want + 1e-6, "block {i} head {h}: {read} vs {want}");
                }
            }
        }
        assert!(small > 0, "a block far below the running total was tried");
        assert_eq!(log_add_exp(f32::NEG_INFINITY, 2.0), 2.0);
        for i in 0..20_000 {
            let x = 1e-30f32 * 1.0049f32.powi(i * 2);
            if !x.is_normal() {
                continue;
            }
            let e = (fast_ln(x) - x.ln()).abs();
            assert!(e <= 1.5e-4, "ln({x}): {} vs {}", fast_ln(x), x.ln());
        }
        assert!((log_add_exp(1.0, 1.0) - (1.0 + std::f32::consts::LN_2)).abs() < 1e-6);
    }
}

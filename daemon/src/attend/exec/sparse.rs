//! SPARSE (LeoAM) at leaf granularity: rank units (whole blocks, or the
//! leaves of a block's summary) by `UB(q)`, read only the chosen units'
//! bytes, verify exactly the leaves read against their own checksums, and
//! attend them; and learn per (namespace, layer) which level to rank at
//! from the skew of what was attended.
//!
//! Invariants (beside the module's):
//! * a unit is a whole block or one leaf; a block's box is the union of its
//!   leaves' boxes, so ranking at the block level is ranking by exactly the
//!   box a one-leaf summary of the block would hold;
//! * a piece (a run of chosen leaves of one block) is read as one K range
//!   and one V range (DRAM in place; NVMe: the pages covering them), and
//!   every byte of it is checked against its leaves' sums before any math;
//!   a piece of every leaf of its block is read and checked as the whole
//!   layer, as DENSE reads it; a block without a summary is only ever a
//!   whole piece, verified whole;
//! * `covered` is the union of the pieces' token ranges, which are disjoint;
//! * the skew table is a fixed array ([`SKEW_SLOTS`]), allocated once.

use std::sync::Mutex;

use super::*;

/// A run of chosen leaves of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Piece {
    pub block: usize,
    /// Leaf indices in the block's summary (a block without one: `0..1`).
    pub leaves: Range<u32>,
    /// Every leaf of the block: read and verified as the whole layer.
    pub whole: bool,
}

/// The leaf geometry of the summaries of `seq`'s namespace (one leaf per
/// block when the region keeps none, or does not cut these blocks).
fn leaf_geom(seq: &Seq) -> Geom {
    let g = seq.req.geom;
    seq.pin.store().summary_region().map_or(g, |r| r.geom(&g))
}

/// Token range of piece `p` within its block, cut at the block's attended
/// tokens (`last_block_tokens`).
fn piece_tokens(seq: &Seq, lg: &Geom, p: &Piece) -> Range<u32> {
    let att = seq.tokens[p.block];
    if p.whole {
        return 0..att;
    }
    let stored = lg.tokens_of(seq.pin.blocks[p.block].len).unwrap_or(0);
    let a = lg.leaf_tokens_of(stored, p.leaves.start).start;
    let b = lg.leaf_tokens_of(stored, p.leaves.end - 1).end;
    a.min(att)..b.min(att)
}

/// Which level a SPARSE call ranks at, and whether it samples the skew.
pub(super) fn level(ctx: &AttendCtx, seq: &Seq) -> (bool, bool) {
    if leaf_geom(seq).leaves() == 1 {
        return (false, false);
    }
    match ctx.cfg.leaf_level {
        LeafLevel::Leaf => (true, false),
        LeafLevel::Block => (false, false),
        LeafLevel::Adaptive => (ctx.skew.fine(seq.req.namespace, seq.req.layer), true),
    }
}

/// The sparse selection (LeoAM): per query head, units (whole blocks, or
/// with `fine` the leaves of blocks whose summaries have several) in exact
/// descending order of `UB(q) = sum_i max(q_i min_i, q_i max_i)` from
/// their boxes (a block without a summary ranks first: its bound is
/// unknown); after the sink (first) and recent (last) blocks, whole, heads
/// take turns adding their next best unit until the budget is met.
/// Returns the chosen pieces in order and the abstract bytes read.
pub(super) fn select_leaves(seq: &Seq, budget_fraction: f64, fine: bool) -> (Vec<Piece>, u64) {
    let req = &seq.req;
    let geom = req.geom;
    let lg = leaf_geom(seq);
    let s = seq.input();
    let n = seq.present();
    if n == 0 {
        return (Vec::new(), 0);
    }
    let total: u64 = seq.tokens[..n].iter().map(|&t| t as u64).sum();
    let budget = match req.budget {
        Budget::Default => (total as f64 * budget_fraction).ceil() as u64,
        Budget::Tokens(t) => t as u64,
        Budget::Bytes(b) => b.div_ceil(2 * geom.row_bytes() as u64),
    }
    .max(1);
    let (d, kv) = (geom.head_dim as usize, geom.kv_heads as usize);
    let g = s.heads / kv;
    let nl = lg.leaves();
    let mut scratch = AbstractScratch::new(d);
    let (mut mn, mut mx) = (vec![f16::ZERO; d], vec![f16::ZERO; d]);
    let mut ub = vec![0.0f32; g];
    // Units in block then leaf order: (block, leaves, tokens).
    let mut units: Vec<(usize, Range<u32>, u32)> = Vec::with_capacity(n);
    let mut first_unit = Vec::with_capacity(n + 1);
    let mut ranked: Vec<Vec<(f32, u32)>> = vec![Vec::with_capacity(n); s.heads];
    let mut abstract_bytes = 0;
    for i in 0..n {
        first_unit.push(units.len());
        let att = seq.tokens[i];
        match seq.pin.summary(i, geom) {
            Some(v) => {
                abstract_bytes += lg.abstract_layer_bytes() as u64;
                if fine && nl > 1 {
                    let stored = lg.tokens_of(seq.pin.blocks[i].len).unwrap_or(0);
                    for j in 0..nl {
                        let t = lg.leaf_tokens_of(stored, j);
                        let t = t.start.min(att)..t.end.min(att);
                        if t.is_empty() {
                            continue;
                        }
                        let u = units.len() as u32;
                        units.push((i, j..j + 1, t.len() as u32));
                        for h in 0..kv {
                            v.leaf_bounds(req.layer, h as u32, j, &mut mn, &mut mx);
                            let q = &s.q[h * g * d..(h + 1) * g * d];
                            upper_bounds(q, g, d, &mn, &mx, &mut scratch, &mut ub);
                            for (jj, &x) in ub.iter().enumerate() {
                                ranked[h * g + jj].push((x, u));
                            }
                        }
                    }
                } else {
                    let u = units.len() as u32;
                    units.push((i, 0..nl, att));
                    for h in 0..kv {
                        v.bounds(req.layer, h as u32, &mut mn, &mut mx);
                        let q = &s.q[h * g * d..(h + 1) * g * d];
                        upper_bounds(q, g, d, &mn, &mx, &mut scratch, &mut ub);
                        for (jj, &x) in ub.iter().enumerate() {
                            ranked[h * g + jj].push((x, u));
                        }
                    }
                }
            }
            None => {
                let u = units.len() as u32;
                units.push((i, 0..1, att));
                ranked.iter_mut().for_each(|r| r.push((f32::INFINITY, u)));
            }
        }
    }
    first_unit.push(units.len());
    for r in &mut ranked {
        // Descending bound; ties to the earlier unit (deterministic).
        r.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    }
    let mut chosen = vec![false; units.len()];
    let mut taken = 0u64;
    for i in [0, n - 1] {
        for u in first_unit[i]..first_unit[i + 1] {
            if !chosen[u] {
                chosen[u] = true;
                taken += units[u].2 as u64;
            }
        }
    }
    let mut cursor = vec![0usize; s.heads];
    'fill: while taken < budget {
        let mut progress = false;
        for (h, r) in ranked.iter().enumerate() {
            while cursor[h] < r.len() && chosen[r[cursor[h]].1 as usize] {
                cursor[h] += 1;
            }
            if let Some(&(_, u)) = r.get(cursor[h]) {
                chosen[u as usize] = true;
                taken += units[u as usize].2 as u64;
                progress = true;
                if taken >= budget {
                    break 'fill;
                }
            }
        }
        if !progress {
            break;
        }
    }
    // Runs of chosen units of one block become one piece.
    let mut out: Vec<Piece> = Vec::new();
    for (u, (i, leaves, _)) in units.iter().enumerate() {
        if !chosen[u] {
            continue;
        }
        match out.last_mut() {
            Some(p) if p.block == *i && p.leaves.end == leaves.start => p.leaves.end = leaves.end,
            _ => out.push(Piece {
                block: *i,
                leaves: leaves.clone(),
                whole: false,
            }),
        }
    }
    for p in &mut out {
        let leaves = seq.pin.summary(p.block, geom).map_or(1, |v| v.leaves());
        p.whole = p.leaves == (0..leaves);
    }
    (out, abstract_bytes)
}

/// What piece `p` needs from NVMe (empty: it is read from DRAM, or is not
/// readable at all).
fn piece_needs(seq: &Seq, lg: &Geom, p: &Piece) -> Vec<Need> {
    if p.whole {
        return need_of(seq, p.block, Want::Kv).into_iter().collect();
    }
    let b = &seq.pin.blocks[p.block];
    if b.dram.is_some() || seq.lease(p.block).is_some() {
        return Vec::new();
    }
    let (Some((seg, loc)), Some(stored)) = (b.nvme.clone(), lg.tokens_of(b.len)) else {
        return Vec::new();
    };
    (0..2)
        .map(|t| Need {
            seg: seg.clone(),
            loc,
            what: What::Span(lg.leaves_range(stored, seq.req.layer, t, p.leaves.clone())),
        })
        .collect()
}

/// Splits `pieces` into waves whose NVMe reads stay within the wave size.
fn piece_waves(seq: &Seq, pieces: &[Piece], wave_bytes: u64) -> Vec<Vec<Piece>> {
    let lg = leaf_geom(seq);
    let mut out: Vec<Vec<Piece>> = Vec::new();
    let mut bytes = 0u64;
    for p in pieces {
        let cost: u64 = piece_needs(seq, &lg, p)
            .iter()
            .map(|n| match &n.what {
                What::Span(r) => r.len() as u64 + 8192,
                What::Record(e) => n.loc.span(e.len) as u64,
            })
            .sum();
        match out.last_mut() {
            Some(w) if bytes + cost <= wave_bytes || bytes == 0 => {
                w.push(p.clone());
                bytes += cost;
            }
            _ => {
                out.push(vec![p.clone()]);
                bytes = cost;
            }
        }
    }
    out
}

/// What a wave read for each piece (empty: DRAM).
type PieceGot = Vec<Result<Got, NvmeError>>;

/// Reads one wave's NVMe bytes (coalesced by `fetch`), counting the device
/// bytes against the pieces' blocks.
async fn read_pieces(seq: &mut Seq, wave: &[Piece]) -> Vec<PieceGot> {
    let lg = leaf_geom(seq);
    let mut needs = Vec::new();
    let mut which = Vec::new();
    for (w, p) in wave.iter().enumerate() {
        let n = piece_needs(seq, &lg, p);
        if n.is_empty() && seq.pin.blocks[p.block].dram.is_none() && seq.lease(p.block).is_none() {
            // Neither copy is readable (NVMe fenced meanwhile).
            seq.cut_at(p.block);
        }
        which.extend(std::iter::repeat_n(w, n.len()));
        needs.extend(n);
    }
    let mut out: Vec<PieceGot> = (0..wave.len()).map(|_| Vec::new()).collect();
    if needs.is_empty() {
        return out;
    }
    let Some(tier) = seq.pin.store().nvme().cloned() else {
        for &w in &which {
            seq.cut_at(wave[w].block);
        }
        return out;
    };
    let (got, bytes) = fetch(&tier, &needs).await;
    let per = bytes / needs.len() as u64;
    let mut rest = bytes - per * needs.len() as u64;
    for (&w, g) in which.iter().zip(got) {
        let extra = std::mem::take(&mut rest);
        seq.count(wave[w].block, TierKind::Nvme, per + extra);
        out[w].push(g);
    }
    out
}

/// The K and V bytes of a piece that is not its whole block, verified
/// leaf by leaf (the contract of [`layer_bytes`]).
fn piece_bytes<'a>(
    seq: &'a Seq,
    lg: &Geom,
    p: &Piece,
    got: &'a [Result<Got, NvmeError>],
    read: &mut Option<(TierKind, u64)>,
) -> Result<Option<KvBytes<'a>>, TierKind> {
    let layer = seq.req.layer;
    let i = p.block;
    let b = &seq.pin.blocks[i];
    let (Some(stored), Some(s)) = (lg.tokens_of(b.len), seq.pin.summary(i, seq.req.geom)) else {
        return Ok(None);
    };
    let verify = |k: &[u8], v: &[u8]| {
        s.verify(layer, 0, stored, p.leaves.clone(), k)
            && s.verify(layer, 1, stored, p.leaves.clone(), v)
    };
    if b.dram.is_some() {
        let kr = lg.leaves_range(stored, layer, 0, p.leaves.clone());
        let vr = lg.leaves_range(stored, layer, 1, p.leaves.clone());
        let k = seq.pin.dram_bytes(i, kr).expect("DRAM copy");
        let v = seq.pin.dram_bytes(i, vr).expect("DRAM copy");
        *read = Some((TierKind::Dram, (k.len() + v.len()) as u64));
        return if verify(k, v) {
            Ok(Some((k, v)))
        } else {
            Err(TierKind::Dram)
        };
    }
    match got {
        [Ok(k), Ok(v)] => {
            if verify(k.bytes(), v.bytes()) {
                Ok(Some((k.bytes(), v.bytes())))
            } else {
                Err(TierKind::Nvme)
            }
        }
        [Err(NvmeError::Corrupt(_)), _] | [_, Err(NvmeError::Corrupt(_))] => Err(TierKind::Nvme),
        _ => Ok(None),
    }
}

/// Attends the pieces of one part of a wave, in order, like `compute_part`;
/// with `sample`, also the exact scores `scale q.k` of the first query head
/// of each KV head over the attended tokens outside the sink and recent
/// blocks (`[kv_heads][tokens]`).
fn compute_pieces(
    seq: &Seq,
    pieces: &[Piece],
    got: &[PieceGot],
    sample: bool,
) -> (Part, Vec<Vec<f32>>) {
    let geom = seq.req.geom;
    let lg = leaf_geom(seq);
    let (d, heads, kv) = (
        geom.head_dim as usize,
        seq.input().heads,
        geom.kv_heads as usize,
    );
    let g = heads / kv;
    let mut w = Work::new(g, d);
    let mut states: Vec<AttnState> = (0..kv).map(|_| AttnState::new(g, d)).collect();
    let mut part = Part::new(heads, d, pieces.len()).tracking(seq);
    let mut scores: Vec<Vec<f32>> = vec![Vec::new(); if sample { kv } else { 0 }];
    let last = seq.present().saturating_sub(1);
    let mut dq = Decoded::default();
    // The block `dq` holds: its leaves' pieces come one after another.
    let mut decoded = None;
    let width = kv * d;
    for (p, got) in pieces.iter().zip(got) {
        let i = p.block;
        let copy = match decoded {
            Some(b) if b == i => Some(Ok(0)),
            _ => leased_layer(seq, i, &mut dq),
        };
        if matches!(copy, Some(Ok(_))) {
            decoded = Some(i);
        }
        match copy {
            Some(Ok(n)) => {
                // Only the piece's rows of the copy (its whole block's).
                let t = piece_tokens(seq, &lg, p);
                let rows = t.start as usize * width..t.end as usize * width;
                let (k, v) = (f32_bytes(&dq.k[rows.clone()]), f32_bytes(&dq.v[rows]));
                let n_rows = t.len() as u32;
                // A block attended in pieces counts its copy once
                // (`apply_part` keeps the first).
                part.quant.push((i, n));
                part.before(&states);
                attend_rows::<f32>(seq, &mut states, k, v, &mut w, &|_, rows| {
                    rows.extend(0..n_rows)
                });
                part.after(i, &states);
                if sample && i != 0 && i != last {
                    score_first_heads(seq, Dtype::F32, k, n_rows as usize, &mut scores);
                }
                continue;
            }
            Some(Err(())) => {
                part.cut = Some((i, None));
                break;
            }
            None => {}
        }
        let mut read = None;
        let r = if p.whole {
            layer_bytes(seq, i, Want::Kv, got.first(), &mut read)
        } else {
            piece_bytes(seq, &lg, p, got, &mut read)
        };
        part.reads.extend(read.map(|(t, n)| (i, t, n)));
        match r {
            Ok(Some((k, v))) => {
                let n = piece_tokens(seq, &lg, p).len() as u32;
                part.before(&states);
                dispatch_rows(seq, &mut states, k, v, &mut w, &|_, rows| rows.extend(0..n));
                part.after(i, &states);
                if sample && i != 0 && i != last {
                    score_first_heads(seq, seq.req.geom.dtype, k, n as usize, &mut scores);
                }
                if p.whole && matches!(got.first(), Some(Ok(_))) {
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
    (part, scores)
}

/// Appends `scale q.k` of the first query head of each KV head for the
/// first `n` rows of `k` (`[token][kv_head][d]`) to `out[kv_head]`.
fn score_first_heads(seq: &Seq, dtype: Dtype, k: &[u8], n: usize, out: &mut [Vec<f32>]) {
    fn go<E: KvElem>(seq: &Seq, k: &[u8], n: usize, out: &mut [Vec<f32>]) {
        let geom = seq.req.geom;
        let (d, kv) = (geom.head_dim as usize, geom.kv_heads as usize);
        let s = seq.input();
        let g = s.heads / kv;
        let k = elems::<E>(k);
        let mut row = vec![0f32; d];
        for (h, o) in out.iter_mut().enumerate() {
            let q = &s.q[h * g * d..(h * g + 1) * d];
            for t in 0..n {
                E::slice_to_f32(&k[(t * kv + h) * d..(t * kv + h + 1) * d], &mut row);
                let dot: f32 = q.iter().zip(&row).map(|(a, b)| a * b).sum();
                o.push(seq.req.scale * dot);
            }
        }
    }
    match dtype {
        Dtype::F32 => go::<f32>(seq, k, n, out),
        Dtype::F16 => go::<f16>(seq, k, n, out),
        Dtype::Bf16 => go::<bf16>(seq, k, n, out),
        Dtype::Fp8E4m3 => unreachable!("checked: Attend refuses fp8"),
    }
}

/// Verifies and attends one wave of pieces: split into contiguous parts on
/// up to `compute.threads` blocking threads, merged in order; a part stops
/// at its first unreadable or corrupt piece and the covered prefix ends at
/// its block (as [`compute_wave`]). Returns the scores sampled.
async fn compute_pieces_wave(
    ctx: &AttendCtx,
    seq: Seq,
    wave: Vec<Piece>,
    got: Vec<PieceGot>,
    sample: bool,
) -> Result<(Seq, Vec<Vec<f32>>), StoreError> {
    let wave: Vec<Piece> = match seq.cut {
        Some(c) => wave.into_iter().take_while(|p| p.block < c).collect(),
        None => wave,
    };
    let (parts, per) = part_split(ctx.cfg.threads, wave.len());
    let seq = Arc::new(seq);
    let wave = Arc::new(wave);
    let got = Arc::new(got);
    let tasks = (0..parts).map(|p| {
        let (seq, wave, got) = (seq.clone(), wave.clone(), got.clone());
        ctx.blocking(move || {
            let range = (p * per).min(wave.len())..((p + 1) * per).min(wave.len());
            compute_pieces(&seq, &wave[range.clone()], &got[range], sample)
        })
    });
    let done = futures_util::future::join_all(tasks).await;
    let mut seq = Arc::try_unwrap(seq)
        .map_err(|_| StoreError::Internal("Attend compute part still holds the sequence".into()))?;
    let mut scores: Vec<Vec<f32>> = Vec::new();
    for part in done {
        let (part, s) = part?;
        scores.resize(s.len(), Vec::new());
        for (a, b) in scores.iter_mut().zip(s) {
            a.extend(b);
        }
        if !apply_part(&mut seq, part) {
            break;
        }
    }
    Ok((seq, scores))
}

/// SPARSE: choose the level, select, read and attend the pieces wave by
/// wave, learn the layer's skew from what was attended (adaptive level).
pub(super) async fn sparse(ctx: &AttendCtx, seq: Seq) -> Result<SeqResult, StoreError> {
    let (fine, sample) = level(ctx, &seq);
    ctx.metrics.sparse_level[fine as usize].increment(1);
    let budget_fraction = ctx.cfg.sparse_budget_fraction;
    let (mut seq, pieces, abstract_bytes) = ctx
        .blocking(move || {
            let (pieces, ab) = select_leaves(&seq, budget_fraction, fine);
            (seq, pieces, ab)
        })
        .await?;
    let mut blocks: Vec<usize> = pieces.iter().map(|p| p.block).collect();
    blocks.dedup();
    if ctx.cfg.promote {
        promote(&mut seq, &blocks).await;
    }
    lease_copies(&mut seq, &blocks);
    let mut scores: Vec<Vec<f32>> = Vec::new();
    for wave in piece_waves(&seq, &pieces, ctx.cfg.read_wave_bytes) {
        if seq.cut.is_some_and(|c| wave[0].block >= c) {
            break;
        }
        let got = read_pieces(&mut seq, &wave).await;
        let s;
        (seq, s) = compute_pieces_wave(ctx, seq, wave, got, sample).await?;
        scores.resize(s.len(), Vec::new());
        for (a, b) in scores.iter_mut().zip(s) {
            a.extend(b);
        }
    }
    if sample {
        let (ns, layer) = (seq.req.namespace, seq.req.layer);
        let x = ctx
            .blocking(move || {
                let xs: Vec<f32> = scores.iter_mut().filter_map(|s| top_share(s)).collect();
                (!xs.is_empty()).then(|| xs.iter().sum::<f32>() / xs.len() as f32)
            })
            .await?;
        if let Some(x) = x {
            ctx.skew.observe(ns, layer, x);
        }
    }
    Ok(finish_pieces(seq, &pieces, abstract_bytes))
}

/// The answer of SPARSE from the pieces attended.
fn finish_pieces(seq: Seq, pieces: &[Piece], abstract_bytes: u64) -> SeqResult {
    let (hot_blocks, hot_nvme) = settle_hot(&seq);
    let lg = leaf_geom(&seq);
    let present = seq.present();
    let done: Vec<(usize, Range<u32>)> = pieces
        .iter()
        .filter(|p| p.block < present)
        .map(|p| (p.block, piece_tokens(&seq, &lg, p)))
        .collect();
    let covered = merge_ranges(done.iter().map(|(i, t)| {
        let s = seq.starts[*i];
        s + t.start as u64..s + t.end as u64
    }));
    let tokens_attended: u64 = done.iter().map(|(_, t)| t.len() as u64).sum();
    let tokens_present = seq.tokens[..present].iter().map(|&t| t as u64).sum();
    SeqResult {
        o: seq.acc.o,
        lse: seq.acc.lse,
        keys_present: present as u32,
        tokens_present,
        exact: tokens_attended == tokens_present && seq.qread.blocks == 0,
        sink_included: present > 0 && done.first().is_some_and(|(i, t)| *i == 0 && t.start == 0),
        recent_included: present > 0
            && done
                .last()
                .is_some_and(|(i, t)| *i == present - 1 && t.end == seq.tokens[present - 1]),
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

/// Share of the attended tokens' softmax mass carried by the top 2% of
/// them (at least one token): 1 when one token holds all of it, 0.02 when
/// every token weighs the same. `None` below [`SKEW_MIN_TOKENS`] tokens
/// (too few to tell). Reorders `scores`.
pub(super) fn top_share(scores: &mut [f32]) -> Option<f32> {
    let n = scores.len();
    if n < SKEW_MIN_TOKENS {
        return None;
    }
    let k = (n as f64 * 0.02).ceil().max(1.0) as usize;
    scores.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let m = scores[..k]
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    if !m.is_finite() {
        return None;
    }
    let w = |s: &[f32]| s.iter().map(|&x| ((x - m) as f64).exp()).sum::<f64>();
    let (top, rest) = (w(&scores[..k]), w(&scores[k..]));
    Some((top / (top + rest)) as f32)
}

/// Fewest sampled tokens a skew observation needs.
pub(super) const SKEW_MIN_TOKENS: usize = 32;
/// Slots of the skew table (direct-mapped by namespace and layer; a
/// colliding pair takes the slot over and starts learning again).
pub(super) const SKEW_SLOTS: usize = 4096;
/// Weight of a new observation in the running mean.
const SKEW_EMA: f32 = 0.25;
/// A layer goes to the leaf level when its running skew reaches
/// `SKEW_FINE_ON`, and back to the block level when it falls to
/// `SKEW_FINE_OFF` (hysteresis: a layer near one threshold does not flip
/// call by call). Where they sit: equal scores give 0.02 and the
/// random-key layers of the tests about 0.1, while the synthetic heads
/// that pass COMPUTE.md §2's skew gate (top 2% of keys >= 0.8 of the
/// mass) measured 0.28-0.72 (semantic, mean about 0.45) and 0.12-1.0
/// (needle, mostly above 0.5) in the attend-quality bench, where leaves
/// beat blocks at every budget: a running mean above 0.3 is a layer whose
/// mass sits on few tokens, one below 0.2 one whose mass is spread.
pub(super) const SKEW_FINE_ON: f32 = 0.3;
pub(super) const SKEW_FINE_OFF: f32 = 0.2;

#[derive(Debug, Clone, Copy, Default)]
struct SkewSlot {
    ns: u64,
    layer: u32,
    used: bool,
    ema: f32,
    fine: bool,
}

/// What the daemon learned per (namespace, layer) about the skew of the
/// attention it computed: a running mean of [`top_share`] and the level it
/// implies. Bounded: [`SKEW_SLOTS`] slots of a few bytes, allocated once.
pub(crate) struct SkewTable {
    slots: Mutex<Vec<SkewSlot>>,
}

impl SkewTable {
    pub(crate) fn new() -> Self {
        SkewTable {
            slots: Mutex::new(vec![SkewSlot::default(); SKEW_SLOTS]),
        }
    }

    fn slot(ns: NamespaceId, layer: u32) -> usize {
        let x = (ns.0 ^ (layer as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_mul(0xff51_afd7_ed55_8ccd);
        (x >> 40) as usize % SKEW_SLOTS
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<SkewSlot>> {
        // A slot is a hint for ranking: a panic elsewhere cannot make it
        // unsafe to read.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the layer ranks at the leaf level (false until learned).
    pub(crate) fn fine(&self, ns: NamespaceId, layer: u32) -> bool {
        let s = self.lock()[Self::slot(ns, layer)];
        s.used && s.ns == ns.0 && s.layer == layer && s.fine
    }

    /// Adds one observation; returns the level now (true: leaves).
    pub(crate) fn observe(&self, ns: NamespaceId, layer: u32, x: f32) -> bool {
        let mut slots = self.lock();
        let s = &mut slots[Self::slot(ns, layer)];
        if !(s.used && s.ns == ns.0 && s.layer == layer) {
            *s = SkewSlot {
                ns: ns.0,
                layer,
                used: true,
                ema: x,
                fine: false,
            };
        } else {
            s.ema += SKEW_EMA * (x - s.ema);
        }
        if s.ema >= SKEW_FINE_ON {
            s.fine = true;
        } else if s.ema <= SKEW_FINE_OFF {
            s.fine = false;
        }
        s.fine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_share_tells_skewed_from_flat() {
        let mut flat = vec![0.0f32; 200];
        assert!((top_share(&mut flat).unwrap() - 4.0 / 200.0).abs() < 1e-6);
        let mut one: Vec<f32> = (0..200).map(|i| if i == 77 { 30.0 } else { 0.0 }).collect();
        assert!(top_share(&mut one).unwrap() > 0.99);
        assert!(top_share(&mut [1.0f32; 10]).is_none(), "too few tokens");
    }

    #[test]
    fn skew_table_switches_with_hysteresis() {
        let t = SkewTable::new();
        let (ns, other) = (NamespaceId(7), NamespaceId(8));
        assert!(!t.fine(ns, 3), "block level until learned");
        // Skewed observations: leaves once the mean reaches the threshold.
        assert!(t.observe(ns, 3, 0.9));
        assert!(t.fine(ns, 3) && !t.fine(ns, 4) && !t.fine(other, 3));
        // Flat observations: the mean falls 0.9, 0.68, 0.51, 0.38, 0.28,
        // 0.21 (still leaves: above the off threshold), 0.16 (blocks).
        for _ in 0..5 {
            assert!(t.observe(ns, 3, 0.0));
        }
        assert!(!t.observe(ns, 3, 0.0));
        assert!(!t.fine(ns, 3));
        // Between the thresholds: no change.
        for _ in 0..30 {
            assert!(
                !t.observe(ns, 3, 0.25),
                "stays at blocks below the on threshold"
            );
        }
        // Skewed again: 0.25 + (0.9 - 0.25) / 4 = 0.41, leaves.
        assert!(t.observe(ns, 3, 0.9));
    }
}

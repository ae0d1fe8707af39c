//! Key sketches: the keys of one block and one KV head kept **dim-major**
//! as 8-bit codes between the block's per-channel bounds, for SparF's
//! channel scan (COMPUTE.md §4: "score all tokens on those r channels of K
//! stored dim-major").
//!
//! Channel `i` of token `t` is stored as
//! `code[i][t] = round((k[t][i] - lo[i]) * 255 / (hi[i] - lo[i]))`, where
//! `lo`, `hi` are the box of the block's keys (the chunk abstract,
//! [`crate::abstracts`]; every key lies inside it). Decoding gives the key
//! within half a step, `(hi[i] - lo[i]) / 510`, per channel. One channel's
//! row is `n` contiguous bytes, so the `r` rows SparF reads are `r * n`
//! bytes of a block instead of the whole token-major K (`n * d * 2` bytes
//! in f16): at `r = d/8` a 32nd of K.
//!
//! A sketch only ranks tokens: SparF attends the chosen tokens from the
//! stored, verified K and V, so an error in a sketch (or its rounding) can
//! change which tokens are chosen, never the values attended.
//!
//! [`sketch_scores`] is the group score of [`crate::sparf::sparf_scores`]
//! on decoded keys: `scale * max_h sum_{i in R} q_h,i * k~[t][i]`, computed
//! as `sum_i q_h,i * lo[i] + sum_i (q_h,i * step[i]) * code[i][t]`.

use crate::elem::KvElem;
use crate::simd;
use crate::sparf::HeadScores;

/// Codes per channel step (8-bit codes).
pub const LEVELS: f32 = 255.0;

/// Tokens scored per pass (the `[heads][TILE]` sums stay in L1).
const TILE: usize = 256;

/// The step between codes of a channel with box `[lo, hi]`; 0 for an empty
/// or non-finite box (such a channel decodes to `lo`; [`sketch_scores`]
/// refuses blocks whose chosen channels have a non-finite box).
#[inline]
pub fn step(lo: f32, hi: f32) -> f32 {
    let w = hi - lo;
    if w.is_finite() && w > 0.0 {
        w * (1.0 / LEVELS)
    } else {
        0.0
    }
}

/// Encodes KV head `head` of the token-major keys `k` (`[n][kv_heads][d]`)
/// into `out` (`[d][stride]` codes, token `t` of channel `i` at
/// `out[i * stride + t]`; slots from `n` to `stride` are left alone)
/// against the box `lo`, `hi` (`[d]` each, holding every key). `row` is
/// scratch of at least `d` values.
#[allow(clippy::too_many_arguments)]
pub fn encode<E: KvElem>(
    k: &[E],
    kv_heads: usize,
    head: usize,
    d: usize,
    lo: &[f32],
    hi: &[f32],
    stride: usize,
    row: &mut [f32],
    out: &mut [u8],
) {
    let pitch = kv_heads * d;
    assert!(
        head < kv_heads && d > 0 && k.len().is_multiple_of(pitch),
        "sketch: K is not [n][kv_heads][d] with head {head} < {kv_heads}"
    );
    let n = k.len() / pitch;
    assert!(n <= stride, "sketch: {n} tokens exceed stride {stride}");
    assert!(lo.len() >= d && hi.len() >= d && row.len() >= d);
    assert!(out.len() >= d * stride, "sketch: out is not [d][stride]");
    let fast = simd::avx2_fma();
    for t in 0..n {
        let src = &k[t * pitch + head * d..][..d];
        let x = if fast {
            simd::as_f32::<E, true>(src, row)
        } else {
            simd::as_f32::<E, false>(src, row)
        };
        for i in 0..d {
            let s = step(lo[i], hi[i]);
            let c = if s > 0.0 {
                ((x[i] - lo[i]) / s + 0.5).clamp(0.0, LEVELS) as u8
            } else {
                0
            };
            out[i * stride + t] = c;
        }
    }
}

/// Adds every row of `x` (`[n][w]`, `w = acc.len()`) to `acc`, in row
/// order, in f32: the per-channel sums of a block's V kept beside its key
/// sketch, from which the mean value of SparQ's correction comes without
/// reading V. `row` is scratch of at least `w` values.
pub fn add_rows<E: KvElem>(x: &[E], acc: &mut [f32], row: &mut [f32]) {
    let w = acc.len();
    assert!(
        w > 0 && x.len().is_multiple_of(w) && row.len() >= w,
        "add_rows: x is not [n][{w}]"
    );
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        unsafe { add_rows_avx2(x, acc, row) };
        return;
    }
    add_rows_impl::<E, false>(x, acc, row);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_rows_avx2<E: KvElem>(x: &[E], acc: &mut [f32], row: &mut [f32]) {
    add_rows_impl::<E, true>(x, acc, row);
}

#[inline(always)]
fn add_rows_impl<E: KvElem, const FAST: bool>(x: &[E], acc: &mut [f32], row: &mut [f32]) {
    for r in x.chunks_exact(acc.len()) {
        let v = simd::as_f32::<E, FAST>(r, row);
        for (a, &b) in acc.iter_mut().zip(v) {
            *a += b;
        }
    }
}

/// One block's sketch of one KV head, as [`sketch_scores`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct Sketch<'a> {
    /// `[d][stride]` codes.
    pub codes: &'a [u8],
    pub stride: usize,
    /// Tokens held (`<= stride`).
    pub n: usize,
    /// The box of each **chosen** channel (`lo[j]`, `hi[j]` for
    /// `channels[j]`), so that a caller converts only the bounds it uses.
    pub lo: &'a [f32],
    pub hi: &'a [f32],
}

/// Scratch for [`sketch_scores`], reused across blocks.
#[derive(Debug, Clone, Default)]
pub struct SketchScratch {
    /// `[r][heads]` weights `q_h,c * step_c`, and `[heads]` bases.
    w: Vec<f32>,
    base: Vec<f32>,
    /// `[r]` steps of the chosen channels.
    step: Vec<f32>,
    /// One channel row as f32, and `[heads][TILE]` sums.
    x: Vec<f32>,
    acc: Vec<f32>,
    /// `[heads]` sums of a block of exactly [`FIXED`] tokens.
    acc16: Vec<[f32; FIXED]>,
}

/// Tokens of the unrolled path (the common 16-token block).
const FIXED: usize = 16;

impl SketchScratch {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Approximate group scores of the sketch's `n` tokens on `channels`:
/// `out[t] = scale * max_h sum_j q_h,channels[j] * k~[t][channels[j]]` with
/// `k~` the decoded keys. Returns false (and writes nothing) when a chosen
/// channel's box is not finite: the caller scores that block from its
/// keys.
#[allow(clippy::too_many_arguments)]
pub fn sketch_scores(
    q: &[f32],
    heads: usize,
    d: usize,
    s: &Sketch<'_>,
    channels: &[u32],
    scale: f32,
    scratch: &mut SketchScratch,
    out: &mut [f32],
) -> bool {
    scores_checked(q, heads, d, s, channels, scale, scratch, out, None)
}

/// [`sketch_scores`], and each query head's own score (before the max
/// over the group) into `each` (SparQ's mean-value correction needs every
/// head's estimated softmax, [`crate::sparf::chosen_mass`]).
#[allow(clippy::too_many_arguments)]
pub fn sketch_scores_with_heads(
    q: &[f32],
    heads: usize,
    d: usize,
    s: &Sketch<'_>,
    channels: &[u32],
    scale: f32,
    scratch: &mut SketchScratch,
    out: &mut [f32],
    each: HeadScores<'_>,
) -> bool {
    scores_checked(q, heads, d, s, channels, scale, scratch, out, Some(each))
}

#[allow(clippy::too_many_arguments)]
fn scores_checked(
    q: &[f32],
    heads: usize,
    d: usize,
    s: &Sketch<'_>,
    channels: &[u32],
    scale: f32,
    scratch: &mut SketchScratch,
    out: &mut [f32],
    mut each: Option<HeadScores<'_>>,
) -> bool {
    let r = channels.len();
    assert_eq!(q.len(), heads * d, "sketch: q is not [heads][d]");
    assert!(s.n <= s.stride && s.codes.len() >= d * s.stride);
    assert!(
        s.lo.len() >= r && s.hi.len() >= r,
        "sketch: a box per channel"
    );
    assert!(channels.iter().all(|&c| (c as usize) < d));
    assert_eq!(out.len(), s.n, "sketch: out is not [n]");
    if let Some(e) = &each {
        e.check(heads, s.n);
    }
    if !s.lo[..r].iter().chain(&s.hi[..r]).all(|x| x.is_finite()) {
        return false;
    }
    let sc = scratch;
    sc.w.resize(heads * r, 0.0);
    sc.base.resize(heads, 0.0);
    let tile = TILE.min(s.n.max(1));
    sc.x.resize(tile, 0.0);
    sc.acc.resize(heads * tile, 0.0);
    sc.acc16.resize(heads, [0.0; FIXED]);
    sc.step.clear();
    sc.step.extend(
        s.lo[..r]
            .iter()
            .zip(&s.hi[..r])
            .map(|(&lo, &hi)| step(lo, hi)),
    );
    for h in 0..heads {
        let qh = &q[h * d..(h + 1) * d];
        let mut base = 0.0;
        for (j, &c) in channels.iter().enumerate() {
            let qc = qh[c as usize];
            base += qc * s.lo[j];
            sc.w[j * heads + h] = qc * sc.step[j];
        }
        sc.base[h] = base;
    }
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { scores_avx2(heads, s, channels, scale, tile, sc, out, each.as_mut()) };
        return true;
    }
    scores_impl::<false>(heads, s, channels, scale, tile, sc, out, each.as_mut());
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_avx2(
    heads: usize,
    s: &Sketch<'_>,
    channels: &[u32],
    scale: f32,
    tile: usize,
    sc: &mut SketchScratch,
    out: &mut [f32],
    each: Option<&mut HeadScores<'_>>,
) {
    scores_impl::<true>(heads, s, channels, scale, tile, sc, out, each);
}

/// The sums, one channel row converted once and added to every head's
/// tile (plain loops over slices that LLVM vectorises); a block of exactly
/// [`FIXED`] tokens takes an unrolled path (fixed-size rows in registers).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scores_impl<const FMA: bool>(
    heads: usize,
    s: &Sketch<'_>,
    channels: &[u32],
    scale: f32,
    tile: usize,
    sc: &mut SketchScratch,
    out: &mut [f32],
    mut each: Option<&mut HeadScores<'_>>,
) {
    if s.n == FIXED {
        let acc = &mut sc.acc16[..heads];
        for (a, &b) in acc.iter_mut().zip(&sc.base) {
            *a = [b; FIXED];
        }
        for (j, &c) in channels.iter().enumerate() {
            let at = c as usize * s.stride;
            let row: &[u8; FIXED] = s.codes[at..at + FIXED].try_into().expect("FIXED codes");
            let x: [f32; FIXED] = std::array::from_fn(|t| row[t] as f32);
            for (a, &w) in acc.iter_mut().zip(&sc.w[j * heads..(j + 1) * heads]) {
                for t in 0..FIXED {
                    a[t] = simd::fmadd::<FMA>(w, x[t], a[t]);
                }
            }
        }
        if let Some(e) = each.as_deref_mut() {
            for (h, a) in acc.iter().enumerate() {
                for (o, &v) in e.row(h, 0, FIXED).iter_mut().zip(a) {
                    *o = v * scale;
                }
            }
        }
        let mut m = acc[0];
        for a in &acc[1..] {
            for t in 0..FIXED {
                m[t] = if a[t] > m[t] { a[t] } else { m[t] };
            }
        }
        for (o, v) in out.iter_mut().zip(m) {
            *o = v * scale;
        }
        return;
    }
    let mut start = 0;
    while start < s.n {
        let len = tile.min(s.n - start);
        for h in 0..heads {
            sc.acc[h * tile..h * tile + len].fill(sc.base[h]);
        }
        for (j, &c) in channels.iter().enumerate() {
            let row = &s.codes[c as usize * s.stride + start..][..len];
            let x = &mut sc.x[..len];
            for (xv, &b) in x.iter_mut().zip(row) {
                *xv = b as f32;
            }
            for h in 0..heads {
                let w = sc.w[j * heads + h];
                for (a, &xv) in sc.acc[h * tile..h * tile + len].iter_mut().zip(x.iter()) {
                    *a += w * xv;
                }
            }
        }
        if let Some(e) = each.as_deref_mut() {
            for h in 0..heads {
                for (o, &v) in e
                    .row(h, start, len)
                    .iter_mut()
                    .zip(&sc.acc[h * tile..h * tile + len])
                {
                    *o = v * scale;
                }
            }
        }
        let o = &mut out[start..start + len];
        o.copy_from_slice(&sc.acc[..len]);
        for h in 1..heads {
            for (x, &y) in o.iter_mut().zip(&sc.acc[h * tile..h * tile + len]) {
                *x = if y > *x { y } else { *x };
            }
        }
        for x in o.iter_mut() {
            *x *= scale;
        }
        start += len;
    }
}

/// The log-sum-exp of each span `(start, len)` of `scores` into `out`
/// (-inf for an empty span or one of -inf scores): the estimated
/// attention weight of a block of tokens, for choosing whole blocks.
pub fn span_lse(scores: &[f32], spans: &[(usize, usize)], out: &mut [f32]) {
    assert_eq!(out.len(), spans.len(), "span_lse: out is not [spans]");
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { span_lse_avx2(scores, spans, out) };
        return;
    }
    span_lse_impl(scores, spans, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn span_lse_avx2(scores: &[f32], spans: &[(usize, usize)], out: &mut [f32]) {
    span_lse_impl(scores, spans, out);
}

#[inline(always)]
fn span_lse_impl(scores: &[f32], spans: &[(usize, usize)], out: &mut [f32]) {
    for (o, &(start, n)) in out.iter_mut().zip(spans) {
        let x = &scores[start..start + n];
        let m = simd::max(x);
        // The sum in 8 lanes (a serial sum left the exponentials scalar).
        *o = if m == f32::NEG_INFINITY {
            m
        } else {
            m + simd::sum_exp_sub(x, m).ln()
        };
    }
}

/// One KV head's sketches of consecutive **full** blocks laid out
/// channel-major (a *run*: the daemon keeps one per chain and layer so that
/// SparF's scan streams instead of gathering each block's rows): channel
/// `c`'s codes of block `b` at `codes[c * cap * tpb + b * tpb..][..tpb]`,
/// its box at `lo[c * cap + b]`, `hi[c * cap + b]` as f16 bits, rounded
/// outward as the summaries keep them. Every box is finite (the daemon
/// ends a run before a block with a non-finite one).
#[derive(Debug, Clone, Copy)]
pub struct SketchRun<'a> {
    pub codes: &'a [u8],
    pub lo: &'a [u16],
    pub hi: &'a [u16],
    /// Blocks a row has room for.
    pub cap: usize,
    pub tpb: usize,
}

/// Scratch for [`run_scores`], reused across calls.
#[derive(Debug, Clone, Default)]
pub struct RunScratch {
    /// `[heads][RUN_CHUNK]` bases, `[r][heads][RUN_CHUNK]` weights and
    /// `[heads][RUN_CHUNK * tpb]` sums of the current chunk of blocks.
    base: Vec<f32>,
    w: Vec<f32>,
    acc: Vec<f32>,
    /// The chunk's boxes of one channel (`[2][RUN_CHUNK]`, f32), and one
    /// channel's codes as f32.
    x: Vec<f32>,
    row: Vec<f32>,
}

/// Blocks per pass of [`run_scores`] (at 16 tokens and 4 heads the sums are
/// 8 KiB, in L1; each chosen channel's codes are one 512-byte stretch).
const RUN_CHUNK: usize = 32;

/// [`sketch_scores`] of blocks `blocks` of `run` (all full), into `out`
/// (`[blocks.len() * tpb]`), bit for bit what [`sketch_scores`] gives block
/// by block on the same codes and boxes: the same operations in the same
/// order per token (bases over the channels in order, then one
/// multiply-add per channel, fused exactly where [`sketch_scores`] fuses
/// them: on its 16-token path with FMA), only batched over a chunk of
/// blocks and reading each channel's codes as one contiguous stretch.
#[allow(clippy::too_many_arguments)]
pub fn run_scores(
    q: &[f32],
    heads: usize,
    d: usize,
    run: &SketchRun<'_>,
    blocks: std::ops::Range<usize>,
    channels: &[u32],
    scale: f32,
    scratch: &mut RunScratch,
    out: &mut [f32],
) {
    let tpb = run.tpb;
    assert_eq!(q.len(), heads * d, "sketch run: q is not [heads][d]");
    assert!(
        tpb > 0 && blocks.end <= run.cap,
        "sketch run: blocks beyond the run"
    );
    assert!(
        run.codes.len() >= d * run.cap * tpb
            && run.lo.len() >= d * run.cap
            && run.hi.len() >= d * run.cap,
        "sketch run: rows shorter than [d][cap]"
    );
    assert!(
        channels.iter().all(|&c| (c as usize) < d),
        "sketch run: channel out of range"
    );
    assert_eq!(
        out.len(),
        blocks.len() * tpb,
        "sketch run: out is not [blocks][tpb]"
    );
    let r = channels.len();
    let sc = scratch;
    sc.base.resize(heads * RUN_CHUNK, 0.0);
    sc.w.resize(r * heads * RUN_CHUNK, 0.0);
    sc.acc.resize(heads * RUN_CHUNK * tpb, 0.0);
    sc.x.resize(2 * RUN_CHUNK, 0.0);
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        unsafe { run_scores_avx2(q, heads, d, run, blocks, channels, scale, sc, out) };
        return;
    }
    run_scores_impl::<false>(q, heads, d, run, blocks, channels, scale, sc, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_scores_avx2(
    q: &[f32],
    heads: usize,
    d: usize,
    run: &SketchRun<'_>,
    blocks: std::ops::Range<usize>,
    channels: &[u32],
    scale: f32,
    sc: &mut RunScratch,
    out: &mut [f32],
) {
    run_scores_impl::<true>(q, heads, d, run, blocks, channels, scale, sc, out);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn run_scores_impl<const FMA: bool>(
    q: &[f32],
    heads: usize,
    d: usize,
    run: &SketchRun<'_>,
    blocks: std::ops::Range<usize>,
    channels: &[u32],
    scale: f32,
    sc: &mut RunScratch,
    out: &mut [f32],
) {
    let (tpb, cap) = (run.tpb, run.cap);
    let mut b0 = blocks.start;
    while b0 < blocks.end {
        let cb = RUN_CHUNK.min(blocks.end - b0);
        let toks = cb * tpb;
        // Bases and weights of the chunk's blocks: per channel, its boxes
        // as one stretch (converted 8 at a time with F16C).
        let base = &mut sc.base[..heads * cb];
        base.fill(0.0);
        let (lo, hi) = sc.x.split_at_mut(RUN_CHUNK);
        for (j, &c) in channels.iter().enumerate() {
            let at = c as usize * cap + b0;
            let (lo, hi) = (&mut lo[..cb], &mut hi[..cb]);
            // SAFETY: f16 is a u16 bit pattern of the same size.
            let as_f16 = |b: &[u16]| unsafe {
                std::slice::from_raw_parts(b.as_ptr() as *const half::f16, b.len())
            };
            simd::widen::<half::f16, FMA>(as_f16(&run.lo[at..at + cb]), lo);
            simd::widen::<half::f16, FMA>(as_f16(&run.hi[at..at + cb]), hi);
            for (h_, hv) in hi.iter_mut().zip(lo.iter()) {
                *h_ = step(*hv, *h_);
            }
            let w = &mut sc.w[j * heads * cb..(j + 1) * heads * cb];
            for h in 0..heads {
                let qc = q[h * d + c as usize];
                for ((bv, wv), (&l, &st)) in base[h * cb..(h + 1) * cb]
                    .iter_mut()
                    .zip(&mut w[h * cb..(h + 1) * cb])
                    .zip(lo.iter().zip(hi.iter()))
                {
                    *bv += qc * l;
                    *wv = qc * st;
                }
            }
        }
        let o = &mut out[(b0 - blocks.start) * tpb..(b0 - blocks.start) * tpb + toks];
        #[cfg(target_arch = "x86_64")]
        if FMA && tpb == FIXED {
            // SAFETY: FMA is set only inside the AVX2+FMA function; the
            // lengths are those checked by `run_scores`.
            unsafe { blocks16(o, base, &sc.w, run, b0, cb, channels, heads, scale) };
            b0 += cb;
            continue;
        }
        let acc = &mut sc.acc[..heads * toks];
        if tpb == FIXED {
            chunk_sums::<FMA, FIXED>(acc, base, &sc.w, &mut sc.row, run, b0, cb, channels, heads);
        } else {
            chunk_sums::<false, 0>(acc, base, &sc.w, &mut sc.row, run, b0, cb, channels, heads);
        }
        o.copy_from_slice(&acc[..toks]);
        for h in 1..heads {
            for (x, &y) in o.iter_mut().zip(&acc[h * toks..(h + 1) * toks]) {
                *x = if y > *x { y } else { *x };
            }
        }
        for x in o.iter_mut() {
            *x *= scale;
        }
        b0 += cb;
    }
}

/// The 16-token path of [`run_scores_impl`] with FMA: per block, the sums
/// of up to four heads in registers across all channels (the codes of a
/// channel converted once per block and group of heads), then the maximum
/// over heads in head order and the scale: the operations of the per-block
/// 16-token path, in its order.
///
/// # Safety
/// AVX2+FMA; `o` is `[cb][16]`, `base` `[heads][cb]`, `w` `[r][heads][cb]`,
/// and the run's rows hold blocks `b0..b0 + cb`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn blocks16(
    o: &mut [f32],
    base: &[f32],
    w: &[f32],
    run: &SketchRun<'_>,
    b0: usize,
    cb: usize,
    channels: &[u32],
    heads: usize,
    scale: f32,
) {
    use std::arch::x86_64::*;
    assert!(o.len() >= cb * FIXED && base.len() >= heads * cb);
    assert!(w.len() >= channels.len() * heads * cb);
    let row = run.cap * FIXED;
    assert!(
        channels
            .iter()
            .all(|&c| (c as usize + 1) * row <= run.codes.len())
    );
    assert!((b0 + cb) * FIXED <= row);
    // SAFETY: every access below is within the lengths asserted above.
    unsafe {
        for b in 0..cb {
            let mut m = [_mm256_set1_ps(f32::NEG_INFINITY); 2];
            let mut h = 0;
            while h < heads {
                match heads - h {
                    1 => group16::<1>(
                        &mut m, base, w, run.codes, row, b0, b, cb, channels, heads, h,
                    ),
                    2 => group16::<2>(
                        &mut m, base, w, run.codes, row, b0, b, cb, channels, heads, h,
                    ),
                    3 => group16::<3>(
                        &mut m, base, w, run.codes, row, b0, b, cb, channels, heads, h,
                    ),
                    _ => group16::<4>(
                        &mut m, base, w, run.codes, row, b0, b, cb, channels, heads, h,
                    ),
                }
                h += 4;
            }
            let s = _mm256_set1_ps(scale);
            _mm256_storeu_ps(o.as_mut_ptr().add(b * FIXED), _mm256_mul_ps(m[0], s));
            _mm256_storeu_ps(o.as_mut_ptr().add(b * FIXED + 8), _mm256_mul_ps(m[1], s));
        }
    }
}

/// Heads `h..h + NH` of block `b` of [`blocks16`], folded into the running
/// maximum `m`.
///
/// # Safety
/// As for [`blocks16`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn group16<const NH: usize>(
    m: &mut [std::arch::x86_64::__m256; 2],
    base: &[f32],
    w: &[f32],
    codes: &[u8],
    row: usize,
    b0: usize,
    b: usize,
    cb: usize,
    channels: &[u32],
    heads: usize,
    h: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: per the caller's contract.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; NH];
        for (i, a) in acc.iter_mut().enumerate() {
            let v = _mm256_set1_ps(*base.get_unchecked((h + i) * cb + b));
            *a = [v, v];
        }
        let wp = w.as_ptr();
        for (j, &c) in channels.iter().enumerate() {
            let p = codes.as_ptr().add(c as usize * row + (b0 + b) * FIXED);
            let x0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)));
            let x1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                p.add(8) as *const __m128i
            )));
            for (i, a) in acc.iter_mut().enumerate() {
                let wv = _mm256_set1_ps(*wp.add((j * heads + h + i) * cb + b));
                a[0] = _mm256_fmadd_ps(wv, x0, a[0]);
                a[1] = _mm256_fmadd_ps(wv, x1, a[1]);
            }
        }
        for a in &acc {
            // `if a > m { a } else { m }`, lane by lane.
            m[0] = _mm256_max_ps(a[0], m[0]);
            m[1] = _mm256_max_ps(a[1], m[1]);
        }
    }
}

/// The sums of a chunk: `acc[h][b][t] = base[h][b] + sum_j w[j][h][b] *
/// code_j[b][t]`, channels in order. `T`: the block's tokens when fixed at
/// compile time ([`FIXED`], multiply-adds fused when `FMA`, as the
/// per-block 16-token path does), 0 for any (plain multiply and add, as its
/// general path does).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn chunk_sums<const FMA: bool, const T: usize>(
    acc: &mut [f32],
    base: &[f32],
    w: &[f32],
    row: &mut Vec<f32>,
    run: &SketchRun<'_>,
    b0: usize,
    cb: usize,
    channels: &[u32],
    heads: usize,
) {
    let (tpb, cap) = (run.tpb, run.cap);
    let toks = cb * tpb;
    for h in 0..heads {
        for b in 0..cb {
            acc[h * toks + b * tpb..h * toks + (b + 1) * tpb].fill(base[h * cb + b]);
        }
    }
    row.resize(toks, 0.0);
    for (j, &c) in channels.iter().enumerate() {
        let at = c as usize * cap * tpb + b0 * tpb;
        for (xv, &v) in row.iter_mut().zip(&run.codes[at..at + toks]) {
            *xv = v as f32;
        }
        let w = &w[j * heads * cb..(j + 1) * heads * cb];
        for h in 0..heads {
            let a = &mut acc[h * toks..(h + 1) * toks];
            let wh = &w[h * cb..(h + 1) * cb];
            if T > 0 {
                for ((ab, xb), &wb) in a.chunks_exact_mut(T).zip(row.chunks_exact(T)).zip(wh) {
                    let ab: &mut [f32; T] = ab.try_into().expect("T tokens");
                    let xb: &[f32; T] = xb.try_into().expect("T tokens");
                    for t in 0..T {
                        ab[t] = simd::fmadd::<FMA>(wb, xb[t], ab[t]);
                    }
                }
            } else {
                for ((ab, xb), &wb) in a.chunks_exact_mut(tpb).zip(row.chunks_exact(tpb)).zip(wh) {
                    for (av, &xv) in ab.iter_mut().zip(xb) {
                        *av += wb * xv;
                    }
                }
            }
        }
    }
}

/// Scratch for [`run_upper_bounds`], reused across calls.
#[derive(Debug, Clone, Default)]
pub struct RunBoundScratch {
    /// `[heads][BOUND_CHUNK]` sums, and one channel's boxes of the chunk
    /// (`[2][BOUND_CHUNK]`).
    sum: Vec<f32>,
    x: Vec<f32>,
}

/// Blocks per pass of [`run_upper_bounds`] (at 4 heads the sums are 16
/// KiB, in L1; each channel's boxes are two 2 KiB stretches, which the
/// hardware prefetcher follows: shorter stretches left it behind).
const BOUND_CHUNK: usize = 1024;

/// LeoAM's upper bound `UB_b(q_h) = sum_i max(q_h,i * hi_i, q_h,i * lo_i)`
/// of blocks `blocks` of `run` from their boxes (every channel, summed in
/// channel order), into `out` (`[heads][blocks.len()]`). Each block's sum
/// is the same operations in the same order whatever the run's capacity,
/// so one block's box viewed as a run of capacity 1 (its `[d]` f16 rows)
/// gives bit for bit what a long run gives for it. (The same bound as
/// [`crate::abstracts::upper_bounds`], which sums in eight lanes: equal to
/// rounding.) SparF's two-stage ranking takes its candidate blocks by this
/// bound: every channel counts, so a key that stands out in many channels
/// (a needle) raises its block's bound even where `|q|`'s top channels
/// miss it.
pub fn run_upper_bounds(
    q: &[f32],
    heads: usize,
    d: usize,
    run: &SketchRun<'_>,
    blocks: std::ops::Range<usize>,
    scratch: &mut RunBoundScratch,
    out: &mut [f32],
) {
    assert_eq!(q.len(), heads * d, "run bounds: q is not [heads][d]");
    assert!(blocks.end <= run.cap, "run bounds: blocks beyond the run");
    assert!(
        run.lo.len() >= d * run.cap && run.hi.len() >= d * run.cap,
        "run bounds: rows shorter than [d][cap]"
    );
    assert_eq!(
        out.len(),
        heads * blocks.len(),
        "run bounds: out is not [heads][blocks]"
    );
    let sc = scratch;
    sc.sum.resize(heads * BOUND_CHUNK, 0.0);
    sc.x.resize(2 * BOUND_CHUNK, 0.0);
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        unsafe { run_upper_bounds_avx2(q, heads, d, run, blocks, sc, out) };
        return;
    }
    run_upper_bounds_impl::<false>(q, heads, d, run, blocks, sc, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_upper_bounds_avx2(
    q: &[f32],
    heads: usize,
    d: usize,
    run: &SketchRun<'_>,
    blocks: std::ops::Range<usize>,
    sc: &mut RunBoundScratch,
    out: &mut [f32],
) {
    run_upper_bounds_impl::<true>(q, heads, d, run, blocks, sc, out);
}

/// The sums over a chunk of blocks, channel by channel: one channel's
/// boxes converted once and added to every head's sums (a plain loop over
/// slices that LLVM vectorises; products rounded apart, never fused, as
/// `max` needs them).
#[inline(always)]
fn run_upper_bounds_impl<const FAST: bool>(
    q: &[f32],
    heads: usize,
    d: usize,
    run: &SketchRun<'_>,
    blocks: std::ops::Range<usize>,
    sc: &mut RunBoundScratch,
    out: &mut [f32],
) {
    let (cap, nb) = (run.cap, blocks.len());
    // SAFETY: f16 is a u16 bit pattern of the same size.
    let as_f16 =
        |b: &[u16]| unsafe { std::slice::from_raw_parts(b.as_ptr() as *const half::f16, b.len()) };
    let mut b0 = blocks.start;
    while b0 < blocks.end {
        let cb = BOUND_CHUNK.min(blocks.end - b0);
        sc.sum[..heads * BOUND_CHUNK].fill(0.0);
        let (lo, hi) = sc.x.split_at_mut(BOUND_CHUNK);
        let (lo, hi) = (&mut lo[..cb], &mut hi[..cb]);
        for c in 0..d {
            let at = c * cap + b0;
            simd::widen::<half::f16, FAST>(as_f16(&run.lo[at..at + cb]), lo);
            simd::widen::<half::f16, FAST>(as_f16(&run.hi[at..at + cb]), hi);
            for (h, acc) in sc.sum.chunks_exact_mut(BOUND_CHUNK).take(heads).enumerate() {
                let qc = q[h * d + c];
                for ((a, &l), &u) in acc[..cb].iter_mut().zip(lo.iter()).zip(hi.iter()) {
                    let (x, y) = (qc * u, qc * l);
                    *a += if x > y { x } else { y };
                }
            }
        }
        for h in 0..heads {
            out[h * nb + (b0 - blocks.start)..][..cb]
                .copy_from_slice(&sc.sum[h * BOUND_CHUNK..h * BOUND_CHUNK + cb]);
        }
        b0 += cb;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparf::{
        SparfScratch, sparf_scores_head, sparf_scores_head_with_heads, top_channels,
    };
    use crate::testing::Rng;
    use half::f16;

    /// Box of KV head `head` of `k` (`[n][kv][d]`), as the store keeps it:
    /// f16 bounds rounded outward.
    fn bounds(k: &[f16], kv: usize, head: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
        let n = k.len() / (kv * d);
        let (mut lo, mut hi) = (vec![f32::INFINITY; d], vec![f32::NEG_INFINITY; d]);
        for t in 0..n {
            for i in 0..d {
                let x = k[(t * kv + head) * d + i].to_f32();
                lo[i] = lo[i].min(x);
                hi[i] = hi[i].max(x);
            }
        }
        (lo, hi)
    }

    /// Every decoded key is within half a step of the key, and the scores
    /// are within the bound that implies of the exact channel scores.
    #[test]
    fn scores_are_within_half_a_step_of_the_exact_ones() {
        // 13 tokens: the general path; 16: the unrolled one.
        for n in [13, 16] {
            within_half_a_step(n);
        }
    }

    fn within_half_a_step(n: usize) {
        let (heads, kv, d, stride) = (4, 2, 64, 16);
        let mut rng = Rng::new(7);
        let k: Vec<f16> = rng.normal_kv(n * kv * d, 2.0);
        let q = rng.normal_vec(heads * d, 1.0);
        let mut sc = SparfScratch::new(heads, d, 0);
        let mut channels = vec![0u32; 8];
        top_channels(&q, heads, d, &mut sc, &mut channels);
        for head in 0..kv {
            let (lo, hi) = bounds(&k, kv, head, d);
            let mut codes = vec![0xAAu8; d * stride];
            let mut row = vec![0f32; d];
            encode(&k, kv, head, d, &lo, &hi, stride, &mut row, &mut codes);
            for t in 0..n {
                for i in 0..d {
                    let x = k[(t * kv + head) * d + i].to_f32();
                    let dec = lo[i] + step(lo[i], hi[i]) * codes[i * stride + t] as f32;
                    let tol = step(lo[i], hi[i]) * 0.5 * (1.0 + 1e-4) + 1e-6;
                    assert!((dec - x).abs() <= tol, "t {t} i {i}: {dec} vs {x}");
                }
            }
            // Slots past n are not written.
            assert!((n..stride).all(|t| codes[t] == 0xAA));
            let scale = 0.125;
            let mut exact = vec![0f32; n];
            sparf_scores_head(
                &q, heads, d, &k, kv, head, &channels, scale, &mut sc, &mut exact,
            );
            let mut got = vec![0f32; n];
            let clo: Vec<f32> = channels.iter().map(|&c| lo[c as usize]).collect();
            let chi: Vec<f32> = channels.iter().map(|&c| hi[c as usize]).collect();
            let s = Sketch {
                codes: &codes,
                stride,
                n,
                lo: &clo,
                hi: &chi,
            };
            let mut acc = SketchScratch::new();
            assert!(sketch_scores(
                &q, heads, d, &s, &channels, scale, &mut acc, &mut got
            ));
            // Per head the error is at most sum_i |q_h,i| * step_i / 2; the
            // max over heads moves by at most the largest of those.
            let bound = (0..heads)
                .map(|h| {
                    channels
                        .iter()
                        .map(|&c| {
                            let c = c as usize;
                            q[h * d + c].abs() * step(lo[c], hi[c]) * 0.5
                        })
                        .sum::<f32>()
                })
                .fold(0f32, f32::max)
                * scale;
            for t in 0..n {
                assert!(
                    (got[t] - exact[t]).abs() <= bound * 1.001 + 1e-5,
                    "t {t}: {} vs {} (bound {bound})",
                    got[t],
                    exact[t]
                );
            }
            // Each head's own scores: within that head's bound of its exact
            // channel scores, and their max is the group score, bit for bit.
            let (mut each, mut exact_each) = (vec![0f32; heads * n], vec![0f32; heads * n]);
            let mut again = vec![0f32; n];
            assert!(sketch_scores_with_heads(
                &q,
                heads,
                d,
                &s,
                &channels,
                scale,
                &mut acc,
                &mut again,
                HeadScores {
                    out: &mut each,
                    pitch: n,
                },
            ));
            assert_eq!(again, got);
            sparf_scores_head_with_heads(
                &q,
                heads,
                d,
                &k,
                kv,
                head,
                &channels,
                scale,
                &mut sc,
                &mut exact,
                HeadScores {
                    out: &mut exact_each,
                    pitch: n,
                },
            );
            for h in 0..heads {
                let bound_h = channels
                    .iter()
                    .map(|&c| {
                        q[h * d + c as usize].abs() * step(lo[c as usize], hi[c as usize]) * 0.5
                    })
                    .sum::<f32>()
                    * scale;
                for t in 0..n {
                    let (a, b) = (each[h * n + t], exact_each[h * n + t]);
                    assert!(
                        (a - b).abs() <= bound_h * 1.001 + 1e-5,
                        "head {h} t {t}: {a} vs {b}"
                    );
                }
            }
            for t in 0..n {
                let m = (0..heads).map(|h| each[h * n + t]).fold(f32::MIN, f32::max);
                assert_eq!(m, got[t], "t {t}");
            }
            // A wrong code moves the score: the test can fail.
            codes[channels[0] as usize * stride] ^= 0x80;
            let s = Sketch {
                codes: &codes,
                stride,
                n,
                lo: &clo,
                hi: &chi,
            };
            let mut moved = vec![0f32; n];
            sketch_scores(&q, heads, d, &s, &channels, scale, &mut acc, &mut moved);
            assert_ne!(moved[0], got[0]);
        }
    }

    /// A run's upper bounds are bit for bit those of each block's box
    /// alone (a run of capacity 1, as the daemon scores blocks outside a
    /// run), within rounding of `upper_bounds`: chunk boundaries crossed
    /// (more blocks than a chunk), a sub-range of blocks, d not a multiple
    /// of 8; and a changed bound moves the result (the test can fail).
    #[test]
    fn run_upper_bounds_equal_each_blocks_bounds() {
        use crate::abstracts::{AbstractScratch, upper_bounds};
        for (d, blocks, heads) in [(32, 300, 4), (13, 40, 3), (4, 3, 1), (128, 70, 2)] {
            let cap = blocks + 5;
            let mut rng = Rng::new(d as u64 * 31 + blocks as u64);
            let q = rng.normal_vec(heads * d, 1.0);
            let lo: Vec<f16> = rng.normal_kv(cap * d, 1.0);
            let hi: Vec<f16> = lo
                .iter()
                .zip(rng.normal_vec(cap * d, 1.0))
                .map(|(l, w)| f16::from_f32(l.to_f32() + w.abs()))
                .collect();
            // Channel-major, as a run keeps them.
            let (mut lo16, mut hi16) = (vec![0u16; d * cap], vec![0u16; d * cap]);
            for b in 0..cap {
                for i in 0..d {
                    lo16[i * cap + b] = lo[b * d + i].to_bits();
                    hi16[i * cap + b] = hi[b * d + i].to_bits();
                }
            }
            let run = SketchRun {
                codes: &[],
                lo: &lo16,
                hi: &hi16,
                cap,
                tpb: 16,
            };
            let mut rs = RunBoundScratch::default();
            let mut scratch = AbstractScratch::new(d);
            for range in [0..blocks, 1..blocks.min(35)] {
                let nb = range.len();
                let mut got = vec![0f32; heads * nb];
                run_upper_bounds(&q, heads, d, &run, range.clone(), &mut rs, &mut got);
                for b in range.clone() {
                    let (l, u): (Vec<u16>, Vec<u16>) = (
                        lo[b * d..(b + 1) * d].iter().map(|x| x.to_bits()).collect(),
                        hi[b * d..(b + 1) * d].iter().map(|x| x.to_bits()).collect(),
                    );
                    let one = SketchRun {
                        codes: &[],
                        lo: &l,
                        hi: &u,
                        cap: 1,
                        tpb: 16,
                    };
                    let mut alone = vec![0f32; heads];
                    run_upper_bounds(&q, heads, d, &one, 0..1, &mut rs, &mut alone);
                    let mut lanes = vec![0f32; heads];
                    upper_bounds(
                        &q,
                        heads,
                        d,
                        &lo[b * d..(b + 1) * d],
                        &hi[b * d..(b + 1) * d],
                        &mut scratch,
                        &mut lanes,
                    );
                    for h in 0..heads {
                        let g = got[h * nb + b - range.start];
                        assert_eq!(g.to_bits(), alone[h].to_bits(), "d {d} block {b} head {h}");
                        assert!(
                            (g - lanes[h]).abs() <= 1e-4 * (1.0 + lanes[h].abs()),
                            "d {d} block {b} head {h}: {g} vs {}",
                            lanes[h]
                        );
                    }
                }
            }
            let mut was = vec![0f32; heads * blocks];
            run_upper_bounds(&q, heads, d, &run, 0..blocks, &mut rs, &mut was);
            hi16[(d - 1) * cap] = f16::from_f32(1e4).to_bits();
            lo16[(d - 1) * cap] = f16::from_f32(-1e4).to_bits();
            let mut moved = vec![0f32; heads * blocks];
            let run = SketchRun {
                codes: &[],
                lo: &lo16,
                hi: &hi16,
                cap,
                tpb: 16,
            };
            run_upper_bounds(&q, heads, d, &run, 0..blocks, &mut rs, &mut moved);
            assert!((0..heads).any(|h| moved[h * blocks] != was[h * blocks]));
        }
    }

    /// A constant channel (empty box) decodes exactly; a non-finite box
    /// among the chosen channels is refused.
    /// A run (channel-major over blocks) scores every block bit for bit as
    /// `sketch_scores` does block by block: 16-token blocks (the fused
    /// path) and 8-token ones (the general path), chunk boundaries crossed,
    /// a sub-range of blocks, repeated channels.
    #[test]
    fn run_scores_equal_block_by_block_scores() {
        for (tpb, blocks, heads) in [(16, 77, 4), (8, 40, 3), (16, 3, 1), (16, 50, 6)] {
            let (d, cap) = (32, blocks + 5);
            let mut rng = Rng::new(tpb as u64 + blocks as u64);
            let q = rng.normal_vec(heads * d, 1.0);
            let channels = [3u32, 17, 0, 31, 17, 9];
            let mut codes = vec![0u8; d * cap * tpb];
            let (mut lo16, mut hi16) = (vec![0u16; d * cap], vec![0u16; d * cap]);
            let mut per_block = Vec::new();
            for b in 0..blocks {
                let k: Vec<f16> = rng.normal_kv(tpb * d, 1.0 + b as f64 * 0.1);
                let (lo, hi) = bounds(&k, 1, 0, d);
                // As the store keeps them: f16, rounded outward.
                let lo: Vec<f32> = lo
                    .iter()
                    .map(|&x| crate::elem::f16_round_down(x).to_f32())
                    .collect();
                let hi: Vec<f32> = hi
                    .iter()
                    .map(|&x| crate::elem::f16_round_up(x).to_f32())
                    .collect();
                let mut c = vec![0u8; d * tpb];
                let mut row = vec![0f32; d];
                encode(&k, 1, 0, d, &lo, &hi, tpb, &mut row, &mut c);
                for i in 0..d {
                    codes[i * cap * tpb + b * tpb..][..tpb]
                        .copy_from_slice(&c[i * tpb..(i + 1) * tpb]);
                    lo16[i * cap + b] = f16::from_f32(lo[i]).to_bits();
                    hi16[i * cap + b] = f16::from_f32(hi[i]).to_bits();
                }
                per_block.push((c, lo, hi));
            }
            let run = SketchRun {
                codes: &codes,
                lo: &lo16,
                hi: &hi16,
                cap,
                tpb,
            };
            let mut rs = RunScratch::default();
            for range in [0..blocks, 1..blocks.min(35)] {
                let mut got = vec![0f32; range.len() * tpb];
                run_scores(
                    &q,
                    heads,
                    d,
                    &run,
                    range.clone(),
                    &channels,
                    0.3,
                    &mut rs,
                    &mut got,
                );
                let mut acc = SketchScratch::new();
                for b in range.clone() {
                    let (c, lo, hi) = &per_block[b];
                    let clo: Vec<f32> = channels.iter().map(|&ch| lo[ch as usize]).collect();
                    let chi: Vec<f32> = channels.iter().map(|&ch| hi[ch as usize]).collect();
                    let s = Sketch {
                        codes: c,
                        stride: tpb,
                        n: tpb,
                        lo: &clo,
                        hi: &chi,
                    };
                    let mut want = vec![0f32; tpb];
                    assert!(sketch_scores(
                        &q, heads, d, &s, &channels, 0.3, &mut acc, &mut want
                    ));
                    let at = (b - range.start) * tpb;
                    for t in 0..tpb {
                        assert_eq!(
                            got[at + t].to_bits(),
                            want[t].to_bits(),
                            "tpb {tpb} block {b} token {t}: {} vs {}",
                            got[at + t],
                            want[t]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn flat_and_non_finite_channels() {
        let d = 4;
        let k: Vec<f32> = vec![1.0, 2.0, 3.0, -1.0, 1.0, 5.0, 3.0, -2.0];
        let (lo, hi) = (vec![1.0, 2.0, 3.0, -2.0], vec![1.0, 5.0, 3.0, -1.0]);
        let mut codes = vec![0u8; d * 2];
        let mut row = vec![0f32; d];
        encode(&k, 1, 0, d, &lo, &hi, 2, &mut row, &mut codes);
        assert_eq!(codes, vec![0, 0, 0, 255, 0, 0, 255, 0]);
        let q = vec![1.0, 1.0, 1.0, 1.0];
        let s = Sketch {
            codes: &codes,
            stride: 2,
            n: 2,
            lo: &lo,
            hi: &hi,
        };
        let mut out = vec![0f32; 2];
        assert!(sketch_scores(
            &q,
            1,
            d,
            &s,
            &[0, 1, 2, 3],
            1.0,
            &mut SketchScratch::new(),
            &mut out
        ));
        assert!(
            (out[0] - 5.0).abs() < 1e-5 && (out[1] - 7.0).abs() < 1e-5,
            "{out:?}"
        );
        // The box of a chosen channel is not finite: refused.
        let s1 = Sketch {
            lo: &[2.0],
            hi: &[f32::INFINITY],
            ..s
        };
        let mut sc = SketchScratch::new();
        assert!(!sketch_scores(&q, 1, d, &s1, &[1], 1.0, &mut sc, &mut out));
        // Flat channels decode to their value.
        let s2 = Sketch {
            lo: &[1.0, 3.0],
            hi: &[1.0, 3.0],
            ..s
        };
        assert!(sketch_scores(
            &q,
            1,
            d,
            &s2,
            &[0, 2],
            1.0,
            &mut sc,
            &mut out
        ));
        assert_eq!(out, vec![4.0, 4.0]);
    }

    /// add_rows: per-channel sums of the rows, in order, for each type.
    #[test]
    fn add_rows_sums_each_channel() {
        let mut rng = Rng::new(5);
        let (n, w) = (13, 40);
        let x: Vec<f16> = rng.normal_kv(n * w, 3.0);
        let mut acc = vec![1.0f32; w];
        let mut row = vec![0f32; w];
        add_rows(&x, &mut acc, &mut row);
        for c in 0..w {
            let mut want = 1.0f32;
            for t in 0..n {
                want += x[t * w + c].to_f32();
            }
            assert_eq!(acc[c], want, "channel {c}");
        }
        let y: Vec<f32> = (0..2 * w).map(|i| i as f32).collect();
        let mut acc = vec![0f32; w];
        add_rows(&y, &mut acc, &mut row);
        assert!((0..w).all(|c| acc[c] == (2 * c + w) as f32));
    }

    /// span_lse against f64, with an empty span and a span of -inf.
    #[test]
    fn span_lse_matches_f64() {
        let mut rng = Rng::new(3);
        let mut x = rng.normal_vec(100, 4.0);
        x[90..95].fill(f32::NEG_INFINITY);
        let spans = [(0, 16), (16, 1), (17, 40), (57, 0), (90, 5), (80, 15)];
        let mut out = vec![0f32; spans.len()];
        span_lse(&x, &spans, &mut out);
        for (o, &(a, n)) in out.iter().zip(&spans) {
            let v: Vec<f64> = x[a..a + n].iter().map(|&y| y as f64).collect();
            let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if m == f64::NEG_INFINITY {
                assert_eq!(*o, f32::NEG_INFINITY);
                continue;
            }
            let want = m + v.iter().map(|y| (y - m).exp()).sum::<f64>().ln();
            assert!(
                (*o as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{o} vs {want}"
            );
        }
    }
}

//! SparF: SparQ's channel-subset scoring adapted to storage (InstInfer).
//!
//! For the `heads` query heads of one GQA group (`q [heads][d]`) over `n`
//! tokens of one KV head:
//!
//! 1. [`top_channels`]: the `r` channels with the largest `sum_h |q_h,i|`
//!    (for one head, the top-r of `|q|`), ties to the lower channel, best
//!    first. One channel set per group, so that each chosen row of the
//!    dim-major K is read once for all heads.
//! 2. [`sparf_scores`]: from `K` stored **dim-major**, `Kt [d][n]` (row `i`
//!    holds channel `i` of every token, so the `r` rows read are
//!    contiguous), the approximate logit of each token for the group:
//!    `score[t] = scale * max_h sum_{i in R} q_h,i * Kt[i][t]`
//!    (accumulated in f32 in the order of `channels`). A token that matters
//!    to any head of the group ranks high.
//! 3. [`topk::top_k`] of the scores (k tokens), sorted back into token
//!    order, then exact [`partial_attention`] over those rows of the
//!    token-major `K`, `V` `[n][d]`: a definite token set, so the result
//!    is an ordinary mergeable `(o, lse)`. [`sparf_attention`] chains the
//!    three.
//!
//! COMPUTE.md defaults: `r = d/8`, `k = n/16`.
//!
//! SparQ's optional mean-value correction ("reallocation to the mean
//! value") estimates, per query head, the softmax mass `alpha` of the
//! chosen tokens from the r-channel scores at a corrected temperature
//! ([`score_temperature`], [`chosen_mass`]) and gives the rest of the mass
//! to the mean value: `o = alpha * o_chosen + (1 - alpha) * mean(V)`
//! ([`mean_correct`]). The result estimates attention over *every* token;
//! it is no longer a partial over the chosen set, so it cannot be merged
//! exactly with anything.

use crate::attention::{AttnParams, AttnScratch, Tokens, partial_attention};
use crate::elem::KvElem;
use crate::simd;
use crate::topk;

/// Tokens scored per block: the block's `[heads][BLOCK]` sums (8 KiB at
/// 8 heads) stay in L1 while the `r` channel rows stream through.
const BLOCK: usize = 256;

/// Shape of one SparF call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparfParams {
    pub heads: usize,
    pub d: usize,
    /// Channels scored (COMPUTE.md: `d / 8`).
    pub r: usize,
    /// Tokens attended (COMPUTE.md: `n / 16`).
    pub k: usize,
    /// Softmax scale, usually `1/sqrt(d)`.
    pub scale: f32,
}

/// Scratch for the SparF kernels, made once for the largest call.
#[derive(Debug, Clone)]
pub struct SparfScratch {
    heads_max: usize,
    d_max: usize,
    n_max: usize,
    weight: Vec<f32>,
    weight_top: Vec<f32>,
    channels: Vec<u32>,
    row: Vec<f32>,
    /// Gathered channel rows of one block of tokens (`[r][BLOCK]` values
    /// of the storage type; u32 so that any of them fits and aligns).
    gather: Vec<u32>,
    acc: Vec<f32>,
    scores: Vec<f32>,
    top_vals: Vec<f32>,
    attn: AttnScratch,
}

impl SparfScratch {
    pub fn new(heads_max: usize, d_max: usize, n_max: usize) -> Self {
        Self {
            heads_max,
            d_max,
            n_max,
            weight: vec![0.0; d_max],
            weight_top: vec![0.0; d_max],
            channels: vec![0; d_max],
            row: vec![0.0; BLOCK],
            gather: Vec::new(),
            acc: vec![0.0; heads_max * BLOCK],
            scores: vec![0.0; n_max],
            top_vals: vec![0.0; n_max],
            attn: AttnScratch::new(heads_max, d_max),
        }
    }

    /// The scores of the last [`sparf_attention`] call (`[n]`).
    pub fn scores(&self, n: usize) -> &[f32] {
        &self.scores[..n]
    }
}

/// Writes the `channels.len()` best channels of `q [heads][d]` (by
/// `sum_h |q_h,i|`, best first, ties to the lower channel).
pub fn top_channels(
    q: &[f32],
    heads: usize,
    d: usize,
    scratch: &mut SparfScratch,
    channels: &mut [u32],
) {
    let r = channels.len();
    assert!(
        r <= d && d <= scratch.d_max,
        "sparf: r {r} > d {d} or d too large"
    );
    assert_eq!(q.len(), heads * d, "sparf: q is not [heads][d]");
    let w = &mut scratch.weight[..d];
    w.fill(0.0);
    for qh in q.chunks_exact(d) {
        for (a, b) in w.iter_mut().zip(qh) {
            *a += b.abs();
        }
    }
    let got = topk::top_k(w, r, channels, &mut scratch.weight_top[..r]);
    assert_eq!(got, r, "sparf: NaN in q");
}

/// Where a scorer also writes each query head's own scores (before the max
/// over the group): head `h`'s score of token `t` of the call at
/// `out[h * pitch + t]`. A caller keeping `[heads][total]` scores of a
/// sequence passes its rows from the block's first token with `pitch =
/// total`.
#[derive(Debug)]
pub struct HeadScores<'a> {
    pub out: &'a mut [f32],
    pub pitch: usize,
}

impl HeadScores<'_> {
    /// Panics unless `heads` rows of `n` scores fit.
    pub(crate) fn check(&self, heads: usize, n: usize) {
        assert!(
            n <= self.pitch && (heads == 0 || (heads - 1) * self.pitch + n <= self.out.len()),
            "head scores: {heads} rows of {n} at pitch {} do not fit in {}",
            self.pitch,
            self.out.len()
        );
    }

    /// Head `h`'s scores of tokens `start..start + len`.
    #[inline(always)]
    pub(crate) fn row(&mut self, h: usize, start: usize, len: usize) -> &mut [f32] {
        let at = h * self.pitch + start;
        &mut self.out[at..at + len]
    }
}

/// Where the scored keys are.
#[derive(Clone, Copy)]
enum Src<'a, E> {
    /// `kt [d][n]`.
    DimMajor(&'a [E]),
    /// Token `t`'s key at `k[off + t * pitch..][..d]` (token-major, e.g.
    /// one KV head of `[n][kv_heads][d]`).
    Rows {
        k: &'a [E],
        pitch: usize,
        off: usize,
    },
}

/// Approximate group scores of all `n` tokens from the dim-major `kt`
/// (`[d][n]`) on `channels`: `out[t] = scale * max_h sum_{i in channels}
/// q_h,i * kt[i][t]` (`out` is `[n]`).
#[allow(clippy::too_many_arguments)]
pub fn sparf_scores<E: KvElem>(
    q: &[f32],
    heads: usize,
    d: usize,
    kt: &[E],
    channels: &[u32],
    scale: f32,
    scratch: &mut SparfScratch,
    out: &mut [f32],
) {
    assert_eq!(kt.len() % d, 0, "sparf: Kt is not [d][n]");
    let n = kt.len() / d;
    scores_checked(
        q,
        heads,
        d,
        n,
        Src::DimMajor(kt),
        channels,
        scale,
        scratch,
        out,
        None,
    );
}

/// [`sparf_scores`] from token-major keys: KV head `head` of `k`
/// (`[n][kv_heads][d]`), the `r` channels of each token gathered as its
/// row is read (no dim-major copy, no transposition). Same results, bit
/// for bit.
#[allow(clippy::too_many_arguments)]
pub fn sparf_scores_head<E: KvElem>(
    q: &[f32],
    heads: usize,
    d: usize,
    k: &[E],
    kv_heads: usize,
    head: usize,
    channels: &[u32],
    scale: f32,
    scratch: &mut SparfScratch,
    out: &mut [f32],
) {
    scores_of_head(
        q, heads, d, k, kv_heads, head, channels, scale, scratch, out, None,
    );
}

/// [`sparf_scores_head`], and each query head's own score (before the max
/// over the group) into `each` (for [`chosen_mass`]).
#[allow(clippy::too_many_arguments)]
pub fn sparf_scores_head_with_heads<E: KvElem>(
    q: &[f32],
    heads: usize,
    d: usize,
    k: &[E],
    kv_heads: usize,
    head: usize,
    channels: &[u32],
    scale: f32,
    scratch: &mut SparfScratch,
    out: &mut [f32],
    each: HeadScores<'_>,
) {
    scores_of_head(
        q,
        heads,
        d,
        k,
        kv_heads,
        head,
        channels,
        scale,
        scratch,
        out,
        Some(each),
    );
}

/// The token-major scoring of KV head `head` of `k` (`[n][kv_heads][d]`),
/// with or without each query head's own scores.
#[allow(clippy::too_many_arguments)]
fn scores_of_head<E: KvElem>(
    q: &[f32],
    heads: usize,
    d: usize,
    k: &[E],
    kv_heads: usize,
    head: usize,
    channels: &[u32],
    scale: f32,
    scratch: &mut SparfScratch,
    out: &mut [f32],
    each: Option<HeadScores<'_>>,
) {
    assert!(
        kv_heads > 0 && head < kv_heads,
        "sparf: head {head} of {kv_heads}"
    );
    let pitch = kv_heads * d;
    assert!(
        d > 0 && k.len().is_multiple_of(pitch),
        "sparf: K is not [n][kv_heads][d]"
    );
    let n = k.len() / pitch;
    let src = Src::Rows {
        k,
        pitch,
        off: head * d,
    };
    scores_checked(q, heads, d, n, src, channels, scale, scratch, out, each);
}

#[allow(clippy::too_many_arguments)]
fn scores_checked<E: KvElem>(
    q: &[f32],
    heads: usize,
    d: usize,
    n: usize,
    src: Src<'_, E>,
    channels: &[u32],
    scale: f32,
    scratch: &mut SparfScratch,
    out: &mut [f32],
    mut each: Option<HeadScores<'_>>,
) {
    assert!(heads > 0 && heads <= scratch.heads_max, "sparf: bad heads");
    assert_eq!(q.len(), heads * d, "sparf: q is not [heads][d]");
    assert_eq!(out.len(), n, "sparf: out is not [n]");
    if let Some(e) = &each {
        e.check(heads, n);
    }
    assert!(
        channels.iter().all(|&c| (c as usize) < d),
        "sparf: channel out of range"
    );
    if let Src::Rows { .. } = src {
        let need = channels.len() * BLOCK;
        if scratch.gather.len() < need {
            scratch.gather.resize(need, 0);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe {
            scores_avx2(
                q,
                heads,
                d,
                n,
                src,
                channels,
                scale,
                scratch,
                out,
                each.as_mut(),
            )
        };
        return;
    }
    scores_impl::<E, false>(
        q,
        heads,
        d,
        n,
        src,
        channels,
        scale,
        scratch,
        out,
        each.as_mut(),
    );
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_avx2<E: KvElem>(
    q: &[f32],
    heads: usize,
    d: usize,
    n: usize,
    src: Src<'_, E>,
    channels: &[u32],
    scale: f32,
    scratch: &mut SparfScratch,
    out: &mut [f32],
    each: Option<&mut HeadScores<'_>>,
) {
    scores_impl::<E, true>(q, heads, d, n, src, channels, scale, scratch, out, each);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scores_impl<E: KvElem, const FMA: bool>(
    q: &[f32],
    heads: usize,
    d: usize,
    n: usize,
    src: Src<'_, E>,
    channels: &[u32],
    scale: f32,
    scratch: &mut SparfScratch,
    out: &mut [f32],
    mut each: Option<&mut HeadScores<'_>>,
) {
    let (row, acc) = (&mut scratch.row, &mut scratch.acc);
    // SAFETY: E is f32, f16 or bf16 (sealed): every bit pattern is a value,
    // and u32's alignment covers each.
    let (pre, gather, _) = unsafe { scratch.gather.align_to_mut::<E>() };
    debug_assert!(pre.is_empty());
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        let acc = &mut acc[..heads * BLOCK];
        for h in 0..heads {
            acc[h * BLOCK..h * BLOCK + len].fill(0.0);
        }
        if let Src::Rows { k, pitch, off } = src {
            // One visit per token row, its r channels to their rows.
            for j in 0..len {
                let r = &k[off + (start + j) * pitch..][..d];
                for (i, &c) in channels.iter().enumerate() {
                    gather[i * BLOCK + j] = r[c as usize];
                }
            }
        }
        for (i, &c) in channels.iter().enumerate() {
            let c = c as usize;
            let xs = match src {
                Src::DimMajor(kt) => &kt[c * n + start..c * n + start + len],
                Src::Rows { .. } => &gather[i * BLOCK..i * BLOCK + len],
            };
            let x = simd::as_f32::<E, FMA>(xs, row);
            for h in 0..heads {
                simd::axpy::<FMA>(&mut acc[h * BLOCK..h * BLOCK + len], q[h * d + c], x);
            }
        }
        if let Some(e) = each.as_deref_mut() {
            for h in 0..heads {
                let dst = e.row(h, start, len);
                dst.copy_from_slice(&acc[h * BLOCK..h * BLOCK + len]);
                simd::scale(dst, scale);
            }
        }
        let o = &mut out[start..start + len];
        o.copy_from_slice(&acc[..len]);
        for h in 1..heads {
            for (a, b) in o.iter_mut().zip(&acc[h * BLOCK..h * BLOCK + len]) {
                *a = a.max(*b);
            }
        }
        simd::scale(o, scale);
        start += len;
    }
}

/// SparF attention for one GQA group: channels, scores, the top `p.k`
/// tokens (written to `chosen`, in token order; the count is returned)
/// and exact `(o, lse)` over them from the token-major `k`, `v` (`[n][d]`);
/// `kt` is the same K dim-major (`[d][n]`).
#[allow(clippy::too_many_arguments)]
pub fn sparf_attention<E: KvElem>(
    p: &SparfParams,
    q: &[f32],
    kt: &[E],
    k: &[E],
    v: &[E],
    scratch: &mut SparfScratch,
    chosen: &mut [u32],
    o: &mut [f32],
    lse: &mut [f32],
) -> usize {
    let n = kt.len() / p.d;
    assert!(n <= scratch.n_max, "sparf: n {n} exceeds scratch");
    assert!(p.k <= chosen.len(), "sparf: chosen shorter than k");
    let r = p.r.min(p.d);
    let mut channels = std::mem::take(&mut scratch.channels);
    top_channels(q, p.heads, p.d, scratch, &mut channels[..r]);
    let mut scores = std::mem::take(&mut scratch.scores);
    sparf_scores(
        q,
        p.heads,
        p.d,
        kt,
        &channels[..r],
        p.scale,
        scratch,
        &mut scores[..n],
    );
    let count = topk::top_k(&scores[..n], p.k.min(n), chosen, &mut scratch.top_vals);
    scratch.channels = channels;
    scratch.scores = scores;
    let chosen = &mut chosen[..count];
    chosen.sort_unstable();
    let ap = AttnParams {
        heads: p.heads,
        d: p.d,
        scale: p.scale,
    };
    partial_attention(
        &ap,
        q,
        k,
        v,
        Tokens::Rows(chosen),
        &mut scratch.attn,
        o,
        lse,
    );
    count
}

/// SparQ's temperature for one query head's r-channel scores: the factor
/// `sqrt(|q|_1 / |q_R|_1)` (`q` is the head's `[d]` query, `R` the
/// `channels` scored) by which its `scale`-scaled scores are multiplied
/// before the softmax that estimates its attention. At `scale = 1/sqrt(d)`
/// the logits are then `q_R . k_R / sqrt(d * |q_R|_1 / |q|_1)`, as in
/// SparQ's algorithm: the r channels carry the fraction `|q_R|_1 / |q|_1`
/// of the query's L1 mass, and the scores' spread is taken to shrink with
/// it. 1 when either norm is 0 (the scores are then all equal anyway).
pub fn score_temperature(q: &[f32], channels: &[u32]) -> f32 {
    let all: f64 = q.iter().map(|x| x.abs() as f64).sum();
    let part: f64 = channels.iter().map(|&c| q[c as usize].abs() as f64).sum();
    if all > 0.0 && part > 0.0 {
        (all / part).sqrt() as f32
    } else {
        1.0
    }
}

/// SparQ's `alpha` for one query head: the estimated softmax mass of the
/// tokens `chosen` (indices into `scores`, each at most once) among all of
/// `scores` (the head's r-channel scores, `scale` applied), at temperature
/// factor `t` ([`score_temperature`]):
/// `sum_{c in chosen} exp(t s_c) / sum_i exp(t s_i)`, in [0, 1]. Scores of
/// `-inf` weigh nothing; 0 when nothing weighs anything. Exponentials in
/// f32 (within 3 ulp, after subtracting the maximum), sums in f64.
pub fn chosen_mass(scores: &[f32], chosen: &[u32], t: f32) -> f32 {
    assert!(t.is_finite() && t > 0.0, "chosen_mass: temperature {t}");
    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !m.is_finite() {
        return 0.0;
    }
    let w = |x: f32| simd::exp_approx((x - m) * t) as f64;
    let all: f64 = scores.iter().map(|&x| w(x)).sum();
    let part: f64 = chosen.iter().map(|&c| w(scores[c as usize])).sum();
    (part / all).clamp(0.0, 1.0) as f32
}

/// SparQ's reallocation to the mean value, for one query head:
/// `o <- alpha * o + (1 - alpha) * v_mean` (`o` the exact attention over
/// the chosen tokens, `v_mean` the mean of V over every token) and
/// `lse <- lse - ln(alpha)`: the log-sum-exp over every token that the
/// same estimate implies (the chosen tokens' exact sum divided by their
/// estimated share). With `alpha = 0` (no estimated weight on the chosen tokens) `o`
/// is the mean value and `lse` is left as it was; with `alpha = 1` nothing
/// changes.
pub fn mean_correct(o: &mut [f32], lse: &mut f32, alpha: f32, v_mean: &[f32]) {
    assert_eq!(o.len(), v_mean.len(), "mean_correct: o and v_mean differ");
    assert!((0.0..=1.0).contains(&alpha), "mean_correct: alpha {alpha}");
    if alpha == 1.0 {
        return;
    }
    for (x, &v) in o.iter_mut().zip(v_mean) {
        *x = alpha * *x + (1.0 - alpha) * v;
    }
    if alpha > 0.0 && *lse != f32::NEG_INFINITY {
        *lse -= alpha.ln();
    }
}

/// Writes `k` (`[n][d]`) dim-major into `kt` (`[d][n]`), in 32x32 blocks.
pub fn to_dim_major<E: KvElem>(k: &[E], d: usize, kt: &mut [E]) {
    assert!(
        d > 0 && k.len().is_multiple_of(d) && kt.len() == k.len(),
        "to_dim_major: bad shape"
    );
    const B: usize = 32;
    let n = k.len() / d;
    for t0 in (0..n).step_by(B) {
        for i0 in (0..d).step_by(B) {
            for t in t0..(t0 + B).min(n) {
                for i in i0..(i0 + B).min(d) {
                    kt[i * n + t] = k[t * d + i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, attention_f64, relerr};
    use half::f16;

    struct Case {
        n: usize,
        q: Vec<f32>,
        k: Vec<f16>,
        kt: Vec<f16>,
        v: Vec<f16>,
    }

    fn case(heads: usize, d: usize, n: usize, seed: u64) -> Case {
        let mut rng = Rng::new(seed);
        let q = rng.normal_vec(heads * d, 1.0);
        let k: Vec<f16> = rng.normal_kv(n * d, 1.0);
        let v: Vec<f16> = rng.normal_kv(n * d, 1.0);
        let mut kt = vec![f16::ZERO; n * d];
        to_dim_major(&k, d, &mut kt);
        Case { n, q, k, kt, v }
    }

    #[test]
    fn channels_are_the_largest_group_weights() {
        let c = case(4, 64, 1, 1);
        let mut s = SparfScratch::new(4, 64, 1);
        let mut ch = vec![0u32; 8];
        top_channels(&c.q, 4, 64, &mut s, &mut ch);
        let mut w: Vec<(f64, u32)> = (0..64)
            .map(|i| ((0..4).map(|h| c.q[h * 64 + i].abs() as f64).sum(), i as u32))
            .collect();
        w.sort_by(|a, b| b.0.partial_cmp(&a.0).expect("finite").then(a.1.cmp(&b.1)));
        let want: Vec<u32> = w[..8].iter().map(|x| x.1).collect();
        assert_eq!(ch, want);
    }

    /// Scores against f64 on the same channels: max error <= 1e-5 of the
    /// largest |score|.
    #[test]
    fn scores_match_f64() {
        let c = case(8, 128, 1000, 2);
        let channels: Vec<u32> = vec![
            5, 77, 3, 120, 64, 9, 100, 31, 0, 127, 42, 88, 17, 55, 66, 99,
        ];
        let mut s = SparfScratch::new(8, 128, 1000);
        let mut out = vec![0.0; c.n];
        sparf_scores(&c.q, 8, 128, &c.kt, &channels, 0.25, &mut s, &mut out);
        let want: Vec<f64> = (0..c.n)
            .map(|t| {
                (0..8)
                    .map(|h| {
                        channels
                            .iter()
                            .map(|&i| {
                                c.q[h * 128 + i as usize] as f64
                                    * c.k[t * 128 + i as usize].to_f64()
                            })
                            .sum::<f64>()
                    })
                    .fold(f64::NEG_INFINITY, f64::max)
                    * 0.25
            })
            .collect();
        let top = want.iter().fold(0.0f64, |a, b| a.max(b.abs()));
        for (g, w) in out.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 1e-5 * top, "{g} vs {w}");
        }
    }

    /// With every channel and every token, SparF is dense attention.
    #[test]
    fn full_budget_is_exact_attention() {
        let c = case(4, 32, 300, 3);
        let p = SparfParams {
            heads: 4,
            d: 32,
            r: 32,
            k: 300,
            scale: 1.0 / 32f32.sqrt(),
        };
        let mut s = SparfScratch::new(4, 32, 300);
        let (mut chosen, mut o, mut lse) = (vec![0; 300], vec![0.0; 4 * 32], vec![0.0; 4]);
        let got = sparf_attention(
            &p,
            &c.q,
            &c.kt,
            &c.k,
            &c.v,
            &mut s,
            &mut chosen,
            &mut o,
            &mut lse,
        );
        assert_eq!(got, 300);
        assert!(chosen.iter().enumerate().all(|(i, &t)| i as u32 == t));
        let wide = |x: &[f16]| x.iter().map(|a| a.to_f32()).collect::<Vec<_>>();
        let (o_ref, _) = attention_f64(4, 32, &c.q, &wide(&c.k), &wide(&c.v), &chosen);
        assert!(relerr(&o, &o_ref) < 2e-6);
    }

    /// The chosen set is the top-k of the scores, in token order, and the
    /// output is exact attention over it.
    #[test]
    fn attends_exactly_over_the_top_scored_tokens() {
        let c = case(8, 128, 2000, 4);
        let p = SparfParams {
            heads: 8,
            d: 128,
            r: 16,
            k: 125,
            scale: 1.0 / 128f32.sqrt(),
        };
        let mut s = SparfScratch::new(8, 128, 2000);
        let (mut chosen, mut o, mut lse) = (vec![0; 125], vec![0.0; 8 * 128], vec![0.0; 8]);
        let got = sparf_attention(
            &p,
            &c.q,
            &c.kt,
            &c.k,
            &c.v,
            &mut s,
            &mut chosen,
            &mut o,
            &mut lse,
        );
        assert_eq!(got, 125);
        assert!(chosen.windows(2).all(|w| w[0] < w[1]));
        let scores = s.scores(c.n).to_vec();
        let mut order: Vec<u32> = (0..c.n as u32).collect();
        order.sort_by(|a, b| {
            scores[*b as usize]
                .partial_cmp(&scores[*a as usize])
                .expect("finite")
                .then(a.cmp(b))
        });
        let mut want = order[..125].to_vec();
        want.sort_unstable();
        assert_eq!(chosen, want);
        let wide = |x: &[f16]| x.iter().map(|a| a.to_f32()).collect::<Vec<_>>();
        let (o_ref, _) = attention_f64(8, 128, &c.q, &wide(&c.k), &wide(&c.v), &chosen);
        assert!(relerr(&o, &o_ref) < 2e-6);
    }

    /// Sanity on skewed data (a few keys aligned with the query, heavy
    /// channels as real queries have): at r = d/8, k = n/16 the chosen set
    /// holds >= 90% of the softmax mass.
    #[test]
    fn captures_the_mass_of_skewed_attention() {
        let (d, n) = (128, 4096);
        let mut rng = Rng::new(6);
        let mut q = rng.normal_vec(d, 0.3);
        for i in 0..12 {
            q[i * 10] = if i.is_multiple_of(2) { 4.0 } else { -4.0 };
        }
        let mut k = rng.normal_vec(n * d, 1.0);
        for t in (0..n).step_by(41) {
            for i in 0..d {
                k[t * d + i] += q[i] * 0.8;
            }
        }
        let mut kt = vec![0.0; n * d];
        to_dim_major(&k, d, &mut kt);
        let p = SparfParams {
            heads: 1,
            d,
            r: d / 8,
            k: n / 16,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let mut s = SparfScratch::new(1, d, n);
        let (mut chosen, mut o, mut lse) = (vec![0; n / 16], vec![0.0; d], vec![0.0; 1]);
        sparf_attention(&p, &q, &kt, &k, &k, &mut s, &mut chosen, &mut o, &mut lse);
        let all: Vec<u32> = (0..n as u32).collect();
        let (_, lse_full) = attention_f64(1, d, &q, &k, &k, &all);
        let mass = (lse[0] as f64 - lse_full[0]).exp();
        assert!(mass >= 0.9, "mass {mass}");
    }

    #[test]
    fn token_major_scores_equal_dim_major_scores() {
        for (kv, heads, d, n, r) in [(3, 3, 64, 700, 8), (1, 4, 128, 300, 16), (2, 2, 24, 33, 5)] {
            let mut rng = Rng::new(kv as u64 * 31 + n as u64);
            let q = rng.normal_vec(heads * d, 1.0);
            let k: Vec<f16> = rng.normal_kv(n * kv * d, 1.0);
            let mut sc = SparfScratch::new(heads, d, n);
            let mut channels = vec![0u32; r];
            top_channels(&q, heads, d, &mut sc, &mut channels);
            for h in 0..kv {
                let head: Vec<f16> = (0..n)
                    .flat_map(|t| k[(t * kv + h) * d..(t * kv + h + 1) * d].to_vec())
                    .collect();
                let mut kt = vec![f16::ZERO; n * d];
                to_dim_major(&head, d, &mut kt);
                let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
                sparf_scores(&q, heads, d, &kt, &channels, 0.125, &mut sc, &mut a);
                sparf_scores_head(&q, heads, d, &k, kv, h, &channels, 0.125, &mut sc, &mut b);
                assert_eq!(a, b, "kv{kv} h{h} d{d}");
            }
        }
    }

    /// SparQ's mean-value correction from the kernels (per-head scores
    /// from token-major K, temperature, alpha, reallocation) against SparQ's
    /// algorithm in f64 on the same channels and chosen tokens: per query
    /// head, ŝ = softmax(q_R K_R^T / sqrt(d |q_R|_1 / |q|_1)), alpha = the sum
    /// of ŝ over the chosen tokens, o = alpha softmax(q K_C^T / sqrt(d)) V_C
    /// + (1 - alpha) mean(V), lse = lse_C - ln alpha.
    #[test]
    fn mean_correction_matches_sparq_in_f64() {
        let (heads, kv, d, n, r, top) = (4, 2, 64, 777, 8, 48);
        let mut rng = Rng::new(11);
        let q = rng.normal_vec(heads * d, 1.0);
        // [n][kv][d]: a broad background, and a few tokens aligned with
        // each head's query (strong, scattered keys).
        let mut kf = rng.normal_vec(n * kv * d, 0.5);
        let g = heads / kv;
        for (j, &t) in [40usize, 300, 301, 650].iter().enumerate() {
            let h = j / g;
            for i in 0..d {
                kf[(t * kv + h) * d + i] = q[j * d + i] * 0.6;
            }
        }
        let k: Vec<f16> = kf.iter().map(|&x| f16::from_f32(x)).collect();
        let v: Vec<f16> = rng.normal_kv(n * kv * d, 1.0);
        let scale = 1.0 / (d as f32).sqrt();
        let wide = |x: &[f16]| x.iter().map(|a| a.to_f32()).collect::<Vec<_>>();
        let (kw, vw) = (wide(&k), wide(&v));
        for h in 0..kv {
            let qg = &q[h * g * d..(h + 1) * g * d];
            let mut sc = SparfScratch::new(g, d, n);
            let mut channels = vec![0u32; r];
            top_channels(qg, g, d, &mut sc, &mut channels);
            let mut group = vec![0f32; n];
            let mut each = vec![f32::NAN; g * n];
            sparf_scores_head_with_heads(
                qg,
                g,
                d,
                &k,
                kv,
                h,
                &channels,
                scale,
                &mut sc,
                &mut group,
                HeadScores {
                    out: &mut each,
                    pitch: n,
                },
            );
            // The group score is the max of the heads' own, bit for bit.
            for t in 0..n {
                let m = (0..g).map(|j| each[j * n + t]).fold(f32::MIN, f32::max);
                assert_eq!(m, group[t], "t {t}");
            }
            let (mut chosen, mut vals) = (vec![0u32; top], vec![0f32; top]);
            assert_eq!(topk::top_k(&group, top, &mut chosen, &mut vals), top);
            chosen.sort_unstable();
            // One KV head's K and V as [n][d], for the references.
            let head_rows = |x: &[f32]| -> Vec<f32> {
                (0..n)
                    .flat_map(|t| x[(t * kv + h) * d..(t * kv + h + 1) * d].to_vec())
                    .collect()
            };
            let (kh, vh) = (head_rows(&kw), head_rows(&vw));
            let (o_c, lse_c) = attention_f64(g, d, qg, &kh, &vh, &chosen);
            let mean: Vec<f64> = (0..d)
                .map(|i| (0..n).map(|t| vh[t * d + i] as f64).sum::<f64>() / n as f64)
                .collect();
            let mean32: Vec<f32> = mean.iter().map(|&x| x as f32).collect();
            for j in 0..g {
                let qj = &qg[j * d..(j + 1) * d];
                // SparQ in f64.
                let l1: f64 = qj.iter().map(|x| x.abs() as f64).sum();
                let l1r: f64 = channels.iter().map(|&c| qj[c as usize].abs() as f64).sum();
                let temp = (d as f64 * l1r / l1).sqrt();
                let s: Vec<f64> = (0..n)
                    .map(|t| {
                        channels
                            .iter()
                            .map(|&c| qj[c as usize] as f64 * kh[t * d + c as usize] as f64)
                            .sum::<f64>()
                            / temp
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let alpha_ref: f64 = chosen
                    .iter()
                    .map(|&t| (s[t as usize] - m).exp())
                    .sum::<f64>()
                    / z;
                let o_ref: Vec<f64> = (0..d)
                    .map(|i| alpha_ref * o_c[j * d + i] + (1.0 - alpha_ref) * mean[i])
                    .collect();
                let lse_ref = lse_c[j] - alpha_ref.ln();
                // The kernels, from f32 partial attention over the chosen.
                let t = score_temperature(qj, &channels);
                let alpha = chosen_mass(&each[j * n..(j + 1) * n], &chosen, t);
                assert!(
                    (alpha as f64 - alpha_ref).abs() <= 1e-5,
                    "head {h}/{j}: alpha {alpha} vs {alpha_ref}"
                );
                assert!(alpha > 0.01 && alpha < 0.99, "a real correction: {alpha}");
                let mut o: Vec<f32> = o_c[j * d..(j + 1) * d].iter().map(|&x| x as f32).collect();
                let mut lse = lse_c[j] as f32;
                mean_correct(&mut o, &mut lse, alpha, &mean32);
                assert!(
                    relerr(&o, &o_ref) <= 1e-5,
                    "head {h}/{j}: {}",
                    relerr(&o, &o_ref)
                );
                assert!((lse as f64 - lse_ref).abs() <= 1e-5 * lse_ref.abs().max(1.0));
            }
        }
    }

    /// alpha over every token is 1 and changes nothing; -inf scores weigh
    /// nothing; alpha = 0 gives the mean value and leaves lse; a zero query
    /// has temperature 1.
    #[test]
    fn mean_correction_edges() {
        let scores = [0.5f32, -1.0, f32::NEG_INFINITY, 2.0];
        assert_eq!(chosen_mass(&scores, &[0, 1, 2, 3], 1.7), 1.0);
        assert_eq!(chosen_mass(&scores, &[2], 1.0), 0.0);
        assert_eq!(chosen_mass(&[f32::NEG_INFINITY; 3], &[0], 1.0), 0.0);
        let want = 1.0f64.exp() / (1.0f64.exp() + (-0.5f64).exp() + 2.5f64.exp());
        assert!((chosen_mass(&scores, &[0], 1.0) as f64 - want).abs() < 1e-6);
        let (mut o, mut lse) = (vec![1.0f32, 2.0], 3.0f32);
        mean_correct(&mut o, &mut lse, 1.0, &[7.0, 7.0]);
        assert_eq!((o.clone(), lse), (vec![1.0, 2.0], 3.0));
        mean_correct(&mut o, &mut lse, 0.25, &[5.0, 6.0]);
        assert_eq!(o, vec![0.25 + 0.75 * 5.0, 0.5 + 0.75 * 6.0]);
        assert!((lse - (3.0 + 4f32.ln())).abs() < 1e-6);
        mean_correct(&mut o, &mut lse, 0.0, &[5.0, 6.0]);
        assert_eq!(o, vec![5.0, 6.0]);
        assert!((lse - (3.0 + 4f32.ln())).abs() < 1e-6);
        assert_eq!(score_temperature(&[0.0; 4], &[1]), 1.0);
        assert_eq!(
            score_temperature(&[1.0, -1.0, 2.0, 0.0], &[2, 3]),
            2f32.sqrt()
        );
    }

    #[test]
    fn dim_major_is_a_transpose() {
        let k: Vec<f32> = (0..70 * 33).map(|i| i as f32).collect();
        let mut kt = vec![0.0; k.len()];
        to_dim_major(&k, 33, &mut kt);
        for t in 0..70 {
            for i in 0..33 {
                assert_eq!(kt[i * 70 + t], k[t * 33 + i]);
            }
        }
    }
}

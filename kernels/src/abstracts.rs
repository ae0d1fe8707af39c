//! Chunk abstracts of keys and their upper bound on `q.k` (LeoAM).
//!
//! Keys `K [n][d]` are cut into chunks of `chunk` consecutive tokens (the
//! last one may be shorter); `chunks = ceil(n / chunk)`. Each chunk `j` has
//! an abstract of three `[d]` rows, stored as f16 in three `[chunks][d]`
//! arrays:
//!
//! * `min[j][i]`: the minimum of channel `i` over the chunk, rounded toward
//!   -inf to f16;
//! * `max[j][i]`: the maximum, rounded toward +inf;
//! * `mean[j][i]`: the mean (f32 sum in token order, divided by the count),
//!   rounded to nearest.
//!
//! The directed rounding keeps the f16 box around every key of the chunk,
//! so the bound holds after storage:
//!
//! ```text
//! UB_j(q) = sum_i max(q_i * max[j][i], q_i * min[j][i])  >=  q.k   for every k in chunk j
//! ```
//!
//! f16 storage is the COMPUTE.md choice: abstracts stay resident in DRAM
//! and at small leaves already weigh 12.5% of the fp16 KV in f16.
//! [`upper_bounds`] evaluates the bound in f32 (raw `q.k`, no softmax
//! scale), so it holds up to f32 rounding of the sum: `UB >= q.k -
//! d * 2^-23 * sum_i |q_i| max(|min_i|, |max_i|)`.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::elem::{KvElem, f16_round_down, f16_round_up};
use crate::simd;

/// Scratch for [`chunk_abstracts`] and [`upper_bounds`], made once.
#[derive(Debug, Clone)]
pub struct AbstractScratch {
    d_max: usize,
    row: Vec<f32>,
    lo: Vec<f32>,
    hi: Vec<f32>,
    sum: Vec<f32>,
}

impl AbstractScratch {
    pub fn new(d_max: usize) -> Self {
        Self {
            d_max,
            row: vec![0.0; d_max],
            lo: vec![0.0; d_max],
            hi: vec![0.0; d_max],
            sum: vec![0.0; d_max],
        }
    }
}

/// Number of chunks of `chunk` tokens covering `n` tokens.
pub const fn chunk_count(n: usize, chunk: usize) -> usize {
    n.div_ceil(chunk)
}

/// Writes the abstracts of the chunks of `k` (`[n][d]`) into `min`, `max`
/// and `mean` (each `[chunk_count(n, chunk)][d]`).
pub fn chunk_abstracts<E: KvElem>(
    k: &[E],
    d: usize,
    chunk: usize,
    scratch: &mut AbstractScratch,
    min: &mut [f16],
    max: &mut [f16],
    mean: &mut [f16],
) {
    assert!(
        d > 0 && chunk > 0 && d <= scratch.d_max,
        "abstracts: bad shape"
    );
    assert_eq!(k.len() % d, 0, "abstracts: K is not [n][d]");
    let n = k.len() / d;
    let chunks = chunk_count(n, chunk);
    for out in [&*min, &*max, &*mean] {
        assert_eq!(
            out.len(),
            chunks * d,
            "abstracts: output is not [chunks][d]"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        unsafe { abstracts_avx2(k, d, chunk, scratch, min, max, mean) };
        return;
    }
    abstracts_impl::<E, false>(k, d, chunk, scratch, min, max, mean);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn abstracts_avx2<E: KvElem>(
    k: &[E],
    d: usize,
    chunk: usize,
    scratch: &mut AbstractScratch,
    min: &mut [f16],
    max: &mut [f16],
    mean: &mut [f16],
) {
    abstracts_impl::<E, true>(k, d, chunk, scratch, min, max, mean);
}

#[inline(always)]
fn abstracts_impl<E: KvElem, const FAST: bool>(
    k: &[E],
    d: usize,
    chunk: usize,
    scratch: &mut AbstractScratch,
    min: &mut [f16],
    max: &mut [f16],
    mean: &mut [f16],
) {
    let n = k.len() / d;
    let AbstractScratch {
        row, lo, hi, sum, ..
    } = scratch;
    let (lo, hi, sum) = (&mut lo[..d], &mut hi[..d], &mut sum[..d]);
    for j in 0..chunk_count(n, chunk) {
        let (start, end) = (j * chunk, ((j + 1) * chunk).min(n));
        lo.fill(f32::INFINITY);
        hi.fill(f32::NEG_INFINITY);
        sum.fill(0.0);
        for t in start..end {
            let x = simd::as_f32::<E, FAST>(&k[t * d..(t + 1) * d], row);
            // f32::min/max, not a compare-and-assign: LLVM turns the latter
            // into masked stores, which stall the next load (10x slower).
            // The sign of a zero bound may differ from the CUDA twin's.
            for (((x, a), b), s) in x
                .iter()
                .zip(lo.iter_mut())
                .zip(hi.iter_mut())
                .zip(sum.iter_mut())
            {
                *a = a.min(*x);
                *b = b.max(*x);
                *s += *x;
            }
        }
        let count = (end - start) as f32;
        let out = j * d..(j + 1) * d;
        for (i, ((mn, mx), me)) in min[out.clone()]
            .iter_mut()
            .zip(&mut max[out.clone()])
            .zip(&mut mean[out])
            .enumerate()
        {
            *mn = f16_round_down(lo[i]);
            *mx = f16_round_up(hi[i]);
            *me = f16::from_f32(sum[i] / count);
        }
    }
}

/// `out[h][j] = UB_j(q_h)` for the `heads` queries `q [heads][d]` and the
/// chunks of `min`/`max` (`[chunks][d]`); `out` is `[heads][chunks]`.
pub fn upper_bounds(
    q: &[f32],
    heads: usize,
    d: usize,
    min: &[f16],
    max: &[f16],
    scratch: &mut AbstractScratch,
    out: &mut [f32],
) {
    assert!(d > 0 && d <= scratch.d_max, "upper_bounds: bad d");
    assert_eq!(q.len(), heads * d, "upper_bounds: q is not [heads][d]");
    assert!(
        min.len() == max.len() && min.len().is_multiple_of(d),
        "upper_bounds: abstracts are not [chunks][d]"
    );
    let chunks = min.len() / d;
    assert_eq!(
        out.len(),
        heads * chunks,
        "upper_bounds: out is not [heads][chunks]"
    );
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { upper_bounds_avx2(q, heads, d, min, max, scratch, out) };
        return;
    }
    upper_bounds_impl(q, heads, d, min, max, scratch, out);
}

/// The same body compiled for AVX2 (8 lanes; no FMA: `max` needs both
/// products rounded apart).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn upper_bounds_avx2(
    q: &[f32],
    heads: usize,
    d: usize,
    min: &[f16],
    max: &[f16],
    scratch: &mut AbstractScratch,
    out: &mut [f32],
) {
    upper_bounds_impl(q, heads, d, min, max, scratch, out);
}

#[inline(always)]
fn upper_bounds_impl(
    q: &[f32],
    heads: usize,
    d: usize,
    min: &[f16],
    max: &[f16],
    scratch: &mut AbstractScratch,
    out: &mut [f32],
) {
    let chunks = min.len() / d;
    let (lo, hi) = (&mut scratch.lo[..d], &mut scratch.hi[..d]);
    for j in 0..chunks {
        min[j * d..(j + 1) * d].convert_to_f32_slice(lo);
        max[j * d..(j + 1) * d].convert_to_f32_slice(hi);
        for h in 0..heads {
            out[h * chunks + j] = bound(&q[h * d..(h + 1) * d], lo, hi);
        }
    }
}

/// `sum_i max(q_i * hi_i, q_i * lo_i)` with eight independent partial sums.
#[inline(always)]
fn bound(q: &[f32], lo: &[f32], hi: &[f32]) -> f32 {
    const W: usize = 8;
    let (qc, qr) = q.as_chunks::<W>();
    let (lc, _) = lo.as_chunks::<W>();
    let (hc, _) = hi.as_chunks::<W>();
    let mut acc = [0.0f32; W];
    for ((a, l), h) in qc.iter().zip(lc).zip(hc) {
        for i in 0..W {
            let (x, y) = (a[i] * h[i], a[i] * l[i]);
            acc[i] += if x > y { x } else { y };
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    let base = q.len() - qr.len();
    for (i, &a) in qr.iter().enumerate() {
        let (x, y) = (a * hi[base + i], a * lo[base + i]);
        s += if x > y { x } else { y };
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;
    use half::bf16;
    use proptest::prelude::*;

    fn build<E: KvElem>(k: &[E], d: usize, chunk: usize) -> (Vec<f16>, Vec<f16>, Vec<f16>) {
        let chunks = chunk_count(k.len() / d, chunk);
        let mut s = AbstractScratch::new(d);
        let (mut mn, mut mx, mut me) = (
            vec![f16::ZERO; chunks * d],
            vec![f16::ZERO; chunks * d],
            vec![f16::ZERO; chunks * d],
        );
        chunk_abstracts(k, d, chunk, &mut s, &mut mn, &mut mx, &mut me);
        (mn, mx, me)
    }

    /// Against f64: the f16 min/max bracket every key and are tight (one
    /// f16 step); the mean is within one f16 rounding (2^-11 relative).
    #[test]
    fn abstracts_match_f64() {
        let (n, d, chunk) = (1000, 24, 16);
        let mut rng = Rng::new(11);
        // A large per-channel bias, as real keys have.
        let bias: Vec<f64> = (0..d).map(|_| rng.normal() * 4.0).collect();
        let k: Vec<bf16> = (0..n * d)
            .map(|i| bf16::from_f64(bias[i % d] + rng.normal()))
            .collect();
        let (mn, mx, me) = build(&k, d, chunk);
        for j in 0..chunk_count(n, chunk) {
            for i in 0..d {
                let col: Vec<f64> = (j * chunk..((j + 1) * chunk).min(n))
                    .map(|t| k[t * d + i].to_f64())
                    .collect();
                let lo = col.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = col.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let mean = col.iter().sum::<f64>() / col.len() as f64;
                let (a, b, c) = (
                    mn[j * d + i].to_f64(),
                    mx[j * d + i].to_f64(),
                    me[j * d + i].to_f64(),
                );
                assert!(a <= lo && lo - a <= lo.abs() * 1e-3 + 1e-7, "min {a} {lo}");
                assert!(b >= hi && b - hi <= hi.abs() * 1e-3 + 1e-7, "max {b} {hi}");
                assert!(
                    (c - mean).abs() <= mean.abs() * 6e-4 + 1e-6,
                    "mean {c} {mean}"
                );
            }
        }
    }

    /// UB against f64: >= every q.k of the chunk (up to the stated f32
    /// slack), and equal to the f64 bound of the stored box within 1e-5.
    #[test]
    fn upper_bound_dominates_every_key() {
        let (n, d, chunk, heads) = (777, 64, 32, 3);
        let mut rng = Rng::new(12);
        let k: Vec<f32> = (0..n * d)
            .map(|i| (rng.normal() + (i % 7) as f64) as f32)
            .collect();
        let q = rng.normal_vec(heads * d, 1.0);
        let (mn, mx, _) = build(&k, d, chunk);
        let chunks = chunk_count(n, chunk);
        let mut out = vec![0.0; heads * chunks];
        upper_bounds(
            &q,
            heads,
            d,
            &mn,
            &mx,
            &mut AbstractScratch::new(d),
            &mut out,
        );
        for h in 0..heads {
            let qh = &q[h * d..(h + 1) * d];
            for j in 0..chunks {
                let ub = out[h * chunks + j] as f64;
                let mut ub64 = 0.0;
                let mut slack = 0.0;
                for i in 0..d {
                    let (a, lo, hi) =
                        (qh[i] as f64, mn[j * d + i].to_f64(), mx[j * d + i].to_f64());
                    ub64 += (a * hi).max(a * lo);
                    slack += a.abs() * lo.abs().max(hi.abs());
                }
                assert!((ub - ub64).abs() <= 1e-5 * slack, "ub {ub} vs {ub64}");
                for t in j * chunk..((j + 1) * chunk).min(n) {
                    let qk: f64 = qh
                        .iter()
                        .zip(&k[t * d..(t + 1) * d])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    assert!(
                        ub >= qk - d as f64 * f32::EPSILON as f64 * slack,
                        "{ub} < {qk}"
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn upper_bound_holds_for_any_keys(
            seed in any::<u64>(),
            n in 1usize..100,
            d in 1usize..20,
            chunk in 1usize..40,
            mag in prop_oneof![Just(1e-3f64), Just(1.0), Just(300.0), Just(3e4)],
        ) {
            let mut rng = Rng::new(seed);
            let k: Vec<f16> = (0..n * d)
                .map(|_| f16::from_f64((rng.normal() * mag).clamp(-65504.0, 65504.0)))
                .collect();
            let q = rng.normal_vec(d, 1.0);
            let (mn, mx, _) = build(&k, d, chunk);
            let chunks = chunk_count(n, chunk);
            let mut out = vec![0.0; chunks];
            upper_bounds(&q, 1, d, &mn, &mx, &mut AbstractScratch::new(d), &mut out);
            for t in 0..n {
                let j = t / chunk;
                let qk: f64 = q.iter().zip(&k[t * d..(t + 1) * d]).map(|(a, b)| *a as f64 * b.to_f64()).sum();
                let slack: f64 = q.iter().zip(&k[t * d..(t + 1) * d]).map(|(a, _)| a.abs() as f64).sum::<f64>() * mag * 10.0;
                prop_assert!(out[j] as f64 >= qk - d as f64 * 1.2e-7 * slack, "{} < {}", out[j], qk);
            }
        }
    }
}

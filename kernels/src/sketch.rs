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
        w / LEVELS
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

/// One block's sketch of one KV head, as [`sketch_scores`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct Sketch<'a> {
    /// `[d][stride]` codes.
    pub codes: &'a [u8],
    pub stride: usize,
    /// Tokens held (`<= stride`).
    pub n: usize,
    /// The box, `[d]` each.
    pub lo: &'a [f32],
    pub hi: &'a [f32],
}

/// Approximate group scores of the sketch's `n` tokens on `channels`:
/// `out[t] = scale * max_h sum_{i in channels} q_h,i * k~[t][i]` with `k~`
/// the decoded keys. `acc` is scratch of at least `heads * min(n, 256)`.
/// Returns false (and writes nothing) when a chosen channel's box is not
/// finite: the caller scores that block from its keys.
#[allow(clippy::too_many_arguments)]
pub fn sketch_scores(
    q: &[f32],
    heads: usize,
    d: usize,
    s: &Sketch<'_>,
    channels: &[u32],
    scale: f32,
    acc: &mut Vec<f32>,
    out: &mut [f32],
) -> bool {
    assert_eq!(q.len(), heads * d, "sketch: q is not [heads][d]");
    assert!(s.n <= s.stride && s.codes.len() >= d * s.stride);
    assert!(s.lo.len() >= d && s.hi.len() >= d);
    assert_eq!(out.len(), s.n, "sketch: out is not [n]");
    if channels
        .iter()
        .any(|&c| !(s.lo[c as usize].is_finite() && s.hi[c as usize].is_finite()))
    {
        return false;
    }
    let tile = TILE.min(s.n.max(1));
    if acc.len() < heads * tile {
        acc.resize(heads * tile, 0.0);
    }
    let mut start = 0;
    while start < s.n {
        let len = tile.min(s.n - start);
        for h in 0..heads {
            let qh = &q[h * d..(h + 1) * d];
            let base: f32 = channels
                .iter()
                .map(|&c| qh[c as usize] * s.lo[c as usize])
                .sum();
            let a = &mut acc[h * tile..h * tile + len];
            a.fill(base);
            for &c in channels {
                let c = c as usize;
                let w = qh[c] * step(s.lo[c], s.hi[c]);
                let codes = &s.codes[c * s.stride + start..c * s.stride + start + len];
                for (x, &b) in a.iter_mut().zip(codes) {
                    *x += w * b as f32;
                }
            }
        }
        let o = &mut out[start..start + len];
        o.copy_from_slice(&acc[..len]);
        for h in 1..heads {
            for (x, &y) in o.iter_mut().zip(&acc[h * tile..h * tile + len]) {
                *x = x.max(y);
            }
        }
        for x in o.iter_mut() {
            *x *= scale;
        }
        start += len;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparf::{SparfScratch, sparf_scores_head, top_channels};
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
        let (heads, kv, d, n, stride) = (4, 2, 64, 13, 16);
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
            let s = Sketch {
                codes: &codes,
                stride,
                n,
                lo: &lo,
                hi: &hi,
            };
            let mut acc = Vec::new();
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
            // A wrong code moves the score: the test can fail.
            codes[channels[0] as usize * stride] ^= 0x80;
            let s = Sketch {
                codes: &codes,
                stride,
                n,
                lo: &lo,
                hi: &hi,
            };
            let mut moved = vec![0f32; n];
            sketch_scores(&q, heads, d, &s, &channels, scale, &mut acc, &mut moved);
            assert_ne!(moved[0], got[0]);
        }
    }

    /// A constant channel (empty box) decodes exactly; a non-finite box
    /// among the chosen channels is refused.
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
            &mut Vec::new(),
            &mut out
        ));
        assert!(
            (out[0] - 5.0).abs() < 1e-5 && (out[1] - 7.0).abs() < 1e-5,
            "{out:?}"
        );
        let inf = vec![1.0, f32::INFINITY, 3.0, -1.0];
        let s = Sketch { hi: &inf, ..s };
        assert!(!sketch_scores(
            &q,
            1,
            d,
            &s,
            &[1],
            1.0,
            &mut Vec::new(),
            &mut out
        ));
        // Unchosen channels do not matter.
        assert!(sketch_scores(
            &q,
            1,
            d,
            &s,
            &[0, 2],
            1.0,
            &mut Vec::new(),
            &mut out
        ));
        assert_eq!(out, vec![4.0, 4.0]);
    }
}

//! The metrics every attention feature is judged by (COMPUTE.md §2), with
//! f64 references.
//!
//! * **mass**: true softmax weight of the selected tokens;
//! * **relerr**: `|o - o_full| / |o_full|` (L2);
//! * **recall@k**: share of the exact top-k (by `q.k`) that was retrieved;
//! * **scan%**: keys whose score was computed / N;
//! * **read%**: bytes read from the storage tier per step / the head's full
//!   K and V at 2 bytes per element (fp16);
//! * the **oracle** at a budget: the exact top tokens by weight, the best any
//!   method selecting that many tokens can do. Report it beside every
//!   figure.
//!
//! One query head at a time; a GQA group is that many calls. Keys and
//! values are `[n][d]` f32 (slice them to a prefix for causal attention).

use crate::linalg::dot_f32_f64;

/// Exact softmax attention of one query over all of `k`, `v`, in f64.
#[derive(Debug, Clone)]
pub struct Exact {
    pub d: usize,
    /// `scale * q.k_t`.
    pub logits: Vec<f64>,
    /// Softmax weights (sum 1).
    pub weights: Vec<f64>,
    /// `o_full [d]`.
    pub o: Vec<f64>,
    /// Log-sum-exp of the logits.
    pub lse: f64,
}

impl Exact {
    /// Attention of `q` (`[d]`) over `k`, `v` (`[n][d]`, `n >= 1`) with
    /// logits `scale * q.k`.
    pub fn new(q: &[f32], k: &[f32], v: &[f32], scale: f32) -> Self {
        let d = q.len();
        assert!(d > 0 && k.len() == v.len() && k.len().is_multiple_of(d) && !k.is_empty());
        let scale = f64::from(scale);
        let logits: Vec<f64> = k
            .chunks_exact(d)
            .map(|kt| scale * dot_f32_f64(q, kt))
            .collect();
        let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut weights: Vec<f64> = logits.iter().map(|x| (x - m).exp()).collect();
        let l: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= l);
        let mut o = vec![0.0; d];
        for (w, vt) in weights.iter().zip(v.chunks_exact(d)) {
            for (acc, x) in o.iter_mut().zip(vt) {
                *acc += w * f64::from(*x);
            }
        }
        Self {
            d,
            logits,
            weights,
            o,
            lse: m + l.ln(),
        }
    }

    pub fn n(&self) -> usize {
        self.weights.len()
    }

    /// Softmax weight of `selected` (distinct token indices).
    pub fn mass(&self, selected: &[u32]) -> f64 {
        selected.iter().map(|&t| self.weights[t as usize]).sum()
    }

    /// The `k` tokens of highest weight (equivalently highest `q.k`), best
    /// first, ties to the lower index.
    pub fn top_k(&self, k: usize) -> Vec<u32> {
        let k = k.min(self.n());
        let mut idx: Vec<u32> = (0..self.n() as u32).collect();
        let by = |a: &u32, b: &u32| {
            self.logits[*b as usize]
                .total_cmp(&self.logits[*a as usize])
                .then(a.cmp(b))
        };
        if k < idx.len() && k > 0 {
            idx.select_nth_unstable_by(k - 1, by);
        }
        idx.truncate(k);
        idx.sort_by(by);
        idx
    }

    /// The oracle at a budget of `budget` tokens.
    pub fn oracle(&self, budget: usize, v: &[f32]) -> Oracle {
        let tokens = self.top_k(budget);
        let mass = self.mass(&tokens);
        let relerr = relerr_f64(&attend_subset(self, &tokens, v), &self.o);
        Oracle {
            tokens,
            mass,
            relerr,
        }
    }
}

/// The exact top tokens at a budget and what they achieve.
#[derive(Debug, Clone)]
pub struct Oracle {
    pub tokens: Vec<u32>,
    pub mass: f64,
    pub relerr: f64,
}

/// Exact attention restricted to `selected` (distinct indices), renormalised
/// over them: what a method that attends only to those tokens outputs
/// (zero when empty).
pub fn attend_subset(exact: &Exact, selected: &[u32], v: &[f32]) -> Vec<f64> {
    let d = exact.d;
    let mut o = vec![0.0; d];
    if selected.is_empty() {
        return o;
    }
    let m = selected
        .iter()
        .map(|&t| exact.logits[t as usize])
        .fold(f64::NEG_INFINITY, f64::max);
    let mut l = 0.0;
    for &t in selected {
        let w = (exact.logits[t as usize] - m).exp();
        l += w;
        let vt = &v[t as usize * d..(t as usize + 1) * d];
        for (acc, x) in o.iter_mut().zip(vt) {
            *acc += w * f64::from(*x);
        }
    }
    o.iter_mut().for_each(|x| *x /= l);
    o
}

/// `|o - o_full| / |o_full|` of an f32 output (0 when both are zero).
pub fn relerr(o: &[f32], o_full: &[f64]) -> f64 {
    let o: Vec<f64> = o.iter().map(|&x| f64::from(x)).collect();
    relerr_f64(&o, o_full)
}

/// `|o - o_full| / |o_full|` (0 when both are zero).
pub fn relerr_f64(o: &[f64], o_full: &[f64]) -> f64 {
    assert_eq!(o.len(), o_full.len(), "relerr: lengths differ");
    let num: f64 = o.iter().zip(o_full).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = o_full.iter().map(|b| b * b).sum();
    if num == 0.0 { 0.0 } else { (num / den).sqrt() }
}

/// Share of `exact_topk` found in `retrieved` (1 when `exact_topk` is empty).
pub fn recall_at_k(retrieved: &[u32], exact_topk: &[u32]) -> f64 {
    if exact_topk.is_empty() {
        return 1.0;
    }
    let mut r = retrieved.to_vec();
    r.sort_unstable();
    let hits = exact_topk
        .iter()
        .filter(|t| r.binary_search(t).is_ok())
        .count();
    hits as f64 / exact_topk.len() as f64
}

/// Percentage of the `n` keys whose score was computed.
pub fn scan_pct(keys_scored: usize, n: usize) -> f64 {
    100.0 * keys_scored as f64 / n as f64
}

/// Bytes of the full fp16 K and V of one head over `n` tokens.
pub fn full_kv_fp16_bytes(n: usize, d: usize) -> u64 {
    2 * n as u64 * d as u64 * 2
}

/// Percentage of the head's full K and V (`n` tokens of dimension `d`, at
/// `bytes_per_elem` bytes; COMPUTE.md measures against fp16, 2) that
/// `bytes_read` represents.
pub fn read_pct(bytes_read: u64, n: usize, d: usize, bytes_per_elem: usize) -> f64 {
    100.0 * bytes_read as f64 / (2.0 * n as f64 * d as f64 * bytes_per_elem as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use strata_kernels::attention::{AttnParams, AttnScratch, Tokens, partial_attention};

    fn random(n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut r = Rng::new(seed);
        let mut f = |len: usize, s: f64| -> Vec<f32> {
            (0..len).map(|_| (r.normal() * s) as f32).collect()
        };
        (f(d, 3.0), f(n * d, 1.0), f(n * d, 1.0))
    }

    #[test]
    fn exact_matches_the_kernel() {
        let (n, d) = (300, 64);
        let (q, k, v) = random(n, d, 1);
        let scale = 1.0 / (d as f32).sqrt();
        let ex = Exact::new(&q, &k, &v, scale);
        assert!((ex.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let p = AttnParams { heads: 1, d, scale };
        let mut scratch = AttnScratch::new(1, d);
        let (mut o, mut lse) = (vec![0.0; d], vec![0.0; 1]);
        partial_attention(&p, &q, &k, &v, Tokens::All, &mut scratch, &mut o, &mut lse);
        assert!(relerr(&o, &ex.o) < 1e-5, "{}", relerr(&o, &ex.o));
        assert!((f64::from(lse[0]) - ex.lse).abs() < 1e-4);
        // A subset through the kernel equals attend_subset.
        let rows: Vec<u32> = (0..n as u32).step_by(7).collect();
        partial_attention(
            &p,
            &q,
            &k,
            &v,
            Tokens::Rows(&rows),
            &mut scratch,
            &mut o,
            &mut lse,
        );
        assert!(relerr(&o, &attend_subset(&ex, &rows, &v)) < 1e-5);
    }

    #[test]
    fn oracle_is_best_and_complete_at_full_budget() {
        let (n, d) = (500, 32);
        let (q, k, v) = random(n, d, 2);
        let ex = Exact::new(&q, &k, &v, 0.5);
        let o10 = ex.oracle(10, &v);
        assert_eq!(o10.tokens.len(), 10);
        let strided: Vec<u32> = (0..10).map(|i| i * 50).collect();
        assert!(o10.mass >= ex.mass(&strided));
        assert!(o10.relerr <= relerr_f64(&attend_subset(&ex, &strided, &v), &ex.o));
        let all = ex.oracle(n, &v);
        assert!((all.mass - 1.0).abs() < 1e-12 && all.relerr < 1e-12);
        // Best first.
        assert!(
            o10.tokens
                .windows(2)
                .all(|w| ex.weights[w[0] as usize] >= ex.weights[w[1] as usize])
        );
    }

    #[test]
    fn small_metrics() {
        assert_eq!(recall_at_k(&[5, 1, 9], &[1, 2, 5, 7]), 0.5);
        assert_eq!(recall_at_k(&[], &[]), 1.0);
        assert_eq!(scan_pct(50, 1000), 5.0);
        assert_eq!(
            read_pct(full_kv_fp16_bytes(1000, 128) / 20, 1000, 128, 2),
            5.0
        );
        assert_eq!(relerr(&[1.0, 0.0], &[1.0, 0.0]), 0.0);
        assert!((relerr(&[0.0, 1.0], &[1.0, 0.0]) - 2f64.sqrt()).abs() < 1e-15);
        // An empty selection outputs zero: relerr 1.
        let ex = Exact::new(&[1.0], &[1.0, 2.0], &[1.0, 1.0], 1.0);
        assert_eq!(
            relerr_f64(&attend_subset(&ex, &[], &[1.0, 1.0]), &ex.o),
            1.0
        );
    }
}

//! The realism gates of COMPUTE.md §2, each a function returning the value
//! it measured, plus [`evaluate`] for the whole table.
//!
//! | gate | measured on | pass |
//! |---|---|---|
//! | skew | median over decode (step, head) of the softmax mass of the top `ceil(2%)` of the visible keys | ≥ 0.80 |
//! | out of distribution | mean Mahalanobis distance of the queries (training and decode, every head) ÷ that of the keys, under the keys' mean and covariance (+ `1e-9 * trace/d` ridge, as testbed/capture/stats.py) | ≥ 3 |
//! | dynamics | median over heads and consecutive decode steps of the Jaccard of their top-100 keys by `q.k` | 0.1 to 0.8 |
//! | index hardness | scan% an inner-product IVF ([`crate::ivf`]) needs for mean recall@100 ≥ 0.9 over the decode queries | ≥ 20% (needle regime) |
//!
//! Captured prompts are causal: a decode step sees keys `0..visible` only,
//! and every gate honours that.

use crate::data::HeadData;
use crate::ivf::{Ivf, IvfConfig, ScanAtRecall, scan_for_recall};
use crate::linalg::{self, dot_f32, dot_f32_f64, median};
use strata_kernels::topk::top_k;

pub const SKEW_MIN: f64 = 0.80;
pub const SKEW_FRACTION: f64 = 0.02;
pub const OOD_MIN: f64 = 3.0;
pub const DYNAMICS_K: usize = 100;
pub const DYNAMICS_RANGE: (f64, f64) = (0.1, 0.8);
pub const HARDNESS_K: usize = 100;
pub const HARDNESS_RECALL: f64 = 0.9;
pub const HARDNESS_MIN_PCT: f64 = 20.0;
/// Ridge added to the key covariance, relative to its mean variance.
pub const OOD_RIDGE: f64 = 1e-9;
/// At most this many queries and keys (evenly strided) enter the
/// Mahalanobis means; the covariance always uses every key.
pub const OOD_SAMPLE_MAX: usize = 8192;

/// What a gate accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    AtLeast(f64),
    Between(f64, f64),
}

impl Bound {
    pub fn holds(self, x: f64) -> bool {
        match self {
            Bound::AtLeast(lo) => x >= lo,
            Bound::Between(lo, hi) => (lo..=hi).contains(&x),
        }
    }
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::AtLeast(lo) => write!(f, "≥ {lo}"),
            Bound::Between(lo, hi) => write!(f, "{lo} to {hi}"),
        }
    }
}

/// One gate's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Gate {
    pub name: &'static str,
    pub value: f64,
    pub bound: Bound,
}

impl Gate {
    pub fn pass(&self) -> bool {
        self.bound.holds(self.value)
    }
}

/// Attention-mass statistics of the decode queries (medians over steps and heads).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SkewStats {
    /// Mass of the top `ceil(2%)` of the visible keys (the skew gate).
    pub top2: f64,
    /// Mass of the top `ceil(1%)` of the non-sink keys, softmax over the
    /// non-sink keys only (what the generator calibrates to 0.8).
    pub top1_nonsink: f64,
    /// Weight of token 0.
    pub sink: f64,
}

/// Skew statistics; [`SkewStats::top2`] is the gate's value.
pub fn skew(data: &HeadData) -> SkewStats {
    let mut top2 = Vec::new();
    let mut top1 = Vec::new();
    let mut sink = Vec::new();
    let scale = f64::from(data.scale);
    let mut logits = Vec::new();
    for step in 0..data.steps() {
        let keys = data.visible_keys(step);
        let visible = data.decode_visible[step];
        for h in 0..data.heads {
            let q = data.decode_query(step, h);
            logits.clear();
            logits.extend(keys.chunks_exact(data.d).map(|k| scale * dot_f32_f64(q, k)));
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut w: Vec<f64> = logits.iter().map(|x| (x - m).exp()).collect();
            let total: f64 = w.iter().sum();
            sink.push(w[0] / total);
            if visible > 1 {
                // Before top_sum reorders w.
                let rest = &mut w[1..];
                let rest_total: f64 = rest.iter().sum();
                top1.push(top_sum(rest, count_of(0.01, visible - 1)) / rest_total);
            }
            top2.push(top_sum(&mut w, count_of(SKEW_FRACTION, visible)) / total);
        }
    }
    SkewStats {
        top2: median(&top2),
        top1_nonsink: median(&top1),
        sink: median(&sink),
    }
}

fn count_of(fraction: f64, n: usize) -> usize {
    ((fraction * n as f64).ceil() as usize).clamp(1, n)
}

/// Sum of the `m` largest of `w` (reorders `w`).
fn top_sum(w: &mut [f64], m: usize) -> f64 {
    if m < w.len() {
        w.select_nth_unstable_by(m - 1, |a, b| b.total_cmp(a));
    }
    w[..m].iter().sum()
}

/// Mean Mahalanobis distance of the queries ÷ that of the keys, under the
/// keys' mean and covariance. Queries: every training and decode query of
/// every head.
pub fn ood(data: &HeadData) -> f64 {
    let d = data.d;
    let n = data.n;
    let mut mean = vec![0.0f64; d];
    for k in data.keys.chunks_exact(d) {
        mean.iter_mut()
            .zip(k)
            .for_each(|(m, x)| *m += f64::from(*x));
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut cov = vec![0.0f64; d * d];
    let mut c = vec![0.0f64; d];
    for k in data.keys.chunks_exact(d) {
        c.iter_mut()
            .zip(k)
            .zip(&mean)
            .for_each(|((ci, x), m)| *ci = f64::from(*x) - m);
        for i in 0..d {
            let ci = c[i];
            let row = &mut cov[i * d..i * d + i + 1];
            row.iter_mut()
                .zip(&c[..=i])
                .for_each(|(a, cj)| *a += ci * cj);
        }
    }
    let denom = (n.max(2) - 1) as f64;
    for i in 0..d {
        for j in 0..=i {
            cov[i * d + j] /= denom;
            cov[j * d + i] = cov[i * d + j];
        }
    }
    let trace: f64 = (0..d).map(|i| cov[i * d + i]).sum();
    if !(trace.is_finite() && trace > 0.0) {
        return f64::NAN;
    }
    // Degenerate keys (e.g. fewer than d distinct) get more ridge, up to
    // the mean variance itself.
    let mut ridge = OOD_RIDGE * trace / d as f64;
    let l = loop {
        let mut a = cov.clone();
        (0..d).for_each(|i| a[i * d + i] += ridge);
        match linalg::cholesky(&a, d) {
            Some(l) => break l,
            None if ridge < trace / d as f64 => ridge *= 10.0,
            None => return f64::NAN,
        }
    };
    let dist = |x: &[f32]| {
        let mut y: Vec<f64> = x
            .iter()
            .zip(&mean)
            .map(|(a, m)| f64::from(*a) - m)
            .collect();
        linalg::forward_solve(&l, d, &mut y);
        linalg::norm(&y)
    };
    let mean_dist = |rows: &[f32]| {
        let count = rows.len() / d;
        let stride = count.div_ceil(OOD_SAMPLE_MAX).max(1);
        let (mut sum, mut m) = (0.0, 0usize);
        for i in (0..count).step_by(stride) {
            sum += dist(&rows[i * d..(i + 1) * d]);
            m += 1;
        }
        (sum, m)
    };
    let (sk, mk) = mean_dist(&data.keys);
    let (st, mt) = mean_dist(&data.train_queries);
    let (sd, md) = mean_dist(&data.decode_queries);
    ((st + sd) / (mt + md) as f64) / (sk / mk as f64)
}

/// Median Jaccard of the top-[`DYNAMICS_K`] keys (by `q.k`) of consecutive
/// decode steps, over steps and heads.
pub fn dynamics(data: &HeadData) -> f64 {
    let mut prev: Vec<Vec<u32>> = vec![Vec::new(); data.heads];
    let mut idx = vec![0u32; DYNAMICS_K];
    let mut val = vec![0.0f32; DYNAMICS_K];
    let mut jac = Vec::new();
    for step in 0..data.steps() {
        for (h, prev_h) in prev.iter_mut().enumerate() {
            let q = data.decode_query(step, h);
            let scores: Vec<f32> = data
                .visible_keys(step)
                .chunks_exact(data.d)
                .map(|k| dot_f32(q, k))
                .collect();
            let got = top_k(&scores, DYNAMICS_K, &mut idx, &mut val);
            let mut cur = idx[..got].to_vec();
            cur.sort_unstable();
            if step > 0 {
                let inter = cur
                    .iter()
                    .filter(|t| prev_h.binary_search(t).is_ok())
                    .count();
                let union = cur.len() + prev_h.len() - inter;
                jac.push(inter as f64 / union.max(1) as f64);
            }
            *prev_h = cur;
        }
    }
    median(&jac)
}

/// The scan an inner-product IVF over the keys needs for mean
/// recall@[`HARDNESS_K`] ≥ [`HARDNESS_RECALL`] over the decode queries.
pub fn index_hardness(data: &HeadData, ivf: &IvfConfig) -> ScanAtRecall {
    let index = Ivf::build(&data.keys, data.d, ivf);
    let queries = (0..data.steps()).flat_map(|s| {
        (0..data.heads).map(move |h| (data.decode_query(s, h), data.decode_visible[s]))
    });
    scan_for_recall(&index, &data.keys, queries, HARDNESS_K, HARDNESS_RECALL)
}

/// Everything the table prints for one head.
#[derive(Debug, Clone)]
pub struct Report {
    pub skew: SkewStats,
    pub hardness: ScanAtRecall,
    pub gates: Vec<Gate>,
}

/// Runs every gate on `data`. The hardness gate's bound is the needle
/// regime's; a semantic head is expected to miss it.
pub fn evaluate(data: &HeadData, ivf: &IvfConfig) -> Report {
    let skew = skew(data);
    let hardness = index_hardness(data, ivf);
    let gates = vec![
        Gate {
            name: "skew (top-2% mass)",
            value: skew.top2,
            bound: Bound::AtLeast(SKEW_MIN),
        },
        Gate {
            name: "out of distribution (Mahalanobis q/k)",
            value: ood(data),
            bound: Bound::AtLeast(OOD_MIN),
        },
        Gate {
            name: "dynamics (Jaccard top-100)",
            value: dynamics(data),
            bound: Bound::Between(DYNAMICS_RANGE.0, DYNAMICS_RANGE.1),
        },
        Gate {
            name: "index hardness (IVF scan% @ recall 0.9)",
            value: hardness.scan_pct,
            bound: Bound::AtLeast(HARDNESS_MIN_PCT),
        },
    ];
    Report {
        skew,
        hardness,
        gates,
    }
}

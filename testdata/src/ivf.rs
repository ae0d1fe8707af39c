//! A query-agnostic index over keys for the *index hardness* gate: IVF in
//! inner-product space.
//!
//! Build: Lloyd's k-means (L2) on the keys, each key in the list of its
//! nearest centroid. Search: lists in descending `q.c` (the probe order of
//! an inner-product IVF such as faiss `IndexIVFFlat(METRIC_INNER_PRODUCT)`),
//! every key of a probed list scored exactly. It knows nothing about
//! queries, which is the point: on data where key geometry does not
//! reflect relevance it must scan much of the head to find the top-k.

use crate::linalg::dot_f32;
use crate::rng::Rng;
use strata_kernels::topk::top_k;

/// Build parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IvfConfig {
    /// Lists; 0 = `ceil(sqrt(n))` (the usual rule of thumb).
    pub lists: usize,
    /// Lloyd iterations.
    pub iters: usize,
    /// At most this many keys per list train the centroids (faiss uses 256).
    pub train_per_list: usize,
    pub seed: u64,
}

impl Default for IvfConfig {
    fn default() -> Self {
        Self {
            lists: 0,
            iters: 10,
            train_per_list: 256,
            seed: 0x1f,
        }
    }
}

/// The built index.
#[derive(Debug, Clone)]
pub struct Ivf {
    d: usize,
    /// `[lists][d]`.
    centroids: Vec<f32>,
    /// Keys of each list, ascending.
    lists: Vec<Vec<u32>>,
}

impl Ivf {
    /// Builds the index over `keys` (`[n][d]`).
    pub fn build(keys: &[f32], d: usize, cfg: &IvfConfig) -> Self {
        let n = keys.len() / d;
        assert!(n > 0 && keys.len() == n * d, "ivf: keys are not [n][d]");
        let nl = if cfg.lists == 0 {
            (n as f64).sqrt().ceil() as usize
        } else {
            cfg.lists
        }
        .clamp(1, n);
        let mut rng = Rng::new(cfg.seed);
        // Training sample and initial centroids: distinct random keys.
        let train: Vec<u32> = if n <= nl * cfg.train_per_list {
            (0..n as u32).collect()
        } else {
            sample_distinct(&mut rng, n, nl * cfg.train_per_list)
        };
        let init = sample_distinct(&mut rng, train.len(), nl);
        let mut centroids: Vec<f32> = init
            .iter()
            .flat_map(|&i| row(keys, d, train[i as usize] as usize).iter().copied())
            .collect();
        let mut assign = vec![0u32; train.len()];
        for _ in 0..cfg.iters {
            let norms = row_norms(&centroids, d);
            for (a, &t) in assign.iter_mut().zip(&train) {
                *a = nearest(&centroids, &norms, d, row(keys, d, t as usize));
            }
            let mut sum = vec![0.0f64; nl * d];
            let mut count = vec![0usize; nl];
            for (&a, &t) in assign.iter().zip(&train) {
                count[a as usize] += 1;
                let s = &mut sum[a as usize * d..(a as usize + 1) * d];
                s.iter_mut()
                    .zip(row(keys, d, t as usize))
                    .for_each(|(acc, x)| *acc += f64::from(*x));
            }
            for c in 0..nl {
                let dst = &mut centroids[c * d..(c + 1) * d];
                if count[c] == 0 {
                    // Empty list: restart it on a random training key.
                    let t = train[rng.below(train.len() as u64) as usize] as usize;
                    dst.copy_from_slice(row(keys, d, t));
                } else {
                    let s = &sum[c * d..(c + 1) * d];
                    dst.iter_mut()
                        .zip(s)
                        .for_each(|(x, acc)| *x = (acc / count[c] as f64) as f32);
                }
            }
        }
        let norms = row_norms(&centroids, d);
        let mut lists = vec![Vec::new(); nl];
        for t in 0..n {
            lists[nearest(&centroids, &norms, d, row(keys, d, t)) as usize].push(t as u32);
        }
        Self {
            d,
            centroids,
            lists,
        }
    }

    pub fn lists(&self) -> &[Vec<u32>] {
        &self.lists
    }

    /// List numbers in probe order for `q`: descending `q.c`.
    pub fn probe_order(&self, q: &[f32]) -> Vec<u32> {
        let scores: Vec<f32> = self
            .centroids
            .chunks_exact(self.d)
            .map(|c| dot_f32(q, c))
            .collect();
        let mut idx = vec![0u32; scores.len()];
        let mut val = vec![0.0f32; scores.len()];
        let got = top_k(&scores, scores.len(), &mut idx, &mut val);
        idx.truncate(got);
        idx
    }
}

/// The scan an IVF needs to reach a recall target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScanAtRecall {
    /// Lists probed (the same for every query: the smallest count whose
    /// mean recall reaches the target).
    pub probes: usize,
    pub lists: usize,
    /// Mean recall@k at that probe count.
    pub recall: f64,
    /// Mean percentage of the visible keys scanned at that probe count.
    pub scan_pct: f64,
}

/// Probes `ivf` for every query `(q, visible)` (keys `0..visible` are
/// the candidates) and returns the smallest global probe count whose mean
/// recall@`k` reaches `target`, with the scan it costs.
pub fn scan_for_recall<'a>(
    ivf: &Ivf,
    keys: &[f32],
    queries: impl IntoIterator<Item = (&'a [f32], usize)>,
    k: usize,
    target: f64,
) -> ScanAtRecall {
    let d = ivf.d;
    let nl = ivf.lists.len();
    let mut recall_sum = vec![0.0f64; nl];
    let mut scan_sum = vec![0.0f64; nl];
    let mut count = 0usize;
    let mut in_top = vec![false; keys.len() / d];
    let mut idx = vec![0u32; k];
    let mut val = vec![0.0f32; k];
    for (q, visible) in queries {
        let scores: Vec<f32> = keys[..visible * d]
            .chunks_exact(d)
            .map(|kt| dot_f32(q, kt))
            .collect();
        let kk = top_k(&scores, k.min(visible), &mut idx, &mut val);
        idx[..kk].iter().for_each(|&t| in_top[t as usize] = true);
        let (mut hits, mut scanned) = (0usize, 0usize);
        for (p, &list) in ivf.probe_order(q).iter().enumerate() {
            for &t in &ivf.lists[list as usize] {
                if (t as usize) < visible {
                    scanned += 1;
                    hits += usize::from(in_top[t as usize]);
                }
            }
            recall_sum[p] += hits as f64 / kk.max(1) as f64;
            scan_sum[p] += scanned as f64 / visible as f64;
        }
        idx[..kk].iter().for_each(|&t| in_top[t as usize] = false);
        count += 1;
    }
    assert!(count > 0, "scan_for_recall: no queries");
    let c = count as f64;
    // Recall reaches 1 once every list is probed, so a probe count exists.
    let p = (0..nl)
        .find(|&p| recall_sum[p] / c >= target - 1e-12)
        .unwrap_or(nl - 1);
    ScanAtRecall {
        probes: p + 1,
        lists: nl,
        recall: recall_sum[p] / c,
        scan_pct: 100.0 * scan_sum[p] / c,
    }
}

fn row(m: &[f32], d: usize, i: usize) -> &[f32] {
    &m[i * d..(i + 1) * d]
}

fn row_norms(m: &[f32], d: usize) -> Vec<f32> {
    m.chunks_exact(d).map(|r| dot_f32(r, r)).collect()
}

/// Nearest centroid in L2: argmin `|c|^2 - 2 x.c`.
fn nearest(centroids: &[f32], norms: &[f32], d: usize, x: &[f32]) -> u32 {
    let mut best = (f32::INFINITY, 0u32);
    for (i, (c, nc)) in centroids.chunks_exact(d).zip(norms).enumerate() {
        let dist = nc - 2.0 * dot_f32(x, c);
        if dist < best.0 {
            best = (dist, i as u32);
        }
    }
    best.1
}

/// `m` distinct values of `0..n`, ascending (partial Fisher-Yates).
fn sample_distinct(rng: &mut Rng, n: usize, m: usize) -> Vec<u32> {
    let m = m.min(n);
    let mut all: Vec<u32> = (0..n as u32).collect();
    for i in 0..m {
        let j = i + rng.below((n - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(m);
    all.sort_unstable();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clustered_keys_need_few_probes() {
        // 16 tight clusters far apart, centres of equal norm (so that the
        // largest q.c is the nearest centre); queries equal to the centres.
        let (d, per) = (16, 64);
        let mut rng = Rng::new(3);
        let centres: Vec<Vec<f32>> = (0..16)
            .map(|_| {
                let c: Vec<f64> = rng.normals(d);
                let norm = crate::linalg::norm(&c);
                c.iter().map(|x| (x * 40.0 / norm) as f32).collect()
            })
            .collect();
        let mut keys = Vec::new();
        for c in &centres {
            for _ in 0..per {
                keys.extend(c.iter().map(|x| x + (rng.normal() * 0.1) as f32));
            }
        }
        let ivf = Ivf::build(
            &keys,
            d,
            &IvfConfig {
                lists: 16,
                ..IvfConfig::default()
            },
        );
        assert_eq!(ivf.lists().iter().map(Vec::len).sum::<usize>(), 16 * per);
        let n = 16 * per;
        let r = scan_for_recall(
            &ivf,
            &keys,
            centres.iter().map(|c| (c.as_slice(), n)),
            32,
            0.9,
        );
        assert!(r.recall >= 0.9 - 1e-9);
        // One list per cluster, or two when k-means merged a pair.
        assert!(r.scan_pct <= 100.0 / 16.0 * 2.0 + 1e-9, "{r:?}");
    }

    #[test]
    fn random_assignment_needs_a_large_scan() {
        // Gaussian keys, queries along random directions: no structure to use.
        let (d, n) = (32, 2048);
        let mut rng = Rng::new(4);
        let keys: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let qs: Vec<Vec<f32>> = (0..8)
            .map(|_| (0..d).map(|_| rng.normal() as f32).collect())
            .collect();
        let ivf = Ivf::build(&keys, d, &IvfConfig::default());
        let r = scan_for_recall(&ivf, &keys, qs.iter().map(|q| (q.as_slice(), n)), 100, 0.9);
        assert!(r.recall >= 0.9 - 1e-9 && r.scan_pct > 10.0, "{r:?}");
        // A visible prefix: only those keys count.
        let r = scan_for_recall(
            &ivf,
            &keys,
            qs.iter().map(|q| (q.as_slice(), n / 2)),
            100,
            0.9,
        );
        assert!(r.recall >= 0.9 - 1e-9 && r.scan_pct <= 100.0);
    }
}

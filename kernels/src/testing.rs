//! Test support: a seeded generator and f64 references.

/// SplitMix64: small, seeded, good enough for test data.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Standard normal (Box-Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform();
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    pub(crate) fn normal_vec(&mut self, n: usize, sigma: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * sigma) as f32).collect()
    }

    /// `normal_vec` rounded to a storage type (K or V as a tier holds it).
    pub(crate) fn normal_kv<E: crate::KvElem>(&mut self, n: usize, sigma: f64) -> Vec<E> {
        self.normal_vec(n, sigma)
            .into_iter()
            .map(E::from_f32)
            .collect()
    }
}

/// Attention of `heads` queries over `rows` of `k`, `v` (`[n][d]`), in
/// f64, scale `1/sqrt(d)`: `(o [heads][d], lse [heads])`.
pub(crate) fn attention_f64(
    heads: usize,
    d: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rows: &[u32],
) -> (Vec<f64>, Vec<f64>) {
    let scale = 1.0 / (d as f64).sqrt();
    let mut o = vec![0.0f64; heads * d];
    let mut lse = vec![f64::NEG_INFINITY; heads];
    for h in 0..heads {
        let qh = &q[h * d..(h + 1) * d];
        let scores: Vec<f64> = rows
            .iter()
            .map(|&r| {
                let kr = &k[r as usize * d..(r as usize + 1) * d];
                scale
                    * qh.iter()
                        .zip(kr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
            })
            .collect();
        let Some(m) = scores.iter().copied().reduce(f64::max) else {
            continue;
        };
        let mut l = 0.0;
        for (&r, s) in rows.iter().zip(&scores) {
            let w = (s - m).exp();
            l += w;
            let vr = &v[r as usize * d..(r as usize + 1) * d];
            for (acc, x) in o[h * d..(h + 1) * d].iter_mut().zip(vr) {
                *acc += w * *x as f64;
            }
        }
        o[h * d..(h + 1) * d].iter_mut().for_each(|x| *x /= l);
        lse[h] = m + l.ln();
    }
    (o, lse)
}

/// `||got - want|| / ||want||` (the absolute error when `want` is zero).
pub(crate) fn relerr(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - b).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|b| b * b).sum();
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

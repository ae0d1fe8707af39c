//! Dense building blocks of the index: blocked inner products of a set of
//! rows against another, exact top-k by inner product, k-means (L2), a
//! seeded generator, and a deterministic parallel loop.
//!
//! Determinism: every result here depends only on the inputs and the seed,
//! never on the thread count: work is split into fixed units whose outputs
//! land in fixed places. The AVX2 and portable paths round differently, so
//! bits may differ between CPU kinds, not between runs on one machine.

use crate::simd;
use crate::topk::top_k;

/// Keys per panel of a [`Packed`] operand: two AVX2 vectors.
pub(crate) const PANEL: usize = 16;
/// Rows of the left operand per micro-kernel call: 4 rows x 16 keys are
/// eight accumulators, and each channel costs 2 panel loads and 4
/// broadcasts for 8 FMAs, so the kernel is FMA-bound, not load-bound.
const MR: usize = 4;

/// The right operand of [`scores`], packed once: panels of [`PANEL`] rows
/// stored channel-major (`[panels][d][PANEL]`, the last panel
/// zero-padded), so the kernel multiplies a broadcast query element by 16
/// keys at once and needs no horizontal sums.
#[derive(Debug, Clone, Default)]
pub(crate) struct Packed {
    pub(crate) d: usize,
    pub(crate) rows: usize,
    data: Vec<f32>,
}

impl Packed {
    /// Packs the rows of `m` (`[rows][d]`).
    pub(crate) fn new(m: &[f32], d: usize) -> Self {
        let rows = m.len().checked_div(d).unwrap_or(0);
        let mut p = Self {
            d,
            rows: 0,
            data: Vec::with_capacity(rows.div_ceil(PANEL) * PANEL * d),
        };
        for r in 0..rows {
            p.push(&m[r * d..(r + 1) * d]);
        }
        p
    }

    /// Packs rows `ids` of `m` (`[..][d]`), in that order.
    pub(crate) fn gather(m: &[f32], d: usize, ids: &[u32]) -> Self {
        let mut p = Self {
            d,
            rows: 0,
            data: Vec::with_capacity(ids.len().div_ceil(PANEL) * PANEL * d),
        };
        for &t in ids {
            p.push(&m[t as usize * d..(t as usize + 1) * d]);
        }
        p
    }

    /// Appends one row.
    pub(crate) fn push(&mut self, row: &[f32]) {
        let d = self.d;
        let j = self.rows % PANEL;
        if j == 0 {
            self.data.resize(self.data.len() + PANEL * d, 0.0);
        }
        let base = (self.rows / PANEL) * PANEL * d;
        for (c, &x) in row[..d].iter().enumerate() {
            self.data[base + c * PANEL + j] = x;
        }
        self.rows += 1;
    }

    fn panel(&self, p: usize) -> &[f32] {
        &self.data[p * PANEL * self.d..(p + 1) * PANEL * self.d]
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.data.capacity() * 4
    }
}

/// `out[i * stride + j] = scale * a_i . b_j` for the `ra` rows of `a`
/// (`[ra][d]`) and every row `j` of `b`.
pub(crate) fn scores(a: &[f32], ra: usize, b: &Packed, scale: f32, out: &mut [f32], stride: usize) {
    let d = b.d;
    assert!(a.len() >= ra * d, "scores: short input");
    assert!(
        stride >= b.rows && (ra == 0 || out.len() >= (ra - 1) * stride + b.rows),
        "scores: short output"
    );
    scores_panels(a, ra, b, 0..b.rows.div_ceil(PANEL), scale, out, stride);
}

/// [`scores`] against the rows of panels `panels` of `b` only: `out[i *
/// stride + j]` is row `panels.start * PANEL + j`.
pub(crate) fn scores_panels(
    a: &[f32],
    ra: usize,
    b: &Packed,
    panels: std::ops::Range<usize>,
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    let cols = (panels.end * PANEL)
        .min(b.rows)
        .saturating_sub(panels.start * PANEL);
    assert!(a.len() >= ra * b.d, "scores: short input");
    assert!(
        stride >= cols && (ra == 0 || out.len() >= (ra - 1) * stride + cols),
        "scores: short output"
    );
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        // SAFETY: the CPU has AVX2+FMA+F16C (checked).
        unsafe { scores_avx2(a, ra, b, panels, scale, out, stride) };
        return;
    }
    scores_impl::<false>(a, ra, b, panels, scale, out, stride);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_avx2(
    a: &[f32],
    ra: usize,
    b: &Packed,
    panels: std::ops::Range<usize>,
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    scores_impl::<true>(a, ra, b, panels, scale, out, stride);
}

/// Keys per chunk of the right operand: a chunk (512 KiB at d = 128)
/// stays in L2 while every row block passes over it.
const CHUNK_PANELS: usize = 64;

#[inline(always)]
fn scores_impl<const FMA: bool>(
    a: &[f32],
    ra: usize,
    b: &Packed,
    panels: std::ops::Range<usize>,
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    let d = b.d;
    let base = panels.start * PANEL;
    let mut tile = [[0.0f32; PANEL]; MR];
    for p0 in panels.clone().step_by(CHUNK_PANELS) {
        let p1 = (p0 + CHUNK_PANELS).min(panels.end);
        let mut i = 0;
        while i < ra {
            let rows = MR.min(ra - i);
            for p in p0..p1 {
                micro::<FMA>(&a[i * d..(i + rows) * d], rows, d, b.panel(p), &mut tile);
                let j0 = p * PANEL;
                let len = PANEL.min(b.rows - j0);
                let j0 = j0 - base;
                for (r, t) in tile.iter().enumerate().take(rows) {
                    let o = &mut out[(i + r) * stride + j0..(i + r) * stride + j0 + len];
                    for (x, y) in o.iter_mut().zip(t) {
                        *x = y * scale;
                    }
                }
            }
            i += rows;
        }
    }
}

/// `tile[r][j] = a_r . panel_j` for `rows <= MR` rows of `a`.
#[inline(always)]
fn micro<const FMA: bool>(
    a: &[f32],
    rows: usize,
    d: usize,
    panel: &[f32],
    tile: &mut [[f32; PANEL]; MR],
) {
    #[cfg(target_arch = "x86_64")]
    if FMA && rows == MR {
        // SAFETY: FMA is only set inside AVX2+FMA functions; a holds MR rows
        // of d and the panel d x PANEL (checked by the slicing above).
        unsafe { x86::micro_mr(a, d, panel, tile) };
        return;
    }
    for (r, t) in tile.iter_mut().enumerate().take(rows) {
        let ar = &a[r * d..(r + 1) * d];
        let mut acc = [0.0f32; PANEL];
        for (c, &x) in ar.iter().enumerate() {
            let pc = &panel[c * PANEL..(c + 1) * PANEL];
            for j in 0..PANEL {
                acc[j] = simd::fmadd::<FMA>(x, pc[j], acc[j]);
            }
        }
        *t = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, PANEL};
    use std::arch::x86_64::*;

    /// `q . r_i` for four rows, two accumulators each (eight chains, so
    /// the FMA latency is hidden).
    ///
    /// # Safety
    /// AVX2+FMA; `q.len() % 8 == 0` (row lengths are checked).
    #[inline(always)]
    pub(super) unsafe fn dot_rows(q: &[f32], r: [&[f32]; 4]) -> [f32; 4] {
        let d = q.len();
        assert!(d.is_multiple_of(8) && r.iter().all(|x| x.len() >= d));
        let qp = q.as_ptr();
        let rp = r.map(|x| x.as_ptr());
        // SAFETY: offsets below are < d in every slice (checked above).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            let mut c = 0;
            while c + 16 <= d {
                let x0 = _mm256_loadu_ps(qp.add(c));
                let x1 = _mm256_loadu_ps(qp.add(c + 8));
                for i in 0..4 {
                    acc[i][0] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(rp[i].add(c)), acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(rp[i].add(c + 8)), acc[i][1]);
                }
                c += 16;
            }
            if c < d {
                let x0 = _mm256_loadu_ps(qp.add(c));
                for i in 0..4 {
                    acc[i][0] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(rp[i].add(c)), acc[i][0]);
                }
            }
            let mut out = [0.0f32; 4];
            for i in 0..4 {
                let a = _mm256_add_ps(acc[i][0], acc[i][1]);
                let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                let h = _mm_add_ss(h, _mm_movehdup_ps(h));
                out[i] = _mm_cvtss_f32(h);
            }
            out
        }
    }

    /// `MR` rows of `a` against one panel.
    ///
    /// # Safety
    /// AVX2+FMA; `a.len() >= MR * d`, `panel.len() >= d * PANEL`.
    #[inline(always)]
    pub(super) unsafe fn micro_mr(
        a: &[f32],
        d: usize,
        panel: &[f32],
        tile: &mut [[f32; PANEL]; MR],
    ) {
        assert!(a.len() >= MR * d && panel.len() >= d * PANEL);
        let (ap, pp) = (a.as_ptr(), panel.as_ptr());
        // SAFETY: offsets below are < 4 d into a and < d * PANEL into panel.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            for c in 0..d {
                let b0 = _mm256_loadu_ps(pp.add(c * PANEL));
                let b1 = _mm256_loadu_ps(pp.add(c * PANEL + 8));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*ap.add(r * d + c));
                    acc_r[0] = _mm256_fmadd_ps(x, b0, acc_r[0]);
                    acc_r[1] = _mm256_fmadd_ps(x, b1, acc_r[1]);
                }
            }
            for (t, acc_r) in tile.iter_mut().zip(&acc) {
                _mm256_storeu_ps(t.as_mut_ptr(), acc_r[0]);
                _mm256_storeu_ps(t.as_mut_ptr().add(8), acc_r[1]);
            }
        }
    }
}

/// `a . b` with the fastest path this CPU has (for single products off
/// the hot loops).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        // SAFETY: the CPU has AVX2+FMA (checked).
        return unsafe { dot_avx2(a, b) };
    }
    simd::dot::<false>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    simd::dot::<true>(a, b)
}

/// `s[t] = q . row_t` for every row of `keys` (`[n][q.len()]`): one pass.
pub(crate) fn scan(q: &[f32], keys: &[f32], s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        // SAFETY: the CPU has AVX2+FMA (checked).
        unsafe { scan_avx2(q, keys, s) };
        return;
    }
    scan_impl::<false>(q, keys, s);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scan_avx2(q: &[f32], keys: &[f32], s: &mut [f32]) {
    scan_impl::<true>(q, keys, s);
}

#[inline(always)]
fn scan_impl<const FMA: bool>(q: &[f32], keys: &[f32], s: &mut [f32]) {
    let d = q.len();
    let n = keys.len() / d;
    let s = &mut s[..n];
    let row = |t: usize| &keys[t * d..(t + 1) * d];
    let mut t = 0;
    while t + 4 <= n {
        let r = dot_rows::<FMA>(q, [row(t), row(t + 1), row(t + 2), row(t + 3)]);
        s[t..t + 4].copy_from_slice(&r);
        t += 4;
    }
    while t < n {
        s[t] = simd::dot::<FMA>(q, row(t));
        t += 1;
    }
}

/// `q . r_i` for four rows. Inside an AVX2+FMA function (`FMA`) and for
/// `d % 8 == 0`, written with intrinsics: LLVM's vectoriser turns the
/// portable [`simd::dot4`] into shuffles here (measured: the exact scan
/// ran at a fifth of its memory bandwidth).
#[inline(always)]
pub(crate) fn dot_rows<const FMA: bool>(q: &[f32], r: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if FMA && q.len().is_multiple_of(8) {
        // SAFETY: FMA is only set inside AVX2+FMA functions; lengths are
        // checked in the callee.
        return unsafe { x86::dot_rows(q, r) };
    }
    r.map(|row| simd::dot::<FMA>(q, row))
}

/// Squared L2 norm of each row of `m` (`[rows][d]`).
pub(crate) fn row_norms(m: &[f32], d: usize) -> Vec<f32> {
    m.chunks_exact(d).map(|r| dot(r, r)).collect()
}

/// Threads to use: `requested`, or the machine's parallelism when 0.
pub(crate) fn threads(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Runs `f(unit, out_unit)` for every unit of `out` cut into `units`
/// pieces of `unit_len` elements (the last may be shorter), on up to
/// `threads` threads. Each unit's output depends only on its index, so the
/// result does not depend on `threads`.
pub(crate) fn par_units<T: Send, F>(out: &mut [T], unit_len: usize, threads: usize, f: F)
where
    F: Fn(usize, &mut [T]) + Sync,
{
    assert!(unit_len > 0, "par_units: empty unit");
    let units: Vec<(usize, &mut [T])> = out.chunks_mut(unit_len).enumerate().collect();
    let threads = threads.clamp(1, units.len().max(1));
    if threads == 1 {
        for (i, u) in units {
            f(i, u);
        }
        return;
    }
    // Units are handed out in order from a shared cursor, so threads that
    // are slowed down (a shared machine) do not leave others idle.
    let queue = std::sync::Mutex::new(units.into_iter());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let next = queue.lock().map(|mut q| q.next());
                    match next {
                        Ok(Some((i, u))) => f(i, u),
                        _ => break,
                    }
                }
            });
        }
    });
}

/// Queries per unit of [`exact_top_k`].
const ROW_BLOCK: usize = 32;
/// Panels scored at a time by [`exact_top_k`] (1024 keys): the
/// `ROW_BLOCK x 1024` scores (128 KiB) stay in L2 until filtered.
const TOPK_PANELS: usize = 64;

/// A bounded best-`k` list fed in increasing id order: the worst entry
/// is the root of a min-heap, so an id that only ties it stays out
/// (ties go to the lower id, as in [`crate::topk::top_k`]).
struct Best {
    k: usize,
    idx: Vec<u32>,
    val: Vec<f32>,
}

impl Best {
    fn new(k: usize) -> Self {
        Self {
            k,
            idx: Vec::with_capacity(k),
            val: Vec::with_capacity(k),
        }
    }

    fn clear(&mut self) {
        self.idx.clear();
        self.val.clear();
    }

    /// Scores below this cannot enter.
    #[inline(always)]
    fn threshold(&self) -> f32 {
        if self.idx.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.val[0]
        }
    }

    fn push(&mut self, id: u32, v: f32) {
        let worse = |val: &[f32], idx: &[u32], a: usize, b: usize| {
            val[a] < val[b] || (val[a] == val[b] && idx[a] > idx[b])
        };
        if self.idx.len() < self.k {
            self.idx.push(id);
            self.val.push(v);
            let mut i = self.idx.len() - 1;
            while i > 0 {
                let p = (i - 1) / 2;
                if !worse(&self.val, &self.idx, i, p) {
                    break;
                }
                self.idx.swap(i, p);
                self.val.swap(i, p);
                i = p;
            }
        } else if v > self.val[0] {
            self.idx[0] = id;
            self.val[0] = v;
            let len = self.k;
            let mut i = 0;
            loop {
                let (l, r) = (2 * i + 1, 2 * i + 2);
                let mut w = i;
                if l < len && worse(&self.val, &self.idx, l, w) {
                    w = l;
                }
                if r < len && worse(&self.val, &self.idx, r, w) {
                    w = r;
                }
                if w == i {
                    break;
                }
                self.idx.swap(i, w);
                self.val.swap(i, w);
                i = w;
            }
        }
    }

    /// Writes the list best first into `out` (padded by the caller).
    fn drain_into(&mut self, out: &mut [(u32, f32)]) {
        let mut all: Vec<(u32, f32)> = self
            .idx
            .iter()
            .copied()
            .zip(self.val.iter().copied())
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out[..all.len()].copy_from_slice(&all);
        self.clear();
    }
}

/// Exact top-`k` keys by inner product for each query: `ids` and `scores`
/// are `[m][k]`, best first (ties to the lower id); rows with fewer than
/// `k` keys are padded with `u32::MAX` / `-inf`. Scores are computed a
/// block of keys at a time and only those above a query's current k-th
/// best reach its list. Queries must be finite (NaN scores are skipped).
pub(crate) fn exact_top_k(
    keys: &Packed,
    queries: &[f32],
    k: usize,
    threads: usize,
    ids: &mut [u32],
    scores_out: &mut [f32],
) {
    let d = keys.d;
    let n = keys.rows;
    let m = queries.len() / d;
    assert!(
        ids.len() == m * k && scores_out.len() == m * k,
        "exact_top_k: outputs are not [m][k]"
    );
    if m == 0 || k == 0 {
        return;
    }
    let panels = n.div_ceil(PANEL);
    let cols = TOPK_PANELS * PANEL;
    // One unit = ROW_BLOCK queries; ids and scores are written together.
    let mut pairs: Vec<(u32, f32)> = vec![(u32::MAX, f32::NEG_INFINITY); m * k];
    par_units(&mut pairs, ROW_BLOCK * k, threads, |u, out| {
        let q0 = u * ROW_BLOCK;
        let rows = out.len() / k;
        let a = &queries[q0 * d..(q0 + rows) * d];
        let mut s = vec![0.0f32; rows * cols];
        let mut best: Vec<Best> = (0..rows).map(|_| Best::new(k)).collect();
        for p0 in (0..panels).step_by(TOPK_PANELS) {
            let p1 = (p0 + TOPK_PANELS).min(panels);
            let j0 = p0 * PANEL;
            let len = (p1 * PANEL).min(n) - j0;
            scores_panels(a, rows, keys, p0..p1, 1.0, &mut s, cols);
            for (r, b) in best.iter_mut().enumerate() {
                let row = &s[r * cols..r * cols + len];
                let mut th = b.threshold();
                // Eight at a time: most blocks have nothing above the
                // threshold once the list is full.
                for (c8, x8) in row.chunks(8).enumerate() {
                    if x8.iter().all(|&x| x <= th) {
                        continue;
                    }
                    for (i, &x) in x8.iter().enumerate() {
                        if x > th {
                            b.push((j0 + c8 * 8 + i) as u32, x);
                            th = b.threshold();
                        }
                    }
                }
            }
        }
        for (r, b) in best.iter_mut().enumerate() {
            b.drain_into(&mut out[r * k..(r + 1) * k]);
        }
    });
    for (i, (id, s)) in pairs.into_iter().enumerate() {
        ids[i] = id;
        scores_out[i] = s;
    }
}

/// SplitMix64: the build's only randomness (k-means seeds), seeded by the
/// index configuration.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// `m` distinct values of `0..n`, ascending (partial Fisher-Yates).
pub(crate) fn sample_distinct(rng: &mut Rng, n: usize, m: usize) -> Vec<u32> {
    let m = m.min(n);
    let mut all: Vec<u32> = (0..n as u32).collect();
    for i in 0..m {
        let j = i + rng.below(n - i);
        all.swap(i, j);
    }
    all.truncate(m);
    all.sort_unstable();
    all
}

/// Nearest `p` centroids (L2) of each row of `x`: `[rows][p]`, nearest first.
pub(crate) fn nearest_centroids(
    x: &[f32],
    d: usize,
    centroids: &[f32],
    p: usize,
    threads: usize,
) -> Vec<u32> {
    let rows = x.len() / d;
    let nc = centroids.len() / d;
    let p = p.min(nc);
    let norms = row_norms(centroids, d);
    let packed = Packed::new(centroids, d);
    let mut out = vec![0u32; rows * p];
    const UNIT: usize = 256;
    par_units(&mut out, UNIT * p, threads, |u, o| {
        let r0 = u * UNIT;
        let len = o.len() / p;
        let mut s = vec![0.0f32; len * nc];
        // Rank by 2 x.c - |c|^2 (larger = nearer).
        scores(&x[r0 * d..(r0 + len) * d], len, &packed, 2.0, &mut s, nc);
        let mut idx = vec![0u32; p];
        let mut val = vec![0.0f32; p];
        for r in 0..len {
            let row = &mut s[r * nc..(r + 1) * nc];
            row.iter_mut().zip(&norms).for_each(|(a, nrm)| *a -= nrm);
            top_k(row, p, &mut idx, &mut val);
            o[r * p..(r + 1) * p].copy_from_slice(&idx[..p]);
        }
    });
    out
}

/// k-means++ seeding: each next centre is a sample row drawn with
/// probability proportional to its squared distance to the nearest centre
/// so far (so two seeds rarely share a cluster).
fn plus_plus(sample: &[f32], d: usize, nc: usize, rng: &mut Rng) -> Vec<f32> {
    let rows = sample.len() / d;
    let row = |i: usize| &sample[i * d..(i + 1) * d];
    let mut centres = Vec::with_capacity(nc * d);
    let mut near = vec![f64::INFINITY; rows];
    let mut pick = rng.below(rows);
    for _ in 0..nc {
        let c = row(pick).to_vec();
        let cn = dot(&c, &c);
        for (i, nd) in near.iter_mut().enumerate() {
            let r = row(i);
            let dist = f64::from((dot(r, r) + cn - 2.0 * dot(r, &c)).max(0.0));
            if dist < *nd {
                *nd = dist;
            }
        }
        centres.extend_from_slice(&c);
        let total: f64 = near.iter().sum();
        if total.is_nan() || total <= 0.0 {
            pick = rng.below(rows);
            continue;
        }
        let mut x = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        pick = rows - 1;
        for (i, &nd) in near.iter().enumerate() {
            if x < nd {
                pick = i;
                break;
            }
            x -= nd;
        }
    }
    centres
}

/// Lloyd's k-means (L2) of the rows of `x` into `clusters` centroids,
/// seeded by k-means++ and trained on at most `sample_per_cluster *
/// clusters` rows; an empty cluster restarts on a random sample row.
/// Returns `[clusters][d]`.
pub(crate) fn kmeans(
    x: &[f32],
    d: usize,
    clusters: usize,
    iters: usize,
    sample_per_cluster: usize,
    seed: u64,
    threads: usize,
) -> Vec<f32> {
    let n = x.len() / d;
    assert!(n > 0 && clusters > 0, "kmeans: empty input");
    let nc = clusters.min(n);
    let mut rng = Rng::new(seed);
    let train = sample_distinct(&mut rng, n, nc * sample_per_cluster);
    let sample: Vec<f32> = train
        .iter()
        .flat_map(|&t| x[t as usize * d..(t as usize + 1) * d].iter().copied())
        .collect();
    let mut centroids = plus_plus(&sample, d, nc, &mut rng);
    for _ in 0..iters {
        let assign = nearest_centroids(&sample, d, &centroids, 1, threads);
        let mut sum = vec![0.0f64; nc * d];
        let mut count = vec![0usize; nc];
        for (r, &a) in assign.iter().enumerate() {
            count[a as usize] += 1;
            let s = &mut sum[a as usize * d..(a as usize + 1) * d];
            s.iter_mut()
                .zip(&sample[r * d..(r + 1) * d])
                .for_each(|(acc, v)| *acc += f64::from(*v));
        }
        for c in 0..nc {
            let dst = &mut centroids[c * d..(c + 1) * d];
            if count[c] == 0 {
                let r = rng.below(train.len());
                dst.copy_from_slice(&sample[r * d..(r + 1) * d]);
            } else {
                let s = &sum[c * d..(c + 1) * d];
                dst.iter_mut()
                    .zip(s)
                    .for_each(|(v, acc)| *v = (acc / count[c] as f64) as f32);
            }
        }
    }
    centroids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng as TestRng;

    #[test]
    fn blocked_scores_match_plain_dots() {
        let mut r = TestRng::new(5);
        for (ra, rb, d) in [
            (1, 1, 8),
            (9, 70, 128),
            (17, 3, 24),
            (5, 130, 12),
            (4, 16, 8),
            (3, 1100, 16),
        ] {
            let a = r.normal_vec(ra * d, 1.0);
            let b = r.normal_vec(rb * d, 1.0);
            let stride = rb + 3;
            let mut out = vec![0.0; ra * stride];
            scores(&a, ra, &Packed::new(&b, d), 0.5, &mut out, stride);
            let mut portable = vec![0.0; ra * stride];
            scores_impl::<false>(
                &a,
                ra,
                &Packed::new(&b, d),
                0..rb.div_ceil(PANEL),
                0.5,
                &mut portable,
                stride,
            );
            for i in 0..ra {
                for j in 0..rb {
                    let want: f64 = (0..d)
                        .map(|c| f64::from(a[i * d + c]) * f64::from(b[j * d + c]))
                        .sum::<f64>()
                        * 0.5;
                    let got = f64::from(out[i * stride + j]);
                    assert!(
                        (got - want).abs() < 1e-4 * d as f64,
                        "{ra}x{rb}x{d} ({i},{j})"
                    );
                    let got = f64::from(portable[i * stride + j]);
                    assert!(
                        (got - want).abs() < 1e-4 * d as f64,
                        "portable {ra}x{rb}x{d} ({i},{j})"
                    );
                }
            }
        }
    }

    #[test]
    fn exact_top_k_is_the_sorted_prefix_whatever_the_threads() {
        let mut r = TestRng::new(6);
        let (n, m, d, k) = (300, 19, 16, 10);
        let keys = r.normal_vec(n * d, 1.0);
        let q = r.normal_vec(m * d, 1.0);
        let mut ids = vec![0; m * k];
        let mut sc = vec![0.0; m * k];
        let packed = Packed::new(&keys, d);
        exact_top_k(&packed, &q, k, 1, &mut ids, &mut sc);
        for i in 0..m {
            let mut all: Vec<(f32, u32)> = (0..n)
                .map(|t| {
                    (
                        dot(&q[i * d..(i + 1) * d], &keys[t * d..(t + 1) * d]),
                        t as u32,
                    )
                })
                .collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let want: Vec<u32> = all[..k].iter().map(|x| x.1).collect();
            assert_eq!(&ids[i * k..(i + 1) * k], &want[..], "query {i}");
        }
        let (mut ids2, mut sc2) = (vec![0; m * k], vec![0.0; m * k]);
        exact_top_k(&packed, &q, k, 3, &mut ids2, &mut sc2);
        assert_eq!(ids, ids2);
        assert_eq!(sc, sc2);
        // Fewer keys than k: padded.
        let (mut ids3, mut sc3) = (vec![0; 2 * 8], vec![0.0; 2 * 8]);
        exact_top_k(
            &Packed::new(&keys[..5 * d], d),
            &q[..2 * d],
            8,
            2,
            &mut ids3,
            &mut sc3,
        );
        assert_eq!(ids3[5..8], [u32::MAX; 3]);
        assert_eq!(sc3[7], f32::NEG_INFINITY);
    }

    #[test]
    fn kmeans_finds_separated_clusters() {
        let mut r = TestRng::new(7);
        let d = 8;
        let centres: Vec<Vec<f32>> = (0..4).map(|_| r.normal_vec(d, 20.0)).collect();
        let mut x = Vec::new();
        for i in 0..400 {
            let c = &centres[i % 4];
            x.extend(c.iter().map(|v| v + r.normal() as f32 * 0.1));
        }
        let c1 = kmeans(&x, d, 4, 10, 256, 1, 1);
        let c2 = kmeans(&x, d, 4, 10, 256, 1, 2);
        assert_eq!(c1, c2, "thread count changed the result");
        let near = nearest_centroids(&x, d, &c1, 1, 2);
        // Rows of one true cluster share one centroid.
        for i in 4..400 {
            assert_eq!(near[i], near[i % 4], "row {i}");
        }
    }
}

//! Partial attention with its log-sum-exp, and the exact merge of partials.
//!
//! For the query heads `h` of one GQA group (all sharing one KV head), a
//! scale `s` and a token set `A`:
//!
//! ```text
//! m_h   = max_{t in A} s*q_h.k_t
//! l_h   = sum_{t in A} exp(s*q_h.k_t - m_h)
//! o_h   = sum_{t in A} exp(s*q_h.k_t - m_h) * v_t / l_h
//! lse_h = m_h + ln(l_h)                      (A empty: lse = -inf, o = 0)
//! ```
//!
//! Layouts (row-major, no padding): `q [heads][d]` f32; `K`, `V` `[n][d]` in
//! f32, f16 or bf16 ([`KvElem`]); `o [heads][d]` f32; `lse [heads]` f32.
//!
//! Invariants:
//! * one pass over K and V, tile by tile ([`TILE`] tokens), each tile read
//!   once for all heads of the group; an online softmax per head (running
//!   max `m`, running sum `l`, output rescaled by `exp(m_old - m_new)`), all
//!   in f32;
//! * no allocation per call: tiles of f16/bf16 are converted into an
//!   [`AttnScratch`] made once by the caller;
//! * an empty or fully masked set gives `lse = -inf`, `o = 0`, never NaN;
//!   scores of any finite magnitude (1e4 and beyond) are safe because every
//!   exponent is taken relative to the running maximum;
//! * [`merge_into`] of the partials of disjoint sets equals the attention
//!   over their union (up to f32 rounding), whichever side is empty.
//!
//! Inputs must be finite. Shape mismatches are programming errors and panic.

use crate::elem::KvElem;
use crate::simd;

/// Tokens per tile: the K and V tiles of d = 128 (16 KiB each in f32) and
/// the running outputs of eight heads stay in L1. Divides 64, so a tile
/// never straddles a word of a [`Tokens::Mask`].
pub const TILE: usize = 32;

const _: () = assert!(64 % TILE == 0 && TILE.is_multiple_of(4));

/// Shape of one call: `heads` query heads of dimension `d` sharing one KV
/// head, scores multiplied by `scale` (usually `1/sqrt(d)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    pub heads: usize,
    pub d: usize,
    pub scale: f32,
}

/// Which rows of K and V the set `A` holds.
#[derive(Debug, Clone, Copy)]
pub enum Tokens<'a> {
    /// All `n` rows.
    All,
    /// Row `t` is in the set when bit `t % 64` of word `t / 64` is set;
    /// at least `ceil(n / 64)` words. All-zero tiles are skipped unread.
    Mask(&'a [u64]),
    /// These rows (each `< n`), gathered in this order; a row listed twice
    /// counts twice. Sorted rows read K and V in address order.
    Rows(&'a [u32]),
}

/// Scratch for [`partial_attention`], made once per worker.
#[derive(Debug, Clone)]
pub struct AttnScratch {
    heads_max: usize,
    d_max: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

impl AttnScratch {
    /// Scratch for calls with up to `heads_max` heads of dimension up to
    /// `d_max`: `(2 * TILE * d_max + (TILE + 2) * heads_max) * 4` bytes.
    pub fn new(heads_max: usize, d_max: usize) -> Self {
        Self {
            heads_max,
            d_max,
            k: vec![0.0; TILE * d_max],
            v: vec![0.0; TILE * d_max],
            s: vec![0.0; TILE * heads_max],
            m: vec![0.0; heads_max],
            l: vec![0.0; heads_max],
        }
    }
}

/// `(o, lse)` of the heads in `q` over the tokens `tokens` of `k`, `v`
/// (see the module documentation for the math and layouts).
#[allow(clippy::too_many_arguments)]
pub fn partial_attention<E: KvElem>(
    p: &AttnParams,
    q: &[f32],
    k: &[E],
    v: &[E],
    tokens: Tokens<'_>,
    scratch: &mut AttnScratch,
    o: &mut [f32],
    lse: &mut [f32],
) {
    assert!(p.d > 0, "attention: empty shape {p:?}");
    assert!(
        k.len() == v.len() && k.len().is_multiple_of(p.d),
        "attention: K and V are not [n][d]"
    );
    let geo = Geo {
        pitch: p.d,
        off: 0,
        n: k.len() / p.d,
    };
    checked(p, q, k, v, geo, tokens, scratch, o, lse);
}

/// [`partial_attention`] over KV head `head` of K and V stored
/// `[n][kv_heads][d]` (one token's heads together, as engines page them),
/// reading the head's rows in place; `tokens` index the `n` tokens.
#[allow(clippy::too_many_arguments)]
pub fn partial_attention_head<E: KvElem>(
    p: &AttnParams,
    q: &[f32],
    k: &[E],
    v: &[E],
    kv_heads: usize,
    head: usize,
    tokens: Tokens<'_>,
    scratch: &mut AttnScratch,
    o: &mut [f32],
    lse: &mut [f32],
) {
    assert!(p.d > 0 && kv_heads > 0, "attention: empty shape {p:?}");
    assert!(head < kv_heads, "attention: head {head} of {kv_heads}");
    let pitch = kv_heads * p.d;
    assert!(
        k.len() == v.len() && k.len().is_multiple_of(pitch),
        "attention: K and V are not [n][kv_heads][d]"
    );
    let geo = Geo {
        pitch,
        off: head * p.d,
        n: k.len() / pitch,
    };
    checked(p, q, k, v, geo, tokens, scratch, o, lse);
}

/// Where a head's rows are: row `t` is `[off + t * pitch, + d)`, `t < n`.
#[derive(Debug, Clone, Copy)]
struct Geo {
    pitch: usize,
    off: usize,
    n: usize,
}

impl Geo {
    #[inline(always)]
    fn row(&self, t: usize, d: usize) -> std::ops::Range<usize> {
        let a = self.off + t * self.pitch;
        a..a + d
    }

    /// Elements from row `t`'s start through the end of row `t + len - 1`.
    #[inline(always)]
    fn span(&self, t: usize, len: usize, d: usize) -> std::ops::Range<usize> {
        let a = self.off + t * self.pitch;
        a..a + (len - 1) * self.pitch + d
    }
}

#[allow(clippy::too_many_arguments)]
fn checked<E: KvElem>(
    p: &AttnParams,
    q: &[f32],
    k: &[E],
    v: &[E],
    geo: Geo,
    tokens: Tokens<'_>,
    scratch: &mut AttnScratch,
    o: &mut [f32],
    lse: &mut [f32],
) {
    let (heads, d) = (p.heads, p.d);
    assert!(heads > 0 && d > 0, "attention: empty shape {p:?}");
    assert!(
        heads <= scratch.heads_max && d <= scratch.d_max,
        "attention: {p:?} exceeds scratch ({} heads, d {})",
        scratch.heads_max,
        scratch.d_max
    );
    assert_eq!(q.len(), heads * d, "attention: q is not [heads][d]");
    assert_eq!(o.len(), heads * d, "attention: o is not [heads][d]");
    assert_eq!(lse.len(), heads, "attention: lse is not [heads]");
    if let Tokens::Mask(mask) = tokens {
        assert!(mask.len() * 64 >= geo.n, "attention: mask too short");
    }
    let AttnScratch {
        k: kbuf,
        v: vbuf,
        s,
        m,
        l,
        ..
    } = scratch;
    let (m, l) = (&mut m[..heads], &mut l[..heads]);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    o.fill(0.0);
    feed(p, q, k, v, geo, tokens, kbuf, vbuf, s, m, l, o);
    finish(d, m, l, o, lse);
}

/// Runs the tiles of `tokens` into the running `(m, l, o)` (o
/// unnormalised), on the AVX2 path when the CPU has it.
#[allow(clippy::too_many_arguments)]
fn feed<E: KvElem>(
    p: &AttnParams,
    q: &[f32],
    k: &[E],
    v: &[E],
    geo: Geo,
    tokens: Tokens<'_>,
    kbuf: &mut [f32],
    vbuf: &mut [f32],
    s: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    o: &mut [f32],
) {
    let mut st = Online {
        p,
        q,
        s: &mut s[..p.heads * TILE],
        m,
        l,
        o,
    };
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { attend_avx2(k, v, geo, tokens, kbuf, vbuf, &mut st) };
        return;
    }
    attend::<E, false>(k, v, geo, tokens, kbuf, vbuf, &mut st);
}

/// Normalises the running `(m, l, o)` into the answer `(o, lse)`.
fn finish(d: usize, m: &[f32], l: &[f32], o: &mut [f32], lse: &mut [f32]) {
    for (h, (oh, lse_h)) in o.chunks_exact_mut(d).zip(lse.iter_mut()).enumerate() {
        if l[h] > 0.0 {
            simd::scale(oh, 1.0 / l[h]);
            *lse_h = m[h] + l[h].ln();
        } else {
            oh.fill(0.0);
            *lse_h = f32::NEG_INFINITY;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<E: KvElem>(
    k: &[E],
    v: &[E],
    geo: Geo,
    tokens: Tokens<'_>,
    kbuf: &mut [f32],
    vbuf: &mut [f32],
    st: &mut Online<'_>,
) {
    attend::<E, true>(k, v, geo, tokens, kbuf, vbuf, st);
}

/// Partial attention accumulated over several calls (the blocks of a
/// sequence, each its own slice): the running maximum, sum and
/// unnormalised output of each head persist between [`AttnState::feed_head`]
/// calls, so no per-call normalisation and merge is paid; [`AttnState::finish`]
/// gives the same `(o, lse)` as one [`partial_attention`] over the union,
/// up to f32 rounding (the tiles fall at other token boundaries).
#[derive(Debug, Clone)]
pub struct AttnState {
    heads: usize,
    d: usize,
    m: Vec<f32>,
    l: Vec<f32>,
    o: Vec<f32>,
}

impl AttnState {
    pub fn new(heads: usize, d: usize) -> Self {
        AttnState {
            heads,
            d,
            m: vec![f32::NEG_INFINITY; heads],
            l: vec![0.0; heads],
            o: vec![0.0; heads * d],
        }
    }

    /// Back to the empty set.
    pub fn reset(&mut self) {
        self.m.fill(f32::NEG_INFINITY);
        self.l.fill(0.0);
        self.o.fill(0.0);
    }

    /// Adds `tokens` of KV head `head` of `k`, `v` (`[n][kv_heads][d]`) for
    /// the queries `q` (`[heads][d]`, scaled by `scale`).
    #[allow(clippy::too_many_arguments)]
    pub fn feed_head<E: KvElem>(
        &mut self,
        q: &[f32],
        scale: f32,
        k: &[E],
        v: &[E],
        kv_heads: usize,
        head: usize,
        tokens: Tokens<'_>,
        scratch: &mut AttnScratch,
    ) {
        let (heads, d) = (self.heads, self.d);
        let p = AttnParams { heads, d, scale };
        assert!(
            heads > 0 && d > 0 && kv_heads > 0,
            "attention: empty shape {p:?}"
        );
        assert!(head < kv_heads, "attention: head {head} of {kv_heads}");
        assert!(
            heads <= scratch.heads_max && d <= scratch.d_max,
            "attention: {p:?} exceeds scratch"
        );
        assert_eq!(q.len(), heads * d, "attention: q is not [heads][d]");
        let pitch = kv_heads * d;
        assert!(
            k.len() == v.len() && k.len().is_multiple_of(pitch),
            "attention: K and V are not [n][kv_heads][d]"
        );
        let geo = Geo {
            pitch,
            off: head * d,
            n: k.len() / pitch,
        };
        if let Tokens::Mask(mask) = tokens {
            assert!(mask.len() * 64 >= geo.n, "attention: mask too short");
        }
        let AttnScratch {
            k: kbuf,
            v: vbuf,
            s,
            ..
        } = scratch;
        feed(
            &p,
            q,
            k,
            v,
            geo,
            tokens,
            kbuf,
            vbuf,
            s,
            &mut self.m,
            &mut self.l,
            &mut self.o,
        );
    }

    /// The running max score and sum of exponentials (relative to that
    /// max) of each head, `[heads]` each: the log-sum-exp so far is
    /// `m + ln(l)` (`-inf` before any token). What a caller compares
    /// before and after feeding a block to learn that block's own mass
    /// (`l_after - l_before * exp(m_before - m_after)`, relative to
    /// `m_after`) without a second pass.
    pub fn running(&self) -> (&[f32], &[f32]) {
        (&self.m, &self.l)
    }

    /// `(o, lse)` over everything fed since the last reset.
    pub fn finish(&self, o: &mut [f32], lse: &mut [f32]) {
        assert_eq!(
            o.len(),
            self.heads * self.d,
            "attention: o is not [heads][d]"
        );
        assert_eq!(lse.len(), self.heads, "attention: lse is not [heads]");
        o.copy_from_slice(&self.o);
        finish(self.d, &self.m, &self.l, o, lse);
    }
}

/// Running state of the online softmax of one call.
struct Online<'a> {
    p: &'a AttnParams,
    q: &'a [f32],
    /// Scores, then weights, of the current tile: `[heads][TILE]`.
    s: &'a mut [f32],
    m: &'a mut [f32],
    l: &'a mut [f32],
    /// Unnormalised output: `[heads][d]`.
    o: &'a mut [f32],
}

#[inline(always)]
const fn low_bits(len: usize) -> u64 {
    if len >= 64 {
        u64::MAX
    } else {
        (1u64 << len) - 1
    }
}

#[inline(always)]
fn attend<E: KvElem, const FMA: bool>(
    k: &[E],
    v: &[E],
    geo: Geo,
    tokens: Tokens<'_>,
    kbuf: &mut [f32],
    vbuf: &mut [f32],
    st: &mut Online<'_>,
) {
    let d = st.p.d;
    let n = geo.n;
    match tokens {
        Tokens::All | Tokens::Mask(_) => {
            let mut start = 0;
            while start < n {
                let len = TILE.min(n - start);
                let valid = match tokens {
                    Tokens::Mask(mask) => (mask[start / 64] >> (start % 64)) & low_bits(len),
                    _ => low_bits(len),
                };
                if valid != 0 {
                    #[cfg(target_arch = "x86_64")]
                    if FMA && d.is_multiple_of(8) {
                        let span = geo.span(start, len, d);
                        // SAFETY: FMA is only set inside AVX2+FMA+F16C
                        // functions; d % 8 == 0.
                        unsafe {
                            tile_direct(st, &k[span.clone()], &v[span], geo.pitch, len, valid)
                        };
                        start += len;
                        continue;
                    }
                    if geo.pitch == d {
                        let rows = start * d..(start + len) * d;
                        let kt = simd::as_f32::<E, FMA>(&k[rows.clone()], kbuf);
                        let vt = simd::as_f32::<E, FMA>(&v[rows], vbuf);
                        tile::<FMA>(st, kt, vt, len, valid);
                    } else {
                        for j in 0..len {
                            let r = geo.row(start + j, d);
                            simd::widen::<E, FMA>(&k[r.clone()], &mut kbuf[j * d..]);
                            simd::widen::<E, FMA>(&v[r], &mut vbuf[j * d..]);
                        }
                        tile::<FMA>(st, &kbuf[..len * d], &vbuf[..len * d], len, valid);
                    }
                }
                start += len;
            }
        }
        Tokens::Rows(rows) => {
            for chunk in rows.chunks(TILE) {
                for (j, &r) in chunk.iter().enumerate() {
                    let r = r as usize;
                    assert!(r < n, "attention: row {r} out of {n}");
                    let r = geo.row(r, d);
                    simd::widen::<E, FMA>(&k[r.clone()], &mut kbuf[j * d..]);
                    simd::widen::<E, FMA>(&v[r], &mut vbuf[j * d..]);
                }
                let len = chunk.len();
                tile::<FMA>(st, &kbuf[..len * d], &vbuf[..len * d], len, low_bits(len));
            }
        }
    }
}

/// One tile of `len` tokens (`kt`, `vt`: `[len][d]` f32); bit `j` of
/// `valid` says whether token `j` is in the set (at least one is).
#[inline(always)]
fn row(t: &[f32], d: usize, j: usize) -> &[f32] {
    &t[j * d..(j + 1) * d]
}

#[inline(always)]
fn tile<const FMA: bool>(st: &mut Online<'_>, kt: &[f32], vt: &[f32], len: usize, valid: u64) {
    let (heads, d, scale) = (st.p.heads, st.p.d, st.p.scale);
    #[cfg(target_arch = "x86_64")]
    let intrinsics = FMA && d.is_multiple_of(8);
    #[cfg(not(target_arch = "x86_64"))]
    let intrinsics = false;
    if intrinsics {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: FMA is only set inside AVX2+FMA+F16C functions; d % 8 == 0.
        unsafe {
            simd::x86::scores(st.q, heads, d, kt, d, len, scale, st.s, TILE)
        };
    } else {
        for h in 0..heads {
            let qh = &st.q[h * d..(h + 1) * d];
            let sh = &mut st.s[h * TILE..h * TILE + len];
            let mut j = 0;
            while j + 4 <= len {
                let r = simd::dot4::<FMA>(
                    qh,
                    [
                        row(kt, d, j),
                        row(kt, d, j + 1),
                        row(kt, d, j + 2),
                        row(kt, d, j + 3),
                    ],
                );
                for i in 0..4 {
                    sh[j + i] = r[i] * scale;
                }
                j += 4;
            }
            while j < len {
                sh[j] = simd::dot::<FMA>(qh, row(kt, d, j)) * scale;
                j += 1;
            }
        }
    }
    online_update(st, len, valid);
    if intrinsics {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as for the scores above.
        unsafe {
            simd::x86::weighted_sum(st.s, TILE, heads, vt, d, len, d, st.o)
        };
        return;
    }
    let mut j = 0;
    while j + 4 <= len {
        let vr = [
            row(vt, d, j),
            row(vt, d, j + 1),
            row(vt, d, j + 2),
            row(vt, d, j + 3),
        ];
        for h in 0..heads {
            let w = &st.s[h * TILE + j..h * TILE + j + 4];
            simd::axpy4::<FMA>(&mut st.o[h * d..(h + 1) * d], [w[0], w[1], w[2], w[3]], vr);
        }
        j += 4;
    }
    while j < len {
        for h in 0..heads {
            let w = st.s[h * TILE + j];
            simd::axpy::<FMA>(&mut st.o[h * d..(h + 1) * d], w, row(vt, d, j));
        }
        j += 1;
    }
}

/// The online-softmax step of a tile whose scores are in `st.s`: masks
/// the tokens not in `valid`, rescales the running sums and outputs to the
/// new maximum, and leaves the weights `exp(s - m)` in `st.s`.
#[inline(always)]
fn online_update(st: &mut Online<'_>, len: usize, valid: u64) {
    let (heads, d) = (st.p.heads, st.p.d);
    let every = valid == low_bits(len);
    for h in 0..heads {
        let sh = &mut st.s[h * TILE..h * TILE + len];
        if !every {
            for (j, x) in sh.iter_mut().enumerate() {
                if valid >> j & 1 == 0 {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        // The set is shared by all heads, so every head has a finite
        // maximum in a tile with a valid token.
        let m_new = st.m[h].max(simd::max(sh));
        let alpha = simd::exp_approx(st.m[h] - m_new);
        let sum = simd::exp_sub_sum(sh, m_new);
        st.l[h] = st.l[h] * alpha + sum;
        st.m[h] = m_new;
        if alpha != 1.0 {
            simd::scale(&mut st.o[h * d..(h + 1) * d], alpha);
        }
    }
}

/// [`tile`] reading the stored K and V rows directly (row `j` at
/// `j * pitch`, converted to f32 in registers as it is loaded), with no
/// widening pass into scratch.
///
/// # Safety
/// AVX2+FMA+F16C; `d % 8 == 0`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_direct<E: KvElem>(
    st: &mut Online<'_>,
    kt: &[E],
    vt: &[E],
    pitch: usize,
    len: usize,
    valid: u64,
) {
    let (heads, d, scale) = (st.p.heads, st.p.d, st.p.scale);
    // SAFETY: per the contract (the lengths are checked inside).
    unsafe { simd::x86::scores(st.q, heads, d, kt, pitch, len, scale, st.s, TILE) };
    online_update(st, len, valid);
    // SAFETY: as above.
    unsafe { simd::x86::weighted_sum(st.s, TILE, heads, vt, pitch, len, d, st.o) };
}

/// Merges the partial `(o_b, lse_b)` into `(o, lse)` (both `[heads][d]`,
/// `[heads]`), exactly:
///
/// ```text
/// lse' = logaddexp(lse, lse_b)
/// o'   = exp(lse - lse')*o + exp(lse_b - lse')*o_b
/// ```
///
/// A side with `lse = -inf` (an empty set) contributes nothing; two empty
/// sides stay empty (`-inf`, `o = 0`).
pub fn merge_into(d: usize, o: &mut [f32], lse: &mut [f32], o_b: &[f32], lse_b: &[f32]) {
    let heads = lse.len();
    assert!(
        lse_b.len() == heads && o.len() == heads * d && o_b.len() == heads * d,
        "merge: shapes differ"
    );
    for h in 0..heads {
        let (a, b) = (lse[h], lse_b[h]);
        let oa = &mut o[h * d..(h + 1) * d];
        let ob = &o_b[h * d..(h + 1) * d];
        if b == f32::NEG_INFINITY {
            continue;
        }
        if a == f32::NEG_INFINITY {
            oa.copy_from_slice(ob);
            lse[h] = b;
            continue;
        }
        let m = a.max(b);
        let (wa, wb) = ((a - m).exp(), (b - m).exp());
        let total = wa + wb;
        lse[h] = m + total.ln();
        let (wa, wb) = (wa / total, wb / total);
        for (x, y) in oa.iter_mut().zip(ob) {
            *x = *x * wa + *y * wb;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, attention_f64, relerr};
    use half::{bf16, f16};
    use proptest::prelude::*;

    fn run<E: KvElem>(
        heads: usize,
        d: usize,
        q: &[f32],
        k: &[E],
        v: &[E],
        tokens: Tokens<'_>,
    ) -> (Vec<f32>, Vec<f32>) {
        let p = AttnParams {
            heads,
            d,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let mut scratch = AttnScratch::new(heads, d);
        let mut o = vec![f32::NAN; heads * d];
        let mut lse = vec![f32::NAN; heads];
        partial_attention(&p, q, k, v, tokens, &mut scratch, &mut o, &mut lse);
        (o, lse)
    }

    fn widen<E: KvElem>(x: &[E]) -> Vec<f32> {
        x.iter().map(|e| e.to_f32()).collect()
    }

    fn check_against_f64<E: KvElem>(heads: usize, d: usize, n: usize, seed: u64, tol: f64) {
        let mut rng = Rng::new(seed);
        let q = rng.normal_vec(heads * d, 1.0);
        let k: Vec<E> = rng.normal_kv(n * d, 1.0);
        let v: Vec<E> = rng.normal_kv(n * d, 1.0);
        let (kw, vw) = (widen(&k), widen(&v));
        let all: Vec<u32> = (0..n as u32).collect();
        let (o_ref, lse_ref) = attention_f64(heads, d, &q, &kw, &vw, &all);
        let (o, lse) = run(heads, d, &q, &k, &v, Tokens::All);
        let e = relerr(&o, &o_ref);
        assert!(e <= tol, "{} h{heads} d{d} n{n}: relerr {e:e}", E::NAME);
        for (a, b) in lse.iter().zip(&lse_ref) {
            assert!(
                (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "lse {a} vs {b}"
            );
        }
    }

    /// f32 accumulation in tiles against an f64 reference on the same
    /// (already rounded) inputs: relative L2 error <= 2e-6.
    #[test]
    fn matches_f64_reference() {
        for (i, &(heads, d, n)) in [
            (1, 64, 1),
            (8, 128, 1000),
            (4, 72, 33),
            (3, 5, 31),
            (8, 64, 257),
            (2, 128, 4096),
        ]
        .iter()
        .enumerate()
        {
            check_against_f64::<f32>(heads, d, n, i as u64, 2e-6);
            check_against_f64::<f16>(heads, d, n, 100 + i as u64, 2e-6);
            check_against_f64::<bf16>(heads, d, n, 200 + i as u64, 2e-6);
        }
    }

    /// COMPUTE.md §1: dense partial attention merged with a client part,
    /// against an f64 reference over the full set, relerr <= 5e-4 at 32K
    /// (measured 3.3e-6; asserted <= 1e-5).
    #[test]
    fn merged_32k_meets_the_exactness_target() {
        let (heads, d, n) = (2, 128, 32 * 1024);
        let mut rng = Rng::new(32);
        let q = rng.normal_vec(heads * d, 1.0);
        let k: Vec<f16> = rng.normal_kv(n * d, 1.0);
        let v: Vec<f16> = rng.normal_kv(n * d, 1.0);
        // The daemon holds everything but the first 128 and last 512 tokens.
        let mut ours = vec![0u64; n.div_ceil(64)];
        let mut client = vec![0u64; n.div_ceil(64)];
        for t in 0..n {
            let m = if t < 128 || t >= n - 512 {
                &mut client
            } else {
                &mut ours
            };
            m[t / 64] |= 1 << (t % 64);
        }
        let (mut o, mut lse) = run(heads, d, &q, &k, &v, Tokens::Mask(&ours));
        let (o_c, lse_c) = run(heads, d, &q, &k, &v, Tokens::Mask(&client));
        merge_into(d, &mut o, &mut lse, &o_c, &lse_c);
        let all: Vec<u32> = (0..n as u32).collect();
        let (o_ref, _) = attention_f64(heads, d, &q, &widen(&k), &widen(&v), &all);
        let e = relerr(&o, &o_ref);
        println!("32K merged relerr {e:e}");
        assert!(e <= 5e-4, "relerr {e:e}");
        assert!(e <= 1e-5, "relerr {e:e}: far worse than f32 rounding");
    }

    /// Storage precision: f16 and bf16 K/V against the f32 originals.
    /// With unit Gaussian data and d = 128, f16 (11-bit mantissa) moves
    /// the output by relerr <= 1e-3 (measured 3.1e-4), bf16 (8-bit) by
    /// <= 8e-3 (measured 2.5e-3).
    #[test]
    fn half_precision_storage_within_tolerance() {
        let (heads, d, n) = (8, 128, 2048);
        let mut rng = Rng::new(7);
        let q = rng.normal_vec(heads * d, 1.0);
        let k = rng.normal_vec(n * d, 1.0);
        let v = rng.normal_vec(n * d, 1.0);
        let (o32, _) = run(heads, d, &q, &k, &v, Tokens::All);
        let conv = |x: &[f32]| -> (Vec<f16>, Vec<bf16>) {
            (
                x.iter().map(|&a| f16::from_f32(a)).collect(),
                x.iter().map(|&a| bf16::from_f32(a)).collect(),
            )
        };
        let ((k16, kb), (v16, vb)) = (conv(&k), conv(&v));
        let (o16, _) = run(heads, d, &q, &k16, &v16, Tokens::All);
        let (ob, _) = run(heads, d, &q, &kb, &vb, Tokens::All);
        let (e16, eb) = (relerr(&o16, &to64(&o32)), relerr(&ob, &to64(&o32)));
        println!("f16 relerr {e16:e}, bf16 relerr {eb:e}");
        assert!(e16 <= 1e-3, "f16 relerr {e16:e}");
        assert!(eb <= 8e-3, "bf16 relerr {eb:e}");
    }

    fn to64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&a| a as f64).collect()
    }

    #[test]
    fn empty_and_fully_masked_sets_give_minus_infinity() {
        let (heads, d) = (4, 16);
        let mut rng = Rng::new(1);
        let q = rng.normal_vec(heads * d, 1.0);
        let k = rng.normal_vec(100 * d, 1.0);
        let v = rng.normal_vec(100 * d, 1.0);
        let none = vec![0u64; 2];
        for (o, lse) in [
            run::<f32>(heads, d, &q, &[], &[], Tokens::All),
            run(heads, d, &q, &k, &v, Tokens::Mask(&none)),
            run(heads, d, &q, &k, &v, Tokens::Rows(&[])),
        ] {
            assert!(o.iter().all(|&x| x == 0.0));
            assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY));
        }
        // Merging with an empty side returns the other side unchanged.
        let (o_full, lse_full) = run(heads, d, &q, &k, &v, Tokens::All);
        let (o_e, lse_e) = run(heads, d, &q, &k, &v, Tokens::Mask(&none));
        let (mut o, mut lse) = (o_e.clone(), lse_e.clone());
        merge_into(d, &mut o, &mut lse, &o_full, &lse_full);
        assert_eq!((&o, &lse), (&o_full, &lse_full));
        merge_into(d, &mut o, &mut lse, &o_e, &lse_e);
        assert_eq!((&o, &lse), (&o_full, &lse_full));
        let (mut o, mut lse) = (o_e.clone(), lse_e.clone());
        merge_into(d, &mut o, &mut lse, &o_e, &lse_e);
        assert!(o.iter().all(|&x| x == 0.0) && lse.iter().all(|&x| x == f32::NEG_INFINITY));
    }

    /// Scores of magnitude 1e4 (and 1e6) stay finite and exact: the set is
    /// dominated by a few tokens and nothing overflows.
    #[test]
    fn huge_scores_do_not_overflow() {
        let (heads, d, n) = (2, 32, 300);
        let mut rng = Rng::new(9);
        for mag in [1e4f32, 1e6] {
            let mut q = rng.normal_vec(heads * d, 1.0);
            let norm = (q.iter().map(|x| x * x).sum::<f32>() / heads as f32).sqrt();
            q.iter_mut().for_each(|x| *x *= mag.sqrt() / norm);
            let mut k = rng.normal_vec(n * d, 1.0);
            k.iter_mut()
                .for_each(|x| *x *= mag.sqrt() * (d as f32).sqrt().sqrt());
            let v = rng.normal_vec(n * d, 1.0);
            let (o, lse) = run(heads, d, &q, &k, &v, Tokens::All);
            assert!(o.iter().chain(&lse).all(|x| x.is_finite()));
            assert!(lse.iter().any(|x| x.abs() > mag / 10.0), "{lse:?}");
            let all: Vec<u32> = (0..n as u32).collect();
            let (o_ref, lse_ref) = attention_f64(heads, d, &q, &k, &v, &all);
            // Scores this large lose absolute precision in f32 (ulp(1e4) ~
            // 1e-3), so the softmax weights carry that error.
            assert!(relerr(&o, &o_ref) < 1e-2, "{mag}: {}", relerr(&o, &o_ref));
            for (a, b) in lse.iter().zip(&lse_ref) {
                assert!((*a as f64 - b).abs() <= 1e-5 * b.abs() + 1e-2);
            }
        }
    }

    #[test]
    fn rows_and_masks_select_the_same_set() {
        let (heads, d, n) = (3, 40, 500);
        let mut rng = Rng::new(5);
        let q = rng.normal_vec(heads * d, 1.0);
        let k: Vec<bf16> = rng.normal_kv(n * d, 1.0);
        let v: Vec<bf16> = rng.normal_kv(n * d, 1.0);
        let mut mask = vec![0u64; n.div_ceil(64)];
        let mut rows = Vec::new();
        for t in 0..n {
            if rng.below(3) == 0 || (200..264).contains(&t) {
                mask[t / 64] |= 1 << (t % 64);
                rows.push(t as u32);
            }
        }
        let (om, lm) = run(heads, d, &q, &k, &v, Tokens::Mask(&mask));
        let (or, lr) = run(heads, d, &q, &k, &v, Tokens::Rows(&rows));
        let (o_ref, lse_ref) = attention_f64(heads, d, &q, &widen(&k), &widen(&v), &rows);
        assert!(relerr(&om, &o_ref) < 2e-6 && relerr(&or, &o_ref) < 2e-6);
        for ((a, b), c) in lm.iter().zip(&lr).zip(&lse_ref) {
            assert!((*a as f64 - c).abs() < 1e-5 && (*b as f64 - c).abs() < 1e-5);
        }
    }

    /// The portable body (the one non-AVX2 CPUs run) agrees with the
    /// dispatched one, for head counts and dims on and off the blocking.
    #[test]
    fn one_head_of_interleaved_heads_equals_that_head_copied_out() {
        fn check<E: KvElem>(kv: usize, heads: usize, d: usize, n: usize, seed: u64) {
            let mut rng = Rng::new(seed);
            let q = rng.normal_vec(heads * d, 1.0);
            let k: Vec<E> = rng.normal_kv(n * kv * d, 1.0);
            let v: Vec<E> = rng.normal_kv(n * kv * d, 1.0);
            let p = AttnParams {
                heads,
                d,
                scale: 1.0 / (d as f32).sqrt(),
            };
            let rows: Vec<u32> = (0..n as u32).filter(|t| t % 4 != 2).collect();
            let mask: Vec<u64> = (0..n.div_ceil(64))
                .map(|w| 0x5555_5555_5555_5555u64.rotate_left(w as u32))
                .collect();
            let mut sc = AttnScratch::new(heads, d);
            for h in 0..kv {
                let pick = |x: &[E]| -> Vec<E> {
                    (0..n)
                        .flat_map(|t| x[(t * kv + h) * d..(t * kv + h + 1) * d].to_vec())
                        .collect()
                };
                let (kh, vh) = (pick(&k), pick(&v));
                for tokens in [Tokens::All, Tokens::Mask(&mask), Tokens::Rows(&rows)] {
                    let (mut o1, mut l1) = (vec![0.0; heads * d], vec![0.0; heads]);
                    let (mut o2, mut l2) = (vec![0.0; heads * d], vec![0.0; heads]);
                    partial_attention(&p, &q, &kh, &vh, tokens, &mut sc, &mut o1, &mut l1);
                    partial_attention_head(
                        &p, &q, &k, &v, kv, h, tokens, &mut sc, &mut o2, &mut l2,
                    );
                    // The same arithmetic in the same order: bit for bit.
                    assert_eq!(o1, o2, "{} kv{kv} h{h} d{d} {tokens:?}", E::NAME);
                    assert_eq!(l1, l2);
                }
            }
        }
        for (kv, heads, d, n) in [
            (3, 3, 64, 100),
            (2, 4, 128, 77),
            (8, 1, 24, 33),
            (3, 2, 12, 40),
        ] {
            check::<f16>(kv, heads, d, n, 1);
            check::<bf16>(kv, heads, d, n, 2);
            check::<f32>(kv, heads, d, n, 3);
        }
    }

    #[test]
    fn state_fed_block_by_block_is_attention_over_the_union() {
        let (kv, heads, d, n, block) = (2, 3, 64, 208, 16);
        let mut rng = Rng::new(77);
        let q = rng.normal_vec(heads * d, 1.0);
        let k: Vec<f16> = rng.normal_kv(n * kv * d, 1.0);
        let v: Vec<f16> = rng.normal_kv(n * kv * d, 1.0);
        let p = AttnParams {
            heads,
            d,
            scale: 0.125,
        };
        let mut sc = AttnScratch::new(heads, d);
        let mut st = AttnState::new(heads, d);
        let (mut o1, mut l1) = (vec![0.0; heads * d], vec![0.0; heads]);
        let (mut o2, mut l2) = (vec![0.0; heads * d], vec![0.0; heads]);
        let odd: Vec<u32> = (0..block as u32).filter(|t| t % 2 == 1).collect();
        for h in 0..kv {
            partial_attention_head(
                &p,
                &q,
                &k,
                &v,
                kv,
                h,
                Tokens::All,
                &mut sc,
                &mut o1,
                &mut l1,
            );
            st.reset();
            for b in (0..n).step_by(block) {
                let r = b * kv * d..(b + block).min(n) * kv * d;
                st.feed_head(&q, 0.125, &k[r.clone()], &v[r], kv, h, Tokens::All, &mut sc);
            }
            st.finish(&mut o2, &mut l2);
            assert!(relerr(&o2, &to64(&o1)) < 1e-6, "h{h}");
            for (a, b) in l1.iter().zip(&l2) {
                assert!((a - b).abs() < 1e-5);
            }
            // Rows of every block, and an empty state.
            st.reset();
            st.finish(&mut o2, &mut l2);
            assert!(l2.iter().all(|&x| x == f32::NEG_INFINITY) && o2.iter().all(|&x| x == 0.0));
            for b in (0..n).step_by(block) {
                let r = b * kv * d..(b + block) * kv * d;
                st.feed_head(
                    &q,
                    0.125,
                    &k[r.clone()],
                    &v[r],
                    kv,
                    h,
                    Tokens::Rows(&odd),
                    &mut sc,
                );
            }
            st.finish(&mut o2, &mut l2);
            let mask: Vec<u64> = vec![0xaaaa_aaaa_aaaa_aaaa; n.div_ceil(64)];
            partial_attention_head(
                &p,
                &q,
                &k,
                &v,
                kv,
                h,
                Tokens::Mask(&mask),
                &mut sc,
                &mut o1,
                &mut l1,
            );
            assert!(relerr(&o2, &to64(&o1)) < 1e-6, "rows h{h}");
        }
    }

    #[test]
    fn portable_and_dispatched_paths_agree() {
        for (heads, d, n) in [
            (8, 128, 700),
            (5, 64, 99),
            (3, 24, 40),
            (1, 8, 33),
            (2, 12, 50),
        ] {
            let mut rng = Rng::new(heads as u64 * 1000 + d as u64);
            let q = rng.normal_vec(heads * d, 1.0);
            let k: Vec<f16> = rng.normal_kv(n * d, 1.0);
            let v: Vec<f16> = rng.normal_kv(n * d, 1.0);
            let rows: Vec<u32> = (0..n as u32).filter(|t| t % 3 != 1).collect();
            for tokens in [Tokens::All, Tokens::Rows(&rows)] {
                let (o, lse) = run(heads, d, &q, &k, &v, tokens);
                let p = AttnParams {
                    heads,
                    d,
                    scale: 1.0 / (d as f32).sqrt(),
                };
                let mut scratch = AttnScratch::new(heads, d);
                let (mut o2, mut lse2) = (vec![0.0; heads * d], vec![0.0; heads]);
                let geo = Geo {
                    pitch: d,
                    off: 0,
                    n,
                };
                let (mut m, mut l) = (vec![f32::NEG_INFINITY; heads], vec![0.0; heads]);
                let AttnScratch {
                    k: kbuf,
                    v: vbuf,
                    s,
                    ..
                } = &mut scratch;
                let mut st = Online {
                    p: &p,
                    q: &q,
                    s: &mut s[..heads * TILE],
                    m: &mut m,
                    l: &mut l,
                    o: &mut o2,
                };
                attend::<f16, false>(&k, &v, geo, tokens, kbuf, vbuf, &mut st);
                finish(d, &m, &l, &mut o2, &mut lse2);
                assert!(relerr(&o2, &to64(&o)) < 1e-6, "h{heads} d{d}");
                for (a, b) in lse.iter().zip(&lse2) {
                    assert!((a - b).abs() < 1e-5);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Splitting the tokens into random disjoint parts (as masks or as
        /// row lists), attending to each and merging equals the attention
        /// over all of them.
        #[test]
        fn merge_of_disjoint_parts_is_full_attention(
            seed in any::<u64>(),
            n in 0usize..300,
            parts in 1usize..5,
            heads in 1usize..5,
            d in 1usize..40,
            as_rows in any::<bool>(),
        ) {
            let mut rng = Rng::new(seed);
            let q = rng.normal_vec(heads * d, 1.0);
            let k = rng.normal_vec(n * d, 1.0);
            let v = rng.normal_vec(n * d, 1.0);
            let mut masks = vec![vec![0u64; n.div_ceil(64).max(1)]; parts];
            let mut rows = vec![Vec::new(); parts];
            for t in 0..n {
                let part = rng.below(parts as u64) as usize;
                masks[part][t / 64] |= 1 << (t % 64);
                rows[part].push(t as u32);
            }
            let mut o = vec![0.0; heads * d];
            let mut lse = vec![f32::NEG_INFINITY; heads];
            for part in 0..parts {
                let tokens = if as_rows { Tokens::Rows(&rows[part]) } else { Tokens::Mask(&masks[part]) };
                let (o_p, lse_p) = run(heads, d, &q, &k, &v, tokens);
                merge_into(d, &mut o, &mut lse, &o_p, &lse_p);
            }
            let (o_full, lse_full) = run(heads, d, &q, &k, &v, Tokens::All);
            prop_assert!(o.iter().chain(&lse).all(|x| !x.is_nan()));
            prop_assert!(relerr(&o, &to64(&o_full)) <= 1e-5, "relerr {}", relerr(&o, &to64(&o_full)));
            for (a, b) in lse.iter().zip(&lse_full) {
                prop_assert!(a == b || (a - b).abs() <= 1e-5 * (1.0 + b.abs()));
            }
        }
    }
}

//! Vectorisable f32 building blocks shared by the kernels.
//!
//! Every function here is `#[inline(always)]` and most are generic over
//! `FMA`, so a kernel body written with them is compiled twice: once for
//! the baseline target (SSE2 on x86-64, `a * b + c`) and once inside a
//! `#[target_feature(enable = "avx2,fma,f16c")]` wrapper (`mul_add`, 8
//! lanes, F16C widening), picked at run time by [`avx2_fma`]. Loops run over fixed-size chunks
//! with independent accumulators so that LLVM vectorises them without
//! reassociating floating-point sums itself.
//!
//! The two micro-kernels of attention (scores of a block of heads against
//! a block of keys, and the weighted sum of V rows into a block of heads)
//! are written with AVX2 intrinsics in [`x86`]: LLVM's SLP vectoriser
//! turned the portable versions into shuffles and stack spills. Measured
//! here (32K tokens, d = 128, 8 heads per KV head, f16, one thread):
//! 8.6 ms auto-vectorised, 3.8 ms with the intrinsics. They read stored
//! f16/bf16 rows themselves ([`x86::load8`]: the conversion happens in
//! registers, once per block of heads) instead of after a widening pass
//! into scratch: 4 heads, f16, warm: 2.14 ms -> 1.07 ms (7.8 -> 15.7 GB/s
//! of K+V); 8 heads 2.9 -> 2.1 ms. The pass into scratch had cost as much
//! as all the FMAs.

use crate::elem::{Kind, KvElem};

/// Converts `src` to f32 into `dst[..src.len()]`; with `FAST` (only inside
/// an AVX2+FMA+F16C function) f16 goes through F16C eight at a time.
#[inline(always)]
pub(crate) fn widen<E: KvElem, const FAST: bool>(src: &[E], dst: &mut [f32]) {
    let dst = &mut dst[..src.len()];
    #[cfg(target_arch = "x86_64")]
    if FAST && E::KIND == Kind::F16 {
        // SAFETY: E is f16, a u16 bit pattern of the same size; FAST is
        // only set in functions compiled with F16C.
        unsafe { x86::widen_f16(src.as_ptr() as *const u16, dst) };
        return;
    }
    E::slice_to_f32(src, dst);
}

/// `src` as f32: in place for f32, else widened into `scratch`.
#[inline(always)]
pub(crate) fn as_f32<'a, E: KvElem, const FAST: bool>(
    src: &'a [E],
    scratch: &'a mut [f32],
) -> &'a [f32] {
    match E::as_f32(src) {
        Some(s) => s,
        None => {
            widen::<E, FAST>(src, scratch);
            &scratch[..src.len()]
        }
    }
}

/// Whether the AVX2+FMA+F16C versions may run on this CPU (cached by std).
#[inline]
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `a * b + c`, fused when `FMA`.
#[inline(always)]
pub(crate) fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

const W: usize = 8;

#[inline(always)]
fn hsum(acc: [f32; W]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Dot products of `q` with four rows at once (four independent chains).
#[inline(always)]
pub(crate) fn dot4<const FMA: bool>(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
    let n = q.len();
    let (qc, qr) = q.as_chunks::<W>();
    let kc = k.map(|r| r[..n].as_chunks::<W>().0);
    let mut acc = [[0.0f32; W]; 4];
    for (c, a) in qc.iter().enumerate() {
        for r in 0..4 {
            let b = &kc[r][c];
            for i in 0..W {
                acc[r][i] = fmadd::<FMA>(a[i], b[i], acc[r][i]);
            }
        }
    }
    let mut out = [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])];
    let base = n - qr.len();
    for (r, o) in out.iter_mut().enumerate() {
        for (j, &a) in qr.iter().enumerate() {
            *o = fmadd::<FMA>(a, k[r][base + j], *o);
        }
    }
    out
}

/// Dot product of two equal-length rows.
#[inline(always)]
pub(crate) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let b = &b[..a.len()];
    let (ac, ar) = a.as_chunks::<W>();
    let (bc, br) = b.as_chunks::<W>();
    let mut acc = [[0.0f32; W]; 2];
    let mut pairs = ac.chunks_exact(2).zip(bc.chunks_exact(2));
    for (x, y) in pairs.by_ref() {
        for j in 0..2 {
            for i in 0..W {
                acc[j][i] = fmadd::<FMA>(x[j][i], y[j][i], acc[j][i]);
            }
        }
    }
    if ac.len() % 2 == 1 {
        let (x, y) = (&ac[ac.len() - 1], &bc[bc.len() - 1]);
        for i in 0..W {
            acc[0][i] = fmadd::<FMA>(x[i], y[i], acc[0][i]);
        }
    }
    let mut s = hsum(acc[0]) + hsum(acc[1]);
    for (x, y) in ar.iter().zip(br) {
        s = fmadd::<FMA>(*x, *y, s);
    }
    s
}

/// `y += w[0]*x[0] + w[1]*x[1] + w[2]*x[2] + w[3]*x[3]` (rows of `y.len()`).
#[inline(always)]
pub(crate) fn axpy4<const FMA: bool>(y: &mut [f32], w: [f32; 4], x: [&[f32]; 4]) {
    let n = y.len();
    let (x0, x1, x2, x3) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
    for i in 0..n {
        let mut a = y[i];
        a = fmadd::<FMA>(w[0], x0[i], a);
        a = fmadd::<FMA>(w[1], x1[i], a);
        a = fmadd::<FMA>(w[2], x2[i], a);
        a = fmadd::<FMA>(w[3], x3[i], a);
        y[i] = a;
    }
}

/// `y += w * x`.
#[inline(always)]
pub(crate) fn axpy<const FMA: bool>(y: &mut [f32], w: f32, x: &[f32]) {
    let x = &x[..y.len()];
    for (a, b) in y.iter_mut().zip(x) {
        *a = fmadd::<FMA>(w, *b, *a);
    }
}

/// `y *= w`.
#[inline(always)]
pub(crate) fn scale(y: &mut [f32], w: f32) {
    for a in y.iter_mut() {
        *a *= w;
    }
}

/// Maximum of `x` (-inf when empty). Inputs must not be NaN.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let (c, r) = x.as_chunks::<W>();
    let mut acc = [f32::NEG_INFINITY; W];
    for v in c {
        for i in 0..W {
            acc[i] = if v[i] > acc[i] { v[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for v in acc.iter().chain(r) {
        m = if *v > m { *v } else { m };
    }
    m
}

/// Replaces each `x` by `exp(x - m)` and returns their sum. `m` must be
/// finite and at least every `x`; `x = -inf` gives exactly 0.
#[inline(always)]
pub(crate) fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    let (c, r) = x.as_chunks_mut::<W>();
    let mut acc = [0.0f32; W];
    for v in c {
        for i in 0..W {
            let e = exp_approx(v[i] - m);
            v[i] = e;
            acc[i] += e;
        }
    }
    let mut s = hsum(acc);
    for v in r {
        let e = exp_approx(*v - m);
        *v = e;
        s += e;
    }
    s
}

/// The sum of `exp(x - m)` over `x`, 8 lanes at a time (as
/// [`exp_sub_sum`], leaving `x` as it is).
#[inline(always)]
pub(crate) fn sum_exp_sub(x: &[f32], m: f32) -> f32 {
    let (c, r) = x.as_chunks::<W>();
    let mut acc = [0.0f32; W];
    for v in c {
        for i in 0..W {
            acc[i] += exp_approx(v[i] - m);
        }
    }
    let mut s = hsum(acc);
    for v in r {
        s += exp_approx(*v - m);
    }
    s
}

/// exp(x) for x <= 88.7, within 3 ulp (Cephes `expf`: range reduction by
/// ln 2 split in two, degree-6 polynomial, exponent built from the integer
/// bits). Below -87.3 the result is 0 (the true value would be subnormal),
/// which also maps -inf to exactly 0. Written without branches or calls so
/// that loops over it vectorise.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let under = x < -87.3;
    let xc = if under { -87.3 } else { x };
    let xc = if xc > 88.7 { 88.7 } else { xc };
    let t = xc * LOG2E + MAGIC;
    let n_bits = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let n = t - MAGIC;
    let r = xc - n * C1 - n * C2;
    let z = r * r;
    let mut y = 1.987_569_1e-4f32;
    y = y * r + 1.398_199_9e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 1.666_666_5e-1;
    y = y * r + 0.5;
    y = y * z + r + 1.0;
    let pow2 = f32::from_bits(((n_bits + 127) as u32) << 23);
    let e = y * pow2;
    if under { 0.0 } else { e }
}

/// AVX2+FMA micro-kernels. Every function here must only be called from
/// a function compiled with `avx2,fma,f16c` (they are inlined into it).
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use crate::elem::{Kind, KvElem};

    /// Widens `dst.len()` f16 bit patterns at `src` into `dst`.
    ///
    /// # Safety
    /// `src` holds `dst.len()` values; the CPU has F16C.
    #[inline(always)]
    pub(crate) unsafe fn widen_f16(src: *const u16, dst: &mut [f32]) {
        let n = dst.len();
        let out = dst.as_mut_ptr();
        let mut i = 0;
        // SAFETY: i + 8 <= n bounds both pointers; F16C per the contract.
        unsafe {
            while i + 8 <= n {
                let h = _mm_loadu_si128(src.add(i) as *const __m128i);
                _mm256_storeu_ps(out.add(i), _mm256_cvtph_ps(h));
                i += 8;
            }
            while i < n {
                dst[i] = half::f16::from_bits(*src.add(i)).to_f32();
                i += 1;
            }
        }
    }

    #[inline(always)]
    unsafe fn hsum(a: __m256) -> f32 {
        // SAFETY: AVX per the module contract.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// The eight horizontal sums of `a`, in order, as one vector.
    #[inline(always)]
    unsafe fn hsum8(a: &[__m256; 8]) -> __m256 {
        // SAFETY: AVX per the module contract.
        unsafe {
            let t0 = _mm256_hadd_ps(a[0], a[1]);
            let t1 = _mm256_hadd_ps(a[2], a[3]);
            let t2 = _mm256_hadd_ps(a[4], a[5]);
            let t3 = _mm256_hadd_ps(a[6], a[7]);
            let u0 = _mm256_hadd_ps(t0, t1);
            let u1 = _mm256_hadd_ps(t2, t3);
            _mm256_add_ps(
                _mm256_permute2f128_ps(u0, u1, 0x20),
                _mm256_permute2f128_ps(u0, u1, 0x31),
            )
        }
    }

    /// Eight lanes of `E` at `p` as f32: a load (f32), a load and an
    /// F16C conversion (f16), or a load, a widening and a shift (bf16), so
    /// the micro-kernels below read stored K and V without a separate
    /// widening pass.
    ///
    /// # Safety
    /// `p` points at eight readable values; AVX2 and F16C.
    #[inline(always)]
    pub(crate) unsafe fn load8<E: KvElem>(p: *const E) -> __m256 {
        // SAFETY: per the contract; E::KIND says how the bits are laid out.
        unsafe {
            match E::KIND {
                Kind::F32 => _mm256_loadu_ps(p as *const f32),
                Kind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                Kind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128(p as *const __m128i),
                ))),
            }
        }
    }

    /// `s[h * stride + j] = scale * q_h . k_j` for `h < heads`, `j < len`,
    /// with `q [heads][d]` f32 and key `j` at `k[j * pitch..][..d]` stored as `E` (converted
    /// as it is loaded, once per block of heads); blocks of 4 heads x 2
    /// keys (eight accumulators, six loads per eight FMAs), then smaller
    /// blocks for the remaining heads and keys.
    ///
    /// # Safety
    /// AVX2+FMA+F16C; `d % 8 == 0` (the lengths are checked).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn scores<E: KvElem>(
        q: &[f32],
        heads: usize,
        d: usize,
        k: &[E],
        pitch: usize,
        len: usize,
        scale: f32,
        s: &mut [f32],
        stride: usize,
    ) {
        assert!(d.is_multiple_of(8) && q.len() >= heads * d && pitch >= d);
        assert!(len == 0 || k.len() >= (len - 1) * pitch + d);
        assert!(heads == 0 || s.len() >= (heads - 1) * stride + len);
        let (qp, kp, sp) = (q.as_ptr(), k.as_ptr(), s.as_mut_ptr());
        // SAFETY: every block below stays within the lengths asserted above.
        unsafe {
            let mut h = 0;
            while h + 4 <= heads {
                score_rows::<E, 4, 2>(qp, h, d, kp, pitch, len, scale, sp, stride);
                h += 4;
            }
            match heads - h {
                3 => score_rows::<E, 3, 2>(qp, h, d, kp, pitch, len, scale, sp, stride),
                2 => score_rows::<E, 2, 4>(qp, h, d, kp, pitch, len, scale, sp, stride),
                1 => score_rows::<E, 1, 4>(qp, h, d, kp, pitch, len, scale, sp, stride),
                _ => {}
            }
        }
    }

    /// Heads `h0..h0 + NH` of [`scores`] over all `len` keys, `NK` keys at
    /// a time, the last `len % NK` one at a time.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_rows<E: KvElem, const NH: usize, const NK: usize>(
        qp: *const f32,
        h0: usize,
        d: usize,
        kp: *const E,
        pitch: usize,
        len: usize,
        scale: f32,
        sp: *mut f32,
        stride: usize,
    ) {
        // SAFETY: the caller checked the lengths for these heads and keys.
        unsafe {
            let mut j = 0;
            while j + NK <= len {
                score_block::<E, NH, NK>(qp, h0, d, kp, pitch, j, scale, sp, stride);
                j += NK;
            }
            while j < len {
                score_block::<E, NH, 1>(qp, h0, d, kp, pitch, j, scale, sp, stride);
                j += 1;
            }
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_block<E: KvElem, const NH: usize, const NK: usize>(
        qp: *const f32,
        h0: usize,
        d: usize,
        kp: *const E,
        pitch: usize,
        j0: usize,
        scale: f32,
        sp: *mut f32,
        stride: usize,
    ) {
        // SAFETY: the caller checked the lengths for these heads and keys.
        unsafe {
            let mut a = [[_mm256_setzero_ps(); NK]; NH];
            let mut c = 0;
            while c < d {
                let mut y = [_mm256_setzero_ps(); NK];
                for (t, yt) in y.iter_mut().enumerate() {
                    *yt = load8(kp.add((j0 + t) * pitch + c));
                }
                for (i, ai) in a.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(qp.add((h0 + i) * d + c));
                    for t in 0..NK {
                        ai[t] = _mm256_fmadd_ps(x, y[t], ai[t]);
                    }
                }
                c += 8;
            }
            if NH * NK == 8 {
                let mut flat = [_mm256_setzero_ps(); 8];
                for i in 0..NH {
                    for t in 0..NK {
                        flat[i * NK + t] = a[i][t];
                    }
                }
                let mut out = [0f32; 8];
                _mm256_storeu_ps(
                    out.as_mut_ptr(),
                    _mm256_mul_ps(hsum8(&flat), _mm256_set1_ps(scale)),
                );
                for i in 0..NH {
                    for t in 0..NK {
                        *sp.add((h0 + i) * stride + j0 + t) = out[i * NK + t];
                    }
                }
            } else {
                for (i, ai) in a.iter().enumerate() {
                    for (t, at) in ai.iter().enumerate() {
                        *sp.add((h0 + i) * stride + j0 + t) = hsum(*at) * scale;
                    }
                }
            }
        }
    }

    /// `o[h][c] += sum_{j < len} w[h * stride + j] * v_j[c]` for
    /// `h < heads`, with `o [heads][d]` and row `j` at `v[j * pitch..][..d]`
    /// stored as `E` (converted as it is loaded); blocks of 4 heads x 16
    /// channels held in registers across all `len` rows.
    ///
    /// # Safety
    /// AVX2+FMA; `d % 8 == 0` (the lengths are checked).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn weighted_sum<E: KvElem>(
        w: &[f32],
        stride: usize,
        heads: usize,
        v: &[E],
        pitch: usize,
        len: usize,
        d: usize,
        o: &mut [f32],
    ) {
        assert!(d.is_multiple_of(8) && pitch >= d && o.len() >= heads * d);
        assert!(len == 0 || v.len() >= (len - 1) * pitch + d);
        assert!(heads == 0 || w.len() >= (heads - 1) * stride + len);
        // SAFETY: lengths asserted above.
        unsafe {
            let mut h = 0;
            while h + 4 <= heads {
                block::<E, 4>(w, stride, h, v, pitch, len, d, o);
                h += 4;
            }
            while h < heads {
                block::<E, 1>(w, stride, h, v, pitch, len, d, o);
                h += 1;
            }
        }
    }

    /// Heads `h0..h0 + NH` of [`weighted_sum`].
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<E: KvElem, const NH: usize>(
        w: &[f32],
        stride: usize,
        h0: usize,
        v: &[E],
        pitch: usize,
        len: usize,
        d: usize,
        o: &mut [f32],
    ) {
        let (wp, vp, op) = (w.as_ptr(), v.as_ptr(), o.as_mut_ptr());
        // SAFETY: the caller checked the lengths for heads h0..h0 + NH.
        unsafe {
            let mut c = 0;
            while c + 16 <= d {
                let mut a = [[_mm256_setzero_ps(); 2]; NH];
                for (i, acc) in a.iter_mut().enumerate() {
                    acc[0] = _mm256_loadu_ps(op.add((h0 + i) * d + c));
                    acc[1] = _mm256_loadu_ps(op.add((h0 + i) * d + c + 8));
                }
                for j in 0..len {
                    let y0 = load8(vp.add(j * pitch + c));
                    let y1 = load8(vp.add(j * pitch + c + 8));
                    for (i, acc) in a.iter_mut().enumerate() {
                        let x = _mm256_broadcast_ss(&*wp.add((h0 + i) * stride + j));
                        acc[0] = _mm256_fmadd_ps(x, y0, acc[0]);
                        acc[1] = _mm256_fmadd_ps(x, y1, acc[1]);
                    }
                }
                for (i, acc) in a.iter().enumerate() {
                    _mm256_storeu_ps(op.add((h0 + i) * d + c), acc[0]);
                    _mm256_storeu_ps(op.add((h0 + i) * d + c + 8), acc[1]);
                }
                c += 16;
            }
            if c < d {
                let mut a = [_mm256_setzero_ps(); NH];
                for (i, acc) in a.iter_mut().enumerate() {
                    *acc = _mm256_loadu_ps(op.add((h0 + i) * d + c));
                }
                for j in 0..len {
                    let y = load8(vp.add(j * pitch + c));
                    for (i, acc) in a.iter_mut().enumerate() {
                        let x = _mm256_broadcast_ss(&*wp.add((h0 + i) * stride + j));
                        *acc = _mm256_fmadd_ps(x, y, *acc);
                    }
                }
                for (i, acc) in a.iter().enumerate() {
                    _mm256_storeu_ps(op.add((h0 + i) * d + c), *acc);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp_approx(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.00731;
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "worst relerr {worst:e}");
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-1e4), 0.0);
        assert_eq!(exp_approx(0.0), 1.0);
    }

    #[test]
    fn dots_match_scalar() {
        for n in [1usize, 7, 8, 15, 16, 17, 64, 100, 128, 131] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.91).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let got = dot::<false>(&a, &b) as f64;
            assert!((got - want).abs() < 1e-5 * n as f64, "{n}: {got} {want}");
            let got4 = dot4::<true>(&a, [&b, &a, &b, &a]);
            assert!((got4[0] as f64 - want).abs() < 1e-5 * n as f64);
            assert!((got4[2] as f64 - want).abs() < 1e-5 * n as f64);
        }
    }
}

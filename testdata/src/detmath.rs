//! `exp`, `ln`, `sin`, `cos` from IEEE-754 basic operations only.
//!
//! The generator must give the same bits on every platform for a seed.
//! `+ - * /` and `sqrt` are correctly rounded everywhere, but `f64::exp`
//! and friends call the platform's libm, whose last bit differs between
//! implementations. These versions use a fixed sequence of basic operations
//! (range reduction, then a fixed-degree polynomial), so their results are
//! identical wherever Rust runs; they are accurate to a few ulp, which the
//! tests check against `std`.
//!
//! Only the generator uses them; metrics may use `std`.

use std::f64::consts::{LN_2, PI};

/// `ln 2` split so that `k * LN2_HI` is exact for `|k| < 2^11`.
const LN2_HI: f64 = 6.931_471_803_691_238e-1;
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;

/// `2 pi` split the same way, for the reduction of large arguments.
const TWO_PI_HI: f64 = std::f64::consts::TAU;
const TWO_PI_LO: f64 = 2.449_293_598_294_706_4e-16;

/// `1/i` for the exp series (const evaluation is IEEE-exact: same bits everywhere).
const INV: [f64; 15] = {
    let mut t = [0.0; 15];
    let mut i = 1;
    while i < 15 {
        t[i] = 1.0 / i as f64;
        i += 1;
    }
    t
};

/// `1/(2i+1)` for the atanh series of `ln`.
const INV_ODD: [f64; 16] = {
    let mut t = [0.0; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = 1.0 / (2 * i + 1) as f64;
        i += 1;
    }
    t
};

/// `1/((2i)(2i+1))` and `1/((2i-1)(2i))` for the sine and cosine series.
const INV_SIN: [f64; 12] = {
    let mut t = [0.0; 12];
    let mut i = 1;
    while i < 12 {
        t[i] = 1.0 / ((2 * i) * (2 * i + 1)) as f64;
        i += 1;
    }
    t
};
const INV_COS: [f64; 12] = {
    let mut t = [0.0; 12];
    let mut i = 1;
    while i < 12 {
        t[i] = 1.0 / ((2 * i - 1) * (2 * i)) as f64;
        i += 1;
    }
    t
};

/// `2^k` for an integer `k` in the normal range.
fn pow2(k: i64) -> f64 {
    debug_assert!((-1022..=1023).contains(&k));
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// `e^x`.
pub fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > 709.78 {
        return f64::INFINITY;
    }
    if x < -745.2 {
        return 0.0;
    }
    let k = (x / LN_2).round();
    let r = (x - k * LN2_HI) - k * LN2_LO; // |r| <= ln2/2 + tiny
    // Taylor series to degree 14: the remainder is below 1e-17 for |r| < 0.35.
    let mut p = 1.0;
    for i in (1..=14).rev() {
        p = 1.0 + p * r * INV[i];
    }
    let k = k as i64;
    // Two steps keep 2^k in range near the ends (subnormal results).
    if k < -1021 {
        p * pow2(k + 600) * pow2(-600)
    } else if k > 1023 {
        p * pow2(k - 600) * pow2(600)
    } else {
        p * pow2(k)
    }
}

/// Natural logarithm (`-inf` at 0, NaN below).
pub fn ln(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x.is_infinite() {
        return x;
    }
    // Normalise subnormals, then split x = m * 2^e with m in [sqrt(1/2), sqrt(2)).
    let (x, e_adj) = if x < f64::MIN_POSITIVE {
        (x * pow2(60), -60)
    } else {
        (x, 0)
    };
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let e = (e + e_adj) as f64;
    // ln m = 2 atanh(u), u = (m - 1) / (m + 1), |u| <= 0.1716: odd series to u^31.
    let u = (m - 1.0) / (m + 1.0);
    let u2 = u * u;
    let mut s = 0.0;
    for i in (0..16).rev() {
        s = INV_ODD[i] + u2 * s;
    }
    e * LN2_HI + (2.0 * u * s + e * LN2_LO)
}

/// `(sin x, cos x)`.
pub fn sin_cos(x: f64) -> (f64, f64) {
    if !x.is_finite() {
        return (f64::NAN, f64::NAN);
    }
    // Reduce to [-pi, pi]; ample for the arguments used here (|x| < 1e6).
    let k = (x / (2.0 * PI)).round();
    let r = (x - k * TWO_PI_HI) - k * TWO_PI_LO;
    // Then to [-pi/2, pi/2] by sin(pi - r) = sin r, cos(pi - r) = -cos r.
    let (r, flip) = if r > PI / 2.0 {
        (PI - r, true)
    } else if r < -PI / 2.0 {
        (-PI - r, true)
    } else {
        (r, false)
    };
    let r2 = r * r;
    // Taylor series to degree 23 / 22: remainder below 1e-17 on [-pi/2, pi/2].
    let mut s = 1.0;
    let mut c = 1.0;
    for i in (1..=11).rev() {
        s = 1.0 - s * r2 * INV_SIN[i];
        c = 1.0 - c * r2 * INV_COS[i];
    }
    let s = s * r;
    if flip { (s, -c) } else { (s, c) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, ulps: f64) -> bool {
        a == b || (a - b).abs() <= ulps * f64::EPSILON * a.abs().max(b.abs())
    }

    #[test]
    fn exp_matches_std() {
        let mut x = -740.0;
        while x < 709.0 {
            assert!(
                close(exp(x), x.exp(), 8.0),
                "exp({x}) = {} vs {}",
                exp(x),
                x.exp()
            );
            x += 0.137;
        }
        for x in [0.0, 1e-300, -1e-300, 1.0, -1.0, 0.5, 1e-8] {
            assert!(close(exp(x), x.exp(), 4.0), "exp({x})");
        }
        assert_eq!(exp(1000.0), f64::INFINITY);
        assert_eq!(exp(-1000.0), 0.0);
        assert!(exp(-744.0) > 0.0, "subnormal results are kept");
    }

    #[test]
    fn ln_matches_std() {
        let mut x = 1e-310;
        while x < 1e300 {
            assert!(
                close(ln(x), x.ln(), 8.0),
                "ln({x}) = {} vs {}",
                ln(x),
                x.ln()
            );
            x *= 1.37;
        }
        for x in [1.0, 1.0 + 1e-12, 0.999_999, 2.0, 0.5, std::f64::consts::E] {
            let (a, b) = (ln(x), x.ln());
            assert!((a - b).abs() <= 4.0 * f64::EPSILON * b.abs().max(1e-300) + 1e-300);
        }
        assert_eq!(ln(0.0), f64::NEG_INFINITY);
        assert!(ln(-1.0).is_nan());
    }

    #[test]
    fn sin_cos_match_std() {
        let mut x = -40_000.0;
        while x < 40_000.0 {
            let (s, c) = sin_cos(x);
            // Absolute error: the reduction of large arguments loses a little.
            assert!((s - x.sin()).abs() < 1e-11, "sin({x})");
            assert!((c - x.cos()).abs() < 1e-11, "cos({x})");
            x += 3.917;
        }
        let mut x = -7.0;
        while x < 7.0 {
            let (s, c) = sin_cos(x);
            assert!(
                (s - x.sin()).abs() < 2e-15 && (c - x.cos()).abs() < 2e-15,
                "{x}"
            );
            x += 0.0131;
        }
    }
}

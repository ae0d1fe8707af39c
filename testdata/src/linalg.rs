//! The little dense linear algebra the generator and the gates need.
//!
//! Matrices are row-major `Vec<f64>`; every loop has a fixed order, so
//! results are bit-identical across platforms (Rust never contracts
//! `a * b + c` into an FMA on its own).

/// `a . b` in f64.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `a . b` of f32 rows, accumulated in f64.
pub fn dot_f32_f64(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

/// `a . b` of f32 rows in f32 with eight independent accumulators (fast,
/// for ranking; the order is fixed, so the result is deterministic).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let (ca, ra) = a.split_at(a.len() - a.len() % 8);
    let (cb, rb) = b.split_at(ca.len());
    for (x, y) in ca.chunks_exact(8).zip(cb.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Euclidean norm.
pub fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// `y = M x` for `M` of shape `rows x cols`.
pub fn matvec(m: &[f64], rows: usize, cols: usize, x: &[f64], y: &mut [f64]) {
    debug_assert!(m.len() == rows * cols && x.len() == cols && y.len() == rows);
    for (r, out) in y.iter_mut().enumerate() {
        *out = dot(&m[r * cols..(r + 1) * cols], x);
    }
}

/// Removes from `v` its components along the orthonormal `basis` vectors
/// (twice, so that the result is orthogonal to working precision).
pub fn project_out(v: &mut [f64], basis: &[Vec<f64>]) {
    for _ in 0..2 {
        for b in basis {
            let c = dot(v, b);
            for (x, y) in v.iter_mut().zip(b) {
                *x -= c * y;
            }
        }
    }
}

/// Appends `v`, orthonormalised against `basis`, to `basis`; returns false
/// (and appends nothing) when `v` lies in the span already.
pub fn extend_basis(basis: &mut Vec<Vec<f64>>, mut v: Vec<f64>) -> bool {
    let before = norm(&v);
    project_out(&mut v, basis);
    let after = norm(&v);
    if after <= 1e-9 * before || after == 0.0 {
        return false;
    }
    v.iter_mut().for_each(|x| *x /= after);
    basis.push(v);
    true
}

/// Lower Cholesky factor of the symmetric positive definite `a` (`n x n`),
/// or `None` when a pivot is not positive.
pub fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    assert_eq!(a.len(), n * n, "cholesky: not n x n");
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s = a[i * n + j] - dot(&l[i * n..i * n + j], &l[j * n..j * n + j]);
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    Some(l)
}

/// Solves `L y = b` in place for the lower-triangular `l` (`n x n`).
pub fn forward_solve(l: &[f64], n: usize, b: &mut [f64]) {
    for i in 0..n {
        let s = b[i] - dot(&l[i * n..i * n + i], &b[..i]);
        b[i] = s / l[i * n + i];
    }
}

/// Median of `xs` (mean of the middle two for an even count); NaN when empty.
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves() {
        // A = [[4, 2], [2, 3]]: L = [[2, 0], [1, sqrt 2]].
        let l = cholesky(&[4.0, 2.0, 2.0, 3.0], 2).unwrap();
        assert!((l[0] - 2.0).abs() < 1e-15 && (l[2] - 1.0).abs() < 1e-15);
        let mut b = vec![2.0, 1.0 + 2f64.sqrt()];
        forward_solve(&l, 2, &mut b);
        assert!((b[0] - 1.0).abs() < 1e-15 && (b[1] - 1.0).abs() < 1e-15);
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_none());
    }

    #[test]
    fn basis_is_orthonormal() {
        let mut b = Vec::new();
        assert!(extend_basis(&mut b, vec![1.0, 1.0, 0.0]));
        assert!(extend_basis(&mut b, vec![1.0, 0.0, 1.0]));
        assert!(!extend_basis(&mut b, vec![2.0, 1.0, 1.0]), "in the span");
        assert!(dot(&b[0], &b[1]).abs() < 1e-15);
        assert!((norm(&b[1]) - 1.0).abs() < 1e-15);
    }

    #[test]
    fn dots_agree() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        assert!((f64::from(dot_f32(&a, &b)) - dot_f32_f64(&a, &b)).abs() < 1e-5);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}

//! Top-k of scores: indices and values, in a deterministic order.
//!
//! Order: higher value first; equal values by lower index first. NaN
//! scores are never selected. The k best are kept in a bounded min-heap
//! that lives in the caller's output slices (no allocation), so a pass
//! costs one comparison per score once the heap is full, plus
//! `O(log k)` per score that enters it; the heap is then sorted in place.

/// Selects the best `min(k, non-NaN scores)` of `scores` into
/// `idx[..count]` and `val[..count]` (best first) and returns `count`.
/// `idx` and `val` must hold at least `k` entries.
pub fn top_k(scores: &[f32], k: usize, idx: &mut [u32], val: &mut [f32]) -> usize {
    assert!(
        idx.len() >= k && val.len() >= k,
        "top_k: outputs shorter than k"
    );
    assert!(scores.len() <= u32::MAX as usize, "top_k: too many scores");
    if k == 0 {
        return 0;
    }
    let mut len = 0;
    for (i, &x) in scores.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if len < k {
            idx[len] = i as u32;
            val[len] = x;
            len += 1;
            sift_up(idx, val, len - 1);
        } else if x > val[0] {
            // Later indices lose ties, so a strictly greater value is the
            // only way in once the heap is full.
            idx[0] = i as u32;
            val[0] = x;
            sift_down(idx, val, 0, len);
        }
    }
    // Heap sort: the worst goes to the back each round, leaving best first.
    for end in (1..len).rev() {
        idx.swap(0, end);
        val.swap(0, end);
        sift_down(idx, val, 0, end);
    }
    len
}

/// Whether entry `a` ranks below entry `b` (the heap's root is the worst).
#[inline(always)]
fn worse(idx: &[u32], val: &[f32], a: usize, b: usize) -> bool {
    val[a] < val[b] || (val[a] == val[b] && idx[a] > idx[b])
}

fn sift_up(idx: &mut [u32], val: &mut [f32], mut i: usize) {
    while i > 0 {
        let parent = (i - 1) / 2;
        if !worse(idx, val, i, parent) {
            break;
        }
        idx.swap(i, parent);
        val.swap(i, parent);
        i = parent;
    }
}

fn sift_down(idx: &mut [u32], val: &mut [f32], mut i: usize, len: usize) {
    loop {
        let (l, r) = (2 * i + 1, 2 * i + 2);
        let mut w = i;
        if l < len && worse(idx, val, l, w) {
            w = l;
        }
        if r < len && worse(idx, val, r, w) {
            w = r;
        }
        if w == i {
            return;
        }
        idx.swap(i, w);
        val.swap(i, w);
        i = w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;
    use proptest::prelude::*;

    fn reference(scores: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut all: Vec<(u32, f32)> = scores
            .iter()
            .enumerate()
            .filter(|(_, x)| !x.is_nan())
            .map(|(i, &x)| (i as u32, x))
            .collect();
        all.sort_by(|a, b| b.1.partial_cmp(&a.1).expect("no NaN").then(a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }

    fn run(scores: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut idx = vec![0; k];
        let mut val = vec![0.0; k];
        let c = top_k(scores, k, &mut idx, &mut val);
        idx[..c]
            .iter()
            .copied()
            .zip(val[..c].iter().copied())
            .collect()
    }

    #[test]
    fn ties_nan_and_edges() {
        let s = [1.0, 3.0, f32::NAN, 3.0, -1.0, 3.0, f32::NEG_INFINITY, 2.0];
        assert_eq!(run(&s, 3), vec![(1, 3.0), (3, 3.0), (5, 3.0)]);
        assert_eq!(run(&s, 4), vec![(1, 3.0), (3, 3.0), (5, 3.0), (7, 2.0)]);
        assert_eq!(run(&s, 100), reference(&s, 100));
        assert_eq!(run(&s, 100).len(), 7);
        assert!(run(&s, 0).is_empty());
        assert!(run(&[], 5).is_empty());
        assert!(run(&[f32::NAN; 4], 2).is_empty());
    }

    #[test]
    fn large_random_matches_sort() {
        let mut rng = Rng::new(3);
        // Coarse values so that ties are common.
        let s: Vec<f32> = (0..40_000)
            .map(|_| (rng.normal() * 20.0).round() as f32)
            .collect();
        for k in [1, 17, 2500, 40_000] {
            assert_eq!(run(&s, k), reference(&s, k), "k = {k}");
        }
    }

    proptest! {
        #[test]
        fn matches_a_full_sort(
            scores in proptest::collection::vec(-8i32..8, 0..200),
            k in 0usize..50,
        ) {
            let s: Vec<f32> = scores.iter().map(|&x| x as f32 * 0.5).collect();
            prop_assert_eq!(run(&s, k), reference(&s, k));
        }
    }
}

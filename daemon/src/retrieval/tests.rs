//! Unit tests of the registry's helpers.

use super::*;

#[test]
fn training_queries_split_by_kv_head_group() {
    // m = 2 steps, 4 query heads, 2 KV heads, d = 1.
    let q: Vec<f32> = (0..8).map(|x| x as f32).collect();
    let s = split_train(&q, 4, 2, 1);
    assert_eq!(*s[0], vec![0.0, 1.0, 4.0, 5.0]);
    assert_eq!(*s[1], vec![2.0, 3.0, 6.0, 7.0]);
}

#[test]
fn the_estimate_covers_keys_graph_and_training_queries() {
    let e = estimate(1000, 500, 128);
    assert!(e >= 1000 * 128 * 4 + 500 * 128 * 4);
}

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

fn tails(max: usize) -> (auto::Tails, MetricsRegistry) {
    let r = MetricsRegistry::new();
    let m = RetrievalMetrics::new(&r);
    (
        auto::Tails::new(max, m.auto_pending_dropped.clone(), m.auto_pending.clone()),
        r,
    )
}

fn bk(i: u32) -> BlockKey {
    BlockKey::new(&i.to_be_bytes()).unwrap()
}

/// A child replaces its parent as the chain's tail; a fork (a child of a
/// block that is not the tail) is a tail of its own; the same key in
/// another namespace is another tail.
#[test]
fn tails_follow_chains_and_forks() {
    let (t, _r) = tails(16);
    let (a, b) = (NamespaceId(1), NamespaceId(2));
    let t0 = std::time::Instant::now();
    let quiet = Duration::from_millis(100);
    t.note(a, bk(0), None, t0);
    t.note(a, bk(1), Some(bk(0)), t0);
    t.note(a, bk(2), Some(bk(1)), t0);
    assert_eq!(t.len(), 1, "the chain's tail only");
    // A fork off block 1 (its parent is not the tail).
    t.note(a, bk(10), Some(bk(1)), t0);
    t.note(b, bk(2), None, t0);
    assert_eq!(t.len(), 3);
    // Nothing is due before the quiet period; then oldest first.
    assert_eq!(t.pop_due(t0 + Duration::from_millis(99), quiet), None);
    let due = t0 + quiet;
    assert_eq!(t.pop_due(due, quiet), Some((a, bk(2))));
    assert_eq!(t.pop_due(due, quiet), Some((a, bk(10))));
    assert_eq!(t.pop_due(due, quiet), Some((b, bk(2))));
    assert_eq!(t.pop_due(due, quiet), None);
    assert!(t.is_empty());
}

/// A tail noted again becomes the newest (its quiet period starts over).
#[test]
fn tails_noted_again_wait_again() {
    let (t, _r) = tails(16);
    let ns = NamespaceId(1);
    let t0 = std::time::Instant::now();
    let quiet = Duration::from_millis(100);
    t.note(ns, bk(0), None, t0);
    t.note(ns, bk(5), None, t0 + Duration::from_millis(10));
    t.note(ns, bk(0), None, t0 + Duration::from_millis(50));
    assert_eq!(t.len(), 2);
    let at = t0 + Duration::from_millis(120);
    assert_eq!(t.pop_due(at, quiet), Some((ns, bk(5))));
    assert_eq!(
        t.pop_due(at, quiet),
        None,
        "block 0 was noted again at 50 ms"
    );
    assert_eq!(
        t.pop_due(t0 + Duration::from_millis(150), quiet),
        Some((ns, bk(0)))
    );
}

/// At most `max` tails wait; the oldest goes first, counted.
#[test]
fn tails_are_bounded_and_drops_are_counted() {
    let (t, r) = tails(3);
    let ns = NamespaceId(1);
    let t0 = std::time::Instant::now();
    for i in 0..5 {
        t.note(ns, bk(100 + i), None, t0);
    }
    assert_eq!(t.len(), 3);
    let text = r.render();
    assert!(
        text.contains("strata_retrieval_auto_pending_dropped_total 2"),
        "{text}"
    );
    assert!(text.contains("strata_retrieval_auto_pending 3"), "{text}");
    let quiet = Duration::ZERO;
    let got: Vec<_> = std::iter::from_fn(|| t.pop_due(t0, quiet)).collect();
    assert_eq!(got, vec![(ns, bk(102)), (ns, bk(103)), (ns, bk(104))]);
}

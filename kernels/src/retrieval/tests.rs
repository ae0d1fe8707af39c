//! Unit tests of the index's API on small random data: argument checks,
//! graph invariants, determinism, inserts, storage types. Recall on the
//! COMPUTE.md §2 data is in `kernels/tests/retrieval.rs`.

use super::*;
use crate::testing::Rng;
use half::f16;

/// Keys in 24 clusters of random centres, queries near random centres:
/// enough structure for co-retrieval to mean something.
fn data(n: usize, m: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut r = Rng::new(seed);
    let centres: Vec<Vec<f32>> = (0..24).map(|_| r.normal_vec(d, 1.0)).collect();
    let mut keys = Vec::with_capacity(n * d);
    for _ in 0..n {
        let c = &centres[r.below(24) as usize];
        keys.extend(c.iter().map(|x| x + r.normal() as f32 * 0.7));
    }
    let mut q = Vec::with_capacity(m * d);
    for _ in 0..m {
        let c = &centres[r.below(24) as usize];
        q.extend(c.iter().map(|x| 3.0 * x + r.normal() as f32));
    }
    (keys, q)
}

fn small_cfg() -> IndexConfig {
    IndexConfig {
        cluster_keys: 256,
        ..IndexConfig::default()
    }
}

fn brute(keys: &[f32], d: usize, q: &[f32], k: usize) -> Vec<u32> {
    let mut s: Vec<(f32, u32)> = keys
        .chunks_exact(d)
        .enumerate()
        .map(|(t, kt)| (dense::dot(q, kt), t as u32))
        .collect();
    s.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    s.into_iter().take(k).map(|x| x.1).collect()
}

fn recall(index: &RetrievalIndex, keys: &[f32], q: &[f32], p: &SearchParams) -> f64 {
    let d = index.d();
    let mut hits = Hits::new();
    index.search(q, p, &mut SearchScratch::new(), &mut hits);
    let b = q.len() / d;
    let mut sum = 0.0;
    for i in 0..b {
        let want = brute(keys, d, &q[i * d..(i + 1) * d], p.k());
        sum += want.iter().filter(|w| hits.ids(i).contains(w)).count() as f64 / want.len() as f64;
    }
    sum / b as f64
}

#[test]
fn parameters_are_checked_and_name_the_field() {
    let field = |e: IndexError| match e {
        IndexError::Param { field, .. }
        | IndexError::Shape { field, .. }
        | IndexError::Config { field, .. } => field,
    };
    assert_eq!(field(SearchParams::new(0, 10).unwrap_err()), "k");
    assert_eq!(
        field(SearchParams::new(K_MAX + 1, EF_MAX).unwrap_err()),
        "k"
    );
    assert_eq!(field(SearchParams::new(50, 49).unwrap_err()), "ef");
    assert_eq!(field(SearchParams::new(50, EF_MAX + 1).unwrap_err()), "ef");
    assert_eq!(
        field(SearchParams::default().with_probe(0).unwrap_err()),
        "probe"
    );
    let p = SearchParams::new(10, 10).unwrap().with_probe(3).unwrap();
    assert_eq!((p.k(), p.ef(), p.probe()), (10, 10, 3));
    assert!(SearchParams::new(100, 100).is_ok());
    assert_eq!(SearchParams::default().k(), 100);
    assert!((64..=400).contains(&SearchParams::default().ef()));

    let cfg = IndexConfig::default();
    let keys = vec![0.5f32; 8 * 4];
    let e = |r: Result<RetrievalIndex, IndexError>| field(r.unwrap_err());
    assert_eq!(e(RetrievalIndex::build(&keys, 0, &[], &cfg)), "d");
    assert_eq!(e(RetrievalIndex::build(&keys[..7], 4, &[], &cfg)), "keys");
    assert_eq!(e(RetrievalIndex::build::<f32>(&[], 4, &[], &cfg)), "keys");
    assert_eq!(e(RetrievalIndex::build(&keys, 4, &[1.0; 3], &cfg)), "train");
    let mut nan = keys.clone();
    nan[5] = f32::NAN;
    let err = RetrievalIndex::build(&nan, 4, &[], &cfg).unwrap_err();
    assert!(err.to_string().starts_with("keys: element 5"), "{err}");
    let bad = IndexConfig {
        co_degree: DEGREE_MAX + 1,
        ..IndexConfig::default()
    };
    assert_eq!(e(RetrievalIndex::build(&keys, 4, &[], &bad)), "degree");
    let bad = IndexConfig {
        backbone_candidates: 3,
        ..IndexConfig::default()
    };
    assert_eq!(field(bad.validate().unwrap_err()), "backbone_candidates");
    let mut index = RetrievalIndex::build(&keys, 4, &[], &cfg).unwrap();
    assert_eq!(field(index.insert(&[1.0f32; 5]).unwrap_err()), "keys");
    assert_eq!(
        field(index.insert(&[f32::INFINITY; 4]).unwrap_err()),
        "keys"
    );
    assert_eq!(index.len(), 8, "a refused insert changes nothing");
}

#[test]
fn graph_rows_hold_valid_ids_and_no_self_loops() {
    let d = 32;
    let (keys, q) = data(3000, 1500, d, 1);
    let index = RetrievalIndex::build(&keys, d, &q, &small_cfg()).unwrap();
    let n = index.len();
    for t in 0..n {
        for &u in index.graph.row(t) {
            assert!(u == NONE || (u as usize) < n, "key {t}: id {u}");
            assert_ne!(u as usize, t, "key {t} lists itself");
        }
    }
    let st = index.stats();
    assert_eq!(st.unreachable, 0, "{st:?}");
    assert!(st.co_keys > n / 2 && st.backbone_mean > 2.0, "{st:?}");
    assert!(index.tuning().held_out > 0, "{:?}", index.tuning());
    assert!(index.memory_bytes() > keys.len() * 4);
}

#[test]
fn build_and_search_do_not_depend_on_the_thread_count() {
    let d = 32;
    let (keys, q) = data(3000, 1500, d, 2);
    let build = |threads| {
        let cfg = IndexConfig {
            threads,
            ..small_cfg()
        };
        RetrievalIndex::build(&keys, d, &q, &cfg).unwrap()
    };
    let (a, b) = (build(1), build(3));
    assert_eq!(a.graph.adj, b.graph.adj);
    assert_eq!(a.route_entries, b.route_entries);
    assert_eq!(a.tuning(), b.tuning());
    let p = SearchParams::default();
    let (mut ha, mut hb) = (Hits::new(), Hits::new());
    a.search(&q[..64 * d], &p, &mut SearchScratch::new(), &mut ha);
    b.search(&q[..64 * d], &p, &mut SearchScratch::new(), &mut hb);
    assert_eq!(ha.ids, hb.ids);
    assert_eq!(ha.scanned, hb.scanned);
    // Another seed is another index (k-means samples), equally valid.
    let c = RetrievalIndex::build(
        &keys,
        d,
        &q,
        &IndexConfig {
            seed: 99,
            ..small_cfg()
        },
    )
    .unwrap();
    assert_ne!(a.route_entries, c.route_entries);
}

#[test]
fn answers_are_sorted_scored_and_found_by_the_index() {
    let d = 32;
    let (keys, q) = data(3000, 1500, d, 3);
    let index = RetrievalIndex::build(&keys, d, &q, &small_cfg()).unwrap();
    let p = SearchParams::new(50, 200).unwrap();
    let queries = &q[..40 * d];
    let mut hits = Hits::new();
    index.search(queries, &p, &mut SearchScratch::new(), &mut hits);
    assert_eq!(hits.len(), 40);
    for i in 0..40 {
        let (ids, sc) = (hits.ids(i), hits.scores(i));
        assert_eq!(ids.len(), 50);
        assert!(
            sc.windows(2).all(|w| w[0] >= w[1]),
            "query {i}: not best first"
        );
        for (&t, &s) in ids.iter().zip(sc) {
            let want = dense::dot(
                &queries[i * d..(i + 1) * d],
                &keys[t as usize * d..(t as usize + 1) * d],
            );
            assert!(
                (s - want).abs() <= 1e-3 * want.abs().max(1.0),
                "query {i} key {t}"
            );
        }
        let mut u = ids.to_vec();
        u.sort_unstable();
        u.dedup();
        assert_eq!(u.len(), 50, "query {i}: duplicate ids");
        assert!(hits.scanned[i] as usize <= index.len() + 64);
    }
    let r = recall(&index, &keys, queries, &p);
    assert!(r >= 0.9, "recall {r}");
    // The exact scan agrees with brute force.
    let mut ex = Hits::new();
    exact_search(&keys, d, &queries[..3 * d], 50, &mut ex);
    for i in 0..3 {
        assert_eq!(
            ex.ids(i),
            &brute(&keys, d, &queries[i * d..(i + 1) * d], 50)[..]
        );
        assert_eq!(ex.scanned[i] as usize, 3000);
    }
}

#[test]
fn fewer_keys_than_k_returns_them_all() {
    let d = 16;
    let (keys, q) = data(40, 8, d, 4);
    let index = RetrievalIndex::build(&keys, d, &q, &IndexConfig::default()).unwrap();
    assert_eq!(
        index.tuning().held_out,
        0,
        "too few queries to hold any out"
    );
    let mut hits = Hits::new();
    index.search(
        &q[..2 * d],
        &SearchParams::default(),
        &mut SearchScratch::new(),
        &mut hits,
    );
    for i in 0..2 {
        assert_eq!(hits.found[i], 40);
        let mut ids = hits.ids(i).to_vec();
        ids.sort_unstable();
        assert_eq!(ids, (0..40).collect::<Vec<u32>>());
        assert!(
            hits.ids[i * 100 + 40..(i + 1) * 100]
                .iter()
                .all(|&x| x == NONE)
        );
    }
    // One key, no queries: a backbone-only index still answers.
    let one = RetrievalIndex::build(&keys[..d], d, &[], &IndexConfig::default()).unwrap();
    one.search(
        &q[..d],
        &SearchParams::new(1, 1).unwrap(),
        &mut SearchScratch::new(),
        &mut hits,
    );
    assert_eq!(hits.ids(0), &[0]);
}

#[test]
fn f16_keys_build_the_index_of_their_f32_values() {
    let d = 32;
    let (keys, q) = data(1500, 1100, d, 5);
    let h: Vec<f16> = keys.iter().map(|&x| f16::from_f32(x)).collect();
    let rounded: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
    let a = RetrievalIndex::build(&h, d, &q, &small_cfg()).unwrap();
    let b = RetrievalIndex::build(&rounded, d, &q, &small_cfg()).unwrap();
    assert_eq!(a.keys(), b.keys());
    assert_eq!(a.graph.adj, b.graph.adj);
}

#[test]
fn inserted_keys_are_linked_found_and_counted() {
    let d = 32;
    let (keys, q) = data(4000, 1500, d, 6);
    let mut index = RetrievalIndex::build(&keys[..3000 * d], d, &q, &small_cfg()).unwrap();
    assert_eq!((index.len(), index.inserted()), (3000, 0));
    index.insert(&keys[3000 * d..]).unwrap();
    assert_eq!((index.len(), index.inserted()), (4000, 1000));
    assert_eq!(index.keys(), &keys[..]);
    // 1000 of 4000 are new: a quarter, so a rebuild is due; one fewer is not.
    assert!(index.needs_rebuild());
    let mut less = RetrievalIndex::build(&keys[..3000 * d], d, &q, &small_cfg()).unwrap();
    less.insert(&keys[3000 * d..3999 * d]).unwrap();
    assert!(!less.needs_rebuild());
    for t in 0..index.len() {
        for &u in index.graph.row(t) {
            assert!(u == NONE || ((u as usize) < index.len() && u as usize != t));
        }
    }
    let st = index.stats();
    assert_eq!(st.unreachable, 0, "{st:?}");
    // Queries see old and new keys alike.
    let r = recall(&index, &keys, &q[..64 * d], &SearchParams::default());
    assert!(r >= 0.9, "recall after inserts {r}");
    // A key that every query prefers is found right after its insert.
    let big: Vec<f32> = q[..d].iter().map(|x| x * 100.0).collect();
    index.insert(&big).unwrap();
    let mut hits = Hits::new();
    index.search(
        &q[..d],
        &SearchParams::default(),
        &mut SearchScratch::new(),
        &mut hits,
    );
    assert_eq!(hits.ids(0)[0], 4000);
}

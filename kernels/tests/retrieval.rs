//! RetrievalAttention's index (COMPUTE.md §5) on the §2 test data, both
//! regimes: recall@100 at a scan budget, inserts, and the attention output
//! over a static window plus the retrieved keys.
//!
//! Targets asserted (needle regime; the semantic regime must meet the
//! same): recall@100 ≥ 0.90 reading ≤ 6% of 16K keys; ≥ 0.88 after 4K keys
//! inserted into a 16K index; output relerr of static window + retrieved
//! top-100 ≤ that of static window + exact top-100 plus 0.02. Recall is
//! against the exact top-100 by `q.k` in f64 (`strata-testdata`).
//!
//! Mutations that make these fail (kept as tests, so the targets cannot
//! pass for the wrong reason): without co-retrieval edges the index is a
//! key-kNN graph and needs 0.38 recall at 12% scan on held-out queries
//! (`without_co_retrieval_edges_the_target_is_missed`); linking only each
//! query's top-1 key collapses the co-retrieval graph into a star
//! (`top1_projection_collapses_into_hubs`).

use std::sync::OnceLock;

use strata_kernels::attention::{AttnParams, AttnScratch, Tokens, merge_into, partial_attention};
use strata_kernels::retrieval::{
    Expand, Hits, IndexConfig, RetrievalIndex, SearchParams, SearchScratch,
};
use strata_testdata::metrics::{Exact, recall_at_k, relerr_f64};
use strata_testdata::{Config, Generator, HeadData, Regime};

const N: usize = 16384;
const K: usize = 100;
const RECALL_MIN: f64 = 0.90;
const SCAN_MAX_PCT: f64 = 6.0;
/// Decode queries evaluated per head (the generator's first ones).
const STEPS: usize = 128;
/// The engine's static window (COMPUTE.md §5 default): sink and recent.
const SINK: usize = 128;
const RECENT: usize = 512;

fn generate(regime: Regime, n: usize) -> HeadData {
    let mut c = Config::new(regime, n, 1);
    c.decode_steps = STEPS;
    Generator::new(c)
        .expect("valid configuration")
        .generate()
        .data
}

fn head(regime: Regime) -> &'static HeadData {
    static NEEDLE: OnceLock<HeadData> = OnceLock::new();
    static SEMANTIC: OnceLock<HeadData> = OnceLock::new();
    match regime {
        Regime::Needle => NEEDLE.get_or_init(|| generate(regime, N)),
        Regime::Semantic => SEMANTIC.get_or_init(|| generate(regime, N)),
    }
}

/// The exact top-`K` of every decode query over `keys` (f64 scores).
fn exact_lists(data: &HeadData, keys: &[f32], values: &[f32]) -> Vec<Vec<u32>> {
    (0..data.steps())
        .map(|s| Exact::new(data.decode_query(s, 0), keys, values, data.scale).top_k(K))
        .collect()
}

/// Mean recall@K and scan% of `index` on the decode queries at `p`.
fn measure(
    index: &RetrievalIndex,
    data: &HeadData,
    exact: &[Vec<u32>],
    p: &SearchParams,
) -> (f64, f64) {
    let mut hits = Hits::new();
    index.search(
        &data.decode_queries,
        p,
        &mut SearchScratch::new(),
        &mut hits,
    );
    let q = hits.len();
    let recall: f64 = (0..q)
        .map(|i| recall_at_k(hits.ids(i), &exact[i]))
        .sum::<f64>()
        / q as f64;
    let scanned: f64 = hits.scanned.iter().map(|&s| f64::from(s)).sum::<f64>() / q as f64;
    (recall, 100.0 * scanned / index.len() as f64)
}

/// Candidate lists tried, smallest first: the search's cost grows with it.
const EF_LADDER: [usize; 7] = [100, 128, 160, 200, 256, 320, 400];

/// The first `ef` of the ladder reaching recall ≥ [`RECALL_MIN`], with
/// `(ef, recall, scan%)`; `None` when none does.
fn scan_at_recall(
    index: &RetrievalIndex,
    data: &HeadData,
    exact: &[Vec<u32>],
) -> Option<(usize, f64, f64)> {
    EF_LADDER.iter().find_map(|&ef| {
        let p = SearchParams::new(K, ef).expect("valid");
        let (r, s) = measure(index, data, exact, &p);
        (r >= RECALL_MIN).then_some((ef, r, s))
    })
}

fn build(data: &HeadData, cfg: &IndexConfig) -> RetrievalIndex {
    RetrievalIndex::build(&data.keys, data.d, &data.train_queries, cfg).expect("valid input")
}

fn recall_target(regime: Regime) {
    let data = head(regime);
    let exact = exact_lists(data, &data.keys, &data.values);
    let index = build(data, &IndexConfig::default());
    let found = scan_at_recall(&index, data, &exact);
    println!(
        "{} {N}: {:?} (ef, recall, scan%); tuning {:?}; {:?}; build {:?}",
        regime.name(),
        found,
        index.tuning(),
        index.stats(),
        index.build_times()
    );
    let (ef, recall, scan) = found.expect("recall 0.9 reached on the ladder");
    assert!(
        scan <= SCAN_MAX_PCT,
        "{}: recall {recall:.3} at ef {ef} scans {scan:.2}%",
        regime.name()
    );
    // The tuned default aims higher (0.95 on held-out prefill queries, not
    // these) and gets there.
    let (r, s) = measure(&index, data, &exact, &index.default_params());
    println!(
        "default params {:?}: recall {r:.3}, scan {s:.2}%",
        index.default_params()
    );
    assert!(r >= 0.93, "default params: recall {r:.3}, scan {s:.2}%");
}

/// COMPUTE.md §5: recall@100 ≥ 0.90 at scan ≤ 6% of 16K keys (measured
/// 0.943 at 5.1%: ef 100, backbone edges followed at cold keys only).
#[test]
fn needle_16k_recall_at_most_6pct_scan() {
    recall_target(Regime::Needle);
}

/// The same target on semantic heads (measured 0.914 at 3.5%: ef 100,
/// every edge followed).
#[test]
fn semantic_16k_recall_at_most_6pct_scan() {
    recall_target(Regime::Semantic);
}

/// The mutation for the recall target: drop the co-retrieval edges and the
/// index is a query-agnostic key-kNN graph (plus query routing), which on
/// needle heads needs far more than 6% of the keys for recall 0.9 (shown:
/// recall 0.18 at ef 100, 0.34 at ef 400 scanning 9.8%).
#[test]
fn without_co_retrieval_edges_the_target_is_missed() {
    let data = head(Regime::Needle);
    let exact = exact_lists(data, &data.keys, &data.values);
    let cfg = IndexConfig {
        co_degree: 0,
        ..IndexConfig::default()
    };
    let index = build(data, &cfg);
    let found = scan_at_recall(&index, data, &exact);
    let at_400 = measure(
        &index,
        data,
        &exact,
        &SearchParams::new(K, 400).expect("valid"),
    );
    println!("needle {N} without co-retrieval: {found:?}; at ef 400: {at_400:?}");
    assert!(
        found.is_none_or(|(_, _, scan)| scan > SCAN_MAX_PCT),
        "{found:?}"
    );
    assert!(at_400.0 < 0.6, "{at_400:?}");
}

/// COMPUTE.md §5's pitfall: linking only each training query's top-1 key
/// to the rest of its top-100 (the plain projection rule) leaves almost
/// every key without co-retrieval edges; linking every rank gives most
/// retrieved keys a neighbourhood, and the popularity discount keeps any
/// one key from being everyone's neighbour.
#[test]
fn top1_projection_collapses_into_hubs() {
    let data = generate(Regime::Needle, 4096);
    let stats = |link_ranks| {
        let cfg = IndexConfig {
            link_ranks,
            ..IndexConfig::default()
        };
        build(&data, &cfg).stats()
    };
    let (star, ours) = (stats(1), stats(100));
    println!("top-1 projection {star:?}\nall ranks {ours:?}");
    let n = data.n as f64;
    assert!(
        star.co_mean < 1.0 && (star.co_keys as f64) < 0.01 * n,
        "{star:?}"
    );
    assert!(
        ours.co_mean > 20.0 && ours.co_keys as f64 > 0.5 * n,
        "{ours:?}"
    );
    assert!((ours.co_in_max as f64) < 0.1 * n, "a hub: {ours:?}");
}

/// COMPUTE.md §5: recall ≥ 0.88 after 4K tokens are inserted into an index
/// built over 16K (measured 0.93 at ef 100, scan 4.3%; the index built over
/// all 20K gets 0.93 too).
#[test]
fn insert_4k_keeps_recall() {
    let data = generate(Regime::Needle, N + 4096);
    let d = data.d;
    let mut index = RetrievalIndex::build(
        &data.keys[..N * d],
        d,
        &data.train_queries[..N * d],
        &IndexConfig::default(),
    )
    .expect("valid input");
    index.insert(&data.keys[N * d..]).expect("valid keys");
    assert_eq!(index.len(), N + 4096);
    // 4K of 20K is a fifth: no rebuild due yet.
    assert!(!index.needs_rebuild());
    let exact = exact_lists(&data, &data.keys, &data.values);
    // The new keys are among the wanted ones (so recall measures them).
    let new_wanted = exact.iter().flatten().filter(|&&t| t as usize >= N).count();
    let (recall, scan) = measure(
        &index,
        &data,
        &exact,
        &SearchParams::new(K, 100).expect("valid"),
    );
    println!(
        "needle {N} + 4096 inserted: recall {recall:.3} scan {scan:.2}%; new keys wanted {new_wanted}; {:?}",
        index.stats()
    );
    assert!(new_wanted > STEPS * K / 10, "{new_wanted}");
    assert!(recall >= 0.88, "recall after inserts {recall:.3}");
}

/// Partial attention `(o, lse)` of one query head over `rows`.
fn partial(
    data: &HeadData,
    q: &[f32],
    rows: &[u32],
    scratch: &mut AttnScratch,
) -> (Vec<f32>, Vec<f32>) {
    let p = AttnParams {
        heads: 1,
        d: data.d,
        scale: data.scale,
    };
    let (mut o, mut lse) = (vec![0.0; data.d], vec![0.0; 1]);
    partial_attention(
        &p,
        q,
        &data.keys,
        &data.values,
        Tokens::Rows(rows),
        scratch,
        &mut o,
        &mut lse,
    );
    (o, lse)
}

fn relerr_target(regime: Regime) {
    let data = head(regime);
    let (n, d) = (data.n, data.d);
    // The index covers the tokens outside the engine's static window.
    let middle = SINK..n - RECENT;
    let index = RetrievalIndex::build(
        &data.keys[middle.start * d..middle.end * d],
        d,
        &data.train_queries,
        &IndexConfig::default(),
    )
    .expect("valid input");
    let stat: Vec<u32> = (0..SINK as u32)
        .chain(middle.end as u32..n as u32)
        .collect();
    let mut scratch = AttnScratch::new(1, d);
    let mut hits = Hits::new();
    let p = index.default_params();
    index.search(
        &data.decode_queries,
        &p,
        &mut SearchScratch::new(),
        &mut hits,
    );
    let (mut ours, mut oracle, mut static_only) = (0.0, 0.0, 0.0);
    for s in 0..data.steps() {
        let q = data.decode_query(s, 0);
        let full = Exact::new(q, &data.keys, &data.values, data.scale);
        let mid = Exact::new(
            q,
            &data.keys[middle.start * d..middle.end * d],
            &data.values[middle.start * d..middle.end * d],
            data.scale,
        );
        let with = |ids: &[u32], scratch: &mut AttnScratch| {
            let (mut o, mut lse) = partial(data, q, &stat, scratch);
            let rows: Vec<u32> = ids.iter().map(|&t| t + SINK as u32).collect();
            let (ob, lb) = partial(data, q, &rows, scratch);
            merge_into(d, &mut o, &mut lse, &ob, &lb);
            let o: Vec<f64> = o.iter().map(|&x| f64::from(x)).collect();
            relerr_f64(&o, &full.o)
        };
        ours += with(hits.ids(s), &mut scratch);
        oracle += with(&mid.top_k(K), &mut scratch);
        static_only += with(&[], &mut scratch);
    }
    let steps = data.steps() as f64;
    let (ours, oracle, static_only) = (ours / steps, oracle / steps, static_only / steps);
    println!(
        "{} {N}: relerr static + retrieved {ours:.4}, static + exact top-100 {oracle:.4}, static only {static_only:.4}",
        regime.name()
    );
    assert!(
        ours <= oracle + 0.02,
        "relerr {ours:.4} vs exact top-100 {oracle:.4}"
    );
    // Not vacuous: the window alone is far off.
    assert!(
        static_only > oracle + 0.1,
        "static window alone {static_only:.4}"
    );
}

/// COMPUTE.md §5: attention over the static window plus the retrieved
/// top-100 is within +0.02 relerr of the window plus the exact top-100.
#[test]
fn needle_output_relerr_within_002_of_exact_top100() {
    relerr_target(Regime::Needle);
}

#[test]
fn semantic_output_relerr_within_002_of_exact_top100() {
    relerr_target(Regime::Semantic);
}

/// What the build chose per regime: backbone edges pay on semantic heads
/// (key geometry follows topics), not on needle heads (it follows
/// position).
#[test]
fn tuning_follows_key_geometry_where_it_reflects_relevance() {
    let data = generate(Regime::Needle, 8192);
    let index = build(&data, &IndexConfig::default());
    println!("needle 8K tuning {:?}", index.tuning());
    assert_eq!(index.tuning().expand, Expand::ColdBackbone);
    let data = generate(Regime::Semantic, 8192);
    let index = build(&data, &IndexConfig::default());
    println!("semantic 8K tuning {:?}", index.tuning());
    assert_eq!(index.tuning().expand, Expand::All);
}

//! The realism gates of COMPUTE.md §2 asserted on the generator's output,
//! in both regimes, and the mutations that must make each gate fail (so
//! that no gate passes for the wrong reason).
//!
//! Sizes: the gates are properties, not sizes, so they are asserted at
//! N = 8K in debug (N = 4K for the mutations). COMPUTE.md states the
//! hardness gate at N = 32K; the needle regime passes it already at 8K
//! (scan 49-55% over seeds 1 to 3) and it only gets harder with N (71% at
//! 32K), so 8K checks the property and `needle_hardness_at_32k` (ignored:
//! about 15 s in release) records the figure:
//! `cargo test -p strata-testdata --release -- --ignored`.

use std::sync::OnceLock;
use strata_testdata::gates::{self, Report};
use strata_testdata::ivf::IvfConfig;
use strata_testdata::linalg::median;
use strata_testdata::metrics::Exact;
use strata_testdata::{Config, Generator, Regime, Synthetic};

const N: usize = 8192;
const SEED: u64 = 1;

fn generate(c: Config) -> Synthetic {
    Generator::new(c).expect("valid configuration").generate()
}

fn head(regime: Regime) -> &'static (Synthetic, Report) {
    static SEMANTIC: OnceLock<(Synthetic, Report)> = OnceLock::new();
    static NEEDLE: OnceLock<(Synthetic, Report)> = OnceLock::new();
    let cell = match regime {
        Regime::Semantic => &SEMANTIC,
        Regime::Needle => &NEEDLE,
    };
    cell.get_or_init(|| {
        let s = generate(Config::new(regime, N, SEED));
        let r = gates::evaluate(&s.data, &IvfConfig::default());
        println!(
            "{} n={N}: {:?}\n  {:?}\n  {:?}",
            regime.name(),
            r.gates,
            r.skew,
            r.hardness
        );
        (s, r)
    })
}

#[test]
fn semantic_head_passes_skew_ood_dynamics() {
    let (s, r) = head(Regime::Semantic);
    s.data.check().unwrap();
    for g in &r.gates[..3] {
        assert!(g.pass(), "semantic: {g:?}");
    }
}

#[test]
fn needle_head_passes_every_gate() {
    let (s, r) = head(Regime::Needle);
    s.data.check().unwrap();
    for g in &r.gates {
        assert!(g.pass(), "needle: {g:?}");
    }
}

#[test]
fn index_hardness_separates_the_regimes() {
    let sem = head(Regime::Semantic).1.hardness;
    let needle = head(Regime::Needle).1.hardness;
    let target = gates::HARDNESS_RECALL - 1e-9; // mean of rationals, summed in f64
    assert!(
        sem.recall >= target && needle.recall >= target,
        "{sem:?} {needle:?}"
    );
    // Semantic heads are easy for a query-agnostic index, needle heads not:
    // the gate's threshold lies between them, with room on both sides.
    assert!(
        sem.scan_pct < gates::HARDNESS_MIN_PCT / 2.0,
        "semantic {sem:?}"
    );
    assert!(
        needle.scan_pct >= gates::HARDNESS_MIN_PCT,
        "needle {needle:?}"
    );
    assert!(
        needle.scan_pct > 3.0 * sem.scan_pct,
        "{sem:?} vs {needle:?}"
    );
}

/// Share of each decode query's top-100 in its own topic, and the z-score
/// of its largest non-sink logit (medians over the decode steps of head 0).
fn topic_share_and_max_z(s: &Synthetic) -> (f64, f64) {
    let (mut share, mut max_z) = (Vec::new(), Vec::new());
    for step in 0..s.data.steps() {
        let ex = Exact::new(
            s.data.decode_query(step, 0),
            &s.data.keys,
            &s.data.values,
            s.data.scale,
        );
        let topic = s.decode_state[step].topic;
        let top = ex.top_k(100);
        share.push(
            top.iter()
                .filter(|&&t| s.token_topic[t as usize] == topic)
                .count() as f64
                / 100.0,
        );
        let l = &ex.logits[1..];
        let mean = l.iter().sum::<f64>() / l.len() as f64;
        let sd = (l.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / l.len() as f64).sqrt();
        max_z.push((l.iter().copied().fold(f64::MIN, f64::max) - mean) / sd);
    }
    (median(&share), median(&max_z))
}

#[test]
fn relevant_tokens_are_runs_in_semantic_and_scattered_in_needle() {
    let (sem, _) = topic_share_and_max_z(&head(Regime::Semantic).0);
    let (needle, _) = topic_share_and_max_z(&head(Regime::Needle).0);
    assert!(
        sem > 0.6,
        "semantic top-100 mostly from the query's topic runs: {sem}"
    );
    assert!(
        needle < 0.3,
        "needle top-100 mostly elsewhere: {needle} (semantic {sem})"
    );
}

#[test]
fn needles_are_extreme_because_of_the_heavy_tails() {
    // The best non-sink logit of a needle query stands far out of the rest
    // (a few extreme tokens); with light-tailed features it does not.
    let (_, heavy) = topic_share_and_max_z(&head(Regime::Needle).0);
    let (_, light) = topic_share_and_max_z(&mutated(Regime::Needle, |c| c.heavy_tails = false));
    assert!(heavy > 5.0, "needle max z {heavy}");
    assert!(light < 4.0, "light-tailed max z {light}");
}

#[test]
fn queries_ignore_the_nuisance_subspace_where_keys_vary_strongly() {
    let s = &head(Regime::Needle).0;
    let u = &s.nuisance_basis;
    assert_eq!(u.len(), 32);
    assert!(head(Regime::Semantic).0.nuisance_basis.is_empty());
    let along = |x: &[f32]| -> f64 {
        u.iter()
            .map(|b| {
                x.iter()
                    .zip(b)
                    .map(|(a, b)| f64::from(*a) * b)
                    .sum::<f64>()
                    .powi(2)
            })
            .sum::<f64>()
    };
    let norm2 = |x: &[f32]| -> f64 { x.iter().map(|a| f64::from(*a).powi(2)).sum() };
    for q in s
        .data
        .decode_queries
        .chunks_exact(s.data.d)
        .chain(s.data.train_queries.chunks_exact(s.data.d).step_by(97))
    {
        assert!(
            along(q) <= 1e-10 * norm2(q),
            "a query has a nuisance component"
        );
    }
    // Keys: the share of their variance (around the mean) in the subspace.
    let d = s.data.d;
    let mut mean = vec![0.0f32; d];
    for k in s.data.keys.chunks_exact(d) {
        mean.iter_mut()
            .zip(k)
            .for_each(|(m, x)| *m += x / s.data.n as f32);
    }
    let (mut inside, mut total) = (0.0, 0.0);
    for k in s.data.keys.chunks_exact(d).skip(1) {
        let c: Vec<f32> = k.iter().zip(&mean).map(|(x, m)| x - m).collect();
        inside += along(&c);
        total += norm2(&c);
    }
    assert!(
        inside / total > 0.5,
        "nuisance share of key variance {}",
        inside / total
    );
}

#[test]
fn oracle_at_five_percent_holds_most_mass() {
    for regime in [Regime::Semantic, Regime::Needle] {
        let s = &head(regime).0;
        let budget = s.data.n / 20;
        let mut masses = Vec::new();
        for step in (0..s.data.steps()).step_by(8) {
            let ex = Exact::new(
                s.data.decode_query(step, 0),
                &s.data.keys,
                &s.data.values,
                s.data.scale,
            );
            let o = ex.oracle(budget, &s.data.values);
            assert!(o.relerr < 0.5, "{regime:?} step {step}: {o:?}");
            masses.push(o.mass);
        }
        let m = median(&masses);
        assert!(m > 0.9, "{regime:?}: oracle mass at 5% {m}");
    }
}

// --- Each gate must be able to fail: break the property it checks.

fn mutated(regime: Regime, f: impl Fn(&mut Config)) -> Synthetic {
    let mut c = Config::new(regime, 4096, SEED);
    f(&mut c);
    generate(c)
}

#[test]
fn skew_fails_without_a_sharp_temperature() {
    for regime in [Regime::Semantic, Regime::Needle] {
        let base = gates::skew(&mutated(regime, |_| {}).data).top2;
        let flat = gates::skew(&mutated(regime, |c| c.top1_mass = 0.05).data).top2;
        assert!(base >= gates::SKEW_MIN, "{regime:?} base {base}");
        assert!(flat < gates::SKEW_MIN, "{regime:?} flat {flat}");
    }
}

#[test]
fn ood_fails_when_queries_share_the_key_distribution() {
    // Without both biases the queries are the same map of the same latents
    // as the keys (a query without the query bias alone is still OOD: it
    // lacks the key bias).
    for regime in [Regime::Semantic, Regime::Needle] {
        let base = gates::ood(&mutated(regime, |_| {}).data);
        let same = gates::ood(
            &mutated(regime, |c| {
                c.query_bias_ratio = 0.0;
                c.key_bias_ratio = 0.0;
            })
            .data,
        );
        assert!(base >= gates::OOD_MIN, "{regime:?} base {base}");
        assert!(same < gates::OOD_MIN, "{regime:?} without biases {same}");
    }
}

#[test]
fn dynamics_fails_for_frozen_and_for_memoryless_queries() {
    for regime in [Regime::Semantic, Regime::Needle] {
        let base = gates::dynamics(&mutated(regime, |_| {}).data);
        let frozen = gates::dynamics(
            &mutated(regime, |c| {
                c.persistence = 1.0;
                c.query_noise = 0.0;
            })
            .data,
        );
        let memoryless = gates::dynamics(&mutated(regime, |c| c.persistence = 0.0).data);
        let (lo, hi) = gates::DYNAMICS_RANGE;
        assert!((lo..=hi).contains(&base), "{regime:?} base {base}");
        assert!(frozen > hi, "{regime:?} frozen {frozen}");
        assert!(memoryless < lo, "{regime:?} memoryless {memoryless}");
    }
}

#[test]
fn hardness_fails_when_queries_seek_topics_and_drops_without_nuisance() {
    let ivf = IvfConfig::default();
    let base = gates::index_hardness(&mutated(Regime::Needle, |_| {}).data, &ivf);
    let topical = gates::index_hardness(
        &mutated(Regime::Needle, |c| {
            c.query_feature_weight = 0.0;
            c.query_topic_weight = 1.0;
        })
        .data,
        &ivf,
    );
    let no_nuisance =
        gates::index_hardness(&mutated(Regime::Needle, |c| c.nuisance_dims = 0).data, &ivf);
    assert!(base.scan_pct >= gates::HARDNESS_MIN_PCT, "{base:?}");
    // Relevant tokens in topic runs: a key clustering finds them.
    assert!(topical.scan_pct < gates::HARDNESS_MIN_PCT, "{topical:?}");
    // Key geometry that reflects relevance better: cheaper to search.
    assert!(
        no_nuisance.scan_pct < 0.85 * base.scan_pct,
        "{no_nuisance:?} vs {base:?}"
    );
}

// --- Structure.

#[test]
fn generation_is_deterministic_and_pinned() {
    let c = {
        let mut c = Config::new(Regime::Needle, 512, 42);
        c.query_heads = 2;
        c.decode_steps = 4;
        c
    };
    let a = generate(c.clone());
    let b = generate(c);
    assert_eq!(a.data.keys, b.data.keys);
    let bytes: Vec<u8> = [
        &a.data.keys,
        &a.data.values,
        &a.data.train_queries,
        &a.data.decode_queries,
    ]
    .iter()
    .flat_map(|v| v.iter().flat_map(|x| x.to_le_bytes()))
    .collect();
    // The generator uses only IEEE basic operations and its own exp/ln/sin/cos
    // (detmath), so these bits are the same on every platform; a change to
    // the generator must update this pin deliberately.
    let hash = strata_kernels::checksum::xxh3_64(&bytes);
    assert_eq!(hash, PINNED, "generator output changed: {hash:#018x}");
    // Another seed, other data.
    let other = generate(Config::new(Regime::Needle, 512, 43));
    assert_ne!(other.data.keys, a.data.keys);
}

const PINNED: u64 = 0x885f_4f23_5830_00ed;

#[test]
fn gqa_heads_share_the_topic_but_not_every_key() {
    let mut c = Config::new(Regime::Semantic, 2048, SEED);
    c.query_heads = 4;
    c.decode_steps = 16;
    let s = generate(c);
    let d = &s.data;
    d.check().unwrap();
    assert_eq!(
        (d.heads, d.decode_queries.len(), d.train_len()),
        (4, 16 * 4 * 128, 2048)
    );
    let top = |step: usize, h: usize| {
        let mut t = Exact::new(d.decode_query(step, h), &d.keys, &d.values, d.scale).top_k(100);
        t.sort_unstable();
        t
    };
    let jaccard = |a: &[u32], b: &[u32]| {
        let inter = a.iter().filter(|x| b.binary_search(x).is_ok()).count();
        inter as f64 / (a.len() + b.len() - inter) as f64
    };
    let mut same_step = Vec::new();
    for step in 0..d.steps() {
        let t0 = top(step, 0);
        for h in 1..4 {
            assert_ne!(d.decode_query(step, 0), d.decode_query(step, h));
            same_step.push(jaccard(&t0, &top(step, h)));
        }
    }
    let m = median(&same_step);
    assert!(
        m > 0.3 && m < 0.95,
        "heads of a group overlap but differ: {m}"
    );
}

#[test]
fn temperature_calibration_reaches_its_target() {
    // Independent decode states (persistence 0) so the median is over many
    // states; per-query masses are spread wide (0.2 to 1), hence the margin.
    let mut c = Config::new(Regime::Semantic, 4096, SEED);
    c.persistence = 0.0;
    c.decode_steps = 200;
    let s = generate(c);
    let st = gates::skew(&s.data);
    assert!((st.top1_nonsink - 0.8).abs() < 0.12, "{st:?}");
    assert!(st.sink > 0.02 && st.sink < 0.7, "{st:?}");
}

/// The gates at the size COMPUTE.md states them (N = 32K).
#[test]
fn needle_hardness_at_32k() {
    let needle = generate(Config::new(Regime::Needle, 32768, SEED));
    let r = gates::evaluate(&needle.data, &IvfConfig::default());
    println!("needle 32K: {:?}\n  {:?}", r.gates, r.hardness);
    for g in &r.gates {
        assert!(g.pass(), "needle 32K: {g:?}");
    }
    let sem = generate(Config::new(Regime::Semantic, 32768, SEED));
    let rs = gates::evaluate(&sem.data, &IvfConfig::default());
    println!("semantic 32K: {:?}\n  {:?}", rs.gates, rs.hardness);
    for g in &rs.gates[..3] {
        assert!(g.pass(), "semantic 32K: {g:?}");
    }
    assert!(rs.hardness.scan_pct < gates::HARDNESS_MIN_PCT / 2.0);
}

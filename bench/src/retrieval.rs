//! `retrieval`: RetrievalAttention's index (`strata_kernels::retrieval`,
//! COMPUTE.md §5) on synthetic heads, pure compute (no daemon).
//!
//! Per (regime, N): one KV head from `strata-testdata` (seed 1, d = 128,
//! 256 decode queries). Measured here:
//! * the exact top-100 of every decode query, and the exact scan's latency
//!   (one pass over the keys per query, one thread);
//!
//! Latencies are CPU time of the searching thread, best of 5 passes over
//! the queries: this machine is shared, and wall time under load also
//! counts the time other processes held the core.
//! * the index: build time per phase on all cores, memory, what the build
//!   tuned; for a ladder of candidate lists `ef`, mean recall@100, scan%
//!   (inner products computed ÷ N, routing centres included) and search
//!   latency per query on one thread;
//! * output quality: attention over the engine's static window (128 sink +
//!   512 recent tokens) plus the index's top-100 (an index over the tokens
//!   outside the window), merged by log-sum-exp, against full attention in
//!   f64; beside it the window plus the exact top-100, and the window alone.
//!
//! The keys, the decode queries and the exact top-100 are written as .npy
//! files (`<out>/retrieval/<regime>-<N>/`) so that `bench/retrieval/run`
//! runs the query-agnostic baselines (faiss HNSW and IVF in inner-product
//! space) on identical data; this section's own figures go to `strata.json`
//! beside them, and `bench/retrieval/report.py` plots and tables both.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use strata_kernels::attention::{AttnParams, AttnScratch, Tokens, merge_into, partial_attention};
use strata_kernels::retrieval::{
    Hits, IndexConfig, RetrievalIndex, SearchParams, SearchScratch, exact_search,
};
use strata_testdata::capture::{Capture, RealOptions};
use strata_testdata::ivf::{Ivf, IvfConfig, scan_for_recall};
use strata_testdata::metrics::{Exact, recall_at_k, relerr_f64};
use strata_testdata::npy;
use strata_testdata::{Config, Generator, HeadData, Regime};

use crate::{Report, f2};

const K: usize = 100;
/// Candidate lists measured (the curve).
const EF_LADDER: [usize; 10] = [100, 128, 160, 200, 256, 320, 400, 512, 768, 1024];
/// The engine's static window (COMPUTE.md §5 default).
const SINK: usize = 128;
const RECENT: usize = 512;
/// Decode queries whose output error is measured (f64 references over N).
const RELERR_STEPS: usize = 64;
/// Timing passes over the queries; the fastest counts (shared machine).
const PASSES: usize = 5;

/// CPU time of the calling thread: latency on a shared machine, where wall
/// time also counts the time other processes held the core.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec; the clock id is a constant.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One point of the curve.
struct Point {
    ef: usize,
    recall: f64,
    scan_pct: f64,
    us_per_query: f64,
}

/// Output error at one `ef`, means over [`RELERR_STEPS`] queries.
struct Relerr {
    ef: usize,
    recall: f64,
    ours: f64,
    exact_top: f64,
    window: f64,
}

/// Runs the section for 16K and 32K tokens (and 128K with `long`), both
/// regimes (128K: needle only), writing data and figures under `out`.
pub fn retrieval(rep: &mut Report, out: &Path, quick: bool, long: bool) -> Result<()> {
    let dir = out.join("retrieval");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cases: Vec<(Regime, usize)> = if quick {
        vec![(Regime::Needle, 16384)]
    } else {
        vec![
            (Regime::Needle, 16384),
            (Regime::Needle, 32768),
            (Regime::Semantic, 16384),
            (Regime::Semantic, 32768),
        ]
    };
    if long {
        cases.push((Regime::Needle, 131072));
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    rep.section(
        "Retrieval index (COMPUTE.md §5): build, memory, tuning",
        &[
            "regime",
            "N",
            &format!("build s ({threads} threads)"),
            "backbone / train top-k / co+routing / tune s",
            "MiB (KiB/key)",
            "tuned (edges, ef)",
            "co-retrieval mean degree",
        ],
    );
    let mut json = String::from("{\n");
    let mut curves = Vec::new();
    for (ci, &(regime, n)) in cases.iter().enumerate() {
        let t = Instant::now();
        let data = Generator::new(Config::new(regime, n, 1))
            .map_err(anyhow::Error::msg)?
            .generate()
            .data;
        eprintln!(
            "retrieval: {} {n} generated in {:.1?}",
            regime.name(),
            t.elapsed()
        );
        let case = dir.join(format!("{}-{n}", regime.name()));
        std::fs::create_dir_all(&case)?;
        let (exact, exact_us) = exact_lists(&data);
        write_npy(&case, &data, &exact)?;

        let index = RetrievalIndex::build(
            &data.keys,
            data.d,
            &data.train_queries,
            &IndexConfig::default(),
        )?;
        let bt = index.build_times();
        let st = index.stats();
        let tu = index.tuning();
        let mem = index.memory_bytes();
        rep.row(&[
            regime.name().into(),
            n.to_string(),
            f2(bt.total_s()),
            format!(
                "{:.2} / {:.2} / {:.2} / {:.2}",
                bt.backbone_s, bt.train_s, bt.co_s, bt.tune_s
            ),
            format!(
                "{:.1} ({:.2})",
                mem as f64 / (1 << 20) as f64,
                mem as f64 / 1024.0 / n as f64
            ),
            format!("{:?}, {}", tu.expand, tu.ef),
            format!("{:.1}", st.co_mean),
        ]);
        let points = sweep(&index, &data, &exact);
        let relerr = output_error(&data)?;
        let _ = writeln!(
            json,
            "  {:?}: {{\"regime\": {:?}, \"n\": {n}, \"exact_us_per_query\": {exact_us:.2}, \"build_s\": {:.3}, \
             \"memory_bytes\": {mem}, \"tuned_ef\": {}, \"expand\": \"{:?}\", \"threads\": {threads},\n    \"curve\": [{}],\n    \
             \"relerr\": [{}]}}{}",
            format!("{}-{n}", regime.name()),
            regime.name(),
            bt.total_s(),
            tu.ef,
            tu.expand,
            points
                .iter()
                .map(|p| format!(
                    "{{\"ef\": {}, \"recall\": {:.4}, \"scan_pct\": {:.3}, \"us_per_query\": {:.2}}}",
                    p.ef, p.recall, p.scan_pct, p.us_per_query
                ))
                .collect::<Vec<_>>()
                .join(", "),
            relerr
                .iter()
                .map(|r| format!(
                    "{{\"ef\": {}, \"recall\": {:.4}, \"ours\": {:.5}, \"exact_top\": {:.5}, \"window\": {:.5}}}",
                    r.ef, r.recall, r.ours, r.exact_top, r.window
                ))
                .collect::<Vec<_>>()
                .join(", "),
            if ci + 1 < cases.len() { "," } else { "" }
        );
        curves.push((regime, n, exact_us, points, relerr));
    }
    json.push_str("}\n");
    std::fs::write(dir.join("strata.json"), json)?;

    rep.section(
        "Retrieval: recall@100 vs scan, search latency (one thread) vs exact scan",
        &[
            "regime",
            "N",
            "ef",
            "recall@100",
            "scan %",
            "µs/query",
            "exact scan µs/query",
            "speed-up",
        ],
    );
    for (regime, n, exact_us, points, _) in &curves {
        for p in points {
            rep.row(&[
                regime.name().into(),
                n.to_string(),
                p.ef.to_string(),
                format!("{:.3}", p.recall),
                f2(p.scan_pct),
                format!("{:.1}", p.us_per_query),
                format!("{exact_us:.0}"),
                format!("{:.1}", exact_us / p.us_per_query),
            ]);
        }
    }
    rep.section(
        &format!(
            "Retrieval: output relerr, window ({SINK} sink + {RECENT} recent) + top-100, vs full attention (f64), {RELERR_STEPS} queries"
        ),
        &["regime", "N", "ef", "recall@100", "window + index", "window + exact top-100", "difference", "window only"],
    );
    for (regime, n, _, _, relerr) in &curves {
        for r in relerr {
            rep.row(&[
                regime.name().into(),
                n.to_string(),
                r.ef.to_string(),
                format!("{:.3}", r.recall),
                format!("{:.4}", r.ours),
                format!("{:.4}", r.exact_top),
                format!("{:+.4}", r.ours - r.exact_top),
                format!("{:.4}", r.window),
            ]);
        }
    }
    rep.note(&format!(
        "Data for the baselines and the plot: {} (`bench/retrieval/run` adds faiss HNSW/IVF).",
        dir.display()
    ));
    Ok(())
}

/// Real captured heads (`testbed/capture`, `meta.json` + `.npy` per
/// layer): per layer and KV head, an index over the keys before the decode
/// tail (the last quarter of the positions) with the prefill queries of
/// its GQA group as training queries; the tail's queries (every head) as
/// decode queries, judged against the exact top-100 over the indexed keys
/// (the tail's own keys would sit in the engine's recent window). Beside
/// it the scan the testdata IVF (query-agnostic, inner product) needs for
/// recall 0.9.
pub fn retrieval_real(rep: &mut Report, dir: &Path) -> Result<()> {
    let cap = Capture::open(dir).with_context(|| format!("capture {}", dir.display()))?;
    let m = &cap.meta;
    let split = m.n_tokens - m.n_tokens.div_ceil(4);
    let ladder = [100, 128, 200, 400];
    let mut header = vec!["layer".to_string(), "KV head".into(), "tuned".into()];
    header.extend(ladder.iter().map(|ef| format!("ef {ef}: recall, scan %")));
    header.push("IVF scan % at recall 0.9".into());
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    rep.section(
        &format!(
            "Retrieval on real heads: {} ({} tokens, d {}, {} KV heads x {} query heads), {split} keys indexed",
            m.model,
            m.n_tokens,
            m.head_dim,
            m.num_kv_heads,
            m.group()
        ),
        &header,
    );
    let (mut recalls, mut scans, mut ivf_scans) = (Vec::new(), Vec::new(), Vec::new());
    for &layer in &m.layers {
        for (g, h) in cap
            .layer(layer, &RealOptions::default())?
            .iter()
            .enumerate()
        {
            let d = h.d;
            let keys = &h.keys[..split * d];
            let index = RetrievalIndex::build(keys, d, &h.train_queries, &IndexConfig::default())?;
            let q = &h.decode_queries;
            let nq = q.len() / d;
            let mut exact = Hits::new();
            exact_search(keys, d, q, K, &mut exact);
            let mut row = vec![
                layer.to_string(),
                g.to_string(),
                format!("{:?}, {}", index.tuning().expand, index.tuning().ef),
            ];
            let mut hits = Hits::new();
            let mut scratch = SearchScratch::new();
            for ef in ladder {
                index.search(q, &SearchParams::new(K, ef)?, &mut scratch, &mut hits);
                let r = (0..nq)
                    .map(|i| recall_at_k(hits.ids(i), exact.ids(i)))
                    .sum::<f64>()
                    / nq as f64;
                let s = hits.scanned.iter().map(|&x| f64::from(x)).sum::<f64>()
                    / nq as f64
                    / split as f64
                    * 100.0;
                if ef == ladder[0] {
                    recalls.push(r);
                    scans.push(s);
                }
                row.push(format!("{r:.3}, {s:.1}"));
            }
            let ivf = Ivf::build(keys, d, &IvfConfig::default());
            let at = scan_for_recall(
                &ivf,
                keys,
                (0..nq).map(|i| (&q[i * d..(i + 1) * d], split)),
                K,
                0.9,
            );
            ivf_scans.push(at.scan_pct);
            row.push(format!("{:.1}", at.scan_pct));
            rep.row(&row);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    rep.note(&format!(
        "Medians over the heads: ef 100 recall {:.3} at {:.1}% scan; IVF {:.1}% for recall 0.9.",
        median(&mut recalls),
        median(&mut scans),
        median(&mut ivf_scans)
    ));
    Ok(())
}

/// The exact top-100 of every decode query (the scan every method is
/// judged against) and the exact scan's latency per query on one thread.
fn exact_lists(data: &HeadData) -> (Vec<Vec<u32>>, f64) {
    let d = data.d;
    let mut hits = Hits::new();
    let mut best = Duration::MAX;
    let mut lists = Vec::new();
    for _ in 0..PASSES {
        lists.clear();
        let t = thread_cpu();
        for s in 0..data.steps() {
            exact_search(&data.keys, d, data.decode_query(s, 0), K, &mut hits);
            lists.push(hits.ids(0).to_vec());
        }
        best = best.min(thread_cpu() - t);
    }
    (lists, best.as_secs_f64() * 1e6 / data.steps() as f64)
}

fn write_npy(dir: &Path, data: &HeadData, exact: &[Vec<u32>]) -> Result<()> {
    let (n, d) = (data.n, data.d);
    npy::write_f32(&dir.join("keys.npy"), &[n, d], &data.keys)?;
    let queries: Vec<f32> = (0..data.steps())
        .flat_map(|s| data.decode_query(s, 0).to_vec())
        .collect();
    npy::write_f32(&dir.join("queries.npy"), &[data.steps(), d], &queries)?;
    let gt: Vec<i32> = exact
        .iter()
        .flat_map(|l| l.iter().map(|&t| t as i32))
        .collect();
    npy::write_i32(&dir.join("gt.npy"), &[exact.len(), K], &gt)?;
    Ok(())
}

/// Recall, scan and one-thread latency of the decode queries at each `ef`.
fn sweep(index: &RetrievalIndex, data: &HeadData, exact: &[Vec<u32>]) -> Vec<Point> {
    let d = data.d;
    let queries: Vec<f32> = (0..data.steps())
        .flat_map(|s| data.decode_query(s, 0).to_vec())
        .collect();
    let nq = data.steps();
    let mut scratch = SearchScratch::new();
    let mut hits = Hits::new();
    let mut out = Vec::new();
    for ef in EF_LADDER {
        let p = SearchParams::new(K, ef).expect("ladder within limits");
        let mut best = Duration::MAX;
        for _ in 0..PASSES {
            let t = thread_cpu();
            // One query per call, as a decode step asks.
            for i in 0..nq {
                index.search(&queries[i * d..(i + 1) * d], &p, &mut scratch, &mut hits);
            }
            best = best.min(thread_cpu() - t);
        }
        index.search(&queries, &p, &mut scratch, &mut hits);
        let recall = (0..nq)
            .map(|i| recall_at_k(hits.ids(i), &exact[i]))
            .sum::<f64>()
            / nq as f64;
        let scanned = hits.scanned.iter().map(|&s| f64::from(s)).sum::<f64>() / nq as f64;
        out.push(Point {
            ef,
            recall,
            scan_pct: 100.0 * scanned / index.len() as f64,
            us_per_query: best.as_secs_f64() * 1e6 / nq as f64,
        });
    }
    out
}

/// Output error of window + index top-100 at the tuned `ef` and at 2x it.
fn output_error(data: &HeadData) -> Result<Vec<Relerr>> {
    let (n, d) = (data.n, data.d);
    let middle = SINK..n - RECENT;
    let index = RetrievalIndex::build(
        &data.keys[middle.start * d..middle.end * d],
        d,
        &data.train_queries,
        &IndexConfig::default(),
    )?;
    let window: Vec<u32> = (0..SINK as u32)
        .chain(middle.end as u32..n as u32)
        .collect();
    let p = AttnParams {
        heads: 1,
        d,
        scale: data.scale,
    };
    let mut scratch = AttnScratch::new(1, d);
    let mut attend = |q: &[f32], rows: &[u32]| {
        let (mut o, mut lse) = (vec![0.0f32; d], vec![0.0f32; 1]);
        partial_attention(
            &p,
            q,
            &data.keys,
            &data.values,
            Tokens::Rows(rows),
            &mut scratch,
            &mut o,
            &mut lse,
        );
        (o, lse)
    };
    let steps: Vec<usize> = (0..RELERR_STEPS)
        .map(|i| i * data.steps() / RELERR_STEPS)
        .collect();
    let tuned = index.default_params().ef();
    let mut out = Vec::new();
    let mut search = SearchScratch::new();
    let mut hits = Hits::new();
    for ef in [tuned, 2 * tuned] {
        let sp = SearchParams::new(K, ef)?;
        let (mut ours, mut exact_top, mut win, mut recall) = (0.0, 0.0, 0.0, 0.0);
        for &s in &steps {
            let q = data.decode_query(s, 0);
            let full = Exact::new(q, &data.keys, &data.values, data.scale);
            let mid = Exact::new(
                q,
                &data.keys[middle.start * d..middle.end * d],
                &data.values[middle.start * d..middle.end * d],
                data.scale,
            );
            index.search(q, &sp, &mut search, &mut hits);
            let (ow, lw) = attend(q, &window);
            let mut err = |ids: &[u32]| {
                let rows: Vec<u32> = ids.iter().map(|&t| t + SINK as u32).collect();
                let (mut o, mut lse) = (ow.clone(), lw.clone());
                if !rows.is_empty() {
                    let (ob, lb) = attend(q, &rows);
                    merge_into(d, &mut o, &mut lse, &ob, &lb);
                }
                let o: Vec<f64> = o.iter().map(|&x| f64::from(x)).collect();
                relerr_f64(&o, &full.o)
            };
            let top = mid.top_k(K);
            ours += err(hits.ids(0));
            exact_top += err(&top);
            win += err(&[]);
            recall += recall_at_k(hits.ids(0), &top);
        }
        let m = steps.len() as f64;
        out.push(Relerr {
            ef,
            recall: recall / m,
            ours: ours / m,
            exact_top: exact_top / m,
            window: win / m,
        });
    }
    Ok(out)
}

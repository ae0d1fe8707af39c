//! GPU check: every CUDA kernel against its CPU twin on fresh random data,
//! timed on both (CPU: one thread; GPU: data resident on the device, one
//! stream, mean over back-to-back launches). Prints one markdown table and
//! exits non-zero if any check fails its tolerance.
//!
//! ```text
//! gpu_check [--ptx-dir DIR] [--ptx-only] [--quick]
//!     run the checks; kernels compiled by NVRTC if present (falling back to
//!     the PTX in DIR if that fails), or loaded from DIR (always with --ptx-only)
//! gpu_check --emit-ptx DIR
//!     write every kernel family as PTX (compute_80) into DIR (needs NVRTC)
//! ```
//!
//! Built here and run on the GPU machine by `kernels/scripts/gpu-check`.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Instant;

use half::{bf16, f16};
use strata_kernels::KvElem;
use strata_kernels::abstracts::{AbstractScratch, chunk_abstracts, chunk_count, upper_bounds};
use strata_kernels::attention::{AttnParams, AttnScratch, Tokens, merge_into, partial_attention};
use strata_kernels::gpu::{
    self, AttnWorkspace, Gpu, GpuElem, GpuTokens, PtxFrom, SOURCES, compile_ptx,
};
use strata_kernels::quant::{QuantBits, QuantScratch, dequantize, quant_params, quantize};
use strata_kernels::sketch;
use strata_kernels::sparf::{SparfScratch, sparf_scores, to_dim_major, top_channels};
use strata_kernels::topk::top_k;

type R<T> = Result<T, Box<dyn Error>>;

const HEADS: usize = 8;
const D: usize = 128;
/// Architecture of the shipped PTX: JIT-compiled by any GPU from Ampere on.
const SHIPPED_ARCH: &str = "compute_80";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f32 {
        let (u, v) = (1.0 - self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }

    fn normals(&mut self, n: usize, sigma: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * sigma).collect()
    }

    /// Keys with a per-channel bias and outlier scale, as real keys have.
    fn keys<E: KvElem>(&mut self, n: usize, d: usize) -> Vec<E> {
        let bias: Vec<f32> = (0..d).map(|_| self.normal() * 2.0).collect();
        let scale: Vec<f32> = (0..d).map(|_| self.normal().exp()).collect();
        (0..n * d)
            .map(|i| E::from_f32(bias[i % d] + scale[i % d] * self.normal()))
            .collect()
    }
}

/// One row of the table.
struct Row {
    check: String,
    dtype: &'static str,
    n: usize,
    cpu_ms: f64,
    gpu_ms: f64,
    err: f64,
    tol: f64,
    note: String,
}

impl Row {
    fn pass(&self) -> bool {
        self.err <= self.tol
    }
}

/// Mean milliseconds of `f`: one warm-up, then repeats until 150 ms or 30 runs.
fn time_cpu(mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut runs = 0;
    while runs < 30 && (runs < 3 || start.elapsed().as_secs_f64() < 0.15) {
        f();
        runs += 1;
    }
    start.elapsed().as_secs_f64() * 1e3 / runs as f64
}

/// Mean milliseconds per launch of `f`: one warm-up, then 50 back-to-back
/// launches and one synchronisation.
fn time_gpu(g: &Gpu, mut f: impl FnMut() -> R<()>) -> R<f64> {
    f()?;
    g.synchronize()?;
    let reps = 50;
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    g.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / reps as f64)
}

/// `||a - b|| / ||b||` (absolute when `b` is zero).
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// `max |a - b| / max |b|`.
fn rel_max(a: &[f32], b: &[f32]) -> f64 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let top = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    if top == 0.0 { diff } else { diff / top }
}

/// Error of an attention output: max of the relative L2 error of `o` and
/// the largest `|lse_a - lse_b| / (1 + |lse_b|)` (equal infinities are 0).
fn attn_err(o: &[f32], lse: &[f32], o_ref: &[f32], lse_ref: &[f32]) -> f64 {
    let lse_err = lse
        .iter()
        .zip(lse_ref)
        .map(|(a, b)| {
            if a == b {
                0.0
            } else {
                ((a - b).abs() / (1.0 + b.abs())) as f64
            }
        })
        .fold(0.0, f64::max);
    rel_l2(o, o_ref).max(if lse_err.is_nan() {
        f64::INFINITY
    } else {
        lse_err
    })
}

struct Ctx<'a> {
    gpu: &'a Gpu,
    ws: AttnWorkspace,
    rng: Rng,
    rows: Vec<Row>,
}

/// Which token set an attention check covers.
#[derive(Clone, Copy)]
enum Set {
    All,
    /// Random half of the tokens, with whole empty 64-token words.
    Mask,
    /// A sorted random sixteenth of the tokens.
    Rows,
}

fn check_attention<E: GpuElem>(cx: &mut Ctx<'_>, n: usize, set: Set) -> R<()> {
    let p = AttnParams {
        heads: HEADS,
        d: D,
        scale: 1.0 / (D as f32).sqrt(),
    };
    let q = cx.rng.normals(HEADS * D, 1.0);
    let k: Vec<E> = cx.rng.keys(n, D);
    let v: Vec<E> = cx
        .rng
        .normals(n * D, 1.0)
        .into_iter()
        .map(E::from_f32)
        .collect();
    let mut mask = vec![0u64; n.div_ceil(64)];
    let mut rows = Vec::new();
    for t in 0..n {
        let keep = match set {
            Set::All => true,
            Set::Mask => (t / 64) % 5 != 3 && cx.rng.next().is_multiple_of(2),
            Set::Rows => cx.rng.next().is_multiple_of(16),
        };
        if keep {
            mask[t / 64] |= 1 << (t % 64);
            rows.push(t as u32);
        }
    }
    let tokens = match set {
        Set::All => Tokens::All,
        Set::Mask => Tokens::Mask(&mask),
        Set::Rows => Tokens::Rows(&rows),
    };
    let mut scratch = AttnScratch::new(HEADS, D);
    let (mut o, mut lse) = (vec![0.0; HEADS * D], vec![0.0; HEADS]);
    let cpu_ms =
        time_cpu(|| partial_attention(&p, &q, &k, &v, tokens, &mut scratch, &mut o, &mut lse));

    let g = cx.gpu;
    let (dq, dk, dv) = (g.upload(&q)?, g.upload_kv(&k)?, g.upload_kv(&v)?);
    let (dmask, drows) = (g.upload(&mask)?, g.upload(&rows)?);
    let (mut go, mut glse) = (g.zeros::<f32>(HEADS * D)?, g.zeros::<f32>(HEADS)?);
    let gtokens = match set {
        Set::All => GpuTokens::All,
        Set::Mask => GpuTokens::Mask(&dmask),
        Set::Rows => GpuTokens::Rows(&drows),
    };
    let ws = &mut cx.ws;
    let gpu_ms = time_gpu(g, || {
        Ok(g.partial_attention::<E>(&p, &dq, &dk, &dv, gtokens, ws, &mut go, &mut glse)?)
    })?;
    let (ho, hlse) = (g.download(&go)?, g.download(&glse)?);
    let name = match set {
        Set::All => "attention (dense)",
        Set::Mask => "attention (mask, ~1/2)",
        Set::Rows => "attention (rows, 1/16)",
    };
    cx.rows.push(Row {
        check: name.into(),
        dtype: E::NAME,
        n,
        cpu_ms,
        gpu_ms,
        err: attn_err(&ho, &hlse, &o, &lse),
        tol: 1e-4,
        note: format!("{HEADS} q heads / KV head, d {D}; rel L2 of o, lse"),
    });
    Ok(())
}

/// Merge twin, and the exactness of split + merge on the device: two
/// disjoint halves attended and merged on the GPU vs the CPU's dense
/// attention over all tokens.
fn check_merge(cx: &mut Ctx<'_>, n: usize) -> R<()> {
    let p = AttnParams {
        heads: HEADS,
        d: D,
        scale: 1.0 / (D as f32).sqrt(),
    };
    let q = cx.rng.normals(HEADS * D, 1.0);
    let k: Vec<f16> = cx.rng.keys(n, D);
    let v: Vec<f16> = cx
        .rng
        .normals(n * D, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let mut a = vec![0u64; n.div_ceil(64)];
    let mut b = vec![0u64; n.div_ceil(64)];
    for t in 0..n {
        let m = if cx.rng.next().is_multiple_of(3) {
            &mut a
        } else {
            &mut b
        };
        m[t / 64] |= 1 << (t % 64);
    }
    let mut scratch = AttnScratch::new(HEADS, D);
    let (mut o_full, mut lse_full) = (vec![0.0; HEADS * D], vec![0.0; HEADS]);
    partial_attention(
        &p,
        &q,
        &k,
        &v,
        Tokens::All,
        &mut scratch,
        &mut o_full,
        &mut lse_full,
    );
    let (mut oa, mut la) = (vec![0.0; HEADS * D], vec![0.0; HEADS]);
    let (mut ob, mut lb) = (vec![0.0; HEADS * D], vec![0.0; HEADS]);
    partial_attention(
        &p,
        &q,
        &k,
        &v,
        Tokens::Mask(&a),
        &mut scratch,
        &mut oa,
        &mut la,
    );
    partial_attention(
        &p,
        &q,
        &k,
        &v,
        Tokens::Mask(&b),
        &mut scratch,
        &mut ob,
        &mut lb,
    );
    // Timed on scratch copies (the values drift; the work does not).
    let (mut to, mut tl) = (oa.clone(), la.clone());
    let cpu_ms = time_cpu(|| merge_into(D, &mut to, &mut tl, &ob, &lb));

    let g = cx.gpu;
    let (dq, dk, dv) = (g.upload(&q)?, g.upload_kv(&k)?, g.upload_kv(&v)?);
    let (da, db) = (g.upload(&a)?, g.upload(&b)?);
    let (mut goa, mut gla) = (g.zeros::<f32>(HEADS * D)?, g.zeros::<f32>(HEADS)?);
    let (mut gob, mut glb) = (g.zeros::<f32>(HEADS * D)?, g.zeros::<f32>(HEADS)?);
    g.partial_attention::<f16>(
        &p,
        &dq,
        &dk,
        &dv,
        GpuTokens::Mask(&da),
        &mut cx.ws,
        &mut goa,
        &mut gla,
    )?;
    g.partial_attention::<f16>(
        &p,
        &dq,
        &dk,
        &dv,
        GpuTokens::Mask(&db),
        &mut cx.ws,
        &mut gob,
        &mut glb,
    )?;
    let (mut to, mut tl) = (g.upload(&g.download(&goa)?)?, g.upload(&g.download(&gla)?)?);
    let gpu_ms = time_gpu(g, || Ok(g.merge_into(D, &mut to, &mut tl, &gob, &glb)?))?;
    g.merge_into(D, &mut goa, &mut gla, &gob, &glb)?;
    let (ho, hl) = (g.download(&goa)?, g.download(&gla)?);
    cx.rows.push(Row {
        check: "split 1/3 + 2/3, merge".into(),
        dtype: "f16",
        n,
        cpu_ms,
        gpu_ms,
        err: attn_err(&ho, &hl, &o_full, &lse_full),
        tol: 1e-4,
        note: "two GPU partials merged on the GPU vs CPU dense over all; ms: the merge".into(),
    });
    Ok(())
}

fn check_abstracts(cx: &mut Ctx<'_>, n: usize) -> R<()> {
    let chunk = 16;
    let k: Vec<f16> = cx.rng.keys(n, D);
    let q = cx.rng.normals(HEADS * D, 1.0);
    let chunks = chunk_count(n, chunk);
    let mut s = AbstractScratch::new(D);
    let (mut mn, mut mx, mut me) = (
        vec![f16::ZERO; chunks * D],
        vec![f16::ZERO; chunks * D],
        vec![f16::ZERO; chunks * D],
    );
    let cpu_ms = time_cpu(|| chunk_abstracts(&k, D, chunk, &mut s, &mut mn, &mut mx, &mut me));
    let mut ub = vec![0.0; HEADS * chunks];
    let cpu_ub_ms = time_cpu(|| upper_bounds(&q, HEADS, D, &mn, &mx, &mut s, &mut ub));

    let g = cx.gpu;
    let dk = g.upload_kv(&k)?;
    let (mut gmn, mut gmx, mut gme) = (
        g.zeros::<u16>(chunks * D)?,
        g.zeros::<u16>(chunks * D)?,
        g.zeros::<u16>(chunks * D)?,
    );
    let gpu_ms = time_gpu(g, || {
        Ok(g.chunk_abstracts::<f16>(&dk, D, chunk, &mut gmn, &mut gmx, &mut gme)?)
    })?;
    let widen =
        |x: Vec<u16>| -> Vec<f32> { x.into_iter().map(|b| f16::from_bits(b).to_f32()).collect() };
    let (hmn, hmx, hme) = (
        widen(g.download(&gmn)?),
        widen(g.download(&gmx)?),
        widen(g.download(&gme)?),
    );
    let cpu32 = |x: &[f16]| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
    // Min/max are exact (directed rounding of the same f32 values); only
    // the sign of a zero may differ, which compares equal here.
    let bad = hmn
        .iter()
        .zip(cpu32(&mn))
        .filter(|(a, b)| **a != *b)
        .count()
        + hmx
            .iter()
            .zip(cpu32(&mx))
            .filter(|(a, b)| **a != *b)
            .count();
    let mean_err = rel_max(&hme, &cpu32(&me));
    cx.rows.push(Row {
        check: "chunk abstracts (16)".into(),
        dtype: "f16",
        n,
        cpu_ms,
        gpu_ms,
        err: if bad > 0 { f64::INFINITY } else { mean_err },
        tol: 1e-3,
        note: format!("min/max mismatches {bad} (must be 0); max rel of mean"),
    });

    // UB from the CPU's abstracts on both sides.
    let (dq, dmn, dmx) = (
        g.upload(&q)?,
        g.upload(<f16 as GpuElem>::raw(&mn))?,
        g.upload(<f16 as GpuElem>::raw(&mx))?,
    );
    let mut gub = g.zeros::<f32>(HEADS * chunks)?;
    let gpu_ub_ms = time_gpu(g, || {
        Ok(g.upper_bounds(&dq, HEADS, D, &dmn, &dmx, &mut gub)?)
    })?;
    cx.rows.push(Row {
        check: "upper bounds (chunks of 16)".into(),
        dtype: "f16",
        n,
        cpu_ms: cpu_ub_ms,
        gpu_ms: gpu_ub_ms,
        err: rel_max(&g.download(&gub)?, &ub),
        tol: 1e-5,
        note: format!("{HEADS} heads x {chunks} chunks; max abs / max |UB|"),
    });

    // The same boxes as a sketch run (channel-major), both sides.
    let (mut rlo, mut rhi) = (vec![0u16; D * chunks], vec![0u16; D * chunks]);
    for j in 0..chunks {
        for c in 0..D {
            rlo[c * chunks + j] = mn[j * D + c].to_bits();
            rhi[c * chunks + j] = mx[j * D + c].to_bits();
        }
    }
    let run = sketch::SketchRun {
        codes: &[],
        lo: &rlo,
        hi: &rhi,
        cap: chunks,
        tpb: chunk,
    };
    let mut rs = sketch::RunBoundScratch::default();
    let mut rub = vec![0.0; HEADS * chunks];
    let cpu_run_ms =
        time_cpu(|| sketch::run_upper_bounds(&q, HEADS, D, &run, 0..chunks, &mut rs, &mut rub));
    let (dlo, dhi) = (g.upload(&rlo)?, g.upload(&rhi)?);
    let mut grub = g.zeros::<f32>(HEADS * chunks)?;
    let gpu_run_ms = time_gpu(g, || {
        Ok(g.run_upper_bounds(&dq, HEADS, D, &dlo, &dhi, chunks, 0..chunks, &mut grub)?)
    })?;
    let got = g.download(&grub)?;
    let bad = got
        .iter()
        .zip(&rub)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    cx.rows.push(Row {
        check: "run upper bounds (channel-major)".into(),
        dtype: "f16",
        n,
        cpu_ms: cpu_run_ms,
        gpu_ms: gpu_run_ms,
        err: if bad > 0 {
            f64::INFINITY
        } else {
            rel_max(&got, &rub)
        },
        tol: 1e-5,
        note: format!("{HEADS} heads x {chunks} blocks; bit mismatches {bad} (must be 0)"),
    });
    Ok(())
}

/// SparF's inputs over `n` fresh keys: queries, K token-major and
/// dim-major, the top r = d/8 channels of the queries, scratch; k = n/16.
struct SparfCase {
    q: Vec<f32>,
    k: Vec<f16>,
    kt: Vec<f16>,
    channels: Vec<u32>,
    s: SparfScratch,
    scale: f32,
    r: usize,
    kk: usize,
}

fn sparf_case(cx: &mut Ctx<'_>, n: usize) -> SparfCase {
    let (r, kk) = (D / 8, n / 16);
    let q = cx.rng.normals(HEADS * D, 1.0);
    let k: Vec<f16> = cx.rng.keys(n, D);
    let mut kt = vec![f16::ZERO; n * D];
    to_dim_major(&k, D, &mut kt);
    let mut s = SparfScratch::new(HEADS, D, n);
    let mut channels = vec![0u32; r];
    top_channels(&q, HEADS, D, &mut s, &mut channels);
    SparfCase {
        q,
        k,
        kt,
        channels,
        s,
        scale: 1.0 / (D as f32).sqrt(),
        r,
        kk,
    }
}

/// How many of `a`'s indices are also in `b`.
fn overlap(a: &[u32], b: &[u32]) -> usize {
    let mut b = b.to_vec();
    b.sort_unstable();
    a.iter().filter(|t| b.binary_search(t).is_ok()).count()
}

fn check_sparf(cx: &mut Ctx<'_>, n: usize) -> R<()> {
    let SparfCase {
        q,
        kt,
        channels,
        mut s,
        scale,
        r,
        kk,
        ..
    } = sparf_case(cx, n);
    let mut scores = vec![0.0; n];
    let cpu_ms =
        time_cpu(|| sparf_scores(&q, HEADS, D, &kt, &channels, scale, &mut s, &mut scores));

    let g = cx.gpu;
    let (dq, dkt, dch) = (g.upload(&q)?, g.upload_kv(&kt)?, g.upload(&channels)?);
    let mut gs = g.zeros::<f32>(n)?;
    let gpu_ms = time_gpu(g, || {
        Ok(g.sparf_scores::<f16>(&dq, HEADS, D, &dkt, &dch, scale, &mut gs)?)
    })?;
    let hs = g.download(&gs)?;
    // The top-k of both score vectors should choose nearly the same tokens.
    let (mut ia, mut va) = (vec![0u32; kk], vec![0.0; kk]);
    let (mut ib, mut vb) = (vec![0u32; kk], vec![0.0; kk]);
    top_k(&scores, kk, &mut ia, &mut va);
    top_k(&hs, kk, &mut ib, &mut vb);
    let same = overlap(&ia, &ib);
    cx.rows.push(Row {
        check: format!("SparF scores (r = {r})"),
        dtype: "f16",
        n,
        cpu_ms,
        gpu_ms,
        err: rel_max(&hs, &scores),
        tol: 1e-5,
        note: format!("top-{kk} overlap {same}/{kk}; max abs / max |score|"),
    });
    Ok(())
}

/// Key-sketch scores of `n / 16` blocks of 16 tokens (r = d/8), CPU block
/// by block vs one GPU launch over all of them.
fn check_sketch(cx: &mut Ctx<'_>, n: usize) -> R<()> {
    const TPB: usize = 16;
    let nb = n / TPB;
    let SparfCase {
        q,
        k,
        channels,
        scale,
        r,
        ..
    } = sparf_case(cx, n);
    // Per block: the box of its keys, its codes, and the chosen channels'
    // box (as the daemon passes them).
    let mut codes = vec![0u8; nb * D * TPB];
    let (mut clo, mut chi) = (vec![0f32; nb * r], vec![0f32; nb * r]);
    let mut row = vec![0f32; D];
    for b in 0..nb {
        let kb = &k[b * TPB * D..(b + 1) * TPB * D];
        let (mut lo, mut hi) = (vec![f32::INFINITY; D], vec![f32::NEG_INFINITY; D]);
        for t in 0..TPB {
            for i in 0..D {
                let x = kb[t * D + i].to_f32();
                lo[i] = lo[i].min(x);
                hi[i] = hi[i].max(x);
            }
        }
        sketch::encode(
            kb,
            1,
            0,
            D,
            &lo,
            &hi,
            TPB,
            &mut row,
            &mut codes[b * D * TPB..][..D * TPB],
        );
        for (j, &c) in channels.iter().enumerate() {
            clo[b * r + j] = lo[c as usize];
            chi[b * r + j] = hi[c as usize];
        }
    }
    let mut scores = vec![0.0; n];
    let mut sc = sketch::SketchScratch::new();
    let cpu_ms = time_cpu(|| {
        for b in 0..nb {
            let sk = sketch::Sketch {
                codes: &codes[b * D * TPB..(b + 1) * D * TPB],
                stride: TPB,
                n: TPB,
                lo: &clo[b * r..(b + 1) * r],
                hi: &chi[b * r..(b + 1) * r],
            };
            let out = &mut scores[b * TPB..(b + 1) * TPB];
            sketch::sketch_scores(&q, HEADS, D, &sk, &channels, scale, &mut sc, out);
        }
    });
    let g = cx.gpu;
    let (dq, dcodes, dch) = (g.upload(&q)?, g.upload(&codes)?, g.upload(&channels)?);
    let (dlo, dhi) = (g.upload(&clo)?, g.upload(&chi)?);
    let mut gs = g.zeros::<f32>(n)?;
    let mut ok = g.zeros::<u8>(nb)?;
    let gpu_ms = time_gpu(g, || {
        Ok(g.sketch_scores(
            &dq,
            HEADS,
            D,
            &dcodes,
            (nb, TPB, TPB),
            (&dlo, &dhi),
            &dch,
            scale,
            &mut gs,
            &mut ok,
        )?)
    })?;
    let hs = g.download(&gs)?;
    let refused = g.download(&ok)?.iter().filter(|&&x| x == 0).count();
    cx.rows.push(Row {
        check: format!("key-sketch scores (r = {r}, {nb} blocks)"),
        dtype: "u8",
        n,
        cpu_ms,
        gpu_ms,
        err: if refused > 0 {
            f64::INFINITY
        } else {
            rel_max(&hs, &scores)
        },
        tol: 1e-5,
        note: format!("blocks refused {refused} (must be 0); max abs / max |score|"),
    });
    Ok(())
}

/// Scores of one top-k row.
#[derive(Clone, Copy)]
enum Scores {
    /// Normal values rounded to 1/4: many ties at every rank; 1% NaN.
    Ties,
    /// Normal values (ties rare).
    Normal,
    /// 15/16 NaN, so that k = n/16 exceeds the other scores' count.
    MostlyNan,
    /// Only 0.0, -0.0, +-inf and NaN: ties between the zeros' signs.
    Specials,
}

impl Rng {
    fn scores(&mut self, n: usize, kind: Scores) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u = self.next();
                match kind {
                    Scores::Ties if u.is_multiple_of(100) => f32::NAN,
                    Scores::Ties => (self.normal() * 8.0).round() / 4.0,
                    Scores::Normal => self.normal(),
                    Scores::MostlyNan if !u.is_multiple_of(16) => f32::NAN,
                    Scores::MostlyNan => (self.normal() * 4.0).round(),
                    Scores::Specials => {
                        [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN][(u % 5) as usize]
                    }
                }
            })
            .collect()
    }
}

/// Rows of the GPU top-k that differ from the CPU's `top_k` (count, then
/// idx and val bit for bit over the count), and the CPU's time for all.
fn topk_mismatches(
    scores: &[f32],
    (rows, n, k): (usize, usize, usize),
    (gidx, gval, gcount): (&[u32], &[f32], &[u32]),
) -> (usize, f64) {
    let (mut idx, mut val) = (vec![0u32; k], vec![0f32; k]);
    let mut bad = 0;
    for r in 0..rows {
        let c = top_k(&scores[r * n..(r + 1) * n], k, &mut idx, &mut val);
        let (gi, gv) = (&gidx[r * k..][..k], &gval[r * k..][..k]);
        let same = gcount[r] as usize == c
            && gi[..c] == idx[..c]
            && gv[..c]
                .iter()
                .zip(&val[..c])
                .all(|(a, b)| a.to_bits() == b.to_bits());
        if !same {
            bad += 1;
        }
    }
    let cpu_ms = time_cpu(|| {
        for r in 0..rows {
            top_k(&scores[r * n..(r + 1) * n], k, &mut idx, &mut val);
        }
    });
    (bad, cpu_ms)
}

/// GPU top-k of `rows` rows of `n` scores against the CPU's, exactly.
fn check_topk(cx: &mut Ctx<'_>, rows: usize, n: usize, k: usize, kind: Scores) -> R<()> {
    let scores: Vec<f32> = (0..rows).flat_map(|_| cx.rng.scores(n, kind)).collect();
    let g = cx.gpu;
    let ds = g.upload(&scores)?;
    let (mut gi, mut gv) = (g.zeros::<u32>(rows * k)?, g.zeros::<f32>(rows * k)?);
    let mut gc = g.zeros::<u32>(rows)?;
    let gpu_ms = time_gpu(g, || {
        Ok(g.top_k(&ds, (rows, n), k, &mut gi, &mut gv, &mut gc)?)
    })?;
    let (hi, hv, hc) = (g.download(&gi)?, g.download(&gv)?, g.download(&gc)?);
    let (bad, cpu_ms) = topk_mismatches(&scores, (rows, n, k), (&hi, &hv, &hc));
    let what = match kind {
        Scores::Ties => "ties (values in 1/4 steps), 1% NaN",
        Scores::Normal => "normal",
        Scores::MostlyNan => "15/16 NaN, k > the rest",
        Scores::Specials => "only +-0, +-inf, NaN",
    };
    cx.rows.push(Row {
        check: format!("top-k (k = {k}, {rows} rows)"),
        dtype: "f32",
        n,
        cpu_ms,
        gpu_ms,
        err: bad as f64,
        tol: 0.0,
        note: format!("{what}; rows differing from top_k {bad} (must be 0; idx, val bits, count)"),
    });
    Ok(())
}

/// A k above the device's limit is a shape error, not a launch.
fn check_topk_limit(cx: &mut Ctx<'_>) -> R<()> {
    let g = cx.gpu;
    let (n, k) = (1024, g.top_k_max() + 1);
    let ds = g.upload(&cx.rng.scores(n, Scores::Normal))?;
    let (mut gi, mut gv, mut gc) = (g.zeros::<u32>(k)?, g.zeros::<f32>(k)?, g.zeros::<u32>(1)?);
    let got = g.top_k(&ds, (1, n), k, &mut gi, &mut gv, &mut gc);
    let refused = matches!(got, Err(gpu::GpuError::Shape(_)));
    cx.rows.push(Row {
        check: format!("top-k refuses k = {k}"),
        dtype: "f32",
        n,
        cpu_ms: 0.0,
        gpu_ms: 0.0,
        err: if refused { 0.0 } else { 1.0 },
        tol: 0.0,
        note: format!("must be a shape error: {got:?}"),
    });
    Ok(())
}

/// SparF's selection on the device: scores (r = d/8) then top-k
/// (k = n/16), timed as one; the GPU top-k must equal the CPU's `top_k`
/// of the GPU's own scores, and the note gives the overlap with the CPU
/// pipeline's choice.
fn check_sparf_topk(cx: &mut Ctx<'_>, n: usize) -> R<()> {
    let SparfCase {
        q,
        kt,
        channels,
        mut s,
        scale,
        r,
        kk,
        ..
    } = sparf_case(cx, n);
    let mut scores = vec![0.0; n];
    let (mut ci, mut cv) = (vec![0u32; kk], vec![0.0; kk]);
    let cpu_ms = time_cpu(|| {
        sparf_scores(&q, HEADS, D, &kt, &channels, scale, &mut s, &mut scores);
        top_k(&scores, kk, &mut ci, &mut cv);
    });

    let g = cx.gpu;
    let (dq, dkt, dch) = (g.upload(&q)?, g.upload_kv(&kt)?, g.upload(&channels)?);
    let mut gs = g.zeros::<f32>(n)?;
    let (mut gi, mut gv) = (g.zeros::<u32>(kk)?, g.zeros::<f32>(kk)?);
    let mut gc = g.zeros::<u32>(1)?;
    let gpu_ms = time_gpu(g, || {
        g.sparf_scores::<f16>(&dq, HEADS, D, &dkt, &dch, scale, &mut gs)?;
        Ok(g.top_k(&gs, (1, n), kk, &mut gi, &mut gv, &mut gc)?)
    })?;
    let (hs, hi) = (g.download(&gs)?, g.download(&gi)?);
    let (bad, _) = topk_mismatches(&hs, (1, n, kk), (&hi, &g.download(&gv)?, &g.download(&gc)?));
    let same = overlap(&ci, &hi);
    cx.rows.push(Row {
        check: format!("SparF scores + top-k (r = {r}, k = {kk})"),
        dtype: "f16",
        n,
        cpu_ms,
        gpu_ms,
        err: bad as f64,
        tol: 0.0,
        note: format!(
            "GPU top-k differs from top_k of the GPU scores: {bad} (must be 0); \
             overlap with the CPU pipeline {same}/{kk}"
        ),
    });
    Ok(())
}

fn check_quant(cx: &mut Ctx<'_>, n: usize, bits: QuantBits) -> R<()> {
    let x: Vec<f16> = cx.rng.keys(n, D);
    let rb = bits.row_bytes(D);
    let mut s = QuantScratch::new(D);
    let (mut lo, mut step) = (vec![0.0; D], vec![0.0; D]);
    let mut codes = vec![0u8; n * rb];
    let mut out = vec![0.0; n * D];
    let cpu_ms = time_cpu(|| {
        quant_params(&x, D, bits, &mut s, &mut lo, &mut step);
        quantize(&x, D, bits, &lo, &step, &mut s, &mut codes);
        dequantize(&codes, D, bits, &lo, &step, &mut out);
    });

    let g = cx.gpu;
    let dx = g.upload_kv(&x)?;
    let (mut glo, mut gstep) = (g.zeros::<f32>(D)?, g.zeros::<f32>(D)?);
    let mut gcodes = g.zeros::<u8>(n * rb)?;
    let mut gout = g.zeros::<f32>(n * D)?;
    let gpu_ms = time_gpu(g, || {
        g.quant_params::<f16>(&dx, D, bits, &mut glo, &mut gstep)?;
        g.quantize::<f16>(&dx, D, bits, &glo, &gstep, &mut gcodes)?;
        Ok(g.dequantize(&gcodes, D, bits, &glo, &gstep, &mut gout)?)
    })?;
    let (hlo, hstep) = (g.download(&glo)?, g.download(&gstep)?);
    let hcodes = g.download(&gcodes)?;
    let param_bad = hlo.iter().zip(&lo).filter(|(a, b)| a != b).count()
        + hstep.iter().zip(&step).filter(|(a, b)| a != b).count();
    let code_bad = hcodes.iter().zip(&codes).filter(|(a, b)| a != b).count();
    let err = rel_max(&g.download(&gout)?, &out);
    cx.rows.push(Row {
        check: format!("{bits:?} quantise + dequantise"),
        dtype: "f16",
        n,
        cpu_ms,
        gpu_ms,
        err: if param_bad + code_bad > 0 {
            f64::INFINITY
        } else {
            err
        },
        tol: 1e-6,
        note: format!("lo/step mismatches {param_bad}, code mismatches {code_bad} (must be 0)"),
    });
    Ok(())
}

fn emit_ptx(dir: &Path) -> R<()> {
    std::fs::create_dir_all(dir)?;
    for src in &SOURCES {
        let ptx = compile_ptx(src, SHIPPED_ARCH)?;
        let path = dir.join(format!("{}.ptx", src.name));
        std::fs::write(&path, ptx)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn open(ptx_dir: Option<&Path>, ptx_only: bool) -> R<(Gpu, String)> {
    if !ptx_only && gpu::nvrtc_available() {
        match Gpu::new(0, PtxFrom::Nvrtc) {
            Ok(g) => return Ok((g, "NVRTC on this machine".into())),
            Err(e) if ptx_dir.is_some() => {
                println!("NVRTC path failed ({e}); falling back to the shipped PTX");
            }
            Err(e) => return Err(e.into()),
        }
    }
    match ptx_dir {
        Some(dir) => Ok((
            Gpu::new(0, PtxFrom::Dir(dir))?,
            format!("PTX ({SHIPPED_ARCH}) from {}", dir.display()),
        )),
        None => Err(gpu::GpuError::NoNvrtc.into()),
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("gpu_check: {e}");
        std::process::exit(2);
    }
}

fn run() -> R<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| -> Option<PathBuf> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
    };
    if let Some(dir) = arg("--emit-ptx") {
        return emit_ptx(&dir);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let ptx_dir = arg("--ptx-dir");
    let started = Instant::now();
    let ptx_only = args.iter().any(|a| a == "--ptx-only");
    let (gpu, how) = open(ptx_dir.as_deref(), ptx_only)?;
    println!("device: {}; kernels: {how}", gpu.describe()?);
    #[cfg(target_arch = "x86_64")]
    println!(
        "CPU twin: one thread, AVX2+FMA+F16C {}",
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            "used"
        } else {
            "absent (portable code)"
        }
    );
    let ws = gpu.attn_workspace(HEADS, D)?;
    let mut cx = Ctx {
        gpu: &gpu,
        ws,
        rng: Rng(0x05EE_D0F5_7A7A),
        rows: Vec::new(),
    };
    let sizes: &[usize] = if quick {
        &[4096]
    } else {
        &[4096, 16384, 32768]
    };
    let mid = if quick { 4096 } else { 16384 };
    for &n in sizes {
        check_attention::<f16>(&mut cx, n, Set::All)?;
    }
    check_attention::<bf16>(&mut cx, mid, Set::All)?;
    check_attention::<f32>(&mut cx, mid, Set::All)?;
    check_attention::<f16>(&mut cx, mid, Set::Mask)?;
    check_attention::<bf16>(&mut cx, *sizes.last().unwrap_or(&4096), Set::Rows)?;
    check_merge(&mut cx, mid)?;
    for &n in sizes {
        check_abstracts(&mut cx, n)?;
    }
    for &n in sizes {
        check_sparf(&mut cx, n)?;
    }
    for &n in sizes {
        check_sketch(&mut cx, n)?;
    }
    // SparF's k = n/16 at the sizes of interest, one row per query head.
    let topk_sizes: &[usize] = if quick {
        &[4096]
    } else {
        &[4096, 16384, 32768, 131072]
    };
    for &n in topk_sizes {
        check_topk(&mut cx, HEADS, n, n / 16, Scores::Ties)?;
    }
    check_topk(&mut cx, HEADS, mid, mid / 16, Scores::Normal)?;
    // Retrieval's k (top-100 up to 1024) over many heads.
    check_topk(&mut cx, 64, mid, 1024, Scores::Normal)?;
    check_topk(&mut cx, 32, mid, 100, Scores::Ties)?;
    check_topk(&mut cx, HEADS, mid, mid / 16, Scores::MostlyNan)?;
    check_topk(&mut cx, HEADS, 1000, 700, Scores::Specials)?;
    // Edges: k = 0, k = 1, k above n, n not a multiple of the block.
    check_topk(&mut cx, 3, 5000, 0, Scores::Ties)?;
    check_topk(&mut cx, 3, 5000, 1, Scores::Ties)?;
    check_topk(&mut cx, 3, 777, gpu.top_k_max(), Scores::Ties)?;
    check_topk_limit(&mut cx)?;
    check_sparf_topk(&mut cx, *sizes.last().unwrap_or(&4096))?;
    check_quant(&mut cx, *sizes.last().unwrap_or(&4096), QuantBits::Int8)?;
    check_quant(&mut cx, *sizes.last().unwrap_or(&4096), QuantBits::Int4)?;

    println!();
    println!(
        "| check | dtype | N | CPU ms (1 thread) | GPU ms | speedup | max err | tolerance | result | note |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---|---|");
    let mut failed = 0;
    for r in &cx.rows {
        if !r.pass() {
            failed += 1;
        }
        println!(
            "| {} | {} | {} | {:.3} | {:.4} | {:.0}x | {:.2e} | {:.0e} | {} | {} |",
            r.check,
            r.dtype,
            r.n,
            r.cpu_ms,
            r.gpu_ms,
            r.cpu_ms / r.gpu_ms,
            r.err,
            r.tol,
            if r.pass() { "pass" } else { "FAIL" },
            r.note
        );
    }
    println!();
    println!(
        "gpu_check: {} passed, {failed} failed ({:.1} s)",
        cx.rows.len() - failed,
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

//! `attend`: the Attend RPC (attention near the data, COMPUTE.md §3–§4)
//! against a real release `stratad`.
//!
//! * Quality: one synthetic KV head (`strata-testdata`, semantic and needle
//!   regimes, d = 128, a GQA group of 4 query heads) stored as f16 blocks of
//!   16 tokens (one layer, one KV head); for a few decode queries, Attend in
//!   DENSE, SPARSE (5% default budget) and SPARF (defaults). The daemon's
//!   partial over the tokens it chose is taken as the estimate of full
//!   attention: mass and relerr against f64 exact attention over the stored
//!   (f16-rounded) K and V, read% from the answer's read counters, and the
//!   oracle at the same token budget beside them. Two more daemons keep
//!   8-token leaves (`compute.leaf_tokens = 8`): SPARSE ranking leaves at
//!   budgets from 5% down to 3%, and at the adaptive level, so that the
//!   budget at which leaves reach the 16-token row's mass (and its bytes)
//!   can be read off.
//! * Dense scan: K+V bytes of a dense Attend over DRAM-resident blocks ÷ the
//!   call's wall time, ÷ single-thread memory-read bandwidth of the same run.
//! * Wire bytes: the encoded Attend request + response vs the head's fp16
//!   K+V.

use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use half::f16;
use prost::Message;
use strata_client::attend::{
    AttendMode, AttendOutput, AttendRequest, AttendSequence, Chain, IoDtype, Precision,
    SparseBudget,
};
use strata_client::{Client, PutBlock};
use strata_kernels::quant::{QuantBits, QuantScratch, dequantize, quant_params, quantize};
use strata_proto::{BlockKey, Dtype, KvKind, Layout, NamespaceId, TierKind, pb};
use strata_testdata::metrics::{Exact, full_kv_fp16_bytes, read_pct, relerr};
use strata_testdata::{Config, Generator, HeadData, Regime};

use crate::{Daemon, Report, f2, filled};

const D: usize = 128;
const TOKENS_PER_BLOCK: usize = 16;
const QUERY_HEADS: usize = 4;
/// Decode steps attended per (regime, N), spread over the generator's 256.
const STEPS: usize = 8;

fn layout() -> Layout {
    Layout {
        model_id: "bench/attend".into(),
        dtype: Dtype::F16,
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: D as u32,
        tokens_per_block: TOKENS_PER_BLOCK as u32,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

fn attend_key(tag: u32, n: u32, i: u32) -> BlockKey {
    let mut k = [0u8; 16];
    k[0] = 0xa7;
    k[4..8].copy_from_slice(&tag.to_be_bytes());
    k[8..12].copy_from_slice(&n.to_be_bytes());
    k[12..16].copy_from_slice(&i.to_be_bytes());
    BlockKey::new(&k).expect("16-byte key")
}

/// Rounds to f16 and back: what the daemon holds.
fn round_f16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
}

/// Stores `k`, `v` (`[n][D]`, f16-exact) as one chain of blocks (each block
/// K `[16][D]` then V `[16][D]`, f16) and returns its keys.
/// `x` (`[n][D]`) as an int8 (int4) payload gives it back, as the
/// daemon's quant copies hold it (attend/quant.rs): each block's
/// `[TOKENS_PER_BLOCK][D]` tile quantised per channel
/// (`strata_kernels::quant`, from the f16 values a block holds) against
/// its `lo` and `step` rounded to f16, and dequantised.
fn quant_round_trip(x: &[f32], bits: QuantBits) -> Vec<f32> {
    let row = TOKENS_PER_BLOCK * D;
    let mut s = QuantScratch::new(D);
    let (mut lo, mut step) = (vec![0f32; D], vec![0f32; D]);
    let mut codes = vec![0u8; TOKENS_PER_BLOCK * bits.row_bytes(D)];
    let mut out = vec![0f32; x.len()];
    for (t, o) in x.chunks(row).zip(out.chunks_mut(row)) {
        let t: Vec<f16> = t.iter().map(|&v| f16::from_f32(v)).collect();
        quant_params(&t, D, bits, &mut s, &mut lo, &mut step);
        for p in lo.iter_mut().chain(step.iter_mut()) {
            *p = f16::from_f32(*p).to_f32();
        }
        let c = &mut codes[..t.len() / D * bits.row_bytes(D)];
        quantize(&t, D, bits, &lo, &step, &mut s, c);
        dequantize(c, D, bits, &lo, &step, o);
    }
    out
}

async fn store_head(
    c: &mut Client,
    ns: NamespaceId,
    tag: u32,
    k: &[f32],
    v: &[f32],
) -> Result<Vec<BlockKey>> {
    let n = k.len() / D;
    let blocks = n / TOKENS_PER_BLOCK;
    let keys: Vec<BlockKey> = (0..blocks as u32)
        .map(|i| attend_key(tag, n as u32, i))
        .collect();
    let row = TOKENS_PER_BLOCK * D;
    let mut puts = Vec::with_capacity(256);
    for (b, key) in keys.iter().enumerate() {
        let mut data = Vec::with_capacity(2 * row * 2);
        for x in k[b * row..(b + 1) * row]
            .iter()
            .chain(&v[b * row..(b + 1) * row])
        {
            data.extend_from_slice(&f16::from_f32(*x).to_le_bytes());
        }
        puts.push(PutBlock {
            key: *key,
            parent: (b > 0).then(|| keys[b - 1]),
            data: Bytes::from(data),
        });
        if puts.len() == 256 || b + 1 == blocks {
            c.put(ns, &puts).await?;
            puts.clear();
        }
    }
    Ok(keys)
}

fn request(ns: NamespaceId, mode: AttendMode, keys: &[BlockKey], q: &[f32]) -> AttendRequest {
    AttendRequest {
        io_dtype: IoDtype::F32,
        min_precision: Precision::Stored,
        namespace: ns,
        layer: 0,
        mode,
        scale: None,
        sequences: vec![AttendSequence {
            chain: Chain::Keys(keys.to_vec()),
            last_block_tokens: None,
            queries: q.to_vec(),
        }],
    }
}

async fn attend_one(c: &mut Client, req: &AttendRequest) -> Result<AttendOutput> {
    let mut out = c.attend(req).await?;
    match out.pop() {
        Some(o) if out.is_empty() => Ok(o),
        _ => bail!("Attend answered no result or several for one sequence"),
    }
}

fn tokens_of(r: &[Range<u64>]) -> Vec<u32> {
    r.iter()
        .flat_map(|r| r.start as u32..r.end as u32)
        .collect()
}

fn read_bytes(o: &AttendOutput) -> u64 {
    o.reads.iter().map(|r| r.bytes).sum()
}

/// The encoded size of the Attend request and response as on the wire
/// (protobuf, plus the 5-byte gRPC message prefix each; HTTP/2 frame and
/// header bytes not counted).
fn wire_bytes(req: &AttendRequest, out: &AttendOutput) -> (usize, usize) {
    let pbreq = strata_client::attend::request_pb(req);
    let ranges = |r: &[Range<u64>]| -> Vec<pb::TokenRange> {
        r.iter()
            .map(|r| pb::TokenRange {
                start: r.start,
                end: r.end,
            })
            .collect()
    };
    let tier = |t: Option<TierKind>| -> i32 {
        match t {
            Some(TierKind::Gpu) => pb::Tier::Gpu as i32,
            Some(TierKind::Dram) => pb::Tier::Dram as i32,
            Some(TierKind::Cxl) => pb::Tier::Cxl as i32,
            Some(TierKind::Nvme) => pb::Tier::Nvme as i32,
            Some(TierKind::Remote) => pb::Tier::Remote as i32,
            None => 0,
        }
    };
    let pbresp = pb::AttendResponse {
        results: vec![pb::AttendResult {
            o: if req.io_dtype == IoDtype::F32 {
                out.o.clone()
            } else {
                Vec::new()
            },
            o_packed: req.io_dtype.pack(&out.o),
            lse: out.lse.clone(),
            keys_present: out.keys_present,
            tokens_present: out.tokens_present,
            covered: ranges(&out.covered),
            head_covered: out
                .head_covered
                .iter()
                .enumerate()
                .map(|(h, r)| pb::HeadCoverage {
                    kv_head: h as u32,
                    ranges: ranges(r),
                })
                .collect(),
            reads: out
                .reads
                .iter()
                .map(|r| pb::TierReads {
                    tier: tier(r.tier),
                    blocks: r.blocks,
                    bytes: r.bytes,
                })
                .collect(),
            exact: out.exact,
            sink_included: out.sink_included,
            recent_included: out.recent_included,
            tokens_attended: out.tokens_attended,
            abstract_bytes: out.abstract_bytes,
            retrieval_source: Vec::new(),
            retrieval_scanned: Vec::new(),
            mean_corrected: out.mean_corrected,
            quantized_blocks: out.quantized_blocks,
            quantized_bytes: out.quantized_bytes,
        }],
    };
    (pbreq.encoded_len() + 5, pbresp.encoded_len() + 5)
}

fn generate(regime: Regime, n: usize) -> Result<HeadData> {
    let mut cfg = Config::new(regime, n, 1);
    cfg.query_heads = QUERY_HEADS;
    // Only the decode queries are used.
    cfg.train_queries = 0;
    let mut h = Generator::new(cfg)
        .map_err(|e| anyhow::anyhow!("generator: {e}"))?
        .generate()
        .data;
    h.keys = round_f16(&h.keys);
    h.values = round_f16(&h.values);
    Ok(h)
}

#[derive(Default)]
struct Acc {
    n: usize,
    mass: f64,
    relerr: f64,
    oracle_mass: f64,
    oracle_relerr: f64,
    tokens_pct: f64,
    read_pct: f64,
    summary_pct: f64,
}

impl Acc {
    /// One call's answer `out` over the tokens `sel`, for every query head
    /// (`exact[g]`: head g's exact attention over `n` tokens of values `v`).
    fn add(&mut self, exact: &[Exact], out: &AttendOutput, sel: &[u32], v: &[f32], n: usize) {
        for (g, ex) in exact.iter().enumerate() {
            let o = &out.o[g * D..(g + 1) * D];
            let or = ex.oracle(sel.len(), v);
            self.n += 1;
            self.mass += ex.mass(sel);
            self.relerr += relerr(o, &ex.o);
            self.oracle_mass += or.mass;
            self.oracle_relerr += or.relerr;
            self.tokens_pct += 100.0 * sel.len() as f64 / n as f64;
            self.read_pct += read_pct(read_bytes(out), n, D, 2);
            self.summary_pct += read_pct(out.abstract_bytes, n, D, 2);
        }
    }

    fn row(&self, regime: &str, n: usize, mode: &str) -> Vec<String> {
        let m = |x: f64| x / self.n as f64;
        vec![
            regime.into(),
            format!("{}K", n >> 10),
            mode.into(),
            format!("{:.1}", m(self.tokens_pct)),
            format!("{:.3}", m(self.mass)),
            format!("{:.3}", m(self.oracle_mass)),
            format!("{:.2e}", m(self.relerr)),
            format!("{:.2e}", m(self.oracle_relerr)),
            format!("{:.1}", m(self.read_pct)),
            format!("{:.2}", m(self.summary_pct)),
        ]
    }
}

/// Best single-thread read bandwidth (GB/s) over a pre-faulted buffer.
fn memread_rate(buf: &[u8], reps: usize) -> f64 {
    let mut best = 0.0f64;
    for _ in 0..reps {
        let t = Instant::now();
        let mut acc = [0u64; 8];
        for c in buf.chunks_exact(64) {
            for (a, w) in acc.iter_mut().zip(c.chunks_exact(8)) {
                *a = a.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
            }
        }
        std::hint::black_box(acc);
        best = best.max(crate::gbps(buf.len() as u64, t.elapsed()));
    }
    best
}

pub async fn attend(rep: &mut Report, quick: bool) -> Result<()> {
    // Key sketches on, so that SPARF scores from them (DENSE and SPARSE
    // do not use them).
    // The dense scan's batch names 8 chains of 2,048 blocks by their tails.
    let d = Daemon::start_with(
        "1GiB",
        "[server]\nmax_keys_per_call = 16384\n[compute]\nkey_sketch = true\n",
    )?;
    let mut c = Client::connect(&d.endpoint()).await?;
    let ns = c.register_layout(&layout()).await?.namespace;
    // The same with SPARF's one-stage ranking on r channels (the choice
    // before the two-stage default), for the row beside it.
    let d1 = Daemon::start_with(
        "1GiB",
        "[compute]\nkey_sketch = true\nsparf_candidates = 0\n",
    )?;
    let mut c1 = Client::connect(&d1.endpoint()).await?;
    let ns1 = c1.register_layout(&layout()).await?.namespace;
    let one_stage = AttendMode::Sparf {
        channels: None,
        tokens: None,
        by_token: false,
        mean_correction: false,
        joint_heads: false,
    };
    // Summaries with 8-token leaves (two per block): one daemon always
    // ranking leaves, one choosing the level per (namespace, layer) from
    // the skew it measured. Each regime is its own namespace there (a
    // layer's skew is learned per namespace and layer).
    let leaf_cfg = |level: &str| format!("[compute]\nleaf_tokens = 8\nleaf_level = \"{level}\"\n");
    let leaf_daemons = [
        Daemon::start_with("1GiB", &leaf_cfg("leaf"))?,
        Daemon::start_with("1GiB", &leaf_cfg("adaptive"))?,
    ];
    let mut leaf_clients = Vec::new();
    for ld in &leaf_daemons {
        leaf_clients.push(Client::connect(&ld.endpoint()).await?);
    }
    // Budgets (% of N) of the leaf rows: the 16-token row's 5%, and less,
    // to read off the budget at which leaves match its mass.
    const LEAF_BUDGETS: [f64; 5] = [5.0, 4.5, 4.0, 3.5, 3.0];
    const ADAPTIVE_BUDGETS: [f64; 4] = [5.0, 4.5, 4.0, 3.5];
    let mut half_block_calls = [0usize; 2];
    let mut leaf_calls = [0usize; 2];
    let sizes: &[usize] = if quick {
        &[4 << 10]
    } else {
        &[4 << 10, 16 << 10, 32 << 10]
    };
    rep.section(
        "Attend quality: the daemon's partial as full attention, vs exact f64 and the oracle at the same budget",
        &[
            "regime",
            "N",
            "mode",
            "tokens %",
            "mass",
            "oracle mass",
            "relerr",
            "oracle relerr",
            "read %",
            "summary read %",
        ],
    );
    let mut wire = vec![];
    for (ri, regime) in [Regime::Semantic, Regime::Needle].into_iter().enumerate() {
        for &n in sizes {
            let h = generate(regime, n)?;
            let keys = store_head(&mut c, ns, ri as u32, &h.keys, &h.values).await?;
            // The same head with its payload through int8 and int4 (per
            // block and tensor, per channel: what the daemon's quant copies
            // give the math), each in a namespace of its own; exact stays
            // the f16 data.
            let mut quant_keys = Vec::new();
            for (tag, bits) in [("int8", QuantBits::Int8), ("int4", QuantBits::Int4)] {
                let (kq, vq) = (
                    quant_round_trip(&h.keys, bits),
                    quant_round_trip(&h.values, bits),
                );
                let mut lq = layout();
                lq.model_id = format!("bench/attend-{tag}/{}/{n}", regime.name());
                let nsq = c.register_layout(&lq).await?.namespace;
                let seq = 100 + 10 * quant_keys.len() as u32 + ri as u32;
                quant_keys.push((nsq, store_head(&mut c, nsq, seq, &kq, &vq).await?));
            }
            store_head(&mut c1, ns1, ri as u32, &h.keys, &h.values).await?;
            let mut one_acc = Acc::default();
            let full = full_kv_fp16_bytes(n, D);
            let modes = [
                ("dense", AttendMode::Dense),
                ("sparse 5%", AttendMode::Sparse(SparseBudget::Default)),
                (
                    "sparf r=d/8 k=N/16, blocks",
                    AttendMode::Sparf {
                        channels: None,
                        tokens: None,
                        by_token: false,
                        mean_correction: false,
                        joint_heads: false,
                    },
                ),
                (
                    "sparf r=d/8 k=N/16, blocks + mean correction",
                    AttendMode::Sparf {
                        channels: None,
                        tokens: None,
                        by_token: false,
                        mean_correction: true,
                        joint_heads: false,
                    },
                ),
                (
                    "sparf r=d/8 k=N/16, tokens",
                    AttendMode::Sparf {
                        channels: None,
                        tokens: None,
                        by_token: true,
                        mean_correction: false,
                        joint_heads: false,
                    },
                ),
            ];
            let mut accs: Vec<Acc> = modes.iter().map(|_| Acc::default()).collect();
            let int8_modes = [
                ("dense, int8 payload", AttendMode::Dense, 0),
                (
                    "sparse 5%, int8 payload",
                    AttendMode::Sparse(SparseBudget::Default),
                    0,
                ),
                ("dense, int4 payload", AttendMode::Dense, 1),
                (
                    "sparse 5%, int4 payload",
                    AttendMode::Sparse(SparseBudget::Default),
                    1,
                ),
            ];
            let mut int8_accs: Vec<Acc> = int8_modes.iter().map(|_| Acc::default()).collect();
            // The leaf rows: (name, daemon, budget in tokens).
            let mut leaf_rows: Vec<(String, usize, u32)> = Vec::new();
            for (di, budgets, what) in [
                (0usize, &LEAF_BUDGETS[..], "8-token leaves"),
                (1, &ADAPTIVE_BUDGETS[..], "adaptive"),
            ] {
                for &b in budgets {
                    let t = (n as f64 * b / 100.0).ceil() as u32;
                    leaf_rows.push((format!("sparse {b}%, {what}"), di, t));
                }
            }
            let mut leaf_ns = Vec::new();
            for lc in &mut leaf_clients {
                let mut l = layout();
                l.model_id = format!("bench/attend/{}", regime.name());
                let lns = lc.register_layout(&l).await?.namespace;
                store_head(lc, lns, ri as u32, &h.keys, &h.values).await?;
                leaf_ns.push(lns);
            }
            let mut leaf_accs: Vec<Acc> = leaf_rows.iter().map(|_| Acc::default()).collect();
            for s in 0..STEPS {
                let step = s * h.steps() / STEPS;
                let q = h.decode_group(step);
                let exact: Vec<Exact> = (0..h.heads)
                    .map(|g| Exact::new(h.decode_query(step, g), &h.keys, &h.values, h.scale))
                    .collect();
                for ((name, mode), acc) in modes.iter().zip(&mut accs) {
                    let req = request(ns, *mode, &keys, q);
                    let out = attend_one(&mut c, &req).await?;
                    if out.tokens_present != n as u64 {
                        bail!("Attend covered {} of {n} stored tokens", out.tokens_present);
                    }
                    let asked = matches!(
                        mode,
                        AttendMode::Sparf {
                            mean_correction: true,
                            ..
                        }
                    );
                    if out.mean_corrected != asked {
                        bail!("{name}: mean_corrected is {}", out.mean_corrected);
                    }
                    let sel = match out.head_covered.first() {
                        Some(r) if matches!(mode, AttendMode::Sparf { .. }) => tokens_of(r),
                        _ => tokens_of(&out.covered),
                    };
                    acc.add(&exact, &out, &sel, &h.values, n);
                    if s == 0
                        && ri == 0
                        && !name.starts_with("sparse")
                        && !name.ends_with("tokens")
                        && !name.ends_with("correction")
                    {
                        let (a, b) = wire_bytes(&req, &out);
                        wire.push((n, name.to_string(), a, b, full));
                        // The compact form of the same call, asked for real:
                        // the chain by its tail, queries and o as f16.
                        let mut small = req.clone();
                        small.io_dtype = IoDtype::F16;
                        small.sequences[0].chain = Chain::Tail {
                            tail: *keys.last().expect("a chain"),
                            blocks: keys.len() as u32,
                        };
                        let out = attend_one(&mut c, &small).await?;
                        if out.tokens_present != n as u64 {
                            bail!(
                                "{name} by tail covered {} of {n} tokens",
                                out.tokens_present
                            );
                        }
                        let (a, b) = wire_bytes(&small, &out);
                        wire.push((n, format!("{name}, tail + f16"), a, b, full));
                    }
                }
                for ((_, mode, qi), acc) in int8_modes.iter().zip(&mut int8_accs) {
                    let (nsq, keysq) = &quant_keys[*qi];
                    let out = attend_one(&mut c, &request(*nsq, *mode, keysq, q)).await?;
                    if out.tokens_present != n as u64 {
                        bail!("Attend covered {} of {n} stored tokens", out.tokens_present);
                    }
                    acc.add(&exact, &out, &tokens_of(&out.covered), &h.values, n);
                }
                let out = attend_one(&mut c1, &request(ns1, one_stage, &keys, q)).await?;
                let sel = out.head_covered.first().map_or(vec![], |r| tokens_of(r));
                one_acc.add(&exact, &out, &sel, &h.values, n);
                for ((_, di, t), acc) in leaf_rows.iter().zip(&mut leaf_accs) {
                    let mode = AttendMode::Sparse(SparseBudget::Tokens(*t));
                    let req = request(leaf_ns[*di], mode, &keys, q);
                    let out = attend_one(&mut leaf_clients[*di], &req).await?;
                    if out.tokens_present != n as u64 {
                        bail!("Attend covered {} of {n} stored tokens", out.tokens_present);
                    }
                    // A piece that is not a whole block: ranked at leaves.
                    leaf_calls[*di] += 1;
                    if out.covered.iter().any(|r| {
                        r.start % TOKENS_PER_BLOCK as u64 != 0
                            || r.end % TOKENS_PER_BLOCK as u64 != 0
                    }) {
                        half_block_calls[*di] += 1;
                    }
                    let sel = tokens_of(&out.covered);
                    acc.add(&exact, &out, &sel, &h.values, n);
                }
            }
            for ((name, _), acc) in modes.iter().zip(&accs) {
                rep.row(&acc.row(regime.name(), n, name));
            }
            for ((name, ..), acc) in int8_modes.iter().zip(&int8_accs) {
                rep.row(&acc.row(regime.name(), n, name));
            }
            rep.row(&one_acc.row(
                regime.name(),
                n,
                "sparf r=d/8 k=N/16, blocks, one stage (sparf_candidates = 0)",
            ));
            for ((name, ..), acc) in leaf_rows.iter().zip(&leaf_accs) {
                rep.row(&acc.row(regime.name(), n, name));
            }
        }
    }
    rep.note(&format!(
        "One KV head, d = {D}, a GQA group of {QUERY_HEADS} query heads, f16 blocks of {TOKENS_PER_BLOCK} tokens (one layer), all in DRAM; {STEPS} decode steps spread over the generator's 256 (seed 1), means over steps and query heads. The daemon's (o, lse) over the tokens it chose is the estimate of full attention; exact = f64 over the stored (f16-rounded) K, V. tokens % = tokens attended ÷ N (SPARSE: the union over heads, sink and recent blocks included; SPARF: the KV head's set); the oracle is the exact top tokens at the same count. read % = bytes of the answer's tier read counters ÷ the head's fp16 K+V; summary read % = the abstracts (SPARSE) or key-sketch rows (SPARF) read from DRAM, same denominator. SPARF (compute.key_sketch on), blocks: two-stage ranking (compute.sparf_candidates = 3, the default): every block's upper bound from all d channels of its min/max box (max over the group), the best 3 × k/16 blocks rescored on all d channels of their key sketch, whole blocks best-first by the log-sum-exp of those scores until k tokens are in, then K and V of the chosen blocks read and attended exactly; summary read % = both bounds of every block and the candidates' code rows. one stage (a second daemon with sparf_candidates = 0): every token scored from the r = d/8 sketch rows, whole blocks best-first by the log-sum-exp of those scores. tokens: every block holding one of the top-k tokens by the r-channel scores. + mean correction: the blocks row's choice, with SparQ's reallocation o = alpha o_chosen + (1 - alpha) mean(V) per query head (alpha: the chosen set's softmax mass estimated from the head's r-channel scores at SparQ's temperature; mean(V) from the V sums kept with the sketches): its mass is that of the blocks row (the same tokens), its relerr is the corrected output's, and it is not a mergeable partial (the answer says so); summary read % adds the r-channel sketch rows and the V sums read. sparse b%, 8-token leaves: a daemon with compute.leaf_tokens = 8 (two leaves per block, each with its own min/max box and K/V checksums: abstracts 12.5% of the KV) ranking leaves (compute.leaf_level = \"leaf\") at a budget of b% of N: it reads and verifies only the chosen leaves' K and V rows (sink and recent blocks whole). sparse b%, adaptive: the same summaries, the level chosen per (namespace, layer) from the top-2% mass share of the tokens it attended (leaves at a running mean >= 0.3, blocks again at <= 0.2); calls that ranked leaves (a piece of half a block in the answer): {} of {}. int8 (int4) payload: the same head stored in its own namespace after its K and V went through int8 (int4) and back (per block and tensor, per-channel asymmetric, strata_kernels::quant, lo and step rounded to f16: the values the daemon's quant copies give the math under min_precision INT8 (INT4), and the abstracts computed from them); mass and relerr still against the f16 data (COMPUTE.md §3: int8 payload costs ≤ 0.005 mass).",
        half_block_calls[1], leaf_calls[1]
    ));

    dense_scan(rep, &mut c, ns, quick, 30).await?;

    rep.section(
        "Attend wire bytes vs shipping the head's K+V (one KV head, 4 query heads, one decode step)",
        &[
            "N",
            "mode",
            "request bytes",
            "response bytes",
            "fp16 K+V bytes",
            "K+V ÷ (request + response)",
        ],
    );
    for (n, name, a, b, full) in wire {
        rep.row(&[
            format!("{}K", n >> 10),
            name,
            a.to_string(),
            b.to_string(),
            full.to_string(),
            format!("{:.0}", full as f64 / (a + b) as f64),
        ]);
    }
    rep.note(
        "Protobuf encoded length (prost) plus the 5-byte gRPC message prefix each way; HTTP/2 headers and frames not counted. Per KV head, here. By keys: the request is mostly the block keys (18 bytes each); one call per layer covers all its KV heads with the same keys, so with many heads that ratio tends to K+V ÷ (f32 queries + outputs) = N ÷ (2 × group): 512× at 4K, 4,096× at 32K with a group of 4. Tail + f16: the same call made again with the chain named by its last key and length (chain_tail, chain_blocks; the daemon follows the parent links) and io_dtype F16 (queries and o as 2-byte values, lse f32): what is left is the queries and the answer, 2 bytes a value, so the ratio tends to N ÷ group with many heads. COMPUTE.md §4: ≥ 500× at 4K, ≥ 5,000× at 32K.",
    );
    Ok(())
}

/// `--only attend-scan`: the dense scan alone, on its own daemon, with
/// enough calls to profile (`perf record -p` the daemon meanwhile).
pub async fn scan_only(rep: &mut Report, quick: bool) -> Result<()> {
    let d = Daemon::start_with("1GiB", "[server]\nmax_keys_per_call = 16384\n")?;
    let mut c = Client::connect(&d.endpoint()).await?;
    let ns = c.register_layout(&layout()).await?.namespace;
    dense_scan(rep, &mut c, ns, quick, 300).await
}

/// Dense scan rate at 32K, DRAM-resident: `calls` timed dense Attend calls
/// over one KV head against one thread's memory-read rate.
async fn dense_scan(
    rep: &mut Report,
    c: &mut Client,
    ns: NamespaceId,
    quick: bool,
    calls: usize,
) -> Result<()> {
    let n = 32usize << 10;
    let mut x = 0x2545f4914f6cdd1du64;
    let mut rnd = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                f16::from_f32((x >> 40) as f32 / (1u64 << 23) as f32 - 1.0).to_f32()
            })
            .collect()
    };
    let (k, v, q) = (rnd(n * D), rnd(n * D), rnd(QUERY_HEADS * D));
    let keys = store_head(c, ns, 99, &k, &v).await?;
    let by_keys = request(ns, AttendMode::Dense, &keys, &q);
    // The compact form: the chain by its tail, queries and o as f16.
    let mut by_tail = by_keys.clone();
    by_tail.io_dtype = IoDtype::F16;
    by_tail.sequences[0].chain = Chain::Tail {
        tail: *keys.last().expect("a chain"),
        blocks: keys.len() as u32,
    };
    // A batch of 8 such chains in one call (tail, f16): the rate once the
    // call's fixed costs (RPC, check, pinning, hand-offs) are shared.
    const BATCH: usize = 8;
    let mut batch = by_tail.clone();
    for t in 1..BATCH as u32 {
        let keys = store_head(c, ns, 99 + t, &k, &v).await?;
        let mut s = batch.sequences[0].clone();
        s.chain = Chain::Tail {
            tail: *keys.last().expect("a chain"),
            blocks: keys.len() as u32,
        };
        batch.sequences.push(s);
    }
    let bytes = full_kv_fp16_bytes(n, D);
    let mut rows = Vec::new();
    let forms = [
        ("keys, f32", &by_keys, 1),
        ("tail, f16", &by_tail, 1),
        ("tail, f16, batch of 8", &batch, BATCH),
    ];
    for (form, req, seqs) in forms {
        for _ in 0..3 {
            let out = c.attend(req).await?;
            if out.len() != seqs {
                bail!("Attend answered {} sequences of {seqs}", out.len());
            }
        }
        // Fewer calls of the batch: each is 8 of the others.
        let calls = if seqs > 1 { calls.div_ceil(4) } else { calls };
        let mut lat: Vec<Duration> = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            let outs = c.attend(req).await?;
            lat.push(t.elapsed());
            if outs.len() != seqs
                || outs
                    .iter()
                    .any(|out| !out.exact || out.tokens_attended != n as u64)
            {
                bail!("dense Attend did not cover the {n} tokens of each sequence");
            }
        }
        lat.sort();
        rows.push((form, seqs as u64 * bytes, lat));
    }
    let buf = filled(if quick { 256 << 20 } else { 1 << 30 }, 11);
    let mem = memread_rate(&buf, 3);
    drop(buf);
    rep.section(
        "Attend dense scan vs single-thread memory read (32K tokens, DRAM)",
        &[
            "form",
            "K+V per call",
            "call p50 µs",
            "scan GB/s p50",
            "scan GB/s best",
            "1-thread read GB/s",
            "p50 ÷ read",
            "best ÷ read",
        ],
    );
    for (form, bytes, lat) in rows {
        let med = crate::gbps(bytes, lat[lat.len() / 2]);
        let best = crate::gbps(bytes, lat[0]);
        rep.row(&[
            form.into(),
            format!("{} MiB", bytes >> 20),
            format!("{:.0}", lat[lat.len() / 2].as_secs_f64() * 1e6),
            f2(med),
            f2(best),
            f2(mem),
            f2(med / mem),
            f2(best / mem),
        ]);
    }
    rep.note(&format!(
        "{calls} dense Attend calls of {QUERY_HEADS} query heads over one KV head per form ({} of the batch), timed around the RPC on TCP loopback (nothing subtracted: RPC, pinning, verification of K and V against the summary checksums and the math); the chain by its 2,048 keys with f32 queries and outputs, or by its tail (chain_tail, chain_blocks) with f16 ones (io_dtype); the batch: {BATCH} such chains (different keys, the same K and V) in one call, tail + f16, so that the call's fixed costs are shared. Reference: sum of u64 over a pre-faulted {} MiB buffer by one thread, best of 3.",
        calls.div_ceil(4),
        if quick { 256 } else { 1024 }
    ));

    Ok(())
}

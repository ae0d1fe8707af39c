//! Boundary 2 for Attend: the gRPC service in process, through the Rust
//! client, against an f64 reference computed here on the same (f16-rounded)
//! data. Seeded data; no test depends on timing.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use half::f16;
use strata_client::attend::{
    AttendMode, AttendOutput, AttendRequest, AttendSequence, Chain, IoDtype, Precision,
    SparseBudget,
};
use strata_client::{Client, PutBlock};
use strata_proto::{BlockKey, Dtype, KvKind, Layout, NamespaceId, TierKind, pb};
use stratad::config::ByteSize;
use tonic::Code;

const LAYERS: usize = 2;
const KV: usize = 2;
const D: usize = 64;
const TPB: usize = 16;
/// Query heads: two per KV head (GQA).
const HEADS: usize = 4;
/// Bytes of one layer's K and V of a full block.
const LAYER_BYTES: u64 = (2 * TPB * KV * D * 2) as u64;

fn layout() -> Layout {
    Layout {
        model_id: "attend/test".into(),
        dtype: Dtype::F16,
        num_layers: LAYERS as u32,
        num_kv_heads: KV as u32,
        head_dim: D as u32,
        tokens_per_block: TPB as u32,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

/// Seeded normals (xorshift + Box-Muller).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (a, b) = (self.unit().max(1e-300), self.unit());
        ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
    }
}

fn round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// K and V of a sequence as stored (f16-rounded), `[layer][token][head][d]`.
struct Kv {
    n: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Kv {
    fn at(n: usize, layer: usize, t: usize, h: usize) -> usize {
        ((layer * n + t) * KV + h) * D
    }

    fn random(n: usize, seed: u64) -> Kv {
        let mut rng = Rng::new(seed);
        let len = LAYERS * n * KV * D;
        let k = (0..len).map(|_| round(rng.normal() * 0.5)).collect();
        let v = (0..len).map(|_| round(rng.normal())).collect();
        Kv { n, k, v }
    }

    /// Makes the key of (layer, token, head) `alpha` times `q`'s direction.
    fn plant(&mut self, layer: usize, t: usize, h: usize, q: &[f32], alpha: f32) {
        let norm = q.iter().map(|x| x * x).sum::<f32>().sqrt();
        let at = Kv::at(self.n, layer, t, h);
        for (x, qi) in self.k[at..at + D].iter_mut().zip(q) {
            *x = round(alpha * qi / norm);
        }
    }

    /// Block `b`'s payload: per layer K then V, `[token][head][d]` f16.
    fn block(&self, b: usize, tokens: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(LAYERS * 2 * tokens * KV * D * 2);
        for layer in 0..LAYERS {
            for src in [&self.k, &self.v] {
                for t in b * TPB..b * TPB + tokens {
                    let at = Kv::at(self.n, layer, t, 0);
                    for x in &src[at..at + KV * D] {
                        out.extend_from_slice(&f16::from_f32(*x).to_le_bytes());
                    }
                }
            }
        }
        out
    }

    /// f64 attention of every query head over `tokens`: (o, lse).
    fn reference(
        &self,
        layer: usize,
        q: &[f32],
        scale: f32,
        tokens: &[usize],
    ) -> (Vec<f64>, Vec<f64>) {
        let heads = q.len() / D;
        let g = heads / KV;
        let mut o = vec![0f64; heads * D];
        let mut lse = vec![f64::NEG_INFINITY; heads];
        for j in 0..heads {
            let h = j / g;
            let qj = &q[j * D..(j + 1) * D];
            let s: Vec<f64> = tokens
                .iter()
                .map(|&t| {
                    let at = Kv::at(self.n, layer, t, h);
                    scale as f64
                        * (0..D)
                            .map(|i| qj[i] as f64 * self.k[at + i] as f64)
                            .sum::<f64>()
                })
                .collect();
            if s.is_empty() {
                continue;
            }
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let l: f64 = w.iter().sum();
            for (wi, &t) in w.iter().zip(tokens) {
                let at = Kv::at(self.n, layer, t, h);
                for i in 0..D {
                    o[j * D + i] += wi / l * self.v[at + i] as f64;
                }
            }
            lse[j] = m + l.ln();
        }
        (o, lse)
    }
}

fn relerr(o: &[f32], r: &[f64]) -> f64 {
    let num: f64 = o.iter().zip(r).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
    let den: f64 = r.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

fn key(seq: u8, i: usize) -> BlockKey {
    let mut k = [0u8; 16];
    k[0] = seq;
    k[12..].copy_from_slice(&(i as u32).to_be_bytes());
    BlockKey::new(&k).unwrap()
}

fn queries(seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..HEADS * D).map(|_| rng.normal()).collect()
}

/// Stores blocks `which` of `kv` as chain `seq` (the last one with `last`
/// tokens when given).
async fn put(
    c: &mut Client,
    ns: NamespaceId,
    kv: &Kv,
    seq: u8,
    which: Range<usize>,
    last: Option<usize>,
) {
    let end = which.end;
    let blocks: Vec<PutBlock> = which
        .map(|b| PutBlock {
            key: key(seq, b),
            parent: (b > 0).then(|| key(seq, b - 1)),
            data: Bytes::from(kv.block(
                b,
                if b + 1 == end {
                    last.unwrap_or(TPB)
                } else {
                    TPB
                },
            )),
        })
        .collect();
    for part in blocks.chunks(64) {
        c.put(ns, part).await.unwrap();
    }
}

fn request(
    ns: NamespaceId,
    layer: u32,
    mode: AttendMode,
    keys: Vec<BlockKey>,
    q: &[f32],
) -> AttendRequest {
    AttendRequest {
        io_dtype: IoDtype::F32,
        min_precision: Precision::Stored,
        namespace: ns,
        layer,
        mode,
        scale: None,
        sequences: vec![AttendSequence {
            chain: Chain::Keys(keys),
            last_block_tokens: None,
            queries: q.to_vec(),
        }],
    }
}

async fn attend1(c: &mut Client, r: &AttendRequest) -> AttendOutput {
    let mut out = c.attend(r).await.unwrap();
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

fn chain(seq: u8, n: usize) -> Vec<BlockKey> {
    (0..n).map(|b| key(seq, b)).collect()
}

fn scale() -> f32 {
    1.0 / (D as f32).sqrt()
}

/// COMPUTE.md §1: dense Attend over a chain stored through Put, merged with
/// the part the client keeps (its last two blocks) by the client's merge
/// helper, against f64 over all 4096 tokens: relerr <= 5e-4. GQA: four
/// query heads on two KV heads. Also what was read and covered.
#[tokio::test]
async fn dense_attend_merged_with_the_client_part_matches_f64() {
    let d = start(|_| {}).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    let n = 4096;
    let kv = Kv::random(n, 1);
    let blocks = n / TPB;
    let ours = blocks - 2;
    put(&mut c, ns, &kv, 1, 0..ours, None).await;
    let q = queries(2);
    for layer in [0u32, 1] {
        let mut out = attend1(
            &mut c,
            &request(ns, layer, AttendMode::Dense, chain(1, ours), &q),
        )
        .await;
        assert_eq!(out.keys_present as usize, ours);
        assert_eq!(out.tokens_present as usize, ours * TPB);
        assert_eq!(out.covered, vec![0..(ours * TPB) as u64]);
        assert!(out.exact);
        assert_eq!(out.tokens_attended as usize, ours * TPB);
        assert_eq!((out.heads, out.head_dim), (HEADS, D));
        assert_eq!(out.read_blocks(TierKind::Dram) as usize, ours);
        assert_eq!(out.read_bytes(TierKind::Dram), ours as u64 * LAYER_BYTES);
        assert_eq!(out.read_bytes(TierKind::Nvme), 0);
        // The daemon's part alone is attention over its tokens.
        let theirs: Vec<usize> = (0..ours * TPB).collect();
        let (o_d, lse_d) = kv.reference(layer as usize, &q, scale(), &theirs);
        assert!(
            relerr(&out.o, &o_d) <= 5e-4,
            "daemon part {}",
            relerr(&out.o, &o_d)
        );
        for (a, b) in out.lse.iter().zip(&lse_d) {
            assert!(
                (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "lse {a} vs {b}"
            );
        }
        // The client's own part (f32, as an engine computes it), merged.
        let mine: Vec<usize> = (ours * TPB..n).collect();
        let (o_c, lse_c) = kv.reference(layer as usize, &q, scale(), &mine);
        let o_c: Vec<f32> = o_c.iter().map(|&x| x as f32).collect();
        let lse_c: Vec<f32> = lse_c.iter().map(|&x| x as f32).collect();
        out.merge_with(&o_c, &lse_c).unwrap();
        let all: Vec<usize> = (0..n).collect();
        let (o_ref, _) = kv.reference(layer as usize, &q, scale(), &all);
        let e = relerr(&out.o, &o_ref);
        println!("layer {layer}: dense 4K merged relerr {e:e}");
        assert!(e <= 5e-4, "relerr {e:e}");
    }
    d.stop().await;
}

/// The same at 32K tokens (COMPUTE.md's size): 2046 per-block partials
/// merged by the daemon, then the client's part.
#[tokio::test]
async fn dense_attend_at_32k_tokens_meets_the_exactness_target() {
    let d = start(|c| c.tiers.dram.bytes = ByteSize(80 << 20)).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    let n = 32 * 1024;
    let kv = Kv::random(n, 21);
    let ours = n / TPB - 2;
    put(&mut c, ns, &kv, 1, 0..ours, None).await;
    let q = queries(22);
    let mut out = attend1(
        &mut c,
        &request(ns, 1, AttendMode::Dense, chain(1, ours), &q),
    )
    .await;
    assert_eq!(out.keys_present as usize, ours);
    let mine: Vec<usize> = (ours * TPB..n).collect();
    let (o_c, lse_c) = kv.reference(1, &q, scale(), &mine);
    let o_c: Vec<f32> = o_c.iter().map(|&x| x as f32).collect();
    let lse_c: Vec<f32> = lse_c.iter().map(|&x| x as f32).collect();
    out.merge_with(&o_c, &lse_c).unwrap();
    let all: Vec<usize> = (0..n).collect();
    let (o_ref, _) = kv.reference(1, &q, scale(), &all);
    let e = relerr(&out.o, &o_ref);
    println!("dense 32K merged relerr {e:e}");
    assert!(e <= 5e-4, "relerr {e:e}");
    d.stop().await;
}

/// A DENSE batch is computed as one pool of work over the sequences held
/// in DRAM (items of 1 MiB of layer bytes, 128 blocks here): each answer
/// is the one its sequence gets alone, bit for bit, in request order; a
/// corrupt block in one sequence's second item ends that sequence's
/// prefix there (counted, the copy dropped) and changes no other answer.
#[tokio::test]
async fn a_dense_batch_answers_each_sequence_as_alone() {
    let d = start(|c| c.tiers.dram.bytes = ByteSize(32 << 20)).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    // Three chains of 300, 129 and 40 blocks: 3, 2 and 1 items.
    let sizes = [300usize, 129, 40];
    let kvs: Vec<Kv> = sizes
        .iter()
        .enumerate()
        .map(|(s, &b)| Kv::random(b * TPB, 40 + s as u64))
        .collect();
    for (s, kv) in kvs.iter().enumerate() {
        put(&mut c, ns, kv, 1 + s as u8, 0..sizes[s], None).await;
    }
    let qs: Vec<Vec<f32>> = (0..3).map(|s| queries(50 + s)).collect();
    let batch = |qs: &[Vec<f32>]| {
        let mut r = request(ns, 1, AttendMode::Dense, chain(1, sizes[0]), &qs[0]);
        for s in 1..3 {
            r.sequences.push(AttendSequence {
                chain: Chain::Keys(chain(1 + s as u8, sizes[s])),
                last_block_tokens: None,
                queries: qs[s].clone(),
            });
        }
        r
    };
    let alone = async |c: &mut Client, s: usize| {
        attend1(
            c,
            &request(
                ns,
                1,
                AttendMode::Dense,
                chain(1 + s as u8, sizes[s]),
                &qs[s],
            ),
        )
        .await
    };
    let all = c.attend(&batch(&qs)).await.unwrap();
    assert_eq!(all.len(), 3);
    for (s, out) in all.iter().enumerate() {
        let one = alone(&mut c, s).await;
        assert_eq!(out.keys_present as usize, sizes[s]);
        assert!(out.exact);
        assert_eq!(
            out.read_bytes(TierKind::Dram),
            sizes[s] as u64 * LAYER_BYTES
        );
        assert_eq!(out.read_blocks(TierKind::Dram) as usize, sizes[s]);
        assert_eq!((&out.o, &out.lse), (&one.o, &one.lse), "sequence {s}");
        assert_eq!(out.covered, one.covered);
        let every: Vec<usize> = (0..sizes[s] * TPB).collect();
        let (o, _) = kvs[s].reference(1, &qs[s], scale(), &every);
        assert!(relerr(&out.o, &o) <= 5e-4, "{s}: {}", relerr(&out.o, &o));
    }
    // Block 200 of the first chain is in its second item (blocks 128..256).
    let failures = d.running.as_ref().unwrap().store.stats().checksum_failures;
    corrupt(&d, ns, &chain(1, sizes[0]), 200 * TPB + 3, 1);
    let cut = c.attend(&batch(&qs)).await.unwrap();
    assert_eq!(
        cut[0].keys_present, 200,
        "the prefix ends at the corrupt block"
    );
    assert_eq!(cut[0].covered, vec![0..(200 * TPB) as u64]);
    assert_eq!(cut[0].tokens_attended as usize, 200 * TPB);
    let prefix: Vec<usize> = (0..200 * TPB).collect();
    let (o, _) = kvs[0].reference(1, &qs[0], scale(), &prefix);
    assert!(relerr(&cut[0].o, &o) <= 5e-4, "{}", relerr(&cut[0].o, &o));
    assert_eq!(
        d.running.as_ref().unwrap().store.stats().checksum_failures,
        failures + 1
    );
    for s in 1..3 {
        assert_eq!((&cut[s].o, &cut[s].lse), (&all[s].o, &all[s].lse));
    }
    // The corrupt copy was dropped: the chain now ends before it, alone too.
    let again = alone(&mut c, 0).await;
    assert_eq!(again.keys_present, 200);
    assert_eq!((&again.o, &again.lse), (&cut[0].o, &cut[0].lse));
    d.stop().await;
}

/// Mass of each head's set: exp(lse_set - lse_all).
fn masses(part: &AttendOutput, full: &AttendOutput) -> Vec<f64> {
    part.lse
        .iter()
        .zip(&full.lse)
        .map(|(a, b)| ((*a - *b) as f64).exp())
        .collect()
}

/// SPARSE with a budget of every token equals DENSE; at the default 5% on
/// data with a few strong keys it keeps most of the mass and the output,
/// compared with the oracle (the exact top tokens at the same budget).
#[tokio::test]
async fn sparse_attend_selects_by_abstract_bound() {
    let d = start(|_| {}).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    let n = 4096;
    let blocks = n / TPB;
    let q = queries(3);
    let mut kv = Kv::random(n, 4);
    // Strong keys for each query head's direction, scattered over blocks.
    let layer = 1;
    for (j, &t) in [700usize, 1900, 2600, 3333].iter().enumerate() {
        let h = j / (HEADS / KV);
        kv.plant(layer, t, h, &q[j * D..(j + 1) * D], 10.0);
    }
    put(&mut c, ns, &kv, 1, 0..blocks, None).await;
    let keys = chain(1, blocks);
    let dense = attend1(
        &mut c,
        &request(ns, layer as u32, AttendMode::Dense, keys.clone(), &q),
    )
    .await;
    let all = attend1(
        &mut c,
        &request(
            ns,
            layer as u32,
            AttendMode::Sparse(SparseBudget::Tokens(n as u32)),
            keys.clone(),
            &q,
        ),
    )
    .await;
    assert_eq!(all.o, dense.o, "a budget of every token is dense");
    assert_eq!(all.lse, dense.lse);
    assert!(all.exact && all.sink_included && all.recent_included);

    let sparse = attend1(
        &mut c,
        &request(
            ns,
            layer as u32,
            AttendMode::Sparse(SparseBudget::Default),
            keys.clone(),
            &q,
        ),
    )
    .await;
    let budget = (n as f64 * 0.05).ceil() as u64;
    assert!(!sparse.exact);
    assert!(sparse.sink_included && sparse.recent_included);
    assert!(sparse.tokens_attended >= budget && sparse.tokens_attended < budget + TPB as u64);
    let covered: u64 = sparse.covered.iter().map(|r| r.end - r.start).sum();
    assert_eq!(covered, sparse.tokens_attended);
    assert_eq!(sparse.covered[0].start, 0, "sink");
    assert_eq!(sparse.covered.last().unwrap().end, n as u64, "recent");
    let chosen_blocks = (sparse.tokens_attended as usize) / TPB;
    assert_eq!(sparse.read_blocks(TierKind::Dram) as usize, chosen_blocks);
    assert_eq!(
        sparse.read_bytes(TierKind::Dram),
        chosen_blocks as u64 * LAYER_BYTES
    );
    assert_eq!(
        sparse.abstract_bytes,
        blocks as u64 * (2 * KV * D * 2) as u64
    );
    for t in [700u64, 1900, 2600, 3333] {
        assert!(
            sparse.covered.iter().any(|r| r.contains(&t)),
            "strong key {t} covered"
        );
    }
    // Oracle: each head's exact top-`budget` tokens.
    let all_tokens: Vec<usize> = (0..n).collect();
    let (o_full, lse_full) = kv.reference(layer, &q, scale(), &all_tokens);
    let mass = masses(&sparse, &dense);
    let mut o_oracle = vec![0f64; HEADS * D];
    for (j, m) in mass.iter().enumerate() {
        let h = j / (HEADS / KV);
        let qj = &q[j * D..(j + 1) * D];
        let mut w: Vec<(f64, usize)> = (0..n)
            .map(|t| {
                let at = Kv::at(n, layer, t, h);
                let s = scale() as f64
                    * (0..D)
                        .map(|i| qj[i] as f64 * kv.k[at + i] as f64)
                        .sum::<f64>();
                ((s - lse_full[j]).exp(), t)
            })
            .collect();
        w.sort_by(|a, b| b.0.total_cmp(&a.0));
        let top = &w[..budget as usize];
        let oracle: f64 = top.iter().map(|x| x.0).sum();
        for &(wt, t) in top {
            let at = Kv::at(n, layer, t, h);
            for i in 0..D {
                o_oracle[j * D + i] += wt / oracle * kv.v[at + i] as f64;
            }
        }
        println!("head {j}: sparse 5% mass {m:.3}, oracle {oracle:.3}");
        assert!(*m >= 0.88 * oracle, "head {j}: mass {m} vs oracle {oracle}");
    }
    let e = relerr(&sparse.o, &o_full);
    let o_oracle32: Vec<f32> = o_oracle.iter().map(|&x| x as f32).collect();
    let e_oracle = relerr(&o_oracle32, &o_full);
    println!("sparse 5% relerr {e:.4}, oracle {e_oracle:.4}");
    assert!(
        e <= e_oracle + 0.10,
        "sparse relerr {e} vs oracle {e_oracle}"
    );
    // A budget in bytes of K and V: the same tokens.
    let by_bytes = attend1(
        &mut c,
        &request(
            ns,
            layer as u32,
            AttendMode::Sparse(SparseBudget::Bytes(budget * (2 * KV * D * 2) as u64)),
            keys.clone(),
            &q,
        ),
    )
    .await;
    assert_eq!(by_bytes.covered, sparse.covered);
    d.stop().await;
}

/// SparF with k = N and r = d is dense; with its defaults (r = d/8,
/// k = N/16) each KV head attends its own N/16 tokens (whole blocks, or
/// single tokens with `by_token`) and keeps the mass. With key sketches
/// (`compute.key_sketch`) the scoring reads no K: only the chosen blocks'
/// K and V are read, and the sketch bytes are reported.
#[tokio::test]
async fn sparf_attend() {
    for sketch in [false, true] {
        sparf_case(sketch).await;
    }
}

async fn sparf_case(sketch: bool) {
    let d = start(|c| c.compute.key_sketch = sketch).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    let n = 2048;
    let blocks = n / TPB;
    let q = queries(5);
    let mut kv = Kv::random(n, 6);
    let layer = 0;
    for (j, &t) in [100usize, 555, 1200, 2000].iter().enumerate() {
        kv.plant(layer, t, j / 2, &q[j * D..(j + 1) * D], 30.0);
    }
    put(&mut c, ns, &kv, 1, 0..blocks, None).await;
    let keys = chain(1, blocks);
    let sparf = |channels, tokens, by_token| AttendMode::Sparf {
        channels,
        tokens,
        by_token,
        mean_correction: false,
        joint_heads: false,
    };
    let dense = attend1(&mut c, &request(ns, 0, AttendMode::Dense, keys.clone(), &q)).await;
    for by_token in [false, true] {
        let full = attend1(
            &mut c,
            &request(
                ns,
                0,
                sparf(Some(D as u32), Some(n as u32), by_token),
                keys.clone(),
                &q,
            ),
        )
        .await;
        assert_eq!(full.o, dense.o, "SparF over every token is dense");
        assert_eq!(full.lse, dense.lse);
        assert!(full.exact);
    }
    let sp = attend1(
        &mut c,
        &request(ns, 0, sparf(None, None, false), keys.clone(), &q),
    )
    .await;
    let tok = attend1(
        &mut c,
        &request(ns, 0, sparf(None, None, true), keys.clone(), &q),
    )
    .await;
    for (what, out) in [("blocks", &sp), ("tokens", &tok)] {
        assert!(!out.exact);
        assert_eq!(out.head_covered.len(), KV);
        for hc in &out.head_covered {
            let count: u64 = hc.iter().map(|r| r.end - r.start).sum();
            // n/16 is whole blocks here, so both choose exactly k tokens.
            assert_eq!(count as usize, n / 16, "{what}");
            if what == "blocks" {
                assert!(
                    hc.iter()
                        .all(|r| r.start % TPB as u64 == 0 && r.end % TPB as u64 == 0),
                    "whole blocks: {hc:?}"
                );
            }
        }
        assert_eq!(out.tokens_attended as usize, n / 16);
        for (j, &t) in [100u64, 555, 1200, 2000].iter().enumerate() {
            assert!(
                out.head_covered[j / 2].iter().any(|r| r.contains(&t)),
                "{what}: strong key {t}"
            );
        }
        let mass = masses(out, &dense);
        println!("sketch {sketch} sparf {what} mass {mass:?}");
        assert!(mass.iter().all(|&m| m >= 0.9), "{what} {mass:?}");
    }
    // Whole blocks: K and V of at most k/16 blocks per KV head.
    let chosen_blocks: std::collections::BTreeSet<u64> = sp
        .head_covered
        .iter()
        .flatten()
        .flat_map(|r| r.start / TPB as u64..r.end / TPB as u64)
        .collect();
    assert!(chosen_blocks.len() <= KV * n / 16 / TPB);
    if sketch {
        // Ranking read the summaries and no K: both bounds of every channel
        // of every block and KV head, and every code row of the 3 × k/16
        // candidate blocks of each KV head (the two-stage default); phase 2
        // read K and V of the chosen blocks.
        let candidates = 3 * n / 16 / TPB;
        assert_eq!(
            sp.abstract_bytes as usize,
            blocks * KV * 4 * D + KV * candidates * D * TPB
        );
        assert_eq!(sp.read_blocks(TierKind::Dram) as usize, chosen_blocks.len());
        assert_eq!(
            sp.read_bytes(TierKind::Dram),
            chosen_blocks.len() as u64 * LAYER_BYTES
        );
    } else {
        // K of every block for scoring, K and V of the blocks chosen.
        assert_eq!(sp.abstract_bytes, 0);
        assert_eq!(sp.read_blocks(TierKind::Dram) as usize, blocks);
        assert_eq!(
            sp.read_bytes(TierKind::Dram),
            blocks as u64 * LAYER_BYTES / 2 + chosen_blocks.len() as u64 * LAYER_BYTES
        );
    }
    // sparf_joint_heads: one set for the layer, k tokens in all, the same
    // for both KV heads; exact over it; each head's strong keys in it.
    for by_token in [false, true] {
        let mode = AttendMode::Sparf {
            channels: None,
            tokens: None,
            by_token,
            mean_correction: false,
            joint_heads: true,
        };
        let out = attend1(&mut c, &request(ns, 0, mode, keys.clone(), &q)).await;
        assert!(!out.exact && !out.mean_corrected);
        assert_eq!(out.head_covered.len(), KV);
        assert_eq!(out.head_covered[0], out.head_covered[1], "one set");
        assert_eq!(out.covered, out.head_covered[0]);
        let set: Vec<usize> = out
            .covered
            .iter()
            .flat_map(|r| r.start as usize..r.end as usize)
            .collect();
        assert_eq!(set.len(), n / 16, "by_token {by_token}: k tokens in all");
        assert_eq!(out.tokens_attended as usize, n / 16);
        for t in [100, 555, 1200, 2000] {
            assert!(set.contains(&t), "by_token {by_token}: strong key {t}");
        }
        let (o, lse) = kv.reference(layer, &q, scale(), &set);
        let e = relerr(&out.o, &o);
        assert!(
            e <= 1e-4,
            "by_token {by_token}: relerr {e} over the covered set"
        );
        for (a, b) in out.lse.iter().zip(&lse) {
            assert!((*a as f64 - b).abs() < 1e-3, "lse {a} vs {b}");
        }
        if !by_token {
            assert!(
                set.len().is_multiple_of(TPB)
                    && out
                        .covered
                        .iter()
                        .all(|r| r.start.is_multiple_of(TPB as u64))
            );
            let blocks_read = n / 16 / TPB;
            if sketch {
                assert_eq!(out.read_blocks(TierKind::Dram) as usize, blocks_read);
                assert_eq!(
                    out.read_bytes(TierKind::Dram),
                    blocks_read as u64 * LAYER_BYTES
                );
                // Per-head choice read the union: never less.
                assert!(chosen_blocks.len() >= blocks_read);
            }
        }
        let mass = masses(&out, &dense);
        println!("sketch {sketch} sparf joint by_token {by_token} mass {mass:?}");
    }
    d.stop().await;
}

/// Sketch runs (`compute.sketch_runs`, attend/runs.rs) change where
/// SPARF's scan reads the sketches from, never the answer: bit for bit the
/// o, lse and per-head coverage of block-by-block scoring (a second daemon
/// with runs off, same data), on the first call (run made), the next
/// (reused), another layer, after the chain grows (extended), with a last
/// block attended in part, after a block inside the chain is replaced by
/// other bytes under its key (the run copied again from there), and for a
/// fork that shares a prefix. The metrics say which happened.
#[tokio::test]
async fn sparf_sketch_runs_answer_as_block_by_block() {
    let on = start(|c| c.compute.key_sketch = true).await;
    let off = start(|c| {
        c.compute.key_sketch = true;
        c.compute.sketch_runs = false;
    })
    .await;
    let mut cs = [on.tcp_client().await, off.tcp_client().await];
    let mut ns = Vec::new();
    for c in &mut cs {
        ns.push(c.register_layout(&layout()).await.unwrap().namespace);
    }
    let n = 140 * TPB;
    let kv = Kv::random(n, 21);
    for (c, &ns) in cs.iter_mut().zip(&ns) {
        put(c, ns, &kv, 1, 0..64, None).await;
    }
    const SPARF: AttendMode = AttendMode::Sparf {
        channels: None,
        tokens: None,
        by_token: false,
        mean_correction: false,
        joint_heads: false,
    };
    async fn both(
        cs: &mut [Client; 2],
        ns: &[NamespaceId],
        layer: u32,
        keys: Vec<BlockKey>,
        last: Option<u32>,
        seed: u64,
        what: &str,
    ) {
        let mut outs = Vec::new();
        for (c, &ns) in cs.iter_mut().zip(ns) {
            let mut r = request(ns, layer, SPARF, keys.clone(), &queries(seed));
            r.sequences[0].last_block_tokens = last;
            outs.push(attend1(c, &r).await);
        }
        let (a, b) = (&outs[0], &outs[1]);
        assert_eq!(a.o, b.o, "{what}: o");
        assert_eq!(a.lse, b.lse, "{what}: lse");
        assert_eq!(a.head_covered, b.head_covered, "{what}: coverage");
        assert_eq!(
            a.read_bytes(TierKind::Dram),
            b.read_bytes(TierKind::Dram),
            "{what}"
        );
        assert_eq!(a.abstract_bytes, b.abstract_bytes, "{what}");
        assert!(!a.exact && a.tokens_attended > 0, "{what}");
    }
    let keys = |seq: u8, r: Range<usize>| -> Vec<BlockKey> { r.map(|b| key(seq, b)).collect() };
    both(&mut cs, &ns, 0, keys(1, 0..64), None, 1, "made").await;
    both(&mut cs, &ns, 0, keys(1, 0..64), None, 2, "reused").await;
    both(&mut cs, &ns, 1, keys(1, 0..64), None, 3, "layer 1").await;
    for (c, &ns) in cs.iter_mut().zip(&ns) {
        put(c, ns, &kv, 1, 64..120, None).await;
    }
    both(&mut cs, &ns, 0, keys(1, 0..120), None, 4, "grown").await;
    for (c, &ns) in cs.iter_mut().zip(&ns) {
        put(c, ns, &kv, 1, 120..140, None).await;
    }
    both(
        &mut cs,
        &ns,
        0,
        keys(1, 0..140),
        None,
        4,
        "grown past its room",
    )
    .await;
    both(
        &mut cs,
        &ns,
        0,
        keys(1, 0..140),
        Some(5),
        5,
        "last block in part",
    )
    .await;
    // Block 40 replaced: other bytes under the same key, with a key the
    // next queries attend to strongly (a stale run would miss it).
    let mut other = Kv::random(n, 77);
    let q6 = queries(6);
    for h in 0..KV {
        let j = h * (HEADS / KV);
        other.plant(0, 40 * TPB + 3, h, &q6[j * D..(j + 1) * D], 30.0);
    }
    for (c, &ns) in cs.iter_mut().zip(&ns) {
        c.delete(ns, &[key(1, 40)]).await.unwrap();
        let data = Bytes::from(other.block(40, TPB));
        c.put(
            ns,
            &[PutBlock {
                key: key(1, 40),
                parent: Some(key(1, 39)),
                data,
            }],
        )
        .await
        .unwrap();
    }
    both(&mut cs, &ns, 0, keys(1, 0..140), None, 6, "replaced").await;
    let out = attend1(&mut cs[0], &request(ns[0], 0, SPARF, keys(1, 0..140), &q6)).await;
    for hc in &out.head_covered {
        assert!(
            hc.iter().any(|r| r.contains(&(40 * TPB as u64 + 3))),
            "the new block 40 is chosen: {hc:?}"
        );
    }
    // A fork: blocks 0..20 shared, 20..40 its own.
    for (c, &ns) in cs.iter_mut().zip(&ns) {
        put(c, ns, &other, 2, 20..40, None).await;
        c.put(
            ns,
            &[PutBlock {
                key: key(2, 20),
                parent: Some(key(1, 19)),
                data: Bytes::from(other.block(20, TPB)),
            }],
        )
        .await
        .unwrap();
    }
    let mut fork = keys(1, 0..20);
    fork.extend(keys(2, 20..40));
    both(&mut cs, &ns, 0, fork, None, 7, "fork").await;
    let (_, m) = http_get(on.metrics, "/metrics").await;
    // Made 64, reused 64, layer 1 64, grown 64 + 56, then 120 + 20 (past
    // the room the run was made with: moved), in part 139 (the last block
    // from its entry), replaced 40 + 100 (and 140 again), fork 40.
    for (result, count) in [
        ("reused", 64 + 64 + 120 + 139 + 40 + 140),
        ("copied", 64 + 64 + 56 + 20 + 100 + 40),
        ("no_room", 0),
    ] {
        let line = format!("strata_attend_sketch_run_blocks_total{{result=\"{result}\"}} {count}");
        assert!(m.contains(&line), "{line}\n{m}");
    }
    let (_, m) = http_get(off.metrics, "/metrics").await;
    assert!(m.contains("strata_attend_sketch_run_blocks_total{result=\"copied\"} 0"));
    on.stop().await;
    off.stop().await;
}

/// SparQ's mean-value correction on needle-like data (per query head a few
/// strong keys scattered over the chain, a broad background, values with a
/// common offset), key sketches on: the corrected answer is flagged (not
/// exact, not mergeable, refused by merge_with), covers and reads what the
/// uncorrected one does plus the V sums, is `alpha o + (1 - alpha) mean(V)`
/// with `alpha = exp(lse_uncorrected - lse_corrected)` in (0, 1) and the
/// mean of the stored V, and is closer to dense attention than the
/// uncorrected answer, for whole blocks and single tokens.
#[tokio::test]
async fn sparf_mean_correction_brings_needle_answers_closer_to_dense() {
    let d = start(|c| c.compute.key_sketch = true).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    let n = 4096;
    let blocks = n / TPB;
    let layer = 1;
    let q = queries(31);
    let mut kv = Kv::random(n, 32);
    // Three needles per query head, logit about 7 against a background of
    // logits ~ N(0, 0.5): they hold about half of each head's mass.
    let mut rng = Rng::new(33);
    for j in 0..HEADS {
        for _ in 0..3 {
            let t = (rng.next() % n as u64) as usize;
            kv.plant(layer, t, j / (HEADS / KV), &q[j * D..(j + 1) * D], 7.0);
        }
    }
    // Values with a common offset per channel, as real heads have.
    let offset: Vec<f32> = (0..D)
        .map(|i| 1.5 * ((i * 7 % 11) as f32 / 11.0 - 0.3))
        .collect();
    for t in 0..n {
        for h in 0..KV {
            let at = Kv::at(n, layer, t, h);
            for (x, o) in kv.v[at..at + D].iter_mut().zip(&offset) {
                *x = round(*x + o);
            }
        }
    }
    put(&mut c, ns, &kv, 1, 0..blocks, None).await;
    let keys = chain(1, blocks);
    let all: Vec<usize> = (0..n).collect();
    let (o_full, lse_full) = kv.reference(layer, &q, scale(), &all);
    // The mean of the stored V per KV head, in f64.
    let mean: Vec<f64> = (0..KV * D)
        .map(|x| {
            let (h, i) = (x / D, x % D);
            (0..n)
                .map(|t| kv.v[Kv::at(n, layer, t, h) + i] as f64)
                .sum::<f64>()
                / n as f64
        })
        .collect();
    let sparf = |by_token, mean_correction| AttendMode::Sparf {
        channels: None,
        tokens: None,
        by_token,
        mean_correction,
        joint_heads: false,
    };
    for by_token in [false, true] {
        let what = if by_token { "tokens" } else { "blocks" };
        let plain = attend1(
            &mut c,
            &request(ns, layer as u32, sparf(by_token, false), keys.clone(), &q),
        )
        .await;
        let mut corr = attend1(
            &mut c,
            &request(ns, layer as u32, sparf(by_token, true), keys.clone(), &q),
        )
        .await;
        assert!(!plain.mean_corrected && plain.mergeable());
        assert!(
            corr.mean_corrected && !corr.mergeable() && !corr.exact,
            "{what}"
        );
        // The same choice and reads; the V sums of every block on top.
        assert_eq!(corr.head_covered, plain.head_covered, "{what}");
        assert_eq!(corr.covered, plain.covered);
        assert_eq!(corr.tokens_attended, plain.tokens_attended);
        assert_eq!(
            corr.read_bytes(TierKind::Dram),
            plain.read_bytes(TierKind::Dram)
        );
        assert_eq!(
            corr.abstract_bytes,
            plain.abstract_bytes + (blocks * KV * D * 4) as u64
        );
        // o = alpha o_plain + (1 - alpha) mean(V), lse = lse_plain - ln alpha.
        let g = HEADS / KV;
        for j in 0..HEADS {
            let alpha = ((plain.lse[j] - corr.lse[j]) as f64).exp();
            let true_mass = ((plain.lse[j] as f64) - lse_full[j]).exp();
            println!("{what} head {j}: alpha {alpha:.3}, true mass of the set {true_mass:.3}");
            assert!(alpha > 0.0 && alpha < 1.0, "{what} head {j}: alpha {alpha}");
            let want: Vec<f64> = (0..D)
                .map(|i| alpha * plain.o[j * D + i] as f64 + (1.0 - alpha) * mean[(j / g) * D + i])
                .collect();
            let e = relerr(&corr.o[j * D..(j + 1) * D], &want);
            assert!(e <= 1e-4, "{what} head {j}: {e}");
        }
        let (e_plain, e_corr) = (relerr(&plain.o, &o_full), relerr(&corr.o, &o_full));
        println!("{what}: relerr vs dense {e_plain:.4} uncorrected, {e_corr:.4} corrected");
        assert!(e_plain > 0.2, "{what}: the data must be hard ({e_plain})");
        assert!(e_corr < 0.75 * e_plain, "{what}: {e_corr} vs {e_plain}");
        // Never merged.
        let (o_b, lse_b) = (vec![0.0; HEADS * D], vec![0.0; HEADS]);
        let before = corr.o.clone();
        assert!(corr.merge_with(&o_b, &lse_b).is_err());
        assert_eq!(corr.o, before);
    }
    // Nothing to correct when the set is every token: exact, mergeable.
    let every = AttendMode::Sparf {
        channels: Some(D as u32),
        tokens: Some(n as u32),
        by_token: false,
        mean_correction: true,
        joint_heads: false,
    };
    let out = attend1(&mut c, &request(ns, layer as u32, every, keys.clone(), &q)).await;
    assert!(out.exact && !out.mean_corrected);
    assert!(relerr(&out.o, &o_full) <= 5e-4);
    // A last block attended in part has no usable V sum: not applied.
    let mut r = request(ns, layer as u32, sparf(false, true), keys.clone(), &q);
    r.sequences[0].last_block_tokens = Some(5);
    let mut plain_r = r.clone();
    plain_r.mode = sparf(false, false);
    let (cut, cut_plain) = (attend1(&mut c, &r).await, attend1(&mut c, &plain_r).await);
    assert!(!cut.mean_corrected && cut.mergeable());
    assert_eq!((cut.o, cut.lse), (cut_plain.o, cut_plain.lse));
    let (_, m) = http_get(d.metrics, "/metrics").await;
    for (result, count) in [("applied", 2), ("exact", 1), ("no_sums", 1)] {
        let line =
            format!("strata_attend_sparf_mean_correction_total{{result=\"{result}\"}} {count}");
        assert!(m.contains(&line), "{line}");
    }
    d.stop().await;
}

/// Without key sketches there are no V sums: the flag is taken, but the
/// answer is the uncorrected, mergeable one, bit for bit, and says so.
#[tokio::test]
async fn sparf_mean_correction_without_sketches_answers_uncorrected() {
    let d = start(|c| c.compute.key_sketch = false).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    let n = 1024;
    let kv = Kv::random(n, 41);
    put(&mut c, ns, &kv, 1, 0..n / TPB, None).await;
    let q = queries(42);
    let mode = |mean_correction| AttendMode::Sparf {
        channels: None,
        tokens: None,
        by_token: false,
        mean_correction,
        joint_heads: false,
    };
    let plain = attend1(&mut c, &request(ns, 0, mode(false), chain(1, n / TPB), &q)).await;
    let mut asked = attend1(&mut c, &request(ns, 0, mode(true), chain(1, n / TPB), &q)).await;
    assert!(!asked.mean_corrected && asked.mergeable());
    assert_eq!((&asked.o, &asked.lse), (&plain.o, &plain.lse));
    assert_eq!(asked.head_covered, plain.head_covered);
    assert_eq!(asked.abstract_bytes, plain.abstract_bytes);
    asked
        .merge_with(&[0.0; HEADS * D], &[f32::NEG_INFINITY; HEADS])
        .unwrap();
    d.stop().await;
}

/// A chain with a missing middle block: only the prefix before it is
/// covered, and the answer says so; the prefix's attention is exact. A
/// partial last block, and `last_block_tokens`, cut the token set.
#[tokio::test]
async fn a_missing_block_ends_the_covered_prefix() {
    let d = start(|_| {}).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    let n = 1024;
    let blocks = n / TPB;
    let kv = Kv::random(n, 7);
    put(&mut c, ns, &kv, 1, 0..30, None).await;
    put(&mut c, ns, &kv, 1, 31..blocks, None).await;
    let q = queries(8);
    for mode in [
        AttendMode::Dense,
        AttendMode::Sparse(SparseBudget::Tokens(n as u32)),
        AttendMode::Sparf {
            channels: Some(D as u32),
            tokens: Some(n as u32),
            by_token: false,
            mean_correction: false,
            joint_heads: false,
        },
    ] {
        let out = attend1(&mut c, &request(ns, 1, mode, chain(1, blocks), &q)).await;
        assert_eq!(out.keys_present, 30, "{mode:?}");
        assert_eq!(out.tokens_present, 30 * TPB as u64);
        assert_eq!(out.covered, vec![0..30 * TPB as u64]);
        let prefix: Vec<usize> = (0..30 * TPB).collect();
        let (o, _) = kv.reference(1, &q, scale(), &prefix);
        assert!(
            relerr(&out.o, &o) <= 5e-4,
            "{mode:?}: {}",
            relerr(&out.o, &o)
        );
    }
    // Nothing present: an empty set (lse = -inf, o = 0), not an error.
    let out = attend1(
        &mut c,
        &request(ns, 1, AttendMode::Dense, vec![key(9, 0)], &q),
    )
    .await;
    assert_eq!(out.keys_present, 0);
    assert!(out.lse.iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(out.o.iter().all(|&x| x == 0.0));
    // A partial last block (11 tokens), and only 5 of them asked.
    put(&mut c, ns, &kv, 2, 0..4, Some(11)).await;
    let keys = chain(2, 4);
    let out = attend1(&mut c, &request(ns, 0, AttendMode::Dense, keys.clone(), &q)).await;
    assert_eq!(out.tokens_present, 3 * TPB as u64 + 11);
    let mut r = request(ns, 0, AttendMode::Dense, keys, &q);
    r.sequences[0].last_block_tokens = Some(5);
    let out = attend1(&mut c, &r).await;
    assert_eq!(out.tokens_present, 3 * TPB as u64 + 5);
    assert_eq!(out.covered, vec![0..3 * TPB as u64 + 5]);
    let set: Vec<usize> = (0..3 * TPB + 5).collect();
    let (o, _) = kv.reference(0, &q, scale(), &set);
    assert!(relerr(&out.o, &o) <= 5e-4);
    // Several sequences in one call, answered in order.
    let mut r = request(ns, 0, AttendMode::Dense, chain(1, 30), &q);
    r.sequences.push(AttendSequence {
        chain: Chain::Keys(chain(2, 2)),
        last_block_tokens: None,
        queries: queries(9)[..2 * D].to_vec(),
    });
    let out = c.attend(&r).await.unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!((out[0].keys_present, out[1].keys_present), (30, 2));
    assert_eq!((out[0].heads, out[1].heads), (HEADS, 2));
    d.stop().await;
}

/// A chain given by its tail and length (`chain_tail`, `chain_blocks`)
/// is answered as the same chain given by its keys, in every mode, cut by
/// `last_block_tokens`, beside a keys sequence in one call, and on a fork.
/// An unknown tail or a chain missing a middle block is answered with no
/// prefix (its head cannot be known); the block stored again mends it. A
/// wrong length is INVALID_ARGUMENT naming the field and changes nothing.
#[tokio::test]
async fn a_chain_given_by_its_tail_answers_as_its_keys() {
    let d = start(|c| c.compute.key_sketch = true).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    let n = 1024;
    let blocks = n / TPB;
    let kv = Kv::random(n, 21);
    put(&mut c, ns, &kv, 1, 0..blocks, Some(11)).await;
    // A fork of chain 1 after its block 39.
    let fork: Vec<PutBlock> = (40..48)
        .map(|b| PutBlock {
            key: key(2, b),
            parent: Some(if b == 40 { key(1, 39) } else { key(2, b - 1) }),
            data: Bytes::from(kv.block(b, TPB)),
        })
        .collect();
    c.put(ns, &fork).await.unwrap();
    let fork_keys: Vec<BlockKey> = (0..40)
        .map(|b| key(1, b))
        .chain((40..48).map(|b| key(2, b)))
        .collect();
    let q = queries(22);
    let tail = |keys: &[BlockKey]| Chain::Tail {
        tail: *keys.last().unwrap(),
        blocks: keys.len() as u32,
    };
    let same = |a: &AttendOutput, b: &AttendOutput, what: &str| {
        assert_eq!((&a.o, &a.lse), (&b.o, &b.lse), "{what}");
        assert_eq!(
            (a.keys_present, a.tokens_present),
            (b.keys_present, b.tokens_present),
            "{what}"
        );
        assert_eq!(
            (&a.covered, &a.head_covered),
            (&b.covered, &b.head_covered),
            "{what}"
        );
        assert_eq!(a.reads, b.reads, "{what}");
    };
    let sparf = AttendMode::Sparf {
        channels: None,
        tokens: None,
        by_token: false,
        mean_correction: false,
        joint_heads: false,
    };
    for mode in [
        AttendMode::Dense,
        AttendMode::Sparse(SparseBudget::Tokens(128)),
        sparf,
        AttendMode::Retrieval { k: None, ef: None },
    ] {
        for (keys, last) in [
            (chain(1, blocks), None),
            (chain(1, blocks), Some(5)),
            (chain(1, 20), None),
            (fork_keys.clone(), None),
        ] {
            if last.is_some() && matches!(mode, AttendMode::Retrieval { .. }) {
                continue; // RETRIEVAL covers whole blocks only
            }
            let what = format!("{mode:?}, {} blocks, last {last:?}", keys.len());
            let mut by_keys = request(ns, 1, mode, keys.clone(), &q);
            by_keys.sequences[0].last_block_tokens = last;
            let mut by_tail = by_keys.clone();
            by_tail.sequences[0].chain = tail(&keys);
            let (a, b) = (
                attend1(&mut c, &by_keys).await,
                attend1(&mut c, &by_tail).await,
            );
            assert_eq!(a.keys_present as usize, keys.len(), "{what}");
            same(&a, &b, &what);
        }
    }
    // Both forms in one call, answered in order.
    let mut r = request(ns, 0, AttendMode::Dense, chain(1, 30), &q);
    r.sequences.push(AttendSequence {
        chain: tail(&fork_keys),
        last_block_tokens: None,
        queries: q.clone(),
    });
    let out = c.attend(&r).await.unwrap();
    let by_keys = attend1(
        &mut c,
        &request(ns, 0, AttendMode::Dense, fork_keys.clone(), &q),
    )
    .await;
    assert_eq!(out[0].keys_present, 30);
    same(&out[1], &by_keys, "second sequence, by tail");

    // Unknown tail: nothing present, as for an unknown key.
    let mut r = request(ns, 0, AttendMode::Dense, vec![], &q);
    r.sequences[0].chain = Chain::Tail {
        tail: key(9, 3),
        blocks: 4,
    };
    let out = attend1(&mut c, &r).await;
    assert_eq!(out.keys_present, 0);
    assert!(out.lse.iter().all(|&x| x == f32::NEG_INFINITY));
    // A wrong length, either way: the field is named and nothing changes.
    let before = snapshot(&mut c).await;
    for blocks in [19, 21] {
        r.sequences[0].chain = Chain::Tail {
            tail: key(1, 19),
            blocks,
        };
        assert_status(
            c.attend(&r).await.map_err(|e| match e {
                strata_client::Error::Status(s) => s,
                e => panic!("{e}"),
            }),
            Code::InvalidArgument,
            "sequences[0].chain_blocks",
            "is ",
        );
    }
    assert_eq!(snapshot(&mut c).await, before);
    // A middle block gone: the keys still give the prefix before it, the
    // tail gives nothing (the head is unknown); stored again, it mends
    // the chain.
    c.delete(ns, &[key(1, 10)]).await.unwrap();
    let keys = chain(1, 20);
    let a = attend1(&mut c, &request(ns, 0, AttendMode::Dense, keys.clone(), &q)).await;
    assert_eq!(a.keys_present, 10);
    let mut by_tail = request(ns, 0, AttendMode::Dense, vec![], &q);
    by_tail.sequences[0].chain = tail(&keys);
    assert_eq!(attend1(&mut c, &by_tail).await.keys_present, 0);
    put(&mut c, ns, &kv, 1, 10..11, None).await;
    let a = attend1(&mut c, &request(ns, 0, AttendMode::Dense, keys.clone(), &q)).await;
    same(&a, &attend1(&mut c, &by_tail).await, "mended");
    assert_eq!(a.keys_present, 20);
    d.stop().await;
}

/// With io_dtype F16 or BF16, queries go and outputs come back packed:
/// the answer is the f32 answer to the same (rounded) queries, rounded
/// once, and lse is unchanged.
#[tokio::test]
async fn packed_queries_and_outputs_are_the_f32_answer_rounded() {
    let d = start(|_| {}).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    let kv = Kv::random(512, 23);
    put(&mut c, ns, &kv, 1, 0..32, None).await;
    for io in [IoDtype::F16, IoDtype::Bf16] {
        let q = io.unpack(&io.pack(&queries(24)));
        let plain = attend1(&mut c, &request(ns, 0, AttendMode::Dense, chain(1, 32), &q)).await;
        let mut r = request(ns, 0, AttendMode::Dense, chain(1, 32), &q);
        r.io_dtype = io;
        let packed = attend1(&mut c, &r).await;
        assert_eq!(packed.lse, plain.lse, "{io:?}");
        assert_eq!(packed.o, io.unpack(&io.pack(&plain.o)), "{io:?}");
        assert_ne!(packed.o, plain.o, "{io:?}: o was rounded");
        assert_eq!(packed.covered, plain.covered);
        // The wire: 2 bytes a value each way.
        let pb = strata_client::attend::request_pb(&r);
        assert_eq!(pb.sequences[0].queries_packed.len(), 2 * HEADS * D);
        assert!(pb.sequences[0].queries.is_empty());
    }
    d.stop().await;
}

/// What a bad call must not change: blocks, bytes, leases, pins.
async fn snapshot(c: &mut Client) -> (u64, u64, u64, u64, u64) {
    let s = c.stats().await.unwrap();
    let dram = &s.tiers[0];
    (
        s.blocks,
        dram.used_bytes,
        s.leases,
        dram.pinned_blocks,
        s.abstract_bytes,
    )
}

fn assert_status(
    r: Result<impl std::fmt::Debug, tonic::Status>,
    code: Code,
    field: &str,
    says: &str,
) {
    let e = r.unwrap_err();
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().starts_with(field),
        "message {:?} should name {field:?}",
        e.message()
    );
    assert!(
        e.message().contains(says),
        "message {:?} should say {says:?}",
        e.message()
    );
}

#[tokio::test]
async fn bad_attend_input_gets_invalid_argument_naming_the_field_and_changes_nothing() {
    let d = start(|c| {
        c.compute.max_sequences = 3;
        c.compute.max_query_heads = 8;
        c.server.max_keys_per_call = 64;
    })
    .await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    let kv = Kv::random(256, 10);
    put(&mut c, ns, &kv, 1, 0..4, Some(7)).await;
    let mut fp8 = layout();
    fp8.dtype = Dtype::Fp8E4m3;
    let ns_fp8 = c.register_layout(&fp8).await.unwrap().namespace;
    let mut mla = layout();
    mla.kv_kind = KvKind::Mla;
    mla.num_kv_heads = 1;
    let ns_mla = c.register_layout(&mla).await.unwrap().namespace;
    let before = snapshot(&mut c).await;
    let q = queries(1);
    let seq = |keys: Vec<Bytes>, queries: Vec<f32>| pb::AttendSequence {
        keys,
        last_block_tokens: 0,
        queries,
        ..Default::default()
    };
    let kb = |i: usize| Bytes::copy_from_slice(key(1, i).as_bytes());
    let good = || pb::AttendRequest {
        namespace_id: ns.0,
        layer: 0,
        mode: pb::AttendMode::Dense as i32,
        scale: 0.0,
        sequences: vec![seq(vec![kb(0), kb(1)], q.clone())],
        ..Default::default()
    };
    let rpc = c.rpc().clone();
    let call = |r: pb::AttendRequest| {
        let mut rpc = rpc.clone();
        async move { rpc.attend(r).await }
    };
    assert!(call(good()).await.is_ok());
    let inv = Code::InvalidArgument;
    let cases: Vec<(pb::AttendRequest, Code, &str, &str)> = vec![
        (
            pb::AttendRequest {
                namespace_id: 777,
                ..good()
            },
            Code::NotFound,
            "namespace_id",
            "not registered",
        ),
        (
            pb::AttendRequest {
                namespace_id: 0,
                ..good()
            },
            inv,
            "namespace_id",
            "missing",
        ),
        (
            pb::AttendRequest { mode: 0, ..good() },
            inv,
            "mode",
            "unspecified",
        ),
        (
            pb::AttendRequest {
                min_precision: 9,
                ..good()
            },
            inv,
            "min_precision",
            "unknown value 9",
        ),
        (
            pb::AttendRequest {
                mode: pb::AttendMode::Retrieval as i32,
                min_precision: pb::Precision::Int8 as i32,
                ..good()
            },
            inv,
            "min_precision",
            "stored K and V only",
        ),
        (
            pb::AttendRequest {
                sequences: vec![],
                ..good()
            },
            inv,
            "sequences",
            "at least one",
        ),
        (
            pb::AttendRequest {
                sequences: vec![seq(vec![kb(0)], q.clone()), seq(vec![], q.clone())],
                ..good()
            },
            inv,
            "sequences[1].keys",
            "at least one key",
        ),
        (
            pb::AttendRequest {
                sequences: vec![seq(vec![Bytes::from(vec![0u8; 40])], q.clone())],
                ..good()
            },
            inv,
            "sequences[0].keys[0]",
            "40 bytes",
        ),
        (
            pb::AttendRequest {
                sequences: vec![seq(vec![kb(0)], {
                    let mut x = q.clone();
                    x[3] = f32::NAN;
                    x
                })],
                ..good()
            },
            inv,
            "sequences[0].queries[3]",
            "not a finite number",
        ),
        (
            pb::AttendRequest {
                sequences: vec![seq(vec![kb(0)], q[..100].to_vec())],
                ..good()
            },
            inv,
            "sequences[0].queries",
            "100 values are not whole heads of head_dim 64",
        ),
        (
            pb::AttendRequest {
                sequences: vec![seq(vec![kb(0)], q[..3 * D].to_vec())],
                ..good()
            },
            inv,
            "sequences[0].queries",
            "3 heads is not a multiple of the layout's 2 KV heads",
        ),
        (
            pb::AttendRequest {
                sequences: vec![seq(vec![kb(0)], vec![0.5; 10 * D])],
                ..good()
            },
            inv,
            "sequences[0].queries",
            "compute.max_query_heads",
        ),
        (
            pb::AttendRequest { layer: 2, ..good() },
            inv,
            "layer",
            "2 is out of range (2 layers)",
        ),
        (
            pb::AttendRequest {
                sequences: vec![seq(vec![kb(0)], q.clone()); 4],
                ..good()
            },
            inv,
            "sequences",
            "compute.max_sequences",
        ),
        (
            pb::AttendRequest {
                sequences: vec![seq((0..65).map(|_| kb(0)).collect(), q.clone())],
                ..good()
            },
            inv,
            "sequences",
            "server.max_keys_per_call",
        ),
        (
            pb::AttendRequest {
                scale: -1.0,
                ..good()
            },
            inv,
            "scale",
            "positive",
        ),
        (
            pb::AttendRequest {
                budget_tokens: 10,
                ..good()
            },
            inv,
            "budget_tokens",
            "only SPARSE",
        ),
        (
            pb::AttendRequest {
                mode: pb::AttendMode::Sparse as i32,
                budget_tokens: 1,
                budget_bytes: 1,
                ..good()
            },
            inv,
            "budget_bytes",
            "not both",
        ),
        (
            pb::AttendRequest {
                sparf_tokens: 10,
                ..good()
            },
            inv,
            "sparf_tokens",
            "only SPARF",
        ),
        (
            pb::AttendRequest {
                mode: pb::AttendMode::Sparf as i32,
                sparf_channels: 65,
                ..good()
            },
            inv,
            "sparf_channels",
            "above head_dim 64",
        ),
        (
            pb::AttendRequest {
                sparf_mean_correction: true,
                ..good()
            },
            inv,
            "sparf_mean_correction",
            "only SPARF",
        ),
        (
            pb::AttendRequest {
                mode: pb::AttendMode::Sparse as i32,
                sparf_mean_correction: true,
                ..good()
            },
            inv,
            "sparf_mean_correction",
            "only SPARF",
        ),
        (
            pb::AttendRequest {
                sparf_joint_heads: true,
                ..good()
            },
            inv,
            "sparf_joint_heads",
            "only SPARF",
        ),
        (
            pb::AttendRequest {
                sequences: vec![pb::AttendSequence {
                    last_block_tokens: 17,
                    ..seq(vec![kb(0)], q.clone())
                }],
                ..good()
            },
            inv,
            "sequences[0].last_block_tokens",
            "above the layout's 16 tokens per block",
        ),
        (
            // The stored last block holds 7 tokens.
            pb::AttendRequest {
                sequences: vec![pb::AttendSequence {
                    last_block_tokens: 9,
                    ..seq((0..4).map(kb).collect(), q.clone())
                }],
                ..good()
            },
            inv,
            "sequences[0].last_block_tokens",
            "holds 7 tokens",
        ),
        (
            pb::AttendRequest {
                namespace_id: ns_fp8.0,
                ..good()
            },
            inv,
            "namespace_id",
            "fp8",
        ),
        (
            pb::AttendRequest {
                namespace_id: ns_mla.0,
                ..good()
            },
            inv,
            "namespace_id",
            "MLA",
        ),
    ];
    for (i, (r, code, field, says)) in cases.into_iter().enumerate() {
        println!("case {i}: {field}");
        assert_status(call(r).await, code, field, says);
        assert_eq!(
            snapshot(&mut c).await,
            before,
            "case {i} ({field}) changed nothing"
        );
    }
    d.stop().await;
}

/// Blocks evicted to NVMe (small DRAM): the same answer as from DRAM,
/// only the layer's 4 KiB-aligned ranges read and counted, nothing
/// promoted; whole records without summaries; and after a restart, with no
/// layout registered again, abstracts come back and Attend still serves.
#[tokio::test]
async fn attend_over_blocks_on_nvme_reads_only_the_layer() {
    let small = |c: &mut stratad::config::Config| {
        c.tiers.dram.bytes = ByteSize(1 << 20);
        c.tiers.nvme.bytes = ByteSize(64 << 20);
        c.tiers.nvme.write_through = true;
        c.tiers.nvme.engine = "psync".into();
    };
    let n = 2048;
    let blocks = n / TPB;
    let kv = Kv::random(n, 12);
    let q = queries(13);
    let all: Vec<usize> = (0..n).collect();
    let (o_ref, _) = kv.reference(1, &q, scale(), &all);
    let mut d = start(small).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    put(&mut c, ns, &kv, 1, 0..blocks, None).await;
    let keys = chain(1, blocks);
    // Wait for DRAM to shed down to its watermarks (write-through: every
    // block has its NVMe copy already).
    let mut on_nvme = 0;
    for _ in 0..500 {
        let l = c.lookup(ns, &keys, 0).await.unwrap();
        assert_eq!(l.hits, blocks);
        on_nvme = l.tiers.iter().filter(|t| **t == TierKind::Nvme).count();
        if on_nvme >= blocks / 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(on_nvme >= blocks / 2, "{on_nvme} blocks on NVMe");
    let out = attend1(&mut c, &request(ns, 1, AttendMode::Dense, keys.clone(), &q)).await;
    let e = relerr(&out.o, &o_ref);
    assert!(e <= 5e-4, "relerr {e}");
    let nb = out.read_blocks(TierKind::Nvme) as u64;
    assert!(nb as usize >= on_nvme / 2, "{nb} blocks read from NVMe");
    assert_eq!(nb + out.read_blocks(TierKind::Dram) as u64, blocks as u64);
    // A record is a header page + 16 KiB (format v2: the payload at byte
    // 4096): layer 1's K and V span payload [8 KiB, 16 KiB), exactly 2
    // pages on disk: 100% of the layer's bytes (v1 records read 3 pages).
    assert_eq!(out.read_bytes(TierKind::Nvme), nb * LAYER_BYTES);
    // Nothing was promoted for Attend.
    let l = c.lookup(ns, &keys, 0).await.unwrap();
    assert!(l.tiers.iter().filter(|t| **t == TierKind::Nvme).count() + 8 >= on_nvme);
    for mode in [
        AttendMode::Sparse(SparseBudget::Default),
        AttendMode::Sparf {
            channels: None,
            tokens: None,
            by_token: false,
            mean_correction: false,
            joint_heads: false,
        },
    ] {
        let out = attend1(&mut c, &request(ns, 1, mode, keys.clone(), &q)).await;
        assert!(out.read_bytes(TierKind::Nvme) > 0, "{mode:?}");
    }
    let dense_nvme = out.o.clone();
    // A batch mixing this chain (read wave by wave from NVMe) with a short
    // one held in DRAM (computed in the DRAM pool): each answer is its
    // sequence's alone, in request order.
    let short = Kv::random(4 * TPB, 14);
    put(&mut c, ns, &short, 2, 0..4, None).await;
    let l = c.lookup(ns, &chain(2, 4), 0).await.unwrap();
    assert!(
        l.tiers.iter().all(|t| *t == TierKind::Dram),
        "{:?}",
        l.tiers
    );
    let q2 = queries(15);
    let mut mixed = request(ns, 1, AttendMode::Dense, keys.clone(), &q);
    mixed.sequences.push(AttendSequence {
        chain: Chain::Keys(chain(2, 4)),
        last_block_tokens: None,
        queries: q2.clone(),
    });
    let both = c.attend(&mixed).await.unwrap();
    let one = attend1(&mut c, &request(ns, 1, AttendMode::Dense, keys.clone(), &q)).await;
    let two = attend1(&mut c, &request(ns, 1, AttendMode::Dense, chain(2, 4), &q2)).await;
    assert!(both[0].read_blocks(TierKind::Nvme) > 0);
    assert_eq!(both[1].read_blocks(TierKind::Dram), 4);
    for (b, a) in both.iter().zip([&one, &two]) {
        assert_eq!((&b.o, &b.lse, &b.covered), (&a.o, &a.lse, &a.covered));
    }
    assert_eq!(both[0].keys_present as usize, blocks);
    // After a restart: the layout comes back from disk (no RegisterLayout),
    // every block has its abstract again, and the answer is the same.
    let mut c = d.restart(small).await;
    let s = c.stats().await.unwrap();
    assert_eq!(s.abstract_blocks, blocks as u64 + 4, "both chains'");
    let out = attend1(&mut c, &request(ns, 1, AttendMode::Dense, keys.clone(), &q)).await;
    assert_eq!(out.o, dense_nvme, "same answer after the restart");
    // The parents are known again (recovery links them from the records):
    // the chain by its tail too.
    let mut by_tail = request(ns, 1, AttendMode::Dense, vec![], &q);
    by_tail.sequences[0].chain = Chain::Tail {
        tail: keys[blocks - 1],
        blocks: blocks as u32,
    };
    let t = attend1(&mut c, &by_tail).await;
    assert_eq!(
        (t.keys_present as usize, &t.o),
        (blocks, &dense_nvme),
        "by tail after the restart"
    );
    assert_eq!(
        out.read_blocks(TierKind::Nvme) as usize,
        blocks,
        "all on NVMe after restart"
    );
    let sp = attend1(
        &mut c,
        &request(
            ns,
            1,
            AttendMode::Sparse(SparseBudget::Default),
            keys.clone(),
            &q,
        ),
    )
    .await;
    assert!(sp.abstract_bytes > 0 && !sp.exact);
    d.stop().await;

    // Without abstracts: whole records are read (and verified by the tier).
    let d = start(|c| {
        small(c);
        c.compute.abstracts = false;
    })
    .await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    put(&mut c, ns, &kv, 1, 0..blocks, None).await;
    for _ in 0..500 {
        let l = c.lookup(ns, &keys, 0).await.unwrap();
        if l.tiers.iter().filter(|t| **t == TierKind::Nvme).count() >= blocks / 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = attend1(&mut c, &request(ns, 1, AttendMode::Dense, keys.clone(), &q)).await;
    assert_eq!(out.o, dense_nvme, "same answer without abstracts");
    let nb = out.read_blocks(TierKind::Nvme) as u64;
    assert!(nb > 0);
    assert_eq!(out.read_bytes(TierKind::Nvme), nb * 20480, "whole records");
    assert_eq!(c.stats().await.unwrap().abstract_blocks, 0);
    d.stop().await;
}

/// The abstracts' memory is reported (metrics and Stats) and bounded.
#[tokio::test]
async fn abstract_memory_is_accounted() {
    let d = start(|_| {}).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    let kv = Kv::random(512, 14);
    put(&mut c, ns, &kv, 1, 0..32, None).await;
    let s = c.stats().await.unwrap();
    // Per block: 2 layers x (2 x 8 bytes of checksums + 2 KV heads x 64 x
    // min/max f16), rounded to 64 bytes.
    let entry = (LAYERS * 16 + 2 * LAYERS * KV * D * 2).next_multiple_of(64) as u64;
    assert_eq!(s.abstract_blocks, 32);
    assert_eq!(s.abstract_bytes, 32 * entry);
    // 32 MiB of DRAM + 4 GiB of NVMe, a sixteenth.
    assert_eq!(s.abstract_capacity_bytes, ((32 << 20) + (4u64 << 30)) / 16);
    let (_, body) = http_get(d.metrics, "/metrics").await;
    assert!(
        body.contains(&format!("strata_attend_abstract_bytes {}", 32 * entry)),
        "{body}"
    );
    c.delete(ns, &chain(1, 32)).await.unwrap();
    let s = c.stats().await.unwrap();
    assert_eq!((s.abstract_blocks, s.abstract_bytes), (0, 0));
    d.stop().await;
}

/// Leaves of 8 tokens (`compute.leaf_tokens = 8`, two per block).
fn leaves(level: &'static str) -> impl FnOnce(&mut stratad::config::Config) {
    move |c| {
        c.compute.leaf_tokens = 8;
        c.compute.leaf_level = level.into();
    }
}

/// Distinct blocks a covered set touches.
fn blocks_of(covered: &[Range<u64>]) -> usize {
    let mut b: Vec<u64> = covered
        .iter()
        .flat_map(|r| r.start / TPB as u64..r.end.div_ceil(TPB as u64))
        .collect();
    b.dedup();
    b.len()
}

fn tokens_in(covered: &[Range<u64>]) -> Vec<usize> {
    covered
        .iter()
        .flat_map(|r| r.start as usize..r.end as usize)
        .collect()
}

/// Whether a covered set has a piece of a block that is not the whole
/// block (a range edge inside a block).
fn has_half_blocks(covered: &[Range<u64>]) -> bool {
    covered
        .iter()
        .any(|r| r.start % TPB as u64 != 0 || r.end % TPB as u64 != 0)
}

/// Strong keys planted in the second leaf of their blocks, one per query
/// head's direction, on layer 1.
const PLANTED: [usize; 4] = [300, 1003, 1500, 1811];

fn planted_kv(n: usize, seed: u64, q: &[f32]) -> Kv {
    let mut kv = Kv::random(n, seed);
    for (j, &t) in PLANTED.iter().enumerate() {
        let h = j / (HEADS / KV);
        kv.plant(1, t, h, &q[j * D..(j + 1) * D], 10.0);
    }
    kv
}

/// SPARSE at 8-token leaves reads exactly the chosen leaves (the DRAM
/// bytes reported are the covered tokens' K and V rows, the blocks those
/// they touch), covers them, reads every leaf's abstract, and answers the
/// exact partial over what it covered. At the block level the same
/// summaries rank by the union of the leaves' boxes: the same choice and
/// answer as a daemon keeping one box per block.
#[tokio::test]
async fn sparse_at_leaf_level_reads_and_covers_exactly_the_chosen_leaves() {
    let n = 2048;
    let blocks = n / TPB;
    let q = queries(31);
    let kv = planted_kv(n, 30, &q);
    let keys = chain(1, blocks);
    let budget = 96u32;
    let row = (2 * KV * D * 2) as u64;
    let mut answers = Vec::new();
    for level in ["leaf", "block", "whole-block summaries"] {
        let d = match level {
            "leaf" => start(leaves("leaf")).await,
            "block" => start(leaves("block")).await,
            _ => start(|_| {}).await,
        };
        let mut c = d.tcp_client().await;
        let ns = c.register_layout(&layout()).await.unwrap().namespace;
        put(&mut c, ns, &kv, 1, 0..blocks, None).await;
        let out = attend1(
            &mut c,
            &request(
                ns,
                1,
                AttendMode::Sparse(SparseBudget::Tokens(budget)),
                keys.clone(),
                &q,
            ),
        )
        .await;
        let unit = if level == "leaf" { 8 } else { TPB as u64 };
        let attended: u64 = out.covered.iter().map(|r| r.end - r.start).sum();
        assert_eq!(attended, out.tokens_attended, "{level}");
        assert!(
            out.tokens_attended >= budget as u64 && out.tokens_attended < budget as u64 + unit,
            "{level}: {} tokens",
            out.tokens_attended
        );
        assert!(
            out.covered
                .iter()
                .all(|r| r.start % unit == 0 && r.end % unit == 0),
            "{level}: {:?}",
            out.covered
        );
        assert_eq!(
            has_half_blocks(&out.covered),
            level == "leaf",
            "{:?}",
            out.covered
        );
        assert!(out.sink_included && out.recent_included && !out.exact);
        assert_eq!(out.covered[0].start, 0);
        assert!(out.covered[0].end >= TPB as u64, "the whole sink block");
        assert_eq!(out.covered.last().unwrap().end, n as u64);
        for t in PLANTED {
            assert!(
                out.covered.iter().any(|r| r.contains(&(t as u64))),
                "{level}: strong key {t} covered"
            );
        }
        // Exactly the chosen leaves' K and V rows were read and verified.
        assert_eq!(
            out.read_bytes(TierKind::Dram),
            out.tokens_attended * row,
            "{level}"
        );
        assert_eq!(
            out.read_blocks(TierKind::Dram) as usize,
            blocks_of(&out.covered)
        );
        let leaves_per_block = if level == "whole-block summaries" {
            1
        } else {
            2
        };
        assert_eq!(
            out.abstract_bytes,
            (blocks * leaves_per_block * 2 * KV * D * 2) as u64,
            "{level}"
        );
        // The exact partial over the covered tokens.
        let (o, lse) = kv.reference(1, &q, scale(), &tokens_in(&out.covered));
        assert!(
            relerr(&out.o, &o) <= 5e-4,
            "{level}: {}",
            relerr(&out.o, &o)
        );
        for (a, b) in out.lse.iter().zip(&lse) {
            assert!(
                (*a as f64 - b).abs() <= 1e-3 * (1.0 + b.abs()),
                "{a} vs {b}"
            );
        }
        let (_, body) = http_get(d.metrics, "/metrics").await;
        let leaf_line = "strata_attend_sparse_level_total{level=\"leaf\"} 1";
        assert_eq!(body.contains(leaf_line), level == "leaf", "{level}");
        answers.push(out);
        d.stop().await;
    }
    // Block level over leaf summaries == one box per block.
    assert_eq!(answers[1].covered, answers[2].covered);
    assert_eq!(answers[1].o, answers[2].o);
    assert_eq!(answers[1].lse, answers[2].lse);
    // At the same budget the leaves spend it on more distinct blocks.
    assert!(blocks_of(&answers[0].covered) > blocks_of(&answers[1].covered));
}

/// Flips one byte of layer 1's K or V rows of token `t` (head 0) in the
/// DRAM copy of block `t / TPB`.
fn corrupt(d: &TestDaemon, ns: NamespaceId, keys: &[BlockKey], t: usize, tensor: usize) {
    let store = &d.running.as_ref().unwrap().store;
    let b = t / TPB;
    let pin = store.pin_chain(ns, &keys[b..b + 1]).unwrap();
    let addr = pin.blocks[0].dram.expect("a DRAM copy");
    // Payload: per layer K then V, [token][head][d] f16.
    let tensor_bytes = TPB * KV * D * 2;
    let at = (2 + tensor) * tensor_bytes + (t % TPB) * KV * D * 2 + 6;
    let byte = unsafe { store.dram().slice_mut(addr + at as u64, 1) };
    byte[0] ^= 0x40;
}

/// A leaf that fails its checksum is never served: a corrupt leaf that is
/// not read changes nothing (its sibling is verified on its own sums); a
/// corrupt chosen leaf ends the covered prefix before its block, counted
/// as a checksum failure, and the answer is the exact partial over what
/// is left.
#[tokio::test]
async fn sparse_never_serves_a_corrupt_leaf() {
    let n = 2048;
    let blocks = n / TPB;
    let q = queries(31);
    let kv = planted_kv(n, 30, &q);
    let keys = chain(1, blocks);
    let d = start(leaves("leaf")).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    put(&mut c, ns, &kv, 1, 0..blocks, None).await;
    let req = request(
        ns,
        1,
        AttendMode::Sparse(SparseBudget::Tokens(96)),
        keys.clone(),
        &q,
    );
    let before = attend1(&mut c, &req).await;
    let covered = |t: usize| before.covered.iter().any(|r| r.contains(&(t as u64)));
    // A planted key whose block was read in part (its first leaf not).
    let t = *PLANTED
        .iter()
        .find(|&&t| covered(t) && !covered(t / TPB * TPB))
        .expect("a block read in part");
    let sibling = t / TPB * TPB + 2;
    corrupt(&d, ns, &keys, sibling, 0);
    let same = attend1(&mut c, &req).await;
    assert_eq!(same.covered, before.covered);
    assert_eq!(
        (same.o.clone(), same.lse.clone()),
        (before.o.clone(), before.lse.clone())
    );
    assert_eq!(same.keys_present as usize, blocks);
    let failures = d.running.as_ref().unwrap().store.stats().checksum_failures;
    // Now the chosen leaf itself (its V rows).
    corrupt(&d, ns, &keys, t, 1);
    let cut = attend1(&mut c, &req).await;
    let b = t / TPB;
    assert_eq!(
        cut.keys_present as usize, b,
        "the prefix ends at the corrupt block"
    );
    assert!(cut.covered.iter().all(|r| r.end <= (b * TPB) as u64));
    assert!(!cut.recent_included);
    assert_eq!(
        d.running.as_ref().unwrap().store.stats().checksum_failures,
        failures + 1
    );
    let (o, _) = kv.reference(1, &q, scale(), &tokens_in(&cut.covered));
    assert!(relerr(&cut.o, &o) <= 5e-4, "{}", relerr(&cut.o, &o));
    d.stop().await;
}

/// SPARSE sequences ranked at the leaf level so far (the metric).
async fn leaf_calls(d: &TestDaemon) -> u64 {
    let (_, body) = http_get(d.metrics, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix("strata_attend_sparse_level_total{level=\"leaf\"} "))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The adaptive level: a layer whose attention is skewed (strong keys
/// aligned with the queries) goes to the leaves after one observation;
/// a flat layer (random keys) stays at whole blocks; the skewed layer
/// with flat queries (all zero: every score equal) goes back to blocks
/// after a few calls (hysteresis), and not after one.
#[tokio::test]
async fn adaptive_leaves_follow_the_layers_skew() {
    let n = 4096;
    let blocks = n / TPB;
    let q = queries(41);
    let mut kv = Kv::random(n, 40);
    for (j, t) in [
        (0usize, 333usize),
        (1, 1201),
        (2, 2050),
        (3, 3999),
        (0, 2999),
        (2, 777),
    ] {
        let h = j / (HEADS / KV);
        kv.plant(1, t, h, &q[j * D..(j + 1) * D], 10.0);
    }
    let keys = chain(1, blocks);
    let d = start(leaves("adaptive")).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    put(&mut c, ns, &kv, 1, 0..blocks, None).await;
    let sparse = |layer: u32, q: &[f32]| {
        request(
            ns,
            layer,
            AttendMode::Sparse(SparseBudget::Default),
            keys.clone(),
            q,
        )
    };
    // Not learned yet: blocks; then the skewed layer 1 ranks leaves.
    let first = attend1(&mut c, &sparse(1, &q)).await;
    assert!(!has_half_blocks(&first.covered));
    for _ in 0..3 {
        let out = attend1(&mut c, &sparse(1, &q)).await;
        assert!(has_half_blocks(&out.covered), "{:?}", out.covered);
    }
    // The flat layer 0 stays at blocks.
    for _ in 0..5 {
        let out = attend1(&mut c, &sparse(0, &q)).await;
        assert!(!has_half_blocks(&out.covered), "{:?}", out.covered);
    }
    // Flat queries on layer 1: leaves for a few calls, then blocks (the
    // level is read from the metric: with every bound equal, the chosen
    // leaves pair up into whole blocks).
    let zero = vec![0f32; HEADS * D];
    let mut calls = 0;
    loop {
        let before = leaf_calls(&d).await;
        attend1(&mut c, &sparse(1, &zero)).await;
        if leaf_calls(&d).await == before {
            break;
        }
        calls += 1;
        assert!(calls < 20, "never went back to blocks");
    }
    assert!(
        calls >= 2,
        "one flat call switched the level back ({calls})"
    );
    let out = attend1(&mut c, &sparse(1, &q)).await;
    assert!(!has_half_blocks(&out.covered));
    d.stop().await;
}

/// SPARSE at 8-token leaves over blocks on NVMe: the pages covering the
/// chosen leaves' K and V ranges are read (never more than the layer's
/// three pages per block, 8 KiB for a first leaf), verified leaf by leaf,
/// and the answer is the exact partial over the covered leaves.
#[tokio::test]
async fn sparse_leaves_on_nvme_read_the_pages_covering_them() {
    let n = 2048;
    let blocks = n / TPB;
    let q = queries(31);
    let kv = planted_kv(n, 30, &q);
    let keys = chain(1, blocks);
    let d = start(|c| {
        c.tiers.dram.bytes = ByteSize(1 << 20);
        c.tiers.nvme.bytes = ByteSize(64 << 20);
        c.tiers.nvme.write_through = true;
        c.tiers.nvme.engine = "psync".into();
        leaves("leaf")(c);
    })
    .await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    put(&mut c, ns, &kv, 1, 0..blocks, None).await;
    for _ in 0..500 {
        let l = c.lookup(ns, &keys, 0).await.unwrap();
        if l.tiers.iter().filter(|t| **t == TierKind::Nvme).count() >= blocks * 3 / 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = attend1(
        &mut c,
        &request(
            ns,
            1,
            AttendMode::Sparse(SparseBudget::Tokens(96)),
            keys,
            &q,
        ),
    )
    .await;
    assert!(has_half_blocks(&out.covered), "{:?}", out.covered);
    assert_eq!(out.keys_present as usize, blocks);
    let nb = out.read_blocks(TierKind::Nvme) as u64;
    assert!(nb > 0);
    assert!(out.read_bytes(TierKind::Nvme) <= nb * 12288);
    assert!(out.read_bytes(TierKind::Nvme) >= nb * 8192);
    let (o, _) = kv.reference(1, &q, scale(), &tokens_in(&out.covered));
    assert!(relerr(&out.o, &o) <= 5e-4, "{}", relerr(&out.o, &o));
    d.stop().await;
}

/// Leaves change nothing for DENSE and SPARF: with key sketches on, a
/// daemon with 8-token leaves answers DENSE and SPARF (sketch scoring, the
/// mean-value correction from the V sums) exactly as one keeping one box
/// per block, reading the same bytes; only the abstracts grow (two boxes
/// per block and layer).
#[tokio::test]
async fn dense_and_sparf_answers_do_not_depend_on_leaves() {
    let n = 2048;
    let blocks = n / TPB;
    let q = queries(51);
    let kv = planted_kv(n, 50, &q);
    let keys = chain(1, blocks);
    let modes = [
        AttendMode::Dense,
        AttendMode::Sparf {
            channels: None,
            tokens: None,
            by_token: false,
            mean_correction: false,
            joint_heads: false,
        },
        AttendMode::Sparf {
            channels: None,
            tokens: None,
            by_token: true,
            mean_correction: true,
            joint_heads: false,
        },
    ];
    let mut answers = Vec::new();
    for leaf_tokens in [0, 8] {
        let d = start(|c| {
            c.compute.key_sketch = true;
            c.compute.leaf_tokens = leaf_tokens;
        })
        .await;
        let mut c = d.tcp_client().await;
        let ns = c.register_layout(&layout()).await.unwrap().namespace;
        put(&mut c, ns, &kv, 1, 0..blocks, None).await;
        let mut outs = Vec::new();
        for mode in modes {
            outs.push(attend1(&mut c, &request(ns, 1, mode, keys.clone(), &q)).await);
        }
        let s = c.stats().await.unwrap();
        // Per block: sums (16 bytes per layer and leaf), min/max per layer,
        // KV head and leaf, then the sketch section (V sums and codes).
        let leaves = if leaf_tokens == 8 { 2 } else { 1 };
        let entry = LAYERS * leaves * 16
            + 2 * LAYERS * KV * leaves * D * 2
            + LAYERS * KV * D * 4
            + LAYERS * KV * D * TPB;
        assert_eq!(
            s.abstract_bytes,
            (blocks * entry.next_multiple_of(64)) as u64
        );
        answers.push(outs);
        d.stop().await;
    }
    for (m, (a, b)) in modes.iter().zip(answers[0].iter().zip(&answers[1])) {
        assert_eq!(a.o, b.o, "{m:?}");
        assert_eq!(a.lse, b.lse, "{m:?}");
        assert_eq!(a.covered, b.covered, "{m:?}");
        assert_eq!(a.head_covered, b.head_covered, "{m:?}");
        assert_eq!(a.mean_corrected, b.mean_corrected, "{m:?}");
        assert_eq!(
            a.read_bytes(TierKind::Dram),
            b.read_bytes(TierKind::Dram),
            "{m:?}"
        );
        assert_eq!(
            a.abstract_bytes, b.abstract_bytes,
            "{m:?}: sketch rows and V sums"
        );
    }
    assert!(answers[0][2].mean_corrected, "the correction was applied");
}

/// Head dimension of the §2 generator's heads.
const D128: usize = 128;

/// One §2 KV head (`strata-testdata`, the bench's seed, 4 query heads),
/// K and V rounded to f16 as stored.
fn section2_head(
    regime: strata_testdata::Regime,
    n: usize,
    seed: u64,
) -> strata_testdata::HeadData {
    let mut cfg = strata_testdata::Config::new(regime, n, seed);
    cfg.query_heads = 4;
    cfg.train_queries = 0;
    let mut h = strata_testdata::Generator::new(cfg)
        .unwrap()
        .generate()
        .data;
    let round = |x: &mut Vec<f32>| x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32());
    round(&mut h.keys);
    round(&mut h.values);
    h
}

/// One layer, one KV head of d = 128, f16.
fn section2_layout(regime: strata_testdata::Regime) -> Layout {
    Layout {
        model_id: format!("attend/quality/{}", regime.name()),
        dtype: Dtype::F16,
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: D128 as u32,
        tokens_per_block: TPB as u32,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

/// The heads' blocks under `keys`, chained: per block the K rows then the
/// V rows, `[token][kv_head][d]` f16.
fn section2_puts(heads: &[strata_testdata::HeadData], keys: &[BlockKey]) -> Vec<PutBlock> {
    (0..keys.len())
        .map(|b| {
            let mut data = Vec::with_capacity(2 * TPB * heads.len() * D128 * 2);
            for tensor in 0..2 {
                for t in b * TPB..(b + 1) * TPB {
                    for h in heads {
                        let x = if tensor == 0 { &h.keys } else { &h.values };
                        for v in &x[t * D128..(t + 1) * D128] {
                            data.extend_from_slice(&f16::from_f32(*v).to_le_bytes());
                        }
                    }
                }
            }
            PutBlock {
                key: keys[b],
                parent: (b > 0).then(|| keys[b - 1]),
                data: Bytes::from(data),
            }
        })
        .collect()
}

/// A daemon with SPARF's two-stage choice (the default) and one with a
/// single stage (`sparf_candidates = 0`), key sketches on in both.
async fn sparf_stage_pair() -> (TestDaemon, TestDaemon) {
    let two = start(|c| c.compute.key_sketch = true).await;
    let one = start(|c| {
        c.compute.key_sketch = true;
        c.compute.sparf_candidates = 0;
    })
    .await;
    (two, one)
}

/// Registers `layout` on each client and stores `puts` there; the
/// namespaces, in client order.
async fn put_to_each(cs: &mut [Client], layout: &Layout, puts: &[PutBlock]) -> Vec<NamespaceId> {
    let mut ns = Vec::new();
    for c in cs {
        let id = c.register_layout(layout).await.unwrap().namespace;
        for part in puts.chunks(256) {
            c.put(id, part).await.unwrap();
        }
        ns.push(id);
    }
    ns
}

/// SPARF's two-stage block choice (`compute.sparf_candidates`, the
/// default 3) against the one-stage r-channel ranking (0), on the §2
/// generator's heads at 4K (the bench's seed and steps, key sketches on):
/// in both regimes it keeps at least the mass of one stage (on needle
/// heads far more: their needles stand out in many channels, not in the
/// r of `|q|`), reads exactly the K and V of k/16 blocks, as one stage
/// does, and reports the summary bytes its ranking read: both bounds of
/// every channel of every block, and every code row of 3 × k/16 candidates.
#[tokio::test]
async fn sparf_two_stage_keeps_more_mass_for_the_same_tier_bytes() {
    use strata_testdata::Regime;
    use strata_testdata::metrics::Exact;
    const STEPS: usize = 8;
    let (two, one) = sparf_stage_pair().await;
    let mut cs = [two.tcp_client().await, one.tcp_client().await];
    let n = 4096;
    let blocks = n / TPB;
    let k_blocks = n / 16 / TPB;
    let block_bytes = (2 * TPB * D128 * 2) as u64;
    let sparf = AttendMode::Sparf {
        channels: None,
        tokens: None,
        by_token: false,
        mean_correction: false,
        joint_heads: false,
    };
    for regime in [Regime::Semantic, Regime::Needle] {
        let h = section2_head(regime, n, 1);
        let keys: Vec<BlockKey> = (0..blocks).map(|b| key(9, b)).collect();
        let puts = section2_puts(std::slice::from_ref(&h), &keys);
        let ns = put_to_each(&mut cs, &section2_layout(regime), &puts).await;
        let mut mass = [0f64; 2];
        for s in 0..STEPS {
            let step = s * h.steps() / STEPS;
            let ex: Vec<Exact> = (0..h.heads)
                .map(|g| Exact::new(h.decode_query(step, g), &h.keys, &h.values, h.scale))
                .collect();
            for (i, (c, &id)) in cs.iter_mut().zip(&ns).enumerate() {
                let req = AttendRequest {
                    io_dtype: IoDtype::F32,
                    min_precision: Precision::Stored,
                    namespace: id,
                    layer: 0,
                    mode: sparf,
                    scale: None,
                    sequences: vec![AttendSequence {
                        chain: Chain::Keys(keys.clone()),
                        last_block_tokens: None,
                        queries: h.decode_group(step).to_vec(),
                    }],
                };
                let out = attend1(c, &req).await;
                let set: Vec<u32> = tokens_in(&out.head_covered[0])
                    .into_iter()
                    .map(|t| t as u32)
                    .collect();
                assert_eq!(set.len(), n / 16, "k tokens, whole blocks");
                assert_eq!(out.read_blocks(TierKind::Dram) as usize, k_blocks);
                assert_eq!(
                    out.read_bytes(TierKind::Dram),
                    k_blocks as u64 * block_bytes
                );
                let summary = if i == 0 {
                    blocks * 4 * D128 + 3 * k_blocks * D128 * TPB
                } else {
                    let r = D128 / 8;
                    blocks * (r * TPB + 4 * r)
                };
                assert_eq!(out.abstract_bytes as usize, summary);
                mass[i] += ex.iter().map(|e| e.mass(&set)).sum::<f64>();
            }
        }
        let k = (STEPS * h.heads) as f64;
        let (m2, m1) = (mass[0] / k, mass[1] / k);
        println!(
            "{}: two-stage mass {m2:.3}, one stage {m1:.3}",
            regime.name()
        );
        assert!(m2 >= m1, "{}: {m2} < {m1}", regime.name());
    }
    two.stop().await;
    one.stop().await;
}

/// The two-stage choice with `sparf_joint_heads` (one set for the layer)
/// on two independent §2 KV heads (seeds 1 and 2, the bench's
/// `heads_choice` data at 4K): in both regimes at least the mass of the
/// one-stage joint choice (the union of each head's candidates, each head
/// rescored on all of them), one set for both heads, k tokens of whole
/// blocks, and exactly their K and V read.
#[tokio::test]
async fn sparf_two_stage_joint_keeps_more_mass() {
    use strata_testdata::Regime;
    use strata_testdata::metrics::Exact;
    const STEPS: usize = 8;
    let (two, one) = sparf_stage_pair().await;
    let mut cs = [two.tcp_client().await, one.tcp_client().await];
    let (n, kvh, g) = (4096, 2, 4);
    let blocks = n / TPB;
    let joint = AttendMode::Sparf {
        channels: None,
        tokens: None,
        by_token: false,
        mean_correction: false,
        joint_heads: true,
    };
    for regime in [Regime::Semantic, Regime::Needle] {
        let heads: Vec<_> = (1..=kvh as u64)
            .map(|seed| section2_head(regime, n, seed))
            .collect();
        let mut l = section2_layout(regime);
        l.model_id = format!("attend/quality/joint/{}", regime.name());
        l.num_kv_heads = kvh as u32;
        let keys: Vec<BlockKey> = (0..blocks).map(|b| key(10, b)).collect();
        let puts = section2_puts(&heads, &keys);
        let ns = put_to_each(&mut cs, &l, &puts).await;
        let mut mass = [0f64; 2];
        for s in 0..STEPS {
            let step = s * heads[0].steps() / STEPS;
            let q: Vec<f32> = heads
                .iter()
                .flat_map(|h| h.decode_group(step).to_vec())
                .collect();
            for (i, (c, &id)) in cs.iter_mut().zip(&ns).enumerate() {
                let req = AttendRequest {
                    io_dtype: IoDtype::F32,
                    min_precision: Precision::Stored,
                    namespace: id,
                    layer: 0,
                    mode: joint,
                    scale: None,
                    sequences: vec![AttendSequence {
                        chain: Chain::Keys(keys.clone()),
                        last_block_tokens: None,
                        queries: q.clone(),
                    }],
                };
                let out = attend1(c, &req).await;
                assert_eq!(out.head_covered[0], out.head_covered[1], "one set");
                let set: Vec<u32> = tokens_in(&out.covered)
                    .into_iter()
                    .map(|t| t as u32)
                    .collect();
                assert_eq!(set.len(), n / 16, "k tokens, whole blocks");
                assert_eq!(
                    out.read_bytes(TierKind::Dram),
                    (n / 16 / TPB * 2 * TPB * kvh * D128 * 2) as u64
                );
                for h in &heads {
                    for j in 0..g {
                        let e = Exact::new(h.decode_query(step, j), &h.keys, &h.values, h.scale);
                        mass[i] += e.mass(&set);
                    }
                }
            }
        }
        let k = (STEPS * kvh * g) as f64;
        let (m2, m1) = (mass[0] / k, mass[1] / k);
        println!(
            "{} joint: two-stage mass {m2:.3}, one stage {m1:.3}",
            regime.name()
        );
        assert!(m2 >= m1, "{}: {m2} < {m1}", regime.name());
    }
    two.stop().await;
    one.stop().await;
}

/// COMPUTE.md §3's "adaptive reaches fixed-16-chunk quality with ≤ 0.9× its
/// bytes", on the §2 generator's heads (`strata-testdata`, the bench's
/// seed and steps: semantic at 4K, needle at 16K): once the adaptive
/// daemon has learned the layer (a first pass over the steps), SPARSE at a
/// 4% budget over 8-token leaves keeps at least the mass of SPARSE at 5%
/// over one box per 16-token block, and reads at most 0.9× its bytes.
#[tokio::test]
async fn adaptive_leaves_reach_fixed_16_mass_with_fewer_bytes() {
    use strata_testdata::Regime;
    use strata_testdata::metrics::Exact;
    const STEPS: usize = 8;
    let fixed = start(|_| {}).await;
    let adaptive = start(leaves("adaptive")).await;
    let mut cf = fixed.tcp_client().await;
    let mut ca = adaptive.tcp_client().await;
    for (regime, n) in [(Regime::Semantic, 4096usize), (Regime::Needle, 16384)] {
        let h = section2_head(regime, n, 1);
        let l = section2_layout(regime);
        let keys: Vec<BlockKey> = (0..n / TPB).map(|b| key(9, b)).collect();
        let puts = section2_puts(std::slice::from_ref(&h), &keys);
        let nsf = cf.register_layout(&l).await.unwrap().namespace;
        let nsa = ca.register_layout(&l).await.unwrap().namespace;
        for part in puts.chunks(256) {
            cf.put(nsf, part).await.unwrap();
            ca.put(nsa, part).await.unwrap();
        }
        let budget4 = (n as f64 * 0.04).ceil() as u32;
        let (mut mf, mut ma, mut bf, mut ba) = (0f64, 0f64, 0u64, 0u64);
        for pass in 0..2 {
            for s in 0..STEPS {
                let step = s * h.steps() / STEPS;
                let q = h.decode_group(step);
                let sparse = |ns, b: SparseBudget| AttendRequest {
                    io_dtype: IoDtype::F32,
                    min_precision: Precision::Stored,
                    namespace: ns,
                    layer: 0,
                    mode: AttendMode::Sparse(b),
                    scale: None,
                    sequences: vec![AttendSequence {
                        chain: Chain::Keys(keys.clone()),
                        last_block_tokens: None,
                        queries: q.to_vec(),
                    }],
                };
                let a = attend1(&mut ca, &sparse(nsa, SparseBudget::Tokens(budget4))).await;
                if pass == 0 {
                    continue; // learning the layer
                }
                let f = attend1(&mut cf, &sparse(nsf, SparseBudget::Default)).await;
                let (sf, sa) = (tokens_in(&f.covered), tokens_in(&a.covered));
                let (sf, sa): (Vec<u32>, Vec<u32>) = (
                    sf.iter().map(|&t| t as u32).collect(),
                    sa.iter().map(|&t| t as u32).collect(),
                );
                for g in 0..h.heads {
                    let ex = Exact::new(h.decode_query(step, g), &h.keys, &h.values, h.scale);
                    mf += ex.mass(&sf);
                    ma += ex.mass(&sa);
                }
                bf += f.read_bytes(TierKind::Dram);
                ba += a.read_bytes(TierKind::Dram);
            }
        }
        let k = (STEPS * h.heads) as f64;
        let (mf, ma) = (mf / k, ma / k);
        println!(
            "{}: fixed 16 at 5% mass {mf:.3}, adaptive at 4% {ma:.3}, bytes {:.2}x",
            regime.name(),
            ba as f64 / bf as f64
        );
        assert!(
            ma >= mf,
            "{}: adaptive mass {ma} < fixed {mf}",
            regime.name()
        );
        assert!(
            ba as f64 <= 0.9 * bf as f64,
            "{}: {ba} vs {bf} bytes",
            regime.name()
        );
    }
    assert!(
        leaf_calls(&adaptive).await >= STEPS as u64,
        "learned the leaf level"
    );
    fixed.stop().await;
    adaptive.stop().await;
}

/// Which of `keys`' blocks have a DRAM copy, asked without touching them
/// (a pin that does not count as an access, dropped at once).
fn in_dram(d: &TestDaemon, ns: NamespaceId, keys: &[BlockKey]) -> Vec<bool> {
    let store = &d.running.as_ref().unwrap().store;
    let pin = store.pin_chain_with(ns, keys, false).unwrap();
    assert_eq!(pin.blocks.len(), keys.len(), "every block is stored");
    pin.blocks.iter().map(|b| b.dram.is_some()).collect()
}

/// Eight blocks of which block 0 holds, for every query head, a key along
/// its query: nearly all of the layer's attention is there.
fn hot_first_block(seed: u64, q: &[f32]) -> Kv {
    let mut kv = Kv::random(8 * TPB, seed);
    for j in 0..HEADS {
        kv.plant(1, 1 + j, j / (HEADS / KV), &q[j * D..(j + 1) * D], 10.0);
    }
    kv
}

/// `compute.hotness` (COMPUTE.md §3): an Attend answer counts as an access
/// only for the blocks that carried attention. Chain A (stored first,
/// attention all in its block 0) and chain B (stored after it, never
/// attended): after a DENSE Attend over A, filling DRAM evicts A's cold
/// tail before anything of B, and A's block 0 stays. With hotness off the
/// Attend touches all of A, so B's tail goes first. After a restart (every
/// block NVMe-only), an Attend over A promotes its hot block 0 into DRAM
/// in the background and leaves the cold ones on NVMe.
#[tokio::test]
async fn attention_decides_what_attend_keeps_warm() {
    for hotness in [true, false] {
        let small = move |c: &mut stratad::config::Config| {
            c.tiers.dram.bytes = ByteSize(1 << 20);
            c.tiers.nvme.bytes = ByteSize(64 << 20);
            c.tiers.nvme.write_through = true;
            c.tiers.nvme.engine = "psync".into();
            c.compute.hotness = hotness;
        };
        let mut d = start(small).await;
        let mut c = d.tcp_client().await;
        let ns = c.register_layout(&layout()).await.unwrap().namespace;
        let q = queries(61);
        let a = hot_first_block(60, &q);
        let b = Kv::random(8 * TPB, 62);
        put(&mut c, ns, &a, 1, 0..8, None).await;
        put(&mut c, ns, &b, 2, 0..8, None).await;
        let (ka, kb) = (chain(1, 8), chain(2, 8));
        let out = attend1(&mut c, &request(ns, 1, AttendMode::Dense, ka.clone(), &q)).await;
        assert_eq!(out.keys_present, 8);
        // Fill DRAM with a third chain, a block at a time, until the first
        // A or B block loses its DRAM copy (a shed takes ~3 blocks).
        let filler = Kv::random(64 * TPB, 63);
        let store = d.running.as_ref().unwrap().store.clone();
        let evictions = || store.stats().tiers[0].evictions;
        let mut next = 0;
        while next < 64 && evictions() == 0 {
            put(&mut c, ns, &filler, 3, next..next + 1, None).await;
            next += 1;
        }
        assert!(evictions() > 0, "DRAM never filled");
        let (da, db) = (in_dram(&d, ns, &ka), in_dram(&d, ns, &kb));
        let ea: Vec<usize> = (0..8).filter(|&i| !da[i]).collect();
        let eb: Vec<usize> = (0..8).filter(|&i| !db[i]).collect();
        if hotness {
            assert!(eb.is_empty(), "B was evicted ({eb:?}) before A's cold tail");
            assert!(!ea.is_empty() && !ea.contains(&0), "A evicted: {ea:?}");
            assert_eq!(*ea.last().unwrap(), 7, "A's tail goes first: {ea:?}");
            // Further: the rest of A's cold blocks, then B's tail, while
            // A's hot block 0 (older than all of B, but touched) stays.
            while next < 64 && in_dram(&d, ns, &kb)[7] {
                put(&mut c, ns, &filler, 3, next..next + 1, None).await;
                next += 1;
            }
            let da = in_dram(&d, ns, &ka);
            assert!(!in_dram(&d, ns, &kb)[7], "B's tail was never evicted");
            assert_eq!(da, [true, false, false, false, false, false, false, false]);
        } else {
            assert!(ea.is_empty(), "A was touched whole, yet {ea:?} went first");
            assert!(eb.contains(&7), "B's tail goes first: {eb:?}");
            d.stop().await;
            continue;
        }

        // After a restart every block is on NVMe only.
        let mut c = d.restart(small).await;
        assert_eq!(in_dram(&d, ns, &ka), vec![false; 8]);
        let again = attend1(&mut c, &request(ns, 1, AttendMode::Dense, ka.clone(), &q)).await;
        assert_eq!(again.read_blocks(TierKind::Nvme), 8);
        assert_eq!(
            (&again.o, &again.lse),
            (&out.o, &out.lse),
            "same answer from NVMe"
        );
        let mut now = vec![];
        for _ in 0..500 {
            now = in_dram(&d, ns, &ka);
            if now[0] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut want = vec![false; 8];
        want[0] = true;
        assert_eq!(now, want, "only the hot block is promoted");
        d.stop().await;
    }
}

/// A counter's value in a Prometheus text page (0 when absent).
fn counter(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Hot NVMe-only blocks are promoted the hottest first, at most
/// `compute.read_wave_bytes` (1 MiB here: 64 blocks of 16 KiB) per
/// background batch, however many the answer found hot.
#[tokio::test]
async fn hot_promotion_is_bounded_per_batch() {
    let cfg = |c: &mut stratad::config::Config| {
        c.tiers.dram.bytes = ByteSize(16 << 20);
        c.tiers.nvme.bytes = ByteSize(64 << 20);
        c.tiers.nvme.write_through = true;
        c.tiers.nvme.engine = "psync".into();
        c.compute.read_wave_bytes = ByteSize(1 << 20);
    };
    let mut d = start(cfg).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    let blocks = 200;
    let kv = Kv::random(blocks * TPB, 70);
    put(&mut c, ns, &kv, 1, 0..blocks, None).await;
    let keys = chain(1, blocks);
    let mut c = d.restart(cfg).await;
    assert!(in_dram(&d, ns, &keys).iter().all(|x| !x));
    let q = queries(71);
    attend1(&mut c, &request(ns, 1, AttendMode::Dense, keys.clone(), &q)).await;
    let (_, m) = http_get(d.metrics, "/metrics").await;
    let hot = counter(&m, "strata_attend_hot_blocks_total");
    assert!(
        hot > 64,
        "{hot} hot blocks: random attention is above even for many"
    );
    assert_eq!(counter(&m, "strata_attend_hot_promoted_total"), 64);
    let mut now = 0;
    for _ in 0..500 {
        now = in_dram(&d, ns, &keys).iter().filter(|x| **x).count();
        if now == 64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(now, 64, "one batch of 1 MiB");
    d.stop().await;
}

/// `min_precision`: a call that allows int8 keeps an int8 copy of each
/// layer it reads from NVMe (compute.quant_bytes), and later such calls
/// compute on the copies instead of reading the device, saying so
/// (quantized_blocks, exact false) and staying close to the exact answer.
/// Calls that do not allow it never see the copies; another layer has
/// none; SPARSE computes its chosen blocks from them too.
#[tokio::test]
async fn quant_copies_stand_in_for_nvme_when_a_call_allows_them() {
    let cfg = |c: &mut stratad::config::Config| {
        c.tiers.dram.bytes = ByteSize(16 << 20);
        c.tiers.nvme.bytes = ByteSize(64 << 20);
        c.tiers.nvme.write_through = true;
        c.tiers.nvme.engine = "psync".into();
        // Nothing is promoted between the calls: every block stays
        // NVMe-only.
        c.compute.hotness = false;
        c.compute.quant_bytes = ByteSize(1 << 20);
    };
    let mut d = start(cfg).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    let n = 8;
    let kv = Kv::random(n * TPB, 80);
    put(&mut c, ns, &kv, 1, 0..n, None).await;
    let keys = chain(1, n);
    let mut c = d.restart(cfg).await;
    assert!(in_dram(&d, ns, &keys).iter().all(|x| !x));
    let q = queries(81);
    let all: Vec<usize> = (0..n * TPB).collect();
    let (ro, rl) = kv.reference(1, &q, scale(), &all);
    let at = |layer: u32, mode: AttendMode, p: Precision| {
        let mut r = request(ns, layer, mode, keys.clone(), &q);
        r.min_precision = p;
        r
    };
    let made = |metrics| async move {
        let (_, m) = http_get(metrics, "/metrics").await;
        counter(&m, "strata_attend_quant_copies_total{event=\"made\"}")
    };
    let nv = n as u32;

    // Stored precision: from NVMe, exact, and no copy is made.
    let stored = attend1(&mut c, &at(1, AttendMode::Dense, Precision::Stored)).await;
    assert_eq!(stored.read_blocks(TierKind::Nvme), nv);
    assert!(stored.exact && stored.quantized_blocks == 0);
    assert!(relerr(&stored.o, &ro) < 5e-4);
    assert_eq!(made(d.metrics).await, 0);

    // INT8, first call: the device (an exact answer), and a copy of each
    // block's layer 1.
    let first = attend1(&mut c, &at(1, AttendMode::Dense, Precision::Int8)).await;
    assert_eq!(first.read_blocks(TierKind::Nvme), nv);
    assert!(first.exact && first.quantized_blocks == 0);
    assert_eq!((&first.o, &first.lse), (&stored.o, &stored.lse));
    assert_eq!(made(d.metrics).await, n as u64);

    // INT8 again: the copies, no device read; approximate and close.
    let second = attend1(&mut c, &at(1, AttendMode::Dense, Precision::Int8)).await;
    assert_eq!(second.read_bytes(TierKind::Nvme), 0);
    assert_eq!(second.quantized_blocks, nv);
    // One copy: f16 lo and step per channel of K and V, then the codes.
    let copy = (8 * KV * D + 2 * TPB * KV * D) as u64;
    assert_eq!(second.quantized_bytes, nv as u64 * copy);
    assert!(!second.exact);
    assert_eq!(
        (second.keys_present, &second.covered),
        (nv, &stored.covered)
    );
    let e = relerr(&second.o, &ro);
    assert!(e > 0.0 && e < 1e-2, "int8 relerr {e}");
    for (a, b) in second.lse.iter().zip(&rl) {
        assert!((*a as f64 - b).abs() < 1e-2, "lse {a} against {b}");
    }

    // A batch of two such sequences: each answers as alone.
    let mut two = at(1, AttendMode::Dense, Precision::Int8);
    two.sequences.push(two.sequences[0].clone());
    for out in c.attend(&two).await.unwrap() {
        assert_eq!(
            (out.quantized_blocks, &out.o, &out.lse),
            (nv, &second.o, &second.lse)
        );
        assert_eq!(out.read_bytes(TierKind::Nvme), 0);
    }

    // An INT4 floor takes the int8 copies too; STORED never does.
    let four = attend1(&mut c, &at(1, AttendMode::Dense, Precision::Int4)).await;
    assert_eq!((four.quantized_blocks, &four.o), (nv, &second.o));
    let again = attend1(&mut c, &at(1, AttendMode::Dense, Precision::Stored)).await;
    assert_eq!(again.read_blocks(TierKind::Nvme), nv);
    assert!(again.exact && again.quantized_blocks == 0);
    assert_eq!(again.o, stored.o);

    // Layer 0 has no copies yet.
    let other = attend1(&mut c, &at(0, AttendMode::Dense, Precision::Int8)).await;
    assert_eq!(other.read_blocks(TierKind::Nvme), nv);
    assert_eq!(other.quantized_blocks, 0);

    // SPARSE computes the blocks it chose from the copies.
    let sparse = AttendMode::Sparse(SparseBudget::Tokens(3 * TPB as u32));
    let sp = attend1(&mut c, &at(1, sparse, Precision::Int8)).await;
    assert_eq!(sp.read_bytes(TierKind::Nvme), 0);
    assert_eq!(sp.quantized_blocks as usize, blocks_of(&sp.covered));
    assert!(sp.quantized_blocks >= 2 && !sp.exact);
    let sp_stored = attend1(&mut c, &at(1, sparse, Precision::Stored)).await;
    assert_eq!(sp_stored.covered, sp.covered, "the same choice");
    assert_eq!(sp_stored.quantized_blocks, 0);

    // SPARF (no key sketches here) scores every block from its copy's K
    // and attends its chosen blocks from the copies: no device read.
    let sparf = AttendMode::Sparf {
        channels: None,
        tokens: Some(2 * TPB as u32),
        by_token: false,
        mean_correction: false,
        joint_heads: false,
    };
    let sf = attend1(&mut c, &at(1, sparf, Precision::Int8)).await;
    let sf_stored = attend1(&mut c, &at(1, sparf, Precision::Stored)).await;
    assert_eq!(sf.head_covered, sf_stored.head_covered, "the same choice");
    assert_eq!(sf.quantized_blocks as usize, blocks_of(&sf.covered));
    assert!(sf.quantized_blocks >= 2 && !sf.exact);
    assert_eq!(sf.read_bytes(TierKind::Nvme), 0);
    assert!(sf_stored.read_bytes(TierKind::Nvme) > 0);
    // Scoring read every copy once, attending the chosen ones again.
    assert_eq!(
        sf.quantized_bytes,
        (n as u64 + sf.quantized_blocks as u64) * copy
    );

    let (_, m) = http_get(d.metrics, "/metrics").await;
    assert_eq!(
        counter(&m, "strata_attend_read_blocks_total{tier=\"quant\"}"),
        4 * n as u64 + (sp.quantized_blocks + sf.quantized_blocks) as u64
    );
    assert!(counter(&m, "strata_attend_quant_bytes") >= n as u64 * copy);

    // After a restart (the copies live in DRAM only), SPARF is the first
    // to allow copies: it reads K and V of every block once, in its
    // scoring phase (not K alone), and makes a copy of each; it attends
    // its chosen blocks from those copies (no second read), and its next
    // call reads no device byte.
    let mut c = d.restart(cfg).await;
    let first = attend1(&mut c, &at(1, sparf, Precision::Int8)).await;
    assert_eq!(first.read_blocks(TierKind::Nvme), nv);
    assert_eq!(first.read_bytes(TierKind::Nvme), nv as u64 * LAYER_BYTES);
    assert_eq!(first.quantized_blocks as usize, blocks_of(&first.covered));
    assert_eq!(made(d.metrics).await, n as u64);
    let next = attend1(&mut c, &at(1, sparf, Precision::Int8)).await;
    assert_eq!(next.read_bytes(TierKind::Nvme), 0);
    assert_eq!(next.head_covered, first.head_covered);
    assert!(next.quantized_blocks >= 2);
    d.stop().await;
}

/// SPARSE at the leaf level on quant copies: each chosen leaf's rows are
/// sliced from its block's copy; the same leaves as at stored precision,
/// each block counted once however many of its leaves were chosen, no
/// device read, and the answer close to the stored one.
#[tokio::test]
async fn sparse_leaves_on_quant_copies_slice_the_chosen_rows() {
    let cfg = |c: &mut stratad::config::Config| {
        c.tiers.nvme.write_through = true;
        c.tiers.nvme.engine = "psync".into();
        c.compute.hotness = false;
        c.compute.quant_bytes = ByteSize(4 << 20);
        c.compute.leaf_tokens = 8;
        c.compute.leaf_level = "leaf".into();
    };
    let n = 2048;
    let blocks = n / TPB;
    let q = queries(31);
    let kv = planted_kv(n, 30, &q);
    let keys = chain(1, blocks);
    let mut d = start(cfg).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    put(&mut c, ns, &kv, 1, 0..blocks, None).await;
    let mut c = d.restart(cfg).await;
    let at = |mode: AttendMode, p: Precision| {
        let mut r = request(ns, 1, mode, keys.clone(), &q);
        r.min_precision = p;
        r
    };
    // Copies of every block's layer 1 (DENSE reads them all).
    attend1(&mut c, &at(AttendMode::Dense, Precision::Int8)).await;
    let sparse = AttendMode::Sparse(SparseBudget::Tokens(96));
    let stored = attend1(&mut c, &at(sparse, Precision::Stored)).await;
    let copies = attend1(&mut c, &at(sparse, Precision::Int8)).await;
    assert!(has_half_blocks(&stored.covered), "leaves were chosen");
    assert_eq!(copies.covered, stored.covered, "the same leaves");
    assert_eq!(copies.read_bytes(TierKind::Nvme), 0);
    assert_eq!(copies.quantized_blocks as usize, blocks_of(&copies.covered));
    assert!(!copies.exact);
    let want: Vec<f64> = stored.o.iter().map(|&x| x as f64).collect();
    let e = relerr(&copies.o, &want);
    assert!(e > 0.0 && e < 1e-2, "int8 leaves relerr {e}");
    d.stop().await;
}

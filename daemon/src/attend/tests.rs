//! Boundary 1 for Attend's store side: block summaries exist for every
//! published block on every path (stream put, zero-copy commit, recovery
//! after a restart), bound every key, die with the block, and stay within
//! their region; and the sparse selection ranks by the bound.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use half::f16;
use strata_proto::convert::{CommitReq, DeleteReq, ReserveBlock, ReserveReq};
use strata_proto::{BlockKey, Dtype, KvKind, Layout, NamespaceId};

use super::summary::{Geom, SummaryView};
use crate::metrics::{Registry, StoreMetrics};
use crate::store::{ManualClock, Reserve, Store, StoreConfig, StoreError, tiering};
use crate::tier::nvme::buf::BufPool;
use crate::tier::nvme::engine::{EngineKind, open_engine};
use crate::tier::nvme::{NvmeConfig, NvmeTier};
use crate::tier::{DramConfig, DramTier};

/// 3 layers x 2 KV heads x 16 dims, f16, 8 tokens per block: 3 KiB blocks.
fn layout() -> Layout {
    Layout {
        model_id: "attend-test".into(),
        dtype: Dtype::F16,
        num_layers: 3,
        num_kv_heads: 2,
        head_dim: 16,
        tokens_per_block: 8,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

/// A seeded generator (xorshift + Box-Muller): tests replay exactly.
struct Rng(u64);

impl Rng {
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

/// A block of `tokens` tokens of f16 values, N(0, 1) scaled per channel.
fn payload(l: &Layout, tokens: u32, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let n = (l.token_bytes() * tokens as u64 / 2) as usize;
    let mut out = Vec::with_capacity(n * 2);
    for i in 0..n {
        let scale = 1.0 + (i % l.head_dim as usize) as f32 * 0.25;
        out.extend_from_slice(&f16::from_f32(rng.normal() * scale).to_le_bytes());
    }
    out
}

fn key(i: u32) -> BlockKey {
    let mut k = [0xa7u8; 12];
    k[8..].copy_from_slice(&i.to_be_bytes());
    BlockKey::new(&k).unwrap()
}

fn store_with(dram_bytes: u64, cfg: StoreConfig, nvme: Option<Arc<NvmeTier>>) -> Arc<Store> {
    let dram = DramTier::new(&DramConfig {
        bytes: dram_bytes,
        granule_bytes: 4096,
        prefault: false,
    })
    .unwrap();
    Arc::new(Store::new(
        cfg,
        dram,
        nvme,
        4096,
        Arc::new(ManualClock::default()),
        StoreMetrics::new(&Registry::new()),
    ))
}

fn put(store: &Arc<Store>, ns: NamespaceId, k: BlockKey, data: &[u8]) {
    let sum = strata_proto::checksum(data);
    match store
        .reserve(ns, k, None, data.len() as u64, sum, 0)
        .unwrap()
    {
        Reserve::Slot(mut s) => {
            s.fill(data);
            store.publish(s, sum).unwrap();
        }
        Reserve::Present(_) => panic!("present"),
    }
}

fn put_zero_copy(store: &Arc<Store>, ns: NamespaceId, k: BlockKey, data: &[u8]) {
    let r = store
        .reserve_shared(&ReserveReq {
            namespace: ns,
            blocks: vec![ReserveBlock {
                key: k,
                parent: None,
                length: data.len() as u64,
            }],
            ttl_ms: 0,
        })
        .unwrap();
    unsafe { store.dram().slice_mut(r[0].offset, r[0].len) }.copy_from_slice(data);
    store
        .commit(&CommitReq {
            blocks: vec![(r[0].id.unwrap(), strata_proto::checksum(data))],
        })
        .unwrap();
}

/// The summary of `k` checks: per-tensor checksums match the payload, and
/// for every layer, head and random query, `UB(q) >= q.k` for every key.
fn check_summary(store: &Store, ns: NamespaceId, k: &BlockKey, data: &[u8], rng: &mut Rng) {
    let (geom, bytes) = store
        .summary_copy(ns, k)
        .unwrap_or_else(|| panic!("block {k} has no summary"));
    let v = SummaryView::new(geom, &bytes);
    let tokens = geom.tokens_of(data.len() as u64).unwrap();
    let (h, d) = (geom.kv_heads as usize, geom.head_dim as usize);
    let (mut mn, mut mx) = (vec![f16::ZERO; d], vec![f16::ZERO; d]);
    let mut scratch = strata_kernels::abstracts::AbstractScratch::new(d);
    let mut ub = [0f32; 1];
    for layer in 0..geom.layers {
        for t in 0..2 {
            for leaf in 0..v.leaves() {
                let r = geom.leaves_range(tokens, layer, t, leaf..leaf + 1);
                assert_eq!(v.leaf_sum(layer, leaf, t), strata_proto::checksum(&data[r]));
            }
        }
        let kb = &data[geom.tensor_range(tokens, layer, 0)];
        for head in 0..h {
            // The block's box, then each leaf's box over the leaf's keys.
            for leaf in std::iter::once(None).chain((0..v.leaves()).map(Some)) {
                let rows = match leaf {
                    None => {
                        v.bounds(layer, head as u32, &mut mn, &mut mx);
                        0..tokens as usize
                    }
                    Some(j) => {
                        v.leaf_bounds(layer, head as u32, j, &mut mn, &mut mx);
                        let r = geom.leaf_tokens_of(tokens, j);
                        r.start as usize..r.end as usize
                    }
                };
                for _ in 0..8 {
                    let q: Vec<f32> = (0..d).map(|_| rng.normal() * 3.0).collect();
                    strata_kernels::abstracts::upper_bounds(
                        &q,
                        1,
                        d,
                        &mn,
                        &mx,
                        &mut scratch,
                        &mut ub,
                    );
                    for tok in rows.clone() {
                        let at = (tok * h + head) * d * 2;
                        let dot: f64 = (0..d)
                            .map(|i| {
                                let x = f16::from_le_bytes([kb[at + 2 * i], kb[at + 2 * i + 1]]);
                                q[i] as f64 * x.to_f64()
                            })
                            .sum();
                        // f32 rounding of the bound's sum (abstracts.rs).
                        let slack = 1e-4 * (1.0 + dot.abs());
                        assert!(
                            ub[0] as f64 >= dot - slack,
                            "layer {layer} head {head} token {tok}: UB {} < q.k {dot}",
                            ub[0]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn attend_summaries_bound_every_key_on_every_publish_path() {
    // Whole-block leaves, and two leaves of 4 tokens per 8-token block.
    for leaf_tokens in [0, 4] {
        summaries_bound_every_key(leaf_tokens);
    }
}

fn summaries_bound_every_key(leaf_tokens: u32) {
    let l = layout();
    let mut cfg = StoreConfig::default();
    cfg.summaries.leaf_tokens = leaf_tokens;
    let store = store_with(1 << 20, cfg, None);
    let (ns, _) = store.register_layout(l.clone());
    let mut rng = Rng(7);
    let mut blocks = Vec::new();
    for i in 0..6u32 {
        // Full blocks, and a partial one (5 of 8 tokens).
        let tokens = if i == 5 { 5 } else { 8 };
        let data = payload(&l, tokens, i as u64);
        if i % 2 == 0 {
            put(&store, ns, key(i), &data);
        } else {
            put_zero_copy(&store, ns, key(i), &data);
        }
        blocks.push((key(i), data));
    }
    for (k, data) in &blocks {
        check_summary(&store, ns, k, data, &mut rng);
    }
    store.check_invariants();
    let geom = Geom::of(&l).unwrap().with_leaf_tokens(leaf_tokens);
    assert_eq!(geom.leaves(), if leaf_tokens == 4 { 2 } else { 1 });
    let entry = (geom.summary_bytes() as u64).next_multiple_of(64);
    let st = store.stats();
    assert_eq!(st.summary_blocks, 6);
    assert_eq!(st.summary_bytes, 6 * entry);
    // Summaries die with the block.
    store
        .delete(&DeleteReq {
            namespace: ns,
            keys: blocks.iter().map(|(k, _)| *k).collect(),
        })
        .unwrap();
    let st = store.stats();
    assert_eq!((st.summary_blocks, st.summary_bytes), (0, 0));
    store.check_invariants();
}

#[test]
fn attend_a_full_region_leaves_blocks_without_summaries_and_a_bad_put_frees_its_entry() {
    let l = layout();
    let geom = Geom::of(&l).unwrap();
    let entry = (geom.summary_bytes() as u64).next_multiple_of(64);
    let mut cfg = StoreConfig::default();
    cfg.summaries.bytes = 3 * entry;
    let store = store_with(1 << 20, cfg, None);
    let (ns, _) = store.register_layout(l.clone());
    // A put whose checksum fails computes a summary and hands it back.
    let data = payload(&l, 8, 99);
    if let Reserve::Slot(mut s) = store
        .reserve(ns, key(99), None, data.len() as u64, 1, 0)
        .unwrap()
    {
        s.fill(&data);
        assert!(store.publish(s, 1).is_err());
    }
    assert_eq!(store.stats().summary_bytes, 0);
    for i in 0..5u32 {
        put(&store, ns, key(i), &payload(&l, 8, i as u64));
    }
    let st = store.stats();
    assert_eq!((st.summary_blocks, st.summary_bytes), (3, 3 * entry));
    assert!(store.summary_copy(ns, &key(4)).is_none());
    store.check_invariants();
    // Off: no region, no summaries, nothing counted.
    let mut cfg = StoreConfig::default();
    cfg.summaries.enabled = false;
    let store = store_with(1 << 20, cfg, None);
    let (ns, _) = store.register_layout(l.clone());
    put(&store, ns, key(0), &payload(&l, 8, 0));
    let st = store.stats();
    assert_eq!((st.summary_blocks, st.summary_capacity), (0, 0));
}

/// A zero-copy commit is verified whether or not a summary was made: a
/// block changed after the producer hashed it (one byte) is refused with
/// its real checksum and frees its summary entry; the right one publishes.
/// The same with the region full (no summary).
#[test]
fn attend_a_zero_copy_commit_is_verified_with_or_without_a_summary() {
    let l = layout();
    let geom = Geom::of(&l).unwrap();
    let entry = (geom.summary_bytes() as u64).next_multiple_of(64);
    let mut cfg = StoreConfig::default();
    cfg.summaries.bytes = entry;
    let store = store_with(1 << 20, cfg, None);
    let (ns, _) = store.register_layout(l.clone());
    let try_commit = |k: BlockKey, data: &[u8], claimed: u64| {
        let r = store
            .reserve_shared(&ReserveReq {
                namespace: ns,
                blocks: vec![ReserveBlock {
                    key: k,
                    parent: None,
                    length: data.len() as u64,
                }],
                ttl_ms: 0,
            })
            .unwrap();
        unsafe { store.dram().slice_mut(r[0].offset, r[0].len) }.copy_from_slice(data);
        store.commit(&CommitReq {
            blocks: vec![(r[0].id.unwrap(), claimed)],
        })
    };
    for (i, summarized) in [(1u32, true), (2, false)] {
        for tokens in [8, 5] {
            let good = payload(&l, tokens, i as u64 * 10 + tokens as u64);
            let mut bad = good.clone();
            let at = bad.len() - 1 - (i as usize * 37) % bad.len();
            bad[at] ^= 0x40;
            match try_commit(key(i * 10 + tokens), &bad, strata_proto::checksum(&good)) {
                Err(StoreError::ChecksumMismatch { actual, .. }) => {
                    assert_eq!(actual, strata_proto::checksum(&bad))
                }
                other => panic!("a corrupted block was accepted: {other:?}"),
            }
            assert_eq!(
                store.stats().summary_bytes,
                if summarized { 0 } else { entry }
            );
            store.check_invariants();
        }
        let good = payload(&l, 8, i as u64);
        try_commit(key(i), &good, strata_proto::checksum(&good)).unwrap();
        assert_eq!(store.summary_copy(ns, &key(i)).is_some(), summarized);
        store.check_invariants();
    }
}

fn nvme_tier(dir: &std::path::Path) -> Arc<NvmeTier> {
    let cfg = NvmeConfig {
        dir: dir.join("nvme"),
        capacity_bytes: 8 << 20,
        segment_bytes: 1 << 20,
        engine: EngineKind::Psync,
        queue_depth: 4,
        io_buffer_bytes: 64 << 10,
        io_buffers: 4,
        fence_after_errors: 3,
        sync_writes: false,
    };
    let pool = BufPool::new(cfg.io_buffer_bytes, cfg.io_buffers);
    let engine = open_engine(EngineKind::Psync, 4, Some(&pool)).unwrap();
    NvmeTier::open(cfg, engine, pool).unwrap().0
}

#[tokio::test]
async fn attend_summaries_come_back_after_an_nvme_restart() {
    let dir = tempfile::tempdir().unwrap();
    let l = layout();
    let mut rng = Rng(11);
    let mut blocks = Vec::new();
    let mut before = Vec::new();
    {
        let store = store_with(1 << 20, StoreConfig::default(), Some(nvme_tier(dir.path())));
        tiering::recover(&store, &mut |_, _| {}).await;
        let (ns, _) = store.register_layout(l.clone());
        tiering::persist_layout(&store, &l).await;
        for i in 0..10u32 {
            let tokens = if i == 9 { 3 } else { 8 };
            let data = payload(&l, tokens, 100 + i as u64);
            let sum = strata_proto::checksum(&data);
            let Reserve::Slot(mut s) = store
                .reserve(ns, key(i), None, data.len() as u64, sum, 0)
                .unwrap()
            else {
                panic!("present")
            };
            s.fill(&data);
            let (_, r) = store.publish(s, sum).unwrap();
            assert!(tiering::persist(&store, r).await, "block {i} written");
            before.push(store.summary_copy(ns, &key(i)).unwrap());
            blocks.push((key(i), data));
        }
    }
    // A new daemon on the same directory: no layout registered by anyone;
    // recovery reads the persisted layouts and summarises every record.
    let store = store_with(1 << 20, StoreConfig::default(), Some(nvme_tier(dir.path())));
    tiering::recover(&store, &mut |_, _| {}).await;
    let ns = l.namespace_id();
    assert_eq!(store.layout(ns), Some(l.clone()));
    assert_eq!(store.stats().summary_blocks, 10);
    for ((k, data), (_, old)) in blocks.iter().zip(&before) {
        assert_eq!(store.tier_of(ns, k), Some(strata_proto::TierKind::Nvme));
        let (_, now) = store.summary_copy(ns, k).unwrap();
        assert_eq!(&now, old, "block {k}: same summary as before the restart");
        check_summary(&store, ns, k, data, &mut rng);
    }
    store.check_invariants();
}

#[test]
fn attend_sparse_selection_ranks_blocks_by_their_bound() {
    // Through the store's summaries: a block holding a key aligned with q
    // ranks above every other block of random keys.
    let l = layout();
    let store = store_with(1 << 20, StoreConfig::default(), None);
    let (ns, _) = store.register_layout(l.clone());
    let geom = Geom::of(&l).unwrap();
    let d = geom.head_dim as usize;
    let q: Vec<f32> = (0..d)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    for i in 0..12u32 {
        let mut data = payload(&l, 8, 500 + i as u64);
        if i == 7 {
            // Token 3, head 0, layer 1: 8x the query direction.
            let r = geom.tensor_range(8, 1, 0);
            let at = r.start + (3 * 2) * d * 2;
            for (c, &x) in q.iter().enumerate() {
                data[at + 2 * c..at + 2 * c + 2]
                    .copy_from_slice(&f16::from_f32(8.0 * x).to_le_bytes());
            }
        }
        put(&store, ns, key(i), &data);
    }
    let mut scratch = strata_kernels::abstracts::AbstractScratch::new(d);
    let (mut mn, mut mx) = (vec![f16::ZERO; d], vec![f16::ZERO; d]);
    let mut ub = [0f32; 1];
    let bounds: Vec<f32> = (0..12u32)
        .map(|i| {
            let (g, bytes) = store.summary_copy(ns, &key(i)).unwrap();
            SummaryView::new(g, &bytes).bounds(1, 0, &mut mn, &mut mx);
            strata_kernels::abstracts::upper_bounds(&q, 1, d, &mn, &mx, &mut scratch, &mut ub);
            ub[0]
        })
        .collect();
    let best = (0..12)
        .max_by(|&a, &b| bounds[a].total_cmp(&bounds[b]))
        .unwrap();
    assert_eq!(best, 7, "bounds {bounds:?}");
}

/// 2 layers x 2 KV heads x 64 dims, f16, 16 tokens: one layer's K and V
/// are 8 KiB (whole pages), a block 16 KiB.
fn paged_layout() -> Layout {
    Layout {
        model_id: "attend-test/paged".into(),
        dtype: Dtype::F16,
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 64,
        tokens_per_block: 16,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

/// Dense Attend of `layer` over the chain `keys`, through `check` and
/// `run` as the service calls them.
async fn attend_dense(
    store: &Arc<Store>,
    l: &Layout,
    keys: &[BlockKey],
    layer: u32,
    q: &[f32],
) -> super::exec::SeqResult {
    use strata_proto::convert::{
        AttendMode, AttendReq, AttendSeq, Budget, Chain, IoDtype, Precision, RetrievalParams,
    };
    let cfg = super::AttendConfig::default();
    let req = AttendReq {
        namespace: l.namespace_id(),
        layer,
        mode: AttendMode::Dense,
        scale: None,
        sequences: vec![AttendSeq {
            chain: Chain::Keys(keys.to_vec()),
            last_block_tokens: None,
            queries: q.to_vec(),
        }],
        budget: Budget::Default,
        sparf_channels: None,
        sparf_tokens: None,
        sparf_by_token: false,
        sparf_mean_correction: false,
        sparf_joint_heads: false,
        io_dtype: IoDtype::F32,
        retrieval: RetrievalParams::default(),
        min_precision: Precision::Stored,
    };
    let checked = super::exec::check(req, l, &cfg).unwrap();
    let ctx =
        super::exec::AttendCtx::new(cfg, crate::metrics::AttendMetrics::new(&Registry::new()))
            .unwrap();
    super::exec::run(&ctx, store, checked)
        .await
        .unwrap()
        .remove(0)
}

/// f64 attention of `q` (`[heads][d]`) over `layer` of the payloads in
/// order: `(o, lse)`.
fn reference(l: &Layout, payloads: &[Vec<u8>], layer: u32, q: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let geom = Geom::of(l).unwrap();
    let (d, kv) = (l.head_dim as usize, l.num_kv_heads as usize);
    let heads = q.len() / d;
    let g = heads / kv;
    let scale = 1.0 / (d as f64).sqrt();
    let f = |b: &[u8], i: usize| f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64();
    let (mut o, mut lse) = (vec![0f64; heads * d], vec![0f64; heads]);
    for j in 0..heads {
        let h = j / g;
        let mut logits = Vec::new();
        let mut rows = Vec::new();
        for p in payloads {
            let tokens = (p.len() as u64 / l.token_bytes()) as u32;
            let (k, v) = (
                &p[geom.tensor_range(tokens, layer, 0)],
                &p[geom.tensor_range(tokens, layer, 1)],
            );
            for t in 0..tokens as usize {
                let at = (t * kv + h) * d;
                let dot: f64 = (0..d).map(|c| q[j * d + c] as f64 * f(k, at + c)).sum();
                logits.push(dot * scale);
                rows.push((0..d).map(|c| f(v, at + c)).collect::<Vec<f64>>());
            }
        }
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = logits.iter().map(|x| (x - m).exp()).collect();
        let s: f64 = w.iter().sum();
        for (wi, row) in w.iter().zip(&rows) {
            for c in 0..d {
                o[j * d + c] += wi / s * row[c];
            }
        }
        lse[j] = m + s.ln();
    }
    (o, lse)
}

/// Records written by the previous release (format v1: payload right after
/// the 128-byte header) are recovered after an upgrade and served by Get
/// and Attend, reading each layer range at the record's own payload
/// offset; records written now (v2) put a page-multiple payload at byte
/// 4096, so a dense Attend of one layer reads exactly that layer's bytes
/// from them, and a v1 record's range one page more.
#[tokio::test]
async fn v1_and_v2_records_are_served_each_at_its_own_payload_offset() {
    let dir = tempfile::tempdir().unwrap();
    let l = paged_layout();
    let geom = Geom::of(&l).unwrap();
    let block = l.token_bytes() as usize * 16;
    assert_eq!(block, 16 << 10);
    let layer_bytes = geom.tensor_range(16, 1, 1).end - geom.tensor_range(16, 1, 0).start;
    assert_eq!(layer_bytes, 8 << 10);
    let keys: Vec<BlockKey> = (0..16).map(key).collect();
    let payloads: Vec<Vec<u8>> = (0..16).map(|i| payload(&l, 16, 900 + i)).collect();
    // Writes blocks `range` (a chain), each durable on NVMe before return.
    async fn write(
        store: &Arc<Store>,
        keys: &[BlockKey],
        payloads: &[Vec<u8>],
        range: std::ops::Range<usize>,
    ) {
        let ns = strata_proto::Layout::namespace_id(&paged_layout());
        for i in range {
            let sum = strata_proto::checksum(&payloads[i]);
            let parent = (i > 0).then(|| keys[i - 1]);
            let Reserve::Slot(mut s) = store
                .reserve(ns, keys[i], parent, payloads[i].len() as u64, sum, 0)
                .unwrap()
            else {
                panic!("present")
            };
            s.fill(&payloads[i]);
            let (_, r) = store.publish(s, sum).unwrap();
            assert!(tiering::persist(store, r).await, "block {i} written");
        }
    }
    {
        // The previous release: segment and records of version 1.
        let tier = nvme_tier(dir.path());
        tier.write_version_1_for_tests();
        let store = store_with(1 << 20, StoreConfig::default(), Some(tier));
        tiering::recover(&store, &mut |_, _| {}).await;
        store.register_layout(l.clone());
        tiering::persist_layout(&store, &l).await;
        write(&store, &keys, &payloads, 0..8).await;
    }
    let segs = || {
        let mut v: Vec<_> = std::fs::read_dir(dir.path().join("nvme"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "strata"))
            .collect();
        v.sort();
        v
    };
    let old = std::fs::read(&segs()[0]).unwrap();
    assert_eq!(u32::from_le_bytes(old[8..12].try_into().unwrap()), 1);
    assert_eq!(
        u16::from_le_bytes(old[4096 + 4..4096 + 6].try_into().unwrap()),
        1
    );
    assert_eq!(&old[4096 + 128..4096 + 128 + 64], &payloads[0][..64]);
    {
        // The upgrade: this build recovers them and appends v2 records.
        let store = store_with(1 << 20, StoreConfig::default(), Some(nvme_tier(dir.path())));
        tiering::recover(&store, &mut |_, _| {}).await;
        assert_eq!(
            store.tier_of(l.namespace_id(), &keys[0]),
            Some(strata_proto::TierKind::Nvme)
        );
        write(&store, &keys, &payloads, 8..16).await;
    }
    let new = std::fs::read(&segs()[1]).unwrap();
    assert_eq!(u32::from_le_bytes(new[8..12].try_into().unwrap()), 2);
    for j in 0..8 {
        // Records of 4 KiB + 16 KiB, each payload at its second page.
        let at = 4096 + j * (20 << 10);
        assert_eq!(
            u16::from_le_bytes(new[at + 4..at + 6].try_into().unwrap()),
            2
        );
        assert_eq!(
            u32::from_le_bytes(new[at + 44..at + 48].try_into().unwrap()),
            4096
        );
        assert_eq!(
            &new[at + 4096..at + 4096 + block],
            &payloads[8 + j][..],
            "record {j}"
        );
    }
    // A restart with both: every block NVMe-only, summarised, served.
    let store = store_with(1 << 20, StoreConfig::default(), Some(nvme_tier(dir.path())));
    tiering::recover(&store, &mut |_, _| {}).await;
    let ns = l.namespace_id();
    assert_eq!(store.stats().summary_blocks, 16);
    let mut rng = Rng(5);
    let q: Vec<f32> = (0..4 * 64).map(|_| rng.normal()).collect();
    for layer in [0, 1] {
        let out = attend_dense(&store, &l, &keys, layer, &q).await;
        assert_eq!(out.keys_present, 16);
        assert_eq!(out.nvme.blocks, 16);
        assert_eq!(out.dram.bytes, 0);
        // v1: the range starts 128 bytes into a page and spans one page
        // more than its 2; v2: exactly the layer.
        assert_eq!(
            out.nvme.bytes,
            8 * (layer_bytes as u64 + 4096) + 8 * layer_bytes as u64,
            "layer {layer}"
        );
        let (o, lse) = reference(&l, &payloads, layer, &q);
        let num: f64 = o
            .iter()
            .zip(&out.o)
            .map(|(a, &b)| (a - b as f64).powi(2))
            .sum();
        let den: f64 = o.iter().map(|a| a * a).sum();
        assert!(
            (num / den).sqrt() < 1e-4,
            "layer {layer}: relerr {}",
            (num / den).sqrt()
        );
        for (a, &b) in lse.iter().zip(&out.lse) {
            assert!((a - b as f64).abs() < 1e-3, "lse {a} vs {b}");
        }
    }
    // Get serves v1 and v2 records byte for byte.
    let guard = Arc::new(
        store
            .pin_for_read(&strata_proto::convert::GetReq {
                namespace: ns,
                keys: keys.clone(),
                lease: None,
            })
            .unwrap(),
    );
    for (i, p) in payloads.iter().enumerate() {
        let got = tiering::read_in_place(&guard, i).await.unwrap();
        assert_eq!(&got[..], &p[..], "block {i}");
    }
    drop(guard);
    store.check_invariants();
}

//! Boundary 2 for the retrieval indexes (COMPUTE.md §5): BuildIndex,
//! Retrieve and Attend RETRIEVAL through the Rust client against the gRPC
//! service in process, on the needle-regime data of `strata-testdata`
//! (seeded; the index's own recall targets at 16K are asserted by the
//! kernel's test, `kernels/tests/retrieval.rs`). No test depends on timing:
//! "building" is held on purpose (`Registry::hold_builds`), waits are
//! BuildIndex's `wait`, and the sweep is polled with a generous deadline.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use strata_client::attend::{AttendMode, AttendRequest, AttendSequence, Chain, IoDtype, Precision};
use strata_client::retrieval::{
    BuildIndexRequest, IndexState, LayerQueries, RetrieveRequest, RetrieveSource,
};
use strata_client::{Client, PutBlock};
use strata_kernels::retrieval::{Hits, exact_search};
use strata_proto::{BlockKey, Dtype, KvKind, Layout, NamespaceId, pb};
use strata_testdata::metrics::{Exact, attend_subset, recall_at_k, relerr, relerr_f64};
use strata_testdata::{Config, Generator, HeadData, Regime};
use stratad::config::ByteSize;
use tonic::Code;

/// Tokens of the sequence; the engine keeps the first `SINK` and the last
/// `RECENT` itself (its static window), the daemon indexes the rest.
const N: usize = 8192;
const SINK: usize = 128;
const RECENT: usize = 512;
const D: usize = 128;
const TPB: usize = 16;
/// Query heads sharing the one KV head (GQA).
const HEADS: usize = 2;
const K: usize = 100;
/// Decode steps evaluated.
const STEPS: usize = 16;
/// Training (prefill) query steps sent to BuildIndex.
const TRAIN: usize = 4096;

fn data() -> &'static HeadData {
    static DATA: OnceLock<HeadData> = OnceLock::new();
    DATA.get_or_init(|| {
        let mut c = Config::new(Regime::Needle, N, 7);
        c.query_heads = HEADS;
        c.decode_steps = STEPS;
        c.train_queries = TRAIN;
        Generator::new(c).unwrap().generate().data
    })
}

fn layout() -> Layout {
    Layout {
        model_id: "retrieval/test".into(),
        dtype: Dtype::F32,
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: D as u32,
        tokens_per_block: TPB as u32,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

fn key(b: usize) -> BlockKey {
    let mut k = [0u8; 16];
    k[0] = 0x52;
    k[12..].copy_from_slice(&(b as u32).to_be_bytes());
    BlockKey::new(&k).unwrap()
}

/// Blocks `blocks` of the sequence as keys.
fn chain(blocks: std::ops::Range<usize>) -> Vec<BlockKey> {
    blocks.map(key).collect()
}

/// The blocks the daemon indexes: between the sink and the recent window.
const MID: std::ops::Range<usize> = SINK / TPB..(N - RECENT) / TPB;

async fn put_all(c: &mut Client, ns: NamespaceId) {
    let x = data();
    let blocks: Vec<PutBlock> = (0..N / TPB)
        .map(|b| {
            let mut out = Vec::with_capacity(2 * TPB * D * 4);
            for src in [&x.keys, &x.values] {
                for v in &src[b * TPB * D..(b + 1) * TPB * D] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            PutBlock {
                key: key(b),
                parent: (b > 0).then(|| key(b - 1)),
                data: Bytes::from(out),
            }
        })
        .collect();
    for part in blocks.chunks(64) {
        c.put(ns, part).await.unwrap();
    }
}

/// Keys and values of the indexed part, `[tokens][d]`.
fn mid_kv(blocks: std::ops::Range<usize>) -> (&'static [f32], &'static [f32]) {
    let x = data();
    let r = blocks.start * TPB * D..blocks.end * TPB * D;
    (&x.keys[r.clone()], &x.values[r])
}

fn training() -> Vec<LayerQueries> {
    vec![LayerQueries {
        layer: 0,
        num_q_heads: HEADS as u32,
        queries: data().train_queries.clone(),
    }]
}

fn build_req(ns: NamespaceId, keys: Vec<BlockKey>, wait: bool) -> BuildIndexRequest {
    BuildIndexRequest {
        namespace: ns,
        keys,
        layers: vec![],
        training: training(),
        wait,
        kv_heads: vec![],
    }
}

fn retrieve_req(ns: NamespaceId, keys: Vec<BlockKey>, step: usize) -> RetrieveRequest {
    RetrieveRequest {
        namespace: ns,
        keys,
        layer: 0,
        queries: data().decode_group(step).to_vec(),
        k: None,
        ef: None,
    }
}

async fn start_daemon(tweak: impl FnOnce(&mut stratad::config::Config)) -> TestDaemon {
    start(|c| {
        c.tiers.dram.bytes = ByteSize(64 << 20);
        c.server.max_message_bytes = ByteSize(64 << 20);
        tweak(c);
    })
    .await
}

async fn stats(c: &mut Client) -> (u64, u64) {
    let s = c.stats().await.unwrap();
    (s.retrieval_indexes, s.retrieval_index_bytes)
}

/// Mean recall@100 (against the exact top-100 by f64 `q.k`) and scan% over
/// the decode steps, per query head, of the chain `blocks`.
async fn recall_and_scan(
    c: &mut Client,
    ns: NamespaceId,
    blocks: std::ops::Range<usize>,
    want: RetrieveSource,
    ef: Option<u32>,
) -> (f64, f64) {
    let x = data();
    let (keys, values) = mid_kv(blocks.clone());
    let n = keys.len() / D;
    let (mut recall, mut scan, mut count) = (0.0, 0.0, 0.0);
    for step in 0..STEPS {
        let mut req = retrieve_req(ns, chain(blocks.clone()), step);
        req.ef = ef;
        let out = c.retrieve(&req).await.unwrap();
        assert_eq!(out.tokens_present as usize, n);
        assert_eq!(out.heads.len(), HEADS);
        for (h, hits) in out.heads.iter().enumerate() {
            assert_eq!(hits.source, want, "step {step} head {h}");
            assert_eq!(hits.positions.len(), K);
            assert!(hits.scores.windows(2).all(|w| w[0] >= w[1]), "best first");
            let exact = Exact::new(x.decode_query(step, h), keys, values, x.scale).top_k(K);
            let got: Vec<u32> = hits.positions.iter().map(|&p| p as u32).collect();
            recall += recall_at_k(&got, &exact);
            scan += 100.0 * hits.scanned as f64 / n as f64;
            count += 1.0;
        }
    }
    (recall / count, scan / count)
}

/// The whole life of one index: building (the fallback says so and equals
/// the exact scan), ready (recall@100 at a small scan, Attend RETRIEVAL
/// merged with the engine's static window vs f64), new blocks inserted
/// (recall kept), a covered block deleted (the index dropped on use, the
/// call falls back and says why, Stats back to zero).
#[tokio::test]
async fn index_lifecycle_on_needle_data() {
    // The sweep is far off: this test drops the index on use.
    let d = start_daemon(|c| c.retrieval.sweep_ms = 3_600_000).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    put_all(&mut c, ns).await;
    let x = data();
    let reg = d.running.as_ref().unwrap().retrieval.clone();

    // No index: exact, and it says so.
    let out = c.retrieve(&retrieve_req(ns, chain(MID), 0)).await.unwrap();
    assert!(
        out.heads
            .iter()
            .all(|h| h.source == RetrieveSource::ExactNoIndex)
    );

    // Building (held): the fallback equals the exact scan of the same keys.
    let hold = reg.hold_builds().await;
    let b = c
        .build_index(&build_req(ns, chain(MID), false))
        .await
        .unwrap();
    assert_eq!(b.keys_covered as usize, MID.len());
    assert_eq!(b.tokens_covered as usize, MID.len() * TPB);
    assert_eq!(b.indexes.len(), 1);
    assert_eq!(b.indexes[0].state, IndexState::Building);
    let (idx, bytes) = stats(&mut c).await;
    assert_eq!(idx, 1);
    assert!(bytes > 0, "the estimate is counted while building");
    let (keys, _) = mid_kv(MID);
    for step in [0, 5] {
        let out = c
            .retrieve(&retrieve_req(ns, chain(MID), step))
            .await
            .unwrap();
        let mut hits = Hits::new();
        exact_search(keys, D, x.decode_group(step), K, &mut hits);
        for (h, got) in out.heads.iter().enumerate() {
            assert_eq!(got.source, RetrieveSource::ExactBuilding);
            let want: Vec<u64> = hits.ids(h).iter().map(|&t| t as u64).collect();
            assert_eq!(got.positions, want, "step {step} head {h}");
            assert_eq!(got.scores, hits.scores(h));
            assert_eq!(got.scanned as usize, keys.len() / D);
        }
    }
    drop(hold);
    let b = c
        .build_index(&build_req(ns, chain(MID), true))
        .await
        .unwrap();
    assert!(b.ready(), "{:?}", b.indexes);
    let st = &b.indexes[0];
    assert_eq!(st.tokens as usize, MID.len() * TPB);
    assert!(st.memory_bytes > 0 && st.default_ef > 0);
    let (idx, bytes) = stats(&mut c).await;
    assert_eq!(idx, 1);
    assert!(bytes >= st.memory_bytes, "{bytes} < {}", st.memory_bytes);

    // Ready: recall@100 against the exact top-100 at a small scan.
    for ef in [None, Some(100), Some(128), Some(160)] {
        let (recall, scan) = recall_and_scan(&mut c, ns, MID, RetrieveSource::Index, ef).await;
        println!(
            "needle {} tokens ef {ef:?}: recall@100 {recall:.3} at scan {scan:.2}%",
            MID.len() * TPB
        );
    }
    let (recall, scan) = recall_and_scan(&mut c, ns, MID, RetrieveSource::Index, None).await;
    // COMPUTE.md §5 asks recall >= 0.9 at <= 6% of 16K keys (the kernel's
    // test). The search scans about the same number of keys whatever N (the
    // candidate list and the graph's degree set it): ~990 of 7.5K here
    // (13%, measured), i.e. ~6% of 16K.
    assert!(recall >= 0.9, "recall {recall:.3}");
    assert!(scan <= 15.0, "scan {scan:.2}%");

    // Attend RETRIEVAL merged with the engine's static window vs f64, and
    // against static + exact top-100 (the kernel test's tolerance: +0.02).
    let static_tokens: Vec<u32> = (0..SINK as u32)
        .chain((N - RECENT) as u32..N as u32)
        .collect();
    let (mid_k, mid_v) = mid_kv(MID);
    let (mut err, mut err_oracle) = (0.0, 0.0);
    for step in 0..STEPS {
        let q = x.decode_group(step).to_vec();
        let mut out = c
            .attend(&AttendRequest {
                io_dtype: IoDtype::F32,
                min_precision: Precision::Stored,
                namespace: ns,
                layer: 0,
                mode: AttendMode::Retrieval { k: None, ef: None },
                scale: Some(x.scale),
                sequences: vec![AttendSequence {
                    chain: Chain::Keys(chain(MID)),
                    last_block_tokens: None,
                    queries: q.clone(),
                }],
            })
            .await
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(out.retrieval_source, vec![RetrieveSource::Index]);
        assert_eq!(out.retrieval_scanned.len(), HEADS);
        assert_eq!(out.head_covered.len(), 1);
        assert!(!out.exact);
        assert!(out.tokens_attended >= K as u64);
        // The engine's part: its static window, in f64 then f32.
        let (mut o_c, mut lse_c) = (Vec::new(), Vec::new());
        for h in 0..HEADS {
            let full = Exact::new(x.decode_query(step, h), &x.keys, &x.values, x.scale);
            let m = static_tokens
                .iter()
                .map(|&t| full.logits[t as usize])
                .fold(f64::NEG_INFINITY, f64::max);
            let l: f64 = static_tokens
                .iter()
                .map(|&t| (full.logits[t as usize] - m).exp())
                .sum();
            o_c.extend(
                attend_subset(&full, &static_tokens, &x.values)
                    .iter()
                    .map(|&v| v as f32),
            );
            lse_c.push((m + l.ln()) as f32);
        }
        out.merge_with(&o_c, &lse_c).unwrap();
        for h in 0..HEADS {
            let q = x.decode_query(step, h);
            let full = Exact::new(q, &x.keys, &x.values, x.scale);
            err += relerr(&out.o[h * D..(h + 1) * D], &full.o);
            let top = Exact::new(q, mid_k, mid_v, x.scale).top_k(K);
            let mut oracle = static_tokens.clone();
            oracle.extend(top.iter().map(|&t| t + SINK as u32));
            err_oracle += relerr_f64(&attend_subset(&full, &oracle, &x.values), &full.o);
        }
    }
    let (err, err_oracle) = (
        err / (STEPS * HEADS) as f64,
        err_oracle / (STEPS * HEADS) as f64,
    );
    println!("attend RETRIEVAL + static: relerr {err:.4}; static + exact top-{K}: {err_oracle:.4}");
    assert!(err <= err_oracle + 0.02, "{err} vs {err_oracle}");

    // New whole blocks past the indexed chain are inserted on use.
    let shorter = MID.start..MID.end - 64;
    let b = c
        .build_index(&build_req(ns, chain(shorter.clone()), true))
        .await
        .unwrap();
    assert!(b.ready());
    assert_eq!(stats(&mut c).await.0, 2);
    let out = c.retrieve(&retrieve_req(ns, chain(MID), 0)).await.unwrap();
    // The longest covered prefix is the whole chain's own index: nothing new.
    assert_eq!(out.inserted_tokens, 0);
    // A chain one block past the shorter one, and two blocks more: only the
    // shorter index covers a prefix of it.
    let ext = shorter.start..shorter.end + 2;
    let out = c
        .retrieve(&retrieve_req(ns, chain(ext.clone()), 0))
        .await
        .unwrap();
    assert_eq!(out.inserted_tokens as usize, 2 * TPB);
    assert!(out.heads.iter().all(|h| h.source == RetrieveSource::Index));
    let out = c
        .retrieve(&retrieve_req(ns, chain(ext.clone()), 1))
        .await
        .unwrap();
    assert_eq!(out.inserted_tokens, 0, "inserted once");
    let more = shorter.start..shorter.end + 62;
    let (recall, scan) =
        recall_and_scan(&mut c, ns, more.clone(), RetrieveSource::Index, None).await;
    println!(
        "after inserting {} tokens: recall@100 {recall:.3} at scan {scan:.2}%",
        62 * TPB
    );
    assert!(recall >= 0.88, "recall after inserts {recall:.3}");
    let b = c
        .build_index(&build_req(ns, chain(more.clone()), false))
        .await
        .unwrap();
    assert_eq!(b.indexes[0].tokens as usize, (more.end - more.start) * TPB);
    assert_eq!(b.indexes[0].inserted_tokens as usize, 62 * TPB);

    // A covered block deleted: the next call finds the chain broken, drops
    // the index and scans exactly (stale).
    let gone = key(MID.start + 100);
    let r = c.delete(ns, &[gone]).await.unwrap();
    assert_eq!(r.deleted, 1);
    let before = stats(&mut c).await.0;
    let out = c.retrieve(&retrieve_req(ns, chain(MID), 0)).await.unwrap();
    assert!(
        out.heads
            .iter()
            .all(|h| h.source == RetrieveSource::ExactStale),
        "{:?}",
        out.heads.iter().map(|h| h.source).collect::<Vec<_>>()
    );
    assert_eq!(out.keys_present, 100, "the chain ends at the deleted block");
    assert_eq!(stats(&mut c).await.0, before - 1);
    let out = c.retrieve(&retrieve_req(ns, chain(more), 0)).await.unwrap();
    assert!(
        out.heads
            .iter()
            .all(|h| h.source == RetrieveSource::ExactStale),
        "the extended index covered it too"
    );
    assert_eq!(stats(&mut c).await, (0, 0));
    d.stop().await;
}

/// Keys and values of random data for the small tests (f32).
async fn put_random(c: &mut Client, ns: NamespaceId, blocks: usize) {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
    };
    let parts: Vec<PutBlock> = (0..blocks)
        .map(|b| {
            let data: Vec<u8> = (0..2 * TPB * D)
                .flat_map(|_| next().to_le_bytes())
                .collect();
            PutBlock {
                key: key(b),
                parent: (b > 0).then(|| key(b - 1)),
                data: Bytes::from(data),
            }
        })
        .collect();
    for part in parts.chunks(64) {
        c.put(ns, part).await.unwrap();
    }
}

/// The periodic sweep drops an index whose blocks were evicted (namespace
/// eviction here), without any call touching it.
#[tokio::test]
async fn the_sweep_drops_indexes_of_evicted_blocks() {
    let d = start_daemon(|c| c.retrieval.sweep_ms = 20).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    put_random(&mut c, ns, 64).await;
    let mut req = build_req(ns, chain(0..64), true);
    req.training.clear();
    let b = c.build_index(&req).await.unwrap();
    assert!(b.ready(), "{:?}", b.indexes);
    assert_eq!(stats(&mut c).await.0, 1);
    c.evict_namespace(ns).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stats(&mut c).await != (0, 0) {
        assert!(std::time::Instant::now() < deadline, "the sweep never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = c
        .retrieve(&retrieve_req(ns, chain(0..64), 0))
        .await
        .unwrap();
    assert_eq!(out.keys_present, 0);
    assert!(out.heads.iter().all(|h| h.positions.is_empty()));
    d.stop().await;
}

/// `retrieval.max_bytes` refuses a build that would pass it, and bad input
/// is refused with the field named.
#[tokio::test]
async fn limits_and_bad_inputs() {
    let d = start_daemon(|c| c.retrieval.max_bytes = ByteSize(1 << 20)).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    put_random(&mut c, ns, 256).await;
    let mut req = build_req(ns, chain(0..256), true);
    req.training.clear();
    let s = match c.build_index(&req).await.unwrap_err() {
        strata_client::Error::Status(s) => s,
        e => panic!("{e}"),
    };
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("retrieval.max_bytes"), "{s:?}");
    assert_eq!(stats(&mut c).await, (0, 0));

    let rpc = c.rpc().clone();
    let kb = |b: usize| Bytes::copy_from_slice(key(b).as_bytes());
    let good_build = || pb::BuildIndexRequest {
        namespace_id: ns.0,
        keys: vec![kb(0), kb(1)],
        layers: vec![],
        training_queries: vec![],
        wait: false,
        kv_heads: vec![],
    };
    let build_field = |r: pb::BuildIndexRequest| {
        let mut rpc = rpc.clone();
        async move {
            let s = rpc.build_index(r).await.unwrap_err();
            assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
            s.message().split(':').next().unwrap().to_string()
        }
    };
    assert_eq!(
        build_field(pb::BuildIndexRequest {
            keys: vec![],
            ..good_build()
        })
        .await,
        "keys"
    );
    assert_eq!(
        build_field(pb::BuildIndexRequest {
            layers: vec![3],
            ..good_build()
        })
        .await,
        "layers[0]"
    );
    assert_eq!(
        build_field(pb::BuildIndexRequest {
            layers: vec![0, 0],
            ..good_build()
        })
        .await,
        "layers[1]"
    );
    // KV heads: out of range (the layout has one), or twice.
    let s = rpc
        .clone()
        .build_index(pb::BuildIndexRequest {
            kv_heads: vec![0, 1],
            ..good_build()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message()
            .starts_with("kv_heads[1]: 1 is out of range (the layout has 1 KV heads)"),
        "{s:?}"
    );
    assert_eq!(
        build_field(pb::BuildIndexRequest {
            kv_heads: vec![0, 0],
            ..good_build()
        })
        .await,
        "kv_heads[1]"
    );
    assert_eq!(stats(&mut c).await, (0, 0), "nothing was built");
    let tq = |layer, heads, n: usize| pb::LayerQueries {
        layer,
        num_q_heads: heads,
        queries: vec![0.5; n],
    };
    for (t, field) in [
        (tq(0, 0, D), "training_queries[0].num_q_heads"),
        (tq(0, 2, D), "training_queries[0].queries"),
        (tq(1, 1, D), "training_queries[0].layer"),
    ] {
        assert_eq!(
            build_field(pb::BuildIndexRequest {
                training_queries: vec![t],
                ..good_build()
            })
            .await,
            field
        );
    }
    let mut nan = tq(0, 1, D);
    nan.queries[7] = f32::NAN;
    assert_eq!(
        build_field(pb::BuildIndexRequest {
            training_queries: vec![nan],
            ..good_build()
        })
        .await,
        "training_queries[0].queries[7]"
    );
    assert_eq!(
        build_field(pb::BuildIndexRequest {
            keys: vec![kb(9999)],
            ..good_build()
        })
        .await,
        "keys"
    );

    let good_ret = || pb::RetrieveRequest {
        namespace_id: ns.0,
        keys: vec![kb(0), kb(1)],
        layer: 0,
        queries: vec![0.5; 2 * D],
        k: 0,
        ef: 0,
    };
    let ret_field = |r: pb::RetrieveRequest| {
        let mut rpc = rpc.clone();
        async move {
            let s = rpc.retrieve(r).await.unwrap_err();
            assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
            s.message().split(':').next().unwrap().to_string()
        }
    };
    let cases: Vec<(pb::RetrieveRequest, &str)> = vec![
        (
            pb::RetrieveRequest {
                k: 1025,
                ..good_ret()
            },
            "k",
        ),
        (
            pb::RetrieveRequest {
                k: 50,
                ef: 10,
                ..good_ret()
            },
            "ef",
        ),
        (
            pb::RetrieveRequest {
                ef: 5000,
                ..good_ret()
            },
            "ef",
        ),
        (
            pb::RetrieveRequest {
                layer: 1,
                ..good_ret()
            },
            "layer",
        ),
        (
            pb::RetrieveRequest {
                queries: vec![0.5; D + 1],
                ..good_ret()
            },
            "queries",
        ),
        (
            pb::RetrieveRequest {
                queries: vec![],
                ..good_ret()
            },
            "queries",
        ),
        (
            pb::RetrieveRequest {
                queries: vec![f32::INFINITY; D],
                ..good_ret()
            },
            "queries[0]",
        ),
        (
            pb::RetrieveRequest {
                keys: vec![],
                ..good_ret()
            },
            "keys",
        ),
        (
            pb::RetrieveRequest {
                keys: vec![Bytes::from_static(b"")],
                ..good_ret()
            },
            "keys[0]",
        ),
        (
            pb::RetrieveRequest {
                namespace_id: 0,
                ..good_ret()
            },
            "namespace_id",
        ),
    ];
    for (r, field) in cases {
        assert_eq!(ret_field(r).await, field);
    }
    // Attend: RETRIEVAL's parameters only with RETRIEVAL, and checked.
    let attend = |mode: pb::AttendMode, k: u32, ef: u32| pb::AttendRequest {
        namespace_id: ns.0,
        layer: 0,
        mode: mode as i32,
        sequences: vec![pb::AttendSequence {
            keys: vec![kb(0)],
            last_block_tokens: 0,
            queries: vec![0.5; D],
            ..Default::default()
        }],
        retrieval_k: k,
        retrieval_ef: ef,
        ..Default::default()
    };
    for (r, field) in [
        (attend(pb::AttendMode::Dense, 5, 0), "retrieval_k"),
        (attend(pb::AttendMode::Retrieval, 2000, 0), "retrieval_k"),
        (attend(pb::AttendMode::Retrieval, 100, 99), "retrieval_ef"),
    ] {
        let s = rpc.clone().attend(r).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert_eq!(s.message().split(':').next().unwrap(), field);
    }
    // Unknown namespace.
    let s = rpc
        .clone()
        .retrieve(pb::RetrieveRequest {
            namespace_id: 12345,
            ..good_ret()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");

    // A replacement the cap refuses (a key-only index gaining training
    // queries) keeps the group it would have replaced.
    let mut small = build_req(ns, chain(0..64), true);
    small.training.clear();
    assert!(c.build_index(&small).await.unwrap().ready());
    let held = stats(&mut c).await;
    assert_eq!(held.0, 1);
    match c
        .build_index(&build_req(ns, chain(0..64), true))
        .await
        .unwrap_err()
    {
        strata_client::Error::Status(s) => assert_eq!(s.code(), Code::ResourceExhausted),
        e => panic!("{e}"),
    }
    assert_eq!(stats(&mut c).await, held);
    let out = c
        .retrieve(&retrieve_req(ns, chain(0..64), 0))
        .await
        .unwrap();
    assert!(out.heads.iter().all(|h| h.source == RetrieveSource::Index));
    d.stop().await;
}

/// BuildIndex and Retrieve check that the caller's tenant owns the
/// namespace (PERMISSION_DENIED otherwise), and change nothing when refused.
#[tokio::test]
async fn retrieval_calls_are_refused_on_another_tenants_namespace() {
    const ALICE: &str = "alice-token-0123456789abcdef";
    const BOB: &str = "bob-token-0123456789abcdef00";
    let d = start_daemon(|c| {
        let path = c.data_dir.join("tokens");
        std::fs::create_dir_all(&c.data_dir).unwrap();
        std::fs::write(&path, format!("alice {ALICE}\nbob {BOB}\n")).unwrap();
        c.auth.tcp = "token".into();
        c.auth.tokens_file = path.display().to_string();
        let tenant = |name: &str| stratad::config::TenantSection {
            name: name.into(),
            uids: vec![],
            gids: vec![],
            tls_names: vec![],
            admin: false,
            zero_copy: false,
            dram_bytes: ByteSize(0),
            nvme_bytes: ByteSize(0),
        };
        c.tenants = vec![tenant("alice"), tenant("bob")];
    })
    .await;
    let connect = |token: &'static str| {
        let tcp = d.tcp.clone();
        async move {
            Client::connect_with(
                &tcp,
                &strata_client::Credentials {
                    token: Some(token.into()),
                    tls: None,
                },
            )
            .await
            .unwrap()
        }
    };
    let (mut alice, mut bob) = (connect(ALICE).await, connect(BOB).await);
    let ns = alice.register_layout(&layout()).await.unwrap().namespace;
    put_random(&mut alice, ns, 64).await;
    let mut req = build_req(ns, chain(0..64), true);
    req.training.clear();
    let status = |e: strata_client::Error| match e {
        strata_client::Error::Status(s) => s.code(),
        e => panic!("{e}"),
    };
    assert_eq!(
        status(bob.build_index(&req).await.unwrap_err()),
        Code::PermissionDenied
    );
    assert_eq!(stats(&mut alice).await.0, 0, "nothing was built");
    assert!(alice.build_index(&req).await.unwrap().ready());
    assert_eq!(
        status(
            bob.retrieve(&retrieve_req(ns, chain(0..64), 0))
                .await
                .unwrap_err()
        ),
        Code::PermissionDenied
    );
    let out = alice
        .retrieve(&retrieve_req(ns, chain(0..64), 0))
        .await
        .unwrap();
    assert!(out.heads.iter().all(|h| h.source == RetrieveSource::Index));
    d.stop().await;
}

// ---- KV-head selection and automatic builds (two KV heads, small heads) ----

/// Head dimension, KV heads, query heads and layers of `layout2`.
const D2: usize = 32;
const KV2: usize = 2;
const Q2: usize = 4;
const L2: usize = 2;

fn layout2() -> Layout {
    Layout {
        model_id: "retrieval/kv2".into(),
        dtype: Dtype::F32,
        num_layers: L2 as u32,
        num_kv_heads: KV2 as u32,
        head_dim: D2 as u32,
        tokens_per_block: TPB as u32,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

fn ckey(chain: u8, b: usize) -> BlockKey {
    let mut k = [0u8; 8];
    k[0] = chain;
    k[4..].copy_from_slice(&(b as u32).to_be_bytes());
    BlockKey::new(&k).unwrap()
}

fn ckeys(chain: u8, blocks: std::ops::Range<usize>) -> Vec<BlockKey> {
    blocks.map(|b| ckey(chain, b)).collect()
}

/// A block's values, `(layers, K/V, tokens, kv_heads, d)`, seeded by its key.
fn block_f32(k: &BlockKey) -> Vec<f32> {
    let mut s = strata_proto::checksum(k.as_bytes()) | 1;
    (0..L2 * 2 * TPB * KV2 * D2)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
        })
        .collect()
}

/// The keys of `layer` and `head` over `keys`, `[n][d]`.
fn head_keys(keys: &[BlockKey], layer: usize, head: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for k in keys {
        let b = block_f32(k);
        for t in 0..TPB {
            let at = (((layer * 2) * TPB + t) * KV2 + head) * D2;
            out.extend_from_slice(&b[at..at + D2]);
        }
    }
    out
}

/// Stores `keys` as one chain whose first block's parent is `parent`.
async fn put_chain(c: &mut Client, ns: NamespaceId, keys: &[BlockKey], parent: Option<BlockKey>) {
    let blocks: Vec<PutBlock> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| PutBlock {
            key: *k,
            parent: if i == 0 { parent } else { Some(keys[i - 1]) },
            data: Bytes::from(
                block_f32(k)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
        })
        .collect();
    c.put(ns, &blocks).await.unwrap();
}

/// `[Q2][D2]` queries, seeded.
fn q2(seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..Q2 * D2)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
        })
        .collect()
}

fn build2(
    ns: NamespaceId,
    keys: Vec<BlockKey>,
    layer: u32,
    kv_heads: Vec<u32>,
) -> BuildIndexRequest {
    BuildIndexRequest {
        namespace: ns,
        keys,
        layers: vec![layer],
        training: vec![],
        wait: true,
        kv_heads,
    }
}

async fn retrieve2(
    c: &mut Client,
    ns: NamespaceId,
    keys: &[BlockKey],
    layer: u32,
    seed: u64,
) -> strata_client::retrieval::RetrieveOutput {
    c.retrieve(&RetrieveRequest {
        namespace: ns,
        keys: keys.to_vec(),
        layer,
        queries: q2(seed),
        k: Some(20),
        ef: None,
    })
    .await
    .unwrap()
}

fn sources(out: &strata_client::retrieval::RetrieveOutput) -> Vec<RetrieveSource> {
    out.heads.iter().map(|h| h.source).collect()
}

/// Query heads 0 and 1 answered exactly over KV head 0's keys: the exact
/// top-k of `exact_search` on the same keys.
fn assert_exact_on_head0(
    out: &strata_client::retrieval::RetrieveOutput,
    keys: &[BlockKey],
    layer: usize,
    seed: u64,
) {
    let k0 = head_keys(keys, layer, 0);
    let q = q2(seed);
    let mut hits = Hits::new();
    exact_search(&k0, D2, &q[..2 * D2], 20, &mut hits);
    for h in 0..2 {
        let want: Vec<u64> = hits.ids(h).iter().map(|&t| t as u64).collect();
        assert_eq!(out.heads[h].positions, want, "query head {h}");
        assert_eq!(out.heads[h].scanned as usize, keys.len() * TPB);
    }
}

/// The value of a metric line (`name` with its labels), 0 if absent.
async fn metric(d: &TestDaemon, name: &str) -> f64 {
    let (_, body) = http_get(d.metrics, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// BuildIndex's `kv_heads`: only the chosen heads are indexed (estimate,
/// count, status), the others are answered exactly and say so (Retrieve
/// and Attend), inserts follow the selection, and asking later for another
/// head rebuilds the group for the union (the replaced group gives back
/// exactly its own count).
#[tokio::test]
async fn kv_heads_choose_what_is_indexed() {
    let d = start_daemon(|c| c.retrieval.sweep_ms = 3_600_000).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout2()).await.unwrap().namespace;
    let a = ckeys(b'A', 0..56);
    let b = ckeys(b'B', 0..48);
    put_chain(&mut c, ns, &a[..48], None).await;
    put_chain(&mut c, ns, &b, None).await;
    let reg = d.running.as_ref().unwrap().retrieval.clone();

    // While building (held): one head of A, both of B; the estimate is
    // per head (same length: B's is twice A's).
    let hold = reg.hold_builds().await;
    let mut req = build2(ns, a[..48].to_vec(), 0, vec![1]);
    req.wait = false;
    let out = c.build_index(&req).await.unwrap();
    let st: Vec<_> = out
        .indexes
        .iter()
        .map(|i| (i.layer, i.kv_head, i.state))
        .collect();
    assert_eq!(st, [(0, 1, IndexState::Building)]);
    let (n1, e1) = stats(&mut c).await;
    assert_eq!(n1, 1);
    assert!(e1 > 0);
    let mut req = build2(ns, b.clone(), 0, vec![]);
    req.wait = false;
    let out = c.build_index(&req).await.unwrap();
    let heads: Vec<_> = out.indexes.iter().map(|i| i.kv_head).collect();
    assert_eq!(heads, [0, 1]);
    assert_eq!(stats(&mut c).await, (3, 3 * e1));
    drop(hold);
    assert!(
        c.build_index(&build2(ns, a[..48].to_vec(), 0, vec![1]))
            .await
            .unwrap()
            .ready()
    );
    assert!(
        c.build_index(&build2(ns, b.clone(), 0, vec![]))
            .await
            .unwrap()
            .ready()
    );

    // Retrieve: KV head 0's query heads by exact scan, KV head 1's by the
    // index; another layer has no index at all.
    let out = retrieve2(&mut c, ns, &a[..48], 0, 1).await;
    use RetrieveSource::{ExactNoIndex, Index};
    assert_eq!(sources(&out), [ExactNoIndex, ExactNoIndex, Index, Index]);
    assert_exact_on_head0(&out, &a[..48], 0, 1);
    assert!(out.heads[2].scanned < (48 * TPB) as u32 || out.heads[2].positions.len() == 20);
    let out = retrieve2(&mut c, ns, &a[..48], 1, 1).await;
    assert_eq!(sources(&out), [ExactNoIndex; 4]);

    // New blocks are inserted into the indexed head only; the exact heads
    // scan the whole longer chain.
    put_chain(&mut c, ns, &a[48..], Some(a[47])).await;
    let out = retrieve2(&mut c, ns, &a, 0, 2).await;
    assert_eq!(out.inserted_tokens as usize, 8 * TPB);
    assert_eq!(out.tokens_present as usize, 56 * TPB);
    assert_eq!(sources(&out), [ExactNoIndex, ExactNoIndex, Index, Index]);
    assert_exact_on_head0(&out, &a, 0, 2);
    let mut req = build2(ns, a.clone(), 0, vec![1]);
    req.wait = false;
    let out = c.build_index(&req).await.unwrap();
    assert_eq!(out.indexes.len(), 1);
    assert_eq!(out.indexes[0].kv_head, 1);
    assert_eq!(out.indexes[0].tokens as usize, 56 * TPB);
    assert_eq!(out.indexes[0].inserted_tokens as usize, 8 * TPB);
    assert_eq!(stats(&mut c).await.0, 3, "reported, not rebuilt");

    // Attend RETRIEVAL says the same per KV head.
    let out = c
        .attend(&AttendRequest {
            io_dtype: IoDtype::F32,
            min_precision: Precision::Stored,
            namespace: ns,
            layer: 0,
            mode: AttendMode::Retrieval {
                k: Some(20),
                ef: None,
            },
            scale: None,
            sequences: vec![AttendSequence {
                chain: Chain::Keys(a.clone()),
                last_block_tokens: None,
                queries: q2(3),
            }],
        })
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(out.retrieval_source, [ExactNoIndex, Index]);
    assert_eq!(out.retrieval_scanned.len(), Q2);
    assert_eq!(out.retrieval_scanned[0] as usize, 56 * TPB);

    // KV head 0 asked for later: the group is replaced by one for both
    // heads (the status lists the head asked for), and the replaced
    // group's single index is given back.
    let out = c
        .build_index(&build2(ns, a.clone(), 0, vec![0]))
        .await
        .unwrap();
    let st: Vec<_> = out.indexes.iter().map(|i| (i.kv_head, i.state)).collect();
    assert_eq!(st, [(0, IndexState::Ready)]);
    assert_eq!(out.indexes[0].tokens as usize, 56 * TPB);
    assert_eq!(stats(&mut c).await.0, 4);
    let out = retrieve2(&mut c, ns, &a, 0, 4).await;
    assert_eq!(sources(&out), [Index; 4]);
    assert_eq!(out.inserted_tokens, 0);

    // Dropping groups gives back what each counted.
    c.delete(ns, &[b[10]]).await.unwrap();
    let out = retrieve2(&mut c, ns, &b, 0, 5).await;
    assert_eq!(sources(&out), [RetrieveSource::ExactStale; 4]);
    assert_eq!(stats(&mut c).await.0, 2);
    c.delete(ns, &[a[3]]).await.unwrap();
    let out = retrieve2(&mut c, ns, &a, 0, 5).await;
    assert_eq!(sources(&out), [RetrieveSource::ExactStale; 4]);
    assert_eq!(stats(&mut c).await, (0, 0));
    d.stop().await;
}

/// A key-only group is rebuilt when BuildIndex brings training queries for
/// it (once: a group built with queries is reused as it is).
#[tokio::test]
async fn a_key_only_index_is_rebuilt_with_training_queries() {
    let d = start_daemon(|c| c.retrieval.sweep_ms = 3_600_000).await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    put_random(&mut c, ns, 64).await;
    let builds = "strata_retrieval_builds_total";
    let mut req = build_req(ns, chain(0..64), true);
    req.training.clear();
    assert!(c.build_index(&req).await.unwrap().ready());
    let (_, key_only) = stats(&mut c).await;
    assert_eq!(metric(&d, builds).await, 1.0);
    assert!(c.build_index(&req).await.unwrap().ready());
    assert_eq!(metric(&d, builds).await, 1.0, "the same call reuses it");
    let req = build_req(ns, chain(0..64), true);
    assert!(c.build_index(&req).await.unwrap().ready());
    assert_eq!(metric(&d, builds).await, 2.0, "rebuilt with the queries");
    let (n, with) = stats(&mut c).await;
    assert_eq!(n, 1, "replaced, not added");
    let kept = (TRAIN * HEADS * D * 4) as u64;
    assert!(with >= kept && key_only < kept, "{key_only} -> {with}");
    assert!(c.build_index(&req).await.unwrap().ready());
    assert_eq!(metric(&d, builds).await, 2.0, "reused once it has queries");
    d.stop().await;
}

/// Polls `f` every 20 ms until it is true (at most 60 s).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Retrieve on `keys` every 20 ms until query head 0 is answered by an
/// index (at most 60 s); that answer.
async fn until_indexed(
    c: &mut Client,
    ns: NamespaceId,
    keys: &[BlockKey],
    layer: u32,
) -> strata_client::retrieval::RetrieveOutput {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = retrieve2(c, ns, keys, layer, 1).await;
        if out.heads[0].source == RetrieveSource::Index {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never indexed: {:?}",
            sources(&out)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `retrieval.auto_build`: a chain stored and then quiet is indexed
/// without any BuildIndex call (configured layer and KV head only; a chain
/// below auto_min_tokens is not); a chain that grows has its new blocks
/// inserted by the same trigger; a fork is indexed as a chain of its own;
/// BuildIndex with training queries rebuilds the key-only group.
#[tokio::test]
async fn auto_build_indexes_quiet_chains() {
    let d = start_daemon(|c| {
        c.retrieval.sweep_ms = 3_600_000;
        c.retrieval.auto_build = true;
        c.retrieval.auto_layers = vec![1];
        // Head 7 does not exist in this layout: ignored.
        c.retrieval.auto_kv_heads = vec![0, 7];
        c.retrieval.auto_min_tokens = 512;
        c.retrieval.auto_quiet_ms = 200;
    })
    .await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout2()).await.unwrap().namespace;
    let short = ckeys(b'S', 0..16);
    let a = ckeys(b'A', 0..56);
    put_chain(&mut c, ns, &short, None).await;
    put_chain(&mut c, ns, &a[..40], None).await;
    use RetrieveSource::{ExactNoIndex, Index};
    let out = until_indexed(&mut c, ns, &a[..40], 1).await;
    assert_eq!(sources(&out), [Index, Index, ExactNoIndex, ExactNoIndex]);
    assert_eq!(out.tokens_present as usize, 40 * TPB);
    assert_eq!(out.inserted_tokens, 0);
    // Only layer 1; the short chain (256 tokens) was not indexed (it was
    // quiet before A, and builds run one at a time in order).
    let out = retrieve2(&mut c, ns, &a[..40], 0, 1).await;
    assert_eq!(sources(&out), [ExactNoIndex; 4]);
    let out = retrieve2(&mut c, ns, &short, 1, 1).await;
    assert_eq!(sources(&out), [ExactNoIndex; 4]);
    // At least S (a stall of auto_quiet_ms inside A's Put stream would
    // make a short prefix of A quiet too).
    assert!(metric(&d, "strata_retrieval_auto_skipped_total{reason=\"short\"}").await >= 1.0);
    assert_eq!(metric(&d, "strata_retrieval_auto_builds_total").await, 1.0);
    assert_eq!(stats(&mut c).await.0, 1);

    // A grows: the quiet trigger inserts the new blocks (no call does).
    let ext = metric(&d, "strata_retrieval_auto_extended_total").await;
    put_chain(&mut c, ns, &a[40..], Some(a[39])).await;
    eventually("A's new blocks inserted", || async {
        metric(&d, "strata_retrieval_auto_extended_total").await > ext
    })
    .await;
    let out = retrieve2(&mut c, ns, &a, 1, 2).await;
    assert_eq!(out.inserted_tokens, 0, "inserted before this call");
    assert_eq!(out.tokens_present as usize, 56 * TPB);
    assert_eq!(sources(&out), [Index, Index, ExactNoIndex, ExactNoIndex]);

    // A fork off block 19 of A: a chain of its own, indexed whole.
    let fork: Vec<BlockKey> = a[..20].iter().copied().chain(ckeys(b'F', 0..30)).collect();
    put_chain(&mut c, ns, &fork[20..], Some(a[19])).await;
    let out = until_indexed(&mut c, ns, &fork, 1).await;
    assert_eq!(out.inserted_tokens, 0);
    assert_eq!(out.tokens_present as usize, 50 * TPB);
    assert_eq!(stats(&mut c).await.0, 2);
    assert_eq!(metric(&d, "strata_retrieval_auto_builds_total").await, 2.0);
    let out = retrieve2(&mut c, ns, &a, 1, 2).await;
    assert_eq!(sources(&out)[..2], [Index, Index], "A's group is A's still");

    // BuildIndex with training queries replaces the key-only group.
    let builds = metric(&d, "strata_retrieval_builds_total").await;
    let mut req = build2(ns, a.clone(), 1, vec![0]);
    req.training = vec![LayerQueries {
        layer: 1,
        num_q_heads: Q2 as u32,
        queries: (0..64).flat_map(q2).collect(),
    }];
    assert!(c.build_index(&req).await.unwrap().ready());
    assert_eq!(
        metric(&d, "strata_retrieval_builds_total").await,
        builds + 1.0
    );
    assert!(c.build_index(&req).await.unwrap().ready());
    assert_eq!(
        metric(&d, "strata_retrieval_builds_total").await,
        builds + 1.0
    );
    assert_eq!(stats(&mut c).await.0, 2);
    d.stop().await;
}

/// An automatic build that `retrieval.max_bytes` refuses is counted; the
/// Put succeeded and nothing is held.
#[tokio::test]
async fn auto_build_refused_by_max_bytes_is_counted() {
    let d = start_daemon(|c| {
        c.retrieval.max_bytes = ByteSize(1 << 20);
        c.retrieval.auto_build = true;
        c.retrieval.auto_min_tokens = 16;
        // The whole chain arrives well within it (one Put stream).
        c.retrieval.auto_quiet_ms = 1000;
    })
    .await;
    let mut c = d.tcp_client().await;
    let ns = c.register_layout(&layout()).await.unwrap().namespace;
    // 256 blocks of 16 tokens, d = 128: about 3.4 MB of index.
    let blocks: Vec<PutBlock> = (0..256)
        .map(|b| PutBlock {
            key: key(b),
            parent: (b > 0).then(|| key(b - 1)),
            data: Bytes::from(vec![0x3c; 2 * TPB * D * 4]),
        })
        .collect();
    c.put(ns, &blocks).await.unwrap();
    eventually("the refusal counted", || async {
        metric(
            &d,
            "strata_retrieval_auto_skipped_total{reason=\"max_bytes\"}",
        )
        .await
            == 1.0
    })
    .await;
    assert_eq!(metric(&d, "strata_retrieval_auto_builds_total").await, 0.0);
    assert_eq!(stats(&mut c).await, (0, 0));
    d.stop().await;
}

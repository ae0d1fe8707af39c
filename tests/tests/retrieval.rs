//! Retrieval indexes on a real `stratad` process: `retrieval.auto_build`
//! indexes a stored chain without any BuildIndex call (only the configured
//! KV head: the other is answered by an exact scan), a bad `kv_heads`
//! entry is refused naming it, and BuildIndex for the missing head
//! completes the index.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use bytes::Bytes;
use strata_client::retrieval::{
    BuildIndexRequest, RetrieveOutput, RetrieveRequest, RetrieveSource,
};
use strata_client::{Client, PutBlock};
use strata_proto::{BlockKey, Dtype, KvKind, Layout, NamespaceId};
use strata_tests::*;

const D: usize = 32;
const KV: usize = 2;
/// Query heads (two per KV head).
const Q: usize = 4;
const TPB: usize = 16;
const BLOCKS: usize = 48;
const K: usize = 20;

fn layout() -> Layout {
    Layout {
        model_id: "e2e/retrieval".into(),
        dtype: Dtype::F32,
        num_layers: 1,
        num_kv_heads: KV as u32,
        head_dim: D as u32,
        tokens_per_block: TPB as u32,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

fn key(b: usize) -> BlockKey {
    BlockKey::new(format!("e2e-retrieval-{b}").as_bytes()).unwrap()
}

/// Uniform values in [-0.5, 0.5) from a seed.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
        })
        .collect()
}

/// Block `b`: `(1 layer, K/V, tokens, kv_heads, d)` f32.
fn block(b: usize) -> Vec<f32> {
    values(1000 + b as u64, 2 * TPB * KV * D)
}

/// KV head `h`'s keys over the chain, `[n][d]`.
fn head_keys(h: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for b in 0..BLOCKS {
        let x = block(b);
        for t in 0..TPB {
            let at = (t * KV + h) * D;
            out.extend_from_slice(&x[at..at + D]);
        }
    }
    out
}

async fn retrieve(c: &mut Client, ns: NamespaceId, keys: &[BlockKey]) -> RetrieveOutput {
    c.retrieve(&RetrieveRequest {
        namespace: ns,
        keys: keys.to_vec(),
        layer: 0,
        queries: values(7, Q * D),
        k: Some(K as u32),
        ef: None,
    })
    .await
    .unwrap()
}

fn sources(out: &RetrieveOutput) -> Vec<RetrieveSource> {
    out.heads.iter().map(|h| h.source).collect()
}

#[test]
fn auto_build_and_kv_head_selection_on_a_real_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("stratad.toml");
    std::fs::write(
        &cfg,
        "[tiers.dram]\nbytes = \"64MiB\"\n\
         [retrieval]\nauto_build = true\nauto_kv_heads = [0]\n\
         auto_min_tokens = 512\nauto_quiet_ms = 100\n",
    )
    .unwrap();
    let d = Daemon::spawn(&["--config", cfg.to_str().unwrap()]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        let ns = c.register_layout(&layout()).await.unwrap().namespace;
        let keys: Vec<BlockKey> = (0..BLOCKS).map(key).collect();
        let blocks: Vec<PutBlock> = (0..BLOCKS)
            .map(|b| PutBlock {
                key: keys[b],
                parent: (b > 0).then(|| keys[b - 1]),
                data: Bytes::from(
                    block(b)
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect::<Vec<u8>>(),
                ),
            })
            .collect();
        c.put(ns, &blocks).await.unwrap();

        // No BuildIndex: the daemon indexes the chain once it is quiet.
        let deadline = Instant::now() + Duration::from_secs(60);
        let out = loop {
            let out = retrieve(&mut c, ns, &keys).await;
            if out.heads[0].source == RetrieveSource::Index {
                break out;
            }
            assert!(
                Instant::now() < deadline,
                "never indexed: {:?}\n{}",
                sources(&out),
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        use RetrieveSource::{ExactNoIndex, Index};
        assert_eq!(sources(&out), [Index, Index, ExactNoIndex, ExactNoIndex]);
        assert_eq!(out.tokens_present as usize, BLOCKS * TPB);
        // KV head 1 is not indexed (auto_kv_heads = [0]): its query heads
        // scanned every key and found the exact top-k (f64 reference).
        let k1 = head_keys(1);
        let q = values(7, Q * D);
        for h in 2..Q {
            let hit = &out.heads[h];
            assert_eq!(hit.scanned as usize, BLOCKS * TPB);
            let mut s: Vec<(f64, usize)> = (0..BLOCKS * TPB)
                .map(|t| {
                    let dot: f64 = (0..D)
                        .map(|i| k1[t * D + i] as f64 * q[h * D + i] as f64)
                        .sum();
                    (dot, t)
                })
                .collect();
            s.sort_by(|a, b| b.0.total_cmp(&a.0));
            let want: Vec<u64> = s[..K].iter().map(|&(_, t)| t as u64).collect();
            let same = hit.positions.iter().filter(|p| want.contains(p)).count();
            assert!(
                same >= K - 1,
                "query head {h}: {:?} vs {want:?}",
                hit.positions
            );
        }
        let s = c.stats().await.unwrap();
        assert_eq!(s.retrieval_indexes, 1, "one layer, one KV head");

        // A bad kv_heads entry is refused, naming it.
        let req = |kv_heads: Vec<u32>| BuildIndexRequest {
            namespace: ns,
            keys: keys.clone(),
            layers: vec![],
            training: vec![],
            wait: true,
            kv_heads,
        };
        for (kv_heads, field) in [(vec![0, 2], "kv_heads[1]: "), (vec![1, 1], "kv_heads[1]: ")] {
            match c.build_index(&req(kv_heads)).await.unwrap_err() {
                strata_client::Error::Status(s) => {
                    // tonic::Code::InvalidArgument (tonic is not a dependency here).
                    assert_eq!(format!("{:?}", s.code()), "InvalidArgument", "{s:?}");
                    assert!(s.message().starts_with(field), "{s:?}");
                }
                e => panic!("{e}"),
            }
        }
        assert_eq!(
            c.stats().await.unwrap().retrieval_indexes,
            1,
            "nothing changed"
        );

        // Asking for KV head 1 completes the index: every head from it.
        let b = c.build_index(&req(vec![1])).await.unwrap();
        assert!(b.ready(), "{:?}", b.indexes);
        assert_eq!(b.indexes.len(), 1);
        assert_eq!(b.indexes[0].kv_head, 1);
        let out = retrieve(&mut c, ns, &keys).await;
        assert_eq!(sources(&out), [Index; Q]);
        assert_eq!(c.stats().await.unwrap().retrieval_indexes, 2);
    });
    let (_, metrics) = http_get(d.metrics_port, "/metrics").unwrap();
    assert!(
        metrics.contains("strata_retrieval_auto_builds_total 1"),
        "{metrics}"
    );
}

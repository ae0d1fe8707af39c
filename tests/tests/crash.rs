//! Crash safety of the real daemon: `stratad` is killed with SIGKILL at a
//! random moment while clients stream puts; after a restart on the same
//! data directory, every block whose put was acknowledged as durable is
//! returned byte-exact, and no block is ever returned with wrong bytes.
//!
//! Durable means: the block's NVMe record write completed. The daemon runs
//! with write-through here, so a put is acknowledged only after that write
//! and says `durable = true`.
//!
//! `STRATA_CRASH_ITERS` sets the number of kill/restart rounds (default 6);
//! `STRATA_CRASH_SEED` the first seed. A failure prints its seed.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_client::{Client, PutBlock};
use strata_proto::{BlockKey, Dtype, KvKind, Layout, NamespaceId};
use strata_tests::*;

fn layout() -> Layout {
    Layout {
        model_id: "crash-test".into(),
        dtype: Dtype::F16,
        num_layers: 8,
        num_kv_heads: 2,
        head_dim: 64,
        tokens_per_block: 16,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

fn key(client: u8, n: u32) -> BlockKey {
    let mut k = [0u8; 8];
    k[0] = 0xcc;
    k[1] = client;
    k[4..].copy_from_slice(&n.to_be_bytes());
    BlockKey::new(&k).unwrap()
}

const CONFIG: &str = r#"
[tiers.dram]
bytes = "16MiB"
[tiers.nvme]
# Large enough that no reclaim drops anything: this test is about crashes,
# not about what a full cache chooses to forget.
bytes = "2GiB"
segment_bytes = "8MiB"
write_through = true
"#;

fn start(dir: &std::path::Path) -> Daemon {
    let cfg = dir.join("crash.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    Daemon::spawn_in(dir, &["--config", cfg.to_str().unwrap()])
}

/// One round: puts, a kill at a random moment, a restart, the checks.
fn round(
    seed: u64,
    dir: &std::path::Path,
    all_durable: &mut HashSet<BlockKey>,
    written: &mut HashSet<BlockKey>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut d = start(dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let acked: Arc<Mutex<Vec<BlockKey>>> = Arc::default();
    let tried: Arc<Mutex<Vec<BlockKey>>> = Arc::default();
    let kill_after = Duration::from_millis(rng.random_range(50..600));
    let base = (seed as u32).wrapping_mul(100_000);
    rt.block_on(async {
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        let ns = c.register_layout(&layout()).await.unwrap();
        let mut tasks = vec![];
        for client in 0..4u8 {
            let (ep, acked, tried) = (d.endpoint(), acked.clone(), tried.clone());
            let per_call = rng.random_range(1..5u32);
            tasks.push(tokio::spawn(async move {
                let Ok(mut c) = Client::connect(&ep).await else {
                    return;
                };
                let mut n = base;
                // At most 160 blocks (10 MiB) per client and round.
                while n < base + 160 {
                    let keys: Vec<_> = (0..per_call).map(|i| key(client, n + i)).collect();
                    n += per_call;
                    let blocks: Vec<_> = keys
                        .iter()
                        .map(|k| PutBlock {
                            key: *k,
                            parent: None,
                            data: Bytes::from(payload(k.as_bytes(), ns.block_bytes as usize)),
                        })
                        .collect();
                    tried.lock().unwrap().extend_from_slice(&keys);
                    match c.put_durable(ns.namespace, &blocks).await {
                        Ok(out) => {
                            for (k, (_, durable)) in keys.iter().zip(out) {
                                if durable {
                                    acked.lock().unwrap().push(*k);
                                }
                            }
                        }
                        Err(_) => return, // the daemon died
                    }
                }
            }));
        }
        tokio::time::sleep(kill_after).await;
        signal(d.pid(), "KILL");
        for t in tasks {
            let _ = t.await;
        }
    });
    let _ = d.child.wait();
    all_durable.extend(acked.lock().unwrap().iter().copied());
    written.extend(tried.lock().unwrap().iter().copied());

    // Restart on the same directory and check.
    let d2 = start(dir);
    rt.block_on(async {
        let mut c = Client::connect(&d2.endpoint()).await.unwrap();
        let ns = c.register_layout(&layout()).await.unwrap();
        let want = ns.block_bytes as usize;
        let durable: Vec<_> = all_durable.iter().copied().collect();
        for chunk in durable.chunks(64) {
            let got = c.get(ns.namespace, chunk, None).await.unwrap_or_else(|e| {
                panic!("seed {seed}: durable blocks missing after SIGKILL and restart: {e}")
            });
            for (k, b) in chunk.iter().zip(got) {
                assert_eq!(
                    &b.data[..],
                    &payload(k.as_bytes(), want)[..],
                    "seed {seed}: wrong bytes for {k}"
                );
            }
        }
        // Blocks whose puts were cut off: absent, or whole and exact.
        let others: Vec<_> = written.difference(all_durable).copied().collect();
        for k in others.iter().take(200) {
            if let Ok(b) = c.get(ns.namespace, &[*k], None).await {
                assert_eq!(
                    &b[0].data[..],
                    &payload(k.as_bytes(), want)[..],
                    "seed {seed}: wrong bytes for {k}"
                );
            }
        }
        check_no_foreign(&mut c, ns.namespace).await;
    });
    let mut d2 = d2;
    let status = d2.terminate();
    assert!(
        status.success(),
        "seed {seed}: restart did not stop cleanly: {}",
        d2.log_text()
    );
}

async fn check_no_foreign(c: &mut Client, ns: NamespaceId) {
    let s = c.stats().await.unwrap();
    assert_eq!(
        s.checksum_failures, 0,
        "namespace {ns}: a checksum failed after restart"
    );
}

#[test]
fn sigkill_during_puts_loses_nothing_durable() {
    let iters: u64 = std::env::var("STRATA_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let first: u64 = std::env::var("STRATA_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0xc4a5);
    let dir = tempfile::tempdir().unwrap();
    let mut durable = HashSet::new();
    let mut written = HashSet::new();
    for i in 0..iters {
        let seed = first + i;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            round(seed, dir.path(), &mut durable, &mut written)
        }));
        if let Err(e) = r {
            eprintln!(
                "crash test failed at seed {seed}; rerun with STRATA_CRASH_SEED={seed} STRATA_CRASH_ITERS=1"
            );
            std::panic::resume_unwind(e);
        }
    }
    assert!(
        !durable.is_empty(),
        "no put was ever acknowledged durable: the test proved nothing"
    );
    eprintln!(
        "crash test: {iters} kills, {} durable blocks checked",
        durable.len()
    );
}

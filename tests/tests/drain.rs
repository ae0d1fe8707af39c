//! Drain under load, on real `stratad` processes: several clients put
//! concurrently (stream over TCP and the Unix socket, zero-copy), the daemon
//! is drained mid-way (`strata drain`, or SIGTERM), exits 0, and a restart
//! on the same data directory serves every block that was acknowledged,
//! byte for byte. Puts are not written through: the blocks acknowledged
//! before the drain are held only in DRAM until the drain writes them down.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use strata_client::{Client, Error, LocalClient, LocalPut, PutBlock};
use strata_proto::{BlockKey, Dtype, KvKind, Layout, NamespaceId, pb};
use strata_tests::*;

/// 8 tokens x 4 layers x K,V x 2 heads x 32 dim x bf16 = 8 KiB per block.
fn layout() -> Layout {
    Layout {
        model_id: "drain/model".into(),
        dtype: Dtype::Bf16,
        num_layers: 4,
        num_kv_heads: 2,
        head_dim: 32,
        tokens_per_block: 8,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

/// DRAM holds everything the writers can put (no eviction, so every
/// acknowledged block must survive); the NVMe tier holds it all too.
const CONFIG: &str = "[server]\ndrain_timeout_ms = 60000\n[tiers.dram]\nbytes = \"64MiB\"\n[tiers.nvme]\nbytes = \"256MiB\"\n";
const WRITERS: u32 = 6;
const ROUNDS: u32 = 150;
const CHAIN: usize = 4;

fn key(writer: u32, round: u32, i: usize) -> BlockKey {
    let mut b = [0u8; 9];
    b[0] = 0xd7;
    b[1..5].copy_from_slice(&writer.to_le_bytes());
    b[5..8].copy_from_slice(&round.to_le_bytes()[..3]);
    b[8] = i as u8;
    BlockKey::new(&b).unwrap()
}

struct Load {
    acked: Arc<Mutex<Vec<BlockKey>>>,
    /// How each writer stopped (None: it ran all its rounds).
    ends: Vec<tokio::task::JoinHandle<Option<Error>>>,
}

/// Writers putting chains until a put fails: stream puts over TCP and the
/// Unix socket, and zero-copy puts. Each acknowledged block is recorded.
fn start_load(d: &Daemon, ns: NamespaceId, block: usize) -> Load {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut ends = Vec::new();
    for w in 0..WRITERS {
        let (tcp, uds, acked) = (d.endpoint(), d.uds.clone(), acked.clone());
        ends.push(tokio::spawn(async move {
            let mut stream = match w % 3 {
                0 => Some(Client::connect(&tcp).await.unwrap()),
                1 => Some(
                    Client::connect(&format!("unix:{}", uds.display()))
                        .await
                        .unwrap(),
                ),
                _ => None,
            };
            let mut local = match w % 3 {
                2 => Some(LocalClient::connect(&uds).await.unwrap()),
                _ => None,
            };
            for r in 0..ROUNDS {
                let keys: Vec<_> = (0..CHAIN).map(|i| key(w, r, i)).collect();
                let datas: Vec<_> = keys.iter().map(|k| payload(k.as_bytes(), block)).collect();
                let res = if let Some(c) = stream.as_mut() {
                    let blocks: Vec<_> = keys
                        .iter()
                        .enumerate()
                        .map(|(i, k)| PutBlock {
                            key: *k,
                            parent: (i > 0).then(|| keys[i - 1]),
                            data: Bytes::from(datas[i].clone()),
                        })
                        .collect();
                    c.put(ns, &blocks).await.map(|_| ())
                } else {
                    let lc = local.as_mut().unwrap();
                    let puts: Vec<_> = keys
                        .iter()
                        .enumerate()
                        .map(|(i, k)| LocalPut {
                            key: *k,
                            parent: (i > 0).then(|| keys[i - 1]),
                            data: &datas[i],
                        })
                        .collect();
                    lc.put(ns, &puts).await.map(|_| ())
                };
                match res {
                    Ok(()) => acked.lock().unwrap().extend(keys),
                    Err(e) => return Some(e),
                }
            }
            None
        }));
    }
    Load { acked, ends }
}

impl Load {
    async fn wait_for(&self, blocks: usize) {
        for _ in 0..3000 {
            if self.acked.lock().unwrap().len() >= blocks {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the writers did not store {blocks} blocks");
    }

    /// Waits for every writer; checks that each one that stopped early
    /// stopped because the daemon was draining or gone, never for anything
    /// else. Returns the acknowledged keys and how many writers were told
    /// "draining".
    async fn finish(self) -> (Vec<BlockKey>, usize) {
        let mut told = 0;
        for e in self.ends {
            match e.await.unwrap() {
                None => {}
                Some(e) if e.to_string().contains("stratad is draining") => {
                    assert!(e.to_string().starts_with("UNAVAILABLE: "), "{e}");
                    told += 1;
                }
                // The daemon stopped serving between two puts of this
                // writer (a transport error, never a refusal of the block).
                Some(e)
                    if e.code().is_none()
                        || ["UNAVAILABLE", "CANCELLED", "UNKNOWN"]
                            .iter()
                            .any(|c| e.to_string().starts_with(c)) => {}
                Some(e) => panic!("a writer failed for another reason: {e}"),
            }
        }
        let acked = self.acked.lock().unwrap().clone();
        (acked, told)
    }
}

/// Restarts on `data` and reads every acknowledged block back.
fn verify_after_restart(data: &Path, args: &[&str], acked: &[BlockKey], block: usize) {
    let mut d = Daemon::spawn_in(data, args);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        let reg = c.register_layout(&layout()).await.unwrap();
        assert!(reg.existed);
        for part in acked.chunks(64) {
            let got = c.get(reg.namespace, part, None).await.unwrap_or_else(|e| {
                panic!("an acknowledged block is missing after the restart: {e}")
            });
            for (g, k) in got.iter().zip(part) {
                assert!(
                    g.data[..] == payload(k.as_bytes(), block)[..],
                    "{k}: bytes differ after the restart"
                );
            }
        }
    });
    assert!(d.terminate().success());
}

fn config(dir: &Path) -> String {
    let cfg = dir.join("drain.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    cfg.display().to_string()
}

/// `strata drain` under load. While the drain waits for an open zero-copy
/// reservation: /readyz is 503 and says it is draining, new puts (stream,
/// zero-copy, CLI) are refused with UNAVAILABLE naming the drain, Stats
/// says draining, and committing the open reservation still works (its
/// block is written through before the ack). Then DRAM is written down,
/// the daemon exits 0, and a restart serves every acknowledged block.
#[test]
fn strata_drain_under_load_loses_no_acknowledged_block() {
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path());
    let args = ["--config", cfg.as_str()];
    let mut d = Daemon::spawn_in(data.path(), &args);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let (acked, block, drain_out) = rt.block_on(async {
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        let reg = c.register_layout(&layout()).await.unwrap();
        let (ns, block) = (reg.namespace, reg.block_bytes as usize);
        let load = start_load(&d, ns, block);
        load.wait_for(200).await;
        // A zero-copy reservation, written but not committed yet.
        let mut lc = LocalClient::connect(&d.uds).await.unwrap();
        let held = BlockKey::new(b"held-through-the-drain").unwrap();
        let held_data = payload(held.as_bytes(), block);
        let r = lc
            .client()
            .rpc()
            .reserve(pb::ReserveRequest {
                namespace_id: ns.0,
                blocks: vec![pb::ReserveBlock {
                    key: Bytes::copy_from_slice(held.as_bytes()),
                    parent: Bytes::new(),
                    length: block as u64,
                }],
                ttl_ms: 120_000,
            })
            .await
            .unwrap()
            .into_inner();
        let res = &r.reservations[0];
        let sum = lc
            .arena()
            .write_checksummed(res.slot.as_ref().unwrap().offset, &held_data)
            .unwrap();
        // Drain through the CLI, as an operator would.
        let ep = d.endpoint();
        let drain = tokio::task::spawn_blocking(move || strata(&ep, &["drain"]));
        // Not ready from the start of the drain.
        let mut ready = (200, String::new());
        for _ in 0..1000 {
            ready = http_get(d.metrics_port, "/readyz").unwrap();
            if ready.0 == 503 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(ready.0, 503, "{}", ready.1);
        assert!(ready.1.contains("draining"), "{}", ready.1);
        let (_, m) = http_get(d.metrics_port, "/metrics").unwrap();
        assert!(
            m.contains("strata_draining 1") && m.contains("strata_ready 0"),
            "the drain shows in the metrics"
        );
        // The reservation holds the drain: new puts are refused meanwhile.
        let e = c
            .put(
                ns,
                &[PutBlock {
                    key: BlockKey::new(b"refused").unwrap(),
                    parent: None,
                    data: Bytes::from(vec![1u8; block]),
                }],
            )
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("UNAVAILABLE: stratad is draining"),
            "{e}"
        );
        let e = lc
            .put(
                ns,
                &[LocalPut {
                    key: BlockKey::new(b"refused-too").unwrap(),
                    parent: None,
                    data: &vec![2u8; block],
                }],
            )
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("UNAVAILABLE: stratad is draining"),
            "{e}"
        );
        let f = data.path().join("one-block");
        std::fs::write(&f, vec![3u8; block]).unwrap();
        let o = d.strata(&[
            "put",
            "--namespace",
            &ns.to_string(),
            "--key",
            "abcd",
            f.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(
            err.contains("UNAVAILABLE: stratad is draining")
                && err.contains("hint: the daemon is draining"),
            "{err}"
        );
        assert!(c.stats().await.unwrap().draining);
        // Committing the open reservation still works, and is durable.
        let out = lc
            .client()
            .rpc()
            .commit(pb::CommitRequest {
                blocks: vec![pb::CommitBlock {
                    reservation_id: res.reservation_id,
                    checksum: sum,
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            out.outcomes[0].durable,
            "a commit during a drain is written through"
        );
        let (mut acked, told) = load.finish().await;
        eprintln!(
            "{} blocks acknowledged; {told} writers told 'draining'",
            acked.len()
        );
        acked.push(held);
        (acked, block, drain.await.unwrap())
    });
    let out = String::from_utf8_lossy(&drain_out.stdout).into_owned();
    let progress = String::from_utf8_lossy(&drain_out.stderr).into_owned();
    assert!(
        progress.contains("drain: refusing new puts; waiting for")
            && progress.contains(" open reservations")
            && progress.contains("writing DRAM down to NVMe"),
        "{progress}"
    );
    assert!(
        drain_out.status.success(),
        "{}",
        String::from_utf8_lossy(&drain_out.stderr)
    );
    assert!(out.starts_with("drained: "), "{out}");
    assert!(
        out.contains(" 0 failed; 0 blocks held only in DRAM are lost"),
        "{out}"
    );
    let status = d.child.wait().unwrap();
    assert!(status.success(), "exit status {status}: {}", d.log_text());
    let log = d.log_text();
    assert!(log.contains("drain requested (strata drain)"), "{log}");
    verify_after_restart(data.path(), &args, &acked, block);
}

/// SIGTERM under load drains the same way: exit 0, and a restart serves
/// every acknowledged block.
#[test]
fn sigterm_under_load_loses_no_acknowledged_block() {
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path());
    let args = ["--config", cfg.as_str()];
    let mut d = Daemon::spawn_in(data.path(), &args);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let pid = d.pid();
    let (acked, block) = rt.block_on(async {
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        let reg = c.register_layout(&layout()).await.unwrap();
        let (ns, block) = (reg.namespace, reg.block_bytes as usize);
        let load = start_load(&d, ns, block);
        load.wait_for(200).await;
        signal(pid, "TERM");
        let (acked, _) = load.finish().await;
        (acked, block)
    });
    let status = d.child.wait().unwrap();
    assert!(status.success(), "exit status {status}: {}", d.log_text());
    let log = d.log_text();
    assert!(
        log.contains("signal received: draining") && log.contains("drain done"),
        "{log}"
    );
    verify_after_restart(data.path(), &args, &acked, block);
}

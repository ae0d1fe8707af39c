//! Boundary 3: the `stratad` binary end to end, through the `strata` CLI and
//! the Rust client (stream and zero-copy paths).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use strata_client::{Client, LocalClient, LocalPut, PutBlock, keys::chain_keys};
use strata_proto::{BlockKey, Dtype, KvKind, Layout};
use strata_tests::*;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn layout(tokens: u32) -> Layout {
    Layout {
        model_id: "e2e/model".into(),
        dtype: Dtype::Bf16,
        num_layers: 4,
        num_kv_heads: 2,
        head_dim: 32,
        tokens_per_block: tokens,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

#[test]
fn cli_end_to_end() {
    let d = Daemon::spawn(&["--dram-bytes", "64MiB"]);
    let out = d.strata(&[
        "layout",
        "register",
        "--model",
        "m",
        "--dtype",
        "f16",
        "--layers",
        "2",
        "--kv-heads",
        "2",
        "--head-dim",
        "16",
        "--block-tokens",
        "16",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ns = text(&out.stdout);
    let ns = ns.trim();
    assert_eq!(ns.len(), 16, "the namespace id alone on stdout: {ns:?}");
    let dir = d.dir.path();
    let b0 = dir.join("b0");
    let b1 = dir.join("b1");
    std::fs::write(&b0, payload(b"b0", 16 * 256)).unwrap();
    std::fs::write(&b1, payload(b"b1", 8 * 256)).unwrap(); // a partial block: 8 tokens
    let put = |key: &str, parent: Option<&str>, f: &std::path::Path| {
        let mut a = vec!["put", "--namespace", ns, "--key", key];
        if let Some(p) = parent {
            a.extend(["--parent", p]);
        }
        let f = f.to_str().unwrap();
        a.push(f);
        d.strata(&a)
    };
    let o = put("a001", None, &b0);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("stored a001"));
    let o = put("a001", None, &b0);
    assert!(
        text(&o.stderr).contains("already present"),
        "{}",
        text(&o.stderr)
    );
    assert!(put("a002", Some("a001"), &b1).status.success());
    let o = d.strata(&["lookup", "--namespace", ns, "a001", "a002", "a003"]);
    assert!(o.status.success());
    assert_eq!(text(&o.stdout), "hits: 2 of 3\na001 dram\na002 dram\n");
    let got = dir.join("got");
    let o = d.strata(&[
        "get",
        "--namespace",
        ns,
        "--key",
        "a002",
        "-o",
        got.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(&got).unwrap(), std::fs::read(&b1).unwrap());
    let o = d.strata(&["stats"]);
    assert!(o.status.success());
    let s = text(&o.stdout);
    assert!(s.contains("2 blocks, 1 namespaces"), "{s}");
    assert!(
        s.lines()
            .any(|l| l.starts_with("dram ") && l.contains("67108864")),
        "{s}"
    );
    // The Unix socket endpoint works the same.
    let o = strata(&d.uds_endpoint(), &["lookup", "--namespace", ns, "a001"]);
    assert_eq!(text(&o.stdout), "hits: 1 of 1\na001 dram\n");
    let o = d.strata(&["delete", "--namespace", ns, "a002", "a009"]);
    assert_eq!(text(&o.stdout), "deleted: 1\nabsent: a009\n");
}

#[test]
fn cli_errors_say_what_to_do() {
    let d = Daemon::spawn(&["--dram-bytes", "32MiB"]);
    let cases: &[(&[&str], &str)] = &[
        (
            &["lookup", "--namespace", "00000000000000ff", "aa"],
            "namespace_id: namespace 00000000000000ff is not registered",
        ),
        (&["lookup", "--namespace", "xyz", "aa"], "not hexadecimal"),
        (
            &["get", "--namespace", "1", "--key", "zz", "-o", "/dev/null"],
            "not hexadecimal",
        ),
        (
            &[
                "layout",
                "register",
                "--model",
                "m",
                "--dtype",
                "f16",
                "--layers",
                "0",
                "--kv-heads",
                "1",
                "--head-dim",
                "8",
                "--block-tokens",
                "4",
            ],
            "INVALID_ARGUMENT: layout.num_layers: must be at least 1",
        ),
        (
            &[
                "layout",
                "register",
                "--model",
                "m",
                "--dtype",
                "f64",
                "--layers",
                "1",
                "--kv-heads",
                "1",
                "--head-dim",
                "8",
                "--block-tokens",
                "4",
            ],
            "is not one of f32, f16, bf16, fp8",
        ),
        (
            &[
                "put",
                "--namespace",
                "1",
                "--key",
                "aa",
                "/nonexistent/file",
            ],
            "cannot read /nonexistent/file",
        ),
    ];
    for (args, want) in cases {
        let o = d.strata(args);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(
            text(&o.stderr).contains(want),
            "{args:?}: {}",
            text(&o.stderr)
        );
    }
    let ns = text(
        &d.strata(&[
            "layout",
            "register",
            "--model",
            "m",
            "--dtype",
            "f16",
            "--layers",
            "1",
            "--kv-heads",
            "1",
            "--head-dim",
            "8",
            "--block-tokens",
            "4",
        ])
        .stdout,
    );
    let ns = ns.trim();
    let o = d.strata(&["get", "--namespace", ns, "--key", "abcd", "-o", "/dev/null"]);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(
        e.contains("NOT_FOUND: keys[0]: block abcd is not present")
            && e.contains("hint: the block is not cached"),
        "{e}"
    );
    let f = d.dir.path().join("odd");
    std::fs::write(&f, [1u8; 7]).unwrap();
    let o = d.strata(&["put", "--namespace", ns, "--key", "aa", f.to_str().unwrap()]);
    assert!(
        text(&o.stderr).contains("blocks[0].length: 7 is not a whole number of tokens"),
        "{}",
        text(&o.stderr)
    );
    // No daemon there.
    let o = strata(&format!("http://127.0.0.1:{}", free_port()), &["stats"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("hint: start the daemon with `stratad`"),
        "{}",
        text(&o.stderr)
    );
    let o = strata("localhost:1", &["stats"]);
    assert!(
        text(&o.stderr).contains("use http://host:port or unix:/path"),
        "{}",
        text(&o.stderr)
    );
}

/// `stratad` with no arguments: the embedded default config (1 GiB DRAM,
/// 127.0.0.1:7470, ./strata-data/stratad.sock, metrics on 7471), and a
/// clean exit on SIGTERM.
#[test]
fn runs_on_defaults_and_exits_cleanly_on_sigterm() {
    let cwd = tempfile::tempdir().unwrap();
    let log = cwd.path().join("log");
    let mut child = Command::new(bin("stratad"))
        .current_dir(cwd.path())
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut ready = false;
    for _ in 0..3000 {
        if let Ok((200, body)) = http_get(7471, "/readyz") {
            assert!(body.contains("dram: 1073741824 bytes"), "{body}");
            ready = true;
            break;
        }
        if let Ok(Some(s)) = child.try_wait() {
            panic!(
                "stratad exited {s}: {}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ready, "{}", std::fs::read_to_string(&log).unwrap());
    let sock = cwd.path().join("strata-data/stratad.sock");
    assert!(sock.exists() && cwd.path().join("strata-data/stratad.sock.shm").exists());
    let o = strata("http://127.0.0.1:7470", &["stats"]);
    assert!(
        text(&o.stdout).contains("1073741824"),
        "{}",
        text(&o.stdout)
    );
    signal(child.id() as i32, "TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(!sock.exists(), "socket removed on exit");
    let l = std::fs::read_to_string(&log).unwrap();
    assert!(
        l.contains("draining") && l.contains("stratad stopped"),
        "{l}"
    );
}

#[test]
fn config_file_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[tiers.dram]\nbytes = \"48MiB\"\n[store]\neviction_policy = \"lru\"\n",
    )
    .unwrap();
    let d = Daemon::spawn(&["--config", cfg.to_str().unwrap()]);
    assert!(text(&d.strata(&["stats"]).stdout).contains("50331648"));
    // A flag overrides the file.
    let d2 = Daemon::spawn(&["--config", cfg.to_str().unwrap(), "--dram-bytes", "16MiB"]);
    assert!(text(&d2.strata(&["stats"]).stdout).contains("16777216"));
    // Bad files and flags: exit 2 with the field named.
    std::fs::write(&cfg, "[tiers.dram]\nbytes = \"48 MiBs\"\n").unwrap();
    for (args, want) in [
        (vec!["--config", cfg.to_str().unwrap()], "unknown size unit"),
        (
            vec!["--dram-bytes", "12"],
            "config: tiers.dram.bytes: 12B is too small",
        ),
        (vec!["--listen", "nowhere"], "config: server.listen"),
        (
            vec!["--config", "/nonexistent.toml"],
            "cannot read config file /nonexistent.toml",
        ),
    ] {
        let o = Command::new(bin("stratad")).args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(
            text(&o.stderr).contains(want),
            "{args:?}: {}",
            text(&o.stderr)
        );
    }
    let o = Command::new(bin("stratad"))
        .arg("--print-default-config")
        .output()
        .unwrap();
    assert!(text(&o.stdout).contains("[tiers.dram]"));
}

/// 32 clients at once, 16 on the stream path (TCP and Unix socket) and 16 on
/// the zero-copy path: puts (own chains and one shared chain stored by all),
/// lookups and gets; no errors, every byte exact.
#[test]
fn thirty_two_clients_both_paths() {
    let d = Daemon::spawn(&["--dram-bytes", "256MiB"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ns = Client::connect(&d.endpoint())
            .await
            .unwrap()
            .register_layout(&layout(16))
            .await
            .unwrap();
        let block = ns.block_bytes as usize; // 16 tokens x 4 layers x 2 x 2 x 32 x 2 = 32 KiB
        let ns = ns.namespace;
        let mut tasks = vec![];
        for c in 0..32u32 {
            let (tcp, uds) = (d.endpoint(), d.uds.clone());
            tasks.push(tokio::spawn(async move {
                // Shared chain: the same tokens for every client.
                let shared: Vec<u32> = (0..8 * 16).collect();
                let own: Vec<u32> = (0..12 * 16).map(|t| t * 7 + c * 100_000).collect();
                for round in 0..3 {
                    for toks in [&shared, &own] {
                        let keys = chain_keys(0, toks, 16);
                        let datas: Vec<Vec<u8>> =
                            keys.iter().map(|k| payload(k.as_bytes(), block)).collect();
                        if c % 2 == 0 {
                            let ep = if c % 4 == 0 {
                                tcp.clone()
                            } else {
                                format!("unix:{}", uds.display())
                            };
                            let mut cl = Client::connect(&ep).await.unwrap();
                            let blocks: Vec<_> = keys
                                .iter()
                                .enumerate()
                                .map(|(i, k)| PutBlock {
                                    key: *k,
                                    parent: (i > 0).then(|| keys[i - 1]),
                                    data: Bytes::from(datas[i].clone()),
                                })
                                .collect();
                            cl.put(ns, &blocks).await.unwrap();
                            let l = cl.lookup(ns, &keys, 10_000).await.unwrap();
                            assert_eq!(l.hits, keys.len(), "client {c} round {round}");
                            let got = cl.get(ns, &keys, l.lease.map(|l| l.id)).await.unwrap();
                            for (g, want) in got.iter().zip(&datas) {
                                assert_eq!(&g.data[..], &want[..], "client {c}: bytes differ");
                            }
                            cl.release(ns, l.lease.unwrap().id).await.unwrap();
                        } else {
                            let mut lc = LocalClient::connect(&uds).await.unwrap();
                            let puts: Vec<_> = keys
                                .iter()
                                .enumerate()
                                .map(|(i, k)| LocalPut {
                                    key: *k,
                                    parent: (i > 0).then(|| keys[i - 1]),
                                    data: &datas[i],
                                })
                                .collect();
                            lc.put(ns, &puts).await.unwrap();
                            let mut bufs = vec![vec![0u8; block]; keys.len()];
                            let mut dst: Vec<&mut [u8]> =
                                bufs.iter_mut().map(|b| &mut b[..]).collect();
                            let lens = lc.load_prefix(ns, &keys, &mut dst).await.unwrap();
                            assert_eq!(lens.len(), keys.len(), "client {c} round {round}");
                            for (b, want) in bufs.iter().zip(&datas) {
                                assert_eq!(b, want, "client {c}: bytes differ");
                            }
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        // Zero-copy loads release their leases in the background.
        let mut s = c.stats().await.unwrap();
        for _ in 0..500 {
            if s.leases == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            s = c.stats().await.unwrap();
        }
        assert_eq!(s.blocks, 8 + 32 * 12);
        assert_eq!((s.leases, s.reservations), (0, 0));
    });
}

/// Filling the DRAM tier twice over keeps the daemon's resident memory at
/// the tier size plus a fixed overhead.
#[test]
fn memory_stays_within_the_tier_after_filling_it_twice() {
    let tier = 64u64 << 20;
    // DRAM alone: this is about the DRAM tier's bound.
    let d = Daemon::spawn(&["--dram-bytes", "64MiB", "--nvme-bytes", "0"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut lc = LocalClient::connect(&d.uds).await.unwrap();
        let reg = lc.client().register_layout(&layout(64)).await.unwrap(); // 128 KiB blocks
        let block = reg.block_bytes as usize;
        let data = payload(b"fill", block);
        let n = (2 * tier as usize) / block;
        let toks: Vec<u32> = (0..(n * 64) as u32).collect();
        let keys = chain_keys(3, &toks, 64);
        for (i, batch) in keys.chunks(32).enumerate() {
            let puts: Vec<_> = batch
                .iter()
                .enumerate()
                .map(|(j, k)| LocalPut {
                    key: *k,
                    parent: (i * 32 + j > 0).then(|| keys[i * 32 + j - 1]),
                    data: &data,
                })
                .collect();
            lc.put(reg.namespace, &puts).await.unwrap();
        }
        let s = lc.client().stats().await.unwrap();
        assert!(s.tiers[0].used_bytes <= tier);
        assert!(s.tiers[0].evictions as usize >= n / 2, "{s:?}");
        // The oldest blocks went; the latest are all present.
        assert_eq!(
            lc.client()
                .lookup(reg.namespace, &keys[..1], 0)
                .await
                .unwrap()
                .hits,
            0
        );
        let last = &keys[keys.len() - 16..];
        assert_eq!(
            lc.client()
                .lookup(reg.namespace, last, 0)
                .await
                .unwrap()
                .hits,
            16
        );
    });
    let rss = d.rss_bytes();
    eprintln!(
        "resident after filling twice: {} MiB for a 64 MiB tier",
        rss >> 20
    );
    // Tier + fixed overhead (runtime, index, buffers); a debug build.
    assert!(
        rss < tier + (48 << 20),
        "resident {} MiB for a 64 MiB tier",
        rss >> 20
    );
}

/// SIGTERM while a put stream is in flight: the stream completes (drain
/// finishes in-flight work), new calls are refused, the exit is clean.
#[test]
fn sigterm_drains_in_flight_work() {
    let mut d = Daemon::spawn(&["--dram-bytes", "32MiB"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let endpoint = d.endpoint();
    let pid = d.pid();
    let results = rt.block_on(async move {
        let mut c = Client::connect(&endpoint).await.unwrap();
        let reg = c.register_layout(&layout(16)).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut rpc = c.rpc().clone();
        let put = tokio::spawn(async move {
            rpc.put(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let keys: Vec<BlockKey> = (0..6u8)
            .map(|i| BlockKey::new(&[0xd, i]).unwrap())
            .collect();
        for (i, k) in keys.iter().enumerate() {
            let data = payload(k.as_bytes(), reg.block_bytes as usize);
            tx.send(strata_proto::pb::PutRequest {
                header: Some(strata_proto::pb::PutHeader {
                    namespace_id: reg.namespace.0,
                    key: Bytes::copy_from_slice(k.as_bytes()),
                    parent: Bytes::new(),
                    length: data.len() as u64,
                    checksum: strata_proto::checksum(&data),
                }),
                data: Bytes::from(data),
            })
            .await
            .unwrap();
            if i == 1 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                signal(pid, "TERM");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        drop(tx);
        put.await.unwrap().map(|r| r.into_inner().outcomes.len())
    });
    assert_eq!(results.unwrap(), 6, "the in-flight stream finished");
    let status = d.terminate();
    assert!(status.success(), "{status}: {}", d.log_text());
}

/// A restart of the binary on its data directory: the NVMe cache is found
/// (with a progress line), a segment of an unknown format is left
/// untouched, a truncated segment loses only what was cut, and the daemon
/// serves and stores as before.
#[test]
fn restart_recovers_the_nvme_tier() {
    let data = tempfile::tempdir().unwrap();
    let cfg = data.path().join("c.toml");
    std::fs::write(&cfg, "[tiers.dram]\nbytes = \"8MiB\"\n[tiers.nvme]\nbytes = \"64MiB\"\nsegment_bytes = \"1MiB\"\nwrite_through = true\n").unwrap();
    let args = ["--config", cfg.to_str().unwrap()];
    let mut d = Daemon::spawn_in(data.path(), &args);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys: Vec<BlockKey> = chain_keys(9, &(0..64 * 16).collect::<Vec<u32>>(), 16);
    let block = rt.block_on(async {
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        let reg = c.register_layout(&layout(16)).await.unwrap();
        let blocks: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| PutBlock {
                key: *k,
                parent: (i > 0).then(|| keys[i - 1]),
                data: Bytes::from(payload(k.as_bytes(), reg.block_bytes as usize)),
            })
            .collect();
        let out = c.put_durable(reg.namespace, &blocks).await.unwrap();
        assert!(
            out.iter().all(|(_, durable)| *durable),
            "write-through puts must be durable"
        );
        reg.block_bytes as usize
    });
    assert!(d.terminate().success());
    let nvme = data.path().join("nvme");
    let mut segs: Vec<_> = std::fs::read_dir(&nvme)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    // 64 blocks of 16 KiB (20 KiB records) fill one 1 MiB segment and start a second.
    assert!(segs.len() >= 2, "{segs:?}");
    // Cut the last segment inside its second record.
    let last = segs.last().unwrap().clone();
    let cut_records = {
        let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
        // Format v2: header page, then the 16 KiB payload (as v1: 128 + 16 KiB
        // rounded up).
        let rec = (4096 + block).next_multiple_of(4096) as u64;
        f.set_len(4096 + rec + 100).unwrap();
        rec
    };
    let _ = cut_records;
    // A segment written by some future format.
    let alien = nvme.join("seg-00000000000fffff.strata");
    let mut bytes = b"STRSEG01".to_vec();
    bytes.extend_from_slice(&9u32.to_le_bytes());
    bytes.resize(8192, 0);
    std::fs::write(&alien, &bytes).unwrap();

    let mut d = Daemon::spawn_in(data.path(), &args);
    let log = d.log_text();
    assert!(log.contains("nvme tier recovered"), "{log}");
    rt.block_on(async {
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        let reg = c.register_layout(&layout(16)).await.unwrap();
        assert!(
            reg.existed,
            "the namespace is known from the records on disk"
        );
        let l = c.lookup(reg.namespace, &keys, 0).await.unwrap();
        // Everything before the cut is back, byte-exact; nothing is wrong.
        assert!(l.hits >= 50, "only {} of 64 recovered", l.hits);
        let got = c.get(reg.namespace, &keys[..l.hits], None).await.unwrap();
        for (k, b) in keys.iter().zip(&got) {
            assert_eq!(&b.data[..], &payload(k.as_bytes(), block)[..]);
        }
        // And it keeps storing.
        let k = BlockKey::new(b"after-restart").unwrap();
        let out = c
            .put_durable(
                reg.namespace,
                &[PutBlock {
                    key: k,
                    parent: None,
                    data: Bytes::from(vec![3u8; block]),
                }],
            )
            .await
            .unwrap();
        assert!(out[0].1);
    });
    assert_eq!(
        std::fs::read(&alien).unwrap(),
        bytes,
        "a segment of an unknown format was modified"
    );
    let (_, ready) = http_get(d.metrics_port, "/readyz").unwrap();
    assert!(ready.contains("nvme:"), "{ready}");
    let (_, metrics) = http_get(d.metrics_port, "/metrics").unwrap();
    assert!(
        metrics.contains("strata_tier_fenced{tier=\"nvme\"} 0"),
        "{metrics}"
    );
    assert!(d.terminate().success());
}

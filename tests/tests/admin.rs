//! The admin CLI on real daemons: `strata stats` (tiers, tenants,
//! namespaces), `strata export` / `strata import` between two daemons
//! (byte-exact, damaged files refused with nothing imported), `strata
//! evict` (gone now and after a restart; leased blocks retired), and
//! argument errors that say what to do.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::Path;
use std::process::Output;

use bytes::Bytes;
use strata_client::{Client, PutBlock};
use strata_proto::{BlockKey, Dtype, KvKind, Layout, NamespaceId};
use strata_tests::*;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// 16 tokens x 2 layers x K,V x 2 heads x 16 dim x f16 = 4 KiB per block.
fn layout(model: &str) -> Layout {
    Layout {
        model_id: model.into(),
        dtype: Dtype::F16,
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 16,
        tokens_per_block: 16,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

/// The flags that name `layout("admin/a")` on the CLI.
const LAYOUT_A: [&str; 12] = [
    "--model",
    "admin/a",
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
];

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A chain of `n` blocks of namespace `seed`, the last one half a block.
fn chain(seed: u8, n: usize, block: usize) -> Vec<PutBlock> {
    let keys: Vec<_> = (0..n)
        .map(|i| BlockKey::new(&[0xad, seed, i as u8, (i >> 8) as u8]).unwrap())
        .collect();
    keys.iter()
        .enumerate()
        .map(|(i, k)| PutBlock {
            key: *k,
            parent: (i > 0).then(|| keys[i - 1]),
            data: Bytes::from(payload(
                k.as_bytes(),
                if i + 1 == n { block / 2 } else { block },
            )),
        })
        .collect()
}

/// A daemon whose DRAM holds only part of what it stores: the rest is on
/// NVMe only (write-through puts), so exports read from both tiers.
const SMALL: [&str; 4] = ["--dram-bytes", "1MiB", "--nvme-bytes", "64MiB"];

fn small_daemon(data: &Path) -> Daemon {
    let cfg = data.join("c.toml");
    std::fs::write(
        &cfg,
        "[tiers.dram]\nbytes = \"1MiB\"\n[tiers.nvme]\nbytes = \"64MiB\"\nsegment_bytes = \"1MiB\"\nwrite_through = true\n",
    )
    .unwrap();
    Daemon::spawn_in(data, &["--config", cfg.to_str().unwrap()])
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {}: {}{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

#[test]
fn export_import_round_trip_between_two_daemons_is_byte_exact() {
    let data_a = tempfile::tempdir().unwrap();
    let a = small_daemon(data_a.path());
    // B holds all of it too (write-through: DRAM is smaller than the import).
    let data_b = tempfile::tempdir().unwrap();
    let b = small_daemon(data_b.path());
    let (ns, blocks) = rt().block_on(async {
        let mut c = Client::connect(&a.endpoint()).await.unwrap();
        let reg = c.register_layout(&layout("admin/a")).await.unwrap();
        let blocks = chain(1, 400, reg.block_bytes as usize); // 1.6 MiB: more than DRAM
        for part in blocks.chunks(50) {
            let out = c.put_durable(reg.namespace, part).await.unwrap();
            assert!(out.iter().all(|(_, d)| *d));
        }
        let other = c.register_layout(&layout("admin/other")).await.unwrap();
        c.put(other.namespace, &chain(2, 3, other.block_bytes as usize))
            .await
            .unwrap();
        let l = c
            .lookup(
                reg.namespace,
                &blocks.iter().map(|b| b.key).collect::<Vec<_>>(),
                0,
            )
            .await
            .unwrap();
        assert_eq!(l.hits, 400);
        assert!(
            l.tiers.contains(&strata_proto::TierKind::Nvme),
            "some blocks should be on NVMe only"
        );
        (reg.namespace, blocks)
    });
    // stats: per tier, per tenant, per namespace.
    let s = ok(&a.strata(&["stats"]));
    assert!(s.contains("2 namespaces"), "{s}");
    assert!(
        s.lines()
            .any(|l| l.starts_with("default ") && l.contains(" 2 ") && l.contains(" 403 ")),
        "{s}"
    );
    let row = s
        .lines()
        .find(|l| l.starts_with(&ns.to_string()))
        .unwrap_or_else(|| panic!("no row for {ns}: {s}"));
    assert!(
        row.contains(" default ")
            && row.contains(" 400 ")
            && row.ends_with("admin/a f16 2x2x16 16/block"),
        "{row}"
    );
    // Export A's namespace, named by its layout; import into B.
    let file = data_a.path().join("a.strx");
    let mut args = vec!["export", "-o", file.to_str().unwrap()];
    args.extend(LAYOUT_A);
    let out = ok(&a.strata(&args));
    assert!(
        out.contains(&format!("exported 400 blocks (1.6 MiB) of namespace {ns}")),
        "{out}"
    );
    let out = ok(&b.strata(&["import", file.to_str().unwrap()]));
    assert!(
        out.contains(&format!(
            "imported 400 blocks (1.6 MiB) into namespace {ns}: 400 stored, 0 already present"
        )),
        "{out}"
    );
    // Every block of B is A's, byte for byte, with its parent.
    rt().block_on(async {
        let mut c = Client::connect(&b.endpoint()).await.unwrap();
        let keys: Vec<_> = blocks.iter().map(|b| b.key).collect();
        for (part, want) in keys.chunks(64).zip(blocks.chunks(64)) {
            let got = c.get(ns, part, None).await.unwrap();
            for (g, w) in got.iter().zip(want) {
                assert!(g.data == w.data, "{}: bytes differ", w.key);
                assert_eq!(g.parent, w.parent, "{}: parent", w.key);
            }
        }
        let s = c.stats().await.unwrap();
        assert_eq!((s.blocks, s.namespaces), (400, 1), "only that namespace");
    });
    // Importing again stores nothing new.
    let out = ok(&b.strata(&["import", file.to_str().unwrap()]));
    assert!(out.contains("0 stored, 400 already present"), "{out}");
    // The export file does not overwrite without --force.
    let o = a.strata(&[
        "export",
        "--namespace",
        &ns.to_string(),
        "-o",
        file.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("exists; choose another --out FILE, or pass --force"));
    let o = a.strata(&[
        "export",
        "--namespace",
        &ns.to_string(),
        "-o",
        file.to_str().unwrap(),
        "--force",
    ]);
    ok(&o);
}

#[test]
fn a_damaged_export_file_is_refused_and_nothing_is_imported() {
    let a = Daemon::spawn(&SMALL);
    let b = Daemon::spawn(&SMALL);
    let ns = rt().block_on(async {
        let mut c = Client::connect(&a.endpoint()).await.unwrap();
        let reg = c.register_layout(&layout("admin/a")).await.unwrap();
        c.put(reg.namespace, &chain(3, 20, reg.block_bytes as usize))
            .await
            .unwrap();
        reg.namespace
    });
    let dir = a.dir.path();
    let file = dir.join("good.strx");
    ok(&a.strata(&[
        "export",
        "--namespace",
        &ns.to_string(),
        "-o",
        file.to_str().unwrap(),
    ]));
    let good = std::fs::read(&file).unwrap();
    let block_entry = 16 + 4 + 8 + 4096; // header, key, checksum, payload
    let mut flipped = good.clone();
    let mid = good.len() / 2;
    flipped[mid] ^= 0x40;
    let mut v2 = good.clone();
    v2[8] = 2;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "cut-in-block",
            good[..good.len() - 40 - block_entry / 2].to_vec(),
            "truncated: the file ends at byte",
        ),
        (
            "cut-before-trailer",
            good[..good.len() - 40].to_vec(),
            "the file ends after 20 blocks without one",
        ),
        ("flipped", flipped, "corrupt at byte"),
        (
            "other-version",
            v2,
            "export format version 2; this strata reads version 1",
        ),
        (
            "not-export",
            b"just some bytes".to_vec(),
            "not a Strata export file",
        ),
    ];
    for (name, bytes, want) in cases {
        let f = dir.join(format!("{name}.strx"));
        std::fs::write(&f, &bytes).unwrap();
        let o = b.strata(&["import", f.to_str().unwrap()]);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{name}: accepted");
        assert!(
            err.contains("refused, nothing imported") && err.contains(want),
            "{name}: {err}"
        );
    }
    // Nothing reached B: not even the namespace.
    let s = ok(&b.strata(&["stats"]));
    assert!(s.contains(": 0 blocks, 0 namespaces"), "{s}");
}

#[test]
fn evict_removes_a_namespace_now_and_after_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let mut d = small_daemon(data.path());
    let (ns, other, blocks, lease) = rt().block_on(async {
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        let reg = c.register_layout(&layout("admin/a")).await.unwrap();
        let blocks = chain(4, 300, reg.block_bytes as usize);
        for part in blocks.chunks(50) {
            c.put(reg.namespace, part).await.unwrap();
        }
        let other = c.register_layout(&layout("admin/other")).await.unwrap();
        c.put(other.namespace, &chain(5, 3, other.block_bytes as usize))
            .await
            .unwrap();
        // A lease on the head of the chain, taken before the eviction.
        let l = c
            .lookup(reg.namespace, &[blocks[0].key], 60_000)
            .await
            .unwrap();
        (reg.namespace, other.namespace, blocks, l.lease.unwrap())
    });
    let out = ok(&d.strata(&["evict", "--namespace", &ns.to_string()]));
    assert!(
        out.contains(&format!("evicted 299 blocks (1.2 MiB) of namespace {ns}")),
        "{out}"
    );
    assert!(out.contains("retired 1 pinned blocks"), "{out}");
    rt().block_on(async {
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        let keys: Vec<_> = blocks.iter().map(|b| b.key).collect();
        assert_eq!(c.lookup(ns, &keys, 0).await.unwrap().hits, 0);
        // The lease taken before still reads what it was promised.
        let got = c.get(ns, &keys[..1], Some(lease.id)).await.unwrap();
        assert!(got[0].data == blocks[0].data);
        c.release(ns, lease.id).await.unwrap();
        let s = c.stats_per_namespace().await.unwrap();
        let n = |id: NamespaceId| {
            s.namespace_stats
                .iter()
                .find(|n| n.namespace_id == id.0)
                .map(|n| n.blocks)
        };
        assert_eq!((n(ns), n(other)), (Some(0), Some(3)), "{s:?}");
    });
    assert!(d.terminate().success());
    let d = small_daemon(data.path());
    rt().block_on(async {
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        let keys: Vec<_> = blocks.iter().map(|b| b.key).collect();
        let ns2 = c
            .register_layout(&layout("admin/a"))
            .await
            .unwrap()
            .namespace;
        assert_eq!(ns2, ns);
        assert_eq!(
            c.lookup(ns, &keys, 0).await.unwrap().hits,
            0,
            "evicted blocks came back"
        );
        let o = c
            .register_layout(&layout("admin/other"))
            .await
            .unwrap()
            .namespace;
        assert_eq!(
            c.lookup(
                o,
                &chain(5, 3, 4096).iter().map(|b| b.key).collect::<Vec<_>>(),
                0
            )
            .await
            .unwrap()
            .hits,
            3
        );
    });
}

#[test]
fn admin_cli_errors_say_what_to_do() {
    let d = Daemon::spawn(&["--dram-bytes", "16MiB"]);
    let f = d.dir.path().join("x.strx");
    std::fs::write(&f, b"x").unwrap();
    let no_file = d.dir.path().join("none.strx");
    let cases: &[(&[&str], &str)] = &[
        (
            &["evict"],
            "no namespace given; name the namespace with --namespace ID (from `strata stats`), or with its layout",
        ),
        (
            &["evict", "--namespace", "00000000000000ff", "--model", "m"],
            "--namespace and layout flags were both given",
        ),
        (
            &["evict", "--model", "m", "--dtype", "f16"],
            "the layout lacks --layers, --kv-heads, --head-dim, --block-tokens",
        ),
        (
            &[
                "evict",
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
            "the layout is not valid: layout.num_layers: must be at least 1",
        ),
        (
            &["evict", "--namespace", "00000000000000ff"],
            "NOT_FOUND: namespace_id: namespace 00000000000000ff is not registered",
        ),
        (
            &["evict", "--namespace", "0000000000000000"],
            "INVALID_ARGUMENT: namespace_id: is missing (0)",
        ),
        (&["evict", "--namespace", "xyz"], "not hexadecimal"),
        (
            &["export", "--namespace", "00000000000000ff"],
            "--out <FILE>",
        ),
        (
            &[
                "export",
                "--namespace",
                "00000000000000ff",
                "-o",
                f.to_str().unwrap(),
            ],
            "exists; choose another --out FILE, or pass --force to overwrite it",
        ),
        (&["import"], "<FILE>"),
        (&["import", no_file.to_str().unwrap()], "cannot read"),
        (&["import", f.to_str().unwrap()], "not a Strata export file"),
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
    let o = d.strata(&["evict", "--namespace", "00000000000000ff"]);
    assert!(
        text(&o.stderr).contains("hint: register the layout first"),
        "{}",
        text(&o.stderr)
    );
    // An export of a namespace that is not there: nothing is left behind.
    let out = d.dir.path().join("never.strx");
    let o = d.strata(&[
        "export",
        "--namespace",
        "00000000000000ff",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(!out.exists() && !d.dir.path().join("never.strx.partial").exists());
}

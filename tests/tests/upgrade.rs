//! Rolling upgrade across on-disk format versions: the current `stratad`
//! starts on a data directory written by an earlier release (the golden
//! directory `tests/golden/v1`, see its README) and serves every block byte
//! for byte; a format it cannot read is refused by file name and version,
//! and the files are left exactly as they were (bytes and mtime).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use strata_client::Client;
use strata_proto::{BlockKey, Dtype, KvKind, Layout, NamespaceId, TierKind};
use strata_tests::*;

/// `tests/golden/<version>`: v1 (payloads after the 128-byte header) and
/// v2 (page-multiple payloads at byte 4096 of their record, the others
/// after the header), written by the same script.
fn golden_of(version: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(version)
}

fn layout(model: &str, dtype: Dtype, layers: u32, heads: u32, dim: u32, tokens: u32) -> Layout {
    Layout {
        model_id: model.into(),
        dtype,
        num_layers: layers,
        num_kv_heads: heads,
        head_dim: dim,
        tokens_per_block: tokens,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

fn layout_a() -> Layout {
    layout("golden/a", Dtype::F16, 2, 2, 16, 16)
}
fn layout_b() -> Layout {
    layout("golden/b", Dtype::Bf16, 1, 1, 32, 8)
}
fn layout_c() -> Layout {
    layout("golden/c", Dtype::Bf16, 1, 1, 32, 8)
}

/// Byte j of golden block b (tests/golden/make.sh writes the same).
fn golden_payload(b: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| ((7 * j + 31 * b + (j >> 8)) & 255) as u8)
        .collect()
}

fn k(hex: &str) -> BlockKey {
    BlockKey::from_hex(hex).unwrap()
}

/// (key, parent, b, length) of the blocks the golden directory serves.
const A_BLOCKS: [(&str, Option<&str>, usize, usize); 4] = [
    ("a0", None, 0, 4096),
    ("a1", Some("a0"), 1, 4096),
    ("a2", Some("a1"), 2, 4096),
    ("a3", Some("a2"), 3, 2048),
];
const B_BLOCKS: [(&str, Option<&str>, usize, usize); 2] =
    [("b0", None, 4, 1024), ("b1", Some("b0"), 5, 1024)];

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// A fresh copy of the golden v1 directory.
fn golden_copy() -> tempfile::TempDir {
    golden_copy_of("v1")
}

fn golden_copy_of(version: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    copy_dir(&golden_of(version), d.path());
    d
}

const ARGS: [&str; 4] = ["--dram-bytes", "16MiB", "--nvme-bytes", "64MiB"];

/// Bytes and modification time of every file under `dir`.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let m = std::fs::metadata(&p).unwrap().modified().unwrap();
            (p.clone(), std::fs::read(&p).unwrap(), m)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Checks that `blocks` of `layout` are served from NVMe, byte for byte,
/// with their parents.
async fn check_served(
    c: &mut Client,
    layout: &Layout,
    blocks: &[(&str, Option<&str>, usize, usize)],
) -> NamespaceId {
    let reg = c.register_layout(layout).await.unwrap();
    assert!(
        reg.existed,
        "{}: the layout was not recovered",
        layout.model_id
    );
    let keys: Vec<_> = blocks.iter().map(|b| k(b.0)).collect();
    let l = c.lookup(reg.namespace, &keys, 0).await.unwrap();
    assert_eq!(
        l.hits,
        keys.len(),
        "{}: not every block found",
        layout.model_id
    );
    assert!(
        l.tiers.iter().all(|t| *t == TierKind::Nvme),
        "{:?}",
        l.tiers
    );
    let got = c.get(reg.namespace, &keys, None).await.unwrap();
    for (g, (key, parent, b, len)) in got.iter().zip(blocks) {
        assert_eq!(g.data.len(), *len, "{key}");
        assert!(
            g.data[..] == golden_payload(*b, *len)[..],
            "{key}: bytes differ"
        );
        assert_eq!(g.parent, parent.map(k), "{key}: parent");
    }
    reg.namespace
}

#[test]
fn the_current_binary_serves_the_golden_v1_directory() {
    serves_golden("v1");
}

#[test]
fn the_current_binary_serves_the_golden_v2_directory() {
    serves_golden("v2");
}

/// The current binary on a copy of `tests/golden/<version>`: every block
/// served byte for byte, the deleted and evicted ones stay gone, a new
/// block goes to a new segment of the current format, and a second start
/// reads both.
fn serves_golden(version: &str) {
    let golden = || golden_of(version);
    let before = snapshot(&golden().join("nvme"));
    let data = golden_copy_of(version);
    let mut d = Daemon::spawn_in(data.path(), &ARGS);
    rt().block_on(async {
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        let a = check_served(&mut c, &layout_a(), &A_BLOCKS).await;
        check_served(&mut c, &layout_b(), &B_BLOCKS).await;
        // Deleted (tombstone) and evicted (evictions.v1) blocks stay gone.
        assert_eq!(c.lookup(a, &[k("dead")], 0).await.unwrap().hits, 0);
        let cns = c.register_layout(&layout_c()).await.unwrap().namespace;
        assert_eq!(c.lookup(cns, &[k("c0")], 0).await.unwrap().hits, 0);
        // And it stores on the old directory as usual.
        let blocks = [strata_client::PutBlock {
            key: k("a4"),
            parent: Some(k("a3")),
            data: golden_payload(10, 4096).into(),
        }];
        assert!(c.put_durable(a, &blocks).await.unwrap()[0].0 == strata_client::PutResult::Stored);
    });
    let (_, ready) = http_get(d.metrics_port, "/readyz").unwrap();
    assert!(!ready.contains("refused"), "{ready}");
    assert!(d.terminate().success(), "{}", d.log_text());
    // A second start finds the old records and the new one.
    let mut d = Daemon::spawn_in(data.path(), &ARGS);
    rt().block_on(async {
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        let mut all = A_BLOCKS.to_vec();
        all.push(("a4", Some("a3"), 10, 4096));
        check_served(&mut c, &layout_a(), &all).await;
    });
    assert!(d.terminate().success());
    // The new block went to a new segment of format version 2: its
    // 4096-byte payload in the record's second page.
    let new_seg = data.path().join("nvme/seg-0000000000000001.strata");
    let bytes = std::fs::read(&new_seg).unwrap();
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2);
    let at = 4096;
    assert_eq!(
        u16::from_le_bytes(bytes[at + 4..at + 6].try_into().unwrap()),
        2
    );
    assert_eq!(
        u32::from_le_bytes(bytes[at + 44..at + 48].try_into().unwrap()),
        4096
    );
    assert!(bytes[at + 4096..at + 8192] == golden_payload(10, 4096)[..]);
    assert!(
        snapshot(&golden().join("nvme")) == before,
        "the golden directory itself changed"
    );
}

/// Patches a 4096-byte segment header's version and re-seals its checksum.
fn set_segment_version(seg: &mut [u8], version: u32) {
    seg[8..12].copy_from_slice(&version.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&seg[..4088]);
    seg[4088..4096].copy_from_slice(&sum.to_le_bytes());
}

/// Patches the version of the record at `at` and re-seals its checksum.
fn set_record_version(seg: &mut [u8], at: usize, version: u16) {
    seg[at + 4..at + 6].copy_from_slice(&version.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&seg[at..at + 120]);
    seg[at + 120..at + 128].copy_from_slice(&sum.to_le_bytes());
}

const SEG: &str = "nvme/seg-0000000000000000.strata";

#[test]
fn a_segment_of_another_version_is_refused_and_left_untouched() {
    let data = golden_copy();
    let seg = data.path().join(SEG);
    let mut bytes = std::fs::read(&seg).unwrap();
    set_segment_version(&mut bytes, 3);
    std::fs::write(&seg, &bytes).unwrap();
    let layouts2 = data.path().join("nvme/layouts.v2");
    std::fs::write(&layouts2, b"a layouts file of a later release").unwrap();
    let nvme = data.path().join("nvme");
    let before = snapshot(&nvme);
    let mut d = Daemon::spawn_in(data.path(), &ARGS);
    // Refused by name and version, in the log and in /readyz; it serves on.
    let log = d.log_text();
    let want = format!(
        "{}: segment format version 3; this stratad reads versions 1 and 2",
        seg.display()
    );
    assert!(
        log.contains(&format!("path={}", seg.display()))
            && log.contains("segment format version 3"),
        "{log}"
    );
    let (status, ready) = http_get(d.metrics_port, "/readyz").unwrap();
    assert_eq!(status, 200, "{ready}");
    assert!(ready.contains(&want), "{ready}");
    assert!(
        ready.contains(&format!(
            "{}: layouts file of format version 2",
            layouts2.display()
        )),
        "{ready}"
    );
    rt().block_on(async {
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        let a = c.register_layout(&layout_a()).await.unwrap().namespace;
        // Never misread: none of the refused segment's blocks is served.
        assert_eq!(c.lookup(a, &[k("a0")], 0).await.unwrap().hits, 0);
        // New blocks go to a new segment.
        let blocks = [strata_client::PutBlock {
            key: k("a0"),
            parent: None,
            data: golden_payload(0, 4096).into(),
        }];
        c.put(a, &blocks).await.unwrap();
    });
    // A drain writes that block down and flushes, touching nothing else.
    assert!(d.terminate().success(), "{}", d.log_text());
    let after = snapshot(&nvme);
    for (p, b, m) in &before {
        let now = after
            .iter()
            .find(|x| &x.0 == p)
            .expect("a refused file was removed");
        assert!(&now.1 == b, "{} changed", p.display());
        assert_eq!(&now.2, m, "{} was written (mtime)", p.display());
    }
    assert!(
        after.len() > before.len(),
        "the new block went to a new segment"
    );
}

#[test]
fn a_record_of_another_version_is_skipped_and_its_segment_kept() {
    let data = golden_copy();
    let seg = data.path().join(SEG);
    let mut bytes = std::fs::read(&seg).unwrap();
    // a1 is the second record: after the segment header and a0's 8 KiB.
    let at = 4096 + 8192;
    set_record_version(&mut bytes, at, 3);
    std::fs::write(&seg, &bytes).unwrap();
    let nvme = data.path().join("nvme");
    let before = snapshot(&nvme);
    let mut d = Daemon::spawn_in(data.path(), &ARGS);
    let (_, ready) = http_get(d.metrics_port, "/readyz").unwrap();
    assert!(
        ready.contains(&format!(
            "{}: record at byte {at} has format version 3; this stratad reads versions 1 and 2",
            seg.display()
        )),
        "{ready}"
    );
    rt().block_on(async {
        let mut c = Client::connect(&d.endpoint()).await.unwrap();
        let a = c.register_layout(&layout_a()).await.unwrap().namespace;
        // a1 is not misread; the chain's run stops there; the rest is served.
        let chain: Vec<_> = A_BLOCKS.iter().map(|b| k(b.0)).collect();
        assert_eq!(c.lookup(a, &chain, 0).await.unwrap().hits, 1);
        let rest = [A_BLOCKS[0], A_BLOCKS[2], A_BLOCKS[3]];
        let keys: Vec<_> = rest.iter().map(|b| k(b.0)).collect();
        let got = c.get(a, &keys, None).await.unwrap();
        for (g, (key, _, b, len)) in got.iter().zip(&rest) {
            assert!(g.data[..] == golden_payload(*b, *len)[..], "{key}");
        }
        check_served(&mut c, &layout_b(), &B_BLOCKS).await;
    });
    assert!(d.terminate().success(), "{}", d.log_text());
    let after = snapshot(&nvme);
    assert!(after == before, "a file of the data directory changed");
}

//! The store with a real NVMe tier: segment files with O_DIRECT in a
//! temporary directory, through both I/O engines (each test runs on psync
//! and on io_uring; io_uring announces when the kernel refuses it).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use strata_proto::convert::*;
use strata_proto::{BlockKey, Dtype, KvKind, Layout, NamespaceId, TierKind};

use super::*;
use crate::metrics::{Registry, StoreMetrics};
use crate::tier::nvme::buf::BufPool;
use crate::tier::nvme::engine::{EngineKind, IoEngine, open_engine};
use crate::tier::nvme::fault::{FaultPlan, FaultyEngine};
use crate::tier::nvme::{NvmeConfig, NvmeTier};
use crate::tier::{DramConfig, DramTier};

/// 4 layers x 2 heads x 16 dim x f16 x K,V = 512 bytes per token; blocks of
/// 8 tokens = 4 KiB, one NVMe record = 8 KiB on disk.
fn layout() -> Layout {
    Layout {
        model_id: "nvme-test".into(),
        dtype: Dtype::F16,
        num_layers: 4,
        num_kv_heads: 2,
        head_dim: 16,
        tokens_per_block: 8,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

const BLOCK: u64 = 4096;

fn key(c: u8, i: u8) -> BlockKey {
    BlockKey::new(&[0xd0, c, i]).unwrap()
}

fn payload(k: &BlockKey) -> Vec<u8> {
    let mut x = strata_proto::checksum(k.as_bytes()) | 1;
    (0..BLOCK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Clone)]
struct Opts {
    engine: EngineKind,
    dram_blocks: u64,
    segment_bytes: u64,
    segments: u64,
    policy: NvmePolicy,
    faults: Option<FaultPlan>,
    /// `store.max_blocks`.
    max_blocks: usize,
}

impl Opts {
    fn new(engine: EngineKind) -> Opts {
        Opts {
            engine,
            dram_blocks: 8,
            segment_bytes: 1 << 20,
            segments: 8,
            policy: NvmePolicy::default(),
            faults: None,
            max_blocks: StoreConfig::default().max_blocks,
        }
    }
}

struct Fix {
    store: Arc<Store>,
    ns: NamespaceId,
    faults: Option<FaultyEngine>,
    dir: tempfile::TempDir,
    opts: Opts,
}

fn engine(kind: EngineKind, pool: &Arc<BufPool>) -> Option<Arc<dyn IoEngine>> {
    match open_engine(kind, 4, Some(pool)) {
        Ok(e) => Some(e),
        Err(e) => {
            eprintln!("SKIPPED: {kind:?} engine unavailable here: {e}");
            None
        }
    }
}

async fn open(dir: tempfile::TempDir, opts: Opts) -> Option<Fix> {
    let cfg = NvmeConfig {
        dir: dir.path().join("nvme"),
        capacity_bytes: opts.segment_bytes * opts.segments,
        segment_bytes: opts.segment_bytes,
        engine: opts.engine,
        queue_depth: 4,
        io_buffer_bytes: 64 << 10,
        io_buffers: 8,
        fence_after_errors: 3,
        sync_writes: false,
    };
    let pool = BufPool::new(cfg.io_buffer_bytes, cfg.io_buffers);
    let base = engine(opts.engine, &pool)?;
    let (eng, faults): (Arc<dyn IoEngine>, _) = match &opts.faults {
        Some(plan) => {
            let f = FaultyEngine::new(base, 7, plan.clone());
            (Arc::new(f.clone()), Some(f))
        }
        None => (base, None),
    };
    let (tier, _) = NvmeTier::open(cfg, eng, pool).unwrap();
    let dram = DramTier::new(&DramConfig {
        bytes: opts.dram_blocks * BLOCK,
        granule_bytes: BLOCK,
        prefault: false,
    })
    .unwrap();
    let store_cfg = StoreConfig {
        nvme: opts.policy.clone(),
        max_blocks: opts.max_blocks,
        ..StoreConfig::default()
    };
    let store = Arc::new(Store::new(
        store_cfg,
        dram,
        Some(tier),
        BLOCK,
        Arc::new(SystemClock),
        StoreMetrics::new(&Registry::new()),
    ));
    tiering::recover(&store, &mut |_, _| {}).await;
    let (ns, _) = store.register_layout(layout());
    Some(Fix {
        store,
        ns,
        faults,
        dir,
        opts,
    })
}

async fn fresh(opts: Opts) -> Option<Fix> {
    open(tempfile::tempdir().unwrap(), opts).await
}

impl Fix {
    /// Restarts on the same directory (a clean stop: nothing in flight).
    async fn reopen(self, mut opts: Opts) -> Fix {
        opts.engine = self.opts.engine;
        let Fix { store, dir, .. } = self;
        drop(store);
        open(dir, opts)
            .await
            .expect("engine available the second time too")
    }

    fn put(
        &self,
        k: BlockKey,
        parent: Option<BlockKey>,
    ) -> Result<(PutResult, index::BlockRef), StoreError> {
        let data = payload(&k);
        let sum = strata_proto::checksum(&data);
        match self.store.reserve(self.ns, k, parent, BLOCK, sum, 0)? {
            Reserve::Present(r) => Ok((PutResult::AlreadyPresent, r)),
            Reserve::Slot(mut s) => {
                s.fill(&data);
                self.store.publish(s, sum)
            }
        }
    }

    fn lookup(&self, keys: &[BlockKey]) -> LookupResult {
        self.store
            .lookup(&LookupReq {
                namespace: self.ns,
                keys: keys.to_vec(),
                lease_ttl_ms: 0,
                want_slots: false,
            })
            .unwrap()
    }

    /// A Get: every block through DRAM (promoted if needed), verified.
    async fn get(&self, k: BlockKey) -> Result<Vec<u8>, StoreError> {
        let guard = Arc::new(self.store.pin_for_read(&GetReq {
            namespace: self.ns,
            keys: vec![k],
            lease: None,
        })?);
        tiering::load(&guard, 0).await.map(|b| b.to_vec())
    }

    fn tier(&self, k: BlockKey) -> Option<TierKind> {
        self.store.tier_of(self.ns, &k)
    }

    fn segment_files(&self) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(self.dir.path().join("nvme"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    fn disk_bytes(&self) -> u64 {
        self.segment_files()
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum()
    }
}

const ENGINES: [EngineKind; 2] = [EngineKind::Psync, EngineKind::IoUring];

#[tokio::test]
async fn evicted_blocks_go_down_and_come_back_byte_exact() {
    for e in ENGINES {
        let Some(f) = fresh(Opts::new(e)).await else {
            continue;
        };
        let mut mirror = super::events::EventMirror::new(&f.store);
        // Chain A, looked up (so admitted), fills DRAM.
        let a: Vec<_> = (0..8).map(|i| key(0xa, i)).collect();
        for i in 0..8 {
            f.put(a[i], (i > 0).then(|| a[i - 1])).unwrap();
        }
        assert_eq!(f.lookup(&a).hits, 8);
        // DRAM is over its high watermark: the background writes down.
        tiering::step(&f.store).await;
        let on_nvme = a
            .iter()
            .filter(|k| f.tier(**k) == Some(TierKind::Nvme))
            .count();
        assert!(on_nvme >= 1, "{e:?}: nothing written down");
        // More blocks push the rest of A out.
        for i in 0..8 {
            f.put(key(0xb, i), (i > 0).then(|| key(0xb, i - 1)))
                .unwrap();
            tiering::step(&f.store).await;
        }
        // Every block of A is still there (DRAM or NVMe), and reads back.
        assert_eq!(f.lookup(&a).hits, 8, "{e:?}");
        let nvme_only = a
            .iter()
            .filter(|k| f.tier(**k) == Some(TierKind::Nvme))
            .count();
        assert!(nvme_only >= 4, "{e:?}: {nvme_only} on NVMe");
        for k in &a {
            assert_eq!(f.get(*k).await.unwrap(), payload(k), "{e:?}");
        }
        // The Get promoted them.
        assert!(a.iter().any(|k| f.tier(*k) == Some(TierKind::Dram)));
        f.store.check_invariants();
        // Every move showed up as an event: replaying them over the empty
        // start gives the store's residency.
        mirror.check(&f.store, &format!("{e:?}"));
        let st = f.store.stats();
        let nv = st
            .tiers
            .iter()
            .find(|t| t.tier == Some(TierKind::Nvme))
            .unwrap();
        assert!(
            nv.bytes_in >= 4 * BLOCK && nv.bytes_out >= 4 * BLOCK,
            "{nv:?}"
        );
    }
}

#[tokio::test]
async fn admission_writes_down_hits_and_heads_only() {
    for e in ENGINES {
        let Some(f) = fresh(Opts::new(e)).await else {
            continue;
        };
        // A chain never looked up: only its head is admitted.
        let c: Vec<_> = (0..8).map(|i| key(0xc, i)).collect();
        for i in 0..8 {
            f.put(c[i], (i > 0).then(|| c[i - 1])).unwrap();
        }
        for i in 0..8 {
            f.put(key(0xe, i), None).unwrap(); // heads: admitted when evicted
            tiering::step(&f.store).await;
        }
        for k in &c[1..] {
            assert!(
                f.tier(*k) != Some(TierKind::Nvme),
                "{e:?}: one-hit tail {k} written down"
            );
        }
        f.store.check_invariants();
    }
}

#[tokio::test]
async fn restart_finds_what_was_written_down() {
    for e in ENGINES {
        let Some(f) = fresh(Opts::new(e)).await else {
            continue;
        };
        let keys: Vec<_> = (0..16).map(|i| key(1, i)).collect();
        for k in &keys {
            f.put(*k, None).unwrap();
            tiering::step(&f.store).await;
        }
        let durable: Vec<_> = keys
            .iter()
            .filter(|k| f.tier(**k) == Some(TierKind::Nvme))
            .copied()
            .collect();
        assert!(durable.len() >= 8, "{e:?}");
        let f = f.reopen(Opts::new(e)).await;
        for k in &durable {
            assert_eq!(
                f.get(*k).await.unwrap(),
                payload(k),
                "{e:?}: {k} lost across restart"
            );
        }
        f.store.check_invariants();
    }
}

#[tokio::test]
async fn write_through_is_durable_at_ack_and_tombstones_stick() {
    for e in ENGINES {
        let mut o = Opts::new(e);
        o.policy.write_through = true;
        let Some(f) = fresh(o.clone()).await else {
            continue;
        };
        let mut refs = vec![];
        for i in 0..4 {
            let (_, r) = f.put(key(2, i), None).unwrap();
            assert!(tiering::persist(&f.store, r).await, "{e:?}: not durable");
            refs.push(r);
        }
        // Delete one (writes a tombstone), put another twice (idempotent).
        let d = f
            .store
            .delete(&DeleteReq {
                namespace: f.ns,
                keys: vec![key(2, 1)],
            })
            .unwrap();
        assert_eq!(d.tombstones.len(), 1);
        tiering::write_tombstones(&f.store, &d.tombstones).await;
        let (res, r) = f.put(key(2, 3), None).unwrap();
        assert_eq!(res, PutResult::AlreadyPresent);
        assert!(f.store.is_durable(r));
        // Put the deleted key again: newer than its tombstone.
        let (_, r) = f.put(key(2, 1), None).unwrap();
        assert!(tiering::persist(&f.store, r).await);
        let d = f
            .store
            .delete(&DeleteReq {
                namespace: f.ns,
                keys: vec![key(2, 2)],
            })
            .unwrap();
        tiering::write_tombstones(&f.store, &d.tombstones).await;
        let f = f.reopen(o).await;
        assert_eq!(f.get(key(2, 0)).await.unwrap(), payload(&key(2, 0)));
        assert_eq!(
            f.get(key(2, 1)).await.unwrap(),
            payload(&key(2, 1)),
            "{e:?}: re-put after delete lost"
        );
        assert!(
            f.get(key(2, 2)).await.is_err(),
            "{e:?}: deleted block came back"
        );
        assert_eq!(f.get(key(2, 3)).await.unwrap(), payload(&key(2, 3)));
        f.store.check_invariants();
    }
}

#[tokio::test]
async fn reclaim_keeps_disk_within_the_cap_and_hot_blocks() {
    for e in ENGINES {
        let mut o = Opts::new(e);
        o.segments = 4; // 4 MiB cap, 1 MiB segments, 8 KiB records: ~127 per segment
        o.policy.write_through = true;
        let Some(f) = fresh(o).await else { continue };
        let cap = 4 << 20;
        let hot = key(3, 0);
        for i in 0..600u32 {
            let k = BlockKey::new(&i.to_be_bytes()).unwrap();
            let (_, r) = f.put(k, None).unwrap();
            let durable = tiering::persist(&f.store, r).await;
            // 600 records of 8 KiB are more than the cap: the late ones
            // are durable only because reclaim made room.
            assert!(
                durable || i < 400,
                "{e:?}: block {i} not durable; reclaim did not make room"
            );
            if i % 50 == 0 {
                // Keep one block hot: looked up again and again.
                let (_, hr) = f.put(hot, None).unwrap();
                tiering::persist(&f.store, hr).await;
                assert_eq!(f.lookup(&[hot]).hits, 1);
            }
            tiering::step(&f.store).await;
            assert!(
                f.disk_bytes() <= cap,
                "{e:?}: {} bytes on disk over the cap",
                f.disk_bytes()
            );
        }
        assert_eq!(
            f.get(hot).await.unwrap(),
            payload(&hot),
            "{e:?}: hot block lost"
        );
        // What reclaim gave up counts as the NVMe tier's evictions.
        let nvme = f
            .store
            .stats()
            .tiers
            .into_iter()
            .find(|t| t.tier == Some(TierKind::Nvme))
            .unwrap();
        assert!(
            nvme.evictions >= 100,
            "{e:?}: {} NVMe evictions",
            nvme.evictions
        );
        f.store.check_invariants();
    }
}

/// Flips one byte of the record of `k` on disk.
fn corrupt_on_disk(dir: &Path, f: &Fix, k: BlockKey) {
    let needle = payload(&k)[..64].to_vec();
    for p in std::fs::read_dir(dir).unwrap() {
        let p = p.unwrap().path();
        let mut bytes = std::fs::read(&p).unwrap();
        if let Some(at) = bytes.windows(64).position(|w| w == needle.as_slice()) {
            bytes[at + 10] ^= 0xff;
            std::fs::write(&p, bytes).unwrap();
            return;
        }
    }
    let _ = f;
    panic!("record of {k} not found on disk");
}

#[tokio::test]
async fn a_corrupt_record_is_a_miss_counted_and_dropped() {
    for e in ENGINES {
        let mut o = Opts::new(e);
        o.policy.write_through = true;
        let Some(f) = fresh(o.clone()).await else {
            continue;
        };
        let k = key(4, 0);
        let (_, r) = f.put(k, None).unwrap();
        assert!(tiering::persist(&f.store, r).await);
        // Restart so that the block is on NVMe only, then damage its record.
        let f = f.reopen(o.clone()).await;
        assert_eq!(f.tier(k), Some(TierKind::Nvme));
        corrupt_on_disk(&f.dir.path().join("nvme"), &f, k);
        let got = f.get(k).await;
        assert!(got.is_err(), "{e:?}: served a corrupt block");
        assert!(!f.store.contains(f.ns, &k), "{e:?}: a doubt must be a miss");
        assert_eq!(f.store.stats().checksum_failures, 1);
        f.store.check_invariants();
    }
}

/// Records of format version 1 (what the release before version 2 wrote)
/// are recovered after the upgrade and served byte for byte, a damaged one
/// is still refused, and new writes go to a version 2 segment beside them.
#[tokio::test]
async fn version_1_records_are_recovered_served_and_refused_when_torn() {
    for e in ENGINES {
        let mut o = Opts::new(e);
        o.policy.write_through = true;
        let Some(f) = fresh(o.clone()).await else {
            continue;
        };
        // The test-only v1 writer: the first segment is created at the
        // first write, as version 1.
        f.store.nvme().unwrap().write_version_1_for_tests();
        let ks: Vec<BlockKey> = (0..4).map(|i| key(7, i)).collect();
        for &k in &ks {
            let (_, r) = f.put(k, None).unwrap();
            assert!(tiering::persist(&f.store, r).await);
        }
        let seg = f.segment_files()[0].clone();
        let bytes = std::fs::read(&seg).unwrap();
        assert_eq!(bytes[8], 1, "{e:?}: segment version");
        // The second record: version 1, payload right after its header.
        let at = 4096 + 8192;
        assert_eq!((bytes[at + 4], bytes[at + 44]), (1, 0));
        assert_eq!(&bytes[at + 128..at + 128 + 4096], &payload(&ks[1])[..]);
        corrupt_on_disk(&f.dir.path().join("nvme"), &f, ks[3]);
        let f = f.reopen(o.clone()).await;
        for &k in &ks[..3] {
            assert_eq!(f.tier(k), Some(TierKind::Nvme), "{e:?}");
            assert_eq!(f.get(k).await.unwrap(), payload(&k), "{e:?}");
        }
        assert!(
            !f.store.contains(f.ns, &ks[3]),
            "{e:?}: a torn v1 record was served"
        );
        // New writes go to a new segment, of version 2.
        let (_, r) = f.put(key(7, 9), None).unwrap();
        assert!(tiering::persist(&f.store, r).await);
        let new = f
            .segment_files()
            .into_iter()
            .find(|p| *p != seg && p.extension().is_some_and(|x| x == "strata"))
            .unwrap();
        let bytes = std::fs::read(&new).unwrap();
        assert_eq!((bytes[8], bytes[4096 + 4]), (2, 2), "{e:?}");
        assert_eq!(&bytes[8192..8192 + 4096], &payload(&key(7, 9))[..], "{e:?}");
        // And both are served after another restart.
        let f = f.reopen(o.clone()).await;
        for k in [ks[0], ks[2], key(7, 9)] {
            assert_eq!(f.get(k).await.unwrap(), payload(&k), "{e:?}");
        }
        f.store.check_invariants();
    }
}

#[tokio::test]
async fn unknown_format_and_truncated_segments() {
    for e in ENGINES {
        let mut o = Opts::new(e);
        o.policy.write_through = true;
        let Some(f) = fresh(o.clone()).await else {
            continue;
        };
        for i in 0..3 {
            let (_, r) = f.put(key(5, i), None).unwrap();
            assert!(tiering::persist(&f.store, r).await);
        }
        // A segment written by a newer format, with a valid header.
        let alien = f
            .dir
            .path()
            .join("nvme")
            .join(crate::tier::nvme::format::segment_file_name(0xffff));
        let mut h = vec![0u8; 4096];
        crate::tier::nvme::format::SegmentHeader {
            version: crate::tier::nvme::format::FORMAT_VERSION + 1,
            id: 0xffff,
            created_unix_ms: 0,
        }
        .encode(&mut h);
        h.extend_from_slice(&[7u8; 4096]);
        std::fs::write(&alien, &h).unwrap();
        // Cut the live segment in the middle of its third record.
        let seg = f.segment_files().into_iter().find(|p| *p != alien).unwrap();
        let third = 4096 + 2 * 8192 + 1000;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(third)
            .unwrap();
        let f = f.reopen(o).await;
        assert_eq!(
            f.get(key(5, 0)).await.unwrap(),
            payload(&key(5, 0)),
            "{e:?}"
        );
        assert_eq!(
            f.get(key(5, 1)).await.unwrap(),
            payload(&key(5, 1)),
            "{e:?}"
        );
        assert!(
            !f.store.contains(f.ns, &key(5, 2)),
            "{e:?}: a cut record was served"
        );
        // The alien segment is untouched and its space counted.
        assert_eq!(
            std::fs::read(&alien).unwrap(),
            h,
            "{e:?}: refused segment modified"
        );
        assert!(f.store.nvme().unwrap().stats().refused_segments_bytes >= 8192);
        // The daemon keeps storing.
        let (_, r) = f.put(key(5, 9), None).unwrap();
        assert!(tiering::persist(&f.store, r).await);
        f.store.check_invariants();
    }
}

#[tokio::test]
async fn a_dying_device_is_fenced_and_dram_keeps_serving() {
    for e in ENGINES {
        let mut o = Opts::new(e);
        o.policy.write_through = true;
        o.faults = Some(FaultPlan::default());
        let Some(f) = fresh(o).await else { continue };
        let (_, r) = f.put(key(6, 0), None).unwrap();
        assert!(tiering::persist(&f.store, r).await);
        // Drop the DRAM copy: the block lives on NVMe only.
        for i in 1..12 {
            let (_, r) = f.put(key(6, i), None).unwrap();
            tiering::persist(&f.store, r).await;
            tiering::step(&f.store).await;
        }
        // The device dies.
        f.faults.as_ref().unwrap().set_plan(FaultPlan {
            dead: true,
            ..FaultPlan::default()
        });
        for i in 20..26 {
            let (_, r) = f.put(key(6, i), None).unwrap();
            assert!(!tiering::persist(&f.store, r).await);
        }
        tiering::step(&f.store).await;
        assert!(f.store.nvme().unwrap().is_fenced(), "{e:?}: not fenced");
        assert!(f.store.stats().tiers.iter().any(|t| t.fenced));
        // DRAM blocks still serve; nothing wrong is ever served.
        assert_eq!(f.get(key(6, 25)).await.unwrap(), payload(&key(6, 25)));
        for i in 0..26 {
            if let Ok(b) = f.get(key(6, i)).await {
                assert_eq!(b, payload(&key(6, i)));
            }
        }
        // New puts still work (DRAM only).
        f.put(key(6, 30), None).unwrap();
        f.store.check_invariants();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_writes_and_keeps_serving() {
    for e in ENGINES {
        let mut o = Opts::new(e);
        o.policy.write_through = true;
        o.faults = Some(FaultPlan::default());
        let Some(f) = fresh(o).await else { continue };
        let (_, r) = f.put(key(7, 0), None).unwrap();
        assert!(tiering::persist(&f.store, r).await);
        f.faults.as_ref().unwrap().set_plan(FaultPlan {
            full: true,
            ..FaultPlan::default()
        });
        for i in 1..20 {
            let (_, r) = f.put(key(7, i), None).unwrap();
            assert!(
                !tiering::persist(&f.store, r).await,
                "{e:?}: durable on a full disk?"
            );
            tiering::step(&f.store).await;
        }
        // ENOSPC is not a device error: no fence.
        assert!(!f.store.nvme().unwrap().is_fenced(), "{e:?}");
        assert_eq!(
            f.get(key(7, 0)).await.unwrap(),
            payload(&key(7, 0)),
            "{e:?}: acknowledged block lost"
        );
        f.faults.as_ref().unwrap().set_plan(FaultPlan::default());
        let (_, r) = f.put(key(7, 50), None).unwrap();
        assert!(
            tiering::persist(&f.store, r).await,
            "{e:?}: writes did not resume"
        );
        f.store.check_invariants();
    }
}

// ---- admin: namespace eviction, drain write-down, export reads ----------------

/// A second layout (namespace) beside the fixture's.
fn other_layout() -> Layout {
    Layout {
        model_id: "nvme-test-other".into(),
        ..layout()
    }
}

fn put_in(f: &Fix, ns: NamespaceId, k: BlockKey) -> index::BlockRef {
    let data = payload(&k);
    let sum = strata_proto::checksum(&data);
    match f.store.reserve(ns, k, None, BLOCK, sum, 0).unwrap() {
        Reserve::Present(r) => r,
        Reserve::Slot(mut s) => {
            s.fill(&data);
            f.store.publish(s, sum).unwrap().1
        }
    }
}

fn counts(f: &Fix, ns: NamespaceId) -> (u64, u64) {
    f.store
        .namespace_stats()
        .iter()
        .find(|n| n.id == ns)
        .map_or((0, 0), |n| (n.blocks, n.pinned_blocks))
}

/// Evicting a namespace removes every copy of its blocks now, except those
/// a lease pins: those stay readable under that lease (and only under it),
/// then go with it. A restart does not bring any of them back; blocks
/// stored after the eviction, and other namespaces, are kept.
#[tokio::test]
async fn evicting_a_namespace_keeps_leased_blocks_readable_and_survives_restart() {
    for e in ENGINES {
        let mut o = Opts::new(e);
        o.policy.write_through = true;
        let Some(f) = fresh(o.clone()).await else {
            continue;
        };
        let (other, _) = f.store.register_layout(other_layout());
        let a: Vec<_> = (0..12).map(|i| key(0xe, i)).collect();
        for k in &a {
            let (_, r) = f.put(*k, None).unwrap();
            assert!(tiering::persist(&f.store, r).await);
            tiering::step(&f.store).await;
        }
        let b: Vec<_> = (0..3).map(|i| key(0xf, i)).collect();
        for k in &b {
            let r = put_in(&f, other, *k);
            assert!(tiering::persist(&f.store, r).await);
        }
        // DRAM holds 8 blocks: some of A are on NVMe only.
        let nvme_only = a
            .iter()
            .position(|k| f.tier(*k) == Some(TierKind::Nvme))
            .expect("some block of A on NVMe only");
        // A lease on two blocks of A, one of them on NVMe only.
        let leased = [a[nvme_only], *a.last().unwrap()];
        let l = f
            .store
            .lookup(&LookupReq {
                namespace: f.ns,
                keys: vec![leased[0]],
                lease_ttl_ms: 60_000,
                want_slots: false,
            })
            .unwrap();
        let l2 = f
            .store
            .lookup(&LookupReq {
                namespace: f.ns,
                keys: vec![leased[1]],
                lease_ttl_ms: 60_000,
                want_slots: false,
            })
            .unwrap();
        let (lease, lease2) = (l.lease.unwrap().0, l2.lease.unwrap().0);
        let ev = f.store.evict_namespace(f.ns).unwrap();
        assert_eq!((ev.blocks, ev.retired), (10, 2), "{e:?}");
        assert_eq!(ev.bytes, 10 * BLOCK);
        f.store.check_invariants();
        assert_eq!(counts(&f, f.ns), (2, 2), "{e:?}: only the retired remain");
        // Gone for everyone else...
        assert_eq!(f.lookup(&a).hits, 0, "{e:?}");
        assert!(
            f.get(leased[0]).await.is_err(),
            "{e:?}: served without the lease"
        );
        // ...readable under the lease that reported them, from either tier.
        for (k, l) in [(leased[0], lease), (leased[1], lease2)] {
            let guard = Arc::new(
                f.store
                    .pin_for_read(&GetReq {
                        namespace: f.ns,
                        keys: vec![k],
                        lease: Some(l),
                    })
                    .unwrap(),
            );
            assert_eq!(
                tiering::load(&guard, 0).await.unwrap(),
                payload(&k),
                "{e:?}"
            );
        }
        f.store
            .release(&ReleaseReq {
                lease,
                namespace: Some(f.ns),
            })
            .unwrap();
        f.store
            .release(&ReleaseReq {
                lease: lease2,
                namespace: Some(f.ns),
            })
            .unwrap();
        assert_eq!(
            counts(&f, f.ns),
            (0, 0),
            "{e:?}: retired blocks outlived the lease"
        );
        f.store.check_invariants();
        f.store
            .nvme()
            .unwrap()
            .persist_eviction(f.ns.0, ev.seq)
            .unwrap();
        // Stored after the eviction: kept, across restarts.
        let after = [a[0], key(0xe, 0x80)];
        for k in after {
            let (_, r) = f.put(k, None).unwrap();
            assert!(tiering::persist(&f.store, r).await);
        }
        let f = f.reopen(o.clone()).await;
        f.store.check_invariants();
        let (other, _) = f.store.register_layout(other_layout());
        assert_eq!(counts(&f, f.ns).0, 2, "{e:?}: evicted blocks came back");
        for k in after {
            assert_eq!(f.get(k).await.unwrap(), payload(&k), "{e:?}");
        }
        for k in &a[1..] {
            assert!(!f.store.contains(f.ns, k), "{e:?}: {k} came back");
        }
        assert_eq!(
            counts(&f, other).0,
            3,
            "{e:?}: another namespace was touched"
        );
        // Records written after a restart still rank above the mark.
        let k = key(0xe, 0x81);
        let (_, r) = f.put(k, None).unwrap();
        assert!(tiering::persist(&f.store, r).await);
        let f = f.reopen(o.clone()).await;
        assert_eq!(f.get(k).await.unwrap(), payload(&k), "{e:?}");
        assert!(matches!(
            f.store.evict_namespace(NamespaceId(0x1234)),
            Err(StoreError::UnknownNamespace(_))
        ));
    }
}

/// The drain's write-down: every block held only in DRAM gets an NVMe
/// record (whatever admission says), keeps its DRAM copy, and a restart
/// serves it.
#[tokio::test]
async fn plan_flush_writes_every_dram_only_block_down() {
    for e in ENGINES {
        let mut o = Opts::new(e);
        o.policy.admission = Admission::None;
        let Some(f) = fresh(o.clone()).await else {
            continue;
        };
        let keys: Vec<_> = (0..6).map(|i| key(0x9, i)).collect();
        for (i, k) in keys.iter().enumerate() {
            f.put(*k, (i > 0).then(|| keys[i - 1])).unwrap();
        }
        assert_eq!(f.store.dram_only(), (6, 6 * BLOCK));
        let mut cursor = Some(0);
        let mut written = 0;
        while let Some(from) = cursor {
            let (jobs, next) = f.store.plan_flush(from, 4);
            assert!(jobs.len() <= 4);
            cursor = next;
            for j in jobs {
                assert!(tiering::write_job(f.store.clone(), j).await, "{e:?}");
                written += 1;
            }
        }
        assert_eq!(written, 6, "{e:?}");
        assert_eq!(f.store.dram_only(), (0, 0), "{e:?}");
        for k in &keys {
            assert_eq!(f.tier(*k), Some(TierKind::Dram), "{e:?}: DRAM copy kept");
            assert!(f.store.has_nvme_copy(f.ns, k));
        }
        // Nothing left to plan.
        assert!(f.store.plan_flush(0, 64).0.is_empty());
        f.store.check_invariants();
        let f = f.reopen(o.clone()).await;
        for k in &keys {
            assert_eq!(f.get(*k).await.unwrap(), payload(k), "{e:?}");
        }
    }
}

/// Export reads a namespace in place: NVMe-only blocks are read and
/// verified without being promoted, and nothing is touched.
#[tokio::test]
async fn export_reads_in_place_without_promoting() {
    for e in ENGINES {
        let mut o = Opts::new(e);
        o.policy.write_through = true;
        let Some(f) = fresh(o.clone()).await else {
            continue;
        };
        let keys: Vec<_> = (0..5).map(|i| key(0x7, i)).collect();
        for k in &keys {
            let (_, r) = f.put(*k, None).unwrap();
            assert!(tiering::persist(&f.store, r).await);
        }
        let f = f.reopen(o.clone()).await;
        let (other, _) = f.store.register_layout(other_layout());
        put_in(&f, other, key(0x8, 0));
        let mut got = Vec::new();
        let mut cursor = Some(0);
        while let Some(from) = cursor {
            let (guard, next) = f
                .store
                .pin_namespace_batch(f.ns, from, 2, u64::MAX)
                .unwrap();
            assert!(guard.blocks.len() <= 2);
            cursor = next;
            let guard = Arc::new(guard);
            for i in 0..guard.blocks.len() {
                let data = tiering::read_in_place(&guard, i).await.unwrap();
                got.push((guard.blocks[i].key, data.to_vec()));
            }
        }
        got.sort_by_key(|(k, _)| k.to_hex());
        let mut want: Vec<_> = keys.iter().map(|k| (*k, payload(k))).collect();
        want.sort_by_key(|(k, _)| k.to_hex());
        assert_eq!(got, want, "{e:?}");
        for k in &keys {
            assert_eq!(
                f.tier(*k),
                Some(TierKind::Nvme),
                "{e:?}: export promoted {k}"
            );
        }
        assert_eq!(f.store.stats().tiers[0].pinned_blocks, 0);
        f.store.check_invariants();
    }
}

/// Files this build cannot read are refused by name and version and left
/// byte for byte as they were: a segment with another magic, a record of
/// another version inside a v1 segment (that segment is then never
/// reclaimed), side files of another version. A segment whose header page
/// is all zeros (creation interrupted) is the only file removed.
#[tokio::test]
async fn unreadable_files_are_refused_by_name_and_left_untouched() {
    for e in ENGINES {
        let mut o = Opts::new(e);
        o.policy.write_through = true;
        let Some(f) = fresh(o.clone()).await else {
            continue;
        };
        for i in 0..3 {
            let (_, r) = f.put(key(6, i), None).unwrap();
            assert!(tiering::persist(&f.store, r).await);
        }
        let dir = f.dir.path().join("nvme");
        let seg = f.segment_files()[0].clone();
        // The second record (at 4096 + 8192) claims format version 3.
        let mut bytes = std::fs::read(&seg).unwrap();
        let at = 4096 + 8192;
        bytes[at + 4] = 3;
        let sum = strata_proto::checksum(&bytes[at..at + 120]);
        bytes[at + 120..at + 128].copy_from_slice(&sum.to_le_bytes());
        std::fs::write(&seg, &bytes).unwrap();
        let future = dir.join(crate::tier::nvme::format::segment_file_name(0x100));
        let mut fb = b"STRSEG02".to_vec();
        fb.resize(8192, 0x5a);
        std::fs::write(&future, &fb).unwrap();
        let zeros = dir.join(crate::tier::nvme::format::segment_file_name(0x101));
        std::fs::write(&zeros, vec![0u8; 4096]).unwrap();
        let layouts2 = dir.join("layouts.v2");
        std::fs::write(&layouts2, b"newer layouts").unwrap();
        let f = f.reopen(o.clone()).await;
        let n = f.store.nvme().unwrap();
        let refused = n.refused_files().join("\n");
        assert!(
            refused.contains(&format!(
                "{}: record at byte {at} has format version 3",
                seg.display()
            )),
            "{e:?}: {refused}"
        );
        assert!(
            refused.contains(&format!(
                "{}: unknown segment magic \"STRSEG02\"",
                future.display()
            )),
            "{e:?}: {refused}"
        );
        assert!(
            refused.contains(&format!(
                "{}: layouts file of format version 2",
                layouts2.display()
            )),
            "{e:?}: {refused}"
        );
        // The other records are served; the foreign one is not misread.
        assert_eq!(f.get(key(6, 0)).await.unwrap(), payload(&key(6, 0)));
        assert_eq!(f.get(key(6, 2)).await.unwrap(), payload(&key(6, 2)));
        assert!(!f.store.contains(f.ns, &key(6, 1)));
        assert!(
            n.segments().iter().all(|s| !s.reclaimable || s.id != 0),
            "{e:?}: a segment with a foreign record is reclaimable"
        );
        assert_eq!(std::fs::read(&seg).unwrap(), bytes, "{e:?}");
        assert_eq!(std::fs::read(&future).unwrap(), fb, "{e:?}");
        assert_eq!(std::fs::read(&layouts2).unwrap(), b"newer layouts");
        assert!(!zeros.exists(), "{e:?}: an interrupted creation was kept");
        f.store.check_invariants();
    }
}

/// Reclaim copies a retired (pinned, evicted) block's record forward with
/// its old sequence number, so the namespace's eviction mark still voids
/// it: after the lease ends and a restart, the block does not come back.
#[tokio::test]
async fn reclaim_keeps_a_retired_blocks_sequence_number() {
    for e in ENGINES {
        let mut o = Opts::new(e);
        o.policy.write_through = true;
        let Some(f) = fresh(o.clone()).await else {
            continue;
        };
        // 8 segments of 127 records (8 KiB each): fill all 8.
        let keys: Vec<_> = (0..900u32)
            .map(|i| BlockKey::new(&[0xc1, (i >> 8) as u8, i as u8]).unwrap())
            .collect();
        for k in &keys {
            let (_, r) = f.put(*k, None).unwrap();
            assert!(tiering::persist(&f.store, r).await, "{e:?}");
        }
        let n = f.store.nvme().unwrap().clone();
        assert_eq!(n.stats().allocated, 8 << 20, "{e:?}");
        // A lease on the first block (in the oldest segment), then evict.
        let l = f
            .store
            .lookup(&LookupReq {
                namespace: f.ns,
                keys: vec![keys[0]],
                lease_ttl_ms: 60_000,
                want_slots: false,
            })
            .unwrap();
        let ev = f.store.evict_namespace(f.ns).unwrap();
        assert_eq!((ev.blocks, ev.retired), (899, 1), "{e:?}");
        n.persist_eviction(f.ns.0, ev.seq).unwrap();
        // Reclaim takes the oldest segment first: the retired block's
        // record is in use, so it is copied forward.
        tiering::reclaim(&f.store).await.unwrap();
        assert!(n.stats().allocated < 8 << 20, "{e:?}: nothing reclaimed");
        let guard = Arc::new(
            f.store
                .pin_for_read(&GetReq {
                    namespace: f.ns,
                    keys: vec![keys[0]],
                    lease: Some(l.lease.unwrap().0),
                })
                .unwrap(),
        );
        assert_eq!(
            tiering::load(&guard, 0).await.unwrap(),
            payload(&keys[0]),
            "{e:?}: the copy serves the lease"
        );
        drop(guard);
        f.store
            .release(&ReleaseReq {
                lease: l.lease.unwrap().0,
                namespace: Some(f.ns),
            })
            .unwrap();
        f.store.check_invariants();
        let f = f.reopen(o.clone()).await;
        assert!(
            !f.store.contains(f.ns, &keys[0]),
            "{e:?}: the retired block's copy came back after a restart"
        );
        f.store.check_invariants();
    }
}

// ---- recovery's live-record accounting ---------------------------------------

/// Puts `k` and writes it through; asserts it is durable.
async fn put_durable(f: &Fix, k: BlockKey) {
    let (_, r) = f.put(k, None).unwrap();
    assert!(tiering::persist(&f.store, r).await, "{k} not durable");
}

/// The sequence number of `k`'s NVMe record in the index.
fn seq_of(f: &Fix, k: BlockKey) -> u64 {
    let g = f.store.lock();
    let ns = g.namespaces[&f.ns];
    let id = g.index.find(ns, &k).expect("indexed");
    g.index.get(id).seq
}

/// Appends a copy of `k`'s record with sequence number `seq` straight to
/// the tier, as reclaim's copy-forward writes it, and leaves the source
/// record in place: what a stop between the copy and the deletion of the
/// reclaimed segment leaves on disk. The running store never indexes it
/// (only the restart that follows matters), so it is handed back at once.
async fn copy_forward_interrupted(f: &Fix, k: BlockKey, seq: u64) -> Loc {
    let data = payload(&k);
    let n = f.store.nvme().unwrap();
    let header = RecordHeader {
        kind: RecordKind::Block,
        namespace: f.ns,
        seq,
        segment: 0,
        key: k,
        parent: None,
        len: data.len() as u32,
        checksum: strata_proto::checksum(&data),
        payload_offset: 0, // set by append
    };
    let loc = n.append(header, &data).await.unwrap();
    n.release(loc, header.len);
    loc
}

/// Asserts that each segment's live bytes and records are exactly those
/// of the records the index points to in it.
fn assert_live_counts_match_the_index(f: &Fix, what: &str) {
    let mut want: HashMap<u32, (u64, u64)> = HashMap::new();
    {
        let g = f.store.lock();
        for id in g.index.live_ids() {
            let m = g.index.get(id);
            if m.on_nvme() {
                let loc = Loc(m.nvme_loc);
                let w = want.entry(loc.slot()).or_default();
                w.0 += loc.span(m.len) as u64;
                w.1 += 1;
            }
        }
    }
    let n = f.store.nvme().unwrap();
    let segs = n.segments();
    for s in &segs {
        let (bytes, records) = want.remove(&s.slot).unwrap_or_default();
        assert_eq!(
            (s.live_bytes, s.live_records),
            (bytes, records),
            "{what}: segment {} (slot {}): live (bytes, records) vs the index's records in it",
            s.id,
            s.slot
        );
    }
    assert!(
        want.is_empty(),
        "{what}: the index points into slots without a segment: {want:?}"
    );
    assert_eq!(
        n.stats().live_bytes,
        segs.iter().map(|s| s.live_bytes).sum::<u64>()
    );
}

/// The slot of `k`'s NVMe record.
fn slot_of(f: &Fix, k: BlockKey) -> u32 {
    let g = f.store.lock();
    let ns = g.namespaces[&f.ns];
    let id = g.index.find(ns, &k).expect("indexed");
    let m = g.index.get(id);
    assert!(m.on_nvme());
    Loc(m.nvme_loc).slot()
}

/// After a restart, every segment's live bytes and records are those of
/// the records the index points to in it, exactly. The scan goes through
/// segments in id order and each front to back; recovery skips a record
/// voided by a tombstone scanned before it, a copy no newer than the one
/// already indexed, and one past `store.max_blocks`: none of them was ever
/// counted live, so none may be released (that took the count of the
/// segment's other records down). A record indexed and then superseded in
/// the same scan (by a newer copy, by a tombstone) is released.
#[tokio::test]
async fn recovery_counts_live_exactly_the_records_it_indexes() {
    for e in ENGINES {
        let mut o = Opts::new(e);
        o.policy.write_through = true;
        let Some(f) = fresh(o.clone()).await else {
            continue;
        };
        let (a, k, v, b) = (key(0x51, 0), key(0x51, 1), key(0x51, 2), key(0x51, 3));
        // Segment 0: A, K, V.
        for x in [a, k, v] {
            put_durable(&f, x).await;
        }
        // V is deleted and put again before its tombstone is written: the
        // tombstone's sequence number was taken by the delete, so the new
        // record's is later and the tombstone (written before it) does not
        // void it at recovery.
        let v_seq = seq_of(&f, v);
        let d = f
            .store
            .delete(&DeleteReq {
                namespace: f.ns,
                keys: vec![v],
            })
            .unwrap();
        assert_eq!(d.tombstones.len(), 1);
        assert!(d.tombstones[0].seq > v_seq);
        let (_, r) = f.put(v, None).unwrap();
        let job = f.store.begin_persist(r).unwrap();
        assert_eq!(tiering::write_tombstones(&f.store, &d.tombstones).await, 0);
        assert!(tiering::write_job(f.store.clone(), job).await);
        assert!(seq_of(&f, v) > d.tombstones[0].seq);
        // Segment 1 (a restart seals segment 0): B; then V's first record
        // copied forward with its own sequence number (as for a retired
        // block: below the tombstone's, so void), K the same way and A with
        // a new one, each by a reclaim stopped before it deleted segment 0.
        // A skipped record must come after a live one of its segment to
        // show: below zero, a release changes nothing.
        let f = f.reopen(o.clone()).await;
        assert!(
            f.store.contains(f.ns, &v),
            "{e:?}: V stored again after its delete survives the restart"
        );
        put_durable(&f, b).await;
        let v_copy = copy_forward_interrupted(&f, v, v_seq).await;
        let k_seq = seq_of(&f, k);
        let k_copy = copy_forward_interrupted(&f, k, k_seq).await;
        let a_seq = f.store.next_seq();
        let a_copy = copy_forward_interrupted(&f, a, a_seq).await;
        assert_ne!(
            k_copy.slot(),
            slot_of(&f, k),
            "{e:?}: the copy is in a newer segment"
        );

        // Scanned: A, K, V (indexed), the tombstone (V removed), V again
        // (indexed); B, V's first record again (voided by the tombstone),
        // K's copy (not newer: skipped), A's copy (newer: replaces A).
        let f = f.reopen(o.clone()).await;
        assert!(f.store.contains(f.ns, &v), "{e:?}: V's second record stays");
        assert_ne!(slot_of(&f, v), v_copy.slot(), "{e:?}: V's old copy is void");
        assert_eq!(slot_of(&f, a), a_copy.slot(), "{e:?}: A's newer copy wins");
        assert_ne!(
            slot_of(&f, k),
            k_copy.slot(),
            "{e:?}: K's first record stays"
        );
        assert_eq!(slot_of(&f, b), a_copy.slot());
        // Each of the two segments holds a live block beside what was
        // skipped in it.
        assert_eq!(f.store.nvme().unwrap().segments().len(), 2, "{e:?}");
        assert_live_counts_match_the_index(&f, &format!("{e:?}"));
        f.store.check_invariants();

        // Room for two blocks: A and K; V's first record and B are past
        // the limit, K's copy is skipped, A's copy replaces A.
        let mut two = o.clone();
        two.max_blocks = 2;
        let f = f.reopen(two).await;
        assert!(!f.store.contains(f.ns, &b), "{e:?}: B is past max_blocks");
        assert_eq!(slot_of(&f, a), a_copy.slot(), "{e:?}");
        assert_live_counts_match_the_index(&f, &format!("{e:?}, max_blocks 2"));
        f.store.check_invariants();
    }
}

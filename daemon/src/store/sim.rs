//! A seeded simulation: the store with an NVMe tier whose engine injects
//! faults (EIO on reads and writes, corrupted read bytes, a full device,
//! latency, and crashes that tear the writes in flight), driven by random
//! operations and checked against a reference model after every step.
//!
//! What the model checks:
//! * no read ever returns bytes other than the ones put under that key;
//! * after a crash and restart, every block the store had on NVMe before
//!   the crash (durable) and that was not deleted is back, byte-exact — in
//!   runs whose NVMe tier is large enough that no reclaim drops anything;
//! * a deleted block never comes back unless its tombstone write failed;
//! * disk use never exceeds the cap; the store's own invariants hold.
//!
//! `STRATA_SIM_SEEDS=n` runs n seeds (default 200); `STRATA_SIM_SEED=s`
//! runs one. A failure prints its seed.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_proto::convert::*;
use strata_proto::{BlockKey, Dtype, KvKind, Layout, NamespaceId};

use super::*;
use crate::metrics::{Registry, StoreMetrics};
use crate::tier::nvme::buf::BufPool;
use crate::tier::nvme::engine::{EngineKind, IoEngine, open_engine};
use crate::tier::nvme::fault::{FaultPlan, FaultyEngine};
use crate::tier::nvme::{NvmeConfig, NvmeTier};
use crate::tier::{DramConfig, DramTier};

const BLOCK: u64 = 4096;

fn layout() -> Layout {
    Layout {
        model_id: "sim".into(),
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

fn key(i: u16) -> BlockKey {
    BlockKey::new(&[0x51, (i >> 8) as u8, i as u8]).unwrap()
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

struct World {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    faults: FaultyEngine,
    ns: NamespaceId,
    policy: NvmePolicy,
    plan: FaultPlan,
    cap: u64,
    seed: u64,
    /// A subscriber's view, checked against the store after every step.
    mirror: super::events::EventMirror,
}

async fn open(
    dir: tempfile::TempDir,
    seed: u64,
    policy: NvmePolicy,
    plan: FaultPlan,
    cap: u64,
) -> World {
    let cfg = NvmeConfig {
        dir: dir.path().join("nvme"),
        capacity_bytes: cap,
        segment_bytes: 256 << 10,
        engine: EngineKind::Psync,
        queue_depth: 1,
        io_buffer_bytes: 64 << 10,
        io_buffers: 4,
        fence_after_errors: 1000,
        sync_writes: false,
    };
    let pool = BufPool::new(cfg.io_buffer_bytes, cfg.io_buffers);
    // One psync thread: completions in submission order, so a seed replays.
    let base = open_engine(EngineKind::Psync, 1, Some(&pool)).unwrap();
    let faults = FaultyEngine::new(base, seed, plan.clone());
    let eng: Arc<dyn IoEngine> = Arc::new(faults.clone());
    let (tier, _) = NvmeTier::open(cfg, eng, pool).unwrap();
    let dram = DramTier::new(&DramConfig {
        bytes: 8 * BLOCK,
        granule_bytes: BLOCK,
        prefault: false,
    })
    .unwrap();
    let store = Arc::new(Store::new(
        StoreConfig {
            nvme: policy.clone(),
            ..StoreConfig::default()
        },
        dram,
        Some(tier),
        BLOCK,
        Arc::new(ManualClock::default()),
        StoreMetrics::new(&Registry::new()),
    ));
    let st = tiering::recover(&store, &mut |_, _| {}).await;
    if std::env::var("STRATA_SIM_TRACE").is_ok() {
        eprintln!("recovered: {st:?}");
    }
    let (ns, _) = store.register_layout(layout());
    World {
        mirror: super::events::EventMirror::new(&store),
        dir,
        store,
        faults,
        ns,
        policy,
        plan,
        cap,
        seed,
    }
}

impl World {
    fn disk_bytes(&self) -> u64 {
        std::fs::read_dir(self.dir.path().join("nvme"))
            .map(|d| d.map(|e| e.unwrap().metadata().unwrap().len()).sum())
            .unwrap_or(0)
    }

    async fn get(&self, k: BlockKey) -> Option<Vec<u8>> {
        let guard = Arc::new(
            self.store
                .pin_for_read(&GetReq {
                    namespace: self.ns,
                    keys: vec![k],
                    lease: None,
                })
                .ok()?,
        );
        tiering::load(&guard, 0).await.ok().map(|b| b.to_vec())
    }
}

struct Model {
    /// Keys put at least once (their bytes are a function of the key).
    known: HashSet<BlockKey>,
    /// Deleted since their last put, and whether their tombstone may have
    /// failed (then they may come back).
    deleted: HashMap<BlockKey, bool>,
}

/// Runs one seed; panics (with the seed in the message) if the model fails.
async fn run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let roomy = rng.random_bool(0.5);
    // Roomy runs never reclaim: every durable block must survive crashes.
    let cap: u64 = if roomy { 64 << 20 } else { 1 << 20 };
    let policy = NvmePolicy {
        admission: [Admission::LookedUpOrHead, Admission::All][rng.random_range(0..2)],
        write_through: rng.random_bool(0.5),
        reclaim: [ReclaimPolicy::CopyHot, ReclaimPolicy::Drop][rng.random_range(0..2)],
        reclaim_order: [ReclaimOrder::Oldest, ReclaimOrder::Emptiest][rng.random_range(0..2)],
        ..NvmePolicy::default()
    };
    let faulty = rng.random_bool(0.5);
    let plan = if faulty {
        FaultPlan {
            read_eio: 0.02,
            write_eio: 0.02,
            corrupt_read: 0.03,
            latency_max: Duration::from_micros(200),
            ..FaultPlan::default()
        }
    } else {
        FaultPlan::default()
    };
    let mut w = open(tempfile::tempdir().unwrap(), seed, policy, plan, cap).await;
    let mut m = Model {
        known: HashSet::new(),
        deleted: HashMap::new(),
    };
    let keys: u16 = 48;
    let trace = std::env::var("STRATA_SIM_TRACE").is_ok();
    if trace {
        eprintln!(
            "seed {seed}: roomy {roomy} faulty {faulty} policy {:?}",
            w.policy
        );
    }
    for step in 0..120 {
        let k = key(rng.random_range(0..keys));
        let op = rng.random_range(0..100);
        if trace {
            eprintln!(
                "step {step}: op {op} key {k} tier {:?}",
                w.store.tier_of(w.ns, &k)
            );
        }
        match op {
            0..40 => {
                let data = payload(&k);
                let sum = strata_proto::checksum(&data);
                let res = match w.store.reserve(w.ns, k, None, BLOCK, sum, 0) {
                    Ok(Reserve::Present(r)) => Some(r),
                    Ok(Reserve::Slot(mut s)) => {
                        s.fill(&data);
                        w.store.publish(s, sum).ok().map(|(_, r)| r)
                    }
                    Err(_) => None,
                };
                if let Some(r) = res {
                    m.known.insert(k);
                    m.deleted.remove(&k);
                    if w.policy.write_through {
                        tiering::persist(&w.store, r).await;
                    }
                }
            }
            40..60 => {
                let _ = w.store.lookup(&LookupReq {
                    namespace: w.ns,
                    keys: vec![k],
                    lease_ttl_ms: 0,
                    want_slots: false,
                });
            }
            60..80 => {
                if let Some(bytes) = w.get(k).await {
                    assert_eq!(
                        bytes,
                        payload(&k),
                        "seed {seed} step {step}: wrong bytes for {k}"
                    );
                    assert!(
                        m.known.contains(&k),
                        "seed {seed} step {step}: {k} was never put"
                    );
                }
            }
            80..86 => {
                if let Ok(d) = w.store.delete(&DeleteReq {
                    namespace: w.ns,
                    keys: vec![k],
                }) && d.deleted == 1
                {
                    let failed = tiering::write_tombstones(&w.store, &d.tombstones).await > 0;
                    m.deleted.insert(k, failed);
                }
            }
            86..96 => tiering::step(&w.store).await,
            _ => {
                // Crash: what the store holds on NVMe now must survive.
                tiering::step(&w.store).await;
                let durable: Vec<BlockKey> = (0..keys)
                    .map(key)
                    .filter(|k| w.store.has_nvme_copy(w.ns, k))
                    .collect();
                w.faults.crash();
                // Writes in flight at the crash land torn.
                for j in 0..rng.random_range(0..4u16) {
                    let t = key(keys + j);
                    let data = payload(&t);
                    let sum = strata_proto::checksum(&data);
                    if let Ok(Reserve::Slot(mut s)) = w.store.reserve(w.ns, t, None, BLOCK, sum, 0)
                    {
                        s.fill(&data);
                        if let Ok((_, r)) = w.store.publish(s, sum) {
                            m.known.insert(t);
                            let _ = tiering::persist(&w.store, r).await;
                        }
                    }
                }
                let World {
                    dir,
                    store,
                    policy,
                    plan,
                    cap,
                    seed,
                    ..
                } = w;
                drop(store);
                w = open(dir, seed, policy, plan, cap).await;
                for k in durable {
                    if m.deleted.contains_key(&k) {
                        continue;
                    }
                    match w.get(k).await {
                        Some(b) => assert_eq!(
                            b,
                            payload(&k),
                            "seed {seed} step {step}: wrong bytes after restart"
                        ),
                        None => {
                            // A read fault on the way up is a miss, not a loss.
                            let faulted = faulty && {
                                let l = w.faults.log();
                                l.read_eio + l.corrupted > 0
                            };
                            assert!(
                                !roomy || faulted,
                                "seed {seed} step {step}: durable block {k} lost across a crash"
                            );
                        }
                    }
                }
            }
        }
        // Deleted blocks stay deleted (unless their tombstone failed).
        for (k, tombstone_failed) in &m.deleted {
            if !tombstone_failed {
                assert!(
                    !w.store.contains(w.ns, k),
                    "seed {seed} step {step}: deleted block {k} is back"
                );
            }
        }
        assert!(
            w.disk_bytes() <= w.cap,
            "seed {seed} step {step}: disk use {} over the cap",
            w.disk_bytes()
        );
        w.store.check_invariants();
        w.mirror
            .check(&w.store, &format!("seed {seed} step {step}"));
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("STRATA_SIM_SEED") {
        return vec![s.parse().expect("STRATA_SIM_SEED is a number")];
    }
    let n: u64 = std::env::var("STRATA_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    (0..n).map(|i| 0x5eed_0000 + i).collect()
}

#[test]
fn simulation() {
    let seeds = seeds();
    for &seed in &seeds {
        let r = std::panic::catch_unwind(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(run(seed))
        });
        if let Err(e) = r {
            eprintln!("simulation failed at seed {seed}; rerun with STRATA_SIM_SEED={seed}");
            std::panic::resume_unwind(e);
        }
    }
    eprintln!("simulation: {} seeds passed", seeds.len());
}

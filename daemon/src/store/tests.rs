//! Boundary 1: the store API with the in-memory (DRAM) tier.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use strata_proto::convert::*;
use strata_proto::{BlockKey, Dtype, KvKind, Layout, LeaseId, NamespaceId, ReservationId};

use super::*;
use crate::metrics::{Registry, StoreMetrics};
use crate::tier::{DramConfig, DramTier};

/// One token of this layout is 64 bytes; one block (1 token) is 64 bytes.
fn layout(tokens: u32) -> Layout {
    Layout {
        model_id: "test-model".into(),
        dtype: Dtype::F16,
        num_layers: 2,
        num_kv_heads: 1,
        head_dim: 8,
        tokens_per_block: tokens,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

struct Fixture {
    store: Arc<Store>,
    clock: Arc<ManualClock>,
    ns: NamespaceId,
    block: u64,
}

fn fixture(capacity_blocks: u64, tokens: u32, cfg: StoreConfig) -> Fixture {
    let l = layout(tokens);
    let block = l.block_bytes();
    let granule = block.next_power_of_two();
    let dram = DramTier::new(&DramConfig {
        bytes: capacity_blocks * granule,
        granule_bytes: granule,
        prefault: false,
    })
    .unwrap();
    let clock = Arc::new(ManualClock::default());
    let store = Arc::new(Store::new(
        cfg,
        dram,
        None,
        granule,
        clock.clone(),
        StoreMetrics::new(&Registry::new()),
    ));
    let (ns, existed) = store.register_layout(l);
    assert!(!existed);
    Fixture {
        store,
        clock,
        ns,
        block,
    }
}

fn key(c: u8, i: u8) -> BlockKey {
    BlockKey::new(&[0xc0, c, i]).unwrap()
}

fn payload(k: &BlockKey, len: u64) -> Vec<u8> {
    let seed = strata_proto::checksum(k.as_bytes());
    (0..len)
        .map(|i| (seed.wrapping_add(i * 31) >> 3) as u8)
        .collect()
}

impl Fixture {
    fn put(&self, k: BlockKey, parent: Option<BlockKey>) -> Result<PutResult, StoreError> {
        let data = payload(&k, self.block);
        self.put_bytes(k, parent, &data, strata_proto::checksum(&data))
    }

    fn put_bytes(
        &self,
        k: BlockKey,
        parent: Option<BlockKey>,
        data: &[u8],
        checksum: u64,
    ) -> Result<PutResult, StoreError> {
        match self
            .store
            .reserve(self.ns, k, parent, data.len() as u64, checksum, 0)?
        {
            Reserve::Present(_) => Ok(PutResult::AlreadyPresent),
            Reserve::Slot(mut slot) => {
                slot.bytes_mut().copy_from_slice(data);
                self.store.publish(slot, checksum).map(|(r, _)| r)
            }
        }
    }

    fn lookup(&self, keys: &[BlockKey], lease_ms: u32) -> LookupResult {
        self.store
            .lookup(&LookupReq {
                namespace: self.ns,
                keys: keys.to_vec(),
                lease_ttl_ms: lease_ms,
                want_slots: false,
            })
            .unwrap()
    }

    fn get(&self, keys: &[BlockKey], lease: Option<LeaseId>) -> Result<Vec<Vec<u8>>, StoreError> {
        let guard = Arc::new(self.store.pin_for_read(&GetReq {
            namespace: self.ns,
            keys: keys.to_vec(),
            lease,
        })?);
        let mut out = vec![];
        for i in 0..guard.blocks.len() {
            out.push(guard.dram_bytes(i).expect("in DRAM")?.to_vec());
        }
        Ok(out)
    }
}

#[test]
fn put_lookup_get_round_trip() {
    let f = fixture(16, 1, StoreConfig::default());
    let chain: Vec<_> = (0..4).map(|i| key(1, i)).collect();
    for (i, k) in chain.iter().enumerate() {
        let parent = (i > 0).then(|| chain[i - 1]);
        assert_eq!(f.put(*k, parent).unwrap(), PutResult::Stored);
    }
    let r = f.lookup(
        &[chain.clone(), vec![key(9, 9)], vec![chain[0]]].concat(),
        0,
    );
    assert_eq!(r.hits, 4);
    assert!(r.tiers.iter().all(|t| *t == TierKind::Dram));
    assert!(r.lease.is_none());
    let got = f.get(&chain, None).unwrap();
    for (k, g) in chain.iter().zip(&got) {
        assert_eq!(g, &payload(k, f.block));
    }
    f.store.check_invariants();
    let s = f.store.stats();
    assert_eq!(s.blocks, 4);
    assert_eq!(s.tiers[0].used, 4 * 64);
    assert_eq!(s.tiers[0].bytes_in, 4 * 64);
}

#[test]
fn partial_blocks_are_whole_tokens() {
    let f = fixture(16, 4, StoreConfig::default()); // 4 tokens x 64 bytes
    let k = key(1, 0);
    let data = payload(&k, 128);
    assert_eq!(
        f.put_bytes(k, None, &data, strata_proto::checksum(&data))
            .unwrap(),
        PutResult::Stored
    );
    let e = f
        .store
        .reserve(f.ns, key(1, 1), None, 100, 0, 2)
        .unwrap_err();
    assert!(e.to_string().starts_with("blocks[2].length:"), "{e}");
    let e = f
        .store
        .reserve(f.ns, key(1, 1), None, 5 * 64, 0, 0)
        .unwrap_err();
    assert!(e.to_string().contains("up to 256 bytes"), "{e}");
}

#[test]
fn idempotent_put_and_conflict() {
    let f = fixture(8, 1, StoreConfig::default());
    let k = key(1, 0);
    assert_eq!(f.put(k, None).unwrap(), PutResult::Stored);
    assert_eq!(f.put(k, None).unwrap(), PutResult::AlreadyPresent);
    // Two puts of the same key in flight at once: the second to publish is
    // told AlreadyPresent and its space is handed back.
    let k2 = key(1, 1);
    let data = payload(&k2, f.block);
    let c = strata_proto::checksum(&data);
    let Reserve::Slot(mut a) = f.store.reserve(f.ns, k2, None, f.block, c, 0).unwrap() else {
        panic!()
    };
    let Reserve::Slot(mut b) = f.store.reserve(f.ns, k2, None, f.block, c, 0).unwrap() else {
        panic!()
    };
    a.bytes_mut().copy_from_slice(&data);
    b.bytes_mut().copy_from_slice(&data);
    assert_eq!(f.store.publish(a, c).unwrap().0, PutResult::Stored);
    assert_eq!(f.store.publish(b, c).unwrap().0, PutResult::AlreadyPresent);
    f.store.check_invariants();
    assert_eq!(f.store.stats().tiers[0].used, 2 * 64);

    // Same key, other bytes, both in flight: the second is refused as a
    // conflict, its space handed back, the stored block unchanged.
    let k3 = key(1, 3);
    let Reserve::Slot(mut a) = f.store.reserve(f.ns, k3, None, f.block, 0, 0).unwrap() else {
        panic!()
    };
    let Reserve::Slot(mut b) = f.store.reserve(f.ns, k3, None, f.block, 0, 5).unwrap() else {
        panic!()
    };
    let good = payload(&k3, f.block);
    a.bytes_mut().copy_from_slice(&good);
    b.bytes_mut().fill(0xee);
    f.store.publish(a, strata_proto::checksum(&good)).unwrap();
    let e = f
        .store
        .publish(b, strata_proto::checksum(&vec![0xee; f.block as usize]))
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("blocks[5].checksum: block c00103 is already present"),
        "{e}"
    );
    assert_eq!(f.get(&[k3], None).unwrap()[0], good);
    f.store.check_invariants();
    assert_eq!(f.store.stats().tiers[0].used, 3 * 64);
}

#[test]
fn bad_checksum_changes_nothing() {
    let f = fixture(8, 1, StoreConfig::default());
    let k = key(1, 0);
    let data = payload(&k, f.block);
    let before = f.store.stats();
    let e = f.put_bytes(k, None, &data, 12345).unwrap_err();
    assert!(matches!(e, StoreError::ChecksumMismatch { .. }), "{e}");
    assert!(e.to_string().starts_with("blocks[0].checksum:"), "{e}");
    assert!(!f.store.contains(f.ns, &k));
    let after = f.store.stats();
    assert_eq!(before.tiers[0].used, after.tiers[0].used);
    assert_eq!(after.blocks, 0);
    f.store.check_invariants();
}

#[test]
fn abandoned_put_frees_space_and_is_invisible() {
    let f = fixture(2, 1, StoreConfig::default());
    let Reserve::Slot(mut s) = f
        .store
        .reserve(f.ns, key(1, 0), None, f.block, 0, 0)
        .unwrap()
    else {
        panic!()
    };
    s.bytes_mut()[..4].copy_from_slice(b"half");
    assert!(!f.store.contains(f.ns, &key(1, 0)));
    assert_eq!(f.store.stats().tiers[0].reserved_bytes, 64);
    drop(s);
    let st = f.store.stats();
    assert_eq!(
        (st.tiers[0].used, st.tiers[0].reserved_bytes, st.blocks),
        (0, 0, 0)
    );
    f.store.check_invariants();
}

#[test]
fn unknown_namespace_and_missing_key() {
    let f = fixture(4, 1, StoreConfig::default());
    let e = f
        .store
        .lookup(&LookupReq {
            namespace: NamespaceId(42),
            keys: vec![key(0, 0)],
            lease_ttl_ms: 0,
            want_slots: false,
        })
        .unwrap_err();
    assert!(matches!(e, StoreError::UnknownNamespace(_)));
    assert!(e.to_string().starts_with("namespace_id:"));
    f.put(key(1, 0), None).unwrap();
    let e = f.get(&[key(1, 0), key(1, 1)], None).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("keys[1]: block c00101 is not present"),
        "{e}"
    );
    // Nothing stayed pinned by the failed get.
    assert_eq!(f.store.stats().tiers[0].pinned_blocks, 0);
}

#[test]
fn eviction_keeps_within_cap_and_prefers_tails() {
    let f = fixture(8, 1, StoreConfig::default());
    // Chain A (0..4), touched first; chain B (0..4) later.
    let a: Vec<_> = (0..4).map(|i| key(0xa, i)).collect();
    let b: Vec<_> = (0..4).map(|i| key(0xb, i)).collect();
    for c in [&a, &b] {
        for i in 0..4 {
            f.put(c[i], (i > 0).then(|| c[i - 1])).unwrap();
        }
    }
    f.lookup(&a, 0);
    f.lookup(&b, 0);
    // Touch A's head only: under plain LRU A's tail would still go first;
    // under prefix-LRU too (a head with children is not a candidate).
    f.lookup(&a[..1], 0);
    f.put(key(0xc, 0), None).unwrap();
    assert!(
        !f.store.contains(f.ns, &a[3]),
        "tail of the least recent chain goes first"
    );
    assert!(f.store.contains(f.ns, &a[0]));
    f.put(key(0xc, 1), Some(key(0xc, 0))).unwrap();
    assert!(!f.store.contains(f.ns, &a[2]));
    // Fill far past capacity: memory stays within the cap.
    for i in 0..200u8 {
        f.put(key(0xd, i), (i > 0).then(|| key(0xd, i - 1)))
            .unwrap();
        let s = f.store.stats();
        assert!(s.tiers[0].used <= s.tiers[0].capacity);
    }
    f.store.check_invariants();
    assert_eq!(f.store.stats().blocks, 8);
}

#[test]
fn leases_pin_expire_and_are_checked() {
    let f = fixture(4, 1, StoreConfig::default());
    let keys: Vec<_> = (0..4).map(|i| key(1, i)).collect();
    for i in 0..4 {
        f.put(keys[i], (i > 0).then(|| keys[i - 1])).unwrap();
    }
    let r = f.lookup(&keys, 1000);
    let (lease, _) = r.lease.unwrap();
    // Everything is pinned: a new block cannot get space.
    let e = f.put(key(2, 0), None).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::NoSpace {
                pinned_bytes: 256,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.is_retryable());
    // Leased blocks are served, keys outside the lease are refused.
    assert_eq!(f.get(&keys, Some(lease)).unwrap().len(), 4);
    let slots = f
        .store
        .get_slots(&GetSlotsReq {
            namespace: f.ns,
            lease,
            keys: keys.clone(),
        })
        .unwrap();
    assert_eq!(slots.len(), 4);
    // Foreign namespace.
    let (ns2, _) = f.store.register_layout(layout(2));
    let e = f.store.get_slots(&GetSlotsReq {
        namespace: ns2,
        lease,
        keys: vec![keys[0]],
    });
    assert!(matches!(e, Err(StoreError::LeaseForeign { .. })));
    let e = f
        .store
        .release(&ReleaseReq {
            lease,
            namespace: Some(ns2),
        })
        .unwrap_err();
    assert!(matches!(e, StoreError::LeaseForeign { .. }), "{e}");
    // Never issued.
    let e = f
        .store
        .release(&ReleaseReq {
            lease: LeaseId(9999),
            namespace: None,
        })
        .unwrap_err();
    assert!(matches!(e, StoreError::LeaseUnknown(_)), "{e}");
    // Expiry.
    f.clock.advance(Duration::from_millis(1001));
    let e = f.get(&keys, Some(lease)).unwrap_err();
    assert!(matches!(e, StoreError::LeaseGone(_)), "{e}");
    assert_eq!(f.store.expire(), (1, 0));
    assert_eq!(f.store.stats().tiers[0].pinned_blocks, 0);
    f.put(key(2, 0), None).unwrap();
    let e = f
        .store
        .release(&ReleaseReq {
            lease,
            namespace: None,
        })
        .unwrap_err();
    assert!(matches!(e, StoreError::LeaseGone(_)), "{e}");
    f.store.check_invariants();
}

#[test]
fn lease_limits() {
    let cfg = StoreConfig {
        max_leases: 1,
        max_lease_ttl: Duration::from_secs(1),
        ..Default::default()
    };
    let f = fixture(4, 1, cfg);
    f.put(key(1, 0), None).unwrap();
    let e = f
        .store
        .lookup(&LookupReq {
            namespace: f.ns,
            keys: vec![key(1, 0)],
            lease_ttl_ms: 5000,
            want_slots: false,
        })
        .unwrap_err();
    assert!(e.to_string().starts_with("lease_ttl_ms:"), "{e}");
    f.lookup(&[key(1, 0)], 500);
    let e = f
        .store
        .lookup(&LookupReq {
            namespace: f.ns,
            keys: vec![key(1, 0)],
            lease_ttl_ms: 500,
            want_slots: false,
        })
        .unwrap_err();
    assert!(e.to_string().starts_with("store.max_leases:"), "{e}");
    // A lookup without hits takes no lease (and needs none).
    let r = f.lookup(&[key(7, 7)], 500);
    assert_eq!((r.hits, r.lease.is_none()), (0, true));
}

#[test]
fn zero_copy_reserve_commit_abort_expire() {
    let f = fixture(4, 1, StoreConfig::default());
    let blocks: Vec<_> = (0..3)
        .map(|i| ReserveBlock {
            key: key(1, i),
            parent: (i > 0).then(|| key(1, i - 1)),
            length: f.block,
        })
        .collect();
    let rs = f
        .store
        .reserve_shared(&ReserveReq {
            namespace: f.ns,
            blocks: blocks.clone(),
            ttl_ms: 0,
        })
        .unwrap();
    assert_eq!(rs.len(), 3);
    let mut commits = vec![];
    for r in &rs {
        let data = payload(&r.key, r.len);
        unsafe { f.store.dram().slice_mut(r.offset, r.len) }.copy_from_slice(&data);
        commits.push((r.id.unwrap(), strata_proto::checksum(&data)));
    }
    // Bad checksum on the second: first published, second freed, third open.
    let mut bad = commits.clone();
    bad[1].1 ^= 1;
    let e = f.store.commit(&CommitReq { blocks: bad }).unwrap_err();
    assert!(e.to_string().starts_with("blocks[1].checksum:"), "{e}");
    assert!(f.store.contains(f.ns, &key(1, 0)));
    assert!(!f.store.contains(f.ns, &key(1, 1)));
    let e = f
        .store
        .commit(&CommitReq {
            blocks: vec![commits[1]],
        })
        .unwrap_err();
    assert!(matches!(e, StoreError::ReservationGone { .. }), "{e}");
    assert_eq!(f.store.abort(&[commits[2].0, ReservationId(77)]), 1);
    // Already-present keys come back without a reservation.
    let rs = f
        .store
        .reserve_shared(&ReserveReq {
            namespace: f.ns,
            blocks: blocks[..2].to_vec(),
            ttl_ms: 10,
        })
        .unwrap();
    assert!(rs[0].id.is_none() && rs[1].id.is_some());
    f.clock.advance(Duration::from_millis(11));
    let e = f
        .store
        .commit(&CommitReq {
            blocks: vec![(rs[1].id.unwrap(), 0)],
        })
        .unwrap_err();
    assert!(matches!(e, StoreError::ReservationGone { .. }), "{e}");
    f.store.check_invariants();
    assert_eq!(f.store.stats().tiers[0].reserved_bytes, 0);
    // All or nothing: asking for more than fits takes nothing.
    let many: Vec<_> = (0..6)
        .map(|i| ReserveBlock {
            key: key(5, i),
            parent: None,
            length: f.block,
        })
        .collect();
    let _lease = f.lookup(&[key(1, 0)], 1000);
    let e = f.store.reserve_shared(&ReserveReq {
        namespace: f.ns,
        blocks: many,
        ttl_ms: 0,
    });
    assert!(matches!(e, Err(StoreError::NoSpace { .. })));
    f.store.check_invariants();
    assert_eq!(f.store.stats().tiers[0].reserved_bytes, 0);
}

#[test]
fn corrupted_bytes_are_a_miss_and_dropped() {
    let f = fixture(4, 1, StoreConfig::default());
    let k = key(1, 0);
    f.put(k, None).unwrap();
    let r = f.lookup(&[k], 1000);
    let (lease, _) = r.lease.unwrap();
    let slot = f
        .store
        .get_slots(&GetSlotsReq {
            namespace: f.ns,
            lease,
            keys: vec![k],
        })
        .unwrap()[0];
    // A local client scribbles over the slot.
    let bytes = unsafe { f.store.dram().slice_mut(slot.offset, 1) };
    bytes[0] ^= 0xff;
    let e = f.get(&[k], None).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(!f.store.contains(f.ns, &k), "a doubt is a miss");
    assert_eq!(f.store.stats().checksum_failures, 1);
    assert_eq!(f.store.stats().blocks, 1, "kept until its lease ends");
    f.store
        .release(&ReleaseReq {
            lease,
            namespace: None,
        })
        .unwrap();
    assert_eq!(f.store.stats().blocks, 0);
    f.store.check_invariants();
}

#[test]
fn watermark_eviction_runs_down_to_low() {
    let cfg = StoreConfig {
        high_watermark: 0.75,
        low_watermark: 0.5,
        ..Default::default()
    };
    let f = fixture(8, 1, cfg);
    for i in 0..7 {
        f.put(key(1, i), None).unwrap();
    }
    assert_eq!(f.store.evict_to_watermark(2), 3);
    assert_eq!(f.store.stats().blocks, 4);
    assert_eq!(f.store.evict_to_watermark(2), 0);
    f.store.check_invariants();
}

#[test]
fn delete_reports_absent_and_pinned() {
    let f = fixture(4, 1, StoreConfig::default());
    f.put(key(1, 0), None).unwrap();
    f.put(key(1, 1), Some(key(1, 0))).unwrap();
    let _l = f.lookup(&[key(1, 0)], 1000);
    let r = f
        .store
        .delete(&DeleteReq {
            namespace: f.ns,
            keys: vec![key(1, 0), key(1, 1), key(1, 2)],
        })
        .unwrap();
    assert_eq!(r.deleted, 1);
    assert_eq!(r.pinned, vec![key(1, 0)]);
    assert_eq!(r.absent, vec![key(1, 2)]);
    f.store.check_invariants();
}

/// The publish hook hears of every block a put or a commit stores, and of
/// nothing else; `chain_to` walks parent links back to the root and says
/// None for a broken or too long chain.
#[test]
fn publish_hook_and_chain_walk() {
    #[derive(Default)]
    struct Heard(Mutex<Vec<(NamespaceId, BlockKey, Option<BlockKey>)>>);
    impl PublishHook for Heard {
        fn stored(&self, ns: NamespaceId, key: &BlockKey, parent: Option<&BlockKey>) {
            self.0.lock().unwrap().push((ns, *key, parent.copied()));
        }
    }
    let f = fixture(16, 1, StoreConfig::default());
    let heard = Arc::new(Heard::default());
    assert!(f.store.set_publish_hook(heard.clone()));
    assert!(!f.store.set_publish_hook(heard.clone()), "set once");
    f.put(key(1, 0), None).unwrap();
    f.put(key(1, 1), Some(key(1, 0))).unwrap();
    f.put(key(1, 2), Some(key(1, 1))).unwrap();
    // Already present, and a failed checksum: not stored, not heard.
    assert_eq!(
        f.put(key(1, 2), Some(key(1, 1))).unwrap(),
        PutResult::AlreadyPresent
    );
    let data = payload(&key(1, 3), f.block);
    assert!(f.put_bytes(key(1, 3), Some(key(1, 2)), &data, 7).is_err());
    // A zero-copy commit is heard too.
    let rs = f
        .store
        .reserve_shared(&ReserveReq {
            namespace: f.ns,
            blocks: vec![ReserveBlock {
                key: key(2, 0),
                parent: Some(key(1, 0)),
                length: f.block,
            }],
            ttl_ms: 0,
        })
        .unwrap();
    let data = payload(&key(2, 0), f.block);
    unsafe { f.store.dram().slice_mut(rs[0].offset, rs[0].len) }.copy_from_slice(&data);
    f.store
        .commit(&CommitReq {
            blocks: vec![(rs[0].id.unwrap(), strata_proto::checksum(&data))],
        })
        .unwrap();
    let got = heard.0.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![
            (f.ns, key(1, 0), None),
            (f.ns, key(1, 1), Some(key(1, 0))),
            (f.ns, key(1, 2), Some(key(1, 1))),
            (f.ns, key(2, 0), Some(key(1, 0))),
        ]
    );

    let keys = |c: Option<Vec<(BlockKey, u64)>>| {
        c.map(|v| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>())
    };
    assert_eq!(
        keys(f.store.chain_to(f.ns, &key(1, 2), 8)),
        Some(vec![key(1, 0), key(1, 1), key(1, 2)])
    );
    assert_eq!(f.store.chain_to(f.ns, &key(1, 2), 8).unwrap()[0].1, f.block);
    // A fork shares the root.
    assert_eq!(
        keys(f.store.chain_to(f.ns, &key(2, 0), 8)),
        Some(vec![key(1, 0), key(2, 0)])
    );
    assert_eq!(f.store.chain_to(f.ns, &key(1, 2), 2), None, "too long");
    assert_eq!(f.store.chain_to(f.ns, &key(9, 9), 8), None, "not stored");
    f.store
        .delete(&DeleteReq {
            namespace: f.ns,
            keys: vec![key(1, 1)],
        })
        .unwrap();
    assert_eq!(f.store.chain_to(f.ns, &key(1, 2), 8), None, "broken");
    assert_eq!(
        keys(f.store.chain_to(f.ns, &key(2, 0), 8)),
        Some(vec![key(1, 0), key(2, 0)])
    );
    // Stored again, the missing parent joins the chain again: the child
    // keeps the hash of the key it named.
    f.put(key(1, 1), Some(key(1, 0))).unwrap();
    assert_eq!(
        keys(f.store.chain_to(f.ns, &key(1, 2), 8)),
        Some(vec![key(1, 0), key(1, 1), key(1, 2)])
    );
    // A child stored before its parent is not a root: its chain is unknown
    // until the parent comes.
    f.put(key(3, 1), Some(key(3, 0))).unwrap();
    assert_eq!(
        f.store.chain_to(f.ns, &key(3, 1), 8),
        None,
        "parent never stored"
    );
    f.put(key(3, 0), None).unwrap();
    assert_eq!(
        keys(f.store.chain_to(f.ns, &key(3, 1), 8)),
        Some(vec![key(3, 0), key(3, 1)])
    );
    f.store.check_invariants();
}

/// `pin_tail` pins what `pin_chain` pins from the same chain's keys;
/// nothing for an unknown chain; a chain of another length is an error
/// naming the field, and pins nothing.
#[test]
fn pin_tail_follows_parents_to_the_root() {
    let f = fixture(16, 1, StoreConfig::default());
    for i in 0..5 {
        f.put(key(1, i), (i > 0).then(|| key(1, i - 1))).unwrap();
    }
    let chain: Vec<BlockKey> = (0..5).map(|i| key(1, i)).collect();
    let by_keys: Vec<BlockKey> = f
        .store
        .pin_chain(f.ns, &chain)
        .unwrap()
        .blocks
        .iter()
        .map(|b| b.key)
        .collect();
    let pin = f
        .store
        .pin_tail(f.ns, &key(1, 4), 5, || "f".into())
        .unwrap();
    let by_tail: Vec<BlockKey> = pin.blocks.iter().map(|b| b.key).collect();
    assert_eq!(by_tail, by_keys);
    assert_eq!(by_tail, chain);
    assert_eq!(pin.blocks[4].len, f.block);
    drop(pin);
    let prefix = f
        .store
        .pin_tail(f.ns, &key(1, 2), 3, || "f".into())
        .unwrap();
    assert_eq!(prefix.blocks.len(), 3);
    drop(prefix);
    for n in [4, 6] {
        let e = f
            .store
            .pin_tail(f.ns, &key(1, 4), n, || "seq.chain_blocks".into())
            .unwrap_err();
        assert!(
            e.to_string().starts_with("seq.chain_blocks: is "),
            "{n}: {e}"
        );
    }
    assert!(
        f.store
            .pin_tail(f.ns, &key(9, 9), 3, || "f".into())
            .unwrap()
            .blocks
            .is_empty()
    );
    f.store
        .delete(&DeleteReq {
            namespace: f.ns,
            keys: vec![key(1, 1)],
        })
        .unwrap();
    assert!(
        f.store
            .pin_tail(f.ns, &key(1, 4), 5, || "f".into())
            .unwrap()
            .blocks
            .is_empty(),
        "a missing block in the middle: the head is unknown"
    );
    assert_eq!(f.store.stats().tiers[0].pinned_blocks, 0);
    f.store.check_invariants();
}

// ---- property test against a reference model --------------------------------

#[derive(Debug, Clone)]
enum Op {
    /// Put block `i` of chain `c` (parent: block i-1).
    Put(u8, u8),
    /// Lookup chain `c` up to `n` blocks, with or without a lease.
    Lookup(u8, u8, bool),
    /// Release the `n`-th open lease (mod count).
    Release(u8),
    /// Get blocks 0..n of chain c (touches them when all present).
    Get(u8, u8),
    Delete(u8, u8),
    Watermark,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..4, 0u8..6).prop_map(|(c, i)| Op::Put(c, i)),
        3 => (0u8..4, 1u8..7, any::<bool>()).prop_map(|(c, n, l)| Op::Lookup(c, n, l)),
        2 => any::<u8>().prop_map(Op::Release),
        1 => (0u8..4, 1u8..4).prop_map(|(c, n)| Op::Get(c, n)),
        1 => (0u8..4, 0u8..6).prop_map(|(c, i)| Op::Delete(c, i)),
        1 => Just(Op::Watermark),
    ]
}

/// A model block: (instance, parent instance, tick, pins).
type ModelBlock = (u64, Option<u64>, u64, u32);

/// The reference: the rule of prefix-aware LRU written as plainly as possible.
#[derive(Default)]
struct Model {
    tick: u64,
    next_instance: u64,
    blocks: BTreeMap<(u8, u8), ModelBlock>,
    leases: Vec<(LeaseId, Vec<(u8, u8)>)>,
    capacity: usize,
    high: usize,
    low: usize,
}

impl Model {
    fn present_children(&self, inst: u64) -> usize {
        self.blocks.values().filter(|b| b.1 == Some(inst)).count()
    }

    fn victim(&self) -> Option<(u8, u8)> {
        self.blocks
            .iter()
            .filter(|(_, b)| b.3 == 0 && self.present_children(b.0) == 0)
            .min_by_key(|(_, b)| b.2)
            .map(|(k, _)| *k)
    }

    fn touch(&mut self, k: (u8, u8)) {
        self.tick += 1;
        self.blocks.get_mut(&k).unwrap().2 = self.tick;
    }

    /// Returns false when the model refuses for lack of space.
    fn put(&mut self, c: u8, i: u8) -> bool {
        if self.blocks.contains_key(&(c, i)) {
            return true;
        }
        while self.blocks.len() >= self.capacity {
            match self.victim() {
                Some(v) => {
                    self.blocks.remove(&v);
                }
                None => return false,
            }
        }
        let parent = if i > 0 {
            self.blocks.get(&(c, i - 1)).map(|b| b.0)
        } else {
            None
        };
        self.tick += 1;
        self.next_instance += 1;
        self.blocks
            .insert((c, i), (self.next_instance, parent, self.tick, 0));
        true
    }
}

fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let capacity = 6;
    let cfg = StoreConfig {
        high_watermark: 5.0 / 6.0,
        low_watermark: 0.5,
        ..Default::default()
    };
    let f = fixture(capacity as u64, 1, cfg);
    let mut m = Model {
        capacity,
        high: 5,
        low: 3,
        ..Default::default()
    };
    for op in ops {
        match op {
            Op::Put(c, i) => {
                let parent = (i > 0).then(|| key(c, i - 1));
                let got = f.put(key(c, i), parent);
                let ok = m.put(c, i);
                prop_assert_eq!(got.is_ok(), ok, "put {:?}: {:?}", (c, i), got);
            }
            Op::Lookup(c, n, lease) => {
                let keys: Vec<_> = (0..n).map(|i| key(c, i)).collect();
                let r = f.lookup(&keys, if lease { 60_000 } else { 0 });
                let hits = (0..n)
                    .take_while(|i| m.blocks.contains_key(&(c, *i)))
                    .count();
                prop_assert_eq!(r.hits as usize, hits);
                for i in 0..hits as u8 {
                    m.touch((c, i));
                }
                if let Some((l, _)) = r.lease {
                    let held: Vec<_> = (0..hits as u8).map(|i| (c, i)).collect();
                    for k in &held {
                        m.blocks.get_mut(k).unwrap().3 += 1;
                    }
                    m.leases.push((l, held));
                }
            }
            Op::Release(n) => {
                if !m.leases.is_empty() {
                    let (l, held) = m.leases.remove(n as usize % m.leases.len());
                    f.store
                        .release(&ReleaseReq {
                            lease: l,
                            namespace: Some(f.ns),
                        })
                        .unwrap();
                    for k in held {
                        m.blocks.get_mut(&k).unwrap().3 -= 1;
                    }
                }
            }
            Op::Get(c, n) => {
                let keys: Vec<_> = (0..n).map(|i| key(c, i)).collect();
                let all = (0..n).all(|i| m.blocks.contains_key(&(c, i)));
                let got = f.get(&keys, None);
                prop_assert_eq!(got.is_ok(), all);
                if let Ok(data) = got {
                    for (k, d) in keys.iter().zip(data) {
                        prop_assert_eq!(d, payload(k, f.block));
                    }
                    for i in 0..n {
                        m.touch((c, i));
                    }
                }
            }
            Op::Delete(c, i) => {
                let r = f
                    .store
                    .delete(&DeleteReq {
                        namespace: f.ns,
                        keys: vec![key(c, i)],
                    })
                    .unwrap();
                match m.blocks.get(&(c, i)) {
                    None => prop_assert_eq!(r.absent.len(), 1),
                    Some(b) if b.3 > 0 => prop_assert_eq!(r.pinned.len(), 1),
                    Some(_) => {
                        prop_assert_eq!(r.deleted, 1);
                        m.blocks.remove(&(c, i));
                    }
                }
            }
            Op::Watermark => {
                f.store.evict_to_watermark(1);
                if m.blocks.len() > m.high {
                    while m.blocks.len() > m.low {
                        match m.victim() {
                            Some(v) => {
                                m.blocks.remove(&v);
                            }
                            None => break,
                        }
                    }
                }
            }
        }
        // Same blocks present; every leased block present.
        for c in 0..4 {
            for i in 0..6 {
                prop_assert_eq!(
                    f.store.contains(f.ns, &key(c, i)),
                    m.blocks.contains_key(&(c, i)),
                    "block {:?}",
                    (c, i)
                );
            }
        }
        for (_, held) in &m.leases {
            for k in held {
                prop_assert!(
                    f.store.contains(f.ns, &key(k.0, k.1)),
                    "leased block evicted"
                );
            }
        }
        f.store.check_invariants();
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn matches_reference_model(ops in proptest::collection::vec(op(), 1..80)) {
        run_model(ops)?;
    }
}

#[test]
fn lease_and_reservation_ids_never_collide() {
    let f = fixture(8, 1, StoreConfig::default());
    f.put(key(1, 0), None).unwrap();
    let mut seen = HashMap::new();
    for _ in 0..5 {
        let (l, _) = f.lookup(&[key(1, 0)], 100).lease.unwrap();
        assert!(seen.insert(l.0, ()).is_none());
        let r = f
            .store
            .reserve_shared(&ReserveReq {
                namespace: f.ns,
                blocks: vec![ReserveBlock {
                    key: key(2, 0),
                    parent: None,
                    length: f.block,
                }],
                ttl_ms: 0,
            })
            .unwrap();
        let id = r[0].id.unwrap();
        assert!(seen.insert(id.0, ()).is_none());
        f.store.abort(&[id]);
    }
}

#[test]
fn lookup_walks_consecutive_slots_but_checks_every_key() {
    let f = fixture(64, 1, StoreConfig::default());
    let chain: Vec<_> = (0..12).map(|i| key(3, i)).collect();
    for (i, k) in chain.iter().enumerate() {
        f.put(*k, (i > 0).then(|| chain[i - 1])).unwrap();
    }
    assert_eq!(f.lookup(&chain, 0).hits, 12);
    // Block 5 deleted and its slot reused by another key: the slot guess
    // for key 5 now holds a different key and must not count as a hit.
    f.store
        .delete(&DeleteReq {
            namespace: f.ns,
            keys: vec![chain[5]],
        })
        .unwrap();
    f.put(key(9, 9), None).unwrap();
    assert_eq!(f.lookup(&chain, 0).hits, 5);
    // The same keys in another namespace are not hits either.
    let (ns2, _) = f.store.register_layout(layout(2));
    let r = f
        .store
        .lookup(&LookupReq {
            namespace: ns2,
            keys: chain.clone(),
            lease_ttl_ms: 0,
            want_slots: false,
        })
        .unwrap();
    assert_eq!(r.hits, 0);
    // Put 5 back (elsewhere): the run is whole again, through the table.
    f.put(chain[5], Some(chain[4])).unwrap();
    assert_eq!(f.lookup(&chain, 0).hits, 12);
    // A key after a gap is never reported, even if present.
    let mut asked = chain[..3].to_vec();
    asked.push(key(7, 7));
    asked.extend_from_slice(&chain[3..]);
    assert_eq!(f.lookup(&asked, 0).hits, 3);
    f.store.check_invariants();
}

/// Namespace ordinals are 16 bits in the index record: the store knows at
/// most 65,536 namespaces and refuses the next one with a clear error
/// (never wrapping its ordinal onto another namespace's blocks); those it
/// knows keep working.
#[test]
fn namespaces_past_the_ordinal_limit_are_refused() {
    let f = fixture(4, 1, StoreConfig::default());
    let other = |i: usize| Layout {
        model_id: format!("model-{i}"),
        ..layout(1)
    };
    // The fixture registered one.
    let mut last = f.ns;
    for i in 1..MAX_NAMESPACES {
        let r = f.store.register(other(i)).unwrap();
        assert!(!r.existed);
        last = r.id;
    }
    let e = f.store.register(other(MAX_NAMESPACES)).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::Limit {
                limit: "namespaces",
                ..
            }
        ),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains("65536 namespaces"), "{msg}");
    assert!(msg.contains("reuse the layouts"), "{msg}");
    assert_eq!(
        crate::server::status::code_of(&e),
        tonic::Code::ResourceExhausted
    );
    let refused = other(MAX_NAMESPACES).namespace_id();
    assert!(f.store.namespace_owner(refused).is_none());
    // Known namespaces still register and store; their blocks stay apart.
    assert!(f.store.register(other(7)).unwrap().existed);
    f.put(key(1, 1), None).unwrap();
    let r = f
        .store
        .lookup(&LookupReq {
            namespace: last,
            keys: vec![key(1, 1)],
            lease_ttl_ms: 0,
            want_slots: false,
        })
        .unwrap();
    assert_eq!(r.hits, 0);
    assert_eq!(f.lookup(&[key(1, 1)], 0).hits, 1);
    f.store.check_invariants();
}

//! Boundary 1 for tenants: ownership, quotas and shares through the store
//! API with the DRAM tier, and a property test that drives three tenants at
//! random and checks, after every step, the store's invariants (tenants'
//! books included), that no tenant is above its DRAM quota, and that no
//! tenant within its share lost a block to another tenant.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use proptest::prelude::*;
use strata_proto::convert::*;
use strata_proto::{BlockKey, Dtype, KvKind, Layout, LeaseId, NamespaceId, ReservationId};

use super::*;
use crate::metrics::{Registry, StoreMetrics};
use crate::tier::{DramConfig, DramTier};

/// 64 bytes per token, one token per block; granule 64.
fn layout(salt: &[u8]) -> Layout {
    Layout {
        model_id: "tenant-test".into(),
        dtype: Dtype::F16,
        num_layers: 2,
        num_kv_heads: 1,
        head_dim: 8,
        tokens_per_block: 1,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: salt.to_vec(),
    }
}

const BLOCK: u64 = 64;

/// A store of `blocks` DRAM blocks with tenants "default" (no quota) and
/// the given (name, quota in blocks); each tenant registered one namespace.
fn store(blocks: u64, tenants: &[(&str, u64)]) -> (Arc<Store>, Vec<NamespaceId>) {
    let mut specs = vec![TenantSpec::unlimited("default")];
    for &(n, q) in tenants {
        specs.push(TenantSpec {
            name: n.into(),
            dram_bytes: q * BLOCK,
            nvme_bytes: 0,
        });
    }
    let cfg = StoreConfig {
        tenants: TenantConfig {
            tenants: specs,
            multi: true,
        },
        // Shares are computed out of the low watermark: 100% keeps the
        // arithmetic of these tests in whole blocks.
        high_watermark: 1.0,
        low_watermark: 1.0,
        ..StoreConfig::default()
    };
    let dram = DramTier::new(&DramConfig {
        bytes: blocks * BLOCK,
        granule_bytes: BLOCK,
        prefault: false,
    })
    .unwrap();
    let store = Arc::new(Store::new(
        cfg,
        dram,
        None,
        BLOCK,
        Arc::new(ManualClock::default()),
        StoreMetrics::new(&Registry::new()),
    ));
    let mut ns = vec![store.register_layout(layout(b"")).0];
    for &(n, _) in tenants {
        let r = store.register(layout(b"").for_tenant(n)).unwrap();
        assert_eq!(&*r.tenant_name, n);
        ns.push(r.id);
    }
    (store, ns)
}

fn key(t: u8, i: u32) -> BlockKey {
    let mut k = [0u8; 5];
    k[0] = t;
    k[1..].copy_from_slice(&i.to_be_bytes());
    BlockKey::new(&k).unwrap()
}

fn put(store: &Arc<Store>, ns: NamespaceId, k: BlockKey) -> Result<PutResult, StoreError> {
    let data = vec![k.as_bytes()[4]; BLOCK as usize];
    let c = strata_proto::checksum(&data);
    match store.reserve(ns, k, None, BLOCK, c, 0)? {
        Reserve::Present(_) => Ok(PutResult::AlreadyPresent),
        Reserve::Slot(mut s) => {
            s.bytes_mut().copy_from_slice(&data);
            store.publish(s, c).map(|(r, _)| r)
        }
    }
}

fn usage(store: &Store, name: &str) -> TenantUsage {
    store
        .tenant_usage()
        .into_iter()
        .find(|u| &*u.name == name)
        .unwrap()
}

fn present(store: &Store, ns: NamespaceId, keys: &[BlockKey]) -> usize {
    keys.iter().filter(|k| store.contains(ns, k)).count()
}

#[test]
fn owners_are_read_off_the_salt_and_unknown_owners_are_rehomed() {
    let (store, ns) = store(16, &[("alice", 0), ("bob", 0)]);
    let ids: Vec<_> = ns
        .iter()
        .map(|&n| store.namespace_owner(n).unwrap())
        .collect();
    assert_eq!(ids, [0, 1, 2]);
    // The same layout for another tenant is another namespace.
    assert_ne!(ns[1], ns[2]);
    // A different layout under an existing id is refused (a collision).
    let mut other = layout(b"").for_tenant("alice");
    other.model_id = "other".into();
    assert!(store.register(other).is_ok());
    // A namespace found on disk before its layout is known belongs to
    // nobody; registering the layout gives it to the tenant the salt names,
    // with what its blocks hold.
    let l = layout(b"late").for_tenant("bob");
    let id = l.namespace_id();
    {
        let mut g = store.lock();
        ns_insert(&mut g, id, None).unwrap();
    }
    let unowned = store.tenant_id(UNOWNED).unwrap();
    assert_eq!(store.namespace_owner(id), Some(unowned));
    let r = store.register(l).unwrap();
    assert!(r.existed);
    assert_eq!(r.tenant, 2);
    assert_eq!(store.namespace_owner(id), Some(2));
    assert_eq!(usage(&store, "bob").namespaces, 2);
    assert_eq!(usage(&store, UNOWNED).namespaces, 0);
    store.check_invariants();
}

#[test]
fn a_put_over_the_quota_evicts_the_tenants_own_blocks_first() {
    let (store, ns) = store(16, &[("alice", 4), ("bob", 4)]);
    for i in 0..4 {
        put(&store, ns[2], key(2, i)).unwrap();
    }
    for i in 0..10 {
        put(&store, ns[1], key(1, i)).unwrap();
        assert!(usage(&store, "alice").dram.used <= 4 * BLOCK);
    }
    // Alice keeps her 4 most recent blocks; Bob lost nothing.
    let alice: Vec<_> = (0..10).map(|i| key(1, i)).collect();
    assert_eq!(present(&store, ns[1], &alice[6..]), 4);
    assert_eq!(present(&store, ns[1], &alice[..6]), 0);
    let bob: Vec<_> = (0..4).map(|i| key(2, i)).collect();
    assert_eq!(present(&store, ns[2], &bob), 4);
    let a = usage(&store, "alice");
    assert_eq!((a.dram.evictions, a.dram.refusals), (6, 0));
    store.check_invariants();
}

#[test]
fn quota_refusal_names_tenant_tier_quota_and_usage_and_changes_nothing() {
    let (store, ns) = store(16, &[("alice", 4)]);
    let keys: Vec<_> = (0..4).map(|i| key(1, i)).collect();
    for k in &keys {
        put(&store, ns[1], *k).unwrap();
    }
    // Every block leased: nothing of Alice's may go.
    let lease = store
        .lookup(&LookupReq {
            namespace: ns[1],
            keys: keys.clone(),
            lease_ttl_ms: 60_000,
            want_slots: false,
        })
        .unwrap();
    assert_eq!(lease.hits, 4);
    let before = (store.stats().tiers[0].used, usage(&store, "alice"));
    let e = put(&store, ns[1], key(1, 9)).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            StoreError::Quota {
                tier: "dram",
                quota: 256,
                used: 256,
                needed: 64,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.starts_with("tenant alice: dram quota exceeded"),
        "{msg}"
    );
    assert!(msg.contains("256 pinned"), "{msg}");
    // A zero-copy batch larger than the quota is refused outright, even
    // with nothing pinned.
    store
        .release(&ReleaseReq {
            lease: lease.lease.unwrap().0,
            namespace: Some(ns[1]),
        })
        .unwrap();
    let batch: Vec<_> = (10..15)
        .map(|i| ReserveBlock {
            key: key(1, i),
            parent: None,
            length: BLOCK,
        })
        .collect();
    let e = store
        .reserve_shared(&ReserveReq {
            namespace: ns[1],
            blocks: batch,
            ttl_ms: 0,
        })
        .unwrap_err();
    assert!(matches!(e, StoreError::Quota { needed: 320, .. }), "{e}");
    // Nothing changed: no block stored, none evicted, nothing reserved.
    assert_eq!(present(&store, ns[1], &keys), 4);
    assert!(!store.contains(ns[1], &key(1, 9)));
    let after = usage(&store, "alice");
    assert_eq!(store.stats().tiers[0].used, before.0);
    assert_eq!(after.dram.used, before.1.dram.used);
    assert_eq!(after.dram.evictions, 0);
    assert_eq!(after.dram.refusals, 2);
    assert_eq!(store.stats().reservations, 0);
    store.check_invariants();
}

#[test]
fn a_tenant_within_its_share_keeps_its_blocks_when_another_fills_the_tier() {
    // 16 blocks; Bob's quota (and share) is 6; "default" has no quota, so
    // a share of 0.
    let (store, ns) = store(16, &[("bob", 6)]);
    let bob: Vec<_> = (0..6).map(|i| key(2, i)).collect();
    for k in &bob {
        put(&store, ns[1], *k).unwrap();
    }
    // The default tenant writes far more than the tier holds: it evicts
    // only its own blocks.
    for i in 0..100 {
        put(&store, ns[0], key(0, i)).unwrap();
    }
    assert_eq!(present(&store, ns[1], &bob), 6, "Bob is within his share");
    assert_eq!(usage(&store, "bob").dram.evictions, 0);
    assert_eq!(usage(&store, "default").dram.used, 10 * BLOCK);
    assert_eq!(usage(&store, "default").dram.evictions, 90);
    store.check_invariants();
}

#[test]
fn tenants_above_their_share_give_way_first() {
    // Quotas of 12 + 12 blocks on a 16-block tier: shares of 8 each.
    let (store, ns) = store(16, &[("a", 12), ("b", 12)]);
    assert_eq!(usage(&store, "a").dram.share, 8 * BLOCK);
    let a: Vec<_> = (0..12).map(|i| key(1, i)).collect();
    for k in &a {
        put(&store, ns[1], *k).unwrap();
    }
    // B fills its share: the tier runs out after 4 blocks, and A, above
    // its share, gives up its least recently used blocks, down to 8.
    let b: Vec<_> = (0..12).map(|i| key(2, i)).collect();
    for k in &b[..8] {
        put(&store, ns[2], *k).unwrap();
    }
    assert_eq!(present(&store, ns[1], &a[4..]), 8);
    assert_eq!(present(&store, ns[1], &a[..4]), 0);
    // B beyond its share (within its quota): now it evicts its own.
    for k in &b[8..] {
        put(&store, ns[2], *k).unwrap();
    }
    assert_eq!(present(&store, ns[1], &a), 8, "A is within its share");
    assert_eq!(present(&store, ns[2], &b[4..]), 8);
    assert_eq!(usage(&store, "a").dram.evictions, 4);
    assert_eq!(usage(&store, "b").dram.evictions, 4);
    store.check_invariants();
}

/// One step of the property test.
#[derive(Debug, Clone)]
enum Op {
    Put { t: usize, k: u32 },
    Lease { t: usize, k: u32 },
    ReleaseAll { t: usize },
    Delete { t: usize, k: u32 },
    Reserve { t: usize, k: u32, n: u32 },
    CommitOrAbort { commit: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, 0..40u32).prop_map(|(t, k)| Op::Put { t, k }),
        2 => (0..3usize, 0..40u32).prop_map(|(t, k)| Op::Lease { t, k }),
        1 => (0..3usize).prop_map(|t| Op::ReleaseAll { t }),
        1 => (0..3usize, 0..40u32).prop_map(|(t, k)| Op::Delete { t, k }),
        2 => (0..3usize, 0..40u32, 1..4u32).prop_map(|(t, k, n)| Op::Reserve { t, k, n }),
        2 => any::<bool>().prop_map(|commit| Op::CommitOrAbort { commit }),
    ]
}

fn run(quotas: [u64; 3], ops: Vec<Op>) -> Result<(), TestCaseError> {
    // Tenants "default" (no quota), "a", "b": 24 blocks of DRAM.
    let (store, ns) = store(24, &[("a", quotas[1]), ("b", quotas[2])]);
    let names = ["default", "a", "b"];
    let mut leases: HashMap<usize, Vec<LeaseId>> = HashMap::new();
    let mut open: Vec<(ReservationId, usize, BlockKey)> = Vec::new();
    for op in ops {
        // Blocks of each tenant before the step, and whether it is within
        // its share (then no other tenant's step may take its blocks).
        let held: Vec<HashSet<BlockKey>> = (0..3)
            .map(|t| {
                (0..40)
                    .map(|k| key(t as u8, k))
                    .filter(|k| store.contains(ns[t], k))
                    .collect()
            })
            .collect();
        let within: Vec<bool> = names
            .iter()
            .map(|n| {
                let u = usage(&store, n);
                u.dram.used <= u.dram.share
            })
            .collect();
        let actor = match &op {
            Op::Put { t, .. }
            | Op::Lease { t, .. }
            | Op::ReleaseAll { t }
            | Op::Delete { t, .. }
            | Op::Reserve { t, .. } => Some(*t),
            Op::CommitOrAbort { .. } => open.first().map(|o| o.1),
        };
        match op {
            Op::Put { t, k } => match put(&store, ns[t], key(t as u8, k)) {
                Ok(_) | Err(StoreError::Quota { .. }) | Err(StoreError::NoSpace { .. }) => {}
                Err(e) => prop_assert!(false, "put: {e}"),
            },
            Op::Lease { t, k } => {
                let r = store
                    .lookup(&LookupReq {
                        namespace: ns[t],
                        keys: vec![key(t as u8, k)],
                        lease_ttl_ms: 60_000,
                        want_slots: false,
                    })
                    .unwrap();
                if let Some((l, _)) = r.lease {
                    leases.entry(t).or_default().push(l);
                }
            }
            Op::ReleaseAll { t } => {
                for l in leases.remove(&t).unwrap_or_default() {
                    store
                        .release(&ReleaseReq {
                            lease: l,
                            namespace: Some(ns[t]),
                        })
                        .unwrap();
                }
            }
            Op::Delete { t, k } => {
                store
                    .delete(&DeleteReq {
                        namespace: ns[t],
                        keys: vec![key(t as u8, k)],
                    })
                    .unwrap();
            }
            Op::Reserve { t, k, n } => {
                let blocks: Vec<_> = (k..k + n)
                    .map(|i| ReserveBlock {
                        key: key(t as u8, i % 40),
                        parent: None,
                        length: BLOCK,
                    })
                    .collect();
                match store.reserve_shared(&ReserveReq {
                    namespace: ns[t],
                    blocks,
                    ttl_ms: 60_000,
                }) {
                    Ok(rs) => {
                        for r in rs {
                            if let Some(id) = r.id {
                                open.push((id, t, r.key));
                            }
                        }
                    }
                    Err(StoreError::Quota { .. }) | Err(StoreError::NoSpace { .. }) => {}
                    Err(e) => prop_assert!(false, "reserve: {e}"),
                }
            }
            Op::CommitOrAbort { commit } => {
                if !open.is_empty() {
                    let (id, _, k) = open.remove(0);
                    if commit {
                        // Write the bytes the checksum promises.
                        let data = vec![k.as_bytes()[4]; BLOCK as usize];
                        let slot = {
                            let g = store.lock();
                            g.reservations[&id.0].p.addr
                        };
                        // SAFETY: the open reservation owns the extent.
                        unsafe { store.dram().slice_mut(slot, BLOCK) }.copy_from_slice(&data);
                        let _ = store.commit(&CommitReq {
                            blocks: vec![(id, strata_proto::checksum(&data))],
                        });
                    } else {
                        store.abort(&[id]);
                    }
                }
            }
        }
        store.check_invariants();
        for (t, n) in names.iter().enumerate() {
            let u = usage(&store, n);
            if u.dram.quota > 0 {
                prop_assert!(u.dram.used <= u.dram.quota, "{n} above its quota: {u:?}");
            }
            if Some(t) != actor && within[t] {
                for k in &held[t] {
                    // Deleted by its own step only; lost to another: a bug.
                    prop_assert!(
                        store.contains(ns[t], k),
                        "{n} lost {k} to tenant {actor:?} while within its share"
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn quotas_and_shares_hold_under_random_traffic(
        qa in 0..12u64,
        qb in 0..12u64,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        run([0, qa, qb], ops)?;
    }
}

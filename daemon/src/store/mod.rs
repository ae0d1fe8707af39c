//! The store: which blocks exist, where they live, who holds them, and what
//! to evict. The logical side of the daemon: it never touches a socket or a
//! file descriptor; it asks the tiers (`crate::tier`) for space and bytes.
//!
//! # Block lifecycle
//!
//! `reserve` (space taken in the placement tier, invisible) → `fill` (bytes
//! written into the reserved extent, by the daemon from a stream or by a
//! local client through the shared arena) → `verify` (XXH3-64 of the bytes in
//! the arena against the producer's checksum) → `publish` (index entry
//! visible). A [`PutSlot`] that is dropped unpublished frees its space; a
//! zero-copy reservation that is neither committed nor aborted expires.
//!
//! # Invariants
//!
//! 1. A block is visible (Lookup, Get) only after its checksum verified.
//! 2. (namespace, key) is unique; a put of a present key with the same
//!    length and checksum succeeds as `AlreadyPresent` without rewriting.
//! 3. A pinned block (lease, read in progress) is never evicted or deleted;
//!    so Lookup never reports a block that Get cannot return while its lease
//!    holds.
//! 4. Per tier, `used == Σ rounded(len)` over its published and reserved
//!    blocks, and `used <= capacity`; [`Store::check_invariants`] verifies
//!    this and the child counts in tests.
//! 5. Eviction order is the policy's (default prefix-aware LRU: a block with
//!    children in its tier is not a candidate, so tails go before heads).
//!
//! One mutex guards the logical state; byte copies and checksums run
//! outside it, on extents the caller owns (reservation) or has pinned.

mod error;
pub mod evict;
pub mod huge;
pub mod index;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use strata_proto::convert::{
    CommitReq, DeleteReq, GetReq, GetSlotsReq, LookupReq, ReleaseReq, ReserveReq,
};
use strata_proto::{BlockKey, FieldError, Layout, LeaseId, NamespaceId, ReservationId, TierKind};

pub use error::StoreError;
pub use evict::EvictionKind;
use evict::{Candidate, EvictionPolicy};
use index::{BlockId, BlockRef, FLAG_DOOMED, FLAG_TRACKED, Index, LOCAL_TIERS, Meta, NO_PARENT};

use crate::metrics::StoreMetrics;
use crate::tier::DramTier;

/// Source of time, injectable so that tests control lease expiry.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(Mutex<Instant>);

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock(Mutex::new(Instant::now()))
    }
}

impl ManualClock {
    pub fn advance(&self, d: Duration) {
        *self.0.lock().expect("clock poisoned") += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().expect("clock poisoned")
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Eviction starts in the background above this fraction of the tier...
    pub high_watermark: f64,
    /// ...and stops below this one.
    pub low_watermark: f64,
    pub eviction: EvictionKind,
    /// Upper bound on indexed blocks (each costs about 115 bytes of index).
    pub max_blocks: usize,
    pub max_leases: usize,
    pub max_lease_ttl: Duration,
    pub max_reservations: usize,
    pub reservation_ttl: Duration,
    pub max_reservation_ttl: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            high_watermark: 0.95,
            low_watermark: 0.90,
            eviction: EvictionKind::PrefixLru,
            max_blocks: 1 << 24,
            max_leases: 1 << 16,
            max_lease_ttl: Duration::from_secs(300),
            max_reservations: 1 << 16,
            reservation_ttl: Duration::from_secs(30),
            max_reservation_ttl: Duration::from_secs(300),
        }
    }
}

/// Outcome of storing one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutResult {
    Stored,
    AlreadyPresent,
}

#[derive(Debug, Clone)]
pub struct LookupResult {
    pub hits: u32,
    pub tiers: Vec<TierKind>,
    pub lease: Option<(LeaseId, SystemTime)>,
    /// With `want_slots`: the arena slot of every hit.
    pub slots: Vec<Slot>,
}

/// One zero-copy reservation (or a report that the key is already present).
#[derive(Debug, Clone)]
pub struct SharedReservation {
    pub key: BlockKey,
    /// `None` when the key is already present (nothing to write).
    pub id: Option<ReservationId>,
    pub offset: u64,
    pub len: u64,
    /// For an already-present key: its stored checksum; else 0.
    pub checksum: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub offset: u64,
    pub len: u64,
    pub checksum: u64,
}

#[derive(Debug, Clone, Default)]
pub struct DeleteResult {
    pub deleted: u32,
    pub absent: Vec<BlockKey>,
    pub pinned: Vec<BlockKey>,
}

#[derive(Debug, Clone, Default)]
pub struct TierStats {
    pub tier: Option<TierKind>,
    pub capacity: u64,
    pub used: u64,
    pub blocks: u64,
    pub pinned_blocks: u64,
    pub pinned_bytes: u64,
    pub reserved_bytes: u64,
    pub evictions: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub high_watermark: u64,
    pub low_watermark: u64,
}

#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    pub tiers: Vec<TierStats>,
    pub namespaces: u64,
    pub blocks: u64,
    pub leases: u64,
    pub reservations: u64,
    pub lookups: u64,
    pub lookup_keys: u64,
    pub lookup_hits: u64,
    pub checksum_failures: u64,
    pub index_bytes: u64,
}

/// Space reserved for a block in a tier; not yet visible.
#[derive(Debug, Clone, Copy)]
struct Pending {
    ns: u32,
    key: BlockKey,
    parent: Option<BlockKey>,
    len: u64,
    rounded: u64,
    tier: TierKind,
    addr: u64,
}

#[derive(Debug)]
struct SharedPending {
    p: Pending,
    expires: Instant,
}

#[derive(Debug)]
struct Lease {
    ns: u32,
    /// Sorted by id, for membership checks.
    blocks: Vec<BlockRef>,
    expires: Instant,
}

struct NsEntry {
    id: NamespaceId,
    layout: Layout,
}

struct TierBook {
    configured: bool,
    capacity: u64,
    used: u64,
    high: u64,
    low: u64,
    blocks: u64,
    pinned_blocks: u64,
    pinned_bytes: u64,
    reserved_bytes: u64,
    evictions: u64,
    bytes_in: u64,
    bytes_out: u64,
    policy: Box<dyn EvictionPolicy>,
}

struct Inner {
    namespaces: HashMap<NamespaceId, u32>,
    ns_table: Vec<NsEntry>,
    index: Index,
    tiers: [TierBook; LOCAL_TIERS],
    leases: HashMap<u64, Lease>,
    lease_expiry: BinaryHeap<Reverse<(Instant, u64)>>,
    reservations: HashMap<u64, SharedPending>,
    reservation_expiry: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Next lease / reservation id (one sequence, so ids never collide).
    next_id: u64,
    tick: u64,
    lookups: u64,
    lookup_keys: u64,
    lookup_hits: u64,
    checksum_failures: u64,
}

fn candidate(m: &Meta) -> Candidate {
    Candidate {
        tick: m.tick,
        pinned: m.pins > 0,
        children_in_tier: m.children_in_own_tier(),
    }
}

pub struct Store {
    cfg: StoreConfig,
    dram: DramTier,
    granule: u64,
    clock: Arc<dyn Clock>,
    metrics: StoreMetrics,
    inner: Mutex<Inner>,
    /// Woken when a tier passes its high watermark.
    pub evict_wanted: tokio::sync::Notify,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dram", &self.dram).finish()
    }
}

fn field(name: &str, i: usize) -> String {
    format!("{name}[{i}]")
}

impl Store {
    pub fn new(
        cfg: StoreConfig,
        dram: DramTier,
        granule: u64,
        clock: Arc<dyn Clock>,
        metrics: StoreMetrics,
    ) -> Self {
        let book = |kind: TierKind, capacity: u64| TierBook {
            configured: capacity > 0,
            capacity,
            used: 0,
            high: (capacity as f64 * cfg.high_watermark) as u64,
            low: (capacity as f64 * cfg.low_watermark) as u64,
            blocks: 0,
            pinned_blocks: 0,
            pinned_bytes: 0,
            reserved_bytes: 0,
            evictions: 0,
            bytes_in: 0,
            bytes_out: 0,
            policy: if kind == TierKind::Dram {
                cfg.eviction.build()
            } else {
                EvictionKind::Lru.build()
            },
        };
        let cap = dram.capacity_bytes();
        let tiers = [
            book(TierKind::Gpu, 0),
            book(TierKind::Dram, cap),
            book(TierKind::Cxl, 0),
            book(TierKind::Nvme, 0),
        ];
        // Start the index at the number of full-granule blocks the DRAM tier
        // can hold (capped), so that steady state never rehashes.
        let initial = ((cap / granule.max(1)) as usize)
            .min(cfg.max_blocks)
            .min(1 << 20);
        let inner = Inner {
            namespaces: HashMap::new(),
            ns_table: Vec::new(),
            index: Index::with_capacity(initial),
            tiers,
            leases: HashMap::new(),
            lease_expiry: BinaryHeap::new(),
            reservations: HashMap::new(),
            reservation_expiry: BinaryHeap::new(),
            next_id: 1,
            tick: 0,
            lookups: 0,
            lookup_keys: 0,
            lookup_hits: 0,
            checksum_failures: 0,
        };
        Store {
            cfg,
            dram,
            granule,
            clock,
            metrics,
            inner: Mutex::new(inner),
            evict_wanted: tokio::sync::Notify::new(),
        }
    }

    pub fn dram(&self) -> &DramTier {
        &self.dram
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the index in an unknown state;
        // serving from it could hand out wrong blocks, so stop instead.
        self.inner
            .lock()
            .expect("store state poisoned by an earlier panic")
    }

    fn rounded(&self, len: u64) -> u64 {
        len.div_ceil(self.granule) * self.granule
    }

    // ---- namespaces -------------------------------------------------------

    /// Registers a (validated) layout; returns its namespace id and whether
    /// it was already known.
    pub fn register_layout(&self, layout: Layout) -> (NamespaceId, bool) {
        let id = layout.namespace_id();
        let mut g = self.lock();
        if g.namespaces.contains_key(&id) {
            return (id, true);
        }
        let ord = g.ns_table.len() as u32;
        g.ns_table.push(NsEntry { id, layout });
        g.namespaces.insert(id, ord);
        (id, false)
    }

    pub fn layout(&self, ns: NamespaceId) -> Option<Layout> {
        let g = self.lock();
        g.namespaces
            .get(&ns)
            .map(|&o| g.ns_table[o as usize].layout.clone())
    }

    // ---- lookup and leases ------------------------------------------------

    pub fn lookup(&self, req: &LookupReq) -> Result<LookupResult, StoreError> {
        let now = self.clock.now();
        if req.lease_ttl_ms as u128 > self.cfg.max_lease_ttl.as_millis() {
            return Err(FieldError::new(
                "lease_ttl_ms",
                format!(
                    "{} ms is above the limit of {} ms (store.max_lease_ttl_ms)",
                    req.lease_ttl_ms,
                    self.cfg.max_lease_ttl.as_millis()
                ),
            )
            .into());
        }
        let mut g = self.lock();
        let g = &mut *g;
        let ns = ns_ord(g, req.namespace)?;
        let mut ids: Vec<BlockId> = Vec::with_capacity(req.keys.len());
        g.index.find_run(ns, &req.keys, &mut ids);
        g.lookups += 1;
        g.lookup_keys += req.keys.len() as u64;
        g.lookup_hits += ids.len() as u64;
        self.metrics.lookups.increment(1);
        self.metrics.lookup_keys.increment(req.keys.len() as u64);
        if ids.len() < req.keys.len() {
            self.metrics.miss_absent.increment(1);
        }
        let lease = if req.lease_ttl_ms > 0 && !ids.is_empty() {
            if g.leases.len() >= self.cfg.max_leases {
                return Err(StoreError::Limit {
                    limit: "store.max_leases",
                    detail: format!(
                        "{} leases are active, the limit; release leases after loading",
                        g.leases.len()
                    ),
                });
            }
            let ttl = Duration::from_millis(req.lease_ttl_ms as u64);
            let mut blocks: Vec<BlockRef> = ids.iter().map(|&id| g.index.ref_of(id)).collect();
            blocks.sort_unstable();
            for r in &blocks {
                pin(g, self.granule, r.id);
            }
            let lid = g.next_id;
            g.next_id += 1;
            g.leases.insert(
                lid,
                Lease {
                    ns,
                    blocks,
                    expires: now + ttl,
                },
            );
            g.lease_expiry.push(Reverse((now + ttl, lid)));
            self.metrics.leases_granted.increment(1);
            Some((LeaseId(lid), SystemTime::now() + ttl))
        } else {
            None
        };
        let mut tiers = Vec::with_capacity(ids.len());
        let mut hits = [0u64; LOCAL_TIERS];
        for &id in &ids {
            let tier = touch(g, id);
            tiers.push(tier);
            hits[tier.index()] += 1;
        }
        for (t, &n) in hits.iter().enumerate() {
            if n > 0 {
                self.metrics.lookup_hits[t].increment(n);
            }
        }
        let mut slots = Vec::new();
        if req.want_slots && lease.is_some() {
            slots.reserve(ids.len());
            let mut bytes = 0;
            for &id in &ids {
                let m = g.index.get(id);
                slots.push(Slot {
                    offset: m.addr,
                    len: m.len as u64,
                    checksum: m.checksum,
                });
                bytes += m.len as u64;
            }
            let t = TierKind::Dram.index();
            g.tiers[t].bytes_out += bytes;
            self.metrics.bytes_out[t].increment(bytes);
        }
        Ok(LookupResult {
            hits: ids.len() as u32,
            tiers,
            lease,
            slots,
        })
    }

    pub fn release(&self, req: &ReleaseReq) -> Result<u32, StoreError> {
        let now = self.clock.now();
        let mut g = self.lock();
        let g = &mut *g;
        lease_checked(g, req.lease, req.namespace, now)?;
        let lease = g.leases.remove(&req.lease.0).expect("checked above");
        let n = lease.blocks.len() as u32;
        for r in lease.blocks {
            unpin(g, self.granule, r, &self.dram);
        }
        Ok(n)
    }

    // ---- stream put -------------------------------------------------------

    /// Reserves space for one block of a stream put whose header promises
    /// `len` bytes hashing to `checksum`. `block` is its index in the stream
    /// (for error messages). A present key with the same length and checksum
    /// is `Reserve::Present` (nothing to write); with others, a conflict.
    #[allow(clippy::too_many_arguments)]
    pub fn reserve(
        self: &Arc<Self>,
        ns: NamespaceId,
        key: BlockKey,
        parent: Option<BlockKey>,
        len: u64,
        checksum: u64,
        block: usize,
    ) -> Result<Reserve, StoreError> {
        let mut g = self.lock();
        let g = &mut *g;
        let f = |name: &str| format!("blocks[{block}].{name}");
        let ns_o = ns_ord(g, ns)?;
        check_block(g, ns_o, &key, parent.as_ref(), len, &f)?;
        if let Some(id) = g.index.find(ns_o, &key) {
            let m = g.index.get(id);
            if !m.is_doomed() {
                if m.len as u64 == len && m.checksum == checksum {
                    self.metrics.puts_already_present.increment(1);
                    return Ok(Reserve::Present);
                }
                self.metrics.puts_rejected.increment(1);
                return Err(StoreError::Conflict {
                    field: f("checksum"),
                    key,
                    stored_len: m.len as u64,
                    stored_checksum: m.checksum,
                    len,
                    checksum,
                });
            }
        }
        let p = self.reserve_space(g, ns_o, key, parent, len)?;
        Ok(Reserve::Slot(PutSlot {
            store: self.clone(),
            p: Some(p),
            block,
            hashed: None,
        }))
    }

    /// Verifies the checksum of a filled slot and publishes it.
    pub fn publish(&self, mut slot: PutSlot, checksum: u64) -> Result<PutResult, StoreError> {
        let p = slot.p.take().expect("slot published twice");
        let field = format!("blocks[{}].checksum", slot.block);
        self.verify_and_publish(p, checksum, slot.hashed, field)
    }

    /// `hashed`: the checksum of the extent if it was computed while filling it.
    fn verify_and_publish(
        &self,
        p: Pending,
        checksum: u64,
        hashed: Option<u64>,
        field: String,
    ) -> Result<PutResult, StoreError> {
        // SAFETY: the pending reservation owns the extent.
        let actual = hashed
            .unwrap_or_else(|| strata_proto::checksum(unsafe { self.dram.slice(p.addr, p.len) }));
        if actual != checksum {
            self.abandon(p);
            self.metrics.puts_rejected.increment(1);
            return Err(StoreError::ChecksumMismatch {
                field,
                key: p.key,
                expected: checksum,
                actual,
            });
        }
        let mut g = self.lock();
        let r = self.publish_locked(&mut g, p, checksum, field);
        let over = g.tiers[TierKind::Dram.index()].used > g.tiers[TierKind::Dram.index()].high;
        drop(g);
        if over {
            self.evict_wanted.notify_one();
        }
        r
    }

    fn publish_locked(
        &self,
        g: &mut Inner,
        p: Pending,
        checksum: u64,
        field: String,
    ) -> Result<PutResult, StoreError> {
        let t = p.tier.index();
        if let Some(id) = g.index.find(p.ns, &p.key) {
            let m = *g.index.get(id);
            free_pending(g, &self.dram, &p);
            if m.is_doomed() {
                return Err(StoreError::Busy { field, key: p.key });
            }
            if m.len as u64 == p.len && m.checksum == checksum {
                self.metrics.puts_already_present.increment(1);
                return Ok(PutResult::AlreadyPresent);
            }
            self.metrics.puts_rejected.increment(1);
            return Err(StoreError::Conflict {
                field,
                key: p.key,
                stored_len: m.len as u64,
                stored_checksum: m.checksum,
                len: p.len,
                checksum,
            });
        }
        let parent = match p.parent.and_then(|pk| g.index.find(p.ns, &pk)) {
            Some(pid) => {
                g.index.get_mut(pid).children[t] += 1;
                // It may have stopped being a candidate (prefix-LRU).
                refresh(g, pid);
                g.index.ref_of(pid)
            }
            None => NO_PARENT,
        };
        g.tick += 1;
        let meta = Meta {
            key: p.key,
            tier: p.tier,
            flags: 0,
            ns: p.ns,
            generation: 0,
            len: p.len as u32,
            pins: 0,
            parent,
            children: [0; LOCAL_TIERS],
            checksum,
            tick: g.tick,
            addr: p.addr,
        };
        let r = g.index.insert(meta);
        let book = &mut g.tiers[t];
        book.blocks += 1;
        book.reserved_bytes -= p.rounded;
        book.bytes_in += p.len;
        self.metrics.bytes_in[t].increment(p.len);
        self.metrics.puts_stored.increment(1);
        refresh(g, r.id);
        Ok(PutResult::Stored)
    }

    fn abandon(&self, p: Pending) {
        let mut g = self.lock();
        free_pending(&mut g, &self.dram, &p);
        self.metrics.abandoned_puts.increment(1);
    }

    /// Takes space in the DRAM tier, evicting synchronously if the
    /// background evictor has not kept up.
    fn reserve_space(
        &self,
        g: &mut Inner,
        ns: u32,
        key: BlockKey,
        parent: Option<BlockKey>,
        len: u64,
    ) -> Result<Pending, StoreError> {
        let tier = TierKind::Dram;
        let t = tier.index();
        if g.index.len() >= self.cfg.max_blocks {
            // The index bound counts published blocks; evict one to make room.
            if !self.evict_one(g, tier) {
                return Err(StoreError::Limit {
                    limit: "store.max_blocks",
                    detail: format!("{} blocks indexed, the limit", g.index.len()),
                });
            }
        }
        let rounded = self.rounded(len);
        let addr = loop {
            if let Some(addr) = self.dram.allocate(rounded) {
                break addr;
            }
            if !self.evict_one(g, tier) {
                let b = &g.tiers[t];
                return Err(StoreError::NoSpace {
                    tier: tier.name(),
                    needed: len,
                    pinned_bytes: b.pinned_bytes,
                    reserved_bytes: b.reserved_bytes,
                    capacity: b.capacity,
                });
            }
        };
        let b = &mut g.tiers[t];
        b.used += rounded;
        b.reserved_bytes += rounded;
        Ok(Pending {
            ns,
            key,
            parent,
            len,
            rounded,
            tier,
            addr,
        })
    }

    // ---- zero-copy put ----------------------------------------------------

    pub fn reserve_shared(&self, req: &ReserveReq) -> Result<Vec<SharedReservation>, StoreError> {
        let now = self.clock.now();
        let ttl = match req.ttl_ms {
            0 => self.cfg.reservation_ttl,
            ms => Duration::from_millis(ms as u64),
        };
        if ttl > self.cfg.max_reservation_ttl {
            return Err(FieldError::new(
                "ttl_ms",
                format!(
                    "{} ms is above the limit of {} ms (store.max_reservation_ttl_ms)",
                    ttl.as_millis(),
                    self.cfg.max_reservation_ttl.as_millis()
                ),
            )
            .into());
        }
        let mut g = self.lock();
        let g = &mut *g;
        let ns = ns_ord(g, req.namespace)?;
        for (i, b) in req.blocks.iter().enumerate() {
            check_block(g, ns, &b.key, b.parent.as_ref(), b.length, &|n: &str| {
                format!("blocks[{i}].{n}")
            })?;
        }
        if g.reservations.len() + req.blocks.len() > self.cfg.max_reservations {
            return Err(StoreError::Limit {
                limit: "store.max_reservations",
                detail: format!(
                    "{} reservations are open and {} more were asked; commit or abort first",
                    g.reservations.len(),
                    req.blocks.len()
                ),
            });
        }
        let mut out = Vec::with_capacity(req.blocks.len());
        let mut taken: Vec<(u64, Pending)> = Vec::new();
        for b in &req.blocks {
            if let Some(id) = g.index.find(ns, &b.key) {
                let m = g.index.get(id);
                if !m.is_doomed() {
                    out.push(SharedReservation {
                        key: b.key,
                        id: None,
                        offset: m.addr,
                        len: m.len as u64,
                        checksum: m.checksum,
                    });
                    continue;
                }
            }
            match self.reserve_space(g, ns, b.key, b.parent, b.length) {
                Ok(p) => {
                    let id = g.next_id;
                    g.next_id += 1;
                    taken.push((id, p));
                    out.push(SharedReservation {
                        key: b.key,
                        id: Some(ReservationId(id)),
                        offset: p.addr,
                        len: p.len,
                        checksum: 0,
                    });
                }
                Err(e) => {
                    // All or nothing: hand back what this call took.
                    for (_, p) in &taken {
                        free_pending(g, &self.dram, p);
                    }
                    return Err(e);
                }
            }
        }
        for (id, p) in taken {
            g.reservations.insert(
                id,
                SharedPending {
                    p,
                    expires: now + ttl,
                },
            );
            g.reservation_expiry.push(Reverse((now + ttl, id)));
        }
        Ok(out)
    }

    /// Verifies and publishes committed reservations, in order. Stops at the
    /// first failure; blocks before it are published.
    pub fn commit(&self, req: &CommitReq) -> Result<Vec<(BlockKey, PutResult)>, StoreError> {
        let now = self.clock.now();
        let mut out = Vec::with_capacity(req.blocks.len());
        for (i, &(rid, checksum)) in req.blocks.iter().enumerate() {
            let p = {
                let mut g = self.lock();
                match g.reservations.remove(&rid.0) {
                    Some(sp) if sp.expires > now => sp.p,
                    expired => {
                        if let Some(sp) = expired {
                            // Expired but not yet reaped: the client may have
                            // written after its deadline; refuse and free.
                            free_pending(&mut g, &self.dram, &sp.p);
                            self.metrics.reservations_expired.increment(1);
                        }
                        return Err(StoreError::ReservationGone {
                            field: format!("blocks[{i}].reservation_id"),
                            id: rid,
                        });
                    }
                }
            };
            let key = p.key;
            let r = self.verify_and_publish(p, checksum, None, format!("blocks[{i}].checksum"))?;
            out.push((key, r));
        }
        Ok(out)
    }

    pub fn abort(&self, ids: &[ReservationId]) -> u32 {
        let mut g = self.lock();
        let mut n = 0;
        for id in ids {
            if let Some(sp) = g.reservations.remove(&id.0) {
                free_pending(&mut g, &self.dram, &sp.p);
                self.metrics.abandoned_puts.increment(1);
                n += 1;
            }
        }
        n
    }

    // ---- reads ------------------------------------------------------------

    /// Pins the blocks of a Get for the duration of the read. With a lease,
    /// every key must be covered by it; without, every key must be present.
    /// On error nothing is pinned.
    pub fn pin_for_read(self: &Arc<Self>, req: &GetReq) -> Result<ReadGuard, StoreError> {
        let now = self.clock.now();
        let mut g = self.lock();
        let g = &mut *g;
        let ns = ns_ord(g, req.namespace)?;
        let lease_blocks: Option<&[BlockRef]> = match req.lease {
            Some(l) => Some(&lease_checked(g, l, Some(req.namespace), now)?.blocks),
            None => None,
        };
        let mut ids = Vec::with_capacity(req.keys.len());
        for (i, k) in req.keys.iter().enumerate() {
            let id = match g.index.find(ns, k) {
                Some(id) if !g.index.get(id).is_doomed() => id,
                _ => {
                    self.metrics.miss_absent.increment(1);
                    return Err(StoreError::NotFound {
                        field: field("keys", i),
                        key: *k,
                        ns: req.namespace,
                    });
                }
            };
            if let Some(lb) = lease_blocks
                && lb.binary_search(&g.index.ref_of(id)).is_err()
            {
                return Err(StoreError::NotLeased {
                    field: field("keys", i),
                    key: *k,
                    lease: req.lease.expect("lease present"),
                });
            }
            ids.push(id);
        }
        let mut blocks = Vec::with_capacity(ids.len());
        for id in ids {
            pin(g, self.granule, id);
            touch(g, id);
            let m = g.index.get(id);
            let parent = g.index.resolve(m.parent).map(|p| p.key);
            blocks.push(ReadBlock {
                r: g.index.ref_of(id),
                key: m.key,
                parent,
                tier: m.tier,
                addr: m.addr,
                len: m.len as u64,
                checksum: m.checksum,
            });
        }
        Ok(ReadGuard {
            store: self.clone(),
            blocks,
        })
    }

    /// Copies a pinned block out of its tier and verifies the checksum of
    /// the copy: what is returned is exactly what was verified. A mismatch
    /// drops the block (counted) and is a miss. `i` is the key's position in
    /// the request, for the error message.
    pub fn read_block(&self, b: &ReadBlock, i: usize) -> Result<bytes::Bytes, StoreError> {
        let mut out = bytes::BytesMut::with_capacity(b.len as usize);
        // SAFETY: the block is pinned by the caller's ReadGuard.
        out.extend_from_slice(unsafe { self.dram.slice(b.addr, b.len) });
        let t = b.tier.index();
        if strata_proto::checksum(&out) != b.checksum {
            self.mark_corrupt(b.r);
            return Err(StoreError::Corrupt {
                field: field("keys", i),
                key: b.key,
                tier: b.tier.name(),
            });
        }
        self.metrics.bytes_out[t].increment(b.len);
        self.lock().tiers[t].bytes_out += b.len;
        Ok(out.freeze())
    }

    /// Records a failed checksum: the block stops being visible now and is
    /// removed when its last pin goes.
    pub fn mark_corrupt(&self, r: BlockRef) {
        let mut g = self.lock();
        let g = &mut *g;
        g.checksum_failures += 1;
        self.metrics.miss_checksum.increment(1);
        if let Some(m) = g.index.resolve_mut(r) {
            let tier = m.tier;
            m.flags |= FLAG_DOOMED;
            let pins = m.pins;
            self.metrics.checksum_failures[tier.index()].increment(1);
            if pins == 0 {
                remove_block(g, &self.dram, r.id);
            } else {
                refresh(g, r.id);
            }
        }
    }

    /// Arena slots of leased blocks, for zero-copy reads.
    pub fn get_slots(&self, req: &GetSlotsReq) -> Result<Vec<Slot>, StoreError> {
        let now = self.clock.now();
        let mut g = self.lock();
        let g = &mut *g;
        let ns = ns_ord(g, req.namespace)?;
        let lease = lease_checked(g, req.lease, Some(req.namespace), now)?;
        let mut out = Vec::with_capacity(req.keys.len());
        for (i, k) in req.keys.iter().enumerate() {
            let covered = g.index.find(ns, k).filter(|&id| {
                lease.blocks.binary_search(&g.index.ref_of(id)).is_ok()
                    && !g.index.get(id).is_doomed()
            });
            let Some(id) = covered else {
                return Err(StoreError::NotLeased {
                    field: field("keys", i),
                    key: *k,
                    lease: req.lease,
                });
            };
            let m = g.index.get(id);
            out.push(Slot {
                offset: m.addr,
                len: m.len as u64,
                checksum: m.checksum,
            });
        }
        let mut bytes = [0u64; LOCAL_TIERS];
        for s in &out {
            bytes[TierKind::Dram.index()] += s.len;
        }
        for (t, b) in bytes.iter().enumerate() {
            if *b > 0 {
                g.tiers[t].bytes_out += b;
                self.metrics.bytes_out[t].increment(*b);
            }
        }
        Ok(out)
    }

    // ---- delete, eviction, expiry ------------------------------------------

    pub fn delete(&self, req: &DeleteReq) -> Result<DeleteResult, StoreError> {
        let mut g = self.lock();
        let g = &mut *g;
        let ns = ns_ord(g, req.namespace)?;
        let mut res = DeleteResult::default();
        for k in &req.keys {
            match g.index.find(ns, k) {
                None => res.absent.push(*k),
                Some(id) if g.index.get(id).pins > 0 => res.pinned.push(*k),
                Some(id) => {
                    remove_block(g, &self.dram, id);
                    res.deleted += 1;
                }
            }
        }
        Ok(res)
    }

    /// Evicts the policy's next victim from `tier`; false if none.
    fn evict_one(&self, g: &mut Inner, tier: TierKind) -> bool {
        let t = tier.index();
        let Some(id) = g.tiers[t].policy.victim() else {
            return false;
        };
        let len = g.index.get(id).len as u64;
        // Only DRAM exists so far: eviction drops. The NVMe tier turns this
        // into a demotion (admission permitting).
        remove_block(g, &self.dram, id);
        g.tiers[t].evictions += 1;
        self.metrics.evictions[t].increment(1);
        self.metrics.evicted_bytes[t].increment(len);
        true
    }

    /// Background eviction: while a tier is above its high watermark, evict
    /// down to its low watermark, `batch` blocks per lock hold. Returns the
    /// number of blocks evicted.
    pub fn evict_to_watermark(&self, batch: usize) -> usize {
        let tier = TierKind::Dram;
        let t = tier.index();
        let mut total = 0;
        {
            let g = self.lock();
            if g.tiers[t].used <= g.tiers[t].high {
                return 0;
            }
        }
        loop {
            let mut g = self.lock();
            for _ in 0..batch {
                if g.tiers[t].used <= g.tiers[t].low || !self.evict_one(&mut g, tier) {
                    return total;
                }
                total += 1;
            }
        }
    }

    /// Ends expired leases and reservations. Returns (leases, reservations).
    pub fn expire(&self) -> (usize, usize) {
        let now = self.clock.now();
        let mut g = self.lock();
        let g = &mut *g;
        let mut leases = 0;
        while let Some(&Reverse((at, id))) = g.lease_expiry.peek() {
            if at > now {
                break;
            }
            g.lease_expiry.pop();
            if g.leases.get(&id).is_some_and(|l| l.expires <= now) {
                let l = g.leases.remove(&id).expect("present");
                for r in l.blocks {
                    unpin(g, self.granule, r, &self.dram);
                }
                leases += 1;
                self.metrics.leases_expired.increment(1);
            }
        }
        let mut res = 0;
        while let Some(&Reverse((at, id))) = g.reservation_expiry.peek() {
            if at > now {
                break;
            }
            g.reservation_expiry.pop();
            if let Some(sp) = g.reservations.remove(&id) {
                free_pending(g, &self.dram, &sp.p);
                res += 1;
                self.metrics.reservations_expired.increment(1);
                self.metrics.abandoned_puts.increment(1);
            }
        }
        (leases, res)
    }

    /// Whether a block is present and visible, without touching it (for
    /// tests and tools; engines use `lookup`).
    pub fn contains(&self, ns: NamespaceId, key: &BlockKey) -> bool {
        let g = self.lock();
        let Ok(o) = ns_ord(&g, ns) else { return false };
        g.index
            .find(o, key)
            .is_some_and(|id| !g.index.get(id).is_doomed())
    }

    pub fn stats(&self) -> StoreStats {
        let g = self.lock();
        let tiers = TierKind::ALL[..LOCAL_TIERS]
            .iter()
            .zip(g.tiers.iter())
            .filter(|(_, b)| b.configured)
            .map(|(&tier, b)| TierStats {
                tier: Some(tier),
                capacity: b.capacity,
                used: b.used,
                blocks: b.blocks,
                pinned_blocks: b.pinned_blocks,
                pinned_bytes: b.pinned_bytes,
                reserved_bytes: b.reserved_bytes,
                evictions: b.evictions,
                bytes_in: b.bytes_in,
                bytes_out: b.bytes_out,
                high_watermark: b.high,
                low_watermark: b.low,
            })
            .collect();
        StoreStats {
            tiers,
            namespaces: g.ns_table.len() as u64,
            blocks: g.index.len() as u64,
            leases: g.leases.len() as u64,
            reservations: g.reservations.len() as u64,
            lookups: g.lookups,
            lookup_keys: g.lookup_keys,
            lookup_hits: g.lookup_hits,
            checksum_failures: g.checksum_failures,
            index_bytes: (g.index.heap_bytes()
                + g.tiers.iter().map(|b| b.policy.heap_bytes()).sum::<usize>())
                as u64,
        }
    }

    /// Checks the store's invariants; panics with a description if one
    /// fails. For tests and the simulator: O(blocks).
    pub fn check_invariants(&self) {
        let g = self.lock();
        let mut used = [0u64; LOCAL_TIERS];
        let mut blocks = [0u64; LOCAL_TIERS];
        let mut children: HashMap<BlockId, [u32; LOCAL_TIERS]> = HashMap::new();
        let mut pins: HashMap<BlockId, u32> = HashMap::new();
        for l in g.leases.values() {
            for r in &l.blocks {
                assert!(
                    g.index.resolve(*r).is_some(),
                    "lease pins a block that is gone"
                );
                *pins.entry(r.id).or_default() += 1;
            }
        }
        for id in g.index.live_ids() {
            let m = g.index.get(id);
            used[m.tier.index()] += self.rounded(m.len as u64);
            blocks[m.tier.index()] += 1;
            if g.index.resolve(m.parent).is_some() {
                children.entry(m.parent.id).or_default()[m.tier.index()] += 1;
            }
            assert_eq!(
                g.index.find(m.ns, &m.key),
                Some(id),
                "index table disagrees with slab"
            );
        }
        for id in g.index.live_ids() {
            let m = g.index.get(id);
            assert_eq!(
                m.children,
                children.get(&id).copied().unwrap_or_default(),
                "child counts of {:?}",
                m.key
            );
            // Reads in progress add pins beyond leases; without them, equal.
            assert!(
                m.pins >= pins.get(&id).copied().unwrap_or(0),
                "pins below lease count"
            );
        }
        for (t, b) in g.tiers.iter().enumerate() {
            let reserved: u64 = g
                .reservations
                .values()
                .filter(|sp| sp.p.tier.index() == t)
                .map(|sp| sp.p.rounded)
                .sum();
            assert!(
                b.reserved_bytes >= reserved,
                "reserved bytes below open reservations"
            );
            assert_eq!(b.used, used[t] + b.reserved_bytes, "used bytes of tier {t}");
            assert_eq!(b.blocks, blocks[t], "block count of tier {t}");
            assert!(b.used <= b.capacity.max(b.used * (!b.configured) as u64));
        }
    }
}

/// Result of a stream reserve.
#[derive(Debug)]
pub enum Reserve {
    /// The key is present with the same length and checksum: skip its bytes
    /// and report `AlreadyPresent`.
    Present,
    Slot(PutSlot),
}

/// A reserved extent being filled by a stream put. Dropping it unpublished
/// frees the space: an abandoned put is never visible.
pub struct PutSlot {
    store: Arc<Store>,
    p: Option<Pending>,
    block: usize,
    /// Checksum of the extent when `fill` wrote all of it.
    hashed: Option<u64>,
}

impl std::fmt::Debug for PutSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PutSlot").field("p", &self.p).finish()
    }
}

impl PutSlot {
    pub fn len(&self) -> u64 {
        self.p.as_ref().map_or(0, |p| p.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn key(&self) -> Option<BlockKey> {
        self.p.as_ref().map(|p| p.key)
    }

    /// Fills the whole extent from `src` (exactly its length), hashing the
    /// bytes as they are copied; `publish` then trusts that hash instead of
    /// reading the extent again.
    pub fn fill(&mut self, src: &[u8]) {
        let hash = strata_kernels::checksum::copy_and_checksum(self.bytes_mut(), src);
        self.hashed = Some(hash);
    }

    /// The extent to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.hashed = None;
        let p = self.p.as_ref().expect("slot already published");
        // SAFETY: this slot owns the reservation of the extent.
        unsafe { self.store.dram.slice_mut(p.addr, p.len) }
    }
}

impl Drop for PutSlot {
    fn drop(&mut self) {
        if let Some(p) = self.p.take() {
            self.store.abandon(p);
        }
    }
}

/// One block pinned for reading.
#[derive(Debug, Clone)]
pub struct ReadBlock {
    pub r: BlockRef,
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub tier: TierKind,
    pub addr: u64,
    pub len: u64,
    pub checksum: u64,
}

/// Pins held for a read; released on drop.
pub struct ReadGuard {
    store: Arc<Store>,
    pub blocks: Vec<ReadBlock>,
}

impl std::fmt::Debug for ReadGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadGuard")
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

impl ReadGuard {
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The bytes of block `i`, verified in place and served from the arena
    /// without a copy: the returned `Bytes` keeps this guard (and so the
    /// block's pin) alive until the transport is done with it. A mismatch
    /// drops the block (counted) and is a miss. Consumers verify again on
    /// receipt, which also covers anything written into the shared arena
    /// between this check and the send.
    pub fn verified_bytes(self: &Arc<Self>, i: usize) -> Result<bytes::Bytes, StoreError> {
        let b = &self.blocks[i];
        // SAFETY: the block is pinned by this guard.
        let slice = unsafe { self.store.dram.slice(b.addr, b.len) };
        if strata_proto::checksum(slice) != b.checksum {
            self.store.mark_corrupt(b.r);
            return Err(StoreError::Corrupt {
                field: field("keys", i),
                key: b.key,
                tier: b.tier.name(),
            });
        }
        let t = b.tier.index();
        self.store.metrics.bytes_out[t].increment(b.len);
        self.store.lock().tiers[t].bytes_out += b.len;
        Ok(bytes::Bytes::from_owner(PinnedBytes {
            guard: self.clone(),
            i,
        }))
    }
}

/// A pinned block's bytes in the arena, as the owner of a `Bytes`.
struct PinnedBytes {
    guard: Arc<ReadGuard>,
    i: usize,
}

impl AsRef<[u8]> for PinnedBytes {
    fn as_ref(&self) -> &[u8] {
        let b = &self.guard.blocks[self.i];
        // SAFETY: pinned for as long as this owner (and its guard) lives.
        unsafe { self.guard.store.dram.slice(b.addr, b.len) }
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut g = self.store.lock();
        for b in &self.blocks {
            unpin(&mut g, self.store.granule, b.r, &self.store.dram);
        }
    }
}

// ---- helpers on the locked state --------------------------------------------

fn ns_ord(g: &Inner, ns: NamespaceId) -> Result<u32, StoreError> {
    g.namespaces
        .get(&ns)
        .copied()
        .ok_or(StoreError::UnknownNamespace(ns))
}

fn check_block(
    g: &Inner,
    ns: u32,
    key: &BlockKey,
    parent: Option<&BlockKey>,
    len: u64,
    f: &dyn Fn(&str) -> String,
) -> Result<(), StoreError> {
    let layout = &g.ns_table[ns as usize].layout;
    layout
        .check_block_len(len)
        .map_err(|r| FieldError::new(f("length"), r))?;
    if parent == Some(key) {
        return Err(FieldError::new(f("parent"), "equals the block's own key").into());
    }
    Ok(())
}

fn lease_checked(
    g: &Inner,
    lease: LeaseId,
    ns: Option<NamespaceId>,
    now: Instant,
) -> Result<&Lease, StoreError> {
    if lease.0 >= g.next_id {
        return Err(StoreError::LeaseUnknown(lease));
    }
    let Some(l) = g.leases.get(&lease.0) else {
        return Err(StoreError::LeaseGone(lease));
    };
    if l.expires <= now {
        // Expired but not yet reaped: it is gone for the caller either way.
        return Err(StoreError::LeaseGone(lease));
    }
    if let Some(ns) = ns {
        let owner = g.ns_table[l.ns as usize].id;
        if owner != ns {
            return Err(StoreError::LeaseForeign { lease, owner, ns });
        }
    }
    Ok(l)
}

/// Tells the block's tier policy its current state.
fn refresh(g: &mut Inner, id: BlockId) {
    let m = g.index.get(id);
    let c = (!m.is_doomed()).then(|| candidate(m));
    let t = m.tier.index();
    let tracked = g.tiers[t].policy.update(id, c);
    let m = g.index.get_mut(id);
    if tracked {
        m.flags |= FLAG_TRACKED;
    } else {
        m.flags &= !FLAG_TRACKED;
    }
}

/// Marks an access: a new, unique tick.
fn touch(g: &mut Inner, id: BlockId) -> TierKind {
    g.tick += 1;
    let tick = g.tick;
    let m = g.index.get_mut(id);
    m.tick = tick;
    let tier = m.tier;
    // A new tick alone never makes a block a candidate (see EvictionPolicy).
    if m.flags & FLAG_TRACKED != 0 {
        refresh(g, id);
    }
    tier
}

fn pin(g: &mut Inner, granule: u64, id: BlockId) {
    let m = g.index.get_mut(id);
    m.pins += 1;
    if m.pins == 1 {
        let (t, len) = (m.tier.index(), m.len as u64);
        g.tiers[t].pinned_blocks += 1;
        g.tiers[t].pinned_bytes += len.div_ceil(granule) * granule;
        refresh(g, id);
    }
}

fn unpin(g: &mut Inner, granule: u64, r: BlockRef, dram: &DramTier) {
    let Some(m) = g.index.resolve_mut(r) else {
        return;
    };
    m.pins -= 1;
    if m.pins > 0 {
        return;
    }
    let (t, len, doomed) = (m.tier.index(), m.len as u64, m.is_doomed());
    g.tiers[t].pinned_blocks -= 1;
    g.tiers[t].pinned_bytes -= len.div_ceil(granule) * granule;
    if doomed {
        remove_block(g, dram, r.id);
    } else {
        refresh(g, r.id);
    }
}

fn free_pending(g: &mut Inner, dram: &DramTier, p: &Pending) {
    dram.free(p.addr, p.rounded);
    let b = &mut g.tiers[p.tier.index()];
    b.used -= p.rounded;
    b.reserved_bytes -= p.rounded;
}

/// Removes an unpinned block (or a doomed one whose last pin went) and frees
/// its space; its parent may become evictable.
fn remove_block(g: &mut Inner, dram: &DramTier, id: BlockId) {
    let m = g.index.remove(id);
    debug_assert_eq!(m.pins, 0, "removing a pinned block");
    let t = m.tier.index();
    g.tiers[t].policy.update(id, None);
    let rounded = dram.rounded(m.len as u64);
    dram.free(m.addr, rounded);
    let b = &mut g.tiers[t];
    b.used -= rounded;
    b.blocks -= 1;
    if let Some(p) = g.index.resolve_mut(m.parent) {
        p.children[t] -= 1;
        if p.children[t] == 0 && p.tier.index() == t {
            refresh(g, m.parent.id);
        }
    }
}

#[cfg(test)]
mod tests;

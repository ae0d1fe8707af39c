//! The store: which blocks exist, where they live, who holds them, and what
//! to evict. The logical side of the daemon: it never touches a socket or a
//! file descriptor; it asks the tiers (`crate::tier`) for space and bytes.
//! Everything here is synchronous under one mutex; the asynchronous moves
//! between tiers (write-down, promotion, reclaim, recovery) are driven by
//! `tiering.rs` through the `begin_*`/`finish_*` pairs below.
//!
//! # Block lifecycle
//!
//! `reserve` (space taken in DRAM, invisible) → `fill` (bytes written into
//! the reserved extent, by the daemon from a stream or by a local client
//! through the shared arena) → `verify` (XXH3-64 of the bytes against the
//! producer's checksum) → `publish` (index entry visible, in DRAM). Later the
//! block may gain an NVMe copy (write-down on eviction, or write-through),
//! lose its DRAM copy (eviction of a block that has an NVMe copy), and gain a
//! DRAM copy again (promotion on Get or leased Lookup). A [`PutSlot`] dropped
//! unpublished frees its space; a zero-copy reservation never committed
//! expires.
//!
//! # Invariants
//!
//! 1. A block is visible (Lookup, Get) only after its checksum verified;
//!    every read from any tier is verified again before it is served.
//! 2. (namespace, key) is unique; a put of a present key with the same
//!    length and checksum succeeds as `AlreadyPresent` without rewriting.
//! 3. A pinned block (lease, read in progress) is never evicted or deleted;
//!    so Lookup never reports a block that Get cannot return while its lease
//!    holds. A block with an NVMe transfer in flight (`busy`) is treated the
//!    same way.
//! 4. DRAM `used == Σ rounded(len)` over blocks with a DRAM copy plus open
//!    reservations, and `used <= capacity`; `dram_children` counts children
//!    with a DRAM copy. [`Store::check_invariants`] verifies these.
//! 5. DRAM eviction order is the policy's (default prefix-aware LRU: a block
//!    with children in DRAM is not a candidate, so tails go before heads).
//!    Evicting a block that has an NVMe copy only drops its DRAM copy;
//!    synchronous eviction (a put that needs room now) never waits on I/O.
//!
//! 6. A block has at most one summary (Attend's abstracts and layer
//!    checksums, `crate::attend::summary`), computed from its bytes before
//!    it is published (or from its record at recovery), and freed with its
//!    last copy; summaries fill their region exactly (also checked by
//!    [`Store::check_invariants`]).
//!
//! One mutex guards the logical state; byte copies, checksums, summaries and
//! I/O run outside it, on extents the caller owns (reservation) or has pinned.

pub mod admin;
mod error;
pub mod events;
pub mod evict;
pub mod huge;
pub mod index;
pub mod tenants;
pub mod tiering;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use strata_proto::convert::{
    CommitReq, DeleteReq, GetReq, GetSlotsReq, LookupReq, ReleaseReq, ReserveReq,
};
use strata_proto::{BlockKey, FieldError, Layout, LeaseId, NamespaceId, ReservationId, TierKind};

pub use error::StoreError;
pub use events::EventKind;
use events::EventLog;
pub use evict::EvictionKind;
use evict::{Candidate, EvictionPolicy};
use index::{
    BlockId, BlockRef, FLAG_DRAM, FLAG_HIT, FLAG_NVME, FLAG_PROMOTING, FLAG_TRACKED, FLAG_WRITING,
    Index, LOCAL_TIERS, MAX_DRAM_GRANULES, MAX_NAMESPACES, Meta, NO_PARENT, NsOrd,
};
use tenants::{DEFAULT_ID, TenantId, Tenants};
pub use tenants::{TenantConfig, TenantSpec, TenantUsage, UNOWNED};

use crate::attend::summary::{SUMMARY_GRANULE, SummaryScratch, summarize};
use crate::attend::{Geom, SummaryConfig, SummaryRegion, SummaryView};
use crate::metrics::StoreMetrics;
use crate::tier::DramTier;
use crate::tier::nvme::format::{RecordHeader, RecordKind};
use crate::tier::nvme::{Expect, Loc, NvmeTier, Scanned, SegFile};

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

/// Which blocks evicted from DRAM are written down to NVMe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Blocks that were looked up or read, and heads of chains; one-hit
    /// tails are dropped.
    LookedUpOrHead,
    All,
    None,
}

impl Admission {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "looked-up-or-head" => Some(Admission::LookedUpOrHead),
            "all" => Some(Admission::All),
            "none" => Some(Admission::None),
            _ => None,
        }
    }
}

/// What reclaiming a segment does with its live records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReclaimPolicy {
    /// Copy forward records looked up since they were written; drop the rest.
    CopyHot,
    /// Drop every record (FIFO by segment).
    Drop,
}

/// Which segment goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReclaimOrder {
    Oldest,
    Emptiest,
}

#[derive(Debug, Clone)]
pub struct NvmePolicy {
    pub admission: Admission,
    /// Bytes per second the write-down may use; 0 = unlimited.
    pub write_budget_bytes_per_sec: u64,
    /// Every put is written to NVMe before it is acknowledged.
    pub write_through: bool,
    pub reclaim: ReclaimPolicy,
    pub reclaim_order: ReclaimOrder,
    /// Reclaim starts above this fraction of the tier's cap and stops below
    /// the low one.
    pub high_watermark: f64,
    pub low_watermark: f64,
    /// Write-downs in flight at once.
    pub max_writes_in_flight: usize,
}

impl Default for NvmePolicy {
    fn default() -> Self {
        NvmePolicy {
            admission: Admission::LookedUpOrHead,
            write_budget_bytes_per_sec: 0,
            write_through: false,
            reclaim: ReclaimPolicy::CopyHot,
            reclaim_order: ReclaimOrder::Oldest,
            high_watermark: 0.9,
            low_watermark: 0.8,
            max_writes_in_flight: 16,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// DRAM eviction starts in the background above this fraction...
    pub high_watermark: f64,
    /// ...and stops below this one.
    pub low_watermark: f64,
    pub eviction: EvictionKind,
    /// Upper bound on indexed blocks (each costs about 120 bytes of index).
    pub max_blocks: usize,
    pub max_leases: usize,
    pub max_lease_ttl: Duration,
    pub max_reservations: usize,
    pub reservation_ttl: Duration,
    pub max_reservation_ttl: Duration,
    pub nvme: NvmePolicy,
    /// Events kept for `Subscribe` (a ring allocated at start; 0 = none).
    pub event_buffer: usize,
    /// Block summaries for Attend (abstracts and per-layer checksums).
    pub summaries: SummaryConfig,
    /// Tenants, their quotas and DRAM shares (`tenants.rs`).
    pub tenants: TenantConfig,
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
            nvme: NvmePolicy::default(),
            event_buffer: 1 << 16,
            summaries: SummaryConfig::default(),
            tenants: TenantConfig::default(),
        }
    }
}

/// A registered namespace.
#[derive(Debug, Clone)]
pub struct Registered {
    pub id: NamespaceId,
    /// Known before this call (registered, or found in records at start).
    pub existed: bool,
    pub tenant: TenantId,
    pub tenant_name: std::sync::Arc<str>,
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
    /// Hits with no DRAM copy: promoted on demand (the caller starts it).
    pub to_promote: Vec<BlockRef>,
    /// The refs of the hits, in key order (for slots after promotion).
    pub refs: Vec<BlockRef>,
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
    /// Deleted blocks that had an NVMe record: a tombstone must be written
    /// so that a restart does not bring them back.
    pub tombstones: Vec<Tombstone>,
}

/// A tombstone to write for a deleted block. Its sequence number is taken
/// by the delete, under the store's lock: a record of the same key stored
/// after the delete takes a later one, so the tombstone (whenever it is
/// written) never voids it at recovery. Taken when the tombstone was
/// written instead, a put acknowledged between the delete and that write
/// came back void after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tombstone {
    pub namespace: NamespaceId,
    pub key: BlockKey,
    pub seq: u64,
}

/// An event read out for a subscriber.
#[derive(Debug, Clone)]
pub struct EventOut {
    pub seq: u64,
    pub kind: EventKind,
    pub medium: TierKind,
    /// 0 for tier-wide events.
    pub namespace: NamespaceId,
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub token_count: u32,
}

#[derive(Debug)]
pub struct EventsRead {
    pub events: Vec<EventOut>,
    /// Events the reader lost to the ring before these.
    pub missed: u64,
    /// Where the next read continues.
    pub cursor: u64,
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
    pub fenced: bool,
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
    pub writes_in_flight: u64,
    /// Bytes of block summaries held, and the region's size (0: off).
    pub summary_bytes: u64,
    pub summary_capacity: u64,
    pub summary_blocks: u64,
}

/// Space reserved for a block in DRAM; not yet visible.
#[derive(Debug, Clone, Copy)]
struct Pending {
    ns: NsOrd,
    /// The namespace's geometry, when Attend serves it (for the summary).
    geom: Option<Geom>,
    key: BlockKey,
    parent: Option<BlockKey>,
    len: u64,
    rounded: u64,
    addr: u64,
}

#[derive(Debug)]
struct SharedPending {
    p: Pending,
    expires: Instant,
}

#[derive(Debug)]
struct Lease {
    ns: NsOrd,
    /// Sorted by id, for membership checks.
    blocks: Vec<BlockRef>,
    expires: Instant,
}

struct NsEntry {
    id: NamespaceId,
    /// `None` for a namespace known only from records found at start; its
    /// blocks can be looked up and read, and puts wait for RegisterLayout.
    layout: Option<Layout>,
    /// `Geom::of(layout)`: set when Attend can serve the namespace.
    geom: Option<Geom>,
    /// The owning tenant (`tenants.rs`: read off the layout's salt).
    tenant: TenantId,
    /// What the namespace holds, kept as blocks change (Stats per
    /// namespace without a pass over the index); checked by
    /// `check_invariants`.
    count: NsCount,
}

/// Blocks of one namespace: distinct, pinned, and per tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct NsCount {
    blocks: u64,
    bytes: u64,
    pinned: u64,
    tier_blocks: [u64; LOCAL_TIERS],
    tier_bytes: [u64; LOCAL_TIERS],
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
}

/// Token bucket bounding the write-down rate.
struct Budget {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl Budget {
    fn take(&mut self, now: Instant, bytes: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.rate as f64);
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

/// State kept only while records are being recovered at start.
#[derive(Default)]
struct Recovery {
    parents: Vec<(BlockId, BlockKey)>,
    tombstones: HashMap<(NsOrd, BlockKey), u64>,
    /// Namespaces evicted (`evict_namespace`): records with a lower
    /// sequence number are void.
    evicted: HashMap<NamespaceId, u64>,
    /// Namespaces refused for want of an ordinal (logged once each).
    refused: HashSet<NamespaceId>,
}

struct Inner {
    namespaces: HashMap<NamespaceId, NsOrd>,
    ns_table: Vec<NsEntry>,
    index: Index,
    /// DRAM's eviction policy; its groups are tenants.
    policy: Box<dyn EvictionPolicy>,
    tenants: Tenants,
    /// DRAM's allocation unit (the store's, copied for the helpers).
    granule: u64,
    /// log2 of `granule`: [`Meta::dram_addr`] is kept in granules.
    granule_shift: u32,
    tiers: [TierBook; LOCAL_TIERS],
    leases: HashMap<u64, Lease>,
    lease_expiry: BinaryHeap<Reverse<(Instant, u64)>>,
    reservations: HashMap<u64, SharedPending>,
    reservation_expiry: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Next lease / reservation id (one sequence, so ids never collide).
    next_id: u64,
    tick: u64,
    /// Next NVMe record sequence number.
    seq: u64,
    budget: Budget,
    writes_in_flight: usize,
    writing_bytes: u64,
    nvme_fenced_handled: bool,
    recovery: Option<Recovery>,
    lookups: u64,
    lookup_keys: u64,
    lookup_hits: u64,
    checksum_failures: u64,
    events: EventLog,
    /// Summary of each block: its region offset / granule + 1 (0 = none),
    /// indexed by block id; grows with the index's slots.
    summary_of: Vec<u32>,
    summary_blocks: u64,
}

const DRAM: usize = TierKind::Dram as usize;
const NVME: usize = TierKind::Nvme as usize;

fn candidate(m: &Meta) -> Candidate {
    Candidate {
        tick: m.tick,
        pinned: m.pins > 0 || m.busy(),
        children_in_tier: m.dram_children,
    }
}

/// Told of every block a put or a commit stores (not of one already
/// present, nor of blocks recovered or promoted), after the store's lock is
/// released, on the publishing thread: it must be cheap and never block.
pub trait PublishHook: Send + Sync {
    fn stored(&self, ns: NamespaceId, key: &BlockKey, parent: Option<&BlockKey>);
}

pub struct Store {
    cfg: StoreConfig,
    dram: DramTier,
    nvme: Option<Arc<NvmeTier>>,
    granule: u64,
    clock: Arc<dyn Clock>,
    metrics: StoreMetrics,
    /// Where block summaries live (None: `compute.abstracts` off).
    summaries: Option<SummaryRegion>,
    inner: Mutex<Inner>,
    /// Woken when DRAM passes its high watermark or work for the tiering
    /// task appears.
    pub evict_wanted: tokio::sync::Notify,
    /// Woken when a promotion ends (waiters re-check).
    promoted: tokio::sync::Notify,
    /// Set once, at start (the retrieval indexes' automatic builds).
    publish_hook: OnceLock<Arc<dyn PublishHook>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dram", &self.dram)
            .field("nvme", &self.nvme)
            .finish()
    }
}

fn field(name: &str, i: usize) -> String {
    format!("{name}[{i}]")
}

/// A write of a block to NVMe, planned under the lock and done outside it.
#[derive(Debug, Clone)]
pub struct WriteJob {
    pub r: BlockRef,
    pub header: RecordHeader,
    pub dram_addr: u64,
    /// Keep the DRAM copy afterwards (write-through) or drop it (write-down).
    pub keep_dram: bool,
}

/// A promotion from NVMe, planned under the lock.
#[derive(Debug, Clone)]
pub struct PromoteJob {
    pub r: BlockRef,
    pub seg: SegFile,
    pub loc: Loc,
    pub expect: Expect,
}

/// What `begin_promotion` found.
#[derive(Debug)]
pub enum Promote {
    /// The block has a DRAM copy.
    InDram,
    /// Another promotion of it is in flight: wait and ask again.
    InFlight,
    Job(PromoteJob),
    /// The block is gone or has no readable copy.
    Gone,
}

impl Store {
    pub fn new(
        cfg: StoreConfig,
        dram: DramTier,
        nvme: Option<Arc<NvmeTier>>,
        granule: u64,
        clock: Arc<dyn Clock>,
        metrics: StoreMetrics,
    ) -> Self {
        let book = |capacity: u64, high: f64, low: f64| TierBook {
            configured: capacity > 0,
            capacity,
            used: 0,
            high: (capacity as f64 * high) as u64,
            low: (capacity as f64 * low) as u64,
            blocks: 0,
            pinned_blocks: 0,
            pinned_bytes: 0,
            reserved_bytes: 0,
            evictions: 0,
            bytes_in: 0,
            bytes_out: 0,
        };
        let cap = dram.capacity_bytes();
        let nvme_cap = nvme.as_ref().map_or(0, |n| n.config().capacity_bytes);
        let tiers = [
            book(0, 1.0, 1.0),
            book(cap, cfg.high_watermark, cfg.low_watermark),
            book(0, 1.0, 1.0),
            book(nvme_cap, cfg.nvme.high_watermark, cfg.nvme.low_watermark),
        ];
        // Start the index at the number of full-granule blocks the DRAM tier
        // can hold (capped), so that steady state never rehashes.
        // Config validation refuses larger arenas (`tiers.dram.bytes`).
        assert!(
            granule.is_power_of_two(),
            "DRAM granule {granule} is not a power of two"
        );
        assert!(
            cap / granule <= MAX_DRAM_GRANULES,
            "DRAM arena of {cap} bytes is over 2^32 granules of {granule} bytes"
        );
        let initial = ((cap / granule) as usize).min(cfg.max_blocks).min(1 << 20);
        let inner = Inner {
            namespaces: HashMap::new(),
            ns_table: Vec::new(),
            index: Index::with_capacity(initial),
            policy: cfg.eviction.build(),
            tenants: Tenants::new(&cfg.tenants, (cap as f64 * cfg.low_watermark) as u64),
            granule,
            granule_shift: granule.trailing_zeros(),
            tiers,
            leases: HashMap::new(),
            lease_expiry: BinaryHeap::new(),
            reservations: HashMap::new(),
            reservation_expiry: BinaryHeap::new(),
            next_id: 1,
            tick: 0,
            seq: 1,
            budget: Budget {
                rate: cfg.nvme.write_budget_bytes_per_sec,
                tokens: cfg.nvme.write_budget_bytes_per_sec as f64,
                last: clock.now(),
            },
            writes_in_flight: 0,
            writing_bytes: 0,
            nvme_fenced_handled: false,
            recovery: None,
            lookups: 0,
            lookup_keys: 0,
            lookup_hits: 0,
            checksum_failures: 0,
            events: EventLog::new(cfg.event_buffer),
            summary_of: Vec::new(),
            summary_blocks: 0,
        };
        let summaries = cfg.summaries.enabled.then(|| {
            let sketch = cfg.summaries.sketch;
            let leaf_tokens = cfg.summaries.leaf_tokens;
            let bytes = match cfg.summaries.bytes {
                0 => crate::attend::default_region_bytes(cap + nvme_cap, sketch, leaf_tokens),
                b => b,
            };
            SummaryRegion::new(bytes, sketch, leaf_tokens)
                .map_err(|e| {
                    tracing::error!(bytes, error = %e, "cannot reserve the block-summary region; Attend runs without abstracts");
                })
                .ok()
        });
        Store {
            cfg,
            dram,
            nvme,
            granule,
            clock,
            metrics,
            summaries: summaries.flatten(),
            inner: Mutex::new(inner),
            evict_wanted: tokio::sync::Notify::new(),
            promoted: tokio::sync::Notify::new(),
            publish_hook: OnceLock::new(),
        }
    }

    /// Installs the hook told of every stored block; false if one was
    /// installed already (it stays).
    pub fn set_publish_hook(&self, hook: Arc<dyn PublishHook>) -> bool {
        self.publish_hook.set(hook).is_ok()
    }

    pub fn dram(&self) -> &DramTier {
        &self.dram
    }

    pub fn nvme(&self) -> Option<&Arc<NvmeTier>> {
        self.nvme.as_ref()
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &StoreMetrics {
        &self.metrics
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
    /// it was already known (registered, or found in records at start).
    pub fn register_layout(&self, layout: Layout) -> (NamespaceId, bool) {
        let id = layout.namespace_id();
        match self.register(layout) {
            Ok(r) => (r.id, r.existed),
            Err(_) => (id, true),
        }
    }

    /// Registers a (validated) layout: its namespace id, whether it was
    /// already known, and its owning tenant (read off the layout's salt).
    /// A namespace known only from records found at start takes the layout
    /// and moves to its owner. The id of a different layout already
    /// registered (a 64-bit hash collision, or a crafted salt) is refused.
    pub fn register(&self, layout: Layout) -> Result<Registered, StoreError> {
        let id = layout.namespace_id();
        let mut g = self.lock();
        let g = &mut *g;
        let (o, existed) = match g.namespaces.get(&id) {
            Some(&o) => {
                match &g.ns_table[o as usize].layout {
                    Some(l) if *l != layout => return Err(StoreError::LayoutCollision(id)),
                    Some(_) => {}
                    None => {
                        let owner = g.tenants.owner_of(Some(&layout));
                        let e = &mut g.ns_table[o as usize];
                        e.geom = Geom::of(&layout);
                        e.layout = Some(layout);
                        if e.tenant != owner {
                            rehome(g, o, owner);
                        }
                    }
                }
                (o, true)
            }
            None => (ns_insert(g, id, Some(layout))?, false),
        };
        let tenant = g.ns_table[o as usize].tenant;
        Ok(Registered {
            id,
            existed,
            tenant,
            tenant_name: g.tenants.books[tenant as usize].name.clone(),
        })
    }

    /// The tenant that owns namespace `ns` (None: not registered).
    pub fn namespace_owner(&self, ns: NamespaceId) -> Option<TenantId> {
        let g = self.lock();
        g.namespaces
            .get(&ns)
            .map(|&o| g.ns_table[o as usize].tenant)
    }

    /// The owners of the namespaces of open reservations (None: no such
    /// reservation; the store answers for those).
    pub fn reservation_owners(
        &self,
        ids: &[ReservationId],
    ) -> Vec<Option<(NamespaceId, TenantId)>> {
        let g = self.lock();
        ids.iter()
            .map(|r| {
                g.reservations.get(&r.0).map(|sp| {
                    let e = &g.ns_table[sp.p.ns as usize];
                    (e.id, e.tenant)
                })
            })
            .collect()
    }

    /// The ordinal of tenant `name` (None: not configured).
    pub fn tenant_id(&self, name: &str) -> Option<TenantId> {
        self.lock().tenants.id_of(name)
    }

    /// What each tenant holds, by ordinal.
    pub fn tenant_usage(&self) -> Vec<TenantUsage> {
        let g = self.lock();
        g.tenants
            .books
            .iter()
            .enumerate()
            .map(|(i, b)| b.usage(i as TenantId))
            .collect()
    }

    /// None: unknown namespace; Some(None): known from records found at
    /// start, its layout not registered yet.
    pub fn namespace_layout(&self, ns: NamespaceId) -> Option<Option<Layout>> {
        let g = self.lock();
        g.namespaces
            .get(&ns)
            .map(|&o| g.ns_table[o as usize].layout.clone())
    }

    pub fn layout(&self, ns: NamespaceId) -> Option<Layout> {
        let g = self.lock();
        g.namespaces
            .get(&ns)
            .and_then(|&o| g.ns_table[o as usize].layout.clone())
    }

    // ---- block summaries (Attend) -------------------------------------------

    /// The region holding block summaries (None when they are off).
    pub fn summary_region(&self) -> Option<&SummaryRegion> {
        self.summaries.as_ref()
    }

    /// Computes the summary of a payload into a fresh region entry; None
    /// when summaries are off, the namespace is not one Attend serves, the
    /// payload is not whole tokens, or the region is full (counted). Runs
    /// without the store's lock.
    fn make_summary(&self, geom: Option<Geom>, payload: &[u8]) -> Option<u64> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Option<(Geom, SummaryScratch)>> =
                const { std::cell::RefCell::new(None) };
        }
        let region = self.summaries.as_ref()?;
        let geom = region.geom(&geom?);
        let tokens = geom.tokens_of(payload.len() as u64)?;
        let len = region.entry_bytes(&geom);
        let Some(off) = region.allocate(len) else {
            self.metrics.summaries_skipped_full.increment(1);
            return None;
        };
        // SAFETY: a fresh entry, owned here until it is published.
        let out = unsafe { region.slice_mut(off, len) };
        SCRATCH.with(|c| {
            let mut c = c.borrow_mut();
            if c.as_ref().is_none_or(|(g, _)| *g != geom) {
                *c = Some((geom, SummaryScratch::new(&geom)));
            }
            let (_, scratch) = c.as_mut().expect("just set");
            summarize(&geom, payload, tokens, scratch, out);
        });
        self.metrics.summaries_computed.increment(1);
        Some(off)
    }

    fn free_summary(&self, geom: Option<Geom>, summary: Option<u64>) {
        if let (Some(off), Some(geom), Some(region)) = (summary, geom, &self.summaries) {
            region.free(off, region.entry_bytes(&geom));
        }
    }

    /// The geometry of a namespace, when Attend serves it.
    pub fn geom_of(&self, ns: NamespaceId) -> Option<Geom> {
        let g = self.lock();
        let &o = g.namespaces.get(&ns)?;
        g.ns_table[o as usize].geom
    }

    /// The summary of a record found by recovery (computed without the
    /// lock), to hand to [`recover`](Self::recover).
    pub fn summarize_record(&self, ns: NamespaceId, payload: &[u8]) -> Option<u64> {
        let geom = self.summaries.as_ref().and(self.geom_of(ns))?;
        self.make_summary(Some(geom), payload)
    }

    /// A copy of a block's summary (for tests and tools).
    pub fn summary_copy(&self, ns: NamespaceId, key: &BlockKey) -> Option<(Geom, Vec<u8>)> {
        let g = self.lock();
        let o = ns_ord(&g, ns).ok()?;
        let id = g.index.find(o, key)?;
        let off = summary_at(&g, id)?;
        let region = self.summaries.as_ref()?;
        let geom = region.geom(&g.ns_table[o as usize].geom?);
        // SAFETY: the entry cannot be freed while the lock is held.
        let bytes = unsafe { region.slice(off, region.entry_bytes(&geom)) }.to_vec();
        Some((geom, bytes))
    }

    // ---- Attend -------------------------------------------------------------

    /// Pins the longest present prefix of `keys` (doomed blocks end it) for
    /// an Attend read and says where each block's copies are. Touches every
    /// pinned block (an access, as for Get).
    pub fn pin_chain(
        self: &Arc<Self>,
        ns: NamespaceId,
        keys: &[BlockKey],
    ) -> Result<ChainPin, StoreError> {
        self.pin_chain_with(ns, keys, true)
    }

    /// [`Store::pin_chain`], touching the pinned blocks only with `touch`
    /// (Attend with `compute.hotness` touches afterwards the blocks that
    /// carried attention, [`Store::touch_refs`]).
    pub fn pin_chain_with(
        self: &Arc<Self>,
        ns: NamespaceId,
        keys: &[BlockKey],
        touch: bool,
    ) -> Result<ChainPin, StoreError> {
        let mut g = self.lock();
        let g = &mut *g;
        let o = ns_ord(g, ns)?;
        if g.ns_table[o as usize].layout.is_none() {
            return Err(StoreError::LayoutNotRegistered(ns));
        }
        let mut ids = Vec::with_capacity(keys.len());
        g.index.find_run(o, keys, &mut ids);
        Ok(self.pin_ids(g, ns, ids, touch))
    }

    /// Pins the chain that ends at `tail` and is `n` blocks long, found by
    /// following the parent links back to its root (Attend's
    /// `chain_tail`), for an Attend read: its leading run of blocks that
    /// are not doomed, as [`Store::pin_chain`] pins from the keys. Nothing
    /// is pinned when the tail is absent or a link on the way no longer
    /// resolves (the chain's head cannot be known). A stored chain of
    /// another length is an error naming `field`: the caller's chain and
    /// the stored one differ (`field` names it, formatted only then). The
    /// walk holds the lock for at most `n` steps (the caller bounds `n`).
    pub fn pin_tail(
        self: &Arc<Self>,
        ns: NamespaceId,
        tail: &BlockKey,
        n: usize,
        field: impl Fn() -> String,
    ) -> Result<ChainPin, StoreError> {
        self.pin_tail_with(ns, tail, n, field, true)
    }

    /// [`Store::pin_tail`], touching the pinned blocks only with `touch`
    /// (see [`Store::pin_chain_with`]).
    pub fn pin_tail_with(
        self: &Arc<Self>,
        ns: NamespaceId,
        tail: &BlockKey,
        n: usize,
        field: impl Fn() -> String,
        touch: bool,
    ) -> Result<ChainPin, StoreError> {
        let mut g = self.lock();
        let g = &mut *g;
        let o = ns_ord(g, ns)?;
        if g.ns_table[o as usize].layout.is_none() {
            return Err(StoreError::LayoutNotRegistered(ns));
        }
        let mut ids = Vec::with_capacity(n);
        let mut at = g.index.find(o, tail);
        while let Some(id) = at {
            ids.push(id);
            at = match up(g, id) {
                Up::Root => break,
                Up::Block(p) => Some(p),
                Up::Lost => {
                    ids.clear();
                    None
                }
            };
            if at.is_some() && ids.len() == n {
                return Err(FieldError::new(
                    field(),
                    format!(
                        "is {n}, but the chain stored up to chain_tail is longer (its block {n} from the end has a parent); give the chain's length in blocks"
                    ),
                )
                .into());
            }
        }
        if !ids.is_empty() && ids.len() < n {
            return Err(FieldError::new(
                field(),
                format!(
                    "is {n}, but the chain stored up to chain_tail has {} blocks (its root, a block stored without a parent, comes sooner)",
                    ids.len()
                ),
            )
            .into());
        }
        ids.reverse();
        let lead = ids
            .iter()
            .position(|&id| g.index.get(id).is_doomed())
            .unwrap_or(ids.len());
        ids.truncate(lead);
        Ok(self.pin_ids(g, ns, ids, touch))
    }

    /// Touches the blocks of `refs` that are still the same blocks: an
    /// access, as for Get (Attend's hot blocks, `compute.hotness`).
    pub fn touch_refs(&self, refs: &[BlockRef]) {
        if refs.is_empty() {
            return;
        }
        let mut g = self.lock();
        let g = &mut *g;
        for &r in refs {
            if g.index.resolve(r).is_some() {
                touch(g, r.id);
            }
        }
    }

    /// Pins `ids` (a chain, root first) and says where each block's copies
    /// are. With `touch`, touches every pinned block (an access, as for
    /// Get).
    fn pin_ids(
        self: &Arc<Self>,
        g: &mut Inner,
        ns: NamespaceId,
        ids: Vec<BlockId>,
        touch_them: bool,
    ) -> ChainPin {
        let mut blocks = Vec::with_capacity(ids.len());
        for id in ids {
            pin(g, self.granule, id);
            if touch_them {
                touch(g, id);
            }
            let m = *g.index.get(id);
            let nvme = if m.on_nvme() {
                let loc = Loc(m.nvme_loc);
                // Resolved under the lock: the segment's slot cannot be
                // reused in between, and the file stays readable while
                // this clone lives even if the segment is reclaimed.
                self.nvme
                    .as_ref()
                    .and_then(|n| n.file_of(loc))
                    .map(|seg| (seg, loc))
            } else {
                None
            };
            blocks.push(ChainBlock {
                r: g.index.ref_of(id),
                key: m.key,
                len: m.len as u64,
                checksum: m.checksum,
                dram: m.in_dram().then_some(m.dram_addr(g.granule_shift)),
                nvme,
                summary: summary_at(g, id),
                expect: Expect {
                    namespace: ns,
                    key: m.key,
                    len: m.len,
                    checksum: m.checksum,
                },
            });
        }
        ChainPin {
            store: self.clone(),
            blocks,
        }
    }

    /// The chain that ends at `tail`, root first: each block's key and
    /// length, following the parents (see [`up`]). None when `tail` is not
    /// stored (or doomed), when a parent is not stored or is doomed (the
    /// chain is broken: its head is gone), or when the chain is longer
    /// than `max_blocks` (the walk holds the lock: bounded). Touches
    /// nothing.
    pub fn chain_to(
        &self,
        ns: NamespaceId,
        tail: &BlockKey,
        max_blocks: usize,
    ) -> Option<Vec<(BlockKey, u64)>> {
        let g = self.lock();
        let o = ns_ord(&g, ns).ok()?;
        let mut id = g.index.find(o, tail)?;
        let mut out = Vec::new();
        loop {
            let m = g.index.get(id);
            if m.is_doomed() || out.len() >= max_blocks {
                return None;
            }
            out.push((m.key, m.len as u64));
            id = match up(&g, id) {
                Up::Root => break,
                Up::Block(p) => p,
                Up::Lost => return None,
            };
        }
        out.reverse();
        Some(out)
    }

    /// A pinned block's copy failed verification during an Attend read:
    /// a DRAM copy dooms the block (as for Get); an NVMe copy is dropped,
    /// and the block with it unless it has a DRAM copy.
    pub fn attend_corrupt(&self, r: BlockRef, tier: TierKind) {
        if tier == TierKind::Dram {
            self.mark_corrupt(r, tier);
            return;
        }
        let mut g = self.lock();
        let g = &mut *g;
        if g.index.resolve(r).is_none() {
            return;
        }
        g.checksum_failures += 1;
        self.metrics.miss_checksum.increment(1);
        self.metrics.checksum_failures[NVME].increment(1);
        drop_nvme(g, self, r.id);
        let m = *g.index.get(r.id);
        if !m.in_dram() {
            g.index.get_mut(r.id).doom();
            if m.pins == 0 && !m.busy() {
                remove_block(g, self, r.id);
            } else {
                refresh(g, r.id);
            }
        }
    }

    /// Counts bytes Attend read out of DRAM and NVMe.
    pub fn count_reads(&self, dram: u64, nvme: u64) {
        let mut g = self.lock();
        g.tiers[DRAM].bytes_out += dram;
        g.tiers[NVME].bytes_out += nvme;
        drop(g);
        self.metrics.bytes_out[DRAM].increment(dram);
        self.metrics.bytes_out[NVME].increment(nvme);
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
        let mut refs = Vec::with_capacity(ids.len());
        let mut to_promote = Vec::new();
        let mut hits = [0u64; LOCAL_TIERS];
        for &id in &ids {
            let tier = touch(g, id);
            tiers.push(tier);
            hits[tier.index()] += 1;
            let r = g.index.ref_of(id);
            refs.push(r);
            if lease.is_some() && tier == TierKind::Nvme {
                to_promote.push(r);
            }
        }
        for (t, &n) in hits.iter().enumerate() {
            if n > 0 {
                self.metrics.lookup_hits[t].increment(n);
            }
        }
        Ok(LookupResult {
            hits: ids.len() as u32,
            tiers,
            lease,
            to_promote,
            refs,
        })
    }

    /// Arena slots of pinned (leased) blocks, all of which must have a DRAM
    /// copy by now (the caller promoted them). A block that could not be
    /// staged in DRAM is `NoSpace`.
    pub fn slots_of(&self, refs: &[(BlockRef, BlockKey)]) -> Result<Vec<Slot>, StoreError> {
        let mut g = self.lock();
        let g = &mut *g;
        let mut out = Vec::with_capacity(refs.len());
        let mut bytes = 0;
        for (i, (r, key)) in refs.iter().enumerate() {
            let m = match g.index.resolve(*r) {
                Some(m) if m.in_dram() && m.readable_pinned() => m,
                Some(m) if m.readable_pinned() => {
                    let b = &g.tiers[DRAM];
                    return Err(StoreError::NoSpace {
                        tier: "dram",
                        needed: m.len as u64,
                        pinned_bytes: b.pinned_bytes,
                        reserved_bytes: b.reserved_bytes,
                        capacity: b.capacity,
                    });
                }
                // Failed a checksum on the way up: a miss.
                _ => {
                    return Err(StoreError::Corrupt {
                        field: field("keys", i),
                        key: *key,
                        tier: "nvme",
                    });
                }
            };
            out.push(Slot {
                offset: m.dram_addr(g.granule_shift),
                len: m.len as u64,
                checksum: m.checksum,
            });
            bytes += m.len as u64;
        }
        g.tiers[DRAM].bytes_out += bytes;
        self.metrics.bytes_out[DRAM].increment(bytes);
        Ok(out)
    }

    pub fn release(&self, req: &ReleaseReq) -> Result<u32, StoreError> {
        let now = self.clock.now();
        let mut g = self.lock();
        let g = &mut *g;
        lease_checked(g, req.lease, req.namespace, now)?;
        let lease = g.leases.remove(&req.lease.0).expect("checked above");
        let n = lease.blocks.len() as u32;
        for r in lease.blocks {
            unpin(g, self, r);
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
                    return Ok(Reserve::Present(g.index.ref_of(id)));
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
    pub fn publish(
        &self,
        mut slot: PutSlot,
        checksum: u64,
    ) -> Result<(PutResult, BlockRef), StoreError> {
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
    ) -> Result<(PutResult, BlockRef), StoreError> {
        // SAFETY: the pending reservation owns the extent.
        let bytes = unsafe { self.dram.slice(p.addr, p.len) };
        // The summary is computed before the checksum is verified: bytes
        // changed in between (a local client writing the arena) either fail
        // the check or fail a later read's per-layer check; never served.
        let summary = self.make_summary(p.geom, bytes);
        let actual = hashed.unwrap_or_else(|| strata_proto::checksum(bytes));
        if actual != checksum {
            self.free_summary(p.geom, summary);
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
        let r = self.publish_locked(&mut g, p, checksum, field, summary);
        let over = g.tiers[DRAM].used > g.tiers[DRAM].high;
        let ns = g.ns_table[p.ns as usize].id;
        drop(g);
        if over {
            self.evict_wanted.notify_one();
        }
        if let (Ok((PutResult::Stored, _)), Some(h)) = (&r, self.publish_hook.get()) {
            h.stored(ns, &p.key, p.parent.as_ref());
        }
        r
    }

    fn publish_locked(
        &self,
        g: &mut Inner,
        p: Pending,
        checksum: u64,
        field: String,
        summary: Option<u64>,
    ) -> Result<(PutResult, BlockRef), StoreError> {
        if let Some(id) = g.index.find(p.ns, &p.key) {
            let m = *g.index.get(id);
            free_pending(g, &self.dram, &p);
            self.free_summary(p.geom, summary);
            if m.is_doomed() {
                return Err(StoreError::Busy { field, key: p.key });
            }
            if m.len as u64 == p.len && m.checksum == checksum {
                self.metrics.puts_already_present.increment(1);
                return Ok((PutResult::AlreadyPresent, g.index.ref_of(id)));
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
            Some(pid) => g.index.ref_of(pid),
            None => NO_PARENT,
        };
        let parent_hash = p.parent.map_or(0, |pk| Index::key_hash(p.ns, &pk));
        g.tick += 1;
        let meta = Meta {
            key: p.key,
            flags: 0,
            ns: p.ns,
            pins: 0,
            len: p.len as u32,
            dram_children: 0,
            generation: 0,
            tick: g.tick,
            checksum,
            dram_granule: 0,
            nvme_loc: 0,
            seq: 0,
            parent,
            parent_hash,
        };
        let r = g.index.insert(meta);
        let c = &mut g.ns_table[p.ns as usize].count;
        c.blocks += 1;
        c.bytes += p.len;
        set_summary(g, r.id, summary);
        g.tiers[DRAM].reserved_bytes -= p.rounded;
        g.tiers[DRAM].used -= p.rounded;
        unreserve(g, &p);
        add_dram(g, self.granule, r.id, p.addr);
        g.tiers[DRAM].bytes_in += p.len;
        self.metrics.bytes_in[DRAM].increment(p.len);
        self.metrics.puts_stored.increment(1);
        Ok((PutResult::Stored, r))
    }

    fn abandon(&self, p: Pending) {
        let mut g = self.lock();
        free_pending(&mut g, &self.dram, &p);
        self.metrics.abandoned_puts.increment(1);
    }

    /// Takes `len` bytes in DRAM for a block of tenant `t`, evicting
    /// synchronously if the background has not kept up: first the tenant's
    /// own blocks while it is at its DRAM quota ([`quota_room`]), then for
    /// the tier's sake blocks of tenants above their share, else the
    /// tenant's own ([`pick_victim`]). Never waits on I/O: a victim with an
    /// NVMe copy loses its DRAM copy, one without is dropped.
    ///
    /// [`quota_room`]: Store::quota_room
    fn take_dram(
        &self,
        g: &mut Inner,
        t: TenantId,
        len: u64,
        quota: Quota,
    ) -> Result<(u64, u64), StoreError> {
        let rounded = self.rounded(len);
        self.quota_room(g, t, rounded, rounded, quota)?;
        let addr = loop {
            if let Some(addr) = self.dram.allocate(rounded) {
                break addr;
            }
            if !self.evict_one(g, Some(t)) {
                let b = &g.tiers[DRAM];
                return Err(StoreError::NoSpace {
                    tier: "dram",
                    needed: len,
                    pinned_bytes: b.pinned_bytes,
                    reserved_bytes: b.reserved_bytes + g.writing_bytes,
                    capacity: b.capacity,
                });
            }
        };
        g.tiers[DRAM].used += rounded;
        Ok((addr, rounded))
    }

    /// Makes room under tenant `t`'s DRAM quota for `rounded` more bytes
    /// by evicting its own least recently used blocks. `batch` is what the
    /// whole call will ask for (a zero-copy Reserve is all or nothing):
    /// with [`Quota::Enforce`] a call that cannot fit even after evicting
    /// every block the tenant may lose (not pinned, not reserved) is refused
    /// before anything is evicted; [`Quota::BestEffort`] (a promotion: a
    /// read must be served) evicts what it can and goes on.
    fn quota_room(
        &self,
        g: &mut Inner,
        t: TenantId,
        rounded: u64,
        batch: u64,
        mode: Quota,
    ) -> Result<(), StoreError> {
        let b = &g.tenants.books[t as usize];
        let quota = b.quota[DRAM];
        if quota == 0 || b.used[DRAM] + rounded.max(batch) <= quota {
            return Ok(());
        }
        let evictable = b.used[DRAM].saturating_sub(b.reserved + b.pinned);
        let excess = (b.used[DRAM] + batch).saturating_sub(quota);
        if mode == Quota::Enforce && (batch > quota || excess > evictable) {
            return Err(self.quota_refused(g, t, batch));
        }
        while g.tenants.books[t as usize].used[DRAM] + rounded > quota {
            let Some((_, id)) = g.policy.victim(t) else {
                break;
            };
            self.evict_block(g, id);
        }
        if mode == Quota::Enforce && g.tenants.books[t as usize].used[DRAM] + rounded > quota {
            return Err(self.quota_refused(g, t, rounded));
        }
        Ok(())
    }

    /// Counts and describes a refusal by tenant `t`'s DRAM quota.
    fn quota_refused(&self, g: &mut Inner, t: TenantId, needed: u64) -> StoreError {
        let b = &mut g.tenants.books[t as usize];
        b.refusals[DRAM] += 1;
        self.metrics.quota_refusals[DRAM].increment(1);
        StoreError::Quota {
            tenant: b.name.clone(),
            tier: "dram",
            quota: b.quota[DRAM],
            used: b.used[DRAM],
            pinned: b.pinned,
            reserved: b.reserved,
            needed,
        }
    }

    fn reserve_space(
        &self,
        g: &mut Inner,
        ns: NsOrd,
        key: BlockKey,
        parent: Option<BlockKey>,
        len: u64,
    ) -> Result<Pending, StoreError> {
        let t = g.ns_table[ns as usize].tenant;
        if g.index.len() >= self.cfg.max_blocks && !self.evict_one(g, Some(t)) {
            return Err(StoreError::Limit {
                limit: "store.max_blocks",
                detail: format!("{} blocks indexed, the limit", g.index.len()),
            });
        }
        let (addr, rounded) = self.take_dram(g, t, len, Quota::Enforce)?;
        g.tiers[DRAM].reserved_bytes += rounded;
        let book = &mut g.tenants.books[t as usize];
        book.used[DRAM] += rounded;
        book.reserved += rounded;
        Ok(Pending {
            ns,
            geom: g.ns_table[ns as usize].geom,
            key,
            parent,
            len,
            rounded,
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
        // All or nothing, the tenant's quota included: a batch that cannot
        // fit is refused before any of the tenant's blocks is evicted.
        let batch: u64 = req
            .blocks
            .iter()
            .filter(|b| g.index.find(ns, &b.key).is_none())
            .map(|b| self.rounded(b.length))
            .sum();
        let t = g.ns_table[ns as usize].tenant;
        self.quota_room(g, t, 0, batch, Quota::Enforce)?;
        let mut out = Vec::with_capacity(req.blocks.len());
        let mut taken: Vec<(u64, Pending)> = Vec::new();
        for b in &req.blocks {
            if let Some(id) = g.index.find(ns, &b.key) {
                let m = g.index.get(id);
                if !m.is_doomed() {
                    out.push(SharedReservation {
                        key: b.key,
                        id: None,
                        offset: m.dram_addr(g.granule_shift),
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
    pub fn commit(
        &self,
        req: &CommitReq,
    ) -> Result<Vec<(BlockKey, PutResult, BlockRef)>, StoreError> {
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
            let (res, r) =
                self.verify_and_publish(p, checksum, None, format!("blocks[{i}].checksum"))?;
            out.push((key, res, r));
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

    /// Whether a block has an NVMe copy (is durable across a daemon crash).
    pub fn is_durable(&self, r: BlockRef) -> bool {
        self.lock().index.resolve(r).is_some_and(|m| m.on_nvme())
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
                // Retired by a namespace eviction after this lease was
                // taken: its holder may still read it.
                Some(id)
                    if g.index.get(id).is_retiring()
                        && lease_blocks
                            .is_some_and(|lb| lb.binary_search(&g.index.ref_of(id)).is_ok()) =>
                {
                    id
                }
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
                len: m.len as u64,
                checksum: m.checksum,
            });
        }
        Ok(ReadGuard {
            store: self.clone(),
            blocks,
        })
    }

    /// The DRAM address of a pinned block, if it has a DRAM copy.
    fn dram_addr_of(&self, r: BlockRef) -> Option<u64> {
        let g = self.lock();
        g.index
            .resolve(r)
            .filter(|m| m.in_dram() && m.readable_pinned())
            .map(|m| m.dram_addr(g.granule_shift))
    }

    /// Records a failed checksum of a block's DRAM copy: the block stops
    /// being visible now and is removed when its last pin goes.
    pub fn mark_corrupt(&self, r: BlockRef, tier: TierKind) {
        let mut g = self.lock();
        let g = &mut *g;
        g.checksum_failures += 1;
        self.metrics.miss_checksum.increment(1);
        self.metrics.checksum_failures[tier.index()].increment(1);
        let Some(m) = g.index.resolve_mut(r) else {
            return;
        };
        m.doom();
        if m.pins == 0 && !m.busy() {
            remove_block(g, self, r.id);
        } else {
            refresh(g, r.id);
        }
    }

    /// The blocks a lease covers for `keys` (GetSlots), in key order.
    pub fn leased_refs(&self, req: &GetSlotsReq) -> Result<Vec<BlockRef>, StoreError> {
        let now = self.clock.now();
        let g = self.lock();
        let ns = ns_ord(&g, req.namespace)?;
        let lease = lease_checked(&g, req.lease, Some(req.namespace), now)?;
        let mut out = Vec::with_capacity(req.keys.len());
        for (i, k) in req.keys.iter().enumerate() {
            let covered = g.index.find(ns, k).filter(|&id| {
                lease.blocks.binary_search(&g.index.ref_of(id)).is_ok()
                    && g.index.get(id).readable_pinned()
            });
            let Some(id) = covered else {
                return Err(StoreError::NotLeased {
                    field: field("keys", i),
                    key: *k,
                    lease: req.lease,
                });
            };
            out.push(g.index.ref_of(id));
        }
        Ok(out)
    }

    /// Arena slots of leased blocks that already have a DRAM copy (the
    /// service promotes NVMe-only ones first: `leased_refs`, promotion,
    /// `slots_of`).
    pub fn get_slots(&self, req: &GetSlotsReq) -> Result<Vec<Slot>, StoreError> {
        let refs = self.leased_refs(req)?;
        let keyed: Vec<_> = refs.into_iter().zip(req.keys.iter().copied()).collect();
        self.slots_of(&keyed)
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
                Some(id) if g.index.get(id).pins > 0 || g.index.get(id).busy() => {
                    res.pinned.push(*k)
                }
                Some(id) => {
                    if g.index.get(id).on_nvme() {
                        g.seq += 1;
                        res.tombstones.push(Tombstone {
                            namespace: req.namespace,
                            key: *k,
                            seq: g.seq - 1,
                        });
                    }
                    remove_block(g, self, id);
                    res.deleted += 1;
                }
            }
        }
        Ok(res)
    }

    /// Evicts DRAM's next victim at once ([`pick_victim`]: tenants above
    /// their share first, else `for_tenant`, the tenant that needs the
    /// room). False if nothing may be evicted.
    fn evict_one(&self, g: &mut Inner, for_tenant: Option<TenantId>) -> bool {
        let Some(id) = pick_victim(g, for_tenant) else {
            return false;
        };
        self.evict_block(g, id);
        true
    }

    /// Evicts a block from DRAM now: one with an NVMe copy loses its DRAM
    /// copy, one without is dropped.
    fn evict_block(&self, g: &mut Inner, id: BlockId) {
        let m = *g.index.get(id);
        count_eviction(g, m.ns);
        if m.on_nvme() {
            drop_dram(g, self.granule, &self.dram, id);
        } else {
            remove_block(g, self, id);
            if self.nvme.is_some() {
                self.metrics.dropped_backlog.increment(1);
            }
        }
        g.tiers[DRAM].evictions += 1;
        self.metrics.evictions[DRAM].increment(1);
        self.metrics.evicted_bytes[DRAM].increment(m.len as u64);
    }

    /// Background eviction without an NVMe tier: while DRAM is above its
    /// high watermark, evict down to its low watermark, `batch` blocks per
    /// lock hold. Returns the number of blocks evicted.
    pub fn evict_to_watermark(&self, batch: usize) -> usize {
        let mut total = 0;
        {
            let g = self.lock();
            if g.tiers[DRAM].used <= g.tiers[DRAM].high {
                return 0;
            }
        }
        loop {
            let mut g = self.lock();
            for _ in 0..batch {
                if g.tiers[DRAM].used <= g.tiers[DRAM].low || !self.evict_one(&mut g, None) {
                    return total;
                }
                total += 1;
            }
        }
    }

    /// Plans write-downs while DRAM is above its high watermark (down to
    /// its low one, counting writes in flight as freed): victims with an
    /// NVMe copy lose their DRAM copy now; the admission filter and the
    /// write budget decide which of the others are written down (marked
    /// busy, DRAM copy kept until the write ends) and which are dropped.
    pub fn plan_demotions(&self, max: usize) -> Vec<WriteJob> {
        let now = self.clock.now();
        let mut g = self.lock();
        let g = &mut *g;
        let mut jobs = Vec::new();
        let nvme_ok = self.nvme.as_ref().is_some_and(|n| !n.is_fenced());
        if g.tiers[DRAM].used <= g.tiers[DRAM].high {
            return jobs;
        }
        while g.tiers[DRAM].used.saturating_sub(g.writing_bytes) > g.tiers[DRAM].low
            && g.writes_in_flight < self.cfg.nvme.max_writes_in_flight
            && jobs.len() < max
        {
            let Some(id) = pick_victim(g, None) else {
                break;
            };
            let m = *g.index.get(id);
            count_eviction(g, m.ns);
            g.tiers[DRAM].evictions += 1;
            self.metrics.evictions[DRAM].increment(1);
            self.metrics.evicted_bytes[DRAM].increment(m.len as u64);
            if m.on_nvme() {
                drop_dram(g, self.granule, &self.dram, id);
                continue;
            }
            let admitted = match self.cfg.nvme.admission {
                Admission::All => true,
                Admission::None => false,
                Admission::LookedUpOrHead => {
                    m.flags & FLAG_HIT != 0 || g.index.resolve(m.parent).is_none()
                }
            };
            if !nvme_ok || !admitted {
                remove_block(g, self, id);
                self.metrics.dropped_not_admitted.increment(1);
                continue;
            }
            if !self.nvme_quota_room(g, m.ns, m.len as u64) {
                remove_block(g, self, id);
                self.metrics.dropped_quota.increment(1);
                continue;
            }
            if !g.budget.take(now, m.len as u64) {
                remove_block(g, self, id);
                self.metrics.dropped_budget.increment(1);
                continue;
            }
            jobs.push(self.start_write(g, id, false));
        }
        jobs
    }

    /// Marks a block busy for an NVMe write and describes the write.
    fn start_write(&self, g: &mut Inner, id: BlockId, keep_dram: bool) -> WriteJob {
        let seq = g.seq;
        g.seq += 1;
        g.writes_in_flight += 1;
        let (len, ns) = (g.index.get(id).len as u64, g.index.get(id).ns);
        g.writing_bytes += self.rounded(len);
        g.tenants.books[g.ns_table[ns as usize].tenant as usize].writing += len;
        let m = g.index.get_mut(id);
        m.flags |= FLAG_WRITING;
        let m = *m;
        refresh(g, id);
        let parent = g.index.resolve(m.parent).map(|p| p.key);
        WriteJob {
            r: g.index.ref_of(id),
            header: RecordHeader {
                kind: RecordKind::Block,
                namespace: g.ns_table[m.ns as usize].id,
                seq,
                segment: 0,
                key: m.key,
                parent,
                len: m.len,
                checksum: m.checksum,
                payload_offset: 0, // set by append
            },
            dram_addr: m.dram_addr(g.granule_shift),
            keep_dram,
        }
    }

    /// Write-through: plans the NVMe write of a freshly published block (or
    /// `None` if it already has an NVMe copy, or one is being written).
    pub fn begin_persist(&self, r: BlockRef) -> Option<WriteJob> {
        let mut g = self.lock();
        let g = &mut *g;
        let m = *g.index.resolve(r)?;
        if m.on_nvme() || m.busy() || !m.in_dram() || m.is_doomed() {
            return None;
        }
        if !self.nvme_quota_room(g, m.ns, m.len as u64) {
            // Kept in DRAM, not durable: as a full disk would leave it.
            return None;
        }
        Some(self.start_write(g, r.id, true))
    }

    /// Whether a block of namespace ordinal `ns` may gain an NVMe copy of
    /// `len` bytes under its tenant's NVMe quota (writes in flight count);
    /// a refusal is counted.
    fn nvme_quota_room(&self, g: &mut Inner, ns: NsOrd, len: u64) -> bool {
        let b = &mut g.tenants.books[g.ns_table[ns as usize].tenant as usize];
        let quota = b.quota[NVME];
        if quota == 0 || b.used[NVME] + b.writing + len <= quota {
            return true;
        }
        b.refusals[NVME] += 1;
        self.metrics.quota_refusals[NVME].increment(1);
        false
    }

    /// The bytes a write job copies out of DRAM.
    ///
    /// # Safety contract
    /// Valid while the job is in flight: the block is busy, so its DRAM copy
    /// is neither evicted nor freed.
    pub fn job_bytes(&self, job: &WriteJob) -> &[u8] {
        // SAFETY: see above; bounds checked by the tier.
        unsafe { self.dram.slice(job.dram_addr, job.header.len as u64) }
    }

    /// Ends an NVMe write. On success the block gains its NVMe copy and,
    /// for a write-down, loses its DRAM copy unless it was pinned (read)
    /// meanwhile. On failure a write-down drops the block; write-through
    /// keeps it in DRAM.
    pub fn finish_write(&self, job: &WriteJob, result: Result<Loc, String>) {
        let mut g = self.lock();
        let g = &mut *g;
        g.writes_in_flight -= 1;
        g.writing_bytes -= self.rounded(job.header.len as u64);
        let t = g
            .namespaces
            .get(&job.header.namespace)
            .map_or(DEFAULT_ID, |&o| g.ns_table[o as usize].tenant);
        g.tenants.books[t as usize].writing -= job.header.len as u64;
        let Some(m) = g.index.resolve_mut(job.r) else {
            // Cannot happen (busy blocks are not removed); hand the record back.
            if let (Ok(loc), Some(n)) = (result, &self.nvme) {
                n.release(loc, job.header.len);
            }
            return;
        };
        m.flags &= !FLAG_WRITING;
        let id = job.r.id;
        match result {
            Ok(loc) => {
                add_nvme(g, id, loc, job.header.seq);
                g.tiers[NVME].bytes_in += job.header.len as u64;
                self.metrics.bytes_in[NVME].increment(job.header.len as u64);
                let m = *g.index.get(id);
                if m.is_doomed() {
                    settle(g, self, id);
                } else if !job.keep_dram && m.pins == 0 {
                    drop_dram(g, self.granule, &self.dram, id);
                    self.metrics.demotions.increment(1);
                } else {
                    refresh(g, id);
                }
            }
            Err(e) => {
                tracing::debug!(key = %job.header.key, error = %e, "nvme write failed");
                let m = *g.index.get(id);
                if m.is_doomed() {
                    settle(g, self, id);
                } else if !job.keep_dram && m.pins == 0 {
                    remove_block(g, self, id);
                    self.metrics.dropped_write_failed.increment(1);
                } else {
                    refresh(g, id);
                }
            }
        }
    }

    /// Plans the promotion of a pinned block from NVMe into DRAM.
    pub fn begin_promotion(&self, r: BlockRef) -> Promote {
        let mut g = self.lock();
        let Some(m) = g.index.resolve_mut(r) else {
            return Promote::Gone;
        };
        if !m.readable_pinned() {
            return Promote::Gone;
        }
        if m.in_dram() {
            return Promote::InDram;
        }
        if m.flags & FLAG_PROMOTING != 0 {
            return Promote::InFlight;
        }
        if !m.on_nvme() {
            return Promote::Gone;
        }
        let (loc, len, checksum, key, ns) = (Loc(m.nvme_loc), m.len, m.checksum, m.key, m.ns);
        let Some(seg) = self.nvme.as_ref().and_then(|n| n.file_of(loc)) else {
            return Promote::Gone;
        };
        m.flags |= FLAG_PROMOTING;
        let namespace = g.ns_table[ns as usize].id;
        Promote::Job(PromoteJob {
            r,
            seg,
            loc,
            expect: Expect {
                namespace,
                key,
                len,
                checksum,
            },
        })
    }

    /// Ends a promotion with the record's payload (already verified by the
    /// tier). Returns whether the block now has a DRAM copy.
    pub fn finish_promotion(
        &self,
        job: &PromoteJob,
        payload: Result<&[u8], PromoteFailure>,
    ) -> bool {
        let staged = match payload {
            Ok(bytes) => {
                let mut g = self.lock();
                let t = g
                    .namespaces
                    .get(&job.expect.namespace)
                    .map_or(DEFAULT_ID, |&o| g.ns_table[o as usize].tenant);
                let taken = self.take_dram(&mut g, t, bytes.len() as u64, Quota::BestEffort);
                drop(g);
                match taken {
                    Ok((addr, _)) => {
                        // SAFETY: a fresh extent, owned by this promotion.
                        let dst = unsafe { self.dram.slice_mut(addr, bytes.len() as u64) };
                        let sum = strata_kernels::checksum::copy_and_checksum(dst, bytes);
                        Some((addr, sum))
                    }
                    Err(_) => None,
                }
            }
            Err(_) => None,
        };
        let ok = {
            let mut g = self.lock();
            let g = &mut *g;
            let id = job.r.id;
            let alive = g.index.resolve(job.r).is_some();
            if let Some(m) = g.index.resolve_mut(job.r) {
                m.flags &= !FLAG_PROMOTING;
            }
            let mut ok = false;
            match (payload, staged) {
                (Ok(_), Some((addr, sum))) if alive && sum == job.expect.checksum => {
                    // `take_dram` counted the extent; `add_dram` counts it again.
                    g.tiers[DRAM].used -= self.rounded(job.expect.len as u64);
                    add_dram(g, self.granule, id, addr);
                    g.tiers[NVME].bytes_out += job.expect.len as u64;
                    self.metrics.bytes_out[NVME].increment(job.expect.len as u64);
                    self.metrics.promotions.increment(1);
                    ok = true;
                }
                (Ok(_), Some((addr, _))) => {
                    // Gone meanwhile, or a copy fault: hand the extent back.
                    let rounded = self.rounded(job.expect.len as u64);
                    self.dram.free(addr, rounded);
                    g.tiers[DRAM].used -= rounded;
                }
                (Err(PromoteFailure::Corrupt), _) if alive => {
                    // The record failed its check: a miss; the NVMe copy is void.
                    g.checksum_failures += 1;
                    self.metrics.miss_checksum.increment(1);
                    self.metrics.checksum_failures[NVME].increment(1);
                    drop_nvme(g, self, id);
                    let m = *g.index.get(id);
                    if !m.in_dram() {
                        g.index.get_mut(id).doom();
                        if m.pins == 0 {
                            remove_block(g, self, id);
                        }
                    }
                }
                _ => {}
            }
            if alive && g.index.resolve(job.r).is_some() {
                settle(g, self, id);
            }
            ok
        };
        self.promoted.notify_waiters();
        ok
    }

    /// Waits until some promotion ends.
    pub async fn promotion_ended(&self) {
        self.promoted.notified().await;
    }

    /// The tier was fenced: its copies are unreachable. Blocks with a DRAM
    /// copy keep it; the others are dropped (a miss, never a wrong block).
    pub fn on_nvme_fenced(&self) -> bool {
        let mut g = self.lock();
        let g = &mut *g;
        if g.nvme_fenced_handled {
            return false;
        }
        g.nvme_fenced_handled = true;
        // One event for the whole tier instead of one per block.
        g.events.push_cleared(TierKind::Nvme);
        g.events.set_paused(true);
        let ids: Vec<BlockId> = g
            .index
            .live_ids()
            .filter(|&id| g.index.get(id).on_nvme())
            .collect();
        for id in ids {
            let m = *g.index.get(id);
            clear_nvme(g, id);
            if !m.in_dram() {
                g.index.get_mut(id).doom();
                if m.pins == 0 && !m.busy() {
                    remove_block(g, self, id);
                }
            }
        }
        g.events.set_paused(false);
        true
    }

    // ---- NVMe reclaim -------------------------------------------------------

    /// Reclaim: is the record at `loc` the live copy of its block, and what
    /// to do with it. Marks it busy when it is to be copied forward.
    pub fn reclaim_decision(&self, h: &RecordHeader, loc: Loc, oldest: bool) -> ReclaimAction {
        let mut g = self.lock();
        let g = &mut *g;
        let Some(&ns) = g.namespaces.get(&h.namespace) else {
            return ReclaimAction::Skip;
        };
        let found = g.index.find(ns, &h.key);
        if h.kind == RecordKind::Tombstone {
            // A tombstone guards against older records of its key; once the
            // oldest segment goes, nothing older remains.
            return if oldest || found.is_some() {
                ReclaimAction::Skip
            } else {
                ReclaimAction::CopyTombstone
            };
        }
        let Some(id) = found else {
            return ReclaimAction::Skip;
        };
        let m = *g.index.get(id);
        if !m.on_nvme() || m.nvme_loc != loc.0 {
            return ReclaimAction::Skip;
        }
        if m.flags & FLAG_WRITING != 0 {
            // Already being copied (cannot happen with one reclaimer).
            return ReclaimAction::Skip;
        }
        // In use (pinned, or being promoted from this very record): copy it,
        // whatever the policy, so its location stays valid.
        let in_use = m.pins > 0 || m.busy();
        let hot = self.cfg.nvme.reclaim == ReclaimPolicy::CopyHot && m.flags & FLAG_HIT != 0;
        if in_use || hot {
            g.index.get_mut(id).flags |= FLAG_WRITING;
            g.index.get_mut(id).flags &= !FLAG_HIT;
            refresh(g, id);
            return ReclaimAction::Copy(g.index.ref_of(id));
        }
        if m.in_dram() {
            drop_nvme(g, self, id);
        } else {
            remove_block(g, self, id);
        }
        // A cold record reclaim gives up is the NVMe tier's eviction.
        g.tiers[NVME].evictions += 1;
        self.metrics.evictions[NVME].increment(1);
        self.metrics.evicted_bytes[NVME].increment(m.len as u64);
        self.metrics.dropped_reclaim.increment(1);
        ReclaimAction::Dropped
    }

    /// Ends a copy-forward started by `reclaim_decision`.
    pub fn finish_copy(&self, r: BlockRef, old: Loc, len: u32, new: Result<(Loc, u64), String>) {
        let mut g = self.lock();
        let g = &mut *g;
        let Some(m) = g.index.resolve_mut(r) else {
            if let (Ok((loc, _)), Some(n)) = (new, &self.nvme) {
                n.release(loc, len);
            }
            return;
        };
        m.flags &= !FLAG_WRITING;
        let m = *m;
        match new {
            Ok((loc, seq)) if m.on_nvme() && m.nvme_loc == old.0 => {
                if let Some(n) = &self.nvme {
                    n.release(old, m.len);
                }
                let mm = g.index.get_mut(r.id);
                mm.nvme_loc = loc.0;
                mm.seq = seq;
                settle(g, self, r.id);
            }
            Ok((loc, _)) => {
                if let Some(n) = &self.nvme {
                    n.release(loc, m.len);
                }
                settle(g, self, r.id);
            }
            Err(_) => {
                // Could not copy: the old segment is going away.
                if m.on_nvme() && m.nvme_loc == old.0 {
                    if m.in_dram() {
                        drop_nvme(g, self, r.id);
                    } else {
                        g.index.get_mut(r.id).doom();
                        clear_nvme(g, r.id);
                        if m.pins == 0 {
                            remove_block(g, self, r.id);
                        }
                    }
                }
                if g.index.resolve(r).is_some() {
                    settle(g, self, r.id);
                }
            }
        }
    }

    /// Takes the next record sequence number (tombstones, copies).
    pub fn next_seq(&self) -> u64 {
        let mut g = self.lock();
        g.seq += 1;
        g.seq - 1
    }

    /// The sequence number for a copy-forward of block `r`'s record whose
    /// sequence number is `old`: a new one, except for a retired block,
    /// whose copy keeps `old` so that its namespace's eviction (recorded
    /// as "records below this sequence number are void") still voids it.
    pub fn seq_for_copy(&self, r: BlockRef, old: u64) -> u64 {
        let mut g = self.lock();
        if g.index.resolve(r).is_some_and(|m| m.is_retiring()) {
            return old;
        }
        g.seq += 1;
        g.seq - 1
    }

    // ---- events ---------------------------------------------------------------

    /// Woken on every logged event.
    pub fn event_notify(&self) -> Arc<tokio::sync::Notify> {
        self.lock().events.notify()
    }

    /// The last event's sequence number (0 before the first).
    pub fn last_event_seq(&self) -> u64 {
        self.lock().events.last_seq()
    }

    /// Events after `cursor` (up to `max`), of the namespaces in `only`
    /// (empty: all); tier-wide events always pass.
    pub fn read_events(&self, cursor: u64, max: usize, only: &[NamespaceId]) -> EventsRead {
        self.read_events_of(cursor, max, only, None)
    }

    /// [`read_events`](Self::read_events) of tenant `tenant`'s namespaces
    /// only (None: every tenant's).
    pub fn read_events_of(
        &self,
        cursor: u64,
        max: usize,
        only: &[NamespaceId],
        tenant: Option<TenantId>,
    ) -> EventsRead {
        let g = self.lock();
        let ords = ordinals(&g, only);
        let mut raw = Vec::with_capacity(max.min(4096));
        let keep = |e: &events::Event| {
            e.kind == EventKind::Cleared
                || (ords.as_ref().is_none_or(|o| o.contains(&e.ns))
                    && tenant.is_none_or(|t| g.ns_table[e.ns as usize].tenant == t))
        };
        let r = g.events.read(cursor, max, &keep, &mut raw);
        EventsRead {
            events: raw.iter().map(|e| event_out(&g, e)).collect(),
            missed: r.missed,
            cursor: r.cursor,
        }
    }

    /// A snapshot of the blocks held, as Stored events (sequence number 0),
    /// a chunk at a time: blocks from slot `from` on, up to about `max`
    /// events; returns the slot to continue from (None when done). Chunks
    /// are taken under the lock one by one, so a block may show in a chunk
    /// and in live events after the snapshot's sequence number: replaying
    /// those events over the snapshot converges on the store's state.
    pub fn snapshot_events(
        &self,
        from: u32,
        max: usize,
        only: &[NamespaceId],
    ) -> (Vec<EventOut>, Option<u32>) {
        self.snapshot_events_of(from, max, only, None)
    }

    /// [`snapshot_events`](Self::snapshot_events) of tenant `tenant`'s
    /// namespaces only (None: every tenant's).
    pub fn snapshot_events_of(
        &self,
        from: u32,
        max: usize,
        only: &[NamespaceId],
        tenant: Option<TenantId>,
    ) -> (Vec<EventOut>, Option<u32>) {
        let g = self.lock();
        let ords = ordinals(&g, only);
        let mut out = Vec::new();
        let end = g.index.slots();
        let mut id = from;
        while id < end && out.len() < max {
            if g.index.is_live(id) {
                let m = g.index.get(id);
                if !m.is_doomed()
                    && ords.as_ref().is_none_or(|o| o.contains(&m.ns))
                    && tenant.is_none_or(|t| g.ns_table[m.ns as usize].tenant == t)
                {
                    let parent = g.index.resolve(m.parent).map(|p| p.key);
                    for (held, medium) in
                        [(m.in_dram(), TierKind::Dram), (m.on_nvme(), TierKind::Nvme)]
                    {
                        if held {
                            let e = events::Event {
                                seq: 0,
                                kind: EventKind::Stored,
                                medium,
                                ns: m.ns,
                                key: m.key,
                                parent,
                                len: m.len,
                            };
                            out.push(event_out(&g, &e));
                        }
                    }
                }
            }
            id += 1;
        }
        (out, (id < end).then_some(id))
    }

    // ---- recovery -------------------------------------------------------------

    /// Starts rebuilding the index from NVMe records. `evicted`: the
    /// namespace evictions recorded beside the segments (namespace id, and
    /// the sequence number below which its records are void).
    pub fn begin_recovery(&self, evicted: &[(u64, u64)]) {
        let mut g = self.lock();
        let mut rec = Recovery::default();
        for &(ns, seq) in evicted {
            let e = rec.evicted.entry(NamespaceId(ns)).or_insert(0);
            *e = (*e).max(seq);
            // Records written from now on must stay above every mark.
            g.seq = g.seq.max(seq + 1);
        }
        g.recovery = Some(rec);
        // Subscribers resync from a snapshot after a restart.
        g.events.set_paused(true);
    }

    /// Applies one record found by the scan; the newest sequence number of
    /// a key wins, and a tombstone voids older records. `summary` is the
    /// record's summary ([`summarize_record`](Self::summarize_record)); it
    /// is kept with the block or freed.
    pub fn recover(&self, s: &Scanned, summary: Option<u64>) {
        let h = &s.header;
        let mut g = self.lock();
        let g = &mut *g;
        g.seq = g.seq.max(h.seq + 1);
        let evicted = g
            .recovery
            .as_ref()
            .and_then(|r| r.evicted.get(&h.namespace))
            .is_some_and(|&mark| h.seq < mark);
        if evicted {
            // Its namespace was evicted after this record was written.
            if let Some(off) = summary {
                let geom = g
                    .namespaces
                    .get(&h.namespace)
                    .and_then(|&o| g.ns_table[o as usize].geom);
                self.free_summary(geom, Some(off));
            }
            return;
        }
        let ns = match g.namespaces.get(&h.namespace) {
            Some(&o) => o,
            None => match ns_insert(g, h.namespace, None) {
                Ok(o) => o,
                Err(e) => {
                    // Past the namespace limit: the record stays out of the
                    // index, like one past store.max_blocks. It was never
                    // counted live, so there is nothing to release, and it
                    // has no summary (an unknown namespace has no geometry).
                    debug_assert!(summary.is_none());
                    let rec = g.recovery.get_or_insert_with(Recovery::default);
                    if rec.refused.insert(h.namespace) {
                        tracing::warn!(error = %e, "a namespace found on NVMe is refused; its records there are not indexed");
                    }
                    return;
                }
            },
        };
        let geom = g.ns_table[ns as usize].geom;
        let summary = if h.kind == RecordKind::Block {
            summary
        } else {
            self.free_summary(geom, summary);
            None
        };
        let existing = g.index.find(ns, &h.key);
        // Live accounting: every segment starts recovery at zero live bytes
        // and records, and a record counts live only once `add_live` is
        // called for it, when it goes into the index. So only a record the
        // index held is released (a tombstone or a newer copy superseding
        // it: `remove_block` and the newer-copy path below); a record
        // skipped here (voided, not newer, past `store.max_blocks`) was
        // never added and is not released: `NvmeTier::release` saturates
        // at zero, and releasing it would take the count of the segment's
        // other live records down. Tombstones are never live.
        match h.kind {
            RecordKind::Tombstone => {
                if let Some(id) = existing
                    && g.index.get(id).seq < h.seq
                {
                    remove_block(g, self, id);
                }
                let rec = g.recovery.get_or_insert_with(Recovery::default);
                let e = rec.tombstones.entry((ns, h.key)).or_insert(0);
                *e = (*e).max(h.seq);
            }
            RecordKind::Block => {
                let voided = g
                    .recovery
                    .as_ref()
                    .and_then(|r| r.tombstones.get(&(ns, h.key)))
                    .is_some_and(|&t| t > h.seq);
                if voided {
                    // Never counted live: nothing to release.
                    self.free_summary(geom, summary);
                    return;
                }
                if let Some(id) = existing {
                    let m = *g.index.get(id);
                    if m.seq >= h.seq {
                        // Not newer than the indexed copy (say, a retired
                        // block's copy-forward, which keeps its number,
                        // left beside its source by an interrupted
                        // reclaim): never counted live.
                        self.free_summary(geom, summary);
                        return;
                    }
                    // A newer record of the same block: the indexed one
                    // was counted live when it went in; this one is now.
                    if let Some(n) = &self.nvme {
                        n.release(Loc(m.nvme_loc), m.len);
                        n.add_live(s.loc, h.len);
                    }
                    let e = &mut g.ns_table[ns as usize];
                    let c = &mut e.count;
                    c.bytes = c.bytes - m.len as u64 + h.len as u64;
                    c.tier_bytes[NVME] = c.tier_bytes[NVME] - m.len as u64 + h.len as u64;
                    let t = &mut g.tenants.books[e.tenant as usize];
                    t.used[NVME] = t.used[NVME] - m.len as u64 + h.len as u64;
                    let mm = g.index.get_mut(id);
                    mm.nvme_loc = s.loc.0;
                    mm.seq = h.seq;
                    mm.len = h.len;
                    mm.checksum = h.checksum;
                    let old = take_summary(g, id);
                    self.free_summary(geom, old);
                    set_summary(g, id, summary);
                    return;
                }
                if g.index.len() >= self.cfg.max_blocks {
                    // Stays out of the index: never counted live.
                    self.free_summary(geom, summary);
                    return;
                }
                g.tick += 1;
                let r = g.index.insert(Meta {
                    key: h.key,
                    flags: FLAG_NVME,
                    ns,
                    pins: 0,
                    len: h.len,
                    dram_children: 0,
                    generation: 0,
                    tick: g.tick,
                    checksum: h.checksum,
                    dram_granule: 0,
                    nvme_loc: s.loc.0,
                    seq: h.seq,
                    // Linked by key in `finish_recovery`, once every
                    // record is in.
                    parent: NO_PARENT,
                    parent_hash: h.parent.map_or(0, |pk| Index::key_hash(ns, &pk)),
                });
                set_summary(g, r.id, summary);
                g.tiers[NVME].blocks += 1;
                let c = &mut g.ns_table[ns as usize].count;
                c.blocks += 1;
                c.bytes += h.len as u64;
                ns_gain(g, ns, NVME, h.len as u64);
                if let Some(n) = &self.nvme {
                    n.add_live(s.loc, h.len);
                }
                if let Some(p) = h.parent {
                    g.recovery
                        .get_or_insert_with(Recovery::default)
                        .parents
                        .push((r.id, p));
                }
            }
        }
    }

    /// Ends recovery: links parents (by key, now that all blocks are in).
    pub fn finish_recovery(&self) -> u64 {
        let mut g = self.lock();
        let g = &mut *g;
        let rec = g.recovery.take().unwrap_or_default();
        g.events.set_paused(false);
        for (id, pk) in rec.parents {
            if !g.index.is_live(id) {
                continue;
            }
            let ns = g.index.get(id).ns;
            if let Some(pid) = g.index.find(ns, &pk) {
                let pr = g.index.ref_of(pid);
                g.index.get_mut(id).parent = pr;
            }
        }
        g.index.len() as u64
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
                    unpin(g, self, r);
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

    /// The tier of a block's fastest copy now (by ref).
    pub fn tier_now(&self, r: BlockRef) -> Option<TierKind> {
        self.lock().index.resolve(r).map(|m| m.tier())
    }

    /// Whether a block has an NVMe copy (by key), without touching it.
    pub fn has_nvme_copy(&self, ns: NamespaceId, key: &BlockKey) -> bool {
        let g = self.lock();
        let Ok(o) = ns_ord(&g, ns) else { return false };
        g.index
            .find(o, key)
            .is_some_and(|id| g.index.get(id).on_nvme() && !g.index.get(id).is_doomed())
    }

    /// The tier a block's fastest copy is in, without touching it.
    pub fn tier_of(&self, ns: NamespaceId, key: &BlockKey) -> Option<TierKind> {
        let g = self.lock();
        let o = ns_ord(&g, ns).ok()?;
        g.index.find(o, key).map(|id| g.index.get(id).tier())
    }

    pub fn stats(&self) -> StoreStats {
        let g = self.lock();
        let nvme = self.nvme.as_ref().map(|n| n.stats());
        let tiers = TierKind::ALL[..LOCAL_TIERS]
            .iter()
            .zip(g.tiers.iter())
            .filter(|(_, b)| b.configured)
            .map(|(&tier, b)| {
                let (used, fenced) = match (&nvme, tier) {
                    (Some(n), TierKind::Nvme) => (n.allocated, n.fenced),
                    _ => (b.used, false),
                };
                TierStats {
                    tier: Some(tier),
                    capacity: b.capacity,
                    used,
                    blocks: b.blocks,
                    pinned_blocks: b.pinned_blocks,
                    pinned_bytes: b.pinned_bytes,
                    reserved_bytes: b.reserved_bytes,
                    evictions: b.evictions,
                    bytes_in: b.bytes_in,
                    bytes_out: b.bytes_out,
                    high_watermark: b.high,
                    low_watermark: b.low,
                    fenced,
                }
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
                + g.policy.heap_bytes()
                + g.summary_of.capacity() * std::mem::size_of::<u32>())
                as u64,
            writes_in_flight: g.writes_in_flight as u64,
            summary_bytes: self.summaries.as_ref().map_or(0, |r| r.used_bytes()),
            summary_capacity: self.summaries.as_ref().map_or(0, |r| r.capacity_bytes()),
            summary_blocks: g.summary_blocks,
        }
    }

    /// Checks the store's invariants; panics with a description if one
    /// fails. For tests and the simulator: O(blocks).
    pub fn check_invariants(&self) {
        let g = self.lock();
        let mut dram_used = 0u64;
        let mut dram_blocks = 0u64;
        let mut nvme_blocks = 0u64;
        let mut children: HashMap<BlockId, u32> = HashMap::new();
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
            assert!(m.in_dram() || m.on_nvme(), "block {:?} has no copy", m.key);
            if m.in_dram() {
                dram_used += self.rounded(m.len as u64);
                dram_blocks += 1;
                if g.index.resolve(m.parent).is_some() {
                    *children.entry(m.parent.id).or_default() += 1;
                }
            }
            if m.on_nvme() {
                nvme_blocks += 1;
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
                m.dram_children,
                children.get(&id).copied().unwrap_or(0),
                "DRAM child count of {:?}",
                m.key
            );
            // Reads in progress add pins beyond leases; without them, equal.
            assert!(
                m.pins >= pins.get(&id).copied().unwrap_or(0),
                "pins below lease count"
            );
        }
        let b = &g.tiers[DRAM];
        let reserved: u64 = g.reservations.values().map(|sp| sp.p.rounded).sum();
        assert!(
            b.reserved_bytes >= reserved,
            "reserved bytes below open reservations"
        );
        assert_eq!(b.used, dram_used + b.reserved_bytes, "DRAM used bytes");
        assert!(b.used <= b.capacity, "DRAM over capacity");
        assert_eq!(b.blocks, dram_blocks, "DRAM block count");
        assert_eq!(g.tiers[NVME].blocks, nvme_blocks, "NVMe block count");
        // Per-namespace counts, kept incrementally, agree with the index.
        let mut counts = vec![NsCount::default(); g.ns_table.len()];
        for id in g.index.live_ids() {
            let m = g.index.get(id);
            let c = &mut counts[m.ns as usize];
            c.blocks += 1;
            c.bytes += m.len as u64;
            c.pinned += u64::from(m.pins > 0);
            for (held, t) in [(m.in_dram(), DRAM), (m.on_nvme(), NVME)] {
                if held {
                    c.tier_blocks[t] += 1;
                    c.tier_bytes[t] += m.len as u64;
                }
            }
            assert!(
                !m.is_retiring() || m.is_doomed(),
                "retiring block {:?} is not doomed",
                m.key
            );
            assert!(
                !m.is_doomed() || m.pins > 0 || m.busy(),
                "doomed block {:?} outlived its pins",
                m.key
            );
        }
        for (e, c) in g.ns_table.iter().zip(&counts) {
            assert_eq!(&e.count, c, "counts of namespace {}", e.id);
        }
        // Tenants' books agree with the index, the open reservations and
        // the namespaces (tenants.rs, "Accounting").
        let n = g.tenants.len();
        let (mut used, mut blocks) = (vec![[0u64; LOCAL_TIERS]; n], vec![[0u64; LOCAL_TIERS]; n]);
        let (mut pinned, mut writing, mut namespaces) =
            (vec![0u64; n], vec![0u64; n], vec![0u64; n]);
        for e in &g.ns_table {
            namespaces[e.tenant as usize] += 1;
        }
        for id in g.index.live_ids() {
            let m = g.index.get(id);
            let t = g.ns_table[m.ns as usize].tenant as usize;
            for (held, tier) in [(m.in_dram(), DRAM), (m.on_nvme(), NVME)] {
                if held {
                    used[t][tier] += tenant_bytes(self.granule, tier, m.len as u64);
                    blocks[t][tier] += 1;
                }
            }
            if m.pins > 0 {
                pinned[t] += self.rounded(m.len as u64);
            }
            if m.flags & FLAG_WRITING != 0 {
                writing[t] += m.len as u64;
            }
        }
        for (i, b) in g.tenants.books.iter().enumerate() {
            let mut u = used[i];
            u[DRAM] += b.reserved;
            assert_eq!(b.used, u, "bytes of tenant {}", b.name);
            assert_eq!(b.blocks, blocks[i], "blocks of tenant {}", b.name);
            assert_eq!(b.pinned, pinned[i], "pinned bytes of tenant {}", b.name);
            assert_eq!(b.writing, writing[i], "NVMe writes of tenant {}", b.name);
            assert_eq!(
                b.namespaces, namespaces[i],
                "namespaces of tenant {}",
                b.name
            );
        }
        assert_eq!(
            g.tenants.books.iter().map(|b| b.reserved).sum::<u64>(),
            b.reserved_bytes,
            "tenants' reservations"
        );
        // Summaries belong to live blocks only, and fill the region exactly.
        let mut summaries = 0u64;
        let mut summary_bytes = 0u64;
        for (id, &v) in g.summary_of.iter().enumerate() {
            if v == 0 {
                continue;
            }
            assert!(g.index.is_live(id as u32), "summary of a dead slot {id}");
            let geom = g.ns_table[g.index.get(id as u32).ns as usize]
                .geom
                .expect("a summary implies a geometry");
            summaries += 1;
            let len = self.summaries.as_ref().map_or(0, |r| r.entry_bytes(&geom));
            summary_bytes += (len as u64).div_ceil(SUMMARY_GRANULE) * SUMMARY_GRANULE;
        }
        assert_eq!(summaries, g.summary_blocks, "summary count");
        if let Some(r) = &self.summaries {
            assert_eq!(r.used_bytes(), summary_bytes, "summary region bytes");
        }
    }
}

/// What reclaiming does with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReclaimAction {
    /// Not the live copy of anything (superseded, deleted): nothing to do.
    Skip,
    /// Dropped by policy (its block lost its NVMe copy or was removed).
    Dropped,
    /// Copy the record forward, then call `finish_copy`.
    Copy(BlockRef),
    /// Copy a tombstone forward (same sequence number).
    CopyTombstone,
}

/// Why a promotion brought no bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromoteFailure {
    /// The record failed its checks: the NVMe copy is void.
    Corrupt,
    /// An I/O error or a fenced tier: this read is a miss.
    Unavailable,
}

/// Result of a stream reserve.
#[derive(Debug)]
pub enum Reserve {
    /// The key is present with the same length and checksum: skip its bytes
    /// and report `AlreadyPresent`.
    Present(BlockRef),
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
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The bytes of block `i` from its DRAM copy, verified in place and
    /// served without a copy: the returned `Bytes` keeps this guard (and so
    /// the block's pin) alive until the transport is done with it. `None`
    /// when the block has no DRAM copy (promote it first). A mismatch drops
    /// the block (counted) and is a miss. Consumers verify again on receipt,
    /// which also covers anything written into the shared arena between this
    /// check and the send.
    pub fn dram_bytes(self: &Arc<Self>, i: usize) -> Option<Result<bytes::Bytes, StoreError>> {
        let b = &self.blocks[i];
        let addr = self.store.dram_addr_of(b.r)?;
        // SAFETY: the block is pinned by this guard, so its DRAM copy stays.
        let slice = unsafe { self.store.dram.slice(addr, b.len) };
        if strata_proto::checksum(slice) != b.checksum {
            self.store.mark_corrupt(b.r, TierKind::Dram);
            return Some(Err(StoreError::Corrupt {
                field: field("keys", i),
                key: b.key,
                tier: "dram",
            }));
        }
        self.store.metrics.bytes_out[DRAM].increment(b.len);
        self.store.lock().tiers[DRAM].bytes_out += b.len;
        Some(Ok(bytes::Bytes::from_owner(PinnedBytes {
            guard: self.clone(),
            addr,
            len: b.len,
        })))
    }
}

/// A pinned block's bytes in the arena, as the owner of a `Bytes`.
struct PinnedBytes {
    guard: Arc<ReadGuard>,
    addr: u64,
    len: u64,
}

impl AsRef<[u8]> for PinnedBytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: pinned for as long as this owner (and its guard) lives; a
        // pinned block's DRAM copy is never freed.
        unsafe { self.guard.store.dram.slice(self.addr, self.len) }
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut g = self.store.lock();
        for b in &self.blocks {
            unpin(&mut g, &self.store, b.r);
        }
    }
}

/// One block of a chain pinned for Attend.
#[derive(Debug, Clone)]
pub struct ChainBlock {
    pub r: BlockRef,
    pub key: BlockKey,
    pub len: u64,
    pub checksum: u64,
    /// Arena offset of its DRAM copy (stays while pinned).
    pub dram: Option<u64>,
    /// Its NVMe record, resolved under the lock.
    pub nvme: Option<(SegFile, Loc)>,
    /// Region offset of its summary.
    pub summary: Option<u64>,
    /// What a whole-record read must find.
    pub expect: Expect,
}

/// The blocks of an Attend read, pinned until dropped.
pub struct ChainPin {
    store: Arc<Store>,
    pub blocks: Vec<ChainBlock>,
}

impl std::fmt::Debug for ChainPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainPin")
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

impl ChainPin {
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Bytes `range` of block `i`'s DRAM copy (None without one).
    pub fn dram_bytes(&self, i: usize, range: std::ops::Range<usize>) -> Option<&[u8]> {
        let b = &self.blocks[i];
        let addr = b.dram?;
        assert!(range.end as u64 <= b.len, "range past the block");
        // SAFETY: the block is pinned by this guard, so its DRAM copy stays.
        Some(unsafe {
            self.store
                .dram
                .slice(addr + range.start as u64, (range.end - range.start) as u64)
        })
    }

    /// Block `i`'s summary, read in place.
    pub fn summary(&self, i: usize, geom: Geom) -> Option<SummaryView<'_>> {
        let off = self.blocks[i].summary?;
        let region = self.store.summaries.as_ref()?;
        // SAFETY: pinned blocks keep their summaries (freed only with the
        // block, which a pin prevents).
        let bytes = unsafe { region.slice(off, region.entry_bytes(&geom)) };
        Some(SummaryView::new(region.geom(&geom), bytes))
    }

    /// Forgets the blocks from `n` on (unpinning them).
    pub fn truncate(&mut self, n: usize) {
        if n >= self.blocks.len() {
            return;
        }
        let mut g = self.store.lock();
        for b in self.blocks.drain(n..) {
            unpin(&mut g, &self.store, b.r);
        }
    }

    /// Looks again where the DRAM copies are (after a promotion).
    pub fn refresh_dram(&mut self) {
        let g = self.store.lock();
        for b in &mut self.blocks {
            b.dram = g
                .index
                .resolve(b.r)
                .filter(|m| m.in_dram() && !m.is_doomed())
                .map(|m| m.dram_addr(g.granule_shift));
        }
    }
}

impl Drop for ChainPin {
    fn drop(&mut self) {
        let mut g = self.store.lock();
        for b in &self.blocks {
            unpin(&mut g, &self.store, b.r);
        }
    }
}

// ---- helpers on the locked state --------------------------------------------

/// Whether a DRAM reservation may be refused by the tenant's quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quota {
    /// Puts and reservations: refused when the quota cannot be met.
    Enforce,
    /// Promotions: the tenant's own blocks make what room they can.
    BestEffort,
}

/// The next DRAM victim: the least recently used evictable block among
/// tenants above their share; if none, the tenant that needs the room
/// (`for_tenant`) gives up its own; the background (`None`) then stops. So
/// a tenant within its share never loses a block to another tenant.
fn pick_victim(g: &Inner, for_tenant: Option<TenantId>) -> Option<BlockId> {
    let mut best: Option<(u64, BlockId)> = None;
    for (t, b) in g.tenants.books.iter().enumerate() {
        if !b.over_share() {
            continue;
        }
        if let Some(v) = g.policy.victim(t as TenantId)
            && best.is_none_or(|bv| v.0 < bv.0)
        {
            best = Some(v);
        }
    }
    best.or_else(|| for_tenant.and_then(|t| g.policy.victim(t)))
        .map(|(_, id)| id)
}

/// Counts a DRAM eviction against the tenant of namespace ordinal `ns`.
fn count_eviction(g: &mut Inner, ns: NsOrd) {
    let t = g.ns_table[ns as usize].tenant;
    g.tenants.books[t as usize].evictions[DRAM] += 1;
}

/// Gives namespace `id` the next ordinal. Ordinals are 16 bits
/// ([`NsOrd`], to keep the index record small) and never freed while the
/// daemon runs (an evicted namespace keeps its row), so a namespace past
/// the [`MAX_NAMESPACES`]th is refused. A restart assigns them again, to
/// the layouts persisted beside the NVMe segments (which are kept for
/// good) and the namespaces of the records found there.
fn ns_insert(g: &mut Inner, id: NamespaceId, layout: Option<Layout>) -> Result<NsOrd, StoreError> {
    let Ok(ord) = NsOrd::try_from(g.ns_table.len()) else {
        return Err(StoreError::Limit {
            limit: "namespaces",
            detail: format!(
                "namespace {id} is refused: this daemon already knows {MAX_NAMESPACES} namespaces, the most its block index can tell apart (every one registered or found on NVMe since it started, evicted ones included); reuse the layouts (model, shape, tenant salt) already registered rather than minting new ones, or serve more from another daemon"
            ),
        });
    };
    let geom = layout.as_ref().and_then(Geom::of);
    let tenant = g.tenants.owner_of(layout.as_ref());
    g.tenants.books[tenant as usize].namespaces += 1;
    g.ns_table.push(NsEntry {
        id,
        layout,
        geom,
        tenant,
        count: NsCount::default(),
    });
    g.namespaces.insert(id, ord);
    Ok(ord)
}

/// Where a chain goes from a block towards its root.
enum Up {
    /// The block was stored without a parent.
    Root,
    Block(BlockId),
    /// Its parent is not stored (any more): the chain's head is unknown.
    Lost,
}

/// The parent of block `id`: through its link when that still resolves,
/// else by the hash of the key its store named (the parent was absent at
/// publish, or evicted and stored again since).
fn up(g: &Inner, id: BlockId) -> Up {
    let m = g.index.get(id);
    if m.parent_hash == 0 {
        return Up::Root;
    }
    if g.index.resolve(m.parent).is_some() {
        return Up::Block(m.parent.id);
    }
    match g.index.find_hashed(m.ns, m.parent_hash) {
        Some(p) => Up::Block(p),
        None => Up::Lost,
    }
}

fn ns_ord(g: &Inner, ns: NamespaceId) -> Result<NsOrd, StoreError> {
    g.namespaces
        .get(&ns)
        .copied()
        .ok_or(StoreError::UnknownNamespace(ns))
}

fn check_block(
    g: &Inner,
    ns: NsOrd,
    key: &BlockKey,
    parent: Option<&BlockKey>,
    len: u64,
    f: &dyn Fn(&str) -> String,
) -> Result<(), StoreError> {
    let e = &g.ns_table[ns as usize];
    let Some(layout) = &e.layout else {
        return Err(StoreError::LayoutNotRegistered(e.id));
    };
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

/// Tells DRAM's eviction policy the block's current state.
fn refresh(g: &mut Inner, id: BlockId) {
    let m = g.index.get(id);
    let c = (m.in_dram() && !m.is_doomed()).then(|| candidate(m));
    let group = g.ns_table[m.ns as usize].tenant;
    let tracked = g.policy.update(id, group, c);
    let m = g.index.get_mut(id);
    if tracked {
        m.flags |= FLAG_TRACKED;
    } else {
        m.flags &= !FLAG_TRACKED;
    }
}

/// Marks an access: a new, unique tick, and the hit flag.
fn touch(g: &mut Inner, id: BlockId) -> TierKind {
    g.tick += 1;
    let tick = g.tick;
    let m = g.index.get_mut(id);
    m.tick = tick;
    m.flags |= FLAG_HIT;
    let tier = m.tier();
    // A new tick alone never makes a block a candidate (see EvictionPolicy).
    if m.flags & FLAG_TRACKED != 0 {
        refresh(g, id);
    }
    tier
}

// Pinned blocks are counted in DRAM's book whatever tier they are in: a
// pinned block is about to be read through DRAM.
fn pin(g: &mut Inner, granule: u64, id: BlockId) {
    let m = g.index.get_mut(id);
    m.pins += 1;
    if m.pins == 1 {
        let (len, ns) = (m.len as u64, m.ns);
        let rounded = len.div_ceil(granule) * granule;
        let e = &mut g.ns_table[ns as usize];
        e.count.pinned += 1;
        g.tenants.books[e.tenant as usize].pinned += rounded;
        g.tiers[DRAM].pinned_blocks += 1;
        g.tiers[DRAM].pinned_bytes += rounded;
        refresh(g, id);
    }
}

fn unpin(g: &mut Inner, s: &Store, r: BlockRef) {
    let Some(m) = g.index.resolve_mut(r) else {
        return;
    };
    m.pins -= 1;
    if m.pins > 0 {
        return;
    }
    let (len, doomed, busy, ns) = (m.len as u64, m.is_doomed(), m.busy(), m.ns);
    let rounded = len.div_ceil(s.granule) * s.granule;
    let e = &mut g.ns_table[ns as usize];
    e.count.pinned -= 1;
    g.tenants.books[e.tenant as usize].pinned -= rounded;
    let b = &mut g.tiers[DRAM];
    b.pinned_blocks -= 1;
    b.pinned_bytes -= rounded;
    if doomed && !busy {
        remove_block(g, s, r.id);
    } else {
        refresh(g, r.id);
    }
}

fn free_pending(g: &mut Inner, dram: &DramTier, p: &Pending) {
    dram.free(p.addr, p.rounded);
    let b = &mut g.tiers[DRAM];
    b.used -= p.rounded;
    b.reserved_bytes -= p.rounded;
    unreserve(g, p);
}

/// Takes a reservation off its tenant's book (published or freed).
fn unreserve(g: &mut Inner, p: &Pending) {
    let t = &mut g.tenants.books[g.ns_table[p.ns as usize].tenant as usize];
    t.used[DRAM] -= p.rounded;
    t.reserved -= p.rounded;
}

/// Gives a block its DRAM copy at `addr` and counts its space in `used`
/// (the caller took the extent from the allocator without counting it).
fn add_dram(g: &mut Inner, granule: u64, id: BlockId, addr: u64) {
    let m = g.index.get_mut(id);
    debug_assert!(!m.in_dram());
    m.flags |= FLAG_DRAM;
    m.set_dram_addr(addr, g.granule_shift);
    let (len, parent, ns) = (m.len as u64, m.parent, m.ns);
    ns_gain(g, ns, DRAM, len);
    log_event(g, EventKind::Stored, TierKind::Dram, id);
    g.tiers[DRAM].used += len.div_ceil(granule) * granule;
    g.tiers[DRAM].blocks += 1;
    if let Some(p) = g.index.resolve_mut(parent) {
        p.dram_children += 1;
        // It may have stopped being a candidate (prefix-LRU).
        refresh(g, parent.id);
    }
    refresh(g, id);
}

/// Frees a block's DRAM copy (it keeps its NVMe copy).
fn drop_dram(g: &mut Inner, granule: u64, dram: &DramTier, id: BlockId) {
    let m = g.index.get_mut(id);
    debug_assert!(m.in_dram() && m.on_nvme());
    m.flags &= !FLAG_DRAM;
    let (len, addr, parent, ns) = (m.len as u64, m.dram_addr(g.granule_shift), m.parent, m.ns);
    ns_lose(g, ns, DRAM, len);
    let rounded = len.div_ceil(granule) * granule;
    dram.free(addr, rounded);
    g.tiers[DRAM].used -= rounded;
    g.tiers[DRAM].blocks -= 1;
    log_event(g, EventKind::Removed, TierKind::Dram, id);
    refresh(g, id);
    if let Some(p) = g.index.resolve_mut(parent) {
        p.dram_children -= 1;
        if p.dram_children == 0 {
            refresh(g, parent.id);
        }
    }
}

fn add_nvme(g: &mut Inner, id: BlockId, loc: Loc, seq: u64) {
    let m = g.index.get_mut(id);
    m.flags |= FLAG_NVME;
    m.nvme_loc = loc.0;
    m.seq = seq;
    let (ns, len) = (m.ns, m.len as u64);
    ns_gain(g, ns, NVME, len);
    g.tiers[NVME].blocks += 1;
    log_event(g, EventKind::Stored, TierKind::Nvme, id);
}

/// Forgets a block's NVMe copy without touching the tier (fenced tier).
fn clear_nvme(g: &mut Inner, id: BlockId) {
    let m = g.index.get_mut(id);
    if m.on_nvme() {
        m.flags &= !FLAG_NVME;
        let (ns, len) = (m.ns, m.len as u64);
        ns_lose(g, ns, NVME, len);
        g.tiers[NVME].blocks -= 1;
        log_event(g, EventKind::Removed, TierKind::Nvme, id);
    }
}

/// The ordinals of `only` (None: every namespace).
fn ordinals(g: &Inner, only: &[NamespaceId]) -> Option<Vec<NsOrd>> {
    (!only.is_empty()).then(|| {
        only.iter()
            .filter_map(|id| g.namespaces.get(id).copied())
            .collect()
    })
}

fn event_out(g: &Inner, e: &events::Event) -> EventOut {
    let entry = g.ns_table.get(e.ns as usize);
    let token_bytes = entry
        .and_then(|n| n.layout.as_ref())
        .map_or(0, |l| l.token_bytes());
    EventOut {
        seq: e.seq,
        kind: e.kind,
        medium: e.medium,
        namespace: entry.map_or(NamespaceId(0), |n| n.id),
        key: e.key,
        parent: e.parent,
        token_count: u64::from(e.len).checked_div(token_bytes).unwrap_or(0) as u32,
    }
}

/// Logs a residency change of block `id` for subscribers.
fn log_event(g: &mut Inner, kind: EventKind, medium: TierKind, id: BlockId) {
    let m = g.index.get(id);
    let parent = g.index.resolve(m.parent).map(|p| p.key);
    let (ns, key, len) = (m.ns, m.key, m.len);
    g.events.push(kind, medium, ns, key, parent, len);
}

/// Drops a block's NVMe copy (it keeps its DRAM copy, or is removed by the
/// caller): the record's space counts as dead from now on.
fn drop_nvme(g: &mut Inner, s: &Store, id: BlockId) {
    let m = *g.index.get(id);
    if !m.on_nvme() {
        return;
    }
    if let Some(n) = &s.nvme {
        n.release(Loc(m.nvme_loc), m.len);
    }
    clear_nvme(g, id);
}

/// Removes a block that is neither pinned nor busy (or a doomed one whose
/// last pin went) with all its copies; its parent may become evictable.
fn remove_block(g: &mut Inner, s: &Store, id: BlockId) {
    let m = *g.index.get(id);
    debug_assert!(m.pins == 0 && !m.busy(), "removing a pinned or busy block");
    if m.in_dram() {
        let rounded = s.rounded(m.len as u64);
        s.dram.free(m.dram_addr(g.granule_shift), rounded);
        g.tiers[DRAM].used -= rounded;
        g.tiers[DRAM].blocks -= 1;
        ns_lose(g, m.ns, DRAM, m.len as u64);
        log_event(g, EventKind::Removed, TierKind::Dram, id);
        if let Some(p) = g.index.resolve_mut(m.parent) {
            p.dram_children -= 1;
            if p.dram_children == 0 {
                refresh(g, m.parent.id);
            }
        }
    }
    drop_nvme(g, s, id);
    if let Some(off) = take_summary(g, id) {
        s.free_summary(g.ns_table[m.ns as usize].geom, Some(off));
    }
    g.policy.update(id, g.ns_table[m.ns as usize].tenant, None);
    g.index.remove(id);
    let c = &mut g.ns_table[m.ns as usize].count;
    c.blocks -= 1;
    c.bytes -= m.len as u64;
}

/// Counts a copy of `len` bytes in `tier` gained by a block of namespace
/// ordinal `ns`.
fn ns_gain(g: &mut Inner, ns: NsOrd, tier: usize, len: u64) {
    let e = &mut g.ns_table[ns as usize];
    e.count.tier_blocks[tier] += 1;
    e.count.tier_bytes[tier] += len;
    let bytes = tenant_bytes(g.granule, tier, len);
    let t = &mut g.tenants.books[e.tenant as usize];
    t.used[tier] += bytes;
    t.blocks[tier] += 1;
}

/// What a copy of `len` bytes in `tier` costs its tenant: DRAM in whole
/// granules (as the allocator gives it), NVMe in payload bytes.
fn tenant_bytes(granule: u64, tier: usize, len: u64) -> u64 {
    if tier == DRAM {
        len.div_ceil(granule) * granule
    } else {
        len
    }
}

/// Counts a copy of `len` bytes in `tier` lost by a block of namespace
/// ordinal `ns`.
fn ns_lose(g: &mut Inner, ns: NsOrd, tier: usize, len: u64) {
    let e = &mut g.ns_table[ns as usize];
    e.count.tier_blocks[tier] -= 1;
    e.count.tier_bytes[tier] -= len;
    let bytes = tenant_bytes(g.granule, tier, len);
    let t = &mut g.tenants.books[e.tenant as usize];
    t.used[tier] -= bytes;
    t.blocks[tier] -= 1;
}

/// Moves namespace `ns` (and what its blocks hold) to tenant `to`: a
/// namespace found on disk whose owner became known. One pass over the
/// index; the eviction policy forgets the blocks under the old group first.
fn rehome(g: &mut Inner, ns: NsOrd, to: TenantId) {
    let from = g.ns_table[ns as usize].tenant;
    let ids: Vec<BlockId> = g
        .index
        .live_ids()
        .filter(|&id| g.index.get(id).ns == ns)
        .collect();
    let granule = g.granule;
    for &id in &ids {
        g.policy.update(id, from, None);
        let m = *g.index.get(id);
        let len = m.len as u64;
        let [a, b] = [from, to].map(|t| t as usize);
        let books = &mut g.tenants.books;
        for (held, tier) in [(m.in_dram(), DRAM), (m.on_nvme(), NVME)] {
            if held {
                let bytes = tenant_bytes(granule, tier, len);
                books[a].used[tier] -= bytes;
                books[a].blocks[tier] -= 1;
                books[b].used[tier] += bytes;
                books[b].blocks[tier] += 1;
            }
        }
        if m.pins > 0 {
            let rounded = tenant_bytes(granule, DRAM, len);
            books[a].pinned -= rounded;
            books[b].pinned += rounded;
        }
        if m.flags & FLAG_WRITING != 0 {
            books[a].writing -= len;
            books[b].writing += len;
        }
    }
    g.tenants.books[from as usize].namespaces -= 1;
    g.tenants.books[to as usize].namespaces += 1;
    g.ns_table[ns as usize].tenant = to;
    for &id in &ids {
        refresh(g, id);
    }
}

/// After a transfer ends: a doomed block that nothing pins or moves any
/// more goes now; any other is handed back to the eviction policy.
fn settle(g: &mut Inner, s: &Store, id: BlockId) {
    let m = *g.index.get(id);
    if m.is_doomed() && m.pins == 0 && !m.busy() {
        remove_block(g, s, id);
    } else {
        refresh(g, id);
    }
}

/// Records the summary of block `id` (region offset), if any.
fn set_summary(g: &mut Inner, id: BlockId, summary: Option<u64>) {
    let Some(off) = summary else { return };
    let i = id as usize;
    if g.summary_of.len() <= i {
        g.summary_of.resize((i + 1).next_power_of_two(), 0);
    }
    debug_assert_eq!(g.summary_of[i], 0, "block {id} already has a summary");
    g.summary_of[i] = (off / SUMMARY_GRANULE) as u32 + 1;
    g.summary_blocks += 1;
}

fn summary_at(g: &Inner, id: BlockId) -> Option<u64> {
    match g.summary_of.get(id as usize) {
        Some(&v) if v != 0 => Some((v as u64 - 1) * SUMMARY_GRANULE),
        _ => None,
    }
}

/// Forgets block `id`'s summary and returns its offset (to free).
fn take_summary(g: &mut Inner, id: BlockId) -> Option<u64> {
    let off = summary_at(g, id)?;
    g.summary_of[id as usize] = 0;
    g.summary_blocks -= 1;
    Some(off)
}

#[cfg(test)]
mod nvme_tests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tenant_tests;
#[cfg(test)]
mod tests;

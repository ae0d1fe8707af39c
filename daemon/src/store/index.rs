//! The block index: a chunked slab of fixed-size block records and a hash
//! table of slab ids keyed by (namespace, key).
//!
//! Memory per block: the record ([`Meta`], 104 bytes, with the addresses
//! of both its DRAM and NVMe copies and its parent's key hash) plus 4
//! bytes of id and one control byte in the table at a load factor between
//! 7/16 and 7/8 (about 6-11 bytes), plus the eviction policy's 4-byte
//! position: roughly 115-120 bytes, which the benchmark measures. The slab grows in fixed
//! chunks of one 2 MiB huge page each, so it never holds more than one chunk
//! of slack (a doubling `Vec` could hold 2x); the table and the chunks live
//! on huge pages (see `huge.rs`) so that a lookup's scattered probes do not
//! each miss the TLB.
//!
//! Invariants:
//! * the table holds the id of every live record and nothing else;
//! * a record's `generation` changes whenever its slot is freed, so a
//!   [`BlockRef`] taken before a removal never reaches the slot's next
//!   occupant; it is odd while the slot is live and even while it is free
//!   (insert and remove each add one), which is how liveness is told;
//! * (namespace, key) is unique among live records.

use allocator_api2::vec::Vec as HVec;
use hashbrown::HashTable;
use strata_proto::{BlockKey, TierKind};

use super::huge::HugePages;

/// Number of tiers that hold blocks locally (GPU, DRAM, CXL, NVMe).
pub const LOCAL_TIERS: usize = 4;

/// Index of a record in the slab.
pub type BlockId = u32;

/// A namespace's ordinal in the store (its row in the store's namespace
/// table): 16 bits, to keep [`Meta`] small.
pub type NsOrd = u16;

/// Most namespaces one store can tell apart: every [`NsOrd`] value. The
/// store refuses to register (or recover) more (`store::ns_insert`).
pub const MAX_NAMESPACES: usize = 1 << NsOrd::BITS;

/// Most granules a DRAM arena may have: [`Meta`] keeps a block's DRAM
/// address as a 32-bit granule index (config validation refuses larger
/// arenas, and `Store::new` checks).
pub const MAX_DRAM_GRANULES: u64 = 1 << u32::BITS;

/// A reference that survives removal of its target: `generation` must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockRef {
    pub id: BlockId,
    pub generation: u32,
}

pub const NO_PARENT: BlockRef = BlockRef {
    id: u32::MAX,
    generation: 0,
};

// Flags of a record. (Liveness is no flag: it is the parity of
// `generation`, see [`Meta::is_live`].)
/// Retired by a namespace eviction while pinned: doomed (hidden from new
/// lookups, removed when its last pin goes) but still readable by the
/// holders of the pins it had, so a lease taken before the eviction can
/// read what its Lookup reported. Set only with [`FLAG_DOOMED`].
pub const FLAG_RETIRING: u8 = 1;
/// Failed a checksum: invisible now, removed when its last pin goes.
pub const FLAG_DOOMED: u8 = 2;
/// The DRAM eviction policy tracks this block (it is a candidate).
pub const FLAG_TRACKED: u8 = 4;
/// A copy is in the DRAM arena at [`Meta::dram_addr`].
pub const FLAG_DRAM: u8 = 8;
/// A copy is in an NVMe segment at `nvme_loc`.
pub const FLAG_NVME: u8 = 16;
/// An NVMe write of this block is in flight (demotion or write-through):
/// its DRAM copy must stay, and it is no eviction candidate.
pub const FLAG_WRITING: u8 = 32;
/// An NVMe read into DRAM is in flight.
pub const FLAG_PROMOTING: u8 = 64;
/// Looked up or read since it was stored (admission and reclaim use it).
pub const FLAG_HIT: u8 = 128;

/// One published block. Fixed size, no heap pointers. The fields a lookup
/// reads (key, flags, namespace, pins, tick) come first.
///
/// 104 bytes, no padding: key (33: its length and 32 bytes), flags, ns
/// (u16) | pins, len, dram_children, generation, dram_granule (5 x u32) |
/// tick, checksum, nvme_loc, seq, parent, parent_hash (6 x 8).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Meta {
    pub key: BlockKey,
    pub flags: u8,
    /// Namespace ordinal (at most [`MAX_NAMESPACES`] of them).
    pub ns: NsOrd,
    pub pins: u32,
    pub len: u32,
    /// Children of this block that have a DRAM copy (prefix-aware eviction).
    pub dram_children: u32,
    pub generation: u32,
    /// Arena offset in granules, valid with FLAG_DRAM: read and written in
    /// bytes through [`Meta::dram_addr`] and [`Meta::set_dram_addr`].
    pub dram_granule: u32,
    /// Logical time of the last access (monotonic, unique per access).
    pub tick: u64,
    pub checksum: u64,
    /// Segment location (`tier::nvme::Loc`), valid with FLAG_NVME.
    pub nvme_loc: u64,
    /// Sequence number of the NVMe record (newest wins at recovery).
    pub seq: u64,
    /// Parent block, when it was present at publish time (or linked at
    /// recovery); [`NO_PARENT`] otherwise.
    pub parent: BlockRef,
    /// [`Index::key_hash`] of the parent key its store named; 0 for a root
    /// (stored without a parent). Follows a chain back where `parent` no
    /// longer resolves: the parent was absent at publish, or evicted and
    /// stored again since (see [`Index::find_hashed`]).
    pub parent_hash: u64,
}

const _: () = assert!(std::mem::size_of::<Meta>() == 104);

impl Meta {
    pub fn is_doomed(&self) -> bool {
        self.flags & FLAG_DOOMED != 0
    }
    /// The slot holds a record: its generation is odd (see the module's
    /// invariants).
    fn is_live(&self) -> bool {
        self.generation & 1 == 1
    }
    /// Retired by a namespace eviction (see [`FLAG_RETIRING`]).
    pub fn is_retiring(&self) -> bool {
        self.flags & FLAG_RETIRING != 0
    }
    /// Readable by someone who pinned it (or holds a lease on it) before
    /// now: not doomed, or doomed only by retirement.
    pub fn readable_pinned(&self) -> bool {
        !self.is_doomed() || self.is_retiring()
    }
    /// Marks the block doomed because a copy failed (or is unreachable):
    /// unreadable even by pin holders.
    pub fn doom(&mut self) {
        self.flags = (self.flags | FLAG_DOOMED) & !FLAG_RETIRING;
    }
    pub fn in_dram(&self) -> bool {
        self.flags & FLAG_DRAM != 0
    }
    pub fn on_nvme(&self) -> bool {
        self.flags & FLAG_NVME != 0
    }
    /// An NVMe transfer is in flight: not evictable, not deletable.
    pub fn busy(&self) -> bool {
        self.flags & (FLAG_WRITING | FLAG_PROMOTING) != 0
    }
    /// Byte offset of the DRAM copy (valid with FLAG_DRAM) in an arena of
    /// `1 << granule_shift`-byte granules.
    #[inline]
    pub fn dram_addr(&self, granule_shift: u32) -> u64 {
        u64::from(self.dram_granule) << granule_shift
    }
    /// Sets the DRAM copy's byte offset. It is granule-aligned (extents
    /// are) and below [`MAX_DRAM_GRANULES`] granules (the arena's size is
    /// checked at start): nothing is lost, and a bug that breaks either
    /// stops here rather than point the block at other bytes.
    #[inline]
    pub fn set_dram_addr(&mut self, addr: u64, granule_shift: u32) {
        assert_eq!(
            addr & ((1 << granule_shift) - 1),
            0,
            "unaligned DRAM address {addr}"
        );
        self.dram_granule =
            u32::try_from(addr >> granule_shift).expect("DRAM address past 2^32 granules");
    }
    /// The fastest tier holding a copy.
    pub fn tier(&self) -> TierKind {
        if self.in_dram() {
            TierKind::Dram
        } else {
            TierKind::Nvme
        }
    }
}

/// Records per slab chunk: one 2 MiB huge page each.
const CHUNK: usize = super::huge::HUGE_PAGE / std::mem::size_of::<Meta>();

fn empty_meta() -> Meta {
    Meta {
        key: BlockKey::new(&[0]).expect("1-byte key"),
        flags: 0,
        ns: 0,
        pins: 0,
        len: 0,
        dram_children: 0,
        generation: 0,
        tick: 0,
        checksum: 0,
        dram_granule: 0,
        nvme_loc: 0,
        seq: 0,
        parent: NO_PARENT,
        parent_hash: 0,
    }
}

type Chunk = HVec<Meta, HugePages>;

#[derive(Debug)]
pub struct Index {
    table: HashTable<BlockId, HugePages>,
    /// Records in chunks of `CHUNK`; slots `0..used` have been handed out.
    chunks: Vec<Chunk>,
    used: usize,
    free: Vec<BlockId>,
    count: usize,
}

#[inline]
fn hash(ns: NsOrd, key: &BlockKey) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), u64::from(ns))
}

#[inline]
fn slot(chunks: &[Chunk], id: BlockId) -> &Meta {
    let i = id as usize;
    &chunks[i / CHUNK][i % CHUNK]
}

impl Index {
    pub fn with_capacity(n: usize) -> Self {
        Index {
            table: HashTable::with_capacity_in(n, HugePages),
            chunks: Vec::new(),
            used: 0,
            free: Vec::new(),
            count: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn find(&self, ns: NsOrd, key: &BlockKey) -> Option<BlockId> {
        let chunks = &self.chunks;
        self.table
            .find(hash(ns, key), |&id| {
                let m = slot(chunks, id);
                m.ns == ns && m.key == *key
            })
            .copied()
    }

    /// The hash the table files `(ns, key)` under (what a child keeps of
    /// its parent's key, [`Meta::parent_hash`]).
    pub fn key_hash(ns: NsOrd, key: &BlockKey) -> u64 {
        hash(ns, key)
    }

    /// A block of namespace `ns` whose key hashes to `h`
    /// ([`Index::key_hash`]): the parent a child named, found without its
    /// key. Two keys of one namespace with the same 64-bit hash are taken
    /// as the same (odds 2^-64 per pair, as for the table itself).
    pub fn find_hashed(&self, ns: NsOrd, h: u64) -> Option<BlockId> {
        let chunks = &self.chunks;
        self.table
            .find(h, |&id| {
                let m = slot(chunks, id);
                m.ns == ns && hash(m.ns, &m.key) == h
            })
            .copied()
    }

    /// The slot `guess`, if it holds (ns, key).
    #[inline]
    fn probe_guess(&self, guess: Option<u64>, ns: NsOrd, key: &BlockKey) -> Option<BlockId> {
        let g = guess.filter(|&g| g < self.used as u64)? as BlockId;
        let m = slot(&self.chunks, g);
        (m.is_live() && m.ns == ns && m.key == *key).then_some(g)
    }

    /// Ids of the leading run of `keys` that are present and not doomed.
    ///
    /// A chain stored in one go occupies consecutive slots, so when key 1
    /// sits right after key 0, key `i` is first looked for at slot
    /// `first + i` (checked like any probe: live, namespace and whole key),
    /// falling back to the table. Keys are resolved a window at a time with
    /// no dependency between them, so the CPU overlaps their cache misses;
    /// the walk stops after the window holding the first miss.
    pub fn find_run(&self, ns: NsOrd, keys: &[BlockKey], out: &mut Vec<BlockId>) {
        const WINDOW: usize = 32;
        let Some(k0) = keys.first() else { return };
        let Some(first) = self.find(ns, k0) else {
            return;
        };
        if slot(&self.chunks, first).is_doomed() {
            return;
        }
        out.push(first);
        let sequential = keys
            .get(1)
            .is_some_and(|k1| self.probe_guess(Some(first as u64 + 1), ns, k1).is_some());
        let mut found = [None; WINDOW];
        for (w, chunk) in keys[1..].chunks(WINDOW).enumerate() {
            for (j, k) in chunk.iter().enumerate() {
                let i = (1 + w * WINDOW + j) as u64;
                let guess = sequential.then_some(first as u64 + i);
                found[j] = self.probe_guess(guess, ns, k).or_else(|| self.find(ns, k));
            }
            for f in &found[..chunk.len()] {
                match f {
                    Some(id) if !slot(&self.chunks, *id).is_doomed() => out.push(*id),
                    _ => return,
                }
            }
        }
    }

    fn slot_mut(&mut self, id: BlockId) -> &mut Meta {
        let i = id as usize;
        &mut self.chunks[i / CHUNK][i % CHUNK]
    }

    /// Inserts a record whose (namespace, key) is absent (the caller checked).
    pub fn insert(&mut self, mut meta: Meta) -> BlockRef {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let id = BlockId::try_from(self.used).expect("more than 2^32 blocks");
                assert!(id != NO_PARENT.id, "block index full");
                if self.used.is_multiple_of(CHUNK) {
                    let mut c = HVec::with_capacity_in(CHUNK, HugePages);
                    c.resize(CHUNK, empty_meta());
                    self.chunks.push(c);
                }
                self.used += 1;
                id
            }
        };
        let old = self.slot_mut(id);
        debug_assert!(!old.is_live(), "inserting into a live slot");
        // Free slots have even generations (0 when new), so this one is
        // odd: live.
        meta.generation = old.generation.wrapping_add(1);
        *old = meta;
        let chunks = &self.chunks;
        self.table
            .insert_unique(hash(meta.ns, &meta.key), id, |&other| {
                let m = slot(chunks, other);
                hash(m.ns, &m.key)
            });
        self.count += 1;
        BlockRef {
            id,
            generation: meta.generation,
        }
    }

    /// Removes a live record and returns it.
    pub fn remove(&mut self, id: BlockId) -> Meta {
        let meta = *slot(&self.chunks, id);
        assert!(meta.is_live(), "removing a free slot");
        match self
            .table
            .find_entry(hash(meta.ns, &meta.key), |&other| other == id)
        {
            Ok(entry) => {
                entry.remove();
            }
            Err(_) => panic!("index table lost block {id}"),
        }
        let m = self.slot_mut(id);
        m.flags = 0;
        // The generation moves on now (to even: free), so refs to the old
        // record go stale even before the slot is reused.
        m.generation = meta.generation.wrapping_add(1);
        self.free.push(id);
        self.count -= 1;
        meta
    }

    pub fn get(&self, id: BlockId) -> &Meta {
        let m = slot(&self.chunks, id);
        debug_assert!(m.is_live());
        m
    }

    pub fn get_mut(&mut self, id: BlockId) -> &mut Meta {
        let m = self.slot_mut(id);
        debug_assert!(m.is_live());
        m
    }

    /// The record a ref points to, if it is still the same block.
    pub fn resolve(&self, r: BlockRef) -> Option<&Meta> {
        ((r.id as usize) < self.used)
            .then(|| slot(&self.chunks, r.id))
            .filter(|m| m.is_live() && m.generation == r.generation)
    }

    pub fn resolve_mut(&mut self, r: BlockRef) -> Option<&mut Meta> {
        if (r.id as usize) >= self.used {
            return None;
        }
        let m = self.slot_mut(r.id);
        (m.is_live() && m.generation == r.generation).then_some(m)
    }

    pub fn is_live(&self, id: BlockId) -> bool {
        (id as usize) < self.used && slot(&self.chunks, id).is_live()
    }

    pub fn ref_of(&self, id: BlockId) -> BlockRef {
        BlockRef {
            id,
            generation: slot(&self.chunks, id).generation,
        }
    }

    /// One past the highest slot ever used (ids below it may be live).
    pub fn slots(&self) -> BlockId {
        self.used as BlockId
    }

    /// Iterates live ids (for consistency checks).
    pub fn live_ids(&self) -> impl Iterator<Item = BlockId> + '_ {
        (0..self.used as BlockId).filter(|&id| slot(&self.chunks, id).is_live())
    }

    /// Heap bytes held by the index structures.
    pub fn heap_bytes(&self) -> usize {
        // hashbrown keeps capacity at 7/8 of its buckets.
        self.table.capacity() * 8 / 7 * (std::mem::size_of::<BlockId>() + 1)
            + self.chunks.len() * super::huge::HUGE_PAGE
            + self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + self.free.capacity() * std::mem::size_of::<BlockId>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(ns: NsOrd, k: u8) -> Meta {
        Meta {
            key: BlockKey::new(&[k; 8]).unwrap(),
            ns,
            ..empty_meta()
        }
    }

    /// Liveness is the generation's parity: odd from insert, even from
    /// remove, and a reused slot never answers for its earlier occupant.
    #[test]
    fn liveness_follows_the_generation() {
        let mut ix = Index::with_capacity(4);
        let a = ix.insert(meta(1, 1));
        assert_eq!(a.generation % 2, 1);
        assert!(ix.is_live(a.id) && ix.resolve(a).is_some());
        ix.get_mut(a.id).flags |= FLAG_DOOMED | FLAG_RETIRING;
        ix.remove(a.id);
        assert!(!ix.is_live(a.id) && ix.resolve(a).is_none());
        assert_eq!(ix.find(1, &meta(1, 1).key), None);
        let b = ix.insert(meta(1, 2));
        assert_eq!(b.id, a.id, "the slot is reused");
        assert_eq!(b.generation, a.generation + 2);
        assert!(ix.resolve(a).is_none());
        let m = ix.resolve(b).unwrap();
        assert!(!m.is_doomed() && !m.is_retiring(), "no flag survives reuse");
        assert_eq!(ix.live_ids().collect::<Vec<_>>(), [b.id]);
        assert_eq!(ix.find(1, &meta(1, 2).key), Some(b.id));
    }

    /// The DRAM address is kept in granules and read back in bytes, up to
    /// the last granule of the largest arena allowed.
    #[test]
    fn dram_address_round_trips_in_granules() {
        let mut m = empty_meta();
        for shift in [4, 12, 26] {
            for g in [0, 1, 12345, MAX_DRAM_GRANULES - 1] {
                m.set_dram_addr(g << shift, shift);
                assert_eq!(m.dram_addr(shift), g << shift);
            }
        }
    }

    #[test]
    #[should_panic(expected = "past 2^32 granules")]
    fn dram_address_past_the_limit_is_refused() {
        empty_meta().set_dram_addr(MAX_DRAM_GRANULES << 12, 12);
    }

    #[test]
    #[should_panic(expected = "unaligned")]
    fn unaligned_dram_address_is_refused() {
        empty_meta().set_dram_addr(4096 + 16, 12);
    }
}

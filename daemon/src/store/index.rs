//! The block index: a slab of fixed-size block records and a hash table of
//! slab ids keyed by (namespace, key).
//!
//! Memory per block is the record ([`Meta`], 104 bytes), one liveness byte,
//! and 4 bytes of id plus one control byte in the table at a load factor
//! between 7/16 and 7/8: about 111-117 bytes per block, which the benchmark
//! measures.
//!
//! Invariants:
//! * the table holds the id of every live record and nothing else;
//! * a record's `generation` changes whenever its slot is freed, so a [`BlockRef`]
//!   taken before a removal never reaches the slot's next occupant;
//! * (namespace, key) is unique among live records.

use hashbrown::HashTable;
use strata_proto::{BlockKey, TierKind};

/// Number of tiers that hold blocks locally (GPU, DRAM, CXL, NVMe).
pub const LOCAL_TIERS: usize = 4;

/// Index of a record in the slab.
pub type BlockId = u32;

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

/// Flags of a record.
pub const FLAG_DOOMED: u8 = 1;

/// One published block. Fixed size, no heap pointers.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub key: BlockKey,
    pub tier: TierKind,
    pub flags: u8,
    pub ns: u32,
    pub generation: u32,
    pub len: u32,
    pub pins: u32,
    /// Parent block, when it was present at publish time.
    pub parent: BlockRef,
    /// Present children per local tier, by [`TierKind::index`].
    pub children: [u32; LOCAL_TIERS],
    pub checksum: u64,
    /// Logical time of the last access (monotonic, unique per access).
    pub tick: u64,
    /// Address within the tier (arena offset for memory tiers).
    pub addr: u64,
}

const _: () = assert!(std::mem::size_of::<Meta>() <= 104);

impl Meta {
    pub fn is_doomed(&self) -> bool {
        self.flags & FLAG_DOOMED != 0
    }
    pub fn children_in_own_tier(&self) -> u32 {
        self.children[self.tier.index()]
    }
}

#[derive(Debug, Default)]
pub struct Index {
    table: HashTable<BlockId>,
    slab: Vec<Meta>,
    /// Generation of every slab slot, live or free (kept apart from `slab`
    /// so that a freed slot keeps counting).
    live: Vec<bool>,
    free: Vec<BlockId>,
    count: usize,
}

#[inline]
fn hash(ns: u32, key: &BlockKey) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), ns as u64)
}

impl Index {
    pub fn with_capacity(n: usize) -> Self {
        Index {
            table: HashTable::with_capacity(n),
            slab: Vec::with_capacity(n),
            live: Vec::with_capacity(n),
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

    pub fn find(&self, ns: u32, key: &BlockKey) -> Option<BlockId> {
        let slab = &self.slab;
        self.table
            .find(hash(ns, key), |&id| {
                let m = &slab[id as usize];
                m.ns == ns && m.key == *key
            })
            .copied()
    }

    /// Inserts a record whose (namespace, key) is absent (the caller checked).
    pub fn insert(&mut self, mut meta: Meta) -> BlockRef {
        let id = match self.free.pop() {
            Some(id) => {
                meta.generation = self.slab[id as usize].generation.wrapping_add(1);
                self.slab[id as usize] = meta;
                self.live[id as usize] = true;
                id
            }
            None => {
                let id = BlockId::try_from(self.slab.len()).expect("more than 2^32 blocks");
                assert!(id != NO_PARENT.id, "block index full");
                meta.generation = 1;
                self.slab.push(meta);
                self.live.push(true);
                id
            }
        };
        let slab = &self.slab;
        let h = hash(meta.ns, &meta.key);
        self.table.insert_unique(h, id, |&other| {
            let m = &slab[other as usize];
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
        assert!(self.live[id as usize], "removing a free slot");
        let meta = self.slab[id as usize];
        let h = hash(meta.ns, &meta.key);
        match self.table.find_entry(h, |&other| other == id) {
            Ok(entry) => {
                entry.remove();
            }
            Err(_) => panic!("index table lost block {id}"),
        }
        self.live[id as usize] = false;
        // The generation moves on now, so refs to the old record go stale
        // even before the slot is reused.
        self.slab[id as usize].generation = meta.generation.wrapping_add(1);
        self.free.push(id);
        self.count -= 1;
        meta
    }

    pub fn get(&self, id: BlockId) -> &Meta {
        debug_assert!(self.live[id as usize]);
        &self.slab[id as usize]
    }

    pub fn get_mut(&mut self, id: BlockId) -> &mut Meta {
        debug_assert!(self.live[id as usize]);
        &mut self.slab[id as usize]
    }

    /// The record a ref points to, if it is still the same block.
    pub fn resolve(&self, r: BlockRef) -> Option<&Meta> {
        let i = r.id as usize;
        (i < self.slab.len() && self.live[i] && self.slab[i].generation == r.generation)
            .then(|| &self.slab[i])
    }

    pub fn resolve_mut(&mut self, r: BlockRef) -> Option<&mut Meta> {
        let i = r.id as usize;
        if i < self.slab.len() && self.live[i] && self.slab[i].generation == r.generation {
            Some(&mut self.slab[i])
        } else {
            None
        }
    }

    pub fn is_live(&self, id: BlockId) -> bool {
        self.live.get(id as usize).copied().unwrap_or(false)
    }

    pub fn ref_of(&self, id: BlockId) -> BlockRef {
        BlockRef {
            id,
            generation: self.slab[id as usize].generation,
        }
    }

    /// Iterates live ids (for compaction and consistency checks).
    pub fn live_ids(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.live
            .iter()
            .enumerate()
            .filter(|(_, l)| **l)
            .map(|(i, _)| i as BlockId)
    }

    /// Heap bytes held by the index structures.
    pub fn heap_bytes(&self) -> usize {
        // hashbrown keeps capacity at 7/8 of its buckets.
        self.table.capacity() * 8 / 7 * (std::mem::size_of::<BlockId>() + 1)
            + self.slab.capacity() * std::mem::size_of::<Meta>()
            + self.live.capacity()
            + self.free.capacity() * std::mem::size_of::<BlockId>()
    }
}

//! Eviction policies: plug-ins that choose which block of a tier goes next.
//!
//! A policy sees only ids, access ticks, pin state and child counts (through
//! [`Candidate`]); it never touches a tier or a byte. The store tells it when a
//! block may have become evictable ([`EvictionPolicy::notify`]) and asks it
//! for victims; the store then removes or demotes the victim.
//!
//! Both policies here keep a min-heap of `(tick, id)` with lazy deletion: an
//! entry is valid only while the block is live, evictable under the policy's
//! rule, and still has that tick. The store notifies on every change that can
//! make a block evictable or change its tick, so the smallest valid entry is
//! always the true victim; stale entries are skipped, and the heap is
//! compacted when stale entries outnumber live blocks.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::index::BlockId;

/// What a policy may know about a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub tick: u64,
    /// Held by a lease or an in-progress read: never evicted.
    pub pinned: bool,
    /// Children of this block present in the same tier.
    pub children_in_tier: u32,
}

/// The store's answers about blocks of the tier being evicted from.
pub trait CandidateSource {
    /// `None` when the block is gone (or lives in another tier).
    fn candidate(&self, id: BlockId) -> Option<Candidate>;
    /// Live blocks in the tier.
    fn live_blocks(&self) -> usize;
}

pub trait EvictionPolicy: Send {
    fn name(&self) -> &'static str;
    /// The block was published, touched, unpinned, or lost a child: it may
    /// be evictable now, with this state. `src` lets the policy drop stale
    /// bookkeeping, so its memory stays proportional to the live blocks.
    fn notify(&mut self, id: BlockId, c: Candidate, src: &dyn CandidateSource);
    /// The next victim under the policy, or `None` if no block is evictable.
    /// The returned block is evictable per `src` at the time of the call.
    fn victim(&mut self, src: &dyn CandidateSource) -> Option<BlockId>;
    /// Heap bytes held by the policy.
    fn heap_bytes(&self) -> usize;
}

/// Which policy a tier uses (chosen in config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionKind {
    /// Default: evict the tail of a chain before its head; among blocks with
    /// no children in the tier, the least recently used first.
    PrefixLru,
    /// Plain LRU over all unpinned blocks, ignoring chains.
    Lru,
}

impl EvictionKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "prefix-lru" => Some(EvictionKind::PrefixLru),
            "lru" => Some(EvictionKind::Lru),
            _ => None,
        }
    }

    pub fn build(self) -> Box<dyn EvictionPolicy> {
        match self {
            EvictionKind::PrefixLru => Box::new(LazyHeap::new("prefix-lru", true)),
            EvictionKind::Lru => Box::new(LazyHeap::new("lru", false)),
        }
    }
}

struct LazyHeap {
    name: &'static str,
    leaves_only: bool,
    heap: BinaryHeap<Reverse<(u64, BlockId)>>,
}

impl LazyHeap {
    fn new(name: &'static str, leaves_only: bool) -> Self {
        LazyHeap {
            name,
            leaves_only,
            heap: BinaryHeap::new(),
        }
    }

    fn eligible(&self, c: &Candidate) -> bool {
        !c.pinned && (!self.leaves_only || c.children_in_tier == 0)
    }

    fn valid(&self, src: &dyn CandidateSource, tick: u64, id: BlockId) -> bool {
        src.candidate(id)
            .is_some_and(|c| c.tick == tick && self.eligible(&c))
    }

    fn compact(&mut self, src: &dyn CandidateSource) {
        let entries = std::mem::take(&mut self.heap).into_vec();
        let mut kept: Vec<_> = entries
            .into_iter()
            .filter(|Reverse((t, id))| self.valid(src, *t, *id))
            .collect();
        kept.sort_unstable();
        kept.dedup();
        self.heap = BinaryHeap::from(kept);
    }
}

impl EvictionPolicy for LazyHeap {
    fn name(&self) -> &'static str {
        self.name
    }

    fn notify(&mut self, id: BlockId, c: Candidate, src: &dyn CandidateSource) {
        if self.eligible(&c) {
            self.heap.push(Reverse((c.tick, id)));
            if self.heap.len() > 2 * src.live_blocks() + 1024 {
                self.compact(src);
            }
        }
    }

    fn victim(&mut self, src: &dyn CandidateSource) -> Option<BlockId> {
        while let Some(Reverse((tick, id))) = self.heap.pop() {
            if self.valid(src, tick, id) {
                return Some(id);
            }
        }
        None
    }

    fn heap_bytes(&self) -> usize {
        self.heap.capacity() * std::mem::size_of::<Reverse<(u64, BlockId)>>()
    }
}

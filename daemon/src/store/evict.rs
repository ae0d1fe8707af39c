//! Eviction policies: plug-ins that choose which block of a tier goes next.
//!
//! A policy sees only block ids and [`Candidate`] states (access tick, pin
//! state, children in the tier); it never touches a tier or a byte. The
//! store calls [`EvictionPolicy::update`] after every change to a block of
//! the tier (publish, touch, pin, unpin, a child added or removed, removal),
//! and asks for the [`victim`](EvictionPolicy::victim), which it then
//! removes or demotes (and reports with `update(id, None)`).
//!
//! Both policies here keep an indexed binary min-heap of `(tick, id)` over
//! exactly the blocks that are evictable under the policy's rule, with each
//! block's heap position in a side table: updates are O(log n), there are no
//! stale entries and so no compaction pauses, and memory is 4 bytes per
//! block slot plus 16 per candidate. Ticks are unique, so the order is total
//! and deterministic: the property test checks it against a plain model.

use allocator_api2::vec::Vec as HVec;

use super::huge::HugePages;
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

pub trait EvictionPolicy: Send {
    fn name(&self) -> &'static str;
    /// The block's state changed; `None` when it is no longer in the tier
    /// (removed, doomed, moved). Returns whether the policy now tracks the
    /// block: the store skips telling it about a touch (a new tick only) of
    /// a block it does not track, since a tick alone never makes a block a
    /// candidate. That keeps Lookup of long chains off the policy's tables.
    fn update(&mut self, id: BlockId, c: Option<Candidate>) -> bool;
    /// The next victim (not removed from the policy: the store evicts it
    /// and then calls `update(id, None)`), or `None` if nothing is evictable.
    fn victim(&self) -> Option<BlockId>;
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
            EvictionKind::PrefixLru => Box::new(IndexedHeap::new("prefix-lru", true)),
            EvictionKind::Lru => Box::new(IndexedHeap::new("lru", false)),
        }
    }
}

const ABSENT: u32 = u32::MAX;

struct IndexedHeap {
    name: &'static str,
    leaves_only: bool,
    /// Min-heap of (tick, id).
    heap: HVec<(u64, BlockId), HugePages>,
    /// Position of each block id in `heap`, or ABSENT.
    pos: HVec<u32, HugePages>,
}

impl IndexedHeap {
    fn new(name: &'static str, leaves_only: bool) -> Self {
        IndexedHeap {
            name,
            leaves_only,
            heap: HVec::new_in(HugePages),
            pos: HVec::new_in(HugePages),
        }
    }

    fn eligible(&self, c: &Candidate) -> bool {
        !c.pinned && (!self.leaves_only || c.children_in_tier == 0)
    }

    fn place(&mut self, i: usize) {
        self.pos[self.heap[i].1 as usize] = i as u32;
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let p = (i - 1) / 2;
            if self.heap[p].0 <= self.heap[i].0 {
                break;
            }
            self.heap.swap(p, i);
            self.place(i);
            i = p;
        }
        self.place(i);
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.heap.len();
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut m = i;
            if l < n && self.heap[l].0 < self.heap[m].0 {
                m = l;
            }
            if r < n && self.heap[r].0 < self.heap[m].0 {
                m = r;
            }
            if m == i {
                break;
            }
            self.heap.swap(m, i);
            self.place(i);
            i = m;
        }
        self.place(i);
    }

    fn remove_at(&mut self, i: usize) {
        let id = self.heap[i].1;
        let last = self.heap.len() - 1;
        self.heap.swap(i, last);
        self.heap.pop();
        self.pos[id as usize] = ABSENT;
        if i < self.heap.len() {
            self.place(i);
            self.sift_down(i);
            self.sift_up(i);
        }
    }
}

impl EvictionPolicy for IndexedHeap {
    fn name(&self) -> &'static str {
        self.name
    }

    fn update(&mut self, id: BlockId, c: Option<Candidate>) -> bool {
        let slot = id as usize;
        if slot >= self.pos.len() {
            if c.is_none() {
                return false;
            }
            self.pos.resize(slot + 1, ABSENT);
        }
        let at = self.pos[slot];
        match c.filter(|c| self.eligible(c)) {
            Some(c) if at == ABSENT => {
                self.heap.push((c.tick, id));
                self.sift_up(self.heap.len() - 1);
                true
            }
            Some(c) => {
                let i = at as usize;
                let old = self.heap[i].0;
                self.heap[i].0 = c.tick;
                if c.tick < old {
                    self.sift_up(i);
                } else {
                    self.sift_down(i);
                }
                true
            }
            None if at != ABSENT => {
                self.remove_at(at as usize);
                false
            }
            None => false,
        }
    }

    fn victim(&self) -> Option<BlockId> {
        self.heap.first().map(|&(_, id)| id)
    }

    fn heap_bytes(&self) -> usize {
        self.heap.capacity() * std::mem::size_of::<(u64, BlockId)>()
            + self.pos.capacity() * std::mem::size_of::<u32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    proptest! {
        /// The heap's victim is always the eligible block with the least tick.
        #[test]
        fn victim_is_min_eligible(ops in proptest::collection::vec((0u32..40, 0u64..1000, any::<bool>(), 0u32..2, any::<bool>()), 1..400)) {
            let mut h = IndexedHeap::new("t", true);
            let mut model: BTreeMap<u32, Candidate> = BTreeMap::new();
            for (tick, (id, _t, pinned, children, remove)) in ops.into_iter().enumerate() {
                let tick = tick as u64 + 1;
                if remove {
                    h.update(id, None);
                    model.remove(&id);
                } else {
                    let c = Candidate { tick, pinned, children_in_tier: children };
                    h.update(id, Some(c));
                    model.insert(id, c);
                }
                let want = model
                    .iter()
                    .filter(|(_, c)| !c.pinned && c.children_in_tier == 0)
                    .min_by_key(|(_, c)| c.tick)
                    .map(|(id, _)| *id);
                prop_assert_eq!(h.victim(), want);
            }
        }
    }
}

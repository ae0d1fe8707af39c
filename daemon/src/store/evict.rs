//! Eviction policies: plug-ins that choose which block of a tier goes next.
//!
//! A policy sees only block ids, the group a block belongs to (its
//! namespace's tenant) and [`Candidate`] states (access tick, pin state,
//! children in the tier); it never touches a tier or a byte. The store calls
//! [`EvictionPolicy::update`] after every change to a block of the tier
//! (publish, touch, pin, unpin, a child added or removed, removal), and asks
//! a group for its [`victim`](EvictionPolicy::victim), which it then removes
//! or demotes (and reports with `update(id, group, None)`). Which group
//! gives up a block is the store's decision (the tenants' shares:
//! `tenants.rs`); the order within a group is the policy's.
//!
//! Both policies here keep, per group, an indexed binary min-heap of
//! `(tick, id)` over exactly the group's blocks that are evictable under the
//! policy's rule, with each block's heap position in one side table shared
//! by the groups: updates are O(log n), there are no stale entries and so no
//! compaction pauses, and memory is 4 bytes per block slot plus 16 per
//! candidate, whatever the number of groups. Ticks are unique, so the order
//! is total and deterministic: the property test checks it against a plain
//! model.

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
    /// (removed, doomed, moved). `group` is the block's group; a block
    /// stays in one group while the policy tracks it (the store reports it
    /// gone before moving it to another). Returns whether the policy now
    /// tracks the block: the store skips telling it about a touch (a new
    /// tick only) of a block it does not track, since a tick alone never
    /// makes a block a candidate. That keeps Lookup of long chains off the
    /// policy's tables.
    fn update(&mut self, id: BlockId, group: u32, c: Option<Candidate>) -> bool;
    /// The next victim of `group` and its tick (not removed from the policy:
    /// the store evicts it and then calls `update(id, group, None)`), or
    /// `None` if nothing of the group is evictable.
    fn victim(&self, group: u32) -> Option<(u64, BlockId)>;
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
    /// Per group, a min-heap of (tick, id).
    heaps: Vec<HVec<(u64, BlockId), HugePages>>,
    /// Position of each block id in its group's heap, or ABSENT.
    pos: HVec<u32, HugePages>,
}

impl IndexedHeap {
    fn new(name: &'static str, leaves_only: bool) -> Self {
        IndexedHeap {
            name,
            leaves_only,
            heaps: Vec::new(),
            pos: HVec::new_in(HugePages),
        }
    }

    fn eligible(&self, c: &Candidate) -> bool {
        !c.pinned && (!self.leaves_only || c.children_in_tier == 0)
    }

    fn heap_mut(&mut self, group: u32) -> &mut HVec<(u64, BlockId), HugePages> {
        let g = group as usize;
        if g >= self.heaps.len() {
            self.heaps.resize_with(g + 1, || HVec::new_in(HugePages));
        }
        &mut self.heaps[g]
    }

    fn sift_up(&mut self, group: u32, mut i: usize) {
        let (heap, pos) = (&mut self.heaps[group as usize], &mut self.pos);
        while i > 0 {
            let p = (i - 1) / 2;
            if heap[p].0 <= heap[i].0 {
                break;
            }
            heap.swap(p, i);
            pos[heap[i].1 as usize] = i as u32;
            i = p;
        }
        pos[heap[i].1 as usize] = i as u32;
    }

    fn sift_down(&mut self, group: u32, mut i: usize) {
        let (heap, pos) = (&mut self.heaps[group as usize], &mut self.pos);
        let n = heap.len();
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut m = i;
            if l < n && heap[l].0 < heap[m].0 {
                m = l;
            }
            if r < n && heap[r].0 < heap[m].0 {
                m = r;
            }
            if m == i {
                break;
            }
            heap.swap(m, i);
            pos[heap[i].1 as usize] = i as u32;
            i = m;
        }
        pos[heap[i].1 as usize] = i as u32;
    }

    fn remove_at(&mut self, group: u32, i: usize) {
        let heap = &mut self.heaps[group as usize];
        let id = heap[i].1;
        let last = heap.len() - 1;
        heap.swap(i, last);
        heap.pop();
        self.pos[id as usize] = ABSENT;
        if i < self.heaps[group as usize].len() {
            self.sift_down(group, i);
            self.sift_up(group, i);
        }
    }
}

impl EvictionPolicy for IndexedHeap {
    fn name(&self) -> &'static str {
        self.name
    }

    fn update(&mut self, id: BlockId, group: u32, c: Option<Candidate>) -> bool {
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
                let heap = self.heap_mut(group);
                heap.push((c.tick, id));
                let last = heap.len() - 1;
                self.sift_up(group, last);
                true
            }
            Some(c) => {
                let i = at as usize;
                let entry = &mut self.heaps[group as usize][i];
                debug_assert_eq!(entry.1, id, "block {id} tracked in another group");
                let old = entry.0;
                entry.0 = c.tick;
                if c.tick < old {
                    self.sift_up(group, i);
                } else {
                    self.sift_down(group, i);
                }
                true
            }
            None if at != ABSENT => {
                self.remove_at(group, at as usize);
                false
            }
            None => false,
        }
    }

    fn victim(&self, group: u32) -> Option<(u64, BlockId)> {
        self.heaps.get(group as usize)?.first().copied()
    }

    fn heap_bytes(&self) -> usize {
        self.heaps
            .iter()
            .map(|h| h.capacity() * std::mem::size_of::<(u64, BlockId)>())
            .sum::<usize>()
            + self.pos.capacity() * std::mem::size_of::<u32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    proptest! {
        /// Each group's victim is always its eligible block with the least
        /// tick, whatever the other groups do.
        #[test]
        fn victim_is_min_eligible_per_group(ops in proptest::collection::vec((0u32..40, 0u32..3, any::<bool>(), 0u32..2, any::<bool>()), 1..400)) {
            let mut h = IndexedHeap::new("t", true);
            // id -> (group, candidate); a block keeps its group while tracked.
            let mut model: BTreeMap<u32, (u32, Candidate)> = BTreeMap::new();
            for (tick, (id, group, pinned, children, remove)) in ops.into_iter().enumerate() {
                let tick = tick as u64 + 1;
                let group = model.get(&id).map_or(group, |&(g, _)| g);
                if remove {
                    h.update(id, group, None);
                    model.remove(&id);
                } else {
                    let c = Candidate { tick, pinned, children_in_tier: children };
                    h.update(id, group, Some(c));
                    model.insert(id, (group, c));
                }
                for g in 0..3 {
                    let want = model
                        .iter()
                        .filter(|(_, (mg, c))| *mg == g && !c.pinned && c.children_in_tier == 0)
                        .min_by_key(|(_, (_, c))| c.tick)
                        .map(|(id, (_, c))| (c.tick, *id));
                    prop_assert_eq!(h.victim(g), want);
                }
            }
        }
    }
}

//! Operator calls on the store: per-namespace statistics, evicting a
//! namespace, reading a namespace out (export), and the write-down of a
//! drain. Same rules as the rest of the store: planned under the lock,
//! I/O outside it (`tiering.rs`).
//!
//! Evicting a namespace keeps invariant 3 (a pinned block is never freed,
//! and a block a lease reported can be read until the lease ends): blocks
//! neither pinned nor busy are removed at once; the others are *retired*:
//! doomed (hidden from every new lookup and read) but still readable by the
//! pins and leases they had, and removed when the last pin or transfer
//! ends. The eviction is one pass under the lock, so that its sequence
//! mark (`Evicted::seq`: records of the namespace below it are void after
//! a restart) separates exactly the blocks it removed from those stored
//! after it.

use std::sync::Arc;

use strata_proto::{Layout, NamespaceId, TierKind};

use super::index::{BlockId, FLAG_DOOMED, FLAG_RETIRING};
use super::{
    DRAM, NVME, ReadBlock, ReadGuard, Store, StoreError, WriteJob, ns_ord, pin, refresh,
    remove_block,
};

/// What one namespace holds.
#[derive(Debug, Clone)]
pub struct NamespaceStats {
    pub id: NamespaceId,
    /// The owning tenant (`tenants.rs`).
    pub tenant: super::TenantId,
    pub tenant_name: Arc<str>,
    /// None: known only from records found at start, layout not persisted.
    pub layout: Option<Layout>,
    /// Distinct blocks and the sum of their lengths.
    pub blocks: u64,
    pub bytes: u64,
    pub pinned_blocks: u64,
    /// (tier, blocks with a copy there, their bytes), for tiers with copies.
    pub tiers: Vec<(TierKind, u64, u64)>,
}

/// The outcome of evicting a namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Blocks removed now, and the sum of their lengths.
    pub blocks: u64,
    pub bytes: u64,
    /// Blocks retired (pinned or busy): removed when their last pin goes.
    pub retired: u64,
    /// Records of the namespace with a lower sequence number are void
    /// (persist it beside the segments: `NvmeTier::persist_eviction`).
    pub seq: u64,
}

/// Slots examined per lock hold by the batched scans (export, drain).
const SCAN_SLOTS: u32 = 1 << 16;

impl Store {
    /// Every namespace with what it holds, in id order.
    pub fn namespace_stats(&self) -> Vec<NamespaceStats> {
        let g = self.lock();
        let mut out: Vec<_> = g
            .ns_table
            .iter()
            .map(|e| {
                let c = &e.count;
                NamespaceStats {
                    id: e.id,
                    tenant: e.tenant,
                    tenant_name: g.tenants.books[e.tenant as usize].name.clone(),
                    layout: e.layout.clone(),
                    blocks: c.blocks,
                    bytes: c.bytes,
                    pinned_blocks: c.pinned,
                    tiers: [(TierKind::Dram, DRAM), (TierKind::Nvme, NVME)]
                        .into_iter()
                        .filter(|&(_, t)| c.tier_blocks[t] > 0)
                        .map(|(k, t)| (k, c.tier_blocks[t], c.tier_bytes[t]))
                        .collect(),
                }
            })
            .collect();
        out.sort_by_key(|n| n.id.0);
        out
    }

    /// One namespace's layout (None if not registered) and what it holds
    /// now (blocks, bytes).
    pub fn namespace_summary(
        &self,
        ns: NamespaceId,
    ) -> Result<(Option<Layout>, u64, u64), StoreError> {
        let g = self.lock();
        let o = ns_ord(&g, ns)?;
        let e = &g.ns_table[o as usize];
        Ok((e.layout.clone(), e.count.blocks, e.count.bytes))
    }

    /// Removes every block of namespace `ns` from every tier; pinned or
    /// busy ones are retired (see the module documentation). One pass over
    /// the index under the lock.
    pub fn evict_namespace(&self, ns: NamespaceId) -> Result<Evicted, StoreError> {
        let mut g = self.lock();
        let g = &mut *g;
        let o = ns_ord(g, ns)?;
        let ids: Vec<BlockId> = g
            .index
            .live_ids()
            .filter(|&id| g.index.get(id).ns == o)
            .collect();
        let mut out = Evicted::default();
        for id in ids {
            let m = *g.index.get(id);
            if m.pins > 0 || m.busy() {
                if !m.is_doomed() {
                    // Already-doomed blocks (a failed copy) stay unreadable.
                    let mm = g.index.get_mut(id);
                    mm.flags |= FLAG_DOOMED | FLAG_RETIRING;
                    refresh(g, id);
                    out.retired += 1;
                }
                continue;
            }
            out.blocks += 1;
            out.bytes += m.len as u64;
            remove_block(g, self, id);
        }
        // Every record of the namespace written so far has a lower number;
        // every record written from now on, a higher one.
        out.seq = g.seq;
        g.seq += 1;
        self.metrics.namespace_evictions.increment(1);
        self.metrics.evicted_namespace_blocks.increment(out.blocks);
        Ok(out)
    }

    /// Pins the next blocks of namespace `ns` for reading, scanning slots
    /// from `from` on (at most [`SCAN_SLOTS`] per call): up to `max_blocks`
    /// blocks and about `max_bytes` bytes. Returns the pinned blocks and
    /// the slot to continue from (None when the index is done). Blocks are
    /// not touched: an export does not make a namespace hot.
    pub fn pin_namespace_batch(
        self: &Arc<Self>,
        ns: NamespaceId,
        from: u32,
        max_blocks: usize,
        max_bytes: u64,
    ) -> Result<(ReadGuard, Option<u32>), StoreError> {
        let mut g = self.lock();
        let g = &mut *g;
        let o = ns_ord(g, ns)?;
        let end = g.index.slots();
        let stop = from.saturating_add(SCAN_SLOTS).min(end);
        let mut blocks = Vec::new();
        let mut bytes = 0u64;
        let mut id = from;
        while id < stop && blocks.len() < max_blocks && bytes < max_bytes {
            if g.index.is_live(id) {
                let m = *g.index.get(id);
                if m.ns == o && !m.is_doomed() {
                    pin(g, self.granule, id);
                    bytes += m.len as u64;
                    blocks.push(ReadBlock {
                        r: g.index.ref_of(id),
                        key: m.key,
                        parent: g.index.resolve(m.parent).map(|p| p.key),
                        len: m.len as u64,
                        checksum: m.checksum,
                    });
                }
            }
            id += 1;
        }
        let guard = ReadGuard {
            store: self.clone(),
            blocks,
        };
        Ok((guard, (id < end).then_some(id)))
    }

    /// Blocks (and bytes) held only in DRAM: no NVMe copy and no write of
    /// one in flight. What a drain must write down, or loses.
    pub fn dram_only(&self) -> (u64, u64) {
        let g = self.lock();
        let mut n = (0, 0);
        for id in g.index.live_ids() {
            let m = g.index.get(id);
            if m.in_dram() && !m.on_nvme() && !m.busy() && !m.is_doomed() {
                n.0 += 1;
                n.1 += m.len as u64;
            }
        }
        n
    }

    /// Drain: plans the NVMe write of every block held only in DRAM, from
    /// slot `from` on (at most `max` jobs and [`SCAN_SLOTS`] slots per
    /// call), whatever the admission filter and the write budget say; the
    /// DRAM copies stay. Returns the jobs and the slot to continue from.
    pub fn plan_flush(&self, from: u32, max: usize) -> (Vec<WriteJob>, Option<u32>) {
        if self.nvme.as_ref().is_none_or(|n| n.is_fenced()) {
            return (Vec::new(), None);
        }
        let mut g = self.lock();
        let g = &mut *g;
        let end = g.index.slots();
        let stop = from.saturating_add(SCAN_SLOTS).min(end);
        let mut jobs = Vec::new();
        let mut id = from;
        while id < stop && jobs.len() < max {
            if g.index.is_live(id) {
                let m = g.index.get(id);
                if m.in_dram() && !m.on_nvme() && !m.busy() && !m.is_doomed() {
                    jobs.push(self.start_write(g, id, true));
                }
            }
            id += 1;
        }
        (jobs, (id < end).then_some(id))
    }
}

//! Sketch runs: a chain's key sketches of one layer, copied channel-major
//! so that SparF's channel scan streams.
//!
//! A block's sketch lives in its summary entry (`[layers][kv][d][tpb]`
//! codes, [`super::summary`]); scoring a 16K-token chain from those reads
//! the r chosen rows of each of 1,024 entries, scattered over the region:
//! about 20 cache lines per block, latency-bound (2026-11-29: ~0.6 µs a
//! block even with the rows prefetched four blocks ahead, and SparF near
//! the data stuck at ~4× shipping the KV over 2 GB/s). A run holds the same
//! codes laid out per chain: for each KV head and channel one row over all
//! the run's tokens, and each block's box (f16 bits) in rows over blocks:
//!
//! ```text
//! codes [kv][d][cap * tpb]  u8
//! lo    [kv][d][cap]        f16 bits (the summaries' bounds, as stored)
//! hi    [kv][d][cap]        f16 bits
//! ```
//!
//! so a chosen channel's codes are one contiguous stretch and
//! `strata_kernels::sketch::run_scores` streams them, giving bit for bit
//! the scores of the per-block path.
//!
//! A run is derived, ranking-only data like the sketch it copies: SparF
//! attends the chosen tokens from the stored, verified K and V, so a stale
//! run could change the choice, never the values. It is still kept exact:
//! it records each block's (key, checksum, length) and is used only for the
//! prefix of the pinned chain that matches, block for block; the rest is
//! re-copied from the current summaries.
//!
//! Runs are found by the key of their last block: a call probes its chain's
//! keys from the tail backwards (a decode step appends a block every
//! `tpb` tokens, so the run of the previous step is found within a few
//! probes) and re-registers the run under its new tail after extending it.
//! Two chains that share a prefix (one system prompt, several
//! continuations) get a run each.
//!
//! Memory: one pre-sized region (`compute.sketch_runs_bytes`), touched at
//! start, that never grows. A run takes `kv * d * cap * (tpb + 4)` bytes
//! (31% of the layer's f16 K+V at tpb 16), with room for decode growth.
//! When the region is full, runs not used for [`IDLE`] are dropped, oldest
//! first; runs in use are never dropped for new ones (a decode step cycles
//! over every layer of every sequence, which would make LRU drop each run
//! just before its next use): a chain that finds no room is scored block by
//! block, as without runs, and counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};
use metrics::{Counter, Gauge};
use strata_kernels::sketch::SketchRun;
use strata_proto::{BlockKey, NamespaceId};

use super::summary::{Geom, SummaryView};
use crate::metrics::Registry;
use crate::store::ChainBlock;
use crate::tier::alloc::ExtentAllocator;

/// A run not used for this long may be dropped to make room.
pub const IDLE: Duration = Duration::from_secs(2);
/// Tail positions a call probes for its chain's run.
const PROBES: usize = 64;
/// Blocks a run's rows grow by (and its headroom at creation).
const GROW_BLOCKS: usize = 64;
/// Allocation unit of the region.
const GRANULE: u64 = 4096;

/// Identity of a block as a run records it: a block re-put under the same
/// key with other bytes has another checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockId {
    key: BlockKey,
    checksum: u64,
    len: u64,
}

impl BlockId {
    fn of(b: &ChainBlock) -> Self {
        BlockId {
            key: b.key,
            checksum: b.checksum,
            len: b.len,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TailKey {
    ns: NamespaceId,
    layer: u32,
    tail: BlockKey,
}

struct Run {
    geom: Geom,
    layer: u32,
    ns: NamespaceId,
    blocks: Vec<BlockId>,
    /// Blocks the rows have room for; 0 once dropped.
    cap: usize,
    offset: u64,
    used: Instant,
}

impl Run {
    /// Bytes of its extent.
    fn bytes(&self) -> u64 {
        run_bytes(&self.geom, self.cap)
    }

    fn tail(&self) -> Option<TailKey> {
        self.blocks.last().map(|b| TailKey {
            ns: self.ns,
            layer: self.layer,
            tail: b.key,
        })
    }
}

/// Bytes of a run of `cap` blocks.
fn run_bytes(g: &Geom, cap: usize) -> u64 {
    let rows = g.kv_heads as u64 * g.head_dim as u64;
    rows * cap as u64 * (g.tokens_per_block as u64 + 4)
}

/// Counters of what runs did (`strata_attend_sketch_run_blocks_total`).
#[derive(Clone)]
pub struct RunMetrics {
    /// Blocks scored from a run as it was.
    pub reused: Counter,
    /// Blocks copied into a run from their summaries.
    pub copied: Counter,
    /// Blocks scored block by block because the region had no room.
    pub no_room: Counter,
    pub used_bytes: Gauge,
}

impl RunMetrics {
    pub fn new(r: &Registry) -> Self {
        let c = |what| {
            r.counter(
                "strata_attend_sketch_run_blocks_total",
                "SPARF blocks by what their chain's sketch run did: reused as it was, copied from the block's summary, or no_room (scored from the summary)",
                &[("result", what)],
            )
        };
        RunMetrics {
            reused: c("reused"),
            copied: c("copied"),
            no_room: c("no_room"),
            used_bytes: r.gauge_labelled(
                "strata_attend_sketch_runs_bytes",
                "Bytes of the sketch-run region held by runs",
                &[],
            ),
        }
    }
}

/// The region and the runs in it.
pub struct SketchRuns {
    map: MmapRaw,
    len: u64,
    alloc: Mutex<ExtentAllocator>,
    by_tail: Mutex<HashMap<TailKey, Arc<Mutex<Run>>>>,
    metrics: RunMetrics,
}

impl std::fmt::Debug for SketchRuns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SketchRuns")
            .field("len", &self.len)
            .finish()
    }
}

/// A run brought up to date for one call: its first `covered` blocks are
/// the pinned chain's.
pub struct RunView<'a> {
    runs: &'a SketchRuns,
    run: &'a Run,
    pub covered: usize,
}

impl RunView<'_> {
    /// KV head `h`'s rows, for `strata_kernels::sketch::run_scores`.
    pub fn head(&self, h: usize) -> SketchRun<'_> {
        let run = self.run;
        let (d, tpb) = (
            run.geom.head_dim as usize,
            run.geom.tokens_per_block as usize,
        );
        let kv = run.geom.kv_heads as usize;
        let cap = run.cap;
        let codes_len = kv * d * cap * tpb;
        let bounds_len = kv * d * cap;
        // SAFETY: the run owns its extent (allocated for it, freed only
        // when it is dropped, which needs its lock, held by this view).
        let bytes = unsafe { self.runs.slice(run.offset, run.bytes() as usize) };
        let codes = &bytes[h * d * cap * tpb..(h + 1) * d * cap * tpb];
        let (lo, hi) = bytes[codes_len..codes_len + 4 * bounds_len].split_at(2 * bounds_len);
        let (lo, hi) = (as_u16(lo), as_u16(hi));
        SketchRun {
            codes,
            lo: &lo[h * d * cap..(h + 1) * d * cap],
            hi: &hi[h * d * cap..(h + 1) * d * cap],
            cap,
            tpb,
        }
    }
}

impl SketchRuns {
    /// A region of `bytes`, touched now (first-touch faults are slow on
    /// the machines we run on, and a run is written on an Attend's path).
    pub fn new(bytes: u64, metrics: RunMetrics) -> std::io::Result<Self> {
        let len = bytes / GRANULE * GRANULE;
        let map = MmapOptions::new()
            .len(len.max(GRANULE) as usize)
            .populate()
            .map_anon()?;
        Ok(SketchRuns {
            map: MmapRaw::from(map),
            len,
            alloc: Mutex::new(ExtentAllocator::new(len, GRANULE)),
            by_tail: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.len
    }

    fn allocator(&self) -> std::sync::MutexGuard<'_, ExtentAllocator> {
        // A poisoned allocator cannot be trusted not to hand out an extent
        // twice: stop.
        self.alloc.lock().expect("sketch-run allocator poisoned")
    }

    /// Bytes held by runs.
    pub fn used_bytes(&self) -> u64 {
        let a = self.allocator();
        a.capacity_bytes() - a.free_bytes()
    }

    /// # Safety
    /// The extent is a run's, and the caller holds that run's lock.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, offset: u64, len: usize) -> &mut [u8] {
        assert!(offset + len as u64 <= self.len, "sketch run out of bounds");
        // SAFETY: in bounds; exclusivity per the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(offset as usize), len) }
    }

    /// # Safety
    /// As for [`Self::slice_mut`].
    unsafe fn slice(&self, offset: u64, len: usize) -> &[u8] {
        assert!(offset + len as u64 <= self.len, "sketch run out of bounds");
        // SAFETY: in bounds; per the caller's contract.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset as usize), len) }
    }

    /// Calls `f` with the run of the chain `blocks[..present]` (layer
    /// `layer` of namespace `ns`), found or made and brought up to date:
    /// its first `covered` blocks are `blocks[..covered]`, each a full
    /// block with a sketch and finite bounds. `summary(i)` is block `i`'s
    /// summary. None (and `f` is not called) when the chain's first block
    /// cannot be covered (no sketch, a partial block) or the region has no
    /// room for a new run.
    #[allow(clippy::too_many_arguments)]
    pub fn with_run<'s, R>(
        &self,
        ns: NamespaceId,
        layer: u32,
        geom: Geom,
        blocks: &[ChainBlock],
        present: usize,
        tokens: &[u32],
        summary: impl Fn(usize) -> Option<SummaryView<'s>>,
        f: impl FnOnce(RunView<'_>) -> R,
    ) -> Option<R> {
        let tpb = geom.tokens_per_block;
        // Only whole blocks are scored from a run: the chain's leading
        // blocks attended in full (a last block attended in part, or
        // holding fewer tokens, is scored from its entry).
        let whole = tokens[..present].iter().take_while(|&&t| t == tpb).count();
        if whole == 0 {
            return None;
        }
        let run_arc = match self.find(ns, layer, blocks, present) {
            Some(r) => r,
            None => {
                let cap = present.next_multiple_of(GROW_BLOCKS) + GROW_BLOCKS;
                let bytes = run_bytes(&geom, cap);
                let Some(offset) = self.allocate(bytes) else {
                    self.metrics.no_room.increment(present as u64);
                    return None;
                };
                Arc::new(Mutex::new(Run {
                    geom,
                    layer,
                    ns,
                    blocks: Vec::new(),
                    cap,
                    offset,
                    used: Instant::now(),
                }))
            }
        };
        // Whoever locks a run brings it up to date; one dropped meanwhile
        // (cap 0) is not used.
        let mut run = run_arc.lock().expect("sketch run poisoned");
        if run.cap == 0 || run.geom != geom {
            return None;
        }
        let old_tail = run.tail();
        let matching = run
            .blocks
            .iter()
            .zip(&blocks[..present])
            .take_while(|(a, b)| **a == BlockId::of(b))
            .count();
        if matching < run.blocks.len() && matching < present {
            // A block differs from the one the run copied: it and what
            // follows are copied again from the current summaries.
            run.blocks.truncate(matching);
        }
        let reused = matching.min(whole);
        self.metrics.reused.increment(reused as u64);
        // Extended only from its end (a call over a shorter stretch of the
        // run's chain leaves the run's longer prefix as it is).
        let mut end = reused;
        while end < whole && end == run.blocks.len() {
            if blocks[end].len != geom.token_bytes() * tpb as u64 {
                break;
            }
            let Some(view) = summary(end) else { break };
            if !view.has_sketch() {
                break;
            }
            if end >= run.cap && !self.grow(&mut run, end + 1) {
                self.metrics.no_room.increment((present - end) as u64);
                break;
            }
            if !self.copy_block(&run, &view, end) {
                break;
            }
            run.blocks.push(BlockId::of(&blocks[end]));
            end += 1;
        }
        self.metrics.copied.increment((end - reused) as u64);
        run.used = Instant::now();
        let new_tail = run.tail();
        if old_tail != new_tail || old_tail.is_none() {
            let mut m = self.by_tail.lock().expect("sketch-run map poisoned");
            if let Some(t) = old_tail
                && m.get(&t).is_some_and(|r| Arc::ptr_eq(r, &run_arc))
            {
                m.remove(&t);
            }
            match new_tail {
                // Another run already ends at this block (two calls made
                // the same chain's run at once): keep that one, free this.
                Some(t) if m.get(&t).is_some_and(|r| !Arc::ptr_eq(r, &run_arc)) => {
                    drop(m);
                    self.free_locked(&mut run);
                    return None;
                }
                Some(t) => {
                    m.insert(t, run_arc.clone());
                }
                None => {
                    drop(m);
                    self.free_locked(&mut run);
                    return None;
                }
            }
        }
        self.metrics.used_bytes.set(self.used_bytes() as f64);
        // Not empty (an empty run was freed above), and whole >= 1.
        let covered = run.blocks.len().min(whole);
        Some(f(RunView {
            runs: self,
            run: &run,
            covered,
        }))
    }

    /// The registered run whose tail is one of the chain's last keys.
    fn find(
        &self,
        ns: NamespaceId,
        layer: u32,
        blocks: &[ChainBlock],
        present: usize,
    ) -> Option<Arc<Mutex<Run>>> {
        let m = self.by_tail.lock().expect("sketch-run map poisoned");
        (present.saturating_sub(PROBES)..present)
            .rev()
            .find_map(|i| {
                m.get(&TailKey {
                    ns,
                    layer,
                    tail: blocks[i].key,
                })
                .cloned()
            })
    }

    /// An extent of `bytes`, dropping idle runs (oldest first) if needed.
    fn allocate(&self, bytes: u64) -> Option<u64> {
        if let Some(o) = self.allocator().allocate(bytes) {
            return Some(o);
        }
        let mut idle: Vec<(Instant, Arc<Mutex<Run>>)> = {
            let m = self.by_tail.lock().expect("sketch-run map poisoned");
            m.values()
                .filter_map(|r| {
                    let g = r.try_lock().ok()?;
                    (g.cap > 0 && g.used.elapsed() >= IDLE).then(|| (g.used, r.clone()))
                })
                .collect()
        };
        idle.sort_by_key(|(t, _)| *t);
        for (_, r) in idle {
            self.drop_run(&r);
            if let Some(o) = self.allocator().allocate(bytes) {
                return Some(o);
            }
        }
        None
    }

    /// Frees a run's extent and unregisters it (unless it is in use: then
    /// nothing happens).
    fn drop_run(&self, r: &Arc<Mutex<Run>>) {
        let Ok(mut g) = r.try_lock() else { return };
        if g.cap == 0 {
            return;
        }
        if let Some(t) = g.tail() {
            let mut m = self.by_tail.lock().expect("sketch-run map poisoned");
            if m.get(&t).is_some_and(|x| Arc::ptr_eq(x, r)) {
                m.remove(&t);
            }
        }
        self.free_locked(&mut g);
    }

    /// Frees the extent of a run whose lock the caller holds (and which is
    /// not registered, or is being unregistered).
    fn free_locked(&self, run: &mut Run) {
        if run.cap == 0 {
            return;
        }
        self.allocator().free(run.offset, run.bytes());
        run.cap = 0;
        run.blocks.clear();
        self.metrics.used_bytes.set(self.used_bytes() as f64);
    }

    /// Moves `run` into an extent with room for at least `blocks` blocks.
    fn grow(&self, run: &mut Run, blocks: usize) -> bool {
        let cap = (blocks.max(run.cap + run.cap / 4)).next_multiple_of(GROW_BLOCKS);
        let bytes = run_bytes(&run.geom, cap);
        let Some(offset) = self.allocate(bytes) else {
            return false;
        };
        let g = run.geom;
        let (rows, tpb) = (
            (g.kv_heads * g.head_dim) as usize,
            g.tokens_per_block as usize,
        );
        let n = run.blocks.len();
        // SAFETY: the old extent is the run's (its lock is held by the
        // caller) and the new one was just allocated for it.
        let (old, new) = unsafe {
            (
                self.slice(run.offset, run.bytes() as usize),
                self.slice_mut(offset, bytes as usize),
            )
        };
        let (old_codes, new_codes) = (rows * run.cap * tpb, rows * cap * tpb);
        for row in 0..rows {
            new[row * cap * tpb..][..n * tpb]
                .copy_from_slice(&old[row * run.cap * tpb..][..n * tpb]);
        }
        for half in 0..2 {
            for row in 0..rows {
                let from = old_codes + 2 * (half * rows * run.cap + row * run.cap);
                let to = new_codes + 2 * (half * rows * cap + row * cap);
                new[to..to + 2 * n].copy_from_slice(&old[from..from + 2 * n]);
            }
        }
        self.allocator().free(run.offset, run.bytes());
        (run.offset, run.cap) = (offset, cap);
        true
    }

    /// Copies block `i`'s sketch and bounds (every KV head of the run's
    /// layer) into the run's rows; false when a bound is not finite (the
    /// run ends before such a block: `run_scores` assumes finite boxes).
    fn copy_block(&self, run: &Run, view: &SummaryView<'_>, i: usize) -> bool {
        let g = run.geom;
        let (d, kv, tpb) = (
            g.head_dim as usize,
            g.kv_heads as usize,
            g.tokens_per_block as usize,
        );
        let cap = run.cap;
        let codes_len = kv * d * cap * tpb;
        // SAFETY: the run's extent; its lock is held by the caller.
        let bytes = unsafe { self.slice_mut(run.offset, run.bytes() as usize) };
        for h in 0..kv {
            let Some(sk) = view.sketch(run.layer, h as u32) else {
                return false;
            };
            for c in 0..d {
                let (lo, hi) = view.bound(run.layer, h as u32, c);
                if !lo.is_finite() || !hi.is_finite() {
                    return false;
                }
                let row = h * d + c;
                bytes[row * cap * tpb + i * tpb..][..tpb]
                    .copy_from_slice(&sk[c * tpb..(c + 1) * tpb]);
                let at = codes_len + 2 * (row * cap + i);
                bytes[at..at + 2].copy_from_slice(&lo.to_bits().to_le_bytes());
                let at = codes_len + 2 * (kv * d * cap + row * cap + i);
                bytes[at..at + 2].copy_from_slice(&hi.to_bits().to_le_bytes());
            }
        }
        true
    }
}

/// Bytes as u16 (the bounds' f16 bits, little-endian like the host).
fn as_u16(b: &[u8]) -> &[u16] {
    // SAFETY: u16 has no invalid bit patterns; an extent is granule-aligned
    // and the codes before the bounds are an even number of bytes.
    let (pre, mid, post) = unsafe { b.align_to::<u16>() };
    assert!(
        pre.is_empty() && post.is_empty(),
        "sketch run bounds misaligned"
    );
    mid
}

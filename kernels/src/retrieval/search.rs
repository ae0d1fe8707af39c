//! Best-first beam search over the graph.
//!
//! From the seeds, the best unexpanded candidate is expanded: each of its
//! neighbours not seen before in this search is scored (one inner product:
//! one key *scanned*) and enters the candidate list when the list holds
//! fewer than `ef` or it beats the list's worst. The search stops when the
//! best unexpanded candidate is worse than the worst of a full list; the
//! list's best `k` are the answer. Ties order by the lower id, so a search
//! is deterministic.
//!
//! `Metric::L2` (used when inserting keys) scores `2 q.k - |k|^2`, which
//! orders keys by L2 distance to `q`.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use super::{Expand, NONE, RetrievalIndex};
use crate::simd;

/// What a search ranks keys by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Metric {
    /// `q.k` (attention).
    InnerProduct,
    /// `2 q.k - |k|^2` (nearness of keys, for the backbone).
    L2,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Cand {
    pub(crate) s: f32,
    pub(crate) id: u32,
}

impl Eq for Cand {}

impl Ord for Cand {
    /// Greater = better: higher score, then lower id.
    fn cmp(&self, o: &Self) -> Ordering {
        self.s.total_cmp(&o.s).then(o.id.cmp(&self.id))
    }
}

impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Per-thread scratch of searches over one index (or several: it grows to
/// the largest). Reused across calls, so a search allocates only when an
/// index has grown.
#[derive(Debug, Default)]
pub struct SearchScratch {
    /// `visited[t] == epoch` when key `t` was scored in this search.
    visited: Vec<u32>,
    epoch: u32,
    cand: BinaryHeap<Cand>,
    res: BinaryHeap<Reverse<Cand>>,
    buf: Vec<u32>,
    route: Vec<f32>,
    ridx: Vec<u32>,
    rval: Vec<f32>,
    pub(crate) out: Vec<Cand>,
}

impl SearchScratch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Memory held, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.visited.capacity() * 4
            + (self.cand.capacity() + self.res.capacity() + self.out.capacity()) * 8
            + self.buf.capacity() * 4
            + (self.route.capacity() + self.ridx.capacity() + self.rval.capacity()) * 4
    }

    fn begin(&mut self, n: usize) {
        if self.visited.len() < n {
            self.visited.resize(n, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.visited.fill(0);
            self.epoch = 1;
        }
        self.cand.clear();
        self.res.clear();
        self.out.clear();
    }
}

impl RetrievalIndex {
    /// Seeds of a search for `q`: the entries of the `probe` routing
    /// centres with the highest `q.c`. Returns the centres scored.
    pub(crate) fn route(
        &self,
        q: &[f32],
        probe: usize,
        scratch: &mut SearchScratch,
        seeds: &mut Vec<u32>,
    ) -> usize {
        let nc = self.route_centres.rows;
        seeds.clear();
        if nc == 0 {
            return 0;
        }
        let probe = probe.clamp(1, nc);
        scratch.route.resize(nc, 0.0);
        super::dense::scores(q, 1, &self.route_centres, 1.0, &mut scratch.route, nc);
        scratch.ridx.resize(probe, 0);
        scratch.rval.resize(probe, 0.0);
        let got = crate::topk::top_k(&scratch.route, probe, &mut scratch.ridx, &mut scratch.rval);
        let rk = self.route_entries.len() / nc;
        for &c in &scratch.ridx[..got] {
            for &e in &self.route_entries[c as usize * rk..(c as usize + 1) * rk] {
                if e != NONE && !seeds.contains(&e) {
                    seeds.push(e);
                }
            }
        }
        nc
    }

    /// Beam search for `q` from `seeds`; the best `k` land in
    /// `scratch.out` (best first). Returns the keys scanned.
    pub(crate) fn beam(
        &self,
        q: &[f32],
        seeds: &[u32],
        k: usize,
        ef: usize,
        metric: Metric,
        scratch: &mut SearchScratch,
    ) -> usize {
        #[cfg(target_arch = "x86_64")]
        if simd::avx2_fma() && self.d.is_multiple_of(8) {
            // SAFETY: the CPU has AVX2+FMA+F16C (checked).
            return unsafe { self.beam_avx2(q, seeds, k, ef, metric, scratch) };
        }
        self.beam_impl::<false>(q, seeds, k, ef, metric, scratch)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn beam_avx2(
        &self,
        q: &[f32],
        seeds: &[u32],
        k: usize,
        ef: usize,
        metric: Metric,
        scratch: &mut SearchScratch,
    ) -> usize {
        self.beam_impl::<true>(q, seeds, k, ef, metric, scratch)
    }

    #[inline(always)]
    fn beam_impl<const FMA: bool>(
        &self,
        q: &[f32],
        seeds: &[u32],
        k: usize,
        ef: usize,
        metric: Metric,
        scratch: &mut SearchScratch,
    ) -> usize {
        let d = self.d;
        let n = self.len();
        let keys = &self.keys;
        let norms = &self.norms;
        scratch.begin(n);
        let epoch = scratch.epoch;
        let SearchScratch {
            visited,
            cand,
            res,
            buf,
            out,
            ..
        } = scratch;
        let sc = Scorer {
            q,
            keys,
            norms,
            d,
            metric,
            ef,
        };
        let mut scanned = 0usize;
        buf.clear();
        for &s in seeds {
            if (s as usize) < n && visited[s as usize] != epoch {
                visited[s as usize] = epoch;
                buf.push(s);
            }
        }
        scanned += sc.offer::<FMA>(buf, cand, res);
        while let Some(c) = cand.pop() {
            if res.len() >= ef
                && let Some(Reverse(worst)) = res.peek()
                && c < *worst
            {
                break;
            }
            buf.clear();
            let row = match self.expand {
                Expand::All => self.graph.row(c.id as usize),
                Expand::ColdBackbone => self.graph.warm_row(c.id as usize),
            };
            for &u in row {
                if u != NONE && visited[u as usize] != epoch {
                    visited[u as usize] = epoch;
                    buf.push(u);
                }
            }
            // Prefetch the rows about to be read: they are the misses that
            // dominate a search.
            #[cfg(target_arch = "x86_64")]
            for &u in buf.iter() {
                let p = keys[u as usize * d..].as_ptr() as *const i8;
                // SAFETY: a prefetch never faults; the address is in `keys`.
                unsafe {
                    std::arch::x86_64::_mm_prefetch(p, std::arch::x86_64::_MM_HINT_T0);
                    std::arch::x86_64::_mm_prefetch(
                        p.wrapping_add(256),
                        std::arch::x86_64::_MM_HINT_T0,
                    );
                }
            }
            scanned += sc.offer::<FMA>(buf, cand, res);
        }
        out.clear();
        out.extend(res.drain().map(|Reverse(c)| c));
        out.sort_unstable_by(|a, b| b.cmp(a));
        out.truncate(k);
        scanned
    }
}

/// Scores keys for one search (a struct, not a closure, so that it is
/// inlined into the AVX2 function and its `mul_add`s become FMAs).
struct Scorer<'a> {
    q: &'a [f32],
    keys: &'a [f32],
    norms: &'a [f32],
    d: usize,
    metric: Metric,
    ef: usize,
}

impl Scorer<'_> {
    #[inline(always)]
    fn row(&self, t: u32) -> &[f32] {
        &self.keys[t as usize * self.d..(t as usize + 1) * self.d]
    }

    #[inline(always)]
    fn finish(&self, dotp: f32, t: u32) -> Cand {
        let s = match self.metric {
            Metric::InnerProduct => dotp,
            Metric::L2 => 2.0 * dotp - self.norms[t as usize],
        };
        Cand { s, id: t }
    }

    /// Scores `buf`'s keys and offers each to the lists; returns how many.
    #[inline(always)]
    fn offer<const FMA: bool>(
        &self,
        buf: &[u32],
        cand: &mut BinaryHeap<Cand>,
        res: &mut BinaryHeap<Reverse<Cand>>,
    ) -> usize {
        let mut i = 0;
        while i + 4 <= buf.len() {
            let ids = [buf[i], buf[i + 1], buf[i + 2], buf[i + 3]];
            let s = super::dense::dot_rows::<FMA>(
                self.q,
                [
                    self.row(ids[0]),
                    self.row(ids[1]),
                    self.row(ids[2]),
                    self.row(ids[3]),
                ],
            );
            for j in 0..4 {
                push(self.finish(s[j], ids[j]), self.ef, cand, res);
            }
            i += 4;
        }
        for &t in &buf[i..] {
            push(
                self.finish(simd::dot::<FMA>(self.q, self.row(t)), t),
                self.ef,
                cand,
                res,
            );
        }
        buf.len()
    }
}

#[inline(always)]
fn push(c: Cand, ef: usize, cand: &mut BinaryHeap<Cand>, res: &mut BinaryHeap<Reverse<Cand>>) {
    if res.len() < ef {
        res.push(Reverse(c));
        cand.push(c);
    } else if let Some(Reverse(worst)) = res.peek()
        && c > *worst
    {
        res.pop();
        res.push(Reverse(c));
        cand.push(c);
    }
}

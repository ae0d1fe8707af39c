//! Incremental inserts: new keys (tokens leaving the engine's window) are
//! linked into the graph without a rebuild.
//!
//! For each new key `x`, in order:
//! * **backbone**: an L2 beam search from the previous key and a few fixed
//!   keys finds `x`'s nearest keys; they are occlusion-pruned into `x`'s
//!   backbone, and `x` enters each neighbour's list where it has room or is
//!   nearer than that list's farthest member;
//! * **co-retrieval**: the index keeps a strided sample of the training
//!   queries ([`IndexConfig::insert_queries`]) with their current top-k
//!   lists. Every kept query whose list `x` would enter (`q.x` above its
//!   k-th score) takes `x` in, dropping its last; `x`'s co-retrieval
//!   neighbours are the keys most frequent in those lists, and `x` is added
//!   to the insert slots of the best of them, so that a search reaching
//!   that group of keys reaches `x`.
//!
//! The lists stay exact for the kept queries, so later inserts link to
//! earlier ones. Edges learnt from training queries that were not kept do
//! not change; that is why a quarter of new keys calls for a rebuild
//! ([`RetrievalIndex::needs_rebuild`]).

use super::dense;
use super::search::{Metric, SearchScratch};
use super::{NONE, RetrievalIndex};

/// Training queries kept for inserts, with their top lists (best first).
#[derive(Debug, Clone, Default)]
pub(crate) struct TrainSet {
    /// `[m][d]`, packed for the kernel.
    q: dense::Packed,
    k: usize,
    /// `[m][k]`, `NONE`-padded.
    ids: Vec<u32>,
    /// `[m][k]`, `-inf`-padded.
    sc: Vec<f32>,
}

impl TrainSet {
    /// Keeps at most `max` of the `queries` (evenly strided) with their lists.
    pub(crate) fn keep(
        queries: &[f32],
        ids: &[u32],
        sc: &[f32],
        d: usize,
        k: usize,
        max: usize,
    ) -> Self {
        let m = queries.len() / d;
        let keep = m.min(max);
        let mut t = Self {
            q: dense::Packed::new(&[], d),
            k,
            ids: Vec::with_capacity(keep * k),
            sc: Vec::with_capacity(keep * k),
        };
        for i in 0..keep {
            let j = i * m / keep;
            t.q.push(&queries[j * d..(j + 1) * d]);
            t.ids.extend_from_slice(&ids[j * k..(j + 1) * k]);
            t.sc.extend_from_slice(&sc[j * k..(j + 1) * k]);
        }
        t
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.q.memory_bytes() + (self.ids.capacity() + self.sc.capacity()) * 4
    }

    fn len(&self) -> usize {
        self.ids.len().checked_div(self.k).unwrap_or(0)
    }

    /// Enters `x` with score `s` into list `j` if it beats the last entry.
    fn offer(&mut self, j: usize, x: u32, s: f32) -> bool {
        let k = self.k;
        let (ids, sc) = (
            &mut self.ids[j * k..(j + 1) * k],
            &mut self.sc[j * k..(j + 1) * k],
        );
        // NaN never enters (finite keys and queries give none).
        if s.is_nan() || s <= sc[k - 1] {
            return false;
        }
        // Position: after every entry at least as good (ties to the older id).
        let pos = sc.partition_point(|&v| v >= s);
        ids.copy_within(pos..k - 1, pos + 1);
        sc.copy_within(pos..k - 1, pos + 1);
        ids[pos] = x;
        sc[pos] = s;
        true
    }
}

/// Keys inserted per block of training-query scores.
const BLOCK: usize = 64;
/// Candidate list of an insert's backbone search.
const INSERT_EF: usize = 64;
/// Insert slots of co-retrieval neighbours that receive a new key.
const REVERSE_LINKS: usize = 16;

impl RetrievalIndex {
    pub(crate) fn insert_f32(&mut self, new: &[f32]) {
        let d = self.d;
        let b = new.len() / d;
        let mq = self.train.len();
        let mut scratch = SearchScratch::new();
        let mut s = vec![0.0f32; BLOCK * mq];
        let mut hit_lists: Vec<u32> = Vec::new();
        let mut count: Vec<u32> = Vec::new();
        let mut touched: Vec<u32> = Vec::new();
        for (blk, xs) in new.chunks(BLOCK * d).enumerate() {
            let rows = xs.len() / d;
            if mq > 0 {
                dense::scores(xs, rows, &self.train.q, 1.0, &mut s, mq);
            }
            for r in 0..rows {
                let x = &xs[r * d..(r + 1) * d];
                let t = self.len() as u32;
                self.keys.extend_from_slice(x);
                self.norms.push(dense::dot(x, x));
                self.graph.grow(t as usize + 1);
                self.link_backbone(t, &mut scratch);
                hit_lists.clear();
                for j in 0..mq {
                    if self.train.offer(j, t, s[r * mq + j]) {
                        hit_lists.push(j as u32);
                    }
                }
                self.link_co(t, &hit_lists, &mut count, &mut touched);
            }
            debug_assert!(blk * BLOCK + rows <= b);
        }
    }

    /// Backbone edges of the new key `t` and back to it.
    fn link_backbone(&mut self, t: u32, scratch: &mut SearchScratch) {
        let d = self.d;
        let deg = self.graph.b;
        if deg == 0 || t == 0 {
            return;
        }
        let n = t as usize; // keys before t
        // Seeds: the previous key (positions near in time are often near in
        // key space) and a few keys spread over the index.
        let mut seeds: Vec<u32> = vec![t - 1];
        seeds.extend((0..8).map(|i| (i * n / 8) as u32));
        let x: Vec<f32> = self.keys[t as usize * d..(t as usize + 1) * d].to_vec();
        let cand = self.graph.b.max(self.cfg.backbone_candidates);
        self.beam(&x, &seeds, cand, INSERT_EF.max(cand), Metric::L2, scratch);
        let cands: Vec<u32> = scratch
            .out
            .iter()
            .map(|c| c.id)
            .filter(|&u| u != t)
            .collect();
        let row = |u: u32| &self.keys[u as usize * d..(u as usize + 1) * d];
        let norms = &self.norms;
        let dist = |a: u32, b: u32| {
            norms[a as usize] + norms[b as usize] - 2.0 * dense::dot(row(a), row(b))
        };
        let mut kept: Vec<u32> = Vec::with_capacity(deg);
        for &c in &cands {
            if kept.len() == deg {
                break;
            }
            let dc = dist(c, t);
            if kept.iter().all(|&s| dist(c, s) > dc) {
                kept.push(c);
            }
        }
        // Back edges: into a free slot, or in place of the farthest member
        // when the new key is nearer.
        let mut back: Vec<(u32, usize)> = Vec::new();
        for &u in &kept {
            let list = self.graph.backbone(u as usize);
            if let Some(free) = list.iter().position(|&v| v == NONE) {
                back.push((u, free));
                continue;
            }
            let (far, far_d) = list
                .iter()
                .enumerate()
                .map(|(i, &v)| (i, dist(u, v)))
                .fold((0, f32::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a });
            if dist(u, t) < far_d {
                back.push((u, far));
            }
        }
        let row_t = self.graph.backbone_mut(t as usize);
        row_t[..kept.len()].copy_from_slice(&kept);
        for (u, slot) in back {
            self.graph.backbone_mut(u as usize)[slot] = t;
        }
        // An edge every search follows (backbone edges of warm keys are
        // skipped under `Expand::ColdBackbone`), so the key stays reachable.
        if let Some(&nearest) = kept.first() {
            self.graph.push_insert(nearest as usize, t);
        }
    }

    /// Co-retrieval edges of the new key `t` from the kept lists it entered.
    fn link_co(&mut self, t: u32, hit_lists: &[u32], count: &mut Vec<u32>, touched: &mut Vec<u32>) {
        let deg = self.graph.c;
        if deg == 0 || hit_lists.is_empty() {
            return;
        }
        let n = self.len();
        if count.len() < n {
            count.resize(n, 0);
        }
        let k = self.train.k;
        for &j in hit_lists {
            for &u in &self.train.ids[j as usize * k..(j as usize + 1) * k] {
                if u == NONE || u == t {
                    continue;
                }
                if count[u as usize] == 0 {
                    touched.push(u);
                }
                count[u as usize] += 1;
            }
        }
        let by = |a: &u32, b: &u32| count[*b as usize].cmp(&count[*a as usize]).then(a.cmp(b));
        touched.sort_by(by);
        let chosen: Vec<u32> = touched.iter().take(deg).copied().collect();
        for &u in touched.iter() {
            count[u as usize] = 0;
        }
        touched.clear();
        self.graph.co_mut(t as usize)[..chosen.len()].copy_from_slice(&chosen);
        for &u in chosen.iter().take(REVERSE_LINKS) {
            self.graph.push_insert(u as usize, t);
        }
    }
}

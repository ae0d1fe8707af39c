//! Building the graph: the key-kNN backbone, the co-retrieval edges from
//! training queries, and the routing table of entry points.
//!
//! * **Backbone** (L2 between keys, [`IndexConfig::backbone_degree`]
//!   neighbours): keys are partitioned by k-means into clusters of about
//!   [`IndexConfig::cluster_keys`]; each key's candidates are the keys of
//!   the [`IndexConfig::cluster_probe`] clusters nearest its own cluster's
//!   centre (all keys when there is one cluster: exact kNN), scored in
//!   blocks with the SIMD inner-product kernel. The best
//!   [`IndexConfig::backbone_candidates`] are occlusion-pruned (a
//!   candidate is dropped when a kept neighbour is nearer to it than the
//!   key is), then edges are made two-way where a list has room. L2, not
//!   inner product: the inner-product kNN of a key is the same few
//!   large-norm keys for everyone (hubs), which is useless for
//!   connectivity. The backbone reaches keys no query retrieved; relevance
//!   comes from the next part.
//! * **Co-retrieval** ([`IndexConfig::co_degree`] neighbours): each
//!   training query's exact top-[`IndexConfig::train_k`] keys are a set of
//!   keys that one query wants together. For each key `a`, the keys that
//!   share such sets with it (where `a` is among the first
//!   [`IndexConfig::link_ranks`] of the set) are counted, and the most
//!   frequent become `a`'s neighbours (ties: the better summed rank, then
//!   the lower id). A search that reaches one key a query wants then finds
//!   the others one hop away. COMPUTE.md §5's pitfall: linking only each
//!   query's top-1 key to the rest (`link_ranks = 1`, RoarGraph's plain
//!   projection) leaves everything but a few hub keys without edges (a
//!   star, mean degree about 1); linking every rank and choosing by
//!   frequency gives every retrieved key its own neighbourhood.
//!   The same collapse comes back in a milder form with plain counts: keys
//!   that nearly every query retrieves (the sink, a few extreme keys) are
//!   the most frequent neighbours of every key, so lists fill with the same
//!   hubs and a search from the entries reaches only their neighbourhood
//!   (needle 16K: 14K of 16K keys unreachable along co-retrieval edges,
//!   recall 0.83 at 6.4% scan). Counts are therefore divided by
//!   `freq^0.5` (`freq`: lists holding the neighbour, the cosine of the two
//!   keys' retrieval sets up to a factor of `a`):
//!   [`IndexConfig::hub_discount_pct`]. Measured on needle 16K: discount 0
//!   recall 0.83 at 6.4%, 0.5 recall 0.96 at 8.0% (0.94 at 5.1% with the
//!   tuned edges), 1.0 recall 0.55 (rare keys win, the graph fragments).
//! * **Repair**: any key a search cannot reach from the routing entries
//!   (along the edges it follows) gets an edge from a reachable neighbour.
//! * **Routing**: the training queries are clustered by k-means
//!   ([`IndexConfig::route_clusters`]); each centre's exact top
//!   [`IndexConfig::route_keys`] keys are its entry points. A search scores
//!   the centres and starts from the entries of the best few, so it begins
//!   among keys that queries like it retrieved. Without training queries,
//!   the centres are k-means centres of the keys and the entries their
//!   nearest keys.
//!
//! Cost, 2 cores (measured in bench/README.md): the training queries' exact
//! top-k dominates (`m n d` flops, hence [`IndexConfig::train_max`]); the
//! backbone is `n * probe * cluster_keys * d`.

use super::dense::{self, Packed, exact_top_k, kmeans, nearest_centroids, par_units};
use super::{Graph, IndexConfig, NONE};
use crate::topk::top_k;

/// Training queries used by the build: at most `train_max`, evenly strided
/// (`[m][d]`).
pub(crate) fn sample_queries(queries: &[f32], d: usize, max: usize) -> Vec<f32> {
    let m = queries.len() / d;
    if m <= max {
        return queries.to_vec();
    }
    (0..max)
        .flat_map(|i| {
            let j = i * m / max;
            queries[j * d..(j + 1) * d].iter().copied()
        })
        .collect()
}

/// Which training queries make edges and which are held out to tune the
/// search: every `stride`-th, [`Split::HELD_OUT`] of them, once there are
/// at least [`Split::MIN_QUERIES`].
pub(crate) struct Split {
    m: usize,
    d: usize,
    k: usize,
    stride: usize,
}

impl Split {
    pub(crate) const HELD_OUT: usize = 96;
    pub(crate) const MIN_QUERIES: usize = 1024;

    pub(crate) fn new(m: usize, d: usize, k: usize) -> Self {
        let stride = if m >= Self::MIN_QUERIES {
            m / Self::HELD_OUT
        } else {
            0
        };
        Self { m, d, k, stride }
    }

    fn is_held(&self, j: usize) -> bool {
        self.stride > 0 && j % self.stride == self.stride / 2 && j / self.stride < Self::HELD_OUT
    }

    /// Queries, lists and scores of the queries that make edges.
    pub(crate) fn kept(
        &self,
        q: &[f32],
        lists: &[u32],
        sc: &[f32],
    ) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
        let (d, k) = (self.d, self.k);
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        for j in (0..self.m).filter(|&j| !self.is_held(j)) {
            a.extend_from_slice(&q[j * d..(j + 1) * d]);
            b.extend_from_slice(&lists[j * k..(j + 1) * k]);
            c.extend_from_slice(&sc[j * k..(j + 1) * k]);
        }
        (a, b, c)
    }

    /// Queries and lists of the held-out queries.
    pub(crate) fn held(&self, q: &[f32], lists: &[u32]) -> (Vec<f32>, Vec<u32>) {
        let (d, k) = (self.d, self.k);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for j in (0..self.m).filter(|&j| self.is_held(j)) {
            a.extend_from_slice(&q[j * d..(j + 1) * d]);
            b.extend_from_slice(&lists[j * k..(j + 1) * k]);
        }
        (a, b)
    }
}

/// The backbone lists: `[n][degree]`, `NONE`-padded.
pub(crate) fn backbone(keys: &[f32], norms: &[f32], d: usize, cfg: &IndexConfig) -> Vec<u32> {
    let n = keys.len() / d;
    let threads = dense::threads(cfg.threads);
    let deg = cfg.backbone_degree;
    if deg == 0 {
        return Vec::new();
    }
    let cand = cfg.backbone_candidates.max(deg);
    let clusters = n.div_ceil(cfg.cluster_keys).max(1);
    // Members of each cluster, and each cluster's probe list.
    let (members, probes): (Vec<Vec<u32>>, Vec<Vec<u32>>) = if clusters == 1 {
        (vec![(0..n as u32).collect()], vec![vec![0]])
    } else {
        let centroids = kmeans(keys, d, clusters, 6, 64, cfg.seed ^ 0xBAC0, threads);
        let nc = centroids.len() / d;
        let assign = nearest_centroids(keys, d, &centroids, 1, threads);
        let mut members = vec![Vec::new(); nc];
        for (t, &c) in assign.iter().enumerate() {
            members[c as usize].push(t as u32);
        }
        let probe = nearest_centroids(&centroids, d, &centroids, cfg.cluster_probe, threads);
        let p = probe.len() / nc;
        (
            members,
            probe.chunks_exact(p).map(<[u32]>::to_vec).collect(),
        )
    };
    // Candidates (best first) for every key, computed per cluster.
    let mut lists = vec![NONE; n * deg];
    let per_cluster: Vec<Vec<(u32, Vec<u32>)>> = {
        let mut out: Vec<Vec<(u32, Vec<u32>)>> = vec![Vec::new(); members.len()];
        par_units(&mut out, 1, threads, |c, slot| {
            slot[0] = cluster_candidates(keys, norms, d, &members, &probes[c], &members[c], cand);
        });
        out
    };
    for cluster in per_cluster {
        for (t, c) in cluster {
            let pruned = occlusion_prune(keys, norms, d, t, &c, deg);
            lists[t as usize * deg..t as usize * deg + pruned.len()].copy_from_slice(&pruned);
        }
    }
    // Two-way where there is room, in key order (deterministic).
    for t in 0..n {
        for s in 0..deg {
            let u = lists[t * deg + s];
            if u == NONE {
                break;
            }
            let row = &mut lists[u as usize * deg..(u as usize + 1) * deg];
            if !row.contains(&(t as u32))
                && let Some(free) = row.iter().position(|&x| x == NONE)
            {
                row[free] = t as u32;
            }
        }
    }
    lists
}

/// The `cand` nearest keys (L2, best first) of each key of `rows` among the
/// keys of the clusters in `probe`.
fn cluster_candidates(
    keys: &[f32],
    norms: &[f32],
    d: usize,
    members: &[Vec<u32>],
    probe: &[u32],
    rows: &[u32],
    cand: usize,
) -> Vec<(u32, Vec<u32>)> {
    let pool: Vec<u32> = probe
        .iter()
        .flat_map(|&c| members[c as usize].iter().copied())
        .collect();
    let gather = |ids: &[u32]| -> Vec<f32> {
        ids.iter()
            .flat_map(|&t| keys[t as usize * d..(t as usize + 1) * d].iter().copied())
            .collect()
    };
    let pool_keys = Packed::gather(keys, d, &pool);
    let np = pool.len();
    let want = (cand + 1).min(np);
    let mut out = Vec::with_capacity(rows.len());
    let mut idx = vec![0u32; want];
    let mut val = vec![0.0f32; want];
    const BLOCK: usize = 32;
    let mut s = vec![0.0f32; BLOCK * np];
    for block in rows.chunks(BLOCK) {
        let a = gather(block);
        dense::scores(&a, block.len(), &pool_keys, 2.0, &mut s, np);
        for (r, &t) in block.iter().enumerate() {
            // 2 k_t.k_u - |k_u|^2 ranks u by L2 distance to k_t; k_t itself
            // is excluded.
            let row = &mut s[r * np..(r + 1) * np];
            for (x, &u) in row.iter_mut().zip(&pool) {
                *x = if u == t {
                    f32::NAN
                } else {
                    *x - norms[u as usize]
                };
            }
            let got = top_k(row, want, &mut idx, &mut val);
            out.push((
                t,
                idx[..got.min(cand)]
                    .iter()
                    .map(|&i| pool[i as usize])
                    .collect(),
            ));
        }
    }
    out
}

/// Occlusion pruning of `cand` (nearest first) for key `t`: a candidate
/// is kept unless a kept neighbour is nearer to it than `t` is; at most
/// `deg` kept.
fn occlusion_prune(
    keys: &[f32],
    norms: &[f32],
    d: usize,
    t: u32,
    cand: &[u32],
    deg: usize,
) -> Vec<u32> {
    let row = |u: u32| &keys[u as usize * d..(u as usize + 1) * d];
    let dist =
        |a: u32, b: u32| norms[a as usize] + norms[b as usize] - 2.0 * dense::dot(row(a), row(b));
    let mut kept: Vec<u32> = Vec::with_capacity(deg);
    for &c in cand {
        if kept.len() == deg {
            break;
        }
        let dc = dist(c, t);
        if kept.iter().all(|&s| dist(c, s) > dc) {
            kept.push(c);
        }
    }
    kept
}

/// The training queries' exact top-k lists (`[m][k]`, best first) and
/// their scores.
pub(crate) fn train_lists(
    keys: &Packed,
    queries: &[f32],
    k: usize,
    threads: usize,
) -> (Vec<u32>, Vec<f32>) {
    let m = queries.len() / keys.d;
    let mut ids = vec![0u32; m * k];
    let mut sc = vec![0.0f32; m * k];
    exact_top_k(keys, queries, k, threads, &mut ids, &mut sc);
    (ids, sc)
}

/// Co-retrieval lists `[n][co_degree]` (`NONE`-padded) from the training
/// queries' top lists `lists` (`[m][k]`, best first, `NONE`-padded).
pub(crate) fn co_retrieval(n: usize, lists: &[u32], k: usize, cfg: &IndexConfig) -> Vec<u32> {
    let deg = cfg.co_degree;
    if deg == 0 || k == 0 {
        return Vec::new();
    }
    let anchors = cfg.link_ranks.min(k);
    let m = lists.len() / k;
    // Inverted lists: for each key, the queries that have it among their
    // first `anchors` ranks (CSR, queries ascending).
    let mut start = vec![0u32; n + 1];
    for j in 0..m {
        for &a in &lists[j * k..j * k + anchors] {
            if a != NONE {
                start[a as usize + 1] += 1;
            }
        }
    }
    for i in 0..n {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut inv = vec![0u32; start[n] as usize];
    for j in 0..m {
        for &a in &lists[j * k..j * k + anchors] {
            if a != NONE {
                inv[fill[a as usize] as usize] = j as u32;
                fill[a as usize] += 1;
            }
        }
    }
    // How many lists hold each key: the popularity that the choice
    // discounts (see the module documentation).
    let mut freq = vec![0u32; n];
    for &b in lists {
        if b != NONE {
            freq[b as usize] += 1;
        }
    }
    let p = f64::from(cfg.hub_discount_pct) / 100.0;
    let discount: Vec<f32> = freq
        .iter()
        .map(|&f| (f64::from(f.max(1))).powf(-p) as f32)
        .collect();
    let mut out = vec![NONE; n * deg];
    const UNIT: usize = 512;
    par_units(&mut out, UNIT * deg, dense::threads(cfg.threads), |u, o| {
        // Per-thread counters over all keys, reset through `touched`.
        let mut count = vec![0u32; n];
        let mut ranks = vec![0u32; n];
        let mut touched: Vec<u32> = Vec::new();
        let mut order: Vec<u32> = Vec::new();
        for (r, row) in o.chunks_mut(deg).enumerate() {
            let a = u * UNIT + r;
            for &j in &inv[start[a] as usize..start[a + 1] as usize] {
                for (rank, &b) in lists[j as usize * k..(j as usize + 1) * k]
                    .iter()
                    .enumerate()
                {
                    if b == NONE || b as usize == a {
                        continue;
                    }
                    if count[b as usize] == 0 {
                        touched.push(b);
                    }
                    count[b as usize] += 1;
                    ranks[b as usize] += rank as u32;
                }
            }
            order.clear();
            order.extend_from_slice(&touched);
            let weight = |x: usize| count[x] as f32 * discount[x];
            let by = |x: &u32, y: &u32| {
                let (x, y) = (*x as usize, *y as usize);
                weight(y)
                    .total_cmp(&weight(x))
                    .then(ranks[x].cmp(&ranks[y]))
                    .then(x.cmp(&y))
            };
            if order.len() > deg {
                order.select_nth_unstable_by(deg - 1, by);
                order.truncate(deg);
            }
            order.sort_by(by);
            row[..order.len()].copy_from_slice(&order);
            for &b in &touched {
                count[b as usize] = 0;
                ranks[b as usize] = 0;
            }
            touched.clear();
        }
    });
    out
}

/// Routing table: `(centres [c][d], entries [c][route_keys])`. Centres are
/// k-means centres of the training queries (of the keys when there are
/// none); entries are each centre's top keys by inner product (by L2
/// nearness without queries).
pub(crate) fn routing(
    keys: &[f32],
    packed: &Packed,
    norms: &[f32],
    d: usize,
    queries: &[f32],
    cfg: &IndexConfig,
) -> (Vec<f32>, Vec<u32>) {
    let threads = dense::threads(cfg.threads);
    let n = keys.len() / d;
    let m = queries.len() / d;
    let rk = cfg.route_keys.min(n);
    let source = if m > 0 { queries } else { keys };
    let rows = source.len() / d;
    let clusters = if cfg.route_clusters > 0 {
        cfg.route_clusters
    } else {
        // About one centre per 256 rows, within 8..=64: the centres are
        // scored on every search, so they must stay a small share of it.
        (rows / 256).clamp(8, 64)
    }
    .min(rows);
    let centres = kmeans(source, d, clusters, 10, 128, cfg.seed ^ 0x7017E, threads);
    let nc = centres.len() / d;
    let mut entries = vec![NONE; nc * rk];
    if m > 0 {
        let mut sc = vec![0.0f32; nc * rk];
        exact_top_k(packed, &centres, rk, threads, &mut entries, &mut sc);
    } else {
        // The keys nearest each centre: rank keys by 2 c.k - |k|^2.
        let mut s = vec![0.0f32; n];
        let (mut idx, mut val) = (vec![0u32; rk], vec![0.0f32; rk]);
        for c in 0..nc {
            dense::scores(&centres[c * d..(c + 1) * d], 1, packed, 2.0, &mut s, n);
            s.iter_mut().zip(norms).for_each(|(x, nrm)| *x -= nrm);
            let got = top_k(&s, rk, &mut idx, &mut val);
            entries[c * rk..c * rk + got].copy_from_slice(&idx[..got]);
        }
    }
    (centres, entries)
}

/// Assembles the graph rows from the two kinds of lists.
pub(crate) fn assemble(n: usize, back: &[u32], co: &[u32], cfg: &IndexConfig) -> Graph {
    let mut g = Graph::new(cfg);
    g.grow(n);
    let (b, c) = (cfg.backbone_degree, cfg.co_degree);
    for t in 0..n {
        if !back.is_empty() {
            g.backbone_mut(t).copy_from_slice(&back[t * b..(t + 1) * b]);
        }
        if !co.is_empty() {
            g.co_mut(t).copy_from_slice(&co[t * c..(t + 1) * c]);
        }
    }
    g
}

/// Makes every key reachable from the routing entries along the edges a
/// search follows under [`super::Expand::ColdBackbone`] (a subgraph of
/// the full rows, so the full rows get it too). An unreachable key gets an
/// edge, in the insert slots, from a reachable key among its own
/// neighbours (nearest first), else from the nearest reachable key before
/// it in position. Returns the keys linked this way.
pub(crate) fn repair(g: &mut Graph, entries: &[u32]) -> usize {
    let n = g.len();
    if n == 0 || g.r == 0 {
        return 0;
    }
    let mut seen = vec![false; n];
    let mut stack: Vec<u32> = Vec::new();
    let visit = |g: &Graph, seen: &mut Vec<bool>, stack: &mut Vec<u32>, from: u32| {
        if seen[from as usize] {
            return;
        }
        seen[from as usize] = true;
        stack.push(from);
        while let Some(t) = stack.pop() {
            for &u in g.warm_row(t as usize) {
                if u != NONE && !seen[u as usize] {
                    seen[u as usize] = true;
                    stack.push(u);
                }
            }
        }
    };
    for &e in entries {
        if e != NONE {
            visit(g, &mut seen, &mut stack, e);
        }
    }
    let mut linked = 0;
    for u in 0..n {
        if seen[u] {
            continue;
        }
        let from = g
            .row(u)
            .iter()
            .copied()
            .find(|&v| v != NONE && seen[v as usize])
            .or_else(|| (0..u).rev().find(|&v| seen[v]).map(|v| v as u32));
        if let Some(r) = from {
            g.push_insert(r as usize, u as u32);
            linked += 1;
        }
        // A key with no reachable key anywhere before it (only possible
        // without entries) starts a new component of its own.
        visit(g, &mut seen, &mut stack, u as u32);
    }
    linked
}

//! RetrievalAttention (COMPUTE.md §5): an attention-aware graph index over
//! the keys of one (sequence, layer, KV head), searched by inner product.
//!
//! Queries and keys come from different distributions, so a key's nearest
//! keys say little about which keys a query attends to; an index built on
//! key geometry alone must scan a large share of the keys. This one adds
//! what the prefill's queries retrieved together:
//!
//! * a key-kNN **backbone** (L2, occlusion-pruned, at most 24 neighbours)
//!   that connects keys no training query retrieved;
//! * **co-retrieval edges**: keys that the same training queries have in
//!   their exact top-100 are linked, the most frequent first once
//!   discounted by popularity (at most 48 per key), so a search that
//!   reaches one key a query wants finds the others one hop away;
//! * a **routing table**: k-means centres of the training queries, each
//!   with its exact top keys as entry points; a repair pass links any key
//!   the search could not reach from them;
//! * **beam search** by `q.k` from the entries of the best centres, with a
//!   candidate list of `ef`, counting every inner product it computes
//!   (centres and keys) as *scanned*;
//! * **tuning** on held-out training queries: whether searches follow the
//!   backbone edges of keys that have co-retrieval edges ([`Expand`]; they
//!   pay on heads whose key geometry follows relevance, cost scans where it
//!   does not), and the default `ef`.
//!
//! See `build.rs` for how each part is made and why, `search.rs` for the
//! search, `insert.rs` for incremental inserts. Measured figures and the
//! faiss baselines: bench/README.md ("Retrieval").
//!
//! Invariants:
//! * ids are row numbers of the keys given to [`RetrievalIndex::build`],
//!   then of [`RetrievalIndex::insert`] in order (`0..len()`);
//! * every adjacency entry is a valid id or [`NONE`]; a key never lists
//!   itself;
//! * after a build every key is reachable from the routing entries along
//!   the edges searches follow; inserts keep this except where an insert
//!   slot is reused (rare; the next build restores it);
//! * a build is a function of the keys, the training queries and the
//!   [`IndexConfig`] (seed included), whatever the thread count; a search
//!   is a function of the index, the query and the [`SearchParams`]. (The
//!   AVX2 and portable paths round differently: bits match on one CPU kind.)
//! * no I/O; a search allocates only when its scratch must grow.
//!
//! Scores are raw `q.k` (no softmax scale). The engine's static window
//! (sink and recent tokens) is not the index's business: build it over the
//! tokens outside the window, and offset the ids.

mod build;
pub(crate) mod dense;
mod insert;
mod search;
#[cfg(test)]
mod tests;

use crate::KvElem;
use search::Metric;
pub use search::SearchScratch;

/// An empty adjacency slot.
pub const NONE: u32 = u32::MAX;

/// Largest `k` a search may ask for.
pub const K_MAX: usize = 1024;
/// Largest candidate list a search may ask for.
pub const EF_MAX: usize = 4096;
/// Largest degree of either kind of edge.
pub const DEGREE_MAX: usize = 255;
/// Largest head dimension.
pub const D_MAX: usize = 1024;

/// How to build an index. [`IndexConfig::default`] is COMPUTE.md §5's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexConfig {
    /// Backbone neighbours per key after pruning (24).
    pub backbone_degree: usize,
    /// Nearest keys considered before occlusion pruning (48).
    pub backbone_candidates: usize,
    /// Keys per backbone partition (512); one partition (exact kNN) below twice that.
    pub cluster_keys: usize,
    /// Partitions whose keys are a key's backbone candidates (4).
    pub cluster_probe: usize,
    /// Co-retrieval neighbours per key (48).
    pub co_degree: usize,
    /// Keys per training query's exact top list (100).
    pub train_k: usize,
    /// Ranks of a training query's top list that get linked to the rest
    /// (`train_k`: all). 1 is the plain projection rule of COMPUTE.md §5's
    /// pitfall, kept to show it.
    pub link_ranks: usize,
    /// Co-retrieval neighbours are ranked by `count / freq^(pct/100)`, with
    /// `freq` the lists a neighbour is in (0: plain frequency).
    pub hub_discount_pct: u32,
    /// At most this many training queries (evenly strided) enter the
    /// build (8192): their exact top-k costs `m n d`.
    pub train_max: usize,
    /// Training queries (strided) kept with their top lists so that
    /// inserted keys get co-retrieval edges (2048).
    pub insert_queries: usize,
    /// Extra slots per key for edges to inserted keys (8), reused in turn.
    pub insert_slots: usize,
    /// Routing centres (0: one per 256 training queries, 8 to 64).
    pub route_clusters: usize,
    /// Entry keys per routing centre (4).
    pub route_keys: usize,
    /// Seed of every random choice of the build (k-means samples).
    pub seed: u64,
    /// Build threads (0: the machine's parallelism).
    pub threads: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            backbone_degree: 24,
            backbone_candidates: 48,
            cluster_keys: 512,
            cluster_probe: 4,
            co_degree: 48,
            train_k: 100,
            link_ranks: 100,
            hub_discount_pct: 50,
            train_max: 8192,
            insert_queries: 2048,
            insert_slots: 8,
            route_clusters: 0,
            route_keys: 4,
            seed: 0x5EED,
            threads: 0,
        }
    }
}

impl IndexConfig {
    /// Checks the ranges the build relies on; the message names the field.
    pub fn validate(&self) -> Result<(), IndexError> {
        let bad = |field: &'static str, why: String| Err(IndexError::Config { field, why });
        let deg_ok = |x: usize| x <= DEGREE_MAX;
        if !deg_ok(self.backbone_degree) || !deg_ok(self.co_degree) || !deg_ok(self.insert_slots) {
            return bad(
                "degree",
                format!("backbone_degree, co_degree and insert_slots must be <= {DEGREE_MAX}"),
            );
        }
        if self.backbone_degree + self.co_degree == 0 {
            return bad("degree", "backbone_degree + co_degree must be > 0".into());
        }
        if self.backbone_candidates < self.backbone_degree
            || self.backbone_candidates > 4 * DEGREE_MAX
        {
            return bad(
                "backbone_candidates",
                format!(
                    "{} outside backbone_degree..={}",
                    self.backbone_candidates,
                    4 * DEGREE_MAX
                ),
            );
        }
        if self.cluster_keys < 16 || self.cluster_probe == 0 {
            return bad(
                "cluster_keys",
                "cluster_keys >= 16 and cluster_probe >= 1".into(),
            );
        }
        if self.train_k == 0 || self.train_k > K_MAX || self.link_ranks == 0 {
            return bad(
                "train_k",
                format!("train_k in 1..={K_MAX} and link_ranks >= 1"),
            );
        }
        if self.route_keys == 0 || self.route_keys > 64 || self.route_clusters > 4096 {
            return bad(
                "route_keys",
                "route_keys in 1..=64, route_clusters <= 4096".into(),
            );
        }
        if self.threads > 256 {
            return bad("threads", format!("{} > 256", self.threads));
        }
        Ok(())
    }
}

/// Per-search parameters, checked by [`SearchParams::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchParams {
    k: usize,
    ef: usize,
    probe: usize,
}

impl SearchParams {
    /// Default `k` (COMPUTE.md §5: top-100).
    pub const K_DEFAULT: usize = 100;
    /// Default candidate list (COMPUTE.md §5: 64-400).
    pub const EF_DEFAULT: usize = 160;
    /// Default routing centres whose entries seed a search.
    pub const PROBE_DEFAULT: usize = 2;

    /// `k` keys from a candidate list of `ef` (`k <= ef <= EF_MAX`,
    /// `1 <= k <= K_MAX`).
    pub fn new(k: usize, ef: usize) -> Result<Self, IndexError> {
        if k == 0 || k > K_MAX {
            return Err(IndexError::Param {
                field: "k",
                why: format!("{k} outside 1..={K_MAX}"),
            });
        }
        if ef < k || ef > EF_MAX {
            return Err(IndexError::Param {
                field: "ef",
                why: format!("{ef} outside k ({k})..={EF_MAX}"),
            });
        }
        Ok(Self {
            k,
            ef,
            probe: Self::PROBE_DEFAULT,
        })
    }

    /// Seeds from the best `probe` routing centres (1..=64).
    pub fn with_probe(mut self, probe: usize) -> Result<Self, IndexError> {
        if probe == 0 || probe > 64 {
            return Err(IndexError::Param {
                field: "probe",
                why: format!("{probe} outside 1..=64"),
            });
        }
        self.probe = probe;
        Ok(self)
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn ef(&self) -> usize {
        self.ef
    }

    pub fn probe(&self) -> usize {
        self.probe
    }
}

impl Default for SearchParams {
    fn default() -> Self {
        Self {
            k: Self::K_DEFAULT,
            ef: Self::EF_DEFAULT,
            probe: Self::PROBE_DEFAULT,
        }
    }
}

/// Why an index could not be built or searched as asked. The field names
/// the argument at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexError {
    Shape { field: &'static str, why: String },
    Config { field: &'static str, why: String },
    Param { field: &'static str, why: String },
}

impl std::fmt::Display for IndexError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IndexError::Shape { field, why }
            | IndexError::Config { field, why }
            | IndexError::Param { field, why } => {
                write!(f, "{field}: {why}")
            }
        }
    }
}

impl std::error::Error for IndexError {}

/// The answers of a batch search, `[b][k]` row-major; caller-owned and
/// reused across calls.
#[derive(Debug, Clone, Default)]
pub struct Hits {
    /// `k` of the last search (row stride).
    pub k: usize,
    /// `[b][k]`: ids, best first; `found[i]..k` of row `i` are [`NONE`].
    pub ids: Vec<u32>,
    /// `[b][k]`: `q.k` of each id (`-inf` past `found`).
    pub scores: Vec<f32>,
    /// `[b]`: ids found (`k` unless the index holds fewer keys).
    pub found: Vec<u32>,
    /// `[b]`: inner products computed (routing centres and keys).
    pub scanned: Vec<u32>,
}

impl Hits {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queries answered.
    pub fn len(&self) -> usize {
        self.found.len()
    }

    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// Ids found for query `i`, best first.
    pub fn ids(&self, i: usize) -> &[u32] {
        &self.ids[i * self.k..i * self.k + self.found[i] as usize]
    }

    /// Scores of [`Hits::ids`].
    pub fn scores(&self, i: usize) -> &[f32] {
        &self.scores[i * self.k..i * self.k + self.found[i] as usize]
    }

    fn reset(&mut self, b: usize, k: usize) {
        self.k = k;
        self.ids.clear();
        self.ids.resize(b * k, NONE);
        self.scores.clear();
        self.scores.resize(b * k, f32::NEG_INFINITY);
        self.found.clear();
        self.found.resize(b, 0);
        self.scanned.clear();
        self.scanned.resize(b, 0);
    }
}

/// Adjacency of every key: one row of `stride` slots, `[backbone | co-retrieval | insert]`.
#[derive(Debug, Clone)]
pub(crate) struct Graph {
    b: usize,
    c: usize,
    r: usize,
    stride: usize,
    adj: Vec<u32>,
    /// Next insert slot to reuse, per key.
    ring: Vec<u8>,
}

impl Graph {
    fn new(cfg: &IndexConfig) -> Self {
        let (b, c, r) = (cfg.backbone_degree, cfg.co_degree, cfg.insert_slots);
        Self {
            b,
            c,
            r,
            stride: b + c + r,
            adj: Vec::new(),
            ring: Vec::new(),
        }
    }

    fn grow(&mut self, n: usize) {
        self.adj.resize(n * self.stride, NONE);
        self.ring.resize(n, 0);
    }

    fn len(&self) -> usize {
        self.ring.len()
    }

    pub(crate) fn row(&self, t: usize) -> &[u32] {
        &self.adj[t * self.stride..(t + 1) * self.stride]
    }

    /// The row without its backbone part when the key is *warm* (at least
    /// half its co-retrieval slots used), else the whole row.
    pub(crate) fn warm_row(&self, t: usize) -> &[u32] {
        let row = self.row(t);
        if self.c > 0 && row[self.b + self.c.div_ceil(2) - 1] != NONE {
            &row[self.b..]
        } else {
            row
        }
    }

    fn backbone(&self, t: usize) -> &[u32] {
        &self.adj[t * self.stride..t * self.stride + self.b]
    }

    fn backbone_mut(&mut self, t: usize) -> &mut [u32] {
        &mut self.adj[t * self.stride..t * self.stride + self.b]
    }

    fn co(&self, t: usize) -> &[u32] {
        &self.adj[t * self.stride + self.b..t * self.stride + self.b + self.c]
    }

    fn co_mut(&mut self, t: usize) -> &mut [u32] {
        &mut self.adj[t * self.stride + self.b..t * self.stride + self.b + self.c]
    }

    /// Adds `x` to `t`'s insert slots, replacing the oldest when full.
    /// A key pushed out keeps one edge if it can: it moves to a free insert
    /// slot of its nearest backbone neighbour (never evicting there, so
    /// nothing cascades).
    fn push_insert(&mut self, t: usize, x: u32) {
        if self.r == 0 {
            return;
        }
        let base = t * self.stride + self.b + self.c;
        let slots = &mut self.adj[base..base + self.r];
        if slots.contains(&x) {
            return;
        }
        let i = self.ring[t] as usize % self.r;
        let evicted = std::mem::replace(&mut slots[i], x);
        self.ring[t] = ((i + 1) % self.r) as u8;
        if evicted == NONE || self.b == 0 {
            return;
        }
        let home = self
            .backbone(evicted as usize)
            .iter()
            .copied()
            .find(|&z| z != NONE && z as usize != t);
        if let Some(z) = home {
            let zb = z as usize * self.stride + self.b + self.c;
            let zs = &mut self.adj[zb..zb + self.r];
            if !zs.contains(&evicted)
                && let Some(free) = zs.iter().position(|&v| v == NONE)
            {
                zs[free] = evicted;
            }
        }
    }

    fn memory_bytes(&self) -> usize {
        self.adj.capacity() * 4 + self.ring.capacity()
    }
}

/// Which edges a search follows from an expanded key, chosen per index at
/// build time (see [`build`]'s tuning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expand {
    /// Backbone and co-retrieval edges of every key.
    All,
    /// Backbone edges only at *cold* keys (fewer than half their
    /// co-retrieval slots used): where key geometry does not reflect
    /// relevance (needle heads), backbone edges of keys that queries
    /// retrieve cost scans and find nothing.
    ColdBackbone,
}

/// What the build measured on held-out training queries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    /// The edges searches follow.
    pub expand: Expand,
    /// Smallest `ef` of the ladder reaching [`Tuning::TARGET_RECALL`] on the
    /// held-out queries (the ladder's largest when none does): the default
    /// of [`RetrievalIndex::default_params`].
    pub ef: usize,
    /// Mean recall@`train_k` and scan% there (`NaN` when not tuned).
    pub recall: f64,
    pub scan_pct: f64,
    /// Held-out queries measured (0: too few training queries to hold any
    /// out; `expand` is then [`Expand::All`]).
    pub held_out: usize,
}

impl Tuning {
    /// Held-out recall the default `ef` aims at: above §5's 0.9, because
    /// the output error grows fast with each wanted key missed on heads
    /// whose attention is spread (semantic: relerr +0.035 over the exact
    /// top-100 at recall 0.93, +0.014 at 0.96).
    pub const TARGET_RECALL: f64 = 0.95;
    /// Candidate lists tried.
    pub const EF_LADDER: [usize; 8] = [100, 128, 160, 200, 256, 320, 400, 512];
}

/// Wall time of each phase of the last build, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BuildTimes {
    /// Key-kNN backbone (k-means partition, blocked distances, pruning).
    pub backbone_s: f64,
    /// The training queries' exact top-k.
    pub train_s: f64,
    /// Co-retrieval counting, assembly, routing table.
    pub co_s: f64,
    /// Tuning on the held-out queries.
    pub tune_s: f64,
}

impl BuildTimes {
    pub fn total_s(&self) -> f64 {
        self.backbone_s + self.train_s + self.co_s + self.tune_s
    }
}

/// Degree statistics, to check for the hub collapse of COMPUTE.md §5.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GraphStats {
    /// Mean backbone out-degree.
    pub backbone_mean: f64,
    /// Mean co-retrieval out-degree.
    pub co_mean: f64,
    /// Keys with at least one co-retrieval edge.
    pub co_keys: usize,
    /// Largest co-retrieval in-degree.
    pub co_in_max: usize,
    /// Keys that cannot be reached from the routing entries along the
    /// edges searches follow.
    pub unreachable: usize,
    /// Keys the build had to link so that they could be reached.
    pub repaired: usize,
}

/// The index of one (sequence, layer, KV head).
#[derive(Debug, Clone)]
pub struct RetrievalIndex {
    d: usize,
    cfg: IndexConfig,
    /// `[n][d]` f32.
    keys: Vec<f32>,
    /// `|k|^2` per key.
    norms: Vec<f32>,
    graph: Graph,
    /// `[c][d]`, packed for the kernel.
    route_centres: dense::Packed,
    /// `[c][route_keys]`.
    route_entries: Vec<u32>,
    /// Keys at the last build.
    built: usize,
    /// The edges searches follow (from `tuning`).
    expand: Expand,
    times: BuildTimes,
    /// Keys the build linked to make them reachable.
    repaired: usize,
    tuning: Tuning,
    /// Training queries kept for inserts.
    train: insert::TrainSet,
}

impl RetrievalIndex {
    /// Builds the index over `keys` (`[n][d]`, any storage type, converted
    /// to f32) with the training queries `train` (`[m][d]` f32; empty for a
    /// backbone-only index that knows no queries).
    pub fn build<E: KvElem>(
        keys: &[E],
        d: usize,
        train: &[f32],
        cfg: &IndexConfig,
    ) -> Result<Self, IndexError> {
        cfg.validate()?;
        if d == 0 || d > D_MAX {
            return Err(IndexError::Shape {
                field: "d",
                why: format!("{d} outside 1..={D_MAX}"),
            });
        }
        if keys.is_empty() || !keys.len().is_multiple_of(d) || keys.len() / d >= NONE as usize {
            return Err(IndexError::Shape {
                field: "keys",
                why: format!(
                    "{} elements are not [n][{d}] with 0 < n < 2^32 - 1",
                    keys.len()
                ),
            });
        }
        if !train.len().is_multiple_of(d) {
            return Err(IndexError::Shape {
                field: "train",
                why: format!("{} elements are not [m][{d}]", train.len()),
            });
        }
        let mut f = vec![0.0f32; keys.len()];
        E::slice_to_f32(keys, &mut f);
        if let Some(i) = f.iter().position(|x| !x.is_finite()) {
            return Err(IndexError::Shape {
                field: "keys",
                why: format!("element {i} is not finite"),
            });
        }
        if let Some(i) = train.iter().position(|x| !x.is_finite()) {
            return Err(IndexError::Shape {
                field: "train",
                why: format!("element {i} is not finite"),
            });
        }
        Ok(Self::build_f32(f, d, train, cfg))
    }

    fn build_f32(keys: Vec<f32>, d: usize, train: &[f32], cfg: &IndexConfig) -> Self {
        let n = keys.len() / d;
        let threads = dense::threads(cfg.threads);
        let norms = dense::row_norms(&keys, d);
        let mut clock = std::time::Instant::now();
        let mut lap = || {
            let now = std::time::Instant::now();
            let s = (now - clock).as_secs_f64();
            clock = now;
            s
        };
        let back = build::backbone(&keys, &norms, d, cfg);
        let backbone_s = lap();
        let sample = build::sample_queries(train, d, cfg.train_max);
        let k = cfg.train_k.min(n);
        let packed = dense::Packed::new(&keys, d);
        let (all_lists, all_scores) = build::train_lists(&packed, &sample, k, threads);
        // Held-out queries tune the search (their lists make no edges).
        let train_s = lap();
        let split = build::Split::new(sample.len() / d, d, k);
        let (queries, lists, scores) = split.kept(&sample, &all_lists, &all_scores);
        let co = build::co_retrieval(n, &lists, k, cfg);
        let mut graph = build::assemble(n, &back, &co, cfg);
        let (route_centres, route_entries) =
            build::routing(&keys, &packed, &norms, d, &queries, cfg);
        drop(packed);
        let repaired = build::repair(&mut graph, &route_entries);
        let co_s = lap();
        let train = insert::TrainSet::keep(&queries, &lists, &scores, d, k, cfg.insert_queries);
        let mut index = Self {
            d,
            cfg: cfg.clone(),
            keys,
            norms,
            graph,
            route_centres: dense::Packed::new(&route_centres, d),
            route_entries,
            built: n,
            expand: Expand::All,
            times: BuildTimes::default(),
            repaired,
            tuning: Tuning {
                expand: Expand::All,
                ef: SearchParams::EF_DEFAULT,
                recall: f64::NAN,
                scan_pct: f64::NAN,
                held_out: 0,
            },
            train,
        };
        let (held_q, held_lists) = split.held(&sample, &all_lists);
        if !held_lists.is_empty() {
            index.tuning = index.tune(&held_q, &held_lists, k);
            index.expand = index.tuning.expand;
        }
        index.times = BuildTimes {
            backbone_s,
            train_s,
            co_s,
            tune_s: lap(),
        };
        index
    }

    /// How long each phase of the build took.
    pub fn build_times(&self) -> &BuildTimes {
        &self.times
    }

    /// What the build's tuning chose and measured.
    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// Search parameters for top-`k` (the default 100) at the tuned `ef`.
    pub fn default_params(&self) -> SearchParams {
        SearchParams {
            k: SearchParams::K_DEFAULT,
            ef: self.tuning.ef.max(SearchParams::K_DEFAULT),
            probe: SearchParams::PROBE_DEFAULT,
        }
    }

    /// Follows the edges `expand` from now on (what the tuning chose is in
    /// [`RetrievalIndex::tuning`]); for experiments and the benchmark.
    pub fn set_expand(&mut self, expand: Expand) {
        self.expand = expand;
    }

    /// Mean recall@k and scan% of the searches for `queries` against their
    /// exact lists `lists` (`[h][k]`, `NONE`-padded).
    fn measure(
        &self,
        queries: &[f32],
        lists: &[u32],
        k: usize,
        p: &SearchParams,
        scratch: &mut SearchScratch,
    ) -> (f64, f64) {
        let d = self.d;
        let h = queries.len() / d;
        let mut hits = Hits::new();
        self.search(queries, p, scratch, &mut hits);
        let (mut recall, mut scanned) = (0.0, 0.0);
        for i in 0..h {
            let want: Vec<u32> = lists[i * k..(i + 1) * k]
                .iter()
                .copied()
                .filter(|&x| x != NONE)
                .collect();
            let got = hits.ids(i);
            let found = want.iter().filter(|w| got.contains(w)).count();
            recall += found as f64 / want.len().max(1) as f64;
            scanned += f64::from(hits.scanned[i]);
        }
        (
            recall / h as f64,
            100.0 * scanned / h as f64 / self.len() as f64,
        )
    }

    /// Chooses the edges to follow and the default `ef`: for each
    /// [`Expand`], the smallest `ef` of the ladder whose held-out recall
    /// reaches the target; the one that scans less wins (ties: `All`).
    fn tune(&mut self, queries: &[f32], lists: &[u32], k: usize) -> Tuning {
        let mut scratch = SearchScratch::new();
        let mut best: Option<Tuning> = None;
        for expand in [Expand::All, Expand::ColdBackbone] {
            self.expand = expand;
            let mut last = None;
            for ef in Tuning::EF_LADDER {
                let Ok(p) = SearchParams::new(k, ef.max(k)) else {
                    continue;
                };
                let (recall, scan_pct) = self.measure(queries, lists, k, &p, &mut scratch);
                last = Some(Tuning {
                    expand,
                    ef: p.ef,
                    recall,
                    scan_pct,
                    held_out: queries.len() / self.d,
                });
                if recall >= Tuning::TARGET_RECALL {
                    break;
                }
            }
            let Some(t) = last else { continue };
            let better = match &best {
                None => true,
                Some(b) => {
                    let (tr, br) = (
                        t.recall >= Tuning::TARGET_RECALL,
                        b.recall >= Tuning::TARGET_RECALL,
                    );
                    match (tr, br) {
                        (true, true) => t.scan_pct < b.scan_pct,
                        (true, false) => true,
                        (false, true) => false,
                        (false, false) => t.recall > b.recall,
                    }
                }
            };
            if better {
                best = Some(t);
            }
        }
        best.unwrap_or(self.tuning)
    }

    /// Keys indexed.
    pub fn len(&self) -> usize {
        self.graph.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn d(&self) -> usize {
        self.d
    }

    pub fn config(&self) -> &IndexConfig {
        &self.cfg
    }

    /// The keys indexed (`[len][d]` f32), for a rebuild.
    pub fn keys(&self) -> &[f32] {
        &self.keys
    }

    /// Keys inserted since the last build.
    pub fn inserted(&self) -> usize {
        self.len() - self.built
    }

    /// Whether a quarter of the index is new since its build: the caller
    /// should rebuild it (in the background; this one stays usable).
    pub fn needs_rebuild(&self) -> bool {
        4 * self.inserted() >= self.len()
    }

    /// Bytes held: keys, norms, adjacency, routing, the queries kept for
    /// inserts.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.keys.capacity() * 4
            + self.norms.capacity() * 4
            + self.graph.memory_bytes()
            + self.route_centres.memory_bytes()
            + self.route_entries.capacity() * 4
            + self.train.memory_bytes()
    }

    /// Top-`k` keys by `q.k` for each query of `queries` (`[b][d]`), into
    /// `hits`. Panics when `queries` is not `[b][d]` (a caller's bug: the
    /// RPC layer checks shapes).
    pub fn search(
        &self,
        queries: &[f32],
        p: &SearchParams,
        scratch: &mut SearchScratch,
        hits: &mut Hits,
    ) {
        let d = self.d;
        assert!(
            queries.len().is_multiple_of(d),
            "search: queries are not [b][{d}]"
        );
        let b = queries.len() / d;
        hits.reset(b, p.k);
        let mut seeds = Vec::new();
        for i in 0..b {
            let q = &queries[i * d..(i + 1) * d];
            let routed = self.route(q, p.probe, scratch, &mut seeds);
            let scanned = self.beam(q, &seeds, p.k, p.ef, Metric::InnerProduct, scratch);
            let row = i * p.k;
            for (j, c) in scratch.out.iter().enumerate() {
                hits.ids[row + j] = c.id;
                hits.scores[row + j] = c.s;
            }
            hits.found[i] = scratch.out.len() as u32;
            hits.scanned[i] = (routed + scanned) as u32;
        }
    }

    /// Appends `keys` (`[b][d]`) to the index and links them (see
    /// [`insert`]). Their ids follow the existing ones.
    pub fn insert<E: KvElem>(&mut self, keys: &[E]) -> Result<(), IndexError> {
        let d = self.d;
        if !keys.len().is_multiple_of(d) || (self.len() + keys.len() / d) >= NONE as usize {
            return Err(IndexError::Shape {
                field: "keys",
                why: format!(
                    "{} elements are not [b][{d}] (or the index would be full)",
                    keys.len()
                ),
            });
        }
        let mut f = vec![0.0f32; keys.len()];
        E::slice_to_f32(keys, &mut f);
        if let Some(i) = f.iter().position(|x| !x.is_finite()) {
            return Err(IndexError::Shape {
                field: "keys",
                why: format!("element {i} is not finite"),
            });
        }
        self.insert_f32(&f);
        Ok(())
    }

    /// Degree statistics and reachability from the routing entries.
    pub fn stats(&self) -> GraphStats {
        let n = self.len();
        let (mut back, mut co, mut co_keys) = (0usize, 0usize, 0usize);
        let mut indeg = vec![0usize; n];
        for t in 0..n {
            back += self
                .graph
                .backbone(t)
                .iter()
                .filter(|&&x| x != NONE)
                .count();
            let c = self.graph.co(t).iter().filter(|&&x| x != NONE).count();
            co += c;
            co_keys += usize::from(c > 0);
            for &x in self.graph.co(t) {
                if x != NONE {
                    indeg[x as usize] += 1;
                }
            }
        }
        let mut seen = vec![false; n];
        let mut stack: Vec<u32> = self
            .route_entries
            .iter()
            .copied()
            .filter(|&e| e != NONE)
            .collect();
        for &e in &stack {
            seen[e as usize] = true;
        }
        while let Some(t) = stack.pop() {
            let row = match self.expand {
                Expand::All => self.graph.row(t as usize),
                Expand::ColdBackbone => self.graph.warm_row(t as usize),
            };
            for &u in row {
                if u != NONE && !seen[u as usize] {
                    seen[u as usize] = true;
                    stack.push(u);
                }
            }
        }
        GraphStats {
            backbone_mean: back as f64 / n as f64,
            co_mean: co as f64 / n as f64,
            co_keys,
            co_in_max: indeg.into_iter().max().unwrap_or(0),
            unreachable: seen.iter().filter(|&&s| !s).count(),
            repaired: self.repaired,
        }
    }
}

/// Exact top-`k` by `q.k` of each query (`[b][d]`) over `keys` (`[n][d]`),
/// into `hits` (every key scanned), one pass over the keys per query: the
/// fallback while an index is being built, and the benchmark's reference.
pub fn exact_search(keys: &[f32], d: usize, queries: &[f32], k: usize, hits: &mut Hits) {
    assert!(
        d > 0 && keys.len().is_multiple_of(d) && queries.len().is_multiple_of(d),
        "exact_search: shapes"
    );
    let n = keys.len() / d;
    let b = queries.len() / d;
    hits.reset(b, k);
    let mut s = vec![0.0f32; n];
    for i in 0..b {
        dense::scan(&queries[i * d..(i + 1) * d], keys, &mut s);
        let row = i * k..(i + 1) * k;
        let got = crate::topk::top_k(&s, k, &mut hits.ids[row.clone()], &mut hits.scores[row]);
        hits.found[i] = got as u32;
        hits.scanned[i] = n as u32;
    }
}

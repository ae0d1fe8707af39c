//! Retrieval indexes in the daemon (COMPUTE.md §5; the `BuildIndex` and
//! `Retrieve` RPCs and Attend's RETRIEVAL mode).
//!
//! A [`Group`] is the index of one (namespace, layer, chain of blocks): one
//! [`RetrievalIndex`] per chosen KV head (BuildIndex's `kv_heads`; all by
//! default), built in the background from the keys the store holds (read
//! and verified by [`ChainReader`], as Attend reads them) and the training
//! queries of the KV head's query heads. Groups are found by (namespace,
//! layer, first key) and chosen by the longest covered chain that is a
//! prefix of the caller's chain. Query heads whose KV head the group does
//! not hold are answered by an exact scan (`EXACT_NO_INDEX`).
//!
//! With `retrieval.auto_build`, stored blocks are noted as chain tails
//! ([`auto::Tails`]); a chain quiet for `auto_quiet_ms` with at least
//! `auto_min_tokens` tokens gets key-only indexes through [`Registry::build`]
//! ([`Registry::auto_tick`]), or, when a group already covers a prefix of
//! it, the new blocks inserted into that group.
//!
//! Invariants:
//! * a group's KV heads never change: asking for more heads replaces the
//!   group by one for the union; `indexes` counts each group's heads once,
//!   added at creation and subtracted at the drop;
//! * a group is tied to the exact blocks it covers: it keeps each block's
//!   key and checksum and every use compares them with the pinned chain; a
//!   mismatch or a missing block drops the group (the call scans exactly
//!   and says `stale`). Blocks deleted or evicted from every tier drop
//!   their groups at the next use or at the periodic sweep
//!   ([`Registry::sweep`], `retrieval.sweep_ms`), whichever comes first;
//! * ids of an index are token positions from the chain's first token:
//!   keys are built in chain order and new whole blocks are appended in
//!   order (`RetrievalIndex::insert`);
//! * the DRAM held (estimated while building, measured once built) is
//!   counted in one total bounded by `retrieval.max_bytes`; a build that
//!   would pass it is refused (RESOURCE_EXHAUSTED), never started;
//! * all accounting of a group happens under its state lock, and a dropped
//!   group accounts nothing more (a build finishing after the drop frees
//!   its result);
//! * indexes live in DRAM only: a restart forgets them (BuildIndex again).
//!   The math runs on the blocking pool, builds one at a time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge};
use strata_kernels::retrieval::{
    Hits, IndexConfig, RetrievalIndex, SearchParams, SearchScratch, exact_search,
};
use strata_proto::convert::RetrievalParams;
use strata_proto::{BlockKey, FieldError, KvKind, Layout, NamespaceId};
use tokio::sync::{Semaphore, watch};

use crate::attend::Geom;
use crate::attend::exec::{AttendCtx, ChainReader, SeqResult};
use crate::metrics::Registry as MetricsRegistry;
use crate::store::{ChainPin, Store, StoreError};

pub mod auto;
#[cfg(test)]
mod tests;

/// `retrieval.auto_*`: automatic key-only builds of quiet chains.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoConfig {
    /// Layers to index (empty: all of the layout's).
    pub layers: Vec<u32>,
    /// KV heads to index (empty: all; heads a layout lacks are ignored).
    pub kv_heads: Vec<u32>,
    /// A chain shorter than this is not indexed.
    pub min_tokens: u64,
    /// How long a chain must have had no new block.
    pub quiet: Duration,
    /// Pending chain tails kept (the oldest is dropped beyond).
    pub max_pending: usize,
    /// Longest chain walked back from its tail (`server.max_keys_per_call`:
    /// no call could use a longer one).
    pub max_blocks: usize,
}

impl Default for AutoConfig {
    fn default() -> Self {
        AutoConfig {
            layers: Vec::new(),
            kv_heads: Vec::new(),
            min_tokens: 4096,
            quiet: Duration::from_millis(500),
            max_pending: 4096,
            max_blocks: 4096,
        }
    }
}

/// The `[retrieval]` section, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalConfig {
    /// DRAM all indexes may hold together.
    pub max_bytes: u64,
    /// Threads of one build (the kernel's own).
    pub build_threads: usize,
    /// Training query rows per (layer, KV head) a BuildIndex may send.
    pub max_train_queries: usize,
    /// How often groups whose blocks are gone are looked for.
    pub sweep_interval: Duration,
    /// Automatic builds on publish (None: off).
    pub auto: Option<AutoConfig>,
}

impl Default for RetrievalConfig {
    fn default() -> Self {
        RetrievalConfig {
            max_bytes: 1 << 30,
            build_threads: 1,
            max_train_queries: 32768,
            sweep_interval: Duration::from_secs(1),
            auto: None,
        }
    }
}

/// Handles of the retrieval metrics.
pub struct RetrievalMetrics {
    pub index_bytes: Gauge,
    pub indexes: Gauge,
    pub builds: Counter,
    pub build_failures: Counter,
    pub dropped_stale: Counter,
    pub inserted_tokens: Counter,
    pub rebuilds: Counter,
    pub refused: Counter,
    pub searches_index: Counter,
    pub searches_exact: Counter,
    pub auto_builds: Counter,
    pub auto_extended: Counter,
    pub auto_skipped_short: Counter,
    pub auto_skipped_broken: Counter,
    pub auto_skipped_layout: Counter,
    pub auto_refused: Counter,
    pub auto_failed: Counter,
    pub auto_pending: Gauge,
    pub auto_pending_dropped: Counter,
}

impl RetrievalMetrics {
    pub fn new(r: &MetricsRegistry) -> Self {
        let searches = |source| {
            r.counter(
                "strata_retrieval_searches_total",
                "Query heads answered by Retrieve or Attend RETRIEVAL, by source",
                &[("source", source)],
            )
        };
        let skipped = |reason| {
            r.counter(
                "strata_retrieval_auto_skipped_total",
                "Quiet chains auto_build did not index, by reason",
                &[("reason", reason)],
            )
        };
        RetrievalMetrics {
            index_bytes: r.gauge(
                "strata_retrieval_index_bytes",
                "DRAM held by retrieval indexes (estimated while building)",
                &[],
            ),
            indexes: r.gauge(
                "strata_retrieval_indexes",
                "Retrieval indexes held, per layer and KV head (building or ready)",
                &[],
            ),
            builds: r.counter(
                "strata_retrieval_builds_total",
                "Retrieval index builds finished (per KV head)",
                &[],
            ),
            build_failures: r.counter(
                "strata_retrieval_build_failures_total",
                "Retrieval index builds that failed (per KV head)",
                &[],
            ),
            dropped_stale: r.counter(
                "strata_retrieval_dropped_total",
                "Retrieval index groups dropped because a covered block changed or is gone",
                &[],
            ),
            inserted_tokens: r.counter(
                "strata_retrieval_inserted_tokens_total",
                "Tokens inserted into retrieval indexes (per KV head)",
                &[],
            ),
            rebuilds: r.counter(
                "strata_retrieval_rebuilds_total",
                "Retrieval indexes rebuilt after a quarter of their keys were inserted",
                &[],
            ),
            refused: r.counter(
                "strata_server_limit_rejections_total",
                "Requests refused by a configured limit",
                &[("limit", "retrieval.max_bytes")],
            ),
            searches_index: searches("index"),
            searches_exact: searches("exact"),
            auto_builds: r.counter(
                "strata_retrieval_auto_builds_total",
                "Retrieval index groups (one chain, one layer) built by auto_build",
                &[],
            ),
            auto_extended: r.counter(
                "strata_retrieval_auto_extended_total",
                "Groups auto_build found covering a prefix of a quiet chain and brought up to its end",
                &[],
            ),
            auto_skipped_short: skipped("short"),
            auto_skipped_broken: skipped("broken"),
            auto_skipped_layout: skipped("layout"),
            auto_refused: skipped("max_bytes"),
            auto_failed: skipped("error"),
            auto_pending: r.gauge(
                "strata_retrieval_auto_pending",
                "Chain tails auto_build is waiting on (quiet period not over)",
                &[],
            ),
            auto_pending_dropped: r.counter(
                "strata_retrieval_auto_pending_dropped_total",
                "Chain tails auto_build forgot because too many were pending (the oldest goes)",
                &[],
            ),
        }
    }
}

/// Where a query head's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Index,
    /// Exact scan: no index covers the chain and layer.
    NoIndex,
    /// Exact scan: the index is being built (or failed).
    Building,
    /// Exact scan: a covered block changed or is gone; the index was dropped.
    Stale,
}

/// State of one KV head's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Building,
    Ready,
    Failed,
}

/// What BuildIndex reports per (layer, KV head).
#[derive(Debug, Clone)]
pub struct HeadStatus {
    pub layer: u32,
    pub kv_head: u32,
    pub state: State,
    pub progress: f32,
    pub tokens: u64,
    pub inserted: u64,
    pub memory_bytes: u64,
    pub default_ef: u32,
    pub error: String,
}

/// A BuildIndex answer.
#[derive(Debug, Clone)]
pub struct BuildAnswer {
    pub keys_covered: u32,
    pub tokens_covered: u64,
    pub heads: Vec<HeadStatus>,
}

/// A Retrieve answer: per query head, `[k]` positions and scores.
#[derive(Debug, Clone)]
pub struct RetrieveAnswer {
    pub positions: Vec<Vec<u64>>,
    pub scores: Vec<Vec<f32>>,
    pub scanned: Vec<u32>,
    /// Per query head.
    pub source: Vec<Source>,
    pub keys_present: u32,
    pub tokens_present: u64,
    pub inserted_tokens: u64,
}

/// Attend RETRIEVAL's answer for one sequence.
#[derive(Debug, Clone)]
pub struct AttendAnswer {
    pub result: SeqResult,
    /// Per KV head.
    pub source: Vec<Source>,
    /// Per query head.
    pub scanned: Vec<u32>,
}

/// A block an index covers, as it was when its keys were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Covered {
    key: BlockKey,
    checksum: u64,
    tokens: u32,
}

enum Head {
    Building { progress: f32 },
    Ready { index: Arc<RetrievalIndex> },
    Failed(String),
}

struct GroupState {
    blocks: Vec<Covered>,
    /// Per indexed KV head (`Group::kv`).
    heads: Vec<Head>,
    /// Bytes this group has counted in the registry's total.
    bytes: u64,
    /// Per indexed KV head, `[m][d]` training queries (kept for rebuilds;
    /// empty: key-only).
    train: Vec<Arc<Vec<f32>>>,
    rebuilding: bool,
    /// What a head still building counts (its share of the estimate).
    est_per_head: u64,
}

/// The indexes of one (namespace, layer, chain).
pub struct Group {
    ns: NamespaceId,
    layer: u32,
    geom: Geom,
    /// The KV heads indexed, ascending; `state.heads[i]` and
    /// `state.train[i]` are KV head `kv[i]`'s. Fixed for the group's life.
    kv: Vec<u32>,
    state: tokio::sync::Mutex<GroupState>,
    /// The covered keys (a copy of `state.blocks`' keys, readable without
    /// waiting for a call that holds the state).
    chain: Mutex<Vec<BlockKey>>,
    dropped: AtomicBool,
    /// True once every head is ready or failed.
    done: watch::Sender<bool>,
}

type GroupKey = (NamespaceId, u32, BlockKey);

/// Every retrieval index of a daemon.
pub struct Registry {
    cfg: RetrievalConfig,
    attend: Arc<AttendCtx>,
    store: Arc<Store>,
    groups: Mutex<HashMap<GroupKey, Vec<Arc<Group>>>>,
    bytes: AtomicU64,
    indexes: AtomicU64,
    builds: Arc<Semaphore>,
    /// Builds wait for a read guard (tests hold the write guard to keep
    /// indexes building).
    hold: Arc<tokio::sync::RwLock<()>>,
    /// Chain tails noted for `auto_build` (None: off).
    tails: Option<Arc<auto::Tails>>,
    metrics: RetrievalMetrics,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("retrieval::Registry")
            .field("cfg", &self.cfg)
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// Checks that a layout can be indexed.
fn check_layout(layout: &Layout, layer: u32, field: &str) -> Result<Geom, FieldError> {
    if layout.kv_kind == KvKind::Mla {
        return Err(FieldError::new(
            "namespace_id",
            "the namespace's layout is MLA; retrieval serves layouts with separate K and V",
        ));
    }
    let geom = Geom::of(layout).ok_or_else(|| {
        FieldError::new(
            "namespace_id",
            "the namespace's layout stores fp8_e4m3; retrieval serves f32, f16 and bf16 KV",
        )
    })?;
    if layer >= layout.num_layers {
        return Err(FieldError::new(
            field,
            format!("{layer} is out of range ({} layers)", layout.num_layers),
        ));
    }
    Ok(geom)
}

/// Heads of `q` (`[heads][d]`), a multiple of the KV heads.
fn query_heads(q: &[f32], geom: Geom, field: &str) -> Result<usize, FieldError> {
    let (d, kv) = (geom.head_dim as usize, geom.kv_heads as usize);
    if !q.len().is_multiple_of(d) {
        return Err(FieldError::new(
            field,
            format!("{} values are not whole heads of head_dim {d}", q.len()),
        ));
    }
    let heads = q.len() / d;
    if heads == 0 || !heads.is_multiple_of(kv) {
        return Err(FieldError::new(
            field,
            format!("{heads} heads is not a multiple of the layout's {kv} KV heads"),
        ));
    }
    Ok(heads)
}

/// Bytes a build of `n` keys with `m` training rows is expected to hold
/// (keys, norms, adjacency of 24 + 48 + 8 slots, the training queries kept
/// for rebuilds, routing).
fn estimate(n: usize, m: usize, d: usize) -> u64 {
    (n * (4 * d + 4 + 4 * 80 + 1) + 4 * m * d + (64 << 10)) as u64
}

fn train_bytes(t: &[f32]) -> u64 {
    (t.len() * 4) as u64
}

impl Registry {
    pub fn new(
        cfg: RetrievalConfig,
        attend: Arc<AttendCtx>,
        store: Arc<Store>,
        metrics: RetrievalMetrics,
    ) -> Self {
        let tails = cfg.auto.as_ref().map(|a| {
            Arc::new(auto::Tails::new(
                a.max_pending,
                metrics.auto_pending_dropped.clone(),
                metrics.auto_pending.clone(),
            ))
        });
        Registry {
            cfg,
            attend,
            store,
            groups: Mutex::new(HashMap::new()),
            bytes: AtomicU64::new(0),
            indexes: AtomicU64::new(0),
            builds: Arc::new(Semaphore::new(1)),
            hold: Arc::new(tokio::sync::RwLock::new(())),
            tails,
            metrics,
        }
    }

    /// The tails `auto_build` notes (to install as the store's publish
    /// hook); None when it is off.
    pub fn auto_tails(&self) -> Option<Arc<auto::Tails>> {
        self.tails.clone()
    }

    pub fn config(&self) -> &RetrievalConfig {
        &self.cfg
    }

    /// DRAM the indexes hold (estimates for those building).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Indexes held (per layer and KV head).
    pub fn indexes(&self) -> u64 {
        self.indexes.load(Ordering::Relaxed)
    }

    /// Keeps every build waiting until the guard is dropped (tests: the
    /// fallback while building, deterministically).
    pub async fn hold_builds(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.hold.clone().write_owned().await
    }

    fn account(&self, st: &mut GroupState, bytes: u64) {
        if bytes >= st.bytes {
            self.bytes.fetch_add(bytes - st.bytes, Ordering::Relaxed);
        } else {
            self.bytes.fetch_sub(st.bytes - bytes, Ordering::Relaxed);
        }
        st.bytes = bytes;
        self.metrics.index_bytes.set(self.bytes() as f64);
    }

    /// Removes `g` from the registry and frees what it counted. Idempotent.
    async fn drop_group(&self, g: &Arc<Group>) {
        if g.dropped.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let mut map = self.groups.lock().expect("retrieval registry lock");
            let first = {
                // The key is the first covered block's; found by identity.
                map.iter()
                    .find(|(_, v)| v.iter().any(|x| Arc::ptr_eq(x, g)))
                    .map(|(k, _)| *k)
            };
            if let Some(k) = first
                && let Some(v) = map.get_mut(&k)
            {
                v.retain(|x| !Arc::ptr_eq(x, g));
                if v.is_empty() {
                    map.remove(&k);
                }
            }
        }
        let mut st = g.state.lock().await;
        self.account(&mut st, 0);
        st.heads.clear();
        // Counted per indexed KV head at creation (the heads may be out of
        // the state while an insert runs, so their number is not used here).
        self.indexes.fetch_sub(g.kv.len() as u64, Ordering::Relaxed);
        self.metrics.indexes.set(self.indexes() as f64);
        let _ = g.done.send(true);
    }

    /// The group whose covered chain is the longest prefix of `keys`.
    fn find(&self, ns: NamespaceId, layer: u32, keys: &[BlockKey]) -> Option<Arc<Group>> {
        let map = self.groups.lock().expect("retrieval registry lock");
        let v = map.get(&(ns, layer, *keys.first()?))?;
        v.iter()
            .filter(|g| !g.dropped.load(Ordering::Acquire))
            .filter_map(|g| {
                let chain = g.chain.lock().expect("retrieval chain lock");
                let n = chain.len();
                (n <= keys.len() && chain.iter().zip(keys).all(|(c, k)| c == k))
                    .then(|| (n, g.clone()))
            })
            .max_by_key(|(n, _)| *n)
            .map(|(_, g)| g)
    }

    /// Starts the indexes of `keys`' present prefix for `layers` (empty:
    /// all) and `kv_heads` (empty: all), or reports those that exist; with
    /// `wait`, answers once each is ready or failed.
    ///
    /// A group over exactly the same blocks is reused as it is, unless it
    /// failed, lacks a KV head asked for, or is key-only while the call
    /// brings training queries for its layer: then it is replaced by a new
    /// group over the union of its KV heads and those asked for (training
    /// queries: the call's, else the old group's, per KV head).
    pub async fn build(
        self: &Arc<Self>,
        req: strata_proto::convert::BuildIndexReq,
        layout: &Layout,
    ) -> Result<BuildAnswer, StoreError> {
        let layers: Vec<u32> = if req.layers.is_empty() {
            (0..layout.num_layers).collect()
        } else {
            req.layers.clone()
        };
        let mut geom = None;
        for (i, &l) in layers.iter().enumerate() {
            geom = Some(check_layout(layout, l, &format!("layers[{i}]"))?);
        }
        let geom = geom.ok_or_else(|| FieldError::new("layers", "the layout has no layers"))?;
        let (d, kv) = (geom.head_dim as usize, geom.kv_heads as usize);
        for (i, &h) in req.kv_heads.iter().enumerate() {
            if h as usize >= kv {
                return Err(FieldError::new(
                    format!("kv_heads[{i}]"),
                    format!("{h} is out of range (the layout has {kv} KV heads)"),
                )
                .into());
            }
            if req.kv_heads[..i].contains(&h) {
                return Err(FieldError::new(
                    format!("kv_heads[{i}]"),
                    format!("KV head {h} is listed twice"),
                )
                .into());
            }
        }
        let asked: Vec<u32> = if req.kv_heads.is_empty() {
            (0..kv as u32).collect()
        } else {
            let mut v = req.kv_heads.clone();
            v.sort_unstable();
            v
        };
        // Training queries per layer, split per KV head.
        let mut train: HashMap<u32, Vec<Arc<Vec<f32>>>> = HashMap::new();
        for (i, t) in req.training.iter().enumerate() {
            let f = |name: &str| format!("training_queries[{i}].{name}");
            let heads = t.heads as usize;
            if heads == 0 || !heads.is_multiple_of(kv) {
                return Err(FieldError::new(
                    f("num_q_heads"),
                    format!("{heads} is not a positive multiple of the layout's {kv} KV heads"),
                )
                .into());
            }
            if t.queries.is_empty() || !t.queries.len().is_multiple_of(heads * d) {
                return Err(FieldError::new(
                    f("queries"),
                    format!(
                        "{} values are not [m][{heads}][{d}] (num_q_heads, head_dim)",
                        t.queries.len()
                    ),
                )
                .into());
            }
            let per_kv = t.queries.len() / d / kv;
            if per_kv > self.cfg.max_train_queries {
                return Err(FieldError::new(
                    f("queries"),
                    format!(
                        "{per_kv} rows per KV head; the limit is {} (retrieval.max_train_queries)",
                        self.cfg.max_train_queries
                    ),
                )
                .into());
            }
            if t.layer >= layout.num_layers {
                return Err(FieldError::new(
                    f("layer"),
                    format!("{} is out of range ({} layers)", t.layer, layout.num_layers),
                )
                .into());
            }
            if !layers.contains(&t.layer) {
                return Err(FieldError::new(
                    f("layer"),
                    format!("layer {} is not among the layers to index", t.layer),
                )
                .into());
            }
            train.insert(t.layer, split_train(&t.queries, heads, kv, d));
        }
        let mut groups = Vec::with_capacity(layers.len());
        let mut covered = (0u32, 0u64);
        for &layer in &layers {
            let pin = self.store.pin_chain(req.namespace, &req.keys)?;
            if pin.blocks.is_empty() {
                return Err(
                    FieldError::new("keys", "keys[0] is not stored; nothing to index").into(),
                );
            }
            let reader = ChainReader::new(req.namespace, geom, layer, 1.0, Vec::new(), pin);
            let blocks: Vec<Covered> = reader
                .blocks()
                .iter()
                .zip(reader.tokens())
                .map(|(b, &t)| Covered {
                    key: b.key,
                    checksum: b.checksum,
                    tokens: t,
                })
                .collect();
            if blocks.is_empty() {
                return Err(FieldError::new(
                    "keys",
                    "keys[0] does not hold whole tokens of the namespace's layout",
                )
                .into());
            }
            let n: usize = blocks.iter().map(|c| c.tokens as usize).sum();
            covered = (blocks.len() as u32, n as u64);
            // The KV heads to build, and the training queries each had.
            let mut heads = asked.clone();
            let mut old_train: HashMap<u32, Arc<Vec<f32>>> = HashMap::new();
            // The group this one replaces, and the bytes it holds.
            let mut replace: Option<(Arc<Group>, u64)> = None;
            let given = train.get(&layer);
            if let Some(g) = self.find(req.namespace, layer, &req.keys) {
                let st = g.state.lock().await;
                let same = st.blocks == blocks;
                let failed = st.heads.iter().any(|h| matches!(h, Head::Failed(_)));
                let lacks = asked.iter().any(|h| !g.kv.contains(h));
                let key_only = st.train.iter().all(|t| t.is_empty());
                let held = st.bytes;
                if same {
                    old_train = g.kv.iter().copied().zip(st.train.iter().cloned()).collect();
                }
                drop(st);
                let gains_queries = key_only && given.is_some();
                if same && !failed && !lacks && !gains_queries {
                    groups.push(g);
                    continue;
                }
                if same {
                    // Failed before, lacks a head, or gains training
                    // queries: build again, for every head either wants
                    // (the old group goes once the new one is reserved).
                    heads.extend(g.kv.iter().copied());
                    heads.sort_unstable();
                    heads.dedup();
                    replace = Some((g, held));
                }
            }
            let t: Vec<Arc<Vec<f32>>> = heads
                .iter()
                .map(|&h| match given {
                    Some(all) => all[h as usize].clone(),
                    None => old_train
                        .get(&h)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(Vec::new())),
                })
                .collect();
            let nh = heads.len();
            let est: u64 = t.iter().map(|q| estimate(n, q.len() / d, d)).sum();
            // Reserve under the map lock so that two builds cannot both
            // pass the cap.
            let g = {
                let mut map = self.groups.lock().expect("retrieval registry lock");
                let now = self.bytes();
                let freed = replace.as_ref().map_or(0, |(_, b)| *b);
                if now.saturating_sub(freed) + est > self.cfg.max_bytes {
                    self.metrics.refused.increment(1);
                    return Err(StoreError::Limit {
                        limit: "retrieval.max_bytes",
                        detail: format!(
                            "indexing layer {layer} ({n} tokens, {nh} KV heads) needs about {est} bytes; {now} of {} are held",
                            self.cfg.max_bytes
                        ),
                    });
                }
                self.bytes.fetch_add(est, Ordering::Relaxed);
                self.indexes.fetch_add(nh as u64, Ordering::Relaxed);
                self.metrics.index_bytes.set(self.bytes() as f64);
                self.metrics.indexes.set(self.indexes() as f64);
                let g = Arc::new(Group {
                    ns: req.namespace,
                    layer,
                    geom,
                    kv: heads,
                    chain: Mutex::new(blocks.iter().map(|c| c.key).collect()),
                    state: tokio::sync::Mutex::new(GroupState {
                        est_per_head: est / nh as u64,
                        blocks,
                        heads: (0..nh).map(|_| Head::Building { progress: 0.0 }).collect(),
                        bytes: est,
                        train: t,
                        rebuilding: false,
                    }),
                    dropped: AtomicBool::new(false),
                    done: watch::channel(false).0,
                });
                map.entry((req.namespace, layer, req.keys[0]))
                    .or_default()
                    .push(g.clone());
                g
            };
            if let Some((old, _)) = replace {
                self.drop_group(&old).await;
            }
            let (this, g2) = (self.clone(), g.clone());
            tokio::spawn(async move { this.run_build(g2, reader).await });
            groups.push(g);
        }
        if req.wait {
            for g in &groups {
                let mut rx = g.done.subscribe();
                let _ = rx.wait_for(|d| *d).await;
            }
        }
        let mut heads = Vec::new();
        for g in &groups {
            heads.extend(status(g, &asked).await);
        }
        Ok(BuildAnswer {
            keys_covered: covered.0,
            tokens_covered: covered.1,
            heads,
        })
    }

    /// Reads the layer's keys and builds the index of each of the group's
    /// KV heads, one build at a time in the daemon.
    async fn run_build(self: Arc<Self>, g: Arc<Group>, reader: ChainReader) {
        let _permit = self.builds.clone().acquire_owned().await;
        let _hold = self.hold.clone().read_owned().await;
        if g.dropped.load(Ordering::Acquire) {
            return;
        }
        let want = { g.state.lock().await.blocks.len() };
        let r = reader.read_k(&self.attend, 0..want).await;
        let mut keys = match r {
            Ok((reader, k)) if reader.present() >= want => {
                drop(reader);
                k
            }
            Ok((reader, _)) => {
                let why = format!(
                    "block keys[{}] could not be read or failed its check",
                    reader.present()
                );
                self.fail_all(&g, why).await;
                return;
            }
            Err(e) => {
                self.fail_all(&g, e.to_string()).await;
                return;
            }
        };
        {
            let mut st = g.state.lock().await;
            for h in st.heads.iter_mut() {
                *h = Head::Building { progress: 0.25 };
            }
        }
        let d = g.geom.head_dim as usize;
        let cfg = IndexConfig {
            threads: self.cfg.build_threads,
            ..IndexConfig::default()
        };
        // Keys of heads not indexed are not kept while the others build.
        for (h, k) in keys.iter_mut().enumerate() {
            if !g.kv.contains(&(h as u32)) {
                *k = Vec::new();
            }
        }
        for (h, &kv_head) in g.kv.iter().enumerate() {
            let k = std::mem::take(&mut keys[kv_head as usize]);
            let t = { g.state.lock().await.train[h].clone() };
            let cfg = cfg.clone();
            let built =
                tokio::task::spawn_blocking(move || RetrievalIndex::build(&k, d, &t, &cfg)).await;
            let mut st = g.state.lock().await;
            if g.dropped.load(Ordering::Acquire) {
                return;
            }
            match built {
                Ok(Ok(index)) => {
                    self.metrics.builds.increment(1);
                    st.heads[h] = Head::Ready {
                        index: Arc::new(index),
                    };
                }
                Ok(Err(e)) => {
                    self.metrics.build_failures.increment(1);
                    st.heads[h] = Head::Failed(e.to_string());
                }
                Err(e) => {
                    self.metrics.build_failures.increment(1);
                    st.heads[h] = Head::Failed(format!("build task failed: {e}"));
                }
            }
            let bytes = measured(&st);
            self.account(&mut st, bytes);
        }
        let _ = g.done.send(true);
    }

    async fn fail_all(&self, g: &Arc<Group>, why: String) {
        let mut st = g.state.lock().await;
        if g.dropped.load(Ordering::Acquire) {
            return;
        }
        for h in st.heads.iter_mut() {
            *h = Head::Failed(why.clone());
        }
        self.metrics.build_failures.increment(st.heads.len() as u64);
        let train: u64 = st.train.iter().map(|t| train_bytes(t)).sum();
        self.account(&mut st, train);
        let _ = g.done.send(true);
    }

    /// Drops the groups some of whose blocks are no longer stored (deleted,
    /// evicted from every tier, namespace evicted). Blocks replaced under
    /// the same key are caught at use (checksums).
    pub async fn sweep(&self) -> usize {
        let all: Vec<Arc<Group>> = {
            let map = self.groups.lock().expect("retrieval registry lock");
            map.values().flatten().cloned().collect()
        };
        let mut dropped = 0;
        for g in all {
            let keys: Vec<BlockKey> = g.chain.lock().expect("retrieval chain lock").clone();
            if keys.iter().any(|k| !self.store.contains(g.ns, k)) {
                self.metrics.dropped_stale.increment(1);
                self.drop_group(&g).await;
                dropped += 1;
            }
        }
        dropped
    }

    /// Top-k per query head (`q`: `[heads][d]`) over the chain's present
    /// prefix: from its index when ready, else an exact scan.
    pub async fn retrieve(
        self: &Arc<Self>,
        req: strata_proto::convert::RetrieveReq,
        layout: &Layout,
    ) -> Result<RetrieveAnswer, StoreError> {
        let geom = check_layout(layout, req.layer, "layer")?;
        query_heads(&req.queries, geom, "queries")?;
        let pin = self.store.pin_chain(req.namespace, &req.keys)?;
        let reader = ChainReader::new(req.namespace, geom, req.layer, 1.0, Vec::new(), pin);
        let (reader, sel) = self
            .select(
                req.namespace,
                geom,
                req.layer,
                &req.keys,
                &req.queries,
                req.params,
                reader,
            )
            .await?;
        drop(reader);
        let d = geom.head_dim as usize;
        let heads = req.queries.len() / d;
        let kv = geom.kv_heads as usize;
        let g = heads / kv;
        let source = (0..heads).map(|j| sel.source[j / g]).collect();
        Ok(RetrieveAnswer {
            positions: sel
                .ids
                .iter()
                .map(|v| v.iter().map(|&t| t as u64).collect())
                .collect(),
            scores: sel.scores,
            scanned: sel.scanned,
            source,
            keys_present: sel.keys_present,
            tokens_present: sel.tokens_present,
            inserted_tokens: sel.inserted,
        })
    }

    /// Attend RETRIEVAL for one sequence: the union of each KV head's query
    /// heads' top-k, attended exactly.
    #[allow(clippy::too_many_arguments)]
    pub async fn attend(
        self: &Arc<Self>,
        ns: NamespaceId,
        layout: &Layout,
        layer: u32,
        scale: f32,
        pin: ChainPin,
        q: Vec<f32>,
        params: RetrievalParams,
    ) -> Result<AttendAnswer, StoreError> {
        let geom = check_layout(layout, layer, "layer")?;
        // The pinned prefix's keys find the chain's indexes (an index never
        // covers blocks past the present prefix; see `catch_up`).
        let keys: Vec<BlockKey> = pin.blocks.iter().map(|b| b.key).collect();
        let reader = ChainReader::new(ns, geom, layer, scale, q.clone(), pin);
        let (reader, sel) = self
            .select(ns, geom, layer, &keys, &q, params, reader)
            .await?;
        let kv = geom.kv_heads as usize;
        let heads = sel.ids.len();
        let g = heads / kv;
        let chosen: Vec<Vec<u32>> = (0..kv)
            .map(|h| {
                let mut c: Vec<u32> = sel.ids[h * g..(h + 1) * g]
                    .iter()
                    .flatten()
                    .copied()
                    .collect();
                c.sort_unstable();
                c.dedup();
                c
            })
            .collect();
        let result = reader.attend(&self.attend, chosen).await?;
        Ok(AttendAnswer {
            result,
            source: sel.source,
            scanned: sel.scanned,
        })
    }

    /// Compares `g`'s covered blocks with the pinned chain and, when every
    /// head is ready, inserts the whole new blocks present past its
    /// coverage into each head's index and appends them to the covered
    /// chain (a background rebuild starts once a quarter of an index is
    /// new). `st` is held throughout and handed back when the group is
    /// usable; a mismatch or a failed insert drops the group.
    async fn catch_up<'a>(
        self: &Arc<Self>,
        g: &'a Arc<Group>,
        mut st: tokio::sync::MutexGuard<'a, GroupState>,
        reader: ChainReader,
    ) -> Result<(ChainReader, CatchUp<'a>), StoreError> {
        if g.dropped.load(Ordering::Acquire) {
            return Ok((reader, CatchUp::Stale));
        }
        let n = st.blocks.len();
        let pinned = reader.blocks();
        let matches = pinned.len() >= n
            && st
                .blocks
                .iter()
                .zip(pinned)
                .all(|(c, b)| c.key == b.key && c.checksum == b.checksum);
        if !matches {
            drop(st);
            self.metrics.dropped_stale.increment(1);
            self.drop_group(g).await;
            return Ok((reader, CatchUp::Stale));
        }
        if !st.heads.iter().all(|h| matches!(h, Head::Ready { .. })) {
            return Ok((reader, CatchUp::NotReady));
        }
        let mut reader = reader;
        let mut inserted = 0u64;
        if reader.present() > n {
            let present = reader.present();
            let (r2, new_keys) = reader.read_k(&self.attend, n..present).await?;
            reader = r2;
            let got = reader.present().saturating_sub(n);
            let add: Vec<Covered> = reader.blocks()[n..n + got]
                .iter()
                .zip(&reader.tokens()[n..n + got])
                .map(|(b, &t)| Covered {
                    key: b.key,
                    checksum: b.checksum,
                    tokens: t,
                })
                .collect();
            let tokens: usize = add.iter().map(|c| c.tokens as usize).sum();
            if tokens > 0 {
                let d = g.geom.head_dim as usize;
                let kvs = g.kv.clone();
                let mut idx: Vec<Arc<RetrievalIndex>> = st
                    .heads
                    .iter()
                    .map(|h| match h {
                        Head::Ready { index } => index.clone(),
                        _ => unreachable!("all ready"),
                    })
                    .collect();
                st.heads.clear();
                let r = self
                    .attend
                    .blocking(move || {
                        let mut err = None;
                        for (ix, &h) in idx.iter_mut().zip(&kvs) {
                            let ix = Arc::make_mut(ix);
                            if let Err(e) = ix.insert(&new_keys[h as usize][..tokens * d]) {
                                err = Some(e.to_string());
                            }
                        }
                        (idx, err)
                    })
                    .await;
                let (idx, err) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        drop(st);
                        self.drop_group(g).await;
                        return Err(e);
                    }
                };
                if let Some(e) = err {
                    drop(st);
                    self.drop_group(g).await;
                    return Err(StoreError::Internal(format!(
                        "retrieval insert failed: {e}"
                    )));
                }
                let rebuild = idx.iter().any(|i| i.needs_rebuild());
                st.heads = idx.into_iter().map(|index| Head::Ready { index }).collect();
                g.chain
                    .lock()
                    .expect("retrieval chain lock")
                    .extend(add.iter().map(|c| c.key));
                st.blocks.extend(add);
                inserted = tokens as u64;
                self.metrics
                    .inserted_tokens
                    .increment(inserted * st.heads.len() as u64);
                let bytes = measured(&st);
                self.account(&mut st, bytes);
                if rebuild && !st.rebuilding {
                    st.rebuilding = true;
                    let (this, g2) = (self.clone(), g.clone());
                    tokio::spawn(async move { this.rebuild(g2).await });
                }
            }
        }
        Ok((reader, CatchUp::Ready { st, inserted }))
    }

    /// The shared part of Retrieve and Attend RETRIEVAL: per KV head, the
    /// chain's index when its group holds that head and is ready, else an
    /// exact scan (with the reason).
    #[allow(clippy::too_many_arguments)]
    async fn select(
        self: &Arc<Self>,
        ns: NamespaceId,
        geom: Geom,
        layer: u32,
        keys: &[BlockKey],
        q: &[f32],
        params: RetrievalParams,
        reader: ChainReader,
    ) -> Result<(ChainReader, Selection), StoreError> {
        let (d, kv) = (geom.head_dim as usize, geom.kv_heads as usize);
        let heads = q.len() / d;
        let per_kv = (heads / kv) as u64;
        // Why each KV head is scanned exactly, when it is.
        let mut reason = vec![Source::NoIndex; kv];
        let mut reader = reader;
        if let Some(g) = self.find(ns, layer, keys) {
            let st = g.state.lock().await;
            let (r, used) = self.catch_up(&g, st, reader).await?;
            reader = r;
            match used {
                CatchUp::Stale => reason = vec![Source::Stale; kv],
                CatchUp::NotReady => {
                    for &h in &g.kv {
                        reason[h as usize] = Source::Building;
                    }
                }
                CatchUp::Ready { st, inserted } => {
                    let covered = st.blocks.len();
                    let idx: Vec<(u32, Arc<RetrievalIndex>)> =
                        g.kv.iter()
                            .zip(&st.heads)
                            .map(|(&h, head)| match head {
                                Head::Ready { index } => (h, index.clone()),
                                _ => unreachable!("all ready"),
                            })
                            .collect();
                    drop(st);
                    // Only the covered prefix is searched: blocks past it
                    // that could not be read stay out (and out of `present`).
                    let sel = Selection::new(heads, kv, Source::NoIndex);
                    let mut sel = self.search(sel, idx, q, params, geom).await?;
                    sel.inserted = inserted;
                    sel.keys_present = covered as u32;
                    sel.tokens_present = reader.tokens()[..covered].iter().map(|&t| t as u64).sum();
                    self.metrics
                        .searches_index
                        .increment(g.kv.len() as u64 * per_kv);
                    let rest: Vec<usize> =
                        (0..kv).filter(|&h| !g.kv.contains(&(h as u32))).collect();
                    if !rest.is_empty() {
                        // KV heads the group does not hold: exact over the
                        // same covered prefix (shorter if a block no longer
                        // reads; then the answer says so).
                        let (r, k) = reader.read_k(&self.attend, 0..covered).await?;
                        reader = r;
                        self.metrics
                            .searches_exact
                            .increment(rest.len() as u64 * per_kv);
                        sel = self.exact(sel, k, rest, q, params, geom).await?;
                        if reader.present() < covered {
                            sel.keys_present = reader.present() as u32;
                            sel.tokens_present = reader.tokens().iter().map(|&t| t as u64).sum();
                        }
                    }
                    return Ok((reader, sel));
                }
            }
        }
        let present = reader.present();
        let (reader, k) = reader.read_k(&self.attend, 0..present).await?;
        let mut sel = Selection::new(heads, kv, Source::NoIndex);
        sel.source = reason;
        let mut sel = self
            .exact(sel, k, (0..kv).collect(), q, params, geom)
            .await?;
        sel.keys_present = reader.present() as u32;
        sel.tokens_present = reader.tokens().iter().map(|&t| t as u64).sum();
        self.metrics.searches_exact.increment(heads as u64);
        Ok((reader, sel))
    }

    /// Fills `sel` for the KV heads of `idx` from their indexes.
    async fn search(
        &self,
        sel: Selection,
        idx: Vec<(u32, Arc<RetrievalIndex>)>,
        q: &[f32],
        params: RetrievalParams,
        geom: Geom,
    ) -> Result<Selection, StoreError> {
        let (d, kv) = (geom.head_dim as usize, geom.kv_heads as usize);
        let heads = q.len() / d;
        let g = heads / kv;
        let q = q.to_vec();
        self.attend
            .blocking(move || {
                let mut sel = sel;
                let mut scratch = SearchScratch::new();
                let mut hits = Hits::new();
                for (h, ix) in &idx {
                    let h = *h as usize;
                    let ef = params
                        .ef
                        .map_or(ix.default_params().ef(), |e| e as usize)
                        .max(params.k as usize);
                    let p = SearchParams::new(params.k as usize, ef)
                        .map_err(|e| StoreError::Internal(e.to_string()))?;
                    ix.search(&q[h * g * d..(h + 1) * g * d], &p, &mut scratch, &mut hits);
                    for i in 0..g {
                        sel.ids[h * g + i] = hits.ids(i).to_vec();
                        sel.scores[h * g + i] = hits.scores(i).to_vec();
                        sel.scanned[h * g + i] = hits.scanned[i];
                    }
                    sel.source[h] = Source::Index;
                }
                Ok(sel)
            })
            .await?
    }

    /// Fills `sel` for the KV heads `scan` by an exact scan of `k`
    /// (`[kv_head][n][d]`); their sources stay as `sel` says.
    async fn exact(
        &self,
        sel: Selection,
        k: Vec<Vec<f32>>,
        scan: Vec<usize>,
        q: &[f32],
        params: RetrievalParams,
        geom: Geom,
    ) -> Result<Selection, StoreError> {
        let (d, kv) = (geom.head_dim as usize, geom.kv_heads as usize);
        let heads = q.len() / d;
        let g = heads / kv;
        let q = q.to_vec();
        self.attend
            .blocking(move || {
                let mut sel = sel;
                let mut hits = Hits::new();
                for h in scan {
                    exact_search(
                        &k[h],
                        d,
                        &q[h * g * d..(h + 1) * g * d],
                        params.k as usize,
                        &mut hits,
                    );
                    for i in 0..g {
                        sel.ids[h * g + i] = hits.ids(i).to_vec();
                        sel.scores[h * g + i] = hits.scores(i).to_vec();
                        sel.scanned[h * g + i] = hits.scanned[i];
                    }
                }
                sel
            })
            .await
    }

    /// Rebuilds every index of `g` from its keys (inserted ones included)
    /// and training queries, in the background; keys inserted meanwhile are
    /// inserted into the new index before it replaces the old one.
    async fn rebuild(self: Arc<Self>, g: Arc<Group>) {
        let _permit = self.builds.clone().acquire_owned().await;
        let _hold = self.hold.clone().read_owned().await;
        let d = g.geom.head_dim as usize;
        let cfg = IndexConfig {
            threads: self.cfg.build_threads,
            ..IndexConfig::default()
        };
        // Each indexed KV head (`heads[h]` is KV head `g.kv[h]`'s).
        for h in 0..g.kv.len() {
            let (keys, t) = {
                let st = g.state.lock().await;
                match st.heads.get(h) {
                    Some(Head::Ready { index }) => (index.keys().to_vec(), st.train[h].clone()),
                    _ => return,
                }
            };
            let had = keys.len() / d;
            let cfg = cfg.clone();
            let built =
                tokio::task::spawn_blocking(move || RetrievalIndex::build(&keys, d, &t, &cfg))
                    .await;
            let Ok(Ok(mut fresh)) = built else {
                self.metrics.build_failures.increment(1);
                continue;
            };
            let mut st = g.state.lock().await;
            if g.dropped.load(Ordering::Acquire) {
                return;
            }
            if let Some(Head::Ready { index }) = st.heads.get(h) {
                if index.len() > had && fresh.insert(&index.keys()[had * d..]).is_err() {
                    continue;
                }
                st.heads[h] = Head::Ready {
                    index: Arc::new(fresh),
                };
                self.metrics.rebuilds.increment(1);
                let bytes = measured(&st);
                self.account(&mut st, bytes);
            }
        }
        g.state.lock().await.rebuilding = false;
    }
}

/// What [`Registry::catch_up`] found.
enum CatchUp<'a> {
    /// Every head is ready and covers the chain's present prefix (or as
    /// much of it as could be read); the state is still held.
    Ready {
        st: tokio::sync::MutexGuard<'a, GroupState>,
        inserted: u64,
    },
    /// A head is building or failed.
    NotReady,
    /// A covered block changed or is gone: the group was dropped.
    Stale,
}

/// What a search or scan found, per query head.
struct Selection {
    ids: Vec<Vec<u32>>,
    scores: Vec<Vec<f32>>,
    scanned: Vec<u32>,
    /// Per KV head.
    source: Vec<Source>,
    keys_present: u32,
    tokens_present: u64,
    inserted: u64,
}

impl Selection {
    fn new(heads: usize, kv: usize, source: Source) -> Self {
        Selection {
            ids: vec![Vec::new(); heads],
            scores: vec![Vec::new(); heads],
            scanned: vec![0; heads],
            source: vec![source; kv],
            keys_present: 0,
            tokens_present: 0,
            inserted: 0,
        }
    }
}

/// `[m][heads][d]` training queries as `[kv][m * g][d]` (each KV head's
/// group of `g = heads / kv` consecutive query heads).
fn split_train(q: &[f32], heads: usize, kv: usize, d: usize) -> Vec<Arc<Vec<f32>>> {
    let g = heads / kv;
    let m = q.len() / (heads * d);
    (0..kv)
        .map(|h| {
            let mut out = Vec::with_capacity(m * g * d);
            for t in 0..m {
                let at = (t * heads + h * g) * d;
                out.extend_from_slice(&q[at..at + g * d]);
            }
            Arc::new(out)
        })
        .collect()
}

/// Bytes a group holds now: its built indexes (estimates for those still
/// building) and its training queries.
fn measured(st: &GroupState) -> u64 {
    let heads: u64 = st
        .heads
        .iter()
        .map(|h| match h {
            Head::Ready { index } => index.memory_bytes() as u64,
            // Still building: its share of the estimate.
            Head::Building { .. } => st.est_per_head,
            Head::Failed(_) => 0,
        })
        .sum();
    let train: u64 = st.train.iter().map(|t| train_bytes(t)).sum();
    heads + train
}

/// The status of each KV head of `g` among `asked`.
async fn status(g: &Arc<Group>, asked: &[u32]) -> Vec<HeadStatus> {
    let st = g.state.lock().await;
    let tokens: u64 = st.blocks.iter().map(|c| c.tokens as u64).sum();
    g.kv.iter()
        .zip(&st.heads)
        .filter(|(h, _)| asked.contains(h))
        .map(|(&h, head)| {
            let mut s = HeadStatus {
                layer: g.layer,
                kv_head: h,
                state: State::Building,
                progress: 0.0,
                tokens,
                inserted: 0,
                memory_bytes: 0,
                default_ef: 0,
                error: String::new(),
            };
            match head {
                Head::Building { progress } => s.progress = *progress,
                Head::Ready { index } => {
                    s.state = State::Ready;
                    s.progress = 1.0;
                    s.tokens = index.len() as u64;
                    s.inserted = index.inserted() as u64;
                    s.memory_bytes = index.memory_bytes() as u64;
                    s.default_ef = index.default_params().ef() as u32;
                }
                Head::Failed(e) => {
                    s.state = State::Failed;
                    s.error = e.clone();
                }
            }
            s
        })
        .collect()
}

//! Automatic builds on publish (`retrieval.auto_build`): the chains whose
//! tail was stored recently.
//!
//! Every stored block (Put, Commit) is noted here through the store's
//! [`PublishHook`]: it becomes its chain's pending tail, and its parent, if
//! pending, stops being one (the chain grew). A tail that has seen no new
//! block for `auto_quiet_ms` is handed to [`super::Registry::auto_tick`],
//! which walks the chain back to its root and builds or extends its
//! indexes. A fork (a block whose parent is not a tail) is a tail of its
//! own: another chain.
//!
//! Invariants:
//! * at most `max` tails are pending; noting one more drops the oldest
//!   (counted: `strata_retrieval_auto_pending_dropped_total`);
//! * a tail is pending at most once; noting it again makes it the newest;
//! * noting is O(log n) under one short lock, never blocking the put.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge};
use strata_proto::convert::BuildIndexReq;
use strata_proto::{BlockKey, NamespaceId};

use super::{AutoConfig, CatchUp, check_layout};
use crate::attend::exec::ChainReader;
use crate::store::{PublishHook, StoreError};

/// A chain's last stored block.
pub type Tail = (NamespaceId, BlockKey);

/// The pending tails, oldest first.
pub struct Tails {
    inner: Mutex<Inner>,
    max: usize,
    dropped: Counter,
    pending: Gauge,
}

#[derive(Default)]
struct Inner {
    /// Tail → its sequence number (its place in `order`).
    seq_of: HashMap<Tail, u64>,
    /// Sequence number → the tail and when it was noted, oldest first.
    order: BTreeMap<u64, (Tail, Instant)>,
    next: u64,
}

impl Inner {
    fn remove(&mut self, t: &Tail) {
        if let Some(seq) = self.seq_of.remove(t) {
            self.order.remove(&seq);
        }
    }
}

impl Tails {
    /// At most `max` pending tails (at least 1).
    pub fn new(max: usize, dropped: Counter, pending: Gauge) -> Self {
        Tails {
            inner: Mutex::new(Inner::default()),
            max: max.max(1),
            dropped,
            pending,
        }
    }

    /// `key` (child of `parent`) was stored in `ns` at `now`.
    pub fn note(&self, ns: NamespaceId, key: BlockKey, parent: Option<BlockKey>, now: Instant) {
        let mut g = self.inner.lock().expect("auto tails lock");
        if let Some(p) = parent {
            g.remove(&(ns, p));
        }
        let t = (ns, key);
        g.remove(&t);
        let seq = g.next;
        g.next += 1;
        g.seq_of.insert(t, seq);
        g.order.insert(seq, (t, now));
        while g.seq_of.len() > self.max {
            let Some((_, (old, _))) = g.order.pop_first() else {
                break;
            };
            g.seq_of.remove(&old);
            self.dropped.increment(1);
        }
        self.pending.set(g.seq_of.len() as f64);
    }

    /// The oldest tail quiet for at least `quiet` at `now`, taken out.
    pub fn pop_due(&self, now: Instant, quiet: Duration) -> Option<Tail> {
        let mut g = self.inner.lock().expect("auto tails lock");
        let (&seq, &(t, at)) = g.order.first_key_value()?;
        if now.saturating_duration_since(at) < quiet {
            return None;
        }
        g.order.remove(&seq);
        g.seq_of.remove(&t);
        self.pending.set(g.seq_of.len() as f64);
        Some(t)
    }

    /// Tails pending now.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("auto tails lock").seq_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PublishHook for Tails {
    fn stored(&self, ns: NamespaceId, key: &BlockKey, parent: Option<&BlockKey>) {
        self.note(ns, *key, parent.copied(), Instant::now());
    }
}

impl super::Registry {
    /// Handles every chain tail quiet for `auto_quiet_ms` by now, oldest
    /// first, one chain at a time (each build is waited for, so that
    /// automatic builds pin one chain at a time). Returns the tails handled.
    pub async fn auto_tick(self: &Arc<Self>) -> usize {
        let (Some(tails), Some(cfg)) = (self.tails.clone(), self.cfg.auto.clone()) else {
            return 0;
        };
        let mut n = 0;
        while let Some((ns, tail)) = tails.pop_due(Instant::now(), cfg.quiet) {
            self.auto_chain(ns, &tail, &cfg).await;
            n += 1;
        }
        n
    }

    /// One quiet chain: walk it back to its root; if long enough, per
    /// configured layer, catch up the group covering a prefix of it, or
    /// build one (key-only) through [`Registry::build`](super::Registry::build).
    async fn auto_chain(self: &Arc<Self>, ns: NamespaceId, tail: &BlockKey, cfg: &AutoConfig) {
        let m = &self.metrics;
        let Some(layout) = self.store.layout(ns) else {
            m.auto_skipped_layout.increment(1);
            return;
        };
        let Ok(geom) = check_layout(&layout, 0, "layer") else {
            m.auto_skipped_layout.increment(1);
            return;
        };
        let Some(chain) = self.store.chain_to(ns, tail, cfg.max_blocks) else {
            m.auto_skipped_broken.increment(1);
            return;
        };
        let token_bytes = layout.token_bytes().max(1);
        let tokens: u64 = chain.iter().map(|&(_, len)| len / token_bytes).sum();
        if tokens < cfg.min_tokens {
            m.auto_skipped_short.increment(1);
            return;
        }
        let layers: Vec<u32> = if cfg.layers.is_empty() {
            (0..layout.num_layers).collect()
        } else {
            cfg.layers
                .iter()
                .copied()
                .filter(|&l| l < layout.num_layers)
                .collect()
        };
        let kv_heads: Vec<u32> = cfg
            .kv_heads
            .iter()
            .copied()
            .filter(|&h| h < geom.kv_heads)
            .collect();
        if layers.is_empty() || (!cfg.kv_heads.is_empty() && kv_heads.is_empty()) {
            m.auto_skipped_layout.increment(1);
            return;
        }
        let keys: Vec<BlockKey> = chain.iter().map(|&(k, _)| k).collect();
        for layer in layers {
            if let Some(g) = self.find(ns, layer, &keys) {
                match self.auto_extend(&g, geom, &keys).await {
                    Ok(Some(inserted)) => {
                        if inserted > 0 {
                            m.auto_extended.increment(1);
                        }
                        continue;
                    }
                    // Stale: dropped; this chain gets a group of its own.
                    Ok(None) => {}
                    Err(e) => {
                        m.auto_failed.increment(1);
                        tracing::debug!(layer, error = %e, "auto_build: catching up an index failed");
                        continue;
                    }
                }
            }
            let req = BuildIndexReq {
                namespace: ns,
                keys: keys.clone(),
                layers: vec![layer],
                training: Vec::new(),
                wait: true,
                kv_heads: kv_heads.clone(),
            };
            match self.build(req, &layout).await {
                Ok(_) => m.auto_builds.increment(1),
                Err(e @ StoreError::Limit { .. }) => {
                    m.auto_refused.increment(1);
                    tracing::debug!(layer, tokens, error = %e, "auto_build: refused");
                }
                Err(e) => {
                    m.auto_failed.increment(1);
                    tracing::debug!(layer, tokens, error = %e, "auto_build: failed");
                }
            }
        }
    }

    /// Brings `g` up to the end of `keys` (inserting whole new blocks) when
    /// its heads are ready. `Some(tokens inserted)` while the group is
    /// usable (ready or still building), None when it turned out stale
    /// (and was dropped).
    async fn auto_extend(
        self: &Arc<Self>,
        g: &Arc<super::Group>,
        geom: crate::attend::Geom,
        keys: &[BlockKey],
    ) -> Result<Option<u64>, StoreError> {
        let pin = self.store.pin_chain(g.ns, keys)?;
        let reader = ChainReader::new(g.ns, geom, g.layer, 1.0, Vec::new(), pin);
        let st = g.state.lock().await;
        let (_reader, used) = self.catch_up(g, st, reader).await?;
        Ok(match used {
            CatchUp::Ready { inserted, .. } => Some(inserted),
            CatchUp::NotReady => Some(0),
            CatchUp::Stale => None,
        })
    }
}

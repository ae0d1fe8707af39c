//! The asynchronous moves between DRAM and NVMe: write-down of evicted
//! blocks, write-through, promotion on read, tombstones, reclaim of
//! segments, and recovery at start. Each move is planned under the store's
//! lock (`Store::begin_*`, `plan_*`), done outside it, and ended under the
//! lock (`finish_*`); nothing here decides policy.
//!
//! Durability: a block is durable (survives a daemon crash) once its NVMe
//! record write has completed; with `tiers.nvme.sync_writes` the write is
//! also followed by fdatasync (survives power loss). Under write-through a
//! put is acknowledged only after that write, and the put response says so.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use strata_proto::NamespaceId;
use tokio_util::sync::CancellationToken;

use super::{
    PromoteFailure, PromoteJob, ReadGuard, ReclaimAction, ReclaimOrder, Store, StoreError,
    Tombstone, WriteJob,
};
use crate::tier::nvme::format::{RecordHeader, RecordKind};
use crate::tier::nvme::{Expect, Loc, NvmeError, NvmeTier, RecordBuf, ScanStats, Scanned};

fn nvme(store: &Store) -> &Arc<NvmeTier> {
    store.nvme().expect("tiering runs only with an NVMe tier")
}

/// Writes one planned job and ends it.
async fn write(store: Arc<Store>, job: WriteJob) {
    write_job(store, job).await;
}

/// Writes one planned job (`Store::plan_flush`, `begin_persist`) and ends
/// it; returns whether the record was written.
pub async fn write_job(store: Arc<Store>, job: WriteJob) -> bool {
    let n = nvme(&store).clone();
    let r = n
        .append(job.header, store.job_bytes(&job))
        .await
        .map_err(|e| e.to_string());
    let ok = r.is_ok();
    store.finish_write(&job, r);
    ok
}

/// One round of background work, awaited to the end: fence handling,
/// write-down of what DRAM must shed, reclaim. The daemon's task overlaps
/// rounds; tests and the simulator call this to step deterministically.
pub async fn step(store: &Arc<Store>) {
    if nvme(store).is_fenced() && store.on_nvme_fenced() {
        tracing::error!(
            "nvme tier fenced: its blocks are dropped from the index; DRAM keeps serving"
        );
    }
    loop {
        let jobs = store.plan_demotions(64);
        if jobs.is_empty() {
            break;
        }
        futures_util::future::join_all(jobs.into_iter().map(|j| write(store.clone(), j))).await;
    }
    if let Err(e) = reclaim(store).await {
        tracing::warn!(error = %e, "segment reclaim failed");
    }
}

/// The background task of a daemon with an NVMe tier: fences, write-down,
/// reclaim. Runs until `stop`.
pub async fn run(store: Arc<Store>, stop: CancellationToken) {
    let mut writes = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = store.evict_wanted.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        while writes.try_join_next().is_some() {}
        if nvme(&store).is_fenced() && store.on_nvme_fenced() {
            tracing::error!(
                "nvme tier fenced: its blocks are dropped from the index; DRAM keeps serving"
            );
        }
        for job in store.plan_demotions(64) {
            writes.spawn(write(store.clone(), job));
        }
        if let Err(e) = reclaim(&store).await {
            tracing::warn!(error = %e, "segment reclaim failed");
        }
    }
    // Let write-downs in flight finish: their blocks are busy until then.
    while writes.join_next().await.is_some() {}
}

/// Write-through of a freshly published block; returns whether the block
/// is durable afterwards.
pub async fn persist(store: &Arc<Store>, r: super::BlockRef) -> bool {
    if store.nvme().is_none_or(|n| n.is_fenced()) {
        return false;
    }
    if let Some(job) = store.begin_persist(r) {
        write(store.clone(), job).await;
    }
    store.is_durable(r)
}

/// Promotes blocks (pinned by the caller) from NVMe into DRAM; returns once
/// every one has a DRAM copy or could not get one.
pub async fn promote(store: &Arc<Store>, refs: &[super::BlockRef]) {
    let jobs = refs.iter().map(|&r| promote_one(store, r));
    futures_util::future::join_all(jobs).await;
}

async fn promote_one(store: &Arc<Store>, r: super::BlockRef) {
    for _ in 0..1000 {
        match store.begin_promotion(r) {
            super::Promote::InDram | super::Promote::Gone => return,
            super::Promote::InFlight => {
                // Another read of the same record; it ends with a notify.
                let _ =
                    tokio::time::timeout(Duration::from_millis(100), store.promotion_ended()).await;
            }
            super::Promote::Job(job) => {
                let got = read(store, &job).await;
                match &got {
                    Ok(rec) => {
                        store.finish_promotion(&job, Ok(rec.payload()));
                    }
                    Err(f) => {
                        store.finish_promotion(&job, Err(*f));
                    }
                }
                return;
            }
        }
    }
}

async fn read(store: &Store, job: &PromoteJob) -> Result<RecordBuf, PromoteFailure> {
    match nvme(store).read(&job.seg, job.loc, &job.expect).await {
        Ok(b) => Ok(b),
        Err(NvmeError::Corrupt(why)) => {
            tracing::warn!(key = %job.expect.key, why, "nvme record failed its check; treating it as a miss");
            Err(PromoteFailure::Corrupt)
        }
        Err(e) => {
            tracing::debug!(key = %job.expect.key, error = %e, "nvme read failed");
            Err(PromoteFailure::Unavailable)
        }
    }
}

/// The bytes of block `i` of a Get: from DRAM, promoting first if needed;
/// if DRAM has no room to stage it, straight from the verified NVMe read.
pub async fn load(guard: &Arc<ReadGuard>, i: usize) -> Result<Bytes, StoreError> {
    if let Some(r) = guard.dram_bytes(i) {
        return r;
    }
    let store = guard.store().clone();
    let b = guard.blocks[i].clone();
    if store.nvme().is_some() {
        promote(&store, &[b.r]).await;
        if let Some(r) = guard.dram_bytes(i) {
            return r;
        }
        // No DRAM to stage in (everything pinned): serve the read itself.
        if let super::Promote::Job(job) = store.begin_promotion(b.r) {
            let got = read(&store, &job).await;
            store.finish_promotion(&job, Err(PromoteFailure::Unavailable));
            if let Ok(buf) = got {
                store.metrics().bytes_out[crate::store::NVME].increment(b.len);
                return Ok(Bytes::from_owner(RecordBytes(buf)));
            }
        }
    }
    Err(StoreError::Corrupt {
        field: format!("keys[{i}]"),
        key: b.key,
        tier: "nvme",
    })
}

/// The bytes of block `i` of a guard without changing residency (export):
/// from its DRAM copy, else straight from its NVMe record (read and
/// verified, not promoted). An error is a miss for this block: gone, its
/// copy corrupt (dropped, counted), or unreadable.
pub async fn read_in_place(guard: &Arc<ReadGuard>, i: usize) -> Result<Bytes, StoreError> {
    let store = guard.store().clone();
    let b = guard.blocks[i].clone();
    let gone = || StoreError::Corrupt {
        field: format!("keys[{i}]"),
        key: b.key,
        tier: "nvme",
    };
    for _ in 0..1000 {
        if let Some(r) = guard.dram_bytes(i) {
            return r;
        }
        match store.begin_promotion(b.r) {
            super::Promote::InDram => continue,
            super::Promote::Gone => return Err(gone()),
            super::Promote::InFlight => {
                let _ =
                    tokio::time::timeout(Duration::from_millis(100), store.promotion_ended()).await;
            }
            super::Promote::Job(job) => {
                let got = read(&store, &job).await;
                return match got {
                    Ok(buf) => {
                        // Nothing is staged: the job ends as if unreadable.
                        store.finish_promotion(&job, Err(PromoteFailure::Unavailable));
                        store.metrics().bytes_out[crate::store::NVME].increment(b.len);
                        Ok(Bytes::from_owner(RecordBytes(buf)))
                    }
                    Err(f) => {
                        store.finish_promotion(&job, Err(f));
                        Err(gone())
                    }
                };
            }
        }
    }
    Err(gone())
}

/// A verified record's payload, as the owner of a `Bytes`.
struct RecordBytes(RecordBuf);

impl AsRef<[u8]> for RecordBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.payload()
    }
}

/// Persists a layout beside the NVMe segments (once per namespace), so
/// that a restart knows the shape of the blocks it recovers. A failure is
/// logged: those blocks then recover without summaries.
pub async fn persist_layout(store: &Arc<Store>, layout: &strata_proto::Layout) {
    let Some(n) = store.nvme().cloned() else {
        return;
    };
    let (id, bytes) = (layout.namespace_id(), layout.canonical_bytes());
    let r = tokio::task::spawn_blocking(move || n.persist_layout(id.0, &bytes)).await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(namespace = %id, error = %e, "cannot persist the layout; its blocks will recover without abstracts after a restart")
        }
        Err(e) => tracing::warn!(namespace = %id, error = %e, "persisting the layout failed"),
    }
}

/// Writes tombstones for deleted blocks that had NVMe records, so that a
/// restart does not bring them back. Returns how many could not be written
/// (those blocks may come back after a restart, with their true bytes).
pub async fn write_tombstones(store: &Arc<Store>, deleted: &[Tombstone]) -> usize {
    let Some(n) = store.nvme() else { return 0 };
    let mut failed = 0;
    for &Tombstone {
        namespace,
        key,
        seq,
    } in deleted
    {
        let header = RecordHeader {
            kind: RecordKind::Tombstone,
            namespace,
            // Taken by the delete (see `Tombstone`).
            seq,
            segment: 0,
            key,
            parent: None,
            len: 0,
            checksum: 0,
            payload_offset: 0, // set by append
        };
        match n.append(header, &[]).await {
            // Tombstones hold no live bytes.
            Ok(loc) => n.release(loc, 0),
            Err(e) => {
                failed += 1;
                tracing::warn!(%key, error = %e, "writing a tombstone failed; the block may return after a restart");
            }
        }
    }
    failed
}

/// Reclaims segments while the tier is above its high watermark.
pub async fn reclaim(store: &Arc<Store>) -> Result<(), NvmeError> {
    let n = nvme(store).clone();
    let cfg = &store.config().nvme;
    let cap = n.config().capacity_bytes;
    let high = (cap as f64 * cfg.high_watermark) as u64;
    let low = (cap as f64 * cfg.low_watermark) as u64;
    if n.stats().allocated <= high || n.is_fenced() {
        return Ok(());
    }
    while n.stats().allocated > low {
        let segs = n.segments();
        let oldest_id = segs.iter().map(|s| s.id).min();
        let victim = segs
            .iter()
            .filter(|s| s.reclaimable)
            .min_by_key(|s| match cfg.reclaim_order {
                ReclaimOrder::Oldest => (s.id, 0),
                ReclaimOrder::Emptiest => (s.live_bytes, s.id),
            })
            .copied();
        let Some(v) = victim else { break };
        reclaim_segment(store, &n, v.slot, Some(v.id) == oldest_id).await?;
        store.metrics().segments_reclaimed.increment(1);
    }
    Ok(())
}

async fn reclaim_segment(
    store: &Arc<Store>,
    n: &Arc<NvmeTier>,
    slot: u32,
    oldest: bool,
) -> Result<(), NvmeError> {
    let seg = n
        .file_of(Loc::new_at(slot, 0))
        .ok_or_else(|| NvmeError::Corrupt("segment vanished".into()))?;
    let mut copies: Vec<(Scanned, Option<super::BlockRef>)> = Vec::new();
    let mut stats = ScanStats::default();
    n.scan_segment(
        slot,
        &mut |s: Scanned, _: &[u8]| match store.reclaim_decision(&s.header, s.loc, oldest) {
            ReclaimAction::Copy(r) => copies.push((s, Some(r))),
            ReclaimAction::CopyTombstone => copies.push((s, None)),
            ReclaimAction::Skip | ReclaimAction::Dropped => {}
        },
        &mut stats,
    )
    .await;
    for (s, r) in copies {
        let h = s.header;
        match r {
            None => {
                // Same sequence number: a tombstone voids older records.
                if let Ok(loc) = n.append(h, &[]).await {
                    n.release(loc, 0);
                }
            }
            Some(r) => {
                let expect = Expect {
                    namespace: h.namespace,
                    key: h.key,
                    len: h.len,
                    checksum: h.checksum,
                };
                // A copied block gets a new sequence number, so that a key's
                // records in newer segments are always the newer ones: the
                // rule that lets the oldest segment's tombstones go needs it.
                // (A retired block's copy keeps its number: see
                // `Store::seq_for_copy`.)
                let copy = RecordHeader {
                    seq: store.seq_for_copy(r, h.seq),
                    ..h
                };
                // The copy is written in this build's format (a v1 record
                // comes back as v2, its payload page-aligned if it is a
                // page multiple).
                let moved = match n.read(&seg, s.loc, &expect).await {
                    Ok(rec) => n
                        .append(copy, rec.payload())
                        .await
                        .map(|loc| (loc, copy.seq))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                store.finish_copy(r, s.loc, h.len, moved);
            }
        }
    }
    n.delete_segment(slot).map_err(NvmeError::Io)
}

/// Rebuilds the index from the NVMe segments. `progress` is called after
/// each segment with the running totals. The layouts persisted beside the
/// segments are registered first, so that each block's summary (Attend's
/// abstracts and layer checksums) is computed from the payload the scan
/// has in hand: no extra read.
pub async fn recover(
    store: &Arc<Store>,
    progress: &mut (dyn FnMut(&ScanStats, Duration) + Send),
) -> ScanStats {
    let n = nvme(store).clone();
    let started = Instant::now();
    for (id, bytes) in n.persisted_layouts() {
        match strata_proto::Layout::from_canonical(&bytes) {
            Ok(l) if l.namespace_id().0 == id => {
                if let Err(e) = store.register(l) {
                    tracing::warn!(namespace = %NamespaceId(id), error = %e, "a persisted layout is refused");
                }
            }
            _ => tracing::warn!(
                namespace = %NamespaceId(id),
                "a persisted layout does not decode; its blocks recover without abstracts until it is registered"
            ),
        }
    }
    store.begin_recovery(&n.persisted_evictions());
    let stats = n
        .scan(
            &mut |s: Scanned, payload: &[u8]| {
                let summary = match s.header.kind {
                    RecordKind::Block => store.summarize_record(s.header.namespace, payload),
                    RecordKind::Tombstone => None,
                };
                store.recover(&s, summary)
            },
            &mut |st: &ScanStats| progress(st, started.elapsed()),
        )
        .await;
    store.finish_recovery();
    stats
}

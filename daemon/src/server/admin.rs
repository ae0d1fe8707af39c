//! The admin calls of the service (`strata drain`, `evict`, `stats`,
//! `export`): conversion and streaming around the store's operator calls
//! (`store/admin.rs`) and the drain gate (`drain.rs`).

use std::sync::Arc;

use strata_proto::{FieldError, NamespaceId, TierKind, pb};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::drain::{DrainPhase, DrainStatus};
use super::service::StrataService;
use crate::store::TenantUsage;
use crate::store::admin::NamespaceStats;
use crate::store::{StoreError, tiering};

/// Blocks and bytes an export pins per batch.
const EXPORT_BATCH_BLOCKS: usize = 64;
const EXPORT_BATCH_BYTES: u64 = 64 << 20;

pub fn namespace_stats_pb(n: NamespaceStats) -> pb::NamespaceStats {
    pb::NamespaceStats {
        namespace_id: n.id.0,
        tenant: n.tenant_name.to_string(),
        layout: n.layout.as_ref().map(Into::into),
        blocks: n.blocks,
        bytes: n.bytes,
        pinned_blocks: n.pinned_blocks,
        tiers: n
            .tiers
            .into_iter()
            .map(|(t, blocks, bytes)| pb::NamespaceTierStats {
                tier: pb::Tier::from(t) as i32,
                blocks,
                bytes,
            })
            .collect(),
    }
}

/// One tenant's usage and limits.
pub fn tenant_stats_pb(u: &TenantUsage, admin: bool) -> pb::TenantStats {
    pb::TenantStats {
        name: u.name.to_string(),
        admin,
        namespaces: u.namespaces,
        tiers: [TierKind::Dram, TierKind::Nvme]
            .into_iter()
            .filter_map(|t| {
                let x = u.tier(t)?;
                Some(pb::TenantTierStats {
                    tier: pb::Tier::from(t) as i32,
                    used_bytes: x.used,
                    quota_bytes: x.quota,
                    share_bytes: x.share,
                    blocks: x.blocks,
                    quota_refusals: x.refusals,
                    evictions: x.evictions,
                })
            })
            .collect(),
    }
}

fn progress_pb(st: &DrainStatus) -> pb::DrainProgress {
    pb::DrainProgress {
        phase: match st.phase {
            DrainPhase::Serving => pb::DrainPhase::Unspecified,
            DrainPhase::Settling => pb::DrainPhase::Settling,
            DrainPhase::WritingDown => pb::DrainPhase::WritingDown,
            DrainPhase::Done => pb::DrainPhase::Done,
        } as i32,
        detail: st.detail.clone(),
        writes_in_flight: st.writes_in_flight,
        reservations: st.reservations,
        write_down_blocks: st.write_down_blocks,
        write_down_bytes: st.write_down_bytes,
        written_blocks: st.written_blocks,
        written_bytes: st.written_bytes,
        write_failed_blocks: st.write_failed_blocks,
        dram_only_blocks: st.dram_only_blocks,
    }
}

/// The namespace a request names: set, and known to the store.
fn namespace(id: u64) -> Result<NamespaceId, Status> {
    if id == 0 {
        return Err(FieldError::new(
            "namespace_id",
            "is missing (0); use the id printed by `strata layout register` or `strata stats`",
        )
        .into());
    }
    Ok(NamespaceId(id))
}

impl StrataService {
    /// Asks for a drain and streams its progress until it is done (also
    /// when the drain began with SIGTERM).
    pub(super) fn drain_stream(&self) -> ReceiverStream<Result<pb::DrainProgress, Status>> {
        self.gate.request();
        let mut rx = self.gate.subscribe();
        let (tx, out) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let st = rx.borrow_and_update().clone();
                if st.phase != DrainPhase::Serving && tx.send(Ok(progress_pb(&st))).await.is_err() {
                    return;
                }
                if st.phase == DrainPhase::Done {
                    return;
                }
                if rx.changed().await.is_err() {
                    // The daemon stopped without finishing the drain.
                    let _ = tx
                        .send(Err(Status::aborted(
                            "the drain ended before it was done; see the daemon's log",
                        )))
                        .await;
                    return;
                }
            }
        });
        ReceiverStream::new(out)
    }

    pub(super) async fn evict_namespace_inner(
        &self,
        req: pb::EvictNamespaceRequest,
    ) -> Result<pb::EvictNamespaceResponse, Status> {
        let ns = namespace(req.namespace_id)?;
        let ev = self.store.evict_namespace(ns)?;
        let persisted = match self.store.nvme().cloned() {
            None => false,
            Some(n) => {
                let r = tokio::task::spawn_blocking(move || n.persist_eviction(ns.0, ev.seq)).await;
                match r {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::warn!(namespace = %ns, error = %e, "cannot record the eviction beside the nvme segments; its blocks may return after a restart");
                        false
                    }
                    Err(e) => {
                        tracing::warn!(namespace = %ns, error = %e, "recording the eviction failed");
                        false
                    }
                }
            }
        };
        tracing::info!(
            namespace = %ns,
            blocks = ev.blocks,
            bytes = ev.bytes,
            retired = ev.retired,
            persisted,
            "namespace evicted"
        );
        Ok(pb::EvictNamespaceResponse {
            evicted_blocks: ev.blocks,
            evicted_bytes: ev.bytes,
            retired_blocks: ev.retired,
            persisted,
        })
    }

    pub(super) fn export_namespace_inner(
        &self,
        req: pb::ExportNamespaceRequest,
    ) -> Result<ReceiverStream<Result<pb::ExportNamespaceResponse, Status>>, Status> {
        let ns = namespace(req.namespace_id)?;
        let (layout, blocks, bytes) = self.store.namespace_summary(ns)?;
        let layout = layout.ok_or(StoreError::LayoutNotRegistered(ns))?;
        let permit = self.limits.stream()?;
        let (tx, out) = mpsc::channel(4);
        let (store, chunk) = (self.store.clone(), self.chunk);
        tokio::spawn(async move {
            let _permit = permit;
            let start = pb::ExportNamespaceResponse {
                start: Some(pb::ExportStart {
                    namespace_id: ns.0,
                    layout: Some((&layout).into()),
                    blocks,
                    bytes,
                }),
                ..Default::default()
            };
            if tx.send(Ok(start)).await.is_err() {
                return;
            }
            let mut end = pb::ExportEnd::default();
            let mut cursor = Some(0u32);
            while let Some(from) = cursor {
                let (guard, next) = match store.pin_namespace_batch(
                    ns,
                    from,
                    EXPORT_BATCH_BLOCKS,
                    EXPORT_BATCH_BYTES,
                ) {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                cursor = next;
                let guard = Arc::new(guard);
                for (i, b) in guard.blocks.iter().enumerate() {
                    // In place: an export neither promotes nor evicts.
                    let data = match tiering::read_in_place(&guard, i).await {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::debug!(key = %b.key, error = %e, "export: block skipped");
                            end.skipped += 1;
                            continue;
                        }
                    };
                    let tier = guard.store().tier_now(b.r).unwrap_or(TierKind::Dram);
                    let mut header = Some(pb::BlockHeader {
                        key: bytes::Bytes::copy_from_slice(b.key.as_bytes()),
                        length: b.len,
                        checksum: b.checksum,
                        tier: pb::Tier::from(tier) as i32,
                        parent: b
                            .parent
                            .map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()))
                            .unwrap_or_default(),
                    });
                    let mut off = 0usize;
                    while off < data.len() || header.is_some() {
                        let stop = (off + chunk).min(data.len());
                        let msg = pb::ExportNamespaceResponse {
                            header: header.take(),
                            data: data.slice(off..stop),
                            ..Default::default()
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            return; // the client went away; pins drop with the guard
                        }
                        off = stop;
                    }
                    end.blocks += 1;
                    end.bytes += b.len;
                }
            }
            let _ = tx
                .send(Ok(pb::ExportNamespaceResponse {
                    end: Some(end),
                    ..Default::default()
                }))
                .await;
        });
        Ok(ReceiverStream::new(out))
    }
}

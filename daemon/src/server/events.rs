//! The Subscribe feed: a snapshot on request, then the store's event log
//! from the subscriber's cursor, in batches.
//!
//! One task per subscription. It never holds the store's lock across an
//! await, reads at most a batch per lock, and sends through a bounded
//! channel: a slow subscriber falls behind in the event ring (and is told
//! how many events it missed) instead of holding memory in the daemon.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use strata_proto::convert::SubscribeReq;
use strata_proto::{TierKind, pb};
use tokio::sync::mpsc;
use tonic::Status;

use crate::store::tenants::TenantId;
use crate::store::{EventKind, EventOut, Store};

type Tx = mpsc::Sender<Result<pb::KvEventBatch, Status>>;

fn tier(t: TierKind) -> i32 {
    pb::Tier::from(t) as i32
}

fn event_pb(e: &EventOut) -> pb::KvEvent {
    let key = || bytes::Bytes::copy_from_slice(e.key.as_bytes());
    let kind = match e.kind {
        EventKind::Stored => pb::kv_event::Kind::Stored(pb::BlockStored {
            namespace_id: e.namespace.0,
            key: key(),
            parent: e
                .parent
                .map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()))
                .unwrap_or_default(),
            token_count: e.token_count,
            medium: tier(e.medium),
        }),
        EventKind::Removed => pb::kv_event::Kind::Removed(pb::BlockRemoved {
            namespace_id: e.namespace.0,
            key: key(),
            medium: tier(e.medium),
        }),
        EventKind::Cleared => pb::kv_event::Kind::Cleared(pb::AllBlocksCleared {
            medium: tier(e.medium),
        }),
    };
    pb::KvEvent {
        seq: e.seq,
        kind: Some(kind),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Streams events to `tx` until the subscriber goes away. `tenant`: only
/// that tenant's namespaces (and tier-wide events); None: every tenant's.
pub async fn feed(store: Arc<Store>, q: SubscribeReq, tenant: Option<TenantId>, tx: Tx) {
    let epoch = store.dram().epoch();
    let max = q.max_batch as usize;
    let notify = store.event_notify();
    let batch = |events: &[EventOut]| pb::KvEventBatch {
        events: events.iter().map(event_pb).collect(),
        ts_unix_ms: now_ms(),
        epoch,
        ..Default::default()
    };
    let last = store.last_event_seq();
    // Live events follow the cursor. A cursor from before a restart (beyond
    // the last event) starts from now; the epoch tells the subscriber.
    let mut cursor = if q.snapshot || q.after_seq == 0 || q.after_seq > last {
        last
    } else {
        q.after_seq
    };
    let hello = pb::KvEventBatch {
        last_seq: last,
        ..batch(&[])
    };
    if tx.send(Ok(hello)).await.is_err() {
        return;
    }
    if q.snapshot {
        let mut from = Some(0u32);
        while let Some(f) = from {
            let (events, next) = store.snapshot_events_of(f, max, &q.namespaces, tenant);
            from = next;
            if events.is_empty() && next.is_some() {
                continue;
            }
            let b = pb::KvEventBatch {
                snapshot: true,
                snapshot_seq: cursor,
                snapshot_done: next.is_none(),
                last_seq: cursor,
                ..batch(&events)
            };
            if tx.send(Ok(b)).await.is_err() {
                return;
            }
        }
    }
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before reading, so an event logged in between wakes us.
        notified.as_mut().enable();
        let r = store.read_events_of(cursor, max, &q.namespaces, tenant);
        let moved = r.cursor != cursor;
        cursor = r.cursor;
        if !r.events.is_empty() || r.missed > 0 {
            let b = pb::KvEventBatch {
                missed: r.missed,
                last_seq: cursor,
                ..batch(&r.events)
            };
            if tx.send(Ok(b)).await.is_err() {
                return;
            }
            continue;
        }
        if moved {
            continue; // skipped other namespaces' events; read on
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tx.closed() => return,
        }
    }
}

//! The `strata.v1.Strata` gRPC service: identifies the caller (`auth.rs`),
//! receives wire messages, converts them into validated domain requests
//! (`strata-proto`), checks that the caller's tenant owns every namespace
//! (and reservation) it names, applies the server limits, and calls the
//! store. No policy lives here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use strata_proto::convert::{
    AttendReq, CommitReq, DeleteReq, GetReq, GetSlotsReq, IoDtype, LookupReq, PutHeader,
    ReleaseReq, ReserveReq, SubscribeReq,
};
use strata_proto::{FieldError, Layout, NamespaceId, ReservationId, pb};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
use tonic::{Request, Response, Status, Streaming};

use super::admin::namespace_stats_pb;
use super::auth::{Auth, Denied, Tenant};
use super::drain::Gate;
use super::limits::Limits;
use crate::attend::exec::{self, AttendCtx, SeqResult};
use crate::metrics::{MethodMetrics, ServerMetrics};
use crate::store::{PutResult, Reserve, Store, StoreError, tiering};
use strata_proto::TierKind;

/// Who is calling: from the connection, never from the request body.
#[derive(Debug, Clone)]
pub enum Peer {
    Tcp(Option<SocketAddr>),
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    Unknown,
}

impl Peer {
    pub fn of<T>(req: &Request<T>) -> Peer {
        if let Some(info) = req.extensions().get::<UdsConnectInfo>() {
            return match info.peer_cred {
                Some(c) => Peer::Unix {
                    uid: c.uid(),
                    gid: c.gid(),
                    pid: c.pid(),
                },
                None => Peer::Unknown,
            };
        }
        if let Some(info) = req.extensions().get::<TcpConnectInfo>() {
            return Peer::Tcp(info.remote_addr());
        }
        if let Some(info) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
            return Peer::Tcp(info.get_ref().remote_addr());
        }
        Peer::Unknown
    }

    fn is_local(&self) -> bool {
        matches!(self, Peer::Unix { .. })
    }
}

struct Methods {
    register: MethodMetrics,
    lookup: MethodMetrics,
    put: MethodMetrics,
    get: MethodMetrics,
    release: MethodMetrics,
    delete: MethodMetrics,
    stats: MethodMetrics,
    reserve: MethodMetrics,
    commit: MethodMetrics,
    abort: MethodMetrics,
    get_slots: MethodMetrics,
    subscribe: MethodMetrics,
    attend: MethodMetrics,
    drain: MethodMetrics,
    evict_namespace: MethodMetrics,
    export_namespace: MethodMetrics,
}

pub struct StrataService {
    /// BuildIndex, Retrieve and Attend RETRIEVAL (`retrieval.rs`).
    pub(super) retrieval: Option<Arc<super::retrieval::RetrievalRpc>>,
    pub(super) store: Arc<Store>,
    pub(super) limits: Limits,
    pub(super) attend: Arc<AttendCtx>,
    pub(super) chunk: usize,
    m: Arc<Methods>,
    /// Ends subscriptions when the daemon drains.
    stop: CancellationToken,
    /// Refuses new puts during a drain, and reports its progress.
    pub(super) gate: Arc<Gate>,
    /// Who is calling, and what they may touch.
    pub(super) auth: Arc<Auth>,
}

impl StrataService {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<Store>,
        limits: Limits,
        attend: Arc<AttendCtx>,
        chunk: usize,
        metrics: &ServerMetrics,
        stop: CancellationToken,
        gate: Arc<Gate>,
        auth: Arc<Auth>,
    ) -> Self {
        let m = Methods {
            register: metrics.method("RegisterLayout"),
            lookup: metrics.method("Lookup"),
            put: metrics.method("Put"),
            get: metrics.method("Get"),
            release: metrics.method("Release"),
            delete: metrics.method("Delete"),
            stats: metrics.method("Stats"),
            reserve: metrics.method("Reserve"),
            commit: metrics.method("Commit"),
            abort: metrics.method("Abort"),
            get_slots: metrics.method("GetSlots"),
            subscribe: metrics.method("Subscribe"),
            attend: metrics.method("Attend"),
            drain: metrics.method("Drain"),
            evict_namespace: metrics.method("EvictNamespace"),
            export_namespace: metrics.method("ExportNamespace"),
        };
        StrataService {
            retrieval: None,
            store,
            limits,
            attend,
            chunk,
            m: Arc::new(m),
            stop,
            gate,
            auth,
        }
    }

    /// May `who` use namespace `ns`? An admin (every caller when
    /// authentication is off) may, without asking the store.
    pub(super) fn own(&self, who: &Tenant, ns: NamespaceId) -> Result<(), Status> {
        if who.admin {
            return Ok(());
        }
        self.auth
            .check_namespace(who, ns, self.store.namespace_owner(ns))
    }

    /// The zero-copy calls: on the Unix socket, by a tenant that may.
    fn zero_copy<T>(&self, who: &Tenant, req: &Request<T>) -> Result<(), Status> {
        zero_copy_peer(req)?;
        self.auth.check_zero_copy(who)
    }
}

/// Records latency and outcome of a call.
fn timed<T>(m: &MethodMetrics, started: Instant, r: Result<T, Status>) -> Result<T, Status> {
    m.record(started, r.as_ref().err().map(|s| s.code()));
    if let Err(s) = &r {
        tracing::debug!(code = ?s.code(), message = s.message(), "request refused");
    }
    r
}

fn zero_copy_peer<T>(req: &Request<T>) -> Result<(), Status> {
    if Peer::of(req).is_local() {
        Ok(())
    } else {
        Err(Status::failed_precondition(
            "zero-copy calls (Reserve, Commit, Abort, GetSlots, Lookup with want_slots) are served only on the Unix socket, to clients that mapped the arena; use Put and Get over TCP",
        ))
    }
}

fn outcome(key: &strata_proto::BlockKey, r: PutResult, durable: bool) -> pb::PutOutcome {
    pb::PutOutcome {
        key: bytes::Bytes::copy_from_slice(key.as_bytes()),
        result: match r {
            PutResult::Stored => pb::PutResult::Stored,
            PutResult::AlreadyPresent => pb::PutResult::AlreadyPresent,
        } as i32,
        durable,
    }
}

fn ranges(r: &[std::ops::Range<u64>]) -> Vec<pb::TokenRange> {
    r.iter()
        .map(|r| pb::TokenRange {
            start: r.start,
            end: r.end,
        })
        .collect()
}

pub(super) fn attend_result(r: SeqResult, io: IoDtype) -> pb::AttendResult {
    let mut reads = Vec::new();
    for (tier, t) in [(pb::Tier::Dram, r.dram), (pb::Tier::Nvme, r.nvme)] {
        if t.blocks > 0 || t.bytes > 0 {
            reads.push(pb::TierReads {
                tier: tier as i32,
                blocks: t.blocks,
                bytes: t.bytes,
            });
        }
    }
    pb::AttendResult {
        covered: ranges(&r.covered),
        head_covered: r
            .head_covered
            .iter()
            .enumerate()
            .map(|(h, c)| pb::HeadCoverage {
                kv_head: h as u32,
                ranges: ranges(c),
            })
            .collect(),
        o_packed: io.pack(&r.o),
        o: if io == IoDtype::F32 { r.o } else { Vec::new() },
        lse: r.lse,
        keys_present: r.keys_present,
        tokens_present: r.tokens_present,
        reads,
        exact: r.exact,
        sink_included: r.sink_included,
        recent_included: r.recent_included,
        tokens_attended: r.tokens_attended,
        abstract_bytes: r.abstract_bytes,
        retrieval_source: Vec::new(),
        retrieval_scanned: Vec::new(),
        mean_corrected: r.mean_corrected,
        quantized_blocks: r.quant.blocks,
        quantized_bytes: r.quant.bytes,
    }
}

/// Adds how many blocks of a broken Put stream were stored before the error.
fn after(stored: usize, s: Status) -> Status {
    if stored == 0 {
        return s;
    }
    Status::new(
        s.code(),
        format!(
            "{}; the {stored} blocks before it in this stream were stored",
            s.message()
        ),
    )
}

#[tonic::async_trait]
impl pb::strata_server::Strata for StrataService {
    async fn register_layout(
        &self,
        req: Request<pb::RegisterLayoutRequest>,
    ) -> Result<Response<pb::RegisterLayoutResponse>, Status> {
        let t = Instant::now();
        let r = async {
            let who = self.auth.identify(&req)?;
            let layout = req
                .into_inner()
                .layout
                .ok_or_else(|| FieldError::new("layout", "is missing"))?;
            let layout = self.auth.layout_for(&who, Layout::try_from(layout)?)?;
            let (block, token) = (layout.block_bytes(), layout.token_bytes());
            let room = self.store.dram().capacity_bytes();
            if block > room {
                return Err(FieldError::new(
                    "layout",
                    format!(
                        "one block of this layout is {block} bytes, larger than this daemon's DRAM tier ({room} bytes); use fewer tokens per block or a larger tier"
                    ),
                )
                .into());
            }
            let reg = self.store.register(layout.clone())?;
            self.auth
                .check_namespace(&who, reg.id, Some(reg.tenant))?;
            // Beside the NVMe segments, so that a restart knows the shape of
            // the blocks it recovers, and their owner (once per namespace;
            // idempotent).
            tiering::persist_layout(&self.store, &layout).await;
            let existed = reg.existed;
            Ok(Response::new(pb::RegisterLayoutResponse {
                namespace_id: reg.id.0,
                block_bytes: block,
                token_bytes: token,
                existed,
            }))
        }
        .await;
        timed(&self.m.register, t, r)
    }

    async fn lookup(
        &self,
        req: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        let t = Instant::now();
        let r = self.lookup_inner(req).await;
        timed(&self.m.lookup, t, r)
    }

    async fn put(
        &self,
        req: Request<Streaming<pb::PutRequest>>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let t = Instant::now();
        let r = self.put_stream(req).await;
        timed(&self.m.put, t, r)
    }

    type GetStream = ReceiverStream<Result<pb::GetResponse, Status>>;
    type SubscribeStream = ReceiverStream<Result<pb::KvEventBatch, Status>>;
    type DrainStream = ReceiverStream<Result<pb::DrainProgress, Status>>;
    type ExportNamespaceStream = ReceiverStream<Result<pb::ExportNamespaceResponse, Status>>;

    // ---- admin (the bodies are in admin.rs) ----

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<Self::DrainStream>, Status> {
        let t = Instant::now();
        let r = self
            .auth
            .identify(&req)
            .and_then(|who| self.auth.check_admin(&who, "Drain"))
            .map(|()| Response::new(self.drain_stream()));
        timed(&self.m.drain, t, r)
    }

    async fn evict_namespace(
        &self,
        req: Request<pb::EvictNamespaceRequest>,
    ) -> Result<Response<pb::EvictNamespaceResponse>, Status> {
        let t = Instant::now();
        let r = match self
            .auth
            .identify(&req)
            .and_then(|who| self.auth.check_admin(&who, "EvictNamespace"))
        {
            Ok(()) => self.evict_namespace_inner(req.into_inner()).await,
            Err(e) => Err(e),
        };
        timed(&self.m.evict_namespace, t, r.map(Response::new))
    }

    async fn export_namespace(
        &self,
        req: Request<pb::ExportNamespaceRequest>,
    ) -> Result<Response<Self::ExportNamespaceStream>, Status> {
        let t = Instant::now();
        let r = self
            .auth
            .identify(&req)
            .and_then(|who| self.auth.check_admin(&who, "ExportNamespace"))
            .and_then(|()| self.export_namespace_inner(req.into_inner()));
        timed(&self.m.export_namespace, t, r.map(Response::new))
    }

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let t = Instant::now();
        let r = (|| {
            let who = self.auth.identify(&req)?;
            let q = SubscribeReq::try_from(req.into_inner())?;
            for &ns in &q.namespaces {
                self.own(&who, ns)?;
            }
            // Without a filter, a tenant sees its own namespaces' events
            // (and tier-wide ones); an admin sees everything.
            let tenant = (!who.admin).then_some(who.id);
            let permit = self.limits.subscriber()?;
            // Bounded: a slow subscriber holds at most a few batches here
            // and falls behind in the event ring instead (it is told).
            let (tx, rx) = mpsc::channel(4);
            let (store, stop) = (self.store.clone(), self.stop.clone());
            tokio::spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = super::events::feed(store, q, tenant, tx) => {}
                    _ = stop.cancelled() => {}
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        })();
        timed(&self.m.subscribe, t, r)
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        let t = Instant::now();
        let r = (|| {
            let who = self.auth.identify(&req)?;
            let raw = req.into_inner();
            self.limits.keys("keys", raw.keys.len())?;
            let q = GetReq::try_from(raw)?;
            self.own(&who, q.namespace)?;
            let permit = self.limits.stream()?;
            let guard = Arc::new(
                self.store
                    .pin_for_read(&q)
                    .map_err(|e| self.lease_error(&who, e))?,
            );
            // Bounded: a slow reader holds at most a few chunks here.
            let (tx, rx) = mpsc::channel(4);
            let chunk = self.chunk;
            tokio::spawn(async move {
                let _permit = permit;
                for (i, b) in guard.blocks.iter().enumerate() {
                    // From DRAM, promoting from NVMe first if needed; every
                    // byte verified before it goes out.
                    let data = match tiering::load(&guard, i).await {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = tx.send(Err(Status::from(e))).await;
                            return;
                        }
                    };
                    let tier = guard.store().tier_now(b.r).unwrap_or(TierKind::Dram);
                    let header = pb::BlockHeader {
                        key: bytes::Bytes::copy_from_slice(b.key.as_bytes()),
                        length: b.len,
                        checksum: b.checksum,
                        tier: pb::Tier::from(tier) as i32,
                        parent: b
                            .parent
                            .map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()))
                            .unwrap_or_default(),
                    };
                    let mut off = 0usize;
                    let mut header = Some(header);
                    while off < data.len() || header.is_some() {
                        let end = (off + chunk).min(data.len());
                        let msg = pb::GetResponse {
                            header: header.take(),
                            data: data.slice(off..end),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            return; // client went away; pins drop with the guard
                        }
                        off = end;
                    }
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        })();
        timed(&self.m.get, t, r)
    }

    async fn attend(
        &self,
        req: Request<pb::AttendRequest>,
    ) -> Result<Response<pb::AttendResponse>, Status> {
        let t = Instant::now();
        let r = self.attend_inner(req).await;
        timed(&self.m.attend, t, r)
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let t = Instant::now();
        let r = (|| {
            let who = self.auth.identify(&req)?;
            let q = ReleaseReq::try_from(req.into_inner())?;
            if let Some(ns) = q.namespace {
                self.own(&who, ns)?;
            } else if !who.admin {
                // A lease is tied to its namespace: naming it is how a
                // tenant shows the lease is its own.
                return Err(FieldError::new(
                    "namespace_id",
                    "is required when the daemon separates tenants: name the lease's namespace",
                )
                .into());
            }
            let n = self
                .store
                .release(&q)
                .map_err(|e| self.lease_error(&who, e))?;
            Ok(Response::new(pb::ReleaseResponse { released_blocks: n }))
        })();
        timed(&self.m.release, t, r)
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let t = Instant::now();
        let r = async {
            let who = self.auth.identify(&req)?;
            let raw = req.into_inner();
            self.limits.keys("keys", raw.keys.len())?;
            let q = DeleteReq::try_from(raw)?;
            self.own(&who, q.namespace)?;
            let r = self.store.delete(&q)?;
            // Deleted blocks with NVMe records: a tombstone keeps a restart
            // from bringing them back.
            let _ = tiering::write_tombstones(&self.store, &r.tombstones).await;
            let to_pb = |v: Vec<strata_proto::BlockKey>| {
                v.iter()
                    .map(|k| bytes::Bytes::copy_from_slice(k.as_bytes()))
                    .collect()
            };
            Ok(Response::new(pb::DeleteResponse {
                deleted: r.deleted,
                absent: to_pb(r.absent),
                pinned: to_pb(r.pinned),
            }))
        }
        .await;
        timed(&self.m.delete, t, r)
    }

    async fn stats(
        &self,
        req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let t = Instant::now();
        let who = match self.auth.identify(&req) {
            Ok(w) => w,
            Err(e) => return timed(&self.m.stats, t, Err(e)),
        };
        let per_namespace = req.into_inner().per_namespace;
        let s = self.store.stats();
        // A tenant sees its own namespaces and usage; an admin everyone's.
        let mine = |id| who.admin || id == who.id;
        let namespace_stats = if per_namespace {
            self.store
                .namespace_stats()
                .into_iter()
                .filter(|n| mine(n.tenant))
                .map(namespace_stats_pb)
                .collect()
        } else {
            Vec::new()
        };
        let tenant_stats = self
            .store
            .tenant_usage()
            .into_iter()
            .filter(|u| mine(u.id))
            .filter(|u| self.auth.is_multi() || u.id == who.id)
            .map(|u| super::admin::tenant_stats_pb(&u, self.auth.tenant_is_admin(u.id)))
            .collect();
        let r = Ok(Response::new(pb::StatsResponse {
            tiers: s
                .tiers
                .iter()
                .map(|b| pb::TierStats {
                    tier: b.tier.map_or(pb::Tier::Unspecified, pb::Tier::from) as i32,
                    capacity_bytes: b.capacity,
                    used_bytes: b.used,
                    blocks: b.blocks,
                    pinned_blocks: b.pinned_blocks,
                    evictions: b.evictions,
                    bytes_in: b.bytes_in,
                    bytes_out: b.bytes_out,
                    high_watermark_bytes: b.high_watermark,
                    low_watermark_bytes: b.low_watermark,
                    fenced: b.fenced,
                })
                .collect(),
            namespaces: s.namespaces,
            blocks: s.blocks,
            leases: s.leases,
            reservations: s.reservations,
            lookups: s.lookups,
            lookup_keys: s.lookup_keys,
            lookup_hits: s.lookup_hits,
            checksum_failures: s.checksum_failures,
            version: env!("CARGO_PKG_VERSION").to_string(),
            index_bytes: s.index_bytes,
            abstract_bytes: s.summary_bytes,
            abstract_capacity_bytes: s.summary_capacity,
            abstract_blocks: s.summary_blocks,
            namespace_stats,
            draining: self.gate.is_draining(),
            tenant: who.name.to_string(),
            tenant_stats,
            retrieval_indexes: self.retrieval.as_ref().map_or(0, |r| r.registry.indexes()),
            retrieval_index_bytes: self.retrieval.as_ref().map_or(0, |r| r.registry.bytes()),
        }));
        timed(&self.m.stats, t, r)
    }

    async fn reserve(
        &self,
        req: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        let t = Instant::now();
        let r = (|| {
            let who = self.auth.identify(&req)?;
            self.zero_copy(&who, &req)?;
            let _w = self.gate.admit_new_write()?;
            let raw = req.into_inner();
            self.limits.keys("blocks", raw.blocks.len())?;
            let q = ReserveReq::try_from(raw)?;
            self.own(&who, q.namespace)?;
            let rs = self.store.reserve_shared(&q)?;
            Ok(Response::new(pb::ReserveResponse {
                reservations: rs
                    .into_iter()
                    .map(|r| pb::Reservation {
                        key: bytes::Bytes::copy_from_slice(r.key.as_bytes()),
                        reservation_id: r.id.map_or(0, |i| i.0),
                        already_present: r.id.is_none(),
                        slot: Some(pb::Slot {
                            offset: r.offset,
                            length: r.len,
                            checksum: r.checksum,
                        }),
                    })
                    .collect(),
                arena_epoch: self.store.dram().epoch(),
            }))
        })();
        timed(&self.m.reserve, t, r)
    }

    async fn commit(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let t = Instant::now();
        let r = async {
            let who = self.auth.identify(&req)?;
            self.zero_copy(&who, &req)?;
            let _w = self.gate.enter_write();
            let raw = req.into_inner();
            self.limits.keys("blocks", raw.blocks.len())?;
            let q = CommitReq::try_from(raw)?;
            let ids: Vec<ReservationId> = q.blocks.iter().map(|&(id, _)| id).collect();
            self.own_reservations(&who, &ids)?;
            let out = self.store.commit(&q)?;
            let mut outcomes = Vec::with_capacity(out.len());
            for (k, res, r) in out {
                outcomes.push(outcome(&k, res, self.durable(r).await));
            }
            Ok(Response::new(pb::CommitResponse { outcomes }))
        }
        .await;
        timed(&self.m.commit, t, r)
    }

    async fn abort(
        &self,
        req: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let t = Instant::now();
        let r = (|| {
            let who = self.auth.identify(&req)?;
            self.zero_copy(&who, &req)?;
            let _w = self.gate.enter_write();
            let raw = req.into_inner();
            self.limits
                .keys("reservation_ids", raw.reservation_ids.len())?;
            let ids: Vec<_> = raw
                .reservation_ids
                .iter()
                .map(|&i| ReservationId(i))
                .collect();
            self.own_reservations(&who, &ids)?;
            Ok(Response::new(pb::AbortResponse {
                aborted: self.store.abort(&ids),
            }))
        })();
        timed(&self.m.abort, t, r)
    }

    async fn get_slots(
        &self,
        req: Request<pb::GetSlotsRequest>,
    ) -> Result<Response<pb::GetSlotsResponse>, Status> {
        let t = Instant::now();
        let r = async {
            let who = self.auth.identify(&req)?;
            self.zero_copy(&who, &req)?;
            let raw = req.into_inner();
            self.limits.keys("keys", raw.keys.len())?;
            let q = GetSlotsReq::try_from(raw)?;
            self.own(&who, q.namespace)?;
            let refs = self
                .store
                .leased_refs(&q)
                .map_err(|e| self.lease_error(&who, e))?;
            // Leased blocks only on NVMe are brought up to DRAM first.
            tiering::promote(&self.store, &refs).await;
            let keyed: Vec<_> = refs.into_iter().zip(q.keys.iter().copied()).collect();
            let slots = self.store.slots_of(&keyed)?;
            Ok(Response::new(pb::GetSlotsResponse {
                slots: slots
                    .into_iter()
                    .map(|s| pb::Slot {
                        offset: s.offset,
                        length: s.len,
                        checksum: s.checksum,
                    })
                    .collect(),
                arena_epoch: self.store.dram().epoch(),
            }))
        }
        .await;
        timed(&self.m.get_slots, t, r)
    }

    // ---- retrieval (`retrieval.rs`) ----

    async fn build_index(
        &self,
        req: Request<pb::BuildIndexRequest>,
    ) -> Result<Response<pb::BuildIndexResponse>, Status> {
        self.build_index_rpc(req).await
    }

    async fn retrieve(
        &self,
        req: Request<pb::RetrieveRequest>,
    ) -> Result<Response<pb::RetrieveResponse>, Status> {
        self.retrieve_rpc(req).await
    }
}

impl StrataService {
    /// Every reservation named must be of a namespace `who` owns (unknown
    /// ids are left to the store, which reports them by field).
    fn own_reservations(&self, who: &Tenant, ids: &[ReservationId]) -> Result<(), Status> {
        if who.admin {
            return Ok(());
        }
        for (i, owner) in self.store.reservation_owners(ids).into_iter().enumerate() {
            if let Some((ns, t)) = owner
                && t != who.id
            {
                return Err(self.auth.deny(
                    Denied::ForeignNamespace,
                    Status::permission_denied(format!(
                        "reservation {}: belongs to namespace {ns}, which does not belong to tenant {}",
                        ids[i].0, who.name
                    )),
                ));
            }
        }
        Ok(())
    }

    /// A store error, where a lease of another tenant's namespace counts as
    /// a cross-tenant access (leases are tied to a namespace: the store
    /// refuses them with PERMISSION_DENIED either way).
    fn lease_error(&self, who: &Tenant, e: StoreError) -> Status {
        if let StoreError::LeaseForeign { owner, .. } = &e
            && self.store.namespace_owner(*owner) != Some(who.id)
        {
            return self.auth.deny(Denied::ForeignNamespace, e.into());
        }
        e.into()
    }

    async fn attend_inner(
        &self,
        req: Request<pb::AttendRequest>,
    ) -> Result<Response<pb::AttendResponse>, Status> {
        let who = self.auth.identify(&req)?;
        let raw = req.into_inner();
        // A chain given by its tail counts its blocks: the daemon walks
        // them under the store's lock.
        let keys: usize = raw
            .sequences
            .iter()
            .map(|s| s.keys.len() + s.chain_blocks as usize)
            .sum();
        self.limits.keys("sequences", keys)?;
        let q = AttendReq::try_from(raw)?;
        self.own(&who, q.namespace)?;
        let layout = match self.store.namespace_layout(q.namespace) {
            None => return Err(crate::store::StoreError::UnknownNamespace(q.namespace).into()),
            // Known only from records found at start, never registered.
            Some(None) => {
                return Err(crate::store::StoreError::LayoutNotRegistered(q.namespace).into());
            }
            Some(Some(l)) => l,
        };
        let retrieval = q.retrieval;
        let checked = exec::check(q, &layout, &self.attend.cfg)?;
        let _admitted = self.attend.admit()?;
        if checked.mode == strata_proto::convert::AttendMode::Retrieval {
            return self.attend_retrieval(checked, &layout, retrieval).await;
        }
        let io = checked.io_dtype;
        let results = exec::run(&self.attend, &self.store, checked).await?;
        Ok(Response::new(pb::AttendResponse {
            results: results.into_iter().map(|r| attend_result(r, io)).collect(),
        }))
    }

    /// Under write-through (configured, or during a drain that writes DRAM
    /// down), writes the block to NVMe before the put is acknowledged;
    /// reports whether the block is durable.
    async fn durable(&self, r: crate::store::index::BlockRef) -> bool {
        if self.store.config().nvme.write_through || self.gate.write_through() {
            tiering::persist(&self.store, r).await
        } else {
            self.store.is_durable(r)
        }
    }

    async fn lookup_inner(
        &self,
        req: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        let who = self.auth.identify(&req)?;
        if req.get_ref().want_slots {
            self.zero_copy(&who, &req)?;
        }
        let raw = req.into_inner();
        self.limits.keys("keys", raw.keys.len())?;
        let q = LookupReq::try_from(raw)?;
        self.own(&who, q.namespace)?;
        let r = self.store.lookup(&q)?;
        let (lease_id, expires) = r.lease.map_or((0, 0), |(l, at)| {
            (
                l.0,
                at.duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            )
        });
        let mut slots = Vec::new();
        if q.want_slots && lease_id != 0 {
            // Zero-copy loads read from DRAM: promote NVMe hits now.
            tiering::promote(&self.store, &r.to_promote).await;
            let keyed: Vec<_> = r.refs.iter().copied().zip(q.keys.iter().copied()).collect();
            slots = self.store.slots_of(&keyed)?;
        } else if !r.to_promote.is_empty() {
            // A lease announces a load: start bringing NVMe hits up to DRAM
            // so that the Get finds them there.
            let (store, refs) = (self.store.clone(), r.to_promote.clone());
            tokio::spawn(async move { tiering::promote(&store, &refs).await });
        }
        Ok(Response::new(pb::LookupResponse {
            hits: r.hits,
            tiers: r
                .tiers
                .into_iter()
                .map(|t| pb::Tier::from(t) as i32)
                .collect(),
            lease_id,
            lease_expires_unix_ms: expires,
            slots: slots
                .iter()
                .map(|s| pb::Slot {
                    offset: s.offset,
                    length: s.len,
                    checksum: s.checksum,
                })
                .collect(),
            arena_epoch: if q.want_slots {
                self.store.dram().epoch()
            } else {
                0
            },
        }))
    }

    async fn put_stream(
        &self,
        req: Request<Streaming<pb::PutRequest>>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let who = self.auth.identify(&req)?;
        // Refused once a drain began; a stream begun before goes on.
        let _w = self.gate.admit_new_write()?;
        let _permit = self.limits.stream()?;
        let mut stream = req.into_inner();
        let mut outcomes = Vec::new();
        // The last namespace found to be the caller's (a stream rarely
        // changes namespace: one ownership check per stream).
        let mut owned: Option<NamespaceId> = None;
        // A block's first message; the loop below consumes its data messages.
        let mut next = stream.message().await?;
        while let Some(first) = next.take() {
            let i = outcomes.len();
            let r = self
                .put_block(&mut stream, first, i, &who, &mut owned)
                .await;
            match r {
                Ok((o, following)) => {
                    outcomes.push(o);
                    next = following;
                }
                Err(s) => return Err(after(i, s)),
            }
        }
        Ok(Response::new(pb::PutResponse { outcomes }))
    }

    /// Receives one block whose first message is `first`. Returns its
    /// outcome and the first message of the next block, if any.
    async fn put_block(
        &self,
        stream: &mut Streaming<pb::PutRequest>,
        first: pb::PutRequest,
        i: usize,
        who: &Tenant,
        owned: &mut Option<NamespaceId>,
    ) -> Result<(pb::PutOutcome, Option<pb::PutRequest>), Status> {
        self.limits.keys("blocks", i + 1)?;
        let header = first.header.as_ref().ok_or_else(|| {
            FieldError::new(
                format!("blocks[{i}].header"),
                "is missing: each block starts with a message carrying its header",
            )
        })?;
        let h = PutHeader::from_pb(header, i)?;
        if *owned != Some(h.namespace) {
            self.own(who, h.namespace)
                .map_err(|s| Status::new(s.code(), format!("blocks[{i}].{}", s.message())))?;
            *owned = Some(h.namespace);
        }
        let _bytes = self.limits.inflight_bytes(h.length)?;
        let reserved = self
            .store
            .reserve(h.namespace, h.key, h.parent, h.length, h.checksum, i)?;
        let (mut slot, present) = match reserved {
            Reserve::Slot(slot) => (Some(slot), None),
            Reserve::Present(r) => (None, Some(r)), // skip the bytes: nothing is rewritten
        };
        let mut filled = 0u64;
        let mut data = first.data;
        loop {
            let n = data.len() as u64;
            if filled + n > h.length {
                return Err(FieldError::new(
                    format!("blocks[{i}].data"),
                    format!(
                        "{} bytes arrived for a block whose length is {}",
                        filled + n,
                        h.length
                    ),
                )
                .into());
            }
            if let Some(s) = slot.as_mut() {
                if n == h.length {
                    // The whole block in one message: copy and hash in one pass.
                    s.fill(&data);
                } else {
                    s.bytes_mut()[filled as usize..(filled + n) as usize].copy_from_slice(&data);
                }
            }
            filled += n;
            if filled == h.length {
                break;
            }
            match stream.message().await? {
                Some(m) if m.header.is_none() => data = m.data,
                Some(_) => {
                    return Err(FieldError::new(
                        format!("blocks[{i}].data"),
                        format!(
                            "the next block's header arrived after {filled} of {} bytes",
                            h.length
                        ),
                    )
                    .into());
                }
                None => {
                    return Err(FieldError::new(
                        format!("blocks[{i}].data"),
                        format!("the stream ended after {filled} of {} bytes", h.length),
                    )
                    .into());
                }
            }
        }
        let (result, r) = match (slot, present) {
            (Some(s), _) => self.store.publish(s, h.checksum)?,
            (None, Some(r)) => (PutResult::AlreadyPresent, r),
            (None, None) => unreachable!("a block is either reserved or present"),
        };
        let durable = self.durable(r).await;
        let following = stream.message().await?;
        Ok((outcome(&h.key, result, durable), following))
    }
}

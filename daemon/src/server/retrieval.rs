//! The retrieval RPCs (`BuildIndex`, `Retrieve`) and Attend's RETRIEVAL
//! mode: conversion, limits, and the calls into `crate::retrieval`.

use std::sync::Arc;
use std::time::Instant;

use strata_proto::convert::{BuildIndexReq, RetrievalParams, RetrieveReq};
use strata_proto::{Layout, NamespaceId, pb};
use tonic::{Request, Response, Status};

use super::service::{StrataService, attend_result};
use crate::attend::exec::{self, Checked};
use crate::metrics::{MethodMetrics, ServerMetrics};
use crate::retrieval::{Registry, Source, State};
use crate::store::StoreError;

/// What the service keeps for the retrieval calls.
pub struct RetrievalRpc {
    pub registry: Arc<Registry>,
    build: MethodMetrics,
    retrieve: MethodMetrics,
}

impl RetrievalRpc {
    pub fn new(registry: Arc<Registry>, metrics: &ServerMetrics) -> Self {
        RetrievalRpc {
            registry,
            build: metrics.method("BuildIndex"),
            retrieve: metrics.method("Retrieve"),
        }
    }
}

fn source_pb(s: Source) -> pb::RetrieveSource {
    match s {
        Source::Index => pb::RetrieveSource::Index,
        Source::NoIndex => pb::RetrieveSource::ExactNoIndex,
        Source::Building => pb::RetrieveSource::ExactBuilding,
        Source::Stale => pb::RetrieveSource::ExactStale,
    }
}

fn timed<T>(m: &MethodMetrics, started: Instant, r: Result<T, Status>) -> Result<T, Status> {
    m.record(started, r.as_ref().err().map(|s| s.code()));
    if let Err(s) = &r {
        tracing::debug!(code = ?s.code(), message = s.message(), "request refused");
    }
    r
}

impl StrataService {
    /// Serves the retrieval calls with `rpc`.
    pub fn with_retrieval(mut self, rpc: Arc<RetrievalRpc>) -> Self {
        self.retrieval = Some(rpc);
        self
    }

    fn rpc(&self) -> Result<&Arc<RetrievalRpc>, Status> {
        self.retrieval
            .as_ref()
            .ok_or_else(|| Status::unimplemented("retrieval is not configured in this daemon"))
    }

    fn layout_of(&self, ns: NamespaceId) -> Result<Layout, StoreError> {
        match self.store.namespace_layout(ns) {
            None => Err(StoreError::UnknownNamespace(ns)),
            Some(None) => Err(StoreError::LayoutNotRegistered(ns)),
            Some(Some(l)) => Ok(l),
        }
    }

    pub(super) async fn build_index_rpc(
        &self,
        req: Request<pb::BuildIndexRequest>,
    ) -> Result<Response<pb::BuildIndexResponse>, Status> {
        let t = Instant::now();
        let rpc = self.rpc()?;
        let r = async {
            let who = self.auth.identify(&req)?;
            let raw = req.into_inner();
            self.limits.keys("keys", raw.keys.len())?;
            let q = BuildIndexReq::try_from(raw)?;
            self.own(&who, q.namespace)?;
            let layout = self.layout_of(q.namespace)?;
            let a = rpc.registry.build(q, &layout).await?;
            Ok(Response::new(pb::BuildIndexResponse {
                keys_covered: a.keys_covered,
                tokens_covered: a.tokens_covered,
                indexes: a
                    .heads
                    .into_iter()
                    .map(|h| pb::IndexStatus {
                        layer: h.layer,
                        kv_head: h.kv_head,
                        state: match h.state {
                            State::Building => pb::IndexState::Building,
                            State::Ready => pb::IndexState::Ready,
                            State::Failed => pb::IndexState::Failed,
                        } as i32,
                        progress: h.progress,
                        tokens: h.tokens,
                        inserted_tokens: h.inserted,
                        memory_bytes: h.memory_bytes,
                        default_ef: h.default_ef,
                        error: h.error,
                    })
                    .collect(),
            }))
        }
        .await;
        timed(&rpc.build, t, r)
    }

    pub(super) async fn retrieve_rpc(
        &self,
        req: Request<pb::RetrieveRequest>,
    ) -> Result<Response<pb::RetrieveResponse>, Status> {
        let t = Instant::now();
        let rpc = self.rpc()?;
        let r = async {
            let who = self.auth.identify(&req)?;
            let raw = req.into_inner();
            self.limits.keys("keys", raw.keys.len())?;
            let q = RetrieveReq::try_from(raw)?;
            self.own(&who, q.namespace)?;
            let layout = self.layout_of(q.namespace)?;
            let _admitted = self.attend.admit()?;
            let a = rpc.registry.retrieve(q, &layout).await?;
            let heads = a
                .positions
                .into_iter()
                .zip(a.scores)
                .zip(a.scanned)
                .zip(a.source)
                .map(|(((positions, scores), scanned), source)| pb::HeadHits {
                    positions,
                    scores,
                    scanned,
                    source: source_pb(source) as i32,
                })
                .collect();
            Ok(Response::new(pb::RetrieveResponse {
                heads,
                keys_present: a.keys_present,
                tokens_present: a.tokens_present,
                inserted_tokens: a.inserted_tokens,
            }))
        }
        .await;
        timed(&rpc.retrieve, t, r)
    }

    /// Attend RETRIEVAL: each sequence in turn (a sequence's index is
    /// locked while it is searched), after the call was admitted.
    pub(super) async fn attend_retrieval(
        &self,
        checked: Checked,
        layout: &Layout,
        params: RetrievalParams,
    ) -> Result<Response<pb::AttendResponse>, Status> {
        let rpc = self.rpc()?;
        let mut results = Vec::with_capacity(checked.seqs.len());
        for (i, s) in checked.seqs.iter().enumerate() {
            if s.last_block_tokens.is_some() {
                return Err(Status::invalid_argument(format!(
                    "sequences[{i}].last_block_tokens: RETRIEVAL covers whole blocks only"
                )));
            }
        }
        for i in 0..checked.seqs.len() {
            let pin = exec::pin_seq(&self.store, &checked, i, true)?;
            let a = rpc
                .registry
                .attend(
                    checked.namespace,
                    layout,
                    checked.layer,
                    checked.scale,
                    pin,
                    checked.seqs[i].q.clone(),
                    params,
                )
                .await?;
            let mut r = attend_result(a.result, checked.io_dtype);
            r.retrieval_source = a.source.into_iter().map(|s| source_pb(s) as i32).collect();
            r.retrieval_scanned = a.scanned;
            results.push(r);
        }
        Ok(Response::new(pb::AttendResponse { results }))
    }
}

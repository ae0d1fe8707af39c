//! Rust client for `stratad`.
//!
//! * [`Client`]: the gRPC API over TCP (`http://host:port`) or a Unix socket
//!   (`unix:/path/stratad.sock`). Puts and gets stream block bytes.
//! * [`LocalClient`]: the zero-copy path for clients on the daemon's node:
//!   it receives the DRAM arena's memfd, maps it, and moves only slot
//!   offsets over gRPC. Every block read from the arena is checked against
//!   its checksum before it is handed out.
//! * [`keys`]: the documented, seed-stable helper that turns token ids into
//!   chained block keys, identical in every process and in the Python client.
//! * [`attend`]: attention near the data ([`Client::attend`]) and
//!   [`attend::merge`], which combines the daemon's partial `(o, lse)` with
//!   the engine's own.
//! * [`Credentials`]: a bearer token and TLS (a CA to trust, and a client
//!   certificate for mutual TLS) for daemons that authenticate TCP clients
//!   ([`Client::connect_with`]). On the Unix socket the daemon identifies
//!   the process by its uid and gid; nothing to send.
//! * Admin calls ([`Client::drain`], [`Client::evict_namespace`],
//!   [`Client::export_namespace`], [`Client::stats_per_namespace`]) and
//!   [`export`], the self-describing file format of `strata export` and
//!   `strata import`.

pub mod attend;
pub mod export;
pub mod keys;
mod local;
pub mod retrieval;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use strata_proto::pb::strata_client::StrataClient;
use strata_proto::{BlockKey, Layout, LeaseId, NamespaceId, TierKind, pb};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint as TonicEndpoint, Identity,
};

pub use local::{LocalClient, LocalPut, SharedArena};
pub use strata_proto;

/// Default TCP endpoint of a daemon started with no arguments.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7470";
/// Largest message the client sends or accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Data chunk size of stream puts (the daemon's default message limit is 16 MiB).
pub const PUT_CHUNK_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon answered with an error status.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    #[error("cannot connect to {endpoint}: {detail}; is stratad running there?")]
    Connect { endpoint: String, detail: String },
    #[error("bad endpoint {0:?}: use http://host:port or unix:/path/to/stratad.sock")]
    Endpoint(String),
    /// A block's bytes did not match its checksum after transfer: a miss.
    #[error("block {key}: checksum mismatch after transfer; treat as a miss")]
    Checksum { key: String },
    #[error("zero-copy arena: {0}")]
    Shm(String),
    #[error("protocol: {0}")]
    Protocol(String),
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Status(s)
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

impl Error {
    /// The gRPC code, when the daemon answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status(s) => Some(s.code()),
            _ => None,
        }
    }

    /// Whether the engine should treat this as a miss and recompute (true for
    /// every failure to obtain a block: a daemon that is down or a block that
    /// failed its checksum never means a wrong token).
    pub fn is_miss(&self) -> bool {
        !matches!(self.code(), Some(tonic::Code::InvalidArgument))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for Endpoint {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("unix:") {
            let p = p.strip_prefix("//").unwrap_or(p);
            if p.is_empty() {
                return Err(Error::Endpoint(s.into()));
            }
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            return Ok(Endpoint::Tcp(s.into()));
        }
        Err(Error::Endpoint(s.into()))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(s) => f.write_str(s),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A registered layout.
#[derive(Debug, Clone, Copy)]
pub struct Registered {
    pub namespace: NamespaceId,
    pub block_bytes: u64,
    pub token_bytes: u64,
    pub existed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub expires_unix_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Lookup {
    pub hits: usize,
    pub tiers: Vec<TierKind>,
    pub lease: Option<Lease>,
}

/// One block to store.
#[derive(Debug, Clone)]
pub struct PutBlock {
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub data: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutResult {
    Stored,
    AlreadyPresent,
}

/// One block read back (its checksum verified).
#[derive(Debug, Clone)]
pub struct Block {
    pub key: BlockKey,
    pub parent: Option<BlockKey>,
    pub tier: Option<TierKind>,
    pub data: Bytes,
}

#[derive(Debug, Clone, Default)]
pub struct Deleted {
    pub deleted: u32,
    pub absent: Vec<BlockKey>,
    pub pinned: Vec<BlockKey>,
}

/// What a client shows a daemon that authenticates TCP clients.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Sent as `authorization: Bearer <token>` with every call (the
    /// daemon's `auth.tcp = "token"`). Use an `https://` endpoint unless the
    /// daemon is on loopback: a token in clear text is a token given away.
    pub token: Option<String>,
    /// TLS for `https://` endpoints.
    pub tls: Option<TlsCredentials>,
}

/// TLS settings of an `https://` connection.
#[derive(Debug, Clone, Default)]
pub struct TlsCredentials {
    /// The CA certificate (PEM) that signed the daemon's certificate; none:
    /// the system's roots are not loaded, so set it.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate chain and its key (PEM), for mutual TLS (the
    /// daemon's `auth.tcp = "mtls"`).
    pub cert_pem: Option<Vec<u8>>,
    pub key_pem: Option<Vec<u8>>,
    /// The name the daemon's certificate must carry, when it is not the
    /// endpoint's host.
    pub domain: Option<String>,
}

/// Adds the bearer token (if any) to every call.
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The generated client with the bearer-token interceptor.
pub type Rpc = StrataClient<InterceptedService<Channel, BearerToken>>;

/// A gRPC client of one daemon. Cheap to clone (one HTTP/2 connection).
#[derive(Debug, Clone)]
pub struct Client {
    rpc: Rpc,
    endpoint: Endpoint,
}

fn key_bytes(k: &BlockKey) -> Bytes {
    Bytes::copy_from_slice(k.as_bytes())
}

fn parse_key(b: &[u8], what: &str) -> Result<BlockKey> {
    BlockKey::new(b).map_err(|e| Error::Protocol(format!("{what}: {e}")))
}

fn put_result(r: i32) -> Result<PutResult> {
    match pb::PutResult::try_from(r) {
        Ok(pb::PutResult::Stored) => Ok(PutResult::Stored),
        Ok(pb::PutResult::AlreadyPresent) => Ok(PutResult::AlreadyPresent),
        _ => Err(Error::Protocol(format!("unknown put result {r}"))),
    }
}

fn tier(t: i32) -> Option<TierKind> {
    pb::Tier::try_from(t)
        .ok()
        .and_then(|t| TierKind::try_from(t).ok())
}

impl Client {
    /// Connects to `http://host:port` or `unix:/path`.
    pub async fn connect(endpoint: &str) -> Result<Client> {
        Self::connect_with(endpoint, &Credentials::default()).await
    }

    /// Connects to `http://host:port`, `https://host:port` (TLS, with
    /// `creds.tls`) or `unix:/path`, sending `creds.token` with every call.
    pub async fn connect_with(endpoint: &str, creds: &Credentials) -> Result<Client> {
        let ep: Endpoint = endpoint.parse()?;
        let token = match &creds.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| Error::Protocol("the token is not printable ASCII".into()))?,
            ),
            None => None,
        };
        let channel = match &ep {
            Endpoint::Tcp(url) => {
                let mut e = tune(
                    TonicEndpoint::from_shared(url.clone())
                        .map_err(|_| Error::Endpoint(url.clone()))?,
                );
                if let Some(tls) = &creds.tls {
                    e = e.tls_config(tls_config(tls)?).map_err(|e| Error::Connect {
                        endpoint: ep.to_string(),
                        detail: source_chain(&e),
                    })?;
                }
                e.tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(5))
                    .connect()
                    .await
                    .map_err(|e| Error::Connect {
                        endpoint: ep.to_string(),
                        detail: source_chain(&e),
                    })?
            }
            Endpoint::Unix(path) => {
                let path = path.clone();
                // The URI is required by the API and ignored by the connector.
                tune(TonicEndpoint::from_static("http://localhost"))
                    .connect_timeout(Duration::from_secs(5))
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(s))
                        }
                    }))
                    .await
                    .map_err(|e| Error::Connect {
                        endpoint: ep.to_string(),
                        detail: source_chain(&e),
                    })?
            }
        };
        let rpc = StrataClient::with_interceptor(channel, BearerToken(token))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Client { rpc, endpoint: ep })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The raw generated client, for calls this wrapper does not cover.
    pub fn rpc(&mut self) -> &mut Rpc {
        &mut self.rpc
    }

    pub async fn register_layout(&mut self, layout: &Layout) -> Result<Registered> {
        let r = self
            .rpc
            .register_layout(pb::RegisterLayoutRequest {
                layout: Some(layout.into()),
            })
            .await?
            .into_inner();
        Ok(Registered {
            namespace: NamespaceId(r.namespace_id),
            block_bytes: r.block_bytes,
            token_bytes: r.token_bytes,
            existed: r.existed,
        })
    }

    /// The leading run of `keys` present; with `lease_ttl_ms` > 0, pins the hits.
    pub async fn lookup(
        &mut self,
        ns: NamespaceId,
        keys: &[BlockKey],
        lease_ttl_ms: u32,
    ) -> Result<Lookup> {
        let r = self
            .rpc
            .lookup(pb::LookupRequest {
                namespace_id: ns.0,
                keys: keys.iter().map(key_bytes).collect(),
                lease_ttl_ms,
                want_slots: false,
            })
            .await?
            .into_inner();
        Ok(Lookup {
            hits: r.hits as usize,
            tiers: r.tiers.iter().filter_map(|&t| tier(t)).collect(),
            lease: (r.lease_id != 0).then_some(Lease {
                id: LeaseId(r.lease_id),
                expires_unix_ms: r.lease_expires_unix_ms,
            }),
        })
    }

    /// Stores blocks in one stream, in order. Returns one result per block.
    pub async fn put(&mut self, ns: NamespaceId, blocks: &[PutBlock]) -> Result<Vec<PutResult>> {
        Ok(self
            .put_durable(ns, blocks)
            .await?
            .into_iter()
            .map(|(r, _)| r)
            .collect())
    }

    /// Like [`put`](Self::put), also saying for each block whether it is
    /// durable (has an NVMe copy; always, under the daemon's write-through).
    pub async fn put_durable(
        &mut self,
        ns: NamespaceId,
        blocks: &[PutBlock],
    ) -> Result<Vec<(PutResult, bool)>> {
        let mut msgs = Vec::new();
        for b in blocks {
            let len = b.data.len();
            let first_end = len.min(PUT_CHUNK_BYTES);
            msgs.push(pb::PutRequest {
                header: Some(pb::PutHeader {
                    namespace_id: ns.0,
                    key: key_bytes(&b.key),
                    parent: b.parent.as_ref().map(key_bytes).unwrap_or_default(),
                    length: len as u64,
                    checksum: strata_proto::checksum(&b.data),
                }),
                data: b.data.slice(..first_end),
            });
            let mut off = first_end;
            while off < len {
                let end = (off + PUT_CHUNK_BYTES).min(len);
                msgs.push(pb::PutRequest {
                    header: None,
                    data: b.data.slice(off..end),
                });
                off = end;
            }
        }
        let r = self
            .rpc
            .put(futures_util::stream::iter(msgs))
            .await?
            .into_inner();
        if r.outcomes.len() != blocks.len() {
            return Err(Error::Protocol(format!(
                "{} outcomes for {} blocks",
                r.outcomes.len(),
                blocks.len()
            )));
        }
        r.outcomes
            .iter()
            .map(|o| Ok((put_result(o.result)?, o.durable)))
            .collect()
    }

    /// Reads blocks; every block's checksum is verified on arrival.
    pub async fn get(
        &mut self,
        ns: NamespaceId,
        keys: &[BlockKey],
        lease: Option<LeaseId>,
    ) -> Result<Vec<Block>> {
        let mut stream = self
            .rpc
            .get(pb::GetRequest {
                namespace_id: ns.0,
                keys: keys.iter().map(key_bytes).collect(),
                lease_id: lease.map_or(0, |l| l.0),
            })
            .await?
            .into_inner();
        let mut out = Vec::with_capacity(keys.len());
        let mut cur: Option<(pb::BlockHeader, Parts)> = None;
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            if let Some(h) = msg.header {
                if let Some(done) = cur.take() {
                    out.push(finish(done)?);
                }
                if msg.data.len() as u64 == h.length {
                    // The whole block in one message: no reassembly copy.
                    out.push(finish((h, Parts::One(msg.data)))?);
                } else {
                    let mut buf = bytes::BytesMut::with_capacity(h.length as usize);
                    buf.extend_from_slice(&msg.data);
                    cur = Some((h, Parts::Many(buf)));
                }
            } else {
                match cur.as_mut() {
                    Some((_, Parts::Many(buf))) => buf.extend_from_slice(&msg.data),
                    _ => return Err(Error::Protocol("data before any block header".into())),
                }
            }
        }
        if let Some(done) = cur.take() {
            out.push(finish(done)?);
        }
        if out.len() != keys.len() {
            return Err(Error::Protocol(format!(
                "{} blocks for {} keys",
                out.len(),
                keys.len()
            )));
        }
        Ok(out)
    }

    pub async fn release(&mut self, ns: NamespaceId, lease: LeaseId) -> Result<u32> {
        Ok(self
            .rpc
            .release(pb::ReleaseRequest {
                lease_id: lease.0,
                namespace_id: ns.0,
            })
            .await?
            .into_inner()
            .released_blocks)
    }

    pub async fn delete(&mut self, ns: NamespaceId, keys: &[BlockKey]) -> Result<Deleted> {
        let r = self
            .rpc
            .delete(pb::DeleteRequest {
                namespace_id: ns.0,
                keys: keys.iter().map(key_bytes).collect(),
            })
            .await?
            .into_inner();
        let conv = |v: &[Bytes]| {
            v.iter()
                .map(|k| parse_key(k, "delete"))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Deleted {
            deleted: r.deleted,
            absent: conv(&r.absent)?,
            pinned: conv(&r.pinned)?,
        })
    }

    pub async fn stats(&mut self) -> Result<pb::StatsResponse> {
        Ok(self
            .rpc
            .stats(pb::StatsRequest {
                per_namespace: false,
            })
            .await?
            .into_inner())
    }

    /// Stats with one entry per namespace (`namespace_stats`).
    pub async fn stats_per_namespace(&mut self) -> Result<pb::StatsResponse> {
        Ok(self
            .rpc
            .stats(pb::StatsRequest {
                per_namespace: true,
            })
            .await?
            .into_inner())
    }

    /// Drains the daemon (it then exits): its progress, until the phase is
    /// `DRAIN_PHASE_DONE`.
    pub async fn drain(&mut self) -> Result<tonic::Streaming<pb::DrainProgress>> {
        Ok(self.rpc.drain(pb::DrainRequest {}).await?.into_inner())
    }

    /// Removes every block of a namespace (see the RPC's documentation:
    /// pinned blocks are retired, removed when their last pin goes).
    pub async fn evict_namespace(&mut self, ns: NamespaceId) -> Result<pb::EvictNamespaceResponse> {
        Ok(self
            .rpc
            .evict_namespace(pb::EvictNamespaceRequest { namespace_id: ns.0 })
            .await?
            .into_inner())
    }

    /// Reads a whole namespace out: its layout first, then every block
    /// (verified on arrival), then a summary.
    pub async fn export_namespace(&mut self, ns: NamespaceId) -> Result<ExportStream> {
        let inner = self
            .rpc
            .export_namespace(pb::ExportNamespaceRequest { namespace_id: ns.0 })
            .await?
            .into_inner();
        Ok(ExportStream {
            inner,
            cur: None,
            done: false,
        })
    }

    /// Attention near the data: per sequence, the daemon's partial
    /// `(o, lse)` over the present prefix of its chain, for one layer.
    /// Merge it with the engine's own part with [`attend::merge`].
    /// Starts (or reports) the retrieval indexes of a chain's present
    /// prefix; with `wait`, once each is ready or failed.
    pub async fn build_index(
        &mut self,
        req: &retrieval::BuildIndexRequest,
    ) -> Result<retrieval::BuildIndexOutput> {
        let r = self
            .rpc
            .build_index(retrieval::build_pb(req))
            .await?
            .into_inner();
        retrieval::build_output(r).map_err(Error::Protocol)
    }

    /// The top-k token positions per query head (from the chain's index
    /// when ready, else an exact scan; each head says which).
    pub async fn retrieve(
        &mut self,
        req: &retrieval::RetrieveRequest,
    ) -> Result<retrieval::RetrieveOutput> {
        let r = self
            .rpc
            .retrieve(retrieval::retrieve_pb(req))
            .await?
            .into_inner();
        retrieval::retrieve_output(r).map_err(Error::Protocol)
    }

    pub async fn attend(
        &mut self,
        req: &attend::AttendRequest,
    ) -> Result<Vec<attend::AttendOutput>> {
        let r = self.rpc.attend(attend::request_pb(req)).await?.into_inner();
        if r.results.len() != req.sequences.len() {
            return Err(Error::Protocol(format!(
                "{} Attend results for {} sequences",
                r.results.len(),
                req.sequences.len()
            )));
        }
        r.results
            .into_iter()
            .map(|x| attend::output(x, req.io_dtype).map_err(Error::Protocol))
            .collect()
    }
}

/// What an export stream yields, in order: `Start`, `Block`s, `End`.
#[derive(Debug, Clone)]
pub enum ExportItem {
    Start {
        namespace: NamespaceId,
        layout: Layout,
        /// Blocks and bytes the namespace held as the export began.
        blocks: u64,
        bytes: u64,
    },
    /// A block, its checksum verified on arrival.
    Block { block: Block, checksum: u64 },
    End {
        blocks: u64,
        bytes: u64,
        /// Blocks removed (or found corrupt) while the export ran.
        skipped: u64,
    },
}

/// A namespace being read out ([`Client::export_namespace`]).
pub struct ExportStream {
    inner: tonic::Streaming<pb::ExportNamespaceResponse>,
    cur: Option<(pb::BlockHeader, bytes::BytesMut)>,
    done: bool,
}

impl std::fmt::Debug for ExportStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportStream")
            .field("done", &self.done)
            .finish()
    }
}

impl ExportStream {
    /// The next item; `None` after `End`. A stream that stops before its
    /// `End` is an error (the export is incomplete).
    pub async fn next(&mut self) -> Result<Option<ExportItem>> {
        if self.done {
            return Ok(None);
        }
        loop {
            if let Some((h, buf)) = &self.cur
                && buf.len() as u64 == h.length
            {
                let (h, buf) = self.cur.take().expect("checked");
                let checksum = h.checksum;
                let block = finish((h, Parts::Many(buf)))?;
                return Ok(Some(ExportItem::Block { block, checksum }));
            }
            let Some(msg) = self.inner.next().await else {
                return Err(Error::Protocol(
                    "the export stream ended before its summary: the export is incomplete".into(),
                ));
            };
            let msg = msg?;
            if let Some(s) = msg.start {
                let layout = s
                    .layout
                    .ok_or_else(|| Error::Protocol("export start without a layout".into()))
                    .and_then(|l| {
                        Layout::try_from(l)
                            .map_err(|e| Error::Protocol(format!("export layout: {e}")))
                    })?;
                return Ok(Some(ExportItem::Start {
                    namespace: NamespaceId(s.namespace_id),
                    layout,
                    blocks: s.blocks,
                    bytes: s.bytes,
                }));
            }
            if let Some(h) = msg.header {
                if self.cur.is_some() {
                    return Err(Error::Protocol(
                        "export: a block header arrived before the previous block's bytes".into(),
                    ));
                }
                let mut buf = bytes::BytesMut::with_capacity(h.length as usize);
                buf.extend_from_slice(&msg.data);
                self.cur = Some((h, buf));
            } else if !msg.data.is_empty() {
                match self.cur.as_mut() {
                    Some((h, buf)) if (buf.len() + msg.data.len()) as u64 <= h.length => {
                        buf.extend_from_slice(&msg.data)
                    }
                    _ => return Err(Error::Protocol("export: unexpected block bytes".into())),
                }
            }
            if let Some(e) = msg.end {
                if self.cur.is_some() {
                    return Err(Error::Protocol(
                        "export: the summary arrived inside a block".into(),
                    ));
                }
                self.done = true;
                return Ok(Some(ExportItem::End {
                    blocks: e.blocks,
                    bytes: e.bytes,
                    skipped: e.skipped,
                }));
            }
        }
    }
}

/// Block-sized HTTP/2 windows and frames (the daemon uses the same).
fn tls_config(t: &TlsCredentials) -> Result<ClientTlsConfig> {
    let mut c = ClientTlsConfig::new();
    if let Some(ca) = &t.ca_pem {
        c = c.ca_certificate(Certificate::from_pem(ca));
    }
    match (&t.cert_pem, &t.key_pem) {
        (Some(cert), Some(key)) => c = c.identity(Identity::from_pem(cert, key)),
        (None, None) => {}
        _ => {
            return Err(Error::Protocol(
                "TLS: a client certificate and its key go together".into(),
            ));
        }
    }
    if let Some(d) = &t.domain {
        c = c.domain_name(d.clone());
    }
    Ok(c)
}

fn tune(e: TonicEndpoint) -> TonicEndpoint {
    e.initial_stream_window_size(16 << 20)
        .initial_connection_window_size(64 << 20)
        .max_frame_size(1 << 20)
}

/// A block's bytes as received: one message, or reassembled from several.
enum Parts {
    One(Bytes),
    Many(bytes::BytesMut),
}

fn finish((h, parts): (pb::BlockHeader, Parts)) -> Result<Block> {
    let key = parse_key(&h.key, "block header key")?;
    let data = match parts {
        Parts::One(b) => b,
        Parts::Many(m) => m.freeze(),
    };
    if data.len() as u64 != h.length {
        return Err(Error::Protocol(format!(
            "block {key}: {} bytes received, header said {}",
            data.len(),
            h.length
        )));
    }
    if strata_proto::checksum(&data) != h.checksum {
        return Err(Error::Checksum { key: key.to_hex() });
    }
    let parent = if h.parent.is_empty() {
        None
    } else {
        Some(parse_key(&h.parent, "parent")?)
    };
    Ok(Block {
        key,
        parent,
        tier: tier(h.tier),
        data,
    })
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The arena hand-off socket of a gRPC Unix socket (same rule as the daemon).
pub fn shm_path_for(uds: &Path) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(".shm");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            "unix:/tmp/s.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/tmp/s.sock".into())
        );
        assert_eq!(
            "unix:///tmp/s.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/tmp/s.sock".into())
        );
        assert!(matches!(
            "http://1.2.3.4:5".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp(_)
        ));
        assert!("1.2.3.4:5".parse::<Endpoint>().is_err());
        assert!("unix:".parse::<Endpoint>().is_err());
    }
}

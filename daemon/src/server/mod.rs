//! The daemon's front: gRPC on TCP and on a Unix socket, the arena hand-off
//! socket, the metrics and health endpoint, and the background tasks.
//!
//! [`start`] binds every listener first (so a port clash fails at once, with
//! the address named), opens the tiers while `/readyz` says what it is
//! doing, then serves. [`Running::shutdown`] drains (see `drain.rs`):
//! readiness goes false and new puts are refused, puts and reservations in
//! flight settle, blocks held only in DRAM are written down to NVMe and the
//! segments flushed; then listeners stop accepting, HTTP/2 connections get
//! GOAWAY so no new call starts, in-flight calls finish (up to
//! `server.drain_timeout_ms`), and the socket files are removed.

pub mod admin;
pub mod auth;
pub mod drain;
pub mod events;
pub mod http;
pub mod limits;
pub mod retrieval;
pub mod service;
pub mod shm;
pub mod status;
pub mod x509;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use strata_proto::pb::strata_server::StrataServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

use crate::config::{Config, ConfigError, DrainConfig, Resolved};
use crate::metrics::{Registry, ServerMetrics, StoreMetrics};
use crate::store::{Store, SystemClock, tiering};
use crate::tier::nvme::buf::BufPool;
use crate::tier::nvme::engine::open_engine;
use crate::tier::nvme::{NvmeConfig, NvmeTier};
use crate::tier::{DramError, DramTier};
use http::Health;
use limits::{Limits, MessageLimitLayer};
use service::StrataService;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "{what} {path} is in use by a running process (another stratad?); stop it or choose another path"
    )]
    SocketInUse { what: &'static str, path: PathBuf },
    #[error("cannot create directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Dram(#[from] DramError),
    #[error("opening tiers: {0}")]
    Task(String),
    #[error(
        "cannot map Attend's regions (compute.sketch_runs_bytes: {runs} bytes, compute.quant_bytes: {quant} bytes): {source}; lower them or raise the memory limit"
    )]
    SketchRuns {
        runs: u64,
        quant: u64,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tokens(#[from] auth::TokensError),
    #[error("{what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS on server.listen: {0}")]
    Tls(String),
    #[error("opening the nvme tier in {dir}: {source}")]
    Nvme {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Opens the NVMe tier: its I/O engine, buffer pool and segment files.
async fn open_nvme(cfg: &NvmeConfig, health: &Health) -> Result<Arc<NvmeTier>, StartError> {
    health.set(
        false,
        format!("starting: opening the nvme tier in {}", cfg.dir.display()),
    );
    let nerr = |source| StartError::Nvme {
        dir: cfg.dir.clone(),
        source,
    };
    let pool = BufPool::new(cfg.io_buffer_bytes, cfg.io_buffers);
    let engine = open_engine(cfg.engine, cfg.queue_depth, Some(&pool)).map_err(nerr)?;
    let (tier, found) = NvmeTier::open(cfg.clone(), engine, pool).map_err(nerr)?;
    if found.refused_segments > 0 {
        tracing::error!(
            refused = found.refused_segments,
            "nvme segments of an unknown format were left untouched; their space counts against tiers.nvme.bytes"
        );
    }
    tracing::info!(dir = %cfg.dir.display(), bytes = cfg.capacity_bytes, engine = tier.engine_name(), "nvme tier open");
    Ok(tier)
}

/// HTTP/2 settings of the gRPC listeners (and of the Rust client).
pub const H2_STREAM_WINDOW: u32 = 16 << 20;
pub const H2_CONNECTION_WINDOW: u32 = 64 << 20;
pub const H2_MAX_FRAME: u32 = 1 << 20;

/// A started daemon: its bound addresses, its store, and its tasks.
pub struct Running {
    pub tcp_addr: Option<SocketAddr>,
    pub uds: Option<PathBuf>,
    pub shm_socket: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    pub store: Arc<Store>,
    pub registry: Arc<Registry>,
    pub health: Arc<Health>,
    pub auth: Arc<auth::Auth>,
    /// The retrieval indexes (BuildIndex, Retrieve).
    pub retrieval: Arc<crate::retrieval::Registry>,
    stop: CancellationToken,
    /// Background work (tiering, expiry, metrics endpoint).
    tasks: JoinSet<()>,
    /// The gRPC servers (which hold idle client connections open).
    servers: JoinSet<()>,
    inflight: Arc<drain::InFlight>,
    drain_timeout: Duration,
    health_reporter: tonic_health::server::HealthReporter,
    gate: Arc<drain::Gate>,
    drain_cfg: DrainConfig,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("tcp_addr", &self.tcp_addr)
            .field("uds", &self.uds)
            .field("metrics_addr", &self.metrics_addr)
            .finish()
    }
}

/// Removes a stale socket file, refusing if something still listens on it.
fn prepare_socket(what: &'static str, path: &Path) -> Result<(), StartError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StartError::Dir {
            path: dir.into(),
            source,
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(StartError::SocketInUse {
                what,
                path: path.into(),
            });
        }
        std::fs::remove_file(path).map_err(|source| StartError::Bind {
            what,
            addr: path.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// Binds a Unix socket. `open`: anyone may connect (mode 0666), because
/// every connection is identified by its peer credentials (auth.uds =
/// "peercred"); otherwise the process umask decides (0755 by default:
/// only the daemon's user and root may connect).
fn bind_unix(what: &'static str, path: &Path, open: bool) -> Result<UnixListener, StartError> {
    prepare_socket(what, path)?;
    let err = |source| StartError::Bind {
        what,
        addr: path.display().to_string(),
        source,
    };
    let l = UnixListener::bind(path).map_err(err)?;
    if open {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    }
    Ok(l)
}

/// The TLS setting of the TCP listener: the server's certificate and key,
/// and with mTLS the CA of client certificates. A client without a
/// certificate completes the handshake and is then refused per call with
/// UNAUTHENTICATED (saying what is expected); one with a certificate the CA
/// did not sign fails the handshake.
fn tls_config(
    files: &crate::config::TlsFiles,
) -> Result<tonic::transport::ServerTlsConfig, StartError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |what: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| StartError::TlsFile {
            what,
            path: path.into(),
            source,
        })
    };
    let cert = read("auth.tls_cert", &files.cert)?;
    let key = read("auth.tls_key", &files.key)?;
    let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = &files.client_ca {
        cfg = cfg
            .client_ca_root(Certificate::from_pem(read("auth.tls_client_ca", ca)?))
            .client_auth_optional(true);
    }
    Ok(cfg)
}

/// Starts a daemon from a configuration; returns once it serves.
pub async fn start(cfg: &Config) -> Result<Running, StartError> {
    let r: Resolved = cfg.resolve()?;
    let registry = Arc::new(Registry::new());
    let health = Arc::new(Health::default());
    health.set(false, "starting: opening tiers");
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();

    // 1. Listeners first: a clash fails before minutes of pre-faulting.
    let http_listener = match r.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    what: "server.metrics_listen",
                    addr: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let metrics_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());
    let tcp = match r.listen {
        Some(addr) => Some(
            TcpIncoming::bind(addr)
                .map_err(|source| StartError::Bind {
                    what: "server.listen",
                    addr: addr.to_string(),
                    source,
                })?
                // Without no-delay every small call waits ~40 ms for Nagle.
                .with_nodelay(Some(true)),
        ),
        None => None,
    };
    let tcp_addr = tcp.as_ref().and_then(|t| t.local_addr().ok());
    let open = r.auth.uds == crate::config::UdsAuth::PeerCred;
    let uds = match &r.uds {
        Some(p) => Some(bind_unix("server.uds", p, open)?),
        None => None,
    };
    let shm_listener = match &r.shm_socket {
        Some(p) => Some(bind_unix("server.shm_socket", p, open)?),
        None => None,
    };
    let tls = match &r.auth.tls {
        Some(files) => Some(tls_config(files)?),
        None => None,
    };

    // 2. Probes answer while the tiers open.
    let (app, http_handle) = http::router(registry.clone(), health.clone());
    if let Some(l) = http_listener {
        let stop = stop.clone();
        tasks.spawn(async move {
            if let Err(e) = http::serve(l, app, stop).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }

    // 3. Tiers.
    let dram_cfg = r.dram.clone();
    let started = std::time::Instant::now();
    let dram = tokio::task::spawn_blocking(move || DramTier::new(&dram_cfg))
        .await
        .map_err(|e| StartError::Task(e.to_string()))??;
    tracing::info!(
        bytes = dram.capacity_bytes(),
        prefault = r.dram.prefault,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "DRAM tier ready"
    );
    let nvme = match &r.nvme {
        Some(cfg) => Some(open_nvme(cfg, &health).await?),
        None => None,
    };
    let store = Arc::new(Store::new(
        r.store.clone(),
        dram,
        nvme.clone(),
        r.granule,
        Arc::new(SystemClock),
        StoreMetrics::new(&registry),
    ));
    let _ = http_handle.store.set(store.clone());
    let auth = Arc::new(auth::Auth::new(
        &r.auth,
        |name| store.tenant_id(name),
        &registry,
    )?);
    for line in auth.describe(tcp_addr, r.auth.insecure_tcp) {
        if r.auth.insecure_tcp
            || (!auth.is_multi() && tcp_addr.is_some_and(|a| !a.ip().is_loopback()))
        {
            tracing::warn!("{line}");
        } else {
            tracing::info!("{line}");
        }
    }
    // 4. Warm restart: rebuild the index from the NVMe segments. /readyz
    //    says how far it got; gRPC opens when it is done.
    if let Some(n) = &nvme {
        let h = health.clone();
        let mut last = std::time::Instant::now();
        let stats = tiering::recover(&store, &mut |st, elapsed| {
            let line = format!(
                "recovering nvme: {} segments, {} records, {} bytes read, {} torn, {:.1} s",
                st.segments,
                st.records,
                st.bytes,
                st.torn,
                elapsed.as_secs_f64()
            );
            h.set(false, line.clone());
            if last.elapsed() >= Duration::from_secs(1) {
                tracing::info!("{line}");
                last = std::time::Instant::now();
            }
        })
        .await;
        tracing::info!(
            segments = stats.segments,
            records = stats.records,
            tombstones = stats.tombstones,
            bytes = stats.bytes,
            torn = stats.torn,
            blocks = store.stats().blocks,
            elapsed_ms = started.elapsed().as_millis() as u64,
            engine = n.engine_name(),
            "nvme tier recovered"
        );
        if stats.torn > 0 {
            tracing::warn!(
                torn = stats.torn,
                "discarded torn or damaged records found at start"
            );
        }
        store.metrics().recovered_torn.increment(stats.torn);
    }

    // 5. Background work: eviction (write-down to NVMe, reclaim), expiry of
    //    leases and reservations.
    if nvme.is_some() {
        tasks.spawn(tiering::run(store.clone(), stop.clone()));
    } else {
        let (store, stop) = (store.clone(), stop.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = store.evict_wanted.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                let n = store.evict_to_watermark(64);
                if n > 0 {
                    tracing::trace!(evicted = n, "background eviction");
                }
            }
        });
    }
    {
        let (store, stop) = (store.clone(), stop.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => { store.expire(); }
                }
            }
        });
    }

    // 6. gRPC.
    let server_metrics = Arc::new(ServerMetrics::new(registry.clone()));
    let s = &cfg.server;
    let limits = Limits::new(
        s.max_keys_per_call,
        s.max_streams,
        s.max_subscribers,
        s.max_inflight_put_bytes.0,
        server_metrics.clone(),
    );
    let max_msg = s.max_message_bytes.0 as usize;
    let attend = Arc::new(
        crate::attend::exec::AttendCtx::new(
            r.compute.clone(),
            crate::metrics::AttendMetrics::new(&registry),
        )
        .map_err(|source| StartError::SketchRuns {
            runs: r.compute.sketch_runs_bytes,
            quant: r.compute.quant_bytes,
            source,
        })?,
    );
    let retrieval = Arc::new(crate::retrieval::Registry::new(
        r.retrieval.clone(),
        attend.clone(),
        store.clone(),
        crate::retrieval::RetrievalMetrics::new(&registry),
    ));
    {
        let (retrieval, stop) = (retrieval.clone(), stop.clone());
        let every = r.retrieval.sweep_interval;
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => { retrieval.sweep().await; }
                }
            }
        });
    }
    if let (Some(tails), Some(auto)) = (retrieval.auto_tails(), r.retrieval.auto.as_ref()) {
        // Every stored block is noted; quiet chains are indexed here.
        store.set_publish_hook(tails);
        let (retrieval, stop) = (retrieval.clone(), stop.clone());
        let every = (auto.quiet / 4).clamp(Duration::from_millis(5), Duration::from_millis(250));
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = retrieval.auto_tick() => {}
                }
            }
        });
    }
    let retrieval_rpc = Arc::new(retrieval::RetrievalRpc::new(
        retrieval.clone(),
        &server_metrics,
    ));
    let gate = drain::Gate::new(r.drain.write_down);
    let svc = StrataServer::new(
        StrataService::new(
            store.clone(),
            limits,
            attend,
            s.stream_chunk_bytes.0 as usize,
            &server_metrics,
            stop.clone(),
            gate.clone(),
            auth.clone(),
        )
        .with_retrieval(retrieval_rpc),
    )
    // tonic's own check stays as a second line, above ours.
    .max_decoding_message_size(max_msg + (64 << 10))
    .max_encoding_message_size(max_msg + (64 << 10));
    let (health_reporter, health_svc) = tonic_health::server::health_reporter();
    let limit_layer = MessageLimitLayer::new(
        max_msg as u64,
        server_metrics.limit_rejection("server.max_message_bytes"),
    );
    let per_conn = s.max_concurrent_streams_per_connection;
    let inflight = Arc::new(drain::InFlight::default());
    let inflight_layer = inflight.clone();
    let mut servers = JoinSet::new();
    let builder = move || {
        tonic::transport::Server::builder()
            .max_concurrent_streams(per_conn)
            // Block-sized flow-control windows and frames: with HTTP/2's
            // 64 KiB defaults a 2 MiB block needs dozens of window updates.
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_frame_size(H2_MAX_FRAME)
            .layer(limit_layer.clone())
            .layer(drain::InFlightLayer(inflight_layer.clone()))
    };
    let drain_timeout = Duration::from_millis(s.drain_timeout_ms);
    if let Some(incoming) = tcp {
        let (svc, health_svc, stop) = (svc.clone(), health_svc.clone(), stop.clone());
        let mut b = builder();
        if let Some(t) = tls {
            b = b
                .tls_config(t)
                .map_err(|e| StartError::Tls(e.to_string()))?;
        }
        servers.spawn(async move {
            let r = b
                .add_service(health_svc)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, stop.cancelled())
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "gRPC over TCP failed");
            }
        });
    }
    if let Some(listener) = uds {
        let (svc, health_svc, stop) = (svc.clone(), health_svc.clone(), stop.clone());
        let mut b = builder();
        servers.spawn(async move {
            let r = b
                .add_service(health_svc)
                .add_service(svc)
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop.cancelled())
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "gRPC over the Unix socket failed");
            }
        });
    }
    if let Some(listener) = shm_listener {
        let policy = shm::ShmPolicy::from_config(r.shm_allowed_uids.clone(), auth.clone());
        tasks.spawn(shm::serve(
            listener,
            store.clone(),
            policy,
            server_metrics.clone(),
            stop.clone(),
        ));
    }

    health_reporter
        .set_serving::<StrataServer<StrataService>>()
        .await;
    health.set(true, tier_detail(&store));
    // Keep the detail current (a fenced NVMe tier shows up here).
    {
        let (store, health, stop) = (store.clone(), health.clone(), stop.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                if health.is_ready() {
                    health.set(true, tier_detail(&store));
                }
            }
        });
    }
    tracing::info!(
        tcp = ?tcp_addr,
        uds = ?r.uds,
        shm = ?r.shm_socket,
        metrics = ?metrics_addr,
        "stratad serving"
    );
    Ok(Running {
        tcp_addr,
        uds: r.uds,
        shm_socket: r.shm_socket,
        metrics_addr,
        store,
        registry,
        health,
        auth,
        retrieval,
        stop,
        tasks,
        servers,
        inflight,
        drain_timeout,
        health_reporter,
        gate,
        drain_cfg: r.drain,
    })
}

/// The readiness detail: each tier and its state.
fn tier_detail(store: &Store) -> String {
    let mut s = format!("dram: {} bytes", store.dram().capacity_bytes());
    if let Some(n) = store.nvme() {
        let st = n.stats();
        let refused = n.refused_files();
        if st.fenced {
            s.push_str(&format!(
                "\nnvme: FENCED after {} I/O errors; serving from dram only",
                st.io_errors
            ));
        } else {
            s.push_str(&format!(
                "\nnvme: {} of {} bytes in {} segments ({})",
                st.allocated, st.capacity, st.segments, st.engine
            ));
        }
        // Files of a format this build cannot read: named, left untouched.
        for line in refused.iter().take(8) {
            s.push_str(&format!("\nnvme: refused {line}"));
        }
        if refused.len() > 8 {
            s.push_str(&format!(
                "\nnvme: refused {} more files (see the log)",
                refused.len() - 8
            ));
        }
    }
    s
}

impl Running {
    /// Re-reads the tokens file (SIGHUP). On error the tokens in use stay.
    pub fn reload_tokens(&self) -> Result<usize, auth::TokensError> {
        self.auth.reload_tokens()
    }

    /// Fires when a client asked for a drain (`strata drain`); the owner
    /// then calls [`shutdown`](Self::shutdown).
    pub async fn drain_requested(&self) {
        self.gate.requested().await;
    }

    /// The drain gate (tests watch its progress).
    pub fn gate(&self) -> &Arc<drain::Gate> {
        &self.gate
    }

    /// Drains and stops: readiness goes false and new puts are refused,
    /// puts and reservations in flight settle, DRAM is written down to
    /// NVMe and flushed (`drain::run`); then the servers stop accepting
    /// connections and calls, calls in flight finish (up to the drain
    /// timeout), background work (write-downs in flight) ends, and idle
    /// client connections are closed.
    pub async fn shutdown(mut self) {
        self.health.set(false, "draining: refusing new puts");
        self.health_reporter
            .set_not_serving::<StrataServer<StrataService>>()
            .await;
        drain::run(&self.store, &self.gate, &self.health, &self.drain_cfg).await;
        self.stop.cancel();
        let started = std::time::Instant::now();
        if tokio::time::timeout(self.drain_timeout, self.inflight.idle())
            .await
            .is_err()
        {
            tracing::warn!(
                timeout_ms = self.drain_timeout.as_millis() as u64,
                calls = self.inflight.count(),
                "drain timed out; abandoning calls still in flight"
            );
        }
        // No call is left; what remains are idle connections.
        let _ = tokio::time::timeout(Duration::from_millis(50), async {
            while self.servers.join_next().await.is_some() {}
        })
        .await;
        self.servers.abort_all();
        let left = self
            .drain_timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        if tokio::time::timeout(left, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!("background work did not end in time; abandoning it");
            self.tasks.abort_all();
        }
        for p in [&self.uds, &self.shm_socket].into_iter().flatten() {
            let _ = std::fs::remove_file(p);
        }
        let st = self.store.stats();
        tracing::info!(blocks = st.blocks, leases = st.leases, "stratad stopped");
    }
}

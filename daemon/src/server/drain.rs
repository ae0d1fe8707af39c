//! Draining: the gate that turns away new puts once a drain begins, the
//! count of calls in flight that the end of a drain waits for, and the
//! drain's progress as the `Drain` RPC reports it.
//!
//! A drain (SIGTERM, Ctrl-C or `strata drain`; `Running::shutdown` runs
//! it) goes through the phases of [`DrainPhase`]. From its first moment
//! until the process exits:
//! * readiness is false (`/readyz` 503, gRPC health NOT_SERVING);
//! * a new Put stream or Reserve is refused with UNAVAILABLE, saying that
//!   the daemon is draining ([`Gate::admit_new_write`]); reads, Commit and
//!   Abort of open reservations, Delete and the admin calls are served;
//! * every block a put or commit stores is written through to NVMe before
//!   it is acknowledged ([`Gate::write_through`]), so no acknowledged
//!   block can slip past the write-down.
//!
//! The gate and its writers race without a lock: a writer counts itself
//! in, then reads the flag; the drain sets the flag, then reads the count
//! (both sequentially consistent), so either the writer sees the drain and
//! backs out, or the drain sees the writer and waits for it.
//!
//! [`InFlight`] counts gRPC calls in flight, so that the end of a drain
//! waits for calls rather than for connections: engines keep their HTTP/2
//! connections open between calls, and a drain that waited for those to
//! close would always run into its timeout. A call is in flight from the
//! moment its request reaches the service until its response body ends
//! (for a Get stream, until the last block is sent).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use http_body::{Body, Frame};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// Where a drain is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DrainPhase {
    /// No drain.
    #[default]
    Serving,
    /// Puts refused; waiting for puts, commits and reservations in flight.
    Settling,
    /// Writing blocks held only in DRAM down to NVMe.
    WritingDown,
    /// Flushed; the daemon stops serving and exits.
    Done,
}

/// A drain's progress (what the `Drain` RPC streams).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainStatus {
    pub phase: DrainPhase,
    pub detail: String,
    pub writes_in_flight: u64,
    pub reservations: u64,
    pub write_down_blocks: u64,
    pub write_down_bytes: u64,
    pub written_blocks: u64,
    pub written_bytes: u64,
    pub write_failed_blocks: u64,
    pub dram_only_blocks: u64,
}

/// The drain gate, shared by the service and `Running`.
#[derive(Debug)]
pub struct Gate {
    draining: AtomicBool,
    /// Puts, commits and reserves in progress.
    writes: AtomicUsize,
    writes_idle: Notify,
    /// Set by the `Drain` RPC; `main` starts the drain when it fires.
    requested: CancellationToken,
    /// The drain's progress; `write_through` is fixed at start.
    status: watch::Sender<DrainStatus>,
    write_through: bool,
}

impl Gate {
    /// `write_through`: during a drain, write every block stored to NVMe
    /// before acknowledging it (the daemon writes DRAM down on drain).
    pub fn new(write_through: bool) -> Arc<Gate> {
        Arc::new(Gate {
            draining: AtomicBool::new(false),
            writes: AtomicUsize::new(0),
            writes_idle: Notify::new(),
            requested: CancellationToken::new(),
            status: watch::Sender::new(DrainStatus::default()),
            write_through,
        })
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Whether blocks stored now must be written through before they are
    /// acknowledged (a drain that writes DRAM down is under way).
    pub fn write_through(&self) -> bool {
        self.write_through && self.is_draining()
    }

    /// A new Put stream or Reserve: refused once a drain has begun.
    pub fn admit_new_write(self: &Arc<Self>) -> Result<WriteGuard, tonic::Status> {
        let g = self.enter_write();
        if self.is_draining() {
            drop(g);
            return Err(tonic::Status::unavailable(
                "stratad is draining (shutting down or being upgraded): new puts and reservations are refused; store on another node, or retry once it has restarted",
            ));
        }
        Ok(g)
    }

    /// A Commit or Abort: served during a drain (it ends a reservation
    /// the drain waits for), and counted.
    pub fn enter_write(self: &Arc<Self>) -> WriteGuard {
        self.writes.fetch_add(1, Ordering::SeqCst);
        WriteGuard(self.clone())
    }

    pub fn writes_in_flight(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    /// Begins a drain: from now on new puts are refused.
    pub fn begin(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Returns once no put, commit or reserve is in progress.
    pub async fn writes_idle(&self) {
        loop {
            let notified = self.writes_idle.notified();
            if self.writes_in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Asks for a drain (the `Drain` RPC).
    pub fn request(&self) {
        self.requested.cancel();
    }

    /// Fires once a drain was asked for over gRPC.
    pub async fn requested(&self) {
        self.requested.cancelled().await;
    }

    /// Publishes the drain's progress (subscribers wake only on a change).
    pub fn publish(&self, st: DrainStatus) {
        self.status.send_if_modified(|cur| {
            let changed = *cur != st;
            *cur = st;
            changed
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<DrainStatus> {
        self.status.subscribe()
    }
}

/// A put, commit or reserve in progress; ends when dropped.
#[derive(Debug)]
pub struct WriteGuard(Arc<Gate>);

impl Drop for WriteGuard {
    fn drop(&mut self) {
        if self.0.writes.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.writes_idle.notify_waiters();
        }
    }
}

#[derive(Debug, Default)]
pub struct InFlight {
    calls: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl InFlight {
    pub fn count(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Returns once no call is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn enter(self: &Arc<Self>) -> CallGuard {
        self.calls.fetch_add(1, Ordering::SeqCst);
        CallGuard(self.clone())
    }
}

/// Ends a call when dropped.
pub struct CallGuard(Arc<InFlight>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[derive(Debug, Clone)]
pub struct InFlightLayer(pub Arc<InFlight>);

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            calls: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Counted<S> {
    inner: S,
    calls: Arc<InFlight>,
}

impl<S, Req, ResBody> tower::Service<Req> for Counted<S>
where
    S: tower::Service<Req, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Send + 'static,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let guard = self.calls.enter();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            Ok(res.map(|body| CountedBody {
                inner: body,
                _guard: guard,
            }))
        })
    }
}

/// A response body that ends its call when it is dropped.
pub struct CountedBody<B> {
    inner: B,
    _guard: CallGuard,
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Runs a drain up to the point where the daemon stops serving: settles
/// writes in flight, writes DRAM down to NVMe, flushes. Readiness is false
/// throughout, its detail saying what the drain is doing; progress goes to
/// the gate (the `Drain` RPC). Returns the final status.
pub async fn run(
    store: &Arc<crate::store::Store>,
    gate: &Gate,
    health: &super::http::Health,
    cfg: &crate::config::DrainConfig,
) -> DrainStatus {
    use std::time::{Duration, Instant};
    let mut st = DrainStatus {
        phase: DrainPhase::Settling,
        ..Default::default()
    };
    health.set_draining();
    let say = |st: &mut DrainStatus, detail: String| {
        health.set(false, format!("draining: {detail}"));
        st.detail = detail;
        gate.publish(st.clone());
    };
    gate.begin();

    // 1. Settle: puts, commits and reserves in flight end; reservations are
    //    committed, aborted or expire (the expiry task still runs).
    let deadline = Instant::now() + cfg.settle_timeout;
    loop {
        st.writes_in_flight = gate.writes_in_flight() as u64;
        st.reservations = store.stats().reservations;
        if st.writes_in_flight == 0 && st.reservations == 0 {
            break;
        }
        let line = format!(
            "refusing new puts; waiting for {} puts or commits in flight and {} open reservations",
            st.writes_in_flight, st.reservations
        );
        say(&mut st, line);
        if Instant::now() >= deadline {
            tracing::warn!(
                writes = st.writes_in_flight,
                reservations = st.reservations,
                timeout_ms = cfg.settle_timeout.as_millis() as u64,
                "drain: puts or reservations still open at server.drain_timeout_ms; going on (blocks they store are written through)"
            );
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(20), gate.writes_idle()).await;
        if gate.writes_in_flight() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // 2. Write-down: every block held only in DRAM gets an NVMe record.
    if cfg.write_down && store.nvme().is_some_and(|n| !n.is_fenced()) {
        st.phase = DrainPhase::WritingDown;
        write_down(store, &mut st, cfg.write_down_timeout, &say).await;
        // Write-downs of the background task and write-throughs end too.
        let deadline = Instant::now() + cfg.settle_timeout;
        while store.stats().writes_in_flight > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // 3. Flush: every record written survives power loss too.
    if let Some(n) = store.nvme()
        && let Err(e) = n.sync_all().await
    {
        tracing::warn!(error = %e, "drain: flushing the nvme segments failed");
    }
    st.dram_only_blocks = store.dram_only().0;
    st.phase = DrainPhase::Done;
    let detail = format!(
        "done: {} blocks written down ({} bytes), {} failed; {} blocks held only in DRAM are lost at exit; stopping",
        st.written_blocks, st.written_bytes, st.write_failed_blocks, st.dram_only_blocks
    );
    tracing::info!("drain {detail}");
    say(&mut st, detail);
    st
}

async fn write_down(
    store: &Arc<crate::store::Store>,
    st: &mut DrainStatus,
    timeout: std::time::Duration,
    say: &impl Fn(&mut DrainStatus, String),
) {
    use std::time::{Duration, Instant};
    let (blocks, bytes) = store.dram_only();
    st.write_down_blocks = blocks;
    st.write_down_bytes = bytes;
    let started = Instant::now();
    let deadline = started + timeout;
    let max = store.config().nvme.max_writes_in_flight.max(1);
    let mut writes = tokio::task::JoinSet::new();
    let mut cursor = Some(0u32);
    let mut last_said = Instant::now() - Duration::from_secs(1);
    let mut report = |st: &mut DrainStatus, force: bool| {
        if force || last_said.elapsed() >= Duration::from_millis(100) {
            last_said = Instant::now();
            let line = format!(
                "writing DRAM down to NVMe: {} of {} blocks ({} of {} bytes), {} failed",
                st.written_blocks,
                st.write_down_blocks,
                st.written_bytes,
                st.write_down_bytes,
                st.write_failed_blocks
            );
            say(st, line);
        }
    };
    report(st, true);
    loop {
        if writes.len() < max
            && let Some(from) = cursor
            && Instant::now() < deadline
        {
            let (jobs, next) = store.plan_flush(from, max - writes.len());
            cursor = next;
            for job in jobs {
                let len = job.header.len as u64;
                let store = store.clone();
                writes.spawn(
                    async move { (crate::store::tiering::write_job(store, job).await, len) },
                );
            }
            continue;
        }
        let Some(done) = writes.join_next().await else {
            break;
        };
        match done {
            Ok((true, len)) => {
                st.written_blocks += 1;
                st.written_bytes += len;
            }
            _ => st.write_failed_blocks += 1,
        }
        report(st, false);
    }
    if cursor.is_some() {
        tracing::warn!(
            timeout_ms = timeout.as_millis() as u64,
            written = st.written_blocks,
            "drain: write-down stopped at tiers.nvme.drain_write_down_timeout_ms"
        );
    }
    tracing::info!(
        blocks = st.written_blocks,
        bytes = st.written_bytes,
        failed = st.write_failed_blocks,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "drain: DRAM written down to NVMe"
    );
    report(st, true);
}

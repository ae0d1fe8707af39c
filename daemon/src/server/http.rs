//! `/metrics` (Prometheus text format), `/livez` and `/readyz`.
//!
//! `/livez` answers 200 while the process serves HTTP at all. `/readyz`
//! answers 200 only once every tier is open (and, with the NVMe tier, its
//! index recovered) and before a drain begins; otherwise 503 with the reason
//! in the body, so that a Kubernetes probe and a human see the same thing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Registry, StateGauges, TenantGauges};
use crate::store::Store;

/// Readiness, shared by the HTTP probe and the gRPC health service.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    draining: AtomicBool,
    detail: Mutex<String>,
}

impl Health {
    /// From now on the daemon is draining (never cleared: it exits).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn set(&self, ready: bool, detail: impl Into<String>) {
        *self.detail.lock().expect("health poisoned") = detail.into();
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn detail(&self) -> String {
        self.detail.lock().expect("health poisoned").clone()
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    gauges: Arc<StateGauges>,
    health: Arc<Health>,
    /// Set once the store exists (the endpoint starts before the tiers).
    store: Arc<OnceLock<Arc<Store>>>,
    tenants: Arc<OnceLock<Vec<TenantGauges>>>,
}

pub struct HttpHandle {
    pub store: Arc<OnceLock<Arc<Store>>>,
}

pub fn router(registry: Arc<Registry>, health: Arc<Health>) -> (Router, HttpHandle) {
    let store = Arc::new(OnceLock::new());
    let gauges = Arc::new(StateGauges::new(&registry));
    let state = AppState {
        registry,
        gauges,
        health,
        store: store.clone(),
        tenants: Arc::new(OnceLock::new()),
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    (app, HttpHandle { store })
}

pub async fn serve(
    listener: TcpListener,
    app: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    s.gauges
        .ready
        .set(if s.health.is_ready() { 1.0 } else { 0.0 });
    s.gauges
        .draining
        .set(if s.health.is_draining() { 1.0 } else { 0.0 });
    if let Some(store) = s.store.get() {
        let st = store.stats();
        let g = &s.gauges;
        for t in &st.tiers {
            let Some(kind) = t.tier else { continue };
            let i = kind.index();
            g.used_bytes[i].set(t.used as f64);
            g.capacity_bytes[i].set(t.capacity as f64);
            g.blocks[i].set(t.blocks as f64);
            g.pinned_blocks[i].set(t.pinned_blocks as f64);
        }
        if let Some(n) = store.nvme() {
            let ns = n.stats();
            let i = strata_proto::TierKind::Nvme.index();
            g.fenced[i].set(if ns.fenced { 1.0 } else { 0.0 });
            g.io_errors[i].set(ns.io_errors as f64);
            g.segments.set(ns.segments as f64);
        }
        g.writes_in_flight.set(st.writes_in_flight as f64);
        g.leases.set(st.leases as f64);
        g.reservations.set(st.reservations as f64);
        g.reserved_bytes
            .set(st.tiers.iter().map(|t| t.reserved_bytes).sum::<u64>() as f64);
        g.index_bytes.set(st.index_bytes as f64);
        g.namespaces.set(st.namespaces as f64);
        g.abstract_bytes.set(st.summary_bytes as f64);
        g.abstract_capacity_bytes.set(st.summary_capacity as f64);
        g.abstract_blocks.set(st.summary_blocks as f64);
        // Tenants are fixed at start: their handles are made at the first
        // scrape, when the store (and so their names) exists.
        let usage = store.tenant_usage();
        let tg = s.tenants.get_or_init(|| {
            usage
                .iter()
                .map(|u| TenantGauges::new(&s.registry, &u.name))
                .collect()
        });
        for (u, h) in usage.iter().zip(tg) {
            h.set(u);
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.registry.render(),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let detail = s.health.detail();
    if s.health.is_ready() {
        (StatusCode::OK, format!("ready\n{detail}\n"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{detail}\n"),
        )
    }
}

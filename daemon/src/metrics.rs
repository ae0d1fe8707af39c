//! Metrics: one struct of pre-resolved handles per subsystem, registered on
//! a daemon-local Prometheus recorder (no global recorder, so several
//! daemons in one test process keep their own numbers).
//!
//! Names follow `strata_<subsystem>_<name>_<unit>`; counters end in
//! `_total`, sizes in `_bytes`, latencies in `_seconds` and are real
//! Prometheus histograms (buckets configured below). Gauges that mirror store
//! state (occupancy, lease counts) are set from a snapshot at scrape time, so
//! they are never stale and cost nothing on the data path.

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use strata_proto::TierKind;

/// Latency buckets, seconds: 10 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static META: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The daemon's metric registry.
pub struct Registry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .expect("static bucket list is non-empty")
            .build_recorder();
        let handle = recorder.handle();
        Registry { recorder, handle }
    }

    pub fn render(&self) -> String {
        self.handle.render()
    }

    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, *v)).collect();
        Key::from_parts(name, labels)
    }

    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> Counter {
        self.recorder
            .describe_counter(name.into(), None, help.into());
        self.recorder
            .register_counter(&Self::key(name, labels), &META)
    }

    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> Gauge {
        self.recorder
            .describe_gauge(name.into(), Some(Unit::Count), help.into());
        self.recorder
            .register_gauge(&Self::key(name, labels), &META)
    }

    /// A gauge whose label values are known only at run time (tenants).
    pub fn gauge_labelled(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Gauge {
        self.recorder
            .describe_gauge(name.into(), Some(Unit::Bytes), help.into());
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        self.recorder
            .register_gauge(&Key::from_parts(name, labels), &META)
    }

    /// A counter whose label values are known only at run time (tenants).
    pub fn counter_labelled(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Counter {
        self.recorder
            .describe_counter(name.into(), None, help.into());
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &META)
    }

    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> Histogram {
        self.recorder
            .describe_histogram(name.into(), Some(Unit::Seconds), help.into());
        self.recorder
            .register_histogram(&Self::key(name, labels), &META)
    }
}

/// One handle per tier.
pub type PerTier<T> = [T; TierKind::ALL.len()];

fn per_tier<T>(mut f: impl FnMut(&'static str) -> T) -> PerTier<T> {
    TierKind::ALL.map(|t| f(t.name()))
}

/// Store (logical side) metrics.
pub struct StoreMetrics {
    pub lookups: Counter,
    pub lookup_keys: Counter,
    pub lookup_hits: PerTier<Counter>,
    /// A chain's first absent key ends the hit run.
    pub miss_absent: Counter,
    /// A read whose checksum failed: served as a miss.
    pub miss_checksum: Counter,
    pub puts_stored: Counter,
    pub puts_already_present: Counter,
    pub puts_rejected: Counter,
    pub evictions: PerTier<Counter>,
    pub evicted_bytes: PerTier<Counter>,
    pub checksum_failures: PerTier<Counter>,
    pub bytes_in: PerTier<Counter>,
    pub bytes_out: PerTier<Counter>,
    pub leases_granted: Counter,
    pub leases_expired: Counter,
    pub reservations_expired: Counter,
    pub abandoned_puts: Counter,
    /// Blocks written down from DRAM to NVMe (DRAM copy dropped).
    pub demotions: Counter,
    /// Blocks read from NVMe into DRAM.
    pub promotions: Counter,
    /// Evicted from DRAM without a write-down, by reason.
    pub dropped_not_admitted: Counter,
    pub dropped_budget: Counter,
    pub dropped_backlog: Counter,
    pub dropped_write_failed: Counter,
    /// NVMe records dropped when their segment was reclaimed.
    pub dropped_reclaim: Counter,
    /// Not written down because the tenant is at its NVMe quota.
    pub dropped_quota: Counter,
    /// Puts, reservations (DRAM) and NVMe writes refused by a tenant's
    /// quota, by tier (per tenant: `strata_tenant_quota_refusals_total`).
    pub quota_refusals: PerTier<Counter>,
    pub segments_reclaimed: Counter,
    /// Torn or damaged records discarded by the scan at start.
    pub recovered_torn: Counter,
    /// Block summaries (Attend) computed, and blocks left without one
    /// because the region was full.
    pub summaries_computed: Counter,
    pub summaries_skipped_full: Counter,
    /// Namespace evictions (EvictNamespace), and the blocks they removed
    /// at once (retired ones go later, with their last pin).
    pub namespace_evictions: Counter,
    pub evicted_namespace_blocks: Counter,
}

impl StoreMetrics {
    pub fn new(r: &Registry) -> Self {
        StoreMetrics {
            lookups: r.counter("strata_store_lookups_total", "Lookup calls", &[]),
            lookup_keys: r.counter("strata_store_lookup_keys_total", "Keys asked in lookups", &[]),
            lookup_hits: per_tier(|t| {
                r.counter(
                    "strata_store_lookup_hits_total",
                    "Keys found in the leading run of a lookup, by tier",
                    &[("tier", t)],
                )
            }),
            miss_absent: r.counter(
                "strata_store_lookup_misses_total",
                "Lookups or reads that missed, by reason",
                &[("reason", "absent")],
            ),
            miss_checksum: r.counter(
                "strata_store_lookup_misses_total",
                "Lookups or reads that missed, by reason",
                &[("reason", "checksum")],
            ),
            puts_stored: r.counter(
                "strata_store_puts_total",
                "Blocks offered for storage, by result",
                &[("result", "stored")],
            ),
            puts_already_present: r.counter(
                "strata_store_puts_total",
                "Blocks offered for storage, by result",
                &[("result", "already_present")],
            ),
            puts_rejected: r.counter(
                "strata_store_puts_total",
                "Blocks offered for storage, by result",
                &[("result", "rejected")],
            ),
            evictions: per_tier(|t| {
                r.counter("strata_store_evictions_total", "Blocks evicted, by tier", &[("tier", t)])
            }),
            evicted_bytes: per_tier(|t| {
                r.counter(
                    "strata_store_evicted_bytes_total",
                    "Bytes of blocks evicted, by tier",
                    &[("tier", t)],
                )
            }),
            checksum_failures: per_tier(|t| {
                r.counter(
                    "strata_store_checksum_failures_total",
                    "Blocks whose checksum failed after a read or transfer, by tier",
                    &[("tier", t)],
                )
            }),
            bytes_in: per_tier(|t| {
                r.counter("strata_tier_bytes_in_total", "Bytes written into a tier", &[("tier", t)])
            }),
            bytes_out: per_tier(|t| {
                r.counter("strata_tier_bytes_out_total", "Bytes read out of a tier", &[("tier", t)])
            }),
            leases_granted: r.counter("strata_store_leases_granted_total", "Leases granted", &[]),
            leases_expired: r.counter(
                "strata_store_leases_expired_total",
                "Leases that expired before release",
                &[],
            ),
            reservations_expired: r.counter(
                "strata_store_reservations_expired_total",
                "Zero-copy reservations never committed",
                &[],
            ),
            abandoned_puts: r.counter(
                "strata_store_abandoned_puts_total",
                "Puts whose space was freed without publishing (stream broken, bad checksum, abort)",
                &[],
            ),
            demotions: r.counter(
                "strata_store_demotions_total",
                "Blocks written down from DRAM to NVMe",
                &[],
            ),
            promotions: r.counter(
                "strata_store_promotions_total",
                "Blocks read up from NVMe into DRAM",
                &[],
            ),
            dropped_not_admitted: r.counter(
                "strata_store_dropped_total",
                "Blocks dropped instead of kept in a lower tier, by reason",
                &[("reason", "not_admitted")],
            ),
            dropped_budget: r.counter(
                "strata_store_dropped_total",
                "Blocks dropped instead of kept in a lower tier, by reason",
                &[("reason", "write_budget")],
            ),
            dropped_backlog: r.counter(
                "strata_store_dropped_total",
                "Blocks dropped instead of kept in a lower tier, by reason",
                &[("reason", "write_backlog")],
            ),
            dropped_write_failed: r.counter(
                "strata_store_dropped_total",
                "Blocks dropped instead of kept in a lower tier, by reason",
                &[("reason", "write_failed")],
            ),
            dropped_reclaim: r.counter(
                "strata_store_dropped_total",
                "Blocks dropped instead of kept in a lower tier, by reason",
                &[("reason", "reclaim")],
            ),
            dropped_quota: r.counter(
                "strata_store_dropped_total",
                "Blocks dropped instead of kept in a lower tier, by reason",
                &[("reason", "tenant_quota")],
            ),
            quota_refusals: per_tier(|t| {
                r.counter(
                    "strata_store_quota_refusals_total",
                    "Puts, reservations and NVMe writes refused by a tenant's quota, by tier",
                    &[("tier", t)],
                )
            }),
            segments_reclaimed: r.counter(
                "strata_nvme_segments_reclaimed_total",
                "NVMe segments reclaimed",
                &[],
            ),
            recovered_torn: r.counter(
                "strata_nvme_torn_records_total",
                "Torn or damaged NVMe records discarded at start",
                &[],
            ),
            summaries_computed: r.counter(
                "strata_attend_abstracts_computed_total",
                "Block abstracts (and layer checksums) computed at publish or recovery",
                &[],
            ),
            summaries_skipped_full: r.counter(
                "strata_attend_abstracts_skipped_total",
                "Blocks left without an abstract, by reason",
                &[("reason", "region_full")],
            ),
            namespace_evictions: r.counter(
                "strata_store_namespace_evictions_total",
                "Namespaces evicted by an operator (strata evict)",
                &[],
            ),
            evicted_namespace_blocks: r.counter(
                "strata_store_namespace_evicted_blocks_total",
                "Blocks removed by namespace evictions",
                &[],
            ),
        }
    }
}

/// Attend (attention near the data) metrics.
pub struct AttendMetrics {
    /// Sequences answered, by mode (dense, sparse, sparf).
    pub sequences: [Counter; 3],
    pub tokens: Counter,
    /// Bytes and blocks read, [dram, nvme, quant (copies, attend/quant.rs)].
    pub read_bytes: [Counter; 3],
    pub read_blocks: [Counter; 3],
    /// Calls refused by compute.max_inflight.
    pub rejected: Counter,
    /// SPARF sequences that asked for the mean-value correction, by what
    /// became of it: [applied, exact (nothing to correct), no_sums (the
    /// uncorrected answer: a block without V sums)].
    pub mean_correction: [Counter; 3],
    /// What SPARF's sketch runs did (attend/runs.rs).
    pub runs: crate::attend::runs::RunMetrics,
    /// SPARSE sequences by the level they ranked at: [block, leaf].
    pub sparse_level: [Counter; 2],
    /// `compute.hotness`: blocks found hot in answers (touched), and the
    /// NVMe-only ones among them handed to a background promotion.
    pub hot_blocks: Counter,
    pub hot_promoted: Counter,
    /// What the quant copies did (attend/quant.rs).
    pub quant: crate::attend::quant::QuantMetrics,
}

impl AttendMetrics {
    pub fn new(r: &Registry) -> Self {
        let seq = |mode| {
            r.counter(
                "strata_attend_sequences_total",
                "Sequences answered by Attend, by mode",
                &[("mode", mode)],
            )
        };
        let bytes = |tier| {
            r.counter(
                "strata_attend_read_bytes_total",
                "Bytes Attend read (K/V payload and its verification), by tier",
                &[("tier", tier)],
            )
        };
        let blocks = |tier| {
            r.counter(
                "strata_attend_read_blocks_total",
                "Blocks Attend read, by tier",
                &[("tier", tier)],
            )
        };
        AttendMetrics {
            sequences: [seq("dense"), seq("sparse"), seq("sparf")],
            tokens: r.counter(
                "strata_attend_tokens_total",
                "Tokens attended by Attend (per sequence; SPARF: the largest head's set)",
                &[],
            ),
            read_bytes: [bytes("dram"), bytes("nvme"), bytes("quant")],
            read_blocks: [blocks("dram"), blocks("nvme"), blocks("quant")],
            rejected: r.counter(
                "strata_server_limit_rejections_total",
                "Requests refused by a configured limit",
                &[("limit", "compute.max_inflight")],
            ),
            mean_correction: ["applied", "exact", "no_sums"].map(|result| {
                r.counter(
                    "strata_attend_sparf_mean_correction_total",
                    "SPARF sequences that asked for the mean-value correction, by result (no_sums: answered uncorrected)",
                    &[("result", result)],
                )
            }),
            runs: crate::attend::runs::RunMetrics::new(r),
            sparse_level: ["block", "leaf"].map(|level| {
                r.counter(
                    "strata_attend_sparse_level_total",
                    "SPARSE sequences by the level they ranked at (compute.leaf_tokens, compute.leaf_level)",
                    &[("level", level)],
                )
            }),
            hot_blocks: r.counter(
                "strata_attend_hot_blocks_total",
                "Blocks an Attend answer found hot (compute.hot_factor times an even share of some query head's attention or more): touched for eviction order",
                &[],
            ),
            hot_promoted: r.counter(
                "strata_attend_hot_promoted_total",
                "Hot NVMe-only blocks handed to a background promotion into DRAM (compute.hotness)",
                &[],
            ),
            quant: crate::attend::quant::QuantMetrics::new(r),
        }
    }
}

/// Gauges mirrored from a store snapshot at scrape time.
pub struct StateGauges {
    pub fenced: PerTier<Gauge>,
    pub io_errors: PerTier<Gauge>,
    pub segments: Gauge,
    pub writes_in_flight: Gauge,
    pub used_bytes: PerTier<Gauge>,
    pub capacity_bytes: PerTier<Gauge>,
    pub blocks: PerTier<Gauge>,
    pub pinned_blocks: PerTier<Gauge>,
    pub leases: Gauge,
    pub reservations: Gauge,
    pub reserved_bytes: Gauge,
    pub index_bytes: Gauge,
    pub namespaces: Gauge,
    pub abstract_bytes: Gauge,
    pub abstract_capacity_bytes: Gauge,
    pub abstract_blocks: Gauge,
    /// 1 while `/readyz` answers 200.
    pub ready: Gauge,
    /// 1 from the start of a drain (Drain or SIGTERM) to the exit.
    pub draining: Gauge,
}

impl StateGauges {
    pub fn new(r: &Registry) -> Self {
        // Which build serves, for rollouts (the value is always 1).
        r.gauge(
            "strata_build_info",
            "The stratad build (version label); always 1",
            &[("version", env!("CARGO_PKG_VERSION"))],
        )
        .set(1.0);
        StateGauges {
            ready: r.gauge(
                "strata_ready",
                "1 while the daemon is ready (/readyz 200, gRPC health SERVING)",
                &[],
            ),
            draining: r.gauge(
                "strata_draining",
                "1 while the daemon drains (new puts refused) before it exits",
                &[],
            ),
            fenced: per_tier(|t| {
                r.gauge(
                    "strata_tier_fenced",
                    "1 when the tier stopped after repeated I/O errors",
                    &[("tier", t)],
                )
            }),
            io_errors: per_tier(|t| {
                r.gauge(
                    "strata_tier_io_errors",
                    "I/O errors seen by the tier since start",
                    &[("tier", t)],
                )
            }),
            segments: r.gauge("strata_nvme_segments", "NVMe segment files", &[]),
            writes_in_flight: r.gauge(
                "strata_nvme_writes_in_flight",
                "Write-downs to NVMe in progress (queue depth of the tiering path)",
                &[],
            ),
            used_bytes: per_tier(|t| {
                r.gauge(
                    "strata_tier_used_bytes",
                    "Bytes occupied in a tier",
                    &[("tier", t)],
                )
            }),
            capacity_bytes: per_tier(|t| {
                r.gauge(
                    "strata_tier_capacity_bytes",
                    "Configured size of a tier",
                    &[("tier", t)],
                )
            }),
            blocks: per_tier(|t| {
                r.gauge(
                    "strata_tier_blocks",
                    "Blocks resident in a tier",
                    &[("tier", t)],
                )
            }),
            pinned_blocks: per_tier(|t| {
                r.gauge(
                    "strata_tier_pinned_blocks",
                    "Blocks pinned by leases or reads",
                    &[("tier", t)],
                )
            }),
            leases: r.gauge("strata_store_leases", "Active leases", &[]),
            reservations: r.gauge(
                "strata_store_reservations",
                "Puts reserved and not yet published (queue depth of the put path)",
                &[],
            ),
            reserved_bytes: r.gauge(
                "strata_store_reserved_bytes",
                "Bytes held by puts in flight",
                &[],
            ),
            index_bytes: r.gauge(
                "strata_store_index_bytes",
                "Heap bytes of the block index",
                &[],
            ),
            namespaces: r.gauge("strata_store_namespaces", "Registered namespaces", &[]),
            abstract_bytes: r.gauge(
                "strata_attend_abstract_bytes",
                "DRAM bytes held by block abstracts and layer checksums (Attend)",
                &[],
            ),
            abstract_capacity_bytes: r.gauge(
                "strata_attend_abstract_capacity_bytes",
                "Size of the region reserved for block abstracts (compute.abstracts_bytes)",
                &[],
            ),
            abstract_blocks: r.gauge(
                "strata_attend_abstract_blocks",
                "Blocks that have an abstract",
                &[],
            ),
        }
    }
}

/// One tenant's usage, mirrored from the store at scrape time.
pub struct TenantGauges {
    /// [dram, nvme]
    bytes: [Gauge; 2],
    quota: [Gauge; 2],
    share: Gauge,
    refusals: [Counter; 2],
    evictions: Counter,
}

impl TenantGauges {
    pub fn new(r: &Registry, tenant: &str) -> Self {
        let tiers = ["dram", "nvme"];
        TenantGauges {
            bytes: tiers.map(|t| {
                r.gauge_labelled(
                    "strata_tenant_bytes",
                    "Bytes a tenant holds in a tier (DRAM in whole granules, reservations included; NVMe payload, writes in flight included)",
                    &[("tenant", tenant), ("tier", t)],
                )
            }),
            quota: tiers.map(|t| {
                r.gauge_labelled(
                    "strata_tenant_quota_bytes",
                    "A tenant's quota in a tier (0: none)",
                    &[("tenant", tenant), ("tier", t)],
                )
            }),
            share: r.gauge_labelled(
                "strata_tenant_share_bytes",
                "DRAM a tenant keeps under pressure: other tenants' puts never evict its blocks below this",
                &[("tenant", tenant), ("tier", "dram")],
            ),
            refusals: tiers.map(|t| {
                r.counter_labelled(
                    "strata_tenant_quota_refusals_total",
                    "Puts and reservations (DRAM) or NVMe writes refused by a tenant's quota",
                    &[("tenant", tenant), ("tier", t)],
                )
            }),
            evictions: r.counter_labelled(
                "strata_tenant_evictions_total",
                "A tenant's blocks evicted from DRAM to make room",
                &[("tenant", tenant), ("tier", "dram")],
            ),
        }
    }

    pub fn set(&self, u: &crate::store::TenantUsage) {
        for (i, t) in [u.dram, u.nvme].iter().enumerate() {
            self.bytes[i].set(t.used as f64);
            self.quota[i].set(t.quota as f64);
            self.refusals[i].absolute(t.refusals);
        }
        self.share.set(u.dram.share as f64);
        self.evictions.absolute(u.dram.evictions);
    }
}

/// gRPC server metrics.
pub struct ServerMetrics {
    registry: Arc<Registry>,
    pub streams_active: Gauge,
    pub inflight_put_bytes: Gauge,
    pub shm_clients: Counter,
    pub shm_refused: Counter,
}

impl ServerMetrics {
    pub fn new(registry: Arc<Registry>) -> Self {
        let r = &registry;
        ServerMetrics {
            streams_active: r.gauge(
                "strata_server_streams_active",
                "Put and Get streams in progress (queue depth of the stream path)",
                &[],
            ),
            inflight_put_bytes: r.gauge(
                "strata_server_inflight_put_bytes",
                "Bytes admitted for puts not yet published",
                &[],
            ),
            shm_clients: r.counter(
                "strata_server_shm_handoffs_total",
                "Arena descriptors handed to local clients",
                &[],
            ),
            shm_refused: r.counter(
                "strata_server_shm_refused_total",
                "Local clients refused the arena (credentials)",
                &[],
            ),
            registry: registry.clone(),
        }
    }

    /// Per-method latency histogram and request counters are resolved once
    /// per method at service construction.
    pub fn method(&self, method: &'static str) -> MethodMetrics {
        let r = &self.registry;
        MethodMetrics {
            latency: r.histogram(
                "strata_server_request_duration_seconds",
                "gRPC request latency by method",
                &[("method", method)],
            ),
            ok: r.counter(
                "strata_server_requests_total",
                "gRPC requests by method and outcome",
                &[("method", method), ("outcome", "ok")],
            ),
            client_error: r.counter(
                "strata_server_requests_total",
                "gRPC requests by method and outcome",
                &[("method", method), ("outcome", "client_error")],
            ),
            server_error: r.counter(
                "strata_server_requests_total",
                "gRPC requests by method and outcome",
                &[("method", method), ("outcome", "server_error")],
            ),
        }
    }

    pub fn limit_rejection(&self, limit: &'static str) -> Counter {
        self.registry.counter(
            "strata_server_limit_rejections_total",
            "Requests refused by a configured limit",
            &[("limit", limit)],
        )
    }
}

pub struct MethodMetrics {
    pub latency: Histogram,
    pub ok: Counter,
    pub client_error: Counter,
    pub server_error: Counter,
}

impl MethodMetrics {
    pub fn record(&self, started: std::time::Instant, code: Option<tonic::Code>) {
        self.latency.record(started.elapsed().as_secs_f64());
        match code {
            None => self.ok.increment(1),
            Some(
                tonic::Code::Internal
                | tonic::Code::Unknown
                | tonic::Code::DataLoss
                | tonic::Code::Unavailable,
            ) => self.server_error.increment(1),
            Some(_) => self.client_error.increment(1),
        }
    }
}

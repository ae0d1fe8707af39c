//! Configuration: one TOML file, parsed and validated once in `main`, then
//! passed down. Every field has a default; the defaults are the embedded file
//! `config/default.toml`, which a test keeps equal to [`Config::default`].
//! Nothing below `main` reads the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::attend::{AttendConfig, LeafLevel, SummaryConfig};
use crate::store::{
    Admission, EvictionKind, NvmePolicy, ReclaimOrder, ReclaimPolicy, StoreConfig, TenantConfig,
    TenantSpec,
};
use crate::tier::DramConfig;
use crate::tier::nvme::NvmeConfig;
use crate::tier::nvme::engine::EngineKind;

/// The documented default configuration, compiled into the binary.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/default.toml");

/// A size in bytes; parses `123`, `"64MiB"`, `"1GiB"`, `"10GB"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '_')
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: u64 = num.replace('_', "").parse().map_err(|_| {
            format!("{s:?} is not a size; write a number of bytes or e.g. \"512MiB\", \"1GiB\"")
        })?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "TiB" | "T" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            u => {
                return Err(format!(
                    "{s:?}: unknown size unit {u:?}; use B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)"
                ));
            }
        };
        num.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} overflows 64 bits"))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if b >= 1 << shift && b.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}B")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Int(u64),
            Str(String),
        }
        match Repr::deserialize(d)? {
            Repr::Int(n) => Ok(ByteSize(n)),
            Repr::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data_dir: PathBuf,
    pub server: ServerConfig,
    pub store: StoreSection,
    pub tiers: TiersConfig,
    pub compute: ComputeSection,
    pub log: LogConfig,
    pub auth: AuthSection,
    /// `[[tenants]]`: who may connect as which tenant, and its quotas.
    pub tenants: Vec<TenantSection>,
    pub retrieval: RetrievalSection,
}

/// `[retrieval]`: RetrievalAttention indexes (BuildIndex, Retrieve).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrievalSection {
    /// DRAM all indexes may hold together; a build beyond it is refused.
    pub max_bytes: ByteSize,
    /// Threads of one index build (0 = compute.threads).
    pub build_threads: u32,
    /// Training query rows per (layer, KV head) one BuildIndex may send.
    pub max_train_queries: u32,
    /// How often indexes whose blocks are gone are dropped.
    pub sweep_ms: u64,
    /// Build key-only indexes of chains by themselves, once stored.
    pub auto_build: bool,
    /// Layers auto_build indexes (empty = every layer of the layout).
    pub auto_layers: Vec<u32>,
    /// KV heads auto_build indexes (empty = every KV head; heads a layout
    /// does not have are ignored).
    pub auto_kv_heads: Vec<u32>,
    /// Shortest chain (tokens) auto_build indexes.
    pub auto_min_tokens: u64,
    /// How long a chain must have had no new block before auto_build
    /// indexes it.
    pub auto_quiet_ms: u64,
    /// Chain tails auto_build waits on at most (the oldest is forgotten).
    pub auto_max_pending: u32,
}

impl Default for RetrievalSection {
    fn default() -> Self {
        RetrievalSection {
            max_bytes: ByteSize(1 << 30),
            build_threads: 0,
            max_train_queries: 32768,
            sweep_ms: 1000,
            auto_build: false,
            auto_layers: Vec::new(),
            auto_kv_heads: Vec::new(),
            auto_min_tokens: 4096,
            auto_quiet_ms: 500,
            auto_max_pending: 4096,
        }
    }
}

/// `[auth]`: how clients prove who they are, per transport.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// "none", "token" or "mtls".
    pub tcp: String,
    /// "none" or "peercred".
    pub uds: String,
    pub tokens_file: String,
    pub tls_cert: String,
    pub tls_key: String,
    pub tls_client_ca: String,
    pub allow_insecure_tcp: bool,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            tcp: "none".into(),
            uds: "none".into(),
            tokens_file: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_client_ca: String::new(),
            allow_insecure_tcp: false,
        }
    }
}

/// One `[[tenants]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSection {
    pub name: String,
    /// Unix-socket peers (auth.uds = "peercred") by user or group id.
    #[serde(default)]
    pub uids: Vec<u32>,
    #[serde(default)]
    pub gids: Vec<u32>,
    /// Client certificate names (subject CN, DNS or URI SAN) on TCP
    /// (auth.tcp = "mtls").
    #[serde(default)]
    pub tls_names: Vec<String>,
    /// May make admin calls and use every namespace.
    #[serde(default)]
    pub admin: bool,
    /// May map the shared DRAM arena (zero-copy path).
    #[serde(default)]
    pub zero_copy: bool,
    /// Quotas; 0 = none.
    #[serde(default)]
    pub dram_bytes: ByteSize,
    #[serde(default)]
    pub nvme_bytes: ByteSize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComputeSection {
    pub abstracts: bool,
    pub abstracts_bytes: ByteSize,
    pub key_sketch: bool,
    /// Tokens per summary leaf: 0 (the whole block) or a power of two of
    /// at least 4 (a namespace whose blocks it does not cut evenly keeps
    /// whole-block leaves).
    pub leaf_tokens: u32,
    /// SPARSE's leaf level: "adaptive", "leaf" or "block".
    pub leaf_level: String,
    pub threads: u32,
    pub max_inflight: u32,
    pub max_sequences: u32,
    pub max_query_heads: u32,
    pub sparse_budget_fraction: f64,
    pub read_wave_bytes: ByteSize,
    pub promote: bool,
    pub sketch_runs: bool,
    pub sketch_runs_bytes: ByteSize,
    /// SPARF's two-stage ranking: candidate blocks per chosen block, 0 to
    /// rank on r channels in one stage.
    pub sparf_candidates: u32,
    /// Attend's accesses follow the attention it found: only the blocks
    /// that carried at least `hot_factor` times an even share of some
    /// query head's attention count as accessed (eviction order), and the
    /// NVMe-only ones among them are promoted in the background. Off:
    /// every block an Attend pins is an access.
    pub hotness: bool,
    pub hot_factor: f64,
    /// Region of int8/int4 copies of cold blocks' layers that Attend calls
    /// allowing them (`min_precision`) compute on instead of reading NVMe
    /// (attend/quant.rs); 0: none.
    pub quant_bytes: ByteSize,
}

impl Default for ComputeSection {
    fn default() -> Self {
        ComputeSection {
            abstracts: true,
            abstracts_bytes: ByteSize(0),
            key_sketch: false,
            leaf_tokens: 0,
            leaf_level: "adaptive".into(),
            threads: 0,
            max_inflight: 64,
            max_sequences: 256,
            max_query_heads: 256,
            sparse_budget_fraction: 0.05,
            read_wave_bytes: ByteSize(64 << 20),
            promote: false,
            sketch_runs: true,
            sketch_runs_bytes: ByteSize(0),
            sparf_candidates: 3,
            hotness: true,
            hot_factor: 1.0,
            quant_bytes: ByteSize(0),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub uds: String,
    pub shm_socket: String,
    pub shm_allowed_uids: Vec<String>,
    pub metrics_listen: String,
    pub max_message_bytes: ByteSize,
    pub stream_chunk_bytes: ByteSize,
    pub max_keys_per_call: u32,
    pub max_streams: u32,
    pub max_subscribers: u32,
    pub max_concurrent_streams_per_connection: u32,
    pub max_inflight_put_bytes: ByteSize,
    pub drain_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    pub eviction_policy: String,
    pub max_blocks: u64,
    pub max_leases: u64,
    pub max_lease_ttl_ms: u64,
    pub max_reservations: u64,
    pub reservation_ttl_ms: u64,
    pub max_reservation_ttl_ms: u64,
    pub event_buffer: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TiersConfig {
    pub dram: DramSection,
    pub nvme: NvmeSection,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvmeSection {
    pub bytes: ByteSize,
    pub dir: String,
    pub segment_bytes: ByteSize,
    pub engine: String,
    pub queue_depth: u32,
    pub io_buffer_bytes: ByteSize,
    pub io_buffers: u32,
    pub fence_after_errors: u32,
    pub sync_writes: bool,
    pub admission: String,
    pub write_budget_bytes_per_sec: ByteSize,
    pub write_through: bool,
    pub reclaim: String,
    pub reclaim_order: String,
    pub high_watermark: f64,
    pub low_watermark: f64,
    pub max_writes_in_flight: u32,
    pub drain_write_down: bool,
    pub drain_write_down_timeout_ms: u64,
}

impl Default for NvmeSection {
    fn default() -> Self {
        NvmeSection {
            bytes: ByteSize(4 << 30),
            dir: String::new(),
            segment_bytes: ByteSize(0),
            engine: "auto".into(),
            queue_depth: 32,
            io_buffer_bytes: ByteSize(2052 << 10),
            io_buffers: 16,
            fence_after_errors: 8,
            sync_writes: false,
            admission: "looked-up-or-head".into(),
            write_budget_bytes_per_sec: ByteSize(0),
            write_through: false,
            reclaim: "copy-hot".into(),
            reclaim_order: "oldest".into(),
            high_watermark: 0.90,
            low_watermark: 0.80,
            max_writes_in_flight: 16,
            drain_write_down: true,
            drain_write_down_timeout_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DramSection {
    pub bytes: ByteSize,
    pub granule_bytes: ByteSize,
    pub high_watermark: f64,
    pub low_watermark: f64,
    pub prefault: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("strata-data"),
            server: ServerConfig::default(),
            store: StoreSection::default(),
            tiers: TiersConfig::default(),
            compute: ComputeSection::default(),
            log: LogConfig::default(),
            auth: AuthSection::default(),
            tenants: Vec::new(),
            retrieval: RetrievalSection::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7470".into(),
            uds: String::new(),
            shm_socket: String::new(),
            shm_allowed_uids: vec![],
            metrics_listen: "127.0.0.1:7471".into(),
            max_message_bytes: ByteSize(16 << 20),
            stream_chunk_bytes: ByteSize(4 << 20),
            max_keys_per_call: 4096,
            max_streams: 256,
            max_subscribers: 64,
            max_concurrent_streams_per_connection: 256,
            max_inflight_put_bytes: ByteSize(1 << 30),
            drain_timeout_ms: 10_000,
        }
    }
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            eviction_policy: "prefix-lru".into(),
            max_blocks: 1 << 24,
            max_leases: 65536,
            max_lease_ttl_ms: 300_000,
            max_reservations: 65536,
            reservation_ttl_ms: 30_000,
            max_reservation_ttl_ms: 300_000,
            event_buffer: 65536,
        }
    }
}

impl Default for DramSection {
    fn default() -> Self {
        DramSection {
            bytes: ByteSize(1 << 30),
            granule_bytes: ByteSize(4096),
            high_watermark: 0.95,
            low_watermark: 0.90,
            prefault: true,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

/// Largest `tiers.dram.granule_bytes`.
const MAX_GRANULE: u64 = 64 << 20;

/// A configuration field that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config: {field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

fn bad<T>(field: &'static str, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field,
        reason: reason.into(),
    })
}

/// A listen setting: an address, or off.
fn parse_listen(field: &'static str, s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    match s {
        "off" => Ok(None),
        _ => s.parse().map(Some).or_else(|_| {
            bad(
                field,
                format!("{s:?} is not an address like \"127.0.0.1:7470\", or \"off\""),
            )
        }),
    }
}

/// Settings derived from a validated [`Config`], in the types the daemon uses.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub listen: Option<SocketAddr>,
    pub uds: Option<PathBuf>,
    pub shm_socket: Option<PathBuf>,
    /// None = any uid.
    pub shm_allowed_uids: Option<Vec<u32>>,
    pub metrics_listen: Option<SocketAddr>,
    pub store: StoreConfig,
    pub dram: DramConfig,
    pub granule: u64,
    /// `None` when the NVMe tier is disabled (`tiers.nvme.bytes = 0`).
    pub nvme: Option<NvmeConfig>,
    pub compute: AttendConfig,
    pub drain: DrainConfig,
    pub auth: AuthConfig,
    pub retrieval: crate::retrieval::RetrievalConfig,
}

/// How TCP clients authenticate (`auth.tcp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpAuth {
    /// Every TCP client is the tenant "default".
    None,
    /// `authorization: Bearer <token>` metadata, tokens from a file.
    Token,
    /// A client certificate signed by `auth.tls_client_ca`.
    Mtls,
}

/// How Unix-socket clients authenticate (`auth.uds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdsAuth {
    /// Every local client is the tenant "default".
    None,
    /// The peer's uid, else its gid (`SO_PEERCRED`), mapped by `[[tenants]]`.
    PeerCred,
}

/// The TLS files of the TCP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With mTLS: the CA that signs client certificates.
    pub client_ca: Option<PathBuf>,
}

/// One tenant as the server sees it (ordinal = index, "default" first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantAuth {
    pub name: String,
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub tls_names: Vec<String>,
    pub admin: bool,
    pub zero_copy: bool,
}

/// Resolved `[auth]` and `[[tenants]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    pub tcp: TcpAuth,
    pub uds: UdsAuth,
    pub tokens_file: Option<PathBuf>,
    /// TLS on the TCP listener (token over TLS, or mTLS).
    pub tls: Option<TlsFiles>,
    /// By store ordinal: "default" first (implicit unless configured).
    pub tenants: Vec<TenantAuth>,
    /// Some transport authenticates: tenants are separated.
    pub multi: bool,
    /// TCP listens beyond loopback with auth.allow_insecure_tcp.
    pub insecure_tcp: bool,
}

/// What a drain (SIGTERM, `strata drain`) does and how long it waits.
#[derive(Debug, Clone)]
pub struct DrainConfig {
    /// Longest wait for puts, commits and reservations in flight to end,
    /// and again for calls in flight before exiting (server.drain_timeout_ms).
    pub settle_timeout: Duration,
    /// Write blocks held only in DRAM down to NVMe before exiting (with an
    /// NVMe tier; tiers.nvme.drain_write_down).
    pub write_down: bool,
    /// Longest the write-down may take (tiers.nvme.drain_write_down_timeout_ms).
    pub write_down_timeout: Duration,
}

impl Config {
    /// Parses a TOML document; unknown fields and bad values are errors.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        Config::from_toml(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// Checks every field and derives the daemon's settings.
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        let s = &self.server;
        let listen = parse_listen("server.listen", &s.listen)?;
        let metrics_listen = parse_listen("server.metrics_listen", &s.metrics_listen)?;
        let uds = match s.uds.as_str() {
            "off" => None,
            "" => Some(self.data_dir.join("stratad.sock")),
            p => Some(PathBuf::from(p)),
        };
        let shm_socket = match (s.shm_socket.as_str(), &uds) {
            ("off", _) => None,
            ("", Some(u)) => Some(shm_path_for(u)),
            ("", None) => Some(self.data_dir.join("stratad.sock.shm")),
            (p, _) => Some(PathBuf::from(p)),
        };
        for p in [&uds, &shm_socket].into_iter().flatten() {
            // sun_path holds 108 bytes including the terminating NUL.
            if p.as_os_str().len() > 107 {
                return bad(
                    "server.uds",
                    format!(
                        "socket path {} is longer than 107 bytes; use a shorter path",
                        p.display()
                    ),
                );
            }
        }
        if listen.is_none() && uds.is_none() {
            return bad(
                "server.listen",
                "both server.listen and server.uds are off: nothing to serve",
            );
        }
        let shm_allowed_uids = if s.shm_allowed_uids.iter().any(|u| u == "*") {
            None
        } else {
            let mut v = Vec::new();
            for u in &s.shm_allowed_uids {
                v.push(u.parse::<u32>().or_else(|_| {
                    bad(
                        "server.shm_allowed_uids",
                        format!("{u:?} is not a numeric uid or \"*\""),
                    )
                })?);
            }
            Some(v)
        };
        let msg = s.max_message_bytes.0;
        if !(64 << 10..=1 << 30).contains(&msg) {
            return bad(
                "server.max_message_bytes",
                format!("{} must be between 64KiB and 1GiB", s.max_message_bytes),
            );
        }
        let chunk = s.stream_chunk_bytes.0;
        if chunk < 4096 || chunk + 4096 > msg {
            return bad(
                "server.stream_chunk_bytes",
                format!(
                    "{} must be at least 4KiB and leave 4KiB of headroom below server.max_message_bytes ({})",
                    s.stream_chunk_bytes, s.max_message_bytes
                ),
            );
        }
        for (field, v) in [
            ("server.max_keys_per_call", s.max_keys_per_call),
            ("server.max_streams", s.max_streams),
            ("server.max_subscribers", s.max_subscribers),
            (
                "server.max_concurrent_streams_per_connection",
                s.max_concurrent_streams_per_connection,
            ),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1");
            }
        }
        if s.max_inflight_put_bytes.0 == 0 || s.max_inflight_put_bytes.0 > u32::MAX as u64 {
            return bad(
                "server.max_inflight_put_bytes",
                "must be between 1 byte and 4GiB",
            );
        }

        let d = &self.tiers.dram;
        let granule = d.granule_bytes.0;
        if !granule.is_power_of_two() || !(16..=MAX_GRANULE).contains(&granule) {
            return bad(
                "tiers.dram.granule_bytes",
                format!(
                    "{} must be a power of two between 16B and 64MiB",
                    d.granule_bytes
                ),
            );
        }
        if d.bytes.0 < granule.max(1 << 20) {
            return bad(
                "tiers.dram.bytes",
                format!("{} is too small; at least 1MiB", d.bytes),
            );
        }
        // The block index keeps a DRAM address as a 32-bit granule index.
        let max_granules = crate::store::index::MAX_DRAM_GRANULES;
        if d.bytes.0 / granule > max_granules {
            let fits = d.bytes.0.div_ceil(max_granules).next_power_of_two();
            let raise = if fits <= MAX_GRANULE {
                format!(
                    "raise tiers.dram.granule_bytes to {} or more",
                    ByteSize(fits)
                )
            } else {
                "no granule_bytes is large enough".into()
            };
            return bad(
                "tiers.dram.bytes",
                format!(
                    "{} is {} granules of {}, more than the 2^32 a DRAM tier may have (the block index keeps a DRAM address as a 32-bit granule index): {raise}, or lower tiers.dram.bytes to {} or less",
                    d.bytes,
                    d.bytes.0 / granule,
                    d.granule_bytes,
                    ByteSize(granule * max_granules),
                ),
            );
        }
        if !(0.0 < d.low_watermark
            && d.low_watermark <= d.high_watermark
            && d.high_watermark <= 1.0)
        {
            return bad(
                "tiers.dram.high_watermark",
                format!(
                    "need 0 < low_watermark ({}) <= high_watermark ({}) <= 1",
                    d.low_watermark, d.high_watermark
                ),
            );
        }
        let st = &self.store;
        let eviction = EvictionKind::parse(&st.eviction_policy).map_or_else(
            || {
                bad(
                    "store.eviction_policy",
                    format!(
                        "{:?} is not one of \"prefix-lru\", \"lru\"",
                        st.eviction_policy
                    ),
                )
            },
            Ok,
        )?;
        for (field, v) in [
            ("store.max_blocks", st.max_blocks),
            ("store.max_leases", st.max_leases),
            ("store.max_lease_ttl_ms", st.max_lease_ttl_ms),
            ("store.max_reservations", st.max_reservations),
            ("store.reservation_ttl_ms", st.reservation_ttl_ms),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1");
            }
        }
        if st.event_buffer > 1 << 24 {
            return bad(
                "store.event_buffer",
                format!("{} is more than 16777216 events", st.event_buffer),
            );
        }
        if st.max_blocks >= u32::MAX as u64 {
            return bad("store.max_blocks", "must be below 2^32");
        }
        if st.reservation_ttl_ms > st.max_reservation_ttl_ms {
            return bad(
                "store.reservation_ttl_ms",
                "must not exceed store.max_reservation_ttl_ms",
            );
        }
        let nv = &self.tiers.nvme;
        let nvme = if nv.bytes.0 == 0 {
            None
        } else {
            // 0 = auto: a sixteenth of the cap (reclaim frees space in
            // steps of ~6%), between 1 MiB and 256 MiB.
            let seg = if nv.segment_bytes.0 == 0 {
                (nv.bytes.0 / 16).clamp(1 << 20, 256 << 20) / 4096 * 4096
            } else {
                nv.segment_bytes.0
            };
            if !seg.is_multiple_of(4096) || !(1 << 20..=1 << 40).contains(&seg) {
                return bad(
                    "tiers.nvme.segment_bytes",
                    format!(
                        "{} must be a multiple of 4KiB between 1MiB and 1TiB",
                        nv.segment_bytes
                    ),
                );
            }
            if nv.bytes.0 < 2 * seg {
                return bad(
                    "tiers.nvme.bytes",
                    format!(
                        "{} must hold at least two segments of {} (or be 0 to disable the tier)",
                        nv.bytes,
                        ByteSize(seg)
                    ),
                );
            }
            let engine = EngineKind::parse(&nv.engine).map_or_else(
                || {
                    bad(
                        "tiers.nvme.engine",
                        format!(
                            "{:?} is not one of \"auto\", \"io_uring\", \"psync\"",
                            nv.engine
                        ),
                    )
                },
                Ok,
            )?;
            for (field, v) in [
                ("tiers.nvme.queue_depth", nv.queue_depth),
                ("tiers.nvme.io_buffers", nv.io_buffers),
                ("tiers.nvme.fence_after_errors", nv.fence_after_errors),
                ("tiers.nvme.max_writes_in_flight", nv.max_writes_in_flight),
            ] {
                if v == 0 {
                    return bad(field, "must be at least 1");
                }
            }
            if nv.queue_depth > 4096 {
                return bad("tiers.nvme.queue_depth", "must be at most 4096");
            }
            if nv.io_buffer_bytes.0 < 4096 || nv.io_buffer_bytes.0 > 1 << 30 {
                return bad(
                    "tiers.nvme.io_buffer_bytes",
                    "must be between 4KiB and 1GiB",
                );
            }
            if !(0.0 < nv.low_watermark
                && nv.low_watermark <= nv.high_watermark
                && nv.high_watermark <= 1.0)
            {
                return bad(
                    "tiers.nvme.high_watermark",
                    format!(
                        "need 0 < low_watermark ({}) <= high_watermark ({}) <= 1",
                        nv.low_watermark, nv.high_watermark
                    ),
                );
            }
            let dir = if nv.dir.is_empty() {
                self.data_dir.join("nvme")
            } else {
                PathBuf::from(&nv.dir)
            };
            Some(NvmeConfig {
                dir,
                capacity_bytes: nv.bytes.0,
                segment_bytes: seg,
                engine,
                queue_depth: nv.queue_depth,
                io_buffer_bytes: nv.io_buffer_bytes.0 as usize,
                io_buffers: nv.io_buffers as usize,
                fence_after_errors: nv.fence_after_errors,
                sync_writes: nv.sync_writes,
            })
        };
        let admission = Admission::parse(&nv.admission).map_or_else(
            || {
                bad(
                    "tiers.nvme.admission",
                    format!(
                        "{:?} is not one of \"looked-up-or-head\", \"all\", \"none\"",
                        nv.admission
                    ),
                )
            },
            Ok,
        )?;
        let reclaim = match nv.reclaim.as_str() {
            "copy-hot" => ReclaimPolicy::CopyHot,
            "drop" => ReclaimPolicy::Drop,
            other => {
                return bad(
                    "tiers.nvme.reclaim",
                    format!("{other:?} is not one of \"copy-hot\", \"drop\""),
                );
            }
        };
        let reclaim_order = match nv.reclaim_order.as_str() {
            "oldest" => ReclaimOrder::Oldest,
            "emptiest" => ReclaimOrder::Emptiest,
            other => {
                return bad(
                    "tiers.nvme.reclaim_order",
                    format!("{other:?} is not one of \"oldest\", \"emptiest\""),
                );
            }
        };
        if self.log.level.is_empty() {
            return bad("log.level", "must not be empty; e.g. \"info\"");
        }
        let cp = &self.compute;
        for (field, v) in [
            ("compute.max_inflight", cp.max_inflight),
            ("compute.max_sequences", cp.max_sequences),
            ("compute.max_query_heads", cp.max_query_heads),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1");
            }
        }
        if !(cp.sparse_budget_fraction > 0.0 && cp.sparse_budget_fraction <= 1.0) {
            return bad(
                "compute.sparse_budget_fraction",
                format!("{} must be in (0, 1]", cp.sparse_budget_fraction),
            );
        }
        if cp.read_wave_bytes.0 < 1 << 20 || cp.read_wave_bytes.0 > 16 << 30 {
            return bad(
                "compute.read_wave_bytes",
                format!("{} must be between 1MiB and 16GiB", cp.read_wave_bytes),
            );
        }
        // More candidates than 16 chosen blocks' worth would read more
        // summary bytes than the K+V the choice saves (two-stage ranking in
        // attend/exec.rs: a candidate's code rows are a quarter of its K+V).
        if cp.sparf_candidates > 16 {
            return bad(
                "compute.sparf_candidates",
                format!("{} must be at most 16 (0 = one stage)", cp.sparf_candidates),
            );
        }
        if !(cp.hot_factor > 0.0 && cp.hot_factor <= 1000.0) {
            return bad(
                "compute.hot_factor",
                format!(
                    "{} must be above 0 and at most 1000 (a block is hot at this many times an even share of the attention)",
                    cp.hot_factor
                ),
            );
        }
        let nvme_bytes = nvme.as_ref().map_or(0, |n| n.capacity_bytes);
        if cp.key_sketch && !cp.abstracts {
            return bad(
                "compute.key_sketch",
                "needs compute.abstracts = true (a sketch is coded between the abstracts' bounds)",
            );
        }
        // Sketch runs (attend/runs.rs): an eighth of the DRAM tier by
        // default with key sketches (a run is 31% of the f16 K+V of the
        // chain-layers it covers, so this covers ~40% of a full DRAM tier's
        // KV; chains beyond it are scored block by block, as without runs).
        let sketch_runs_bytes = match cp.sketch_runs_bytes.0 {
            0 if !cp.key_sketch || !cp.sketch_runs => 0,
            _ if !cp.key_sketch || !cp.sketch_runs => {
                return bad(
                    "compute.sketch_runs_bytes",
                    "is set, but runs need compute.key_sketch = true and compute.sketch_runs = true (a run copies the blocks' key sketches)",
                );
            }
            0 => (d.bytes.0 / 8).max(1 << 20),
            b if !(1 << 20..=1 << 38).contains(&b) => {
                return bad(
                    "compute.sketch_runs_bytes",
                    format!(
                        "{} must be between 1MiB and 256GiB (0: an eighth of tiers.dram.bytes)",
                        cp.sketch_runs_bytes
                    ),
                );
            }
            b => b,
        };
        // Quant copies (attend/quant.rs): off unless asked for, since they
        // are memory beside the tiers that only calls allowing approximate
        // answers use.
        let quant_bytes = match cp.quant_bytes.0 {
            0 => 0,
            b if !(1 << 20..=1 << 38).contains(&b) => {
                return bad(
                    "compute.quant_bytes",
                    format!(
                        "{} must be 0 (no quant copies) or between 1MiB and 256GiB",
                        cp.quant_bytes
                    ),
                );
            }
            b => b,
        };
        // Block sizes are per namespace (RegisterLayout), so the start can
        // only ask for a size that cuts every power-of-two block of at
        // least its size evenly; smaller blocks keep whole-block leaves.
        if cp.leaf_tokens != 0
            && (cp.leaf_tokens < crate::attend::summary::MIN_LEAF_TOKENS
                || !cp.leaf_tokens.is_power_of_two()
                || cp.leaf_tokens > 1024)
        {
            return bad(
                "compute.leaf_tokens",
                format!(
                    "{} must be 0 (the whole block) or a power of two from {} to 1024 (a divisor of tokens_per_block)",
                    cp.leaf_tokens,
                    crate::attend::summary::MIN_LEAF_TOKENS
                ),
            );
        }
        let leaf_level = match cp.leaf_level.as_str() {
            "adaptive" => LeafLevel::Adaptive,
            "leaf" => LeafLevel::Leaf,
            "block" => LeafLevel::Block,
            other => {
                return bad(
                    "compute.leaf_level",
                    format!("{other:?} is not one of \"adaptive\", \"leaf\", \"block\""),
                );
            }
        };
        let abstracts_bytes = match cp.abstracts_bytes.0 {
            0 => crate::attend::default_region_bytes(
                d.bytes.0 + nvme_bytes,
                cp.key_sketch,
                cp.leaf_tokens,
            ),
            b => b,
        };
        if cp.abstracts && abstracts_bytes > 1 << 38 {
            return bad(
                "compute.abstracts_bytes",
                format!("{} is above 256GiB", ByteSize(abstracts_bytes)),
            );
        }
        let threads = match cp.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        };
        let rt = &self.retrieval;
        if rt.max_bytes.0 < 1 << 20 {
            return bad(
                "retrieval.max_bytes",
                format!("{} must be at least 1MiB", rt.max_bytes),
            );
        }
        if rt.build_threads > 256 {
            return bad(
                "retrieval.build_threads",
                format!("{} is above 256", rt.build_threads),
            );
        }
        if rt.max_train_queries == 0 {
            return bad("retrieval.max_train_queries", "must be at least 1");
        }
        if rt.sweep_ms == 0 || rt.sweep_ms > 3_600_000 {
            return bad(
                "retrieval.sweep_ms",
                format!("{} must be between 1 and 3600000", rt.sweep_ms),
            );
        }
        for (field, list) in [
            ("retrieval.auto_layers", &rt.auto_layers),
            ("retrieval.auto_kv_heads", &rt.auto_kv_heads),
        ] {
            for (i, v) in list.iter().enumerate() {
                if list[..i].contains(v) {
                    return bad(field, format!("{v} is listed twice"));
                }
                if *v >= 65536 {
                    return bad(field, format!("{v} is above 65535"));
                }
            }
        }
        if rt.auto_min_tokens == 0 || rt.auto_min_tokens > 1 << 32 {
            return bad(
                "retrieval.auto_min_tokens",
                format!("{} must be between 1 and 4294967296", rt.auto_min_tokens),
            );
        }
        if rt.auto_quiet_ms == 0 || rt.auto_quiet_ms > 3_600_000 {
            return bad(
                "retrieval.auto_quiet_ms",
                format!("{} must be between 1 and 3600000", rt.auto_quiet_ms),
            );
        }
        if rt.auto_max_pending == 0 || rt.auto_max_pending > 1 << 20 {
            return bad(
                "retrieval.auto_max_pending",
                format!("{} must be between 1 and 1048576", rt.auto_max_pending),
            );
        }
        let auto = rt.auto_build.then(|| crate::retrieval::AutoConfig {
            layers: rt.auto_layers.clone(),
            kv_heads: rt.auto_kv_heads.clone(),
            min_tokens: rt.auto_min_tokens,
            quiet: Duration::from_millis(rt.auto_quiet_ms),
            max_pending: rt.auto_max_pending as usize,
            max_blocks: s.max_keys_per_call as usize,
        });
        let retrieval = crate::retrieval::RetrievalConfig {
            max_bytes: rt.max_bytes.0,
            build_threads: match rt.build_threads {
                0 => threads,
                n => n as usize,
            },
            max_train_queries: rt.max_train_queries as usize,
            sweep_interval: Duration::from_millis(rt.sweep_ms),
            auto,
        };
        if s.drain_timeout_ms > 3_600_000 {
            return bad(
                "server.drain_timeout_ms",
                format!("{} is more than an hour", s.drain_timeout_ms),
            );
        }
        if nv.drain_write_down_timeout_ms > 3_600_000 {
            return bad(
                "tiers.nvme.drain_write_down_timeout_ms",
                format!("{} is more than an hour", nv.drain_write_down_timeout_ms),
            );
        }
        let drain = DrainConfig {
            settle_timeout: Duration::from_millis(s.drain_timeout_ms),
            write_down: nvme.is_some() && nv.drain_write_down,
            write_down_timeout: Duration::from_millis(nv.drain_write_down_timeout_ms),
        };
        let (auth, tenant_specs) = self.resolve_auth(listen)?;
        Ok(Resolved {
            listen,
            uds,
            shm_socket,
            shm_allowed_uids,
            metrics_listen,
            store: StoreConfig {
                high_watermark: d.high_watermark,
                low_watermark: d.low_watermark,
                eviction,
                max_blocks: st.max_blocks as usize,
                max_leases: st.max_leases as usize,
                max_lease_ttl: Duration::from_millis(st.max_lease_ttl_ms),
                max_reservations: st.max_reservations as usize,
                reservation_ttl: Duration::from_millis(st.reservation_ttl_ms),
                max_reservation_ttl: Duration::from_millis(st.max_reservation_ttl_ms),
                event_buffer: st.event_buffer as usize,
                tenants: TenantConfig {
                    tenants: tenant_specs,
                    multi: auth.multi,
                },
                summaries: SummaryConfig {
                    enabled: cp.abstracts,
                    bytes: abstracts_bytes,
                    sketch: cp.key_sketch,
                    leaf_tokens: cp.leaf_tokens,
                },
                nvme: NvmePolicy {
                    admission,
                    write_budget_bytes_per_sec: nv.write_budget_bytes_per_sec.0,
                    write_through: nv.write_through,
                    reclaim,
                    reclaim_order,
                    high_watermark: nv.high_watermark,
                    low_watermark: nv.low_watermark,
                    max_writes_in_flight: nv.max_writes_in_flight as usize,
                },
            },
            dram: DramConfig {
                bytes: d.bytes.0,
                granule_bytes: granule,
                prefault: d.prefault,
            },
            granule,
            nvme,
            compute: AttendConfig {
                threads,
                max_inflight: cp.max_inflight as usize,
                max_sequences: cp.max_sequences as usize,
                max_query_heads: cp.max_query_heads as usize,
                sparse_budget_fraction: cp.sparse_budget_fraction,
                read_wave_bytes: cp.read_wave_bytes.0,
                promote: cp.promote,
                sketch_runs_bytes,
                leaf_level,
                sparf_candidates: cp.sparf_candidates as usize,
                hot_factor: cp.hotness.then_some(cp.hot_factor),
                quant_bytes,
            },
            drain,
            auth,
            retrieval,
        })
    }

    /// Checks `[auth]` and `[[tenants]]`: the server's view of tenants and
    /// the store's (same order, "default" first).
    fn resolve_auth(
        &self,
        listen: Option<SocketAddr>,
    ) -> Result<(AuthConfig, Vec<TenantSpec>), ConfigError> {
        let a = &self.auth;
        let tcp = match a.tcp.as_str() {
            "none" => TcpAuth::None,
            "token" => TcpAuth::Token,
            "mtls" => TcpAuth::Mtls,
            other => {
                return bad(
                    "auth.tcp",
                    format!("{other:?} is not one of \"none\", \"token\", \"mtls\""),
                );
            }
        };
        let uds = match a.uds.as_str() {
            "none" => UdsAuth::None,
            "peercred" => UdsAuth::PeerCred,
            other => {
                return bad(
                    "auth.uds",
                    format!("{other:?} is not one of \"none\", \"peercred\""),
                );
            }
        };
        let path = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        let tokens_file = path(&a.tokens_file);
        if tcp == TcpAuth::Token && tokens_file.is_none() {
            return bad(
                "auth.tokens_file",
                "auth.tcp = \"token\" needs a tokens file: one `tenant token` per line",
            );
        }
        let (cert, key, ca) = (path(&a.tls_cert), path(&a.tls_key), path(&a.tls_client_ca));
        if cert.is_some() != key.is_some() {
            return bad(
                "auth.tls_cert",
                "auth.tls_cert and auth.tls_key go together (the server's certificate chain and its private key, PEM)",
            );
        }
        if tcp == TcpAuth::Mtls && (cert.is_none() || ca.is_none()) {
            return bad(
                "auth.tls_client_ca",
                "auth.tcp = \"mtls\" needs auth.tls_cert, auth.tls_key and auth.tls_client_ca (PEM files)",
            );
        }
        if tcp == TcpAuth::None && cert.is_some() {
            return bad(
                "auth.tls_cert",
                "is set, but auth.tcp = \"none\" serves plain TCP; set auth.tcp to \"token\" or \"mtls\"",
            );
        }
        let tls = cert.zip(key).map(|(cert, key)| TlsFiles {
            cert,
            key,
            client_ca: if tcp == TcpAuth::Mtls { ca } else { None },
        });
        // TCP beyond loopback: only authenticated and encrypted, unless the
        // operator says the network is trusted.
        let exposed = listen.is_some_and(|l| !l.ip().is_loopback());
        if exposed && !a.allow_insecure_tcp {
            let addr = listen.map(|l| l.to_string()).unwrap_or_default();
            if tcp == TcpAuth::None {
                return bad(
                    "server.listen",
                    format!(
                        "{addr} is not a loopback address and auth.tcp = \"none\": anyone who reaches it could read and write every namespace. Set auth.tcp = \"mtls\" (or \"token\" with auth.tls_cert), listen on 127.0.0.1, or set auth.allow_insecure_tcp = true if the network is trusted"
                    ),
                );
            }
            if tls.is_none() {
                return bad(
                    "auth.tls_cert",
                    format!(
                        "server.listen {addr} is not a loopback address: bearer tokens would cross the network in clear text. Set auth.tls_cert and auth.tls_key, or auth.allow_insecure_tcp = true if the network is trusted"
                    ),
                );
            }
        }
        let multi = tcp != TcpAuth::None || uds != UdsAuth::None;
        let mut tenants: Vec<TenantAuth> = Vec::new();
        let mut specs: Vec<TenantSpec> = Vec::new();
        let mut seen_uid = std::collections::HashMap::new();
        let mut seen_gid = std::collections::HashMap::new();
        let mut seen_name = std::collections::HashMap::new();
        for t in &self.tenants {
            if !strata_proto::is_tenant_name(&t.name) {
                return bad(
                    "tenants.name",
                    format!(
                        "{:?} is not a tenant name: 1 to {} ASCII letters, digits, '.', '_' or '-'",
                        t.name,
                        strata_proto::MAX_TENANT_NAME_BYTES
                    ),
                );
            }
            if tenants.iter().any(|x| x.name == t.name) {
                return bad("tenants.name", format!("{:?} appears twice", t.name));
            }
            for (ids, seen, what) in [
                (&t.uids, &mut seen_uid, "uids"),
                (&t.gids, &mut seen_gid, "gids"),
            ] {
                for id in ids {
                    if let Some(other) = seen.insert(*id, t.name.clone()) {
                        return bad(
                            if what == "uids" {
                                "tenants.uids"
                            } else {
                                "tenants.gids"
                            },
                            format!("{id} is mapped to both {other:?} and {:?}", t.name),
                        );
                    }
                }
            }
            for n in &t.tls_names {
                if let Some(other) = seen_name.insert(n.clone(), t.name.clone()) {
                    return bad(
                        "tenants.tls_names",
                        format!("{n:?} is mapped to both {other:?} and {:?}", t.name),
                    );
                }
            }
            if !multi && t.name != strata_proto::DEFAULT_TENANT {
                return bad(
                    "tenants.name",
                    format!(
                        "tenant {:?}: without authentication (auth.tcp and auth.uds are \"none\") every client is the tenant \"default\"; turn authentication on or configure only \"default\"",
                        t.name
                    ),
                );
            }
            tenants.push(TenantAuth {
                name: t.name.clone(),
                uids: t.uids.clone(),
                gids: t.gids.clone(),
                tls_names: t.tls_names.clone(),
                admin: t.admin,
                zero_copy: t.zero_copy,
            });
            specs.push(TenantSpec {
                name: t.name.clone(),
                dram_bytes: t.dram_bytes.0,
                nvme_bytes: t.nvme_bytes.0,
            });
        }
        // "default" is ordinal 0: implicit (no quota) unless configured.
        match tenants
            .iter()
            .position(|t| t.name == strata_proto::DEFAULT_TENANT)
        {
            Some(i) => {
                let t = tenants.remove(i);
                tenants.insert(0, t);
                let sp = specs.remove(i);
                specs.insert(0, sp);
            }
            None => {
                tenants.insert(
                    0,
                    TenantAuth {
                        name: strata_proto::DEFAULT_TENANT.into(),
                        uids: vec![],
                        gids: vec![],
                        tls_names: vec![],
                        // Without authentication it may do everything;
                        // with it, the clients of an unauthenticated
                        // transport may use their namespaces, no more.
                        admin: false,
                        zero_copy: true,
                    },
                );
                specs.insert(0, TenantSpec::unlimited(strata_proto::DEFAULT_TENANT));
            }
        }
        if !multi {
            // One tenant, and it may do everything.
            tenants[0].admin = true;
            tenants[0].zero_copy = true;
        }
        Ok((
            AuthConfig {
                tcp,
                uds,
                tokens_file,
                tls,
                tenants,
                multi,
                insecure_tcp: exposed && a.allow_insecure_tcp,
            },
            specs,
        ))
    }
}

/// The zero-copy hand-off socket that goes with a gRPC Unix socket: the same
/// path with `.shm` appended. Clients use the same rule.
pub fn shm_path_for(uds: &Path) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(".shm");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_file_is_the_default() {
        let parsed = Config::from_toml(DEFAULT_CONFIG_TOML).unwrap();
        assert_eq!(parsed, Config::default());
        let r = parsed.resolve().unwrap();
        assert_eq!(r.listen, Some("127.0.0.1:7470".parse().unwrap()));
        assert_eq!(r.uds, Some(PathBuf::from("strata-data/stratad.sock")));
        assert_eq!(
            r.shm_socket,
            Some(PathBuf::from("strata-data/stratad.sock.shm"))
        );
        assert_eq!(r.dram.bytes, 1 << 30);
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn auth_defaults_are_off_with_one_admin_tenant() {
        let r = Config::default().resolve().unwrap();
        assert!(!r.auth.multi);
        assert_eq!(r.auth.tcp, TcpAuth::None);
        assert_eq!(r.auth.tenants.len(), 1);
        assert_eq!(r.auth.tenants[0].name, "default");
        assert!(r.auth.tenants[0].admin && r.auth.tenants[0].zero_copy);
        assert_eq!(r.store.tenants, TenantConfig::default());
    }

    #[test]
    fn tcp_beyond_loopback_needs_authentication_or_an_explicit_waiver() {
        let e = Config::from_toml("[server]\nlisten = \"0.0.0.0:7470\"\n")
            .unwrap()
            .resolve()
            .unwrap_err();
        assert_eq!(e.field, "server.listen");
        assert!(e.reason.contains("auth.tcp = \"mtls\""), "{e}");
        assert!(e.reason.contains("allow_insecure_tcp"), "{e}");
        let r = Config::from_toml(
            "[server]\nlisten = \"0.0.0.0:7470\"\n[auth]\nallow_insecure_tcp = true\n",
        )
        .unwrap()
        .resolve()
        .unwrap();
        assert!(r.auth.insecure_tcp && !r.auth.multi);
        // Tokens beyond loopback travel only over TLS.
        let toks =
            "[server]\nlisten = \"10.0.0.1:7470\"\n[auth]\ntcp = \"token\"\ntokens_file = \"t\"\n";
        let e = Config::from_toml(toks).unwrap().resolve().unwrap_err();
        assert_eq!(e.field, "auth.tls_cert");
        let ok = format!("{toks}tls_cert = \"c\"\ntls_key = \"k\"\n");
        let r = Config::from_toml(&ok).unwrap().resolve().unwrap();
        assert!(r.auth.multi && !r.auth.insecure_tcp);
        assert_eq!(r.auth.tls.unwrap().client_ca, None);
        // Loopback with tokens and no TLS is fine.
        let r = Config::from_toml("[auth]\ntcp = \"token\"\ntokens_file = \"t\"\n")
            .unwrap()
            .resolve()
            .unwrap();
        assert!(r.auth.tls.is_none());
    }

    #[test]
    fn auth_and_tenants_are_checked() {
        let field = |t: &str| {
            Config::from_toml(t)
                .unwrap()
                .resolve()
                .map(|_| "ok")
                .unwrap_or_else(|e| e.field)
        };
        assert_eq!(field("[auth]\ntcp = \"token\"\n"), "auth.tokens_file");
        assert_eq!(
            field("[auth]\ntcp = \"mtls\"\ntls_cert = \"c\"\ntls_key = \"k\"\n"),
            "auth.tls_client_ca"
        );
        assert_eq!(field("[auth]\ntls_cert = \"c\"\n"), "auth.tls_cert");
        assert_eq!(
            field("[auth]\ntls_cert = \"c\"\ntls_key = \"k\"\n"),
            "auth.tls_cert"
        );
        let peer = "[auth]\nuds = \"peercred\"\n";
        assert_eq!(
            field(&format!("{peer}[[tenants]]\nname = \"a b\"\n")),
            "tenants.name"
        );
        assert_eq!(
            field(&format!(
                "{peer}[[tenants]]\nname = \"a\"\n[[tenants]]\nname = \"a\"\n"
            )),
            "tenants.name"
        );
        assert_eq!(
            field(&format!(
                "{peer}[[tenants]]\nname = \"a\"\nuids = [7]\n[[tenants]]\nname = \"b\"\nuids = [7]\n"
            )),
            "tenants.uids"
        );
        assert_eq!(
            field(&format!(
                "{peer}[[tenants]]\nname = \"a\"\ntls_names = [\"x\"]\n[[tenants]]\nname = \"b\"\ntls_names = [\"x\"]\n"
            )),
            "tenants.tls_names"
        );
        // Without authentication only "default" may be configured.
        assert_eq!(field("[[tenants]]\nname = \"a\"\n"), "tenants.name");
        assert_eq!(
            field("[[tenants]]\nname = \"default\"\ndram_bytes = \"1MiB\"\n"),
            "ok"
        );
        // "default" comes first, whatever the file's order; quotas reach
        // the store.
        let r = Config::from_toml(&format!(
            "{peer}[[tenants]]\nname = \"a\"\ndram_bytes = \"8MiB\"\nuids = [5]\n[[tenants]]\nname = \"default\"\nadmin = true\n"
        ))
        .unwrap()
        .resolve()
        .unwrap();
        let names: Vec<_> = r.auth.tenants.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["default", "a"]);
        assert!(r.auth.tenants[0].admin);
        assert!(!r.auth.tenants[1].zero_copy, "zero_copy is opt-in");
        assert_eq!(r.store.tenants.tenants[1].dram_bytes, 8 << 20);
        assert!(r.store.tenants.multi);
    }

    #[test]
    fn retrieval_auto_build_is_checked() {
        assert_eq!(Config::default().resolve().unwrap().retrieval.auto, None);
        let r = Config::from_toml(
            "[server]\nmax_keys_per_call = 512\n[retrieval]\nauto_build = true\nauto_layers = [1, 0]\nauto_kv_heads = [3]\nauto_min_tokens = 64\nauto_quiet_ms = 20\n",
        )
        .unwrap()
        .resolve()
        .unwrap();
        let a = r.retrieval.auto.unwrap();
        assert_eq!(a.layers, [1, 0]);
        assert_eq!(a.kv_heads, [3]);
        assert_eq!(a.min_tokens, 64);
        assert_eq!(a.quiet, Duration::from_millis(20));
        assert_eq!(a.max_pending, 4096);
        assert_eq!(a.max_blocks, 512, "server.max_keys_per_call");
        let err = |t: &str| {
            Config::from_toml(&format!("[retrieval]\nauto_build = true\n{t}\n"))
                .unwrap()
                .resolve()
                .unwrap_err()
        };
        for (t, field, why) in [
            (
                "auto_layers = [2, 2]",
                "retrieval.auto_layers",
                "2 is listed twice",
            ),
            (
                "auto_kv_heads = [0, 1, 0]",
                "retrieval.auto_kv_heads",
                "0 is listed twice",
            ),
            (
                "auto_kv_heads = [70000]",
                "retrieval.auto_kv_heads",
                "above 65535",
            ),
            (
                "auto_min_tokens = 0",
                "retrieval.auto_min_tokens",
                "between 1",
            ),
            ("auto_quiet_ms = 0", "retrieval.auto_quiet_ms", "between 1"),
            (
                "auto_max_pending = 0",
                "retrieval.auto_max_pending",
                "between 1",
            ),
        ] {
            let e = err(t);
            assert_eq!(e.field, field, "{t}");
            assert!(e.reason.contains(why), "{t}: {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!("1GiB".parse::<ByteSize>().unwrap(), ByteSize(1 << 30));
        assert_eq!("512 MiB".parse::<ByteSize>().unwrap(), ByteSize(512 << 20));
        assert_eq!(
            "10GB".parse::<ByteSize>().unwrap(),
            ByteSize(10_000_000_000)
        );
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert!(
            "1 GiBs"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("unknown size unit")
        );
        assert!("lots".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(1 << 30).to_string(), "1GiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    /// A DRAM tier may have at most 2^32 granules (the index keeps its
    /// addresses as 32-bit granule indexes): larger is refused with what to
    /// change, and the largest that fits is accepted.
    #[test]
    fn dram_tier_is_at_most_2_pow_32_granules() {
        // Without abstracts, whose region would be over its own limit for
        // tiers this large.
        let dram = |bytes: &str, granule: &str| {
            Config::from_toml(&format!(
                "[tiers.dram]\nbytes = \"{bytes}\"\ngranule_bytes = \"{granule}\"\n[compute]\nabstracts = false\n"
            ))
            .unwrap()
            .resolve()
        };
        // 4KiB granules (the default): up to 16TiB.
        assert_eq!(dram("16TiB", "4KiB").unwrap().dram.bytes, 16 << 40);
        let e = dram("32TiB", "4KiB").unwrap_err();
        assert_eq!(e.field, "tiers.dram.bytes");
        assert!(
            e.reason.contains("8589934592 granules of 4KiB"),
            "{}",
            e.reason
        );
        assert!(
            e.reason
                .contains("raise tiers.dram.granule_bytes to 8KiB or more"),
            "{}",
            e.reason
        );
        assert!(
            e.reason.contains("lower tiers.dram.bytes to 16TiB or less"),
            "{}",
            e.reason
        );
        assert!(dram("32TiB", "8KiB").is_ok());
        // 16B granules (the smallest): up to 64GiB.
        assert!(dram("64GiB", "16B").is_ok());
        let e = dram("65GiB", "16B").unwrap_err();
        assert_eq!(e.field, "tiers.dram.bytes");
        assert!(
            e.reason
                .contains("raise tiers.dram.granule_bytes to 32B or more"),
            "{}",
            e.reason
        );
        // Bytes past the last whole granule are dropped (as the arena
        // drops them), so 2^32 granules and 15 bytes of 16B fit.
        assert!(dram(&format!("{}", (64u64 << 30) + 15), "16B").is_ok());
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::from_toml("[tiers.dram]\nbytez = 1\n").unwrap_err();
        assert!(e.contains("unknown field `bytez`"), "{e}");
        let e = Config::from_toml("[tiers.dram]\nbytes = \"1 parsec\"\n").unwrap_err();
        assert!(e.contains("unknown size unit"), "{e}");
        let c = Config::from_toml("[tiers.dram]\nbytes = 1000\n").unwrap();
        assert_eq!(c.resolve().unwrap_err().field, "tiers.dram.bytes");
        let c = Config::from_toml("[server]\nlisten = \"localhost\"\n").unwrap();
        assert_eq!(c.resolve().unwrap_err().field, "server.listen");
        let c = Config::from_toml("[store]\neviction_policy = \"fifo\"\n").unwrap();
        assert_eq!(c.resolve().unwrap_err().field, "store.eviction_policy");
        let c = Config::from_toml("[tiers.dram]\nlow_watermark = 0.99\n").unwrap();
        assert_eq!(c.resolve().unwrap_err().field, "tiers.dram.high_watermark");
        let c = Config::from_toml("[server]\nlisten = \"off\"\nuds = \"off\"\n").unwrap();
        assert_eq!(c.resolve().unwrap_err().field, "server.listen");
        let c = Config::from_toml("[compute]\nsparse_budget_fraction = 0.0\n").unwrap();
        assert_eq!(
            c.resolve().unwrap_err().field,
            "compute.sparse_budget_fraction"
        );
        let c = Config::from_toml("[compute]\nmax_sequences = 0\n").unwrap();
        assert_eq!(c.resolve().unwrap_err().field, "compute.max_sequences");
        for bad_factor in ["0.0", "-1.0", "1001.0", "nan"] {
            let c = Config::from_toml(&format!("[compute]\nhot_factor = {bad_factor}\n")).unwrap();
            let e = c.resolve().unwrap_err();
            assert_eq!(e.field, "compute.hot_factor", "{bad_factor}");
        }
        let c = Config::from_toml("[compute]\nhot_factor = 4.0\n").unwrap();
        assert_eq!(c.resolve().unwrap().compute.hot_factor, Some(4.0));
        let c = Config::from_toml("[compute]\nhotness = false\n").unwrap();
        assert_eq!(c.resolve().unwrap().compute.hot_factor, None);
        for bad_quant in ["\"4KiB\"", "\"300GiB\""] {
            let c = Config::from_toml(&format!("[compute]\nquant_bytes = {bad_quant}\n")).unwrap();
            assert_eq!(c.resolve().unwrap_err().field, "compute.quant_bytes");
        }
        let c = Config::from_toml("[compute]\nquant_bytes = \"8MiB\"\n").unwrap();
        assert_eq!(c.resolve().unwrap().compute.quant_bytes, 8 << 20);
        assert_eq!(Config::default().resolve().unwrap().compute.quant_bytes, 0);
        let c = Config::from_toml("[compute]\nsparf_candidates = 17\n").unwrap();
        assert_eq!(c.resolve().unwrap_err().field, "compute.sparf_candidates");
        let c = Config::from_toml("[compute]\nsparf_candidates = 0\n").unwrap();
        assert_eq!(c.resolve().unwrap().compute.sparf_candidates, 0);
        let c = Config::from_toml("[auth]\ntcp = \"kerberos\"\n").unwrap();
        assert_eq!(c.resolve().unwrap_err().field, "auth.tcp");
        // 1GiB of DRAM + 4GiB of NVMe by default: a sixteenth for abstracts.
        let r = Config::default().resolve().unwrap();
        assert_eq!(r.store.summaries.bytes, 320 << 20);
        assert!(r.store.summaries.enabled);
        // Sketch runs: none without key sketches; an eighth of DRAM with
        // them; a size given without them, or out of range, is refused.
        assert_eq!(r.compute.sketch_runs_bytes, 0);
        let c = Config::from_toml("[compute]\nkey_sketch = true\n").unwrap();
        assert_eq!(c.resolve().unwrap().compute.sketch_runs_bytes, 128 << 20);
        let c = Config::from_toml("[compute]\nkey_sketch = true\nsketch_runs = false\n").unwrap();
        assert_eq!(c.resolve().unwrap().compute.sketch_runs_bytes, 0);
        for bad in [
            "sketch_runs_bytes = \"64MiB\"\n",
            "key_sketch = true\nsketch_runs = false\nsketch_runs_bytes = \"64MiB\"\n",
            "key_sketch = true\nsketch_runs_bytes = \"4KiB\"\n",
        ] {
            let c = Config::from_toml(&format!("[compute]\n{bad}")).unwrap();
            assert_eq!(
                c.resolve().unwrap_err().field,
                "compute.sketch_runs_bytes",
                "{bad}"
            );
        }
        assert_eq!(r.store.summaries.leaf_tokens, 0);
        assert_eq!(r.compute.leaf_level, LeafLevel::Adaptive);
        // Leaves: 0 or a power of two of at least 4; the region's default
        // follows them (an eighth at 8 tokens).
        for bad_leaf in [1, 2, 3, 6, 12, 2048] {
            let c = Config::from_toml(&format!("[compute]\nleaf_tokens = {bad_leaf}\n")).unwrap();
            let e = c.resolve().unwrap_err();
            assert_eq!(e.field, "compute.leaf_tokens", "{bad_leaf}");
            assert!(e.reason.contains("power of two"), "{}", e.reason);
        }
        let c = Config::from_toml("[compute]\nleaf_tokens = 8\nleaf_level = \"leaf\"\n").unwrap();
        let r = c.resolve().unwrap();
        assert_eq!(r.store.summaries.leaf_tokens, 8);
        assert_eq!(r.store.summaries.bytes, 640 << 20);
        assert_eq!(r.compute.leaf_level, LeafLevel::Leaf);
        let c = Config::from_toml("[compute]\nleaf_level = \"tiny\"\n").unwrap();
        assert_eq!(c.resolve().unwrap_err().field, "compute.leaf_level");
    }
}

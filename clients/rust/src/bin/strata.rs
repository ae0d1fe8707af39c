//! `strata`: command-line client of stratad.
//!
//! Output meant for scripts goes to stdout alone (`layout register` prints
//! the namespace id and nothing else); diagnostics and progress go to
//! stderr, and every failure exits non-zero with what was wrong and what to
//! do. Admin commands: `stats` (per tier, per namespace and per tenant),
//! `drain`, `evict`, `export` and `import` (the file format is
//! `strata_client::export`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use strata_client::export::{ExportReader, ExportWriter};
use strata_client::strata_proto::pb;
use strata_client::{
    Client, Credentials, DEFAULT_ENDPOINT, Error, ExportItem, PutBlock, PutResult, TlsCredentials,
};
use strata_proto::{BlockKey, Dtype, KvKind, Layout, NamespaceId, TierKind};

#[derive(Parser, Debug)]
#[command(
    name = "strata",
    version,
    about = "Command-line client of stratad, the Strata KV-cache daemon"
)]
struct Cli {
    /// Daemon endpoint: http://host:port, https://host:port (TLS) or
    /// unix:/path/to/stratad.sock.
    #[arg(long, global = true, default_value = DEFAULT_ENDPOINT)]
    endpoint: String,
    /// File holding the bearer token of a tenant (daemon auth.tcp =
    /// "token"); the STRATA_TOKEN environment variable is read when this
    /// is not given. (Not a flag with the token itself: command lines are
    /// visible to every user of the machine.)
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the daemon's certificate
    /// (https:// endpoints).
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS (auth.tcp = "mtls");
    /// needs --tls-key.
    #[arg(long, global = true, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM); needs --tls-cert.
    #[arg(long, global = true, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The name the daemon's certificate carries, when it is not the
    /// endpoint's host.
    #[arg(long, global = true, value_name = "NAME")]
    tls_domain: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The credentials the flags (and STRATA_TOKEN) describe; errors say which
/// flag is wrong and what to do.
fn credentials(cli: &Cli) -> anyhow::Result<Credentials> {
    let read = |p: &Option<PathBuf>, flag: &str| -> anyhow::Result<Option<Vec<u8>>> {
        p.as_ref()
            .map(|p| {
                std::fs::read(p).with_context(|| format!("cannot read {flag} {}", p.display()))
            })
            .transpose()
    };
    let token = match &cli.token_file {
        Some(_) => {
            let raw = read(&cli.token_file, "--token-file")?.unwrap_or_default();
            let t = String::from_utf8(raw)
                .context("--token-file: the token is not UTF-8 text")?
                .trim()
                .to_string();
            if t.is_empty() {
                bail!("--token-file: the file is empty; put the tenant's token in it");
            }
            Some(t)
        }
        None => std::env::var("STRATA_TOKEN").ok().filter(|t| !t.is_empty()),
    };
    if cli.tls_cert.is_some() != cli.tls_key.is_some() {
        bail!("--tls-cert and --tls-key go together (the client certificate and its key)");
    }
    let any_tls = cli.tls_ca.is_some() || cli.tls_cert.is_some() || cli.tls_domain.is_some();
    if any_tls && !cli.endpoint.starts_with("https://") {
        bail!(
            "--tls-* need an https:// endpoint (got --endpoint {}); the daemon serves TLS on its TCP address when [auth] tls is set",
            cli.endpoint
        );
    }
    let tls = any_tls
        .then(|| -> anyhow::Result<TlsCredentials> {
            Ok(TlsCredentials {
                ca_pem: read(&cli.tls_ca, "--tls-ca")?,
                cert_pem: read(&cli.tls_cert, "--tls-cert")?,
                key_pem: read(&cli.tls_key, "--tls-key")?,
                domain: cli.tls_domain.clone(),
            })
        })
        .transpose()?;
    Ok(Credentials { token, tls })
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Layouts (KV shapes) and their namespaces.
    Layout {
        #[command(subcommand)]
        cmd: LayoutCmd,
    },
    /// Store one block read from FILE ("-" for stdin).
    Put {
        #[arg(long, value_parser = parse_ns)]
        namespace: NamespaceId,
        /// Block key in hex (1 to 32 bytes).
        #[arg(long, value_parser = parse_key)]
        key: BlockKey,
        /// Parent block key in hex (omit for the first block of a chain).
        #[arg(long, value_parser = parse_key)]
        parent: Option<BlockKey>,
        file: PathBuf,
    },
    /// Fetch one block into a file ("-" for stdout).
    Get {
        #[arg(long, value_parser = parse_ns)]
        namespace: NamespaceId,
        #[arg(long, value_parser = parse_key)]
        key: BlockKey,
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// How many leading keys of a chain are present, and where.
    Lookup {
        #[arg(long, value_parser = parse_ns)]
        namespace: NamespaceId,
        /// Keys in hex, in chain order.
        #[arg(required = true, value_parser = parse_key)]
        keys: Vec<BlockKey>,
    },
    /// Remove blocks.
    Delete {
        #[arg(long, value_parser = parse_ns)]
        namespace: NamespaceId,
        #[arg(required = true, value_parser = parse_key)]
        keys: Vec<BlockKey>,
    },
    /// Occupancy and counters per tier, per namespace and per tenant.
    Stats,
    /// Drain the daemon for a restart or upgrade: refuse new puts, finish
    /// those in flight, write DRAM down to NVMe, flush, and exit 0.
    Drain,
    /// Remove every block of a namespace, from every tier and for good
    /// (blocks pinned by a lease are removed when the lease ends).
    Evict {
        #[command(flatten)]
        ns: NamespaceSel,
    },
    /// Write every block of a namespace to a file (for `strata import` on
    /// another node).
    Export {
        #[command(flatten)]
        ns: NamespaceSel,
        /// The file to write (it must not exist unless --force).
        #[arg(long, short = 'o', value_name = "FILE")]
        out: PathBuf,
        /// Overwrite FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Store the blocks of an export file (its namespace is registered from
    /// the file's layout); the whole file is checked before anything is
    /// stored.
    Import {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// A namespace: its id, or its layout (the flags of `layout register`).
#[derive(Args, Debug)]
struct NamespaceSel {
    /// Namespace id (hex, as `strata layout register` and `strata stats`
    /// print it); or give the layout with the flags below.
    #[arg(long, value_parser = parse_ns)]
    namespace: Option<NamespaceId>,
    /// Layout of the namespace (instead of --namespace): model id.
    #[arg(long)]
    model: Option<String>,
    /// f32, f16, bf16 or fp8.
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<Dtype>,
    #[arg(long)]
    layers: Option<u32>,
    #[arg(long)]
    kv_heads: Option<u32>,
    #[arg(long)]
    head_dim: Option<u32>,
    #[arg(long)]
    block_tokens: Option<u32>,
    /// separate (K and V) or mla (one latent).
    #[arg(long, default_value = "separate", value_parser = parse_kind)]
    kv_kind: KvKind,
    #[arg(long, default_value_t = 0)]
    tp_rank: u32,
    #[arg(long, default_value_t = 1)]
    tp_size: u32,
    #[arg(long, default_value = "")]
    tenant_salt: String,
}

impl NamespaceSel {
    /// The namespace id named, or what is missing.
    fn resolve(&self) -> anyhow::Result<NamespaceId> {
        const HOW: &str = "name the namespace with --namespace ID (from `strata stats`), or with its layout: --model, --dtype, --layers, --kv-heads, --head-dim, --block-tokens (as for `strata layout register`)";
        let layout_given = self.model.is_some()
            || self.dtype.is_some()
            || self.layers.is_some()
            || self.kv_heads.is_some()
            || self.head_dim.is_some()
            || self.block_tokens.is_some();
        match (self.namespace, layout_given) {
            (Some(_), true) => bail!("--namespace and layout flags were both given; {HOW}"),
            (Some(ns), false) => Ok(ns),
            (None, false) => bail!("no namespace given; {HOW}"),
            (None, true) => {
                let missing: Vec<&str> = [
                    ("--model", self.model.is_none()),
                    ("--dtype", self.dtype.is_none()),
                    ("--layers", self.layers.is_none()),
                    ("--kv-heads", self.kv_heads.is_none()),
                    ("--head-dim", self.head_dim.is_none()),
                    ("--block-tokens", self.block_tokens.is_none()),
                ]
                .into_iter()
                .filter_map(|(f, m)| m.then_some(f))
                .collect();
                if !missing.is_empty() {
                    bail!("the layout lacks {}; {HOW}", missing.join(", "));
                }
                let layout = Layout {
                    model_id: self.model.clone().unwrap_or_default(),
                    dtype: self.dtype.unwrap_or(Dtype::F16),
                    num_layers: self.layers.unwrap_or(0),
                    num_kv_heads: self.kv_heads.unwrap_or(0),
                    head_dim: self.head_dim.unwrap_or(0),
                    tokens_per_block: self.block_tokens.unwrap_or(0),
                    kv_kind: self.kv_kind,
                    tp_rank: self.tp_rank,
                    tp_size: self.tp_size,
                    tenant_salt: self.tenant_salt.clone().into_bytes(),
                };
                layout
                    .validate()
                    .map_err(|e| anyhow::anyhow!("the layout is not valid: {e}"))?;
                Ok(layout.namespace_id())
            }
        }
    }
}

#[derive(Subcommand, Debug)]
enum LayoutCmd {
    /// Register a layout; prints its namespace id (hex) alone on stdout.
    Register {
        #[arg(long)]
        model: String,
        /// f32, f16, bf16 or fp8.
        #[arg(long, value_parser = parse_dtype)]
        dtype: Dtype,
        #[arg(long)]
        layers: u32,
        #[arg(long)]
        kv_heads: u32,
        #[arg(long)]
        head_dim: u32,
        #[arg(long)]
        block_tokens: u32,
        /// separate (K and V) or mla (one latent).
        #[arg(long, default_value = "separate", value_parser = parse_kind)]
        kv_kind: KvKind,
        #[arg(long, default_value_t = 0)]
        tp_rank: u32,
        #[arg(long, default_value_t = 1)]
        tp_size: u32,
        /// Separates tenants or cache-salt domains that share a model.
        #[arg(long, default_value = "")]
        tenant_salt: String,
    },
}

fn parse_ns(s: &str) -> Result<NamespaceId, String> {
    s.parse::<NamespaceId>()
        .map_err(|e| format!("{e} (use the id printed by `strata layout register`)"))
}

fn parse_key(s: &str) -> Result<BlockKey, String> {
    BlockKey::from_hex(s)
}

fn parse_dtype(s: &str) -> Result<Dtype, String> {
    Dtype::parse(s).ok_or_else(|| format!("{s:?} is not one of f32, f16, bf16, fp8"))
}

fn parse_kind(s: &str) -> Result<KvKind, String> {
    match s {
        "separate" => Ok(KvKind::Separate),
        "mla" => Ok(KvKind::Mla),
        _ => Err(format!("{s:?} is not one of separate, mla")),
    }
}

/// What to tell the user after an error.
fn advice(e: &Error) -> Option<&'static str> {
    match e.code() {
        Some(tonic::Code::NotFound) if e.to_string().contains(": namespace_id:") => {
            Some("register the layout first with `strata layout register`")
        }
        Some(tonic::Code::NotFound) => {
            Some("the block is not cached (absent or evicted); recompute it")
        }
        Some(tonic::Code::Unauthenticated) => Some(
            "pass the tenant's credentials: --token-file FILE (or STRATA_TOKEN), or --tls-cert/--tls-key with an https:// endpoint",
        ),
        Some(tonic::Code::PermissionDenied) => Some(
            "this tenant may not do that: another tenant's namespace, or an admin call for a tenant without admin = true",
        ),
        Some(tonic::Code::ResourceExhausted) => {
            Some("the daemon is at a configured limit; retry later or raise it")
        }
        Some(tonic::Code::Unavailable) if e.to_string().contains("draining") => Some(
            "the daemon is draining for a restart or upgrade; use another node, or retry once it is back",
        ),
        None if matches!(e, Error::Connect { .. }) => Some(
            "start the daemon with `stratad`, or pass --endpoint http://HOST:PORT or unix:/PATH",
        ),
        _ => None,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("strata: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: {e:#}");
            if let Some(se) = e.downcast_ref::<Error>()
                && let Some(a) = advice(se)
            {
                eprintln!("strata: hint: {a}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Argument errors that need no daemon, reported before connecting.
fn precheck(cmd: &Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Evict { ns } => {
            ns.resolve()?;
        }
        Cmd::Export { ns, out, force } => {
            ns.resolve()?;
            if out.exists() && !force {
                bail!(
                    "{} exists; choose another --out FILE, or pass --force to overwrite it",
                    out.display()
                );
            }
        }
        Cmd::Import { file } => {
            open_export(file)?;
        }
        _ => {}
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    precheck(&cli.cmd)?;
    let creds = credentials(&cli)?;
    let mut c = Client::connect_with(&cli.endpoint, &creds).await?;
    match cli.cmd {
        Cmd::Layout {
            cmd:
                LayoutCmd::Register {
                    model,
                    dtype,
                    layers,
                    kv_heads,
                    head_dim,
                    block_tokens,
                    kv_kind,
                    tp_rank,
                    tp_size,
                    tenant_salt,
                },
        } => {
            let layout = Layout {
                model_id: model,
                dtype,
                num_layers: layers,
                num_kv_heads: kv_heads,
                head_dim,
                tokens_per_block: block_tokens,
                kv_kind,
                tp_rank,
                tp_size,
                tenant_salt: tenant_salt.into_bytes(),
            };
            let r = c.register_layout(&layout).await?;
            println!("{}", r.namespace);
            eprintln!(
                "block: {} bytes ({} per token){}",
                r.block_bytes,
                r.token_bytes,
                if r.existed {
                    "; already registered"
                } else {
                    ""
                }
            );
        }
        Cmd::Put {
            namespace,
            key,
            parent,
            file,
        } => {
            let data = if file.as_os_str() == "-" {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
                v
            } else {
                std::fs::read(&file)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
            };
            let n = data.len();
            let r = c
                .put(
                    namespace,
                    &[PutBlock {
                        key,
                        parent,
                        data: Bytes::from(data),
                    }],
                )
                .await?;
            match r[0] {
                PutResult::Stored => eprintln!("stored {key} ({n} bytes)"),
                PutResult::AlreadyPresent => eprintln!("already present: {key} (not rewritten)"),
            }
        }
        Cmd::Get {
            namespace,
            key,
            output,
        } => {
            let b = c.get(namespace, &[key], None).await?;
            let data = &b[0].data;
            if output.as_os_str() == "-" {
                std::io::stdout().write_all(data)?;
            } else {
                std::fs::write(&output, data)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", output.display()))?;
                eprintln!("wrote {} bytes to {}", data.len(), output.display());
            }
        }
        Cmd::Lookup { namespace, keys } => {
            let r = c.lookup(namespace, &keys, 0).await?;
            println!("hits: {} of {}", r.hits, keys.len());
            for (k, t) in keys.iter().zip(&r.tiers) {
                println!("{k} {}", t.name());
            }
        }
        Cmd::Delete { namespace, keys } => {
            let r = c.delete(namespace, &keys).await?;
            println!("deleted: {}", r.deleted);
            for k in &r.absent {
                println!("absent: {k}");
            }
            for k in &r.pinned {
                println!("pinned (not deleted): {k}");
            }
        }
        Cmd::Stats => stats(&mut c).await?,
        Cmd::Drain => drain(&mut c).await?,
        Cmd::Evict { ns } => {
            let ns = ns.resolve()?;
            let r = c.evict_namespace(ns).await?;
            println!(
                "evicted {} blocks ({}) of namespace {ns}",
                r.evicted_blocks,
                human(r.evicted_bytes)
            );
            if r.retired_blocks > 0 {
                println!(
                    "retired {} pinned blocks: hidden now, removed when their leases or reads end",
                    r.retired_blocks
                );
            }
            if !r.persisted {
                eprintln!(
                    "strata: note: the eviction was not recorded beside the NVMe segments (no NVMe tier, or it could not be written; see the daemon's log): blocks on NVMe may return after a restart"
                );
            }
        }
        Cmd::Export { ns, out, force } => export(&mut c, ns.resolve()?, &out, force).await?,
        Cmd::Import { file } => import(&mut c, &file).await?,
    }
    Ok(())
}

// ---- stats ------------------------------------------------------------------

fn tier_name(t: i32) -> &'static str {
    pb::Tier::try_from(t)
        .ok()
        .and_then(|t| TierKind::try_from(t).ok())
        .map_or("?", |t| t.name())
}

async fn stats(c: &mut Client) -> anyhow::Result<()> {
    let s = c.stats_per_namespace().await?;
    println!(
        "stratad {}: {} blocks, {} namespaces, {} leases, {} reservations{}",
        s.version,
        s.blocks,
        s.namespaces,
        s.leases,
        s.reservations,
        if s.draining { "; DRAINING" } else { "" }
    );
    println!(
        "lookups: {} ({} keys, {} hits); checksum failures: {}; index: {} bytes",
        s.lookups, s.lookup_keys, s.lookup_hits, s.checksum_failures, s.index_bytes
    );
    println!(
        "{:<6} {:>14} {:>14} {:>6} {:>9} {:>7} {:>10} {:>14} {:>14}",
        "tier",
        "capacity",
        "used",
        "used%",
        "blocks",
        "pinned",
        "evictions",
        "bytes_in",
        "bytes_out"
    );
    for t in &s.tiers {
        let pct = if t.capacity_bytes > 0 {
            100.0 * t.used_bytes as f64 / t.capacity_bytes as f64
        } else {
            0.0
        };
        println!(
            "{:<6} {:>14} {:>14} {:>5.1}% {:>9} {:>7} {:>10} {:>14} {:>14}{}",
            tier_name(t.tier),
            t.capacity_bytes,
            t.used_bytes,
            pct,
            t.blocks,
            t.pinned_blocks,
            t.evictions,
            t.bytes_in,
            t.bytes_out,
            if t.fenced { "  FENCED" } else { "" }
        );
    }
    if s.namespace_stats.is_empty() {
        return Ok(());
    }
    // Per tenant (one tenant until authentication maps identities), then
    // per namespace.
    let mut tenants: std::collections::BTreeMap<&str, [u64; 5]> = Default::default();
    for n in &s.namespace_stats {
        let e = tenants.entry(n.tenant.as_str()).or_default();
        e[0] += 1;
        e[1] += n.blocks;
        e[2] += n.bytes;
        for t in &n.tiers {
            match pb::Tier::try_from(t.tier) {
                Ok(pb::Tier::Dram) => e[3] += t.bytes,
                Ok(pb::Tier::Nvme) => e[4] += t.bytes,
                _ => {}
            }
        }
    }
    println!();
    println!(
        "{:<16} {:>10} {:>9} {:>10} {:>10} {:>10}",
        "tenant", "namespaces", "blocks", "bytes", "dram", "nvme"
    );
    for (name, v) in &tenants {
        println!(
            "{:<16} {:>10} {:>9} {:>10} {:>10} {:>10}",
            name,
            v[0],
            v[1],
            human(v[2]),
            human(v[3]),
            human(v[4])
        );
    }
    println!();
    println!(
        "{:<16} {:<10} {:>9} {:>10} {:>9} {:>10} {:>9} {:>10} {:>7}  layout",
        "namespace",
        "tenant",
        "blocks",
        "bytes",
        "in_dram",
        "dram_bytes",
        "in_nvme",
        "nvme_bytes",
        "pinned"
    );
    for n in &s.namespace_stats {
        let mut per = [(0u64, 0u64); 2];
        for t in &n.tiers {
            match pb::Tier::try_from(t.tier) {
                Ok(pb::Tier::Dram) => per[0] = (t.blocks, t.bytes),
                Ok(pb::Tier::Nvme) => per[1] = (t.blocks, t.bytes),
                _ => {}
            }
        }
        let layout = match &n.layout {
            Some(l) => format!(
                "{} {} {}x{}x{} {}/block{}",
                l.model_id,
                pb::Dtype::try_from(l.dtype)
                    .ok()
                    .and_then(|d| Dtype::try_from(d).ok())
                    .map_or("?", |d| d.name()),
                l.num_layers,
                l.num_kv_heads,
                l.head_dim,
                l.tokens_per_block,
                if l.tp_size > 1 {
                    format!(" tp {}/{}", l.tp_rank, l.tp_size)
                } else {
                    String::new()
                }
            ),
            None => "(layout not registered since restart)".into(),
        };
        println!(
            "{:<16} {:<10} {:>9} {:>10} {:>9} {:>10} {:>9} {:>10} {:>7}  {layout}",
            NamespaceId(n.namespace_id),
            n.tenant,
            n.blocks,
            human(n.bytes),
            per[0].0,
            human(per[0].1),
            per[1].0,
            human(per[1].1),
            n.pinned_blocks,
        );
    }
    Ok(())
}

/// Bytes for humans: 1023 B, 1.5 KiB, 12.0 MiB, ...
fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

// ---- progress ---------------------------------------------------------------

/// A progress line on stderr, redrawn at most ten times a second when
/// stderr is a terminal; nothing but the final line otherwise (logs and
/// tests stay clean).
struct Progress {
    label: &'static str,
    total_blocks: u64,
    total_bytes: u64,
    started: Instant,
    drawn: Option<Instant>,
    tty: bool,
}

impl Progress {
    fn new(label: &'static str, total_blocks: u64, total_bytes: u64) -> Progress {
        Progress {
            label,
            total_blocks,
            total_bytes,
            started: Instant::now(),
            drawn: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn line(&self, blocks: u64, bytes: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = human((bytes as f64 / secs) as u64);
        if self.total_bytes > 0 {
            let frac = (bytes as f64 / self.total_bytes as f64).min(1.0);
            let filled = (frac * 24.0) as usize;
            let of = if self.total_blocks > 0 {
                format!("/{}", self.total_blocks)
            } else {
                String::new()
            };
            format!(
                "{} [{}{}] {:>3.0}% {blocks}{of} blocks, {} of {}, {rate}/s",
                self.label,
                "#".repeat(filled),
                ".".repeat(24 - filled),
                frac * 100.0,
                human(bytes),
                human(self.total_bytes)
            )
        } else {
            format!("{} {blocks} blocks, {}, {rate}/s", self.label, human(bytes))
        }
    }

    fn update(&mut self, blocks: u64, bytes: u64) {
        if !self.tty
            || self
                .drawn
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.drawn = Some(Instant::now());
        eprint!("\r\x1b[2K{}", self.line(blocks, bytes));
        let _ = std::io::stderr().flush();
    }

    fn finish(&mut self, blocks: u64, bytes: u64) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
        eprintln!(
            "{} in {:.1} s",
            self.line(blocks, bytes),
            self.started.elapsed().as_secs_f64()
        );
    }
}

// ---- drain ------------------------------------------------------------------

async fn drain(c: &mut Client) -> anyhow::Result<()> {
    let mut stream = c.drain().await?;
    let mut phase = pb::DrainPhase::Unspecified;
    let mut bar: Option<Progress> = None;
    let mut last: Option<pb::DrainProgress> = None;
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => return Err(Error::from(e).into()),
        };
        let p = pb::DrainPhase::try_from(msg.phase).unwrap_or(pb::DrainPhase::Unspecified);
        if p == pb::DrainPhase::WritingDown {
            let b = bar.get_or_insert_with(|| {
                Progress::new(
                    "writing DRAM down to NVMe",
                    msg.write_down_blocks,
                    msg.write_down_bytes,
                )
            });
            b.update(msg.written_blocks, msg.written_bytes);
        } else if let (Some(b), Some(l)) = (bar.as_mut(), last.as_ref())
            && phase == pb::DrainPhase::WritingDown
        {
            b.finish(l.written_blocks, l.written_bytes);
        }
        if p != phase && p != pb::DrainPhase::WritingDown {
            eprintln!("drain: {}", msg.detail);
        }
        phase = p;
        last = Some(msg);
    }
    let Some(l) = last.filter(|_| phase == pb::DrainPhase::Done) else {
        bail!("the daemon stopped answering before the drain was done; see its log");
    };
    println!(
        "drained: {} blocks written down to NVMe ({}), {} failed; {} blocks held only in DRAM are lost; stratad is exiting",
        l.written_blocks,
        human(l.written_bytes),
        l.write_failed_blocks,
        l.dram_only_blocks
    );
    Ok(())
}

// ---- export and import --------------------------------------------------------

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `FILE.partial`, where an export is written before it is complete.
fn partial_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

async fn export(c: &mut Client, ns: NamespaceId, out: &Path, force: bool) -> anyhow::Result<()> {
    if out.exists() && !force {
        bail!(
            "{} exists; choose another --out FILE, or pass --force to overwrite it",
            out.display()
        );
    }
    let mut stream = c.export_namespace(ns).await?;
    let tmp = partial_path(out);
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = async {
        let Some(ExportItem::Start {
            layout,
            blocks,
            bytes,
            ..
        }) = stream.next().await?
        else {
            bail!("the daemon's export did not begin with the namespace's layout");
        };
        let mut w = ExportWriter::new(
            std::io::BufWriter::with_capacity(4 << 20, file),
            &layout,
            unix_ms(),
        )?;
        let mut bar = Progress::new("export", blocks, bytes);
        let (mut n, mut b) = (0u64, 0u64);
        loop {
            match stream.next().await? {
                Some(ExportItem::Block { block, .. }) => {
                    w.block(&block.key, block.parent.as_ref(), &block.data)?;
                    n += 1;
                    b += block.data.len() as u64;
                    bar.update(n, b);
                }
                Some(ExportItem::End { skipped, .. }) => {
                    bar.finish(n, b);
                    let f = w.finish()?.into_inner().map_err(|e| e.into_error())?;
                    f.sync_all()?;
                    return Ok((n, b, skipped));
                }
                Some(ExportItem::Start { .. }) | None => {
                    bail!("the daemon's export stream is out of order")
                }
            }
        }
    }
    .await;
    match result {
        Ok((n, b, skipped)) => {
            std::fs::rename(&tmp, out)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))?;
            println!(
                "exported {n} blocks ({}) of namespace {ns} to {}{}",
                human(b),
                out.display(),
                if skipped > 0 {
                    format!("; {skipped} blocks went away during the export and are not in it")
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Blocks and bytes per Put stream of an import.
const IMPORT_BATCH_BLOCKS: usize = 64;
const IMPORT_BATCH_BYTES: usize = 32 << 20;

fn open_export(file: &Path) -> anyhow::Result<ExportReader<std::io::BufReader<std::fs::File>>> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    ExportReader::open(std::io::BufReader::with_capacity(4 << 20, f))
        .with_context(|| format!("{}: refused, nothing imported", file.display()))
}

async fn import(c: &mut Client, file: &Path) -> anyhow::Result<()> {
    // Pass 1: the whole file is checked before anything is stored, so a
    // truncated or damaged file imports nothing.
    let size = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    let mut r = open_export(file)?;
    let mut bar = Progress::new("checking", 0, size);
    let (mut blocks, mut bytes) = (0u64, 0u64);
    loop {
        match r.next_block() {
            Ok(Some(b)) => {
                blocks += 1;
                bytes += b.data.len() as u64;
                bar.update(blocks, r.offset());
            }
            Ok(None) => break,
            Err(e) => bail!(
                "{}: refused, nothing imported: {e}; export the namespace again",
                file.display()
            ),
        }
    }
    bar.finish(blocks, r.offset());
    let header = r.header().clone();
    // Pass 2: register the layout, then store through the normal put path
    // (each block verified by the daemon; blocks present are skipped).
    let reg = c.register_layout(&header.layout).await?;
    if reg.namespace != header.namespace {
        bail!(
            "the daemon registered the file's layout as namespace {}, the file says {}; is the daemon of another release?",
            reg.namespace,
            header.namespace
        );
    }
    let mut r = open_export(file)?;
    let mut bar = Progress::new("import", blocks, bytes);
    let (mut stored, mut present, mut done_bytes) = (0u64, 0u64, 0u64);
    let mut batch: Vec<PutBlock> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut flush = async |batch: &mut Vec<PutBlock>, stored: &mut u64, present: &mut u64| {
        if batch.is_empty() {
            return Ok::<(), anyhow::Error>(());
        }
        let out = c.put(header.namespace, batch).await.map_err(|e| {
            anyhow::Error::from(e).context(format!(
                "storing blocks into namespace {} ({} blocks were stored before these)",
                header.namespace,
                *stored + *present
            ))
        })?;
        for o in out {
            match o {
                PutResult::Stored => *stored += 1,
                PutResult::AlreadyPresent => *present += 1,
            }
        }
        batch.clear();
        Ok(())
    };
    loop {
        let b = match r.next_block() {
            Ok(Some(b)) => b,
            Ok(None) => break,
            // The file changed since it was checked.
            Err(e) => bail!(
                "{}: {e} (the file changed during the import; {} blocks were stored)",
                file.display(),
                stored + present
            ),
        };
        batch_bytes += b.data.len();
        done_bytes += b.data.len() as u64;
        batch.push(PutBlock {
            key: b.key,
            parent: b.parent,
            data: Bytes::from(b.data),
        });
        if batch.len() >= IMPORT_BATCH_BLOCKS || batch_bytes >= IMPORT_BATCH_BYTES {
            flush(&mut batch, &mut stored, &mut present).await?;
            batch_bytes = 0;
            bar.update(stored + present, done_bytes);
        }
    }
    flush(&mut batch, &mut stored, &mut present).await?;
    bar.finish(stored + present, done_bytes);
    println!(
        "imported {} blocks ({}) into namespace {}: {stored} stored, {present} already present",
        stored + present,
        human(bytes),
        header.namespace
    );
    Ok(())
}

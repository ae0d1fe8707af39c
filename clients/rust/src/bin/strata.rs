//! `strata`: command-line client of stratad.
//!
//! Output meant for scripts goes to stdout alone (`layout register` prints
//! the namespace id and nothing else); diagnostics go to stderr, and every
//! failure exits non-zero with what was wrong and what to do.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use strata_client::{Client, DEFAULT_ENDPOINT, Error, PutBlock, PutResult};
use strata_proto::{BlockKey, Dtype, KvKind, Layout, NamespaceId, TierKind};

#[derive(Parser, Debug)]
#[command(
    name = "strata",
    version,
    about = "Command-line client of stratad, the Strata KV-cache daemon"
)]
struct Cli {
    /// Daemon endpoint: http://host:port or unix:/path/to/stratad.sock.
    #[arg(long, global = true, default_value = DEFAULT_ENDPOINT)]
    endpoint: String,
    #[command(subcommand)]
    cmd: Cmd,
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
    /// Occupancy and counters per tier.
    Stats,
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
        Some(tonic::Code::ResourceExhausted) => {
            Some("the daemon is at a configured limit; retry later or raise it")
        }
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut c = Client::connect(&cli.endpoint).await?;
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
        Cmd::Stats => {
            let s = c.stats().await?;
            println!(
                "stratad {}: {} blocks, {} namespaces, {} leases, {} reservations",
                s.version, s.blocks, s.namespaces, s.leases, s.reservations
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
                let name = strata_proto::pb::Tier::try_from(t.tier)
                    .ok()
                    .and_then(|t| TierKind::try_from(t).ok())
                    .map_or("?", |t| t.name());
                let pct = if t.capacity_bytes > 0 {
                    100.0 * t.used_bytes as f64 / t.capacity_bytes as f64
                } else {
                    0.0
                };
                println!(
                    "{:<6} {:>14} {:>14} {:>5.1}% {:>9} {:>7} {:>10} {:>14} {:>14}",
                    name,
                    t.capacity_bytes,
                    t.used_bytes,
                    pct,
                    t.blocks,
                    t.pinned_blocks,
                    t.evictions,
                    t.bytes_in,
                    t.bytes_out
                );
            }
        }
    }
    Ok(())
}

//! `stratad`: parses flags, loads and validates the config, starts the
//! daemon, re-reads its tokens file on SIGHUP, and drains on SIGTERM,
//! Ctrl-C or `strata drain`, then exits 0. Everything else is the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use stratad::config::{ByteSize, Config, DEFAULT_CONFIG_TOML};

#[derive(Parser, Debug)]
#[command(
    name = "stratad",
    version,
    about = "Strata daemon: a tiered KV-cache block store for LLM inference engines",
    long_about = "Strata daemon: a tiered KV-cache block store for LLM inference engines.\n\n\
        With no arguments it runs on the embedded default configuration: a 1 GiB DRAM tier, \
        a 4 GiB NVMe tier in strata-data/nvme, \
        gRPC on 127.0.0.1:7470 and on strata-data/stratad.sock, the zero-copy arena socket \
        strata-data/stratad.sock.shm, and /metrics, /livez, /readyz on 127.0.0.1:7471. \
        Flags override the config file."
)]
struct Args {
    /// TOML config file; every field is optional (see --print-default-config).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// gRPC TCP address, e.g. 127.0.0.1:7470, or "off".
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// gRPC Unix socket path, or "off".
    #[arg(long, value_name = "PATH")]
    uds: Option<String>,
    /// Zero-copy arena hand-off socket path, or "off" (default: <uds>.shm).
    #[arg(long, value_name = "PATH")]
    shm_socket: Option<String>,
    /// Address of /metrics, /livez and /readyz, or "off".
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Directory for the sockets and the NVMe tier's segments.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Size of the DRAM tier, e.g. 512MiB, 4GiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    dram_bytes: Option<ByteSize>,
    /// Cap on the NVMe tier's segment files, e.g. 100GiB; 0 disables the tier.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    nvme_bytes: Option<ByteSize>,
    /// Log filter: error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Print the embedded default config (documented) and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse()
}

fn load(args: &Args) -> Result<Config, String> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::from_toml(DEFAULT_CONFIG_TOML)
            .map_err(|e| format!("embedded default config: {e}"))?,
    };
    if let Some(v) = &args.listen {
        cfg.server.listen = v.clone();
    }
    if let Some(v) = &args.uds {
        cfg.server.uds = v.clone();
    }
    if let Some(v) = &args.shm_socket {
        cfg.server.shm_socket = v.clone();
    }
    if let Some(v) = &args.metrics_listen {
        cfg.server.metrics_listen = v.clone();
    }
    if let Some(v) = &args.data_dir {
        cfg.data_dir = v.clone();
    }
    if let Some(v) = args.dram_bytes {
        cfg.tiers.dram.bytes = v;
    }
    if let Some(v) = args.nvme_bytes {
        cfg.tiers.nvme.bytes = v;
    }
    if let Some(v) = &args.log_level {
        cfg.log.level = v.clone();
    }
    cfg.resolve().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// Keeps freed buffers in the process instead of handing them back to the
/// kernel: gRPC messages are megabytes each, and with glibc's defaults (and
/// its per-thread arenas, which trim themselves) every one lands on fresh
/// pages that the kernel must fault in and zero: a fifth of the daemon's
/// time on the put path, and half its put throughput. One arena, no trimming
/// below 256 MiB, no mmap below 32 MiB. Memory stays bounded by the
/// configured limits on messages, streams and bytes in flight.
fn tune_allocator() {
    // SAFETY: mallopt only adjusts glibc's allocator parameters; called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let args = Args::parse();
    if args.print_default_config {
        print!("{DEFAULT_CONFIG_TOML}");
        return ExitCode::SUCCESS;
    }
    let cfg = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stratad: {e}");
            eprintln!(
                "stratad: see `stratad --print-default-config` for every field and its default"
            );
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("config ok");
        return ExitCode::SUCCESS;
    }
    let filter = match tracing_subscriber::EnvFilter::try_new(&cfg.log.level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "stratad: config: log.level: {:?} is not a valid filter: {e}",
                cfg.log.level
            );
            return ExitCode::from(2);
        }
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("stratad")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stratad: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let running = match stratad::server::start(&cfg).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("stratad: {e}");
                return ExitCode::FAILURE;
            }
        };
        let why = tokio::select! {
            _ = wait_for_signal() => "signal received",
            _ = running.drain_requested() => "drain requested (strata drain)",
            _ = reload_on_hangup(&running) => "SIGHUP cannot be watched",
        };
        tracing::info!("{why}: draining");
        running.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// Re-reads the tokens file on every SIGHUP (token rotation). Returns only
/// if SIGHUP cannot be watched.
async fn reload_on_hangup(running: &stratad::server::Running) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGHUP; the tokens file is read only at start");
            return std::future::pending().await;
        }
    };
    while hup.recv().await.is_some() {
        match running.reload_tokens() {
            Ok(n) => tracing::info!(tokens = n, "SIGHUP: tokens file re-read"),
            Err(e) => tracing::error!("SIGHUP: {e}; the tokens in use stay"),
        }
    }
    std::future::pending().await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; stopping only on Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

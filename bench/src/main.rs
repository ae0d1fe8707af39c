//! `strata-bench`: measures stratad against references taken in the same
//! run on the same machine, and prints ratios (absolute figures on shared
//! VMs move by tens of percent between runs; ratios move much less).
//!
//! Sections (all run by default; `--only` picks some):
//! * `zero-copy`: put and get through the shared arena ÷ single-thread
//!   memcpy of the same bytes between pre-faulted buffers.
//! * `grpc`: stream put and get over TCP loopback ÷ Redis SET and GET of
//!   the same values (redis-server started here, same concurrency and batch).
//! * `lookup`: in-process Lookup of 512-key chains against an index of 10M
//!   blocks: p50/p99 latency and index bytes per block (counted by a global
//!   allocator).
//! * `rss`: daemon resident memory after filling its DRAM tier twice ÷ the
//!   tier size.
//! * `attend`: Attend (dense, sparse, SparF) on synthetic heads: mass and
//!   relerr vs exact attention and the oracle, read%, dense scan rate ÷
//!   single-thread memory read, wire bytes ÷ the head's K+V
//!   (`attend-quality`), a decode step from NVMe (`attend-nvme`), near the
//!   data vs shipping K+V over a 2 GB/s link (`attend-link`); the dense
//!   scan alone with 300 calls, to profile (`attend-scan`, not in `attend`).
//! * `retrieval`: the RetrievalAttention index (pure compute): recall@100
//!   vs scan%, search latency vs the exact scan, output relerr beside the
//!   exact top-100; writes the data for the faiss baselines
//!   (`bench/retrieval/run` runs them and plots).
//!
//! Run with `bench/run` (release build, installs redis-server if missing).

mod alloc;
mod attend;
mod attend_io;
mod nvme;
mod redis;
mod retrieval;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use strata_client::{Client, LocalClient, LocalPut, PutBlock};
use strata_proto::{BlockKey, Dtype, KvKind, Layout};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

#[derive(Parser, Debug)]
#[command(
    name = "strata-bench",
    about = "Benchmarks of stratad against physical limits and peers"
)]
struct Args {
    /// Smaller working sets (for a smoke run); figures are less stable.
    #[arg(long)]
    quick: bool,
    /// Also the long sizes (retrieval: 128K tokens).
    #[arg(long)]
    long: bool,
    /// Retrieval: also real captured Q/K/V from this directory (testbed/capture).
    #[arg(long)]
    retrieval_real: Option<PathBuf>,
    /// Sections to run: latency, zero-copy, grpc, lookup, rss, nvme, attend (attend-quality, attend-nvme, attend-link; attend-scan alone), retrieval (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Block sizes in KiB.
    #[arg(long, value_delimiter = ',', default_values_t = vec![256u64, 2048])]
    sizes_kib: Vec<u64>,
    /// Bytes per call (one Put/Get stream, one zero-copy put or load, one
    /// Redis pipeline), MiB. 32 MiB is a 256-token prefix of an 8B model.
    #[arg(long, default_value_t = 32)]
    batch_mib: usize,
    /// Bytes of the full NVMe tier restarted by the `nvme` section, MiB
    /// (the figure is for 10 GiB: --restart-mib 10240).
    #[arg(long, default_value_t = 2048)]
    restart_mib: u64,
    /// Scratch directory for the `nvme` section (on the disk to measure;
    /// O_DIRECT must work there, so not tmpfs).
    #[arg(long, default_value = "bench/out/scratch")]
    scratch: PathBuf,
    /// I/O engine of the `nvme` section: auto, io_uring or psync.
    #[arg(long, default_value = "auto")]
    nvme_engine: String,
    /// Blocks in the lookup index.
    #[arg(long, default_value_t = 10_000_000)]
    lookup_blocks: u64,
    /// redis-server binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Where to write the report (markdown).
    #[arg(long, default_value = "bench/out")]
    out: PathBuf,
}

struct Report {
    lines: Vec<String>,
}

impl Report {
    fn section(&mut self, title: &str, header: &[&str]) {
        self.lines.push(String::new());
        self.lines.push(format!("### {title}"));
        self.lines.push(String::new());
        self.lines.push(format!("| {} |", header.join(" | ")));
        self.lines.push(format!(
            "|{}|",
            header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
        ));
        self.flush_last(5);
    }
    fn row(&mut self, cells: &[String]) {
        self.lines.push(format!("| {} |", cells.join(" | ")));
        self.flush_last(1);
    }
    fn note(&mut self, s: &str) {
        self.lines.push(String::new());
        self.lines.push(s.to_string());
        self.flush_last(2);
    }
    fn flush_last(&self, n: usize) {
        for l in &self.lines[self.lines.len() - n.min(self.lines.len())..] {
            println!("{l}");
        }
    }
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn f2(x: f64) -> String {
    format!("{x:.2}")
}

/// A page-aligned buffer, like an engine's pinned host buffers.
struct PageBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a plain owned allocation.
unsafe impl Send for PageBuf {}
unsafe impl Sync for PageBuf {}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: allocated with `len` bytes in `filled`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        let l = std::alloc::Layout::from_size_align(self.len.max(1), 4096).expect("layout");
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, l) };
    }
}

/// A page-aligned buffer of non-repeating bytes (every page touched).
fn filled(len: usize, seed: u64) -> PageBuf {
    let l = std::alloc::Layout::from_size_align(len.max(1), 4096).expect("layout");
    // SAFETY: non-zero size.
    let ptr = unsafe { std::alloc::alloc(l) };
    assert!(!ptr.is_null(), "out of memory");
    let mut v = PageBuf { ptr, len };
    let mut x = seed | 1;
    for w in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        w.copy_from_slice(&b[..w.len()]);
    }
    v
}

/// A layout whose full block is `bytes` (f16, 16 tokens, 2 KV heads, head
/// dim 128: 8 KiB per token-layer pair; layers chosen to fit).
fn layout_for(bytes: u64, tag: &str) -> Layout {
    let per_layer = 16 * 2 * 2 * 128 * 2; // tokens x K,V x heads x dim x f16
    assert_eq!(
        bytes % per_layer,
        0,
        "block size must be a multiple of {per_layer}"
    );
    Layout {
        model_id: format!("bench/{tag}/{bytes}"),
        dtype: Dtype::F16,
        num_layers: (bytes / per_layer) as u32,
        num_kv_heads: 2,
        head_dim: 128,
        tokens_per_block: 16,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    }
}

fn key(round: u32, i: u32, tag: u8) -> BlockKey {
    let mut k = [0u8; 16];
    k[0] = tag;
    k[4..8].copy_from_slice(&round.to_be_bytes());
    k[8..12].copy_from_slice(&i.to_be_bytes());
    BlockKey::new(&k).expect("16-byte key")
}

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    /// The daemon's arguments, for [`Daemon::restart`].
    args: Vec<std::ffi::OsString>,
}

impl Daemon {
    fn start(dram: &str) -> Result<Daemon> {
        Self::start_with(dram, "")
    }

    /// With `config` (TOML) on top of the embedded defaults.
    fn start_with(dram: &str, config: &str) -> Result<Daemon> {
        let exe = std::env::current_exe()?;
        let stratad = exe.with_file_name("stratad");
        if !stratad.exists() {
            bail!(
                "{} is missing; run `cargo build --release --bins` (bench/run does)",
                stratad.display()
            );
        }
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mport = free_port()?;
        let mut args: Vec<std::ffi::OsString> = vec![stratad.into()];
        // A bench daemon stops without writing its DRAM blocks down to NVMe
        // (the drain's default), so that stopping one is not timed into
        // the next section.
        let config = if config.contains("drain_write_down") {
            config.to_string()
        } else if config.contains("[tiers.nvme]\n") {
            config.replace("[tiers.nvme]\n", "[tiers.nvme]\ndrain_write_down = false\n")
        } else {
            format!("{config}\n[tiers.nvme]\ndrain_write_down = false\n")
        };
        let file = dir.path().join("bench.toml");
        std::fs::write(&file, config)?;
        args.extend(["--config".into(), file.into()]);
        args.extend(["--dram-bytes".into(), dram.into(), "--data-dir".into()]);
        args.push(dir.path().into());
        args.extend([
            "--listen".into(),
            format!("127.0.0.1:{port}").into(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{mport}").into(),
            "--log-level".into(),
            "warn".into(),
        ]);
        let child = Self::spawn(&args)?;
        let d = Daemon {
            child,
            dir,
            port,
            args,
        };
        d.wait_ready()?;
        Ok(d)
    }

    fn spawn(args: &[std::ffi::OsString]) -> Result<Child> {
        Command::new(&args[0])
            .args(&args[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting stratad")
    }

    fn wait_ready(&self) -> Result<()> {
        let t = Instant::now();
        while !self.uds().exists()
            || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
        {
            if t.elapsed() > Duration::from_secs(120) {
                bail!("stratad did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops the daemon (SIGTERM) and starts it again on the same
    /// directory: what was on NVMe comes back NVMe-only.
    fn restart(&mut self) -> Result<()> {
        self.stop();
        let _ = std::fs::remove_file(self.uds());
        self.child = Self::spawn(&self.args)?;
        self.wait_ready()
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    fn uds(&self) -> PathBuf {
        self.dir.path().join("stratad.sock")
    }
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn rss(&self) -> Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("VmRSS")?;
        Ok(kb * 1024)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn main() -> Result<()> {
    // Same allocator settings as stratad (see daemon/src/main.rs): keep
    // freed megabyte buffers instead of faulting in fresh pages for every
    // message. Applies equally to the Strata and Redis clients below.
    // SAFETY: adjusts glibc's allocator parameters before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let args = Args::parse();
    let want = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rep = Report { lines: vec![] };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l[l.find(':').map_or(0, |i| i + 2)..].to_string())
        })
        .unwrap_or_default();
    rep.note(&format!(
        "strata-bench {}: {} cores ({cpu}), {}",
        if args.quick { "--quick" } else { "" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        String::from_utf8_lossy(&Command::new("date").arg("-u").output()?.stdout).trim()
    ));
    let sizes: Vec<u64> = args.sizes_kib.iter().map(|k| k << 10).collect();
    if want("latency") {
        rt.block_on(rpc_latency(&mut rep))?;
    }
    if want("zero-copy") {
        rt.block_on(zero_copy(
            &mut rep,
            &sizes,
            args.quick,
            args.batch_mib << 20,
        ))?;
    }
    if want("grpc") {
        rt.block_on(grpc_vs_redis(
            &mut rep,
            &sizes,
            args.quick,
            &args.redis_server,
            args.batch_mib << 20,
        ))?;
    }
    if want("lookup") {
        lookup(
            &mut rep,
            if args.quick {
                1_000_000
            } else {
                args.lookup_blocks
            },
        )?;
    }
    if want("rss") {
        rt.block_on(rss(&mut rep, args.quick))?;
    }
    if want("nvme") {
        let restart = if args.quick { 256 } else { args.restart_mib } << 20;
        let engine =
            stratad::tier::nvme::engine::EngineKind::parse(&args.nvme_engine).ok_or_else(|| {
                anyhow::anyhow!(
                    "--nvme-engine {:?}: expected auto, io_uring or psync",
                    args.nvme_engine
                )
            })?;
        rt.block_on(nvme::nvme(
            &mut rep,
            args.quick,
            restart,
            &args.scratch,
            engine,
        ))?;
    }
    // `attend` runs its three parts; each can be picked alone.
    if want("attend") || want("attend-quality") {
        rt.block_on(attend::attend(&mut rep, args.quick))?;
    }
    if args.only.iter().any(|o| o == "attend-scan") {
        rt.block_on(attend::scan_only(&mut rep, args.quick))?;
    }
    if want("attend") || want("attend-nvme") {
        rt.block_on(attend_io::nvme_steps(&mut rep, args.quick))?;
    }
    if want("attend") || want("attend-link") {
        rt.block_on(attend_io::near_vs_ship(&mut rep, args.quick))?;
    }
    if want("retrieval") {
        retrieval::retrieval(&mut rep, &args.out, args.quick, args.long)?;
        if let Some(dir) = &args.retrieval_real {
            retrieval::retrieval_real(&mut rep, dir)?;
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("core.md");
    std::fs::write(&path, rep.lines.join("\n") + "\n")?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// Best-of-`reps` memcpy of `n` blocks of `size` from `src` to `dst`.
fn memcpy_rate(src: &[u8], dst: &mut [u8], size: usize, reps: usize) -> f64 {
    let mut best = 0.0f64;
    for _ in 0..reps {
        let t = Instant::now();
        for (s, d) in src.chunks(size).zip(dst.chunks_mut(size)) {
            d.copy_from_slice(s);
        }
        std::hint::black_box(&dst);
        best = best.max(gbps(src.len() as u64, t.elapsed()));
    }
    best
}

/// Round-trip latency of a small call (Lookup of one key) over each transport.
async fn rpc_latency(rep: &mut Report) -> Result<()> {
    let d = Daemon::start("64MiB")?;
    rep.section(
        "Small-call latency (Lookup of one key)",
        &["transport", "p50 µs", "p99 µs"],
    );
    for (name, ep) in [
        ("TCP loopback", d.endpoint()),
        ("Unix socket", format!("unix:{}", d.uds().display())),
    ] {
        let mut c = Client::connect(&ep).await?;
        let ns = c
            .register_layout(&layout_for(16384, "lat"))
            .await?
            .namespace;
        let k = [key(0, 0, 1)];
        let mut lat = Vec::with_capacity(2000);
        for _ in 0..2000 {
            let t = Instant::now();
            c.lookup(ns, &k, 0).await?;
            lat.push(t.elapsed());
        }
        lat.sort();
        rep.row(&[
            name.into(),
            format!("{:.0}", lat[1000].as_secs_f64() * 1e6),
            format!("{:.0}", lat[1980].as_secs_f64() * 1e6),
        ]);
    }
    Ok(())
}

async fn zero_copy(rep: &mut Report, sizes: &[u64], quick: bool, batch_bytes: usize) -> Result<()> {
    let d = Daemon::start("1GiB")?;
    let working: usize = if quick { 128 << 20 } else { 384 << 20 };
    let reps = 3;
    rep.section(
        "Zero-copy data plane vs single-thread memcpy (same bytes, pre-faulted page-aligned buffers)",
        &[
            "block",
            "memcpy GB/s",
            "put GB/s",
            "put ÷ memcpy",
            "get GB/s",
            "get ÷ memcpy",
        ],
    );
    let src = filled(working, 1);
    let mut dst = filled(working, 2);
    for &size in sizes {
        let size = size as usize;
        let n = working / size;
        let mut lc = LocalClient::connect(d.uds()).await?;
        let ns = lc
            .client()
            .register_layout(&layout_for(size as u64, "zc"))
            .await?
            .namespace;
        let batch = (batch_bytes / size).max(1);
        let mem = memcpy_rate(&src, &mut dst, size, reps);
        let mut put_best = 0.0f64;
        let mut get_best = 0.0f64;
        for round in 0..reps as u32 {
            let keys: Vec<BlockKey> = (0..n as u32).map(|i| key(round, i, size as u8)).collect();
            let t = Instant::now();
            for (b, ks) in keys.chunks(batch).enumerate() {
                let puts: Vec<_> = ks
                    .iter()
                    .enumerate()
                    .map(|(j, k)| {
                        let i = b * batch + j;
                        LocalPut {
                            key: *k,
                            parent: None,
                            data: &src[i * size..(i + 1) * size],
                        }
                    })
                    .collect();
                lc.put(ns, &puts).await?;
            }
            put_best = put_best.max(gbps((n * size) as u64, t.elapsed()));
            let t = Instant::now();
            for (b, ks) in keys.chunks(batch).enumerate() {
                let region = &mut dst[b * batch * size..((b * batch + ks.len()) * size)];
                let mut outs: Vec<&mut [u8]> = region.chunks_mut(size).collect();
                let got = lc.load_prefix(ns, ks, &mut outs).await?;
                if got.len() != ks.len() {
                    bail!(
                        "zero-copy get returned {} of {} blocks",
                        got.len(),
                        ks.len()
                    );
                }
            }
            get_best = get_best.max(gbps((n * size) as u64, t.elapsed()));
            if dst[..n * size] != src[..n * size] {
                bail!("zero-copy get returned different bytes");
            }
        }
        rep.row(&[
            format!("{} KiB", size >> 10),
            f2(mem),
            f2(put_best),
            f2(put_best / mem),
            f2(get_best),
            f2(get_best / mem),
        ]);
    }
    rep.note(&format!(
        "Working set {} MiB per size, {} MiB per call, best of {reps} rounds each; puts include the client's checksum and the daemon's verification before publish, gets the client's verification of its copy.",
        working >> 20,
        batch_bytes >> 20
    ));
    Ok(())
}

async fn grpc_vs_redis(
    rep: &mut Report,
    sizes: &[u64],
    quick: bool,
    redis_bin: &str,
    batch_bytes: usize,
) -> Result<()> {
    let d = Daemon::start("1GiB")?;
    let redis = redis::Server::start(redis_bin)?;
    let working: usize = if quick { 64 << 20 } else { 256 << 20 };
    let conns = 4usize;
    rep.section(
        "gRPC stream over TCP loopback vs Redis 7 SET/GET (same values, 4 connections, same batch)",
        &[
            "block",
            "Strata put GB/s",
            "Redis SET GB/s",
            "put ÷ SET",
            "Strata get GB/s",
            "Redis GET GB/s",
            "get ÷ GET",
        ],
    );
    let src = Arc::new(filled(working, 3));
    for &size in sizes {
        let size = size as usize;
        let n = working / size;
        let per_conn = n / conns;
        let batch = (batch_bytes / size).max(1);
        let ns = Client::connect(&d.endpoint())
            .await?
            .register_layout(&layout_for(size as u64, "grpc"))
            .await?
            .namespace;
        let mut best = [0.0f64; 4];
        for round in 0..3u32 {
            // Strata put.
            let t = Instant::now();
            let mut tasks = vec![];
            for c in 0..conns {
                let (ep, src) = (d.endpoint(), src.clone());
                tasks.push(tokio::spawn(async move {
                    let mut cl = Client::connect(&ep).await?;
                    let idx: Vec<usize> = (c * per_conn..(c + 1) * per_conn).collect();
                    for b in idx.chunks(batch) {
                        let blocks: Vec<PutBlock> = b
                            .iter()
                            .map(|&i| PutBlock {
                                key: key(round, i as u32, 0x60 + size as u8),
                                parent: None,
                                data: Bytes::copy_from_slice(&src[i * size..(i + 1) * size]),
                            })
                            .collect();
                        cl.put(ns, &blocks).await?;
                    }
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            best[0] = best[0].max(gbps((per_conn * conns * size) as u64, t.elapsed()));
            // Redis SET.
            let t = Instant::now();
            let mut tasks = vec![];
            for c in 0..conns {
                let (addr, src) = (redis.addr, src.clone());
                tasks.push(tokio::spawn(async move {
                    let mut r = redis::Conn::connect(addr).await?;
                    let idx: Vec<usize> = (c * per_conn..(c + 1) * per_conn).collect();
                    for b in idx.chunks(batch) {
                        let kv: Vec<(String, &[u8])> = b
                            .iter()
                            .map(|&i| {
                                (
                                    format!("k{round}:{size}:{i}"),
                                    &src[i * size..(i + 1) * size],
                                )
                            })
                            .collect();
                        r.set_batch(&kv).await?;
                    }
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            best[1] = best[1].max(gbps((per_conn * conns * size) as u64, t.elapsed()));
            // Strata get.
            let t = Instant::now();
            let mut tasks = vec![];
            for c in 0..conns {
                let ep = d.endpoint();
                tasks.push(tokio::spawn(async move {
                    let mut cl = Client::connect(&ep).await?;
                    let idx: Vec<usize> = (c * per_conn..(c + 1) * per_conn).collect();
                    let mut bytes = 0usize;
                    for b in idx.chunks(batch) {
                        let keys: Vec<_> = b
                            .iter()
                            .map(|&i| key(round, i as u32, 0x60 + size as u8))
                            .collect();
                        for blk in cl.get(ns, &keys, None).await? {
                            bytes += blk.data.len();
                        }
                    }
                    anyhow::Ok(bytes)
                }));
            }
            let mut got = 0;
            for t in tasks {
                got += t.await??;
            }
            best[2] = best[2].max(gbps(got as u64, t.elapsed()));
            // Redis GET.
            let t = Instant::now();
            let mut tasks = vec![];
            for c in 0..conns {
                let addr = redis.addr;
                tasks.push(tokio::spawn(async move {
                    let mut r = redis::Conn::connect(addr).await?;
                    let idx: Vec<usize> = (c * per_conn..(c + 1) * per_conn).collect();
                    let mut bufs = vec![vec![0u8; size]; batch];
                    let mut bytes = 0usize;
                    for b in idx.chunks(batch) {
                        let keys: Vec<String> =
                            b.iter().map(|&i| format!("k{round}:{size}:{i}")).collect();
                        bytes += r.get_batch(&keys, &mut bufs).await?;
                    }
                    anyhow::Ok(bytes)
                }));
            }
            let mut got = 0;
            for t in tasks {
                got += t.await??;
            }
            best[3] = best[3].max(gbps(got as u64, t.elapsed()));
            redis.flush().await?;
        }
        rep.row(&[
            format!("{} KiB", size >> 10),
            f2(best[0]),
            f2(best[1]),
            f2(best[0] / best[1]),
            f2(best[2]),
            f2(best[3]),
            f2(best[2] / best[3]),
        ]);
    }
    rep.note(&format!(
        "Working set {} MiB per size, {conns} connections, {} MiB per call (Strata: blocks per Put/Get stream; Redis: pipelined commands), best of 3 rounds. Strata gets verify every block's checksum on arrival; the Redis client does not.",
        working >> 20,
        batch_bytes >> 20
    ));
    Ok(())
}

fn lookup(rep: &mut Report, blocks: u64) -> Result<()> {
    rep.section(
        "Lookup of 512-key chains, in process",
        &[
            "chains stored",
            "blocks indexed",
            "p50 µs",
            "p99 µs",
            "max µs",
            "index bytes/block",
            "build rate (blocks/s)",
        ],
    );
    for interleave in [1u64, 64] {
        lookup_once(rep, blocks, interleave)?;
    }
    rep.note(
        "20000 lookups of whole chains (all 512 keys hit, each hit touched for LRU) over 64 random chains. \"one by one\": each chain's blocks were stored in one go (an engine storing a request), so they sit in consecutive index slots and a lookup walks them in order; \"interleaved\": 64 chains stored round-robin, so every key is a hash-table probe. Index bytes = memory allocated while building (hash table, block records, eviction heap) ÷ blocks; the arena is not counted.",
    );
    Ok(())
}

/// Builds an index of `blocks` blocks in 512-block chains, storing
/// `interleave` chains round-robin, then times lookups of whole chains.
fn lookup_once(rep: &mut Report, blocks: u64, interleave: u64) -> Result<()> {
    use stratad::metrics::{Registry, StoreMetrics};
    use stratad::store::{Reserve, Store, StoreConfig, SystemClock};
    use stratad::tier::{DramConfig, DramTier};
    let chain = 512u64;
    // 16-byte blocks (one f16 token of a 1-layer, 1-head, dim-4 layout).
    let layout = Layout {
        model_id: "bench/lookup".into(),
        dtype: Dtype::F16,
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 4,
        tokens_per_block: 1,
        kv_kind: KvKind::Separate,
        tp_rank: 0,
        tp_size: 1,
        tenant_salt: vec![],
    };
    let block = layout.block_bytes();
    let mem0 = alloc::current() + stratad::store::huge::mapped_bytes();
    let dram = DramTier::new(&DramConfig {
        bytes: blocks * block + (1 << 20),
        granule_bytes: block,
        prefault: true,
    })?;
    let cfg = StoreConfig {
        max_blocks: blocks as usize + 1,
        ..StoreConfig::default()
    };
    let store = Arc::new(Store::new(
        cfg,
        dram,
        None,
        block,
        Arc::new(SystemClock),
        StoreMetrics::new(&Registry::new()),
    ));
    let (ns, _) = store.register_layout(layout);
    let data = [7u8; 16];
    let sum = strata_proto::checksum(&data);
    let chains = blocks / chain / interleave * interleave;
    let kk = |c: u64, i: u64| {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&c.to_be_bytes());
        k[8..].copy_from_slice(&i.to_be_bytes());
        BlockKey::new(&k).expect("key")
    };
    let t = Instant::now();
    for group in (0..chains).step_by(interleave as usize) {
        for i in 0..chain {
            for c in group..group + interleave {
                let parent = (i > 0).then(|| kk(c, i - 1));
                match store.reserve(ns, kk(c, i), parent, 16, sum, 0)? {
                    Reserve::Slot(mut s) => {
                        s.bytes_mut().copy_from_slice(&data);
                        store.publish(s, sum)?;
                    }
                    Reserve::Present(_) => bail!("duplicate key"),
                }
            }
        }
    }
    let build = t.elapsed();
    let indexed = store.stats().blocks;
    let mem = (alloc::current() + stratad::store::huge::mapped_bytes()).saturating_sub(mem0);
    let mut lat = Vec::new();
    let mut x = 0x9e3779b97f4a7c15u64;
    let n_lookups = 20_000;
    let mut reqs = Vec::with_capacity(64);
    for _ in 0..64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let c = x % chains;
        let keys: Vec<BlockKey> = (0..chain).map(|i| kk(c, i)).collect();
        reqs.push(strata_proto::convert::LookupReq {
            namespace: ns,
            keys,
            lease_ttl_ms: 0,
            want_slots: false,
        });
    }
    for i in 0..n_lookups {
        let r = &reqs[i % reqs.len()];
        let t = Instant::now();
        let got = store.lookup(r)?;
        lat.push(t.elapsed());
        if got.hits as u64 != chain {
            bail!("lookup found {} of {chain}", got.hits);
        }
    }
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;
    rep.row(&[
        if interleave == 1 {
            "one by one".into()
        } else {
            format!("{interleave} interleaved")
        },
        indexed.to_string(),
        format!("{:.1}", p(0.5)),
        format!("{:.1}", p(0.99)),
        format!("{:.1}", p(1.0)),
        format!("{:.1}", mem as f64 / indexed as f64),
        format!("{:.0}", indexed as f64 / build.as_secs_f64()),
    ]);
    Ok(())
}

async fn rss(rep: &mut Report, quick: bool) -> Result<()> {
    let tier: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let d = Daemon::start(&format!("{}MiB", tier >> 20))?;
    let size = 256usize << 10;
    let mut lc = LocalClient::connect(d.uds()).await?;
    let ns = lc
        .client()
        .register_layout(&layout_for(size as u64, "rss"))
        .await?
        .namespace;
    let src = filled(8 << 20, 9);
    let n = (2 * tier as usize) / size;
    let batch = 32;
    let mut i = 0u32;
    while (i as usize) < n {
        let puts: Vec<_> = (0..batch)
            .map(|j| LocalPut {
                key: key(7, i + j, 0x77),
                parent: (i + j > 0).then(|| key(7, i + j - 1, 0x77)),
                data: &src[(j as usize) * size..(j as usize + 1) * size],
            })
            .collect();
        lc.put(ns, &puts).await?;
        i += batch;
    }
    let st = lc.client().stats().await?;
    let rss = d.rss()?;
    rep.section(
        "Resident memory after filling the DRAM tier twice over",
        &[
            "tier",
            "bytes written",
            "evictions",
            "daemon RSS",
            "RSS ÷ tier",
        ],
    );
    rep.row(&[
        format!("{} MiB", tier >> 20),
        format!("{} MiB", (n * size) >> 20),
        st.tiers.first().map_or(0, |t| t.evictions).to_string(),
        format!("{} MiB", rss >> 20),
        f2(rss as f64 / tier as f64),
    ]);
    Ok(())
}

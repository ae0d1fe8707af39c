//! The NVMe tier against the raw disk, on the same filesystem in the same
//! run: sequential record writes and reads ÷ plain O_DIRECT sequential I/O
//! of the same sizes; random 256 KiB record reads at queue depth 32 ÷ plain
//! O_DIRECT random reads at the same depth (32 threads of pread); and a
//! warm restart of a full tier ÷ a sequential O_DIRECT read of its bytes.
//!
//! The raw references use std and O_DIRECT only (no Strata code), so they
//! measure the disk, not our engine.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use strata_proto::{BlockKey, NamespaceId};
use stratad::metrics::{Registry, StoreMetrics};
use stratad::store::{Store, StoreConfig, SystemClock, tiering};
use stratad::tier::nvme::buf::{BufPool, IoBuf};
use stratad::tier::nvme::engine::{EngineKind, open_engine};
use stratad::tier::nvme::format::{RecordHeader, RecordKind, record_span};
use stratad::tier::nvme::{Expect, Loc, NvmeConfig, NvmeTier};
use stratad::tier::{DramConfig, DramTier};

use super::{Report, f2, filled, gbps};

fn tier_cfg(dir: &Path, cap: u64, engine: EngineKind) -> NvmeConfig {
    NvmeConfig {
        dir: dir.to_path_buf(),
        capacity_bytes: cap,
        segment_bytes: 256 << 20,
        engine,
        queue_depth: 32,
        io_buffer_bytes: (2 << 20) + 4096,
        io_buffers: 40,
        fence_after_errors: 8,
        sync_writes: false,
    }
}

fn open_tier(dir: &Path, cap: u64, engine: EngineKind) -> Result<Arc<NvmeTier>> {
    let cfg = tier_cfg(dir, cap, engine);
    let pool = BufPool::new(cfg.io_buffer_bytes, cfg.io_buffers);
    let engine = open_engine(cfg.engine, cfg.queue_depth, Some(&pool))?;
    Ok(NvmeTier::open(cfg, engine, pool)?.0)
}

/// Rounds of each paired measurement.
const ROUNDS: usize = 5;

/// Paired throughputs, one (tier, raw) pair per round.
#[derive(Default)]
struct Paired {
    tier: Vec<f64>,
    raw: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl Paired {
    fn push(&mut self, tier: f64, raw: f64) {
        self.tier.push(tier);
        self.raw.push(raw);
    }

    fn row(&self, test: &str, size: usize) -> Vec<String> {
        let ratios: Vec<f64> = self
            .tier
            .iter()
            .zip(&self.raw)
            .map(|(t, r)| t / r)
            .collect();
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        vec![
            test.into(),
            format!("{} KiB", size >> 10),
            f2(median(self.tier.clone())),
            f2(median(self.raw.clone())),
            f2(median(ratios)),
            format!("{}–{}", f2(lo), f2(hi)),
        ]
    }
}

fn header(i: u64, len: usize, checksum: u64) -> RecordHeader {
    RecordHeader {
        kind: RecordKind::Block,
        namespace: NamespaceId(0xbe9c),
        seq: i + 1,
        segment: 0,
        key: BlockKey::new(&i.to_be_bytes()).expect("8-byte key"),
        parent: None,
        len: len as u32,
        checksum,
        payload_offset: 0, // set by append
    }
}

/// Appends `n` records of `size`, `qd` at a time; returns their locations.
async fn write_records(
    tier: &Arc<NvmeTier>,
    size: usize,
    n: u64,
    qd: usize,
    data: &[u8],
) -> Result<Vec<Loc>> {
    let sum = strata_proto::checksum(&data[..size]);
    let locs = futures_util::stream::iter(0..n)
        .map(|i| {
            let tier = tier.clone();
            async move { tier.append(header(i, size, sum), &data[..size]).await }
        })
        .buffered(qd)
        .collect::<Vec<_>>()
        .await;
    locs.into_iter().map(|r| r.context("nvme append")).collect()
}

async fn read_records(
    tier: &Arc<NvmeTier>,
    locs: &[Loc],
    order: &[usize],
    size: usize,
    sum: u64,
    qd: usize,
) -> Result<()> {
    let results = futures_util::stream::iter(order.iter().copied())
        .map(|i| {
            let tier = tier.clone();
            let loc = locs[i];
            async move {
                let seg = tier.file_of(loc).context("segment")?;
                let expect = Expect {
                    namespace: NamespaceId(0xbe9c),
                    key: header(i as u64, size, sum).key,
                    len: size as u32,
                    checksum: sum,
                };
                tier.read(&seg, loc, &expect)
                    .await
                    .context("nvme read")
                    .map(drop)
            }
        })
        .buffer_unordered(qd)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().collect()
}

/// Raw sequential O_DIRECT writes of `n` chunks of `span`, `qd` threads
/// writing interleaved offsets (same bytes, same depth as the tier).
fn raw_write(path: &Path, span: usize, n: u64, qd: usize) -> Result<Duration> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    // Allocated up front, as the tier allocates its segments.
    // SAFETY: a valid descriptor; plain integer arguments.
    if unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            (span as u64 * n) as libc::off_t,
        )
    } != 0
    {
        f.set_len(span as u64 * n)?;
    }
    let f = Arc::new(f);
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let mut hs = vec![];
        for th in 0..qd {
            let f = f.clone();
            hs.push(s.spawn(move || -> Result<()> {
                let mut buf = IoBuf::alloc(span);
                buf.fill(7);
                let mut i = th as u64;
                while i < n {
                    f.write_all_at(&buf, i * span as u64)?;
                    i += qd as u64;
                }
                Ok(())
            }));
        }
        for h in hs {
            h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        Ok(())
    })?;
    Ok(t.elapsed())
}

/// Raw O_DIRECT reads of chunks at `offsets`, `qd` threads.
fn raw_read(path: &Path, span: usize, offsets: &[u64], qd: usize) -> Result<Duration> {
    let f = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?,
    );
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let mut hs = vec![];
        for th in 0..qd {
            let f = f.clone();
            hs.push(s.spawn(move || -> Result<()> {
                let mut buf = IoBuf::alloc(span);
                let mut i = th;
                while i < offsets.len() {
                    f.read_exact_at(&mut buf, offsets[i])?;
                    i += qd;
                }
                Ok(())
            }));
        }
        for h in hs {
            h.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
        }
        Ok(())
    })?;
    Ok(t.elapsed())
}

pub async fn nvme(
    rep: &mut Report,
    quick: bool,
    restart_bytes: u64,
    scratch: &Path,
    engine: EngineKind,
) -> Result<()> {
    std::fs::create_dir_all(scratch)?;
    let root = tempfile::tempdir_in(scratch).with_context(|| {
        format!(
            "a scratch directory in {} (must support O_DIRECT)",
            scratch.display()
        )
    })?;
    let total: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let qd = 16;
    rep.section(
        "NVMe tier vs raw O_DIRECT on the same filesystem",
        &[
            "test",
            "block",
            "tier GB/s",
            "raw GB/s",
            "tier ÷ raw",
            "ratio min–max",
        ],
    );
    let data = filled(2 << 20, 11);
    for size in [256usize << 10, 2 << 20] {
        let n = total / size as u64;
        let span = record_span(size);
        let dir = root.path().join(format!("tier-{size}"));
        let tier = open_tier(&dir, total * (ROUNDS as u64 + 1), engine)?;
        let sum = strata_proto::checksum(&data[..size]);
        // Each round measures the raw reference and then the tier, back to
        // back; the figure is the median of the rounds' ratios (the shared
        // disk's speed moves by tens of percent from one second to the next).
        let raw_path = root.path().join(format!("raw-{size}"));
        let mut w = Paired::default();
        let mut locs = Vec::new();
        for round in 0..ROUNDS {
            let mut raw = 0.0;
            if round % 2 == 0 {
                raw = gbps(n * size as u64, raw_write(&raw_path, span, n, qd)?);
            }
            let t = Instant::now();
            locs = write_records(&tier, size, n, qd, &data).await?;
            let tier_gbps = gbps(n * size as u64, t.elapsed());
            if round % 2 == 1 {
                raw = gbps(n * size as u64, raw_write(&raw_path, span, n, qd)?);
            }
            w.push(tier_gbps, raw);
        }
        rep.row(&w.row("sequential write", size));
        // Sequential read (in write order).
        let offsets: Vec<u64> = (0..n).map(|i| i * span as u64).collect();
        let order: Vec<usize> = (0..n as usize).collect();
        let mut r = Paired::default();
        for round in 0..ROUNDS {
            let raw = || raw_read(&raw_path, span, &offsets, qd).map(|d| gbps(n * size as u64, d));
            let first = if round % 2 == 0 { raw()? } else { 0.0 };
            let t = Instant::now();
            read_records(&tier, &locs, &order, size, sum, qd).await?;
            let tier_gbps = gbps(n * size as u64, t.elapsed());
            r.push(tier_gbps, if round % 2 == 0 { first } else { raw()? });
        }
        rep.row(&r.row("sequential read", size));
        if size == 256 << 10 {
            // Random reads at queue depth 32.
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let order: Vec<usize> = (0..n as usize)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % n) as usize
                })
                .collect();
            let offsets: Vec<u64> = order.iter().map(|&i| i as u64 * span as u64).collect();
            let mut rr = Paired::default();
            for round in 0..ROUNDS {
                let raw =
                    || raw_read(&raw_path, span, &offsets, 32).map(|d| gbps(n * size as u64, d));
                let first = if round % 2 == 0 { raw()? } else { 0.0 };
                let t = Instant::now();
                read_records(&tier, &locs, &order, size, sum, 32).await?;
                let tier_gbps = gbps(n * size as u64, t.elapsed());
                rr.push(tier_gbps, if round % 2 == 0 { first } else { raw()? });
            }
            rep.row(&rr.row("random read, QD 32", size));
        }
        drop(tier);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&raw_path);
    }
    rep.note(&format!(
        "{} MiB per size and round; {ROUNDS} rounds, each the raw reference and the tier back to back, which goes first alternating (the disk may run faster after a pause); the figures are medians, the ratio the median of the rounds' ratios; {qd} I/Os in flight (32 for random reads), records of one block each (128-byte header, payload from byte 4096 (format v2: page multiples), padded to 4 KiB), every tier read checked (header, key, payload checksum). Raw: std pwrite/pread with O_DIRECT from as many threads as I/Os in flight, same offsets and sizes, into a file allocated up front (fallocate, as the tier's segments). Engine: {}.",
        total >> 20,
        open_tier(&root.path().join("probe"), 1 << 30, engine)?.engine_name()
    ));

    // Warm restart of a full tier.
    let dir = root.path().join("restart");
    let tier = open_tier(&dir, restart_bytes + (512 << 20), engine)?;
    let size = 2usize << 20;
    let n = restart_bytes / record_span(size) as u64;
    write_records(&tier, size, n, qd, &data).await?;
    drop(tier);
    let segs: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    let on_disk: u64 = segs
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    // Reference: read every segment file sequentially, 8 MiB at a time.
    let t = Instant::now();
    for p in &segs {
        let len = std::fs::metadata(p)?.len();
        let chunk = 8 << 20;
        let offsets: Vec<u64> = (0..len.div_ceil(chunk)).map(|i| i * chunk).collect();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(p)?;
        let mut buf = IoBuf::alloc(chunk as usize);
        for o in offsets {
            let want = (len - o).min(chunk) as usize;
            f.read_exact_at(&mut buf[..want], o)?;
        }
    }
    let raw = t.elapsed();
    // The daemon's start: open, scan every record (checksums included),
    // rebuild the index.
    let t = Instant::now();
    let tier = open_tier(&dir, restart_bytes + (512 << 20), engine)?;
    let dram = DramTier::new(&DramConfig {
        bytes: 64 << 20,
        granule_bytes: 4096,
        prefault: false,
    })?;
    let store = Arc::new(Store::new(
        StoreConfig::default(),
        dram,
        Some(tier),
        4096,
        Arc::new(SystemClock),
        StoreMetrics::new(&Registry::new()),
    ));
    let stats = tiering::recover(&store, &mut |_, _| {}).await;
    let restart = t.elapsed();
    rep.section(
        "Warm restart of a full NVMe tier",
        &[
            "tier bytes",
            "records",
            "restart s",
            "sequential read s",
            "restart ÷ read",
        ],
    );
    rep.row(&[
        format!("{} MiB", on_disk >> 20),
        stats.records.to_string(),
        format!("{:.2}", restart.as_secs_f64()),
        format!("{:.2}", raw.as_secs_f64()),
        f2(restart.as_secs_f64() / raw.as_secs_f64()),
    ]);
    rep.note("Restart = open the segment files, read every record through the engine, verify each payload checksum and rebuild the index; the reference reads the same files front to back with O_DIRECT, 8 MiB at a time, from one thread.");
    let _ = store.stats();
    Ok(())
}

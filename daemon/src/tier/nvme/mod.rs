//! The NVMe tier: log-structured segment files under the data directory,
//! written and read with O_DIRECT through an I/O engine (io_uring, or psync
//! where io_uring is unavailable).
//!
//! This is the physical side: it appends records, reads them back and
//! checks them, scans segments at start, deletes segments it is told to
//! reclaim, and counts space and errors. Which block goes where, what to
//! reclaim and what a record means for the index is the store's business.
//!
//! Invariants:
//! * the bytes of all segment files (created, or found at start, including
//!   ones refused for an unknown format) never exceed the configured cap: a
//!   new segment is created only if it fits;
//! * records are appended at increasing offsets of the active segment;
//!   several writes may be in flight; a segment is reclaimable only once
//!   sealed with no write in flight;
//! * every record read is checked (header, segment id, key, length and
//!   payload checksum) before its bytes are handed out;
//! * after `fence_after_errors` I/O errors the tier is fenced: every later
//!   operation fails fast with [`NvmeError::Fenced`];
//! * a file this build cannot read (a segment, a record or a side file of
//!   another format version, or a segment with an unknown magic) is never
//!   modified, truncated or deleted: it is refused, named in the log and
//!   in [`NvmeTier::refused_files`] with its version, and its space counts
//!   against the cap. A segment holding a record of another version is read
//!   for the records this build knows and never reclaimed. The only file
//!   removed at open is a segment whose header page is all zeros (creation
//!   interrupted before the header was written: it never held a record).

pub mod buf;
pub mod engine;
pub mod evictions;
pub mod fault;
pub mod format;
pub mod layouts;
pub mod psync;
mod sidelog;
pub mod uring;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::{Mode, OFlags};
use strata_proto::{BlockKey, NamespaceId};

use buf::{ALIGN, BufPool, IoBuf};
use engine::{EngineKind, IoEngine, IoFile};
use format::{
    BadSegment, NotARecord, PAYLOAD_AFTER_HEADER, PAYLOAD_PAGE_ALIGNED, RECORD_HEADER_LEN,
    RecordHeader, RecordKind, SEGMENT_HEADER_LEN, SegmentHeader, payload_offset_for, span_at,
};

#[derive(Debug, Clone)]
pub struct NvmeConfig {
    pub dir: PathBuf,
    /// Cap on the bytes of all segment files.
    pub capacity_bytes: u64,
    pub segment_bytes: u64,
    pub engine: EngineKind,
    pub queue_depth: u32,
    /// Size and number of pooled I/O buffers; a record larger than a buffer
    /// uses a standalone one.
    pub io_buffer_bytes: usize,
    pub io_buffers: usize,
    pub fence_after_errors: u32,
    /// fdatasync after every write (durable across power loss, not only
    /// across a daemon crash).
    pub sync_writes: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error("nvme tier is fenced after {0} I/O errors")]
    Fenced(u32),
    #[error("nvme tier is full ({0} bytes of segments, the cap)")]
    Full(u64),
    #[error("filesystem out of space: {0}")]
    DiskFull(io::Error),
    #[error("I/O error: {0}")]
    Io(io::Error),
    /// The bytes read are not the record expected: a miss.
    #[error("record check failed: {0}")]
    Corrupt(String),
    #[error("record of {0} bytes is larger than a segment")]
    TooLarge(usize),
}

impl NvmeError {
    fn from_io(e: io::Error) -> NvmeError {
        if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
            NvmeError::DiskFull(e)
        } else {
            NvmeError::Io(e)
        }
    }
}

/// Where a record lives: segment slot, offset, and where its payload
/// starts within it (128 or 4096: the record's format, see
/// [`format`]). Valid while the slot's segment is not reclaimed; resolve
/// it to a file under the store's lock (see [`NvmeTier::file_of`]).
///
/// Bits: slot (24) | payload page-aligned (1) | offset in pages (39, up
/// to 2 PiB). The location carries the payload offset so that every
/// reader of a part of the payload (Get, reclaim, Attend's layer ranges)
/// uses the record's own layout, old or new, without reading its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Loc(pub u64);

const SLOT_SHIFT: u32 = 40;
const ALIGNED_PAYLOAD_BIT: u64 = 1 << (SLOT_SHIFT - 1);

impl Loc {
    fn new(slot: u32, offset: u64, payload_offset: u32) -> Loc {
        debug_assert!(offset.is_multiple_of(ALIGN as u64) && (offset >> 12) < ALIGNED_PAYLOAD_BIT);
        debug_assert!(matches!(
            payload_offset,
            PAYLOAD_AFTER_HEADER | PAYLOAD_PAGE_ALIGNED
        ));
        let aligned = if payload_offset == PAYLOAD_PAGE_ALIGNED {
            ALIGNED_PAYLOAD_BIT
        } else {
            0
        };
        Loc(((slot as u64) << SLOT_SHIFT) | aligned | (offset >> 12))
    }
    /// A location in the segment at `slot` (for [`NvmeTier::file_of`]:
    /// only the slot matters there).
    pub fn new_at(slot: u32, offset: u64) -> Loc {
        Loc::new(slot, offset, PAYLOAD_AFTER_HEADER)
    }
    pub fn slot(self) -> u32 {
        (self.0 >> SLOT_SHIFT) as u32
    }
    /// The record's first byte in its segment.
    pub fn offset(self) -> u64 {
        (self.0 & (ALIGNED_PAYLOAD_BIT - 1)) << 12
    }
    /// Where the record's payload starts, from [`offset`](Self::offset).
    pub fn payload_offset(self) -> usize {
        if self.0 & ALIGNED_PAYLOAD_BIT != 0 {
            PAYLOAD_PAGE_ALIGNED as usize
        } else {
            PAYLOAD_AFTER_HEADER as usize
        }
    }
    /// Bytes the record takes on disk, its payload `len` bytes.
    pub fn span(self, len: u32) -> usize {
        span_at(self.payload_offset() as u32, len as usize)
    }
}

/// A record read and checked by the tier: the device buffer, with the
/// payload at the record's payload offset.
#[derive(Debug)]
pub struct RecordBuf {
    buf: IoBuf,
    start: usize,
    len: usize,
}

impl RecordBuf {
    pub fn payload(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
    /// The buffer and where the payload starts in it.
    pub fn into_parts(self) -> (IoBuf, usize) {
        (self.buf, self.start)
    }
}

/// A record's identity as the store knows it: what a read must find.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    pub namespace: NamespaceId,
    pub key: BlockKey,
    pub len: u32,
    pub checksum: u64,
}

/// A file handle and segment id resolved under the store's lock.
#[derive(Debug, Clone)]
pub struct SegFile {
    file: IoFile,
    id: u64,
}

impl SegFile {
    /// The segment's id (unique for the tier's life).
    pub fn id(&self) -> u64 {
        self.id
    }
}

struct Segment {
    id: u64,
    file: IoFile,
    size: u64,
    /// Next append offset.
    cursor: u64,
    writes_in_flight: u32,
    sealed: bool,
    live_bytes: u64,
    live_records: u64,
    /// Holds a record of a format version this build does not read: never
    /// reclaimed (reclaim would delete that record).
    foreign: bool,
}

#[derive(Default)]
struct State {
    slots: Vec<Option<Segment>>,
    free_slots: Vec<u32>,
    active: Option<u32>,
    next_id: u64,
    /// Bytes of all segment files, including refused ones.
    allocated: u64,
    refused_bytes: u64,
    io_errors: u32,
    fenced: bool,
    /// After ENOSPC, creation is not retried before this instant.
    disk_full_until: Option<Instant>,
}

/// A segment as the reclaimer sees it.
#[derive(Debug, Clone, Copy)]
pub struct SegmentInfo {
    pub slot: u32,
    pub id: u64,
    pub size: u64,
    pub live_bytes: u64,
    pub live_records: u64,
    pub reclaimable: bool,
}

#[derive(Debug, Clone, Default)]
pub struct NvmeStats {
    pub capacity: u64,
    pub allocated: u64,
    pub live_bytes: u64,
    pub segments: u64,
    pub refused_segments_bytes: u64,
    pub io_errors: u32,
    pub fenced: bool,
    pub engine: &'static str,
}

/// One valid record found by a scan.
#[derive(Debug, Clone)]
pub struct Scanned {
    pub header: RecordHeader,
    pub loc: Loc,
}

#[derive(Debug, Clone, Default)]
pub struct ScanStats {
    pub segments: u64,
    pub records: u64,
    pub tombstones: u64,
    pub bytes: u64,
    /// Positions that held a damaged or torn record.
    pub torn: u64,
    /// Segments left untouched because of an unknown format version.
    pub refused_segments: u64,
}

pub struct NvmeTier {
    cfg: NvmeConfig,
    engine: Arc<dyn IoEngine>,
    pool: Arc<BufPool>,
    state: Mutex<State>,
    /// Serialises segment creation (an async step).
    create: tokio::sync::Mutex<()>,
    /// The scan's chunk buffers, kept between scans (first touch is slow).
    scan_bufs: Mutex<Vec<IoBuf>>,
    /// Layouts of the namespaces held (for recovery), and those found at open.
    layouts: layouts::LayoutLog,
    found_layouts: Vec<(u64, Vec<u8>)>,
    /// Namespace evictions (for recovery), and those found at open.
    evictions: evictions::EvictionLog,
    found_evictions: Vec<(u64, u64)>,
    /// One line per file refused (unknown format), naming it and why.
    refused: Mutex<Vec<String>>,
    /// Tests only: write segments and records as version 1 did, to check
    /// that what an earlier release wrote is recovered and served.
    #[cfg(test)]
    write_v1: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for NvmeTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeTier")
            .field("dir", &self.cfg.dir)
            .finish()
    }
}

fn open_direct(path: &Path, flags: OFlags) -> io::Result<std::os::fd::OwnedFd> {
    rustix::fs::open(
        path,
        flags | OFlags::DIRECT | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(io::Error::from)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Bytes per scan read.
const SCAN_CHUNK: usize = 8 << 20;
/// Scan reads in flight at once.
const SCAN_DEPTH: usize = 4;

/// Sequential reads of one file with up to [`SCAN_DEPTH`] chunks in flight.
/// Each read runs as its own task (engine futures start when polled), so the
/// disk works while the scan checks the chunk before.
struct ReadAhead {
    engine: Arc<dyn IoEngine>,
    file: IoFile,
    end: u64,
    issued: u64,
    spare: Vec<IoBuf>,
    pending: std::collections::VecDeque<(u64, usize, tokio::task::JoinHandle<engine::IoResult>)>,
}

impl ReadAhead {
    fn new(engine: Arc<dyn IoEngine>, file: IoFile, end: u64, mut spare: Vec<IoBuf>) -> Self {
        spare.retain(|b| b.capacity() >= SCAN_CHUNK);
        while spare.len() < SCAN_DEPTH {
            spare.push(IoBuf::alloc(SCAN_CHUNK));
        }
        ReadAhead {
            engine,
            file,
            end,
            issued: SEGMENT_HEADER_LEN as u64,
            spare,
            pending: Default::default(),
        }
    }

    fn top_up(&mut self) {
        while self.issued < self.end {
            let Some(mut buf) = self.spare.pop() else {
                break;
            };
            let len = SCAN_CHUNK
                .min((self.end - self.issued) as usize)
                .next_multiple_of(ALIGN);
            buf.set_len(len);
            let read = tokio::spawn(self.engine.read(&self.file, self.issued, buf));
            self.pending.push_back((self.issued, len, read));
            self.issued += len as u64;
        }
    }

    /// The next chunk in file order: its offset, its length asked, and the
    /// read's result.
    async fn next(&mut self) -> Option<(u64, usize, engine::IoResult)> {
        self.top_up();
        let (offset, len, read) = self.pending.pop_front()?;
        Some(match read.await {
            Ok(r) => (offset, len, r),
            // A panicked read task lost its buffer: a stand-in, and an
            // error that makes the caller read the range again.
            Err(e) => (
                offset,
                len,
                (
                    IoBuf::alloc(SCAN_CHUNK),
                    Err(io::Error::other(e.to_string())),
                ),
            ),
        })
    }

    fn give_back(&mut self, buf: IoBuf) {
        self.spare.push(buf);
    }

    /// Issues nothing more (the file ended early).
    fn stop(&mut self) {
        self.end = self.issued;
    }

    /// Waits for reads still in flight and hands back every buffer.
    async fn finish(mut self) -> Vec<IoBuf> {
        self.stop();
        while let Some((_, _, read)) = self.pending.pop_front() {
            if let Ok((buf, _)) = read.await {
                self.spare.push(buf);
            }
        }
        self.spare
    }
}

impl NvmeTier {
    /// Opens the tier on `cfg.dir` with `engine`: lists the segment files,
    /// checks their headers, and refuses (keeps, never touches) segments of
    /// an unknown format. Records are read by [`scan`](Self::scan).
    pub fn open(
        cfg: NvmeConfig,
        engine: Arc<dyn IoEngine>,
        pool: Arc<BufPool>,
    ) -> io::Result<(Arc<NvmeTier>, ScanStats)> {
        std::fs::create_dir_all(&cfg.dir)?;
        let mut found: Vec<(u64, PathBuf, u64)> = Vec::new();
        for entry in std::fs::read_dir(&cfg.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(format::parse_segment_file_name) else {
                continue;
            };
            let size = entry.metadata()?.len();
            found.push((id, entry.path(), size));
        }
        found.sort();
        let mut st = State::default();
        let mut stats = ScanStats::default();
        let mut refused: Vec<String> = Vec::new();
        let mut header = IoBuf::alloc(SEGMENT_HEADER_LEN);
        for (id, path, size) in &found {
            st.next_id = st.next_id.max(id + 1);
            st.allocated += size;
            let fd = match open_direct(path, OFlags::RDWR) {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot open segment; leaving it untouched");
                    refused.push(format!("{}: cannot open: {e}", path.display()));
                    st.refused_bytes += size;
                    stats.refused_segments += 1;
                    continue;
                }
            };
            // A synchronous read: start-up only, one page per segment.
            header.set_len(SEGMENT_HEADER_LEN);
            let got = rustix::io::pread(&fd, &mut header[..], 0).map_err(io::Error::from)?;
            match SegmentHeader::decode(&header[..got]) {
                Ok(h) if h.id == *id => {
                    st.slots.push(Some(Segment {
                        id: *id,
                        file: IoFile::new(fd, *id),
                        size: *size,
                        cursor: *size,
                        writes_in_flight: 0,
                        sealed: true,
                        live_bytes: 0,
                        live_records: 0,
                        foreign: false,
                    }));
                }
                Err(BadSegment::Magic) if header[..got].iter().all(|&b| b == 0) => {
                    // Our name, and a header page of zeros (or nothing): the
                    // daemon stopped while creating it, after fallocate and
                    // before the header write; no record was ever written.
                    tracing::warn!(path = %path.display(), "segment without a header (creation interrupted); removing it");
                    drop(fd);
                    std::fs::remove_file(path)?;
                    st.allocated -= size;
                }
                Err(bad) => {
                    let why = match bad {
                        BadSegment::UnknownVersion(v) => format!(
                            "segment format version {v}; this stratad reads versions {} (written by another release?)",
                            format::versions_read()
                        ),
                        BadSegment::Magic => format!(
                            "unknown segment magic {:?}; this stratad reads {:?} (format versions {})",
                            String::from_utf8_lossy(&header[..got.min(8)]),
                            String::from_utf8_lossy(&format::SEGMENT_MAGIC),
                            format::versions_read()
                        ),
                        BadSegment::Checksum => {
                            "segment header is damaged (checksum); its records are not read".into()
                        }
                    };
                    tracing::error!(path = %path.display(), "{why}; leaving the file untouched; its space counts against tiers.nvme.bytes");
                    refused.push(format!("{}: {why}", path.display()));
                    st.refused_bytes += size;
                    stats.refused_segments += 1;
                }
                Ok(h) => {
                    tracing::error!(path = %path.display(), header_id = h.id, "segment file name and header disagree; leaving it untouched");
                    refused.push(format!(
                        "{}: header says segment {} (file name and header disagree)",
                        path.display(),
                        h.id
                    ));
                    st.refused_bytes += size;
                    stats.refused_segments += 1;
                }
            }
        }
        let (layouts, found_layouts, layouts_refused) = layouts::LayoutLog::open(&cfg.dir)?;
        let (evictions, found_evictions, evictions_refused) =
            evictions::EvictionLog::open(&cfg.dir)?;
        for why in [layouts_refused, evictions_refused].into_iter().flatten() {
            tracing::error!("{why}");
            refused.push(why);
        }
        for (stem, version) in [
            ("layouts", layouts::VERSION),
            ("evictions", evictions::VERSION),
        ] {
            for (path, v) in sidelog::other_versions(&cfg.dir, stem, version) {
                let why = format!(
                    "{}: {stem} file of format version {v}; this stratad reads version {version}; left untouched",
                    path.display()
                );
                tracing::error!("{why}");
                refused.push(why);
            }
        }
        let tier = Arc::new(NvmeTier {
            cfg,
            engine,
            pool,
            state: Mutex::new(st),
            create: tokio::sync::Mutex::new(()),
            scan_bufs: Mutex::new(Vec::new()),
            layouts,
            found_layouts,
            evictions,
            found_evictions,
            refused: Mutex::new(refused),
            #[cfg(test)]
            write_v1: std::sync::atomic::AtomicBool::new(false),
        });
        Ok((tier, stats))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("nvme tier state poisoned")
    }

    /// The layouts found beside the segments at open: (namespace id,
    /// canonical encoding).
    pub fn persisted_layouts(&self) -> Vec<(u64, Vec<u8>)> {
        self.found_layouts.clone()
    }

    /// Records a layout beside the segments (a blocking file append with
    /// fdatasync; once per namespace id).
    pub fn persist_layout(&self, id: u64, canonical: &[u8]) -> io::Result<()> {
        self.layouts.append(id, canonical)
    }

    /// The namespace evictions found beside the segments at open:
    /// (namespace id, sequence number below which its records are void).
    pub fn persisted_evictions(&self) -> Vec<(u64, u64)> {
        self.found_evictions.clone()
    }

    /// Records a namespace eviction beside the segments (a blocking file
    /// append with fdatasync).
    pub fn persist_eviction(&self, namespace: u64, seq: u64) -> io::Result<()> {
        self.evictions.append(namespace, seq)
    }

    /// Files (or records in them) of a format this build does not read,
    /// each with what was wrong; they are left untouched.
    pub fn refused_files(&self) -> Vec<String> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Flushes every segment file (fdatasync) and the directory, so that
    /// every record written so far survives power loss too (a drain ends
    /// with this; without `sync_writes` records are otherwise durable
    /// against a daemon crash only).
    pub async fn sync_all(&self) -> io::Result<()> {
        self.check_fenced()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let files: Vec<IoFile> = self
            .lock()
            .slots
            .iter()
            .flatten()
            .map(|s| s.file.clone())
            .collect();
        for f in &files {
            self.engine.sync(f).await?;
        }
        let dir = self.cfg.dir.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
            .await
            .map_err(|e| io::Error::other(e.to_string()))?
    }

    pub fn config(&self) -> &NvmeConfig {
        &self.cfg
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    pub fn is_fenced(&self) -> bool {
        self.lock().fenced
    }

    /// Counts an I/O error; returns true if this one fenced the tier.
    fn note_error(&self, e: &NvmeError) -> bool {
        if !matches!(e, NvmeError::Io(_)) {
            return false;
        }
        let mut st = self.lock();
        st.io_errors += 1;
        if !st.fenced && st.io_errors >= self.cfg.fence_after_errors {
            st.fenced = true;
            tracing::error!(errors = st.io_errors, dir = %self.cfg.dir.display(), "nvme tier fenced after repeated I/O errors; serving from the other tiers");
            return true;
        }
        false
    }

    fn check_fenced(&self) -> Result<(), NvmeError> {
        let st = self.lock();
        if st.fenced {
            Err(NvmeError::Fenced(st.io_errors))
        } else {
            Ok(())
        }
    }

    /// Scans every segment (in id order), calling `visit` for each valid
    /// record with its verified payload (empty for a tombstone); damaged
    /// positions are skipped and counted, and the walk goes on past them (a
    /// write after a torn one may have completed).
    pub async fn scan(
        &self,
        visit: &mut (dyn FnMut(Scanned, &[u8]) + Send),
        progress: &mut (dyn FnMut(&ScanStats) + Send),
    ) -> ScanStats {
        let slots: Vec<(u32, u64)> = {
            let st = self.lock();
            st.slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().map(|s| (i as u32, s.id)))
                .collect()
        };
        let mut stats = ScanStats::default();
        for (slot, _) in slots {
            self.scan_segment(slot, visit, &mut stats).await;
            stats.segments += 1;
            progress(&stats);
        }
        stats
    }

    /// Reads `len` bytes at `offset`, retrying transient failures; `None`
    /// if the range stays unreadable (counted as an I/O error).
    async fn read_retrying(
        &self,
        file: &IoFile,
        offset: u64,
        mut buf: IoBuf,
    ) -> (IoBuf, Option<usize>) {
        let mut last = None;
        for _ in 0..4 {
            let (b, r) = self.engine.read(file, offset, buf).await;
            buf = b;
            match r {
                Ok(n) => return (buf, Some(n)),
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            tracing::error!(file = file.id, offset, error = %e, "unreadable range in a segment; skipping it");
            self.note_error(&NvmeError::Io(e));
        }
        (buf, None)
    }

    /// Reads one segment front to back in large chunks, calling `visit` for
    /// each valid record. [`SCAN_DEPTH`] chunk reads stay in flight, so
    /// checking one chunk overlaps reading the next (restart runs at the
    /// disk's sequential speed, not disk + checksum). A chunk that stays
    /// unreadable is skipped (its records are lost and counted as torn); a
    /// record that fails its check is read again on its own once (a
    /// transient fault must not lose it).
    pub async fn scan_segment(
        &self,
        slot: u32,
        visit: &mut (dyn FnMut(Scanned, &[u8]) + Send),
        stats: &mut ScanStats,
    ) {
        let (file, id, end) = {
            let st = self.lock();
            let Some(s) = st.slots.get(slot as usize).and_then(|s| s.as_ref()) else {
                return;
            };
            (s.file.clone(), s.id, s.cursor)
        };
        let spare = std::mem::take(&mut *self.scan_bufs.lock().unwrap_or_else(|e| e.into_inner()));
        let mut ahead = ReadAhead::new(self.engine.clone(), file.clone(), end, spare);
        // `window` holds the segment's bytes from `window_start` on, up to
        // `next_read`; an unreadable chunk is kept as zeros (no records).
        let mut window: Vec<u8> = Vec::new();
        let mut window_start = SEGMENT_HEADER_LEN as u64;
        let mut next_read = SEGMENT_HEADER_LEN as u64;
        let mut end = end;
        let mut pos = SEGMENT_HEADER_LEN as u64;
        // Extends the window by the next chunk; false at the end of the data.
        macro_rules! more {
            () => {{
                match ahead.next().await {
                    None => false,
                    Some((offset, len, (buf, r))) => {
                        debug_assert_eq!(offset, next_read);
                        let (buf, got) = match r {
                            Ok(n) => (buf, Some(n)),
                            // Retried on its own (a transient fault must not
                            // cost the chunk's records).
                            Err(_) => self.read_retrying(&file, offset, buf).await,
                        };
                        let want = (len as u64).min(end - offset) as usize;
                        let n = match got {
                            Some(n) => n.min(want),
                            None => {
                                stats.torn += 1;
                                want
                            }
                        };
                        match got {
                            Some(_) => window.extend_from_slice(&buf[..n]),
                            None => window.resize(window.len() + n, 0),
                        }
                        ahead.give_back(buf);
                        next_read += n as u64;
                        stats.bytes += n as u64;
                        if n < want {
                            // The file is shorter than its cursor (truncated):
                            // nothing lies beyond.
                            end = next_read;
                            ahead.stop();
                        }
                        n > 0
                    }
                }
            }};
        }
        while pos + RECORD_HEADER_LEN as u64 <= end {
            // Make the window cover [pos, pos + one header) at least.
            while next_read < end && next_read < pos + RECORD_HEADER_LEN as u64 {
                if !more!() {
                    break;
                }
            }
            let rel = (pos - window_start) as usize;
            if rel + RECORD_HEADER_LEN > window.len() {
                break; // the file ends here (truncated)
            }
            let step = match RecordHeader::decode(&window[rel..], id) {
                Ok(h) => {
                    // The record's own layout (v1: payload after the
                    // header; v2: as its header says).
                    let po = h.payload_offset as usize;
                    let span = span_at(h.payload_offset, h.len as usize);
                    while next_read < end && (next_read - window_start) < (rel + span) as u64 {
                        if !more!() {
                            break;
                        }
                    }
                    let body = rel + po..rel + po + h.len as usize;
                    let mut ok = body.end <= window.len()
                        && (h.kind == RecordKind::Tombstone
                            || strata_proto::checksum(&window[body.clone()]) == h.checksum);
                    if !ok && body.end <= window.len() && h.kind == RecordKind::Block {
                        // Once more, alone: a flipped bit in transit is not
                        // a torn write.
                        let mut one = IoBuf::alloc(span);
                        one.set_len(span);
                        let (b, got) = self.read_retrying(&file, pos, one).await;
                        if got.is_some_and(|n| n >= po + h.len as usize)
                            && strata_proto::checksum(&b[po..po + h.len as usize]) == h.checksum
                        {
                            window[rel..rel + po + h.len as usize]
                                .copy_from_slice(&b[..po + h.len as usize]);
                            ok = true;
                        }
                    }
                    if ok {
                        if h.kind == RecordKind::Tombstone {
                            stats.tombstones += 1;
                        } else {
                            stats.records += 1;
                        }
                        visit(
                            Scanned {
                                header: h,
                                loc: Loc::new(slot, pos, h.payload_offset),
                            },
                            &window[body],
                        );
                        span as u64
                    } else {
                        stats.torn += 1;
                        ALIGN as u64
                    }
                }
                Err(NotARecord::Empty) => ALIGN as u64,
                Err(NotARecord::UnknownVersion(v)) => {
                    let path = self.cfg.dir.join(format::segment_file_name(id));
                    tracing::error!(
                        path = %path.display(),
                        offset = pos,
                        version = v,
                        "record of format version {v}, which this stratad does not read; skipping it, never misreading it; the segment will not be reclaimed"
                    );
                    if self.mark_foreign(slot) {
                        self.refused.lock().unwrap_or_else(|e| e.into_inner()).push(format!(
                            "{}: record at byte {pos} has format version {v}; this stratad reads versions {}; the segment is kept (never reclaimed)",
                            path.display(),
                            format::versions_read()
                        ));
                    }
                    stats.torn += 1;
                    ALIGN as u64
                }
                Err(_) => {
                    stats.torn += 1;
                    ALIGN as u64
                }
            };
            pos += step;
            // Drop what lies behind `pos` once it is a chunk's worth.
            let consumed = ((pos - window_start) as usize).min(window.len());
            if consumed >= SCAN_CHUNK {
                window.drain(..consumed);
                window_start += consumed as u64;
            }
        }
        let spare = ahead.finish().await;
        *self.scan_bufs.lock().unwrap_or_else(|e| e.into_inner()) = spare;
    }

    /// Marks a segment as holding a record of another format version;
    /// true the first time.
    fn mark_foreign(&self, slot: u32) -> bool {
        let mut st = self.lock();
        match st.slots.get_mut(slot as usize) {
            Some(Some(s)) if !s.foreign => {
                s.foreign = true;
                true
            }
            _ => false,
        }
    }

    /// Accounts a record found by the scan (or written) as live.
    pub fn add_live(&self, loc: Loc, len: u32) {
        let mut st = self.lock();
        if let Some(Some(s)) = st.slots.get_mut(loc.slot() as usize) {
            s.live_bytes += loc.span(len) as u64;
            s.live_records += 1;
        }
    }

    /// A record stopped being live (superseded, deleted, dropped).
    pub fn release(&self, loc: Loc, len: u32) {
        let mut st = self.lock();
        if let Some(Some(s)) = st.slots.get_mut(loc.slot() as usize) {
            s.live_bytes = s.live_bytes.saturating_sub(loc.span(len) as u64);
            s.live_records = s.live_records.saturating_sub(1);
        }
    }

    /// The file of a location, resolved under the caller's lock so that the
    /// segment cannot be reclaimed (and its slot reused) in between.
    pub fn file_of(&self, loc: Loc) -> Option<SegFile> {
        let st = self.lock();
        st.slots
            .get(loc.slot() as usize)?
            .as_ref()
            .map(|s| SegFile {
                file: s.file.clone(),
                id: s.id,
            })
    }

    /// Appends a record. `payload` is copied into an aligned buffer.
    pub async fn append(&self, mut header: RecordHeader, payload: &[u8]) -> Result<Loc, NvmeError> {
        self.check_fenced()?;
        let po = self.payload_offset_to_write(payload.len());
        let span = span_at(po, payload.len());
        if span as u64 > self.cfg.segment_bytes - SEGMENT_HEADER_LEN as u64 {
            return Err(NvmeError::TooLarge(payload.len()));
        }
        let mut buf = if span <= self.pool.buf_bytes() {
            self.pool.get().await
        } else {
            IoBuf::alloc(span)
        };
        buf.set_len(span);
        let (slot, offset, file, id) = self.reserve(span as u64).await?;
        header.segment = id;
        header.len = payload.len() as u32;
        header.payload_offset = po;
        let po = po as usize;
        buf[..po].fill(0);
        header.encode_version(
            self.version_to_write() as u16,
            &mut buf[..RECORD_HEADER_LEN],
        );
        buf[po..po + payload.len()].copy_from_slice(payload);
        buf[po + payload.len()..].fill(0);
        let (buf, r) = self.engine.write(&file, offset, buf).await;
        drop(buf);
        let r = match r {
            Ok(_) if self.cfg.sync_writes => self.engine.sync(&file).await.map(|_| span),
            other => other,
        };
        let mut st = self.lock();
        if let Some(Some(s)) = st.slots.get_mut(slot as usize) {
            s.writes_in_flight -= 1;
        }
        drop(st);
        match r {
            Ok(_) => {
                let loc = Loc::new(slot, offset, header.payload_offset);
                self.add_live(loc, payload.len() as u32);
                Ok(loc)
            }
            Err(e) => {
                let e = NvmeError::from_io(e);
                self.note_error(&e);
                Err(e)
            }
        }
    }

    /// The format version of segments and records written.
    fn version_to_write(&self) -> u32 {
        #[cfg(test)]
        if self.write_v1.load(std::sync::atomic::Ordering::Relaxed) {
            return 1;
        }
        format::FORMAT_VERSION
    }

    fn payload_offset_to_write(&self, len: usize) -> u32 {
        match self.version_to_write() {
            1 => PAYLOAD_AFTER_HEADER,
            _ => payload_offset_for(len),
        }
    }

    /// Tests only: from now on write new segments and records in format
    /// version 1, exactly as the release before version 2 did (a segment
    /// already active keeps its header version: seal it first by
    /// reopening the tier).
    #[cfg(test)]
    pub(crate) fn write_version_1_for_tests(&self) {
        self.write_v1
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes `span` bytes in the active segment, creating one if needed.
    async fn reserve(&self, span: u64) -> Result<(u32, u64, IoFile, u64), NvmeError> {
        loop {
            {
                let mut st = self.lock();
                if st.fenced {
                    return Err(NvmeError::Fenced(st.io_errors));
                }
                if let Some(a) = st.active
                    && let Some(Some(s)) = st.slots.get_mut(a as usize)
                    && s.cursor + span <= s.size
                {
                    let off = s.cursor;
                    s.cursor += span;
                    s.writes_in_flight += 1;
                    return Ok((a, off, s.file.clone(), s.id));
                }
            }
            let _creating = self.create.lock().await;
            {
                // Someone else may have made room while we waited.
                let st = self.lock();
                if let Some(a) = st.active
                    && let Some(Some(s)) = st.slots.get(a as usize)
                    && s.cursor + span <= s.size
                {
                    continue;
                }
            }
            self.new_segment().await?;
        }
    }

    async fn new_segment(&self) -> Result<(), NvmeError> {
        let (id, path) = {
            let mut st = self.lock();
            if let Some(t) = st.disk_full_until
                && Instant::now() < t
            {
                return Err(NvmeError::DiskFull(io::Error::from_raw_os_error(
                    libc::ENOSPC,
                )));
            }
            if st.allocated + self.cfg.segment_bytes > self.cfg.capacity_bytes {
                return Err(NvmeError::Full(st.allocated));
            }
            let id = st.next_id;
            st.next_id += 1;
            st.allocated += self.cfg.segment_bytes;
            (id, self.cfg.dir.join(format::segment_file_name(id)))
        };
        let created = self.create_file(id, &path).await;
        let mut st = self.lock();
        match created {
            Ok(file) => {
                if let Some(a) = st.active
                    && let Some(Some(s)) = st.slots.get_mut(a as usize)
                {
                    s.sealed = true;
                }
                let seg = Segment {
                    id,
                    file,
                    size: self.cfg.segment_bytes,
                    cursor: SEGMENT_HEADER_LEN as u64,
                    writes_in_flight: 0,
                    sealed: false,
                    live_bytes: 0,
                    live_records: 0,
                    foreign: false,
                };
                let slot = match st.free_slots.pop() {
                    Some(s) => {
                        st.slots[s as usize] = Some(seg);
                        s
                    }
                    None => {
                        st.slots.push(Some(seg));
                        (st.slots.len() - 1) as u32
                    }
                };
                st.active = Some(slot);
                Ok(())
            }
            Err(e) => {
                st.allocated -= self.cfg.segment_bytes;
                let _ = std::fs::remove_file(&path);
                if let NvmeError::DiskFull(_) = e {
                    st.disk_full_until = Some(Instant::now() + Duration::from_secs(5));
                    tracing::warn!(dir = %self.cfg.dir.display(), "filesystem full: refusing writes to the nvme tier for 5 s");
                }
                drop(st);
                self.note_error(&e);
                Err(e)
            }
        }
    }

    async fn create_file(&self, id: u64, path: &Path) -> Result<IoFile, NvmeError> {
        let fd = open_direct(path, OFlags::CREATE | OFlags::EXCL | OFlags::RDWR)
            .map_err(NvmeError::from_io)?;
        match rustix::fs::fallocate(
            &fd,
            rustix::fs::FallocateFlags::empty(),
            0,
            self.cfg.segment_bytes,
        ) {
            Ok(()) => {}
            // Filesystems without fallocate: the file grows as it is written.
            Err(rustix::io::Errno::OPNOTSUPP) => {}
            Err(e) => return Err(NvmeError::from_io(e.into())),
        }
        let file = IoFile::new(fd, id);
        let mut h = IoBuf::alloc(SEGMENT_HEADER_LEN);
        SegmentHeader {
            version: self.version_to_write(),
            id,
            created_unix_ms: now_ms(),
        }
        .encode(&mut h);
        let (_, r) = self.engine.write(&file, 0, h).await;
        r.map_err(NvmeError::from_io)?;
        Ok(file)
    }

    /// Reads the record at `loc` from `seg` and checks it against `expect`
    /// (and its header's payload offset against the location's).
    pub async fn read(
        &self,
        seg: &SegFile,
        loc: Loc,
        expect: &Expect,
    ) -> Result<RecordBuf, NvmeError> {
        self.check_fenced()?;
        let span = loc.span(expect.len);
        let buf = if span <= self.pool.buf_bytes() {
            self.pool.get().await
        } else {
            IoBuf::alloc(span)
        };
        self.read_checked(seg, loc, expect, buf).await
    }

    /// [`read`](Self::read) into a buffer of its own, never a pooled one:
    /// for callers that hold several records at once (Attend), which could
    /// otherwise starve the pool while waiting for it.
    pub async fn read_owned(
        &self,
        seg: &SegFile,
        loc: Loc,
        expect: &Expect,
    ) -> Result<RecordBuf, NvmeError> {
        self.check_fenced()?;
        let buf = IoBuf::alloc(loc.span(expect.len));
        self.read_checked(seg, loc, expect, buf).await
    }

    async fn read_checked(
        &self,
        seg: &SegFile,
        loc: Loc,
        expect: &Expect,
        mut buf: IoBuf,
    ) -> Result<RecordBuf, NvmeError> {
        let span = loc.span(expect.len);
        let po = loc.payload_offset();
        buf.set_len(span);
        let (buf, r) = self.engine.read(&seg.file, loc.offset(), buf).await;
        match r {
            Ok(n) if n >= po + expect.len as usize => {}
            Ok(n) => {
                return Err(NvmeError::Corrupt(format!(
                    "short read: {n} of {span} bytes"
                )));
            }
            Err(e) => {
                let e = NvmeError::from_io(e);
                self.note_error(&e);
                return Err(e);
            }
        }
        let h =
            RecordHeader::decode(&buf, seg.id).map_err(|e| NvmeError::Corrupt(format!("{e:?}")))?;
        if h.kind != RecordKind::Block
            || h.namespace != expect.namespace
            || h.key != expect.key
            || h.len != expect.len
            || h.checksum != expect.checksum
            || h.payload_offset as usize != po
        {
            return Err(NvmeError::Corrupt(
                "record is not the block expected".into(),
            ));
        }
        let payload = &buf[po..po + expect.len as usize];
        if strata_proto::checksum(payload) != expect.checksum {
            return Err(NvmeError::Corrupt("payload checksum mismatch".into()));
        }
        Ok(RecordBuf {
            buf,
            start: po,
            len: expect.len as usize,
        })
    }

    /// Reads `len` bytes at `offset` of a segment (both multiples of 4 KiB)
    /// into a buffer of its own (never a pooled one: a caller may hold
    /// several reads at once, and pool buffers held until later work
    /// could starve the pool). The bytes are not checked here: the caller
    /// verifies them (Attend, against a layer checksum it keeps).
    pub async fn read_span(
        &self,
        seg: &SegFile,
        offset: u64,
        len: usize,
    ) -> Result<IoBuf, NvmeError> {
        assert!(
            offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN) && len > 0,
            "unaligned span read"
        );
        self.check_fenced()?;
        let mut buf = IoBuf::alloc(len);
        buf.set_len(len);
        let (buf, r) = self.engine.read(&seg.file, offset, buf).await;
        match r {
            Ok(n) if n >= len => Ok(buf),
            Ok(n) => Err(NvmeError::Corrupt(format!(
                "short read: {n} of {len} bytes"
            ))),
            Err(e) => {
                let e = NvmeError::from_io(e);
                self.note_error(&e);
                Err(e)
            }
        }
    }

    /// Segments, for the reclaimer.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let st = self.lock();
        st.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.as_ref().map(|s| SegmentInfo {
                    slot: i as u32,
                    id: s.id,
                    size: s.size,
                    live_bytes: s.live_bytes,
                    live_records: s.live_records,
                    reclaimable: s.sealed
                        && !s.foreign
                        && s.writes_in_flight == 0
                        && Some(i as u32) != st.active,
                })
            })
            .collect()
    }

    /// Deletes a reclaimed segment and frees its space. The store has
    /// already moved or dropped every live record in it.
    pub fn delete_segment(&self, slot: u32) -> io::Result<()> {
        let seg = {
            let mut st = self.lock();
            let Some(seg) = st.slots.get_mut(slot as usize).and_then(|s| s.take()) else {
                return Ok(());
            };
            st.free_slots.push(slot);
            st.allocated -= seg.size;
            if st.active == Some(slot) {
                st.active = None;
            }
            seg
        };
        std::fs::remove_file(self.cfg.dir.join(format::segment_file_name(seg.id)))
    }

    pub fn stats(&self) -> NvmeStats {
        let st = self.lock();
        NvmeStats {
            capacity: self.cfg.capacity_bytes,
            allocated: st.allocated,
            live_bytes: st.slots.iter().flatten().map(|s| s.live_bytes).sum(),
            segments: st.slots.iter().flatten().count() as u64,
            refused_segments_bytes: st.refused_bytes,
            io_errors: st.io_errors,
            fenced: st.fenced,
            engine: self.engine.name(),
        }
    }
}

//! The I/O engine: positional reads and writes of owned, aligned buffers on
//! files opened with O_DIRECT, completed asynchronously.
//!
//! Two implementations behind one trait: io_uring (a dedicated thread owns
//! the ring, submits up to `queue_depth` operations, uses registered buffers
//! for pool buffers) and psync (`queue_depth` threads doing pread/pwrite).
//! [`open_engine`] picks io_uring when the kernel allows it, else psync, and
//! config can force either. Wrappers (fault injection, metrics) implement
//! the same trait around another engine.
//!
//! Ownership: a request takes its [`IoBuf`] and hands it back with the
//! result, so no buffer is touched by the kernel and the caller at once.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;

use super::buf::IoBuf;

/// A file the engine does I/O on. Cloning is cheap; the descriptor closes
/// when the last clone (including any in-flight request) drops.
#[derive(Debug, Clone)]
pub struct IoFile {
    fd: Arc<OwnedFd>,
    /// Identifies the file in fault-injection and crash bookkeeping.
    pub id: u64,
}

impl IoFile {
    pub fn new(fd: OwnedFd, id: u64) -> Self {
        IoFile {
            fd: Arc::new(fd),
            id,
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// What a completed request hands back: the buffer and the byte count (or
/// the error).
pub type IoResult = (IoBuf, io::Result<usize>);

pub type IoFuture = Pin<Box<dyn Future<Output = IoResult> + Send>>;

/// Positional I/O on O_DIRECT files. `offset` and the length used
/// (`buf.len()`) are multiples of 4096, and the buffer is 4096-aligned.
pub trait IoEngine: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Reads `buf.len()` bytes at `offset` into `buf` (a short read at the
    /// end of the file returns fewer bytes; the rest of `buf` is unspecified).
    fn read(&self, file: &IoFile, offset: u64, buf: IoBuf) -> IoFuture;

    /// Writes all `buf.len()` bytes at `offset`. A short write is an error
    /// (`WriteZero`), never a silent partial success.
    fn write(&self, file: &IoFile, offset: u64, buf: IoBuf) -> IoFuture;

    /// Makes completed writes to `file` durable across power loss.
    fn sync(&self, file: &IoFile) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;
}

/// Which engine to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring when available, else psync (with a log line saying so).
    Auto,
    IoUring,
    Psync,
}

impl EngineKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(EngineKind::Auto),
            "io_uring" => Some(EngineKind::IoUring),
            "psync" => Some(EngineKind::Psync),
            _ => None,
        }
    }
}

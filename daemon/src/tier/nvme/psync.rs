//! The psync I/O engine: `queue_depth` threads doing blocking pread, pwrite
//! and fdatasync, for kernels or sandboxes without io_uring.
//!
//! Invariants:
//! - At most `queue_depth` operations run at once (one per thread) and at
//!   most `4 * queue_depth` wait in the queue; callers past that wait
//!   (asynchronously) for space.
//! - Every request completes exactly once and hands its buffer back, also
//!   when the engine stops first (see `engine::BufRequest`).
//! - A write reports success only when every byte was written; a read
//!   stops early only at end of file.
//! - Dropping the engine closes the queue, lets the threads finish what was
//!   queued, and joins them.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use rustix::io::Errno;

use super::buf::IoBuf;
use super::engine::{BufOp, IoEngine, IoFile, IoFuture, Request, RequestQueue};

/// Requests that may wait in the queue per thread.
const QUEUED_PER_THREAD: usize = 4;

pub struct PsyncEngine {
    queue: Arc<RequestQueue>,
    threads: Vec<JoinHandle<()>>,
}

impl PsyncEngine {
    /// Starts `queue_depth` worker threads (at least one).
    pub fn new(queue_depth: usize) -> io::Result<PsyncEngine> {
        let queue_depth = queue_depth.max(1);
        let (queue, rx) = RequestQueue::new(queue_depth * QUEUED_PER_THREAD);
        // std's receiver has one consumer; the threads take turns on it.
        let rx = Arc::new(Mutex::new(rx));
        let mut engine = PsyncEngine {
            queue,
            threads: Vec::with_capacity(queue_depth),
        };
        for n in 0..queue_depth {
            let (rx, queue) = (rx.clone(), engine.queue.clone());
            // On failure `engine` drops here, which stops the threads
            // already started.
            let thread = std::thread::Builder::new()
                .name(format!("strata-psync-{n}"))
                .spawn(move || worker(&rx, &queue))?;
            engine.threads.push(thread);
        }
        Ok(engine)
    }
}

impl Drop for PsyncEngine {
    fn drop(&mut self) {
        self.queue.close();
        for thread in self.threads.drain(..) {
            // A worker that panicked already completed its request (with an
            // error) as it unwound; nothing more to do for it.
            let _ = thread.join();
        }
    }
}

impl IoEngine for PsyncEngine {
    fn name(&self) -> &'static str {
        "psync"
    }

    fn read(&self, file: &IoFile, offset: u64, buf: IoBuf) -> IoFuture {
        self.queue.submit_buf(BufOp::Read, file, offset, buf)
    }

    fn write(&self, file: &IoFile, offset: u64, buf: IoBuf) -> IoFuture {
        self.queue.submit_buf(BufOp::Write, file, offset, buf)
    }

    fn sync(
        &self,
        file: &IoFile,
    ) -> std::pin::Pin<Box<dyn Future<Output = io::Result<()>> + Send>> {
        self.queue.submit_sync(file)
    }
}

fn worker(rx: &Mutex<Receiver<Request>>, queue: &RequestQueue) {
    loop {
        // The lock is held while blocked in recv: the idle threads queue on
        // the mutex, and the one that gets a request releases it at once.
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        // Err: the engine closed the queue and it is drained.
        let Ok(req) = next else { return };
        queue.made_space();
        match req {
            Request::Buf(mut req) => {
                // A clone, so the descriptor's borrow does not hold `req`
                // (whose buffer is borrowed mutably below).
                let file = req.file.clone();
                let fd = borrow(&file);
                let offset = req.offset;
                let result = match req.op {
                    BufOp::Read => pread_full(fd, req.buf_mut(), offset),
                    BufOp::Write => pwrite_all(fd, req.buf(), offset),
                };
                req.complete(result);
            }
            Request::Sync(req) => {
                let result = retry_eintr(|| rustix::fs::fdatasync(borrow(&req.file)));
                req.complete(result.map_err(io::Error::from));
            }
        }
    }
}

fn borrow(file: &IoFile) -> BorrowedFd<'_> {
    // SAFETY: `file` holds the OwnedFd (through its Arc) for at least the
    // lifetime of the borrow, so the descriptor stays open and is not reused.
    unsafe { BorrowedFd::borrow_raw(file.raw_fd()) }
}

fn retry_eintr<T>(mut op: impl FnMut() -> rustix::io::Result<T>) -> rustix::io::Result<T> {
    loop {
        match op() {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = retry_eintr(|| rustix::io::pread(fd, &mut buf[done..], offset + done as u64))?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// Writes all of `buf`, continuing after short writes.
fn pwrite_all(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = retry_eintr(|| rustix::io::pwrite(fd, &buf[done..], offset + done as u64))?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "write stopped after {done} of {} bytes at offset {offset}",
                    buf.len()
                ),
            ));
        }
        done += n;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::nvme::engine::tests::{exercise, test_pool};

    #[tokio::test]
    async fn psync_engine_round_trips() {
        let engine = PsyncEngine::new(8).expect("psync engine starts");
        exercise(Arc::new(engine), test_pool()).await;
    }
}

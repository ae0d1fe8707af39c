//! The io_uring I/O engine: one thread ("strata-uring") owns a ring, takes
//! requests off a bounded queue, submits them, and completes each caller
//! from its completion entry. Pool buffers registered with the ring go out
//! as fixed reads and writes (no page pinning per operation).
//!
//! Invariants:
//! - At most `queue_depth` operations are in flight (each holds a slot in
//!   the in-flight slab, and a slot is taken only when one is free); at most
//!   `4 * queue_depth` more wait in the queue, and callers past that wait
//!   (asynchronously) for space.
//! - A buffer handed to the kernel stays owned by its slot until the
//!   completion for it arrives, so the kernel never writes into freed or
//!   reused memory. If the thread stops with operations still in flight (a
//!   broken ring, or a bug that unwinds), those buffers are leaked, never
//!   freed.
//! - The slot's `IoFile` clone keeps the descriptor open while the kernel
//!   uses it.
//! - A write completes successfully only when every byte was written (short
//!   writes are resubmitted for the rest); a short read returns what was
//!   read.
//! - Every request completes exactly once and hands its buffer back (except
//!   the leaked ones above, whose callers get an error and a stand-in).
//! - Dropping the engine closes the queue; the thread drains what was queued
//!   and in flight, completes it, and exits; drop joins it.

use std::io;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::thread::JoinHandle;

use io_uring::{IoUring, opcode, squeue, types};

use super::buf::{BufPool, IoBuf};
use super::engine::{BufOp, IoEngine, IoFile, IoFuture, Request, RequestQueue};

/// Requests that may wait in the queue per ring slot.
const QUEUED_PER_SLOT: usize = 4;

/// Times an operation is resubmitted after EINTR or EAGAIN before the error
/// goes to the caller, so a persistent condition cannot spin the thread.
const RETRIES_MAX: u32 = 16;

pub struct UringEngine {
    queue: Arc<RequestQueue>,
    thread: Option<JoinHandle<()>>,
    fixed_buffers: bool,
}

impl UringEngine {
    /// Sets up a ring of `queue_depth` entries and its thread. With `pool`,
    /// registers the pool's buffers with the ring (if the kernel refuses,
    /// e.g. over the locked-memory limit, says so and goes without).
    pub fn new(queue_depth: u32, pool: Option<&Arc<BufPool>>) -> io::Result<UringEngine> {
        if queue_depth == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "io_uring queue depth must be at least 1",
            ));
        }
        let ring = IoUring::new(queue_depth)?;
        let registered = pool.and_then(|pool| register(&ring, pool));
        let fixed_buffers = registered.is_some();
        let depth = queue_depth as usize;
        let (queue, rx) = RequestQueue::new(depth * QUEUED_PER_SLOT);
        let mut driver = Driver {
            ring,
            registered,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            completions: Vec::with_capacity(depth),
        };
        let thread = std::thread::Builder::new()
            .name("strata-uring".into())
            .spawn({
                let queue = queue.clone();
                move || driver.run(&rx, &queue)
            })?;
        Ok(UringEngine {
            queue,
            thread: Some(thread),
            fixed_buffers,
        })
    }

    /// Whether pool buffers go out as fixed (registered) reads and writes.
    pub fn fixed_buffers(&self) -> bool {
        self.fixed_buffers
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.queue.close();
        if let Some(thread) = self.thread.take() {
            // A thread that panicked leaked its in-flight buffers and failed
            // their callers as it unwound; nothing more to do for it.
            let _ = thread.join();
        }
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
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

/// A pool whose buffers the ring knows by index.
struct Registered {
    /// Buffer addresses by index: a buffer goes out fixed only if its
    /// address is the one registered at its index (it belongs to this pool).
    addrs: Vec<usize>,
    /// Keeps the registered memory alive as long as the ring.
    _pool: Arc<BufPool>,
}

fn register(ring: &IoUring, pool: &Arc<BufPool>) -> Option<Registered> {
    let regions = pool.regions();
    if regions.is_empty() {
        return None;
    }
    let iovecs: Vec<libc::iovec> = regions
        .iter()
        .map(|&(base, len)| libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        })
        .collect();
    // SAFETY: the regions are the pool's memory, valid until the pool drops;
    // `Registered` holds the pool and the driver drops it after the ring.
    match unsafe { ring.submitter().register_buffers(&iovecs) } {
        Ok(()) => Some(Registered {
            addrs: regions.iter().map(|&(base, _)| base as usize).collect(),
            _pool: pool.clone(),
        }),
        Err(error) => {
            tracing::warn!(
                %error,
                buffers = regions.len(),
                buf_bytes = pool.buf_bytes(),
                "could not register the I/O buffer pool with io_uring; using unregistered reads and writes"
            );
            None
        }
    }
}

/// An operation in flight (or about to be resubmitted).
struct InFlight {
    req: Request,
    /// Bytes written so far (writes resume from here after a short write).
    done: usize,
    retries: u32,
}

enum Next {
    Resubmit,
    Finish(io::Result<usize>),
}

/// The ring thread's state. Field order matters: the ring drops before the
/// registered pool it references.
struct Driver {
    ring: IoUring,
    registered: Option<Registered>,
    /// The in-flight slab; the index is the SQE's `user_data`.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Reused buffer for completion entries, so reaping does not hold the
    /// ring borrowed while completing (which may resubmit).
    completions: Vec<(u64, i32)>,
}

impl Driver {
    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn run(&mut self, rx: &Receiver<Request>, queue: &RequestQueue) {
        let mut open = true;
        loop {
            if self.in_flight() == 0 {
                if !open {
                    return;
                }
                // Idle: block until a request comes or the queue closes.
                match rx.recv() {
                    Ok(req) => self.start(req),
                    Err(_) => return,
                }
            }
            while open && !self.free.is_empty() {
                match rx.try_recv() {
                    Ok(req) => self.start(req),
                    Err(TryRecvError::Empty) => break,
                    // Closed and drained: finish what is in flight, then exit.
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            queue.made_space();
            if self.in_flight() == 0 {
                // Everything taken completed without reaching the kernel.
                continue;
            }
            if let Err(error) = self.ring.submit_and_wait(1) {
                match error.raw_os_error() {
                    // Interrupted, or short of kernel resources: reap what
                    // completed and try again (unsubmitted entries stay in
                    // the submission queue).
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN | libc::EBUSY) => std::thread::yield_now(),
                    _ => {
                        tracing::error!(
                            %error,
                            in_flight = self.in_flight(),
                            "io_uring submission failed; stopping the I/O engine"
                        );
                        // Dropping the driver leaks the in-flight buffers;
                        // dropping `rx` fails what was queued.
                        return;
                    }
                }
            }
            self.reap();
        }
    }

    /// Takes a free slot for `req` and queues its first submission.
    fn start(&mut self, req: Request) {
        let req = match req {
            // Nothing to move; the kernel need not see it.
            Request::Buf(r) if r.buf().is_empty() => return r.complete(Ok(0)),
            req => req,
        };
        let Some(slot) = self.free.pop() else {
            // Unreachable: callers take requests only while a slot is free.
            // Dropping the request fails it rather than overfilling the ring.
            tracing::error!("io_uring engine took a request with no free slot");
            return;
        };
        self.slots[slot] = Some(InFlight {
            req,
            done: 0,
            retries: 0,
        });
        self.push(slot);
    }

    /// Queues the submission entry for `slot`'s operation (from where it
    /// stands: `done` bytes in).
    fn push(&mut self, slot: usize) {
        let entry = match self.entry(slot) {
            Ok(entry) => entry,
            Err(error) => return self.finish(slot, Err(error)),
        };
        // SAFETY: the entry points at the slot's buffer (from `done` to its
        // length) and descriptor; the slot owns both (the IoBuf and an IoFile
        // clone) until `finish` runs for this slot, which happens only after
        // the entry's completion is reaped, or never (the buffer is leaked
        // if the thread stops with it in flight).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // Unreachable: the queue has at least `queue_depth` entries and
            // each slot has at most one entry queued.
            self.finish(
                slot,
                Err(io::Error::other("io_uring submission queue full")),
            );
        }
    }

    fn entry(&mut self, slot: usize) -> io::Result<squeue::Entry> {
        let Some(op) = self.slots[slot].as_mut() else {
            return Err(io::Error::other("io_uring slot empty"));
        };
        let user_data = slot as u64;
        let entry = match &mut op.req {
            Request::Sync(r) => opcode::Fsync::new(types::Fd(r.file.raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Request::Buf(r) => {
                let fd = types::Fd(r.file.raw_fd());
                let offset = r.offset + op.done as u64;
                let fixed = fixed_index(self.registered.as_ref(), r.buf());
                let kind = r.op;
                let buf = r.buf_mut();
                let len = u32::try_from(buf.len() - op.done).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("I/O of {} bytes exceeds what io_uring takes", buf.len()),
                    )
                })?;
                // `done < len <= capacity`, so inside the buffer.
                let ptr = buf.as_mut_ptr().wrapping_add(op.done);
                match (kind, fixed) {
                    (BufOp::Read, Some(index)) => opcode::ReadFixed::new(fd, ptr, len, index)
                        .offset(offset)
                        .build(),
                    (BufOp::Read, None) => opcode::Read::new(fd, ptr, len).offset(offset).build(),
                    (BufOp::Write, Some(index)) => {
                        opcode::WriteFixed::new(fd, ptr.cast_const(), len, index)
                            .offset(offset)
                            .build()
                    }
                    (BufOp::Write, None) => opcode::Write::new(fd, ptr.cast_const(), len)
                        .offset(offset)
                        .build(),
                }
            }
        };
        Ok(entry.user_data(user_data))
    }

    fn reap(&mut self) {
        let mut completions = std::mem::take(&mut self.completions);
        completions.clear();
        completions.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for &(user_data, result) in &completions {
            self.complete(user_data, result);
        }
        self.completions = completions;
    }

    fn complete(&mut self, user_data: u64, result: i32) {
        let slot = user_data as usize;
        let Some(op) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            tracing::error!(user_data, "io_uring completion for no operation in flight");
            return;
        };
        let next = if result < 0 {
            let errno = -result;
            if matches!(errno, libc::EINTR | libc::EAGAIN) && op.retries < RETRIES_MAX {
                op.retries += 1;
                Next::Resubmit
            } else {
                Next::Finish(Err(io::Error::from_raw_os_error(errno)))
            }
        } else {
            let n = result as usize;
            match &op.req {
                Request::Sync(_) => Next::Finish(Ok(0)),
                Request::Buf(r) => {
                    let len = r.buf().len();
                    match r.op {
                        // Short reads end at end of file; the caller sees the count.
                        BufOp::Read => Next::Finish(Ok((op.done + n).min(len))),
                        BufOp::Write if n == 0 => Next::Finish(Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            format!(
                                "write stopped after {} of {len} bytes at offset {}",
                                op.done, r.offset
                            ),
                        ))),
                        BufOp::Write => {
                            op.done += n;
                            if op.done >= len {
                                Next::Finish(Ok(len))
                            } else {
                                // Rare with O_DIRECT, but a partial write is
                                // not a success: write the rest.
                                Next::Resubmit
                            }
                        }
                    }
                }
            }
        };
        match next {
            Next::Resubmit => self.push(slot),
            Next::Finish(result) => self.finish(slot, result),
        }
    }

    /// Frees `slot` and completes its caller. Only for operations the kernel
    /// is done with.
    fn finish(&mut self, slot: usize, result: io::Result<usize>) {
        let Some(op) = self.slots[slot].take() else {
            return;
        };
        self.free.push(slot);
        match op.req {
            Request::Buf(r) => r.complete(result),
            Request::Sync(r) => r.complete(result.map(|_| ())),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Only reached with operations in flight when the thread stops
        // abnormally; the kernel may still write into their buffers.
        for op in self.slots.iter_mut().filter_map(Option::take) {
            match op.req {
                Request::Buf(r) => r.leak(),
                Request::Sync(r) => drop(r),
            }
        }
    }
}

/// The registered-buffer index to use for `buf`, if it is one of the
/// registered pool's buffers.
fn fixed_index(registered: Option<&Registered>, buf: &IoBuf) -> Option<u16> {
    let index = buf.pool_index()?;
    let addr = *registered?.addrs.get(usize::from(index))?;
    (addr == buf.as_ptr() as usize).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::nvme::engine::tests::{exercise, test_pool};

    /// The ring, or `None` (announced) where the sandbox forbids io_uring.
    fn engine(pool: Option<&Arc<BufPool>>) -> Option<UringEngine> {
        match UringEngine::new(8, pool) {
            Ok(engine) => Some(engine),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                eprintln!("SKIPPED: io_uring unavailable here ({e})");
                None
            }
            Err(e) => panic!("io_uring setup failed: {e}"),
        }
    }

    #[tokio::test]
    async fn uring_engine_round_trips() {
        let Some(engine) = engine(None) else { return };
        assert!(!engine.fixed_buffers());
        exercise(Arc::new(engine), test_pool()).await;
    }

    #[tokio::test]
    async fn uring_engine_round_trips_with_registered_pool() {
        let pool = test_pool();
        let Some(engine) = engine(Some(&pool)) else {
            return;
        };
        assert!(engine.fixed_buffers(), "pool registration failed");
        exercise(Arc::new(engine), pool).await;
    }
}

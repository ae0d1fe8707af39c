//! A fault-injecting I/O engine: wraps a real engine and, by seeded chance
//! or on command, fails reads and writes with EIO, corrupts bytes read,
//! reports a full device (ENOSPC), adds latency, and simulates a crash
//! (every later write lands torn, as a prefix, or not at all, and fails).
//!
//! Used by the simulation tests and the fault tests; the daemon never
//! builds it. It wraps an engine like any other wrapper would, so the code
//! under test is the production code.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::buf::{ALIGN, IoBuf};
use super::engine::{IoEngine, IoFile, IoFuture};

/// Fault rates (probabilities per operation) and switches.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    pub read_eio: f64,
    pub write_eio: f64,
    /// Flip one byte of what a read returns.
    pub corrupt_read: f64,
    /// Writes fail with ENOSPC.
    pub full: bool,
    /// Every operation fails with EIO (a dead device).
    pub dead: bool,
    /// Up to this much added latency per operation.
    pub latency_max: Duration,
}

/// What was injected, for the test's bookkeeping.
#[derive(Debug, Clone, Default)]
pub struct FaultLog {
    pub read_eio: u64,
    pub write_eio: u64,
    pub corrupted: u64,
    pub enospc: u64,
    /// Writes after the crash: (file id, offset, bytes that landed).
    pub torn: Vec<(u64, u64, usize)>,
    /// File ids and offsets whose reads were corrupted.
    pub corrupted_at: Vec<(u64, u64)>,
}

struct State {
    plan: FaultPlan,
    rng: StdRng,
    crashed: bool,
    log: FaultLog,
}

#[derive(Clone)]
pub struct FaultyEngine {
    inner: Arc<dyn IoEngine>,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for FaultyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyEngine")
            .field("inner", &self.inner.name())
            .finish()
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl FaultyEngine {
    pub fn new(inner: Arc<dyn IoEngine>, seed: u64, plan: FaultPlan) -> FaultyEngine {
        FaultyEngine {
            inner,
            state: Arc::new(Mutex::new(State {
                plan,
                rng: StdRng::seed_from_u64(seed),
                crashed: false,
                log: FaultLog::default(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fault state poisoned")
    }

    pub fn set_plan(&self, plan: FaultPlan) {
        self.lock().plan = plan;
    }

    /// From now on every write lands torn (a random whole-page prefix, maybe
    /// nothing) and fails, as if the process died mid-write.
    pub fn crash(&self) {
        self.lock().crashed = true;
    }

    pub fn log(&self) -> FaultLog {
        self.lock().log.clone()
    }

    /// Decides a read's fate: Err = fail now; Ok(Some(i)) = corrupt byte i.
    fn read_fate(&self, len: usize) -> (Duration, Result<Option<usize>, io::Error>) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let delay = latency(st);
        if st.plan.dead || st.rng.random_bool(st.plan.read_eio.clamp(0.0, 1.0)) {
            st.log.read_eio += 1;
            return (delay, Err(eio()));
        }
        let corrupt = st.rng.random_bool(st.plan.corrupt_read.clamp(0.0, 1.0));
        let at = st.rng.random_range(0..len.max(1));
        (delay, Ok(corrupt.then_some(at)))
    }
}

fn latency(st: &mut State) -> Duration {
    let max = st.plan.latency_max.as_micros() as u64;
    if max == 0 {
        Duration::ZERO
    } else {
        Duration::from_micros(st.rng.random_range(0..max))
    }
}

impl IoEngine for FaultyEngine {
    fn name(&self) -> &'static str {
        "faulty"
    }

    fn read(&self, file: &IoFile, offset: u64, buf: IoBuf) -> IoFuture {
        let (delay, fate) = self.read_fate(buf.len());
        let inner = self.inner.clone();
        let state = self.state.clone();
        let file = file.clone();
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let corrupt = match fate {
                Err(e) => return (buf, Err(e)),
                Ok(c) => c,
            };
            let (mut buf, r) = inner.read(&file, offset, buf).await;
            if let (Ok(n), Some(at)) = (&r, corrupt)
                && at < *n
            {
                buf[at] ^= 0x5a;
                let mut st = state.lock().expect("fault state poisoned");
                st.log.corrupted += 1;
                st.log.corrupted_at.push((file.id, offset));
            }
            (buf, r)
        })
    }

    fn write(&self, file: &IoFile, offset: u64, buf: IoBuf) -> IoFuture {
        let inner = self.inner.clone();
        let file = file.clone();
        let (delay, fate) = {
            let mut guard = self.lock();
            let st = &mut *guard;
            let delay = latency(st);
            let fate: Result<Option<usize>, io::Error> = if st.crashed {
                // A torn write: some whole pages of it land, then nothing.
                let pages = buf.len() / ALIGN;
                let landed = st.rng.random_range(0..=pages) * ALIGN;
                st.log.torn.push((file.id, offset, landed));
                Ok(Some(landed))
            } else if st.plan.dead || st.rng.random_bool(st.plan.write_eio.clamp(0.0, 1.0)) {
                st.log.write_eio += 1;
                Err(eio())
            } else if st.plan.full {
                st.log.enospc += 1;
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            } else {
                Ok(None)
            };
            (delay, fate)
        };
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match fate {
                Err(e) => (buf, Err(e)),
                Ok(None) => inner.write(&file, offset, buf).await,
                Ok(Some(0)) => (buf, Err(eio())),
                Ok(Some(landed)) => {
                    let mut part = IoBuf::alloc(landed);
                    part.copy_from_slice(&buf[..landed]);
                    let (_, _) = inner.write(&file, offset, part).await;
                    (buf, Err(eio()))
                }
            }
        })
    }

    fn sync(
        &self,
        file: &IoFile,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<()>> + Send>> {
        let dead = {
            let st = self.lock();
            st.plan.dead || st.crashed
        };
        if dead {
            return Box::pin(async { Err(eio()) });
        }
        self.inner.sync(file)
    }
}

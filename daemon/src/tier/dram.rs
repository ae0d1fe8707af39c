//! The DRAM tier: one memfd-backed arena, allocated and pre-faulted at start.
//!
//! The arena is the zero-copy data plane: its memfd is handed to authorised
//! local clients (see `server::shm`), who map it and read or write slots in
//! place. The memfd is sealed against shrinking and growing, so no client can
//! truncate it under the daemon (which would turn every access into SIGBUS).
//!
//! Invariants:
//! * the arena never grows: resident memory of this tier is its configured
//!   size, touched once at start;
//! * an extent is written only by the holder of its reservation and read only
//!   while the block is pinned (the store guarantees both); this module
//!   checks bounds, not ownership.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};

use super::alloc::ExtentAllocator;

#[derive(Debug, Clone)]
pub struct DramConfig {
    pub bytes: u64,
    pub granule_bytes: u64,
    /// Touch every page at start (first-touch faults are slow; paying them
    /// at start keeps the data path at memcpy speed).
    pub prefault: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DramError {
    #[error("creating the DRAM arena memfd: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("sizing the DRAM arena to {bytes} bytes: {source} (is /dev/shm or memory too small?)")]
    Size { bytes: u64, source: std::io::Error },
    #[error("mapping the DRAM arena: {0}")]
    Map(#[source] std::io::Error),
}

pub struct DramTier {
    fd: OwnedFd,
    map: MmapRaw,
    len: u64,
    alloc: Mutex<ExtentAllocator>,
    /// Random per start: lets a client notice that its mapping belongs to an
    /// earlier daemon.
    epoch: u64,
}

impl std::fmt::Debug for DramTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DramTier")
            .field("len", &self.len)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl DramTier {
    pub fn new(cfg: &DramConfig) -> Result<Self, DramError> {
        let granule = cfg.granule_bytes;
        let len = cfg.bytes / granule * granule;
        let fd = rustix::fs::memfd_create(
            "strata-dram-arena",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| DramError::Memfd(e.into()))?;
        rustix::fs::ftruncate(&fd, len).map_err(|e| DramError::Size {
            bytes: len,
            source: e.into(),
        })?;
        if cfg.prefault && len > 0 {
            // Allocate the shmem pages now, so that a short /dev/shm or memory
            // cgroup fails here with a clear error rather than with SIGBUS later.
            rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, len).map_err(|e| {
                DramError::Size {
                    bytes: len,
                    source: e.into(),
                }
            })?;
        }
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(|e| DramError::Memfd(e.into()))?;
        let file = std::fs::File::from(fd.try_clone().map_err(DramError::Memfd)?);
        let map = MmapOptions::new()
            .len(len.max(1) as usize)
            .map_raw(&file)
            .map_err(DramError::Map)?;
        if cfg.prefault && len > 0 {
            prefault_writable(&map, len as usize);
        }
        Ok(DramTier {
            fd,
            map,
            len,
            alloc: Mutex::new(ExtentAllocator::new(len, granule)),
            epoch: rand::random::<u64>() | 1,
        })
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.len
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Bytes an extent for `len` occupies.
    pub fn rounded(&self, len: u64) -> u64 {
        self.lock().rounded(len)
    }

    pub fn allocate(&self, len: u64) -> Option<u64> {
        self.lock().allocate(len)
    }

    pub fn free(&self, offset: u64, len: u64) {
        self.lock().free(offset, len)
    }

    pub fn free_bytes(&self) -> u64 {
        self.lock().free_bytes()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ExtentAllocator> {
        // A poisoned allocator means a panic mid-update: its bitmap cannot be
        // trusted, so stopping is the only safe answer.
        self.alloc.lock().expect("DRAM allocator poisoned")
    }

    fn check(&self, offset: u64, len: u64) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "arena access out of bounds: {offset}+{len} > {}",
            self.len
        );
    }

    /// The bytes of an extent.
    ///
    /// # Safety
    /// The caller holds a pin or the reservation of this extent, so that the
    /// daemon does not reuse it while the slice lives. Local zero-copy
    /// clients can still write the memory; every reader verifies a checksum
    /// over what it read before serving it.
    pub unsafe fn slice(&self, offset: u64, len: u64) -> &[u8] {
        self.check(offset, len);
        // SAFETY: in bounds (checked); lifetime per the caller's contract.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset as usize), len as usize) }
    }

    /// Mutable bytes of a reserved extent.
    ///
    /// # Safety
    /// The caller holds the reservation of this extent: nothing else in the
    /// daemon reads or writes it until it is published or freed.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: u64, len: u64) -> &mut [u8] {
        self.check(offset, len);
        // SAFETY: in bounds (checked); exclusivity per the caller's contract.
        unsafe {
            std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(offset as usize), len as usize)
        }
    }
}

/// Maps every page of a shared mapping writable now, so that no later
/// access pays a fault. `MAP_POPULATE` is not enough for a shared mapping:
/// it maps pages read-only and the first write still faults.
fn prefault_writable(map: &MmapRaw, len: usize) {
    let ptr = map.as_mut_ptr();
    // SAFETY: `ptr..ptr+len` is a mapping we own; MADV_POPULATE_WRITE only
    // faults pages in (Linux >= 5.14).
    let r = unsafe { rustix::mm::madvise(ptr.cast(), len, rustix::mm::Advice::LinuxPopulateWrite) };
    if r.is_err() {
        // Older kernels: touch one byte per page. The arena is zero-filled
        // and nothing else uses it yet, so writing zero changes nothing.
        for off in (0..len).step_by(4096) {
            // SAFETY: in bounds of our mapping.
            unsafe { ptr.add(off).write_volatile(0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_round_trip_and_seals() {
        let t = DramTier::new(&DramConfig {
            bytes: 1 << 20,
            granule_bytes: 4096,
            prefault: true,
        })
        .unwrap();
        let off = t.allocate(10_000).unwrap();
        assert_eq!(t.rounded(10_000), 12288);
        unsafe { t.slice_mut(off, 10_000) }.fill(7);
        assert!(unsafe { t.slice(off, 10_000) }.iter().all(|&b| b == 7));
        // Sealed: nobody holding the fd can shrink it.
        assert!(rustix::fs::ftruncate(t.memfd(), 4096).is_err());
        t.free(off, 10_000);
        assert_eq!(t.free_bytes(), 1 << 20);
    }
}

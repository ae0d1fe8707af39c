//! Aligned I/O buffers: a pool allocated and pre-faulted at start, whose
//! buffers io_uring can register once, plus standalone buffers for the rare
//! paths that need other sizes (recovery scans).
//!
//! Invariants: every buffer is 4096-aligned and its capacity a multiple of
//! 4096; a pool buffer is owned by exactly one `IoBuf` at a time and goes
//! back to the pool when that `IoBuf` drops; the pool never grows.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// O_DIRECT alignment of offsets, lengths and buffer addresses.
pub const ALIGN: usize = 4096;

pub fn align_up(n: usize) -> usize {
    n.next_multiple_of(ALIGN)
}

/// The pool's memory and free list.
pub struct BufPool {
    base: NonNull<u8>,
    buf_bytes: usize,
    count: usize,
    free: Mutex<Vec<u32>>,
    /// Woken when a buffer comes back.
    returned: tokio::sync::Notify,
}

// SAFETY: the region is plain memory; access to each buffer is exclusive to
// the IoBuf that holds its index (free list under a mutex).
unsafe impl Send for BufPool {}
unsafe impl Sync for BufPool {}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufPool")
            .field("buf_bytes", &self.buf_bytes)
            .field("count", &self.count)
            .finish()
    }
}

fn region_layout(bytes: usize) -> Layout {
    Layout::from_size_align(bytes.max(ALIGN), ALIGN).expect("valid I/O buffer layout")
}

impl BufPool {
    /// `count` buffers of `buf_bytes` (rounded up to 4096), touched now.
    pub fn new(buf_bytes: usize, count: usize) -> Arc<BufPool> {
        let buf_bytes = align_up(buf_bytes.max(1));
        let layout = region_layout(buf_bytes * count.max(1));
        // SAFETY: non-zero size.
        let base = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        // A large zeroed allocation is a fresh mapping whose pages appear on
        // first touch (slow on these VMs, and it would land on the first
        // I/Os): touch every page now.
        for page in (0..layout.size()).step_by(4096) {
            // SAFETY: inside the allocation just made; nothing else sees it.
            unsafe { base.as_ptr().add(page).write_volatile(0) };
        }
        Arc::new(BufPool {
            base,
            buf_bytes,
            count,
            free: Mutex::new((0..count as u32).rev().collect()),
            returned: tokio::sync::Notify::new(),
        })
    }

    pub fn buf_bytes(&self) -> usize {
        self.buf_bytes
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn available(&self) -> usize {
        self.free.lock().expect("buffer pool poisoned").len()
    }

    /// The buffers as (address, length), in index order: what io_uring
    /// registers.
    pub fn regions(&self) -> Vec<(*mut u8, usize)> {
        (0..self.count)
            // SAFETY: inside the region.
            .map(|i| {
                (
                    unsafe { self.base.as_ptr().add(i * self.buf_bytes) },
                    self.buf_bytes,
                )
            })
            .collect()
    }

    pub fn try_get(self: &Arc<Self>) -> Option<IoBuf> {
        let i = self.free.lock().expect("buffer pool poisoned").pop()?;
        // SAFETY: index < count, so inside the region.
        let ptr = unsafe { self.base.as_ptr().add(i as usize * self.buf_bytes) };
        Some(IoBuf {
            ptr: NonNull::new(ptr).expect("non-null region"),
            cap: self.buf_bytes,
            len: self.buf_bytes,
            owner: Owner::Pool(self.clone(), i),
        })
    }

    /// A buffer, waiting for one to come back if all are in use (the pool
    /// is the bound on I/O memory).
    pub async fn get(self: &Arc<Self>) -> IoBuf {
        loop {
            let notified = self.returned.notified();
            if let Some(b) = self.try_get() {
                return b;
            }
            notified.await;
        }
    }

    fn put_back(&self, i: u32) {
        self.free.lock().expect("buffer pool poisoned").push(i);
        self.returned.notify_one();
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; every IoBuf holds an
        // Arc to the pool, so none is alive.
        unsafe {
            std::alloc::dealloc(
                self.base.as_ptr(),
                region_layout(self.buf_bytes * self.count.max(1)),
            )
        };
    }
}

enum Owner {
    Pool(Arc<BufPool>, u32),
    Heap(Layout),
}

/// An owned, 4096-aligned buffer with a length (the bytes an I/O moves)
/// no larger than its capacity.
pub struct IoBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
    owner: Owner,
}

// SAFETY: exclusive ownership of its bytes.
unsafe impl Send for IoBuf {}
unsafe impl Sync for IoBuf {}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .field("index", &self.pool_index())
            .finish()
    }
}

impl IoBuf {
    /// A standalone buffer of `cap` bytes (rounded up to 4096), zeroed.
    pub fn alloc(cap: usize) -> IoBuf {
        let cap = align_up(cap.max(1));
        let layout = region_layout(cap);
        // SAFETY: non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        IoBuf {
            ptr,
            cap,
            len: cap,
            owner: Owner::Heap(layout),
        }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the length the next I/O moves. Panics past the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "IoBuf length {len} past capacity {}",
            self.cap
        );
        self.len = len;
    }

    /// The registered-buffer index, for pool buffers.
    pub fn pool_index(&self) -> Option<u16> {
        match &self.owner {
            Owner::Pool(_, i) => u16::try_from(*i).ok(),
            Owner::Heap(_) => None,
        }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: len <= cap, exclusive ownership.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match &self.owner {
            Owner::Pool(pool, i) => pool.put_back(*i),
            // SAFETY: allocated in `alloc` with this layout.
            Owner::Heap(layout) => unsafe { std::alloc::dealloc(self.ptr.as_ptr(), *layout) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pool_bounds_and_recycles() {
        let pool = BufPool::new(10_000, 2);
        assert_eq!(pool.buf_bytes(), 12288);
        let a = pool.try_get().unwrap();
        let mut b = pool.get().await;
        assert!(pool.try_get().is_none());
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        b.set_len(4096);
        b[..4].copy_from_slice(b"abcd");
        assert_eq!(&b[..4], b"abcd");
        let p = pool.clone();
        let waiter = tokio::spawn(async move { p.get().await.pool_index() });
        drop(a);
        assert!(waiter.await.unwrap().is_some());
        let h = IoBuf::alloc(5000);
        assert_eq!((h.capacity(), h.pool_index()), (8192, None));
    }
}

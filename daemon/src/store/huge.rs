//! An allocator for the index's large tables: 2 MiB-aligned anonymous
//! mappings marked for transparent huge pages.
//!
//! A Lookup walks hundreds of keys scattered over tables of hundreds of
//! megabytes; with 4 KiB pages nearly every key costs a TLB miss and a page
//! walk (measured: a 512-key lookup takes 10 µs against 32K blocks and 60 µs
//! against 10M, for the same keys). With 2 MiB pages the tables of a 10M
//! block index fit the TLB. Small allocations go to the global allocator.
//! Where THP is off, `madvise` is a no-op and everything still works.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

use allocator_api2::alloc::{AllocError, Allocator, Global};

pub const HUGE_PAGE: usize = 2 << 20;

static MAPPED: AtomicUsize = AtomicUsize::new(0);

/// Bytes currently mapped by [`HugePages`] (all instances).
pub fn mapped_bytes() -> usize {
    MAPPED.load(Ordering::Relaxed)
}

#[derive(Debug, Clone, Copy, Default)]
pub struct HugePages;

fn mapped_len(size: usize) -> usize {
    size.next_multiple_of(HUGE_PAGE)
}

// SAFETY: blocks come from mmap (valid, aligned to 2 MiB, which satisfies any
// layout alignment up to that) or from the global allocator; `deallocate`
// routes each back by the same size rule.
unsafe impl Allocator for HugePages {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() < HUGE_PAGE || layout.align() > HUGE_PAGE {
            return Global.allocate(layout);
        }
        let len = mapped_len(layout.size());
        // Map one huge page more than needed and trim to a 2 MiB boundary.
        let span = len + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let raw = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                span,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .map_err(|_| AllocError)?;
        let start = raw as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let head = aligned - start;
        let tail = span - head - len;
        // SAFETY: the trimmed pieces lie inside our mapping and are unused.
        unsafe {
            if head > 0 {
                let _ = rustix::mm::munmap(raw, head);
            }
            if tail > 0 {
                let _ = rustix::mm::munmap((aligned + len) as *mut _, tail);
            }
            let _ = rustix::mm::madvise(aligned as *mut _, len, rustix::mm::Advice::LinuxHugepage);
        }
        MAPPED.fetch_add(len, Ordering::Relaxed);
        let ptr = NonNull::new(aligned as *mut u8).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(ptr, len))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() < HUGE_PAGE || layout.align() > HUGE_PAGE {
            // SAFETY: allocated by Global with this layout (same rule).
            unsafe { Global.deallocate(ptr, layout) };
            return;
        }
        let len = mapped_len(layout.size());
        // SAFETY: exactly the mapping `allocate` made for this size.
        unsafe {
            let _ = rustix::mm::munmap(ptr.as_ptr().cast(), len);
        }
        MAPPED.fetch_sub(len, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_and_small_allocations_round_trip() {
        let mut v: allocator_api2::vec::Vec<u64, HugePages> =
            allocator_api2::vec::Vec::with_capacity_in(1 << 20, HugePages);
        assert_eq!(v.as_ptr() as usize % HUGE_PAGE, 0);
        v.extend(0..(1 << 20));
        // Growth moves to a bigger mapping and frees the old one.
        v.extend(0..(1 << 20));
        assert_eq!(v[(1 << 20) + 5], 5);
        drop(v);
        let mut s: allocator_api2::vec::Vec<u8, HugePages> =
            allocator_api2::vec::Vec::new_in(HugePages);
        s.push(1);
        assert_eq!(s[0], 1);
    }
}

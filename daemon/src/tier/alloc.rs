//! Extent allocator over a fixed range, in granules, backed by a bitmap.
//!
//! Invariants:
//! * a granule is either free or owned by exactly one extent; `free` of an
//!   extent that is not fully allocated is a bug and panics (a corrupt global
//!   structure stops the process rather than hand out the same bytes twice);
//! * all memory is allocated at construction: no heap allocation per block.
//!
//! Search is next-fit from a cursor, which makes the common case (blocks of
//! one namespace, all the same size, freed by eviction) O(1) amortised; a
//! full scan of a 1 GiB arena in 4 KiB granules is 4096 words.

#[derive(Debug)]
pub struct ExtentAllocator {
    granule_shift: u32,
    /// Bit set = granule in use. Bits past `granules` are set, so they are
    /// never handed out.
    words: Vec<u64>,
    granules: u64,
    free_granules: u64,
    /// Word to start the next search at.
    cursor: usize,
}

impl ExtentAllocator {
    /// `total_bytes` is rounded down to whole granules. `granule` must be a
    /// power of two.
    pub fn new(total_bytes: u64, granule: u64) -> Self {
        assert!(granule.is_power_of_two(), "granule must be a power of two");
        let granule_shift = granule.trailing_zeros();
        let granules = total_bytes >> granule_shift;
        let nwords = granules.div_ceil(64) as usize;
        let mut words = vec![0u64; nwords];
        let tail = granules % 64;
        if tail != 0 {
            words[nwords - 1] = !0u64 << tail;
        }
        ExtentAllocator {
            granule_shift,
            words,
            granules,
            free_granules: granules,
            cursor: 0,
        }
    }

    pub fn granule_bytes(&self) -> u64 {
        1 << self.granule_shift
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.granules << self.granule_shift
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_granules << self.granule_shift
    }

    /// Bytes an allocation of `len` occupies (rounded up to granules).
    pub fn rounded(&self, len: u64) -> u64 {
        len.div_ceil(self.granule_bytes()) << self.granule_shift
    }

    /// Allocates a contiguous extent of at least `len` bytes; returns its
    /// byte offset, or `None` when no free run is long enough.
    pub fn allocate(&mut self, len: u64) -> Option<u64> {
        let n = len.div_ceil(self.granule_bytes()).max(1);
        if n > self.free_granules {
            return None;
        }
        let start = self
            .find_run(self.cursor, self.words.len(), n)
            .or_else(|| self.find_run(0, self.cursor.min(self.words.len()), n))?;
        self.set_range(start, n, true);
        self.free_granules -= n;
        self.cursor = ((start + n) / 64) as usize;
        if self.cursor >= self.words.len() {
            self.cursor = 0;
        }
        Some(start << self.granule_shift)
    }

    /// Frees an extent returned by [`allocate`](Self::allocate) with the same `len`.
    pub fn free(&mut self, offset: u64, len: u64) {
        assert_eq!(
            offset & (self.granule_bytes() - 1),
            0,
            "unaligned free at {offset}"
        );
        let start = offset >> self.granule_shift;
        let n = len.div_ceil(self.granule_bytes()).max(1);
        assert!(
            start + n <= self.granules,
            "free past the end: {offset}+{len}"
        );
        self.set_range(start, n, false);
        self.free_granules += n;
    }

    /// Finds `n` consecutive free granules whose run starts in words
    /// `[from, to)`; a run may extend past `to`.
    fn find_run(&self, from: usize, to: usize, n: u64) -> Option<u64> {
        let mut run_start = 0u64;
        let mut run_len = 0u64;
        let mut w = from;
        while w < self.words.len() {
            let word = self.words[w];
            let base = (w as u64) * 64;
            if word == 0 {
                if run_len == 0 {
                    if w >= to {
                        return None;
                    }
                    run_start = base;
                }
                run_len += 64;
                if run_len >= n {
                    return Some(run_start);
                }
            } else if word == !0 {
                if w >= to {
                    return None;
                }
                run_len = 0;
            } else {
                // Mixed word: walk its free runs.
                let mut bit = 0u32;
                while bit < 64 {
                    let rest = word >> bit;
                    if rest & 1 == 1 {
                        // Skip used bits.
                        let used = (!rest).trailing_zeros().min(64 - bit);
                        bit += used;
                        run_len = 0;
                        continue;
                    }
                    let free = if rest == 0 {
                        64 - bit
                    } else {
                        rest.trailing_zeros().min(64 - bit)
                    };
                    if run_len == 0 {
                        if w >= to {
                            return None;
                        }
                        run_start = base + bit as u64;
                    }
                    run_len += free as u64;
                    if run_len >= n {
                        return Some(run_start);
                    }
                    bit += free;
                }
            }
            w += 1;
        }
        None
    }

    fn set_range(&mut self, start: u64, n: u64, used: bool) {
        let mut g = start;
        let end = start + n;
        while g < end {
            let w = (g / 64) as usize;
            let bit = g % 64;
            let take = (64 - bit).min(end - g);
            let mask = if take == 64 {
                !0u64
            } else {
                ((1u64 << take) - 1) << bit
            };
            if used {
                assert_eq!(
                    self.words[w] & mask,
                    0,
                    "allocating granules already in use"
                );
                self.words[w] |= mask;
            } else {
                assert_eq!(
                    self.words[w] & mask,
                    mask,
                    "freeing granules that are not in use"
                );
                self.words[w] &= !mask;
            }
            g += take;
        }
    }

    /// Bytes of the bookkeeping itself.
    pub fn overhead_bytes(&self) -> usize {
        self.words.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fills_exactly_and_reuses() {
        let mut a = ExtentAllocator::new(100 * 4096, 4096);
        let mut got = vec![];
        while let Some(off) = a.allocate(4096 * 3) {
            got.push(off);
        }
        assert_eq!(got.len(), 33);
        assert_eq!(a.free_bytes(), 4096);
        a.free(got[5], 4096 * 3);
        assert_eq!(a.allocate(4096 * 3), Some(got[5]));
        assert_eq!(a.allocate(4096 * 2), None);
        assert_eq!(a.allocate(1), Some(99 * 4096));
    }

    proptest! {
        /// Against a model: allocations never overlap, stay in range, and an
        /// allocation fails only when no free run is long enough.
        #[test]
        fn never_overlaps(ops in proptest::collection::vec((0u8..3, 1u64..20), 1..300)) {
            let total = 200u64;
            let mut a = ExtentAllocator::new(total * 64, 64);
            let mut model = vec![false; total as usize];
            let mut live: Vec<(u64, u64)> = vec![];
            for (op, n) in ops {
                if op < 2 || live.is_empty() {
                    match a.allocate(n * 64) {
                        Some(off) => {
                            let g = off / 64;
                            prop_assert!(g + n <= total);
                            for i in g..g + n {
                                prop_assert!(!model[i as usize], "overlap");
                                model[i as usize] = true;
                            }
                            live.push((off, n));
                        }
                        None => {
                            let longest = model.split(|&u| u).map(|r| r.len() as u64).max().unwrap_or(0);
                            prop_assert!(longest < n, "refused {n} with a free run of {longest}");
                        }
                    }
                } else {
                    let (off, n) = live.swap_remove((n as usize) % live.len());
                    a.free(off, n * 64);
                    for i in off / 64..off / 64 + n {
                        model[i as usize] = false;
                    }
                }
                let free = model.iter().filter(|u| !**u).count() as u64;
                prop_assert_eq!(a.free_bytes(), free * 64);
            }
        }
    }
}

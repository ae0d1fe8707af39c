//! Block summaries: what the daemon keeps in DRAM about every block so that
//! Attend can select blocks without reading them and verify the one layer
//! it reads of a block without hashing the whole block.
//!
//! A summary is one entry in a pre-sized region, laid out as
//!
//! ```text
//! sums [layers][leaves][2]            u64   XXH3-64 of the leaf's K (0) and V (1) rows in layer l
//! min  [layers][kv_heads][leaves][d]  f16   per-channel minimum of the head's keys in the leaf, rounded toward -inf
//! max  [layers][kv_heads][leaves][d]  f16   per-channel maximum, rounded toward +inf
//! the sketch section, only with `compute.key_sketch`:
//! vsum [layers][kv_heads][d]  f32   per-channel sum of the head's values over the stored tokens
//! sketch [layers][kv_heads][d][tokens_per_block] u8
//! ```
//!
//! The sketch is the layer's K of each KV head dim-major as 8-bit codes
//! between that head's min and max over the block (the union of its
//! leaves' boxes: the section does not depend on the leaves;
//! `strata_kernels::sketch`): SparF
//! scores tokens from the r channel rows it needs (a 32nd of K at r = d/8)
//! instead of reading and verifying the whole K. It is derived data for
//! ranking only (SparF attends the chosen tokens from the stored, verified
//! K and V), so it is not checksummed. It is half the size of f16 K.
//!
//! The V sums (f32, added in token order) give SparF's optional mean-value
//! correction the mean of V over a chain (the sum over its blocks ÷ its
//! tokens) without reading V. Unlike the sketch they enter the answer, so
//! they are taken, like the checksums beside them, from bytes that passed
//! the producer's checksum (or the record's, at recovery), and live in
//! the same DRAM region as those checksums. They cover every stored token
//! of the block: a block attended only in part (`last_block_tokens`) has
//! no usable sum.
//!
//! With the section an entry is about 37.5% of a block of 16 f16 tokens
//! (6.25% + 25% sketch + 6.25% V sums) instead of 6.25%, which is why it is
//! off by default. Whether a region keeps the section is fixed at start
//! ([`SummaryRegion::entry_bytes`]); a view knows from its length.
//!
//! **Leaves.** A block is cut into `leaves = tokens_per_block /
//! leaf_tokens` leaves of `leaf_tokens` consecutive tokens
//! (`compute.leaf_tokens`; by default one leaf, the whole block, and the
//! layout above is then exactly the one-leaf layout of before). Rows are
//! `[token][kv_head][d]` per layer tensor, so a leaf's K (or V) of a layer
//! is one contiguous byte range, and its sum checks exactly what a read of
//! that leaf brings. A block's box is the union of its leaves' boxes (f16
//! rounding is monotone, so the union of the leaves' rounded boxes is the
//! rounded box of the block, bit for bit): the block level is derived,
//! never stored ([`SummaryView::bounds`]). Leaves of a partial block past
//! its stored tokens are empty: sum of no bytes, box `[+inf, -inf]` (never
//! ranked; a union ignores them). At 8-token leaves of 16-bit KV an entry
//! is 12.5% of the block (plus 16 bytes per leaf and layer of sums).
//!
//! The bounds are those of
//! `strata_kernels::abstracts` (f16, rounded outward), computed here in one
//! integer pass per layer because this runs on every publish. No mean is
//! kept: selection uses only the min/max bound (a mean-key abstract fails
//! on needle heads, COMPUTE.md §3), and dropping it keeps the abstracts at
//! `2 / (leaf_tokens * dtype bytes)` of the KV (6.25% at 16 tokens of f16,
//! 12.5% at 8).
//!
//! Invariants:
//! * an entry is written once, by its owner, before the block is visible,
//!   and read only while the block is pinned; it is freed with the block's
//!   last copy (the store does all three);
//! * the region never grows: resident memory is at most its configured
//!   size; a block that finds it full has no summary (counted), which makes
//!   it rank first in sparse selection and be verified whole when read.

use std::ops::Range;
use std::sync::Mutex;

use half::f16;
use memmap2::{MmapOptions, MmapRaw};
use strata_kernels::block::BlockGeometry;
use strata_kernels::elem::{f16_round_down, f16_round_up};
use strata_proto::{Dtype, KvKind, Layout};

use crate::tier::alloc::ExtentAllocator;

/// Allocation unit of the region (entries are at least this aligned).
pub const SUMMARY_GRANULE: u64 = 64;

/// The shape of a namespace's blocks, for the layouts Attend serves:
/// separate K and V in f32, f16 or bf16. Copy, so it travels with a put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geom {
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub tokens_per_block: u32,
    pub dtype: Dtype,
    /// Tokens per summary leaf (`tokens_per_block` divided by the leaves
    /// of a block; [`Geom::of`] gives one leaf, the region sets its own
    /// with [`Geom::with_leaf_tokens`]).
    pub leaf_tokens: u32,
}

/// Most leaves a block is cut into (a leaf set is a `u64` mask).
pub const MAX_LEAVES: u32 = 64;

/// Fewest tokens a leaf holds (`compute.leaf_tokens`).
pub const MIN_LEAF_TOKENS: u32 = 4;

impl Geom {
    /// `None` for layouts Attend does not serve (MLA latents, fp8).
    pub fn of(l: &Layout) -> Option<Geom> {
        if l.kv_kind != KvKind::Separate || l.dtype == Dtype::Fp8E4m3 {
            return None;
        }
        Some(Geom {
            layers: l.num_layers,
            kv_heads: l.num_kv_heads,
            head_dim: l.head_dim,
            tokens_per_block: l.tokens_per_block,
            dtype: l.dtype,
            leaf_tokens: l.tokens_per_block,
        })
    }

    /// This geometry with leaves of `leaf_tokens` tokens when they cut its
    /// blocks evenly into 2 to [`MAX_LEAVES`] leaves of at least
    /// [`MIN_LEAF_TOKENS`]; otherwise (0, the block size or more, not a
    /// divisor) one leaf per block. Idempotent.
    pub fn with_leaf_tokens(mut self, leaf_tokens: u32) -> Geom {
        let tpb = self.tokens_per_block;
        self.leaf_tokens = if leaf_tokens >= MIN_LEAF_TOKENS
            && leaf_tokens < tpb
            && tpb.is_multiple_of(leaf_tokens)
            && tpb / leaf_tokens <= MAX_LEAVES
        {
            leaf_tokens
        } else {
            tpb
        };
        self
    }

    /// Leaves per block.
    pub fn leaves(&self) -> u32 {
        self.tokens_per_block / self.leaf_tokens
    }

    /// Tokens of leaf `leaf` in a block of `tokens` stored tokens (empty
    /// past them).
    pub fn leaf_tokens_of(&self, tokens: u32, leaf: u32) -> Range<u32> {
        let a = (leaf * self.leaf_tokens).min(tokens);
        a..((leaf + 1) * self.leaf_tokens).min(tokens)
    }

    /// Byte range of `tensor` of `layer` over the tokens of `leaves` in a
    /// payload of `tokens` tokens: one contiguous range (rows are
    /// `[token][kv_head][d]`).
    pub fn leaves_range(
        &self,
        tokens: u32,
        layer: u32,
        tensor: u32,
        leaves: Range<u32>,
    ) -> Range<usize> {
        let t = self.tensor_range(tokens, layer, tensor);
        let a = self.leaf_tokens_of(tokens, leaves.start).start as usize;
        let b = self.leaf_tokens_of(tokens, leaves.end.max(1) - 1).end as usize;
        let b = if leaves.is_empty() { a } else { b };
        t.start + a * self.row_bytes()..t.start + b * self.row_bytes()
    }

    pub fn elem_bytes(&self) -> usize {
        self.dtype.bytes() as usize
    }

    /// Bytes of one token of one tensor of one layer (all KV heads).
    pub fn row_bytes(&self) -> usize {
        self.kv_heads as usize * self.head_dim as usize * self.elem_bytes()
    }

    /// Bytes of one token across all layers, K and V.
    pub fn token_bytes(&self) -> u64 {
        2 * self.layers as u64 * self.row_bytes() as u64
    }

    /// Tokens a payload of `len` bytes holds (`None` if not whole tokens).
    pub fn tokens_of(&self, len: u64) -> Option<u32> {
        let t = self.token_bytes();
        (len > 0 && len.is_multiple_of(t) && len / t <= self.tokens_per_block as u64)
            .then(|| (len / t) as u32)
    }

    fn block(&self, tokens: u32) -> BlockGeometry {
        BlockGeometry {
            layers: self.layers,
            tensors: 2,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            dtype_bytes: self.dtype.bytes(),
            tokens,
        }
    }

    /// Byte range of `tensor` (0 = K, 1 = V) of `layer` in a payload of
    /// `tokens` tokens.
    pub fn tensor_range(&self, tokens: u32, layer: u32, tensor: u32) -> Range<usize> {
        self.block(tokens).tensor_range(layer, tensor)
    }

    /// Bytes of one summary entry without a sketch.
    pub fn summary_bytes(&self) -> usize {
        self.sums_bytes() + 2 * self.abstract_elems() * self.leaves() as usize * 2
    }

    /// Bytes of the checksums at the start of an entry.
    fn sums_bytes(&self) -> usize {
        self.layers as usize * self.leaves() as usize * 16
    }

    /// Bytes of the sketch section: the V sums (f32 per layer, KV head and
    /// channel) and the key sketch (`tokens_per_block` slots per channel).
    pub fn sketch_bytes(&self) -> usize {
        self.v_sum_bytes() + self.abstract_elems() * self.tokens_per_block as usize
    }

    /// Bytes of the V sums at the start of the sketch section.
    pub fn v_sum_bytes(&self) -> usize {
        self.abstract_elems() * 4
    }

    /// Bytes of the V sum of one KV head in one layer.
    pub fn v_sum_head_bytes(&self) -> usize {
        self.head_dim as usize * 4
    }

    /// Byte offsets in an entry of the f16 minimum rows and maximum rows
    /// of `head` in `layer`: `leaves` rows of `head_dim` values each, leaf
    /// by leaf.
    fn bound_rows_at(&self, layer: u32, head: u32) -> (usize, usize) {
        let l = self.leaves() as usize;
        let lo = self.sums_bytes()
            + (layer as usize * self.kv_heads as usize + head as usize)
                * l
                * self.head_dim as usize
                * 2;
        (lo, lo + self.abstract_elems() * l * 2)
    }

    /// f16 values per leaf in each of the min and max arrays.
    fn abstract_elems(&self) -> usize {
        self.layers as usize * self.kv_heads as usize * self.head_dim as usize
    }

    /// Bytes of the min and max rows of one layer, all heads and leaves.
    pub fn abstract_layer_bytes(&self) -> usize {
        2 * self.kv_heads as usize * self.leaves() as usize * self.head_dim as usize * 2
    }
}

/// Read access to one summary entry.
#[derive(Debug, Clone, Copy)]
pub struct SummaryView<'a> {
    g: Geom,
    bytes: &'a [u8],
}

impl<'a> SummaryView<'a> {
    /// A view of an entry with or without a sketch (told by its length).
    pub fn new(g: Geom, bytes: &'a [u8]) -> Self {
        assert!(
            bytes.len() == g.summary_bytes() || bytes.len() == g.summary_bytes() + g.sketch_bytes(),
            "summary entry size"
        );
        SummaryView { g, bytes }
    }

    /// The key sketch of `head` in `layer`: `[d][tokens_per_block]` codes
    /// (the block's tokens first in each row), between the head's
    /// [`bounds`](Self::bounds). None when the region keeps no sketches.
    pub fn sketch(&self, layer: u32, head: u32) -> Option<&'a [u8]> {
        let g = &self.g;
        if self.bytes.len() == g.summary_bytes() {
            return None;
        }
        let base = g.summary_bytes() + g.v_sum_bytes();
        let row = g.head_dim as usize * g.tokens_per_block as usize;
        let at = base + (layer as usize * g.kv_heads as usize + head as usize) * row;
        Some(&self.bytes[at..at + row])
    }

    /// Whether the entry has the sketch section (key sketch and V sums).
    pub fn has_sketch(&self) -> bool {
        self.bytes.len() != self.g.summary_bytes()
    }

    /// The per-channel sum of `head`'s values in `layer` over the block's
    /// stored tokens, into `out` (`head_dim` long). False (and nothing
    /// written) when the region keeps no sketch section.
    pub fn v_sum(&self, layer: u32, head: u32, out: &mut [f32]) -> bool {
        let g = &self.g;
        if !self.has_sketch() {
            return false;
        }
        let d = g.head_dim as usize;
        let at = g.summary_bytes() + (layer as usize * g.kv_heads as usize + head as usize) * d * 4;
        for (o, c) in out[..d]
            .iter_mut()
            .zip(self.bytes[at..at + 4 * d].chunks_exact(4))
        {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        true
    }

    /// Leaves per block of this entry.
    pub fn leaves(&self) -> u32 {
        self.g.leaves()
    }

    /// The geometry the entry was written with (its leaf size included).
    pub fn geom(&self) -> Geom {
        self.g
    }

    /// The checksum of `tensor` (0 = K, 1 = V) of `layer` over leaf
    /// `leaf`'s rows.
    pub fn leaf_sum(&self, layer: u32, leaf: u32, tensor: u32) -> u64 {
        let at = ((layer * self.g.leaves() + leaf) as usize * 2 + tensor as usize) * 8;
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().expect("8 bytes"))
    }

    /// Where `layer`'s K and V checksums sit (every leaf's), for a
    /// prefetch hint before [`SummaryView::verify`] reads them.
    pub fn layer_sums(&self, layer: u32) -> *const u8 {
        let at = (layer * self.g.leaves()) as usize * 16;
        self.bytes[at..].as_ptr()
    }

    /// Whether `bytes`, the rows of `tensor` of `layer` over `leaves` in
    /// a block of `tokens` stored tokens ([`Geom::leaves_range`]), match
    /// every one of those leaves' checksums. The whole layer is
    /// `0..leaves()`: hashing it leaf by leaf costs what one hash of it
    /// did.
    pub fn verify(
        &self,
        layer: u32,
        tensor: u32,
        tokens: u32,
        leaves: Range<u32>,
        bytes: &[u8],
    ) -> bool {
        let g = &self.g;
        let base = g.leaves_range(tokens, layer, tensor, leaves.clone()).start;
        if bytes.len() != g.leaves_range(tokens, layer, tensor, leaves.clone()).len() {
            return false;
        }
        leaves.into_iter().all(|j| {
            let r = g.leaves_range(tokens, layer, tensor, j..j + 1);
            strata_proto::checksum(&bytes[r.start - base..r.end - base])
                == self.leaf_sum(layer, j, tensor)
        })
    }

    fn f16_row(&self, at: usize, out: &mut [f16]) {
        let d = self.g.head_dim as usize;
        for (o, c) in out[..d]
            .iter_mut()
            .zip(self.bytes[at..at + 2 * d].chunks_exact(2))
        {
            *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
        }
    }

    /// The minimum and maximum of channel `c` of `head`'s keys in `layer`
    /// over the whole block (the union of its leaves' boxes).
    #[inline]
    pub fn bound(&self, layer: u32, head: u32, c: usize) -> (f16, f16) {
        let (lo_at, hi_at) = self.g.bound_rows_at(layer, head);
        let (mut at, mut hi_at) = (lo_at + 2 * c, hi_at + 2 * c);
        let b = self.bytes;
        let get = |at: usize| f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]]));
        let (mut lo, mut hi) = (get(at), get(hi_at));
        for _ in 1..self.g.leaves() {
            at += 2 * self.g.head_dim as usize;
            hi_at += 2 * self.g.head_dim as usize;
            let (l, h) = (get(at), get(hi_at));
            if l < lo {
                lo = l;
            }
            if h > hi {
                hi = h;
            }
        }
        (lo, hi)
    }

    /// Where the minimum and maximum rows of `head` in `layer` start (for
    /// prefetching; each spans `leaves * head_dim` f16).
    pub fn bound_ptrs(&self, layer: u32, head: u32) -> (*const u8, *const u8) {
        let (lo_at, hi_at) = self.g.bound_rows_at(layer, head);
        (self.bytes[lo_at..].as_ptr(), self.bytes[hi_at..].as_ptr())
    }

    /// The per-channel minimum and maximum of `head`'s keys in `layer`
    /// over the whole block, the union of its leaves' boxes (into `min`,
    /// `max`, each `head_dim` long).
    pub fn bounds(&self, layer: u32, head: u32, min: &mut [f16], max: &mut [f16]) {
        let (lo_at, hi_at) = self.g.bound_rows_at(layer, head);
        self.f16_row(lo_at, min);
        self.f16_row(hi_at, max);
        let d = self.g.head_dim as usize;
        for j in 1..self.g.leaves() as usize {
            let (l, h) = (lo_at + j * 2 * d, hi_at + j * 2 * d);
            for (i, (mn, mx)) in min[..d].iter_mut().zip(&mut max[..d]).enumerate() {
                let lo = f16::from_bits(u16::from_le_bytes([
                    self.bytes[l + 2 * i],
                    self.bytes[l + 2 * i + 1],
                ]));
                let hi = f16::from_bits(u16::from_le_bytes([
                    self.bytes[h + 2 * i],
                    self.bytes[h + 2 * i + 1],
                ]));
                if lo < *mn {
                    *mn = lo;
                }
                if hi > *mx {
                    *mx = hi;
                }
            }
        }
    }

    /// The per-channel minimum and maximum of `head`'s keys in `layer`
    /// over leaf `leaf` (an empty leaf: `+inf`, `-inf`).
    pub fn leaf_bounds(&self, layer: u32, head: u32, leaf: u32, min: &mut [f16], max: &mut [f16]) {
        let (lo_at, hi_at) = self.g.bound_rows_at(layer, head);
        let off = leaf as usize * 2 * self.g.head_dim as usize;
        self.f16_row(lo_at + off, min);
        self.f16_row(hi_at + off, max);
    }
}

/// Scratch for [`summarize`], made once per caller: running per-channel
/// minimum and maximum of one layer's keys, all KV heads (`[kv_heads][d]`),
/// as order-preserving integer keys (16-bit types) or f32.
#[derive(Debug)]
pub struct SummaryScratch {
    row16: Vec<u16>,
    lo16: Vec<u16>,
    hi16: Vec<u16>,
    lo32: Vec<f32>,
    hi32: Vec<f32>,
    /// The sketch's box of one head (the stored f16 bounds, as f32), and
    /// one key row.
    lo_f: Vec<f32>,
    hi_f: Vec<f32>,
    row_f: Vec<f32>,
    /// One layer's K (or V) when the payload is not aligned to its
    /// element type.
    copy: Vec<u32>,
    /// The V sums of one layer (`[kv_heads][d]`), and one V row as f32.
    v_acc: Vec<f32>,
    v_row: Vec<f32>,
}

impl SummaryScratch {
    pub fn new(g: &Geom) -> Self {
        let w = g.kv_heads as usize * g.head_dim as usize;
        SummaryScratch {
            row16: vec![0; w],
            lo16: vec![0; w],
            hi16: vec![0; w],
            lo32: vec![0.0; w],
            hi32: vec![0.0; w],
            lo_f: vec![0.0; g.head_dim as usize],
            hi_f: vec![0.0; g.head_dim as usize],
            row_f: vec![0.0; g.head_dim as usize],
            copy: Vec::new(),
            v_acc: vec![0.0; w],
            v_row: vec![0.0; w],
        }
    }
}

/// Maps the bits of a 16-bit float (f16 or bf16: sign, then magnitude) to
/// an unsigned integer in the same order as the values (-0 just below +0).
#[inline(always)]
fn ord16(b: u16) -> u16 {
    // Negative (sign set): all bits flipped; else the sign bit set. Branch
    // free (an arithmetic shift makes the mask), so the loops vectorise.
    b ^ (((b as i16) >> 15) as u16 | 0x8000)
}

/// The inverse of [`ord16`].
#[inline(always)]
fn unord16(k: u16) -> u16 {
    if k & 0x8000 != 0 { k & 0x7fff } else { !k }
}

/// Per-channel min and max over the rows of one layer's K (`[tokens][w]`
/// 16-bit floats, little-endian bytes) as ordered keys: one linear pass of
/// integer min/max, which LLVM vectorises.
fn minmax16(k: &[u8], w: usize, row: &mut [u16], lo: &mut [u16], hi: &mut [u16]) {
    lo.fill(u16::MAX);
    hi.fill(0);
    for bytes in k.chunks_exact(2 * w) {
        // Widen the row's little-endian bytes to u16 first (a plain copy on
        // little-endian machines), then one min/max lane per channel.
        for (x, c) in row.iter_mut().zip(bytes.chunks_exact(2)) {
            *x = u16::from_le_bytes([c[0], c[1]]);
        }
        for ((l, h), &x) in lo.iter_mut().zip(hi.iter_mut()).zip(row.iter()) {
            let v = ord16(x);
            *l = (*l).min(v);
            *h = (*h).max(v);
        }
    }
}

/// The same for f32 keys.
fn minmax32(k: &[u8], w: usize, lo: &mut [f32], hi: &mut [f32]) {
    lo.fill(f32::INFINITY);
    hi.fill(f32::NEG_INFINITY);
    for row in k.chunks_exact(4 * w) {
        for ((l, h), c) in lo.iter_mut().zip(hi.iter_mut()).zip(row.chunks_exact(4)) {
            let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            *l = l.min(v);
            *h = h.max(v);
        }
    }
}

/// Computes the summary of a payload of `tokens` tokens into `out` (one
/// entry, [`Geom::summary_bytes`] long, or that plus
/// [`Geom::sketch_bytes`] for an entry with the sketch section: key sketch
/// and V sums). Pure compute, no locks.
///
/// Per layer: the checksum of K and of V, and per KV head and channel the
/// minimum and maximum key as f16. f16 keys are their own bounds (exact);
/// bf16 and f32 bounds are rounded outward to f16 (the box still holds every
/// key, as `strata_kernels::abstracts::chunk_abstracts` does). One pass over K per layer, in integer
/// order keys for the 16-bit types: this runs on every publish, so it must
/// cost about a memory read of K (a per-element f16 → f32 conversion made
/// puts several times slower). NaN keys are not expected in KV; they would
/// widen the box, never narrow it.
pub fn summarize(g: &Geom, payload: &[u8], tokens: u32, s: &mut SummaryScratch, out: &mut [u8]) {
    let sketch = out.len() == g.summary_bytes() + g.sketch_bytes();
    assert!(
        sketch || out.len() == g.summary_bytes(),
        "summary entry size"
    );
    assert_eq!(
        payload.len() as u64,
        g.token_bytes() * tokens as u64,
        "payload is not {tokens} tokens"
    );
    let w = g.kv_heads as usize * g.head_dim as usize;
    let (d, nl) = (g.head_dim as usize, g.leaves());
    for layer in 0..g.layers {
        for leaf in 0..nl {
            for tensor in 0..2 {
                let r = g.leaves_range(tokens, layer, tensor, leaf..leaf + 1);
                let at = ((layer * nl + leaf) as usize * 2 + tensor as usize) * 8;
                out[at..at + 8].copy_from_slice(&strata_proto::checksum(&payload[r]).to_le_bytes());
            }
            let k = &payload[g.leaves_range(tokens, layer, 0, leaf..leaf + 1)];
            // Rows are [token][kv_head][d]: channel i of a row is channel
            // i % d of head i / d, whose leaf rows sit at `bound_rows_at`.
            let mut put = |i: usize, lo: f16, hi: f16| {
                let (lo_at, hi_at) = g.bound_rows_at(layer, (i / d) as u32);
                let off = (leaf as usize * d + i % d) * 2;
                out[lo_at + off..lo_at + off + 2].copy_from_slice(&lo.to_bits().to_le_bytes());
                out[hi_at + off..hi_at + off + 2].copy_from_slice(&hi.to_bits().to_le_bytes());
            };
            if k.is_empty() {
                // A leaf past a partial block's tokens: the empty box.
                for i in 0..w {
                    put(i, f16::INFINITY, f16::NEG_INFINITY);
                }
                continue;
            }
            match g.dtype {
                Dtype::F16 => {
                    minmax16(k, w, &mut s.row16, &mut s.lo16, &mut s.hi16);
                    for i in 0..w {
                        put(
                            i,
                            f16::from_bits(unord16(s.lo16[i])),
                            f16::from_bits(unord16(s.hi16[i])),
                        );
                    }
                }
                Dtype::Bf16 => {
                    minmax16(k, w, &mut s.row16, &mut s.lo16, &mut s.hi16);
                    for i in 0..w {
                        let lo = f32::from_bits((unord16(s.lo16[i]) as u32) << 16);
                        let hi = f32::from_bits((unord16(s.hi16[i]) as u32) << 16);
                        put(i, f16_round_down(lo), f16_round_up(hi));
                    }
                }
                Dtype::F32 => {
                    minmax32(k, w, &mut s.lo32, &mut s.hi32);
                    for i in 0..w {
                        put(i, f16_round_down(s.lo32[i]), f16_round_up(s.hi32[i]));
                    }
                }
                Dtype::Fp8E4m3 => unreachable!("Geom excludes fp8"),
            }
        }
        if sketch {
            let k = &payload[g.tensor_range(tokens, layer, 0)];
            sketch_layer(g, k, tokens, layer, s, out);
            v_sum_layer(g, &payload[g.tensor_range(tokens, layer, 1)], layer, s, out);
        }
    }
}

/// Writes the per-channel sums of `layer`'s V (`v`, `[tokens][kv_heads][d]`)
/// into the entry `out`: the row layout is the sums' own `[kv_heads][d]`.
fn v_sum_layer(g: &Geom, v: &[u8], layer: u32, s: &mut SummaryScratch, out: &mut [u8]) {
    s.v_acc.fill(0.0);
    match g.dtype {
        Dtype::F16 => add_rows_as::<f16>(v, s),
        Dtype::Bf16 => add_rows_as::<half::bf16>(v, s),
        Dtype::F32 => add_rows_as::<f32>(v, s),
        Dtype::Fp8E4m3 => unreachable!("Geom excludes fp8"),
    }
    let w = s.v_acc.len();
    let at = g.summary_bytes() + layer as usize * w * 4;
    for (o, x) in out[at..at + 4 * w].chunks_exact_mut(4).zip(&s.v_acc) {
        o.copy_from_slice(&x.to_le_bytes());
    }
}

/// [`strata_kernels::sketch::add_rows`] of the little-endian bytes `v`
/// into the scratch's sums.
fn add_rows_as<E: strata_kernels::KvElem>(v: &[u8], s: &mut SummaryScratch) {
    let SummaryScratch {
        copy, v_acc, v_row, ..
    } = s;
    let x = elems_as::<E>(v, copy);
    strata_kernels::sketch::add_rows(x, v_acc, v_row);
}

/// The little-endian bytes `b` as elements of `E`: in place when aligned
/// (arena extents and I/O buffers are), else from a copy in `copy`.
fn elems_as<'a, E: strata_kernels::KvElem>(b: &'a [u8], copy: &'a mut Vec<u32>) -> &'a [E] {
    // SAFETY: E is f32, f16 or bf16 (sealed): every bit pattern is a value.
    let (pre, mid, post) = unsafe { b.align_to::<E>() };
    if pre.is_empty() && post.is_empty() {
        return mid;
    }
    copy.clear();
    copy.resize(b.len().div_ceil(4), 0);
    // SAFETY: u32 storage reinterpreted as bytes, then as E (u32's
    // alignment covers every E; every bit pattern is a value).
    let bytes = unsafe { std::slice::from_raw_parts_mut(copy.as_mut_ptr().cast::<u8>(), b.len()) };
    bytes.copy_from_slice(b);
    // SAFETY: as above; the length is whole elements of E.
    unsafe {
        std::slice::from_raw_parts(
            copy.as_ptr().cast::<E>(),
            b.len() / std::mem::size_of::<E>(),
        )
    }
}

/// Writes the key sketch of every KV head of `layer` (its K `k`) into the
/// entry `out`, against the bounds already written there.
fn sketch_layer(
    g: &Geom,
    k: &[u8],
    tokens: u32,
    layer: u32,
    s: &mut SummaryScratch,
    out: &mut [u8],
) {
    let (kv, d, tpb) = (
        g.kv_heads as usize,
        g.head_dim as usize,
        g.tokens_per_block as usize,
    );
    debug_assert_eq!(k.len(), tokens as usize * kv * d * g.elem_bytes());
    let base = g.summary_bytes() + g.v_sum_bytes();
    for head in 0..kv {
        // The head's box over the block (the union of its leaves'), from
        // the f16 bounds just written: what `SummaryView::bound` gives the
        // decoder.
        let (lo_at, hi_at) = g.bound_rows_at(layer, head as u32);
        let f = |at: usize| f16::from_bits(u16::from_le_bytes([out[at], out[at + 1]])).to_f32();
        for i in 0..d {
            (s.lo_f[i], s.hi_f[i]) = (f32::INFINITY, f32::NEG_INFINITY);
            for j in 0..g.leaves() as usize {
                s.lo_f[i] = s.lo_f[i].min(f(lo_at + 2 * (j * d + i)));
                s.hi_f[i] = s.hi_f[i].max(f(hi_at + 2 * (j * d + i)));
            }
        }
        let row = d * tpb;
        let at = base + (layer as usize * kv + head) * row;
        let dst = &mut out[at..at + row];
        match g.dtype {
            Dtype::F16 => encode_as::<f16>(k, kv, head, d, tpb, s, dst),
            Dtype::Bf16 => encode_as::<half::bf16>(k, kv, head, d, tpb, s, dst),
            Dtype::F32 => encode_as::<f32>(k, kv, head, d, tpb, s, dst),
            Dtype::Fp8E4m3 => unreachable!("Geom excludes fp8"),
        }
    }
}

/// [`strata_kernels::sketch::encode`] of the little-endian bytes `k`, read
/// in place when aligned (arena extents and I/O buffers are), else from a
/// copy in the scratch.
fn encode_as<E: strata_kernels::KvElem>(
    k: &[u8],
    kv: usize,
    head: usize,
    d: usize,
    tpb: usize,
    s: &mut SummaryScratch,
    dst: &mut [u8],
) {
    let SummaryScratch {
        copy,
        lo_f,
        hi_f,
        row_f,
        ..
    } = s;
    let elems = elems_as::<E>(k, copy);
    strata_kernels::sketch::encode(elems, kv, head, d, lo_f, hi_f, tpb, row_f, dst);
}

/// The region summaries live in: one anonymous mapping reserved at start
/// (pages are touched as entries are written) and an extent allocator.
pub struct SummaryRegion {
    map: MmapRaw,
    len: u64,
    /// Entries hold key sketches (`compute.key_sketch`).
    sketch: bool,
    /// Tokens per leaf asked for (`compute.leaf_tokens`; 0: whole blocks);
    /// a namespace whose blocks it does not cut evenly keeps one leaf
    /// ([`Geom::with_leaf_tokens`]).
    leaf_tokens: u32,
    alloc: Mutex<ExtentAllocator>,
}

impl std::fmt::Debug for SummaryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SummaryRegion")
            .field("len", &self.len)
            .finish()
    }
}

impl SummaryRegion {
    pub fn new(bytes: u64, sketch: bool, leaf_tokens: u32) -> std::io::Result<Self> {
        let len = bytes / SUMMARY_GRANULE * SUMMARY_GRANULE;
        let map = MmapOptions::new().len(len.max(1) as usize).map_anon()?;
        Ok(SummaryRegion {
            map: MmapRaw::from(map),
            len,
            sketch,
            leaf_tokens,
            alloc: Mutex::new(ExtentAllocator::new(len, SUMMARY_GRANULE)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ExtentAllocator> {
        // A poisoned allocator cannot be trusted not to hand out an entry
        // twice: stop.
        self.alloc.lock().expect("summary allocator poisoned")
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.len
    }

    /// Whether entries hold key sketches.
    pub fn sketches(&self) -> bool {
        self.sketch
    }

    /// The geometry of this region's entries for blocks of `g` (its leaf
    /// size applied).
    pub fn geom(&self, g: &Geom) -> Geom {
        g.with_leaf_tokens(self.leaf_tokens)
    }

    /// Bytes of one entry of geometry `g` in this region.
    pub fn entry_bytes(&self, g: &Geom) -> usize {
        let g = self.geom(g);
        g.summary_bytes() + if self.sketch { g.sketch_bytes() } else { 0 }
    }

    /// Bytes taken by entries (rounded to granules).
    pub fn used_bytes(&self) -> u64 {
        let a = self.lock();
        a.capacity_bytes() - a.free_bytes()
    }

    pub fn allocate(&self, len: usize) -> Option<u64> {
        self.lock().allocate(len as u64)
    }

    pub fn free(&self, offset: u64, len: usize) {
        self.lock().free(offset, len as u64)
    }

    fn check(&self, offset: u64, len: usize) {
        assert!(
            offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.len),
            "summary access out of bounds: {offset}+{len} > {}",
            self.len
        );
    }

    /// The bytes of an entry.
    ///
    /// # Safety
    /// The entry is allocated and not written while the slice lives (its
    /// block is pinned, or the caller owns it).
    pub unsafe fn slice(&self, offset: u64, len: usize) -> &[u8] {
        self.check(offset, len);
        // SAFETY: in bounds; lifetime per the caller's contract.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset as usize), len) }
    }

    /// The bytes of an entry being written.
    ///
    /// # Safety
    /// The caller owns the entry (allocated it, not yet published).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: u64, len: usize) -> &mut [u8] {
        self.check(offset, len);
        // SAFETY: in bounds; exclusivity per the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(offset as usize), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_hold_sums_and_bounds() {
        /// Element `i` of a little-endian `dtype` array, as f32 (exact).
        fn elem(dtype: Dtype, b: &[u8], i: usize) -> f32 {
            match dtype {
                Dtype::F32 => f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()),
                Dtype::F16 => f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32(),
                Dtype::Bf16 => {
                    f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16)
                }
                Dtype::Fp8E4m3 => unreachable!(),
            }
        }
        for dtype in [Dtype::F16, Dtype::Bf16, Dtype::F32] {
            let g = Geom {
                layers: 3,
                kv_heads: 2,
                head_dim: 8,
                tokens_per_block: 4,
                dtype,
                leaf_tokens: 4,
            };
            let tokens = 3;
            let n = g.token_bytes() as usize * tokens as usize / g.elem_bytes();
            // Signed values of mixed magnitude (negative zero included).
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut payload = Vec::new();
            for i in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let v = if i % 37 == 0 {
                    -0.0
                } else {
                    ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2f32.powi((i % 9) as i32 - 3)
                };
                match dtype {
                    Dtype::F16 => payload.extend(f16::from_f32(v).to_bits().to_le_bytes()),
                    Dtype::Bf16 => payload.extend(((v.to_bits() >> 16) as u16).to_le_bytes()),
                    _ => payload.extend(v.to_le_bytes()),
                }
            }
            let mut out = vec![0u8; g.summary_bytes()];
            summarize(&g, &payload, tokens, &mut SummaryScratch::new(&g), &mut out);
            let v = SummaryView::new(g, &out);
            let (mut mn, mut mx) = (vec![f16::ZERO; 8], vec![f16::ZERO; 8]);
            for layer in 0..3 {
                for t in 0..2 {
                    let r = g.tensor_range(tokens, layer, t);
                    assert_eq!(v.leaf_sum(layer, 0, t), strata_proto::checksum(&payload[r]));
                }
                let k = &payload[g.tensor_range(tokens, layer, 0)];
                for head in 0..2 {
                    v.bounds(layer, head, &mut mn, &mut mx);
                    for i in 0..8 {
                        let col: Vec<f32> = (0..tokens as usize)
                            .map(|tok| elem(dtype, k, (tok * 2 + head as usize) * 8 + i))
                            .collect();
                        let lo = col.iter().copied().fold(f32::INFINITY, f32::min);
                        let hi = col.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        // The box holds every key and is the tightest f16
                        // box (exact for f16 keys).
                        assert!(mn[i].to_f32() <= lo && hi <= mx[i].to_f32(), "{dtype:?}");
                        assert_eq!(mn[i].to_f32(), f16_round_down(lo).to_f32(), "{dtype:?} min");
                        assert_eq!(mx[i].to_f32(), f16_round_up(hi).to_f32(), "{dtype:?} max");
                    }
                }
            }
        }
    }

    /// With a sketch, the entry's abstracts are those of an entry without
    /// one, every sketched key decodes within half a step of the key, and
    /// the V sums are the per-channel sums of the stored values, for each
    /// dtype and a partial block.
    #[test]
    fn sketched_entries_decode_within_half_a_step() {
        for dtype in [Dtype::F16, Dtype::Bf16, Dtype::F32] {
            let g = Geom {
                layers: 2,
                kv_heads: 2,
                head_dim: 8,
                tokens_per_block: 4,
                dtype,
                leaf_tokens: 4,
            };
            let tokens = 3u32;
            let n = g.token_bytes() as usize * tokens as usize / g.elem_bytes();
            let vals: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 251) as f32 / 251.0 - 0.4) * (1 + i % 5) as f32)
                .collect();
            let mut payload = Vec::new();
            for &v in &vals {
                match dtype {
                    Dtype::F16 => payload.extend(f16::from_f32(v).to_bits().to_le_bytes()),
                    Dtype::Bf16 => payload.extend(half::bf16::from_f32(v).to_bits().to_le_bytes()),
                    _ => payload.extend(v.to_le_bytes()),
                }
            }
            // As stored (rounded to the dtype).
            let stored = |i: usize| -> f32 {
                let w = g.elem_bytes();
                let b = &payload[i * w..(i + 1) * w];
                match dtype {
                    Dtype::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
                    Dtype::Bf16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
                    _ => f32::from_le_bytes(b.try_into().unwrap()),
                }
            };
            let mut plain = vec![0u8; g.summary_bytes()];
            let mut with = vec![0u8; g.summary_bytes() + g.sketch_bytes()];
            let mut sc = SummaryScratch::new(&g);
            summarize(&g, &payload, tokens, &mut sc, &mut plain);
            summarize(&g, &payload, tokens, &mut sc, &mut with);
            assert_eq!(&with[..plain.len()], &plain[..], "{dtype:?}");
            let v = SummaryView::new(g, &with);
            assert!(SummaryView::new(g, &plain).sketch(0, 0).is_none());
            let mut vs = vec![f32::NAN; 8];
            assert!(!SummaryView::new(g, &plain).v_sum(0, 0, &mut vs));
            assert!(vs.iter().all(|x| x.is_nan()), "nothing written");
            let (mut mn, mut mx) = (vec![f16::ZERO; 8], vec![f16::ZERO; 8]);
            for layer in 0..2u32 {
                let kr = g.tensor_range(tokens, layer, 0);
                let k0 = kr.start / g.elem_bytes();
                for head in 0..2u32 {
                    v.bounds(layer, head, &mut mn, &mut mx);
                    let codes = v.sketch(layer, head).unwrap();
                    assert_eq!(codes.len(), 8 * 4);
                    for t in 0..tokens as usize {
                        for i in 0..8 {
                            let x = stored(k0 + (t * 2 + head as usize) * 8 + i);
                            let (lo, hi) = (mn[i].to_f32(), mx[i].to_f32());
                            let step = strata_kernels::sketch::step(lo, hi);
                            let dec = lo + step * codes[i * 4 + t] as f32;
                            assert!(
                                (dec - x).abs() <= step * 0.5001 + 1e-6,
                                "{dtype:?} layer {layer} head {head} t {t} i {i}: {dec} vs {x}"
                            );
                        }
                    }
                    // V sums: f32 sums of the stored values, in token order.
                    let v0 = g.tensor_range(tokens, layer, 1).start / g.elem_bytes();
                    assert!(v.v_sum(layer, head, &mut vs));
                    for (i, &got) in vs.iter().enumerate() {
                        let (mut want, mut mag) = (0f64, 0f64);
                        for t in 0..tokens as usize {
                            let x = stored(v0 + (t * 2 + head as usize) * 8 + i) as f64;
                            want += x;
                            mag += x.abs();
                        }
                        assert!(
                            (got as f64 - want).abs() <= 1e-6 * mag,
                            "{dtype:?} layer {layer} head {head} i {i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// With leaves (2 of 4 tokens in 8-token blocks), every leaf's box holds
    /// every key of the leaf and is the tightest f16 box, every leaf's sums
    /// are those of its rows, the union of the leaves' boxes is bit for bit
    /// the one-leaf entry's box, the sketch section is the one-leaf
    /// entry's, and `verify` takes exactly the right bytes: for each dtype,
    /// full and partial blocks (a partial one with an empty leaf).
    #[test]
    fn leaf_entries_hold_per_leaf_sums_and_bounds() {
        for dtype in [Dtype::F16, Dtype::Bf16, Dtype::F32] {
            let one = Geom {
                layers: 2,
                kv_heads: 2,
                head_dim: 8,
                tokens_per_block: 8,
                dtype,
                leaf_tokens: 8,
            };
            let g = one.with_leaf_tokens(4);
            assert_eq!((g.leaves(), g.leaf_tokens), (2, 4));
            // Not a divisor, too small, or the block: one leaf.
            for lt in [0, 2, 3, 6, 8, 16] {
                assert_eq!(one.with_leaf_tokens(lt).leaves(), 1, "{lt}");
            }
            for tokens in [8u32, 6, 3] {
                let n = g.token_bytes() as usize * tokens as usize / g.elem_bytes();
                let vals: Vec<f32> = (0..n)
                    .map(|i| ((i * 7919 % 251) as f32 / 251.0 - 0.4) * (1 + i % 5) as f32)
                    .collect();
                let mut payload = Vec::new();
                for &v in &vals {
                    match dtype {
                        Dtype::F16 => payload.extend(f16::from_f32(v).to_bits().to_le_bytes()),
                        Dtype::Bf16 => {
                            payload.extend(half::bf16::from_f32(v).to_bits().to_le_bytes())
                        }
                        _ => payload.extend(v.to_le_bytes()),
                    }
                }
                let stored = |i: usize| -> f32 {
                    let w = g.elem_bytes();
                    let b = &payload[i * w..(i + 1) * w];
                    match dtype {
                        Dtype::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
                        Dtype::Bf16 => {
                            f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
                        }
                        _ => f32::from_le_bytes(b.try_into().unwrap()),
                    }
                };
                let mut sc = SummaryScratch::new(&g);
                let mut e1 = vec![0u8; one.summary_bytes() + one.sketch_bytes()];
                let mut e2 = vec![0u8; g.summary_bytes() + g.sketch_bytes()];
                summarize(&one, &payload, tokens, &mut sc, &mut e1);
                summarize(&g, &payload, tokens, &mut sc, &mut e2);
                let (v1, v2) = (SummaryView::new(one, &e1), SummaryView::new(g, &e2));
                assert_eq!(
                    &e1[one.summary_bytes()..],
                    &e2[g.summary_bytes()..],
                    "{dtype:?}: the sketch section does not depend on the leaves"
                );
                let (mut mn, mut mx) = (vec![f16::ZERO; 8], vec![f16::ZERO; 8]);
                let (mut un, mut ux) = (vec![f16::ZERO; 8], vec![f16::ZERO; 8]);
                for layer in 0..2u32 {
                    let k0 = g.tensor_range(tokens, layer, 0).start / g.elem_bytes();
                    for head in 0..2u32 {
                        v1.bounds(layer, head, &mut mn, &mut mx);
                        v2.bounds(layer, head, &mut un, &mut ux);
                        let bits = |x: &[f16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&mn), bits(&un), "{dtype:?} union min");
                        assert_eq!(bits(&mx), bits(&ux), "{dtype:?} union max");
                        for c in 0..8 {
                            assert_eq!(v2.bound(layer, head, c), (un[c], ux[c]));
                        }
                        for leaf in 0..2u32 {
                            v2.leaf_bounds(layer, head, leaf, &mut mn, &mut mx);
                            let rows = g.leaf_tokens_of(tokens, leaf);
                            for i in 0..8 {
                                let col: Vec<f32> = rows
                                    .clone()
                                    .map(|t| stored(k0 + (t as usize * 2 + head as usize) * 8 + i))
                                    .collect();
                                let lo = col.iter().copied().fold(f32::INFINITY, f32::min);
                                let hi = col.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                                if col.is_empty() {
                                    assert_eq!((mn[i], mx[i]), (f16::INFINITY, f16::NEG_INFINITY));
                                    continue;
                                }
                                assert!(mn[i].to_f32() <= lo && hi <= mx[i].to_f32());
                                assert_eq!(mn[i], f16_round_down(lo), "{dtype:?} leaf min");
                                assert_eq!(mx[i], f16_round_up(hi), "{dtype:?} leaf max");
                            }
                        }
                    }
                    for t in 0..2u32 {
                        for leaf in 0..2u32 {
                            let r = g.leaves_range(tokens, layer, t, leaf..leaf + 1);
                            assert_eq!(
                                r.len(),
                                g.leaf_tokens_of(tokens, leaf).len() * g.row_bytes()
                            );
                            assert_eq!(
                                v2.leaf_sum(layer, leaf, t),
                                strata_proto::checksum(&payload[r.clone()])
                            );
                            assert!(v2.verify(layer, t, tokens, leaf..leaf + 1, &payload[r]));
                        }
                        // The whole layer, leaf by leaf; one flipped bit in
                        // either leaf fails it, and fails only that leaf.
                        let all = g.leaves_range(tokens, layer, t, 0..2);
                        assert_eq!(all, g.tensor_range(tokens, layer, t));
                        assert!(v2.verify(layer, t, tokens, 0..2, &payload[all.clone()]));
                        for leaf in 0..2u32 {
                            let r = g.leaves_range(tokens, layer, t, leaf..leaf + 1);
                            if r.is_empty() {
                                continue;
                            }
                            let mut bad = payload.clone();
                            bad[r.start + r.len() / 2] ^= 0x10;
                            assert!(!v2.verify(layer, t, tokens, 0..2, &bad[all.clone()]));
                            assert!(!v2.verify(layer, t, tokens, leaf..leaf + 1, &bad[r]));
                            let o = 1 - leaf;
                            let r = g.leaves_range(tokens, layer, t, o..o + 1);
                            assert!(v2.verify(layer, t, tokens, o..o + 1, &bad[r]));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn region_allocates_and_frees() {
        let r = SummaryRegion::new(4096, false, 0).unwrap();
        let a = r.allocate(100).unwrap();
        assert_eq!(r.used_bytes(), 128);
        unsafe { r.slice_mut(a, 100) }.fill(3);
        assert!(unsafe { r.slice(a, 100) }.iter().all(|&b| b == 3));
        assert!(r.allocate(4096).is_none());
        r.free(a, 100);
        assert_eq!(r.used_bytes(), 0);
    }
}

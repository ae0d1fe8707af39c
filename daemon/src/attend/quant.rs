//! Lower-precision copies of cold blocks' layers for Attend (COMPUTE.md §3:
//! hotness drives promotion, demotion and precision, fp16 → int8 → int4).
//!
//! A block held only on NVMe costs a device read every time Attend needs
//! it. When a call allows it (`min_precision` INT8 or INT4), the layer's K
//! and V that such a call read from NVMe and verified are also kept here,
//! per-channel int8 ([`strata_kernels::quant`]), and later calls that allow
//! it compute on that copy instead of reading the device. The ladder, by
//! hotness from the exact attention of answers (`compute.hotness`):
//!
//! * hot: promoted to the DRAM tier at full precision (`promote_hot`);
//! * warm: an int8 copy here (~62% of f16 K+V at 16 tokens; the per-channel
//!   `lo`/`step` are f16);
//! * cooler: when the region needs room, the copies least recently found hot
//!   are re-quantised to int4 (~37%), and the oldest int4 copies dropped;
//! * cold: NVMe only.
//!
//! What it is not: a copy is derived data, never served by Get and never a
//! block's only copy. A call computes on one only when it asked to
//! (`min_precision`), and its answer then says so (`quantized_blocks`,
//! `exact` false). A copy records the block it was made from (checksum and
//! length); a block re-put under the same key with other bytes makes it
//! stale, and it is dropped on sight. Its own bytes carry an XXH3, checked
//! before every use; a copy that fails is dropped and counted, and the
//! covered prefix ends there, as for a corrupt DRAM copy.
//!
//! Memory: one pre-faulted region (`compute.quant_bytes`) in 512-byte
//! granules that never grows. A call holds the copies it uses (an `Arc`),
//! so a copy dropped from the map frees its extent when the last call
//! using it is done; the region bounds both.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use half::f16;
use half::slice::HalfFloatSliceExt;
use memmap2::{MmapOptions, MmapRaw};
use metrics::{Counter, Gauge};
use strata_kernels::elem::KvElem;
use strata_kernels::quant::{QuantBits, QuantScratch, dequantize, quant_params, quantize};
use strata_proto::{BlockKey, NamespaceId};

use crate::metrics::Registry;
use crate::store::ChainBlock;
use crate::tier::alloc::ExtentAllocator;

/// Allocation unit of the region.
const GRANULE: u64 = 512;

/// Bytes of a copy of `tokens` rows of `width` channels (K and V): the
/// per-channel `lo` and `step` of each tensor as f16, then K's codes, then
/// V's.
pub fn copy_bytes(tokens: usize, width: usize, bits: QuantBits) -> usize {
    8 * width + 2 * tokens * bits.row_bytes(width)
}

/// The pre-faulted region the copies live in.
struct Region {
    map: MmapRaw,
    len: u64,
    alloc: Mutex<ExtentAllocator>,
    /// `strata_attend_quant_bytes`, set on every allocation and free (a
    /// dropped copy's extent is freed when its last holder lets go).
    used_gauge: Gauge,
}

impl Region {
    fn allocator(&self) -> std::sync::MutexGuard<'_, ExtentAllocator> {
        // A poisoned allocator cannot be trusted not to hand out an extent
        // twice: stop.
        self.alloc.lock().expect("quant-copy allocator poisoned")
    }

    fn used(&self) -> u64 {
        let a = self.allocator();
        a.capacity_bytes() - a.free_bytes()
    }

    fn allocate(&self, len: usize) -> Option<u64> {
        let mut a = self.allocator();
        let off = a.allocate(len as u64)?;
        self.used_gauge
            .set((a.capacity_bytes() - a.free_bytes()) as f64);
        Some(off)
    }

    fn free(&self, offset: u64, len: usize) {
        let mut a = self.allocator();
        a.free(offset, len as u64);
        self.used_gauge
            .set((a.capacity_bytes() - a.free_bytes()) as f64);
    }
}

/// One block's layer, quantised. Immutable once made; its extent is freed
/// when the last holder drops it.
pub struct QuantCopy {
    region: Arc<Region>,
    offset: u64,
    len: usize,
    pub bits: QuantBits,
    tokens: usize,
    width: usize,
    /// The block it was made from.
    block_checksum: u64,
    block_len: u64,
    /// XXH3 of its bytes.
    sum: u64,
}

impl Drop for QuantCopy {
    fn drop(&mut self) {
        self.region.free(self.offset, self.len);
    }
}

impl std::fmt::Debug for QuantCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantCopy")
            .field("bits", &self.bits)
            .field("tokens", &self.tokens)
            .field("len", &self.len)
            .finish()
    }
}

impl QuantCopy {
    fn bytes(&self) -> &[u8] {
        // SAFETY: the extent is this copy's alone (allocated for it, freed
        // only by its Drop) and was written before the copy was made.
        unsafe {
            std::slice::from_raw_parts(self.region.map.as_ptr().add(self.offset as usize), self.len)
        }
    }

    /// Bytes it occupies (what a read of it counts).
    pub fn bytes_len(&self) -> usize {
        self.len
    }

    /// Tokens (rows) it holds.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Verifies the copy and dequantises it into `out`; false when its
    /// bytes fail their checksum.
    pub fn decode(&self, out: &mut Decoded) -> bool {
        let b = self.bytes();
        if strata_proto::checksum(b) != self.sum {
            return false;
        }
        let w = self.width;
        // SAFETY: every bit pattern is an f16; the extent starts on a
        // granule, so the parameters are aligned (checked: pre/post empty).
        let (pre, params, post) = unsafe { b[..8 * w].align_to::<f16>() };
        assert!(pre.is_empty() && post.is_empty(), "quant copy misaligned");
        out.params.clear();
        out.params.resize(4 * w, 0.0);
        // half converts a slice with F16C when the CPU has it.
        params.convert_to_f32_slice(&mut out.params);
        let rows = self.tokens * self.bits.row_bytes(w);
        let codes = &b[8 * w..];
        for (t, x) in [&mut out.k, &mut out.v].into_iter().enumerate() {
            x.clear();
            x.resize(self.tokens * w, 0.0);
            let p = &out.params[2 * t * w..(2 * t + 2) * w];
            dequantize(
                &codes[t * rows..(t + 1) * rows],
                w,
                self.bits,
                &p[..w],
                &p[w..],
                x,
            );
        }
        true
    }
}

/// A copy dequantised: K and V `[tokens][width]` f32 (buffers reused
/// from copy to copy).
#[derive(Debug, Default)]
pub struct Decoded {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    params: Vec<f32>,
}

/// Quantises `k` and `v` (`[tokens][width]`) into `out`
/// ([`copy_bytes`] long); false when a range does not fit f16 (a value
/// past ±65504): no copy then.
fn encode<E: KvElem>(k: &[E], v: &[E], width: usize, bits: QuantBits, out: &mut [u8]) -> bool {
    ENCODE.with_borrow_mut(|e| {
        if e.width < width {
            *e = EncodeScratch {
                width,
                q: QuantScratch::new(width),
                ls: vec![0f32; 2 * width],
            };
        }
        encode_with(k, v, width, bits, &mut e.q, &mut e.ls[..2 * width], out)
    })
}

/// Scratch of [`encode`], one per compute thread, grown to the widest
/// layout seen: a copy is made per block read, so nothing is allocated
/// for it.
struct EncodeScratch {
    width: usize,
    q: QuantScratch,
    /// lo then step, f32.
    ls: Vec<f32>,
}

thread_local! {
    static ENCODE: std::cell::RefCell<EncodeScratch> = std::cell::RefCell::new(EncodeScratch {
        width: 0,
        q: QuantScratch::new(0),
        ls: Vec::new(),
    });
    /// A demoted copy's values ([`QuantCopies::demote`]).
    static DEMOTE: std::cell::RefCell<Decoded> = std::cell::RefCell::new(Decoded::default());
}

fn encode_with<E: KvElem>(
    k: &[E],
    v: &[E],
    width: usize,
    bits: QuantBits,
    scratch: &mut QuantScratch,
    ls: &mut [f32],
    out: &mut [u8],
) -> bool {
    let tokens = k.len() / width;
    let rows = tokens * bits.row_bytes(width);
    let (params, codes) = out.split_at_mut(8 * width);
    // SAFETY: every bit pattern is an f16; the extent starts on a granule,
    // so the parameters are aligned (checked: pre/post empty).
    let (pre, params, post) = unsafe { params.align_to_mut::<f16>() };
    assert!(pre.is_empty() && post.is_empty(), "quant copy misaligned");
    for (t, x) in [k, v].into_iter().enumerate() {
        let (lo, step) = ls.split_at_mut(width);
        quant_params(x, width, bits, scratch, lo, step);
        // The codes are made against the f16-rounded parameters, so that
        // decoding gives back what was encoded.
        let p = &mut params[2 * t * width..2 * (t + 1) * width];
        p.convert_from_f32_slice(ls);
        if !p.iter().all(|h| h.is_finite()) {
            return false;
        }
        p.convert_to_f32_slice(ls);
        let (lo, step) = ls.split_at(width);
        quantize(
            x,
            width,
            bits,
            lo,
            step,
            scratch,
            &mut codes[t * rows..(t + 1) * rows],
        );
    }
    true
}

/// The block a copy is of: its key, and the checksum and length of its
/// bytes (a block re-put under the same key with other bytes differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockIdent {
    pub key: BlockKey,
    pub checksum: u64,
    pub len: u64,
}

impl BlockIdent {
    pub fn of(b: &ChainBlock) -> Self {
        BlockIdent {
            key: b.key,
            checksum: b.checksum,
            len: b.len,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct CopyKey {
    ns: NamespaceId,
    layer: u32,
    key: BlockKey,
}

/// Counters of what the copies did.
#[derive(Clone)]
pub struct QuantMetrics {
    pub made: Counter,
    pub demoted: Counter,
    pub dropped: Counter,
    pub corrupt: Counter,
    pub no_room: Counter,
    pub used_bytes: Gauge,
}

impl QuantMetrics {
    pub fn new(r: &Registry) -> Self {
        let c = |what| {
            r.counter(
                "strata_attend_quant_copies_total",
                "Attend's lower-precision copies of cold blocks by event: made (int8, from a verified NVMe read), demoted (int8 to int4 for room), dropped (for room or stale), corrupt (failed its checksum at use), no_room (not made: the region is held by calls)",
                &[("event", what)],
            )
        };
        QuantMetrics {
            made: c("made"),
            demoted: c("demoted"),
            dropped: c("dropped"),
            corrupt: c("corrupt"),
            no_room: c("no_room"),
            used_bytes: r.gauge_labelled(
                "strata_attend_quant_bytes",
                "Bytes of the quant-copy region held by copies",
                &[],
            ),
        }
    }
}

struct Inner {
    /// Each copy and its tick (when made or last found hot).
    map: HashMap<CopyKey, (Arc<QuantCopy>, u64)>,
    /// Ticks, oldest first.
    order: BTreeMap<u64, CopyKey>,
    tick: u64,
}

impl Inner {
    fn remove(&mut self, key: &CopyKey) -> Option<Arc<QuantCopy>> {
        let (c, t) = self.map.remove(key)?;
        self.order.remove(&t);
        Some(c)
    }

    fn put(&mut self, key: CopyKey, copy: Arc<QuantCopy>, tick: Option<u64>) {
        self.remove(&key);
        let t = tick.unwrap_or_else(|| {
            self.tick += 1;
            self.tick
        });
        self.order.insert(t, key);
        self.map.insert(key, (copy, t));
    }
}

/// The copies of a daemon (`compute.quant_bytes`).
pub struct QuantCopies {
    region: Arc<Region>,
    inner: Mutex<Inner>,
    metrics: QuantMetrics,
}

impl std::fmt::Debug for QuantCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantCopies")
            .field("len", &self.region.len)
            .finish()
    }
}

impl QuantCopies {
    /// A region of `bytes`, touched now (first-touch faults are slow on
    /// the machines we run on, and copies are written on Attend's path).
    pub fn new(bytes: u64, metrics: QuantMetrics) -> std::io::Result<Self> {
        let len = bytes / GRANULE * GRANULE;
        let map = MmapOptions::new()
            .len(len.max(GRANULE) as usize)
            .populate()
            .map_anon()?;
        Ok(QuantCopies {
            region: Arc::new(Region {
                map: MmapRaw::from(map),
                len,
                alloc: Mutex::new(ExtentAllocator::new(len, GRANULE)),
                used_gauge: metrics.used_bytes.clone(),
            }),
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: BTreeMap::new(),
                tick: 0,
            }),
            metrics,
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held by copies (including those dropped but still in use).
    pub fn used_bytes(&self) -> u64 {
        self.region.used()
    }

    /// The copy of block `b`'s layer `layer`, when there is one of at least
    /// `floor`'s precision made from the block as it is now. A stale copy
    /// (the block was re-put with other bytes) is dropped.
    pub fn get(
        &self,
        ns: NamespaceId,
        layer: u32,
        b: &BlockIdent,
        floor: QuantBits,
    ) -> Option<Arc<QuantCopy>> {
        let key = CopyKey {
            ns,
            layer,
            key: b.key,
        };
        let mut inner = self.inner();
        let (c, _) = inner.map.get(&key)?;
        if c.block_checksum != b.checksum || c.block_len != b.len {
            inner.remove(&key);
            self.metrics.dropped.increment(1);
            return None;
        }
        (floor == QuantBits::Int4 || c.bits == QuantBits::Int8).then(|| c.clone())
    }

    /// Marks the copy of `key`'s layer as just found hot: the last to be
    /// demoted or dropped.
    pub fn touch(&self, ns: NamespaceId, layer: u32, key: BlockKey) {
        let key = CopyKey { ns, layer, key };
        let mut inner = self.inner();
        if let Some((c, _)) = inner.map.get(&key) {
            let c = c.clone();
            inner.put(key, c, None);
        }
    }

    /// Drops `copy` (it failed its checksum), if it is still the one kept.
    pub fn corrupt(&self, ns: NamespaceId, layer: u32, key: BlockKey, copy: &Arc<QuantCopy>) {
        self.metrics.corrupt.increment(1);
        let key = CopyKey { ns, layer, key };
        let mut inner = self.inner();
        if inner
            .map
            .get(&key)
            .is_some_and(|(c, _)| Arc::ptr_eq(c, copy))
        {
            inner.remove(&key);
        }
    }

    /// Whether an int8 copy of block `b`'s layer made from its current
    /// bytes is kept.
    pub fn has_int8(&self, ns: NamespaceId, layer: u32, b: &BlockIdent) -> bool {
        let key = CopyKey {
            ns,
            layer,
            key: b.key,
        };
        self.inner().map.get(&key).is_some_and(|(c, _)| {
            c.bits == QuantBits::Int8 && c.block_checksum == b.checksum && c.block_len == b.len
        })
    }

    /// Keeps an int8 copy of block `b`'s layer from its verified K and V
    /// (`[tokens][width]` each), making room by demoting or dropping the
    /// copies least recently found hot. Nothing is made when the copy
    /// could never fit, a value is past f16's range, or the room is held
    /// by calls using dropped copies.
    pub fn insert<E: KvElem>(
        &self,
        ns: NamespaceId,
        layer: u32,
        b: &BlockIdent,
        k: &[E],
        v: &[E],
        width: usize,
    ) {
        let key = CopyKey {
            ns,
            layer,
            key: b.key,
        };
        let tokens = k.len() / width;
        if tokens == 0 || v.len() != k.len() {
            return;
        }
        let bits = QuantBits::Int8;
        let len = copy_bytes(tokens, width, bits);
        if len as u64 > self.region.len {
            return;
        }
        let Some(offset) = self.room(len) else {
            self.metrics.no_room.increment(1);
            return;
        };
        let from = (b.checksum, b.len);
        let Some(copy) = self.write(offset, len, bits, tokens, width, from, |out| {
            encode(k, v, width, bits, out)
        }) else {
            return;
        };
        self.inner().put(key, Arc::new(copy), None);
        self.metrics.made.increment(1);
    }

    /// Fills the extent at `offset` with `fill` and makes the copy of the
    /// block `from` (checksum, length) (its Drop frees the extent, also
    /// when `fill` declines).
    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        offset: u64,
        len: usize,
        bits: QuantBits,
        tokens: usize,
        width: usize,
        from: (u64, u64),
        fill: impl FnOnce(&mut [u8]) -> bool,
    ) -> Option<QuantCopy> {
        let mut copy = QuantCopy {
            region: self.region.clone(),
            offset,
            len,
            bits,
            tokens,
            width,
            block_checksum: from.0,
            block_len: from.1,
            sum: 0,
        };
        // SAFETY: the extent was just allocated for this copy, nobody else
        // refers to it, and it is in the region.
        let out = unsafe {
            std::slice::from_raw_parts_mut(self.region.map.as_mut_ptr().add(offset as usize), len)
        };
        if !fill(out) {
            return None;
        }
        copy.sum = strata_proto::checksum(out);
        Some(copy)
    }

    /// An extent of `len` bytes, made by demoting (int8 → int4) or dropping
    /// the copies least recently made or found hot, oldest first; None when
    /// every copy is gone and the room is still held by calls.
    fn room(&self, len: usize) -> Option<u64> {
        let mut from = 0u64;
        loop {
            if let Some(off) = self.region.allocate(len) {
                return Some(off);
            }
            let mut inner = self.inner();
            let (&t, &key) = inner.order.range(from..).next()?;
            from = t + 1;
            let old = inner.remove(&key).expect("ordered copies are kept");
            if old.bits == QuantBits::Int8
                && old.width.is_multiple_of(2)
                && let Some(c) = self.demote(old)
            {
                // Demoted, it keeps its age: the next room it is in the
                // way of drops it.
                inner.put(key, Arc::new(c), Some(t));
                self.metrics.demoted.increment(1);
            } else {
                self.metrics.dropped.increment(1);
            }
        }
    }

    /// `old` (int8) as int4, when it verifies and the int4 copy finds room
    /// once `old` itself is freed (not when a call still holds it).
    fn demote(&self, old: Arc<QuantCopy>) -> Option<QuantCopy> {
        DEMOTE.with_borrow_mut(|x| {
            if !old.decode(x) {
                self.metrics.corrupt.increment(1);
                return None;
            }
            let (tokens, width) = (old.tokens, old.width);
            let from = (old.block_checksum, old.block_len);
            drop(old);
            let bits = QuantBits::Int4;
            let len = copy_bytes(tokens, width, bits);
            let offset = self.region.allocate(len)?;
            self.write(offset, len, bits, tokens, width, from, |out| {
                encode(&x.k, &x.v, width, bits, out)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KV heads x head_dim of the copies here (8 x 128), and tokens.
    const W: usize = 1024;
    const T: usize = 16;

    fn pool(bytes: u64) -> QuantCopies {
        QuantCopies::new(bytes, QuantMetrics::new(&Registry::new())).unwrap()
    }

    fn ident(i: u8) -> BlockIdent {
        BlockIdent {
            key: BlockKey::new(&[i; 32]).unwrap(),
            checksum: 1000 + i as u64,
            len: (2 * T * W * 2) as u64,
        }
    }

    /// K and V of block `i`: per channel a different bias and range.
    fn kv(i: u8) -> (Vec<f16>, Vec<f16>) {
        let mut s = 0x9e37_79b9_u32.wrapping_mul(i as u32 + 1);
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let mut x = |scale: f32| -> Vec<f16> {
            (0..T * W)
                .map(|j| {
                    let c = j % W;
                    f16::from_f32((c % 7) as f32 - 3.0 + next() * scale * (1 + c % 5) as f32)
                })
                .collect()
        };
        (x(1.0), x(2.0))
    }

    fn put(p: &QuantCopies, i: u8) {
        let (k, v) = kv(i);
        p.insert(NamespaceId(1), 0, &ident(i), &k, &v, W);
    }

    fn bits_of(p: &QuantCopies, i: u8) -> Option<QuantBits> {
        p.get(NamespaceId(1), 0, &ident(i), QuantBits::Int4)
            .map(|c| c.bits)
    }

    /// Largest |x - x'| over a tensor, in units of its channel's step.
    fn worst_in_steps(x: &[f16], y: &[f32], levels: f32) -> f32 {
        let mut worst = 0f32;
        for c in 0..W {
            let col: Vec<f32> = x[c..].iter().step_by(W).map(|v| v.to_f32()).collect();
            let (lo, hi) = col
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let step = ((hi - lo) / levels).max(1e-6);
            for (t, &v) in col.iter().enumerate() {
                worst = worst.max((v - y[t * W + c]).abs() / step);
            }
        }
        worst
    }

    #[test]
    fn a_copy_gives_back_its_block_within_half_a_step() {
        let p = pool(1 << 20);
        put(&p, 1);
        let c = p
            .get(NamespaceId(1), 0, &ident(1), QuantBits::Int8)
            .unwrap();
        assert_eq!(c.bits, QuantBits::Int8);
        assert_eq!(c.bytes_len(), copy_bytes(T, W, QuantBits::Int8));
        let mut d = Decoded::default();
        assert!(c.decode(&mut d));
        let (k, v) = kv(1);
        // Half a step, plus what the f16 parameters round away.
        assert!(worst_in_steps(&k, &d.k, 255.0) <= 0.6);
        assert!(worst_in_steps(&v, &d.v, 255.0) <= 0.6);
        // Other layers, namespaces and blocks have none.
        assert!(
            p.get(NamespaceId(1), 1, &ident(1), QuantBits::Int4)
                .is_none()
        );
        assert!(
            p.get(NamespaceId(2), 0, &ident(1), QuantBits::Int4)
                .is_none()
        );
        assert!(
            p.get(NamespaceId(1), 0, &ident(2), QuantBits::Int4)
                .is_none()
        );
        // A re-put with other bytes makes it stale: dropped on sight.
        let mut other = ident(1);
        other.checksum += 1;
        assert!(p.get(NamespaceId(1), 0, &other, QuantBits::Int4).is_none());
        assert!(bits_of(&p, 1).is_none(), "the stale copy stays dropped");
    }

    #[test]
    fn a_corrupt_copy_fails_its_check() {
        let p = pool(1 << 20);
        put(&p, 3);
        let c = p
            .get(NamespaceId(1), 0, &ident(3), QuantBits::Int8)
            .unwrap();
        // SAFETY: test only; the copy is not being read concurrently.
        unsafe { *p.region.map.as_mut_ptr().add(c.offset as usize + 9000) ^= 1 };
        assert!(!c.decode(&mut Decoded::default()));
        p.corrupt(NamespaceId(1), 0, ident(3).key, &c);
        assert!(bits_of(&p, 3).is_none());
    }

    /// Under pressure the copies least recently made or found hot go to
    /// int4 first, then away; the region is never exceeded; a copy a call
    /// holds keeps its extent until the call lets go.
    #[test]
    fn pressure_demotes_then_drops_the_coldest() {
        let int8 = copy_bytes(T, W, QuantBits::Int8) as u64; // 40 KiB
        let int4 = copy_bytes(T, W, QuantBits::Int4) as u64; // 24 KiB
        let cap = 1 << 20;
        let p = pool(cap);
        for i in 0..25 {
            put(&p, i);
        }
        assert_eq!(p.used_bytes(), 25 * int8);
        assert!((0..25).all(|i| bits_of(&p, i) == Some(QuantBits::Int8)));
        // Copy 0 is found hot: it is now the newest.
        p.touch(NamespaceId(1), 0, ident(0).key);
        put(&p, 25);
        // 24 KiB were free; demoting copy 1 (the oldest) frees 16 KiB
        // more: room for one.
        assert_eq!(bits_of(&p, 0), Some(QuantBits::Int8), "touched copy kept");
        let demoted: Vec<u8> = (0..26)
            .filter(|&i| bits_of(&p, i) == Some(QuantBits::Int4))
            .collect();
        assert_eq!(demoted, vec![1]);
        assert!(p.used_bytes() <= cap);
        // An int8 floor does not take int4 copies.
        assert!(
            p.get(NamespaceId(1), 0, &ident(1), QuantBits::Int8)
                .is_none()
        );
        // More: the demoted ones go first, then the next oldest demote.
        let held = p
            .get(NamespaceId(1), 0, &ident(1), QuantBits::Int4)
            .unwrap();
        for i in 26..40 {
            put(&p, i);
            assert!(p.used_bytes() <= cap);
        }
        assert!(bits_of(&p, 1).is_none() && bits_of(&p, 2).is_none());
        assert!(
            (3..26).any(|i| bits_of(&p, i) == Some(QuantBits::Int4)),
            "older copies are int4 between those dropped and the int8 ones"
        );
        assert_eq!(bits_of(&p, 39), Some(QuantBits::Int8));
        assert_eq!(bits_of(&p, 0), Some(QuantBits::Int8));
        // Copy 1 is dropped, yet its extent is held by `held` until it
        // goes; its bytes still decode.
        assert!(held.decode(&mut Decoded::default()));
        let before = p.used_bytes();
        drop(held);
        assert_eq!(p.used_bytes(), before - int4);
        assert!(int4 < int8);
    }
}

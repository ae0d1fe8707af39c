//! Element types of stored K and V: f32, f16 and bf16.
//!
//! Kernels read stored rows through [`KvElem`] and always compute in f32:
//! a row is converted into a caller-provided f32 scratch row (F16C at run
//! time for f16, a 16-bit shift for bf16) or, for f32, read in place.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// Which of the three types an element is (lets kernels pick a
/// type-specific fast path without specialisation).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    F32,
    F16,
    Bf16,
}

/// A stored element of K or V. Conversions to f32 are exact for all three
/// types; `from_f32` rounds to nearest, ties to even.
pub trait KvElem: sealed::Sealed + Copy + Default + Send + Sync + 'static {
    /// Short name; also the suffix of the CUDA kernels for this type.
    const NAME: &'static str;

    #[doc(hidden)]
    const KIND: Kind;

    fn to_f32(self) -> f32;

    fn from_f32(x: f32) -> Self;

    /// Converts `src` into `dst` (equal lengths).
    fn slice_to_f32(src: &[Self], dst: &mut [f32]);

    /// `src` itself when the type is f32 (no conversion needed).
    fn as_f32(src: &[Self]) -> Option<&[f32]>;

    /// `src` as f32: in place for f32, else converted into `scratch`
    /// (at least `src.len()` long).
    #[inline]
    fn to_f32_in<'a>(src: &'a [Self], scratch: &'a mut [f32]) -> &'a [f32] {
        match Self::as_f32(src) {
            Some(s) => s,
            None => {
                let dst = &mut scratch[..src.len()];
                Self::slice_to_f32(src, dst);
                dst
            }
        }
    }
}

impl KvElem for f32 {
    const NAME: &'static str = "f32";
    const KIND: Kind = Kind::F32;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }

    #[inline]
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    #[inline(always)]
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        Some(src)
    }
}

impl KvElem for f16 {
    const NAME: &'static str = "f16";
    const KIND: Kind = Kind::F16;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }

    #[inline]
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        // half picks F16C at run time when the CPU has it.
        src.convert_to_f32_slice(dst);
    }

    #[inline(always)]
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl KvElem for bf16 {
    const NAME: &'static str = "bf16";
    const KIND: Kind = Kind::Bf16;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }

    #[inline]
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "bf16 conversion: lengths differ");
        // A shift per element: vectorises as is.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }

    #[inline(always)]
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

/// Largest f16 not above `x` (round toward -inf). NaN stays NaN.
pub fn f16_round_down(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() > x { f16_next_down(h) } else { h }
}

/// Smallest f16 not below `x` (round toward +inf). NaN stays NaN.
pub fn f16_round_up(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() < x { f16_next_up(h) } else { h }
}

fn f16_next_down(h: f16) -> f16 {
    let b = h.to_bits();
    let next = match b {
        0x0000 => 0x8001,              // +0 -> -smallest subnormal
        0xFC00 => 0xFC00,              // -inf stays
        b if b & 0x8000 == 0 => b - 1, // positive: toward zero
        b => b + 1,                    // negative: away from zero
    };
    f16::from_bits(next)
}

fn f16_next_up(h: f16) -> f16 {
    let b = h.to_bits();
    let next = match b {
        0x8000 => 0x0001, // -0 -> +smallest subnormal
        0x7C00 => 0x7C00, // +inf stays
        b if b & 0x8000 == 0 => b + 1,
        b => b - 1,
    };
    f16::from_bits(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directed_rounding_brackets_every_value() {
        let mut x = -70000.0f32;
        let mut checked = 0;
        while x < 70000.0 {
            for v in [x, x * 1e-6, -x * 3.7e-3] {
                let lo = f16_round_down(v).to_f32();
                let hi = f16_round_up(v).to_f32();
                assert!(lo <= v && v <= hi, "{v}: [{lo}, {hi}]");
                // Tight: at most one f16 step apart.
                let n = f16::from_f32(v).to_f32();
                assert!(lo == n || hi == n, "{v}: {lo} {n} {hi}");
                checked += 1;
            }
            x += 13.37;
        }
        assert!(checked > 10_000);
        assert_eq!(f16_round_down(0.0).to_bits(), 0);
        assert_eq!(f16_round_up(-1e-9).to_bits(), 0x8000);
        assert_eq!(f16_round_down(1e-9).to_bits(), 0);
        assert_eq!(f16_round_down(-1e-9).to_bits(), 0x8001);
        assert_eq!(f16_round_down(1e6).to_f32(), 65504.0);
        assert!(f16_round_up(1e6).to_f32().is_infinite());
    }

    #[test]
    fn conversions_are_exact() {
        let vals: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.173).collect();
        let h: Vec<f16> = vals.iter().map(|&x| f16::from_f32(x)).collect();
        let b: Vec<bf16> = vals.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut out = vec![0.0f32; vals.len()];
        f16::slice_to_f32(&h, &mut out);
        for (o, x) in out.iter().zip(&h) {
            assert_eq!(*o, x.to_f32());
        }
        bf16::slice_to_f32(&b, &mut out);
        for (o, x) in out.iter().zip(&b) {
            assert_eq!(*o, x.to_f32());
        }
    }
}

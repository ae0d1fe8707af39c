//! CUDA twins of the compute kernels (cargo feature `cuda`).
//!
//! The sources are `kernels/cuda/*.cu`, one file per kernel family, with
//! the same math and layouts as the CPU kernels (each file's header says
//! which). They are compiled at run time with NVRTC, or loaded as PTX that
//! NVRTC wrote elsewhere ([`PtxFrom::Dir`]), and run through the CUDA driver
//! API; both libraries are loaded dynamically by cudarc (CUDA 13.0
//! bindings: `cuda-13000`, `dynamic-loading`).
//!
//! Invariants:
//! * no entry point panics when `libcuda` or `libnvrtc` is missing: cudarc's
//!   loaders panic, so presence is checked first ([`driver_available`],
//!   [`nvrtc_available`]) and every call into cudarc that could still panic
//!   (a library missing a symbol) runs under `catch_unwind`;
//! * shapes are checked on the host and reported as [`GpuError::Shape`];
//!   indices that only the device sees (rows, channels) are bounds-checked
//!   by the kernels, which skip what is out of range;
//! * launches are asynchronous on one stream; downloads synchronise.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::attention::AttnParams;
use crate::elem::KvElem;
use crate::quant::QuantBits;

/// Errors of the GPU kernels.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("the CUDA driver library (libcuda.so) is not present on this machine")]
    NoDriver,
    #[error(
        "NVRTC (libnvrtc.so.13) was not found: put the directory of libnvrtc.so.13 on \
         LD_LIBRARY_PATH (kernels/scripts/nvrtc-env installs PyPI's nvidia-cuda-nvrtc 13.0 \
         and prints it)"
    )]
    NoNvrtc,
    #[error("NVRTC failed to compile {file}: {log}")]
    Compile { file: String, log: String },
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("bad shape: {0}")]
    Shape(String),
    #[error("a CUDA library call panicked: {0}")]
    Panicked(String),
}

/// One CUDA source file and the kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    /// File stem under `kernels/cuda/`.
    pub name: &'static str,
    code: &'static str,
    pub kernels: &'static [&'static str],
}

const COMMON: &str = include_str!("../cuda/common.cuh");
const INCLUDE: &str = "#include \"common.cuh\"";

/// Every kernel family; a test checks that this covers `kernels/cuda/*.cu`.
pub const SOURCES: [Source; 6] = [
    Source {
        name: "attention",
        code: include_str!("../cuda/attention.cu"),
        kernels: &[
            "attn_partial_f32",
            "attn_partial_f16",
            "attn_partial_bf16",
            "attn_merge_splits",
            "attn_merge_into",
        ],
    },
    Source {
        name: "abstracts",
        code: include_str!("../cuda/abstracts.cu"),
        kernels: &[
            "chunk_abstracts_f32",
            "chunk_abstracts_f16",
            "chunk_abstracts_bf16",
            "chunk_upper_bounds",
        ],
    },
    Source {
        name: "sparf",
        code: include_str!("../cuda/sparf.cu"),
        kernels: &["sparf_scores_f32", "sparf_scores_f16", "sparf_scores_bf16"],
    },
    Source {
        name: "sketch",
        code: include_str!("../cuda/sketch.cu"),
        kernels: &[
            "sketch_encode_f32",
            "sketch_encode_f16",
            "sketch_encode_bf16",
            "sketch_scores",
            "span_lse",
            "run_upper_bounds",
        ],
    },
    Source {
        name: "topk",
        code: include_str!("../cuda/topk.cu"),
        kernels: &["topk_rows"],
    },
    Source {
        name: "quant",
        code: include_str!("../cuda/quant.cu"),
        kernels: &[
            "quant_params_f32",
            "quant_params_f16",
            "quant_params_bf16",
            "quantize_int8_f32",
            "quantize_int8_f16",
            "quantize_int8_bf16",
            "quantize_int4_f32",
            "quantize_int4_f16",
            "quantize_int4_bf16",
            "dequantize_int8",
            "dequantize_int4",
        ],
    },
];

impl Source {
    /// A source that does not compile, to test error reporting.
    #[doc(hidden)]
    pub fn broken_for_tests() -> Source {
        Source {
            name: "broken",
            code: "#include \"common.cuh\"\nextern \"C\" __global__ void k() { no_such(); }\n",
            kernels: &["k"],
        }
    }

    /// The text NVRTC compiles: the file with `common.cuh` spliced in.
    pub fn text(&self) -> String {
        self.code.replacen(INCLUDE, COMMON, 1)
    }
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the candidate names.
    catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the candidate names.
    catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// Runs `f`, turning a panic inside cudarc into an error.
fn guard<T>(f: impl FnOnce() -> Result<T, GpuError>) -> Result<T, GpuError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(GpuError::Panicked(msg))
    })
}

/// Compiles `src` to PTX for `arch` (`compute_80`, ...) with NVRTC. Needs
/// no GPU, only `libnvrtc`.
pub fn compile_ptx(src: &Source, arch: &str) -> Result<String, GpuError> {
    if !nvrtc_available() {
        return Err(GpuError::NoNvrtc);
    }
    let file = format!("{}.cu", src.name);
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some(file.clone()),
        ..Default::default()
    };
    let text = src.text();
    guard(|| match cudarc::nvrtc::compile_ptx_with_opts(text, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { log, .. }) => Err(GpuError::Compile {
            file,
            log: log.to_string_lossy().into_owned(),
        }),
        Err(e) => Err(GpuError::Compile {
            file,
            log: format!("{e:?}"),
        }),
    })
}

/// Where [`Gpu::new`] gets its PTX.
#[derive(Debug, Clone, Copy)]
pub enum PtxFrom<'a> {
    /// Compile every source with NVRTC for the device's architecture.
    Nvrtc,
    /// Read `<dir>/<name>.ptx` for every source (written by
    /// [`compile_ptx`] on another machine, for an architecture the device
    /// can JIT and a PTX version its driver accepts).
    Dir(&'a Path),
}

/// A device element type: how K and V travel to the device.
pub trait GpuElem: KvElem {
    type Raw: DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin + Send + Sync + 'static;

    fn raw(s: &[Self]) -> &[Self::Raw];
}

impl GpuElem for f32 {
    type Raw = f32;

    fn raw(s: &[Self]) -> &[f32] {
        s
    }
}

impl GpuElem for f16 {
    type Raw = u16;

    fn raw(s: &[Self]) -> &[u16] {
        s.reinterpret_cast()
    }
}

impl GpuElem for bf16 {
    type Raw = u16;

    fn raw(s: &[Self]) -> &[u16] {
        s.reinterpret_cast()
    }
}

/// Which tokens [`Gpu::partial_attention`] covers (as [`crate::attention::Tokens`]).
#[derive(Debug, Clone, Copy)]
pub enum GpuTokens<'a> {
    All,
    Mask(&'a CudaSlice<u64>),
    Rows(&'a CudaSlice<u32>),
}

/// Device scratch for the split-K partials of [`Gpu::partial_attention`].
#[derive(Debug)]
pub struct AttnWorkspace {
    o_part: CudaSlice<f32>,
    lse_part: CudaSlice<f32>,
    splits_max: usize,
    heads_d_max: usize,
    heads_max: usize,
}

/// Threads per block of the attention and merge kernels.
const ATTN_THREADS: u32 = 128;
/// Static limit of dynamic shared memory without opt-in.
const SHARED_MAX: usize = 48 * 1024;
/// Query heads per group that the SparF kernel holds in registers.
pub const SPARF_MAX_HEADS: usize = 16;
/// Largest `k` of [`Gpu::top_k`]: its sort holds `next_pow2(k)` entries of
/// 8 bytes in shared memory, 64 KB here, which needs the opt-in above 48 KB
/// that every GPU from Volta on grants.
pub const TOPK_MAX_K: usize = 8192;
/// Largest `k` when the device refuses that opt-in (32 KB of entries).
const TOPK_MAX_K_DEFAULT_SHARED: usize = 4096;
/// Threads per block of `topk_rows` (its `__launch_bounds__`).
const TOPK_THREADS: u32 = 1024;

fn int(x: usize, what: &str) -> Result<i32, GpuError> {
    i32::try_from(x).map_err(|_| GpuError::Shape(format!("{what} = {x} exceeds i32")))
}

fn shape(ok: bool, msg: impl FnOnce() -> String) -> Result<(), GpuError> {
    if ok {
        Ok(())
    } else {
        Err(GpuError::Shape(msg()))
    }
}

/// Bytes of dynamic shared memory of `attn_partial` (see attention.cu).
fn attn_shared_bytes(heads: usize, d: usize, tile: usize) -> usize {
    4 * (heads * d + tile * (d + 1) + tile * d + heads * tile + heads * d + 3 * heads) + 4 * tile
}

/// Bytes of dynamic shared memory of `topk_rows` for `k` (see topk.cu).
fn topk_shared_bytes(k: usize) -> usize {
    8 * k.max(1).next_power_of_two()
}

/// The argument checks of [`Gpu::top_k`] (as the CPU twin's asserts, but
/// errors): `lens` are those of scores, idx, val and count.
fn topk_shape(
    k_max: usize,
    (rows, n, k): (usize, usize, usize),
    [scores, idx, val, count]: [usize; 4],
) -> Result<(), GpuError> {
    shape(k <= k_max, || {
        format!(
            "top-k: k = {k} exceeds this device's limit {k_max} (the sort lives in shared memory)"
        )
    })?;
    // The kernel counts `base + threadIdx.x` in an int.
    shape(n <= i32::MAX as usize - TOPK_THREADS as usize, || {
        format!("top-k: n = {n} exceeds i32 less a block")
    })?;
    let (Some(cells), Some(slots)) = (rows.checked_mul(n), rows.checked_mul(k)) else {
        return Err(GpuError::Shape(format!("top-k: {rows} rows overflow")));
    };
    shape(scores >= cells, || {
        format!("top-k: scores hold {scores} < rows * n = {cells}")
    })?;
    shape(idx >= slots && val >= slots && count >= rows, || {
        "top-k: outputs shorter than rows * k (idx, val) or rows (count)".into()
    })
}

/// A device with every kernel family loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    sms: usize,
    no_mask: CudaSlice<u64>,
    no_rows: CudaSlice<u32>,
    /// Largest `k` of [`Gpu::top_k`] on this device.
    topk_max_k: usize,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .field("sms", &self.sms)
            .finish()
    }
}

impl Gpu {
    /// Opens device `ordinal` and loads every kernel family.
    pub fn new(ordinal: usize, from: PtxFrom<'_>) -> Result<Self, GpuError> {
        if !driver_available() {
            return Err(GpuError::NoDriver);
        }
        if matches!(from, PtxFrom::Nvrtc) && !nvrtc_available() {
            return Err(GpuError::NoNvrtc);
        }
        guard(|| {
            let ctx = CudaContext::new(ordinal)?;
            let (major, minor) = ctx.compute_capability()?;
            let sms = ctx.attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )? as usize;
            let arch = format!("compute_{major}{minor}");
            let mut functions = HashMap::new();
            for src in &SOURCES {
                let ptx = match from {
                    PtxFrom::Nvrtc => compile_ptx(src, &arch)?,
                    PtxFrom::Dir(dir) => {
                        let path = dir.join(format!("{}.ptx", src.name));
                        std::fs::read_to_string(&path).map_err(|source| GpuError::Io {
                            path: path.display().to_string(),
                            source,
                        })?
                    }
                };
                let module = ctx.load_module(Ptx::from_src(ptx))?;
                for &name in src.kernels {
                    functions.insert(name, module.load_function(name)?);
                }
            }
            // The sort of k = TOPK_MAX_K entries needs more dynamic shared
            // memory than the 48 KB granted without asking; a device that
            // refuses keeps the smaller limit, and top_k says so.
            let topk_max_k = match functions.get("topk_rows").map(|f| {
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    topk_shared_bytes(TOPK_MAX_K) as i32,
                )
            }) {
                Some(Ok(())) => TOPK_MAX_K,
                _ => TOPK_MAX_K_DEFAULT_SHARED,
            };
            let stream = ctx.default_stream();
            let no_mask = stream.alloc_zeros::<u64>(1)?;
            let no_rows = stream.alloc_zeros::<u32>(1)?;
            Ok(Self {
                ctx,
                stream,
                functions,
                sms: sms.max(1),
                no_mask,
                no_rows,
                topk_max_k,
            })
        })
    }

    /// The device's name and compute capability.
    pub fn describe(&self) -> Result<String, GpuError> {
        guard(|| {
            let (a, b) = self.ctx.compute_capability()?;
            Ok(format!(
                "{} (sm_{a}{b}, {} SMs)",
                self.ctx.name()?,
                self.sms
            ))
        })
    }

    pub fn sm_count(&self) -> usize {
        self.sms
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, GpuError> {
        guard(|| Ok(self.stream.clone_htod(host)?))
    }

    /// Uploads K or V rows in their storage type.
    pub fn upload_kv<E: GpuElem>(&self, host: &[E]) -> Result<CudaSlice<E::Raw>, GpuError> {
        self.upload(E::raw(host))
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, GpuError> {
        guard(|| Ok(self.stream.alloc_zeros::<T>(len.max(1))?))
    }

    /// Copies `dev` to the host (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        dev: &CudaSlice<T>,
    ) -> Result<Vec<T>, GpuError> {
        guard(|| Ok(self.stream.clone_dtoh(dev)?))
    }

    /// Waits for every launch so far.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        guard(|| Ok(self.stream.synchronize()?))
    }

    fn function(&self, name: &str) -> Result<&CudaFunction, GpuError> {
        self.functions
            .get(name)
            .ok_or_else(|| GpuError::Shape(format!("no kernel {name}")))
    }

    /// Scratch for attention calls of up to `heads_max` heads of dimension
    /// up to `d_max`.
    pub fn attn_workspace(
        &self,
        heads_max: usize,
        d_max: usize,
    ) -> Result<AttnWorkspace, GpuError> {
        let splits_max = 2 * self.sms;
        Ok(AttnWorkspace {
            o_part: self.zeros(splits_max * heads_max * d_max)?,
            lse_part: self.zeros(splits_max * heads_max)?,
            splits_max,
            heads_d_max: heads_max * d_max,
            heads_max,
        })
    }

    /// `(o, lse)` of the heads in `q` over `tokens` of `k`, `v`: the twin of
    /// [`crate::attention::partial_attention`]. Split-K over about two
    /// blocks per SM, then an exact merge of the blocks' partials.
    #[allow(clippy::too_many_arguments)]
    pub fn partial_attention<E: GpuElem>(
        &self,
        p: &AttnParams,
        q: &CudaSlice<f32>,
        k: &CudaSlice<E::Raw>,
        v: &CudaSlice<E::Raw>,
        tokens: GpuTokens<'_>,
        ws: &mut AttnWorkspace,
        o: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let (heads, d) = (p.heads, p.d);
        shape(heads > 0 && d > 0, || format!("empty shape {p:?}"))?;
        shape(
            q.len() == heads * d && o.len() == heads * d && lse.len() == heads,
            || "q/o are not [heads][d] or lse not [heads]".into(),
        )?;
        shape(k.len() == v.len() && k.len().is_multiple_of(d), || {
            "K and V are not [n][d]".into()
        })?;
        shape(heads * d <= ws.heads_d_max && heads <= ws.heads_max, || {
            "workspace too small".into()
        })?;
        let n = k.len() / d;
        let (mode, count, mask, rows) = match tokens {
            GpuTokens::All => (0i32, n, &self.no_mask, &self.no_rows),
            GpuTokens::Mask(m) => {
                shape(m.len() * 64 >= n, || "mask too short".into())?;
                (1, n, m, &self.no_rows)
            }
            GpuTokens::Rows(r) => (2, r.len(), &self.no_mask, r),
        };
        let tile = [32usize, 16, 8]
            .into_iter()
            .find(|&t| attn_shared_bytes(heads, d, t) <= SHARED_MAX)
            .ok_or_else(|| {
                GpuError::Shape(format!("{heads} heads x d {d} exceed shared memory"))
            })?;
        let per_block = count
            .div_ceil(ws.splits_max)
            .max(2 * tile)
            .next_multiple_of(tile);
        let splits = count.div_ceil(per_block).max(1);
        shape(splits <= ws.splits_max, || "too many splits".into())?;
        let (n_i, heads_i, d_i) = (int(n, "n")?, int(heads, "heads")?, int(d, "d")?);
        let (count_i, per_i, tile_i) = (
            int(count, "count")?,
            int(per_block, "per_block")?,
            int(tile, "tile")?,
        );
        let (splits_i, scale) = (int(splits, "splits")?, p.scale);
        let partial = self.function(&format!("attn_partial_{}", E::NAME))?;
        let merge = self.function("attn_merge_splits")?;
        guard(|| {
            let mut b = self.stream.launch_builder(partial);
            b.arg(q)
                .arg(k)
                .arg(v)
                .arg(&n_i)
                .arg(&heads_i)
                .arg(&d_i)
                .arg(&scale);
            b.arg(&mode)
                .arg(mask)
                .arg(rows)
                .arg(&count_i)
                .arg(&per_i)
                .arg(&tile_i);
            b.arg(&mut ws.o_part).arg(&mut ws.lse_part);
            let cfg = LaunchConfig {
                grid_dim: (splits as u32, 1, 1),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: attn_shared_bytes(heads, d, tile) as u32,
            };
            // SAFETY: argument types and order match attn_partial_* in
            // attention.cu; every buffer holds what the shapes above imply.
            unsafe { b.launch(cfg) }?;
            let mut b = self.stream.launch_builder(merge);
            b.arg(&ws.o_part)
                .arg(&ws.lse_part)
                .arg(&splits_i)
                .arg(&heads_i)
                .arg(&d_i);
            b.arg(o).arg(lse);
            let cfg = LaunchConfig {
                grid_dim: (heads as u32, 1, 1),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches attn_merge_splits; o_part holds splits partials.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }

    /// `(o, lse) <- merge((o, lse), (o_b, lse_b))`: the twin of
    /// [`crate::attention::merge_into`].
    pub fn merge_into(
        &self,
        d: usize,
        o: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
        o_b: &CudaSlice<f32>,
        lse_b: &CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let heads = lse.len();
        shape(
            lse_b.len() == heads && o.len() == heads * d && o_b.len() == heads * d && heads > 0,
            || "merge: shapes differ".into(),
        )?;
        let (heads_i, d_i) = (int(heads, "heads")?, int(d, "d")?);
        let f = self.function("attn_merge_into")?;
        guard(|| {
            let mut b = self.stream.launch_builder(f);
            b.arg(o)
                .arg(lse)
                .arg(o_b)
                .arg(lse_b)
                .arg(&heads_i)
                .arg(&d_i);
            let cfg = LaunchConfig {
                grid_dim: (heads as u32, 1, 1),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches attn_merge_into; shapes checked above.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }

    /// Abstracts of the chunks of `k` (`[n][d]`) as f16 bit patterns
    /// (`[chunks][d]` each): the twin of [`crate::abstracts::chunk_abstracts`].
    pub fn chunk_abstracts<E: GpuElem>(
        &self,
        k: &CudaSlice<E::Raw>,
        d: usize,
        chunk: usize,
        min: &mut CudaSlice<u16>,
        max: &mut CudaSlice<u16>,
        mean: &mut CudaSlice<u16>,
    ) -> Result<(), GpuError> {
        shape(d > 0 && chunk > 0 && k.len().is_multiple_of(d), || {
            "K is not [n][d]".into()
        })?;
        let n = k.len() / d;
        let chunks = n.div_ceil(chunk);
        shape(
            min.len() == chunks * d && max.len() == chunks * d && mean.len() == chunks * d,
            || "abstracts are not [chunks][d]".into(),
        )?;
        if chunks == 0 {
            return Ok(());
        }
        let (n_i, d_i, c_i) = (int(n, "n")?, int(d, "d")?, int(chunk, "chunk")?);
        let f = self.function(&format!("chunk_abstracts_{}", E::NAME))?;
        guard(|| {
            let mut b = self.stream.launch_builder(f);
            b.arg(k)
                .arg(&n_i)
                .arg(&d_i)
                .arg(&c_i)
                .arg(min)
                .arg(max)
                .arg(mean);
            let cfg = LaunchConfig {
                grid_dim: (chunks as u32, 1, 1),
                block_dim: (d.next_multiple_of(32).min(256) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches chunk_abstracts_*; shapes checked above.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }

    /// `out[h][j] = UB_j(q_h)` (`[heads][chunks]`): the twin of
    /// [`crate::abstracts::upper_bounds`].
    pub fn upper_bounds(
        &self,
        q: &CudaSlice<f32>,
        heads: usize,
        d: usize,
        min: &CudaSlice<u16>,
        max: &CudaSlice<u16>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        shape(d > 0 && q.len() == heads * d, || {
            "q is not [heads][d]".into()
        })?;
        shape(
            min.len() == max.len() && min.len().is_multiple_of(d),
            || "abstracts are not [chunks][d]".into(),
        )?;
        let chunks = min.len() / d;
        shape(out.len() == heads * chunks, || {
            "out is not [heads][chunks]".into()
        })?;
        let warps = heads * chunks;
        if warps == 0 {
            return Ok(());
        }
        let (h_i, d_i, c_i) = (int(heads, "heads")?, int(d, "d")?, int(chunks, "chunks")?);
        let f = self.function("chunk_upper_bounds")?;
        guard(|| {
            let mut b = self.stream.launch_builder(f);
            b.arg(q)
                .arg(&h_i)
                .arg(&d_i)
                .arg(min)
                .arg(max)
                .arg(&c_i)
                .arg(out);
            let cfg = LaunchConfig {
                grid_dim: (warps.div_ceil(4) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches chunk_upper_bounds; shapes checked above.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }

    /// `out[h][b] = UB_b(q_h)` of blocks `blocks` of a run's channel-major
    /// boxes (`lo`, `hi` `[d][cap]`, f16 bits; `out` `[heads][blocks]`):
    /// the twin of [`crate::sketch::run_upper_bounds`].
    #[allow(clippy::too_many_arguments)]
    pub fn run_upper_bounds(
        &self,
        q: &CudaSlice<f32>,
        heads: usize,
        d: usize,
        lo: &CudaSlice<u16>,
        hi: &CudaSlice<u16>,
        cap: usize,
        blocks: std::ops::Range<usize>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        shape(d > 0 && q.len() == heads * d, || {
            "q is not [heads][d]".into()
        })?;
        shape(
            lo.len() == hi.len() && lo.len() >= d * cap && blocks.end <= cap,
            || "boxes are not [d][cap] or blocks beyond the run".into(),
        )?;
        let nb = blocks.len();
        shape(out.len() == heads * nb, || {
            "out is not [heads][blocks]".into()
        })?;
        if heads * nb == 0 {
            return Ok(());
        }
        let (h_i, d_i, cap_i) = (int(heads, "heads")?, int(d, "d")?, int(cap, "cap")?);
        let (b0_i, nb_i) = (int(blocks.start, "blocks")?, int(nb, "blocks")?);
        let f = self.function("run_upper_bounds")?;
        guard(|| {
            let mut b = self.stream.launch_builder(f);
            b.arg(q)
                .arg(&h_i)
                .arg(&d_i)
                .arg(lo)
                .arg(hi)
                .arg(&cap_i)
                .arg(&b0_i)
                .arg(&nb_i)
                .arg(out);
            let cfg = LaunchConfig {
                grid_dim: ((heads * nb).div_ceil(128) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches run_upper_bounds in sketch.cu; shapes checked
            // above.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }

    /// SparF group scores of all tokens of the dim-major `kt` (`[d][n]`) on
    /// `channels`: the twin of [`crate::sparf::sparf_scores`].
    #[allow(clippy::too_many_arguments)]
    pub fn sparf_scores<E: GpuElem>(
        &self,
        q: &CudaSlice<f32>,
        heads: usize,
        d: usize,
        kt: &CudaSlice<E::Raw>,
        channels: &CudaSlice<u32>,
        scale: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        shape((1..=SPARF_MAX_HEADS).contains(&heads), || {
            format!("{heads} heads: 1..={SPARF_MAX_HEADS} supported")
        })?;
        shape(
            d > 0 && q.len() == heads * d && kt.len().is_multiple_of(d),
            || "bad q or Kt shape".into(),
        )?;
        let n = kt.len() / d;
        shape(out.len() == n, || "out is not [n]".into())?;
        if n == 0 {
            return Ok(());
        }
        let r = channels.len();
        let (h_i, d_i, n_i, r_i) = (
            int(heads, "heads")?,
            int(d, "d")?,
            int(n, "n")?,
            int(r, "r")?,
        );
        let f = self.function(&format!("sparf_scores_{}", E::NAME))?;
        guard(|| {
            let mut b = self.stream.launch_builder(f);
            b.arg(q)
                .arg(&h_i)
                .arg(&d_i)
                .arg(kt)
                .arg(&n_i)
                .arg(channels)
                .arg(&r_i);
            b.arg(&scale).arg(out);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: (4 * heads * r) as u32,
            };
            // SAFETY: matches sparf_scores_*; shapes checked above.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }

    /// Largest `k` that [`Gpu::top_k`] accepts on this device
    /// ([`TOPK_MAX_K`], or less where the device refuses the shared memory).
    pub fn top_k_max(&self) -> usize {
        self.topk_max_k
    }

    /// Top-k of each row of `scores` (`[rows][n]`): the twin of
    /// [`crate::topk::top_k`], bit for bit. Row `r` gets its best
    /// `count[r] = min(k, non-NaN scores)` in `idx[r * k..][..count[r]]`
    /// and `val[r * k..][..count[r]]`, best first (higher value, then lower
    /// index); the rest of a row's `k` slots are not written. `idx` and
    /// `val` hold at least `rows * k` entries, `count` at least `rows`.
    /// Limits: `k <= self.top_k_max()` (8192 on GPUs from Volta on),
    /// `n <= i32::MAX - 1024`, `rows <= i32::MAX`; beyond them a
    /// [`GpuError::Shape`].
    pub fn top_k(
        &self,
        scores: &CudaSlice<f32>,
        (rows, n): (usize, usize),
        k: usize,
        idx: &mut CudaSlice<u32>,
        val: &mut CudaSlice<f32>,
        count: &mut CudaSlice<u32>,
    ) -> Result<(), GpuError> {
        topk_shape(
            self.topk_max_k,
            (rows, n, k),
            [scores.len(), idx.len(), val.len(), count.len()],
        )?;
        if rows == 0 {
            return Ok(());
        }
        let (n_i, k_i, rows_i) = (int(n, "n")?, int(k, "k")?, int(rows, "rows")?);
        let f = self.function("topk_rows")?;
        guard(|| {
            let mut b = self.stream.launch_builder(f);
            b.arg(scores)
                .arg(&n_i)
                .arg(&k_i)
                .arg(idx)
                .arg(val)
                .arg(count);
            let cfg = LaunchConfig {
                grid_dim: (rows_i as u32, 1, 1),
                block_dim: (TOPK_THREADS, 1, 1),
                shared_mem_bytes: topk_shared_bytes(k) as u32,
            };
            // SAFETY: matches topk_rows in topk.cu; the buffers hold
            // rows * n scores and rows * k, rows outputs (checked above),
            // and the shared memory for k was granted in `new`.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }

    /// Group scores of `nb` blocks of `n` tokens from their key sketches
    /// (`codes` `[nb][d][stride]`, the boxes of the chosen channels `lo`,
    /// `hi` `[nb][r]`): the twin of [`crate::sketch::sketch_scores`] over a
    /// batch of blocks. `out` is `[nb][n]`; `ok[b]` is 0 where a chosen box
    /// is not finite (its scores are then -inf; the CPU refuses the block).
    #[allow(clippy::too_many_arguments)]
    pub fn sketch_scores(
        &self,
        q: &CudaSlice<f32>,
        heads: usize,
        d: usize,
        codes: &CudaSlice<u8>,
        (nb, n, stride): (usize, usize, usize),
        (lo, hi): (&CudaSlice<f32>, &CudaSlice<f32>),
        channels: &CudaSlice<u32>,
        scale: f32,
        out: &mut CudaSlice<f32>,
        ok: &mut CudaSlice<u8>,
    ) -> Result<(), GpuError> {
        shape((1..=SPARF_MAX_HEADS).contains(&heads), || {
            format!("{heads} heads: 1..={SPARF_MAX_HEADS} supported")
        })?;
        let r = channels.len();
        shape(
            d > 0 && q.len() == heads * d && n <= stride && codes.len() == nb * d * stride,
            || "bad q or codes shape".into(),
        )?;
        shape(lo.len() == nb * r && hi.len() == nb * r, || {
            "lo, hi are not [nb][r]".into()
        })?;
        shape(out.len() == nb * n && ok.len() == nb, || {
            "out is not [nb][n] or ok not [nb]".into()
        })?;
        if nb * n == 0 {
            return Ok(());
        }
        let (h_i, d_i, nb_i, n_i, s_i, r_i) = (
            int(heads, "heads")?,
            int(d, "d")?,
            int(nb, "nb")?,
            int(n, "n")?,
            int(stride, "stride")?,
            int(r, "r")?,
        );
        let f = self.function("sketch_scores")?;
        guard(|| {
            let mut b = self.stream.launch_builder(f);
            b.arg(q)
                .arg(&h_i)
                .arg(&d_i)
                .arg(codes)
                .arg(&nb_i)
                .arg(&n_i)
                .arg(&s_i);
            b.arg(lo).arg(hi).arg(channels).arg(&r_i);
            b.arg(&scale).arg(out).arg(ok);
            let cfg = LaunchConfig {
                grid_dim: ((nb * n).div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches sketch_scores in sketch.cu; shapes checked
            // above.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }

    /// Per-channel `lo`, `step` of the tile `x` (`[n][d]`): the twin of
    /// [`crate::quant::quant_params`].
    pub fn quant_params<E: GpuElem>(
        &self,
        x: &CudaSlice<E::Raw>,
        d: usize,
        bits: QuantBits,
        lo: &mut CudaSlice<f32>,
        step: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        shape(d > 0 && x.len().is_multiple_of(d) && !x.is_empty(), || {
            "tile is not [n][d]".into()
        })?;
        shape(lo.len() == d && step.len() == d, || {
            "lo/step are not [d]".into()
        })?;
        let (n_i, d_i, levels) = (int(x.len() / d, "n")?, int(d, "d")?, bits.levels());
        let f = self.function(&format!("quant_params_{}", E::NAME))?;
        guard(|| {
            let mut b = self.stream.launch_builder(f);
            b.arg(x).arg(&n_i).arg(&d_i).arg(&levels).arg(lo).arg(step);
            let cfg = LaunchConfig {
                grid_dim: (d.div_ceil(128) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches quant_params_*; shapes checked above.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }

    /// Codes of `x` (`[n][d]`): the twin of [`crate::quant::quantize`].
    pub fn quantize<E: GpuElem>(
        &self,
        x: &CudaSlice<E::Raw>,
        d: usize,
        bits: QuantBits,
        lo: &CudaSlice<f32>,
        step: &CudaSlice<f32>,
        codes: &mut CudaSlice<u8>,
    ) -> Result<(), GpuError> {
        shape(d > 0 && x.len().is_multiple_of(d), || {
            "tile is not [n][d]".into()
        })?;
        shape(bits == QuantBits::Int8 || d.is_multiple_of(2), || {
            "int4 needs an even d".into()
        })?;
        shape(lo.len() == d && step.len() == d, || {
            "lo/step are not [d]".into()
        })?;
        let n = x.len() / d;
        let bytes = n * bits.row_bytes(d);
        shape(codes.len() == bytes, || {
            "codes are not [n][row_bytes]".into()
        })?;
        if bytes == 0 {
            return Ok(());
        }
        let name = match bits {
            QuantBits::Int8 => format!("quantize_int8_{}", E::NAME),
            QuantBits::Int4 => format!("quantize_int4_{}", E::NAME),
        };
        let (n_i, d_i) = (int(n, "n")?, int(d, "d")?);
        let f = self.function(&name)?;
        guard(|| {
            let mut b = self.stream.launch_builder(f);
            b.arg(x).arg(&n_i).arg(&d_i).arg(lo).arg(step).arg(codes);
            let cfg = LaunchConfig {
                grid_dim: (bytes.div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches quantize_*; shapes checked above.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }

    /// `out` (`[n][d]` f32) from `codes`: the twin of
    /// [`crate::quant::dequantize`].
    pub fn dequantize(
        &self,
        codes: &CudaSlice<u8>,
        d: usize,
        bits: QuantBits,
        lo: &CudaSlice<f32>,
        step: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        shape(
            d > 0 && (bits == QuantBits::Int8 || d.is_multiple_of(2)),
            || "bad d".into(),
        )?;
        shape(lo.len() == d && step.len() == d, || {
            "lo/step are not [d]".into()
        })?;
        let rb = bits.row_bytes(d);
        shape(codes.len().is_multiple_of(rb), || {
            "codes are not [n][row_bytes]".into()
        })?;
        let n = codes.len() / rb;
        shape(out.len() == n * d, || "out is not [n][d]".into())?;
        if n == 0 {
            return Ok(());
        }
        let name = match bits {
            QuantBits::Int8 => "dequantize_int8",
            QuantBits::Int4 => "dequantize_int4",
        };
        let (n_i, d_i) = (int(n, "n")?, int(d, "d")?);
        let f = self.function(name)?;
        guard(|| {
            let mut b = self.stream.launch_builder(f);
            b.arg(codes).arg(&n_i).arg(&d_i).arg(lo).arg(step).arg(out);
            let cfg = LaunchConfig {
                grid_dim: ((n * d).div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches dequantize_*; shapes checked above.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without a GPU driver (CI), opening a device is an
    /// error, never a panic. With one, it opens.
    #[test]
    fn gpu_without_driver_is_an_error() {
        match Gpu::new(0, PtxFrom::Dir(Path::new("/nonexistent"))) {
            Err(GpuError::NoDriver) => assert!(!driver_available()),
            Err(e) => {
                assert!(driver_available());
                println!("driver present; opening with no PTX failed as it should: {e}");
            }
            Ok(_) => panic!("loaded PTX from a directory that does not exist"),
        }
    }

    /// Without libnvrtc, compiling is an error, never a panic.
    #[test]
    fn compile_without_the_compiler_is_an_error() {
        let got = compile_ptx(&SOURCES[0], "compute_80");
        if nvrtc_available() {
            assert!(got.is_ok(), "{got:?}");
        } else {
            assert!(matches!(got, Err(GpuError::NoNvrtc)), "{got:?}");
            assert!(matches!(
                Gpu::new(0, PtxFrom::Nvrtc),
                Err(GpuError::NoDriver | GpuError::NoNvrtc)
            ));
        }
    }

    #[test]
    fn every_source_splices_the_common_header() {
        for src in &SOURCES {
            let text = src.text();
            assert!(!text.contains(INCLUDE), "{}", src.name);
            assert!(text.contains("STRATA_FOR_TYPES"), "{}", src.name);
            for k in src.kernels {
                assert!(text.contains(&k[..k.rfind('_').unwrap_or(k.len())]), "{k}");
            }
        }
    }

    #[test]
    fn topk_shared_memory_limits() {
        assert_eq!(topk_shared_bytes(0), 8);
        assert_eq!(topk_shared_bytes(TOPK_MAX_K), 64 * 1024);
        assert_eq!(topk_shared_bytes(TOPK_MAX_K - 1), 64 * 1024);
        // Below the default 48 KB, with room for the kernel's static
        // histogram and scan slots (about 1.3 KB).
        assert!(topk_shared_bytes(TOPK_MAX_K_DEFAULT_SHARED) + 2048 <= SHARED_MAX);
    }

    #[test]
    fn topk_refuses_bad_shapes_with_an_error() {
        let ok = |rows_n_k, lens| topk_shape(TOPK_MAX_K, rows_n_k, lens).is_ok();
        assert!(ok((8, 131_072, 8192), [8 * 131_072, 8 * 8192, 8 * 8192, 8]));
        assert!(ok((3, 5000, 0), [15_000, 1, 1, 3]));
        assert!(ok((0, 0, 0), [1, 1, 1, 1]));
        // Over the limit, short scores, short outputs, overflowing rows.
        assert!(!ok((1, 100, TOPK_MAX_K + 1), [100, 9000, 9000, 1]));
        assert!(!ok((2, 100, 10), [199, 20, 20, 2]));
        assert!(!ok((2, 100, 10), [200, 19, 20, 2]));
        assert!(!ok((2, 100, 10), [200, 20, 20, 1]));
        assert!(!ok((usize::MAX, 2, 1), [usize::MAX; 4]));
        assert!(!ok((1, i32::MAX as usize, 1), [usize::MAX; 4]));
        let small = topk_shape(TOPK_MAX_K_DEFAULT_SHARED, (1, 8192, 8192), [8192; 4]);
        assert!(matches!(small, Err(GpuError::Shape(m)) if m.contains("limit 4096")));
    }

    #[test]
    fn attention_tiles_fit_shared_memory() {
        assert!(attn_shared_bytes(8, 128, 32) <= SHARED_MAX);
        assert!(attn_shared_bytes(16, 128, 16) <= SHARED_MAX);
        assert!(attn_shared_bytes(8, 256, 8) <= SHARED_MAX);
    }
}

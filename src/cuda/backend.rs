//! The CUDA backend (feature `cuda`): kernels compiled by NVRTC for the device's architecture on
//! first use (cached on disk per source hash and architecture), launched through cudarc.
//!
//! Layers, as in cudarc: `crate::ffi` holds the raw params structs (bindgen), [`launch`] is the
//! checked-but-unsafe launch, [`CudaBackend`] the safe API behind the [`Backend`] trait.
//!
//! Every operation runs on the device: planning (f64 logits and entropy, f32 budget recurrence,
//! block-wide top-k), prefill (dense and sparse; mma.sync for f16/bf16 with D 64/128, SIMT
//! otherwise), `kv_compress` (two-pass window scoring, pooling, top-k, gather) and split-K decode.
//! Outside the kernels' limits (window rows per kv head whose scoring tiles exceed shared memory)
//! the compression runs on the host CPU backend; the compression's selection (radix
//! select; AdaKV's floor, cross-head picks and merge) keeps any count on the device.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};

use super::source;
use crate::backend::{Backend, BackendKind, Capabilities, HeadDims};
use crate::compress::CompressedCache;
use crate::error::{Error, Result};
use crate::ffi::{EkCompressParams, EkDecodeParams, EkPlanParams, EkPrefillParams, EkTensor};
use crate::plan::Plan;
use crate::tensor::{DType, HostDataMut, TensorView, TensorViewMut};
use crate::validate::{AttentionArgs, CompressArgs, DecodeArgs, PlanArgs};

// SAFETY: plain-old-data `#[repr(C)]` structs of fixed-width fields, passed by value to kernels.
unsafe impl DeviceRepr for EkPrefillParams {}
unsafe impl DeviceRepr for EkDecodeParams {}
unsafe impl DeviceRepr for EkPlanParams {}
unsafe impl DeviceRepr for EkCompressParams {}

/// Tile shapes the kernels are compiled with (cuda/prefill.cu, cuda/decode.cu).
const MMA_ROWS_PER_WARP: usize = 16;
/// The tensor-core prefill's tile heights (`_m64`, `_m128`); the smaller must hold a GQA group.
const MMA_TILE_SMALL: usize = 64;
const MMA_TILE_LARGE: usize = 128;
const MMA_KEYS: usize = 64;
const SIMT_ROWS: usize = 32;
const SIMT_KEYS: usize = 32;
const SIMT_THREADS: u32 = 128;
const DECODE_THREADS: u32 = 128;
const DECODE_MAX_SMEM: usize = 48 * 1024;
/// Floats of the decode's partial-output scratch: streams · DECODE_ROW_PASS · D with streams =
/// 4 warps · 32 / lanes per cache row (cuda/decode.cu) is at most 4096 for D ≤ 256.
const DECODE_SCRATCH: usize = 4096;
const DECODE_MIN_KEYS: usize = 64;
const DECODE_MAX_KEYS: usize = 512;
const PLAN_THREADS: u32 = 256;
const TOPK_THREADS: u32 = 512;
/// Largest ranking width of the planning's bitonic top-k (`block_topk` in cuda/topk.cuh; wider
/// rankings count ranks instead); the compression's radix selection keeps any count.
pub(crate) const TOPK_CAP: usize = 1024;
const COMPRESS_THREADS: u32 = 128;
const COMPRESS_KEYS: usize = 32;
const COMPRESS_MMA_THREADS: u32 = 128;
const COMPRESS_MMA_KEYS: usize = 64;
const COMPRESS_CHUNK: usize = 2048;

pub(crate) fn driver_err(call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Driver { backend: "cuda", call, detail: e.to_string() }
}

/// The device image for `arch`: from the on-disk cache, else compiled by NVRTC and cached.
fn image(arch: &str) -> Result<Vec<u8>> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    source::SOURCE.hash(&mut h);
    source::options(arch, false).hash(&mut h);
    let dir = std::env::var_os("ENTROPY_KERNELS_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| std::path::PathBuf::from(d).join("entropy-kernels")))
        .or_else(|| std::env::var_os("HOME").map(|d| std::path::PathBuf::from(d).join(".cache/entropy-kernels")));
    let file = dir.as_ref().map(|d| d.join(format!("{:016x}-{arch}.cubin", h.finish())));
    if let Some(bytes) = file.as_ref().and_then(|f| std::fs::read(f).ok()) {
        return Ok(bytes);
    }
    let compiled = source::compile(arch, false).map_err(|detail| Error::Driver {
        backend: "cuda",
        call: "nvrtcCompileProgram",
        detail,
    })?;
    if let (Some(d), Some(f)) = (dir, file) {
        // A cache that cannot be written only costs a recompile next time.
        let _ = std::fs::create_dir_all(&d).and_then(|_| std::fs::write(&f, &compiled.image));
    }
    Ok(compiled.image)
}

/// The CUDA backend on one device.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    caps: Capabilities,
    name: String,
    arch: String,
    /// Where the kernels came from: the nvcc fatbin or NVRTC.
    origin: &'static str,
    /// Dynamic shared memory a block may use (the device's opt-in limit, set on every kernel).
    max_shared: usize,
    /// Streaming multiprocessors: how many CTAs make a wave.
    sms: usize,
    /// The tensor-core prefill's tile height (rows = query tokens × group heads per CTA).
    prefill_tile: PrefillTile,
    /// Host fallback for the operations without device kernels yet.
    host: crate::cpu::CpuBackend,
}

/// Environment variable: the tensor-core prefill's tile height, `auto` (default), `64` or `128`.
pub const PREFILL_TILE_ENV: &str = "ENTROPY_KERNELS_PREFILL_TILE";

/// Rows per CTA of the tensor-core prefill (`ek_prefill_mma_*_m64` / `_m128`). Both keep 16 rows
/// per warp; 128 rows read each K/V tile half as often per query row but need twice Q's shared
/// memory and make half as many CTAs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillTile {
    /// 128 rows when they fit in shared memory, fill whole segments and make at least two waves
    /// of CTAs; else 64.
    Auto,
    M64,
    M128,
}

impl std::str::FromStr for PrefillTile {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(PrefillTile::Auto),
            "64" => Ok(PrefillTile::M64),
            "128" => Ok(PrefillTile::M128),
            other => Err(Error::range(PREFILL_TILE_ENV, other, "expected auto, 64 or 128")),
        }
    }
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("device", &self.name).field("arch", &self.arch).finish()
    }
}

impl CudaBackend {
    /// Opens device `ordinal` (its primary context), compiles (or loads the cached) kernels and
    /// loads them.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_context(CudaContext::new(ordinal).map_err(driver_err("cuCtxCreate"))?)
    }

    /// The backend in an engine's existing context (e.g. candle's or cudarc's `CudaContext`), so
    /// its streams and buffers can be passed to the `_on` calls.
    pub fn with_context(ctx: Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx.compute_capability().map_err(driver_err("cuDeviceGetAttribute"))?;
        if major < 8 {
            return Err(Error::BackendUnavailable {
                backend: "cuda",
                reason: format!("compute capability {major}.{minor}: the kernels need sm_80 or newer"),
            });
        }
        let arch = std::env::var("CUDA_COMPUTE_CAP")
            .ok()
            .map(|c| format!("sm_{}", c.replace('.', "")))
            .unwrap_or(if major == 9 && minor == 0 { "sm_90a".into() } else { format!("sm_{major}{minor}") });
        // The nvcc fatbin when it holds SASS for this arch (or NVRTC is absent: the driver JITs its
        // compute_80 PTX); otherwise NVRTC for exactly this device.
        let nvrtc = super::nvrtc_present();
        let (bytes, origin) = match source::FATBIN {
            Some(f)
                if std::env::var_os(source::NVRTC_ENV).is_none()
                    && (source::FATBIN_ARCHS.contains(&arch.as_str()) || !nvrtc) =>
            {
                (f.to_vec(), "nvcc fatbin")
            }
            _ => (image(&arch)?, "NVRTC"),
        };
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bytes)).map_err(driver_err("cuModuleLoadData"))?;
        let optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(driver_err("cuDeviceGetAttribute"))?;
        let mut funcs = HashMap::new();
        for &k in source::KERNELS {
            let f = module.load_function(k).map_err(driver_err("cuModuleGetFunction"))?;
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, optin)
                .map_err(driver_err("cuFuncSetAttribute"))?;
            funcs.insert(k, f);
        }
        let sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_err("cuDeviceGetAttribute"))?;
        let prefill_tile = match std::env::var(PREFILL_TILE_ENV) {
            Ok(v) => v.parse()?,
            Err(_) => PrefillTile::Auto,
        };
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let stream = ctx.default_stream();
        Ok(CudaBackend {
            ctx,
            stream,
            funcs,
            caps: Capabilities::full("cuda", HeadDims::UpTo(256)),
            name,
            arch,
            origin,
            max_shared: optin as usize,
            sms: sms.max(1) as usize,
            prefill_tile,
            host: crate::cpu::CpuBackend::new(),
        })
    }

    /// Chooses the tensor-core prefill's tile height (default: [`PREFILL_TILE_ENV`], else auto).
    /// A forced height that does not fit the device's shared memory falls back to 64 rows.
    pub fn set_prefill_tile(&mut self, tile: PrefillTile) {
        self.prefill_tile = tile;
    }

    /// The tile height prefills on this backend use unless told otherwise.
    pub fn prefill_tile(&self) -> PrefillTile {
        self.prefill_tile
    }

    pub(crate) fn default_stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context of this backend's device.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn func(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }

    fn upload<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        upload_on(&self.stream, data)
    }

    /// Uploads a view's whole buffer; the tensor descriptor keeps its strides.
    fn tensor(&self, v: &TensorView<'_>) -> Result<(CudaSlice<u8>, EkTensor)> {
        let dev = self.upload(v.data().as_bytes())?;
        let t = EkTensor::new(self.ptr(&dev), v.shape(), v.strides());
        Ok((dev, t))
    }

    /// A contiguous device output of `shape`.
    fn output(&self, shape: [usize; 4], dtype: DType) -> Result<(CudaSlice<u8>, EkTensor)> {
        let dev = self
            .stream
            .alloc_zeros::<u8>(shape.iter().product::<usize>() * dtype.size())
            .map_err(driver_err("cuMemAlloc"))?;
        let t = EkTensor::contiguous(self.ptr(&dev), shape);
        Ok((dev, t))
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, sync) = s.device_ptr(&self.stream);
        drop(sync);
        p
    }

    /// Copies a contiguous device result into the caller's (possibly strided) output view.
    fn download(&self, dev: &CudaSlice<u8>, out: &mut TensorViewMut<'_>) -> Result<()> {
        let bytes: Vec<u8> = self.stream.clone_dtoh(dev).map_err(driver_err("cuMemcpyDtoH"))?;
        let [b0, b1, b2, d] = out.shape();
        let strides = out.strides();
        macro_rules! scatter {
            ($s:expr, $t:ty) => {{
                let src: &[$t] = bytemuck::cast_slice(&bytes);
                for i in 0..b0 {
                    for j in 0..b1 {
                        for k in 0..b2 {
                            let o = i * strides[0] + j * strides[1] + k * strides[2];
                            let s = ((i * b1 + j) * b2 + k) * d;
                            $s[o..o + d].copy_from_slice(&src[s..s + d]);
                        }
                    }
                }
            }};
        }
        match out.data_mut() {
            HostDataMut::F32(s) => scatter!(s, f32),
            HostDataMut::F16(s) => scatter!(s, half::f16),
            HostDataMut::BF16(s) => scatter!(s, half::bf16),
        }
        Ok(())
    }
}

/// `data` in fresh device memory, ordered on `stream` (one zero element for an empty slice).
pub(crate) fn upload_on<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    data: &[T],
) -> Result<CudaSlice<T>> {
    if data.is_empty() {
        return stream.alloc_zeros::<T>(1).map_err(driver_err("cuMemAlloc"));
    }
    stream.clone_htod(data).map_err(driver_err("cuMemcpyHtoD"))
}

/// The device address of `s` for a kernel ordered on `stream`.
pub(crate) fn addr_on<T>(stream: &CudaStream, s: &CudaSlice<T>) -> u64 {
    let (p, sync) = s.device_ptr(stream);
    drop(sync);
    p
}

/// One prefill on device tensors: the host path's uploaded copies or an engine's own memory.
pub(crate) struct PrefillJob<'a> {
    pub dims: crate::validate::AttnDims,
    pub dtype: DType,
    pub q: EkTensor,
    pub k: EkTensor,
    pub v: EkTensor,
    pub out: EkTensor,
    /// f32 [B, Hq, L] or 0.
    pub lse: u64,
    pub lists: crate::ffi::PrefillLists<'a>,
    pub scale: f32,
}

/// One `kv_compress` on device tensors.
pub(crate) struct CompressJob<'a> {
    pub dims: crate::validate::CompressDims,
    pub cfg: &'a crate::config::DecodeConfig,
    pub dtype: DType,
    pub k_cache: EkTensor,
    pub v_cache: EkTensor,
    pub obs: EkTensor,
    pub scale: f32,
}

/// The scoring kernels of one compression and their dynamic shared memory.
pub(crate) struct CompressKernels {
    stats: String,
    means: String,
    threads: u32,
    smem_stats: usize,
    smem_means: usize,
}

/// The workspaces of one compression, alive until its kernels have run.
pub(crate) struct CompressRun {
    _stats: CudaSlice<f32>,
    _means: CudaSlice<f32>,
    _pooled: CudaSlice<f32>,
    /// u32 `[B, Hc, list_stride]`: each head's kept positions, ascending, after `compress_select`.
    pub selected: CudaSlice<u32>,
    /// AdaKV: u32 `[B, Hc]` entries kept per head (window included); `None`: `budget` each.
    pub lengths: Option<CudaSlice<u32>>,
    /// AdaKV's workspaces (floor and cross-head picks).
    _picks: Option<(CudaSlice<u32>, CudaSlice<u32>)>,
    pub params: EkCompressParams,
}

impl CompressRun {
    /// Positions per (b, head) row of `selected`.
    pub fn list_stride(&self) -> usize {
        self.params.list_stride as usize
    }
}

/// One decode on device tensors.
pub(crate) struct DecodeJob<'a> {
    pub dims: crate::validate::DecodeDims,
    pub dtype: DType,
    pub q: EkTensor,
    pub k_cache: EkTensor,
    pub v_cache: EkTensor,
    pub out: EkTensor,
    pub lengths: &'a [u32],
    pub scale: f32,
}

/// Launches `func` with one params struct.
///
/// # Safety
/// Every device address inside `params` must be valid for the accesses the kernel makes with
/// the sizes the struct describes.
unsafe fn launch<P: DeviceRepr>(
    stream: &CudaStream,
    func: &CudaFunction,
    grid: (u32, u32, u32),
    block: u32,
    smem: usize,
    params: &P,
) -> Result<()> {
    let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem as u32 };
    let mut b = stream.launch_builder(func);
    b.arg(params);
    unsafe { b.launch(cfg) }.map_err(driver_err("cuLaunchKernel"))?;
    Ok(())
}

/// Whether every row of a tensor of `dtype` starts on the 16-byte grid the kernels' vector loads
/// and `cp.async` copies need: the base (a caller's slice may start anywhere) and the strides
/// (elements) of dims 0..2.
fn on_16_byte_grid(t: &EkTensor, dtype: DType) -> bool {
    let per_16 = (16 / dtype.size()) as i64;
    t.ptr.is_multiple_of(16) && t.stride.iter().all(|s| s % per_16 == 0)
}

/// Block tiles of `ek_plan_logits`, largest first.
const PLAN_LOGIT_TILES: [usize; 4] = [64, 32, 16, 8];

/// Dynamic shared memory of `ek_plan_logits` (cuda/plan.cu) with `tile` blocks: the padded K
/// representatives, a pass of segments' Q sums and their partial logits (f64).
fn plan_logits_smem(tile: usize, group: usize, head_dim: usize) -> usize {
    let segments = (PLAN_THREADS as usize / (tile * group)).max(1);
    8 * (tile * (2 * head_dim + 1) + segments * group * head_dim + segments * tile * group)
}

/// Dynamic shared memory of `ek_prefill_mma_*_m<rows>`: Q, double-buffered K and V tiles (rows
/// padded by 8 halves), their tokens.
fn mma_prefill_smem(rows: usize, head_dim: usize) -> usize {
    (rows + 4 * MMA_KEYS) * (head_dim + 8) * 2 + 2 * MMA_KEYS * 4
}

fn dtype_suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
    }
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }
    fn describe(&self) -> String {
        let tile = match self.prefill_tile {
            PrefillTile::Auto => String::new(),
            t => format!(", prefill tile {t:?}"),
        };
        format!("cuda ({}, {}, kernels from {}{tile})", self.name, self.arch, self.origin)
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn plan(&self, a: &PlanArgs<'_>) -> Result<Plan> {
        let d = a.dims();
        if d.blocks == 0 {
            return self.host.plan(a);
        }
        let (_q, q) = self.tensor(&a.q())?;
        let (_k, k) = self.tensor(&a.k())?;
        let shape = crate::validate::PlanShape {
            cfg: a.cfg(),
            fusion: a.fusion(),
            dims: d,
            head_dim: a.head_dim(),
            keep_maps: a.keep_maps(),
        };
        self.plan_launch(&self.stream, &shape, a.q().dtype(), q, k)
    }

    fn kv_compress(&self, a: &CompressArgs<'_>) -> Result<CompressedCache> {
        let d = a.dims();
        let cfg = a.cfg();
        if !d.compresses(cfg) {
            return self.host.kv_compress(a);
        }
        let dtype = a.k_cache().dtype();
        let dd = d.head_dim;
        let heads = d.out_heads(cfg);
        // Chosen before anything is uploaded: the copy will start an allocation (16-byte aligned),
        // so only the view's strides matter.
        let planned = EkTensor::new(0, a.k_cache().shape(), a.k_cache().strides());
        let Ok(kernels) = self.compress_kernels(&d, dtype, &planned) else {
            // More window rows than the scoring tiles can hold in shared memory.
            return self.host.kv_compress(a);
        };
        let (_kc, k_cache) = self.tensor(&a.k_cache())?;
        let (_vc, v_cache) = self.tensor(&a.v_cache())?;
        let (_obs, obs) = self.tensor(&a.obs())?;
        let job = CompressJob { dims: d, cfg, dtype, k_cache, v_cache, obs, scale: a.scale() };
        let run = self.compress_score(&self.stream, &job, &kernels)?;
        let lengths = self.compress_select(&self.stream, &job, &run)?;
        let capacity = lengths.iter().copied().max().unwrap_or(0) as usize;
        let out_len = d.batch * heads * capacity * dd * dtype.size();
        let k_out = self.stream.alloc_zeros::<u8>(out_len).map_err(driver_err("cuMemAlloc"))?;
        let v_out = self.stream.alloc_zeros::<u8>(out_len).map_err(driver_err("cuMemAlloc"))?;
        self.compress_gather(&self.stream, &job, &run, capacity, self.ptr(&k_out), self.ptr(&v_out))?;
        self.stream.synchronize().map_err(driver_err("cuStreamSynchronize"))?;
        let shape = [d.batch, heads, capacity, dd];
        let fetch = |s: &CudaSlice<u8>| -> Result<crate::tensor::HostTensor> {
            let bytes: Vec<u8> = self.stream.clone_dtoh(s).map_err(driver_err("cuMemcpyDtoH"))?;
            Ok(crate::tensor::HostTensor::from_bytes(&bytes, shape, dtype))
        };
        let selected: Vec<u32> = self.stream.clone_dtoh(&run.selected).map_err(driver_err("cuMemcpyDtoH"))?;
        let indices = super::device::padded_indices(&selected, run.list_stride(), &lengths, d.window);
        Ok(CompressedCache {
            k: fetch(&k_out)?,
            v: fetch(&v_out)?,
            lengths,
            indices,
            window: d.window,
            compressed: true,
        })
    }

    fn attention(&self, a: &AttentionArgs<'_>, out: &mut TensorViewMut<'_>, lse: Option<&mut [f32]>) -> Result<()> {
        let d = a.dims();
        let dtype = a.q().dtype();
        let (_q, q) = self.tensor(&a.q())?;
        let (_k, k) = self.tensor(&a.k())?;
        let (_v, v) = self.tensor(&a.v())?;
        let (out_dev, o) = self.output(out.shape(), dtype)?;
        let lse_dev = match &lse {
            Some(_) => Some(
                self.stream.alloc_zeros::<f32>(d.batch * d.q_heads * d.seq_len).map_err(driver_err("cuMemAlloc"))?,
            ),
            None => None,
        };
        let job = PrefillJob {
            dims: d,
            dtype,
            q,
            k,
            v,
            out: o,
            lse: lse_dev.as_ref().map_or(0, |s| self.ptr(s)),
            lists: crate::ffi::prefill_lists(a),
            scale: a.scale(),
        };
        self.prefill_launch(&self.stream, &job)?;
        self.stream.synchronize().map_err(driver_err("cuStreamSynchronize"))?;
        self.download(&out_dev, out)?;
        if let (Some(dst), Some(src)) = (lse, lse_dev) {
            let host: Vec<f32> = self.stream.clone_dtoh(&src).map_err(driver_err("cuMemcpyDtoH"))?;
            dst.copy_from_slice(&host);
        }
        Ok(())
    }

    fn decode_attention(&self, a: &DecodeArgs<'_>, out: &mut TensorViewMut<'_>) -> Result<()> {
        let dtype = a.q().dtype();
        let (_q, q) = self.tensor(&a.q())?;
        let (_k, k_cache) = self.tensor(&a.k_cache())?;
        let (_v, v_cache) = self.tensor(&a.v_cache())?;
        let (out_dev, o) = self.output(out.shape(), dtype)?;
        let job =
            DecodeJob { dims: a.dims(), dtype, q, k_cache, v_cache, out: o, lengths: a.lengths(), scale: a.scale() };
        self.decode_launch(&self.stream, &job)?;
        self.stream.synchronize().map_err(driver_err("cuStreamSynchronize"))?;
        self.download(&out_dev, out)
    }
}

impl CudaBackend {
    /// Enqueues a prefill on `stream` (nothing is waited for: the lists' device copies are freed
    /// in stream order after the kernel).
    pub(crate) fn prefill_launch(&self, stream: &Arc<CudaStream>, job: &PrefillJob<'_>) -> Result<()> {
        let d = job.dims;
        let dtype = job.dtype;
        let g = d.group();
        let pl = &job.lists;
        let (segment_size, segments, block_size) = (pl.segment_size, pl.segments, pl.block_size);
        let lists = match &pl.lists {
            Some((offsets, counts, indices)) => {
                Some((upload_on(stream, offsets)?, upload_on(stream, counts)?, upload_on(stream, indices)?))
            }
            None => None,
        };
        let aligned = [&job.q, &job.k, &job.v].into_iter().all(|t| on_16_byte_grid(t, dtype));
        let mma = dtype != DType::F32 && (d.head_dim == 64 || d.head_dim == 128) && aligned && g <= MMA_TILE_SMALL;
        let (name, rows, threads, smem) = if mma {
            let m = self.mma_tile_rows(d.head_dim, g, segment_size, segments * d.batch * d.kv_heads);
            (
                format!("ek_prefill_mma_{}_d{}_m{m}", dtype_suffix(dtype), d.head_dim),
                m,
                (m / MMA_ROWS_PER_WARP * 32) as u32,
                mma_prefill_smem(m, d.head_dim),
            )
        } else {
            if g > SIMT_ROWS {
                return Err(Error::range(
                    "group",
                    g,
                    format!("the CUDA kernels stack at most {SIMT_ROWS} query heads per kv head in f32"),
                ));
            }
            let dp = d.head_dim + 1;
            (
                format!("ek_prefill_simt_{}", dtype_suffix(dtype)),
                SIMT_ROWS,
                SIMT_THREADS,
                (2 * SIMT_ROWS + 2 * SIMT_KEYS) * dp * 4 + SIMT_KEYS * 4,
            )
        };
        let tile_tokens = (rows / g).max(1);
        let tiles_per_segment = segment_size.div_ceil(tile_tokens);
        let params = EkPrefillParams {
            q: job.q,
            k: job.k,
            v: job.v,
            out: job.out,
            lse: job.lse,
            offsets: lists.as_ref().map_or(0, |l| addr_on(stream, &l.0)),
            counts: lists.as_ref().map_or(0, |l| addr_on(stream, &l.1)),
            indices: lists.as_ref().map_or(0, |l| addr_on(stream, &l.2)),
            workspace: 0,
            segment_size: segment_size as i32,
            block_size: block_size as i32,
            segments: segments as i32,
            group: g as i32,
            tile_tokens: tile_tokens as i32,
            tiles_per_segment: tiles_per_segment as i32,
            scale_log2: job.scale * std::f32::consts::LOG2_E,
            dtype: 0,
        };
        let grid = ((segments * tiles_per_segment) as u32, (d.batch * d.kv_heads) as u32, 1);
        // SAFETY: every address in `params` points at live device memory sized by the validated dims.
        unsafe { launch(stream, self.func(&name), grid, threads, smem, &params) }
    }

    /// The tensor-core prefill's rows per CTA for head dim `d`, group `g` and `units` (b, kv head,
    /// segment) units (see [`PrefillTile`]).
    fn mma_tile_rows(&self, d: usize, g: usize, segment_size: usize, units: usize) -> usize {
        let fits = mma_prefill_smem(MMA_TILE_LARGE, d) <= self.max_shared;
        match self.prefill_tile {
            PrefillTile::M64 => MMA_TILE_SMALL,
            PrefillTile::M128 if fits => MMA_TILE_LARGE,
            PrefillTile::M128 => MMA_TILE_SMALL,
            PrefillTile::Auto => {
                let tokens = MMA_TILE_LARGE / g;
                let ctas = units * segment_size.div_ceil(tokens);
                if fits && tokens <= segment_size && ctas >= 2 * self.sms { MMA_TILE_LARGE } else { MMA_TILE_SMALL }
            }
        }
    }

    /// Plans on device tensors `q`/`k` on `stream` (every step on the device; the decisions come
    /// back to the host, so this waits for the stream). Needs blocks.
    pub(crate) fn plan_launch(
        &self,
        stream: &Arc<CudaStream>,
        p: &crate::validate::PlanShape<'_>,
        dtype: DType,
        q: EkTensor,
        k: EkTensor,
    ) -> Result<Plan> {
        let d = p.dims;
        let cfg = p.cfg;
        let width = d.rank_width(cfg.base_budget);
        let (dd, n, units) = (p.head_dim, d.blocks, d.units());
        let f32s = |len: usize| stream.alloc_zeros::<f32>(len.max(1)).map_err(driver_err("cuMemAlloc"));
        let u32s = |len: usize| stream.alloc_zeros::<u32>(len.max(1)).map_err(driver_err("cuMemAlloc"));
        // Written in full by reps_q / reps_k, and `key` wherever it is read (blocks before each
        // unit's causal limit): no zeroing (at 128K tokens `krep` and `key` are 256 MiB each).
        // SAFETY: plain f64s; the kernels write every element they later read (the emulated
        // driver poisons fresh allocations with NaN, so a read of an unwritten one would show).
        let f64s = |len: usize| unsafe { stream.alloc::<f64>(len.max(1)) }.map_err(driver_err("cuMemAlloc"));
        let qsum = f64s(d.batch * d.segments * d.q_heads * dd)?;
        let krep = f64s(d.batch * n * d.kv_heads * 2 * dd)?;
        let key = f64s(units * n)?;
        let logits = if p.keep_maps { Some(f32s(units * n)?) } else { None };
        let scores = if p.keep_maps || cfg.layer_fusion { Some(f32s(units * n)?) } else { None };
        let prev = match p.fusion {
            Some(prev) => Some(upload_on(stream, prev)?),
            None => None,
        };
        let entropy = f32s(units)?;
        let budgets = f32s(units)?;
        let keep = u32s(units)?;
        let topk = u32s(d.segments)?;
        let classes = stream.alloc_zeros::<u8>(d.batch * d.kv_heads).map_err(driver_err("cuMemAlloc"))?;
        let order = u32s(units * width)?;
        // The logits kernel's block tile: the largest that fits in shared memory while the grid
        // still makes two waves (a larger tile re-reads the segments' Q sums fewer times).
        let logit_tile = PLAN_LOGIT_TILES
            .into_iter()
            .filter(|&t| plan_logits_smem(t, d.group(), dd) <= self.max_shared)
            .find(|&t| n.div_ceil(t) * d.kv_heads * d.batch >= 2 * self.sms)
            .or_else(|| {
                PLAN_LOGIT_TILES.into_iter().rev().find(|&t| plan_logits_smem(t, d.group(), dd) <= self.max_shared)
            })
            .ok_or_else(|| Error::range("head dim", dd, "the planning logits' tiles exceed shared memory"))?;
        let opt = |s: &Option<CudaSlice<f32>>| s.as_ref().map_or(0, |s| addr_on(stream, s));
        let params = EkPlanParams {
            q,
            k,
            qsum: addr_on(stream, &qsum),
            krep: addr_on(stream, &krep),
            key: addr_on(stream, &key),
            logits: opt(&logits),
            scores: opt(&scores),
            prev: opt(&prev),
            entropy: addr_on(stream, &entropy),
            budgets: addr_on(stream, &budgets),
            keep: addr_on(stream, &keep),
            topk: addr_on(stream, &topk),
            classes: addr_on(stream, &classes),
            order: addr_on(stream, &order),
            width: width as i32,
            base_budget: cfg.base_budget as i32,
            fixed_budget: (cfg.budget_policy == crate::config::BudgetPolicy::Fixed) as i32,
            e_t: cfg.e_t,
            delta_t: cfg.delta_t,
            alpha: cfg.alpha,
            entropy_floor: cfg.entropy_floor,
            logit_tile: logit_tile as i32,
            ..EkPlanParams::sized(&d, dd, dtype)
        };
        let sfx = dtype_suffix(dtype);
        let (b, hkv, nseg) = (d.batch as u32, d.kv_heads as u32, d.segments as u32);
        // SAFETY: every buffer in `params` was allocated above with the sizes the kernels index.
        unsafe {
            launch(stream, self.func(&format!("ek_plan_reps_q_{sfx}")), (nseg, b, 1), PLAN_THREADS, 0, &params)?;
            launch(stream, self.func(&format!("ek_plan_reps_k_{sfx}")), (n as u32, b, 1), PLAN_THREADS, 0, &params)?;
            let (tiles, smem) = (n.div_ceil(logit_tile) as u32, plan_logits_smem(logit_tile, d.group(), dd));
            launch(stream, self.func("ek_plan_logits"), (tiles, hkv, b), PLAN_THREADS, smem, &params)?;
            launch(stream, self.func("ek_plan_softmax"), (units as u32, 1, 1), PLAN_THREADS, 0, &params)?;
            let grid = (b * hkv).div_ceil(PLAN_THREADS);
            launch(stream, self.func("ek_plan_decide"), (grid, 1, 1), PLAN_THREADS, 0, &params)?;
            // Bitonic top-k within TOPK_CAP; ranks by counting beyond it.
            let (rank, threads) =
                if width <= TOPK_CAP { ("ek_plan_rank", TOPK_THREADS) } else { ("ek_plan_rank_wide", PLAN_THREADS) };
            launch(stream, self.func(rank), (units as u32, 1, 1), threads, 0, &params)?;
        }
        stream.synchronize().map_err(driver_err("cuStreamSynchronize"))?;
        let get_f32 = |s: &CudaSlice<f32>, len: usize| -> Result<Vec<f32>> {
            let mut v: Vec<f32> = stream.clone_dtoh(s).map_err(driver_err("cuMemcpyDtoH"))?;
            v.truncate(len);
            Ok(v)
        };
        let get_u32 = |s: &CudaSlice<u32>, len: usize| -> Result<Vec<u32>> {
            let mut v: Vec<u32> = stream.clone_dtoh(s).map_err(driver_err("cuMemcpyDtoH"))?;
            v.truncate(len);
            Ok(v)
        };
        let segment_topk = get_u32(&topk, d.segments)?;
        let order_width = crate::plan::rules::order_width(&segment_topk);
        let full_order = get_u32(&order, units * width)?;
        let classes: Vec<u8> = stream.clone_dtoh(&classes).map_err(driver_err("cuMemcpyDtoH"))?;
        let mut plan = Plan {
            dims: d,
            logits: match &logits {
                Some(l) => get_f32(l, units * n)?,
                None => Vec::new(),
            },
            scores: match &scores {
                Some(s) => get_f32(s, units * n)?,
                None => Vec::new(),
            },
            entropy: get_f32(&entropy, units)?,
            head_class: classes
                .iter()
                .map(|&c| if c == 0 { crate::plan::HeadClass::Rigid } else { crate::plan::HeadClass::Dynamic })
                .collect(),
            budgets: get_f32(&budgets, units)?,
            keep_blocks: get_u32(&keep, units)?,
            segment_topk,
            // width is 0 when no keep can reach a block (keep_cap 0): then the order is empty.
            order: full_order.chunks(width.max(1)).flat_map(|r| r[..order_width].iter().copied()).collect(),
            order_width,
            blocks: crate::plan::BlockLists::all_dense(d),
        };
        plan.blocks = plan.block_lists(cfg.budget_mode, cfg.threshold_len);
        Ok(plan)
    }

    /// Enqueues the scoring, group reduction and pooling of a compression into `k_out`/`v_out`
    /// (each `[B, Hc, budget, D]` in the job's dtype).
    /// The scoring kernels for a compression: tensor cores for 16-bit caches with D 64/128 whose
    /// key rows sit on the grid the tiles are loaded in, FMAs otherwise. Out of range when the
    /// window rows' tiles do not fit in the device's shared memory.
    pub(crate) fn compress_kernels(
        &self,
        d: &crate::validate::CompressDims,
        dtype: DType,
        k_cache: &EkTensor,
    ) -> Result<CompressKernels> {
        let (rows, dd, sfx) = (d.group() * d.window, d.head_dim, dtype_suffix(dtype));
        let mma = dtype != DType::F32 && (dd == 64 || dd == 128) && on_16_byte_grid(k_cache, dtype);
        // Window rows and one key tile; per row (max, sum) or (reference, 1/sum); means: a
        // [keys][group] accumulator.
        let (kind, threads, keys, tiles, per_row) = if mma {
            let padded = rows.div_ceil(16) * 16;
            (
                format!("mma_{sfx}_d{dd}"),
                COMPRESS_MMA_THREADS,
                COMPRESS_MMA_KEYS,
                (padded + COMPRESS_MMA_KEYS) * (dd + 8) * 2,
                padded * 8,
            )
        } else {
            (sfx.to_string(), COMPRESS_THREADS, COMPRESS_KEYS, (rows + COMPRESS_KEYS) * (dd + 1) * 4, rows * 8)
        };
        let k = CompressKernels {
            stats: format!("ek_compress_stats_{kind}"),
            means: format!("ek_compress_means_{kind}"),
            threads,
            smem_stats: tiles + per_row,
            smem_means: tiles + keys * d.group() * 4 + per_row,
        };
        if k.smem_means > self.max_shared {
            let why = format!(
                "the scoring tiles of the window rows need {} bytes of shared memory, the device has {}",
                k.smem_means, self.max_shared
            );
            return Err(Error::range("window rows per kv head", rows, why));
        }
        Ok(k)
    }

    pub(crate) fn compress_score(
        &self,
        stream: &Arc<CudaStream>,
        job: &CompressJob<'_>,
        kernels: &CompressKernels,
    ) -> Result<CompressRun> {
        let (d, cfg) = (job.dims, job.cfg);
        let rows = d.group() * d.window;
        let keep = cfg.decode_budget - d.window;
        let (n, w) = (d.entries, d.window);
        let scored = n - w;
        let heads = d.out_heads(cfg);
        let chunks = n.div_ceil(COMPRESS_CHUNK);
        let f32s = |len: usize| stream.alloc_zeros::<f32>(len.max(1)).map_err(driver_err("cuMemAlloc"));
        let stats = f32s(d.batch * d.kv_heads * chunks * rows * 2)?;
        let means = f32s(d.batch * d.q_heads * scored)?;
        let pooled = f32s(d.batch * heads * scored)?;
        let params = EkCompressParams {
            k_cache: job.k_cache,
            v_cache: job.v_cache,
            obs: job.obs,
            stats: addr_on(stream, &stats),
            means: addr_on(stream, &means),
            pooled: addr_on(stream, &pooled),
            ..EkCompressParams::sized(&d, cfg, COMPRESS_CHUNK, job.scale, job.dtype)
        };
        let (b, hkv, hc) = (d.batch as u32, d.kv_heads as u32, heads as u32);
        // SAFETY: every buffer in `params` was allocated above (or by the caller) with the sizes
        // the kernels index.
        unsafe {
            let (grid, k) = ((chunks as u32, hkv, b), kernels);
            launch(stream, self.func(&k.stats), grid, k.threads, k.smem_stats, &params)?;
            launch(stream, self.func(&k.means), grid, k.threads, k.smem_means, &params)?;
            launch(stream, self.func("ek_compress_pool"), (scored.div_ceil(256) as u32, hc, b), 256, 0, &params)?;
        }
        let u32s = |len: usize| stream.alloc_zeros::<u32>(len.max(1)).map_err(driver_err("cuMemAlloc"));
        // The selection's buffers: one ascending list per head (AdaKV: as long as a head can get).
        let (selected, lengths, picks, params) = match cfg.head_budget {
            crate::config::HeadBudget::Uniform => {
                let selected = u32s(d.batch * heads * keep)?;
                let params =
                    EkCompressParams { selected: addr_on(stream, &selected), list_stride: keep as i32, ..params };
                (selected, None, None, params)
            }
            crate::config::HeadBudget::AdaKv { floor_fraction } => {
                let floor = crate::compress::adakv_floor(keep, floor_fraction);
                let extra = heads * (keep - floor);
                let stride = scored.min(floor + extra);
                let (selected, lengths) = (u32s(d.batch * heads * stride)?, u32s(d.batch * heads)?);
                let (floor_sel, extra_sel) = (u32s(d.batch * heads * floor)?, u32s(d.batch * extra)?);
                let params = EkCompressParams {
                    selected: addr_on(stream, &selected),
                    lengths: addr_on(stream, &lengths),
                    floor_sel: addr_on(stream, &floor_sel),
                    extra_sel: addr_on(stream, &extra_sel),
                    list_stride: stride as i32,
                    floor_keep: floor as i32,
                    extra_keep: extra as i32,
                    ..params
                };
                (selected, Some(lengths), Some((floor_sel, extra_sel)), params)
            }
        };
        Ok(CompressRun { _stats: stats, _means: means, _pooled: pooled, selected, lengths, _picks: picks, params })
    }

    /// Enqueues the selection of a scored compression — each head's top-k, or AdaKV's floor picks,
    /// cross-head picks and per-head merge — and returns the entries each head keeps (window
    /// included): `budget` each, or AdaKV's lengths read back (a stream synchronisation).
    pub(crate) fn compress_select(
        &self,
        stream: &Arc<CudaStream>,
        job: &CompressJob<'_>,
        run: &CompressRun,
    ) -> Result<Vec<u32>> {
        let (d, cfg) = (job.dims, job.cfg);
        let (b, hc) = (d.batch as u32, d.out_heads(cfg) as u32);
        let p = &run.params;
        let Some(lengths) = &run.lengths else {
            // SAFETY: `run` holds the buffers its params address, sized by `compress_score`.
            unsafe { launch(stream, self.func("ek_compress_topk"), (hc, b, 1), TOPK_THREADS, 0, p)? };
            return Ok(vec![cfg.decode_budget as u32; d.batch * hc as usize]);
        };
        // SAFETY: as above; AdaKV's buffers were sized for its floor and cross-head picks.
        unsafe {
            if p.floor_keep > 0 {
                // The top-k kernel keeps budget − W positions into `selected`: aim it at the floor.
                let floor = EkCompressParams { selected: p.floor_sel, budget: p.floor_keep + p.window, ..*p };
                launch(stream, self.func("ek_compress_topk"), (hc, b, 1), TOPK_THREADS, 0, &floor)?;
                launch(stream, self.func("ek_compress_adakv_mask"), (hc, b, 1), 256, 0, p)?;
            }
            if p.extra_keep > 0 {
                launch(stream, self.func("ek_compress_adakv_extra"), (b, 1, 1), TOPK_THREADS, 0, p)?;
            }
            launch(stream, self.func("ek_compress_adakv_merge"), (hc, b, 1), 256, 0, p)?;
        }
        stream.clone_dtoh(lengths).map_err(driver_err("cuMemcpyDtoH"))
    }

    /// Enqueues the gather of the selected entries (then the window) into `k_out`/`v_out`,
    /// `[B, Hc, capacity, D]` zeroed by the caller (slots past a head's length stay zero).
    pub(crate) fn compress_gather(
        &self,
        stream: &Arc<CudaStream>,
        job: &CompressJob<'_>,
        run: &CompressRun,
        capacity: usize,
        k_out: u64,
        v_out: u64,
    ) -> Result<()> {
        let (b, hc) = (job.dims.batch as u32, job.dims.out_heads(job.cfg) as u32);
        let p = EkCompressParams { k_out, v_out, capacity: capacity as i32, ..run.params };
        let name = format!("ek_compress_gather_{}", dtype_suffix(job.dtype));
        // SAFETY: the caller allocated the outputs with `capacity` slots per head.
        unsafe { launch(stream, self.func(&name), (capacity as u32, hc, b), COMPRESS_THREADS, 0, &p) }
    }

    /// Enqueues a split-K decode on `stream`.
    pub(crate) fn decode_launch(&self, stream: &Arc<CudaStream>, job: &DecodeJob<'_>) -> Result<()> {
        let d = job.dims;
        let rows = d.queries * d.group();
        // Shared memory: the query rows (later the streams' partial outputs, at most
        // DECODE_SCRATCH floats) and a score row of `kps` keys per query row.
        let region = (rows * d.head_dim).max(DECODE_SCRATCH);
        let kps_max = ((DECODE_MAX_SMEM / 4).saturating_sub(region) / rows.max(1)).min(DECODE_MAX_KEYS);
        if kps_max < 32 || d.head_dim > 256 {
            return Err(Error::range(
                "decode rows",
                rows,
                "too many query rows per cache head for the CUDA decode kernel",
            ));
        }
        // Keys per split: enough splits for two waves of CTAs over the cache heads, each split at
        // least DECODE_MIN_KEYS keys where shared memory allows (a multiple of 32).
        let max_len = job.lengths.iter().copied().max().unwrap_or(1).max(1) as usize;
        let splits_wanted = (2 * self.sms).div_ceil(d.batch * d.cache_heads);
        let kps = max_len.div_ceil(splits_wanted).next_multiple_of(32).max(DECODE_MIN_KEYS).min(kps_max);
        let splits = max_len.div_ceil(kps);
        let lengths = upload_on(stream, job.lengths)?;
        let partial = stream
            .alloc_zeros::<f32>(d.batch * d.cache_heads * splits * rows * (d.head_dim + 2))
            .map_err(driver_err("cuMemAlloc"))?;
        let params = EkDecodeParams {
            q: job.q,
            k_cache: job.k_cache,
            v_cache: job.v_cache,
            out: job.out,
            lengths: addr_on(stream, &lengths),
            partial: addr_on(stream, &partial),
            group: d.group() as i32,
            splits: splits as i32,
            keys_per_split: kps as i32,
            scale_log2: job.scale * std::f32::consts::LOG2_E,
            dtype: 0,
        };
        let sfx = dtype_suffix(job.dtype);
        let per_16 = 16 / job.dtype.size();
        let vectors = d.head_dim.is_multiple_of(per_16)
            && on_16_byte_grid(&job.k_cache, job.dtype)
            && on_16_byte_grid(&job.v_cache, job.dtype);
        let split = format!("ek_decode_split_{sfx}_v{}", if vectors { per_16 } else { 1 });
        let smem = (region + rows * kps) * 4;
        // SAFETY: buffers sized from the validated dims; lengths ≤ capacity was validated.
        unsafe {
            launch(
                stream,
                self.func(&split),
                (splits as u32, d.cache_heads as u32, d.batch as u32),
                DECODE_THREADS,
                smem,
                &params,
            )?;
            launch(
                stream,
                self.func(&format!("ek_decode_merge_{sfx}")),
                (rows as u32, d.cache_heads as u32, d.batch as u32),
                DECODE_THREADS,
                0,
                &params,
            )
        }
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.ctx.synchronize();
    }
}

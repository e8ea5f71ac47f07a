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
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};

pub(crate) use super::chunks::PlanSpan;
use super::source;
use crate::backend::{Backend, BackendKind, Capabilities, HeadDims, Op};
use crate::compress::CompressedCache;
use crate::error::{Error, Result};
use crate::ffi::{EkCompressParams, EkDecodeParams, EkPlanParams, EkPlanState, EkPrefillParams, EkTensor};
use crate::plan::Plan;
use crate::tensor::{DType, HostDataMut, TensorView, TensorViewMut};
use crate::validate::{AttentionArgs, CompressArgs, DecodeArgs, PlanArgs};

// SAFETY: plain-old-data `#[repr(C)]` structs of fixed-width fields, passed by value to kernels.
unsafe impl DeviceRepr for EkPrefillParams {}
unsafe impl DeviceRepr for EkDecodeParams {}
unsafe impl DeviceRepr for EkPlanParams {}
unsafe impl DeviceRepr for EkCompressParams {}
unsafe impl DeviceRepr for crate::ffi::EkProbeParams {}
unsafe impl DeviceRepr for crate::ffi::EkAttendParams {}
unsafe impl DeviceRepr for crate::ffi::EkAppendParams {}
unsafe impl DeviceRepr for crate::ffi::EkAttendTile {}
// SAFETY: twelve u32 fields: all zeros is a valid tile.
unsafe impl cudarc::driver::ValidAsZeroBits for crate::ffi::EkAttendTile {}
// SAFETY: plain old data of fixed-width fields, any bit pattern a valid value.
unsafe impl DeviceRepr for crate::ffi::EkPlanState {}
// SAFETY: as above; all-zero is a valid state.
unsafe impl cudarc::driver::ValidAsZeroBits for crate::ffi::EkPlanState {}

use super::launches::{self, DeviceLimits, KernelLimits, Launch, PrefillTile};

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
        // Written whole, then renamed into place: concurrent processes (and one killed mid-write)
        // never leave a truncated image for the next to load. A cache that cannot be written only
        // costs a recompile next time.
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("image");
        let tmp = d.join(format!(".{name}.{}.{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::create_dir_all(&d)
            .and_then(|_| std::fs::write(&tmp, &compiled.image))
            .and_then(|_| std::fs::rename(&tmp, &f));
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(compiled.image)
}

/// The architecture to compile the kernels for on a device of compute capability `cc`: the
/// device's own (`sm_90a` on 9.0, for its tensor-core instructions), or `requested`
/// (`CUDA_COMPUTE_CAP`, e.g. `80` or `8.6`) when code for it runs on the device — same major
/// version, no newer minor. Anything else would load no code (`CUDA_ERROR_NO_BINARY_FOR_GPU`), so
/// it is refused here, naming the variable.
pub fn target_arch(cc: (i32, i32), requested: Option<&str>) -> Result<String> {
    let own = if cc == (9, 0) { "sm_90a".to_string() } else { format!("sm_{}{}", cc.0, cc.1) };
    let Some(req) = requested.map(str::trim).filter(|r| !r.is_empty()) else { return Ok(own) };
    let digits: String = req.chars().filter(|c| c.is_ascii_digit()).collect();
    let parsed = (digits.len() >= 2)
        .then(|| (digits[..digits.len() - 1].parse::<i32>(), digits[digits.len() - 1..].parse::<i32>()));
    let Some((Ok(major), Ok(minor))) = parsed else {
        return Err(Error::range("CUDA_COMPUTE_CAP", req, "expected a compute capability such as 80 or 8.6"));
    };
    if major != cc.0 || minor > cc.1 {
        let why = format!(
            "code for sm_{major}{minor} cannot run on this compute capability {}.{} device; unset it or name {}{}",
            cc.0, cc.1, cc.0, cc.1
        );
        return Err(Error::range("CUDA_COMPUTE_CAP", req, why));
    }
    Ok(if (major, minor) == (9, 0) { "sm_90a".to_string() } else { format!("sm_{major}{minor}") })
}

/// The CUDA backend on one device.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    caps: Capabilities,
    name: String,
    arch: String,
    /// Where the kernels came from: the nvcc fatbin or NVRTC.
    origin: &'static str,
    /// Multiprocessors, and each kernel's launch bound and dynamic shared memory limit (the
    /// device's opt-in size less the kernel's static shared memory, set on every kernel).
    pub(crate) limits: DeviceLimits,
    /// The tensor-core prefill's tile height (rows = query tokens × group heads per CTA).
    prefill_tile: PrefillTile,
    /// Host fallback for the operations without device kernels yet.
    pub(super) host: crate::cpu::CpuBackend,
}

/// Environment variable: the tensor-core prefill's tile height, `auto` (default), `64` or `128`.
pub const PREFILL_TILE_ENV: &str = "ENTROPY_KERNELS_PREFILL_TILE";

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
    /// its streams and buffers can be passed to the `_on` calls. The kernels are compiled for the
    /// device's own architecture, or for `CUDA_COMPUTE_CAP` where its code runs on the device.
    pub fn with_context(ctx: Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx.compute_capability().map_err(driver_err("cuDeviceGetAttribute"))?;
        let requested = std::env::var("CUDA_COMPUTE_CAP").ok();
        let arch = target_arch((major, minor), requested.as_deref())?;
        Self::with_context_for_arch(ctx, &arch)
    }

    /// [`with_context`](Self::with_context) with the kernels built for `arch` (`sm_80`, `sm_90a`,
    /// …) whether or not the device can run it: tests use it to show what the driver refuses.
    #[doc(hidden)]
    pub fn with_context_for_arch(ctx: Arc<CudaContext>, arch: &str) -> Result<Self> {
        let (major, minor) = ctx.compute_capability().map_err(driver_err("cuDeviceGetAttribute"))?;
        if major < 8 {
            return Err(Error::BackendUnavailable {
                backend: "cuda",
                reason: format!("compute capability {major}.{minor}: the kernels need sm_80 or newer"),
            });
        }
        // The nvcc fatbin when it holds SASS for this arch (or NVRTC is absent: the driver JITs its
        // compute_80 PTX); otherwise NVRTC for exactly this arch.
        let nvrtc = super::nvrtc_present();
        let (bytes, origin) = match source::FATBIN {
            Some(f)
                if std::env::var_os(source::NVRTC_ENV).is_none()
                    && (source::FATBIN_ARCHS.contains(&arch) || !nvrtc) =>
            {
                (f.to_vec(), "nvcc fatbin")
            }
            _ => (image(arch)?, "NVRTC"),
        };
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bytes)).map_err(driver_err("cuModuleLoadData"))?;
        let optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(driver_err("cuDeviceGetAttribute"))?;
        let mut funcs = HashMap::new();
        let mut kernels = HashMap::new();
        for &k in source::KERNELS {
            let f = module.load_function(k).map_err(driver_err("cuModuleGetFunction"))?;
            // The driver allows static + dynamic ≤ the opt-in size: raise each kernel's dynamic
            // limit to the opt-in size less its own static shared memory.
            let static_smem = f.shared_size_bytes().map_err(driver_err("cuFuncGetAttribute"))?;
            let max_dynamic = (optin - static_smem).max(0);
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, max_dynamic)
                .map_err(driver_err("cuFuncSetAttribute"))?;
            let max_threads = f.max_threads_per_block().map_err(driver_err("cuFuncGetAttribute"))?;
            kernels.insert(
                k.to_string(),
                KernelLimits {
                    max_threads: max_threads.max(0) as u32,
                    max_dynamic_smem: max_dynamic as usize,
                    static_smem: static_smem.max(0) as usize,
                },
            );
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
            caps: Capabilities {
                ops: [&Op::CONTIGUOUS[..], &[Op::Attend, Op::PlanChunks, Op::Select]].concat(),
                // mma.sync takes P in the input's 16-bit type.
                low_precision_pv: vec![crate::DType::F16, crate::DType::BF16],
                ..Capabilities::full("cuda", HeadDims::UpTo(256))
            },
            name,
            arch: arch.to_string(),
            origin,
            limits: DeviceLimits { sms: sms.max(1) as usize, kernels },
            prefill_tile,
            host: crate::cpu::CpuBackend::new(),
        })
    }

    /// What each loaded kernel allows on this device, and its multiprocessor count.
    pub fn limits(&self) -> &DeviceLimits {
        &self.limits
    }

    /// Chooses launches as if a block had only `bytes` of shared memory (static and dynamic):
    /// on a large device, the tiles a smaller one would take (`cuda::smoke`'s 99 KiB pass).
    pub fn cap_shared_memory(&mut self, bytes: usize) {
        for k in self.limits.kernels.values_mut() {
            k.max_dynamic_smem = k.max_dynamic_smem.min(bytes.saturating_sub(k.static_smem));
        }
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

    pub(super) fn upload<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        upload_on(&self.stream, data)
    }

    /// Uploads a view's whole buffer; the tensor descriptor keeps its strides.
    pub(super) fn tensor(&self, v: &TensorView<'_>) -> Result<(CudaSlice<u8>, EkTensor)> {
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
    /// Over a paged cache: `k_cache`/`v_cache` hold the pools' addresses.
    pub paged: Option<PagedScoring>,
}

/// Where a compression over a paged cache (SPEC §7.5) finds its entries.
#[derive(Clone, Copy)]
pub(crate) struct PagedScoring {
    /// u32 `[B, Hc]`: entries per head, 0 where the sequence does not compress.
    pub head_lens: u64,
    /// u32 `[B, table_width]` page ids.
    pub table: u64,
    pub table_width: usize,
    pub layout: crate::engine::PageLayout,
}

impl PagedScoring {
    /// `params` reading keys through the table and each head's own length.
    fn apply(&self, params: EkCompressParams) -> EkCompressParams {
        let l = &self.layout;
        EkCompressParams {
            head_lens: self.head_lens,
            block_table: self.table,
            page_stride: l.strides[0] as i64,
            slot_stride: l.strides[1] as i64,
            head_stride: l.strides[2] as i64,
            table_width: self.table_width as i32,
            page_size: l.page_size as i32,
            ..params
        }
    }
}

/// The workspaces of one compression, alive until its kernels have run.
pub(crate) struct CompressRun {
    _stats: CudaSlice<f32>,
    _means: CudaSlice<f32>,
    pub pooled: CudaSlice<f32>,
    /// u32 `[B, Hc, list_stride]`: each head's kept positions, ascending, after `compress_select`.
    pub selected: CudaSlice<u32>,
    /// AdaKV or a paged cache: u32 `[B, Hc]` entries kept per head (window included); `None`:
    /// `budget` each.
    pub lengths: Option<CudaSlice<u32>>,
    /// AdaKV's workspaces (floor and cross-head picks).
    _picks: Option<(CudaSlice<u32>, CudaSlice<u32>)>,
    pub params: EkCompressParams,
    /// Pooling and selection launches.
    selection: launches::CompressSelection,
}

impl CompressRun {
    /// Positions per (b, head) row of `selected`.
    pub fn list_stride(&self) -> usize {
        self.params.list_stride as usize
    }
    /// The kept positions; the workspaces are freed (in stream order).
    pub fn into_selected(self) -> CudaSlice<u32> {
        self.selected
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

/// Whether every row of a tensor of `dtype` starts on the 16-byte grid the kernels' vector loads
/// and `cp.async` copies need: the base (a caller's slice may start anywhere) and the strides
/// (elements) of dims 0..2.
pub(crate) fn on_16_byte_grid(t: &EkTensor, dtype: DType) -> bool {
    let per_16 = (16 / dtype.size()) as i64;
    t.ptr.is_multiple_of(16) && t.stride.iter().all(|s| s % per_16 == 0)
}

/// Records on `stream` that `s` has been written by everything enqueued so far: cudarc's write
/// event of the slice, which another stream waits on before using it. (A guard dropped before the
/// launches would record the event ahead of the kernels that write the slice.)
pub(crate) fn written_on<T>(stream: &CudaStream, s: &mut CudaSlice<T>) {
    let (_, guard) = s.device_ptr_mut(stream);
    drop(guard);
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
            full_ranking: a.full_ranking(),
        };
        self.plan_launch(&self.stream, &shape, a.q().dtype(), q, k, PlanSpan::one_shot(&d))
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
        let job = CompressJob { dims: d, cfg, dtype, k_cache, v_cache, obs, scale: a.scale(), paged: None };
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

    fn select(&self, a: &crate::engine::SelectArgs<'_>) -> Result<crate::engine::Selection> {
        self.select_host(a)
    }

    fn kv_scores(&self, a: &crate::engine::SelectArgs<'_>) -> Result<crate::engine::Scores> {
        self.scores_host(a)
    }

    fn plan_chunks(
        &self,
        a: &crate::engine::ChunkArgs<'_>,
        states: &mut [crate::plan::PlanState],
    ) -> Result<Vec<Plan>> {
        self.plan_chunks_host(a, states)
    }

    fn attend(
        &self,
        a: &crate::engine::AttendArgs<'_>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut [f32]>,
        _ws: &mut crate::engine::Workspace,
    ) -> Result<()> {
        let d = a.dims();
        let dtype = a.q().dtype();
        let rows = launches::ATTEND_ROWS;
        let work = crate::engine::tiles::work(a.shape(), rows);
        if work.tiles.is_empty() {
            return Ok(()); // no query tokens
        }
        let (tq, nh) = crate::engine::tiles::tile_shape(d.group(), rows);
        let shape = launches::attend(&self.limits, work.tiles.len(), tq * nh, d.head_dim, work.max_keys, dtype)?;
        shape.split.check(&self.limits)?;
        shape.merge.check(&self.limits)?;
        let cache = a.cache();
        let layout = cache.layout();
        let (_q, q) = self.tensor(&a.q())?;
        let k_pool = self.upload(cache.k().as_bytes())?;
        let v_pool = self.upload(cache.v().as_bytes())?;
        let table = self.upload(cache.table().ids())?;
        let tiles = self.upload(&work.tiles)?;
        let offsets = self.upload(&work.offsets)?;
        let counts = self.upload(&work.counts)?;
        let indices = self.upload(&work.indices)?;
        let (out_dev, o) = self.output(out.shape(), dtype)?;
        let lse_dev = match &lse {
            Some(l) => Some(self.stream.alloc_zeros::<f32>(l.len().max(1)).map_err(driver_err("cuMemAlloc"))?),
            None => None,
        };
        let partial = self
            .stream
            .alloc_zeros::<f32>(work.tiles.len() * shape.splits * tq * nh * (d.head_dim + 2))
            .map_err(driver_err("cuMemAlloc"))?;
        let params = crate::ffi::EkAttendParams {
            q,
            out: o,
            lse: lse_dev.as_ref().map_or(0, |l| self.ptr(l)),
            k_pool: self.ptr(&k_pool),
            v_pool: self.ptr(&v_pool),
            block_table: self.ptr(&table),
            tiles: self.ptr(&tiles),
            offsets: self.ptr(&offsets),
            counts: self.ptr(&counts),
            indices: self.ptr(&indices),
            partial: self.ptr(&partial),
            page_stride: layout.strides[0] as i64,
            slot_stride: layout.strides[1] as i64,
            head_stride: layout.strides[2] as i64,
            table_width: cache.table().width() as i32,
            page_size: layout.page_size as i32,
            group: d.group() as i32,
            tile_rows: (tq * nh) as i32,
            splits: shape.splits as i32,
            keys_per_split: shape.keys_per_split as i32,
            batched_rows: a.batched().unwrap_or(0) as i32,
            scale_log2: a.scale() * std::f32::consts::LOG2_E,
            tiles_count: work.tiles.len() as i32,
            dtype: crate::ffi::dtype_code(dtype),
        };
        // SAFETY: every buffer was sized from the validated call: the pools and the table are the
        // cache's own, each tile's keys lie within its sequence's pages (lengths validated against
        // the table), `partial` holds tiles × splits × rows × (D + 2) floats.
        unsafe {
            self.launch(&self.stream, &shape.split, &params)?;
            self.launch(&self.stream, &shape.merge, &params)?;
        }
        self.stream.synchronize().map_err(driver_err("cuStreamSynchronize"))?;
        if let (Some(dst), Some(src)) = (lse, &lse_dev) {
            let host: Vec<f32> = self.stream.clone_dtoh(src).map_err(driver_err("cuMemcpyDtoH"))?;
            dst.copy_from_slice(&host[..dst.len()]);
        }
        self.download(&out_dev, out)
    }
}

impl CudaBackend {
    /// Launches `l` with one params struct after checking it against the device's limits (a
    /// typed error, before anything is enqueued, where the driver would refuse it).
    ///
    /// # Safety
    /// Every device address inside `params` must be valid for the accesses the kernel makes with
    /// the sizes the struct describes.
    pub(crate) unsafe fn launch<P: DeviceRepr>(&self, stream: &CudaStream, l: &Launch, params: &P) -> Result<()> {
        l.check(&self.limits)?;
        let func = self.funcs.get(l.kernel.as_str()).ok_or_else(|| Error::Driver {
            backend: "cuda",
            call: "cuModuleGetFunction",
            detail: format!("no kernel {}", l.kernel),
        })?;
        let cfg = LaunchConfig { grid_dim: l.grid, block_dim: (l.block, 1, 1), shared_mem_bytes: l.smem as u32 };
        let mut b = stream.launch_builder(func);
        b.arg(params);
        unsafe { b.launch(cfg) }.map_err(driver_err("cuLaunchKernel"))?;
        Ok(())
    }

    /// Enqueues a prefill on `stream` (nothing is waited for: the lists' device copies are freed
    /// in stream order after the kernel).
    pub(crate) fn prefill_launch(&self, stream: &Arc<CudaStream>, job: &PrefillJob<'_>) -> Result<()> {
        let d = job.dims;
        let pl = &job.lists;
        let aligned = [&job.q, &job.k, &job.v].into_iter().all(|t| on_16_byte_grid(t, job.dtype));
        let shape =
            launches::prefill(&self.limits, self.prefill_tile, &d, job.dtype, aligned, pl.segment_size, pl.segments)?;
        shape.launch.check(&self.limits)?;
        let lists = match &pl.lists {
            Some((offsets, counts, indices)) => {
                Some((upload_on(stream, offsets)?, upload_on(stream, counts)?, upload_on(stream, indices)?))
            }
            None => None,
        };
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
            segment_size: pl.segment_size as i32,
            block_size: pl.block_size as i32,
            segments: pl.segments as i32,
            group: d.group() as i32,
            tile_tokens: shape.tile_tokens as i32,
            tiles_per_segment: shape.tiles_per_segment as i32,
            scale_log2: job.scale * std::f32::consts::LOG2_E,
            dtype: 0,
        };
        // SAFETY: every address in `params` points at live device memory sized by the validated dims.
        unsafe { self.launch(stream, &shape.launch, &params) }
    }

    /// Plans `span`'s segments from device queries `q` and keys `k` on `stream` (every step on
    /// the device; the decisions come back to the host, so this waits for the stream). Needs
    /// blocks and at least one planned segment.
    pub(crate) fn plan_launch(
        &self,
        stream: &Arc<CudaStream>,
        p: &crate::validate::PlanShape<'_>,
        dtype: DType,
        q: EkTensor,
        k: EkTensor,
        span: PlanSpan<'_>,
    ) -> Result<Plan> {
        let d = p.dims;
        let cfg = p.cfg;
        let width = d.rank_width(cfg.base_budget);
        let (dd, n, units) = (p.head_dim, d.blocks, d.units());
        let shape = launches::plan(&self.limits, &d, span.segments.clone(), dd, dtype)?;
        for l in shape.all() {
            l.check(&self.limits)?;
        }
        let f32s = |len: usize| stream.alloc_zeros::<f32>(len.max(1)).map_err(driver_err("cuMemAlloc"));
        let u32s = |len: usize| stream.alloc_zeros::<u32>(len.max(1)).map_err(driver_err("cuMemAlloc"));
        // Written in full by reps_q / reps_k, and `key` wherever it is read (blocks before each
        // unit's causal limit): no zeroing (at 128K tokens `krep` and `key` are 256 MiB each).
        // SAFETY: plain f64s; the kernels write every element they later read (the emulated
        // driver poisons fresh allocations with NaN, so a read of an unwritten one would show).
        let f64s = |len: usize| unsafe { stream.alloc::<f64>(len.max(1)) }.map_err(driver_err("cuMemAlloc"));
        let qsum = f64s(d.batch * d.segments * d.q_heads * dd)?;
        let krep = f64s(d.batch * n * d.kv_heads * 2 * dd)?;
        // Ranking keys and rankings per planned unit (a chunk plans a few of the prompt's segments).
        let planned = d.batch * d.kv_heads * span.segments.len();
        let key = f64s(planned * n)?;
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
        let states = match &span.states {
            Some(st) => Some(upload_on(stream, &st.iter().map(EkPlanState::from).collect::<Vec<_>>())?),
            None => None,
        };
        // Per unit: the ranking, then the ranking kernel's scratch.
        let order = u32s(planned * 2 * width)?;
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
            logit_tile: shape.logit.tile as i32,
            logit_segments: shape.logit.segments as i32,
            logit_heads: shape.logit.heads as i32,
            seg_first: span.segments.start as i32,
            seg_end: span.segments.end as i32,
            q_token0: span.q_token0 as i32,
            q_pos0: span.q_pos0 as i32,
            prompt_classes: (cfg.head_class == crate::config::HeadClassMode::Prompt) as i32,
            states: states.as_ref().map_or(0, |s| addr_on(stream, s)),
            ..span.paged.map_or(EkPlanParams::sized(&d, dd, dtype), |pg| pg.params(EkPlanParams::sized(&d, dd, dtype)))
        };
        for l in shape.all() {
            // SAFETY: every buffer in `params` was allocated above with the sizes the kernels index.
            unsafe { self.launch(stream, l, &params)? };
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
        let order_width = if p.full_ranking { width } else { crate::plan::rules::order_width(&segment_topk) };
        let planned_order = get_u32(&order, planned * 2 * width)?;
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
            order: unit_rankings(&planned_order, 2 * width, order_width, units, &span.segments, d.segments),
            order_width,
            blocks: crate::plan::BlockLists::all_dense(d),
            planned: span.segments,
        };
        if let (Some(out), Some(dev)) = (span.states, &states) {
            let left: Vec<EkPlanState> = stream.clone_dtoh(dev).map_err(driver_err("cuMemcpyDtoH"))?;
            for (o, s) in out.iter_mut().zip(left) {
                *o = s.into();
            }
        }
        plan.blocks = plan.block_lists(cfg.budget_mode, cfg.threshold_len);
        Ok(plan)
    }

    /// The scoring kernels for a compression (see [`launches::compress_scoring`]): out of range
    /// when the window rows' tiles do not fit in the device's shared memory.
    pub(crate) fn compress_kernels(
        &self,
        d: &crate::validate::CompressDims,
        dtype: DType,
        k_cache: &EkTensor,
    ) -> Result<launches::CompressScoring> {
        launches::compress_scoring(&self.limits, d, dtype, on_16_byte_grid(k_cache, dtype))
    }

    /// Enqueues the scoring, group reduction and pooling of a compression, and allocates the
    /// selection's buffers.
    pub(crate) fn compress_score(
        &self,
        stream: &Arc<CudaStream>,
        job: &CompressJob<'_>,
        scoring: &launches::CompressScoring,
    ) -> Result<CompressRun> {
        let (d, cfg) = (job.dims, job.cfg);
        let rows = d.group() * d.window;
        let keep = cfg.decode_budget - d.window;
        let (n, w) = (d.entries, d.window);
        let scored = n - w;
        let heads = d.out_heads(cfg);
        let chunks = n.div_ceil(scoring.chunk);
        let selection = launches::compress_selection(&d, heads)?;
        // Every launch of the compression checked before the first is enqueued (the gather's
        // shape depends on the selection and is checked at its launch).
        for l in [&scoring.stats, &scoring.means].into_iter().chain(selection.all()) {
            l.check(&self.limits)?;
        }
        let f32s = |len: usize| stream.alloc_zeros::<f32>(len.max(1)).map_err(driver_err("cuMemAlloc"));
        let stats = f32s(d.batch * d.kv_heads * chunks * rows * 2)?;
        let means = f32s(d.batch * d.q_heads * scored)?;
        let pooled = f32s(d.batch * heads * scored)?;
        let mut params = EkCompressParams {
            k_cache: job.k_cache,
            v_cache: job.v_cache,
            obs: job.obs,
            stats: addr_on(stream, &stats),
            means: addr_on(stream, &means),
            pooled: addr_on(stream, &pooled),
            ..EkCompressParams::sized(&d, cfg, scoring.chunk, job.scale, job.dtype)
        };
        if let Some(paged) = &job.paged {
            params = paged.apply(params);
        }
        // SAFETY: every buffer in `params` was allocated above (or by the caller) with the sizes
        // the kernels index.
        unsafe {
            self.launch(stream, &scoring.stats, &params)?;
            self.launch(stream, &scoring.means, &params)?;
            self.launch(stream, &selection.pool, &params)?;
        }
        let u32s = |len: usize| stream.alloc_zeros::<u32>(len.max(1)).map_err(driver_err("cuMemAlloc"));
        // The selection's buffers: one ascending list per head (AdaKV: as long as a head can get).
        // Over a paged cache heads differ in length: each head's count is written on the device.
        let paged = job.paged.is_some();
        let (selected, lengths, picks, params) = match cfg.head_budget {
            crate::config::HeadBudget::Uniform => {
                let selected = u32s(d.batch * heads * keep)?;
                let lengths = if paged { Some(u32s(d.batch * heads)?) } else { None };
                let params = EkCompressParams {
                    selected: addr_on(stream, &selected),
                    lengths: lengths.as_ref().map_or(0, |l| addr_on(stream, l)),
                    list_stride: keep as i32,
                    ..params
                };
                (selected, lengths, None, params)
            }
            crate::config::HeadBudget::AdaKv { floor_fraction } => {
                let floor = crate::compress::adakv_floor(keep, floor_fraction);
                // Paged: a short head's unused floor goes to the shared picks (counted on the
                // device), so the row's picks are bounded by the whole layer budget only.
                let extra = if paged { heads * keep } else { heads * (keep - floor) };
                let stride = scored.min(if paged { heads * keep } else { floor + extra });
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
        Ok(CompressRun { _stats: stats, _means: means, pooled, selected, lengths, _picks: picks, params, selection })
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
        let (p, sel) = (&run.params, &run.selection);
        if matches!(cfg.head_budget, crate::config::HeadBudget::Uniform) {
            // SAFETY: `run` holds the buffers its params address, sized by `compress_score`.
            unsafe { self.launch(stream, &sel.topk, p)? };
            let Some(lengths) = &run.lengths else {
                return Ok(vec![cfg.decode_budget as u32; d.batch * d.out_heads(cfg)]);
            };
            return stream.clone_dtoh(lengths).map_err(driver_err("cuMemcpyDtoH"));
        }
        let lengths = run.lengths.as_ref().expect("AdaKV allocates lengths");
        // SAFETY: as above; AdaKV's buffers were sized for its floor and cross-head picks.
        unsafe {
            if p.floor_keep > 0 {
                // The top-k kernel keeps budget − W positions into `selected`: aim it at the
                // floor (and leave the lengths to the merge).
                let floor =
                    EkCompressParams { selected: p.floor_sel, budget: p.floor_keep + p.window, lengths: 0, ..*p };
                self.launch(stream, &sel.topk, &floor)?;
                self.launch(stream, &sel.adakv_mask, p)?;
            }
            if p.extra_keep > 0 {
                self.launch(stream, &sel.adakv_extra, p)?;
            }
            self.launch(stream, &sel.adakv_merge, p)?;
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
        let l = launches::compress_gather(&job.dims, job.dims.out_heads(job.cfg), capacity, job.dtype)?;
        let p = EkCompressParams { k_out, v_out, capacity: capacity as i32, ..run.params };
        // SAFETY: the caller allocated the outputs with `capacity` slots per head.
        unsafe { self.launch(stream, &l, &p) }
    }

    /// Enqueues a split-K decode on `stream`.
    pub(crate) fn decode_launch(&self, stream: &Arc<CudaStream>, job: &DecodeJob<'_>) -> Result<()> {
        let d = job.dims;
        let max_len = job.lengths.iter().copied().max().unwrap_or(1) as usize;
        let per_16 = 16 / job.dtype.size();
        let vectors = d.head_dim.is_multiple_of(per_16)
            && on_16_byte_grid(&job.k_cache, job.dtype)
            && on_16_byte_grid(&job.v_cache, job.dtype);
        let shape = launches::decode(&self.limits, &d, max_len, job.dtype, vectors)?;
        shape.split.check(&self.limits)?;
        shape.merge.check(&self.limits)?;
        let rows = d.queries * d.group();
        let lengths = upload_on(stream, job.lengths)?;
        let partial = stream
            .alloc_zeros::<f32>(d.batch * d.cache_heads * shape.splits * rows * (d.head_dim + 2))
            .map_err(driver_err("cuMemAlloc"))?;
        let params = EkDecodeParams {
            q: job.q,
            k_cache: job.k_cache,
            v_cache: job.v_cache,
            out: job.out,
            lengths: addr_on(stream, &lengths),
            partial: addr_on(stream, &partial),
            group: d.group() as i32,
            splits: shape.splits as i32,
            keys_per_split: shape.keys_per_split as i32,
            scale_log2: job.scale * std::f32::consts::LOG2_E,
            dtype: 0,
        };
        // SAFETY: buffers sized from the validated dims; lengths ≤ capacity was validated.
        unsafe {
            self.launch(stream, &shape.split, &params)?;
            self.launch(stream, &shape.merge, &params)
        }
    }
}

/// A function of the device's decision arithmetic (`cuda/numerics.cuh`) for
/// [`CudaBackend::numerics_probe`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub enum NumericsProbe {
    /// `exp(x[i])`.
    Exp,
    /// `ln(x[i])`.
    Ln,
    /// `dot(x[i·dim ..], y[i·dim ..])` for every whole row of `dim`.
    Dot { dim: usize },
    /// The 256-lane sum of all of `x` (one value).
    LaneSum,
}

impl CudaBackend {
    /// Evaluates the device twin of [`crate::numerics`] on `x` (and `y`), so tests can compare its
    /// bits with the host's, on the emulator and on hardware. Waits for the stream.
    #[doc(hidden)]
    pub fn numerics_probe(&self, probe: NumericsProbe, x: &[f64], y: &[f64]) -> Result<Vec<f64>> {
        use crate::ffi::{EK_PROBE_DOT, EK_PROBE_EXP, EK_PROBE_LANE_SUM, EK_PROBE_LN, EkProbeParams};
        let (op, n, dim) = match probe {
            NumericsProbe::Exp => (EK_PROBE_EXP, x.len(), 0),
            NumericsProbe::Ln => (EK_PROBE_LN, x.len(), 0),
            NumericsProbe::Dot { dim } => {
                if dim == 0 || y.len() != x.len() {
                    return Err(Error::range("dot rows", dim, "x and y must hold the same whole rows of dim > 0"));
                }
                (EK_PROBE_DOT, x.len() / dim, dim)
            }
            NumericsProbe::LaneSum => (EK_PROBE_LANE_SUM, x.len(), 0),
        };
        let n32 = i32::try_from(n).map_err(|_| Error::range("probe length", n, "at most i32::MAX values"))?;
        let (xd, yd) = (self.upload(x)?, self.upload(y)?);
        let out = self.stream.alloc_zeros::<f64>(n.max(1)).map_err(driver_err("cuMemAlloc"))?;
        let params = EkProbeParams {
            x: self.ptr(&xd),
            y: self.ptr(&yd),
            out: self.ptr(&out),
            n: n32,
            dim: dim as i32,
            op: op as i32,
            pad: 0,
        };
        let l = launches::numerics_probe(n, op == EK_PROBE_LANE_SUM)?;
        // SAFETY: x, y and out hold the n (rows of dim) values the kernel reads and writes.
        unsafe { self.launch(&self.stream, &l, &params)? };
        let mut v: Vec<f64> = self.stream.clone_dtoh(&out).map_err(driver_err("cuMemcpyDtoH"))?;
        v.truncate(if op == EK_PROBE_LANE_SUM { 1 } else { n });
        Ok(v)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.ctx.synchronize();
    }
}

/// Every unit's first `width` ranks, from the rankings of the planned units (rows of `stride`;
/// planned segments `segments` of `nseg`); units outside the span rank nothing (zeros, as the
/// CPU backend leaves them).
fn unit_rankings(
    planned: &[u32],
    stride: usize,
    width: usize,
    units: usize,
    segments: &std::ops::Range<usize>,
    nseg: usize,
) -> Vec<u32> {
    let mut order = vec![0u32; units * width];
    if width == 0 {
        return order;
    }
    for (row, ranks) in planned.chunks(stride).enumerate() {
        let (bh, s) = (row / segments.len(), segments.start + row % segments.len());
        let u = bh * nseg + s;
        order[u * width..(u + 1) * width].copy_from_slice(&ranks[..width]);
    }
    order
}

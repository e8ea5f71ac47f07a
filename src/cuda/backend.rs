//! The CUDA backend (feature `cuda`): kernels compiled by NVRTC for the device's architecture on
//! first use (cached on disk per source hash and architecture), launched through cudarc.
//!
//! Layers, as in cudarc: `crate::ffi` holds the raw params structs (bindgen), [`launch`] is the
//! checked-but-unsafe launch, [`CudaBackend`] the safe API behind the [`Backend`] trait.
//!
//! Status: prefill (dense and sparse, mma.sync for f16/bf16 with D 64/128, SIMT otherwise) and
//! decode run on the device. Planning and `kv_compress` still run on the host CPU backend inside
//! this backend (see `plan` and `kv_compress` below) until their device kernels land.

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
use crate::ffi::{EK_DENSE_UNIT, EkDecodeParams, EkPrefillParams, EkTensor};
use crate::plan::{Plan, SegmentAttention};
use crate::tensor::{DType, HostData, HostDataMut, TensorView, TensorViewMut};
use crate::validate::{AttentionArgs, CompressArgs, DecodeArgs, PlanArgs};

// SAFETY: plain-old-data `#[repr(C)]` structs of fixed-width fields, passed by value to kernels.
unsafe impl DeviceRepr for EkPrefillParams {}
unsafe impl DeviceRepr for EkDecodeParams {}

/// Tile shapes the kernels are compiled with (cuda/prefill.cu, cuda/decode.cu).
const MMA_ROWS: usize = 64;
const MMA_KEYS: usize = 64;
const MMA_THREADS: u32 = 128;
const SIMT_ROWS: usize = 32;
const SIMT_KEYS: usize = 32;
const SIMT_THREADS: u32 = 128;
const DECODE_THREADS: u32 = 128;
const DECODE_MAX_SMEM: usize = 48 * 1024;

fn driver_err(call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
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
    /// Host fallback for the operations without device kernels yet.
    host: crate::cpu::CpuBackend,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("device", &self.name).field("arch", &self.arch).finish()
    }
}

impl CudaBackend {
    /// Opens device `ordinal`, compiles (or loads the cached) kernels and loads them.
    pub fn new(ordinal: usize) -> Result<Self> {
        let ctx = CudaContext::new(ordinal).map_err(driver_err("cuCtxCreate"))?;
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
        let module =
            ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image(&arch)?)).map_err(driver_err("cuModuleLoadData"))?;
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
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let stream = ctx.default_stream();
        Ok(CudaBackend {
            ctx,
            stream,
            funcs,
            caps: Capabilities { backend: "cuda", dtypes: DType::ALL.to_vec(), head_dims: HeadDims::UpTo(256) },
            name,
            arch,
            host: crate::cpu::CpuBackend::new(),
        })
    }

    fn func(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }

    fn upload<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            return self.stream.alloc_zeros::<T>(1).map_err(driver_err("cuMemAlloc"));
        }
        self.stream.clone_htod(data).map_err(driver_err("cuMemcpyHtoD"))
    }

    fn bytes<'a>(data: HostData<'a>) -> &'a [u8] {
        match data {
            HostData::F32(s) => bytemuck::cast_slice(s),
            HostData::F16(s) => bytemuck::cast_slice(s),
            HostData::BF16(s) => bytemuck::cast_slice(s),
        }
    }

    /// Uploads a view's whole buffer; the tensor descriptor keeps its strides.
    fn tensor(&self, v: &TensorView<'_>) -> Result<(CudaSlice<u8>, EkTensor)> {
        let dev = self.upload(Self::bytes(v.data()))?;
        let (ptr, _sync) = dev.device_ptr(&self.stream);
        let s = v.strides();
        let shape = v.shape();
        let t = EkTensor {
            ptr,
            stride: [s[0] as i64, s[1] as i64, s[2] as i64],
            shape: [shape[0] as i32, shape[1] as i32, shape[2] as i32, shape[3] as i32],
        };
        drop(_sync);
        Ok((dev, t))
    }

    /// A contiguous device output of `shape`.
    fn output(&self, shape: [usize; 4], dtype: DType) -> Result<(CudaSlice<u8>, EkTensor)> {
        let dev = self
            .stream
            .alloc_zeros::<u8>(shape.iter().product::<usize>() * dtype.size())
            .map_err(driver_err("cuMemAlloc"))?;
        let (ptr, sync) = dev.device_ptr(&self.stream);
        drop(sync);
        let t = EkTensor {
            ptr,
            stride: [(shape[1] * shape[2] * shape[3]) as i64, (shape[2] * shape[3]) as i64, shape[3] as i64],
            shape: [shape[0] as i32, shape[1] as i32, shape[2] as i32, shape[3] as i32],
        };
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
        format!("cuda ({}, {}; planning and kv_compress on the host for now)", self.name, self.arch)
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn plan(&self, args: &PlanArgs<'_>) -> Result<Plan> {
        // Interim: no device planning kernels yet.
        self.host.plan(args)
    }

    fn kv_compress(&self, args: &CompressArgs<'_>) -> Result<CompressedCache> {
        // Interim: no device compression kernels yet.
        self.host.kv_compress(args)
    }

    fn attention(&self, a: &AttentionArgs<'_>, out: &mut TensorViewMut<'_>, lse: Option<&mut [f32]>) -> Result<()> {
        let d = a.dims();
        let dtype = a.q().dtype();
        let g = d.group();
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
        // Per-unit lists: offset and count (or the dense marker) into one index array.
        let (segment_size, segments, block_size, lists) = match a.blocks() {
            Some(bl) => {
                let pd = bl.dims;
                let mut offsets = Vec::with_capacity(pd.units());
                let mut counts = Vec::with_capacity(pd.units());
                for b in 0..pd.batch {
                    for h in 0..pd.kv_heads {
                        for s in 0..pd.segments {
                            let u = pd.unit(b, h, s);
                            offsets.push(bl.indptr[u]);
                            counts.push(match bl.segment(b, h, s) {
                                SegmentAttention::Dense => EK_DENSE_UNIT,
                                SegmentAttention::Sparse(list) => list.len() as u32,
                            });
                        }
                    }
                }
                let lists = (self.upload(&offsets)?, self.upload(&counts)?, self.upload(&bl.indices)?);
                (pd.segment_size, pd.segments, pd.block_size, Some(lists))
            }
            None => (d.seq_len, 1, 1, None),
        };
        let aligned = [&a.q(), &a.k(), &a.v()].iter().all(|t| t.strides()[..3].iter().all(|s| s % 8 == 0));
        let mma = dtype != DType::F32 && (d.head_dim == 64 || d.head_dim == 128) && aligned && g <= MMA_ROWS;
        let (name, rows, threads, smem) = if mma {
            let dp = d.head_dim + 8;
            (
                format!("ek_prefill_mma_{}_d{}", dtype_suffix(dtype), d.head_dim),
                MMA_ROWS,
                MMA_THREADS,
                (MMA_ROWS + 2 * MMA_KEYS) * dp * 2 + MMA_KEYS * 4,
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
            q,
            k,
            v,
            out: o,
            lse: lse_dev.as_ref().map_or(0, |s| self.ptr(s)),
            offsets: lists.as_ref().map_or(0, |l| self.ptr(&l.0)),
            counts: lists.as_ref().map_or(0, |l| self.ptr(&l.1)),
            indices: lists.as_ref().map_or(0, |l| self.ptr(&l.2)),
            segment_size: segment_size as i32,
            block_size: block_size as i32,
            segments: segments as i32,
            group: g as i32,
            tile_tokens: tile_tokens as i32,
            tiles_per_segment: tiles_per_segment as i32,
            scale_log2: a.scale() * std::f32::consts::LOG2_E,
            dtype: 0,
        };
        let grid = ((segments * tiles_per_segment) as u32, (d.batch * d.kv_heads) as u32, 1);
        // SAFETY: every address in `params` points at a live allocation sized by the validated dims.
        unsafe { launch(&self.stream, self.func(&name), grid, threads, smem, &params)? };
        self.stream.synchronize().map_err(driver_err("cuStreamSynchronize"))?;
        self.download(&out_dev, out)?;
        if let (Some(dst), Some(src)) = (lse, lse_dev) {
            let host: Vec<f32> = self.stream.clone_dtoh(&src).map_err(driver_err("cuMemcpyDtoH"))?;
            dst.copy_from_slice(&host);
        }
        Ok(())
    }

    fn decode_attention(&self, a: &DecodeArgs<'_>, out: &mut TensorViewMut<'_>) -> Result<()> {
        let d = a.dims();
        let dtype = a.q().dtype();
        let rows = d.queries * d.group();
        // Keys per split: q rows and a score row per query row fit the shared memory budget.
        let kps = ((DECODE_MAX_SMEM / 4).saturating_sub(rows * d.head_dim) / rows.max(1)).clamp(32, 512);
        if rows * d.head_dim + rows * 32 > DECODE_MAX_SMEM / 4 || d.head_dim > 256 {
            return Err(Error::range(
                "decode rows",
                rows,
                "too many query rows per cache head for the CUDA decode kernel",
            ));
        }
        let max_len = a.lengths().iter().copied().max().unwrap_or(1) as usize;
        let splits = max_len.div_ceil(kps);
        let (_q, q) = self.tensor(&a.q())?;
        let (_k, kc) = self.tensor(&a.k_cache())?;
        let (_v, vc) = self.tensor(&a.v_cache())?;
        let (out_dev, o) = self.output(out.shape(), dtype)?;
        let lengths = self.upload(a.lengths())?;
        let partial = self
            .stream
            .alloc_zeros::<f32>(d.batch * d.cache_heads * splits * rows * (d.head_dim + 2))
            .map_err(driver_err("cuMemAlloc"))?;
        let params = EkDecodeParams {
            q,
            k_cache: kc,
            v_cache: vc,
            out: o,
            lengths: self.ptr(&lengths),
            partial: self.ptr(&partial),
            group: d.group() as i32,
            splits: splits as i32,
            keys_per_split: kps as i32,
            scale_log2: a.scale() * std::f32::consts::LOG2_E,
            dtype: 0,
        };
        let sfx = dtype_suffix(dtype);
        let smem = (rows * d.head_dim + rows * kps) * 4;
        // SAFETY: buffers sized from the validated dims; lengths ≤ capacity was validated.
        unsafe {
            launch(
                &self.stream,
                self.func(&format!("ek_decode_split_{sfx}")),
                (splits as u32, d.cache_heads as u32, d.batch as u32),
                DECODE_THREADS,
                smem,
                &params,
            )?;
            launch(
                &self.stream,
                self.func(&format!("ek_decode_merge_{sfx}")),
                (rows as u32, d.cache_heads as u32, d.batch as u32),
                DECODE_THREADS,
                0,
                &params,
            )?;
        }
        self.stream.synchronize().map_err(driver_err("cuStreamSynchronize"))?;
        self.download(&out_dev, out)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.ctx.synchronize();
    }
}

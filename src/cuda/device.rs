//! Device-resident calls (feature `cuda`): tensors an engine already holds in device memory —
//! cudarc `CudaSlice`/`CudaView`s of f32, f16 or bf16 — and the engine's stream. Arguments are
//! validated by the same shared code as the host calls, then the kernels are enqueued on that
//! stream with no copies of the tensors and no synchronisation: results are ready when the
//! stream reaches them. (Small host arrays — block lists, cache lengths — are uploaded in stream
//! order.)
//!
//! ```no_run
//! # fn main() -> entropy_kernels::Result<()> {
//! use entropy_kernels::cuda::{CudaBackend, CudaTensor, CudaTensorMut};
//! use entropy_kernels::{EntropyConfig, PlanRequest};
//! use half::bf16;
//!
//! let (b, l, hq, hkv, d) = (1, 4096, 32, 8, 128);
//! let backend = CudaBackend::new(0)?;
//! let stream = backend.stream().clone();
//! // An engine's activations, BSND (here fresh zeros).
//! let alloc = |n: usize| stream.alloc_zeros::<bf16>(n).expect("device memory");
//! let (q_slice, k_slice, v_slice) = (alloc(b * l * hq * d), alloc(b * l * hkv * d), alloc(b * l * hkv * d));
//! let mut out_slice = alloc(b * l * hq * d);
//! let q = CudaTensor::bsnd(&q_slice, &stream, [b, l, hq, d]);
//! let k = CudaTensor::bsnd(&k_slice, &stream, [b, l, hkv, d]);
//! let v = CudaTensor::bsnd(&v_slice, &stream, [b, l, hkv, d]);
//! let mut out = CudaTensorMut::bsnd(&mut out_slice, &stream, [b, l, hq, d]);
//! let plan = backend.plan_on(&stream, &q, &k, &EntropyConfig::entropy_infer(), &PlanRequest::layer(0))?;
//! backend.prefill_on(&stream, &q, &k, &v, Some(&plan.blocks), None, &mut out, None)?;
//! # Ok(()) }
//! ```

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop, ValidAsZeroBits};

use super::CudaBackend;
use super::backend::{CompressJob, DecodeJob, PrefillJob};
use crate::backend::Backend;
use crate::config::DecodeConfig;
use crate::config::EntropyConfig;
use crate::error::{Error, Result};
use crate::ffi::EkTensor;
use crate::kernels::PlanRequest;
use crate::plan::{BlockLists, Plan};
use crate::tensor::{DType, contiguous_strides};
use crate::validate;

/// Element types the kernels take from device memory.
pub trait DeviceElement: DeviceRepr + ValidAsZeroBits {
    /// The element type.
    const DTYPE: DType;
}
impl DeviceElement for f32 {
    const DTYPE: DType = DType::F32;
}
impl DeviceElement for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl DeviceElement for half::bf16 {
    const DTYPE: DType = DType::BF16;
}

/// A read-only rank-4 view of device memory (element strides, last dim contiguous). Holds the
/// slice's stream-ordering guard until dropped, after the kernels that read it are enqueued.
pub struct CudaTensor<'a> {
    ptr: u64,
    elements: usize,
    dtype: DType,
    shape: [usize; 4],
    strides: [usize; 4],
    _order: SyncOnDrop<'a>,
}

impl<'a> CudaTensor<'a> {
    /// A view of `T` elements on the device.
    pub fn new<T: DeviceElement>(
        slice: &'a impl DevicePtr<T>,
        stream: &'a CudaStream,
        shape: [usize; 4],
        strides: [usize; 4],
    ) -> Self {
        let (ptr, order) = slice.device_ptr(stream);
        CudaTensor { ptr, elements: slice.len(), dtype: T::DTYPE, shape, strides, _order: order }
    }
    /// A contiguous tensor (e.g. BSND `[B, L, H, D]`, or a `[B, H, N, D]` cache).
    pub fn bsnd<T: DeviceElement>(slice: &'a impl DevicePtr<T>, stream: &'a CudaStream, shape: [usize; 4]) -> Self {
        Self::new(slice, stream, shape, contiguous_strides(shape))
    }
    pub(crate) fn ek(&self) -> EkTensor {
        EkTensor::new(self.ptr, self.shape, self.strides)
    }
}

/// A writable rank-4 view of device memory.
pub struct CudaTensorMut<'a> {
    ptr: u64,
    elements: usize,
    dtype: DType,
    shape: [usize; 4],
    strides: [usize; 4],
    _order: SyncOnDrop<'a>,
}

impl<'a> CudaTensorMut<'a> {
    /// A mutable view of `T` elements on the device.
    pub fn new<T: DeviceElement>(
        slice: &'a mut impl DevicePtrMut<T>,
        stream: &'a CudaStream,
        shape: [usize; 4],
        strides: [usize; 4],
    ) -> Self {
        let elements = slice.len();
        let (ptr, order) = slice.device_ptr_mut(stream);
        CudaTensorMut { ptr, elements, dtype: T::DTYPE, shape, strides, _order: order }
    }
    /// A view of a `[B, S, N, D]` tensor.
    pub fn bsnd<T: DeviceElement>(
        slice: &'a mut impl DevicePtrMut<T>,
        stream: &'a CudaStream,
        shape: [usize; 4],
    ) -> Self {
        Self::new(slice, stream, shape, contiguous_strides(shape))
    }
    pub(crate) fn ek(&self) -> EkTensor {
        EkTensor::new(self.ptr, self.shape, self.strides)
    }
}

crate::tensor::impl_layout!(CudaTensor, |t| t.dtype, t.elements);
crate::tensor::impl_layout!(CudaTensorMut, |t| t.dtype, t.elements);

impl CudaBackend {
    /// The backend's own stream (any stream of the same context may be passed to the `_on` calls).
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.default_stream()
    }

    pub(crate) fn check_stream(&self, stream: &CudaStream) -> Result<()> {
        if stream.context().cu_ctx() != self.context().cu_ctx() {
            return Err(Error::Layout {
                what: "stream",
                detail: "belongs to another CUDA context than this backend's device".into(),
            });
        }
        Ok(())
    }

    /// Plans a layer from device tensors `q` `[B, L, Hq, D]` and `k` `[B, L, Hkv, D]` on `stream`:
    /// every step runs on the device; the plan (decisions and block lists) is host data, so this
    /// returns once the stream reached it. A one-segment layer needs no kernels.
    pub fn plan_on(
        &self,
        stream: &Arc<CudaStream>,
        q: &CudaTensor<'_>,
        k: &CudaTensor<'_>,
        cfg: &EntropyConfig,
        req: &PlanRequest<'_>,
    ) -> Result<Plan> {
        self.check_stream(stream)?;
        let shape =
            validate::plan_layout(self.capabilities(), q, k, cfg, req.layer_idx, req.prev_scores, req.keep_maps)?;
        let d = shape.dims;
        if d.blocks == 0 {
            return Ok(Plan::without_blocks(d, cfg));
        }
        self.plan_launch(stream, &shape, q.dtype, q.ek(), k.ek(), super::backend::PlanSpan::one_shot(&d))
    }

    /// Prefill attention on device tensors (`blocks = None`: dense causal), enqueued on `stream`.
    /// `lse`, if given, receives f32 `[B, Hq, L]` (natural log).
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_on(
        &self,
        stream: &Arc<CudaStream>,
        q: &CudaTensor<'_>,
        k: &CudaTensor<'_>,
        v: &CudaTensor<'_>,
        blocks: Option<&BlockLists>,
        scale: Option<f32>,
        out: &mut CudaTensorMut<'_>,
        lse: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        self.check_stream(stream)?;
        let caps = self.capabilities();
        let (dims, scale) =
            validate::attention_layout(caps, q, k, v, blocks, scale, out, lse.as_ref().map(|l| l.len()))?;
        // The guard records the LSE's write event when dropped: after the launch below, so another
        // stream waiting on it waits for the kernel.
        let (lse_ptr, _lse_written) = match lse {
            Some(l) => {
                let (p, order) = l.device_ptr_mut(stream);
                (p, Some(order))
            }
            None => (0, None),
        };
        let job = PrefillJob {
            dims,
            dtype: q.dtype,
            q: q.ek(),
            k: k.ek(),
            v: v.ek(),
            out: out.ek(),
            lse: lse_ptr,
            lists: crate::ffi::prefill_lists_of(blocks, dims.seq_len),
            scale,
        };
        self.prefill_launch(stream, &job)
    }

    /// Decode attention over device caches `[B, Hc, capacity, D]` holding `lengths[b·Hc + h]`
    /// entries, enqueued on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention_on(
        &self,
        stream: &Arc<CudaStream>,
        q: &CudaTensor<'_>,
        k_cache: &CudaTensor<'_>,
        v_cache: &CudaTensor<'_>,
        lengths: &[u32],
        scale: Option<f32>,
        out: &mut CudaTensorMut<'_>,
    ) -> Result<()> {
        self.check_stream(stream)?;
        let (dims, scale) = validate::decode_layout(self.capabilities(), q, k_cache, v_cache, lengths, scale, out)?;
        let job = DecodeJob {
            dims,
            dtype: q.dtype,
            q: q.ek(),
            k_cache: k_cache.ek(),
            v_cache: v_cache.ek(),
            out: out.ek(),
            lengths,
            scale,
        };
        self.decode_launch(stream, &job)
    }
}

/// A compressed cache in device memory: `k`/`v` are `[B, Hc, budget, D]` (the kept entries in
/// ascending position order, then the window's W), every head holding `budget` entries.
pub struct CudaCompressedCache<T> {
    /// The keys.
    pub k: CudaSlice<T>,
    /// The values.
    pub v: CudaSlice<T>,
    /// `[B, Hc, capacity, D]`: `capacity` is the budget, or with AdaKV the longest head's length.
    pub shape: [usize; 4],
    /// u32 `[B, Hc, index_stride]`: each head's kept positions, ascending, in the first
    /// `lengths[b·Hc + h] − window` entries of its row.
    pub indices: CudaSlice<u32>,
    /// Index stride, in entries.
    pub index_stride: usize,
    /// Entries each head keeps, window included (all `decode_budget` unless AdaKV shares the
    /// budget); slots past a head's length are zero. Pass them to `decode_attention_on`.
    pub lengths: Vec<u32>,
    /// Observation window, in entries.
    pub window: usize,
}

/// Per-head kept positions (`selected`, rows of `stride`) as `CompressedCache::indices`:
/// `[B, Hc, capacity − W]`, each head's row padded with −1 past its length.
pub(crate) fn padded_indices(selected: &[u32], stride: usize, lengths: &[u32], window: usize) -> Vec<i64> {
    let keep_stride = lengths.iter().map(|&l| l as usize - window).max().unwrap_or(0);
    let mut out = vec![-1i64; lengths.len() * keep_stride];
    for (u, &len) in lengths.iter().enumerate() {
        let kept = len as usize - window;
        for (o, &p) in out[u * keep_stride..][..kept].iter_mut().zip(&selected[u * stride..][..kept]) {
            *o = i64::from(p);
        }
    }
    out
}

impl<T> CudaCompressedCache<T> {
    /// The kept positions on the host in the layout of `CompressedCache::indices` (`[B, Hc,
    /// capacity − W]`, −1 past a head's length); waits for `stream`.
    pub fn host_indices(&self, stream: &Arc<CudaStream>) -> Result<Vec<i64>> {
        let selected: Vec<u32> =
            stream.clone_dtoh(&self.indices).map_err(super::backend::driver_err("cuMemcpyDtoH"))?;
        Ok(padded_indices(&selected, self.index_stride, &self.lengths, self.window))
    }
}

impl CudaBackend {
    /// `kv_compress` of device caches `[B, Hkv, N, D]` with the window queries `obs`
    /// `[B, Hq, W, D]`, enqueued on `stream`. `Ok(None)`: the cache is within the budget
    /// (SPEC §4: nothing to compress; keep using it). Every step runs on the device; AdaKV's
    /// per-head lengths are read back once (a stream synchronisation) to size the outputs.
    pub fn kv_compress_on<T: DeviceElement>(
        &self,
        stream: &Arc<CudaStream>,
        k_cache: &CudaTensor<'_>,
        v_cache: &CudaTensor<'_>,
        obs: &CudaTensor<'_>,
        cfg: &DecodeConfig,
    ) -> Result<Option<CudaCompressedCache<T>>> {
        self.check_stream(stream)?;
        let (dims, scale) = validate::compress_layout(self.capabilities(), k_cache, v_cache, obs, cfg)?;
        if k_cache.dtype != T::DTYPE {
            return Err(Error::DTypeMismatch { what: "compressed cache", expected: k_cache.dtype, got: T::DTYPE });
        }
        if !dims.compresses(cfg) {
            return Ok(None);
        }
        let kernels = self.compress_kernels(&dims, T::DTYPE, &k_cache.ek())?;
        let heads = dims.out_heads(cfg);
        let job = CompressJob {
            dims,
            cfg,
            dtype: T::DTYPE,
            k_cache: k_cache.ek(),
            v_cache: v_cache.ek(),
            obs: obs.ek(),
            scale,
            paged: None,
        };
        let run = self.compress_score(stream, &job, &kernels)?;
        let lengths = self.compress_select(stream, &job, &run)?;
        let capacity = lengths.iter().copied().max().unwrap_or(0) as usize;
        let shape = [dims.batch, heads, capacity, dims.head_dim];
        let alloc =
            || stream.alloc_zeros::<T>(shape.iter().product()).map_err(super::backend::driver_err("cuMemAlloc"));
        let (mut k, mut v) = (alloc()?, alloc()?);
        let (k_out, v_out) = (super::backend::addr_on(stream, &k), super::backend::addr_on(stream, &v));
        self.compress_gather(stream, &job, &run, capacity, k_out, v_out)?;
        // The outputs' write events after the kernels that wrote them, for the engine's other streams.
        let index_stride = run.list_stride();
        let mut indices = run.into_selected();
        for s in [&mut k, &mut v] {
            super::backend::written_on(stream, s);
        }
        super::backend::written_on(stream, &mut indices);
        Ok(Some(CudaCompressedCache { k, v, shape, indices, index_stride, lengths, window: dims.window }))
    }
}

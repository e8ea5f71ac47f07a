//! Device-resident calls (feature `cuda`): tensors an engine already holds in device memory —
//! cudarc `CudaSlice`/`CudaView`s of f32, f16 or bf16 — and the engine's stream. Arguments are
//! validated by the same shared code as the host calls, then the kernels are enqueued on that
//! stream with no copies of the tensors and no synchronisation: results are ready when the
//! stream reaches them. (Small host arrays — block lists, cache lengths — are uploaded in stream
//! order.)
//!
//! ```ignore
//! let backend = CudaBackend::new(0)?;
//! let stream = backend.stream().clone();
//! let q = CudaTensor::bsnd(&q_slice, &stream, [b, l, hq, d]);
//! let k = CudaTensor::bsnd(&k_slice, &stream, [b, l, hkv, d]);
//! let v = CudaTensor::bsnd(&v_slice, &stream, [b, l, hkv, d]);
//! let mut out = CudaTensorMut::bsnd(&mut out_slice, &stream, [b, l, hq, d]);
//! backend.prefill_on(&stream, &q, &k, &v, Some(&plan.blocks), None, &mut out, None)?;
//! ```

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop};

use super::CudaBackend;
use super::backend::{DecodeJob, PrefillJob};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ffi::EkTensor;
use crate::plan::BlockLists;
use crate::tensor::{DType, Layout};
use crate::validate;

/// Element types the kernels take from device memory.
pub trait DeviceElement: DeviceRepr {
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

fn contiguous_strides(shape: [usize; 4]) -> [usize; 4] {
    [shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1]
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
    fn ek(&self) -> EkTensor {
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
    pub fn bsnd<T: DeviceElement>(
        slice: &'a mut impl DevicePtrMut<T>,
        stream: &'a CudaStream,
        shape: [usize; 4],
    ) -> Self {
        Self::new(slice, stream, shape, contiguous_strides(shape))
    }
    fn ek(&self) -> EkTensor {
        EkTensor::new(self.ptr, self.shape, self.strides)
    }
}

macro_rules! layout {
    ($t:ident) => {
        impl Layout for $t<'_> {
            fn shape(&self) -> [usize; 4] {
                self.shape
            }
            fn strides(&self) -> [usize; 4] {
                self.strides
            }
            fn dtype(&self) -> DType {
                self.dtype
            }
            fn elements(&self) -> usize {
                self.elements
            }
        }
    };
}
layout!(CudaTensor);
layout!(CudaTensorMut);

impl CudaBackend {
    /// The backend's own stream (any stream of the same context may be passed to the `_on` calls).
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.default_stream()
    }

    fn check_stream(&self, stream: &CudaStream) -> Result<()> {
        if stream.context().cu_ctx() != self.context().cu_ctx() {
            return Err(Error::Layout {
                what: "stream",
                detail: "belongs to another CUDA context than this backend's device".into(),
            });
        }
        Ok(())
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
        let lse_ptr = match lse {
            Some(l) => {
                let (p, order) = l.device_ptr_mut(stream);
                drop(order);
                p
            }
            None => 0,
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
            strides: [q.strides, k.strides, v.strides],
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

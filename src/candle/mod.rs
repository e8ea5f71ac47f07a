//! candle integration (feature `candle`): every operation on candle [`Tensor`]s.
//!
//! Prefill and decode attention are candle custom ops ([`CustomOp3`]), so they run on the
//! tensors' own storage with their own strides (a `transpose` costs nothing) and return a new
//! tensor; planning and compression read the storage directly. CPU storage runs on the chosen
//! [`Kernels`] backend. CUDA storage (feature `candle-cuda`) runs on the tensors' device memory
//! and the candle device's stream through the CUDA backend, whatever `Kernels` says: no copies
//! (candle-core's `cuda` feature links the CUDA libraries, so `candle-cuda` replaces `cuda`,
//! which loads them at run time; without it CUDA tensors get an error saying so).
//!
//! ```no_run
//! use candle_core::{Device, Tensor};
//! use entropy_kernels::{EntropyConfig, Kernels, PlanRequest, candle as ek};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! // Inside a model's attention: q [B, L, Hq, D], k and v [B, L, Hkv, D] after RoPE.
//! let q = Tensor::randn(0f32, 1., (1, 4096, 8, 64), &dev)?;
//! let k = Tensor::randn(0f32, 1., (1, 4096, 2, 64), &dev)?;
//! let v = Tensor::randn(0f32, 1., (1, 4096, 2, 64), &dev)?;
//! let kernels = Kernels::auto()?;
//! let cfg = EntropyConfig { threshold_len: 1024, base_budget: 512, ..Default::default() };
//! let (out, plan) = ek::prefill(&kernels, &q, &k, &v, &cfg, &PlanRequest::layer(3))?;
//! assert_eq!(out.dims(), q.dims());
//! println!("kept {:.2} of the causal pairs", plan.blocks.kept_fraction());
//! # Ok(()) }
//! ```

#[cfg(feature = "candle-cuda")]
mod cuda;
pub mod dump;
pub mod llama;
pub mod methods;
pub mod serving;
pub mod tokenizer;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};

use crate::compress::CompressedCache;
use crate::config::{DecodeConfig, EntropyConfig};
use crate::kernels::{Kernels, PlanRequest};
use crate::plan::{BlockLists, Plan};
use crate::tensor::{HostBuffer, HostTensor, TensorView, TensorViewMut};

impl From<crate::Error> for candle_core::Error {
    fn from(e: crate::Error) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// A rank-4 view of CPU storage under a candle layout (any strides, innermost contiguous).
fn view<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<TensorView<'a>> {
    let dims: [usize; 4] = l
        .dims()
        .try_into()
        .map_err(|_| candle_core::Error::Msg(format!("{what}: expected a rank-4 tensor, got shape {:?}", l.dims())))?;
    let strides: [usize; 4] = l.stride().try_into().expect("rank 4");
    let o = l.start_offset();
    Ok(match s {
        CpuStorage::F32(v) => TensorView::strided(&v[o..], dims, strides),
        CpuStorage::F16(v) => TensorView::strided(&v[o..], dims, strides),
        CpuStorage::BF16(v) => TensorView::strided(&v[o..], dims, strides),
        _ => {
            return Err(candle_core::Error::Msg(format!("{what}: only f32, f16 and bf16 tensors are supported")));
        }
    })
}

/// Runs `f` on rank-4 views of CPU tensors; other devices get a clear error.
fn with_views<R>(
    tensors: &[(&Tensor, &str)],
    f: impl FnOnce(&[TensorView<'_>]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards: Vec<_> = tensors.iter().map(|(t, _)| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((_, what), (storage, layout)) in tensors.iter().zip(&guards) {
        match &**storage {
            Storage::Cpu(s) => views.push(view(s, layout, what)?),
            _ => return Err(no_device_kernels(what)),
        }
    }
    f(&views)
}

fn no_device_kernels(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{what}: the candle ops take CPU storage, and CUDA storage when built with the `candle-cuda` feature"
    ))
}

/// An output buffer of `shape` in `dtype`, returned as candle CPU storage.
fn run_into(
    like: &TensorView<'_>,
    shape: [usize; 4],
    f: impl FnOnce(&mut TensorViewMut<'_>) -> crate::Result<()>,
) -> candle_core::Result<CpuStorage> {
    let mut out = HostTensor::zeros(like.dtype(), shape);
    f(&mut out.view_mut())?;
    Ok(match out.data {
        HostBuffer::F32(v) => CpuStorage::F32(v),
        HostBuffer::F16(v) => CpuStorage::F16(v),
        HostBuffer::BF16(v) => CpuStorage::BF16(v),
    })
}

/// What an [`AttentionOp`] computes.
enum OpKind {
    /// Causal prefill; sparse over the lists when given.
    Prefill(Option<BlockLists>),
    /// Decode over caches holding `lengths[b·Hc + h]` entries per head.
    Decode(Vec<u32>),
}

/// Prefill or decode attention as a custom op on (q, k, v) → a tensor shaped like q.
struct AttentionOp {
    kernels: Kernels,
    kind: OpKind,
    scale: Option<f32>,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        match self.kind {
            OpKind::Prefill(Some(_)) => "entropy-kernels-sparse-prefill",
            OpKind::Prefill(None) => "entropy-kernels-dense-prefill",
            OpKind::Decode(_) => "entropy-kernels-decode-attention",
        }
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (view(s1, l1, "q")?, view(s2, l2, "k")?, view(s3, l3, "v")?);
        let out = run_into(&q, q.shape(), |out| match &self.kind {
            OpKind::Prefill(Some(bl)) => self.kernels.sparse_prefill(q, k, v, bl, self.scale, out, None),
            OpKind::Prefill(None) => self.kernels.dense_prefill(q, k, v, self.scale, out, None),
            OpKind::Decode(lengths) => self.kernels.decode_attention(q, k, v, lengths, self.scale, out),
        })?;
        Ok((out, Shape::from(l1.dims())))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::attention(self, (s1, l1), (s2, l2), (s3, l3))
    }
}

fn apply(
    kernels: &Kernels,
    kind: OpKind,
    scale: Option<f32>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<Tensor> {
    q.apply_op3_no_bwd(k, v, &AttentionOp { kernels: kernels.clone(), kind, scale })
}

/// Plans a layer from BSND `q` `[B, L, Hq, D]` and `k` `[B, L, Hkv, D]`.
pub fn plan(
    kernels: &Kernels,
    q: &Tensor,
    k: &Tensor,
    cfg: &EntropyConfig,
    req: &PlanRequest<'_>,
) -> candle_core::Result<Plan> {
    #[cfg(feature = "candle-cuda")]
    if q.device().is_cuda() {
        return cuda::plan(kernels, q, k, cfg, req);
    }
    with_views(&[(q, "q"), (k, "k")], |v| Ok(kernels.plan(v[0], v[1], cfg, req)?))
}

/// Sparse prefill over `blocks`; returns `[B, L, Hq, D]` in the input dtype.
pub fn sparse_prefill(
    kernels: &Kernels,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    blocks: &BlockLists,
    scale: Option<f32>,
) -> candle_core::Result<Tensor> {
    apply(kernels, OpKind::Prefill(Some(blocks.clone())), scale, q, k, v)
}

/// Dense causal prefill; returns `[B, L, Hq, D]`.
pub fn dense_prefill(
    kernels: &Kernels,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: Option<f32>,
) -> candle_core::Result<Tensor> {
    apply(kernels, OpKind::Prefill(None), scale, q, k, v)
}

/// Plan plus sparse prefill: what a model's attention calls per layer.
pub fn prefill(
    kernels: &Kernels,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &EntropyConfig,
    req: &PlanRequest<'_>,
) -> candle_core::Result<(Tensor, Plan)> {
    let plan = plan(kernels, q, k, cfg, req)?;
    let out = sparse_prefill(kernels, q, k, v, &plan.blocks, cfg.scale)?;
    Ok((out, plan))
}

/// A compressed cache as candle tensors.
#[derive(Clone, Debug)]
pub struct CompressedTensors {
    /// `[B, Hc, capacity, D]`.
    pub k: Tensor,
    /// The values.
    pub v: Tensor,
    /// `[B, Hc]` entries per head.
    pub lengths: Vec<u32>,
    /// `[B, Hc, capacity - window]` kept positions, `-1` padded.
    pub indices: Vec<i64>,
    /// Whether the cache was compressed.
    pub compressed: bool,
}

fn to_tensor(t: HostTensor, device: &candle_core::Device) -> candle_core::Result<Tensor> {
    let shape = t.shape;
    match t.data {
        HostBuffer::F32(v) => Tensor::from_vec(v, &shape, device),
        HostBuffer::F16(v) => Tensor::from_vec(v, &shape, device),
        HostBuffer::BF16(v) => Tensor::from_vec(v, &shape, device),
    }
}

/// Compresses `[B, Hkv, N, D]` caches with an observation window `obs` `[B, Hq, W, D]`.
pub fn kv_compress(
    kernels: &Kernels,
    k_cache: &Tensor,
    v_cache: &Tensor,
    obs: &Tensor,
    cfg: &DecodeConfig,
) -> candle_core::Result<CompressedTensors> {
    #[cfg(feature = "candle-cuda")]
    if k_cache.device().is_cuda() {
        return cuda::kv_compress(kernels, k_cache, v_cache, obs, cfg);
    }
    let c: CompressedCache = with_views(&[(k_cache, "k_cache"), (v_cache, "v_cache"), (obs, "obs")], |v| {
        Ok(kernels.kv_compress(v[0], v[1], v[2], cfg)?)
    })?;
    let dev = k_cache.device();
    Ok(CompressedTensors {
        k: to_tensor(c.k, dev)?,
        v: to_tensor(c.v, dev)?,
        lengths: c.lengths,
        indices: c.indices,
        compressed: c.compressed,
    })
}

/// Decode attention of `q` `[B, nq, Hq, D]` over caches `[B, Hc, capacity, D]` holding
/// `lengths[b·Hc + h]` entries per head.
pub fn decode_attention(
    kernels: &Kernels,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    lengths: &[u32],
    scale: Option<f32>,
) -> candle_core::Result<Tensor> {
    apply(kernels, OpKind::Decode(lengths.to_vec()), scale, q, k_cache, v_cache)
}

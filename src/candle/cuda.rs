//! candle's CUDA storage (feature `candle-cuda`): the ops run on the tensors' own device memory
//! and on the candle device's stream, through the CUDA backend's device-tensor calls
//! ([`CudaBackend::prefill_on`] and friends) — no copies, no synchronisation except where a
//! result is host data (a plan's decisions, a compressed cache's indices).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{Layout, Shape, Storage, Tensor};
use cudarc::driver::{CudaStream, CudaView};

use super::{AttentionOp, CompressedTensors, OpKind};
use crate::config::{DecodeConfig, EntropyConfig};
use crate::cuda::{CudaBackend, CudaTensor, CudaTensorMut, DeviceElement};
use crate::kernels::{Kernels, PlanRequest};
use crate::plan::Plan;

/// An element type both candle's CUDA storage and the kernels take.
trait Element: CudaDType + DeviceElement {}
impl<T: CudaDType + DeviceElement> Element for T {}

/// Calls `$f::<T>($args)` for the candle dtype `$dt` (f32, f16 or bf16).
macro_rules! by_dtype {
    ($dt:expr, $f:ident($($arg:expr),*)) => {
        match $dt {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            other => Err(candle_core::Error::Msg(format!("only f32, f16 and bf16 tensors are supported, got {other:?}"))),
        }
    };
}

/// The CUDA backend for `stream`'s context, created once per context: candle's devices use
/// their ordinal's primary context, so the backend's kernels and candle's buffers share it.
fn backend(stream: &CudaStream) -> crate::Result<Arc<CudaBackend>> {
    static BACKENDS: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();
    let ctx = stream.context();
    let key = ctx.cu_ctx() as usize;
    let mut map = BACKENDS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = map.get(&key) {
        return Ok(b.clone());
    }
    let b = Arc::new(CudaBackend::with_context(ctx.clone())?);
    map.insert(key, b.clone());
    Ok(b)
}

fn rank4(l: &Layout, what: &str) -> candle_core::Result<([usize; 4], [usize; 4])> {
    let dims: [usize; 4] = l
        .dims()
        .try_into()
        .map_err(|_| candle_core::Error::Msg(format!("{what}: expected a rank-4 tensor, got shape {:?}", l.dims())))?;
    Ok((dims, l.stride().try_into().expect("rank 4")))
}

/// The storage from the layout's start offset on.
fn view<'a, T: Element>(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

fn tensor<'a, T: Element>(
    v: &'a CudaView<'a, T>,
    l: &Layout,
    stream: &'a CudaStream,
    what: &str,
) -> candle_core::Result<CudaTensor<'a>> {
    let (dims, strides) = rank4(l, what)?;
    Ok(CudaTensor::new(v, stream, dims, strides))
}

fn driver(call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> candle_core::Error {
    move |e| crate::Error::Driver { backend: "cuda", call, detail: e.to_string() }.into()
}

/// [`AttentionOp`] on CUDA storage: a new contiguous output shaped like q.
pub(super) fn attention(
    op: &AttentionOp,
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    by_dtype!(q.0.dtype(), attention_typed(op, q, k, v))
}

fn attention_typed<T: Element>(
    op: &AttentionOp,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = qs.device().clone();
    let stream = dev.cuda_stream();
    let backend = backend(&stream)?;
    let (qv, kv, vv) = (view::<T>(qs, ql)?, view::<T>(ks, kl)?, view::<T>(vs, vl)?);
    let q = tensor(&qv, ql, &stream, "q")?;
    let (k, v) = (tensor(&kv, kl, &stream, "k")?, tensor(&vv, vl, &stream, "v")?);
    let (dims, _) = rank4(ql, "q")?;
    let mut out = stream.alloc_zeros::<T>(dims.iter().product()).map_err(driver("cuMemAlloc"))?;
    {
        let mut o = CudaTensorMut::bsnd(&mut out, &stream, dims);
        match &op.kind {
            OpKind::Prefill(blocks) => {
                backend.prefill_on(&stream, &q, &k, &v, blocks.as_ref(), op.scale, &mut o, None)?
            }
            OpKind::Decode(lengths) => backend.decode_attention_on(&stream, &q, &k, &v, lengths, op.scale, &mut o)?,
        }
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(&dims)))
}

/// Runs `f` on the CUDA storages of `tensors` (all on one device), or says it is not CUDA.
fn with_storages<R>(
    tensors: &[(&Tensor, &str)],
    f: impl FnOnce(&[(&CudaStorage, &Layout)]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards: Vec<_> = tensors.iter().map(|(t, _)| t.storage_and_layout()).collect();
    let mut all = Vec::with_capacity(tensors.len());
    for ((_, what), (storage, layout)) in tensors.iter().zip(&guards) {
        match &**storage {
            Storage::Cuda(s) => all.push((s, *layout)),
            _ => return Err(candle_core::Error::Msg(format!("{what}: expected CUDA storage like the other tensors"))),
        }
    }
    f(&all)
}

/// Whether a device call failed on one of the CUDA kernels' limits (ranking width, window rows)
/// or on a step without a device kernel: the host path can do it.
fn beyond_device_kernels(e: &crate::Error) -> bool {
    matches!(e, crate::Error::OutOfRange { .. } | crate::Error::Unimplemented { .. })
}

/// Planning from CUDA tensors: every step on the device, the plan returned to the host. Should a
/// device call refuse on a kernel limit, it runs on `kernels` through host copies.
pub(super) fn plan(
    kernels: &Kernels,
    q: &Tensor,
    k: &Tensor,
    cfg: &EntropyConfig,
    req: &PlanRequest<'_>,
) -> candle_core::Result<Plan> {
    match with_storages(&[(q, "q"), (k, "k")], |s| by_dtype!(q.dtype(), plan_typed(s[0], s[1], cfg, req)))? {
        Ok(plan) => Ok(plan),
        Err(e) if beyond_device_kernels(&e) => {
            let cpu = candle_core::Device::Cpu;
            super::plan(kernels, &q.to_device(&cpu)?, &k.to_device(&cpu)?, cfg, req)
        }
        Err(e) => Err(e.into()),
    }
}

/// The device attempt: storage errors outside, the kernels' own errors inside.
fn plan_typed<T: Element>(
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    cfg: &EntropyConfig,
    req: &PlanRequest<'_>,
) -> candle_core::Result<crate::Result<Plan>> {
    let stream = qs.device().cuda_stream();
    let backend = backend(&stream)?;
    let (qv, kv) = (view::<T>(qs, ql)?, view::<T>(ks, kl)?);
    let (q, k) = (tensor(&qv, ql, &stream, "q")?, tensor(&kv, kl, &stream, "k")?);
    Ok(backend.plan_on(&stream, &q, &k, cfg, req))
}

fn wrap<T: Element>(slice: cudarc::driver::CudaSlice<T>, dev: &candle_core::CudaDevice, shape: [usize; 4]) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())),
        &shape,
        BackpropOp::none(),
        false,
    )
}

/// `kv_compress` of CUDA caches on the device (AdaKV included). Beyond the device kernels (window
/// rows whose scoring tiles exceed shared memory) it runs on `kernels` through host copies, the
/// result going back to the device.
pub(super) fn kv_compress(
    kernels: &Kernels,
    k_cache: &Tensor,
    v_cache: &Tensor,
    obs: &Tensor,
    cfg: &DecodeConfig,
) -> candle_core::Result<CompressedTensors> {
    let out = with_storages(&[(k_cache, "k_cache"), (v_cache, "v_cache"), (obs, "obs")], |s| {
        by_dtype!(k_cache.dtype(), compress_typed(s[0], s[1], s[2], cfg))
    })?;
    match out {
        Err(e) if beyond_device_kernels(&e) => {
            let cpu = candle_core::Device::Cpu;
            let (kh, vh, oh) = (k_cache.to_device(&cpu)?, v_cache.to_device(&cpu)?, obs.to_device(&cpu)?);
            let c = super::kv_compress(kernels, &kh, &vh, &oh, cfg)?;
            let dev = k_cache.device();
            Ok(CompressedTensors { k: c.k.to_device(dev)?, v: c.v.to_device(dev)?, ..c })
        }
        Err(e) => Err(e.into()),
        Ok(Some(c)) => Ok(c),
        // Within the budget: the cache unchanged (contiguous), every position kept.
        Ok(None) => {
            let [b, h, n, _] = k_cache.dims4().map(|d| [d.0, d.1, d.2, d.3])?;
            let w = cfg.window.min(n);
            let indices = (0..b * h).flat_map(|_| 0..(n - w) as i64).collect();
            Ok(CompressedTensors {
                k: k_cache.contiguous()?,
                v: v_cache.contiguous()?,
                lengths: vec![n as u32; b * h],
                indices,
                compressed: false,
            })
        }
    }
}

fn compress_typed<T: Element>(
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    (os, ol): (&CudaStorage, &Layout),
    cfg: &DecodeConfig,
) -> candle_core::Result<crate::Result<Option<CompressedTensors>>> {
    let dev = ks.device();
    let stream = dev.cuda_stream();
    let backend = backend(&stream)?;
    let (kv, vv, ov) = (view::<T>(ks, kl)?, view::<T>(vs, vl)?, view::<T>(os, ol)?);
    let (k, v) = (tensor(&kv, kl, &stream, "k_cache")?, tensor(&vv, vl, &stream, "v_cache")?);
    let obs = tensor(&ov, ol, &stream, "obs")?;
    let c = match backend.kv_compress_on::<T>(&stream, &k, &v, &obs, cfg) {
        Ok(Some(c)) => c,
        other => return Ok(other.map(|_| None)),
    };
    let indices = match c.host_indices(&stream) {
        Ok(i) => i,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(Some(CompressedTensors {
        k: wrap(c.k, dev, c.shape),
        v: wrap(c.v, dev, c.shape),
        lengths: c.lengths,
        indices,
        compressed: true,
    })))
}

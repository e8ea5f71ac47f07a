//! One small case per CUDA kernel, each checked against the CPU backend: what the first run on
//! a GPU does before anything else (`entropy-kernels cuda-smoke`), and what compute-sanitizer's
//! memcheck, racecheck and synccheck run over (`scripts/gpu-check.sh`). The cases are sized to
//! take seconds even under the sanitizer; together they launch every kernel of
//! [`source::KERNELS`](super::source::KERNELS) (tests/cli.rs holds them to it on the emulated
//! driver), the 16-key SIMT tiles and smaller planning tiles through a pass with shared memory
//! capped at 99 KiB (the limit of sm_86/sm_89).

use std::sync::Arc;

use super::{CudaBackend, NumericsProbe, PrefillTile};
use crate::engine::{PageLayout, PagedCache, Workspace};
use crate::error::Result;
use crate::tensor::{DType, HostTensor};
use crate::{DecodeConfig, EntropyConfig, GqaMode, Kernels, PlanRequest, synth};

/// Shared memory per block of sm_86/sm_89, for the capped pass.
pub const SMALL_DEVICE_SHARED: usize = 99 * 1024;

/// The outcome of one case.
#[derive(Clone, Debug)]
pub struct SmokeCase {
    /// The check's name.
    pub name: String,
    /// The largest difference from the CPU backend, in the case's own measure (0 for decisions
    /// that must be identical).
    pub error: f64,
    /// What the case allows.
    pub tolerance: f64,
    /// The failure, if the call itself failed.
    pub failure: Option<String>,
}

impl SmokeCase {
    /// Whether the check passed.
    pub fn passed(&self) -> bool {
        self.failure.is_none() && self.error <= self.tolerance
    }
}

fn random(shape: [usize; 4], seed: u64, dtype: DType) -> HostTensor {
    HostTensor::from_f32(&synth::normal(shape.iter().product(), 1.0, seed), shape, dtype)
}

/// Largest |a − b| relative to the largest |b|.
fn rel_max(a: &HostTensor, b: &HostTensor) -> f64 {
    let (a, b) = (a.to_f32_vec(), b.to_f32_vec());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30) as f64;
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max) / scale
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        DType::BF16 => 5e-2,
    }
}

/// A backend opened the first time a case asks for it (a run filtered to a few cases, such as
/// the sanitizer probe, opens only what those cases use).
struct Lazy<'a> {
    open: Box<dyn Fn() -> Result<Kernels> + 'a>,
    kernels: Option<Kernels>,
}

impl<'a> Lazy<'a> {
    fn new(open: impl Fn() -> Result<Kernels> + 'a) -> Self {
        Lazy { open: Box::new(open), kernels: None }
    }
    fn get(&mut self) -> Result<&Kernels> {
        if self.kernels.is_none() {
            self.kernels = Some((self.open)()?);
        }
        Ok(self.kernels.as_ref().expect("opened above"))
    }
}

/// Runs the cases whose names `wanted` accepts on backends from `open` (one per tile setting,
/// and one with shared memory capped at [`SMALL_DEVICE_SHARED`]); the others are not run.
pub fn run(open: &dyn Fn() -> Result<CudaBackend>, wanted: &dyn Fn(&str) -> bool) -> Result<Vec<SmokeCase>> {
    let cpu = Kernels::cpu();
    let mut cases = Vec::new();
    let mut record = |name: String, case: &mut dyn FnMut() -> Result<(f64, f64)>| {
        if !wanted(&name) {
            return;
        }
        cases.push(match case() {
            Ok((error, tolerance)) => SmokeCase { name, error, tolerance, failure: None },
            Err(e) => SmokeCase { name, error: f64::NAN, tolerance: 0.0, failure: Some(e.to_string()) },
        })
    };
    let with = |tile: PrefillTile, cap: Option<usize>| {
        Lazy::new(move || {
            let mut be = open()?;
            be.set_prefill_tile(tile);
            if let Some(bytes) = cap {
                be.cap_shared_memory(bytes);
            }
            Ok(Kernels::from_backend(Arc::new(be)))
        })
    };
    let prefill_cfg = EntropyConfig {
        segment_size: 64,
        block_size: 8,
        threshold_len: 64,
        base_budget: 64,
        ..EntropyConfig::default()
    };
    // Prefill (plan + sparse attention): tensor cores with both tile heights, SIMT, and the
    // capped pass's 16-key SIMT tiles.
    for (tile, cap, dtypes, dims) in [
        (PrefillTile::M64, None, &[DType::F16, DType::BF16][..], &[64, 128][..]),
        (PrefillTile::M128, None, &[DType::F16, DType::BF16][..], &[64, 128][..]),
        (PrefillTile::Auto, None, &DType::ALL[..], &[80][..]),
        (PrefillTile::Auto, Some(SMALL_DEVICE_SHARED), &DType::ALL[..], &[256][..]),
    ] {
        let mut k = with(tile, cap);
        for &dtype in dtypes {
            for &d in dims {
                let name =
                    format!("prefill {dtype} D {d} tile {tile:?}{}", if cap.is_some() { " (99 KiB)" } else { "" });
                record(name, &mut || prefill_case(k.get()?, &cpu, &prefill_cfg, dtype, d));
            }
        }
    }
    let mut k = with(PrefillTile::Auto, None);
    // Planning whose ranking is wider than 1024 blocks (the bitonic sort's second half; rankings
    // beyond its 2048, ranked by counting, are in tests/cuda_emu.rs).
    let wide = EntropyConfig {
        segment_size: 64,
        block_size: 1,
        threshold_len: 64,
        base_budget: 400,
        ..EntropyConfig::default()
    };
    record("plan, ranking wider than 1024 blocks".into(), &mut || plan_case(k.get()?, &cpu, &wide, 1200));
    // Compression: FMAs (f32; 16-bit at D 80), tensor cores (16-bit at D 64/128), AdaKV's selection.
    for (dtype, d, cfg) in [
        (DType::F32, 64, DecodeConfig { decode_budget: 200, ..DecodeConfig::default() }),
        (DType::F16, 80, DecodeConfig { decode_budget: 200, gqa_mode: GqaMode::Max, ..DecodeConfig::default() }),
        (DType::BF16, 80, DecodeConfig { decode_budget: 200, ..DecodeConfig::default() }),
        (DType::F16, 64, DecodeConfig { decode_budget: 200, ..DecodeConfig::default() }),
        (
            DType::F16,
            128,
            DecodeConfig { decode_budget: 200, gqa_mode: GqaMode::PerQueryHead, ..DecodeConfig::default() },
        ),
        (DType::BF16, 64, DecodeConfig { decode_budget: 200, ..DecodeConfig::adakv(0.2) }),
        (DType::BF16, 128, DecodeConfig { decode_budget: 200, ..DecodeConfig::default() }),
    ] {
        let name = format!("kv_compress {dtype} D {d} {:?}", cfg.head_budget);
        record(name, &mut || compress_case(k.get()?, &cpu, &cfg, dtype, d));
    }
    // Decode: 16-byte vector loads (D a multiple of the vector) and element loads (D 66).
    for dtype in DType::ALL {
        for d in [64, 66] {
            record(format!("decode {dtype} D {d}"), &mut || decode_case(k.get()?, &cpu, dtype, d));
        }
    }
    // The engine path: attention over shuffled pages (ragged, a sequence with no queries), and
    // append into device pools against the host append, bit for bit.
    for dtype in DType::ALL {
        record(format!("attend over pages {dtype} D 64"), &mut || attend_case(k.get()?, &cpu, dtype));
        record(format!("append_on {dtype} D 64"), &mut || append_case(&open()?, dtype));
        // D 64 moves 16-byte words, D 61 elements.
        for d in [64, 61] {
            record(format!("select_on + compact_on {dtype} D {d}"), &mut || compact_case(&open()?, dtype, d));
        }
    }
    // The decision arithmetic, bit for bit.
    record("numerics (exp, ln, dot, lane sum)".into(), &mut || numerics_case(&open()?));
    Ok(cases)
}

fn prefill_case(k: &Kernels, cpu: &Kernels, cfg: &EntropyConfig, dtype: DType, d: usize) -> Result<(f64, f64)> {
    let (l, hq, hkv) = (300, 4, 2);
    let seed = 0x5eed ^ d as u64;
    let (q, kk, v) = (
        random([1, l, hq, d], seed, dtype),
        random([1, l, hkv, d], seed ^ 1, dtype),
        random([1, l, hkv, d], seed ^ 2, dtype),
    );
    let mut got = HostTensor::full(dtype, q.shape, f32::NAN);
    let mut want = HostTensor::full(dtype, q.shape, f32::NAN);
    let req = PlanRequest::layer(0);
    let plan = k.prefill(q.view(), kk.view(), v.view(), cfg, &req, &mut got.view_mut(), None)?;
    let want_plan = cpu.prefill(q.view(), kk.view(), v.view(), cfg, &req, &mut want.view_mut(), None)?;
    if plan.blocks != want_plan.blocks {
        return Ok((f64::INFINITY, 0.0));
    }
    Ok((rel_max(&got, &want), tolerance(dtype)))
}

fn plan_case(k: &Kernels, cpu: &Kernels, cfg: &EntropyConfig, l: usize) -> Result<(f64, f64)> {
    let (q, kk) = (random([1, l, 2, 64], 7, DType::F32), random([1, l, 1, 64], 8, DType::F32));
    let req = PlanRequest::layer(0);
    let (got, want) = (k.plan(q.view(), kk.view(), cfg, &req)?, cpu.plan(q.view(), kk.view(), cfg, &req)?);
    let same = got.blocks == want.blocks && got.order == want.order && got.entropy == want.entropy;
    Ok((if same { 0.0 } else { 1.0 }, 0.0))
}

fn compress_case(k: &Kernels, cpu: &Kernels, cfg: &DecodeConfig, dtype: DType, d: usize) -> Result<(f64, f64)> {
    let (hq, hkv, n) = (8, 2, 600);
    let seed = 0xc0 ^ d as u64;
    let (kc, vc) = (random([1, hkv, n, d], seed, dtype), random([1, hkv, n, d], seed ^ 1, dtype));
    let obs = random([1, hq, cfg.window, d], seed ^ 2, dtype);
    let (got, want) = (
        k.kv_compress(kc.view(), vc.view(), obs.view(), cfg)?,
        cpu.kv_compress(kc.view(), vc.view(), obs.view(), cfg)?,
    );
    // Tensor-core and FMA scores round differently: allow a few positions at near-ties.
    let differ = got.indices.iter().zip(&want.indices).filter(|(a, b)| a != b).count();
    Ok((differ as f64 / want.indices.len().max(1) as f64, 0.02))
}

fn decode_case(k: &Kernels, cpu: &Kernels, dtype: DType, d: usize) -> Result<(f64, f64)> {
    let (hq, hkv, cap) = (8, 2, 700);
    let seed = 0xdec ^ d as u64;
    let q = random([2, 1, hq, d], seed, dtype);
    let (kc, vc) = (random([2, hkv, cap, d], seed ^ 1, dtype), random([2, hkv, cap, d], seed ^ 2, dtype));
    let lengths = [700, 333, 64, 1];
    let mut got = HostTensor::full(dtype, q.shape, f32::NAN);
    let mut want = HostTensor::full(dtype, q.shape, f32::NAN);
    k.decode_attention(q.view(), kc.view(), vc.view(), &lengths, None, &mut got.view_mut())?;
    cpu.decode_attention(q.view(), kc.view(), vc.view(), &lengths, None, &mut want.view_mut())?;
    Ok((rel_max(&got, &want), tolerance(dtype)))
}

/// A pool of 3 sequences × 8 pages of 16 entries (slot-major), pages in reverse order.
fn smoke_pool(dtype: DType, hkv: usize, d: usize) -> Result<PagedCache> {
    let (seqs, width) = (3, 8);
    let ids: Vec<u32> = (0..(seqs * width) as u32).rev().collect();
    PagedCache::new(dtype, PageLayout::slot_major(seqs * width, 16, hkv, d), ids, width, 0.0)
}

fn attend_case(k: &Kernels, cpu: &Kernels, dtype: DType) -> Result<(f64, f64)> {
    let (hq, hkv, d) = (8, 2, 64);
    let mut pool = smoke_pool(dtype, hkv, d)?;
    let cu = [0u32, 70, 70, 101];
    let (kn, vn) = (random([1, 101, hkv, d], 11, dtype), random([1, 101, hkv, d], 12, dtype));
    let mut ws = Workspace::new();
    cpu.append(kn.view(), vn.view(), &cu, &mut pool.cache_mut(), &mut ws)?;
    let q = random([1, 101, hq, d], 13, dtype);
    let mut got = HostTensor::full(dtype, q.shape, f32::NAN);
    let mut want = HostTensor::full(dtype, q.shape, f32::NAN);
    k.attend(q.view(), &cu, &pool.cache(), &[], None, &mut got.view_mut(), None, &mut ws)?;
    cpu.attend(q.view(), &cu, &pool.cache(), &[], None, &mut want.view_mut(), None, &mut ws)?;
    Ok((rel_max(&got, &want), tolerance(dtype)))
}

/// `append_on` into device pools: 1 if any byte of the pools or lengths differs from the host
/// `append`'s, else 0.
fn append_case(be: &CudaBackend, dtype: DType) -> Result<(f64, f64)> {
    match dtype {
        DType::F32 => append_typed::<f32>(be, dtype),
        DType::F16 => append_typed::<half::f16>(be, dtype),
        DType::BF16 => append_typed::<half::bf16>(be, dtype),
    }
}

fn append_typed<T: super::DeviceElement + bytemuck::Pod>(be: &CudaBackend, dtype: DType) -> Result<(f64, f64)> {
    use super::backend::driver_err;
    let (hkv, d) = (2, 64);
    let stream = be.stream().clone();
    let mut pool = smoke_pool(dtype, hkv, d)?;
    let bytes = |t: &HostTensor| -> Vec<T> { bytemuck::pod_collect_to_vec(t.data().as_bytes()) };
    let up = |v: &[T]| stream.clone_htod(v).map_err(driver_err("cuMemcpyHtoD"));
    let mut dc = super::CudaPagedCache::<T>::upload(&stream, &pool)?;
    let cu = [0u32, 33, 33, 50];
    let cud = stream.clone_htod(&cu).map_err(driver_err("cuMemcpyHtoD"))?;
    let (kn, vn) = (random([1, 50, hkv, d], 21, dtype), random([1, 50, hkv, d], 22, dtype));
    let (knd, vnd) = (up(&bytes(&kn))?, up(&bytes(&vn))?);
    let mut ws = Workspace::new();
    let (kt, vt) = (super::CudaTensor::bsnd(&knd, &stream, kn.shape), super::CudaTensor::bsnd(&vnd, &stream, vn.shape));
    be.append_on(&stream, &kt, &vt, &cu, &cud, &mut dc.view_mut(&stream)?, &mut ws)?;
    Kernels::cpu().append(kn.view(), vn.view(), &cu, &mut pool.cache_mut(), &mut ws)?;
    Ok((if dc.matches_host(&stream, &pool)? { 0.0 } else { 1.0 }, 0.0))
}

/// Selection and in-place compaction on the device over pages (AdaKV, heads of unequal length):
/// the kept positions against the CPU backend's (a few may differ at near-ties: their fraction),
/// and the pools and lengths against the host compaction by the device's selection (any
/// difference: infinite error).
fn compact_case(be: &CudaBackend, dtype: DType, d: usize) -> Result<(f64, f64)> {
    match dtype {
        DType::F32 => compact_typed::<f32>(be, dtype, d),
        DType::F16 => compact_typed::<half::f16>(be, dtype, d),
        DType::BF16 => compact_typed::<half::bf16>(be, dtype, d),
    }
}

fn compact_typed<T: super::DeviceElement + bytemuck::Pod>(
    be: &CudaBackend,
    dtype: DType,
    d: usize,
) -> Result<(f64, f64)> {
    use super::backend::driver_err;
    let (hq, hkv) = (8, 2);
    let cfg = DecodeConfig { decode_budget: 40, window: 4, pooling_kernel: 3, ..DecodeConfig::adakv(0.3) };
    let stream = be.stream().clone();
    let cpu = Kernels::cpu();
    let mut pool = smoke_pool(dtype, hkv, d)?;
    let cu = [0u32, 100, 120, 128];
    let (kn, vn) = (random([1, 128, hkv, d], 31, dtype), random([1, 128, hkv, d], 32, dtype));
    let mut ws = Workspace::new();
    cpu.append(kn.view(), vn.view(), &cu, &mut pool.cache_mut(), &mut ws)?;
    pool.lens[1] = 77; // heads of unequal lengths
    let obs = random([3, hq, cfg.window, d], 33, dtype);
    let od = stream
        .clone_htod(&bytemuck::pod_collect_to_vec::<u8, T>(obs.data().as_bytes()))
        .map_err(driver_err("cuMemcpyHtoD"))?;
    let mut dc = super::CudaPagedCache::<T>::upload(&stream, &pool)?;
    let sel =
        be.select_on(&stream, &dc.view(&stream)?, &super::CudaTensor::bsnd(&od, &stream, obs.shape), &cfg, &[])?;
    let got = sel.to_host(&stream)?;
    let want = cpu.kv_select(&pool.cache(), obs.view(), &cfg, &[])?;
    if got.compressed != want.compressed || got.indptr != want.indptr {
        return Ok((f64::INFINITY, 0.0));
    }
    let differ = got.positions.iter().zip(&want.positions).filter(|(a, b)| a != b).count();
    be.compact_on(&stream, &mut dc.view_mut(&stream)?, &sel, &mut ws)?;
    cpu.kv_compact(&mut pool.cache_mut(), &got, &mut ws)?;
    if !dc.matches_host(&stream, &pool)? {
        return Ok((f64::INFINITY, 0.0));
    }
    Ok((differ as f64 / want.positions.len().max(1) as f64, 0.02))
}

fn numerics_case(be: &CudaBackend) -> Result<(f64, f64)> {
    use crate::numerics;
    let x: Vec<f64> = (0..4096).map(|i| -40.0 + i as f64 * 0.0123).collect();
    let y: Vec<f64> = x.iter().map(|v| v.abs() + 1e-9).collect();
    let mut wrong = 0usize;
    let exp = be.numerics_probe(NumericsProbe::Exp, &x, &[])?;
    wrong += exp.iter().zip(&x).filter(|(g, v)| g.to_bits() != numerics::exp(**v).to_bits()).count();
    let ln = be.numerics_probe(NumericsProbe::Ln, &y, &[])?;
    wrong += ln.iter().zip(&y).filter(|(g, v)| g.to_bits() != numerics::ln(**v).to_bits()).count();
    let dot = be.numerics_probe(NumericsProbe::Dot { dim: 128 }, &x, &y)?;
    wrong += (0..32)
        .filter(|&r| dot[r].to_bits() != numerics::dot(&x[r * 128..][..128], &y[r * 128..][..128]).to_bits())
        .count();
    let sum = be.numerics_probe(NumericsProbe::LaneSum, &y, &[])?;
    wrong += usize::from(sum[0].to_bits() != numerics::lane_sum(y.len(), |j| y[j]).to_bits());
    Ok((wrong as f64, 0.0))
}

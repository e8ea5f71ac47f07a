//! The device-resident CUDA API (`plan_on`, `prefill_on`, `decode_attention_on`, `kv_compress_on`): tensors in
//! cudarc slices on the backend's stream, strided views included, against the oracle. Needs a
//! GPU, or the `cuda-emu` feature (the emulated driver); prints why it is skipped otherwise.
#![cfg(feature = "cuda")]

mod common;

use common::*;
use entropy_kernels::cuda::{CudaTensor, CudaTensorMut};
use entropy_kernels::*;

#[test]
fn device_prefill_and_decode_match_the_oracle() {
    let Some(be) = cuda_backend("cuda_device") else { return };
    let stream = be.stream().clone();
    let oracle = Kernels::reference();
    let seed = seed("cuda_device");
    let (b, l, hq, hkv, d) = (1, 300, 8, 2, 128);
    let cfg =
        EntropyConfig { segment_size: 64, block_size: 16, threshold_len: 64, base_budget: 64, ..Default::default() };
    for dtype in [DType::F16, DType::BF16] {
        let (q, k, v) = random_qkv([b, l, hq, hkv, d], seed, dtype);
        let plan = oracle.plan(q.view(), k.view(), &cfg, &PlanRequest::layer(0)).unwrap();
        let mut want = poisoned(q.shape, dtype);
        oracle.sparse_prefill(q.view(), k.view(), v.view(), &plan.blocks, None, &mut want.view_mut(), None).unwrap();

        macro_rules! run {
            ($t:ty) => {{
                let up = |t: &HostTensor| stream.clone_htod(&typed::<$t>(t)).unwrap();
                let (qd, kd, vd) = (up(&q), up(&k), up(&v));
                let mut od = stream.alloc_zeros::<$t>(q.len()).unwrap();
                {
                    let qt = CudaTensor::bsnd(&qd, &stream, q.shape);
                    let kt = CudaTensor::bsnd(&kd, &stream, k.shape);
                    let vt = CudaTensor::bsnd(&vd, &stream, v.shape);
                    // Planning on the device: the same decisions as the oracle's.
                    let dplan = be.plan_on(&stream, &qt, &kt, &cfg, &PlanRequest::layer(0)).unwrap();
                    assert_eq!(dplan.budgets, plan.budgets, "{dtype} device plan budgets");
                    assert_eq!(dplan.keep_blocks, plan.keep_blocks, "{dtype} device plan keep");
                    assert_eq!(dplan.order, plan.order, "{dtype} device plan ranking");
                    assert_eq!(dplan.blocks, plan.blocks, "{dtype} device plan block lists");
                    let mut ot = CudaTensorMut::bsnd(&mut od, &stream, q.shape);
                    be.prefill_on(&stream, &qt, &kt, &vt, Some(&dplan.blocks), None, &mut ot, None).unwrap();
                }
                let host: Vec<$t> = stream.clone_dtoh(&od).unwrap();
                host.iter().map(|x| x.to_f64()).collect::<Vec<f64>>()
            }};
        }
        let got = match dtype {
            DType::F16 => run!(half::f16),
            _ => run!(half::bf16),
        };
        let err = rel_fro(&got, &tensor_f64(&want));
        assert!(err <= attn_tol(dtype), "{dtype} device prefill: rel err {err:e}");
    }
}

#[test]
fn device_decode_matches_the_oracle() {
    let Some(be) = cuda_backend("cuda_device") else { return };
    let stream = be.stream().clone();
    let seed = seed("cuda_device_decode");
    let (b, nq, hq, hc, cap, d) = (2, 1, 8, 2, 700, 128);
    let q = random([b, nq, hq, d], 1.0, seed, DType::F32);
    let kc = random([b, hc, cap, d], 1.0, seed ^ 1, DType::F32);
    let vc = random([b, hc, cap, d], 1.0, seed ^ 2, DType::F32);
    let lengths = vec![700, 650, 17, 300];
    let mut want = poisoned(q.shape, DType::F32);
    Kernels::reference()
        .decode_attention(q.view(), kc.view(), vc.view(), &lengths, None, &mut want.view_mut())
        .unwrap();
    let (qd, kd, vd) = (
        stream.clone_htod(&typed::<f32>(&q)).unwrap(),
        stream.clone_htod(&typed::<f32>(&kc)).unwrap(),
        stream.clone_htod(&typed::<f32>(&vc)).unwrap(),
    );
    let mut od = stream.alloc_zeros::<f32>(q.len()).unwrap();
    {
        let (qt, kt, vt) = (
            CudaTensor::bsnd(&qd, &stream, q.shape),
            CudaTensor::bsnd(&kd, &stream, kc.shape),
            CudaTensor::bsnd(&vd, &stream, vc.shape),
        );
        let mut ot = CudaTensorMut::bsnd(&mut od, &stream, q.shape);
        be.decode_attention_on(&stream, &qt, &kt, &vt, &lengths, None, &mut ot).unwrap();
    }
    let got: Vec<f32> = stream.clone_dtoh(&od).unwrap();
    let err = rel_fro(&got.iter().map(|&x| x as f64).collect::<Vec<_>>(), &tensor_f64(&want));
    assert!(err <= attn_tol(DType::F32), "device decode: rel err {err:e}");
}

/// Bad device arguments are the same typed errors as on the host, before any launch.
#[test]
fn device_calls_validate_like_host_calls() {
    let Some(be) = cuda_backend("cuda_device") else { return };
    let stream = be.stream().clone();
    let qd = stream.alloc_zeros::<f32>(4 * 64).unwrap();
    let kd = stream.alloc_zeros::<f32>(4 * 64).unwrap();
    let mut od = stream.alloc_zeros::<f32>(4 * 64).unwrap();
    let qt = CudaTensor::bsnd(&qd, &stream, [1, 4, 1, 64]);
    let kt = CudaTensor::bsnd(&kd, &stream, [1, 4, 1, 32]);
    let mut ot = CudaTensorMut::bsnd(&mut od, &stream, [1, 4, 1, 64]);
    match be.prefill_on(&stream, &qt, &kt, &kt, None, None, &mut ot, None) {
        Err(Error::Shape { what: "k", .. }) => {}
        other => panic!("expected a shape error for k, got {other:?}"),
    }
}

#[test]
fn device_kv_compress_matches_the_oracle() {
    let Some(be) = cuda_backend("cuda_device") else { return };
    let stream = be.stream().clone();
    let oracle = Kernels::reference();
    let seed = seed("cuda_device_compress");
    let (b, hq, hkv, n, d, w) = (1, 8, 2, 3000, 128, 32);
    let kc = random([b, hkv, n, d], 1.0, seed, DType::F32);
    let vc = random([b, hkv, n, d], 1.0, seed ^ 1, DType::F32);
    let obs = random([b, hq, w, d], 1.0, seed ^ 2, DType::F32);
    // 992 kept positions, and 2468: radix selection has no cap; AdaKV's shared budget (per-head
    // lengths) on the device too.
    let adakv = HeadBudget::AdaKv { floor_fraction: 0.3 };
    for (budget, head_budget) in [(1024, HeadBudget::Uniform), (2500, HeadBudget::Uniform), (700, adakv)] {
        let dc = DecodeConfig { decode_budget: budget, window: w, head_budget, ..Default::default() };
        let want = oracle.kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
        let (kd, vd, od) = (
            stream.clone_htod(&typed::<f32>(&kc)).unwrap(),
            stream.clone_htod(&typed::<f32>(&vc)).unwrap(),
            stream.clone_htod(&typed::<f32>(&obs)).unwrap(),
        );
        let got = {
            let (kt, vt, ot) = (
                CudaTensor::bsnd(&kd, &stream, kc.shape),
                CudaTensor::bsnd(&vd, &stream, vc.shape),
                CudaTensor::bsnd(&od, &stream, obs.shape),
            );
            be.kv_compress_on::<f32>(&stream, &kt, &vt, &ot, &dc).unwrap().expect("3000 entries exceed the budget")
        };
        let host = |s: &cudarc::driver::CudaSlice<f32>| {
            HostTensor::from_f32(&stream.clone_dtoh(s).unwrap(), got.shape, DType::F32)
        };
        let got = CompressedCache {
            k: host(&got.k),
            v: host(&got.v),
            indices: got.host_indices(&stream).unwrap(),
            lengths: got.lengths,
            window: w,
            compressed: true,
        };
        let args = validate::kv_compress(oracle.capabilities(), kc.view(), vc.view(), obs.view(), &dc).unwrap();
        check_compressed(
            &format!("device kv_compress, budget {budget}, {head_budget:?}"),
            &got,
            &want,
            &reference::compress_scores(&args),
            (&kc, &vc),
            head_budget != HeadBudget::Uniform,
        );
    }
}

/// The device's decision arithmetic (`cuda/numerics.cuh`) computes the host's bits
/// (`entropy_kernels::numerics`): exp and ln over their whole ranges and the special values, dot
/// products of every length from 1 to 300, and lane sums of lengths around the block's 256 lanes.
/// On hardware this is what makes planning decide exactly as the CPU (SPEC §6).
#[test]
fn device_numerics_are_the_hosts_bit_for_bit() {
    use entropy_kernels::cuda::NumericsProbe;
    use entropy_kernels::numerics;
    let Some(be) = cuda_backend("cuda_device_numerics") else { return };
    let seed = seed("cuda_device_numerics");
    let noise = synth::normal(1 << 16, 1.0, seed);
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let same = |what: &str, x: &[f64], got: &[f64], want: &dyn Fn(f64) -> f64| {
        for (i, (&xi, &g)) in x.iter().zip(got).enumerate() {
            let w = want(xi);
            assert!(g.to_bits() == w.to_bits(), "{what}({xi:e}) (#{i}, seed {seed}): device {g:e}, host {w:e}");
        }
    };
    // exp: the softmax range densely, the whole finite range, the edges and the specials.
    let mut x: Vec<f64> = noise.iter().map(|&r| -50.0 * (r as f64).abs()).collect();
    x.extend((0..20_000).map(|i| -746.0 + 1457.0 * i as f64 / 20_000.0));
    x.extend([
        0.0,
        -0.0,
        709.782712893384,
        709.79,
        -745.13,
        -745.14,
        -720.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
    ]);
    same("exp", &x, &be.numerics_probe(NumericsProbe::Exp, &x, &[]).unwrap(), &numerics::exp);
    // ln: the entropy's range (p + 1e-9), logarithmically spread values, subnormals, specials.
    let mut x: Vec<f64> = noise.iter().map(|&r| (r as f64).abs().min(1.0) + 1e-9).collect();
    x.extend((0..20_000).map(|i| 10f64.powf(-300.0 + 600.0 * i as f64 / 20_000.0)));
    x.extend([1.0, 2.0, 0.5, 5e-324, 1e-310, 0.0, -1.0, f64::INFINITY, f64::NAN, std::f64::consts::SQRT_2]);
    same("ln", &x, &be.numerics_probe(NumericsProbe::Ln, &x, &[]).unwrap(), &numerics::ln);
    // Dot products of every length from 1 to 300 (tails of every size).
    for dim in 1..=300 {
        let rows = 3;
        let x: Vec<f64> = noise[..rows * dim].iter().map(|&v| v as f64).collect();
        let y: Vec<f64> = noise[rows * dim..2 * rows * dim].iter().map(|&v| v as f64 * 3.0).collect();
        let got = be.numerics_probe(NumericsProbe::Dot { dim }, &x, &y).unwrap();
        let want: Vec<f64> = (0..rows).map(|r| numerics::dot(&x[r * dim..][..dim], &y[r * dim..][..dim])).collect();
        assert_eq!(bits(&got), bits(&want), "dot of length {dim} (seed {seed})");
    }
    // Lane sums: fewer than, exactly, and several times the 256 lanes.
    for n in [0, 1, 255, 256, 257, 1000, 5000, 65_536] {
        let x: Vec<f64> = noise[..n].iter().map(|&v| (v as f64).exp()).collect();
        let got = be.numerics_probe(NumericsProbe::LaneSum, &x, &[]).unwrap();
        assert_eq!(got[0].to_bits(), numerics::lane_sum(n, |j| x[j]).to_bits(), "lane sum of {n} (seed {seed})");
    }
}

/// The engine calls over a paged cache in device memory: `append_on` writes the pools and
/// lengths the host `append` writes (bit for bit), a planned `run_attend_on` matches the CPU
/// backend's `attend` over the same pages (ragged prefill with a sequence bringing no tokens,
/// then a decode step), and a second run of the plan reads the queries written between runs (what
/// a CUDA graph replay does; `tests/cuda_counters.rs` counts that a run allocates and copies
/// nothing).
#[test]
fn device_paged_append_and_attend_match_the_host() {
    let Some(be) = cuda_backend("cuda_device_paged") else { return };
    let seed = seed("cuda_device_paged");
    for dtype in DType::ALL {
        match dtype {
            DType::F32 => paged_round_trip::<f32>(&be, seed, dtype),
            DType::F16 => paged_round_trip::<half::f16>(&be, seed, dtype),
            DType::BF16 => paged_round_trip::<half::bf16>(&be, seed, dtype),
        }
    }
}

fn paged_round_trip<T: entropy_kernels::cuda::DeviceElement + bytemuck::Pod>(
    be: &entropy_kernels::cuda::CudaBackend,
    seed: u64,
    dtype: DType,
) {
    use entropy_kernels::cuda::{CudaAttendPlan, CudaPagedCache};
    let stream = be.stream().clone();
    let cpu = Kernels::cpu();
    let (hq, hkv, d, ps, seqs, width) = (8, 2, 64, 16, 3, 8);
    let layout = PageLayout::slot_major(seqs * width + 2, ps, hkv, d);
    let mut host = PagedCache::interleaved(dtype, layout, seqs, width).unwrap();
    let up = |t: &HostTensor| stream.clone_htod(&typed::<T>(t)).unwrap();
    let mut dc = CudaPagedCache::<T>::upload(&stream, &host).unwrap();
    let mut ws_host = Workspace::new();
    let mut ws_dev = Workspace::new();
    let mut plan = CudaAttendPlan::new();
    // Round 0: ragged prefill (the middle sequence brings nothing); round 1: one token each.
    for (round, lens) in [[37usize, 0, 64], [1, 1, 1]].iter().enumerate() {
        let cu: Vec<u32> = std::iter::once(0)
            .chain(lens.iter().scan(0u32, |a, &l| {
                *a += l as u32;
                Some(*a)
            }))
            .collect();
        let t = cu[seqs] as usize;
        let tag = format!("{dtype} round {round}");
        let s = seed ^ (round as u64 * 1000);
        let (q, kn, vn) = (
            random([1, t, hq, d], 1.0, s, dtype),
            random([1, t, hkv, d], 1.0, s ^ 1, dtype),
            random([1, t, hkv, d], 1.0, s ^ 2, dtype),
        );
        cpu.append(kn.view(), vn.view(), &cu, &mut host.cache_mut(), &mut ws_host).unwrap();
        let (knd, vnd, cud) = (up(&kn), up(&vn), stream.clone_htod(&cu).unwrap());
        let (knt, vnt) = (CudaTensor::bsnd(&knd, &stream, kn.shape), CudaTensor::bsnd(&vnd, &stream, vn.shape));
        be.append_on(&stream, &knt, &vnt, &cu, &cud, &mut dc.view_mut(&stream).unwrap(), &mut ws_dev).unwrap();
        assert!(dc.matches_host(&stream, &host).unwrap(), "{tag}: pools and lengths after append_on = the host append");

        // Attention: the CPU backend over the host pool against the device plan + run.
        let mut want = poisoned(q.shape, dtype);
        let mut want_lse = vec![f32::NAN; t * hq];
        cpu.attend(q.view(), &cu, &host.cache(), &[], None, &mut want.view_mut(), Some(&mut want_lse), &mut ws_host)
            .unwrap();
        let mut qd = up(&q);
        let mut od = up(&poisoned(q.shape, dtype));
        let mut lse_d = stream.alloc_zeros::<f32>(t * hq).unwrap();
        let cache = dc.view(&stream).unwrap();
        {
            let qt = CudaTensor::bsnd(&qd, &stream, q.shape);
            let ot = CudaTensorMut::bsnd(&mut od, &stream, q.shape);
            be.plan_attend_on(&stream, &mut plan, &qt, &cu, &cache, &[], None, &ot, Some(t * hq)).unwrap();
        }
        let run = |qd: &cudarc::driver::CudaSlice<T>,
                   od: &mut cudarc::driver::CudaSlice<T>,
                   lse_d: &mut cudarc::driver::CudaSlice<f32>| {
            let qt = CudaTensor::bsnd(qd, &stream, q.shape);
            let mut ot = CudaTensorMut::bsnd(od, &stream, q.shape);
            be.run_attend_on(&stream, &plan, &qt, &cache, &mut ot, Some(lse_d)).unwrap();
        };
        let compare = |what: &str,
                       od: &cudarc::driver::CudaSlice<T>,
                       lse_d: &cudarc::driver::CudaSlice<f32>,
                       want: &HostTensor,
                       want_lse: &[f32]| {
            let got = HostTensor::from_f32(&typed_back::<T>(&stream.clone_dtoh(od).unwrap(), dtype), q.shape, dtype);
            let err = rel_fro(&tensor_f64(&got), &tensor_f64(want));
            assert!(err <= attn_tol(dtype), "{tag} {what}: rel err {err:e}");
            let lse: Vec<f32> = stream.clone_dtoh(lse_d).unwrap();
            let worst = lse.iter().zip(want_lse).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-3, "{tag} {what}: lse off by {worst}");
        };
        run(&qd, &mut od, &mut lse_d);
        compare("run", &od, &lse_d, &want, &want_lse);
        // New queries in the same buffer, run again from the same plan.
        let q2 = random([1, t, hq, d], 1.0, s ^ 3, dtype);
        stream.memcpy_htod(&typed::<T>(&q2), &mut qd).unwrap();
        let mut want2 = poisoned(q.shape, dtype);
        let mut want2_lse = vec![f32::NAN; t * hq];
        cpu.attend(q2.view(), &cu, &host.cache(), &[], None, &mut want2.view_mut(), Some(&mut want2_lse), &mut ws_host)
            .unwrap();
        run(&qd, &mut od, &mut lse_d);
        compare("rerun with new queries", &od, &lse_d, &want2, &want2_lse);
    }
}

/// Selection and in-place compaction on the device (`select_on` + `compact_on`) over a paged
/// cache whose heads differ in length, with a sequence too short to compress: the device's lists
/// equal the backend's host-path `kv_select` (the same kernels over an uploaded copy), agree with
/// the CPU backend's up to near-ties, and the compacted pools and lengths equal the host
/// compaction by the same selection, bit for bit. A compaction after the lengths changed is
/// refused.
#[test]
fn device_select_and_compact_match_the_host() {
    let Some(be) = cuda_backend("cuda_device_compaction") else { return };
    let be = std::sync::Arc::new(be);
    let seed = seed("cuda_device_compaction");
    // D 64: tensor-core scoring (16-bit) and 16-byte moves; D 60: FMA scoring, and element moves
    // for 16-bit caches.
    for d in [64, 60] {
        for dtype in DType::ALL {
            match dtype {
                DType::F32 => select_compact_round_trip::<f32>(&be, seed, dtype, d),
                DType::F16 => select_compact_round_trip::<half::f16>(&be, seed, dtype, d),
                DType::BF16 => select_compact_round_trip::<half::bf16>(&be, seed, dtype, d),
            }
        }
    }
}

fn select_compact_round_trip<T: entropy_kernels::cuda::DeviceElement + bytemuck::Pod>(
    be: &std::sync::Arc<entropy_kernels::cuda::CudaBackend>,
    seed: u64,
    dtype: DType,
    d: usize,
) {
    use entropy_kernels::cuda::CudaPagedCache;
    let stream = be.stream().clone();
    let (cpu, dev) = (Kernels::cpu(), Kernels::from_backend(be.clone()));
    let (hq, hkv, ps, seqs, width) = (8, 2, 16, 3, 8);
    // Sharp windows (obs std 1000, no pooling) make most scores underflow to exactly 0, so
    // AdaKV's shared picks run into ties that only the rank order (score, head, position) breaks,
    // and that must never reach the padding of a shorter head's row.
    let uniform = DecodeConfig { decode_budget: 40, window: 4, pooling_kernel: 3, ..DecodeConfig::latent() };
    let adakv = DecodeConfig { decode_budget: 40, window: 4, pooling_kernel: 3, ..DecodeConfig::adakv(0.3) };
    let sharp = DecodeConfig { pooling_kernel: 1, ..adakv.clone() };
    // A NaN key makes a head's scores NaN, which rank below -inf: the shared picks still never
    // take a floor pick or padding.
    let cases = [(uniform, 1.0, false), (adakv.clone(), 1.0, false), (sharp, 1000.0, false), (adakv, 1.0, true)];
    for (c, (cfg, std, nan)) in cases.into_iter().enumerate() {
        let tag = format!("{dtype} D {d} {:?} obs std {std} NaN key {nan}", cfg.head_budget);
        let s = seed ^ (c as u64 * 77);
        let layout = PageLayout::head_major(seqs * width + 2, ps, hkv, d);
        let mut host = PagedCache::interleaved(dtype, layout, seqs, width).unwrap();
        let lens = [100usize, 20, 77];
        let total: usize = lens.iter().sum();
        let cu = [0, 100, 120, total as u32];
        let (k, v) = (random([1, total, hkv, d], 1.0, s, dtype), random([1, total, hkv, d], 1.0, s ^ 1, dtype));
        let mut ws = Workspace::new();
        cpu.append(k.view(), v.view(), &cu, &mut host.cache_mut(), &mut ws).unwrap();
        host.lens[2 * hkv] = 13; // heads of unequal lengths, the first shorter than the budget and AdaKV's floor
        if nan {
            let o = host.layout.offset(host.ids[2 * width] as usize, 5, 1);
            let mut kf = host.k.to_f32_vec();
            kf[o] = f32::NAN;
            host.k = HostTensor::from_f32(&kf, host.k.shape, dtype);
        }
        let obs = random([seqs, hq, cfg.window, d], std, s ^ 2, dtype);
        let od = stream.clone_htod(&typed::<T>(&obs)).unwrap();
        let mut dc = CudaPagedCache::<T>::upload(&stream, &host).unwrap();
        let sel = {
            let ot = CudaTensor::bsnd(&od, &stream, obs.shape);
            be.select_on(&stream, &dc.view(&stream).unwrap(), &ot, &cfg, &[]).unwrap()
        };
        assert_eq!(sel.compressed(), &[true, false, true], "{tag}: which sequences compress");
        let got = sel.to_host(&stream).unwrap();
        let via_host = dev.kv_select(&host.cache(), obs.view(), &cfg, &[]).unwrap();
        assert_eq!(got, via_host, "{tag}: select_on = the backend's kv_select");
        // The device's selection rules = the shared host rules over the device's own scores.
        let scores = dev.kv_scores(&host.cache(), obs.view(), &cfg, &[]).unwrap();
        assert_eq!(got, scores.select(&cfg).unwrap(), "{tag}: device selection = host rules over its scores");
        // Against the CPU's scores: which tiny scores underflow differs, and with them the ties
        // of the sharp case; otherwise the same up to near-ties.
        let want = cpu.kv_select(&host.cache(), obs.view(), &cfg, &[]).unwrap();
        for i in (0..seqs).filter(|_| std == 1.0 && !nan) {
            for h in 0..hkv {
                let (x, y) = (got.kept(i, h), want.kept(i, h));
                assert_eq!(x.len(), y.len(), "{tag}: kept count of ({i}, {h})");
                let common = x.iter().filter(|p| y.contains(p)).count();
                assert!(common + 2 >= y.len(), "{tag}: ({i}, {h}) kept {x:?}, CPU {y:?}");
            }
        }
        // A selection is for the lengths it was made on (refused before anything is enqueued).
        dc.lens_host[0] -= 1;
        let bad = be.compact_on(&stream, &mut dc.view_mut(&stream).unwrap(), &sel, &mut ws).unwrap_err();
        assert!(matches!(bad, Error::PlanMismatch(_)), "{tag}: {bad}");
        dc.lens_host[0] += 1;
        be.compact_on(&stream, &mut dc.view_mut(&stream).unwrap(), &sel, &mut ws).unwrap();
        cpu.kv_compact(&mut host.cache_mut(), &got, &mut ws).unwrap();
        assert!(
            dc.matches_host(&stream, &host).unwrap(),
            "{tag}: pools and lengths after compact_on = the host compaction"
        );
    }
}

/// Chunked planning on the device (`plan_chunks_on`, and `Kernels::plan_chunks` on the CUDA
/// backend) equals the CPU backend's, every field bit for bit (maps kept), and leaves the same
/// states: three prompts over shuffled pages, chunks at random multiples of S, a sequence that
/// brings nothing in some rounds, one shorter than a block, layer fusion from the previous
/// layer's plans, and a full-width ranking; `streaming` classes with entropy and fixed budgets,
/// and `prompt` classes planned in one chunk per prompt.
#[test]
fn device_chunked_planning_matches_the_cpu() {
    let Some(be) = cuda_backend("cuda_device_chunks") else { return };
    let be = std::sync::Arc::new(be);
    let seed = seed("cuda_device_chunks");
    for case in [ChunkCase::Streaming, ChunkCase::FixedBudgets, ChunkCase::PromptOneChunk] {
        for dtype in DType::ALL {
            match dtype {
                DType::F32 => chunked_planning_round_trip::<f32>(&be, seed, dtype, case),
                DType::F16 => chunked_planning_round_trip::<half::f16>(&be, seed, dtype, case),
                DType::BF16 => chunked_planning_round_trip::<half::bf16>(&be, seed, dtype, case),
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ChunkCase {
    Streaming,
    FixedBudgets,
    PromptOneChunk,
}

fn chunked_planning_round_trip<T: entropy_kernels::cuda::DeviceElement + bytemuck::Pod>(
    be: &std::sync::Arc<entropy_kernels::cuda::CudaBackend>,
    seed: u64,
    dtype: DType,
    case: ChunkCase,
) {
    use entropy_kernels::cuda::CudaPagedCache;
    use entropy_kernels::synth::Rng;
    let mut rng = Rng::new(seed ^ dtype as u64 ^ ((case as u64) << 8));
    let stream = be.stream().clone();
    let cpu = Kernels::cpu();
    let on_device = Kernels::from_backend(be.clone());
    let (hq, hkv, d, ps) = (6, 2, [32, 40][rng.below(2)], [8, 16][rng.below(2)]);
    let lens = [40 + rng.below(100), 3, 60 + rng.below(90)];
    let cfg = EntropyConfig {
        segment_size: 16,
        block_size: 4,
        threshold_len: 16,
        base_budget: [8, 12, 20][rng.below(3)],
        e_t: [1e-5, 1.5, 2.5][rng.below(3)],
        head_class: if case == ChunkCase::PromptOneChunk { HeadClassMode::Prompt } else { HeadClassMode::Streaming },
        budget_policy: if case == ChunkCase::FixedBudgets { BudgetPolicy::Fixed } else { BudgetPolicy::Entropy },
        layer_fusion: case == ChunkCase::Streaming,
        ..EntropyConfig::default()
    };
    let width = 160 / ps;
    let pages = lens.len() * width + 3;
    let mut ids: Vec<u32> = (0..pages as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    ids.truncate(lens.len() * width);
    let layout = if rng.below(2) == 0 {
        PageLayout::slot_major(pages, ps, hkv, d)
    } else {
        PageLayout::head_major(pages, ps, hkv, d)
    };
    let mut host = PagedCache::new(dtype, layout, ids, width, f32::NAN).unwrap();
    let prompts: Vec<(HostTensor, HostTensor, HostTensor)> =
        lens.iter().enumerate().map(|(i, &l)| random_qkv([1, l, hq, hkv, d], seed ^ (i as u64 * 31), dtype)).collect();
    let mut cuts: Vec<Vec<usize>> = Vec::new();
    for &l in &lens {
        let (mut at, mut c) = (0, Vec::new());
        while at < l {
            at = if case == ChunkCase::PromptOneChunk { l } else { (at + 16 * rng.below(3)).min(l) };
            c.push(at);
        }
        cuts.push(c);
    }
    let prompt_lens: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
    let tag = format!("{case:?} {dtype} lens {lens:?} cuts {cuts:?} page {ps} d {d} {:?}", layout.strides);
    let (mut st_cpu, mut st_dev, mut st_be) =
        (vec![PlanState::new(); 3 * hkv], vec![PlanState::new(); 3 * hkv], vec![PlanState::new(); 3 * hkv]);
    let mut ws = Workspace::new();
    let rounds = cuts.iter().map(Vec::len).max().unwrap();
    let rows = |i: usize, r: usize| -> std::ops::Range<usize> {
        let c = &cuts[i];
        let end = c[r.min(c.len() - 1)];
        if r >= c.len() { end..end } else { (if r == 0 { 0 } else { c[r - 1] })..end }
    };
    // The "previous layer": the one-shot plans of each prompt, for fusion.
    let prev: Vec<Plan> = prompts
        .iter()
        .map(|(q, k, _)| cpu.plan(q.view(), k.view(), &cfg, &PlanRequest::layer(1).keep_maps(true)).unwrap())
        .collect();
    for r in 0..rounds {
        let pack = |which: usize| -> (HostTensor, Vec<u32>) {
            let mut vals = Vec::new();
            let mut cu = vec![0u32];
            let h = if which == 0 { hq } else { hkv };
            for (i, p) in prompts.iter().enumerate() {
                let t = [&p.0, &p.1, &p.2][which];
                let rr = rows(i, r);
                vals.extend_from_slice(&t.to_f32_vec()[rr.start * h * d..rr.end * h * d]);
                cu.push(cu.last().unwrap() + rr.len() as u32);
            }
            let n = *cu.last().unwrap() as usize;
            (HostTensor::from_f32(&vals, [1, n, h, d], dtype), cu)
        };
        let ((q, cu), (kn, _), (vn, _)) = (pack(0), pack(1), pack(2));
        cpu.append(kn.view(), vn.view(), &cu, &mut host.cache_mut(), &mut ws).unwrap();
        let req = ChunkRequest { keep_maps: true, full_ranking: r % 2 == 1, layer_idx: 2, prev: Some(&prev) };
        let tag = format!("{tag} round {r}");
        let want = cpu
            .plan_chunks(q.view(), &cu, &host.cache(), &prompt_lens, std::slice::from_ref(&cfg), &mut st_cpu, &req)
            .unwrap();
        let via_backend = on_device
            .plan_chunks(q.view(), &cu, &host.cache(), &prompt_lens, std::slice::from_ref(&cfg), &mut st_be, &req)
            .unwrap();
        let (dc, qd) =
            (CudaPagedCache::<T>::upload(&stream, &host).unwrap(), stream.clone_htod(&typed::<T>(&q)).unwrap());
        let qt = CudaTensor::bsnd(&qd, &stream, q.shape);
        let cache = dc.view(&stream).unwrap();
        let got = be
            .plan_chunks_on(&stream, &qt, &cu, &cache, &prompt_lens, std::slice::from_ref(&cfg), &mut st_dev, &req)
            .unwrap();
        for i in 0..3 {
            assert_eq!(got[i], want[i], "{tag}: sequence {i}'s plan_chunks_on plan");
            assert_eq!(via_backend[i], want[i], "{tag}: sequence {i}'s Kernels::plan_chunks plan");
        }
        assert_eq!(st_dev, st_cpu, "{tag}: states after plan_chunks_on");
        assert_eq!(st_be, st_cpu, "{tag}: states after Kernels::plan_chunks");
    }
    assert!(st_cpu.iter().all(|s| s.next_segment > 0), "{tag}: every prompt planned to its end");
}

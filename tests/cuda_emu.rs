//! The emulated CUDA driver (`cuda-emu`): every rule it enforces is caught when planted, correct
//! code passes with the values CUDA defines, and the backend on it really launches kernels. Every
//! test loads the emulator first (`emu::*`), so it runs on GPU machines too.
#![cfg(feature = "cuda-emu")]

mod common;

use entropy_kernels::cuda::{PrefillTile, emu};
use entropy_kernels::{reference, validate, *};

/// CUresult codes the emulated driver returns (cuda.h).
const INVALID_VALUE: i32 = 1;
const ILLEGAL_STATE: i32 = 401;
const ILLEGAL_ADDRESS: i32 = 700;
const LAUNCH_OUT_OF_RESOURCES: i32 = 701;
const LAUNCH_FAILED: i32 = 719;

/// `Kernels` on the emulated driver with the prefill tile forced to `tile`.
fn tiled(tile: PrefillTile) -> Kernels {
    let mut be = emu::backend().expect("the emulated driver loads");
    be.set_prefill_tile(tile);
    Kernels::from_backend(std::sync::Arc::new(be))
}

fn expect_violation(code: i32, result: i32, text: &str) {
    match emu::selftest(code).expect("the emulated driver loads") {
        Ok(_) => panic!("planted violation {code} ({text}) was not caught"),
        Err((r, msg)) => {
            assert_eq!(r, result, "violation {code}: CUresult {r} ({msg})");
            assert!(msg.contains(text), "violation {code}: message {msg:?} lacks {text:?}");
        }
    }
}

#[test]
fn correct_code_passes_with_cuda_semantics() {
    let out = emu::selftest(0).expect("the emulated driver loads").expect("no rule broken");
    // v = t + (t ^ 1) + popcount(ballot of odd lanes) = 2t ± 1 + 16.
    for (t, &v) in out.iter().enumerate() {
        assert_eq!(v, (t + (t ^ 1) + 16) as f32, "thread {t}");
    }
}

#[test]
fn planted_violations_are_caught() {
    expect_violation(1, LAUNCH_FAILED, "wait at __syncthreads");
    expect_violation(2, LAUNCH_FAILED, "partial mask");
    expect_violation(3, LAUNCH_FAILED, "different collectives");
    expect_violation(4, LAUNCH_FAILED, "deadlock");
    expect_violation(5, ILLEGAL_ADDRESS, "outside an allocation");
    expect_violation(6, INVALID_VALUE, "dynamic shared memory");
    expect_violation(7, LAUNCH_FAILED, "past the end of its 0 bytes of dynamic shared memory");
    // A read past an allocation faults; the emulator reports it (from a child process here).
    expect_violation(8, ILLEGAL_ADDRESS, "selftest: block (0,0,0) thread 0 accessed");
    // What the driver refuses, from the kernel's compiled attributes.
    expect_violation(9, LAUNCH_OUT_OF_RESOURCES, "exceeds the kernel's launch bound");
    expect_violation(10, INVALID_VALUE, "above the opt-in");
    expect_violation(11, LAUNCH_OUT_OF_RESOURCES, "registers per thread exceed the SM's");
    // Stream order: a copy on another stream may not read what a kernel wrote until an event says so.
    expect_violation(12, ILLEGAL_STATE, "stream race");
    let ordered = emu::selftest(13).expect("the emulated driver loads").expect("an event orders the streams");
    assert_eq!(ordered[5], 5.0 + 4.0 + 16.0, "the copy after the event sees the kernel's output");
}

/// The backend opens on every emulated architecture — each kernel's dynamic shared memory raised
/// to the device's opt-in size less the kernel's own static size (the whole opt-in size is refused
/// for kernels with static shared memory), the planning ranking launched within its launch bound
/// — and plans, prefills (the SIMT kernel at D 256 takes 16-key tiles in the 99 KiB of sm_86 and
/// sm_89), compresses and decodes as the oracle does.
#[test]
fn the_backend_runs_on_every_emulated_architecture() {
    if !common::cuda_kernels_available("the_backend_runs_on_every_emulated_architecture") {
        return;
    }
    let oracle = Kernels::reference();
    let seed = common::seed("cuda_emu_architectures");
    for (ordinal, (cc, arch)) in emu::DEVICES.iter().enumerate() {
        let be = emu::backend_on(ordinal).unwrap_or_else(|e| panic!("{arch}: the backend does not open: {e}"));
        let optin = if *cc == 90 {
            227
        } else if *cc == 80 {
            163
        } else {
            99
        } * 1024;
        let rank = be.limits().kernel("ek_plan_rank");
        assert_eq!(rank.max_threads, 512, "{arch}: ek_plan_rank's launch bound");
        assert!(rank.static_smem >= 24 * 1024, "{arch}: ek_plan_rank's static shared memory: {}", rank.static_smem);
        assert_eq!(rank.max_dynamic_smem, optin - rank.static_smem, "{arch}: opt-in less ek_plan_rank's static memory");
        let k = Kernels::from_backend(std::sync::Arc::new(be));
        for (dtype, d, kernel) in [
            (DType::F32, 256, if *cc >= 90 || *cc == 80 { "ek_prefill_simt_f32" } else { "ek_prefill_simt_f32_k16" }),
            (DType::BF16, 128, "ek_prefill_mma_bf16_d128_m64"),
        ] {
            let (l, hq, hkv) = (300, 4, 2);
            let (q, kk, v) = common::random_qkv([1, l, hq, hkv, d], seed, dtype);
            let cfg = EntropyConfig {
                segment_size: 64,
                block_size: 8,
                threshold_len: 64,
                base_budget: 64,
                ..EntropyConfig::default()
            };
            let before = emu::launches(Some(kernel)).unwrap();
            let mut got = common::poisoned([1, l, hq, d], dtype);
            let plan = k
                .prefill(q.view(), kk.view(), v.view(), &cfg, &PlanRequest::layer(0), &mut got.view_mut(), None)
                .unwrap();
            assert!(emu::launches(Some(kernel)).unwrap() > before, "{arch} {dtype} D {d}: {kernel} did not run");
            let want_plan = oracle.plan(q.view(), kk.view(), &cfg, &PlanRequest::layer(0)).unwrap();
            assert_eq!(plan.blocks, want_plan.blocks, "{arch} {dtype} D {d}: block lists");
            let exact = common::check::exact_prefill(q.view(), kk.view(), v.view(), Some(&want_plan.blocks));
            common::check::check_out(&format!("{arch} {dtype} D {d} (seed {seed})"), k.kind(), &got, &exact);
        }
        let (kc, vc) = (
            common::random([1, 2, 700, 64], 1.0, seed ^ 3, DType::F16),
            common::random([1, 2, 700, 64], 1.0, seed ^ 4, DType::F16),
        );
        let obs = common::random([1, 8, 32, 64], 1.0, seed ^ 5, DType::F16);
        let cfg = DecodeConfig { decode_budget: 200, ..DecodeConfig::default() };
        let got = k.kv_compress(kc.view(), vc.view(), obs.view(), &cfg).unwrap();
        let want = oracle.kv_compress(kc.view(), vc.view(), obs.view(), &cfg).unwrap();
        let args = validate::kv_compress(oracle.capabilities(), kc.view(), vc.view(), obs.view(), &cfg).unwrap();
        common::check_compressed(arch, &got, &want, &reference::compress_scores(&args), (&kc, &vc), false);
    }
}

/// An engine that reads the outputs on another stream waits for the kernels that wrote them:
/// cudarc's write events of the LSE (`prefill_on`) and of the compressed cache and its indices
/// (`kv_compress_on`) are recorded after the launches, not before (the emulated driver fails a
/// read that nothing orders after the write).
#[test]
fn engines_reading_outputs_on_another_stream_wait_for_the_kernels() {
    if !common::cuda_kernels_available("engines_reading_outputs_on_another_stream_wait_for_the_kernels") {
        return;
    }
    use entropy_kernels::cuda::{CudaTensor, CudaTensorMut};
    let be = emu::backend().expect("the emulated driver loads");
    let stream = be.stream().clone();
    let other = be.context().new_stream().expect("a second stream");
    let seed = common::seed("cuda_emu_streams");
    let (l, hq, hkv, d) = (200, 4, 2, 64);
    let to_bf16 = |t: &HostTensor| t.to_f32_vec().iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>();
    let (q, k, v) = common::random_qkv([1, l, hq, hkv, d], seed, DType::BF16);
    let (qd, kd, vd) = (
        stream.clone_htod(&to_bf16(&q)).unwrap(),
        stream.clone_htod(&to_bf16(&k)).unwrap(),
        stream.clone_htod(&to_bf16(&v)).unwrap(),
    );
    let mut out = stream.alloc_zeros::<half::bf16>(l * hq * d).unwrap();
    let mut lse = stream.alloc_zeros::<f32>(hq * l).unwrap();
    {
        let (qt, kt, vt) = (
            CudaTensor::bsnd(&qd, &stream, q.shape),
            CudaTensor::bsnd(&kd, &stream, k.shape),
            CudaTensor::bsnd(&vd, &stream, v.shape),
        );
        let mut ot = CudaTensorMut::bsnd(&mut out, &stream, q.shape);
        be.prefill_on(&stream, &qt, &kt, &vt, None, None, &mut ot, Some(&mut lse)).unwrap();
    }
    let got: Vec<f32> = other.clone_dtoh(&lse).expect("the LSE read on another stream is ordered after the kernel");
    let mut want = vec![f32::NAN; hq * l];
    let mut o = common::poisoned(q.shape, DType::BF16);
    Kernels::reference().dense_prefill(q.view(), k.view(), v.view(), None, &mut o.view_mut(), Some(&mut want)).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "LSE {i}: {g} vs {w} (seed {seed})");
    }
    // The compressed cache and its indices, read on the other stream.
    let (kc, vc) = (
        common::random([1, hkv, 500, d], 1.0, seed ^ 3, DType::BF16),
        common::random([1, hkv, 500, d], 1.0, seed ^ 4, DType::BF16),
    );
    let obs = common::random([1, hq, 32, d], 1.0, seed ^ 5, DType::BF16);
    let (kcd, vcd, od) = (
        stream.clone_htod(&to_bf16(&kc)).unwrap(),
        stream.clone_htod(&to_bf16(&vc)).unwrap(),
        stream.clone_htod(&to_bf16(&obs)).unwrap(),
    );
    let cfg = DecodeConfig { decode_budget: 100, ..DecodeConfig::default() };
    let compact = {
        let (kt, vt, ot) = (
            CudaTensor::bsnd(&kcd, &stream, kc.shape),
            CudaTensor::bsnd(&vcd, &stream, vc.shape),
            CudaTensor::bsnd(&od, &stream, obs.shape),
        );
        be.kv_compress_on::<half::bf16>(&stream, &kt, &vt, &ot, &cfg).unwrap().expect("the cache is over budget")
    };
    let keys: Vec<half::bf16> = other.clone_dtoh(&compact.k).expect("the compressed keys read on another stream");
    let indices = compact.host_indices(&other).expect("the kept positions read on another stream");
    let want = Kernels::cpu().kv_compress(kc.view(), vc.view(), obs.view(), &cfg).unwrap();
    assert_eq!(indices, want.indices, "kept positions (seed {seed})");
    let kept: Vec<f32> = keys.iter().map(|x| x.to_f32()).collect();
    assert_eq!(kept, want.k.to_f32_vec(), "compressed keys (seed {seed})");
}

/// `auto` does not hide a device that is there but fails to open: the typed error of the failing
/// driver call comes back instead of the next backend. Only an absent backend passes to the next.
#[test]
fn auto_reports_a_broken_device_instead_of_falling_back() {
    if !common::cuda_kernels_available("auto_reports_a_broken_device_instead_of_falling_back") {
        return;
    }
    use std::sync::Arc;
    let cuda = || -> Result<Arc<dyn Backend>> {
        emu::fail_next("cuModuleLoadData")?;
        Ok(Arc::new(emu::backend()?))
    };
    let cpu = || -> Result<Arc<dyn Backend>> { Ok(Arc::new(cpu::CpuBackend::new())) };
    let absent = || -> Result<Arc<dyn Backend>> {
        Err(Error::BackendUnavailable { backend: "ascend", reason: "none here".into() })
    };
    match selection::first_available([&cuda as &dyn Fn() -> Result<Arc<dyn Backend>>, &absent, &cpu]) {
        Err(Error::Driver { call: "cuModuleLoadData", .. }) => {}
        Err(e) => panic!("expected the failing call, got {e}"),
        Ok(b) => panic!("a broken CUDA device was replaced by {}", b.describe()),
    }
    let absent_cuda = || -> Result<Arc<dyn Backend>> {
        Err(Error::BackendUnavailable { backend: "cuda", reason: "no driver".into() })
    };
    let chosen =
        selection::first_available([&absent_cuda as &dyn Fn() -> Result<Arc<dyn Backend>>, &absent, &cpu]).unwrap();
    assert_eq!(chosen.kind(), BackendKind::Cpu, "absent backends pass to the next");
}

/// The emulated driver loads only code the device can run, judged from the image itself: a cubin
/// of the same major version and no newer minor (ELF e_flags), PTX for an older or equal target
/// (JIT), a fatbin holding either.
#[test]
fn images_without_code_for_the_device_are_refused() {
    const NO_BINARY_FOR_GPU: i32 = 209;
    let cubin = |arch: &str| match entropy_kernels::cuda::source::compile(arch, false) {
        Ok(c) => Some(c.image),
        Err(e) => {
            eprintln!("SKIP: {e}");
            None
        }
    };
    let (Some(sm80), Some(sm90a), Some(mut ptx80)) = (cubin("sm_80"), cubin("sm_90a"), cubin("compute_80")) else {
        return;
    };
    ptx80.push(0);
    // Devices: 0 sm_90, 1 sm_80, 2 sm_86, 3 sm_89.
    for (ordinal, image, loads) in [
        (0, &sm90a, true),
        (0, &sm80, false),
        (1, &sm80, true),
        (1, &sm90a, false),
        (2, &sm80, true),
        (2, &sm90a, false),
        (3, &ptx80, true),
        (0, &ptx80, true),
    ] {
        match emu::load_image(ordinal, image).unwrap() {
            Ok(()) => assert!(loads, "device {ordinal} loaded an image it cannot run"),
            Err((r, why)) => {
                assert!(!loads, "device {ordinal} refused a runnable image: {why}");
                assert_eq!(r, NO_BINARY_FOR_GPU, "{why}");
            }
        }
    }
    if let Some(fatbin) = entropy_kernels::cuda::source::FATBIN {
        for ordinal in 0..4 {
            assert!(emu::load_image(ordinal, fatbin).unwrap().is_ok(), "the nvcc fatbin runs on device {ordinal}");
        }
    }
}

#[test]
fn the_backend_runs_its_kernels_on_the_emulator() {
    if !common::cuda_kernels_available("the_backend_runs_its_kernels_on_the_emulator") {
        return;
    }
    let be = emu::backend().expect("the emulated driver loads");
    assert!(be.describe().contains("emulator"), "{}", be.describe());
    let before = emu::launches(None).unwrap();
    let k = Kernels::from_backend(std::sync::Arc::new(be));
    let q = common::random([1, 70, 4, 64], 1.0, 1, DType::F16);
    let kv = common::random([1, 70, 2, 64], 1.0, 2, DType::F16);
    let mut out = common::poisoned([1, 70, 4, 64], DType::F16);
    k.dense_prefill(q.view(), kv.view(), kv.view(), None, &mut out.view_mut(), None).unwrap();
    assert!(emu::launches(None).unwrap() > before, "no kernel was launched");
    assert!(out.to_f32_vec().iter().all(|x| x.is_finite()), "output left poisoned");
}

/// Every kernel of the crate is in the emulated driver's table (a missing one would fail
/// `CudaBackend::new` anyway, by name).
#[test]
fn every_kernel_is_emulated() {
    for k in entropy_kernels::cuda::source::KERNELS {
        assert!(emu::launches(Some(k)).is_ok(), "{k} is missing from cuda/host/driver_emu.cpp");
    }
    assert!(emu::launches(Some("no_such_kernel")).is_err());
}

/// 16-bit caches with D 64/128 score on the tensor cores, f32 and other head dims with FMAs; both
/// agree with the oracle, window rows beyond 256 per kv head included (the matrix covers more
/// shapes; this pins which kernels ran).
#[test]
fn kv_compress_scores_on_tensor_cores_for_16_bit_caches() {
    if !common::cuda_kernels_available("kv_compress_scores_on_tensor_cores_for_16_bit_caches") {
        return;
    }
    let be = emu::backend().expect("the emulated driver loads");
    let k = Kernels::from_backend(std::sync::Arc::new(be));
    let oracle = Kernels::reference();
    // (dtype, D, q heads, kv heads, window, the scoring kernel that must run, group reduction)
    for (dtype, d, hq, hkv, w, kernel, gqa_mode) in [
        // GQA 12/4, W 24: 72 rows per kv head, five 16-row slabs (the last partial).
        (DType::F16, 128, 12, 4, 24, "ek_compress_stats_mma_f16_d128", GqaMode::PerQueryHead),
        (DType::BF16, 64, 12, 4, 24, "ek_compress_stats_mma_bf16_d64", GqaMode::Max),
        (DType::BF16, 128, 12, 4, 24, "ek_compress_stats_mma_bf16_d128", GqaMode::Mean),
        (DType::F16, 80, 12, 4, 24, "ek_compress_stats_f16", GqaMode::PerQueryHead),
        (DType::F32, 64, 12, 4, 24, "ek_compress_stats_f32", GqaMode::Max),
        // MQA 16/1, W 40: 640 window rows per kv head.
        (DType::F16, 128, 16, 1, 40, "ek_compress_stats_mma_f16_d128", GqaMode::Mean),
        (DType::F32, 64, 16, 1, 40, "ek_compress_stats_f32", GqaMode::PerQueryHead),
    ] {
        let cfg = DecodeConfig { decode_budget: 300, window: w, gqa_mode, ..DecodeConfig::default() };
        let seed = common::seed(&format!("cuda_emu_compress/{dtype}/{d}/{hq}x{hkv}/{w}"));
        let kc = common::random([2, hkv, 777, d], 1.0, seed, dtype);
        let vc = common::random([2, hkv, 777, d], 1.0, seed ^ 1, dtype);
        let obs = common::random([2, hq, w, d], 1.0, seed ^ 2, dtype);
        let before = emu::launches(Some(kernel)).unwrap();
        let got = k.kv_compress(kc.view(), vc.view(), obs.view(), &cfg).unwrap();
        assert!(emu::launches(Some(kernel)).unwrap() > before, "{dtype} D {d}: {kernel} did not run");
        let want = oracle.kv_compress(kc.view(), vc.view(), obs.view(), &cfg).unwrap();
        let args = validate::kv_compress(oracle.capabilities(), kc.view(), vc.view(), obs.view(), &cfg).unwrap();
        let scores = reference::compress_scores(&args);
        let tag = format!("cuda_emu {dtype} D {d} GQA {hq}/{hkv} W {w}");
        common::check_compressed(&tag, &got, &want, &scores, (&kc, &vc), false);
    }
}

/// The prefill's cp.async pipeline is correct whether copies land when waited for (a read before
/// the wait would see stale tiles) or at issue (a refill before every warp is done with a buffer
/// would corrupt it): 64- and 128-row tiles, f16/bf16, D 64/128, several key tiles, GQA, sparse
/// lists and LSE.
#[test]
fn prefill_pipeline_holds_whichever_way_copies_land() {
    if !common::cuda_kernels_available("prefill_pipeline_holds_whichever_way_copies_land") {
        return;
    }
    let oracle = Kernels::reference();
    for (early, tile) in
        [(true, PrefillTile::M64), (false, PrefillTile::M64), (true, PrefillTile::M128), (false, PrefillTile::M128)]
    {
        emu::set_cp_async_early(early).unwrap();
        let k = tiled(tile);
        for (dtype, d) in [(DType::F16, 128), (DType::BF16, 64)] {
            let kernel = format!("ek_prefill_mma_{dtype}_d{d}_m{}", if tile == PrefillTile::M64 { 64 } else { 128 });
            let before = emu::launches(Some(&kernel)).unwrap();
            let seed = common::seed(&format!("cuda_emu_pipeline/{early}/{tile:?}/{dtype}/{d}"));
            let (l, hq, hkv) = (333, 4, 2);
            let (q, kk, v) = common::random_qkv([1, l, hq, hkv, d], seed, dtype);
            let cfg = EntropyConfig {
                segment_size: 128,
                block_size: 16,
                threshold_len: 64,
                base_budget: 64,
                ..EntropyConfig::default()
            };
            let mut got = common::poisoned([1, l, hq, d], dtype);
            let mut lse = vec![f32::NAN; hq * l];
            let plan = k
                .prefill(
                    q.view(),
                    kk.view(),
                    v.view(),
                    &cfg,
                    &PlanRequest::layer(0),
                    &mut got.view_mut(),
                    Some(&mut lse),
                )
                .unwrap();
            let mut want = common::poisoned([1, l, hq, d], dtype);
            let mut want_lse = vec![f32::NAN; hq * l];
            oracle
                .sparse_prefill(
                    q.view(),
                    kk.view(),
                    v.view(),
                    &plan.blocks,
                    cfg.scale,
                    &mut want.view_mut(),
                    Some(&mut want_lse),
                )
                .unwrap();
            let tag = format!("cp.async early={early} {tile:?} {dtype} D {d}");
            assert!(emu::launches(Some(&kernel)).unwrap() > before, "{tag}: {kernel} did not run");
            let err = common::rel_fro(&common::tensor_f64(&got), &common::tensor_f64(&want));
            assert!(err <= common::attn_tol(dtype), "{tag}: rel err {err:e}");
            let lse_err = lse.iter().zip(&want_lse).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(lse_err < 1e-2, "{tag}: LSE off by {lse_err}");
        }
    }
}

/// Shared-memory races that decide a result: planning, the prefill (tensor-core with 64- and
/// 128-row tiles, SIMT, LSE), the compression (scores summed in a fixed order, no float atomics:
/// the emulator does not even provide them) and decode give the same bits whichever order the
/// emulator resumes a block's threads in — round robin or greedy, by index, reversed or shuffled.
/// 75 blocks of 8 tokens, so the planning's block reductions feed more than one warp.
#[test]
fn results_do_not_depend_on_thread_order() {
    if !common::cuda_kernels_available("results_do_not_depend_on_thread_order") {
        return;
    }
    let seed = common::seed("cuda_emu_thread_order");
    let bits = |t: &HostTensor| t.to_f32_vec().iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    for (dtype, d, tile) in [
        (DType::BF16, 128, PrefillTile::M64),
        (DType::BF16, 64, PrefillTile::M128),
        (DType::F32, 64, PrefillTile::Auto),
    ] {
        let k = tiled(tile);
        let (l, hq, hkv) = (600, 4, 2);
        let (q, kk, v) = common::random_qkv([1, l, hq, hkv, d], seed, dtype);
        let q1 = common::random([1, 1, hq, d], 1.0, seed ^ 3, dtype);
        let cache = |s: u64| common::random([1, hkv, 500, d], 1.0, s, dtype);
        let (kc, vc) = (cache(seed ^ 4), cache(seed ^ 5));
        // 40 window rows per kv head: three 16-row slabs on the tensor cores, passes of 128 rows otherwise.
        let obs = common::random([1, hq, 20, d], 1.0, seed ^ 6, dtype);
        let compress = DecodeConfig { decode_budget: 100, window: 20, ..DecodeConfig::default() };
        let cfg = EntropyConfig {
            segment_size: 128,
            block_size: 8,
            threshold_len: 64,
            base_budget: 64,
            ..EntropyConfig::default()
        };
        let run = |order: u32| {
            emu::set_schedule(order).unwrap();
            let mut out = common::poisoned([1, l, hq, d], dtype);
            let mut lse = vec![f32::NAN; hq * l];
            let req = PlanRequest::layer(0);
            let plan =
                k.prefill(q.view(), kk.view(), v.view(), &cfg, &req, &mut out.view_mut(), Some(&mut lse)).unwrap();
            let mut dec = common::poisoned([1, 1, hq, d], dtype);
            k.decode_attention(q1.view(), kc.view(), vc.view(), &[500, 377], None, &mut dec.view_mut()).unwrap();
            let lse: Vec<u32> = lse.iter().map(|x| x.to_bits()).collect();
            let compact = k.kv_compress(kc.view(), vc.view(), obs.view(), &compress).unwrap();
            let decisions = (plan.order, plan.entropy.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), compact.indices);
            (decisions, bits(&out), lse, bits(&dec), bits(&compact.k))
        };
        let base = run(0);
        for order in [1, 2, 3, 4, 5] {
            assert!(run(order) == base, "{dtype} D {d} {tile:?}: results differ under thread order {order}");
        }
    }
    emu::set_schedule(0).unwrap();
}

/// Window rows whose scoring tiles exceed the device's shared memory: the device API refuses them
/// with a range error before any launch, and `Kernels` falls back to the host path (correct).
#[test]
fn kv_compress_beyond_shared_memory_falls_back() {
    if !common::cuda_kernels_available("kv_compress_beyond_shared_memory_falls_back") {
        return;
    }
    use entropy_kernels::cuda::CudaTensor;
    let be = emu::backend().expect("the emulated driver loads");
    let stream = be.stream().clone();
    // MQA 64/1, W 64: 4096 window rows of D 64 (about 620 KB of f16 tiles).
    let (hq, w, n, d) = (64, 64, 400, 64);
    let seed = common::seed("cuda_emu_rows_limit");
    let kc = common::random([1, 1, n, d], 1.0, seed, DType::F16);
    let vc = common::random([1, 1, n, d], 1.0, seed ^ 1, DType::F16);
    let obs = common::random([1, hq, w, d], 1.0, seed ^ 2, DType::F16);
    let cfg = DecodeConfig { decode_budget: 200, window: w, ..DecodeConfig::default() };
    let upload = |t: &HostTensor| {
        stream.clone_htod(&t.to_f32_vec().iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>()).unwrap()
    };
    let (kd, vd, od) = (upload(&kc), upload(&vc), upload(&obs));
    // The scoring kernel this shape would use; no other test of this file launches it.
    let scoring = "ek_compress_stats_mma_f16_d64";
    let before = emu::launches(Some(scoring)).unwrap();
    let (kt, vt, ot) = (
        CudaTensor::bsnd(&kd, &stream, kc.shape),
        CudaTensor::bsnd(&vd, &stream, vc.shape),
        CudaTensor::bsnd(&od, &stream, obs.shape),
    );
    match be.kv_compress_on::<half::f16>(&stream, &kt, &vt, &ot, &cfg) {
        Err(Error::OutOfRange { .. }) => {}
        other => panic!("expected a range error, got {:?}", other.map(|c| c.map(|c| c.shape))),
    }
    assert_eq!(emu::launches(Some(scoring)).unwrap(), before, "nothing may run before the refusal");
    let k = Kernels::from_backend(std::sync::Arc::new(be));
    let got = k.kv_compress(kc.view(), vc.view(), obs.view(), &cfg).unwrap();
    let oracle = Kernels::reference();
    let want = oracle.kv_compress(kc.view(), vc.view(), obs.view(), &cfg).unwrap();
    let args = validate::kv_compress(oracle.capabilities(), kc.view(), vc.view(), obs.view(), &cfg).unwrap();
    common::check_compressed(
        "rows beyond shared memory",
        &got,
        &want,
        &reference::compress_scores(&args),
        (&kc, &vc),
        false,
    );
}

/// Rankings wider than the bitonic sort's first half (base / Bk = 1050 blocks of 4 tokens) and
/// wider than all of its 2048 (blocks of 1 token: ranked by counting among the selected) agree
/// with the oracle's decisions exactly, ties included.
#[test]
fn planning_ranks_wide_rankings_on_the_device() {
    if !common::cuda_kernels_available("planning_ranks_wide_rankings_on_the_device") {
        return;
    }
    let be = emu::backend().expect("the emulated driver loads");
    let k = Kernels::from_backend(std::sync::Arc::new(be));
    let seed = common::seed("cuda_emu_wide_rank");
    for (l, block_size, base_budget, wider_than) in [(4203, 4, 4200, 1024), (2300, 1, 2200, 2048)] {
        let (hq, hkv, d) = (2, 1, 64);
        let q = common::random([1, l, hq, d], 1.0, seed, DType::F32);
        // Keys repeat every 12 tokens: most blocks tie with many others, so the tie rule (lower
        // block first) decides most of the ranking.
        let pattern = synth::normal(12 * hkv * d, 1.0, seed ^ 1);
        let keys: Vec<f32> = (0..l).flat_map(|t| pattern[(t % 12) * hkv * d..][..hkv * d].to_vec()).collect();
        let kk = HostTensor::from_f32(&keys, [1, l, hkv, d], DType::F32);
        let cfg =
            EntropyConfig { segment_size: 64, block_size, threshold_len: 64, base_budget, ..EntropyConfig::default() };
        let before = emu::launches(Some("ek_plan_rank")).unwrap();
        let got = k.plan(q.view(), kk.view(), &cfg, &PlanRequest::layer(0)).unwrap();
        assert!(emu::launches(Some("ek_plan_rank")).unwrap() > before, "the ranking did not run on the device");
        assert!(got.order_width > wider_than, "order width {}", got.order_width);
        let want = Kernels::reference().plan(q.view(), kk.view(), &cfg, &PlanRequest::layer(0)).unwrap();
        assert_eq!(got.keep_blocks, want.keep_blocks, "keep_blocks (width {})", got.order_width);
        assert_eq!(got.order, want.order, "ranking (width {})", got.order_width);
        assert_eq!(got.blocks, want.blocks, "block lists (width {})", got.order_width);
    }
}

/// The first `d` elements of each row of `t` ([B, H, N, D + pad]) as a [B, H, N, d] view.
fn row_prefix(t: &HostTensor, d: usize) -> TensorView<'_> {
    let [b, h, n, dp] = t.shape;
    let strides = [h * n * dp, n * dp, dp, 1];
    match &t.data {
        HostBuffer::F32(x) => TensorView::strided(&x[..], [b, h, n, d], strides),
        HostBuffer::F16(x) => TensorView::strided(&x[..], [b, h, n, d], strides),
        HostBuffer::BF16(x) => TensorView::strided(&x[..], [b, h, n, d], strides),
    }
}

/// Decode loads whole 16-byte vectors where the cache rows allow (`_v8` for 16-bit, `_v4` for
/// f32) and single elements otherwise (`_v1`: padded rows, D not a multiple of the vector), each
/// correct: several splits, per-head lengths down to 1, and 8 query rows per cache head (two of
/// the kernel's 4-row output passes).
#[test]
fn decode_vector_and_element_loads_agree_with_the_oracle() {
    if !common::cuda_kernels_available("decode_vector_and_element_loads_agree_with_the_oracle") {
        return;
    }
    let be = emu::backend().expect("the emulated driver loads");
    let k = Kernels::from_backend(std::sync::Arc::new(be));
    let oracle = Kernels::reference();
    let (b, hq, hc, nq, n) = (2, 8, 2, 2, 700);
    let lengths = [700, 1, 333, 64];
    for (dtype, d, pad, kernel) in [
        (DType::F16, 128, 0, "ek_decode_split_f16_v8"),
        (DType::F32, 64, 0, "ek_decode_split_f32_v4"),
        (DType::BF16, 128, 1, "ek_decode_split_bf16_v1"),
        (DType::BF16, 36, 0, "ek_decode_split_bf16_v1"),
        (DType::F32, 80, 3, "ek_decode_split_f32_v1"),
    ] {
        let tag = format!("{dtype} D {d} pad {pad}");
        let seed = common::seed(&format!("cuda_emu_decode/{tag}"));
        let q = common::random([b, nq, hq, d], 1.0, seed, dtype);
        let kc = common::random([b, hc, n, d + pad], 1.0, seed ^ 1, dtype);
        let vc = common::random([b, hc, n, d + pad], 1.0, seed ^ 2, dtype);
        let before = emu::launches(Some(kernel)).unwrap();
        let mut got = common::poisoned([b, nq, hq, d], dtype);
        k.decode_attention(q.view(), row_prefix(&kc, d), row_prefix(&vc, d), &lengths, None, &mut got.view_mut())
            .unwrap();
        assert!(emu::launches(Some(kernel)).unwrap() > before, "{tag}: {kernel} did not run");
        let mut want = common::poisoned([b, nq, hq, d], dtype);
        oracle
            .decode_attention(q.view(), row_prefix(&kc, d), row_prefix(&vc, d), &lengths, None, &mut want.view_mut())
            .unwrap();
        let err = common::rel_fro(&common::tensor_f64(&got), &common::tensor_f64(&want));
        assert!(err <= common::attn_tol(dtype), "{tag}: rel err {err:e}");
    }
}

/// With one multiprocessor every launch-shape choice takes its large option — 128-row prefill
/// tiles, 64-block planning-logit tiles, few decode splits — where the default 132 takes the
/// small ones at these sizes; decisions and outputs still match the oracle.
#[test]
fn large_launch_shapes_agree_with_the_oracle() {
    if !common::cuda_kernels_available("large_launch_shapes_agree_with_the_oracle") {
        return;
    }
    emu::set_multiprocessors(1).unwrap();
    let be = emu::backend();
    emu::set_multiprocessors(0).unwrap();
    let k = Kernels::from_backend(std::sync::Arc::new(be.expect("the emulated driver loads")));
    let oracle = Kernels::reference();
    let (l, hq, hkv, d, dtype) = (1500, 8, 2, 128, DType::BF16);
    let seed = common::seed("cuda_emu_large_shapes");
    let (q, kk, v) = common::random_qkv([1, l, hq, hkv, d], seed, dtype);
    let cfg =
        EntropyConfig { segment_size: 256, block_size: 8, threshold_len: 256, base_budget: 128, ..Default::default() };
    let req = PlanRequest::layer(0);
    let want = oracle.plan(q.view(), kk.view(), &cfg, &req).unwrap();
    let (logits, prefill) = ("ek_plan_logits_f32", "ek_prefill_mma_bf16_d128_m128");
    let before = (emu::launches(Some(logits)).unwrap(), emu::launches(Some(prefill)).unwrap());
    let mut got = common::poisoned(q.shape, dtype);
    let plan = k.prefill(q.view(), kk.view(), v.view(), &cfg, &req, &mut got.view_mut(), None).unwrap();
    assert!(emu::launches(Some(logits)).unwrap() > before.0 && emu::launches(Some(prefill)).unwrap() > before.1);
    assert_eq!(plan.budgets, want.budgets, "plan budgets");
    assert_eq!(plan.keep_blocks, want.keep_blocks, "plan keep counts");
    assert_eq!(plan.order, want.order, "plan ranking");
    assert_eq!(plan.blocks, want.blocks, "plan block lists");
    let mut exact = common::poisoned(q.shape, dtype);
    oracle.sparse_prefill(q.view(), kk.view(), v.view(), &plan.blocks, None, &mut exact.view_mut(), None).unwrap();
    let err = common::rel_fro(&common::tensor_f64(&got), &common::tensor_f64(&exact));
    assert!(err <= common::attn_tol(dtype), "prefill: rel err {err:e}");

    let (n, lengths) = (1300, [1300, 999]);
    let kc = common::random([1, hkv, n, d], 1.0, seed ^ 3, dtype);
    let vc = common::random([1, hkv, n, d], 1.0, seed ^ 4, dtype);
    let q1 = common::random([1, 1, hq, d], 1.0, seed ^ 5, dtype);
    let mut dec = common::poisoned(q1.shape, dtype);
    k.decode_attention(q1.view(), kc.view(), vc.view(), &lengths, None, &mut dec.view_mut()).unwrap();
    let mut exact = common::poisoned(q1.shape, dtype);
    oracle.decode_attention(q1.view(), kc.view(), vc.view(), &lengths, None, &mut exact.view_mut()).unwrap();
    let err = common::rel_fro(&common::tensor_f64(&dec), &common::tensor_f64(&exact));
    assert!(err <= common::attn_tol(dtype), "decode: rel err {err:e}");
}

/// The device planner and the CPU backend's compute the same bits (`src/numerics.rs` /
/// `cuda/numerics.cuh`): logits, distributions, entropies and every decision, on head dims with
/// and without a tail past the vector width, GQA and MHA, with layer fusion — so a rounding moved
/// on either side (a sum reordered, a division rescaled, a representative's dim dropped) fails
/// here even where the oracle's tolerances would let it pass.
#[test]
fn device_and_cpu_plans_agree_bit_for_bit() {
    if !common::cuda_kernels_available("device_and_cpu_plans_agree_bit_for_bit") {
        return;
    }
    let device = Kernels::from_backend(std::sync::Arc::new(emu::backend().expect("the emulated driver loads")));
    let cpu = Kernels::cpu();
    let seed = common::seed("device_and_cpu_plans_agree_bit_for_bit");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    for (i, &(l, hq, hkv, d, dtype)) in
        [(300, 4, 2, 36, DType::F32), (517, 6, 2, 72, DType::BF16), (260, 2, 2, 128, DType::F16)].iter().enumerate()
    {
        let q = common::random([1, l, hq, d], 1.0, seed ^ i as u64, dtype);
        let k = common::random([1, l, hkv, d], 1.0, seed ^ 0x51 ^ i as u64, dtype);
        let cfg = EntropyConfig {
            segment_size: 64,
            block_size: 8,
            threshold_len: 64,
            base_budget: 48,
            layer_fusion: true,
            ..EntropyConfig::default()
        };
        let first = cpu.plan(q.view(), k.view(), &cfg, &PlanRequest::layer(0)).unwrap();
        for req in [PlanRequest::layer(0), PlanRequest::layer(2).with_prev(&first.scores)] {
            let tag = format!("L {l} Hq {hq} Hkv {hkv} D {d} {dtype} layer {}", req.layer_idx);
            let want = cpu.plan(q.view(), k.view(), &cfg, &req).unwrap();
            let got = device.plan(q.view(), k.view(), &cfg, &req).unwrap();
            assert_eq!(bits(&got.logits), bits(&want.logits), "{tag}: logits");
            assert_eq!(bits(&got.scores), bits(&want.scores), "{tag}: distributions");
            assert_eq!(bits(&got.entropy), bits(&want.entropy), "{tag}: entropies");
            assert_eq!(got.head_class, want.head_class, "{tag}: head classes");
            assert_eq!(got.budgets, want.budgets, "{tag}: budgets");
            assert_eq!(got.order, want.order, "{tag}: ranking");
            assert_eq!(got.blocks, want.blocks, "{tag}: block lists");
        }
    }
}

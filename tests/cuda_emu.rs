//! The emulated CUDA driver (`cuda-emu`): every rule it enforces is caught when planted, correct
//! code passes with the values CUDA defines, and the backend on it really launches kernels.
#![cfg(feature = "cuda-emu")]

mod common;

use entropy_kernels::cuda::emu;
use entropy_kernels::{reference, validate, *};

/// CUresult codes the emulated driver returns (cuda.h).
const INVALID_VALUE: i32 = 1;
const ILLEGAL_ADDRESS: i32 = 700;
const LAUNCH_FAILED: i32 = 719;

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
}

#[test]
fn the_backend_runs_its_kernels_on_the_emulator() {
    let Some(be) = common::cuda_backend("cuda_emu") else { panic!("cuda-emu must give a CUDA backend") };
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
    let Some(be) = common::cuda_backend("cuda_emu_compress") else { panic!("cuda-emu must give a CUDA backend") };
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
        common::check_compressed(&tag, &got, &want, &scores, &kc, false);
    }
}

//! The candle ops on candle CUDA tensors (feature `candle-cuda`): planning, sparse and dense
//! prefill, compression and decode on the tensors' device memory, against the f64 oracle and the
//! CPU backend's decisions. Needs a GPU; prints why it is skipped otherwise.
#![cfg(feature = "candle-cuda")]

mod common;

use candle_core::{DType as CDType, Device, Tensor};
use common::*;
use entropy_kernels::candle as ek;
use entropy_kernels::*;

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            // candle's errors carry a backtrace: its first line says why.
            eprintln!("SKIP: no CUDA device for candle: {}", e.to_string().lines().next().unwrap_or(""));
            None
        }
    }
}

fn host(t: &Tensor, dtype: DType) -> HostTensor {
    let dims: [usize; 4] = t.dims().try_into().unwrap();
    let v = t.to_dtype(CDType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    HostTensor::from_f32(&v, dims, dtype)
}

fn candle_dtype(d: DType) -> CDType {
    match d {
        DType::F32 => CDType::F32,
        DType::F16 => CDType::F16,
        DType::BF16 => CDType::BF16,
    }
}

#[test]
fn every_op_on_candle_cuda_tensors_matches_the_oracle() {
    let Some(dev) = gpu() else { return };
    let seed = seed("candle_cuda");
    let cpu = Kernels::cpu();
    let oracle = Kernels::reference();
    let (l, hq, hkv, d) = (333, 8, 2, 128);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let t = |shape: (usize, usize, usize, usize), s: u64| {
            let n = shape.0 * shape.1 * shape.2 * shape.3;
            let x = Tensor::from_vec(synth::normal(n, 1.0, seed ^ s), shape, &dev).unwrap();
            x.to_dtype(candle_dtype(dtype)).unwrap()
        };
        // q stored [B, Hq, L, D], seen BSND through a transpose (strided, no copy).
        let q = t((1, hq, l, d), 1).transpose(1, 2).unwrap();
        let (k, v) = (t((1, l, hkv, d), 2), t((1, l, hkv, d), 3));
        let (hq_, hk, hv) = (host(&q, dtype), host(&k, dtype), host(&v, dtype));
        let cfg =
            EntropyConfig { segment_size: 64, block_size: 8, threshold_len: 64, base_budget: 32, ..Default::default() };

        // Planning on the device decides exactly what the CPU backend decides.
        let (out, plan) = ek::prefill(&cpu, &q, &k, &v, &cfg, &PlanRequest::layer(0)).unwrap();
        assert!(out.device().is_cuda(), "the output stays on the device");
        let want_plan = cpu.plan(hq_.view(), hk.view(), &cfg, &PlanRequest::layer(0)).unwrap();
        assert_eq!(plan.blocks, want_plan.blocks, "{dtype:?}: plan");
        assert!(plan.blocks.sparse_units() > 0);
        let mut exact = poisoned(hq_.shape, dtype);
        oracle
            .sparse_prefill(hq_.view(), hk.view(), hv.view(), &plan.blocks, None, &mut exact.view_mut(), None)
            .unwrap();
        let err = rel_fro(&tensor_f64(&host(&out, dtype)), &tensor_f64(&exact));
        assert!(err <= attn_tol(dtype), "{dtype:?}: sparse prefill rel err {err:e}");

        let dense = ek::dense_prefill(&cpu, &q, &k, &v, None).unwrap();
        let mut exact = poisoned(hq_.shape, dtype);
        oracle.dense_prefill(hq_.view(), hk.view(), hv.view(), None, &mut exact.view_mut(), None).unwrap();
        let err = rel_fro(&tensor_f64(&host(&dense, dtype)), &tensor_f64(&exact));
        assert!(err <= attn_tol(dtype), "{dtype:?}: dense prefill rel err {err:e}");

        // Compression of [B, Hkv, N, D] caches seen through a transpose of the BSND k/v.
        let (kc, vc) = (k.transpose(1, 2).unwrap(), v.transpose(1, 2).unwrap());
        let obs = q.narrow(1, l - 16, 16).unwrap().transpose(1, 2).unwrap();
        let dcfg = DecodeConfig { decode_budget: 128, window: 16, ..Default::default() };
        let c = ek::kv_compress(&cpu, &kc, &vc, &obs, &dcfg).unwrap();
        let want = oracle
            .kv_compress(host(&kc, dtype).view(), host(&vc, dtype).view(), host(&obs, dtype).view(), &dcfg)
            .unwrap();
        assert!(c.compressed && c.k.device().is_cuda());
        assert_eq!(c.indices, want.indices, "{dtype:?}: kept positions");
        assert_eq!(host(&c.k, dtype), want.k, "{dtype:?}: gathered keys");

        // Decode over the compressed cache.
        let qn = t((1, 1, hq, d), 4);
        let o = ek::decode_attention(&cpu, &qn, &c.k, &c.v, &c.lengths, None).unwrap();
        let mut exact = poisoned([1, 1, hq, d], dtype);
        oracle
            .decode_attention(
                host(&qn, dtype).view(),
                host(&c.k, dtype).view(),
                host(&c.v, dtype).view(),
                &c.lengths,
                None,
                &mut exact.view_mut(),
            )
            .unwrap();
        let err = rel_fro(&tensor_f64(&host(&o, dtype)), &tensor_f64(&exact));
        assert!(err <= attn_tol(dtype), "{dtype:?}: decode rel err {err:e}");
        eprintln!("{dtype:?}: plan, sparse/dense prefill, kv_compress and decode on candle CUDA tensors agree");
    }
}

#[test]
fn mixed_devices_and_bad_shapes_are_errors() {
    let Some(dev) = gpu() else { return };
    let cpu = Kernels::cpu();
    let q = Tensor::zeros((1, 64, 4, 64), CDType::F16, &dev).unwrap();
    let k = Tensor::zeros((1, 64, 3, 64), CDType::F16, &dev).unwrap();
    let e = ek::dense_prefill(&cpu, &q, &k, &k, None).unwrap_err();
    assert!(e.to_string().contains("multiple of key/value heads"), "{e}");
    let kh = Tensor::zeros((1, 64, 2, 64), CDType::F16, &Device::Cpu).unwrap();
    assert!(ek::dense_prefill(&cpu, &q, &kh, &kh, None).is_err(), "CPU k/v with CUDA q");
}

/// Beyond the device kernels (AdaKV's allocation) the candle ops go through host copies and still
/// answer on the device, equal to the oracle's selection; more than 1024 kept positions (once a
/// fallback too) run on the device's radix selection and must agree as well.
#[test]
fn compression_beyond_the_device_kernels_falls_back_to_the_host() {
    let Some(dev) = gpu() else { return };
    let seed = seed("candle_cuda_fallback");
    let (n, hq, hkv, d, w) = (1500usize, 4usize, 2usize, 64usize, 16usize);
    let t = |shape: (usize, usize, usize, usize), s: u64| {
        let len = shape.0 * shape.1 * shape.2 * shape.3;
        Tensor::from_vec(synth::normal(len, 1.0, seed ^ s), shape, &dev).unwrap()
    };
    let (kc, vc, obs) = (t((1, hkv, n, d), 1), t((1, hkv, n, d), 2), t((1, hq, w, d), 3));
    let oracle = Kernels::reference();
    for cfg in [
        DecodeConfig { decode_budget: 1100, window: w, ..Default::default() },
        DecodeConfig {
            decode_budget: 300,
            window: w,
            head_budget: HeadBudget::AdaKv { floor_fraction: 0.2 },
            ..Default::default()
        },
    ] {
        let c = ek::kv_compress(&Kernels::cpu(), &kc, &vc, &obs, &cfg).unwrap();
        assert!(c.k.device().is_cuda(), "the result is back on the device");
        let want = oracle
            .kv_compress(
                host(&kc, DType::F32).view(),
                host(&vc, DType::F32).view(),
                host(&obs, DType::F32).view(),
                &cfg,
            )
            .unwrap();
        assert_eq!(c.indices, want.indices, "{:?}", cfg.head_budget);
        assert_eq!(c.lengths, want.lengths);
    }
}

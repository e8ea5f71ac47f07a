//! The candle integration against the host API on the same data: strided candle tensors (a
//! transpose, a narrow) give the results the kernels give on contiguous copies.

mod common;

use candle_core::{DType as CDType, Device, Tensor};
use common::*;
use entropy_kernels::candle as ek;
use entropy_kernels::*;

fn host(t: &Tensor) -> HostTensor {
    let dims: [usize; 4] = t.dims().try_into().unwrap();
    HostTensor::from_f32(
        &t.to_dtype(CDType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        dims,
        DType::F32,
    )
}

#[test]
fn prefill_compress_and_decode_on_candle_tensors() {
    let seed = seed("candle_ops");
    let dev = Device::Cpu;
    let kernels = Kernels::cpu();
    let (l, hq, hkv, d) = (300, 4, 2, 64);
    let t = |shape: (usize, usize, usize, usize), s: u64| {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Tensor::from_vec(synth::normal(n, 1.0, seed ^ s), shape, &dev).unwrap()
    };
    // q stored [B, Hq, L, D] and seen BSND through a transpose (strided, no copy).
    let q = t((1, hq, l, d), 1).transpose(1, 2).unwrap();
    let (k, v) = (t((1, l, hkv, d), 2), t((1, l, hkv, d), 3));
    let cfg =
        EntropyConfig { segment_size: 64, block_size: 8, threshold_len: 64, base_budget: 32, ..Default::default() };
    let (out, plan) = ek::prefill(&kernels, &q, &k, &v, &cfg, &PlanRequest::layer(0)).unwrap();
    assert!(plan.blocks.sparse_units() > 0);
    let (hq_, hk, hv) = (host(&q), host(&k), host(&v));
    let want_plan = kernels.plan(hq_.view(), hk.view(), &cfg, &PlanRequest::layer(0)).unwrap();
    assert_eq!(plan.blocks, want_plan.blocks);
    let mut want = HostTensor::zeros(DType::F32, hq_.shape);
    kernels.sparse_prefill(hq_.view(), hk.view(), hv.view(), &plan.blocks, None, &mut want.view_mut(), None).unwrap();
    assert_eq!(host(&out), want, "candle op and host call must agree exactly");
    let dense = ek::dense_prefill(&kernels, &q, &k, &v, None).unwrap();
    assert_eq!(dense.dims(), q.dims());

    // Compression of [B, Hkv, N, D] caches seen through a transpose of the BSND k/v.
    let (kc, vc) = (k.transpose(1, 2).unwrap(), v.transpose(1, 2).unwrap());
    let obs = q.narrow(1, l - 16, 16).unwrap().transpose(1, 2).unwrap();
    let dcfg = DecodeConfig { decode_budget: 128, window: 16, ..Default::default() };
    let c = ek::kv_compress(&kernels, &kc, &vc, &obs, &dcfg).unwrap();
    let want = kernels.kv_compress(host(&kc).view(), host(&vc).view(), host(&obs).view(), &dcfg).unwrap();
    assert_eq!(c.indices, want.indices);
    assert_eq!(host(&c.k), want.k);

    // Decode over the compressed cache, f16.
    let qn = t((1, 1, hq, d), 4).to_dtype(CDType::F16).unwrap();
    let (ck, cv) = (c.k.to_dtype(CDType::F16).unwrap(), c.v.to_dtype(CDType::F16).unwrap());
    let o = ek::decode_attention(&kernels, &qn, &ck, &cv, &c.lengths, None).unwrap();
    assert_eq!(o.dtype(), CDType::F16);
    let mut exact = HostTensor::zeros(DType::F16, [1, 1, hq, d]);
    let (hqn, hck, hcv) = (host(&qn).cast(DType::F16), host(&ck).cast(DType::F16), host(&cv).cast(DType::F16));
    Kernels::reference()
        .decode_attention(hqn.view(), hck.view(), hcv.view(), &c.lengths, None, &mut exact.view_mut())
        .unwrap();
    let err = rel_fro(&tensor_f64(&host(&o)), &tensor_f64(&exact));
    assert!(err <= attn_tol(DType::F16), "decode f16 rel err {err:e}");
}

#[test]
fn bad_tensors_are_errors_not_panics() {
    let dev = Device::Cpu;
    let kernels = Kernels::cpu();
    let rank3 = Tensor::zeros((4, 8, 16), CDType::F32, &dev).unwrap();
    assert!(ek::dense_prefill(&kernels, &rank3, &rank3, &rank3, None).is_err());
    let ints = Tensor::zeros((1, 8, 2, 16), CDType::U32, &dev).unwrap();
    assert!(ek::dense_prefill(&kernels, &ints, &ints, &ints, None).is_err());
    let q = Tensor::zeros((1, 8, 3, 16), CDType::F32, &dev).unwrap();
    let k = Tensor::zeros((1, 8, 2, 16), CDType::F32, &dev).unwrap();
    let e = ek::dense_prefill(&kernels, &q, &k, &k, None).unwrap_err();
    assert!(e.to_string().contains("multiple of key/value heads"), "{e}");
}

/// A decode step's margin (top-1 − top-2 log-probability) and deficit (chosen − reference
/// log-probability) are differences of logits, so they can be checked by hand.
#[test]
fn decode_step_margin_and_deficit() {
    use entropy_kernels::candle::methods::Step;
    let logits = Tensor::new(&[1.0f32, 3.0, 2.5, -1.0], &Device::Cpu).unwrap();
    let s = Step::from_logits(&logits, Some(2)).unwrap();
    assert_eq!(s.token, 1);
    assert!((s.margin - 0.5).abs() < 1e-5 && (s.deficit - 0.5).abs() < 1e-5, "{s:?}");
    let s = Step::from_logits(&logits, Some(0)).unwrap();
    assert!((s.deficit - 2.0).abs() < 1e-5, "{s:?}");
    assert_eq!(Step::from_logits(&logits, Some(1)).unwrap().deficit, 0.0);
    assert_eq!(Step::from_logits(&logits, None).unwrap().deficit, 0.0);
}

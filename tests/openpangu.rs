//! openPangu's attention shapes (`entropy_kernels::shapes`: Embedded-1B GQA 12/6, -7B GQA 32/8,
//! D 128) on every backend against the oracle: a planned sparse prefill with LSE, a dense
//! prefill, the latent compression and decode over the compacted cache, in f32, f16 and bf16.
//! Lengths are kept small (the shapes' head counts and dims are the model's; 32K contexts are
//! `demo --model` / `bench --model` material). Seeds are printed for replay.

mod common;

use common::*;
use entropy_kernels::shapes::{MODELS, ModelShape};
use entropy_kernels::*;

fn check_shape(m: ModelShape, tokens: usize, test: &str) {
    let oracle = Kernels::reference();
    let seed = seed(test);
    let cfg =
        EntropyConfig { segment_size: 64, block_size: 16, threshold_len: 128, base_budget: 32, ..Default::default() };
    for kernels in backends_under_test(test) {
        for dtype in DType::ALL {
            let s = seed ^ dtype as u64;
            let tag = format!("{} on {} ({dtype}, seed {s:#x})", m.name, kernels.describe());
            let (hq, hkv, d) = (m.q_heads, m.kv_heads, m.head_dim);
            let q = random([1, tokens, hq, d], 1.0, s, dtype);
            let k = random([1, tokens, hkv, d], 1.0, s ^ 1, dtype);
            let v = random([1, tokens, hkv, d], 1.0, s ^ 2, dtype);

            // Sparse prefill on the oracle's plan (decisions are checked by the matrix), with LSE.
            let plan = oracle.plan(q.view(), k.view(), &cfg, &PlanRequest::layer(0)).unwrap();
            let (mut got, mut want) = (poisoned(q.shape, dtype), poisoned(q.shape, dtype));
            let (mut lse_got, mut lse_want) = (vec![f32::NAN; hq * tokens], vec![f32::NAN; hq * tokens]);
            kernels
                .sparse_prefill(
                    q.view(),
                    k.view(),
                    v.view(),
                    &plan.blocks,
                    None,
                    &mut got.view_mut(),
                    Some(&mut lse_got),
                )
                .unwrap();
            oracle
                .sparse_prefill(
                    q.view(),
                    k.view(),
                    v.view(),
                    &plan.blocks,
                    None,
                    &mut want.view_mut(),
                    Some(&mut lse_want),
                )
                .unwrap();
            let err = rel_fro(&tensor_f64(&got), &tensor_f64(&want));
            assert!(err <= attn_tol(dtype), "{tag}: sparse prefill rel err {err:e}");
            let lse_err = lse_got.iter().zip(&lse_want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(lse_err <= 1e-2, "{tag}: LSE max abs err {lse_err:e}");

            let (mut got, mut want) = (poisoned(q.shape, dtype), poisoned(q.shape, dtype));
            kernels.dense_prefill(q.view(), k.view(), v.view(), None, &mut got.view_mut(), None).unwrap();
            oracle.dense_prefill(q.view(), k.view(), v.view(), None, &mut want.view_mut(), None).unwrap();
            let err = rel_fro(&tensor_f64(&got), &tensor_f64(&want));
            assert!(err <= attn_tol(dtype), "{tag}: dense prefill rel err {err:e}");

            // The latent compression of the prompt's cache, then decode over it.
            let kc = random([1, hkv, tokens, d], 1.0, s ^ 3, dtype);
            let vc = random([1, hkv, tokens, d], 1.0, s ^ 4, dtype);
            let w = 8;
            let obs = random([1, hq, w, d], 1.0, s ^ 5, dtype);
            let dc = DecodeConfig { decode_budget: tokens / 2, window: w, ..DecodeConfig::latent() };
            let got = kernels.kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
            let want = oracle.kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
            let args = validate::kv_compress(oracle.capabilities(), kc.view(), vc.view(), obs.view(), &dc).unwrap();
            let scores = reference::compress_scores(&args);
            check_compressed(&tag, &got, &want, &scores, (&kc, &vc), false);

            let q1 = random([1, 1, hq, d], 1.0, s ^ 6, dtype);
            let (mut got1, mut want1) = (poisoned(q1.shape, dtype), poisoned(q1.shape, dtype));
            let lengths = want.lengths.clone();
            kernels
                .decode_attention(q1.view(), want.k.view(), want.v.view(), &lengths, None, &mut got1.view_mut())
                .unwrap();
            oracle
                .decode_attention(q1.view(), want.k.view(), want.v.view(), &lengths, None, &mut want1.view_mut())
                .unwrap();
            let err = rel_fro(&tensor_f64(&got1), &tensor_f64(&want1));
            assert!(err <= attn_tol(dtype), "{tag}: decode rel err {err:e}");
        }
    }
}

#[test]
fn openpangu_embedded_1b_on_every_backend() {
    assert_eq!((MODELS[0].q_heads, MODELS[0].kv_heads, MODELS[0].head_dim), (12, 6, 128));
    check_shape(MODELS[0], 200, "openpangu_embedded_1b_on_every_backend");
}

#[test]
fn openpangu_embedded_7b_on_every_backend() {
    assert_eq!((MODELS[1].q_heads, MODELS[1].kv_heads, MODELS[1].head_dim, MODELS[1].context), (32, 8, 128, 32768));
    check_shape(MODELS[1], 136, "openpangu_embedded_7b_on_every_backend");
}

#[test]
fn unknown_model_names_are_typed_errors() {
    match ModelShape::by_name("openpangu-3b") {
        Err(e @ Error::OutOfRange { .. }) => assert!(e.to_string().contains("openpangu-1b"), "{e}"),
        other => panic!("expected OutOfRange, got {other:?}"),
    }
}

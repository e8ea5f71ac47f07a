//! openPangu's attention shapes (`entropy_kernels::shapes`: Embedded-1B GQA 12/6, -7B GQA 32/8,
//! D 128) on every backend against the oracle (`common::suite::run_all`): planning, sparse (both
//! budget modes) and dense prefill with LSE element by element, the latent compression of the
//! prompt's cache and decode over it, in f32, f16 and bf16. Lengths are kept small (the shapes'
//! head counts and dims are the model's; 32K contexts are `demo --model` / `bench --model`
//! material). Seeds are printed for replay.

mod common;

use common::*;
use entropy_kernels::shapes::{MODELS, ModelShape};
use entropy_kernels::*;

fn check_shape(m: ModelShape, tokens: usize, test: &str) {
    let seed = seed(test);
    let cfg =
        EntropyConfig { segment_size: 64, block_size: 16, threshold_len: 128, base_budget: 32, ..Default::default() };
    let dc = DecodeConfig { decode_budget: tokens / 2, window: 8, ..DecodeConfig::latent() };
    let backends = backends_under_test(test);
    for dtype in DType::ALL {
        let s = seed ^ dtype as u64;
        let (q, k, v) = random_qkv([1, tokens, m.q_heads, m.kv_heads, m.head_dim], s, dtype);
        suite::run_all(&format!("{} ({dtype}, seed {s:#x})", m.name), &backends, (&q, &k, &v), &cfg, &dc, s);
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

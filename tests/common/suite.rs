//! Every operation once on given inputs against the oracle: plans equal (decisions exactly, maps
//! within f32 rounding), sparse (both budget modes) and dense prefill element by element with
//! their LSEs, every compression mode (near-ties allowed), decode element by element. The
//! conformance tests run it on plain random inputs of each case's shapes and configuration.

use super::check;
use super::{check_compressed, random, runs, runs_on};
use entropy_kernels::reference;
use entropy_kernels::*;

/// Plans agree: every decision exactly, logits, scores and entropy within f32 rounding.
pub fn check_plans(tag: &str, got: &Plan, want: &Plan) {
    assert_eq!(got.keep_blocks, want.keep_blocks, "{tag}: keep_blocks");
    assert_eq!(got.segment_topk, want.segment_topk, "{tag}: segment_topk");
    assert_eq!(got.head_class, want.head_class, "{tag}: head classes");
    assert_eq!(got.budgets, want.budgets, "{tag}: budgets");
    assert_eq!(got.order_width, want.order_width, "{tag}: order width");
    assert_eq!(got.order, want.order, "{tag}: ranking");
    assert_eq!(got.blocks, want.blocks, "{tag}: block lists");
    let worst = |a: &[f32], b: &[f32]| {
        a.iter().zip(b).map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() }).fold(0f32, f32::max)
    };
    assert_eq!(got.logits.len(), want.logits.len(), "{tag}: logits length");
    let lmax = want.logits.iter().filter(|x| x.is_finite()).fold(0f32, |m, x| m.max(x.abs())).max(1.0);
    assert!(worst(&got.logits, &want.logits) <= 1e-6 * lmax, "{tag}: logits");
    assert!(worst(&got.scores, &want.scores) <= 1e-6, "{tag}: scores");
    assert!(worst(&got.entropy, &want.entropy) <= 1e-5, "{tag}: entropy");
}

/// Prefill on `kernels` with NaN-poisoned output and LSE.
pub fn prefill(
    kernels: &Kernels,
    q: TensorView,
    k: TensorView,
    v: TensorView,
    blocks: Option<&BlockLists>,
) -> (HostTensor, Vec<f32>) {
    let mut out = super::poisoned(q.shape(), q.dtype());
    let [b, l, hq, _] = q.shape();
    let mut lse = vec![f32::NAN; b * hq * l];
    match blocks {
        Some(bl) => kernels.sparse_prefill(q, k, v, bl, None, &mut out.view_mut(), Some(&mut lse)).unwrap(),
        None => kernels.dense_prefill(q, k, v, None, &mut out.view_mut(), Some(&mut lse)).unwrap(),
    }
    (out, lse)
}

/// `[B, L, H, D]` seen as the `[B, H, L, D]` cache it becomes (no copy).
pub fn cache_view(t: &HostTensor) -> TensorView<'_> {
    t.view().transpose(1, 2).expect("dims 1 and 2 swap")
}

/// Every operation on `q, k, v` with `cfg` and `dcfg` on each of `backends`, against the oracle
/// (its answers computed once). `seed` draws the window and decode queries.
pub fn run_all(
    tag: &str,
    backends: &[Kernels],
    qkv: (&HostTensor, &HostTensor, &HostTensor),
    cfg: &EntropyConfig,
    dcfg: &DecodeConfig,
    seed: u64,
) {
    let (q, k, v) = qkv;
    let oracle = Kernels::reference();
    let dtype = q.dtype();
    let want = oracle.plan(q.view(), k.view(), cfg, &PlanRequest::layer(0)).unwrap();
    let per_head = want.block_lists(BudgetMode::PerHead, cfg.threshold_len);
    let seg_max = want.block_lists(BudgetMode::SegmentMax, cfg.threshold_len);
    let modes = [("per_head", Some(&per_head)), ("segment_max", Some(&seg_max)), ("dense", None)];
    let exacts: Vec<check::Exact> =
        modes.iter().map(|(_, lists)| check::exact_prefill(q.view(), k.view(), v.view(), *lists)).collect();
    let [b, _, hq, d] = q.shape;
    let obs = random([b, hq, dcfg.window, d], 1.0, seed ^ 0x5eed, dtype);
    let (k_cache, v_cache) = (super::contiguous(&cache_view(k)), super::contiguous(&cache_view(v)));
    let compressed = oracle.kv_compress(cache_view(k), cache_view(v), obs.view(), dcfg).unwrap();
    let args = validate::kv_compress(oracle.capabilities(), cache_view(k), cache_view(v), obs.view(), dcfg).unwrap();
    let scores = reference::compress_scores(&args);
    let qn = random([b, 2, hq, d], 1.0, seed ^ 0xdec0de, dtype);

    for kernels in backends {
        let kind = kernels.kind();
        let tag = format!("{tag} on {kind}");
        if runs(&tag, kernels, Op::Plan) {
            let got = kernels.plan(q.view(), k.view(), cfg, &PlanRequest::layer(0)).unwrap();
            check_plans(&format!("{tag} plan"), &got, &want);
        }
        if runs_on(&tag, kernels, Op::Prefill, dtype) {
            for ((mode, lists), exact) in modes.iter().zip(&exacts) {
                let what = format!("{tag} prefill {mode}");
                let got = prefill(kernels, q.view(), k.view(), v.view(), *lists);
                check::check_out(&what, kind, &got.0, exact);
                check::check_lse(&what, &got.1, exact);
            }
        }
        let ctag = format!("{tag} compress");
        let cache = if runs(&ctag, kernels, Op::KvCompress) {
            let got = kernels.kv_compress(cache_view(k), cache_view(v), obs.view(), dcfg).unwrap();
            check_compressed(
                &ctag,
                &got,
                &compressed,
                &scores,
                (&k_cache, &v_cache),
                dcfg.head_budget != HeadBudget::Uniform,
            );
            got
        } else {
            compressed.clone()
        };
        if runs(&ctag, kernels, Op::Decode) {
            let mut out = super::poisoned(qn.shape, dtype);
            kernels
                .decode_attention(qn.view(), cache.k.view(), cache.v.view(), &cache.lengths, None, &mut out.view_mut())
                .unwrap();
            let exact = check::exact_decode(qn.view(), cache.k.view(), cache.v.view(), &cache.lengths);
            check::check_out(&format!("{ctag} decode"), kind, &out, &exact);
        }
    }
}

//! The case matrix: every available backend against the f64 oracle on fresh random inputs —
//! MHA/GQA/MQA, head dims 64/80/128, odd lengths with a partial last segment, L = S and L < S,
//! batch > 1, strided (fused-QKV) inputs, f32/f16/bf16 — for planning (both budget modes and
//! layer fusion), sparse and dense prefill with LSE, every compression mode, and decode. Outputs
//! are checked element by element and LSEs row by row (`common::check`); planted shapes also run
//! on plain random inputs; `ENTROPY_KERNELS_SOAK=N` runs every case on N seeds.

#![allow(clippy::needless_range_loop)]

mod common;

use common::check;
use common::suite::check_plans;
use common::*;
use entropy_kernels::reference::{self};
use entropy_kernels::validate;
use entropy_kernels::*;

#[derive(Clone, Copy, Debug)]
struct Shape {
    batch: usize,
    len: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    segment: usize,
    block: usize,
    threshold: usize,
    base: usize,
    /// Planted rigid/dynamic heads instead of plain noise.
    planted: bool,
    /// q/k/v as views into one fused QKV buffer.
    fused_qkv: bool,
}

/// BSND q, k, v (possibly strided views into one fused buffer).
struct Inputs {
    buf: HostTensor,
    shape: Shape,
}

impl Inputs {
    fn new(s: Shape, dtype: DType, seed: u64) -> Self {
        let heads = s.q_heads + 2 * s.kv_heads;
        let d = s.head_dim;
        let (q, k, v) = if s.planted {
            let p = synth::planted(&synth::PlantedSpec {
                batch: s.batch,
                seq_len: s.len,
                q_heads: s.q_heads,
                kv_heads: s.kv_heads,
                head_dim: d,
                block_size: s.block,
                segment_size: s.segment,
                rigid_fraction: 0.5,
                seed,
            });
            (p.q, p.k, p.v)
        } else {
            (
                synth::normal(s.batch * s.len * s.q_heads * d, 1.0, seed),
                synth::normal(s.batch * s.len * s.kv_heads * d, 1.0, seed ^ 7),
                synth::normal(s.batch * s.len * s.kv_heads * d, 1.0, seed ^ 11),
            )
        };
        // Interleave into [B, L, Hq + 2·Hkv, D]: q heads, then k heads, then v heads.
        let mut all = vec![0f32; s.batch * s.len * heads * d];
        for bt in 0..s.batch * s.len {
            let dst = &mut all[bt * heads * d..(bt + 1) * heads * d];
            dst[..s.q_heads * d].copy_from_slice(&q[bt * s.q_heads * d..(bt + 1) * s.q_heads * d]);
            let kd = s.kv_heads * d;
            dst[s.q_heads * d..s.q_heads * d + kd].copy_from_slice(&k[bt * kd..(bt + 1) * kd]);
            dst[s.q_heads * d + kd..].copy_from_slice(&v[bt * kd..(bt + 1) * kd]);
        }
        Inputs { buf: HostTensor::from_f32(&all, [s.batch, s.len, heads, d], dtype), shape: s }
    }

    /// (q, k, v): strided views into the fused buffer, or contiguous copies.
    fn views(&self) -> (HostTensor, HostTensor, HostTensor) {
        let s = self.shape;
        let all = self.buf.to_f32_vec();
        let heads = s.q_heads + 2 * s.kv_heads;
        let d = s.head_dim;
        let pick = |from: usize, n: usize| {
            let mut out = Vec::with_capacity(s.batch * s.len * n * d);
            for bt in 0..s.batch * s.len {
                out.extend_from_slice(&all[(bt * heads + from) * d..(bt * heads + from + n) * d]);
            }
            HostTensor::from_f32(&out, [s.batch, s.len, n, d], self.buf.dtype())
        };
        (pick(0, s.q_heads), pick(s.q_heads, s.kv_heads), pick(s.q_heads + s.kv_heads, s.kv_heads))
    }
}

/// A view of heads `from..from + n` of the fused buffer.
fn fused_view(buf: &HostTensor, from: usize, n: usize) -> TensorView<'_> {
    let [b, l, heads, d] = buf.shape;
    let strides = [l * heads * d, heads * d, d, 1];
    let off = from * d;
    match &buf.data {
        HostBuffer::F32(x) => TensorView::strided(&x[off..], [b, l, n, d], strides),
        HostBuffer::F16(x) => TensorView::strided(&x[off..], [b, l, n, d], strides),
        HostBuffer::BF16(x) => TensorView::strided(&x[off..], [b, l, n, d], strides),
    }
}

fn config(s: &Shape) -> EntropyConfig {
    EntropyConfig {
        segment_size: s.segment,
        block_size: s.block,
        threshold_len: s.threshold,
        base_budget: s.base,
        ..Default::default()
    }
}

/// Outputs element by element and LSEs row by row against the f64 oracle (see `common::check`).
fn check_attention(tag: &str, kernels: &Kernels, got: &(HostTensor, Vec<f32>), exact: &check::Exact) {
    assert!(got.0.to_f32_vec().iter().all(|x| x.is_finite()), "{tag}: output has unwritten (NaN) or non-finite values");
    check_output(tag, kernels, &got.0, exact);
    check::check_lse(tag, &got.1, exact);
}

/// The element-wise check at the `P·V` precision the backend declares (`low_precision_pv`).
fn check_output(tag: &str, kernels: &Kernels, got: &HostTensor, exact: &check::Exact) {
    if let Err(e) = check::compare_out_with(tag, check::pv_dtype_of(kernels, got.dtype()), got, exact) {
        panic!("{e}");
    }
}

fn run_shape(kind: BackendKind, name: &str, s: Shape) {
    let test = format!("matrix::{name}_{kind}");
    run_on(&test, open(&test, kind).map_err(|e| format!("SKIP: {e}")), s)
}

/// The CPU backend on one ISA path (`cpu` runs the best one this CPU has).
fn run_shape_cpu_isa(name: &str, isa: entropy_kernels::cpu::Isa, s: Shape) {
    let test = format!("matrix::{name}_cpu_{}", isa.name());
    run_on(&test, cpu_isa(isa), s)
}

/// The CUDA backend with every tensor-core prefill on 128-row tiles (auto picks 64 rows for
/// these small grids).
#[cfg(feature = "_cuda")]
fn run_shape_cuda_m128(name: &str, s: Shape) {
    let test = format!("matrix::{name}_cuda_m128");
    run_on(&test, open_cuda_tiled(&test, entropy_kernels::cuda::PrefillTile::M128).map_err(|e| format!("SKIP: {e}")), s)
}

/// Every dtype and seed (`ENTROPY_KERNELS_SOAK=N`: N seeds), on the shape's inputs and — for
/// planted shapes — on plain random inputs too, where a bug in one row is not drowned by a sink.
fn run_on(test: &str, kernels: Result<Kernels, String>, s: Shape) {
    let kernels = match kernels {
        Ok(k) => k,
        Err(e) => {
            skip_notice(&e, test);
            return;
        }
    };
    for dtype in DType::ALL {
        for seed in seeds(&format!("{test}/{dtype}")) {
            for planted in if s.planted { vec![true, false] } else { vec![false] } {
                let inputs = if planted { "planted" } else { "random" };
                let tag = format!("{test}/{dtype} {inputs} seed={seed} (replay: ENTROPY_KERNELS_SEED={seed})");
                with_case(&tag, || run_case(&tag, &kernels, Shape { planted, ..s }, dtype, seed));
            }
        }
    }
}

fn run_case(tag: &str, kernels: &Kernels, s: Shape, dtype: DType, seed: u64) {
    let oracle = Kernels::reference();
    let inputs = Inputs::new(s, dtype, seed);
    let (qc, kc, vc) = inputs.views();
    let (q, k, v) = if s.fused_qkv {
        (
            fused_view(&inputs.buf, 0, s.q_heads),
            fused_view(&inputs.buf, s.q_heads, s.kv_heads),
            fused_view(&inputs.buf, s.q_heads + s.kv_heads, s.kv_heads),
        )
    } else {
        (qc.view(), kc.view(), vc.view())
    };
    let cfg = config(&s);

    // Planning in both budget modes, then layer fusion with the oracle's map.
    let want = oracle.plan(qc.view(), kc.view(), &cfg, &PlanRequest::layer(0)).unwrap();
    let cfg_max = EntropyConfig { budget_mode: BudgetMode::SegmentMax, ..cfg.clone() };
    let want_max = oracle.plan(qc.view(), kc.view(), &cfg_max, &PlanRequest::layer(0)).unwrap();
    if runs(tag, kernels, Op::Plan) {
        let got = kernels.plan(q, k, &cfg, &PlanRequest::layer(0)).unwrap();
        check_plans(&format!("{tag} plan per_head"), &got, &want);
        check_plans(
            &format!("{tag} plan segment_max"),
            &kernels.plan(q, k, &cfg_max, &PlanRequest::layer(0)).unwrap(),
            &want_max,
        );
        let cfg_fused = EntropyConfig { layer_fusion: true, ..cfg.clone() };
        let req = PlanRequest::layer(3).with_prev(&want.scores);
        let want_fused = oracle.plan(qc.view(), kc.view(), &cfg_fused, &req).unwrap();
        check_plans(&format!("{tag} plan fused"), &kernels.plan(q, k, &cfg_fused, &req).unwrap(), &want_fused);
    }

    // Attention: sparse in both modes (on the oracle's lists), dense.
    if runs_on(tag, kernels, Op::Prefill, dtype) {
        for (mode, lists) in
            [("per_head", Some(&want.blocks)), ("segment_max", Some(&want_max.blocks)), ("dense", None)]
        {
            let what = match lists {
                Some(l) => format!("{tag} sparse {mode} ({} sparse units)", l.sparse_units()),
                None => format!("{tag} dense"),
            };
            let got = common::suite::prefill(kernels, q, k, v, lists);
            check_attention(&what, kernels, &got, &check::exact_prefill(qc.view(), kc.view(), vc.view(), lists));
        }
    }

    // Compression: the prefill K/V as a [B, Hkv, L, D] cache (a strided view of BSND).
    let [b, l, _, d] = kc.shape;
    fn cache_view(t: &HostTensor) -> TensorView<'_> {
        let [b, l, hkv, d] = t.shape;
        let (shape, strides) = ([b, hkv, l, d], [l * hkv * d, d, hkv * d, 1]);
        match &t.data {
            HostBuffer::F32(x) => TensorView::strided(x.as_slice(), shape, strides),
            HostBuffer::F16(x) => TensorView::strided(x.as_slice(), shape, strides),
            HostBuffer::BF16(x) => TensorView::strided(x.as_slice(), shape, strides),
        }
    }
    let (k_cache, v_cache) = (contiguous(&cache_view(&kc)), contiguous(&cache_view(&vc)));
    let window = 16.min(l / 2).max(1);
    let obs = random([b, s.q_heads, window, d], 1.0, seed ^ 0x5eed, dtype);
    let budget = (l * 2 / 3).max(window + 1);
    let modes: Vec<(Pooling, GqaMode, HeadBudget)> = vec![
        (Pooling::Avg, GqaMode::Mean, HeadBudget::Uniform),
        (Pooling::Max, GqaMode::Max, HeadBudget::Uniform),
        (Pooling::None, GqaMode::PerQueryHead, HeadBudget::Uniform),
        (Pooling::Avg, GqaMode::Mean, HeadBudget::AdaKv { floor_fraction: 0.2 }),
    ];
    for (pooling, gqa_mode, head_budget) in modes {
        let dc = DecodeConfig {
            decode_budget: budget,
            window,
            pooling,
            pooling_kernel: 5,
            gqa_mode,
            head_budget,
            ..Default::default()
        };
        let exact = oracle.kv_compress(cache_view(&kc), cache_view(&vc), obs.view(), &dc).unwrap();
        let ctag = format!("{tag} compress {pooling:?}/{gqa_mode:?}/{head_budget:?}");
        // Without a compression kernel, decode runs over the oracle's compacted cache.
        let got = if runs(&ctag, kernels, Op::KvCompress) {
            let got = kernels.kv_compress(cache_view(&kc), cache_view(&vc), obs.view(), &dc).unwrap();
            let args = validate::kv_compress(oracle.capabilities(), cache_view(&kc), cache_view(&vc), obs.view(), &dc)
                .unwrap();
            let scores = reference::compress_scores(&args);
            check_compressed(&ctag, &got, &exact, &scores, (&k_cache, &v_cache), head_budget != HeadBudget::Uniform);
            got
        } else {
            exact
        };
        if !runs(&ctag, kernels, Op::Decode) {
            continue;
        }

        // Decode over the compacted cache (per-head lengths under AdaKV), two new queries.
        let nq = 2;
        let qn = random([b, nq, s.q_heads, d], 1.0, seed ^ 0xdec0de, dtype);
        let mut out = poisoned(qn.shape, dtype);
        kernels
            .decode_attention(qn.view(), got.k.view(), got.v.view(), &got.lengths, None, &mut out.view_mut())
            .unwrap();
        let exact_out = check::exact_decode(qn.view(), got.k.view(), got.v.view(), &got.lengths);
        check_output(&format!("{ctag} decode"), kernels, &out, &exact_out);
    }
}

/// One test per (shape, backend kind); absent backends print why they are skipped.
macro_rules! test_device {
    ($name:ident, $shape:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn cpu() {
                run_shape(BackendKind::Cpu, stringify!($name), $shape);
            }
            #[test]
            fn cpu_amx() {
                run_shape_cpu_isa(stringify!($name), entropy_kernels::cpu::Isa::Amx, $shape);
            }
            #[test]
            fn cpu_avx512bf16() {
                run_shape_cpu_isa(stringify!($name), entropy_kernels::cpu::Isa::Avx512Bf16, $shape);
            }
            #[test]
            fn cpu_avx512() {
                run_shape_cpu_isa(stringify!($name), entropy_kernels::cpu::Isa::Avx512, $shape);
            }
            #[test]
            fn cpu_avx2() {
                run_shape_cpu_isa(stringify!($name), entropy_kernels::cpu::Isa::Avx2, $shape);
            }
            #[test]
            fn cpu_portable() {
                run_shape_cpu_isa(stringify!($name), entropy_kernels::cpu::Isa::Portable, $shape);
            }
            #[test]
            fn cuda() {
                run_shape(BackendKind::Cuda, stringify!($name), $shape);
            }
            #[test]
            #[cfg(feature = "_cuda")]
            fn cuda_m128() {
                run_shape_cuda_m128(stringify!($name), $shape);
            }
            #[test]
            fn ascend() {
                run_shape(BackendKind::Ascend, stringify!($name), $shape);
            }
            #[test]
            fn ascend_emu() {
                run_shape(BackendKind::AscendEmu, stringify!($name), $shape);
            }
        }
    };
}

const BASE: Shape = Shape {
    batch: 1,
    len: 300,
    q_heads: 2,
    kv_heads: 2,
    head_dim: 64,
    segment: 64,
    block: 8,
    threshold: 64,
    base: 24,
    planted: false,
    fused_qkv: false,
};

test_device!(mha_d64, BASE);
test_device!(
    gqa_d80_odd_len_batch2,
    Shape { batch: 2, len: 517, q_heads: 6, kv_heads: 2, head_dim: 80, block: 16, threshold: 128, base: 32, ..BASE }
);
test_device!(
    mqa_d128_planted,
    Shape {
        len: 450,
        q_heads: 4,
        kv_heads: 1,
        head_dim: 128,
        segment: 128,
        threshold: 128,
        base: 64,
        planted: true,
        ..BASE
    }
);
test_device!(gqa_fused_qkv_d96, Shape { len: 333, q_heads: 4, kv_heads: 2, head_dim: 96, fused_qkv: true, ..BASE });
test_device!(len_equals_segment, Shape { batch: 2, len: 64, q_heads: 4, kv_heads: 2, ..BASE });
test_device!(len_below_segment, Shape { len: 37, q_heads: 3, kv_heads: 1, head_dim: 40, ..BASE });
test_device!(
    odd_head_dim_planted_gqa,
    Shape {
        batch: 2,
        len: 390,
        q_heads: 8,
        kv_heads: 2,
        head_dim: 36,
        segment: 32,
        block: 4,
        threshold: 32,
        base: 16,
        planted: true,
        ..BASE
    }
);

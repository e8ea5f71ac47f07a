//! Every operation of the CPU backend and the oracle on a few small shapes — strided (fused-QKV
//! and transposed-cache) views, GQA, partial last segments, every dtype, sparse units — sized so
//! `scripts/miri.sh` can run them under Miri (tree borrows), where every unsafe block of the CPU
//! kernels (raw output pointers shared by the workers, tile pointers, unaligned vector loads of the
//! portable path) is checked for undefined behaviour. Under Miri the CPU backend takes its
//! portable path (no CPU feature detection); natively the same test runs the AVX paths. Results
//! are compared with the oracle, so a run that is sound but wrong fails too.

mod common;

use common::*;
use entropy_kernels::*;

/// (batch, tokens, query heads, kv heads, head dim): a partial last segment everywhere (S = 8).
const SHAPES: [(usize, usize, usize, usize, usize); 2] = [(1, 20, 4, 2, 8), (2, 21, 3, 1, 5)];

fn close(tag: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{tag}: lengths");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{tag}: [{i}] {a} vs {b}");
    }
}

fn tol(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 4e-3,
        DType::BF16 => 3e-2,
    }
}

#[test]
fn prefill_ops_on_small_shapes() {
    let (cpu, oracle) = (Kernels::cpu(), Kernels::reference());
    let cfg = EntropyConfig { segment_size: 8, block_size: 4, threshold_len: 8, base_budget: 4, ..Default::default() };
    for (i, &(b, l, hq, hkv, d)) in SHAPES.iter().enumerate() {
        let dtype = DType::ALL[i % 3];
        // One fused buffer [B, L, Hq + 2·Hkv, D]: q, k and v are strided views into it.
        let buf = random([b, l, hq + 2 * hkv, d], 1.0, 7 + i as u64, dtype);
        let all = buf.view();
        let (q, k, v) =
            (all.narrow(2, 0, hq).unwrap(), all.narrow(2, hq, hkv).unwrap(), all.narrow(2, hq + hkv, hkv).unwrap());
        let tag = format!("shape {i} {dtype}");

        let want = oracle.plan(q, k, &cfg, &PlanRequest::default()).unwrap();
        let got = cpu.plan(q, k, &cfg, &PlanRequest::default()).unwrap();
        assert_eq!(got.blocks, want.blocks, "{tag}: block lists");
        assert!(want.blocks.sparse_units() > 0, "{tag}: no sparse unit");
        let fused = EntropyConfig { layer_fusion: true, ..cfg.clone() };
        let req = PlanRequest::layer(2).with_prev(&want.scores);
        assert_eq!(
            cpu.plan(q, k, &fused, &req).unwrap().blocks,
            oracle.plan(q, k, &fused, &req).unwrap().blocks,
            "{tag}: fused"
        );

        for blocks in [Some(&want.blocks), None] {
            let run = |kn: &Kernels| {
                let mut out = poisoned([b, l, hq, d], dtype);
                let mut lse = vec![f32::NAN; b * hq * l];
                match blocks {
                    Some(bl) => kn.sparse_prefill(q, k, v, bl, None, &mut out.view_mut(), Some(&mut lse)).unwrap(),
                    None => kn.dense_prefill(q, k, v, None, &mut out.view_mut(), Some(&mut lse)).unwrap(),
                }
                (out.to_f32_vec(), lse)
            };
            let (got, want) = (run(&cpu), run(&oracle));
            close(&format!("{tag} out"), &got.0, &want.0, tol(dtype));
            close(&format!("{tag} lse"), &got.1, &want.1, 1e-5);
        }
        // Plan and attention in one call, into a transposed output ([B, H, L, D] memory).
        let mut bhld = poisoned([b, hq, l, d], dtype);
        let strides = [l * hq * d, d, l * d, 1];
        let mut out = match &mut bhld.data {
            HostBuffer::F32(x) => TensorViewMut::strided(&mut x[..], [b, l, hq, d], strides),
            HostBuffer::F16(x) => TensorViewMut::strided(&mut x[..], [b, l, hq, d], strides),
            HostBuffer::BF16(x) => TensorViewMut::strided(&mut x[..], [b, l, hq, d], strides),
        };
        cpu.prefill(q, k, v, &cfg, &PlanRequest::default(), &mut out, None).unwrap();
        let mut exact = poisoned([b, l, hq, d], dtype);
        oracle.sparse_prefill(q, k, v, &want.blocks, None, &mut exact.view_mut(), None).unwrap();
        let got: Vec<f32> = bhld
            .view()
            .transpose(1, 2)
            .map(|t| reference::F64Tensor::of(&t).data.iter().map(|&x| x as f32).collect())
            .unwrap();
        close(&format!("{tag} prefill into a transposed output"), &got, &exact.to_f32_vec(), tol(dtype));
    }
}

#[test]
fn decode_ops_on_small_shapes() {
    let (cpu, oracle) = (Kernels::cpu(), Kernels::reference());
    for (i, &(b, n, hq, hkv, d)) in SHAPES.iter().enumerate() {
        let dtype = DType::ALL[(i + 1) % 3];
        let tag = format!("shape {i} {dtype}");
        // The cache as a transposed view of BSND K/V.
        let kb = random([b, n, hkv, d], 1.0, 11 + i as u64, dtype);
        let vb = random([b, n, hkv, d], 1.0, 13 + i as u64, dtype);
        let (kc, vc) = (kb.view().transpose(1, 2).unwrap(), vb.view().transpose(1, 2).unwrap());
        let w = 3;
        let obs = random([b, hq, w, d], 1.0, 17 + i as u64, dtype);
        for (gqa_mode, head_budget, pooling) in [
            (GqaMode::Mean, HeadBudget::Uniform, Pooling::Avg),
            (GqaMode::PerQueryHead, HeadBudget::Uniform, Pooling::Max),
            (GqaMode::Max, HeadBudget::AdaKv { floor_fraction: 0.3 }, Pooling::None),
        ] {
            let dc = DecodeConfig {
                decode_budget: n - 4,
                window: w,
                gqa_mode,
                head_budget,
                pooling,
                pooling_kernel: 3,
                ..Default::default()
            };
            let got = cpu.kv_compress(kc, vc, obs.view(), &dc).unwrap();
            let want = oracle.kv_compress(kc, vc, obs.view(), &dc).unwrap();
            assert_eq!(got.indices, want.indices, "{tag} {gqa_mode:?}: indices");
            assert_eq!(got.k, want.k, "{tag} {gqa_mode:?}: gathered keys");
            let qn = random([b, 2, hq, d], 1.0, 19, dtype);
            let run = |kn: &Kernels| {
                let mut out = poisoned(qn.shape, dtype);
                kn.decode_attention(qn.view(), want.k.view(), want.v.view(), &want.lengths, None, &mut out.view_mut())
                    .unwrap();
                out.to_f32_vec()
            };
            close(&format!("{tag} {gqa_mode:?} decode"), &run(&cpu), &run(&oracle), tol(dtype));
        }
        // A cache within the budget comes back unchanged.
        let dc = DecodeConfig { decode_budget: n + 1, window: w, ..Default::default() };
        assert!(!cpu.kv_compress(kc, vc, obs.view(), &dc).unwrap().compressed);
    }
}

#[test]
fn observation_window_on_small_shapes() {
    let cfg = DecodeConfig { window: 4, decode_gap: 2, decode_budget: 8, ..Default::default() };
    let mut w = ObservationWindow::new(2, 3, 5, &cfg).unwrap();
    let prompt = random([2, 6, 3, 5], 1.0, 23, DType::BF16);
    assert_eq!(w.prefill_end(prompt.view().narrow(1, 1, 5).unwrap()).unwrap(), WindowEvent::Observing);
    for step in 0..3 {
        let q = random([2, 1, 3, 5], 1.0, 29 + step, DType::F32);
        w.decode_step(q.view()).unwrap();
    }
    assert_eq!(w.observation(DType::F16).shape, [2, 3, 4, 5]);
}

//! The Ascend C host emulator: every rule it enforces is caught when planted, the level-0
//! mask/repeat/stride semantics match the documentation, params travel as the header lays them
//! out, and the emulated kernels agree with the oracle.

mod common;

use common::*;
use entropy_kernels::ascend::emu;
use entropy_kernels::*;

#[repr(C)]
struct SelfTest {
    code: i32,
    pad: i32,
    input: *const f32,
    output: *mut f32,
}

fn selftest(code: i32, input: &[f32], output: &mut [f32]) -> Result<()> {
    let t = SelfTest { code, pad: 0, input: input.as_ptr(), output: output.as_mut_ptr() };
    // SAFETY: both buffers hold 512 floats, as the self-test kernels assume.
    unsafe { emu::run("selftest", &t as *const SelfTest as *const u8, 1) }
}

/// A mixed (AIC + 2 AIV) self test; `input` and `output` hold 2048 and 1024 floats.
fn selftest_mix(code: i32, input: &[f32], output: &mut [f32]) -> Result<()> {
    assert!(input.len() >= 2048 && output.len() >= 1024);
    let t = SelfTest { code, pad: 0, input: input.as_ptr(), output: output.as_mut_ptr() };
    // SAFETY: the buffers are as large as the mixed self tests read and write.
    unsafe { emu::run_mix("selftest_cube", &t as *const SelfTest as *const u8, 1) }
}

#[test]
fn planted_violations_are_caught() {
    let input: Vec<f32> = (0..512).map(|i| i as f32).collect();
    let mut output = vec![0f32; 512];
    selftest(0, &input, &mut output).expect("correct usage passes");
    assert_eq!(output[..256], input[..256].iter().map(|x| 2.0 * x).collect::<Vec<_>>()[..]);
    let cases: [(i32, &str); 31] = [
        (1, "UB overflow"),
        (2, "not 32-byte aligned"),
        (3, "whole 32-byte blocks"),
        (4, "DeQue on an empty queue"),
        (5, "are in use"),
        (6, "did not hand out"),
        (7, "never freed"),
        (8, "with no SetFlag"),
        (9, "SetFlag twice"),
        (10, "never waited"),
        (11, "beyond a LocalTensor"),
        (12, "only one TPipe"),
        (13, "mask 65 outside 1..64"),
        (14, "still in the queue"),
        (15, "more than 8 queue buffers"),
        (16, "outside its 8 elements"),
        (17, "not sorted by descending score"),
        (18, "outside 0..255"),
        (19, "at most 4095"),
        (20, "dst overlaps"),
        (21, "the AIV has only the unified buffer"),
        (22, "src and dst are the same address"),
        (23, "not aligned to 8 elements"),
        (24, "not a whole number of 256-byte repeats"),
        (25, "GatherMask: local tensor address 260 is not 32-byte aligned"),
        // The asynchronous pipes (ascend/emu/include/emu_pipes.h). PipeBarrier page: dependent
        // vector instructions need PipeBarrier<PIPE_V>.
        (
            26,
            "race: Adds (V #2) reads UB bytes [0, 256) that Duplicate (V #1) writes with no synchronisation between them (PipeBarrier<PIPE_V> missing)",
        ),
        // SetFlag/WaitFlag page: a GM -> UB copy and its vector reader need MTE2_V.
        (
            27,
            "Muls (V #1) reads UB bytes [0, 256) that DataCopy(GM->local) (MTE2 #1) writes with no synchronisation between them (SetFlag/WaitFlag MTE2_V missing)",
        ),
        // The same page, write after read: the copy may land before the vector unit read the old data.
        (
            28,
            "DataCopy(GM->local) (MTE2 #1) writes UB bytes [0, 256) that Muls (V #1) still reads with no synchronisation between them (SetFlag/WaitFlag V_MTE2 missing)",
        ),
        // kv_compress's top-k before issue 18: the scalar unit rewrote a tensor MTE3 may still copy out.
        (
            29,
            "SetValue (S #9) writes UB bytes [0, 4) that DataCopy(UB->GM) (MTE3 #1) still reads with no synchronisation between them (SetFlag/WaitFlag MTE3_S missing)",
        ),
        // GatherMask page: rsvdCnt is the vector pipe's; kv_compress's selection read it at once.
        (
            30,
            "GatherMask's rsvdCnt used before a V_S SetFlag/WaitFlag covering the GatherMask (Adds issued in between)",
        ),
        // The same rule over global memory (issue 18's second review): a UB -> GM copy read back
        // by a GM -> UB copy needs MTE3_MTE2 (kv_compress's pooling reads what its group reduction wrote).
        (
            48,
            "that DataCopy(UB->GM) (MTE3 #1) writes with no synchronisation between them (SetFlag/WaitFlag MTE3_MTE2 missing)",
        ),
    ];
    for (code, needle) in cases {
        match selftest(code, &input, &mut output) {
            Ok(()) => panic!("planted violation {code} ({needle}) was not caught"),
            Err(Error::Emulator { detail, .. }) => {
                assert!(detail.contains(needle), "violation {code}: expected `{needle}`, got `{detail}`");
                assert!(detail.starts_with("core 0:"), "{detail}");
            }
            Err(e) => panic!("violation {code}: wrong error {e}"),
        }
    }
}

#[test]
fn level0_masks_repeats_and_strides() {
    let input: Vec<f32> = (0..512).map(|i| i as f32 * 0.5).collect();
    let mut output = vec![0f32; 512];
    selftest(100, &input, &mut output).unwrap();
    // Written independently from the documented semantics: one repeat = 8 blocks of 8 floats.
    let mut want = vec![-1.0f32; 512];
    let mask: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    for r in 0..2usize {
        for b in 0..8usize {
            for e in 0..8usize {
                if (mask >> (b * 8 + e)) & 1 == 0 {
                    continue;
                }
                let (di, ai, bi) = ((r * 16 + b * 2) * 8 + e, (r * 16 + b) * 8 + e, (r * 8 + b) * 8 + e);
                want[di] = input[ai] + input[bi];
            }
        }
    }
    for r in 0..2usize {
        for e in 0..10usize {
            want[384 + r * 64 + e] = input[384 + r * 64 + e] * 3.0;
        }
    }
    assert_eq!(output, want);
}

unsafe extern "C" {
    fn ek_emu_layout(out: *mut u64, n: usize) -> usize;
}

#[test]
fn params_travel_as_the_header_lays_them_out() {
    use entropy_kernels::ffi::*;
    use std::mem::{offset_of, size_of};
    // The launch packs the bindgen structs byte for byte: the kernels' compiler must agree.
    let want = [
        size_of::<EkTensor>(),
        offset_of!(EkTensor, shape),
        size_of::<EkDecodeParams>(),
        offset_of!(EkDecodeParams, lengths),
        offset_of!(EkDecodeParams, group),
        offset_of!(EkDecodeParams, scale_log2),
        offset_of!(EkDecodeParams, dtype),
        size_of::<EkPrefillParams>(),
        offset_of!(EkPrefillParams, lse),
        offset_of!(EkPrefillParams, scale_log2),
        size_of::<EkPlanParams>(),
        offset_of!(EkPlanParams, order),
        offset_of!(EkPlanParams, e_t),
        size_of::<EkCompressParams>(),
        offset_of!(EkCompressParams, stats),
        offset_of!(EkCompressParams, scale_log2),
        offset_of!(EkCompressParams, workspace),
    ];
    let mut got = vec![0u64; want.len()];
    // SAFETY: writes at most `got.len()` values.
    let n = unsafe { ek_emu_layout(got.as_mut_ptr(), got.len()) };
    assert_eq!(n, want.len());
    assert_eq!(got, want.iter().map(|&x| x as u64).collect::<Vec<_>>());
}

#[test]
fn emulated_decode_matches_the_oracle() {
    let kernels = Kernels::new(BackendKind::AscendEmu).unwrap();
    let oracle = Kernels::reference();
    let seed = seed("emulated_decode_matches_the_oracle");
    for (i, &(b, hq, hc, d, cap, nq)) in
        // The last two have more than 16 query rows per cache head (MQA 32/1; 3 queries × G 8).
        [
            (2, 4, 2, 64, 90, 1),
            (1, 6, 3, 80, 70, 2),
            (1, 2, 2, 36, 40, 1),
            (1, 32, 1, 64, 50, 1),
            (1, 16, 2, 64, 45, 3),
        ]
        .iter()
        .enumerate()
    {
        for dtype in DType::ALL {
            let s = seed ^ (i as u64 * 7919 + dtype as u64);
            let q = random([b, nq, hq, d], 1.0, s, dtype);
            let kc = random([b, hc, cap, d], 1.0, s ^ 1, dtype);
            let vc = random([b, hc, cap, d], 1.0, s ^ 2, dtype);
            let lengths: Vec<u32> = (0..b * hc).map(|j| (cap - 3 * j) as u32).collect();
            let mut got = poisoned(q.shape, dtype);
            kernels.decode_attention(q.view(), kc.view(), vc.view(), &lengths, None, &mut got.view_mut()).unwrap();
            let mut want = poisoned(q.shape, dtype);
            oracle.decode_attention(q.view(), kc.view(), vc.view(), &lengths, None, &mut want.view_mut()).unwrap();
            let err = rel_fro(&tensor_f64(&got), &tensor_f64(&want));
            assert!(err <= attn_tol(dtype), "case {i} {dtype}: rel err {err:e}");
        }
    }
}

/// Compression beyond the matrix's sizes: several key chunks, several top-k tiles merged, every
/// pooling and group mode, and a group with more window rows than one scoring pass holds
/// (G 8 × W 32 = 256 rows), against the oracle (near-ties allowed, gather exact).
#[test]
fn emulated_kv_compress_long_cache() {
    let kernels = Kernels::new(BackendKind::AscendEmu).unwrap();
    let oracle = Kernels::reference();
    let seed = seed("emulated_kv_compress_long_cache");
    let cases = [
        ((1, 4, 2, 64, 3001, 8), Pooling::Avg, GqaMode::Mean, 2300),
        ((1, 4, 2, 64, 3001, 8), Pooling::Max, GqaMode::Max, 2300),
        ((1, 4, 2, 64, 3001, 8), Pooling::None, GqaMode::PerQueryHead, 2300),
        ((1, 16, 2, 64, 1500, 32), Pooling::Avg, GqaMode::Mean, 600),
        // SmolLM2's shape: G 3 × W 32 = 96 window rows (a full pass of 64, then 32).
        ((1, 9, 3, 64, 1536, 32), Pooling::Avg, GqaMode::Mean, 1024),
        // The UB worst case: D 256, G 16 (64 window rows per pass), 16-bit keys widened to f32.
        ((1, 32, 2, 256, 700, 4), Pooling::Avg, GqaMode::Mean, 300),
        // Keep beyond MrgSort's lists (4064): threshold selection (TopK::Auto picks it).
        ((1, 2, 1, 32, 9000, 8), Pooling::Avg, GqaMode::Mean, 6000),
        ((1, 4, 2, 32, 7001, 8), Pooling::Max, GqaMode::PerQueryHead, 5000),
        // 256 window rows again, bf16: four 64-row passes of cube scoring, heads split by AIV.
        ((1, 16, 2, 64, 1500, 32), Pooling::Avg, GqaMode::Mean, 600),
        // A window wider than a pass (W 80: a head's rows span passes), f32 then f16.
        ((1, 4, 2, 64, 1200, 80), Pooling::Avg, GqaMode::Mean, 500),
        ((1, 4, 2, 64, 1200, 80), Pooling::Max, GqaMode::PerQueryHead, 500),
    ];
    for (i, ((b, hq, hkv, d, n, w), pooling, gqa_mode, budget)) in cases.into_iter().enumerate() {
        let dtype = DType::ALL[i % 3];
        let s = seed ^ (i as u64 * 104729);
        let kc = random([b, hkv, n, d], 1.0, s, dtype);
        let vc = random([b, hkv, n, d], 1.0, s ^ 1, dtype);
        let obs = random([b, hq, w, d], 1.0, s ^ 2, dtype);
        let dc = DecodeConfig {
            decode_budget: budget,
            window: w,
            pooling,
            pooling_kernel: 7,
            gqa_mode,
            ..Default::default()
        };
        let got = kernels.kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
        let want = oracle.kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
        let args = validate::kv_compress(oracle.capabilities(), kc.view(), vc.view(), obs.view(), &dc).unwrap();
        let scores = reference::compress_scores(&args);
        let tag = format!("case {i}: G {} W {w} {pooling:?}/{gqa_mode:?} {dtype}", hq / hkv);
        check_compressed(&tag, &got, &want, &scores, (&kc, &vc), false);
    }
}

/// The emulated backend with `kv_compress`'s top-k forced to `topk`.
fn emulated(topk: ascend::TopK) -> Kernels {
    Kernels::from_backend(std::sync::Arc::new(emu::AscendEmuBackend::with_topk(topk)))
}

/// Exact ties (every key equal): the kept positions are the lowest ones, as SPEC §4.5 requires —
/// on both top-k kernels: Sort32's and MrgSort's tie order across tiles, and threshold
/// selection's quota of ties (here every score ties, the quota ends mid-tile).
#[test]
fn emulated_kv_compress_ties_go_to_lower_positions() {
    let (b, hq, hkv, d, n, w) = (1, 2, 2, 32, 2600, 4);
    let kc = HostTensor::full(DType::F32, [b, hkv, n, d], 0.25);
    let vc = random([b, hkv, n, d], 1.0, seed("ties"), DType::F32);
    let obs = random([b, hq, w, d], 1.0, seed("ties") ^ 1, DType::F32);
    for topk in [ascend::TopK::Sort, ascend::TopK::Select] {
        let kernels = emulated(topk);
        for pooling in [Pooling::None, Pooling::Max] {
            let dc = DecodeConfig { decode_budget: 1500, window: w, pooling, ..Default::default() };
            let got = kernels.kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
            let keep = 1500 - w;
            for u in 0..b * hkv {
                let idx = &got.indices[u * keep..(u + 1) * keep];
                let ok = idx.iter().enumerate().all(|(i, &p)| p == i as i64);
                assert!(ok, "{topk:?} {pooling:?} head {u}: {:?}", &idx[..8]);
            }
        }
    }
}

/// Three score levels interleaved over the cache (keys repeat a 3-row pattern, so equal keys
/// score exactly equal): the top level is kept whole, the middle one up to the quota — which ends
/// mid-tile with top-level positions after it — and nothing of the last. Both top-k kernels must
/// give the oracle's positions exactly; sort/merge refuses a keep beyond its lists with a typed error.
#[test]
fn emulated_kv_compress_partial_tie_level() {
    let (b, hq, hkv, d, n, w) = (1, 2, 1, 32, 5000, 4);
    let pattern = random([1, 1, 3, d], 1.0, seed("levels"), DType::F32).to_f32_vec();
    let rows: Vec<f32> = (0..n).flat_map(|i| pattern[((i * 7) % 3) * d..][..d].to_vec()).collect();
    let kc = HostTensor::from_f32(&rows, [b, hkv, n, d], DType::F32);
    let vc = random([b, hkv, n, d], 1.0, seed("levels") ^ 1, DType::F32);
    let obs = random([b, hq, w, d], 1.0, seed("levels") ^ 2, DType::F32);
    let oracle = Kernels::reference();
    for budget in [2500, 4500] {
        let dc = DecodeConfig { decode_budget: budget, window: w, pooling: Pooling::None, ..Default::default() };
        let want = oracle.kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
        for topk in [ascend::TopK::Sort, ascend::TopK::Select, ascend::TopK::Auto] {
            let got = emulated(topk).kv_compress(kc.view(), vc.view(), obs.view(), &dc);
            if topk == ascend::TopK::Sort && budget - w > 4064 {
                let e = got.expect_err("sort/merge beyond its lists");
                assert!(matches!(e, Error::OutOfRange { .. }) && e.to_string().contains("4064"), "{e}");
                continue;
            }
            let got = got.unwrap();
            assert_eq!(got.indices, want.indices, "{topk:?} budget {budget}");
            assert_eq!(got.k.to_f32_vec(), want.k.to_f32_vec(), "{topk:?} budget {budget}: gathered keys");
        }
    }
    // AdaKV selects on the host from the device's pooled scores: no device top-k limit applies.
    let dc = DecodeConfig {
        decode_budget: 4500,
        window: w,
        pooling: Pooling::None,
        head_budget: HeadBudget::AdaKv { floor_fraction: 0.2 },
        ..Default::default()
    };
    let want = oracle.kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
    let got = emulated(ascend::TopK::Sort).kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
    assert_eq!((got.indices, got.lengths), (want.indices, want.lengths), "AdaKV, budget 4500");
}

/// Issue 18, defect 6: DataCopyPad fills the rest of a partial 32-byte block with copies of the
/// burst's first element (not the pad value), so a top-k score tile of n ≢ 0 (mod 8) scores would
/// carry up to 7 phantom copies of its first score. Here the last tile holds 5 scores and its
/// first (position 1024) is the row's largest: a phantom would be kept at once. Every kept
/// position must lie below N − W, on both top-k kernels, and match the oracle.
#[test]
fn compress_keeps_no_phantom_positions() {
    let (b, hq, hkv, d, w) = (1, 2, 1, 32, 4);
    let scored = 1024 + 5;
    let n = scored + w;
    let mut keys = random([b, hkv, n, d], 0.1, seed("phantoms"), DType::F32).to_f32_vec();
    keys[1024 * d..1025 * d].iter_mut().for_each(|x| *x = 1.0);
    let kc = HostTensor::from_f32(&keys, [b, hkv, n, d], DType::F32);
    let vc = random([b, hkv, n, d], 1.0, seed("phantoms") ^ 1, DType::F32);
    let obs = HostTensor::full(DType::F32, [b, hq, w, d], 0.5);
    let dc = DecodeConfig { decode_budget: 200 + w, window: w, pooling: Pooling::None, ..Default::default() };
    let want = Kernels::reference().kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
    assert!(want.indices.contains(&1024), "the test needs position 1024 kept");
    for topk in [ascend::TopK::Sort, ascend::TopK::Select] {
        let got = emulated(topk).kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
        for &p in &got.indices {
            assert!(
                (p as usize) < scored,
                "{topk:?}: kept position {p} ≥ N − W = {scored}: a DataCopyPad tail slot entered the top-k"
            );
        }
        assert_eq!(got.indices, want.indices, "{topk:?}");
    }
}

/// More top-k items than emulated cores (8 kv heads on 4 cores): each core selects for two heads
/// back to back, so the second item's scalar writes of its output tile follow the first item's
/// UB -> GM copy of the same tile (issue 18, defect 7: MTE3_S before them), on both top-k kernels.
#[test]
fn compress_topk_runs_several_items_per_core() {
    let (b, hq, hkv, d, n, w) = (1, 8, 8, 32, 300, 4);
    let s = seed("compress_topk_runs_several_items_per_core");
    let kc = random([b, hkv, n, d], 1.0, s, DType::F32);
    let vc = random([b, hkv, n, d], 1.0, s ^ 1, DType::F32);
    let obs = random([b, hq, w, d], 1.0, s ^ 2, DType::F32);
    let dc = DecodeConfig { decode_budget: 100, window: w, pooling: Pooling::Avg, ..Default::default() };
    let oracle = Kernels::reference();
    let want = oracle.kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
    let args = validate::kv_compress(oracle.capabilities(), kc.view(), vc.view(), obs.view(), &dc).unwrap();
    let scores = reference::compress_scores(&args);
    for topk in [ascend::TopK::Sort, ascend::TopK::Select] {
        let got = emulated(topk).kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
        check_compressed(&format!("{topk:?}, 8 heads on 4 cores"), &got, &want, &scores, (&kc, &vc), false);
    }
}

/// BlockReduceMax/Sum (one result per 32-byte block), Brcb (one element per block) and the
/// level-0 Duplicate with a bit mask, as the prefill's whole-tile softmax uses them.
#[test]
fn block_reduce_broadcast_and_masked_fill_semantics() {
    let input: Vec<f32> = (0..512).map(|i| ((i * 29) % 97) as f32 * 0.25 - 10.0).collect();
    let mut output = vec![0f32; 512];
    selftest(102, &input, &mut output).unwrap();
    // Written independently from the documented semantics: one result per 32-byte block (8 floats).
    let block = |k: usize| &input[k * 8..k * 8 + 8];
    let mut red: Vec<f32> = (0..32).map(|k| block(k).iter().copied().fold(f32::NEG_INFINITY, f32::max)).collect();
    red.extend((32..64).map(|k| block(k).iter().sum::<f32>()));
    assert_eq!(&output[..32], &red[..32], "BlockReduceMax");
    for (k, (&got, &want)) in output[32..64].iter().zip(&red[32..]).enumerate() {
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "BlockReduceSum block {k}: {got} vs {want}");
    }
    let bc: Vec<f32> = (0..16).flat_map(|k| [output[k]; 8]).collect();
    assert_eq!(&output[64..192], &bc[..], "Brcb");
    let fill: Vec<f32> =
        (0..128).map(|i| if (0xFF00_FF00_FF00_FF00u64 >> (i % 64)) & 1 == 1 { 7.0 } else { 0.0 }).collect();
    assert_eq!(&output[192..320], &fill[..], "level-0 Duplicate");
}

/// CompareScalar's bit mask (element i at bit i of the mask's bytes), Select by it (mode 1: the
/// tensor where the bit is set, the scalar elsewhere) and GatherMask in counter mode (the selected
/// elements in order, packed, and their count), as threshold selection uses them.
#[test]
fn compare_select_and_gather_mask_semantics() {
    let input: Vec<f32> = (0..512).map(|i| ((i * 53) % 19) as f32 - 9.0).collect();
    let mut output = vec![7.5f32; 512];
    selftest(103, &input, &mut output).unwrap();
    let want_sel: Vec<f32> = input[..256].iter().map(|&x| if x > 0.0 { x } else { -1.0 }).collect();
    assert_eq!(&output[..256], &want_sel[..], "Select");
    let want_gather: Vec<f32> = input[..200].iter().copied().filter(|&x| x > 0.0).collect();
    assert_eq!(output[511], want_gather.len() as f32, "GatherMask count");
    assert_eq!(&output[256..256 + want_gather.len()], &want_gather[..], "GatherMask elements");
    assert!(output[256 + want_gather.len()..511].iter().all(|&x| x == 7.5), "GatherMask wrote past its count");
}

/// Sort32 sorts each group of 32 by descending score with ties to the earlier input (the
/// documented rule), MrgSort merges the groups; the (score, index) layout is checked bit for bit.
#[test]
fn sort_and_merge_semantics() {
    // Scores with many exact ties inside and across the two groups.
    let input: Vec<f32> = (0..512).map(|i| ((i * 37) % 11) as f32 * 0.5).collect();
    let mut output = vec![0f32; 512];
    selftest(101, &input, &mut output).unwrap();
    let mut want: Vec<u32> = (0..64).collect();
    want.sort_by(|&a, &b| input[b as usize].total_cmp(&input[a as usize]).then(a.cmp(&b)));
    let got: Vec<u32> = (0..64).map(|k| output[2 * k + 1].to_bits()).collect();
    assert_eq!(got, want);
    let scores: Vec<f32> = (0..64).map(|k| output[2 * k]).collect();
    assert_eq!(scores, want.iter().map(|&i| input[i as usize]).collect::<Vec<_>>());
}

/// f32 prefill runs on the vector cores (the cube path is f16/bf16): sparse plans, LSE, and
/// groups wider than one 16-row chunk (MQA 32/1: each item's rows in two chunks), against the oracle.
#[test]
fn f32_prefill_on_the_vector_cores() {
    let kernels = Kernels::new(BackendKind::AscendEmu).unwrap();
    let oracle = Kernels::reference();
    let seed = seed("f32_prefill_on_the_vector_cores");
    for (i, &(l, hq, hkv, d)) in [(200usize, 32usize, 1usize, 64usize), (150, 6, 2, 80)].iter().enumerate() {
        let s = seed ^ (i as u64 * 31337);
        let q = random([1, l, hq, d], 1.0, s, DType::F32);
        let k = random([1, l, hkv, d], 1.0, s ^ 1, DType::F32);
        let v = random([1, l, hkv, d], 1.0, s ^ 2, DType::F32);
        let cfg =
            EntropyConfig { segment_size: 32, block_size: 8, threshold_len: 64, base_budget: 16, ..Default::default() };
        let plan = oracle.plan(q.view(), k.view(), &cfg, &PlanRequest::layer(0)).unwrap();
        assert!(plan.blocks.sparse_units() > 0);
        let (mut got, mut want) = (poisoned(q.shape, DType::F32), poisoned(q.shape, DType::F32));
        let (mut lse_got, mut lse_want) = (vec![f32::NAN; hq * l], vec![f32::NAN; hq * l]);
        kernels
            .sparse_prefill(q.view(), k.view(), v.view(), &plan.blocks, None, &mut got.view_mut(), Some(&mut lse_got))
            .unwrap();
        oracle
            .sparse_prefill(q.view(), k.view(), v.view(), &plan.blocks, None, &mut want.view_mut(), Some(&mut lse_want))
            .unwrap();
        let err = rel_fro(&tensor_f64(&got), &tensor_f64(&want));
        assert!(err <= attn_tol(DType::F32), "case {i}: rel err {err:e}");
        let lse_err = lse_got.iter().zip(&lse_want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(lse_err <= 1e-4, "case {i}: LSE max abs err {lse_err:e}");
    }
}

/// A backend that excludes an (op, dtype) pair answers with a typed error that says what to do.
#[test]
fn excluded_op_dtype_is_a_typed_error() {
    let caps =
        Capabilities { excluded: vec![(Op::Prefill, DType::F32)], ..Capabilities::full("test", HeadDims::UpTo(256)) };
    let q = random([1, 40, 2, 64], 1.0, 1, DType::F32);
    let kv = random([1, 40, 2, 64], 1.0, 2, DType::F32);
    let mut out = poisoned(q.shape, DType::F32);
    match validate::attention(&caps, q.view(), kv.view(), kv.view(), None, None, &out.view_mut(), None) {
        Err(e @ Error::UnsupportedOpDType { .. }) => {
            assert!(e.to_string().contains("cast the inputs to f16 or bf16"), "{e}")
        }
        other => panic!("expected UnsupportedOpDType, got {other:?}"),
    }
}

/// The cube and cross-core rules of mixed launches, each planted once.
#[test]
fn planted_cube_and_cross_core_violations_are_caught() {
    let input = vec![0f32; 2048];
    let mut output = vec![0f32; 1024];
    let cases = [
        (31, "the AIC has no unified buffer"),
        (32, "not 512-byte aligned"),
        (33, "Mmad: dst in CO1"),
        (34, "deadlock"),
        (35, "never waited for by AIV"),
        (36, "outside 0..10"),
        (37, "ifTranspose is for 16-bit types only"),
        (38, "quantPre does not match"),
        (39, "more than 15 sets pending"),
        // The cube's write-after-read hazards (catlass block_mmad_pingpong's per-buffer events).
        (
            42,
            "Mmad (M #2) writes L0C bytes [0, 2048) that Fixpipe (FIX #1) still reads with no synchronisation between them (SetFlag/WaitFlag FIX_M missing)",
        ),
        (
            43,
            "LoadData (MTE1 #4) writes L0A bytes [0, 512) that Mmad (M #1) still reads with no synchronisation between them (SetFlag/WaitFlag M_MTE1 missing)",
        ),
        (
            44,
            "DataCopy(Nd2Nz GM->L1) (MTE2 #3) writes L1 bytes [2048, 2080) that LoadData (MTE1 #3) still reads with no synchronisation between them (SetFlag/WaitFlag MTE1_MTE2 missing)",
        ),
        // catlass's flash-attention example: SetSyncBaseAddr on every core before any flag.
        (45, "CrossCoreSetFlag before SetSyncBaseAddr"),
        (46, "is not the device's hardware sync address (aclrtGetHardwareSyncAddr)"),
        // KERNEL_TASK_TYPE_DEFAULT page: a mixed kernel declares KERNEL_TYPE_MIX_AIC_1_2.
        (47, "does not declare KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2)"),
        // Global memory across the AI core (CrossCoreSetFlag page: the set is an instruction of
        // its pipe; CrossCoreWaitFlag holds everything after it): the AIC publishes a Fixpipe
        // result with a flag on MTE2, which does not wait for FIX ...
        (48, "AIV 0: race: DataCopy(GM->local) (MTE2 #1) reads GM bytes"),
        (
            48,
            "that the AIC's Fixpipe (FIX #1) writes with no synchronisation between them (a CrossCoreSetFlag on the AIC issued on a pipe after FIX's access, and the CrossCoreWaitFlag before this one, missing)",
        ),
        // ... and the AIVs release a slot they read by MTE2 with a flag on MTE3 (prefill and the
        // cube-scored compression release their workspace slots this way, on the right pipes).
        (
            49,
            "that AIV 0's DataCopy(GM->local) (MTE2 #1) still reads with no synchronisation between them (a CrossCoreSetFlag on AIV 0 issued on a pipe after MTE2's access",
        ),
    ];
    for (code, needle) in cases {
        match selftest_mix(code, &input, &mut output) {
            Ok(()) => panic!("planted violation {code} ({needle}) was not caught"),
            Err(Error::Emulator { detail, .. }) => {
                assert!(detail.contains(needle), "violation {code}: expected `{needle}`, got `{detail}`")
            }
            Err(e) => panic!("violation {code}: wrong error {e}"),
        }
    }
}

/// Two cores of one vector launch writing the same GM bytes race: nothing orders the cores of a
/// launch (only the launch boundary does).
#[test]
fn cores_of_one_launch_do_not_share_gm_unsynchronised() {
    let input = vec![0f32; 512];
    let mut output = vec![0f32; 512];
    let t = SelfTest { code: 49, pad: 0, input: input.as_ptr(), output: output.as_mut_ptr() };
    // SAFETY: both buffers hold 512 floats, as the self-test kernels assume.
    let r = unsafe { emu::run("selftest", &t as *const SelfTest as *const u8, 2) };
    let want = "core 1: race: DataCopy(UB->GM) (MTE3 #1) writes GM bytes";
    let why = "that core 0's DataCopy(UB->GM) (MTE3 #1) writes with no synchronisation between them (different cores of one launch: nothing orders them before the launch ends)";
    match r {
        Err(Error::Emulator { detail, .. }) => assert!(detail.contains(want) && detail.contains(why), "{detail}"),
        other => panic!("two cores writing the same GM bytes must be a race, got {other:?}"),
    }
    // One core alone is fine.
    selftest(49, &input, &mut output).unwrap();
}

/// Nd2Nz → LoadData (plain and transposed) → Mmad → Fixpipe computes X·Yᵀ and X·Z exactly (small
/// integers, exact in f16 and in f32 sums).
#[test]
fn cube_path_computes_matrix_products() {
    let input: Vec<f32> = (0..2048).map(|i| ((i * 7 + 3) % 9) as f32 - 4.0).collect();
    let mut output = vec![f32::NAN; 1024];
    selftest_mix(200, &input, &mut output).unwrap();
    let (x, y, z) = (&input[..1024], &input[1024..1536], &input[1536..2048]);
    for m in 0..32 {
        for n in 0..16 {
            let s: f32 = (0..32).map(|k| x[m * 32 + k] * y[n * 32 + k]).sum();
            let o: f32 = (0..32).map(|k| x[m * 32 + k] * z[k * 16 + n]).sum();
            assert_eq!(output[m * 16 + n], s, "X·Yᵀ at ({m}, {n})");
            assert_eq!(output[512 + m * 16 + n], o, "X·Z at ({m}, {n})");
        }
    }
}

/// A mixed kernel's binary has `<name>_mix_aic` and `<name>_mix_aiv`, not the bare name: the host
/// looking the bare name up (as before issue 18) finds nothing.
#[test]
fn mixed_kernels_answer_to_their_mix_entry_names() {
    let input = vec![0f32; 2048];
    let mut output = vec![0f32; 1024];
    let t = SelfTest { code: 200, pad: 0, input: input.as_ptr(), output: output.as_mut_ptr() };
    let args = [emu::hardware_sync_addr(), &t as *const SelfTest as u64];
    // SAFETY: the buffers are as large as the mixed self tests read and write.
    let bare = unsafe { emu::run_entry("selftest_cube", "selftest_cube", &args, 1) };
    match bare {
        Err(Error::Emulator { detail, .. }) => {
            assert!(detail.contains("has selftest_cube_mix_aic and selftest_cube_mix_aiv"), "{detail}")
        }
        other => panic!("the bare name of a mixed kernel must not be found: {other:?}"),
    }
    unsafe { emu::run_entry("selftest_cube", "selftest_cube_mix_aic", &args, 1) }.unwrap();
    // And a mixed entry with the params alone (no sync address) is refused.
    let one = unsafe { emu::run_entry("selftest_cube", "selftest_cube_mix_aic", &args[1..], 1) };
    assert!(matches!(one, Err(Error::Emulator { ref detail, .. }) if detail.contains("takes 2 arguments")), "{one:?}");
}

/// The synchronised forms of the planted races pass, and DataCopyPad's fill of a partial 32-byte
/// block (padding value set, padding counts 0) repeats the burst's first element — the documented
/// dummy fill the emulator models — rather than the padding value.
#[test]
fn synchronised_pipes_and_the_data_copy_pad_fill() {
    let input: Vec<f32> = (0..512).map(|i| i as f32 * 0.5 + 1.0).collect();
    let mut output = vec![f32::NAN; 512];
    selftest(104, &input, &mut output).expect("every pair synchronised");
    assert_eq!(&output[..5], &input[3..8], "the copied burst");
    assert_eq!(&output[5..8], &[input[3]; 3], "the rest of the block: the burst's first element");
    assert_eq!(&output[8..16], &output[..8], "copied after a PipeBarrier<PIPE_V>");
    assert_eq!(output[16], 2.0, "GatherMask's count, read after V_S");
}

/// Mmad with m = 1 runs in GEMV mode: L0A is read as a plain vector, so with X loaded as zZ
/// fractals the one output row is (row 0's first 16 elements, then row 1's) · Yᵀ, not X₀·Yᵀ.
#[test]
fn mmad_with_one_row_is_gemv() {
    let input: Vec<f32> = (0..2048).map(|i| ((i * 7 + 3) % 9) as f32 - 4.0).collect();
    let mut output = vec![f32::NAN; 1024];
    selftest_mix(201, &input, &mut output).unwrap();
    let (x, y) = (&input[..1024], &input[1024..1536]);
    // The first 32 halves of L0A's zZ layout: fractal (0, 0) row 0 is x[0..16], then its row 1.
    let vector: Vec<f32> = x[..16].iter().chain(&x[32..48]).copied().collect();
    for n in 0..16 {
        let gemv: f32 = (0..32).map(|k| vector[k] * y[n * 32 + k]).sum();
        let row0: f32 = (0..32).map(|k| x[k] * y[n * 32 + k]).sum();
        assert_eq!(output[n], gemv, "GEMV product at column {n}");
        if gemv != row0 {
            return; // the fractal reading would have given another value: the mode matters
        }
    }
    panic!("the input does not tell GEMV from fractal reading");
}

/// The cube's one-row products: a prefill tile holding one query row (G 1, 65 tokens: tiles of
/// 64 and 1) and a cube-scored compression pass of one window row (G 1, W 65: passes of 64 and
/// 1). With m = 1 the cube would run in GEMV mode and read the zZ-loaded L0A as a vector: the
/// kernels run a whole fractal row instead (issue 18).
#[test]
fn one_row_cube_products_match_the_oracle() {
    let kernels = Kernels::new(BackendKind::AscendEmu).unwrap();
    let oracle = Kernels::reference();
    let seed = seed("one_row_cube_products_match_the_oracle");
    for dtype in [DType::F16, DType::BF16] {
        let s = seed ^ dtype as u64;
        let (l, h, d) = (65, 2, 64);
        let q = random([1, l, h, d], 1.0, s, dtype);
        let k = random([1, l, h, d], 1.0, s ^ 1, dtype);
        let v = random([1, l, h, d], 1.0, s ^ 2, dtype);
        let (mut got, mut want) = (poisoned(q.shape, dtype), poisoned(q.shape, dtype));
        kernels.dense_prefill(q.view(), k.view(), v.view(), None, &mut got.view_mut(), None).unwrap();
        oracle.dense_prefill(q.view(), k.view(), v.view(), None, &mut want.view_mut(), None).unwrap();
        let err = rel_fro(&tensor_f64(&got), &tensor_f64(&want));
        assert!(err <= attn_tol(dtype), "{dtype} prefill, a one-row tile: rel err {err:e}");

        let (n, w) = (400, 65);
        let kc = random([1, h, n, d], 1.0, s ^ 3, dtype);
        let vc = random([1, h, n, d], 1.0, s ^ 4, dtype);
        let obs = random([1, h, w, d], 1.0, s ^ 5, dtype);
        let dc = DecodeConfig { decode_budget: 250, window: w, pooling: Pooling::Avg, ..Default::default() };
        let got = kernels.kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
        let want = oracle.kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
        let args = validate::kv_compress(oracle.capabilities(), kc.view(), vc.view(), obs.view(), &dc).unwrap();
        let scores = reference::compress_scores(&args);
        check_compressed(&format!("{dtype} compression, a one-row pass"), &got, &want, &scores, (&kc, &vc), false);
    }
}

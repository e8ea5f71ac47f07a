//! The emulator's work counters (process-wide, so this binary holds a single test: no other
//! emulated launch may run beside it).
#![cfg(feature = "ascend-emu")]

mod common;

use common::*;
use entropy_kernels::ascend::emu;
use entropy_kernels::*;

/// The emulator counts what the kernels would cost: the prefill's cube work stays close to the
/// causal ideal (whole 64×64 tiles cost at most 1.25× the 2·pairs·D·Hq multiply-accumulates of the
/// attended pairs), K/V are read once per GQA group tile, and the counts are printed per op.
#[test]
fn work_counters() {
    let kernels = Kernels::new(BackendKind::AscendEmu).unwrap();
    let (b, l, hq, hkv, d) = (1usize, 512usize, 8usize, 2usize, 128usize);
    let q = random([b, l, hq, d], 1.0, 1, DType::F16);
    let k = random([b, l, hkv, d], 1.0, 2, DType::F16);
    let v = random([b, l, hkv, d], 1.0, 3, DType::F16);
    let mut out = poisoned(q.shape, DType::F16);
    emu::take_counters();
    kernels.dense_prefill(q.view(), k.view(), v.view(), None, &mut out.view_mut(), None).unwrap();
    let c = emu::take_counters();
    let pairs = (l * (l + 1) / 2) as u64;
    let ideal = 2 * pairs * (d * hq) as u64;
    let ratio = c.cube_macs as f64 / ideal as f64;
    eprintln!("dense prefill L {l} GQA {hq}/{hkv} D {d} f16: {c:?}; cube MACs {ratio:.3}× the causal ideal");
    assert!((1.0..=1.25).contains(&ratio), "cube MACs {ratio:.3}× the causal ideal");
    // Q read once, K and V once per 16-token query tile that reaches them (64 rows = 16 tokens × G 4).
    let kv_bytes = 2 * (hkv * d * 2) as u64 * (0..l / 16).map(|i| 16 * (i as u64 + 1)).sum::<u64>();
    let q_bytes = (l * hq * d * 2) as u64;
    assert!(
        c.gm_read_bytes >= q_bytes + kv_bytes,
        "GM reads {} < Q + K/V tiles {}",
        c.gm_read_bytes,
        q_bytes + kv_bytes
    );

    // The softmax works on whole tiles (≤ 32 rows × 64 keys per AIV, one repeat per row and
    // instruction), not row by row: per-row instructions would average ~1.5 repeats each.
    let per_instr = c.vector_repeats as f64 / c.vector_instrs as f64;
    assert!(
        per_instr >= 8.0,
        "{per_instr:.1} vector repeats per instruction: the softmax went back to row-sized steps"
    );

    // kv_compress: f32 caches score on the vector units, f16/bf16 on the cube.
    let (n, w) = (2048usize, 32usize);
    let dc = DecodeConfig { decode_budget: 512, window: w, ..Default::default() };
    let mut scoring = Vec::new();
    for dtype in [DType::F32, DType::F16] {
        let kc = random([b, hkv, n, d], 1.0, 4, dtype);
        let vc = random([b, hkv, n, d], 1.0, 5, dtype);
        let obs = random([b, hq, w, d], 1.0, 6, dtype);
        emu::take_counters();
        kernels.kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
        let per_kernel = emu::kernel_counters();
        let c = emu::take_counters();
        eprintln!("kv_compress N {n} W {w} GQA {hq}/{hkv} D {d} {dtype} -> 512: {c:?}");
        for (k, kc) in per_kernel {
            eprintln!("    {k}: {kc:?}");
        }
        scoring.push(c);
    }
    // f32: two vector passes over every row-key pair, no cube work. f16: every row-key pair twice
    // on the cube (64-row passes, whole fractals: exactly the ideal), the vector units only
    // for the statistics — at least 10× fewer repeats.
    let pairs = (b * hq * w * n) as u64;
    assert_eq!(scoring[0].cube_macs, 0);
    assert!(scoring[0].vector_repeats >= 2 * pairs * d as u64 * 4 / 256);
    assert_eq!(scoring[1].cube_macs, 2 * pairs * d as u64, "cube scoring at full fractal occupancy");
    assert!(scoring[1].vector_repeats * 10 <= scoring[0].vector_repeats, "{:?}", scoring[1]);
    let c = scoring[0];
    // The two top-k kernels on one long row per head (N 16 K, keep 4000 ≤ the sort's limit).
    let (n, w) = (16384 + 32, 32usize);
    let kc = random([b, hkv, n, 32], 1.0, 10, DType::F16);
    let vc = random([b, hkv, n, 32], 1.0, 11, DType::F16);
    let obs = random([b, hq, w, 32], 1.0, 12, DType::F16);
    let dc = DecodeConfig { decode_budget: 4000 + w, window: w, ..Default::default() };
    let mut topk = Vec::new();
    for (path, entry) in [(ascend::TopK::Sort, "ek_compress_topk"), (ascend::TopK::Select, "ek_compress_select")] {
        let k = Kernels::from_backend(std::sync::Arc::new(emu::AscendEmuBackend::with_topk(path)));
        emu::take_counters();
        k.kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
        let (_, c) = emu::kernel_counters().into_iter().find(|(e, _)| *e == entry).expect("the top-k launch ran");
        eprintln!("top-k {path:?} over {} heads × {} scores, keep 4000: {c:?}", b * hkv, n - w);
        topk.push(c);
    }
    // Selection reads each row ~10 times (8 search passes, the count above t, the compaction).
    let row_bytes = (b * hkv * (n - w) * 4) as u64;
    assert!(topk[1].gm_read_bytes <= 11 * row_bytes, "selection read {} bytes", topk[1].gm_read_bytes);
    assert!(topk[1].vector_repeats as f64 / topk[1].vector_instrs as f64 >= 8.0, "selection works on whole tiles");

    // Decode over 1024-entry caches: scores and P·V per 32-key tile, not per key.
    let cap = 1024usize;
    let qd = random([b, 1, hq, d], 1.0, 7, DType::F16);
    let (kd, vd) = (random([b, hkv, cap, d], 1.0, 8, DType::F16), random([b, hkv, cap, d], 1.0, 9, DType::F16));
    let mut od = poisoned(qd.shape, DType::F16);
    let lengths = vec![cap as u32; b * hkv];
    emu::take_counters();
    kernels.decode_attention(qd.view(), kd.view(), vd.view(), &lengths, None, &mut od.view_mut()).unwrap();
    let cd = emu::take_counters();
    eprintln!("decode 1 query over {cap} entries GQA {hq}/{hkv} D {d} f16: {cd:?}");
    let per_instr = cd.vector_repeats as f64 / cd.vector_instrs as f64;
    assert!(per_instr >= 4.0, "{per_instr:.1} vector repeats per instruction: decode went back to one key at a time");

    // A row is scored against a whole 32-key tile per instruction (not one key per Mul + ReduceSum).
    let per_instr = c.vector_repeats as f64 / c.vector_instrs as f64;
    assert!(per_instr >= 8.0, "{per_instr:.1} vector repeats per instruction: scoring went back to one key at a time");
    paged_selection_reads_what_contiguous_reads(&kernels);
    paged_decode_reads_what_contiguous_reads(&kernels);
}

/// A decode through `attend` over 16-entry interleaved slot-major pages reads the GM bytes the
/// contiguous `decode_attention` reads for the same entries (±5%).
fn paged_decode_reads_what_contiguous_reads(kernels: &Kernels) {
    let (hq, hkv, n, d, dtype) = (8, 2, 1024, 128, DType::F16);
    let q = random([1, 1, hq, d], 1.0, 71, dtype);
    let (kc, vc) = (random([1, hkv, n, d], 1.0, 72, dtype), random([1, hkv, n, d], 1.0, 73, dtype));
    let read = |entry: &str| -> u64 {
        emu::kernel_counters().into_iter().filter(|(k, _)| *k == entry).map(|(_, c)| c.gm_read_bytes).sum()
    };
    let mut out = poisoned(q.shape, dtype);
    emu::take_counters();
    kernels.decode_attention(q.view(), kc.view(), vc.view(), &[n as u32; 2], None, &mut out.view_mut()).unwrap();
    let contiguous = read("ek_decode");
    let pool = common::interleaved_copy(&kc, &vc, 2, 16);
    let mut ws = Workspace::new();
    let mut paged_out = poisoned(q.shape, dtype);
    emu::take_counters();
    kernels.attend(q.view(), &[0, 1, 1], &pool.cache(), &[], None, &mut paged_out.view_mut(), None, &mut ws).unwrap();
    let paged = read("ek_attend");
    let ratio = paged as f64 / contiguous as f64;
    eprintln!("decode over 16-entry pages (attend), N {n}, f16 D {d}: {paged} GM bytes, {ratio:.3}× contiguous decode");
    assert!((0.95..=1.05).contains(&ratio), "paged decode reads {ratio:.3}× the contiguous decode's GM bytes");
}

/// Selection over shuffled pages (`kv_scores`) reads the GM bytes the contiguous `kv_compress`
/// scoring reads for the same keys (±5%), and the in-place compaction reads each moved K/V entry
/// once (plus its list).
fn paged_selection_reads_what_contiguous_reads(kernels: &Kernels) {
    let (b, hq, hkv, n, d, dtype) = (2, 8, 2, 600, 64, DType::F32);
    let cfg = DecodeConfig { decode_budget: 64, window: 8, ..DecodeConfig::latent() };
    let kc = random([b, hkv, n, d], 1.0, 61, dtype);
    let vc = random([b, hkv, n, d], 1.0, 62, dtype);
    let obs = random([b, hq, cfg.window, d], 1.0, 63, dtype);
    let scoring = |per_kernel: Vec<(&'static str, emu::Counters)>| -> u64 {
        per_kernel
            .into_iter()
            .filter(|(k, _)| matches!(*k, "ek_compress_stats" | "ek_compress_means"))
            .map(|(_, c)| c.gm_read_bytes)
            .sum()
    };
    emu::take_counters();
    kernels.kv_compress(kc.view(), vc.view(), obs.view(), &cfg).unwrap();
    let contiguous = scoring(emu::kernel_counters());
    emu::take_counters();
    let mut pool = common::interleaved_copy(&kc, &vc, b, 16);
    let mut ws = Workspace::new();
    emu::take_counters();
    let sel = kernels.kv_select(&pool.cache(), obs.view(), &cfg, &[]).unwrap();
    let paged = scoring(emu::kernel_counters());
    let ratio = paged as f64 / contiguous as f64;
    eprintln!(
        "selection over 16-entry pages, N {n}, f32 D {d}: scoring reads {paged} GM bytes, {ratio:.3}× contiguous"
    );
    assert!((0.95..=1.05).contains(&ratio), "paged scoring reads {ratio:.3}× the contiguous scoring's bytes");
    emu::take_counters();
    kernels.kv_compact(&mut pool.cache_mut(), &sel, &mut ws).unwrap();
    let (_, compact) =
        emu::kernel_counters().into_iter().find(|(k, _)| *k == "ek_compress_compact").expect("the compaction ran");
    let moved = common::moved_entries(&sel, b, hkv);
    let moved_bytes = (2 * moved * d * dtype.size()) as u64;
    eprintln!("in-place compaction {n} → {}: {moved} entries moved, {compact:?}", cfg.decode_budget);
    assert!(
        compact.gm_read_bytes >= moved_bytes && compact.gm_read_bytes <= moved_bytes + moved_bytes / 20,
        "compaction read {} GM bytes for {moved_bytes} bytes of moved entries",
        compact.gm_read_bytes
    );
}

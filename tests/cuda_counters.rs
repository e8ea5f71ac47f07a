//! What the emulated CUDA kernels do, counted (`cuda::emu::counters`): tensor-core multiply-adds
//! against the causal ideal, `ldmatrix` per `mma`, bytes brought in by `cp.async`, the decode's
//! cache bytes against one read. One test in its
//! own binary: the counters are process-wide. Print with `-- --nocapture`.
#![cfg(feature = "cuda-emu")]

mod common;

use entropy_kernels::cuda::{PrefillTile, emu};
use entropy_kernels::*;

/// The work of one dense prefill with the prefill tile forced to `tile`.
fn dense_prefill_counts(tile: PrefillTile, l: usize, hq: usize, hkv: usize, d: usize) -> emu::Counters {
    let mut be = emu::backend().expect("the emulated driver loads");
    be.set_prefill_tile(tile);
    let k = Kernels::from_backend(std::sync::Arc::new(be));
    let dtype = DType::F16;
    let q = common::random([1, l, hq, d], 1.0, 1, dtype);
    let kk = common::random([1, l, hkv, d], 1.0, 2, dtype);
    let v = common::random([1, l, hkv, d], 1.0, 3, dtype);
    let mut out = common::poisoned([1, l, hq, d], dtype);
    let c0 = emu::counters().unwrap();
    k.dense_prefill(q.view(), kk.view(), v.view(), None, &mut out.view_mut(), None).unwrap();
    emu::counters().unwrap() - c0
}

#[test]
fn tensor_core_work_is_close_to_the_ideal() {
    if !common::cuda_kernels_available("tensor_core_work_is_close_to_the_ideal") {
        return;
    }
    let be = emu::backend().expect("the emulated driver loads");
    let k = Kernels::from_backend(std::sync::Arc::new(be));
    let (l, hq, hkv, d) = (512, 8, 2, 128);
    let dtype = DType::F16;
    let dense = dense_prefill_counts(PrefillTile::M64, l, hq, hkv, d);
    let dense128 = dense_prefill_counts(PrefillTile::M128, l, hq, hkv, d);
    // Q·Kᵀ and P·V over the causal triangle: 2 · D · Hq · L(L+1)/2.
    let ideal = (2 * d * hq * l * (l + 1) / 2) as f64;
    let dense_ratio = dense.mma_macs() as f64 / ideal;
    let dense128_ratio = dense128.mma_macs() as f64 / ideal;
    // Each K and V row of a kv head once: the least any kernel reads.
    let kv_bytes = (2 * l * hkv * d * 2) as f64;
    // Q, also by cp.async, is read once by either tile.
    let q_bytes = (l * hq * d * 2) as f64;

    let (n, w) = (2048, 32);
    let kc = common::random([1, hkv, n, d], 1.0, 4, dtype);
    let vc = common::random([1, hkv, n, d], 1.0, 5, dtype);
    let obs = common::random([1, hq, w, d], 1.0, 6, dtype);
    let cfg = DecodeConfig { decode_budget: 512, window: w, ..DecodeConfig::default() };
    let c1 = emu::counters().unwrap();
    k.kv_compress(kc.view(), vc.view(), obs.view(), &cfg).unwrap();
    let compress = emu::counters().unwrap() - c1;
    // Two passes of obs·Kᵀ: every window row against every key, then against the scored ones.
    let rows = hq * w;
    let compress_ideal = (rows * (n + n - w) * d) as f64;
    let compress_ratio = compress.mma_macs() as f64 / compress_ideal;

    // Decode over 1024-entry caches: every K and V row of the heads' lengths read exactly once.
    let (cache_n, lens) = (1024, [1024u32, 700]);
    let kc = common::random([1, hkv, cache_n, d], 1.0, 7, dtype);
    let vc = common::random([1, hkv, cache_n, d], 1.0, 8, dtype);
    let q1 = common::random([1, 1, hq, d], 1.0, 9, dtype);
    let mut dec = common::poisoned([1, 1, hq, d], dtype);
    let c2 = emu::counters().unwrap();
    k.decode_attention(q1.view(), kc.view(), vc.view(), &lens, None, &mut dec.view_mut()).unwrap();
    let decode = emu::counters().unwrap() - c2;
    let decode_ideal = 2 * lens.iter().map(|&x| x as u64).sum::<u64>() * (d as u64) * 2;

    eprintln!(
        "| op (f16, GQA {hq}/{hkv}, D {d}) | mma MACs | / ideal | ldmatrix per mma | cp.async bytes | / K+V once | barriers |"
    );
    eprintln!("|---|---:|---:|---:|---:|---:|---:|");
    for (m, c, ratio) in [(64, &dense, dense_ratio), (128, &dense128, dense128_ratio)] {
        eprintln!(
            "| dense prefill, L {l}, {m}-row tiles | {:.1} M | {ratio:.3} | {:.3} | {:.1} MB | {:.1} | {} |",
            c.mma_macs() as f64 / 1e6,
            c.ldmatrix as f64 / c.mma as f64,
            c.cp_async_bytes as f64 / 1e6,
            (c.cp_async_bytes as f64 - q_bytes) / kv_bytes,
            c.barriers
        );
    }
    eprintln!(
        "| kv_compress, N {n}, W {w} | {:.1} M | {compress_ratio:.3} | {:.3} | — | — | {} |",
        compress.mma_macs() as f64 / 1e6,
        compress.ldmatrix as f64 / compress.mma as f64,
        compress.barriers
    );
    eprintln!(
        "| decode, N {cache_n} (lengths {lens:?}) | — | — | — | {:.2} MB loaded | {:.3} | {} |",
        decode.ld_global_bytes as f64 / 1e6,
        decode.ld_global_bytes as f64 / decode_ideal as f64,
        decode.barriers
    );
    assert_eq!(decode.ld_global_bytes, decode_ideal, "decode must read each cache row once");
    // 64-row tiles stack 16 tokens × 4 heads over 64-key tiles: the diagonal's padding costs 12%.
    assert!((1.0..=1.15).contains(&dense_ratio), "dense prefill: {dense_ratio:.3} × the causal ideal");
    assert!((1.0..=1.25).contains(&dense128_ratio), "dense prefill, 128 rows: {dense128_ratio:.3} × the ideal");
    // 128-row tiles read each K/V tile for twice the query rows: about half the re-reads.
    let (kv64, kv128) = (dense.cp_async_bytes as f64 - q_bytes, dense128.cp_async_bytes as f64 - q_bytes);
    assert!(kv128 <= 0.6 * kv64, "K/V by cp.async: {kv128} bytes with 128-row tiles vs {kv64} with 64");
    assert!((1.0..=1.05).contains(&compress_ratio), "kv_compress scoring: {compress_ratio:.3} × the ideal");
    // ldmatrix.x4 feeds two mma (Q's A fragment is reused across a k-step's 8 key tiles).
    assert!(dense.ldmatrix * 2 <= dense.mma + dense.mma / 4, "{} ldmatrix for {} mma", dense.ldmatrix, dense.mma);
}

//! The CUDA kernels' block-wide top-k code (`cuda/topk.cuh`) run on the host, one OS thread per
//! CUDA thread (`entropy_kernels::cuda::host_check`), against a plain sort: radix selection
//! (kv_compress's top-k, any keep) and the ranking (planning's: selection, then a bitonic sort or
//! counting), with exact ties,
//! several block sizes, lengths off the block and digit boundaries. Runs without a GPU.
#![cfg(feature = "cuda")]

mod common;

use common::seed;
use entropy_kernels::cuda::host_check;

/// The `k` best indices (larger first, ties to the lower index, NaN last) by a plain stable sort.
fn best(scores: &[f64], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    idx.sort_by(|&a, &b| entropy_kernels::numerics::rank_cmp(scores[a as usize], scores[b as usize]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Scores with exact ties: `levels` distinct values (0 for all distinct), some negative.
fn scores(n: usize, levels: usize, s: u64) -> Vec<f32> {
    let mut x = s | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            if levels == 0 { (u * 2.0 - 0.5) as f32 } else { ((u * levels as f64) as usize) as f32 * 0.25 - 0.5 }
        })
        .collect()
}

#[test]
fn radix_select_keeps_the_best_in_ascending_order() {
    let s = seed("radix_select");
    let cases = [
        (1usize, 1usize, 0usize, 32u32),
        (37, 5, 0, 32),
        (1000, 999, 0, 64),
        (3001, 1500, 3, 128),
        (5000, 4500, 0, 512),
        (5000, 2000, 2, 512),
        (7001, 6000, 1, 256), // every score ties: the lowest positions
        (2049, 1024, 7, 512),
    ];
    for (i, (n, k, levels, threads)) in cases.into_iter().enumerate() {
        let x = scores(n, levels, s ^ (i as u64 * 7919));
        let mut want = best(&x.iter().map(|&v| v as f64).collect::<Vec<_>>(), k);
        want.sort_unstable();
        let got = host_check::block_select(&x, k, threads).unwrap();
        assert_eq!(got, want, "n {n} k {k} levels {levels} threads {threads}");
    }
}

#[test]
fn bitonic_topk_ranks_the_best() {
    let s = seed("bitonic_topk");
    // Sorted in shared memory up to 2048, ranked by counting beyond; exact ties; k past the count.
    for (i, (n, k, levels, threads)) in [
        (10usize, 10usize, 0usize, 32u32),
        (3000, 1024, 0, 512),
        (2500, 700, 4, 256),
        (1500, 1024, 1, 512),
        (5000, 2048, 3, 512),
        (5000, 3000, 5, 512),
        (2600, 2600, 0, 256),
        (100, 300, 2, 64),
    ]
    .into_iter()
    .enumerate()
    {
        let mut x: Vec<f64> = scores(n, levels, s ^ (i as u64 * 104729)).iter().map(|&v| v as f64).collect();
        // NaNs of both signs (x86 and the GPU make opposite ones) rank last, like the host's.
        x[n / 3] = f64::from_bits(0x7FF8_0000_0000_0000);
        x[n / 2] = f64::from_bits(0xFFF8_0000_0000_0001);
        let got = host_check::block_topk(&x, k, threads).unwrap();
        assert_eq!(got, best(&x, k), "n {n} k {k} levels {levels} threads {threads}");
    }
}

#[test]
fn bad_blocks_are_typed_errors() {
    assert!(host_check::block_select(&[1.0, 2.0], 1, 48).is_err());
    assert!(host_check::block_select(&[1.0, 2.0], 3, 32).is_err());
    assert!(host_check::block_topk(&[1.0; 2000], 1025, 48).is_err());
}

//! What the emulated CUDA kernels do, counted (`cuda::emu::counters`): tensor-core multiply-adds
//! against the causal ideal, `ldmatrix` per `mma`, bytes brought in by `cp.async`, the decode's
//! cache bytes against one read, paged decode's bytes against contiguous decode's, selection over
//! pages against the contiguous compression's scoring, the in-place compaction's moves. One test
//! in its own binary: the counters are process-wide. Print with `-- --nocapture`.
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

    // The same decode through `attend` over 16-entry pages (slot-major, interleaved with another
    // sequence's): the paged path reads the bytes the contiguous one reads, no more (±5%).
    let full = [cache_n as u32; 2];
    let pool = common::interleaved_copy(&kc, &vc, 2, 16);
    let mut ws = Workspace::new();
    let qt = HostTensor::from_f32(&q1.to_f32_vec(), [1, 1, hq, d], dtype);
    let mut paged_out = common::poisoned([1, 1, hq, d], dtype);
    // The second sequence has no query: only the first sequence's cache is read.
    let c3 = emu::counters().unwrap();
    k.attend(qt.view(), &[0, 1, 1], &pool.cache(), &[], None, &mut paged_out.view_mut(), None, &mut ws).unwrap();
    let paged = emu::counters().unwrap() - c3;
    let mut contiguous_out = common::poisoned([1, 1, hq, d], dtype);
    let c4 = emu::counters().unwrap();
    k.decode_attention(q1.view(), kc.view(), vc.view(), &full, None, &mut contiguous_out.view_mut()).unwrap();
    let contiguous = emu::counters().unwrap() - c4;
    let paged_ratio = paged.ld_global_bytes as f64 / contiguous.ld_global_bytes as f64;
    eprintln!(
        "| decode over 16-entry pages (attend), N {cache_n} | — | — | — | {:.2} MB loaded | {paged_ratio:.3} × contiguous | {} |",
        paged.ld_global_bytes as f64 / 1e6,
        paged.barriers
    );
    assert!(
        (0.95..=1.05).contains(&paged_ratio),
        "paged decode reads {paged_ratio:.3} × the contiguous decode's bytes"
    );

    // The device-resident decode step over those pages: append_on + a planned run_attend_on
    // allocate nothing and copy nothing from the host (what a captured CUDA graph replays).
    {
        use entropy_kernels::cuda::{CudaAttendPlan, CudaPagedCache, CudaTensor, CudaTensorMut};
        let be = emu::backend().expect("the emulated driver loads");
        let stream = be.stream().clone();
        let bits =
            |t: &HostTensor| -> Vec<half::f16> { t.to_f32_vec().iter().map(|&x| half::f16::from_f32(x)).collect() };
        let mut dc = CudaPagedCache::<half::f16>::upload(&stream, &pool).unwrap();
        // One token for the second (empty) sequence: the first fills its pages.
        let cu = [0u32, 0, 1];
        let cud = stream.clone_htod(&cu).unwrap();
        let new = common::random([1, 1, hkv, d], 1.0, 10, dtype);
        let newd = stream.clone_htod(&bits(&new)).unwrap();
        let qd = stream.clone_htod(&bits(&qt)).unwrap();
        let mut od = stream.alloc_zeros::<half::f16>(hq * d).unwrap();
        let mut plan = CudaAttendPlan::new();
        let mut step_ws = Workspace::new();
        // The plan for the cache after the append (the engine knows its lengths ahead).
        let after: Vec<u32> = dc.lens_host.iter().enumerate().map(|(u, &l)| l + u32::from(u >= hkv)).collect();
        {
            let cache = dc.view_with_lens(&after, &stream).unwrap();
            let qv = CudaTensor::bsnd(&qd, &stream, qt.shape);
            let ov = CudaTensorMut::bsnd(&mut od, &stream, qt.shape);
            be.plan_attend_on(&stream, &mut plan, &qv, &cu, &cache, &[], None, &ov, None).unwrap();
        }
        let c5 = emu::counters().unwrap();
        {
            let nv = CudaTensor::bsnd(&newd, &stream, new.shape);
            be.append_on(&stream, &nv, &nv, &cu, &cud, &mut dc.view_mut(&stream).unwrap(), &mut step_ws).unwrap();
        }
        {
            let cache = dc.view(&stream).unwrap();
            let qv = CudaTensor::bsnd(&qd, &stream, qt.shape);
            let mut ov = CudaTensorMut::bsnd(&mut od, &stream, qt.shape);
            be.run_attend_on(&stream, &plan, &qv, &cache, &mut ov, None).unwrap();
        }
        stream.synchronize().unwrap();
        let step = emu::counters().unwrap() - c5;
        eprintln!(
            "device decode step (append_on + run_attend_on): {} allocations, {} host-to-device copies",
            step.allocations, step.htod_copies
        );
        assert_eq!((step.allocations, step.htod_copies), (0, 0), "a planned decode step allocates or copies");
    }
    compression_over_pages_reads_what_contiguous_reads(&k);
    chunked_prefill_reads_what_one_shot_reads(&k);
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

/// Selection over shuffled pages reads the key bytes the contiguous `kv_compress` scoring reads
/// (each head's N keys for the softmax statistics, its N − W scored keys again for the window
/// means: the ideal, exactly); the in-place compaction loads each moved K/V entry once, at most
/// the kept entries, and allocates and copies nothing.
fn compression_over_pages_reads_what_contiguous_reads(k: &Kernels) {
    use entropy_kernels::cuda::{CudaPagedCache, CudaTensor};
    let (b, hq, hkv, n, d, dtype) = (2, 8, 2, 600, 64, DType::F16);
    let cfg = DecodeConfig { decode_budget: 64, window: 8, ..DecodeConfig::latent() };
    let kc = common::random([b, hkv, n, d], 1.0, 61, dtype);
    let vc = common::random([b, hkv, n, d], 1.0, 62, dtype);
    let obs = common::random([b, hq, cfg.window, d], 1.0, 63, dtype);
    let c0 = emu::counters().unwrap();
    k.kv_compress(kc.view(), vc.view(), obs.view(), &cfg).unwrap();
    let contiguous = emu::counters().unwrap() - c0;
    // The same entries on 16-entry pages, the sequences' pages interleaved.
    let pool = common::interleaved_copy(&kc, &vc, b, 16);
    let mut ws = Workspace::new();
    let c1 = emu::counters().unwrap();
    let sel = k.kv_select(&pool.cache(), obs.view(), &cfg, &[]).unwrap();
    let paged = emu::counters().unwrap() - c1;
    let ideal = (b * hkv * (2 * n - cfg.window) * d * dtype.size()) as u64;
    eprintln!(
        "| selection over 16-entry pages, N {n} | — | — | — | {:.2} MB loaded | {:.3} × contiguous scoring, {:.3} × ideal | {} |",
        paged.ld_global_bytes as f64 / 1e6,
        paged.ld_global_bytes as f64 / contiguous.ld_global_bytes as f64,
        paged.ld_global_bytes as f64 / ideal as f64,
        paged.barriers
    );
    assert_eq!(contiguous.ld_global_bytes, ideal, "kv_compress scoring reads each key once per pass");
    assert_eq!(paged.ld_global_bytes, ideal, "selection over pages reads what the contiguous scoring reads");

    // Device-resident: select_on, then compact_on (counted alone).
    let be = emu::backend().expect("the emulated driver loads");
    let stream = be.stream().clone();
    let bits = |t: &HostTensor| -> Vec<half::f16> { t.to_f32_vec().iter().map(|&x| half::f16::from_f32(x)).collect() };
    let mut dc = CudaPagedCache::<half::f16>::upload(&stream, &pool).unwrap();
    let od = stream.clone_htod(&bits(&obs)).unwrap();
    let dsel = be
        .select_on(&stream, &dc.view(&stream).unwrap(), &CudaTensor::bsnd(&od, &stream, obs.shape), &cfg, &[])
        .unwrap();
    assert_eq!(dsel.to_host(&stream).unwrap(), sel, "select_on = kv_select");
    stream.synchronize().unwrap();
    let c2 = emu::counters().unwrap();
    be.compact_on(&stream, &mut dc.view_mut(&stream).unwrap(), &dsel, &mut ws).unwrap();
    stream.synchronize().unwrap();
    let compact = emu::counters().unwrap() - c2;
    let moved = common::moved_entries(&sel, b, hkv);
    let moved_bytes = (2 * moved * d * dtype.size()) as u64;
    eprintln!(
        "| in-place compaction {n} → {} | — | — | — | {:.3} MB loaded | {moved} entries moved | {} allocations, {} host copies |",
        cfg.decode_budget,
        compact.ld_global_bytes as f64 / 1e6,
        compact.allocations,
        compact.htod_copies
    );
    assert_eq!(compact.ld_global_bytes, moved_bytes, "compaction loads each moved K and V entry once");
    assert_eq!((compact.allocations, compact.htod_copies), (0, 0), "compact_on allocates or copies");
}

/// A ragged batch prefilled in chunks (sparse `streaming` plans from `plan_chunks`, attention per
/// chunk over the pages) loads the K/V bytes the same prompts' one-shot prefill loads (±5%): a
/// query sees the same keys either way, and no tile reads a key twice because the prompt was cut.
fn chunked_prefill_reads_what_one_shot_reads(k: &Kernels) {
    let (hq, hkv, d, dtype, ps) = (4, 2, 64, DType::F16, 16);
    let lens = [192usize, 160, 128, 176];
    let chunk = 48;
    let cfg = EntropyConfig {
        segment_size: 16,
        block_size: 4,
        threshold_len: 16,
        base_budget: 12,
        head_class: HeadClassMode::Streaming,
        ..EntropyConfig::default()
    };
    let prompts: Vec<(HostTensor, HostTensor, HostTensor)> =
        lens.iter().enumerate().map(|(i, &l)| common::random_qkv([1, l, hq, hkv, d], 70 + i as u64, dtype)).collect();
    let prompt_lens: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
    let n = lens.len();
    let width = 192 / ps;
    // Rows `rows(i)` of every prompt's tensor `which` (0 q, 1 k, 2 v) as a THD batch.
    let pack = |which: usize, rows: &dyn Fn(usize) -> std::ops::Range<usize>| -> (HostTensor, Vec<u32>) {
        let h = if which == 0 { hq } else { hkv };
        let (mut vals, mut cu) = (Vec::new(), vec![0u32]);
        for (i, p) in prompts.iter().enumerate() {
            let t = [&p.0, &p.1, &p.2][which];
            let r = rows(i);
            vals.extend_from_slice(&t.to_f32_vec()[r.start * h * d..r.end * h * d]);
            cu.push(cu.last().unwrap() + r.len() as u32);
        }
        (HostTensor::from_f32(&vals, [1, *cu.last().unwrap() as usize, h, d], dtype), cu)
    };
    // Prefills in rounds of `step` tokens per sequence; the attention's loads, summed.
    let prefill = |step: usize| -> (u64, usize) {
        let layout = PageLayout::slot_major(n * width, ps, hkv, d);
        let mut pool = PagedCache::interleaved(dtype, layout, n, width).unwrap();
        let mut states = vec![PlanState::new(); n * hkv];
        let mut ws = Workspace::new();
        let (mut bytes, mut sparse) = (0, 0);
        let rounds = lens.iter().map(|l| l.div_ceil(step)).max().unwrap();
        for r in 0..rounds {
            let rows = |i: usize| (r * step).min(lens[i])..((r + 1) * step).min(lens[i]);
            let ((q, cu), (kn, _), (vn, _)) = (pack(0, &rows), pack(1, &rows), pack(2, &rows));
            k.append(kn.view(), vn.view(), &cu, &mut pool.cache_mut(), &mut ws).unwrap();
            let plans = k
                .plan_chunks(
                    q.view(),
                    &cu,
                    &pool.cache(),
                    &prompt_lens,
                    std::slice::from_ref(&cfg),
                    &mut states,
                    &ChunkRequest::default(),
                )
                .unwrap();
            sparse += plans.iter().map(|p| p.blocks.sparse_units()).sum::<usize>();
            let blocks: Vec<Option<&BlockLists>> = plans.iter().map(|p| Some(&p.blocks)).collect();
            let mut out = common::poisoned(q.shape, dtype);
            let c0 = emu::counters().unwrap();
            k.attend(q.view(), &cu, &pool.cache(), &blocks, None, &mut out.view_mut(), None, &mut ws).unwrap();
            bytes += (emu::counters().unwrap() - c0).ld_global_bytes;
        }
        (bytes, sparse)
    };
    let (one_shot, sparse_one_shot) = prefill(192);
    let (chunked, sparse_chunked) = prefill(chunk);
    let ratio = chunked as f64 / one_shot as f64;
    eprintln!(
        "| ragged chunked prefill {lens:?} in {chunk}-token chunks (sparse) | — | — | — | {:.2} MB loaded | {ratio:.3} × one-shot | — |",
        chunked as f64 / 1e6
    );
    assert_eq!(sparse_chunked, sparse_one_shot, "the chunks' plans are the one-shot plans");
    assert!(sparse_one_shot > 0, "the case must plan sparse segments");
    assert!((0.95..=1.05).contains(&ratio), "chunked prefill loads {ratio:.3} × the one-shot's K/V bytes");
}

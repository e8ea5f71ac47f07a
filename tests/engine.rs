//! The engine interface (SPEC §7) against the oracle and against the one-shot paths: ragged
//! batches over paged caches with shuffled page ids, chunked `streaming` planning at random
//! multiples of S, decode over pages, LSE merging, no leaks between sequences, and a typed error
//! for every malformed argument. Random inputs drawn fresh per seed; outputs NaN-poisoned.
#![allow(clippy::needless_range_loop)] // loops over sequences and shards mirror the spec

mod common;

use common::{check, poisoned, random, seeds, with_case};
use entropy_kernels::synth::Rng;
use entropy_kernels::*;

const PAGE_SIZES: [usize; 4] = [8, 16, 64, 256];

/// Backends that run the engine calls `ops` (the oracle included: its chunked path is checked
/// against its own one-shot path, an independent transcription). Others are skipped with the reason.
fn engine_backends(test: &str, ops: &[Op]) -> Vec<Kernels> {
    let mut out = vec![Kernels::reference()];
    let backends = common::backends_under_test(test).into_iter();
    // The Ascend backend's resident-cache calls too (over the mock ACL library without an NPU).
    #[cfg(all(feature = "ascend", feature = "ascend-emu"))]
    let backends = backends.chain(common::resident::open(test));
    for k in backends {
        if ops.iter().all(|&op| common::runs(test, &k, op)) {
            out.push(k);
        }
    }
    out
}

/// A page pool with shuffled page ids: `seqs` rows of `width` pages, spare pages never used,
/// unwritten entries NaN (a read of one shows up in the outputs), either layout.
fn shuffled_pool(
    rng: &mut Rng,
    dtype: DType,
    seqs: usize,
    heads: usize,
    d: usize,
    capacity: usize,
    page_size: usize,
) -> PagedCache {
    let width = capacity.div_ceil(page_size).max(1);
    let pages = seqs * width + 3;
    let mut ids: Vec<u32> = (0..pages as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    ids.truncate(seqs * width);
    let layout = if rng.below(2) == 0 {
        PageLayout::slot_major(pages, page_size, heads, d)
    } else {
        PageLayout::head_major(pages, page_size, heads, d)
    };
    PagedCache::new(dtype, layout, ids, width, f32::NAN).unwrap()
}

/// Keys `[B, H, cap, D]` into a pool's pages, each head's first `lens[b·H + h]` entries (heads of
/// their own lengths, as compaction leaves them); the pool's lengths become `lens`.
fn fill_keys(pool: &mut PagedCache, kc: &HostTensor, lens: &[u32]) {
    pool.k = filled_pool(pool, &pool.k, kc, lens);
    pool.lens = lens.to_vec();
}

/// `pool_data` (the K or V pool of `pool`) with each head's first `lens[b·H + h]` entries of `src`
/// `[B, H, cap, D]` written into its pages.
fn filled_pool(pool: &PagedCache, pool_data: &HostTensor, src: &HostTensor, lens: &[u32]) -> HostTensor {
    let [b, hc, cap, d] = src.shape;
    let (src, ps) = (src.to_f32_vec(), pool.layout.page_size);
    let mut dst = pool_data.to_f32_vec();
    for i in 0..b {
        for h in 0..hc {
            for n in 0..lens[i * hc + h] as usize {
                let o = pool.layout.offset(pool.ids[i * pool.width + n / ps] as usize, n % ps, h);
                let from = ((i * hc + h) * cap + n) * d;
                dst[o..o + d].copy_from_slice(&src[from..from + d]);
            }
        }
    }
    HostTensor::from_f32(&dst, pool_data.shape, pool_data.dtype())
}

/// Rows `rows` of `[1, L, H, D]` tensors, concatenated along tokens: a THD batch and its `cu`.
fn pack(parts: &[(&HostTensor, std::ops::Range<usize>)]) -> (HostTensor, Vec<u32>) {
    let [_, _, h, d] = parts[0].0.shape;
    let mut vals = Vec::new();
    let mut cu = vec![0u32];
    for (t, rows) in parts {
        let f = t.to_f32_vec();
        vals.extend_from_slice(&f[rows.start * h * d..rows.end * h * d]);
        cu.push(cu.last().unwrap() + rows.len() as u32);
    }
    let n = *cu.last().unwrap() as usize;
    (HostTensor::from_f32(&vals, [1, n, h, d], parts[0].0.dtype()), cu)
}

/// Tokens `rows` of a THD tensor as a `[1, rows, H, D]` tensor.
fn unpack(t: &HostTensor, rows: std::ops::Range<usize>) -> Vec<f32> {
    let [_, _, h, d] = t.shape;
    t.to_f32_vec()[rows.start * h * d..rows.end * h * d].to_vec()
}

/// One sequence's prompt: BSND q/k/v `[1, L, H, D]`.
struct Prompt {
    q: HostTensor,
    k: HostTensor,
    v: HostTensor,
}

fn prompt(l: usize, hq: usize, hkv: usize, d: usize, seed: u64, dtype: DType) -> Prompt {
    let (q, k, v) = common::random_qkv([1, l, hq, hkv, d], seed, dtype);
    Prompt { q, k, v }
}

/// Output rows and LSEs `[T, Hq]` of one sequence checked against the oracle's one-shot answer.
fn check_sequence(tag: &str, kind: BackendKind, p: &Prompt, out: Vec<f32>, lse: &[f32], blocks: Option<&BlockLists>) {
    let [_, l, hq, d] = p.q.shape;
    let got = HostTensor::from_f32(&out, [1, l, hq, d], p.q.dtype());
    let exact = check::exact_prefill(p.q.view(), p.k.view(), p.v.view(), blocks);
    check::check_out(tag, kind, &got, &exact);
    // [T, Hq] → the oracle's [B = 1, Hq, L].
    let lse_bhl: Vec<f32> = (0..hq).flat_map(|h| (0..l).map(move |t| lse[t * hq + h])).collect();
    check::check_lse(tag, &lse_bhl, &exact);
}

fn cfg_for(rng: &mut Rng) -> EntropyConfig {
    EntropyConfig {
        segment_size: 16,
        block_size: 4,
        threshold_len: [0, 16, 32][rng.below(3)],
        base_budget: [8, 12, 20][rng.below(3)],
        // Large thresholds make heads rigid for a while, then dynamic: the streaming rule's case.
        e_t: [1e-5, 1.5, 2.5][rng.below(3)],
        budget_mode: if rng.below(2) == 0 { BudgetMode::PerHead } else { BudgetMode::SegmentMax },
        head_class: HeadClassMode::Streaming,
        ..EntropyConfig::default()
    }
}

/// A ragged batch of dense prefills in one call equals each sequence alone (the oracle's
/// one-shot answer), over a paged cache with shuffled page ids, every page size and dtype.
#[test]
fn ragged_dense_batch_equals_each_sequence() {
    for seed in seeds("ragged_dense_batch_equals_each_sequence") {
        let mut rng = Rng::new(seed);
        for kernels in engine_backends("ragged_dense", &[Op::Attend]) {
            for dtype in DType::ALL {
                let (hkv, g, d) = ([1, 2, 4][rng.below(3)], [1, 2, 3][rng.below(3)], [16, 40, 64][rng.below(3)]);
                let hq = hkv * g;
                let lens: Vec<usize> = (0..3).map(|_| 1 + rng.below(150)).collect();
                let ps = PAGE_SIZES[rng.below(4)];
                let tag =
                    format!("seed {seed} {} {dtype} lens {lens:?} page {ps} hq {hq} hkv {hkv} d {d}", kernels.kind());
                with_case(&tag, || {
                    let prompts: Vec<Prompt> = lens
                        .iter()
                        .enumerate()
                        .map(|(i, &l)| prompt(l, hq, hkv, d, seed ^ (i as u64 * 77), dtype))
                        .collect();
                    let mut pool = shuffled_pool(&mut rng, dtype, 3, hkv, d, 160, ps);
                    let whole = |t: &Prompt| t.q.shape[1];
                    let (q, cu) = pack(&prompts.iter().map(|p| (&p.q, 0..whole(p))).collect::<Vec<_>>());
                    let (k, _) = pack(&prompts.iter().map(|p| (&p.k, 0..whole(p))).collect::<Vec<_>>());
                    let (v, _) = pack(&prompts.iter().map(|p| (&p.v, 0..whole(p))).collect::<Vec<_>>());
                    let mut ws = Workspace::new();
                    kernels.append(k.view(), v.view(), &cu, &mut pool.cache_mut(), &mut ws).unwrap();
                    let mut out = poisoned(q.shape, dtype);
                    let mut lse = vec![f32::NAN; q.shape[1] * hq];
                    kernels
                        .attend(q.view(), &cu, &pool.cache(), &[], None, &mut out.view_mut(), Some(&mut lse), &mut ws)
                        .unwrap();
                    for (i, p) in prompts.iter().enumerate() {
                        let rows = cu[i] as usize..cu[i + 1] as usize;
                        let lse_i = &lse[rows.start * hq..rows.end * hq];
                        check_sequence(&format!("{tag} seq {i}"), kernels.kind(), p, unpack(&out, rows), lse_i, None);
                    }
                });
            }
        }
    }
}

/// What one sequence's chunked run produced: its plans per chunk and its output rows.
struct Chunked {
    plans: Vec<Plan>,
    out: Vec<f32>,
    lse: Vec<f32>,
}

/// Prefills `prompts` in rounds: in round r every sequence brings its r-th chunk (boundaries
/// `cuts[i]`, multiples of S, ending at its length) or nothing; each round appends, plans the
/// chunks continuing the states, and attends with the plans.
fn run_chunked(
    kernels: &Kernels,
    prompts: &[Prompt],
    cuts: &[Vec<usize>],
    cfgs: &[EntropyConfig],
    pool: &mut PagedCache,
) -> Vec<Chunked> {
    // A backend without chunked planning kernels attends with the CPU backend's plans (the
    // decisions are the oracle's either way; its attention is what this checks).
    let cpu = Kernels::cpu();
    let planner = if kernels.capabilities().supports(Op::PlanChunks) {
        kernels
    } else {
        eprintln!("[run_chunked] {}: chunks planned by the CPU backend (no plan_chunks kernel yet)", kernels.kind());
        &cpu
    };
    let n = prompts.len();
    let hq = prompts[0].q.shape[2];
    let hkv = prompts[0].k.shape[2];
    let dtype = prompts[0].q.dtype();
    let mut states = vec![PlanState::new(); n * hkv];
    let mut ws = Workspace::new();
    let mut res: Vec<Chunked> = (0..n).map(|_| Chunked { plans: vec![], out: vec![], lse: vec![] }).collect();
    let prompt_lens: Vec<u32> = prompts.iter().map(|p| p.q.shape[1] as u32).collect();
    let rounds = cuts.iter().map(Vec::len).max().unwrap();
    for r in 0..rounds {
        let range = |i: usize| -> std::ops::Range<usize> {
            let c = &cuts[i];
            if r >= c.len() { c[c.len() - 1]..c[c.len() - 1] } else { (if r == 0 { 0 } else { c[r - 1] })..c[r] }
        };
        let (q, cu) = pack(&(0..n).map(|i| (&prompts[i].q, range(i))).collect::<Vec<_>>());
        let (k, _) = pack(&(0..n).map(|i| (&prompts[i].k, range(i))).collect::<Vec<_>>());
        let (v, _) = pack(&(0..n).map(|i| (&prompts[i].v, range(i))).collect::<Vec<_>>());
        kernels.append(k.view(), v.view(), &cu, &mut pool.cache_mut(), &mut ws).unwrap();
        let plans = planner
            .plan_chunks(q.view(), &cu, &pool.cache(), &prompt_lens, cfgs, &mut states, &ChunkRequest::default())
            .unwrap();
        let blocks: Vec<Option<&BlockLists>> = plans.iter().map(|p| Some(&p.blocks)).collect();
        let mut out = poisoned(q.shape, dtype);
        let mut lse = vec![f32::NAN; q.shape[1] * hq];
        kernels
            .attend(q.view(), &cu, &pool.cache(), &blocks, None, &mut out.view_mut(), Some(&mut lse), &mut ws)
            .unwrap();
        for (i, plan) in plans.into_iter().enumerate() {
            let rows = cu[i] as usize..cu[i + 1] as usize;
            res[i].out.extend(unpack(&out, rows.clone()));
            res[i].lse.extend_from_slice(&lse[rows.start * hq..rows.end * hq]);
            if !rows.is_empty() {
                res[i].plans.push(plan);
            }
        }
    }
    res
}

/// Random chunk boundaries of a prompt of `l` tokens: multiples of `s`, ending at `l`.
fn random_cuts(rng: &mut Rng, l: usize, s: usize) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut at = 0;
    while at < l {
        at = (at + s * (1 + rng.below(3))).min(l);
        cuts.push(at);
    }
    cuts
}

/// The decisions of segments `plan.planned` equal the one-shot plan's, bit for bit.
fn check_chunk_decisions(tag: &str, chunk: &Plan, whole: &Plan) {
    assert_eq!(chunk.dims, whole.dims, "{tag}: dims");
    let d = whole.dims;
    for s in chunk.planned.clone() {
        assert_eq!(chunk.segment_topk[s], whole.segment_topk[s], "{tag}: segment_topk[{s}]");
        for h in 0..d.kv_heads {
            let u = d.unit(0, h, s);
            let what = format!("{tag}: kv head {h} segment {s}");
            assert_eq!(chunk.entropy[u].to_bits(), whole.entropy[u].to_bits(), "{what}: entropy");
            assert_eq!(chunk.budgets[u].to_bits(), whole.budgets[u].to_bits(), "{what}: budget");
            assert_eq!(chunk.keep_blocks[u], whole.keep_blocks[u], "{what}: keep");
            let w = whole.segment_topk[s] as usize;
            assert_eq!(&chunk.ranking(0, h, s)[..w], &whole.ranking(0, h, s)[..w], "{what}: ranking");
            assert_eq!(chunk.blocks.segment(0, h, s), whole.blocks.segment(0, h, s), "{what}: block list");
        }
    }
}

/// Chunked `streaming` prefill of a ragged batch at random multiples of S over a paged cache =
/// the one-shot `streaming` plan of each prompt (decisions bit for bit) and its sparse prefill
/// (outputs and LSEs per element against the oracle).
#[test]
fn chunked_streaming_equals_one_shot() {
    for seed in seeds("chunked_streaming_equals_one_shot") {
        let mut rng = Rng::new(seed);
        for kernels in engine_backends("chunked_streaming", &[Op::Attend]) {
            for dtype in DType::ALL {
                let (hkv, g, d) = ([1, 2, 4][rng.below(3)], [1, 2, 4][rng.below(3)], [16, 32][rng.below(2)]);
                let hq = hkv * g;
                let lens: Vec<usize> = (0..3).map(|_| 40 + rng.below(110)).collect();
                let cfgs: Vec<EntropyConfig> = (0..3).map(|_| cfg_for(&mut rng)).collect();
                let ps = [8, 16, 64][rng.below(3)];
                let cuts: Vec<Vec<usize>> = lens.iter().map(|&l| random_cuts(&mut rng, l, 16)).collect();
                let tag = format!(
                    "seed {seed} {} {dtype} lens {lens:?} cuts {cuts:?} page {ps} hq {hq} hkv {hkv} d {d}",
                    kernels.kind()
                );
                with_case(&tag, || {
                    let prompts: Vec<Prompt> = lens
                        .iter()
                        .enumerate()
                        .map(|(i, &l)| prompt(l, hq, hkv, d, seed ^ (i as u64 * 91), dtype))
                        .collect();
                    let mut pool = shuffled_pool(&mut rng, dtype, 3, hkv, d, 160, ps);
                    let runs = run_chunked(&kernels, &prompts, &cuts, &cfgs, &mut pool);
                    for (i, (p, run)) in prompts.iter().zip(runs).enumerate() {
                        let tag = format!("{tag} seq {i}");
                        let whole = kernels.plan(p.q.view(), p.k.view(), &cfgs[i], &PlanRequest::layer(0)).unwrap();
                        let oracle = Kernels::reference()
                            .plan(p.q.view(), p.k.view(), &cfgs[i], &PlanRequest::layer(0))
                            .unwrap();
                        common::suite::check_plans(&format!("{tag} one-shot streaming plan"), &whole, &oracle);
                        for (c, chunk) in run.plans.iter().enumerate() {
                            check_chunk_decisions(&format!("{tag} chunk {c}"), chunk, &whole);
                        }
                        let last = run.plans.last().unwrap();
                        assert_eq!(last.head_class, whole.head_class, "{tag}: head classes after the last chunk");
                        check_sequence(&tag, kernels.kind(), p, run.out, &run.lse, Some(&whole.blocks));
                    }
                });
            }
        }
    }
}

/// Changing one sequence of a ragged batch leaves every other sequence's plans and outputs
/// bit-identical (nothing is shared: no padding, no batch-wide maxima).
#[test]
fn sequences_do_not_leak() {
    for seed in seeds("sequences_do_not_leak") {
        let mut rng = Rng::new(seed);
        for kernels in engine_backends("no_leak", &[Op::Attend]) {
            let (hq, hkv, d, dtype) = (4, 2, 32, DType::BF16);
            let lens = [96usize, 130, 64];
            let cfg = EntropyConfig { budget_mode: BudgetMode::SegmentMax, ..cfg_for(&mut rng) };
            let cuts: Vec<Vec<usize>> = lens.iter().map(|&l| random_cuts(&mut rng, l, 16)).collect();
            let tag = format!("seed {seed} {} cuts {cuts:?}", kernels.kind());
            with_case(&tag, || {
                let mut prompts: Vec<Prompt> = lens
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| prompt(l, hq, hkv, d, seed ^ (i as u64 * 13), dtype))
                    .collect();
                let mut pool_rng = Rng::new(seed ^ 5);
                let mut pool = shuffled_pool(&mut pool_rng, dtype, 3, hkv, d, 160, 16);
                let before = run_chunked(&kernels, &prompts, &cuts, std::slice::from_ref(&cfg), &mut pool);
                prompts[1] = prompt(lens[1], hq, hkv, d, seed ^ 0xbad, dtype);
                let mut pool_rng = Rng::new(seed ^ 5);
                let mut pool = shuffled_pool(&mut pool_rng, dtype, 3, hkv, d, 160, 16);
                let after = run_chunked(&kernels, &prompts, &cuts, std::slice::from_ref(&cfg), &mut pool);
                for i in [0, 2] {
                    assert_eq!(before[i].plans, after[i].plans, "{tag}: sequence {i}'s plans changed");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&before[i].out), bits(&after[i].out), "{tag}: sequence {i}'s outputs changed");
                }
                assert_ne!(before[1].out, after[1].out, "{tag}: the changed sequence must change");
            });
        }
    }
}

/// Decode over pages (one query per sequence, per-head lengths) = decode over the contiguous
/// cache: both against the oracle element by element.
#[test]
fn paged_decode_equals_contiguous() {
    for seed in seeds("paged_decode_equals_contiguous") {
        let mut rng = Rng::new(seed);
        for kernels in engine_backends("paged_decode", &[Op::Attend]) {
            for dtype in DType::ALL {
                let (b, hc, g, d, cap) = (3, 2, 2, 48, 300);
                let hq = hc * g;
                let ps = PAGE_SIZES[rng.below(4)];
                let lens: Vec<u32> = (0..b * hc).map(|_| 1 + rng.below(cap) as u32).collect();
                let tag = format!("seed {seed} {} {dtype} page {ps} lens {lens:?}", kernels.kind());
                with_case(&tag, || {
                    let kc = random([b, hc, cap, d], 1.0, seed ^ 3, dtype);
                    let vc = random([b, hc, cap, d], 1.0, seed ^ 4, dtype);
                    let q = random([b, 1, hq, d], 1.0, seed ^ 5, dtype);
                    let exact = check::exact_decode(q.view(), kc.view(), vc.view(), &lens);
                    let mut contiguous = poisoned(q.shape, dtype);
                    kernels
                        .decode_attention(q.view(), kc.view(), vc.view(), &lens, None, &mut contiguous.view_mut())
                        .unwrap();
                    check::check_out(&format!("{tag} contiguous"), kernels.kind(), &contiguous, &exact);
                    // The same entries in shuffled pages.
                    let mut pool = shuffled_pool(&mut rng, dtype, b, hc, d, cap, ps);
                    let (kf, vf) = (kc.to_f32_vec(), vc.to_f32_vec());
                    let (mut pk, mut pv) = (pool.k.to_f32_vec(), pool.v.to_f32_vec());
                    for i in 0..b {
                        for h in 0..hc {
                            for n in 0..lens[i * hc + h] as usize {
                                let page = pool.ids[i * pool.width + n / ps] as usize;
                                let o = pool.layout.offset(page, n % ps, h);
                                let src = ((i * hc + h) * cap + n) * d;
                                pk[o..o + d].copy_from_slice(&kf[src..src + d]);
                                pv[o..o + d].copy_from_slice(&vf[src..src + d]);
                            }
                        }
                    }
                    pool.k = HostTensor::from_f32(&pk, pool.k.shape, dtype);
                    pool.v = HostTensor::from_f32(&pv, pool.v.shape, dtype);
                    pool.lens = lens.clone();
                    let qt = HostTensor::from_f32(&q.to_f32_vec(), [1, b, hq, d], dtype);
                    let cu: Vec<u32> = (0..=b as u32).collect();
                    let mut paged = poisoned(qt.shape, dtype);
                    kernels
                        .attend(
                            qt.view(),
                            &cu,
                            &pool.cache(),
                            &[],
                            None,
                            &mut paged.view_mut(),
                            None,
                            &mut Workspace::new(),
                        )
                        .unwrap();
                    let paged = HostTensor::from_f32(&paged.to_f32_vec(), q.shape, dtype);
                    check::check_out(&format!("{tag} paged"), kernels.kind(), &paged, &exact);
                });
            }
        }
    }
}

/// Attention over two halves of a cache, merged by their LSEs, equals attention over the whole.
#[test]
fn halves_merge_by_lse() {
    for seed in seeds("halves_merge_by_lse") {
        let mut rng = Rng::new(seed);
        for kernels in engine_backends("lse_merge", &[Op::Attend]) {
            let (hc, g, d) = (2, 2, 32);
            let hq = hc * g;
            let n = 20 + rng.below(200);
            let n1 = 1 + rng.below(n - 1);
            let tag = format!("seed {seed} {} n {n} split {n1}", kernels.kind());
            with_case(&tag, || {
                let kc = random([1, hc, n, d], 1.0, seed ^ 7, DType::F32);
                let vc = random([1, hc, n, d], 1.0, seed ^ 8, DType::F32);
                let q = random([1, 1, hq, d], 1.0, seed ^ 9, DType::F32);
                let run = |lo: usize, hi: usize| {
                    let lens = vec![(hi - lo) as u32; hc];
                    let (kv, vv) =
                        (kc.view().narrow(2, lo, hi - lo).unwrap(), vc.view().narrow(2, lo, hi - lo).unwrap());
                    let cache = KvCache::contiguous(kv, vv, &lens).unwrap();
                    let mut out = poisoned(q.shape, DType::F32);
                    let mut lse = vec![f32::NAN; hq];
                    kernels
                        .attend(
                            q.view(),
                            &[0, 1],
                            &cache,
                            &[],
                            None,
                            &mut out.view_mut(),
                            Some(&mut lse),
                            &mut Workspace::new(),
                        )
                        .unwrap();
                    (out.to_f32_vec(), lse)
                };
                let (whole, lw) = run(0, n);
                let (o1, l1) = run(0, n1);
                let (o2, l2) = run(n1, n);
                for h in 0..hq {
                    let (a, b) = (l1[h] as f64, l2[h] as f64);
                    let m = a.max(b);
                    let (wa, wb) = ((a - m).exp(), (b - m).exp());
                    let merged_lse = m + (wa + wb).ln();
                    assert!(
                        (merged_lse - lw[h] as f64).abs() <= 1e-5 * lw[h].abs().max(1.0) as f64,
                        "{tag}: lse of head {h}"
                    );
                    for x in 0..d {
                        let o = (wa * o1[h * d + x] as f64 + wb * o2[h * d + x] as f64) / (wa + wb);
                        let want = whole[h * d + x] as f64;
                        assert!((o - want).abs() <= 1e-5, "{tag}: head {h} dim {x}: merged {o} vs whole {want}");
                    }
                }
            });
        }
    }
}

/// Every malformed engine argument is a typed error, and a refused append writes nothing.
#[test]
fn bad_engine_input_is_a_typed_error() {
    let kernels = Kernels::cpu();
    let (hq, hkv, d) = (2, 1, 16);
    let mut rng = Rng::new(1);
    let mut pool = shuffled_pool(&mut rng, DType::F32, 2, hkv, d, 64, 16);
    let k = random([1, 40, hkv, d], 1.0, 2, DType::F32);
    let mut ws = Workspace::new();
    let is_range = |e: Error, field: &str| matches!(e, Error::OutOfRange { field: f, .. } if f == field);

    // Ragged offsets.
    let bad = kernels.append(k.view(), k.view(), &[0, 20, 39], &mut pool.cache_mut(), &mut ws).unwrap_err();
    assert!(is_range(bad, "cu_q"), "cu_q not ending at T");
    let bad = kernels.append(k.view(), k.view(), &[0, 30, 20], &mut pool.cache_mut(), &mut ws).unwrap_err();
    assert!(is_range(bad, "cu_q"), "decreasing cu_q");
    // Lengths beyond the sequence's pages; nothing written.
    let big = random([1, 70, hkv, d], 1.0, 3, DType::F32);
    let bad = kernels.append(big.view(), big.view(), &[0, 70, 70], &mut pool.cache_mut(), &mut ws).unwrap_err();
    assert!(matches!(bad, Error::CacheLength { .. }), "{bad}");
    assert_eq!(pool.lens, vec![0, 0], "a refused append changes no length");
    // Two sequences sharing a page that the call writes.
    let shared = pool.ids.clone();
    pool.ids[pool.width] = shared[0];
    let bad = kernels.append(k.view(), k.view(), &[0, 20, 40], &mut pool.cache_mut(), &mut ws).unwrap_err();
    assert!(is_range(bad, "block table"), "shared page written");
    assert!(pool.k.to_f32_vec().iter().all(|x| x.is_nan()), "a refused append writes nothing");
    pool.ids = shared;
    // Page ids out of range.
    let saved = pool.ids[0];
    pool.ids[0] = 10_000;
    let bad = kernels.append(k.view(), k.view(), &[0, 20, 40], &mut pool.cache_mut(), &mut ws).unwrap_err();
    assert!(is_range(bad, "block table"), "page id out of range");
    pool.ids[0] = saved;
    kernels
        .append(
            k.view().narrow(1, 0, 32).unwrap(),
            k.view().narrow(1, 0, 32).unwrap(),
            &[0, 16, 32],
            &mut pool.cache_mut(),
            &mut ws,
        )
        .unwrap();
    let q = random([1, 32, hq, d], 1.0, 1, DType::F32);
    let mut out = poisoned(q.shape, DType::F32);

    // More queries than entries.
    let bad = kernels
        .attend(q.view(), &[0, 30, 32], &pool.cache(), &[], None, &mut out.view_mut(), None, &mut ws)
        .unwrap_err();
    assert!(is_range(bad, "cache lengths"), "queries beyond the entries");
    // LSE of the wrong size.
    let mut lse = vec![0f32; 3];
    let bad = kernels
        .attend(q.view(), &[0, 16, 32], &pool.cache(), &[], None, &mut out.view_mut(), Some(&mut lse), &mut ws)
        .unwrap_err();
    assert!(matches!(bad, Error::Shape { what: "lse", .. }), "{bad}");

    // Planning: chunk starts off the grid, prompt classes with chunks, stale states.
    let cfg =
        EntropyConfig { segment_size: 16, block_size: 4, head_class: HeadClassMode::Streaming, ..Default::default() };
    let mut states = vec![PlanState::new(); 2];
    let req = ChunkRequest::default();
    let lens = [64u32, 64];
    let bad = kernels
        .plan_chunks(
            q.view().narrow(1, 0, 10).unwrap(),
            &[0, 5, 10],
            &pool.cache(),
            &lens,
            std::slice::from_ref(&cfg),
            &mut states,
            &req,
        )
        .unwrap_err();
    assert!(is_range(bad, "chunk start"), "chunk off the segment grid");
    let prompt_cfg = EntropyConfig { head_class: HeadClassMode::Prompt, ..cfg.clone() };
    let bad = kernels
        .plan_chunks(
            q.view().narrow(1, 0, 32).unwrap(),
            &[0, 16, 32],
            &pool.cache(),
            &lens,
            std::slice::from_ref(&prompt_cfg),
            &mut states,
            &req,
        )
        .unwrap_err();
    assert!(is_range(bad, "head_class"), "prompt head classes with chunks");
    let mut stale = vec![PlanState { next_segment: 3, ..PlanState::new() }; 2];
    let bad = kernels
        .plan_chunks(q.view(), &[0, 16, 32], &pool.cache(), &lens, std::slice::from_ref(&cfg), &mut stale, &req)
        .unwrap_err();
    assert!(matches!(bad, Error::PlanMismatch(_)), "{bad}");
    assert_eq!(stale[0].next_segment, 3, "a refused plan leaves the states");
    let bad = kernels
        .plan_chunks(q.view(), &[0, 16, 32], &pool.cache(), &[64], std::slice::from_ref(&cfg), &mut states, &req)
        .unwrap_err();
    assert!(matches!(bad, Error::Shape { what: "prompt lengths", .. }), "{bad}");

    // A sparse plan over pages that split blocks.
    let dims = PlanDims::new(1, 64, hq, hkv, 24, 12);
    let lists = BlockLists::all_dense(dims);
    let bad = kernels
        .attend(q.view(), &[0, 16, 32], &pool.cache(), &[Some(&lists), None], None, &mut out.view_mut(), None, &mut ws)
        .unwrap_err();
    assert!(is_range(bad, "page_size"), "pages of partial blocks");
}

/// `[B, H, N, D]` as sequence-major THD rows `[1, B·N, H, D]`.
fn thd_of_cache(t: &HostTensor) -> HostTensor {
    let [b, h, n, d] = t.shape;
    let f = t.to_f32_vec();
    let mut out = vec![0f32; f.len()];
    for bi in 0..b {
        for hi in 0..h {
            for ni in 0..n {
                let src = ((bi * h + hi) * n + ni) * d;
                let dst = ((bi * n + ni) * h + hi) * d;
                out[dst..dst + d].copy_from_slice(&f[src..src + d]);
            }
        }
    }
    HostTensor::from_f32(&out, [1, b * n, h, d], t.dtype())
}

/// Selection + in-place compaction over shuffled pages = the copy-out `kv_compress` of the same
/// cache: the same kept positions, the same entries (bit for bit), the same lengths — for every
/// group reduction (per_query_head on a cache allocated with Hq heads) and AdaKV.
#[test]
fn in_place_compaction_equals_kv_compress() {
    for seed in seeds("in_place_compaction_equals_kv_compress") {
        let mut rng = Rng::new(seed);
        for kernels in engine_backends("compaction", &[Op::Select]) {
            for dtype in DType::ALL {
                let (b, hkv, g, d) = (2, 2, 2, 24);
                let hq = hkv * g;
                let modes = [
                    DecodeConfig::latent(),
                    DecodeConfig { gqa_mode: GqaMode::Max, pooling: Pooling::Max, ..DecodeConfig::latent() },
                    DecodeConfig { gqa_mode: GqaMode::PerQueryHead, ..DecodeConfig::latent() },
                    DecodeConfig::adakv(0.3),
                ];
                let base = modes[rng.below(modes.len())].clone();
                let cfg = DecodeConfig { decode_budget: 24 + rng.below(16), window: 4, pooling_kernel: 3, ..base };
                let n = cfg.decode_budget + rng.below(100);
                let ps = PAGE_SIZES[rng.below(3)];
                let tag = format!("seed {seed} {} {dtype} n {n} page {ps} {cfg:?}", kernels.kind());
                with_case(&tag, || {
                    let kc = random([b, hkv, n, d], 1.0, seed ^ 21, dtype);
                    let vc = random([b, hkv, n, d], 1.0, seed ^ 22, dtype);
                    let obs = random([b, hq, cfg.window, d], 1.0, seed ^ 23, dtype);
                    let want = kernels.kv_compress(kc.view(), vc.view(), obs.view(), &cfg).unwrap();
                    let heads = want.heads();
                    let mut pool = shuffled_pool(&mut rng, dtype, b, heads, d, n, ps);
                    let (kt, vt) = (thd_of_cache(&kc), thd_of_cache(&vc));
                    let cu = [0, n as u32, 2 * n as u32];
                    let mut ws = Workspace::new();
                    kernels.append(kt.view(), vt.view(), &cu, &mut pool.cache_mut(), &mut ws).unwrap();
                    let sel = kernels.kv_select(&pool.cache(), obs.view(), &cfg, &[]).unwrap();
                    kernels.kv_compact(&mut pool.cache_mut(), &sel, &mut ws).unwrap();
                    assert_eq!(pool.lens, want.lengths, "{tag}: lengths");
                    let (pk, pv) = (pool.k.to_f32_vec(), pool.v.to_f32_vec());
                    let (wk, wv) = (want.k.to_f32_vec(), want.v.to_f32_vec());
                    let cap = want.capacity();
                    for i in 0..b {
                        for h in 0..heads {
                            let u = i * heads + h;
                            let kept: Vec<u32> = want.indices[u * want.index_width()..(u + 1) * want.index_width()]
                                .iter()
                                .filter(|&&p| p >= 0)
                                .map(|&p| p as u32)
                                .chain(n as u32 - cfg.window as u32..n as u32)
                                .collect();
                            assert_eq!(sel.kept(i, h), kept.as_slice(), "{tag}: kept positions of ({i}, {h})");
                            for j in 0..want.lengths[u] as usize {
                                let o = pool.layout.offset(pool.ids[i * pool.width + j / ps] as usize, j % ps, h);
                                let w = (u * cap + j) * d;
                                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                                assert_eq!(
                                    bits(&pk[o..o + d]),
                                    bits(&wk[w..w + d]),
                                    "{tag}: K entry {j} of ({i}, {h})"
                                );
                                assert_eq!(
                                    bits(&pv[o..o + d]),
                                    bits(&wv[w..w + d]),
                                    "{tag}: V entry {j} of ({i}, {h})"
                                );
                            }
                        }
                    }
                });
            }
        }
    }
}

/// Compression leaves short sequences alone, refuses what in-place compaction cannot do, and
/// never rewrites a page another sequence reads.
#[test]
fn compaction_refuses_what_it_cannot_do() {
    let kernels = Kernels::cpu();
    let (hq, hkv, d) = (4, 2, 16);
    let cfg = DecodeConfig { decode_budget: 24, window: 4, ..DecodeConfig::latent() };
    let mut rng = Rng::new(3);
    let mut pool = shuffled_pool(&mut rng, DType::F32, 2, hkv, d, 64, 16);
    let k = random([1, 50, hkv, d], 1.0, 1, DType::F32);
    let mut ws = Workspace::new();
    // Sequence 0 holds 40 entries (compresses), sequence 1 holds 10 (shorter than the budget).
    kernels.append(k.view(), k.view(), &[0, 40, 50], &mut pool.cache_mut(), &mut ws).unwrap();
    let obs = random([2, hq, 4, d], 1.0, 2, DType::F32);
    let sel = kernels.kv_select(&pool.cache(), obs.view(), &cfg, &[]).unwrap();
    assert_eq!(sel.compressed, vec![true, false], "a cache shorter than the budget is left as it is");
    // per_query_head needs a cache of Hq heads.
    let pqh = DecodeConfig { gqa_mode: GqaMode::PerQueryHead, ..cfg.clone() };
    let bad = kernels.kv_select(&pool.cache(), obs.view(), &pqh, &[]).unwrap_err();
    assert!(matches!(bad, Error::OutOfRange { field: "gqa_mode", .. }), "{bad}");
    // A page shared with the other sequence: refused, nothing written.
    let before = (pool.k.to_f32_vec(), pool.lens.clone());
    let saved = pool.ids[pool.width];
    pool.ids[pool.width] = pool.ids[0];
    let bad = kernels.kv_compact(&mut pool.cache_mut(), &sel, &mut ws).unwrap_err();
    assert!(matches!(bad, Error::OutOfRange { field: "block table", .. }), "{bad}");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&pool.k.to_f32_vec()), bits(&before.0), "a refused compaction writes nothing");
    assert_eq!(pool.lens, before.1);
    pool.ids[pool.width] = saved;
    // A page twice in the compressing sequence's own row: refused, nothing written.
    let saved = pool.ids[1];
    pool.ids[1] = pool.ids[0];
    let bad = kernels.kv_compact(&mut pool.cache_mut(), &sel, &mut ws).unwrap_err();
    assert!(matches!(bad, Error::OutOfRange { field: "block table", .. }), "{bad}");
    assert!(bad.to_string().contains("twice"), "{bad}");
    assert_eq!(bits(&pool.k.to_f32_vec()), bits(&before.0), "a refused compaction writes nothing");
    pool.ids[1] = saved;
    // A selection that does not fit the cache.
    let mut wrong = sel.clone();
    wrong.positions[0] = 1000;
    let bad = kernels.kv_compact(&mut pool.cache_mut(), &wrong, &mut ws).unwrap_err();
    assert!(matches!(bad, Error::PlanMismatch(_)), "{bad}");
    kernels.kv_compact(&mut pool.cache_mut(), &sel, &mut ws).unwrap();
    assert_eq!(&pool.lens[..2], &[24, 24]);
    assert_eq!(&pool.lens[2..], &[10, 10]);
}

/// Selection over heads of different lengths (what a head-adaptive compression leaves, then
/// recompression sees) agrees with the oracle on every backend: the same sequences compress,
/// every head keeps as many entries as the oracle's (heads shorter than the budget keep
/// everything) and the same ones up to near-ties at the boundary.
#[test]
fn selection_over_unequal_heads_matches_oracle() {
    let backends = engine_backends("unequal_heads", &[Op::Select]);
    for seed in seeds("selection_over_unequal_heads_matches_oracle") {
        let mut rng = Rng::new(seed);
        let (b, hc, g, d) = (3, 3, 2, 16);
        let cfg = DecodeConfig { decode_budget: 32, window: 4, pooling_kernel: 3, ..DecodeConfig::latent() };
        let cap = 90;
        let lens: Vec<u32> = (0..b * hc).map(|_| (4 + rng.below(cap - 4)) as u32).collect();
        let tag = format!("seed {seed} lens {lens:?}");
        with_case(&tag, || {
            let mut pool = shuffled_pool(&mut rng, DType::F32, b, hc, d, cap, 16);
            fill_keys(&mut pool, &random([b, hc, cap, d], 1.0, seed ^ 31, DType::F32), &lens);
            let obs = random([b, hc * g, 4, d], 1.0, seed ^ 32, DType::F32);
            for cfg in
                [cfg.clone(), DecodeConfig { head_budget: HeadBudget::AdaKv { floor_fraction: 0.2 }, ..cfg.clone() }]
            {
                let want = Kernels::reference().kv_select(&pool.cache(), obs.view(), &cfg, &[]).unwrap();
                for kernels in backends.iter().skip(1) {
                    let got = kernels.kv_select(&pool.cache(), obs.view(), &cfg, &[]).unwrap();
                    let tag = format!("{tag} {} {:?}", kernels.kind(), cfg.head_budget);
                    assert_eq!(got.compressed, want.compressed, "{tag}: which sequences compress");
                    for i in 0..b {
                        for h in 0..hc {
                            let (x, y) = (got.kept(i, h), want.kept(i, h));
                            assert_eq!(x.len(), y.len(), "{tag}: kept count of ({i}, {h})");
                            let common = x.iter().filter(|p| y.contains(p)).count();
                            assert!(common + 2 >= y.len(), "{tag}: ({i}, {h}) kept {x:?}, oracle {y:?}");
                        }
                    }
                }
            }
        });
    }
}

/// The pooled scores selection ranks (`kv_scores`), over pages of every size and both layouts
/// with heads of their own lengths (one shorter than the budget: not scored, one sequence left
/// out), equal the oracle's per element in every dtype, for mean/max group reductions and
/// avg/max/no pooling: what the devices' scoring reads through the block table is the cache.
#[test]
fn paged_scores_match_oracle() {
    let backends = engine_backends("paged_scores", &[Op::Select]);
    for seed in seeds("paged_scores_match_oracle") {
        let mut rng = Rng::new(seed);
        for dtype in DType::ALL {
            // D 20: rows off the 32-byte grid; caps past the 512-key scoring chunk.
            let (b, hc, g, d) = (3, 2, [1, 2, 3][rng.below(3)], [16, 20, 64][rng.below(3)]);
            let (cap, ps) = ([150, 700][rng.below(2)], PAGE_SIZES[rng.below(3)]);
            let cfg = DecodeConfig {
                decode_budget: 40,
                window: 4,
                pooling: [Pooling::Avg, Pooling::Max, Pooling::None][rng.below(3)],
                pooling_kernel: [3, 5][rng.below(2)],
                gqa_mode: if rng.below(2) == 0 { GqaMode::Mean } else { GqaMode::Max },
                ..DecodeConfig::latent()
            };
            let mut lens: Vec<u32> = (0..b * hc).map(|_| (41 + rng.below(cap - 41)) as u32).collect();
            lens[hc] = 30; // below the budget: not compressing
            let which = [true, true, rng.below(2) == 0];
            let tag = format!("seed {seed} {dtype} lens {lens:?} page {ps} g {g} d {d} {cfg:?}");
            with_case(&tag, || {
                let mut pool = shuffled_pool(&mut rng, dtype, b, hc, d, cap, ps);
                fill_keys(&mut pool, &random([b, hc, cap, d], 1.0, seed ^ 41, dtype), &lens);
                let obs = random([b, hc * g, cfg.window, d], 1.0, seed ^ 42, dtype);
                let want = Kernels::reference().kv_scores(&pool.cache(), obs.view(), &cfg, &which).unwrap();
                for kernels in backends.iter().skip(1) {
                    let got = kernels.kv_scores(&pool.cache(), obs.view(), &cfg, &which).unwrap();
                    let tag = format!("{tag} {}", kernels.kind());
                    assert_eq!(got.compressed, want.compressed, "{tag}: which sequences compress");
                    for (u, (x, y)) in got.rows.iter().zip(&want.rows).enumerate() {
                        assert_eq!(x.len(), y.len(), "{tag}: row {u}'s length");
                        let top = y.iter().cloned().fold(0f32, f32::max);
                        for (j, (a, e)) in x.iter().zip(y).enumerate() {
                            assert!((a - e).abs() <= 1e-3 * top + 1e-7, "{tag}: row {u} position {j}: {a} vs {e}");
                        }
                    }
                }
            });
        }
    }
}

/// A serving loop: two sequences with their own observation windows and schedules (latent
/// compression at step gap + 1, then `recompress_every`), ragged prefill → append → decode
/// attention → selection → in-place compaction. Every sequence compresses exactly when its own
/// schedule says, its heads never exceed `decode_budget + recompress_every`, and CPU and oracle
/// keep the same lengths and compress at the same steps.
#[test]
fn serving_loop_recompresses_on_each_sequences_schedule() {
    for seed in seeds("serving_loop_recompresses_on_each_sequences_schedule") {
        let (hq, hkv, d) = (4, 2, 16);
        let cfg =
            DecodeConfig { decode_budget: 24, window: 4, decode_gap: 2, recompress_every: 6, ..DecodeConfig::latent() };
        let prompts = [60usize, 45];
        let steps = 20;
        let run = |kernels: &Kernels| -> (Vec<Vec<usize>>, Vec<u32>) {
            let mut rng = Rng::new(seed);
            let mut pool = shuffled_pool(&mut rng, DType::F32, 2, hkv, d, 96, 16);
            let mut ws = Workspace::new();
            let total: usize = prompts.iter().sum();
            let k = random([1, total, hkv, d], 1.0, seed ^ 41, DType::F32);
            let v = random([1, total, hkv, d], 1.0, seed ^ 42, DType::F32);
            let q = random([1, total, hq, d], 1.0, seed ^ 43, DType::F32);
            let cu = [0, prompts[0] as u32, total as u32];
            kernels.append(k.view(), v.view(), &cu, &mut pool.cache_mut(), &mut ws).unwrap();
            // Each sequence its own schedule: gaps 2 and 5.
            let mut windows: Vec<ObservationWindow> = [2, 5]
                .iter()
                .map(|&gap| ObservationWindow::new(1, hq, d, &DecodeConfig { decode_gap: gap, ..cfg.clone() }).unwrap())
                .collect();
            for (i, w) in windows.iter_mut().enumerate() {
                let rows = q.view().narrow(1, cu[i] as usize, prompts[i]).unwrap();
                assert_eq!(w.prefill_end(rows).unwrap(), WindowEvent::Observing);
            }
            let mut compressed_at: Vec<Vec<usize>> = vec![vec![]; 2];
            for step in 1..=steps {
                let qn = random([1, 2, hq, d], 1.0, seed ^ (100 + step as u64), DType::F32);
                let kn = random([1, 2, hkv, d], 1.0, seed ^ (200 + step as u64), DType::F32);
                let vn = random([1, 2, hkv, d], 1.0, seed ^ (300 + step as u64), DType::F32);
                kernels.append(kn.view(), vn.view(), &[0, 1, 2], &mut pool.cache_mut(), &mut ws).unwrap();
                let mut out = poisoned(qn.shape, DType::F32);
                kernels
                    .attend(qn.view(), &[0, 1, 2], &pool.cache(), &[], None, &mut out.view_mut(), None, &mut ws)
                    .unwrap();
                assert!(out.to_f32_vec().iter().all(|x| x.is_finite()), "step {step}: decode output");
                let mut which = [false; 2];
                for i in 0..2 {
                    let event = windows[i].decode_step(qn.view().narrow(1, i, 1).unwrap()).unwrap();
                    let longest = *pool.lens[i * hkv..(i + 1) * hkv].iter().max().unwrap() as usize;
                    which[i] = event == WindowEvent::CompressNow || windows[i].recompress_due(longest);
                }
                if which.iter().any(|&w| w) {
                    let obs = ObservationWindow::stack(&windows.iter().collect::<Vec<_>>(), DType::F32).unwrap();
                    let sel = kernels.kv_select(&pool.cache(), obs.view(), &cfg, &which).unwrap();
                    kernels.kv_compact(&mut pool.cache_mut(), &sel, &mut ws).unwrap();
                    for i in (0..2).filter(|&i| which[i]) {
                        compressed_at[i].push(step);
                        assert!(
                            pool.lens[i * hkv..(i + 1) * hkv].iter().all(|&l| l == 24),
                            "step {step}: lengths after compaction"
                        );
                    }
                }
                for i in 0..2 {
                    if !compressed_at[i].is_empty() {
                        assert!(
                            pool.lens[i * hkv..(i + 1) * hkv].iter().all(|&l| l <= 30),
                            "step {step}: seq {i} grew past budget + every"
                        );
                    }
                }
            }
            (compressed_at, pool.lens.clone())
        };
        let tag = format!("seed {seed}");
        with_case(&tag, || {
            let (cpu_at, cpu_lens) = run(&Kernels::cpu());
            let (oracle_at, oracle_lens) = run(&Kernels::reference());
            // First compression at step gap + 1 (3 and 6), then every 6 steps (24 → 30 entries).
            assert_eq!(cpu_at, vec![vec![3, 9, 15], vec![6, 12, 18]], "{tag}: compression steps");
            assert_eq!(cpu_at, oracle_at, "{tag}: oracle schedule");
            assert_eq!(cpu_lens, oracle_lens, "{tag}: final lengths");
        });
    }
}

/// Tensor parallelism (SPEC §7.7): the heads split into two shards, each planning and scoring
/// its own; the cross-head rules reduced by hand (max of `segment_max` counts; AdaKV's pools
/// merged into a cut) give exactly the unsharded decisions.
#[test]
fn tensor_parallel_segment_max_shards_plan_as_unsharded() {
    // SPEC §7.7 on every backend that plans (the CUDA and Ascend planners included): each shard
    // plans its own heads with full_ranking, the counts are max-reduced by hand.
    let test = "tensor_parallel_segment_max_shards_plan_as_unsharded";
    for seed in seeds(test) {
        let mut rng = Rng::new(seed);
        let backends = std::iter::once(Kernels::reference())
            .chain(common::backends_under_test(test).into_iter().filter(|k| common::runs(test, k, Op::Plan)));
        for kernels in backends {
            // A drawn case may leave both shards with the same maxima (then it proves nothing):
            // draw again, a bounded number of times.
            let mut informative = false;
            for attempt in 0..16 {
                let (hkv, g, d, l) = (4, 2, 16, 100 + rng.below(100));
                let hq = hkv * g;
                let tag = format!("seed {seed} {} L {l} attempt {attempt}", kernels.kind());
                informative = with_case(&tag, || {
                    // segment_max planning. Shard 0's queries are flat (rising entropy: dynamic heads
                    // whose budgets grow), shard 1's peaked (rigid heads at base): the shards' own
                    // maxima differ, so only the reduced counts give the unsharded lists.
                    let cfg = EntropyConfig {
                        budget_mode: BudgetMode::SegmentMax,
                        e_t: 1.0,
                        delta_t: 0.0,
                        alpha: 4.0,
                        ..cfg_for(&mut rng)
                    };
                    // Fresh data per attempt (the same data and another config may stay uninformative).
                    let data_seed = seed ^ 51 ^ ((attempt as u64) << 32);
                    let (q0, k, _) = common::random_qkv([1, l, hq, hkv, d], data_seed, DType::F32);
                    let qs: Vec<f32> = q0
                        .to_f32_vec()
                        .chunks(d)
                        .enumerate()
                        .flat_map(|(row, x)| {
                            let f = if row % hq < hq / 2 { 0.01 } else { 20.0 };
                            x.iter().map(move |v| v * f).collect::<Vec<_>>()
                        })
                        .collect();
                    let q = HostTensor::from_f32(&qs, q0.shape, DType::F32);
                    let whole = kernels.plan(q.view(), k.view(), &cfg, &PlanRequest::layer(0)).unwrap();
                    let mut shards: Vec<Plan> = (0..2)
                        .map(|r| {
                            let (qr, kr) = (
                                q.view().narrow(2, r * hq / 2, hq / 2).unwrap(),
                                k.view().narrow(2, r * hkv / 2, hkv / 2).unwrap(),
                            );
                            kernels.plan(qr, kr, &cfg, &PlanRequest::layer(0).full_ranking(true)).unwrap()
                        })
                        .collect();
                    let reduced: Vec<u32> = (0..whole.dims.segments)
                        .map(|s| shards.iter().map(|p| p.segment_topk[s]).max().unwrap())
                        .collect();
                    assert_eq!(reduced, whole.segment_topk, "{tag}: reduced segment maxima");
                    let differs = (0..whole.dims.segments).any(|s| {
                        s * cfg.segment_size >= cfg.threshold_len
                            && s + 1 < whole.dims.segments
                            && shards[1].segment_topk[s] < reduced[s]
                    });
                    for (r, p) in shards.iter_mut().enumerate() {
                        p.reduce_segment_max(&reduced, cfg.threshold_len).unwrap();
                        let heads = r * hkv / 2..(r + 1) * hkv / 2;
                        assert_eq!(p.blocks, whole.blocks.select_heads(heads), "{tag}: shard {r}'s block lists");
                    }
                    differs
                });
                if informative {
                    break;
                }
            }
            assert!(informative, "seed {seed} {}: no drawn case made the shards' own maxima differ", kernels.kind());
        }
    }
}

#[test]
fn tensor_parallel_adakv_shards_select_as_unsharded() {
    for seed in seeds("tensor_parallel_adakv_shards_select_as_unsharded") {
        let mut rng = Rng::new(seed);
        for kernels in engine_backends("tensor_parallel", &[Op::Select]) {
            let (hkv, g, d) = (4, 2, 16);
            let hq = hkv * g;
            let tag = format!("seed {seed} {}", kernels.kind());
            with_case(&tag, || {
                // AdaKV's shared budget.
                let dcfg = DecodeConfig {
                    decode_budget: 20 + rng.below(10),
                    window: 4,
                    pooling_kernel: 3,
                    ..DecodeConfig::adakv(0.3)
                };
                let n = dcfg.decode_budget + 10 + rng.below(60);
                let kc = random([2, hkv, n, d], 1.0, seed ^ 52, DType::F32);
                let obs = random([2, hq, 4, d], 1.0, seed ^ 53, DType::F32);
                let lens = vec![n as u32; 2 * hkv];
                let full = KvCache::contiguous(kc.view(), kc.view(), &lens).unwrap();
                let want = kernels.kv_scores(&full, obs.view(), &dcfg, &[]).unwrap().select(&dcfg).unwrap();
                if kernels.kind() == BackendKind::Cpu {
                    assert_eq!(
                        kernels.kv_select(&full, obs.view(), &dcfg, &[]).unwrap(),
                        want,
                        "{tag}: kv_select = scores + rules"
                    );
                }
                let half_lens = vec![n as u32; 2 * hkv / 2];
                let scores: Vec<_> = (0..2)
                    .map(|r| {
                        let kr = kc.view().narrow(1, r * hkv / 2, hkv / 2).unwrap();
                        let cache = KvCache::contiguous(kr, kr, &half_lens).unwrap();
                        let or = obs.view().narrow(1, r * hq / 2, hq / 2).unwrap();
                        kernels.kv_scores(&cache, or, &dcfg, &[]).unwrap()
                    })
                    .collect();
                let pools: Vec<_> = (0..2).map(|r| scores[r].adakv_pools(&dcfg, r * hkv / 2, hkv).unwrap()).collect();
                let cuts: Vec<_> = (0..2)
                    .map(|i| {
                        let parts: Vec<_> = pools.iter().map(|p| p[i].clone().unwrap()).collect();
                        Some(compress::adakv_reduce(&parts, &dcfg, hkv))
                    })
                    .collect();
                for r in 0..2 {
                    let sel = scores[r].select_with_cuts(&dcfg, r * hkv / 2, &cuts).unwrap();
                    for i in 0..2 {
                        for h in 0..hkv / 2 {
                            assert_eq!(
                                sel.kept(i, h),
                                want.kept(i, r * hkv / 2 + h),
                                "{tag}: AdaKV shard {r} seq {i} head {h}"
                            );
                        }
                    }
                }
            });
        }
    }
}

/// Multi-token decode (speculative or chunked: 1–4 new queries per sequence over pages, per-head
/// lengths) against the oracle: the bottom-right causal rule among the new queries, outputs and
/// LSEs per element.
#[test]
fn multi_token_decode_matches_oracle() {
    for seed in seeds("multi_token_decode_matches_oracle") {
        let mut rng = Rng::new(seed);
        for kernels in engine_backends("multi_token_decode", &[Op::Attend]) {
            for dtype in DType::ALL {
                let (b, hc, g, d, cap) = (3, 2, [1, 2, 4][rng.below(3)], 40, 1500);
                let hq = hc * g;
                let q_lens: Vec<usize> = (0..b).map(|_| 1 + rng.below(4)).collect();
                let lens: Vec<u32> = (0..b * hc).map(|u| (q_lens[u / hc] + rng.below(cap - 4)) as u32).collect();
                let ps = PAGE_SIZES[rng.below(4)];
                let tag = format!("seed {seed} {} {dtype} q_lens {q_lens:?} lens {lens:?} page {ps}", kernels.kind());
                with_case(&tag, || {
                    let mut pool = shuffled_pool(&mut rng, dtype, b, hc, d, cap, ps);
                    let (kf, vf) = (
                        random([b, hc, cap, d], 1.0, seed ^ 61, dtype),
                        random([b, hc, cap, d], 1.0, seed ^ 62, dtype),
                    );
                    fill_keys(&mut pool, &kf, &lens);
                    pool.v = filled_pool(&pool, &pool.v, &vf, &lens);
                    let t: usize = q_lens.iter().sum();
                    let q = random([1, t, hq, d], 1.0, seed ^ 63, dtype);
                    let mut cu = vec![0u32];
                    for &n in &q_lens {
                        cu.push(cu.last().unwrap() + n as u32);
                    }
                    let run = |k: &Kernels| {
                        let mut out = poisoned(q.shape, dtype);
                        let mut lse = vec![f32::NAN; t * hq];
                        k.attend(
                            q.view(),
                            &cu,
                            &pool.cache(),
                            &[],
                            None,
                            &mut out.view_mut(),
                            Some(&mut lse),
                            &mut Workspace::new(),
                        )
                        .unwrap();
                        (out.to_f32_vec(), lse)
                    };
                    let (got, got_lse) = run(&kernels);
                    let (want, want_lse) = run(&Kernels::reference());
                    let tol = match dtype {
                        DType::F32 => 2e-5,
                        DType::F16 => 2e-3,
                        DType::BF16 => 1.6e-2,
                    };
                    for (x, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{tag}: element {x}: {a} vs oracle {b}");
                    }
                    for (x, (a, b)) in got_lse.iter().zip(&want_lse).enumerate() {
                        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{tag}: lse {x}: {a} vs oracle {b}");
                    }
                });
            }
        }
    }
}

/// A prompt shorter than the window: its observation holds fewer than W queries, and
/// `kv_compress` returns the cache unchanged instead of refusing the short window; in the engine
/// path such a sequence is simply not compressed.
#[test]
fn prompts_shorter_than_the_window_are_left_alone() {
    let (hq, hkv, d, l) = (4, 2, 16, 5);
    let cfg = DecodeConfig { decode_budget: 64, window: 16, ..DecodeConfig::snapkv() };
    let kc = random([1, hkv, l, d], 1.0, 1, DType::F32);
    let mut window = ObservationWindow::new(1, hq, d, &cfg).unwrap();
    let q = random([1, l, hq, d], 1.0, 2, DType::F32);
    assert_eq!(window.prefill_end(q.view()).unwrap(), WindowEvent::CompressNow);
    let obs = window.observation(DType::F32);
    assert_eq!(obs.shape, [1, hq, l, d], "the window holds the prompt's {l} queries");
    for kernels in engine_backends("short_prompt", &[Op::Select]) {
        let c = kernels.kv_compress(kc.view(), kc.view(), obs.view(), &cfg).unwrap();
        assert!(!c.compressed, "{}: a cache shorter than the budget comes back unchanged", kernels.kind());
        assert_eq!(c.lengths, vec![l as u32; hkv]);
        assert_eq!(c.k.to_f32_vec(), kc.to_f32_vec());
    }
    // A window of the wrong size on a cache that does compress is still refused.
    let long = random([1, hkv, 80, d], 1.0, 3, DType::F32);
    let bad = Kernels::cpu().kv_compress(long.view(), long.view(), obs.view(), &cfg).unwrap_err();
    assert!(matches!(bad, Error::Shape { what: "obs", .. }), "{bad}");
}

#[test]
fn one_shot_calls_take_k_and_v_of_different_strides() {
    // The one-shot calls run as attention over the cache their K/V form (one code path); a cache
    // has one layout for both pools, so K and V laid out differently go through a copy. Batch 2,
    // odd lengths, a transposed V, against the exact result; decode with every entry visible.
    let test = "one_shot_calls_take_k_and_v_of_different_strides";
    for seed in seeds(test) {
        for kernels in common::backends_under_test(test) {
            for dtype in [DType::F32, DType::BF16] {
                if !common::runs_on(test, &kernels, Op::Prefill, dtype) {
                    continue;
                }
                let (b, l, hq, hkv, d) = (2, 77, 4, 2, 64);
                let q = random([b, l, hq, d], 1.0, seed, dtype);
                let k = random([b, l, hkv, d], 1.0, seed + 1, dtype);
                let v_store = random([b, hkv, l, d], 1.0, seed + 2, dtype);
                let v = v_store.view().transpose(1, 2).unwrap();
                let mut out = poisoned([b, l, hq, d], dtype);
                let mut lse = vec![f32::NAN; b * hq * l];
                kernels.dense_prefill(q.view(), k.view(), v, None, &mut out.view_mut(), Some(&mut lse)).unwrap();
                let exact = check::exact_prefill(q.view(), k.view(), v, None);
                check::check_out(&format!("prefill {dtype} (seed {seed})"), kernels.kind(), &out, &exact);
                check::check_lse(&format!("prefill lse {dtype} (seed {seed})"), &lse, &exact);

                let (nq, cap) = (3, 45);
                let q = random([b, nq, hq, d], 1.0, seed + 3, dtype);
                let kc = random([b, hkv, cap, d], 1.0, seed + 4, dtype);
                let vc_store = random([b, cap, hkv, d], 1.0, seed + 5, dtype);
                let vc = vc_store.view().transpose(1, 2).unwrap();
                let mut rng = Rng::new(seed);
                let lengths: Vec<u32> = (0..b * hkv).map(|_| 1 + rng.below(cap) as u32).collect();
                let mut out = poisoned([b, nq, hq, d], dtype);
                kernels.decode_attention(q.view(), kc.view(), vc, &lengths, None, &mut out.view_mut()).unwrap();
                let exact = check::exact_decode(q.view(), kc.view(), vc, &lengths);
                check::check_out(&format!("decode {dtype} (seed {seed})"), kernels.kind(), &out, &exact);
            }
        }
    }
}

#[test]
fn paged_cache_refuses_tables_that_do_not_fit() {
    let layout = PageLayout::slot_major(4, 16, 2, 8);
    let bad = PagedCache::new(DType::F32, layout, vec![0, 1, 2], 2, 0.0).unwrap_err();
    assert!(matches!(bad, Error::Shape { what: "block table", .. }), "{bad}");
    assert!(PagedCache::new(DType::F32, layout, vec![0, 1], 0, 0.0).is_err());
    let bad = PagedCache::interleaved(DType::F32, layout, 3, 2).unwrap_err();
    assert!(matches!(bad, Error::OutOfRange { field: "page layout", .. }), "{bad}");
    let ok = PagedCache::interleaved(DType::BF16, layout, 2, 2).unwrap();
    assert_eq!((ok.ids.as_slice(), ok.lens.len(), ok.cache().lens().len()), (&[0, 2, 1, 3][..], 4, 4));
}

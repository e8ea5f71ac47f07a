//! `entropy-kernels bench-engine`: the serving-loop calls of SPEC §7 against the one-shot calls
//! they generalise, timed in the same run: a ragged batch against its sequences one by one, a
//! prompt prefilled in chunks over a paged cache against one shot, paged decode against
//! contiguous decode, in-place compression against copy-out. Each pair is timed in alternation.

use clap::Args;
use entropy_kernels::{
    ChunkRequest, DType, DecodeConfig, EntropyConfig, HeadClassMode, HostTensor, Kernels, PageLayout,
    PagedCache as Pool, PlanRequest, PlanState, Result, TensorView, TensorViewMut, Workspace, synth,
};

use super::bench::{Paired, paired};
use super::{Table, ms};

#[derive(Args, Debug)]
pub struct BenchEngineArgs {
    /// Comma-separated prompt lengths of the ragged batch.
    #[arg(long, value_delimiter = ',', default_value = "1000,2500,6000")]
    pub ragged: Vec<usize>,
    /// Prompt length of the chunked prefill.
    #[arg(long, default_value_t = 32768)]
    pub chunked: usize,
    /// Chunk length (a multiple of the segment size).
    #[arg(long, default_value_t = 4096)]
    pub chunk: usize,
    /// Cache entries per head of the decode comparison.
    #[arg(long, default_value_t = 32768)]
    pub decode_entries: usize,
    /// Sequences of the decode comparison.
    #[arg(long, default_value_t = 4)]
    pub decode_batch: usize,
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    /// Page layout: `slot-major` (vLLM's `[P, page, H, D]`) or `head-major` (`[P, H, page, D]`).
    #[arg(long, default_value = "slot-major", value_parser = ["slot-major", "head-major"])]
    pub layout: String,
    #[arg(long, default_value_t = 16)]
    pub q_heads: usize,
    #[arg(long, default_value_t = 4)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    #[arg(long, default_value = "bf16")]
    pub dtype: DType,
    /// Entries per head after the in-place compression (decode_budget).
    #[arg(long, default_value_t = 1024)]
    pub compact_to: usize,
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    #[command(flatten)]
    pub backend: super::BackendArg,
}

fn tensor(shape: [usize; 4], seed: u64, dtype: DType) -> HostTensor {
    HostTensor::from_f32(&synth::normal(shape.iter().product(), 1.0, seed), shape, dtype)
}

/// A pool of `seqs` sequences × `capacity` entries, pages interleaved across sequences.
fn pool(
    dtype: DType,
    seqs: usize,
    heads: usize,
    d: usize,
    capacity: usize,
    ps: usize,
    head_major: bool,
) -> Result<Pool> {
    let width = capacity.div_ceil(ps);
    let layout = if head_major {
        PageLayout::head_major(seqs * width, ps, heads, d)
    } else {
        PageLayout::slot_major(seqs * width, ps, heads, d)
    };
    Pool::interleaved(dtype, layout, seqs, width)
}

/// Append, plan (one-shot `streaming` or a chunk) and attend one round of ragged queries.
#[allow(clippy::too_many_arguments)]
fn prefill_round(
    k: &Kernels,
    pool: &mut Pool,
    q: &TensorView<'_>,
    kn: &TensorView<'_>,
    vn: &TensorView<'_>,
    cu: &[u32],
    prompt_lens: &[u32],
    cfg: &EntropyConfig,
    states: &mut [PlanState],
    ws: &mut Workspace,
    out: &mut HostTensor,
) -> Result<()> {
    k.append(*kn, *vn, cu, &mut pool.cache_mut(), ws)?;
    let plans =
        k.plan_chunks(*q, cu, &pool.cache(), prompt_lens, std::slice::from_ref(cfg), states, &ChunkRequest::default())?;
    let blocks: Vec<_> = plans.iter().map(|p| Some(&p.blocks)).collect();
    k.attend(*q, cu, &pool.cache(), &blocks, cfg.scale, &mut out.view_mut(), None, ws)
}

pub fn run(a: &BenchEngineArgs) -> Result<()> {
    let k: Kernels = a.backend.kernels()?;
    let (hq, hkv, d, dt) = (a.q_heads, a.kv_heads, a.head_dim, a.dtype);
    let hm = a.layout == "head-major";
    let cfg = EntropyConfig { head_class: HeadClassMode::Streaming, ..EntropyConfig::entropy_infer() };
    println!("backend: {}", k.describe());
    println!(
        "GQA {hq}/{hkv}, D {d}, {dt}, page {}, {} alternated runs of each pair (decode ×10, compression ×8): medians, ratio = median \
         of the per-pair ratios; EntropyInfer defaults, streaming head classes",
        a.page_size, a.reps
    );
    let mut t = Table::new(&["case", "engine path ms", "baseline ms", "ratio", "baseline"]);

    // Ragged batch against its sequences one by one (one-shot contiguous prefill).
    let total: usize = a.ragged.iter().sum();
    let q = tensor([1, total, hq, d], 1, dt);
    let kn = tensor([1, total, hkv, d], 2, dt);
    let vn = tensor([1, total, hkv, d], 3, dt);
    let mut cu = vec![0u32];
    for &l in &a.ragged {
        cu.push(cu.last().unwrap() + l as u32);
    }
    let lens: Vec<u32> = a.ragged.iter().map(|&l| l as u32).collect();
    let cap = *a.ragged.iter().max().unwrap_or(&1);
    let mut out = HostTensor::zeros(dt, q.shape);
    let mut ws = Workspace::new();
    let ragged = paired(
        a.reps,
        || {
            let mut pool = pool(dt, a.ragged.len(), hkv, d, cap, a.page_size, hm)?;
            let mut states = vec![PlanState::new(); a.ragged.len() * hkv];
            prefill_round(
                &k,
                &mut pool,
                &q.view(),
                &kn.view(),
                &vn.view(),
                &cu,
                &lens,
                &cfg,
                &mut states,
                &mut ws,
                &mut out,
            )
        },
        || {
            for (&start, &n) in cu.iter().zip(&a.ragged) {
                let s = start as usize;
                let mut o = HostTensor::zeros(dt, [1, n, hq, d]);
                let mut ov: TensorViewMut<'_> = o.view_mut();
                let (qv, kv, vv) = (q.view().narrow(1, s, n)?, kn.view().narrow(1, s, n)?, vn.view().narrow(1, s, n)?);
                k.prefill(qv, kv, vv, &cfg, &PlanRequest::layer(0).keep_maps(false), &mut ov, None)?;
            }
            Ok(())
        },
    )?;
    row(&mut t, format!("ragged {:?}", a.ragged), &ragged, "the sequences one by one (one-shot prefill)");

    // Chunked prefill over pages against one shot.
    let l = a.chunked;
    let q = tensor([1, l, hq, d], 4, dt);
    let kn = tensor([1, l, hkv, d], 5, dt);
    let vn = tensor([1, l, hkv, d], 6, dt);
    let mut whole = HostTensor::zeros(dt, q.shape);
    let chunked = paired(
        a.reps,
        || {
            let mut pool = pool(dt, 1, hkv, d, l, a.page_size, hm)?;
            let mut states = vec![PlanState::new(); hkv];
            for s in (0..l).step_by(a.chunk) {
                let n = a.chunk.min(l - s);
                let mut o = HostTensor::zeros(dt, [1, n, hq, d]);
                let (qv, kv, vv) = (q.view().narrow(1, s, n)?, kn.view().narrow(1, s, n)?, vn.view().narrow(1, s, n)?);
                prefill_round(
                    &k,
                    &mut pool,
                    &qv,
                    &kv,
                    &vv,
                    &[0, n as u32],
                    &[l as u32],
                    &cfg,
                    &mut states,
                    &mut ws,
                    &mut o,
                )?;
            }
            Ok(())
        },
        || {
            k.prefill(
                q.view(),
                kn.view(),
                vn.view(),
                &cfg,
                &PlanRequest::layer(0).keep_maps(false),
                &mut whole.view_mut(),
                None,
            )
            .map(|_| ())
        },
    )?;
    row(&mut t, format!("{l} tokens in {} chunks", a.chunk), &chunked, "one-shot sparse prefill (contiguous)");

    // Paged decode against contiguous decode.
    let (b, n) = (a.decode_batch, a.decode_entries);
    let kc = tensor([b, hkv, n, d], 7, dt);
    let vc = tensor([b, hkv, n, d], 8, dt);
    let qd = tensor([b, 1, hq, d], 9, dt);
    let lens = vec![n as u32; b * hkv];
    let mut pool = pool(dt, b, hkv, d, n, a.page_size, hm)?;
    // Fill the pages through append (one call per sequence's entries, head-major source).
    let src_k = HostTensor::from_f32(&transpose_bhnd(&kc), [1, b * n, hkv, d], dt);
    let src_v = HostTensor::from_f32(&transpose_bhnd(&vc), [1, b * n, hkv, d], dt);
    let cu: Vec<u32> = (0..=b as u32).map(|i| i * n as u32).collect();
    k.append(src_k.view(), src_v.view(), &cu, &mut pool.cache_mut(), &mut ws)?;
    let qt = HostTensor::from_f32(&qd.to_f32_vec(), [1, b, hq, d], dt);
    let cu1: Vec<u32> = (0..=b as u32).collect();
    let mut o1 = HostTensor::zeros(dt, qt.shape);
    let mut o2 = HostTensor::zeros(dt, qd.shape);
    let decode = paired(
        a.reps * 10,
        || k.attend(qt.view(), &cu1, &pool.cache(), &[], None, &mut o1.view_mut(), None, &mut ws),
        || k.decode_attention(qd.view(), kc.view(), vc.view(), &lens, None, &mut o2.view_mut()),
    )?;
    row(
        &mut t,
        format!("decode {b} × {n} entries, page {}", a.page_size),
        &decode,
        "decode_attention over the contiguous cache",
    );

    // In-place compression (selection + compaction over pages) against the copy-out kv_compress.
    let dcfg = DecodeConfig { decode_budget: a.compact_to, ..DecodeConfig::snapkv() };
    let obs = tensor([b, hq, dcfg.window, d], 10, dt);
    let mut lens_c = lens.clone();
    let compress = paired(
        a.reps * 8,
        || {
            // Restore the full cache's lengths (the entries past a compacted head are only reordered
            // in front: the timing is the same work as on a fresh cache).
            pool.lens.copy_from_slice(&lens_c);
            let sel = k.kv_select(&pool.cache(), obs.view(), &dcfg, &[])?;
            k.kv_compact(&mut pool.cache_mut(), &sel, &mut ws)
        },
        || k.kv_compress(kc.view(), vc.view(), obs.view(), &dcfg).map(|_| ()),
    )?;
    lens_c.clear();
    row(
        &mut t,
        format!("compress {b} × {n} → {} entries", a.compact_to),
        &compress,
        "kv_compress (copy-out) of the contiguous cache",
    );
    t.print();
    Ok(())
}

fn row(t: &mut Table, case: String, p: &Paired, baseline: &str) {
    t.row(vec![case, ms(p.a), ms(p.b), format!("{:.2}×", p.ratio), baseline.into()]);
}

/// `[B, H, N, D]` as THD rows `[B·N, H, D]` (sequence-major), in f32.
fn transpose_bhnd(t: &HostTensor) -> Vec<f32> {
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
    out
}

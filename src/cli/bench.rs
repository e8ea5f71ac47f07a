//! `entropy-kernels bench`: dense against sparse prefill, planning, compression and decode at
//! several lengths on one backend. Every ratio compares timings taken in the same run.

use clap::Args;
use entropy_kernels::{DType, DecodeConfig, EntropyConfig, HostTensor, Kernels, PlanRequest, Result, synth};

use super::{AttentionShape, Table, median, ms, time, with_spinner};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Comma-separated prompt lengths.
    #[arg(long, value_delimiter = ',', default_value = "8192,16384,32768")]
    pub lengths: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    pub q_heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// A model's attention shape instead of --q-heads/--kv-heads/--head-dim: openpangu-1b
    /// (GQA 12/6, D 128) or openpangu-7b (GQA 32/8, D 128).
    #[arg(long, value_parser = super::parse_model)]
    pub model: Option<entropy_kernels::shapes::ModelShape>,
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Comma-separated subset of dense, sparse, compress, decode.
    #[arg(long, value_delimiter = ',', default_value = "dense,sparse,compress,decode")]
    pub ops: Vec<String>,
    /// Entries per head of the compacted decode cache.
    #[arg(long, default_value_t = 1024)]
    pub decode_budget: usize,
    #[arg(long, default_value_t = 0.5)]
    pub rigid_fraction: f64,
    /// A JSON config for the sparse prefill (paper defaults otherwise).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub backend: super::BackendArg,
}

/// Median of `reps` timed runs of `f`, after one untimed warm-up run.
pub(super) fn repeat(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up: first-touch of buffers, thread pool start
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let (r, s) = time(&mut f);
        r?;
        t.push(s);
    }
    Ok(median(t))
}

/// Two calls timed in alternation (`a b`, then `b a`, …) after one warm-up of each: the medians
/// of each and the median of the per-pair ratios a/b. Alternating keeps a drift of the machine's
/// speed (another tenant, a clock change) out of the ratio, which two separate medians let in.
pub(super) fn paired(
    reps: usize,
    mut a: impl FnMut() -> Result<()>,
    mut b: impl FnMut() -> Result<()>,
) -> Result<Paired> {
    a()?;
    b()?;
    let (mut ta, mut tb, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..reps.max(1) {
        let (sa, sb) = if i % 2 == 0 {
            let sa = timed(&mut a)?;
            (sa, timed(&mut b)?)
        } else {
            let sb = timed(&mut b)?;
            (timed(&mut a)?, sb)
        };
        ta.push(sa);
        tb.push(sb);
        r.push(sa / sb);
    }
    Ok(Paired { a: median(ta), b: median(tb), ratio: median(r) })
}

fn timed(f: &mut impl FnMut() -> Result<()>) -> Result<f64> {
    let (r, s) = time(f);
    r.map(|_| s)
}

/// Medians of two alternated calls and of their per-pair ratio.
pub(super) struct Paired {
    pub a: f64,
    pub b: f64,
    pub ratio: f64,
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let kernels: Kernels = a.backend.kernels()?;
    let cfg = match &a.config {
        Some(p) => entropy_kernels::Config::load(p)?.prefill,
        None => EntropyConfig::entropy_infer(),
    };
    let want = |op: &str| a.ops.iter().any(|o| o == op);
    println!("backend: {}", kernels.describe());
    println!(
        "GQA {}/{}, D {}, {}, median of {} runs; sparse = EntropyInfer with S={} Bk={} T={} base={} ({:?})",
        a.q_heads(),
        a.kv_heads(),
        a.head_dim(),
        a.dtype,
        a.reps,
        cfg.segment_size,
        cfg.block_size,
        cfg.threshold_len,
        cfg.base_budget,
        cfg.budget_mode
    );
    let mut t = Table::new(&["tokens", "op", "ms", "GFLOP/s", "vs dense", "note"]);
    for &l in &a.lengths {
        let spec = synth::PlantedSpec {
            batch: 1,
            seq_len: l,
            q_heads: a.q_heads(),
            kv_heads: a.kv_heads(),
            head_dim: a.head_dim(),
            block_size: cfg.block_size,
            segment_size: cfg.segment_size,
            rigid_fraction: a.rigid_fraction,
            seed: l as u64,
        };
        super::check_workload(&spec)?;
        let (q, k, v) = with_spinner(&format!("inputs for {l} tokens"), || super::planted(&spec, a.dtype));
        let dense_flops = 2.0 * (l as f64).powi(2) * (a.head_dim() * a.q_heads()) as f64;
        let mut out = HostTensor::zeros(a.dtype, q.shape);
        let mut dense_s = f64::NAN;
        if want("dense") {
            dense_s = with_spinner(&format!("dense prefill, {l} tokens"), || {
                repeat(a.reps, || {
                    kernels.dense_prefill(q.view(), k.view(), v.view(), cfg.scale, &mut out.view_mut(), None)
                })
            })?;
            t.row(vec![
                l.to_string(),
                "dense prefill".into(),
                ms(dense_s),
                format!("{:.1}", dense_flops / dense_s / 1e9),
                "1.00".into(),
                "2·L²·D·Hq FLOPs".into(),
            ]);
        }
        if want("sparse") {
            let req = PlanRequest::layer(0).keep_maps(false);
            let plan = kernels.plan(q.view(), k.view(), &cfg, &req)?;
            let kept = plan.blocks.kept_fraction();
            let plan_s = with_spinner("planning", || {
                repeat(a.reps, || kernels.plan(q.view(), k.view(), &cfg, &req).map(|_| ()))
            })?;
            let attn_s = with_spinner(&format!("sparse prefill, {l} tokens"), || {
                repeat(a.reps, || {
                    kernels.sparse_prefill(
                        q.view(),
                        k.view(),
                        v.view(),
                        &plan.blocks,
                        cfg.scale,
                        &mut out.view_mut(),
                        None,
                    )
                })
            })?;
            let total = plan_s + attn_s;
            let vs = |s: f64| if dense_s.is_finite() { format!("{:.2}", dense_s / s) } else { "-".into() };
            t.row(vec![
                l.to_string(),
                "plan".into(),
                ms(plan_s),
                "-".into(),
                "-".into(),
                format!("{:.1}% of sparse prefill", 100.0 * plan_s / total),
            ]);
            let bound = if dense_s.is_finite() {
                format!("; target ≤ 1.3·kept·dense + plan = {} ms", ms(1.3 * kept * dense_s + plan_s))
            } else {
                String::new()
            };
            t.row(vec![
                l.to_string(),
                "sparse attention".into(),
                ms(attn_s),
                format!("{:.1}", kept * dense_flops / attn_s / 1e9),
                vs(attn_s),
                format!(
                    "kept {kept:.3} of causal pairs, {} rigid of {} heads",
                    plan.rigid_heads(),
                    plan.head_class.len()
                ),
            ]);
            t.row(vec![
                l.to_string(),
                "sparse prefill".into(),
                ms(total),
                "-".into(),
                vs(total),
                format!("plan + attention{bound}"),
            ]);
        }
        if want("compress") || want("decode") {
            let (kc, vc) = (k.view().transpose(1, 2)?, v.view().transpose(1, 2)?);
            let dcfg = DecodeConfig { decode_budget: a.decode_budget.min(l), ..DecodeConfig::latent() };
            let obs = q.view().narrow(1, l - dcfg.window, dcfg.window)?.transpose(1, 2)?;
            if want("compress") && l > dcfg.decode_budget {
                let s = repeat(a.reps, || kernels.kv_compress(kc, vc, obs, &dcfg).map(|_| ()))?;
                let flops = 4.0 * (l * dcfg.window * a.q_heads() * a.head_dim()) as f64;
                t.row(vec![
                    l.to_string(),
                    "kv_compress".into(),
                    ms(s),
                    format!("{:.1}", flops / s / 1e9),
                    "-".into(),
                    format!("W={}, budget {}", dcfg.window, dcfg.decode_budget),
                ]);
            }
            if want("decode") {
                let c = kernels.kv_compress(kc, vc, obs, &dcfg)?;
                let qn = HostTensor::from_f32(
                    &synth::normal(a.q_heads() * a.head_dim(), 1.0, 7),
                    [1, 1, a.q_heads(), a.head_dim()],
                    a.dtype,
                );
                let mut o = HostTensor::zeros(a.dtype, qn.shape);
                let full = vec![l as u32; a.kv_heads()];
                let full_s = repeat(a.reps.max(5), || {
                    kernels.decode_attention(qn.view(), kc, vc, &full, None, &mut o.view_mut())
                })?;
                let comp_s = repeat(a.reps.max(5), || {
                    kernels.decode_attention(qn.view(), c.k.view(), c.v.view(), &c.lengths, None, &mut o.view_mut())
                })?;
                let gbs = |n: usize, s: f64| (2 * n * a.kv_heads() * a.head_dim() * a.dtype.size()) as f64 / s / 1e9;
                t.row(vec![
                    l.to_string(),
                    "decode, full cache".into(),
                    ms(full_s),
                    "-".into(),
                    "-".into(),
                    format!("{l} entries/head, {:.1} GB/s of K+V", gbs(l, full_s)),
                ]);
                t.row(vec![
                    l.to_string(),
                    "decode, compressed".into(),
                    ms(comp_s),
                    "-".into(),
                    format!("{:.2}× vs full", full_s / comp_s),
                    format!("{} entries/head, {:.1} GB/s of K+V", c.capacity(), gbs(c.capacity(), comp_s)),
                ]);
            }
        }
    }
    println!();
    t.print();
    Ok(())
}

impl super::AttentionShape for BenchArgs {
    fn flags(&self) -> (usize, usize, usize) {
        (self.q_heads, self.kv_heads, self.head_dim)
    }
    fn model(&self) -> Option<entropy_kernels::shapes::ModelShape> {
        self.model
    }
}

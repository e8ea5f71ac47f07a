//! `entropy-kernels demo`: a long-context prefill on the best available backend, dense against
//! EntropyInfer, on a planted workload with rigid (sink) and dynamic (topic) heads.

use clap::Args;
use entropy_kernels::{
    BlockLists, DType, DecodeConfig, EntropyConfig, HostTensor, PlanRequest, Result, TensorView, TensorViewMut, synth,
};

use super::{AttentionShape, Progress, Table, ms, time, with_spinner};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 32768)]
    pub tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub q_heads: usize,
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// A model's attention shape instead of --q-heads/--kv-heads/--head-dim: openpangu-1b
    /// (GQA 12/6, D 128) or openpangu-7b (GQA 32/8, D 128).
    #[arg(long, value_parser = super::parse_model)]
    pub model: Option<entropy_kernels::shapes::ModelShape>,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
    /// Fraction of kv heads planted as rigid sinks.
    #[arg(long, default_value_t = 0.5)]
    pub rigid_fraction: f64,
    #[arg(long, default_value_t = 2026)]
    pub seed: u64,
    /// A JSON config (the conformance format); paper defaults otherwise.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub backend: super::BackendArg,
}

/// Runs `f(h, q, k, v, out)` for each kv head in turn (views of one head's slice), advancing a
/// progress bar: the kernels run one head group per call.
fn per_head(
    label: &str,
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    out: &mut HostTensor,
    mut f: impl FnMut(usize, TensorView<'_>, TensorView<'_>, TensorView<'_>, &mut TensorViewMut<'_>) -> Result<()>,
) -> Result<f64> {
    let hkv = k.shape[2];
    let g = q.shape[2] / hkv;
    let mut bar = Progress::new(label, hkv as u64);
    let (_, secs) = time(|| -> Result<()> {
        let mut ov = out.view_mut();
        for h in 0..hkv {
            let (qv, kv, vv) = (q.view().narrow(2, h * g, g)?, k.view().narrow(2, h, 1)?, v.view().narrow(2, h, 1)?);
            f(h, qv, kv, vv, &mut ov.narrow(2, h * g, g)?)?;
            bar.inc();
        }
        Ok(())
    });
    bar.finish();
    Ok(secs)
}

pub fn run(a: &DemoArgs) -> Result<()> {
    let kernels = a.backend.kernels()?;
    let cfg = match &a.config {
        Some(p) => entropy_kernels::Config::load(p)?.prefill,
        None => EntropyConfig::entropy_infer(),
    };
    println!("backend: {}", kernels.describe());
    println!(
        "workload: {} tokens × batch {}, GQA {}/{}, D {}, {}; planted {:.0}% rigid kv heads",
        a.tokens,
        a.batch,
        a.q_heads(),
        a.kv_heads(),
        a.head_dim(),
        a.dtype,
        a.rigid_fraction * 100.0
    );
    println!(
        "config: S={} Bk={} T={} base={} mode={:?}",
        cfg.segment_size, cfg.block_size, cfg.threshold_len, cfg.base_budget, cfg.budget_mode
    );
    let spec = synth::PlantedSpec {
        batch: a.batch,
        seq_len: a.tokens,
        q_heads: a.q_heads(),
        kv_heads: a.kv_heads(),
        head_dim: a.head_dim(),
        block_size: cfg.block_size,
        segment_size: cfg.segment_size,
        rigid_fraction: a.rigid_fraction,
        seed: a.seed,
    };
    super::check_workload(&spec)?;
    let (q, k, v) = with_spinner("generating inputs", || super::planted(&spec, a.dtype));

    let mut dense = HostTensor::full(a.dtype, q.shape, f32::NAN);
    let dense_s = per_head("dense prefill", &q, &k, &v, &mut dense, |_, q, k, v, out| {
        kernels.dense_prefill(q, k, v, cfg.scale, out, None)
    })?;

    let (plan, plan_s) = with_spinner("planning", || {
        time(|| kernels.plan(q.view(), k.view(), &cfg, &PlanRequest::layer(0).keep_maps(false)))
    });
    let plan = plan?;
    let mut sparse = HostTensor::full(a.dtype, q.shape, f32::NAN);
    let lists: Vec<BlockLists> = (0..a.kv_heads()).map(|h| plan.blocks.select_heads(h..h + 1)).collect();
    let sparse_s = per_head("EntropyInfer prefill", &q, &k, &v, &mut sparse, |h, q, k, v, out| {
        kernels.sparse_prefill(q, k, v, &lists[h], cfg.scale, out, None)
    })?;

    let (d, s) = (dense.to_f32_vec(), sparse.to_f32_vec());
    let num: f64 = d.iter().zip(&s).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = d.iter().map(|x| (*x as f64).powi(2)).sum();
    let rel = (num / den).sqrt();
    let kept = plan.blocks.kept_fraction();
    let rigid = plan.rigid_heads();
    let total = plan.head_class.len();

    // Decode side: compress the prompt's cache with its last W queries as the window.
    let dcfg = DecodeConfig::snapkv();
    let w = dcfg.window.min(a.tokens);
    // The prompt's BSND K/V seen as [B, Hkv, L, D] caches, its last W queries as [B, Hq, W, D]:
    // strided views, no copies.
    let kc = k.view().transpose(1, 2)?;
    let vc = v.view().transpose(1, 2)?;
    let obs = q.view().narrow(1, a.tokens - w, w)?.transpose(1, 2)?;
    let (compressed, compress_s) = if a.tokens >= dcfg.decode_budget {
        let (c, s) = with_spinner("kv_compress", || time(|| kernels.kv_compress(kc, vc, obs, &dcfg)));
        (Some(c?), s)
    } else {
        (None, 0.0)
    };

    let mut t = Table::new(&[
        "backend",
        "tokens",
        "dense ms",
        "plan ms",
        "sparse ms",
        "speedup",
        "kept fraction",
        "rigid/dynamic heads",
        "rel err vs dense",
    ]);
    t.row(vec![
        kernels.kind().to_string(),
        a.tokens.to_string(),
        ms(dense_s),
        ms(plan_s),
        ms(plan_s + sparse_s),
        format!("{:.2}x", dense_s / (plan_s + sparse_s)),
        format!("{kept:.3}"),
        format!("{rigid}/{}", total - rigid),
        format!("{rel:.2e}"),
    ]);
    println!();
    t.print();
    println!();
    println!(
        "sparse ms = plan + attention; speedup = dense / sparse; kept fraction = computed / causal (query, key) pairs;"
    );
    println!("planning took {:.1}% of the sparse prefill.", 100.0 * plan_s / (plan_s + sparse_s));
    if let Some(c) = compressed {
        println!(
            "kv_compress (SnapKV window {w}, budget {}): {} ms, cache {} → {} entries per head ({:.1} MiB → {:.1} MiB)",
            dcfg.decode_budget,
            ms(compress_s),
            a.tokens,
            c.capacity(),
            (k.len() * 2 * a.dtype.size()) as f64 / (1 << 20) as f64,
            c.kept_bytes() as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

impl super::AttentionShape for DemoArgs {
    fn flags(&self) -> (usize, usize, usize) {
        (self.q_heads, self.kv_heads, self.head_dim)
    }
    fn model(&self) -> Option<entropy_kernels::shapes::ModelShape> {
        self.model
    }
}

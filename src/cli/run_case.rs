//! `entropy-kernels run-case IN --out OUT`: reads a case in the `../shared/conformance` format,
//! runs the crate on it and writes every output of that format under the same names.

use std::path::PathBuf;

use clap::Args;
use entropy_kernels::io::{Case, CaseData, CaseWriter};
use entropy_kernels::{BudgetMode, DType, Error, HostTensor, Kernels, PlanRequest, Result};

#[derive(Args, Debug)]
pub struct RunCaseArgs {
    /// Input case (safetensors: q, k, v, optional prev_scores and decode.* tensors; config and
    /// layer_idx in the metadata).
    pub input: PathBuf,
    /// Where to write the outputs.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub backend: super::BackendArg,
    /// Cast the inputs to this dtype before running (outputs are written widened to f32).
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
    /// Comma-separated subset of plan, prefill, dense, decode.
    #[arg(long, value_delimiter = ',', default_value = "plan,prefill,dense,decode")]
    pub only: Vec<String>,
}

fn i64s(x: &[u32]) -> CaseData {
    CaseData::I64(x.iter().map(|&v| v as i64).collect())
}

fn f32s(t: &HostTensor) -> CaseData {
    CaseData::F32(t.to_f32_vec())
}

pub fn run(a: &RunCaseArgs) -> Result<()> {
    for part in &a.only {
        if !["plan", "prefill", "dense", "decode"].contains(&part.as_str()) {
            return Err(Error::range("--only", part, "expected plan, prefill, dense or decode"));
        }
    }
    let want = |p: &str| a.only.iter().any(|x| x == p);
    let kernels: Kernels = a.backend.kernels()?;
    let case = Case::load(&a.input)?;
    if !case.config_present {
        return Err(Error::Format { path: a.input.display().to_string(), detail: "metadata has no `config`".into() });
    }
    let cfg = &case.config.prefill;
    let q = case.tensor4("q")?.cast(a.dtype);
    let k = case.tensor4("k")?.cast(a.dtype);
    let v = case.tensor4("v")?.cast(a.dtype);
    let prev = if case.has("prev_scores") { Some(case.f32("prev_scores")?.0) } else { None };

    let mut w = CaseWriter::new();
    w.meta("config", case.config.to_json())
        .meta("layer_idx", case.layer_idx.to_string())
        .meta("backend", kernels.describe())
        .meta("dtype", a.dtype.to_string())
        .meta("source", a.input.display().to_string());
    eprintln!("{}: {} on {}", a.input.display(), case.description, kernels.describe());

    if want("plan") || want("prefill") {
        let mut req = PlanRequest::layer(case.layer_idx);
        if let Some(p) = &prev {
            req = req.with_prev(p);
        }
        let plan = kernels.plan(q.view(), k.view(), cfg, &req)?;
        let d = plan.dims;
        if want("plan") {
            let map = [d.batch, d.kv_heads, d.segments, d.blocks];
            w.put("plan.logits", &map, CaseData::F32(plan.logits.clone()))
                .put("plan.scores", &map, CaseData::F32(plan.scores.clone()))
                .put("plan.entropy", &map[..3], CaseData::F32(plan.entropy.clone()))
                .put("plan.keep_blocks", &map[..3], i64s(&plan.keep_blocks))
                .put("plan.segment_topk", &[d.segments], i64s(&plan.segment_topk))
                .put("plan.order", &[d.batch, d.kv_heads, d.segments, plan.order_width], i64s(&plan.order));
        }
        if want("prefill") {
            for (name, mode) in [("prefill.out", BudgetMode::SegmentMax), ("prefill.out_per_head", BudgetMode::PerHead)]
            {
                let lists = plan.block_lists(mode, cfg.threshold_len);
                let mut out = HostTensor::full(a.dtype, q.shape, f32::NAN);
                kernels.sparse_prefill(q.view(), k.view(), v.view(), &lists, cfg.scale, &mut out.view_mut(), None)?;
                w.put(name, &q.shape, f32s(&out));
            }
        }
    }
    if want("dense") {
        let mut out = HostTensor::full(a.dtype, q.shape, f32::NAN);
        kernels.dense_prefill(q.view(), k.view(), v.view(), cfg.scale, &mut out.view_mut(), None)?;
        w.put("dense.out", &q.shape, f32s(&out));
    }
    if want("decode") {
        if ["decode.k_cache", "decode.v_cache", "decode.obs_q"].iter().all(|n| case.has(n)) {
            let kc = case.tensor4("decode.k_cache")?.cast(a.dtype);
            let vc = case.tensor4("decode.v_cache")?.cast(a.dtype);
            let obs = case.tensor4("decode.obs_q")?.cast(a.dtype);
            let c = kernels.kv_compress(kc.view(), vc.view(), obs.view(), &case.config.decode)?;
            w.put("decode.indices", &[c.batch(), c.heads(), c.index_width()], CaseData::I64(c.indices.clone()))
                .put("decode.k_out", &c.k.shape, f32s(&c.k))
                .put("decode.v_out", &c.v.shape, f32s(&c.v));
        } else {
            eprintln!("no decode.k_cache / decode.v_cache / decode.obs_q in the input: decode skipped");
        }
    }
    w.write(&a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

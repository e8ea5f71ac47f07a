//! `entropy-kernels inspect QKV.safetensors`: the per-head entropy profile and head classes of
//! a layer, and an SVG heatmap (kv heads × segments) of entropy and budgets.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use entropy_kernels::io::Case;
use entropy_kernels::{Config, EntropyConfig, Error, HeadClass, Kernels, Plan, PlanRequest, Result};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A safetensors file with `q` and `k` (BSND); the config is read from its metadata if present.
    pub input: PathBuf,
    /// Where to write the SVG heatmap (default: next to the input, `.heatmap.svg`).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// A JSON config that overrides the file's.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub segment_size: Option<usize>,
    #[arg(long)]
    pub block_size: Option<usize>,
    #[arg(long)]
    pub base_budget: Option<usize>,
    #[command(flatten)]
    pub backend: super::BackendArg,
}

const SPARK: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

fn config_of(a: &InspectArgs, case: Option<&Case>) -> Result<EntropyConfig> {
    let mut cfg = match (&a.config, case) {
        (Some(p), _) => Config::load(p)?.prefill,
        (None, Some(c)) => c.config.prefill.clone(),
        (None, None) => EntropyConfig::default(),
    };
    if let Some(s) = a.segment_size {
        cfg.segment_size = s;
    }
    if let Some(b) = a.block_size {
        cfg.block_size = b;
    }
    if let Some(b) = a.base_budget {
        cfg.base_budget = b;
    }
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(a: &InspectArgs) -> Result<()> {
    let kernels: Kernels = a.backend.kernels()?;
    let case = Case::load(&a.input)?;
    if !case.config_present && a.config.is_none() {
        eprintln!("note: {} has no `config` metadata; using the defaults and the flags", a.input.display());
    }
    inspect(a, &kernels, &case)
}

fn inspect(a: &InspectArgs, kernels: &Kernels, case: &Case) -> Result<()> {
    let cfg = config_of(a, Some(case))?;
    let q = case.tensor4("q")?;
    let k = case.tensor4("k")?;
    let plan = kernels.plan(q.view(), k.view(), &cfg, &PlanRequest::layer(case.layer_idx).keep_maps(false))?;
    let d = plan.dims;
    println!("{}: {}", a.input.display(), case.description);
    println!(
        "B={} L={} Hq={} Hkv={} D={} | S={} Bk={} T={} base={} | {} segments, {} blocks | backend {}",
        d.batch,
        d.seq_len,
        d.q_heads,
        d.kv_heads,
        q.shape[3],
        cfg.segment_size,
        cfg.block_size,
        cfg.threshold_len,
        cfg.base_budget,
        d.segments,
        d.blocks,
        kernels.kind()
    );
    if d.segments < 2 {
        println!("a single segment: nothing to plan, the layer is dense");
    }
    // Segment 0 has no candidate blocks (its uniform row decides nothing): scale by the others.
    let hmax =
        (0..plan.entropy.len()).filter(|u| u % d.segments != 0).map(|u| plan.entropy[u]).fold(0f32, f32::max).max(1e-9);
    println!("\nentropy per segment from segment 1 (nats; bar height relative to {hmax:.3}):");
    for b in 0..d.batch {
        for h in 0..d.kv_heads {
            let row = &plan.entropy[d.unit(b, h, 0)..d.unit(b, h, 0) + d.segments];
            let spark: String =
                row.iter().skip(1).map(|&e| SPARK[((e / hmax * 7.0).round() as usize).min(7)]).collect();
            let budgets = &plan.budgets[d.unit(b, h, 0)..d.unit(b, h, 0) + d.segments];
            let class = match plan.head_class[b * d.kv_heads + h] {
                HeadClass::Rigid => "rigid  ",
                HeadClass::Dynamic => "dynamic",
            };
            let mean = row.iter().skip(1).sum::<f32>() / (d.segments.max(2) - 1) as f32;
            let bmax = budgets.iter().copied().fold(0f32, f32::max);
            println!("b{b} h{h:<3} {class} {spark}  mean H {:.3}  max budget {bmax:.0}", mean.max(0.0));
        }
    }
    println!(
        "\n{} rigid and {} dynamic kv heads; sparse units {}; kept fraction {:.3}",
        plan.rigid_heads(),
        plan.head_class.len() - plan.rigid_heads(),
        plan.blocks.sparse_units(),
        plan.blocks.kept_fraction()
    );
    let svg_path = a.svg.clone().unwrap_or_else(|| a.input.with_extension("heatmap.svg"));
    std::fs::write(&svg_path, heatmap(&plan, &cfg, &a.input.display().to_string()))
        .map_err(|source| Error::Io { path: svg_path.display().to_string(), source })?;
    println!("heatmap: {}", svg_path.display());
    Ok(())
}

/// A perceptual-ish colour ramp (dark blue → teal → yellow) for `x` in [0, 1].
fn color(x: f32) -> String {
    let stops = [(0.0, (68, 1, 84)), (0.35, (49, 104, 142)), (0.65, (53, 183, 121)), (1.0, (253, 231, 37))];
    let x = x.clamp(0.0, 1.0);
    let i = stops.iter().rposition(|s| s.0 <= x).unwrap_or(0).min(stops.len() - 2);
    let (a, b) = (stops[i], stops[i + 1]);
    let t = (x - a.0) / (b.0 - a.0);
    let mix = |u: u8, v: u8| (u as f32 + t * (v as f32 - u as f32)).round() as u8;
    format!("#{:02x}{:02x}{:02x}", mix(a.1.0, b.1.0), mix(a.1.1, b.1.1), mix(a.1.2, b.1.2))
}

/// Two heatmaps, kv heads (rows, all batch entries) × segments (columns): entropy and budget.
fn heatmap(plan: &Plan, cfg: &EntropyConfig, title: &str) -> String {
    let d = plan.dims;
    let rows = d.batch * d.kv_heads;
    let cell = (720.0 / d.segments as f32).clamp(3.0, 28.0);
    let ch = 18.0;
    let (left, top) = (90.0, 40.0);
    let panel_h = rows as f32 * ch + 50.0;
    let width = left + d.segments as f32 * cell + 40.0;
    let height = top + 2.0 * panel_h + 20.0;
    let hmax =
        (0..plan.entropy.len()).filter(|u| u % d.segments != 0).map(|u| plan.entropy[u]).fold(0f32, f32::max).max(1e-9);
    let base = cfg.base_budget as f32;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="18" font-size="13">{}</text>"#,
        title.replace('&', "&amp;").replace('<', "&lt;")
    );
    type Cell<'a> = Box<dyn Fn(usize) -> (f32, String) + 'a>;
    let panels: [(&str, Cell); 2] = [
        (
            "entropy (nats; segment 0 grey: no candidates)",
            Box::new(|u| (plan.entropy[u] / hmax, format!("{:.4}", plan.entropy[u]))),
        ),
        (
            "budget (tokens, base..3·base)",
            Box::new(|u| ((plan.budgets[u] - base) / (2.0 * base), format!("{:.0}", plan.budgets[u]))),
        ),
    ];
    for (p, (name, value)) in panels.iter().enumerate() {
        let y0 = top + p as f32 * panel_h;
        let _ = writeln!(s, r#"<text x="{left}" y="{:.1}">{name}</text>"#, y0 + 12.0);
        for b in 0..d.batch {
            for h in 0..d.kv_heads {
                let r = b * d.kv_heads + h;
                let y = y0 + 20.0 + r as f32 * ch;
                let class = if plan.head_class[r] == HeadClass::Rigid { "rigid" } else { "dyn" };
                let _ = writeln!(s, r#"<text x="4" y="{:.1}">b{b} h{h} {class}</text>"#, y + 13.0);
                for seg in 0..d.segments {
                    let (x, label) = value(d.unit(b, h, seg));
                    // Segment 0 has no candidates: its uniform row is shown grey.
                    let fill = if seg == 0 { "#cccccc".to_string() } else { color(x) };
                    let _ = writeln!(
                        s,
                        r#"<rect x="{:.1}" y="{y:.1}" width="{cell:.1}" height="{:.1}" fill="{}"><title>b{b} h{h} segment {seg}: {label}</title></rect>"#,
                        left + seg as f32 * cell,
                        ch - 1.0,
                        fill
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{:.1}">segment 0 … {}</text>"#,
            y0 + 20.0 + rows as f32 * ch + 14.0,
            d.segments - 1
        );
    }
    s.push_str("</svg>\n");
    s
}

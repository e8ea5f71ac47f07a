//! SPEC §2, step by step, in f64 (the budget recurrence in f32, as the spec demands; the logits'
//! dot products of 16-bit inputs in f32, as `numerics::LogitPrecision` defines them).

use super::{F64Tensor, half_logit};
use crate::alloc;
use crate::config::{BudgetMode, BudgetPolicy, HeadClassMode};
use crate::error::Result;
use crate::numerics::LogitPrecision;
use crate::plan::{BlockLists, HeadClass, Plan};
use crate::validate::PlanArgs;

/// `plan` in f64 (SPEC §2).
pub fn plan(a: &PlanArgs<'_>) -> Result<Plan> {
    let cfg = a.cfg();
    let dims = a.dims();
    let (bsz, l, hq, hkv) = (dims.batch, dims.seq_len, dims.q_heads, dims.kv_heads);
    let (seg, bk, nseg, n) = (dims.segment_size, dims.block_size, dims.segments, dims.blocks);
    let nrep = seg / bk;
    let g = hq / hkv;
    let dd = a.head_dim();
    let q = F64Tensor::try_of(&a.q())?;
    let k = F64Tensor::try_of(&a.k())?;
    // The maps [B, Hkv, nseg, N] grow as L²: flat and fallibly allocated, entry (b, h, s, j) at `at(b, h, s, j)`.
    let at = |b: usize, h: usize, s: usize, j: usize| ((b * hkv + h) * nseg + s) * n + j;

    // 1. Representatives: element-wise max and min over each segment's queries and each block's keys.
    let mut qmax = vec![vec![vec![vec![f64::NEG_INFINITY; dd]; hq]; nseg]; bsz];
    let mut qmin = vec![vec![vec![vec![f64::INFINITY; dd]; hq]; nseg]; bsz];
    for b in 0..bsz {
        for t in 0..l {
            let s = t / seg;
            for h in 0..hq {
                for (d, &x) in q.row(b, t, h).iter().enumerate() {
                    qmax[b][s][h][d] = qmax[b][s][h][d].max(x);
                    qmin[b][s][h][d] = qmin[b][s][h][d].min(x);
                }
            }
        }
    }
    let mut kmax = vec![vec![vec![vec![f64::NEG_INFINITY; dd]; hkv]; n]; bsz];
    let mut kmin = vec![vec![vec![vec![f64::INFINITY; dd]; hkv]; n]; bsz];
    for b in 0..bsz {
        for t in 0..n * bk {
            let j = t / bk;
            for h in 0..hkv {
                for (d, &x) in k.row(b, t, h).iter().enumerate() {
                    kmax[b][j][h][d] = kmax[b][j][h][d].max(x);
                    kmin[b][j][h][d] = kmin[b][j][h][d].min(x);
                }
            }
        }
    }

    // 2–3. Logits with the causal block mask; mean over the group (dot products in the inputs'
    // `LogitPrecision`).
    let precision = LogitPrecision::of(a.q().dtype());
    let mut logit = alloc::grid("the oracle's planning logits", &[bsz, hkv, nseg, n], f64::NEG_INFINITY)?;
    for b in 0..bsz {
        for h in 0..hkv {
            for s in 0..nseg {
                for j in 0..n {
                    if j >= s * nrep {
                        continue;
                    }
                    let mut sum = 0.0;
                    for gi in 0..g {
                        let qh = h * g + gi;
                        let (qx, qn) = (&qmax[b][s][qh], &qmin[b][s][qh]);
                        let (kx, kn) = (&kmax[b][j][h], &kmin[b][j][h]);
                        let with_max = half_logit(precision, qx, qn, kx);
                        let with_min = half_logit(precision, qx, qn, kn);
                        sum += with_max.max(with_min);
                    }
                    logit[at(b, h, s, j)] = sum / g as f64;
                }
            }
        }
    }

    // 4. Distribution: softmax over the unmasked blocks; segment 0 uniform.
    let mut p = alloc::grid("the oracle's block distributions", &[bsz, hkv, nseg, n], 0.0f64)?;
    for b in 0..bsz {
        for h in 0..hkv {
            for s in 0..nseg {
                let row = &logit[at(b, h, s, 0)..at(b, h, s, 0) + n];
                if s == 0 {
                    for j in 0..n {
                        p[at(b, h, s, j)] = 1.0 / n as f64;
                    }
                    continue;
                }
                let m = row[..s * nrep].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row[..s * nrep].iter().map(|x| (x - m).exp()).sum();
                for j in 0..s * nrep {
                    p[at(b, h, s, j)] = (row[j] - m).exp() / z;
                }
            }
        }
    }

    // 5. Layer fusion.
    if let Some(prev) = a.fusion() {
        for b in 0..bsz {
            for h in 0..hkv {
                for s in 0..nseg {
                    for j in 0..n {
                        let pp = prev[((b * hkv + h) * nseg + s) * n + j] as f64;
                        p[at(b, h, s, j)] = 0.25 * pp + 0.75 * p[at(b, h, s, j)];
                    }
                }
            }
        }
    }

    // 6. Entropy.
    let mut entropy = vec![vec![vec![0.0f64; nseg]; hkv]; bsz];
    for b in 0..bsz {
        for h in 0..hkv {
            for s in 0..nseg {
                entropy[b][h][s] =
                    -p[at(b, h, s, 0)..at(b, h, s, 0) + n].iter().map(|&x| x * (x + 1e-9).ln()).sum::<f64>();
            }
        }
    }

    // 7–9. Head class, budgets (f32), blocks to keep.
    let mut class = vec![vec![HeadClass::Dynamic; hkv]; bsz];
    let mut budget = vec![vec![vec![0f32; nseg]; hkv]; bsz];
    let mut keep = vec![vec![vec![0usize; nseg]; hkv]; bsz];
    for b in 0..bsz {
        for h in 0..hkv {
            let e32: Vec<f32> = entropy[b][h].iter().map(|&x| x as f32).collect();
            let decided = decide_head(&e32, l, cfg);
            class[b][h] = decided.0;
            budget[b][h] = decided.1;
            keep[b][h] = decided.2;
        }
    }
    let segment_topk: Vec<usize> = (0..nseg)
        .map(|s| (0..bsz).flat_map(|b| (0..hkv).map(move |h| (b, h))).map(|(b, h)| keep[b][h][s]).max().unwrap_or(0))
        .collect();

    // 10. Ranking: largest logit (fused p with fusion), ties to the lower block; masked blocks last.
    let cap = n as i64 - ((l % seg) / bk) as i64 - 1;
    let reach = if n == 0 { 0 } else { (3 * cfg.base_budget / bk).min(cap.max(0) as usize) };
    let width = if a.full_ranking() { reach } else { segment_topk.iter().copied().max().unwrap_or(0) };
    let mut order =
        alloc::with_capacity("the oracle's ranking", alloc::count("the ranking", &[bsz, hkv, nseg, width])?)?;
    let mut selected: Vec<Option<Vec<u32>>> = Vec::new();
    for b in 0..bsz {
        for h in 0..hkv {
            for s in 0..nseg {
                let key = |j: usize| if a.fusion().is_some() { p[at(b, h, s, j)] } else { logit[at(b, h, s, j)] };
                let mut ranked: Vec<usize> = (0..(s * nrep).min(n)).collect();
                ranked.sort_by(|&x, &y| crate::numerics::rank_cmp(key(x), key(y)).then(x.cmp(&y)));
                ranked.extend((s * nrep).min(n)..n);
                order.extend(ranked[..width].iter().map(|&j| j as u32));
                let count = match cfg.budget_mode {
                    BudgetMode::PerHead => keep[b][h][s],
                    BudgetMode::SegmentMax => segment_topk[s],
                };
                let sparse = s * seg >= cfg.threshold_len && s != nseg - 1 && count > 0;
                selected.push(sparse.then(|| ranked[..count].iter().map(|&j| j as u32).collect()));
            }
        }
    }

    let narrow = |x: &[f64]| -> Result<Vec<f32>> {
        let mut out = alloc::with_capacity("a planning map", x.len())?;
        out.extend(x.iter().map(|&v| v as f32));
        Ok(out)
    };
    let keep_maps = a.keep_maps() || a.cfg().layer_fusion;
    Ok(Plan {
        dims,
        logits: if a.keep_maps() { narrow(&logit)? } else { Vec::new() },
        scores: if keep_maps { narrow(&p)? } else { Vec::new() },
        entropy: entropy.iter().flatten().flatten().map(|&v| v as f32).collect(),
        head_class: class.into_iter().flatten().collect(),
        budgets: budget.into_iter().flatten().flatten().collect(),
        keep_blocks: keep.iter().flatten().flatten().map(|&x| x as u32).collect(),
        segment_topk: segment_topk.iter().map(|&x| x as u32).collect(),
        order,
        order_width: width,
        blocks: BlockLists::from_units(dims, selected),
        planned: 0..nseg,
    })
}

/// SPEC §2.7–2.9 (and §7.2's `streaming` classes) for one head of a prompt of `l` tokens from its
/// f32 entropies over segments `0..entropy.len()`: its final class, budgets and keep counts.
pub(crate) fn decide_head(
    e32: &[f32],
    l: usize,
    cfg: &crate::config::EntropyConfig,
) -> (HeadClass, Vec<f32>, Vec<usize>) {
    let (seg, bk) = (cfg.segment_size, cfg.block_size);
    let nrep = seg / bk;
    let nseg_prompt = l.div_ceil(seg);
    let n = if nseg_prompt < 2 { 0 } else { (nseg_prompt - 1) * nrep };
    let nseg = e32.len();
    let base = cfg.base_budget as f32;
    let cap = n as i64 - ((l % seg) / bk) as i64 - 1;
    let fixed = cfg.budget_policy == BudgetPolicy::Fixed;
    // `prompt`: one class for the whole prompt; `streaming`: rigid at s iff rigid at 1..=s.
    let rigid_whole = fixed || (1..nseg).all(|s| e32[s] < cfg.e_t);
    let mut rigid_so_far = true;
    let mut budget = vec![0f32; nseg];
    let mut keep = vec![0usize; nseg];
    if nseg > 0 {
        budget[0] = base;
    }
    for s in 1..nseg {
        rigid_so_far = rigid_so_far && (fixed || e32[s] < cfg.e_t);
        let rigid = match cfg.head_class {
            HeadClassMode::Prompt => rigid_whole,
            HeadClassMode::Streaming => rigid_so_far,
        };
        budget[s] = if rigid {
            base
        } else {
            let cur = e32[s].max(cfg.entropy_floor);
            let prev = e32[s - 1].max(cfg.entropy_floor);
            let mut r = if s == 1 { cfg.delta_t } else { (cur - prev) / (prev + 1e-9f32) };
            if r.is_nan() {
                r = 0.0;
            }
            r = r.max(0.0).min(1.0 + cfg.delta_t);
            let step = cfg.alpha * base * (r - cfg.delta_t);
            (budget[s - 1] + step).max(base).min(3.0 * base)
        };
        let by_budget = (budget[s] / bk as f32).floor() as i64;
        keep[s] = by_budget.min((s * nrep) as i64).min(cap).max(0) as usize;
    }
    let class = if rigid_whole { HeadClass::Rigid } else { HeadClass::Dynamic };
    (class, budget, keep)
}

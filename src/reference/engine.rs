//! SPEC §7 in f64: attention over a cache and chunked planning, one query and one segment at a
//! time, every key read by its (page, slot) address.

use super::{dot, half_logit};
use crate::config::{BudgetPolicy, GqaMode, HeadClassMode};
use crate::engine::{AttendArgs, ChunkArgs, KvCache, Scores, SelectArgs, Selection, SeqChunk};
use crate::error::Result;
use crate::numerics::LogitPrecision;
use crate::plan::{BlockLists, HeadClass, Plan, PlanState, SegmentAttention};
use crate::tensor::{HostData, TensorView, TensorViewMut};

/// Entry `n` of (sequence `i`, head `h`) of a pool, widened.
fn entry(cache: &KvCache<'_>, pool: HostData<'_>, i: usize, h: usize, n: usize) -> Vec<f64> {
    let o = cache.entry_offset(i, h, n);
    (0..cache.layout().head_dim).map(|d| pool.get(o + d)).collect()
}

fn q_row(q: &TensorView<'_>, b: usize, t: usize, h: usize) -> Vec<f64> {
    (0..q.shape()[3]).map(|d| q.get([b, t, h, d])).collect()
}

/// SPEC §7.4: every query of every sequence against its visible entries; writes `out` and `lse`.
pub fn attend(a: &AttendArgs<'_>, out: &mut TensorViewMut<'_>, lse: Option<&mut [f32]>) -> Result<()> {
    let d = a.dims();
    let cache = a.cache();
    let q = a.q();
    let g = d.group();
    let scale = a.scale() as f64;
    let mut lse = lse;
    for i in 0..d.sequences {
        let tokens = a.tokens(i);
        for (j, t) in tokens.clone().enumerate() {
            for hq in 0..d.q_heads {
                let h = hq / g;
                let pos = a.q_start(i, h) + j;
                let keys: Vec<usize> = match a.blocks(i) {
                    None => (0..a.visible_end(i, h, j)).collect(),
                    Some((bl, row)) => visible(bl, row, h, pos),
                };
                let (b, tq) = a.q_row(t);
                let qr = q_row(&q, b, tq, hq);
                let scores: Vec<f64> =
                    keys.iter().map(|&n| scale * dot(&qr, &entry(cache, cache.k(), i, h, n))).collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = w.iter().sum();
                let mut o = vec![0.0; d.head_dim];
                for (wi, &n) in w.iter().zip(&keys) {
                    for (x, v) in o.iter_mut().zip(entry(cache, cache.v(), i, h, n)) {
                        *x += wi / z * v;
                    }
                }
                for (dd, x) in o.into_iter().enumerate() {
                    out.set([b, tq, hq, dd], x);
                }
                if let Some(l) = lse.as_deref_mut() {
                    l[a.lse_index(t, hq)] = (m + z.ln()) as f32;
                }
            }
        }
    }
    Ok(())
}

/// The entries query position `pos` of kv head `h` sees under a block plan (SPEC §3).
fn visible(bl: &BlockLists, row: usize, h: usize, pos: usize) -> Vec<usize> {
    let s = pos / bl.dims.segment_size;
    match bl.segment(row, h, s) {
        SegmentAttention::Dense => (0..=pos).collect(),
        SegmentAttention::Sparse(list) => {
            let bk = bl.dims.block_size;
            let mut keys: Vec<usize> = list.iter().flat_map(|&j| j as usize * bk..(j as usize + 1) * bk).collect();
            keys.extend(s * bl.dims.segment_size..=pos);
            keys
        }
    }
}

/// SPEC §7.2: each sequence's chunk planned segment by segment, continuing `states`.
pub fn plan_chunks(a: &ChunkArgs<'_>, states: &mut [PlanState]) -> Result<Vec<Plan>> {
    let mut plans = Vec::with_capacity(a.seqs().len());
    for (i, sc) in a.seqs().iter().enumerate() {
        let hkv = sc.dims.kv_heads;
        plans.push(plan_one(a, i, sc, &mut states[i * hkv..(i + 1) * hkv])?);
    }
    Ok(plans)
}

fn plan_one(a: &ChunkArgs<'_>, i: usize, sc: &SeqChunk<'_>, states: &mut [PlanState]) -> Result<Plan> {
    let (dims, cfg) = (sc.dims, sc.cfg);
    let (l, hq, hkv, seg, bk, nseg, n) =
        (dims.seq_len, dims.q_heads, dims.kv_heads, dims.segment_size, dims.block_size, dims.segments, dims.blocks);
    let (g, nrep, dd) = (hq / hkv, seg / bk, a.head_dim());
    let cache = a.cache();
    let q = a.q();
    let precision = LogitPrecision::of(q.dtype());
    let fused = sc.fusion.is_some();
    let at = |h: usize, s: usize| (h * nseg + s) * n;
    let mut logits = vec![f64::NEG_INFINITY; hkv * nseg * n];
    let mut p = vec![0f64; hkv * nseg * n];
    let mut entropy = vec![0f32; hkv * nseg];
    let mut budgets = vec![0f32; hkv * nseg];
    let mut keep = vec![0usize; hkv * nseg];
    let minmax = |rows: &mut dyn Iterator<Item = Vec<f64>>| {
        let (mut mx, mut mn) = (vec![f64::NEG_INFINITY; dd], vec![f64::INFINITY; dd]);
        for r in rows {
            for (x, (a, b)) in r.iter().zip(mx.iter_mut().zip(mn.iter_mut())) {
                *a = a.max(*x);
                *b = b.min(*x);
            }
        }
        (mx, mn)
    };
    for s in sc.segments.clone() {
        let positions = s * seg..((s + 1) * seg).min(l);
        let lim = (s * nrep).min(n);
        for h in 0..hkv {
            // Logits (SPEC §2.1–2.3): representatives of this segment's queries and of every
            // block before it, the prefix's blocks read from the cache.
            for j in 0..lim {
                let (kx, kn) = minmax(&mut (j * bk..(j + 1) * bk).map(|t| entry(cache, cache.k(), i, h, t)));
                let mut sum = 0.0;
                for gi in 0..g {
                    let rows = positions.clone().map(|t| q_row(&q, 0, sc.tokens.start + t - sc.q_start, h * g + gi));
                    let (qx, qn) = minmax(&mut rows.collect::<Vec<_>>().into_iter());
                    let with_max = half_logit(precision, &qx, &qn, &kx);
                    let with_min = half_logit(precision, &qx, &qn, &kn);
                    sum += with_max.max(with_min);
                }
                logits[at(h, s) + j] = sum / g as f64;
            }
            // Distribution, fusion, entropy (SPEC §2.4–2.6).
            if s == 0 {
                p[at(h, s)..at(h, s) + n].iter_mut().for_each(|x| *x = 1.0 / n as f64);
            } else {
                let row = &logits[at(h, s)..at(h, s) + lim];
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
                for j in 0..lim {
                    p[at(h, s) + j] = (logits[at(h, s) + j] - m).exp() / z;
                }
            }
            if let Some(prev) = sc.fusion {
                for j in 0..n {
                    p[at(h, s) + j] = 0.25 * prev[at(h, s) + j] as f64 + 0.75 * p[at(h, s) + j];
                }
            }
            let e = -p[at(h, s)..at(h, s) + n].iter().map(|&x| x * (x + 1e-9).ln()).sum::<f64>();
            entropy[h * nseg + s] = e as f32;
        }
    }
    // Class and budget (SPEC §2.7–2.9): `prompt` over the whole prompt (one-shot calls only),
    // `streaming` continuing each head's state (SPEC §7.2).
    let base = cfg.base_budget as f32;
    let cap = n as i64 - ((l % seg) / bk) as i64 - 1;
    let keep_of = |s: usize, budget: f32| {
        if s == 0 { 0 } else { ((budget / bk as f32).floor() as i64).min((s * nrep) as i64).min(cap).max(0) as usize }
    };
    for h in 0..hkv {
        let st = &mut states[h];
        if cfg.head_class == HeadClassMode::Prompt && !sc.segments.is_empty() {
            let (class, b, _) = super::plan::decide_head(&entropy[h * nseg..(h + 1) * nseg], l, cfg);
            for s in 0..nseg {
                budgets[h * nseg + s] = b[s];
                keep[h * nseg + s] = keep_of(s, b[s]);
            }
            let last = entropy[h * nseg + nseg - 1];
            let rigid = class == HeadClass::Rigid;
            *st = PlanState {
                rigid,
                budget: b[nseg - 1],
                floored_entropy: last.max(cfg.entropy_floor),
                next_segment: nseg as u32,
            };
            continue;
        }
        for s in sc.segments.clone() {
            let e32 = entropy[h * nseg + s];
            let floored = e32.max(cfg.entropy_floor);
            let rigid = cfg.budget_policy == BudgetPolicy::Fixed || s == 0 || (st.rigid && e32 < cfg.e_t);
            let budget = if rigid {
                base
            } else {
                let mut r =
                    if s == 1 { cfg.delta_t } else { (floored - st.floored_entropy) / (st.floored_entropy + 1e-9f32) };
                if r.is_nan() {
                    r = 0.0;
                }
                r = r.max(0.0).min(1.0 + cfg.delta_t);
                (st.budget + cfg.alpha * base * (r - cfg.delta_t)).max(base).min(3.0 * base)
            };
            *st = PlanState { rigid, budget, floored_entropy: floored, next_segment: s as u32 + 1 };
            budgets[h * nseg + s] = budget;
            keep[h * nseg + s] = keep_of(s, budget);
        }
    }
    // Segment maxima over this sequence's heads; ranking; block lists (SPEC §2.9–2.10, §3).
    let topk: Vec<usize> = (0..nseg).map(|s| (0..hkv).map(|h| keep[h * nseg + s]).max().unwrap_or(0)).collect();
    let reach = if n == 0 {
        0
    } else {
        (3 * cfg.base_budget / bk).min((n as i64 - ((l % seg) / bk) as i64 - 1).max(0) as usize)
    };
    let width = if a.full_ranking() { reach } else { topk.iter().copied().max().unwrap_or(0) };
    let mut order = Vec::with_capacity(hkv * nseg * width);
    let mut units = Vec::with_capacity(hkv * nseg);
    for h in 0..hkv {
        for s in 0..nseg {
            let lim = (s * nrep).min(n);
            let key = |j: usize| if fused { p[at(h, s) + j] } else { logits[at(h, s) + j] };
            let mut ranked: Vec<usize> = (0..lim).collect();
            ranked.sort_by(|&x, &y| crate::numerics::rank_cmp(key(x), key(y)).then(x.cmp(&y)));
            ranked.extend(lim..n);
            order.extend(ranked[..width].iter().map(|&j| j as u32));
            let count = match cfg.budget_mode {
                crate::config::BudgetMode::PerHead => keep[h * nseg + s],
                crate::config::BudgetMode::SegmentMax => topk[s],
            };
            let sparse = sc.segments.contains(&s) && s * seg >= cfg.threshold_len && s + 1 != nseg && count > 0;
            units.push(sparse.then(|| ranked[..count].iter().map(|&j| j as u32).collect()));
        }
    }
    let keep_maps = a.keep_maps() || cfg.layer_fusion;
    Ok(Plan {
        dims,
        logits: if a.keep_maps() { logits.iter().map(|&x| x as f32).collect() } else { Vec::new() },
        scores: if keep_maps { p.iter().map(|&x| x as f32).collect() } else { Vec::new() },
        entropy,
        head_class: states.iter().map(|st| if st.rigid { HeadClass::Rigid } else { HeadClass::Dynamic }).collect(),
        budgets,
        keep_blocks: keep.iter().map(|&x| x as u32).collect(),
        segment_topk: topk.iter().map(|&x| x as u32).collect(),
        order,
        order_width: width,
        blocks: BlockLists::from_units(dims, units),
        planned: sc.segments.clone(),
    })
}

/// SPEC §4 steps 1–4 for sequence `i`: per cache head, window scores over its own entries
/// (window query w aligned with entry `N_h − W + w`), mean over the window, reduction over the
/// query heads of the cache head, pooling.
fn pooled_rows(a: &SelectArgs<'_>, i: usize) -> Vec<Vec<f64>> {
    let d = a.dims();
    let cfg = a.cfg();
    let cache = a.cache();
    let obs = a.obs();
    let (hc, hq, w) = (d.kv_heads, d.q_heads, d.window);
    let g = hq / hc;
    let scale = a.scale() as f64;
    let mut rows = Vec::with_capacity(hc);
    for h in 0..hc {
        let n = cache.lens()[i * hc + h] as usize;
        let scored = n - w;
        let keys: Vec<Vec<f64>> = (0..n).map(|j| entry(cache, cache.k(), i, h, j)).collect();
        let mut per_q = vec![vec![0f64; scored]; g];
        for (gi, a_row) in per_q.iter_mut().enumerate() {
            for wi in 0..w {
                let o: Vec<f64> = (0..d.head_dim).map(|x| obs.get([i, h * g + gi, wi, x])).collect();
                let x: Vec<f64> = keys[..n - w + wi + 1].iter().map(|k| scale * dot(&o, k)).collect();
                let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = x.iter().map(|xi| (xi - m).exp()).sum();
                for j in 0..scored {
                    a_row[j] += (x[j] - m).exp() / z;
                }
            }
            a_row.iter_mut().for_each(|x| *x /= w as f64);
        }
        let row: Vec<f64> = (0..scored)
            .map(|j| match cfg.gqa_mode {
                GqaMode::Max => per_q.iter().map(|r| r[j]).fold(f64::NEG_INFINITY, f64::max),
                // Mean; per_query_head runs on a cache of Hq heads (g = 1).
                _ => per_q.iter().map(|r| r[j]).sum::<f64>() / g as f64,
            })
            .collect();
        rows.push(super::compress::pool_row(&row, cfg));
    }
    rows
}

/// SPEC §7.5 / §4 per compressing sequence: pooled rows, selection, then each head's last W
/// entries.
pub fn select(a: &SelectArgs<'_>) -> Result<Selection> {
    let d = a.dims();
    let (hc, w) = (d.kv_heads, d.window);
    let mut lists = Vec::with_capacity(d.batch * hc);
    for i in 0..d.batch {
        if !a.compress()[i] {
            lists.extend((0..hc).map(|_| Vec::new()));
            continue;
        }
        let rows = pooled_rows(a, i);
        for (h, kept) in super::compress::select_rows(&rows, a.cfg())?.into_iter().enumerate() {
            let n = a.cache().lens()[i * hc + h] as usize;
            lists.push(kept.into_iter().chain(n - w..n).map(|p| p as u32).collect());
        }
    }
    Ok(Selection::from_lists(hc, a.compress().to_vec(), lists))
}

/// The pooled rows of every compressing sequence, rounded to f32.
pub fn kv_scores(a: &SelectArgs<'_>) -> Result<Scores> {
    let d = a.dims();
    let mut rows = Vec::with_capacity(d.batch * d.kv_heads);
    for i in 0..d.batch {
        if a.compress()[i] {
            rows.extend(pooled_rows(a, i).into_iter().map(|r| r.into_iter().map(|x| x as f32).collect::<Vec<f32>>()));
        } else {
            rows.extend((0..d.kv_heads).map(|_| Vec::new()));
        }
    }
    Ok(Scores::of(a, rows))
}

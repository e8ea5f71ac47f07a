//! Planning on the CPU (SPEC §2). Representatives are max/min in f32 (exact); logits, the
//! distribution and the entropy are computed in f64 with [`crate::numerics`]' operations and
//! summation orders, which the device kernels share bit for bit; budgets and keep counts use the
//! shared rules.

use rayon::prelude::*;

use super::simd::{Isa, Simd, WithSimd, dispatch};
use crate::config::EntropyConfig;
use crate::numerics;
use crate::plan::{BlockLists, Plan, PlanDims, rules};
use crate::tensor::{Element, TensorView};
use crate::validate::PlanArgs;

/// Element-wise max and min over `rows` consecutive tokens of every head: `[heads][2][D]` in f64
/// (max then min), from a BSND view.
fn representatives<E: Element>(
    x: &TensorView<'_>,
    b: usize,
    tokens: std::ops::Range<usize>,
    heads: usize,
    d: usize,
    out: &mut [f64],
    row: &mut [f32],
) {
    let data = x.typed::<E>().expect("dtype checked by validation");
    let mut mx = vec![f32::NEG_INFINITY; heads * d];
    let mut mn = vec![f32::INFINITY; heads * d];
    for t in tokens {
        for h in 0..heads {
            let o = x.offset(b, t, h);
            E::widen(&data[o..o + d], row);
            let (a, c) = (&mut mx[h * d..(h + 1) * d], &mut mn[h * d..(h + 1) * d]);
            for i in 0..d {
                a[i] = a[i].max(row[i]);
                c[i] = c[i].min(row[i]);
            }
        }
    }
    for h in 0..heads {
        for i in 0..d {
            out[(h * 2) * d + i] = mx[h * d + i] as f64;
            out[(h * 2 + 1) * d + i] = mn[h * d + i] as f64;
        }
    }
}

/// Per unit (b, h, s): logits, distribution, entropy and the ranking prefix.
struct UnitOut {
    logits: Vec<f32>,
    scores: Vec<f32>,
    entropy: f64,
    ranked: Vec<u32>,
}

struct UnitJob<'a> {
    dims: PlanDims,
    cfg: &'a EntropyConfig,
    head_dim: usize,
    /// `[B][nseg][Hq]` sums `qmax + qmin` (f64, exact).
    qsum: &'a [f64],
    /// `[B][N][Hkv][2][D]` key representatives.
    krep: &'a [f64],
    prev: Option<&'a [f32]>,
    keep_maps: bool,
    b: usize,
    h: usize,
    s: usize,
    /// Ranking prefix to keep: the largest keep this segment can have.
    width: usize,
}

impl WithSimd for UnitJob<'_> {
    type Output = UnitOut;
    #[inline(always)]
    fn with_simd<S: Simd>(self) -> UnitOut {
        let UnitJob { dims: d, head_dim: dd, qsum, krep, b, h, s, .. } = self;
        let n = d.blocks;
        let g = d.group();
        let lim = d.causal_limit(s);
        let mut logit = vec![f64::NEG_INFINITY; n];
        for (j, x) in logit.iter_mut().enumerate().take(lim) {
            let kr = &krep[((b * n + j) * d.kv_heads + h) * 2 * dd..];
            let (kmax, kmin) = (&kr[..dd], &kr[dd..2 * dd]);
            let mut sum = 0.0;
            for gi in 0..g {
                let qs = &qsum[((b * d.segments + s) * d.q_heads + h * g + gi) * dd..][..dd];
                sum += 0.5 * numerics::dot(qs, kmax).max(numerics::dot(qs, kmin));
            }
            *x = sum / g as f64;
        }
        // numerics' exp, ln and summation order: the device kernels compute the same bits.
        let mut p = vec![0f64; n];
        if s == 0 {
            p.fill(1.0 / n as f64);
        } else {
            let m = logit[..lim].iter().copied().fold(f64::NEG_INFINITY, f64::max);
            for j in 0..lim {
                p[j] = numerics::exp(logit[j] - m);
            }
            let z = numerics::lane_sum(lim, |j| p[j]);
            p[..lim].iter_mut().for_each(|x| *x /= z);
        }
        if let Some(prev) = self.prev {
            let row = &prev[d.unit(b, h, s) * n..][..n];
            p.iter_mut().zip(row).for_each(|(x, &q)| *x = 0.25 * q as f64 + 0.75 * *x);
        }
        let entropy = -numerics::lane_sum(n, |j| p[j] * numerics::ln(p[j] + 1e-9));
        let key = if self.prev.is_some() { &p[..lim] } else { &logit[..lim] };
        let mut ranked = vec![0u32; self.width];
        rules::rank_row(key, &mut Vec::new(), &mut ranked);
        let keep_scores = self.keep_maps || self.cfg.layer_fusion;
        UnitOut {
            logits: if self.keep_maps { logit.iter().map(|&x| x as f32).collect() } else { Vec::new() },
            scores: if keep_scores { p.iter().map(|&x| x as f32).collect() } else { Vec::new() },
            entropy,
            ranked,
        }
    }
}

pub(crate) fn plan<E: Element>(isa: Isa, a: &PlanArgs<'_>) -> Plan {
    let d = a.dims();
    let dd = a.head_dim();
    let n = d.blocks;
    let (q, k) = (a.q(), a.k());

    // Representatives: per (b, segment) for queries, per (b, block) for keys.
    let mut qrep = vec![0f64; d.batch * d.segments * d.q_heads * 2 * dd];
    qrep.par_chunks_mut(d.q_heads * 2 * dd).enumerate().for_each_init(
        || vec![0f32; dd],
        |row, (bs, out)| {
            let (b, s) = (bs / d.segments, bs % d.segments);
            representatives::<E>(&q, b, d.segment_range(s), d.q_heads, dd, out, row)
        },
    );
    let mut krep = vec![0f64; d.batch * n * d.kv_heads * 2 * dd];
    if n > 0 {
        krep.par_chunks_mut(d.kv_heads * 2 * dd).enumerate().for_each_init(
            || vec![0f32; dd],
            |row, (bj, out)| {
                let (b, j) = (bj / n, bj % n);
                let bk = d.block_size;
                representatives::<E>(&k, b, j * bk..(j + 1) * bk, d.kv_heads, dd, out, row)
            },
        );
    }
    plan_from_representatives(isa, a, &qrep, &krep)
}

/// The rest of planning from the representatives (`qrep` `[B, segments, Hq, 2, D]`, `krep`
/// `[B, blocks, Hkv, 2, D]`, max then min), in f64: shared by the CPU backend and by backends
/// whose devices compute the representatives (max/min are exact in any precision) but have no
/// f64 arithmetic for the decisions.
pub(crate) fn plan_from_representatives(isa: Isa, a: &PlanArgs<'_>, qrep: &[f64], krep: &[f64]) -> Plan {
    let d = a.dims();
    let cfg = a.cfg();
    let dd = a.head_dim();
    // The logits only need qmax + qmin (SPEC §2.2: both terms share the key representative).
    let qsum: Vec<f64> = qrep.chunks(2 * dd).flat_map(|hm| (0..dd).map(move |i| hm[i] + hm[dd + i])).collect();

    // Per-unit logits, distribution, entropy and ranking, ranked as far as any keep can reach
    // (the final width, max(segment_topk), is only known once every entropy is).
    let rank_width = d.rank_width(cfg.base_budget);
    let units: Vec<UnitOut> = (0..d.units())
        .into_par_iter()
        .map(|u| {
            let (bh, s) = (u / d.segments, u % d.segments);
            let (b, h) = (bh / d.kv_heads, bh % d.kv_heads);
            let job = UnitJob {
                dims: d,
                cfg,
                head_dim: dd,
                qsum: &qsum,
                krep,
                prev: a.fusion(),
                keep_maps: a.keep_maps(),
                b,
                h,
                s,
                width: rank_width,
            };
            dispatch(isa, job)
        })
        .collect();

    let entropy: Vec<f32> = units.iter().map(|u| u.entropy as f32).collect();
    let (head_class, budgets, keep_blocks, segment_topk) = rules::decide(&d, cfg, &entropy);
    let width = rules::order_width(&segment_topk);
    let mut order = Vec::with_capacity(d.units() * width);
    for unit in &units {
        order.extend_from_slice(&unit.ranked[..width]);
    }
    let mut plan = Plan {
        dims: d,
        logits: units.iter().flat_map(|u| u.logits.iter().copied()).collect(),
        scores: units.iter().flat_map(|u| u.scores.iter().copied()).collect(),
        entropy,
        head_class,
        budgets,
        keep_blocks,
        segment_topk,
        order,
        order_width: width,
        blocks: BlockLists::all_dense(d),
    };
    plan.blocks = plan.block_lists(cfg.budget_mode, cfg.threshold_len);
    plan
}

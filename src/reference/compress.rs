//! SPEC §4 compression, step by step, in f64.

use super::{F64Tensor, dot};
use crate::compress::CompressedCache;
use crate::config::{GqaMode, HeadBudget, Pooling};
use crate::tensor::HostTensor;
use crate::validate::CompressArgs;

pub fn kv_compress(a: &CompressArgs<'_>) -> CompressedCache {
    let d = a.dims();
    let cfg = a.cfg();
    let (bsz, hkv, n, w) = (d.batch, d.kv_heads, d.entries, d.window);
    let k = F64Tensor::of(&a.k_cache());
    let v = F64Tensor::of(&a.v_cache());

    if n < cfg.decode_budget {
        // Nothing to compress: every entry stays, in place.
        let ww = w.min(n);
        let sel = vec![(0..n - ww).collect::<Vec<usize>>(); bsz * hkv];
        return build(&k, &v, a, hkv, ww, &sel);
    }

    let rows = pooled_scores(a, &k);
    let heads = rows[0].len();
    let scored = n - w;

    // 5. Selection: best scores, ties to the lower position, then ascending.
    let share = cfg.decode_budget - w;
    let by_score = |row: &Vec<f64>| {
        let mut idx: Vec<usize> = (0..scored).collect();
        idx.sort_by(|&x, &y| crate::numerics::rank_cmp(row[x], row[y]).then(x.cmp(&y)));
        idx
    };
    let mut sel: Vec<Vec<usize>> = Vec::new();
    for b in 0..bsz {
        match cfg.head_budget {
            HeadBudget::Uniform => {
                for hc in 0..heads {
                    let mut s = by_score(&rows[b][hc])[..share].to_vec();
                    s.sort();
                    sel.push(s);
                }
            }
            HeadBudget::AdaKv { floor_fraction } => {
                let floor = ((floor_fraction as f64 * share as f64).ceil() as usize).min(share);
                let mut picked: Vec<Vec<usize>> =
                    (0..heads).map(|hc| by_score(&rows[b][hc])[..floor].to_vec()).collect();
                let mut pool: Vec<(f64, usize, usize)> = Vec::new();
                for hc in 0..heads {
                    for j in 0..scored {
                        if !picked[hc].contains(&j) {
                            pool.push((rows[b][hc][j], hc, j));
                        }
                    }
                }
                pool.sort_by(|x, y| crate::numerics::rank_cmp(x.0, y.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
                for &(_, hc, j) in pool.iter().take(heads * share - heads * floor) {
                    picked[hc].push(j);
                }
                for mut s in picked {
                    s.sort();
                    sel.push(s);
                }
            }
        }
    }
    build(&k, &v, a, heads, w, &sel)
}

/// Gathers kept entries then the window into `[B, heads, capacity, D]`; output head `hc` reads
/// kv head `hc / (heads / Hkv)`.
fn build(
    k: &F64Tensor,
    v: &F64Tensor,
    a: &CompressArgs<'_>,
    heads: usize,
    w: usize,
    sel: &[Vec<usize>],
) -> CompressedCache {
    let d = a.dims();
    let (bsz, n, dd) = (d.batch, d.entries, d.head_dim);
    let per_kv = heads / d.kv_heads;
    let capacity = sel.iter().map(Vec::len).max().unwrap() + w;
    let mut ko = vec![0f32; bsz * heads * capacity * dd];
    let mut vo = vec![0f32; bsz * heads * capacity * dd];
    let mut lengths = Vec::new();
    let mut indices = vec![-1i64; bsz * heads * (capacity - w)];
    for b in 0..bsz {
        for hc in 0..heads {
            let u = b * heads + hc;
            let s = &sel[u];
            lengths.push((s.len() + w) as u32);
            for (i, &p) in s.iter().enumerate() {
                indices[u * (capacity - w) + i] = p as i64;
            }
            for (slot, p) in s.iter().copied().chain(n - w..n).enumerate() {
                let o = (u * capacity + slot) * dd;
                for x in 0..dd {
                    ko[o + x] = k.row(b, hc / per_kv, p)[x] as f32;
                    vo[o + x] = v.row(b, hc / per_kv, p)[x] as f32;
                }
            }
        }
    }
    let shape = [bsz, heads, capacity, dd];
    let dtype = a.k_cache().dtype();
    CompressedCache {
        k: HostTensor::from_f32(&ko, shape, dtype),
        v: HostTensor::from_f32(&vo, shape, dtype),
        lengths,
        indices,
        window: w,
        compressed: n >= a.cfg().decode_budget,
    }
}

/// Steps 1–4 of SPEC §4.2: pooled scores `[B][heads][N - W]` (for tests that need to tell a
/// near-tie from a wrong selection).
pub fn compress_scores(a: &CompressArgs<'_>) -> Vec<Vec<Vec<f64>>> {
    pooled_scores(a, &F64Tensor::of(&a.k_cache()))
}

fn pooled_scores(a: &CompressArgs<'_>, k: &F64Tensor) -> Vec<Vec<Vec<f64>>> {
    let d = a.dims();
    let cfg = a.cfg();
    let (bsz, hkv, hq, n, w) = (d.batch, d.kv_heads, d.q_heads, d.entries, d.window);
    let g = hq / hkv;
    let scale = a.scale() as f64;
    let obs = F64Tensor::of(&a.obs());
    let scored = n - w;

    // 1–2. Window scores: softmax over the visible entries per window query, mean over the window.
    let mut attn = vec![vec![vec![0.0f64; scored]; hq]; bsz];
    for b in 0..bsz {
        for qh in 0..hq {
            let h = qh / g;
            for wi in 0..w {
                let visible = n - w + wi + 1;
                let x: Vec<f64> = (0..visible).map(|j| scale * dot(obs.row(b, qh, wi), k.row(b, h, j))).collect();
                let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = x.iter().map(|xi| (xi - m).exp()).sum();
                for j in 0..scored {
                    attn[b][qh][j] += (x[j] - m).exp() / z;
                }
            }
            for j in 0..scored {
                attn[b][qh][j] /= w as f64;
            }
        }
    }

    // 3. Group reduction.
    let heads = if cfg.gqa_mode == GqaMode::PerQueryHead { hq } else { hkv };
    let mut rows = vec![vec![vec![0.0f64; scored]; heads]; bsz];
    for b in 0..bsz {
        for hc in 0..heads {
            for j in 0..scored {
                rows[b][hc][j] = match cfg.gqa_mode {
                    GqaMode::PerQueryHead => attn[b][hc][j],
                    GqaMode::Mean => (0..g).map(|gi| attn[b][hc * g + gi][j]).sum::<f64>() / g as f64,
                    GqaMode::Max => (0..g).map(|gi| attn[b][hc * g + gi][j]).fold(f64::NEG_INFINITY, f64::max),
                };
            }
        }
    }

    // 4. Pooling along the cache.
    let half = (cfg.pooling_kernel / 2) as i64;
    for b in 0..bsz {
        for hc in 0..heads {
            let r = rows[b][hc].clone();
            for j in 0..scored {
                let window = (j as i64 - half..=j as i64 + half).filter(|&i| i >= 0 && (i as usize) < scored);
                rows[b][hc][j] = match cfg.pooling {
                    Pooling::None => r[j],
                    Pooling::Avg => window.map(|i| r[i as usize]).sum::<f64>() / cfg.pooling_kernel as f64,
                    Pooling::Max => window.map(|i| r[i as usize]).fold(f64::NEG_INFINITY, f64::max),
                };
            }
        }
    }

    rows
}

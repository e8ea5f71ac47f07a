//! SPEC §4 compression, step by step, in f64.

use super::{F64Tensor, dot};
use crate::alloc;
use crate::compress::CompressedCache;
use crate::config::{GqaMode, HeadBudget, Pooling};
use crate::error::Result;
use crate::tensor::HostTensor;
use crate::validate::CompressArgs;

pub fn kv_compress(a: &CompressArgs<'_>) -> Result<CompressedCache> {
    let d = a.dims();
    let cfg = a.cfg();
    let (bsz, hkv, n, w) = (d.batch, d.kv_heads, d.entries, d.window);
    let k = F64Tensor::try_of(&a.k_cache())?;
    let v = F64Tensor::try_of(&a.v_cache())?;

    if n < cfg.decode_budget {
        // Nothing to compress: every entry stays, in place.
        let ww = w.min(n);
        let sel = vec![(0..n - ww).collect::<Vec<usize>>(); bsz * hkv];
        return build(&k, &v, a, hkv, ww, &sel);
    }

    let rows = pooled_scores(a, &k)?;
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
                let mut pool: Vec<(f64, usize, usize)> =
                    alloc::with_capacity("the oracle's AdaKV pool", alloc::count("the AdaKV pool", &[heads, scored])?)?;
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
) -> Result<CompressedCache> {
    let d = a.dims();
    let (bsz, n, dd) = (d.batch, d.entries, d.head_dim);
    let per_kv = heads / d.kv_heads;
    let capacity = sel.iter().map(Vec::len).max().unwrap() + w;
    let mut ko = alloc::grid("the compressed keys", &[bsz, heads, capacity, dd], 0f32)?;
    let mut vo = alloc::grid("the compressed values", &[bsz, heads, capacity, dd], 0f32)?;
    let mut lengths = Vec::new();
    let mut indices = alloc::grid("the kept positions", &[bsz, heads, capacity - w], -1i64)?;
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
    Ok(CompressedCache {
        k: HostTensor::from_f32(&ko, shape, dtype),
        v: HostTensor::from_f32(&vo, shape, dtype),
        lengths,
        indices,
        window: w,
        compressed: n >= a.cfg().decode_budget,
    })
}

/// Steps 1–4 of SPEC §4.2: pooled scores `[B][heads][N - W]` (for tests that need to tell a
/// near-tie from a wrong selection).
///
/// # Panics
/// If the scores cannot be allocated (a test helper; the backend reports `Error::Alloc`).
pub fn compress_scores(a: &CompressArgs<'_>) -> Vec<Vec<Vec<f64>>> {
    pooled_scores(a, &F64Tensor::of(&a.k_cache())).expect("compress_scores: allocation")
}

/// `[B][heads][N - W]` rows of zeros, fallibly (heads · entries can exceed both inputs).
fn score_rows(bsz: usize, heads: usize, scored: usize) -> Result<Vec<Vec<Vec<f64>>>> {
    alloc::probe::<f64>("the oracle's decode scores", &[bsz, heads, scored])?;
    (0..bsz).map(|_| (0..heads).map(|_| alloc::filled("the oracle's decode scores", scored, 0.0)).collect()).collect()
}

fn pooled_scores(a: &CompressArgs<'_>, k: &F64Tensor) -> Result<Vec<Vec<Vec<f64>>>> {
    let d = a.dims();
    let cfg = a.cfg();
    let (bsz, hkv, hq, n, w) = (d.batch, d.kv_heads, d.q_heads, d.entries, d.window);
    let g = hq / hkv;
    let scale = a.scale() as f64;
    let heads = if cfg.gqa_mode == GqaMode::PerQueryHead { hq } else { hkv };
    // A cache no longer than the window has nothing to score (it is returned unchanged).
    if n <= w {
        return Ok(vec![vec![Vec::new(); heads]; bsz]);
    }
    let scored = n - w;
    let obs = F64Tensor::try_of(&a.obs())?;

    // 1–2. Window scores: softmax over the visible entries per window query, mean over the window.
    let mut attn = score_rows(bsz, hq, scored)?;
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
    let mut rows = score_rows(bsz, heads, scored)?;
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

    // 4. Pooling along the cache: the kernel's positions that fall inside 0..N-W (zero padding
    // outside adds nothing to a sum and never wins a max).
    let half = cfg.pooling_kernel / 2;
    for b in 0..bsz {
        for hc in 0..heads {
            let r = rows[b][hc].clone();
            for j in 0..scored {
                let window = j.saturating_sub(half)..=j.saturating_add(half).min(scored - 1);
                rows[b][hc][j] = match cfg.pooling {
                    Pooling::None => r[j],
                    Pooling::Avg => window.map(|i| r[i]).sum::<f64>() / cfg.pooling_kernel as f64,
                    Pooling::Max => window.map(|i| r[i]).fold(f64::NEG_INFINITY, f64::max),
                };
            }
        }
    }

    Ok(rows)
}

//! SPEC §4 compression, step by step, in f64.

use super::{F64Tensor, dot};
use crate::alloc;
use crate::compress::CompressedCache;
use crate::config::{GqaMode, HeadBudget, Pooling};
use crate::error::Result;
use crate::tensor::HostTensor;
use crate::validate::CompressArgs;

/// `kv_compress` in f64 (SPEC §4).
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

    // 5. Selection per batch row.
    let mut sel: Vec<Vec<usize>> = Vec::new();
    for row in &rows {
        sel.extend(select_rows(row, cfg)?);
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
    for row in rows.iter_mut().flatten() {
        *row = pool_row(row, cfg);
    }

    Ok(rows)
}

/// SPEC §4 step 5 for the heads of one batch row (or sequence): from pooled rows (each head's
/// scored positions), the kept positions of each head — the best `decode_budget − W` (ties to the
/// lower position), or AdaKV's shared budget — in ascending order.
pub(crate) fn select_rows(rows: &[Vec<f64>], cfg: &crate::config::DecodeConfig) -> Result<Vec<Vec<usize>>> {
    let heads = rows.len();
    let share = cfg.decode_budget - cfg.window;
    let by_score = |row: &Vec<f64>| {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&x, &y| crate::numerics::rank_cmp(row[x], row[y]).then(x.cmp(&y)));
        idx
    };
    let mut sel = Vec::with_capacity(heads);
    match cfg.head_budget {
        HeadBudget::Uniform => {
            for row in rows {
                let mut s = by_score(row);
                s.truncate(share);
                s.sort();
                sel.push(s);
            }
        }
        HeadBudget::AdaKv { floor_fraction } => {
            let floor = ((floor_fraction as f64 * share as f64).ceil() as usize).min(share);
            let mut picked: Vec<Vec<usize>> = rows
                .iter()
                .map(|r| {
                    let mut s = by_score(r);
                    s.truncate(floor);
                    s
                })
                .collect();
            let total: usize = rows.iter().map(Vec::len).sum();
            let mut pool: Vec<(f64, usize, usize)> = alloc::with_capacity("the oracle's AdaKV pool", total)?;
            for (hc, row) in rows.iter().enumerate() {
                for (j, &x) in row.iter().enumerate() {
                    if !picked[hc].contains(&j) {
                        pool.push((x, hc, j));
                    }
                }
            }
            pool.sort_by(|x, y| crate::numerics::rank_cmp(x.0, y.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
            let extra = heads * share - picked.iter().map(Vec::len).sum::<usize>();
            for &(_, hc, j) in pool.iter().take(extra) {
                picked[hc].push(j);
            }
            for mut s in picked {
                s.sort();
                sel.push(s);
            }
        }
    }
    Ok(sel)
}

/// SPEC §4 step 4 on one row of scores.
pub(crate) fn pool_row(r: &[f64], cfg: &crate::config::DecodeConfig) -> Vec<f64> {
    let half = cfg.pooling_kernel / 2;
    let n = r.len();
    (0..n)
        .map(|j| {
            let window = j.saturating_sub(half)..=j.saturating_add(half).min(n - 1);
            match cfg.pooling {
                Pooling::None => r[j],
                Pooling::Avg => window.map(|i| r[i]).sum::<f64>() / cfg.pooling_kernel as f64,
                Pooling::Max => window.map(|i| r[i]).fold(f64::NEG_INFINITY, f64::max),
            }
        })
        .collect()
}

//! The compressed KV cache (SPEC §4) and the selection rules the fast backends share: pooling,
//! top-k with ties to the lower position, AdaKV's cross-head allocation, and the gather.

use crate::alloc;
use crate::config::{DecodeConfig, HeadBudget, Pooling};
use crate::error::Result;
use crate::tensor::{Element, HostBuffer, HostTensor, TensorView};
use crate::validate::CompressDims;

/// A compacted cache: per head, the kept entries in ascending position order, then the window.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressedCache {
    /// `[B, Hc, capacity, D]`, in the input dtype. Entries past a head's length are zero.
    pub k: HostTensor,
    /// The compressed values.
    pub v: HostTensor,
    /// `[B, Hc]` entries per head (all equal to `decode_budget` unless AdaKV shares the budget).
    pub lengths: Vec<u32>,
    /// `[B, Hc, capacity - window]` kept positions (ascending), `-1` past a head's kept count.
    pub indices: Vec<i64>,
    /// The window W: the last W entries of every head.
    pub window: usize,
    /// False when the cache was shorter than the budget and is returned unchanged.
    pub compressed: bool,
}

impl CompressedCache {
    /// Batch size.
    pub fn batch(&self) -> usize {
        self.k.shape[0]
    }
    /// Cache heads.
    pub fn heads(&self) -> usize {
        self.k.shape[1]
    }
    /// Capacity, in entries per head.
    pub fn capacity(&self) -> usize {
        self.k.shape[2]
    }
    /// Head dimension, in elements.
    pub fn head_dim(&self) -> usize {
        self.k.shape[3]
    }
    /// Columns of `indices`.
    pub fn index_width(&self) -> usize {
        self.capacity() - self.window
    }
    /// Bytes of K and V actually kept (sum of head lengths), the figure a paged cache would hold.
    pub fn kept_bytes(&self) -> usize {
        let per_entry = 2 * self.head_dim() * self.k.dtype().size();
        self.lengths.iter().map(|&l| l as usize * per_entry).sum()
    }
}

/// Pools one score row (SPEC §4.4): avg uses zero padding and always divides by the kernel, max
/// lets no padding win.
pub fn pool_row(scores: &[f32], pooling: Pooling, kernel: usize, out: &mut [f32]) {
    let n = scores.len();
    let half = kernel / 2;
    match pooling {
        Pooling::None => out.copy_from_slice(scores),
        Pooling::Avg => {
            // Sum in a fixed left-to-right order per window so equal neighbourhoods tie exactly.
            let inv = 1.0 / kernel as f32;
            for (i, o) in out.iter_mut().enumerate() {
                let (lo, hi) = (i.saturating_sub(half), (i + half + 1).min(n));
                *o = scores[lo..hi].iter().sum::<f32>() * inv;
            }
        }
        Pooling::Max => {
            for (i, o) in out.iter_mut().enumerate() {
                let (lo, hi) = (i.saturating_sub(half), (i + half + 1).min(n));
                *o = scores[lo..hi].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            }
        }
    }
}

/// The `keep` best positions of `scores` (larger first, ties to the lower position), ascending.
pub fn top_positions(scores: &[f32], keep: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    let by_rank =
        |a: &u32, b: &u32| crate::numerics::rank_cmp32(scores[*a as usize], scores[*b as usize]).then(a.cmp(b));
    if keep < idx.len() && keep > 0 {
        idx.select_nth_unstable_by(keep - 1, by_rank);
    }
    idx.truncate(keep);
    idx.sort_unstable();
    idx
}

/// Per-head selections of one batch row from pooled scores `rows[h]` (each `N - W` long).
pub fn select_heads(rows: &[Vec<f32>], cfg: &DecodeConfig) -> Result<Vec<Vec<u32>>> {
    let share = cfg.decode_budget - cfg.window;
    match cfg.head_budget {
        HeadBudget::Uniform => Ok(rows.iter().map(|r| top_positions(r, share)).collect()),
        HeadBudget::AdaKv { floor_fraction } => adakv(rows, share, floor_fraction),
    }
}

/// One entry of AdaKV's shared pool: a pooled score at (head, position), heads numbered across
/// every tensor-parallel shard.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PoolEntry {
    /// The pooled score.
    pub score: f32,
    /// The head, numbered across every shard.
    pub head: u32,
    /// The cache position, in entries.
    pub position: u32,
}

/// A shard's contribution to AdaKV's cross-head reduction (SPEC §7.7): how many positions its
/// heads' floors took, and its best pool entries (as many as the whole layer could still take).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardPool {
    /// Positions the shard's heads' floors took.
    pub floor_picks: usize,
    /// The shard's best pool entries.
    pub candidates: Vec<PoolEntry>,
}

/// The reduced value every shard applies: how far down the merged pool AdaKV's shared budget
/// reaches.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum AdaKvCut {
    /// Nothing beyond the floors.
    Nothing,
    /// Every pool entry (the pool is smaller than the budget left).
    Everything,
    /// Every pool entry ranking at or before this one (larger score, then lower head, then lower
    /// position).
    Through(PoolEntry),
}

fn pool_rank(a: &PoolEntry, b: &PoolEntry) -> std::cmp::Ordering {
    crate::numerics::rank_cmp32(a.score, b.score).then(a.head.cmp(&b.head)).then(a.position.cmp(&b.position))
}

/// The floors of AdaKV for the rows of one shard's heads, and the rest of each row as pool entries
/// with global head ids starting at `first_head`.
fn floors_and_pool(rows: &[Vec<f32>], floor: usize, first_head: usize) -> Result<(Vec<Vec<u32>>, Vec<PoolEntry>)> {
    alloc::probe::<PoolEntry>("AdaKV's pool", &[rows.len(), rows.iter().map(Vec::len).max().unwrap_or(0)])?;
    let picked: Vec<Vec<u32>> = rows.iter().map(|r| top_positions(r, floor)).collect();
    let mut pool = alloc::with_capacity("AdaKV's pool", rows.iter().map(Vec::len).sum())?;
    for (h, r) in rows.iter().enumerate() {
        let mut taken = picked[h].iter().copied().peekable();
        for (i, &score) in r.iter().enumerate() {
            if taken.peek() == Some(&(i as u32)) {
                taken.next();
                continue;
            }
            pool.push(PoolEntry { score, head: (first_head + h) as u32, position: i as u32 });
        }
    }
    Ok((picked, pool))
}

/// A shard's side of AdaKV under tensor parallelism: its heads' rows (global heads
/// `first_head..`), the layer's `total_heads`. Send it to the other ranks (all-gather), reduce
/// with [`adakv_reduce`], then select with [`adakv_with_cut`].
pub fn adakv_pool(rows: &[Vec<f32>], cfg: &DecodeConfig, first_head: usize, total_heads: usize) -> Result<ShardPool> {
    let (share, floor_fraction) = adakv_params(cfg);
    let (picked, mut pool) = floors_and_pool(rows, adakv_floor(share, floor_fraction), first_head)?;
    let reach = (total_heads * share).min(pool.len());
    if reach > 0 && reach < pool.len() {
        pool.select_nth_unstable_by(reach - 1, pool_rank);
    }
    pool.truncate(reach);
    pool.sort_unstable_by(pool_rank);
    Ok(ShardPool { floor_picks: picked.iter().map(Vec::len).sum(), candidates: pool })
}

/// The engine's reduction of every shard's [`ShardPool`]: the layer keeps `total_heads · share`
/// scored positions, the floors first, the best of the merged pools after.
pub fn adakv_reduce(shards: &[ShardPool], cfg: &DecodeConfig, total_heads: usize) -> AdaKvCut {
    let (share, _) = adakv_params(cfg);
    let extra = (total_heads * share).saturating_sub(shards.iter().map(|s| s.floor_picks).sum());
    let mut all: Vec<PoolEntry> = shards.iter().flat_map(|s| s.candidates.iter().copied()).collect();
    all.sort_unstable_by(pool_rank);
    match extra {
        0 => AdaKvCut::Nothing,
        e if e >= all.len() => AdaKvCut::Everything,
        e => AdaKvCut::Through(all[e - 1]),
    }
}

/// A shard's AdaKV selection given the reduced cut: each head's floor, then every pool entry
/// ranking at or before the cut; ascending per head.
pub fn adakv_with_cut(
    rows: &[Vec<f32>],
    cfg: &DecodeConfig,
    first_head: usize,
    cut: AdaKvCut,
) -> Result<Vec<Vec<u32>>> {
    let (share, floor_fraction) = adakv_params(cfg);
    let (mut picked, pool) = floors_and_pool(rows, adakv_floor(share, floor_fraction), first_head)?;
    for e in pool {
        let take = match cut {
            AdaKvCut::Nothing => false,
            AdaKvCut::Everything => true,
            AdaKvCut::Through(c) => pool_rank(&e, &c) != std::cmp::Ordering::Greater,
        };
        if take {
            picked[e.head as usize - first_head].push(e.position);
        }
    }
    for p in &mut picked {
        p.sort_unstable();
    }
    Ok(picked)
}

fn adakv_params(cfg: &DecodeConfig) -> (usize, f32) {
    let share = cfg.decode_budget - cfg.window;
    match cfg.head_budget {
        HeadBudget::AdaKv { floor_fraction } => (share, floor_fraction),
        HeadBudget::Uniform => (share, 1.0),
    }
}

/// AdaKV's per-head floor: `ceil(floor_fraction · share)`, at most `share`.
pub fn adakv_floor(share: usize, floor_fraction: f32) -> usize {
    ((floor_fraction as f64 * share as f64).ceil() as usize).min(share)
}

/// AdaKV allocation: each head first takes its `ceil(floor_fraction · share)` best positions; the
/// rest of the layer budget `heads · share` goes to the best remaining (score, head, position)
/// across heads, larger score first, ties to the lower head, then the lower position.
fn adakv(rows: &[Vec<f32>], share: usize, floor_fraction: f32) -> Result<Vec<Vec<u32>>> {
    let floor = adakv_floor(share, floor_fraction);
    alloc::probe::<(u32, u32)>("AdaKV's pool", &[rows.len(), rows.first().map_or(0, Vec::len), 2])?;
    let mut picked: Vec<Vec<u32>> = rows.iter().map(|r| top_positions(r, floor)).collect();
    let mut taken: Vec<Vec<bool>> =
        rows.iter().map(|r| alloc::filled("AdaKV's taken flags", r.len(), false)).collect::<Result<_>>()?;
    for (h, p) in picked.iter().enumerate() {
        for &i in p {
            taken[h][i as usize] = true;
        }
    }
    let mut rest: Vec<(u32, u32)> = alloc::with_capacity("AdaKV's pool", rows.iter().map(Vec::len).sum())?;
    for (h, r) in rows.iter().enumerate() {
        rest.extend((0..r.len() as u32).filter(|&i| !taken[h][i as usize]).map(|i| (h as u32, i)));
    }
    let extra = rows.len() * share - picked.iter().map(Vec::len).sum::<usize>();
    let score = |&(h, i): &(u32, u32)| rows[h as usize][i as usize];
    let by_rank = |a: &(u32, u32), b: &(u32, u32)| crate::numerics::rank_cmp32(score(a), score(b)).then(a.cmp(b));
    if extra > 0 && extra < rest.len() {
        rest.select_nth_unstable_by(extra - 1, by_rank);
    }
    for &(h, i) in rest.iter().take(extra) {
        picked[h as usize].push(i);
    }
    for p in &mut picked {
        p.sort_unstable();
    }
    Ok(picked)
}

/// The compressed cache from the pooled scores, one row of `N − W` per (b, output head): each
/// batch row's heads select (uniform or AdaKV budgets), then the kept entries are gathered.
pub fn select_and_gather(a: &crate::validate::CompressArgs<'_>, pooled: &[Vec<f32>]) -> Result<CompressedCache> {
    let d = a.dims();
    let heads = d.out_heads(a.cfg());
    let mut sel: Vec<Vec<u32>> = Vec::with_capacity(pooled.len());
    for rows in pooled.chunks(heads) {
        sel.extend(select_heads(rows, a.cfg())?);
    }
    gather(&a.k_cache(), &a.v_cache(), &d, heads, &sel)
}

/// Builds the compressed cache from per-(b, output head) kept positions (`sel[b·Hc + hc]`).
pub fn gather(
    k_cache: &TensorView<'_>,
    v_cache: &TensorView<'_>,
    d: &CompressDims,
    heads: usize,
    sel: &[Vec<u32>],
) -> Result<CompressedCache> {
    let n = d.entries;
    let w = d.window;
    let capacity = sel.iter().map(Vec::len).max().unwrap_or(0) + w;
    let group = heads / d.kv_heads;
    let mut lengths = Vec::with_capacity(sel.len());
    let mut indices = alloc::grid("the kept positions", &[sel.len(), capacity - w], -1i64)?;
    for (u, s) in sel.iter().enumerate() {
        lengths.push((s.len() + w) as u32);
        for (j, &p) in s.iter().enumerate() {
            indices[u * (capacity - w) + j] = p as i64;
        }
    }
    let shape = [d.batch, heads, capacity, d.head_dim];
    let take = |src: &TensorView<'_>| -> Result<HostTensor> {
        fn go<T: Element>(
            src: &TensorView<'_>,
            d: &CompressDims,
            heads: usize,
            group: usize,
            capacity: usize,
            sel: &[Vec<u32>],
        ) -> Result<Vec<T>> {
            let data = src.typed::<T>().expect("dtype checked by validation");
            let dd = d.head_dim;
            // Hc · capacity can exceed the cache (per_query_head keeps Hq heads).
            let mut out = alloc::grid("the compressed cache", &[d.batch, heads, capacity, dd], T::default())?;
            for b in 0..d.batch {
                for hc in 0..heads {
                    let u = b * heads + hc;
                    let positions = sel[u].iter().map(|&p| p as usize).chain(d.entries - d.window..d.entries);
                    for (slot, p) in positions.enumerate() {
                        let o = src.offset(b, hc / group, p);
                        let dst = (u * capacity + slot) * dd;
                        out[dst..dst + dd].copy_from_slice(&data[o..o + dd]);
                    }
                }
            }
            Ok(out)
        }
        let data = match src.dtype() {
            crate::DType::F32 => HostBuffer::F32(go(src, d, heads, group, capacity, sel)?),
            crate::DType::F16 => HostBuffer::F16(go(src, d, heads, group, capacity, sel)?),
            crate::DType::BF16 => HostBuffer::BF16(go(src, d, heads, group, capacity, sel)?),
        };
        Ok(HostTensor { data, shape })
    };
    debug_assert!(n >= w);
    Ok(CompressedCache { k: take(k_cache)?, v: take(v_cache)?, lengths, indices, window: w, compressed: true })
}

/// The cache returned unchanged (SPEC §4: `N < decode_budget`): every entry kept.
pub fn unchanged(k_cache: &TensorView<'_>, v_cache: &TensorView<'_>, d: &CompressDims) -> Result<CompressedCache> {
    let w = d.window.min(d.entries);
    let all: Vec<u32> = (0..(d.entries - w) as u32).collect();
    let sel = vec![all; d.batch * d.kv_heads];
    let dims = CompressDims { window: w, ..*d };
    let mut c = gather(k_cache, v_cache, &dims, d.kv_heads, &sel)?;
    c.compressed = false;
    Ok(c)
}

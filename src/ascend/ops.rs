//! The operations of the Ascend backend, written once over a [`Launcher`]: argument packing into
//! the header's params structs, the kernels' own limits, and the host steps around them.

use super::TopK;
use super::launch::{self, Launcher};
use crate::backend::{Capabilities, HeadDims, Op};
use crate::compress::{self, CompressedCache};
use crate::config::DecodeConfig;
use crate::config::HeadBudget;
use crate::engine::args::{AttendShape, ChunkSettings, SeqChunk};
use crate::engine::{AttendArgs, BlockTable, KvCache, PageLayout, Scores, SelectArgs, Selection};
use crate::error::{Error, Result};
use crate::ffi::{
    EkAppendParams, EkAttendParams, EkCompressParams, EkDecodeParams, EkPlanParams, EkPrefillParams, EkTensor,
    dtype_code,
};
use crate::plan::Plan;
use crate::tensor::{DType, HostTensor, TensorView, TensorViewMut};
use crate::validate::{AttentionArgs, CompressArgs, CompressDims, DecodeArgs, PlanArgs};

/// Where a cache pool is for the kernels: in host memory (placed by the launcher for this call)
/// or in device memory held across calls (a resident cache: none of it travels).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Pool<'c> {
    Host(&'c [u8]),
    Device(u64),
}

impl Pool<'_> {
    fn addr<'v>(self, l: &mut impl Launcher<'v>) -> Result<u64> {
        match self {
            Pool::Host(bytes) => l.array(bytes),
            Pool::Device(addr) => Ok(addr),
        }
    }
}

/// A pool the kernels write: a whole-pool host view (it travels whole both ways and is written
/// back by `finish`, only on success), or device memory written in place.
pub(crate) enum PoolMut<'v, 'x> {
    Host(&'v mut TensorViewMut<'x>),
    Device(u64),
}

impl<'v> PoolMut<'v, '_> {
    fn addr(self, l: &mut impl Launcher<'v>) -> Result<u64> {
        match self {
            PoolMut::Host(view) => Ok(l.output(view)?.ptr),
            PoolMut::Device(addr) => Ok(addr),
        }
    }
}

/// A call's (validated) cache as the reading kernels address it: its pages and the two pools,
/// wherever they are.
pub(crate) struct CacheAt<'c> {
    pub pages: Pages<'c>,
    pub k: Pool<'c>,
    pub v: Pool<'c>,
}

impl<'c> CacheAt<'c> {
    /// A cache in host memory: its pools are uploaded by each call.
    pub(crate) fn host(c: &'c KvCache<'c>) -> Self {
        CacheAt {
            pages: Pages { layout: c.layout(), table: c.table(), lens: c.lens(), dtype: c.dtype() },
            k: Pool::Host(c.k().as_bytes()),
            v: Pool::Host(c.v().as_bytes()),
        }
    }
}

pub(crate) fn decode<'v>(mut l: impl Launcher<'v>, a: &DecodeArgs<'_>, out: &'v mut TensorViewMut<'_>) -> Result<()> {
    let d = a.dims();
    let params = EkDecodeParams {
        q: l.input(&a.q())?,
        k_cache: l.input(&a.k_cache())?,
        v_cache: l.input(&a.v_cache())?,
        out: l.output(out)?,
        lengths: l.array(launch::bytes_of(a.lengths()))?,
        partial: 0,
        group: d.group() as i32,
        splits: 1,
        keys_per_split: 0,
        scale_log2: a.scale() * std::f32::consts::LOG2_E,
        dtype: dtype_code(a.q().dtype()),
    };
    l.launch(launch::DECODE, &params)?;
    l.finish()
}

/// Attention over a (paged) cache (SPEC §7.4): the shared tiles (at most
/// [`ATTEND_MAX_ROWS`] rows each), one core per tile at a time, every key of a tile on its core.
pub(crate) fn attend<'v>(
    l: impl Launcher<'v>,
    a: &AttendArgs<'_>,
    out: &'v mut TensorViewMut<'_>,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    attend_at(l, a.shape(), &a.q(), &CacheAt::host(a.cache()), out, lse)
}

/// [`attend`] of a validated call over a cache wherever it is.
pub(crate) fn attend_at<'v>(
    mut l: impl Launcher<'v>,
    shape: &AttendShape<'_>,
    q: &TensorView<'_>,
    cache: &CacheAt<'_>,
    out: &'v mut TensorViewMut<'_>,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    let d = shape.dims();
    let work = crate::engine::tiles::work(shape, ATTEND_MAX_ROWS);
    if work.tiles.is_empty() {
        return Ok(()); // no query tokens
    }
    let Pages { layout, table, .. } = cache.pages;
    row_gap(layout.strides[1], d.head_dim, q.dtype())?;
    // Arrays the kernel indexes may be empty (no plans): never hand over a zero-length buffer.
    let nonempty = |v: &[u32]| if v.is_empty() { vec![0u32] } else { v.to_vec() };
    let lse_buf = match &lse {
        Some(x) => l.zeroed(std::mem::size_of_val(*x))?,
        None => 0,
    };
    let params = EkAttendParams {
        q: l.input(q)?,
        out: l.output(out)?,
        lse: lse_buf,
        k_pool: cache.k.addr(&mut l)?,
        v_pool: cache.v.addr(&mut l)?,
        block_table: l.array(launch::bytes_of(table.ids()))?,
        tiles: l.array(work.tile_bytes())?,
        offsets: l.array(launch::bytes_of(&nonempty(&work.offsets)))?,
        counts: l.array(launch::bytes_of(&nonempty(&work.counts)))?,
        indices: l.array(launch::bytes_of(&nonempty(&work.indices)))?,
        partial: 0,
        page_stride: layout.strides[0] as i64,
        slot_stride: layout.strides[1] as i64,
        head_stride: layout.strides[2] as i64,
        table_width: table.width() as i32,
        page_size: layout.page_size as i32,
        group: d.group() as i32,
        tile_rows: ATTEND_MAX_ROWS as i32,
        splits: 1,
        keys_per_split: 0,
        batched_rows: shape.batched().unwrap_or(0) as i32,
        scale_log2: shape.scale() * std::f32::consts::LOG2_E,
        tiles_count: work.tiles.len() as i32,
        dtype: dtype_code(q.dtype()),
    };
    l.launch(launch::ATTEND, &params)?;
    if let Some(x) = lse {
        l.read(lse_buf, bytemuck::cast_slice_mut(x))?;
    }
    l.finish()
}

/// A run of a paged cache's keys is one strided DataCopyPad: the gap between rows (slot stride −
/// D) is a u32 byte count and cannot be negative.
fn row_gap(slot_stride: usize, head_dim: usize, dtype: DType) -> Result<()> {
    let gap = (slot_stride as u64).checked_sub(head_dim as u64).map(|g| g * dtype.size() as u64);
    if gap.is_none_or(|g| g > u64::from(u32::MAX)) {
        return Err(Error::Layout {
            what: "cache",
            detail: format!(
                "the Ascend kernels read a head's entries as rows {slot_stride} elements apart: it must be at least \
                 the head dim {head_dim} and the gap below 4 GiB"
            ),
        });
    }
    Ok(())
}

/// Query rows per tile of the attention kernel (`ATTEND_MAX_ROWS` in ascend/kernels/attend.cpp).
pub const ATTEND_MAX_ROWS: usize = 16;

/// Operations with Ascend kernels (the others answer `Error::Unimplemented`).
pub const SUPPORTED: [Op; 7] =
    [Op::Plan, Op::Prefill, Op::KvCompress, Op::Decode, Op::Attend, Op::PlanChunks, Op::Select];

/// What the Ascend kernels run: every op in f32/f16/bf16, head dims up to 256 (prefill on the
/// cube for f16/bf16; f32 on the vector cores, A2's cube having no transposing f32 load for P·V).
pub fn capabilities(backend: &'static str) -> Capabilities {
    Capabilities {
        ops: SUPPORTED.to_vec(),
        // LoadRows' DataCopyPad takes the gap between rows as an unsigned (stride − D).
        overlapping_rows: false,
        // The cube takes P in the input's 16-bit type.
        low_precision_pv: vec![crate::DType::F16, crate::DType::BF16],
        ..Capabilities::full(backend, HeadDims::UpTo(PREFILL_MAX_D))
    }
}

/// Query heads per kv head the compression's means accumulators hold (`COMPRESS_MAX_GROUP`).
pub const COMPRESS_MAX_GROUP: usize = 16;
/// Most positions the sort/merge top-k keeps per head (`TOPK_CAP`: MrgSort lists hold at most
/// 4095 structures); threshold selection has no such limit.
pub const TOPK_CAP: usize = 4064;
/// Scored positions per head threshold selection counts exactly (f32 counters, f32 positions).
pub const SELECT_MAX_SCORED: usize = 1 << 24;
/// Keys per stats/means work item.
pub const COMPRESS_CHUNK: usize = 512;
/// Largest head dim of the cube scoring tiles (`CUBE_MAX_D` in kv_compress_cube.cpp).
pub const COMPRESS_CUBE_MAX_D: usize = 256;
/// GM workspace per AI core of the cube scoring: two 64 × 64 f32 score tiles.
pub const COMPRESS_CUBE_WORKSPACE: usize = 2 * 64 * 64 * 4;

fn f32s(v: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(v)
}

pub(crate) fn kv_compress<'v>(mut l: impl Launcher<'v>, a: &CompressArgs<'_>, topk: TopK) -> Result<CompressedCache> {
    let d = a.dims();
    let cfg = a.cfg();
    if !d.compresses(cfg) {
        return compress::unchanged(&a.k_cache(), &a.v_cache(), &d);
    }
    let rows = d.group() * d.window;
    let keep = cfg.decode_budget - d.window;
    if d.group() > COMPRESS_MAX_GROUP {
        let why = format!("the Ascend compression averages at most {COMPRESS_MAX_GROUP} query heads per kv head");
        return Err(Error::range("group", d.group(), why));
    }
    let select = match topk {
        TopK::Auto => keep > TOPK_CAP,
        TopK::Sort => false,
        TopK::Select => true,
    };
    // AdaKV selects on the host: no device top-k limit applies.
    let device_topk = !matches!(cfg.head_budget, HeadBudget::AdaKv { .. });
    if device_topk && !select && keep > TOPK_CAP {
        let why = format!("the sort/merge top-k keeps at most {TOPK_CAP} (TopK::Auto or Select keep more)");
        return Err(Error::range("decode_budget - window", keep, why));
    }
    if device_topk && select && d.entries - d.window >= SELECT_MAX_SCORED {
        let why = format!("threshold selection counts fewer than {SELECT_MAX_SCORED} scored positions per head");
        return Err(Error::range("entries - window", d.entries - d.window, why));
    }
    let dtype = a.k_cache().dtype();
    // Scoring on the cube for 16-bit caches whose rows Nd2Nz can stride over; else on the vectors.
    let cube = dtype != DType::F32
        && d.head_dim <= COMPRESS_CUBE_MAX_D
        && a.k_cache().strides()[2] <= ND2NZ_MAX_STRIDE
        && a.obs().strides()[2] <= ND2NZ_MAX_STRIDE;
    let (n, w, dd) = (d.entries, d.window, d.head_dim);
    let scored = n - w;
    let heads = d.out_heads(cfg);
    let chunks = n.div_ceil(COMPRESS_CHUNK);
    let pad = if cfg.pooling == crate::config::Pooling::None { 0 } else { cfg.pooling_kernel / 2 };
    let means_stride = (scored + 2 * pad).div_ceil(8) * 8;
    let out_bytes = d.batch * heads * cfg.decode_budget * dd * dtype.size();
    let params = EkCompressParams {
        k_cache: l.input(&a.k_cache())?,
        v_cache: l.input(&a.v_cache())?,
        obs: l.input(&a.obs())?,
        stats: l.zeroed(4 * d.batch * d.kv_heads * chunks * 2 * rows)?,
        means: l.zeroed(4 * d.batch * d.q_heads * means_stride)?,
        pooled: l.zeroed(4 * d.batch * heads * scored)?,
        selected: l.zeroed(4 * d.batch * heads * keep)?,
        k_out: l.zeroed(out_bytes)?,
        v_out: l.zeroed(out_bytes)?,
        workspace: if cube {
            l.zeroed(l.block_dim(launch::COMPRESS_CUBE_STATS) as usize * COMPRESS_CUBE_WORKSPACE)?
        } else {
            0
        },
        ..EkCompressParams::sized(&d, cfg, COMPRESS_CHUNK, a.scale(), dtype)
    };
    let scoring = if cube {
        [launch::COMPRESS_CUBE_STATS, launch::COMPRESS_CUBE_MEANS]
    } else {
        [launch::COMPRESS_STATS, launch::COMPRESS_MEANS]
    };
    for k in scoring.into_iter().chain([launch::COMPRESS_POOL]) {
        l.launch(k, &params)?;
    }
    if let HeadBudget::AdaKv { .. } = cfg.head_budget {
        // AdaKV's cross-head allocation runs on the host over the device's pooled scores.
        let mut pooled = vec![0u8; 4 * d.batch * heads * scored];
        l.read(params.pooled, &mut pooled)?;
        let pooled = f32s(&pooled);
        let rows: Vec<Vec<f32>> = pooled.chunks(scored).map(<[f32]>::to_vec).collect();
        l.finish()?;
        return compress::select_and_gather(a, &rows);
    }
    l.launch(if select { launch::COMPRESS_SELECT } else { launch::COMPRESS_TOPK }, &params)?;
    l.launch(launch::COMPRESS_GATHER, &params)?;
    let mut selected = vec![0u8; 4 * d.batch * heads * keep];
    l.read(params.selected, &mut selected)?;
    let shape = [d.batch, heads, cfg.decode_budget, dd];
    let mut fetch = |addr: u64| -> Result<HostTensor> {
        let mut bytes = vec![0u8; out_bytes];
        l.read(addr, &mut bytes)?;
        Ok(HostTensor::from_bytes(&bytes, shape, dtype))
    };
    let (k, v) = (fetch(params.k_out)?, fetch(params.v_out)?);
    l.finish()?;
    let selected: Vec<u32> = bytemuck::pod_collect_to_vec(&selected);
    Ok(CompressedCache {
        k,
        v,
        lengths: vec![cfg.decode_budget as u32; d.batch * heads],
        indices: selected.iter().map(|&i| i as i64).collect(),
        window: w,
        compressed: true,
    })
}

/// The pooled score rows of the compressing sequences of a (paged) cache (SPEC §7.5, §4 steps
/// 1–4): the vector scoring kernels read keys through the block table, each head scoring its own
/// length (`head_lens`; 0: the sequence does not compress); the rows come back to the host,
/// where selection follows the shared rules ([`Scores::select`]) as the contiguous AdaKV path's.
pub(crate) fn kv_scores<'v>(l: impl Launcher<'v>, a: &SelectArgs<'_>) -> Result<Scores> {
    let s = Scoring { obs: a.obs(), cfg: a.cfg(), compress: a.compress(), scale: a.scale(), dims: a.dims() };
    Ok(Scores::of(a, score_rows(l, &s, &CacheAt::host(a.cache()))?))
}

/// A validated selection's scoring, wherever its cache is (`engine::compaction::select_shape`).
pub(crate) struct Scoring<'a> {
    pub obs: TensorView<'a>,
    pub cfg: &'a DecodeConfig,
    pub compress: &'a [bool],
    pub scale: f32,
    pub dims: CompressDims,
}

/// The pooled score rows of [`kv_scores`] (one per (sequence, head); empty where the sequence
/// does not compress), over a cache wherever it is.
pub(crate) fn score_rows<'v>(mut l: impl Launcher<'v>, a: &Scoring<'_>, cache: &CacheAt<'_>) -> Result<Vec<Vec<f32>>> {
    let d = a.dims;
    let cfg = a.cfg;
    let Pages { layout, table, lens, dtype } = cache.pages;
    let heads = d.kv_heads;
    if !a.compress.iter().any(|&c| c) {
        l.finish()?;
        return Ok(vec![Vec::new(); lens.len()]);
    }
    if d.group() > COMPRESS_MAX_GROUP {
        let why = format!("the Ascend compression averages at most {COMPRESS_MAX_GROUP} query heads per kv head");
        return Err(Error::range("group", d.group(), why));
    }
    row_gap(layout.strides[1], d.head_dim, a.obs.dtype())?;
    let rows = d.group() * d.window;
    let scored = d.entries - d.window;
    let chunks = d.entries.div_ceil(COMPRESS_CHUNK);
    let pad = if cfg.pooling == crate::config::Pooling::None { 0 } else { cfg.pooling_kernel / 2 };
    let means_stride = (scored + 2 * pad).div_ceil(8) * 8;
    let head_lens: Vec<u32> = (0..lens.len()).map(|u| if a.compress[u / heads] { lens[u] } else { 0 }).collect();
    // Over pages the kernels address keys through the table; the tensor carries the sizes only.
    let pool = |ptr: u64| EkTensor {
        ptr,
        stride: [0; 3],
        shape: [d.batch as i32, heads as i32, d.entries as i32, d.head_dim as i32],
    };
    let params = EkCompressParams {
        k_cache: pool(cache.k.addr(&mut l)?),
        v_cache: pool(0),
        obs: l.input(&a.obs)?,
        stats: l.zeroed(4 * d.batch * heads * chunks * 2 * rows)?,
        means: l.zeroed(4 * d.batch * d.q_heads * means_stride)?,
        pooled: l.zeroed(4 * d.batch * heads * scored)?,
        head_lens: l.array(launch::bytes_of(&head_lens))?,
        block_table: l.array(launch::bytes_of(table.ids()))?,
        page_stride: layout.strides[0] as i64,
        slot_stride: layout.strides[1] as i64,
        head_stride: layout.strides[2] as i64,
        table_width: table.width() as i32,
        page_size: layout.page_size as i32,
        ..EkCompressParams::sized(&d, cfg, COMPRESS_CHUNK, a.scale, dtype)
    };
    for k in [launch::COMPRESS_STATS, launch::COMPRESS_MEANS, launch::COMPRESS_POOL] {
        l.launch(k, &params)?;
    }
    let mut pooled = vec![0u8; 4 * d.batch * heads * scored];
    l.read(params.pooled, &mut pooled)?;
    l.finish()?;
    let pooled = f32s(&pooled);
    Ok((0..lens.len())
        .map(|u| {
            if head_lens[u] == 0 {
                Vec::new()
            } else {
                pooled[u * scored..][..head_lens[u] as usize - d.window].to_vec()
            }
        })
        .collect())
}

/// Append (SPEC §7.4) of a checked call on the vector cores: the new rows and the offsets, table
/// and (pre-append) lengths go to the device; host pools travel whole as outputs and come back
/// with the rows in place (a resident cache's are written where they are); the caller advances
/// the lengths afterwards.
pub(crate) fn append<'v>(
    mut l: impl Launcher<'v>,
    k_new: &TensorView<'_>,
    v_new: &TensorView<'_>,
    cu: &[u32],
    pools: [PoolMut<'v, '_>; 2],
    cache: &Pages<'_>,
) -> Result<()> {
    if k_new.shape()[1] == 0 {
        return l.finish();
    }
    let Pages { layout, table, lens, dtype } = *cache;
    let [k, v] = pools;
    let params = EkAppendParams {
        k_new: l.input(k_new)?,
        v_new: l.input(v_new)?,
        k_pool: k.addr(&mut l)?,
        v_pool: v.addr(&mut l)?,
        block_table: l.array(launch::bytes_of(table.ids()))?,
        cu_q: l.array(launch::bytes_of(cu))?,
        lens: l.array(launch::bytes_of(lens))?,
        page_stride: layout.strides[0] as i64,
        slot_stride: layout.strides[1] as i64,
        head_stride: layout.strides[2] as i64,
        table_width: table.width() as i32,
        page_size: layout.page_size as i32,
        sequences: (cu.len() - 1) as i32,
        cache_heads: layout.heads as i32,
        dtype: dtype_code(dtype),
    };
    l.launch(launch::APPEND, &params)?;
    l.finish()
}

/// What the pool-writing kernels address a cache by besides its pools.
#[derive(Clone, Copy)]
pub(crate) struct Pages<'c> {
    pub layout: &'c PageLayout,
    pub table: &'c BlockTable<'c>,
    pub lens: &'c [u32],
    pub dtype: DType,
}

/// A whole pool as a `[1, 1, 1, elements]` view: only its address reaches the kernel (which
/// addresses entries through the table with 64-bit offsets).
fn pool_view<'a>(pool: &'a mut crate::tensor::HostDataMut<'_>) -> TensorViewMut<'a> {
    let elements = pool.as_bytes_mut().len() / pool.dtype().size();
    TensorViewMut::new(pool.reborrow(), [1, 1, 1, elements])
}

/// Runs `f` on a host cache's K and V pools as whole-pool views (the outputs of the kernels that
/// write pools), with its layout, table and lengths.
pub(crate) fn with_pools<R>(
    cache: &mut crate::engine::KvCacheMut<'_>,
    f: impl FnOnce([PoolMut<'_, '_>; 2], &Pages<'_>) -> R,
) -> R {
    let (layout, table, lens) = (cache.layout, cache.table.clone(), cache.lens.to_vec());
    let dtype = cache.k.dtype();
    let mut k = pool_view(&mut cache.k);
    let mut v = pool_view(&mut cache.v);
    f([PoolMut::Host(&mut k), PoolMut::Host(&mut v)], &Pages { layout: &layout, table: &table, lens: &lens, dtype })
}

/// In-place compaction (SPEC §7.5) of a checked selection on the vector cores: host pools go to
/// the device as outputs (whole) and come back moved, a resident cache's are moved where they
/// are; the kept lists row by row (`list_stride` apart), each head's count (0 where the sequence
/// does not compress).
pub(crate) fn compact<'v>(
    mut l: impl Launcher<'v>,
    pools: [PoolMut<'v, '_>; 2],
    cache: &Pages<'_>,
    sel: &Selection,
) -> Result<()> {
    let Pages { layout, table, dtype, .. } = *cache;
    if !sel.compressed.iter().any(|&c| c) {
        return l.finish();
    }
    let heads = layout.heads;
    let units = sel.compressed.len() * heads;
    let counts: Vec<u32> = (0..units)
        .map(|u| if sel.compressed[u / heads] { sel.kept(u / heads, u % heads).len() as u32 } else { 0 })
        .collect();
    let stride = counts.iter().copied().max().unwrap_or(0).max(1) as usize;
    let mut lists = vec![0u32; units * stride];
    for u in (0..units).filter(|&u| counts[u] > 0) {
        lists[u * stride..][..counts[u] as usize].copy_from_slice(sel.kept(u / heads, u % heads));
    }
    let [k, v] = pools;
    let (kp, vp) = (k.addr(&mut l)?, v.addr(&mut l)?);
    // The kernel addresses entries through the table: the tensors carry the pools' addresses
    // and the sizes only.
    let sized = |ptr: u64| EkTensor {
        ptr,
        stride: [0; 3],
        shape: [sel.compressed.len() as i32, heads as i32, 0, layout.head_dim as i32],
    };
    let params = EkCompressParams {
        k_cache: sized(kp),
        v_cache: sized(vp),
        selected: l.array(launch::bytes_of(&lists))?,
        lengths: l.array(launch::bytes_of(&counts))?,
        list_stride: stride as i32,
        block_table: l.array(launch::bytes_of(table.ids()))?,
        page_stride: layout.strides[0] as i64,
        slot_stride: layout.strides[1] as i64,
        head_stride: layout.strides[2] as i64,
        table_width: table.width() as i32,
        page_size: layout.page_size as i32,
        dtype: dtype_code(dtype),
        ..EkCompressParams::default()
    };
    l.launch(launch::COMPRESS_COMPACT, &params)?;
    l.finish()
}

/// Query rows (tokens × group heads) of one prefill item (`PREFILL_ROWS` in prefill.cpp).
pub const PREFILL_ROWS: usize = 64;
/// Largest head dim of the prefill tiles (`PREFILL_MAX_D`).
pub const PREFILL_MAX_D: usize = 256;
/// Keys per prefill tile (`PREFILL_KEYS`).
pub const PREFILL_KEYS: usize = 64;
/// GM workspace per cube core: two slots (tiles in flight) of S (f32), P (16-bit), O (f32).
pub const PREFILL_WORKSPACE: usize = 2 * (PREFILL_ROWS * PREFILL_KEYS * (4 + 2) + PREFILL_ROWS * PREFILL_MAX_D * 4);
/// Query rows of one f32 (vector) prefill item, at least one token (`VEC_ROWS` in prefill_vector.cpp).
pub const PREFILL_F32_ROWS: usize = 16;
/// Largest row stride the Nd2Nz copies take (16-bit fields).
const ND2NZ_MAX_STRIDE: usize = u16::MAX as usize;

pub(crate) fn prefill<'v>(
    mut l: impl Launcher<'v>,
    a: &AttentionArgs<'_>,
    out: &'v mut TensorViewMut<'_>,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    let d = a.dims();
    let g = d.group();
    // f16/bf16 on the cube; f32 on the vector cores (rows in chunks, so any group size).
    let f32_path = a.q().dtype() == DType::F32;
    if !f32_path && g > PREFILL_ROWS {
        let why = format!("the Ascend prefill stacks at most {PREFILL_ROWS} query heads per kv head");
        return Err(Error::range("group", g, why));
    }
    let strides = [a.q().strides()[1], a.q().strides()[2], a.k().strides()[1], a.v().strides()[1]];
    if let Some(&s) = strides.iter().find(|&&s| !f32_path && s > ND2NZ_MAX_STRIDE) {
        return Err(Error::range(
            "token stride",
            s,
            format!("the cube's Nd2Nz copies take strides up to {ND2NZ_MAX_STRIDE} elements"),
        ));
    }
    let pl = crate::ffi::prefill_lists(a);
    let (kernel, rows) =
        if f32_path { (launch::PREFILL_F32, PREFILL_F32_ROWS) } else { (launch::PREFILL, PREFILL_ROWS) };
    let tile_tokens = (rows / g).max(1);
    let (offsets, counts, indices) = match &pl.lists {
        Some((o, c, i)) => {
            (l.array(launch::bytes_of(o))?, l.array(launch::bytes_of(c))?, l.array(launch::bytes_of(i))?)
        }
        None => (0, 0, 0),
    };
    let lse_len = d.batch * d.q_heads * d.seq_len;
    let lse_addr = if lse.is_some() { l.zeroed(4 * lse_len)? } else { 0 };
    let params = EkPrefillParams {
        q: l.input(&a.q())?,
        k: l.input(&a.k())?,
        v: l.input(&a.v())?,
        out: l.output(out)?,
        lse: lse_addr,
        offsets,
        counts,
        indices,
        workspace: if f32_path { 0 } else { l.zeroed(l.block_dim(kernel) as usize * PREFILL_WORKSPACE)? },
        segment_size: pl.segment_size as i32,
        block_size: pl.block_size as i32,
        segments: pl.segments as i32,
        group: g as i32,
        tile_tokens: tile_tokens as i32,
        tiles_per_segment: pl.segment_size.div_ceil(tile_tokens) as i32,
        scale_log2: a.scale() * std::f32::consts::LOG2_E,
        dtype: dtype_code(a.q().dtype()),
    };
    l.launch(kernel, &params)?;
    if let Some(dst) = lse {
        let mut bytes = vec![0u8; 4 * lse_len];
        l.read(lse_addr, &mut bytes)?;
        dst.copy_from_slice(&f32s(&bytes));
    }
    l.finish()
}

/// Planning: the representatives (the pass over all of Q and K) on the vector cores, exact in
/// f32; the f64 decisions on the host, shared with the CPU backend so they equal the reference's.
/// Chunked planning (SPEC §7.2): per sequence, one launch of the representatives kernel over its
/// chunk's segments (queries from the THD rows) and the blocks before them (keys through its
/// block-table row); the host finishes each plan in f64 from them, continuing the sequence's
/// states (`cpu::plan::plan_span`, the CPU backend's own arithmetic: decisions bit for bit).
pub(crate) fn plan_chunks<'v>(
    l: impl Launcher<'v>,
    a: &crate::engine::ChunkArgs<'_>,
    states: &mut [crate::plan::PlanState],
) -> Result<Vec<Plan>> {
    plan_chunks_at(l, &a.q(), a.seqs(), &a.settings(), &CacheAt::host(a.cache()), states)
}

/// [`plan_chunks`] of a validated call over a cache wherever it is; `states` advance only when
/// every sequence was planned.
pub(crate) fn plan_chunks_at<'v>(
    mut l: impl Launcher<'v>,
    q_view: &TensorView<'_>,
    seqs: &[SeqChunk<'_>],
    settings: &ChunkSettings,
    cache: &CacheAt<'_>,
    states: &mut [crate::plan::PlanState],
) -> Result<Vec<Plan>> {
    let dd = settings.head_dim;
    let Pages { layout, table: block_table, .. } = cache.pages;
    row_gap(layout.strides[2], dd, q_view.dtype())?;
    let q = l.input(q_view)?;
    let k_pool = cache.k.addr(&mut l)?;
    let table = l.array(launch::bytes_of(block_table.ids()))?;
    let width = block_table.width();
    let isa = crate::cpu::simd::Isa::detect();
    let mut next = states.to_vec();
    let mut plans = Vec::with_capacity(seqs.len());
    for (i, sc) in seqs.iter().enumerate() {
        let d = sc.dims;
        let segs = sc.segments.clone();
        let span = crate::cpu::plan::Span::of_chunk(settings, sc, q_view.dtype());
        let qrep_len = segs.len() * d.q_heads * 2 * dd;
        let krep_len = d.blocks * d.kv_heads * 2 * dd;
        let (qrep, krep) = if segs.is_empty() || d.blocks == 0 {
            // Nothing to read: no segment, or no candidate block (the representatives are unused).
            (vec![0f64; qrep_len], vec![0f64; krep_len])
        } else {
            let params = EkPlanParams {
                q,
                k: EkTensor { ptr: k_pool, ..EkTensor::default() },
                qsum: l.zeroed(4 * qrep_len)?,
                krep: l.zeroed(4 * krep_len)?,
                seg_first: segs.start as i32,
                seg_end: segs.end as i32,
                q_token0: sc.tokens.start as i32,
                q_pos0: sc.q_start as i32,
                block_table: table + (i * width * size_of::<u32>()) as u64,
                page_size: layout.page_size as i32,
                page_stride: layout.strides[0] as i64,
                slot_stride: layout.strides[1] as i64,
                head_stride: layout.strides[2] as i64,
                ..EkPlanParams::sized(&d, dd, q_view.dtype())
            };
            representatives(&mut l, &params, qrep_len, krep_len)?
        };
        let hkv = d.kv_heads;
        plans.push(crate::cpu::plan::plan_span(isa, &span, &qrep, &krep, Some(&mut next[i * hkv..(i + 1) * hkv]))?);
    }
    l.finish()?;
    states.copy_from_slice(&next);
    Ok(plans)
}

/// Runs the representatives kernel and reads its query and key representatives back, widened.
fn representatives<'v>(
    l: &mut impl Launcher<'v>,
    params: &EkPlanParams,
    qrep_len: usize,
    krep_len: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    l.launch(launch::PLAN_REPS, params)?;
    let mut read = |addr: u64, len: usize| -> Result<Vec<f64>> {
        let mut bytes = vec![0u8; 4 * len];
        l.read(addr, &mut bytes)?;
        Ok(f32s(&bytes).into_iter().map(f64::from).collect())
    };
    Ok((read(params.qsum, qrep_len)?, read(params.krep, krep_len)?))
}

pub(crate) fn plan<'v>(mut l: impl Launcher<'v>, a: &PlanArgs<'_>) -> Result<Plan> {
    let d = a.dims();
    let dd = a.head_dim();
    let qrep_len = d.batch * d.segments * d.q_heads * 2 * dd;
    let krep_len = d.batch * d.blocks * d.kv_heads * 2 * dd;
    let params = EkPlanParams {
        q: l.input(&a.q())?,
        k: l.input(&a.k())?,
        qsum: l.zeroed(4 * qrep_len)?,
        krep: l.zeroed(4 * krep_len)?,
        ..EkPlanParams::sized(&d, dd, a.q().dtype())
    };
    let (qrep, krep) = representatives(&mut l, &params, qrep_len, krep_len)?;
    l.finish()?;
    let isa = crate::cpu::simd::Isa::detect();
    crate::cpu::plan::plan_from_representatives(isa, a, &qrep, &krep)
}

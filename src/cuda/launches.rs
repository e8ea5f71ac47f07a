//! Every launch the CUDA backend makes — kernel, grid, block and dynamic shared memory — as a
//! pure function of the call's dims and the device's limits. The backend launches exactly what
//! these return (after [`Launch::check`]), and `tests/cuda_compile.rs` runs them over every
//! shape class against the compiled kernels' own attributes (`cuda/host/kernel_attrs.h`) for each
//! target architecture, so a launch the hardware would refuse is found without a GPU.
//!
//! The tile constants here are the kernels' (`cuda/*.cu`); the shared-memory formulas mirror
//! the kernels' carve-ups of their dynamic shared memory.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::numerics::LogitPrecision;
use crate::tensor::DType;
use crate::validate::{AttnDims, CompressDims, DecodeDims};

/// Rows of a query tile per warp in the tensor-core prefill.
pub const MMA_ROWS_PER_WARP: usize = 16;
/// The tensor-core prefill's tile heights (`_m64`, `_m128`); the smaller must hold a GQA group.
pub const MMA_TILE_SMALL: usize = 64;
/// The larger tile height, in rows.
pub const MMA_TILE_LARGE: usize = 128;
/// Keys per K/V tile of the tensor-core prefill.
pub const MMA_KEYS: usize = 64;
/// The SIMT prefill: query rows per CTA and its threads (4 per row).
pub const SIMT_ROWS: usize = 32;
/// Threads per SIMT prefill CTA.
pub const SIMT_THREADS: u32 = 128;
/// The SIMT prefill's key-tile heights (`ek_prefill_simt_*` and `_k16`), largest first: the
/// smaller one lets D up to 256 fit the 99 KiB of sm_86/sm_89.
pub const SIMT_KEY_TILES: [usize; 2] = [32, 16];
/// Threads per decode CTA.
pub const DECODE_THREADS: u32 = 128;
/// Dynamic shared memory the decode split kernel may use (any device's default limit).
pub const DECODE_MAX_SMEM: usize = 48 * 1024;
/// Floats of the decode's partial-output scratch: streams · DECODE_ROW_PASS · D with streams =
/// 4 warps · 32 / lanes per cache row (cuda/decode.cu) is at most 4096 for D ≤ 256.
pub const DECODE_SCRATCH: usize = 4096;
/// Fewest keys per decode split, where shared memory allows.
pub const DECODE_MIN_KEYS: usize = 64;
/// Most keys per decode split.
pub const DECODE_MAX_KEYS: usize = 512;
/// Threads per CTA of the paged attention (`cuda/attend.cu`).
pub const ATTEND_THREADS: u32 = 128;
/// Keys per shared K/V tile of the paged attention (`ATTEND_KEYS`).
pub const ATTEND_KEYS: usize = 16;
/// Most query rows per tile of the paged attention (the host's `tile_rows`).
pub const ATTEND_ROWS: usize = 16;
/// Fewest keys per split of the paged attention.
pub const ATTEND_MIN_KEYS: usize = 64;
/// The planning kernels' block: the lane sums of `numerics` need exactly this many threads.
pub const PLAN_THREADS: u32 = crate::numerics::LANES as u32;
/// Segments per work item of `ek_plan_logits` (`PLAN_SEGS` in cuda/plan.cu).
pub const PLAN_SEGS: usize = 2;
/// Block tiles of `ek_plan_logits`, largest first.
pub const PLAN_LOGIT_TILES: [usize; 4] = [64, 32, 16, 8];
/// `ek_plan_rank`'s block (`PLAN_RANK_THREADS`) and the block-wide selections'.
pub const TOPK_THREADS: u32 = 512;
/// Largest ranking the planning sorts in shared memory (`RANK_SORT_CAP` in cuda/topk.cuh);
/// wider ones are ranked by counting among the selected blocks.
pub const RANK_SORT_CAP: usize = 2048;
/// Threads per CTA of the compression's SIMT scoring.
pub const COMPRESS_THREADS: u32 = 128;
/// Cache entries per tile of the compression's SIMT scoring.
pub const COMPRESS_KEYS: usize = 32;
/// Threads per CTA of the compression's tensor-core scoring.
pub const COMPRESS_MMA_THREADS: u32 = 128;
/// Cache entries per tile of the compression's tensor-core scoring.
pub const COMPRESS_MMA_KEYS: usize = 64;
/// Cache entries per CTA of the compression's scoring.
pub const COMPRESS_CHUNK: usize = 2048;
/// Threads of the compression's pooling, AdaKV mask/merge.
pub const COMPRESS_POOL_THREADS: u32 = 256;
/// The largest grid y and z dimensions.
pub const GRID_YZ_MAX: usize = 65_535;

/// What one loaded kernel allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLimits {
    /// `CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK`: its launch bound (or what its registers allow).
    pub max_threads: u32,
    /// Dynamic shared memory a launch may ask for: the opt-in limit less its static shared memory.
    pub max_dynamic_smem: usize,
    /// Its static shared memory.
    pub static_smem: usize,
}

/// What the device and each of its loaded kernels allow: read from the driver when the backend
/// opens, or (in tests) from the compiled kernels' attributes and an architecture's limits.
#[derive(Clone, Debug)]
pub struct DeviceLimits {
    /// Multiprocessors: how many CTAs make a wave.
    pub sms: usize,
    /// Each loaded kernel's limits, by name.
    pub kernels: HashMap<String, KernelLimits>,
}

impl DeviceLimits {
    /// The limits of kernel `name` (a missing kernel allows nothing).
    pub fn kernel(&self, name: &str) -> KernelLimits {
        self.kernels.get(name).copied().unwrap_or(KernelLimits { max_threads: 0, max_dynamic_smem: 0, static_smem: 0 })
    }
    /// Whether a block of `threads` with `smem` bytes of dynamic shared memory may launch `name`.
    pub fn fits(&self, name: &str, threads: u32, smem: usize) -> bool {
        let k = self.kernel(name);
        threads <= k.max_threads && smem <= k.max_dynamic_smem
    }
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// The kernel's name.
    pub kernel: String,
    /// Grid size, in CTAs.
    pub grid: (u32, u32, u32),
    /// Threads per CTA.
    pub block: u32,
    /// Dynamic shared memory, bytes.
    pub smem: usize,
}

impl Launch {
    fn new(kernel: impl Into<String>, grid: (usize, usize, usize), block: u32, smem: usize) -> Result<Self> {
        let kernel = kernel.into();
        let dim = |what: &'static str, v: usize, max: usize| {
            if v == 0 || v > max {
                return Err(Error::range(what, v, format!("{kernel}: a CUDA grid dimension lies in 1..={max}")));
            }
            Ok(v as u32)
        };
        let grid = (
            dim("grid x", grid.0, i32::MAX as usize)?,
            dim("grid y", grid.1, GRID_YZ_MAX)?,
            dim("grid z", grid.2, GRID_YZ_MAX)?,
        );
        Ok(Launch { kernel, grid, block, smem })
    }

    /// A range error unless the device allows this launch: the check the driver would make,
    /// made before anything is enqueued.
    pub fn check(&self, limits: &DeviceLimits) -> Result<()> {
        let k = limits.kernel(&self.kernel);
        if self.block == 0 || self.block > k.max_threads {
            let why = format!("{}: the kernel launches at most {} threads per block", self.kernel, k.max_threads);
            return Err(Error::range("threads per block", self.block, why));
        }
        if self.smem > k.max_dynamic_smem {
            let why = format!(
                "{}: at most {} bytes of dynamic shared memory on this device",
                self.kernel, k.max_dynamic_smem
            );
            return Err(Error::range("dynamic shared memory", self.smem, why));
        }
        Ok(())
    }
}

pub(crate) fn dtype_suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
    }
}

/// Rows per CTA of the tensor-core prefill (`ek_prefill_mma_*_m64` / `_m128`). Both keep 16 rows
/// per warp; 128 rows read each K/V tile half as often per query row but need twice Q's shared
/// memory and make half as many CTAs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillTile {
    /// 128 rows when they fit in shared memory, fill whole segments and make at least two waves
    /// of CTAs; else 64.
    Auto,
    /// 64-row tiles.
    M64,
    /// 128-row tiles.
    M128,
}

impl std::str::FromStr for PrefillTile {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(PrefillTile::Auto),
            "64" => Ok(PrefillTile::M64),
            "128" => Ok(PrefillTile::M128),
            other => Err(Error::range(super::PREFILL_TILE_ENV, other, "expected auto, 64 or 128")),
        }
    }
}

/// Dynamic shared memory of `ek_prefill_mma_*_m<rows>`: Q, double-buffered K and V tiles (rows
/// padded by 8 halves), their tokens.
pub fn mma_prefill_smem(rows: usize, head_dim: usize) -> usize {
    (rows + 4 * MMA_KEYS) * (head_dim + 8) * 2 + 2 * MMA_KEYS * 4
}

/// Dynamic shared memory of `ek_prefill_simt_*` with `keys` per K/V tile: Q and O rows, K and V
/// tiles (rows padded by one float), the tile's tokens.
pub fn simt_prefill_smem(keys: usize, head_dim: usize) -> usize {
    (2 * SIMT_ROWS + 2 * keys) * (head_dim + 1) * 4 + keys * 4
}

/// A prefill's launch and the tiling it implies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefillLaunch {
    /// The launch.
    pub launch: Launch,
    /// Query tokens per CTA.
    pub tile_tokens: usize,
    /// Query tiles per segment.
    pub tiles_per_segment: usize,
}

/// The prefill of `d` over `segments` segments of `segment_size` tokens (one segment of the
/// whole length when dense): tensor cores for f16/bf16 with D 64/128 and rows on the 16-byte grid
/// (`aligned`), SIMT otherwise.
pub fn prefill(
    limits: &DeviceLimits,
    tile: PrefillTile,
    d: &AttnDims,
    dtype: DType,
    aligned: bool,
    segment_size: usize,
    segments: usize,
) -> Result<PrefillLaunch> {
    let g = d.group();
    let sfx = dtype_suffix(dtype);
    let mma = dtype != DType::F32 && (d.head_dim == 64 || d.head_dim == 128) && aligned && g <= MMA_TILE_SMALL;
    let (name, rows, threads, smem) = match mma.then(|| mma_tile_rows(limits, tile, d, dtype, segment_size, segments)) {
        Some(Some(m)) => (
            format!("ek_prefill_mma_{sfx}_d{}_m{m}", d.head_dim),
            m,
            (m / MMA_ROWS_PER_WARP * 32) as u32,
            mma_prefill_smem(m, d.head_dim),
        ),
        _ => {
            if g > SIMT_ROWS {
                let why = format!(
                    "the CUDA kernels stack at most {SIMT_ROWS} query heads per kv head outside the tensor-core path"
                );
                return Err(Error::range("group", g, why));
            }
            let pick = SIMT_KEY_TILES.iter().find_map(|&keys| {
                let name = simt_kernel(sfx, keys);
                let smem = simt_prefill_smem(keys, d.head_dim);
                limits.fits(&name, SIMT_THREADS, smem).then_some((name, SIMT_ROWS, SIMT_THREADS, smem))
            });
            pick.ok_or_else(|| {
                let need = simt_prefill_smem(*SIMT_KEY_TILES.last().unwrap(), d.head_dim);
                let why = format!(
                    "the SIMT prefill needs {need} bytes of shared memory at this head dim, more than the device allows"
                );
                Error::range("head dim", d.head_dim, why)
            })?
        }
    };
    let tile_tokens = (rows / g).max(1);
    let tiles_per_segment = segment_size.div_ceil(tile_tokens);
    let launch = Launch::new(name, (segments * tiles_per_segment, d.batch * d.kv_heads, 1), threads, smem)?;
    Ok(PrefillLaunch { launch, tile_tokens, tiles_per_segment })
}

fn simt_kernel(sfx: &str, keys: usize) -> String {
    if keys == SIMT_KEY_TILES[0] { format!("ek_prefill_simt_{sfx}") } else { format!("ek_prefill_simt_{sfx}_k{keys}") }
}

/// The tensor-core prefill's rows per CTA (see [`PrefillTile`]), or `None` if neither height fits.
fn mma_tile_rows(
    limits: &DeviceLimits,
    tile: PrefillTile,
    d: &AttnDims,
    dtype: DType,
    segment_size: usize,
    segments: usize,
) -> Option<usize> {
    let fits = |m: usize| {
        let name = format!("ek_prefill_mma_{}_d{}_m{m}", dtype_suffix(dtype), d.head_dim);
        limits.fits(&name, (m / MMA_ROWS_PER_WARP * 32) as u32, mma_prefill_smem(m, d.head_dim))
    };
    let large = match tile {
        PrefillTile::M64 => false,
        PrefillTile::M128 => fits(MMA_TILE_LARGE),
        PrefillTile::Auto => {
            let tokens = MMA_TILE_LARGE / d.group();
            let ctas = d.batch * d.kv_heads * segments * segment_size.div_ceil(tokens);
            fits(MMA_TILE_LARGE) && tokens <= segment_size && ctas >= 2 * limits.sms
        }
    };
    if large { Some(MMA_TILE_LARGE) } else { fits(MMA_TILE_SMALL).then_some(MMA_TILE_SMALL) }
}

/// How `ek_plan_logits` tiles its work: K-representative blocks per CTA, and the segments and
/// group heads whose Q sums pass through shared memory together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogitTiling {
    /// K-representative blocks per CTA.
    pub tile: usize,
    /// Segments whose Q sums share shared memory.
    pub segments: usize,
    /// Group heads whose Q sums share shared memory.
    pub heads: usize,
}

impl LogitTiling {
    /// Dynamic shared memory (cuda/plan.cu): the padded K representatives and a pass of Q sums
    /// in the logits' precision (`rep_bytes`: 8 for f64, 4 for f32 logits), then the pass's
    /// partial logits for the whole group (f64, 8-byte aligned).
    pub fn smem(&self, group: usize, head_dim: usize, rep_bytes: usize) -> usize {
        let (t, s) = (self.tile, self.segments);
        let reps = rep_bytes * (t * (2 * head_dim + 1) + s * self.heads * head_dim);
        reps.next_multiple_of(8) + 8 * s * t * group
    }

    /// The widest passes of `tile` blocks that fit `max_smem`: every group head at once if it
    /// can, then as many segments as keep the block's threads busy; fewer where memory is short.
    fn widest(tile: usize, group: usize, head_dim: usize, rep_bytes: usize, max_smem: usize) -> Option<Self> {
        let mut heads = group;
        loop {
            let mut segments = PLAN_SEGS * (PLAN_THREADS as usize / (tile * heads)).max(1);
            loop {
                let t = LogitTiling { tile, segments, heads };
                if t.smem(group, head_dim, rep_bytes) <= max_smem {
                    return Some(t);
                }
                if segments == 1 {
                    break;
                }
                segments = segments.div_ceil(2);
            }
            if heads == 1 {
                return None;
            }
            heads = heads.div_ceil(2);
        }
    }
}

/// Planning's launches, in order: representatives of Q and K, logits, softmax, decisions, ranking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanLaunches {
    /// Query block representatives.
    pub reps_q: Launch,
    /// Key block representatives.
    pub reps_k: Launch,
    /// Block logits.
    pub logits: Launch,
    /// Softmax over the logits.
    pub softmax: Launch,
    /// Dense-or-sparse decisions.
    pub decide: Launch,
    /// Block ranking.
    pub rank: Launch,
    /// The logits kernel's tiling.
    pub logit: LogitTiling,
}

impl PlanLaunches {
    /// The launches, in order.
    pub fn all(&self) -> [&Launch; 6] {
        [&self.reps_q, &self.reps_k, &self.logits, &self.softmax, &self.decide, &self.rank]
    }
}

/// Planning of segments `segments` (not empty) of `d` (head dim `head_dim`) in `dtype`: every
/// segment for a one-shot plan, a chunk's (SPEC §7.2) otherwise. Needs blocks.
pub fn plan(
    limits: &DeviceLimits,
    d: &crate::plan::PlanDims,
    segments: std::ops::Range<usize>,
    head_dim: usize,
    dtype: DType,
) -> Result<PlanLaunches> {
    let (n, g) = (d.blocks, d.group());
    let units = d.batch * d.kv_heads * segments.len();
    // Blocks the planned segments may select (the kernels' plan_visible_blocks).
    let visible = d.causal_limit(segments.end.max(1) - 1);
    // The logits kernel's block tile: the largest that fits in shared memory while the grid
    // still makes two waves (a larger tile re-reads the segments' Q sums fewer times).
    // The logits' dot products in the inputs' precision (numerics::LogitPrecision).
    let (logits_kernel, rep_bytes) = match LogitPrecision::of(dtype) {
        LogitPrecision::F64 => ("ek_plan_logits", size_of::<f64>()),
        LogitPrecision::F32 => ("ek_plan_logits_f32", size_of::<f32>()),
    };
    let max_smem = limits.kernel(logits_kernel).max_dynamic_smem;
    let tilings: Vec<LogitTiling> =
        PLAN_LOGIT_TILES.into_iter().filter_map(|t| LogitTiling::widest(t, g, head_dim, rep_bytes, max_smem)).collect();
    let logit = tilings
        .iter()
        .find(|t| n.div_ceil(t.tile) * d.kv_heads * d.batch >= 2 * limits.sms)
        .or(tilings.last())
        .copied()
        .ok_or_else(|| Error::range("head dim", head_dim, "the planning logits' tiles exceed shared memory"))?;
    let sfx = dtype_suffix(dtype);

    Ok(PlanLaunches {
        reps_q: Launch::new(format!("ek_plan_reps_q_{sfx}"), (segments.len(), d.batch, 1), PLAN_THREADS, 0)?,
        reps_k: Launch::new(format!("ek_plan_reps_k_{sfx}"), (visible.max(1), d.batch, 1), PLAN_THREADS, 0)?,
        logits: Launch::new(
            logits_kernel,
            (n.div_ceil(logit.tile), d.kv_heads, d.batch),
            PLAN_THREADS,
            logit.smem(g, head_dim, rep_bytes),
        )?,
        softmax: Launch::new("ek_plan_softmax", (units, 1, 1), PLAN_THREADS, 0)?,
        decide: Launch::new(
            "ek_plan_decide",
            ((d.batch * d.kv_heads).div_ceil(PLAN_THREADS as usize), 1, 1),
            PLAN_THREADS,
            0,
        )?,
        rank: Launch::new("ek_plan_rank", (units, 1, 1), TOPK_THREADS, 0)?,
        logit,
    })
}

/// The scoring kernels of one compression and their dynamic shared memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompressScoring {
    /// Score statistics.
    pub stats: Launch,
    /// Mean scores.
    pub means: Launch,
    /// Cache entries per scoring CTA.
    pub chunk: usize,
}

/// The compression's scoring of `d`: tensor cores for 16-bit caches with D 64/128 whose key rows
/// sit on the 16-byte grid (`aligned`), FMAs otherwise. Out of range when the window rows' tiles
/// do not fit in the device's shared memory.
pub fn compress_scoring(
    limits: &DeviceLimits,
    d: &CompressDims,
    dtype: DType,
    aligned: bool,
) -> Result<CompressScoring> {
    let (rows, dd, g, sfx) = (d.group() * d.window, d.head_dim, d.group(), dtype_suffix(dtype));
    let mma = dtype != DType::F32 && (dd == 64 || dd == 128) && aligned;
    // Window rows and one key tile; per row (max, sum) or (reference, 1/sum); means: the
    // probabilities of a key tile (a pass of one row per thread, or each warp's slab of 16 rows)
    // and the [keys][group] sums (per warp with tensor cores).
    let (kind, threads, tiles, per_row, means) = if mma {
        let padded = rows.div_ceil(16) * 16;
        let warps = COMPRESS_MMA_THREADS as usize / 32;
        (
            format!("mma_{sfx}_d{dd}"),
            COMPRESS_MMA_THREADS,
            (padded + COMPRESS_MMA_KEYS) * (dd + 8) * 2,
            padded * 8,
            warps * COMPRESS_MMA_KEYS * g * 4 + warps * 16 * (COMPRESS_MMA_KEYS + 8) * 4,
        )
    } else {
        let tiles = (rows + COMPRESS_KEYS) * (dd + 1) * 4;
        let means = COMPRESS_KEYS * g * 4 + COMPRESS_THREADS as usize * (COMPRESS_KEYS + 1) * 4;
        (sfx.to_string(), COMPRESS_THREADS, tiles, rows * 8, means)
    };
    let (smem_stats, smem_means) = (tiles + per_row, tiles + per_row + means);
    let (stats, means) = (format!("ek_compress_stats_{kind}"), format!("ek_compress_means_{kind}"));
    for (name, smem) in [(&stats, smem_stats), (&means, smem_means)] {
        if !limits.fits(name, threads, smem) {
            let why = format!(
                "{name}: the scoring tiles of the window rows need {smem} bytes of shared memory, the device allows {}",
                limits.kernel(name).max_dynamic_smem
            );
            return Err(Error::range("window rows per kv head", rows, why));
        }
    }
    let grid = (d.entries.div_ceil(COMPRESS_CHUNK), d.kv_heads, d.batch);
    Ok(CompressScoring {
        stats: Launch::new(stats, grid, threads, smem_stats)?,
        means: Launch::new(means, grid, threads, smem_means)?,
        chunk: COMPRESS_CHUNK,
    })
}

/// The compression's launches after scoring, for `heads` output heads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompressSelection {
    /// Pooling of the scores.
    pub pool: Launch,
    /// Each head's top-k (uniform budgets; AdaKV's floor picks).
    pub topk: Launch,
    /// AdaKV: marks the floor picks.
    pub adakv_mask: Launch,
    /// AdaKV: selects the extra entries from the shared pool.
    pub adakv_extra: Launch,
    /// AdaKV: merges the floor and extra picks.
    pub adakv_merge: Launch,
}

impl CompressSelection {
    /// The launches, in order.
    pub fn all(&self) -> [&Launch; 5] {
        [&self.pool, &self.topk, &self.adakv_mask, &self.adakv_extra, &self.adakv_merge]
    }
}

/// Pooling and selection of a compression of `d` into `heads` heads.
pub fn compress_selection(d: &CompressDims, heads: usize) -> Result<CompressSelection> {
    let scored = d.entries - d.window;
    let pool = COMPRESS_POOL_THREADS as usize;
    Ok(CompressSelection {
        pool: Launch::new("ek_compress_pool", (scored.div_ceil(pool), heads, d.batch), COMPRESS_POOL_THREADS, 0)?,
        topk: Launch::new("ek_compress_topk", (heads, d.batch, 1), TOPK_THREADS, 0)?,
        adakv_mask: Launch::new("ek_compress_adakv_mask", (heads, d.batch, 1), COMPRESS_POOL_THREADS, 0)?,
        adakv_extra: Launch::new("ek_compress_adakv_extra", (d.batch, 1, 1), TOPK_THREADS, 0)?,
        adakv_merge: Launch::new("ek_compress_adakv_merge", (heads, d.batch, 1), COMPRESS_POOL_THREADS, 0)?,
    })
}

/// The gather of `capacity` slots per head into the compressed cache.
pub fn compress_gather(d: &CompressDims, heads: usize, capacity: usize, dtype: DType) -> Result<Launch> {
    let name = format!("ek_compress_gather_{}", dtype_suffix(dtype));
    Launch::new(name, (capacity, heads, d.batch), COMPRESS_THREADS, 0)
}

/// Entries a CTA of the in-place compaction moves per pass (`COMPACT_ROWS` in `compress.cu`).
pub const COMPACT_ROWS: usize = 32;

/// The in-place compaction of `heads` heads of `sequences` sequences of a paged cache: one CTA
/// per head, its pass's K and V rows staged in shared memory; `vectors`: rows and pools on the
/// 16-byte grid (moved as 16-byte words).
pub fn compress_compact(
    sequences: usize,
    heads: usize,
    head_dim: usize,
    dtype: DType,
    vectors: bool,
) -> Result<Launch> {
    let name = if vectors {
        "ek_compress_compact_v16".to_string()
    } else {
        format!("ek_compress_compact_{}", dtype_suffix(dtype))
    };
    Launch::new(name, (heads, sequences, 1), COMPRESS_THREADS, 2 * COMPACT_ROWS * head_dim * dtype.size())
}

/// A decode's split and merge launches and its split of the keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeLaunches {
    /// The split kernel's launch.
    pub split: Launch,
    /// The merge kernel's launch.
    pub merge: Launch,
    /// Splits of the keys.
    pub splits: usize,
    /// Keys per split.
    pub keys_per_split: usize,
}

/// The split-K decode of `d` over caches whose longest head holds `max_len` entries; `vectors`:
/// rows on the 16-byte grid and D a multiple of the 16-byte vector.
pub fn decode(
    limits: &DeviceLimits,
    d: &DecodeDims,
    max_len: usize,
    dtype: DType,
    vectors: bool,
) -> Result<DecodeLaunches> {
    let rows = d.queries * d.group();
    // Shared memory: the query rows (later the streams' partial outputs, at most
    // DECODE_SCRATCH floats) and a score row of `kps` keys per query row.
    let region = (rows * d.head_dim).max(DECODE_SCRATCH);
    let kps_max = ((DECODE_MAX_SMEM / 4).saturating_sub(region) / rows.max(1)).min(DECODE_MAX_KEYS);
    if kps_max < 32 || d.head_dim > 256 {
        return Err(Error::range("decode rows", rows, "too many query rows per cache head for the CUDA decode kernel"));
    }
    // Keys per split: enough splits for two waves of CTAs over the cache heads, each split at
    // least DECODE_MIN_KEYS keys where shared memory allows (a multiple of 32).
    let max_len = max_len.max(1);
    let splits_wanted = (2 * limits.sms).div_ceil(d.batch * d.cache_heads);
    let kps = max_len.div_ceil(splits_wanted).next_multiple_of(32).max(DECODE_MIN_KEYS).min(kps_max);
    let splits = max_len.div_ceil(kps);
    let sfx = dtype_suffix(dtype);
    let per_16 = 16 / dtype.size();
    let split = format!("ek_decode_split_{sfx}_v{}", if vectors { per_16 } else { 1 });
    let smem = (region + rows * kps) * 4;
    Ok(DecodeLaunches {
        split: Launch::new(split, (splits, d.cache_heads, d.batch), DECODE_THREADS, smem)?,
        merge: Launch::new(format!("ek_decode_merge_{sfx}"), (rows, d.cache_heads, d.batch), DECODE_THREADS, 0)?,
        splits,
        keys_per_split: kps,
    })
}

/// The paged attention's split and merge launches and its split of each tile's keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttendLaunches {
    /// The split kernel's launch: grid (tiles, splits).
    pub split: Launch,
    /// The merge kernel's launch: one CTA per tile.
    pub merge: Launch,
    /// Splits of each tile's keys.
    pub splits: usize,
    /// Keys per split (a multiple of [`ATTEND_KEYS`]).
    pub keys_per_split: usize,
}

/// Dynamic shared memory of the paged attention's split kernel for `rows` rows per tile:
/// Q and O rows, the K tile (rows padded by one float against bank conflicts) and V tile,
/// scores, per-row max, sum and rescale, key positions (4-byte words).
pub fn attend_smem(rows: usize, head_dim: usize) -> usize {
    4 * (2 * rows * head_dim + ATTEND_KEYS * (2 * head_dim + 1) + rows * ATTEND_KEYS + 3 * rows + ATTEND_KEYS)
}

/// The paged attention over `tiles` tiles of `rows` rows whose longest reads `max_keys` keys:
/// enough splits for two waves of CTAs, each at least [`ATTEND_MIN_KEYS`] keys.
pub fn attend(
    limits: &DeviceLimits,
    tiles: usize,
    rows: usize,
    head_dim: usize,
    max_keys: usize,
    dtype: DType,
) -> Result<AttendLaunches> {
    let max_keys = max_keys.max(1);
    let splits_wanted = (2 * limits.sms).div_ceil(tiles.max(1)).max(1);
    let kps = max_keys
        .div_ceil(splits_wanted)
        .max(ATTEND_MIN_KEYS)
        .max(max_keys.div_ceil(GRID_YZ_MAX))
        .next_multiple_of(ATTEND_KEYS);
    let splits = max_keys.div_ceil(kps);
    let sfx = dtype_suffix(dtype);
    Ok(AttendLaunches {
        split: Launch::new(
            format!("ek_attend_split_{sfx}"),
            (tiles, splits, 1),
            ATTEND_THREADS,
            attend_smem(rows, head_dim),
        )?,
        merge: Launch::new(format!("ek_attend_merge_{sfx}"), (tiles, 1, 1), ATTEND_THREADS, 0)?,
        splits,
        keys_per_split: kps,
    })
}

/// Threads per CTA of the append kernels (`APPEND_THREADS`).
pub const APPEND_THREADS: u32 = 128;

/// The append's row copies (one CTA per new token and cache head) and its length update (one
/// per sequence).
pub fn append(tokens: usize, cache_heads: usize, sequences: usize, dtype: DType) -> Result<[Launch; 2]> {
    Ok([
        Launch::new(format!("ek_append_{}", dtype_suffix(dtype)), (tokens, cache_heads, 1), APPEND_THREADS, 0)?,
        Launch::new("ek_append_lens", (sequences, 1, 1), APPEND_THREADS, 0)?,
    ])
}

/// `ek_numerics_probe` over `n` values (or rows), or one block for a lane sum.
pub fn numerics_probe(n: usize, lane_sum: bool) -> Result<Launch> {
    let blocks = if lane_sum { 1 } else { n.div_ceil(PLAN_THREADS as usize).max(1) };
    Launch::new("ek_numerics_probe", (blocks, 1, 1), PLAN_THREADS, 0)
}

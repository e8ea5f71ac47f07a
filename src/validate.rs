//! Argument validation, done once in shared code before any backend runs (SPEC §6).
//!
//! Each operation's arguments reach a backend only as one of the `*Args` types below, which only
//! this module can build: a backend never sees an unchecked shape, stride, dtype or block list.

use crate::backend::Capabilities;
use crate::config::{DecodeConfig, EntropyConfig, check_scale};
use crate::error::{Error, Result};
use crate::plan::{BlockLists, PlanDims};
use crate::tensor::{DType, Layout, TensorView, TensorViewMut};

/// Sizes of a prefill attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    /// Batch size.
    pub batch: usize,
    /// Sequence length, in tokens.
    pub seq_len: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension, in elements.
    pub head_dim: usize,
}

impl AttnDims {
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
}

/// Validated arguments of `plan`.
#[derive(Clone, Copy, Debug)]
pub struct PlanArgs<'a> {
    q: TensorView<'a>,
    k: TensorView<'a>,
    cfg: &'a EntropyConfig,
    fusion: Option<&'a [f32]>,
    dims: PlanDims,
    head_dim: usize,
    keep_maps: bool,
    full_ranking: bool,
}

/// What a `plan` call asks for, wherever its tensors live (see [`plan_layout`]).
#[derive(Clone, Copy, Debug)]
pub struct PlanShape<'a> {
    /// The prefill configuration.
    pub cfg: &'a EntropyConfig,
    /// The previous layer's distribution, present only when fusion applies (SPEC §2.5).
    pub fusion: Option<&'a [f32]>,
    /// The plan's sizes.
    pub dims: PlanDims,
    /// Head dimension, in elements.
    pub head_dim: usize,
    /// Whether the plan keeps its maps.
    pub keep_maps: bool,
    /// Rank every unit as far as any budget can reach (`PlanDims::rank_width`), not only as far
    /// as this plan's largest keep: what a tensor-parallel shard needs to take the reduced
    /// `segment_max` counts (SPEC §7.7).
    pub full_ranking: bool,
}

impl<'a> PlanArgs<'a> {
    /// The queries.
    pub fn q(&self) -> TensorView<'a> {
        self.q
    }
    /// The keys.
    pub fn k(&self) -> TensorView<'a> {
        self.k
    }
    /// The prefill configuration.
    pub fn cfg(&self) -> &'a EntropyConfig {
        self.cfg
    }
    /// The previous layer's distribution, present only when fusion applies (SPEC §2.5).
    pub fn fusion(&self) -> Option<&'a [f32]> {
        self.fusion
    }
    /// The plan's sizes.
    pub fn dims(&self) -> PlanDims {
        self.dims
    }
    /// Head dimension, in elements.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Whether the caller wants `logits` and `scores` materialised.
    pub fn keep_maps(&self) -> bool {
        self.keep_maps
    }
    /// Whether the ranking reaches `PlanDims::rank_width` (see [`PlanShape::full_ranking`]).
    pub fn full_ranking(&self) -> bool {
        self.full_ranking
    }
    /// Sets [`PlanArgs::full_ranking`].
    pub fn with_full_ranking(mut self, on: bool) -> Self {
        self.full_ranking = on;
        self
    }
}

/// Validated arguments of dense and sparse prefill attention.
#[derive(Clone, Copy, Debug)]
pub struct AttentionArgs<'a> {
    q: TensorView<'a>,
    k: TensorView<'a>,
    v: TensorView<'a>,
    blocks: Option<&'a BlockLists>,
    scale: f32,
    dims: AttnDims,
}

impl<'a> AttentionArgs<'a> {
    /// The queries.
    pub fn q(&self) -> TensorView<'a> {
        self.q
    }
    /// The keys.
    pub fn k(&self) -> TensorView<'a> {
        self.k
    }
    /// The values.
    pub fn v(&self) -> TensorView<'a> {
        self.v
    }
    /// `None`: dense causal attention.
    pub fn blocks(&self) -> Option<&'a BlockLists> {
        self.blocks
    }
    /// The softmax scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// The call's sizes.
    pub fn dims(&self) -> AttnDims {
        self.dims
    }
}

/// Validated arguments of `kv_compress`.
#[derive(Clone, Copy, Debug)]
pub struct CompressArgs<'a> {
    k_cache: TensorView<'a>,
    v_cache: TensorView<'a>,
    obs: TensorView<'a>,
    cfg: &'a DecodeConfig,
    scale: f32,
    /// `(batch, kv heads, query heads, entries, head_dim)`.
    pub(crate) sizes: CompressDims,
}

/// Sizes of a `kv_compress` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressDims {
    /// Batch size.
    pub batch: usize,
    /// Key/value (cache) heads.
    pub kv_heads: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Cache entries per head.
    pub entries: usize,
    /// Observation window, in entries.
    pub window: usize,
    /// Head dimension, in elements.
    pub head_dim: usize,
}

impl CompressDims {
    /// Query heads per cache head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
    /// Heads of the compressed cache: `Hq` for `per_query_head`, else `Hkv`.
    pub fn out_heads(&self, cfg: &DecodeConfig) -> usize {
        if cfg.gqa_mode == crate::config::GqaMode::PerQueryHead { self.q_heads } else { self.kv_heads }
    }
    /// Whether compression happens at all (SPEC §4: skipped when `N < decode_budget`).
    pub fn compresses(&self, cfg: &DecodeConfig) -> bool {
        self.entries >= cfg.decode_budget
    }
}

impl<'a> CompressArgs<'a> {
    /// The key cache.
    pub fn k_cache(&self) -> TensorView<'a> {
        self.k_cache
    }
    /// The value cache.
    pub fn v_cache(&self) -> TensorView<'a> {
        self.v_cache
    }
    /// The observation queries.
    pub fn obs(&self) -> TensorView<'a> {
        self.obs
    }
    /// The decode configuration.
    pub fn cfg(&self) -> &'a DecodeConfig {
        self.cfg
    }
    /// The softmax scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// The call's sizes.
    pub fn dims(&self) -> CompressDims {
        self.sizes
    }
}

/// Validated arguments of `decode_attention`.
#[derive(Clone, Copy, Debug)]
pub struct DecodeArgs<'a> {
    q: TensorView<'a>,
    k_cache: TensorView<'a>,
    v_cache: TensorView<'a>,
    lengths: &'a [u32],
    scale: f32,
    dims: DecodeDims,
}

/// Sizes of a `decode_attention` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeDims {
    /// Batch size.
    pub batch: usize,
    /// New queries per sequence.
    pub queries: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Cache heads.
    pub cache_heads: usize,
    /// Cache capacity, in entries per head.
    pub capacity: usize,
    /// Head dimension, in elements.
    pub head_dim: usize,
}

impl DecodeDims {
    /// Query heads per cache head.
    pub fn group(&self) -> usize {
        self.q_heads / self.cache_heads
    }
}

impl<'a> DecodeArgs<'a> {
    /// The queries.
    pub fn q(&self) -> TensorView<'a> {
        self.q
    }
    /// The key cache.
    pub fn k_cache(&self) -> TensorView<'a> {
        self.k_cache
    }
    /// The value cache.
    pub fn v_cache(&self) -> TensorView<'a> {
        self.v_cache
    }
    /// `[B, Hc]` entries per head.
    pub fn lengths(&self) -> &'a [u32] {
        self.lengths
    }
    /// The softmax scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// The call's sizes.
    pub fn dims(&self) -> DecodeDims {
        self.dims
    }
}

fn shape_err(what: &'static str, expected: impl std::fmt::Debug, got: [usize; 4]) -> Error {
    Error::Shape { what, expected: format!("{expected:?}"), got: got.to_vec() }
}

fn nonzero(sizes: &[(&'static str, usize)]) -> Result<()> {
    match sizes.iter().find(|(_, n)| *n == 0) {
        Some((what, _)) => Err(Error::ZeroSize { what }),
        None => Ok(()),
    }
}

fn same_dtype(reference: DType, others: &[(&'static str, DType)]) -> Result<()> {
    for &(what, got) in others {
        if got != reference {
            return Err(Error::DTypeMismatch { what, expected: reference, got });
        }
    }
    Ok(())
}

fn supported(caps: &Capabilities, dtype: DType, head_dim: usize) -> Result<()> {
    if !caps.dtypes.contains(&dtype) {
        return Err(Error::UnsupportedDType { dtype, backend: caps.backend });
    }
    if !caps.supports_head_dim(head_dim) {
        return Err(Error::UnsupportedHeadDim { head_dim, backend: caps.backend, supported: caps.head_dims_text() });
    }
    Ok(())
}

/// Refuses input views whose rows overlap on a backend that cannot read them
/// ([`Capabilities::overlapping_rows`]).
fn rows_apart(caps: &Capabilities, what: &'static str, v: &dyn Layout) -> Result<()> {
    let (shape, strides) = (v.shape(), v.strides());
    let d = shape[3];
    if caps.overlapping_rows || (0..3).all(|i| shape[i] <= 1 || strides[i] >= d) {
        return Ok(());
    }
    Err(Error::Layout {
        what,
        detail: format!(
            "the {} backend reads rows of {d} elements and needs every stride of a dim longer than 1 to be at least {d} \
             (shape {shape:?}, strides {strides:?}); copy the view first",
            caps.backend
        ),
    })
}

pub(crate) fn resolve_scale(scale: Option<f32>, head_dim: usize) -> Result<f32> {
    check_scale(scale)?;
    Ok(scale.unwrap_or(1.0 / (head_dim as f32).sqrt()))
}

/// Checks q/k/v of a prefill: BSND, shared batch/length/head dim, grouped heads, one dtype.
fn prefill_inputs(caps: &Capabilities, q: &dyn Layout, k: &dyn Layout, v: Option<&dyn Layout>) -> Result<AttnDims> {
    q.check_layout("q")?;
    k.check_layout("k")?;
    let [b, l, hq, d] = q.shape();
    nonzero(&[("batch", b), ("sequence length", l), ("query heads", hq), ("head dim", d)])?;
    let [kb, kl, hkv, kd] = k.shape();
    if kb != b || kl != l || kd != d {
        return Err(shape_err("k", format!("[{b}, {l}, Hkv, {d}] (BSND, like q)"), k.shape()));
    }
    nonzero(&[("key/value heads", hkv)])?;
    if hq % hkv != 0 {
        return Err(Error::HeadGrouping { q_heads: hq, kv_heads: hkv });
    }
    let mut dtypes = vec![("k", k.dtype())];
    if let Some(v) = v {
        v.check_layout("v")?;
        if v.shape() != k.shape() {
            return Err(shape_err("v", k.shape(), v.shape()));
        }
        dtypes.push(("v", v.dtype()));
    }
    same_dtype(q.dtype(), &dtypes)?;
    supported(caps, q.dtype(), d)?;
    rows_apart(caps, "q", q)?;
    rows_apart(caps, "k", k)?;
    if let Some(v) = v {
        rows_apart(caps, "v", v)?;
    }
    Ok(AttnDims { batch: b, seq_len: l, q_heads: hq, kv_heads: hkv, head_dim: d })
}

fn plan_dims(a: &AttnDims, cfg: &EntropyConfig) -> PlanDims {
    PlanDims::new(a.batch, a.seq_len, a.q_heads, a.kv_heads, cfg.segment_size, cfg.block_size)
}

/// Validates `plan` arguments.
pub fn plan<'a>(
    caps: &Capabilities,
    q: TensorView<'a>,
    k: TensorView<'a>,
    cfg: &'a EntropyConfig,
    layer_idx: usize,
    prev_scores: Option<&'a [f32]>,
    keep_maps: bool,
) -> Result<PlanArgs<'a>> {
    let p = plan_layout(caps, &q, &k, cfg, layer_idx, prev_scores, keep_maps)?;
    Ok(PlanArgs { q, k, cfg, fusion: p.fusion, dims: p.dims, head_dim: p.head_dim, keep_maps, full_ranking: false })
}

/// The checks of [`plan`] on tensors wherever they live.
pub fn plan_layout<'a>(
    caps: &Capabilities,
    q: &dyn Layout,
    k: &dyn Layout,
    cfg: &'a EntropyConfig,
    layer_idx: usize,
    prev_scores: Option<&'a [f32]>,
    keep_maps: bool,
) -> Result<PlanShape<'a>> {
    cfg.validate()?;
    let a = prefill_inputs(caps, q, k, None)?;
    let dims = plan_dims(&a, cfg);
    if dims.segments > u32::MAX as usize / dims.blocks_per_segment().max(1) {
        return Err(Error::range("seq_len", a.seq_len, "too many blocks for 32-bit block indices"));
    }
    if prev_scores.is_some() && !cfg.layer_fusion {
        // Ignoring them would hide a configuration mistake (fusion off, the engine thinking on).
        return Err(Error::range(
            "prev_scores",
            "given",
            "the previous layer's scores are only used with layer_fusion; enable it or drop with_prev",
        ));
    }
    if let Some(prev) = prev_scores {
        let want = crate::alloc::count("the previous layer's scores", &[dims.units(), dims.blocks])?;
        if prev.len() != want {
            return Err(Error::PlanMismatch(format!(
                "previous layer's scores hold {} values; this layer's map [B={}, Hkv={}, nseg={}, N={}] needs {want}",
                prev.len(),
                dims.batch,
                dims.kv_heads,
                dims.segments,
                dims.blocks
            )));
        }
    }
    let fusion = prev_scores.filter(|_| cfg.layer_fusion && layer_idx >= 2 && dims.blocks > 0);
    Ok(PlanShape { cfg, fusion, dims, head_dim: a.head_dim, keep_maps, full_ranking: false })
}

fn check_output(out: &dyn Layout, expected: [usize; 4], dtype: DType) -> Result<()> {
    out.check_output_layout("out")?;
    if out.shape() != expected {
        return Err(shape_err("out", expected, out.shape()));
    }
    if out.dtype() != dtype {
        return Err(Error::DTypeMismatch { what: "out", expected: dtype, got: out.dtype() });
    }
    Ok(())
}

/// Validates prefill attention arguments (`blocks = None` is dense).
#[allow(clippy::too_many_arguments)]
pub fn attention<'a>(
    caps: &Capabilities,
    q: TensorView<'a>,
    k: TensorView<'a>,
    v: TensorView<'a>,
    blocks: Option<&'a BlockLists>,
    scale: Option<f32>,
    out: &TensorViewMut<'_>,
    lse: Option<&[f32]>,
) -> Result<AttentionArgs<'a>> {
    let (dims, scale) = attention_layout(caps, &q, &k, &v, blocks, scale, out, lse.map(<[f32]>::len))?;
    Ok(AttentionArgs { q, k, v, blocks, scale, dims })
}

/// The checks of [`attention`] on tensors wherever they live (`lse_len`: the LSE buffer's
/// length, if one is given): the sizes and the resolved softmax scale.
#[allow(clippy::too_many_arguments)]
pub fn attention_layout(
    caps: &Capabilities,
    q: &dyn Layout,
    k: &dyn Layout,
    v: &dyn Layout,
    blocks: Option<&BlockLists>,
    scale: Option<f32>,
    out: &dyn Layout,
    lse_len: Option<usize>,
) -> Result<(AttnDims, f32)> {
    let dims = prefill_inputs(caps, q, k, Some(v))?;
    check_output(out, q.shape(), q.dtype())?;
    if let Some(lse_len) = lse_len {
        // Bounded by q's elements (validated against its buffer), so it cannot overflow.
        let want = dims.batch * dims.q_heads * dims.seq_len;
        if lse_len != want {
            return Err(Error::Layout {
                what: "lse",
                detail: format!("needs [B, Hq, L] = {want} values, buffer has {lse_len}"),
            });
        }
    }
    // Before the block lists: a scalar check is cheap and its error is specific.
    let scale = resolve_scale(scale, dims.head_dim)?;
    if let Some(bl) = blocks {
        let d = bl.dims;
        // A config's rules (the devices take the sizes in 32 bits).
        crate::config::check_segmentation(d.segment_size, d.block_size, ["plan segment_size", "plan block_size"])?;
        let fresh = PlanDims::new(dims.batch, dims.seq_len, dims.q_heads, dims.kv_heads, d.segment_size, d.block_size);
        if d != fresh {
            return Err(Error::PlanMismatch(format!("block lists were made for {d:?}; these inputs need {fresh:?}")));
        }
        bl.validate()?;
    }
    // Last, so every malformed call gets its specific error first.
    if caps.excluded.contains(&(crate::backend::Op::Prefill, q.dtype())) {
        return Err(Error::UnsupportedOpDType { op: "prefill", dtype: q.dtype(), backend: caps.backend });
    }
    Ok((dims, scale))
}

/// Validates `kv_compress` arguments.
pub fn kv_compress<'a>(
    caps: &Capabilities,
    k_cache: TensorView<'a>,
    v_cache: TensorView<'a>,
    obs: TensorView<'a>,
    cfg: &'a DecodeConfig,
) -> Result<CompressArgs<'a>> {
    let (sizes, scale) = compress_layout(caps, &k_cache, &v_cache, &obs, cfg)?;
    Ok(CompressArgs { k_cache, v_cache, obs, cfg, scale, sizes })
}

/// The checks of [`kv_compress`] on tensors wherever they live.
pub fn compress_layout(
    caps: &Capabilities,
    k_cache: &dyn Layout,
    v_cache: &dyn Layout,
    obs: &dyn Layout,
    cfg: &DecodeConfig,
) -> Result<(CompressDims, f32)> {
    cfg.validate()?;
    k_cache.check_layout("k_cache")?;
    v_cache.check_layout("v_cache")?;
    obs.check_layout("obs")?;
    let [b, hkv, n, d] = k_cache.shape();
    nonzero(&[("batch", b), ("key/value heads", hkv), ("cache entries", n), ("head dim", d)])?;
    if v_cache.shape() != k_cache.shape() {
        return Err(shape_err("v_cache", k_cache.shape(), v_cache.shape()));
    }
    let [ob, hq, w, od] = obs.shape();
    // A prompt shorter than the window observes fewer queries; such a cache is shorter than the
    // budget too and comes back unchanged (SPEC §4), so its window may be short.
    let short_prompt = n < cfg.decode_budget && (1..cfg.window).contains(&w);
    if ob != b || od != d || (w != cfg.window && !short_prompt) {
        return Err(shape_err("obs", format!("[{b}, Hq, window={}, {d}]", cfg.window), obs.shape()));
    }
    nonzero(&[("query heads", hq)])?;
    if hq % hkv != 0 {
        return Err(Error::HeadGrouping { q_heads: hq, kv_heads: hkv });
    }
    same_dtype(k_cache.dtype(), &[("v_cache", v_cache.dtype()), ("obs", obs.dtype())])?;
    supported(caps, k_cache.dtype(), d)?;
    rows_apart(caps, "k_cache", k_cache)?;
    rows_apart(caps, "v_cache", v_cache)?;
    rows_apart(caps, "obs", obs)?;
    if n > u32::MAX as usize {
        return Err(Error::range("cache entries", n, "must fit in 32 bits"));
    }
    let scale = resolve_scale(cfg.scale, d)?;
    Ok((CompressDims { batch: b, kv_heads: hkv, q_heads: hq, entries: n, window: w, head_dim: d }, scale))
}

/// Validates `decode_attention` arguments.
pub fn decode_attention<'a>(
    caps: &Capabilities,
    q: TensorView<'a>,
    k_cache: TensorView<'a>,
    v_cache: TensorView<'a>,
    lengths: &'a [u32],
    scale: Option<f32>,
    out: &TensorViewMut<'_>,
) -> Result<DecodeArgs<'a>> {
    let (dims, scale) = decode_layout(caps, &q, &k_cache, &v_cache, lengths, scale, out)?;
    Ok(DecodeArgs { q, k_cache, v_cache, lengths, scale, dims })
}

/// The checks of [`decode_attention`] on tensors wherever they live.
pub fn decode_layout(
    caps: &Capabilities,
    q: &dyn Layout,
    k_cache: &dyn Layout,
    v_cache: &dyn Layout,
    lengths: &[u32],
    scale: Option<f32>,
    out: &dyn Layout,
) -> Result<(DecodeDims, f32)> {
    q.check_layout("q")?;
    k_cache.check_layout("k_cache")?;
    v_cache.check_layout("v_cache")?;
    let [b, nq, hq, d] = q.shape();
    nonzero(&[("batch", b), ("new queries", nq), ("query heads", hq), ("head dim", d)])?;
    let [cb, hc, cap, cd] = k_cache.shape();
    if cb != b || cd != d {
        return Err(shape_err("k_cache", format!("[{b}, Hc, capacity, {d}]"), k_cache.shape()));
    }
    nonzero(&[("cache heads", hc), ("cache capacity", cap)])?;
    if v_cache.shape() != k_cache.shape() {
        return Err(shape_err("v_cache", k_cache.shape(), v_cache.shape()));
    }
    if hq % hc != 0 {
        return Err(Error::HeadGrouping { q_heads: hq, kv_heads: hc });
    }
    same_dtype(q.dtype(), &[("k_cache", k_cache.dtype()), ("v_cache", v_cache.dtype())])?;
    supported(caps, q.dtype(), d)?;
    rows_apart(caps, "q", q)?;
    rows_apart(caps, "k_cache", k_cache)?;
    rows_apart(caps, "v_cache", v_cache)?;
    check_output(out, q.shape(), q.dtype())?;
    // B·Hc·capacity·D elements back k_cache, so B·Hc cannot overflow.
    if lengths.len() != b * hc {
        return Err(Error::Layout {
            what: "lengths",
            detail: format!("needs [B, Hc] = {} values, got {}", b * hc, lengths.len()),
        });
    }
    for (i, &len) in lengths.iter().enumerate() {
        if len == 0 || len as usize > cap {
            return Err(Error::CacheLength { batch: i / hc, head: i % hc, length: len as usize, capacity: cap });
        }
    }
    let scale = resolve_scale(scale, d)?;
    let dims = DecodeDims { batch: b, queries: nq, q_heads: hq, cache_heads: hc, capacity: cap, head_dim: d };
    Ok((dims, scale))
}

//! Validation of the engine calls (SPEC §7): ragged offsets, caches, block plans, chunk starts and
//! planning states are checked here, once, before any backend runs.

use crate::backend::{Capabilities, Op};
use crate::config::{EntropyConfig, HeadClassMode};
use crate::error::{Error, Result};
use crate::plan::{BlockLists, Plan, PlanDims, PlanState};
use crate::tensor::{Layout, TensorView};

use super::cache::{CacheDims, CacheParts, KvCache};

fn shape_err(what: &'static str, expected: impl Into<String>, got: [usize; 4]) -> Error {
    Error::Shape { what, expected: expected.into(), got: got.to_vec() }
}

/// Checks `cu_q` (SPEC §7.1): `sequences + 1` non-decreasing offsets from 0 to `tokens`.
pub fn ragged_offsets(cu_q: &[u32], sequences: usize, tokens: usize) -> Result<()> {
    if cu_q.len() != sequences + 1 {
        return Err(Error::Shape {
            what: "cu_q",
            expected: format!("{} offsets (sequences + 1)", sequences + 1),
            got: vec![cu_q.len()],
        });
    }
    if cu_q[0] != 0 {
        return Err(Error::range("cu_q", cu_q[0], "must start at 0"));
    }
    if let Some(i) = cu_q.windows(2).position(|w| w[1] < w[0]) {
        return Err(Error::range(
            "cu_q",
            cu_q[i + 1],
            format!("offsets decrease at sequence {i} ({} then {})", cu_q[i], cu_q[i + 1]),
        ));
    }
    if cu_q[sequences] as usize != tokens {
        return Err(Error::range("cu_q", cu_q[sequences], format!("must end at the {tokens} tokens of q")));
    }
    Ok(())
}

/// A THD tensor `[1, T, H, D]`: its tokens, heads and head dim.
fn thd(what: &'static str, v: &dyn Layout) -> Result<[usize; 3]> {
    v.check_layout(what)?;
    let [one, t, h, d] = v.shape();
    if one != 1 {
        return Err(shape_err(what, "[1, T, H, D] (THD; TensorView::thd)", v.shape()));
    }
    if h == 0 {
        return Err(Error::ZeroSize { what: "heads" });
    }
    if d == 0 {
        return Err(Error::ZeroSize { what: "head dim" });
    }
    Ok([t, h, d])
}

/// The checks every ragged call over a cache starts with: the backend runs `op`, `q` is THD,
/// the cache is well formed and of q's dtype and head dim, the heads group, `cu_q` covers q.
/// Returns q's `[T, Hq, D]` and the cache's sizes.
fn ragged_call(
    caps: &Capabilities,
    op: (Op, &'static str),
    q: &dyn Layout,
    cu_q: &[u32],
    cache: &CacheParts<'_>,
) -> Result<([usize; 3], CacheDims)> {
    if !caps.supports(op.0) {
        return Err(Error::Unimplemented { backend: caps.backend, op: op.1 });
    }
    let [t, hq, d] = thd("q", q)?;
    let c = cache.check(false)?;
    common_checks(caps, q.dtype(), cache.k.0, d, &c)?;
    if hq % c.heads != 0 {
        return Err(Error::HeadGrouping { q_heads: hq, kv_heads: c.heads });
    }
    ragged_offsets(cu_q, c.sequences, t)?;
    Ok(([t, hq, d], c))
}

/// Sizes of an attention call over a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttendDims {
    /// Sequences.
    pub sequences: usize,
    /// Query tokens of all sequences (T).
    pub tokens: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Cache heads.
    pub cache_heads: usize,
    /// Head dimension, in elements.
    pub head_dim: usize,
    /// Page size, in tokens.
    pub page_size: usize,
}

impl AttendDims {
    /// Query heads per cache head.
    pub fn group(&self) -> usize {
        self.q_heads / self.cache_heads
    }
}

/// Validated arguments of attention over a cache (SPEC §7.4): the host data and the call's
/// [`AttendShape`] (what work items are cut from; its methods are the arguments' through `Deref`).
///
/// The one-shot calls (`dense_prefill`, `sparse_prefill`, `decode_attention`) run as such calls
/// too (one code path for the semantics): each batch row is a sequence whose queries are row `i`
/// of a `[B, Lq, Hq, D]` `q` (and `out`, and `lse` `[B, Hq, Lq]`), its plan row `i` of one batched
/// plan, over the contiguous cache their K/V form.
#[derive(Clone, Debug)]
pub struct AttendArgs<'a> {
    q: TensorView<'a>,
    cache: KvCache<'a>,
    shape: AttendShape<'a>,
}

/// Everything about an attention call over a cache but its data: ragged offsets, cache lengths,
/// block plans, sizes, causality — validated. Device backends cut their work from it (the
/// device-resident calls validate host mirrors of offsets, lengths and tables into one).
#[derive(Clone, Debug)]
pub struct AttendShape<'a> {
    cu_q: &'a [u32],
    lens: &'a [u32],
    plans: Plans<'a>,
    scale: f32,
    dims: AttendDims,
    /// One-shot layout: queries per sequence (see [`AttendArgs`]); `None` for THD.
    batched: Option<usize>,
    /// Bottom-right causal among a sequence's queries; `false`: every held entry is visible to
    /// every query (one-shot `decode_attention`, SPEC §5).
    causal: bool,
}

impl<'a> std::ops::Deref for AttendArgs<'a> {
    type Target = AttendShape<'a>;
    fn deref(&self) -> &AttendShape<'a> {
        &self.shape
    }
}

/// The block plans of a call.
#[derive(Clone, Copy, Debug)]
enum Plans<'a> {
    /// One per sequence (or none at all: every sequence dense).
    PerSequence(&'a [Option<&'a BlockLists>]),
    /// One plan whose batch row `i` is sequence `i`'s.
    Batched(Option<&'a BlockLists>),
}

impl<'a> AttendArgs<'a> {
    /// Arguments of a one-shot call, validated by the caller: `q` `[B, Lq, Hq, D]` (sequence
    /// `i` = batch row `i`, `cu_q` = `0, Lq, 2·Lq, …`), `cache` one sequence per batch row,
    /// `blocks` batched as `q`.
    pub(crate) fn one_shot(
        q: TensorView<'a>,
        cu_q: &'a [u32],
        cache: KvCache<'a>,
        blocks: Option<&'a BlockLists>,
        scale: f32,
        causal: bool,
    ) -> Self {
        let [b, lq, hq, d] = q.shape();
        debug_assert_eq!(cu_q.len(), b + 1);
        let dims = AttendDims {
            sequences: b,
            tokens: b * lq,
            q_heads: hq,
            cache_heads: cache.layout.heads,
            head_dim: d,
            page_size: cache.layout.page_size,
        };
        let lens = cache.lens;
        let shape = AttendShape { cu_q, lens, plans: Plans::Batched(blocks), scale, dims, batched: Some(lq), causal };
        AttendArgs { q, cache, shape }
    }

    /// Queries `[1, T, Hq, D]` (one-shot calls: `[B, Lq, Hq, D]`; address rows with [`AttendShape::q_row`]).
    pub fn q(&self) -> TensorView<'a> {
        self.q
    }
    /// The cache.
    pub fn cache(&self) -> &KvCache<'a> {
        &self.cache
    }
    /// The call without its data.
    pub fn shape(&self) -> &AttendShape<'a> {
        &self.shape
    }
}

impl<'a> AttendShape<'a> {
    /// Offsets of each sequence's query tokens.
    pub fn cu_q(&self) -> &'a [u32] {
        self.cu_q
    }
    /// Sequence `i`'s block plan and its batch row in it (`None`: dense).
    pub fn blocks(&self, i: usize) -> Option<(&'a BlockLists, usize)> {
        match self.plans {
            Plans::PerSequence(p) => p.get(i).copied().flatten().map(|bl| (bl, 0)),
            Plans::Batched(p) => p.map(|bl| (bl, i)),
        }
    }
    /// The softmax scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// The call's sizes.
    pub fn dims(&self) -> AttendDims {
        self.dims
    }
    /// Query tokens of sequence `i` (indices along the call's token axis, `0..T`).
    pub fn tokens(&self, i: usize) -> std::ops::Range<usize> {
        self.cu_q[i] as usize..self.cu_q[i + 1] as usize
    }
    /// Where token `t` of the call sits in `q`, `out`: (batch row, row along dim 1).
    #[inline(always)]
    pub fn q_row(&self, t: usize) -> (usize, usize) {
        match self.batched {
            None => (0, t),
            Some(lq) => (t / lq, t % lq),
        }
    }
    /// Index in `lse` of token `t`, query head `hq`: `[T, Hq]`, or `[B, Hq, Lq]` one-shot.
    #[inline(always)]
    pub fn lse_index(&self, t: usize, hq: usize) -> usize {
        match self.batched {
            None => t * self.dims.q_heads + hq,
            Some(lq) => (t / lq * self.dims.q_heads + hq) * lq + t % lq,
        }
    }
    /// Absolute position of sequence `i`'s first query for cache head `h` (bottom-right).
    pub fn q_start(&self, i: usize, h: usize) -> usize {
        self.len(i, h).saturating_sub(self.tokens(i).len())
    }
    /// Entries held by (sequence `i`, cache head `h`).
    #[inline(always)]
    pub fn len(&self, i: usize, h: usize) -> usize {
        self.lens[i * self.dims.cache_heads + h] as usize
    }
    /// One past the last entry query `j` of (sequence `i`, cache head `h`) sees.
    #[inline(always)]
    pub fn visible_end(&self, i: usize, h: usize, j: usize) -> usize {
        if self.causal { self.q_start(i, h) + j + 1 } else { self.len(i, h) }
    }
    /// Whether queries see only the entries up to their own position (bottom-right causal).
    pub fn causal(&self) -> bool {
        self.causal
    }
    /// One-shot layout: queries per sequence (batch rows of `q`); `None` for THD.
    pub fn batched(&self) -> Option<usize> {
        self.batched
    }
}

/// Validates [`AttendArgs`]; `out` is `[1, T, Hq, D]`, `lse` `[T, Hq]`.
#[allow(clippy::too_many_arguments)]
pub fn attend<'a>(
    caps: &Capabilities,
    q: TensorView<'a>,
    cu_q: &'a [u32],
    cache: &KvCache<'a>,
    blocks: &'a [Option<&'a BlockLists>],
    scale: Option<f32>,
    out: &dyn Layout,
    lse: Option<&[f32]>,
) -> Result<AttendArgs<'a>> {
    let shape = attend_shape(caps, &q, cu_q, &cache.parts(), cache.lens, blocks, scale, out, lse.map(<[f32]>::len))?;
    Ok(AttendArgs { q, cache: cache.clone(), shape })
}

/// The checks of [`attend`] on any data (host views, or device views with host mirrors of the
/// cache's table and lengths): `lse_len` is the length of the LSE output, if any.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_shape<'a>(
    caps: &Capabilities,
    q: &dyn Layout,
    cu_q: &'a [u32],
    cache: &CacheParts<'_>,
    lens: &'a [u32],
    blocks: &'a [Option<&'a BlockLists>],
    scale: Option<f32>,
    out: &dyn Layout,
    lse_len: Option<usize>,
) -> Result<AttendShape<'a>> {
    let ([t, hq, d], c) = ragged_call(caps, (Op::Attend, "attend"), q, cu_q, cache)?;
    for i in 0..c.sequences {
        let q_len = (cu_q[i + 1] - cu_q[i]) as usize;
        for h in 0..c.heads {
            let len = lens[i * c.heads + h] as usize;
            if len < q_len {
                return Err(Error::range(
                    "cache lengths",
                    len,
                    format!("sequence {i} head {h} holds fewer entries than its {q_len} queries (append them first)"),
                ));
            }
        }
    }
    if !blocks.is_empty() && blocks.len() != c.sequences {
        return Err(Error::PlanMismatch(format!("{} block plans for {} sequences", blocks.len(), c.sequences)));
    }
    for (i, bl) in blocks.iter().enumerate() {
        if let Some(bl) = bl {
            sequence_blocks(i, bl, hq, &c, &lens[i * c.heads..(i + 1) * c.heads])?;
        }
    }
    crate::tensor::check_output_layout("out", out.shape(), out.strides(), out.elements())?;
    if out.shape() != [1, t, hq, d] {
        return Err(shape_err("out", format!("[1, {t}, {hq}, {d}] (like q)"), out.shape()));
    }
    if out.dtype() != q.dtype() {
        return Err(Error::DTypeMismatch { what: "out", expected: q.dtype(), got: out.dtype() });
    }
    if let Some(n) = lse_len
        && n != t * hq
    {
        return Err(Error::Shape { what: "lse", expected: format!("[{t}, {hq}] (tokens, query heads)"), got: vec![n] });
    }
    let scale = crate::validate::resolve_scale(scale, d)?;
    let dims = AttendDims {
        sequences: c.sequences,
        tokens: t,
        q_heads: hq,
        cache_heads: c.heads,
        head_dim: d,
        page_size: c.page_size,
    };
    Ok(AttendShape { cu_q, lens, plans: Plans::PerSequence(blocks), scale, dims, batched: None, causal: true })
}

fn common_checks(caps: &Capabilities, q: crate::DType, cache: crate::DType, d: usize, c: &CacheDims) -> Result<()> {
    if cache != q {
        return Err(Error::DTypeMismatch { what: "k cache", expected: q, got: cache });
    }
    if c.head_dim != d {
        return Err(Error::Shape { what: "cache head dim", expected: format!("{d} (like q)"), got: vec![c.head_dim] });
    }
    if !caps.dtypes.contains(&q) {
        return Err(Error::UnsupportedDType { dtype: q, backend: caps.backend });
    }
    if !caps.supports_head_dim(d) {
        return Err(Error::UnsupportedHeadDim { head_dim: d, backend: caps.backend, supported: caps.head_dims_text() });
    }
    Ok(())
}

/// A sequence's block plan fits its cache: one sequence, the cache's heads, pages of whole
/// blocks (SPEC §7.3), every query position inside the planned prompt, lists valid.
fn sequence_blocks(i: usize, bl: &BlockLists, hq: usize, c: &CacheDims, lens: &[u32]) -> Result<()> {
    let d = &bl.dims;
    if d.batch != 1 || d.kv_heads != c.heads || d.q_heads != hq {
        return Err(Error::PlanMismatch(format!(
            "sequence {i}'s block plan is for batch {}, {} query heads and {} kv heads; the call has 1, {hq} and {}",
            d.batch, d.q_heads, d.kv_heads, c.heads
        )));
    }
    crate::config::check_segmentation(d.segment_size, d.block_size, ["plan segment_size", "plan block_size"])?;
    if !c.page_size.is_multiple_of(d.block_size) {
        return Err(Error::range(
            "page_size",
            c.page_size,
            format!("sparse attention over pages needs whole blocks per page (block size {})", d.block_size),
        ));
    }
    let longest = lens.iter().copied().max().unwrap_or(0) as usize;
    if longest > d.seq_len {
        return Err(Error::PlanMismatch(format!(
            "sequence {i} holds {longest} entries but its plan covers a prompt of {} tokens",
            d.seq_len
        )));
    }
    bl.validate()
}

/// What a chunked planning call asks besides the tensors (SPEC §7.2).
#[derive(Clone, Copy, Debug, Default)]
pub struct ChunkRequest<'a> {
    /// Index of the layer; fusion applies from layer 2 on (SPEC §2.5).
    pub layer_idx: usize,
    /// The previous layer's plans of the same call (one per sequence), for layer fusion.
    pub prev: Option<&'a [Plan]>,
    /// Materialise `logits` and `scores`.
    pub keep_maps: bool,
    /// Rank as far as any budget can reach, so a tensor-parallel shard can take the reduced
    /// `segment_max` counts ([`Plan::reduce_segment_max`], SPEC §7.7).
    pub full_ranking: bool,
}

/// One sequence of a chunked planning call.
#[derive(Clone, Debug)]
pub struct SeqChunk<'a> {
    /// Its query tokens in `q`.
    pub tokens: std::ops::Range<usize>,
    /// Absolute position of its first query (`kv_len - q_len`), a multiple of S.
    pub q_start: usize,
    /// Keys held (the chunk's own included).
    pub kv_len: usize,
    /// The prefill configuration.
    pub cfg: &'a EntropyConfig,
    /// The whole prompt's plan sizes (batch 1).
    pub dims: PlanDims,
    /// Segments this chunk plans.
    pub segments: std::ops::Range<usize>,
    /// The previous layer's distribution rows, when fusion applies.
    pub fusion: Option<&'a [f32]>,
}

/// Validated arguments of chunked planning.
#[derive(Clone, Debug)]
pub struct ChunkArgs<'a> {
    q: TensorView<'a>,
    cache: KvCache<'a>,
    seqs: Vec<SeqChunk<'a>>,
    head_dim: usize,
    keep_maps: bool,
    full_ranking: bool,
}

impl<'a> ChunkArgs<'a> {
    /// The queries.
    pub fn q(&self) -> TensorView<'a> {
        self.q
    }
    /// The cache.
    pub fn cache(&self) -> &KvCache<'a> {
        &self.cache
    }
    /// The sequences' chunks.
    pub fn seqs(&self) -> &[SeqChunk<'a>] {
        &self.seqs
    }
    /// Head dimension, in elements.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Whether the plan keeps its maps.
    pub fn keep_maps(&self) -> bool {
        self.keep_maps
    }
    /// Whether every unit is ranked as far as any budget can reach.
    pub fn full_ranking(&self) -> bool {
        self.full_ranking
    }
    /// What every sequence's planning shares.
    pub(crate) fn settings(&self) -> ChunkSettings {
        ChunkSettings { head_dim: self.head_dim, keep_maps: self.keep_maps, full_ranking: self.full_ranking }
    }
}

/// What every sequence of a chunked planning call shares (host and device-resident calls alike).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChunkSettings {
    pub head_dim: usize,
    pub keep_maps: bool,
    pub full_ranking: bool,
}

impl ChunkSettings {
    /// The settings of a request whose head dim was validated (the device-resident calls).
    #[cfg(any(feature = "_cuda", feature = "ascend"))]
    pub(crate) fn of(head_dim: usize, req: &ChunkRequest<'_>) -> Self {
        ChunkSettings { head_dim, keep_maps: req.keep_maps, full_ranking: req.full_ranking }
    }
}

/// Validates chunked planning: queries `[1, T, Hq, D]` with `cu_q`, a cache holding every key up
/// to each chunk's end (uniform head lengths: an uncompressed prompt), prompt lengths, one config
/// or one per sequence, and the `[sequences, Hkv]` states the previous chunks left.
#[allow(clippy::too_many_arguments)]
pub fn plan_chunks<'a>(
    caps: &Capabilities,
    q: TensorView<'a>,
    cu_q: &'a [u32],
    cache: &KvCache<'a>,
    prompt_lens: &[u32],
    cfgs: &'a [EntropyConfig],
    states: &[PlanState],
    req: &ChunkRequest<'a>,
) -> Result<ChunkArgs<'a>> {
    let (seqs, head_dim) = chunk_shape(caps, &q, cu_q, &cache.parts(), prompt_lens, cfgs, states, req)?;
    Ok(ChunkArgs { q, cache: cache.clone(), seqs, head_dim, keep_maps: req.keep_maps, full_ranking: req.full_ranking })
}

/// [`plan_chunks`]'s checks on the layouts and host mirrors alone (device caches): each
/// sequence's chunk and the head dim.
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_shape<'a>(
    caps: &Capabilities,
    q: &dyn Layout,
    cu_q: &[u32],
    cache: &CacheParts<'_>,
    prompt_lens: &[u32],
    cfgs: &'a [EntropyConfig],
    states: &[PlanState],
    req: &ChunkRequest<'a>,
) -> Result<(Vec<SeqChunk<'a>>, usize)> {
    let ([_, hq, d], c) = ragged_call(caps, (Op::PlanChunks, "plan_chunks"), q, cu_q, cache)?;
    let hkv = c.heads;
    let n = c.sequences;
    if prompt_lens.len() != n {
        return Err(Error::Shape {
            what: "prompt lengths",
            expected: format!("{n} (one per sequence)"),
            got: vec![prompt_lens.len()],
        });
    }
    if cfgs.len() != 1 && cfgs.len() != n {
        return Err(Error::Shape {
            what: "configs",
            expected: format!("1 or {n} (one per sequence)"),
            got: vec![cfgs.len()],
        });
    }
    if states.len() != n * hkv {
        return Err(Error::Shape {
            what: "plan states",
            expected: format!("[{n} sequences, {hkv} kv heads]"),
            got: vec![states.len()],
        });
    }
    if let Some(prev) = req.prev
        && prev.len() != n
    {
        return Err(Error::PlanMismatch(format!("{} previous-layer plans for {n} sequences", prev.len())));
    }
    let mut seqs = Vec::with_capacity(n);
    for i in 0..n {
        let cfg = &cfgs[if cfgs.len() == 1 { 0 } else { i }];
        cfg.validate()?;
        let tokens = cu_q[i] as usize..cu_q[i + 1] as usize;
        let lens = &cache.lens[i * hkv..(i + 1) * hkv];
        let kv_len = lens[0] as usize;
        if let Some(h) = lens.iter().position(|&l| l as usize != kv_len) {
            return Err(Error::range(
                "cache lengths",
                lens[h],
                format!(
                    "sequence {i}: planning needs every head to hold the prompt's {kv_len} keys (head {h} differs)"
                ),
            ));
        }
        let l = prompt_lens[i] as usize;
        if l == 0 {
            return Err(Error::ZeroSize { what: "prompt length" });
        }
        let q_len = tokens.len();
        if kv_len < q_len {
            return Err(Error::range(
                "cache lengths",
                kv_len,
                format!("sequence {i} holds fewer keys than its {q_len} queries"),
            ));
        }
        if kv_len > l {
            return Err(Error::range("prompt lengths", l, format!("sequence {i}'s cache already holds {kv_len} keys")));
        }
        let q_start = kv_len - q_len;
        let s = cfg.segment_size;
        let dims = PlanDims::new(1, l, hq, hkv, s, cfg.block_size);
        if dims.segments > u32::MAX as usize / dims.blocks_per_segment().max(1) {
            return Err(Error::range("prompt lengths", l, "too many blocks for 32-bit block indices"));
        }
        if q_len > 0 && !q_start.is_multiple_of(s) {
            return Err(Error::range(
                "chunk start",
                q_start,
                format!("sequence {i}: a planned chunk must start on the segment grid (a multiple of S = {s})"),
            ));
        }
        if q_len > 0 && kv_len != l && !kv_len.is_multiple_of(s) {
            return Err(Error::range(
                "chunk end",
                kv_len,
                format!(
                    "sequence {i}: a planned chunk must end on the segment grid (S = {s}) or at the prompt's end ({l})"
                ),
            ));
        }
        let one_shot = q_start == 0 && kv_len == l;
        if cfg.head_class == HeadClassMode::Prompt && q_len > 0 && !one_shot {
            return Err(Error::range(
                "head_class",
                "prompt",
                format!(
                    "sequence {i} is prefilled in chunks; chunked planning needs head_class = streaming (SPEC §7.2)"
                ),
            ));
        }
        let segments = q_start / s..if q_len == 0 { q_start / s } else { kv_len.div_ceil(s) };
        for h in 0..hkv {
            let st = &states[i * hkv + h];
            if q_len > 0 && st.next_segment as usize != segments.start {
                return Err(Error::PlanMismatch(format!(
                    "sequence {i} kv head {h}: its plan state expects segment {}, the chunk starts at segment {}",
                    st.next_segment, segments.start
                )));
            }
        }
        let fusion = match req.prev {
            Some(prev) if cfg.layer_fusion && req.layer_idx >= 2 && dims.blocks > 0 => {
                let p = &prev[i];
                if p.dims != dims || p.scores.len() != dims.units() * dims.blocks {
                    return Err(Error::PlanMismatch(format!(
                        "sequence {i}: the previous layer's plan has dims {:?} and {} scores; this chunk needs {dims:?} with its scores",
                        p.dims,
                        p.scores.len()
                    )));
                }
                Some(p.scores.as_slice())
            }
            _ => None,
        };
        seqs.push(SeqChunk { tokens, q_start, kv_len, cfg, dims, segments, fusion });
    }
    Ok((seqs, d))
}

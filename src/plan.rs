//! The plan of one layer's prefill (SPEC §2) and the block lists sparse attention reads (SPEC §3).
//!
//! Backends compute the numbers (logits, distribution, entropy, ranking); the decisions that
//! follow from them — budgets, keep counts, which segments are sparse — are the shared rules in
//! [`rules`], so every fast backend decides alike. The f64 oracle in `reference` re-derives all of
//! it on its own, so that it can catch a mistake here.

use serde::{Deserialize, Serialize};

use crate::config::{BudgetMode, BudgetPolicy, EntropyConfig, HeadClassMode};
use crate::error::{Error, Result};

/// Sizes of one layer's prefill and its plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanDims {
    /// Batch size.
    pub batch: usize,
    /// Sequence length, in tokens.
    pub seq_len: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Segment size, in tokens.
    pub segment_size: usize,
    /// Block size, in tokens.
    pub block_size: usize,
    /// `nseg = ceil(L / S)`.
    pub segments: usize,
    /// `N = (nseg - 1)·S / Bk` blocks: the keys before the last segment.
    pub blocks: usize,
}

impl PlanDims {
    /// Sizes for `seq_len` tokens. The caller has validated that sizes are positive and `S % Bk == 0`.
    pub fn new(
        batch: usize,
        seq_len: usize,
        q_heads: usize,
        kv_heads: usize,
        segment_size: usize,
        block_size: usize,
    ) -> Self {
        let segments = seq_len.div_ceil(segment_size);
        let blocks = if segments < 2 { 0 } else { (segments - 1) * segment_size / block_size };
        PlanDims { batch, seq_len, q_heads, kv_heads, segment_size, block_size, segments, blocks }
    }

    /// Blocks per segment (`nrep = S / Bk`).
    pub fn blocks_per_segment(&self) -> usize {
        self.segment_size / self.block_size
    }

    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// Tokens of segment `s`.
    pub fn segment_range(&self, s: usize) -> std::ops::Range<usize> {
        s * self.segment_size..((s + 1) * self.segment_size).min(self.seq_len)
    }

    /// Segment `s` may select blocks `j < causal_limit(s)` (SPEC §2.3).
    pub fn causal_limit(&self, s: usize) -> usize {
        (s * self.blocks_per_segment()).min(self.blocks)
    }

    /// The reference's cap on kept blocks: `N - ((L mod S) div Bk + 1)` (SPEC §2.9).
    pub fn keep_cap(&self) -> usize {
        let tail = (self.seq_len % self.segment_size) / self.block_size + 1;
        self.blocks.saturating_sub(tail)
    }

    /// How far each unit's ranking must reach: the largest keep any budget allows,
    /// `min(3·base / Bk, keep_cap)` (0 without blocks).
    pub fn rank_width(&self, base_budget: usize) -> usize {
        if self.blocks == 0 { 0 } else { (3 * base_budget / self.block_size).min(self.keep_cap()) }
    }

    /// Number of (b, kv head, segment) triples.
    pub fn units(&self) -> usize {
        self.batch * self.kv_heads * self.segments
    }

    /// Flat index of (b, h, s) in `[B, Hkv, nseg]` arrays.
    #[inline]
    pub fn unit(&self, b: usize, h: usize, s: usize) -> usize {
        (b * self.kv_heads + h) * self.segments + s
    }
}

/// What `streaming` planning carries from one chunk of a prompt to the next, per (sequence,
/// layer, kv head) (SPEC §7.2): whether the head has been rigid at every segment so far, its
/// last budget and floored entropy, and the segment it expects next. A fresh state precedes
/// segment 0.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanState {
    /// Entropy below `e_t` at every segment `1..next_segment` (vacuously true before segment 1).
    pub rigid: bool,
    /// Budget of segment `next_segment - 1`, in tokens.
    pub budget: f32,
    /// `max(H, entropy_floor)` of segment `next_segment - 1`.
    pub floored_entropy: f32,
    /// The first segment not yet planned.
    pub next_segment: u32,
}

impl Default for PlanState {
    fn default() -> Self {
        Self::new()
    }
}

impl PlanState {
    /// The state before a prompt's first segment.
    pub const fn new() -> Self {
        PlanState { rigid: true, budget: 0.0, floored_entropy: 0.0, next_segment: 0 }
    }

    /// Whether the head counts as rigid at segment `s` with entropy `h` under the `streaming`
    /// rule: rigid so far and below `e_t` here.
    pub fn rigid_at(&self, s: usize, h: f32, cfg: &EntropyConfig) -> bool {
        s == 0 || (self.rigid && h < cfg.e_t)
    }

    /// The head's class after the segments seen so far.
    pub fn class(&self) -> HeadClass {
        if self.rigid { HeadClass::Rigid } else { HeadClass::Dynamic }
    }
}

/// Head class of a kv head for one layer (SPEC §2.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadClass {
    /// Entropy below `e_t` in every segment: a fixed `base` budget.
    Rigid,
    /// Entropy-driven budget.
    Dynamic,
}

/// What attention does for one (b, kv head, segment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentAttention<'a> {
    /// Causal attention over every earlier key.
    Dense,
    /// The keys of these blocks (ascending, all before the segment) plus the segment's own keys, causally.
    Sparse(&'a [u32]),
}

/// Per-(b, kv head, segment) key selections: what sparse attention reads. CSR-like: the blocks of
/// unit `u = (b·Hkv + h)·nseg + s` are `indices[indptr[u]..indptr[u+1]]`, ascending; a unit flagged
/// dense ignores its (empty) list and attends causally to everything before it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockLists {
    /// The plan's sizes.
    pub dims: PlanDims,
    /// Per unit: whether it is dense.
    pub dense: Vec<bool>,
    /// Offsets into `indices`, per unit.
    pub indptr: Vec<u32>,
    /// Kept block indices.
    pub indices: Vec<u32>,
}

impl BlockLists {
    /// Every segment dense: plain causal attention.
    pub fn all_dense(dims: PlanDims) -> Self {
        BlockLists { dims, dense: vec![true; dims.units()], indptr: vec![0; dims.units() + 1], indices: Vec::new() }
    }

    /// Assembles lists from per-unit selections (`None` = dense). Lists are sorted here.
    pub fn from_units(dims: PlanDims, units: impl IntoIterator<Item = Option<Vec<u32>>>) -> Self {
        let mut out = BlockLists { dims, dense: Vec::new(), indptr: vec![0], indices: Vec::new() };
        for unit in units {
            match unit {
                None => out.dense.push(true),
                Some(mut blocks) => {
                    blocks.sort_unstable();
                    out.dense.push(false);
                    out.indices.extend_from_slice(&blocks);
                }
            }
            out.indptr.push(out.indices.len() as u32);
        }
        out
    }

    /// The lists of kv heads `heads` only, for running a layer a few heads at a time.
    pub fn select_heads(&self, heads: std::ops::Range<usize>) -> BlockLists {
        let d = PlanDims { kv_heads: heads.len(), q_heads: heads.len() * self.dims.group(), ..self.dims };
        let units = (0..d.batch).flat_map(|b| heads.clone().flat_map(move |h| (0..d.segments).map(move |s| (b, h, s))));
        BlockLists::from_units(
            d,
            units.map(|(b, h, s)| match self.segment(b, h, s) {
                SegmentAttention::Dense => None,
                SegmentAttention::Sparse(list) => Some(list.to_vec()),
            }),
        )
    }

    /// What unit (b, h, s) attends to.
    pub fn segment(&self, b: usize, h: usize, s: usize) -> SegmentAttention<'_> {
        let u = self.dims.unit(b, h, s);
        if self.dense[u] {
            SegmentAttention::Dense
        } else {
            SegmentAttention::Sparse(&self.indices[self.indptr[u] as usize..self.indptr[u + 1] as usize])
        }
    }

    /// Checks the lists against their dims: sizes, monotone `indptr`, strictly ascending blocks
    /// that all end before their segment starts (SPEC §6: never past the causal limit).
    pub fn validate(&self) -> Result<()> {
        let d = &self.dims;
        let units = d.units();
        if self.dense.len() != units || self.indptr.len() != units + 1 {
            return Err(Error::PlanMismatch(format!(
                "block lists hold {} units and {} offsets; dims need {} and {}",
                self.dense.len(),
                self.indptr.len(),
                units,
                units + 1
            )));
        }
        if self.indptr[0] != 0 || self.indptr[units] as usize != self.indices.len() {
            return Err(Error::PlanMismatch(format!(
                "indptr must start at 0 and end at indices.len() = {}",
                self.indices.len()
            )));
        }
        // Every offset in order before any list is sliced: then each lies in 0..=indices.len().
        for u in 0..units {
            let (lo, hi) = (self.indptr[u] as usize, self.indptr[u + 1] as usize);
            if hi < lo {
                let (bh, s) = (u / d.segments, u % d.segments);
                return Err(Error::BlockList {
                    batch: bh / d.kv_heads,
                    head: bh % d.kv_heads,
                    segment: s,
                    detail: format!("indptr decreases ({lo} then {hi})"),
                });
            }
        }
        for b in 0..d.batch {
            for h in 0..d.kv_heads {
                for s in 0..d.segments {
                    let u = d.unit(b, h, s);
                    let (lo, hi) = (self.indptr[u] as usize, self.indptr[u + 1] as usize);
                    let err = |detail: String| Error::BlockList { batch: b, head: h, segment: s, detail };
                    if self.dense[u] && hi > lo {
                        return Err(err("a dense unit must have an empty list".into()));
                    }
                    let limit = s * d.blocks_per_segment();
                    let mut prev: Option<u32> = None;
                    for &j in &self.indices[lo..hi] {
                        if j as usize >= limit {
                            return Err(err(format!(
                                "block {j} is past the causal limit {limit} (it does not end before the segment)"
                            )));
                        }
                        if prev.is_some_and(|p| j <= p) {
                            return Err(err(format!("blocks must be strictly ascending ({} then {j})", prev.unwrap())));
                        }
                        prev = Some(j);
                    }
                }
            }
        }
        Ok(())
    }

    /// Fraction of the causal (query, key) pairs that attention computes (1.0 = dense).
    pub fn kept_fraction(&self) -> f64 {
        let (kept, causal) = self.kept_pairs(0..self.dims.segments);
        if causal == 0.0 { 1.0 } else { kept / causal }
    }

    /// The (query, key) pairs attention computes over query segments `segments`, and the causal
    /// pairs there: a chunk's share of the prompt ([`Plan::planned`]) sums over chunks.
    pub fn kept_pairs(&self, segments: std::ops::Range<usize>) -> (f64, f64) {
        let d = &self.dims;
        let (mut kept, mut causal) = (0f64, 0f64);
        for b in 0..d.batch {
            for h in 0..d.kv_heads {
                for s in segments.clone() {
                    let r = d.segment_range(s);
                    let n = r.len() as f64;
                    // Causal pairs inside the segment plus pairs with every earlier key.
                    let own = n * (n + 1.0) / 2.0;
                    let before = n * r.start as f64;
                    causal += own + before;
                    kept += own
                        + match self.segment(b, h, s) {
                            SegmentAttention::Dense => before,
                            SegmentAttention::Sparse(list) => n * (list.len() * d.block_size) as f64,
                        };
                }
            }
        }
        (kept, causal)
    }

    /// Number of sparse units.
    pub fn sparse_units(&self) -> usize {
        self.dense.iter().filter(|d| !**d).count()
    }
}

/// A layer's plan: every intermediate of SPEC §2 and the resulting block lists.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The plan's sizes.
    pub dims: PlanDims,
    /// `[B, Hkv, nseg, N]`, masked entries `-inf` (SPEC §2.2). Empty when maps were not requested.
    pub logits: Vec<f32>,
    /// `[B, Hkv, nseg, N]` block distribution after fusion (SPEC §2.4–2.5): what the next layer's
    /// fusion reads. Empty when maps were not requested and fusion is off.
    pub scores: Vec<f32>,
    /// `[B, Hkv, nseg]` entropy in nats (SPEC §2.6).
    pub entropy: Vec<f32>,
    /// `[B, Hkv]` (SPEC §2.7).
    pub head_class: Vec<HeadClass>,
    /// `[B, Hkv, nseg]` budgets in tokens (SPEC §2.8).
    pub budgets: Vec<f32>,
    /// `[B, Hkv, nseg]` blocks to keep per head (SPEC §2.9).
    pub keep_blocks: Vec<u32>,
    /// `[nseg]` the largest keep of each segment: the `segment_max` count.
    pub segment_topk: Vec<u32>,
    /// `[B, Hkv, nseg, order_width]` blocks by rank (SPEC §2.10); rows with fewer candidates than
    /// the width continue with the masked blocks in ascending order.
    pub order: Vec<u32>,
    /// `max(segment_topk)`: every head's selection is a prefix of its row.
    pub order_width: usize,
    /// The configured budget mode's block lists.
    pub blocks: BlockLists,
    /// The segments this plan decided: all of them for a one-shot plan, a chunk's for chunked
    /// planning (SPEC §7.2; the per-segment arrays are zero and the units dense elsewhere).
    #[serde(default)]
    pub planned: std::ops::Range<usize>,
}

impl Plan {
    /// The plan of a layer with no blocks (one segment: L ≤ S), which depends on the sizes alone:
    /// every distribution is empty (entropy 0), so the decisions follow from the rules; every
    /// unit is dense. Backends use it where reading Q and K would change nothing.
    pub fn without_blocks(dims: PlanDims, cfg: &EntropyConfig) -> Plan {
        debug_assert_eq!(dims.blocks, 0);
        let entropy = vec![0.0f32; dims.units()];
        let (head_class, budgets, keep_blocks, segment_topk) = rules::decide(&dims, cfg, &entropy);
        let order_width = rules::order_width(&segment_topk);
        let mut plan = Plan {
            dims,
            logits: Vec::new(),
            scores: Vec::new(),
            entropy,
            head_class,
            budgets,
            keep_blocks,
            segment_topk,
            order: vec![0; dims.units() * order_width],
            order_width,
            blocks: BlockLists::all_dense(dims),
            planned: 0..dims.segments,
        };
        plan.blocks = plan.block_lists(cfg.budget_mode, cfg.threshold_len);
        plan
    }

    /// Block lists for `mode` with the dense threshold `threshold_len` (SPEC §3), derived from the
    /// ranking — so one plan serves both budget modes.
    pub fn block_lists(&self, mode: BudgetMode, threshold_len: usize) -> BlockLists {
        let d = self.dims;
        let w = self.order_width;
        let units =
            (0..d.batch).flat_map(move |b| (0..d.kv_heads).flat_map(move |h| (0..d.segments).map(move |s| (b, h, s))));
        BlockLists::from_units(
            d,
            units.map(|(b, h, s)| {
                let u = d.unit(b, h, s);
                let count = match mode {
                    BudgetMode::PerHead => self.keep_blocks[u],
                    BudgetMode::SegmentMax => self.segment_topk[s],
                } as usize;
                rules::is_sparse(&d, threshold_len, s, count).then(|| self.order[u * w..u * w + count].to_vec())
            }),
        )
    }

    /// Takes the `segment_max` counts reduced over every shard's heads (SPEC §7.7): a
    /// tensor-parallel rank plans its own kv heads (with [`crate::PlanRequest::full_ranking`]),
    /// the engine all-reduces `segment_topk` with max across ranks, and each rank rebuilds its
    /// block lists with the reduced counts — deciding exactly as an unsharded plan. The reduced
    /// count of a segment is at least this plan's and within its ranking.
    pub fn reduce_segment_max(&mut self, reduced: &[u32], threshold_len: usize) -> Result<()> {
        let d = self.dims;
        if reduced.len() != d.segments {
            return Err(Error::PlanMismatch(format!("{} reduced counts for {} segments", reduced.len(), d.segments)));
        }
        for (s, (&r, &own)) in reduced.iter().zip(&self.segment_topk).enumerate() {
            if r < own || r as usize > self.order_width {
                return Err(Error::PlanMismatch(format!(
                    "segment {s}: reduced count {r} must lie in {own}..={} (this plan's count up to its ranking's width; plan with full_ranking)",
                    self.order_width
                )));
            }
        }
        self.segment_topk = reduced.to_vec();
        self.blocks = self.block_lists(BudgetMode::SegmentMax, threshold_len);
        Ok(())
    }

    /// Blocks of unit (b, h, s) by rank.
    pub fn ranking(&self, b: usize, h: usize, s: usize) -> &[u32] {
        let u = self.dims.unit(b, h, s);
        &self.order[u * self.order_width..(u + 1) * self.order_width]
    }

    /// Number of rigid kv heads over the batch.
    pub fn rigid_heads(&self) -> usize {
        self.head_class.iter().filter(|c| **c == HeadClass::Rigid).count()
    }
}

/// The decision rules of SPEC §2.7–§3, shared by the fast backends (not by the oracle).
pub mod rules {
    use super::*;

    /// Segment `s` is sparse iff it starts at or after `T`, is not the last, and keeps blocks.
    pub fn is_sparse(d: &PlanDims, threshold_len: usize, s: usize, count: usize) -> bool {
        s * d.segment_size >= threshold_len && s + 1 < d.segments && count > 0
    }

    /// Head class from one head's entropies (segment 0 excluded).
    pub fn head_class(entropy: &[f32], e_t: f32) -> HeadClass {
        if entropy.iter().skip(1).all(|&h| h < e_t) { HeadClass::Rigid } else { HeadClass::Dynamic }
    }

    /// Budgets of one head over its segments (SPEC §2.8), in f32 in the specified order: with
    /// `prompt` head classes the head's `class` holds at every segment; with `streaming` ones
    /// (SPEC §7.2) each segment decides from the segments seen so far.
    pub fn budgets(entropy: &[f32], class: HeadClass, cfg: &EntropyConfig, out: &mut [f32]) {
        let mut state = PlanState::new();
        for (s, (&h, o)) in entropy.iter().zip(out.iter_mut()).enumerate() {
            let rigid = match cfg.head_class {
                HeadClassMode::Prompt => class == HeadClass::Rigid,
                HeadClassMode::Streaming => state.rigid_at(s, h, cfg),
            };
            state = budget_step(&state, s, h, rigid, cfg);
            *o = state.budget;
        }
    }

    /// One segment of the budget recurrence (SPEC §2.8): the state after segment `s` with
    /// entropy `h`, the head counted `rigid` there. Segment 0 always takes `base`.
    pub fn budget_step(prev: &PlanState, s: usize, h: f32, rigid: bool, cfg: &EntropyConfig) -> PlanState {
        let base = cfg.base_budget as f32;
        let floored = h.max(cfg.entropy_floor);
        let rigid = rigid || cfg.budget_policy == BudgetPolicy::Fixed;
        let budget = if s == 0 || rigid {
            base
        } else {
            let r =
                if s == 1 { cfg.delta_t } else { (floored - prev.floored_entropy) / (prev.floored_entropy + 1e-9f32) };
            // NaN entropies (from NaN inputs) must not escape the clamp.
            let r = if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0 + cfg.delta_t) };
            (prev.budget + cfg.alpha * base * (r - cfg.delta_t)).clamp(base, 3.0 * base)
        };
        PlanState {
            rigid: if s == 0 { true } else { rigid },
            budget,
            floored_entropy: floored,
            next_segment: s as u32 + 1,
        }
    }

    /// Blocks to keep for segment `s` with `budget` tokens (SPEC §2.9).
    pub fn keep_blocks(d: &PlanDims, s: usize, budget: f32) -> u32 {
        if s == 0 {
            return 0;
        }
        let by_budget = (budget / d.block_size as f32).floor() as usize;
        by_budget.min(d.causal_limit(s)).min(d.keep_cap()) as u32
    }

    /// Per-head class, budgets and keep counts, and the segment maxima, from `[B, Hkv, nseg]` entropies.
    pub fn decide(
        d: &PlanDims,
        cfg: &EntropyConfig,
        entropy: &[f32],
    ) -> (Vec<HeadClass>, Vec<f32>, Vec<u32>, Vec<u32>) {
        let n = d.segments;
        let mut classes = Vec::with_capacity(d.batch * d.kv_heads);
        let mut tokens = vec![0f32; d.units()];
        let mut keep = vec![0u32; d.units()];
        for bh in 0..d.batch * d.kv_heads {
            let e = &entropy[bh * n..(bh + 1) * n];
            // Both modes end in the same class: rigid iff below `e_t` at every segment ≥ 1.
            let class = match cfg.budget_policy {
                BudgetPolicy::Entropy => head_class(e, cfg.e_t),
                BudgetPolicy::Fixed => HeadClass::Rigid,
            };
            classes.push(class);
            budgets(e, class, cfg, &mut tokens[bh * n..(bh + 1) * n]);
            for s in 0..n {
                keep[bh * n + s] = keep_blocks(d, s, tokens[bh * n + s]);
            }
        }
        let topk = (0..n).map(|s| (0..d.batch * d.kv_heads).map(|bh| keep[bh * n + s]).max().unwrap_or(0)).collect();
        (classes, tokens, keep, topk)
    }

    /// The decisions of a chunk's segments `segments` (SPEC §7.2, `streaming` classes), continuing
    /// each head's state (`states[b·Hkv + h]`, left after the chunk's last segment). Arrays have
    /// the whole prompt's shape; segments outside the chunk keep 0.
    pub fn decide_chunk(
        d: &PlanDims,
        cfg: &EntropyConfig,
        entropy: &[f32],
        segments: &std::ops::Range<usize>,
        states: &mut [PlanState],
    ) -> (Vec<HeadClass>, Vec<f32>, Vec<u32>, Vec<u32>) {
        let n = d.segments;
        let mut tokens = vec![0f32; d.units()];
        let mut keep = vec![0u32; d.units()];
        for (bh, st) in states.iter_mut().enumerate().take(d.batch * d.kv_heads) {
            for s in segments.clone() {
                let h = entropy[bh * n + s];
                *st = budget_step(st, s, h, st.rigid_at(s, h, cfg), cfg);
                tokens[bh * n + s] = st.budget;
                keep[bh * n + s] = keep_blocks(d, s, st.budget);
            }
        }
        let classes = states.iter().map(PlanState::class).collect();
        let topk = (0..n).map(|s| (0..d.batch * d.kv_heads).map(|bh| keep[bh * n + s]).max().unwrap_or(0)).collect();
        (classes, tokens, keep, topk)
    }

    /// The state each head is left in after a one-shot plan of every segment (either class mode).
    pub fn finish_states(
        d: &PlanDims,
        cfg: &EntropyConfig,
        entropy: &[f32],
        classes: &[HeadClass],
        states: &mut [PlanState],
    ) {
        let n = d.segments;
        for (bh, out) in states.iter_mut().enumerate().take(d.batch * d.kv_heads) {
            let mut st = PlanState::new();
            for s in 0..n {
                let h = entropy[bh * n + s];
                let rigid = match cfg.head_class {
                    HeadClassMode::Prompt => classes[bh] == HeadClass::Rigid,
                    HeadClassMode::Streaming => st.rigid_at(s, h, cfg),
                };
                st = budget_step(&st, s, h, rigid, cfg);
            }
            *out = st;
        }
    }

    /// Ranks the candidate blocks of one row (keys for `j < candidates.len()`, larger first, ties to
    /// the lower index) and writes the first `out.len()` blocks, continuing with the masked blocks
    /// `candidates.len()..` in ascending order when the candidates run out. Each block is one
    /// integer, [`crate::numerics::rank_key`] above its index, so that the order is the integers'.
    pub fn rank_row(candidates: &[f64], scratch: &mut Vec<u128>, out: &mut [u32]) {
        let width = out.len();
        let n = candidates.len();
        // A plain loop over a sized buffer: it vectorises, where `extend` over the enumerated
        // keys did not (2.4× slower to build).
        scratch.clear();
        scratch.resize(n, 0);
        for (j, (key, &x)) in scratch.iter_mut().zip(candidates).enumerate() {
            *key = (u128::from(crate::numerics::rank_key(x)) << 32) | j as u128;
        }
        let take = width.min(n);
        if take > 0 && take < n {
            scratch.select_nth_unstable(take - 1);
        }
        scratch[..take].sort_unstable();
        for (o, &key) in out.iter_mut().zip(&scratch[..take]) {
            *o = key as u32; // the index: the low 32 bits
        }
        for (i, o) in out[take..].iter_mut().enumerate() {
            *o = (n + i) as u32;
        }
    }

    /// `max(segment_topk)`, the width of the ranking every backend writes.
    pub fn order_width(topk: &[u32]) -> usize {
        topk.iter().copied().max().unwrap_or(0) as usize
    }
}

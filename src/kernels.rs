//! [`Kernels`]: the front door. Every call is validated here, once, and then handed to the
//! selected backend.

use std::sync::Arc;

use crate::backend::{Backend, BackendChoice, BackendKind, Capabilities};
use crate::compress::CompressedCache;
use crate::config::{DecodeConfig, EntropyConfig};
use crate::engine::{self, ChunkRequest, KvCache, KvCacheMut, Selection, Workspace};
use crate::error::Result;
use crate::plan::{BlockLists, Plan, PlanState};
use crate::selection;
use crate::tensor::{TensorView, TensorViewMut};
use crate::validate;

/// Per-layer inputs of planning besides q and k.
#[derive(Clone, Copy, Debug)]
pub struct PlanRequest<'a> {
    /// Index of the layer in the model; fusion applies from layer 2 on (SPEC §2.5).
    pub layer_idx: usize,
    /// The previous layer's `Plan::scores`, for layer fusion.
    pub prev_scores: Option<&'a [f32]>,
    /// Materialise `logits` and `scores` (`[B, Hkv, nseg, N]` each). Turn off to save memory when
    /// only the decisions are needed; scores are still kept when fusion is on.
    pub keep_maps: bool,
    /// Rank every unit as far as any budget can reach, so that a tensor-parallel shard can take
    /// the reduced `segment_max` counts ([`Plan::reduce_segment_max`], SPEC §7.7).
    pub full_ranking: bool,
}

impl Default for PlanRequest<'_> {
    fn default() -> Self {
        PlanRequest { layer_idx: 0, prev_scores: None, keep_maps: true, full_ranking: false }
    }
}

impl<'a> PlanRequest<'a> {
    /// Layer `idx` with no fusion input.
    pub fn layer(idx: usize) -> Self {
        PlanRequest { layer_idx: idx, ..Default::default() }
    }
    /// Adds the previous layer's distribution (`plan.scores`), blended in from layer 2 on when
    /// the config has `layer_fusion`; giving it without `layer_fusion` is an error, not ignored.
    pub fn with_prev(mut self, prev_scores: &'a [f32]) -> Self {
        self.prev_scores = Some(prev_scores);
        self
    }
    /// Sets whether logits and scores are materialised.
    pub fn keep_maps(mut self, keep: bool) -> Self {
        self.keep_maps = keep;
        self
    }
    /// Sets [`PlanRequest::full_ranking`].
    pub fn full_ranking(mut self, on: bool) -> Self {
        self.full_ranking = on;
        self
    }
}

/// A handle on one backend. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct Kernels {
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").field("backend", &self.backend.describe()).finish()
    }
}

impl Kernels {
    /// The backend named by `ENTROPY_KERNELS_BACKEND`, or the best available one (CUDA, then
    /// Ascend, then CPU). A forced backend that is absent is an error, not a fallback.
    pub fn auto() -> Result<Self> {
        Self::select(selection::env_choice()?)
    }

    /// A specific backend, or `auto` (which ignores the environment).
    pub fn select(choice: BackendChoice) -> Result<Self> {
        Ok(Kernels { backend: selection::select(choice)? })
    }

    /// A specific backend.
    pub fn new(kind: BackendKind) -> Result<Self> {
        Self::select(BackendChoice::Kind(kind))
    }

    /// The fast CPU backend (always available).
    pub fn cpu() -> Self {
        Kernels { backend: Arc::new(crate::cpu::CpuBackend::new()) }
    }

    /// The f64 oracle (always available; slow).
    pub fn reference() -> Self {
        Kernels { backend: Arc::new(crate::reference::ReferenceBackend::new()) }
    }

    /// Wraps a backend built elsewhere.
    pub fn from_backend(backend: Arc<dyn Backend>) -> Self {
        Kernels { backend }
    }

    /// Which backend runs.
    pub fn kind(&self) -> BackendKind {
        self.backend.kind()
    }
    /// A description of the backend.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }
    /// What the backend supports.
    pub fn capabilities(&self) -> &Capabilities {
        self.backend.capabilities()
    }
    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// Plans one layer's prefill (SPEC §2): logits, distribution, entropy, head classes, budgets,
    /// keep counts, ranking, and the block lists of the configured budget mode.
    pub fn plan(
        &self,
        q: TensorView<'_>,
        k: TensorView<'_>,
        cfg: &EntropyConfig,
        req: &PlanRequest<'_>,
    ) -> Result<Plan> {
        let args = validate::plan(self.capabilities(), q, k, cfg, req.layer_idx, req.prev_scores, req.keep_maps)?
            .with_full_ranking(req.full_ranking);
        self.backend.plan(&args)
    }

    /// Sparse prefill attention over `blocks` (SPEC §3); dense units attend causally.
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_prefill(
        &self,
        q: TensorView<'_>,
        k: TensorView<'_>,
        v: TensorView<'_>,
        blocks: &BlockLists,
        scale: Option<f32>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        let args = validate::attention(self.capabilities(), q, k, v, Some(blocks), scale, out, lse.as_deref())?;
        self.backend.attention(&args, out, lse)
    }

    /// Dense causal attention.
    pub fn dense_prefill(
        &self,
        q: TensorView<'_>,
        k: TensorView<'_>,
        v: TensorView<'_>,
        scale: Option<f32>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        let args = validate::attention(self.capabilities(), q, k, v, None, scale, out, lse.as_deref())?;
        self.backend.attention(&args, out, lse)
    }

    /// Plans and runs one layer's prefill: what an engine calls per layer. Returns the plan (keep
    /// `plan.scores` for the next layer when fusion is on).
    #[allow(clippy::too_many_arguments)]
    pub fn prefill(
        &self,
        q: TensorView<'_>,
        k: TensorView<'_>,
        v: TensorView<'_>,
        cfg: &EntropyConfig,
        req: &PlanRequest<'_>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut [f32]>,
    ) -> Result<Plan> {
        // Validate the attention arguments before planning so nothing runs on a bad call.
        validate::attention(self.capabilities(), q, k, v, None, cfg.scale, out, lse.as_deref())?;
        let plan = self.plan(q, k, cfg, req)?;
        self.sparse_prefill(q, k, v, &plan.blocks, cfg.scale, out, lse)?;
        Ok(plan)
    }

    /// Compresses a cache with an observation window (SPEC §4). `k_cache`/`v_cache` are
    /// `[B, Hkv, N, D]`, `obs` is `[B, Hq, W, D]`.
    pub fn kv_compress(
        &self,
        k_cache: TensorView<'_>,
        v_cache: TensorView<'_>,
        obs: TensorView<'_>,
        cfg: &DecodeConfig,
    ) -> Result<CompressedCache> {
        let args = validate::kv_compress(self.capabilities(), k_cache, v_cache, obs, cfg)?;
        self.backend.kv_compress(&args)
    }

    /// Attention of new queries `q` (`[B, nq, Hq, D]`) over caches `[B, Hc, capacity, D]` whose
    /// head `(b, h)` holds `lengths[b·Hc + h]` entries; every held entry is visible.
    pub fn decode_attention(
        &self,
        q: TensorView<'_>,
        k_cache: TensorView<'_>,
        v_cache: TensorView<'_>,
        lengths: &[u32],
        scale: Option<f32>,
        out: &mut TensorViewMut<'_>,
    ) -> Result<()> {
        let args = validate::decode_attention(self.capabilities(), q, k_cache, v_cache, lengths, scale, out)?;
        self.backend.decode_attention(&args, out)
    }

    /// Attention of ragged queries over a (paged or contiguous) cache (SPEC §7.4). `q` is THD
    /// (`[1, T, Hq, D]`, [`TensorView::thd`]) with `cu_q` the prefix sums of the sequences' query
    /// counts; sequence `i`'s queries are the last `q_len` positions of each head's entries
    /// (bottom-right causal: append the chunk's K/V first). `blocks` holds a block plan per
    /// sequence for sparse prefill chunks (empty: all dense). `out` is `[1, T, Hq, D]`; `lse`
    /// `[T, Hq]` receives each row's natural-log sum-exp, so partial results merge exactly. `ws`
    /// keeps the backend's scratch between calls: after the first call of a shape, a decode step
    /// allocates nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        q: TensorView<'_>,
        cu_q: &[u32],
        cache: &KvCache<'_>,
        blocks: &[Option<&BlockLists>],
        scale: Option<f32>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut [f32]>,
        ws: &mut Workspace,
    ) -> Result<()> {
        let args = engine::args::attend(self.capabilities(), q, cu_q, cache, blocks, scale, out, lse.as_deref())?;
        self.backend.attend(&args, out, lse, ws)
    }

    /// Appends each sequence's new K/V rows (THD `[1, T, Hkv, D]`, split by `cu`) to the cache
    /// and advances its lengths (SPEC §7.4). Checked entirely before the first write.
    pub fn append(
        &self,
        k_new: TensorView<'_>,
        v_new: TensorView<'_>,
        cu: &[u32],
        cache: &mut KvCacheMut<'_>,
        ws: &mut Workspace,
    ) -> Result<()> {
        engine::append::append_with(k_new, v_new, cu, cache, ws, |k, v, cu, cache| {
            self.backend.append_rows(k, v, cu, cache)
        })
    }

    /// Plans each sequence's prefill chunk over the cache (SPEC §7.2): `q` THD with `cu_q`, the
    /// cache already holding the chunk's keys, each prompt's full length, one config or one per
    /// sequence, and the `[sequences, Hkv]` states the previous chunks left (fresh:
    /// [`PlanState::new`]), which are advanced only when the call succeeds. Returns one plan per
    /// sequence with the whole prompt's dims; pass `plan.blocks` to [`Kernels::attend`].
    #[allow(clippy::too_many_arguments)]
    pub fn plan_chunks(
        &self,
        q: TensorView<'_>,
        cu_q: &[u32],
        cache: &KvCache<'_>,
        prompt_lens: &[u32],
        cfgs: &[EntropyConfig],
        states: &mut [PlanState],
        req: &ChunkRequest<'_>,
    ) -> Result<Vec<Plan>> {
        let args = engine::args::plan_chunks(self.capabilities(), q, cu_q, cache, prompt_lens, cfgs, states, req)?;
        let mut next = states.to_vec();
        let plans = self.backend.plan_chunks(&args, &mut next)?;
        states.copy_from_slice(&next);
        Ok(plans)
    }

    /// Selection for in-place compression (SPEC §7.5, §4 steps 1–5): per sequence of the cache
    /// that `which` names (empty: all) and that holds at least `decode_budget` entries, the
    /// positions each head keeps, ascending, its last W entries included. `obs` is
    /// `[sequences, Hq, W, D]`, each sequence's own window. AdaKV shares each sequence's budget
    /// among its heads.
    pub fn kv_select(
        &self,
        cache: &KvCache<'_>,
        obs: TensorView<'_>,
        cfg: &DecodeConfig,
        which: &[bool],
    ) -> Result<Selection> {
        let args = engine::validate_select(self.capabilities(), cache, obs, cfg, which)?;
        self.backend.select(&args)
    }

    /// The pooled decode scores selection ranks (SPEC §4 steps 1–4), per (sequence, head) of the
    /// compressing sequences: for engines that shard heads across devices and reduce AdaKV's
    /// shared budget themselves ([`engine::Scores::adakv_pools`], SPEC §7.7).
    pub fn kv_scores(
        &self,
        cache: &KvCache<'_>,
        obs: TensorView<'_>,
        cfg: &DecodeConfig,
        which: &[bool],
    ) -> Result<engine::Scores> {
        let args = engine::validate_select(self.capabilities(), cache, obs, cfg, which)?;
        self.backend.kv_scores(&args)
    }

    /// Compaction in place (SPEC §7.5): each selected head's kept entries move to positions
    /// `0..keep` of its own pages and its length becomes `keep`; pages past the longest head are
    /// then free for the engine. Checked entirely before the first write.
    pub fn kv_compact(&self, cache: &mut KvCacheMut<'_>, sel: &Selection, ws: &mut Workspace) -> Result<()> {
        engine::compaction::compact_with(cache, sel, ws, |cache, sel| self.backend.compact(cache, sel))
    }
}

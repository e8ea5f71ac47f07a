//! Chunked planning on the device (SPEC §7.2): each sequence's chunk of a ragged THD batch planned
//! by `cuda/plan.cu`'s kernels, the chunk's query representatives from its rows, the prefix's key
//! representatives read through the block table, and the `streaming` states continued by the
//! decision kernel and left on the device for the host to read back. Decisions are the CPU
//! backend's bit for bit (same f64 arithmetic, same f32 budget recurrence). One launch chain per
//! sequence: sequences have their own dims and configs.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::CudaBackend;
use super::backend::addr_on;
use super::device::CudaTensor;
use super::paged::CudaKvCache;
use crate::backend::Backend;
use crate::config::EntropyConfig;
use crate::engine::args::{ChunkSettings, chunk_shape};
use crate::engine::{ChunkArgs, ChunkRequest, PageLayout, SeqChunk};
use crate::error::Result;
use crate::ffi::{EkPlanParams, EkTensor};
use crate::plan::{Plan, PlanDims, PlanState};
use crate::tensor::DType;
use crate::validate::PlanShape;

/// Which segments a device plan covers and where its queries and keys come from.
pub(crate) struct PlanSpan<'s> {
    /// The planned segments (all of them for a one-shot plan).
    pub segments: Range<usize>,
    /// Query position `t` is row `q_token0 + t - q_pos0` of the queries.
    pub q_token0: usize,
    pub q_pos0: usize,
    /// Keys in a paged pool (the `k` tensor's address is the pool's); `None`: a `[B, L, Hkv, D]` tensor.
    pub paged: Option<PagedKeys>,
    /// The states the plan continues and leaves (`None`: fresh ones, not kept).
    pub states: Option<&'s mut [PlanState]>,
}

impl PlanSpan<'static> {
    /// Every segment of `[B, L]` tensors, from fresh states.
    pub fn one_shot(d: &PlanDims) -> Self {
        PlanSpan { segments: 0..d.segments, q_token0: 0, q_pos0: 0, paged: None, states: None }
    }
}

/// One sequence's keys in a paged pool: its block-table row and the pool's layout.
#[derive(Clone, Copy)]
pub(crate) struct PagedKeys {
    table_row: u64,
    layout: PageLayout,
}

impl PagedKeys {
    /// `p` reading its keys through this table row.
    pub fn params(self, p: EkPlanParams) -> EkPlanParams {
        let s = self.layout.strides;
        EkPlanParams {
            block_table: self.table_row,
            page_size: self.layout.page_size as i32,
            page_stride: s[0] as i64,
            slot_stride: s[1] as i64,
            head_stride: s[2] as i64,
            ..p
        }
    }
}

/// Where chunked planning reads: the queries and the K pool and table in device memory.
struct ChunkSource {
    q: EkTensor,
    dtype: DType,
    k_pool: u64,
    table: u64,
    table_width: usize,
    layout: PageLayout,
}

impl CudaBackend {
    /// Plans each sequence's chunk on `stream`, continuing `states` (`[sequences, Hkv]`).
    fn plan_chunks_paged(
        &self,
        stream: &Arc<CudaStream>,
        src: &ChunkSource,
        seqs: &[SeqChunk<'_>],
        settings: &ChunkSettings,
        states: &mut [PlanState],
    ) -> Result<Vec<Plan>> {
        let mut plans = Vec::with_capacity(seqs.len());
        for (i, sc) in seqs.iter().enumerate() {
            let d = sc.dims;
            let states = &mut states[i * d.kv_heads..(i + 1) * d.kv_heads];
            let shape = PlanShape {
                cfg: sc.cfg,
                fusion: sc.fusion,
                dims: d,
                head_dim: settings.head_dim,
                keep_maps: settings.keep_maps,
                full_ranking: settings.full_ranking,
            };
            if d.blocks == 0 || sc.segments.is_empty() {
                // Nothing to compute: no candidate block, or no segment (the states stay).
                plans.push(self.host_span(&shape, sc.segments.clone(), states)?);
                continue;
            }
            let span = PlanSpan {
                segments: sc.segments.clone(),
                q_token0: sc.tokens.start,
                q_pos0: sc.q_start,
                paged: Some(PagedKeys {
                    table_row: src.table + (i * src.table_width * size_of::<u32>()) as u64,
                    layout: src.layout,
                }),
                states: Some(states),
            };
            let k = EkTensor { ptr: src.k_pool, ..EkTensor::default() };
            plans.push(self.plan_launch(stream, &shape, src.dtype, src.q, k, span)?);
        }
        Ok(plans)
    }

    /// A chunk with nothing for the device to compute, planned by the host's rules.
    fn host_span(&self, shape: &PlanShape<'_>, segments: Range<usize>, states: &mut [PlanState]) -> Result<Plan> {
        let span = crate::cpu::plan::Span {
            dims: shape.dims,
            cfg: shape.cfg,
            head_dim: shape.head_dim,
            keep_maps: shape.keep_maps,
            full_ranking: shape.full_ranking,
            fusion: shape.fusion,
            segments: segments.clone(),
            // No candidate block: no logit to take in either precision.
            precision: crate::numerics::LogitPrecision::F64,
        };
        // The representatives are never read without candidate blocks.
        let qrep = vec![0f64; segments.len() * shape.dims.q_heads * 2 * shape.head_dim];
        crate::cpu::plan::plan_span(self.host.isa(), &span, &qrep, &[], Some(states))
    }

    /// `Backend::plan_chunks`: the queries, the K pool and the table uploaded, then planned on
    /// the device.
    pub(crate) fn plan_chunks_host(&self, a: &ChunkArgs<'_>, states: &mut [PlanState]) -> Result<Vec<Plan>> {
        let cache = a.cache();
        let (_q, q) = self.tensor(&a.q())?;
        let k = self.upload(cache.k().as_bytes())?;
        let table = self.upload(cache.table().ids())?;
        let src = ChunkSource {
            q,
            dtype: a.q().dtype(),
            k_pool: addr_on(&self.stream, &k),
            table: addr_on(&self.stream, &table),
            table_width: cache.table().width(),
            layout: *cache.layout(),
        };
        self.plan_chunks_paged(&self.stream, &src, a.seqs(), &a.settings(), states)
    }

    /// Chunked planning (SPEC §7.2) over a paged cache in device memory, on `stream`: `q` THD
    /// `[1, T, Hq, D]` with `cu_q` (host), the cache already holding the chunks' keys (appended),
    /// each prompt's full length, one config or one per sequence, and the `[sequences, Hkv]`
    /// states the previous chunks left, advanced only when the call succeeds. Representatives,
    /// logits, distributions, entropies, decisions (the states continued on the device) and
    /// rankings run on the device; the plans come back to the host (block lists for
    /// [`CudaBackend::plan_attend_on`]), so this waits for the stream. The checks of the host
    /// [`crate::Kernels::plan_chunks`], on the cache's mirrors.
    #[allow(clippy::too_many_arguments)]
    pub fn plan_chunks_on(
        &self,
        stream: &Arc<CudaStream>,
        q: &CudaTensor<'_>,
        cu_q: &[u32],
        cache: &CudaKvCache<'_>,
        prompt_lens: &[u32],
        cfgs: &[EntropyConfig],
        states: &mut [PlanState],
        req: &ChunkRequest<'_>,
    ) -> Result<Vec<Plan>> {
        self.check_stream(stream)?;
        let (seqs, head_dim) =
            chunk_shape(self.capabilities(), q, cu_q, &cache.parts(), prompt_lens, cfgs, states, req)?;
        let src = ChunkSource {
            q: q.ek(),
            dtype: crate::tensor::Layout::dtype(q),
            k_pool: cache.k,
            table: cache.table,
            table_width: cache.table_host.width(),
            layout: cache.layout,
        };
        let settings = ChunkSettings::of(head_dim, req);
        let mut next = states.to_vec();
        let plans = self.plan_chunks_paged(stream, &src, &seqs, &settings, &mut next)?;
        states.copy_from_slice(&next);
        Ok(plans)
    }
}

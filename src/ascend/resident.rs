//! Paged caches resident in NPU memory (SPEC §7 on Ascend, feature `ascend`): an
//! [`AscendPagedCache`] holds the K and V pools in device memory for as long as the engine keeps
//! it, and the `_on` calls of [`AscendBackend`] read and write them where they are. Per call only
//! what the call is about travels: the new rows of an append, the queries and outputs of an
//! attention, the observation queries and pooled scores of a selection, the kept lists of a
//! compaction, plus the block table (`[sequences, width]` u32s; `npu_fused_infer_attention_score`
//! takes its `block_table` with each call too) and the `[sequences, heads]` lengths (it takes
//! per-sequence `actual_seq_lengths_kv`; ours are per head, as compaction leaves them). Nothing
//! is proportional to the pools: the host-data calls of the `Backend` trait upload the pools
//! they read, and the whole pools both ways for `append` / `kv_compact`.
//!
//! The table and the lengths are the engine's, in host memory (public fields): it allocates
//! pages by writing the table; `append_on` and `compact_on` advance the lengths. Every call runs
//! the checks of its host counterpart on them before the first launch, so edits that break them
//! are refused, not launched. The pools are written in place: when `append_on` or `compact_on`
//! fails after its checks (an AI-core exception, a stream that times out while the kernel may
//! still be writing), the pools' contents are undefined and the cache is poisoned — every later
//! call answers [`Error::Poisoned`]; rebuild it. A cache may be used and dropped on any thread
//! (the runtime makes its context current for each call).

use super::device::AscendBackend;
use super::ops::{self, CacheAt, Pages, Pool, PoolMut, Scoring};
use super::runtime::DeviceBuffer;
use crate::backend::Backend;
use crate::config::{DecodeConfig, EntropyConfig};
use crate::engine::args::{ChunkSettings, attend_shape, chunk_shape};
use crate::engine::cache::CacheParts;
use crate::engine::compaction::select_shape;
use crate::engine::{BlockTable, ChunkRequest, PageLayout, PagedCache, Scores, Selection, Workspace};
use crate::error::{Error, Result};
use crate::plan::{BlockLists, Plan, PlanState};
use crate::tensor::{DType, HostTensor, TensorView, TensorViewMut};

/// A paged KV cache whose pools live in the memory of one NPU (see the module docs).
pub struct AscendPagedCache {
    k: DeviceBuffer,
    v: DeviceBuffer,
    dtype: DType,
    /// Elements of the K and V pools (their buffers hold at least 32 bytes).
    elements: (usize, usize),
    layout: PageLayout,
    device: i32,
    /// Why the pools' contents are undefined, once a pool-writing call failed after its checks.
    poisoned: Option<String>,
    /// The block table, row-major `[sequences, width]` page ids (the engine's to write).
    pub table: Vec<u32>,
    /// Pages per sequence in the table.
    pub width: usize,
    /// `[sequences, heads]` entries held.
    pub lens: Vec<u32>,
}

impl std::fmt::Debug for AscendPagedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AscendPagedCache")
            .field("dtype", &self.dtype)
            .field("layout", &self.layout)
            .field("device", &self.device)
            .field("sequences", &(self.table.len() / self.width.max(1)))
            .finish_non_exhaustive()
    }
}

impl AscendPagedCache {
    /// Zero-filled pools of `layout` on `backend`'s NPU, the table `table` (`[sequences,
    /// width]`), every length 0.
    pub fn new(
        backend: &AscendBackend,
        dtype: DType,
        layout: PageLayout,
        table: Vec<u32>,
        width: usize,
    ) -> Result<Self> {
        let elements =
            layout.elements().ok_or_else(|| Error::range("page layout", layout.pages, "too many elements"))?;
        if width == 0 || !table.len().is_multiple_of(width) {
            return Err(Error::Shape {
                what: "block table",
                expected: format!("[sequences, width] with width {width} > 0"),
                got: vec![table.len()],
            });
        }
        let pool = || -> Result<DeviceBuffer> {
            let mut b = backend.rt.alloc(elements * dtype.size())?;
            b.zero()?;
            Ok(b)
        };
        let lens = vec![0; table.len() / width * layout.heads];
        let (k, v) = (pool()?, pool()?);
        let device = backend.rt.device;
        let elements = (elements, elements);
        let cache = AscendPagedCache { k, v, dtype, elements, layout, device, poisoned: None, table, width, lens };
        cache.check()?;
        Ok(cache)
    }

    /// A device copy of `host` (pools, table, lengths) on `backend`'s NPU.
    pub fn upload(backend: &AscendBackend, host: &PagedCache) -> Result<Self> {
        let dtype = host.k.dtype();
        if host.v.dtype() != dtype {
            return Err(Error::DTypeMismatch { what: "v cache", expected: dtype, got: host.v.dtype() });
        }
        let copy = |t: &HostTensor| -> Result<DeviceBuffer> {
            let bytes = t.data().as_bytes();
            let mut b = backend.rt.alloc(bytes.len())?;
            b.upload(bytes)?;
            Ok(b)
        };
        let cache = AscendPagedCache {
            k: copy(&host.k)?,
            v: copy(&host.v)?,
            dtype,
            elements: (host.k.len(), host.v.len()),
            poisoned: None,
            layout: host.layout,
            device: backend.rt.device,
            table: host.ids.clone(),
            width: host.width,
            lens: host.lens.clone(),
        };
        cache.check()?;
        Ok(cache)
    }

    /// The cache copied back to host memory.
    pub fn to_host(&self) -> Result<PagedCache> {
        self.usable()?;
        let download = |b: &DeviceBuffer, elements: usize| -> Result<HostTensor> {
            let mut bytes = vec![0u8; elements * self.dtype.size()];
            b.download(&mut bytes)?;
            Ok(HostTensor::from_bytes(&bytes, [1, 1, 1, elements], self.dtype))
        };
        Ok(PagedCache {
            k: download(&self.k, self.elements.0)?,
            v: download(&self.v, self.elements.1)?,
            layout: self.layout,
            ids: self.table.clone(),
            width: self.width,
            lens: self.lens.clone(),
        })
    }

    /// The element type of the pools.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Where entries sit in the pools.
    pub fn layout(&self) -> &PageLayout {
        &self.layout
    }

    /// The block table as the calls read it.
    pub fn block_table(&self) -> BlockTable<'_> {
        BlockTable::new(&self.table, self.width)
    }

    /// What the shared checks read of the cache (the host calls' checks, on its table and lengths).
    fn parts_with<'c>(&'c self, table: &'c BlockTable<'c>) -> CacheParts<'c> {
        CacheParts {
            layout: &self.layout,
            table,
            lens: &self.lens,
            k: (self.dtype, self.elements.0),
            v: (self.dtype, self.elements.1),
        }
    }

    fn usable(&self) -> Result<()> {
        match &self.poisoned {
            None => Ok(()),
            Some(why) => Err(Error::Poisoned { what: "the Ascend paged cache", detail: why.clone() }),
        }
    }

    /// The result of a call that wrote the pools in place: a failure (after the checks) poisons
    /// the cache.
    fn written<R>(&mut self, call: &str, r: Result<R>) -> Result<R> {
        if let Err(e) = &r {
            self.poisoned = Some(format!("{call} failed while writing the pools ({e})"));
        }
        r
    }

    fn check(&self) -> Result<()> {
        let table = self.block_table();
        self.parts_with(&table).check(true).map(|_| ())
    }

    fn pages<'c>(&'c self, table: &'c BlockTable<'c>) -> Pages<'c> {
        Pages { layout: &self.layout, table, lens: &self.lens, dtype: self.dtype }
    }

    fn at<'c>(&'c self, table: &'c BlockTable<'c>) -> CacheAt<'c> {
        CacheAt { pages: self.pages(table), k: Pool::Device(self.k.addr()), v: Pool::Device(self.v.addr()) }
    }
}

impl AscendBackend {
    /// The cache was made on this backend's NPU.
    fn check_resident(&self, cache: &AscendPagedCache) -> Result<()> {
        cache.usable()?;
        if cache.device != self.rt.device {
            return Err(Error::range(
                "cache device",
                cache.device,
                format!("the cache lives on NPU {} and this backend runs on NPU {}", cache.device, self.rt.device),
            ));
        }
        Ok(())
    }

    /// Appends sequence `i`'s rows `k_new[cu[i]..cu[i+1]]` (THD `[1, T, Hkv, D]` host tensors)
    /// at each cache head's length (SPEC §7.4) and advances the lengths: the host `append`'s
    /// checks, then `ek_append` writing the pools where they are (only the new rows travel).
    pub fn append_on(
        &self,
        k_new: &TensorView<'_>,
        v_new: &TensorView<'_>,
        cu: &[u32],
        cache: &mut AscendPagedCache,
        ws: &mut Workspace,
    ) -> Result<()> {
        self.check_resident(cache)?;
        let table = cache.block_table();
        let c = crate::engine::append::check(k_new, v_new, cu, &cache.parts_with(&table), ws)?;
        let pools = [PoolMut::Device(cache.k.addr()), PoolMut::Device(cache.v.addr())];
        let run = ops::append(self.launcher(), k_new, v_new, cu, pools, &cache.pages(&table));
        drop(table);
        cache.written("append_on", run)?;
        crate::engine::append::advance(&mut cache.lens, cu, c.heads);
        Ok(())
    }

    /// Attention of THD queries `q` `[1, T, Hq, D]` (offsets `cu_q`) over the resident cache
    /// (SPEC §7.4: bottom-right causal among each sequence's queries, dense or over per-sequence
    /// block lists), into `out` `[1, T, Hq, D]` and, if given, `lse` `[T, Hq]`: the host
    /// `attend`'s checks, then `ek_attend` reading the pools where they are.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_on(
        &self,
        q: &TensorView<'_>,
        cu_q: &[u32],
        cache: &AscendPagedCache,
        blocks: &[Option<&BlockLists>],
        scale: Option<f32>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        self.check_resident(cache)?;
        let table = cache.block_table();
        let parts = cache.parts_with(&table);
        let lse_len = lse.as_ref().map(|l| l.len());
        let shape = attend_shape(self.capabilities(), q, cu_q, &parts, &cache.lens, blocks, scale, &*out, lse_len)?;
        ops::attend_at(self.launcher(), &shape, q, &cache.at(&table), out, lse)
    }

    /// The pooled score rows of a selection over the resident cache (SPEC §7.5, §4 steps 1–4):
    /// per sequence that `which` names (empty: all) and that holds at least `decode_budget`
    /// entries; `obs` `[sequences, Hq, W, D]`. The host `kv_scores`' checks; only `obs` and the
    /// scores travel.
    pub fn kv_scores_on(
        &self,
        cache: &AscendPagedCache,
        obs: &TensorView<'_>,
        cfg: &DecodeConfig,
        which: &[bool],
    ) -> Result<Scores> {
        self.check_resident(cache)?;
        let table = cache.block_table();
        let (compress, scale, dims) = select_shape(self.capabilities(), &cache.parts_with(&table), obs, cfg, which)?;
        let s = Scoring { obs: *obs, cfg, compress: &compress, scale, dims };
        let rows = ops::score_rows(self.launcher(), &s, &cache.at(&table))?;
        Ok(Scores { heads: dims.kv_heads, window: dims.window, compressed: compress, lens: cache.lens.clone(), rows })
    }

    /// Selection over the resident cache: [`AscendBackend::kv_scores_on`] ranked by the shared
    /// rules (uniform or AdaKV budgets), each head's last W entries kept.
    pub fn select_on(
        &self,
        cache: &AscendPagedCache,
        obs: &TensorView<'_>,
        cfg: &DecodeConfig,
        which: &[bool],
    ) -> Result<Selection> {
        self.kv_scores_on(cache, obs, cfg, which)?.select(cfg)
    }

    /// Compaction in place (SPEC §7.5): each compressed head's kept entries move to its entries
    /// `0..keep`, in ascending order, on the vector cores, and its length becomes `keep`. The
    /// host `compact`'s checks first (the selection fits the cache; no page it rewrites is used
    /// by another sequence); only the kept lists travel.
    pub fn compact_on(&self, cache: &mut AscendPagedCache, sel: &Selection, ws: &mut Workspace) -> Result<()> {
        self.check_resident(cache)?;
        let table = cache.block_table();
        crate::engine::compaction::check(&cache.parts_with(&table), sel, ws)?;
        let pools = [PoolMut::Device(cache.k.addr()), PoolMut::Device(cache.v.addr())];
        let run = ops::compact(self.launcher(), pools, &cache.pages(&table), sel);
        drop(table);
        cache.written("compact_on", run)?;
        crate::engine::compaction::keep_lengths(&mut cache.lens, sel);
        Ok(())
    }

    /// Chunked planning (SPEC §7.2) over the resident cache, which already holds the chunks'
    /// keys: `q` THD `[1, T, Hq, D]` with `cu_q`, each prompt's full length, one config or one
    /// per sequence, and the `[sequences, Hkv]` states the previous chunks left (advanced only
    /// when the call succeeds). The representatives on the vector cores (keys read where they
    /// are), the decisions on the host in f64, bit for bit the CPU backend's.
    #[allow(clippy::too_many_arguments)]
    pub fn plan_chunks_on(
        &self,
        q: &TensorView<'_>,
        cu_q: &[u32],
        cache: &AscendPagedCache,
        prompt_lens: &[u32],
        cfgs: &[EntropyConfig],
        states: &mut [PlanState],
        req: &ChunkRequest<'_>,
    ) -> Result<Vec<Plan>> {
        self.check_resident(cache)?;
        let table = cache.block_table();
        let parts = cache.parts_with(&table);
        let (seqs, head_dim) = chunk_shape(self.capabilities(), q, cu_q, &parts, prompt_lens, cfgs, states, req)?;
        let settings = ChunkSettings::of(head_dim, req);
        ops::plan_chunks_at(self.launcher(), q, &seqs, &settings, &cache.at(&table), states)
    }
}

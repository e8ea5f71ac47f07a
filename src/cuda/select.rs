//! Selection and in-place compaction over paged caches on CUDA (SPEC §7.5): the compression's
//! kernels (`cuda/compress.cu`) read keys through the block table, each head scoring its own
//! `N_h − W` entries (sequences that do not compress are skipped on the device), select on the
//! device (uniform or AdaKV budgets), and `ek_compress_compact_*` moves each head's kept entries
//! to the front of its own pages in place, setting the device lengths.
//!
//! `select_on` / `compact_on` work on device memory (the engine's pools); the `Backend` calls
//! `select` / `kv_scores` upload a host cache and run the same kernels.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::CudaBackend;
use super::backend::{CompressJob, CompressRun, PagedScoring, addr_on, driver_err, on_16_byte_grid, upload_on};
use super::device::CudaTensor;
use super::launches;
use super::paged::{CudaKvCache, CudaKvCacheMut};
use crate::backend::Backend;
use crate::config::DecodeConfig;
use crate::engine::compaction::{check_rewritten_pages, select_shape};
use crate::engine::{PageLayout, Scores, SelectArgs, Selection, Workspace};
use crate::error::{Error, Result};
use crate::ffi::{EkCompressParams, EkTensor};
use crate::tensor::DType;
use crate::validate::CompressDims;

/// A selection made on the device by [`CudaBackend::select_on`], for [`CudaBackend::compact_on`]
/// on the same cache: each head's kept positions stay in device memory; the lengths after
/// compaction are read back (one synchronisation).
pub struct CudaSelection {
    /// `None`: no sequence compresses.
    run: Option<CompressRun>,
    _head_lens: Option<CudaSlice<u32>>,
    compressed: Vec<bool>,
    /// `[sequences, heads]`: entries each head keeps (the current length where not compressed).
    lengths: Vec<u32>,
    /// What the selection was made on, checked again by the compaction.
    lens_before: Vec<u32>,
    table_before: Vec<u32>,
    layout: PageLayout,
    window: usize,
}

impl CudaSelection {
    /// Per sequence: whether it compresses.
    pub fn compressed(&self) -> &[bool] {
        &self.compressed
    }
    /// `[sequences, heads]` lengths after compaction (unchanged where a sequence does not compress).
    pub fn lengths(&self) -> &[u32] {
        &self.lengths
    }
    /// The kept positions on the host (a copy from the device on `stream`).
    pub fn to_host(&self, stream: &Arc<CudaStream>) -> Result<Selection> {
        let heads = self.layout.heads;
        let Some(run) = &self.run else {
            return Ok(Selection::from_lists(
                heads,
                self.compressed.clone(),
                (0..self.lengths.len()).map(|_| Vec::new()),
            ));
        };
        let lists: Vec<u32> = stream.clone_dtoh(&run.selected).map_err(driver_err("cuMemcpyDtoH"))?;
        let (stride, w) = (run.list_stride(), self.window as u32);
        let per_head = (0..self.lengths.len()).map(|u| {
            if !self.compressed[u / heads] {
                return Vec::new();
            }
            let (len, n) = (self.lengths[u], self.lens_before[u]);
            let keep = (len - w) as usize;
            let mut kept = lists[u * stride..u * stride + keep].to_vec();
            kept.extend(n - w..n);
            kept
        });
        Ok(Selection::from_lists(heads, self.compressed.clone(), per_head))
    }
}

/// A paged cache's pools as the compression kernels take them: the pools' addresses with the
/// cache's dims (`[sequences, heads, longest, D]`) and its page strides (for the alignment test).
fn pool_tensor(ptr: u64, d: &CompressDims, layout: &PageLayout) -> EkTensor {
    let s = layout.strides;
    EkTensor::new(ptr, [d.batch, d.kv_heads, d.entries, d.head_dim], [s[0], s[2], s[1], 1])
}

/// Where a selection reads: pools, table and lengths in device memory, and their host mirrors.
struct Source<'c> {
    k: u64,
    v: u64,
    table: u64,
    table_host: &'c [u32],
    table_width: usize,
    layout: PageLayout,
    lens_host: &'c [u32],
}

impl CudaBackend {
    /// Scores the compressing sequences of a paged cache (pooled rows, SPEC §4 steps 1–4); the
    /// job, its buffers and the per-head lengths it reads.
    #[allow(clippy::too_many_arguments)]
    fn score_paged<'c>(
        &self,
        stream: &Arc<CudaStream>,
        src: &Source<'_>,
        obs: EkTensor,
        dims: CompressDims,
        cfg: &'c DecodeConfig,
        compress: &[bool],
        scale: f32,
        dtype: DType,
    ) -> Result<(CompressJob<'c>, CompressRun, CudaSlice<u32>)> {
        let heads = src.layout.heads;
        let k_cache = pool_tensor(src.k, &dims, &src.layout);
        let kernels = self.compress_kernels(&dims, dtype, &k_cache)?;
        let head_lens: Vec<u32> =
            (0..src.lens_host.len()).map(|u| if compress[u / heads] { src.lens_host[u] } else { 0 }).collect();
        let head_lens = upload_on(stream, &head_lens)?;
        let paged = PagedScoring {
            head_lens: addr_on(stream, &head_lens),
            table: src.table,
            table_width: src.table_width,
            layout: src.layout,
        };
        let job = CompressJob {
            dims,
            cfg,
            dtype,
            k_cache,
            v_cache: pool_tensor(src.v, &dims, &src.layout),
            obs,
            scale,
            paged: Some(paged),
        };
        let run = self.compress_score(stream, &job, &kernels)?;
        Ok((job, run, head_lens))
    }

    /// Scoring and selection over a paged cache, on the device.
    #[allow(clippy::too_many_arguments)]
    fn select_paged(
        &self,
        stream: &Arc<CudaStream>,
        src: &Source<'_>,
        obs: EkTensor,
        dims: CompressDims,
        cfg: &DecodeConfig,
        compress: Vec<bool>,
        scale: f32,
        dtype: DType,
    ) -> Result<CudaSelection> {
        let mut sel = CudaSelection {
            run: None,
            _head_lens: None,
            lengths: src.lens_host.to_vec(),
            lens_before: src.lens_host.to_vec(),
            table_before: src.table_host.to_vec(),
            layout: src.layout,
            window: dims.window,
            compressed: compress,
        };
        if !sel.compressed.iter().any(|&c| c) {
            return Ok(sel);
        }
        let (job, run, head_lens) = self.score_paged(stream, src, obs, dims, cfg, &sel.compressed, scale, dtype)?;
        let lengths = self.compress_select(stream, &job, &run)?;
        let heads = src.layout.heads;
        for (u, l) in sel.lengths.iter_mut().enumerate() {
            if sel.compressed[u / heads] {
                *l = lengths[u];
            }
        }
        sel.run = Some(run);
        sel._head_lens = Some(head_lens);
        Ok(sel)
    }

    /// Selection for in-place compression of a paged cache in device memory (SPEC §7.5, §4
    /// steps 1–5) on `stream`: per sequence that `which` names (empty: all) and that holds at
    /// least `decode_budget` entries, the positions each head keeps. `obs` is `[sequences, Hq,
    /// W, D]`, each sequence's own window. The host `kv_select`'s checks, on the mirrors. It
    /// allocates its scratch (scores, lists) and reads the new lengths back: a compression
    /// step, not a replayed decode step.
    pub fn select_on(
        &self,
        stream: &Arc<CudaStream>,
        cache: &CudaKvCache<'_>,
        obs: &CudaTensor<'_>,
        cfg: &DecodeConfig,
        which: &[bool],
    ) -> Result<CudaSelection> {
        self.check_stream(stream)?;
        let (compress, scale, dims) = select_shape(self.capabilities(), &cache.parts(), obs, cfg, which)?;
        let src = Source {
            k: cache.k,
            v: cache.v,
            table: cache.table,
            table_host: cache.table_host.ids(),
            table_width: cache.table_host.width(),
            layout: cache.layout,
            lens_host: cache.lens_host,
        };
        self.select_paged(stream, &src, obs.ek(), dims, cfg, compress, scale, cache.dtype)
    }

    /// Compaction in place (SPEC §7.5) of a device cache by a selection [`CudaBackend::select_on`]
    /// made on it (same table and lengths): each compressed head's kept entries move to entries
    /// `0..keep` of its own pages, and the device lengths and their mirror become `keep`. Checked
    /// entirely before the kernel is enqueued (no page it rewrites is used by another sequence or
    /// twice by its own). The pools are the ones `cache` holds: an engine may apply one layer's
    /// selection to another layer's pools of the same table and lengths, on purpose.
    pub fn compact_on(
        &self,
        stream: &Arc<CudaStream>,
        cache: &mut CudaKvCacheMut<'_>,
        sel: &CudaSelection,
        ws: &mut Workspace,
    ) -> Result<()> {
        self.check_stream(stream)?;
        let c = cache.parts().check(true)?;
        let mismatch = |what: &str| Error::PlanMismatch(format!("{what} changed since the selection was made"));
        if cache.layout != sel.layout {
            return Err(mismatch("the cache's layout"));
        }
        if cache.table_host.ids() != sel.table_before.as_slice() {
            return Err(mismatch("the block table"));
        }
        if cache.lens_host[..] != sel.lens_before[..] {
            return Err(mismatch("the cache's lengths"));
        }
        check_rewritten_pages(&c, &cache.table_host, &cache.lens_host[..], &sel.compressed, ws)?;
        let Some(run) = &sel.run else { return Ok(()) };
        let d = run.params.k_cache.shape;
        let (k_pool, v_pool) =
            (EkTensor { ptr: cache.k, ..run.params.k_cache }, EkTensor { ptr: cache.v, ..run.params.v_cache });
        let vectors = (c.head_dim * cache.dtype.size()).is_multiple_of(16)
            && on_16_byte_grid(&k_pool, cache.dtype)
            && on_16_byte_grid(&v_pool, cache.dtype);
        let launch = launches::compress_compact(c.sequences, c.heads, d[3] as usize, cache.dtype, vectors)?;
        launch.check(&self.limits)?;
        // The selection's buffers are read on this stream: held until the launch is enqueued, so
        // their read events follow it (a selection dropped on its own stream waits for them).
        let _reads = [Some(&run.selected), run.lengths.as_ref(), sel._head_lens.as_ref()]
            .into_iter()
            .flatten()
            .map(|b| b.device_ptr(stream).1)
            .collect::<Vec<_>>();
        let params = EkCompressParams {
            k_cache: k_pool,
            v_cache: v_pool,
            block_table: cache.table,
            cache_lens: cache.lens,
            ..run.params
        };
        // SAFETY: the selection was made on this cache (same layout, table and lengths, checked
        // above): its lists and lengths address entries within each head's pages, and no page
        // it rewrites belongs to another sequence.
        unsafe { self.launch(stream, &launch, &params)? };
        let heads = c.heads;
        for (u, l) in cache.lens_host.iter_mut().enumerate() {
            if sel.compressed[u / heads] {
                *l = sel.lengths[u];
            }
        }
        Ok(())
    }

    /// Uploads a host cache's pools and table; runs `f` on them.
    fn with_uploaded_cache<R>(
        &self,
        a: &SelectArgs<'_>,
        f: impl FnOnce(&Source<'_>, EkTensor) -> Result<R>,
    ) -> Result<R> {
        let cache = a.cache();
        let k = self.upload(cache.k().as_bytes())?;
        let v = self.upload(cache.v().as_bytes())?;
        let table = self.upload(cache.table().ids())?;
        let (_obs, obs) = self.tensor(&a.obs())?;
        let src = Source {
            k: addr_on(&self.stream, &k),
            v: addr_on(&self.stream, &v),
            table: addr_on(&self.stream, &table),
            table_host: cache.table().ids(),
            table_width: cache.table().width(),
            layout: *cache.layout(),
            lens_host: cache.lens(),
        };
        let r = f(&src, obs)?;
        self.stream.synchronize().map_err(driver_err("cuStreamSynchronize"))?;
        Ok(r)
    }

    /// `Backend::select`: the device selection of a host cache (the host's when the window rows'
    /// scoring tiles do not fit in shared memory).
    pub(crate) fn select_host(&self, a: &SelectArgs<'_>) -> Result<Selection> {
        let d = a.dims();
        if self.compress_kernels(&d, a.cache().dtype(), &pool_tensor(0, &d, a.cache().layout())).is_err() {
            return self.host.select(a);
        }
        self.with_uploaded_cache(a, |src, obs| {
            let sel = self.select_paged(
                &self.stream,
                src,
                obs,
                d,
                a.cfg(),
                a.compress().to_vec(),
                a.scale(),
                a.cache().dtype(),
            )?;
            sel.to_host(&self.stream)
        })
    }

    /// `Backend::kv_scores`: the device's pooled score rows of a host cache.
    pub(crate) fn scores_host(&self, a: &SelectArgs<'_>) -> Result<Scores> {
        let d = a.dims();
        let dtype = a.cache().dtype();
        if !a.compress().iter().any(|&c| c)
            || self.compress_kernels(&d, dtype, &pool_tensor(0, &d, a.cache().layout())).is_err()
        {
            return self.host.kv_scores(a);
        }
        let heads = d.kv_heads;
        let lens = a.cache().lens();
        self.with_uploaded_cache(a, |src, obs| {
            let (_job, run, _head_lens) =
                self.score_paged(&self.stream, src, obs, d, a.cfg(), a.compress(), a.scale(), dtype)?;
            let pooled: Vec<f32> = self.stream.clone_dtoh(&run.pooled).map_err(driver_err("cuMemcpyDtoH"))?;
            let stride = d.entries - d.window;
            let rows = (0..lens.len())
                .map(|u| {
                    if !a.compress()[u / heads] {
                        return Vec::new();
                    }
                    pooled[u * stride..u * stride + lens[u] as usize - d.window].to_vec()
                })
                .collect();
            Ok(Scores::of(a, rows))
        })
    }
}

//! The engine calls over paged caches in device memory (SPEC §7 on CUDA): `append_on` and
//! `attend_on` (split into `plan_attend_on` and `run_attend_on`, FlashInfer-style). The pools,
//! the block table, the lengths and the ragged offsets live in device memory; the engine keeps
//! host mirrors of the table, the lengths and the offsets (as serving engines do), which the
//! shared validation reads before anything is enqueued. `append_on` reads only device memory and
//! `run_attend_on` only device memory and the plan's buffers: neither allocates nor copies, so a
//! decode step of appends and attention can be captured in a CUDA graph. A captured graph holds
//! the launches' grids and the params structs by value (tile count, splits, keys per split, the
//! plan buffers' addresses): it replays correctly only while `plan_attend_on` (outside the graph)
//! yields the same launch shape without growing its buffers; otherwise capture again. A
//! [`CudaAttendPlan::graph_stable`] plan guarantees that while it can: its splits are cut for a
//! maximum number of keys per tile (FlashInfer's CUDA-graph mode sizes its grid the same way), so
//! re-planning as the caches grow rewrites the tiles in place and keeps the shape and buffers, and
//! it refuses (unchanged) a re-plan that cannot. `append_on` advances the host mirror when
//! it is called (captured), not per replay: the engine advances its mirror for each replay.
//! Capture on a stream of the engine's (the backend's own is the legacy default stream, which
//! cannot capture) with the context's event tracking off: with it on — always, for any stream but
//! the legacy one — cudarc makes every pointer access wait on events recorded outside the
//! capture, which CUDA refuses during capture without `CU_EVENT_WAIT_EXTERNAL`; and synchronise no
//! context while capturing (`tests/cuda_graph.rs` captures and replays a step on the emulated
//! driver).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

use super::CudaBackend;
use super::backend::driver_err;
use super::device::{CudaTensor, CudaTensorMut, DeviceElement};
use super::launches::{self, AttendLaunches};
use crate::backend::Backend;
use crate::engine::args::attend_shape;
use crate::engine::cache::{CacheParts, check_pages};
use crate::engine::{BlockTable, PageLayout, Workspace};
use crate::error::{Error, Result};
use crate::ffi::{EkAppendParams, EkAttendParams, EkAttendTile};
use crate::plan::BlockLists;
use crate::tensor::{DType, Layout};

/// A paged KV cache in device memory, read-only: K and V pools of one [`PageLayout`], the block
/// table `[sequences, width]` (u32 page ids) on the device, and the engine's host mirrors of the
/// table and of the `[sequences, heads]` lengths (they must equal the device's).
pub struct CudaKvCache<'a> {
    pub(super) k: u64,
    pub(super) v: u64,
    pub(super) elements: (usize, usize),
    pub(super) dtype: DType,
    pub(super) layout: PageLayout,
    pub(super) table: u64,
    pub(super) table_host: BlockTable<'a>,
    pub(super) lens_host: &'a [u32],
    _order: [SyncOnDrop<'a>; 3],
}

impl<'a> CudaKvCache<'a> {
    /// A view of the device pools `k`, `v` and table `table` for kernels on `stream`.
    pub fn new<T: DeviceElement>(
        k: &'a impl DevicePtr<T>,
        v: &'a impl DevicePtr<T>,
        layout: PageLayout,
        table: &'a impl DevicePtr<u32>,
        table_host: BlockTable<'a>,
        lens_host: &'a [u32],
        stream: &'a CudaStream,
    ) -> Result<Self> {
        check_mirror("block table", table.len(), table_host.ids().len())?;
        let (kp, ko) = k.device_ptr(stream);
        let (vp, vo) = v.device_ptr(stream);
        let (tp, to) = table.device_ptr(stream);
        Ok(CudaKvCache {
            k: kp,
            v: vp,
            elements: (k.len(), v.len()),
            dtype: T::DTYPE,
            layout,
            table: tp,
            table_host,
            lens_host,
            _order: [ko, vo, to],
        })
    }

    pub(super) fn parts(&self) -> CacheParts<'_> {
        parts(&self.layout, &self.table_host, self.lens_host, self.dtype, self.elements)
    }
}

/// What the shared validation reads of a device cache: its layout, the mirrors, the pools' sizes.
fn parts<'c>(
    layout: &'c PageLayout,
    table: &'c BlockTable<'c>,
    lens: &'c [u32],
    dtype: DType,
    elements: (usize, usize),
) -> CacheParts<'c> {
    CacheParts { layout, table, lens, k: (dtype, elements.0), v: (dtype, elements.1) }
}

/// A paged KV cache in device memory that `append_on` writes: like [`CudaKvCache`], with the
/// lengths on the device (advanced by the kernels) and their host mirror (advanced by the call).
pub struct CudaKvCacheMut<'a> {
    pub(super) k: u64,
    pub(super) v: u64,
    pub(super) elements: (usize, usize),
    pub(super) dtype: DType,
    pub(super) layout: PageLayout,
    pub(super) table: u64,
    pub(super) table_host: BlockTable<'a>,
    pub(super) lens: u64,
    pub(super) lens_host: &'a mut [u32],
    _order: [SyncOnDrop<'a>; 4],
}

impl<'a> CudaKvCacheMut<'a> {
    /// A writable view of the device pools, table and lengths for kernels on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn new<T: DeviceElement>(
        k: &'a mut impl DevicePtrMut<T>,
        v: &'a mut impl DevicePtrMut<T>,
        layout: PageLayout,
        table: &'a impl DevicePtr<u32>,
        table_host: BlockTable<'a>,
        lens: &'a mut impl DevicePtrMut<u32>,
        lens_host: &'a mut [u32],
        stream: &'a CudaStream,
    ) -> Result<Self> {
        check_mirror("block table", table.len(), table_host.ids().len())?;
        check_mirror("cache lengths", lens.len(), lens_host.len())?;
        let elements = (k.len(), v.len());
        let (kp, ko) = k.device_ptr_mut(stream);
        let (vp, vo) = v.device_ptr_mut(stream);
        let (tp, to) = table.device_ptr(stream);
        let (lp, lo) = lens.device_ptr_mut(stream);
        Ok(CudaKvCacheMut {
            k: kp,
            v: vp,
            elements,
            dtype: T::DTYPE,
            layout,
            table: tp,
            table_host,
            lens: lp,
            lens_host,
            _order: [ko, vo, to, lo],
        })
    }

    pub(super) fn parts(&self) -> CacheParts<'_> {
        parts(&self.layout, &self.table_host, self.lens_host, self.dtype, self.elements)
    }
}

/// A device array and its host mirror hold the same number of elements.
fn check_mirror(what: &'static str, device: usize, host: usize) -> Result<()> {
    if device != host {
        return Err(Error::Shape {
            what,
            expected: format!("{host} elements (like its host mirror)"),
            got: vec![device],
        });
    }
    Ok(())
}

/// The device buffers and launches of one attention call, planned on the host by
/// [`CudaBackend::plan_attend_on`] and run by [`CudaBackend::run_attend_on`] (any number of
/// times, e.g. replayed in a CUDA graph captured after this plan: see the module docs for when a
/// re-plan invalidates such a graph). Buffers grow when a plan needs more and are reused
/// otherwise.
#[derive(Default)]
pub struct CudaAttendPlan {
    tiles: Option<CudaSlice<EkAttendTile>>,
    lists: [Option<CudaSlice<u32>>; 3],
    partial: Option<CudaSlice<f32>>,
    planned: Option<Planned>,
    /// Graph-stable: the split shape is made for this many keys per tile, whatever the cache holds.
    stable_keys: Option<usize>,
}

/// What a plan was made for, checked again when it runs.
struct Planned {
    tiles: usize,
    /// `None`: no query tokens, nothing to launch.
    launches: Option<AttendLaunches>,
    /// Per sequence: one past the last entry its tiles read (their table rows must stay valid).
    reach: Vec<usize>,
    tile_rows: usize,
    q_shape: [usize; 4],
    dtype: DType,
    layout: PageLayout,
    table_width: usize,
    lse_len: Option<usize>,
    group: usize,
    scale: f32,
}

impl CudaAttendPlan {
    /// An empty plan (no buffers yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty graph-stable plan, for a step captured in a CUDA graph and replayed while the
    /// caches grow: every `plan_attend_on` cuts the tiles' keys into the splits `max_keys` keys
    /// per tile need (trailing splits of shorter tiles are empty), so re-planning keeps the launch
    /// shape (tiles, splits, keys per split) and, after the first plan, the buffers' addresses —
    /// what the captured launches hold by value. A re-plan that would change them (another tile
    /// count, a tile over `max_keys`, lists that outgrow their buffers) fails, and the plan is
    /// left unchanged: capture again with a new plan. The price: splits sized for `max_keys`.
    pub fn graph_stable(max_keys: usize) -> Self {
        CudaAttendPlan { stable_keys: Some(max_keys.max(1)), ..Self::default() }
    }

    /// The launch shape of the current plan: (tiles, splits, keys per split); `None` before a
    /// plan or when it has nothing to launch.
    pub fn launch_shape(&self) -> Option<(usize, usize, usize)> {
        let p = self.planned.as_ref()?;
        p.launches.as_ref().map(|l| (p.tiles, l.splits, l.keys_per_split))
    }

    /// A graph-stable re-plan keeps the launch shape and the buffers (see [`Self::graph_stable`]).
    fn check_stable(&self, shape: (usize, usize, usize), needs: [usize; 5]) -> Result<()> {
        let Some(max_keys) = self.stable_keys else { return Ok(()) };
        let Some(before) = self.launch_shape() else { return Ok(()) };
        let refuse =
            |why: String| Err(Error::PlanMismatch(format!("graph-stable plan for {max_keys} keys per tile: {why}")));
        if before != shape {
            return refuse(format!(
                "the launch shape (tiles, splits, keys per split) would change from {before:?} to {shape:?}; capture again with a new plan"
            ));
        }
        let have = [
            self.tiles.as_ref().map_or(0, |s| s.len()),
            self.lists[0].as_ref().map_or(0, |s| s.len()),
            self.lists[1].as_ref().map_or(0, |s| s.len()),
            self.lists[2].as_ref().map_or(0, |s| s.len()),
            self.partial.as_ref().map_or(0, |s| s.len()),
        ];
        if needs.iter().zip(have).any(|(&n, h)| n.max(1) > h) {
            return refuse("its buffers would have to grow (and move); capture again with a new plan".into());
        }
        Ok(())
    }
}

/// `slot` holding at least `n` elements (reallocated, uninitialised contents, when smaller).
fn grown<'s, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &'s mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<&'s mut CudaSlice<T>> {
    let n = n.max(1);
    if slot.as_ref().is_none_or(|s| s.len() < n) {
        *slot = Some(stream.alloc_zeros::<T>(n).map_err(driver_err("cuMemAlloc"))?);
    }
    Ok(slot.as_mut().expect("just set"))
}

/// `host` into the front of `slot` (grown when needed), in stream order.
fn upload_into<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &mut Option<CudaSlice<T>>,
    host: &[T],
) -> Result<()> {
    let dst = grown(stream, slot, host.len())?;
    if !host.is_empty() {
        stream.memcpy_htod(host, &mut dst.slice_mut(..host.len())).map_err(driver_err("cuMemcpyHtoD"))?;
    }
    Ok(())
}

fn addr<T>(stream: &CudaStream, s: &Option<CudaSlice<T>>) -> u64 {
    s.as_ref().map_or(0, |s| super::backend::addr_on(stream, s))
}

impl CudaBackend {
    /// Appends sequence `i`'s rows `k_new[cu_q[i]..cu_q[i+1]]` (THD `[1, T, Hkv, D]` device
    /// tensors) at each cache head's length, on `stream` (SPEC §7.4): the checks of the host
    /// `append` on the mirrors, then two kernels reading the device `cu_q_dev`, table and
    /// lengths (the lengths advanced on the device and in the mirror).
    #[allow(clippy::too_many_arguments)]
    pub fn append_on(
        &self,
        stream: &Arc<CudaStream>,
        k_new: &CudaTensor<'_>,
        v_new: &CudaTensor<'_>,
        cu_q: &[u32],
        cu_q_dev: &impl DevicePtr<u32>,
        cache: &mut CudaKvCacheMut<'_>,
        ws: &mut Workspace,
    ) -> Result<()> {
        self.check_stream(stream)?;
        let c = crate::engine::append::check(k_new, v_new, cu_q, &cache.parts(), ws)?;
        check_mirror("cu_q", cu_q_dev.len(), cu_q.len())?;
        let tokens = k_new.shape()[1];
        if tokens == 0 {
            return Ok(());
        }
        let [rows, lens] = launches::append(tokens, c.heads, c.sequences, cache.dtype)?;
        let (cu_ptr, _cu_order) = cu_q_dev.device_ptr(stream);
        let l = &cache.layout;
        let params = EkAppendParams {
            k_new: k_new.ek(),
            v_new: v_new.ek(),
            k_pool: cache.k,
            v_pool: cache.v,
            block_table: cache.table,
            cu_q: cu_ptr,
            lens: cache.lens,
            page_stride: l.strides[0] as i64,
            slot_stride: l.strides[1] as i64,
            head_stride: l.strides[2] as i64,
            table_width: cache.table_host.width() as i32,
            page_size: l.page_size as i32,
            sequences: c.sequences as i32,
            cache_heads: c.heads as i32,
            dtype: crate::ffi::dtype_code(cache.dtype),
        };
        // SAFETY: validated on the mirrors: every new entry lies within its sequence's pages,
        // no page is written twice, the device arrays hold as many elements as their mirrors.
        unsafe {
            self.launch(stream, &rows, &params)?;
            self.launch(stream, &lens, &params)?;
        }
        crate::engine::append::advance(cache.lens_host, cu_q, c.heads);
        Ok(())
    }

    /// Validates an attention call over a device cache (the host `attend`'s checks, on the
    /// mirrors), cuts it into tiles and copies them into `plan`'s buffers on `stream`. `q` and
    /// `out` are `[1, T, Hq, D]`; `lse_len`: the length of the LSE output `[T, Hq]`, if any.
    #[allow(clippy::too_many_arguments)]
    pub fn plan_attend_on(
        &self,
        stream: &Arc<CudaStream>,
        plan: &mut CudaAttendPlan,
        q: &dyn Layout,
        cu_q: &[u32],
        cache: &CudaKvCache<'_>,
        blocks: &[Option<&BlockLists>],
        scale: Option<f32>,
        out: &dyn Layout,
        lse_len: Option<usize>,
    ) -> Result<()> {
        self.check_stream(stream)?;
        let parts = cache.parts();
        let shape = attend_shape(self.capabilities(), q, cu_q, &parts, cache.lens_host, blocks, scale, out, lse_len)?;
        let d = shape.dims();
        let (tq, nh) = crate::engine::tiles::tile_shape(d.group(), launches::ATTEND_ROWS);
        let work = crate::engine::tiles::work(&shape, launches::ATTEND_ROWS);
        let tiles = work.tiles.len().max(1);
        let max_keys = match plan.stable_keys {
            Some(m) if work.max_keys > m => {
                return Err(Error::range(
                    "keys per tile",
                    work.max_keys,
                    format!("the graph-stable plan splits at most {m} keys per tile; capture again with a larger plan"),
                ));
            }
            Some(m) => m,
            None => work.max_keys,
        };
        let launches = launches::attend(&self.limits, tiles, tq * nh, d.head_dim, max_keys, q.dtype())?;
        launches.split.check(&self.limits)?;
        launches.merge.check(&self.limits)?;
        let partial = tiles * launches.splits * tq * nh * (d.head_dim + 2);
        if !work.tiles.is_empty() {
            let needs = [work.tiles.len(), work.offsets.len(), work.counts.len(), work.indices.len(), partial];
            plan.check_stable((work.tiles.len(), launches.splits, launches.keys_per_split), needs)?;
        }
        plan.planned = None; // a failure below leaves no stale plan to run
        upload_into(stream, &mut plan.tiles, &work.tiles)?;
        for (slot, host) in plan.lists.iter_mut().zip([&work.offsets, &work.counts, &work.indices]) {
            upload_into(stream, slot, host)?;
        }
        grown(stream, &mut plan.partial, partial)?;
        plan.planned = Some(Planned {
            tiles: work.tiles.len(),
            launches: (!work.tiles.is_empty()).then_some(launches),
            reach: (0..d.sequences)
                .map(|i| {
                    work.tiles.iter().filter(|t| t.seq as usize == i).map(|t| t.own_end as usize).max().unwrap_or(0)
                })
                .collect(),
            tile_rows: tq * nh,
            q_shape: q.shape(),
            dtype: q.dtype(),
            layout: cache.layout,
            table_width: cache.table_host.width(),
            lse_len,
            group: d.group(),
            scale: shape.scale(),
        });
        Ok(())
    }

    /// Runs a planned attention on `stream`: two kernels, no allocation, no copy. `q`, `cache`,
    /// `out` and `lse` must have the shapes the plan was made for (the device data may change
    /// between runs: a replayed step reads its new queries and cache).
    pub fn run_attend_on(
        &self,
        stream: &Arc<CudaStream>,
        plan: &CudaAttendPlan,
        q: &CudaTensor<'_>,
        cache: &CudaKvCache<'_>,
        out: &mut CudaTensorMut<'_>,
        lse: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        self.check_stream(stream)?;
        let p = plan.planned.as_ref().ok_or_else(|| {
            Error::PlanMismatch("run_attend_on needs a plan: call plan_attend_on first (it failed or never ran)".into())
        })?;
        let mismatch = |what: &str| Error::PlanMismatch(format!("{what} differs from what the plan was made for"));
        if q.shape() != p.q_shape || q.dtype() != p.dtype {
            return Err(mismatch("q"));
        }
        if out.shape() != p.q_shape || out.dtype() != p.dtype {
            return Err(mismatch("out"));
        }
        q.check_layout("q")?;
        out.check_output_layout("out")?;
        if cache.layout != p.layout || cache.table_host.width() != p.table_width || cache.dtype != p.dtype {
            return Err(mismatch("the cache's layout"));
        }
        cache.parts().check(false)?;
        if cache.table_host.ids().len() != p.reach.len() * p.table_width {
            return Err(mismatch("the block table's rows"));
        }
        for (i, &reach) in p.reach.iter().enumerate() {
            check_pages(i, &cache.table_host.row(i)[..reach.div_ceil(p.layout.page_size)], p.layout.pages)?;
        }
        if lse.as_ref().map(|l| l.len()) != p.lse_len {
            return Err(mismatch("lse"));
        }
        let Some(l) = &p.launches else { return Ok(()) };
        let (lse_ptr, _lse_written) = match lse {
            Some(l) => {
                let (ptr, order) = l.device_ptr_mut(stream);
                (ptr, Some(order))
            }
            None => (0, None),
        };
        let [offsets, counts, indices] = &plan.lists;
        let params = EkAttendParams {
            q: q.ek(),
            out: out.ek(),
            lse: lse_ptr,
            k_pool: cache.k,
            v_pool: cache.v,
            block_table: cache.table,
            tiles: addr(stream, &plan.tiles),
            offsets: addr(stream, offsets),
            counts: addr(stream, counts),
            indices: addr(stream, indices),
            partial: addr(stream, &plan.partial),
            page_stride: p.layout.strides[0] as i64,
            slot_stride: p.layout.strides[1] as i64,
            head_stride: p.layout.strides[2] as i64,
            table_width: p.table_width as i32,
            page_size: p.layout.page_size as i32,
            group: p.group as i32,
            tile_rows: p.tile_rows as i32,
            splits: l.splits as i32,
            keys_per_split: l.keys_per_split as i32,
            batched_rows: 0,
            scale_log2: p.scale * std::f32::consts::LOG2_E,
            tiles_count: p.tiles as i32,
            dtype: crate::ffi::dtype_code(p.dtype),
        };
        // SAFETY: the plan's tiles address entries within the lengths validated when it was
        // made, for a cache of the same layout and table width; `partial` was sized for them.
        unsafe {
            self.launch(stream, &l.split, &params)?;
            self.launch(stream, &l.merge, &params)
        }
    }
}

/// A device copy of a host [`PagedCache`](crate::engine::PagedCache): its pools, block table and
/// lengths in device memory, with the host mirrors of the table and lengths that the `_on` calls
/// validate against. For tests, benchmarks and engines that start from host pools; an engine
/// with its own allocations wraps them in [`CudaKvCache`] / [`CudaKvCacheMut`] directly.
pub struct CudaPagedCache<T: DeviceElement> {
    /// The K pool.
    pub k: CudaSlice<T>,
    /// The V pool.
    pub v: CudaSlice<T>,
    /// The block table on the device.
    pub table: CudaSlice<u32>,
    /// The `[sequences, heads]` lengths on the device.
    pub lens: CudaSlice<u32>,
    /// Where entries sit in the pools.
    pub layout: PageLayout,
    /// The table's host mirror, row-major `[sequences, width]`.
    pub table_host: Vec<u32>,
    /// Pages per sequence in the table.
    pub width: usize,
    /// The lengths' host mirror.
    pub lens_host: Vec<u32>,
}

impl<T: DeviceElement + bytemuck::Pod> CudaPagedCache<T> {
    /// Copies `host` to the device on `stream`.
    pub fn upload(stream: &Arc<CudaStream>, host: &crate::engine::PagedCache) -> Result<Self> {
        for (what, t) in [("K pool", &host.k), ("V pool", &host.v)] {
            if t.dtype() != T::DTYPE {
                return Err(Error::DTypeMismatch { what, expected: T::DTYPE, got: t.dtype() });
            }
        }
        let up = |t: &crate::tensor::HostTensor| {
            stream.clone_htod(&bytemuck::pod_collect_to_vec::<u8, T>(t.data().as_bytes()))
        };
        let err = driver_err("cuMemcpyHtoD");
        Ok(CudaPagedCache {
            k: up(&host.k).map_err(&err)?,
            v: up(&host.v).map_err(&err)?,
            table: stream.clone_htod(&host.ids).map_err(&err)?,
            lens: stream.clone_htod(&host.lens).map_err(&err)?,
            layout: host.layout,
            table_host: host.ids.clone(),
            width: host.width,
            lens_host: host.lens.clone(),
        })
    }

    /// A read-only view for kernels on `stream`.
    pub fn view<'a>(&'a self, stream: &'a CudaStream) -> Result<CudaKvCache<'a>> {
        self.view_with_lens(&self.lens_host, stream)
    }

    /// A read-only view whose length mirror is `lens` (e.g. the lengths after an append the
    /// engine plans for before it runs).
    pub fn view_with_lens<'a>(&'a self, lens: &'a [u32], stream: &'a CudaStream) -> Result<CudaKvCache<'a>> {
        CudaKvCache::new(
            &self.k,
            &self.v,
            self.layout,
            &self.table,
            BlockTable::new(&self.table_host, self.width),
            lens,
            stream,
        )
    }

    /// Whether this copy equals `host` (after `stream`'s work): pools bit for bit, device
    /// lengths and their mirror.
    pub fn matches_host(&self, stream: &Arc<CudaStream>, host: &crate::engine::PagedCache) -> Result<bool> {
        let err = driver_err("cuMemcpyDtoH");
        let same_pool = |d: &CudaSlice<T>, h: &crate::tensor::HostTensor| -> Result<bool> {
            let got: Vec<T> = stream.clone_dtoh(d).map_err(&err)?;
            Ok(bytemuck::cast_slice::<T, u8>(&got) == h.data().as_bytes())
        };
        let lens: Vec<u32> = stream.clone_dtoh(&self.lens).map_err(&err)?;
        Ok(same_pool(&self.k, &host.k)?
            && same_pool(&self.v, &host.v)?
            && lens == host.lens
            && self.lens_host == host.lens)
    }

    /// A writable view for kernels on `stream` (appends, compaction).
    pub fn view_mut<'a>(&'a mut self, stream: &'a CudaStream) -> Result<CudaKvCacheMut<'a>> {
        CudaKvCacheMut::new(
            &mut self.k,
            &mut self.v,
            self.layout,
            &self.table,
            BlockTable::new(&self.table_host, self.width),
            &mut self.lens,
            &mut self.lens_host,
            stream,
        )
    }
}

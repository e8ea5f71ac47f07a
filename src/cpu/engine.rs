//! Attention over a (paged or contiguous) cache on the CPU (SPEC §7.4): one work item per
//! (sequence, cache head, query tile), the group's query heads stacked as rows of one tile, keys
//! and values read in place through the sequence's block table, the bottom-right causal rule
//! counted on each head's entries, optional per-sequence block plans.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::amx::{AMX_ROWS_TARGET, AmxGeom, AmxTile};
use super::simd::{Isa, Simd, WithSimd, dispatch};
use super::tile::{Geom, Paging, ROWS_TARGET, Rows, Tile};
use super::{SendPtr, Strided};
use std::sync::Mutex;

use crate::engine::{AttendArgs, KvCache, Workspace};
use crate::plan::SegmentAttention;
use crate::tensor::{Element, TensorViewMut};

/// Query positions `p0..p1` of (sequence `i`, cache head `h`), all inside one segment when the
/// sequence has a block plan.
#[derive(Clone, Copy, Debug)]
struct Item {
    i: usize,
    h: usize,
    p0: usize,
    p1: usize,
    cost: usize,
}

struct Call<'a, 'c, E> {
    args: &'c AttendArgs<'a>,
    q: Strided<'a, E>,
    k: &'a [E],
    v: &'a [E],
    /// Softmax scale times log2(e).
    c: f32,
    out: SendPtr<E>,
    os: [usize; 4],
    lse: Option<SendPtr<f32>>,
}

/// Pages at least this long are read without software prefetches.
const LONG_PAGE: usize = 256;

/// Tokens per query tile for a group of `g` query heads.
fn tile_tokens(rows_target: usize, g: usize) -> usize {
    (rows_target / g).max(1)
}

/// The work items of a call, largest first, into `out` (reused: no allocation once it has grown).
fn items(a: &AttendArgs<'_>, rows_target: usize, out: &mut Vec<Item>) {
    let d = a.dims();
    let tq = tile_tokens(rows_target, d.group());
    out.clear();
    for i in 0..d.sequences {
        let q_len = a.tokens(i).len();
        for h in 0..d.cache_heads {
            let start = a.q_start(i, h);
            let bl = a.blocks(i);
            let mut p0 = start;
            while p0 < start + q_len {
                // Tiles never straddle a segment of a planned sequence: each has its own keys.
                let seg_end = bl.map_or(usize::MAX, |(bl, _)| (p0 / bl.dims.segment_size + 1) * bl.dims.segment_size);
                let p1 = (p0 + tq).min(start + q_len).min(seg_end);
                let before = match bl.map(|(bl, row)| (bl, bl.segment(row, h, p0 / bl.dims.segment_size))) {
                    Some((bl, SegmentAttention::Sparse(list))) => {
                        list.len() * bl.dims.block_size + p1 - p0 / bl.dims.segment_size * bl.dims.segment_size
                    }
                    _ => a.visible_end(i, h, p1 - 1 - start),
                };
                out.push(Item { i, h, p0, p1, cost: before });
                p0 = p1;
            }
        }
    }
    // Unstable: a stable sort would allocate its merge buffer on every call.
    out.sort_unstable_by_key(|it| (std::cmp::Reverse(it.cost), it.i, it.h, it.p0));
}

/// What a workspace keeps for the CPU's attention: the work list and one tile per worker thread
/// of the current pool, for one tile geometry and element type.
struct Scratch {
    split: super::engine_split::SplitScratch,
    items: Vec<Item>,
    tiles: Vec<Mutex<(Tile, Vec<f32>)>>,
    /// The bf16 tiles (AMX or `VDPBF16PS`), made on the first bf16 call that runs on them, and
    /// whether their products run on AMX.
    #[cfg(target_arch = "x86_64")]
    amx_tiles: Vec<Mutex<(AmxTile, Vec<f32>)>>,
    #[cfg(target_arch = "x86_64")]
    amx_on_amx: bool,
    geom: Geom,
    dtype: crate::DType,
}

impl Scratch {
    /// The workspace's scratch, rebuilt when the geometry, the type or the pool's size changed.
    fn of<E: Element>(ws: &mut Workspace, geom: Geom) -> &mut Scratch {
        let threads = rayon::current_num_threads();
        let fits = ws
            .scratch
            .as_ref()
            .and_then(|s| s.downcast_ref::<Scratch>())
            .is_some_and(|s| s.geom == geom && s.dtype == E::DTYPE && s.tiles.len() == threads);
        if !fits {
            let tiles = (0..threads).map(|_| Mutex::new((Tile::new::<E>(geom), vec![0f32; geom.d]))).collect();
            let split = Default::default();
            ws.scratch = Some(Box::new(Scratch {
                split,
                items: Vec::new(),
                tiles,
                #[cfg(target_arch = "x86_64")]
                amx_tiles: Vec::new(),
                #[cfg(target_arch = "x86_64")]
                amx_on_amx: false,
                geom,
                dtype: E::DTYPE,
            }));
        }
        ws.scratch.as_mut().and_then(|s| s.downcast_mut::<Scratch>()).expect("just set")
    }
}

/// The rows of (sequence `i`, head `h`) of a pool.
pub(crate) fn rows<'a, E>(cache: &'a KvCache<'_>, data: &'a [E], i: usize, h: usize) -> Rows<'a, E> {
    let l = cache.layout();
    Rows {
        data,
        base: h * l.strides[2],
        stride: l.strides[1],
        paging: Some(Paging { table: cache.table().row(i), page_size: l.page_size, page_stride: l.strides[0] }),
    }
}

/// What `run_item` needs of a query tile: the f32 tile of any ISA ([`Tile`]) or the AMX one.
trait QueryTile {
    /// Rows ahead of the current key that the walk prefetches over short pages: the next
    /// flush's keys.
    const PREFETCH_AHEAD: usize;
    /// Starts a tile (see [`Tile::begin`]); `c` is the softmax scale times log2 e.
    fn start(&mut self, diag_from: usize, row_group: usize, c: f32);
    fn query<S: Simd, E: Element>(&mut self, r: usize, q: &[E], c: f32, tmp: &mut [f32]);
    fn clear(&mut self, from: usize);
    fn push<S: Simd, E: Element, const NR: usize, const MV: usize>(&mut self, k: &[E], v: &[E], t: usize);
    fn finish<S: Simd, const NR: usize, const MV: usize>(&mut self);
    fn write<E: Element>(&self, r: usize, out: &mut [E], tmp: &mut [f32]);
    fn row_lse(&self, r: usize) -> f32;
}

impl QueryTile for Tile {
    const PREFETCH_AHEAD: usize = super::tile::PREFETCH_ROWS;
    #[inline(always)]
    fn start(&mut self, diag_from: usize, row_group: usize, _c: f32) {
        self.begin(diag_from, row_group)
    }
    #[inline(always)]
    fn query<S: Simd, E: Element>(&mut self, r: usize, q: &[E], c: f32, tmp: &mut [f32]) {
        self.set_query::<S, E>(r, q, c, tmp)
    }
    #[inline(always)]
    fn clear(&mut self, from: usize) {
        self.clear_queries(from)
    }
    #[inline(always)]
    fn push<S: Simd, E: Element, const NR: usize, const MV: usize>(&mut self, k: &[E], v: &[E], t: usize) {
        self.push_rows::<S, E, NR, MV>(k, v, t)
    }
    #[inline(always)]
    fn finish<S: Simd, const NR: usize, const MV: usize>(&mut self) {
        self.flush::<S, NR, MV>()
    }
    #[inline(always)]
    fn write<E: Element>(&self, r: usize, out: &mut [E], tmp: &mut [f32]) {
        self.write_row(r, out, tmp)
    }
    #[inline(always)]
    fn row_lse(&self, r: usize) -> f32 {
        self.lse(r)
    }
}

/// Only entered for bf16 through the entry point of [`Isa::Amx`] / [`Isa::Avx512Bf16`]
/// (AVX-512 + AVX512-BF16).
#[cfg(target_arch = "x86_64")]
impl QueryTile for AmxTile {
    const PREFETCH_AHEAD: usize = super::amx::KEYS;
    #[inline(always)]
    fn start(&mut self, diag_from: usize, row_group: usize, c: f32) {
        self.begin(diag_from, row_group, c)
    }
    #[inline(always)]
    fn query<S: Simd, E: Element>(&mut self, r: usize, q: &[E], _c: f32, _tmp: &mut [f32]) {
        self.set_query(r, q)
    }
    #[inline(always)]
    fn clear(&mut self, from: usize) {
        self.clear_queries(from)
    }
    #[inline(always)]
    fn push<S: Simd, E: Element, const NR: usize, const MV: usize>(&mut self, k: &[E], v: &[E], t: usize) {
        self.push_rows(k, v, t)
    }
    #[inline(always)]
    fn finish<S: Simd, const NR: usize, const MV: usize>(&mut self) {
        self.flush()
    }
    #[inline(always)]
    fn write<E: Element>(&self, r: usize, out: &mut [E], tmp: &mut [f32]) {
        self.write_row(r, out, tmp)
    }
    #[inline(always)]
    fn row_lse(&self, r: usize) -> f32 {
        self.lse(r)
    }
}

struct ItemJob<'a, 'c, E, T> {
    call: &'c Call<'a, 'c, E>,
    item: Item,
    tile: &'c mut T,
    tmp: &'c mut Vec<f32>,
}

impl<E: Element, T: QueryTile> WithSimd for ItemJob<'_, '_, E, T> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self) {
        if S::LANES >= 16 { run_item::<S, E, T, 8, 3>(self) } else { run_item::<S, E, T, 4, 3>(self) }
    }
}

#[inline(always)]
fn run_item<S: Simd, E: Element, T: QueryTile, const NR: usize, const MV: usize>(job: ItemJob<'_, '_, E, T>) {
    let ItemJob { call, item, tile, tmp } = job;
    let Item { i, h, p0, p1, .. } = item;
    let a = call.args;
    let d = a.dims();
    let (g, dd) = (d.group(), d.head_dim);
    // Query token of position p: the sequence's first token plus its offset from q_start.
    let start = a.q_start(i, h);
    let first_token = a.tokens(i).start + p0 - start;
    // Keys up to the tile's last query (causal, masked per row past each row's own position),
    // or every held entry (one-shot decode: the diagonal sits past the last entry).
    let key_end = a.visible_end(i, h, p1 - 1 - start);
    tile.start(if a.causal() { p0 } else { key_end }, g, call.c);
    for r in 0..p1 - p0 {
        let (b, t) = a.q_row(first_token + r);
        for j in 0..g {
            tile.query::<S, E>(r * g + j, call.q.row(b, t, h * g + j, dd), call.c, tmp);
        }
    }
    tile.clear((p1 - p0) * g);
    let cache = a.cache();
    let (k, v) = (rows(cache, call.k, i, h), rows(cache, call.v, i, h));
    // Long pages (a one-shot call's whole sequence is one) are streams the hardware prefetcher
    // follows; software prefetches there only cost issue slots (dense f32 8K: 0.94× with them).
    let ahead = if cache.layout().page_size >= LONG_PAGE { 0 } else { T::PREFETCH_AHEAD };
    let own_from = match a.blocks(i).map(|(bl, row)| (bl, bl.segment(row, h, p0 / bl.dims.segment_size))) {
        Some((bl, SegmentAttention::Sparse(list))) => {
            let bk = bl.dims.block_size;
            for &blk in list {
                // K and V share the layout: one walk gives both rows' offsets.
                for (t, o) in k.walk_prefetched_with(v.data, blk as usize * bk..(blk as usize + 1) * bk, dd, ahead) {
                    tile.push::<S, E, NR, MV>(k.at(o, dd), v.at(o, dd), t);
                }
            }
            p0 / bl.dims.segment_size * bl.dims.segment_size
        }
        _ => 0,
    };
    for (t, o) in k.walk_prefetched_with(v.data, own_from..key_end, dd, ahead) {
        tile.push::<S, E, NR, MV>(k.at(o, dd), v.at(o, dd), t);
    }
    tile.finish::<S, NR, MV>();
    for r in 0..p1 - p0 {
        let token = first_token + r;
        let (b, t) = a.q_row(token);
        for j in 0..g {
            let hq = h * g + j;
            let o = b * call.os[0] + t * call.os[1] + hq * call.os[2];
            // SAFETY: items cover disjoint (token, query head) rows of `out` and of `lse`.
            let out = unsafe { std::slice::from_raw_parts_mut(call.out.ptr().add(o), dd) };
            tile.write(r * g + j, out, tmp);
            if let Some(lse) = call.lse {
                unsafe { *lse.ptr().add(a.lse_index(token, hq)) = tile.row_lse(r * g + j) };
            }
        }
    }
}

/// Runs every item on the worker's tile of `tiles`.
fn run_items<E: Element, T: QueryTile + Send>(
    isa: Isa,
    call: &Call<'_, '_, E>,
    items: &[Item],
    tiles: &[Mutex<(T, Vec<f32>)>],
) {
    items.par_iter().for_each(|&item| {
        // Each worker takes its own tile (uncontended); a thread outside the pool shares one.
        let slot = rayon::current_thread_index().unwrap_or(0) % tiles.len();
        let mut guard = tiles[slot].lock().unwrap_or_else(|e| e.into_inner());
        let (tile, tmp) = &mut *guard;
        dispatch(isa, ItemJob { call, item, tile, tmp });
    });
}

/// Runs attention over the cache for validated arguments.
pub(crate) fn attend<E: Element>(
    isa: Isa,
    lanes: usize,
    a: &AttendArgs<'_>,
    out: &mut TensorViewMut<'_>,
    lse: Option<&mut [f32]>,
    ws: &mut Workspace,
) {
    let d = a.dims();
    let os = out.strides();
    let out_ptr = SendPtr(out.typed_mut::<E>().expect("dtype checked by validation").as_mut_ptr());
    let cache = a.cache();
    let call = Call {
        args: a,
        q: Strided::of(&a.q()),
        k: cache.k().typed::<E>().expect("dtype checked by validation"),
        v: cache.v().typed::<E>().expect("dtype checked by validation"),
        c: a.scale() * std::f32::consts::LOG2_E,
        out: out_ptr,
        os,
        lse: lse.map(|l| SendPtr(l.as_mut_ptr())),
    };
    let geom = Geom::new(lanes, d.head_dim, tile_tokens(ROWS_TARGET, d.group()) * d.group());
    let scratch = Scratch::of::<E>(ws, geom);
    if super::engine_split::applies(a) {
        super::engine_split::attend::<E>(isa, a, call.out, os, call.lse, &mut scratch.split);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.bf16_probabilities() && E::DTYPE == crate::DType::BF16 {
        items(a, AMX_ROWS_TARGET, &mut scratch.items);
        let on_amx = isa == Isa::Amx;
        if scratch.amx_tiles.len() != scratch.tiles.len() || scratch.amx_on_amx != on_amx {
            let g = AmxGeom::new(geom.d, tile_tokens(AMX_ROWS_TARGET, d.group()) * d.group());
            scratch.amx_tiles =
                (0..scratch.tiles.len()).map(|_| Mutex::new((AmxTile::new(g, on_amx), vec![0f32; g.d]))).collect();
            scratch.amx_on_amx = on_amx;
        }
        return run_items(isa, &call, &scratch.items, &scratch.amx_tiles);
    }
    items(a, ROWS_TARGET, &mut scratch.items);
    run_items(isa, &call, &scratch.items, &scratch.tiles);
}

//! KV caches as an engine holds them (SPEC §7.3): pages of `page_size` slots, a block table per
//! sequence, and a length per (sequence, head). A contiguous `[n, H, capacity, D]` cache is the
//! special case of one page per sequence.

use std::borrow::Cow;

use crate::error::{Error, Result};
use crate::tensor::{DType, HostData, HostDataMut, TensorView, check_layout, check_output_layout};

/// Where the entries of a K or V page pool live: element `(page, slot, head, d)` sits at
/// `page·strides[0] + slot·strides[1] + head·strides[2] + d` (the head dim is contiguous). vLLM's
/// `[P, page_size, H, D]` and the head-major `[P, H, page_size, D]` are both layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLayout {
    /// Pages in the pool (P).
    pub pages: usize,
    /// Slots (entries) per page.
    pub page_size: usize,
    /// Cache heads (Hkv, or Hq after a `per_query_head` compression).
    pub heads: usize,
    /// Head dim (D).
    pub head_dim: usize,
    /// Element strides of page, slot and head.
    pub strides: [usize; 3],
}

impl PageLayout {
    /// vLLM's layout: contiguous `[pages, page_size, heads, head_dim]`.
    pub fn slot_major(pages: usize, page_size: usize, heads: usize, head_dim: usize) -> Self {
        let strides = [page_size * heads * head_dim, heads * head_dim, head_dim];
        PageLayout { pages, page_size, heads, head_dim, strides }
    }

    /// Contiguous `[pages, heads, page_size, head_dim]`: each head's slots of a page adjacent.
    pub fn head_major(pages: usize, page_size: usize, heads: usize, head_dim: usize) -> Self {
        let strides = [heads * page_size * head_dim, head_dim, page_size * head_dim];
        PageLayout { pages, page_size, heads, head_dim, strides }
    }

    /// Elements a buffer of this layout spans (`None` on overflow).
    pub fn elements(&self) -> Option<usize> {
        crate::tensor::elements(self.shape())
    }

    /// The pool as a rank-4 shape `[P, page_size, H, D]`.
    pub(crate) fn shape(&self) -> [usize; 4] {
        [self.pages, self.page_size, self.heads, self.head_dim]
    }

    pub(crate) fn strides4(&self) -> [usize; 4] {
        [self.strides[0], self.strides[1], self.strides[2], 1]
    }

    /// Element offset of `(page, slot, head, 0)`.
    #[inline(always)]
    pub fn offset(&self, page: usize, slot: usize, head: usize) -> usize {
        page * self.strides[0] + slot * self.strides[1] + head * self.strides[2]
    }
}

/// Each sequence's pages, `[sequences, width]` row-major: entry `n` of sequence `i` lives on page
/// `ids[i·width + n / page_size]`. Entries of a row past the pages the sequence uses are ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockTable<'a> {
    ids: Cow<'a, [u32]>,
    width: usize,
}

impl<'a> BlockTable<'a> {
    /// A table of `ids.len() / width` rows.
    pub fn new(ids: &'a [u32], width: usize) -> Self {
        BlockTable { ids: Cow::Borrowed(ids), width }
    }

    /// One page per sequence: sequence `i` owns page `i`.
    pub fn identity(sequences: usize) -> BlockTable<'static> {
        BlockTable { ids: Cow::Owned((0..sequences as u32).collect()), width: 1 }
    }

    /// Pages per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The ids, row-major.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[i * self.width..(i + 1) * self.width]
    }

    fn reborrow(&self) -> BlockTable<'_> {
        BlockTable { ids: Cow::Borrowed(&self.ids), width: self.width }
    }
}

/// Sizes every cache call shares, checked once per call before any kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheDims {
    /// Sequences (rows of the block table).
    pub sequences: usize,
    /// Cache heads.
    pub heads: usize,
    /// Head dimension, in elements.
    pub head_dim: usize,
    /// Page size, in tokens.
    pub page_size: usize,
    /// Entries a sequence can hold: `width · page_size`.
    pub capacity: usize,
    /// Pages in the pool.
    pub pool_pages: usize,
}

impl CacheDims {
    /// Pages in the pool.
    pub fn pages(&self) -> usize {
        self.pool_pages
    }
}

/// What a cache view is made of, borrowed: the two pools' layout, the table and the lengths.
pub(crate) struct CacheParts<'c> {
    pub layout: &'c PageLayout,
    pub table: &'c BlockTable<'c>,
    pub lens: &'c [u32],
    pub k: (DType, usize),
    pub v: (DType, usize),
}

impl CacheParts<'_> {
    /// Checks the layout against both buffers, the table's shape and page ids, and every length
    /// against the pages its sequence has (SPEC §7.3). `writable`: the pools are written, so no
    /// element may be addressed twice.
    pub(crate) fn check(&self, writable: bool) -> Result<CacheDims> {
        let l = self.layout;
        for (what, v) in [("page_size", l.page_size), ("cache heads", l.heads), ("head dim", l.head_dim)] {
            if v == 0 {
                return Err(Error::ZeroSize { what });
            }
        }
        if self.k.0 != self.v.0 {
            return Err(Error::DTypeMismatch { what: "v cache", expected: self.k.0, got: self.v.0 });
        }
        for (what, len) in [("k cache", self.k.1), ("v cache", self.v.1)] {
            if writable {
                check_output_layout(what, l.shape(), l.strides4(), len)?;
            } else {
                check_layout(what, l.shape(), l.strides4(), len)?;
            }
        }
        let width = self.table.width;
        if width == 0 {
            return Err(Error::ZeroSize { what: "block table width" });
        }
        if !self.table.ids.len().is_multiple_of(width) {
            return Err(Error::Shape {
                what: "block table",
                expected: format!("a multiple of its width {width}"),
                got: vec![self.table.ids.len()],
            });
        }
        let sequences = self.table.ids.len() / width;
        if self.lens.len() != sequences * l.heads {
            return Err(Error::Shape {
                what: "cache lengths",
                expected: format!("[{sequences} sequences, {} heads]", l.heads),
                got: vec![self.lens.len()],
            });
        }
        let capacity =
            width.checked_mul(l.page_size).ok_or_else(|| Error::range("block table width", width, "overflows"))?;
        for i in 0..sequences {
            let held = self.seq_len(i, l.heads);
            if held > capacity {
                let h = (0..l.heads).max_by_key(|&h| self.lens[i * l.heads + h]).unwrap_or(0);
                return Err(Error::CacheLength { batch: i, head: h, length: held, capacity });
            }
            check_pages(i, &self.table.row(i)[..held.div_ceil(l.page_size)], l.pages)?;
        }
        Ok(CacheDims {
            sequences,
            heads: l.heads,
            head_dim: l.head_dim,
            page_size: l.page_size,
            capacity,
            pool_pages: l.pages,
        })
    }

    /// The longest head of sequence `i`.
    fn seq_len(&self, i: usize, heads: usize) -> usize {
        self.lens[i * heads..(i + 1) * heads].iter().copied().max().unwrap_or(0) as usize
    }
}

/// Page ids of sequence `seq` in use must exist.
pub(crate) fn check_pages(seq: usize, ids: &[u32], pages: usize) -> Result<()> {
    match ids.iter().position(|&p| p as usize >= pages) {
        Some(n) => Err(Error::range(
            "block table",
            ids[n],
            format!("sequence {seq}'s page {n} is out of range (the pool has {pages} pages)"),
        )),
        None => Ok(()),
    }
}

/// A read-only KV cache: K and V pools of one layout, a block table, and `[sequences, heads]`
/// lengths.
#[derive(Clone, Debug)]
pub struct KvCache<'a> {
    pub(crate) k: HostData<'a>,
    pub(crate) v: HostData<'a>,
    pub(crate) layout: PageLayout,
    pub(crate) table: BlockTable<'a>,
    pub(crate) lens: &'a [u32],
}

impl<'a> KvCache<'a> {
    /// A paged cache.
    pub fn paged(
        k: impl Into<HostData<'a>>,
        v: impl Into<HostData<'a>>,
        layout: PageLayout,
        table: BlockTable<'a>,
        lens: &'a [u32],
    ) -> Self {
        KvCache { k: k.into(), v: v.into(), layout, table, lens }
    }

    /// A contiguous cache `[sequences, heads, capacity, D]` (any strides over the first three
    /// dims, both views alike): one page per sequence.
    pub fn contiguous(k: TensorView<'a>, v: TensorView<'a>, lens: &'a [u32]) -> Result<Self> {
        let layout = contiguous_layout(k.shape(), k.strides(), v.shape(), v.strides())?;
        Ok(KvCache { k: k.data(), v: v.data(), layout, table: BlockTable::identity(k.shape()[0]), lens })
    }

    /// The page layout.
    pub fn layout(&self) -> &PageLayout {
        &self.layout
    }
    /// The block table.
    pub fn table(&self) -> &BlockTable<'a> {
        &self.table
    }
    /// `[sequences, heads]` entries held.
    pub fn lens(&self) -> &'a [u32] {
        self.lens
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.k.dtype()
    }
    /// The K pool.
    pub fn k(&self) -> HostData<'a> {
        self.k
    }
    /// The V pool.
    pub fn v(&self) -> HostData<'a> {
        self.v
    }

    pub(crate) fn parts(&self) -> CacheParts<'_> {
        CacheParts {
            layout: &self.layout,
            table: &self.table,
            lens: self.lens,
            k: (self.k.dtype(), self.k.len()),
            v: (self.v.dtype(), self.v.len()),
        }
    }

    /// Element offset of entry `n` of (sequence `i`, head `h`) in either pool.
    #[inline(always)]
    pub fn entry_offset(&self, i: usize, h: usize, n: usize) -> usize {
        entry_offset(&self.layout, &self.table, i, h, n)
    }
}

#[inline(always)]
pub(crate) fn entry_offset(layout: &PageLayout, table: &BlockTable<'_>, i: usize, h: usize, n: usize) -> usize {
    let ps = layout.page_size;
    layout.offset(table.ids[i * table.width + n / ps] as usize, n % ps, h)
}

/// A writable KV cache (append and compaction write it): like [`KvCache`], with the lengths
/// updated by the calls.
#[derive(Debug)]
pub struct KvCacheMut<'a> {
    pub(crate) k: HostDataMut<'a>,
    pub(crate) v: HostDataMut<'a>,
    pub(crate) layout: PageLayout,
    pub(crate) table: BlockTable<'a>,
    pub(crate) lens: &'a mut [u32],
}

impl<'a> KvCacheMut<'a> {
    /// A paged cache.
    pub fn paged(
        k: impl Into<HostDataMut<'a>>,
        v: impl Into<HostDataMut<'a>>,
        layout: PageLayout,
        table: BlockTable<'a>,
        lens: &'a mut [u32],
    ) -> Self {
        KvCacheMut { k: k.into(), v: v.into(), layout, table, lens }
    }

    /// A contiguous `[sequences, heads, capacity, D]` cache in row-major buffers: one page per
    /// sequence.
    pub fn contiguous(
        k: impl Into<HostDataMut<'a>>,
        v: impl Into<HostDataMut<'a>>,
        shape: [usize; 4],
        lens: &'a mut [u32],
    ) -> Self {
        let [n, h, cap, d] = shape;
        let layout = PageLayout::head_major(n, cap, h, d);
        KvCacheMut { k: k.into(), v: v.into(), layout, table: BlockTable::identity(n), lens }
    }

    /// The page layout.
    pub fn layout(&self) -> &PageLayout {
        &self.layout
    }
    /// The block table.
    pub fn table(&self) -> &BlockTable<'a> {
        &self.table
    }
    /// Each sequence's length, in tokens.
    pub fn lens(&self) -> &[u32] {
        self.lens
    }

    /// The K and V pools, writable (e.g. to copy a device cache's pools back into them).
    pub fn pools_mut(&mut self) -> (&mut HostDataMut<'a>, &mut HostDataMut<'a>) {
        (&mut self.k, &mut self.v)
    }

    /// The same cache, read-only (for attention and selection).
    pub fn as_cache(&self) -> KvCache<'_> {
        KvCache {
            k: self.k.as_data(),
            v: self.v.as_data(),
            layout: self.layout,
            table: self.table.reborrow(),
            lens: self.lens,
        }
    }

    pub(crate) fn parts(&self) -> CacheParts<'_> {
        CacheParts {
            layout: &self.layout,
            table: &self.table,
            lens: self.lens,
            k: (self.k.dtype(), self.k.len()),
            v: (self.v.dtype(), self.v.len()),
        }
    }
}

/// The page layout of a `[sequences, heads, capacity, D]` view pair (one page per sequence).
fn contiguous_layout(ks: [usize; 4], kst: [usize; 4], vs: [usize; 4], vst: [usize; 4]) -> Result<PageLayout> {
    if ks != vs {
        return Err(Error::Shape { what: "v cache", expected: format!("{ks:?} (like k)"), got: vs.to_vec() });
    }
    if kst != vst {
        return Err(Error::Layout {
            what: "v cache",
            detail: format!("strides {vst:?} differ from k's {kst:?} (one layout serves both pools)"),
        });
    }
    let [n, h, cap, d] = ks;
    Ok(PageLayout { pages: n, page_size: cap, heads: h, head_dim: d, strides: [kst[0], kst[2], kst[1]] })
}

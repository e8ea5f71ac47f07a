//! An owned paged cache: K and V pools, the block table and the lengths in one value, for tests,
//! benchmarks, tools and engines without an allocator of their own (an engine that manages its
//! memory builds [`KvCache`] / [`KvCacheMut`] views over it instead).

use super::cache::{BlockTable, KvCache, KvCacheMut, PageLayout};
use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor};

/// K and V page pools of one [`PageLayout`], a block table `[sequences, width]` and
/// `[sequences, heads]` lengths (zero: an empty cache).
#[derive(Clone, Debug)]
pub struct PagedCache {
    /// The K pool (its shape is `[pages, page_size, heads, head_dim]` worth of elements; the
    /// layout says where each entry sits).
    pub k: HostTensor,
    /// The V pool.
    pub v: HostTensor,
    /// Where entries sit in the pools.
    pub layout: PageLayout,
    /// The block table, row-major `[sequences, width]`.
    pub ids: Vec<u32>,
    /// Pages per sequence in the table.
    pub width: usize,
    /// `[sequences, heads]` entries held.
    pub lens: Vec<u32>,
}

impl PagedCache {
    /// Pools of `layout` filled with `fill` (NaN makes any read of an unwritten entry visible),
    /// the table `ids` of `ids.len() / width` sequences, every length 0.
    pub fn new(dtype: DType, layout: PageLayout, ids: Vec<u32>, width: usize, fill: f32) -> Result<Self> {
        if width == 0 || !ids.len().is_multiple_of(width) {
            return Err(Error::Shape {
                what: "block table",
                expected: format!("[sequences, {width}] (a whole number of rows)"),
                got: vec![ids.len()],
            });
        }
        let shape = [layout.pages, layout.page_size, layout.heads, layout.head_dim];
        let elements = layout.elements().ok_or(Error::range("page layout", layout.pages, "the pool overflows"))?;
        if elements > shape.iter().product::<usize>() {
            return Err(Error::range("page layout", elements, "strides reach past a dense pool of its sizes"));
        }
        let sequences = ids.len() / width;
        Ok(PagedCache {
            k: HostTensor::full(dtype, shape, fill),
            v: HostTensor::full(dtype, shape, fill),
            layout,
            ids,
            width,
            lens: vec![0; sequences * layout.heads],
        })
    }

    /// `sequences` rows of `width` pages each, interleaved as an engine allocating pages on demand
    /// leaves them (sequence `i`'s page `p` is page `p·sequences + i`).
    pub fn interleaved(dtype: DType, layout: PageLayout, sequences: usize, width: usize) -> Result<Self> {
        if layout.pages < sequences * width {
            return Err(Error::range("page layout", layout.pages, format!("{sequences} × {width} pages needed")));
        }
        let ids = (0..sequences).flat_map(|i| (0..width).map(move |p| (p * sequences + i) as u32)).collect();
        Self::new(dtype, layout, ids, width, 0.0)
    }

    /// The block table.
    pub fn table(&self) -> BlockTable<'_> {
        BlockTable::new(&self.ids, self.width)
    }

    /// The cache, read-only.
    pub fn cache(&self) -> KvCache<'_> {
        KvCache::paged(self.k.data(), self.v.data(), self.layout, self.table(), &self.lens)
    }

    /// The cache, writable (append, compaction).
    pub fn cache_mut(&mut self) -> KvCacheMut<'_> {
        let table = BlockTable::new(&self.ids, self.width);
        KvCacheMut::paged(self.k.data_mut(), self.v.data_mut(), self.layout, table, &mut self.lens)
    }
}

//! An owned paged cache: K and V pools, the block table and the lengths in one value, for tests,
//! benchmarks, tools and engines without an allocator of their own (an engine that manages its
//! memory builds [`KvCache`] / [`KvCacheMut`] views over it instead).

use super::cache::{BlockTable, KvCache, KvCacheMut, PageLayout};
use crate::error::{Error, Result};
use crate::tensor::{DType, HostBuffer, HostTensor};

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
            k: pool(dtype, shape, fill),
            v: pool(dtype, shape, fill),
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

/// A pool filled with `fill`, on transparent huge pages where Linux grants them: a head's rows
/// are spread over the whole pool (1 KB apart on slot-major pages), so with 4 KB pages a scan
/// of one head misses the TLB every few rows (what engines' own large allocations avoid too).
fn pool(dtype: DType, shape: [usize; 4], fill: f32) -> HostTensor {
    let n = shape.iter().product();
    let data = match dtype {
        DType::F32 => HostBuffer::F32(advised(n, fill)),
        DType::F16 => HostBuffer::F16(advised(n, half::f16::from_f32(fill))),
        DType::BF16 => HostBuffer::BF16(advised(n, half::bf16::from_f32(fill))),
    };
    HostTensor { data, shape }
}

/// `n` copies of `fill` in memory advised for huge pages before its first touch.
fn advised<T: Copy>(n: usize, fill: T) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let p = v.as_mut_ptr() as usize;
        let (start, end) = (p.next_multiple_of(HUGE), (p + n * std::mem::size_of::<T>()) / HUGE * HUGE);
        if end > start {
            // SAFETY: advice on whole pages of our own allocation; it changes no contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    v.resize(n, fill);
    v
}

//! `append` (SPEC §7.4): new K/V rows written at each head's length, lengths incremented. A copy
//! with no arithmetic, shared by every backend whose cache is in host memory.

use super::Workspace;
use super::args::ragged_offsets;
use super::cache::{CacheDims, CacheParts, KvCacheMut, entry_offset};
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, Layout, TensorView};
use half::{bf16, f16};

/// Appends sequence `i`'s rows `k_new[cu[i]..cu[i+1]]` (THD `[1, T, Hkv, D]`, likewise `v_new`)
/// to every head of the cache. A cache with `Hc = r·Hkv` heads (a `per_query_head` compression)
/// receives kv head `h`'s row in heads `h·r..(h+1)·r`. Everything is checked before the first
/// write: lengths within the sequence's pages, no page written by two sequences or read by one
/// sequence while another writes it (SPEC §7.3).
pub fn append(
    k_new: TensorView<'_>,
    v_new: TensorView<'_>,
    cu: &[u32],
    cache: &mut KvCacheMut<'_>,
    ws: &mut Workspace,
) -> Result<()> {
    append_with(k_new, v_new, cu, cache, ws, |k_new, v_new, cu, cache| {
        copy_rows_on_host(k_new, v_new, cu, cache);
        Ok(())
    })
}

/// [`append`] with the rows copied by `rows` (a backend's kernel) once every check passed; the
/// lengths advance only when it succeeds.
pub(crate) fn append_with(
    k_new: TensorView<'_>,
    v_new: TensorView<'_>,
    cu: &[u32],
    cache: &mut KvCacheMut<'_>,
    ws: &mut Workspace,
    rows: impl FnOnce(&TensorView<'_>, &TensorView<'_>, &[u32], &mut KvCacheMut<'_>) -> Result<()>,
) -> Result<()> {
    let c = check(&k_new, &v_new, cu, &cache.parts(), ws)?;
    rows(&k_new, &v_new, cu, cache)?;
    advance(cache.lens, cu, c.heads);
    Ok(())
}

/// Each sequence's lengths (`[sequences, heads]`) after an append of `cu`'s rows.
pub(crate) fn advance(lens: &mut [u32], cu: &[u32], heads: usize) {
    for (i, row) in lens.chunks_mut(heads).enumerate() {
        let n = cu[i + 1] - cu[i];
        row.iter_mut().for_each(|l| *l += n);
    }
}

/// The checks of [`append`] on any data (host views, or device views with host mirrors of the
/// cache's table and lengths), before anything is written.
pub(crate) fn check(
    k_new: &dyn Layout,
    v_new: &dyn Layout,
    cu: &[u32],
    cache: &CacheParts<'_>,
    ws: &mut Workspace,
) -> Result<CacheDims> {
    let c = cache.check(true)?;
    for (what, v) in [("k_new", k_new), ("v_new", v_new)] {
        v.check_layout(what)?;
        let [one, _, h, d] = v.shape();
        if one != 1 || h == 0 || d != c.head_dim || c.heads % h != 0 {
            return Err(Error::Shape {
                what,
                expected: format!("[1, T, Hkv, {}] with Hkv dividing the cache's {} heads", c.head_dim, c.heads),
                got: v.shape().to_vec(),
            });
        }
        if v.dtype() != cache.k.0 {
            return Err(Error::DTypeMismatch { what, expected: cache.k.0, got: v.dtype() });
        }
    }
    if v_new.shape() != k_new.shape() {
        return Err(Error::Shape {
            what: "v_new",
            expected: format!("{:?} (like k_new)", k_new.shape()),
            got: v_new.shape().to_vec(),
        });
    }
    let t = k_new.shape()[1];
    ragged_offsets(cu, c.sequences, t)?;
    let ps = c.page_size;
    // Lengths after the call, and the pages each sequence writes.
    let new_len = |i: usize, h: usize| cache.lens[i * c.heads + h] as usize + (cu[i + 1] - cu[i]) as usize;
    for i in 0..c.sequences {
        for h in 0..c.heads {
            let len = new_len(i, h);
            if len > c.capacity {
                return Err(Error::CacheLength { batch: i, head: h, length: len, capacity: c.capacity });
            }
        }
        let longest = (0..c.heads).map(|h| new_len(i, h)).max().unwrap_or(0);
        super::cache::check_pages(i, &cache.table.row(i)[..longest.div_ceil(ps)], c.pages())?;
    }
    let generation = ws.next_generation(c.pages())?;
    let written = |i: usize| {
        let lens = &cache.lens[i * c.heads..(i + 1) * c.heads];
        let first = lens.iter().copied().min().unwrap_or(0) as usize / ps;
        let end = (0..c.heads).map(|h| new_len(i, h)).max().unwrap_or(0).div_ceil(ps);
        if cu[i + 1] == cu[i] { 0..0 } else { first..end }
    };
    for i in 0..c.sequences {
        for n in written(i) {
            let page = cache.table.row(i)[n] as usize;
            let owner = &mut ws.page_owner[page];
            if owner.0 == generation {
                return Err(Error::range(
                    "block table",
                    page,
                    format!("page {page} is written by sequence {} and sequence {i} (or twice by one)", owner.1),
                ));
            }
            *owner = (generation, i as u32);
        }
    }
    for i in 0..c.sequences {
        let longest = (0..c.heads).map(|h| new_len(i, h)).max().unwrap_or(0);
        for &page in &cache.table.row(i)[..longest.div_ceil(ps)] {
            let owner = ws.page_owner[page as usize];
            if owner.0 == generation && owner.1 as usize != i {
                return Err(Error::range(
                    "block table",
                    page,
                    format!("sequence {i} reads page {page}, which sequence {} writes in this call", owner.1),
                ));
            }
        }
    }
    Ok(c)
}

/// Each sequence's new rows into its cache heads at their lengths, on the host.
pub(crate) fn copy_rows_on_host(
    k_new: &TensorView<'_>,
    v_new: &TensorView<'_>,
    cu: &[u32],
    cache: &mut KvCacheMut<'_>,
) {
    let rep = cache.layout.heads / k_new.shape()[2];
    match k_new.dtype() {
        DType::F32 => copy_rows::<f32>(k_new, v_new, cu, cache, rep),
        DType::F16 => copy_rows::<f16>(k_new, v_new, cu, cache, rep),
        DType::BF16 => copy_rows::<bf16>(k_new, v_new, cu, cache, rep),
    }
}

fn copy_rows<E: Element>(
    k_new: &TensorView<'_>,
    v_new: &TensorView<'_>,
    cu: &[u32],
    cache: &mut KvCacheMut<'_>,
    rep: usize,
) {
    let (layout, heads) = (cache.layout, cache.layout.heads);
    let d = layout.head_dim;
    for (src, pool) in [(k_new, &mut cache.k), (v_new, &mut cache.v)] {
        let data = src.typed::<E>().expect("dtype checked");
        let dst = pool.typed_mut::<E>().expect("dtype checked");
        for i in 0..cu.len() - 1 {
            for (j, t) in (cu[i] as usize..cu[i + 1] as usize).enumerate() {
                for hc in 0..heads {
                    let s = src.offset(0, t, hc / rep);
                    let n = cache.lens[i * heads + hc] as usize + j;
                    let o = entry_offset(&layout, &cache.table, i, hc, n);
                    dst[o..o + d].copy_from_slice(&data[s..s + d]);
                }
            }
        }
    }
}

//! Dense and block-sparse causal prefill on the CPU: one work item per (batch, kv head, query
//! tile); the G query heads of a group are stacked as rows of one tile so K/V rows are read once
//! per group; selected blocks are read in place (no gathered copy); no L×L buffer.

use rayon::prelude::*;

use super::simd::{Isa, Simd, WithSimd, dispatch};
use super::tile::{Geom, ROWS_TARGET, Tile};
use super::{SendPtr, Strided};
use crate::plan::{BlockLists, SegmentAttention};
use crate::tensor::{Element, TensorViewMut};
use crate::validate::{AttentionArgs, AttnDims};

/// One query tile: tokens `t0..t1` of (b, kv head h), inside segment `seg`.
#[derive(Clone, Copy, Debug)]
struct Item {
    b: usize,
    h: usize,
    seg: usize,
    t0: usize,
    t1: usize,
    /// Keys attended (for scheduling the biggest first).
    cost: usize,
}

struct Call<'a, E> {
    q: Strided<'a, E>,
    k: Strided<'a, E>,
    v: Strided<'a, E>,
    dims: AttnDims,
    /// Softmax scale times log2(e): scores are kept in base 2.
    c: f32,
    blocks: Option<&'a BlockLists>,
    out: SendPtr<E>,
    os: [usize; 4],
    lse: Option<SendPtr<f32>>,
}

/// Tokens per query tile: the group's rows stacked up to about `ROWS_TARGET`.
fn tile_tokens(g: usize) -> usize {
    (ROWS_TARGET / g).max(1)
}

fn items(d: &AttnDims, blocks: Option<&BlockLists>) -> Vec<Item> {
    let tq = tile_tokens(d.group());
    let mut out = Vec::new();
    for b in 0..d.batch {
        for h in 0..d.kv_heads {
            // Tiles never straddle a segment: each segment has its own key set.
            let (seg_len, nseg) = match blocks {
                Some(bl) => (bl.dims.segment_size, bl.dims.segments),
                None => (d.seq_len, 1),
            };
            for s in 0..nseg {
                let (s0, s1) = (s * seg_len, ((s + 1) * seg_len).min(d.seq_len));
                let before = match blocks.map(|bl| bl.segment(b, h, s)) {
                    Some(SegmentAttention::Sparse(list)) => list.len() * blocks.unwrap().dims.block_size,
                    _ => s0,
                };
                for t0 in (s0..s1).step_by(tq) {
                    let t1 = (t0 + tq).min(s1);
                    out.push(Item { b, h, seg: s, t0, t1, cost: before + t1 - s0 });
                }
            }
        }
    }
    // Largest first, so the last items to finish are short ones.
    out.sort_by_key(|i| std::cmp::Reverse(i.cost));
    out
}

struct ItemJob<'a, 'c, E> {
    call: &'c Call<'a, E>,
    item: Item,
    tile: &'c mut Tile,
    tmp: &'c mut Vec<f32>,
}

impl<E: Element> WithSimd for ItemJob<'_, '_, E> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self) {
        if S::LANES >= 16 { run_item::<S, E, 8, 3>(self) } else { run_item::<S, E, 4, 3>(self) }
    }
}

#[inline(always)]
fn run_item<S: Simd, E: Element, const NR: usize, const MV: usize>(job: ItemJob<'_, '_, E>) {
    let ItemJob { call, item, tile, tmp } = job;
    let Item { b, h, seg, t0, t1, .. } = item;
    let d = call.dims;
    let (g, dd) = (d.group(), d.head_dim);
    tile.begin(t0, g);
    let rows = (t1 - t0) * g;
    for i in 0..t1 - t0 {
        for j in 0..g {
            tile.set_query(i * g + j, call.q.row(b, t0 + i, h * g + j, dd), call.c, tmp);
        }
    }
    tile.clear_queries(rows);
    let (k, v) = (call.k.rows(b, h, 1), call.v.rows(b, h, 1));
    let seg_start = match call.blocks.map(|bl| (bl, bl.segment(b, h, seg))) {
        Some((bl, SegmentAttention::Sparse(list))) => {
            let bk = bl.dims.block_size;
            for &blk in list {
                for t in blk as usize * bk..(blk as usize + 1) * bk {
                    tile.push::<S, E, NR, MV>(&k, &v, t);
                }
            }
            seg * bl.dims.segment_size
        }
        _ => 0,
    };
    // Earlier keys of the tile's own span, then the causal diagonal (masked in `score`).
    for t in seg_start..t1 {
        tile.push::<S, E, NR, MV>(&k, &v, t);
    }
    tile.flush::<S, NR, MV>();
    for i in 0..t1 - t0 {
        for j in 0..g {
            let r = i * g + j;
            let hq = h * g + j;
            let o = b * call.os[0] + (t0 + i) * call.os[1] + hq * call.os[2];
            // SAFETY: items cover disjoint (b, token, head) rows of `out` and of `lse`.
            let out = unsafe { std::slice::from_raw_parts_mut(call.out.ptr().add(o), dd) };
            tile.write_row(r, out, tmp);
            if let Some(lse) = call.lse {
                unsafe { *lse.ptr().add((b * d.q_heads + hq) * d.seq_len + t0 + i) = tile.lse(r) };
            }
        }
    }
}

/// Runs prefill attention for validated arguments.
pub(crate) fn prefill<E: Element>(
    isa: Isa,
    lanes: usize,
    a: &AttentionArgs<'_>,
    out: &mut TensorViewMut<'_>,
    lse: Option<&mut [f32]>,
) {
    let d = a.dims();
    let os = out.strides();
    let out_ptr = SendPtr(out.typed_mut::<E>().expect("dtype checked by validation").as_mut_ptr());
    let call = Call {
        q: Strided::of(&a.q()),
        k: Strided::of(&a.k()),
        v: Strided::of(&a.v()),
        dims: d,
        c: a.scale() * std::f32::consts::LOG2_E,
        blocks: a.blocks(),
        out: out_ptr,
        os,
        lse: lse.map(|l| SendPtr(l.as_mut_ptr())),
    };
    let geom = Geom::new(lanes, d.head_dim, tile_tokens(d.group()) * d.group());
    items(&d, a.blocks()).par_iter().for_each_init(
        || (Tile::new::<E>(geom), vec![0f32; d.head_dim]),
        |(tile, tmp), &item| dispatch(isa, ItemJob { call: &call, item, tile, tmp }),
    );
}

//! The device backends' work items for attention over a paged cache (SPEC §7.4,
//! `cuda/attend.cu`, `ascend/kernels/attend.cpp`): the host cuts a validated call into tiles —
//! query rows of one sequence and cache head, never straddling a segment of a planned sequence —
//! with each tile's visible keys worked out from the lengths, and gathers the sequences' block
//! plans into one set of unit lists; the kernels read K and V through the block table.

use super::AttendShape;
use crate::ffi::{EK_ATTEND_NO_UNIT, EkAttendTile};
use crate::plan::SegmentAttention;

/// A device's share of one call: its tiles and the block lists their units index.
#[derive(Debug, Default)]
pub(crate) struct AttendWork {
    pub tiles: Vec<EkAttendTile>,
    /// Per unit: first block in `indices`.
    pub offsets: Vec<u32>,
    /// Per unit: its blocks.
    pub counts: Vec<u32>,
    pub indices: Vec<u32>,
    /// The most keys a tile reads.
    pub max_keys: usize,
}

/// Query tokens and query heads per tile for a group of `g` query heads and tiles of at most
/// `rows` rows: a whole group per token where it fits, else `rows` heads of it.
pub(crate) fn tile_shape(g: usize, rows: usize) -> (usize, usize) {
    let heads = g.min(rows);
    ((rows / heads).max(1), heads)
}

/// The tiles of a validated call for tiles of at most `rows` query rows.
pub(crate) fn work(a: &AttendShape<'_>, rows: usize) -> AttendWork {
    let d = a.dims();
    let g = d.group();
    let (tq, nh) = tile_shape(g, rows);
    let mut w = AttendWork::default();
    for i in 0..d.sequences {
        let q_len = a.tokens(i).len();
        for h in 0..d.cache_heads {
            let start = a.q_start(i, h);
            // The unit of the last planned segment seen: its tiles share one copy of its list.
            let mut unit: Option<(usize, u32)> = None;
            let mut p0 = start;
            while p0 < start + q_len {
                let plan = a.blocks(i);
                let seg_end = plan.map_or(usize::MAX, |(bl, _)| (p0 / bl.dims.segment_size + 1) * bl.dims.segment_size);
                let p1 = (p0 + tq).min(start + q_len).min(seg_end);
                let own_end = a.visible_end(i, h, p1 - 1 - start);
                let (own_from, unit_id, block_size) = match plan {
                    Some((bl, row)) => {
                        let seg = p0 / bl.dims.segment_size;
                        match bl.segment(row, h, seg) {
                            SegmentAttention::Sparse(list) => {
                                let id = match unit {
                                    Some((s, id)) if s == seg => id,
                                    _ => {
                                        let id = w.counts.len() as u32;
                                        w.offsets.push(w.indices.len() as u32);
                                        w.counts.push(list.len() as u32);
                                        w.indices.extend_from_slice(list);
                                        unit = Some((seg, id));
                                        id
                                    }
                                };
                                (seg * bl.dims.segment_size, id, bl.dims.block_size)
                            }
                            SegmentAttention::Dense => (0, EK_ATTEND_NO_UNIT, 1),
                        }
                    }
                    None => (0, EK_ATTEND_NO_UNIT, 1),
                };
                let listed = if unit_id == EK_ATTEND_NO_UNIT { 0 } else { w.counts[unit_id as usize] as usize };
                w.max_keys = w.max_keys.max(listed * block_size + own_end - own_from);
                for j0 in (0..g).step_by(nh) {
                    w.tiles.push(EkAttendTile {
                        seq: i as u32,
                        head: h as u32,
                        token: (a.tokens(i).start + p0 - start) as u32,
                        tokens: (p1 - p0) as u32,
                        q_head: j0 as u32,
                        q_heads: nh.min(g - j0) as u32,
                        pos: p0 as u32,
                        causal: a.causal() as u32,
                        own_from: own_from as u32,
                        own_end: own_end as u32,
                        unit: unit_id,
                        block_size: block_size as u32,
                    });
                }
                p0 = p1;
            }
        }
    }
    w
}

impl AttendWork {
    /// The tiles as the bytes a kernel reads (`EkAttendTile` is twelve `u32`, no padding).
    #[cfg(any(feature = "ascend", feature = "ascend-emu"))]
    pub fn tile_bytes(&self) -> &[u8] {
        // SAFETY: `#[repr(C)]` of twelve u32 fields (size 48, asserted by the generated
        // bindings): every byte is initialised, alignment of u8 is 1.
        unsafe { std::slice::from_raw_parts(self.tiles.as_ptr() as *const u8, std::mem::size_of_val(&self.tiles[..])) }
    }
}

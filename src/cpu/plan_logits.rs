//! The planning logits (SPEC §2.2) of a group of units that share key tiles: per query row
//! (one unit's query head) and block, `numerics::dot(qmax + qmin, kmax)` and `(…, kmin)` bit for
//! bit, on a register-blocked micro-kernel — for f32 inputs. For 16-bit inputs the dot products
//! are `numerics::dot32` ([`row_dots32`]: one f32 fused multiply-add per dim in dim order, a dim's
//! sixteen keys of two tiles in two vectors, 12 query rows broadcast against them).
//!
//! `dot`'s order fixes each product's lane (`i = dim % 8`) and adds a lane's products in dim order,
//! but leaves the lanes independent: the kernel runs lane by lane, so the eight keys of a tile sit
//! in a vector's lanes, one key vector serves `ROWS` query rows, and each lane's partial sum is
//! added onto the total in lane order as `dot` does — no horizontal sums, no transposes.
//!
//! `dot` rounds each product, then each sum. Where every product is exact — a row's and a key's
//! significant bits together fit f64's 53, as they do for 16-bit inputs — a fused multiply-add
//! rounds exactly the same sum once: the same bits from one instruction instead of two.

use super::simd::Simd;
use super::simd_f64::{F64x8, MAX_ROWS};
use crate::alloc;
use crate::error::Result;
use crate::numerics::LogitPrecision;
use crate::plan::PlanDims;

/// Keys per logit tile: one 512-bit vector of f64 lanes (the logits of eight blocks at once).
/// Tiles hold the keys as f32 — every representative is an f32 input value, exactly — half the
/// bytes to write and to stream; the kernel widens a key vector as it loads it.
pub(super) const TILE_KEYS: usize = 8;
/// `dot`'s partial sums: products of dims `i, i + 8, i + 16, …` go to lane `i`.
const DOT_LANES: usize = 8;
/// Per row, its dots with the eight keys' max and min representatives.
pub(super) type RowDots = [[f64; TILE_KEYS]; 2];

/// Where dim `x` of a `D`-dim row sits in a tile or a packed row chunk: lane-major (`dot`'s lane
/// `x % 8` first, then `x / 8`) over the whole chunks of eight, so that the kernel's lane-by-lane
/// pass reads memory in order (the prefetchers follow it); the tail dims in place.
#[inline(always)]
pub(super) fn dim_slot(x: usize, dd: usize) -> usize {
    let whole = dd / DOT_LANES * DOT_LANES;
    if x < whole { x % DOT_LANES * (whole / DOT_LANES) + x / DOT_LANES } else { x }
}

/// The key representatives as the micro-kernel's tiles, and the OR of their values' bits (a
/// bound on their significant bits: [`significant_bits`]).
pub(super) struct KeyTiles {
    /// `[B][N / TILE_KEYS][Hkv][2][D][TILE_KEYS]` (dims in [`dim_slot`] order), blocks past N
    /// zero: a tile is contiguous, and a query row meets its eight keys lane-wise; the heads of
    /// a tile side by side, as the keys' tokens are in K.
    pub data: Vec<f32>,
    pub bits_or: u64,
    kv_heads: usize,
    tiles: usize,
    tile_len: usize,
}

impl KeyTiles {
    /// Tiles for `d`'s blocks, filled in parallel: `fill(b, t, tiles)` writes tile `t` of every
    /// kv head of sequence `b` (`[Hkv][tile]`, all of it: the slice is a worker's scratch, reused
    /// from tile to tile) and returns the OR of the bits it wrote. The tiles are copied from the
    /// scratch into memory nobody zeroes first: a zeroed buffer of this size (32 MiB at 128K
    /// tokens, 2 kv heads, D 128) is a serial memset of ~3.6 ms when the allocator reuses memory.
    pub fn build(d: &PlanDims, dd: usize, fill: impl Fn(usize, usize, &mut [f32]) -> u64 + Sync) -> Result<Self> {
        use rayon::prelude::*;
        let (kv_heads, tiles, tile_len) = (d.kv_heads, d.blocks.div_ceil(TILE_KEYS), 2 * dd * TILE_KEYS);
        let what = "the key representative tiles";
        let len = alloc::count(what, &[d.batch, tiles, kv_heads, tile_len])?;
        let mut data = alloc::with_capacity::<f32>(what, len)?;
        let chunk = (kv_heads * tile_len).max(1);
        let bits_or = data.spare_capacity_mut()[..len]
            .par_chunks_mut(chunk)
            .enumerate()
            .map_init(
                || vec![0f32; chunk],
                |scratch, (bt, out)| {
                    let or = fill(bt / tiles, bt % tiles, scratch);
                    for (o, &x) in out.iter_mut().zip(scratch.iter()) {
                        o.write(x);
                    }
                    or
                },
            )
            .reduce(|| 0, |a, b| a | b);
        // SAFETY: the chunks cover the first `len` values, and every value of each chunk was
        // written above (`scratch` is `chunk` long, no chunk is longer).
        unsafe { data.set_len(len) };
        Ok(KeyTiles { data, bits_or, kv_heads, tiles, tile_len })
    }

    /// Tiles per sequence and kv head.
    pub fn tiles(&self) -> usize {
        self.tiles
    }

    /// Tile `t` of sequence `b`, kv head `h`.
    pub fn tile(&self, b: usize, h: usize, t: usize) -> &[f32] {
        &self.data[((b * self.tiles + t) * self.kv_heads + h) * self.tile_len..][..self.tile_len]
    }
}

/// Where a tile holds the eight keys of dim `x` of its max (`m = 0`) or min (`m = 1`)
/// representatives: for f64 logits `[2][D][TILE_KEYS]`, dims in [`dim_slot`] order; for f32
/// logits `[D][2][TILE_KEYS]`, dims in order, so that a dim's sixteen keys are one 512-bit vector
/// of [`row_dots32`], which runs `dot32`'s chain in dim order.
#[inline(always)]
pub(super) fn key_slot(precision: LogitPrecision, m: usize, x: usize, dd: usize) -> usize {
    match precision {
        LogitPrecision::F64 => (m * dd + dim_slot(x, dd)) * TILE_KEYS,
        LogitPrecision::F32 => (x * 2 + m) * TILE_KEYS,
    }
}

/// The key representatives `[B][N][Hkv][2][D]` as [`KeyTiles`] for logits in `precision`.
pub(super) fn key_tiles(d: &PlanDims, dd: usize, krep: &[f64], precision: LogitPrecision) -> Result<KeyTiles> {
    let (n, hkv) = (d.blocks, d.kv_heads);
    let complete = krep.len() >= d.batch * n * hkv * 2 * dd; // else no candidate block: never read
    let per_block = hkv * 2 * dd;
    KeyTiles::build(d, dd, |b, t, heads| {
        let blocks = t * TILE_KEYS..n.min((t + 1) * TILE_KEYS);
        let reps = |len| &krep[(b * n + blocks.start) * per_block..][..len * per_block];
        heads.fill(0.0); // blocks past N, and every block when there is no candidate
        if complete { fill_tiles(reps(blocks.len()), hkv, dd, heads, precision) } else { 0 }
    })
}

/// Tile t of every kv head (`heads`, `[Hkv][tile]`, zeroed by the caller, each tile laid out by
/// [`key_slot`] for `precision`) from its blocks' representatives `reps` (`[blocks ≤
/// TILE_KEYS][Hkv][2][D]`, max then min; missing keys stay zero; each an f32 value, so narrowing
/// is exact); returns the OR of their f64 bits. A key vector at a time, not a scattered element
/// per block.
pub(crate) fn fill_tiles(reps: &[f64], hkv: usize, dd: usize, heads: &mut [f32], precision: LogitPrecision) -> u64 {
    let per_block = hkv * 2 * dd;
    let blocks = reps.len() / per_block.max(1);
    assert!(blocks <= TILE_KEYS && reps.len() == blocks * per_block, "a tile's blocks");
    assert_eq!(heads.len(), per_block * TILE_KEYS, "a tile per kv head");
    let mut or = 0;
    for (hm, tile) in (0..2 * hkv).map(|hm| (hm, hm / 2 * 2 * dd * TILE_KEYS)) {
        // hm = 2h + m: head h's max (m = 0) or min (m = 1) representatives
        for x in 0..dd {
            let key = &mut heads[tile + key_slot(precision, hm % 2, x, dd)..][..blocks];
            for (l, v) in key.iter_mut().enumerate() {
                let rep = reps[l * per_block + hm * dd + x];
                *v = rep as f32;
                debug_assert!(f64::from(*v).to_bits() == rep.to_bits() || rep.is_nan(), "an f32 value");
                or |= rep.to_bits();
            }
        }
    }
    or
}

/// A bound on the significant bits of every f64 whose bits were OR-ed into `or`: 53 less the
/// trailing zeros every significand shares (0 when every value is ±0).
pub(super) fn significant_bits(or: u64) -> u32 {
    const FRACTION: u64 = (1 << 52) - 1;
    if or << 1 == 0 { 0 } else { 53 - (or & FRACTION).trailing_zeros().min(52) }
}

/// Whether every product of a row value and a key value is exact in f64, so that a fused
/// multiply-add rounds as `dot`'s multiply then add: their significands fit 53 bits together.
/// (Representatives are values of f32 inputs — rows sums of two — so no product leaves f64's
/// normal range.)
pub(super) fn products_exact(rows_or: u64, keys_or: u64) -> bool {
    significant_bits(rows_or) + significant_bits(keys_or) <= 53
}

/// `rows` (all of one length D) into `data` as a micro-kernel reads them: chunks of `per_call`
/// rows, each `[D][per_call]` with dim `x` at slot `slot(x, D)`, the last chunk padded with zero
/// rows; `data` is reused.
fn pack_chunks<T: Copy + Default>(
    data: &mut Vec<T>,
    rows: &[&[T]],
    per_call: usize,
    slot: impl Fn(usize, usize) -> usize,
) {
    let dd = rows.first().map_or(0, |r| r.len());
    data.clear();
    data.resize(rows.len().div_ceil(per_call) * dd * per_call, T::default());
    for (chunk, out) in rows.chunks(per_call).zip(data.chunks_mut(dd * per_call)) {
        for (r, row) in chunk.iter().enumerate() {
            for (x, &v) in row.iter().enumerate() {
                out[slot(x, dd) * per_call + r] = v;
            }
        }
    }
}

/// Query rows `[R][D]` as the micro-kernel reads them: chunks of `V::ROWS` rows, each
/// `[D][ROWS]` (a dim's values of the chunk's rows side by side, so the kernel reaches every row
/// from one pointer; dims in [`dim_slot`] order), the last chunk padded with zero rows; and the
/// OR of the rows' bits, which decides with the keys' whether products may be fused.
#[derive(Default)]
pub(super) struct PackedRows {
    data: Vec<f64>,
    bits_or: u64,
}

impl PackedRows {
    /// Packs `rows` (all of one length) in chunks of `per_call`, reusing the buffer.
    pub fn pack(&mut self, rows: &[&[f64]], per_call: usize) {
        pack_chunks(&mut self.data, rows, per_call, dim_slot);
        self.bits_or = rows.iter().flat_map(|r| r.iter()).fold(0, |or, v| or | v.to_bits());
    }

    /// Every packed row's dots with the eight keys of `tile` (one of `keys`' tiles) into `out`,
    /// one [`RowDots`] per packed row (padding included), bit for bit `numerics::dot`: fused
    /// where [`products_exact`]. Inlined, as the kernel: compiled in the caller's ISA entry point.
    #[inline(always)]
    pub fn tile_dots<V: F64x8>(&self, keys: &KeyTiles, tile: &[f32], out: &mut [RowDots]) {
        let dd = tile.len() / (2 * TILE_KEYS);
        let per_call = dd * V::ROWS;
        let fused = products_exact(self.bits_or, keys.bits_or);
        for (rows, out) in self.data.chunks(per_call.max(1)).zip(out.chunks_mut(V::ROWS)) {
            if fused {
                row_dots::<V, true>(rows, tile, out);
            } else {
                row_dots::<V, false>(rows, tile, out);
            }
        }
    }
}

/// `out[r] = (dot(row_r, kmax_l), dot(row_r, kmin_l))` for the eight keys `l` of `tile`
/// (`[2][D][TILE_KEYS]`) and the `V::ROWS` rows of `rows` (one chunk of [`PackedRows`]), each bit
/// for bit `numerics::dot`: lane `i`'s products added in dim order onto 0, the lanes added 0 to 7
/// onto 0, then the tail (the `D % 8` last dims) in order. `FUSED`: multiply-adds fused — only
/// where [`products_exact`].
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indexed, the accumulators stay in registers (~3% faster measured)
pub(super) fn row_dots<V: F64x8, const FUSED: bool>(rows: &[f64], tile: &[f32], out: &mut [RowDots]) {
    let dd = tile.len() / (2 * TILE_KEYS);
    assert!(out.len() == V::ROWS && V::ROWS <= MAX_ROWS, "one micro-kernel's rows");
    assert!(rows.len() == dd * V::ROWS && tile.len() == 2 * dd * TILE_KEYS, "row and tile lengths");
    let (kmax, kmin) = (tile.as_ptr(), tile[dd * TILE_KEYS..].as_ptr());
    let whole = dd / DOT_LANES * DOT_LANES;
    out.fill([[0f64; TILE_KEYS]; 2]);
    // SAFETY: r < V::ROWS = out.len(); slot < whole ≤ D, and rows holds `[D][ROWS]`, both key
    // halves `[D][TILE_KEYS]` (asserted); the ISA is `dispatch`'s.
    unsafe {
        let per_lane = whole / DOT_LANES;
        for lane in 0..DOT_LANES {
            let mut acc = [[V::zero(); 2]; MAX_ROWS];
            // Dims lane, lane + 8, … in order: slots lane·D/8 … (lane + 1)·D/8 − 1.
            for slot in lane * per_lane..(lane + 1) * per_lane {
                let kx = V::load_f32(kmax.add(slot * TILE_KEYS));
                let kn = V::load_f32(kmin.add(slot * TILE_KEYS));
                let at = rows.as_ptr().add(slot * V::ROWS);
                for r in 0..V::ROWS {
                    let q = V::splat(*at.add(r));
                    if FUSED {
                        acc[r][0] = V::mul_add(q, kx, acc[r][0]);
                        acc[r][1] = V::mul_add(q, kn, acc[r][1]);
                    } else {
                        acc[r][0] = V::add(acc[r][0], V::mul(q, kx));
                        acc[r][1] = V::add(acc[r][1], V::mul(q, kn));
                    }
                }
            }
            for r in 0..V::ROWS {
                for m in 0..2 {
                    let total = out.get_unchecked_mut(r)[m].as_mut_ptr();
                    V::store(total, V::add(V::load(total), acc[r][m]));
                }
            }
        }
    }
    let (kmax, kmin) = tile.split_at(dd * TILE_KEYS);
    let (kmax, kmin) = (kmax.as_chunks::<TILE_KEYS>().0, kmin.as_chunks::<TILE_KEYS>().0);
    for x in whole..dd {
        // dim_slot(x) = x in the tail
        for (r, total) in out.iter_mut().enumerate() {
            let q = rows[x * V::ROWS + r];
            for l in 0..TILE_KEYS {
                total[0][l] += q * f64::from(kmax[x][l]);
                total[1][l] += q * f64::from(kmin[x][l]);
            }
        }
    }
}

/// Keys per [`row_dots32`] call: two tiles' eight blocks, max and min each (`[2][2][TILE_KEYS]`
/// dots per row).
pub(super) const KEYS32: usize = 4 * TILE_KEYS;
/// Accumulators per row of [`row_dots32`] at most (AVX2's eight lanes).
const MAX_VECS32: usize = 4;

/// Query rows per [`row_dots32`] call: 12 rows × 2 vectors = 24 of AVX-512's 32 registers; 3 rows
/// × 4 vectors = 12 of AVX2's 16.
#[inline(always)]
pub(super) const fn rows32<S: Simd>() -> usize {
    if S::LANES >= 16 { 12 } else { 3 }
}

/// Query rows of f32 logits (`numerics::dot32`) as [`row_dots32`] reads them: chunks of
/// `rows32` rows, each `[D][rows]`, dims in order, the last chunk padded with zero rows.
#[derive(Default)]
pub(super) struct PackedRows32 {
    data: Vec<f32>,
}

impl PackedRows32 {
    /// Packs `rows` (f32 values, all of one length) in chunks of `per_call`, reusing the buffer.
    pub fn pack(&mut self, rows: &[&[f32]], per_call: usize) {
        pack_chunks(&mut self.data, rows, per_call, |x, _| x);
    }

    /// Every packed row's dots with the keys of `tiles` (two f32-layout tiles) into `out`
    /// (`[rows, padding included][KEYS32]`), each bit for bit `numerics::dot32`.
    #[inline(always)]
    pub fn tile_dots<S: Simd>(&self, tiles: [&[f32]; 2], out: &mut [[f32; KEYS32]]) {
        let per = rows32::<S>();
        let dd = tiles[0].len() / (2 * TILE_KEYS);
        for (rows, out) in self.data.chunks((dd * per).max(1)).zip(out.chunks_mut(per)) {
            row_dots32::<S>(rows, tiles, out);
        }
    }
}

/// `out[r][(t·2 + m)·8 + l] = dot32(row_r, key l of tile t's max (m = 0) or min (m = 1))` for the
/// `rows32` rows of `rows` (one chunk of [`PackedRows32`], `[D][rows]`) and two tiles
/// (`[D][2][TILE_KEYS]`): `numerics::dot32`'s chain — one fused multiply-add per dim, in dim order,
/// from 0 — in every lane; a dim's row value broadcast against the tiles' sixteen keys each.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indexed, the accumulators stay in registers
pub(super) fn row_dots32<S: Simd>(rows: &[f32], tiles: [&[f32]; 2], out: &mut [[f32; KEYS32]]) {
    let per = rows32::<S>();
    let dd = tiles[0].len() / (2 * TILE_KEYS);
    let tile_vecs = 2 * TILE_KEYS / S::LANES; // vectors of one dim's keys in a tile
    let vecs = 2 * tile_vecs;
    assert!(out.len() == per && vecs <= MAX_VECS32, "one micro-kernel's rows");
    assert!(rows.len() == dd * per && tiles.iter().all(|t| t.len() == 2 * dd * TILE_KEYS), "row and tile lengths");
    // SAFETY: x < D, r < per, v < vecs: every read is inside `rows` (`[D][per]`) and the tiles
    // (`[D][2·TILE_KEYS]`), every store inside `out[r]` (`KEYS32` = vecs·LANES); the ISA is
    // `dispatch`'s.
    unsafe {
        let mut acc = [[S::zero(); MAX_VECS32]; 12];
        for x in 0..dd {
            let mut keys = [S::zero(); MAX_VECS32];
            for v in 0..vecs {
                keys[v] = S::load(tiles[v / tile_vecs].as_ptr().add((x * 2 * TILE_KEYS) + v % tile_vecs * S::LANES));
            }
            let at = rows.as_ptr().add(x * per);
            for r in 0..per {
                let q = S::splat(*at.add(r));
                for v in 0..vecs {
                    acc[r][v] = S::fused(q, keys[v], acc[r][v]);
                }
            }
        }
        for r in 0..per {
            for v in 0..vecs {
                S::store(out[r].as_mut_ptr().add(v * S::LANES), acc[r][v]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics;
    use crate::synth::Rng;

    /// Rows and eight keys' tile, rows `[MAX_ROWS][D]`, keys `[TILE_KEYS][2][D]` (f32 values, as
    /// every representative is).
    struct Case {
        rows: Vec<Vec<f64>>,
        keys: Vec<[Vec<f64>; 2]>,
        tile: Vec<f32>,
    }

    impl Case {
        fn new(dd: usize, mut row: impl FnMut() -> f64, mut key: impl FnMut() -> f64) -> Case {
            let rows: Vec<Vec<f64>> = (0..MAX_ROWS).map(|_| (0..dd).map(|_| row()).collect()).collect();
            let keys: Vec<[Vec<f64>; 2]> =
                (0..TILE_KEYS).map(|_| [(0..dd).map(|_| key()).collect(), (0..dd).map(|_| key()).collect()]).collect();
            let mut tile = vec![0f32; 2 * dd * TILE_KEYS];
            let reps: Vec<f64> = keys.iter().flat_map(|k| k.iter().flatten().copied()).collect();
            fill_tiles(&reps, 1, dd, &mut tile, LogitPrecision::F64);
            Case { rows, keys, tile }
        }

        fn or(values: &[f64]) -> u64 {
            values.iter().fold(0, |or, x| or | x.to_bits())
        }

        fn products_exact(&self) -> bool {
            products_exact(Self::or(&self.rows.concat()), Self::or(&self.keys.concat().concat()))
        }

        /// `row_dots` on this ISA's row count; how many results differ from `numerics::dot`.
        fn mismatches<V: F64x8, const FUSED: bool>(&self) -> usize {
            let mut out = vec![[[f64::NAN; TILE_KEYS]; 2]; V::ROWS];
            let rows: Vec<&[f64]> = self.rows[..V::ROWS].iter().map(|r| &r[..]).collect();
            let mut packed = PackedRows { data: vec![f64::NAN; 3], bits_or: 0 };
            packed.pack(&rows, V::ROWS);
            row_dots::<V, FUSED>(&packed.data, &self.tile, &mut out);
            let mut bad = 0;
            for (r, got) in out.iter().enumerate() {
                for (l, k) in self.keys.iter().enumerate() {
                    for m in 0..2 {
                        bad += usize::from(got[m][l].to_bits() != numerics::dot(&self.rows[r], &k[m]).to_bits());
                    }
                }
            }
            bad
        }

        /// Through [`PackedRows::tile_dots`], which picks the kernel: how many results differ
        /// from `numerics::dot`.
        fn tile_mismatches<V: F64x8>(&self) -> usize {
            let rows: Vec<&[f64]> = self.rows.iter().map(|r| &r[..]).collect();
            let mut packed = PackedRows::default();
            packed.pack(&rows, V::ROWS);
            let dims = PlanDims::new(1, 2 * TILE_KEYS, 1, 1, TILE_KEYS, 1); // one tile: eight blocks
            assert_eq!(dims.blocks, TILE_KEYS);
            let keys = KeyTiles::build(&dims, self.rows[0].len(), |_, _, tile| {
                tile.copy_from_slice(&self.tile);
                Self::or(&self.keys.concat().concat())
            })
            .unwrap();
            let mut out = vec![[[f64::NAN; TILE_KEYS]; 2]; rows.len().next_multiple_of(V::ROWS)];
            packed.tile_dots::<V>(&keys, keys.tile(0, 0, 0), &mut out);
            let mut bad = 0;
            for (row, got) in self.rows.iter().zip(&out) {
                for (l, k) in self.keys.iter().enumerate() {
                    for m in 0..2 {
                        bad += usize::from(got[m][l].to_bits() != numerics::dot(row, &k[m]).to_bits());
                    }
                }
            }
            bad
        }

        /// `mismatches::<FUSED>` (`tile_mismatches` unless `direct`) on every ISA this CPU has.
        fn on_every_isa<const FUSED: bool>(&self, direct: bool) -> Vec<(&'static str, usize)> {
            fn run<V: F64x8, const FUSED: bool>(case: &Case, direct: bool) -> usize {
                if direct { case.mismatches::<V, FUSED>() } else { case.tile_mismatches::<V>() }
            }
            let mut seen = vec![("portable", run::<[f64; 8], FUSED>(self, direct))];
            #[cfg(target_arch = "x86_64")]
            {
                use crate::cpu::simd_f64::Ymm2;
                use std::arch::x86_64::__m512d;
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    seen.push(("avx2", run::<Ymm2, FUSED>(self, direct)));
                }
                if is_x86_feature_detected!("avx512f") {
                    seen.push(("avx512", run::<__m512d, FUSED>(self, direct)));
                }
            }
            seen
        }
    }

    const HEAD_DIMS: [usize; 8] = [1, 7, 8, 13, 64, 72, 128, 131];

    /// Bit for bit `numerics::dot`, for head dims with and without a tail and rows of every sign.
    #[test]
    fn row_dots_are_numerics_dot_bit_for_bit() {
        let (mut rows, mut keys) = (Rng::new(5), Rng::new(50));
        for dd in HEAD_DIMS {
            let case = Case::new(dd, || 3.0 * rows.normal(), || f64::from(keys.normal() as f32));
            for (isa, bad) in case.on_every_isa::<false>(true) {
                assert_eq!(bad, 0, "{isa}: D {dd}");
            }
        }
    }

    /// 16-bit inputs' rows (sums of two bf16 values) and keys: every product is exact, and the
    /// fused kernel is bit for bit `numerics::dot`.
    #[test]
    fn fused_row_dots_are_numerics_dot_where_products_are_exact() {
        let (mut rows, mut keys) = (Rng::new(6), Rng::new(60));
        let bf16 = |rng: &mut Rng| half::bf16::from_f64(rng.normal() * 4.0).to_f64();
        for dd in HEAD_DIMS {
            let case = Case::new(dd, || bf16(&mut rows) + bf16(&mut rows), || bf16(&mut keys));
            assert!(case.products_exact(), "D {dd}: sums of two bf16 values times bf16 values are exact");
            for (isa, bad) in case.on_every_isa::<true>(true) {
                assert_eq!(bad, 0, "{isa}: D {dd}");
            }
        }
    }

    /// The guard matters: on full-width f64 rows the products are not exact, and a fused kernel
    /// would differ from `numerics::dot` (the portable form is never fused, so it is exempt).
    #[test]
    fn fused_row_dots_differ_where_products_are_inexact() {
        let (mut rows, mut keys) = (Rng::new(7), Rng::new(70));
        let case = Case::new(128, || rows.normal(), || half::bf16::from_f64(keys.normal()).to_f64());
        assert!(!case.products_exact(), "53-bit rows times 8-bit keys");
        for (isa, bad) in case.on_every_isa::<true>(true) {
            assert!(isa == "portable" || bad > 0, "{isa}: a fused kernel matched dot on inexact products");
        }
    }

    /// What planning runs: the kernel `tile_dots` picks is bit for bit `numerics::dot` on rows
    /// whose products are exact (fused) and on rows whose products are not (where a fused kernel
    /// differs, as above) — 13 rows, so a chunk is padded.
    #[test]
    fn tile_dots_fuse_only_exact_products() {
        let (mut rows, mut keys) = (Rng::new(8), Rng::new(80));
        let bf16 = |rng: &mut Rng| half::bf16::from_f64(rng.normal()).to_f64();
        for dd in HEAD_DIMS {
            let mut exact = Case::new(dd, || bf16(&mut rows) + bf16(&mut rows), || bf16(&mut keys));
            let mut inexact = Case::new(dd, || rows.normal(), || bf16(&mut keys));
            for case in [&mut exact, &mut inexact] {
                case.rows.push(case.rows[0].iter().map(|x| -x).collect());
            }
            for (case, what) in [(&exact, "exact"), (&inexact, "inexact")] {
                for (isa, bad) in case.on_every_isa::<false>(false) {
                    assert_eq!(bad, 0, "{isa}: D {dd}, {what} products");
                }
            }
        }
    }

    /// [`row_dots32`] through [`PackedRows32::tile_dots`] on ISA `S`: how many of `rows`' dots
    /// with the two tiles' keys (`keys[t][l][m]`, `[2][TILE_KEYS][2][D]`) differ from
    /// `numerics::dot32` (13 rows: a chunk is padded).
    fn mismatches32<S: Simd>(rows: &[Vec<f32>], keys: &[Vec<[Vec<f32>; 2]>]) -> usize {
        let dd = rows[0].len();
        let tiles: Vec<Vec<f32>> = keys
            .iter()
            .map(|tile_keys| {
                let reps: Vec<f64> = tile_keys.iter().flat_map(|k| k.iter().flatten().map(|&x| f64::from(x))).collect();
                let mut tile = vec![0f32; 2 * dd * TILE_KEYS]; // fill_tiles writes into zeroed tiles
                fill_tiles(&reps, 1, dd, &mut tile, LogitPrecision::F32);
                tile
            })
            .collect();
        let per = rows32::<S>();
        let mut packed = PackedRows32 { data: vec![f32::NAN; 5] };
        packed.pack(&rows.iter().map(|r| &r[..]).collect::<Vec<_>>(), per);
        let mut out = vec![[f32::NAN; KEYS32]; rows.len().next_multiple_of(per)];
        packed.tile_dots::<S>([&tiles[0], &tiles[1]], &mut out);
        let mut bad = 0;
        for (row, got) in rows.iter().zip(&out) {
            for (t, tile_keys) in keys.iter().enumerate() {
                for (l, k) in tile_keys.iter().enumerate() {
                    for m in 0..2 {
                        let want = numerics::dot32(row, &k[m]);
                        bad += usize::from(got[(t * 2 + m) * TILE_KEYS + l].to_bits() != want.to_bits());
                    }
                }
            }
        }
        bad
    }

    /// The f32 logit kernel (16-bit inputs) is `numerics::dot32` bit for bit on every ISA this CPU
    /// has, for 16-bit rows (`qmax + qmin` rounded to f32) and full-width f32 rows; a kernel that
    /// rounded its products apart from its sums (`Portable::fma`) would differ.
    #[test]
    fn row_dots32_are_numerics_dot32_bit_for_bit() {
        let (mut rng, mut keys_rng) = (Rng::new(9), Rng::new(90));
        let bf16 = |rng: &mut Rng| half::bf16::from_f64(rng.normal() * 4.0).to_f32();
        for dd in HEAD_DIMS {
            let key = |rng: &mut Rng| -> Vec<f32> { (0..dd).map(|_| bf16(rng)).collect() };
            let keys: Vec<Vec<[Vec<f32>; 2]>> =
                (0..2).map(|_| (0..TILE_KEYS).map(|_| [key(&mut keys_rng), key(&mut keys_rng)]).collect()).collect();
            let sixteen_bit: Vec<Vec<f32>> =
                (0..13).map(|_| (0..dd).map(|_| bf16(&mut rng) + bf16(&mut rng)).collect()).collect();
            let wide: Vec<Vec<f32>> = (0..13).map(|_| (0..dd).map(|_| rng.normal() as f32).collect()).collect();
            for (rows, what) in [(&sixteen_bit, "16-bit rows"), (&wide, "f32 rows")] {
                let mut seen = vec![("portable", mismatches32::<crate::cpu::simd::Portable>(rows, &keys))];
                #[cfg(target_arch = "x86_64")]
                {
                    use crate::cpu::simd::x86::{Avx2, Avx512};
                    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                        seen.push(("avx2", mismatches32::<Avx2>(rows, &keys)));
                    }
                    if is_x86_feature_detected!("avx512f") {
                        seen.push(("avx512", mismatches32::<Avx512>(rows, &keys)));
                    }
                }
                for (isa, bad) in seen {
                    assert_eq!(bad, 0, "{isa}: D {dd}, {what}");
                }
            }
        }
    }

    #[test]
    fn significant_bits_bound_the_significands() {
        let bits = |xs: &[f64]| significant_bits(Case::or(xs));
        assert_eq!(bits(&[0.0, -0.0]), 0);
        assert_eq!(bits(&[1.0, -2.0, 0.5]), 1);
        assert_eq!(bits(&[1.5, 3.0]), 2);
        assert_eq!(bits(&[f64::from(f32::MAX), f64::from(f32::MIN_POSITIVE)]), 24);
        assert_eq!(bits(&[1.0 + f64::EPSILON]), 53);
        assert_eq!(bits(&[half::bf16::MAX.to_f64(), 0.0]), 8);
        // 2^-1074, a subnormal: a bound, not the count (it has one significant bit).
        assert_eq!(bits(&[f64::from_bits(1)]), 53);
        assert!(products_exact(Case::or(&[1.0 + 2f64.powi(-28)]), Case::or(&[f64::from(f32::MAX)])));
        assert!(!products_exact(Case::or(&[1.0 + 2f64.powi(-29)]), Case::or(&[f64::from(f32::MAX)])));
    }
}

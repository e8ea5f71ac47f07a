//! One query tile of online-softmax attention on AMX-BF16: `S = Q·Kᵀ` and `O += P·V` in tile
//! registers (bf16 products, f32 accumulation), the softmax over each row of S in AVX-512.
//!
//! Layout: Q `[mp][dp]` bf16 as it came (the scale is applied to S in f32, so Q is never
//! rounded again); S `[mp][KEYS]` f32; P `[mp][KEYS]` bf16 (P enters `P·V` in bf16, as on the
//! GPU's tensor cores; its f32 value feeds the row sums); O `[mp][dp]` f32. Keys arrive one at
//! a time (dense ranges, kept blocks, pages: the caller walks them) as pointers to their rows and
//! are packed per block of `KEYS` (see `pack`).

use std::arch::x86_64::*;

use super::dpbf16;
use super::pack::{self, CHUNK};
use super::sys::{self, TILE_BYTES, TILE_ROWS};
use crate::cpu::simd::{Simd, x86::Avx512};
use crate::tensor::Element;

/// Keys per block: C tiles of O are loaded and stored once per block, so more keys per block
/// amortise that traffic (`KEYS / 32` products per load).
pub(crate) const KEYS: usize = 128;
/// Query rows per tile, before padding: each key row is packed once per tile, so more rows
/// amortise the packing and the reads of K and V.
pub(crate) const AMX_ROWS_TARGET: usize = 192;
/// Query rows per register block (two tiles of 16).
const ROW_BLOCK: usize = 2 * TILE_ROWS;
const LANES: usize = 16;

/// 64-byte aligned scratch (tile loads of whole cache lines).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

pub(crate) struct Buf(Vec<Line>);

impl Buf {
    pub fn new(bytes: usize) -> Self {
        Buf(vec![Line([0; 64]); bytes.div_ceil(64)])
    }
    pub fn ptr<T>(&mut self) -> *mut T {
        self.0.as_mut_ptr() as *mut T
    }
    pub fn cptr<T>(&self) -> *const T {
        self.0.as_ptr() as *const T
    }
}

/// Sizes of an AMX tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AmxGeom {
    pub d: usize,
    /// D rounded up to whole 32-element chunks (zero-padded).
    pub dp: usize,
    /// Rows rounded up to the register block.
    pub mp: usize,
}

impl AmxGeom {
    pub fn new(d: usize, rows: usize) -> Self {
        AmxGeom { d, dp: d.next_multiple_of(CHUNK), mp: rows.max(1).next_multiple_of(ROW_BLOCK) }
    }
    fn chunks(&self) -> usize {
        self.dp / CHUNK
    }
}

/// Per-worker buffers of one AMX tile.
pub(crate) struct AmxTile {
    pub g: AmxGeom,
    q: Buf,
    /// Packed Kᵀ of the block: `chunks × KEYS/16` tiles.
    kt: Buf,
    /// Packed V of the block: `KEYS/32 × dp/16` tiles.
    vp: Buf,
    s: Buf,
    p: Buf,
    o: Buf,
    m: Vec<f32>,
    /// Per row, 16 lanes of partial row sums (reduced once, at the end).
    l: Vec<f32>,
    kptr: [*const u16; KEYS],
    vptr: [*const u16; KEYS],
    /// Key token minus `diag_from` (clamped), `i32::MAX` for empty slots.
    kofs: [i32; KEYS],
    zero: Vec<u16>,
    filled: usize,
    /// Rows holding queries (the rest are zero and skipped).
    rows: usize,
    diag_from: usize,
    row_group: usize,
    /// Softmax scale times log2(e), applied to S.
    c: f32,
    /// The tile products run on AMX (else on `VDPBF16PS`, same operands).
    on_amx: bool,
}

// SAFETY: `kptr`/`vptr` are scratch written before every read (`push_rows` before `flush`;
// empty slots point at the tile's own heap buffer `zero`, which moves with it).
unsafe impl Send for AmxTile {}

impl AmxTile {
    /// A tile whose products run on AMX (`on_amx`) or on AVX512-BF16's `VDPBF16PS`.
    pub fn new(g: AmxGeom, on_amx: bool) -> Self {
        AmxTile {
            g,
            q: Buf::new(g.mp * g.dp * 2),
            kt: Buf::new(g.chunks() * (KEYS / TILE_ROWS) * TILE_BYTES),
            vp: Buf::new((KEYS / CHUNK) * (g.dp / TILE_ROWS) * TILE_BYTES),
            s: Buf::new(g.mp * KEYS * 4),
            p: Buf::new(g.mp * KEYS * 2),
            o: Buf::new(g.mp * g.dp * 4),
            m: vec![0.0; g.mp],
            l: vec![0.0; g.mp * LANES],
            kptr: [std::ptr::null(); KEYS],
            vptr: [std::ptr::null(); KEYS],
            kofs: [i32::MAX; KEYS],
            zero: vec![0; g.dp],
            filled: 0,
            rows: g.mp,
            diag_from: usize::MAX,
            row_group: 1,
            c: 1.0,
            on_amx,
        }
    }

    /// Starts a tile: rows `r = i·row_group + j` belong to token `diag_from + i` for the mask;
    /// scores are scaled by `c` (softmax scale × log2 e).
    pub fn begin(&mut self, diag_from: usize, row_group: usize, c: f32) {
        self.m.fill(f32::NEG_INFINITY);
        self.l.fill(0.0);
        let o = self.g.mp * self.g.dp;
        // SAFETY: `o` holds mp·dp f32.
        unsafe { std::slice::from_raw_parts_mut(self.o.ptr::<f32>(), o) }.fill(0.0);
        self.filled = 0;
        self.diag_from = diag_from;
        self.row_group = row_group;
        self.c = c;
    }

    /// Copies query row `r` (bf16 bits; D values, the padding stays zero).
    #[inline(always)]
    pub fn set_query<E: Element>(&mut self, r: usize, q: &[E]) {
        debug_assert_eq!(E::DTYPE, crate::DType::BF16);
        let dp = self.g.dp;
        // SAFETY: E is bf16 (two bytes); row r of Q holds dp ≥ D values.
        unsafe { std::ptr::copy_nonoverlapping(q.as_ptr() as *const u16, self.q.ptr::<u16>().add(r * dp), q.len()) };
    }

    /// Marks rows `from..` empty: their Q and P rows are zeroed (so they add nothing) and the
    /// softmax skips them.
    pub fn clear_queries(&mut self, from: usize) {
        let (mp, dp) = (self.g.mp, self.g.dp);
        // SAFETY: Q holds mp·dp bf16 and P mp·KEYS.
        unsafe {
            std::slice::from_raw_parts_mut(self.q.ptr::<u16>().add(from * dp), (mp - from) * dp).fill(0);
            std::slice::from_raw_parts_mut(self.p.ptr::<u16>().add(from * KEYS), (mp - from) * KEYS).fill(0);
        }
        self.rows = from;
    }

    /// Adds key token `t` with its key and value rows (bf16); runs the block when full.
    #[inline(always)]
    pub fn push_rows<E: Element>(&mut self, k: &[E], v: &[E], t: usize) {
        let j = self.filled;
        self.kptr[j] = k.as_ptr() as *const u16;
        self.vptr[j] = v.as_ptr() as *const u16;
        self.kofs[j] = t.wrapping_sub(self.diag_from).clamp_to_i32();
        self.filled += 1;
        if self.filled == KEYS {
            self.flush();
        }
    }

    /// Runs the filled keys through `S = Q·Kᵀ`, the online softmax and `O += P·V`.
    ///
    /// Software-pipelined over pairs of 16-row tiles so the AMX unit and the vector units work
    /// at once: while the softmax of pair `i` runs on AVX-512, the tile products of `S` for pair
    /// `i + 1` and of `O` for pair `i − 1` (independent of it) are issued between its rows, and
    /// execute out of order alongside.
    #[inline(always)]
    pub fn flush(&mut self) {
        let n = self.filled;
        if n == 0 {
            return;
        }
        let (d, chunks) = (self.g.d, self.g.chunks());
        // Key slots in use, in whole pairs of 16-key groups (the register block along keys).
        let used = n.next_multiple_of(CHUNK);
        for j in n..used {
            self.kptr[j] = self.zero.as_ptr();
            self.vptr[j] = self.zero.as_ptr();
            self.kofs[j] = i32::MAX;
        }
        let block =
            Block { used, max_ofs: self.kofs[..n].iter().copied().max().unwrap_or(i32::MIN), partial: used > n };
        let pairs = self.rows.div_ceil(ROW_BLOCK);
        let (qk_calls, pv_calls) = (used / CHUNK, self.g.dp / CHUNK);
        // SAFETY: every pointer stays inside the buffers sized in `new`; key rows hold D values.
        unsafe {
            let kt = self.kt.ptr::<u8>();
            for ng in 0..used / TILE_ROWS {
                let rows: &[*const u16; TILE_ROWS] = self.kptr[ng * TILE_ROWS..][..TILE_ROWS].try_into().unwrap();
                pack::keys_t(rows, d, chunks, KEYS / TILE_ROWS, ng, kt);
            }
            let vp = self.vp.ptr::<u8>();
            for j in (0..used).step_by(2) {
                pack::values_pair(self.vptr[j], self.vptr[j + 1], d, chunks, j / CHUNK, (j % CHUNK) / 2, vp);
            }
            if self.on_amx {
                sys::configure();
            }
            for call in 0..qk_calls {
                self.qk(0, call);
            }
            for pair in 0..pairs {
                let next = if pair + 1 < pairs { qk_calls } else { 0 };
                let prev = if pair > 0 { pv_calls } else { 0 };
                let (mut r, r_end) = (pair * ROW_BLOCK, ((pair + 1) * ROW_BLOCK).min(self.rows));
                let per_call = (r_end - r).div_ceil((next + prev).max(1));
                for call in 0..next + prev {
                    if call < next {
                        self.qk(pair + 1, call);
                    } else {
                        self.pv(pair - 1, call - next, used);
                    }
                    for _ in 0..per_call.min(r_end - r) {
                        self.softmax_row(r, &block);
                        r += 1;
                    }
                }
                for r in r..r_end {
                    self.softmax_row(r, &block);
                }
            }
            for call in 0..pv_calls {
                self.pv(pairs - 1, call, used);
            }
            if self.on_amx {
                sys::release();
            }
        }
        self.filled = 0;
    }

    /// `S` of row pair `pair` for key groups `2·call, 2·call + 1`: 2×2 tiles of 16 rows × 16
    /// keys over D in chunks of 32.
    #[inline(always)]
    unsafe fn qk(&mut self, pair: usize, call: usize) {
        let (dp, ng) = (self.g.dp, 2 * call);
        unsafe {
            let a0 = self.q.cptr::<u16>().add(pair * ROW_BLOCK * dp);
            let c0 = self.s.ptr::<f32>().add(pair * ROW_BLOCK * KEYS + ng * TILE_ROWS);
            let args: Operands = (
                [c0, c0.add(TILE_ROWS * KEYS)],
                KEYS * 4,
                [a0, a0.add(TILE_ROWS * dp)],
                dp * 2,
                CHUNK * 2,
                self.kt.cptr::<u8>().add(ng * TILE_BYTES) as *const u16,
                (KEYS / TILE_ROWS) * TILE_BYTES,
                self.g.chunks(),
            );
            products::<false>(self.on_amx, args);
        }
    }

    /// `O += P·V` of row pair `pair` for dim groups `2·call, 2·call + 1`: 2×2 tiles of 16 rows ×
    /// 16 dims over the `used` keys in steps of 32.
    #[inline(always)]
    unsafe fn pv(&mut self, pair: usize, call: usize, used: usize) {
        let (dp, dg) = (self.g.dp, 2 * call);
        let dim_groups = dp / TILE_ROWS;
        unsafe {
            let a0 = self.p.cptr::<u16>().add(pair * ROW_BLOCK * KEYS);
            let c0 = self.o.ptr::<f32>().add(pair * ROW_BLOCK * dp + dg * TILE_ROWS);
            let args: Operands = (
                [c0, c0.add(TILE_ROWS * dp)],
                dp * 4,
                [a0, a0.add(TILE_ROWS * KEYS)],
                KEYS * 2,
                CHUNK * 2,
                self.vp.cptr::<u8>().add(dg * TILE_BYTES) as *const u16,
                dim_groups * TILE_BYTES,
                used / CHUNK,
            );
            products::<true>(self.on_amx, args);
        }
    }

    /// Scales, masks and exponentiates the block's scores of query row `r` into P, updating the
    /// running max and sum and rescaling O's row when the max moved.
    #[inline(always)]
    unsafe fn softmax_row(&mut self, r: usize, block: &Block) {
        unsafe {
            let (dp, c) = (self.g.dp, _mm512_set1_ps(self.c));
            let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
            let vecs = block.used / LANES;
            let (s, p, o) = (self.s.cptr::<f32>(), self.p.ptr::<u16>(), self.o.ptr::<f32>());
            let limit = (r / self.row_group) as i32;
            // Empty slots are masked always; the causal rule only where a key passes the row.
            let causal = block.max_ofs > limit || block.partial;
            // Scores stay unscaled until the exponent: max(c·s) = c·max(s) for c > 0, and
            // c·s − m is one FMA.
            let mut x = [_mm512_setzero_ps(); KEYS / LANES];
            // Four running maxima and two sums: independent chains, not one of `vecs` latencies.
            let mut mx = [ninf; 4];
            for v in 0..vecs {
                let mut sv = _mm512_loadu_ps(s.add(r * KEYS + v * LANES));
                if causal {
                    let kofs = _mm512_loadu_si512(self.kofs.as_ptr().add(v * LANES) as *const _);
                    let keep = _mm512_cmple_epi32_mask(kofs, _mm512_set1_epi32(limit));
                    sv = _mm512_mask_mov_ps(ninf, keep, sv);
                }
                x[v] = sv;
                mx[v % 4] = _mm512_max_ps(mx[v % 4], sv);
            }
            let mx = _mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3]));
            let m_old = self.m[r];
            // Rows that have seen no key yet keep a finite reference (no -inf - -inf).
            let m_new = (_mm512_reduce_max_ps(mx) * self.c).max(m_old).max(f32::MIN);
            let neg_m = _mm512_set1_ps(-m_new);
            let mut sum = [_mm512_setzero_ps(); 2];
            for v in (0..vecs).step_by(2) {
                // Masked keys: 2^−∞ = 0 exactly.
                let e0 = Avx512::exp2_nonpositive(_mm512_fmadd_ps(x[v], c, neg_m));
                let e1 = Avx512::exp2_nonpositive(_mm512_fmadd_ps(x[v + 1], c, neg_m));
                sum[0] = _mm512_add_ps(sum[0], e0);
                sum[1] = _mm512_add_ps(sum[1], e1);
                let bf: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(e1, e0));
                _mm512_storeu_si512(p.add(r * KEYS + v * LANES) as *mut _, bf);
            }
            // alpha = 2^(m_old − m_new) in the vector unit (−∞ − m → 0), no libm call.
            let alpha = if m_old == m_new {
                _mm512_set1_ps(1.0)
            } else {
                Avx512::exp2_nonpositive(_mm512_set1_ps(m_old - m_new))
            };
            let l = self.l.as_mut_ptr().add(r * LANES);
            _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), alpha, _mm512_add_ps(sum[0], sum[1])));
            self.m[r] = m_new;
            if m_old != m_new {
                let row = o.add(r * dp);
                for x in (0..dp).step_by(LANES) {
                    _mm512_storeu_ps(row.add(x), _mm512_mul_ps(_mm512_loadu_ps(row.add(x)), alpha));
                }
            }
        }
    }

    /// Row `r`'s sum of exponentials.
    fn row_sum(&self, r: usize) -> f32 {
        self.l[r * LANES..][..LANES].iter().sum()
    }

    /// Output of row `r` (after the last flush): `O[r] / l[r]` into `out`.
    #[inline(always)]
    pub fn write_row<E: Element>(&self, r: usize, out: &mut [E], tmp: &mut [f32]) {
        let inv = 1.0 / self.row_sum(r);
        // SAFETY: row r of O holds dp ≥ out.len() values.
        let row = unsafe { std::slice::from_raw_parts(self.o.cptr::<f32>().add(r * self.g.dp), out.len()) };
        for (t, &x) in tmp[..out.len()].iter_mut().zip(row) {
            *t = x * inv;
        }
        E::narrow(&tmp[..out.len()], out);
    }

    /// Natural-log sum-exp of row `r`, given that scores were scaled by `log2(e)`.
    pub fn lse(&self, r: usize) -> f32 {
        (self.m[r] + self.row_sum(r).log2()) * std::f32::consts::LN_2
    }
}

/// [`sys::dp_2x2`]'s operands: C rows and stride, A rows, stride and step, B, its step, steps.
type Operands = ([*mut f32; 2], usize, [*const u16; 2], usize, usize, *const u16, usize, usize);

/// A 2×2 block of tile products on AMX or on `VDPBF16PS` (same operands, same result).
#[inline(always)]
unsafe fn products<const LOAD_C: bool>(on_amx: bool, (c, sc, a, sa, a_step, b, b_step, steps): Operands) {
    unsafe {
        if on_amx {
            sys::dp_2x2::<LOAD_C>(c, sc, a, sa, a_step, b, b_step, steps)
        } else {
            dpbf16::dp_2x2::<LOAD_C>(c, sc, a, sa, a_step, b, b_step, steps)
        }
    }
}

/// What the softmax needs to know of a block of keys.
struct Block {
    /// Key slots in use (a multiple of 32; slots past the filled ones are empty).
    used: usize,
    /// The largest key offset from the diagonal (`kofs`) among the filled slots.
    max_ofs: i32,
    /// Whether some slots below `used` are empty.
    partial: bool,
}

/// A key's token relative to the tile's diagonal, as the i32 the mask compares.
trait ClampToI32 {
    fn clamp_to_i32(self) -> i32;
}

impl ClampToI32 for usize {
    /// `t - diag_from` (wrapped): below the diagonal → negative (clamped to -1), above → positive
    /// (clamped below `i32::MAX`, which marks empty slots).
    #[inline(always)]
    fn clamp_to_i32(self) -> i32 {
        let x = self as isize;
        x.clamp(-1, i32::MAX as isize - 1) as i32
    }
}

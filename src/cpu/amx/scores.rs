//! Scores `Sᵀ = K·Qᵀ` of bf16 keys on AMX for the compression scorer, into the f32 tile's
//! `[keys][rows]` layout (`crate::cpu::tile::Tile` keeps the softmax passes over it).
//!
//! The key rows are the A operand as they are (16 keys × 32 dims per tile, staged contiguously);
//! the window's queries are the B operand, packed once per unit in VNNI pairs `(Q[r][2i],
//! Q[r][2i + 1])` per dim pair `i` and row `r`, unscaled (the scale is applied to the f32 scores,
//! so no query is rounded again).

use super::pack::CHUNK;
use super::sys::{self, TILE_BYTES, TILE_ROWS};
use super::tile::Buf;

/// Rows per register block (two tiles of 16 rows).
const PAIR: usize = 2 * TILE_ROWS;

pub(crate) struct AmxScores {
    d: usize,
    dp: usize,
    /// The f32 tile's row count, and it rounded up to whole row pairs.
    mp: usize,
    mp2: usize,
    /// Packed queries: `chunks × mp2/16` B tiles.
    q: Buf,
    /// Staged key rows `[keys][dp]` bf16 (zero past D).
    k: Buf,
    /// Scores `[keys][mp2]` f32.
    s: Buf,
    c: f32,
}

// SAFETY: plain buffers.
unsafe impl Send for AmxScores {}

impl AmxScores {
    pub fn new(d: usize, mp: usize, keys: usize) -> Self {
        let (dp, mp2, keys2) = (d.next_multiple_of(CHUNK), mp.next_multiple_of(PAIR), keys.next_multiple_of(PAIR));
        AmxScores {
            d,
            dp,
            mp,
            mp2,
            q: Buf::new(dp / CHUNK * (mp2 / TILE_ROWS) * TILE_BYTES),
            k: Buf::new(keys2 * dp * 2),
            s: Buf::new(keys2 * mp2 * 4),
            c: 1.0,
        }
    }

    /// Packs query row `r` (bf16 bits) with scale `c` for the scores.
    pub fn set_query(&mut self, r: usize, q: &[u16], c: f32) {
        self.c = c;
        let groups = self.mp2 / TILE_ROWS;
        // SAFETY: the index stays inside the `chunks × groups` tiles of `q`.
        let packed = self.q.ptr::<u16>();
        for (x, &v) in q.iter().enumerate().take(self.d) {
            let (chunk, pair, half) = (x / CHUNK, (x % CHUNK) / 2, x % 2);
            let at = (chunk * groups + r / TILE_ROWS) * (TILE_BYTES / 2) + pair * CHUNK + (r % TILE_ROWS) * 2 + half;
            unsafe { *packed.add(at) = v };
        }
    }

    /// Zeroes query rows `from..` (padding).
    pub fn clear_queries(&mut self, from: usize) {
        let zero = vec![0; self.d];
        for r in from..self.mp2 {
            self.set_query(r, &zero, self.c);
        }
    }

    /// Stages key row `k` (bf16 bits, D values) in slot `j`.
    #[inline(always)]
    pub fn stage(&mut self, j: usize, k: &[u16]) {
        // SAFETY: slot j of `k` holds dp ≥ D values.
        unsafe { std::ptr::copy_nonoverlapping(k.as_ptr(), self.k.ptr::<u16>().add(j * self.dp), self.d) };
    }

    /// `st[j][r] = c · Σ_d K[j][d]·Q[r][d]` for the `n` staged keys and every row of `st`
    /// (`[keys][mp]`).
    ///
    /// # Safety
    /// [`sys::usable`] returned true; `st` holds `n` rows of `mp` values.
    #[inline(always)]
    pub unsafe fn score(&mut self, n: usize, st: &mut [f32]) {
        let (dp, mp2, chunks) = (self.dp, self.mp2, self.dp / CHUNK);
        let used = n.next_multiple_of(PAIR);
        unsafe {
            // Slots n..used hold earlier keys (or zeros): their score rows are computed and dropped.
            let (k, q, s) = (self.k.cptr::<u16>(), self.q.cptr::<u8>(), self.s.ptr::<f32>());
            sys::configure();
            for kb in (0..used).step_by(PAIR) {
                for qb in (0..mp2).step_by(PAIR) {
                    let c0 = s.add(kb * mp2 + qb);
                    let a0 = k.add(kb * dp);
                    sys::dp_2x2::<false>(
                        [c0, c0.add(TILE_ROWS * mp2)],
                        mp2 * 4,
                        [a0, a0.add(TILE_ROWS * dp)],
                        dp * 2,
                        CHUNK * 2,
                        q.add(qb / TILE_ROWS * TILE_BYTES) as *const u16,
                        mp2 / TILE_ROWS * TILE_BYTES,
                        chunks,
                    );
                }
            }
            sys::release();
            let s = self.s.cptr::<f32>();
            for j in 0..n {
                let row = std::slice::from_raw_parts(s.add(j * mp2), self.mp);
                for (o, &x) in st[j * self.mp..][..self.mp].iter_mut().zip(row) {
                    *o = x * self.c;
                }
            }
        }
    }
}

//! One query tile of online-softmax attention, fed keys one at a time (see `micro` for the
//! transposed layout). Used by prefill (dense and sparse) and by the compression scorer.

use super::micro::{self, Level, prefetch};
use super::simd::Simd;
use crate::tensor::Element;

/// Query rows per tile, before padding: enough rows to amortise each key row's loads.
pub(crate) const ROWS_TARGET: usize = 192;
/// Key slots per tile: Sᵀ of `KEYS_PER_TILE × rows` stays in L1/L2.
pub(crate) const KEYS_PER_TILE: usize = 128;
/// Vectors per row chunk (`MV`); rows are padded to `MV·LANES`.
pub(crate) const ROW_VECTORS: usize = 3;

/// Register block along keys / head dim (`NR`) for a vector width.
pub(crate) const fn block_for(lanes: usize) -> usize {
    if lanes >= 16 { 8 } else { 4 }
}

/// The next tile's rows, guessed from a full tile of evenly spaced rows (a contiguous run of a
/// cache: the next tile is the run's next `keys` rows). Its flush asks for them a row at a time
/// between `pv`'s FMAs, so they arrive while it computes instead of in one burst at the next
/// tile's pushes, where the core waited on fill buffers (f32 rows read in place) or on the rows
/// themselves (16-bit rows, widened at push). Dense 16K: 1.07-1.10× in f32 (session 27). A
/// guess: f32 pushes check it row by row ([`Ahead::holds`]) and ask for what it missed
/// themselves; rows past a cache's end are never read (a prefetch never faults).
#[derive(Clone, Copy)]
struct Ahead {
    k: usize,
    v: usize,
    step: usize,
}

impl Ahead {
    /// The guess after tile `t` (before its flush empties it), its rows' addresses written
    /// into `rows` (each one's K, then its V), when the tile's rows are evenly spaced and
    /// `calls` `pv` calls of `keys` keys can ask for them at most a cache line every two keys.
    fn after(t: &Tile, calls: usize, keys: usize, rows: &mut Vec<usize>) -> Option<Ahead> {
        rows.clear();
        let n = t.filled;
        let row_lines = t.row_bytes.div_ceil(64);
        if n != t.g.keys || n < 2 || (2 * n).div_ceil(calls) * row_lines * 2 > keys {
            return None;
        }
        let (k, v) = (&t.ksrc, &t.vsrc);
        let step = k[1].wrapping_sub(k[0]);
        let span = step.wrapping_mul(n - 1);
        let even = v[1].wrapping_sub(v[0]) == step
            && k[n - 1].wrapping_sub(k[0]) == span
            && v[n - 1].wrapping_sub(v[0]) == span;
        let (k0, v0) = (k[0], v[0]);
        if !even {
            return None;
        }
        let next = Ahead { k: k0.wrapping_add(step.wrapping_mul(n)), v: v0.wrapping_add(step.wrapping_mul(n)), step };
        for j in 0..n {
            let o = step.wrapping_mul(j);
            rows.extend([next.k.wrapping_add(o), next.v.wrapping_add(o)]);
        }
        Some(next)
    }

    /// Whether the rows at addresses `k` and `v` are the ones guessed for slot `j`.
    #[inline(always)]
    fn holds(&self, j: usize, k: usize, v: usize) -> bool {
        let o = self.step.wrapping_mul(j);
        k == self.k.wrapping_add(o) && v == self.v.wrapping_add(o)
    }
}

/// Sizes of a tile for one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geom {
    pub d: usize,
    /// D rounded up to the register block.
    pub dp: usize,
    /// Rows padded to whole chunks.
    pub mp: usize,
    /// Rows per chunk (`MV·LANES`).
    pub chunk: usize,
    pub keys: usize,
}

impl Geom {
    pub fn new(lanes: usize, d: usize, rows: usize) -> Self {
        let nr = block_for(lanes);
        let chunk = ROW_VECTORS * lanes;
        Geom { d, dp: d.next_multiple_of(nr), mp: rows.max(1).next_multiple_of(chunk), chunk, keys: KEYS_PER_TILE }
    }
}

/// A source of key/value rows: row `t` starts at `base + t·stride`, or, paged, at
/// `base + table[t / page_size]·page_stride + (t % page_size)·stride`.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a, E> {
    pub data: &'a [E],
    pub base: usize,
    pub stride: usize,
    pub paging: Option<Paging<'a>>,
}

/// The pages of one sequence (SPEC §7.3).
#[derive(Clone, Copy)]
pub(crate) struct Paging<'a> {
    pub table: &'a [u32],
    pub page_size: usize,
    pub page_stride: usize,
}

impl<'a, E> Rows<'a, E> {
    /// Element offset of row `t`.
    #[inline(always)]
    pub fn offset(&self, t: usize) -> usize {
        match self.paging {
            None => self.base + t * self.stride,
            Some(p) => self.base + p.table[t / p.page_size] as usize * p.page_stride + (t % p.page_size) * self.stride,
        }
    }

    /// The `d` elements at offset `o` (from [`Rows::offset`] or [`Rows::walk`]).
    #[inline(always)]
    pub fn at(&self, o: usize, d: usize) -> &'a [E] {
        &self.data[o..o + d]
    }

    /// `(t, offset)` of rows `range` in order, walking page by page: one table lookup per page,
    /// no division per row (what a scan over thousands of keys pays otherwise).
    #[inline(always)]
    pub fn walk(&self, range: std::ops::Range<usize>) -> RowWalk<'a> {
        let left = self.paging.map_or(usize::MAX, |p| p.page_size - range.start % p.page_size);
        let offset = if range.is_empty() { 0 } else { self.offset(range.start) };
        RowWalk {
            t: range.start,
            end: range.end,
            offset,
            left,
            stride: self.stride,
            page: self.paging.map_or(0, |p| range.start / p.page_size),
            base: self.base,
            paging: self.paging,
        }
    }
}

/// Rows ahead of the current one that [`Rows::walk_prefetched`] asks the cache for: a tile's
/// worth, so the next tile's rows arrive while this one is scored.
pub(crate) const PREFETCH_ROWS: usize = KEYS_PER_TILE;

impl<'a, E> Rows<'a, E> {
    /// [`Rows::walk`] that, over pages, prefetches the row `PREFETCH_ROWS` ahead: pages scatter a
    /// head's rows (1 KB apart and jumping every page on vLLM's slot-major layout), where the
    /// hardware prefetcher loses the stream (the paged scorer took 1.13–1.18× the strided one
    /// without it, ~1.0–1.05× with it; `bench-engine`).
    #[inline(always)]
    pub fn walk_prefetched(&self, range: std::ops::Range<usize>, d: usize) -> Prefetched<'a, E> {
        self.walk_prefetched_by(range, d, PREFETCH_ROWS)
    }

    /// [`Rows::walk_prefetched`] `ahead` rows ahead.
    #[inline(always)]
    fn walk_prefetched_by(&self, range: std::ops::Range<usize>, d: usize, ahead: usize) -> Prefetched<'a, E> {
        let ahead =
            self.paging.filter(|_| ahead > 0).map(|_| self.walk((range.start + ahead).min(range.end)..range.end));
        Prefetched { rows: self.walk(range), ahead, data: [self.data, &[]], bytes: d * std::mem::size_of::<E>() }
    }

    /// [`Rows::walk_prefetched_by`] that also prefetches the same offsets of `other` (the V pool,
    /// which shares K's layout).
    #[inline(always)]
    pub fn walk_prefetched_with(
        &self,
        other: &'a [E],
        range: std::ops::Range<usize>,
        d: usize,
        ahead: usize,
    ) -> Prefetched<'a, E> {
        let mut walk = self.walk_prefetched_by(range, d, ahead);
        walk.data[1] = other;
        walk
    }
}

/// The iterator of [`Rows::walk_prefetched`].
pub(crate) struct Prefetched<'a, E> {
    rows: RowWalk<'a>,
    ahead: Option<RowWalk<'a>>,
    /// The pools prefetched (the second may be empty).
    data: [&'a [E]; 2],
    bytes: usize,
}

impl<E> Iterator for Prefetched<'_, E> {
    type Item = (usize, usize);
    #[inline(always)]
    fn next(&mut self) -> Option<(usize, usize)> {
        if let Some((_, o)) = self.ahead.as_mut().and_then(Iterator::next) {
            for data in self.data.iter().filter(|d| o < d.len()) {
                prefetch(data[o..].as_ptr() as *const u8, self.bytes, Level::L1);
            }
        }
        self.rows.next()
    }
}

/// The iterator of [`Rows::walk`].
pub(crate) struct RowWalk<'a> {
    t: usize,
    end: usize,
    offset: usize,
    /// Rows left in the current page (`usize::MAX` unpaged).
    left: usize,
    stride: usize,
    page: usize,
    base: usize,
    paging: Option<Paging<'a>>,
}

impl Iterator for RowWalk<'_> {
    type Item = (usize, usize);
    #[inline(always)]
    fn next(&mut self) -> Option<(usize, usize)> {
        if self.t >= self.end {
            return None;
        }
        let item = (self.t, self.offset);
        self.t += 1;
        self.left -= 1;
        if self.left == 0 {
            let p = self.paging.expect("only paged rows run out of a page");
            self.page += 1;
            self.left = p.page_size;
            if self.t < self.end {
                self.offset = self.base + p.table[self.page] as usize * p.page_stride;
            }
        } else {
            self.offset += self.stride;
        }
        Some(item)
    }
}

/// Per-worker buffers of one tile.
pub(crate) struct Tile {
    pub g: Geom,
    /// Qᵀ `[d][mp]`, pre-scaled.
    pub qt: Vec<f32>,
    /// Sᵀ / Pᵀ `[keys][mp]`.
    pub st: Vec<f32>,
    /// Oᵀ `[dp][mp]`.
    pub ot: Vec<f32>,
    pub m: Vec<f32>,
    pub l: Vec<f32>,
    pub alpha: Vec<f32>,
    /// Per row, the largest score of the tile being flushed (`qk`'s epilogue writes it).
    smax: Vec<f32>,
    kptr: Vec<*const f32>,
    vptr: Vec<*const f32>,
    ktok: Vec<usize>,
    kconv: Vec<f32>,
    vconv: Vec<f32>,
    zero: Vec<f32>,
    filled: usize,
    /// Rows the attention runs (the queries' whole chunks; `clear_queries` sets it): a tile of a
    /// few queries skips the padding chunks.
    live: usize,
    /// Keys with token `>= diag_from` are masked for rows whose token is smaller.
    diag_from: usize,
    /// Query rows per token (the GQA group), for the causal mask.
    row_group: usize,
    /// Keys are read in place (f32 rows whose length is a multiple of the register block).
    direct: bool,
    /// The addresses of the pushed key and value rows (the caller's, also when staged), and
    /// their length in bytes.
    ksrc: Vec<usize>,
    vsrc: Vec<usize>,
    row_bytes: usize,
    /// The next tile's rows as the last flush guessed and asked for them, if it did.
    ahead: Option<Ahead>,
    /// The addresses of those rows (each one's K, then its V), in the order the flush's `pv`
    /// calls ask for them.
    ahead_rows: Vec<usize>,
    /// bf16 scores on AMX (`score`; the compression scorer on `Isa::Amx`).
    #[cfg(target_arch = "x86_64")]
    amx: Option<Box<super::amx::AmxScores>>,
}

// SAFETY: `kptr`/`vptr` are scratch: every use writes the slots it reads (`push` before
// `score`/`flush`; padding slots point at the tile's own heap buffer `zero`, which moves with
// it), so a tile carries no pointer from one call into the next and may move between threads
// (a workspace keeps tiles between calls).
unsafe impl Send for Tile {}

impl Tile {
    pub fn new<E: Element>(g: Geom) -> Self {
        Tile {
            g,
            qt: vec![0.0; g.d * g.mp],
            st: vec![0.0; g.keys * g.mp],
            ot: vec![0.0; g.dp * g.mp],
            m: vec![0.0; g.mp],
            l: vec![0.0; g.mp],
            alpha: vec![0.0; g.mp],
            smax: vec![0.0; g.mp],
            kptr: vec![std::ptr::null(); g.keys],
            vptr: vec![std::ptr::null(); g.keys],
            ktok: vec![0; g.keys],
            kconv: vec![0.0; g.keys * g.dp],
            vconv: vec![0.0; g.keys * g.dp],
            zero: vec![0.0; g.dp],
            filled: 0,
            live: g.mp,
            diag_from: usize::MAX,
            row_group: 1,
            direct: E::DTYPE == crate::DType::F32 && g.d == g.dp,
            ksrc: vec![0; g.keys],
            vsrc: vec![0; g.keys],
            row_bytes: g.d * std::mem::size_of::<E>(),
            ahead: None,
            // Room for a tile's K and V rows: flushes never allocate.
            ahead_rows: Vec::with_capacity(2 * g.keys),
            #[cfg(target_arch = "x86_64")]
            amx: None,
        }
    }

    /// This tile with its scores (`score`) on AMX: bf16 only, and only run inside
    /// [`super::simd::Isa::Amx`]'s entry point.
    #[cfg(target_arch = "x86_64")]
    pub fn with_amx_scores<E: Element>(mut self) -> Self {
        assert_eq!(E::DTYPE, crate::DType::BF16, "AMX scores take bf16");
        self.amx = Some(Box::new(super::amx::AmxScores::new(self.g.d, self.g.mp, self.g.keys)));
        self
    }

    /// The bf16 bits of a bf16 row (for the AMX scores).
    #[cfg(target_arch = "x86_64")]
    fn bits<E: Element>(row: &[E]) -> &[u16] {
        debug_assert_eq!(E::DTYPE, crate::DType::BF16);
        // SAFETY: the AMX scores exist for bf16 tiles only (`with_amx_scores`): E is bf16, two bytes.
        unsafe { std::slice::from_raw_parts(row.as_ptr() as *const u16, row.len()) }
    }

    /// Starts a tile: rows `r = i·row_group + j` belong to token `diag_from + i` for the mask.
    pub fn begin(&mut self, diag_from: usize, row_group: usize) {
        self.m.fill(f32::NEG_INFINITY);
        self.l.fill(0.0);
        self.ot.fill(0.0);
        self.filled = 0;
        self.diag_from = diag_from;
        self.row_group = row_group;
        self.ahead = None;
    }

    /// Packs query row `r` (scaled by `c`) into Qᵀ.
    #[inline(always)]
    pub fn set_query<S: Simd, E: Element>(&mut self, r: usize, q: &[E], c: f32, tmp: &mut [f32]) {
        let mp = self.g.mp;
        // On AMX the scores take the bf16 row as it is: Qᵀ in f32 is not needed.
        #[cfg(target_arch = "x86_64")]
        if let Some(a) = &mut self.amx {
            a.set_query(r, Self::bits(q), c);
            return;
        }
        // SAFETY: `widen` writes `q.len()` values into `tmp`, which holds at least D.
        unsafe { S::widen(q, tmp) };
        for (dd, &x) in tmp[..q.len()].iter().enumerate() {
            self.qt[dd * mp + r] = x * c;
        }
    }

    /// Zeroes query rows `from..mp` (padding).
    pub fn clear_queries(&mut self, from: usize) {
        let mp = self.g.mp;
        #[cfg(target_arch = "x86_64")]
        if let Some(a) = &mut self.amx {
            a.clear_queries(from);
        }
        self.live = from.max(1).next_multiple_of(self.g.chunk).min(mp);
        for dd in 0..self.g.d {
            self.qt[dd * mp + from..(dd + 1) * mp].fill(0.0);
        }
    }

    /// Adds key token `t` with its key and value rows; runs the tile when full.
    #[inline(always)]
    pub fn push_rows<S: Simd, E: Element, const NR: usize, const MV: usize>(&mut self, k: &[E], v: &[E], t: usize) {
        let j = self.filled;
        self.kptr[j] = Self::slot::<S, E>(self.direct, &mut self.kconv, j, self.g, k);
        self.vptr[j] = Self::slot::<S, E>(self.direct, &mut self.vconv, j, self.g, v);
        let (ks, vs) = (k.as_ptr() as usize, v.as_ptr() as usize);
        (self.ksrc[j], self.vsrc[j]) = (ks, vs);
        // Rows read in place come from L3 or memory the first time: `pv` reads a value row a
        // line per call, no stream the hardware prefetcher follows, and `qk` opens eight key
        // rows at once, each a few lines long. The last flush asked for them if it guessed
        // them ([`Ahead`]); else ask now, in a burst that waits for fill buffers but still
        // lands before the flush (dense f32 D 128: values 1.04-1.11× at 8K / 16K, session 26;
        // keys on top 1.015× / 1.034×, session 27; `benches/RESULTS.md`). Staged rows were
        // read just now.
        if self.direct && !self.ahead.is_some_and(|a| a.holds(j, ks, vs)) {
            prefetch(k.as_ptr() as *const u8, self.row_bytes, Level::L2);
            prefetch(v.as_ptr() as *const u8, self.row_bytes, Level::L2);
        }
        self.ktok[j] = t;
        self.filled += 1;
        if self.filled == self.g.keys {
            self.flush::<S, NR, MV>();
        }
    }

    /// Adds key token `t` (its row `k`) for scoring only (no value); the caller runs `score`
    /// when `is_full`.
    #[inline(always)]
    pub fn push_key<S: Simd, E: Element>(&mut self, k: &[E], t: usize) {
        let j = self.filled;
        // On AMX the key row is staged in bf16 instead of widened (`kptr` is not read there).
        #[cfg(target_arch = "x86_64")]
        let staged = self.amx.as_mut().map(|a| a.stage(j, Self::bits(k))).is_some();
        #[cfg(not(target_arch = "x86_64"))]
        let staged = false;
        if !staged {
            self.kptr[j] = Self::slot::<S, E>(self.direct, &mut self.kconv, j, self.g, k);
        }
        self.ktok[j] = t;
        self.filled += 1;
    }

    pub fn is_full(&self) -> bool {
        self.filled == self.g.keys
    }

    /// Number of keys waiting in the tile.
    pub fn filled(&self) -> usize {
        self.filled
    }

    /// Token of the first key in the tile.
    pub fn first_token(&self) -> usize {
        self.ktok[0]
    }

    /// Empties the tile after its scores were consumed.
    pub fn reset_keys(&mut self) {
        self.filled = 0;
    }

    /// A pointer to row `src` in f32: in place when possible, else widened into slot `j` of `conv`.
    #[inline(always)]
    fn slot<S: Simd, E: Element>(direct: bool, conv: &mut [f32], j: usize, g: Geom, src: &[E]) -> *const f32 {
        if direct {
            src.as_ptr() as *const f32
        } else {
            let c = &mut conv[j * g.dp..(j + 1) * g.dp];
            // SAFETY: the slot holds dp >= D values.
            unsafe { S::widen(&src[..g.d], c) };
            c.as_ptr()
        }
    }

    /// Scores the filled keys: Sᵀ = K·Qᵀ for all row chunks, with padded slots and the causal
    /// diagonal masked to -inf. Returns the number of slots used (a multiple of NR).
    #[inline(always)]
    pub fn score<S: Simd, const NR: usize, const MV: usize>(&mut self) -> usize {
        self.score_rows::<S, NR, MV, false>(self.g.mp).0
    }

    /// [`Tile::score`] for the row chunks below `rows` only; with `ROW_MAX`, each row's largest
    /// score also goes into `smax`. Returns the slots used and whether any score was masked
    /// (padding or the causal diagonal: `smax` then counts scores the softmax must not see).
    #[inline(always)]
    fn score_rows<S: Simd, const NR: usize, const MV: usize, const ROW_MAX: bool>(
        &mut self,
        rows: usize,
    ) -> (usize, bool) {
        let n = self.filled;
        let np = n.next_multiple_of(NR);
        let (mp, d) = (self.g.mp, self.g.d);
        for j in n..np {
            self.kptr[j] = self.zero.as_ptr();
            self.vptr[j] = self.zero.as_ptr();
        }
        #[cfg(target_arch = "x86_64")]
        let on_amx = if let Some(a) = &mut self.amx {
            // SAFETY: AMX scores are only made for Isa::Amx, whose entry point runs this.
            unsafe { a.score(n, &mut self.st) };
            true
        } else {
            false
        };
        #[cfg(not(target_arch = "x86_64"))]
        let on_amx = false;
        if ROW_MAX {
            self.smax[..rows].fill(f32::NEG_INFINITY);
        }
        for c0 in (0..if on_amx { 0 } else { rows }).step_by(MV * S::LANES) {
            for j0 in (0..np).step_by(NR) {
                let krows: &[*const f32; NR] = self.kptr[j0..j0 + NR].try_into().unwrap();
                // SAFETY: Qᵀ holds d rows of mp values, Sᵀ np rows of mp; key rows hold d values.
                unsafe {
                    micro::qk::<S, NR, MV, ROW_MAX>(
                        self.qt.as_ptr().add(c0),
                        mp,
                        krows,
                        d,
                        self.st.as_mut_ptr().add(j0 * mp + c0),
                        mp,
                        self.smax.as_mut_ptr().add(c0),
                    )
                };
            }
        }
        for j in n..np {
            self.st[j * mp..(j + 1) * mp].fill(f32::NEG_INFINITY);
        }
        // Scores from AMX never pass through `qk`'s epilogue: `smax` holds nothing then.
        let mut masked_any = np > n || (ROW_MAX && on_amx);
        for j in 0..n {
            let t = self.ktok[j];
            if t >= self.diag_from {
                let masked = ((t - self.diag_from) * self.row_group).min(mp);
                self.st[j * mp..j * mp + masked].fill(f32::NEG_INFINITY);
                masked_any |= masked > 0;
            }
        }
        (np, masked_any)
    }

    /// Runs the filled keys through the online softmax and into Oᵀ.
    #[inline(always)]
    pub fn flush<S: Simd, const NR: usize, const MV: usize>(&mut self) {
        if self.filled == 0 {
            return;
        }
        let (np, masked) = self.score_rows::<S, NR, MV, true>(self.live);
        let (mp, live) = (self.g.mp, self.live);
        // SAFETY: all offsets stay within the mp-wide rows of st, m, l, alpha and smax.
        unsafe {
            for c in (0..live).step_by(S::LANES) {
                let m_old = S::load(self.m.as_ptr().add(c));
                // The max `qk` took in registers, unless masks changed scores after it: then
                // the scores as masked, read back (the diagonal's and the last tile's only).
                let mut mx = S::max(m_old, S::load(self.smax.as_ptr().add(c)));
                if masked {
                    mx = m_old;
                    for j in 0..np {
                        mx = S::max(mx, S::load(self.st.as_ptr().add(j * mp + c)));
                    }
                }
                // Rows that have seen no key yet keep a finite reference (no -inf - -inf).
                let mx = S::max(mx, S::splat(f32::MIN));
                let mut sum = S::zero();
                for j in 0..np {
                    let p = self.st.as_mut_ptr().add(j * mp + c);
                    let e = S::exp2_nonpositive(S::sub(S::load(p), mx));
                    S::store(p, e);
                    sum = S::add(sum, e);
                }
                let alpha = S::exp2_nonpositive(S::sub(m_old, mx));
                S::store(self.alpha.as_mut_ptr().add(c), alpha);
                S::store(self.l.as_mut_ptr().add(c), S::fma(S::load(self.l.as_ptr().add(c)), alpha, sum));
                S::store(self.m.as_mut_ptr().add(c), mx);
            }
            // The next tile's rows, asked into L2 a row every few keys of the `pv` calls.
            let calls = live.div_ceil(MV * S::LANES) * (self.g.dp / NR);
            let mut rows = std::mem::take(&mut self.ahead_rows);
            self.ahead = Ahead::after(self, calls, np, &mut rows);
            self.ahead_rows = rows;
            let per_call = self.ahead_rows.len().div_ceil(calls).max(1);
            let bytes = self.row_bytes;
            let mut call = 0;
            for c0 in (0..live).step_by(MV * S::LANES) {
                for d0 in (0..self.g.dp).step_by(NR) {
                    let ahead = match self.ahead_rows.chunks(per_call).nth(call) {
                        Some(rows) => micro::AskAhead { rows, bytes, every: np / per_call },
                        None => micro::AskAhead::NONE,
                    };
                    call += 1;
                    micro::pv::<S, NR, MV>(
                        self.ot.as_mut_ptr().add(d0 * mp + c0),
                        mp,
                        self.alpha.as_ptr().add(c0),
                        self.st.as_ptr().add(c0),
                        mp,
                        &self.vptr[..np],
                        d0,
                        ahead,
                    );
                }
            }
        }
        self.filled = 0;
    }

    /// Output of row `r` (after the last flush): `Oᵀ[·][r] / l[r]` into `out`.
    #[inline(always)]
    pub fn write_row<E: Element>(&self, r: usize, out: &mut [E], tmp: &mut [f32]) {
        let mp = self.g.mp;
        let inv = 1.0 / self.l[r];
        for (dd, x) in tmp[..out.len()].iter_mut().enumerate() {
            *x = self.ot[dd * mp + r] * inv;
        }
        E::narrow(&tmp[..out.len()], out);
    }

    /// Natural-log sum-exp of row `r`, given that scores were scaled by `log2(e)`.
    pub fn lse(&self, r: usize) -> f32 {
        (self.m[r] + self.l[r].log2()) * std::f32::consts::LN_2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::simd::{Isa, WithSimd, dispatch};
    use crate::synth::{Rng, test_seed};

    /// Two calls on one tile, as a workspace runs them: a first whose scores all lie far above
    /// the second's (`smax` must not carry them over), then the call checked — `rows` queries
    /// over `k`/`v`, masked causally from token `diag_from` (row `r` is token `diag_from + r`).
    struct Calls<'a> {
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
        d: usize,
        c: f32,
        diag_from: usize,
    }

    impl Calls<'_> {
        /// The checked call's outputs (poisoned before) and running maxima.
        fn run<S: Simd, const NR: usize, const MV: usize>(&self) -> (Vec<f32>, Vec<f32>) {
            let (d, rows, keys) = (self.d, self.q.len() / self.d, self.k.len() / self.d);
            let mut tile = Tile::new::<f32>(Geom::new(S::LANES, d, rows));
            let mut tmp = vec![0f32; d];
            for (c, diag_from) in [(4.0 * self.c, usize::MAX), (self.c, self.diag_from)] {
                tile.begin(diag_from, 1);
                for r in 0..rows {
                    tile.set_query::<S, f32>(r, &self.q[r * d..(r + 1) * d], c, &mut tmp);
                }
                tile.clear_queries(rows);
                for t in 0..keys {
                    tile.push_rows::<S, f32, NR, MV>(&self.k[t * d..(t + 1) * d], &self.v[t * d..(t + 1) * d], t);
                }
                tile.flush::<S, NR, MV>();
            }
            let mut out = vec![f32::NAN; rows * d];
            for (r, o) in out.chunks_exact_mut(d).enumerate() {
                tile.write_row(r, o, &mut tmp);
            }
            (out, tile.m[..rows].to_vec())
        }

        /// The checked call in f64: outputs and each row's largest visible score.
        fn oracle(&self) -> (Vec<f64>, Vec<f64>) {
            let d = self.d;
            let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>();
            let (mut out, mut maxima) = (vec![], vec![]);
            for (r, q) in self.q.chunks_exact(d).enumerate() {
                let visible = self.diag_from.saturating_add(r + 1).min(self.k.len() / d);
                let s: Vec<f64> = self.k.chunks_exact(d).take(visible).map(|k| self.c as f64 * dot(q, k)).collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = s.iter().map(|s| (s - m).exp2()).collect();
                let l: f64 = p.iter().sum();
                out.extend(
                    (0..d).map(|i| self.v.chunks_exact(d).zip(&p).map(|(v, p)| p * v[i] as f64).sum::<f64>() / l),
                );
                maxima.push(m);
            }
            (out, maxima)
        }
    }

    impl WithSimd for &Calls<'_> {
        type Output = (Vec<f32>, Vec<f32>);
        fn with_simd<S: Simd>(self) -> Self::Output {
            if S::LANES >= 16 { self.run::<S, 8, 3>() } else { self.run::<S, 4, 3>() }
        }
    }

    /// `n` values uniform in `[-1, 1)`.
    fn noise(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect()
    }

    /// The softmax's reference is each row's largest score, which `qk` takes in registers on
    /// unmasked tiles and the max pass reads back on masked ones. Every row gets one key scoring
    /// 200 (log2) above the rest, at a random place (any slot of a register block, any tile,
    /// some past the causal diagonal): a reference that misses it overflows the weights (NaN),
    /// one that counts a masked or another row's spike, or the last call's scores, shows in the
    /// running max and in the outputs. Full tiles on both sides of the diagonal, a partial one
    /// last, and all scores far below zero (where the padded slots' zeros would win); on every ISA.
    #[test]
    fn row_maxima_taken_in_qk_match_the_scores_on_every_isa() {
        let (rows, d, keys) = (53, 64, 2 * KEYS_PER_TILE + 37);
        let mut rng = Rng::new(test_seed());
        // (causal diagonal, all scores shifted by this, log2 units)
        for (diag_from, shift) in [(usize::MAX, 0.0), (200, 0.0), (40, 0.0), (usize::MAX, -500.0)] {
            let mut q = noise(&mut rng, rows * d);
            let mut k = noise(&mut rng, keys * d);
            let v = noise(&mut rng, keys * d);
            let c = 0.5;
            // Dims below `rows` one-hot: row r scores `c·400` against its spike key, 0 elsewhere.
            let spikes: Vec<usize> = (0..rows).map(|_| rng.below(keys)).collect();
            for (r, row) in q.chunks_exact_mut(d).enumerate() {
                row[..rows].iter_mut().enumerate().for_each(|(i, x)| *x = (i == r) as u8 as f32);
            }
            for (t, row) in k.chunks_exact_mut(d).enumerate() {
                row[..rows].iter_mut().enumerate().for_each(|(i, x)| *x = if spikes[i] == t { 400.0 } else { 0.0 });
                row[d - 1] = shift / c;
            }
            // A shift far below 0 makes the padded key slots (zero rows, score 0) the largest if
            // they were not masked out of the reference.
            q.chunks_exact_mut(d).for_each(|row| row[d - 1] = 1.0);
            let calls = Calls { q: &q, k: &k, v: &v, d, c, diag_from };
            let (want, want_max) = calls.oracle();
            for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
                let (got, got_max) = dispatch(isa, &calls);
                for (r, (&g, &w)) in got_max.iter().zip(&want_max).enumerate() {
                    assert!(
                        (g as f64 - w).abs() <= 1e-4 * w.abs().max(1.0),
                        "{isa:?} diag {diag_from}: row {r} max {g}, want {w}"
                    );
                }
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!((g as f64 - w).abs() <= 5e-5, "{isa:?} diag {diag_from}: out[{i}] = {g}, want {w}");
                }
            }
        }
        for isa in Isa::ALL.into_iter().filter(|i| !i.supported()) {
            eprintln!("SKIP {}: this CPU lacks it", isa.name());
        }
    }

    /// What a flush guessed of the next tile: the guess (if any), its rows, and whether each
    /// of the next `KEYS_PER_TILE` pushes would have found its rows guessed.
    struct Guess {
        ahead: bool,
        rows: Vec<usize>,
        held: Vec<bool>,
    }

    /// One flush over the rows `order` of `k`/`v` (`d` values each, `stride` apart) with
    /// `rows` queries; then the rows that follow `order`'s last held against the guess.
    struct Flush<'a, E> {
        k: &'a [E],
        v: &'a [E],
        d: usize,
        stride: usize,
        rows: usize,
        order: &'a [usize],
    }

    impl<E: Element> WithSimd for &Flush<'_, E> {
        type Output = Guess;
        fn with_simd<S: Simd>(self) -> Guess {
            if S::LANES >= 16 { self.run::<S, 8, 3>() } else { self.run::<S, 4, 3>() }
        }
    }

    impl<E: Element> Flush<'_, E> {
        fn run<S: Simd, const NR: usize, const MV: usize>(&self) -> Guess {
            let mut tile = Tile::new::<E>(Geom::new(S::LANES, self.d, self.rows));
            tile.begin(usize::MAX, 1);
            tile.clear_queries(self.rows);
            for &t in self.order {
                let (k, v) = (&self.k[t * self.stride..][..self.d], &self.v[t * self.stride..][..self.d]);
                tile.push_rows::<S, E, NR, MV>(k, v, t);
            }
            tile.flush::<S, NR, MV>();
            let last = *self.order.last().unwrap();
            let held = (0..KEYS_PER_TILE)
                .map(|j| {
                    // Addresses only (past the buffers for some cases): nothing is read.
                    let at = |x: &[E]| x.as_ptr().wrapping_add((last + 1 + j) * self.stride) as usize;
                    tile.ahead.is_some_and(|a| a.holds(j, at(self.k), at(self.v)))
                })
                .collect();
            Guess { ahead: tile.ahead.is_some(), rows: tile.ahead_rows.clone(), held }
        }
    }

    /// A full tile of rows one stride apart (a contiguous run of a cache) makes its flush guess
    /// the next tile as the run's next rows: every one of them is held by the guess and asked
    /// for (K and V) exactly once. Rows not one stride apart at the ends (the guess looks at the
    /// first two and the last: it is a hint the pushes check), a partial tile, and a tile with
    /// too few `pv` calls to spread the requests (more than a line every two keys) guess
    /// nothing: their next pushes ask for their own rows. f32 rows (read in place) and f16 rows
    /// (widened into the tile at push: the guess is of the caller's rows), on every ISA.
    #[test]
    fn next_tile_rows_are_guessed_from_evenly_spaced_rows_only() {
        let mut rng = Rng::new(test_seed());
        let stride = 128;
        let (k, v) = (noise(&mut rng, 3 * KEYS_PER_TILE * stride), noise(&mut rng, 3 * KEYS_PER_TILE * stride));
        guesses(&k, &v, stride, &mut rng);
        let half = |x: &[f32]| x.iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>();
        guesses(&half(&k), &half(&v), stride, &mut rng);
        for isa in Isa::ALL.into_iter().filter(|i| !i.supported()) {
            eprintln!("SKIP {}: this CPU lacks it", isa.name());
        }
    }

    fn guesses<E: Element>(k: &[E], v: &[E], stride: usize, rng: &mut Rng) {
        let (d, n) = (64, KEYS_PER_TILE);
        let run: Vec<usize> = (n..2 * n).collect();
        let mut swapped = run.clone();
        swapped.swap(0, 1);
        // Two blocks of a sparse list, the second further on by a random number of rows.
        let gap = 1 + rng.below(n / 2);
        let blocks: Vec<usize> = (n..n + n / 2).chain(n + n / 2 + gap..2 * n + gap).collect();
        // (case, head dim, query rows, keys pushed, guessed)
        let cases = [
            ("a contiguous run", d, 192, run.clone(), true),
            ("its first two rows swapped", d, 192, swapped, false),
            ("two blocks apart", d, 192, blocks, false),
            ("a partial tile", d, 192, run[..n - 1].to_vec(), false),
            // One row chunk, one register block of D: a pv call or two for 256 rows.
            ("one row chunk of queries at D 8", 8, 5, run.clone(), false),
        ];
        for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
            for (case, d, rows, order, guessed) in &cases {
                let f = Flush { k, v, d: *d, stride, rows: *rows, order };
                let g = dispatch(isa, &f);
                let (isa, case) = (isa.name(), format!("{} {case}", E::DTYPE));
                assert_eq!(g.ahead, *guessed, "{isa}, {case}: guessed");
                if !guessed {
                    assert!(g.held.iter().all(|h| !h), "{isa}, {case}: rows held without a guess");
                    continue;
                }
                assert!(g.held.iter().all(|&h| h), "{isa}, {case}: next rows not all held");
                let mut want: Vec<usize> = (2 * n..3 * n)
                    .flat_map(|t| [k.as_ptr(), v.as_ptr()].map(|p| p.wrapping_add(t * stride) as usize))
                    .collect();
                let mut got = g.rows.clone();
                want.sort_unstable();
                got.sort_unstable();
                assert_eq!(got, want, "{isa}, {case}: the rows asked");
            }
        }
    }
}

//! Compression in place (SPEC §7.5): selection (§4 steps 1–5 per sequence, on the backends) and
//! compaction (a copy, here): each head's kept entries move to positions `0..keep` of its own
//! pages, in ascending order, and its length becomes `keep`.

use super::Workspace;
use super::cache::{BlockTable, CacheDims, CacheParts, KvCache, KvCacheMut, entry_offset};
use crate::backend::{Capabilities, Op};
use crate::compress::{AdaKvCut, ShardPool};
use crate::config::{DecodeConfig, GqaMode};
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, Layout, TensorView};
use crate::validate::CompressDims;
use half::{bf16, f16};

/// Per (sequence, cache head) the positions to keep, ascending, window included (SPEC §7.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Cache heads.
    pub heads: usize,
    /// Per sequence: whether it is compressed (`false`: left as it is, no lists).
    pub compressed: Vec<bool>,
    /// `[sequences · heads + 1]` offsets into `positions`.
    pub indptr: Vec<usize>,
    /// Kept positions, in tokens.
    pub positions: Vec<u32>,
}

impl Selection {
    /// The kept positions of (sequence `i`, head `h`).
    pub fn kept(&self, i: usize, h: usize) -> &[u32] {
        let u = i * self.heads + h;
        &self.positions[self.indptr[u]..self.indptr[u + 1]]
    }

    /// Assembles a selection from per-(sequence, head) lists (empty for sequences not compressed).
    pub fn from_lists(heads: usize, compressed: Vec<bool>, lists: impl IntoIterator<Item = Vec<u32>>) -> Self {
        let mut s = Selection { heads, compressed, indptr: vec![0], positions: Vec::new() };
        for l in lists {
            s.positions.extend_from_slice(&l);
            s.indptr.push(s.positions.len());
        }
        s
    }
}

/// Validated arguments of a selection over a cache.
#[derive(Clone, Debug)]
pub struct SelectArgs<'a> {
    cache: KvCache<'a>,
    obs: TensorView<'a>,
    cfg: &'a DecodeConfig,
    compress: Vec<bool>,
    scale: f32,
    dims: CompressDims,
}

impl<'a> SelectArgs<'a> {
    /// The cache.
    pub fn cache(&self) -> &KvCache<'a> {
        &self.cache
    }
    /// Observation queries `[sequences, Hq, W, D]`.
    pub fn obs(&self) -> TensorView<'a> {
        self.obs
    }
    /// The decode configuration.
    pub fn cfg(&self) -> &'a DecodeConfig {
        self.cfg
    }
    /// Which sequences compress: asked for and holding at least `decode_budget` entries in some
    /// head (SPEC §4: shorter caches are left as they are).
    pub fn compress(&self) -> &[bool] {
        &self.compress
    }
    /// The softmax scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// `batch` = sequences, `kv_heads` = cache heads, `entries` = the longest head, `window` W.
    pub fn dims(&self) -> CompressDims {
        self.dims
    }
}

/// Validates a selection: the cache (any heads dividing Hq; `per_query_head` needs a cache of Hq
/// heads, since compaction cannot add heads), `obs` `[sequences, Hq, W, D]`, `which` (empty:
/// every sequence).
pub fn select<'a>(
    caps: &Capabilities,
    cache: &KvCache<'a>,
    obs: TensorView<'a>,
    cfg: &'a DecodeConfig,
    which: &[bool],
) -> Result<SelectArgs<'a>> {
    let (compress, scale, dims) = select_shape(caps, &cache.parts(), &obs, cfg, which)?;
    Ok(SelectArgs { cache: cache.clone(), obs, cfg, compress, scale, dims })
}

/// The checks of a selection over any cache (host pools or a device's, through their parts):
/// which sequences compress, the softmax scale and the scoring's dims.
pub(crate) fn select_shape(
    caps: &Capabilities,
    cache: &CacheParts<'_>,
    obs: &dyn Layout,
    cfg: &DecodeConfig,
    which: &[bool],
) -> Result<(Vec<bool>, f32, CompressDims)> {
    if !caps.supports(Op::Select) {
        return Err(Error::Unimplemented { backend: caps.backend, op: "select" });
    }
    cfg.validate()?;
    let c = cache.check(false)?;
    obs.check_layout("obs")?;
    let [n, hq, w, d] = obs.shape();
    if n != c.sequences || w != cfg.window || d != c.head_dim || hq == 0 {
        return Err(Error::Shape {
            what: "obs",
            expected: format!("[{} sequences, Hq, window={}, {}]", c.sequences, cfg.window, c.head_dim),
            got: obs.shape().to_vec(),
        });
    }
    if hq % c.heads != 0 {
        return Err(Error::HeadGrouping { q_heads: hq, kv_heads: c.heads });
    }
    if cfg.gqa_mode == GqaMode::PerQueryHead && c.heads != hq {
        return Err(Error::range(
            "gqa_mode",
            "per_query_head",
            format!(
                "in-place compression keeps the cache's {} heads; allocate the cache with Hq = {hq} heads",
                c.heads
            ),
        ));
    }
    if obs.dtype() != cache.k.0 {
        return Err(Error::DTypeMismatch { what: "obs", expected: cache.k.0, got: obs.dtype() });
    }
    if !caps.dtypes.contains(&obs.dtype()) {
        return Err(Error::UnsupportedDType { dtype: obs.dtype(), backend: caps.backend });
    }
    if !caps.supports_head_dim(d) {
        return Err(Error::UnsupportedHeadDim { head_dim: d, backend: caps.backend, supported: caps.head_dims_text() });
    }
    if !which.is_empty() && which.len() != c.sequences {
        return Err(Error::Shape {
            what: "which",
            expected: format!("{} (one per sequence)", c.sequences),
            got: vec![which.len()],
        });
    }
    let lens = cache.lens;
    let mut compress = Vec::with_capacity(c.sequences);
    for i in 0..c.sequences {
        let heads = &lens[i * c.heads..(i + 1) * c.heads];
        let longest = heads.iter().copied().max().unwrap_or(0) as usize;
        let go = (which.is_empty() || which[i]) && longest >= cfg.decode_budget;
        if go && let Some(h) = heads.iter().position(|&l| (l as usize) < w) {
            return Err(Error::range(
                "cache lengths",
                heads[h],
                format!("sequence {i} head {h} holds fewer entries than the window ({w})"),
            ));
        }
        compress.push(go);
    }
    let entries = (0..c.sequences * c.heads).map(|u| lens[u] as usize).max().unwrap_or(0);
    let scale = crate::validate::resolve_scale(cfg.scale, d)?;
    let dims = CompressDims { batch: c.sequences, kv_heads: c.heads, q_heads: hq, entries, window: w, head_dim: d };
    Ok((compress, scale, dims))
}

/// The pooled decode scores of a selection call (SPEC §4 steps 1–4): per (sequence, head) a row
/// of `N_h − W` scores for the compressing sequences (empty for the others). What selection
/// ranks, and what tensor-parallel shards exchange for AdaKV (SPEC §7.7).
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    /// Cache heads.
    pub heads: usize,
    /// Observation window, in tokens.
    pub window: usize,
    /// Per sequence: whether it is compressed.
    pub compressed: Vec<bool>,
    /// `[sequences, heads]` lengths of the scored cache.
    pub lens: Vec<u32>,
    /// `rows[i·heads + h]`.
    pub rows: Vec<Vec<f32>>,
}

impl Scores {
    /// The scores of validated arguments.
    pub fn of(a: &SelectArgs<'_>, rows: Vec<Vec<f32>>) -> Self {
        let d = a.dims();
        Scores {
            heads: d.kv_heads,
            window: d.window,
            compressed: a.compress().to_vec(),
            lens: a.cache().lens().to_vec(),
            rows,
        }
    }

    fn assemble(&self, mut kept_of: impl FnMut(usize, &[Vec<f32>]) -> Result<Vec<Vec<u32>>>) -> Result<Selection> {
        let (hc, w) = (self.heads, self.window as u32);
        let mut lists = Vec::with_capacity(self.compressed.len() * hc);
        for (i, &go) in self.compressed.iter().enumerate() {
            if !go {
                lists.extend((0..hc).map(|_| Vec::new()));
                continue;
            }
            for (h, mut kept) in kept_of(i, &self.rows[i * hc..(i + 1) * hc])?.into_iter().enumerate() {
                let n = self.lens[i * hc + h];
                kept.extend(n - w..n);
                lists.push(kept);
            }
        }
        Ok(Selection::from_lists(hc, self.compressed.clone(), lists))
    }

    /// Selection by the shared rules (uniform or AdaKV budgets, `crate::compress::select_heads`),
    /// each head's last W entries appended.
    pub fn select(&self, cfg: &DecodeConfig) -> Result<Selection> {
        self.assemble(|_, rows| crate::compress::select_heads(rows, cfg))
    }

    /// A tensor-parallel shard's AdaKV inputs, per sequence (`None` where it does not compress):
    /// its heads are the layer's `first_head..first_head + heads` of `total_heads`.
    pub fn adakv_pools(
        &self,
        cfg: &DecodeConfig,
        first_head: usize,
        total_heads: usize,
    ) -> Result<Vec<Option<ShardPool>>> {
        let hc = self.heads;
        (0..self.compressed.len())
            .map(|i| {
                self.compressed[i]
                    .then(|| {
                        crate::compress::adakv_pool(&self.rows[i * hc..(i + 1) * hc], cfg, first_head, total_heads)
                    })
                    .transpose()
            })
            .collect()
    }

    /// A shard's AdaKV selection with the cuts reduced over every shard (one per sequence; see
    /// `crate::compress::adakv_reduce`): exactly the unsharded selection of its heads.
    pub fn select_with_cuts(
        &self,
        cfg: &DecodeConfig,
        first_head: usize,
        cuts: &[Option<AdaKvCut>],
    ) -> Result<Selection> {
        if cuts.len() != self.compressed.len() {
            return Err(Error::PlanMismatch(format!("{} cuts for {} sequences", cuts.len(), self.compressed.len())));
        }
        self.assemble(|i, rows| match cuts[i] {
            Some(cut) => crate::compress::adakv_with_cut(rows, cfg, first_head, cut),
            None => Err(Error::PlanMismatch(format!("sequence {i} compresses but has no reduced cut"))),
        })
    }
}

/// Moves each compressed head's kept entries to positions `0..keep` of its pages, in ascending
/// order (entry `p_j → j` with `p_j ≥ j`: no read after a write that could clobber it), and sets
/// its length. Checked before the first write: the selection fits the cache (ascending positions
/// below each length), and no page it writes is used by another sequence.
pub fn compact(cache: &mut KvCacheMut<'_>, sel: &Selection, ws: &mut Workspace) -> Result<()> {
    compact_with(cache, sel, ws, |cache, sel| {
        move_on_host(cache, sel);
        Ok(())
    })
}

/// [`compact`] with the entries moved by `moves` (a backend's kernel) once every check passed;
/// the lengths change only when it succeeds.
pub(crate) fn compact_with(
    cache: &mut KvCacheMut<'_>,
    sel: &Selection,
    ws: &mut Workspace,
    moves: impl FnOnce(&mut KvCacheMut<'_>, &Selection) -> Result<()>,
) -> Result<()> {
    check(&cache.parts(), sel, ws)?;
    moves(cache, sel)?;
    keep_lengths(cache.lens, sel);
    Ok(())
}

/// The checks of [`compact`] on any cache (host pools, or a device's through their parts):
/// the selection fits it, and no page it rewrites is used by another sequence.
pub(crate) fn check(cache: &CacheParts<'_>, sel: &Selection, ws: &mut Workspace) -> Result<CacheDims> {
    let c = cache.check(true)?;
    check_selection(&c, cache.lens, sel)?;
    check_rewritten_pages(&c, cache.table, cache.lens, &sel.compressed, ws)?;
    Ok(c)
}

/// The lengths (`[sequences, heads]`) after compaction by `sel`: each compressed head's kept count.
pub(crate) fn keep_lengths(lens: &mut [u32], sel: &Selection) {
    for (u, l) in lens.iter_mut().enumerate() {
        if sel.compressed[u / sel.heads] {
            *l = sel.kept(u / sel.heads, u % sel.heads).len() as u32;
        }
    }
}

/// The kept entries moved to each compressed head's first entries, on the host.
pub(crate) fn move_on_host(cache: &mut KvCacheMut<'_>, sel: &Selection) {
    match cache.k.dtype() {
        DType::F32 => move_entries::<f32>(cache, sel),
        DType::F16 => move_entries::<f16>(cache, sel),
        DType::BF16 => move_entries::<bf16>(cache, sel),
    }
}

/// No page a compaction rewrites (those of the `compressed` sequences' entries) is used by
/// another sequence, or twice by its own.
pub(crate) fn check_rewritten_pages(
    c: &CacheDims,
    table: &BlockTable<'_>,
    lens: &[u32],
    compressed: &[bool],
    ws: &mut Workspace,
) -> Result<()> {
    let generation = ws.next_generation(c.pages())?;
    let ps = c.page_size;
    for i in (0..c.sequences).filter(|&i| compressed[i]) {
        let used = lens[i * c.heads..(i + 1) * c.heads].iter().copied().max().unwrap_or(0) as usize;
        for &page in &table.row(i)[..used.div_ceil(ps)] {
            let owner = &mut ws.page_owner[page as usize];
            if owner.0 == generation {
                // Twice in its own row: two logical pages would alias, and entries moved to one
                // would overwrite sources read through the other.
                return Err(shared_page(page, owner.1 as usize, i));
            }
            *owner = (generation, i as u32);
        }
    }
    for i in (0..c.sequences).filter(|&i| !compressed[i]) {
        let used = lens[i * c.heads..(i + 1) * c.heads].iter().copied().max().unwrap_or(0) as usize;
        for &page in &table.row(i)[..used.div_ceil(ps)] {
            let owner = ws.page_owner[page as usize];
            if owner.0 == generation {
                return Err(shared_page(page, owner.1 as usize, i));
            }
        }
    }
    Ok(())
}

fn shared_page(page: u32, a: usize, b: usize) -> Error {
    let users = if a == b { format!("twice by sequence {a}") } else { format!("by sequences {a} and {b}") };
    Error::range("block table", page, format!("page {page} is used {users}; compaction would rewrite it"))
}

fn check_selection(c: &CacheDims, lens: &[u32], sel: &Selection) -> Result<()> {
    let units = c.sequences * c.heads;
    if sel.heads != c.heads || sel.compressed.len() != c.sequences || sel.indptr.len() != units + 1 {
        return Err(Error::PlanMismatch(format!(
            "the selection is for {} sequences × {} heads; the cache has {} × {}",
            sel.compressed.len(),
            sel.heads,
            c.sequences,
            c.heads
        )));
    }
    if sel.indptr[0] != 0 || sel.indptr[units] != sel.positions.len() || sel.indptr.windows(2).any(|w| w[1] < w[0]) {
        return Err(Error::PlanMismatch("selection offsets must rise from 0 to positions.len()".into()));
    }
    for i in 0..c.sequences {
        for h in 0..c.heads {
            let kept = sel.kept(i, h);
            if !sel.compressed[i] {
                if !kept.is_empty() {
                    return Err(Error::PlanMismatch(format!("sequence {i} is not compressed but head {h} has a list")));
                }
                continue;
            }
            let len = lens[i * c.heads + h];
            if kept.windows(2).any(|w| w[1] <= w[0]) || kept.last().is_some_and(|&p| p >= len) {
                return Err(Error::PlanMismatch(format!(
                    "sequence {i} head {h}: kept positions must ascend strictly and lie below its {len} entries"
                )));
            }
        }
    }
    Ok(())
}

fn move_entries<E: Element>(cache: &mut KvCacheMut<'_>, sel: &Selection) {
    let layout = cache.layout;
    let (heads, d) = (layout.heads, layout.head_dim);
    for pool in [&mut cache.k, &mut cache.v] {
        let data = pool.typed_mut::<E>().expect("dtype checked");
        for i in (0..sel.compressed.len()).filter(|&i| sel.compressed[i]) {
            for h in 0..heads {
                for (j, &p) in sel.kept(i, h).iter().enumerate() {
                    if p as usize != j {
                        let src = entry_offset(&layout, &cache.table, i, h, p as usize);
                        let dst = entry_offset(&layout, &cache.table, i, h, j);
                        data.copy_within(src..src + d, dst);
                    }
                }
            }
        }
    }
}

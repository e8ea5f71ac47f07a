//! `entropy-kernels inspect QKV.safetensors`: the per-head entropy profile and head classes of
//! a layer, and an SVG (see [`svg`]) with heatmaps (kv heads × segments) of entropy and budgets
//! and, per kv head, the map of the key blocks each query segment keeps. With `--chunk N` the
//! layer is planned the way a serving loop prefills it: in chunks of N tokens over a paged cache.

mod svg;

use std::path::PathBuf;

use clap::Args;
use entropy_kernels::io::Case;
use entropy_kernels::{
    BlockLists, ChunkRequest, Config, EntropyConfig, Error, HeadClass, HeadClassMode, HostTensor, Kernels, PageLayout,
    PagedCache, Plan, PlanDims, PlanRequest, PlanState, Result, SegmentAttention, Workspace,
};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A safetensors file with `q` and `k` (BSND); the config is read from its metadata if present.
    pub input: PathBuf,
    /// Where to write the SVG heatmap (default: next to the input, `.heatmap.svg`).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// A JSON config that overrides the file's.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub segment_size: Option<usize>,
    #[arg(long)]
    pub block_size: Option<usize>,
    #[arg(long)]
    pub base_budget: Option<usize>,
    /// Plan in chunks of N tokens (a multiple of the segment size) over a paged cache, every
    /// batch entry a sequence, with `head_class = streaming`.
    #[arg(long, value_name = "N")]
    pub chunk: Option<usize>,
    #[command(flatten)]
    pub backend: super::BackendArg,
}

const SPARK: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Tokens per page of the cache `--chunk` plans over (vLLM's default).
const PAGE_SIZE: usize = 16;

fn config_of(a: &InspectArgs, case: Option<&Case>) -> Result<EntropyConfig> {
    let mut cfg = match (&a.config, case) {
        (Some(p), _) => Config::load(p)?.prefill,
        (None, Some(c)) => c.config.prefill.clone(),
        (None, None) => EntropyConfig::default(),
    };
    if let Some(s) = a.segment_size {
        cfg.segment_size = s;
    }
    if let Some(b) = a.block_size {
        cfg.block_size = b;
    }
    if let Some(b) = a.base_budget {
        cfg.base_budget = b;
    }
    if a.chunk.is_some() {
        // Chunked planning decides head classes causally (SPEC §7.2).
        cfg.head_class = HeadClassMode::Streaming;
    }
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(a: &InspectArgs) -> Result<()> {
    let kernels: Kernels = a.backend.kernels()?;
    let case = Case::load(&a.input)?;
    if !case.config_present && a.config.is_none() {
        eprintln!("note: {} has no `config` metadata; using the defaults and the flags", a.input.display());
    }
    inspect(a, &kernels, &case)
}

/// What `inspect` shows of a layer: per (b, kv head, segment) entropy and budget, the head
/// classes and the block lists, taken from one plan or merged from a prompt's chunk plans.
#[derive(Clone, Debug, PartialEq)]
struct Layer {
    dims: PlanDims,
    /// `[B, Hkv, nseg]` nats.
    entropy: Vec<f32>,
    /// `[B, Hkv, nseg]` tokens.
    budgets: Vec<f32>,
    /// `[B, Hkv]`.
    head_class: Vec<HeadClass>,
    blocks: BlockLists,
}

impl Layer {
    fn from_plan(plan: Plan) -> Layer {
        Layer {
            dims: plan.dims,
            entropy: plan.entropy,
            budgets: plan.budgets,
            head_class: plan.head_class,
            blocks: plan.blocks,
        }
    }

    /// Every sequence's chunk plans (batch 1 each) as one layer of `seqs.len()` batch entries:
    /// each segment is taken from the chunk that planned it, the head classes from the last
    /// chunk (the streaming class after the whole prompt).
    fn from_chunks(seqs: &[Vec<Plan>]) -> Layer {
        let dims = PlanDims { batch: seqs.len(), ..seqs[0][0].dims };
        let units: Vec<(usize, usize, usize)> = (0..dims.batch)
            .flat_map(|b| (0..dims.kv_heads).flat_map(move |h| (0..dims.segments).map(move |s| (b, h, s))))
            .collect();
        let planner = |b: usize, s: usize| {
            seqs[b].iter().find(|p| p.planned.contains(&s)).expect("the chunks plan every segment once")
        };
        let per_unit = |field: fn(&Plan) -> &[f32]| -> Vec<f32> {
            units.iter().map(|&(b, h, s)| field(planner(b, s))[dims.unit(0, h, s)]).collect()
        };
        let blocks = BlockLists::from_units(
            dims,
            units.iter().map(|&(b, h, s)| match planner(b, s).blocks.segment(0, h, s) {
                SegmentAttention::Dense => None,
                SegmentAttention::Sparse(list) => Some(list.to_vec()),
            }),
        );
        Layer {
            dims,
            entropy: per_unit(|p| &p.entropy),
            budgets: per_unit(|p| &p.budgets),
            head_class: seqs.iter().flat_map(|plans| plans.last().unwrap().head_class.clone()).collect(),
            blocks,
        }
    }

    fn rigid_heads(&self) -> usize {
        self.head_class.iter().filter(|c| **c == HeadClass::Rigid).count()
    }
}

/// What one (query segment, key block) pair of a kv head's selection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cell {
    /// A candidate block the sparse segment reads.
    Kept,
    /// A candidate block the sparse segment skips.
    Skipped,
    /// A candidate block of a dense segment (dense segments read every earlier key).
    Dense,
    /// The segment's own keys: always read, causally.
    Own,
    /// Keys after the segment: causally masked.
    Masked,
}

/// One kv head's selection: rows = query segments, columns = key blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
struct KeptMap {
    segments: usize,
    blocks: usize,
    /// `[segments, blocks]`, row-major.
    cells: Vec<Cell>,
}

impl KeptMap {
    fn row(&self, s: usize) -> &[Cell] {
        &self.cells[s * self.blocks..(s + 1) * self.blocks]
    }
}

/// The kept-block map of batch entry `b`, kv head `h`.
fn kept_map(lists: &BlockLists, b: usize, h: usize) -> KeptMap {
    let d = lists.dims;
    let mut cells = vec![Cell::Masked; d.segments * d.blocks];
    // `max(1)`: a single segment has no blocks (and no cells).
    for (s, row) in cells.chunks_mut(d.blocks.max(1)).enumerate() {
        let limit = d.causal_limit(s);
        let own_end = (limit + d.blocks_per_segment()).min(d.blocks);
        row[limit..own_end].fill(Cell::Own);
        let candidates = &mut row[..limit];
        match lists.segment(b, h, s) {
            SegmentAttention::Dense => candidates.fill(Cell::Dense),
            SegmentAttention::Sparse(kept) => {
                candidates.fill(Cell::Skipped);
                kept.iter().for_each(|&j| candidates[j as usize] = Cell::Kept);
            }
        }
    }
    KeptMap { segments: d.segments, blocks: d.blocks, cells }
}

/// Rows `rows` of every batch entry of a BSND tensor, packed along tokens (THD `[1, T, H, D]`),
/// and the prefix sums of the rows per entry.
fn pack_rows(t: &HostTensor, rows: std::ops::Range<usize>) -> (HostTensor, Vec<u32>) {
    let [batch, len, heads, dim] = t.shape;
    let row_bytes = heads * dim * t.dtype().size();
    let all = t.data().as_bytes();
    let mut bytes = Vec::with_capacity(batch * rows.len() * row_bytes);
    for b in 0..batch {
        bytes.extend_from_slice(&all[(b * len + rows.start) * row_bytes..(b * len + rows.end) * row_bytes]);
    }
    let cu = (0..=batch).map(|b| (b * rows.len()) as u32).collect();
    (HostTensor::from_bytes(&bytes, [1, batch * rows.len(), heads, dim], t.dtype()), cu)
}

/// Plans the layer as a serving loop prefills it: every batch entry a sequence, each round
/// appends the next `chunk` tokens' keys to a paged cache and plans them. Returns each
/// sequence's plans, one per chunk.
fn plan_chunked(
    kernels: &Kernels,
    q: &HostTensor,
    k: &HostTensor,
    cfg: &EntropyConfig,
    layer_idx: usize,
    chunk: usize,
) -> Result<Vec<Vec<Plan>>> {
    let s = cfg.segment_size;
    if chunk == 0 || !chunk.is_multiple_of(s) {
        return Err(Error::range("--chunk", chunk, format!("must be a positive multiple of the segment size {s}")));
    }
    let [batch, len, _, dim] = q.shape;
    let kv_heads = k.shape[2];
    let width = len.div_ceil(PAGE_SIZE);
    let layout = PageLayout::slot_major(batch * width, PAGE_SIZE, kv_heads, dim);
    let mut pool = PagedCache::new(k.dtype(), layout, (0..(batch * width) as u32).collect(), width, 0.0)?;
    let mut states = vec![PlanState::new(); batch * kv_heads];
    let prompt_lens = vec![len as u32; batch];
    let req = ChunkRequest { layer_idx, ..ChunkRequest::default() };
    let mut ws = Workspace::new();
    let mut plans: Vec<Vec<Plan>> = vec![Vec::new(); batch];
    for start in (0..len).step_by(chunk) {
        let rows = start..(start + chunk).min(len);
        let (q_chunk, cu) = pack_rows(q, rows.clone());
        let (k_chunk, _) = pack_rows(k, rows);
        // Planning never reads V: the keys stand in for the values.
        kernels.append(k_chunk.view(), k_chunk.view(), &cu, &mut pool.cache_mut(), &mut ws)?;
        let cache = pool.cache();
        let chunk_plans = kernels.plan_chunks(
            q_chunk.view(),
            &cu,
            &cache,
            &prompt_lens,
            std::slice::from_ref(cfg),
            &mut states,
            &req,
        )?;
        plans.iter_mut().zip(chunk_plans).for_each(|(seq, plan)| seq.push(plan));
    }
    Ok(plans)
}

fn inspect(a: &InspectArgs, kernels: &Kernels, case: &Case) -> Result<()> {
    let cfg = config_of(a, Some(case))?;
    let q = case.tensor4("q")?;
    let k = case.tensor4("k")?;
    let layer = match a.chunk {
        None => {
            let req = PlanRequest::layer(case.layer_idx).keep_maps(false);
            Layer::from_plan(kernels.plan(q.view(), k.view(), &cfg, &req)?)
        }
        Some(n) => {
            eprintln!(
                "note: --chunk plans with head_class = streaming (chunked planning decides head classes causally)"
            );
            Layer::from_chunks(&plan_chunked(kernels, &q, &k, &cfg, case.layer_idx, n)?)
        }
    };
    let d = layer.dims;
    println!("{}: {}", a.input.display(), case.description);
    println!(
        "B={} L={} Hq={} Hkv={} D={} | S={} Bk={} T={} base={} | {} segments, {} blocks | backend {}",
        d.batch,
        d.seq_len,
        d.q_heads,
        d.kv_heads,
        q.shape[3],
        cfg.segment_size,
        cfg.block_size,
        cfg.threshold_len,
        cfg.base_budget,
        d.segments,
        d.blocks,
        kernels.kind()
    );
    let head_class = match cfg.head_class {
        HeadClassMode::Prompt => "prompt",
        HeadClassMode::Streaming => "streaming",
    };
    let chunking = match a.chunk {
        Some(n) => format!("in {} chunks of {n} tokens over a paged cache", d.seq_len.div_ceil(n)),
        None => "in one shot".to_string(),
    };
    let planned = format!("planned {chunking}, head_class {head_class}");
    println!("{planned}");
    print_summary(&layer);
    let svg_path = a.svg.clone().unwrap_or_else(|| a.input.with_extension("heatmap.svg"));
    let title = format!("{} ({planned})", a.input.display());
    std::fs::write(&svg_path, svg::render(&layer, &cfg, &title))
        .map_err(|source| Error::Io { path: svg_path.display().to_string(), source })?;
    println!("heatmap: {}", svg_path.display());
    Ok(())
}

/// The per-head entropy sparklines, classes and budgets, and the layer's totals.
fn print_summary(layer: &Layer) {
    let d = layer.dims;
    if d.segments < 2 {
        println!("a single segment: nothing to plan, the layer is dense");
    }
    // Segment 0 has no candidate blocks (its uniform row decides nothing): scale by the others.
    let hmax = (0..layer.entropy.len())
        .filter(|u| u % d.segments != 0)
        .map(|u| layer.entropy[u])
        .fold(0f32, f32::max)
        .max(1e-9);
    println!("\nentropy per segment from segment 1 (nats; bar height relative to {hmax:.3}):");
    for b in 0..d.batch {
        for h in 0..d.kv_heads {
            let units = d.unit(b, h, 0)..d.unit(b, h, 0) + d.segments;
            let row = &layer.entropy[units.clone()];
            let spark: String =
                row.iter().skip(1).map(|&e| SPARK[((e / hmax * 7.0).round() as usize).min(7)]).collect();
            let class = match layer.head_class[b * d.kv_heads + h] {
                HeadClass::Rigid => "rigid  ",
                HeadClass::Dynamic => "dynamic",
            };
            let mean = row.iter().skip(1).sum::<f32>() / (d.segments.max(2) - 1) as f32;
            let bmax = layer.budgets[units].iter().copied().fold(0f32, f32::max);
            println!("b{b} h{h:<3} {class} {spark}  mean H {:.3}  max budget {bmax:.0}", mean.max(0.0));
        }
    }
    println!(
        "\n{} rigid and {} dynamic kv heads; sparse units {}; kept fraction {:.3}",
        layer.rigid_heads(),
        layer.head_class.len() - layer.rigid_heads(),
        layer.blocks.sparse_units(),
        layer.blocks.kept_fraction()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use entropy_kernels::synth::{PlantedSpec, planted};
    use entropy_kernels::{BudgetMode, DType};

    /// 4 segments of 16 tokens, blocks of 4: 12 blocks, 4 per segment.
    fn small_dims() -> PlanDims {
        PlanDims::new(1, 64, 1, 1, 16, 4)
    }

    #[test]
    fn kept_map_marks_every_kind_of_cell() {
        use Cell::*;
        let lists = BlockLists::from_units(small_dims(), [None, Some(vec![1, 3]), Some(vec![6, 0]), None]);
        let map = kept_map(&lists, 0, 0);
        assert_eq!(map.row(0), [[Own; 4].as_slice(), &[Masked; 8]].concat());
        assert_eq!(map.row(1), [[Skipped, Kept, Skipped, Kept].as_slice(), &[Own; 4], &[Masked; 4]].concat());
        assert_eq!(
            map.row(2),
            [[Kept, Skipped, Skipped, Skipped, Skipped, Skipped, Kept, Skipped].as_slice(), &[Own; 4]].concat()
        );
        // The last segment's own keys lie past the blocks: every block is a candidate.
        assert_eq!(map.row(3), [Dense; 12]);
    }

    /// A planted layer of `batch` sequences (sinks and topic heads, 2 kv heads) in `dtype`.
    fn planted_layer(dtype: DType, batch: usize) -> (HostTensor, HostTensor, EntropyConfig) {
        let spec = PlantedSpec {
            batch,
            seq_len: 300,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 32,
            block_size: 4,
            segment_size: 32,
            rigid_fraction: 0.5,
            seed: 7,
        };
        let p = planted(&spec);
        let q = HostTensor::from_f32(&p.q, [batch, 300, 4, 32], dtype);
        let k = HostTensor::from_f32(&p.k, [batch, 300, 2, 32], dtype);
        let cfg = EntropyConfig {
            segment_size: 32,
            block_size: 4,
            threshold_len: 64,
            base_budget: 16,
            e_t: 1.0,
            head_class: HeadClassMode::Streaming,
            ..EntropyConfig::default()
        };
        (q, k, cfg)
    }

    /// `--chunk N` draws the one-shot `streaming` plan's picture, whatever N. (`segment_max` on
    /// one sequence only: a one-shot plan of a batch takes the maximum over the whole batch, the
    /// engine's per sequence.)
    #[test]
    fn chunked_maps_equal_the_one_shot_streaming_maps() {
        let kernels = Kernels::cpu();
        for dtype in [DType::F32, DType::BF16] {
            for (budget_mode, batch) in [(BudgetMode::PerHead, 2), (BudgetMode::SegmentMax, 1)] {
                let (q, k, base_cfg) = planted_layer(dtype, batch);
                let cfg = EntropyConfig { budget_mode, ..base_cfg };
                let whole = Layer::from_plan(kernels.plan(q.view(), k.view(), &cfg, &PlanRequest::layer(0)).unwrap());
                let kept = (0..2).flat_map(|h| kept_map(&whole.blocks, 0, h).cells).filter(|c| *c == Cell::Kept);
                assert!(kept.count() > 0, "the planted layer should keep blocks sparsely");
                let classes = &whole.head_class;
                assert!(classes.contains(&HeadClass::Rigid) && classes.contains(&HeadClass::Dynamic), "{classes:?}");
                for chunk in [32, 64, 96, 320] {
                    let tag = format!("{dtype} {budget_mode:?} chunk {chunk}");
                    let chunked = Layer::from_chunks(&plan_chunked(&kernels, &q, &k, &cfg, 0, chunk).unwrap());
                    for (b, h) in (0..batch).flat_map(|b| [(b, 0), (b, 1)]) {
                        assert_eq!(
                            kept_map(&chunked.blocks, b, h),
                            kept_map(&whole.blocks, b, h),
                            "{tag}: b{b} h{h} kept-block map"
                        );
                    }
                    assert_eq!(chunked, whole, "{tag}: the merged layer");
                }
            }
        }
    }

    #[test]
    fn chunks_off_the_segment_grid_are_refused() {
        let (q, k, cfg) = planted_layer(DType::F32, 1);
        for chunk in [0, 48] {
            let err = plan_chunked(&Kernels::cpu(), &q, &k, &cfg, 0, chunk).unwrap_err();
            assert!(err.to_string().contains("multiple of the segment size"), "{err}");
        }
    }
}

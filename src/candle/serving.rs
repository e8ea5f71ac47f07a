//! A model served the way an inference engine serves it (SPEC §7): each forward pass carries any
//! mix of sequences' prefill chunks and decode steps as one ragged batch; every layer's K/V live
//! in one pool of pages (vLLM's slot-major `[P, page, Hkv, D]`) shared by all sequences; each
//! sequence has its own method, chunked-planning states and observation windows, and is
//! compressed in place, its freed pages going back to the pool.
//!
//! [`Server::step`] is one pass; [`serve`] drives whole requests (prefill in chunks, then greedy
//! or teacher-forced decoding) with every unfinished request in every pass.

use std::time::Instant;

use candle_core::Tensor;

use super::llama::{Llama, RaggedAttention, Span};
use super::methods::{LayerStats, Method, Settings, Step};
use crate::config::{DecodeConfig, EntropyConfig, GqaMode, HeadClassMode};
use crate::engine::{BlockTable, ChunkRequest, KvCache, KvCacheMut, PageLayout, Workspace};
use crate::kernels::Kernels;
use crate::plan::{BlockLists, Plan, PlanState};
use crate::tensor::{DType, TensorView, TensorViewMut};
use crate::window::{ObservationWindow, WindowEvent};

/// A sequence's handle in a [`Server`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqId(usize);

/// One layer's state of one sequence.
#[derive(Clone)]
struct SeqLayer {
    /// Entries held per kv head.
    lens: Vec<u32>,
    /// Chunked planning's `[Hkv]` states.
    states: Vec<PlanState>,
    /// The decode window (compressing methods), created at the prompt's end.
    window: Option<ObservationWindow>,
    /// The prompt's last queries `[≤ W, Hq, D]` (what `prefill_end` observes), kept across chunks.
    tail: Vec<f32>,
    /// Computed and causal (query, key) pairs of the prefill so far.
    pairs: (f64, f64),
    rigid_heads: usize,
}

#[derive(Clone)]
struct Sequence {
    prefill: Option<EntropyConfig>,
    decode: Option<DecodeConfig>,
    prompt_len: usize,
    /// Tokens run through the model so far.
    pos: usize,
    /// Its pages, in order (the block table's row); the same pages in every layer's pool.
    pages: Vec<u32>,
    layers: Vec<SeqLayer>,
}

/// Sequences sharing one paged KV cache per layer, served in ragged passes.
pub struct Server {
    kernels: Kernels,
    settings: Settings,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    layout: PageLayout,
    /// Per layer: the K and V pools.
    pools: Vec<(Vec<f32>, Vec<f32>)>,
    free: Vec<u32>,
    seqs: Vec<Option<Sequence>>,
    ws: Workspace,
    /// The sequences of the pass running, in the order of its spans.
    current: Vec<usize>,
    /// The plans of the pass's sparse-prefilling sequences at the latest layer: this layer's
    /// attention reads them, the next layer's planning fuses them.
    plans: Vec<Plan>,
    /// Seconds spent in this crate's calls (append, planning, attention, compression).
    pub attention_secs: f64,
}

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

impl Server {
    /// A server for `model` with a pool of `pages` pages of `page_size` tokens per layer (f32).
    pub fn new(
        kernels: &Kernels,
        model: &Llama,
        settings: &Settings,
        page_size: usize,
        pages: usize,
    ) -> candle_core::Result<Server> {
        let c = &model.cfg;
        let layout = PageLayout::slot_major(pages, page_size, c.kv_heads, c.head_dim);
        let elements = layout.elements().ok_or_else(|| err(format!("a pool of {pages} pages overflows")))?;
        let pools = (0..c.layers).map(|_| (vec![0f32; elements], vec![0f32; elements])).collect();
        Ok(Server {
            kernels: kernels.clone(),
            settings: settings.clone(),
            q_heads: c.q_heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            layout,
            pools,
            free: (0..pages as u32).rev().collect(),
            seqs: Vec::new(),
            ws: Workspace::new(),
            current: Vec::new(),
            plans: Vec::new(),
            attention_secs: 0.0,
        })
    }

    /// Admits a sequence of `method` whose prompt has `prompt_len` tokens; `prefill` overrides
    /// the method's prefill configuration (e.g. its head class).
    pub fn add(
        &mut self,
        method: Method,
        prompt_len: usize,
        prefill: Option<EntropyConfig>,
    ) -> candle_core::Result<SeqId> {
        let decode = self.settings.decode_config(method);
        if decode.as_ref().is_some_and(|d| d.gqa_mode == GqaMode::PerQueryHead) {
            return Err(err(format!(
                "{}: per_query_head compression needs caches of {} query heads; this server's pages hold the {} kv heads",
                method.name(),
                self.q_heads,
                self.kv_heads
            )));
        }
        if prompt_len == 0 {
            return Err(err("an empty prompt".into()));
        }
        let layer = SeqLayer {
            lens: vec![0; self.kv_heads],
            states: vec![PlanState::new(); self.kv_heads],
            window: None,
            tail: Vec::new(),
            pairs: (0.0, 0.0),
            rigid_heads: 0,
        };
        let seq = Sequence {
            prefill: prefill.or_else(|| self.settings.prefill_config(method)),
            decode,
            prompt_len,
            pos: 0,
            pages: Vec::new(),
            layers: vec![layer; self.pools.len()],
        };
        self.seqs.push(Some(seq));
        Ok(SeqId(self.seqs.len() - 1))
    }

    /// Ends a sequence and returns its pages to the pool.
    pub fn release(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.get_mut(id.0).and_then(Option::take) {
            self.free.extend(s.pages);
        }
    }

    fn seq(&self, id: SeqId) -> candle_core::Result<&Sequence> {
        self.seqs.get(id.0).and_then(Option::as_ref).ok_or_else(|| err(format!("no sequence {id:?}")))
    }

    /// Per layer, the prefill's statistics of a sequence.
    pub fn stats(&self, id: SeqId) -> candle_core::Result<Vec<LayerStats>> {
        Ok(self
            .seq(id)?
            .layers
            .iter()
            .map(|l| LayerStats {
                kept_fraction: if l.pairs.1 == 0.0 { 1.0 } else { l.pairs.0 / l.pairs.1 },
                rigid_heads: l.rigid_heads,
                heads: self.kv_heads,
            })
            .collect())
    }

    /// Entries per kv head of layer 0.
    pub fn entries(&self, id: SeqId) -> candle_core::Result<Vec<u32>> {
        Ok(self.seq(id)?.layers[0].lens.clone())
    }

    /// Pages a sequence holds (in each layer's pool).
    pub fn pages(&self, id: SeqId) -> candle_core::Result<usize> {
        Ok(self.seq(id)?.pages.len())
    }

    /// Pages free in the pool.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Bytes of K and V a sequence holds over all layers (entries actually kept, f32).
    pub fn kv_bytes(&self, id: SeqId) -> candle_core::Result<usize> {
        let per_entry = 2 * self.head_dim * 4;
        Ok(self.seq(id)?.layers.iter().map(|l| l.lens.iter().map(|&n| n as usize).sum::<usize>() * per_entry).sum())
    }

    /// One ragged pass: each `(sequence, tokens)` appends its tokens — a prefill chunk (ending
    /// on the segment grid or at the prompt's end) or decode tokens after the prompt. Returns
    /// each input's last-position logits.
    pub fn step(&mut self, model: &Llama, inputs: &[(SeqId, &[u32])]) -> candle_core::Result<Vec<Tensor>> {
        let mut spans = Vec::with_capacity(inputs.len());
        let mut tokens = Vec::new();
        self.current.clear();
        for &(id, toks) in inputs {
            let s = self.seq(id)?;
            if self.current.contains(&id.0) {
                return Err(err(format!("sequence {id:?} appears twice in one pass")));
            }
            if s.pos < s.prompt_len && s.pos + toks.len() > s.prompt_len {
                return Err(err(format!(
                    "sequence {id:?}: a prefill chunk of {} tokens at {} runs past its {}-token prompt",
                    toks.len(),
                    s.pos,
                    s.prompt_len
                )));
            }
            if toks.is_empty() {
                return Err(err(format!("sequence {id:?}: no tokens in this pass")));
            }
            chunk_fits(id, s, toks.len())?;
            spans.push(Span { pos: s.pos, len: toks.len() });
            tokens.extend_from_slice(toks);
            self.current.push(id.0);
        }
        // Every check a kernel could fail on a well-formed pass is above (and pages are claimed
        // before layer 0's first write): an error leaves the sequences' caches as they were.
        let logits = model.forward_ragged(&tokens, &spans, self, None)?;
        for &(id, toks) in inputs {
            self.seqs[id.0].as_mut().expect("checked above").pos += toks.len();
        }
        Ok(logits)
    }

    /// Gives each sequence of the pass the pages its new tokens need at `layer` (every layer's
    /// pool uses the same pages).
    fn claim_pages(&mut self, layer: usize, spans: &[Span]) -> candle_core::Result<()> {
        let ps = self.layout.page_size;
        for (&i, s) in self.current.iter().zip(spans) {
            let seq = self.seqs[i].as_mut().expect("a live sequence");
            let held = seq.layers[layer].lens.iter().copied().max().unwrap_or(0) as usize;
            while seq.pages.len() * ps < held + s.len {
                let page = self.free.pop().ok_or_else(|| {
                    err(format!("the page pool is exhausted ({} pages of {ps} tokens)", self.layout.pages))
                })?;
                seq.pages.push(page);
            }
        }
        Ok(())
    }

    /// The pass's block table `[sequences, width]` and lengths `[sequences, Hkv]` at `layer`.
    fn table(&self, which: &[usize], layer: usize) -> (Vec<u32>, usize, Vec<u32>) {
        let seqs: Vec<&Sequence> = which.iter().map(|&i| self.seqs[i].as_ref().expect("live")).collect();
        let width = seqs.iter().map(|s| s.pages.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; seqs.len() * width];
        let mut lens = Vec::with_capacity(seqs.len() * self.kv_heads);
        for (row, s) in ids.chunks_mut(width).zip(&seqs) {
            row[..s.pages.len()].copy_from_slice(&s.pages);
            // Rows are padded with the sequence's own first page: never read past its length.
            let pad = s.pages.first().copied().unwrap_or(0);
            row[s.pages.len()..].iter_mut().for_each(|p| *p = pad);
            lens.extend_from_slice(&s.layers[layer].lens);
        }
        (ids, width, lens)
    }

    /// Plans the sequences of the pass that prefill sparsely into `self.plans`; returns, by pass
    /// index, where each sequence's plan is there.
    fn plan(&mut self, layer: usize, spans: &[Span], q: &[f32]) -> candle_core::Result<Vec<Option<usize>>> {
        let row = self.q_heads * self.head_dim;
        let mut planned = Vec::new();
        let (mut sub_q, mut cu) = (Vec::new(), vec![0u32]);
        let mut start = 0;
        for (n, (&i, s)) in self.current.iter().zip(spans).enumerate() {
            let seq = self.seqs[i].as_ref().expect("live");
            if seq.prefill.is_some() && s.pos < seq.prompt_len {
                planned.push(n);
                sub_q.extend_from_slice(&q[start * row..(start + s.len) * row]);
                cu.push(cu.last().unwrap() + s.len as u32);
            }
            start += s.len;
        }
        let mut at = vec![None; spans.len()];
        if planned.is_empty() {
            self.plans.clear();
            return Ok(at);
        }
        let which: Vec<usize> = planned.iter().map(|&n| self.current[n]).collect();
        let (ids, width, lens) = self.table(&which, layer);
        let seqs: Vec<&Sequence> = which.iter().map(|&i| self.seqs[i].as_ref().expect("live")).collect();
        let prompt_lens: Vec<u32> = seqs.iter().map(|s| s.prompt_len as u32).collect();
        let cfgs: Vec<EntropyConfig> = seqs.iter().map(|s| s.prefill.clone().expect("planned")).collect();
        let mut states: Vec<PlanState> = seqs.iter().flat_map(|s| s.layers[layer].states.iter().copied()).collect();
        let (pk, pv) = &self.pools[layer];
        let cache = KvCache::paged(pk.as_slice(), pv.as_slice(), self.layout, BlockTable::new(&ids, width), &lens);
        let fusion = cfgs.iter().any(|c| c.layer_fusion);
        // The same sequences were planned at the previous layer of this pass (none at layer 0).
        let fuse = fusion && layer > 0 && self.plans.len() == which.len();
        let req = ChunkRequest {
            layer_idx: layer,
            prev: fuse.then_some(self.plans.as_slice()),
            keep_maps: fusion,
            full_ranking: false,
        };
        let q_sub = TensorView::thd(sub_q.as_slice(), [cu[cu.len() - 1] as usize, self.q_heads, self.head_dim]);
        let new = self.kernels.plan_chunks(q_sub, &cu, &cache, &prompt_lens, &cfgs, &mut states, &req)?;
        for (k, (&n, plan)) in planned.iter().zip(&new).enumerate() {
            let seq = self.seqs[self.current[n]].as_mut().expect("live");
            let l = &mut seq.layers[layer];
            l.states.copy_from_slice(&states[k * self.kv_heads..(k + 1) * self.kv_heads]);
            let (kept, causal) = plan.blocks.kept_pairs(plan.planned.clone());
            l.pairs = (l.pairs.0 + kept, l.pairs.1 + causal);
            l.rigid_heads = plan.rigid_heads();
        }
        for (k, &n) in planned.iter().enumerate() {
            at[n] = Some(k);
        }
        self.plans = new;
        Ok(at)
    }

    /// Feeds the pass's queries of each compressing sequence to its window at `layer` and
    /// compresses the sequences whose window says so.
    fn observe(&mut self, layer: usize, spans: &[Span], q: &[f32]) -> candle_core::Result<()> {
        let (hq, d) = (self.q_heads, self.head_dim);
        let row = hq * d;
        let mut start = 0;
        for (n, s) in spans.iter().enumerate() {
            let i = self.current[n];
            let rows = &q[start * row..(start + s.len) * row];
            start += s.len;
            let seq = self.seqs[i].as_mut().expect("live");
            let Some(cfg) = seq.decode.clone() else { continue };
            let l = &mut seq.layers[layer];
            let mut compress = false;
            if s.pos < seq.prompt_len {
                l.tail.extend_from_slice(rows);
                let keep = cfg.window * row;
                if l.tail.len() > keep {
                    l.tail.drain(..l.tail.len() - keep);
                }
                if s.pos + s.len == seq.prompt_len {
                    let mut w = ObservationWindow::new(1, hq, d, &cfg)?;
                    let tail = TensorView::new(l.tail.as_slice(), [1, l.tail.len() / row, hq, d]);
                    compress = w.prefill_end(tail)? == WindowEvent::CompressNow;
                    l.window = Some(w);
                    l.tail = Vec::new();
                }
            } else if let Some(w) = l.window.as_mut() {
                for t in rows.chunks(row) {
                    compress |= w.decode_step(TensorView::new(t, [1, 1, hq, d]))? == WindowEvent::CompressNow;
                }
                let longest = l.lens.iter().copied().max().unwrap_or(0) as usize;
                compress |= w.recompress_due(longest);
            }
            if compress {
                self.compress(i, layer, &cfg)?;
            }
        }
        Ok(())
    }

    /// Selects and compacts sequence `i`'s cache at `layer` in place; frees the pages no layer
    /// needs any more.
    fn compress(&mut self, i: usize, layer: usize, cfg: &DecodeConfig) -> candle_core::Result<()> {
        let seq = self.seqs[i].as_mut().expect("live");
        let l = &mut seq.layers[layer];
        let obs = l.window.as_ref().expect("compression follows the window").observation(DType::F32);
        let table = BlockTable::new(&seq.pages, seq.pages.len());
        let (pk, pv) = &mut self.pools[layer];
        let sel = {
            let cache = KvCache::paged(pk.as_slice(), pv.as_slice(), self.layout, table.clone(), &l.lens);
            self.kernels.kv_select(&cache, obs.view(), cfg, &[true])?
        };
        let mut cache = KvCacheMut::paged(pk.as_mut_slice(), pv.as_mut_slice(), self.layout, table, &mut l.lens);
        self.kernels.kv_compact(&mut cache, &sel, &mut self.ws)?;
        let held = seq.layers.iter().flat_map(|l| l.lens.iter()).copied().max().unwrap_or(0) as usize;
        let keep = held.div_ceil(self.layout.page_size);
        if seq.pages.len() > keep {
            self.free.extend(seq.pages.drain(keep..));
        }
        Ok(())
    }
}

/// A sparse prefill in chunks needs `streaming` head classes and chunks on the segment grid
/// (SPEC §7.2): checked before the pass runs, not by the planner halfway through it.
fn chunk_fits(id: SeqId, s: &Sequence, len: usize) -> candle_core::Result<()> {
    let Some(cfg) = s.prefill.as_ref().filter(|_| s.pos < s.prompt_len) else { return Ok(()) };
    let end = s.pos + len;
    if s.pos == 0 && end == s.prompt_len {
        return Ok(()); // the whole prompt at once
    }
    if cfg.head_class != HeadClassMode::Streaming {
        return Err(err(format!(
            "sequence {id:?}: prefill in chunks needs head_class = streaming (prompt head classes see the whole prompt)"
        )));
    }
    let seg = cfg.segment_size;
    if !s.pos.is_multiple_of(seg) || (end != s.prompt_len && !end.is_multiple_of(seg)) {
        return Err(err(format!(
            "sequence {id:?}: a chunk {}..{end} must start and end on the segment grid (S = {seg}) or end at the prompt's end ({})",
            s.pos, s.prompt_len
        )));
    }
    Ok(())
}

/// Contiguous f32 rows of a `[1, T, H, D]` tensor.
fn rows(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl RaggedAttention for Server {
    fn attend(
        &mut self,
        layer: usize,
        spans: &[Span],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let clock = Instant::now();
        let (hq, hkv, d) = (self.q_heads, self.kv_heads, self.head_dim);
        let (q, k, v) = (rows(q)?, rows(k)?, rows(v)?);
        let t: usize = spans.iter().map(|s| s.len).sum();
        let cu: Vec<u32> = std::iter::once(0)
            .chain(spans.iter().scan(0u32, |acc, s| {
                *acc += s.len as u32;
                Some(*acc)
            }))
            .collect();
        self.claim_pages(layer, spans)?;
        // 1. The pass's K/V into the pages.
        let current = self.current.clone();
        let (ids, width, mut lens) = self.table(&current, layer);
        {
            let (pk, pv) = &mut self.pools[layer];
            let mut cache = KvCacheMut::paged(
                pk.as_mut_slice(),
                pv.as_mut_slice(),
                self.layout,
                BlockTable::new(&ids, width),
                &mut lens,
            );
            self.kernels.append(
                TensorView::thd(k.as_slice(), [t, hkv, d]),
                TensorView::thd(v.as_slice(), [t, hkv, d]),
                &cu,
                &mut cache,
                &mut self.ws,
            )?;
        }
        for (n, &i) in current.iter().enumerate() {
            let l = &mut self.seqs[i].as_mut().expect("live").layers[layer];
            l.lens.copy_from_slice(&lens[n * hkv..(n + 1) * hkv]);
        }
        // 2. Plans of the sparse prefill chunks, 3. attention of every sequence over its pages.
        let at = self.plan(layer, spans, &q)?;
        let blocks: Vec<Option<&BlockLists>> = at.iter().map(|k| k.map(|k| &self.plans[k].blocks)).collect();
        let mut out = vec![0f32; t * hq * d];
        {
            let (pk, pv) = &self.pools[layer];
            let cache = KvCache::paged(pk.as_slice(), pv.as_slice(), self.layout, BlockTable::new(&ids, width), &lens);
            let scale = self.settings.prefill.scale;
            self.kernels.attend(
                TensorView::thd(q.as_slice(), [t, hq, d]),
                &cu,
                &cache,
                &blocks,
                scale,
                &mut TensorViewMut::thd(out.as_mut_slice(), [t, hq, d]),
                None,
                &mut self.ws,
            )?;
        }
        // 4. Windows, and compression in place where one is due.
        self.observe(layer, spans, &q)?;
        self.attention_secs += clock.elapsed().as_secs_f64();
        Tensor::from_vec(out, (1, t, hq, d), &candle_core::Device::Cpu)
    }
}

/// A request for [`serve`].
#[derive(Clone, Debug)]
pub struct Request {
    /// Its method.
    pub method: Method,
    /// Overrides the method's prefill configuration (e.g. its head class).
    pub prefill: Option<EntropyConfig>,
    /// The prompt's tokens.
    pub prompt: Vec<u32>,
    /// Tokens to generate (the first comes from the prefill).
    pub new_tokens: usize,
    /// Teacher forcing: decode step `i` feeds `forced[i - 1]` instead of the request's own token.
    pub forced: Option<Vec<u32>>,
}

/// What [`serve`] returns for one request.
#[derive(Clone, Debug, Default)]
pub struct Generation {
    /// The greedy steps (with margins; deficits against `forced` when teacher-forced).
    pub steps: Vec<Step>,
    /// Log-probabilities of the first generated token (the prefill's last logits).
    pub first_logprobs: Vec<f32>,
    /// Per layer, the prefill's statistics.
    pub stats: Vec<LayerStats>,
    /// Entries per kv head of layer 0 at the end.
    pub entries: Vec<u32>,
    /// K/V bytes held at the end, over all layers.
    pub kv_bytes: usize,
    /// Pages held at the end (per layer's pool).
    pub pages: usize,
}

/// How long [`serve`] took.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    /// Seconds until every request had its first token.
    pub prefill_s: f64,
    /// Seconds of the decode passes after that.
    pub decode_s: f64,
    /// Passes run.
    pub passes: usize,
}

/// Serves `requests` together: every pass carries each unfinished request's next prefill chunk
/// (at most `chunk` tokens, or the whole prompt) or its next decode token. Requests are
/// released at the end.
pub fn serve(
    model: &Llama,
    server: &mut Server,
    requests: &[Request],
    chunk: Option<usize>,
) -> candle_core::Result<(Vec<Generation>, Timing)> {
    let ids = requests
        .iter()
        .map(|r| server.add(r.method, r.prompt.len(), r.prefill.clone()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut fed = vec![0usize; requests.len()];
    let mut gens = vec![Generation::default(); requests.len()];
    let mut timing = Timing::default();
    let clock = Instant::now();
    loop {
        let mut feeds: Vec<(usize, Vec<u32>)> = Vec::new();
        for (n, r) in requests.iter().enumerate() {
            let done = gens[n].steps.len();
            if fed[n] < r.prompt.len() {
                let take = chunk.unwrap_or(usize::MAX).min(r.prompt.len() - fed[n]);
                feeds.push((n, r.prompt[fed[n]..fed[n] + take].to_vec()));
            } else if done < r.new_tokens.max(1) {
                let token = r.forced.as_ref().map_or(gens[n].steps[done - 1].token, |f| f[done - 1]);
                feeds.push((n, vec![token]));
            }
        }
        if feeds.is_empty() {
            break;
        }
        let inputs: Vec<(SeqId, &[u32])> = feeds.iter().map(|(n, t)| (ids[*n], t.as_slice())).collect();
        let logits = server.step(model, &inputs)?;
        timing.passes += 1;
        for ((n, toks), logits) in feeds.iter().zip(&logits) {
            let r = &requests[*n];
            let g = &mut gens[*n];
            if fed[*n] < r.prompt.len() {
                fed[*n] += toks.len();
                if fed[*n] < r.prompt.len() {
                    continue;
                }
                g.first_logprobs = super::llama::log_softmax(logits)?;
                g.stats = server.stats(ids[*n])?;
            }
            let reference = r.forced.as_ref().and_then(|f| f.get(g.steps.len()).copied());
            g.steps.push(Step::from_logits(logits, reference)?);
        }
        if timing.prefill_s == 0.0 && gens.iter().all(|g| !g.steps.is_empty()) {
            timing.prefill_s = clock.elapsed().as_secs_f64();
        }
    }
    timing.decode_s = clock.elapsed().as_secs_f64() - timing.prefill_s;
    for (g, &id) in gens.iter_mut().zip(&ids) {
        g.entries = server.entries(id)?;
        g.kv_bytes = server.kv_bytes(id)?;
        g.pages = server.pages(id)?;
        server.release(id);
    }
    Ok((gens, timing))
}

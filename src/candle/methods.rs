//! The attention methods a model can run, all through this crate: dense, EntropyInfer (sparse
//! prefill + latent decode compression), SnapKV, CritiPrefill and AdaKV — as an [`Attention`]
//! hook that keeps one KV cache (and observation window) per layer for a single sequence.

use std::time::Instant;

use candle_core::Tensor;

use super::llama::{Attention, Llama};
use crate::config::{BudgetPolicy, DecodeConfig, EntropyConfig, HeadBudget};
use crate::kernels::{Kernels, PlanRequest};
use crate::tensor::{DType, TensorView, TensorViewMut};
use crate::window::{ObservationWindow, WindowEvent};

/// A prefill + decode method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Dense attention, full cache.
    Dense,
    /// Entropy-guided sparse prefill, then latent decode compression.
    EntropyInfer,
    /// EntropyInfer's sparse prefill alone, keeping the full cache (the prefill half of the method).
    EntropyInferPrefill,
    /// SnapKV cache compression.
    SnapKv,
    /// CritiPrefill sparse prefill.
    CritiPrefill,
    /// AdaKV cache compression.
    AdaKv,
}

impl Method {
    /// Every method.
    pub const ALL: [Method; 6] = [
        Method::Dense,
        Method::EntropyInfer,
        Method::EntropyInferPrefill,
        Method::SnapKv,
        Method::CritiPrefill,
        Method::AdaKv,
    ];

    /// The method's name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Dense => "dense",
            Method::EntropyInfer => "entropyinfer",
            Method::EntropyInferPrefill => "entropyinfer-prefill",
            Method::SnapKv => "snapkv",
            Method::CritiPrefill => "critiprefill",
            Method::AdaKv => "adakv",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Method::ALL.into_iter().find(|m| m.name() == s.trim().to_ascii_lowercase()).ok_or_else(|| {
            crate::Error::range(
                "method",
                s,
                "expected dense, entropyinfer, entropyinfer-prefill, snapkv, critiprefill or adakv",
            )
        })
    }
}

/// One set of budgets for every method, so they compare at equal KV budgets: the sparse prefills
/// share segment/block/threshold/base, the compressing methods share `decode_budget` and window.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The prefill configuration.
    pub prefill: EntropyConfig,
    /// The decode (compression) configuration.
    pub decode: DecodeConfig,
    /// AdaKV's per-head floor, as a fraction of the uniform share.
    pub adakv_floor: f32,
}

impl Settings {
    /// Prefill config of `m`; `None` means dense prefill.
    pub fn prefill_config(&self, m: Method) -> Option<EntropyConfig> {
        match m {
            Method::Dense | Method::SnapKv | Method::AdaKv => None,
            Method::EntropyInfer | Method::EntropyInferPrefill => Some(self.prefill.clone()),
            Method::CritiPrefill => Some(EntropyConfig { budget_policy: BudgetPolicy::Fixed, ..self.prefill.clone() }),
        }
    }

    /// Decode compression of `m`; `None` keeps the full cache.
    pub fn decode_config(&self, m: Method) -> Option<DecodeConfig> {
        match m {
            Method::Dense | Method::CritiPrefill | Method::EntropyInferPrefill => None,
            Method::EntropyInfer => Some(self.decode.clone()),
            Method::SnapKv => Some(DecodeConfig { decode_gap: -1, ..self.decode.clone() }),
            Method::AdaKv => Some(DecodeConfig {
                decode_gap: -1,
                head_budget: HeadBudget::AdaKv { floor_fraction: self.adakv_floor },
                ..self.decode.clone()
            }),
        }
    }
}

/// One layer's cache `[heads][capacity][D]` (f32) with per-head lengths.
#[derive(Clone)]
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
    heads: usize,
    cap: usize,
    lengths: Vec<u32>,
    window: Option<ObservationWindow>,
}

impl LayerCache {
    fn view<'a>(&self, data: &'a [f32], d: usize, entries: usize) -> TensorView<'a> {
        TensorView::strided(data, [1, self.heads, entries, d], [self.heads * self.cap * d, self.cap * d, d, 1])
    }
}

/// Planning statistics of one prefilled layer.
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerStats {
    /// Fraction of the causal pairs the prefill kept.
    pub kept_fraction: f64,
    /// Heads that ran dense (rigid).
    pub rigid_heads: usize,
    /// Heads in all.
    pub heads: usize,
}

/// A method's state for one sequence: per-layer caches and windows.
#[derive(Clone)]
pub struct Session {
    kernels: Kernels,
    /// The attention method.
    pub method: Method,
    prefill: Option<EntropyConfig>,
    decode: Option<DecodeConfig>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    layers: Vec<Option<LayerCache>>,
    prev_scores: Option<Vec<f32>>,
    /// Room kept in each cache for generated tokens.
    reserve: usize,
    /// Per-layer statistics.
    pub stats: Vec<LayerStats>,
    /// Seconds spent in this crate's attention calls (planning included).
    pub attention_secs: f64,
}

fn host<R>(t: &Tensor, f: impl FnOnce(TensorView<'_>) -> crate::Result<R>) -> candle_core::Result<R> {
    super::with_views(&[(t, "tensor")], |v| Ok(f(v[0])?))
}

impl Session {
    /// An attention of `method` for `model` on `kernels`, reserving cache room for `reserve` more tokens.
    pub fn new(kernels: &Kernels, model: &Llama, method: Method, settings: &Settings, reserve: usize) -> Self {
        let c = &model.cfg;
        Session {
            kernels: kernels.clone(),
            method,
            prefill: settings.prefill_config(method),
            decode: settings.decode_config(method),
            q_heads: c.q_heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            layers: vec![None; c.layers],
            prev_scores: None,
            reserve,
            stats: Vec::new(),
            attention_secs: 0.0,
        }
    }

    /// Bytes of K and V held over all layers (entries actually kept, f32).
    pub fn kv_bytes(&self) -> usize {
        let per_entry = 2 * self.head_dim * 4;
        self.layers.iter().flatten().map(|c| c.lengths.iter().map(|&l| l as usize).sum::<usize>() * per_entry).sum()
    }

    /// Entries per head of layer 0 (equal for every layer and, without AdaKV, every head).
    pub fn entries(&self) -> Vec<u32> {
        self.layers.iter().flatten().next().map(|c| c.lengths.clone()).unwrap_or_default()
    }

    fn compress(&self, c: &LayerCache) -> crate::Result<LayerCache> {
        let cfg = self.decode.as_ref().expect("compression needs a decode config");
        let obs = c.window.as_ref().expect("a window").observation(DType::F32);
        let n = c.lengths[0] as usize;
        let d = self.head_dim;
        let out = self.kernels.kv_compress(c.view(&c.k, d, n), c.view(&c.v, d, n), obs.view(), cfg)?;
        let heads = out.heads();
        let cap = out.capacity() + self.reserve;
        let (k, v) = (out.k.to_f32_vec(), out.v.to_f32_vec());
        let mut nk = vec![0f32; heads * cap * d];
        let mut nv = vec![0f32; heads * cap * d];
        for h in 0..heads {
            let len = out.lengths[h] as usize;
            let src = h * out.capacity() * d;
            nk[h * cap * d..h * cap * d + len * d].copy_from_slice(&k[src..src + len * d]);
            nv[h * cap * d..h * cap * d + len * d].copy_from_slice(&v[src..src + len * d]);
        }
        Ok(LayerCache { k: nk, v: nv, heads, cap, lengths: out.lengths, window: c.window.clone() })
    }

    fn prefill_layer(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let out = match &self.prefill {
            None => super::dense_prefill(&self.kernels, q, k, v, None)?,
            Some(cfg) => {
                let mut req = PlanRequest::layer(layer).keep_maps(false);
                if let Some(p) = &self.prev_scores {
                    req = req.with_prev(p);
                }
                let (out, plan) = super::prefill(&self.kernels, q, k, v, cfg, &req)?;
                self.stats.push(LayerStats {
                    kept_fraction: plan.blocks.kept_fraction(),
                    rigid_heads: plan.rigid_heads(),
                    heads: plan.head_class.len(),
                });
                if cfg.layer_fusion {
                    self.prev_scores = Some(plan.scores);
                }
                out
            }
        };
        // The layer's cache: [Hkv][L + reserve][D].
        let (l, d, hkv) = (k.dim(1)?, self.head_dim, self.kv_heads);
        let cap = l + self.reserve;
        let (ks, vs) = (k.flatten_all()?.to_vec1::<f32>()?, v.flatten_all()?.to_vec1::<f32>()?);
        let mut cache = LayerCache {
            k: vec![0f32; hkv * cap * d],
            v: vec![0f32; hkv * cap * d],
            heads: hkv,
            cap,
            lengths: vec![l as u32; hkv],
            window: None,
        };
        for t in 0..l {
            for h in 0..hkv {
                let (src, dst) = ((t * hkv + h) * d, (h * cap + t) * d);
                cache.k[dst..dst + d].copy_from_slice(&ks[src..src + d]);
                cache.v[dst..dst + d].copy_from_slice(&vs[src..src + d]);
            }
        }
        if let Some(dcfg) = &self.decode {
            let mut w = ObservationWindow::new(1, self.q_heads, d, dcfg)?;
            let event = host(q, |qv| w.prefill_end(qv))?;
            cache.window = Some(w);
            if event == WindowEvent::CompressNow {
                cache = self.compress(&cache)?;
            }
        }
        self.layers[layer] = Some(cache);
        Ok(out)
    }

    fn decode_layer(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let d = self.head_dim;
        let mut cache =
            self.layers[layer].take().ok_or_else(|| candle_core::Error::Msg("decode before prefill".into()))?;
        let (ks, vs) = (k.flatten_all()?.to_vec1::<f32>()?, v.flatten_all()?.to_vec1::<f32>()?);
        let steps = k.dim(1)?;
        let per_kv = cache.heads / self.kv_heads;
        for t in 0..steps {
            if cache.lengths.iter().any(|&l| l as usize == cache.cap) {
                grow(&mut cache, d, self.reserve.max(64));
            }
            for hc in 0..cache.heads {
                let src = (t * self.kv_heads + hc / per_kv) * d;
                let dst = (hc * cache.cap + cache.lengths[hc] as usize) * d;
                cache.k[dst..dst + d].copy_from_slice(&ks[src..src + d]);
                cache.v[dst..dst + d].copy_from_slice(&vs[src..src + d]);
                cache.lengths[hc] += 1;
            }
        }
        let event = match cache.window.as_mut() {
            Some(w) => host(q, |qv| w.decode_step(qv))?,
            None => WindowEvent::Done,
        };
        let shape = q.dims4()?;
        let mut out = vec![0f32; shape.0 * shape.1 * shape.2 * shape.3];
        let (kv, vv) = (cache.view(&cache.k, d, cache.cap), cache.view(&cache.v, d, cache.cap));
        host(q, |qv| {
            let mut o = TensorViewMut::new(&mut out, [shape.0, shape.1, shape.2, shape.3]);
            self.kernels.decode_attention(qv, kv, vv, &cache.lengths, None, &mut o)
        })?;
        if event == WindowEvent::CompressNow {
            cache = self.compress(&cache)?;
        }
        self.layers[layer] = Some(cache);
        Tensor::from_vec(out, shape, q.device())
    }
}

/// Doubles-or-more a cache's capacity, keeping every head's entries.
fn grow(c: &mut LayerCache, d: usize, extra: usize) {
    let cap = c.cap + extra;
    let mut k = vec![0f32; c.heads * cap * d];
    let mut v = vec![0f32; c.heads * cap * d];
    for h in 0..c.heads {
        let n = c.lengths[h] as usize * d;
        k[h * cap * d..h * cap * d + n].copy_from_slice(&c.k[h * c.cap * d..h * c.cap * d + n]);
        v[h * cap * d..h * cap * d + n].copy_from_slice(&c.v[h * c.cap * d..h * c.cap * d + n]);
    }
    (c.k, c.v, c.cap) = (k, v, cap);
}

impl Attention for Session {
    fn attend(&mut self, layer: usize, pos: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let t = Instant::now();
        let out = if pos == 0 { self.prefill_layer(layer, q, k, v) } else { self.decode_layer(layer, q, k, v) };
        self.attention_secs += t.elapsed().as_secs_f64();
        out
    }
}

/// Index of the largest logit.
pub fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    logits.argmax(0)?.to_scalar::<u32>()
}

/// Runs the prompt through the model; returns the last position's logits and the seconds taken.
pub fn prefill(model: &Llama, session: &mut Session, prompt: &[u32]) -> candle_core::Result<(Tensor, f64)> {
    let t = Instant::now();
    let logits = model.forward(prompt, 0, session, None)?;
    Ok((logits, t.elapsed().as_secs_f64()))
}

/// One greedy step: the token chosen and how sure the model was of it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    /// The token id.
    pub token: u32,
    /// log p(top-1) − log p(top-2): how close the step was to a different choice.
    pub margin: f32,
    /// log p(token) − log p(reference token) under teacher forcing (0 when they agree or unforced):
    /// how far the method's distribution moved from dense's choice.
    pub deficit: f32,
}

impl Step {
    /// The step chosen from `logits`; `reference` is the token dense chose here, if known.
    pub fn from_logits(logits: &Tensor, reference: Option<u32>) -> candle_core::Result<Step> {
        let lp = super::llama::log_softmax(logits)?;
        let (mut top, mut second) = ((0usize, f32::NEG_INFINITY), f32::NEG_INFINITY);
        for (i, &x) in lp.iter().enumerate() {
            if x > top.1 {
                (top, second) = ((i, x), top.1);
            } else if x > second {
                second = x;
            }
        }
        let deficit = reference.map_or(0.0, |r| top.1 - lp.get(r as usize).copied().unwrap_or(f32::NEG_INFINITY));
        Ok(Step { token: top.0 as u32, margin: top.1 - second, deficit })
    }
}

/// Greedy decoding after `prefill`: `tokens[0] = first`, then `n - 1` more steps. With `forced`,
/// step `i` feeds `forced[i - 1]` instead of the method's own previous token (teacher forcing),
/// so `tokens[i]` is the method's choice given the reference prefix — what top-1 agreement
/// compares. Returns the tokens and the seconds of the decode steps.
pub fn decode(
    model: &Llama,
    session: &mut Session,
    prompt_len: usize,
    first: u32,
    n: usize,
    forced: Option<&[u32]>,
) -> candle_core::Result<(Vec<u32>, f64)> {
    let (steps, secs) = decode_steps(model, session, prompt_len, first, n, forced)?;
    Ok((steps.iter().map(|s| s.token).collect(), secs))
}

/// [`decode`] with each step's margin and, when forced, its deficit against the forced tokens
/// (step 0, chosen by the prefill, has margin and deficit 0 here; score it from the prefill's
/// logits with [`Step::from_logits`]).
pub fn decode_steps(
    model: &Llama,
    session: &mut Session,
    prompt_len: usize,
    first: u32,
    n: usize,
    forced: Option<&[u32]>,
) -> candle_core::Result<(Vec<Step>, f64)> {
    let t = Instant::now();
    let mut steps = vec![Step { token: first, margin: 0.0, deficit: 0.0 }];
    for i in 1..n {
        let feed = forced.map_or(steps[i - 1].token, |f| f[i - 1]);
        let logits = model.forward(&[feed], prompt_len + i - 1, session, None)?;
        steps.push(Step::from_logits(&logits, forced.and_then(|f| f.get(i).copied()))?);
    }
    Ok((steps, t.elapsed().as_secs_f64()))
}

/// Fraction of positions where `a` and `b` agree.
pub fn agreement(a: &[u32], b: &[u32]) -> f64 {
    let n = a.len().min(b.len());
    if n == 0 { 1.0 } else { a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / n as f64 }
}

/// KL(p ‖ q) of two log-probability vectors.
pub fn kl(p: &[f32], q: &[f32]) -> f64 {
    p.iter().zip(q).map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64)).sum()
}

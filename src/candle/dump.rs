//! `--dump-qkv`: per-layer post-RoPE Q/K/V of a real model in the conformance format.

use std::path::Path;

use candle_core::Tensor;

use super::llama::Llama;
use super::methods::{Method, Session, Settings};
use crate::config::Config;
use crate::io::{CaseData, CaseWriter};
use crate::kernels::Kernels;

/// Writes `layerNN.safetensors` for every layer into `dir`: post-RoPE `q`, `k`, `v` of a dense
/// prefill of `prompt` (BSND, Q/K in the HF rotate-half dim order the conformance files use),
/// plus `decode.k_cache`, `decode.v_cache` and the last-W-queries `decode.obs_q`, with `config`
/// and `layer_idx` in the metadata — so `run-case` and `inspect` work on real activations.
/// Returns the number of layers written.
pub fn dump_layers(
    model: &Llama,
    kernels: &Kernels,
    prompt: &[u32],
    config: &Config,
    dir: &Path,
) -> candle_core::Result<usize> {
    std::fs::create_dir_all(dir).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", dir.display())))?;
    let settings = Settings { prefill: config.prefill.clone(), decode: config.decode.clone(), adakv_floor: 0.0 };
    let mut session = Session::new(kernels, model, Method::Dense, &settings, 0);
    let mut taps = Vec::new();
    model.forward(prompt, 0, &mut session, Some(&mut taps))?;
    let c = &model.cfg;
    let (l, d) = (prompt.len(), c.head_dim);
    // GGUF stores Q/K rows in the interleaved RoPE order; the conformance files use the HF
    // (rotate-half) order. Attention and planning are invariant under this shared permutation.
    let hf: Vec<usize> = (0..d).map(|i| if i < d / 2 { 2 * i } else { 2 * (i - d / 2) + 1 }).collect();
    let w = config.decode.window.min(l);
    for (layer, (q, k, v)) in taps.iter().enumerate() {
        let to_hf = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
            Ok(t.flatten_all()?.to_vec1::<f32>()?.chunks(d).flat_map(|r| hf.iter().map(move |&j| r[j])).collect())
        };
        let (q, k, v) = (to_hf(q)?, to_hf(k)?, v.flatten_all()?.to_vec1::<f32>()?);
        // Cache layout [1, Hkv, L, D] and the last W prompt queries [1, Hq, W, D].
        let cache = |x: &[f32], h: usize| -> Vec<f32> {
            (0..h).flat_map(|hi| (0..l).flat_map(move |t| x[(t * h + hi) * d..(t * h + hi + 1) * d].to_vec())).collect()
        };
        let obs: Vec<f32> = (0..c.q_heads)
            .flat_map(|hi| {
                (l - w..l)
                    .flat_map(|t| q[(t * c.q_heads + hi) * d..(t * c.q_heads + hi + 1) * d].to_vec())
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut out = CaseWriter::new();
        out.meta("config", config.to_json())
            .meta("layer_idx", layer.to_string())
            .meta("description", format!("SmolLM2 layer {layer}, {l} prompt tokens (post-RoPE, HF dim order)"))
            .put("q", &[1, l, c.q_heads, d], CaseData::F32(q.clone()))
            .put("k", &[1, l, c.kv_heads, d], CaseData::F32(k.clone()))
            .put("v", &[1, l, c.kv_heads, d], CaseData::F32(v.clone()))
            .put("decode.k_cache", &[1, c.kv_heads, l, d], CaseData::F32(cache(&k, c.kv_heads)))
            .put("decode.v_cache", &[1, c.kv_heads, l, d], CaseData::F32(cache(&v, c.kv_heads)))
            .put("decode.obs_q", &[1, c.q_heads, w, d], CaseData::F32(obs));
        out.write(dir.join(format!("layer{layer:02}.safetensors")))?;
    }
    Ok(taps.len())
}

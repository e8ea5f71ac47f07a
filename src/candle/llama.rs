//! A Llama-family decoder (SmolLM2 and kin) loaded from GGUF with candle, whose attention is a
//! pluggable [`Attention`]: the model computes projections, RoPE, MLP and norms with candle and
//! hands post-RoPE BSND q/k/v to the hook — dense, EntropyInfer or a baseline (see `methods`).

use std::path::Path;

use candle_core::quantized::{QMatMul, gguf_file};
use candle_core::{D, DType, Device, Module, Tensor};

use super::tokenizer::GgufTokenizer;

/// Shape of the model, from the GGUF metadata.
#[derive(Clone, Debug)]
pub struct LlamaConfig {
    /// Transformer layers.
    pub layers: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension, in elements.
    pub head_dim: usize,
    /// Embedding width, in elements.
    pub embed: usize,
    /// Vocabulary size, in tokens.
    pub vocab: usize,
    /// Trained context length.
    pub context: usize,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
}

struct Block {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// Where a layer's attention runs: called with post-RoPE q `[1, L, Hq, D]` and k, v
/// `[1, L, Hkv, D]` for the tokens at positions `pos..pos + L`; returns `[1, L, Hq, D]`.
pub trait Attention {
    /// The attention output of layer `layer` for queries `q` at position `pos`, with this step's keys `k` and values `v`.
    fn attend(&mut self, layer: usize, pos: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor>;
}

/// One sequence's share of a ragged forward pass: its tokens sit at positions `pos..pos + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Position of the sequence's first token in this pass (tokens it already holds).
    pub pos: usize,
    /// Its tokens in this pass.
    pub len: usize,
}

/// Where a layer's attention runs in a ragged pass (SPEC §7.1): q `[1, T, Hq, D]` and k, v
/// `[1, T, Hkv, D]` hold the spans' tokens one sequence after another (THD); returns `[1, T, Hq, D]`.
pub trait RaggedAttention {
    /// The attention output of layer `layer` for the sequences `spans`.
    fn attend(
        &mut self,
        layer: usize,
        spans: &[Span],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Tensor>;
}

/// A one-sequence [`Attention`] in a ragged pass of one span.
struct OneSequence<'a>(&'a mut dyn Attention);

impl RaggedAttention for OneSequence<'_> {
    fn attend(
        &mut self,
        layer: usize,
        spans: &[Span],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.0.attend(layer, spans[0].pos, q, k, v)
    }
}

/// The model.
pub struct Llama {
    /// The model's configuration.
    pub cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// RoPE tables cover this many positions (twice the usual trained context), so generation may
/// run past the prompt.
const ROPE_POSITIONS: usize = 16384;

impl Llama {
    /// Loads weights and tokenizer from a GGUF file. With `dequantize`, quantized weights are
    /// expanded to f32 once at load time (exactly their quantized values), which makes long
    /// prefills much faster on CPU than the quantized matmul path.
    pub fn load(path: impl AsRef<Path>, dequantize: bool) -> candle_core::Result<(Llama, GgufTokenizer)> {
        let device = Device::Cpu;
        let mut file = std::fs::File::open(path.as_ref())
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.as_ref().display())))?;
        let ct = gguf_file::Content::read(&mut file)?;
        let md =
            |k: &str| ct.metadata.get(k).ok_or_else(|| candle_core::Error::Msg(format!("GGUF metadata has no `{k}`")));
        let arch = md("general.architecture")?.to_string()?.clone();
        if arch != "llama" {
            candle_core::bail!("architecture `{arch}` is not supported (llama only)");
        }
        let q_heads = md("llama.attention.head_count")?.to_u32()? as usize;
        let kv_heads = md("llama.attention.head_count_kv")?.to_u32()? as usize;
        let embed = md("llama.embedding_length")?.to_u32()? as usize;
        let cfg = LlamaConfig {
            layers: md("llama.block_count")?.to_u32()? as usize,
            q_heads,
            kv_heads,
            head_dim: embed / q_heads,
            embed,
            vocab: 0,
            context: md("llama.context_length")?.to_u32()? as usize,
            rope_base: md("llama.rope.freq_base").and_then(|v| v.to_f32()).unwrap_or(10000.0),
            rms_eps: md("llama.attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
        };
        let tokenizer = GgufTokenizer::from_gguf(&ct)?;
        let mut tensor = |name: &str| ct.tensor(&mut file, name, &device);
        let matmul = |q: candle_core::quantized::QTensor| -> candle_core::Result<QMatMul> {
            if dequantize { Ok(QMatMul::Tensor(q.dequantize(&device)?)) } else { QMatMul::from_qtensor(q) }
        };
        let embed_q = tensor("token_embd.weight")?;
        let embed_t = embed_q.dequantize(&device)?;
        let norm = tensor("output_norm.weight")?.dequantize(&device)?;
        // Tied embeddings when the file has no separate output matrix.
        let output = match tensor("output.weight") {
            Ok(t) => matmul(t)?,
            Err(_) => QMatMul::Tensor(embed_t.clone()),
        };
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("blk.{i}");
            blocks.push(Block {
                attn_norm: tensor(&format!("{p}.attn_norm.weight"))?.dequantize(&device)?,
                wq: matmul(tensor(&format!("{p}.attn_q.weight"))?)?,
                wk: matmul(tensor(&format!("{p}.attn_k.weight"))?)?,
                wv: matmul(tensor(&format!("{p}.attn_v.weight"))?)?,
                wo: matmul(tensor(&format!("{p}.attn_output.weight"))?)?,
                ffn_norm: tensor(&format!("{p}.ffn_norm.weight"))?.dequantize(&device)?,
                gate: matmul(tensor(&format!("{p}.ffn_gate.weight"))?)?,
                up: matmul(tensor(&format!("{p}.ffn_up.weight"))?)?,
                down: matmul(tensor(&format!("{p}.ffn_down.weight"))?)?,
            });
        }
        let theta: Vec<f32> =
            (0..cfg.head_dim).step_by(2).map(|i| 1.0 / cfg.rope_base.powf(i as f32 / cfg.head_dim as f32)).collect();
        let theta = Tensor::new(theta.as_slice(), &device)?;
        let pos = Tensor::arange(0u32, ROPE_POSITIONS as u32, &device)?.to_dtype(DType::F32)?;
        let angles = pos.reshape((ROPE_POSITIONS, 1))?.matmul(&theta.reshape((1, cfg.head_dim / 2))?)?;
        let vocab = embed_t.dim(0)?;
        Ok((
            Llama {
                cfg: LlamaConfig { vocab, ..cfg },
                embed: embed_t,
                blocks,
                norm,
                output,
                cos: angles.cos()?,
                sin: angles.sin()?,
                device,
            },
            tokenizer,
        ))
    }

    /// Largest position the RoPE tables cover.
    pub fn max_positions(&self) -> usize {
        ROPE_POSITIONS
    }

    /// Interleaved RoPE (GGUF llama convention) of a BSND tensor whose tokens' tables are `cos`
    /// and `sin` `[L, D/2]`; returns BSND.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let bhld = x.transpose(1, 2)?.contiguous()?;
        // Back to BSND as a strided view: the attention kernels take any strides.
        candle_nn::rotary_emb::rope_i(&bhld, cos, sin)?.transpose(1, 2)
    }

    /// Runs `tokens` (at positions `pos..`) through the model with `attn` as every layer's
    /// attention; returns the last position's logits `[vocab]` (f32). With `taps`, it also
    /// records each layer's post-RoPE q, k, v.
    pub fn forward(
        &self,
        tokens: &[u32],
        pos: usize,
        attn: &mut dyn Attention,
        taps: Option<&mut Vec<(Tensor, Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let span = Span { pos, len: tokens.len() };
        let mut logits = self.forward_ragged(tokens, &[span], &mut OneSequence(attn), taps)?;
        Ok(logits.pop().expect("one span, one logits row"))
    }

    /// One ragged pass (SPEC §7.1): `tokens` holds each span's tokens one sequence after another,
    /// each at its own positions; the projections, norms and MLP see the T tokens as one matrix,
    /// `attn` keeps the sequences apart. Returns each span's last-position logits `[vocab]` (f32).
    pub fn forward_ragged(
        &self,
        tokens: &[u32],
        spans: &[Span],
        attn: &mut dyn RaggedAttention,
        mut taps: Option<&mut Vec<(Tensor, Tensor, Tensor)>>,
    ) -> candle_core::Result<Vec<Tensor>> {
        let c = &self.cfg;
        let l = tokens.len();
        if spans.is_empty() || spans.iter().any(|s| s.len == 0) || spans.iter().map(|s| s.len).sum::<usize>() != l {
            candle_core::bail!(
                "ragged pass: {} tokens for spans {spans:?} (each span non-empty, all covering the tokens)",
                l
            );
        }
        if let Some(s) = spans.iter().find(|s| s.pos + s.len > ROPE_POSITIONS) {
            candle_core::bail!("position {} is beyond the {ROPE_POSITIONS} RoPE positions", s.pos + s.len);
        }
        let positions: Vec<u32> = spans.iter().flat_map(|s| (s.pos..s.pos + s.len).map(|p| p as u32)).collect();
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let (cos, sin) = (self.cos.index_select(&positions, 0)?, self.sin.index_select(&positions, 0)?);
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.unsqueeze(0)?;
        for (i, b) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &b.attn_norm, c.rms_eps as f32)?;
            let q = self.rope(&b.wq.forward(&h)?.reshape((1, l, c.q_heads, c.head_dim))?, &cos, &sin)?;
            let k = self.rope(&b.wk.forward(&h)?.reshape((1, l, c.kv_heads, c.head_dim))?, &cos, &sin)?;
            let v = b.wv.forward(&h)?.reshape((1, l, c.kv_heads, c.head_dim))?;
            let o = attn.attend(i, spans, &q, &k, &v)?;
            if let Some(t) = taps.as_deref_mut() {
                t.push((q.contiguous()?, k.contiguous()?, v));
            }
            x = (x + b.wo.forward(&o.reshape((1, l, c.embed))?)?)?;
            let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, c.rms_eps as f32)?;
            let mlp = b.down.forward(&(candle_nn::ops::silu(&b.gate.forward(&h)?)? * b.up.forward(&h)?)?)?;
            x = (x + mlp)?;
        }
        // Each span's last token, normed and projected one row at a time: a sequence's logits do
        // not depend on the other sequences of the pass.
        let mut logits = Vec::with_capacity(spans.len());
        let mut end = 0;
        for s in spans {
            end += s.len;
            let last = candle_nn::ops::rms_norm(&x.narrow(1, end - 1, 1)?, &self.norm, c.rms_eps as f32)?;
            logits.push(self.output.forward(&last)?.flatten_all()?.to_dtype(DType::F32)?);
        }
        Ok(logits)
    }
}

/// Log-softmax of a logits vector.
pub fn log_softmax(logits: &Tensor) -> candle_core::Result<Vec<f32>> {
    let l = logits.to_dtype(DType::F32)?;
    let m = l.max(D::Minus1)?.to_scalar::<f32>()?;
    let v = l.to_vec1::<f32>()?;
    let z: f32 = v.iter().map(|x| (x - m).exp()).sum();
    let lz = m + z.ln();
    Ok(v.iter().map(|x| x - lz).collect())
}

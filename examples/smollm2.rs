//! SmolLM2-135M-Instruct (GGUF, through candle) generating on a long prompt with each attention
//! method — dense, EntropyInfer, SnapKV, CritiPrefill, AdaKV — every one of them running its
//! attention through this crate, and a table comparing them with dense.
//!
//! ```sh
//! scripts/fetch-smollm2.sh                       # prints the path of the .gguf
//! cargo run --release --features candle --example smollm2 -- \
//!     --gguf target/models/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --prompt-file examples/data/passphrase.txt --context 8128 --max-new-tokens 64
//! ```
//!
//! The prompt file's last paragraph is the question; the rest is the document. The document is
//! cut from its end (never the question) to fit `--context` tokens. Top-1 agreement is measured
//! with teacher forcing: each method decodes dense's tokens and its argmax is compared with
//! dense's at every step, so one early slip does not count as all later ones.

use std::path::PathBuf;

use clap::Parser;
use entropy_kernels::candle::dump;
use entropy_kernels::candle::llama::{Llama, log_softmax};
use entropy_kernels::candle::methods::{self, Method, Session, Settings};
use entropy_kernels::candle::tokenizer::GgufTokenizer;
use entropy_kernels::{BackendChoice, Config, DecodeConfig, EntropyConfig, GqaMode, HeadClassMode, Kernels, Pooling};

#[path = "smollm2/engine.rs"]
mod engine;

/// A config enum from its SPEC name (`avg`, `per_query_head`, …).
fn config_enum<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|e| e.to_string())
}

#[derive(Parser, Debug)]
#[command(about = "SmolLM2 with dense, EntropyInfer and baseline attention, all through entropy-kernels")]
struct Args {
    /// The GGUF file (scripts/fetch-smollm2.sh fetches it).
    #[arg(long)]
    gguf: PathBuf,
    /// Document then, as the last paragraph, the question.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// A short question instead of a prompt file.
    #[arg(long, default_value = "What is the capital of France? Answer in one sentence.")]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Comma-separated methods: dense, entropyinfer, entropyinfer-prefill, snapkv, critiprefill, adakv.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "dense,entropyinfer,entropyinfer-prefill,snapkv,critiprefill,adakv"
    )]
    methods: Vec<String>,
    /// Prompt tokens at most (the document is shortened to fit).
    #[arg(long, default_value_t = 8128)]
    context: usize,
    /// Write each layer's post-RoPE Q/K/V (dense prefill) in the conformance format here.
    #[arg(long)]
    dump_qkv: Option<PathBuf>,
    /// EntropyInfer / CritiPrefill segment size, block size, dense threshold and base budget.
    #[arg(long, default_value_t = 512)]
    segment_size: usize,
    #[arg(long, default_value_t = 8)]
    block_size: usize,
    #[arg(long, default_value_t = 4096)]
    threshold: usize,
    #[arg(long, default_value_t = 2048)]
    base_budget: usize,
    /// KV entries kept per head by the compressing methods (window included).
    #[arg(long, default_value_t = 1024)]
    decode_budget: usize,
    #[arg(long, default_value_t = 32)]
    window: usize,
    #[arg(long, default_value_t = 16)]
    decode_gap: i64,
    /// Decode-score pooling (avg, max or none), its odd kernel, and the group reduction (mean, max
    /// or per_query_head), as in SPEC §4.
    #[arg(long, default_value = "avg", value_parser = config_enum::<Pooling>)]
    pooling: Pooling,
    #[arg(long, default_value_t = 5)]
    pooling_kernel: usize,
    #[arg(long, default_value = "mean", value_parser = config_enum::<GqaMode>)]
    gqa_mode: GqaMode,
    #[arg(long, default_value_t = 0.2)]
    adakv_floor: f32,
    /// Keep weights quantized (slower prefill on CPU) instead of expanding them to f32 at load.
    #[arg(long)]
    quantized: bool,
    /// Print every method's whole answer after the table.
    #[arg(long)]
    show_answers: bool,
    /// After the table, list each method's teacher-forced disagreements with dense: the step, both
    /// tokens, dense's top-1/top-2 log-prob margin there and the method's deficit on dense's token.
    #[arg(long)]
    diagnose: bool,
    /// Backend of the attention kernels (default: $ENTROPY_KERNELS_BACKEND or auto).
    #[arg(long)]
    backend: Option<String>,
    /// Head classes of the sparse prefills: `prompt` (decided over the whole prompt) or
    /// `streaming` (causal, what chunked prefill needs; SPEC §7.2).
    #[arg(long, default_value = "prompt", value_parser = config_enum::<HeadClassMode>)]
    head_class: HeadClassMode,
    /// Serve through the paged engine interface (SPEC §7) in prefill chunks of N tokens (a
    /// multiple of the segment size), and compare each method with its one-shot run: tokens,
    /// first-token log-probs, and the top-1 agreement of `streaming` with `prompt` head classes.
    #[arg(long)]
    chunk: Option<usize>,
    /// Cut the prompt into K prompts of different lengths (the document shortened to
    /// context·i/K tokens) served as one ragged batch per forward pass, sequence i with method
    /// i mod the --methods list; each is compared with its own single-sequence run.
    #[arg(long)]
    batch: Option<usize>,
    /// Page size of the engine interface's KV pool, in tokens.
    #[arg(long, default_value_t = 16)]
    page_size: usize,
}

/// Prints a markdown table.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    println!("\n| {} |", headers.join(" | "));
    println!("|{}|", headers.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
    for r in rows {
        println!("| {} |", r.join(" | "));
    }
}

/// The generated text up to the end-of-turn token, on one line.
fn answer_text(tok: &GgufTokenizer, tokens: &[u32]) -> candle_core::Result<String> {
    Ok(tok.decode(tokens)?.split("<|im_end|>").next().unwrap_or("").replace('\n', " "))
}

/// Mean over layers of the kept fraction of causal pairs (1 without sparse prefill).
fn mean_kept(stats: &[methods::LayerStats]) -> f64 {
    if stats.is_empty() { 1.0 } else { stats.iter().map(|s| s.kept_fraction).sum::<f64>() / stats.len() as f64 }
}

/// Builds the prompt tokens: chat template around document + question, document shortened to fit.
fn prompt_tokens(tok: &GgufTokenizer, args: &Args, context: usize) -> candle_core::Result<(Vec<u32>, String)> {
    let (document, question) = match &args.prompt_file {
        None => (String::new(), args.prompt.clone()),
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", p.display())))?;
            let text = text.trim_end();
            match text.rsplit_once("\n\n") {
                Some((doc, q)) => (doc.to_string(), q.trim().to_string()),
                None => (String::new(), text.to_string()),
            }
        }
    };
    let full = GgufTokenizer::chat_prompt(&format!("{document}\n\n{question}"));
    let ids = tok.encode(&full)?;
    if ids.len() <= context {
        return Ok((ids, question));
    }
    // Cut the document's tail: tokens of (prefix + document) then (question + suffix).
    let head = tok.encode(&GgufTokenizer::chat_prompt(&document).replace("<|im_end|>\n<|im_start|>assistant\n", ""))?;
    let tail = tok.encode(&format!("\n\n{question}<|im_end|>\n<|im_start|>assistant\n"))?;
    let keep = context.saturating_sub(tail.len()).min(head.len());
    Ok(([&head[..keep], &tail[..]].concat(), question))
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    let methods: Vec<Method> = args.methods.iter().map(|m| m.parse()).collect::<Result<_, _>>()?;
    let kernels = match &args.backend {
        Some(b) => Kernels::select(b.parse::<BackendChoice>()?)?,
        None => Kernels::auto()?,
    };
    let t = std::time::Instant::now();
    let (model, tok) = Llama::load(&args.gguf, !args.quantized)?;
    println!(
        "model: {} layers, GQA {}/{}, D {}, context {} (loaded in {:.1}s{}); attention backend: {}",
        model.cfg.layers,
        model.cfg.q_heads,
        model.cfg.kv_heads,
        model.cfg.head_dim,
        model.cfg.context,
        t.elapsed().as_secs_f64(),
        if args.quantized { ", quantized matmuls" } else { ", weights expanded to f32" },
        kernels.describe()
    );
    let settings = Settings {
        prefill: EntropyConfig {
            segment_size: args.segment_size,
            block_size: args.block_size,
            threshold_len: args.threshold,
            base_budget: args.base_budget,
            ..Default::default()
        },
        decode: DecodeConfig {
            decode_budget: args.decode_budget,
            window: args.window,
            decode_gap: args.decode_gap,
            pooling: args.pooling,
            pooling_kernel: args.pooling_kernel,
            gqa_mode: args.gqa_mode,
            ..Default::default()
        },
        adakv_floor: args.adakv_floor,
    };
    let settings = Settings { prefill: EntropyConfig { head_class: args.head_class, ..settings.prefill }, ..settings };
    if args.chunk.is_some() || args.batch.is_some() {
        return engine::run(&args, &kernels, &model, &tok, &settings, &methods);
    }
    let (prompt, question) = prompt_tokens(&tok, &args, args.context)?;
    println!("prompt: {} tokens; question: {question:?}", prompt.len());
    if let Some(dir) = &args.dump_qkv {
        let config = Config { prefill: settings.prefill.clone(), decode: settings.decode.clone() };
        let layers = dump::dump_layers(&model, &kernels, &prompt, &config, dir)?;
        println!("wrote {layers} layers of post-RoPE Q/K/V to {}", dir.display());
    }

    // Dense first: its tokens are the reference.
    let n = args.max_new_tokens.max(1);
    let mut reference: Option<(Vec<u32>, Vec<f32>, Vec<methods::Step>)> = None;
    let mut rows = Vec::new();
    let mut answers = Vec::new();
    let mut misses = Vec::new();
    let order: Vec<Method> =
        std::iter::once(Method::Dense).chain(methods.iter().copied().filter(|m| *m != Method::Dense)).collect();
    for method in order {
        let mut session = Session::new(&kernels, &model, method, &settings, n + 8);
        let (logits, prefill_s) = methods::prefill(&model, &mut session, &prompt)?;
        let attn_prefill_s = session.attention_secs;
        let first = methods::argmax(&logits)?;
        let logprobs = log_softmax(&logits)?;
        let mut free = session.clone();
        let (mut steps, decode_s) = methods::decode_steps(&model, &mut free, prompt.len(), first, n, None)?;
        steps[0] = methods::Step::from_logits(&logits, None)?;
        let tokens: Vec<u32> = steps.iter().map(|s| s.token).collect();
        let (agree, kl) = match &reference {
            None => (1.0, 0.0),
            Some((ref_tokens, ref_logprobs, ref_steps)) => {
                let (mut forced, _) =
                    methods::decode_steps(&model, &mut session, prompt.len(), first, n, Some(ref_tokens))?;
                forced[0] = methods::Step::from_logits(&logits, Some(ref_tokens[0]))?;
                for (i, (s, r)) in forced.iter().zip(ref_steps).enumerate().filter(|(_, (s, r))| s.token != r.token) {
                    misses.push(format!(
                        "{}: step {i}: {:?} instead of {:?}; dense margin {:.3}, deficit {:.3}",
                        method.name(),
                        tok.decode(&[s.token])?,
                        tok.decode(&[r.token])?,
                        r.margin,
                        s.deficit
                    ));
                }
                let forced: Vec<u32> = forced.iter().map(|s| s.token).collect();
                (methods::agreement(&forced, ref_tokens), methods::kl(ref_logprobs, &logprobs))
            }
        };
        let kept = mean_kept(&session.stats);
        let answer = answer_text(&tok, &tokens)?;
        answers.push((method, answer.clone()));
        if method == Method::Dense {
            reference = Some((tokens.clone(), logprobs, steps));
        }
        let entries = free.entries();
        rows.push(vec![
            method.name().to_string(),
            format!("{:.0}", prefill_s * 1e3),
            format!("{:.0}", attn_prefill_s * 1e3),
            format!("{kept:.2}"),
            format!("{:.1}", (n - 1) as f64 / decode_s),
            format!("{:.1}", free.kv_bytes() as f64 / (1 << 20) as f64),
            format!("{}", entries.iter().max().unwrap_or(&0)),
            format!("{:.1}%", 100.0 * agree),
            format!("{kl:.2e}"),
            answer.chars().take(60).collect(),
        ]);
        eprintln!("{}: done", method.name());
    }
    let headers = [
        "method",
        "prefill ms",
        "attention ms",
        "kept",
        "decode tok/s",
        "KV MiB",
        "entries/head",
        "top-1 agree",
        "KL first token",
        "answer (start)",
    ];
    table(&headers, &rows);
    if args.diagnose {
        println!("\nteacher-forced disagreements with dense (margins and deficits in nats):");
        for m in &misses {
            println!("  {m}");
        }
    }
    if args.show_answers {
        for (m, a) in answers {
            println!("\n{}: {a}", m.name());
        }
    }
    Ok(())
}

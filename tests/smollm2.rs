//! End to end with a real model: SmolLM2-135M-Instruct (GGUF) through candle, attention through
//! this crate, every method on a short prompt with a scaled-down configuration. Runs when the
//! GGUF is present (`ENTROPY_KERNELS_SMOLLM2_GGUF`, or `target/models/` as
//! `scripts/fetch-smollm2.sh` leaves it); prints why it is skipped otherwise.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use entropy_kernels::candle::dump;
use entropy_kernels::candle::llama::{Llama, log_softmax};
use entropy_kernels::candle::methods::{self, Method, Session, Settings};
use entropy_kernels::candle::serving::{self, Generation, Request, Server};
use entropy_kernels::candle::tokenizer::GgufTokenizer;
use entropy_kernels::io::Case;
use entropy_kernels::{DecodeConfig, EntropyConfig, HeadClassMode, Kernels};

fn gguf() -> Option<PathBuf> {
    let path = std::env::var_os("ENTROPY_KERNELS_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    path.is_file().then_some(path)
}

fn model() -> Option<&'static (Llama, GgufTokenizer)> {
    static MODEL: OnceLock<Option<(Llama, GgufTokenizer)>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let Some(path) = gguf() else {
                common::skip_or_fail(
                    "smollm2",
                    "no SmolLM2 GGUF (run scripts/fetch-smollm2.sh or set ENTROPY_KERNELS_SMOLLM2_GGUF)",
                );
                return None;
            };
            Some(Llama::load(&path, true).expect("the GGUF loads"))
        })
        .as_ref()
}

/// Scaled down so a ~600-token prompt has sparse segments and a compressed cache.
fn settings() -> Settings {
    Settings {
        prefill: EntropyConfig {
            segment_size: 64,
            block_size: 8,
            threshold_len: 128,
            base_budget: 64,
            ..Default::default()
        },
        decode: DecodeConfig { decode_budget: 160, window: 16, decode_gap: 4, ..Default::default() },
        adakv_floor: 0.2,
    }
}

fn long_prompt(tok: &GgufTokenizer) -> Vec<u32> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/passphrase.txt")).unwrap();
    let (doc, question) = text.trim_end().rsplit_once("\n\n").unwrap();
    let doc: String = doc.chars().take(2600).collect();
    tok.encode(&GgufTokenizer::chat_prompt(&format!("{doc}\n\n{question}"))).unwrap()
}

#[test]
fn dense_answers_a_simple_question() {
    let Some((model, tok)) = model() else { return };
    let kernels = Kernels::cpu();
    let prompt =
        tok.encode(&GgufTokenizer::chat_prompt("What is the capital of France? Answer in one sentence.")).unwrap();
    let mut s = Session::new(&kernels, model, Method::Dense, &settings(), 16);
    let (logits, _) = methods::prefill(model, &mut s, &prompt).unwrap();
    let (tokens, _) =
        methods::decode(model, &mut s, prompt.len(), methods::argmax(&logits).unwrap(), 10, None).unwrap();
    let text = tok.decode(&tokens).unwrap();
    assert!(text.contains("Paris"), "the model, tokenizer and attention must work together: {text:?}");
}

#[test]
fn every_method_runs_and_tracks_dense() {
    let Some((model, tok)) = model() else { return };
    let kernels = Kernels::cpu();
    let prompt = long_prompt(tok);
    assert!(prompt.len() > 400, "prompt of {} tokens is too short for the scaled-down config", prompt.len());
    let n = 12;
    let settings = settings();
    let mut dense = Session::new(&kernels, model, Method::Dense, &settings, n + 4);
    let (logits, _) = methods::prefill(model, &mut dense, &prompt).unwrap();
    let reference = log_softmax(&logits).unwrap();
    let (ref_tokens, _) =
        methods::decode(model, &mut dense, prompt.len(), methods::argmax(&logits).unwrap(), n, None).unwrap();
    let full_entries = prompt.len() + n - 1;
    assert!(dense.entries().iter().all(|&e| e as usize == full_entries));
    for method in
        [Method::EntropyInfer, Method::EntropyInferPrefill, Method::SnapKv, Method::CritiPrefill, Method::AdaKv]
    {
        let mut s = Session::new(&kernels, model, method, &settings, n + 4);
        let (logits, _) = methods::prefill(model, &mut s, &prompt).unwrap();
        let kl = methods::kl(&reference, &log_softmax(&logits).unwrap());
        let first = methods::argmax(&logits).unwrap();
        let (forced, _) = methods::decode(model, &mut s, prompt.len(), first, n, Some(&ref_tokens)).unwrap();
        let agree = methods::agreement(&forced, &ref_tokens);
        eprintln!("{}: KL {kl:.2e}, agreement {:.0}%, entries/head {:?}", method.name(), agree * 100.0, s.entries());
        assert!((-1e-6..0.5).contains(&kl), "{}: KL of the first token {kl}", method.name());
        assert!(agree >= 0.5, "{}: top-1 agreement {agree} with dense", method.name());
        match method {
            // Sparse prefill: some segments skipped some blocks.
            Method::EntropyInfer | Method::EntropyInferPrefill | Method::CritiPrefill => {
                assert!(s.stats.iter().any(|st| st.kept_fraction < 1.0), "{}: nothing sparse", method.name())
            }
            _ => assert!(s.stats.is_empty()),
        }
        let budget = settings.decode.decode_budget;
        match method {
            // Compressed at prefill end (SnapKV, AdaKV) or at step gap + 1 (latent), then grown by decoding.
            Method::SnapKv => assert!(s.entries().iter().all(|&e| e as usize == budget + n - 1)),
            Method::AdaKv => assert_eq!(s.entries().iter().sum::<u32>() as usize, s.entries().len() * (budget + n - 1)),
            Method::EntropyInfer => {
                let after = n - 1 - (settings.decode.decode_gap as usize + 1);
                assert!(s.entries().iter().all(|&e| e as usize == budget + after), "{:?}", s.entries())
            }
            _ => assert!(s.entries().iter().all(|&e| e as usize == full_entries)),
        }
    }
}

#[test]
fn sparse_config_covering_everything_equals_dense() {
    // Threshold beyond the prompt: EntropyInfer's prefill is dense and must give dense's logits.
    let Some((model, tok)) = model() else { return };
    let kernels = Kernels::cpu();
    let prompt = long_prompt(tok);
    let mut all_dense = settings();
    all_dense.prefill.threshold_len = usize::MAX;
    let mut a = Session::new(&kernels, model, Method::Dense, &all_dense, 0);
    let mut b = Session::new(&kernels, model, Method::EntropyInfer, &all_dense, 0);
    let (la, _) = methods::prefill(model, &mut a, &prompt).unwrap();
    let (lb, _) = methods::prefill(model, &mut b, &prompt).unwrap();
    let diff = (la - lb).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(diff <= 1e-4, "dense-equivalent EntropyInfer differs from dense by {diff}");
}

#[test]
fn dumped_layers_are_conformance_cases() {
    // What `--dump-qkv` writes can be read back as a case and planned (post-RoPE Q/K of a real layer).
    let Some((model, tok)) = model() else { return };
    let kernels = Kernels::cpu();
    let prompt = long_prompt(tok);
    let dir = std::env::temp_dir().join(format!("ek-dump-{}", std::process::id()));
    let s = settings();
    let config = entropy_kernels::Config { prefill: s.prefill, decode: s.decode };
    let layers = dump::dump_layers(model, &kernels, &prompt, &config, &dir).unwrap();
    assert_eq!(layers, model.cfg.layers);
    let case = Case::load(dir.join("layer14.safetensors")).unwrap();
    let q = case.tensor4("q").unwrap();
    assert_eq!(q.shape[2..], [model.cfg.q_heads, model.cfg.head_dim]);
    assert_eq!(q.shape[1], prompt.len());
    let k = case.tensor4("k").unwrap();
    let plan = kernels
        .plan(q.view(), k.view(), &case.config.prefill, &entropy_kernels::PlanRequest::layer(case.layer_idx))
        .unwrap();
    assert!(plan.blocks.sparse_units() > 0);
    let c = kernels
        .kv_compress(
            case.tensor4("decode.k_cache").unwrap().view(),
            case.tensor4("decode.v_cache").unwrap().view(),
            case.tensor4("decode.obs_q").unwrap().view(),
            &case.config.decode,
        )
        .unwrap();
    assert!(c.compressed);
    std::fs::remove_dir_all(&dir).ok();
}

fn request(method: Method, prompt: &[u32], new_tokens: usize, streaming: bool) -> Request {
    let class = if streaming { HeadClassMode::Streaming } else { HeadClassMode::Prompt };
    Request {
        method,
        prefill: settings().prefill_config(method).map(|p| EntropyConfig { head_class: class, ..p }),
        prompt: prompt.to_vec(),
        new_tokens,
        forced: None,
    }
}

fn served(model: &Llama, requests: &[Request], chunk: Option<usize>) -> Vec<Generation> {
    let kernels = Kernels::cpu();
    let tokens: usize = requests.iter().map(|r| r.prompt.len() + r.new_tokens).sum();
    let pages = tokens.div_ceil(16) + 2 * requests.len();
    let mut server = Server::new(&kernels, model, &settings(), 16, pages).unwrap();
    let (gens, _) = serving::serve(model, &mut server, requests, chunk).unwrap();
    assert_eq!(server.free_pages(), pages, "every page returns to the pool");
    gens
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn served_in_chunks_over_pages_equals_one_shot() {
    // SPEC §7.2 end to end: `streaming` planning over a paged cache in chunks of 2·S gives the
    // one-shot run's decisions, logits and tokens (every method, compression included).
    let Some((model, tok)) = model() else { return };
    let prompt = long_prompt(tok);
    let n = 12;
    for method in Method::ALL {
        let one = served(model, &[request(method, &prompt, n, true)], None);
        let chunked = served(model, &[request(method, &prompt, n, true)], Some(128));
        let (one, chunked) = (&one[0], &chunked[0]);
        let toks = |g: &Generation| g.steps.iter().map(|s| s.token).collect::<Vec<_>>();
        assert_eq!(toks(one), toks(chunked), "{}: chunked tokens", method.name());
        let diff = max_diff(&one.first_logprobs, &chunked.first_logprobs);
        assert!(diff <= 1e-4, "{}: first-token log-probs differ by {diff}", method.name());
        assert_eq!(one.entries, chunked.entries, "{}", method.name());
        for (a, b) in one.stats.iter().zip(&chunked.stats) {
            assert!((a.kept_fraction - b.kept_fraction).abs() < 1e-12, "{}: kept {a:?} vs {b:?}", method.name());
            assert_eq!(a.rigid_heads, b.rigid_heads, "{}", method.name());
        }
        if settings().prefill_config(method).is_some() {
            assert!(one.stats.iter().any(|s| s.kept_fraction < 1.0), "{}: nothing sparse", method.name());
        }
    }
}

#[test]
fn served_in_chunks_with_layer_fusion_equals_one_shot() {
    // Each layer's planning fuses the previous layer's plans of the same pass.
    let Some((model, tok)) = model() else { return };
    let prompt = long_prompt(tok);
    let mut r = request(Method::EntropyInfer, &prompt, 8, true);
    r.prefill = r.prefill.map(|p| EntropyConfig { layer_fusion: true, ..p });
    let one = &served(model, std::slice::from_ref(&r), None)[0];
    let chunked = &served(model, std::slice::from_ref(&r), Some(128))[0];
    let toks = |g: &Generation| g.steps.iter().map(|s| s.token).collect::<Vec<_>>();
    assert_eq!(toks(one), toks(chunked));
    assert!(max_diff(&one.first_logprobs, &chunked.first_logprobs) <= 1e-4);
    let plain = &served(model, &[request(Method::EntropyInfer, &prompt, 8, true)], None)[0];
    let kept = |g: &Generation| g.stats.iter().map(|s| s.kept_fraction).collect::<Vec<_>>();
    assert_eq!(kept(one), kept(chunked), "per-layer kept fractions");
    assert_ne!(kept(one), kept(plain), "fusion must change some layer's plan");
}

#[test]
fn ragged_batch_equals_each_single_run() {
    // Three prompts of different lengths, each with its own method and window, in one ragged
    // batch per pass (prefill chunks and decode steps mixed): each equals its run alone.
    let Some((model, tok)) = model() else { return };
    let prompt = long_prompt(tok);
    let n = 10;
    let requests = [
        request(Method::EntropyInfer, &prompt[..300], n, true),
        request(Method::SnapKv, &prompt, n, true),
        request(Method::CritiPrefill, &prompt[..450], n, true),
        request(Method::AdaKv, &prompt[..200], n, true),
    ];
    for chunk in [None, Some(128)] {
        let together = served(model, &requests, chunk);
        for (r, g) in requests.iter().zip(&together) {
            let alone = &served(model, std::slice::from_ref(r), chunk)[0];
            // Tokens exactly; log-probs up to the rounding of candle's matmuls, whose blocking
            // depends on the pass's token count.
            let toks = |g: &Generation| g.steps.iter().map(|s| s.token).collect::<Vec<_>>();
            let what = format!("{} ({} tokens, chunk {chunk:?})", r.method.name(), r.prompt.len());
            assert_eq!(toks(g), toks(alone), "{what}");
            let diff = max_diff(&g.first_logprobs, &alone.first_logprobs);
            assert!(diff <= 1e-4, "{what}: first-token log-probs differ by {diff}");
            assert_eq!(g.entries, alone.entries, "{}", r.method.name());
        }
        assert!(together[1].entries.iter().all(|&e| e as usize == settings().decode.decode_budget + n - 1));
    }
}

#[test]
fn served_dense_tracks_the_one_shot_session() {
    // The paged engine path and the one-shot calls are different kernels: they must agree on
    // the model's output (up to f32 rounding).
    let Some((model, tok)) = model() else { return };
    let prompt = long_prompt(tok);
    let n = 12;
    let kernels = Kernels::cpu();
    for method in [Method::Dense, Method::EntropyInfer] {
        let mut s = Session::new(&kernels, model, method, &settings(), n + 4);
        let (logits, _) = methods::prefill(model, &mut s, &prompt).unwrap();
        let first = methods::argmax(&logits).unwrap();
        let (reference, _) = methods::decode(model, &mut s, prompt.len(), first, n, None).unwrap();
        let g = &served(model, &[request(method, &prompt, n, false)], None)[0];
        let diff = max_diff(&log_softmax(&logits).unwrap(), &g.first_logprobs);
        assert!(diff <= 1e-3, "{}: first-token log-probs differ by {diff}", method.name());
        let toks: Vec<u32> = g.steps.iter().map(|s| s.token).collect();
        assert!(methods::agreement(&toks, &reference) >= 0.9, "{}: {toks:?} vs {reference:?}", method.name());
    }
}

#[test]
fn server_rejects_bad_passes() {
    let Some((model, tok)) = model() else { return };
    let prompt = long_prompt(tok);
    let kernels = Kernels::cpu();
    let mut server = Server::new(&kernels, model, &settings(), 16, 32).unwrap();
    let id = server.add(Method::EntropyInfer, 200, None).unwrap();
    // Past the prompt's end; prompt head classes in chunks; off the segment grid; no tokens.
    assert!(server.step(model, &[(id, &prompt[..201])]).is_err());
    let err = server.step(model, &[(id, &prompt[..64])]).unwrap_err().to_string();
    assert!(err.contains("head_class = streaming"), "{err}");
    let streaming = EntropyConfig { head_class: HeadClassMode::Streaming, ..settings().prefill };
    let id = server.add(Method::EntropyInfer, 200, Some(streaming)).unwrap();
    let err = server.step(model, &[(id, &prompt[..100])]).unwrap_err().to_string();
    assert!(err.contains("segment grid"), "{err}");
    assert!(server.step(model, &[(id, &[][..])]).is_err());
    // Refused passes wrote nothing: the sequence still prefills from its first token.
    server.step(model, &[(id, &prompt[..64])]).unwrap();
    server.step(model, &[(id, &prompt[64..200])]).unwrap();
    assert!(server.entries(id).unwrap().iter().all(|&e| e == 200));
    // The pool holds 8 pages of 16 tokens: 200 tokens do not fit.
    let mut small = Server::new(&kernels, model, &settings(), 16, 8).unwrap();
    let id = small.add(Method::Dense, 200, None).unwrap();
    let err = small.step(model, &[(id, &prompt[..200])]).unwrap_err().to_string();
    assert!(err.contains("exhausted"), "{err}");
    assert!(server.add(Method::Dense, 0, None).is_err());
    let per_query = Settings {
        decode: DecodeConfig { gqa_mode: entropy_kernels::GqaMode::PerQueryHead, ..settings().decode },
        ..settings()
    };
    let mut s = Server::new(&kernels, model, &per_query, 16, 8).unwrap();
    assert!(s.add(Method::SnapKv, 100, None).is_err());
}

//! The example's engine-interface modes (SPEC §7): `--chunk N` (chunked prefill over a paged
//! cache, each method against its one-shot run) and `--batch K` (K prompts of different lengths
//! in one ragged batch, each against its single-sequence run).

use entropy_kernels::candle::llama::Llama;
use entropy_kernels::candle::methods::{self, Method, Settings};
use entropy_kernels::candle::serving::{self, Generation, Request, Server, Timing};
use entropy_kernels::candle::tokenizer::GgufTokenizer;
use entropy_kernels::{EntropyConfig, HeadClassMode, Kernels};

use super::{Args, answer_text, mean_kept, prompt_tokens, table};

fn tokens(g: &Generation) -> Vec<u32> {
    g.steps.iter().map(|s| s.token).collect()
}

/// Largest |Δ log p| over the vocabulary between two first-token distributions.
fn max_logprob_diff(a: &Generation, b: &Generation) -> f32 {
    a.first_logprobs.iter().zip(&b.first_logprobs).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// "identical" or where the two token streams first part.
fn same_tokens(a: &Generation, b: &Generation) -> String {
    let (ta, tb) = (tokens(a), tokens(b));
    match ta.iter().zip(&tb).position(|(x, y)| x != y) {
        None if ta.len() == tb.len() => format!("identical ({}/{})", ta.len(), ta.len()),
        None => format!("lengths {} vs {}", ta.len(), tb.len()),
        Some(i) => format!("**differ from step {i}**"),
    }
}

/// Pages for `tokens` tokens of prompts and generations, with a page per sequence of slack.
fn pool_pages(args: &Args, tokens: usize, sequences: usize) -> usize {
    tokens.div_ceil(args.page_size) + 2 * sequences
}

struct Ctx<'a> {
    args: &'a Args,
    kernels: &'a Kernels,
    model: &'a Llama,
    settings: &'a Settings,
}

impl Ctx<'_> {
    fn serve(&self, requests: &[Request], chunk: Option<usize>) -> candle_core::Result<(Vec<Generation>, Timing)> {
        let total: usize = requests.iter().map(|r| r.prompt.len() + r.new_tokens).sum();
        let pages = pool_pages(self.args, total, requests.len());
        let mut server = Server::new(self.kernels, self.model, self.settings, self.args.page_size, pages)?;
        serving::serve(self.model, &mut server, requests, chunk)
    }

    fn request(
        &self,
        method: Method,
        class: Option<HeadClassMode>,
        prompt: &[u32],
        forced: Option<Vec<u32>>,
    ) -> Request {
        Request {
            method,
            prefill: class
                .and_then(|c| self.settings.prefill_config(method).map(|p| EntropyConfig { head_class: c, ..p })),
            prompt: prompt.to_vec(),
            new_tokens: self.args.max_new_tokens.max(1),
            forced,
        }
    }
}

pub fn run(
    args: &Args,
    kernels: &Kernels,
    model: &Llama,
    tok: &GgufTokenizer,
    settings: &Settings,
    methods: &[Method],
) -> candle_core::Result<()> {
    let s = settings.prefill.segment_size;
    if let Some(n) = args.chunk
        && (n == 0 || n % s != 0)
    {
        candle_core::bail!("--chunk {n}: a chunk is a positive multiple of the segment size ({s})");
    }
    let ctx = Ctx { args, kernels, model, settings };
    match args.batch {
        Some(k) => batch(&ctx, tok, methods, k),
        None => chunked(&ctx, tok, methods, args.chunk.expect("--chunk or --batch")),
    }
}

/// `--chunk N`: each method one shot and in chunks through the same paged server.
fn chunked(ctx: &Ctx<'_>, tok: &GgufTokenizer, methods: &[Method], chunk: usize) -> candle_core::Result<()> {
    let (prompt, question) = prompt_tokens(tok, ctx.args, ctx.args.context)?;
    println!(
        "prompt: {} tokens in chunks of {chunk} ({} chunks), pages of {} tokens; question: {question:?}",
        prompt.len(),
        prompt.len().div_ceil(chunk),
        ctx.args.page_size
    );
    println!("sparse prefills run with head_class = streaming (chunked planning needs it; SPEC §7.2)");
    let mut rows = Vec::new();
    for &m in methods {
        let sparse = ctx.settings.prefill_config(m).is_some();
        let class = sparse.then_some(HeadClassMode::Streaming);
        let (one, t1) = ctx.serve(&[ctx.request(m, class, &prompt, None)], None)?;
        let (chunked, t2) = ctx.serve(&[ctx.request(m, class, &prompt, None)], Some(chunk))?;
        let (one, chunked) = (&one[0], &chunked[0]);
        // Streaming against prompt head classes: the prompt-class run's tokens, teacher-forced.
        let versus_prompt = if sparse {
            let (p, _) = ctx.serve(&[ctx.request(m, Some(HeadClassMode::Prompt), &prompt, None)], None)?;
            let forced = tokens(&p[0]);
            let (f, _) = ctx.serve(&[ctx.request(m, class, &prompt, Some(forced.clone()))], None)?;
            format!(
                "{:.1}% (kept {:.2} vs {:.2})",
                100.0 * methods::agreement(&tokens(&f[0]), &forced),
                mean_kept(&one.stats),
                mean_kept(&p[0].stats)
            )
        } else {
            "—".into()
        };
        rows.push(vec![
            m.name().to_string(),
            format!("{:.0}", t1.prefill_s * 1e3),
            format!("{:.0}", t2.prefill_s * 1e3),
            same_tokens(one, chunked),
            format!("{:.1e}", max_logprob_diff(one, chunked)),
            format!("{:.2}", mean_kept(&one.stats)),
            versus_prompt,
            format!("{}", chunked.entries.iter().max().unwrap_or(&0)),
        ]);
        eprintln!("{}: done", m.name());
    }
    table(
        &[
            "method",
            "one-shot prefill ms",
            "chunked prefill ms",
            "chunked vs one-shot tokens",
            "max |Δ log p| first token",
            "kept",
            "streaming vs prompt top-1",
            "entries/head",
        ],
        &rows,
    );
    Ok(())
}

/// `--batch K`: K prompts of different lengths in one ragged batch, each against its own run.
fn batch(ctx: &Ctx<'_>, tok: &GgufTokenizer, methods: &[Method], k: usize) -> candle_core::Result<()> {
    if k == 0 {
        candle_core::bail!("--batch 0: at least one sequence");
    }
    let mut requests = Vec::new();
    for i in 0..k {
        let (prompt, _) = prompt_tokens(tok, ctx.args, ctx.args.context * (i + 1) / k)?;
        requests.push(ctx.request(methods[i % methods.len()], Some(ctx.args.head_class), &prompt, None));
    }
    let chunk = ctx.args.chunk;
    println!(
        "{k} sequences of {:?} tokens in one ragged batch per pass{}, pages of {} tokens",
        requests.iter().map(|r| r.prompt.len()).collect::<Vec<_>>(),
        chunk.map_or(String::new(), |n| format!(", prefill in chunks of {n}")),
        ctx.args.page_size
    );
    let (together, t) = ctx.serve(&requests, chunk)?;
    let mut rows = Vec::new();
    let mut alone_s = 0.0;
    for (i, (r, g)) in requests.iter().zip(&together).enumerate() {
        let (single, ts) = ctx.serve(std::slice::from_ref(r), chunk)?;
        alone_s += ts.prefill_s + ts.decode_s;
        let answer = answer_text(tok, &tokens(g))?;
        rows.push(vec![
            format!("{i}"),
            r.method.name().to_string(),
            format!("{}", r.prompt.len()),
            same_tokens(g, &single[0]),
            format!("{:.1e}", max_logprob_diff(g, &single[0])),
            format!("{:.2}", mean_kept(&g.stats)),
            format!("{}", g.entries.iter().max().unwrap_or(&0)),
            format!("{}", g.pages),
            answer.chars().take(50).collect(),
        ]);
        eprintln!("sequence {i}: done");
    }
    table(
        &[
            "seq",
            "method",
            "prompt tokens",
            "batch vs its single run",
            "max |Δ log p| first token",
            "kept",
            "entries/head",
            "pages held",
            "answer (start)",
        ],
        &rows,
    );
    println!(
        "\nbatch: {} passes, prefill {:.0} ms + decode {:.0} ms = {:.1} s; the {k} sequences one by one: {:.1} s",
        t.passes,
        t.prefill_s * 1e3,
        t.decode_s * 1e3,
        t.prefill_s + t.decode_s,
        alone_s
    );
    Ok(())
}

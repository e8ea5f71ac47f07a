//! The command-line tool end to end: `run-case` reproduces a conformance case, `demo`, `bench`,
//! `bench-device` (on the emulated CUDA driver) and `inspect` run on small workloads and print
//! what they promise.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use entropy_kernels::io::Case;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_entropy-kernels"))
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ek-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("binary runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "command failed: {cmd:?}\n{text}");
    text
}

#[test]
fn run_case_reproduces_a_conformance_case() {
    let Some(case) = conformance_case("cli::run_case", "planted_gqa_partial") else { return };
    let out = tmp("gqa_partial.out.safetensors");
    run(bin().args(["run-case", case.to_str().unwrap(), "--out", out.to_str().unwrap(), "--backend", "cpu"]));
    let (want, got) = (Case::load(&case).unwrap(), Case::load(&out).unwrap());
    for name in ["plan.keep_blocks", "plan.segment_topk", "decode.indices"] {
        assert_eq!(got.i64(name).unwrap(), want.i64(name).unwrap(), "{name}");
    }
    for name in ["prefill.out", "prefill.out_per_head", "dense.out"] {
        let (g, shape) = got.f32(name).unwrap();
        let (w, wshape) = want.f32(name).unwrap();
        assert_eq!(shape, wshape, "{name} shape");
        let err =
            rel_fro(&g.iter().map(|&x| x as f64).collect::<Vec<_>>(), &w.iter().map(|&x| x as f64).collect::<Vec<_>>());
        assert!(err <= 1e-4, "{name}: {err:e}");
    }
    assert_eq!(got.f32("decode.k_out").unwrap(), want.f32("decode.k_out").unwrap());
    // --only limits the outputs.
    let only = tmp("only_plan.safetensors");
    run(bin().args([
        "run-case",
        case.to_str().unwrap(),
        "--out",
        only.to_str().unwrap(),
        "--only",
        "plan",
        "--dtype",
        "bf16",
    ]));
    let c = Case::load(&only).unwrap();
    assert!(c.has("plan.order") && !c.has("dense.out") && !c.has("decode.indices"));
}

#[test]
fn demo_prints_the_comparison_table() {
    let text = run(bin().args([
        "demo",
        "--tokens",
        "3000",
        "--q-heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "64",
        "--backend",
        "cpu",
        "--config",
        &write_config(),
    ]));
    for col in ["dense ms", "sparse ms", "speedup", "kept fraction", "rigid/dynamic heads", "rel err vs dense"] {
        assert!(text.contains(col), "demo output lacks `{col}`:\n{text}");
    }
}

/// A small config so the short demo has sparse segments, in a file of its own per call: tests run
/// in parallel, and rewriting one shared file (truncate, then write) while another test's command
/// was reading it could hand that command an empty config.
fn write_config() -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let p = tmp(&format!("small-{}.json", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let cfg = entropy_kernels::Config {
        prefill: entropy_kernels::EntropyConfig {
            segment_size: 256,
            threshold_len: 512,
            base_budget: 256,
            ..Default::default()
        },
        ..Default::default()
    };
    cfg.save(&p).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn bench_prints_ratios() {
    let text = run(bin().args([
        "bench",
        "--lengths",
        "2048",
        "--q-heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "64",
        "--reps",
        "1",
        "--decode-budget",
        "512",
        "--config",
        &write_config(),
        "--backend",
        "cpu",
    ]));
    for op in ["dense prefill", "plan", "sparse attention", "sparse prefill", "kv_compress", "decode, compressed"] {
        assert!(text.contains(op), "bench output lacks `{op}`:\n{text}");
    }
}

#[test]
fn inspect_writes_a_heatmap() {
    let Some(case) = conformance_case("cli::inspect", "smollm2_gpl_layer14") else { return };
    let svg = tmp("layer14.svg");
    let text = run(bin().args(["inspect", case.to_str().unwrap(), "--svg", svg.to_str().unwrap()]));
    assert!(text.contains("rigid") || text.contains("dynamic"), "{text}");
    let body = std::fs::read_to_string(&svg).unwrap();
    assert!(body.starts_with("<svg") && body.contains("entropy") && body.contains("budget"));
    // A colour scale per heatmap, with its range and unit (base..3·base tokens for budgets).
    assert_eq!(body.matches("colour scale").count(), 2, "{body}");
    assert!(body.contains("max 384 tokens") && body.contains("min 128 tokens") && body.contains(" nats</text>"));
    // The kept-block map of each of the 3 kv heads, with its legend.
    let maps = kept_blocks(&body);
    assert_eq!(maps.matches("<g id=\"kept-b0-h").count(), 3, "{maps}");
    for item in ["kept", "not kept (candidate)", "dense segment", "causally masked", "key blocks 0 (left) … 175"] {
        assert!(maps.contains(item), "the kept-block map lacks `{item}`");
    }
}

/// The kept-block maps of an `inspect` SVG.
fn kept_blocks(svg: &str) -> &str {
    let start = svg.find("<g id=\"kept-blocks\">").expect("the SVG has kept-block maps");
    let end = svg.find("<!-- end kept-blocks -->").expect("the kept-block maps end");
    &svg[start..end]
}

/// `inspect --chunk` (planned in chunks over a paged cache, `streaming`) prints and draws what a
/// one-shot `streaming` plan does.
#[test]
fn inspect_in_chunks_matches_one_shot_streaming() {
    let Some(case) = conformance_case("cli::inspect_chunked", "smollm2_gpl_layer14") else { return };
    let mut cfg = Case::load(&case).unwrap().config;
    cfg.prefill.head_class = entropy_kernels::HeadClassMode::Streaming;
    let streaming = tmp("streaming.json");
    cfg.save(&streaming).unwrap();
    let (one_svg, chunk_svg) = (tmp("layer14-one-shot.svg"), tmp("layer14-chunked.svg"));
    let inspect = |extra: &[&str], svg: &PathBuf| {
        run(bin()
            .args(["inspect", case.to_str().unwrap(), "--backend", "cpu", "--svg", svg.to_str().unwrap()])
            .args(extra))
    };
    let one = inspect(&["--config", streaming.to_str().unwrap()], &one_svg);
    let chunked = inspect(&["--chunk", "384"], &chunk_svg);
    assert!(
        chunked.contains("planned in 4 chunks of 384 tokens") && chunked.contains("head_class streaming"),
        "{chunked}"
    );
    // The per-head lines and the totals.
    let summary = |text: &str| -> Vec<String> {
        text.lines().filter(|l| l.starts_with("b0 h") || l.contains("kept fraction")).map(String::from).collect()
    };
    assert_eq!(summary(&chunked), summary(&one));
    assert_eq!(summary(&one).len(), 4, "{one}");
    let (one_svg, chunk_svg) = (std::fs::read_to_string(one_svg).unwrap(), std::fs::read_to_string(chunk_svg).unwrap());
    assert!(kept_blocks(&chunk_svg).contains("fill=\"#c2410c\""), "the chunked map keeps no block");
    assert_eq!(kept_blocks(&chunk_svg), kept_blocks(&one_svg));
    // --chunk must be on the segment grid (S = 128).
    let off_grid = ["--chunk", "100", "--svg", tmp("off-grid.svg").to_str().unwrap()].map(String::from);
    let out = bin().args(["inspect", case.to_str().unwrap(), "--backend", "cpu"]).args(off_grid).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("multiple of the segment size"));
}

#[test]
fn bad_flags_fail_cleanly() {
    let out = bin().args(["demo", "--backend", "tpu"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown backend"));
}

/// `bench-device` on the emulated driver (no GPU here): every row it promises, sparse segments
/// included. The emulator's timings mean nothing; the run checks the command end to end.
#[cfg(feature = "cuda-emu")]
#[test]
fn bench_device_prints_every_row_on_the_emulated_driver() {
    if !cuda_kernels_available("cli::bench_device") {
        return;
    }
    let text =
        run(bin().env(entropy_kernels::cuda::EMU_ENV, "1").env(entropy_kernels::cuda::PREFILL_TILE_ENV, "128").args([
            "bench-device",
            "--lengths",
            "1100",
            "--q-heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "64",
            "--dtype",
            "f16",
            "--reps",
            "1",
            "--decode-batch",
            "2",
            "--decode-cache",
            "300",
            "--copy-bytes",
            "1048576",
            "--chunk-prompts",
            "2",
            "--chunk-len",
            "1024",
            "--chunk",
            "512",
            "--config",
            &write_config(),
        ]));
    assert!(text.contains("emulator") && text.contains("prefill tile M128"), "{text}");
    for op in [
        "copy, device to device",
        "dense prefill",
        "plan",
        "sparse prefill",
        "kv_compress",
        "decode_attention",
        "ragged prefill, one shot",
        "ragged chunked prefill",
    ] {
        assert!(text.contains(op), "bench-device output lacks `{op}`:\n{text}");
    }
    assert!(!text.contains("kept 1.000"), "the small config should make sparse segments:\n{text}");
}

/// The device check's first commands on the emulated driver: `cuda-info` opens the backend as
/// `auto` would and lists every kernel's limits; `cuda-smoke` runs one small case per kernel
/// against the CPU backend and launches every kernel (what compute-sanitizer checks on a GPU).
#[cfg(feature = "cuda-emu")]
#[test]
fn cuda_info_and_smoke_reach_every_kernel_on_the_emulated_driver() {
    if !cuda_kernels_available("cli::cuda_info_and_smoke") {
        return;
    }
    let info = run(bin().env(entropy_kernels::cuda::EMU_ENV, "1").arg("cuda-info"));
    for k in entropy_kernels::cuda::source::KERNELS {
        assert!(info.contains(k), "cuda-info lacks {k}:\n{info}");
    }
    let smoke = run(bin().env(entropy_kernels::cuda::EMU_ENV, "1").arg("cuda-smoke"));
    assert!(smoke.contains("every one of the") && !smoke.contains("FAIL"), "{smoke}");
}

/// `--threads` beyond what a process can start panicked (`build_global().expect`); now clap
/// refuses it, and a pool that cannot start is a one-line error.
#[test]
fn absurd_thread_counts_fail_cleanly() {
    for n in ["100000", "0"] {
        let out = bin().args(["--threads", n, "backends"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--threads {n}: {err}");
        assert!(err.contains("--threads") && !err.contains("panicked"), "--threads {n}: {err}");
    }
    run(bin().args(["--threads", "3", "backends"]));
}

/// Workload flags beyond memory (or `usize`) are a one-line error, not an abort in the allocator.
#[test]
fn absurd_workload_sizes_fail_cleanly() {
    for args in [
        vec!["demo", "--tokens", "100000000000000", "--backend", "cpu"],
        vec!["bench", "--lengths", "18446744073709551615", "--backend", "cpu"],
    ] {
        let out = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("error: cannot allocate"), "{args:?}: {err}");
    }
}

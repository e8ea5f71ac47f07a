//! `entropy-kernels`: demo, conformance runner, benchmark and entropy inspector.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "entropy-kernels",
    version,
    about = "EntropyInfer kernels: entropy-guided sparse prefill and latent KV compression"
)]
struct Cli {
    /// Worker threads of the CPU backend (default: one per core; at most 1024).
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Long-context prefill on the best available backend: dense against EntropyInfer.
    Demo(cli::demo::DemoArgs),
    /// Run a case in the ../shared/conformance format and write every output.
    RunCase(cli::run_case::RunCaseArgs),
    /// Time dense and sparse prefill, planning, compression and decode at several lengths.
    Bench(cli::bench::BenchArgs),
    /// The serving-loop calls (ragged, chunked, paged) against the one-shot calls, in one run.
    BenchEngine(cli::bench_engine::BenchEngineArgs),
    /// The CUDA kernels on device-resident tensors against the device's copy bandwidth.
    #[cfg(feature = "_cuda")]
    BenchDevice(cli::bench_device::BenchDeviceArgs),
    /// Open the CUDA backend as `auto` would and list what the driver reports for each kernel.
    #[cfg(feature = "_cuda")]
    CudaInfo,
    /// One small case per CUDA kernel against the CPU backend (what compute-sanitizer checks).
    #[cfg(feature = "_cuda")]
    CudaSmoke(cli::cuda_check::CudaSmokeArgs),
    /// Per-head entropy profile, head classes and an SVG heatmap of a layer's Q/K.
    Inspect(cli::inspect::InspectArgs),
    /// Which backends this build can run here, and why not.
    Backends,
}

fn main() {
    let cli = Cli::parse();
    if let Some(n) = cli.threads
        && let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n.into()).build_global()
    {
        eprintln!("error: cannot start {n} worker threads: {e}");
        std::process::exit(1);
    }
    let result = match &cli.command {
        Command::Demo(a) => cli::demo::run(a),
        Command::RunCase(a) => cli::run_case::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::BenchEngine(a) => cli::bench_engine::run(a),
        #[cfg(feature = "_cuda")]
        Command::BenchDevice(a) => cli::bench_device::run(a),
        #[cfg(feature = "_cuda")]
        Command::CudaInfo => cli::cuda_check::info(),
        #[cfg(feature = "_cuda")]
        Command::CudaSmoke(a) => cli::cuda_check::smoke(a),
        Command::Inspect(a) => cli::inspect::run(a),
        Command::Backends => {
            for (kind, status) in entropy_kernels::selection::availability() {
                match status {
                    Ok(desc) => println!("{kind:<10} available: {desc}"),
                    Err(why) => println!("{kind:<10} unavailable: {why}"),
                }
            }
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

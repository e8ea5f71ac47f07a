//! Pieces shared by the subcommands: backend choice, progress, tables, timing.

pub mod bench;
#[cfg(feature = "_cuda")]
pub mod bench_device;
pub mod bench_engine;
#[cfg(feature = "_cuda")]
pub mod cuda_check;
pub mod demo;
pub mod inspect;
pub mod run_case;

use std::time::{Duration, Instant};

use clap::Args;
use entropy_kernels::{BackendChoice, DType, HostTensor, Kernels, Result, synth};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The `--backend` flag every subcommand takes.
#[derive(Args, Debug)]
pub struct BackendArg {
    /// Backend: auto, cpu, reference, cuda or ascend (default: $ENTROPY_KERNELS_BACKEND or auto).
    #[arg(long = "backend")]
    pub name: Option<String>,
}

impl BackendArg {
    /// The backend named by the flag, else by `ENTROPY_KERNELS_BACKEND`, else auto.
    pub fn kernels(&self) -> Result<Kernels> {
        match &self.name {
            Some(name) => Kernels::select(name.parse::<BackendChoice>()?),
            None => Kernels::auto(),
        }
    }
}

/// `--model`'s value: a preset's attention shape (`shapes::ModelShape::by_name`).
pub fn parse_model(name: &str) -> std::result::Result<entropy_kernels::shapes::ModelShape, String> {
    entropy_kernels::shapes::ModelShape::by_name(name).map_err(|e| e.to_string())
}

/// A subcommand whose attention shape comes from `--q-heads/--kv-heads/--head-dim`, or from a
/// `--model` preset in their place.
pub trait AttentionShape {
    /// The flags' (q heads, kv heads, head dim).
    fn flags(&self) -> (usize, usize, usize);
    fn model(&self) -> Option<entropy_kernels::shapes::ModelShape>;
    fn q_heads(&self) -> usize {
        self.model().map_or(self.flags().0, |m| m.q_heads)
    }
    fn kv_heads(&self) -> usize {
        self.model().map_or(self.flags().1, |m| m.kv_heads)
    }
    fn head_dim(&self) -> usize {
        self.model().map_or(self.flags().2, |m| m.head_dim)
    }
}

/// Checks that a planted workload's q, k and v (f32 while generated, then `dtype`) can be held:
/// absurd flags are a one-line error, not an abort in the allocator.
pub fn check_workload(spec: &synth::PlantedSpec) -> Result<()> {
    let heads = spec.q_heads.checked_add(2 * spec.kv_heads);
    let n = heads
        .and_then(|h| h.checked_mul(spec.batch))
        .and_then(|x| x.checked_mul(spec.seq_len))
        .and_then(|x| x.checked_mul(spec.head_dim))
        .and_then(|x| x.checked_mul(2 * std::mem::size_of::<f32>()));
    let too_big = |detail: String| entropy_kernels::Error::Alloc { what: "the workload's q, k and v", detail };
    let bytes = n.ok_or_else(|| too_big("its size overflows".into()))?;
    let mut probe: Vec<u8> = Vec::new();
    probe.try_reserve_exact(bytes).map_err(|e| too_big(format!("{bytes} bytes: {e}")))?;
    Ok(())
}

/// BSND q, k, v of a planted workload in `dtype`.
pub fn planted(spec: &synth::PlantedSpec, dtype: DType) -> (HostTensor, HostTensor, HostTensor) {
    let p = synth::planted(spec);
    let q_shape = [spec.batch, spec.seq_len, spec.q_heads, spec.head_dim];
    let kv_shape = [spec.batch, spec.seq_len, spec.kv_heads, spec.head_dim];
    (
        HostTensor::from_f32(&p.q, q_shape, dtype),
        HostTensor::from_f32(&p.k, kv_shape, dtype),
        HostTensor::from_f32(&p.v, kv_shape, dtype),
    )
}

/// A progress bar that stays hidden unless the work runs for more than a second.
pub struct Progress {
    bar: ProgressBar,
    start: Instant,
    shown: bool,
}

impl Progress {
    pub fn new(label: &str, total: u64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        bar.set_style(
            ProgressStyle::with_template("{msg:>22} [{bar:30}] {pos}/{len} {elapsed_precise} (eta {eta})")
                .unwrap()
                .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        Progress { bar, start: Instant::now(), shown: false }
    }

    pub fn inc(&mut self) {
        self.bar.inc(1);
        if !self.shown && self.start.elapsed() > Duration::from_secs(1) {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.shown = true;
        }
    }

    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}

/// Runs `f` with a spinner that appears if it takes more than a second.
pub fn with_spinner<T>(label: &str, f: impl FnOnce() -> T) -> T {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed_precise}").unwrap());
    bar.set_message(label.to_string());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (b2, d2) = (bar.clone(), done.clone());
    let watcher = std::thread::spawn(move || {
        let t = Instant::now();
        while !d2.load(std::sync::atomic::Ordering::Relaxed) {
            if t.elapsed() > Duration::from_secs(1) {
                b2.set_draw_target(ProgressDrawTarget::stderr());
                b2.enable_steady_tick(Duration::from_millis(120));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let out = f();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.join().ok();
    bar.finish_and_clear();
    out
}

/// Seconds of one call.
pub fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed().as_secs_f64())
}

/// Median of a few timings (seconds).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// A table printed in Markdown, so it can be pasted into `benches/RESULTS.md`.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Table { headers: headers.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
    pub fn print(&self) {
        let n = self.headers.len();
        let width: Vec<usize> = (0..n)
            .map(|i| self.rows.iter().map(|r| r[i].chars().count()).chain([self.headers[i].len()]).max().unwrap())
            .collect();
        let line = |cells: &[String]| {
            let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:>w$}", w = width[i])).collect();
            println!("| {} |", parts.join(" | "));
        };
        line(&self.headers);
        println!("|{}|", width.iter().map(|w| format!("{}:", "-".repeat(w + 1))).collect::<Vec<_>>().join("|"));
        for r in &self.rows {
            line(r);
        }
    }
}

/// Formats seconds as milliseconds.
pub fn ms(s: f64) -> String {
    if s < 0.01 { format!("{:.3}", s * 1e3) } else { format!("{:.1}", s * 1e3) }
}

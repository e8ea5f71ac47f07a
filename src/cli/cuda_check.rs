//! `entropy-kernels cuda-info` and `cuda-smoke`: the first things a GPU run does. `cuda-info`
//! opens the CUDA backend as `auto` would (a failure is the failing driver call) and lists what
//! the driver reports for every kernel; `cuda-smoke` runs one small case per kernel against the
//! CPU backend (the cases compute-sanitizer checks in `scripts/gpu-check.sh`).

use clap::Args;
use entropy_kernels::cuda::{self, source};
use entropy_kernels::{Backend, Error, Result};

use super::Table;

#[derive(Args, Debug)]
pub struct CudaSmokeArgs {
    /// Only these cases (substrings of their names, comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

pub fn info() -> Result<()> {
    let be = cuda::open()?;
    println!("{}", be.describe());
    let limits = be.limits();
    println!("multiprocessors: {}", limits.sms);
    let mut t = Table::new(&["kernel", "max threads", "static smem", "max dynamic smem"]);
    for k in source::KERNELS {
        let l = limits.kernel(k);
        t.row(vec![
            k.to_string(),
            l.max_threads.to_string(),
            l.static_smem.to_string(),
            l.max_dynamic_smem.to_string(),
        ]);
    }
    t.print();
    Ok(())
}

pub fn smoke(a: &CudaSmokeArgs) -> Result<()> {
    let wanted = |name: &str| a.only.is_empty() || a.only.iter().any(|o| name.contains(o.as_str()));
    let cases = cuda::smoke::run(&|| cuda::open(), &wanted)?;
    let mut t = Table::new(&["case", "error", "tolerance", "result"]);
    let mut failed = 0;
    for c in &cases {
        let result = match &c.failure {
            Some(why) => format!("FAIL: {why}"),
            None if c.passed() => "ok".into(),
            None => "FAIL".into(),
        };
        failed += usize::from(!c.passed());
        t.row(vec![c.name.clone(), format!("{:.2e}", c.error), format!("{:.0e}", c.tolerance), result]);
    }
    t.print();
    if failed > 0 {
        return Err(Error::range("cuda-smoke", failed, "cases failed (see the table)"));
    }
    // On the emulated driver the launches are counted: the cases must reach every kernel.
    #[cfg(feature = "cuda-emu")]
    if a.only.is_empty() && std::env::var(cuda::EMU_ENV).is_ok_and(|v| v == "1") {
        let missed: Vec<&str> =
            source::KERNELS.iter().copied().filter(|k| cuda::emu::launches(Some(k)).unwrap_or(0) == 0).collect();
        if !missed.is_empty() {
            return Err(Error::range("cuda-smoke", missed.join(", "), "kernels no case launched"));
        }
        println!("every one of the {} kernels launched", source::KERNELS.len());
    }
    Ok(())
}

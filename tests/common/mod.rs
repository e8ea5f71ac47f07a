//! Helpers shared by the integration tests: backends under test, fixtures, random inputs,
//! tolerances and comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

use entropy_kernels::{BackendKind, DType, HostTensor, Kernels, Op, synth};

/// Backends compared with the oracle: every kind except the oracle itself. Absent ones are
/// reported with the reason and skipped, never silently passed.
pub fn backends_under_test(test: &str) -> Vec<Kernels> {
    let mut out = Vec::new();
    for kind in [BackendKind::Cpu, BackendKind::Cuda, BackendKind::Ascend, BackendKind::AscendEmu] {
        match open(test, kind) {
            Ok(k) => out.push(k),
            Err(e) => eprintln!("[{test}] SKIP backend {kind}: {e}"),
        }
    }
    assert!(!out.is_empty(), "the CPU backend must always be available");
    out
}

/// The backend `kind`. Without an NPU, a build with `ascend` + `ascend-emu` runs the Ascend
/// backend's whole ACL path (buffers, binary loading, argument packing, launches) over the mock
/// ACL library, whose launches execute on the emulator; it says so.
pub fn open(test: &str, kind: BackendKind) -> entropy_kernels::Result<Kernels> {
    let real = Kernels::new(kind);
    #[cfg(all(feature = "ascend", feature = "ascend-emu"))]
    if kind == BackendKind::Ascend {
        if let Err(e) = &real {
            use entropy_kernels::ascend::device::{AscendBackend, mock};
            eprintln!("[{test}] ascend: {e}; running the ACL path over the mock ACL library (emulated launches)");
            let dir = std::env::temp_dir().join(format!("ek-mock-kernels-{}", std::process::id()));
            let backend = AscendBackend::with_options(&mock::options(&dir)?)?;
            return Ok(Kernels::from_backend(std::sync::Arc::new(backend)));
        }
    }
    let _ = test;
    real
}

/// Whether `kernels` runs `op`; prints the skip when it does not.
pub fn runs(test: &str, kernels: &Kernels, op: Op) -> bool {
    let ok = kernels.capabilities().supports(op);
    if !ok {
        eprintln!("[{test}] SKIP {op:?} on {}: no kernel yet", kernels.kind());
    }
    ok
}

/// Where the conformance cases live: `$ENTROPY_KERNELS_CONFORMANCE`, else `../shared/conformance`.
pub fn conformance_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("ENTROPY_KERNELS_CONFORMANCE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance"));
    dir.is_dir().then_some(dir)
}

/// Every `.safetensors` case, sorted; prints a skip reason when the directory is missing.
pub fn conformance_cases(test: &str) -> Vec<PathBuf> {
    let Some(dir) = conformance_dir() else {
        eprintln!("[{test}] SKIP: no conformance directory (set ENTROPY_KERNELS_CONFORMANCE or check out ../shared)");
        return Vec::new();
    };
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("readable conformance dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "{} holds no cases", dir.display());
    cases
}

/// The conformance case `<name>.safetensors`, or `None` (with the printed skip) when absent.
pub fn conformance_case(test: &str, name: &str) -> Option<PathBuf> {
    conformance_cases(test).into_iter().find(|p| p.file_stem().is_some_and(|s| s == name))
}

/// Relative Frobenius error `‖a − b‖ / ‖b‖`.
pub fn rel_fro(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in length");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if !num.is_finite() {
        return f64::INFINITY;
    }
    (num / den.max(1e-300)).sqrt()
}

/// Tolerance of attention outputs, relative Frobenius, against the f64 oracle on the same
/// (already rounded) inputs: f32 accumulation noise, or the rounding of the output itself.
pub fn attn_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        // About four times the RMS relative rounding error of one element.
        DType::F16 => 4.0 * DType::F16.epsilon() / 3f64.sqrt() + 1e-4,
        DType::BF16 => 4.0 * DType::BF16.epsilon() / 3f64.sqrt() + 1e-4,
    }
}

pub fn tensor_f64(t: &HostTensor) -> Vec<f64> {
    t.to_f32_vec().iter().map(|&x| x as f64).collect()
}

/// A normal random tensor rounded to `dtype`, freshly drawn from `seed`.
pub fn random(shape: [usize; 4], std: f32, seed: u64, dtype: DType) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::from_f32(&synth::normal(n, std, seed), shape, dtype)
}

/// A NaN-filled output, so any element a kernel fails to write shows up.
pub fn poisoned(shape: [usize; 4], dtype: DType) -> HostTensor {
    HostTensor::full(dtype, shape, f32::NAN)
}

/// Seed of a test case: fresh per run unless `ENTROPY_KERNELS_SEED` pins it (printed, so a
/// failure can be replayed).
pub fn seed(test: &str) -> u64 {
    let s = match std::env::var("ENTROPY_KERNELS_SEED") {
        Ok(v) => v.parse().expect("ENTROPY_KERNELS_SEED must be an integer"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    };
    eprintln!("[{test}] seed {s} (replay with ENTROPY_KERNELS_SEED={s})");
    s
}

//! Helpers shared by the integration tests: backends under test, fixtures, random inputs,
//! tolerances and comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

use entropy_kernels::{BackendKind, CompressedCache, DType, HostTensor, Kernels, Op, synth};

pub mod check;
#[cfg(all(feature = "ascend", feature = "ascend-emu"))]
pub mod resident;
pub mod suite;

/// Backends compared with the oracle: every kind except the oracle itself. Absent ones are
/// reported with the reason and skipped, never silently passed.
pub fn backends_under_test(test: &str) -> Vec<Kernels> {
    let mut out = Vec::new();
    for kind in [BackendKind::Cpu, BackendKind::Cuda, BackendKind::Ascend, BackendKind::AscendEmu] {
        match open(test, kind) {
            Ok(k) => out.push(k),
            Err(e) => skip_notice(&format!("SKIP backend {kind}: {e}"), test),
        }
    }
    assert!(!out.is_empty(), "the CPU backend must always be available");
    out
}

/// The backend `kind`. Without an NPU, a build with `ascend` + `ascend-emu` runs the Ascend
/// backend's whole ACL path (buffers, binary loading, argument packing, launches) over the mock
/// ACL library, whose launches execute on the emulator; it says so.
pub fn open(test: &str, kind: BackendKind) -> entropy_kernels::Result<Kernels> {
    #[cfg(feature = "_cuda")]
    if kind == BackendKind::Cuda {
        return cuda_open(test).map(|b| Kernels::from_backend(std::sync::Arc::new(b)));
    }
    let real = Kernels::new(kind);
    #[cfg(all(feature = "ascend", feature = "ascend-emu"))]
    if kind == BackendKind::Ascend
        && let Err(e) = &real
    {
        eprintln!("[{test}] ascend: {e}; running the ACL path over the mock ACL library (emulated launches)");
        return Ok(Kernels::from_backend(std::sync::Arc::new(mock_ascend(test)?)));
    }
    let _ = test;
    real
}

/// The CPU backend pinned to `isa`, or why this CPU cannot run that path (no AMX, no AVX-512,
/// a kernel that refuses the AMX tile state...): every ISA path is tested where the CPU has it,
/// and a machine without it says so (it is hardware, not something CI installs).
pub fn cpu_isa(isa: entropy_kernels::cpu::Isa) -> Result<Kernels, String> {
    let backend = entropy_kernels::cpu::CpuBackend::with_isa(isa);
    if backend.isa() != isa {
        return Err(format!("SKIP: this CPU cannot run the {} path", isa.name()));
    }
    Ok(Kernels::from_backend(std::sync::Arc::new(backend)))
}

/// The Ascend backend over the mock ACL library (emulated launches).
#[cfg(all(feature = "ascend", feature = "ascend-emu"))]
pub fn mock_ascend(test: &str) -> entropy_kernels::Result<entropy_kernels::ascend::device::AscendBackend> {
    use entropy_kernels::ascend::device::{AscendBackend, mock};
    // One directory per (process, test): tests run in parallel threads.
    let tag: String = test.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let dir = std::env::temp_dir().join(format!("ek-mock-kernels-{}-{tag}", std::process::id()));
    let backend = AscendBackend::with_options(&mock::options(&dir)?);
    // The binaries are loaded by now: the directory is not needed any more.
    let _ = std::fs::remove_dir_all(&dir);
    backend
}

/// Whether the CUDA backend can load its kernels here: NVRTC on the library path, or an nvcc
/// fatbin embedded at build time. The emulated driver needs them too (it runs the host build of
/// the kernels, but the backend loads a module as on a GPU). Absent: prints why and skips, or
/// fails under CI. Every test that opens the emulated backend asks this first.
#[cfg(feature = "_cuda")]
pub fn cuda_kernels_available(test: &str) -> bool {
    if entropy_kernels::cuda::nvrtc_present() || entropy_kernels::cuda::source::FATBIN.is_some() {
        return true;
    }
    skip_or_fail(
        test,
        "the CUDA kernels cannot be loaded: NVRTC (libnvrtc) is not on the library path and no nvcc fatbin \
         was embedded at build time (scripts/test-env.sh installs CUDA 13.0 from PyPI and prints the \
         LD_LIBRARY_PATH to use)",
    );
    false
}

/// The CUDA backend `auto` would open, else (with `cuda-emu`) the one on the emulated driver.
#[cfg(feature = "_cuda")]
fn cuda_open(test: &str) -> entropy_kernels::Result<entropy_kernels::cuda::CudaBackend> {
    let real = entropy_kernels::cuda::open();
    #[cfg(feature = "cuda-emu")]
    let real = real.or_else(|e| {
        eprintln!("[{test}] cuda: {e}; running the CUDA backend on the emulated driver (kernels on the host)");
        if !cuda_kernels_available(test) {
            return Err(entropy_kernels::Error::BackendUnavailable {
                backend: "cuda-emu",
                reason: "NVRTC not found and no fatbin embedded".into(),
            });
        }
        entropy_kernels::cuda::emu::backend()
    });
    let _ = test;
    real
}

/// [`cuda_open`], or `None` with the reason printed.
#[cfg(feature = "_cuda")]
pub fn cuda_backend(test: &str) -> Option<entropy_kernels::cuda::CudaBackend> {
    cuda_open(test).map_err(|e| skip_notice(&format!("SKIP cuda: {e}"), test)).ok()
}

/// [`open`] for the CUDA backend with its prefill tile forced to `tile` (the matrix runs both).
#[cfg(feature = "_cuda")]
pub fn open_cuda_tiled(test: &str, tile: entropy_kernels::cuda::PrefillTile) -> entropy_kernels::Result<Kernels> {
    let mut b = cuda_open(test)?;
    b.set_prefill_tile(tile);
    Ok(Kernels::from_backend(std::sync::Arc::new(b)))
}

/// Whether `kernels` runs `op`; prints the skip when it does not.
pub fn runs(test: &str, kernels: &Kernels, op: Op) -> bool {
    let ok = kernels.capabilities().supports(op);
    if !ok {
        eprintln!("[{test}] SKIP {op:?} on {}: no kernel yet", kernels.kind());
    }
    ok
}

/// Whether `kernels` runs `op` on `dtype` inputs; prints the skip when it does not.
pub fn runs_on(test: &str, kernels: &Kernels, op: Op, dtype: DType) -> bool {
    if !runs(test, kernels, op) {
        return false;
    }
    let ok = kernels.capabilities().supports_op_dtype(op, dtype);
    if !ok {
        eprintln!("[{test}] SKIP {op:?} on {} for {dtype}: the backend has no kernel for this dtype", kernels.kind());
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

/// Whether this is a CI run (`CI=true`, as CI services set it): then whatever a test needs must
/// be there — a missing conformance case, NVRTC or model fails instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// Skips (printing why), or fails under CI ([`in_ci`]), when something a test needs is absent.
pub fn skip_or_fail(test: &str, why: &str) {
    if in_ci() {
        panic!("[{test}] {why} — CI=true, so this is a failure, not a skip");
    }
    skip_notice(&format!("SKIP: {why}"), test);
}

/// Prints a skip where the run's output shows it even when the test passes (straight to the
/// process's stderr: the test harness captures only `eprintln!`), once per message and process,
/// and in the test's own captured output.
pub fn skip_notice(msg: &str, test: &str) {
    use std::io::Write;
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    eprintln!("[{test}] {msg}");
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.iter().any(|m| m == msg) {
        seen.push(msg.to_string());
        let _ = writeln!(std::io::stderr(), "    {msg} (first in {test})");
    }
}

/// Every `.safetensors` case, sorted; without the directory, a printed skip (a failure under CI).
pub fn conformance_cases(test: &str) -> Vec<PathBuf> {
    let Some(dir) = conformance_dir() else {
        skip_or_fail(test, "no conformance directory (set ENTROPY_KERNELS_CONFORMANCE or check out ../shared)");
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

/// The conformance case `<name>.safetensors`, or `None` with a printed skip (a failure under CI)
/// when it or the directory is absent.
pub fn conformance_case(test: &str, name: &str) -> Option<PathBuf> {
    let dir_present = conformance_dir().is_some();
    let found = conformance_cases(test).into_iter().find(|p| p.file_stem().is_some_and(|s| s == name));
    if found.is_none() && dir_present {
        skip_or_fail(test, &format!("conformance case {name} is not in the conformance directory"));
    }
    found
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

/// BSND q `[b, l, hq, d]`, k and v `[b, l, hkv, d]`, standard normal, drawn from `seed`.
pub fn random_qkv([b, l, hq, hkv, d]: [usize; 5], seed: u64, dtype: DType) -> (HostTensor, HostTensor, HostTensor) {
    (
        random([b, l, hq, d], 1.0, seed, dtype),
        random([b, l, hkv, d], 1.0, seed ^ 1, dtype),
        random([b, l, hkv, d], 1.0, seed ^ 2, dtype),
    )
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
/// failure can be replayed; a panic on this thread repeats it, see [`remember_seed`]).
pub fn seed(test: &str) -> u64 {
    let s = match std::env::var("ENTROPY_KERNELS_SEED") {
        Ok(v) => v.parse().expect("ENTROPY_KERNELS_SEED must be an integer"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    };
    eprintln!("[{test}] seed {s} (replay with ENTROPY_KERNELS_SEED={s})");
    remember_seed(test, s);
    s
}

/// Seeds of a randomised case: one (as [`seed`]), or `ENTROPY_KERNELS_SOAK=N` of them — the soak
/// mode, which runs each case on N fresh seeds to find tolerance and decision edges
/// (`scripts/soak.sh`). With `ENTROPY_KERNELS_SEED` the first is pinned, the rest follow from it.
pub fn seeds(test: &str) -> Vec<u64> {
    let first = seed(test);
    let n: usize = match std::env::var("ENTROPY_KERNELS_SOAK") {
        Ok(v) => v.parse().expect("ENTROPY_KERNELS_SOAK must be a count"),
        Err(_) => 1,
    };
    let mut rng = synth::Rng::new(first);
    std::iter::once(first).chain((1..n).map(|_| rng.next_u64())).collect()
}

thread_local! {
    static SEEDS: std::cell::RefCell<Vec<(String, u64)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Records that `test` drew `seed` on this thread: if the thread panics, the panic hook prints
/// every seed it drew right under the panic message, so a failure carries its seed whichever
/// assertion fails (an `unwrap` included).
pub fn remember_seed(test: &str, seed: u64) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            SEEDS.with(|s| {
                for (test, seed) in s.borrow().iter() {
                    eprintln!(
                        "  ... while running [{test}] with seed {seed} (replay with ENTROPY_KERNELS_SEED={seed})"
                    );
                }
            });
        }));
    });
    SEEDS.with(|s| s.borrow_mut().push((test.to_string(), seed)));
}

/// Runs one case of a randomised test; a panic inside is raised again as `[tag] message`, so the
/// failure message itself names the case and its seed (put both in `tag`).
pub fn with_case<T>(tag: &str, f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(non-text panic)".into());
            panic!("[{tag}] {msg}");
        }
    }
}

/// Compression results agree with the oracle, allowing only near-ties at the selection boundary
/// (f32 scoring against f64); the gathered entries must match the reported indices exactly.
#[allow(clippy::needless_range_loop)]
pub fn check_compressed(
    tag: &str,
    got: &CompressedCache,
    want: &CompressedCache,
    scores: &[Vec<Vec<f64>>],
    (k_cache, v_cache): (&HostTensor, &HostTensor),
    shared_budget: bool,
) {
    assert_eq!(got.heads(), want.heads(), "{tag}: heads");
    assert_eq!(got.window, want.window, "{tag}: window");
    let [kb, _, _, kd] = k_cache.shape;
    assert_eq!((got.batch(), got.head_dim()), (kb, kd), "{tag}: batch and head dim");
    assert_eq!(got.capacity(), got.k.shape[2], "{tag}: capacity");
    assert_eq!(got.index_width(), got.capacity() - got.window, "{tag}: index width");
    assert_eq!(got.indices.len(), kb * got.heads() * got.index_width(), "{tag}: indices");
    let bytes = got.lengths.iter().map(|&l| l as usize).sum::<usize>() * 2 * kd * got.k.dtype().size();
    assert_eq!(got.kept_bytes(), bytes, "{tag}: kept bytes");
    assert_eq!(got.lengths.iter().sum::<u32>(), want.lengths.iter().sum::<u32>(), "{tag}: total length");
    if got.indices != want.indices {
        // Where the selections differ, the positions one kept and the other did not must pair up
        // with (nearly) equal oracle scores: a near-tie at a cut-off decided the other way by f32
        // scoring. Pairs form within a head, or within a batch row when heads share the budget
        // (AdaKV: its per-head floors and its shared pool have cut-offs at different scores, so a
        // flip is judged against its partner, not against one boundary of the row).
        let w = want.index_width();
        let gw = got.index_width();
        for (b, rows) in scores.iter().enumerate() {
            let kept = |c: &CompressedCache, width: usize, hc: usize| -> Vec<i64> {
                let u = b * c.heads() + hc;
                c.indices[u * width..(u + 1) * width].iter().copied().filter(|&p| p >= 0).collect()
            };
            let top = rows.iter().flatten().fold(0f64, |m, x| m.max(x.abs())).max(1e-300);
            let groups: Vec<Vec<usize>> = if shared_budget {
                vec![(0..rows.len()).collect()]
            } else {
                (0..rows.len()).map(|h| vec![h]).collect()
            };
            for heads in groups {
                let (mut added, mut dropped) = (Vec::new(), Vec::new());
                for &hc in &heads {
                    let (a, bb) = (kept(got, gw, hc), kept(want, w, hc));
                    added.extend(a.iter().filter(|p| !bb.contains(p)).map(|&p| (rows[hc][p as usize], hc, p)));
                    dropped.extend(bb.iter().filter(|p| !a.contains(p)).map(|&p| (rows[hc][p as usize], hc, p)));
                }
                assert_eq!(
                    added.len(),
                    dropped.len(),
                    "{tag}: batch {b} heads {heads:?} keep {} positions the oracle did not and drop {}",
                    added.len(),
                    dropped.len()
                );
                added.sort_by(|x, y| x.0.total_cmp(&y.0));
                dropped.sort_by(|x, y| x.0.total_cmp(&y.0));
                for (x, y) in added.iter().zip(&dropped) {
                    assert!(
                        (x.0 - y.0).abs() <= 1e-6 * top,
                        "{tag}: batch {b}: kept head {} position {} (score {:e}) instead of head {} position {} (score {:e})",
                        x.1,
                        x.2,
                        x.0,
                        y.1,
                        y.2,
                        y.0
                    );
                }
            }
        }
        eprintln!("[{tag}] selection differs from the oracle only at near-ties");
    }
    // The gather: every kept slot of K and of V holds the cache entry its index names, then the
    // window.
    let [bsz, hkv, n, d] = k_cache.shape;
    assert_eq!(v_cache.shape, k_cache.shape, "{tag}: cache shapes");
    let cap = got.capacity();
    let per_kv = got.heads() / hkv;
    let caches = [("K", k_cache.to_f32_vec(), got.k.to_f32_vec()), ("V", v_cache.to_f32_vec(), got.v.to_f32_vec())];
    for b in 0..bsz {
        for hc in 0..got.heads() {
            let u = b * got.heads() + hc;
            let len = got.lengths[u] as usize;
            let idx: Vec<usize> = got.indices[u * got.index_width()..(u + 1) * got.index_width()]
                .iter()
                .filter(|&&p| p >= 0)
                .map(|&p| p as usize)
                .collect();
            assert!(idx.windows(2).all(|w| w[0] < w[1]), "{tag}: indices ascending");
            let src: Vec<usize> = idx.iter().copied().chain(n - got.window..n).collect();
            assert_eq!(src.len(), len, "{tag}: length of head {u}");
            for (which, cache, out) in &caches {
                for (slot, &p) in src.iter().enumerate() {
                    let a = &out[(u * cap + slot) * d..(u * cap + slot + 1) * d];
                    let row = (b * hkv + hc / per_kv) * n + p;
                    assert_eq!(a, &cache[row * d..(row + 1) * d], "{tag}: {which} slot {slot} of head {u}");
                }
            }
        }
    }
}

/// A committed generated file checked against what generating it gives now: stale fails with
/// the command that rewrites it; `ENTROPY_KERNELS_BLESS=1` writes `fresh` instead of checking.
pub fn check_generated(relative: &str, fresh: &str, bless_command: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    if std::env::var_os("ENTROPY_KERNELS_BLESS").is_some() {
        std::fs::write(&path, fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(committed == fresh, "{relative} is stale: run `ENTROPY_KERNELS_BLESS=1 {bless_command}` and commit it");
}

/// A view's elements as a contiguous tensor of its shape and dtype (values unchanged).
pub fn contiguous(v: &entropy_kernels::TensorView<'_>) -> HostTensor {
    let f = entropy_kernels::reference::F64Tensor::of(v);
    HostTensor::from_f32(&f.data.iter().map(|&x| x as f32).collect::<Vec<_>>(), f.shape, v.dtype())
}

/// The tensor's elements as `T` (its own dtype).
pub fn typed<T: bytemuck::Pod>(t: &HostTensor) -> Vec<T> {
    match &t.data {
        entropy_kernels::HostBuffer::F32(x) => bytemuck::cast_slice(x).to_vec(),
        entropy_kernels::HostBuffer::F16(x) => bytemuck::cast_slice(x).to_vec(),
        entropy_kernels::HostBuffer::BF16(x) => bytemuck::cast_slice(x).to_vec(),
    }
}

/// Device elements back to f32.
pub fn typed_back<T: bytemuck::Pod>(v: &[T], dtype: DType) -> Vec<f32> {
    let bytes: &[u8] = bytemuck::cast_slice(v);
    match dtype {
        DType::F32 => bytemuck::cast_slice::<u8, f32>(bytes).to_vec(),
        DType::F16 => bytemuck::cast_slice::<u8, half::f16>(bytes).iter().map(|x| x.to_f32()).collect(),
        DType::BF16 => bytemuck::cast_slice::<u8, half::bf16>(bytes).iter().map(|x| x.to_f32()).collect(),
    }
}

/// A contiguous cache `[B, H, N, D]` as THD rows `[1, B·N, H, D]` (sequence by sequence, entry by
/// entry): what `append` takes to fill a paged cache with the same entries.
pub fn cache_as_thd(t: &HostTensor) -> HostTensor {
    let [b, h, n, d] = t.shape;
    let f = t.to_f32_vec();
    let rows: Vec<f32> = (0..b)
        .flat_map(|i| {
            (0..n).flat_map(move |j| (0..h).flat_map(move |hh| (0..d).map(move |x| ((i * h + hh) * n + j) * d + x)))
        })
        .map(|i| f[i])
        .collect();
    HostTensor::from_f32(&rows, [1, b * n, h, d], t.dtype())
}

/// A contiguous cache `[B, H, N, D]` (K and V) appended to the first `B` of `seqs` sequences
/// whose slot-major pages of `page` entries interleave (sequences past `B` stay empty): the paged
/// twin of a contiguous call, for comparing what the two read.
pub fn interleaved_copy(kc: &HostTensor, vc: &HostTensor, seqs: usize, page: usize) -> entropy_kernels::PagedCache {
    use entropy_kernels::{PageLayout, PagedCache, Workspace};
    let [b, h, n, d] = kc.shape;
    let width = n.div_ceil(page);
    let layout = PageLayout::slot_major(seqs * width, page, h, d);
    let mut pool = PagedCache::interleaved(kc.dtype(), layout, seqs, width).unwrap();
    let cu: Vec<u32> = (0..=seqs).map(|i| (i.min(b) * n) as u32).collect();
    let (k, v) = (cache_as_thd(kc), cache_as_thd(vc));
    Kernels::cpu().append(k.view(), v.view(), &cu, &mut pool.cache_mut(), &mut Workspace::new()).unwrap();
    pool
}

/// Entries a compaction by `sel` moves (kept positions not already in place), over `seqs`
/// sequences of `heads` heads.
pub fn moved_entries(sel: &entropy_kernels::Selection, seqs: usize, heads: usize) -> usize {
    (0..seqs)
        .flat_map(|i| (0..heads).map(move |h| (i, h)))
        .map(|(i, h)| sel.kept(i, h).iter().enumerate().filter(|&(j, &p)| p as usize != j).count())
        .sum()
}

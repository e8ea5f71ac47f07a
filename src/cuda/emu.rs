//! The CUDA backend on an emulated driver (feature `cuda-emu`; tests and CI, where no GPU is).
//!
//! `cuda/host/driver_emu.cpp` is a test double of `libcuda.so`: the driver calls cudarc makes
//! (context, streams, memory, modules, launches) over host memory, and the kernels of `cuda/`
//! compiled for the host, unchanged, against `cuda/host/grid_shim.h` — blocks one after another,
//! threads as fibers switched at `__syncthreads` and warp collectives, `mma.sync` with the PTX
//! fragment layouts. So [`backend`] is the real [`CudaBackend`] — its launch configurations,
//! argument packing, buffer sizes and host logic — over kernels that run on the CPU.
//!
//! It reports what the hardware would reject or hang on: divergent barriers, partial or divergent
//! warp collectives, writes past an allocation (guard bytes), copies outside an allocation,
//! writes past a block's dynamic shared memory; and what the driver would refuse, from the
//! kernels as NVRTC compiled them (`cuda/host/kernel_attrs.h`): images without code for the
//! device, blocks beyond a kernel's launch bound, shared memory beyond the function's or the
//! device's limit, registers beyond the SM's. Four devices ([`DEVICES`]: sm_90, sm_80, sm_86,
//! sm_89) have their own limits. Stream order is tracked: an operation touching memory that an
//! operation of another stream used, with no event or synchronisation between them, fails.
//! Stream capture is emulated: launches on a capturing stream are recorded and replayed by
//! `cuGraphLaunch`; what a capture refuses (calls that are not stream-ordered during a global
//! capture, waits on events recorded outside it, capture of the legacy stream) fails as the
//! driver documents, and other stream work inside a capture is not emulated (it fails too).
//! Shared-memory races show up as results that change with the thread schedule
//! ([`set_schedule`]); it says nothing about speed (work is counted: [`counters`]).
//!
//! Loading: the library's SONAME is `libcuda.so`, the first name cudarc tries; once loaded by
//! path, the dynamic loader hands it to cudarc's `dlopen("libcuda.so")`. A process that already
//! loaded a real driver keeps it: [`backend`] then refuses.

use std::sync::OnceLock;

use super::CudaBackend;
use crate::error::{Error, Result};

/// Where build.rs put the emulated driver.
const LIBRARY: &str = env!("EK_CUDA_EMU_PATH");
/// glibc's `RTLD_NOLOAD`: open only what is already loaded.
const RTLD_NOLOAD: i32 = 4;

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable { backend: "cuda-emu", reason: reason.into() }
}

/// The emulated driver, loaded once per process.
fn library() -> Result<&'static libloading::Library> {
    static LIB: OnceLock<std::result::Result<libloading::Library, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        use libloading::os::unix::{Library, RTLD_LAZY};
        // SAFETY: RTLD_NOLOAD loads nothing; it only finds a library this process already has.
        if let Ok(loaded) = unsafe { Library::open(Some("libcuda.so"), RTLD_LAZY | RTLD_NOLOAD) } {
            // SAFETY: looking a symbol up runs no code.
            if unsafe { loaded.get::<Launches>(b"ek_cuda_emu_launches") }.is_err() {
                return Err(
                    "a real CUDA driver is loaded in this process; the emulated one needs a process without".into()
                );
            }
        }
        // SAFETY: our own test library; its initialisers only set up static tables.
        unsafe { libloading::Library::new(LIBRARY) }.map_err(|e| format!("loading {LIBRARY}: {e}"))
    })
    .as_ref()
    .map_err(|e| unavailable(e.clone()))
}

/// An exported function of the emulated driver, typed as `F` (its prototype in
/// cuda/host/driver_emu.cpp).
fn symbol<F: Copy>(name: &[u8]) -> Result<F> {
    let lib = library()?;
    // SAFETY: every caller names `F` after the C prototype of `name`.
    unsafe { lib.get::<F>(name) }.map(|f| *f).map_err(|e| unavailable(e.to_string()))
}

/// The CUDA backend on the emulated device 0 (compute capability 9.0, H100-like limits).
pub fn backend() -> Result<CudaBackend> {
    backend_on(0)
}

/// The emulated devices, by ordinal: compute capabilities 9.0 (H100: 227 KiB of shared memory per
/// block, 132 SMs), 8.0 (A100: 163 KiB, 108 SMs), 8.6 and 8.9 (99 KiB).
pub const DEVICES: [(u32, &str); 4] = [(90, "sm_90"), (80, "sm_80"), (86, "sm_86"), (89, "sm_89")];

/// The CUDA backend on emulated device `ordinal` (see [`DEVICES`]).
pub fn backend_on(ordinal: usize) -> Result<CudaBackend> {
    library()?;
    CudaBackend::new(ordinal)
}

/// The next `call` (a driver function's name; today `cuModuleLoadData`) this thread makes fails:
/// a device that is present but broken.
pub fn fail_next(call: &str) -> Result<()> {
    let f = symbol::<unsafe extern "C" fn(*const std::ffi::c_char)>(b"ek_cuda_emu_fail_next")?;
    let c = std::ffi::CString::new(call).map_err(|e| unavailable(e.to_string()))?;
    // SAFETY: a NUL-terminated string the driver copies.
    unsafe { f(c.as_ptr()) };
    Ok(())
}

/// Whether emulated device `ordinal` loads module `image` (cubin, fatbin or NUL-terminated PTX),
/// as `cuModuleLoadData` would: `Err((CUresult, reason))` where the driver refuses it.
pub fn load_image(ordinal: usize, image: &[u8]) -> Result<std::result::Result<(), (i32, String)>> {
    type Load = unsafe extern "C" fn(i32, *const u8, *mut u8, i32) -> i32;
    let f = symbol::<Load>(b"ek_cuda_emu_load_image")?;
    let mut msg = vec![0u8; 512];
    // SAFETY: the image outlives the call; `msg` holds its stated length.
    let r = unsafe { f(ordinal as i32, image.as_ptr(), msg.as_mut_ptr(), msg.len() as i32) };
    let text = String::from_utf8_lossy(&msg[..msg.iter().position(|&b| b == 0).unwrap_or(msg.len())]).into_owned();
    Ok(if r == 0 { Ok(()) } else { Err((r, text)) })
}

/// `ek_cuda_emu_launches(name)`: launches of kernel `name` (all kernels for null; -1: unknown).
type Launches = unsafe extern "C" fn(*const std::ffi::c_char) -> i64;

/// Kernel launches the emulated driver has run in this process: of kernel `name` (an entry of
/// [`super::source::KERNELS`]), or of every kernel for `None`.
pub fn launches(name: Option<&str>) -> Result<u64> {
    let f = symbol::<Launches>(b"ek_cuda_emu_launches")?;
    let name = name.map(std::ffi::CString::new).transpose().map_err(|e| unavailable(e.to_string()))?;
    // SAFETY: a NUL-terminated name or null; the driver only reads it.
    let n = unsafe { f(name.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())) };
    u64::try_from(n).map_err(|_| {
        Error::range(
            "kernel",
            name.map(|c| c.into_string().unwrap_or_default()).unwrap_or_default(),
            "a kernel of cuda::source::KERNELS",
        )
    })
}

/// When the emulated `cp.async` copies land: at issue (`true`) or when a wait retires them
/// (`false`, the default) — the two extremes the hardware allows. Process-wide.
pub fn set_cp_async_early(early: bool) -> Result<()> {
    let f = symbol::<unsafe extern "C" fn(i32)>(b"ek_cuda_emu_cp_async_early")?;
    // SAFETY: sets a flag.
    unsafe { f(i32::from(early)) };
    Ok(())
}

/// The order the emulator resumes a block's threads in: round robin by index (0, the default) or
/// reversed (1); greedily — the first runnable thread, so it runs as far ahead as barriers allow —
/// by index (2), reversed (3) or over a shuffle seeded by n ≥ 4 and the block. A race-free kernel
/// gives the same bits under every order; tests compare them. Process-wide.
pub fn set_schedule(order: u32) -> Result<()> {
    let f = symbol::<unsafe extern "C" fn(u32)>(b"ek_cuda_emu_schedule")?;
    // SAFETY: sets a value.
    unsafe { f(order) };
    Ok(())
}

/// The multiprocessor count backends opened from now on see (0: the default, 132). Launch shapes
/// that depend on it — the prefill tile height, the decode splits, the planning logits' tile —
/// change; results must not. Process-wide.
pub fn set_multiprocessors(n: u32) -> Result<()> {
    let f = symbol::<unsafe extern "C" fn(i32)>(b"ek_cuda_emu_set_multiprocessors")?;
    // SAFETY: sets a value.
    unsafe { f(n as i32) };
    Ok(())
}

/// Work the emulated kernels have done in this process (warp-wide instructions counted once per
/// warp). Differences between two readings measure the launches in between.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// `mma.sync.m16n8k16` instructions: 16·8·16 = 2048 multiply-adds each.
    pub mma: u64,
    /// `ldmatrix.x4` instructions (four 8×8 tiles of 16-bit values each).
    pub ldmatrix: u64,
    /// Bytes copied global → shared by `cp.async`.
    pub cp_async_bytes: u64,
    /// Block barriers passed (`__syncthreads`, once per block).
    pub barriers: u64,
    /// Bytes loaded from global memory through `ld_global_16` / `ld_global_elem` (cuda/common.cuh):
    /// the decode's and the paged attention's cache reads, the compression's key reads and the
    /// in-place compaction's moves.
    pub ld_global_bytes: u64,
    /// Device allocations (`cuMemAlloc`, `cuMemAllocAsync`): what a captured CUDA graph cannot
    /// repeat.
    pub allocations: u64,
    /// Host-to-device copies (`cuMemcpyHtoD`, async or not).
    pub htod_copies: u64,
}

impl Counters {
    /// Tensor-core multiply-adds.
    pub fn mma_macs(&self) -> u64 {
        self.mma * 16 * 8 * 16
    }
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            mma: self.mma - o.mma,
            ldmatrix: self.ldmatrix - o.ldmatrix,
            cp_async_bytes: self.cp_async_bytes - o.cp_async_bytes,
            barriers: self.barriers - o.barriers,
            ld_global_bytes: self.ld_global_bytes - o.ld_global_bytes,
            allocations: self.allocations - o.allocations,
            htod_copies: self.htod_copies - o.htod_copies,
        }
    }
}

/// The emulator's work counters (process-wide: concurrent launches count too).
pub fn counters() -> Result<Counters> {
    let f = symbol::<unsafe extern "C" fn(*mut u64)>(b"ek_cuda_emu_counters")?;
    let mut c = [0u64; 7];
    // SAFETY: it writes seven u64.
    unsafe { f(c.as_mut_ptr()) };
    Ok(Counters {
        mma: c[0],
        ldmatrix: c[1],
        cp_async_bytes: c[2],
        barriers: c[3],
        ld_global_bytes: c[4],
        allocations: c[5],
        htod_copies: c[6],
    })
}

/// Threads (and floats written) of a self-test launch.
pub const SELFTEST_THREADS: usize = 64;

/// Runs the emulator's planted-violation kernel `code` (0: none; 1 divergent `__syncthreads`;
/// 2 partial-mask shuffle; 3 lanes at different collectives; 4 a lane exits before a shuffle;
/// 5 a write past the allocation; 6 too much dynamic shared memory; 7 a write past the dynamic
/// shared memory; 8 a read past the allocation, which faults: run in a child process; 9 a block
/// beyond the kernel's launch bound; 10 `cuFuncSetAttribute` above the opt-in size less the static
/// size; 11 registers beyond the SM's file; 12 a copy on another stream reading what a kernel
/// wrote, with nothing ordering them; 13 the same ordered by an event: no violation) through the
/// driver's launch path.
/// `Ok` with the block's outputs, or `Err((CUresult, message))`.
pub fn selftest(code: i32) -> Result<std::result::Result<Vec<f32>, (i32, String)>> {
    let f = symbol::<unsafe extern "C" fn(i32, *mut f32, *mut u8, i32) -> i32>(b"ek_cuda_emu_selftest")?;
    let mut out = vec![f32::NAN; SELFTEST_THREADS];
    let mut msg = vec![0u8; 512];
    // SAFETY: `out` holds the SELFTEST_THREADS floats written, `msg` its stated length.
    let r = unsafe { f(code, out.as_mut_ptr(), msg.as_mut_ptr(), msg.len() as i32) };
    let text = String::from_utf8_lossy(&msg[..msg.iter().position(|&b| b == 0).unwrap_or(msg.len())]).into_owned();
    Ok(if r == 0 { Ok(out) } else { Err((r, text)) })
}

//! The Ascend C kernels on the host emulator (feature `ascend-emu`): the same kernel sources the
//! NPU build compiles, run core by core on the CPU against `ascend/emu/include/kernel_operator.h`,
//! a clean-room emulation of the Ascend C API that fails on what the hardware would reject.
//!
//! Params structs travel as on the device: the kernel receives the address of the struct (the
//! tiling-data pattern), and the tensors' addresses inside it are host addresses.

use std::ffi::{CStr, CString, c_char};

use super::launch::{Kernel, Launcher, raw_parts};
use super::{TopK, ops};
use crate::backend::{Backend, BackendKind, Capabilities};
use crate::compress::CompressedCache;
use crate::error::{Error, Result};
use crate::ffi::EkTensor;
use crate::plan::Plan;
use crate::tensor::{TensorView, TensorViewMut};
use crate::validate::{AttentionArgs, CompressArgs, DecodeArgs, PlanArgs};

unsafe extern "C" {
    fn ek_emu_run(
        kernel: *const c_char,
        args: *const u64,
        nargs: usize,
        block_dim: u32,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn ek_emu_hardware_sync_addr() -> u64;
    fn ek_emu_counters(out: *mut u64, n: usize, reset: i32);
}

/// What the emulated launches since the last [`take_counters`] would cost on the hardware, summed
/// over every core (process-wide: take them around the calls you measure, one thread at a time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes read from global memory (copies into UB/L1, scalar reads excluded).
    pub gm_read_bytes: u64,
    /// Bytes written to global memory.
    pub gm_write_bytes: u64,
    /// Cube multiply-accumulates, over whole 16×16 fractals (padding included).
    pub cube_macs: u64,
    /// Vector repeats: 256-byte steps, about one cycle each on an AIV.
    pub vector_repeats: u64,
    /// Vector instructions issued.
    pub vector_instrs: u64,
    /// Scalar accesses to global memory.
    pub scalar_gm: u64,
}

fn read_counters(reset: bool) -> Counters {
    let mut c = [0u64; 6];
    // SAFETY: writes at most 6 values into `c`.
    unsafe { ek_emu_counters(c.as_mut_ptr(), c.len(), reset as i32) };
    Counters {
        gm_read_bytes: c[0],
        gm_write_bytes: c[1],
        cube_macs: c[2],
        vector_repeats: c[3],
        vector_instrs: c[4],
        scalar_gm: c[5],
    }
}

/// Saturating: another thread may reset the counters between two readings.
impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            gm_read_bytes: self.gm_read_bytes.saturating_sub(o.gm_read_bytes),
            gm_write_bytes: self.gm_write_bytes.saturating_sub(o.gm_write_bytes),
            cube_macs: self.cube_macs.saturating_sub(o.cube_macs),
            vector_repeats: self.vector_repeats.saturating_sub(o.vector_repeats),
            vector_instrs: self.vector_instrs.saturating_sub(o.vector_instrs),
            scalar_gm: self.scalar_gm.saturating_sub(o.scalar_gm),
        }
    }
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        self.gm_read_bytes += o.gm_read_bytes;
        self.gm_write_bytes += o.gm_write_bytes;
        self.cube_macs += o.cube_macs;
        self.vector_repeats += o.vector_repeats;
        self.vector_instrs += o.vector_instrs;
        self.scalar_gm += o.scalar_gm;
    }
}

/// Work of each kernel entry since the last [`take_counters`], in launch order.
static PER_KERNEL: std::sync::Mutex<Vec<(&'static str, Counters)>> = std::sync::Mutex::new(Vec::new());

/// Reads and resets the emulator's work counters.
pub fn take_counters() -> Counters {
    PER_KERNEL.lock().unwrap_or_else(|e| e.into_inner()).clear();
    read_counters(true)
}

/// The work since the last [`take_counters`] per kernel entry (summed over its launches, in order
/// of first launch), without resetting anything.
pub fn kernel_counters() -> Vec<(&'static str, Counters)> {
    PER_KERNEL.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Emulated AI cores per launch: enough to exercise the kernels' work split.
pub const EMULATED_CORES: u32 = 4;

/// The emulated device's hardware synchronisation address (what `aclrtGetHardwareSyncAddr`
/// answers): mixed kernels take it as their first argument.
pub fn hardware_sync_addr() -> u64 {
    // SAFETY: no arguments; returns the address of the emulator's static sync block.
    unsafe { ek_emu_hardware_sync_addr() }
}

/// Runs the emulated vector kernel `name` with `params` (any `#[repr(C)]` struct or buffer) on
/// `cores`.
///
/// # Safety
/// Every address inside `params` must be valid for the accesses the kernel makes.
pub unsafe fn run(name: &'static str, params: *const u8, cores: u32) -> Result<()> {
    unsafe { run_entry(name, name, &[params as u64], cores) }
}

/// Runs the emulated mixed (AIC + 2 AIV) kernel `name` — entry `<name>_mix_aic`, the hardware
/// sync address and `params` as its arguments — on `cores` AI cores.
///
/// # Safety
/// As [`run`].
pub unsafe fn run_mix(name: &'static str, params: *const u8, cores: u32) -> Result<()> {
    let entry = format!("{name}{}", super::launch::MIX_ENTRY_SUFFIX);
    unsafe { run_entry(name, &entry, &[hardware_sync_addr(), params as u64], cores) }
}

/// Runs the emulated entry `entry` with the argument block `args` on `cores`, its work counted
/// under `name`.
///
/// # Safety
/// Every address in `args` must be valid for the accesses the kernel makes.
pub unsafe fn run_entry(name: &'static str, entry: &str, args: &[u64], cores: u32) -> Result<()> {
    let cname = CString::new(entry).expect("kernel names have no NUL");
    let mut err = vec![0 as c_char; 1024];
    let before = read_counters(false);
    // SAFETY: the emulator reads `args` as the kernel's arguments and writes at most `err.len()`.
    let rc = unsafe { ek_emu_run(cname.as_ptr(), args.as_ptr(), args.len(), cores, err.as_mut_ptr(), err.len()) };
    if rc == 0 {
        let spent = read_counters(false) - before;
        let mut per = PER_KERNEL.lock().unwrap_or_else(|e| e.into_inner());
        match per.iter_mut().find(|(k, _)| *k == name) {
            Some((_, c)) => *c += spent,
            None => per.push((name, spent)),
        }
        return Ok(());
    }
    let detail = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
    Err(Error::Emulator { kernel: name, detail })
}

/// Host memory standing in for global memory. Buffers are `u64`-backed so every element type is
/// aligned; outputs are staged and copied back only when every launch succeeded.
#[derive(Default)]
pub struct EmuLauncher<'v> {
    buffers: Vec<Vec<u64>>,
    outputs: Vec<(usize, &'v mut [u8])>,
}

impl EmuLauncher<'_> {
    fn alloc(&mut self, bytes: &[u8]) -> (usize, u64) {
        let mut buf = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..bytes.len()].copy_from_slice(bytes);
        let addr = buf.as_ptr() as u64;
        self.buffers.push(buf);
        (self.buffers.len() - 1, addr)
    }
}

impl<'v> Launcher<'v> for EmuLauncher<'v> {
    fn input(&mut self, v: &TensorView<'_>) -> Result<EkTensor> {
        // Inputs are read in place: the kernels never write them.
        Ok(EkTensor::new(v.data().as_bytes().as_ptr() as u64, v.shape(), v.strides()))
    }
    fn output(&mut self, v: &'v mut TensorViewMut<'_>) -> Result<EkTensor> {
        let (shape, strides) = (v.shape(), v.strides());
        let host = v.data_mut().as_bytes_mut();
        let (i, addr) = self.alloc(host);
        self.outputs.push((i, host));
        Ok(EkTensor::new(addr, shape, strides))
    }
    fn array(&mut self, bytes: &[u8]) -> Result<u64> {
        Ok(self.alloc(bytes).1)
    }
    fn zeroed(&mut self, bytes: usize) -> Result<u64> {
        Ok(self.alloc(&vec![0u8; bytes]).1)
    }
    fn read(&mut self, addr: u64, out: &mut [u8]) -> Result<()> {
        let buf = self.buffers.iter().find(|b| b.as_ptr() as u64 == addr).expect("address of this launcher");
        out.copy_from_slice(&bytemuck::cast_slice::<u64, u8>(buf)[..out.len()]);
        Ok(())
    }
    fn block_dim(&self, _: Kernel) -> u32 {
        EMULATED_CORES
    }
    fn launch<P: Copy>(&mut self, kernel: Kernel, params: &P) -> Result<()> {
        let (ptr, _) = raw_parts(params);
        let args = super::launch::kernel_args(kernel, hardware_sync_addr(), ptr as u64);
        // SAFETY: the params hold addresses of live views and of this launcher's buffers.
        unsafe { run_entry(kernel.symbol, &kernel.entry(), &args, EMULATED_CORES) }
    }
    fn finish(self) -> Result<()> {
        for (i, host) in self.outputs {
            host.copy_from_slice(&bytemuck::cast_slice::<u64, u8>(&self.buffers[i])[..host.len()]);
        }
        Ok(())
    }
}

/// The emulated Ascend backend.
#[derive(Debug)]
pub struct AscendEmuBackend {
    caps: Capabilities,
    topk: TopK,
}

impl AscendEmuBackend {
    /// The emulated backend, `kv_compress` with [`TopK::Auto`].
    pub fn new() -> Self {
        Self::with_topk(TopK::Auto)
    }
    /// The emulated backend with `kv_compress`'s top-k chosen by `topk`.
    pub fn with_topk(topk: TopK) -> Self {
        AscendEmuBackend { caps: ops::capabilities("ascend-emu"), topk }
    }
}

impl Default for AscendEmuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for AscendEmuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::AscendEmu
    }
    fn describe(&self) -> String {
        format!("ascend-emu (Ascend C kernels on the host emulator, {EMULATED_CORES} cores)")
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    fn plan(&self, a: &PlanArgs<'_>) -> Result<Plan> {
        ops::plan(EmuLauncher::default(), a)
    }
    fn attention(&self, a: &AttentionArgs<'_>, out: &mut TensorViewMut<'_>, lse: Option<&mut [f32]>) -> Result<()> {
        ops::prefill(EmuLauncher::default(), a, out, lse)
    }
    fn kv_compress(&self, a: &CompressArgs<'_>) -> Result<CompressedCache> {
        ops::kv_compress(EmuLauncher::default(), a, self.topk)
    }
    fn decode_attention(&self, a: &DecodeArgs<'_>, out: &mut TensorViewMut<'_>) -> Result<()> {
        ops::decode(EmuLauncher::default(), a, out)
    }
    fn attend(
        &self,
        a: &crate::engine::AttendArgs<'_>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut [f32]>,
        _ws: &mut crate::engine::Workspace,
    ) -> Result<()> {
        ops::attend(EmuLauncher::default(), a, out, lse)
    }
    fn select(&self, a: &crate::engine::SelectArgs<'_>) -> Result<crate::engine::Selection> {
        ops::kv_scores(EmuLauncher::default(), a)?.select(a.cfg())
    }
    fn kv_scores(&self, a: &crate::engine::SelectArgs<'_>) -> Result<crate::engine::Scores> {
        ops::kv_scores(EmuLauncher::default(), a)
    }
    fn plan_chunks(
        &self,
        a: &crate::engine::ChunkArgs<'_>,
        states: &mut [crate::plan::PlanState],
    ) -> Result<Vec<Plan>> {
        ops::plan_chunks(EmuLauncher::default(), a, states)
    }
    fn append_rows(
        &self,
        k_new: &crate::tensor::TensorView<'_>,
        v_new: &crate::tensor::TensorView<'_>,
        cu: &[u32],
        cache: &mut crate::engine::KvCacheMut<'_>,
    ) -> Result<()> {
        ops::with_pools(cache, |pools, pages| ops::append(EmuLauncher::default(), k_new, v_new, cu, pools, pages))
    }
    fn compact(&self, cache: &mut crate::engine::KvCacheMut<'_>, sel: &crate::engine::Selection) -> Result<()> {
        ops::with_pools(cache, |pools, pages| ops::compact(EmuLauncher::default(), pools, pages, sel))
    }
}

//! What every Ascend launch needs, written once for the two ways the kernels run: on the host
//! emulator (`emu.rs`, host addresses) and on an NPU through ACL (`device.rs`, device memory).
//! Each op builds its params struct from `ffi/entropy_params.h` against a [`Launcher`], which
//! places tensors where the kernel can read them and brings outputs back only after the kernel
//! succeeded (nothing half-written).

use crate::error::Result;
use crate::ffi::EkTensor;
use crate::tensor::{TensorView, TensorViewMut};

/// Which cores a kernel runs on (on A2 a vector-only kernel loads with the vector-core magic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cores {
    /// AIV only.
    Vector,
    /// AIC and AIV together (cube for the matmuls, vector for softmax), mixed 1:2 on A2.
    Mix,
}

/// One Ascend C kernel: entry symbol, source file under `ascend/kernels`, and its cores.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    /// The kernel's entry symbol.
    pub symbol: &'static str,
    /// The kernel source file it is compiled from (without extension).
    pub file: &'static str,
    /// The cores it runs on.
    pub cores: Cores,
}

const fn vector(symbol: &'static str, file: &'static str) -> Kernel {
    Kernel { symbol, file, cores: Cores::Vector }
}

/// The decode attention kernel.
pub const DECODE: Kernel = vector("ek_decode", "decode");
/// Attention over a paged cache (the engine path).
pub const ATTEND: Kernel = vector("ek_attend", "attend");
/// `ek_append`: new rows into a paged cache (SPEC §7.4).
pub const APPEND: Kernel = vector("ek_append", "attend");
/// `kv_compress`: per-entry score statistics.
pub const COMPRESS_STATS: Kernel = vector("ek_compress_stats", "kv_compress");
/// `kv_compress`: the observation queries' mean scores.
pub const COMPRESS_MEANS: Kernel = vector("ek_compress_means", "kv_compress");
/// `kv_compress`: 1-D pooling of the scores.
pub const COMPRESS_POOL: Kernel = vector("ek_compress_pool", "kv_compress");
/// `kv_compress`: each head's top-k.
pub const COMPRESS_TOPK: Kernel = vector("ek_compress_topk", "kv_compress");
/// Top-k by threshold selection (any keep; see [`super::TopK`]).
pub const COMPRESS_SELECT: Kernel = vector("ek_compress_select", "kv_compress");
/// `kv_compress`: gathers the kept entries into the compressed cache.
pub const COMPRESS_GATHER: Kernel = vector("ek_compress_gather", "kv_compress");
/// `ek_compress_compact`: in-place compaction of a paged cache (SPEC §7.5).
pub const COMPRESS_COMPACT: Kernel = vector("ek_compress_compact", "kv_compress");

/// kv_compress scoring with S = obs·Kᵀ on the cube (f16/bf16 caches; mixed kernels).
pub const COMPRESS_CUBE_STATS: Kernel =
    Kernel { symbol: "ek_compress_cube_stats", file: "kv_compress_cube", cores: Cores::Mix };
/// `kv_compress`: the mean scores on the cube cores.
pub const COMPRESS_CUBE_MEANS: Kernel =
    Kernel { symbol: "ek_compress_cube_means", file: "kv_compress_cube", cores: Cores::Mix };

/// The sparse prefill attention kernel (cube and vector cores).
pub const PREFILL: Kernel = Kernel { symbol: "ek_prefill", file: "prefill", cores: Cores::Mix };
/// f32 prefill on the vector cores (the cube path takes f16/bf16 only).
pub const PREFILL_F32: Kernel = vector("ek_prefill_vec", "prefill_vector");
/// Planning: block representatives.
pub const PLAN_REPS: Kernel = vector("ek_plan_reps", "plan");

/// Every kernel entry the backend ships; build.rs compiles each distinct `file` once.
pub const KERNELS: [Kernel; 15] = [
    DECODE,
    ATTEND,
    APPEND,
    COMPRESS_STATS,
    COMPRESS_MEANS,
    COMPRESS_POOL,
    COMPRESS_TOPK,
    COMPRESS_SELECT,
    COMPRESS_GATHER,
    COMPRESS_COMPACT,
    COMPRESS_CUBE_STATS,
    COMPRESS_CUBE_MEANS,
    PREFILL,
    PREFILL_F32,
    PLAN_REPS,
];

/// Places a launch's buffers and runs it.
pub trait Launcher<'v> {
    /// An input tensor, as the kernel addresses it (strides kept).
    fn input(&mut self, v: &TensorView<'_>) -> Result<EkTensor>;
    /// An output tensor: written back into `v` by [`Launcher::finish`], only on success.
    fn output(&mut self, v: &'v mut TensorViewMut<'_>) -> Result<EkTensor>;
    /// A read-only array.
    fn array(&mut self, bytes: &[u8]) -> Result<u64>;
    /// A zero-filled buffer (workspace, or an output read back with [`Launcher::read`]).
    fn zeroed(&mut self, bytes: usize) -> Result<u64>;
    /// Copies `out.len()` bytes from `addr` (a buffer of this launcher) after a launch.
    fn read(&mut self, addr: u64, out: &mut [u8]) -> Result<()>;
    /// Cores a launch of `kernel` spans (for mixed kernels: AICs, each with two AIVs).
    fn block_dim(&self, kernel: Kernel) -> u32;
    /// Runs `kernel` with `params` (a `#[repr(C)]` struct of the header) as its one argument.
    fn launch<P: Copy>(&mut self, kernel: Kernel, params: &P) -> Result<()>;
    /// Copies the outputs back.
    fn finish(self) -> Result<()>;
}

/// A `#[repr(C)]` value's address and size, for handing to C; padding is never read in Rust.
pub(crate) fn raw_parts<P: Copy>(p: &P) -> (*const u8, usize) {
    (p as *const P as *const u8, std::mem::size_of::<P>())
}

/// Bytes of a slice of plain numbers.
pub(crate) fn bytes_of<T: bytemuck::Pod>(v: &[T]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// What a mixed kernel's binary calls its entry: bisheng emits `<symbol>_mix_aic` and
/// `<symbol>_mix_aiv` for the cube and vector halves, and the host launches the `_mix_aic` one
/// (unverified on hardware: the bring-up in ascend/README.md lists the symbols first).
pub const MIX_ENTRY_SUFFIX: &str = "_mix_aic";

impl Kernel {
    /// The symbol the host looks up in this kernel's binary.
    pub fn entry(&self) -> String {
        match self.cores {
            Cores::Vector => self.symbol.to_string(),
            Cores::Mix => format!("{}{MIX_ENTRY_SUFFIX}", self.symbol),
        }
    }
}

/// The kernel's arguments, as `GM_ADDR`s: a vector kernel takes the device address of its params
/// struct; a mixed kernel first the hardware sync address (`aclrtGetHardwareSyncAddr`, which its
/// cores give to `SetSyncBaseAddr` before any cross-core flag), then its params'.
pub fn kernel_args(kernel: Kernel, hardware_sync: u64, params_addr: u64) -> Vec<u64> {
    match kernel.cores {
        Cores::Vector => vec![params_addr],
        Cores::Mix => vec![hardware_sync, params_addr],
    }
}

/// The argument block given to the launch: the arguments little-endian, as the AI core reads them.
pub fn pack_args(args: &[u64]) -> Vec<u8> {
    args.iter().flat_map(|a| a.to_le_bytes()).collect()
}

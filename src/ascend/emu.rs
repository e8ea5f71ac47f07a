//! The Ascend C kernels on the host emulator (feature `ascend-emu`): the same kernel sources the
//! NPU build compiles, run core by core on the CPU against `ascend/emu/include/kernel_operator.h`,
//! a clean-room emulation of the Ascend C API that fails on what the hardware would reject.
//!
//! Params structs travel as on the device: the kernel receives the address of the struct (the
//! tiling-data pattern), and the tensors' addresses inside it are host addresses.

use std::ffi::{CStr, CString, c_char};

use crate::backend::{Backend, BackendKind, Capabilities, HeadDims, Op};
use crate::compress::CompressedCache;
use crate::error::{Error, Result};
use crate::ffi::{EK_BF16, EK_F16, EK_F32, EkDecodeParams, EkTensor};
use crate::plan::Plan;
use crate::tensor::{DType, HostData, HostDataMut, TensorView, TensorViewMut};
use crate::validate::{AttentionArgs, CompressArgs, DecodeArgs, PlanArgs};

unsafe extern "C" {
    fn ek_emu_run(kernel: *const c_char, params: *const u8, block_dim: u32, err: *mut c_char, err_len: usize) -> i32;
}

/// Emulated AI cores per launch: enough to exercise the kernels' work split.
pub const EMULATED_CORES: u32 = 4;

/// Runs emulated kernel `name` with `params` (any `#[repr(C)]` struct or buffer) on `cores`.
///
/// # Safety
/// Every address inside `params` must be valid for the accesses the kernel makes.
pub unsafe fn run(name: &'static str, params: *const u8, cores: u32) -> Result<()> {
    let cname = CString::new(name).expect("kernel names have no NUL");
    let mut err = vec![0 as c_char; 1024];
    // SAFETY: the emulator reads `params` as the kernel's argument and writes at most `err.len()`.
    let rc = unsafe { ek_emu_run(cname.as_ptr(), params, cores, err.as_mut_ptr(), err.len()) };
    if rc == 0 {
        return Ok(());
    }
    let detail = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
    Err(Error::Emulator { kernel: name, detail })
}

fn dtype_code(d: DType) -> i32 {
    (match d {
        DType::F32 => EK_F32,
        DType::F16 => EK_F16,
        DType::BF16 => EK_BF16,
    }) as i32
}

fn tensor(v: &TensorView<'_>) -> EkTensor {
    let ptr = match v.data() {
        HostData::F32(s) => s.as_ptr() as u64,
        HostData::F16(s) => s.as_ptr() as u64,
        HostData::BF16(s) => s.as_ptr() as u64,
    };
    let (s, d) = (v.strides(), v.shape());
    EkTensor {
        ptr,
        stride: [s[0] as i64, s[1] as i64, s[2] as i64],
        shape: [d[0] as i32, d[1] as i32, d[2] as i32, d[3] as i32],
    }
}

fn tensor_mut(v: &mut TensorViewMut<'_>) -> EkTensor {
    let (s, d) = (v.strides(), v.shape());
    let ptr = match v.data_mut() {
        HostDataMut::F32(s) => s.as_mut_ptr() as u64,
        HostDataMut::F16(s) => s.as_mut_ptr() as u64,
        HostDataMut::BF16(s) => s.as_mut_ptr() as u64,
    };
    EkTensor {
        ptr,
        stride: [s[0] as i64, s[1] as i64, s[2] as i64],
        shape: [d[0] as i32, d[1] as i32, d[2] as i32, d[3] as i32],
    }
}

/// The emulated Ascend backend.
#[derive(Debug)]
pub struct AscendEmuBackend {
    caps: Capabilities,
}

impl AscendEmuBackend {
    pub fn new() -> Self {
        AscendEmuBackend {
            caps: Capabilities { ops: vec![Op::Decode], ..Capabilities::full("ascend-emu", HeadDims::UpTo(256)) },
        }
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
    fn plan(&self, _: &PlanArgs<'_>) -> Result<Plan> {
        Err(Error::Unimplemented { backend: "ascend-emu", op: "plan" })
    }
    fn attention(&self, _: &AttentionArgs<'_>, _: &mut TensorViewMut<'_>, _: Option<&mut [f32]>) -> Result<()> {
        Err(Error::Unimplemented { backend: "ascend-emu", op: "prefill" })
    }
    fn kv_compress(&self, _: &CompressArgs<'_>) -> Result<CompressedCache> {
        Err(Error::Unimplemented { backend: "ascend-emu", op: "kv_compress" })
    }
    fn decode_attention(&self, a: &DecodeArgs<'_>, out: &mut TensorViewMut<'_>) -> Result<()> {
        let d = a.dims();
        if d.queries * d.group() > 16 {
            return Err(Error::range(
                "decode rows",
                d.queries * d.group(),
                "the Ascend decode kernel holds at most 16 query rows per cache head",
            ));
        }
        let params = EkDecodeParams {
            q: tensor(&a.q()),
            k_cache: tensor(&a.k_cache()),
            v_cache: tensor(&a.v_cache()),
            out: tensor_mut(out),
            lengths: a.lengths().as_ptr() as u64,
            partial: 0,
            group: d.group() as i32,
            splits: 1,
            keys_per_split: 0,
            scale_log2: a.scale() * std::f32::consts::LOG2_E,
            dtype: dtype_code(a.q().dtype()),
        };
        // SAFETY: every address in `params` is a live, validated host buffer of this call.
        unsafe { run("ek_decode", &params as *const EkDecodeParams as *const u8, EMULATED_CORES) }
    }
}

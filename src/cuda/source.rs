//! The CUDA kernel sources, embedded, and their compilation with NVRTC (feature `cuda`).
//!
//! The kernels include no CUDA headers (`cuda/common.cuh` defines the half types with PTX
//! conversions), so NVRTC compiles them with no include path on any machine with a driver.

/// Every kernel source, in dependency order, as one translation unit.
pub const SOURCE: &str = concat!(
    include_str!("../../ffi/entropy_params.h"),
    "\n",
    include_str!("../../cuda/common.cuh"),
    "\n",
    include_str!("../../cuda/topk.cuh"),
    "\n",
    include_str!("../../cuda/decode.cu"),
    "\n",
    include_str!("../../cuda/prefill.cu"),
    "\n",
    include_str!("../../cuda/plan.cu"),
    "\n",
    include_str!("../../cuda/compress.cu"),
);

/// Kernel entry points (all `extern "C"`).
pub const KERNELS: &[&str] = &[
    "ek_decode_split_f32",
    "ek_decode_split_f16",
    "ek_decode_split_bf16",
    "ek_decode_merge_f32",
    "ek_decode_merge_f16",
    "ek_decode_merge_bf16",
    "ek_prefill_simt_f32",
    "ek_prefill_simt_f16",
    "ek_prefill_simt_bf16",
    "ek_prefill_mma_f16_d64",
    "ek_prefill_mma_f16_d128",
    "ek_prefill_mma_bf16_d64",
    "ek_prefill_mma_bf16_d128",
    "ek_plan_reps_q_f32",
    "ek_plan_reps_q_f16",
    "ek_plan_reps_q_bf16",
    "ek_plan_reps_k_f32",
    "ek_plan_reps_k_f16",
    "ek_plan_reps_k_bf16",
    "ek_plan_logits",
    "ek_plan_softmax",
    "ek_plan_decide",
    "ek_plan_rank",
    "ek_compress_stats_f32",
    "ek_compress_stats_f16",
    "ek_compress_stats_bf16",
    "ek_compress_means_f32",
    "ek_compress_means_f16",
    "ek_compress_means_bf16",
    "ek_compress_pool",
    "ek_compress_topk",
    "ek_compress_gather_f32",
    "ek_compress_gather_f16",
    "ek_compress_gather_bf16",
];

/// NVRTC options shared by every build: C++17, precise division and square root, no FMA
/// contraction surprises in the budget recurrence (it uses explicit `__f*_rn` intrinsics).
pub fn options(arch: &str, verbose_ptxas: bool) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
    ];
    if verbose_ptxas {
        o.push("--ptxas-options=-v".into());
        o.push("--ptxas-options=--warn-on-spills".into());
    }
    o
}

/// Output of one NVRTC compilation.
#[cfg(feature = "cuda")]
pub struct Compiled {
    /// CUBIN for `sm_XX` targets, PTX for `compute_XX`.
    pub image: Vec<u8>,
    /// The compiler log (with `verbose_ptxas`, ptxas' register and spill report).
    pub log: String,
}

/// Compiles `SOURCE` for `arch` (`sm_80`, `sm_90a`, `compute_80`, …).
#[cfg(feature = "cuda")]
pub fn compile(arch: &str, verbose_ptxas: bool) -> Result<Compiled, String> {
    use cudarc::nvrtc::result as nvrtc;
    use std::ffi::CString;
    // SAFETY: only checks whether the library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("NVRTC (libnvrtc) not found: install the CUDA toolkit or put its lib dir on LD_LIBRARY_PATH".into());
    }
    let src = CString::new(SOURCE).map_err(|e| e.to_string())?;
    let prog = nvrtc::create_program(&src, Some(c"entropy_kernels.cu")).map_err(|e| e.to_string())?;
    let opts = options(arch, verbose_ptxas);
    // SAFETY: `prog` was just created and is destroyed below; the source outlives it.
    let built = unsafe { nvrtc::compile_program(prog, &opts) };
    let log = unsafe { nvrtc::get_program_log(prog) }
        .map(|l| {
            String::from_utf8_lossy(&l.iter().map(|&c| c as u8).collect::<Vec<_>>()).trim_end_matches('\0').to_string()
        })
        .unwrap_or_default();
    let image = built.map_err(|e| format!("NVRTC failed for {arch}: {e}\n{log}")).and_then(|_| {
        if arch.starts_with("sm_") {
            // SAFETY: compiled successfully above.
            unsafe { cubin(prog) }
        } else {
            unsafe { nvrtc::get_ptx(prog) }.map(|p| p.iter().map(|&c| c as u8).collect()).map_err(|e| e.to_string())
        }
    });
    // SAFETY: created above, not used afterwards.
    unsafe { nvrtc::destroy_program(prog) }.ok();
    Ok(Compiled { image: image?, log })
}

/// The CUBIN of a compiled program.
///
/// # Safety
/// `prog` must be a successfully compiled, live program.
#[cfg(feature = "cuda")]
unsafe fn cubin(prog: cudarc::nvrtc::sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::sys;
    let mut size = 0usize;
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result().map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; size];
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _) }.result().map_err(|e| e.to_string())?;
    Ok(buf)
}

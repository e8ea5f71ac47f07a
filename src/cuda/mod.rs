//! CUDA backend (feature `cuda`, or `candle-cuda`). The probe is safe on machines without a
//! driver: with `cuda` the libraries are loaded at run time and cudarc's `is_culib_present()` is
//! asked before anything touches the driver API; with `candle-cuda` they are linked (the process
//! could not have started without them). Every failure is a typed error, so `auto` falls through
//! to the next backend.
//!
//! Kernels: `cuda/*.cu`, compiled with NVRTC for the device on first use ([`source`]).

pub mod source;

#[cfg(feature = "_cuda")]
pub mod host_check;

#[cfg(feature = "_cuda")]
mod backend;
#[cfg(feature = "_cuda")]
mod chunks;
#[cfg(feature = "_cuda")]
pub mod device;
#[cfg(feature = "cuda-emu")]
pub mod emu;
#[cfg(feature = "_cuda")]
pub mod launches;
#[cfg(feature = "_cuda")]
mod paged;
#[cfg(feature = "_cuda")]
mod select;
#[cfg(feature = "_cuda")]
pub mod smoke;
#[cfg(feature = "_cuda")]
pub use backend::{CudaBackend, NumericsProbe, PREFILL_TILE_ENV, target_arch};
#[cfg(feature = "_cuda")]
pub use device::{CudaCompressedCache, CudaTensor, CudaTensorMut, DeviceElement};
#[cfg(feature = "_cuda")]
pub use launches::PrefillTile;
#[cfg(feature = "_cuda")]
pub use paged::{CudaAttendPlan, CudaKvCache, CudaKvCacheMut, CudaPagedCache};
#[cfg(feature = "_cuda")]
pub use select::CudaSelection;

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};

/// Whether the CUDA driver library can be loaded in this process.
pub fn driver_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only dlopen()s the driver library and reports whether that worked.
        std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
    }
    #[cfg(not(feature = "cuda"))]
    {
        // `candle-cuda` links libcuda: present if this code runs. Without any CUDA feature: absent.
        cfg!(feature = "_cuda")
    }
}

/// Whether NVRTC can be used (loaded at run time with `cuda`, linked with `candle-cuda`).
pub fn nvrtc_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only dlopen()s libnvrtc and reports whether that worked.
        std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
    }
    #[cfg(not(feature = "cuda"))]
    {
        cfg!(feature = "_cuda")
    }
}

/// Environment variable: with feature `cuda-emu`, `1` makes the `cuda` backend use the emulated
/// driver (`emu`, feature `cuda-emu`) instead of probing for a real one.
pub const EMU_ENV: &str = "ENTROPY_KERNELS_CUDA_EMU";

pub(crate) fn probe() -> Result<Arc<dyn Backend>> {
    #[cfg(feature = "_cuda")]
    {
        Ok(Arc::new(open()?))
    }
    #[cfg(not(feature = "_cuda"))]
    {
        Err(Error::BackendUnavailable {
            backend: "cuda",
            reason: "built without the `cuda` (or `candle-cuda`) feature".into(),
        })
    }
}

/// The CUDA backend `auto` and `cuda` choose: on device 0, or on the emulated driver when
/// [`EMU_ENV`] is `1`. Never panics. No driver, or a driver that sees no device, is
/// `BackendUnavailable` (so `auto` goes on to the next backend); a device that is there but fails
/// to open is the typed error of the failing call (so `auto` reports it rather than hide a
/// broken GPU behind the CPU backend; `ENTROPY_KERNELS_BACKEND=cpu` continues on the CPU).
#[cfg(feature = "_cuda")]
pub fn open() -> Result<CudaBackend> {
    #[cfg(feature = "cuda-emu")]
    if std::env::var(EMU_ENV).is_ok_and(|v| v == "1") {
        return emu::backend();
    }
    if !driver_present() {
        return Err(Error::BackendUnavailable { backend: "cuda", reason: "no CUDA driver (libcuda) found".into() });
    }
    // The driver API panics inside cudarc only on a missing library, checked above; anything
    // else is an error value. A panic here would still be caught rather than abort `auto`.
    std::panic::catch_unwind(|| {
        let devices = device_count()?;
        if devices == 0 {
            return Err(Error::BackendUnavailable { backend: "cuda", reason: "the CUDA driver sees no device".into() });
        }
        CudaBackend::new(0)
    })
    .unwrap_or_else(|_| {
        Err(Error::Driver { backend: "cuda", call: "cuInit", detail: "the CUDA probe panicked".into() })
    })
}

/// Devices the driver sees: 0 where it initialises with `CUDA_ERROR_NO_DEVICE` (a machine or
/// container without a GPU).
#[cfg(feature = "_cuda")]
fn device_count() -> Result<usize> {
    use cudarc::driver::{result, sys::CUresult};
    match result::init() {
        Err(result::DriverError(CUresult::CUDA_ERROR_NO_DEVICE)) => return Ok(0),
        r => r.map_err(backend::driver_err("cuInit"))?,
    }
    Ok(result::device::get_count().map_err(backend::driver_err("cuDeviceGetCount"))?.max(0) as usize)
}

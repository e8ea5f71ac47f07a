//! CUDA backend (feature `cuda`). The probe is safe on machines without a driver: cudarc's
//! `is_culib_present()` is asked before anything touches the driver API.
//!
//! Status: the kernels (cuda/) and the device-resident API are the subject of the CUDA issue;
//! until they land, a present driver is reported and the backend says it has no kernels yet, so
//! `auto` falls through to the next backend.

pub mod source;

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
        false
    }
}

pub(crate) fn probe() -> Result<Arc<dyn Backend>> {
    let reason = if !cfg!(feature = "cuda") {
        "built without the `cuda` feature".to_string()
    } else if !driver_present() {
        "no CUDA driver (libcuda) found".to_string()
    } else {
        "a CUDA driver is present, but this build has no CUDA kernels yet".to_string()
    };
    Err(Error::BackendUnavailable { backend: "cuda", reason })
}

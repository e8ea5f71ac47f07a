//! Ascend backend (feature `ascend`): ACL is loaded at run time with libloading, so the crate
//! builds and runs without CANN.
//!
//! Status: the Ascend C kernels (ascend/) and the ACL runtime are the subject of the Ascend
//! issue; until they land the backend reports itself unavailable and `auto` falls through.

#[cfg(feature = "ascend-emu")]
pub mod emu;

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};

/// The Ascend C kernels on the host emulator (feature `ascend-emu`).
pub(crate) fn emulator() -> Result<Arc<dyn Backend>> {
    #[cfg(feature = "ascend-emu")]
    {
        Ok(Arc::new(emu::AscendEmuBackend::new()))
    }
    #[cfg(not(feature = "ascend-emu"))]
    {
        Err(Error::BackendUnavailable {
            backend: "ascend-emu",
            reason: "built without the `ascend-emu` feature".into(),
        })
    }
}

/// Library names tried, in order, when looking for the ACL runtime.
pub const ACL_LIBRARIES: [&str; 2] = ["libascendcl.so", "libacl_rt.so"];

/// Whether an ACL runtime library can be loaded in this process.
pub fn runtime_present() -> bool {
    #[cfg(feature = "ascend")]
    {
        // SAFETY: loading ACL runs its initialisers only; nothing is called.
        ACL_LIBRARIES.iter().any(|name| unsafe { libloading::Library::new(*name) }.is_ok())
    }
    #[cfg(not(feature = "ascend"))]
    {
        false
    }
}

pub(crate) fn probe() -> Result<Arc<dyn Backend>> {
    let reason = if !cfg!(feature = "ascend") {
        "built without the `ascend` feature".to_string()
    } else if !runtime_present() {
        format!("no ACL runtime ({}) found", ACL_LIBRARIES.join(" or "))
    } else {
        "an ACL runtime is present, but this build has no Ascend kernels yet".to_string()
    };
    Err(Error::BackendUnavailable { backend: "ascend", reason })
}

//! Run-time backend selection, next to the front door: `auto` picks CUDA when a driver is
//! present, then Ascend, then the fast CPU backend; `ENTROPY_KERNELS_BACKEND=cpu|reference|cuda|ascend`
//! forces one. This module knows every concrete backend; the trait they implement
//! ([`crate::backend`]) knows none of them.

use std::sync::Arc;

use crate::backend::{Backend, BackendChoice, BackendKind};
use crate::error::{Error, Result};

/// Environment variable that forces a backend.
pub const BACKEND_ENV: &str = "ENTROPY_KERNELS_BACKEND";

/// Builds one backend, or says why it cannot run here. Never panics.
pub fn create(kind: BackendKind) -> Result<Arc<dyn Backend>> {
    match kind {
        BackendKind::Cpu => Ok(Arc::new(crate::cpu::CpuBackend::new())),
        BackendKind::Reference => Ok(Arc::new(crate::reference::ReferenceBackend::new())),
        BackendKind::Cuda => crate::cuda::probe(),
        BackendKind::Ascend => crate::ascend::probe(),
        BackendKind::AscendEmu => crate::ascend::emulator(),
    }
}

/// Resolves a choice: a forced kind, or CUDA → Ascend → CPU for `auto` ([`first_available`]).
pub fn select(choice: BackendChoice) -> Result<Arc<dyn Backend>> {
    match choice {
        BackendChoice::Kind(kind) => create(kind),
        BackendChoice::Auto => {
            let probe = |kind| move || create(kind);
            let (cuda, ascend, cpu) = (probe(BackendKind::Cuda), probe(BackendKind::Ascend), probe(BackendKind::Cpu));
            let probes: [&dyn Fn() -> Result<Arc<dyn Backend>>; 3] = [&cuda, &ascend, &cpu];
            first_available(probes)
        }
    }
}

/// `auto`'s rule over probes in order of preference: the first backend that opens. A backend
/// that is absent ([`Error::BackendUnavailable`]: no driver, no device, not built in) passes to
/// the next; any other error is returned, so a device that is there but fails to open is
/// reported instead of silently replaced by a slower backend. (To continue on the CPU anyway,
/// force it: `ENTROPY_KERNELS_BACKEND=cpu`.)
pub fn first_available<'a>(
    probes: impl IntoIterator<Item = &'a dyn Fn() -> Result<Arc<dyn Backend>>>,
) -> Result<Arc<dyn Backend>> {
    let mut absent = Vec::new();
    for probe in probes {
        match probe() {
            Err(e @ Error::BackendUnavailable { .. }) => absent.push(e.to_string()),
            other => return other,
        }
    }
    Err(Error::BackendUnavailable { backend: "auto", reason: absent.join("; ") })
}

/// The choice named by `ENTROPY_KERNELS_BACKEND` (unset or empty = auto).
pub fn env_choice() -> Result<BackendChoice> {
    match std::env::var(BACKEND_ENV) {
        Ok(v) => v.parse(),
        Err(_) => Ok(BackendChoice::Auto),
    }
}

/// Why each backend is or is not available here: `(kind, Ok(description) | Err(reason))`.
pub fn availability() -> Vec<(BackendKind, std::result::Result<String, String>)> {
    BackendKind::ALL.iter().map(|&k| (k, create(k).map(|b| b.describe()).map_err(|e| e.to_string()))).collect()
}

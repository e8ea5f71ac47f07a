//! Checked ACL calls: each wrapper turns an `aclError` into [`Error::Acl`] with the runtime's own
//! message (`aclGetRecentErrMsg`). Still unsafe: pointers and handles are the caller's to keep
//! valid. The safe layer is `runtime.rs`.
//!
//! # Safety
//! For every function here: `acl` is an initialised runtime table, and each pointer or handle
//! argument is valid for the ACL call it is passed to (live, of the documented size), as the ACL
//! reference requires; the functions add no requirement of their own.
#![allow(clippy::missing_safety_doc)]

use std::ffi::{CStr, c_void};

use super::sys::{self, Acl, aclError, aclrtBinHandle, aclrtFuncHandle, aclrtStream};
use crate::error::{Error, Result};

/// `Ok` for `ACL_SUCCESS`, otherwise the typed error of `call`.
pub fn check(acl: &Acl, call: &'static str, rc: aclError) -> Result<()> {
    if rc == sys::ACL_SUCCESS as aclError {
        return Ok(());
    }
    // SAFETY: aclGetRecentErrMsg takes no arguments and returns a NUL-terminated string or null.
    let msg = unsafe { acl.aclGetRecentErrMsg() };
    let message = if msg.is_null() {
        "(no message from aclGetRecentErrMsg)".to_string()
    } else {
        // SAFETY: non-null, NUL-terminated, owned by the runtime until the next ACL call.
        unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned()
    };
    Err(Error::Acl { call, code: rc, message })
}

/// `aclInit(NULL)`; a repeated initialisation (another user of ACL in the process) is fine.
pub unsafe fn init(acl: &Acl) -> Result<()> {
    let rc = unsafe { acl.aclInit(std::ptr::null()) };
    if rc == sys::ACL_ERROR_REPEAT_INITIALIZE as aclError {
        return Ok(());
    }
    check(acl, "aclInit", rc)
}

/// The number of NPUs (`aclrtGetDeviceCount`).
pub unsafe fn device_count(acl: &Acl) -> Result<u32> {
    let mut n = 0u32;
    check(acl, "aclrtGetDeviceCount", unsafe { acl.aclrtGetDeviceCount(&mut n) })?;
    Ok(n)
}

/// Makes `device` current for this thread (`aclrtSetDevice`).
pub unsafe fn set_device(acl: &Acl, device: i32) -> Result<()> {
    check(acl, "aclrtSetDevice", unsafe { acl.aclrtSetDevice(device) })
}

/// The calling thread's current context (`aclrtGetCurrentContext`).
pub unsafe fn current_context(acl: &Acl) -> Result<sys::aclrtContext> {
    let mut c = std::ptr::null_mut();
    check(acl, "aclrtGetCurrentContext", unsafe { acl.aclrtGetCurrentContext(&mut c) })?;
    Ok(c)
}

/// Makes `context` current on the calling thread (`aclrtSetCurrentContext`).
pub unsafe fn set_current_context(acl: &Acl, context: sys::aclrtContext) -> Result<()> {
    check(acl, "aclrtSetCurrentContext", unsafe { acl.aclrtSetCurrentContext(context) })
}

/// Creates a stream (`aclrtCreateStream`).
pub unsafe fn create_stream(acl: &Acl) -> Result<aclrtStream> {
    let mut s = std::ptr::null_mut();
    check(acl, "aclrtCreateStream", unsafe { acl.aclrtCreateStream(&mut s) })?;
    Ok(s)
}

/// Destroys stream `s` (`aclrtDestroyStream`).
pub unsafe fn destroy_stream(acl: &Acl, s: aclrtStream) -> Result<()> {
    check(acl, "aclrtDestroyStream", unsafe { acl.aclrtDestroyStream(s) })
}

/// Waits for the stream to drain, at most `timeout_ms` milliseconds: a kernel that never ends
/// (a cross-core flag nobody sets) becomes an error instead of a hang.
pub unsafe fn synchronize(acl: &Acl, s: aclrtStream, timeout_ms: i32) -> Result<()> {
    let rc = unsafe { acl.aclrtSynchronizeStreamWithTimeout(s, timeout_ms) };
    check(acl, "aclrtSynchronizeStreamWithTimeout", rc)
}

/// The device's hardware synchronisation address (mixed kernels' `SetSyncBaseAddr`).
pub unsafe fn hardware_sync_addr(acl: &Acl) -> Result<u64> {
    let mut p = std::ptr::null_mut();
    check(acl, "aclrtGetHardwareSyncAddr", unsafe { acl.aclrtGetHardwareSyncAddr(&mut p) })?;
    Ok(p as u64)
}

/// One attribute of device `device` (`aclrtGetDeviceInfo`).
pub unsafe fn device_info(acl: &Acl, device: u32, attr: sys::aclrtDevAttr) -> Result<i64> {
    let mut v = 0i64;
    check(acl, "aclrtGetDeviceInfo", unsafe { acl.aclrtGetDeviceInfo(device, attr, &mut v) })?;
    Ok(v)
}

/// Allocates `bytes` bytes of device memory (`aclrtMalloc`).
pub unsafe fn malloc(acl: &Acl, bytes: usize) -> Result<*mut c_void> {
    let mut p = std::ptr::null_mut();
    let policy = sys::aclrtMemMallocPolicy_ACL_MEM_MALLOC_HUGE_FIRST;
    check(acl, "aclrtMalloc", unsafe { acl.aclrtMalloc(&mut p, bytes, policy) })?;
    Ok(p)
}

/// Frees device memory `p` (`aclrtFree`).
pub unsafe fn free(acl: &Acl, p: *mut c_void) -> Result<()> {
    check(acl, "aclrtFree", unsafe { acl.aclrtFree(p) })
}

/// Sets `bytes` bytes at `p` to `value` (`aclrtMemset`).
pub unsafe fn memset(acl: &Acl, p: *mut c_void, bytes: usize, value: u8) -> Result<()> {
    check(acl, "aclrtMemset", unsafe { acl.aclrtMemset(p, bytes, value as i32, bytes) })
}

/// Copies `src` to device address `dst` (`aclrtMemcpy`, host to device).
pub unsafe fn copy_to_device(acl: &Acl, dst: *mut c_void, src: &[u8]) -> Result<()> {
    let kind = sys::aclrtMemcpyKind_ACL_MEMCPY_HOST_TO_DEVICE;
    let rc = unsafe { acl.aclrtMemcpy(dst, src.len(), src.as_ptr().cast(), src.len(), kind) };
    check(acl, "aclrtMemcpy(host to device)", rc)
}

/// Copies `dst.len()` bytes from device address `src` into `dst` (`aclrtMemcpy`, device to host).
pub unsafe fn copy_to_host(acl: &Acl, dst: &mut [u8], src: *const c_void) -> Result<()> {
    let kind = sys::aclrtMemcpyKind_ACL_MEMCPY_DEVICE_TO_HOST;
    let rc = unsafe { acl.aclrtMemcpy(dst.as_mut_ptr().cast(), dst.len(), src, dst.len(), kind) };
    check(acl, "aclrtMemcpy(device to host)", rc)
}

/// Loads a kernel binary (`*.o` from bisheng) for the cores `magic` names.
pub unsafe fn binary_load(acl: &Acl, image: &[u8], magic: u32) -> Result<aclrtBinHandle> {
    let mut opt = sys::aclrtBinaryLoadOption {
        type_: sys::aclrtBinaryLoadOptionType_ACL_RT_LOAD_BINARY_OPT_MAGIC,
        value: sys::aclrtBinaryLoadOptionValue { magic },
    };
    let opts = sys::aclrtBinaryLoadOptions { options: &mut opt, numOpt: 1 };
    let mut h = std::ptr::null_mut();
    let rc = unsafe { acl.aclrtBinaryLoadFromData(image.as_ptr().cast(), image.len(), &opts, &mut h) };
    check(acl, "aclrtBinaryLoadFromData", rc)?;
    Ok(h)
}

/// Unloads a kernel binary (`aclrtBinaryUnLoad`).
pub unsafe fn binary_unload(acl: &Acl, h: aclrtBinHandle) -> Result<()> {
    check(acl, "aclrtBinaryUnLoad", unsafe { acl.aclrtBinaryUnLoad(h) })
}

/// The function `name` of binary `h` (`aclrtBinaryGetFunction`).
pub unsafe fn get_function(acl: &Acl, h: aclrtBinHandle, name: &CStr) -> Result<aclrtFuncHandle> {
    let mut f = std::ptr::null_mut();
    check(acl, "aclrtBinaryGetFunction", unsafe { acl.aclrtBinaryGetFunction(h, name.as_ptr(), &mut f) })?;
    Ok(f)
}

/// Launches `f` on `block_dim` cores; `args` is device memory holding the kernel's arguments.
pub unsafe fn launch(
    acl: &Acl,
    f: aclrtFuncHandle,
    block_dim: u32,
    args: *const c_void,
    args_size: usize,
    stream: aclrtStream,
) -> Result<()> {
    check(acl, "aclrtLaunchKernel", unsafe { acl.aclrtLaunchKernel(f, block_dim, args, args_size, stream) })
}

//! Safe ACL runtime: the library loaded once per process, RAII device buffers, streams and kernel
//! binaries. Built on the checked calls of `result.rs`.

use std::ffi::{CString, c_void};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::launch::{Cores, Kernel};
use super::result;
use super::sys::{self, Acl, aclrtBinHandle, aclrtFuncHandle, aclrtStream};
use crate::error::{Error, Result};

/// Environment variable: NPU ordinal used by the backend (default 0).
pub const DEVICE_ENV: &str = "ENTROPY_KERNELS_ASCEND_DEVICE";
/// Environment variable: vector cores per launch (default: what the device reports).
pub const CORES_ENV: &str = "ENTROPY_KERNELS_ASCEND_CORES";
/// Environment variable: a directory holding `<kernel>.o` binaries, used instead of the embedded ones.
pub const KERNEL_DIR_ENV: &str = "ENTROPY_KERNELS_ASCEND_KERNELS";
/// Environment variable: how long a launch may run before its stream sync fails (milliseconds,
/// default [`DEFAULT_SYNC_TIMEOUT_MS`]; -1 waits forever).
pub const SYNC_TIMEOUT_ENV: &str = "ENTROPY_KERNELS_ASCEND_SYNC_TIMEOUT_MS";
/// A launch of these kernels takes well under a second; a minute means a hang.
pub const DEFAULT_SYNC_TIMEOUT_MS: i32 = 60_000;

/// Where the Ascend backend finds its runtime and kernels. `from_env` reads the
/// `ENTROPY_KERNELS_*` variables; engines may fill it in directly.
#[derive(Clone, Debug)]
pub struct AscendOptions {
    /// ACL libraries tried in order (default: [`super::acl_candidates`]).
    pub libraries: Vec<PathBuf>,
    /// Kernel binaries directory; `None`: the binaries embedded at build time.
    pub kernel_dir: Option<PathBuf>,
    /// The NPU index.
    pub device: u32,
    /// Vector cores per launch; `None`: the device's count (`aclrtGetDeviceInfo`).
    pub vector_cores: Option<u32>,
    /// Stream sync timeout in milliseconds (-1: none).
    pub sync_timeout_ms: i32,
    /// How `kv_compress` picks its kept positions.
    pub topk: super::TopK,
}

impl AscendOptions {
    /// The options the environment sets.
    pub fn from_env() -> Result<Self> {
        Ok(AscendOptions {
            libraries: super::acl_candidates().into_iter().map(PathBuf::from).collect(),
            kernel_dir: std::env::var_os(KERNEL_DIR_ENV).map(PathBuf::from),
            device: env_number(DEVICE_ENV, 0)?,
            vector_cores: match std::env::var_os(CORES_ENV) {
                Some(_) => Some(env_number(CORES_ENV, 1)?.max(1)),
                None => None,
            },
            sync_timeout_ms: match std::env::var(SYNC_TIMEOUT_ENV) {
                Err(_) => DEFAULT_SYNC_TIMEOUT_MS,
                Ok(s) => s.trim().parse().map_err(|_| {
                    Error::range("environment", format!("{SYNC_TIMEOUT_ENV}={s}"), "expected milliseconds or -1")
                })?,
            },
            topk: super::TopK::from_env()?,
        })
    }
}

/// The ACL runtime of this process, on one device. ACL acts on the calling thread's current
/// context, and `aclrtSetDevice` makes the device's context current on its own thread only:
/// every call below makes this runtime's context current for its duration and the thread's
/// previous one (an engine's own) current again after it ([`AclRuntime::bind`]), so a backend,
/// a buffer or a resident cache may be used and dropped on any thread.
///
/// A stream synchronisation that fails (a timeout: ACL does not abort the kernel, which may
/// still be running) taints the runtime: later launches fail at once with [`Error::Poisoned`],
/// and buffers, streams and binaries are leaked instead of freed or destroyed under the kernel
/// (`aclrtFree` does not wait for it; `aclrtDestroyStream` would wait forever). Open a new
/// backend to go on.
pub struct AclRuntime {
    acl: Acl,
    /// The device's default context (`aclrtGetCurrentContext` after `aclrtSetDevice`), as an
    /// address: a handle the runtime owns, valid while the device is set.
    context: usize,
    /// Set when a stream synchronisation failed (see the type's docs).
    tainted: std::sync::atomic::AtomicBool,
    /// The current NPU index.
    pub device: i32,
    /// NPUs visible to this process.
    pub devices: u32,
    /// AIV cores a vector launch spans.
    pub vector_cores: u32,
    /// AI cores (one AIC + two AIVs each) a mixed launch spans.
    pub ai_cores: u32,
    /// The device's cross-core synchronisation address, mixed kernels' first argument.
    pub hardware_sync: u64,
    /// Stream synchronisation timeout, in milliseconds.
    pub sync_timeout_ms: i32,
}

impl std::fmt::Debug for AclRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AclRuntime(device {} of {})", self.device, self.devices)
    }
}

fn env_number(name: &str, default: u32) -> Result<u32> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(s) => s.trim().parse().map_err(|_| Error::range("environment", format!("{name}={s}"), "expected a number")),
    }
}

impl AclRuntime {
    /// Loads the first of `opts.libraries` that opens, initialises ACL and binds `opts.device`.
    pub fn load(opts: &AscendOptions) -> Result<Arc<Self>> {
        let mut tried = Vec::new();
        for name in &opts.libraries {
            // SAFETY: opening the library runs its initialisers; every symbol is checked present.
            match unsafe { Acl::new(name) } {
                Ok(acl) => return Self::start(acl, opts).map(Arc::new),
                Err(e) => tried.push(format!("{}: {e}", name.display())),
            }
        }
        Err(Error::BackendUnavailable {
            backend: "ascend",
            reason: format!("no usable ACL runtime ({})", tried.join("; ")),
        })
    }

    fn start(acl: Acl, opts: &AscendOptions) -> Result<Self> {
        // SAFETY: plain ACL calls with out-pointers to locals.
        unsafe { result::init(&acl)? };
        let devices = unsafe { result::device_count(&acl)? };
        if devices == 0 {
            return Err(Error::BackendUnavailable { backend: "ascend", reason: "ACL reports no NPU".into() });
        }
        let device = opts.device;
        if device >= devices {
            return Err(Error::range("ascend device", device, format!("this machine has {devices} NPU(s)")));
        }
        unsafe { result::set_device(&acl, device as i32)? };
        let context = unsafe { result::current_context(&acl)? } as usize;
        // Core counts as the device reports them (an A2 910B3: 20 AI cores of one AIC + two AIVs;
        // whether VECTOR_CORE_NUM counts those AIVs is unverified, so a zero falls back to 2 per
        // AI core). ENTROPY_KERNELS_ASCEND_CORES overrides.
        let ai = unsafe { result::device_info(&acl, device, sys::aclrtDevAttr_ACL_DEV_ATTR_AICORE_CORE_NUM)? };
        let vec = unsafe { result::device_info(&acl, device, sys::aclrtDevAttr_ACL_DEV_ATTR_VECTOR_CORE_NUM)? };
        let reported = if vec > 0 { vec as u32 } else { 2 * ai.max(1) as u32 };
        let vector_cores = opts.vector_cores.unwrap_or(reported).max(1);
        let ai_cores = match opts.vector_cores {
            Some(v) => (v / 2).max(1),
            None => (ai.max(1) as u32).min(vector_cores.div_ceil(2)).max(1),
        };
        let hardware_sync = unsafe { result::hardware_sync_addr(&acl)? };
        Ok(AclRuntime {
            acl,
            context,
            tainted: std::sync::atomic::AtomicBool::new(false),
            device: device as i32,
            devices,
            vector_cores,
            ai_cores,
            hardware_sync,
            sync_timeout_ms: opts.sync_timeout_ms,
        })
    }

    /// Cores a launch of `kernel` spans: every AIV, or for mixed kernels one AIC (+ its 2 AIV) each.
    pub fn block_dim(&self, kernel: Kernel) -> u32 {
        match kernel.cores {
            Cores::Vector => self.vector_cores,
            Cores::Mix => self.ai_cores,
        }
    }

    /// Makes this runtime's context current on the calling thread until the guard drops, when
    /// the thread's previous context (if it had one) is current again.
    pub fn bind(&self) -> Result<Bound<'_>> {
        // No current context (ACL_ERROR_RT_CONTEXT_NULL) is an error here: then nothing to restore.
        let previous = unsafe { result::current_context(&self.acl) }.ok().map(|c| c as usize);
        if previous != Some(self.context) {
            // SAFETY: the context was returned by ACL for this runtime's device.
            unsafe { result::set_current_context(&self.acl, self.context as sys::aclrtContext)? };
        }
        Ok(Bound { rt: self, previous: previous.filter(|&p| p != self.context), _thread: std::marker::PhantomData })
    }

    /// Whether a failed synchronisation tainted this runtime.
    pub fn tainted(&self) -> bool {
        self.tainted.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Allocates a device buffer of `bytes` bytes.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer> {
        let _bound = self.bind()?;
        // ACL rejects zero-byte allocations; keep one 32-byte block so every buffer has an address.
        let len = bytes.max(32);
        // SAFETY: the pointer is owned by the returned buffer and freed once, on drop.
        let ptr = unsafe { result::malloc(&self.acl, len)? };
        Ok(DeviceBuffer { rt: self.clone(), ptr, len })
    }

    /// Creates a stream on this device.
    pub fn stream(self: &Arc<Self>) -> Result<Stream> {
        let _bound = self.bind()?;
        let s = unsafe { result::create_stream(&self.acl)? };
        Ok(Stream { rt: self.clone(), raw: s })
    }

    /// Loads one kernel binary (all entries of one source file) for the cores `cores`.
    pub fn module(self: &Arc<Self>, cores: Cores, image: &[u8]) -> Result<Arc<Module>> {
        let _bound = self.bind()?;
        let handle = unsafe { result::binary_load(&self.acl, image, magic(cores))? };
        Ok(Arc::new(Module { rt: self.clone(), handle }))
    }
}

/// This runtime's context current on this thread (see [`AclRuntime::bind`]).
pub struct Bound<'r> {
    rt: &'r AclRuntime,
    previous: Option<usize>,
    _thread: std::marker::PhantomData<*const ()>,
}

impl Drop for Bound<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.previous {
            // SAFETY: a context ACL returned for this thread before the call.
            let _ = unsafe { result::set_current_context(&self.rt.acl, p as sys::aclrtContext) };
        }
    }
}

/// The binary magic `aclrtBinaryLoadFromData` needs for kernels of `cores`.
pub fn magic(cores: Cores) -> u32 {
    match cores {
        Cores::Vector => sys::ACL_RT_BINARY_MAGIC_ELF_VECTOR_CORE,
        Cores::Mix => sys::ACL_RT_BINARY_MAGIC_ELF_AICORE,
    }
}

/// Device memory, freed on drop.
pub struct DeviceBuffer {
    rt: Arc<AclRuntime>,
    ptr: *mut c_void,
    len: usize,
}

// SAFETY: device memory is not tied to a host thread; ACL calls are thread-safe per the docs.
unsafe impl Send for DeviceBuffer {}

impl DeviceBuffer {
    /// The buffer's device address.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
    /// Its length, in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Copies `src` into the buffer.
    pub fn upload(&mut self, src: &[u8]) -> Result<()> {
        assert!(src.len() <= self.len, "upload past the buffer");
        let _bound = self.rt.bind()?;
        unsafe { result::copy_to_device(&self.rt.acl, self.ptr, src) }
    }
    /// Sets every byte to zero.
    pub fn zero(&mut self) -> Result<()> {
        let _bound = self.rt.bind()?;
        unsafe { result::memset(&self.rt.acl, self.ptr, self.len, 0) }
    }
    /// Copies the buffer into `dst`.
    pub fn download(&self, dst: &mut [u8]) -> Result<()> {
        assert!(dst.len() <= self.len, "download past the buffer");
        let _bound = self.rt.bind()?;
        unsafe { result::copy_to_host(&self.rt.acl, dst, self.ptr) }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.rt.tainted() {
            return; // a kernel may still use it: leaked
        }
        let _bound = self.rt.bind();
        let _ = unsafe { result::free(&self.rt.acl, self.ptr) };
    }
}

/// A stream, destroyed on drop.
pub struct Stream {
    rt: Arc<AclRuntime>,
    raw: aclrtStream,
}

unsafe impl Send for Stream {}

impl Stream {
    /// Launches `module` on `block_dim` cores with `args` (device memory holding the arguments).
    pub fn launch(&self, f: &Function, block_dim: u32, args: &DeviceBuffer, args_size: usize) -> Result<()> {
        if self.rt.tainted() {
            return Err(Error::Poisoned {
                what: "the ACL runtime",
                detail: "an earlier stream synchronisation failed and its kernel may still be running; open a new \
                         backend"
                    .into(),
            });
        }
        let _bound = self.rt.bind()?;
        let acl = &self.rt.acl;
        unsafe { result::launch(acl, f.func, block_dim, args.ptr, args_size, self.raw) }
    }
    /// Waits for the stream, at most the runtime's sync timeout.
    pub fn synchronize(&self) -> Result<()> {
        let _bound = self.rt.bind()?;
        let r = unsafe { result::synchronize(&self.rt.acl, self.raw, self.rt.sync_timeout_ms) };
        if r.is_err() {
            self.rt.tainted.store(true, std::sync::atomic::Ordering::Release);
        }
        r
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.rt.tainted() {
            return; // destroying waits for the stream's tasks, which may never end: leaked
        }
        let _bound = self.rt.bind();
        let _ = unsafe { result::destroy_stream(&self.rt.acl, self.raw) };
    }
}

/// A loaded kernel binary.
pub struct Module {
    rt: Arc<AclRuntime>,
    handle: aclrtBinHandle,
}

unsafe impl Send for Module {}
unsafe impl Sync for Module {}

impl Module {
    /// The entry of `kernel` in this binary ([`Kernel::entry`]: `<symbol>_mix_aic` for mixed
    /// kernels; the bare symbol is tried second, in case a toolkit names them otherwise).
    pub fn function(self: &Arc<Self>, kernel: Kernel) -> Result<Function> {
        let entry = CString::new(kernel.entry()).expect("symbols have no NUL");
        let _bound = self.rt.bind()?;
        let func = match unsafe { result::get_function(&self.rt.acl, self.handle, &entry) } {
            Ok(f) => f,
            Err(e) if kernel.cores == Cores::Mix => {
                let bare = CString::new(kernel.symbol).expect("symbols have no NUL");
                unsafe { result::get_function(&self.rt.acl, self.handle, &bare) }.map_err(|_| e)?
            }
            Err(e) => return Err(e),
        };
        Ok(Function { func, kernel, _module: self.clone() })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if self.rt.tainted() {
            return; // its code may still be running: leaked
        }
        let _bound = self.rt.bind();
        let _ = unsafe { result::binary_unload(&self.rt.acl, self.handle) };
    }
}

/// One kernel entry; keeps its binary loaded.
pub struct Function {
    func: aclrtFuncHandle,
    /// The kernel this is.
    pub kernel: Kernel,
    _module: Arc<Module>,
}

unsafe impl Send for Function {}
unsafe impl Sync for Function {}

/// A stream shared by the backend's calls, one launch sequence at a time.
pub type SharedStream = Mutex<Stream>;

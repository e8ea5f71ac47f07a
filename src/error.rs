//! Typed errors. Every malformed call is answered with one of these before any kernel runs.

use crate::tensor::DType;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor's shape disagrees with the other arguments.
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape { what: &'static str, expected: String, got: Vec<usize> },

    /// A view's strides or buffer length cannot describe the tensor it claims to be.
    #[error("{what}: {detail}")]
    Layout { what: &'static str, detail: String },

    /// A size that must be positive is zero.
    #[error("{what} must be positive (got 0)")]
    ZeroSize { what: &'static str },

    /// `Hq % Hkv != 0` (or, for caches, `Hq % Hc != 0`).
    #[error("query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")]
    HeadGrouping { q_heads: usize, kv_heads: usize },

    /// `segment_size % block_size != 0`.
    #[error("segment_size ({segment_size}) must be a multiple of block_size ({block_size})")]
    SegmentNotBlockMultiple { segment_size: usize, block_size: usize },

    /// The backend has no kernel for this head dimension.
    #[error("head dim {head_dim} is not supported by the {backend} backend (supported: {supported})")]
    UnsupportedHeadDim { head_dim: usize, backend: &'static str, supported: String },

    /// The backend has no kernel for this element type.
    #[error("dtype {dtype} is not supported by the {backend} backend")]
    UnsupportedDType { dtype: DType, backend: &'static str },

    /// The backend runs this operation, and this dtype elsewhere, but not the two together.
    #[error("the {backend} backend has no {op} kernel for {dtype} (cast the inputs to f16 or bf16)")]
    UnsupportedOpDType { op: &'static str, dtype: DType, backend: &'static str },

    /// Two tensors of one call have different element types.
    #[error("{what} has dtype {got}, expected {expected} (all tensors of a call share one dtype)")]
    DTypeMismatch { what: &'static str, expected: DType, got: DType },

    /// A configuration value is NaN or infinite.
    #[error("config field `{field}` must be finite (got {value})")]
    NonFinite { field: &'static str, value: f64 },

    /// A configuration value is outside its allowed range.
    #[error("config field `{field}` = {value} is out of range: {reason}")]
    OutOfRange { field: &'static str, value: String, reason: String },

    /// A block list (user-built or damaged) breaks the sparse-attention contract.
    #[error("block list for (batch {batch}, kv head {head}, segment {segment}): {detail}")]
    BlockList { batch: usize, head: usize, segment: usize, detail: String },

    /// A plan or fusion state does not belong to these inputs.
    #[error("plan mismatch: {0}")]
    PlanMismatch(String),

    /// A cache length is outside `1..=capacity`.
    #[error("cache length {length} for (batch {batch}, head {head}) must be in 1..={capacity}")]
    CacheLength { batch: usize, head: usize, length: usize, capacity: usize },

    /// The observation window is used out of order.
    #[error("observation window: {0}")]
    Window(String),

    /// The requested backend cannot run in this process.
    #[error("backend `{backend}` is unavailable: {reason}")]
    BackendUnavailable { backend: &'static str, reason: String },

    /// `ENTROPY_KERNELS_BACKEND` or a `--backend` flag names no backend.
    #[error("unknown backend `{0}` (expected auto, cpu, reference, cuda, ascend or ascend-emu)")]
    UnknownBackend(String),

    /// A file in the conformance format is missing something or malformed.
    #[error("{path}: {detail}")]
    Format { path: String, detail: String },

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },

    /// The backend has no kernel for this operation yet.
    #[error("the {backend} backend has no {op} kernel yet")]
    Unimplemented { backend: &'static str, op: &'static str },

    /// An emulated kernel broke a rule the hardware would enforce (or misbehave on).
    #[error("emulated {kernel} kernel: {detail}")]
    Emulator { kernel: &'static str, detail: String },

    /// An AscendCL call failed: its `aclError` code and `aclGetRecentErrMsg`'s text.
    #[error("ACL call {call} failed with aclError {code}: {message}")]
    Acl { call: &'static str, code: i32, message: String },

    /// A buffer the call needs is larger than the address space or than the allocator grants
    /// (sizes that grow faster than the inputs: planning maps, AdaKV pools, oracle copies).
    #[error("cannot allocate {what}: {detail}")]
    Alloc { what: &'static str, detail: String },

    /// A device driver or runtime reported an error.
    #[error("{backend} driver error in {call}: {detail}")]
    Driver { backend: &'static str, call: &'static str, detail: String },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An `OutOfRange` error.
    pub fn range(field: &'static str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Error::OutOfRange { field, value: value.to_string(), reason: reason.into() }
    }
}

//! Typed errors. Every malformed call is answered with one of these before any kernel runs.

use crate::tensor::DType;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor's shape disagrees with the other arguments.
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape {
        /// The argument, e.g. `"k"`.
        what: &'static str,
        /// The shape the other arguments imply.
        expected: String,
        /// The shape passed.
        got: Vec<usize>,
    },

    /// A view's strides or buffer length cannot describe the tensor it claims to be.
    #[error("{what}: {detail}")]
    Layout {
        /// The argument.
        what: &'static str,
        /// What is wrong with its strides or length.
        detail: String,
    },

    /// A size that must be positive is zero.
    #[error("{what} must be positive (got 0)")]
    ZeroSize {
        /// The size that is zero.
        what: &'static str,
    },

    /// `Hq % Hkv != 0` (or, for caches, `Hq % Hc != 0`).
    #[error("query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")]
    HeadGrouping {
        /// Query heads.
        q_heads: usize,
        /// Key/value (or cache) heads.
        kv_heads: usize,
    },

    /// `segment_size % block_size != 0`.
    #[error("segment_size ({segment_size}) must be a multiple of block_size ({block_size})")]
    SegmentNotBlockMultiple {
        /// Segment size, in tokens.
        segment_size: usize,
        /// Block size, in tokens.
        block_size: usize,
    },

    /// The backend has no kernel for this head dimension.
    #[error("head dim {head_dim} is not supported by the {backend} backend (supported: {supported})")]
    UnsupportedHeadDim {
        /// The head dimension asked for.
        head_dim: usize,
        /// The backend's name.
        backend: &'static str,
        /// The head dimensions it supports, as text.
        supported: String,
    },

    /// The backend has no kernel for this element type.
    #[error("dtype {dtype} is not supported by the {backend} backend")]
    UnsupportedDType {
        /// The element type asked for.
        dtype: DType,
        /// The backend's name.
        backend: &'static str,
    },

    /// The backend runs this operation, and this dtype elsewhere, but not the two together.
    #[error("the {backend} backend has no {op} kernel for {dtype} (cast the inputs to f16 or bf16)")]
    UnsupportedOpDType {
        /// The operation.
        op: &'static str,
        /// The element type asked for.
        dtype: DType,
        /// The backend's name.
        backend: &'static str,
    },

    /// Two tensors of one call have different element types.
    #[error("{what} has dtype {got}, expected {expected} (all tensors of a call share one dtype)")]
    DTypeMismatch {
        /// The argument.
        what: &'static str,
        /// The call's element type.
        expected: DType,
        /// The argument's element type.
        got: DType,
    },

    /// A configuration value is NaN or infinite.
    #[error("config field `{field}` must be finite (got {value})")]
    NonFinite {
        /// The configuration field.
        field: &'static str,
        /// Its value.
        value: f64,
    },

    /// A configuration value is outside its allowed range.
    #[error("config field `{field}` = {value} is out of range: {reason}")]
    OutOfRange {
        /// The configuration field.
        field: &'static str,
        /// Its value, as text.
        value: String,
        /// The allowed range, or why it is refused.
        reason: String,
    },

    /// A block list (user-built or damaged) breaks the sparse-attention contract.
    #[error("block list for (batch {batch}, kv head {head}, segment {segment}): {detail}")]
    BlockList {
        /// Batch index.
        batch: usize,
        /// Key/value head index.
        head: usize,
        /// Segment index.
        segment: usize,
        /// The broken rule.
        detail: String,
    },

    /// A plan or fusion state does not belong to these inputs.
    #[error("plan mismatch: {0}")]
    PlanMismatch(String),

    /// A cache length is outside `1..=capacity`.
    #[error("cache length {length} for (batch {batch}, head {head}) must be in 1..={capacity}")]
    CacheLength {
        /// Batch index.
        batch: usize,
        /// Cache head index.
        head: usize,
        /// The length given, in tokens.
        length: usize,
        /// The cache capacity, in tokens.
        capacity: usize,
    },

    /// The observation window is used out of order.
    #[error("observation window: {0}")]
    Window(String),

    /// The requested backend cannot run in this process.
    #[error("backend `{backend}` is unavailable: {reason}")]
    BackendUnavailable {
        /// The backend's name.
        backend: &'static str,
        /// Why it cannot run.
        reason: String,
    },

    /// `ENTROPY_KERNELS_BACKEND` or a `--backend` flag names no backend.
    #[error("unknown backend `{0}` (expected auto, cpu, reference, cuda, ascend or ascend-emu)")]
    UnknownBackend(String),

    /// A file in the conformance format is missing something or malformed.
    #[error("{path}: {detail}")]
    Format {
        /// The file.
        path: String,
        /// What is missing or malformed.
        detail: String,
    },

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },

    /// The backend has no kernel for this operation yet.
    #[error("the {backend} backend has no {op} kernel yet")]
    Unimplemented {
        /// The backend's name.
        backend: &'static str,
        /// The operation.
        op: &'static str,
    },

    /// An emulated kernel broke a rule the hardware would enforce (or misbehave on).
    #[error("emulated {kernel} kernel: {detail}")]
    Emulator {
        /// The emulated kernel.
        kernel: &'static str,
        /// The rule it broke.
        detail: String,
    },

    /// An AscendCL call failed: its `aclError` code and `aclGetRecentErrMsg`'s text.
    #[error("ACL call {call} failed with aclError {code}: {message}")]
    Acl {
        /// The ACL function.
        call: &'static str,
        /// Its `aclError` code.
        code: i32,
        /// `aclGetRecentErrMsg`'s text.
        message: String,
    },

    /// A buffer the call needs is larger than the address space or than the allocator grants
    /// (sizes that grow faster than the inputs: planning maps, AdaKV pools, oracle copies).
    #[error("cannot allocate {what}: {detail}")]
    Alloc {
        /// The buffer.
        what: &'static str,
        /// Why it cannot be allocated.
        detail: String,
    },

    /// A device-resident object can no longer be used: a call that wrote it in place failed
    /// after its checks, so its contents are undefined (rebuild it).
    #[error("{what} is unusable: {detail}")]
    Poisoned {
        /// The object.
        what: &'static str,
        /// The call that failed and why.
        detail: String,
    },

    /// A device driver or runtime reported an error.
    #[error("{backend} driver error in {call}: {detail}")]
    Driver {
        /// The backend's name.
        backend: &'static str,
        /// The driver or runtime call.
        call: &'static str,
        /// The error it reported.
        detail: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An `OutOfRange` error.
    pub fn range(field: &'static str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Error::OutOfRange { field, value: value.to_string(), reason: reason.into() }
    }
}

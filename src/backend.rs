//! The backend trait, below every backend: what a backend is and can run. It imports none of
//! them; choosing one at run time lives with the front door ([`crate::selection`]).
//!
//! A backend receives only validated arguments (see [`crate::validate`]); [`crate::Kernels`] is
//! the front door that validates and dispatches.

use std::fmt;

use crate::compress::CompressedCache;
use crate::engine::{AttendArgs, ChunkArgs, KvCacheMut, Scores, SelectArgs, Selection, Workspace};
use crate::error::{Error, Result};
use crate::plan::{Plan, PlanState};
use crate::tensor::{DType, TensorView, TensorViewMut};
use crate::validate::{AttentionArgs, CompressArgs, DecodeArgs, PlanArgs};

/// The backends this crate knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Fast CPU backend (tiled, SIMD, multi-threaded).
    Cpu,
    /// The naive f64 oracle: slow, obviously correct.
    Reference,
    /// NVIDIA GPUs (feature `cuda`).
    Cuda,
    /// Huawei Ascend NPUs (feature `ascend`).
    Ascend,
    /// The Ascend C kernels on the host emulator (feature `ascend-emu`; never chosen by `auto`).
    AscendEmu,
}

impl BackendKind {
    /// Every backend kind.
    pub const ALL: [BackendKind; 5] =
        [BackendKind::Cpu, BackendKind::Reference, BackendKind::Cuda, BackendKind::Ascend, BackendKind::AscendEmu];

    /// The backend's name, as `ENTROPY_KERNELS_BACKEND` spells it.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Reference => "reference",
            BackendKind::Cuda => "cuda",
            BackendKind::Ascend => "ascend",
            BackendKind::AscendEmu => "ascend-emu",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A backend request: a specific kind, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// The first available backend.
    Auto,
    /// This backend.
    Kind(BackendKind),
}

impl std::str::FromStr for BackendChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(BackendChoice::Auto),
            "cpu" => Ok(BackendChoice::Kind(BackendKind::Cpu)),
            "reference" | "ref" | "oracle" => Ok(BackendChoice::Kind(BackendKind::Reference)),
            "cuda" | "gpu" => Ok(BackendChoice::Kind(BackendKind::Cuda)),
            "ascend" | "npu" => Ok(BackendChoice::Kind(BackendKind::Ascend)),
            "ascend-emu" | "ascend_emu" => Ok(BackendChoice::Kind(BackendKind::AscendEmu)),
            _ => Err(Error::UnknownBackend(s.to_string())),
        }
    }
}

/// Head dimensions a backend has kernels for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadDims {
    /// Any head dim from 1 to this bound.
    UpTo(usize),
    /// Exactly these.
    List(Vec<usize>),
}

/// What a backend can run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// The backend's name.
    pub backend: &'static str,
    /// The element types it runs.
    pub dtypes: Vec<DType>,
    /// The head dimensions it runs.
    pub head_dims: HeadDims,
    /// Operations with kernels; the others answer `Error::Unimplemented`.
    pub ops: Vec<Op>,
    /// `(op, dtype)` pairs without a kernel although both are supported on their own (the
    /// Ascend cube prefill takes f16/bf16 only); calls answer `Error::UnsupportedOpDType`.
    pub excluded: Vec<(Op, DType)>,
    /// Whether the kernels read input views whose rows overlap: a stride below the head dim (a
    /// broadcast's zero stride included) along a dim longer than 1. Kernels that move rows with
    /// strided copies (Ascend's `DataCopyPad`) need every such stride to be at least D; calls
    /// that break it answer `Error::Layout`.
    pub overlapping_rows: bool,
    /// Input dtypes whose attention rounds the probabilities P to that dtype before `P·V`
    /// (tensor cores, Ascend cube units, the CPU's AMX / `VDPBF16PS` tiles); the others multiply
    /// `P·V` in f32. What accuracy to expect: P's rounding is the dtype's, on top of the inputs'.
    pub low_precision_pv: Vec<DType>,
}

/// The operations of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Block-sparse planning (SPEC §2).
    Plan,
    /// Sparse prefill attention (SPEC §3).
    Prefill,
    /// KV-cache compression (SPEC §4).
    KvCompress,
    /// Decode attention over a cache.
    Decode,
    /// Attention over a (paged or contiguous) cache with ragged queries (SPEC §7.4).
    Attend,
    /// Chunked / ragged planning over a cache (SPEC §7.2).
    PlanChunks,
    /// Selection for in-place compression over a cache (SPEC §7.5).
    Select,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 7] =
        [Op::Plan, Op::Prefill, Op::KvCompress, Op::Decode, Op::Attend, Op::PlanChunks, Op::Select];
    /// The one-request operations on contiguous tensors (what the device backends run so far).
    pub const CONTIGUOUS: [Op; 4] = [Op::Plan, Op::Prefill, Op::KvCompress, Op::Decode];
}

impl Capabilities {
    /// Every operation, for the given dtypes and head dims.
    pub fn full(backend: &'static str, head_dims: HeadDims) -> Self {
        Capabilities {
            backend,
            dtypes: DType::ALL.to_vec(),
            head_dims,
            ops: Op::ALL.to_vec(),
            excluded: Vec::new(),
            overlapping_rows: true,
            low_precision_pv: Vec::new(),
        }
    }
    /// Whether the backend runs `op`.
    pub fn supports(&self, op: Op) -> bool {
        self.ops.contains(&op)
    }
    /// Whether `op` runs on `dtype` inputs.
    pub fn supports_op_dtype(&self, op: Op, dtype: DType) -> bool {
        self.supports(op) && self.dtypes.contains(&dtype) && !self.excluded.contains(&(op, dtype))
    }
    /// Whether the backend runs head dimension `d`.
    pub fn supports_head_dim(&self, d: usize) -> bool {
        match &self.head_dims {
            HeadDims::UpTo(max) => (1..=*max).contains(&d),
            HeadDims::List(l) => l.contains(&d),
        }
    }
    /// The supported head dimensions, as text.
    pub fn head_dims_text(&self) -> String {
        match &self.head_dims {
            HeadDims::UpTo(max) => format!("1..={max}"),
            HeadDims::List(l) => format!("{l:?}"),
        }
    }
}

/// One implementation of every operation of SPEC.md. Object-safe; arguments arrive validated.
pub trait Backend: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// Human-readable description (device, ISA, threads).
    fn describe(&self) -> String;
    /// What it supports.
    fn capabilities(&self) -> &Capabilities;
    /// SPEC §2.
    fn plan(&self, args: &PlanArgs<'_>) -> Result<Plan>;
    /// SPEC §3 (dense when `args.blocks()` is `None`). `lse` is `[B, Hq, L]` natural-log
    /// sum-exp of the scaled scores.
    fn attention(&self, args: &AttentionArgs<'_>, out: &mut TensorViewMut<'_>, lse: Option<&mut [f32]>) -> Result<()>;
    /// SPEC §4.
    fn kv_compress(&self, args: &CompressArgs<'_>) -> Result<CompressedCache>;
    /// Attention of a few new queries over compacted caches with per-head lengths.
    fn decode_attention(&self, args: &DecodeArgs<'_>, out: &mut TensorViewMut<'_>) -> Result<()>;
    /// Attention of ragged queries over a (paged or contiguous) cache, bottom-right causal, with
    /// optional per-sequence block plans (SPEC §7.4). `out` is `[1, T, Hq, D]`, `lse` `[T, Hq]`.
    fn attend(
        &self,
        args: &AttendArgs<'_>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut [f32]>,
        ws: &mut Workspace,
    ) -> Result<()> {
        let _ = (args, out, lse, ws);
        Err(Error::Unimplemented { backend: self.capabilities().backend, op: "attend" })
    }
    /// Plans each sequence's chunk (SPEC §7.2) and advances `states` (`[sequences, Hkv]`): one
    /// plan per sequence, of the whole prompt's dims, with the chunk's segments filled.
    fn plan_chunks(&self, args: &ChunkArgs<'_>, states: &mut [PlanState]) -> Result<Vec<Plan>> {
        let _ = (args, states);
        Err(Error::Unimplemented { backend: self.capabilities().backend, op: "plan_chunks" })
    }
    /// SPEC §4 steps 1–5 per compressing sequence of a cache: the positions each head keeps.
    fn select(&self, args: &SelectArgs<'_>) -> Result<Selection> {
        let _ = args;
        Err(Error::Unimplemented { backend: self.capabilities().backend, op: "select" })
    }
    /// SPEC §4 steps 1–4 per compressing sequence: the pooled score rows selection ranks.
    fn kv_scores(&self, args: &SelectArgs<'_>) -> Result<Scores> {
        let _ = args;
        Err(Error::Unimplemented { backend: self.capabilities().backend, op: "kv_scores" })
    }
    /// SPEC §7.4's row copies of a checked append: sequence i's rows `cu[i]..cu[i+1]` of `k_new`
    /// / `v_new` to its cache heads at their lengths (the lengths are the caller's). On the host
    /// unless a backend has a kernel for it.
    fn append_rows(
        &self,
        k_new: &TensorView<'_>,
        v_new: &TensorView<'_>,
        cu: &[u32],
        cache: &mut KvCacheMut<'_>,
    ) -> Result<()> {
        crate::engine::append::copy_rows_on_host(k_new, v_new, cu, cache);
        Ok(())
    }
    /// SPEC §7.5's moves of a checked compaction: each compressed head's kept entries to its
    /// first entries, in place (the lengths are the caller's). On the host unless a backend has
    /// a kernel for it.
    fn compact(&self, cache: &mut KvCacheMut<'_>, sel: &Selection) -> Result<()> {
        crate::engine::compaction::move_on_host(cache, sel);
        Ok(())
    }
}

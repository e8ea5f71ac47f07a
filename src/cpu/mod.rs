//! The fast CPU backend: tiled online-softmax attention vectorised over query rows (AVX-512,
//! AVX2+FMA or portable code, chosen at run time), rayon over all cores, GQA by stacking a
//! group's query heads over shared K/V rows, f16/bf16 widened on the fly, no L×L buffer; bf16
//! attention on AMX tiles where the CPU has them (`amx`).

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
mod compress;
mod engine;
mod engine_split;
mod micro;
mod one_shot;
pub(crate) mod plan;
mod plan_logits;
mod plan_reps;
pub(crate) mod simd;
mod simd_f64;
mod tile;

use crate::backend::{Backend, BackendKind, Capabilities, HeadDims};
use crate::compress::CompressedCache;
use crate::error::Result;
use crate::plan::Plan;
use crate::tensor::{DType, Element, TensorView, TensorViewMut};
use crate::validate::{AttentionArgs, CompressArgs, DecodeArgs, PlanArgs};
use half::{bf16, f16};
pub use simd::Isa;

/// Largest head dim of the CPU kernels (scratch is sized per call; the bound keeps tiles in L2).
pub const MAX_HEAD_DIM: usize = 512;

/// A raw pointer that work items share; each item writes a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
// SAFETY: only used for writes to disjoint regions, coordinated by the work decomposition.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    #[inline(always)]
    pub fn ptr(self) -> *mut T {
        self.0
    }
}

/// A typed strided input: rows of D contiguous elements at `i0·s0 + i1·s1 + i2·s2`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a, E> {
    pub data: &'a [E],
    pub strides: [usize; 4],
}

impl<'a, E: Element> Strided<'a, E> {
    pub fn of(v: &TensorView<'a>) -> Self {
        Strided { data: v.typed::<E>().expect("dtype checked by validation"), strides: v.strides() }
    }

    /// The `d` elements at `[i0, i1, i2, ..]`.
    #[inline(always)]
    pub fn row(&self, i0: usize, i1: usize, i2: usize, d: usize) -> &'a [E] {
        let o = i0 * self.strides[0] + i1 * self.strides[1] + i2 * self.strides[2];
        &self.data[o..o + d]
    }

    /// Rows along dim 1 (tokens of BSND, fixed batch and head) or dim 2 (entries of a cache).
    pub fn rows(&self, i0: usize, fixed: usize, along: usize) -> tile::Rows<'a, E> {
        let (fixed_dim, along_dim) = if along == 1 { (2, 1) } else { (1, 2) };
        tile::Rows {
            data: self.data,
            base: i0 * self.strides[0] + fixed * self.strides[fixed_dim],
            stride: self.strides[along_dim],
            paging: None,
        }
    }
}

/// Runs `$f::<E>(...)` with `E` the element type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
        }
    };
}

/// The fast CPU backend.
#[derive(Debug)]
pub struct CpuBackend {
    caps: Capabilities,
    isa: Isa,
}

impl CpuBackend {
    /// Detects the ISA (`ENTROPY_KERNELS_CPU_ISA=avx512bf16|avx512|avx2|portable` caps it).
    pub fn new() -> Self {
        Self::with_isa(Isa::detect())
    }

    /// A backend pinned to `isa`, or to the portable kernels where this CPU lacks it.
    pub fn with_isa(isa: Isa) -> Self {
        let isa = if isa.supported() { isa } else { Isa::Portable };
        let mut caps = Capabilities::full("cpu", HeadDims::UpTo(MAX_HEAD_DIM));
        if isa.bf16_probabilities() {
            caps.low_precision_pv = vec![DType::BF16];
        }
        CpuBackend { caps, isa }
    }

    /// The instruction set the kernels use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    fn lanes(&self) -> usize {
        match self.isa {
            Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512 => 16,
            _ => 8,
        }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

fn plan_e<E: Element>(isa: Isa, a: &PlanArgs<'_>) -> Result<Plan> {
    plan::plan::<E>(isa, a)
}
fn attention_e<E: Element>(
    isa: Isa,
    lanes: usize,
    a: &AttentionArgs<'_>,
    out: &mut TensorViewMut<'_>,
    lse: Option<&mut [f32]>,
) {
    one_shot::prefill::<E>(isa, lanes, a, out, lse)
}
fn compress_e<E: Element>(isa: Isa, lanes: usize, a: &CompressArgs<'_>) -> Result<CompressedCache> {
    compress::kv_compress::<E>(isa, lanes, a)
}
fn attend_e<E: Element>(
    isa: Isa,
    lanes: usize,
    a: &crate::engine::AttendArgs<'_>,
    out: &mut TensorViewMut<'_>,
    lse: Option<&mut [f32]>,
    ws: &mut crate::engine::Workspace,
) {
    engine::attend::<E>(isa, lanes, a, out, lse, ws)
}
fn plan_chunks_e<E: Element>(
    isa: Isa,
    a: &crate::engine::ChunkArgs<'_>,
    states: &mut [crate::plan::PlanState],
) -> Result<Vec<Plan>> {
    plan::plan_chunks::<E>(isa, a, states)
}
fn scores_e<E: Element>(isa: Isa, lanes: usize, a: &crate::engine::SelectArgs<'_>) -> Result<crate::engine::Scores> {
    compress::scores::<E>(isa, lanes, a)
}
fn decode_e<E: Element>(isa: Isa, lanes: usize, a: &DecodeArgs<'_>, out: &mut TensorViewMut<'_>) {
    one_shot::decode::<E>(isa, lanes, a, out)
}

impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }
    fn describe(&self) -> String {
        format!("cpu ({}, {} threads)", self.isa.name(), rayon::current_num_threads())
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    fn plan(&self, a: &PlanArgs<'_>) -> Result<Plan> {
        by_dtype!(a.q().dtype(), plan_e(self.isa, a))
    }
    fn attention(&self, a: &AttentionArgs<'_>, out: &mut TensorViewMut<'_>, lse: Option<&mut [f32]>) -> Result<()> {
        by_dtype!(a.q().dtype(), attention_e(self.isa, self.lanes(), a, out, lse));
        Ok(())
    }
    fn kv_compress(&self, a: &CompressArgs<'_>) -> Result<CompressedCache> {
        by_dtype!(a.k_cache().dtype(), compress_e(self.isa, self.lanes(), a))
    }
    fn decode_attention(&self, a: &DecodeArgs<'_>, out: &mut TensorViewMut<'_>) -> Result<()> {
        by_dtype!(a.q().dtype(), decode_e(self.isa, self.lanes(), a, out));
        Ok(())
    }
    fn attend(
        &self,
        a: &crate::engine::AttendArgs<'_>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut [f32]>,
        ws: &mut crate::engine::Workspace,
    ) -> Result<()> {
        by_dtype!(a.q().dtype(), attend_e(self.isa, self.lanes(), a, out, lse, ws));
        Ok(())
    }
    fn plan_chunks(
        &self,
        a: &crate::engine::ChunkArgs<'_>,
        states: &mut [crate::plan::PlanState],
    ) -> Result<Vec<Plan>> {
        by_dtype!(a.q().dtype(), plan_chunks_e(self.isa, a, states))
    }
    fn select(&self, a: &crate::engine::SelectArgs<'_>) -> Result<crate::engine::Selection> {
        self.kv_scores(a)?.select(a.cfg())
    }
    fn kv_scores(&self, a: &crate::engine::SelectArgs<'_>) -> Result<crate::engine::Scores> {
        by_dtype!(a.cache().dtype(), scores_e(self.isa, self.lanes(), a))
    }
}

//! The oracle: SPEC.md transcribed as naive f64 loops, with no tiling, no SIMD and no shared
//! decision code. Slow on purpose; every other backend is tested against it.
// Index loops mirror the spec's subscripts.
#![allow(clippy::needless_range_loop)]

mod attention;
mod compress;
pub mod engine;
mod plan;

pub use attention::{attention, decode_attention};
pub use compress::{compress_scores, kv_compress};
pub use plan::plan;

use crate::backend::{Backend, BackendKind, Capabilities, HeadDims};
use crate::compress::CompressedCache;
use crate::error::Result;
use crate::numerics::{LogitPrecision, dot32};
use crate::plan::Plan;
use crate::tensor::{TensorView, TensorViewMut};
use crate::validate::{AttentionArgs, CompressArgs, DecodeArgs, PlanArgs};

/// A rank-4 tensor copied to contiguous f64.
pub struct F64Tensor {
    /// The elements.
    pub data: Vec<f64>,
    /// The shape.
    pub shape: [usize; 4],
}

impl F64Tensor {
    /// The view's elements widened to f64, contiguous.
    ///
    /// # Panics
    /// If the copy cannot be allocated ([`F64Tensor::try_of`] says so instead).
    pub fn of(view: &TensorView<'_>) -> Self {
        Self::try_of(view).expect("F64Tensor::of: allocation")
    }

    /// [`F64Tensor::of`], with an allocation failure as `Error::Alloc`.
    pub fn try_of(view: &TensorView<'_>) -> Result<Self> {
        let s = view.shape();
        let mut data =
            crate::alloc::with_capacity("the oracle's f64 copy of an input", crate::alloc::count("an input", &s)?)?;
        for a in 0..s[0] {
            for b in 0..s[1] {
                for c in 0..s[2] {
                    for d in 0..s[3] {
                        data.push(view.get([a, b, c, d]));
                    }
                }
            }
        }
        Ok(F64Tensor { data, shape: s })
    }

    /// Zeros of `shape`, fallibly.
    pub fn zeros(shape: [usize; 4]) -> Result<Self> {
        Ok(F64Tensor { data: crate::alloc::grid("the oracle's f64 output", &shape, 0.0)?, shape })
    }
    /// The innermost row at `[a, b, c, :]`.
    pub fn row(&self, a: usize, b: usize, c: usize) -> &[f64] {
        let d = self.shape[3];
        let o = ((a * self.shape[1] + b) * self.shape[2] + c) * d;
        &self.data[o..o + d]
    }
}

pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// SPEC §2.2's `(qmax·key + qmin·key)/2` for one key representative, in the precision
/// `numerics::LogitPrecision` sets: f64 for f32 inputs; for 16-bit inputs `numerics::dot32` of
/// `qmax + qmin` rounded to f32 once (the sum of two f32 values is exact in f64).
pub(crate) fn half_logit(precision: LogitPrecision, qmax: &[f64], qmin: &[f64], key: &[f64]) -> f64 {
    match precision {
        LogitPrecision::F64 => (dot(qmax, key) + dot(qmin, key)) / 2.0,
        LogitPrecision::F32 => {
            let row: Vec<f32> = qmax.iter().zip(qmin).map(|(x, n)| (x + n) as f32).collect();
            let key: Vec<f32> = key.iter().map(|&x| x as f32).collect();
            f64::from(dot32(&row, &key)) / 2.0
        }
    }
}

/// The oracle as a backend (`ENTROPY_KERNELS_BACKEND=reference`).
#[derive(Debug)]
pub struct ReferenceBackend {
    caps: Capabilities,
}

impl ReferenceBackend {
    /// The reference backend.
    pub fn new() -> Self {
        ReferenceBackend { caps: Capabilities::full("reference", HeadDims::UpTo(1024)) }
    }
}

impl Default for ReferenceBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for ReferenceBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Reference
    }
    fn describe(&self) -> String {
        "reference (naive f64 oracle, single thread)".into()
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    fn plan(&self, args: &PlanArgs<'_>) -> Result<Plan> {
        plan(args)
    }
    fn attention(&self, args: &AttentionArgs<'_>, out: &mut TensorViewMut<'_>, lse: Option<&mut [f32]>) -> Result<()> {
        let (o, l) = attention(args)?;
        write_bsnd(&o, out);
        if let Some(lse) = lse {
            for (dst, src) in lse.iter_mut().zip(&l) {
                *dst = *src as f32;
            }
        }
        Ok(())
    }
    fn kv_compress(&self, args: &CompressArgs<'_>) -> Result<CompressedCache> {
        kv_compress(args)
    }
    fn decode_attention(&self, args: &DecodeArgs<'_>, out: &mut TensorViewMut<'_>) -> Result<()> {
        write_bsnd(&decode_attention(args)?, out);
        Ok(())
    }
    fn attend(
        &self,
        args: &crate::engine::AttendArgs<'_>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut [f32]>,
        _ws: &mut crate::engine::Workspace,
    ) -> Result<()> {
        engine::attend(args, out, lse)
    }
    fn plan_chunks(
        &self,
        args: &crate::engine::ChunkArgs<'_>,
        states: &mut [crate::plan::PlanState],
    ) -> Result<Vec<Plan>> {
        engine::plan_chunks(args, states)
    }
    fn select(&self, args: &crate::engine::SelectArgs<'_>) -> Result<crate::engine::Selection> {
        engine::select(args)
    }
    fn kv_scores(&self, args: &crate::engine::SelectArgs<'_>) -> Result<crate::engine::Scores> {
        engine::kv_scores(args)
    }
}

/// Writes a contiguous f64 tensor of `out`'s shape into `out`, rounding once.
fn write_bsnd(src: &F64Tensor, out: &mut TensorViewMut<'_>) {
    let s = src.shape;
    for a in 0..s[0] {
        for b in 0..s[1] {
            for c in 0..s[2] {
                for (d, &x) in src.row(a, b, c).iter().enumerate() {
                    out.set([a, b, c, d], x);
                }
            }
        }
    }
}

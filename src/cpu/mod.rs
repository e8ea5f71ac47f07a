//! Fast CPU backend (placeholder while it is written).
use crate::backend::{Backend, BackendKind, Capabilities, HeadDims};
use crate::compress::CompressedCache;
use crate::error::Result;
use crate::plan::Plan;
use crate::tensor::{DType, TensorViewMut};
use crate::validate::{AttentionArgs, CompressArgs, DecodeArgs, PlanArgs};

pub struct CpuBackend { caps: Capabilities }
impl CpuBackend { pub fn new() -> Self { CpuBackend { caps: Capabilities { backend: "cpu", dtypes: DType::ALL.to_vec(), head_dims: HeadDims::UpTo(256) } } } }
impl Default for CpuBackend { fn default() -> Self { Self::new() } }
impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind { BackendKind::Cpu }
    fn describe(&self) -> String { "cpu".into() }
    fn capabilities(&self) -> &Capabilities { &self.caps }
    fn plan(&self, args: &PlanArgs<'_>) -> Result<Plan> { crate::reference::ReferenceBackend::new().plan(args) }
    fn attention(&self, args: &AttentionArgs<'_>, out: &mut TensorViewMut<'_>, lse: Option<&mut [f32]>) -> Result<()> { crate::reference::ReferenceBackend::new().attention(args, out, lse) }
    fn kv_compress(&self, args: &CompressArgs<'_>) -> Result<CompressedCache> { crate::reference::ReferenceBackend::new().kv_compress(args) }
    fn decode_attention(&self, args: &DecodeArgs<'_>, out: &mut TensorViewMut<'_>) -> Result<()> { crate::reference::ReferenceBackend::new().decode_attention(args, out) }
}

//! # entropy-kernels
//!
//! Kernels for EntropyInfer: entropy-guided, per-head, per-segment sparse FlashAttention prefill,
//! and "latent" KV-cache compression scored with the queries of the first generated tokens.
//! `SPEC.md`'s contract is implemented by every backend: a naive f64 oracle ([`reference`](mod@reference)), a
//! fast CPU backend ([`cpu`]), and CUDA / Ascend backends behind features.
//!
//! ```
//! use entropy_kernels::{EntropyConfig, Kernels, PlanRequest, TensorView, TensorViewMut};
//!
//! let (b, l, hq, hkv, d) = (1, 300, 4, 2, 64);
//! let q = vec![0.01f32; b * l * hq * d];
//! let k = vec![0.02f32; b * l * hkv * d];
//! let v = vec![0.03f32; b * l * hkv * d];
//! let mut out = vec![f32::NAN; q.len()];
//!
//! let cfg = EntropyConfig { segment_size: 64, block_size: 8, threshold_len: 128, base_budget: 64, ..Default::default() };
//! let kernels = Kernels::auto()?; // CUDA, else Ascend, else CPU; ENTROPY_KERNELS_BACKEND overrides
//! let plan = kernels.prefill(
//!     TensorView::new(&q, [b, l, hq, d]),
//!     TensorView::new(&k, [b, l, hkv, d]),
//!     TensorView::new(&v, [b, l, hkv, d]),
//!     &cfg,
//!     &PlanRequest::layer(0),
//!     &mut TensorViewMut::new(&mut out, [b, l, hq, d]),
//!     None,
//! )?;
//! assert!(out.iter().all(|x| x.is_finite()));
//! println!("kept {:.0}% of the causal pairs", 100.0 * plan.blocks.kept_fraction());
//! # Ok::<(), entropy_kernels::Error>(())
//! ```

#![warn(missing_docs)]

pub(crate) mod alloc;
pub mod ascend;
pub mod backend;
#[cfg(feature = "candle")]
pub mod candle;
pub mod compress;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod io;
pub mod kernels;
pub mod numerics;
pub mod plan;
pub mod reference;
pub mod selection;
pub mod shapes;
pub mod synth;
pub mod tensor;
pub mod validate;
pub mod window;

pub use backend::{Backend, BackendChoice, BackendKind, Capabilities, HeadDims, Op};
pub use compress::CompressedCache;
pub use config::{
    BudgetMode, BudgetPolicy, Config, DecodeConfig, EntropyConfig, GqaMode, HeadBudget, HeadClassMode, Pooling,
};
pub use engine::{BlockTable, ChunkRequest, KvCache, KvCacheMut, PageLayout, PagedCache, Selection, Workspace};
pub use error::{Error, Result};
pub use kernels::{Kernels, PlanRequest};
pub use plan::{BlockLists, HeadClass, Plan, PlanDims, PlanState, SegmentAttention};
pub use tensor::{DType, Element, HostBuffer, HostData, HostDataMut, HostTensor, TensorView, TensorViewMut};
pub use window::{ObservationWindow, WindowEvent};

/// SPEC.md, the contract every backend implements (`docs/SPEC.md` in the package); the docs'
/// "SPEC §x" references point here.
pub mod spec {
    #![doc = include_str!("../docs/SPEC.md")]
}

/// The README's example is compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

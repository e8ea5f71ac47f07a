//! Named attention shapes of the models this crate serves, for `demo`, `bench` and the tests.
//!
//! openPangu, the model family the Ascend backend is for (model cards of openPangu-Embedded-1B
//! and -7B-V1.1): GQA 12/6 and 32/8. Their head dim is hidden size / query heads — 1536 / 12 and
//! 4096 / 32, both 128 (the cards give the hidden size and head counts; the dense model's config
//! class has no separate head_dim) — and both take 32K tokens natively.

use crate::error::{Error, Result};

/// One model's attention shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelShape {
    /// The model's name.
    pub name: &'static str,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension, in elements.
    pub head_dim: usize,
    /// Native context length in tokens.
    pub context: usize,
}

/// openPangu-Embedded-1B.
pub const OPENPANGU_EMBEDDED_1B: ModelShape =
    ModelShape { name: "openpangu-1b", q_heads: 12, kv_heads: 6, head_dim: 128, context: 32768 };
/// openPangu-Embedded-7B.
pub const OPENPANGU_EMBEDDED_7B: ModelShape =
    ModelShape { name: "openpangu-7b", q_heads: 32, kv_heads: 8, head_dim: 128, context: 32768 };

/// Every named shape.
pub const MODELS: [ModelShape; 2] = [OPENPANGU_EMBEDDED_1B, OPENPANGU_EMBEDDED_7B];

impl ModelShape {
    /// The shape called `name` (see [`MODELS`]).
    pub fn by_name(name: &str) -> Result<Self> {
        MODELS.iter().copied().find(|m| m.name == name).ok_or_else(|| {
            let names: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
            Error::range("model", name, format!("expected one of {}", names.join(", ")))
        })
    }
}

//! Configuration of prefill planning (SPEC §1–§3) and decode compression (SPEC §4), with the
//! paper's defaults, presets for the baselines, JSON load/save and validation.
//!
//! The JSON form is the one the conformance files carry in their `config` metadata: one flat
//! object holding both the prefill and the decode fields ([`Config`]).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest `segment_size`: segment and block counts are 32-bit (block indices, device parameters).
pub const MAX_SEGMENT_SIZE: usize = i32::MAX as usize;

/// The segmentation rules a config and a plan's block lists share (errors name `names`, the
/// segment size's field then the block size's): both nonzero, segments of at most
/// [`MAX_SEGMENT_SIZE`] tokens, a whole number of blocks per segment.
pub(crate) fn check_segmentation(segment_size: usize, block_size: usize, names: [&'static str; 2]) -> Result<()> {
    if segment_size == 0 {
        return Err(Error::ZeroSize { what: names[0] });
    }
    if block_size == 0 {
        return Err(Error::ZeroSize { what: names[1] });
    }
    if segment_size > MAX_SEGMENT_SIZE {
        return Err(Error::range(names[0], segment_size, format!("must be at most {MAX_SEGMENT_SIZE}")));
    }
    if !segment_size.is_multiple_of(block_size) {
        return Err(Error::SegmentNotBlockMultiple { segment_size, block_size });
    }
    Ok(())
}

/// Largest `pooling_kernel`: it sizes the pooling work per entry and the devices' padding (SnapKV
/// and the paper use 5 to 7).
pub const MAX_POOLING_KERNEL: usize = 4095;

/// How the per-head budgets of a segment become block counts (SPEC §2.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BudgetMode {
    /// Each kv head keeps its own number of blocks (the method as described).
    #[default]
    PerHead,
    /// Every head of a segment keeps the segment's largest count (what the reference code runs).
    SegmentMax,
}

/// Where budgets come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPolicy {
    /// EntropyInfer: rigid heads keep `base`, dynamic heads follow the entropy recurrence.
    #[default]
    Entropy,
    /// CritiPrefill: every head and segment keeps `base` tokens; no head classes.
    Fixed,
}

/// When a kv head's class is decided (SPEC §2.7, §7.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HeadClassMode {
    /// Over the whole prompt: rigid iff the entropy is below `e_t` at every segment ≥ 1 (SPEC
    /// §2.7). Needs every segment at once, so one-shot calls only.
    #[default]
    Prompt,
    /// Causally: at segment s a head is rigid iff it was below `e_t` at every segment `1..=s`;
    /// from its first dynamic segment on the budget recurrence runs from the budget it had while
    /// rigid (SPEC §7.2). What chunked prefill needs; equal to `Prompt` wherever no head changes
    /// class after segment 1.
    Streaming,
}

/// Prefill configuration (SPEC §1, first half).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EntropyConfig {
    /// Queries are processed in segments of this many tokens (S).
    pub segment_size: usize,
    /// Keys are scored and selected in blocks of this many tokens (Bk); `S % Bk == 0`.
    pub block_size: usize,
    /// Segments starting before this position use dense attention (T).
    pub threshold_len: usize,
    /// Base budget in tokens; every budget lies in `[base, 3·base]`.
    pub base_budget: usize,
    /// Entropy below which a head counts as rigid.
    pub e_t: f32,
    /// Relative entropy rise that leaves the budget unchanged.
    pub delta_t: f32,
    /// Budget step per unit of relative entropy rise, in units of base.
    pub alpha: f32,
    /// Entropies below this count as the floor in the budget ratio (SPEC §2.8).
    pub entropy_floor: f32,
    /// Blend the previous layer's block distribution in (weight 0.25) from layer 2 on.
    pub layer_fusion: bool,
    /// How budgets are sized.
    pub budget_mode: BudgetMode,
    /// How budgets are shared among heads.
    pub budget_policy: BudgetPolicy,
    /// How head classes are decided: over the whole prompt or causally (chunked prefill).
    pub head_class: HeadClassMode,
    /// Softmax scale of the attention; `None` = `1/sqrt(D)`.
    pub scale: Option<f32>,
}

impl Default for EntropyConfig {
    fn default() -> Self {
        EntropyConfig {
            segment_size: 512,
            block_size: 8,
            threshold_len: 4096,
            base_budget: 2048,
            e_t: 1e-5,
            delta_t: 0.4,
            alpha: 0.5,
            entropy_floor: 1e-6,
            layer_fusion: false,
            budget_mode: BudgetMode::PerHead,
            budget_policy: BudgetPolicy::Entropy,
            head_class: HeadClassMode::Prompt,
            scale: None,
        }
    }
}

impl EntropyConfig {
    /// EntropyInfer with the paper's defaults.
    pub fn entropy_infer() -> Self {
        Self::default()
    }

    /// Dense FlashAttention: the threshold is beyond any sequence, so no segment is sparse.
    pub fn dense() -> Self {
        EntropyConfig { threshold_len: usize::MAX, ..Self::default() }
    }

    /// CritiPrefill: a fixed budget of `budget` tokens for every head and segment.
    pub fn criti_prefill(budget: usize) -> Self {
        EntropyConfig { base_budget: budget, budget_policy: BudgetPolicy::Fixed, ..Self::default() }
    }

    /// Blocks per segment (`S / Bk`).
    pub fn blocks_per_segment(&self) -> usize {
        self.segment_size / self.block_size
    }

    /// Checks every field (SPEC §6).
    pub fn validate(&self) -> Result<()> {
        check_segmentation(self.segment_size, self.block_size, ["segment_size", "block_size"])?;
        if self.base_budget == 0 {
            return Err(Error::ZeroSize { what: "base_budget" });
        }
        if self.base_budget > (u32::MAX as usize) / 3 {
            return Err(Error::range("base_budget", self.base_budget, "3·base must fit in 32 bits"));
        }
        // Budgets are computed in f32: beyond 2^24 tokens they stop being exact integers.
        if self.base_budget * 3 > 1 << 24 {
            return Err(Error::range("base_budget", self.base_budget, "3·base must be at most 2^24 tokens"));
        }
        for (field, v) in
            [("e_t", self.e_t), ("delta_t", self.delta_t), ("alpha", self.alpha), ("entropy_floor", self.entropy_floor)]
        {
            if !v.is_finite() {
                return Err(Error::NonFinite { field, value: v as f64 });
            }
            if v < 0.0 {
                return Err(Error::range(field, v, "must be non-negative"));
            }
        }
        check_scale(self.scale)
    }
}

pub(crate) fn check_scale(scale: Option<f32>) -> Result<()> {
    match scale {
        Some(s) if !s.is_finite() => Err(Error::NonFinite { field: "scale", value: s as f64 }),
        Some(s) if s <= 0.0 => Err(Error::range("scale", s, "must be positive")),
        _ => Ok(()),
    }
}

/// 1-D pooling of decode scores along the cache (SPEC §4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Pooling {
    #[serde(rename = "none")]
    /// No pooling.
    None,
    /// Average with zero padding, always divided by the kernel size.
    #[default]
    #[serde(rename = "avgpool", alias = "avg")]
    Avg,
    /// Maximum; padding never wins.
    #[serde(rename = "maxpool", alias = "max")]
    Max,
}

/// How the query heads of a group are reduced to one score row per kv head (SPEC §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GqaMode {
    #[default]
    /// Mean over the query heads of a group.
    Mean,
    /// Max over the query heads of a group.
    Max,
    /// Keep one row per query head; the compressed cache then has `Hq` heads.
    PerQueryHead,
}

/// How the kept entries are shared out between heads.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum HeadBudget {
    /// Every head keeps `decode_budget` entries.
    #[default]
    Uniform,
    /// AdaKV: the layer keeps `heads · (decode_budget - window)` scored entries in all, chosen by
    /// pooled score across heads, each head first taking its `ceil(floor_fraction · (decode_budget -
    /// window))` best; every head also keeps its window. Head lengths then differ.
    AdaKv {
        /// Fraction of each head's scored budget it takes first (its floor).
        floor_fraction: f32,
    },
}

/// Decode compression configuration (SPEC §1, second half; SPEC §4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DecodeConfig {
    /// Entries kept per head, window included.
    pub decode_budget: usize,
    /// Observation window W (queries); the last W entries are always kept.
    pub window: usize,
    /// Generated tokens observed before compressing; -1 compresses at prefill end (SnapKV).
    pub decode_gap: i64,
    /// Pooling of the scores (SPEC §4.4).
    pub pooling: Pooling,
    /// Odd pooling kernel size.
    pub pooling_kernel: usize,
    /// How a GQA group's scores are combined.
    pub gqa_mode: GqaMode,
    /// How the budget is split among heads.
    pub head_budget: HeadBudget,
    /// Softmax scale of the scoring; `None` = `1/sqrt(D)`.
    #[serde(rename = "decode_scale")]
    pub scale: Option<f32>,
    /// Compress again whenever a head's length reaches `decode_budget + recompress_every`, with
    /// the window of the last W queries (SPEC §7.5); 0 = never (the paper's one compression).
    pub recompress_every: usize,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        DecodeConfig {
            decode_budget: 1024,
            window: 32,
            decode_gap: 16,
            pooling: Pooling::Avg,
            pooling_kernel: 5,
            gqa_mode: GqaMode::Mean,
            head_budget: HeadBudget::Uniform,
            scale: None,
            recompress_every: 0,
        }
    }
}

impl DecodeConfig {
    /// EntropyInfer's latent compression: scored with the first generated tokens' queries.
    pub fn latent() -> Self {
        Self::default()
    }

    /// SnapKV: compress at prefill end with the last W prompt queries.
    pub fn snapkv() -> Self {
        DecodeConfig { decode_gap: -1, ..Self::default() }
    }

    /// AdaKV on top of SnapKV scoring: one layer budget shared out by pooled score, with a per-head
    /// floor of `floor_fraction` of the uniform share.
    pub fn adakv(floor_fraction: f32) -> Self {
        DecodeConfig { decode_gap: -1, head_budget: HeadBudget::AdaKv { floor_fraction }, ..Self::default() }
    }

    /// Checks every field (SPEC §6).
    pub fn validate(&self) -> Result<()> {
        if self.window == 0 {
            return Err(Error::ZeroSize { what: "window" });
        }
        if self.decode_budget <= self.window {
            return Err(Error::range(
                "decode_budget",
                self.decode_budget,
                format!("must exceed the window ({})", self.window),
            ));
        }
        if self.decode_budget > u32::MAX as usize {
            return Err(Error::range("decode_budget", self.decode_budget, "must fit in 32 bits"));
        }
        if self.recompress_every > u32::MAX as usize - self.decode_budget {
            return Err(Error::range(
                "recompress_every",
                self.recompress_every,
                "decode_budget + recompress_every must fit in 32 bits",
            ));
        }
        if self.decode_gap < -1 {
            return Err(Error::range("decode_gap", self.decode_gap, "must be -1 (SnapKV) or non-negative"));
        }
        if self.pooling_kernel == 0 || self.pooling_kernel.is_multiple_of(2) {
            return Err(Error::range("pooling_kernel", self.pooling_kernel, "must be odd and positive"));
        }
        // The kernel sizes the pooling work and the devices' padding.
        if self.pooling_kernel > MAX_POOLING_KERNEL {
            return Err(Error::range(
                "pooling_kernel",
                self.pooling_kernel,
                format!("must be at most {MAX_POOLING_KERNEL}"),
            ));
        }
        if let HeadBudget::AdaKv { floor_fraction } = self.head_budget {
            if !floor_fraction.is_finite() {
                return Err(Error::NonFinite { field: "floor_fraction", value: floor_fraction as f64 });
            }
            if !(0.0..=1.0).contains(&floor_fraction) {
                return Err(Error::range("floor_fraction", floor_fraction, "must lie in [0, 1]"));
            }
            if self.gqa_mode == GqaMode::PerQueryHead {
                return Err(Error::range("gqa_mode", "per_query_head", "AdaKV shares a budget between kv heads"));
            }
        }
        check_scale(self.scale)
    }
}

/// Prefill and decode configuration together: the flat JSON object of the conformance files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct Config {
    #[serde(flatten)]
    /// The prefill configuration.
    pub prefill: EntropyConfig,
    #[serde(flatten)]
    /// The decode configuration.
    pub decode: DecodeConfig,
}

impl Config {
    /// Parses and validates a configuration from JSON.
    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: Config = serde_json::from_str(json)
            .map_err(|e| Error::Format { path: "<config json>".into(), detail: e.to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }
    /// The configuration as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }
    /// Reads and validates a JSON configuration file.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Format { detail, .. } => Error::Format { path: path.display().to_string(), detail },
            e => e,
        })
    }
    /// Writes the configuration to a JSON file.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_json()).map_err(|source| Error::Io { path: path.display().to_string(), source })
    }
    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        self.prefill.validate()?;
        self.decode.validate()
    }
}

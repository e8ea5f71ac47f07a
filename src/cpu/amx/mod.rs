//! bf16 attention on AMX (Intel Sapphire Rapids and later): the tile products of `S = Q·Kᵀ` and
//! `O += P·V` run on `TDPBF16PS` (16×16×32 bf16 multiply-adds into f32 per instruction), the
//! online softmax on AVX-512. Chosen at run time ([`crate::cpu::Isa::Amx`]) where the CPU has
//! AMX-BF16 and Linux grants the tile state (`arch_prctl`); elsewhere the AVX-512/AVX2 kernels
//! run.

mod dpbf16;
mod pack;
mod scores;
pub(crate) mod sys;
mod tile;

pub(crate) use scores::AmxScores;
pub(crate) use tile::{AMX_ROWS_TARGET, AmxGeom, AmxTile, KEYS};

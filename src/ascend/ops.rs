//! The operations of the Ascend backend, written once over a [`Launcher`]: argument packing into
//! the header's params structs, the kernels' own limits, and the host steps around them.

use super::launch::{self, Launcher};
use crate::backend::Op;
use crate::error::{Error, Result};
use crate::ffi::{EkDecodeParams, dtype_code};
use crate::tensor::TensorViewMut;
use crate::validate::DecodeArgs;

/// Query rows one decode unit keeps in UB (`DECODE_MAX_ROWS` in `ascend/kernels/decode.cpp`).
pub const DECODE_MAX_ROWS: usize = 16;

pub(crate) fn decode<'v>(mut l: impl Launcher<'v>, a: &DecodeArgs<'_>, out: &'v mut TensorViewMut<'_>) -> Result<()> {
    let d = a.dims();
    if d.queries * d.group() > DECODE_MAX_ROWS {
        return Err(Error::range(
            "decode rows",
            d.queries * d.group(),
            format!("the Ascend decode kernel holds at most {DECODE_MAX_ROWS} query rows per cache head"),
        ));
    }
    let params = EkDecodeParams {
        q: l.input(&a.q())?,
        k_cache: l.input(&a.k_cache())?,
        v_cache: l.input(&a.v_cache())?,
        out: l.output(out)?,
        lengths: l.array(launch::bytes_of(a.lengths()))?,
        partial: 0,
        group: d.group() as i32,
        splits: 1,
        keys_per_split: 0,
        scale_log2: a.scale() * std::f32::consts::LOG2_E,
        dtype: dtype_code(a.q().dtype()),
    };
    l.launch(launch::DECODE, &params)?;
    l.finish()
}

/// Operations with Ascend kernels (the others answer `Error::Unimplemented`).
pub const SUPPORTED: [Op; 1] = [Op::Decode];

/// Whether a kernel of `launch::KERNELS` backs a supported op (only those are loaded on the NPU).
pub fn kernel_supported(k: &super::launch::Kernel) -> bool {
    k.symbol == super::launch::DECODE.symbol
}

//! SPEC §3 and decode attention: per query, list the visible keys, softmax in f64, weigh values.

use super::{F64Tensor, dot};
use crate::error::Result;
use crate::plan::SegmentAttention;
use crate::validate::{AttentionArgs, DecodeArgs};

/// Softmax-weighted sum of `values` under `scores`; returns (output, log-sum-exp).
fn attend(scores: &[f64], values: &[&[f64]], out: &mut [f64]) -> f64 {
    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let z: f64 = w.iter().sum();
    out.iter_mut().for_each(|o| *o = 0.0);
    for (wi, v) in w.iter().zip(values) {
        for (o, x) in out.iter_mut().zip(v.iter()) {
            *o += wi / z * x;
        }
    }
    m + z.ln()
}

/// Prefill attention: `[B, L, Hq, D]` outputs and `[B, Hq, L]` log-sum-exps.
pub fn attention(a: &AttentionArgs<'_>) -> Result<(F64Tensor, Vec<f64>)> {
    let d = a.dims();
    let (q, k, v) = (F64Tensor::try_of(&a.q())?, F64Tensor::try_of(&a.k())?, F64Tensor::try_of(&a.v())?);
    let g = d.group();
    let scale = a.scale() as f64;
    let mut out = F64Tensor::zeros(q.shape)?;
    let mut lse = crate::alloc::grid("the oracle's LSE", &[d.batch, d.q_heads, d.seq_len], 0.0)?;
    let mut o = vec![0.0; d.head_dim];
    for b in 0..d.batch {
        for hq in 0..d.q_heads {
            let h = hq / g;
            for t in 0..d.seq_len {
                // The visible keys of query t.
                let keys: Vec<usize> = match a.blocks() {
                    None => (0..=t).collect(),
                    Some(bl) => {
                        let s = t / bl.dims.segment_size;
                        match bl.segment(b, h, s) {
                            SegmentAttention::Dense => (0..=t).collect(),
                            SegmentAttention::Sparse(list) => {
                                let bk = bl.dims.block_size;
                                let mut keys: Vec<usize> =
                                    list.iter().flat_map(|&j| j as usize * bk..(j as usize + 1) * bk).collect();
                                keys.extend(s * bl.dims.segment_size..=t);
                                keys
                            }
                        }
                    }
                };
                let qr = q.row(b, t, hq);
                let scores: Vec<f64> = keys.iter().map(|&j| scale * dot(qr, k.row(b, j, h))).collect();
                let values: Vec<&[f64]> = keys.iter().map(|&j| v.row(b, j, h)).collect();
                lse[(b * d.q_heads + hq) * d.seq_len + t] = attend(&scores, &values, &mut o);
                let off = ((b * d.seq_len + t) * d.q_heads + hq) * d.head_dim;
                out.data[off..off + d.head_dim].copy_from_slice(&o);
            }
        }
    }
    Ok((out, lse))
}

/// Decode attention: `[B, nq, Hq, D]` outputs; query head `hq` reads cache head `hq / (Hq / Hc)`.
pub fn decode_attention(a: &DecodeArgs<'_>) -> Result<F64Tensor> {
    let d = a.dims();
    let (q, k, v) = (F64Tensor::try_of(&a.q())?, F64Tensor::try_of(&a.k_cache())?, F64Tensor::try_of(&a.v_cache())?);
    let g = d.group();
    let scale = a.scale() as f64;
    let mut out = F64Tensor::zeros(q.shape)?;
    let mut o = vec![0.0; d.head_dim];
    for b in 0..d.batch {
        for i in 0..d.queries {
            for hq in 0..d.q_heads {
                let h = hq / g;
                let len = a.lengths()[b * d.cache_heads + h] as usize;
                let qr = q.row(b, i, hq);
                let scores: Vec<f64> = (0..len).map(|n| scale * dot(qr, k.row(b, h, n))).collect();
                let values: Vec<&[f64]> = (0..len).map(|n| v.row(b, h, n)).collect();
                attend(&scores, &values, &mut o);
                let off = ((b * d.queries + i) * d.q_heads + hq) * d.head_dim;
                out.data[off..off + d.head_dim].copy_from_slice(&o);
            }
        }
    }
    Ok(out)
}

//! Element-wise checks of attention outputs against the f64 oracle run on the same inputs (already
//! rounded to their dtype), with bounds in units of the rounding of the types involved:
//!
//! - each output element within one unit in the last place of its dtype (the final rounding) plus
//!   `A = Σ_j p_j |v_j|` (the scale of every error in the weights) times `PV_SLACK · u_PV`, `u_PV` the unit roundoff of the precision the
//!   backend multiplies `P·V` in (f32 on the CPU; the input dtype on the devices' tensor/cube
//!   units) plus `SUM_SLACK · √n · ε₃₂` for the f32 sums over the row's n keys, plus
//!   `PV_SLACK · τ_PV · Σ_j |v_j| / Σ_j w_j` over the weights `w_j = e^(s_j − max s)` below 2⁻¹⁴,
//!   f16's smallest normal: there an f16 weight rounds absolutely, by up to `τ_PV`, half the
//!   smallest subnormal spacing (f16: 2⁻²⁵; bf16 and f32: negligible), plus
//!   `SCORE_SLACK · ε₃₂ · Σ_j p_j E_j (|v_j| + |o|)`, the f32 rounding of the scores
//!   (`E_j = √D·|s_j| + scale·‖q‖·‖k_j‖`: a dot product of D terms rounds by about √D·ε of its
//!   partial sums);
//! - each LSE (an f32) within `LSE_ULPS` f32 ulps of the oracle's plus `LSE_SLACK · ε₃₂ · Σ_j p_j E_j`
//!   plus `SUM_SLACK · √n · ε₃₂` for the f32 sum of its n exponentials.
//!
//! `compare_*` return the first violations as text (so tests of the checks' power can assert that
//! a planted bug is caught); `check_*` panic with it.

use approx::{AbsDiffEq, abs_diff_eq};
use entropy_kernels::reference::{self, F64Tensor};
use entropy_kernels::{BackendKind, BlockLists, DType, HostTensor, Kernels, SegmentAttention, TensorView, validate};

/// Spacing of `dtype` around `x` (one ulp), at least the smallest normal's.
pub fn ulp(x: f64, dtype: DType) -> f64 {
    let (mantissa_bits, min_exp) = match dtype {
        DType::F32 => (23, -126),
        DType::F16 => (10, -14),
        DType::BF16 => (7, -126),
    };
    let e = if x == 0.0 { min_exp } else { (x.abs().log2().floor() as i32).max(min_exp) };
    2f64.powi(e - mantissa_bits)
}

/// The precision `kernels` runs `P·V` in for `dtype` inputs, as its capabilities declare
/// (`low_precision_pv`: tensor/cube units, the CPU's AMX / `VDPBF16PS` tiles); f32 otherwise.
pub fn pv_dtype_of(kernels: &Kernels, dtype: DType) -> DType {
    if kernels.capabilities().low_precision_pv.contains(&dtype) { dtype } else { DType::F32 }
}

/// The precision `kind` runs `P·V` in for `dtype` inputs: the input dtype on the devices'
/// tensor/cube units and on the CPU's AMX tiles (bf16, where this CPU runs them), f32 elsewhere on
/// the CPU.
pub fn pv_dtype(kind: BackendKind, dtype: DType) -> DType {
    match kind {
        BackendKind::Cpu if dtype == DType::BF16 && entropy_kernels::cpu::Isa::detect().bf16_probabilities() => dtype,
        BackendKind::Cpu | BackendKind::Reference => DType::F32,
        _ => dtype,
    }
}

/// Slack factors of the bounds (see the module doc; the largest ratios measured are in the README).
pub const PV_SLACK: f64 = 4.0;
pub const SUM_SLACK: f64 = 2.0;
pub const SCORE_SLACK: f64 = 2.0;
pub const LSE_ULPS: f64 = 4.0;
pub const LSE_SLACK: f64 = 2.0;

/// The oracle's exact answer to an attention call, with what its bounds need.
pub struct Exact {
    pub shape: [usize; 4],
    /// `[B, L, Hq, D]` outputs in f64 (not rounded to the dtype).
    pub out: Vec<f64>,
    /// `[B, L, Hq, D]` `A = Σ_j p_j |v_j|`: the scale of the weights' rounding per element.
    pub abs: Vec<f64>,
    /// `[B, L, Hq, D]` `Σ_j p_j E_j (|v_j| + |o|)`: the scale of the scores' rounding per element.
    pub score_err: Vec<f64>,
    /// `[B, L, Hq, D]` `Σ_j |v_j| / Σ_j w_j` over the weights `w_j < 2⁻¹⁴`: the scale of their
    /// absolute rounding in a `P·V` precision with subnormals there (f16).
    pub v_floor: Vec<f64>,
    /// `[B, Hq, L]` log-sum-exps in f64 (prefill only).
    pub lse: Vec<f64>,
    /// `[B, Hq, L]` `Σ_j p_j E_j`: the scale of the scores' rounding in the LSE (prefill only).
    pub lse_err: Vec<f64>,
    /// `[B, L, Hq]` the keys each output row sees (its f32 sums round by about √n·ε).
    pub row_keys: Vec<f64>,
}

/// The bound terms of one output row from its visible keys (f64, straight from the definitions):
/// `E_j = √D·|s_j| + scale·‖q‖·‖k_j‖` scales the rounding of score `s_j` (a dot product of D
/// terms rounds by about √D·ε of its largest partial sums).
struct RowTerms {
    abs: Vec<f64>,
    score_err: Vec<f64>,
    v_floor: Vec<f64>,
    lse_err: f64,
}

fn norm(r: &[f64]) -> f64 {
    r.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// f16's smallest normal, 2⁻¹⁴: a weight `w_j` above it is normal in every `P·V` precision (a
/// kernel's weight, taken against a running maximum, is only larger), so only the weights below it
/// enter the absolute floor term (bf16's and f32's subnormals start at 2⁻¹²⁶: negligible there).
const SMALLEST_NORMAL_F16: f64 = 6.103515625e-5;

/// `keys` with their norms.
fn row_terms(q: &[f64], keys: &[(&[f64], f64)], values: &[&[f64]], scale: f64, out: &[f64]) -> RowTerms {
    let dd = q.len();
    let qn = norm(q);
    let s: Vec<f64> =
        keys.iter().map(|(k, _)| scale * q.iter().zip(k.iter()).map(|(a, b)| a * b).sum::<f64>()).collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = w.iter().sum();
    let e: Vec<f64> = s.iter().zip(keys).map(|(sj, (_, kn))| (dd as f64).sqrt() * sj.abs() + scale * qn * kn).collect();
    let lse_err: f64 = w.iter().zip(&e).map(|(wj, ej)| wj / z * ej).sum();
    let mut abs = vec![0.0; dd];
    let mut score_err = vec![0.0; dd];
    let mut v_floor = vec![0.0; dd];
    for ((wj, ej), v) in w.iter().zip(&e).zip(values) {
        let tiny = *wj < SMALLEST_NORMAL_F16;
        for x in 0..dd {
            abs[x] += wj / z * v[x].abs();
            score_err[x] += wj / z * ej * v[x].abs();
            if tiny {
                v_floor[x] += v[x].abs() / z;
            }
        }
    }
    for x in 0..dd {
        score_err[x] += lse_err * out[x].abs();
    }
    RowTerms { abs, score_err, v_floor, lse_err }
}

/// The oracle on `q, k, v` (`blocks`: sparse; `None`: dense), with its bounds' terms.
pub fn exact_prefill(q: TensorView<'_>, k: TensorView<'_>, v: TensorView<'_>, blocks: Option<&BlockLists>) -> Exact {
    exact_prefill_scaled(q, k, v, blocks, None)
}

/// [`exact_prefill`] with a softmax scale (`None`: `1/sqrt(D)`).
pub fn exact_prefill_scaled(
    q: TensorView<'_>,
    k: TensorView<'_>,
    v: TensorView<'_>,
    blocks: Option<&BlockLists>,
    scale: Option<f32>,
) -> Exact {
    let oracle = Kernels::reference();
    let mut dummy = HostTensor::zeros(q.dtype(), q.shape());
    let args = validate::attention(oracle.capabilities(), q, k, v, blocks, scale, &dummy.view_mut(), None)
        .expect("valid call");
    let (out, lse) = reference::attention(&args).expect("oracle");
    let d = args.dims();
    let (qf, kf, vf) = (F64Tensor::of(&q), F64Tensor::of(&k), F64Tensor::of(&v));
    let dd = d.head_dim;
    let knorm: Vec<f64> = kf.data.chunks(dd).map(norm).collect();
    let mut abs = vec![0.0; out.data.len()];
    let mut score_err = vec![0.0; out.data.len()];
    let mut v_floor = vec![0.0; out.data.len()];
    let mut lse_err = vec![0.0; lse.len()];
    let mut row_keys = vec![0.0; lse.len()];
    for b in 0..d.batch {
        for hq in 0..d.q_heads {
            let h = hq / d.group();
            for t in 0..d.seq_len {
                let visible: Vec<usize> = match blocks.map(|bl| (bl, bl.segment(b, h, t / bl.dims.segment_size))) {
                    Some((bl, SegmentAttention::Sparse(list))) => {
                        let bk = bl.dims.block_size;
                        let own = t / bl.dims.segment_size * bl.dims.segment_size;
                        list.iter().flat_map(|&j| j as usize * bk..(j as usize + 1) * bk).chain(own..=t).collect()
                    }
                    _ => (0..=t).collect(),
                };
                let keys: Vec<(&[f64], f64)> =
                    visible.iter().map(|&j| (kf.row(b, j, h), knorm[(b * d.seq_len + j) * d.kv_heads + h])).collect();
                let values: Vec<&[f64]> = visible.iter().map(|&j| vf.row(b, j, h)).collect();
                let o = ((b * d.seq_len + t) * d.q_heads + hq) * dd;
                let r = row_terms(qf.row(b, t, hq), &keys, &values, args.scale() as f64, &out.data[o..o + dd]);
                abs[o..o + dd].copy_from_slice(&r.abs);
                score_err[o..o + dd].copy_from_slice(&r.score_err);
                v_floor[o..o + dd].copy_from_slice(&r.v_floor);
                lse_err[(b * d.q_heads + hq) * d.seq_len + t] = r.lse_err;
                row_keys[(b * d.seq_len + t) * d.q_heads + hq] = visible.len() as f64;
            }
        }
    }
    Exact { shape: q.shape(), out: out.data, abs, score_err, v_floor, lse, lse_err, row_keys }
}

/// The oracle's decode attention, with its bounds' terms.
pub fn exact_decode(q: TensorView<'_>, k: TensorView<'_>, v: TensorView<'_>, lengths: &[u32]) -> Exact {
    exact_decode_scaled(q, k, v, lengths, None)
}

/// [`exact_decode`] with a softmax scale (`None`: `1/sqrt(D)`).
pub fn exact_decode_scaled(
    q: TensorView<'_>,
    k: TensorView<'_>,
    v: TensorView<'_>,
    lengths: &[u32],
    scale: Option<f32>,
) -> Exact {
    let oracle = Kernels::reference();
    let mut dummy = HostTensor::zeros(q.dtype(), q.shape());
    let args = validate::decode_attention(oracle.capabilities(), q, k, v, lengths, scale, &dummy.view_mut())
        .expect("valid call");
    let out = reference::decode_attention(&args).expect("oracle");
    let d = args.dims();
    let (qf, kf, vf) = (F64Tensor::of(&q), F64Tensor::of(&k), F64Tensor::of(&v));
    let dd = d.head_dim;
    let mut abs = vec![0.0; out.data.len()];
    let mut score_err = vec![0.0; out.data.len()];
    let mut v_floor = vec![0.0; out.data.len()];
    let mut row_keys = vec![0.0; d.batch * d.queries * d.q_heads];
    for b in 0..d.batch {
        for hq in 0..d.q_heads {
            let h = hq / d.group();
            let len = lengths[b * d.cache_heads + h] as usize;
            let keys: Vec<(&[f64], f64)> = (0..len).map(|n| (kf.row(b, h, n), norm(kf.row(b, h, n)))).collect();
            let values: Vec<&[f64]> = (0..len).map(|n| vf.row(b, h, n)).collect();
            for i in 0..d.queries {
                let o = ((b * d.queries + i) * d.q_heads + hq) * dd;
                let r = row_terms(qf.row(b, i, hq), &keys, &values, args.scale() as f64, &out.data[o..o + dd]);
                abs[o..o + dd].copy_from_slice(&r.abs);
                score_err[o..o + dd].copy_from_slice(&r.score_err);
                v_floor[o..o + dd].copy_from_slice(&r.v_floor);
                row_keys[(b * d.queries + i) * d.q_heads + hq] = len as f64;
            }
        }
    }
    Exact { shape: q.shape(), out: out.data, abs, score_err, v_floor, lse: Vec::new(), lse_err: Vec::new(), row_keys }
}

/// `|got − exact|` allowed for output element `i`: one ulp of the dtype, the weights' rounding in
/// the backend's `P·V` precision `pv` (relative, and absolute below its smallest normal), and the
/// scores' f32 rounding.
pub fn out_bound(pv: DType, dtype: DType, exact: &Exact, i: usize) -> f64 {
    let row = i / exact.shape[3];
    let eps = DType::F32.epsilon();
    let floor = ulp(0.0, pv) / 2.0; // half the smallest subnormal spacing
    ulp(exact.out[i], dtype)
        + (PV_SLACK * pv.epsilon() + SUM_SLACK * eps * exact.row_keys[row].sqrt()) * exact.abs[i]
        + PV_SLACK * floor * exact.v_floor[i]
        + SCORE_SLACK * eps * exact.score_err[i]
}

/// `|got − exact|` allowed for LSE `i`: a few f32 ulps, the scores' f32 rounding, and the f32 sum
/// of the row's n exponentials (at least 1, so its rounding is an absolute `√n·ε` in the log —
/// what dominates when the scores are tiny).
pub fn lse_bound(exact: &Exact, i: usize) -> f64 {
    let [_, l, h, _] = exact.shape;
    let (b, hh, t) = (i / (h * l), i / l % h, i % l);
    let n = exact.row_keys[(b * l + t) * h + hh];
    let eps = DType::F32.epsilon();
    LSE_ULPS * ulp(exact.lse[i], DType::F32) + LSE_SLACK * eps * exact.lse_err[i] + SUM_SLACK * eps * n.sqrt()
}

/// Up to `MAX_REPORTED` violations, then a count.
const MAX_REPORTED: usize = 4;

fn report(tag: &str, what: &str, bad: Vec<String>, total: usize) -> Result<(), String> {
    if bad.is_empty() {
        return Ok(());
    }
    Err(format!("{tag}: {what}: {total} of the elements out of bounds, e.g. {}", bad.join("; ")))
}

/// Outputs element by element: `|got − exact| ≤ out_bound`.
pub fn compare_out(tag: &str, kind: BackendKind, got: &HostTensor, exact: &Exact) -> Result<(), String> {
    compare_out_with(tag, pv_dtype(kind, got.dtype()), got, exact)
}

/// [`compare_out`] for a backend whose `P·V` products are in precision `pv`.
pub fn compare_out_with(tag: &str, pv: DType, got: &HostTensor, exact: &Exact) -> Result<(), String> {
    let dtype = got.dtype();
    assert_eq!(got.shape, exact.shape, "{tag}: output shape");
    let [_, l, h, d] = exact.shape;
    let (mut bad, mut total) = (Vec::new(), 0);
    for (i, (g, &e)) in got.to_f32_vec().iter().zip(&exact.out).enumerate() {
        let bound = out_bound(pv, dtype, exact, i);
        if !abs_diff_eq!(*g as f64, e, epsilon = bound) {
            total += 1;
            if bad.len() < MAX_REPORTED {
                let (b, t, hh, dd) = (i / (l * h * d), i / (h * d) % l, i / d % h, i % d);
                bad.push(format!("[{b}, {t}, {hh}, {dd}] = {g} vs {e:.9} (bound {bound:.2e})"));
            }
        }
    }
    report(tag, "output", bad, total)
}

/// LSEs as the f32 they are: `|got − exact| ≤ lse_bound`.
pub fn compare_lse(tag: &str, got: &[f32], exact: &Exact) -> Result<(), String> {
    assert_eq!(got.len(), exact.lse.len(), "{tag}: LSE length");
    let [_, l, h, _] = exact.shape;
    let (mut bad, mut total) = (Vec::new(), 0);
    for (i, (&g, &e)) in got.iter().zip(&exact.lse).enumerate() {
        let bound = lse_bound(exact, i);
        if !(g as f64).abs_diff_eq(&e, bound) {
            total += 1;
            if bad.len() < MAX_REPORTED {
                let (b, hh, t) = (i / (h * l), i / l % h, i % l);
                bad.push(format!("lse[b {b}, head {hh}, token {t}] = {g} vs {e:.9} (bound {bound:.2e})"));
            }
        }
    }
    report(tag, "LSE", bad, total)
}

pub fn check_out(tag: &str, kind: BackendKind, got: &HostTensor, exact: &Exact) {
    if let Err(e) = compare_out(tag, kind, got, exact) {
        panic!("{e}");
    }
}

pub fn check_lse(tag: &str, got: &[f32], exact: &Exact) {
    if let Err(e) = compare_lse(tag, got, exact) {
        panic!("{e}");
    }
}

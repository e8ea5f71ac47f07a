//! SPEC §6: every malformed call is a typed error — never a panic, never a half-written output.
//! Each case runs on every backend (validation is shared, but each backend is called), and every
//! output buffer a case could write (outputs, LSEs) is filled with a sentinel and checked after.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};

use common::*;
use entropy_kernels::io::Case;
use entropy_kernels::*;

const B: usize = 1;
const L: usize = 200;
const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 32;

struct Fixture {
    q: HostTensor,
    k: HostTensor,
    v: HostTensor,
    kc: HostTensor,
    vc: HostTensor,
    obs: HostTensor,
    cfg: EntropyConfig,
    dcfg: DecodeConfig,
    blocks: BlockLists,
}

fn fixture() -> Fixture {
    let cfg =
        EntropyConfig { segment_size: 64, block_size: 8, threshold_len: 64, base_budget: 16, ..Default::default() };
    let q = random([B, L, HQ, D], 1.0, 1, DType::F32);
    let k = random([B, L, HKV, D], 1.0, 2, DType::F32);
    let blocks = Kernels::reference().plan(q.view(), k.view(), &cfg, &PlanRequest::default()).unwrap().blocks;
    Fixture {
        v: random([B, L, HKV, D], 1.0, 3, DType::F32),
        kc: random([B, HKV, L, D], 1.0, 4, DType::F32),
        vc: random([B, HKV, L, D], 1.0, 5, DType::F32),
        obs: random([B, HQ, 16, D], 1.0, 6, DType::F32),
        dcfg: DecodeConfig { decode_budget: 64, window: 16, ..Default::default() },
        q,
        k,
        cfg,
        blocks,
    }
}

/// Every buffer a malformed call may be handed to write into, each filled with `SENTINEL` (a
/// value no kernel produces from these inputs, exact in every dtype — not NaN, which a kernel
/// could write and a NaN check would not notice).
struct Outs {
    /// `[B, L, HQ, D]` f32: the prefill output.
    out: HostTensor,
    /// The same in bf16 (a dtype mismatch).
    out_bf16: HostTensor,
    /// `[B, L, HQ - 1, D]` (a shape mismatch).
    out_narrow: HostTensor,
    /// `[B, 1, HQ, D]`: decode outputs.
    decode: HostTensor,
    /// `[B, HQ, L]` and a short one.
    lse: Vec<f32>,
    lse_short: Vec<f32>,
}

const SENTINEL: f32 = -7.25;

impl Outs {
    fn new() -> Self {
        Outs {
            out: HostTensor::full(DType::F32, [B, L, HQ, D], SENTINEL),
            out_bf16: HostTensor::full(DType::BF16, [B, L, HQ, D], SENTINEL),
            out_narrow: HostTensor::full(DType::F32, [B, L, HQ - 1, D], SENTINEL),
            decode: HostTensor::full(DType::F32, [B, 1, HQ, D], SENTINEL),
            lse: vec![SENTINEL; B * HQ * L],
            lse_short: vec![SENTINEL; 3],
        }
    }
    /// The buffers that no longer hold only the sentinel.
    fn written(&self) -> Vec<&'static str> {
        let untouched = |t: &HostTensor| t.to_f32_vec().iter().all(|&x| x == SENTINEL);
        let mut w = Vec::new();
        for (name, t) in [
            ("out", &self.out),
            ("out_bf16", &self.out_bf16),
            ("out_narrow", &self.out_narrow),
            ("decode", &self.decode),
        ] {
            if !untouched(t) {
                w.push(name);
            }
        }
        for (name, l) in [("lse", &self.lse), ("lse_short", &self.lse_short)] {
            if !l.iter().all(|&x| x == SENTINEL) {
                w.push(name);
            }
        }
        w
    }
}

type Call = Box<dyn Fn(&Kernels, &Fixture, &mut Outs) -> Result<()>>;
/// (name, call, expected error).
type BadCase = (&'static str, Call, fn(&Error) -> bool);

/// (name, call, expected error) — each call is malformed in exactly one way.
fn cases() -> Vec<BadCase> {
    fn dense(kn: &Kernels, q: TensorView, k: TensorView, v: TensorView, o: &mut Outs) -> Result<()> {
        kn.dense_prefill(q, k, v, None, &mut o.out.view_mut(), Some(&mut o.lse))
    }
    fn with_cfg(kn: &Kernels, f: &Fixture, cfg: EntropyConfig) -> Result<()> {
        kn.plan(f.q.view(), f.k.view(), &cfg, &PlanRequest::default()).map(|_| ())
    }
    fn with_dcfg(kn: &Kernels, f: &Fixture, cfg: DecodeConfig) -> Result<()> {
        kn.kv_compress(f.kc.view(), f.vc.view(), f.obs.view(), &cfg).map(|_| ())
    }
    fn sparse(kn: &Kernels, f: &Fixture, bl: &BlockLists, o: &mut Outs) -> Result<()> {
        kn.sparse_prefill(f.q.view(), f.k.view(), f.v.view(), bl, None, &mut o.out.view_mut(), Some(&mut o.lse))
    }
    fn decode(kn: &Kernels, f: &Fixture, q: &HostTensor, lengths: &[u32], o: &mut Outs) -> Result<()> {
        kn.decode_attention(q.view(), f.kc.view(), f.vc.view(), lengths, None, &mut o.decode.view_mut())
    }
    let c = |cfg: EntropyConfig| cfg;
    vec![
        (
            "k with another length",
            Box::new(|kn, f, o| {
                let k = random([B, L - 1, HKV, D], 1.0, 9, DType::F32);
                dense(kn, f.q.view(), k.view(), f.v.view(), o)
            }),
            |e| matches!(e, Error::Shape { what: "k", .. }),
        ),
        (
            "k with another head dim",
            Box::new(|kn, f, o| {
                let k = random([B, L, HKV, D + 1], 1.0, 9, DType::F32);
                dense(kn, f.q.view(), k.view(), f.v.view(), o)
            }),
            |e| matches!(e, Error::Shape { what: "k", .. }),
        ),
        (
            "v unlike k",
            Box::new(|kn, f, o| {
                let v = random([B, L, HKV + 1, D], 1.0, 9, DType::F32);
                dense(kn, f.q.view(), f.k.view(), v.view(), o)
            }),
            |e| matches!(e, Error::Shape { what: "v", .. }),
        ),
        (
            "Hq not a multiple of Hkv",
            Box::new(|kn, f, o| {
                let k = random([B, L, 3, D], 1.0, 9, DType::F32);
                dense(kn, f.q.view(), k.view(), k.view(), o)
            }),
            |e| matches!(e, Error::HeadGrouping { q_heads: 4, kv_heads: 3 }),
        ),
        (
            "zero batch",
            Box::new(|kn, _, o| {
                let z = HostTensor::zeros(DType::F32, [0, L, HQ, D]);
                dense(kn, z.view(), z.view(), z.view(), o)
            }),
            |e| matches!(e, Error::ZeroSize { what: "batch" }),
        ),
        (
            "zero length",
            Box::new(|kn, _, o| {
                let z = HostTensor::zeros(DType::F32, [B, 0, HQ, D]);
                dense(kn, z.view(), z.view(), z.view(), o)
            }),
            |e| matches!(e, Error::ZeroSize { what: "sequence length" }),
        ),
        (
            "zero head dim",
            Box::new(|kn, _, o| {
                let z = HostTensor::zeros(DType::F32, [B, L, HQ, 0]);
                dense(kn, z.view(), z.view(), z.view(), o)
            }),
            |e| matches!(e, Error::ZeroSize { what: "head dim" }),
        ),
        (
            "zero kv heads",
            Box::new(|kn, f, o| {
                let z = HostTensor::zeros(DType::F32, [B, L, 0, D]);
                dense(kn, f.q.view(), z.view(), z.view(), o)
            }),
            |e| matches!(e, Error::ZeroSize { what: "key/value heads" }),
        ),
        (
            "unsupported head dim",
            Box::new(|kn, _, o| {
                let z = HostTensor::zeros(DType::F32, [B, 4, 1, 2048]);
                dense(kn, z.view(), z.view(), z.view(), o)
            }),
            |e| matches!(e, Error::UnsupportedHeadDim { head_dim: 2048, .. }),
        ),
        (
            "k in another dtype",
            Box::new(|kn, f, o| {
                let k = f.k.cast(DType::F16);
                dense(kn, f.q.view(), k.view(), f.v.view(), o)
            }),
            |e| matches!(e, Error::DTypeMismatch { what: "k", .. }),
        ),
        (
            "output in another dtype",
            Box::new(|kn, f, o| {
                kn.dense_prefill(f.q.view(), f.k.view(), f.v.view(), None, &mut o.out_bf16.view_mut(), Some(&mut o.lse))
            }),
            |e| matches!(e, Error::DTypeMismatch { what: "out", .. }),
        ),
        (
            "output of another shape",
            Box::new(|kn, f, o| {
                kn.dense_prefill(
                    f.q.view(),
                    f.k.view(),
                    f.v.view(),
                    None,
                    &mut o.out_narrow.view_mut(),
                    Some(&mut o.lse),
                )
            }),
            |e| matches!(e, Error::Shape { what: "out", .. }),
        ),
        (
            "buffer shorter than its shape",
            Box::new(|kn, f, o| {
                let HostBuffer::F32(q) = &f.q.data else { unreachable!() };
                dense(kn, TensorView::new(&q[..q.len() - 1], f.q.shape), f.k.view(), f.v.view(), o)
            }),
            |e| matches!(e, Error::Layout { what: "q", .. }),
        ),
        (
            "innermost stride not 1",
            Box::new(|kn, f, o| {
                let HostBuffer::F32(q) = &f.q.data else { unreachable!() };
                dense(
                    kn,
                    TensorView::strided(q.as_slice(), [B, L / 2, HQ, D / 2], [L * HQ * D, HQ * D, D, 2]),
                    f.k.view(),
                    f.v.view(),
                    o,
                )
            }),
            |e| matches!(e, Error::Layout { what: "q", .. }),
        ),
        (
            "strides that overflow",
            Box::new(|kn, f, o| {
                let HostBuffer::F32(q) = &f.q.data else { unreachable!() };
                dense(
                    kn,
                    TensorView::strided(q.as_slice(), f.q.shape, [L * HQ * D, usize::MAX / 2, D, 1]),
                    f.k.view(),
                    f.v.view(),
                    o,
                )
            }),
            |e| matches!(e, Error::Layout { what: "q", .. }),
        ),
        (
            "lse of the wrong length",
            Box::new(|kn, f, o| {
                kn.dense_prefill(
                    f.q.view(),
                    f.k.view(),
                    f.v.view(),
                    None,
                    &mut o.out.view_mut(),
                    Some(&mut o.lse_short),
                )
            }),
            |e| matches!(e, Error::Layout { what: "lse", .. }),
        ),
        (
            "NaN scale",
            Box::new(|kn, f, o| {
                kn.dense_prefill(
                    f.q.view(),
                    f.k.view(),
                    f.v.view(),
                    Some(f32::NAN),
                    &mut o.out.view_mut(),
                    Some(&mut o.lse),
                )
            }),
            |e| matches!(e, Error::NonFinite { field: "scale", .. }),
        ),
        (
            "negative scale",
            Box::new(|kn, f, o| {
                kn.dense_prefill(
                    f.q.view(),
                    f.k.view(),
                    f.v.view(),
                    Some(-1.0),
                    &mut o.out.view_mut(),
                    Some(&mut o.lse),
                )
            }),
            |e| matches!(e, Error::OutOfRange { field: "scale", .. }),
        ),
        (
            "segment not a multiple of block",
            Box::new(move |kn, f, _| with_cfg(kn, f, c(EntropyConfig { block_size: 7, ..f.cfg.clone() }))),
            |e| matches!(e, Error::SegmentNotBlockMultiple { segment_size: 64, block_size: 7 }),
        ),
        (
            "zero segment size",
            Box::new(|kn, f, _| with_cfg(kn, f, EntropyConfig { segment_size: 0, ..f.cfg.clone() })),
            |e| matches!(e, Error::ZeroSize { what: "segment_size" }),
        ),
        (
            "zero block size",
            Box::new(|kn, f, _| with_cfg(kn, f, EntropyConfig { block_size: 0, ..f.cfg.clone() })),
            |e| matches!(e, Error::ZeroSize { what: "block_size" }),
        ),
        (
            "zero base budget",
            Box::new(|kn, f, _| with_cfg(kn, f, EntropyConfig { base_budget: 0, ..f.cfg.clone() })),
            |e| matches!(e, Error::ZeroSize { what: "base_budget" }),
        ),
        (
            "base budget beyond f32-exact tokens",
            Box::new(|kn, f, _| with_cfg(kn, f, EntropyConfig { base_budget: 1 << 23, ..f.cfg.clone() })),
            |e| matches!(e, Error::OutOfRange { field: "base_budget", .. }),
        ),
        ("NaN e_t", Box::new(|kn, f, _| with_cfg(kn, f, EntropyConfig { e_t: f32::NAN, ..f.cfg.clone() })), |e| {
            matches!(e, Error::NonFinite { field: "e_t", .. })
        }),
        (
            "infinite alpha",
            Box::new(|kn, f, _| with_cfg(kn, f, EntropyConfig { alpha: f32::INFINITY, ..f.cfg.clone() })),
            |e| matches!(e, Error::NonFinite { field: "alpha", .. }),
        ),
        (
            "negative delta_t",
            Box::new(|kn, f, _| with_cfg(kn, f, EntropyConfig { delta_t: -0.1, ..f.cfg.clone() })),
            |e| matches!(e, Error::OutOfRange { field: "delta_t", .. }),
        ),
        (
            "previous scores without layer fusion",
            Box::new(|kn, f, _| {
                let prev = vec![0f32; 7];
                let cfg = EntropyConfig { layer_fusion: false, ..f.cfg.clone() };
                kn.plan(f.q.view(), f.k.view(), &cfg, &PlanRequest::layer(5).with_prev(&prev)).map(|_| ())
            }),
            |e| matches!(e, Error::OutOfRange { field: "prev_scores", .. }),
        ),
        (
            "previous scores of another shape",
            Box::new(|kn, f, _| {
                let prev = vec![0f32; 7];
                let cfg = EntropyConfig { layer_fusion: true, ..f.cfg.clone() };
                kn.plan(f.q.view(), f.k.view(), &cfg, &PlanRequest::layer(5).with_prev(&prev)).map(|_| ())
            }),
            |e| matches!(e, Error::PlanMismatch(_)),
        ),
        (
            "block past the causal limit",
            Box::new(|kn, f, o| {
                let mut bl = f.blocks.clone();
                let u = bl.dims.unit(0, 0, 1);
                bl.dense[u] = false;
                bl.indices.insert(bl.indptr[u] as usize, 8);
                for p in &mut bl.indptr[u + 1..] {
                    *p += 1;
                }
                sparse(kn, f, &bl, o)
            }),
            |e| matches!(e, Error::BlockList { segment: 1, .. }),
        ),
        (
            "duplicate block",
            Box::new(|kn, f, o| {
                let mut bl = f.blocks.clone();
                let u = bl.dims.unit(0, 1, 2);
                bl.dense[u] = false;
                let at = bl.indptr[u] as usize;
                bl.indices.splice(at..at, [3, 3]);
                for p in &mut bl.indptr[u + 1..] {
                    *p += 2;
                }
                sparse(kn, f, &bl, o)
            }),
            |e| matches!(e, Error::BlockList { segment: 2, .. }),
        ),
        (
            "indptr out of step with indices",
            Box::new(|kn, f, o| {
                let mut bl = f.blocks.clone();
                bl.indices.push(0);
                sparse(kn, f, &bl, o)
            }),
            |e| matches!(e, Error::PlanMismatch(_)),
        ),
        (
            "block lists for another length",
            Box::new(|kn, f, o| {
                let q = random([B, L + 64, HQ, D], 1.0, 9, DType::F32);
                let k = random([B, L + 64, HKV, D], 1.0, 9, DType::F32);
                let bl = Kernels::reference().plan(q.view(), k.view(), &f.cfg, &PlanRequest::default()).unwrap().blocks;
                sparse(kn, f, &bl, o)
            }),
            |e| matches!(e, Error::PlanMismatch(_)),
        ),
        (
            "decode budget not above the window",
            Box::new(|kn, f, _| with_dcfg(kn, f, DecodeConfig { decode_budget: 16, ..f.dcfg.clone() })),
            |e| matches!(e, Error::OutOfRange { field: "decode_budget", .. }),
        ),
        ("zero window", Box::new(|kn, f, _| with_dcfg(kn, f, DecodeConfig { window: 0, ..f.dcfg.clone() })), |e| {
            matches!(e, Error::ZeroSize { what: "window" })
        }),
        (
            "even pooling kernel",
            Box::new(|kn, f, _| with_dcfg(kn, f, DecodeConfig { pooling_kernel: 4, ..f.dcfg.clone() })),
            |e| matches!(e, Error::OutOfRange { field: "pooling_kernel", .. }),
        ),
        (
            "decode gap below -1",
            Box::new(|kn, f, _| with_dcfg(kn, f, DecodeConfig { decode_gap: -2, ..f.dcfg.clone() })),
            |e| matches!(e, Error::OutOfRange { field: "decode_gap", .. }),
        ),
        (
            "AdaKV floor above 1",
            Box::new(|kn, f, _| {
                with_dcfg(
                    kn,
                    f,
                    DecodeConfig { head_budget: HeadBudget::AdaKv { floor_fraction: 1.5 }, ..f.dcfg.clone() },
                )
            }),
            |e| matches!(e, Error::OutOfRange { field: "floor_fraction", .. }),
        ),
        (
            "AdaKV with per-query-head caches",
            Box::new(|kn, f, _| {
                with_dcfg(
                    kn,
                    f,
                    DecodeConfig {
                        head_budget: HeadBudget::AdaKv { floor_fraction: 0.2 },
                        gqa_mode: GqaMode::PerQueryHead,
                        ..f.dcfg.clone()
                    },
                )
            }),
            |e| matches!(e, Error::OutOfRange { field: "gqa_mode", .. }),
        ),
        (
            "window tensor of another size",
            Box::new(|kn, f, _| {
                let obs = random([B, HQ, 8, D], 1.0, 9, DType::F32);
                kn.kv_compress(f.kc.view(), f.vc.view(), obs.view(), &f.dcfg).map(|_| ())
            }),
            |e| matches!(e, Error::Shape { what: "obs", .. }),
        ),
        (
            "cache in another dtype than the window",
            Box::new(|kn, f, _| {
                let obs = f.obs.cast(DType::BF16);
                kn.kv_compress(f.kc.view(), f.vc.view(), obs.view(), &f.dcfg).map(|_| ())
            }),
            |e| matches!(e, Error::DTypeMismatch { what: "obs", .. }),
        ),
        (
            "decode lengths of the wrong count",
            Box::new(|kn, f, o| {
                let q = random([B, 1, HQ, D], 1.0, 9, DType::F32);
                decode(kn, f, &q, &[10], o)
            }),
            |e| matches!(e, Error::Layout { what: "lengths", .. }),
        ),
        (
            "decode length beyond capacity",
            Box::new(|kn, f, o| {
                let q = random([B, 1, HQ, D], 1.0, 9, DType::F32);
                decode(kn, f, &q, &[10, L as u32 + 1], o)
            }),
            |e| matches!(e, Error::CacheLength { head: 1, .. }),
        ),
        (
            "empty decode head",
            Box::new(|kn, f, o| {
                let q = random([B, 1, HQ, D], 1.0, 9, DType::F32);
                decode(kn, f, &q, &[0, 5], o)
            }),
            |e| matches!(e, Error::CacheLength { head: 0, length: 0, .. }),
        ),
        (
            "decode query heads not a multiple of cache heads",
            Box::new(|kn, f, o| {
                let q = random([B, 1, 3, D], 1.0, 9, DType::F32);
                kn.decode_attention(
                    q.view(),
                    f.kc.view(),
                    f.vc.view(),
                    &[5, 5],
                    None,
                    &mut o.decode.view_mut().narrow(2, 0, 3)?,
                )
            }),
            |e| matches!(e, Error::HeadGrouping { q_heads: 3, kv_heads: 2 }),
        ),
        (
            "output rows that overlap (zero strides)",
            Box::new(|kn, f, o| {
                let HostBuffer::F32(buf) = &mut o.out.data else { unreachable!() };
                let mut out = TensorViewMut::strided(&mut buf[..], [B, L, HQ, D], [0, 0, D, 1]);
                kn.dense_prefill(f.q.view(), f.k.view(), f.v.view(), None, &mut out, Some(&mut o.lse))
            }),
            |e| matches!(e, Error::Layout { what: "out", .. }),
        ),
        (
            "decode output rows that overlap",
            Box::new(|kn, f, o| {
                let q = random([B, 1, HQ, D], 1.0, 9, DType::F32);
                let HostBuffer::F32(buf) = &mut o.decode.data else { unreachable!() };
                let mut out = TensorViewMut::strided(&mut buf[..], [B, 1, HQ, D], [0, 0, 0, 1]);
                kn.decode_attention(q.view(), f.kc.view(), f.vc.view(), &[5, 5], None, &mut out)
            }),
            |e| matches!(e, Error::Layout { what: "out", .. }),
        ),
        (
            "a broadcast query claiming more tokens than its buffer",
            Box::new(|kn, f, o| {
                let HostBuffer::F32(q) = &f.q.data else { unreachable!() };
                let q = TensorView::strided(&q[..HQ * D], [B, L, HQ, D], [0, 0, D, 1]);
                kn.dense_prefill(q, f.k.view(), f.v.view(), None, &mut o.out.view_mut(), Some(&mut o.lse))
            }),
            |e| matches!(e, Error::Layout { what: "q", .. }),
        ),
        (
            "block-list offsets out of order",
            Box::new(|kn, f, o| {
                let mut bl = f.blocks.clone();
                bl.dense[0] = false;
                bl.indptr[1] = u32::MAX;
                sparse(kn, f, &bl, o)
            }),
            |e| matches!(e, Error::BlockList { segment: 1, .. }),
        ),
        (
            "pooling kernel beyond the bound",
            Box::new(|kn, f, _| {
                with_dcfg(kn, f, DecodeConfig { pooling_kernel: config::MAX_POOLING_KERNEL + 2, ..f.dcfg.clone() })
            }),
            |e| matches!(e, Error::OutOfRange { field: "pooling_kernel", .. }),
        ),
        (
            "segment size beyond 32 bits",
            Box::new(|kn, f, _| {
                with_cfg(kn, f, EntropyConfig { segment_size: 1 << 40, block_size: 1, ..f.cfg.clone() })
            }),
            |e| matches!(e, Error::OutOfRange { field: "segment_size", .. }),
        ),
    ]
}

#[test]
fn malformed_calls_are_typed_errors() {
    let f = fixture();
    let mut backends = vec![Kernels::reference()];
    backends.extend(backends_under_test("malformed_calls_are_typed_errors"));
    let cases = cases();
    assert!(cases.len() >= 25, "SPEC §6 asks for at least 25 distinct malformed calls");
    for kn in &backends {
        for (name, call, expected) in &cases {
            let mut outs = Outs::new();
            let result = catch_unwind(AssertUnwindSafe(|| call(kn, &f, &mut outs)));
            let err = match result {
                Err(_) => panic!("{}: `{name}` panicked instead of returning an error", kn.kind()),
                Ok(Ok(())) => panic!("{}: `{name}` was accepted", kn.kind()),
                Ok(Err(e)) => e,
            };
            assert!(expected(&err), "{}: `{name}` gave the wrong error: {err}", kn.kind());
            assert!(!err.to_string().is_empty());
            let written = outs.written();
            assert!(written.is_empty(), "{}: `{name}` wrote into {written:?}", kn.kind());
        }
    }
}

#[test]
fn backend_selection_errors() {
    assert!(matches!("tpu".parse::<BackendChoice>(), Err(Error::UnknownBackend(_))));
    assert_eq!("CPU".parse::<BackendChoice>().unwrap(), BackendChoice::Kind(BackendKind::Cpu));
    for kind in [BackendKind::Cuda, BackendKind::Ascend] {
        if let Err(e) = Kernels::new(kind) {
            assert!(matches!(e, Error::BackendUnavailable { .. }), "{e}");
        }
    }
    // auto always finds a backend, and never panics while probing.
    assert!(Kernels::select(BackendChoice::Auto).is_ok());
}

#[test]
fn malformed_files_and_configs_are_typed_errors() {
    assert!(matches!(Config::from_json("{\"segment_size\": \"big\"}"), Err(Error::Format { .. })));
    assert!(matches!(Config::from_json("{\"block_size\": 0}"), Err(Error::ZeroSize { what: "block_size" })));
    assert!(matches!(Case::load("/nonexistent/case.safetensors"), Err(Error::Io { .. })));
    let dir = std::env::temp_dir().join(format!("ek-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    assert!(matches!(Case::load(&junk), Err(Error::Format { .. })));
    let mut w = ObservationWindow::new(1, 2, 4, &DecodeConfig::default()).unwrap();
    let wrong = HostTensor::zeros(DType::F32, [1, 3, 3, 4]);
    assert!(matches!(w.prefill_end(wrong.view()), Err(Error::Shape { .. })));
    assert!(matches!(ObservationWindow::new(1, 0, 4, &DecodeConfig::default()), Err(Error::ZeroSize { .. })));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn non_finite_inputs_never_panic() {
    // NaN and infinite activations are garbage in, garbage out — but never a panic or a crash.
    let f = fixture();
    let mut q = f.q.to_f32_vec();
    q[5] = f32::NAN;
    q[700] = f32::INFINITY;
    let q = HostTensor::from_f32(&q, f.q.shape, DType::F32);
    let mut kc = f.kc.to_f32_vec();
    kc[3] = f32::NAN;
    kc[900] = f32::NEG_INFINITY;
    let kc = HostTensor::from_f32(&kc, f.kc.shape, DType::F32);
    let mut backends = vec![Kernels::reference()];
    backends.extend(backends_under_test("non_finite_inputs_never_panic"));
    for kn in &backends {
        let test = "non_finite_inputs_never_panic";
        let r = catch_unwind(AssertUnwindSafe(|| {
            let oracle = Kernels::reference();
            let planner = if runs(test, kn, Op::Plan) { kn } else { &oracle };
            let plan = planner.plan(q.view(), f.k.view(), &f.cfg, &PlanRequest::default()).unwrap();
            if runs_on(test, kn, Op::Prefill, DType::F32) {
                let mut out = poisoned(q.shape, DType::F32);
                kn.sparse_prefill(q.view(), f.k.view(), f.v.view(), &plan.blocks, None, &mut out.view_mut(), None)
                    .unwrap();
            }
            let compressor = if runs(test, kn, Op::KvCompress) { kn } else { &oracle };
            compressor.kv_compress(kc.view(), f.vc.view(), f.obs.view(), &f.dcfg).unwrap();
            let ada = DecodeConfig { head_budget: HeadBudget::AdaKv { floor_fraction: 0.3 }, ..f.dcfg.clone() };
            let c = compressor.kv_compress(kc.view(), f.vc.view(), f.obs.view(), &ada).unwrap();
            let qn = random([B, 1, HQ, D], 1.0, 9, DType::F32);
            let mut o = poisoned(qn.shape, DType::F32);
            kn.decode_attention(qn.view(), c.k.view(), c.v.view(), &c.lengths, None, &mut o.view_mut()).unwrap();
        }));
        assert!(r.is_ok(), "{}: non-finite inputs caused a panic", kn.kind());
    }
}

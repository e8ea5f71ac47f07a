//! Issue 14's findings, one test each: calls that were undefined behaviour, a panic, an abort, a
//! wrapped size or a loop of hours are typed errors now — on every backend — and the legitimate
//! neighbours of each still work.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use common::*;
use entropy_kernels::*;

/// The oracle and every available backend.
fn all_backends(test: &str) -> Vec<Kernels> {
    let mut out = vec![Kernels::reference()];
    out.extend(backends_under_test(test));
    out
}

/// `f` returns an error that `expected` accepts, without panicking.
fn expect_err<T>(what: &str, f: impl FnOnce() -> Result<T>, expected: impl Fn(&Error) -> bool) {
    match catch_unwind(AssertUnwindSafe(f)) {
        Err(_) => panic!("{what}: panicked instead of returning an error"),
        Ok(Ok(_)) => panic!("{what}: accepted"),
        Ok(Err(e)) => assert!(expected(&e), "{what}: wrong error: {e}"),
    }
}

const SENTINEL: f32 = -7.25;

/// Finding 1: An output view whose strides make rows overlap was accepted and written from several
/// threads at once (a data race in safe code). Now it is refused; a permuted but disjoint
/// output (BHSD memory seen as BSND) is still accepted and gets the same values.
#[test]
fn overlapping_outputs_are_refused() {
    let (l, hq, d) = (64, 8, 8);
    let q = random([1, l, hq, d], 1.0, 1, DType::F32);
    let kv = random([1, l, 2, d], 1.0, 2, DType::F32);
    for kn in all_backends("overlapping_outputs_are_refused") {
        let tag = kn.kind().to_string();
        for strides in [[0, 0, 0, 1], [0, d, d, 1], [l * hq * d, hq * d, d / 2, 1], [0, 1, 0, 1]] {
            let mut buf = vec![SENTINEL; l * hq * d];
            expect_err(
                &format!("{tag}: dense prefill into strides {strides:?}"),
                || {
                    kn.dense_prefill(
                        q.view(),
                        kv.view(),
                        kv.view(),
                        None,
                        &mut TensorViewMut::strided(&mut buf[..], [1, l, hq, d], strides),
                        None,
                    )
                },
                |e| matches!(e, Error::Layout { what: "out", .. }),
            );
            assert!(buf.iter().all(|&x| x == SENTINEL), "{tag}: wrote into a refused output");
        }
        // Decode: two new queries written to the same rows.
        let qn = random([1, 2, hq, d], 1.0, 3, DType::F32);
        let mut buf = vec![SENTINEL; hq * d];
        expect_err(
            &format!("{tag}: decode into overlapping rows"),
            || {
                let mut out = TensorViewMut::strided(&mut buf[..], [1, 2, hq, d], [0, 0, d, 1]);
                kn.decode_attention(
                    qn.view(),
                    kv.view().transpose(1, 2)?,
                    kv.view().transpose(1, 2)?,
                    &[l as u32; 2],
                    None,
                    &mut out,
                )
            },
            |e| matches!(e, Error::Layout { what: "out", .. }),
        );
        assert!(buf.iter().all(|&x| x == SENTINEL), "{tag}: decode wrote into a refused output");

        // Disjoint but permuted: [B, H, L, D] memory as a BSND output.
        let mut want = poisoned(q.shape, DType::F32);
        kn.dense_prefill(q.view(), kv.view(), kv.view(), None, &mut want.view_mut(), None).unwrap();
        let mut bhld = vec![f32::NAN; l * hq * d];
        kn.dense_prefill(
            q.view(),
            kv.view(),
            kv.view(),
            None,
            &mut TensorViewMut::strided(&mut bhld[..], [1, l, hq, d], [l * hq * d, d, l * d, 1]),
            None,
        )
        .unwrap();
        let want = want.to_f32_vec();
        for t in 0..l {
            for h in 0..hq {
                assert_eq!(&bhld[(h * l + t) * d..][..d], &want[(t * hq + h) * d..][..d], "{tag}: token {t} head {h}");
            }
        }
    }
}

/// Finding 2: `BlockLists::validate` sliced `indices[indptr[u]..indptr[u+1]]` before checking the
/// offsets: a panic. Now an offset out of order is a `BlockList` error, and a bad scale is
/// reported before the lists are even looked at.
#[test]
fn block_lists_with_wild_offsets_are_errors() {
    let (l, hq, hkv, d) = (200, 4, 2, 32);
    let q = random([1, l, hq, d], 1.0, 1, DType::F32);
    let k = random([1, l, hkv, d], 1.0, 2, DType::F32);
    let cfg =
        EntropyConfig { segment_size: 64, block_size: 8, threshold_len: 64, base_budget: 16, ..Default::default() };
    let mut bl = Kernels::reference().plan(q.view(), k.view(), &cfg, &PlanRequest::default()).unwrap().blocks;
    bl.dense[0] = false;
    bl.indptr[1] = u32::MAX;
    for kn in all_backends("block_lists_with_wild_offsets_are_errors") {
        let mut out = HostTensor::full(DType::F32, q.shape, SENTINEL);
        expect_err(
            &format!("{}: offsets out of order", kn.kind()),
            || kn.sparse_prefill(q.view(), k.view(), k.view(), &bl, None, &mut out.view_mut(), None),
            |e| matches!(e, Error::BlockList { batch: 0, head: 0, segment: 1, .. }),
        );
        expect_err(
            &format!("{}: NaN scale with bad lists", kn.kind()),
            || kn.sparse_prefill(q.view(), k.view(), k.view(), &bl, Some(f32::NAN), &mut out.view_mut(), None),
            |e| matches!(e, Error::NonFinite { field: "scale", .. }),
        );
        assert!(out.to_f32_vec().iter().all(|&x| x == SENTINEL), "{}: wrote on error", kn.kind());
    }
    // The error names the unit whose offsets go backwards: (batch 0, head 1, segment 2).
    let mut bl2 = Kernels::reference().plan(q.view(), k.view(), &cfg, &PlanRequest::default()).unwrap().blocks;
    let u = bl2.dims.unit(0, 1, 2);
    bl2.indptr[u] = u32::MAX;
    let mut out = HostTensor::full(DType::F32, q.shape, SENTINEL);
    expect_err(
        "offsets out of order in head 1",
        || Kernels::cpu().sparse_prefill(q.view(), k.view(), k.view(), &bl2, None, &mut out.view_mut(), None),
        |e| matches!(e, Error::BlockList { batch: 0, head: 1, segment: 2, .. }),
    );
}

/// Finding 3: Broadcast views (zero strides) claiming 2^14 to 2^62 tokens over a few elements passed
/// validation: the CPU backend aborted on its allocation or ran for minutes, the oracle panicked.
/// A view may not claim more elements than its buffer holds.
#[test]
fn broadcast_views_cannot_claim_more_than_their_buffer() {
    let small = vec![0.5f32; 64];
    for tokens in [1usize << 14, 1 << 40, 1 << 62] {
        let big = TensorView::strided(&small[..], [1, tokens, 1, 64], [0, 0, 0, 1]);
        let cache = TensorView::strided(&small[..], [1, 1, tokens, 64], [0, 0, 0, 1]);
        let obs = TensorView::strided(&small[..], [1, 1, 4, 16], [64, 64, 16, 1]);
        let cfg = EntropyConfig { segment_size: 64, block_size: 8, ..Default::default() };
        let dcfg = DecodeConfig { decode_budget: 8, window: 4, ..Default::default() };
        for kn in all_backends("broadcast_views_cannot_claim_more_than_their_buffer") {
            let tag = format!("{} with {tokens} broadcast tokens", kn.kind());
            let layout = |what: &'static str| move |e: &Error| matches!(e, Error::Layout { what: w, .. } if *w == what);
            expect_err(&format!("{tag}: plan"), || kn.plan(big, big, &cfg, &PlanRequest::default()), layout("q"));
            let mut out = vec![SENTINEL; 64];
            expect_err(
                &format!("{tag}: dense prefill"),
                || kn.dense_prefill(big, big, big, None, &mut TensorViewMut::new(&mut out[..], [1, 1, 1, 64]), None),
                layout("q"),
            );
            expect_err(&format!("{tag}: kv_compress"), || kn.kv_compress(cache, cache, obs, &dcfg), layout("k_cache"));
            let q1 = TensorView::new(&small[..], [1, 1, 1, 64]);
            expect_err(
                &format!("{tag}: decode"),
                || {
                    kn.decode_attention(
                        q1,
                        cache,
                        cache,
                        &[1],
                        None,
                        &mut TensorViewMut::new(&mut out[..], [1, 1, 1, 64]),
                    )
                },
                layout("k_cache"),
            );
            assert!(out.iter().all(|&x| x == SENTINEL), "{tag}: wrote on error");
        }
        let mut w = ObservationWindow::new(1, 1, 64, &DecodeConfig::default()).unwrap();
        expect_err("window fed a broadcast prompt", || w.prefill_end(big), |e| matches!(e, Error::Layout { .. }));
    }
}

/// Finding 4: `ObservationWindow::new` reserved `window` queries up front: a 100 GB allocation (an
/// abort) for a window the config accepts; sizes whose product overflows panicked later.
#[test]
fn observation_window_allocates_what_it_is_fed() {
    let cfg = DecodeConfig { window: (1 << 32) - 2, decode_budget: (1 << 32) - 1, decode_gap: 0, ..Default::default() };
    let mut w = ObservationWindow::new(2, 3, 4, &cfg).unwrap();
    let q = random([2, 5, 3, 4], 1.0, 1, DType::F32);
    assert_eq!(w.prefill_end(q.view()).unwrap(), WindowEvent::Observing);
    assert_eq!(w.len(), 5);
    assert_eq!(w.observation(DType::F32).shape, [2, 3, 5, 4]);
    expect_err(
        "a window of 2^40 × 2^40 × 2^40 values per token",
        || ObservationWindow::new(1 << 40, 1 << 40, 1 << 40, &DecodeConfig::default()),
        |e| matches!(e, Error::Alloc { .. }),
    );
}

/// Finding 5: The oracle's pooling walked the whole kernel around every position: a valid kernel of
/// 2^40 + 1 looped for hours. Kernels are bounded now, and the largest allowed one is quick.
#[test]
fn pooling_kernels_are_bounded_and_the_widest_is_quick() {
    let (hq, hkv, n, d, w) = (2, 1, 300, 16, 4);
    let kc = random([1, hkv, n, d], 1.0, 1, DType::F32);
    let vc = random([1, hkv, n, d], 1.0, 2, DType::F32);
    let obs = random([1, hq, w, d], 1.0, 3, DType::F32);
    for kn in all_backends("pooling_kernels_are_bounded_and_the_widest_is_quick") {
        for kernel in [(1usize << 40) + 1, config::MAX_POOLING_KERNEL + 2, usize::MAX] {
            let dc = DecodeConfig { decode_budget: 100, window: w, pooling_kernel: kernel, ..Default::default() };
            expect_err(
                &format!("{}: pooling kernel {kernel}", kn.kind()),
                || kn.kv_compress(kc.view(), vc.view(), obs.view(), &dc),
                |e| matches!(e, Error::OutOfRange { field: "pooling_kernel", .. }),
            );
        }
    }
    let oracle = Kernels::reference();
    for pooling in [Pooling::Avg, Pooling::Max] {
        let dc = DecodeConfig {
            decode_budget: 100,
            window: w,
            pooling,
            pooling_kernel: config::MAX_POOLING_KERNEL,
            ..Default::default()
        };
        let t = Instant::now();
        let want = oracle.kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
        assert!(t.elapsed().as_secs_f64() < 5.0, "{pooling:?}: the oracle took {:?}", t.elapsed());
        let got = Kernels::cpu().kv_compress(kc.view(), vc.view(), obs.view(), &dc).unwrap();
        assert_eq!(got.indices, want.indices, "{pooling:?} with the widest kernel");
    }
}

/// Finding 6: Size arithmetic: `B·Hq·L` of the LSE check wrapped in release builds (an empty LSE buffer
/// was accepted for a huge shape), and shapes whose products overflow panicked in debug builds
/// (`TensorView::new`, the window). All are typed errors in both.
#[test]
fn sizes_that_overflow_are_errors() {
    let one = [0f32; 1];
    let huge = TensorView::strided(&one[..], [1 << 32, 1 << 32, 1, 1], [0, 0, 0, 1]);
    let mut out_buf = [SENTINEL; 1];
    for kn in all_backends("sizes_that_overflow_are_errors") {
        let mut lse: [f32; 0] = [];
        expect_err(
            &format!("{}: 2^64 LSE values in an empty buffer", kn.kind()),
            || {
                let mut out = TensorViewMut::strided(&mut out_buf[..], [1 << 32, 1 << 32, 1, 1], [0, 0, 0, 1]);
                kn.dense_prefill(huge, huge, huge, None, &mut out, Some(&mut lse[..]))
            },
            |e| matches!(e, Error::Layout { what: "q", .. }),
        );
        let overflowing = TensorView::new(&one[..], [1 << 40, 1 << 40, 1 << 40, 1]);
        expect_err(
            &format!("{}: a contiguous view whose strides overflow", kn.kind()),
            || kn.plan(overflowing, overflowing, &EntropyConfig::default(), &PlanRequest::default()),
            |e| matches!(e, Error::Layout { what: "q", .. }),
        );
    }
    assert_eq!(out_buf, [SENTINEL]);
}

/// Finding 7: An absurd `segment_size` was reported as a problem with `seq_len`.
#[test]
fn absurd_segment_sizes_name_segment_size() {
    let q = random([1, 64, 2, 16], 1.0, 1, DType::F32);
    for kn in all_backends("absurd_segment_sizes_name_segment_size") {
        let cfg = EntropyConfig { segment_size: 1 << 40, block_size: 1, ..Default::default() };
        expect_err(
            &format!("{}: segment_size 2^40", kn.kind()),
            || kn.plan(q.view(), q.view(), &cfg, &PlanRequest::default()),
            |e| matches!(e, Error::OutOfRange { field: "segment_size", .. }),
        );
    }
}

/// Buffers that grow faster than the inputs (planning maps are quadratic in L) are allocated
/// fallibly: 2^23 one-token segments ask for 2^46 logits, more than any address space.
#[test]
fn maps_larger_than_memory_are_alloc_errors() {
    let l = 1 << 23;
    let x = vec![0.25f32; l];
    let q = TensorView::new(&x[..], [1, l, 1, 1]);
    let cfg = EntropyConfig { segment_size: 1, block_size: 1, base_budget: 1, threshold_len: 0, ..Default::default() };
    expect_err(
        "cpu: 2^46 planning logits",
        || Kernels::cpu().plan(q, q, &cfg, &PlanRequest::default()),
        |e| matches!(e, Error::Alloc { .. }),
    );
}

/// Inputs whose rows overlap (a zero stride along the cache entries): the CPU backend and the
/// oracle read them; a backend that moves rows with strided copies (Ascend's `DataCopyPad` takes
/// the gap `stride − D` unsigned) refuses them — it read far outside the buffer and crashed the
/// process (SIGSEGV, found by the fuzz harness).
#[test]
fn overlapping_input_rows_are_read_or_refused() {
    let (b, hq, hc, cap, d) = (1, 4, 2, 18, 16);
    let q = random([b, 1, hq, d], 1.0, 1, DType::BF16);
    let k = random([b, hc, cap, d], 1.0, 2, DType::BF16);
    // Every entry of a head is the same row (the buffer holds as many elements as the view claims).
    let vbuf = random([b, hc, cap, d], 1.0, 3, DType::BF16);
    let HostBuffer::BF16(rows) = &vbuf.data else { unreachable!() };
    let v = TensorView::strided(&rows[..], [b, hc, cap, d], [hc * d, d, 0, 1]);
    let lengths = [7, 18];
    let mut want = poisoned(q.shape, DType::BF16);
    Kernels::reference().decode_attention(q.view(), k.view(), v, &lengths, None, &mut want.view_mut()).unwrap();
    for kn in backends_under_test("overlapping_input_rows_are_read_or_refused") {
        let mut out = HostTensor::full(DType::BF16, q.shape, SENTINEL);
        let r = kn.decode_attention(q.view(), k.view(), v, &lengths, None, &mut out.view_mut());
        if kn.capabilities().overlapping_rows {
            r.unwrap();
            let err = out.to_f32_vec().iter().zip(want.to_f32_vec()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 2e-2, "{}: {err}", kn.kind());
        } else {
            assert!(matches!(r, Err(Error::Layout { what: "v_cache", .. })), "{}: {r:?}", kn.kind());
            assert!(out.to_f32_vec().iter().all(|&x| x == SENTINEL), "{}: wrote on error", kn.kind());
        }
    }
}

/// Block lists made for a segment size beyond 32 bits describe a valid single dense segment, but
/// the device backends take the size in 32 bits: the emulated CUDA prefill looped forever on
/// `2^32 - 2` (found by the fuzz harness). They are refused like the config's.
#[test]
fn block_lists_with_a_segment_size_beyond_32_bits_are_refused() {
    let q = random([1, 31, 2, 8], 1.0, 1, DType::F32);
    let kv = random([1, 31, 1, 8], 1.0, 2, DType::F32);
    let dims = PlanDims::new(1, 31, 2, 1, (1 << 32) - 2, 1);
    let bl = BlockLists::all_dense(dims);
    for kn in all_backends("block_lists_with_a_segment_size_beyond_32_bits_are_refused") {
        let mut out = HostTensor::full(DType::F32, q.shape, SENTINEL);
        expect_err(
            &format!("{}: segment size 2^32 - 2", kn.kind()),
            || kn.sparse_prefill(q.view(), kv.view(), kv.view(), &bl, None, &mut out.view_mut(), None),
            |e| matches!(e, Error::OutOfRange { field: "plan segment_size", .. }),
        );
        assert!(out.to_f32_vec().iter().all(|&x| x == SENTINEL), "{}: wrote on error", kn.kind());
    }
}

//! A decode step captured in a CUDA graph and replayed (SPEC §7.6), on a GPU or the emulated
//! driver. Its own binary: a global-mode capture refuses context synchronisations, which other
//! tests' backends make when they close.
#![cfg(feature = "cuda")]

mod common;

use common::*;
use entropy_kernels::cuda::{CudaTensor, CudaTensorMut};
use entropy_kernels::*;

/// A decode step (`append_on` + a planned `run_attend_on`) captured in a CUDA graph: nothing runs
/// during the capture, and a replay with the step's new rows and queries written afterwards
/// gives what the host append + attend give. What the driver refuses is refused: the legacy
/// default stream cannot capture, and cudarc's event tracking (on for any stream but the legacy
/// one) waits on events recorded outside the capture, which invalidates it — capture with
/// tracking off. On the emulator only (it records kernel launches only): planning inside a
/// capture is refused.
#[test]
fn a_decode_step_replays_in_a_cuda_graph() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use entropy_kernels::cuda::{CudaAttendPlan, CudaPagedCache};
    type T = half::f16;
    let Some(be) = cuda_backend("cuda_device_graph") else { return };
    let seed = seed("cuda_device_graph");
    // The backend's own stream is the context's legacy default stream, which cannot capture: a
    // stream of the engine's.
    let ctx = be.stream().context().clone();
    let stream = ctx.new_stream().unwrap();
    let dtype = DType::F16;
    let cpu = Kernels::cpu();
    let (hq, hkv, d, ps, seqs, width) = (8, 2, 64, 16, 2, 32);
    let layout = PageLayout::slot_major(seqs * width, ps, hkv, d);
    let mut host = PagedCache::interleaved(dtype, layout, seqs, width).unwrap();
    let mut ws = Workspace::new();
    let cu0 = [0u32, 50, 83];
    let (k0, v0) = (random([1, 83, hkv, d], 1.0, seed, dtype), random([1, 83, hkv, d], 1.0, seed ^ 1, dtype));
    cpu.append(k0.view(), v0.view(), &cu0, &mut host.cache_mut(), &mut ws).unwrap();
    let mut dc = CudaPagedCache::<T>::upload(&stream, &host).unwrap();
    // The step's buffers: one new row and one query per sequence, written before each replay.
    let cu = [0u32, 1, 2];
    let cud = stream.clone_htod(&cu).unwrap();
    let (mut knd, mut vnd) =
        (stream.alloc_zeros::<T>(2 * hkv * d).unwrap(), stream.alloc_zeros::<T>(2 * hkv * d).unwrap());
    let mut qd = stream.alloc_zeros::<T>(2 * hq * d).unwrap();
    let poison = typed::<T>(&poisoned([1, 2, hq, d], dtype));
    let mut od = stream.clone_htod(&poison).unwrap();
    let after: Vec<u32> = dc.lens_host.iter().map(|&l| l + 1).collect();
    let mut plan = CudaAttendPlan::new();
    {
        let cache = dc.view_with_lens(&after, &stream).unwrap();
        let qt = CudaTensor::bsnd(&qd, &stream, [1, 2, hq, d]);
        let ot = CudaTensorMut::bsnd(&mut od, &stream, [1, 2, hq, d]);
        be.plan_attend_on(&stream, &mut plan, &qt, &cu, &cache, &[], None, &ot, None).unwrap();
    }
    stream.synchronize().unwrap();
    let step = |dc: &mut CudaPagedCache<T>, od: &mut cudarc::driver::CudaSlice<T>, ws: &mut Workspace| -> Result<()> {
        let (kt, vt) =
            (CudaTensor::bsnd(&knd, &stream, [1, 2, hkv, d]), CudaTensor::bsnd(&vnd, &stream, [1, 2, hkv, d]));
        be.append_on(&stream, &kt, &vt, &cu, &cud, &mut dc.view_mut(&stream)?, ws)?;
        let cache = dc.view(&stream)?;
        let qt = CudaTensor::bsnd(&qd, &stream, [1, 2, hq, d]);
        let mut ot = CudaTensorMut::bsnd(od, &stream, [1, 2, hq, d]);
        be.run_attend_on(&stream, &plan, &qt, &cache, &mut ot, None)
    };
    let global = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL;
    let flags = CUgraphInstantiate_flags(0);
    assert!(be.stream().begin_capture(global).is_err(), "the legacy default stream cannot capture");
    let _ = ctx.check_err();
    let before = dc.lens_host.clone();
    assert!(ctx.is_in_multi_stream_mode(), "a stream of our own puts cudarc in multi-stream mode");
    if ctx.is_event_tracking() {
        // cudarc waits on the pools' write events, recorded before the capture: refused.
        stream.begin_capture(global).unwrap();
        let r = step(&mut dc, &mut od, &mut ws);
        assert!(r.is_err(), "the refused wait is reported by the next call");
        // cudarc keeps the errors of its event records on the invalidated stream: cleared, or
        // end_capture would answer with them before ending the capture.
        let _ = ctx.check_err();
        assert!(stream.end_capture(flags).is_err(), "a capture waiting on outside events must be invalidated");
        let _ = ctx.check_err();
        dc.lens_host.clone_from(&before);
    }
    // SAFETY: the test orders its streams itself (everything on `stream`, the backend's default
    // stream idle); nothing else uses this backend's context.
    unsafe { ctx.disable_event_tracking() };
    stream.begin_capture(global).unwrap();
    step(&mut dc, &mut od, &mut ws).unwrap();
    let graph = stream.end_capture(flags).unwrap().expect("a graph");
    // append_on advanced the host mirror once, at the capture: each replay appends on the device
    // only, so an engine advances its mirror itself per replay.
    assert_eq!(dc.lens_host, after, "append_on advanced the host mirror for the step");
    assert_eq!(stream.clone_dtoh(&dc.lens).unwrap(), before, "nothing ran during the capture (lengths)");
    let bits = |v: Vec<T>| bytemuck::cast_slice::<T, u8>(&v).to_vec();
    assert!(bits(stream.clone_dtoh(&od).unwrap()) == bits(poison.clone()), "nothing ran during the capture (output)");
    // The step's data, written after the capture; then the replay.
    let (kn, vn) = (random([1, 2, hkv, d], 1.0, seed ^ 2, dtype), random([1, 2, hkv, d], 1.0, seed ^ 3, dtype));
    let q = random([1, 2, hq, d], 1.0, seed ^ 4, dtype);
    stream.memcpy_htod(&typed::<T>(&kn), &mut knd).unwrap();
    stream.memcpy_htod(&typed::<T>(&vn), &mut vnd).unwrap();
    stream.memcpy_htod(&typed::<T>(&q), &mut qd).unwrap();
    graph.launch().unwrap();
    stream.synchronize().unwrap();
    cpu.append(kn.view(), vn.view(), &cu, &mut host.cache_mut(), &mut ws).unwrap();
    let mut want = poisoned(q.shape, dtype);
    cpu.attend(q.view(), &cu, &host.cache(), &[], None, &mut want.view_mut(), None, &mut ws).unwrap();
    // The mirror was advanced at the capture (asserted above): the pools and device lengths.
    assert!(dc.matches_host(&stream, &host).unwrap(), "replayed append = the host append (pools, lengths)");
    let got = HostTensor::from_f32(&typed_back::<T>(&stream.clone_dtoh(&od).unwrap(), dtype), q.shape, dtype);
    let err = rel_fro(&tensor_f64(&got), &tensor_f64(&want));
    assert!(err <= attn_tol(dtype), "replayed attention: rel err {err:e}");
    // A graph-stable plan: one capture replays while the caches grow past what its first plan
    // saw (300 entries appended outside the graph before the last round), re-planned between
    // replays; a regular plan's split shape changes over the same growth.
    let mut stable = CudaAttendPlan::graph_stable(1024);
    let mut regular = CudaAttendPlan::new();
    let mut shapes = Vec::new();
    let mut graph = None;
    for round in 0..3u64 {
        if round == 2 {
            let grow = [0u32, 300, 600];
            let (kg, vg) =
                (random([1, 600, hkv, d], 1.0, seed ^ 20, dtype), random([1, 600, hkv, d], 1.0, seed ^ 21, dtype));
            let (kgd, vgd) =
                (stream.clone_htod(&typed::<T>(&kg)).unwrap(), stream.clone_htod(&typed::<T>(&vg)).unwrap());
            let gd = stream.clone_htod(&grow).unwrap();
            let (kt, vt) = (CudaTensor::bsnd(&kgd, &stream, kg.shape), CudaTensor::bsnd(&vgd, &stream, vg.shape));
            be.append_on(&stream, &kt, &vt, &grow, &gd, &mut dc.view_mut(&stream).unwrap(), &mut ws).unwrap();
            cpu.append(kg.view(), vg.view(), &grow, &mut host.cache_mut(), &mut ws).unwrap();
        }
        let after: Vec<u32> = dc.lens_host.iter().map(|&l| l + 1).collect();
        {
            let cache = dc.view_with_lens(&after, &stream).unwrap();
            let qt = CudaTensor::bsnd(&qd, &stream, [1, 2, hq, d]);
            let ot = CudaTensorMut::bsnd(&mut od, &stream, [1, 2, hq, d]);
            be.plan_attend_on(&stream, &mut stable, &qt, &cu, &cache, &[], None, &ot, None).unwrap();
            be.plan_attend_on(&stream, &mut regular, &qt, &cu, &cache, &[], None, &ot, None).unwrap();
        }
        shapes.push((stable.launch_shape().unwrap(), regular.launch_shape().unwrap()));
        if graph.is_none() {
            stream.synchronize().unwrap();
            stream.begin_capture(global).unwrap();
            {
                let (kt, vt) =
                    (CudaTensor::bsnd(&knd, &stream, [1, 2, hkv, d]), CudaTensor::bsnd(&vnd, &stream, [1, 2, hkv, d]));
                be.append_on(&stream, &kt, &vt, &cu, &cud, &mut dc.view_mut(&stream).unwrap(), &mut ws).unwrap();
                let cache = dc.view(&stream).unwrap();
                let qt = CudaTensor::bsnd(&qd, &stream, [1, 2, hq, d]);
                let mut ot = CudaTensorMut::bsnd(&mut od, &stream, [1, 2, hq, d]);
                be.run_attend_on(&stream, &stable, &qt, &cache, &mut ot, None).unwrap();
            }
            graph = Some(stream.end_capture(flags).unwrap().expect("a graph"));
        } else {
            dc.lens_host.clone_from(&after); // the engine's mirror, per replay
        }
        let s = seed ^ (round * 100 + 30);
        let (kn, vn) = (random([1, 2, hkv, d], 1.0, s, dtype), random([1, 2, hkv, d], 1.0, s ^ 1, dtype));
        let q = random([1, 2, hq, d], 1.0, s ^ 2, dtype);
        stream.memcpy_htod(&typed::<T>(&kn), &mut knd).unwrap();
        stream.memcpy_htod(&typed::<T>(&vn), &mut vnd).unwrap();
        stream.memcpy_htod(&typed::<T>(&q), &mut qd).unwrap();
        graph.as_ref().unwrap().launch().unwrap();
        stream.synchronize().unwrap();
        cpu.append(kn.view(), vn.view(), &cu, &mut host.cache_mut(), &mut ws).unwrap();
        let mut want = poisoned(q.shape, dtype);
        cpu.attend(q.view(), &cu, &host.cache(), &[], None, &mut want.view_mut(), None, &mut ws).unwrap();
        assert!(dc.matches_host(&stream, &host).unwrap(), "graph-stable round {round}: replayed append");
        let got = HostTensor::from_f32(&typed_back::<T>(&stream.clone_dtoh(&od).unwrap(), dtype), q.shape, dtype);
        let err = rel_fro(&tensor_f64(&got), &tensor_f64(&want));
        assert!(err <= attn_tol(dtype), "graph-stable round {round}: replayed attention, rel err {err:e}");
    }
    assert_eq!(shapes[0].0, shapes[2].0, "the graph-stable plan kept its launch shape");
    assert_ne!(
        shapes[0].1, shapes[2].1,
        "a regular plan's shape changes over this growth (else the test shows nothing)"
    );
    // A graph-stable plan refuses what would break its capture, and stays as it was.
    {
        let cache = dc.view(&stream).unwrap();
        let qt = CudaTensor::bsnd(&qd, &stream, [1, 2, hq, d]);
        let ot = CudaTensorMut::bsnd(&mut od, &stream, [1, 2, hq, d]);
        let mut small = CudaAttendPlan::graph_stable(64);
        assert!(matches!(
            be.plan_attend_on(&stream, &mut small, &qt, &cu, &cache, &[], None, &ot, None),
            Err(Error::OutOfRange { .. })
        ));
        assert_eq!(small.launch_shape(), None);
        let before = stable.launch_shape();
        let one = [0u32, 2, 2]; // both tokens to the first sequence: fewer tiles
        let bad = be.plan_attend_on(&stream, &mut stable, &qt, &one, &cache, &[], None, &ot, None).unwrap_err();
        assert!(matches!(bad, Error::PlanMismatch(_)), "another tile count: {bad}");
        assert_eq!(stable.launch_shape(), before, "a refused re-plan leaves the plan as it was");
    }
    // Planning allocates and copies tiles from the host: the emulated capture, which records
    // kernel launches only, refuses it and invalidates the capture.
    if !be.describe().contains("emulator") {
        return;
    }
    stream.begin_capture(global).unwrap();
    {
        let cache = dc.view(&stream).unwrap();
        let qt = CudaTensor::bsnd(&qd, &stream, [1, 2, hq, d]);
        let ot = CudaTensorMut::bsnd(&mut od, &stream, [1, 2, hq, d]);
        let mut fresh = CudaAttendPlan::new();
        assert!(be.plan_attend_on(&stream, &mut fresh, &qt, &cu, &cache, &[], None, &ot, None).is_err());
    }
    assert!(stream.end_capture(flags).is_err(), "a capture that planned must be invalidated");
    let _ = ctx.check_err();
}

//! The Ascend backend's ACL path without an NPU: probing never panics and says why; through the
//! mock ACL library (`ascend/mock_acl`, launches run on the emulator) every ACL failure surfaces
//! as `Error::Acl` carrying `aclGetRecentErrMsg`, leaves the output untouched, and the binary
//! loader's magic and the launch-argument block are what the runtime documents.
#![cfg(feature = "ascend")]

mod common;

use common::*;
use entropy_kernels::*;

/// The mock runtime's injected failures are process-wide: the tests that go through it take turns.
#[cfg(feature = "ascend-emu")]
fn mock_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn probe_reports_why_without_panicking() {
    match Kernels::new(BackendKind::Ascend) {
        Ok(k) => eprintln!("an NPU is present: {}", k.describe()),
        Err(Error::BackendUnavailable { backend: "ascend", reason }) => {
            eprintln!("ascend unavailable: {reason}");
            assert!(!reason.is_empty());
        }
        Err(e) => panic!("probing must answer BackendUnavailable, got {e}"),
    }
}

#[test]
fn args_block_is_little_endian_gm_addrs() {
    use entropy_kernels::ascend::launch::{DECODE, PREFILL, kernel_args, pack_args};
    assert_eq!(pack_args(&kernel_args(DECODE, 7, 0x0102_0304_0506_0708)), [8, 7, 6, 5, 4, 3, 2, 1]);
    // A mixed kernel takes the hardware sync address first (its SetSyncBaseAddr), then the params.
    assert_eq!(pack_args(&kernel_args(PREFILL, 0x11, 0x22)), [0x11, 0, 0, 0, 0, 0, 0, 0, 0x22, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(PREFILL.entry(), "ek_prefill_mix_aic");
    assert_eq!(DECODE.entry(), "ek_decode");
}

#[cfg(feature = "ascend-emu")]
#[test]
fn acl_errors_through_the_mock_runtime() {
    use entropy_kernels::ascend::device::{AscendBackend, mock};
    use entropy_kernels::ascend::launch::DECODE;
    use std::sync::Arc;

    let _turn = mock_turn();
    let dir = std::env::temp_dir().join(format!("ek-acl-test-{}", std::process::id()));
    let opts = mock::options(&dir).unwrap();
    let k = Kernels::from_backend(Arc::new(AscendBackend::with_options(&opts).unwrap()));

    // A decode call, checked against the oracle, then the same call with each ACL step failing.
    let (b, hq, hc, d, cap) = (1, 4, 2, 64, 37);
    let seed = seed("ascend_acl");
    let q = random([b, 1, hq, d], 1.0, seed, DType::F16);
    let kc = random([b, hc, cap, d], 1.0, seed ^ 1, DType::F16);
    let vc = random([b, hc, cap, d], 1.0, seed ^ 2, DType::F16);
    let lengths = vec![cap as u32, 20];
    let mut want = poisoned(q.shape, DType::F16);
    Kernels::reference()
        .decode_attention(q.view(), kc.view(), vc.view(), &lengths, None, &mut want.view_mut())
        .unwrap();
    let mut out = poisoned(q.shape, DType::F16);
    k.decode_attention(q.view(), kc.view(), vc.view(), &lengths, None, &mut out.view_mut()).unwrap();
    assert!(rel_fro(&tensor_f64(&out), &tensor_f64(&want)) <= attn_tol(DType::F16));

    for api in ["aclrtMalloc", "aclrtMemcpy", "aclrtLaunchKernel", "aclrtSynchronizeStreamWithTimeout"] {
        mock::fail(Some(api));
        let mut out = poisoned(q.shape, DType::F16);
        let r = k.decode_attention(q.view(), kc.view(), vc.view(), &lengths, None, &mut out.view_mut());
        mock::fail(None);
        match r {
            Err(Error::Acl { call, code: 507899, message }) => {
                assert!(call.starts_with(api), "{api}: failed call reported as {call}");
                assert!(message.contains("injected failure of"), "{api}: message {message}");
            }
            other => panic!("{api}: expected Error::Acl, got {other:?}"),
        }
        assert!(tensor_f64(&out).iter().all(|x| x.is_nan()), "{api}: output written despite the error");
    }

    // The loader is told which cores a binary is for; a wrong magic is refused by the runtime.
    let bad = dir.join("bad");
    let mut opts_bad = mock::options(&bad).unwrap();
    std::fs::write(bad.join(format!("{}.o", DECODE.file)), mock::image(DECODE.file, 0x43554245)).unwrap();
    opts_bad.kernel_dir = Some(bad.clone());
    match AscendBackend::with_options(&opts_bad) {
        Err(Error::Acl { call: "aclrtBinaryLoadFromData", message, .. }) => {
            assert!(message.contains("magic"), "{message}")
        }
        other => panic!("wrong magic: expected Error::Acl from the loader, got {other:?}"),
    }

    // Missing binaries: a clear unavailability, naming the directory variable.
    opts_bad.kernel_dir = Some(dir.join("empty"));
    match AscendBackend::with_options(&opts_bad) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("decode.o"), "{path}"),
        other => panic!("missing binary: expected Error::Io, got {other:?}"),
    }
    // Start-up failures are typed too (a repeated aclInit, by contrast, is accepted above).
    for api in ["aclInit", "aclrtSetDevice", "aclrtCreateStream"] {
        mock::fail(Some(api));
        let r = AscendBackend::with_options(&opts);
        mock::fail(None);
        match r {
            Err(Error::Acl { call, .. }) => assert_eq!(call, api),
            other => panic!("{api}: expected Error::Acl, got {other:?}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A kernel that never ends (here a planted cross-core deadlock: the AIC waits for a flag no AIV
/// sets) fails the stream sync with a timeout — `aclrtSynchronizeStreamWithTimeout` — instead of
/// hanging the process; and a mixed kernel is found under its `_mix_aic` entry and launched with
/// the hardware sync address first (issue 18).
#[cfg(feature = "ascend-emu")]
#[test]
fn a_hung_mixed_kernel_is_a_timeout_error() {
    use entropy_kernels::ascend::device::mock;
    use entropy_kernels::ascend::launch::{Cores, Kernel, kernel_args, pack_args};
    use entropy_kernels::ascend::runtime::AclRuntime;

    let _turn = mock_turn();
    let dir = std::env::temp_dir().join(format!("ek-acl-hang-{}", std::process::id()));
    let opts = mock::options(&dir).unwrap();
    let rt = AclRuntime::load(&opts).unwrap();
    let selftest = Kernel { symbol: "selftest_cube", file: "selftest", cores: Cores::Mix };
    let image = format!("ekmock selftest_cube_mix_aic,selftest_cube_mix_aiv {:x}", mock::magic(selftest));
    let module = rt.module(Cores::Mix, image.as_bytes()).unwrap();
    let function = module.function(selftest).expect("the _mix_aic entry");
    let stream = rt.stream().unwrap();
    let run = |code: i32| {
        // The self test's params: its code, then two host pointers it does not use here.
        let mut params = vec![0u8; 24];
        params[..4].copy_from_slice(&code.to_le_bytes());
        let mut p = rt.alloc(params.len()).unwrap();
        p.upload(&params).unwrap();
        let args = pack_args(&kernel_args(selftest, rt.hardware_sync, p.addr()));
        let mut a = rt.alloc(args.len()).unwrap();
        a.upload(&args).unwrap();
        stream.launch(&function, 1, &a, args.len())?;
        stream.synchronize()
    };
    match run(34) {
        Err(Error::Acl { call, message, .. }) => {
            assert_eq!(call, "aclrtSynchronizeStreamWithTimeout");
            assert!(message.contains("timeout"), "{message}");
        }
        other => panic!("a deadlocked kernel must end in a sync timeout, got {other:?}"),
    }
    // ACL does not abort the kernel: the runtime is tainted — later launches fail at once, and
    // the stream (which would never drain) is not destroyed, nor are buffers freed under it.
    assert!(rt.tainted());
    match run(0) {
        Err(Error::Poisoned { what, .. }) => assert_eq!(what, "the ACL runtime"),
        other => panic!("a tainted runtime refuses launches, got {other:?}"),
    }
    let blocked = mock::blocked_destroys();
    drop((function, module, stream));
    assert_eq!(mock::blocked_destroys(), blocked, "the hung stream was not destroyed (it would block)");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Core counts come from the device (`aclrtGetDeviceInfo`: the mock reports 4 AI cores and 8
/// AIVs), not from a constant (before issue 18: 40 AIVs, 20 mixed groups whatever the SoC); the
/// options' `vector_cores` (`ENTROPY_KERNELS_ASCEND_CORES`) still overrides, mixed launches taking
/// half as many AI cores.
#[cfg(feature = "ascend-emu")]
#[test]
fn core_counts_come_from_the_device() {
    use entropy_kernels::ascend::device::mock;
    use entropy_kernels::ascend::launch::{DECODE, PREFILL};
    use entropy_kernels::ascend::runtime::AclRuntime;

    let _turn = mock_turn();
    let dir = std::env::temp_dir().join(format!("ek-acl-cores-{}", std::process::id()));
    let mut opts = mock::options(&dir).unwrap();
    let rt = AclRuntime::load(&opts).unwrap();
    assert_eq!((rt.vector_cores, rt.ai_cores), (8, 4), "what aclrtGetDeviceInfo reports");
    assert_eq!((rt.block_dim(DECODE), rt.block_dim(PREFILL)), (8, 4));
    drop(rt);
    opts.vector_cores = Some(6);
    let rt = AclRuntime::load(&opts).unwrap();
    assert_eq!((rt.block_dim(DECODE), rt.block_dim(PREFILL)), (6, 3), "the override");
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A serving loop on an `AscendPagedCache` (pools in device memory) through the `_on` calls:
/// prompt append, causal attention with LSE, scores, selection and in-place compaction, then a
/// decode step — each result against the oracle on a host copy of the same cache (the pools
/// bit for bit: append and compaction are copies). The decode step's traffic through the mock
/// runtime (bytes copied each way, bytes allocated) is the same for a pool 50× larger, and a
/// small fraction of what the host-data calls move for the same step (they upload the pools).
#[cfg(feature = "ascend-emu")]
#[test]
fn resident_cache_serves_a_loop_without_moving_its_pools() {
    use entropy_kernels::ascend::device::{AscendBackend, mock};
    use entropy_kernels::ascend::resident::AscendPagedCache;
    use entropy_kernels::engine::{PageLayout, PagedCache, Workspace};

    let _turn = mock_turn();
    let test = "resident_cache_serves_a_loop";
    let backend = mock_ascend(test).unwrap();
    let host_path = Kernels::from_backend(std::sync::Arc::new(mock_ascend(test).unwrap()));
    let oracle = Kernels::reference();
    let (seqs, hq, hkv, d, ps, width) = (2, 4, 2, 64, 16, 8);
    let dtype = DType::F32;
    let close = |tag: &str, got: &[f32], want: &[f32]| {
        assert_eq!(got.len(), want.len(), "{tag}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{tag}[{i}]: {g} vs {w}");
        }
    };
    let same_pools = |tag: &str, dev: &AscendPagedCache, host: &PagedCache| {
        let back = dev.to_host().unwrap();
        assert_eq!(back.lens, host.lens, "{tag}: lengths");
        assert!(back.k.data().as_bytes() == host.k.data().as_bytes(), "{tag}: K pool");
        assert!(back.v.data().as_bytes() == host.v.data().as_bytes(), "{tag}: V pool");
    };
    let serve = |backend: &AscendBackend, spare: usize, seed: u64| -> (mock::Traffic, mock::Traffic) {
        let ids: Vec<u32> = (0..(seqs * width) as u32).rev().collect();
        let layout = if seed.is_multiple_of(2) {
            PageLayout::slot_major(seqs * width + spare, ps, hkv, d)
        } else {
            PageLayout::head_major(seqs * width + spare, ps, hkv, d)
        };
        let fresh = AscendPagedCache::new(backend, dtype, layout, ids.clone(), width).unwrap();
        let zeros = fresh.to_host().unwrap();
        assert!(zeros.k.to_f32_vec().iter().all(|&x| x == 0.0) && zeros.lens == vec![0; seqs * hkv]);
        let mut host = PagedCache::new(dtype, layout, ids, width, f32::NAN).unwrap();
        let mut dev = AscendPagedCache::upload(backend, &host).unwrap();
        let (mut ws, mut ws_dev) = (Workspace::new(), Workspace::new());

        // The prompts (40 and 27 tokens), appended and attended causally with LSE.
        let cu = [0u32, 40, 67];
        let (k_new, v_new) = (random([1, 67, hkv, d], 1.0, seed, dtype), random([1, 67, hkv, d], 1.0, seed ^ 1, dtype));
        oracle.append(k_new.view(), v_new.view(), &cu, &mut host.cache_mut(), &mut ws).unwrap();
        backend.append_on(&k_new.view(), &v_new.view(), &cu, &mut dev, &mut ws_dev).unwrap();
        same_pools("prompt append", &dev, &host);
        let attend = |q: &HostTensor, cu: &[u32], host: &PagedCache, dev: &AscendPagedCache, tag: &str| {
            let (mut want, mut got) = (poisoned(q.shape, dtype), poisoned(q.shape, dtype));
            let t = q.shape[1];
            let (mut lse_want, mut lse_got) = (vec![f32::NAN; t * hq], vec![f32::NAN; t * hq]);
            let mut ws = Workspace::new();
            let lse = Some(&mut lse_want[..]);
            oracle.attend(q.view(), cu, &host.cache(), &[], None, &mut want.view_mut(), lse, &mut ws).unwrap();
            backend.attend_on(&q.view(), cu, dev, &[], None, &mut got.view_mut(), Some(&mut lse_got)).unwrap();
            close(&format!("{tag} out"), &got.to_f32_vec(), &want.to_f32_vec());
            close(&format!("{tag} lse"), &lse_got, &lse_want);
        };
        attend(&random([1, 67, hq, d], 1.0, seed ^ 2, dtype), &cu, &host, &dev, "prefill");

        // Scores, selection by them, compaction in place.
        let cfg = DecodeConfig { decode_budget: 24, window: 8, ..DecodeConfig::latent() };
        let obs = random([seqs, hq, cfg.window, d], 1.0, seed ^ 3, dtype);
        let want = oracle.kv_scores(&host.cache(), obs.view(), &cfg, &[]).unwrap();
        let got = backend.kv_scores_on(&dev, &obs.view(), &cfg, &[]).unwrap();
        assert_eq!((got.compressed.clone(), got.lens.clone()), (want.compressed.clone(), want.lens.clone()));
        for (u, (g, w)) in got.rows.iter().zip(&want.rows).enumerate() {
            close(&format!("scores {u}"), g, w);
        }
        let sel = backend.select_on(&dev, &obs.view(), &cfg, &[]).unwrap();
        assert_eq!(sel, got.select(&cfg).unwrap());
        oracle.kv_compact(&mut host.cache_mut(), &sel, &mut ws).unwrap();
        backend.compact_on(&mut dev, &sel, &mut ws_dev).unwrap();
        same_pools("compaction", &dev, &host);
        assert_eq!(dev.lens, vec![24; seqs * hkv]);

        // One decode step (a token per sequence), its traffic measured.
        let cu1 = [0u32, 1, 2];
        let (k1, v1) = (random([1, 2, hkv, d], 1.0, seed ^ 4, dtype), random([1, 2, hkv, d], 1.0, seed ^ 5, dtype));
        let q1 = random([1, 2, hq, d], 1.0, seed ^ 6, dtype);
        let mut out = poisoned(q1.shape, dtype);
        let before = mock::traffic();
        backend.append_on(&k1.view(), &v1.view(), &cu1, &mut dev, &mut ws_dev).unwrap();
        backend.attend_on(&q1.view(), &cu1, &dev, &[], None, &mut out.view_mut(), None).unwrap();
        let resident = mock::traffic() - before;
        // The same step through the host-data calls, on a copy of the host cache.
        let mut copy = host.clone();
        let before = mock::traffic();
        host_path.append(k1.view(), v1.view(), &cu1, &mut copy.cache_mut(), &mut ws).unwrap();
        host_path.attend(q1.view(), &cu1, &copy.cache(), &[], None, &mut out.view_mut(), None, &mut ws).unwrap();
        let host_data = mock::traffic() - before;
        oracle.append(k1.view(), v1.view(), &cu1, &mut host.cache_mut(), &mut ws).unwrap();
        same_pools("decode append", &dev, &host);
        attend(&q1, &cu1, &host, &dev, "decode");
        (resident, host_data)
    };
    let seed = seed(test);
    for s in [seed, seed ^ 0x55] {
        let (small, small_host) = serve(&backend, 0, s);
        let (large, large_host) = serve(&backend, 50 * seqs * width, s);
        let pool_bytes = (50 + 1) * seqs * width * ps * hkv * d * dtype.size();
        eprintln!(
            "decode step traffic, resident: {large:?}; host-data calls: {large_host:?} (pools of {pool_bytes} bytes)"
        );
        assert_eq!(small, large, "a resident decode step's traffic does not grow with the pools");
        assert!(small_host.to_device < large_host.to_device, "the host-data calls upload the pools");
        assert!(large_host.to_device as usize >= 2 * pool_bytes);
        assert!((large.to_device + large.to_host) * 100 < large_host.to_device + large_host.to_host);
    }
}

/// ACL acts on the calling thread's current context, which `aclrtSetDevice` sets on its own
/// thread only (the mock refuses runtime calls on a thread without one, as ACL does): a backend
/// opened on one thread serves calls from others, and a resident cache made on one thread is
/// used and dropped on another.
#[cfg(feature = "ascend-emu")]
#[test]
fn backends_and_resident_caches_serve_any_thread() {
    use entropy_kernels::ascend::resident::AscendPagedCache;
    use entropy_kernels::engine::{PageLayout, Workspace};
    use std::sync::Arc;

    let _turn = mock_turn();
    let backend = Arc::new(mock_ascend("any_thread").unwrap());
    let layout = PageLayout::slot_major(4, 16, 2, 64);
    let mut cache = AscendPagedCache::new(&backend, DType::F16, layout, vec![3, 1], 2).unwrap();
    let seed = seed("any_thread");
    let kernels = Kernels::from_backend(backend.clone());
    std::thread::spawn(move || {
        // Host-data calls through `Kernels`, then the resident calls, on a thread that never set
        // the device.
        let (q, kc, vc) = random_qkv([1, 20, 4, 2, 64], seed, DType::F16);
        let mut out = poisoned(q.shape, DType::F16);
        kernels.dense_prefill(q.view(), kc.view(), vc.view(), None, &mut out.view_mut(), None).unwrap();
        let cu = [0u32, 20];
        backend.append_on(&kc.view(), &vc.view(), &cu, &mut cache, &mut Workspace::new()).unwrap();
        let mut got = poisoned(q.shape, DType::F16);
        backend.attend_on(&q.view(), &cu, &cache, &[], None, &mut got.view_mut(), None).unwrap();
        // Different kernels (the cube prefill, the vector attention), f16 outputs: close, not equal.
        let diff = got.to_f32_vec().iter().zip(out.to_f32_vec()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-2, "the resident attention differs from the one-shot prefill by {diff}");
        drop(cache);
    })
    .join()
    .unwrap();
    // An engine's thread keeps its own current context across our calls.
    let backend = Arc::new(mock_ascend("any_thread").unwrap());
    std::thread::spawn(move || {
        use entropy_kernels::ascend::device::mock;
        mock::use_engine_context();
        let cache = AscendPagedCache::new(&backend, DType::F32, layout, vec![0, 2], 2).unwrap();
        assert!(cache.to_host().unwrap().lens.iter().all(|&l| l == 0));
        drop(cache);
        assert!(mock::engine_context_current(), "the engine's context is current again");
    })
    .join()
    .unwrap();
}

/// A resident call that fails after its checks leaves its pools undefined: the cache is
/// poisoned and every later call says so; a call refused by its checks changes nothing.
#[cfg(feature = "ascend-emu")]
#[test]
fn a_failed_resident_write_poisons_the_cache() {
    use entropy_kernels::ascend::device::mock;
    use entropy_kernels::ascend::resident::AscendPagedCache;
    use entropy_kernels::engine::{PageLayout, Selection, Workspace};

    let _turn = mock_turn();
    let backend = mock_ascend("poisons").unwrap();
    let seed = seed("poisons");
    let layout = PageLayout::head_major(4, 16, 2, 64);
    for call in ["append_on", "compact_on"] {
        let mut cache = AscendPagedCache::new(&backend, DType::F32, layout, vec![2, 0], 2).unwrap();
        let (k, v) = (random([1, 20, 2, 64], 1.0, seed, DType::F32), random([1, 20, 2, 64], 1.0, seed ^ 1, DType::F32));
        let cu = [0u32, 20];
        let mut ws = Workspace::new();
        if call == "compact_on" {
            backend.append_on(&k.view(), &v.view(), &cu, &mut cache, &mut ws).unwrap();
        }
        let sel = Selection::from_lists(2, vec![true], [(2..10).collect(), (0..5).collect()]);
        // Refused by the checks (a page past the pool): nothing launched, nothing poisoned.
        cache.table[0] = 9;
        let refused = match call {
            "append_on" => backend.append_on(&k.view(), &v.view(), &cu, &mut cache, &mut ws),
            _ => backend.compact_on(&mut cache, &sel, &mut ws),
        };
        assert!(matches!(refused, Err(Error::OutOfRange { .. })), "{call}: {refused:?}");
        cache.table[0] = 2;
        let before = cache.lens.clone();
        mock::fail(Some("aclrtLaunchKernel"));
        let failed = match call {
            "append_on" => backend.append_on(&k.view(), &v.view(), &cu, &mut cache, &mut ws),
            _ => backend.compact_on(&mut cache, &sel, &mut ws),
        };
        mock::fail(None);
        assert!(matches!(failed, Err(Error::Acl { .. })), "{call}: {failed:?}");
        assert_eq!(cache.lens, before, "{call}: the lengths are unchanged");
        let q = random([1, 1, 4, 64], 1.0, seed ^ 2, DType::F32);
        let mut out = poisoned(q.shape, DType::F32);
        let later = backend.attend_on(&q.view(), &[0, 1], &cache, &[], None, &mut out.view_mut(), None);
        assert!(matches!(later, Err(Error::Poisoned { .. })), "{call}: {later:?}");
        assert!(matches!(cache.to_host(), Err(Error::Poisoned { .. })), "{call}");
    }
}

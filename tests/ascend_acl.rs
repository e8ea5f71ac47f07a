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
        stream.launch(&function, 1, &a, args.len()).unwrap();
        stream.synchronize()
    };
    match run(34) {
        Err(Error::Acl { call, message, .. }) => {
            assert_eq!(call, "aclrtSynchronizeStreamWithTimeout");
            assert!(message.contains("timeout"), "{message}");
        }
        other => panic!("a deadlocked kernel must end in a sync timeout, got {other:?}"),
    }
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

//! Build script.
//!
//! - Feature `ascend-emu`: compiles the Ascend C kernels (`ascend/kernels`) against the host
//!   emulation of the Ascend C API (`ascend/emu`) with the system C++ compiler, into the crate.
//! - Feature `ascend`: with `ASCEND_HOME_PATH` set (a CANN toolkit), compiles each kernel with
//!   bisheng into a device binary and embeds it (`$OUT_DIR/ascend_kernels.rs`); without CANN the
//!   list is empty and the backend says so at run time. Flags: see `bisheng_command`.
//! - Feature `cuda`: with nvcc found (`NVCC`, `$CUDA_HOME/bin/nvcc`, or `nvcc` on `PATH`), a
//!   fatbin with SASS for sm_80 and sm_90a (or the `CUDA_COMPUTE_CAP` arch) plus compute_80 PTX
//!   is embedded (`$OUT_DIR/cuda_fatbin.rs`); the PTX only from nvcc ≤ 13.0 (driver 580). Without
//!   nvcc the sources alone are embedded and NVRTC compiles them on first use (`src/cuda/source.rs`).

use std::path::{Path, PathBuf};

/// Kernel sources under `ascend/kernels` and the cores each runs on (`src/ascend/launch.rs`).
const ASCEND_KERNELS: [(&str, &str); 7] = [
    ("decode", "VecCore"),
    ("attend", "VecCore"),
    ("kv_compress", "VecCore"),
    ("kv_compress_cube", "AiCore"),
    ("prefill", "AiCore"),
    ("prefill_vector", "VecCore"),
    ("plan", "VecCore"),
];
/// Default SoC: Atlas A2 (910B, dav-c220). Override with `EK_ASCEND_SOC`.
const DEFAULT_SOC: &str = "Ascend910B1";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=ascend");
    println!("cargo::rerun-if-changed=ffi/entropy_params.h");
    println!("cargo::rerun-if-changed=cuda");
    for var in
        ["ASCEND_HOME_PATH", "EK_ASCEND_SOC", "EK_ASCEND_CCE_FLAGS", "NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP", "PATH"]
    {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_ASCEND_EMU").is_some() {
        build_emulator();
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() && std::env::var_os("CARGO_FEATURE_CANDLE_CUDA").is_some() {
        // cudarc refuses run-time loading (`cuda`) and link-time linking (candle-core's `cuda`) together.
        panic!("features `cuda` and `candle-cuda` exclude each other: `candle-cuda` already includes the CUDA backend");
    }
    if std::env::var_os("CARGO_FEATURE__CUDA").is_some() {
        build_cuda_fatbin();
        build_cuda_host_check();
    }
    if std::env::var_os("CARGO_FEATURE_CUDA_EMU").is_some() {
        build_cuda_emu_driver();
    }
    if std::env::var_os("CARGO_FEATURE_ASCEND").is_some() {
        build_ascend_kernels();
        if std::env::var_os("CARGO_FEATURE_ASCEND_EMU").is_some() {
            build_mock_acl();
        }
    }
}

/// Test double of `libascendcl.so` (`ascend/mock_acl`): the ACL prototypes of `ffi/acl_min.h`
/// over host memory, launches run on the emulator. Tests find it through `EK_MOCK_ACL_PATH`.
fn build_mock_acl() {
    let mut sources = vec![PathBuf::from("ascend/mock_acl/mock_acl.cpp")];
    for dir in ["ascend/emu", "ascend/kernels"] {
        for entry in std::fs::read_dir(dir).expect("ascend sources") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_some_and(|e| e == "cpp") {
                sources.push(path);
            }
        }
    }
    let flags = ["-std=c++17", "-pthread", "-DEK_ASCEND_EMU", "-ffp-contract=off", "-Wno-unused-parameter"];
    let lib = shared_library(
        "mock_acl",
        "libascendcl.so",
        &flags,
        &["-Iascend/emu/include", "-Iascend/kernels", "-Iffi"],
        &sources,
    );
    println!("cargo::rustc-env=EK_MOCK_ACL_PATH={}", lib.display());
}

/// Compiles C++ `sources` (optimised, position-independent) into `$OUT_DIR/<dir>/<name>`, a
/// shared object; returns its path.
fn shared_library(dir: &str, name: &str, flags: &[&str], includes: &[&str], sources: &[PathBuf]) -> PathBuf {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join(dir);
    std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("creating {}: {e}", out.display()));
    let lib = out.join(name);
    let mut cmd = cc::Build::new().cpp(true).get_compiler().to_command();
    cmd.args(["-O2", "-shared", "-fPIC"]).args(flags).args(includes).arg("-o").arg(&lib).args(sources);
    let status = cmd.status().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(status.success(), "building {name} failed: {cmd:?}");
    lib
}

/// The block-wide top-k code of `cuda/topk.cuh` compiled for the host (`cuda/host/grid_shim.h`),
/// so tests check its logic without a GPU (`cuda::host_check`).
fn build_cuda_host_check() {
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file("cuda/host/topk_check.cpp")
        .flag_if_supported("-Wno-unknown-pragmas")
        .opt_level(2)
        .compile("entropy_cuda_host_check");
}

/// Test double of the CUDA driver (`cuda/host/driver_emu.cpp`, the kernels of `cuda/` compiled
/// for the host against `cuda/host/grid_shim.h`): a shared object named `libcuda.so` (its SONAME),
/// which `cuda::emu` loads by path so cudarc's `dlopen("libcuda.so")` finds it. Path:
/// `EK_CUDA_EMU_PATH`. `-ffp-contract=off` keeps the budget recurrence's `__f*_rn` bit-exact.
fn build_cuda_emu_driver() {
    let flags = ["-std=c++20", "-fvisibility=hidden", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"];
    let flags = [&flags[..], &["-Wno-unused-parameter", "-Wl,-soname,libcuda.so"]].concat();
    let lib = shared_library("cuda_emu", "libcuda.so", &flags, &[], &[PathBuf::from("cuda/host/driver_emu.cpp")]);
    println!("cargo::rustc-env=EK_CUDA_EMU_PATH={}", lib.display());
}

/// `-ffp-contract=off`: each emulated vector instruction rounds its result as the vector unit
/// does (one rounding per instruction, no fused multiply-add the host compiler might form, as GCC
/// does by default where FMA is in the base ISA, e.g. aarch64); the compression's top-k decisions
/// are taken on those values, so they must not depend on the host.
fn build_emulator() {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .include("ascend/emu/include")
        .include("ascend/kernels")
        .include("ffi")
        .define("EK_ASCEND_EMU", None)
        .flag_if_supported("-ffp-contract=off")
        .flag_if_supported("-Wno-unused-parameter")
        .opt_level(2);
    for dir in ["ascend/emu", "ascend/kernels"] {
        for entry in std::fs::read_dir(dir).expect("ascend sources") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_some_and(|e| e == "cpp") {
                b.file(&path);
            }
        }
    }
    b.compile("entropy_ascend_emu");
}

/// `bisheng` invocation for one kernel, from the Ascend C documentation's direct-compile flags:
/// `-xcce` (Ascend C source), the SoC and the core type (VecCore / CubeCore / AiCore for mixed
/// kernels), the tikcpp include dirs, `--cce-aicore-only` for a device-only object that
/// `aclrtBinaryLoadFromData` loads, and `--cce-auto-sync` (the compiler's automatic pipe
/// synchronisation, on in the toolkit's own kernel projects; the kernels also place every
/// PipeBarrier/SetFlag/WaitFlag their data flow needs, so they are right without it).
/// Extra flags: `EK_ASCEND_CCE_FLAGS`. Not yet run on a real toolkit (none is available to this
/// project).
fn bisheng_command(home: &Path, src: &Path, out: &Path, core_type: &str) -> std::process::Command {
    let soc = std::env::var("EK_ASCEND_SOC").unwrap_or_else(|_| DEFAULT_SOC.to_string());
    let mut c = std::process::Command::new(home.join("compiler/ccec_compiler/bin/bisheng"));
    c.args(["-O2", "-std=c++17", "-xcce", "--cce-aicore-only", "--cce-auto-sync"])
        .arg(format!("--cce-soc-version={soc}"))
        .arg(format!("--cce-soc-core-type={core_type}"));
    for inc in ["compiler/tikcpp/tikcfw", "compiler/tikcpp/tikcfw/impl", "compiler/tikcpp/tikcfw/interface", "include"]
    {
        c.arg(format!("-I{}", home.join(inc).display()));
    }
    c.arg("-Iascend/kernels").arg("-Iffi");
    if let Ok(extra) = std::env::var("EK_ASCEND_CCE_FLAGS") {
        c.args(extra.split_whitespace());
    }
    c.arg("-c").arg(src).arg("-o").arg(out);
    c
}

fn build_ascend_kernels() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let mut entries = Vec::new();
    if let Some(home) = std::env::var_os("ASCEND_HOME_PATH").map(PathBuf::from) {
        for (file, core_type) in ASCEND_KERNELS {
            let src = PathBuf::from(format!("ascend/kernels/{file}.cpp"));
            let obj = out_dir.join(format!("{file}.o"));
            let mut cmd = bisheng_command(&home, &src, &obj, core_type);
            let status = cmd.status().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
            assert!(status.success(), "bisheng failed on {}: {cmd:?}", src.display());
            entries.push(format!("(\"{file}\", include_bytes!(\"{}\") as &[u8]),", obj.display()));
        }
    }
    let code = format!("pub static IMAGES: &[(&str, &[u8])] = &[{}];\n", entries.join("\n"));
    std::fs::write(out_dir.join("ascend_kernels.rs"), code).expect("writing ascend_kernels.rs");
}

/// CUDA kernel sources in dependency order (the same list as `src/cuda/source.rs`).
const CUDA_SOURCES: [&str; 10] = [
    "ffi/entropy_params.h",
    "cuda/common.cuh",
    "cuda/numerics.cuh",
    "cuda/topk.cuh",
    "cuda/decode.cu",
    "cuda/attend.cu",
    "cuda/append.cu",
    "cuda/prefill.cu",
    "cuda/plan.cu",
    "cuda/compress.cu",
];
/// Newest toolkit whose PTX the target driver (580, CUDA 13.0) can JIT.
const MAX_PTX_RELEASE: (u32, u32) = (13, 0);

/// nvcc from `NVCC`, `$CUDA_HOME/bin`, or `PATH`, with its release (major, minor).
fn find_nvcc() -> Option<(PathBuf, (u32, u32))> {
    let candidates = [
        std::env::var_os("NVCC").map(PathBuf::from),
        std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")),
        Some(PathBuf::from("nvcc")),
    ];
    for nvcc in candidates.into_iter().flatten() {
        let Ok(out) = std::process::Command::new(&nvcc).arg("--version").output() else { continue };
        let text = String::from_utf8_lossy(&out.stdout);
        // "Cuda compilation tools, release 13.0, V13.0.88"
        let release = text.split("release ").nth(1).and_then(|r| r.split(',').next()).and_then(|r| {
            let mut it = r.trim().split('.').map(|x| x.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        });
        if let (true, Some(r)) = (out.status.success(), release) {
            return Some((nvcc, r));
        }
    }
    None
}

fn build_cuda_fatbin() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let generated = out_dir.join("cuda_fatbin.rs");
    let none = "pub static FATBIN: Option<&[u8]> = None;\npub static FATBIN_ARCHS: &[&str] = &[];\n";
    let Some((nvcc, release)) = find_nvcc() else {
        std::fs::write(&generated, none).expect("writing cuda_fatbin.rs");
        return;
    };
    // One translation unit that includes the sources (their `#pragma once` stays in headers).
    let root = std::env::current_dir().expect("cwd");
    let unit = out_dir.join("entropy_kernels.cu");
    let includes: String = CUDA_SOURCES.iter().map(|f| format!("#include \"{}\"\n", root.join(f).display())).collect();
    std::fs::write(&unit, includes).expect("writing entropy_kernels.cu");
    let sass: Vec<String> = match std::env::var("CUDA_COMPUTE_CAP") {
        Ok(cap) => {
            let cap = cap.replace('.', "");
            vec![if cap == "90" { "90a".into() } else { cap }]
        }
        Err(_) => vec!["80".into(), "90a".into()],
    };
    let fatbin = out_dir.join("entropy_kernels.fatbin");
    let mut cmd = std::process::Command::new(&nvcc);
    // The NVRTC options' (src/cuda/source.rs): f32 subnormals kept for the f32 planning logits.
    cmd.args(["-fatbin", "-std=c++17", "--prec-div=true", "--prec-sqrt=true", "--ftz=false", "-o"]).arg(&fatbin);
    for a in &sass {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    if release <= MAX_PTX_RELEASE {
        cmd.arg("-gencode=arch=compute_80,code=compute_80");
    } else {
        println!(
            "cargo::warning=nvcc {}.{} is newer than CUDA {}.{}: embedding SASS only (no PTX the driver could not JIT)",
            release.0, release.1, MAX_PTX_RELEASE.0, MAX_PTX_RELEASE.1
        );
    }
    cmd.arg(&unit);
    let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
    if !ok {
        // NVRTC still compiles the sources at run time; a broken nvcc must not break the build.
        println!("cargo::warning=nvcc failed ({cmd:?}); the CUDA kernels will be compiled by NVRTC at run time");
        std::fs::write(&generated, none).expect("writing cuda_fatbin.rs");
        return;
    }
    let archs: Vec<String> = sass.iter().map(|a| format!("\"sm_{a}\"")).collect();
    let code = format!(
        "pub static FATBIN: Option<&[u8]> = Some(include_bytes!(\"{}\"));\npub static FATBIN_ARCHS: &[&str] = &[{}];\n",
        fatbin.display(),
        archs.join(", ")
    );
    std::fs::write(&generated, code).expect("writing cuda_fatbin.rs");
}

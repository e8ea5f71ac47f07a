//! Build script.
//!
//! - Feature `ascend-emu`: compiles the Ascend C kernels (`ascend/kernels`) against the host
//!   emulation of the Ascend C API (`ascend/emu`) with the system C++ compiler, into the crate.
//! - CUDA kernels need nothing here: they are embedded as source and compiled with NVRTC on
//!   first use (`src/cuda/source.rs`).
//! - Real Ascend builds (bisheng, with `ASCEND_HOME_PATH` set) are not wired yet.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=ascend");
    println!("cargo::rerun-if-changed=ffi/entropy_params.h");
    println!("cargo::rerun-if-env-changed=ASCEND_HOME_PATH");
    if std::env::var_os("CARGO_FEATURE_ASCEND_EMU").is_some() {
        build_emulator();
    }
}

fn build_emulator() {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .include("ascend/emu/include")
        .include("ascend/kernels")
        .include("ffi")
        .define("EK_ASCEND_EMU", None)
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

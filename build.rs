//! Build script. The CPU backend needs nothing built; this is where the device kernels will be
//! compiled: with `nvcc` found, a fatbin of `cuda/` (SASS sm_80/sm_90a + compute_80 PTX), else
//! the sources embedded for NVRTC; with `ASCEND_HOME_PATH` set, `ascend/` through bisheng.
//! Until those land it only tells cargo what to watch, so the crate builds with no toolkit.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    println!("cargo::rerun-if-changed=ascend");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=ASCEND_HOME_PATH");
}

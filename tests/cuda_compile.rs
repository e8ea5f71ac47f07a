//! Every CUDA kernel compiles through NVRTC for sm_80 and sm_90a (CUBIN, so ptxas runs), with
//! a table of registers, shared memory and spills per kernel; any spill fails the test. Runs
//! wherever NVRTC loads (`.ci/run` installs it from PyPI); prints why it is skipped otherwise.

mod common;

use entropy_kernels::cuda::source;

/// One kernel's line of the ptxas report.
#[derive(Debug, Default)]
struct Usage {
    registers: u32,
    smem: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack: u32,
}

/// Parses `ptxas info    : Function properties for K` / `Used N registers, ...` lines.
fn parse(log: &str) -> Vec<(String, Usage)> {
    let mut out: Vec<(String, Usage)> = Vec::new();
    let mut current: Option<String> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = rest.split('\'').next().map(str::to_string);
            out.push((current.clone().unwrap(), Usage::default()));
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            let name = rest.trim().to_string();
            if !out.iter().any(|(n, _)| *n == name) {
                out.push((name.clone(), Usage::default()));
            }
            current = Some(name);
        }
        let Some(name) = &current else { continue };
        let u = &mut out.iter_mut().find(|(n, _)| n == name).unwrap().1;
        let num = |key: &str| -> Option<u32> {
            let i = line.find(key)?;
            line[..i].split_whitespace().last()?.parse().ok()
        };
        if let Some(v) = num(" registers") {
            u.registers = v;
        }
        if let Some(v) = num(" bytes smem") {
            u.smem = v;
        }
        if let Some(v) = num(" bytes spill stores") {
            u.spill_stores = v;
        }
        if let Some(v) = num(" bytes spill loads") {
            u.spill_loads = v;
        }
        if let Some(v) = num(" bytes stack frame") {
            u.stack = v;
        }
    }
    out
}

#[test]
fn kernels_compile_without_spills() {
    for arch in ["sm_80", "sm_90a"] {
        let compiled = match source::compile(arch, true) {
            Ok(c) => c,
            Err(e) if e.contains("not found") => {
                common::skip_or_fail("cuda_compile", &e);
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert!(!compiled.image.is_empty());
        let table = parse(&compiled.log);
        println!("\n{arch}: kernel | registers | static smem | stack | spill stores | spill loads");
        for (name, u) in &table {
            println!(
                "{arch}: {name} | {} | {} | {} | {} | {}",
                u.registers, u.smem, u.stack, u.spill_stores, u.spill_loads
            );
        }
        for k in source::KERNELS {
            assert!(table.iter().any(|(n, _)| n == k), "{arch}: no ptxas report for {k}:\n{}", compiled.log);
        }
        let spills: Vec<_> = table.iter().filter(|(_, u)| u.spill_stores > 0 || u.spill_loads > 0).collect();
        assert!(spills.is_empty(), "{arch}: kernels spill: {spills:?}");
    }
    // The shipped fallback image: PTX for compute_80, which every driver from CUDA 11.1 on can JIT.
    let ptx = source::compile("compute_80", false).expect("PTX build");
    let text = String::from_utf8_lossy(&ptx.image);
    let version = text.lines().find(|l| l.starts_with(".version")).unwrap_or("").to_string();
    println!("PTX {version}");
    let (major, minor) = version.trim_start_matches(".version").trim().split_once('.').expect("PTX version");
    let v = (major.parse::<u32>().unwrap(), minor.parse::<u32>().unwrap());
    assert!(v <= (9, 0), "PTX {v:?} is newer than CUDA 13.0's ISA 9.0: the 580 driver could not load it");
}

/// With nvcc found at build time, build.rs embeds a fatbin: the fatbin magic, SASS targets
/// sm_80 and sm_90a (or `CUDA_COMPUTE_CAP`'s), and every kernel entry name inside.
#[cfg(feature = "cuda")]
#[test]
fn nvcc_fatbin_is_embedded() {
    let Some(fatbin) = source::FATBIN else {
        common::skip_or_fail(
            "cuda_compile::nvcc_fatbin_is_embedded",
            "built without nvcc (NVCC, CUDA_HOME/bin or PATH): kernels come from NVRTC at run time",
        );
        return;
    };
    assert_eq!(&fatbin[..4], &0xBA55_ED50u32.to_le_bytes(), "fatbin magic");
    assert!(!source::FATBIN_ARCHS.is_empty());
    eprintln!("fatbin: {} bytes, SASS for {:?}", fatbin.len(), source::FATBIN_ARCHS);
}

//! The CUDA kernels as NVRTC compiles them, and every launch the backend can choose held against
//! what the compiled kernels allow — no GPU needed:
//! - every kernel compiles for sm_80 and sm_90a (CUBIN, so ptxas runs) without spills, and the
//!   fallback PTX is an ISA the CUDA 13.0 driver can JIT;
//! - `cuda/host/kernel_attrs.h` (each kernel's launch bound, static shared memory and registers,
//!   which the emulated driver enforces) is what NVRTC produces (`ENTROPY_KERNELS_BLESS=1`
//!   rewrites it);
//! - the planning kernels contain no FMA on doubles and no kernel has a float atomic (the
//!   decisions' arithmetic must be the host's, run to run);
//! - every launch `cuda::launches` can return for sm_80, sm_86, sm_89 and sm_90 fits the
//!   kernel's bound, the device's shared memory and the SM's registers (this one reads the
//!   committed table, so it runs without NVRTC too).
//!
//! NVRTC is loaded at run time (`.ci/run` installs it from PyPI); without it the compiling tests
//! print why they are skipped.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use entropy_kernels::cuda::launches::{self, DeviceLimits, KernelLimits, Launch, PrefillTile};
use entropy_kernels::cuda::source;
use entropy_kernels::plan::PlanDims;
use entropy_kernels::validate::{AttnDims, CompressDims, DecodeDims};
use entropy_kernels::{DType, DecodeConfig, GqaMode, HeadBudget};

const ATTRS: &str = "cuda/host/kernel_attrs.h";

/// One kernel's line of the ptxas report.
#[derive(Debug, Default, Clone)]
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

/// NVRTC's builds, once per test binary: the ptxas reports for sm_80 and sm_90a and the
/// compute_80 PTX. `None` (with the reason printed) where NVRTC is absent.
struct Builds {
    reports: [(String, Vec<(String, Usage)>); 2],
    ptx: String,
}

fn builds() -> Option<&'static Builds> {
    static B: OnceLock<Option<Builds>> = OnceLock::new();
    B.get_or_init(|| {
        let mut reports = Vec::new();
        for arch in ["sm_80", "sm_90a"] {
            match source::compile(arch, true) {
                Ok(c) => {
                    assert!(!c.image.is_empty());
                    reports.push((arch.to_string(), parse(&c.log)));
                }
                Err(e) if e.contains("not found") => {
                    common::skip_or_fail("cuda_compile", &e);
                    return None;
                }
                Err(e) => panic!("{e}"),
            }
        }
        let ptx = source::compile("compute_80", false).expect("PTX build");
        let ptx = String::from_utf8_lossy(&ptx.image).trim_end_matches('\0').to_string();
        Some(Builds { reports: reports.try_into().unwrap(), ptx })
    })
    .as_ref()
}

#[test]
fn kernels_compile_without_spills() {
    let Some(b) = builds() else { return };
    for (arch, table) in &b.reports {
        println!("\n{arch}: kernel | registers | static smem | stack | spill stores | spill loads");
        for (name, u) in table {
            println!(
                "{arch}: {name} | {} | {} | {} | {} | {}",
                u.registers, u.smem, u.stack, u.spill_stores, u.spill_loads
            );
        }
        for k in source::KERNELS {
            assert!(table.iter().any(|(n, _)| n == k), "{arch}: no ptxas report for {k}");
        }
        let spills: Vec<_> = table.iter().filter(|(_, u)| u.spill_stores > 0 || u.spill_loads > 0).collect();
        assert!(spills.is_empty(), "{arch}: kernels spill: {spills:?}");
    }
    // The shipped fallback image: PTX for compute_80, which every driver from CUDA 11.1 on can JIT.
    let version = b.ptx.lines().find(|l| l.starts_with(".version")).unwrap_or("").to_string();
    println!("PTX {version}");
    let (major, minor) = version.trim_start_matches(".version").trim().split_once('.').expect("PTX version");
    let v = (major.parse::<u32>().unwrap(), minor.parse::<u32>().unwrap());
    assert!(v <= (9, 0), "PTX {v:?} is newer than CUDA 13.0's ISA 9.0: the 580 driver could not load it");
}

/// Each `.entry`'s body in a PTX module, and the `.func`s (non-inlined device functions).
fn ptx_functions(ptx: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut lines = ptx.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.split(".entry ").nth(1).or_else(|| line.split(".func ").nth(1)) else { continue };
        // `.func (.param ...) name(` or `.entry name(`
        let rest = if rest.starts_with('(') { rest.split(") ").nth(1).unwrap_or(rest) } else { rest };
        let name = rest.split(['(', ' ']).next().unwrap_or("").to_string();
        let mut body = String::new();
        let mut depth = 0i32;
        let mut opened = false;
        for l in lines.by_ref() {
            depth += l.matches('{').count() as i32 - l.matches('}').count() as i32;
            opened |= l.contains('{');
            body.push_str(l);
            body.push('\n');
            if opened && depth == 0 {
                break;
            }
        }
        out.insert(name, body);
    }
    out
}

/// The bodies of `entry` and of every `.func` it calls, transitively.
fn reachable<'a>(funcs: &'a HashMap<String, String>, entry: &str) -> Vec<(&'a str, &'a str)> {
    let mut seen = vec![];
    let mut todo = vec![entry.to_string()];
    while let Some(name) = todo.pop() {
        let Some((k, body)) = funcs.get_key_value(&name) else { continue };
        if seen.iter().any(|(n, _)| *n == k.as_str()) {
            continue;
        }
        for l in body.lines().filter(|l| l.trim_start().starts_with("call")) {
            for (callee, _) in funcs.iter() {
                if l.contains(&format!(" {callee},")) || l.contains(&format!(" {callee};")) {
                    todo.push(callee.clone());
                }
            }
        }
        seen.push((k.as_str(), body.as_str()));
    }
    seen
}

/// The decisions' arithmetic (SPEC §6): the planning kernels round every f64 operation on its own
/// (no `fma.f64` — which libdevice's exp/log would also bring in), flush no subnormal (no `.ftz`:
/// the CPU keeps them), and the f32 logits of 16-bit inputs are `numerics::dot32`'s fused
/// multiply-adds (`fma.rn.f32`); no kernel adds floats atomically (an order, and so bits, that
/// change from run to run).
#[test]
fn decision_kernels_are_fma_free_and_no_kernel_has_float_atomics() {
    let Some(b) = builds() else { return };
    let funcs = ptx_functions(&b.ptx);
    let dot32 = reachable(&funcs, "ek_plan_logits_f32").iter().any(|(_, body)| body.contains("fma.rn.f32"));
    assert!(dot32, "ek_plan_logits_f32 has no fma.rn.f32: its dot products are not numerics::dot32's");
    for k in source::KERNELS {
        assert!(funcs.contains_key(*k), "no PTX entry {k}");
        for (name, body) in reachable(&funcs, k) {
            for l in body.lines().map(str::trim) {
                let decides = k.starts_with("ek_plan_") || *k == "ek_numerics_probe";
                assert!(!(decides && l.contains(".ftz")), "{k} ({name}): `{l}` flushes subnormals the host keeps");
                let float_atomic = (l.starts_with("atom.") || l.starts_with("red."))
                    && [".f16", ".bf16", ".f32", ".f64"].iter().any(|t| l.contains(t));
                assert!(!float_atomic, "{k} ({name}): float atomic `{l}`");
                let fused = (l.starts_with("fma.") || l.starts_with("mad.")) && l.contains(".f64");
                assert!(!(decides && fused), "{k} ({name}): `{l}` fuses an f64 multiply-add the host rounds twice");
                // add/sub/mul without a rounding modifier may still be fused by ptxas (PTX ISA,
                // "Floating-Point Instructions"): the intrinsics emit `.rn`.
                let loose = ["add.f64", "sub.f64", "mul.f64"].iter().any(|op| l.starts_with(op));
                assert!(!(decides && loose), "{k} ({name}): `{l}` has no rounding modifier, so ptxas may fuse it");
            }
        }
    }
}

/// One kernel's attributes: launch bound, and per target (sm_80, sm_90a) static shared memory
/// and registers per thread.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Attrs {
    name: String,
    max_threads: u32,
    smem: [u32; 2],
    registers: [u32; 2],
}

fn render(attrs: &[Attrs]) -> String {
    let mut s = String::from(
        "// @generated by tests/cuda_compile.rs from NVRTC's build of cuda/ — do not edit: the test fails while\n\
         // it is stale, and `ENTROPY_KERNELS_BLESS=1 cargo test --features cuda --test cuda_compile` rewrites it.\n\
         // Per kernel: its launch bound (PTX .maxntid, 1024 without one), then for sm_80 and sm_90a its static\n\
         // shared memory (bytes) and registers per thread (ptxas -v). cuda/host/driver_emu.cpp refuses launches\n\
         // beyond them; tests/cuda_compile.rs checks every launch the backend can choose against them.\n\
         // EK_KERNEL_ATTRS(name, max threads, sm_80 static smem, sm_80 registers, sm_90a static smem, sm_90a registers)\n",
    );
    for a in attrs {
        s += &format!(
            "EK_KERNEL_ATTRS({}, {}, {}, {}, {}, {})\n",
            a.name, a.max_threads, a.smem[0], a.registers[0], a.smem[1], a.registers[1]
        );
    }
    s
}

fn committed_attrs() -> Vec<Attrs> {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(ATTRS)).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("EK_KERNEL_ATTRS(")?.strip_suffix(')').map(str::to_string))
        .map(|l| {
            let f: Vec<&str> = l.split(", ").collect();
            let n = |i: usize| f[i].parse::<u32>().unwrap();
            Attrs { name: f[0].to_string(), max_threads: n(1), smem: [n(2), n(4)], registers: [n(3), n(5)] }
        })
        .collect()
}

#[test]
fn kernel_attribute_table_is_fresh() {
    let Some(b) = builds() else { return };
    let funcs = ptx_functions(&b.ptx);
    let attrs: Vec<Attrs> = source::KERNELS
        .iter()
        .map(|&k| {
            let body = &funcs[k];
            let max_threads = body
                .lines()
                .find_map(|l| l.trim().strip_prefix(".maxntid ").or_else(|| l.trim().strip_prefix(".reqntid ")))
                .map(|dims| dims.split(',').map(|x| x.trim().parse::<u32>().unwrap()).product())
                .unwrap_or(1024);
            let usage = |i: usize| b.reports[i].1.iter().find(|(n, _)| n == k).unwrap().1.clone();
            let (u80, u90) = (usage(0), usage(1));
            Attrs {
                name: k.to_string(),
                max_threads,
                smem: [u80.smem, u90.smem],
                registers: [u80.registers, u90.registers],
            }
        })
        .collect();
    let fresh = render(&attrs);
    common::check_generated(ATTRS, &fresh, "cargo test --features cuda --test cuda_compile");
}

/// A target architecture's limits (CUDA C++ Programming Guide, "Technical Specifications per
/// Compute Capability"): opt-in shared memory per block, multiprocessors of a typical part, and
/// the kernel_attrs.h column its code comes from.
struct Arch {
    name: &'static str,
    optin: u32,
    sms: usize,
    column: usize,
}
const ARCHS: [Arch; 4] = [
    Arch { name: "sm_80", optin: 163 * 1024, sms: 108, column: 0 },
    Arch { name: "sm_86", optin: 99 * 1024, sms: 84, column: 0 },
    Arch { name: "sm_89", optin: 99 * 1024, sms: 142, column: 0 },
    Arch { name: "sm_90", optin: 227 * 1024, sms: 132, column: 1 },
];
const REGISTERS_PER_SM: u32 = 64 * 1024;

/// The limits a backend on `arch` reads from the driver: each kernel's launch bound, and the
/// opt-in size less its static shared memory.
fn limits(arch: &Arch, attrs: &[Attrs]) -> DeviceLimits {
    let kernels = attrs
        .iter()
        .map(|a| {
            let k = KernelLimits {
                max_threads: a.max_threads,
                max_dynamic_smem: (arch.optin - a.smem[arch.column]) as usize,
                static_smem: a.smem[arch.column] as usize,
            };
            (a.name.clone(), k)
        })
        .collect();
    DeviceLimits { sms: arch.sms, kernels }
}

/// What the driver of `arch` checks at launch, from the compiled kernel's own attributes.
fn assert_fits(arch: &Arch, attrs: &[Attrs], l: &Launch, what: &str) {
    let a =
        attrs.iter().find(|a| a.name == l.kernel).unwrap_or_else(|| panic!("{what}: {} has no attributes", l.kernel));
    let smem = a.smem[arch.column] as usize + l.smem;
    let regs_per_warp = (a.registers[arch.column] * 32).div_ceil(256) * 256;
    assert!(
        l.block <= a.max_threads,
        "{}: {what}: {} threads > the launch bound {}",
        arch.name,
        l.kernel,
        a.max_threads
    );
    assert!(smem <= arch.optin as usize, "{}: {what}: {} needs {smem} bytes of shared memory", arch.name, l.kernel);
    assert!(
        regs_per_warp * l.block.div_ceil(32) <= REGISTERS_PER_SM,
        "{}: {what}: {} threads of {} registers",
        arch.name,
        l.block,
        a.registers[arch.column]
    );
}

/// Every launch `cuda::launches` can choose — prefill (both tile heights and auto, tensor cores
/// and SIMT, every head dim up to 256, groups up to 64), planning (every logits tile, both
/// rankings), compression (tensor cores and FMAs, window rows up to the limit, every selection),
/// decode and the paged attention — fits each target, or is refused by the function before any launch.
#[test]
fn every_launch_fits_every_target() {
    let attrs = committed_attrs();
    for k in source::KERNELS {
        assert!(
            attrs.iter().any(|a| a.name == *k),
            "{ATTRS} lacks {k}: regenerate it (see kernel_attribute_table_is_fresh)"
        );
    }
    let mut checked = 0usize;
    let mut refused = 0usize;
    for arch in &ARCHS {
        let lim = limits(arch, &attrs);
        let mut check = |r: entropy_kernels::Result<Vec<Launch>>, what: String| match r {
            Ok(ls) => {
                for l in &ls {
                    assert_fits(arch, &attrs, l, &what);
                    checked += 1;
                }
            }
            Err(entropy_kernels::Error::OutOfRange { .. }) => refused += 1,
            Err(e) => panic!("{}: {what}: {e}", arch.name),
        };
        for dtype in DType::ALL {
            for head_dim in [1, 8, 20, 32, 64, 80, 96, 100, 128, 160, 192, 200, 256] {
                for (q_heads, kv_heads) in [(1, 1), (8, 8), (32, 8), (12, 6), (28, 4), (32, 1), (64, 1)] {
                    for tile in [PrefillTile::Auto, PrefillTile::M64, PrefillTile::M128] {
                        for aligned in [true, false] {
                            for (segment_size, segments) in [(64, 4), (512, 64), (16384, 1)] {
                                let d = AttnDims {
                                    batch: 2,
                                    seq_len: segment_size * segments,
                                    q_heads,
                                    kv_heads,
                                    head_dim,
                                };
                                let r = launches::prefill(&lim, tile, &d, dtype, aligned, segment_size, segments);
                                check(
                                    r.map(|p| vec![p.launch]),
                                    format!("prefill {dtype} D {head_dim} GQA {q_heads}/{kv_heads} {tile:?}"),
                                );
                            }
                        }
                    }
                    for (l, seg, bk) in [(4096, 512, 8), (300, 64, 8), (131072, 512, 8), (8192, 64, 4)] {
                        let d = PlanDims::new(1, l, q_heads, kv_heads, seg, bk);
                        let r = launches::plan(&lim, &d, 0..d.segments, head_dim, dtype);
                        check(
                            r.map(|p| p.all().map(Clone::clone).to_vec()),
                            format!("plan {dtype} D {head_dim} GQA {q_heads}/{kv_heads} L {l}"),
                        );
                    }
                    for window in [1, 8, 32, 64] {
                        for aligned in [true, false] {
                            let d = CompressDims { batch: 2, kv_heads, q_heads, entries: 5000, window, head_dim };
                            let r = launches::compress_scoring(&lim, &d, dtype, aligned);
                            check(
                                r.map(|s| vec![s.stats, s.means]),
                                format!("compress scoring {dtype} D {head_dim} GQA {q_heads}/{kv_heads} W {window}"),
                            );
                        }
                        for gqa_mode in [GqaMode::Mean, GqaMode::PerQueryHead] {
                            let cfg = DecodeConfig {
                                window,
                                gqa_mode,
                                head_budget: HeadBudget::Uniform,
                                ..DecodeConfig::default()
                            };
                            let d = CompressDims { batch: 2, kv_heads, q_heads, entries: 5000, window, head_dim };
                            let heads = d.out_heads(&cfg);
                            let sel =
                                launches::compress_selection(&d, heads).map(|s| s.all().map(Clone::clone).to_vec());
                            check(sel, format!("compress selection GQA {q_heads}/{kv_heads}"));
                            check(launches::compress_gather(&d, heads, 1024, dtype).map(|g| vec![g]), "gather".into());
                            check(
                                [true, false]
                                    .iter()
                                    .map(|&v| launches::compress_compact(64, heads, head_dim, dtype, v))
                                    .collect::<Result<Vec<_>, _>>(),
                                format!("in-place compaction {dtype} D {head_dim}"),
                            );
                        }
                    }
                    for queries in [1, 4, 16] {
                        for vectors in [true, false] {
                            let d = DecodeDims {
                                batch: 3,
                                queries,
                                q_heads,
                                cache_heads: kv_heads,
                                capacity: 100_000,
                                head_dim,
                            };
                            for max_len in [1, 700, 100_000] {
                                let r = launches::decode(&lim, &d, max_len, dtype, vectors);
                                check(
                                    r.map(|dl| vec![dl.split, dl.merge]),
                                    format!("decode {dtype} D {head_dim} GQA {q_heads}/{kv_heads} q {queries}"),
                                );
                            }
                        }
                    }
                }
            }
        }
        // The paged attention: every tile height the host cuts (groups 1–64), every head dim.
        for dtype in DType::ALL {
            for head_dim in 1..=256 {
                for group in [1, 2, 3, 4, 8, 16, 32, 64] {
                    let (tq, nh) = (launches::ATTEND_ROWS / group.min(launches::ATTEND_ROWS), group.min(16));
                    for (tiles, max_keys) in [(1, 1), (37, 700), (5000, 131_072)] {
                        let r = launches::attend(&lim, tiles, tq.max(1) * nh, head_dim, max_keys, dtype);
                        check(
                            r.map(|al| vec![al.split, al.merge]),
                            format!("attend {dtype} D {head_dim} group {group}"),
                        );
                    }
                }
            }
        }
        for (tokens, heads) in [(1, 1), (4096, 8), (32_768, 128)] {
            let r = launches::append(tokens, heads, 64, DType::BF16).map(Vec::from);
            check(r, format!("append {tokens} tokens × {heads} heads"));
        }
        check(launches::numerics_probe(100_000, false).map(|l| vec![l]), "numerics probe".into());
        check(launches::numerics_probe(100_000, true).map(|l| vec![l]), "numerics probe (lane sum)".into());
    }
    println!("{checked} launches fit their targets; {refused} shapes refused before any launch");
    assert!(checked > 10_000, "{checked} launches checked");
}

/// The launches that the 99 KiB of sm_86/sm_89 cannot take are refused before any launch or
/// served by smaller tiles: the SIMT prefill at D 256 takes 16-key tiles there (32 on sm_90).
#[test]
fn small_shared_memory_targets_get_smaller_tiles() {
    let attrs = committed_attrs();
    let d = AttnDims { batch: 1, seq_len: 1000, q_heads: 8, kv_heads: 2, head_dim: 256 };
    let on = |arch: &Arch| {
        launches::prefill(&limits(arch, &attrs), PrefillTile::Auto, &d, DType::F32, true, 1000, 1).unwrap()
    };
    assert_eq!(on(&ARCHS[3]).launch.kernel, "ek_prefill_simt_f32");
    assert_eq!(on(&ARCHS[1]).launch.kernel, "ek_prefill_simt_f32_k16");
    assert!(launches::simt_prefill_smem(32, 256) > 99 * 1024, "the 32-key tile would not fit 99 KiB");
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

/// `CUDA_COMPUTE_CAP` chooses the kernels' architecture only where its code runs on the device
/// (same major version, no newer minor; sm_90a only on 9.0): anything else would load no code
/// (`CUDA_ERROR_NO_BINARY_FOR_GPU`) and is a typed error naming the variable.
#[test]
fn cuda_compute_cap_must_name_code_the_device_runs() {
    use entropy_kernels::cuda::target_arch;
    assert_eq!(target_arch((9, 0), None).unwrap(), "sm_90a");
    assert_eq!(target_arch((8, 6), None).unwrap(), "sm_86");
    assert_eq!(target_arch((8, 6), Some("80")).unwrap(), "sm_80");
    assert_eq!(target_arch((8, 9), Some("8.6")).unwrap(), "sm_86");
    assert_eq!(target_arch((9, 0), Some("90")).unwrap(), "sm_90a");
    assert_eq!(target_arch((8, 0), Some(" ")).unwrap(), "sm_80");
    for (cc, bad) in [((9, 0), "80"), ((8, 6), "89"), ((8, 0), "90"), ((8, 0), "eighty"), ((9, 0), "9")] {
        match target_arch(cc, Some(bad)) {
            Err(entropy_kernels::Error::OutOfRange { field: "CUDA_COMPUTE_CAP", .. }) => {}
            other => panic!("CUDA_COMPUTE_CAP={bad} on {cc:?}: {other:?}"),
        }
    }
}

/// The tile constants `cuda::launches` sizes launches with are the kernels' own (`#define`s in
/// `cuda/*.cu`): a drift would size shared memory for tiles the kernel does not use.
#[test]
fn launch_constants_match_the_kernels() {
    let define = |file: &str, name: &str| -> usize {
        let src = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
        let line = src
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{file} defines no {name}"));
        line.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    };
    assert_eq!(define("cuda/attend.cu", "ATTEND_KEYS"), launches::ATTEND_KEYS);
    assert_eq!(define("cuda/attend.cu", "ATTEND_THREADS"), launches::ATTEND_THREADS as usize);
    assert_eq!(define("cuda/append.cu", "APPEND_THREADS"), launches::APPEND_THREADS as usize);
    assert_eq!(define("cuda/decode.cu", "DECODE_THREADS"), launches::DECODE_THREADS as usize);
    assert_eq!(define("cuda/compress.cu", "COMPACT_ROWS"), launches::COMPACT_ROWS);
    assert_eq!(define("cuda/compress.cu", "COMPRESS_THREADS"), launches::COMPRESS_THREADS as usize);
    assert_eq!(define("cuda/compress.cu", "COMPRESS_KEYS"), launches::COMPRESS_KEYS);
    assert_eq!(define("cuda/compress.cu", "COMPRESS_MMA_KEYS"), launches::COMPRESS_MMA_KEYS);
}

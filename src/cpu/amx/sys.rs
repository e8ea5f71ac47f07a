//! The AMX instructions the tiles use, as `asm!` (Rust has no stable AMX intrinsics), and the
//! run-time checks that the CPU has AMX-BF16 and that Linux lets this process use its tile data.

#![allow(clippy::too_many_arguments)]

use std::arch::asm;

/// Bytes per tile row and rows per tile: every tile register is configured to the maximum,
/// 16 rows × 64 bytes (16 f32 of C, 32 bf16 of A, 16 bf16 pairs of B).
pub(crate) const TILE_ROW_BYTES: usize = 64;
pub(crate) const TILE_ROWS: usize = 16;
/// Bytes of one packed tile.
pub(crate) const TILE_BYTES: usize = TILE_ROW_BYTES * TILE_ROWS;

/// `ldtilecfg`'s 64-byte operand (Intel SDM vol. 1 §3.2 / vol. 2 LDTILECFG): palette 1, every
/// tile register 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// `ARCH_REQ_XCOMP_PERM` and the tile-data state component (Linux `arch/x86/include/uapi/asm/prctl.h`).
#[cfg(target_os = "linux")]
const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
#[cfg(target_os = "linux")]
const XFEATURE_XTILEDATA: libc::c_long = 18;

/// Whether this CPU has AMX-TILE and AMX-BF16 (CPUID.(EAX=7,ECX=0):EDX bits 24 and 22) and the
/// kernel granted this process the tile data state. Asked once per process; any failure (an old
/// kernel, a seccomp filter, a hypervisor hiding AMX) means the AVX-512 kernels run instead.
pub(crate) fn usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| {
        // CPUID leaf 7 exists on every x86-64 CPU with AVX-512, checked first.
        let cpu = std::arch::is_x86_feature_detected!("avx512f") && {
            let l7 = std::arch::x86_64::__cpuid_count(7, 0);
            l7.edx & (1 << 24) != 0 && l7.edx & (1 << 22) != 0
        };
        cpu && request_tile_data()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    // SAFETY: arch_prctl with these arguments only changes this process's XSAVE permissions.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// Configures the calling thread's tile registers (all 16 × 64 bytes).
///
/// # Safety
/// [`usable`] returned true.
#[inline(always)]
pub(crate) unsafe fn configure() {
    unsafe { asm!("ldtilecfg [{cfg}]", cfg = in(reg) &CONFIG, options(nostack, readonly)) };
}

/// Returns the tile registers to their initial state (so the OS need not save them).
///
/// # Safety
/// [`usable`] returned true.
#[inline(always)]
pub(crate) unsafe fn release() {
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// A 2×2 block of 16×16 f32 tiles `C += Σ_steps A·B` on `TDPBF16PS`:
/// `C[i][j]` at `c[i] + j·64` bytes with row stride `sc`; `A[i]` (16 rows × 32 bf16) at
/// `a[i] + s·a_step` with row stride `sa`; `B[j]` (16 rows × 16 bf16 pairs, VNNI) at
/// `b + s·b_step + j·1024`, rows 64 bytes apart. `LOAD_C = false` starts from zero.
///
/// # Safety
/// [`configure`] ran on this thread; every address above is readable (C writable) for
/// `steps ≥ 1` steps.
#[inline(always)]
pub(crate) unsafe fn dp_2x2<const LOAD_C: bool>(
    c: [*mut f32; 2],
    sc: usize,
    a: [*const u16; 2],
    sa: usize,
    a_step: usize,
    b: *const u16,
    b_step: usize,
    steps: usize,
) {
    debug_assert!(steps >= 1);
    // One asm block per variant: the tile registers hold C from its first load to its store.
    macro_rules! block {
        ($($init:literal),*) => {
            asm!(
                $($init,)*
                "2:",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b} + {sb}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm7, [{b} + {sb}*1 + 1024]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, {a_step}",
                "add {a1}, {a_step}",
                "add {b}, {b_step}",
                "dec {n}",
                "jnz 2b",
                "tilestored [{c0} + {sc}*1], tmm0",
                "tilestored [{c0} + {sc}*1 + 64], tmm1",
                "tilestored [{c1} + {sc}*1], tmm2",
                "tilestored [{c1} + {sc}*1 + 64], tmm3",
                a0 = inout(reg) a[0] => _, a1 = inout(reg) a[1] => _, sa = in(reg) sa, a_step = in(reg) a_step,
                b = inout(reg) b => _, sb = in(reg) TILE_ROW_BYTES, b_step = in(reg) b_step,
                n = inout(reg) steps => _,
                c0 = in(reg) c[0], c1 = in(reg) c[1], sc = in(reg) sc,
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack),
            )
        };
    }
    unsafe {
        if LOAD_C {
            block!(
                "tileloadd tmm0, [{c0} + {sc}*1]",
                "tileloadd tmm1, [{c0} + {sc}*1 + 64]",
                "tileloadd tmm2, [{c1} + {sc}*1]",
                "tileloadd tmm3, [{c1} + {sc}*1 + 64]"
            );
        } else {
            block!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dp_2x2` against scalar sums, both variants, over several steps: the operand layouts,
    /// strides and the C-tile addressing (`c[i] + j·64`, `b + j·1024`) as documented.
    #[test]
    fn dp_2x2_matches_scalar_products() {
        if !(usable() && std::arch::is_x86_feature_detected!("avx512bf16")) {
            eprintln!("SKIP: no AMX-BF16 here");
            return;
        }
        let steps = 3;
        let bf = |x: f32| half::bf16::from_f32(x).to_bits();
        let val = |x: half::bf16| x.to_f32();
        // A: 32 rows × (32·steps) bf16 in one matrix (row stride sa), rows 16.. are A[1].
        let (ka, sa) = (32 * steps, 32 * steps + 8);
        let a: Vec<u16> = (0..32 * sa).map(|i| bf(((i * 37) % 23) as f32 / 8.0 - 1.0)).collect();
        // B: per step, two VNNI tiles (16 pair-rows × 16 columns × 2) 1024 bytes apart; steps 2048 apart.
        let b: Vec<u16> = (0..steps * 1024).map(|i| bf(((i * 11) % 19) as f32 / 4.0 - 2.0)).collect();
        let sc = 40; // f32 per C row
        let init: Vec<f32> = (0..32 * sc).map(|i| (i % 7) as f32).collect();
        for load_c in [false, true] {
            let mut c = init.clone();
            unsafe {
                configure();
                let cp = c.as_mut_ptr();
                let ap = a.as_ptr();
                let args = ([cp, cp.add(16 * sc)], sc * 4, [ap, ap.add(16 * sa)], sa * 2, 64, b.as_ptr(), 2048, steps);
                if load_c {
                    dp_2x2::<true>(args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7);
                } else {
                    dp_2x2::<false>(args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7);
                }
                release();
            }
            for i in 0..32 {
                for j in 0..32 {
                    let mut want = if load_c { init[i * sc + j] as f64 } else { 0.0 };
                    for k in 0..ka {
                        let (step, kk) = (k / 32, k % 32);
                        let (tile, col) = (j / 16, j % 16);
                        let bk = b[step * 1024 + tile * 512 + (kk / 2) * 32 + col * 2 + kk % 2];
                        want +=
                            val(half::bf16::from_bits(a[i * sa + k])) as f64 * val(half::bf16::from_bits(bk)) as f64;
                    }
                    let got = c[i * sc + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "load_c {load_c} C[{i}][{j}] {got} vs {want}"
                    );
                }
            }
            // Columns past the two tiles are untouched.
            assert_eq!(c[32..sc], init[32..sc]);
        }
    }
}

//! The block-wide top-k code of `cuda/topk.cuh`, unchanged, run on the host as one block of the
//! grid emulation `cuda/host/grid_shim.h` (threads as fibers, `__syncthreads` and warp ballots
//! with CUDA's rules). It checks the selection logic on sizes and block shapes the kernels'
//! tests do not reach; the whole kernels run on the emulated driver (`cuda::emu`, feature
//! `cuda-emu`). It says nothing about speed.

use crate::error::{Error, Result};

unsafe extern "C" {
    fn ek_cuda_host_select(scores: *const f32, count: i32, k: i32, threads: u32, out: *mut u32) -> i32;
    fn ek_cuda_host_topk(keys: *const f64, count: i32, k: i32, threads: u32, out: *mut u32) -> i32;
}

/// Most positions `block_rank_topk` sorts in shared memory (more are ranked by counting).
pub const RANK_SORT_CAP: usize = super::launches::RANK_SORT_CAP;

fn check_block(threads: u32, count: usize) -> Result<()> {
    if threads == 0 || !threads.is_multiple_of(32) || threads > 1024 {
        return Err(Error::range("threads", threads, "a CUDA block of whole warps, at most 1024 threads"));
    }
    if count > i32::MAX as usize {
        return Err(Error::range("count", count, "at most i32::MAX scores"));
    }
    Ok(())
}

/// The result of an emulated block, or the rule it broke (printed to stderr by the emulation).
fn emulated(code: i32, call: &'static str, out: Vec<u32>) -> Result<Vec<u32>> {
    if code == 0 {
        Ok(out)
    } else {
        Err(Error::Driver {
            backend: "cuda",
            call,
            detail: "the host emulation reported a violation (see stderr)".into(),
        })
    }
}

/// `block_select`: the `k` best of `scores` (ties to the lower index), in ascending index order,
/// as one block of `threads` threads computes them.
pub fn block_select(scores: &[f32], k: usize, threads: u32) -> Result<Vec<u32>> {
    check_block(threads, scores.len())?;
    if k > scores.len() {
        return Err(Error::range("k", k, format!("at most the {} scores", scores.len())));
    }
    let mut out = vec![u32::MAX; k];
    // SAFETY: `scores` holds `count` floats and `out` room for the `k` positions written.
    let r = unsafe { ek_cuda_host_select(scores.as_ptr(), scores.len() as i32, k as i32, threads, out.as_mut_ptr()) };
    emulated(r, "block_select", out)
}

/// `block_rank_topk`: the `min(k, keys.len())` best of `keys` by rank (larger first, ties to the
/// lower index), as one block of `threads` threads computes them: selected, then sorted (up to
/// [`RANK_SORT_CAP`]) or ranked by counting.
pub fn block_topk(keys: &[f64], k: usize, threads: u32) -> Result<Vec<u32>> {
    check_block(threads, keys.len())?;
    if k > i32::MAX as usize {
        return Err(Error::range("k", k, "at most i32::MAX"));
    }
    let mut out = vec![u32::MAX; k.min(keys.len())];
    // SAFETY: `keys` holds `count` doubles and `out` room for the min(k, count) positions written.
    let r = unsafe { ek_cuda_host_topk(keys.as_ptr(), keys.len() as i32, k as i32, threads, out.as_mut_ptr()) };
    emulated(r, "block_rank_topk", out)
}

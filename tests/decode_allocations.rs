//! A decode step over a paged cache allocates nothing once its workspace has grown (SPEC §7.6):
//! counted with a counting global allocator over 38 steps of append + attention, after two
//! warm-up steps. A count, not a timing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use entropy_kernels::*;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_steps_allocate_nothing_after_the_first() {
    let (seqs, hq, hkv, d, page, prompt, steps) = (4usize, 8usize, 2usize, 64usize, 16usize, 2048usize, 40usize);
    let kernels = Kernels::cpu();
    let width = (prompt + steps).div_ceil(page);
    let layout = PageLayout::slot_major(seqs * width, page, hkv, d);
    // Pages interleaved across sequences, as an engine allocating on demand leaves them.
    let ids: Vec<u32> = (0..seqs).flat_map(|i| (0..width).map(move |p| (p * seqs + i) as u32)).collect();
    let pool_len = seqs * width * page * hkv * d;
    let (mut kp, mut vp) = (vec![0f32; pool_len], vec![0f32; pool_len]);
    let mut lens = vec![0u32; seqs * hkv];
    let mut ws = Workspace::new();
    let prompt_k = synth::normal(seqs * prompt * hkv * d, 1.0, 1);
    let cu: Vec<u32> = (0..=seqs as u32).map(|i| i * prompt as u32).collect();
    kernels
        .append(
            TensorView::thd(&prompt_k, [seqs * prompt, hkv, d]),
            TensorView::thd(&prompt_k, [seqs * prompt, hkv, d]),
            &cu,
            &mut KvCacheMut::paged(&mut kp, &mut vp, layout, BlockTable::new(&ids, width), &mut lens),
            &mut ws,
        )
        .unwrap();
    // Every step's inputs and outputs exist before counting starts: only the calls are counted.
    let q: Vec<Vec<f32>> = (0..steps).map(|s| synth::normal(seqs * hq * d, 1.0, 10 + s as u64)).collect();
    let kn: Vec<Vec<f32>> = (0..steps).map(|s| synth::normal(seqs * hkv * d, 1.0, 100 + s as u64)).collect();
    let mut out = vec![0f32; seqs * hq * d];
    let mut lse = vec![0f32; seqs * hq];
    let one_each: Vec<u32> = (0..=seqs as u32).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    // A rayon worker registers with crossbeam-epoch (two allocations, once per thread) the first
    // time it steals; under load a worker may first steal after the warm-up. Register them all
    // now: what the test counts is the kernels' allocations, not the thread pool's one-time setup.
    pool.broadcast(|_| drop(crossbeam_epoch::pin()));
    let counted = pool.install(|| {
        let mut counted = Vec::new();
        for s in 0..steps {
            let warm = s >= 2;
            ALLOCATIONS.store(0, Ordering::SeqCst);
            COUNTING.store(warm, Ordering::SeqCst);
            let table = BlockTable::new(&ids, width);
            kernels
                .append(
                    TensorView::thd(&kn[s], [seqs, hkv, d]),
                    TensorView::thd(&kn[s], [seqs, hkv, d]),
                    &one_each,
                    &mut KvCacheMut::paged(&mut kp, &mut vp, layout, table.clone(), &mut lens),
                    &mut ws,
                )
                .unwrap();
            kernels
                .attend(
                    TensorView::thd(&q[s], [seqs, hq, d]),
                    &one_each,
                    &KvCache::paged(&kp, &vp, layout, table, &lens),
                    &[],
                    None,
                    &mut TensorViewMut::thd(&mut out, [seqs, hq, d]),
                    Some(&mut lse),
                    &mut ws,
                )
                .unwrap();
            COUNTING.store(false, Ordering::SeqCst);
            if warm {
                counted.push(ALLOCATIONS.load(Ordering::SeqCst));
            }
        }
        counted
    });
    assert!(out.iter().all(|x| x.is_finite()));
    assert_eq!(counted, vec![0; steps - 2], "heap allocations per decode step after the warm-up");
    assert_eq!(lens, vec![(prompt + steps) as u32; seqs * hkv]);
}

//! The one-shot calls as calls of attention over a cache (one code path for the semantics,
//! SPEC §7): `dense_prefill` / `sparse_prefill` and `decode_attention` run [`super::engine`]
//! over the contiguous cache their K/V form, batch row `i` being sequence `i` — prefill with the
//! causal rule, decode with every held entry visible.

use crate::engine::{AttendArgs, KvCache, Workspace};
use crate::tensor::{Element, HostTensor, TensorView, TensorViewMut};
use crate::validate::{AttentionArgs, DecodeArgs};

use super::Strided;
use super::simd::Isa;

/// Dense or block-sparse causal prefill (validated arguments).
pub(crate) fn prefill<E: Element>(
    isa: Isa,
    lanes: usize,
    a: &AttentionArgs<'_>,
    out: &mut TensorViewMut<'_>,
    lse: Option<&mut [f32]>,
) {
    let d = a.dims();
    let lens = vec![d.seq_len as u32; d.batch * d.kv_heads];
    let cu: Vec<u32> = (0..=d.batch).map(|i| (i * d.seq_len) as u32).collect();
    // K/V `[B, L, Hkv, D]` seen as caches `[B, Hkv, L, D]`: one page of L entries per sequence.
    let (k, v) = (a.k().transpose(1, 2).expect("dims 1 and 2"), a.v().transpose(1, 2).expect("dims 1 and 2"));
    with_cache::<E, _>(k, v, &lens, |cache| {
        let args = AttendArgs::one_shot(a.q(), &cu, cache, a.blocks(), a.scale(), true);
        with_workspace(|ws| super::engine::attend::<E>(isa, lanes, &args, out, lse, ws))
    })
}

/// Decode attention over `[B, Hc, capacity, D]` caches with per-head lengths (validated).
pub(crate) fn decode<E: Element>(isa: Isa, lanes: usize, a: &DecodeArgs<'_>, out: &mut TensorViewMut<'_>) {
    let d = a.dims();
    let cu: Vec<u32> = (0..=d.batch).map(|i| (i * d.queries) as u32).collect();
    with_cache::<E, _>(a.k_cache(), a.v_cache(), a.lengths(), |cache| {
        let args = AttendArgs::one_shot(a.q(), &cu, cache, None, a.scale(), false);
        with_workspace(|ws| super::engine::attend::<E>(isa, lanes, &args, out, None, ws))
    })
}

thread_local! {
    /// The calling thread's workspace for one-shot calls: a decode step's tiles and split-K
    /// buffers are reused from call to call, as an engine's own workspace would be.
    static WORKSPACE: std::cell::RefCell<Workspace> = std::cell::RefCell::new(Workspace::new());
}

/// Runs `f` with this thread's one-shot workspace (a fresh one if it is in use further up).
fn with_workspace<R>(f: impl FnOnce(&mut Workspace) -> R) -> R {
    WORKSPACE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut ws) => f(&mut ws),
        Err(_) => f(&mut Workspace::new()),
    })
}

/// Runs `f` over the contiguous cache of `k` and `v` `[B, H, capacity, D]`. A cache has one
/// layout for both pools, so K and V of different strides are first copied into row-major
/// buffers (the only copy the one-shot calls make; views of one tensor share strides).
fn with_cache<E: Element, R>(
    k: TensorView<'_>,
    v: TensorView<'_>,
    lens: &[u32],
    f: impl FnOnce(KvCache<'_>) -> R,
) -> R {
    if let Ok(cache) = KvCache::contiguous(k, v, lens) {
        return f(cache);
    }
    let (kc, vc) = (row_major::<E>(&k), row_major::<E>(&v));
    let cache =
        KvCache::contiguous(kc.view(), vc.view(), lens).expect("row-major views of one shape share their layout");
    f(cache)
}

/// A row-major copy of a view.
fn row_major<E: Element>(t: &TensorView<'_>) -> HostTensor {
    let [a, b, c, d] = t.shape();
    let s = Strided::<E>::of(t);
    let mut out = HostTensor::zeros(E::DTYPE, t.shape());
    {
        let mut view = out.view_mut();
        let dst = view.typed_mut::<E>().expect("allocated as E");
        let rows = (0..a).flat_map(|i| (0..b).flat_map(move |j| (0..c).map(move |k| (i, j, k))));
        for (n, (i, j, k)) in rows.enumerate() {
            dst[n * d..(n + 1) * d].copy_from_slice(s.row(i, j, k, d));
        }
    }
    out
}

//! The Ascend backend's resident-cache calls (`AscendBackend::*_on` over an `AscendPagedCache`)
//! behind the `Backend` trait, so every engine equivalence test runs them too: each engine call
//! uploads the host cache, runs the `_on` call on the device copy and copies written pools back.
//! The one-shot layouts (batched queries) and plans fused with a previous layer's, which the
//! resident calls do not take in this form, go to the host-data calls.

use std::sync::Arc;

use entropy_kernels::ascend::device::AscendBackend;
use entropy_kernels::ascend::resident::AscendPagedCache;
use entropy_kernels::engine::{
    AttendArgs, ChunkArgs, ChunkRequest, KvCache, KvCacheMut, PagedCache, Scores, SelectArgs, Selection, Workspace,
};
use entropy_kernels::validate::{AttentionArgs, CompressArgs, DecodeArgs, PlanArgs};
use entropy_kernels::{
    Backend, BackendKind, Capabilities, CompressedCache, EntropyConfig, HostTensor, Kernels, Plan, PlanState,
    TensorView, TensorViewMut,
};

/// The resident-cache calls of the (mock) Ascend backend, as a backend.
pub struct Resident(pub AscendBackend);

/// The backend, or `None` (printed) where the mock cannot be opened.
pub fn open(test: &str) -> Option<Kernels> {
    match super::mock_ascend(test) {
        Ok(b) => Some(Kernels::from_backend(Arc::new(Resident(b)))),
        Err(e) => {
            super::skip_notice(&format!("SKIP ascend resident caches: {e}"), test);
            None
        }
    }
}

fn host_copy(c: &KvCache<'_>) -> PagedCache {
    let pool = |bytes: &[u8]| HostTensor::from_bytes(bytes, [1, 1, 1, bytes.len() / c.dtype().size()], c.dtype());
    PagedCache {
        k: pool(c.k().as_bytes()),
        v: pool(c.v().as_bytes()),
        layout: *c.layout(),
        ids: c.table().ids().to_vec(),
        width: c.table().width(),
        lens: c.lens().to_vec(),
    }
}

impl Resident {
    fn upload(&self, c: &KvCache<'_>) -> entropy_kernels::Result<AscendPagedCache> {
        AscendPagedCache::upload(&self.0, &host_copy(c))
    }

    /// Runs `f` on a device copy of `cache`, then copies the pools back (the lengths are the
    /// engine's, advanced by its shared code: the device copy's must have become `lens`).
    fn write(
        &self,
        cache: &mut KvCacheMut<'_>,
        lens: Vec<u32>,
        f: impl FnOnce(&mut AscendPagedCache) -> entropy_kernels::Result<()>,
    ) -> entropy_kernels::Result<()> {
        let mut dev = self.upload(&cache.as_cache())?;
        f(&mut dev)?;
        assert_eq!(dev.lens, lens, "the resident call's lengths");
        let back = dev.to_host()?;
        let (k, v) = cache.pools_mut();
        k.as_bytes_mut().copy_from_slice(back.k.data().as_bytes());
        v.as_bytes_mut().copy_from_slice(back.v.data().as_bytes());
        Ok(())
    }
}

impl std::fmt::Debug for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Resident({:?})", self.0)
    }
}

impl Backend for Resident {
    fn kind(&self) -> BackendKind {
        BackendKind::Ascend
    }
    fn describe(&self) -> String {
        format!("{} — resident caches", self.0.describe())
    }
    fn capabilities(&self) -> &Capabilities {
        self.0.capabilities()
    }
    fn plan(&self, a: &PlanArgs<'_>) -> entropy_kernels::Result<Plan> {
        self.0.plan(a)
    }
    fn attention(
        &self,
        a: &AttentionArgs<'_>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut [f32]>,
    ) -> entropy_kernels::Result<()> {
        self.0.attention(a, out, lse)
    }
    fn kv_compress(&self, a: &CompressArgs<'_>) -> entropy_kernels::Result<CompressedCache> {
        self.0.kv_compress(a)
    }
    fn decode_attention(&self, a: &DecodeArgs<'_>, out: &mut TensorViewMut<'_>) -> entropy_kernels::Result<()> {
        self.0.decode_attention(a, out)
    }
    fn attend(
        &self,
        a: &AttendArgs<'_>,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut [f32]>,
        ws: &mut Workspace,
    ) -> entropy_kernels::Result<()> {
        if a.batched().is_some() {
            return self.0.attend(a, out, lse, ws);
        }
        let dev = self.upload(a.cache())?;
        let blocks: Vec<_> = (0..a.dims().sequences).map(|i| a.blocks(i).map(|(bl, _)| bl)).collect();
        self.0.attend_on(&a.q(), a.cu_q(), &dev, &blocks, Some(a.scale()), out, lse)
    }
    fn plan_chunks(&self, a: &ChunkArgs<'_>, states: &mut [PlanState]) -> entropy_kernels::Result<Vec<Plan>> {
        if a.seqs().iter().any(|sc| sc.fusion.is_some()) {
            return self.0.plan_chunks(a, states);
        }
        let dev = self.upload(a.cache())?;
        let mut cu = vec![0u32];
        cu.extend(a.seqs().iter().map(|sc| sc.tokens.end as u32));
        let prompts: Vec<u32> = a.seqs().iter().map(|sc| sc.dims.seq_len as u32).collect();
        let cfgs: Vec<EntropyConfig> = a.seqs().iter().map(|sc| sc.cfg.clone()).collect();
        let req = ChunkRequest { keep_maps: a.keep_maps(), full_ranking: a.full_ranking(), ..Default::default() };
        self.0.plan_chunks_on(&a.q(), &cu, &dev, &prompts, &cfgs, states, &req)
    }
    fn select(&self, a: &SelectArgs<'_>) -> entropy_kernels::Result<Selection> {
        self.0.select_on(&self.upload(a.cache())?, &a.obs(), a.cfg(), a.compress())
    }
    fn kv_scores(&self, a: &SelectArgs<'_>) -> entropy_kernels::Result<Scores> {
        self.0.kv_scores_on(&self.upload(a.cache())?, &a.obs(), a.cfg(), a.compress())
    }
    fn append_rows(
        &self,
        k_new: &TensorView<'_>,
        v_new: &TensorView<'_>,
        cu: &[u32],
        cache: &mut KvCacheMut<'_>,
    ) -> entropy_kernels::Result<()> {
        let heads = cache.layout().heads;
        let mut lens = cache.lens().to_vec();
        for (i, row) in lens.chunks_mut(heads).enumerate() {
            row.iter_mut().for_each(|l| *l += cu[i + 1] - cu[i]);
        }
        self.write(cache, lens, |dev| self.0.append_on(k_new, v_new, cu, dev, &mut Workspace::new()))
    }
    fn compact(&self, cache: &mut KvCacheMut<'_>, sel: &Selection) -> entropy_kernels::Result<()> {
        let heads = cache.layout().heads;
        let mut lens = cache.lens().to_vec();
        for (u, l) in lens.iter_mut().enumerate().filter(|(u, _)| sel.compressed[u / heads]) {
            *l = sel.kept(u / heads, u % heads).len() as u32;
        }
        self.write(cache, lens, |dev| self.0.compact_on(dev, sel, &mut Workspace::new()))
    }
}

//! `entropy-kernels bench-device`: the CUDA kernels on device-resident tensors (the `_on` calls:
//! no host copies of tensors in the timings, as an engine would call them), against the
//! device-to-device copy bandwidth measured in the same run. This is the benchmark of the CUDA
//! issue's targets; `bench --backend cuda` times the host API, uploads and downloads included.

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use cudarc::driver::{CudaSlice, CudaStream};
use entropy_kernels::cuda::{CudaAttendPlan, CudaBackend, CudaPagedCache, CudaTensor, CudaTensorMut, DeviceElement};
use entropy_kernels::{
    Backend, DType, DecodeConfig, EntropyConfig, Error, HostBuffer, HostTensor, PageLayout, PlanRequest, Result, synth,
};

use super::{Table, ms, with_spinner};

#[derive(Args, Debug)]
pub struct BenchDeviceArgs {
    /// Comma-separated prompt lengths.
    #[arg(long, value_delimiter = ',', default_value = "16384")]
    pub lengths: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    pub q_heads: usize,
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    #[arg(long, default_value = "bf16")]
    pub dtype: DType,
    /// Timed repetitions per measurement (enqueued back to back; the mean is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Comma-separated subset of dense, sparse, compress, decode, paged-decode, compaction,
    /// chunked-prefill.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "dense,sparse,compress,decode,paged-decode,compaction,chunked-prefill"
    )]
    pub ops: Vec<String>,
    /// Sequences of the decode batch.
    #[arg(long, default_value_t = 64)]
    pub decode_batch: usize,
    /// Entries per head of the decode caches.
    #[arg(long, default_value_t = 1024)]
    pub decode_cache: usize,
    /// Entries per head before the in-place compaction (`compaction`: `decode_batch` sequences).
    #[arg(long, default_value_t = 131072)]
    pub compact_from: usize,
    /// Entries per head after it (the decode budget).
    #[arg(long, default_value_t = 1024)]
    pub compact_to: usize,
    /// Prompts of the ragged chunked prefill (`chunked-prefill`).
    #[arg(long, default_value_t = 4)]
    pub chunk_prompts: usize,
    /// Tokens per prompt of the chunked prefill.
    #[arg(long, default_value_t = 32768)]
    pub chunk_len: usize,
    /// Tokens per chunk (a multiple of the config's segment size).
    #[arg(long, default_value_t = 8192)]
    pub chunk: usize,
    /// Bytes of the device-to-device copy that sets the bandwidth baseline.
    #[arg(long, default_value_t = 512 << 20)]
    pub copy_bytes: usize,
    #[arg(long, default_value_t = 0.5)]
    pub rigid_fraction: f64,
    /// A JSON config for the sparse prefill (paper defaults otherwise).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Write each length's block lists to DIR/blocks-<L>.json, for the peer reference pipeline
    /// (`benches/peer_sdpa.py --blocks DIR`: per-segment gather + SDPA on the same lists).
    #[arg(long)]
    pub dump_blocks: Option<std::path::PathBuf>,
}

/// The block lists as JSON (their serde form: `dims`, per-unit `dense` flags, CSR `indptr` and
/// `indices`; unit u = (b · kv_heads + h) · segments + s).
fn dump_blocks(dir: &std::path::Path, blocks: &entropy_kernels::BlockLists) -> Result<()> {
    let path = dir.join(format!("blocks-{}.json", blocks.dims.seq_len));
    let io = |source| Error::Io { path: path.display().to_string(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    let json = serde_json::to_string(blocks).map_err(|e| io(std::io::Error::other(e)))?;
    std::fs::write(&path, json).map_err(io)
}

fn driver(call: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Driver { backend: "cuda", call, detail: e.to_string() }
}

/// Seconds per call of `f`, enqueued `reps` times back to back after one warm-up call, the
/// stream drained before and after.
fn per_call(stream: &CudaStream, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    stream.synchronize().map_err(driver("cuStreamSynchronize"))?;
    let t = Instant::now();
    for _ in 0..reps.max(1) {
        f()?;
    }
    stream.synchronize().map_err(driver("cuStreamSynchronize"))?;
    Ok(t.elapsed().as_secs_f64() / reps.max(1) as f64)
}

/// The tensor's elements as `T` (its own dtype), on the device.
fn upload<T: DeviceElement + bytemuck::Pod>(stream: &Arc<CudaStream>, t: &HostTensor) -> Result<CudaSlice<T>> {
    let host: Vec<T> = match &t.data {
        HostBuffer::F32(x) => bytemuck::cast_slice(x).to_vec(),
        HostBuffer::F16(x) => bytemuck::cast_slice(x).to_vec(),
        HostBuffer::BF16(x) => bytemuck::cast_slice(x).to_vec(),
    };
    stream.clone_htod(&host).map_err(driver("cuMemcpyHtoD"))
}

pub fn run(a: &BenchDeviceArgs) -> Result<()> {
    let be = entropy_kernels::cuda::open()?;
    match a.dtype {
        DType::F32 => run_typed::<f32>(&be, a),
        DType::F16 => run_typed::<half::f16>(&be, a),
        DType::BF16 => run_typed::<half::bf16>(&be, a),
    }
}

fn run_typed<T: DeviceElement + bytemuck::Pod>(be: &CudaBackend, a: &BenchDeviceArgs) -> Result<()> {
    let cfg = match &a.config {
        Some(p) => entropy_kernels::Config::load(p)?.prefill,
        None => EntropyConfig::entropy_infer(),
    };
    let want = |op: &str| a.ops.iter().any(|o| o == op);
    let stream = be.stream().clone();
    let (hq, hkv, d, size) = (a.q_heads, a.kv_heads, a.head_dim, a.dtype.size());
    println!("backend: {} — device-resident tensors, no host copies timed", be.describe());
    println!(
        "GQA {hq}/{hkv}, D {d}, {}, mean of {} back-to-back calls; sparse = EntropyInfer with S={} Bk={} T={} base={} ({:?})",
        a.dtype, a.reps, cfg.segment_size, cfg.block_size, cfg.threshold_len, cfg.base_budget, cfg.budget_mode
    );
    let mut t = Table::new(&["tokens", "op", "ms", "TFLOP/s", "GB/s", "vs baseline", "note"]);

    // Baseline: a device-to-device copy (bytes read + bytes written per second).
    let src = stream.alloc_zeros::<u8>(a.copy_bytes).map_err(driver("cuMemAlloc"))?;
    let mut dst = stream.alloc_zeros::<u8>(a.copy_bytes).map_err(driver("cuMemAlloc"))?;
    let copy_s = per_call(&stream, a.reps, || stream.memcpy_dtod(&src, &mut dst).map_err(driver("cuMemcpyDtoD")))?;
    let copy_gbs = 2.0 * a.copy_bytes as f64 / copy_s / 1e9;
    drop((src, dst));
    t.row(vec![
        "-".into(),
        "copy, device to device".into(),
        ms(copy_s),
        "-".into(),
        format!("{copy_gbs:.1}"),
        "1.00".into(),
        format!("{} MiB read + written", a.copy_bytes >> 20),
    ]);
    let of_copy = |gbs: f64| format!("{:.2} of copy", gbs / copy_gbs);

    for &l in &a.lengths {
        let spec = synth::PlantedSpec {
            batch: 1,
            seq_len: l,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
            block_size: cfg.block_size,
            segment_size: cfg.segment_size,
            rigid_fraction: a.rigid_fraction,
            seed: l as u64,
        };
        let (q, k, v) = with_spinner(&format!("inputs for {l} tokens"), || super::planted(&spec, a.dtype));
        let (qd, kd, vd) = (upload::<T>(&stream, &q)?, upload::<T>(&stream, &k)?, upload::<T>(&stream, &v)?);
        drop((k, v));
        let mut od = stream.alloc_zeros::<T>(q.len()).map_err(driver("cuMemAlloc"))?;
        let (qt, kt, vt) = (
            CudaTensor::bsnd(&qd, &stream, q.shape),
            CudaTensor::bsnd(&kd, &stream, [1, l, hkv, d]),
            CudaTensor::bsnd(&vd, &stream, [1, l, hkv, d]),
        );
        let dense_flops = 2.0 * (l as f64).powi(2) * (d * hq) as f64;
        let mut dense_s = f64::NAN;
        if want("dense") {
            dense_s = per_call(&stream, a.reps, || {
                let mut ot = CudaTensorMut::bsnd(&mut od, &stream, q.shape);
                be.prefill_on(&stream, &qt, &kt, &vt, None, cfg.scale, &mut ot, None)
            })?;
            t.row(vec![
                l.to_string(),
                "dense prefill".into(),
                ms(dense_s),
                format!("{:.1}", dense_flops / dense_s / 1e12),
                "-".into(),
                "1.00".into(),
                "2·L²·D·Hq FLOPs".into(),
            ]);
        }
        if want("sparse") {
            let req = PlanRequest::layer(0).keep_maps(false);
            let plan = be.plan_on(&stream, &qt, &kt, &cfg, &req)?;
            let kept = plan.blocks.kept_fraction();
            if let Some(dir) = &a.dump_blocks {
                dump_blocks(dir, &plan.blocks)?;
            }
            let plan_s = per_call(&stream, a.reps, || be.plan_on(&stream, &qt, &kt, &cfg, &req).map(|_| ()))?;
            let attn_s = per_call(&stream, a.reps, || {
                let mut ot = CudaTensorMut::bsnd(&mut od, &stream, q.shape);
                be.prefill_on(&stream, &qt, &kt, &vt, Some(&plan.blocks), cfg.scale, &mut ot, None)
            })?;
            let total = plan_s + attn_s;
            let vs = |s: f64| if dense_s.is_finite() { format!("{:.2}× faster", dense_s / s) } else { "-".into() };
            t.row(vec![
                l.to_string(),
                "plan".into(),
                ms(plan_s),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("{:.1}% of sparse prefill (decisions read back)", 100.0 * plan_s / total),
            ]);
            t.row(vec![
                l.to_string(),
                "sparse prefill".into(),
                ms(total),
                format!("{:.1}", kept * dense_flops / attn_s / 1e12),
                "-".into(),
                vs(total),
                format!("plan + attention; kept {kept:.3} of causal pairs, {} rigid heads", plan.rigid_heads()),
            ]);
        }
        if want("compress") {
            let dcfg = DecodeConfig::latent();
            if l > dcfg.decode_budget && l > dcfg.window {
                // The prompt's K/V as [1, Hkv, L, D] caches, its last W queries as [1, Hq, W, D].
                let cache = [1, hkv, l, d];
                let cache_strides = [l * hkv * d, d, hkv * d, 1];
                let kc = CudaTensor::new(&kd, &stream, cache, cache_strides);
                let vc = CudaTensor::new(&vd, &stream, cache, cache_strides);
                let obs_view = qd.slice((l - dcfg.window) * hq * d..);
                let obs = CudaTensor::new(&obs_view, &stream, [1, hq, dcfg.window, d], [l * hq * d, d, hq * d, 1]);
                let s =
                    per_call(&stream, a.reps, || be.kv_compress_on::<T>(&stream, &kc, &vc, &obs, &dcfg).map(|_| ()))?;
                // The two scoring passes each read K; the target may count it once.
                let once = (l * hkv * d * size) as f64 / s / 1e9;
                t.row(vec![
                    l.to_string(),
                    "kv_compress".into(),
                    ms(s),
                    "-".into(),
                    format!("{:.1}", 2.0 * once),
                    of_copy(2.0 * once),
                    format!(
                        "W {}, budget {}; GB/s of K read by both scoring passes (one read: {once:.1}, {})",
                        dcfg.window,
                        dcfg.decode_budget,
                        of_copy(once)
                    ),
                ]);
            }
        }
    }

    if want("decode") {
        let (b, n) = (a.decode_batch, a.decode_cache);
        let cache = [b, hkv, n, d];
        let kc = upload::<T>(&stream, &HostTensor::from_f32(&synth::normal(b * hkv * n * d, 1.0, 1), cache, a.dtype))?;
        let vc = upload::<T>(&stream, &HostTensor::from_f32(&synth::normal(b * hkv * n * d, 1.0, 2), cache, a.dtype))?;
        let q = HostTensor::from_f32(&synth::normal(b * hq * d, 1.0, 3), [b, 1, hq, d], a.dtype);
        let qd = upload::<T>(&stream, &q)?;
        let mut od = stream.alloc_zeros::<T>(q.len()).map_err(driver("cuMemAlloc"))?;
        let lengths = vec![n as u32; b * hkv];
        let (qt, kt, vt) = (
            CudaTensor::bsnd(&qd, &stream, q.shape),
            CudaTensor::bsnd(&kc, &stream, cache),
            CudaTensor::bsnd(&vc, &stream, cache),
        );
        let s = per_call(&stream, a.reps, || {
            let mut ot = CudaTensorMut::bsnd(&mut od, &stream, q.shape);
            be.decode_attention_on(&stream, &qt, &kt, &vt, &lengths, None, &mut ot)
        })?;
        let gbs = (2 * b * hkv * n * d * size) as f64 / s / 1e9;
        t.row(vec![
            "-".into(),
            "decode_attention".into(),
            ms(s),
            "-".into(),
            format!("{gbs:.1}"),
            of_copy(gbs),
            format!("batch {b}, {n} entries/head; GB/s of one read of K and V"),
        ]);
    }

    if want("paged-decode") {
        // The engine path: the same batch over 16-entry slot-major pages (interleaved across the
        // sequences as on-demand allocation leaves them), filled by append_on, read by a planned
        // run_attend_on (no allocation or copy per call).
        let (b, n, ps) = (a.decode_batch, a.decode_cache, 16);
        let width = n.div_ceil(ps);
        let layout = PageLayout::slot_major(b * width, ps, hkv, d);
        let mut dc = interleaved_cache::<T>(&stream, layout, b, width, 0)?;
        let cu: Vec<u32> = (0..=b as u32).map(|i| i * n as u32).collect();
        let cud = stream.clone_htod(&cu).map_err(driver("cuMemcpyHtoD"))?;
        let rows = HostTensor::from_f32(&synth::normal(b * n * hkv * d, 1.0, 4), [1, b * n, hkv, d], a.dtype);
        let rows_d = upload::<T>(&stream, &rows)?;
        let mut ws = entropy_kernels::Workspace::new();
        {
            let r = CudaTensor::bsnd(&rows_d, &stream, rows.shape);
            be.append_on(&stream, &r, &r, &cu, &cud, &mut dc.view_mut(&stream)?, &mut ws)?;
        }
        let q = HostTensor::from_f32(&synth::normal(b * hq * d, 1.0, 5), [1, b, hq, d], a.dtype);
        let qd = upload::<T>(&stream, &q)?;
        let mut od = stream.alloc_zeros::<T>(q.len()).map_err(driver("cuMemAlloc"))?;
        let cu1: Vec<u32> = (0..=b as u32).collect();
        let cache = dc.view(&stream)?;
        let mut plan = CudaAttendPlan::new();
        {
            let qt = CudaTensor::bsnd(&qd, &stream, q.shape);
            let ot = CudaTensorMut::bsnd(&mut od, &stream, q.shape);
            be.plan_attend_on(&stream, &mut plan, &qt, &cu1, &cache, &[], None, &ot, None)?;
        }
        let s = per_call(&stream, a.reps, || {
            let qt = CudaTensor::bsnd(&qd, &stream, q.shape);
            let mut ot = CudaTensorMut::bsnd(&mut od, &stream, q.shape);
            be.run_attend_on(&stream, &plan, &qt, &cache, &mut ot, None)
        })?;
        let gbs = (2 * b * hkv * n * d * size) as f64 / s / 1e9;
        t.row(vec![
            "-".into(),
            "paged decode (run_attend_on)".into(),
            ms(s),
            "-".into(),
            format!("{gbs:.1}"),
            of_copy(gbs),
            format!("batch {b}, {n} entries/head, page {ps}; GB/s of one read of K and V"),
        ]);
    }
    if want("compaction") {
        compaction::<T>(be, a, &stream, &mut t, &of_copy)?;
    }
    if want("chunked-prefill") {
        chunked_prefill::<T>(be, a, &stream, &mut t, &cfg)?;
    }
    println!();
    t.print();
    Ok(())
}

/// Selection (`select_on`: scoring + top-k over the pages) and in-place compaction
/// (`compact_on`) of `decode_batch` sequences × `compact_from` entries per head down to
/// `compact_to`, on 16-entry interleaved slot-major pages; the pools hold a random 64 MiB block
/// over and over (what the scores need: distinct keys within a window's reach). The compaction's
/// GB/s count each moved K and V entry read and written once; each rep first restores the
/// lengths (a device-to-device copy of 4 bytes per head).
fn compaction<T: DeviceElement + bytemuck::Pod>(
    be: &CudaBackend,
    a: &BenchDeviceArgs,
    stream: &Arc<CudaStream>,
    t: &mut Table,
    of_copy: &dyn Fn(f64) -> String,
) -> Result<()> {
    let (hq, hkv, d, size) = (a.q_heads, a.kv_heads, a.head_dim, a.dtype.size());
    let (b, n, ps) = (a.decode_batch, a.compact_from, 16);
    let cfg = DecodeConfig { decode_budget: a.compact_to, ..DecodeConfig::latent() };
    let width = n.div_ceil(ps);
    let layout = PageLayout::slot_major(b * width, ps, hkv, d);
    let pool_len = layout.elements().unwrap_or(0);
    let mut dc = interleaved_cache::<T>(stream, layout, b, width, n as u32)?;
    let block_len = ((64 << 20) / size).min(pool_len.max(1));
    let block = HostTensor::from_f32(&synth::normal(block_len, 1.0, 6), [1, 1, 1, block_len], a.dtype);
    let block_d = upload::<T>(stream, &block)?;
    for pool in [&mut dc.k, &mut dc.v] {
        for start in (0..pool_len).step_by(block_len) {
            let end = (start + block_len).min(pool_len);
            stream
                .memcpy_dtod(&block_d.slice(..end - start), &mut pool.slice_mut(start..end))
                .map_err(driver("cuMemcpyDtoD"))?;
        }
    }
    let full = vec![n as u32; b * hkv];
    let full_d = stream.clone_htod(&full).map_err(driver("cuMemcpyHtoD"))?;
    let obs = HostTensor::from_f32(&synth::normal(b * hq * cfg.window * d, 1.0, 7), [b, hq, cfg.window, d], a.dtype);
    let obs_d = upload::<T>(stream, &obs)?;
    let mut sel = None;
    let select_s = per_call(stream, a.reps, || {
        sel = Some(be.select_on(stream, &dc.view(stream)?, &CudaTensor::bsnd(&obs_d, stream, obs.shape), &cfg, &[])?);
        Ok(())
    })?;
    let sel = sel.expect("per_call ran");
    let score_bytes = (b * hkv * (2 * n - cfg.window) * d * size) as f64;
    t.row(vec![
        "-".into(),
        "selection over pages (select_on)".into(),
        ms(select_s),
        "-".into(),
        format!("{:.1}", score_bytes / select_s / 1e9),
        of_copy(score_bytes / select_s / 1e9),
        format!("batch {b}, {n} entries/head, W {}, page {ps}; GB/s of the keys scored (two passes)", cfg.window),
    ]);
    let mut ws = entropy_kernels::Workspace::new();
    let compact_s = per_call(stream, a.reps, || {
        stream.memcpy_dtod(&full_d, &mut dc.lens).map_err(driver("cuMemcpyDtoD"))?;
        dc.lens_host.copy_from_slice(&full);
        be.compact_on(stream, &mut dc.view_mut(stream)?, &sel, &mut ws)
    })?;
    let moved = (2 * 2 * b * hkv * cfg.decode_budget.min(n) * d * size) as f64;
    t.row(vec![
        "-".into(),
        "in-place compaction (compact_on)".into(),
        ms(compact_s),
        "-".into(),
        format!("{:.1}", moved / compact_s / 1e9),
        of_copy(moved / compact_s / 1e9),
        format!(
            "{n} → {} entries × {hkv} heads × {b} sequences; GB/s of the kept K and V read + written",
            cfg.decode_budget
        ),
    ]);
    Ok(())
}

/// Ragged chunked prefill (SPEC §7.2; issue 16's target: ≤ 1.1× one shot): `chunk_prompts`
/// prompts of `chunk_len` tokens prefilled in rounds of `chunk` tokens each — per round
/// `append_on`, `plan_chunks_on` (`streaming` classes), `plan_attend_on` with the chunks' block
/// lists and `run_attend_on` — against the same prompts in one round, both from empty caches on
/// 16-entry interleaved slot-major pages and timed end to end (planning and the small per-round
/// uploads of offsets and tiles included). The data of the two runs is the same, laid out round
/// by round.
fn chunked_prefill<T: DeviceElement + bytemuck::Pod>(
    be: &CudaBackend,
    a: &BenchDeviceArgs,
    stream: &Arc<CudaStream>,
    t: &mut Table,
    cfg: &EntropyConfig,
) -> Result<()> {
    let (hq, hkv, d) = (a.q_heads, a.kv_heads, a.head_dim);
    let (n, l, c, ps) = (a.chunk_prompts, a.chunk_len, a.chunk, 16);
    let cfg = EntropyConfig { head_class: entropy_kernels::HeadClassMode::Streaming, ..cfg.clone() };
    if c == 0 || !c.is_multiple_of(cfg.segment_size) {
        return Err(Error::range("chunk", c, format!("a multiple of the segment size {}", cfg.segment_size)));
    }
    let width = l.div_ceil(ps);
    let layout = PageLayout::slot_major(n * width, ps, hkv, d);
    let mut dc = interleaved_cache::<T>(stream, layout, n, width, 0)?;
    let zeros_d = stream.clone_htod(&vec![0u32; n * hkv]).map_err(driver("cuMemcpyHtoD"))?;
    // Prompt-major rows (prompt i, token j at row i·l + j), then laid out round by round.
    let data = |h: usize, seed: u64| synth::normal(n * l * h * d, 1.0, seed);
    let by_rounds = |src: &[f32], h: usize, step: usize| -> Vec<f32> {
        let mut out = Vec::with_capacity(src.len());
        for r in 0..l.div_ceil(step) {
            for i in 0..n {
                let rows = (i * l + r * step)..(i * l + ((r + 1) * step).min(l));
                out.extend_from_slice(&src[rows.start * h * d..rows.end * h * d]);
            }
        }
        out
    };
    let (qh, kh, vh) = (data(hq, 8), data(hkv, 9), data(hkv, 10));
    let up = |v: Vec<f32>, h: usize| upload::<T>(stream, &HostTensor::from_f32(&v, [1, n * l, h, d], a.dtype));
    let mut od = stream.alloc_zeros::<T>(n * l * hq * d).map_err(driver("cuMemAlloc"))?;
    let prompt_lens = vec![l as u32; n];
    let mut ws = entropy_kernels::Workspace::new();
    let mut plan = CudaAttendPlan::new();
    let mut timings = Vec::new();
    for step in [l, c] {
        let (q, k, v) = (
            up(by_rounds(&qh, hq, step), hq)?,
            up(by_rounds(&kh, hkv, step), hkv)?,
            up(by_rounds(&vh, hkv, step), hkv)?,
        );
        let s = per_call(stream, a.reps, || {
            stream.memcpy_dtod(&zeros_d, &mut dc.lens).map_err(driver("cuMemcpyDtoD"))?;
            dc.lens_host.fill(0);
            let mut states = vec![entropy_kernels::PlanState::new(); n * hkv];
            for r in 0..l.div_ceil(step) {
                let len = step.min(l - r * step);
                let (row0, tokens) = (n * r * step, n * len);
                let cu: Vec<u32> = (0..=n as u32).map(|i| i * len as u32).collect();
                let cud = stream.clone_htod(&cu).map_err(driver("cuMemcpyHtoD"))?;
                let (qr, kr) = (row0 * hq * d..(row0 + tokens) * hq * d, row0 * hkv * d..(row0 + tokens) * hkv * d);
                let (qs, ks, vs) = (q.slice(qr), k.slice(kr.clone()), v.slice(kr));
                let shape = |h: usize| [1, tokens, h, d];
                let (kt, vt) = (CudaTensor::bsnd(&ks, stream, shape(hkv)), CudaTensor::bsnd(&vs, stream, shape(hkv)));
                be.append_on(stream, &kt, &vt, &cu, &cud, &mut dc.view_mut(stream)?, &mut ws)?;
                let cache = dc.view(stream)?;
                let qt = CudaTensor::bsnd(&qs, stream, shape(hq));
                let plans = be.plan_chunks_on(
                    stream,
                    &qt,
                    &cu,
                    &cache,
                    &prompt_lens,
                    std::slice::from_ref(&cfg),
                    &mut states,
                    &entropy_kernels::ChunkRequest::default(),
                )?;
                let blocks: Vec<Option<&entropy_kernels::BlockLists>> = plans.iter().map(|p| Some(&p.blocks)).collect();
                let mut os = od.slice_mut(..tokens * hq * d);
                let mut ot = CudaTensorMut::bsnd(&mut os, stream, shape(hq));
                be.plan_attend_on(stream, &mut plan, &qt, &cu, &cache, &blocks, None, &ot, None)?;
                be.run_attend_on(stream, &plan, &qt, &cache, &mut ot, None)?;
            }
            Ok(())
        })?;
        timings.push(s);
    }
    let (one, chunked) = (timings[0], timings[1]);
    for (what, s, note) in [
        ("ragged prefill, one shot (append, plan_chunks_on, attend)", one, String::new()),
        (
            "ragged chunked prefill (per chunk: the same)",
            chunked,
            format!("{:.2}× one shot (issue 16: ≤ 1.1×)", chunked / one),
        ),
    ] {
        t.row(vec![
            format!("{n} × {l}"),
            what.into(),
            ms(s),
            "-".into(),
            "-".into(),
            "-".into(),
            if note.is_empty() {
                format!("chunk {}", if s == one { l } else { c })
            } else {
                format!("chunk {c}; {note}")
            },
        ]);
    }
    Ok(())
}

/// Zeroed pools of `layout` in device memory for `seqs` sequences of `width` pages each, their
/// pages interleaved across the sequences (as on-demand allocation leaves them), every head
/// holding `len` entries.
fn interleaved_cache<T: DeviceElement + bytemuck::Pod>(
    stream: &Arc<CudaStream>,
    layout: PageLayout,
    seqs: usize,
    width: usize,
    len: u32,
) -> Result<CudaPagedCache<T>> {
    let pool_len = layout.elements().unwrap_or(0);
    let alloc = |n: usize| stream.alloc_zeros::<T>(n).map_err(driver("cuMemAlloc"));
    let table_host: Vec<u32> = (0..seqs).flat_map(|i| (0..width).map(move |p| (p * seqs + i) as u32)).collect();
    let lens_host = vec![len; seqs * layout.heads];
    Ok(CudaPagedCache {
        k: alloc(pool_len)?,
        v: alloc(pool_len)?,
        table: stream.clone_htod(&table_host).map_err(driver("cuMemcpyHtoD"))?,
        lens: stream.clone_htod(&lens_host).map_err(driver("cuMemcpyHtoD"))?,
        layout,
        table_host,
        width,
        lens_host,
    })
}

//! Criterion benchmarks of each operation at realistic sizes, capped so `cargo bench` finishes in
//! a few minutes on a 2-core machine. Throughput is reported in FLOPs (dense-equivalent for
//! attention: 2·L²·D·Hq for a causal prefill) or in bytes of K/V read (decode).
//!
//! The backend is `ENTROPY_KERNELS_BACKEND` (auto by default). `entropy-kernels bench` prints the
//! same measurements as a table with ratios.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use entropy_kernels::*;

fn planted(l: usize, hq: usize, hkv: usize, d: usize, dtype: DType) -> (HostTensor, HostTensor, HostTensor) {
    let p = synth::planted(&synth::PlantedSpec {
        batch: 1,
        seq_len: l,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        block_size: 8,
        segment_size: 512,
        rigid_fraction: 0.5,
        seed: 7,
    });
    (
        HostTensor::from_f32(&p.q, [1, l, hq, d], dtype),
        HostTensor::from_f32(&p.k, [1, l, hkv, d], dtype),
        HostTensor::from_f32(&p.v, [1, l, hkv, d], dtype),
    )
}

fn kernels() -> Kernels {
    let k = Kernels::auto().expect("a backend");
    eprintln!("benchmarking on {}", k.describe());
    k
}

fn prefill(c: &mut Criterion) {
    let kn = kernels();
    let mut g = c.benchmark_group("dense_prefill");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for (dtype, d) in [(DType::F32, 128), (DType::F32, 64), (DType::BF16, 128)] {
        let l = 4096;
        let (q, k, v) = planted(l, 8, 2, d, dtype);
        let mut out = HostTensor::zeros(dtype, q.shape);
        g.throughput(Throughput::Elements((2 * l * l * d * 8) as u64));
        g.bench_function(BenchmarkId::new(format!("gqa8-2_d{d}_{dtype}"), l), |b| {
            b.iter(|| kn.dense_prefill(q.view(), k.view(), v.view(), None, &mut out.view_mut(), None).unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("sparse_prefill");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    let l = 16384;
    let (q, k, v) = planted(l, 8, 2, 128, DType::F32);
    let cfg = EntropyConfig::entropy_infer();
    let req = PlanRequest::layer(0).keep_maps(false);
    let plan = kn.plan(q.view(), k.view(), &cfg, &req).unwrap();
    let mut out = HostTensor::zeros(DType::F32, q.shape);
    g.throughput(Throughput::Elements((plan.blocks.kept_fraction() * (2 * l * l * 128 * 8) as f64) as u64));
    g.bench_function(BenchmarkId::new("paper_defaults_gqa8-2_d128_f32", l), |b| {
        b.iter(|| {
            kn.sparse_prefill(q.view(), k.view(), v.view(), &plan.blocks, None, &mut out.view_mut(), None).unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("plan");
    g.sample_size(20);
    g.bench_function(BenchmarkId::new("paper_defaults_gqa8-2_d128_f32", l), |b| {
        b.iter(|| kn.plan(q.view(), k.view(), &cfg, &req).unwrap())
    });
    g.finish();
}

fn decode(c: &mut Criterion) {
    let kn = kernels();
    let (n, hq, hkv, d, w) = (32768, 8, 2, 128, 32);
    let kc = HostTensor::from_f32(&synth::normal(n * hkv * d, 1.0, 1), [1, hkv, n, d], DType::F32);
    let vc = HostTensor::from_f32(&synth::normal(n * hkv * d, 1.0, 2), [1, hkv, n, d], DType::F32);
    let obs = HostTensor::from_f32(&synth::normal(hq * w * d, 1.0, 3), [1, hq, w, d], DType::F32);
    let mut g = c.benchmark_group("kv_compress");
    g.sample_size(20);
    g.throughput(Throughput::Elements((2 * n * w * hq * d) as u64));
    for (name, cfg) in [("latent_avgpool_mean", DecodeConfig::latent()), ("adakv", DecodeConfig::adakv(0.2))] {
        g.bench_function(BenchmarkId::new(name, n), |b| {
            b.iter(|| kn.kv_compress(kc.view(), vc.view(), obs.view(), &cfg).unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("decode_attention");
    let (b, hq, hkv, cap) = (4, 32, 8, 1024);
    let kc = HostTensor::from_f32(&synth::normal(b * hkv * cap * d, 1.0, 4), [b, hkv, cap, d], DType::F32);
    let vc = HostTensor::from_f32(&synth::normal(b * hkv * cap * d, 1.0, 5), [b, hkv, cap, d], DType::F32);
    let q = HostTensor::from_f32(&synth::normal(b * hq * d, 1.0, 6), [b, 1, hq, d], DType::F32);
    let mut out = HostTensor::zeros(DType::F32, q.shape);
    let lengths = vec![cap as u32; b * hkv];
    g.throughput(Throughput::Bytes((2 * b * hkv * cap * d * 4) as u64));
    g.bench_function(BenchmarkId::new("batch4_gqa32-8_d128_f32", cap), |bch| {
        bch.iter(|| kn.decode_attention(q.view(), kc.view(), vc.view(), &lengths, None, &mut out.view_mut()).unwrap())
    });
    g.finish();
}

criterion_group!(benches, prefill, decode);
criterion_main!(benches);

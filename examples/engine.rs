//! How an inference engine drives the crate for one request: per layer, plan + sparse prefill
//! with the previous layer's map fused in; then the latent observation window through the first
//! decode steps, one compression, and decode attention over the compacted cache.
//!
//! `cargo run --release --example engine` (random activations stand in for a model's).

use entropy_kernels::*;

fn main() -> Result<()> {
    let (layers, b, l, hq, hkv, d) = (4, 1, 6000, 8, 2, 64);
    let kernels = Kernels::auto()?;
    println!("backend: {}", kernels.describe());
    let cfg = EntropyConfig {
        segment_size: 512,
        threshold_len: 2048,
        base_budget: 1024,
        layer_fusion: true,
        ..Default::default()
    };
    let dcfg = DecodeConfig::latent();

    // Prefill, layer by layer. Layer fusion hands each layer's block distribution to the next.
    let mut prev_scores: Option<Vec<f32>> = None;
    let mut caches = Vec::new(); // an engine keeps each layer's K/V as its cache
    let mut window = ObservationWindow::new(b, hq, d, &dcfg)?;
    for layer in 0..layers {
        let seed = layer as u64 * 3;
        let q = HostTensor::from_f32(&synth::normal(b * l * hq * d, 1.0, seed), [b, l, hq, d], DType::BF16);
        let k = HostTensor::from_f32(&synth::normal(b * l * hkv * d, 1.0, seed + 1), [b, l, hkv, d], DType::BF16);
        let v = HostTensor::from_f32(&synth::normal(b * l * hkv * d, 1.0, seed + 2), [b, l, hkv, d], DType::BF16);
        let mut out = HostTensor::zeros(DType::BF16, q.shape);
        let mut req = PlanRequest::layer(layer).keep_maps(false);
        if let Some(p) = &prev_scores {
            req = req.with_prev(p);
        }
        let plan = kernels.prefill(q.view(), k.view(), v.view(), &cfg, &req, &mut out.view_mut(), None)?;
        println!(
            "layer {layer}: {} rigid / {} dynamic kv heads, kept {:.2} of the causal pairs",
            plan.rigid_heads(),
            plan.head_class.len() - plan.rigid_heads(),
            plan.blocks.kept_fraction()
        );
        prev_scores = Some(plan.scores);
        if layer == layers - 1 {
            // One layer's window is enough for the example; an engine keeps one per layer.
            window.prefill_end(q.view())?;
        }
        caches.push((k, v));
    }

    // Decode: observe the first `gap` generated queries, compress at step gap + 1. The prompt's
    // BSND K/V serve as the [B, Hkv, L, D] cache through a transposed view (no copy). A real
    // engine also appends each step's K/V to its cache; the example leaves that out.
    let (k, v) = caches.pop().unwrap();
    let mut lengths = vec![l as u32; b * hkv];
    let mut compressed: Option<CompressedCache> = None;
    for step in 1..=20u64 {
        let q = HostTensor::from_f32(&synth::normal(b * hq * d, 1.0, 100 + step), [b, 1, hq, d], DType::BF16);
        let mut out = HostTensor::zeros(DType::BF16, q.shape);
        let (kc, vc) = match &compressed {
            Some(c) => (c.k.view(), c.v.view()),
            None => (k.view().transpose(1, 2)?, v.view().transpose(1, 2)?),
        };
        kernels.decode_attention(q.view(), kc, vc, &lengths, None, &mut out.view_mut())?;
        if window.decode_step(q.view())? == WindowEvent::CompressNow {
            let obs = window.observation(DType::BF16);
            let c = kernels.kv_compress(kc, vc, obs.view(), &dcfg)?;
            println!("step {step}: compressed {} → {} entries per head", lengths[0], c.capacity());
            lengths = c.lengths.clone();
            compressed = Some(c);
        }
    }
    Ok(())
}

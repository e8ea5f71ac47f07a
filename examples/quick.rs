use entropy_kernels::*;
fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().unwrap()).collect();
    let (l, hq, hkv, d) = (args[0], args[1], args[2], args[3]);
    let q = synth::normal(l * hq * d, 1.0, 1);
    let k = synth::normal(l * hkv * d, 1.0, 2);
    let v = synth::normal(l * hkv * d, 1.0, 3);
    let mut out = vec![0f32; q.len()];
    let kern = Kernels::cpu();
    println!("{}", kern.describe());
    for _ in 0..3 {
        let t = std::time::Instant::now();
        kern.dense_prefill(TensorView::new(&q, [1, l, hq, d]), TensorView::new(&k, [1, l, hkv, d]), TensorView::new(&v, [1, l, hkv, d]), None, &mut TensorViewMut::new(&mut out, [1, l, hq, d]), None).unwrap();
        let e = t.elapsed().as_secs_f64();
        let flops = 2.0 * (l as f64).powi(2) * d as f64 * hq as f64;
        println!("dense L={l} Hq={hq} Hkv={hkv} D={d}: {:.1} ms, {:.1} GFLOP/s", e * 1e3, flops / e / 1e9);
    }
}

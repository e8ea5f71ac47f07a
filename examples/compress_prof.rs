use entropy_kernels::*;
fn main() {
    let (n, hq, hkv, d, w) = (32768usize, 8usize, 2usize, 128usize, 32usize);
    let kc = synth::normal(n * hkv * d, 1.0, 1);
    let vc = synth::normal(n * hkv * d, 1.0, 2);
    let obs = synth::normal(hq * w * d, 1.0, 3);
    let kern = Kernels::cpu();
    let cfg = DecodeConfig { decode_budget: 1024, window: w, ..Default::default() };
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let c = kern.kv_compress(TensorView::new(&kc, [1, hkv, n, d]), TensorView::new(&vc, [1, hkv, n, d]), TensorView::new(&obs, [1, hq, w, d]), &cfg).unwrap();
        println!("{:.1} ms {}", t.elapsed().as_secs_f64() * 1e3, c.capacity());
    }
}

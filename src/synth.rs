//! Synthetic inputs: seeded random tensors for tests, and the planted long-context workload of
//! the demo and benchmarks (rigid "sink" heads and dynamic "topic" heads).

use rayon::prelude::*;

/// A small seeded generator (xoshiro256++ seeded by SplitMix64): reproducible across platforms.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng { s: [next(), next(), next(), next()] }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// A fresh seed per test run unless `ENTROPY_KERNELS_SEED` pins it (printed for a replay).
#[cfg(test)]
pub(crate) fn test_seed() -> u64 {
    let s = std::env::var("ENTROPY_KERNELS_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("seed {s} (replay with ENTROPY_KERNELS_SEED={s})");
    s
}

/// `n` normal values with standard deviation `std`, generated in parallel chunks (the result
/// depends only on `seed`, not on the thread count).
pub fn normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
        let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0xA076_1D64_78BD_642F));
        c.iter_mut().for_each(|x| *x = (rng.normal() as f32) * std);
    });
    out
}

/// Shape of a planted workload.
#[derive(Clone, Copy, Debug)]
pub struct PlantedSpec {
    /// Batch size.
    pub batch: usize,
    /// Sequence length, in tokens.
    pub seq_len: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension, in elements.
    pub head_dim: usize,
    /// Block size, in tokens.
    pub block_size: usize,
    /// Segment size, in tokens.
    pub segment_size: usize,
    /// Fraction of kv heads that are sinks (rigid); the rest follow topics (dynamic).
    pub rigid_fraction: f64,
    /// The random seed.
    pub seed: u64,
}

/// BSND q, k, v of a planted workload, f32.
pub struct Planted {
    /// The queries.
    pub q: Vec<f32>,
    /// The keys.
    pub k: Vec<f32>,
    /// The values.
    pub v: Vec<f32>,
    /// Which kv heads were planted as sinks.
    pub rigid: Vec<bool>,
}

/// Signal strengths: matched query·key products of ~100 against noise products of ~1, so the
/// planted structure dominates attention after the 1/sqrt(D) scale.
const NOISE: f32 = 0.3;
const SINK: f32 = 14.0;
const TOPIC: f32 = 10.0;
const TOPICS_PER_HEAD: usize = 64;
/// Fraction of key blocks that carry a topic.
const TOPIC_DENSITY: f64 = 0.25;

fn unit_vectors(count: usize, d: usize, rng: &mut Rng) -> Vec<Vec<f32>> {
    (0..count)
        .map(|_| {
            let v: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| (x / norm) as f32).collect()
        })
        .collect()
}

/// Builds a workload where rigid heads put all attention on block 0 (an attention sink) and
/// dynamic heads attend to the blocks sharing a segment's 1–4 focus topics, so their entropy
/// rises and falls from segment to segment.
pub fn planted(spec: &PlantedSpec) -> Planted {
    let PlantedSpec { batch, seq_len, q_heads, kv_heads, head_dim: d, block_size, segment_size, .. } = *spec;
    let g = q_heads / kv_heads;
    let mut rng = Rng::new(spec.seed);
    let n_rigid = (spec.rigid_fraction * kv_heads as f64).round() as usize;
    let rigid: Vec<bool> = (0..kv_heads).map(|h| h < n_rigid).collect();
    let sinks = unit_vectors(kv_heads, d, &mut rng);
    let topics: Vec<Vec<Vec<f32>>> = (0..kv_heads).map(|_| unit_vectors(TOPICS_PER_HEAD, d, &mut rng)).collect();
    let nblocks = seq_len.div_ceil(block_size);
    let nseg = seq_len.div_ceil(segment_size);
    // Per (b, h): the topic of every key block (or none), and the focus topics of every segment.
    let block_topic: Vec<Vec<Option<usize>>> = (0..batch * kv_heads)
        .map(|_| (0..nblocks).map(|_| (rng.uniform() < TOPIC_DENSITY).then(|| rng.below(TOPICS_PER_HEAD))).collect())
        .collect();
    let focus: Vec<Vec<Vec<usize>>> = (0..batch * kv_heads)
        .map(|_| (0..nseg).map(|_| (0..1 + rng.below(4)).map(|_| rng.below(TOPICS_PER_HEAD)).collect()).collect())
        .collect();

    let mut q = normal(batch * seq_len * q_heads * d, NOISE, spec.seed ^ 1);
    let mut k = normal(batch * seq_len * kv_heads * d, NOISE, spec.seed ^ 2);
    let v = normal(batch * seq_len * kv_heads * d, 1.0, spec.seed ^ 3);

    q.par_chunks_mut(q_heads * d).enumerate().for_each(|(bt, tok)| {
        let (b, t) = (bt / seq_len, bt % seq_len);
        for (hq, row) in tok.chunks_mut(d).enumerate() {
            let h = hq / g;
            if rigid[h] {
                row.iter_mut().zip(&sinks[h]).for_each(|(x, u)| *x += SINK * u);
            } else {
                for &tp in &focus[b * kv_heads + h][t / segment_size] {
                    row.iter_mut().zip(&topics[h][tp]).for_each(|(x, u)| *x += TOPIC * u);
                }
            }
        }
    });
    k.par_chunks_mut(kv_heads * d).enumerate().for_each(|(bt, tok)| {
        let (b, t) = (bt / seq_len, bt % seq_len);
        for (h, row) in tok.chunks_mut(d).enumerate() {
            if rigid[h] {
                if t < block_size {
                    row.iter_mut().zip(&sinks[h]).for_each(|(x, u)| *x += SINK * u);
                }
            } else if let Some(tp) = block_topic[b * kv_heads + h][t / block_size] {
                row.iter_mut().zip(&topics[h][tp]).for_each(|(x, u)| *x += TOPIC * u);
            }
        }
    });
    Planted { q, k, v, rigid }
}

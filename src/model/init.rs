//! Initial parameter values, a pure function of (seed, tensor name): each tensor draws from its
//! own ChaCha8 stream keyed by BLAKE3(seed, name), so adding, removing or moving a tensor never
//! changes another's values. Also the fixed sinusoidal position code.
use crate::model::{Kind, Layout};
use anyhow::{Result, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Standard deviation of the plane embedding (as BERT/ViT initialise learned embeddings).
pub const EMBEDDING_STD: f64 = 0.02;

/// The stream of tensor `name` for `seed`.
pub fn tensor_rng(seed: u64, name: &str) -> ChaCha8Rng {
    let mut h = blake3::Hasher::new();
    h.update(b"mtx-hpc init v1\0");
    h.update(&seed.to_le_bytes());
    h.update(name.as_bytes());
    ChaCha8Rng::from_seed(*h.finalize().as_bytes())
}

/// Uniform in [0, 1) with 53 random bits.
fn unit(rng: &mut impl Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Fills `out` with normal(0, std) values by Box-Muller, two values per pair of draws.
fn fill_normal(rng: &mut impl Rng, std: f64, out: &mut [f32]) {
    for pair in out.chunks_mut(2) {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - unit(rng);
        let u2 = unit(rng);
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        pair[0] = (r * c) as f32;
        if let Some(second) = pair.get_mut(1) {
            *second = (r * s) as f32;
        }
    }
}

fn fill_uniform(rng: &mut impl Rng, bound: f64, out: &mut [f32]) {
    for v in out {
        *v = ((2.0 * unit(rng) - 1.0) * bound) as f32;
    }
}

/// Writes the initial values of every tensor into `buf` (padding set to 0):
/// - convolutions: Kaiming normal for ReLU, std sqrt(2 / fan_in), fan_in = cin k k;
/// - norm gamma 1, beta 0;
/// - linear weights uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PyTorch's `nn.Linear`;
/// - linear biases 0 (PyTorch draws them like the weights; zeros are our choice: nothing
///   depends on them, and a zero bias is easier to read in a checkpoint);
/// - the plane embedding normal(0, 0.02).
pub fn init_into(layout: &Layout, seed: u64, buf: &mut [f32]) -> Result<()> {
    if buf.len() != layout.total() {
        bail!(
            "parameter buffer holds {} values, the {} layout {}",
            buf.len(),
            layout.preset(),
            layout.total()
        );
    }
    buf.fill(0.0);
    for e in layout {
        let out = &mut buf[e.range()];
        let mut rng = tensor_rng(seed, &e.name);
        let fan_in = e.fan_in() as f64;
        match e.kind {
            Kind::Conv => fill_normal(&mut rng, (2.0 / fan_in).sqrt(), out),
            Kind::NormGamma => out.fill(1.0),
            Kind::NormBeta | Kind::LinearBias => out.fill(0.0),
            Kind::LinearWeight => fill_uniform(&mut rng, 1.0 / fan_in.sqrt(), out),
            Kind::Embedding => fill_normal(&mut rng, EMBEDDING_STD, out),
        }
    }
    Ok(())
}

/// A freshly initialised parameter buffer.
pub fn init_params(layout: &Layout, seed: u64) -> Vec<f32> {
    let mut buf = vec![0.0; layout.total()];
    // The buffer is sized from the layout, so the length check cannot fail.
    let _ = init_into(layout, seed, &mut buf);
    buf
}

/// The fixed sinusoidal position code `[t, d]`, row-major: for position p and i < d/2,
/// `pe[p, 2i] = sin(p / base^(2i/d))` and `pe[p, 2i+1] = cos(p / base^(2i/d))`.
pub fn positions(t: usize, d: usize, base: f64) -> Vec<f32> {
    let mut pe = vec![0.0f32; t * d];
    for p in 0..t {
        for j in 0..d {
            let angle = p as f64 / base.powf((2 * (j / 2)) as f64 / d as f64);
            pe[p * d + j] = if j % 2 == 0 { angle.sin() } else { angle.cos() } as f32;
        }
    }
    pe
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, Preset};

    fn stats(v: &[f32]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean, var.sqrt())
    }

    #[test]
    fn same_seed_same_values_other_seed_other_values() {
        let l = Layout::new(&ModelConfig::preset(Preset::Tiny));
        let a = init_params(&l, 7);
        assert_eq!(a, init_params(&l, 7));
        assert_ne!(a, init_params(&l, 8));
        assert!(a.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn a_tensor_does_not_depend_on_the_others() {
        // Two more transformer layers add tensors and move every existing one.
        let tiny = ModelConfig::preset(Preset::Tiny);
        let mut deeper = tiny.clone();
        deeper.layers = 3;
        let (a, b) = (Layout::new(&tiny), Layout::new(&deeper));
        let (pa, pb) = (init_params(&a, 1), init_params(&b, 1));
        for name in ["encoder.stem.conv", "transformer.l1.attn.q.weight"] {
            assert_ne!(a.range(name).unwrap(), b.range(name).unwrap());
            assert_eq!(a.slice(&pa, name).unwrap(), b.slice(&pb, name).unwrap());
        }
    }

    #[test]
    fn distributions_have_the_documented_scale() {
        let l = Layout::new(&ModelConfig::preset(Preset::Paper));
        let p = init_params(&l, 0);
        let conv = l.get("encoder.s4.b2.conv2").unwrap();
        let (m, s) = stats(&p[conv.range()]);
        let want = (2.0 / (128.0 * 9.0f64)).sqrt();
        assert!(
            m.abs() < 0.01 * want * 10.0 && (s / want - 1.0).abs() < 0.01,
            "{m} {s}"
        );
        let lin = l.get("transformer.l1.attn.q.weight").unwrap();
        let vals = &p[lin.range()];
        let bound = 1.0 / 8.0;
        assert!(vals.iter().all(|&v| f64::from(v).abs() <= bound));
        let (_, s) = stats(vals);
        assert!((s / (bound / 3f64.sqrt()) - 1.0).abs() < 0.01, "{s}");
        assert!(
            l.slice(&p, "encoder.stem.norm.gamma")
                .unwrap()
                .iter()
                .all(|&v| v == 1.0)
        );
        assert!(
            l.slice(&p, "encoder.stem.norm.beta")
                .unwrap()
                .iter()
                .all(|&v| v == 0.0)
        );
        assert!(
            l.slice(&p, "encoder.fc.bias")
                .unwrap()
                .iter()
                .all(|&v| v == 0.0)
        );
        let emb = l.slice(&p, "transformer.plane_embedding").unwrap();
        assert!(emb.iter().all(|&v| v.abs() < 0.02 * 6.0) && emb.iter().any(|&v| v != 0.0));
        // Padding stays zero.
        let mut covered = vec![false; l.total()];
        for e in &l {
            covered[e.range()].iter_mut().for_each(|c| *c = true);
        }
        assert!(p.iter().zip(&covered).all(|(&v, &c)| c || v == 0.0));
    }

    #[test]
    fn wrong_buffer_length_is_an_error() {
        let l = Layout::new(&ModelConfig::preset(Preset::Tiny));
        let mut buf = vec![0.0; l.total() - 1];
        assert!(init_into(&l, 0, &mut buf).is_err());
    }

    #[test]
    fn positions_follow_the_transformer_formula() {
        let (t, d) = (5, 8);
        let pe = positions(t, d, 10000.0);
        assert_eq!(pe.len(), t * d);
        assert_eq!(&pe[..d], &[0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        let p = 3.0f64;
        let f = 10000f64.powf(-2.0 / 8.0);
        assert!((f64::from(pe[3 * d + 2]) - (p * f).sin()).abs() < 1e-7);
        assert!((f64::from(pe[3 * d + 3]) - (p * f).cos()).abs() < 1e-7);
        assert!((f64::from(pe[3 * d]) - p.sin()).abs() < 1e-7);
    }
}

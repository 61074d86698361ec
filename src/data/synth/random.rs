//! Random streams for the generator: one ChaCha8 stream per (seed, cohort, subject, purpose),
//! so a subject never depends on another subject, on the thread count, or on how many numbers
//! another purpose drew.
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The stream for one purpose ("demographics", "anatomy", "noise"...) of one subject.
pub fn subject_rng(seed: u64, cohort: &str, index: usize, purpose: &str) -> ChaCha8Rng {
    let mut h = blake3::Hasher::new();
    h.update(b"mtx-hpc synth v1\0");
    h.update(&seed.to_le_bytes());
    h.update(cohort.as_bytes());
    h.update(&[0]);
    h.update(&(index as u64).to_le_bytes());
    h.update(purpose.as_bytes());
    ChaCha8Rng::from_seed(*h.finalize().as_bytes())
}

/// A number in [0, 1) that is the same for every subject of a (seed, cohort, purpose): the
/// offset of a low-discrepancy sequence over subject indices.
pub fn cohort_offset(seed: u64, cohort: &str, purpose: &str) -> f64 {
    let mut rng = subject_rng(seed, cohort, usize::MAX, purpose);
    rng.random::<f64>()
}

/// Uniform in [lo, hi).
pub fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// A random unit vector (uniform on the sphere).
pub fn unit_vector(rng: &mut impl Rng) -> [f64; 3] {
    let z = uniform(rng, -1.0, 1.0);
    let phi = uniform(rng, 0.0, std::f64::consts::TAU);
    let r = (1.0 - z * z).max(0.0).sqrt();
    [r * phi.cos(), r * phi.sin(), z]
}

/// Two independent standard normal draws (Box-Muller) from one 64-bit draw: the noise of a
/// 5-million-voxel volume must stay cheap, and 24-bit uniforms are plenty for image noise.
#[inline]
pub fn normal_pair(rng: &mut impl Rng) -> (f32, f32) {
    let bits = rng.next_u64();
    let u1 = ((bits >> 40) as f32 + 0.5) * (1.0 / (1u64 << 24) as f32);
    let u2 = (((bits >> 8) & 0xff_ffff) as f32) * (1.0 / (1u64 << 24) as f32);
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
    (r * c, r * s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_keyed_on_every_part() {
        let a = subject_rng(1, "healthy", 3, "noise").next_u64();
        assert_eq!(a, subject_rng(1, "healthy", 3, "noise").next_u64());
        assert_ne!(a, subject_rng(2, "healthy", 3, "noise").next_u64());
        assert_ne!(a, subject_rng(1, "clinical", 3, "noise").next_u64());
        assert_ne!(a, subject_rng(1, "healthy", 4, "noise").next_u64());
        assert_ne!(a, subject_rng(1, "healthy", 3, "anatomy").next_u64());
    }

    #[test]
    fn normal_pairs_have_unit_variance() {
        let mut rng = subject_rng(0, "t", 0, "t");
        let n = 100_000;
        let (mut s, mut s2) = (0.0f64, 0.0f64);
        for _ in 0..n {
            let (a, b) = normal_pair(&mut rng);
            s += (a + b) as f64;
            s2 += (a * a + b * b) as f64;
        }
        let mean = s / (2 * n) as f64;
        let var = s2 / (2 * n) as f64 - mean * mean;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.03,
            "{mean} {var}"
        );
    }
}

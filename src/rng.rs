//! Keyed random streams for training: every draw (masks, intensity curves, initialisation)
//! comes from a ChaCha8 stream keyed by what it is for, so nothing depends on the world
//! size, the thread count or how far another stream has run, and resume needs no RNG state.
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The stream for `purpose` at (`seed`, `keys`...), e.g. keys = [epoch, global subject index].
pub fn keyed(seed: u64, keys: &[u64], purpose: &str) -> ChaCha8Rng {
    let mut h = blake3::Hasher::new();
    h.update(b"mtx-hpc train v1\0");
    h.update(&seed.to_le_bytes());
    h.update(&(keys.len() as u64).to_le_bytes());
    for k in keys {
        h.update(&k.to_le_bytes());
    }
    h.update(purpose.as_bytes());
    ChaCha8Rng::from_seed(*h.finalize().as_bytes())
}

/// Unbiased integer in [0, bound) by rejection (our own few lines, so the stream does not
/// change with rand's range sampling between versions).
pub fn below(rng: &mut ChaCha8Rng, bound: u64) -> u64 {
    use rand::Rng;
    assert!(bound > 0, "below(0)");
    let zone = u64::MAX - (u64::MAX - bound + 1) % bound;
    loop {
        let v = rng.next_u64();
        if v <= zone {
            return v % bound;
        }
    }
}

/// Uniform in [0, 1) with 53 random bits.
pub fn unit(rng: &mut ChaCha8Rng) -> f64 {
    use rand::Rng;
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// `k` distinct sorted positions out of `n` (partial Fisher-Yates).
pub fn choose(rng: &mut ChaCha8Rng, n: usize, k: usize) -> Vec<u32> {
    let mut all: Vec<u32> = (0..n as u32).collect();
    for i in 0..k.min(n) {
        let j = i + below(rng, (n - i) as u64) as usize;
        all.swap(i, j);
    }
    let mut out = all[..k.min(n)].to_vec();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_depend_on_every_key_and_choose_is_distinct() {
        let a = choose(&mut keyed(1, &[2, 3], "mask"), 96, 9);
        assert_eq!(a, choose(&mut keyed(1, &[2, 3], "mask"), 96, 9));
        assert_ne!(a, choose(&mut keyed(1, &[2, 4], "mask"), 96, 9));
        assert_ne!(a, choose(&mut keyed(1, &[2, 3], "other"), 96, 9));
        assert_eq!(a.len(), 9);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a[8] < 96);
        let u = unit(&mut keyed(0, &[], "u"));
        assert!((0.0..1.0).contains(&u));
    }
}

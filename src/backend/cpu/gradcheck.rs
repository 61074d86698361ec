//! Finite-difference checking for the CPU ops' backward passes, in f64. An op's test builds
//! a scalar `L = sum(y * r)` with a random `r` (so `dy = r`), runs the op's backward, and
//! compares each analytic gradient with central differences of `L`.
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` values uniform in [-1, 1) from a seeded stream: never zeros, never the same twice.
pub fn random(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// `sum(y * r)`.
pub fn dot(y: &[f64], r: &[f64]) -> f64 {
    y.iter().zip(r).map(|(a, b)| a * b).sum()
}

/// Compares `analytic` with central differences of `loss` with respect to `x`, at up to
/// `max_coords` coordinates spread over `x` (all of them when `x` is small). Panics with the
/// worst coordinate when `|a - n| > tol * max(1, |a|, |n|)`.
pub fn check(
    what: &str,
    x: &mut [f64],
    analytic: &[f64],
    max_coords: usize,
    tol: f64,
    mut loss: impl FnMut(&[f64]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let h = 1e-6;
    let step = x.len().div_ceil(max_coords.max(1)).max(1);
    let mut worst = (0.0f64, 0usize, 0.0, 0.0);
    for i in (0..x.len()).step_by(step) {
        let keep = x[i];
        x[i] = keep + h;
        let up = loss(x);
        x[i] = keep - h;
        let down = loss(x);
        x[i] = keep;
        let numeric = (up - down) / (2.0 * h);
        let a = analytic[i];
        let err = (a - numeric).abs() / 1f64.max(a.abs()).max(numeric.abs());
        if err > worst.0 {
            worst = (err, i, a, numeric);
        }
    }
    assert!(
        worst.0 <= tol,
        "{what}: gradient mismatch at {}: analytic {} vs numeric {} (relative error {:.3e})",
        worst.1,
        worst.2,
        worst.3,
        worst.0
    );
}

//! The optimizer's ops over the flat parameter buffer: Adam/AdamW (as torch.optim.AdamW,
//! weight decay 0 giving torch.optim.Adam), the sum of squares behind the global gradient
//! norm, and scaling (gradient clipping). Elementwise work is split into fixed chunks;
//! the one reduction sums each chunk in f64 and then the chunk sums in chunk order, so the
//! result does not depend on the thread count.
use super::Real;
use crate::backend::Adam;
use rayon::prelude::*;

/// Values per rayon task; also the fixed reduction chunk of [`sum_squares`] (changing it
/// changes the last bits of the gradient norm, so it is part of the determinism promise).
const CHUNK: usize = 1 << 14;

/// One Adam step, torch's formula and order of operations:
/// `p -= lr wd p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
/// p -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
pub fn adam<T: Real>(h: &Adam, params: &mut [T], grads: &[T], m: &mut [T], v: &mut [T]) {
    let len = params.len();
    assert!(
        grads.len() == len && m.len() == len && v.len() == len,
        "adam: params {len}, grads {}, m {}, v {}",
        grads.len(),
        m.len(),
        v.len()
    );
    assert!(h.step >= 1, "adam: step counts from 1");
    let t = h.step.min(i32::MAX as u64) as i32;
    // Bias corrections in f64 like torch (Python floats), rounded once.
    let bc1 = 1.0 - (h.beta1 as f64).powi(t);
    let bc2 = 1.0 - (h.beta2 as f64).powi(t);
    let step_size = T::from_f64(h.lr as f64 / bc1).unwrap_or_else(T::nan);
    let bc2_sqrt = T::from_f64(bc2.sqrt()).unwrap_or_else(T::nan);
    let decay = T::one() - T::of(h.lr) * T::of(h.weight_decay);
    let (b1, b2, eps) = (T::of(h.beta1), T::of(h.beta2), T::of(h.eps));
    let (c1, c2) = (T::one() - b1, T::one() - b2);
    let use_decay = h.weight_decay != 0.0;
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                if use_decay {
                    p[i] *= decay;
                }
                m[i] = b1 * m[i] + c1 * g[i];
                v[i] = b2 * v[i] + c2 * g[i] * g[i];
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                // addcdiv order: step_size * (m / denom).
                p[i] -= step_size * (m[i] / denom);
            }
        });
}

/// `sum(x^2)` in f64: each [`CHUNK`] summed in order, then the chunk sums in order.
pub fn sum_squares<T: Real>(x: &[T]) -> f64 {
    let partial: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| {
            c.iter()
                .map(|v| v.to_f64().unwrap_or(f64::NAN).powi(2))
                .sum::<f64>()
        })
        .collect();
    partial.iter().sum()
}

/// `x *= alpha`.
pub fn scale<T: Real>(alpha: f32, x: &mut [T]) {
    let alpha = T::of(alpha);
    x.par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= alpha));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::gradcheck::random;

    /// Hyperparameters exact in f32 (they arrive as f32), so the f64 run follows the hand
    /// computation to rounding: lr 1/8, betas (7/8, 1 - 1/1024), eps 1e-8.
    fn two_steps(weight_decay: f32) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut h = Adam {
            lr: 0.125,
            beta1: 0.875,
            beta2: 1.0 - 1.0 / 1024.0,
            eps: 1e-8,
            weight_decay,
            step: 1,
        };
        let (mut p, mut m, mut v) = (vec![1.0, -2.0], vec![0.0; 2], vec![0.0; 2]);
        adam(&h, &mut p, &[0.5, -1.0], &mut m, &mut v);
        h.step = 2;
        adam(&h, &mut p, &[-0.25, 2.0], &mut m, &mut v);
        (p, m, v)
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        for (x, y) in got.iter().zip(want) {
            assert!((x - y).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }

    /// torch.optim.Adam: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
    /// p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    /// p0 = (1, -2), g1 = (0.5, -1), g2 = (-0.25, 2).
    /// Step 1: m1 = g1 / 8 = (0.0625, -0.125); v1 = g1^2 / 1024 = (0.000244140625, 0.0009765625);
    ///   mhat = m1 / (1/8) = (0.5, -1); sqrt(vhat) = sqrt(v1 / (1/1024)) = (0.5, 1);
    ///   update = (1/8) mhat / (sqrt(vhat) + 1e-8) = (0.1249999975, -0.12499999875);
    ///   p1 = (0.8750000025, -1.87500000125).
    /// Step 2: m2 = 7/8 m1 + g2 / 8 = (0.0234375, 0.140625);
    ///   v2 = 1023/1024 v1 + g2^2 / 1024 = (0.000304937362671, 0.004881858825684);
    ///   bias corrections 1 - (7/8)^2 = 0.234375, 1 - (1023/1024)^2 = 0.001952171325684;
    ///   mhat = (0.1, 0.6); sqrt(vhat) = (0.395226771955, 1.581370538387);
    ///   update = (0.031627411326, 0.047427214372); p2 = (0.843372591174, -1.922427215622).
    #[test]
    fn adam_matches_two_hand_computed_steps() {
        let (p, m, v) = two_steps(0.0);
        assert_close(&m, &[0.0234375, 0.140625]);
        assert_close(&v, &[0.000304937362671, 0.004881858825684]);
        assert_close(&p, &[0.843372591174, -1.922427215622]);
    }

    /// torch.optim.AdamW (decay 1/8): each step first multiplies p by 1 - lr wd = 63/64,
    /// then applies the same update (m and v never see the decay):
    /// p1 = 63/64 p0 - update1 = (0.8593750025, -1.84375000125);
    /// p2 = 63/64 p1 - update2 = (0.814319856760, -1.862368621853).
    #[test]
    fn adamw_decays_before_the_update() {
        let (p, m, v) = two_steps(0.125);
        assert_close(&m, &[0.0234375, 0.140625]);
        assert_close(&v, &[0.000304937362671, 0.004881858825684]);
        assert_close(&p, &[0.814319856760, -1.862368621853]);
    }

    #[test]
    fn adam_f32_agrees_with_f64() {
        let h = Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step: 3,
        };
        let n = 3 * CHUNK + 5;
        let (mut p, g, mut m) = (random(n, 1), random(n, 2), random(n, 3));
        let mut v: Vec<f64> = random(n, 4).iter().map(|x| x * x).collect();
        let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
        let (mut p32, g32, mut m32, mut v32) = (f(&p), f(&g), f(&m), f(&v));
        adam(&h, &mut p, &g, &mut m, &mut v);
        adam(&h, &mut p32, &g32, &mut m32, &mut v32);
        for (x, y) in p32.iter().zip(&p) {
            assert!((*x as f64 - y).abs() < 1e-6, "{x} vs {y}");
        }
    }

    #[test]
    fn sum_squares_is_the_same_with_1_and_2_threads() {
        let x: Vec<f32> = random(5 * CHUNK + 123, 9)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| sum_squares(&x))
        };
        let one = run(1);
        assert_eq!(one.to_bits(), run(2).to_bits());
        let plain: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        assert!((one - plain).abs() < 1e-9 * plain);
        let mut y = x.clone();
        scale(0.5, &mut y);
        assert!(y.iter().zip(&x).all(|(a, b)| *a == 0.5 * b));
    }
}

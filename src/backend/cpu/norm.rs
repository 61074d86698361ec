//! Normalisation on the CPU backend: instance norm over each (sample, channel) plane, with an
//! optional fused ReLU, and layer norm over the last dimension. Both use the biased variance
//! and `rstd = 1 / sqrt(var + eps)` (as PyTorch), sum in f64, and reduce parameter gradients
//! over fixed groups in a fixed order so results do not depend on the thread count.
// The argument lists mirror the Backend trait's, which fixes them.
#![allow(clippy::too_many_arguments)]
use super::Real;
use rayon::prelude::*;

/// Rows per partial sum of the layer-norm parameter gradients; fixed so the order is too.
const ROWS_PER_PARTIAL: usize = 64;

fn f64_of<T: Real>(x: T) -> f64 {
    x.to_f64().unwrap_or(f64::NAN)
}

fn real<T: Real>(x: f64) -> T {
    T::from_f64(x).unwrap_or_else(T::nan)
}

/// Number of partial sums in [`lane_sums`]: one 512-bit register of f64, and independent
/// additions instead of one chain waiting on each add's latency (4x faster here).
const LANES: usize = 8;

/// `(sum f(a_i, b_i).0, sum f(a_i, b_i).1)` in f64, over `LANES` interleaved partial sums
/// combined in a fixed order, then the tail: the same order on every run and thread count.
#[inline(always)]
fn lane_sums<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> (f64, f64)) -> (f64, f64) {
    let (mut s0, mut s1) = ([0.0f64; LANES], [0.0f64; LANES]);
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (a, b) in ca.zip(cb) {
        for l in 0..LANES {
            let (u, v) = f(a[l], b[l]);
            s0[l] += u;
            s1[l] += v;
        }
    }
    let fold = |s: [f64; LANES]| ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
    let (mut t0, mut t1) = (fold(s0), fold(s1));
    for (&a, &b) in ta.iter().zip(tb) {
        let (u, v) = f(a, b);
        t0 += u;
        t1 += v;
    }
    (t0, t1)
}

/// Mean and `1 / sqrt(var + eps)` of `x` by two passes in f64 (no cancellation from a
/// large mean, unlike sum-of-squares minus squared sum).
fn moments<T: Real>(x: &[T], eps: f64) -> (f64, f64) {
    let len = x.len() as f64;
    let mean = lane_sums(x, x, |v, _| (f64_of(v), 0.0)).0 / len;
    let var = lane_sums(x, x, |v, _| {
        let d = f64_of(v) - mean;
        (d * d, 0.0)
    })
    .0 / len;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `y = gamma * (x - mean) * rstd + beta` over one plane or row, optionally through a ReLU.
fn normalise<T: Real>(x: &[T], mean: T, rstd: T, gamma: T, beta: T, relu: bool, y: &mut [T]) {
    let scale = gamma * rstd;
    let shift = beta - mean * scale;
    if relu {
        for (y, &x) in y.iter_mut().zip(x) {
            let v = x * scale + shift;
            *y = if v > T::zero() { v } else { T::zero() };
        }
    } else {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * scale + shift;
        }
    }
}

pub fn instance_forward<T: Real>(
    n: usize,
    c: usize,
    hw: usize,
    eps: f32,
    relu: bool,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    y: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
) {
    assert_eq!(x.len(), n * c * hw, "instance_forward: x length");
    assert_eq!(y.len(), n * c * hw, "instance_forward: y length");
    assert_eq!(gamma.len(), c, "instance_forward: gamma length");
    assert_eq!(beta.len(), c, "instance_forward: beta length");
    assert_eq!(mean.len(), n * c, "instance_forward: mean length");
    assert_eq!(rstd.len(), n * c, "instance_forward: rstd length");
    if hw == 0 {
        return;
    }
    y.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .enumerate()
        .for_each(|(plane, ((y, x), (mean, rstd)))| {
            let ch = plane % c;
            instance_plane(eps, relu, x, gamma[ch], beta[ch], y, mean, rstd);
        });
}

/// Instance norm of one image's `c` planes (`x`, `y` of `c * hw`; `mean`, `rstd` of `c`),
/// on this thread: for a caller that already runs one image per task (the fused
/// convolution + norm, `conv::forward`).
pub fn instance_forward_image<T: Real>(
    eps: f32,
    relu: bool,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    y: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
) {
    let c = gamma.len();
    assert!(beta.len() == c && mean.len() == c && rstd.len() == c && x.len() == y.len());
    if c == 0 || x.is_empty() {
        return;
    }
    let hw = x.len() / c;
    for (ch, (y, x)) in y.chunks_exact_mut(hw).zip(x.chunks_exact(hw)).enumerate() {
        instance_plane(
            eps,
            relu,
            x,
            gamma[ch],
            beta[ch],
            y,
            &mut mean[ch],
            &mut rstd[ch],
        );
    }
}

/// One plane of instance norm: its moments, then `y`.
#[inline(always)]
fn instance_plane<T: Real>(
    eps: f32,
    relu: bool,
    x: &[T],
    gamma: T,
    beta: T,
    y: &mut [T],
    mean: &mut T,
    rstd: &mut T,
) {
    let (m, r) = moments(x, f64::from(eps));
    *mean = real(m);
    *rstd = real(r);
    normalise(x, *mean, *rstd, gamma, beta, relu, y);
}

pub fn instance_backward<T: Real>(
    n: usize,
    c: usize,
    hw: usize,
    relu: bool,
    x: &[T],
    y: &[T],
    gamma: &[T],
    mean: &[T],
    rstd: &[T],
    dy: &[T],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    let len = n * c * hw;
    assert_eq!(x.len(), len, "instance_backward: x length");
    assert_eq!(y.len(), len, "instance_backward: y length");
    assert_eq!(dy.len(), len, "instance_backward: dy length");
    assert_eq!(dx.len(), len, "instance_backward: dx length");
    assert_eq!(gamma.len(), c, "instance_backward: gamma length");
    assert_eq!(dgamma.len(), c, "instance_backward: dgamma length");
    assert_eq!(dbeta.len(), c, "instance_backward: dbeta length");
    assert_eq!(mean.len(), n * c, "instance_backward: mean length");
    assert_eq!(rstd.len(), n * c, "instance_backward: rstd length");
    if hw == 0 {
        return;
    }
    // Per plane: (sum g, sum g * xhat), kept in plane order for the parameter gradients.
    let sums: Vec<(f64, f64)> = dx
        .par_chunks_mut(hw)
        .zip(x.par_chunks(hw).zip(y.par_chunks(hw)))
        .zip(dy.par_chunks(hw))
        .enumerate()
        .map(|(plane, ((dx, (x, y)), dy))| {
            let (m, r) = (mean[plane], rstd[plane]);
            // dx first holds the gradient reaching the norm's output (masked by the ReLU).
            if relu {
                for ((g, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
                    *g = if y > T::zero() { dy } else { T::zero() };
                }
            } else {
                dx.copy_from_slice(dy);
            }
            let (sg, sgx) = lane_sums(dx, x, |g, x| {
                let g = f64_of(g);
                (g, g * f64_of((x - m) * r))
            });
            let inv = 1.0 / hw as f64;
            let (mg, mgx) = (real::<T>(sg * inv), real::<T>(sgx * inv));
            let scale = gamma[plane % c] * r;
            for (g, &x) in dx.iter_mut().zip(x) {
                let xhat = (x - m) * r;
                *g = scale * (*g - mg - xhat * mgx);
            }
            (sg, sgx)
        })
        .collect();
    for ch in 0..c {
        let (mut sg, mut sgx) = (0.0f64, 0.0f64);
        for s in 0..n {
            let (a, b) = sums[s * c + ch];
            sg += a;
            sgx += b;
        }
        dbeta[ch] += real::<T>(sg);
        dgamma[ch] += real::<T>(sgx);
    }
}

pub fn layer_forward<T: Real>(
    rows: usize,
    d: usize,
    eps: f32,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    y: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
) {
    assert_eq!(x.len(), rows * d, "layer_forward: x length");
    assert_eq!(y.len(), rows * d, "layer_forward: y length");
    assert_eq!(gamma.len(), d, "layer_forward: gamma length");
    assert_eq!(beta.len(), d, "layer_forward: beta length");
    assert_eq!(mean.len(), rows, "layer_forward: mean length");
    assert_eq!(rstd.len(), rows, "layer_forward: rstd length");
    if d == 0 {
        return;
    }
    let eps = f64::from(eps);
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((y, x), (mean, rstd))| {
            let (m, r) = moments(x, eps);
            *mean = real(m);
            *rstd = real(r);
            let scale_shift = |x: T, g: T, b: T| (x - *mean) * *rstd * g + b;
            for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
                *y = scale_shift(x, g, b);
            }
        });
}

pub fn layer_backward<T: Real>(
    rows: usize,
    d: usize,
    x: &[T],
    gamma: &[T],
    mean: &[T],
    rstd: &[T],
    dy: &[T],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    assert_eq!(x.len(), rows * d, "layer_backward: x length");
    assert_eq!(dy.len(), rows * d, "layer_backward: dy length");
    assert_eq!(dx.len(), rows * d, "layer_backward: dx length");
    assert_eq!(gamma.len(), d, "layer_backward: gamma length");
    assert_eq!(dgamma.len(), d, "layer_backward: dgamma length");
    assert_eq!(dbeta.len(), d, "layer_backward: dbeta length");
    assert_eq!(mean.len(), rows, "layer_backward: mean length");
    assert_eq!(rstd.len(), rows, "layer_backward: rstd length");
    if d == 0 {
        return;
    }
    let block = ROWS_PER_PARTIAL * d;
    // Per block of rows: partial (dgamma, dbeta) in f64, combined below in block order.
    let partials: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(dy.par_chunks(block)))
        .enumerate()
        .map(|(b, (dx, (x, dy)))| {
            let mut pg = vec![0.0f64; d];
            let mut pb = vec![0.0f64; d];
            for (i, ((dx, x), dy)) in dx
                .chunks_exact_mut(d)
                .zip(x.chunks_exact(d))
                .zip(dy.chunks_exact(d))
                .enumerate()
            {
                let row = b * ROWS_PER_PARTIAL + i;
                let (m, r) = (mean[row], rstd[row]);
                // g = dy * gamma is the gradient with respect to xhat.
                let (mut sg, mut sgx) = (0.0f64, 0.0f64);
                for j in 0..d {
                    let xhat = (x[j] - m) * r;
                    let g = f64_of(dy[j] * gamma[j]);
                    sg += g;
                    sgx += g * f64_of(xhat);
                    pg[j] += f64_of(dy[j] * xhat);
                    pb[j] += f64_of(dy[j]);
                }
                let inv = 1.0 / d as f64;
                let (mg, mgx) = (real::<T>(sg * inv), real::<T>(sgx * inv));
                for j in 0..d {
                    let xhat = (x[j] - m) * r;
                    dx[j] = r * (dy[j] * gamma[j] - mg - xhat * mgx);
                }
            }
            (pg, pb)
        })
        .collect();
    for j in 0..d {
        let (mut g, mut b) = (0.0f64, 0.0f64);
        for (pg, pb) in &partials {
            g += pg[j];
            b += pb[j];
        }
        dgamma[j] += real::<T>(g);
        dbeta[j] += real::<T>(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::gradcheck::{check, dot, random};

    fn minus(a: &[f64], b: &[f64]) -> Vec<f64> {
        a.iter().zip(b).map(|(a, b)| a - b).collect()
    }

    fn instance_case(n: usize, c: usize, hw: usize, relu: bool, seed: u64) {
        let eps = 1e-5;
        let mut x = random(n * c * hw, seed);
        // Offset and spread the planes so the mean and variance matter.
        for (i, v) in x.iter_mut().enumerate() {
            *v = *v * (1.0 + (i / hw) as f64) + 0.5;
        }
        let mut gamma = random(c, seed + 1);
        let mut beta = random(c, seed + 2);
        let r = random(n * c * hw, seed + 3);
        let fwd = |x: &[f64], gamma: &[f64], beta: &[f64]| {
            let mut y = vec![0.0; n * c * hw];
            let (mut m, mut s) = (vec![0.0; n * c], vec![0.0; n * c]);
            instance_forward(n, c, hw, eps, relu, x, gamma, beta, &mut y, &mut m, &mut s);
            (y, m, s)
        };
        let (y, m, s) = fwd(&x, &gamma, &beta);
        // Biased variance: each normalised plane has mean 0 and variance ~1 before affine.
        for p in 0..n * c {
            let plane = &x[p * hw..(p + 1) * hw];
            let mu = plane.iter().sum::<f64>() / hw as f64;
            let var = plane.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / hw as f64;
            assert!((m[p] - mu).abs() < 1e-12);
            assert!((s[p] - 1.0 / (var + f64::from(eps)).sqrt()).abs() < 1e-9);
        }
        let dg0 = random(c, seed + 4);
        let db0 = random(c, seed + 5);
        let (mut dg, mut db) = (dg0.clone(), db0.clone());
        let mut dx = vec![9.0; x.len()];
        instance_backward(
            n, c, hw, relu, &x, &y, &gamma, &m, &s, &r, &mut dx, &mut dg, &mut db,
        );
        let (g1, b1) = (gamma.clone(), beta.clone());
        check("instance dx", &mut x, &dx, 300, 1e-5, |x| {
            dot(&fwd(x, &g1, &b1).0, &r)
        });
        let (x1, b1) = (x.clone(), beta.clone());
        check(
            "instance dgamma",
            &mut gamma,
            &minus(&dg, &dg0),
            100,
            1e-5,
            |g| dot(&fwd(&x1, g, &b1).0, &r),
        );
        let g1 = gamma.clone();
        check(
            "instance dbeta",
            &mut beta,
            &minus(&db, &db0),
            100,
            1e-5,
            |b| dot(&fwd(&x1, &g1, b).0, &r),
        );
    }

    #[test]
    fn instance_norm_matches_finite_differences() {
        instance_case(2, 3, 13 * 11, false, 100);
        instance_case(3, 2, 2 * 2, false, 110);
        instance_case(2, 3, 7 * 5, true, 120);
        instance_case(1, 4, 4, true, 130);
    }

    #[test]
    fn layer_norm_matches_finite_differences() {
        for (rows, d, seed) in [(3, 8, 200), (130, 5, 210), (1, 64, 220)] {
            let mut x = random(rows * d, seed);
            let mut gamma = random(d, seed + 1);
            let mut beta = random(d, seed + 2);
            let r = random(rows * d, seed + 3);
            let fwd = |x: &[f64], gamma: &[f64], beta: &[f64]| {
                let mut y = vec![0.0; rows * d];
                let (mut m, mut s) = (vec![0.0; rows], vec![0.0; rows]);
                layer_forward(rows, d, 1e-5, x, gamma, beta, &mut y, &mut m, &mut s);
                (y, m, s)
            };
            let (_, m, s) = fwd(&x, &gamma, &beta);
            let dg0 = random(d, seed + 4);
            let db0 = random(d, seed + 5);
            let (mut dg, mut db) = (dg0.clone(), db0.clone());
            let mut dx = vec![9.0; x.len()];
            layer_backward(rows, d, &x, &gamma, &m, &s, &r, &mut dx, &mut dg, &mut db);
            let (g1, b1) = (gamma.clone(), beta.clone());
            check("layer dx", &mut x, &dx, 300, 1e-5, |x| {
                dot(&fwd(x, &g1, &b1).0, &r)
            });
            let x1 = x.clone();
            check(
                "layer dgamma",
                &mut gamma,
                &minus(&dg, &dg0),
                100,
                1e-5,
                |g| dot(&fwd(&x1, g, &b1).0, &r),
            );
            let g1 = gamma.clone();
            check(
                "layer dbeta",
                &mut beta,
                &minus(&db, &db0),
                100,
                1e-5,
                |b| dot(&fwd(&x1, &g1, b).0, &r),
            );
        }
    }

    #[test]
    fn f32_matches_f64_and_thread_count_does_not_matter() {
        let (n, c, hw) = (5, 4, 29 * 23);
        let x64: Vec<f64> = random(n * c * hw, 300)
            .iter()
            .map(|v| v * 3.0 + 1.0)
            .collect();
        let g64 = random(c, 301);
        let b64 = random(c, 302);
        let dy64 = random(n * c * hw, 303);
        let to32 = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let (x32, g32, b32, dy32) = (to32(&x64), to32(&g64), to32(&b64), to32(&dy64));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut y = vec![0.0f32; x32.len()];
                let (mut m, mut s) = (vec![0.0f32; n * c], vec![0.0f32; n * c]);
                instance_forward(
                    n, c, hw, 1e-5, true, &x32, &g32, &b32, &mut y, &mut m, &mut s,
                );
                let mut dx = vec![0.0f32; x32.len()];
                let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
                instance_backward(
                    n, c, hw, true, &x32, &y, &g32, &m, &s, &dy32, &mut dx, &mut dg, &mut db,
                );
                (y, dx, dg, db)
            })
        };
        let one = run(1);
        assert_eq!(one, run(2));
        let mut y = vec![0.0; x64.len()];
        let (mut m, mut s) = (vec![0.0; n * c], vec![0.0; n * c]);
        instance_forward(
            n, c, hw, 1e-5, true, &x64, &g64, &b64, &mut y, &mut m, &mut s,
        );
        let mut dx = vec![0.0; x64.len()];
        let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
        instance_backward(
            n, c, hw, true, &x64, &y, &g64, &m, &s, &dy64, &mut dx, &mut dg, &mut db,
        );
        let close = |a: &[f32], b: &[f64], what: &str| {
            let num: f64 = a
                .iter()
                .zip(b)
                .map(|(&a, b)| (f64::from(a) - b).powi(2))
                .sum();
            let den: f64 = b.iter().map(|b| b * b).sum();
            assert!(
                (num / den).sqrt() < 1e-5,
                "{what}: f32 vs f64 {}",
                (num / den).sqrt()
            );
        };
        close(&one.0, &y, "y");
        close(&one.1, &dx, "dx");
        close(&one.2, &dg, "dgamma");
        close(&one.3, &db, "dbeta");
    }

    #[test]
    fn layer_norm_f32_matches_f64_and_thread_count_does_not_matter() {
        let (rows, d) = (300, 64);
        let x64: Vec<f64> = random(rows * d, 400)
            .iter()
            .map(|v| v * 2.0 - 0.3)
            .collect();
        let (g64, b64, dy64) = (random(d, 401), random(d, 402), random(rows * d, 403));
        let to32 = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let (x32, g32, b32, dy32) = (to32(&x64), to32(&g64), to32(&b64), to32(&dy64));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut y = vec![0.0f32; rows * d];
                let (mut m, mut s) = (vec![0.0f32; rows], vec![0.0f32; rows]);
                layer_forward(rows, d, 1e-5, &x32, &g32, &b32, &mut y, &mut m, &mut s);
                let mut dx = vec![0.0f32; rows * d];
                let (mut dg, mut db) = (vec![0.0f32; d], vec![0.0f32; d]);
                layer_backward(
                    rows, d, &x32, &g32, &m, &s, &dy32, &mut dx, &mut dg, &mut db,
                );
                (y, dx, dg, db)
            })
        };
        let one = run(1);
        assert_eq!(one, run(2));
        let mut y = vec![0.0; rows * d];
        let (mut m, mut s) = (vec![0.0; rows], vec![0.0; rows]);
        layer_forward(rows, d, 1e-5, &x64, &g64, &b64, &mut y, &mut m, &mut s);
        let mut dx = vec![0.0; rows * d];
        let (mut dg, mut db) = (vec![0.0; d], vec![0.0; d]);
        layer_backward(
            rows, d, &x64, &g64, &m, &s, &dy64, &mut dx, &mut dg, &mut db,
        );
        for (what, a, b) in [
            ("y", &one.0, &y),
            ("dx", &one.1, &dx),
            ("dgamma", &one.2, &dg),
            ("dbeta", &one.3, &db),
        ] {
            let num: f64 = a
                .iter()
                .zip(b.iter())
                .map(|(&a, b)| (f64::from(a) - b).powi(2))
                .sum();
            let den: f64 = b.iter().map(|b| b * b).sum();
            assert!(
                (num / den).sqrt() < 1e-5,
                "{what}: f32 vs f64 {}",
                (num / den).sqrt()
            );
        }
    }
}

//! Multi-head attention without a mask, forward and backward, on `q, k, v [b, t, heads * dh]`.
//! One rayon task per (batch, head) runs its matrix products through the packed GEMM kernel;
//! each task owns its probabilities block and returns its head's columns, which are then
//! copied into place, so no two tasks write the same memory and no sum crosses tasks.
use super::Real;
use super::gemm::{Operand, gemm_serial};
use crate::backend::Attention;
use rayon::prelude::*;

/// The `[t, dh]` block of head `h` of batch entry `bi` in a `[b, t, heads * dh]` tensor.
fn head<'a, T>(s: &Attention, x: &'a [T], bi: usize, h: usize, trans: bool) -> Operand<'a, T> {
    Operand {
        data: x,
        offset: bi * s.t * s.heads * s.dh + h * s.dh,
        ld: s.heads * s.dh,
        trans,
    }
}

/// A dense `rows x cols` matrix at the start of `x`.
fn dense<T>(x: &[T], cols: usize, trans: bool) -> Operand<'_, T> {
    Operand {
        data: x,
        offset: 0,
        ld: cols,
        trans,
    }
}

/// Copies per-(batch, head) `[t, dh]` blocks into their columns of `[b, t, heads * dh]`.
fn scatter_heads<T: Real, B: AsRef<[T]> + Sync>(s: &Attention, blocks: &[B], x: &mut [T]) {
    let hd = s.heads * s.dh;
    x[..s.b * s.t * hd]
        .par_chunks_mut(s.t * hd)
        .zip(blocks.par_chunks(s.heads))
        .for_each(|(xb, heads)| {
            for (h, blk) in heads.iter().enumerate() {
                for (row, src) in xb.chunks_exact_mut(hd).zip(blk.as_ref().chunks_exact(s.dh)) {
                    row[h * s.dh..(h + 1) * s.dh].copy_from_slice(src);
                }
            }
        });
}

fn check_sizes<T>(s: &Attention, tensors: &[&[T]], probs: usize) {
    let len = s.b * s.t * s.heads * s.dh;
    assert!(
        tensors.iter().all(|x| x.len() >= len) && probs >= s.b * s.heads * s.t * s.t,
        "attention: buffers too small for {s:?}"
    );
}

/// `probs = softmax(q k^T scale)` per row (max subtracted), `out = probs v`.
pub fn forward<T: Real>(s: &Attention, q: &[T], k: &[T], v: &[T], probs: &mut [T], out: &mut [T]) {
    check_sizes(s, &[q, k, v, out], probs.len());
    if s.b * s.t * s.heads == 0 {
        return;
    }
    let (t, dh) = (s.t, s.dh);
    let blocks: Vec<Vec<T>> = probs[..s.b * s.heads * t * t]
        .par_chunks_mut(t * t)
        .enumerate()
        .map(|(task, p)| {
            let (bi, h) = (task / s.heads, task % s.heads);
            let (qh, kh, vh) = (
                head(s, q, bi, h, false),
                head(s, k, bi, h, true),
                head(s, v, bi, h, false),
            );
            gemm_serial(t, t, dh, T::of(s.scale), &qh, &kh, T::zero(), p, t);
            for row in p.chunks_exact_mut(t) {
                softmax_row(row);
            }
            let mut o = vec![T::zero(); t * dh];
            gemm_serial(
                t,
                dh,
                t,
                T::one(),
                &dense(p, t, false),
                &vh,
                T::zero(),
                &mut o,
                dh,
            );
            o
        })
        .collect();
    scatter_heads(s, &blocks, out);
}

fn softmax_row<T: Real>(row: &mut [T]) {
    let max = row.iter().copied().fold(T::neg_infinity(), T::max);
    let mut sum = T::zero();
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = T::one() / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// With `S = q k^T scale`, `P = softmax(S)`, `out = P v`:
/// `dv = P^T dout`, `dP = dout v^T`, `dS = P (dP - rowsum(dP P))`, `dq = dS k scale`,
/// `dk = dS^T q scale`. Overwrites `dq, dk, dv`.
pub fn backward<T: Real>(
    s: &Attention,
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    dout: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    check_sizes(s, &[q, k, v, dout, dq, dk, dv], probs.len());
    if s.b * s.t * s.heads == 0 {
        return;
    }
    let (t, dh) = (s.t, s.dh);
    let grads: Vec<[Vec<T>; 3]> = probs[..s.b * s.heads * t * t]
        .par_chunks(t * t)
        .enumerate()
        .map(|(task, p)| {
            let (bi, h) = (task / s.heads, task % s.heads);
            let doh = head(s, dout, bi, h, false);
            let mut ds = vec![T::zero(); t * t];
            gemm_serial(
                t,
                t,
                dh,
                T::one(),
                &doh,
                &head(s, v, bi, h, true),
                T::zero(),
                &mut ds,
                t,
            );
            let scale = T::of(s.scale);
            for (dsr, pr) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                let dot: T = dsr.iter().zip(pr).map(|(&a, &b)| a * b).sum();
                for (d, &pv) in dsr.iter_mut().zip(pr) {
                    *d = pv * (*d - dot) * scale;
                }
            }
            let mut g = [
                vec![T::zero(); t * dh],
                vec![T::zero(); t * dh],
                vec![T::zero(); t * dh],
            ];
            let (one, zero) = (T::one(), T::zero());
            let kh = head(s, k, bi, h, false);
            gemm_serial(
                t,
                dh,
                t,
                one,
                &dense(&ds, t, false),
                &kh,
                zero,
                &mut g[0],
                dh,
            );
            let qh = head(s, q, bi, h, false);
            gemm_serial(
                t,
                dh,
                t,
                one,
                &dense(&ds, t, true),
                &qh,
                zero,
                &mut g[1],
                dh,
            );
            gemm_serial(t, dh, t, one, &dense(p, t, true), &doh, zero, &mut g[2], dh);
            g
        })
        .collect();
    for (which, dx) in [dq, dk, dv].into_iter().enumerate() {
        let blocks: Vec<&[T]> = grads.iter().map(|g| &g[which][..]).collect();
        scatter_heads(s, &blocks, dx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::gradcheck::{check, dot, random};

    fn shape(b: usize, t: usize, heads: usize, dh: usize) -> Attention {
        Attention {
            b,
            t,
            heads,
            dh,
            scale: 1.0 / (dh as f32).sqrt(),
        }
    }

    fn run<T: Real>(s: &Attention, q: &[T], k: &[T], v: &[T]) -> (Vec<T>, Vec<T>) {
        let mut probs = vec![T::nan(); s.b * s.heads * s.t * s.t];
        let mut out = vec![T::nan(); q.len()];
        forward(s, q, k, v, &mut probs, &mut out);
        (probs, out)
    }

    /// The obviously correct loops, for the forward pass.
    fn naive(s: &Attention, q: &[f64], k: &[f64], v: &[f64]) -> Vec<f64> {
        let hd = s.heads * s.dh;
        let mut out = vec![0.0; q.len()];
        for bi in 0..s.b {
            for h in 0..s.heads {
                for i in 0..s.t {
                    let at = |x: &[f64], r: usize, c: usize| x[(bi * s.t + r) * hd + h * s.dh + c];
                    let sc: Vec<f64> = (0..s.t)
                        .map(|j| {
                            (0..s.dh).map(|c| at(q, i, c) * at(k, j, c)).sum::<f64>()
                                * s.scale as f64
                        })
                        .collect();
                    let e: Vec<f64> = sc.iter().map(|x| x.exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..s.dh {
                        out[(bi * s.t + i) * hd + h * s.dh + c] =
                            (0..s.t).map(|j| e[j] / z * at(v, j, c)).sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_the_definition() {
        let s = shape(2, 5, 3, 4);
        let n = s.b * s.t * s.heads * s.dh;
        let (q, k, v) = (random(n, 1), random(n, 2), random(n, 3));
        let (probs, out) = run(&s, &q, &k, &v);
        let want = naive(&s, &q, &k, &v);
        for (x, y) in out.iter().zip(&want) {
            assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        }
        for row in probs.chunks(s.t) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        for &(b, t, heads, dh) in &[(1, 1, 1, 3), (2, 3, 2, 5), (1, 7, 4, 6), (3, 4, 3, 2)] {
            let s = shape(b, t, heads, dh);
            let n = b * t * heads * dh;
            let (mut q, mut k, mut v) = (random(n, 10), random(n, 11), random(n, 12));
            // Larger entries make the softmax far from uniform.
            q.iter_mut().for_each(|x| *x *= 3.0);
            let r = random(n, 13);
            let (probs, _) = run(&s, &q, &k, &v);
            let (mut dq, mut dk, mut dv) =
                (vec![f64::NAN; n], vec![f64::NAN; n], vec![f64::NAN; n]);
            backward(&s, &q, &k, &v, &probs, &r, &mut dq, &mut dk, &mut dv);
            let what = format!("attention b{b} t{t} heads{heads} dh{dh}");
            let (k0, v0, q0) = (k.clone(), v.clone(), q.clone());
            check(&format!("{what} dq"), &mut q, &dq, 200, 1e-7, |x| {
                dot(&run(&s, x, &k0, &v0).1, &r)
            });
            check(&format!("{what} dk"), &mut k, &dk, 200, 1e-7, |x| {
                dot(&run(&s, &q0, x, &v0).1, &r)
            });
            check(&format!("{what} dv"), &mut v, &dv, 200, 1e-7, |x| {
                dot(&run(&s, &q0, &k0, x).1, &r)
            });
        }
    }

    #[test]
    fn f32_agrees_with_f64_and_threads_change_nothing() {
        let s = shape(2, 19, 4, 32);
        let n = s.b * s.t * s.heads * s.dh;
        let (q, k, v, r) = (random(n, 20), random(n, 21), random(n, 22), random(n, 23));
        let (p64, o64) = run(&s, &q, &k, &v);
        let mut g64 = vec![vec![0.0; n]; 3];
        {
            let [dq, dk, dv] = &mut g64[..] else {
                unreachable!()
            };
            backward(&s, &q, &k, &v, &p64, &r, dq, dk, dv);
        }
        let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
        let (q32, k32, v32, r32) = (f(&q), f(&k), f(&v), f(&r));
        let once = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (p, o) = run(&s, &q32, &k32, &v32);
                let mut g = vec![vec![0.0f32; n]; 3];
                let [dq, dk, dv] = &mut g[..] else {
                    unreachable!()
                };
                backward(&s, &q32, &k32, &v32, &p, &r32, dq, dk, dv);
                (o, g)
            })
        };
        let (o1, g1) = once(1);
        assert_eq!((o1.clone(), g1.clone()), once(2));
        let close = |a: &[f32], b: &[f64]| {
            a.iter()
                .zip(b)
                .all(|(&x, &y)| (x as f64 - y).abs() < 1e-5 * (1.0 + y.abs()))
        };
        assert!(close(&o1, &o64));
        for (a, b) in g1.iter().zip(&g64) {
            assert!(close(a, b));
        }
    }
}

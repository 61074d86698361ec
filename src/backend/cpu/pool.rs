//! Pooling on the CPU backend: the stem's max-pool (window `k`, stride, padding that never
//! wins) and the encoder's global average pool. Work is split by (sample, channel) plane; one
//! thread owns a plane, so overlapping windows accumulate into `dx` in a fixed order.
use super::Real;
use crate::backend::Pool2d;
use rayon::prelude::*;

/// The valid input range `[lo, hi)` covered by window `o` along one axis of length `len`.
fn window(o: usize, k: usize, stride: usize, pad: usize, len: usize) -> (usize, usize) {
    let start = o * stride;
    let lo = start.saturating_sub(pad);
    let hi = (start + k).saturating_sub(pad).min(len);
    (lo, hi)
}

fn check_shapes(s: &Pool2d, x_len: usize, y_len: usize, what: &str) -> (usize, usize) {
    let (ho, wo) = s.out_hw();
    assert_eq!(x_len, s.n * s.c * s.h * s.w, "{what}: x length");
    assert_eq!(y_len, s.n * s.c * ho * wo, "{what}: y length");
    assert!(
        s.pad < s.k,
        "{what}: padding {} must be below the window {}",
        s.pad,
        s.k
    );
    (ho, wo)
}

/// `cols[ox]` = the max of input row `x` over window `ox`'s columns. Windows wholly inside
/// the row take a loop of compile-time length `K` (the stem's 3), unrolled; edge windows
/// (and `K = 0`: any size) go through the general loop.
#[inline(always)]
fn row_max<T: Real, const K: usize>(s: &Pool2d, x: &[T], cols: &mut [T]) {
    let w = x.len();
    let general = |ox: usize| {
        let (x0, x1) = window(ox, s.k, s.stride, s.pad, w);
        let mut best = x[x0];
        for &v in &x[x0 + 1..x1] {
            if v > best {
                best = v;
            }
        }
        best
    };
    let wo = cols.len();
    // Interior windows: ox * stride >= pad and ox * stride - pad + k <= w.
    let lo = s.pad.div_ceil(s.stride).min(wo);
    let hi = if K == 0 || w + s.pad < K {
        lo
    } else {
        ((w + s.pad - K) / s.stride + 1).clamp(lo, wo)
    };
    for ox in (0..lo).chain(hi..wo) {
        cols[ox] = general(ox);
    }
    for (ox, c) in cols[lo..hi].iter_mut().enumerate() {
        let x0 = (lo + ox) * s.stride - s.pad;
        let win: &[T; K] = x[x0..x0 + K].try_into().expect("window inside the row");
        let mut best = win[0];
        for &v in &win[1..] {
            best = if v > best { v } else { best };
        }
        *c = best;
    }
}

pub fn max_forward<T: Real>(s: &Pool2d, x: &[T], y: &mut [T]) {
    let (ho, wo) = check_shapes(s, x.len(), y.len(), "max_forward");
    let (h, w) = (s.h, s.w);
    if ho * wo == 0 {
        return;
    }
    // Separable: the max over each window's columns for every input row, then over its
    // rows, whole output rows at a time (which vectorises): 2k comparisons, not k^2.
    y.par_chunks_mut(ho * wo)
        .zip(x.par_chunks(h * w))
        .for_each_init(
            || vec![T::zero(); h * wo],
            |cols, (y, x)| {
                for (x, cols) in x.chunks_exact(w).zip(cols.chunks_exact_mut(wo)) {
                    match s.k {
                        2 => row_max::<T, 2>(s, x, cols),
                        3 => row_max::<T, 3>(s, x, cols),
                        _ => row_max::<T, 0>(s, x, cols),
                    }
                }
                for (oy, y) in y.chunks_exact_mut(wo).enumerate() {
                    let (y0, y1) = window(oy, s.k, s.stride, s.pad, h);
                    y.copy_from_slice(&cols[y0 * wo..(y0 + 1) * wo]);
                    for row in cols[(y0 + 1) * wo..y1 * wo].chunks_exact(wo) {
                        for (y, &v) in y.iter_mut().zip(row) {
                            if v > *y {
                                *y = v;
                            }
                        }
                    }
                }
            },
        );
}

pub fn max_backward<T: Real>(s: &Pool2d, x: &[T], y: &[T], dy: &[T], dx: &mut [T]) {
    let (ho, wo) = check_shapes(s, x.len(), y.len(), "max_backward");
    assert_eq!(dy.len(), y.len(), "max_backward: dy length");
    assert_eq!(dx.len(), x.len(), "max_backward: dx length");
    let (h, w) = (s.h, s.w);
    if ho * wo == 0 {
        dx.fill(T::zero());
        return;
    }
    dx.par_chunks_mut(h * w)
        .zip(x.par_chunks(h * w))
        .zip(y.par_chunks(ho * wo).zip(dy.par_chunks(ho * wo)))
        .for_each(|((dx, x), (y, dy))| {
            dx.fill(T::zero());
            for oy in 0..ho {
                let (y0, y1) = window(oy, s.k, s.stride, s.pad, h);
                for ox in 0..wo {
                    let (x0, x1) = window(ox, s.k, s.stride, s.pad, w);
                    let best = y[oy * wo + ox];
                    // The first maximal element in row-major window order, as forward picks.
                    'search: for iy in y0..y1 {
                        for ix in x0..x1 {
                            if x[iy * w + ix] == best {
                                dx[iy * w + ix] += dy[oy * wo + ox];
                                break 'search;
                            }
                        }
                    }
                }
            }
        });
}

pub fn avg_forward<T: Real>(n: usize, c: usize, hw: usize, x: &[T], y: &mut [T]) {
    assert_eq!(x.len(), n * c * hw, "avg_forward: x length");
    assert_eq!(y.len(), n * c, "avg_forward: y length");
    if hw == 0 {
        return;
    }
    let inv = T::one() / T::from_usize(hw).unwrap_or_else(T::nan);
    y.par_iter_mut()
        .zip(x.par_chunks(hw))
        .for_each(|(y, x)| *y = x.iter().copied().sum::<T>() * inv);
}

pub fn avg_backward<T: Real>(n: usize, c: usize, hw: usize, dy: &[T], dx: &mut [T]) {
    assert_eq!(dx.len(), n * c * hw, "avg_backward: dx length");
    assert_eq!(dy.len(), n * c, "avg_backward: dy length");
    if hw == 0 {
        return;
    }
    let inv = T::one() / T::from_usize(hw).unwrap_or_else(T::nan);
    dx.par_chunks_mut(hw)
        .zip(dy.par_iter())
        .for_each(|(dx, &g)| dx.fill(g * inv));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::gradcheck::{check, dot, random};

    fn max_pool_case(s: Pool2d, seed: u64) {
        let (ho, wo) = s.out_hw();
        let mut x = random(s.n * s.c * s.h * s.w, seed);
        let r = random(s.n * s.c * ho * wo, seed + 1);
        let mut y = vec![0.0; r.len()];
        max_forward(&s, &x, &mut y);
        // Naive reference: padding as -inf.
        for p in 0..s.n * s.c {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut best = f64::NEG_INFINITY;
                    for ky in 0..s.k {
                        for kx in 0..s.k {
                            let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                            let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < s.h && (ix as usize) < s.w {
                                best = best.max(x[p * s.h * s.w + iy as usize * s.w + ix as usize]);
                            }
                        }
                    }
                    assert_eq!(y[p * ho * wo + oy * wo + ox], best);
                }
            }
        }
        let mut dx = vec![7.0; x.len()];
        max_backward(&s, &x, &y, &r, &mut dx);
        check("max_pool dx", &mut x, &dx, 400, 1e-6, |x| {
            let mut y = vec![0.0; r.len()];
            max_forward(&s, x, &mut y);
            dot(&y, &r)
        });
    }

    #[test]
    fn max_pool_matches_reference_and_finite_differences() {
        let base = Pool2d {
            n: 2,
            c: 3,
            h: 13,
            w: 11,
            k: 3,
            stride: 2,
            pad: 1,
        };
        max_pool_case(base, 10);
        max_pool_case(Pool2d { h: 8, w: 9, ..base }, 20);
        max_pool_case(
            Pool2d {
                k: 2,
                stride: 2,
                pad: 0,
                h: 7,
                w: 6,
                ..base
            },
            30,
        );
        max_pool_case(
            Pool2d {
                k: 3,
                stride: 1,
                pad: 1,
                h: 5,
                w: 4,
                ..base
            },
            40,
        );
    }

    #[test]
    fn max_pool_ties_go_to_the_first_element() {
        let s = Pool2d {
            n: 1,
            c: 1,
            h: 2,
            w: 2,
            k: 2,
            stride: 1,
            pad: 0,
        };
        let x = [1.0, 3.0, 3.0, 3.0];
        let mut y = [0.0];
        max_forward(&s, &x, &mut y);
        let mut dx = [0.0; 4];
        max_backward(&s, &x, &y, &[1.0], &mut dx);
        assert_eq!(dx, [0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn avg_pool_matches_finite_differences() {
        let (n, c, hw) = (2, 3, 7);
        let mut x = random(n * c * hw, 50);
        let r = random(n * c, 51);
        let mut dx = vec![3.0; x.len()];
        avg_backward(n, c, hw, &r, &mut dx);
        check("avg_pool dx", &mut x, &dx, 100, 1e-6, |x| {
            let mut y = vec![0.0; n * c];
            avg_forward(n, c, hw, x, &mut y);
            dot(&y, &r)
        });
    }
}

/// Speed of the memory-bound encoder ops at the stem's output (one subject's 306 axial
/// slices, 16 x 48 x 57): `cargo test --release --lib pool::speed -- --ignored --nocapture`.
#[cfg(test)]
mod speed {
    use super::*;
    use crate::backend::cpu::norm;

    #[test]
    #[ignore]
    fn speed() {
        let (n, c, h, w) = (306, 16, 48, 57);
        let len = n * c * h * w;
        let x: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let (gamma, beta) = (vec![1.1f32; c], vec![0.1f32; c]);
        let time = |f: &mut dyn FnMut()| {
            f();
            (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut y = vec![0f32; len];
                let (mut m, mut r) = (vec![0f32; n * c], vec![0f32; n * c]);
                let t = time(&mut || {
                    norm::instance_forward(n, c, h * w, 1e-5, true, &x, &gamma, &beta, &mut y, &mut m, &mut r)
                });
                let mut dx = vec![0f32; len];
                let (mut dg, mut db) = (vec![0f32; c], vec![0f32; c]);
                let tb = time(&mut || {
                    norm::instance_backward(
                        n, c, h * w, true, &x, &y, &gamma, &m, &r, &x, &mut dx, &mut dg, &mut db,
                    )
                });
                let s = Pool2d { n, c, h, w, k: 3, stride: 2, pad: 1 };
                let (ho, wo) = s.out_hw();
                let mut p = vec![0f32; n * c * ho * wo];
                let tp = time(&mut || max_forward(&s, &y, &mut p));
                let tpb = time(&mut || max_backward(&s, &y, &p, &p, &mut dx));
                let gb = |t: f64, bytes: usize| bytes as f64 / t / 1e9;
                println!(
                    "{threads} thr  instance fwd {:.1} ms ({:.1} GB/s) bwd {:.1} ms ({:.1} GB/s) | max-pool fwd {:.1} ms bwd {:.1} ms",
                    t * 1e3,
                    gb(t, 8 * len),
                    tb * 1e3,
                    gb(tb, 16 * len),
                    tp * 1e3,
                    tpb * 1e3
                );
            });
        }
    }
}

//! Elementwise ops of the CPU backend: ReLU, residual adds, axpy, products and row biases.
//! Each output element is written by one thread from its own inputs, so results never depend
//! on the thread count; the one reduction (the bias gradient) sums fixed row chunks in a fixed
//! order.
use super::Real;
use rayon::prelude::*;

/// Elements per parallel task: large enough that rayon's overhead is noise, small enough to
/// spread an activation map over the cores.
const CHUNK: usize = 1 << 14;

/// Rows per partial sum of the bias gradient; fixed so the summation order is too.
const ROWS_PER_PARTIAL: usize = 256;

pub fn relu_forward<T: Real>(x: &[T], y: &mut [T]) {
    assert_eq!(x.len(), y.len(), "relu_forward: x and y lengths");
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = if x > T::zero() { x } else { T::zero() };
            }
        });
}

pub fn relu_backward<T: Real>(y: &[T], dy: &[T], dx: &mut [T]) {
    assert_eq!(y.len(), dy.len(), "relu_backward: y and dy lengths");
    assert_eq!(y.len(), dx.len(), "relu_backward: y and dx lengths");
    dx.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dx, (y, dy))| {
            for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
                *dx = if y > T::zero() { dy } else { T::zero() };
            }
        });
}

pub fn add<T: Real>(a: &[T], b: &[T], y: &mut [T]) {
    assert_eq!(a.len(), y.len(), "add: a and y lengths");
    assert_eq!(b.len(), y.len(), "add: b and y lengths");
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(y, (a, b))| {
            for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                *y = a + b;
            }
        });
}

pub fn axpy<T: Real>(alpha: f32, x: &[T], y: &mut [T]) {
    assert_eq!(x.len(), y.len(), "axpy: x and y lengths");
    let alpha = T::of(alpha);
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y += alpha * x;
            }
        });
}

/// `y = a * b` elementwise (dropout multipliers).
pub fn mul<T: Real>(a: &[T], b: &[T], y: &mut [T]) {
    assert_eq!(a.len(), y.len(), "mul: a and y lengths");
    assert_eq!(b.len(), y.len(), "mul: b and y lengths");
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(y, (a, b))| {
            for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                *y = a * b;
            }
        });
}

pub fn add_bias<T: Real>(rows: usize, d: usize, bias: &[T], y: &mut [T]) {
    assert_eq!(bias.len(), d, "add_bias: bias length");
    assert_eq!(y.len(), rows * d, "add_bias: y length");
    if d == 0 {
        return;
    }
    let rows_per_task = (CHUNK / d).max(1);
    y.par_chunks_mut(rows_per_task * d).for_each(|y| {
        for row in y.chunks_exact_mut(d) {
            for (y, &b) in row.iter_mut().zip(bias) {
                *y += b;
            }
        }
    });
}

pub fn bias_backward<T: Real>(rows: usize, d: usize, dy: &[T], dbias: &mut [T]) {
    assert_eq!(dbias.len(), d, "bias_backward: dbias length");
    assert_eq!(dy.len(), rows * d, "bias_backward: dy length");
    if d == 0 {
        return;
    }
    let partials: Vec<Vec<T>> = dy
        .par_chunks(ROWS_PER_PARTIAL * d)
        .map(|dy| {
            let mut sum = vec![T::zero(); d];
            for row in dy.chunks_exact(d) {
                for (s, &g) in sum.iter_mut().zip(row) {
                    *s += g;
                }
            }
            sum
        })
        .collect();
    for partial in &partials {
        for (db, &s) in dbias.iter_mut().zip(partial) {
            *db += s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::gradcheck::{check, dot, random};

    #[test]
    fn relu_backward_matches_finite_differences() {
        let mut x = random(37, 1);
        let r = random(37, 2);
        let mut y = vec![0.0; 37];
        relu_forward(&x, &mut y);
        let mut dx = vec![0.0; 37];
        relu_backward(&y, &r, &mut dx);
        check("relu dx", &mut x, &dx, 100, 1e-6, |x| {
            let mut y = vec![0.0; 37];
            relu_forward(x, &mut y);
            dot(&y, &r)
        });
    }

    #[test]
    fn add_axpy_and_bias() {
        let a = random(12, 3);
        let b = random(12, 4);
        let mut y = vec![0.0; 12];
        add(&a, &b, &mut y);
        for i in 0..12 {
            assert_eq!(y[i], a[i] + b[i]);
        }
        let mut z = b.clone();
        axpy(0.5, &a, &mut z);
        for i in 0..12 {
            assert_eq!(z[i], b[i] + 0.5 * a[i]);
        }
        let mut p = vec![0.0; 12];
        mul(&a, &b, &mut p);
        for i in 0..12 {
            assert_eq!(p[i], a[i] * b[i]);
        }
        let bias = random(4, 5);
        let mut w = a.clone();
        add_bias(3, 4, &bias, &mut w);
        for r in 0..3 {
            for j in 0..4 {
                assert_eq!(w[r * 4 + j], a[r * 4 + j] + bias[j]);
            }
        }
    }

    #[test]
    fn bias_gradient_accumulates_and_matches_finite_differences() {
        let (rows, d) = (600, 5);
        let r = random(rows * d, 6);
        let start = random(d, 7);
        let mut dbias = start.clone();
        bias_backward(rows, d, &r, &mut dbias);
        let added: Vec<f64> = dbias.iter().zip(&start).map(|(a, b)| a - b).collect();
        let y0 = random(rows * d, 8);
        let mut bias = random(d, 9);
        check("bias dbias", &mut bias, &added, 100, 1e-6, |bias| {
            let mut y = y0.clone();
            add_bias(rows, d, bias, &mut y);
            dot(&y, &r)
        });
    }
}

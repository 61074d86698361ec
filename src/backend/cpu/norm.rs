//! (stub: being written; signatures fixed by ../mod.rs)
#![allow(unused_variables, clippy::too_many_arguments)]
use super::Real;
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
    unimplemented!()
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
    unimplemented!()
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
    unimplemented!()
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
    unimplemented!()
}

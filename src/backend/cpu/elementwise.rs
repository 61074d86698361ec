//! (stub: being written; signatures fixed by ../mod.rs)
#![allow(unused_variables, clippy::too_many_arguments)]
use super::Real;
pub fn relu_forward<T: Real>(x: &[T], y: &mut [T]) {
    unimplemented!()
}
pub fn relu_backward<T: Real>(y: &[T], dy: &[T], dx: &mut [T]) {
    unimplemented!()
}
pub fn add<T: Real>(a: &[T], b: &[T], y: &mut [T]) {
    unimplemented!()
}
pub fn axpy<T: Real>(alpha: f32, x: &[T], y: &mut [T]) {
    unimplemented!()
}
pub fn add_bias<T: Real>(rows: usize, d: usize, bias: &[T], y: &mut [T]) {
    unimplemented!()
}
pub fn bias_backward<T: Real>(rows: usize, d: usize, dy: &[T], dbias: &mut [T]) {
    unimplemented!()
}

//! (stub: being written; signatures fixed by ../mod.rs)
#![allow(unused_variables, clippy::too_many_arguments)]
use super::Real;
use crate::backend::Adam;
pub fn adam<T: Real>(h: &Adam, params: &mut [T], grads: &[T], m: &mut [T], v: &mut [T]) {
    unimplemented!()
}
pub fn sum_squares<T: Real>(x: &[T]) -> f64 {
    unimplemented!()
}
pub fn scale<T: Real>(alpha: f32, x: &mut [T]) {
    unimplemented!()
}

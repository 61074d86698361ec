//! (stub: being written; signatures fixed by ../mod.rs)
#![allow(unused_variables, clippy::too_many_arguments)]
use super::Real;
use crate::backend::Conv2d;
pub fn forward<T: Real>(s: &Conv2d, x: &[T], w: &[T], y: &mut [T]) {
    unimplemented!()
}
pub fn backward_data<T: Real>(s: &Conv2d, dy: &[T], w: &[T], dx: &mut [T]) {
    unimplemented!()
}
pub fn backward_weight<T: Real>(s: &Conv2d, x: &[T], dy: &[T], dw: &mut [T]) {
    unimplemented!()
}

//! (stub: being written; signatures fixed by ../mod.rs)
#![allow(unused_variables, clippy::too_many_arguments)]
use super::Real;
use crate::backend::Pool2d;
pub fn max_forward<T: Real>(s: &Pool2d, x: &[T], y: &mut [T]) {
    unimplemented!()
}
pub fn max_backward<T: Real>(s: &Pool2d, x: &[T], y: &[T], dy: &[T], dx: &mut [T]) {
    unimplemented!()
}
pub fn avg_forward<T: Real>(n: usize, c: usize, hw: usize, x: &[T], y: &mut [T]) {
    unimplemented!()
}
pub fn avg_backward<T: Real>(n: usize, c: usize, hw: usize, dy: &[T], dx: &mut [T]) {
    unimplemented!()
}

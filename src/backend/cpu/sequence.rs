//! (stub: being written; signatures fixed by ../mod.rs)
#![allow(unused_variables, clippy::too_many_arguments)]
use super::Real;
pub fn embed_forward<T: Real>(
    b: usize,
    t: usize,
    d: usize,
    scale: f32,
    x: &[T],
    pos: &[T],
    plane: &[T],
    y: &mut [T],
) {
    unimplemented!()
}
pub fn embed_backward<T: Real>(
    b: usize,
    t: usize,
    d: usize,
    scale: f32,
    dy: &[T],
    dx: &mut [T],
    dplane: &mut [T],
) {
    unimplemented!()
}
pub fn mask_scatter<T: Real>(d: usize, rows: &[u32], token: &[T], x: &mut [T]) {
    unimplemented!()
}
pub fn gather_rows<T: Real>(d: usize, rows: &[u32], x: &[T], y: &mut [T]) {
    unimplemented!()
}
pub fn scatter_add_rows<T: Real>(d: usize, rows: &[u32], dy: &[T], dx: &mut [T]) {
    unimplemented!()
}

//! (stub: being written; signatures fixed by ../mod.rs)
#![allow(unused_variables, clippy::too_many_arguments)]
use super::Real;
/// Returns the loss; writes dpred.
pub fn mse<T: Real>(scale: f32, pred: &[T], target: &[T], dpred: &mut [T]) -> T {
    unimplemented!()
}
/// Returns the loss; writes da, dp, dn.
pub fn triplet<T: Real>(
    rows: usize,
    d: usize,
    margin: f32,
    scale: f32,
    a: &[T],
    p: &[T],
    n: &[T],
    da: &mut [T],
    dp: &mut [T],
    dn: &mut [T],
) -> T {
    unimplemented!()
}

//! (stub: being written; signatures fixed by ../mod.rs)
#![allow(unused_variables, clippy::too_many_arguments)]
use super::Real;
use crate::backend::Attention;
pub fn forward<T: Real>(s: &Attention, q: &[T], k: &[T], v: &[T], probs: &mut [T], out: &mut [T]) {
    unimplemented!()
}
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
    unimplemented!()
}

//! (stub: being written; signatures fixed by ../mod.rs)
#![allow(unused_variables, clippy::too_many_arguments)]
use super::Real;
use crate::backend::Gemm;
pub fn gemm<T: Real>(g: &Gemm, a: &[T], b: &[T], c: &mut [T]) {
    unimplemented!()
}

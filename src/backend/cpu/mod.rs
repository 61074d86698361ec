//! The CPU backend: the reference every other backend is checked against. Ops are plain
//! functions over slices, generic over the float type so the finite-difference tests run
//! them in f64; [`Cpu`] instantiates them at f32 behind the [`Backend`] trait.
pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod gemm;
#[cfg(test)]
pub mod gradcheck;
pub mod loss;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod sequence;

use super::{Adam, Attention, Backend, Conv2d, Gemm, Pool2d};
use std::ops::Range;

/// The float types the CPU ops run in: f32 in production, f64 in gradient checks.
pub trait Real:
    num_traits::Float
    + num_traits::FromPrimitive
    + num_traits::NumAssign
    + std::iter::Sum
    + std::fmt::Debug
    + Default
    + Send
    + Sync
    + 'static
{
    /// Converts a hyperparameter given as f32.
    fn of(x: f32) -> Self {
        Self::from_f32(x).unwrap_or_else(Self::nan)
    }
}
impl Real for f32 {}
impl Real for f64 {}

/// The CPU backend. Threads come from the rayon pool the caller sets up.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    fn upload(&self, host: &[f32]) -> Vec<f32> {
        host.to_vec()
    }
    fn download(&self, buf: &[f32], host: &mut [f32]) {
        host.copy_from_slice(buf);
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn view<'a>(&self, buf: &'a Vec<f32>, range: Range<usize>) -> &'a [f32] {
        &buf[range]
    }
    fn view_mut<'a>(&self, buf: &'a mut Vec<f32>, range: Range<usize>) -> &'a mut [f32] {
        &mut buf[range]
    }
    fn split_mut<'a>(
        &self,
        v: Self::ViewMut<'a>,
        mid: usize,
    ) -> (Self::ViewMut<'a>, Self::ViewMut<'a>) {
        v.split_at_mut(mid)
    }
    fn as_view<'a, 'b>(&self, v: &'b &'a mut [f32]) -> &'b [f32]
    where
        'a: 'b,
    {
        v
    }
    fn reborrow_mut<'a, 'b>(&self, v: &'b mut &'a mut [f32]) -> &'b mut [f32]
    where
        'a: 'b,
    {
        v
    }
    fn fill(&self, x: &mut [f32], value: f32) {
        x.fill(value);
    }
    fn copy(&self, src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn gemm(&self, g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        gemm::gemm(g, a, b, c);
    }
    fn conv2d_forward(&self, s: &Conv2d, x: &[f32], w: &[f32], y: &mut [f32]) {
        conv::forward(s, x, w, y);
    }
    fn conv2d_backward_data(&self, s: &Conv2d, dy: &[f32], w: &[f32], dx: &mut [f32]) {
        conv::backward_data(s, dy, w, dx);
    }
    fn conv2d_backward_weight(&self, s: &Conv2d, x: &[f32], dy: &[f32], dw: &mut [f32]) {
        conv::backward_weight(s, x, dy, dw);
    }
    fn instance_norm_forward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        eps: f32,
        relu: bool,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        y: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
    ) {
        norm::instance_forward(n, c, hw, eps, relu, x, gamma, beta, y, mean, rstd);
    }
    fn instance_norm_backward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        relu: bool,
        x: &[f32],
        y: &[f32],
        gamma: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        norm::instance_backward(
            n, c, hw, relu, x, y, gamma, mean, rstd, dy, dx, dgamma, dbeta,
        );
    }
    fn layer_norm_forward(
        &self,
        rows: usize,
        d: usize,
        eps: f32,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        y: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
    ) {
        norm::layer_forward(rows, d, eps, x, gamma, beta, y, mean, rstd);
    }
    fn layer_norm_backward(
        &self,
        rows: usize,
        d: usize,
        x: &[f32],
        gamma: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        norm::layer_backward(rows, d, x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
    }
    fn relu_forward(&self, x: &[f32], y: &mut [f32]) {
        elementwise::relu_forward(x, y);
    }
    fn relu_backward(&self, y: &[f32], dy: &[f32], dx: &mut [f32]) {
        elementwise::relu_backward(y, dy, dx);
    }
    fn add(&self, a: &[f32], b: &[f32], y: &mut [f32]) {
        elementwise::add(a, b, y);
    }
    fn axpy(&self, alpha: f32, x: &[f32], y: &mut [f32]) {
        elementwise::axpy(alpha, x, y);
    }
    fn add_bias(&self, rows: usize, d: usize, bias: &[f32], y: &mut [f32]) {
        elementwise::add_bias(rows, d, bias, y);
    }
    fn bias_backward(&self, rows: usize, d: usize, dy: &[f32], dbias: &mut [f32]) {
        elementwise::bias_backward(rows, d, dy, dbias);
    }
    fn max_pool_forward(&self, s: &Pool2d, x: &[f32], y: &mut [f32]) {
        pool::max_forward(s, x, y);
    }
    fn max_pool_backward(&self, s: &Pool2d, x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32]) {
        pool::max_backward(s, x, y, dy, dx);
    }
    fn avg_pool_forward(&self, n: usize, c: usize, hw: usize, x: &[f32], y: &mut [f32]) {
        pool::avg_forward(n, c, hw, x, y);
    }
    fn avg_pool_backward(&self, n: usize, c: usize, hw: usize, dy: &[f32], dx: &mut [f32]) {
        pool::avg_backward(n, c, hw, dy, dx);
    }
    fn attention_forward(
        &self,
        s: &Attention,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        probs: &mut [f32],
        out: &mut [f32],
    ) {
        attention::forward(s, q, k, v, probs, out);
    }
    fn attention_backward(
        &self,
        s: &Attention,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        probs: &[f32],
        dout: &[f32],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        attention::backward(s, q, k, v, probs, dout, dq, dk, dv);
    }
    fn embed_forward(
        &self,
        b: usize,
        t: usize,
        d: usize,
        scale: f32,
        x: &[f32],
        pos: &[f32],
        plane: &[f32],
        y: &mut [f32],
    ) {
        sequence::embed_forward(b, t, d, scale, x, pos, plane, y);
    }
    fn embed_backward(
        &self,
        b: usize,
        t: usize,
        d: usize,
        scale: f32,
        dy: &[f32],
        dx: &mut [f32],
        dplane: &mut [f32],
    ) {
        sequence::embed_backward(b, t, d, scale, dy, dx, dplane);
    }
    fn mask_scatter(&self, d: usize, rows: &[u32], token: &[f32], x: &mut [f32]) {
        sequence::mask_scatter(d, rows, token, x);
    }
    fn gather_rows(&self, d: usize, rows: &[u32], x: &[f32], y: &mut [f32]) {
        sequence::gather_rows(d, rows, x, y);
    }
    fn scatter_add_rows(&self, d: usize, rows: &[u32], dy: &[f32], dx: &mut [f32]) {
        sequence::scatter_add_rows(d, rows, dy, dx);
    }
    fn mse(&self, scale: f32, pred: &[f32], target: &[f32], loss: &mut [f32], dpred: &mut [f32]) {
        loss[0] = loss::mse(scale, pred, target, dpred);
    }
    fn triplet(
        &self,
        rows: usize,
        d: usize,
        margin: f32,
        scale: f32,
        a: &[f32],
        p: &[f32],
        n: &[f32],
        loss: &mut [f32],
        da: &mut [f32],
        dp: &mut [f32],
        dn: &mut [f32],
    ) {
        loss[0] = loss::triplet(rows, d, margin, scale, a, p, n, da, dp, dn);
    }
    fn adam(&self, h: &Adam, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32]) {
        optim::adam(h, params, grads, m, v);
    }
    fn sum_squares(&self, x: &[f32]) -> f64 {
        optim::sum_squares(x)
    }
    fn scale(&self, alpha: f32, x: &mut [f32]) {
        optim::scale(alpha, x);
    }
}

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

use super::{Adam, Attention, Backend, Conv2d, DiceCe, Gemm, Pool2d};
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

/// The CPU backend in f32: the reference for every other backend. Threads come from the
/// rayon pool the caller sets up.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// The same ops in f64, behind the same trait: the whole model runs in double precision, so
/// its gradients can be checked by finite differences without f32 rounding in the way.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu64;

/// One implementation of the trait for both precisions: the ops are generic over [`Real`].
macro_rules! cpu_backend {
    ($name:ident, $t:ty, $label:expr) => {
        impl Backend for $name {
            type Buf = Vec<$t>;
            type View<'a> = &'a [$t];
            type ViewMut<'a> = &'a mut [$t];

            fn name(&self) -> &'static str {
                $label
            }
            fn zeros(&self, len: usize) -> Vec<$t> {
                vec![0.0; len]
            }
            fn upload(&self, host: &[f32]) -> Vec<$t> {
                host.iter().map(|&v| <$t as Real>::of(v)).collect()
            }
            fn download(&self, buf: &[$t], host: &mut [f32]) {
                for (h, b) in host.iter_mut().zip(buf) {
                    *h = num_traits::ToPrimitive::to_f32(b).unwrap_or(f32::NAN);
                }
            }
            fn scalar(&self, v: &[$t]) -> f64 {
                num_traits::ToPrimitive::to_f64(&v[0]).unwrap_or(f64::NAN)
            }
            fn len(&self, buf: &Vec<$t>) -> usize {
                buf.len()
            }
            fn view<'a>(&self, buf: &'a Vec<$t>, range: Range<usize>) -> &'a [$t] {
                &buf[range]
            }
            fn view_mut<'a>(&self, buf: &'a mut Vec<$t>, range: Range<usize>) -> &'a mut [$t] {
                &mut buf[range]
            }
            fn split_mut<'a>(
                &self,
                v: Self::ViewMut<'a>,
                mid: usize,
            ) -> (Self::ViewMut<'a>, Self::ViewMut<'a>) {
                v.split_at_mut(mid)
            }
            fn as_view<'a, 'b>(&self, v: &'b &'a mut [$t]) -> &'b [$t]
            where
                'a: 'b,
            {
                v
            }
            fn reborrow_mut<'a, 'b>(&self, v: &'b mut &'a mut [$t]) -> &'b mut [$t]
            where
                'a: 'b,
            {
                v
            }
            fn fill(&self, x: &mut [$t], value: f32) {
                x.fill(<$t as Real>::of(value));
            }
            fn copy(&self, src: &[$t], dst: &mut [$t]) {
                dst.copy_from_slice(src);
            }
            fn gemm(&self, g: &Gemm, a: &[$t], b: &[$t], c: &mut [$t]) {
                gemm::gemm(g, a, b, c);
            }
            fn conv2d_forward(&self, s: &Conv2d, x: &[$t], w: &[$t], y: &mut [$t]) {
                conv::forward(s, x, w, y);
            }
            fn conv2d_backward_data(&self, s: &Conv2d, dy: &[$t], w: &[$t], dx: &mut [$t]) {
                conv::backward_data(s, dy, w, dx);
            }
            fn conv2d_backward_weight(&self, s: &Conv2d, x: &[$t], dy: &[$t], dw: &mut [$t]) {
                conv::backward_weight(s, x, dy, dw);
            }
            fn instance_norm_forward(
                &self,
                n: usize,
                c: usize,
                hw: usize,
                eps: f32,
                relu: bool,
                x: &[$t],
                gamma: &[$t],
                beta: &[$t],
                y: &mut [$t],
                mean: &mut [$t],
                rstd: &mut [$t],
            ) {
                norm::instance_forward(n, c, hw, eps, relu, x, gamma, beta, y, mean, rstd);
            }
            fn conv2d_norm_forward(
                &self,
                s: &Conv2d,
                x: &[$t],
                w: &[$t],
                gamma: &[$t],
                beta: &[$t],
                eps: f32,
                relu: bool,
                pre: Option<&mut [$t]>,
                post: &mut [$t],
                mean: &mut [$t],
                rstd: &mut [$t],
            ) {
                let norm = conv::Norm {
                    eps,
                    relu,
                    gamma,
                    beta,
                    post,
                    mean,
                    rstd,
                };
                conv::forward_normed(s, x, w, pre, norm);
            }
            fn instance_norm_backward(
                &self,
                n: usize,
                c: usize,
                hw: usize,
                relu: bool,
                x: &[$t],
                y: &[$t],
                gamma: &[$t],
                mean: &[$t],
                rstd: &[$t],
                dy: &[$t],
                dx: &mut [$t],
                dgamma: &mut [$t],
                dbeta: &mut [$t],
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
                x: &[$t],
                gamma: &[$t],
                beta: &[$t],
                y: &mut [$t],
                mean: &mut [$t],
                rstd: &mut [$t],
            ) {
                norm::layer_forward(rows, d, eps, x, gamma, beta, y, mean, rstd);
            }
            fn layer_norm_backward(
                &self,
                rows: usize,
                d: usize,
                x: &[$t],
                gamma: &[$t],
                mean: &[$t],
                rstd: &[$t],
                dy: &[$t],
                dx: &mut [$t],
                dgamma: &mut [$t],
                dbeta: &mut [$t],
            ) {
                norm::layer_backward(rows, d, x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
            }
            fn relu_forward(&self, x: &[$t], y: &mut [$t]) {
                elementwise::relu_forward(x, y);
            }
            fn relu_backward(&self, y: &[$t], dy: &[$t], dx: &mut [$t]) {
                elementwise::relu_backward(y, dy, dx);
            }
            fn add(&self, a: &[$t], b: &[$t], y: &mut [$t]) {
                elementwise::add(a, b, y);
            }
            fn axpy(&self, alpha: f32, x: &[$t], y: &mut [$t]) {
                elementwise::axpy(alpha, x, y);
            }
            fn mul(&self, n: usize, a: &[$t], b: &[$t], y: &mut [$t]) {
                assert_eq!(y.len(), n, "mul: y length");
                elementwise::mul(a, b, y);
            }
            fn add_bias(&self, rows: usize, d: usize, bias: &[$t], y: &mut [$t]) {
                elementwise::add_bias(rows, d, bias, y);
            }
            fn bias_backward(&self, rows: usize, d: usize, dy: &[$t], dbias: &mut [$t]) {
                elementwise::bias_backward(rows, d, dy, dbias);
            }
            fn max_pool_forward(&self, s: &Pool2d, x: &[$t], y: &mut [$t]) {
                pool::max_forward(s, x, y);
            }
            fn max_pool_backward(&self, s: &Pool2d, x: &[$t], y: &[$t], dy: &[$t], dx: &mut [$t]) {
                pool::max_backward(s, x, y, dy, dx);
            }
            fn avg_pool_forward(&self, n: usize, c: usize, hw: usize, x: &[$t], y: &mut [$t]) {
                pool::avg_forward(n, c, hw, x, y);
            }
            fn avg_pool_backward(&self, n: usize, c: usize, hw: usize, dy: &[$t], dx: &mut [$t]) {
                pool::avg_backward(n, c, hw, dy, dx);
            }
            fn attention_forward(
                &self,
                s: &Attention,
                q: &[$t],
                k: &[$t],
                v: &[$t],
                probs: &mut [$t],
                out: &mut [$t],
            ) {
                attention::forward(s, q, k, v, probs, out);
            }
            fn attention_backward(
                &self,
                s: &Attention,
                q: &[$t],
                k: &[$t],
                v: &[$t],
                probs: &[$t],
                dout: &[$t],
                dq: &mut [$t],
                dk: &mut [$t],
                dv: &mut [$t],
            ) {
                attention::backward(s, q, k, v, probs, dout, dq, dk, dv);
            }
            fn embed_forward(
                &self,
                b: usize,
                t: usize,
                d: usize,
                scale: f32,
                x: &[$t],
                pos: &[$t],
                plane: &[$t],
                y: &mut [$t],
            ) {
                sequence::embed_forward(b, t, d, scale, x, pos, plane, y);
            }
            fn embed_backward(
                &self,
                b: usize,
                t: usize,
                d: usize,
                scale: f32,
                dy: &[$t],
                dx: &mut [$t],
                dplane: &mut [$t],
            ) {
                sequence::embed_backward(b, t, d, scale, dy, dx, dplane);
            }
            fn mask_scatter(&self, d: usize, rows: &[u32], token: &[$t], x: &mut [$t]) {
                sequence::mask_scatter(d, rows, token, x);
            }
            fn gather_rows(&self, d: usize, rows: &[u32], x: &[$t], y: &mut [$t]) {
                sequence::gather_rows(d, rows, x, y);
            }
            fn scatter_add_rows(&self, d: usize, rows: &[u32], dy: &[$t], dx: &mut [$t]) {
                sequence::scatter_add_rows(d, rows, dy, dx);
            }
            fn mse(
                &self,
                scale: f32,
                pred: &[$t],
                target: &[$t],
                loss: &mut [$t],
                dpred: &mut [$t],
            ) {
                loss[0] = loss::mse(scale, pred, target, dpred);
            }
            fn dice_ce(&self, s: &DiceCe, logits: &[$t], labels: &[u8], dlogits: &mut [$t]) -> f64 {
                loss::dice_ce(s, logits, labels, dlogits)
            }
            fn triplet(
                &self,
                rows: usize,
                d: usize,
                margin: f32,
                scale: f32,
                a: &[$t],
                p: &[$t],
                n: &[$t],
                loss: &mut [$t],
                da: &mut [$t],
                dp: &mut [$t],
                dn: &mut [$t],
            ) {
                loss[0] = loss::triplet(rows, d, margin, scale, a, p, n, da, dp, dn);
            }
            fn adam(&self, h: &Adam, params: &mut [$t], grads: &[$t], m: &mut [$t], v: &mut [$t]) {
                optim::adam(h, params, grads, m, v);
            }
            fn sum_squares(&self, x: &[$t]) -> f64 {
                optim::sum_squares(x)
            }
            fn scale(&self, alpha: f32, x: &mut [$t]) {
                optim::scale(alpha, x);
            }
        }
    };
}

cpu_backend!(Cpu, f32, "cpu");
cpu_backend!(Cpu64, f64, "cpu-f64");

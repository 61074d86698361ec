//! The backend: device buffers and the ops the model needs. The model is written once against
//! [`Backend`]; `cpu` is the reference (and the finite-difference oracle), `cuda` (behind the
//! `cuda` feature) implements the same trait with cuBLAS and our kernels; `device` picks one.
//!
//! Conventions, shared by every implementation:
//! - tensors are f32, row-major; images are NCHW (`[n, c, h, w]`), sequences `[b, t, d]`;
//! - a *forward* op overwrites its output; a *backward* op overwrites the gradient of its
//!   input (`dx = ...`) and **accumulates** into parameter gradients (`dw += ...`), because one
//!   weight serves several planes and subjects;
//! - reductions run in a fixed order (fixed chunks combined in a fixed order), so results do
//!   not depend on the thread count.
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;

use std::ops::Range;

/// Output length along one axis of a convolution or pooling window of size `k` (floor mode,
/// as PyTorch): `(n + 2 pad - k) / stride + 1`, at least 1.
pub fn window_out(n: usize, k: usize, stride: usize, pad: usize) -> usize {
    (n + 2 * pad).saturating_sub(k) / stride + 1
}

/// Shape of a 2-D convolution without bias: `x [n, cin, h, w] * w [cout, cin, k, k] ->
/// y [n, cout, ho, wo]` with `ho = (h + 2 pad - k) / stride + 1` (same for `wo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2d {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2d {
    pub fn out_hw(&self) -> (usize, usize) {
        (
            window_out(self.h, self.k, self.stride, self.pad),
            window_out(self.w, self.k, self.stride, self.pad),
        )
    }
}

/// Shape of a max-pool: `x [n, c, h, w] -> y [n, c, ho, wo]`, window `k`, `stride`, `pad`
/// (padding never wins the max).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2d {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Pool2d {
    pub fn out_hw(&self) -> (usize, usize) {
        (
            window_out(self.h, self.k, self.stride, self.pad),
            window_out(self.w, self.k, self.stride, self.pad),
        )
    }
}

/// One operand of a strided batched GEMM: matrix `i` starts at `i * stride` in its view, rows
/// `ld` apart; `trans` reads it transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatLayout {
    pub trans: bool,
    pub ld: usize,
    pub stride: usize,
}

/// `c_i = alpha * op(a_i) op(b_i) + beta * c_i` for `i < batch`; `op(a_i)` is `m x k`,
/// `op(b_i)` is `k x n`, `c_i` is `m x n`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub alpha: f32,
    pub beta: f32,
    pub a: MatLayout,
    pub b: MatLayout,
    pub c: MatLayout,
}

/// Multi-head attention over `q, k, v [b, t, heads * dh]` with `softmax(q k^T * scale) v`,
/// no mask (every position sees every other).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attention {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub dh: usize,
    pub scale: f32,
}

/// Shape of the segmentation loss ([`Backend::dice_ce`]): logits `[subjects * slices, classes,
/// hw]` (each subject's slices of one plane, NCHW) and one class index per pixel
/// `[subjects * slices, hw]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiceCe {
    pub subjects: usize,
    /// Slices per subject.
    pub slices: usize,
    pub classes: usize,
    /// Pixels per slice.
    pub hw: usize,
    /// Smoothing of the soft Dice, in pixels: `(2 I + eps) / (P + G + eps)`.
    pub eps: f64,
    /// The regions whose soft Dice the loss averages, each a set of classes as a bit mask
    /// (bit `c` for class `c`): a region's probability is the sum of its classes'
    /// probabilities, its ground truth the pixels labelled with one of them. One region per
    /// tumour class (`[1 << 1, 1 << 2, ...]`) gives the per-class Dice; nested regions (BraTS's
    /// whole tumour, core, enhancing) give region-based training.
    pub regions: &'static [u32],
    /// Cross-entropy weight of a pixel whose label is a tumour class (class >= 1); background
    /// pixels weigh 1. The weighted sum is still divided by the number of pixels. 1 gives the
    /// unweighted loss.
    pub fg_weight: f64,
}

impl DiceCe {
    /// Logit values (and gradient values).
    pub fn len(&self) -> usize {
        self.subjects * self.slices * self.classes * self.hw
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Adam/AdamW hyperparameters for one update; `step` counts from 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay (AdamW); 0 gives Adam.
    pub weight_decay: f32,
    pub step: u64,
}

/// Device buffers and ops. Views borrow parts of buffers, so a layer can see its slice of the
/// one flat parameter buffer.
pub trait Backend: Send + Sync {
    /// An owned device buffer of f32.
    type Buf: Send;
    /// A read-only view of part of a buffer.
    type View<'a>: Copy
    where
        Self: 'a;
    /// A writable view of part of a buffer.
    type ViewMut<'a>
    where
        Self: 'a;

    fn name(&self) -> &'static str;

    // ---- memory ----
    /// A zeroed buffer of `len` values.
    fn zeros(&self, len: usize) -> Self::Buf;
    fn upload(&self, host: &[f32]) -> Self::Buf;
    fn download(&self, buf: Self::View<'_>, host: &mut [f32]);
    /// The first value of `v` (a loss), in the buffer's own precision widened to f64.
    fn scalar(&self, v: Self::View<'_>) -> f64;
    fn len(&self, buf: &Self::Buf) -> usize;
    fn view<'a>(&self, buf: &'a Self::Buf, range: Range<usize>) -> Self::View<'a>;
    fn view_mut<'a>(&self, buf: &'a mut Self::Buf, range: Range<usize>) -> Self::ViewMut<'a>;
    /// Splits a writable view at `mid` (for taking several outputs from one buffer).
    fn split_mut<'a>(
        &self,
        v: Self::ViewMut<'a>,
        mid: usize,
    ) -> (Self::ViewMut<'a>, Self::ViewMut<'a>);
    /// Reborrows a writable view as read-only.
    fn as_view<'a, 'b>(&self, v: &'b Self::ViewMut<'a>) -> Self::View<'b>
    where
        'a: 'b;
    /// Reborrows a writable view for one call, so the view can be used again after it.
    fn reborrow_mut<'a, 'b>(&self, v: &'b mut Self::ViewMut<'a>) -> Self::ViewMut<'b>
    where
        'a: 'b;
    fn fill(&self, x: Self::ViewMut<'_>, value: f32);
    fn copy(&self, src: Self::View<'_>, dst: Self::ViewMut<'_>);

    // ---- linear algebra ----
    fn gemm(&self, g: &Gemm, a: Self::View<'_>, b: Self::View<'_>, c: Self::ViewMut<'_>);

    // ---- convolution (no bias) ----
    fn conv2d_forward(
        &self,
        s: &Conv2d,
        x: Self::View<'_>,
        w: Self::View<'_>,
        y: Self::ViewMut<'_>,
    );
    /// `dx = conv^T(dy, w)`.
    fn conv2d_backward_data(
        &self,
        s: &Conv2d,
        dy: Self::View<'_>,
        w: Self::View<'_>,
        dx: Self::ViewMut<'_>,
    );
    /// `dw += x (*) dy`.
    fn conv2d_backward_weight(
        &self,
        s: &Conv2d,
        x: Self::View<'_>,
        dy: Self::View<'_>,
        dw: Self::ViewMut<'_>,
    );

    // ---- normalisation ----
    /// Instance norm over each (sample, channel) plane of `hw` values with learnable affine
    /// `gamma, beta [c]`; saves `mean, rstd [n * c]` for backward. `relu` fuses a ReLU on the
    /// output.
    fn instance_norm_forward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        eps: f32,
        relu: bool,
        x: Self::View<'_>,
        gamma: Self::View<'_>,
        beta: Self::View<'_>,
        y: Self::ViewMut<'_>,
        mean: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
    );
    /// [`Backend::conv2d_forward`] into `pre`, then [`Backend::instance_norm_forward`] of it
    /// into `post`, `mean`, `rstd` (`n = s.n`, `c = s.cout`): one call, so that a backend can
    /// normalise each image while its convolution output is still in cache (this default
    /// runs the two ops in turn). Without `pre` the convolution output is not kept (a
    /// forward pass that needs no tape).
    fn conv2d_norm_forward(
        &self,
        s: &Conv2d,
        x: Self::View<'_>,
        w: Self::View<'_>,
        gamma: Self::View<'_>,
        beta: Self::View<'_>,
        eps: f32,
        relu: bool,
        pre: Option<Self::ViewMut<'_>>,
        post: Self::ViewMut<'_>,
        mean: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
    ) {
        let (ho, wo) = s.out_hw();
        let Some(mut pre) = pre else {
            let len = s.n * s.cout * ho * wo;
            let mut owned = self.zeros(len);
            let pre = Some(self.view_mut(&mut owned, 0..len));
            let (g, b) = (gamma, beta);
            return self.conv2d_norm_forward(s, x, w, g, b, eps, relu, pre, post, mean, rstd);
        };
        self.conv2d_forward(s, x, w, self.reborrow_mut(&mut pre));
        let pre = self.as_view(&pre);
        self.instance_norm_forward(
            s.n,
            s.cout,
            ho * wo,
            eps,
            relu,
            pre,
            gamma,
            beta,
            post,
            mean,
            rstd,
        );
    }
    /// Backward of the above (`y` is the forward output, used for the fused ReLU's mask):
    /// `dx =`, `dgamma +=`, `dbeta +=`.
    fn instance_norm_backward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        relu: bool,
        x: Self::View<'_>,
        y: Self::View<'_>,
        gamma: Self::View<'_>,
        mean: Self::View<'_>,
        rstd: Self::View<'_>,
        dy: Self::View<'_>,
        dx: Self::ViewMut<'_>,
        dgamma: Self::ViewMut<'_>,
        dbeta: Self::ViewMut<'_>,
    );
    /// Layer norm over the last dimension `d` of `rows` rows; saves `mean, rstd [rows]`.
    fn layer_norm_forward(
        &self,
        rows: usize,
        d: usize,
        eps: f32,
        x: Self::View<'_>,
        gamma: Self::View<'_>,
        beta: Self::View<'_>,
        y: Self::ViewMut<'_>,
        mean: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
    );
    fn layer_norm_backward(
        &self,
        rows: usize,
        d: usize,
        x: Self::View<'_>,
        gamma: Self::View<'_>,
        mean: Self::View<'_>,
        rstd: Self::View<'_>,
        dy: Self::View<'_>,
        dx: Self::ViewMut<'_>,
        dgamma: Self::ViewMut<'_>,
        dbeta: Self::ViewMut<'_>,
    );

    // ---- elementwise ----
    fn relu_forward(&self, x: Self::View<'_>, y: Self::ViewMut<'_>);
    /// `dx = dy * (y > 0)`.
    fn relu_backward(&self, y: Self::View<'_>, dy: Self::View<'_>, dx: Self::ViewMut<'_>);
    /// `y = a + b` (residual connections).
    fn add(&self, a: Self::View<'_>, b: Self::View<'_>, y: Self::ViewMut<'_>);
    /// `y += alpha * x`.
    fn axpy(&self, alpha: f32, x: Self::View<'_>, y: Self::ViewMut<'_>);
    /// `y = a * b` elementwise over `n` values (dropout masks, forward and backward). The
    /// default goes through the host so that every backend has it; backends override it.
    fn mul(&self, n: usize, a: Self::View<'_>, b: Self::View<'_>, y: Self::ViewMut<'_>) {
        let (mut ha, mut hb) = (vec![0.0f32; n], vec![0.0f32; n]);
        self.download(a, &mut ha);
        self.download(b, &mut hb);
        ha.iter_mut().zip(&hb).for_each(|(a, b)| *a *= b);
        let prod = self.upload(&ha);
        self.copy(self.view(&prod, 0..n), y);
    }
    /// `y[r, :] += bias` for every row (`bias [d]`).
    fn add_bias(&self, rows: usize, d: usize, bias: Self::View<'_>, y: Self::ViewMut<'_>);
    /// `dbias += sum over rows of dy[r, :]`.
    fn bias_backward(&self, rows: usize, d: usize, dy: Self::View<'_>, dbias: Self::ViewMut<'_>);

    // ---- pooling ----
    fn max_pool_forward(&self, s: &Pool2d, x: Self::View<'_>, y: Self::ViewMut<'_>);
    /// Routes each `dy` to the first maximal input of its window (recomputed from `x`, `y`).
    fn max_pool_backward(
        &self,
        s: &Pool2d,
        x: Self::View<'_>,
        y: Self::View<'_>,
        dy: Self::View<'_>,
        dx: Self::ViewMut<'_>,
    );
    /// `y [n, c] = mean over hw of x [n, c, hw]`.
    fn avg_pool_forward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        x: Self::View<'_>,
        y: Self::ViewMut<'_>,
    );
    fn avg_pool_backward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        dy: Self::View<'_>,
        dx: Self::ViewMut<'_>,
    );

    // ---- attention ----
    /// `out = softmax(q k^T scale) v` per (batch, head); saves the probabilities
    /// `probs [b, heads, t, t]` for backward.
    fn attention_forward(
        &self,
        s: &Attention,
        q: Self::View<'_>,
        k: Self::View<'_>,
        v: Self::View<'_>,
        probs: Self::ViewMut<'_>,
        out: Self::ViewMut<'_>,
    );
    /// `dq, dk, dv =` from `dout`.
    fn attention_backward(
        &self,
        s: &Attention,
        q: Self::View<'_>,
        k: Self::View<'_>,
        v: Self::View<'_>,
        probs: Self::View<'_>,
        dout: Self::View<'_>,
        dq: Self::ViewMut<'_>,
        dk: Self::ViewMut<'_>,
        dv: Self::ViewMut<'_>,
    );

    // ---- sequence assembly ----
    /// Tokens: `y[b, t, :] = x[b, t, :] * scale + pos[t, :] + plane[:]` (`pos [t, d]`, `plane [d]`).
    fn embed_forward(
        &self,
        b: usize,
        t: usize,
        d: usize,
        scale: f32,
        x: Self::View<'_>,
        pos: Self::View<'_>,
        plane: Self::View<'_>,
        y: Self::ViewMut<'_>,
    );
    /// `dx = dy * scale`, `dplane += sum over b, t of dy` (positions are fixed, no gradient).
    fn embed_backward(
        &self,
        b: usize,
        t: usize,
        d: usize,
        scale: f32,
        dy: Self::View<'_>,
        dx: Self::ViewMut<'_>,
        dplane: Self::ViewMut<'_>,
    );
    /// Rows `rows` (host indices into `x [rows_total, d]`; masks are drawn on the host) are
    /// replaced by `token [d]`.
    fn mask_scatter(&self, d: usize, rows: &[u32], token: Self::View<'_>, x: Self::ViewMut<'_>);
    /// `y[i, :] = x[rows[i], :]`.
    fn gather_rows(&self, d: usize, rows: &[u32], x: Self::View<'_>, y: Self::ViewMut<'_>);
    /// `dx[rows[i], :] += dy[i, :]` (rows distinct).
    fn scatter_add_rows(&self, d: usize, rows: &[u32], dy: Self::View<'_>, dx: Self::ViewMut<'_>);

    // ---- losses (the scalar loss is written into `loss[0]`) ----
    /// `loss = mean((pred - target)^2)` over all values; `dpred = 2 (pred - target) / len * scale`.
    fn mse(
        &self,
        scale: f32,
        pred: Self::View<'_>,
        target: Self::View<'_>,
        loss: Self::ViewMut<'_>,
        dpred: Self::ViewMut<'_>,
    );
    /// Triplet margin loss over `rows` triples of `d`-vectors, mean over rows:
    /// `max(0, ||a - p + eps||_2 - ||a - n + eps||_2 + margin)`, eps = 1e-6 (PyTorch's
    /// pairwise distance); writes `da, dp, dn` scaled by `scale`.
    fn triplet(
        &self,
        rows: usize,
        d: usize,
        margin: f32,
        scale: f32,
        a: Self::View<'_>,
        p: Self::View<'_>,
        n: Self::View<'_>,
        loss: Self::ViewMut<'_>,
        da: Self::ViewMut<'_>,
        dp: Self::ViewMut<'_>,
        dn: Self::ViewMut<'_>,
    );

    /// The segmentation loss: per subject, the mean softmax cross-entropy over its pixels
    /// plus `1 -` the mean soft Dice of the classes other than 0 (background), each Dice over
    /// the subject's pixels, `(2 sum p g + eps) / (sum p + sum g + eps)`; the mean over
    /// subjects is returned and `dlogits` is overwritten with its gradient. `labels` are class
    /// indices on the host. The default downloads the logits, runs the CPU reference
    /// (`cpu::loss::dice_ce`, sums in f64) and uploads the gradient, so every backend has it;
    /// a backend may replace it with a kernel.
    fn dice_ce(
        &self,
        s: &DiceCe,
        logits: Self::View<'_>,
        labels: &[u8],
        dlogits: Self::ViewMut<'_>,
    ) -> f64 {
        let len = s.len();
        let mut host = vec![0.0f32; len];
        self.download(logits, &mut host);
        let mut grad = vec![0.0f32; len];
        let loss = cpu::loss::dice_ce(s, &host, labels, &mut grad);
        let up = self.upload(&grad);
        self.copy(self.view(&up, 0..len), dlogits);
        loss
    }

    // ---- optimizer ----
    fn adam(
        &self,
        h: &Adam,
        params: Self::ViewMut<'_>,
        grads: Self::View<'_>,
        m: Self::ViewMut<'_>,
        v: Self::ViewMut<'_>,
    );
    /// Sum of squares of `x` in a fixed reduction order, returned to the host as f64.
    fn sum_squares(&self, x: Self::View<'_>) -> f64;
    /// `x *= alpha`.
    fn scale(&self, alpha: f32, x: Self::ViewMut<'_>);

    // ---- communication ----
    /// The device address of the first value of `v` when the backend keeps its buffers in
    /// GPU memory (for libraries that read and write device memory themselves, such as
    /// NCCL); None for host memory.
    fn device_address(&self, _v: Self::View<'_>) -> Option<u64> {
        None
    }
}

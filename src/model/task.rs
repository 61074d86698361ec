//! The fine-tuning model of the downstream tasks: every slice of the three planes through the
//! encoder, each plane's sequence through the transformer (as in MEVP, nothing masked), then
//! a task head. Diagnosis and brain age pool the contextualised tokens: **the mean of each
//! plane's final-norm tokens, the three planes' means concatenated** into a `[3D]` vector,
//! then one linear layer (`head.fc`) to one logit (diagnosis, binary cross-entropy) or one
//! standardised age (mean squared error). Segmentation runs the decoder of `decoder.rs` on
//! each slice with the slice's token.
use super::encoder::{self, EncoderTape};
use super::linear;
use super::objective::{Net, plane_slices};
use super::params::{ParamIndex, all, all_mut, two_mut, view};
use super::planes::Plane;
use super::transformer::{self, Segment, TransformerTape};
use crate::backend::{Backend, Gemm, MatLayout};

/// One plane of a batch after the encoder and the transformer.
pub struct PlaneTokens<B: Backend> {
    pub plane: Plane,
    /// Slices per subject in this plane.
    pub n: usize,
    /// Encoder vectors `[b * n, D]`.
    pub vectors: B::Buf,
    /// The encoder's tape (kept when the encoder is trained, and for the decoder's skips).
    pub encoder: Option<EncoderTape<B>>,
    /// Final-norm tokens `[b * n, D]`.
    pub tokens: B::Buf,
    pub transformer: TransformerTape<B>,
}

/// Runs `b` subjects `volumes [b, X, Y, Z]` through the encoder and the transformer, per
/// plane (`pos[p]`: plane p's position code `[n, D]`). `keep_encoder_tape` keeps what the
/// encoder's backward pass (or the decoder) needs.
pub fn contextualise<B: Backend>(
    be: &B,
    net: &Net,
    params: &B::Buf,
    idx: &impl ParamIndex,
    pos: &[B::Buf; 3],
    volumes: &[f32],
    b: usize,
    keep_encoder_tape: bool,
) -> [PlaneTokens<B>; 3] {
    Plane::ALL.map(|plane| {
        let (n, h, w) = plane.geometry(net.grid);
        let slices = plane_slices(be, net.grid, plane, volumes, b);
        let x = all(be, &slices);
        let (vectors, tape) = if keep_encoder_tape {
            let (v, tape) = encoder::forward(be, &net.encoder, params, idx, x, b * n, h, w);
            (v, Some(tape))
        } else {
            (
                encoder::encode(be, &net.encoder, params, idx, x, b * n, h, w),
                None,
            )
        };
        drop(slices);
        let segment = [Segment {
            plane: plane.index(),
            len: n,
            pos: all(be, &pos[plane.index()]),
        }];
        let (tokens, transformer) = transformer::forward_with(
            be,
            &net.transformer,
            params,
            idx,
            all(be, &vectors),
            b,
            &segment,
            None,
        );
        PlaneTokens {
            plane,
            n,
            vectors,
            encoder: tape,
            tokens,
            transformer,
        }
    })
}

/// Backward through the transformer of one plane from `dtokens [b * n, D]`; accumulates the
/// transformer's gradients and returns the gradient at the encoder vectors.
pub fn transformer_backward<B: Backend>(
    be: &B,
    net: &Net,
    params: &B::Buf,
    grads: &mut B::Buf,
    idx: &impl ParamIndex,
    planes: &PlaneTokens<B>,
    dtokens: B::View<'_>,
) -> B::Buf {
    transformer::backward(
        be,
        &net.transformer,
        params,
        grads,
        idx,
        &planes.transformer,
        dtokens,
    )
}

/// `c_i [1, d] (+)= alpha * ones [1, n] x_i [n, d]` for `b` matrices, or its transpose
/// (`dx_i [n, d] = alpha * ones [n, 1] dc_i [1, d]`): the plane mean and its gradient as one
/// strided batched GEMM each. `ld_c` is the row pitch of the pooled matrix (3D: the three
/// planes side by side).
fn mean_gemm(b: usize, n: usize, d: usize, ld_c: usize, backward: bool) -> Gemm {
    let ones = MatLayout {
        trans: false,
        ld: if backward { 1 } else { n },
        stride: 0,
    };
    let tokens = MatLayout {
        trans: false,
        ld: d,
        stride: n * d,
    };
    let pooled = MatLayout {
        trans: false,
        ld: ld_c,
        stride: ld_c,
    };
    let alpha = 1.0 / n as f32;
    if backward {
        Gemm {
            m: n,
            n: d,
            k: 1,
            batch: b,
            alpha,
            beta: 0.0,
            a: ones,
            b: pooled,
            c: tokens,
        }
    } else {
        Gemm {
            m: 1,
            n: d,
            k: n,
            batch: b,
            alpha,
            beta: 0.0,
            a: ones,
            b: tokens,
            c: pooled,
        }
    }
}

/// The pooled vectors `[b, 3D]`: per subject, each plane's mean token, axial | sagittal |
/// coronal.
pub fn pool<B: Backend>(be: &B, d: usize, planes: &[PlaneTokens<B>; 3], b: usize) -> B::Buf {
    let mut pooled = be.zeros(b * 3 * d);
    let n_max = planes.iter().map(|p| p.n).max().unwrap_or(0);
    let ones = be.upload(&vec![1.0; n_max]);
    for (p, pl) in planes.iter().enumerate() {
        let g = mean_gemm(b, pl.n, d, 3 * d, false);
        let len = be.len(&pooled);
        be.gemm(
            &g,
            all(be, &ones),
            all(be, &pl.tokens),
            be.view_mut(&mut pooled, p * d..len),
        );
    }
    pooled
}

/// The gradient of [`pool`]: each plane's token gradient `[b * n, D]` from `dpooled [b, 3D]`.
pub fn pool_backward<B: Backend>(
    be: &B,
    d: usize,
    planes: &[PlaneTokens<B>; 3],
    b: usize,
    dpooled: &B::Buf,
) -> [B::Buf; 3] {
    let n_max = planes.iter().map(|p| p.n).max().unwrap_or(0);
    let ones = be.upload(&vec![1.0; n_max]);
    let len = be.len(dpooled);
    let mut k = 0;
    [(); 3].map(|()| {
        let pl = &planes[k];
        let g = mean_gemm(b, pl.n, d, 3 * d, true);
        let mut dtokens = be.zeros(b * pl.n * d);
        be.gemm(
            &g,
            all(be, &ones),
            be.view(dpooled, k * d..len),
            all_mut(be, &mut dtokens),
        );
        k += 1;
        dtokens
    })
}

/// What a scalar head is trained for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scalar {
    /// Binary classification: the output is a logit, the loss binary cross-entropy with
    /// targets 0 or 1.
    Logit,
    /// Regression: the output is the standardised target, the loss its squared error.
    Value,
}

/// Loss of one subject's output `y` against target `t`, and its derivative in `y`.
pub fn scalar_loss(kind: Scalar, y: f64, t: f64) -> (f64, f64) {
    match kind {
        // log(1 + e^y) - t y, written to stay finite for large |y|.
        Scalar::Logit => {
            let softplus = y.max(0.0) + (-y.abs()).exp().ln_1p();
            let p = 1.0 / (1.0 + (-y).exp());
            (softplus - t * y, p - t)
        }
        Scalar::Value => ((y - t) * (y - t), 2.0 * (y - t)),
    }
}

/// Forward (and, with `grads`, backward) of the scalar-head model on `b` subjects: returns the
/// mean loss over the batch and each subject's output (a logit, or a standardised value).
/// `train_encoder` false leaves the encoder's gradients alone (a frozen encoder).
pub fn scalar_head<B: Backend>(
    be: &B,
    net: &Net,
    params: &B::Buf,
    grads: Option<&mut B::Buf>,
    idx: &impl ParamIndex,
    pos: &[B::Buf; 3],
    volumes: &[f32],
    targets: &[f32],
    kind: Scalar,
    train_encoder: bool,
) -> (f64, Vec<f64>) {
    let b = targets.len();
    let d = net.transformer.d;
    let planes = contextualise(
        be,
        net,
        params,
        idx,
        pos,
        volumes,
        b,
        grads.is_some() && train_encoder,
    );
    let pooled = pool(be, d, &planes, b);
    let mut out = be.zeros(b);
    linear::forward(
        be,
        b,
        3 * d,
        1,
        all(be, &pooled),
        view(be, params, idx, "head.fc.weight"),
        view(be, params, idx, "head.fc.bias"),
        all_mut(be, &mut out),
    );
    // Element by element through `scalar` (f64 on an f64 backend, so gradient checks see
    // the loss at full precision); b values only.
    let y: Vec<f64> = (0..b).map(|i| be.scalar(be.view(&out, i..i + 1))).collect();
    let mut loss = 0.0;
    let mut dy = vec![0.0; b];
    for i in 0..b {
        let (l, g) = scalar_loss(kind, y[i], f64::from(targets[i]));
        loss += l / b as f64;
        dy[i] = (g / b as f64) as f32;
    }
    if let Some(grads) = grads {
        let dout = be.upload(&dy);
        let mut dpooled = be.zeros(b * 3 * d);
        {
            let (dw, db) = two_mut(be, grads, idx, "head.fc.weight", "head.fc.bias");
            linear::backward(
                be,
                b,
                3 * d,
                1,
                all(be, &pooled),
                view(be, params, idx, "head.fc.weight"),
                all(be, &dout),
                Some(all_mut(be, &mut dpooled)),
                dw,
                db,
            );
        }
        let dtokens = pool_backward(be, d, &planes, b, &dpooled);
        let dvectors: Vec<B::Buf> = planes
            .iter()
            .zip(&dtokens)
            .map(|(pl, dt)| transformer_backward(be, net, params, grads, idx, pl, all(be, dt)))
            .collect();
        if train_encoder {
            for (pl, dv) in planes.iter().zip(&dvectors) {
                let tape = pl.encoder.as_ref().expect("encoder tape kept for training");
                encoder::backward(be, &net.encoder, params, grads, idx, tape, all(be, dv));
            }
        }
    }
    (loss, y)
}

//! The transformer over slice vectors: tokens (vector x sqrt(D) + position code + plane
//! embedding), pre-LayerNorm layers of multi-head attention and a ReLU feed-forward, a final
//! LayerNorm. Forward keeps a tape; backward returns the gradient at the input vectors and
//! accumulates parameter gradients in layout order (final norm first, plane embedding last).
//!
//! A sequence is one plane's slices (the paper) or, with the joint-sequence option, the three
//! planes' slices one after the other ([`Segment`]s): each token gets its own plane's
//! embedding and its position within its plane.
//!
//! Dropout (optional, [`DropoutMasks`]) sits where PyTorch's pre-LN
//! `nn.TransformerEncoderLayer` has its `dropout1` and `dropout2`: on the attention branch
//! after the output projection and on the feed-forward branch after `fc2`, each before its
//! residual add. (PyTorch's extra dropouts on the attention probabilities and inside the
//! feed-forward block are not modelled.) Inverted dropout: kept values are scaled by
//! 1/(1-p), so evaluation needs no rescaling; the multipliers stay on the tape for backward.
use super::linear;
use super::params::{ParamIndex, all, all_mut, two_mut, view};
use crate::backend::{Attention, Backend};

/// The transformer's shape, from the model config.
#[derive(Clone, Debug, PartialEq)]
pub struct TransformerSpec {
    pub d: usize,
    pub layers: usize,
    pub heads: usize,
    pub head_width: usize,
    pub ffn: usize,
    pub eps: f32,
}

impl TransformerSpec {
    fn inner(&self) -> usize {
        self.heads * self.head_width
    }
}

/// Saved LayerNorm input statistics and output.
struct Norm<B: Backend> {
    input: B::Buf,
    out: B::Buf,
    mean: B::Buf,
    rstd: B::Buf,
}

struct Layer<B: Backend> {
    ln1: Norm<B>,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    probs: B::Buf,
    att: B::Buf,
    ln2: Norm<B>,
    /// fc1 output after ReLU.
    hidden: B::Buf,
}

/// A run of `len` consecutive tokens of plane `plane` (0 axial, 1 sagittal, 2 coronal) in
/// every sequence, with its fixed position code `pos [len, d]`.
pub struct Segment<'a, B: Backend + 'a> {
    pub plane: usize,
    pub len: usize,
    pub pos: B::View<'a>,
}

/// Inverted-dropout multipliers of one forward pass, each value 0 (dropped) or 1/(1-p):
/// per layer, `[attention branch, feed-forward branch]`, each `[b*t, d]`. Drawn by the caller
/// (objective.rs keys them by seed, step, subject and purpose), kept on the tape.
pub struct DropoutMasks<B: Backend> {
    pub layers: Vec<[B::Buf; 2]>,
}

/// Everything backward needs from one forward pass over `b` sequences of `t` tokens.
pub struct TransformerTape<B: Backend> {
    b: usize,
    t: usize,
    /// (plane, tokens) of each segment of a sequence, in order.
    segments: Vec<(usize, usize)>,
    layers: Vec<Layer<B>>,
    final_ln: Norm<B>,
    dropout: Option<DropoutMasks<B>>,
}

fn layer_norm<B: Backend>(
    be: &B,
    params: &B::Buf,
    idx: &impl ParamIndex,
    name: &str,
    rows: usize,
    d: usize,
    eps: f32,
    input: B::Buf,
) -> Norm<B> {
    let mut out = be.zeros(rows * d);
    let mut mean = be.zeros(rows);
    let mut rstd = be.zeros(rows);
    be.layer_norm_forward(
        rows,
        d,
        eps,
        all(be, &input),
        view(be, params, idx, &format!("{name}.gamma")),
        view(be, params, idx, &format!("{name}.beta")),
        all_mut(be, &mut out),
        all_mut(be, &mut mean),
        all_mut(be, &mut rstd),
    );
    Norm {
        input,
        out,
        mean,
        rstd,
    }
}

/// Backward of a LayerNorm: returns `dinput`, accumulates gamma and beta gradients.
fn layer_norm_backward<B: Backend>(
    be: &B,
    params: &B::Buf,
    grads: &mut B::Buf,
    idx: &impl ParamIndex,
    name: &str,
    rows: usize,
    d: usize,
    n: &Norm<B>,
    dout: B::View<'_>,
) -> B::Buf {
    let mut dx = be.zeros(rows * d);
    let (dg, db) = two_mut(
        be,
        grads,
        idx,
        &format!("{name}.gamma"),
        &format!("{name}.beta"),
    );
    be.layer_norm_backward(
        rows,
        d,
        all(be, &n.input),
        view(be, params, idx, &format!("{name}.gamma")),
        all(be, &n.mean),
        all(be, &n.rstd),
        dout,
        all_mut(be, &mut dx),
        dg,
        db,
    );
    dx
}

fn linear_forward<B: Backend>(
    be: &B,
    params: &B::Buf,
    idx: &impl ParamIndex,
    name: &str,
    rows: usize,
    din: usize,
    dout: usize,
    x: B::View<'_>,
) -> B::Buf {
    let mut y = be.zeros(rows * dout);
    linear::forward(
        be,
        rows,
        din,
        dout,
        x,
        view(be, params, idx, &format!("{name}.weight")),
        view(be, params, idx, &format!("{name}.bias")),
        all_mut(be, &mut y),
    );
    y
}

fn linear_backward<B: Backend>(
    be: &B,
    params: &B::Buf,
    grads: &mut B::Buf,
    idx: &impl ParamIndex,
    name: &str,
    rows: usize,
    din: usize,
    dout: usize,
    x: B::View<'_>,
    dy: B::View<'_>,
) -> B::Buf {
    let mut dx = be.zeros(rows * din);
    let (dw, db) = two_mut(
        be,
        grads,
        idx,
        &format!("{name}.weight"),
        &format!("{name}.bias"),
    );
    linear::backward(
        be,
        rows,
        din,
        dout,
        x,
        view(be, params, idx, &format!("{name}.weight")),
        dy,
        Some(all_mut(be, &mut dx)),
        dw,
        db,
    );
    dx
}

fn plane_range(idx: &impl ParamIndex, plane: usize, d: usize) -> std::ops::Range<usize> {
    let r = idx.range_of("transformer.plane_embedding");
    r.start + plane * d..r.start + (plane + 1) * d
}

/// Runs `b` sequences of `t` vectors `x [b*t, d]` of plane `plane` (0 axial, 1 sagittal,
/// 2 coronal) through the transformer; `pos [t, d]` is the fixed position code. Returns the
/// final-norm output `[b*t, d]` and the tape. (One segment, no dropout: the paper's model.)
pub fn forward<B: Backend>(
    be: &B,
    spec: &TransformerSpec,
    params: &B::Buf,
    idx: &impl ParamIndex,
    x: B::View<'_>,
    b: usize,
    t: usize,
    plane: usize,
    pos: B::View<'_>,
) -> (B::Buf, TransformerTape<B>) {
    let seg = [Segment { plane, len: t, pos }];
    forward_with(be, spec, params, idx, x, b, &seg, None)
}

/// `v * mask` when a dropout mask is given, else `v` unchanged.
fn masked<B: Backend>(be: &B, v: B::Buf, mask: Option<&B::Buf>) -> B::Buf {
    match mask {
        None => v,
        Some(m) => {
            let n = be.len(&v);
            let mut y = be.zeros(n);
            be.mul(n, all(be, &v), all(be, m), all_mut(be, &mut y));
            y
        }
    }
}

/// `dy * mask`: the gradient through a dropout.
fn masked_grad<B: Backend>(be: &B, dy: &B::Buf, mask: &B::Buf) -> B::Buf {
    let n = be.len(dy);
    let mut y = be.zeros(n);
    be.mul(n, all(be, dy), all(be, mask), all_mut(be, &mut y));
    y
}

/// The general forward pass: `b` sequences made of `segments` (their lengths sum to the
/// sequence length `t`), `x [b*t, d]`, with optional dropout multipliers.
pub fn forward_with<B: Backend>(
    be: &B,
    spec: &TransformerSpec,
    params: &B::Buf,
    idx: &impl ParamIndex,
    x: B::View<'_>,
    b: usize,
    segments: &[Segment<'_, B>],
    dropout: Option<DropoutMasks<B>>,
) -> (B::Buf, TransformerTape<B>) {
    let t: usize = segments.iter().map(|s| s.len).sum();
    let (d, inner, rows) = (spec.d, spec.inner(), b * t);
    if let Some(m) = &dropout {
        assert_eq!(
            m.layers.len(),
            spec.layers,
            "one pair of dropout masks per layer"
        );
        for pair in &m.layers {
            assert!(
                pair.iter().all(|m| be.len(m) == rows * d),
                "dropout mask shape"
            );
        }
    }
    let scale = (d as f32).sqrt();
    let mut h = be.zeros(rows * d);
    if let [seg] = segments {
        be.embed_forward(
            b,
            t,
            d,
            scale,
            x,
            seg.pos,
            be.view(params, plane_range(idx, seg.plane, d)),
            all_mut(be, &mut h),
        );
    } else {
        // Each (sequence, segment) is a block of consecutive rows with one plane embedding.
        let mut xb = be.zeros(rows * d);
        be.copy(x, all_mut(be, &mut xb));
        for s in 0..b {
            let mut start = s * t;
            for seg in segments {
                let r = start * d..(start + seg.len) * d;
                be.embed_forward(
                    1,
                    seg.len,
                    d,
                    scale,
                    be.view(&xb, r.clone()),
                    seg.pos,
                    be.view(params, plane_range(idx, seg.plane, d)),
                    be.view_mut(&mut h, r),
                );
                start += seg.len;
            }
        }
    }
    let att_shape = Attention {
        b,
        t,
        heads: spec.heads,
        dh: spec.head_width,
        scale: 1.0 / (spec.head_width as f32).sqrt(),
    };
    let mut layers = Vec::with_capacity(spec.layers);
    for l in 1..=spec.layers {
        let p = format!("transformer.l{l}");
        let ln1 = layer_norm(be, params, idx, &format!("{p}.ln1"), rows, d, spec.eps, h);
        let proj = |name: &str| {
            linear_forward(
                be,
                params,
                idx,
                &format!("{p}.attn.{name}"),
                rows,
                d,
                inner,
                all(be, &ln1.out),
            )
        };
        let (q, k, v) = (proj("q"), proj("k"), proj("v"));
        let mut probs = be.zeros(b * spec.heads * t * t);
        let mut att = be.zeros(rows * inner);
        be.attention_forward(
            &att_shape,
            all(be, &q),
            all(be, &k),
            all(be, &v),
            all_mut(be, &mut probs),
            all_mut(be, &mut att),
        );
        let o = linear_forward(
            be,
            params,
            idx,
            &format!("{p}.attn.out"),
            rows,
            inner,
            d,
            all(be, &att),
        );
        let mask = dropout.as_ref().map(|m| &m.layers[l - 1]);
        let o = masked(be, o, mask.map(|m| &m[0]));
        let mut x1 = be.zeros(rows * d);
        be.add(all(be, &ln1.input), all(be, &o), all_mut(be, &mut x1));
        let ln2 = layer_norm(be, params, idx, &format!("{p}.ln2"), rows, d, spec.eps, x1);
        let pre = linear_forward(
            be,
            params,
            idx,
            &format!("{p}.ffn.fc1"),
            rows,
            d,
            spec.ffn,
            all(be, &ln2.out),
        );
        let mut hidden = be.zeros(rows * spec.ffn);
        be.relu_forward(all(be, &pre), all_mut(be, &mut hidden));
        let f = linear_forward(
            be,
            params,
            idx,
            &format!("{p}.ffn.fc2"),
            rows,
            spec.ffn,
            d,
            all(be, &hidden),
        );
        let f = masked(be, f, mask.map(|m| &m[1]));
        let mut x2 = be.zeros(rows * d);
        be.add(all(be, &ln2.input), all(be, &f), all_mut(be, &mut x2));
        h = x2;
        layers.push(Layer {
            ln1,
            q,
            k,
            v,
            probs,
            att,
            ln2,
            hidden,
        });
    }
    let final_ln = layer_norm(
        be,
        params,
        idx,
        "transformer.final_ln",
        rows,
        d,
        spec.eps,
        h,
    );
    let mut out = be.zeros(rows * d);
    be.copy(all(be, &final_ln.out), all_mut(be, &mut out));
    let tape = TransformerTape {
        b,
        t,
        segments: segments.iter().map(|s| (s.plane, s.len)).collect(),
        layers,
        final_ln,
        dropout,
    };
    (out, tape)
}

/// Backward from `dout [b*t, d]`: accumulates every transformer parameter gradient and
/// returns the gradient at the input vectors `x`.
pub fn backward<B: Backend>(
    be: &B,
    spec: &TransformerSpec,
    params: &B::Buf,
    grads: &mut B::Buf,
    idx: &impl ParamIndex,
    tape: &TransformerTape<B>,
    dout: B::View<'_>,
) -> B::Buf {
    let (d, inner, rows) = (spec.d, spec.inner(), tape.b * tape.t);
    let mut dh = layer_norm_backward(
        be,
        params,
        grads,
        idx,
        "transformer.final_ln",
        rows,
        d,
        &tape.final_ln,
        dout,
    );
    let att_shape = Attention {
        b: tape.b,
        t: tape.t,
        heads: spec.heads,
        dh: spec.head_width,
        scale: 1.0 / (spec.head_width as f32).sqrt(),
    };
    for (i, layer) in tape.layers.iter().enumerate().rev() {
        let p = format!("transformer.l{}", i + 1);
        let mask = tape.dropout.as_ref().map(|m| &m.layers[i]);
        // Feed-forward branch: x2 = x1 + drop(fc2(relu(fc1(ln2(x1))))).
        let dffn = mask.map(|m| masked_grad(be, &dh, &m[1]));
        let dhidden = linear_backward(
            be,
            params,
            grads,
            idx,
            &format!("{p}.ffn.fc2"),
            rows,
            spec.ffn,
            d,
            all(be, &layer.hidden),
            all(be, dffn.as_ref().unwrap_or(&dh)),
        );
        let mut dpre = be.zeros(rows * spec.ffn);
        be.relu_backward(
            all(be, &layer.hidden),
            all(be, &dhidden),
            all_mut(be, &mut dpre),
        );
        let dn2 = linear_backward(
            be,
            params,
            grads,
            idx,
            &format!("{p}.ffn.fc1"),
            rows,
            d,
            spec.ffn,
            all(be, &layer.ln2.out),
            all(be, &dpre),
        );
        let dx1_ln = layer_norm_backward(
            be,
            params,
            grads,
            idx,
            &format!("{p}.ln2"),
            rows,
            d,
            &layer.ln2,
            all(be, &dn2),
        );
        let mut dx1 = be.zeros(rows * d);
        be.add(all(be, &dh), all(be, &dx1_ln), all_mut(be, &mut dx1));
        // Attention branch: x1 = x0 + drop(out(attention(q, k, v of ln1(x0)))).
        let dattn = mask.map(|m| masked_grad(be, &dx1, &m[0]));
        let datt = linear_backward(
            be,
            params,
            grads,
            idx,
            &format!("{p}.attn.out"),
            rows,
            inner,
            d,
            all(be, &layer.att),
            all(be, dattn.as_ref().unwrap_or(&dx1)),
        );
        let (mut dq, mut dk, mut dv) = (
            be.zeros(rows * inner),
            be.zeros(rows * inner),
            be.zeros(rows * inner),
        );
        be.attention_backward(
            &att_shape,
            all(be, &layer.q),
            all(be, &layer.k),
            all(be, &layer.v),
            all(be, &layer.probs),
            all(be, &datt),
            all_mut(be, &mut dq),
            all_mut(be, &mut dk),
            all_mut(be, &mut dv),
        );
        // v, k, q: the layout order.
        let mut dn1 = be.zeros(rows * d);
        for (name, dproj) in [("v", &dv), ("k", &dk), ("q", &dq)] {
            let part = linear_backward(
                be,
                params,
                grads,
                idx,
                &format!("{p}.attn.{name}"),
                rows,
                d,
                inner,
                all(be, &layer.ln1.out),
                all(be, dproj),
            );
            be.axpy(1.0, all(be, &part), all_mut(be, &mut dn1));
        }
        let dx0_ln = layer_norm_backward(
            be,
            params,
            grads,
            idx,
            &format!("{p}.ln1"),
            rows,
            d,
            &layer.ln1,
            all(be, &dn1),
        );
        let mut dx0 = be.zeros(rows * d);
        be.add(all(be, &dx1), all(be, &dx0_ln), all_mut(be, &mut dx0));
        dh = dx0;
    }
    let mut dx = be.zeros(rows * d);
    let scale = (d as f32).sqrt();
    if let [(plane, _)] = tape.segments[..] {
        be.embed_backward(
            tape.b,
            tape.t,
            d,
            scale,
            all(be, &dh),
            all_mut(be, &mut dx),
            be.view_mut(grads, plane_range(idx, plane, d)),
        );
    } else {
        for s in 0..tape.b {
            let mut start = s * tape.t;
            for &(plane, len) in &tape.segments {
                let r = start * d..(start + len) * d;
                be.embed_backward(
                    1,
                    len,
                    d,
                    scale,
                    be.view(&dh, r.clone()),
                    be.view_mut(&mut dx, r),
                    be.view_mut(grads, plane_range(idx, plane, d)),
                );
                start += len;
            }
        }
    }
    dx
}

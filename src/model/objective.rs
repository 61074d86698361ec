//! The two pretraining objectives over a batch of subjects, summed over the three planes:
//! masked encoding vector prediction (MEVP: encoder frozen, gradients reach the transformer
//! only; or, as an option, encoder trained too with detached targets) and the triplet loss
//! (encoder only). Both return the loss and, when given a gradient buffer, accumulate into it.
use super::encoder::{self, EncoderSpec};
use super::params::{ParamIndex, all, all_mut};
use super::planes::Plane;
use super::transformer::{self, DropoutMasks, Segment, TransformerSpec};
use crate::backend::Backend;
use crate::rng;

/// The network's shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct Net {
    pub grid: [usize; 3],
    pub encoder: EncoderSpec,
    pub transformer: TransformerSpec,
}

impl Net {
    /// The shapes of a model configuration.
    pub fn new(cfg: &crate::model::ModelConfig) -> Self {
        Net {
            grid: cfg.grid,
            encoder: EncoderSpec {
                widths: cfg.widths.clone(),
                d: cfg.d,
                eps: cfg.norm_eps,
            },
            transformer: TransformerSpec {
                d: cfg.d,
                layers: cfg.layers,
                heads: cfg.heads,
                head_width: cfg.head_width,
                ffn: cfg.ffn,
                eps: cfg.norm_eps,
            },
        }
    }
}

fn scalar<B: Backend>(be: &B, buf: &B::Buf) -> f64 {
    be.scalar(be.view(buf, 0..1))
}

/// The slices of plane `plane` of `b` subjects `volumes [b, X, Y, Z]`, uploaded.
pub(crate) fn plane_slices<B: Backend>(
    be: &B,
    grid: [usize; 3],
    plane: Plane,
    volumes: &[f32],
    b: usize,
) -> B::Buf {
    let per = grid.iter().product::<usize>();
    let (n, h, w) = plane.geometry(grid);
    let mut host = Vec::with_capacity(b * n * h * w);
    for s in 0..b {
        plane.extract(&volumes[s * per..(s + 1) * per], grid, &mut host);
    }
    be.upload(&host)
}

/// Encoder vectors `[b * slices, D]` of every slice of one plane (no tape kept).
pub fn encode_plane<B: Backend>(
    be: &B,
    net: &Net,
    params: &B::Buf,
    idx: &impl ParamIndex,
    plane: Plane,
    volumes: &[f32],
    b: usize,
) -> B::Buf {
    let (n, h, w) = plane.geometry(net.grid);
    let slices = plane_slices(be, net.grid, plane, volumes, b);
    encoder::encode(be, &net.encoder, params, idx, all(be, &slices), b * n, h, w)
}

/// The [MASK] vector of a plane: the encoder's vector of a constant -1 slice.
pub fn mask_token<B: Backend>(
    be: &B,
    net: &Net,
    params: &B::Buf,
    idx: &impl ParamIndex,
    plane: Plane,
) -> B::Buf {
    let (_, h, w) = plane.geometry(net.grid);
    let image = be.upload(&vec![-1.0; h * w]);
    encoder::encode(be, &net.encoder, params, idx, all(be, &image), 1, h, w)
}

/// The masked positions of one subject, per plane (sorted indices into that plane's slices).
pub type Masks = [Vec<u32>; 3];

/// Dropout during a training step: the probability and the keys its masks are drawn from.
/// Every multiplier is a function of (seed, key, subject, layer, purpose), so a resumed run
/// draws the same masks and nothing depends on the world size.
#[derive(Clone, Debug, PartialEq)]
pub struct DropoutDraw {
    pub p: f32,
    pub seed: u64,
    /// The step's key (the run passes the epoch: a subject is seen once per epoch).
    pub key: u64,
    /// Global corpus index of each subject of the batch, in batch order.
    pub subjects: Vec<u64>,
}

/// The MEVP options the paper leaves open. `Default` is the paper's model: per-plane
/// sequences, no dropout.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MevpOptions {
    /// One sequence of the three planes' tokens per subject (axial, sagittal, coronal, each
    /// with its plane embedding and its positions within its plane) instead of three.
    pub joint: bool,
    /// Dropout masks for a training step; `None` (or p = 0) runs without dropout.
    pub dropout: Option<DropoutDraw>,
}

/// The inverted-dropout multipliers of `b` sequences of `t` tokens (`name`: the plane, or
/// `joint`), or `None` when p is 0.
fn dropout_masks<B: Backend>(
    be: &B,
    spec: &TransformerSpec,
    draw: &DropoutDraw,
    b: usize,
    t: usize,
    name: &str,
) -> Option<DropoutMasks<B>> {
    if draw.p <= 0.0 {
        return None;
    }
    assert_eq!(draw.subjects.len(), b, "one dropout key per subject");
    let (p, keep) = (f64::from(draw.p), 1.0 / (1.0 - draw.p));
    let per = t * spec.d;
    let layers = (1..=spec.layers as u64)
        .map(|l| {
            ["attn", "ffn"].map(|site| {
                let mut host = Vec::with_capacity(b * per);
                for &s in &draw.subjects {
                    let mut r = rng::keyed(
                        draw.seed,
                        &[draw.key, s, l],
                        &format!("dropout-{site}-{name}"),
                    );
                    host.extend((0..per).map(|_| if rng::unit(&mut r) < p { 0.0 } else { keep }));
                }
                be.upload(&host)
            })
        })
        .collect();
    Some(DropoutMasks { layers })
}

/// Gradients at the MEVP inputs, per plane: at the slice vectors `[b * slices, D]` (zero at
/// masked positions, which saw the [MASK] vector instead) and at the [MASK] vector `[D]`.
type InputGrads<B> = ([<B as Backend>::Buf; 3], [<B as Backend>::Buf; 3]);

/// The MEVP loss over sequences built from `inputs` (masked positions replaced by `tokens`),
/// compared with `targets` (never differentiated: detached). Accumulates transformer
/// gradients when `grads` is given, and returns the gradients at the inputs when asked.
fn mevp_core<B: Backend>(
    be: &B,
    net: &Net,
    params: &B::Buf,
    mut grads: Option<&mut B::Buf>,
    idx: &impl ParamIndex,
    inputs: [&B::Buf; 3],
    targets: [&B::Buf; 3],
    tokens: [&B::Buf; 3],
    pos: &[B::Buf; 3],
    masks: &[Masks],
    opts: &MevpOptions,
    want_input_grads: bool,
) -> (f64, Option<InputGrads<B>>) {
    let d = net.transformer.d;
    let b = masks.len();
    let want_input_grads = want_input_grads && grads.is_some();
    let groups: Vec<Vec<Plane>> = if opts.joint {
        vec![Plane::ALL.to_vec()]
    } else {
        Plane::ALL.iter().map(|&p| vec![p]).collect()
    };
    let mut dinputs: [Option<B::Buf>; 3] = [None, None, None];
    let mut dtokens: [Option<B::Buf>; 3] = [None, None, None];
    let mut total = 0.0;
    let last_group = groups.len().saturating_sub(1);
    for (g, group) in groups.into_iter().enumerate() {
        let ns: Vec<usize> = group.iter().map(|p| p.geometry(net.grid).0).collect();
        let t: usize = ns.iter().sum();
        // Per plane of the group: the sequence rows holding its slices (in the plane's row
        // order s*n + i), and its masked rows as (plane row, sequence row) lists.
        let mut seq_rows = Vec::new();
        let mut masked = Vec::new();
        let mut off = 0;
        for (&plane, &n) in group.iter().zip(&ns) {
            let p = plane.index();
            seq_rows.push(
                (0..b)
                    .flat_map(|s| (0..n).map(move |i| (s * t + off + i) as u32))
                    .collect::<Vec<u32>>(),
            );
            let plane_rows: Vec<u32> = masks
                .iter()
                .enumerate()
                .flat_map(|(s, m)| m[p].iter().map(move |&i| (s * n) as u32 + i))
                .collect();
            let rows: Vec<u32> = masks
                .iter()
                .enumerate()
                .flat_map(|(s, m)| m[p].iter().map(move |&i| (s * t + off) as u32 + i))
                .collect();
            masked.push((plane_rows, rows));
            off += n;
        }
        if masked.iter().all(|(r, _)| r.is_empty()) {
            continue;
        }
        let mut input = be.zeros(b * t * d);
        if let [plane] = group[..] {
            be.copy(all(be, inputs[plane.index()]), all_mut(be, &mut input));
        } else {
            for (plane, rows) in group.iter().zip(&seq_rows) {
                let src = all(be, inputs[plane.index()]);
                be.scatter_add_rows(d, rows, src, all_mut(be, &mut input));
            }
        }
        for (plane, (_, rows)) in group.iter().zip(&masked) {
            if !rows.is_empty() {
                let token = all(be, tokens[plane.index()]);
                be.mask_scatter(d, rows, token, all_mut(be, &mut input));
            }
        }
        let segments: Vec<Segment<'_, B>> = group
            .iter()
            .zip(&ns)
            .map(|(plane, &len)| Segment {
                plane: plane.index(),
                len,
                pos: all(be, &pos[plane.index()]),
            })
            .collect();
        let name = if let [plane] = group[..] {
            plane.name()
        } else {
            "joint"
        };
        let dropout = opts
            .dropout
            .as_ref()
            .and_then(|draw| dropout_masks(be, &net.transformer, draw, b, t, name));
        let (out, tape) = transformer::forward_with(
            be,
            &net.transformer,
            params,
            idx,
            all(be, &input),
            b,
            &segments,
            dropout,
        );
        let mut dout = grads.is_some().then(|| be.zeros(b * t * d));
        for (plane, (plane_rows, rows)) in group.iter().zip(&masked) {
            if rows.is_empty() {
                continue;
            }
            let m = rows.len();
            let (mut pred, mut target) = (be.zeros(m * d), be.zeros(m * d));
            be.gather_rows(d, rows, all(be, &out), all_mut(be, &mut pred));
            let tgt = all(be, targets[plane.index()]);
            be.gather_rows(d, plane_rows, tgt, all_mut(be, &mut target));
            let (mut loss, mut dpred) = (be.zeros(1), be.zeros(m * d));
            be.mse(
                1.0,
                all(be, &pred),
                all(be, &target),
                all_mut(be, &mut loss),
                all_mut(be, &mut dpred),
            );
            total += scalar(be, &loss);
            if let Some(dout) = dout.as_mut() {
                be.scatter_add_rows(d, rows, all(be, &dpred), all_mut(be, dout));
            }
        }
        if let (Some(grads), Some(dout)) = (grads.as_deref_mut(), dout) {
            // With a frozen encoder this is the step's last backward pass; a trainable one
            // runs its encoder passes after this (see mevp_trainable).
            if g == last_group && !want_input_grads {
                idx.last_pass();
            }
            let dx = transformer::backward(
                be,
                &net.transformer,
                params,
                grads,
                idx,
                &tape,
                all(be, &dout),
            );
            if want_input_grads {
                for ((plane, rows), (plane_rows, masked_rows)) in
                    group.iter().zip(&seq_rows).zip(&masked)
                {
                    let p = plane.index();
                    let mut dv = be.zeros(rows.len() * d);
                    be.gather_rows(d, rows, all(be, &dx), all_mut(be, &mut dv));
                    let mut dt = be.zeros(d);
                    let m = masked_rows.len();
                    if m > 0 {
                        // A masked position saw the [MASK] vector: its gradient goes there.
                        let mut dm = be.zeros(m * d);
                        be.gather_rows(d, masked_rows, all(be, &dx), all_mut(be, &mut dm));
                        be.bias_backward(m, d, all(be, &dm), all_mut(be, &mut dt));
                        let zero = be.zeros(d);
                        be.mask_scatter(d, plane_rows, all(be, &zero), all_mut(be, &mut dv));
                    }
                    dinputs[p] = Some(dv);
                    dtokens[p] = Some(dt);
                }
            }
        }
    }
    let back = want_input_grads.then(|| {
        let mut k = 0;
        let dv = dinputs.map(|g| {
            let n = Plane::ALL[k].geometry(net.grid).0;
            k += 1;
            g.unwrap_or_else(|| be.zeros(b * n * d))
        });
        (dv, dtokens.map(|g| g.unwrap_or_else(|| be.zeros(d))))
    });
    (total, back)
}

/// MEVP loss of `b` subjects (sum over planes of the mean squared error over masked
/// positions and components), with the encoder frozen. `targets[p]` are the encoder vectors
/// of plane p (from [`encode_plane`], or a cache: they never change while the encoder is
/// frozen); `tokens[p]` the [MASK] vectors; `pos[p]` the position codes `[slices, D]`.
pub fn mevp<B: Backend>(
    be: &B,
    net: &Net,
    params: &B::Buf,
    grads: Option<&mut B::Buf>,
    idx: &impl ParamIndex,
    targets: &[B::Buf; 3],
    tokens: &[B::Buf; 3],
    pos: &[B::Buf; 3],
    masks: &[Masks],
) -> f64 {
    let opts = MevpOptions::default();
    mevp_with(
        be, net, params, grads, idx, targets, tokens, pos, masks, &opts,
    )
}

/// [`mevp`] (encoder frozen: gradients reach the transformer only) with the options the
/// paper leaves open: joint sequence, dropout.
pub fn mevp_with<B: Backend>(
    be: &B,
    net: &Net,
    params: &B::Buf,
    grads: Option<&mut B::Buf>,
    idx: &impl ParamIndex,
    targets: &[B::Buf; 3],
    tokens: &[B::Buf; 3],
    pos: &[B::Buf; 3],
    masks: &[Masks],
    opts: &MevpOptions,
) -> f64 {
    let t = targets.each_ref();
    let (loss, _) = mevp_core(
        be,
        net,
        params,
        grads,
        idx,
        t,
        t,
        tokens.each_ref(),
        pos,
        masks,
        opts,
        false,
    );
    loss
}

/// MEVP with the encoder trained too (`trainable_encoder_in_mevp`): the input vectors of
/// `volumes [b, X, Y, Z]` come from the encoder with its tape kept, and gradients flow back
/// through the transformer into the encoder (`grads` accumulates both parts). The targets are
/// the same vectors detached: the loss never differentiates them (otherwise a constant
/// encoder would drive the loss to zero). `fixed_targets` replaces them by given vectors (the
/// gradient tests hold the targets fixed while they perturb the parameters; training passes
/// `None`).
///
/// The [MASK] vector is the encoder's vector of the constant -1 slice, computed at every step
/// from the current encoder, and it *does* receive gradients, which flow into the encoder:
/// it is an encoder output on the input side of the transformer, as PyTorch's autograd would
/// treat it; holding it constant would make the step's gradient a partial derivative of no
/// loss function (so no finite-difference check could confirm it), and the three
/// single-slice backward passes cost next to nothing.
pub fn mevp_trainable<B: Backend>(
    be: &B,
    net: &Net,
    params: &B::Buf,
    mut grads: Option<&mut B::Buf>,
    idx: &impl ParamIndex,
    volumes: &[f32],
    pos: &[B::Buf; 3],
    masks: &[Masks],
    opts: &MevpOptions,
    fixed_targets: Option<&[B::Buf; 3]>,
) -> f64 {
    let b = masks.len();
    let vectors = Plane::ALL.map(|plane| {
        let (n, h, w) = plane.geometry(net.grid);
        let slices = plane_slices(be, net.grid, plane, volumes, b);
        encoder::forward(be, &net.encoder, params, idx, all(be, &slices), b * n, h, w)
    });
    let tokens = Plane::ALL.map(|plane| {
        let (_, h, w) = plane.geometry(net.grid);
        let image = be.upload(&vec![-1.0; h * w]);
        encoder::forward(be, &net.encoder, params, idx, all(be, &image), 1, h, w)
    });
    let inputs = vectors.each_ref().map(|v| &v.0);
    let targets = fixed_targets.map_or(inputs, |t| t.each_ref());
    let (loss, back) = mevp_core(
        be,
        net,
        params,
        grads.as_deref_mut(),
        idx,
        inputs,
        targets,
        tokens.each_ref().map(|t| &t.0),
        pos,
        masks,
        opts,
        true,
    );
    if let (Some(grads), Some((dv, dt))) = (grads, back) {
        for p in 0..3 {
            let enc = &net.encoder;
            encoder::backward(be, enc, params, grads, idx, &vectors[p].1, all(be, &dv[p]));
            if p == 2 {
                idx.last_pass();
            }
            encoder::backward(be, enc, params, grads, idx, &tokens[p].1, all(be, &dt[p]));
        }
    }
    loss
}

/// Which slices of plane `plane` of `b` subjects hold one value only (all background).
fn flat_slices(grid: [usize; 3], plane: Plane, volumes: &[f32], b: usize) -> Vec<bool> {
    let per = grid.iter().product::<usize>();
    let (_, h, w) = plane.geometry(grid);
    let mut host = Vec::new();
    for s in 0..b {
        plane.extract(&volumes[s * per..(s + 1) * per], grid, &mut host);
    }
    host.chunks(h * w)
        .map(|c| c.iter().all(|&x| x == c[0]))
        .collect()
}

/// Triplet loss of `b` subjects (sum over planes of the mean over slices): anchor = a slice,
/// positive = the same slice of `positives` (the anchor volume after an intensity curve),
/// negative = the same slice of the paired subject (2k <-> 2k+1). `b` must be even.
///
/// A triple whose anchor or negative slice is all background (one value) counts 0 and sends
/// no gradient. Its true loss is the constant margin (anchor, positive and negative are the
/// same image) with zero gradient, but the computed one is not: instance norm over the
/// encoder's near-zero maps of a blank slice multiplies rounding noise by up to
/// 1/sqrt(eps) = 316 per norm. At the tiny preset that noise took the gradient norm from 5.8
/// at step 1 to 418 at step 2, and clipping then shrank the real gradient to nothing
/// (docs/ARCHITECTURE.md, "Blank slices").
pub fn triplet<B: Backend>(
    be: &B,
    net: &Net,
    params: &B::Buf,
    mut grads: Option<&mut B::Buf>,
    idx: &impl ParamIndex,
    anchors: &[f32],
    positives: &[f32],
    b: usize,
    margin: f32,
) -> f64 {
    assert!(
        b % 2 == 0 && b > 0,
        "triplet batches pair subjects: b must be even"
    );
    let d = net.encoder.d;
    let mut total = 0.0;
    for plane in Plane::ALL {
        let (n, h, w) = plane.geometry(net.grid);
        let rows = b * n;
        let a_in = plane_slices(be, net.grid, plane, anchors, b);
        let p_in = plane_slices(be, net.grid, plane, positives, b);
        let (a, tape_a) =
            encoder::forward(be, &net.encoder, params, idx, all(be, &a_in), rows, h, w);
        let (p, tape_p) =
            encoder::forward(be, &net.encoder, params, idx, all(be, &p_in), rows, h, w);
        // Negatives are the paired subject's anchors: row s*n+i takes row (s^1)*n+i.
        let pair: Vec<u32> = (0..rows)
            .map(|r| (((r / n) ^ 1) * n + r % n) as u32)
            .collect();
        let flat = flat_slices(net.grid, plane, anchors, b);
        let (kept, negs): (Vec<u32>, Vec<u32>) = (0..rows)
            .filter(|&r| !flat[r] && !flat[pair[r] as usize])
            .map(|r| (r as u32, pair[r]))
            .unzip();
        if kept.is_empty() {
            continue;
        }
        let m = kept.len();
        let gather = |rows: &[u32], x: &B::Buf| {
            let mut y = be.zeros(m * d);
            be.gather_rows(d, rows, all(be, x), all_mut(be, &mut y));
            y
        };
        let (ka, kp, kn) = (gather(&kept, &a), gather(&kept, &p), gather(&negs, &a));
        let mut loss = be.zeros(1);
        let (mut dka, mut dkp, mut dkn) = (be.zeros(m * d), be.zeros(m * d), be.zeros(m * d));
        // The mean over all `rows` slices, the skipped ones counting 0: per-rank means over
        // equal row counts then average to the global batch's exactly.
        let share = m as f64 / rows as f64;
        be.triplet(
            m,
            d,
            margin,
            share as f32,
            all(be, &ka),
            all(be, &kp),
            all(be, &kn),
            all_mut(be, &mut loss),
            all_mut(be, &mut dka),
            all_mut(be, &mut dkp),
            all_mut(be, &mut dkn),
        );
        total += scalar(be, &loss) * share;
        if let Some(grads) = grads.as_deref_mut() {
            let (mut da, mut dp) = (be.zeros(rows * d), be.zeros(rows * d));
            be.scatter_add_rows(d, &kept, all(be, &dka), all_mut(be, &mut da));
            be.scatter_add_rows(d, &negs, all(be, &dkn), all_mut(be, &mut da));
            be.scatter_add_rows(d, &kept, all(be, &dkp), all_mut(be, &mut dp));
            encoder::backward(be, &net.encoder, params, grads, idx, &tape_a, all(be, &da));
            if plane == Plane::Coronal {
                idx.last_pass();
            }
            encoder::backward(be, &net.encoder, params, grads, idx, &tape_p, all(be, &dp));
        }
    }
    total
}

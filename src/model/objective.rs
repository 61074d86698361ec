//! The two pretraining objectives over a batch of subjects, summed over the three planes:
//! masked encoding vector prediction (MEVP, encoder frozen: gradients reach the transformer
//! only) and the triplet loss (encoder only). Both return the loss and, when given a gradient
//! buffer, accumulate into it.
use super::encoder::{self, EncoderSpec};
use super::params::{ParamIndex, all, all_mut};
use super::planes::Plane;
use super::transformer::{self, TransformerSpec};
use crate::backend::Backend;

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
fn plane_slices<B: Backend>(
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
    encoder::forward(be, &net.encoder, params, idx, all(be, &slices), b * n, h, w).0
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
    encoder::forward(be, &net.encoder, params, idx, all(be, &image), 1, h, w).0
}

/// The masked positions of one subject, per plane (sorted indices into that plane's slices).
pub type Masks = [Vec<u32>; 3];

/// MEVP loss of `b` subjects (sum over planes of the mean squared error over masked
/// positions and components), with the encoder frozen. `targets[p]` are the encoder vectors
/// of plane p (from [`encode_plane`], or a cache: they never change while the encoder is
/// frozen); `tokens[p]` the [MASK] vectors; `pos[p]` the position codes `[slices, D]`.
pub fn mevp<B: Backend>(
    be: &B,
    net: &Net,
    params: &B::Buf,
    mut grads: Option<&mut B::Buf>,
    idx: &impl ParamIndex,
    targets: &[B::Buf; 3],
    tokens: &[B::Buf; 3],
    pos: &[B::Buf; 3],
    masks: &[Masks],
) -> f64 {
    let d = net.transformer.d;
    let b = masks.len();
    let mut total = 0.0;
    for plane in Plane::ALL {
        let p = plane.index();
        let (n, _, _) = plane.geometry(net.grid);
        let rows: Vec<u32> = masks
            .iter()
            .enumerate()
            .flat_map(|(s, m)| m[p].iter().map(move |&i| (s * n) as u32 + i))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let mut input = be.zeros(b * n * d);
        be.copy(all(be, &targets[p]), all_mut(be, &mut input));
        be.mask_scatter(d, &rows, all(be, &tokens[p]), all_mut(be, &mut input));
        let (out, tape) = transformer::forward(
            be,
            &net.transformer,
            params,
            idx,
            all(be, &input),
            b,
            n,
            p,
            all(be, &pos[p]),
        );
        let (mut pred, mut target) = (be.zeros(rows.len() * d), be.zeros(rows.len() * d));
        be.gather_rows(d, &rows, all(be, &out), all_mut(be, &mut pred));
        be.gather_rows(d, &rows, all(be, &targets[p]), all_mut(be, &mut target));
        let (mut loss, mut dpred) = (be.zeros(1), be.zeros(rows.len() * d));
        be.mse(
            1.0,
            all(be, &pred),
            all(be, &target),
            all_mut(be, &mut loss),
            all_mut(be, &mut dpred),
        );
        total += scalar(be, &loss);
        if let Some(grads) = grads.as_deref_mut() {
            let mut dout = be.zeros(b * n * d);
            be.scatter_add_rows(d, &rows, all(be, &dpred), all_mut(be, &mut dout));
            if plane == Plane::Coronal {
                idx.last_pass();
            }
            transformer::backward(
                be,
                &net.transformer,
                params,
                grads,
                idx,
                &tape,
                all(be, &dout),
            );
        }
    }
    total
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

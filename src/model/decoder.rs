//! The segmentation decoder of the downstream tumour-segmentation task: per slice, a light
//! U-Net-style decoder climbs from the encoder's deepest map, plus the slice's transformer
//! token, back to the slice's size, adding the encoder's feature maps on the way, and ends in
//! logits of the classes {background, 1, 2, 4} (BraTS label codes, [`CODES`]). Each plane runs
//! it on its own slices; the three planes' softmax maps, put back into volume order, are
//! averaged into one 3-D map ([`segment_probs`]); the loss is cross-entropy plus soft Dice
//! ([`dice_ce`], [`segment_loss`]).
//!
//! Stages for the paper preset on a 96x114 axial slice (`[channels, h, w]`; every level's
//! width is a quarter of the encoder map it adds, at least 4, [`width`]):
//!
//! | level | upsample (transposed conv 3x3/2) | adds (1x1 conv of each skip)   | then               | output       |
//! |-------|----------------------------------|--------------------------------|--------------------|--------------|
//! | seed  | -                                | s4 [128, 3, 4]; token 64 -> 32 | -                  | [32, 3, 4]   |
//! | s3    | 32 -> 16                         | s3 [64, 6, 8]                  | conv 3x3, IN, ReLU | [16, 6, 8]   |
//! | s2    | 16 -> 8                          | s2 [32, 12, 15]                | conv 3x3, IN, ReLU | [8, 12, 15]  |
//! | s1    | 8 -> 4                           | s1, max-pool [16, 24, 29]      | conv 3x3, IN, ReLU | [4, 24, 29]  |
//! | stem  | 4 -> 4                           | stem [16, 48, 57]              | conv 3x3, IN, ReLU | [4, 48, 57]  |
//! | out   | 4 -> 4 classes                   | token 64 -> 4 (class bias)     | -                  | [4, 96, 114] |
//!
//! The token (the transformer's final-norm output for this slice) goes through a linear layer
//! and is added at every position of the seed (a batched GEMM with a ones vector), and
//! through another into a per-slice bias of each class's logits. The second path matters:
//! the seed's per-channel constant reaches the logits only through instance norms, which
//! remove most of it (the transformer's gradient norm was 6.7e-4 against the encoder's 0.45
//! with the seed path alone), while the class bias comes after the last norm. Skips are
//! added, not concatenated, after a 1x1 projection to the level's width: adding them at the
//! encoder's own widths (16 to 128 channels up to h/2) would cost about two thirds of the
//! encoder's multiply-adds; at these widths the decoder has 17,476 parameters (2.5 % of the
//! paper encoder's 708,784; tiny: 1,988, 4.4 % of 45,272) and costs 1.78 M multiply-adds per
//! 96x114 slice (6.6 % of the encoder's 27.05 M; tiny 20 %, its encoder being 8 channels
//! wide), most of it at h/2 and full size, where 4 channels is already the number of
//! classes. The upsampling is the transpose of the stride-2 3x3 convolution (pad 1) that maps
//! the shallower size to the deeper one, so it lands on the encoder's exact sizes, odd ones
//! included (15 <- 8, 57 <- 29).
use super::ModelConfig;
use super::encoder::{self, BLOCKS_PER_STAGE, EncoderSpec, EncoderTape};
use super::layout::Builder;
use super::linear;
use super::objective::Net;
use super::params::{ParamIndex, all, all_mut, two_mut, view, view_mut};
use super::planes::Plane;
use super::task;
use crate::backend::{Backend, Conv2d, DiceCe, Gemm, MatLayout};
use anyhow::{Result, bail};

/// The label codes of the classes, in class order: background, then BraTS's necrotic core
/// (1), oedema (2) and enhancing tumour (4).
pub const CODES: [u8; 4] = [0, 1, 2, 4];

/// Output channels: one logit per class.
pub const CLASSES: usize = CODES.len();

/// Smoothing of the soft Dice, in voxels: `(2 I + 1) / (P + G + 1)`. It keeps a class that
/// a subject lacks (G = 0) from giving 0/0 and turns its term into `1 / (P + 1)`, which
/// pushes that class's probabilities down instead of ignoring them.
pub const DICE_EPS: f64 = 1.0;

/// The regions the loss's soft Dice averages and the evaluation reports, as class bit masks
/// ([`crate::backend::DiceCe::regions`]): whole tumour (classes 1, 2, 3 = codes 1, 2, 4),
/// tumour core (codes 1, 4) and enhancing tumour (code 4). Training on the nested regions
/// rather than on each class scores a tumour voxel given the wrong tumour class as a
/// whole-tumour hit, which is what the whole-tumour Dice counts.
pub const REGIONS: &[u32] = &[0b1110, 0b1010, 0b1000];

/// The class of a voxel from its class probabilities, region by region as they nest: tumour
/// when the whole tumour's probability (1 - background) exceeds one half, then core when the
/// core's does, then enhancing when the enhancing tumour's does; oedema and necrotic core are
/// the tumour and core voxels that go no deeper. An arg-max over the four classes would call
/// a voxel background at probabilities (0.4, 0.05, 0.3, 0.25), although it is tumour with
/// probability 0.6.
pub fn class_of_probs(p: &[f32]) -> u8 {
    assert_eq!(p.len(), CLASSES, "class probabilities");
    let region = |mask: u32| -> f32 {
        (0..CLASSES)
            .filter(|&c| mask >> c & 1 == 1)
            .map(|c| p[c])
            .sum()
    };
    let [whole, core, enhancing] = [REGIONS[0], REGIONS[1], REGIONS[2]].map(region);
    if whole <= 0.5 {
        0
    } else if core <= 0.5 {
        2
    } else if enhancing <= 0.5 {
        1
    } else {
        3
    }
}

/// The class index of a label code.
pub fn class_of_code(code: u8) -> Option<usize> {
    CODES.iter().position(|&c| c == code)
}

/// Class indices of a label map in codes; an error names the first code that is not one of
/// [`CODES`].
pub fn classes_of_codes(codes: &[u8]) -> Result<Vec<u8>> {
    codes
        .iter()
        .map(|&code| match class_of_code(code) {
            Some(c) => Ok(c as u8),
            None => bail!("label code {code} is not one of the segmentation codes {CODES:?}"),
        })
        .collect()
}

/// The decoder's width at a level whose encoder map has `channels` channels.
pub fn width(channels: usize) -> usize {
    (channels / 4).max(CLASSES)
}

/// The encoder maps a decoder reads, in [`EncoderTape::skips`] order: name and channels.
fn skip_channels(widths: &[usize]) -> Vec<(String, usize)> {
    let first = widths.first().copied().unwrap_or(0);
    let mut out = vec![("stem".to_string(), first), ("pool".to_string(), first)];
    out.extend(
        widths
            .iter()
            .enumerate()
            .map(|(s, &c)| (format!("s{}", s + 1), c)),
    );
    out
}

/// One resolution of the decoder: its name, the encoder maps it adds (indices into
/// [`skip_channels`], in the order they are added) and its width.
struct Group {
    name: String,
    skips: Vec<usize>,
    c: usize,
}

/// The levels deep to shallow: each stage's end (the max-pool output shares stage 1's size,
/// so it joins that level), then the stem. The first is the seed.
fn groups(widths: &[usize]) -> Vec<Group> {
    let mut out: Vec<Group> = (1..=widths.len())
        .rev()
        .map(|s| Group {
            name: format!("s{s}"),
            skips: if s == 1 { vec![2, 1] } else { vec![1 + s] },
            c: width(widths[s - 1]),
        })
        .collect();
    out.push(Group {
        name: "stem".into(),
        skips: vec![0],
        c: width(widths.first().copied().unwrap_or(0)),
    });
    out
}

fn skip_name(skip: &str) -> String {
    format!("decoder.skip.{skip}")
}

/// Pushes the decoder's tensors (`decoder.*`) into the layout, in the reverse of their
/// forward order (the order [`backward`] finishes them): the output, then each level from
/// the shallowest (norm, conv, skip projections, upsampling), then the token's linear layer
/// and the seed's projections.
pub(crate) fn layout(b: &mut Builder, cfg: &ModelConfig) {
    let skips = skip_channels(&cfg.widths);
    let groups = groups(&cfg.widths);
    let project = |b: &mut Builder, g: &Group| {
        for &k in g.skips.iter().rev() {
            b.conv(skip_name(&skips[k].0), g.c, skips[k].1, 1);
        }
    };
    b.linear("decoder.out.token", CLASSES, cfg.d);
    let last = groups.last().map_or(CLASSES, |g| g.c);
    b.conv("decoder.out.up".into(), last, CLASSES, 3);
    for i in (1..groups.len()).rev() {
        let g = &groups[i];
        b.norm(&format!("decoder.{}.norm", g.name), g.c);
        b.conv(format!("decoder.{}.conv", g.name), g.c, g.c, 3);
        project(b, g);
        b.conv(format!("decoder.{}.up", g.name), groups[i - 1].c, g.c, 3);
    }
    b.linear("decoder.token", groups[0].c, cfg.d);
    project(b, &groups[0]);
}

/// One level of a decoder pass with its shapes.
pub struct Level {
    pub name: String,
    /// Width and size of the level's maps.
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// The encoder maps it adds (indices into [`Plan::skips`]) and their 1x1 projections.
    pub skips: Vec<usize>,
    pub proj: Vec<Conv2d>,
    /// The stride-2 convolution from this level's size to the deeper level's, whose
    /// transpose upsamples; None at the seed.
    pub up: Option<Conv2d>,
    /// The 3x3 convolution after the skips; None at the seed.
    pub conv: Option<Conv2d>,
}

/// The shapes of one decoder pass over `n` slices of `h x w` (sizes from the encoder's own
/// [`encoder::Plan`], so they cannot disagree with the maps it exposes).
pub struct Plan {
    pub n: usize,
    /// Token width D.
    pub d: usize,
    pub h: usize,
    pub w: usize,
    /// The encoder maps in [`EncoderTape::skips`] order: name and `(c, h, w)`.
    pub skips: Vec<(String, (usize, usize, usize))>,
    /// Deep to shallow; `levels[0]` is the seed.
    pub levels: Vec<Level>,
    /// The stride-2 convolution from `[CLASSES, h, w]` to the last level, whose transpose
    /// gives the logits.
    pub out: Conv2d,
}

impl Plan {
    pub fn new(spec: &EncoderSpec, n: usize, h: usize, w: usize) -> Self {
        let enc = encoder::Plan::new(spec, n, h, w);
        let shape = |c: &Conv2d| {
            let (h, w) = c.out_hw();
            (c.cout, h, w)
        };
        let (ph, pw) = enc.pool.out_hw();
        let mut sizes = vec![shape(&enc.stem), (enc.pool.c, ph, pw)];
        sizes.extend(
            enc.blocks
                .chunks(BLOCKS_PER_STAGE)
                .filter_map(|stage| stage.last())
                .map(|b| shape(&b.conv2)),
        );
        let skips: Vec<(String, (usize, usize, usize))> = skip_channels(&spec.widths)
            .into_iter()
            .zip(sizes)
            .map(|((name, c), s)| {
                assert_eq!(c, s.0, "encoder map {name}");
                (name, s)
            })
            .collect();
        let conv = |cin, h, w, cout, k, stride, pad| Conv2d {
            n,
            cin,
            h,
            w,
            cout,
            k,
            stride,
            pad,
        };
        // The transpose of this convolution maps `[cout, ho, wo]` back to `[cin, h, w]`.
        let down = |cin, h, w, cout, (ho, wo): (usize, usize)| {
            let c = conv(cin, h, w, cout, 3, 2, 1);
            assert_eq!(c.out_hw(), (ho, wo), "upsampling to {h}x{w}");
            c
        };
        let mut levels: Vec<Level> = Vec::new();
        for g in groups(&spec.widths) {
            let (_, lh, lw) = skips[g.skips[0]].1;
            let proj = g
                .skips
                .iter()
                .map(|&k| {
                    let (c, sh, sw) = skips[k].1;
                    assert_eq!(
                        (sh, sw),
                        (lh, lw),
                        "skip {} at level {}",
                        skips[k].0,
                        g.name
                    );
                    conv(c, lh, lw, g.c, 1, 1, 0)
                })
                .collect();
            let (up, conv3) = match levels.last() {
                None => (None, None),
                Some(deeper) => (
                    Some(down(g.c, lh, lw, deeper.c, (deeper.h, deeper.w))),
                    Some(conv(g.c, lh, lw, g.c, 3, 1, 1)),
                ),
            };
            levels.push(Level {
                name: g.name,
                c: g.c,
                h: lh,
                w: lw,
                skips: g.skips,
                proj,
                up,
                conv: conv3,
            });
        }
        let last = levels.last().expect("the decoder has levels");
        let out = down(CLASSES, h, w, last.c, (last.h, last.w));
        Plan {
            n,
            d: spec.d,
            h,
            w,
            skips,
            levels,
            out,
        }
    }

    /// Length of the ones vector the broadcasts and position sums read.
    fn ones_len(&self) -> usize {
        let seed = &self.levels[0];
        (self.h * self.w).max(seed.h * seed.w).max(self.n)
    }
}

/// Multiply-adds x 2 of one forward pass over one `h x w` slice (convolutions, transposed
/// ones and the token's linear layer; norms, adds and the bias are not counted), following
/// the shapes of [`forward`].
pub fn forward_flops(spec: &EncoderSpec, h: usize, w: usize) -> f64 {
    // A transposed convolution costs what the convolution it transposes costs.
    let conv_flops = |c: &Conv2d| {
        let (ho, wo) = c.out_hw();
        2.0 * (c.cout * c.cin * c.k * c.k * ho * wo) as f64
    };
    let plan = Plan::new(spec, 1, h, w);
    let levels: f64 = plan
        .levels
        .iter()
        .map(|l| {
            l.proj
                .iter()
                .chain(&l.up)
                .chain(&l.conv)
                .map(conv_flops)
                .sum::<f64>()
        })
        .sum();
    levels + conv_flops(&plan.out) + 2.0 * (spec.d * plan.levels[0].c) as f64
}

/// What backward needs from one level after the seed.
struct LevelTape<B: Backend> {
    /// The conv's input: the upsampled map plus the projected skips.
    sum: B::Buf,
    /// The conv's output (the norm's input).
    pre: B::Buf,
    mean: B::Buf,
    rstd: B::Buf,
}

/// Everything backward needs from one forward pass. It borrows the encoder maps (`'a`), which
/// the encoder's tape keeps anyway.
pub struct DecoderTape<'a, B: Backend + 'a> {
    plan: Plan,
    skips: Vec<B::View<'a>>,
    /// A copy of the tokens `[n, D]` (the token layer's weight gradient reads them).
    tokens: B::Buf,
    /// Each level's output, deep to shallow: the seed, then each norm's output (after ReLU).
    outs: Vec<B::Buf>,
    levels: Vec<LevelTape<B>>,
}

impl<B: Backend> DecoderTape<'_, B> {
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

/// `y_i [c, hw] += x_i [c, 1] ones [1, hw]` for `n` images: `x_stride` c broadcasts one
/// column per image (`x [n, c]`), 0 the same column for all (a bias `[c]`).
fn broadcast(n: usize, c: usize, hw: usize, x_stride: usize) -> Gemm {
    Gemm {
        m: c,
        n: hw,
        k: 1,
        batch: n,
        alpha: 1.0,
        beta: 1.0,
        a: MatLayout {
            trans: false,
            ld: 1,
            stride: x_stride,
        },
        b: MatLayout {
            trans: false,
            ld: hw,
            stride: 0,
        },
        c: MatLayout {
            trans: false,
            ld: hw,
            stride: c * hw,
        },
    }
}

/// The adjoint of [`broadcast`] with one column per image: `dx_i [c, 1] = dy_i [c, hw] ones
/// [hw, 1]` (overwrites `dx [n, c]`).
fn position_sum(n: usize, c: usize, hw: usize) -> Gemm {
    Gemm {
        m: c,
        n: 1,
        k: hw,
        batch: n,
        alpha: 1.0,
        beta: 0.0,
        a: MatLayout {
            trans: false,
            ld: hw,
            stride: c * hw,
        },
        b: MatLayout {
            trans: false,
            ld: 1,
            stride: 0,
        },
        c: MatLayout {
            trans: false,
            ld: 1,
            stride: c,
        },
    }
}

/// `x += proj_k(skip_k)` for each skip of the level.
fn add_skips<B: Backend>(
    be: &B,
    plan: &Plan,
    level: &Level,
    params: &B::Buf,
    idx: &impl ParamIndex,
    skips: &[B::View<'_>],
    x: &mut B::Buf,
) {
    let mut projected = be.zeros(be.len(x));
    for (&k, proj) in level.skips.iter().zip(&level.proj) {
        let weight = view(be, params, idx, &skip_name(&plan.skips[k].0));
        be.conv2d_forward(proj, skips[k], weight, all_mut(be, &mut projected));
        be.axpy(1.0, all(be, &projected), all_mut(be, x));
    }
}

/// The backward of [`add_skips`] from `dx`: the projections' weight gradients (in layout
/// order) and the gradients at the skips.
fn add_skips_backward<B: Backend>(
    be: &B,
    tape: &DecoderTape<'_, B>,
    level: &Level,
    params: &B::Buf,
    grads: &mut B::Buf,
    idx: &impl ParamIndex,
    dx: &B::Buf,
    dskips: &mut [B::Buf],
) {
    for (&k, proj) in level.skips.iter().zip(&level.proj).rev() {
        let name = skip_name(&tape.plan.skips[k].0);
        let dw = view_mut(be, grads, idx, &name);
        be.conv2d_backward_weight(proj, tape.skips[k], all(be, dx), dw);
        let weight = view(be, params, idx, &name);
        be.conv2d_backward_data(proj, all(be, dx), weight, all_mut(be, &mut dskips[k]));
    }
}

/// Decodes `n` slices of `h x w` from the encoder's tape of those slices and their tokens
/// `[n, D]` into logits `[n, CLASSES, h, w]`, keeping the tape.
pub fn forward<'a, B: Backend>(
    be: &B,
    spec: &EncoderSpec,
    params: &B::Buf,
    idx: &impl ParamIndex,
    enc: &'a EncoderTape<B>,
    tokens: B::View<'_>,
    n: usize,
    h: usize,
    w: usize,
) -> (B::Buf, DecoderTape<'a, B>) {
    assert_eq!(enc.n(), n, "the encoder's tape holds {} slices", enc.n());
    let skips: Vec<B::View<'a>> = enc.skips().into_iter().map(|(b, _)| all(be, b)).collect();
    forward_with_skips(be, spec, params, idx, &skips, tokens, n, h, w)
}

/// [`forward`] from the encoder maps themselves (`skips`, in [`EncoderTape::skips`] order and
/// shapes).
pub fn forward_with_skips<'a, B: Backend>(
    be: &B,
    spec: &EncoderSpec,
    params: &B::Buf,
    idx: &impl ParamIndex,
    skips: &[B::View<'a>],
    tokens: B::View<'_>,
    n: usize,
    h: usize,
    w: usize,
) -> (B::Buf, DecoderTape<'a, B>) {
    let plan = Plan::new(spec, n, h, w);
    assert_eq!(skips.len(), plan.skips.len(), "encoder maps");
    let ones = be.upload(&vec![1.0; plan.ones_len()]);
    let mut token_copy = be.zeros(n * plan.d);
    be.copy(tokens, all_mut(be, &mut token_copy));

    let seed = &plan.levels[0];
    let mut x = be.zeros(n * seed.c * seed.h * seed.w);
    add_skips(be, &plan, seed, params, idx, skips, &mut x);
    let mut token = be.zeros(n * seed.c);
    linear::forward(
        be,
        n,
        plan.d,
        seed.c,
        tokens,
        view(be, params, idx, "decoder.token.weight"),
        view(be, params, idx, "decoder.token.bias"),
        all_mut(be, &mut token),
    );
    let g = broadcast(n, seed.c, seed.h * seed.w, seed.c);
    be.gemm(&g, all(be, &token), all(be, &ones), all_mut(be, &mut x));

    let mut outs = vec![x];
    let mut levels = Vec::new();
    for level in &plan.levels[1..] {
        let (Some(up), Some(conv)) = (&level.up, &level.conv) else {
            unreachable!("every level after the seed upsamples")
        };
        let len = n * level.c * level.h * level.w;
        let name = |part: &str| format!("decoder.{}.{part}", level.name);
        let mut sum = be.zeros(len);
        let deeper = outs.last().expect("the seed");
        be.conv2d_backward_data(
            up,
            all(be, deeper),
            view(be, params, idx, &name("up")),
            all_mut(be, &mut sum),
        );
        add_skips(be, &plan, level, params, idx, skips, &mut sum);
        let mut pre = be.zeros(len);
        be.conv2d_forward(
            conv,
            all(be, &sum),
            view(be, params, idx, &name("conv")),
            all_mut(be, &mut pre),
        );
        let mut post = be.zeros(len);
        let (mut mean, mut rstd) = (be.zeros(n * level.c), be.zeros(n * level.c));
        be.instance_norm_forward(
            n,
            level.c,
            level.h * level.w,
            spec.eps,
            true,
            all(be, &pre),
            view(be, params, idx, &name("norm.gamma")),
            view(be, params, idx, &name("norm.beta")),
            all_mut(be, &mut post),
            all_mut(be, &mut mean),
            all_mut(be, &mut rstd),
        );
        outs.push(post);
        levels.push(LevelTape {
            sum,
            pre,
            mean,
            rstd,
        });
    }

    let mut logits = be.zeros(n * CLASSES * h * w);
    let last = outs.last().expect("the seed");
    be.conv2d_backward_data(
        &plan.out,
        all(be, last),
        view(be, params, idx, "decoder.out.up"),
        all_mut(be, &mut logits),
    );
    // Each slice's class bias from its token, after the last instance norm (which would
    // cancel a per-channel constant added earlier): the context's say on what this slice holds.
    let mut class_bias = be.zeros(n * CLASSES);
    linear::forward(
        be,
        n,
        plan.d,
        CLASSES,
        tokens,
        view(be, params, idx, "decoder.out.token.weight"),
        view(be, params, idx, "decoder.out.token.bias"),
        all_mut(be, &mut class_bias),
    );
    be.gemm(
        &broadcast(n, CLASSES, h * w, CLASSES),
        all(be, &class_bias),
        all(be, &ones),
        all_mut(be, &mut logits),
    );
    let tape = DecoderTape {
        plan,
        skips: skips.to_vec(),
        tokens: token_copy,
        outs,
        levels,
    };
    (logits, tape)
}

/// Backward from `dlogits [n, CLASSES, h, w]`: accumulates every decoder gradient (in layout
/// order) and returns the gradients at the tokens `[n, D]` and at the encoder maps (in
/// [`EncoderTape::skips`] order, for [`encoder::backward_with_skips`]).
///
/// An upsampling is `y = A^T x`, with `A` the stride-2 convolution of its [`Level::up`] and
/// weight `W`, so `dx = A dy` is that convolution's forward pass on `dy`, and since
/// `<dy, A^T x> = <A dy, x>`, `dW` is the convolution's weight gradient with `dy` as its input
/// and `x` as its output's gradient: the two roles swapped.
pub fn backward<B: Backend>(
    be: &B,
    spec: &EncoderSpec,
    params: &B::Buf,
    grads: &mut B::Buf,
    idx: &impl ParamIndex,
    tape: &DecoderTape<'_, B>,
    dlogits: B::View<'_>,
) -> (B::Buf, Vec<B::Buf>) {
    let plan = &tape.plan;
    assert_eq!(plan.d, spec.d, "the tape is of another model");
    let (n, hw) = (plan.n, plan.h * plan.w);
    let ones = be.upload(&vec![1.0; plan.ones_len()]);
    let mut per_image = be.zeros(n * CLASSES);
    be.gemm(
        &position_sum(n, CLASSES, hw),
        dlogits,
        all(be, &ones),
        all_mut(be, &mut per_image),
    );
    let mut dtokens = be.zeros(n * plan.d);
    {
        let (dw, db) = two_mut(
            be,
            grads,
            idx,
            "decoder.out.token.weight",
            "decoder.out.token.bias",
        );
        linear::backward(
            be,
            n,
            plan.d,
            CLASSES,
            all(be, &tape.tokens),
            view(be, params, idx, "decoder.out.token.weight"),
            all(be, &per_image),
            Some(all_mut(be, &mut dtokens)),
            dw,
            db,
        );
    }
    let last = tape.outs.last().expect("the seed");
    let dw = view_mut(be, grads, idx, "decoder.out.up");
    be.conv2d_backward_weight(&plan.out, dlogits, all(be, last), dw);
    let mut d = be.zeros(be.len(last));
    be.conv2d_forward(
        &plan.out,
        dlogits,
        view(be, params, idx, "decoder.out.up"),
        all_mut(be, &mut d),
    );

    let mut dskips: Vec<B::Buf> = plan
        .skips
        .iter()
        .map(|(_, (c, h, w))| be.zeros(n * c * h * w))
        .collect();
    for i in (1..plan.levels.len()).rev() {
        let (level, t) = (&plan.levels[i], &tape.levels[i - 1]);
        let (Some(up), Some(conv)) = (&level.up, &level.conv) else {
            unreachable!("every level after the seed upsamples")
        };
        let name = |part: &str| format!("decoder.{}.{part}", level.name);
        let len = be.len(&t.pre);
        let mut dpre = be.zeros(len);
        {
            let (dg, db) = two_mut(be, grads, idx, &name("norm.gamma"), &name("norm.beta"));
            be.instance_norm_backward(
                n,
                level.c,
                level.h * level.w,
                true,
                all(be, &t.pre),
                all(be, &tape.outs[i]),
                view(be, params, idx, &name("norm.gamma")),
                all(be, &t.mean),
                all(be, &t.rstd),
                all(be, &d),
                all_mut(be, &mut dpre),
                dg,
                db,
            );
        }
        let dw = view_mut(be, grads, idx, &name("conv"));
        be.conv2d_backward_weight(conv, all(be, &t.sum), all(be, &dpre), dw);
        let mut dsum = be.zeros(len);
        be.conv2d_backward_data(
            conv,
            all(be, &dpre),
            view(be, params, idx, &name("conv")),
            all_mut(be, &mut dsum),
        );
        add_skips_backward(be, tape, level, params, grads, idx, &dsum, &mut dskips);
        let deeper = &tape.outs[i - 1];
        let dw = view_mut(be, grads, idx, &name("up"));
        be.conv2d_backward_weight(up, all(be, &dsum), all(be, deeper), dw);
        let mut ddeeper = be.zeros(be.len(deeper));
        be.conv2d_forward(
            up,
            all(be, &dsum),
            view(be, params, idx, &name("up")),
            all_mut(be, &mut ddeeper),
        );
        d = ddeeper;
    }

    let seed = &plan.levels[0];
    let mut dtoken = be.zeros(n * seed.c);
    be.gemm(
        &position_sum(n, seed.c, seed.h * seed.w),
        all(be, &d),
        all(be, &ones),
        all_mut(be, &mut dtoken),
    );
    let mut dseed_tokens = be.zeros(n * plan.d);
    {
        let (dw, db) = two_mut(be, grads, idx, "decoder.token.weight", "decoder.token.bias");
        linear::backward(
            be,
            n,
            plan.d,
            seed.c,
            all(be, &tape.tokens),
            view(be, params, idx, "decoder.token.weight"),
            all(be, &dtoken),
            Some(all_mut(be, &mut dseed_tokens)),
            dw,
            db,
        );
    }
    be.axpy(1.0, all(be, &dseed_tokens), all_mut(be, &mut dtokens));
    add_skips_backward(be, tape, seed, params, grads, idx, &d, &mut dskips);
    (dtokens, dskips)
}

/// The segmentation loss of logits `[n_subjects * n, CLASSES, h, w]` (each subject's `n`
/// slices of one plane) against class indices `labels [n_subjects * n, h, w]`: per subject,
/// the pixel mean of the softmax cross-entropy plus `1 -` the mean soft Dice of the three
/// nested tumour regions ([`REGIONS`], [`DICE_EPS`]), averaged over the subjects; and its gradient. Pixels of the
/// tumour classes weigh `fg_weight` in the cross-entropy (background 1). It runs as
/// [`Backend::dice_ce`], whose default computes on the host (the logits downloaded, the
/// gradient uploaded); a backend may replace it with a kernel.
pub fn dice_ce<B: Backend>(
    be: &B,
    logits: &B::Buf,
    labels: &[u8],
    n_subjects: usize,
    n: usize,
    h: usize,
    w: usize,
    fg_weight: f64,
) -> (f64, B::Buf) {
    let s = DiceCe {
        subjects: n_subjects,
        slices: n,
        classes: CLASSES,
        hw: h * w,
        eps: DICE_EPS,
        fg_weight,
        regions: REGIONS,
    };
    let mut dlogits = be.zeros(s.len());
    let loss = be.dice_ce(&s, all(be, logits), labels, all_mut(be, &mut dlogits));
    (loss, dlogits)
}

/// Class indices `[b * n, h, w]` of one plane's slices from class indices `[b, X, Y, Z]`.
fn plane_labels(grid: [usize; 3], plane: Plane, classes: &[u8], b: usize) -> Vec<u8> {
    let per = grid.iter().product::<usize>();
    let mut slices = Vec::with_capacity(b * per);
    for s in 0..b {
        let vol: Vec<f32> = classes[s * per..(s + 1) * per]
            .iter()
            .map(|&c| f32::from(c))
            .collect();
        plane.extract(&vol, grid, &mut slices);
    }
    slices.into_iter().map(|c| c as u8).collect()
}

/// The segmentation objective of `b` subjects `volumes [b, X, Y, Z]` with label maps `labels
/// [b, X, Y, Z]` in codes ([`CODES`]; validate them with [`classes_of_codes`], another code
/// panics here): the three planes contextualised, each plane's slices decoded with their
/// tokens, and [`dice_ce`] per plane (tumour pixels weighing `fg_weight` in its
/// cross-entropy) summed over the planes. With `grads`, the backward pass
/// accumulates the decoder's and the transformer's gradients, and the encoder's (through its
/// output vectors and its maps) when `train_encoder`; the three planes' passes each run in
/// layout order, the last one announced by [`ParamIndex::last_pass`].
pub fn segment_loss<B: Backend>(
    be: &B,
    net: &Net,
    params: &B::Buf,
    mut grads: Option<&mut B::Buf>,
    idx: &impl ParamIndex,
    pos: &[B::Buf; 3],
    volumes: &[f32],
    labels: &[u8],
    b: usize,
    train_encoder: bool,
    fg_weight: f64,
) -> f64 {
    let classes = classes_of_codes(labels).unwrap_or_else(|e| panic!("{e}"));
    let planes = task::contextualise(be, net, params, idx, pos, volumes, b, true);
    let mut loss = 0.0;
    for (p, pl) in planes.iter().enumerate() {
        let (n, h, w) = pl.plane.geometry(net.grid);
        let enc = pl.encoder.as_ref().expect("encoder tape kept");
        let tokens = all(be, &pl.tokens);
        let (logits, tape) = forward(be, &net.encoder, params, idx, enc, tokens, b * n, h, w);
        let labels = plane_labels(net.grid, pl.plane, &classes, b);
        let (l, dlogits) = dice_ce(be, &logits, &labels, b, n, h, w, fg_weight);
        loss += l;
        let Some(grads) = grads.as_deref_mut() else {
            continue;
        };
        if p + 1 == planes.len() {
            idx.last_pass();
        }
        let (dtokens, dskips) = backward(
            be,
            &net.encoder,
            params,
            grads,
            idx,
            &tape,
            all(be, &dlogits),
        );
        let dvectors =
            task::transformer_backward(be, net, params, grads, idx, pl, all(be, &dtokens));
        if train_encoder {
            encoder::backward_with_skips(
                be,
                &net.encoder,
                params,
                grads,
                idx,
                enc,
                Some(all(be, &dvectors)),
                &dskips,
            );
        }
    }
    loss
}

/// The class probabilities `[b, CLASSES, X, Y, Z]` of `b` subjects: each plane's softmax
/// maps put back into volume order, averaged over the three planes.
pub fn segment_probs<B: Backend>(
    be: &B,
    net: &Net,
    params: &B::Buf,
    idx: &impl ParamIndex,
    pos: &[B::Buf; 3],
    volumes: &[f32],
    b: usize,
) -> Vec<f32> {
    let per = net.grid.iter().product::<usize>();
    let mut out = vec![0.0f32; b * CLASSES * per];
    let planes = task::contextualise(be, net, params, idx, pos, volumes, b, true);
    for pl in &planes {
        let (n, h, w) = pl.plane.geometry(net.grid);
        let enc = pl.encoder.as_ref().expect("encoder tape kept");
        let tokens = all(be, &pl.tokens);
        let logits = forward(be, &net.encoder, params, idx, enc, tokens, b * n, h, w).0;
        let mut probs = vec![0.0f32; b * n * CLASSES * h * w];
        be.download(all(be, &logits), &mut probs);
        softmax_over_classes(&mut probs, h * w);
        let (mut slices, mut vol) = (vec![0.0f32; n * h * w], vec![0.0f32; per]);
        for s in 0..b {
            for c in 0..CLASSES {
                for (k, slice) in slices.chunks_exact_mut(h * w).enumerate() {
                    let at = ((s * n + k) * CLASSES + c) * h * w;
                    slice.copy_from_slice(&probs[at..at + h * w]);
                }
                pl.plane.insert(&slices, net.grid, &mut vol);
                let dst = &mut out[(s * CLASSES + c) * per..(s * CLASSES + c + 1) * per];
                dst.iter_mut().zip(&vol).for_each(|(o, v)| *o += v / 3.0);
            }
        }
    }
    out
}

/// Softmax over the class axis of `x [images, CLASSES, hw]`, in place.
fn softmax_over_classes(x: &mut [f32], hw: usize) {
    for image in x.chunks_exact_mut(CLASSES * hw) {
        for q in 0..hw {
            let max = (0..CLASSES)
                .map(|c| image[c * hw + q])
                .fold(f32::MIN, f32::max);
            let mut sum = 0.0;
            for c in 0..CLASSES {
                let e = (image[c * hw + q] - max).exp();
                image[c * hw + q] = e;
                sum += e;
            }
            for c in 0..CLASSES {
                image[c * hw + q] /= sum;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu64;
    use crate::backend::cpu::gradcheck::{dot, random};
    use crate::model::{Head, Kind, Layout, Part, Preset, init};
    use std::cell::RefCell;
    use std::collections::BTreeSet;
    use std::ops::Range;

    #[test]
    fn the_segment_layout_keeps_every_pretrained_tensor() {
        // Counted by hand from the module's table (conv cout*cin*k*k, norms 2c, linear
        // out*in + out). paper: token 64*32 + 32 = 2080, skip.s4 32*128 = 4096;
        //   s3 up 32*16*9 + skip 16*64 + conv 16*16*9 + norm 32 = 7968;
        //   s2 16*8*9 + 8*32 + 8*8*9 + 16 = 2000; s1 8*4*9 + 4*16 + 4*16 + 4*4*9 + 8 = 568;
        //   stem 4*4*9 + 4*16 + 4*4*9 + 8 = 360; out up 4*4*9 = 144, out.token 4*64 + 4 = 260;
        //   total 17476.
        // tiny: token 32*8 + 8 = 264, skip.s3 8*32 = 256; s2 8*4*9 + 4*16 + 144 + 8 = 504;
        //   s1 144 + 4*8 + 4*8 + 144 + 8 = 360; stem 144 + 32 + 144 + 8 = 328; out up 144,
        //   out.token 4*32 + 4 = 132; total 1988.
        let want = [
            (Preset::Paper, 17_476),
            (Preset::Small, 17_476),
            (Preset::Tiny, 1_988),
        ];
        for (p, count) in want {
            let cfg = ModelConfig::preset(p);
            let (base, seg) = (Layout::new(&cfg), Layout::with_head(&cfg, Head::Segment));
            for e in base.iter() {
                let s = seg
                    .get(&e.name)
                    .unwrap_or_else(|| panic!("{p}: {} lost", e.name));
                assert_eq!((&s.shape, s.part, s.kind), (&e.shape, e.part, e.kind));
            }
            let head: Vec<_> = seg.iter().filter(|e| e.part == Part::Head).collect();
            assert_eq!(head.len() + base.entries().len(), seg.entries().len());
            assert!(head.iter().all(|e| e.name.starts_with("decoder.")));
            assert_eq!(seg.param_count(Part::Head), count, "{p}");
            println!(
                "{p}: decoder {} parameters ({:.1} % of the encoder's {})",
                count,
                100.0 * count as f64 / base.param_count(Part::Encoder) as f64,
                base.param_count(Part::Encoder)
            );
        }
    }

    #[test]
    fn levels_land_on_the_encoder_sizes() {
        let cfg = ModelConfig::preset(Preset::Paper);
        let spec = Net::new(&cfg).encoder;
        let plan = Plan::new(&spec, 1, 96, 114);
        let got: Vec<(&str, usize, usize, usize)> = plan
            .levels
            .iter()
            .map(|l| (l.name.as_str(), l.c, l.h, l.w))
            .collect();
        assert_eq!(
            got,
            [
                ("s4", 32, 3, 4),
                ("s3", 16, 6, 8),
                ("s2", 8, 12, 15),
                ("s1", 4, 24, 29),
                ("stem", 4, 48, 57)
            ]
        );
        assert_eq!(plan.levels[3].skips, [2, 1]);
        assert_eq!(plan.out.out_hw(), (48, 57));
        for p in Preset::ALL {
            let cfg = ModelConfig::preset(p);
            let spec = Net::new(&cfg).encoder;
            for shape in cfg.planes() {
                let dec = forward_flops(&spec, shape.h, shape.w);
                let enc = encoder::forward_flops(&spec, shape.h, shape.w);
                println!(
                    "{p} {:?} {}x{}: decoder {:.2} M multiply-adds, {:.1} % of the encoder's {:.2} M",
                    shape.plane,
                    shape.h,
                    shape.w,
                    dec / 2e6,
                    100.0 * dec / enc,
                    enc / 2e6
                );
                // The tiny encoder is 8 channels wide at h/2, where the decoder keeps 4.
                if p != Preset::Tiny {
                    assert!(dec < 0.08 * enc, "{p} {:?}: {dec} vs {enc}", shape.plane);
                }
            }
        }
    }

    /// Records where backward writes gradients.
    struct Recorder<'a> {
        layout: &'a Layout,
        offsets: RefCell<Vec<usize>>,
    }

    impl ParamIndex for Recorder<'_> {
        fn range_of(&self, name: &str) -> Range<usize> {
            self.layout.range_of(name)
        }
        fn gradients_below<B: Backend>(&self, _be: &B, _grads: &B::Buf, offset: usize) {
            self.offsets.borrow_mut().push(offset);
        }
    }

    struct Case {
        layout: Layout,
        spec: EncoderSpec,
        params: Vec<f64>,
        n: usize,
        h: usize,
        w: usize,
        skips: Vec<Vec<f64>>,
        tokens: Vec<f64>,
        /// The loss is `sum(logits * r)`.
        r: Vec<f64>,
    }

    /// The tiny decoder on 2 axial slices, random encoder maps and tokens; norms and the
    /// output bias moved off their initial 1 and 0, so a swapped pair would show.
    fn case() -> Case {
        let cfg = ModelConfig::preset(Preset::Tiny);
        let layout = Layout::with_head(&cfg, Head::Segment);
        let spec = Net::new(&cfg).encoder;
        let mut params: Vec<f64> = init::init_params(&layout, 5)
            .into_iter()
            .map(f64::from)
            .collect();
        for e in layout.iter().filter(|e| e.part == Part::Head) {
            if matches!(e.kind, Kind::NormGamma | Kind::NormBeta | Kind::LinearBias) {
                for (i, v) in random(e.len, e.offset as u64).into_iter().enumerate() {
                    params[e.offset + i] += 0.3 * v;
                }
            }
        }
        let (_, h, w) = Plane::Axial.geometry(cfg.grid);
        let n = 2;
        let plan = Plan::new(&spec, n, h, w);
        let skips = plan
            .skips
            .iter()
            .enumerate()
            .map(|(k, (_, (c, hh, ww)))| random(n * c * hh * ww, 100 + k as u64))
            .collect();
        Case {
            tokens: random(n * cfg.d, 7),
            r: random(n * CLASSES * h * w, 8),
            layout,
            spec,
            params,
            n,
            h,
            w,
            skips,
        }
    }

    fn loss(c: &Case, params: &Vec<f64>, skips: &[Vec<f64>], tokens: &[f64]) -> f64 {
        let views: Vec<&[f64]> = skips.iter().map(Vec::as_slice).collect();
        let (logits, _) = forward_with_skips(
            &Cpu64, &c.spec, params, &c.layout, &views, tokens, c.n, c.h, c.w,
        );
        dot(&logits, &c.r)
    }

    /// Central difference of `f` at coordinate `i` of `x` (h = 1e-5: the decoder's kinks,
    /// ReLUs after its norms, are rarely that close).
    fn numeric(x: &mut [f64], i: usize, mut f: impl FnMut(&[f64]) -> f64) -> f64 {
        let h = 1e-5;
        let keep = x[i];
        x[i] = keep + h;
        let up = f(x);
        x[i] = keep - h;
        let down = f(x);
        x[i] = keep;
        (up - down) / (2.0 * h)
    }

    /// Checks `|a - n| <= 1e-5 max(|a|, |n|) + 1e-8` at every coordinate (the loss sums
    /// about 10^4 products, so its rounding puts a few 1e-9 of noise into a central
    /// difference at h = 1e-5) and prints the worst relative and absolute errors.
    fn compare(what: &str, pairs: impl Iterator<Item = (usize, f64, f64)>) {
        let (mut rel, mut abs) = (0.0f64, 0.0f64);
        for (i, a, n) in pairs {
            let err = (a - n).abs();
            assert!(
                err <= 1e-5 * a.abs().max(n.abs()) + 1e-8,
                "{what}[{i}]: analytic {a} vs numeric {n}"
            );
            rel = rel.max(err / a.abs().max(n.abs()).max(1e-300));
            abs = abs.max(err);
        }
        println!("{what}: max relative error {rel:.2e}, max absolute {abs:.1e}");
    }

    #[test]
    fn decoder_gradients_match_finite_differences() {
        let c = case();
        let be = Cpu64;
        let views: Vec<&[f64]> = c.skips.iter().map(Vec::as_slice).collect();
        let (_, tape) = forward_with_skips(
            &be, &c.spec, &c.params, &c.layout, &views, &c.tokens, c.n, c.h, c.w,
        );
        let mut grads = vec![0.0; c.params.len()];
        let (dtokens, dskips) =
            backward(&be, &c.spec, &c.params, &mut grads, &c.layout, &tape, &c.r);
        // Every decoder parameter, one by one.
        let head = c.layout.part_range(Part::Head);
        assert!(grads[head.end..].iter().all(|&g| g == 0.0));
        let mut p = c.params.clone();
        let pairs = c
            .layout
            .iter()
            .filter(|e| e.part == Part::Head)
            .flat_map(|e| e.range());
        let checked: Vec<(usize, f64, f64)> = pairs
            .map(|i| {
                let n = numeric(&mut p, i, |x| loss(&c, &x.to_vec(), &c.skips, &c.tokens));
                (i, grads[i], n)
            })
            .collect();
        compare("decoder parameters", checked.into_iter());
        let mut t = c.tokens.clone();
        let pairs: Vec<_> = (0..t.len())
            .map(|i| {
                let n = numeric(&mut t, i, |x| loss(&c, &c.params, &c.skips, x));
                (i, dtokens[i], n)
            })
            .collect();
        compare("tokens", pairs.into_iter());
        for (k, (name, _)) in tape.plan().skips.iter().enumerate() {
            let mut skip = c.skips[k].clone();
            let pairs: Vec<_> = (0..skip.len())
                .step_by(skip.len().div_ceil(40))
                .map(|i| {
                    let n = numeric(&mut skip, i, |x| {
                        let mut skips = c.skips.clone();
                        skips[k] = x.to_vec();
                        loss(&c, &c.params, &skips, &c.tokens)
                    });
                    (i, dskips[k][i], n)
                })
                .collect();
            compare(&format!("skip {name}"), pairs.into_iter());
        }
    }

    /// Backward writes the decoder's gradients front to back, each tensor once, as the
    /// layout promises (the overlapped all-reduce relies on it).
    #[test]
    fn backward_finishes_gradients_in_layout_order() {
        let c = case();
        let be = Cpu64;
        let views: Vec<&[f64]> = c.skips.iter().map(Vec::as_slice).collect();
        let (_, tape) = forward_with_skips(
            &be, &c.spec, &c.params, &c.layout, &views, &c.tokens, c.n, c.h, c.w,
        );
        let rec = Recorder {
            layout: &c.layout,
            offsets: RefCell::new(Vec::new()),
        };
        let mut grads = vec![0.0; c.params.len()];
        backward(&be, &c.spec, &c.params, &mut grads, &rec, &tape, &c.r);
        let offsets = rec.offsets.into_inner();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
        // Pairs (gamma/beta, weight/bias) are announced by their first tensor.
        let seconds =
            |e: &&crate::model::Entry| e.name.ends_with(".beta") || e.name.ends_with("token.bias");
        let want: BTreeSet<usize> = c
            .layout
            .iter()
            .filter(|e| e.part == Part::Head && !seconds(e))
            .map(|e| e.offset)
            .collect();
        assert_eq!(offsets.into_iter().collect::<BTreeSet<_>>(), want);
    }

    #[test]
    fn codes_and_classes() {
        assert_eq!(
            CODES.map(class_of_code),
            [Some(0), Some(1), Some(2), Some(3)]
        );
        assert_eq!(class_of_code(3), None);
        assert_eq!(classes_of_codes(&[0, 4, 2, 1]).unwrap(), [0, 3, 2, 1]);
        let e = classes_of_codes(&[0, 3]).unwrap_err().to_string();
        assert!(e.contains("label code 3"), "{e}");
    }

    #[test]
    fn classes_follow_the_nested_regions() {
        // Background wins the arg-max, but the tumour's probability is 0.6: oedema.
        assert_eq!(class_of_probs(&[0.4, 0.05, 0.3, 0.25]), 2);
        assert_eq!(class_of_probs(&[0.5, 0.2, 0.1, 0.2]), 0);
        // Core (1 + 4) above one half, enhancing not: necrotic core.
        assert_eq!(class_of_probs(&[0.1, 0.3, 0.3, 0.3]), 1);
        assert_eq!(class_of_probs(&[0.1, 0.0, 0.3, 0.6]), 3);
        // Every class that wins outright keeps its own label.
        for c in 0..CLASSES {
            let mut p = [0.0; CLASSES];
            p[c] = 1.0;
            assert_eq!(usize::from(class_of_probs(&p)), c);
        }
        assert_eq!(
            REGIONS[0].count_ones(),
            3,
            "the whole tumour is every tumour class"
        );
    }
}

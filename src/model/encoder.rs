//! The slice encoder: ResNet-18 layout at reduced width with instance norm (PAPER.md). A
//! forward pass over a batch of same-sized slices returns one D-vector per slice and a tape
//! of saved activations; the backward pass walks the tape in reverse, so parameter gradients
//! finish in layout order (fc first, stem last) and accumulate into the flat gradient buffer.
use super::linear;
use super::params::{ParamIndex, all, all_mut, two_mut, view, view_mut};
use crate::backend::{Backend, Conv2d, Pool2d};

/// The encoder's shape, from the model config.
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderSpec {
    /// Channel width of each stage; the stem has `widths[0]` channels.
    pub widths: Vec<usize>,
    /// Output vector length D.
    pub d: usize,
    pub eps: f32,
}

/// A conv + instance norm pair as the forward pass left it.
struct NormedConv<B: Backend> {
    /// Layout names of the conv weight and of the norm (`{norm}.gamma`, `{norm}.beta`).
    conv_name: String,
    norm_name: String,
    conv: Conv2d,
    /// Convolution output (the norm's input); None in a pass without a tape.
    pre: Option<B::Buf>,
    /// Norm output (after the fused ReLU when `relu`).
    post: B::Buf,
    mean: B::Buf,
    rstd: B::Buf,
    relu: bool,
}

struct Block<B: Backend> {
    c1: NormedConv<B>,
    c2: NormedConv<B>,
    down: Option<NormedConv<B>>,
    /// relu(c2.post + skip): the block output.
    out: B::Buf,
}

/// BasicBlocks per stage (ResNet-18).
pub const BLOCKS_PER_STAGE: usize = 2;

/// Everything backward needs from one forward pass.
pub struct EncoderTape<B: Backend> {
    n: usize,
    /// The slices (None without a tape).
    input: Option<B::Buf>,
    stem: NormedConv<B>,
    pool: Pool2d,
    pooled: B::Buf,
    blocks: Vec<Block<B>>,
    /// Global average pool output [n, c_last].
    feat: B::Buf,
}

/// A feature map the encoder exposes to a decoder: the buffer `[n, c, h, w]` and `(c, h, w)`.
pub type Skip<'a, B> = (&'a <B as Backend>::Buf, (usize, usize, usize));

impl<B: Backend> EncoderTape<B> {
    /// Slices in the pass.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The feature maps a segmentation decoder adds back, shallow to deep: the stem's output
    /// (after its ReLU, h/2), the max-pool's output (h/4), then each stage's last block
    /// output. [`backward_with_skips`] takes their gradients in the same order.
    pub fn skips(&self) -> Vec<Skip<'_, B>> {
        let shape = |c: &Conv2d| {
            let (h, w) = c.out_hw();
            (c.cout, h, w)
        };
        let (ph, pw) = self.pool.out_hw();
        let mut out = vec![
            (&self.stem.post, shape(&self.stem.conv)),
            (&self.pooled, (self.pool.c, ph, pw)),
        ];
        out.extend(
            self.blocks
                .iter()
                .skip(BLOCKS_PER_STAGE - 1)
                .step_by(BLOCKS_PER_STAGE)
                .map(|b| (&b.out, shape(&b.c2.conv))),
        );
        out
    }
}

/// The shapes of one encoder pass over `n` slices of `h x w`: the one place where the layer
/// hyperparameters (stem 7x7/2, max-pool 3x3/2, stride 2 at each later stage's first block)
/// live; forward and the FLOP count both walk it.
pub struct Plan {
    pub stem: Conv2d,
    pub pool: Pool2d,
    pub blocks: Vec<BlockPlan>,
    /// Channels and spatial size of the last block's output.
    pub last: (usize, usize, usize),
}

/// One BasicBlock: two 3x3 convolutions and, where the shape changes, a 1x1 projection.
pub struct BlockPlan {
    /// Layout prefix, e.g. `encoder.s2.b1`.
    pub prefix: String,
    pub conv1: Conv2d,
    pub conv2: Conv2d,
    pub down: Option<Conv2d>,
}

impl Plan {
    pub fn new(spec: &EncoderSpec, n: usize, h: usize, w: usize) -> Self {
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
        let stem = conv(1, h, w, spec.widths[0], 7, 2, 3);
        let (sh, sw) = stem.out_hw();
        let pool = Pool2d {
            n,
            c: spec.widths[0],
            h: sh,
            w: sw,
            k: 3,
            stride: 2,
            pad: 1,
        };
        let (mut c, (mut hh, mut ww)) = (spec.widths[0], pool.out_hw());
        let mut blocks = Vec::new();
        for (s, &width) in spec.widths.iter().enumerate() {
            for b in 0..BLOCKS_PER_STAGE {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let conv1 = conv(c, hh, ww, width, 3, stride, 1);
                let (oh, ow) = conv1.out_hw();
                blocks.push(BlockPlan {
                    prefix: format!("encoder.s{}.b{}", s + 1, b + 1),
                    conv1,
                    conv2: conv(width, oh, ow, width, 3, 1, 1),
                    down: (stride != 1 || c != width).then(|| conv(c, hh, ww, width, 1, stride, 0)),
                });
                (c, hh, ww) = (width, oh, ow);
            }
        }
        Plan {
            stem,
            pool,
            blocks,
            last: (c, hh, ww),
        }
    }
}

fn names(conv: &str, norm: &str) -> (String, String) {
    (conv.to_string(), norm.to_string())
}

/// conv (no bias) then instance norm, with an optional fused ReLU; the conv output is kept
/// for backward when `tape`.
fn normed_conv_forward<B: Backend>(
    be: &B,
    eps: f32,
    params: &B::Buf,
    idx: &impl ParamIndex,
    (conv_name, norm_name): (String, String),
    conv: Conv2d,
    x: B::View<'_>,
    relu: bool,
    tape: bool,
) -> NormedConv<B> {
    let (ho, wo) = conv.out_hw();
    let len = conv.n * conv.cout * ho * wo;
    let mut pre = tape.then(|| be.zeros(len));
    let mut post = be.zeros(len);
    let mut mean = be.zeros(conv.n * conv.cout);
    let mut rstd = be.zeros(conv.n * conv.cout);
    be.conv2d_norm_forward(
        &conv,
        x,
        view(be, params, idx, &conv_name),
        view(be, params, idx, &format!("{norm_name}.gamma")),
        view(be, params, idx, &format!("{norm_name}.beta")),
        eps,
        relu,
        pre.as_mut().map(|pre| all_mut(be, pre)),
        all_mut(be, &mut post),
        all_mut(be, &mut mean),
        all_mut(be, &mut rstd),
    );
    NormedConv {
        conv_name,
        norm_name,
        conv,
        pre,
        post,
        mean,
        rstd,
        relu,
    }
}

/// Backward of [`normed_conv_forward`]: `dpost` is the gradient at the norm's output; returns
/// the gradient at the conv's input `x` (when asked) and accumulates the three parameter
/// gradients (norm first, then conv: layout order).
fn normed_conv_backward<B: Backend>(
    be: &B,
    params: &B::Buf,
    grads: &mut B::Buf,
    idx: &impl ParamIndex,
    t: &NormedConv<B>,
    x: B::View<'_>,
    dpost: B::View<'_>,
    want_dx: bool,
) -> Option<B::Buf> {
    let (ho, wo) = t.conv.out_hw();
    let c = &t.conv;
    let mut dpre = be.zeros(c.n * c.cout * ho * wo);
    {
        let (dg, db) = two_mut(
            be,
            grads,
            idx,
            &format!("{}.gamma", t.norm_name),
            &format!("{}.beta", t.norm_name),
        );
        be.instance_norm_backward(
            c.n,
            c.cout,
            ho * wo,
            t.relu,
            all(be, t.pre.as_ref().expect("a forward pass with a tape")),
            all(be, &t.post),
            view(be, params, idx, &format!("{}.gamma", t.norm_name)),
            all(be, &t.mean),
            all(be, &t.rstd),
            dpost,
            all_mut(be, &mut dpre),
            dg,
            db,
        );
    }
    be.conv2d_backward_weight(c, x, all(be, &dpre), view_mut(be, grads, idx, &t.conv_name));
    want_dx.then(|| {
        let mut dx = be.zeros(c.n * c.cin * c.h * c.w);
        be.conv2d_backward_data(
            c,
            all(be, &dpre),
            view(be, params, idx, &t.conv_name),
            all_mut(be, &mut dx),
        );
        dx
    })
}

/// Encodes `n` slices `x [n, 1, h, w]` into vectors `[n, d]`, keeping the tape.
pub fn forward<B: Backend>(
    be: &B,
    spec: &EncoderSpec,
    params: &B::Buf,
    idx: &impl ParamIndex,
    x: B::View<'_>,
    n: usize,
    h: usize,
    w: usize,
) -> (B::Buf, EncoderTape<B>) {
    run(be, spec, params, idx, x, n, h, w, true)
}

/// [`forward`] without a tape (a frozen encoder): the same vectors, and no convolution
/// output is kept (each is normalised as it is made, see [`Backend::conv2d_norm_forward`]).
pub fn encode<B: Backend>(
    be: &B,
    spec: &EncoderSpec,
    params: &B::Buf,
    idx: &impl ParamIndex,
    x: B::View<'_>,
    n: usize,
    h: usize,
    w: usize,
) -> B::Buf {
    run(be, spec, params, idx, x, n, h, w, false).0
}

/// The forward pass; `tape` keeps what backward needs (else the tape's convolution
/// outputs and input are missing, and it is only dropped).
fn run<B: Backend>(
    be: &B,
    spec: &EncoderSpec,
    params: &B::Buf,
    idx: &impl ParamIndex,
    x: B::View<'_>,
    n: usize,
    h: usize,
    w: usize,
    tape: bool,
) -> (B::Buf, EncoderTape<B>) {
    let input = tape.then(|| {
        let mut b = be.zeros(n * h * w);
        be.copy(x, all_mut(be, &mut b));
        b
    });
    let plan = Plan::new(spec, n, h, w);
    let stem = |x: B::View<'_>| {
        let names = names("encoder.stem.conv", "encoder.stem.norm");
        normed_conv_forward(be, spec.eps, params, idx, names, plan.stem, x, true, tape)
    };
    let stem = match &input {
        Some(copy) => stem(all(be, copy)),
        None => stem(x),
    };
    let pool = plan.pool;
    let (ph, pw) = pool.out_hw();
    let mut pooled = be.zeros(n * pool.c * ph * pw);
    be.max_pool_forward(&pool, all(be, &stem.post), all_mut(be, &mut pooled));

    let mut blocks: Vec<Block<B>> = Vec::new();
    for bp in &plan.blocks {
        let prefix = &bp.prefix;
        let input = blocks.last().map_or(&pooled, |blk| &blk.out);
        let c1 = normed_conv_forward(
            be,
            spec.eps,
            params,
            idx,
            names(&format!("{prefix}.conv1"), &format!("{prefix}.norm1")),
            bp.conv1,
            all(be, input),
            true,
            tape,
        );
        let c2 = normed_conv_forward(
            be,
            spec.eps,
            params,
            idx,
            names(&format!("{prefix}.conv2"), &format!("{prefix}.norm2")),
            bp.conv2,
            all(be, &c1.post),
            false,
            tape,
        );
        let down = bp.down.map(|conv| {
            normed_conv_forward(
                be,
                spec.eps,
                params,
                idx,
                names(
                    &format!("{prefix}.down.conv"),
                    &format!("{prefix}.down.norm"),
                ),
                conv,
                all(be, input),
                false,
                tape,
            )
        });
        let len = be.len(&c2.post);
        let mut out = be.zeros(len);
        let skip = down.as_ref().map_or(input, |d| &d.post);
        be.add(all(be, &c2.post), all(be, skip), all_mut(be, &mut out));
        let mut relu_out = be.zeros(len);
        be.relu_forward(all(be, &out), all_mut(be, &mut relu_out));
        blocks.push(Block {
            c1,
            c2,
            down,
            out: relu_out,
        });
    }
    let (c, hh, ww) = plan.last;
    let mut feat = be.zeros(n * c);
    let last = blocks.last().map_or(&pooled, |b| &b.out);
    be.avg_pool_forward(n, c, hh * ww, all(be, last), all_mut(be, &mut feat));
    let mut out = be.zeros(n * spec.d);
    linear::forward(
        be,
        n,
        c,
        spec.d,
        all(be, &feat),
        view(be, params, idx, "encoder.fc.weight"),
        view(be, params, idx, "encoder.fc.bias"),
        all_mut(be, &mut out),
    );
    let tape = EncoderTape {
        n,
        input,
        stem,
        pool,
        pooled,
        blocks,
        feat,
    };
    (out, tape)
}

/// Backward through the whole encoder from `dout [n, d]`, accumulating every encoder
/// parameter gradient into `grads` (in layout order: fc first, stem last).
pub fn backward<B: Backend>(
    be: &B,
    spec: &EncoderSpec,
    params: &B::Buf,
    grads: &mut B::Buf,
    idx: &impl ParamIndex,
    tape: &EncoderTape<B>,
    dout: B::View<'_>,
) {
    backward_with_skips(be, spec, params, grads, idx, tape, Some(dout), &[]);
}

/// [`backward`] when a decoder also read the encoder's feature maps: `dskips` holds the
/// gradients at [`EncoderTape::skips`] (same order and shapes; empty when there are none),
/// each added to the gradient flowing back through its map just before the walk passes it.
/// `dout` None: the output vectors were not used (`encoder.fc` gets no gradient).
pub fn backward_with_skips<B: Backend>(
    be: &B,
    spec: &EncoderSpec,
    params: &B::Buf,
    grads: &mut B::Buf,
    idx: &impl ParamIndex,
    tape: &EncoderTape<B>,
    dout: Option<B::View<'_>>,
    dskips: &[B::Buf],
) {
    let stages = tape.blocks.len() / BLOCKS_PER_STAGE;
    assert!(
        dskips.is_empty() || dskips.len() == 2 + stages,
        "{} skip gradients for the encoder's {} feature maps",
        dskips.len(),
        2 + stages
    );
    // Index into `dskips`: 0 the stem, 1 the max-pool, 2 + s the end of stage s.
    let add_skip = |k: usize, d: &mut B::Buf| {
        if let Some(ds) = dskips.get(k) {
            be.axpy(1.0, all(be, ds), all_mut(be, d));
        }
    };
    let n = tape.n;
    let c_last = *spec.widths.last().unwrap_or(&0);
    let last_hw = tape.blocks.last().map_or(0, |b| {
        let (h, w) = b.c2.conv.out_hw();
        h * w
    });
    let mut d = be.zeros(n * c_last * last_hw);
    if let Some(dout) = dout {
        let mut dfeat = be.zeros(n * c_last);
        {
            let (dw, db) = two_mut(be, grads, idx, "encoder.fc.weight", "encoder.fc.bias");
            linear::backward(
                be,
                n,
                c_last,
                spec.d,
                all(be, &tape.feat),
                view(be, params, idx, "encoder.fc.weight"),
                dout,
                Some(all_mut(be, &mut dfeat)),
                dw,
                db,
            );
        }
        be.avg_pool_backward(n, c_last, last_hw, all(be, &dfeat), all_mut(be, &mut d));
    }

    for (i, blk) in tape.blocks.iter().enumerate().rev() {
        if (i + 1) % BLOCKS_PER_STAGE == 0 {
            add_skip(2 + i / BLOCKS_PER_STAGE, &mut d);
        }
        let input = if i == 0 {
            &tape.pooled
        } else {
            &tape.blocks[i - 1].out
        };
        let mut g = be.zeros(be.len(&blk.out));
        be.relu_backward(all(be, &blk.out), all(be, &d), all_mut(be, &mut g));
        // The skip path first: its parameters come first in the layout.
        let dskip = match &blk.down {
            Some(down) => normed_conv_backward(
                be,
                params,
                grads,
                idx,
                down,
                all(be, input),
                all(be, &g),
                true,
            ),
            None => None,
        };
        let da1 = normed_conv_backward(
            be,
            params,
            grads,
            idx,
            &blk.c2,
            all(be, &blk.c1.post),
            all(be, &g),
            true,
        )
        .unwrap_or_else(|| be.zeros(0));
        let dmain = normed_conv_backward(
            be,
            params,
            grads,
            idx,
            &blk.c1,
            all(be, input),
            all(be, &da1),
            true,
        )
        .unwrap_or_else(|| be.zeros(0));
        // dx = dmain + the skip path's gradient, in place (no zeroed buffer, one pass).
        let mut dx = dmain;
        let skip_grad = dskip.as_ref().unwrap_or(&g);
        be.axpy(1.0, all(be, skip_grad), all_mut(be, &mut dx));
        d = dx;
    }
    add_skip(1, &mut d);
    let mut dstem = be.zeros(be.len(&tape.stem.post));
    be.max_pool_backward(
        &tape.pool,
        all(be, &tape.stem.post),
        all(be, &tape.pooled),
        all(be, &d),
        all_mut(be, &mut dstem),
    );
    add_skip(0, &mut dstem);
    normed_conv_backward(
        be,
        params,
        grads,
        idx,
        &tape.stem,
        all(be, tape.input.as_ref().expect("a forward pass with a tape")),
        all(be, &dstem),
        false,
    );
}

/// Multiply-adds x 2 of one forward pass over one `h x w` slice (convolutions and the final
/// linear layer; norms and pooling are not counted), following the shapes of [`forward`].
pub fn forward_flops(spec: &EncoderSpec, h: usize, w: usize) -> f64 {
    let conv_flops = |c: &Conv2d| {
        let (ho, wo) = c.out_hw();
        2.0 * (c.cout * c.cin * c.k * c.k * ho * wo) as f64
    };
    let plan = Plan::new(spec, 1, h, w);
    let blocks: f64 = plan
        .blocks
        .iter()
        .map(|b| {
            conv_flops(&b.conv1) + conv_flops(&b.conv2) + b.down.as_ref().map_or(0.0, conv_flops)
        })
        .sum();
    conv_flops(&plan.stem) + blocks + 2.0 * (plan.last.0 * spec.d) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu64;
    use crate::backend::cpu::gradcheck::{dot, random};
    use crate::model::objective::Net;
    use crate::model::{Kind, Layout, ModelConfig, Part, Preset, init};

    struct Case {
        layout: Layout,
        spec: EncoderSpec,
        params: Vec<f64>,
        x: Vec<f64>,
        /// The loss is `sum(out * r_out) + sum_k sum(skip_k * r_k)`.
        r_out: Vec<f64>,
        r_skips: Vec<Vec<f64>>,
    }

    const N: usize = 2;
    const H: usize = 32;
    const W: usize = 38;

    /// The tiny encoder on 2 random slices, norms moved off their initial 1 and 0.
    fn case() -> Case {
        let cfg = ModelConfig::preset(Preset::Tiny);
        let layout = Layout::new(&cfg);
        let spec = Net::new(&cfg).encoder;
        let mut params: Vec<f64> = init::init_params(&layout, 2)
            .into_iter()
            .map(f64::from)
            .collect();
        for e in layout.iter().filter(|e| e.part == Part::Encoder) {
            if matches!(e.kind, Kind::NormGamma | Kind::NormBeta) {
                for (i, v) in random(e.len, e.offset as u64).into_iter().enumerate() {
                    params[e.offset + i] += 0.3 * v;
                }
            }
        }
        let x = random(N * H * W, 1);
        let (_, tape) = forward(&Cpu64, &spec, &params, &layout, &x, N, H, W);
        let r_skips = tape
            .skips()
            .iter()
            .enumerate()
            .map(|(k, (buf, (c, h, w)))| {
                assert_eq!(buf.len(), N * c * h * w);
                random(buf.len(), 10 + k as u64)
            })
            .collect();
        Case {
            r_out: random(N * spec.d, 2),
            layout,
            spec,
            params,
            x,
            r_skips,
        }
    }

    fn loss(c: &Case, params: &Vec<f64>) -> f64 {
        let (out, tape) = forward(&Cpu64, &c.spec, params, &c.layout, &c.x, N, H, W);
        let skips: f64 = tape
            .skips()
            .iter()
            .zip(&c.r_skips)
            .map(|((buf, _), r)| dot(buf, r))
            .sum();
        dot(&out, &c.r_out) + skips
    }

    fn grads(c: &Case, dout: Option<&[f64]>, dskips: &[Vec<f64>]) -> Vec<f64> {
        let be = Cpu64;
        let (_, tape) = forward(&be, &c.spec, &c.params, &c.layout, &c.x, N, H, W);
        let mut g = vec![0.0; c.params.len()];
        backward_with_skips(
            &be, &c.spec, &c.params, &mut g, &c.layout, &tape, dout, dskips,
        );
        g
    }

    /// Three coordinates of every encoder tensor against central differences (h = 1e-5),
    /// with gradients arriving both through the output vectors and through every map.
    /// Without a tape the encoder gives the same vectors, bit for bit.
    #[test]
    fn encode_gives_the_vectors_of_forward() {
        let c = case();
        let be = crate::backend::cpu::Cpu;
        let params: Vec<f32> = c.params.iter().map(|&v| v as f32).collect();
        let x: Vec<f32> = c.x.iter().map(|&v| v as f32).collect();
        let (params, x) = (be.upload(&params), be.upload(&x));
        let (want, _) = forward(&be, &c.spec, &params, &c.layout, all(&be, &x), N, H, W);
        let got = encode(&be, &c.spec, &params, &c.layout, all(&be, &x), N, H, W);
        assert_eq!(got, want);
    }

    #[test]
    fn skip_gradients_match_finite_differences() {
        let c = case();
        let g = grads(&c, Some(&c.r_out), &c.r_skips);
        let (mut rel, mut abs) = (0.0f64, 0.0f64);
        let mut p = c.params.clone();
        for e in c.layout.iter().filter(|e| e.part == Part::Encoder) {
            for i in [e.offset, e.offset + e.len / 2, e.offset + e.len - 1] {
                let h = 1e-5;
                let keep = p[i];
                p[i] = keep + h;
                let up = loss(&c, &p);
                p[i] = keep - h;
                let down = loss(&c, &p);
                p[i] = keep;
                let n = (up - down) / (2.0 * h);
                let err = (g[i] - n).abs();
                assert!(
                    err <= 1e-5 * n.abs().max(g[i].abs()) + 1e-8,
                    "{}[{}]: analytic {} vs numeric {n}",
                    e.name,
                    i - e.offset,
                    g[i]
                );
                rel = rel.max(err / n.abs().max(g[i].abs()).max(1e-300));
                abs = abs.max(err);
            }
        }
        println!("encoder with skips: max relative error {rel:.2e}, max absolute {abs:.1e}");
    }

    /// Zero skip gradients change nothing, and the two routes add up (backward is linear in
    /// its incoming gradients); without `dout`, `encoder.fc` gets nothing.
    #[test]
    fn skip_gradients_add_to_the_output_route() {
        let c = case();
        let plain = {
            let be = Cpu64;
            let (_, tape) = forward(&be, &c.spec, &c.params, &c.layout, &c.x, N, H, W);
            let mut g = vec![0.0; c.params.len()];
            backward(&be, &c.spec, &c.params, &mut g, &c.layout, &tape, &c.r_out);
            g
        };
        assert!(grads(&c, Some(&c.r_out), &[]) == plain);
        let zeros: Vec<Vec<f64>> = c.r_skips.iter().map(|r| vec![0.0; r.len()]).collect();
        assert!(grads(&c, Some(&c.r_out), &zeros) == plain);
        let only_skips = grads(&c, None, &c.r_skips);
        let fc = c.layout.range("encoder.fc.weight").unwrap().start
            ..c.layout.range("encoder.fc.bias").unwrap().end;
        assert!(only_skips[fc].iter().all(|&g| g == 0.0));
        let both = grads(&c, Some(&c.r_out), &c.r_skips);
        for ((b, p), s) in both.iter().zip(&plain).zip(&only_skips) {
            assert!(
                (b - p - s).abs() <= 1e-12 * (1.0 + b.abs()),
                "{b} vs {p} + {s}"
            );
        }
    }
}

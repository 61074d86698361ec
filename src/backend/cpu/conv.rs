//! 2-D convolution (no bias) on the CPU backend: forward, backward to the input and backward
//! to the weight, as im2col + GEMM kernels of our own (AVX2+FMA for f32, portable otherwise),
//! one image per rayon task. Every output value is summed by one thread in a fixed order; the
//! weight gradient sums fixed chunks of the batch and adds the chunks in order, so the thread
//! count never changes a bit.
use super::{Real, norm};
use crate::backend::Conv2d;
use rayon::prelude::*;
use std::any::TypeId;
use std::cell::RefCell;

/// The weight gradient sums the batch in this many fixed chunks, one weight-sized partial
/// sum each: enough tasks for the few threads of a rank, little memory (measured: splitting
/// the gradient's columns among tasks instead re-reads every image's dY per task and runs
/// at half the speed).
const WEIGHT_CHUNKS: usize = 8;

/// Positions per group of images in the weight gradient's dot products (see
/// [`backward_weight`]): maps with more are summed one image at a time.
const GROUP_POSITIONS: usize = 252;

/// A read-only matrix over a slice: element `(i, j)` is `data[i * rs + j * cs]`, which lets
/// the GEMM read transposed operands (the weight in backward-data, the columns in
/// backward-weight) without copying them first.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

/// Per-thread buffers: the columns of one image (or group), its zero-padded copy, outputs
/// and the GEMM's packs. They live as long as the thread, so a training run does not page-fault
/// fresh buffers on every call.
struct Scratch<T> {
    col: Vec<T>,
    /// One image's convolution output when the caller keeps none (the fused norm's input).
    out: Vec<T>,
    /// The output of a group of images' GEMM ([`Table`]), before it is split per image.
    gout: Vec<T>,
    xpad: Vec<T>,
    gemm: gemm::Packs<T>,
}

impl<T: Real> Scratch<T> {
    fn new() -> Self {
        Scratch {
            col: Vec::new(),
            out: Vec::new(),
            gout: Vec::new(),
            xpad: Vec::new(),
            gemm: gemm::Packs::new(),
        }
    }
}

thread_local! {
    static SCRATCH_F32: RefCell<Scratch<f32>> = RefCell::new(Scratch::new());
    static SCRATCH_F64: RefCell<Scratch<f64>> = RefCell::new(Scratch::new());
}

/// Runs `f` with this thread's scratch, its column buffer at least `col_len` long. `f` must
/// not start rayon work (a stolen task would find the scratch borrowed; it would then fall
/// back to fresh buffers, correct but slow).
fn with_scratch<T: Real, R>(col_len: usize, f: impl FnOnce(&mut Scratch<T>) -> R) -> R {
    fn run<T: Real, U: Real, R>(
        cell: &RefCell<Scratch<U>>,
        col_len: usize,
        f: impl FnOnce(&mut Scratch<T>) -> R,
    ) -> R {
        assert!(
            TypeId::of::<T>() == TypeId::of::<U>(),
            "scratch of another type"
        );
        match cell.try_borrow_mut() {
            Ok(mut sc) => {
                // SAFETY: T and U are the same type (asserted above).
                let sc = unsafe { &mut *(&mut *sc as *mut Scratch<U> as *mut Scratch<T>) };
                if sc.col.len() < col_len {
                    sc.col.resize(col_len, T::zero());
                }
                f(sc)
            }
            Err(_) => {
                let mut sc = Scratch::new();
                sc.col.resize(col_len, T::zero());
                f(&mut sc)
            }
        }
    }
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        SCRATCH_F32.with(|cell| run(cell, col_len, f))
    } else if TypeId::of::<T>() == TypeId::of::<f64>() {
        SCRATCH_F64.with(|cell| run(cell, col_len, f))
    } else {
        let mut sc = Scratch::new();
        sc.col.resize(col_len, T::zero());
        f(&mut sc)
    }
}

fn check_shapes(s: &Conv2d, x: usize, w: usize, y: usize, what: &str) {
    let (ho, wo) = s.out_hw();
    assert!(
        s.k > 0 && s.stride > 0,
        "{what}: kernel and stride must be positive"
    );
    assert!(
        s.h + 2 * s.pad >= s.k && s.w + 2 * s.pad >= s.k,
        "{what}: kernel exceeds input"
    );
    assert_eq!(x, s.n * s.cin * s.h * s.w, "{what}: input length");
    assert_eq!(w, s.cout * s.cin * s.k * s.k, "{what}: weight length");
    assert_eq!(y, s.n * s.cout * ho * wo, "{what}: output length");
}

/// A 1x1 convolution with stride 1 and no padding reads the image itself as its columns.
fn is_pointwise(s: &Conv2d) -> bool {
    s.k == 1 && s.stride == 1 && s.pad == 0
}

/// Convolutions whose output rows are at least six times the extra values of a phase
/// plane's row read their columns in place ([`Implicit`]). (Measured on the encoder's
/// stride-1 layers: 30 % faster forward at 29 and 15 wide, the same at 8, 40 % slower at 4.)
fn is_implicit(s: &Conv2d) -> bool {
    let wo = s.out_hw().1;
    s.h * s.w > 0 && s.k > 1 && 6 * ((s.w + 2 * s.pad).div_ceil(s.stride) - wo) <= wo
}

/// Columns read in place (an implicit im2col). The zero-padded image is split by the stride
/// into `stride²` phase planes per channel, plane `(a, b)` holding the padded pixels `(i
/// stride + a, j stride + b)`, `hph x wph` (zero past the padded image; for stride 1 the one
/// plane is the padded image). Tap `(ky, kx)` of output `(oy, ox)` is pixel `(oy + ky /
/// stride, ox + kx / stride)` of plane `(ky % stride, kx % stride)`: with the output computed
/// on the planes' width (`ho` rows of `wph`, of which the last `wph - wo` wrap into the next
/// row and are dropped), column row `(ci k + ky) k + kx` is the planes themselves from one
/// offset.
struct Implicit {
    stride: usize,
    hph: usize,
    wph: usize,
    /// Per column row, its offset in the planes.
    offs: Vec<usize>,
    /// Length the planes are read to: the last offset plus the output positions rounded up
    /// to whole panels.
    len: usize,
}

impl Implicit {
    fn new(s: &Conv2d) -> Self {
        let st = s.stride;
        let (hph, wph) = (
            (s.h + 2 * s.pad).div_ceil(st),
            (s.w + 2 * s.pad).div_ceil(st),
        );
        let k = s.k;
        let offs: Vec<usize> = (0..s.cin * k * k)
            .map(|r| {
                let (ci, ky, kx) = (r / (k * k), r / k % k, r % k);
                ((ci * st + ky % st) * st + kx % st) * hph * wph + ky / st * wph + kx / st
            })
            .collect();
        let q = s.out_hw().0 * wph;
        let len = offs
            .iter()
            .max()
            .map_or(0, |m| m + q.div_ceil(gemm::NR) * gemm::NR);
        Implicit {
            stride: st,
            hph,
            wph,
            offs,
            len,
        }
    }

    /// Output positions per image, on the planes' width.
    fn positions(&self, s: &Conv2d) -> usize {
        s.out_hw().0 * self.wph
    }

    /// The planes of image `x` into `xp` (every value written: the buffer holds earlier
    /// images), zeros after them up to the length the columns read.
    fn fill<T: Real>(&self, s: &Conv2d, x: &[T], xp: &mut Vec<T>) {
        let (st, pad, w) = (self.stride, s.pad, s.w);
        let planes = s.cin * st * st * self.hph * self.wph;
        xp.resize(planes.max(self.len), T::zero());
        let (body, tail) = xp.split_at_mut(planes);
        tail.fill(T::zero());
        let mut rows = body.chunks_exact_mut(self.wph);
        for img in x.chunks_exact(s.h * w).take(s.cin) {
            for a in 0..st {
                for b in 0..st {
                    // Columns j whose padded column `j st + b` is inside the image.
                    let j0 = pad.saturating_sub(b).div_ceil(st).min(self.wph);
                    let j1 = (w + pad).saturating_sub(b).div_ceil(st).clamp(j0, self.wph);
                    for i in 0..self.hph {
                        let dst = rows.next().expect("a row per plane row");
                        let y = (i * st + a).wrapping_sub(pad);
                        if y >= s.h {
                            dst.fill(T::zero());
                            continue;
                        }
                        dst[..j0].fill(T::zero());
                        dst[j1..].fill(T::zero());
                        let src = &img[y * w + j0 * st + b - pad..];
                        gather(&mut dst[j0..j1], src, st);
                    }
                }
            }
        }
    }
}

/// Copies image `x` (`cin` planes of `h x w`) into `xp` with a zero border of `pad` on
/// every side, so the column writers below read every tap without bounds tests.
fn pad_image<T: Real>(s: &Conv2d, x: &[T], xp: &mut Vec<T>) {
    let (hp, wp, pad) = (s.h + 2 * s.pad, s.w + 2 * s.pad, s.pad);
    xp.resize(s.cin * hp * wp, T::zero());
    // Every value is written (border zeros included): the buffer holds earlier images.
    for (src, dst) in x.chunks_exact(s.h * s.w).zip(xp.chunks_exact_mut(hp * wp)) {
        dst[..pad * wp].fill(T::zero());
        dst[(pad + s.h) * wp..].fill(T::zero());
        for (src, dst) in src
            .chunks_exact(s.w)
            .zip(dst[pad * wp..].chunks_exact_mut(wp))
        {
            dst[..pad].fill(T::zero());
            dst[pad..pad + s.w].copy_from_slice(src);
            dst[pad + s.w..].fill(T::zero());
        }
    }
}

/// The column matrix `col[(ci k + ky) k + kx][oy wo + ox] = x[ci][oy s - p + ky][ox s - p +
/// kx]` (0 outside), its rows `ld` apart, read from a zero-padded copy of the image (made in
/// `xpad`). Kept out of line: inlined into the weight gradient's loop it measured 12 %
/// slower there (stage 4).
#[inline(never)]
fn im2col<T: Real>(s: &Conv2d, x: &[T], xpad: &mut Vec<T>, col: &mut [T], ld: usize) {
    let (ho, wo) = s.out_hw();
    let (hp, wp) = (s.h + 2 * s.pad, s.w + 2 * s.pad);
    pad_image(s, x, xpad);
    let mut r = 0;
    for plane in xpad.chunks_exact(hp * wp) {
        for ky in 0..s.k {
            for kx in 0..s.k {
                let row = &mut col[r * ld..][..ho * wo];
                r += 1;
                for (oy, dst) in row.chunks_exact_mut(wo).enumerate() {
                    gather(dst, &plane[(oy * s.stride + ky) * wp + kx..], s.stride);
                }
            }
        }
    }
}

/// `dst[i] = src[i stride]` for every `i < dst.len()`.
#[inline(always)]
fn gather<T: Real>(dst: &mut [T], src: &[T], stride: usize) {
    match stride {
        1 if dst.len() <= gemm::NR / 2 => copy_short(dst, &src[..dst.len()]),
        1 => dst.copy_from_slice(&src[..dst.len()]),
        2 => strided::<T, 2>(dst, src, |o, v| *o = v),
        st => dst
            .iter_mut()
            .zip(src.iter().step_by(st))
            .for_each(|(o, v)| *o = *v),
    }
}

/// `dst[i stride] += src[i]` for every `i < src.len()`: the adjoint of [`gather`].
#[inline(always)]
fn scatter_add<T: Real>(src: &[T], dst: &mut [T], stride: usize) {
    match stride {
        1 => src.iter().zip(dst).for_each(|(v, d)| *d += *v),
        2 => strided_add::<T, 2>(src, dst),
        st => src
            .iter()
            .zip(dst.iter_mut().step_by(st))
            .for_each(|(v, d)| *d += *v),
    }
}

/// Columns of the layers that do not read them in place (the narrow maps of the last
/// stages, strided 1x1 convolutions), gathered through a table straight into the GEMM's
/// packed right-operand layout, for a group of images at once: row `r` of column `q` lands
/// at lane `q % NR` of panel `q / NR` in `r`'s block of `KC` rows, and columns run over the
/// group's images one after the other, so maps of a few positions (stage 4's 12) still fill
/// whole `NR`-wide register tiles, and one pass of the weight serves the whole group. The
/// table holds one offset per run of `run` lanes: with stride 1 a run of output positions
/// along a row reads consecutive pixels, so whole runs are copied (measured on stage 3's
/// 8-wide map: the fill 5x faster than one offset per lane).
struct Table {
    /// Images per group.
    imgs: usize,
    /// Columns of a whole group rounded up to panels.
    npad: usize,
    /// Lanes per offset: 8, 4, 2 or 1, dividing both `NR` and, with stride 1, the output
    /// width (else 1), so no run crosses a row, an image or a panel.
    run: usize,
    /// Per tap `ky k + kx` and run of `run` columns up to `npad`: the offset of its first
    /// value in the group's zero-padded images, from channel 0 of image 0 (columns past the
    /// group's positions read offset 0: their products land in columns of `C` that are
    /// never kept).
    idx: Vec<u32>,
}

impl Table {
    /// Columns per group aimed at: up to this many, the group whose last panel wastes the
    /// fewest lanes (at 12 positions, 4 images fill 3 panels exactly).
    const TARGET: usize = 4 * gemm::NR;

    fn new(s: &Conv2d) -> Self {
        let (ho, wo) = s.out_hw();
        let p = ho * wo;
        let waste = |g: usize| (g * p).div_ceil(gemm::NR) * gemm::NR - g * p;
        let most = Self::TARGET.div_ceil(p.max(1)).clamp(1, s.n.max(1));
        let imgs = (1..=most)
            .min_by_key(|&g| (waste(g) * 4096 / (g * p.max(1)), g))
            .expect("at least one group size");
        let npos = imgs * p;
        let npad = npos.div_ceil(gemm::NR) * gemm::NR;
        let run = [8, 4, 2]
            .into_iter()
            .find(|&l| s.stride == 1 && wo % l == 0 && gemm::NR % l == 0)
            .unwrap_or(1);
        let (hp, wp) = (s.h + 2 * s.pad, s.w + 2 * s.pad);
        let img = s.cin * hp * wp;
        assert!(
            imgs * img <= u32::MAX as usize,
            "conv: images too large for the table"
        );
        let mut idx = vec![0u32; s.k * s.k * npad / run];
        for (t, row) in idx.chunks_exact_mut((npad / run).max(1)).enumerate() {
            let (ky, kx) = (t / s.k, t % s.k);
            for (q, o) in (0..npos).step_by(run).zip(row) {
                let (g, oy, ox) = (q / p, q % p / wo, q % wo);
                *o = (g * img + (oy * s.stride + ky) * wp + ox * s.stride + kx) as u32;
            }
        }
        Table {
            imgs,
            npad,
            run,
            idx,
        }
    }

    /// Length of the packed columns of a full group.
    fn len(&self, s: &Conv2d) -> usize {
        s.cin * s.k * s.k * self.npad
    }

    /// The packed columns of the `g <= imgs` images `x` into `packed`, their padded copy
    /// made in `xpad`.
    fn fill<T: Real>(&self, s: &Conv2d, x: &[T], g: usize, xpad: &mut Vec<T>, packed: &mut [T]) {
        match self.run {
            8 => self.fill_runs::<T, 8>(s, x, g, xpad, packed),
            4 => self.fill_runs::<T, 4>(s, x, g, xpad, packed),
            2 => self.fill_runs::<T, 2>(s, x, g, xpad, packed),
            _ => self.fill_runs::<T, 1>(s, x, g, xpad, packed),
        }
    }

    fn fill_runs<T: Real, const L: usize>(
        &self,
        s: &Conv2d,
        x: &[T],
        g: usize,
        xpad: &mut Vec<T>,
        packed: &mut [T],
    ) {
        let (ho, wo) = s.out_hw();
        let npad = (g * ho * wo).div_ceil(gemm::NR) * gemm::NR;
        let kk = s.cin * s.k * s.k;
        let plane = (s.h + 2 * s.pad) * (s.w + 2 * s.pad);
        let group = Conv2d {
            cin: g * s.cin,
            ..*s
        };
        pad_image(&group, x, xpad);
        // The unused lanes of a short group's last panel still read inside the buffer.
        xpad.resize(self.imgs * s.cin * plane, T::zero());
        for ci in 0..s.cin {
            let src = &xpad[ci * plane..];
            for t in 0..s.k * s.k {
                let r = ci * s.k * s.k + t;
                let p0 = r / gemm::KC * gemm::KC;
                let panel_len = gemm::KC.min(kk - p0) * gemm::NR;
                let row0 = p0 * npad + (r - p0) * gemm::NR;
                let runs = self.idx[t * self.npad / L..][..npad / L].chunks_exact(gemm::NR / L);
                for (jp, runs) in runs.enumerate() {
                    let dst = &mut packed[row0 + jp * panel_len..][..gemm::NR];
                    for (d, &o) in dst.chunks_exact_mut(L).zip(runs) {
                        let v: &[T; L] = src[o as usize..][..L].try_into().expect("a run");
                        d.copy_from_slice(v);
                    }
                }
            }
        }
    }
}

/// `dst = src` for short rows (at most `NR` values): whole
/// 8-value chunks as fixed-size copies, the rest one by one, so no run becomes a `memcpy`
/// call (measured: the call cost more than the copy).
#[inline(always)]
fn copy_short<T: Copy>(dst: &mut [T], src: &[T]) {
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d, s) in (&mut d).zip(&mut s) {
        let s: &[T; 8] = s.try_into().expect("chunk of 8");
        d.copy_from_slice(s);
    }
    let (d, s) = (d.into_remainder(), s.remainder());
    match d.len() {
        0 => {}
        1 => d[0] = s[0],
        2 => d.copy_from_slice(<&[T; 2]>::try_from(&s[..2]).expect("2")),
        3 => d.copy_from_slice(<&[T; 3]>::try_from(&s[..3]).expect("3")),
        4 => d.copy_from_slice(<&[T; 4]>::try_from(&s[..4]).expect("4")),
        5 => d.copy_from_slice(<&[T; 5]>::try_from(&s[..5]).expect("5")),
        6 => d.copy_from_slice(<&[T; 6]>::try_from(&s[..6]).expect("6")),
        _ => d.copy_from_slice(<&[T; 7]>::try_from(&s[..7]).expect("7")),
    }
}

/// `f(dense[i], sparse[i S])` for every `i < dense.len()` (`S` known at compile time, so
/// the loop vectorises; `step_by` with a run-time step does not).
#[inline(always)]
fn strided<T, const S: usize>(dense: &mut [T], sparse: &[T], mut f: impl FnMut(&mut T, T))
where
    T: Copy,
{
    let Some((last, head)) = dense.split_last_mut() else {
        return;
    };
    for (d, c) in head.iter_mut().zip(sparse.chunks_exact(S)) {
        f(d, c[0]);
    }
    f(last, sparse[head.len() * S]);
}

/// `sparse[i S] += dense[i]` for every `i < dense.len()`: the adjoint of [`strided`].
#[inline(always)]
fn strided_add<T: Real, const S: usize>(dense: &[T], sparse: &mut [T]) {
    let Some((&last, head)) = dense.split_last() else {
        return;
    };
    for (&v, c) in head.iter().zip(sparse.chunks_exact_mut(S)) {
        c[0] += v;
    }
    sparse[head.len() * S] += last;
}

/// The adjoint of [`im2col`]: each column value is added back to its input, in a zero-padded
/// image (made in `dxpad`) whose interior is then `dx`.
fn col2im<T: Real>(s: &Conv2d, col: &[T], dxpad: &mut Vec<T>, dx: &mut [T]) {
    let (ho, wo) = s.out_hw();
    let (hp, wp, pad) = (s.h + 2 * s.pad, s.w + 2 * s.pad, s.pad);
    dxpad.clear();
    dxpad.resize(s.cin * hp * wp, T::zero());
    let mut rows = col.chunks_exact(ho * wo);
    for plane in dxpad.chunks_exact_mut(hp * wp) {
        for ky in 0..s.k {
            for kx in 0..s.k {
                let row = rows.next().expect("a column row per tap");
                for (oy, src) in row.chunks_exact(wo).enumerate() {
                    scatter_add(src, &mut plane[(oy * s.stride + ky) * wp + kx..], s.stride);
                }
            }
        }
    }
    for (src, dst) in dxpad
        .chunks_exact(hp * wp)
        .zip(dx.chunks_exact_mut(s.h * s.w))
    {
        for (src, dst) in src[pad * wp..]
            .chunks_exact(wp)
            .zip(dst.chunks_exact_mut(s.w))
        {
            dst.copy_from_slice(&src[pad..pad + s.w]);
        }
    }
}

/// `y = w * x`: per image `Y [cout, ho wo] = W [cout, cin k k] Col [cin k k, ho wo]`.
pub fn forward<T: Real>(s: &Conv2d, x: &[T], w: &[T], y: &mut [T]) {
    forward_then(s, x, w, Some(y), None);
}

/// Instance norm (with an optional ReLU) of a convolution's output, as
/// `norm::instance_forward` computes it: `post`, `mean` and `rstd` of the whole batch.
pub struct Norm<'a, T> {
    pub eps: f32,
    pub relu: bool,
    pub gamma: &'a [T],
    pub beta: &'a [T],
    pub post: &'a mut [T],
    pub mean: &'a mut [T],
    pub rstd: &'a mut [T],
}

/// [`forward`] into `pre`, then `norm` of each image right after its convolution, while
/// the output is still in cache (the same values as the two passes one after the other).
/// Without `pre` the convolution output lives only in a per-thread buffer.
pub fn forward_normed<T: Real>(s: &Conv2d, x: &[T], w: &[T], pre: Option<&mut [T]>, norm: Norm<T>) {
    forward_then(s, x, w, pre, Some(norm));
}

fn forward_then<T: Real>(s: &Conv2d, x: &[T], w: &[T], y: Option<&mut [T]>, norm: Option<Norm<T>>) {
    let (ho, wo) = s.out_hw();
    let (kk, p) = (s.cin * s.k * s.k, ho * wo);
    let y_len = y.as_ref().map_or(s.n * s.cout * p, |y| y.len());
    check_shapes(s, x.len(), w.len(), y_len, "conv forward");
    // Per image: its output (when kept) and its part of the norm's outputs.
    type NormPart<'a, T> = (&'a mut [T], &'a mut [T], &'a mut [T]);
    let mut ys: Vec<Option<&mut [T]>> = (0..s.n).map(|_| None).collect();
    let mut norms: Vec<Option<NormPart<T>>> = (0..s.n).map(|_| None).collect();
    if let Some(y) = y {
        for (slot, y) in ys.iter_mut().zip(y.chunks_mut((s.cout * p).max(1))) {
            *slot = Some(y);
        }
    }
    let mut affine = None;
    if let Some(nm) = norm {
        let c = s.cout;
        assert_eq!(nm.post.len(), y_len, "conv forward: norm output length");
        assert!(
            nm.mean.len() == s.n * c && nm.rstd.len() == s.n * c,
            "conv forward: moments"
        );
        assert!(
            nm.gamma.len() == c && nm.beta.len() == c,
            "conv forward: norm parameters"
        );
        let parts = nm.post.chunks_mut((c * p).max(1)).zip(
            nm.mean
                .chunks_mut(c.max(1))
                .zip(nm.rstd.chunks_mut(c.max(1))),
        );
        for (slot, (post, (mean, rstd))) in norms.iter_mut().zip(parts) {
            *slot = Some((post, mean, rstd));
        }
        affine = Some((nm.eps, nm.relu, nm.gamma, nm.beta));
    }
    if s.n == 0 || p == 0 || s.cout == 0 {
        return;
    }
    // The weight is packed once for the whole batch.
    let wp = gemm::pack_lhs(
        s.cout,
        kk,
        Mat {
            data: w,
            rs: kk,
            cs: 1,
        },
    );
    let cols = if s.cin == 0 {
        Columns::None
    } else if is_pointwise(s) {
        Columns::Pointwise
    } else if is_implicit(s) {
        Columns::Implicit(Implicit::new(s))
    } else {
        Columns::Table(Table::new(s))
    };
    let (col_len, group) = match &cols {
        Columns::None | Columns::Pointwise => (0, 1),
        Columns::Implicit(im) => (s.cout * im.positions(s), 1),
        Columns::Table(t) => (t.len(s), t.imgs),
    };
    let x_img = s.cin * s.h * s.w;
    ys.par_chunks_mut(group)
        .zip(norms.par_chunks_mut(group))
        .enumerate()
        .for_each(|(gi, (ys, norms))| {
            let g = ys.len();
            let x = &x[gi * group * x_img..][..g * x_img];
            with_scratch(col_len, |sc: &mut Scratch<T>| {
                let mut out = std::mem::take(&mut sc.out);
                let mut gout = std::mem::take(&mut sc.gout);
                // A group of several images: one GEMM for all, each image's part copied out.
                if let (Columns::Table(t), true) = (&cols, g > 1) {
                    let n = g * p;
                    t.fill(s, x, g, &mut sc.xpad, &mut sc.col[..col_len]);
                    let b = gemm::Rhs::Packed(&sc.col[..col_len]);
                    gout.resize(s.cout * n, T::zero());
                    gemm::multiply(s.cout, n, kk, &wp, b, &mut gout, &mut sc.gemm);
                }
                for (i, (y, norm)) in ys.iter_mut().zip(norms.iter_mut()).enumerate() {
                    let y = match y.take() {
                        Some(y) => y,
                        None => {
                            out.resize(s.cout * p, T::zero());
                            &mut out[..]
                        }
                    };
                    if g > 1 {
                        for (dst, src) in y.chunks_exact_mut(p).zip(gout.chunks_exact(g * p)) {
                            dst.copy_from_slice(&src[i * p..][..p]);
                        }
                    } else {
                        image_forward(s, x, &wp, &cols, col_len, y, sc);
                    }
                    if let (Some((post, mean, rstd)), Some((eps, relu, gamma, beta))) =
                        (norm.take(), affine)
                    {
                        norm::instance_forward_image(eps, relu, y, gamma, beta, post, mean, rstd);
                    }
                }
                sc.out = out;
                sc.gout = gout;
            })
        });
}

/// How a forward convolution gets its columns.
enum Columns {
    /// No input channels: the output is zero.
    None,
    /// The image is its own columns ([`is_pointwise`]).
    Pointwise,
    /// Read in place from phase planes.
    Implicit(Implicit),
    /// Gathered into the packed layout, a group of images per GEMM.
    Table(Table),
}

/// One image of [`forward`]: `y [cout, ho wo]` from `x [cin, h, w]` and the packed weight.
fn image_forward<T: Real>(
    s: &Conv2d,
    x: &[T],
    wp: &[T],
    cols: &Columns,
    col_len: usize,
    y: &mut [T],
    sc: &mut Scratch<T>,
) {
    let (ho, wo) = s.out_hw();
    let (kk, p) = (s.cin * s.k * s.k, ho * wo);
    let b = match cols {
        Columns::None => {
            y.fill(T::zero());
            return;
        }
        Columns::Implicit(im) => {
            let q = im.positions(s);
            im.fill(s, x, &mut sc.xpad);
            let b = gemm::Rhs::Rows {
                base: &sc.xpad,
                offs: &im.offs,
            };
            let yq = &mut sc.col[..col_len];
            gemm::multiply(s.cout, q, kk, wp, b, yq, &mut sc.gemm);
            for (y, yq) in y.chunks_exact_mut(p).zip(yq.chunks_exact(q)) {
                for (dst, src) in y.chunks_exact_mut(wo).zip(yq.chunks_exact(im.wph)) {
                    dst.copy_from_slice(&src[..wo]);
                }
            }
            return;
        }
        Columns::Pointwise => gemm::Rhs::Strided(Mat {
            data: x,
            rs: p,
            cs: 1,
        }),
        Columns::Table(t) => {
            t.fill(s, x, 1, &mut sc.xpad, &mut sc.col[..col_len]);
            gemm::Rhs::Packed(&sc.col[..col_len])
        }
    };
    gemm::multiply(s.cout, p, kk, wp, b, y, &mut sc.gemm);
}

/// `dx = w^T dy`: per image `dCol [cin k k, ho wo] = W^T dY`, then [`col2im`].
pub fn backward_data<T: Real>(s: &Conv2d, dy: &[T], w: &[T], dx: &mut [T]) {
    check_shapes(s, dx.len(), w.len(), dy.len(), "conv backward_data");
    let (ho, wo) = s.out_hw();
    let (kk, p) = (s.cin * s.k * s.k, ho * wo);
    if s.n == 0 || s.cin == 0 || s.h * s.w == 0 {
        return;
    }
    if s.cout == 0 || p == 0 {
        dx.fill(T::zero());
        return;
    }
    // With stride 1 this is itself a stride-1 convolution of `dy`, padded by `k - 1 - pad`,
    // with the kernel flipped and its channel axes swapped: it runs as a forward pass (no
    // col2im; columns in place or gathered a group of images at a time). (Stride 2 would be
    // a convolution of `dy` with zeros between its values.)
    if s.stride == 1 && s.pad < s.k {
        let t = Conv2d {
            cin: s.cout,
            cout: s.cin,
            h: ho,
            w: wo,
            pad: s.k - 1 - s.pad,
            ..*s
        };
        let taps = s.k * s.k;
        let mut flipped = vec![T::zero(); w.len()];
        for (co, w) in w.chunks_exact(s.cin * taps).enumerate() {
            for (ci, w) in w.chunks_exact(taps).enumerate() {
                let dst = &mut flipped[(ci * s.cout + co) * taps..][..taps];
                dst.iter_mut()
                    .zip(w.iter().rev())
                    .for_each(|(d, &v)| *d = v);
            }
        }
        forward(&t, dy, &flipped, dx);
        return;
    }
    // The transposed weight is packed once for the whole batch.
    let wt = gemm::pack_lhs(
        kk,
        s.cout,
        Mat {
            data: w,
            rs: 1,
            cs: kk,
        },
    );
    let col_len = if is_pointwise(s) { 0 } else { kk * p };
    dx.par_chunks_mut(s.cin * s.h * s.w)
        .zip(dy.par_chunks(s.cout * p))
        .for_each(|(dx, dy)| {
            with_scratch(col_len, |sc: &mut Scratch<T>| {
                let b = gemm::Rhs::Strided(Mat {
                    data: dy,
                    rs: p,
                    cs: 1,
                });
                let wt = &wt[..];
                if is_pointwise(s) {
                    gemm::multiply(kk, p, s.cout, wt, b, dx, &mut sc.gemm);
                } else {
                    let col = &mut sc.col[..col_len];
                    gemm::multiply(kk, p, s.cout, wt, b, col, &mut sc.gemm);
                    col2im(s, col, &mut sc.xpad, dx);
                }
            })
        });
}

/// `dw += dy x^T`: per image `dW [cout, cin k k] += dY Col^T`, summed over fixed chunks of
/// the batch (each chunk's images in order), and the chunks' sums added to `dw` in chunk
/// order: the same bits whatever the thread count.
pub fn backward_weight<T: Real>(s: &Conv2d, x: &[T], dy: &[T], dw: &mut [T]) {
    check_shapes(s, x.len(), dw.len(), dy.len(), "conv backward_weight");
    let (ho, wo) = s.out_hw();
    let (kk, p) = (s.cin * s.k * s.k, ho * wo);
    if s.n == 0 || p == 0 || dw.is_empty() {
        return;
    }
    let per_chunk = s.n.div_ceil(WEIGHT_CHUNKS);
    let chunks = s.n.div_ceil(per_chunk);
    let (x_img, y_img) = (s.cin * s.h * s.w, s.cout * p);
    // Both operands run along the output positions, the sum's index: a dot-product kernel
    // reads them in place where a GEMM would transpose both. Where the forward pass reads
    // its columns in place, so do the dot products: over the phase planes' width, against a
    // copy of dY with zeros in the positions that wrap.
    let implicit = is_implicit(s).then(|| Implicit::new(s));
    // Small maps sum over a group of images at once, their positions side by side in both
    // operands: a few positions per image would leave the lane sums at the end of each dot
    // product dominant (measured: stage 3's 48 positions 15 % faster in groups of 5 than
    // one by one, stage 4's 12 faster than a GEMM per image).
    let group = if implicit.is_some() {
        1
    } else {
        GROUP_POSITIONS.div_ceil(p)
    };
    let col_len = match &implicit {
        Some(im) => s.cout * im.positions(s),
        None if group == 1 && is_pointwise(s) => 0,
        None => kk * group * p,
    };
    let partials: Vec<Vec<T>> = (0..chunks)
        .into_par_iter()
        .map(|chunk| {
            let mut part = vec![T::zero(); s.cout * kk];
            let images = chunk * per_chunk..((chunk + 1) * per_chunk).min(s.n);
            with_scratch(col_len, |sc: &mut Scratch<T>| {
                let mut rows = Vec::new();
                for g0 in images.clone().step_by(group) {
                    let g = group.min(images.end - g0);
                    let x = &x[g0 * x_img..(g0 + g) * x_img];
                    let dy = &dy[g0 * y_img..(g0 + g) * y_img];
                    if let Some(im) = &implicit {
                        let q = im.positions(s);
                        im.fill(s, x, &mut sc.xpad);
                        let dyq = &mut sc.col[..col_len];
                        for (dst, src) in dyq.chunks_exact_mut(im.wph).zip(dy.chunks_exact(wo)) {
                            dst[..wo].copy_from_slice(src);
                            dst[wo..].fill(T::zero());
                        }
                        dots::accumulate(s.cout, kk, q, dyq, &sc.xpad, &im.offs, &mut part);
                        continue;
                    }
                    // Row c of A: row c of each image's dY in turn; row r of B: row r of
                    // each image's columns in turn (one image: its dY and columns as they
                    // are, a pointwise layer's columns the image itself).
                    let kq = g * p;
                    rows.clear();
                    rows.extend((0..kk).map(|r| r * kq));
                    if g == 1 && is_pointwise(s) {
                        dots::accumulate(s.cout, kk, kq, dy, x, &rows, &mut part);
                        continue;
                    }
                    let cols = &mut sc.col[..kk * kq];
                    for (i, x) in x.chunks_exact(x_img).enumerate() {
                        im2col(s, x, &mut sc.xpad, &mut cols[i * p..], kq);
                    }
                    let dyg = if g == 1 {
                        dy
                    } else {
                        sc.out.resize(s.cout * kq, T::zero());
                        for (i, dy) in dy.chunks_exact(y_img).enumerate() {
                            let dst = sc.out.chunks_exact_mut(kq);
                            for (dst, src) in dst.zip(dy.chunks_exact(p)) {
                                dst[i * p..][..p].copy_from_slice(src);
                            }
                        }
                        &sc.out[..]
                    };
                    dots::accumulate(s.cout, kk, kq, dyg, cols, &rows, &mut part);
                }
            });
            part
        })
        .collect();
    for part in &partials {
        for (d, &v) in dw.iter_mut().zip(part) {
            *d += v;
        }
    }
}

/// `C [m, n] += A B^T` for row-major `A [m, k]` and `B [n, k]`, row `j` of `B` at
/// `b[offs[j]..]` (the rows of a column matrix, or read in place from an image's phase
/// planes): the weight gradient, where both operands are contiguous along the summed index.
/// A register tile of 4 x 3 dot products, 8 lanes of `k` at a time (the last `k % 8`
/// masked: a scalar tail took 40 % of stage 2's time), the lanes summed in a fixed order at
/// the end of each block of `k`, so the order never depends on threads.
mod dots {
    use super::Real;
    use std::any::TypeId;

    /// Summed index per block: keeps a tile's rows (7 x 2 KB) in L1 while the tile sweeps.
    const KB: usize = 512;
    /// Rows of B per block (a multiple of the tile's 3): 252 KB of B at most.
    const NB: usize = 126;

    pub fn accumulate<T: Real>(
        m: usize,
        n: usize,
        k: usize,
        a: &[T],
        b: &[T],
        offs: &[usize],
        c: &mut [T],
    ) {
        let b_end = offs[..n].iter().map(|&o| o + k).max().unwrap_or(0);
        assert!(
            a.len() >= m * k && b.len() >= b_end && c.len() >= m * n,
            "dots: lengths"
        );
        #[cfg(target_arch = "x86_64")]
        if TypeId::of::<T>() == TypeId::of::<f32>()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            // SAFETY: T is f32 (checked above), so these are casts to the same type.
            let (a, b, c) = unsafe {
                (
                    &*(a as *const [T] as *const [f32]),
                    &*(b as *const [T] as *const [f32]),
                    &mut *(c as *mut [T] as *mut [f32]),
                )
            };
            // SAFETY: AVX2 and FMA checked above; lengths asserted above.
            unsafe { accumulate_f32_avx2(m, n, k, a, b, offs, c) };
            return;
        }
        for i in 0..m {
            for j in 0..n {
                let (ai, bj) = (&a[i * k..(i + 1) * k], &b[offs[j]..offs[j] + k]);
                c[i * n + j] += ai.iter().zip(bj).fold(T::zero(), |s, (&x, &y)| s + x * y);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn accumulate_f32_avx2(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b: &[f32],
        offs: &[usize],
        c: &mut [f32],
    ) {
        for p0 in (0..k).step_by(KB) {
            let kb = KB.min(k - p0);
            // B in blocks of rows that stay in L2 while every row of A passes them (B is
            // the larger operand: the columns' `cin k k` rows against dY's `cout`).
            for j0 in (0..n).step_by(NB) {
                let j1 = (j0 + NB).min(n);
                let mut i = 0;
                while i < m {
                    let mi = if i + 4 <= m { 4 } else { 1 };
                    let mut j = j0;
                    while j < j1 {
                        // SAFETY: rows i..i+mi and j..j+3 (or j) exist, p0 + kb <= k.
                        match (mi, j + 3 <= j1) {
                            (4, true) => unsafe { tile::<4, 3>(i, j, p0, kb, k, n, a, b, offs, c) },
                            (4, false) => unsafe {
                                tile::<4, 1>(i, j, p0, kb, k, n, a, b, offs, c)
                            },
                            _ => unsafe { tile::<1, 1>(i, j, p0, kb, k, n, a, b, offs, c) },
                        }
                        j += if mi == 4 && j + 3 <= j1 { 3 } else { 1 };
                    }
                    i += mi;
                }
            }
        }
    }

    /// `MI x NJ` dot products over `k` indices `p0..p0 + kb`, 8 at a time, the last
    /// `kb % 8` through masked loads (which read nothing past them).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const MI: usize, const NJ: usize>(
        i0: usize,
        j0: usize,
        p0: usize,
        kb: usize,
        k: usize,
        n: usize,
        a: &[f32],
        b: &[f32],
        offs: &[usize],
        c: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm256_setzero_ps(); NJ]; MI];
        let ap = a.as_ptr();
        // SAFETY: the caller guarantees rows `j0..j0 + NJ` of `B` hold `k` values each.
        let rows: [*const f32; NJ] =
            std::array::from_fn(|j| unsafe { b.as_ptr().add(offs[j0 + j]) });
        let end = p0 + kb / 8 * 8;
        for p in (p0..end).step_by(8) {
            // SAFETY: the caller guarantees these rows exist and p + 8 <= k.
            let bv: [__m256; NJ] =
                std::array::from_fn(|j| unsafe { _mm256_loadu_ps(rows[j].add(p)) });
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = unsafe { _mm256_loadu_ps(ap.add((i0 + i) * k + p)) };
                for (acc, bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm256_fmadd_ps(av, *bv, *acc);
                }
            }
        }
        let rem = (kb % 8) as i32;
        if rem > 0 {
            let mask = _mm256_cmpgt_epi32(
                _mm256_set1_epi32(rem),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
            // SAFETY: lanes `end..end + rem` exist (end + rem = p0 + kb <= k); the masked
            // lanes are not read.
            let bv: [__m256; NJ] =
                std::array::from_fn(|j| unsafe { _mm256_maskload_ps(rows[j].add(end), mask) });
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = unsafe { _mm256_maskload_ps(ap.add((i0 + i) * k + end), mask) };
                for (acc, bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm256_fmadd_ps(av, *bv, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (j, acc) in acc.iter().enumerate() {
                let mut lanes = [0.0f32; 8];
                // SAFETY: `lanes` holds 8 floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *acc) };
                // Pairwise, always in this order.
                let s = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
                    + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
                c[(i0 + i) * n + j0 + j] += s;
            }
        }
    }
}

/// The GEMM behind the convolutions: `C += A B` with `C` row-major and dense, `A` and `B`
/// read through strides. Goto-style blocking: a `KC x NC` block of `B` and an `MC x KC`
/// block of `A` are packed into panels the micro-kernel streams through, `MR x NR` of `C`
/// at a time in registers. f32 on x86-64 uses an explicit AVX2+FMA kernel (the compiler's
/// own vectorisation of the generic tile gathers along `k` instead; AVX-512 intrinsics need
/// a newer Rust than our MSRV, and Zen 4 runs them at the same FMA rate anyway). Each `C`
/// value is summed over `k` in one fixed order.
mod gemm {
    use super::{Mat, Real};
    use std::any::TypeId;

    /// Register tile: 16 rows divide every channel count of the encoder (16..128); the AVX2
    /// kernel walks it four rows (eight accumulators) at a time.
    pub const MR: usize = 16;
    pub const NR: usize = 16;
    pub const KC: usize = 256;
    const MC: usize = 128;
    const NC: usize = 1024;

    /// The packing buffer of the right operand, kept by the caller so repeated GEMMs do
    /// not allocate. (The left operand, the weight, is packed once by [`pack_lhs`] for the
    /// GEMMs of a whole batch.)
    pub struct Packs<T> {
        b: Vec<T>,
    }

    impl<T: Real> Packs<T> {
        pub fn new() -> Self {
            Packs { b: Vec::new() }
        }
    }

    /// Where a tile reads its `NR` columns of `B`, row `p` of `kc`: at `p NR` of a packed
    /// panel, or at `offs[p]` of `base` (the rows of an implicit im2col, see
    /// [`Rhs::Rows`]; `max` is the largest of `offs[..kc]`).
    #[derive(Clone, Copy)]
    enum Src<'a, T> {
        Panel(&'a [T]),
        Rows {
            base: &'a [T],
            offs: &'a [usize],
            max: usize,
        },
    }

    impl<T: Copy> Src<'_, T> {
        /// Checks that `kc` rows of `NR` values can be read.
        #[inline(always)]
        fn check(&self, kc: usize) {
            match *self {
                Src::Panel(b) => assert!(b.len() >= kc * NR, "gemm: B panel too short"),
                Src::Rows { base, offs, max } => {
                    assert!(offs.len() >= kc && base.len() >= max + NR, "gemm: B rows")
                }
            }
        }

        /// Column panel `jp` of a block of `kc` rows.
        #[inline(always)]
        fn panel(self, jp: usize, kc: usize) -> Self {
            match self {
                Src::Panel(b) => Src::Panel(&b[jp * kc * NR..]),
                Src::Rows { base, offs, max } => Src::Rows {
                    base: &base[jp * NR..],
                    offs,
                    max,
                },
            }
        }

        /// Row `p` (after [`Src::check`]).
        #[inline(always)]
        fn row(&self, p: usize) -> &[T] {
            match *self {
                Src::Panel(b) => &b[p * NR..p * NR + NR],
                Src::Rows { base, offs, .. } => &base[offs[p]..offs[p] + NR],
            }
        }
    }

    /// An `MR x NR` tile of `A B` over `kc` steps of packed panels of `A`.
    trait Tile<T: Real> {
        fn tile(kc: usize, a: &[T], b: Src<T>, out: &mut [[T; NR]; MR]);

        /// The tile stored into (`store`) or added to a whole `MR x NR` block of `C`, whose
        /// rows start `ldc` apart in `c`.
        #[inline(always)]
        fn tile_into(kc: usize, a: &[T], b: Src<T>, c: &mut [T], ldc: usize, store: bool) {
            let mut acc = [[T::zero(); NR]; MR];
            Self::tile(kc, a, b, &mut acc);
            for (i, row) in acc.iter().enumerate() {
                let dst = &mut c[i * ldc..i * ldc + NR];
                if store {
                    dst.copy_from_slice(row);
                } else {
                    dst.iter_mut().zip(row).for_each(|(d, &v)| *d += v);
                }
            }
        }
    }

    /// The portable tile, fused or not: fused where the processor has FMA (one rounding, as
    /// the SIMD kernels), separate otherwise (a software fma would be slow).
    struct Portable<const FUSED: bool>;

    impl<T: Real, const FUSED: bool> Tile<T> for Portable<FUSED> {
        #[inline(always)]
        fn tile(kc: usize, a: &[T], b: Src<T>, out: &mut [[T; NR]; MR]) {
            *out = [[T::zero(); NR]; MR];
            b.check(kc);
            for (p, a) in a.chunks_exact(MR).take(kc).enumerate() {
                let b = b.row(p);
                for i in 0..MR {
                    let ai = a[i];
                    for j in 0..NR {
                        out[i][j] = if FUSED {
                            ai.mul_add(b[j], out[i][j])
                        } else {
                            ai * b[j] + out[i][j]
                        };
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    struct Avx2;

    #[cfg(target_arch = "x86_64")]
    impl Tile<f32> for Avx2 {
        #[inline(always)]
        fn tile(kc: usize, a: &[f32], b: Src<f32>, out: &mut [[f32; NR]; MR]) {
            let out = out.as_mut_ptr() as *mut f32;
            // SAFETY: `out` holds MR rows of NR.
            unsafe { avx2_tile(kc, a, b, out, NR, true) }
        }

        #[inline(always)]
        fn tile_into(kc: usize, a: &[f32], b: Src<f32>, c: &mut [f32], ldc: usize, store: bool) {
            assert!(c.len() >= (MR - 1) * ldc + NR);
            // SAFETY: `c` holds MR rows of NR, `ldc` apart (asserted).
            unsafe { avx2_tile(kc, a, b, c.as_mut_ptr(), ldc, store) }
        }
    }

    /// The AVX2 tile into the `MR x NR` block at `out` (rows `ldc` apart), four rows at a
    /// time, `B` read from a panel or through row offsets.
    ///
    /// # Safety
    /// Only reached from `accumulate_f32_avx2`, which runs when the processor has AVX2 and
    /// FMA; `out` must hold `MR` rows of `NR` values `ldc` apart.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx2_tile(kc: usize, a: &[f32], b: Src<f32>, out: *mut f32, ldc: usize, store: bool) {
        assert!(a.len() >= kc * MR);
        b.check(kc);
        for rows in 0..MR / 4 {
            // SAFETY: `a` holds `kc` steps of MR (asserted), `b` `kc` rows of NR (checked),
            // `out` 4 more rows from `4 rows ldc` (the caller's contract).
            unsafe {
                let (a, c) = (a.as_ptr().add(4 * rows), out.add(4 * rows * ldc));
                match b {
                    Src::Panel(b) => {
                        tile_avx2_4rows::<false>(kc, a, b.as_ptr(), &[], c, ldc, store)
                    }
                    Src::Rows { base, offs, .. } => {
                        tile_avx2_4rows::<true>(kc, a, base.as_ptr(), offs, c, ldc, store)
                    }
                }
            }
        }
    }

    /// Four rows of the tile (eight accumulators of 8 floats: AVX2 has 16 registers), stored
    /// into or added to the 4 x NR block at `out` whose rows start `ldc` apart. Row `p` of
    /// `B` is at `b + offs[p]` when `ROWS`, else at `b + p NR`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2_4rows<const ROWS: bool>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        offs: &[usize],
        out: *mut f32,
        ldc: usize,
        store: bool,
    ) {
        use std::arch::x86_64::*;
        let mut c = [[_mm256_setzero_ps(); 2]; 4];
        for p in 0..kc {
            // SAFETY: `p < kc` and the caller checked that `kc` rows of NR can be read.
            let (b0, b1) = unsafe {
                let row = if ROWS {
                    b.add(*offs.get_unchecked(p))
                } else {
                    b.add(p * NR)
                };
                (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)))
            };
            for (i, c) in c.iter_mut().enumerate() {
                let ai = _mm256_set1_ps(unsafe { *a.add(p * MR + i) });
                c[0] = _mm256_fmadd_ps(ai, b0, c[0]);
                c[1] = _mm256_fmadd_ps(ai, b1, c[1]);
            }
        }
        for (i, c) in c.iter().enumerate() {
            // SAFETY: the caller gives 4 rows of NR = 16 floats, `ldc` apart.
            unsafe {
                let o = out.add(i * ldc);
                let (mut c0, mut c1) = (c[0], c[1]);
                if !store {
                    c0 = _mm256_add_ps(c0, _mm256_loadu_ps(o));
                    c1 = _mm256_add_ps(c1, _mm256_loadu_ps(o.add(8)));
                }
                _mm256_storeu_ps(o, c0);
                _mm256_storeu_ps(o.add(8), c1);
            }
        }
    }

    /// Casts a slice to the same type behind another name.
    ///
    /// # Safety
    /// `T` and `U` must be the same type.
    unsafe fn same<T: 'static, U: 'static>(x: &[T]) -> &[U] {
        debug_assert!(TypeId::of::<T>() == TypeId::of::<U>());
        // SAFETY: the caller guarantees T == U.
        unsafe { &*(x as *const [T] as *const [U]) }
    }

    /// `A [m, k]` packed for [`multiply`]: per block of `KC` summed indices, every `MR`-row
    /// panel in turn (rows zero-padded to a multiple of `MR`).
    pub fn pack_lhs<T: Real>(m: usize, k: usize, a: Mat<T>) -> Vec<T> {
        let mpad = m.div_ceil(MR) * MR;
        let mut out = vec![T::zero(); mpad * k];
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            pack_a(a, 0, m, p0, kc, &mut out[p0 * mpad..]);
        }
        out
    }

    /// The right operand: read through strides and packed block by block, or already in
    /// the packed layout (see [`super::Table`]).
    #[derive(Clone, Copy)]
    pub enum Rhs<'a, T> {
        Strided(Mat<'a, T>),
        Packed(&'a [T]),
        /// `B[p, j] = base[offs[p] + j]`: each row a contiguous run of `base` (the columns of
        /// a stride-1 convolution read in place from the padded image). `base` must be
        /// readable up to the largest offset plus `n` rounded up to `NR`.
        Rows {
            base: &'a [T],
            offs: &'a [usize],
        },
    }

    /// `C [m, n] = A [m, k] B [k, n]`, on the fastest kernel this processor has. `C` is
    /// not read (the first block of `k` stores where the others add), which saves clearing
    /// it first.
    #[allow(clippy::too_many_arguments)]
    pub fn multiply<T: Real>(
        m: usize,
        n: usize,
        k: usize,
        a: &[T],
        b: Rhs<T>,
        c: &mut [T],
        packs: &mut Packs<T>,
    ) {
        assert!(c.len() >= m * n, "gemm: C too short");
        if k == 0 {
            c[..m * n].fill(T::zero());
        }
        assert!(
            a.len() >= m.div_ceil(MR) * MR * k,
            "gemm: packed A too short"
        );
        #[cfg(target_arch = "x86_64")]
        {
            let fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if TypeId::of::<T>() == TypeId::of::<f32>() && fma {
                // SAFETY: T is f32 (checked above), so these are casts to the same type.
                let (a, b, c, packs) = unsafe {
                    (
                        same(a),
                        match b {
                            Rhs::Strided(b) => Rhs::Strided(Mat {
                                data: same(b.data),
                                rs: b.rs,
                                cs: b.cs,
                            }),
                            Rhs::Packed(b) => Rhs::Packed(same(b)),
                            Rhs::Rows { base, offs } => Rhs::Rows {
                                base: same(base),
                                offs,
                            },
                        },
                        &mut *(c as *mut [T] as *mut [f32]),
                        &mut *(packs as *mut Packs<T> as *mut Packs<f32>),
                    )
                };
                // SAFETY: AVX2 and FMA checked above.
                unsafe { accumulate_f32_avx2(m, n, k, a, b, c, packs) };
                return;
            }
            if fma {
                // SAFETY: AVX2 and FMA checked above.
                unsafe { accumulate_fma(m, n, k, a, b, c, packs) };
                return;
            }
        }
        blocked::<T, Portable<false>>(m, n, k, a, b, c, packs);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn accumulate_f32_avx2(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b: Rhs<f32>,
        c: &mut [f32],
        packs: &mut Packs<f32>,
    ) {
        blocked::<f32, Avx2>(m, n, k, a, b, c, packs);
    }

    /// Other float types (f64 in the tests) with hardware FMA, so they round as f32 does.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn accumulate_fma<T: Real>(
        m: usize,
        n: usize,
        k: usize,
        a: &[T],
        b: Rhs<T>,
        c: &mut [T],
        packs: &mut Packs<T>,
    ) {
        blocked::<T, Portable<true>>(m, n, k, a, b, c, packs);
    }

    /// Packs `A[i0.., p0..]` (`mc x kc`) as `MR`-row panels, each `kc` steps of `MR` values,
    /// zero-padded past `mc`.
    #[inline(always)]
    fn pack_a<T: Real>(a: Mat<T>, i0: usize, mc: usize, p0: usize, kc: usize, out: &mut [T]) {
        for (panel, dst) in out
            .chunks_exact_mut(kc * MR)
            .take(mc.div_ceil(MR))
            .enumerate()
        {
            let rows = MR.min(mc - panel * MR);
            let base = (i0 + panel * MR) * a.rs + p0 * a.cs;
            if rows < MR {
                dst.fill(T::zero());
            }
            if a.rs == 1 {
                for p in 0..kc {
                    let src = base + p * a.cs;
                    dst[p * MR..p * MR + rows].copy_from_slice(&a.data[src..src + rows]);
                }
            } else {
                for i in 0..rows {
                    let src = base + i * a.rs;
                    for p in 0..kc {
                        dst[p * MR + i] = a.data[src + p * a.cs];
                    }
                }
            }
        }
    }

    /// Packs `B[p0.., j0..]` (`kc x nc`) as `NR`-column panels, each `kc` steps of `NR`
    /// values, zero-padded past `nc`.
    #[inline(always)]
    fn pack_b<T: Real>(b: Mat<T>, p0: usize, kc: usize, j0: usize, nc: usize, out: &mut [T]) {
        for (panel, dst) in out
            .chunks_exact_mut(kc * NR)
            .take(nc.div_ceil(NR))
            .enumerate()
        {
            let cols = NR.min(nc - panel * NR);
            let base = p0 * b.rs + (j0 + panel * NR) * b.cs;
            if cols < NR {
                dst.fill(T::zero());
            }
            if b.cs == 1 {
                for p in 0..kc {
                    let src = base + p * b.rs;
                    dst[p * NR..p * NR + cols].copy_from_slice(&b.data[src..src + cols]);
                }
            } else {
                for j in 0..cols {
                    let src = base + j * b.cs;
                    for p in 0..kc {
                        dst[p * NR + j] = b.data[src + p * b.rs];
                    }
                }
            }
        }
    }

    /// The blocked product: the first block of `k` is stored into `C`, the others added.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn blocked<T: Real, K: Tile<T>>(
        m: usize,
        n: usize,
        k: usize,
        a: &[T],
        b: Rhs<T>,
        c: &mut [T],
        packs: &mut Packs<T>,
    ) {
        let kc_max = KC.min(k);
        let b_len = match b {
            Rhs::Strided(_) => NC.min(n).div_ceil(NR) * NR * kc_max,
            Rhs::Packed(_) | Rhs::Rows { .. } => 0,
        };
        if packs.b.len() < b_len {
            packs.b.resize(b_len, T::zero());
        }
        let mut acc = [[T::zero(); NR]; MR];
        for j0 in (0..n).step_by(NC) {
            let nc = NC.min(n - j0);
            for p0 in (0..k).step_by(KC) {
                let kc = KC.min(k - p0);
                let block = match b {
                    Rhs::Strided(b) => {
                        pack_b(b, p0, kc, j0, nc, &mut packs.b);
                        Src::Panel(&packs.b[..])
                    }
                    Rhs::Packed(b) => Src::Panel(&b[p0 * n.div_ceil(NR) * NR + j0 * kc..]),
                    Rhs::Rows { base, offs } => {
                        let offs = &offs[p0..p0 + kc];
                        let max = offs.iter().copied().max().unwrap_or(0);
                        Src::Rows {
                            base: &base[j0..],
                            offs,
                            max,
                        }
                    }
                };
                for i0 in (0..m).step_by(MC) {
                    let mc = MC.min(m - i0);
                    let a_block = &a[p0 * m.div_ceil(MR) * MR + i0 * kc..];
                    for jp in 0..nc.div_ceil(NR) {
                        let bp = block.panel(jp, kc);
                        let jj = j0 + jp * NR;
                        let cols = NR.min(n - jj);
                        for (ip, ap) in a_block
                            .chunks_exact(kc * MR)
                            .take(mc.div_ceil(MR))
                            .enumerate()
                        {
                            let ii = i0 + ip * MR;
                            let store = p0 == 0;
                            if cols == NR && ii + MR <= m {
                                K::tile_into(kc, ap, bp, &mut c[ii * n + jj..], n, store);
                                continue;
                            }
                            K::tile(kc, ap, bp, &mut acc);
                            for (i, row) in acc.iter().enumerate().take(MR.min(m - ii)) {
                                let dst = &mut c[(ii + i) * n + jj..(ii + i) * n + jj + cols];
                                if store {
                                    dst.copy_from_slice(&row[..cols]);
                                } else {
                                    for (d, &v) in dst.iter_mut().zip(row) {
                                        *d += v;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::gradcheck::{check, dot, random};

    /// The definition, loop by loop, as the reference for the fast paths.
    fn naive_forward(s: &Conv2d, x: &[f64], w: &[f64]) -> Vec<f64> {
        let (ho, wo) = s.out_hw();
        let mut y = vec![0.0; s.n * s.cout * ho * wo];
        for n in 0..s.n {
            for co in 0..s.cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut sum = 0.0;
                        for ci in 0..s.cin {
                            for ky in 0..s.k {
                                for kx in 0..s.k {
                                    let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                                    let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                                    if iy < 0 || ix < 0 || iy as usize >= s.h || ix as usize >= s.w
                                    {
                                        continue;
                                    }
                                    let xi =
                                        ((n * s.cin + ci) * s.h + iy as usize) * s.w + ix as usize;
                                    let wi = ((co * s.cin + ci) * s.k + ky) * s.k + kx;
                                    sum += x[xi] * w[wi];
                                }
                            }
                        }
                        y[((n * s.cout + co) * ho + oy) * wo + ox] = sum;
                    }
                }
            }
        }
        y
    }

    fn shape(
        n: usize,
        cin: usize,
        h: usize,
        w: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Conv2d {
        Conv2d {
            n,
            cin,
            h,
            w,
            cout,
            k,
            stride,
            pad,
        }
    }

    fn len(s: &Conv2d) -> (usize, usize, usize) {
        let (ho, wo) = s.out_hw();
        (
            s.n * s.cin * s.h * s.w,
            s.cout * s.cin * s.k * s.k,
            s.n * s.cout * ho * wo,
        )
    }

    fn rel_err(a: &[f64], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f64 = b.iter().map(|b| b * b).sum();
        (num / den.max(1e-300)).sqrt()
    }

    fn gradient_case(s: Conv2d, seed: u64) {
        let (xl, wl, yl) = len(&s);
        let mut x = random(xl, seed);
        let mut w = random(wl, seed + 1);
        let r = random(yl, seed + 2);
        let mut y = vec![0.0; yl];
        forward(&s, &x, &w, &mut y);
        assert!(
            rel_err(&y, &naive_forward(&s, &x, &w)) < 1e-13,
            "{s:?}: forward vs naive"
        );
        let mut dx = vec![5.0; xl];
        backward_data(&s, &r, &w, &mut dx);
        let w1 = w.clone();
        check("conv dx", &mut x, &dx, 300, 1e-6, |x| {
            let mut y = vec![0.0; yl];
            forward(&s, x, &w1, &mut y);
            dot(&y, &r)
        });
        let dw0 = random(wl, seed + 3);
        let mut dw = dw0.clone();
        backward_weight(&s, &x, &r, &mut dw);
        let added: Vec<f64> = dw.iter().zip(&dw0).map(|(a, b)| a - b).collect();
        check("conv dw", &mut w, &added, 300, 1e-6, |w| {
            let mut y = vec![0.0; yl];
            forward(&s, &x, w, &mut y);
            dot(&y, &r)
        });
    }

    #[test]
    fn conv_gradients_match_finite_differences() {
        gradient_case(shape(2, 1, 13, 11, 3, 7, 2, 3), 1000); // stem: k7 s2 p3, odd sizes
        gradient_case(shape(2, 3, 9, 7, 4, 3, 1, 1), 1010); // k3 s1 p1
        gradient_case(shape(3, 4, 9, 11, 5, 1, 2, 0), 1020); // 1x1 s2 on odd sizes
        gradient_case(shape(2, 3, 9, 7, 5, 3, 2, 1), 1030); // k3 s2 p1, odd sizes
        gradient_case(shape(2, 3, 5, 6, 2, 1, 1, 0), 1040); // pointwise: no im2col
        gradient_case(shape(2, 5, 9, 8, 3, 1, 1, 0), 1045); // pointwise, dot-product dW
        gradient_case(shape(2, 2, 16, 10, 3, 3, 1, 1), 1046); // k3, dot-product dW
        gradient_case(shape(2, 3, 7, 14, 4, 3, 1, 1), 1047); // k3 s1, columns read in place
        gradient_case(shape(2, 2, 6, 15, 3, 3, 1, 0), 1048); // the same without padding
        gradient_case(shape(2, 3, 9, 30, 4, 3, 2, 1), 1049); // k3 s2, in place from phases
        gradient_case(shape(2, 1, 11, 41, 3, 7, 2, 3), 1051); // stem-like, odd sizes
        gradient_case(shape(1, 2, 2, 2, 3, 3, 2, 1), 1050); // 2x2 map, window beyond both edges
        gradient_case(shape(5, 3, 3, 4, 4, 3, 1, 1), 1052); // 3x4: groups of 4, a short one
        gradient_case(shape(3, 2, 6, 8, 3, 3, 1, 1), 1053); // 6x8: gathered in runs of 8
        gradient_case(shape(3, 2, 5, 6, 3, 3, 1, 1), 1054); // runs of 2
        gradient_case(shape(5, 3, 6, 8, 4, 3, 2, 1), 1055); // stride 2 to 3x4: grouped, by lane
        gradient_case(shape(20, 3, 3, 4, 4, 3, 1, 1), 1056); // dW summed over groups of 3 images
        gradient_case(shape(19, 2, 4, 5, 3, 1, 2, 0), 1057); // the same for a strided 1x1
    }

    #[test]
    fn fast_paths_match_naive_across_gemm_blocks() {
        // cin k k = 369 crosses a KC block, cout = 131 an MC block, ho wo = 1120 an NC block;
        // neither is a multiple of the register tile.
        for s in [
            shape(2, 41, 40, 28, 131, 3, 1, 1),
            shape(2, 3, 35, 33, 17, 7, 2, 3),
            shape(2, 6, 35, 81, 17, 7, 2, 3), // columns in place, 6 7 7 crosses a KC block
            shape(7, 40, 3, 4, 20, 3, 1, 1),  // groups of 4 images (one short), 40 3 3 > KC
            shape(6, 40, 6, 8, 20, 1, 2, 0),  // 1x1 s2 to 3x4: groups, one offset per lane
        ] {
            let (xl, wl, yl) = len(&s);
            let x = random(xl, 7);
            let w = random(wl, 8);
            let dy = random(yl, 9);
            let mut y = vec![0.0; yl];
            forward(&s, &x, &w, &mut y);
            assert!(
                rel_err(&y, &naive_forward(&s, &x, &w)) < 1e-13,
                "{s:?}: forward"
            );
            // Adjoint identities against the naive forward: <dy, W x> = <dx, x> = <dw, w>.
            let reference = dot(&naive_forward(&s, &x, &w), &dy);
            let mut dx = vec![0.0; xl];
            backward_data(&s, &dy, &w, &mut dx);
            assert!((dot(&dx, &x) - reference).abs() < 1e-10 * reference.abs().max(1.0));
            let mut dw = vec![0.0; wl];
            backward_weight(&s, &x, &dy, &mut dw);
            assert!((dot(&dw, &w) - reference).abs() < 1e-10 * reference.abs().max(1.0));
        }
    }

    /// Which layers read their columns in place: the paper encoder's wide maps (the stem and
    /// stages 1-2, stride 1 or 2), not the last stages' narrow ones; and the test shapes
    /// above that are meant to.
    #[test]
    fn columns_in_place_where_output_rows_are_wide() {
        let paper = [
            (shape(1, 1, 96, 114, 16, 7, 2, 3), true),
            (shape(1, 16, 24, 29, 16, 3, 1, 1), true),
            (shape(1, 16, 24, 29, 32, 3, 2, 1), true),
            (shape(1, 32, 12, 15, 32, 3, 1, 1), true),
            (shape(1, 64, 6, 8, 64, 3, 1, 1), false),
            (shape(1, 128, 3, 4, 128, 3, 1, 1), false),
            (shape(1, 16, 24, 29, 32, 1, 2, 0), false),
        ];
        let tests = [
            shape(2, 3, 7, 14, 4, 3, 1, 1),
            shape(2, 2, 6, 15, 3, 3, 1, 0),
            shape(2, 3, 9, 30, 4, 3, 2, 1),
            shape(2, 1, 11, 41, 3, 7, 2, 3),
            shape(2, 41, 40, 28, 131, 3, 1, 1),
            shape(2, 6, 35, 81, 17, 7, 2, 3),
        ];
        for (s, want) in paper.into_iter().chain(tests.map(|s| (s, true))) {
            assert_eq!(is_implicit(&s), want, "{s:?}");
        }
    }

    /// How the other layers gather their columns: the paper encoder's narrow maps in groups
    /// of images that fill whole register tiles, in runs along the output rows where the
    /// stride is 1.
    #[test]
    fn narrow_maps_gathered_a_group_of_images_at_a_time() {
        let paper = [
            (shape(306, 64, 6, 8, 64, 3, 1, 1), 1, 8),
            (shape(306, 128, 3, 4, 128, 3, 1, 1), 4, 4),
            (shape(306, 64, 6, 8, 128, 3, 2, 1), 4, 1),
            (shape(306, 64, 6, 8, 128, 1, 2, 0), 4, 1),
            (shape(306, 16, 24, 29, 32, 1, 2, 0), 1, 1),
            // Three images: no group wastes fewer lanes than one image alone.
            (shape(3, 128, 3, 4, 128, 3, 1, 1), 1, 4),
        ];
        for (s, imgs, run) in paper {
            let t = Table::new(&s);
            assert_eq!((t.imgs, t.run), (imgs, run), "{s:?}");
            let (ho, wo) = s.out_hw();
            assert_eq!(t.npad, (imgs * ho * wo).div_ceil(gemm::NR) * gemm::NR);
        }
    }

    /// The fused convolution + instance norm gives the bits of the two passes in turn, with
    /// the convolution output kept or not (columns in place and im2col, with and without
    /// the ReLU).
    #[test]
    fn fused_norm_gives_the_bits_of_the_two_passes() {
        let to32 = |v: Vec<f64>| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        for (s, relu) in [
            (shape(3, 2, 9, 14, 4, 3, 1, 1), true),
            (shape(2, 3, 9, 7, 5, 3, 2, 1), false),
        ] {
            let (xl, wl, yl) = len(&s);
            let (ho, wo) = s.out_hw();
            let (x, w) = (to32(random(xl, 21)), to32(random(wl, 22)));
            let (gamma, beta) = (to32(random(s.cout, 23)), to32(random(s.cout, 24)));
            let mut pre = vec![0f32; yl];
            forward(&s, &x, &w, &mut pre);
            let mut want = (
                vec![0f32; yl],
                vec![0f32; s.n * s.cout],
                vec![0f32; s.n * s.cout],
            );
            let (post, mean, rstd) = (&mut want.0, &mut want.1, &mut want.2);
            let (n, c, hw) = (s.n, s.cout, ho * wo);
            norm::instance_forward(n, c, hw, 1e-5, relu, &pre, &gamma, &beta, post, mean, rstd);
            for keep in [true, false] {
                let mut kept = vec![f32::NAN; yl];
                let mut got = (
                    vec![0f32; yl],
                    vec![0f32; s.n * s.cout],
                    vec![0f32; s.n * s.cout],
                );
                let norm = Norm {
                    eps: 1e-5,
                    relu,
                    gamma: &gamma,
                    beta: &beta,
                    post: &mut got.0,
                    mean: &mut got.1,
                    rstd: &mut got.2,
                };
                forward_normed(&s, &x, &w, keep.then_some(&mut kept[..]), norm);
                assert_eq!(got, want, "{s:?} keep {keep}");
                if keep {
                    assert_eq!(kept, pre, "{s:?}: the kept convolution output");
                }
            }
        }
    }

    #[test]
    fn f32_matches_f64_and_thread_count_does_not_matter() {
        for s in [
            shape(70, 1, 24, 29, 16, 7, 2, 3),
            shape(40, 16, 12, 15, 32, 3, 2, 1),
            shape(40, 24, 3, 4, 32, 3, 1, 1), // groups of images in the GEMM and in dW
        ] {
            let (xl, wl, yl) = len(&s);
            let (x, w, dy) = (random(xl, 11), random(wl, 12), random(yl, 13));
            let to32 = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
            let (x32, w32, dy32) = (to32(&x), to32(&w), to32(&dy));
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let mut y = vec![0.0f32; yl];
                    forward(&s, &x32, &w32, &mut y);
                    let mut dx = vec![0.0f32; xl];
                    backward_data(&s, &dy32, &w32, &mut dx);
                    let mut dw = vec![0.5f32; wl];
                    backward_weight(&s, &x32, &dy32, &mut dw);
                    (y, dx, dw)
                })
            };
            let one = run(1);
            assert!(one == run(2), "{s:?}: 1 and 2 threads differ");
            let mut y = vec![0.0; yl];
            forward(&s, &x, &w, &mut y);
            let mut dx = vec![0.0; xl];
            backward_data(&s, &dy, &w, &mut dx);
            let mut dw = vec![0.5; wl];
            backward_weight(&s, &x, &dy, &mut dw);
            let up = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
            for (what, a, b) in [("y", &one.0, &y), ("dx", &one.1, &dx), ("dw", &one.2, &dw)] {
                let e = rel_err(&up(a), b);
                assert!(e < 1e-5, "{s:?}: {what} f32 vs f64 relative error {e:.2e}");
            }
        }
    }

    /// Speed at the paper's shapes (one subject's 306 axial-sized slices):
    /// `cargo test --release --lib conv::tests::speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn speed() {
        let shapes = [
            ("stem 1->16 k7 s2", shape(306, 1, 96, 114, 16, 7, 2, 3)),
            ("stage1 16->16 k3", shape(306, 16, 24, 29, 16, 3, 1, 1)),
            ("stage2 16->32 k3 s2", shape(306, 16, 24, 29, 32, 3, 2, 1)),
            ("stage2 32->32 k3", shape(306, 32, 12, 15, 32, 3, 1, 1)),
            ("stage3 64->64 k3", shape(306, 64, 6, 8, 64, 3, 1, 1)),
            ("stage4 128->128 k3", shape(306, 128, 3, 4, 128, 3, 1, 1)),
        ];
        let only = std::env::var("CONV_BENCH").unwrap_or_default();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (name, s) in shapes.into_iter().filter(|(name, _)| name.contains(&only)) {
                let (xl, wl, yl) = len(&s);
                let to32 = |v: Vec<f64>| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
                let (x, w, dy) = (
                    to32(random(xl, 1)),
                    to32(random(wl, 2)),
                    to32(random(yl, 3)),
                );
                let (mut y, mut dx, mut dw) = (vec![0f32; yl], vec![0f32; xl], vec![0f32; wl]);
                let (ho, wo) = s.out_hw();
                let flop = 2.0 * (s.n * s.cout * ho * wo * s.cin * s.k * s.k) as f64;
                // The best of a few runs: the machine is shared, the minimum is the signal.
                let time = |f: &mut dyn FnMut()| {
                    f();
                    (0..5)
                        .map(|_| {
                            let t = std::time::Instant::now();
                            f();
                            t.elapsed().as_secs_f64()
                        })
                        .fold(f64::INFINITY, f64::min)
                };
                pool.install(|| {
                    let tf = time(&mut || forward(&s, &x, &w, &mut y));
                    let td = time(&mut || backward_data(&s, &dy, &w, &mut dx));
                    let tw = time(&mut || backward_weight(&s, &x, &dy, &mut dw));
                    println!(
                        "{threads} thr  {name:<20} fwd {:6.1} ms {:5.1} GF/s | bwd-data {:6.1} ms {:5.1} GF/s | bwd-weight {:6.1} ms {:5.1} GF/s",
                        tf * 1e3,
                        flop / tf / 1e9,
                        td * 1e3,
                        flop / td / 1e9,
                        tw * 1e3,
                        flop / tw / 1e9
                    );
                });
            }
        }
    }
}

//! Host-side logic of the CUDA backend, in plain functions that run (and are tested) without
//! a GPU: view ranges, launch grids, the cuBLAS call that computes a row-major [`Gemm`], and
//! how convolution and attention decompose into column matrices and GEMMs.
use crate::backend::{Attention, Conv2d, Gemm, MatLayout};
use std::ops::Range;

/// Threads per block of the elementwise (grid-stride) kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;
/// Blocks of a grid-stride launch at most (enough to fill any current GPU many times over).
pub const MAX_GRID: u32 = 1 << 20;
/// Rows per warp-per-row block (layer norm, softmax, triplet): 4 warps.
pub const WARPS_PER_BLOCK: u32 = 4;
/// Rows per partial sum of column reductions (bias, plane embedding gradients).
pub const COL_ROWS_PER_BLOCK: usize = 256;
/// Rows per partial sum of the layer-norm parameter gradients (one warp walks them).
pub const LN_ROWS_PER_BLOCK: usize = 64;
/// Values per partial sum of `sum_squares` and the MSE loss: a fixed chunk, so the
/// reduction order depends only on the length.
pub const REDUCE_CHUNK: usize = 1 << 14;
/// Column-matrix scratch per convolution call at most, in f32 values (256 MiB): the batch
/// is processed in chunks of images that fit.
pub const COL_BUDGET: usize = 64 << 20;

/// Where a view lies in its buffer: `start .. start + len`, in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
}

impl Span {
    pub fn whole(len: usize) -> Span {
        Span { start: 0, len }
    }

    /// The part `range` of this span (relative to it); out of bounds panics as slice
    /// indexing does.
    pub fn part(self, range: Range<usize>) -> Span {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "view range {range:?} out of bounds of a view of {} values",
            self.len
        );
        Span {
            start: self.start + range.start,
            len: range.end - range.start,
        }
    }

    /// `[0, mid)` and `[mid, len)` of this span.
    pub fn split(self, mid: usize) -> (Span, Span) {
        assert!(
            mid <= self.len,
            "split at {mid} of a view of {} values",
            self.len
        );
        (self.part(0..mid), self.part(mid..self.len))
    }

    /// The device address of element `start` in a buffer of f32 at `base`.
    pub fn address(self, base: u64) -> u64 {
        base + (self.start * std::mem::size_of::<f32>()) as u64
    }
}

/// Blocks for a grid-stride kernel over `len` elements: one per `threads` elements, at least
/// one, at most [`MAX_GRID`].
pub fn grid_for(len: usize, threads: u32) -> u32 {
    let blocks = len.div_ceil(threads as usize).max(1);
    blocks.min(MAX_GRID as usize) as u32
}

/// CUDA's limit on a grid's y dimension.
pub const MAX_GRID_Y: u32 = 65_535;

/// A two-dimensional launch over `rows` rows of `cols` elements: threads of a block along a row
/// (a multiple of 32, at most [`ELEMENTWISE_THREADS`]), blocks along x to cover the row, one
/// block row per row up to [`MAX_GRID_Y`] (the kernel strides over the rest). Returns
/// `((grid_x, grid_y), threads)`. Both counts must fit the kernels' 32-bit indices.
pub fn grid_2d(cols: usize, rows: usize) -> ((u32, u32), u32) {
    assert!(
        cols <= i32::MAX as usize && rows <= i32::MAX as usize,
        "a {rows} x {cols} launch exceeds 32-bit indices"
    );
    let threads = cols
        .div_ceil(32)
        .clamp(1, (ELEMENTWISE_THREADS / 32) as usize) as u32
        * 32;
    let gx = cols.div_ceil(threads as usize).max(1) as u32;
    let gy = rows.clamp(1, MAX_GRID_Y as usize) as u32;
    ((gx, gy), threads)
}

/// Blocks for one block per item (plane, row block), checked against CUDA's grid limit.
pub fn grid_exact(items: usize) -> u32 {
    assert!(
        items >= 1 && items <= i32::MAX as usize,
        "cannot launch {items} blocks"
    );
    items as u32
}

/// The single cuBLAS `sgemm_strided_batched` call (column-major) that computes a row-major
/// [`Gemm`]: a row-major matrix is its column-major transpose, so `C^T = op(B)^T op(A)^T`:
/// cuBLAS's first operand is our `b`, its second our `a`, and `m`, `n` swap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlasGemm {
    /// Transpose cuBLAS's first operand (our `b`).
    pub trans_first: bool,
    /// Transpose cuBLAS's second operand (our `a`).
    pub trans_second: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub ld_first: i32,
    pub stride_first: i64,
    pub ld_second: i32,
    pub stride_second: i64,
    pub ldc: i32,
    pub stride_c: i64,
    pub batch: i32,
}

fn to_i32(v: usize, what: &str) -> Result<i32, String> {
    i32::try_from(v).map_err(|_| format!("gemm: {what} = {v} exceeds cuBLAS's 32-bit range"))
}

fn to_i64(v: usize, what: &str) -> Result<i64, String> {
    i64::try_from(v).map_err(|_| format!("gemm: {what} = {v} exceeds cuBLAS's 64-bit range"))
}

/// Checks one operand (stored `rows x cols` of `op` before any transpose) against its
/// view's length, as the CPU backend does, and returns the leading dimension cuBLAS gets:
/// a one-row matrix's `ld` is never used to step, but cuBLAS insists on `ld >= cols`.
fn operand_ld(
    what: &str,
    l: &MatLayout,
    rows: usize,
    cols: usize,
    batch: usize,
    len: usize,
) -> Result<usize, String> {
    let (r, c) = if l.trans { (cols, rows) } else { (rows, cols) };
    if r == 0 || c == 0 {
        return Ok(l.ld.max(c).max(1));
    }
    let last = (batch - 1) * l.stride + (r - 1) * l.ld + c - 1;
    if !((r == 1 || l.ld >= c) && last < len) {
        return Err(format!(
            "gemm: operand {what} ({r} x {c}, {l:?}, batch {batch}) does not fit its view of {len}"
        ));
    }
    Ok(if r == 1 { l.ld.max(c) } else { l.ld })
}

/// The cuBLAS call for `g` on views of lengths `a_len`, `b_len`, `c_len`; `None` when there
/// is nothing to compute.
pub fn blas_gemm(
    g: &Gemm,
    a_len: usize,
    b_len: usize,
    c_len: usize,
) -> Result<Option<BlasGemm>, String> {
    if g.batch == 0 || g.m == 0 || g.n == 0 {
        return Ok(None);
    }
    let lda = operand_ld("a", &g.a, g.m, g.k, g.batch, a_len)?;
    let ldb = operand_ld("b", &g.b, g.k, g.n, g.batch, b_len)?;
    if g.c.trans {
        return Err("gemm: a transposed output is not supported".into());
    }
    let ldc = operand_ld("c", &g.c, g.m, g.n, g.batch, c_len)?;
    if g.batch > 1 && g.c.stride < g.m.saturating_sub(1) * ldc + g.n {
        return Err(format!(
            "gemm: output matrices overlap (stride {} for {} x {}, ld {ldc})",
            g.c.stride, g.m, g.n
        ));
    }
    Ok(Some(BlasGemm {
        trans_first: g.b.trans,
        trans_second: g.a.trans,
        m: to_i32(g.n, "n")?,
        n: to_i32(g.m, "m")?,
        k: to_i32(g.k, "k")?,
        ld_first: to_i32(ldb, "ld of b")?,
        stride_first: to_i64(g.b.stride, "stride of b")?,
        ld_second: to_i32(lda, "ld of a")?,
        stride_second: to_i64(g.a.stride, "stride of a")?,
        ldc: to_i32(ldc, "ld of c")?,
        stride_c: to_i64(g.c.stride, "stride of c")?,
        batch: to_i32(g.batch, "batch")?,
    }))
}

/// Shape checks of a convolution, the CPU backend's.
pub fn check_conv(s: &Conv2d, x: usize, w: usize, y: usize, what: &str) {
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

/// A 1x1 convolution with stride 1 and no padding: the image is its own column matrix.
pub fn is_pointwise(s: &Conv2d) -> bool {
    s.k == 1 && s.stride == 1 && s.pad == 0
}

/// Where im2col puts column element (image i, row r, position q):
/// `i * img_stride + r * row_stride + q`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColLayout {
    pub img_stride: usize,
    pub row_stride: usize,
}

/// Rows of the column matrix (`cin k k`) and output positions per image (`ho wo`).
pub fn conv_dims(s: &Conv2d) -> (usize, usize) {
    let (ho, wo) = s.out_hw();
    (s.cin * s.k * s.k, ho * wo)
}

/// One `[cin k k, ho wo]` block per image (forward and backward-data).
pub fn col_per_image(s: &Conv2d) -> ColLayout {
    let (kk, p) = conv_dims(s);
    ColLayout {
        img_stride: kk * p,
        row_stride: p,
    }
}

/// One `[cin k k, images ho wo]` matrix (the weight gradient sums over images in its GEMM).
pub fn col_rows(s: &Conv2d, images: usize) -> ColLayout {
    let (_, p) = conv_dims(s);
    ColLayout {
        img_stride: p,
        row_stride: images * p,
    }
}

/// Images per chunk so that a chunk's `per_image` scratch values fit `budget` (at least 1).
pub fn images_per_chunk(n: usize, per_image: usize, budget: usize) -> usize {
    (budget / per_image.max(1)).clamp(1, n.max(1))
}

/// The image ranges of a batch of `n` in chunks of `per_chunk`, in order.
pub fn image_chunks(n: usize, per_chunk: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n)
        .step_by(per_chunk.max(1))
        .map(move |i| i..(i + per_chunk).min(n))
}

fn layout(trans: bool, ld: usize, stride: usize) -> MatLayout {
    MatLayout { trans, ld, stride }
}

/// Forward over `images` images: `Y_i [cout, p] = W [cout, kk] Col_i [kk, p]` (the image
/// itself for a pointwise convolution), `Col` per image.
pub fn conv_forward_gemm(s: &Conv2d, images: usize) -> Gemm {
    let (kk, p) = conv_dims(s);
    Gemm {
        m: s.cout,
        n: p,
        k: kk,
        batch: images,
        alpha: 1.0,
        beta: 0.0,
        a: layout(false, kk, 0),
        b: layout(false, p, kk * p),
        c: layout(false, p, s.cout * p),
    }
}

/// Backward to the input: `dCol_i [kk, p] = W^T dY_i` (straight into `dx` when pointwise).
pub fn conv_backward_data_gemm(s: &Conv2d, images: usize) -> Gemm {
    let (kk, p) = conv_dims(s);
    Gemm {
        m: kk,
        n: p,
        k: s.cout,
        batch: images,
        alpha: 1.0,
        beta: 0.0,
        a: layout(true, kk, 0),
        b: layout(false, p, s.cout * p),
        c: layout(false, p, kk * p),
    }
}

/// Weight gradient of a chunk of `images`: `dW [cout, kk] += dYt [cout, images p] Col^T`
/// with `dYt` the chunk's `dy` permuted to `[cout, images p]` and `Col` in [`col_rows`]
/// layout: one GEMM sums the chunk's images.
pub fn conv_backward_weight_gemm(s: &Conv2d, images: usize) -> Gemm {
    let (kk, p) = conv_dims(s);
    let np = images * p;
    Gemm {
        m: s.cout,
        n: kk,
        k: np,
        batch: 1,
        alpha: 1.0,
        beta: 1.0,
        a: layout(false, np, 0),
        b: layout(true, np, 0),
        c: layout(false, kk, 0),
    }
}

/// One GEMM of attention with the offsets of its operands in their views.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Placed {
    pub g: Gemm,
    pub a_off: usize,
    pub b_off: usize,
    pub c_off: usize,
}

/// Head `h` of a `[b, t, heads dh]` tensor as the batch (over `b`) of `[t, dh]` blocks.
fn head_layout(s: &Attention, trans: bool) -> MatLayout {
    layout(trans, s.heads * s.dh, s.t * s.heads * s.dh)
}

/// Head `h`'s `[t, t]` blocks of `probs [b, heads, t, t]`, batched over `b`.
fn probs_layout(s: &Attention, trans: bool) -> MatLayout {
    layout(trans, s.t, s.heads * s.t * s.t)
}

fn placed(g: Gemm, a_off: usize, b_off: usize, c_off: usize) -> Placed {
    Placed {
        g,
        a_off,
        b_off,
        c_off,
    }
}

/// Forward GEMMs of head `h`: scores `S = q k^T scale` into `probs` (softmax in between),
/// then `out = P v`.
pub fn attention_forward_gemms(s: &Attention, h: usize) -> [Placed; 2] {
    let (t, dh, hoff, poff) = (s.t, s.dh, h * s.dh, h * s.t * s.t);
    let scores = Gemm {
        m: t,
        n: t,
        k: dh,
        batch: s.b,
        alpha: s.scale,
        beta: 0.0,
        a: head_layout(s, false),
        b: head_layout(s, true),
        c: probs_layout(s, false),
    };
    let out = Gemm {
        m: t,
        n: dh,
        k: t,
        batch: s.b,
        alpha: 1.0,
        beta: 0.0,
        a: probs_layout(s, false),
        b: head_layout(s, false),
        c: head_layout(s, false),
    };
    [
        placed(scores, hoff, hoff, poff),
        placed(out, poff, hoff, hoff),
    ]
}

/// Backward GEMMs of head `h`, in order: `dP = dout v^T` (into the scratch `ds`, laid out as
/// `probs`), then after the softmax backward `dq = dS k`, `dk = dS^T q`, `dv = P^T dout`.
/// Operands: (dout, v, ds), (ds, k, dq), (ds, q, dk), (probs, dout, dv).
pub fn attention_backward_gemms(s: &Attention, h: usize) -> [Placed; 4] {
    let (t, dh, hoff, poff) = (s.t, s.dh, h * s.dh, h * s.t * s.t);
    let g = |m, n, k, a, b, c| Gemm {
        m,
        n,
        k,
        batch: s.b,
        alpha: 1.0,
        beta: 0.0,
        a,
        b,
        c,
    };
    let (head, probs) = (head_layout(s, false), probs_layout(s, false));
    let dp = g(t, t, dh, head, head_layout(s, true), probs);
    let dq = g(t, dh, t, probs, head, head);
    let dk = g(t, dh, t, probs_layout(s, true), head, head);
    let dv = g(t, dh, t, probs_layout(s, true), head, head);
    [
        placed(dp, hoff, hoff, poff),
        placed(dq, poff, hoff, hoff),
        placed(dk, poff, hoff, hoff),
        placed(dv, poff, hoff, hoff),
    ]
}

/// The largest row index in `rows` must address a full row of `d` values in a view of
/// `len` (the GPU cannot bounds-check).
pub fn check_rows(rows: &[u32], d: usize, len: usize, what: &str) {
    if let Some(&max) = rows.iter().max() {
        assert!(
            (max as usize + 1) * d <= len,
            "{what}: row {max} of width {d} is outside a view of {len} values"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::{attention, conv, gemm};
    use crate::rng;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut r = rng::keyed(seed, &[], "cuda-plan-test");
        (0..len).map(|_| rng::unit(&mut r) as f32 - 0.5).collect()
    }

    /// What cuBLAS computes for `p` (column-major, the reference BLAS definition).
    fn blas_reference(
        p: &BlasGemm,
        alpha: f32,
        beta: f32,
        first: &[f32],
        second: &[f32],
        c: &mut [f32],
    ) {
        let at = |x: &[f32], trans: bool, ld: i32, stride: i64, b: usize, i: usize, j: usize| {
            let (r, col) = if trans { (j, i) } else { (i, j) };
            x[b * stride as usize + col * ld as usize + r]
        };
        for b in 0..p.batch as usize {
            for i in 0..p.m as usize {
                for j in 0..p.n as usize {
                    let mut acc = 0.0f64;
                    for l in 0..p.k as usize {
                        let x = at(first, p.trans_first, p.ld_first, p.stride_first, b, i, l);
                        let y = at(
                            second,
                            p.trans_second,
                            p.ld_second,
                            p.stride_second,
                            b,
                            l,
                            j,
                        );
                        acc += f64::from(x) * f64::from(y);
                    }
                    let ci = b * p.stride_c as usize + j * p.ldc as usize + i;
                    let old = if beta == 0.0 { 0.0 } else { beta * c[ci] };
                    c[ci] = alpha * acc as f32 + old;
                }
            }
        }
    }

    /// Runs a row-major GEMM as the planned cuBLAS call would and compares with the CPU GEMM.
    fn check_gemm(g: &Gemm, a: &[f32], b: &[f32], c0: &[f32]) {
        let p = blas_gemm(g, a.len(), b.len(), c0.len()).unwrap().unwrap();
        let mut want = c0.to_vec();
        gemm::gemm(g, a, b, &mut want);
        let mut got = c0.to_vec();
        blas_reference(&p, g.alpha, g.beta, b, a, &mut got);
        for (i, (w, x)) in want.iter().zip(&got).enumerate() {
            assert!(
                (w - x).abs() <= 1e-4 * (1.0 + w.abs()),
                "{g:?}: element {i}: cpu {w}, plan {x}"
            );
        }
    }

    #[test]
    fn blas_plan_matches_the_cpu_gemm_for_every_transpose() {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (m, n, k, batch) = (5, 7, 3, 2);
            let (lda, ldb, ldc) = (
                if ta { m + 1 } else { k + 2 },
                if tb { k + 1 } else { n + 3 },
                n + 1,
            );
            let a_rows = if ta { k } else { m };
            let b_rows = if tb { n } else { k };
            let g = Gemm {
                m,
                n,
                k,
                batch,
                alpha: 0.75,
                beta: 0.5,
                a: MatLayout {
                    trans: ta,
                    ld: lda,
                    stride: a_rows * lda + 1,
                },
                b: MatLayout {
                    trans: tb,
                    ld: ldb,
                    stride: b_rows * ldb + 2,
                },
                c: MatLayout {
                    trans: false,
                    ld: ldc,
                    stride: m * ldc,
                },
            };
            let a = random(batch * (a_rows * lda + 1), 1);
            let b = random(batch * (b_rows * ldb + 2), 2);
            let c = random(batch * m * ldc, 3);
            check_gemm(&g, &a, &b, &c);
        }
    }

    #[test]
    fn blas_plan_widens_the_ld_of_one_row_matrices() {
        // A 1 x k row vector with ld 0 (shared by the batch): legal for the CPU backend,
        // cuBLAS needs ld >= cols.
        let g = Gemm {
            m: 1,
            n: 4,
            k: 3,
            batch: 2,
            alpha: 1.0,
            beta: 0.0,
            a: MatLayout {
                trans: false,
                ld: 0,
                stride: 0,
            },
            b: MatLayout {
                trans: false,
                ld: 4,
                stride: 12,
            },
            c: MatLayout {
                trans: false,
                ld: 0,
                stride: 4,
            },
        };
        let p = blas_gemm(&g, 3, 24, 8).unwrap().unwrap();
        assert_eq!(p.ld_second, 3);
        assert_eq!(p.ldc, 4);
        check_gemm(&g, &random(3, 4), &random(24, 5), &[f32::NAN; 8]);
    }

    #[test]
    fn blas_plan_rejects_what_it_cannot_run() {
        let ok = Gemm {
            m: 2,
            n: 2,
            k: 2,
            batch: 1,
            alpha: 1.0,
            beta: 0.0,
            a: MatLayout {
                trans: false,
                ld: 2,
                stride: 0,
            },
            b: MatLayout {
                trans: false,
                ld: 2,
                stride: 0,
            },
            c: MatLayout {
                trans: false,
                ld: 2,
                stride: 0,
            },
        };
        assert!(blas_gemm(&ok, 4, 4, 4).unwrap().is_some());
        let short = blas_gemm(&ok, 3, 4, 4).unwrap_err();
        assert!(short.contains("operand a"), "{short}");
        let trans_c = Gemm {
            c: MatLayout {
                trans: true,
                ..ok.c
            },
            ..ok
        };
        assert!(blas_gemm(&trans_c, 4, 4, 4).is_err());
        let overlap = Gemm { batch: 2, ..ok };
        assert!(
            blas_gemm(&overlap, 4, 4, 8)
                .unwrap_err()
                .contains("overlap")
        );
        let huge = Gemm {
            k: 1 << 31,
            a: MatLayout {
                trans: true,
                ld: 2,
                stride: 0,
            },
            b: MatLayout {
                trans: false,
                ld: 2,
                stride: 0,
            },
            ..ok
        };
        assert!(
            blas_gemm(&huge, usize::MAX, usize::MAX, 4)
                .unwrap_err()
                .contains("32-bit")
        );
        assert_eq!(blas_gemm(&Gemm { batch: 0, ..ok }, 0, 0, 0), Ok(None));
    }

    #[test]
    fn spans_mirror_slice_indexing() {
        let s = Span::whole(10).part(2..9);
        assert_eq!(s, Span { start: 2, len: 7 });
        let (a, b) = s.split(3);
        assert_eq!(
            (a, b),
            (Span { start: 2, len: 3 }, Span { start: 5, len: 4 })
        );
        assert_eq!(b.part(1..2), Span { start: 6, len: 1 });
        assert_eq!(b.address(1000), 1000 + 5 * 4);
        assert!(std::panic::catch_unwind(|| Span::whole(4).part(2..5)).is_err());
        assert!(std::panic::catch_unwind(|| Span::whole(4).split(5)).is_err());
    }

    #[test]
    fn grids_cover_the_work_and_stay_in_limits() {
        assert_eq!(grid_for(0, 256), 1);
        assert_eq!(grid_for(256, 256), 1);
        assert_eq!(grid_for(257, 256), 2);
        assert_eq!(grid_for(usize::MAX / 2, 256), MAX_GRID);
        assert_eq!(grid_exact(7), 7);
        // Rows of 42 positions (a late stage's 6 x 7): 64 threads, one block across.
        assert_eq!(grid_2d(42, 10), ((1, 10), 64));
        assert_eq!(grid_2d(2736, 100_000), ((11, MAX_GRID_Y), 256));
        assert_eq!(grid_2d(0, 0), ((1, 1), 32));
        assert!(std::panic::catch_unwind(|| grid_2d(1 << 31, 1)).is_err());
        assert!(std::panic::catch_unwind(|| grid_exact(0)).is_err());
    }

    #[test]
    fn image_chunks_cover_the_batch_in_order() {
        assert_eq!(images_per_chunk(10, 100, 350), 3);
        assert_eq!(images_per_chunk(10, 1000, 350), 1);
        assert_eq!(images_per_chunk(2, 1, 350), 2);
        let c: Vec<_> = image_chunks(10, 3).collect();
        assert_eq!(c, vec![0..3, 3..6, 6..9, 9..10]);
        assert_eq!(image_chunks(0, 3).count(), 0);
    }

    #[test]
    fn check_rows_refuses_rows_outside_the_view() {
        check_rows(&[0, 3], 4, 16, "t");
        check_rows(&[], 4, 0, "t");
        assert!(std::panic::catch_unwind(|| check_rows(&[4], 4, 16, "t")).is_err());
    }

    /// im2col on the host with the kernel's index formula (kernels/conv.cu).
    fn im2col_host(s: &Conv2d, x: &[f32], images: usize, l: ColLayout, col: &mut [f32]) {
        let (ho, wo) = s.out_hw();
        let (kk, p) = conv_dims(s);
        for img in 0..images {
            for r in 0..kk {
                let (ci, ky, kx) = (r / (s.k * s.k), r / s.k % s.k, r % s.k);
                for q in 0..p {
                    let (oy, ox) = (q / wo, q % wo);
                    let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                    let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                    let inside = iy >= 0 && ix >= 0 && (iy as usize) < s.h && (ix as usize) < s.w;
                    col[img * l.img_stride + r * l.row_stride + q] = if inside {
                        x[((img * s.cin + ci) * s.h + iy as usize) * s.w + ix as usize]
                    } else {
                        0.0
                    };
                }
            }
            let _ = ho;
        }
    }

    fn conv_shapes() -> Vec<Conv2d> {
        let c = |n, cin, h, w, cout, k, stride, pad| Conv2d {
            n,
            cin,
            h,
            w,
            cout,
            k,
            stride,
            pad,
        };
        vec![
            c(3, 2, 9, 7, 4, 3, 1, 1),
            c(2, 1, 11, 10, 3, 7, 2, 3),
            c(3, 4, 6, 5, 2, 1, 2, 0),
            c(2, 3, 5, 5, 2, 1, 1, 0),
        ]
    }

    fn close(what: &str, want: &[f32], got: &[f32]) {
        assert_eq!(want.len(), got.len(), "{what}: lengths");
        for (i, (w, g)) in want.iter().zip(got).enumerate() {
            assert!(
                (w - g).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}: element {i}: cpu {w}, plan {g}"
            );
        }
    }

    #[test]
    fn conv_gemm_plans_reproduce_the_cpu_convolution() {
        for s in conv_shapes() {
            let (ho, wo) = s.out_hw();
            let (kk, p) = conv_dims(&s);
            let x = random(s.n * s.cin * s.h * s.w, 10);
            let w = random(s.cout * kk, 11);
            let dy = random(s.n * s.cout * ho * wo, 12);

            let mut want = vec![0.0; s.n * s.cout * p];
            conv::forward(&s, &x, &w, &mut want);
            let mut got = vec![f32::NAN; want.len()];
            let col_src = if is_pointwise(&s) {
                x.clone()
            } else {
                let mut col = vec![0.0; s.n * kk * p];
                im2col_host(&s, &x, s.n, col_per_image(&s), &mut col);
                col
            };
            gemm::gemm(&conv_forward_gemm(&s, s.n), &w, &col_src, &mut got);
            close(&format!("forward {s:?}"), &want, &got);

            // Backward to the data: the dCol GEMM, then col2im as the adjoint of im2col.
            let mut want = vec![0.0; x.len()];
            conv::backward_data(&s, &dy, &w, &mut want);
            let mut dcol = vec![f32::NAN; s.n * kk * p];
            gemm::gemm(&conv_backward_data_gemm(&s, s.n), &w, &dy, &mut dcol);
            let got = if is_pointwise(&s) {
                dcol
            } else {
                // col2im = transpose of im2col: push each column value back to its source.
                let mut dx = vec![0.0f32; x.len()];
                for (i, xi) in dx.iter_mut().enumerate() {
                    let mut e = vec![0.0; x.len()];
                    e[i] = 1.0;
                    let mut col = vec![0.0; s.n * kk * p];
                    im2col_host(&s, &e, s.n, col_per_image(&s), &mut col);
                    *xi = col.iter().zip(&dcol).map(|(a, b)| a * b).sum();
                }
                dx
            };
            close(&format!("backward data {s:?}"), &want, &got);

            // Weight gradient in two chunks, accumulated onto a non-zero dw.
            let dw0 = random(w.len(), 13);
            let mut want = dw0.clone();
            conv::backward_weight(&s, &x, &dy, &mut want);
            let mut got = dw0.clone();
            for chunk in image_chunks(s.n, 2) {
                let imgs = chunk.len();
                let xs = &x[chunk.start * s.cin * s.h * s.w..chunk.end * s.cin * s.h * s.w];
                let mut col = vec![0.0; kk * imgs * p];
                im2col_host(&s, xs, imgs, col_rows(&s, imgs), &mut col);
                let mut dyt = vec![0.0; s.cout * imgs * p];
                for i in 0..imgs {
                    for co in 0..s.cout {
                        for q in 0..p {
                            dyt[(co * imgs + i) * p + q] =
                                dy[((chunk.start + i) * s.cout + co) * p + q];
                        }
                    }
                }
                gemm::gemm(&conv_backward_weight_gemm(&s, imgs), &dyt, &col, &mut got);
            }
            close(&format!("backward weight {s:?}"), &want, &got);
        }
    }

    fn softmax_rows(x: &mut [f32], t: usize) {
        for r in x.chunks_exact_mut(t) {
            let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = r
                .iter_mut()
                .map(|v| {
                    *v = (*v - m).exp();
                    *v
                })
                .sum();
            r.iter_mut().for_each(|v| *v /= sum);
        }
    }

    #[test]
    fn attention_gemm_plans_reproduce_the_cpu_attention() {
        let s = Attention {
            b: 2,
            t: 5,
            heads: 3,
            dh: 4,
            scale: 0.5,
        };
        let len = s.b * s.t * s.heads * s.dh;
        let plen = s.b * s.heads * s.t * s.t;
        let (q, k, v, dout) = (
            random(len, 20),
            random(len, 21),
            random(len, 22),
            random(len, 23),
        );
        let (mut probs, mut out) = (vec![0.0; plen], vec![0.0; len]);
        attention::forward(&s, &q, &k, &v, &mut probs, &mut out);

        let (mut p2, mut o2) = (vec![f32::NAN; plen], vec![f32::NAN; len]);
        for h in 0..s.heads {
            let [sc, _] = attention_forward_gemms(&s, h);
            gemm::gemm(&sc.g, &q[sc.a_off..], &k[sc.b_off..], &mut p2[sc.c_off..]);
        }
        softmax_rows(&mut p2, s.t);
        for h in 0..s.heads {
            let [_, o] = attention_forward_gemms(&s, h);
            gemm::gemm(&o.g, &p2[o.a_off..], &v[o.b_off..], &mut o2[o.c_off..]);
        }
        close("probs", &probs, &p2);
        close("out", &out, &o2);

        let (mut dq, mut dk, mut dv) = (vec![0.0; len], vec![0.0; len], vec![0.0; len]);
        attention::backward(&s, &q, &k, &v, &probs, &dout, &mut dq, &mut dk, &mut dv);
        let mut ds = vec![f32::NAN; plen];
        let (mut dq2, mut dk2, mut dv2) = (
            vec![f32::NAN; len],
            vec![f32::NAN; len],
            vec![f32::NAN; len],
        );
        for h in 0..s.heads {
            let [dp, ..] = attention_backward_gemms(&s, h);
            gemm::gemm(
                &dp.g,
                &dout[dp.a_off..],
                &v[dp.b_off..],
                &mut ds[dp.c_off..],
            );
        }
        for (dr, pr) in ds.chunks_exact_mut(s.t).zip(probs.chunks_exact(s.t)) {
            let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
            dr.iter_mut()
                .zip(pr)
                .for_each(|(d, p)| *d = p * (*d - dot) * s.scale);
        }
        for h in 0..s.heads {
            let [_, gq, gk, gv] = attention_backward_gemms(&s, h);
            gemm::gemm(&gq.g, &ds[gq.a_off..], &k[gq.b_off..], &mut dq2[gq.c_off..]);
            gemm::gemm(&gk.g, &ds[gk.a_off..], &q[gk.b_off..], &mut dk2[gk.c_off..]);
            gemm::gemm(
                &gv.g,
                &probs[gv.a_off..],
                &dout[gv.b_off..],
                &mut dv2[gv.c_off..],
            );
        }
        close("dq", &dq, &dq2);
        close("dk", &dk, &dk2);
        close("dv", &dv, &dv2);
    }
}

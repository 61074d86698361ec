//! Strided batched GEMM, row-major, the CPU backend's workhorse (linear layers, attention).
//! rayon splits the output into tiles, each owned by one task; a task packs its rows of `a`
//! and columns of `b` into register-tile panels, one k block at a time, and multiplies them
//! with a fixed-size micro-kernel that LLVM vectorises.
//!
//! Determinism: every output element is summed by one task over k in increasing order (in
//! blocks of [`KC`], each block added to `c` in order), whatever the thread count.
use super::Real;
use crate::backend::{Gemm, MatLayout};
use rayon::prelude::*;

/// Rows of the register tile.
pub(crate) const MR: usize = 4;
/// Columns of the register tile: 4 x 16 f32 accumulators fill eight AVX registers.
pub(crate) const NR: usize = 16;
/// Rows of `a` per task at most (the packed `MC x KC` block stays in L2); each task packs
/// its own block of `b`, so taller tasks repack `b` less often.
const MC: usize = 128;
/// Depth of one k block: an `NR x KC` panel of `b` stays in L1.
const KC: usize = 256;
/// Values of `b` one task packs per k block (256 KiB of f32: stays in L2).
const B_BLOCK: usize = 1 << 16;

/// One read-only operand: matrix at `offset`, rows `ld` apart, read transposed when `trans`.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a, T> {
    pub data: &'a [T],
    pub offset: usize,
    pub ld: usize,
    pub trans: bool,
}

/// `c_i = alpha op(a_i) op(b_i) + beta c_i` for every batch entry (see [`Gemm`]). With
/// `beta == 0`, `c` is never read, so it may hold NaN or garbage.
///
/// Tasks are (entry, row block, column block) tiles of `c`. How `c` is cut does not change
/// any element's arithmetic (same products, same k order), so the cut may follow the thread
/// count without changing results.
pub fn gemm<T: Real>(g: &Gemm, a: &[T], b: &[T], c: &mut [T]) {
    if g.batch == 0 || g.m == 0 || g.n == 0 {
        return;
    }
    check_bounds("a", &g.a, g.m, g.k, g.batch, a.len());
    check_bounds("b", &g.b, g.k, g.n, g.batch, b.len());
    check_bounds("c", &g.c, g.m, g.n, g.batch, c.len());
    let (alpha, beta) = (T::of(g.alpha), T::of(g.beta));
    let (mc, nc) = tile_size(g.batch, g.m, g.n, g.k);
    let mut tasks = split_c(g, c, mc, nc);
    tasks.par_iter_mut().for_each(|task| {
        let operand = |data, l: &MatLayout| Operand {
            data,
            offset: task.entry * l.stride,
            ld: l.ld,
            trans: l.trans,
        };
        let (op_a, op_b) = (operand(a, &g.a), operand(b, &g.b));
        let tile = Tile {
            r0: task.r0,
            j0: task.j0,
            cols: task.cols,
        };
        block(g.k, alpha, beta, &op_a, &op_b, &tile, &mut task.rows);
    });
}

/// One task: rows `r0 ..` of entry `entry`, columns `j0 .. j0 + cols` (`j0` a multiple of
/// `NR`), as one writable slice per row.
struct Task<'c, T> {
    entry: usize,
    r0: usize,
    j0: usize,
    cols: usize,
    rows: Vec<&'c mut [T]>,
}

/// Tile rows and columns: row blocks of up to `MC`, column blocks whose packed `KC x nc`
/// block of `b` fits L2, then narrower column blocks and shorter row blocks until there are a
/// few tasks per thread (matrices with few rows, like weight gradients `64 x 1024`, still
/// use every thread).
fn tile_size(batch: usize, m: usize, n: usize, k: usize) -> (usize, usize) {
    let want = 4 * rayon::current_num_threads();
    let count = |mc: usize, nc: usize| batch * m.div_ceil(mc) * n.div_ceil(nc);
    let fits_l2 = (B_BLOCK / KC.min(k).max(1) / NR).max(1) * NR;
    let (mut mc, mut nc) = (MC, n.div_ceil(NR).min(fits_l2 / NR) * NR);
    while count(mc, nc) < want && nc >= 8 * NR {
        nc = (nc / 2).div_ceil(NR) * NR;
    }
    while count(mc, nc) < want && mc >= 4 * MR {
        mc /= 2;
    }
    (mc, nc)
}

/// Cuts `c` into the tasks' row pieces with `split_at_mut`, so every task owns its memory.
/// Panics when two elements of the output share an address (the layout overlaps itself).
fn split_c<'c, T>(g: &Gemm, c: &'c mut [T], mc: usize, nc: usize) -> Vec<Task<'c, T>> {
    let (row_blocks, col_blocks) = (g.m.div_ceil(mc), g.n.div_ceil(nc));
    let mut tasks: Vec<Task<'c, T>> = (0..g.batch * row_blocks * col_blocks)
        .map(|idx| {
            let (entry, rest) = (
                idx / (row_blocks * col_blocks),
                idx % (row_blocks * col_blocks),
            );
            let (rb, cb) = (rest / col_blocks, rest % col_blocks);
            Task {
                entry,
                r0: rb * mc,
                j0: cb * nc,
                cols: nc.min(g.n - cb * nc),
                rows: Vec::with_capacity(mc),
            }
        })
        .collect();
    // Rows of all entries in address order (usually already sorted).
    let mut starts: Vec<(usize, usize, usize)> = (0..g.batch)
        .flat_map(|i| (0..g.m).map(move |r| (i * g.c.stride + r * g.c.ld, i, r)))
        .collect();
    if !starts.is_sorted() {
        starts.sort_unstable();
    }
    let mut rest = c;
    let mut at = 0;
    for (start, i, r) in starts {
        assert!(
            start >= at,
            "gemm: output layout {:?} overlaps itself (m {}, n {}, batch {})",
            g.c,
            g.m,
            g.n,
            g.batch
        );
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - at);
        let (mut row, tail) = tail.split_at_mut(g.n);
        rest = tail;
        at = start + g.n;
        let base = (i * row_blocks + r / mc) * col_blocks;
        for cb in 0..col_blocks {
            let (piece, more) = row.split_at_mut(nc.min(row.len()));
            tasks[base + cb].rows.push(piece);
            row = more;
        }
    }
    tasks
}

/// Single-threaded `c = alpha op(a) op(b) + beta c` for one `m x n` matrix with rows `ldc`
/// apart: the building block of ops that already run one task per matrix (attention).
pub(crate) fn gemm_serial<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    a: &Operand<'_, T>,
    b: &Operand<'_, T>,
    beta: T,
    c: &mut [T],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    // One task for the whole matrix: b is packed once per k block for all rows.
    let mut rows: Vec<&mut [T]> = c.chunks_mut(ldc).take(m).map(|r| &mut r[..n]).collect();
    assert_eq!(rows.len(), m, "gemm: c is too short for {m} rows");
    let tile = Tile {
        r0: 0,
        j0: 0,
        cols: n,
    };
    block(k, alpha, beta, a, b, &tile, &mut rows);
}

fn check_bounds(what: &str, l: &MatLayout, rows: usize, cols: usize, batch: usize, len: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    let (r, c) = if l.trans { (cols, rows) } else { (rows, cols) };
    let last = (batch - 1) * l.stride + (r - 1) * l.ld + c - 1;
    assert!(
        (r == 1 || l.ld >= c) && last < len,
        "gemm: operand {what} ({r} x {c}, {l:?}, batch {batch}) does not fit its buffer of {len}"
    );
}

/// Packs columns `j0 .. j0 + w` (`w <= NR`), depths `k0 .. k0 + kc` of `op(b)` into one
/// panel: `op(b)[k0 + kk, j0 + j]` at `kk NR + j`, zero-padded to `NR` columns.
fn pack_b_panel<T: Real>(
    b: &Operand<'_, T>,
    k0: usize,
    kc: usize,
    j0: usize,
    w: usize,
    dst: &mut [T],
) {
    let dst = &mut dst[..kc * NR];
    if b.trans {
        // Column j of op(b) is a contiguous run of the stored matrix: read it in order and
        // write every NR-th value (the panel is small and stays in L1).
        if w < NR {
            dst.fill(T::zero());
        }
        for j in 0..w {
            let start = b.offset + (j0 + j) * b.ld + k0;
            for (d, &x) in dst[j..]
                .iter_mut()
                .step_by(NR)
                .zip(&b.data[start..start + kc])
            {
                *d = x;
            }
        }
        return;
    }
    for (kk, row) in dst.chunks_exact_mut(NR).enumerate() {
        let start = b.offset + (k0 + kk) * b.ld + j0;
        if w == NR {
            // A fixed length compiles to two vector moves instead of a memcpy call.
            let src: &[T; NR] = b.data[start..start + NR].try_into().expect("NR values");
            row.copy_from_slice(src);
        } else {
            row[..w].copy_from_slice(&b.data[start..start + w]);
            row[w..].fill(T::zero());
        }
    }
}

/// Packs rows `r0..r0 + rows`, depths `k0..k0 + kc` of `op(a)` into row panels of height `MR`:
/// panel `p` holds `op(a)[r0 + p MR + i, k0 + kk]` at `kk MR + i`, zero-padded.
fn pack_a<T: Real>(
    a: &Operand<'_, T>,
    r0: usize,
    rows: usize,
    k0: usize,
    kc: usize,
    dst: &mut [T],
) {
    for (p, panel) in dst.chunks_exact_mut(kc * MR).enumerate() {
        let i0 = r0 + p * MR;
        let h = MR.min(r0 + rows - i0);
        if a.trans {
            // Row kk of the stored matrix holds op(a)[i0.., kk]: contiguous.
            for (kk, col) in panel.chunks_exact_mut(MR).enumerate() {
                let start = a.offset + (k0 + kk) * a.ld + i0;
                if h == MR {
                    // A fixed length compiles to a vector move instead of a memcpy call.
                    let src: &[T; MR] = a.data[start..start + MR].try_into().expect("MR values");
                    col.copy_from_slice(src);
                } else {
                    col[..h].copy_from_slice(&a.data[start..start + h]);
                    col[h..].fill(T::zero());
                }
            }
        } else {
            // Row i of op(a) is contiguous: read it in order, write every MR-th value.
            if h < MR {
                panel.fill(T::zero());
            }
            for i in 0..h {
                let start = a.offset + (i0 + i) * a.ld + k0;
                for (d, &x) in panel[i..]
                    .iter_mut()
                    .step_by(MR)
                    .zip(&a.data[start..start + kc])
                {
                    *d = x;
                }
            }
        }
    }
}

/// Where a task's tile of `c` sits: rows from `r0`, columns `j0 .. j0 + cols`.
struct Tile {
    r0: usize,
    j0: usize,
    cols: usize,
}

/// One task's share: its rows of `op(a)` times its columns of `op(b)`, k in blocks of `KC`,
/// both operands packed per k block into buffers the task owns.
fn block<T: Real>(
    k: usize,
    alpha: T,
    beta: T,
    a: &Operand<'_, T>,
    b: &Operand<'_, T>,
    tile: &Tile,
    rows: &mut [&mut [T]],
) {
    let m = rows.len();
    if m == 0 || tile.cols == 0 {
        return;
    }
    if k == 0 {
        // Nothing to multiply: c = beta c (and beta == 0 still clears garbage).
        let zero = [[T::zero(); NR]; MR];
        for i0 in (0..m).step_by(MR) {
            for j0 in (0..tile.cols).step_by(NR) {
                store(&zero, rows, i0, j0, alpha, Some(beta));
            }
        }
        return;
    }
    let (panels_a, panels_b) = (m.div_ceil(MR), tile.cols.div_ceil(NR));
    let mut packed_a = vec![T::zero(); panels_a * MR * KC.min(k)];
    let mut packed_b = vec![T::zero(); panels_b * NR * KC.min(k)];
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let pa = &mut packed_a[..panels_a * MR * kc];
        pack_a(a, tile.r0, m, k0, kc, pa);
        let pb = &mut packed_b[..panels_b * NR * kc];
        for (p, dst) in pb.chunks_exact_mut(kc * NR).enumerate() {
            let j = p * NR;
            pack_b_panel(b, k0, kc, tile.j0 + j, NR.min(tile.cols - j), dst);
        }
        // The first k block applies beta; later ones add to what is there.
        let beta_now = (k0 == 0).then_some(beta);
        macro_kernel(pa, pb, kc, rows, alpha, beta_now);
    }
}

/// All register tiles of one k block: every `MR`-row panel of `pa` against every `NR`-column
/// panel of `pb` (`kc` deep), stored into `rows`. Dispatches to a copy
/// compiled for AVX2 when the processor has it; both copies do the same operations in the
/// same order (no FMA contraction), so results are identical. The dispatch sits here, not
/// per tile, so the micro-kernel inlines and its accumulators stay in registers.
fn macro_kernel<T: Real>(
    pa: &[T],
    pb: &[T],
    kc: usize,
    rows: &mut [&mut [T]],
    alpha: T,
    beta: Option<T>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor supports AVX2, checked just above.
            return unsafe { macro_kernel_avx2(pa, pb, kc, rows, alpha, beta) };
        }
    }
    macro_kernel_generic(pa, pb, kc, rows, alpha, beta)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn macro_kernel_avx2<T: Real>(
    pa: &[T],
    pb: &[T],
    kc: usize,
    rows: &mut [&mut [T]],
    alpha: T,
    beta: Option<T>,
) {
    macro_kernel_generic(pa, pb, kc, rows, alpha, beta)
}

#[inline(always)]
fn macro_kernel_generic<T: Real>(
    pa: &[T],
    pb: &[T],
    kc: usize,
    rows: &mut [&mut [T]],
    alpha: T,
    beta: Option<T>,
) {
    for (pj, panel_b) in pb.chunks_exact(kc * NR).enumerate() {
        for (pi, panel_a) in pa.chunks_exact(kc * MR).enumerate() {
            let acc = micro_kernel(panel_a, panel_b);
            store(&acc, rows, pi * MR, pj * NR, alpha, beta);
        }
    }
}

/// `acc[i][j] = sum over kk of a[kk MR + i] b[kk NR + j]`, kk in increasing order.
#[inline(always)]
fn micro_kernel<T: Real>(a: &[T], b: &[T]) -> [[T; NR]; MR] {
    let mut acc = [[T::zero(); NR]; MR];
    for (ak, bk) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        let ak: &[T; MR] = ak.try_into().expect("MR chunk");
        let bk: &[T; NR] = bk.try_into().expect("NR chunk");
        for i in 0..MR {
            for j in 0..NR {
                acc[i][j] += ak[i] * bk[j];
            }
        }
    }
    acc
}

/// Writes the valid part of a register tile at (row `i0`, column `j0`) of the task's rows:
/// `c = alpha acc + beta c` on the first k block (`beta` is `Some`; 0 never reads `c`),
/// `c += alpha acc` after.
#[inline(always)]
fn store<T: Real>(
    acc: &[[T; NR]; MR],
    rows: &mut [&mut [T]],
    i0: usize,
    j0: usize,
    alpha: T,
    beta: Option<T>,
) {
    for (row, acc_row) in rows[i0..].iter_mut().take(MR).zip(acc) {
        let w = NR.min(row.len() - j0);
        let row = &mut row[j0..j0 + w];
        match beta {
            Some(beta) if beta == T::zero() => {
                for (cv, &x) in row.iter_mut().zip(&acc_row[..w]) {
                    *cv = alpha * x;
                }
            }
            Some(beta) => {
                for (cv, &x) in row.iter_mut().zip(&acc_row[..w]) {
                    *cv = alpha * x + beta * *cv;
                }
            }
            None => {
                for (cv, &x) in row.iter_mut().zip(&acc_row[..w]) {
                    *cv += alpha * x;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::gradcheck::random;

    /// The obviously correct triple loop.
    fn naive(g: &Gemm, a: &[f64], b: &[f64], c: &mut [f64]) {
        for bi in 0..g.batch {
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut s = 0.0;
                    for kk in 0..g.k {
                        let av = if g.a.trans {
                            a[bi * g.a.stride + kk * g.a.ld + i]
                        } else {
                            a[bi * g.a.stride + i * g.a.ld + kk]
                        };
                        let bv = if g.b.trans {
                            b[bi * g.b.stride + j * g.b.ld + kk]
                        } else {
                            b[bi * g.b.stride + kk * g.b.ld + j]
                        };
                        s += av * bv;
                    }
                    let ci = &mut c[bi * g.c.stride + i * g.c.ld + j];
                    let old = if g.beta == 0.0 { 0.0 } else { *ci };
                    *ci = g.alpha as f64 * s + g.beta as f64 * old;
                }
            }
        }
    }

    /// A layout for a `rows x cols` operand (as stored), with `pad` spare columns per row and
    /// `gap` spare values between batch entries.
    fn layout(trans: bool, rows: usize, cols: usize, pad: usize, gap: usize) -> MatLayout {
        let (r, c) = if trans { (cols, rows) } else { (rows, cols) };
        let ld = c + pad;
        MatLayout {
            trans,
            ld,
            stride: r * ld + gap,
        }
    }

    fn buf_len(l: &MatLayout, batch: usize) -> usize {
        batch * l.stride + 1
    }

    fn run_case(m: usize, n: usize, k: usize, batch: usize, ta: bool, tb: bool, ab: (f32, f32)) {
        let g = Gemm {
            m,
            n,
            k,
            batch,
            alpha: ab.0,
            beta: ab.1,
            a: layout(ta, m, k, 3, 5),
            b: layout(tb, k, n, 1, 2),
            c: layout(false, m, n, 2, 7),
        };
        let a = random(buf_len(&g.a, batch), 1);
        let b = random(buf_len(&g.b, batch), 2);
        let mut c = random(buf_len(&g.c, batch), 3);
        if g.beta == 0.0 {
            c.iter_mut().step_by(3).for_each(|x| *x = f64::NAN);
        }
        let mut want = c.clone();
        naive(&g, &a, &b, &mut want);
        gemm(&g, &a, &b, &mut c);
        for (i, (x, y)) in c.iter().zip(&want).enumerate() {
            let ok = (x - y).abs() <= 1e-12 * (1.0 + y.abs()) || (x.is_nan() && y.is_nan());
            assert!(
                ok,
                "m{m} n{n} k{k} b{batch} ta{ta} tb{tb} at {i}: {x} vs {y}"
            );
        }
    }

    #[test]
    fn matches_the_triple_loop_for_every_transpose() {
        let shapes = [
            (1, 1, 1, 1),
            (3, 5, 7, 1),
            (4, 16, 8, 2),
            (17, 33, 9, 3),
            (70, 19, 300, 2),  // several k blocks
            (133, 21, 260, 2), // several row blocks and k blocks
            (5, 40, 0, 2),     // k = 0: c = beta c
        ];
        for &(m, n, k, batch) in &shapes {
            for ta in [false, true] {
                for tb in [false, true] {
                    for ab in [(1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)] {
                        run_case(m, n, k, batch, ta, tb, ab);
                    }
                }
            }
        }
    }

    #[test]
    fn side_by_side_outputs_like_attention_heads() {
        // Two 5 x 6 outputs interleaved in rows of 12 (heads of a [t, heads * dh] tensor).
        let (m, n, k, batch) = (5, 6, 4, 2);
        let g = Gemm {
            m,
            n,
            k,
            batch,
            alpha: 1.0,
            beta: 0.0,
            a: MatLayout {
                trans: false,
                ld: 8,
                stride: 4,
            },
            b: MatLayout {
                trans: true,
                ld: 8,
                stride: 4,
            },
            c: MatLayout {
                trans: false,
                ld: 12,
                stride: 6,
            },
        };
        let a = random(m * 8, 4);
        let b = random(n * 8, 5);
        let mut c = vec![f64::NAN; m * 12];
        let mut want = vec![0.0; m * 12];
        naive(&g, &a, &b, &mut want);
        gemm(&g, &a, &b, &mut c);
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-12);
        }
    }

    #[test]
    fn f32_agrees_with_f64_and_thread_count_changes_nothing() {
        let g = Gemm {
            m: 130,
            n: 70,
            k: 300,
            batch: 1,
            alpha: 1.0,
            beta: 0.0,
            a: layout(false, 130, 300, 0, 0),
            b: layout(true, 300, 70, 0, 0),
            c: layout(false, 130, 70, 0, 0),
        };
        let a = random(buf_len(&g.a, 1), 6);
        let b = random(buf_len(&g.b, 1), 7);
        let mut c64 = vec![0.0; buf_len(&g.c, 1)];
        gemm(&g, &a, &b, &mut c64);
        let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
        let b32: Vec<f32> = b.iter().map(|&x| x as f32).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut c = vec![0.0f32; buf_len(&g.c, 1)];
            pool.install(|| gemm(&g, &a32, &b32, &mut c));
            c
        };
        let c1 = run(1);
        assert_eq!(c1, run(3), "thread count changed the result");
        for (x, y) in c1.iter().zip(&c64) {
            assert!((*x as f64 - y).abs() < 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn few_rows_split_by_columns_give_the_same_bits() {
        // 8 x 300 is cut into column blocks with 3 threads and not with 1.
        for (m, n, k) in [(8, 300, 70), (64, 1024, 33)] {
            let g = Gemm {
                m,
                n,
                k,
                batch: 1,
                alpha: 0.75,
                beta: 0.5,
                a: layout(true, m, k, 0, 0),
                b: layout(false, k, n, 0, 0),
                c: layout(false, m, n, 0, 0),
            };
            let f = |x: Vec<f64>| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
            let (a, b, c0) = (
                f(random(m * k, 8)),
                f(random(k * n, 9)),
                f(random(m * n, 10)),
            );
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut c = c0.clone();
                pool.install(|| gemm(&g, &a, &b, &mut c));
                c
            };
            assert_eq!(run(1), run(3));
        }
    }

    #[test]
    #[should_panic(expected = "overlaps itself")]
    fn an_overlapping_output_is_refused() {
        let g = Gemm {
            m: 2,
            n: 2,
            k: 1,
            batch: 2,
            alpha: 1.0,
            beta: 0.0,
            a: layout(false, 2, 1, 0, 0),
            b: layout(false, 1, 2, 0, 0),
            c: MatLayout {
                trans: false,
                ld: 2,
                stride: 1,
            },
        };
        let mut c = vec![0.0f64; 8];
        gemm(&g, &[1.0; 8], &[1.0; 8], &mut c);
    }
}

//! Strided batched GEMM, row-major, the CPU backend's workhorse (linear layers, attention).
//! Operands are packed into register-tile panels and multiplied by a fixed-size micro-kernel
//! that LLVM vectorises; rayon splits the output into row blocks, each owned by one task.
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
/// Rows of `a` packed per task (the packed block stays in L2).
const MC: usize = 64;
/// Depth of one k block: an `NR x KC` panel of `b` stays in L1.
const KC: usize = 256;

/// One read-only operand: `op(x)[r, c]` with the transposition folded into the indexing.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a, T> {
    pub data: &'a [T],
    pub offset: usize,
    pub ld: usize,
    pub trans: bool,
}

impl<T: Real> Operand<'_, T> {
    #[inline(always)]
    fn at(&self, r: usize, c: usize) -> T {
        if self.trans {
            self.data[self.offset + c * self.ld + r]
        } else {
            self.data[self.offset + r * self.ld + c]
        }
    }
}

/// `c_i = alpha op(a_i) op(b_i) + beta c_i` for every batch entry (see [`Gemm`]). With
/// `beta == 0`, `c` is never read, so it may hold NaN or garbage.
pub fn gemm<T: Real>(g: &Gemm, a: &[T], b: &[T], c: &mut [T]) {
    if g.batch == 0 || g.m == 0 || g.n == 0 {
        return;
    }
    check_bounds("a", &g.a, g.m, g.k, g.batch, a.len());
    check_bounds("b", &g.b, g.k, g.n, g.batch, b.len());
    check_bounds("c", &g.c, g.m, g.n, g.batch, c.len());
    let (alpha, beta) = (T::of(g.alpha), T::of(g.beta));
    let op_a = |i: usize| Operand {
        data: a,
        offset: i * g.a.stride,
        ld: g.a.ld,
        trans: g.a.trans,
    };
    // Every batch entry's b is packed once, then shared by all row blocks of that entry.
    let panel_len = g.k * NR;
    let packed_len = g.n.div_ceil(NR) * panel_len;
    let mut packed_b = vec![T::zero(); g.batch * packed_len];
    if packed_len > 0 {
        packed_b
            .par_chunks_mut(packed_len)
            .enumerate()
            .for_each(|(i, dst)| {
                let op_b = Operand {
                    data: b,
                    offset: i * g.b.stride,
                    ld: g.b.ld,
                    trans: g.b.trans,
                };
                pack_b(&op_b, g.k, g.n, dst);
            });
    }
    let packed_of = |i: usize| &packed_b[i * packed_len..(i + 1) * packed_len];
    let (ldc, sc) = (g.c.ld, g.c.stride);
    let extent = (g.m - 1) * ldc + g.n;
    let rows_apart = g.m == 1 || ldc >= g.n;
    if g.batch == 1 || (rows_apart && sc >= extent) {
        // Entries one after the other: tasks are (entry, row block).
        let step = if g.batch == 1 { c.len() } else { sc };
        c.par_chunks_mut(step.max(1))
            .take(g.batch)
            .enumerate()
            .for_each(|(i, ci)| {
                ci.par_chunks_mut(MC * ldc)
                    .enumerate()
                    .for_each(|(blk, rows)| {
                        let r0 = blk * MC;
                        let tile = Tile {
                            r0,
                            rows: MC.min(g.m.saturating_sub(r0)),
                            col0: 0,
                            ldc,
                        };
                        block(g.k, g.n, alpha, beta, &op_a(i), packed_of(i), &tile, rows);
                    });
            });
    } else if rows_apart && sc >= g.n && (g.batch - 1) * sc + g.n <= ldc {
        // Entries side by side in the same rows (e.g. attention heads): tasks are row blocks,
        // each covering every entry.
        c.par_chunks_mut(MC * ldc)
            .enumerate()
            .for_each(|(blk, rows)| {
                let r0 = blk * MC;
                for i in 0..g.batch {
                    let tile = Tile {
                        r0,
                        rows: MC.min(g.m.saturating_sub(r0)),
                        col0: i * sc,
                        ldc,
                    };
                    block(g.k, g.n, alpha, beta, &op_a(i), packed_of(i), &tile, rows);
                }
            });
    } else {
        panic!(
            "gemm: output layout {:?} overlaps itself for m {} n {} batch {}",
            g.c, g.m, g.n, g.batch
        );
    }
}

/// Single-threaded `c = alpha op(a) op(b) + beta c` for one `m x n` matrix with rows `ldc`
/// apart: the building block of ops that already run one task per matrix (attention).
#[allow(clippy::too_many_arguments)]
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
    let mut packed = vec![T::zero(); n.div_ceil(NR) * k * NR];
    pack_b(b, k, n, &mut packed);
    for r0 in (0..m).step_by(MC) {
        let tile = Tile {
            r0,
            rows: MC.min(m - r0),
            col0: 0,
            ldc,
        };
        block(k, n, alpha, beta, a, &packed, &tile, &mut c[r0 * ldc..]);
    }
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

/// Where a task's rows of `c` sit in the slice it was given: row `r0 + i` of the matrix is at
/// `i * ldc + col0`.
struct Tile {
    r0: usize,
    rows: usize,
    col0: usize,
    ldc: usize,
}

/// Packs all of `op(b)` (`k x n`) into column panels of width `NR`: panel `p` holds
/// `op(b)[kk, p NR + j]` at `kk NR + j`, zero-padded past `n`.
fn pack_b<T: Real>(b: &Operand<'_, T>, k: usize, n: usize, dst: &mut [T]) {
    for (p, panel) in dst.chunks_exact_mut(k * NR).enumerate() {
        let j0 = p * NR;
        let w = NR.min(n - j0);
        for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
            if b.trans {
                for j in 0..w {
                    row[j] = b.at(kk, j0 + j);
                }
            } else {
                let start = b.offset + kk * b.ld + j0;
                row[..w].copy_from_slice(&b.data[start..start + w]);
            }
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
        for (kk, col) in panel.chunks_exact_mut(MR).enumerate() {
            for i in 0..h {
                col[i] = a.at(i0 + i, k0 + kk);
            }
            col[h..].fill(T::zero());
        }
    }
}

/// One task's share: rows `tile.r0 ..` of `c` for all `n` columns, k in blocks of `KC`.
#[allow(clippy::too_many_arguments)]
fn block<T: Real>(
    k: usize,
    n: usize,
    alpha: T,
    beta: T,
    a: &Operand<'_, T>,
    packed_b: &[T],
    tile: &Tile,
    c: &mut [T],
) {
    if tile.rows == 0 {
        return;
    }
    let panels_a = tile.rows.div_ceil(MR);
    let mut packed_a = vec![T::zero(); panels_a * MR * KC.min(k.max(1))];
    if k == 0 {
        // Nothing to multiply: c = beta c (and beta == 0 still clears garbage).
        let zero = [[T::zero(); NR]; MR];
        for i0 in (0..tile.rows).step_by(MR) {
            for j0 in (0..n).step_by(NR) {
                store(&zero, tile, i0, j0, n, alpha, Some(beta), c);
            }
        }
        return;
    }
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let pa = &mut packed_a[..panels_a * MR * kc];
        pack_a(a, tile.r0, tile.rows, k0, kc, pa);
        // The first k block applies beta; later ones add to what is there.
        let beta_now = (k0 == 0).then_some(beta);
        for (pj, panel_b) in packed_b.chunks_exact(k * NR).enumerate() {
            let pb = &panel_b[k0 * NR..(k0 + kc) * NR];
            for (pi, panel_a) in pa.chunks_exact(kc * MR).enumerate() {
                let acc = micro_kernel(panel_a, pb);
                store(&acc, tile, pi * MR, pj * NR, n, alpha, beta_now, c);
            }
        }
    }
}

/// `acc[i][j] = sum over kk of a[kk MR + i] b[kk NR + j]`, kk in increasing order. Dispatches
/// to a copy compiled for AVX2 when the processor has it; both copies do the same operations
/// in the same order (no FMA contraction), so results are identical.
#[inline]
fn micro_kernel<T: Real>(a: &[T], b: &[T]) -> [[T; NR]; MR] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor supports AVX2, checked just above.
            return unsafe { micro_kernel_avx2(a, b) };
        }
    }
    micro_kernel_generic(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn micro_kernel_avx2<T: Real>(a: &[T], b: &[T]) -> [[T; NR]; MR] {
    micro_kernel_generic(a, b)
}

#[inline(always)]
fn micro_kernel_generic<T: Real>(a: &[T], b: &[T]) -> [[T; NR]; MR] {
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
#[allow(clippy::too_many_arguments)]
#[inline]
fn store<T: Real>(
    acc: &[[T; NR]; MR],
    tile: &Tile,
    i0: usize,
    j0: usize,
    n: usize,
    alpha: T,
    beta: Option<T>,
    c: &mut [T],
) {
    let h = MR.min(tile.rows - i0);
    let w = NR.min(n - j0);
    for i in 0..h {
        let start = (i0 + i) * tile.ldc + tile.col0 + j0;
        let row = &mut c[start..start + w];
        match beta {
            Some(beta) if beta == T::zero() => {
                for (cv, &x) in row.iter_mut().zip(&acc[i][..w]) {
                    *cv = alpha * x;
                }
            }
            Some(beta) => {
                for (cv, &x) in row.iter_mut().zip(&acc[i][..w]) {
                    *cv = alpha * x + beta * *cv;
                }
            }
            None => {
                for (cv, &x) in row.iter_mut().zip(&acc[i][..w]) {
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
            (70, 19, 300, 2), // several row blocks and k blocks
            (5, 40, 0, 2),    // k = 0: c = beta c
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
}

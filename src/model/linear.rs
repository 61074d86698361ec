//! Fully connected layers in PyTorch's weight layout (`w [out, in]`, `y = x w^T + b`),
//! written once over the backend's GEMM.
use crate::backend::{Backend, Gemm, MatLayout};

fn plain(ld: usize) -> MatLayout {
    MatLayout {
        trans: false,
        ld,
        stride: 0,
    }
}

fn transposed(ld: usize) -> MatLayout {
    MatLayout {
        trans: true,
        ld,
        stride: 0,
    }
}

/// `y [rows, out] = x [rows, in] w^T + b`.
pub fn forward<B: Backend>(
    be: &B,
    rows: usize,
    din: usize,
    dout: usize,
    x: B::View<'_>,
    w: B::View<'_>,
    b: B::View<'_>,
    mut y: B::ViewMut<'_>,
) {
    let g = Gemm {
        m: rows,
        n: dout,
        k: din,
        batch: 1,
        alpha: 1.0,
        beta: 0.0,
        a: plain(din),
        b: transposed(din),
        c: plain(dout),
    };
    be.gemm(&g, x, w, be.reborrow_mut(&mut y));
    be.add_bias(rows, dout, b, y);
}

/// `dx = dy w` (when `dx` is given), `dw += dy^T x`, `db += sum_rows dy`.
pub fn backward<B: Backend>(
    be: &B,
    rows: usize,
    din: usize,
    dout: usize,
    x: B::View<'_>,
    w: B::View<'_>,
    dy: B::View<'_>,
    dx: Option<B::ViewMut<'_>>,
    dw: B::ViewMut<'_>,
    db: B::ViewMut<'_>,
) {
    if let Some(dx) = dx {
        let g = Gemm {
            m: rows,
            n: din,
            k: dout,
            batch: 1,
            alpha: 1.0,
            beta: 0.0,
            a: plain(dout),
            b: plain(din),
            c: plain(din),
        };
        be.gemm(&g, dy, w, dx);
    }
    let g = Gemm {
        m: dout,
        n: din,
        k: rows,
        batch: 1,
        alpha: 1.0,
        beta: 1.0,
        a: transposed(dout),
        b: plain(din),
        c: plain(din),
    };
    be.gemm(&g, dy, x, dw);
    be.bias_backward(rows, dout, dy, db);
}

//! GFLOP/s of the CPU backend's GEMM and attention on the paper transformer's shapes (4
//! subjects x 306 tokens, D 64, 4 heads x 256, FFN 128) with 1 and 2 rayon threads; best of
//! several runs, FLOP = 2 x multiply-adds.
//!
//!     cargo bench --bench gemm
use mtx_hpc::backend::cpu::{attention, gemm::gemm};
use mtx_hpc::backend::{Attention, Gemm, MatLayout};
use std::time::Instant;

/// Best wall time of `f` over repeats filling about 0.3 s.
fn best_seconds(mut f: impl FnMut()) -> f64 {
    f();
    let (mut best, start) = (f64::INFINITY, Instant::now());
    let mut runs = 0;
    while runs < 3 || start.elapsed().as_secs_f64() < 0.3 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        runs += 1;
    }
    best
}

fn dense(trans: bool, rows: usize, cols: usize) -> MatLayout {
    let (r, c) = if trans { (cols, rows) } else { (rows, cols) };
    MatLayout {
        trans,
        ld: c,
        stride: r * c,
    }
}

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

fn bench_gemm(name: &str, m: usize, n: usize, k: usize, ta: bool, tb: bool) {
    bench_batched(name, 1, m, n, k, ta, tb);
}

/// `batch` products sharing one `a` (a convolution's weight against each slice's im2col
/// matrix when `batch > 1`).
fn bench_batched(name: &str, batch: usize, m: usize, n: usize, k: usize, ta: bool, tb: bool) {
    let mut a_layout = dense(ta, m, k);
    a_layout.stride = 0;
    let g = Gemm {
        m,
        n,
        k,
        batch,
        alpha: 1.0,
        beta: 0.0,
        a: a_layout,
        b: dense(tb, k, n),
        c: dense(false, m, n),
    };
    let (a, b, mut c) = (
        values(m * k),
        values(batch * k * n),
        vec![0.0f32; batch * m * n],
    );
    let flop = 2.0 * (batch * m * n * k) as f64;
    let mut line = format!("{name:<44} {m:>5} {n:>5} {k:>5}");
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        let s = pool.install(|| best_seconds(|| gemm(&g, &a, &b, &mut c)));
        line += &format!("  {:>7.1} ({:>6.3} ms)", flop / s * 1e-9, s * 1e3);
    }
    println!("{line}");
}

fn bench_attention(name: &str, b: usize, t: usize) {
    let s = Attention {
        b,
        t,
        heads: 4,
        dh: 256,
        scale: 1.0 / 16.0,
    };
    let len = b * t * 1024;
    let (q, k, v, dout) = (
        values(len),
        values(len + 1),
        values(len + 2),
        values(len + 3),
    );
    let (mut probs, mut out) = (vec![0.0f32; b * 4 * t * t], vec![0.0f32; len]);
    let (mut dq, mut dk, mut dv) = (vec![0.0f32; len], vec![0.0f32; len], vec![0.0f32; len]);
    // Forward: two t x t x dh products per head; backward: four.
    let fwd_flop = 2.0 * 2.0 * (b * 4 * t * t * 256) as f64;
    let mut line = format!("{name:<44} b {b:>2} t {t:>4}       ");
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        let f = pool
            .install(|| best_seconds(|| attention::forward(&s, &q, &k, &v, &mut probs, &mut out)));
        let bw = pool.install(|| {
            best_seconds(|| {
                attention::backward(&s, &q, &k, &v, &probs, &dout, &mut dq, &mut dk, &mut dv)
            })
        });
        line += &format!(
            "  fwd {:>6.1} ({:>6.2} ms) bwd {:>6.1} ({:>6.2} ms)",
            fwd_flop / f * 1e-9,
            f * 1e3,
            2.0 * fwd_flop / bw * 1e-9,
            bw * 1e3
        );
    }
    println!("{line}");
}

fn main() {
    let rows = 4 * 306;
    println!("GFLOP/s (ms per call); columns: 1 thread, 2 threads");
    println!("{:<44} {:>5} {:>5} {:>5}", "gemm", "m", "n", "k");
    bench_gemm(
        "QKV projection x W^T [1024, 64]",
        rows,
        1024,
        64,
        false,
        true,
    );
    bench_gemm(
        "output projection x W^T [64, 1024]",
        rows,
        64,
        1024,
        false,
        true,
    );
    bench_gemm("FFN up x W^T [128, 64]", rows, 128, 64, false, true);
    bench_gemm(
        "FFN down / encoder linear x W^T [64, 128]",
        rows,
        64,
        128,
        false,
        true,
    );
    bench_gemm("QKV backward data dy W", rows, 64, 1024, false, false);
    bench_gemm("QKV backward weight dy^T x", 1024, 64, rows, true, false);
    bench_gemm("output backward weight dy^T x", 64, 1024, rows, true, false);
    bench_gemm("square 512", 512, 512, 512, false, false);
    // Encoder convolutions as im2col GEMMs over a subject's 96 axial 96 x 114 slices.
    bench_batched(
        "conv1 7x7 1->16 as GEMM, 96 slices",
        96,
        16,
        48 * 57,
        49,
        false,
        false,
    );
    bench_batched(
        "stage-1 conv3x3 16->16 as GEMM, 96 slices",
        96,
        16,
        24 * 29,
        144,
        false,
        false,
    );
    bench_batched(
        "stage-4 conv3x3 128->128 as GEMM, 96 slices",
        96,
        128,
        3 * 4,
        1152,
        false,
        false,
    );
    bench_attention("attention per plane (4 subjects x 3 planes)", 12, 114);
    bench_attention("attention joint (4 subjects)", 4, 306);
}

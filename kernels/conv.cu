// Convolution helpers: the column matrix of a 2-D convolution (im2col), its adjoint (col2im)
// and the [n, c, p] -> [c, n, p] permutation. The GEMMs themselves go through cuBLAS.
//
// Column element (image i, row r = (ci k + ky) k + kx, position q = oy wo + ox) lives at
// col[i * img_stride + r * row_stride + q]: per-image blocks [n, cin k k, ho wo] for the
// forward and backward-data GEMMs (img_stride = kk p, row_stride = p), or one matrix
// [cin k k, n ho wo] for the weight gradient (img_stride = p, row_stride = n p).

// Launch (plan::grid_2d): x over the positions q of a row, y over the rows (image, r), striding
// over rows by gridDim.y. Every thread divides 32-bit integers only, once for its position and
// a few times per row: 64-bit division (a long software sequence) made these copies the
// largest share of a triplet step's GPU time (docs/PERFORMANCE.md).
extern "C" __global__ void im2col(const float* __restrict__ x, int n, int cin, int h, int w,
                                  int k, int stride, int pad, int ho, int wo, i64 img_stride,
                                  i64 row_stride, float* __restrict__ col) {
    const int p = ho * wo, kk2 = k * k, kk = cin * kk2, rows = n * kk;
    const int q = blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= p) return;
    const int oy = q / wo, ox = q - oy * wo;
    for (int row = blockIdx.y; row < rows; row += gridDim.y) {
        const int img = row / kk, r = row - img * kk;
        const int ci = r / kk2, t = r - ci * kk2;
        const int ky = t / k, kx = t - ky * k;
        const int iy = oy * stride + ky - pad, ix = ox * stride + kx - pad;
        float v = 0.0f;
        if (iy >= 0 && iy < h && ix >= 0 && ix < w)
            v = x[(((i64)img * cin + ci) * h + iy) * w + ix];
        col[img * img_stride + r * row_stride + q] = v;
    }
}

// dx = the sum of every column value that im2col copied from each input element, taps in
// (ky, kx) order (the CPU backend's order). One thread per input element: no atomics.
// Launch (plan::grid_2d): x over the positions of an image plane, y over the planes
// (image, channel), striding over planes by gridDim.y; 32-bit index arithmetic as im2col.
extern "C" __global__ void col2im(const float* __restrict__ col, int n, int cin, int h, int w,
                                  int k, int stride, int pad, int ho, int wo, i64 img_stride,
                                  i64 row_stride, float* __restrict__ dx) {
    const int hw = h * w, planes = n * cin;
    const int pos = blockIdx.x * blockDim.x + threadIdx.x;
    if (pos >= hw) return;
    const int iy = pos / w, ix = pos - iy * w;
    for (int plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        const int img = plane / cin, ci = plane - img * cin;
        const float* c = col + img * img_stride;
        float acc = 0.0f;
        for (int ky = 0; ky < k; ++ky) {
            const int ty = iy + pad - ky;
            if (ty < 0 || ty % stride != 0) continue;
            const int oy = ty / stride;
            if (oy >= ho) continue;
            for (int kx = 0; kx < k; ++kx) {
                const int tx = ix + pad - kx;
                if (tx < 0 || tx % stride != 0) continue;
                const int ox = tx / stride;
                if (ox >= wo) continue;
                const int r = (ci * k + ky) * k + kx;
                acc += c[r * row_stride + oy * wo + ox];
            }
        }
        dx[(i64)plane * hw + pos] = acc;
    }
}

// dst[ci, i, q] = src[i, ci, q]: activations [n, c, p] as one matrix [c, n p].
extern "C" __global__ void permute_nc(const float* __restrict__ src, int n, int c, i64 p,
                                      float* __restrict__ dst) {
    const i64 total = (i64)n * c * p;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)gridDim.x * blockDim.x) {
        const i64 q = idx % p;
        const i64 i = (idx / p) % n;
        const i64 ci = idx / (p * n);
        dst[idx] = src[(i * c + ci) * p + q];
    }
}

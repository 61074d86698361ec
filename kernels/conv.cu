// Convolution helpers: the column matrix of a 2-D convolution (im2col), its adjoint (col2im)
// and the [n, c, p] -> [c, n, p] permutation. The GEMMs themselves go through cuBLAS.
//
// Column element (image i, row r = (ci k + ky) k + kx, position q = oy wo + ox) lives at
// col[i * img_stride + r * row_stride + q]: per-image blocks [n, cin k k, ho wo] for the
// forward and backward-data GEMMs (img_stride = kk p, row_stride = p), or one matrix
// [cin k k, n ho wo] for the weight gradient (img_stride = p, row_stride = n p).

extern "C" __global__ void im2col(const float* __restrict__ x, int n, int cin, int h, int w,
                                  int k, int stride, int pad, int ho, int wo, i64 img_stride,
                                  i64 row_stride, float* __restrict__ col) {
    const i64 p = (i64)ho * wo, kk = (i64)cin * k * k;
    const i64 total = (i64)n * kk * p;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)gridDim.x * blockDim.x) {
        const i64 q = idx % p;
        const i64 r = (idx / p) % kk;
        const i64 img = idx / (p * kk);
        const int kx = (int)(r % k), ky = (int)((r / k) % k), ci = (int)(r / ((i64)k * k));
        const int oy = (int)(q / wo), ox = (int)(q % wo);
        const int iy = oy * stride + ky - pad, ix = ox * stride + kx - pad;
        float v = 0.0f;
        if (iy >= 0 && iy < h && ix >= 0 && ix < w)
            v = x[((img * cin + ci) * h + iy) * (i64)w + ix];
        col[img * img_stride + r * row_stride + q] = v;
    }
}

// dx = the sum of every column value that im2col copied from each input element, taps in
// (ky, kx) order (the CPU backend's order). One thread per input element: no atomics.
extern "C" __global__ void col2im(const float* __restrict__ col, int n, int cin, int h, int w,
                                  int k, int stride, int pad, int ho, int wo, i64 img_stride,
                                  i64 row_stride, float* __restrict__ dx) {
    const i64 total = (i64)n * cin * h * w;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)gridDim.x * blockDim.x) {
        const int ix = (int)(idx % w), iy = (int)((idx / w) % h);
        const int ci = (int)((idx / ((i64)w * h)) % cin);
        const i64 img = idx / ((i64)w * h * cin);
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
                const i64 r = ((i64)ci * k + ky) * k + kx;
                acc += col[img * img_stride + r * row_stride + (i64)oy * wo + ox];
            }
        }
        dx[idx] = acc;
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

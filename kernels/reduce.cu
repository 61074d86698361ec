// Deterministic reductions: fixed chunks summed by fixed blocks (first pass), then the
// partial sums added in chunk order (second pass). No float atomics: everything that feeds
// the weights (parameter gradients, the gradient norm) gives the same bits on every run.

// partials[blk, j] = sum over rows blk*rows_per_block .. of src[r, j], rows in order.
// Grid: (ceil(rows / rows_per_block), ceil(d / blockDim.x)).
extern "C" __global__ void col_partials(const float* __restrict__ src, i64 rows, int d,
                                        int rows_per_block, double* __restrict__ partials) {
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= d) return;
    const i64 r0 = (i64)blockIdx.x * rows_per_block;
    const i64 r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
    double s = 0.0;
    for (i64 r = r0; r < r1; ++r) s += (double)src[r * d + j];
    partials[(i64)blockIdx.x * d + j] = s;
}

// dst[j] += sum over blocks (in order) of partials[blk, j]. One thread per column.
extern "C" __global__ void col_finish(const double* __restrict__ partials, int blocks, int d,
                                      float* __restrict__ dst) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    double s = 0.0;
    for (int b = 0; b < blocks; ++b) s += partials[(i64)b * d + j];
    dst[j] += (float)s;
}

// partials[blk] = sum of x^2 over chunk blk of `chunk` values.
// Grid: ceil(len / chunk) blocks of MTX_REDUCE_THREADS.
extern "C" __global__ void sum_squares_partials(const float* __restrict__ x, i64 len, i64 chunk,
                                                double* __restrict__ partials) {
    const i64 lo = (i64)blockIdx.x * chunk;
    const i64 hi = lo + chunk < len ? lo + chunk : len;
    double s = 0.0;
    for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) s += (double)x[i] * (double)x[i];
    s = block_sum(s);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// out[0] = scale * sum of the n partials. One block of MTX_REDUCE_THREADS.
extern "C" __global__ void sum_partials(const double* __restrict__ partials, i64 n, double scale,
                                        double* __restrict__ out) {
    double s = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) s += partials[i];
    s = block_sum(s);
    if (threadIdx.x == 0) out[0] = s * scale;
}

// loss[0] = (float)(scale * sum of the n partials). One block of MTX_REDUCE_THREADS.
extern "C" __global__ void finish_loss(const double* __restrict__ partials, i64 n, double scale,
                                       float* __restrict__ loss) {
    double s = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) s += partials[i];
    s = block_sum(s);
    if (threadIdx.x == 0) loss[0] = (float)(s * scale);
}

// Instance norm (one block per (sample, channel) plane, optional fused ReLU) and layer norm
// (one warp per row), forward and backward. Moments are summed in double by two passes, as
// the CPU backend does. Parameter gradients never use atomics: backward kernels write
// per-plane or per-row-block partial sums, and a second kernel adds them in a fixed order.

// Grid: n * c blocks of MTX_REDUCE_THREADS threads.
extern "C" __global__ void instance_norm_forward(const float* __restrict__ x,
                                                 const float* __restrict__ gamma,
                                                 const float* __restrict__ beta, int c, i64 hw,
                                                 float eps, int relu, float* __restrict__ y,
                                                 float* __restrict__ mean,
                                                 float* __restrict__ rstd) {
    const i64 plane = blockIdx.x;
    const float* xp = x + plane * hw;
    float* yp = y + plane * hw;
    double s = 0.0;
    for (i64 i = threadIdx.x; i < hw; i += blockDim.x) s += (double)xp[i];
    const double m = block_sum(s) / (double)hw;
    double v = 0.0;
    for (i64 i = threadIdx.x; i < hw; i += blockDim.x) {
        const double d = (double)xp[i] - m;
        v += d * d;
    }
    const double var = block_sum(v) / (double)hw;
    const float mf = (float)m, rf = (float)(1.0 / sqrt(var + (double)eps));
    if (threadIdx.x == 0) {
        mean[plane] = mf;
        rstd[plane] = rf;
    }
    const int ch = (int)(plane % c);
    const float scale = gamma[ch] * rf, shift = beta[ch] - mf * scale;
    for (i64 i = threadIdx.x; i < hw; i += blockDim.x) {
        const float o = xp[i] * scale + shift;
        yp[i] = relu ? (o > 0.0f ? o : 0.0f) : o;
    }
}

// dx for one plane; writes the plane's (sum g, sum g xhat) to sums[2 plane ..] for
// instance_norm_param_grads. Grid: n * c blocks of MTX_REDUCE_THREADS threads.
extern "C" __global__ void instance_norm_backward(
    const float* __restrict__ x, const float* __restrict__ y, const float* __restrict__ gamma,
    const float* __restrict__ mean, const float* __restrict__ rstd,
    const float* __restrict__ dy, int c, i64 hw, int relu, float* __restrict__ dx,
    double* __restrict__ sums) {
    const i64 plane = blockIdx.x;
    const i64 off = plane * hw;
    const float m = mean[plane], r = rstd[plane];
    double sg = 0.0, sgx = 0.0;
    for (i64 i = threadIdx.x; i < hw; i += blockDim.x) {
        const float g = relu ? (y[off + i] > 0.0f ? dy[off + i] : 0.0f) : dy[off + i];
        const float xhat = (x[off + i] - m) * r;
        sg += (double)g;
        sgx += (double)g * (double)xhat;
    }
    sg = block_sum(sg);
    sgx = block_sum(sgx);
    const float mg = (float)(sg / (double)hw), mgx = (float)(sgx / (double)hw);
    const float scale = gamma[plane % c] * r;
    for (i64 i = threadIdx.x; i < hw; i += blockDim.x) {
        const float g = relu ? (y[off + i] > 0.0f ? dy[off + i] : 0.0f) : dy[off + i];
        const float xhat = (x[off + i] - m) * r;
        dx[off + i] = scale * (g - mg - xhat * mgx);
    }
    if (threadIdx.x == 0) {
        sums[2 * plane] = sg;
        sums[2 * plane + 1] = sgx;
    }
}

// dbeta[ch] += sum over samples of sum g, dgamma[ch] += sum of sum g xhat, samples in order.
// One thread per channel.
extern "C" __global__ void instance_norm_param_grads(const double* __restrict__ sums, int n,
                                                     int c, float* __restrict__ dgamma,
                                                     float* __restrict__ dbeta) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double sg = 0.0, sgx = 0.0;
    for (int s = 0; s < n; ++s) {
        sg += sums[2 * ((i64)s * c + ch)];
        sgx += sums[2 * ((i64)s * c + ch) + 1];
    }
    dbeta[ch] += (float)sg;
    dgamma[ch] += (float)sgx;
}

// One warp per row of d values; blocks of several warps.
extern "C" __global__ void layer_norm_forward(const float* __restrict__ x,
                                              const float* __restrict__ gamma,
                                              const float* __restrict__ beta, i64 rows, int d,
                                              float eps, float* __restrict__ y,
                                              float* __restrict__ mean,
                                              float* __restrict__ rstd) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;  // the whole warp leaves together
    const float* xr = x + row * d;
    double s = 0.0;
    for (int j = lane; j < d; j += 32) s += (double)xr[j];
    const double m = warp_sum(s) / (double)d;
    double v = 0.0;
    for (int j = lane; j < d; j += 32) {
        const double t = (double)xr[j] - m;
        v += t * t;
    }
    const double var = warp_sum(v) / (double)d;
    const float mf = (float)m, rf = (float)(1.0 / sqrt(var + (double)eps));
    if (lane == 0) {
        mean[row] = mf;
        rstd[row] = rf;
    }
    for (int j = lane; j < d; j += 32) y[row * d + j] = (xr[j] - mf) * rf * gamma[j] + beta[j];
}

// One warp per block of `rows_per_block` rows: dx for each row, and the block's partial
// parameter gradients pgamma/pbeta [block, d] (summed later by col_finish in block order).
// Dynamic shared memory: 2 d doubles.
extern "C" __global__ void layer_norm_backward(
    const float* __restrict__ x, const float* __restrict__ gamma,
    const float* __restrict__ mean, const float* __restrict__ rstd,
    const float* __restrict__ dy, i64 rows, int d, int rows_per_block,
    float* __restrict__ dx, double* __restrict__ pgamma, double* __restrict__ pbeta) {
    extern __shared__ double acc[];
    const int lane = threadIdx.x;
    for (int j = lane; j < 2 * d; j += 32) acc[j] = 0.0;
    // Column j is accumulated by lane j % 32, but acc[d + j] was zeroed by lane (d + j) % 32.
    __syncwarp();
    const i64 r0 = (i64)blockIdx.x * rows_per_block;
    const i64 r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
    for (i64 row = r0; row < r1; ++row) {
        const float m = mean[row], r = rstd[row];
        const float* xr = x + row * d;
        const float* gr = dy + row * d;
        double sg = 0.0, sgx = 0.0;
        for (int j = lane; j < d; j += 32) {
            const float xhat = (xr[j] - m) * r;
            const float g = gr[j] * gamma[j];
            sg += (double)g;
            sgx += (double)g * (double)xhat;
            acc[j] += (double)(gr[j] * xhat);
            acc[d + j] += (double)gr[j];
        }
        sg = warp_sum(sg);
        sgx = warp_sum(sgx);
        const float mg = (float)(sg / (double)d), mgx = (float)(sgx / (double)d);
        for (int j = lane; j < d; j += 32) {
            const float xhat = (xr[j] - m) * r;
            dx[row * d + j] = r * (gr[j] * gamma[j] - mg - xhat * mgx);
        }
    }
    for (int j = lane; j < d; j += 32) {
        pgamma[(i64)blockIdx.x * d + j] = acc[j];
        pbeta[(i64)blockIdx.x * d + j] = acc[d + j];
    }
}

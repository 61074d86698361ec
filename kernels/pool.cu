// Max pool (window k, stride, padding that never wins) and global average pool, forward and
// backward. Max-pool backward runs one thread per input element and gathers from the
// windows that chose it, in output order: no atomics, the CPU backend's summation order.

// One thread per output element.
extern "C" __global__ void max_pool_forward(const float* __restrict__ x, i64 planes, int h,
                                            int w, int k, int stride, int pad, int ho, int wo,
                                            float* __restrict__ y) {
    const i64 total = planes * ho * wo;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)gridDim.x * blockDim.x) {
        const int ox = (int)(idx % wo), oy = (int)((idx / wo) % ho);
        const i64 plane = idx / ((i64)wo * ho);
        const float* xp = x + plane * h * w;
        const int y0 = max(oy * stride - pad, 0), y1 = min(oy * stride - pad + k, h);
        const int x0 = max(ox * stride - pad, 0), x1 = min(ox * stride - pad + k, w);
        float best = xp[(i64)y0 * w + x0];
        for (int iy = y0; iy < y1; ++iy)
            for (int ix = x0; ix < x1; ++ix) {
                const float v = xp[(i64)iy * w + ix];
                if (v > best) best = v;
            }
        y[idx] = best;
    }
}

// dx[i] = the sum of dy over the windows whose first maximal element (row-major window
// order, compared with the forward output y) is i.
extern "C" __global__ void max_pool_backward(const float* __restrict__ x,
                                             const float* __restrict__ y,
                                             const float* __restrict__ dy, i64 planes, int h,
                                             int w, int k, int stride, int pad, int ho, int wo,
                                             float* __restrict__ dx) {
    const i64 total = planes * h * w;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)gridDim.x * blockDim.x) {
        const int ix = (int)(idx % w), iy = (int)((idx / w) % h);
        const i64 plane = idx / ((i64)w * h);
        const float* xp = x + plane * h * w;
        // Windows covering iy: oy * stride - pad <= iy < oy * stride - pad + k.
        const int oy_lo = max(0, (iy + pad - k + stride) / stride);
        const int oy_hi = min(ho - 1, (iy + pad) / stride);
        const int ox_lo = max(0, (ix + pad - k + stride) / stride);
        const int ox_hi = min(wo - 1, (ix + pad) / stride);
        float acc = 0.0f;
        for (int oy = oy_lo; oy <= oy_hi; ++oy) {
            const int y0 = max(oy * stride - pad, 0), y1 = min(oy * stride - pad + k, h);
            for (int ox = ox_lo; ox <= ox_hi; ++ox) {
                const int x0 = max(ox * stride - pad, 0), x1 = min(ox * stride - pad + k, w);
                const i64 o = (plane * ho + oy) * wo + ox;
                const float best = y[o];
                int wy = -1, wx = -1;
                for (int sy = y0; sy < y1 && wy < 0; ++sy)
                    for (int sx = x0; sx < x1; ++sx)
                        if (xp[(i64)sy * w + sx] == best) {
                            wy = sy;
                            wx = sx;
                            break;
                        }
                if (wy == iy && wx == ix) acc += dy[o];
            }
        }
        dx[idx] = acc;
    }
}

// y[plane] = mean of the plane's hw values. Grid: planes blocks of MTX_REDUCE_THREADS.
extern "C" __global__ void avg_pool_forward(const float* __restrict__ x, i64 hw,
                                            float* __restrict__ y) {
    const i64 plane = blockIdx.x;
    double s = 0.0;
    for (i64 i = threadIdx.x; i < hw; i += blockDim.x) s += (double)x[plane * hw + i];
    s = block_sum(s);
    if (threadIdx.x == 0) y[plane] = (float)s * (1.0f / (float)hw);
}

extern "C" __global__ void avg_pool_backward(const float* __restrict__ dy, i64 planes, i64 hw,
                                             float* __restrict__ dx) {
    const float inv = 1.0f / (float)hw;
    const i64 total = planes * hw;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total;
         idx += (i64)gridDim.x * blockDim.x)
        dx[idx] = dy[idx / hw] * inv;
}

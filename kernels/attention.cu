// The row-wise pieces of attention; its matrix products go through cuBLAS. One warp per row
// of t scores, blocks of several warps.

// In place: s[r, :] = softmax(s[r, :]) (max subtracted).
extern "C" __global__ void softmax_forward(float* __restrict__ s, i64 rows, int t) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;  // the whole warp leaves together
    float* r = s + row * t;
    float mx = __int_as_float(0xff800000);  // -infinity (no math.h under NVRTC)
    for (int j = lane; j < t; j += 32) mx = fmaxf(mx, r[j]);
    mx = warp_max_f(mx);
    float sum = 0.0f;
    for (int j = lane; j < t; j += 32) {
        const float e = expf(r[j] - mx);
        r[j] = e;
        sum += e;
    }
    const float inv = 1.0f / warp_sum_f(sum);
    for (int j = lane; j < t; j += 32) r[j] *= inv;
}

// In place: ds[r, :] = p[r, :] * (ds[r, :] - <ds[r, :], p[r, :]>) * scale, where ds holds
// dP = dout v^T on entry.
extern "C" __global__ void softmax_backward(const float* __restrict__ p, float* __restrict__ ds,
                                            i64 rows, int t, float scale) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* pr = p + row * t;
    float* dr = ds + row * t;
    float dot = 0.0f;
    for (int j = lane; j < t; j += 32) dot += dr[j] * pr[j];
    dot = warp_sum_f(dot);
    for (int j = lane; j < t; j += 32) dr[j] = pr[j] * (dr[j] - dot) * scale;
}

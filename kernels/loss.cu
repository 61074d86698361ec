// The pretraining losses with their input gradients. Each kernel writes per-block (or
// per-row) partial sums in double; reduce.cu's finish_loss adds them in order into loss[0].

// dpred = (pred - target) * g; partials[block] = sum of (pred - target)^2 over the block's
// chunk of `chunk` values. Grid: ceil(len / chunk) blocks of MTX_REDUCE_THREADS.
extern "C" __global__ void mse_partials(const float* __restrict__ pred,
                                        const float* __restrict__ target, i64 len, float g,
                                        i64 chunk, float* __restrict__ dpred,
                                        double* __restrict__ partials) {
    const i64 lo = (i64)blockIdx.x * chunk;
    const i64 hi = lo + chunk < len ? lo + chunk : len;
    double s = 0.0;
    for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const float diff = pred[i] - target[i];
        s += (double)diff * (double)diff;
        dpred[i] = diff * g;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// Triplet margin loss, one warp per row of d values: hinge[row] = max(0, ||a - p + eps|| -
// ||a - n + eps|| + margin), and the row's gradients times g (zero where the hinge is off).
extern "C" __global__ void triplet_rows(const float* __restrict__ a, const float* __restrict__ p,
                                        const float* __restrict__ n, i64 rows, int d,
                                        float margin, float eps, float g,
                                        float* __restrict__ da, float* __restrict__ dp,
                                        float* __restrict__ dn, double* __restrict__ hinge) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const i64 off = row * d;
    float sap = 0.0f, san = 0.0f;
    for (int j = lane; j < d; j += 32) {
        const float u = a[off + j] - p[off + j] + eps;
        const float w = a[off + j] - n[off + j] + eps;
        sap += u * u;
        san += w * w;
    }
    const float d_ap = sqrtf(warp_sum_f(sap)), d_an = sqrtf(warp_sum_f(san));
    const float h = d_ap - d_an + margin;
    for (int j = lane; j < d; j += 32) {
        if (h > 0.0f) {
            const float u = (a[off + j] - p[off + j] + eps) / d_ap;
            const float w = (a[off + j] - n[off + j] + eps) / d_an;
            da[off + j] = (u - w) * g;
            dp[off + j] = -u * g;
            dn[off + j] = w * g;
        } else {
            da[off + j] = 0.0f;
            dp[off + j] = 0.0f;
            dn[off + j] = 0.0f;
        }
    }
    if (lane == 0) hinge[row] = h > 0.0f ? (double)h : 0.0;
}

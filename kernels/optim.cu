// One Adam/AdamW step over the flat parameter buffer, torch's order of operations (as the
// CPU backend); the bias corrections come from the host, computed in double and rounded once.

extern "C" __global__ void adam(float* __restrict__ p, const float* __restrict__ g,
                                float* __restrict__ m, float* __restrict__ v, i64 len,
                                float b1, float b2, float c1, float c2, float eps,
                                float step_size, float bc2_sqrt, float decay, int use_decay) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < len;
         i += (i64)gridDim.x * blockDim.x) {
        float pi = p[i];
        if (use_decay) pi *= decay;
        const float gi = g[i];
        const float mi = b1 * m[i] + c1 * gi;
        const float vi = b2 * v[i] + c2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = pi - step_size * (mi / denom);
    }
}

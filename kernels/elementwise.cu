// Elementwise ops: fill, scaling, ReLU, residual adds, axpy, row biases. Each output element
// is written by one thread from its own inputs (grid-stride loops over i64 lengths).

#define GRID_STRIDE(i, len) \
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < (len); i += (i64)gridDim.x * blockDim.x)

extern "C" __global__ void fill(float* __restrict__ x, i64 len, float value) {
    GRID_STRIDE(i, len) x[i] = value;
}

// x *= alpha
extern "C" __global__ void scale_inplace(float* __restrict__ x, i64 len, float alpha) {
    GRID_STRIDE(i, len) x[i] *= alpha;
}

// y = x * alpha
extern "C" __global__ void scale_into(const float* __restrict__ x, i64 len, float alpha,
                                      float* __restrict__ y) {
    GRID_STRIDE(i, len) y[i] = x[i] * alpha;
}

extern "C" __global__ void relu_forward(const float* __restrict__ x, i64 len,
                                        float* __restrict__ y) {
    GRID_STRIDE(i, len) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

// dx = dy * (y > 0)
extern "C" __global__ void relu_backward(const float* __restrict__ y,
                                         const float* __restrict__ dy, i64 len,
                                         float* __restrict__ dx) {
    GRID_STRIDE(i, len) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

extern "C" __global__ void add(const float* __restrict__ a, const float* __restrict__ b,
                               i64 len, float* __restrict__ y) {
    GRID_STRIDE(i, len) y[i] = a[i] + b[i];
}

// y = a * b (dropout multipliers)
extern "C" __global__ void mul(const float* __restrict__ a, const float* __restrict__ b,
                               i64 len, float* __restrict__ y) {
    GRID_STRIDE(i, len) y[i] = a[i] * b[i];
}

// y += alpha * x
extern "C" __global__ void axpy(float alpha, const float* __restrict__ x, i64 len,
                                float* __restrict__ y) {
    GRID_STRIDE(i, len) y[i] += alpha * x[i];
}

// y[r, :] += bias for every row of y [rows, d].
extern "C" __global__ void add_bias(const float* __restrict__ bias, i64 rows, int d,
                                    float* __restrict__ y) {
    GRID_STRIDE(i, rows * d) y[i] += bias[i % d];
}

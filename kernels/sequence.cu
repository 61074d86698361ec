// Sequence assembly for the transformer: token embedding, [MASK] rows, row gather and
// scatter-add. Row indices are uploaded from the host; scatter-add rows are distinct, so
// every output element has one writer.

#define GRID_STRIDE(i, len) \
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < (len); i += (i64)gridDim.x * blockDim.x)

// y[bi, ti, :] = x[bi, ti, :] * scale + pos[ti, :] + plane[:]
extern "C" __global__ void embed_forward(const float* __restrict__ x,
                                         const float* __restrict__ pos,
                                         const float* __restrict__ plane, i64 b, int t, int d,
                                         float scale, float* __restrict__ y) {
    GRID_STRIDE(i, b * t * d) {
        const int j = (int)(i % d);
        const int ti = (int)((i / d) % t);
        y[i] = x[i] * scale + pos[(i64)ti * d + j] + plane[j];
    }
}

// x[rows[i], :] = token
extern "C" __global__ void mask_scatter(const float* __restrict__ token,
                                        const unsigned int* __restrict__ rows, i64 nrows, int d,
                                        float* __restrict__ x) {
    GRID_STRIDE(i, nrows * d) {
        const int j = (int)(i % d);
        x[(i64)rows[i / d] * d + j] = token[j];
    }
}

// y[i, :] = x[rows[i], :]
extern "C" __global__ void gather_rows(const float* __restrict__ x,
                                       const unsigned int* __restrict__ rows, i64 nrows, int d,
                                       float* __restrict__ y) {
    GRID_STRIDE(i, nrows * d) {
        const int j = (int)(i % d);
        y[i] = x[(i64)rows[i / d] * d + j];
    }
}

// dx[rows[i], :] += dy[i, :] (rows distinct)
extern "C" __global__ void scatter_add_rows(const float* __restrict__ dy,
                                            const unsigned int* __restrict__ rows, i64 nrows,
                                            int d, float* __restrict__ dx) {
    GRID_STRIDE(i, nrows * d) {
        const int j = (int)(i % d);
        dx[(i64)rows[i / d] * d + j] += dy[i];
    }
}

// Prelude the CUDA backend prepends to every kernels/*.cu before NVRTC compiles it (each
// file is then followed by a #line directive, so NVRTC's log names the file and its line).
// No CUDA headers: only built-ins. Reductions here run in a fixed order (a fixed tree over
// warps and lanes), so the same launch gives the same bits on every run.
//
// MTX_REDUCE_THREADS comes from the host as -D option: the block size of every kernel that
// calls block_sum, one definition shared with the launch code.
#ifndef MTX_REDUCE_THREADS
#error "MTX_REDUCE_THREADS must be defined by the host (-DMTX_REDUCE_THREADS=...)"
#endif

typedef long long i64;

// Sum over the 32 lanes of a warp by a fixed butterfly; every lane gets the sum.
__device__ __forceinline__ double warp_sum(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ float warp_sum_f(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ float warp_max_f(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// Sum of one value per thread over a block of MTX_REDUCE_THREADS threads (a multiple of 32):
// warp sums, then the first warp sums those in warp order. Every thread gets the result.
// Must be reached by all threads of the block.
__device__ double block_sum(double v) {
    __shared__ double partial[MTX_REDUCE_THREADS / 32];
    __shared__ double total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double w = lane < MTX_REDUCE_THREADS / 32 ? partial[lane] : 0.0;
        w = warp_sum(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    const double r = total;
    __syncthreads();
    return r;
}

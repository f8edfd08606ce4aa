// Helpers shared by the kernels: typed views of clt_ptr addresses, bf16 conversion, block reductions.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>
#include "clt_params.h"

#define CLT_KERNEL extern "C" __global__

// The block's dynamic shared memory as a T array (the emulator's header defines its own).
#ifndef CLT_DYNAMIC_SHARED
#define CLT_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

template <typename T>
__device__ __forceinline__ T* ptr(clt_ptr p) {
    return reinterpret_cast<T*>(p);
}

__device__ __forceinline__ float bf(const __nv_bfloat16* p, size_t i) {
    return __bfloat162float(p[i]);
}

// Sum over the block of one value per thread, in a fixed tree order (deterministic for a given block size).
// `scratch` holds blockDim.x / 32 values. Every thread gets the total.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T total = T(0);
    const int n_warps = (blockDim.x + 31) >> 5;
    for (int w = 0; w < n_warps; ++w) total += scratch[w];
    return total;
}

// Order-preserving map of a float to an unsigned key (larger float -> larger key; -0 < +0).
__device__ __forceinline__ uint32_t float_key(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

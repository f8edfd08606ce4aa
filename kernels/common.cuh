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

// n / d for any 32-bit n and a divisor d >= 1 fixed for the kernel, as a multiply-high, a subtraction and
// three shifts instead of a general division's dozen-odd instructions (Granlund and Montgomery, "Division
// by invariant integers using multiplication", 1994, figure 4.1: l = ceil(log2 d),
// m = floor(2^32 (2^l - d) / d) + 1, q = (t + ((n - t) >> min(l, 1))) >> max(l - 1, 0) with
// t = mulhi(m, n)). Exact for every n: the tiled kernels' bits depend on it.
struct FastDiv {
    uint32_t m, s1, s2;
};

__device__ __forceinline__ FastDiv fast_div(uint32_t d) {
    uint32_t l = 0;
    while (l < 32 && (1ull << l) < d) ++l;
    FastDiv f;
    f.m = (uint32_t)((((1ull << l) - d) << 32) / d + 1);
    f.s1 = l < 1 ? l : 1;
    f.s2 = l > 0 ? l - 1 : 0;
    return f;
}

__device__ __forceinline__ uint32_t divide(uint32_t n, const FastDiv& f) {
    const uint32_t t = __umulhi(f.m, n);
    return (t + ((n - t) >> f.s1)) >> f.s2;
}

// Order-preserving map of a float to an unsigned key (larger float -> larger key; -0 < +0).
__device__ __forceinline__ uint32_t float_key(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

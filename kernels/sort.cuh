// Sorting by length inside one block: the counting sort that orders tokens or features by how many
// entries they list, so that a warp's lanes walk lists of about one length (act_plan, feature_order,
// decode_order).
#pragma once
#include "common.cuh"

// A counting sort by one block of 256 threads: out[0..n) = 0..n ordered by key(i) < n_bins, smallest key
// first, items of one key in the order the shared-memory atomics fall. `bins`: n_bins words of shared
// memory. Ends with a barrier, so the block may read `out` (global memory) after it.
template <class Key>
__device__ __forceinline__ void block_counting_sort(uint32_t n, uint32_t n_bins, uint32_t* bins, Key key,
                                                    uint32_t* out) {
    for (uint32_t c = threadIdx.x; c < n_bins; c += 256) bins[c] = 0;
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < n; i += 256) atomicAdd(&bins[key(i)], 1u);
    __syncthreads();
    if (threadIdx.x == 0) {  // exclusive starts
        uint32_t start = 0;
        for (uint32_t c = 0; c < n_bins; ++c) {
            const uint32_t k = bins[c];
            bins[c] = start;
            start += k;
        }
    }
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < n; i += 256) out[atomicAdd(&bins[key(i)], 1u)] = i;
    __syncthreads();  // (the block's global writes are visible to it after the barrier)
}

#define LENGTH_BUCKETS 256  // length_bucket(n) < 240 for every 32-bit n

// A length's bucket: itself below 16, then 8 buckets an octave (lengths in one bucket within 1/8 of each
// other). Increasing in n.
__device__ __forceinline__ uint32_t length_bucket(uint32_t n) {
    if (n < 16) return n;
    const uint32_t lg = 31 - __clz((int)n);  // 4..31
    return 16 + 8 * (lg - 4) + ((n >> (lg - 3)) & 7);
}

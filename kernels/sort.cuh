// Sorting by length inside one block: the counting sort that orders tokens or features by how many
// entries they list, so that a warp's lanes walk lists of about one length (act_plan, feature_order,
// decode_order).
#pragma once
#include "common.cuh"

// A counting sort by one block of 256 threads: out[0..n) = 0..n ordered by key(i) < n_bins, smallest key
// first; the order within a key is unspecified (it follows the shared-memory atomics). `bins`: n_bins words
// of shared memory. Ends with a barrier, so the block may read `out` (global memory) after it.
//
// The keys are few where it matters (list lengths around L0 fall in two or three buckets), so plain
// per-item atomics would pile up on a few words and serialise: the lanes of a warp with equal keys
// (__match_any_sync) add their count with one atomic, by the lowest of them, which then hands each its
// place (its rank among those lanes). The loops run whole warps (every lane reaches the match; items past
// n take a key of their own and add nothing).
template <class Key>
__device__ __forceinline__ void block_counting_sort(uint32_t n, uint32_t n_bins, uint32_t* bins, Key key,
                                                    uint32_t* out) {
    const uint32_t lane = threadIdx.x & 31, below = (1u << lane) - 1;
    for (uint32_t c = threadIdx.x; c < n_bins; c += 256) bins[c] = 0;
    __syncthreads();
    for (uint32_t i0 = 0; i0 < n; i0 += 256) {
        const uint32_t i = i0 + threadIdx.x;
        const uint32_t k = i < n ? key(i) : n_bins;
        const uint32_t peers = __match_any_sync(0xffffffffu, k);
        if (i < n && (peers & below) == 0) atomicAdd(&bins[k], (uint32_t)__popc(peers));
    }
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
    for (uint32_t i0 = 0; i0 < n; i0 += 256) {
        const uint32_t i = i0 + threadIdx.x;
        const uint32_t k = i < n ? key(i) : n_bins;
        const uint32_t peers = __match_any_sync(0xffffffffu, k);
        const uint32_t first = __ffs((int)peers) - 1;
        uint32_t base = 0;
        if (i < n && lane == first) base = atomicAdd(&bins[k], (uint32_t)__popc(peers));
        base = __shfl_sync(0xffffffffu, base, (int)first);
        if (i < n) out[base + __popc(peers & below)] = i;
    }
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

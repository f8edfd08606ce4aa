// Top-k and BatchTopK selection over dense pre-activations, with the ReLU, into ELL lists.
// CPU reference: src/backend/cpu/encode.rs (topk_indices + BlockOut::push_token for TopK; batch_topk_codes).
//
// topk_rows: one block per token. The k-th largest key is found by a 4-pass radix select (8 bits a pass,
// shared-memory histograms); then the row is walked in index order with a block-wide prefix count, keeping
// every key above it and the first (k - #above) keys equal to it: ties go to the lower index, as on the CPU,
// and the list comes out in increasing feature order.
// BatchTopK: batch_topk_hist is one radix pass over all values (the host walks the 4 passes and the tie
// count), batch_topk_ties counts keys equal to the k-th per block, the host scans those counts, and
// batch_topk_select marks the selected values; compact_mask turns the mask into ELL lists.
#include "common.cuh"

#define TOPK_THREADS 256

// Inclusive prefix sum over the block (Hillis-Steele in shared memory). `s` holds TOPK_THREADS values.
// `*total` gets the block's sum (read before the closing barrier, so the next scan cannot overwrite it first).
__device__ __forceinline__ uint32_t block_inclusive_scan(uint32_t v, uint32_t* s, uint32_t* total) {
    s[threadIdx.x] = v;
    __syncthreads();
    for (uint32_t o = 1; o < TOPK_THREADS; o <<= 1) {
        const uint32_t add = threadIdx.x >= o ? s[threadIdx.x - o] : 0u;
        __syncthreads();
        s[threadIdx.x] += add;
        __syncthreads();
    }
    const uint32_t r = s[threadIdx.x];
    *total = s[TOPK_THREADS - 1];
    __syncthreads();
    return r;
}

CLT_KERNEL void __launch_bounds__(TOPK_THREADS) topk_rows(const CltTopkParams p) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t scan[TOPK_THREADS];
    __shared__ uint32_t s_prefix, s_remaining, s_written;
    const uint32_t b = blockIdx.x;
    if (b >= p.n_tokens) return;
    const float* row = ptr<const float>(p.dense) + (size_t)b * p.n_features;
    const uint32_t k = min(p.k, p.n_features);
    if (threadIdx.x == 0) {
        s_prefix = 0;
        s_remaining = k;  // how many of the keys matching the prefix still have to be taken
        s_written = 0;
    }
    __syncthreads();
    if (k == 0) {
        if (threadIdx.x == 0) ptr<uint32_t>(p.count)[b] = 0;
        return;
    }
    // Radix select of the k-th largest key.
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (uint32_t i = threadIdx.x; i < 256; i += TOPK_THREADS) hist[i] = 0;
        __syncthreads();
        const uint32_t prefix = s_prefix;
        const uint32_t high_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
        for (uint32_t f = threadIdx.x; f < p.n_features; f += TOPK_THREADS) {
            const uint32_t key = float_key(row[f]);
            if ((key & high_mask) == (prefix & high_mask)) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t rem = s_remaining, digit = 255;
            for (;; --digit) {  // from the largest digit down
                if (hist[digit] >= rem) break;
                rem -= hist[digit];
                if (digit == 0) break;
            }
            s_prefix = prefix | (digit << shift);
            s_remaining = rem;  // keys equal to the final prefix (the k-th key) to take, after the larger ones
        }
        __syncthreads();
    }
    const uint32_t kth = s_prefix;
    const uint32_t ties_to_take = s_remaining;
    // Walk the row in index order: keep keys > kth, and the first `ties_to_take` keys == kth.
    uint32_t ties_before = 0;  // ties in earlier chunks (uniform across the block)
    uint32_t* count = ptr<uint32_t>(p.count);
    uint32_t* feat = ptr<uint32_t>(p.feat) + (size_t)b * p.cap;
    float* pre = ptr<float>(p.pre) + (size_t)b * p.cap;
    float* act = ptr<float>(p.act) + (size_t)b * p.cap;
    for (uint32_t f0 = 0; f0 < p.n_features; f0 += TOPK_THREADS) {
        const uint32_t f = f0 + threadIdx.x;
        const float v = f < p.n_features ? row[f] : 0.f;
        const uint32_t key = f < p.n_features ? float_key(v) : 0u;
        const bool tie = f < p.n_features && key == kth;
        uint32_t chunk_ties, chunk_kept;
        const uint32_t tie_incl = block_inclusive_scan(tie ? 1u : 0u, scan, &chunk_ties);
        const bool take = f < p.n_features &&
                          (key > kth || (tie && ties_before + tie_incl <= ties_to_take));
        const bool keep = take && v > 0.f;  // the ReLU
        const uint32_t pos_incl = block_inclusive_scan(keep ? 1u : 0u, scan, &chunk_kept);
        const uint32_t base = s_written;
        if (keep) {
            const uint32_t slot = base + pos_incl - 1;
            if (slot < p.cap) {
                feat[slot] = f;
                pre[slot] = v;
                act[slot] = v;
            }
        }
        ties_before += chunk_ties;
        __syncthreads();
        if (threadIdx.x == 0) s_written = base + chunk_kept;
        __syncthreads();
    }
    if (threadIdx.x == 0) count[b] = s_written;
}

// One radix pass over all values: histogram of digit (key >> shift) & 0xff among keys whose bits above
// shift + 8 equal the prefix. Block-local histograms, then one integer atomic per bin and block (exact).
CLT_KERNEL void __launch_bounds__(TOPK_THREADS) batch_topk_hist(const CltBatchTopkParams p) {
    __shared__ uint32_t hist[256];
    for (uint32_t i = threadIdx.x; i < 256; i += TOPK_THREADS) hist[i] = 0;
    __syncthreads();
    const uint32_t high_mask = p.shift >= 24 ? 0u : (0xffffffffu << (p.shift + 8));
    const float* v = ptr<const float>(p.values);
    for (uint64_t i = (uint64_t)blockIdx.x * TOPK_THREADS + threadIdx.x; i < p.n;
         i += (uint64_t)gridDim.x * TOPK_THREADS) {
        const uint32_t key = float_key(v[i]);
        if ((key & high_mask) == (p.prefix & high_mask)) atomicAdd(&hist[(key >> p.shift) & 0xffu], 1u);
    }
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < 256; i += TOPK_THREADS)
        if (hist[i]) atomicAdd(ptr<uint32_t>(p.hist) + i, hist[i]);
}

// Keys equal to kth in each block's contiguous range of TOPK_THREADS * 8 values.
#define BTK_PER_BLOCK (TOPK_THREADS * 8)
CLT_KERNEL void __launch_bounds__(TOPK_THREADS) batch_topk_ties(const CltBatchTopkParams p) {
    __shared__ uint32_t red[TOPK_THREADS / 32];
    const float* v = ptr<const float>(p.values);
    const uint64_t base = (uint64_t)blockIdx.x * BTK_PER_BLOCK;
    uint32_t c = 0;
    for (uint32_t t = threadIdx.x; t < BTK_PER_BLOCK; t += TOPK_THREADS) {
        const uint64_t i = base + t;
        if (i < p.n && float_key(v[i]) == p.kth) c += 1;
    }
    c = block_sum(c, red);
    if (threadIdx.x == 0) ptr<uint32_t>(p.block_ties)[blockIdx.x] = c;
}

// Marks keys > kth, and the first `ties` keys == kth in index order (block_ties now holds each block's
// exclusive tie offset), where the value is > 0 (the ReLU).
CLT_KERNEL void __launch_bounds__(TOPK_THREADS) batch_topk_select(const CltBatchTopkParams p) {
    __shared__ uint32_t scan[TOPK_THREADS];
    const float* v = ptr<const float>(p.values);
    uint8_t* mask = ptr<uint8_t>(p.mask);
    const uint64_t base = (uint64_t)blockIdx.x * BTK_PER_BLOCK;
    uint32_t before = ptr<const uint32_t>(p.block_ties)[blockIdx.x];
    for (uint32_t t0 = 0; t0 < BTK_PER_BLOCK; t0 += TOPK_THREADS) {
        const uint64_t i = base + t0 + threadIdx.x;
        const bool in = i < p.n;
        const float x = in ? v[i] : 0.f;
        const uint32_t key = in ? float_key(x) : 0u;
        const bool tie = in && key == p.kth;
        uint32_t chunk_ties;
        const uint32_t incl = block_inclusive_scan(tie ? 1u : 0u, scan, &chunk_ties);
        if (in) {
            const bool take = key > p.kth || (tie && before + incl <= p.ties);
            mask[i] = (take && x > 0.f) ? 1 : 0;
        }
        before += chunk_ties;
    }
}

// Dense + mask -> ELL lists in increasing feature order (one block per token, ordered block scan).
CLT_KERNEL void __launch_bounds__(TOPK_THREADS) compact_mask(const CltCompactParams p) {
    __shared__ uint32_t scan[TOPK_THREADS];
    const uint32_t b = blockIdx.x;
    if (b >= p.n_tokens) return;
    const float* row = ptr<const float>(p.dense) + (size_t)b * p.n_features;
    const uint8_t* m = ptr<const uint8_t>(p.mask) + (size_t)b * p.n_features;
    uint32_t* feat = ptr<uint32_t>(p.feat) + (size_t)b * p.cap;
    float* pre = ptr<float>(p.pre) + (size_t)b * p.cap;
    float* act = ptr<float>(p.act) + (size_t)b * p.cap;
    uint32_t written = 0;
    for (uint32_t f0 = 0; f0 < p.n_features; f0 += TOPK_THREADS) {
        const uint32_t f = f0 + threadIdx.x;
        const bool keep = f < p.n_features && m[f] != 0;
        uint32_t chunk;
        const uint32_t incl = block_inclusive_scan(keep ? 1u : 0u, scan, &chunk);
        if (keep) {
            const uint32_t slot = written + incl - 1;
            if (slot < p.cap) {
                feat[slot] = f;
                pre[slot] = row[f];
                act[slot] = row[f];
            }
        }
        written += chunk;
    }
    if (threadIdx.x == 0) ptr<uint32_t>(p.count)[b] = written;
}

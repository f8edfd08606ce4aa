// The JumpReLU epilogue of the encoder GEMMs (encode_tile and encode_mma in encode.cu, encode_wgmma in
// encode_wgmma.cu). CPU reference: src/backend/cpu/encode.rs (BlockOut::push_token).
#pragma once
#include "common.cuh"

// The JumpReLU epilogue shared by the encoder GEMMs. For one pre-activation h of token b and feature f
// (threshold th): the feature's window sums (Σ ReLU(θ − h), near count, near Σ h) and, when h is active
// (h > θ) or near the threshold (θ − ε/2 < h ≤ θ, activation 0), an entry in token b's list through its cursor.
struct JumpLists {
    uint32_t* count;
    uint32_t* feat;
    float* pre;
    float* act;
};

__device__ __forceinline__ JumpLists jump_lists(const CltEncodeParams& p) {
    return {ptr<uint32_t>(p.count), ptr<uint32_t>(p.feat), ptr<float>(p.pre), ptr<float>(p.act)};
}

__device__ __forceinline__ void jump_entry(const CltEncodeParams& p, const JumpLists& o, float h, float th,
                                           uint32_t b, uint32_t f, float& s_pre, uint32_t& s_near,
                                           float& s_h) {
    const bool active = h > th;
    const bool near = !active && h > th - p.half_bandwidth;
    if (!active) s_pre += th - h;
    if (near) {
        s_near += 1;
        s_h += h;
    }
    if (active || near) {
        const uint32_t slot = atomicAdd(&o.count[b], 1u);
        if (slot < p.cap) {
            const size_t e = (size_t)b * p.cap + slot;
            o.feat[e] = f;
            o.pre[e] = h;
            o.act[e] = active ? h : 0.f;
        }
    }
}

// The tensor-core fragments (mma.sync's and wgmma's alike) give the 8 lanes of a warp with the same
// lane % 4 the same columns, so the same feature: each lane's window sums become their sum over those 8
// lanes (xor shuffles over lane / 4; the whole warp takes part).
__device__ __forceinline__ void jump_sums_over_groups(float& s_pre, uint32_t& s_near, float& s_h) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
        s_pre += __shfl_xor_sync(0xffffffffu, s_pre, o);
        s_near += __shfl_xor_sync(0xffffffffu, s_near, o);
        s_h += __shfl_xor_sync(0xffffffffu, s_h, o);
    }
}

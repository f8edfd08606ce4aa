// Dequantisation of activation-store sections on the device (int8 / int4, one f32 absmax scale per row).
// CPU reference: src/store/codec.rs (Section::decode_rows, the Int8 and Int4 arms), then
// src/clt/params.rs (NormScales::apply) with a layer scale.
#include "common.cuh"

CLT_KERNEL void dequant_rows(const CltDequantParams p) {
    const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (uint64_t)p.n_rows * p.d) return;
    const uint32_t rr = (uint32_t)(i / p.d), j = (uint32_t)(i % p.d);
    const uint32_t r = p.r0 + rr;
    const uint8_t* sec = ptr<const uint8_t>(p.section);
    // Scales are little-endian f32 at byte 4 r; a section's scales start at byte 0, so they are 4-aligned
    // only if the section is: read them bytewise.
    const uint32_t sb = (uint32_t)sec[4 * (size_t)r] | ((uint32_t)sec[4 * (size_t)r + 1] << 8) |
                        ((uint32_t)sec[4 * (size_t)r + 2] << 16) | ((uint32_t)sec[4 * (size_t)r + 3] << 24);
    const float s = __uint_as_float(sb);
    const uint8_t* codes = sec + 4 * (size_t)p.rows;
    float v;
    if (p.codec == CLT_CODEC_INT8) {
        v = (float)(int8_t)codes[(size_t)r * p.d + j] * s;
    } else {
        const size_t rb = (p.d + 1) / 2;
        const uint8_t c = codes[(size_t)r * rb + j / 2];
        const int q = (j & 1) ? (c >> 4) : (c & 0x0f);
        v = (float)(q - 8) * s;
    }
    // Two roundings, as the host's decode then `NormScales::apply`: (code · scale) · layer scale.
    if (p.layer_scale) v *= ptr<const float>(p.layer_scale)[r % p.layers];
    ptr<float>(p.out)[i] = v;
    if (p.out_bf16) ptr<__nv_bfloat16>(p.out_bf16)[i] = __float2bfloat16_rn(v);
}

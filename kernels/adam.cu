// Fused Adam with fp32 moments, the decoder's two-part gradient, decoder norms, and the clipping norm.
// CPU reference: src/backend/cpu/adam.rs (update, dense, step's decoder loop, grad_norm) and
// src/clt/params.rs (decoder_norms).
#include "common.cuh"

__device__ __forceinline__ void adam_update(const CltAdamConsts& k, float& p, float& m, float& v, float g) {
    g *= k.scale;
    m = k.beta1 * m + (1.f - k.beta1) * g;
    v = k.beta2 * v + (1.f - k.beta2) * g * g;
    const float denom = sqrtf(v) / k.bc2_sqrt + k.eps;
    p -= (k.lr / k.bc1) * m / denom;
}

CLT_KERNEL void adam_dense(const CltAdamParams p) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    float* pp = ptr<float>(p.p);
    float* m = ptr<float>(p.m);
    float* v = ptr<float>(p.v);
    const float* g = ptr<const float>(p.g);
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        float a = pp[i], b = m[i], c = v[i];
        adam_update(p.k, a, b, c, g[i]);
        pp[i] = a;
        m[i] = b;
        v[i] = c;
    }
}

// One block per decoder row: g = touched * gs + coef * p, the update, the bf16 copy and the new norm.
CLT_KERNEL void __launch_bounds__(256) adam_decoder(const CltAdamDecoderParams p) {
    __shared__ float red[8];
    const uint32_t f = blockIdx.x;
    if (f >= p.n_features) return;
    const size_t o = (size_t)f * p.row_len;
    float* pp = ptr<float>(p.p) + o;
    float* m = ptr<float>(p.m) + o;
    float* v = ptr<float>(p.v) + o;
    const float* gs = ptr<const float>(p.gs) + o;
    const float coef = ptr<const float>(p.coef)[f];
    const bool touched = ptr<const uint8_t>(p.touched)[f] != 0;
    __nv_bfloat16* out = p.p_bf16 ? ptr<__nv_bfloat16>(p.p_bf16) + o : nullptr;
    float sq = 0.f;
    for (uint32_t j = threadIdx.x; j < p.row_len; j += blockDim.x) {
        float a = pp[j], b = m[j], c = v[j];
        const float g = (touched ? gs[j] : 0.f) + coef * a;
        adam_update(p.k, a, b, c, g);
        pp[j] = a;
        m[j] = b;
        v[j] = c;
        if (out) out[j] = __float2bfloat16_rn(a);
        sq = fmaf(a, a, sq);
    }
    sq = block_sum(sq, red);
    if (threadIdx.x == 0) ptr<float>(p.norms)[f] = sqrtf(sq);
}

// Row norms (the decoder norms) and optionally the bf16 copy. One block per row.
CLT_KERNEL void __launch_bounds__(256) row_norms(const CltRowNormParams p) {
    __shared__ float red[8];
    const uint32_t r = blockIdx.x;
    if (r >= p.rows) return;
    const float* w = ptr<const float>(p.w) + (size_t)r * p.row_len;
    __nv_bfloat16* out = p.w_bf16 ? ptr<__nv_bfloat16>(p.w_bf16) + (size_t)r * p.row_len : nullptr;
    float sq = 0.f;
    for (uint32_t j = threadIdx.x; j < p.row_len; j += blockDim.x) {
        const float a = w[j];
        if (out) out[j] = __float2bfloat16_rn(a);
        sq = fmaf(a, a, sq);
    }
    sq = block_sum(sq, red);
    if (threadIdx.x == 0) ptr<float>(p.norms)[r] = sqrtf(sq);
}

// Σ x² in per-block f64 partials (grid-stride; the host or a second launch sums the partials in order).
CLT_KERNEL void __launch_bounds__(256) sum_sq(const CltSumSqParams p) {
    __shared__ double red[8];
    const float* x = ptr<const float>(p.x);
    double s = 0.0;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n;
         i += (uint64_t)gridDim.x * blockDim.x)
        s += (double)x[i] * (double)x[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) ptr<double>(p.partial)[blockIdx.x] = s;
}

// ||g_f||² of each decoder row with its norm term: Σ (gs + c w)² on touched rows, c² ||w||² elsewhere.
CLT_KERNEL void __launch_bounds__(256) dec_grad_sq(const CltDecGradSqParams p) {
    __shared__ double red[8];
    const uint32_t f = blockIdx.x;
    if (f >= p.n_features) return;
    const size_t o = (size_t)f * p.row_len;
    const float* gs = ptr<const float>(p.gs) + o;
    const float* w = ptr<const float>(p.w) + o;
    const double c = ptr<const float>(p.coef)[f];
    const bool touched = ptr<const uint8_t>(p.touched)[f] != 0;
    double s = 0.0;
    for (uint32_t j = threadIdx.x; j < p.row_len; j += blockDim.x) {
        const double g = (touched ? (double)gs[j] : 0.0) + c * (double)w[j];
        s += g * g;
    }
    s = block_sum(s, red);
    if (threadIdx.x == 0) ptr<double>(p.out)[f] = s;
}

// Σ x over a buffer of f64 partials, by one block (fixed assignment of indices to threads and a fixed
// reduction tree, so the result is the same every run). CPU reference: `x.iter().sum::<f64>()` up to f64
// rounding order (resident.rs's tests and the clipping norm, `cpu/adam.rs` `grad_norm`).
CLT_KERNEL void __launch_bounds__(256) sum_f64(const CltSumF64Params p) {
    __shared__ double red[8];
    const double* x = ptr<const double>(p.x);
    double s = 0.0;
    for (uint64_t i = threadIdx.x; i < p.n; i += blockDim.x) s += x[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) ptr<double>(p.out)[0] = s;
}

// dst = expf(src) elementwise (thresholds from log thresholds). CPU reference: `cpu/sparse.rs` `thresholds`
// (`f32::exp`; expf is within 2 ulp of it).
CLT_KERNEL void exp_f32(const CltExpParams p) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const float* src = ptr<const float>(p.src);
    float* dst = ptr<float>(p.dst);
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) dst[i] = expf(src[i]);
}

// A gradient tensor to or from its slice of the packed f32 buffer that the data-parallel device all-reduce
// sums (CPU reference: dist::trainer::sum_gradients, which packs the same way on the host).
CLT_KERNEL void __launch_bounds__(256) pack(const CltPackParams p) {
    float* q = ptr<float>(p.packed);
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        if (!p.unpack) {
            float v;
            if (p.kind == 0) v = ptr<const float>(p.tensor)[i] * p.scale;
            else if (p.kind == 1) v = ptr<const uint8_t>(p.tensor)[i] != 0 ? 1.f : 0.f;
            else v = (float)ptr<const uint32_t>(p.tensor)[i];
            q[i] = v;
        } else if (p.kind == 0) {
            ptr<float>(p.tensor)[i] = q[i];
        } else if (p.kind == 1) {
            ptr<uint8_t>(p.tensor)[i] = q[i] > 0.f ? 1 : 0;
        } else {
            ptr<uint32_t>(p.tensor)[i] = (uint32_t)q[i];
        }
    }
}

// Sparse cross-layer decode fused with the residual and the squared error; and the residual alone, for a
// reconstruction summed over feature shards after their decode.
// CPU reference: src/backend/cpu/sparse.rs (decode, residual) without the skip connection.
//
// One block per (token, target layer k), over the launch's range of target layers; threads stride over the d
// outputs of layer k (8 consecutive outputs a thread where rows allow 16-byte loads). For every source layer
// l <= k (l == k for per-layer decoders) and every active entry of (token, l), the block reads the
// contiguous d-slice W_dec[l][f][k - l] (bf16, coalesced) and accumulates a * w in fp32. The entries are read through shared memory in chunks so that each is fetched once per block.
// A feature shard writes its partial yhat layer-major ([L][B][d]) so that each target layer's block is one
// contiguous buffer for the all-reduce that overlaps the next layer's decode.
#include "common.cuh"

#define DEC_THREADS 256
#define DEC_CHUNK 256
#define DEC_VEC 8     // bf16 per thread and entry on the vector path: one 16-byte load
#define DEC_UNROLL 4  // entries whose loads are in flight together (vector path)

// The epilogue of one output element i of (token b, layer k): yhat, residual, squared error.
struct DecodeOut {
    const float* b_dec;
    const float* y;
    float* yhat;
    float* resid;
    float resid_scale;
};

__device__ __forceinline__ void decode_out(const DecodeOut& o, uint32_t i, float acc, double& sq) {
    const float yh = o.b_dec[i] + acc;
    if (o.yhat) o.yhat[i] = yh;
    if (o.y) {
        const float diff = yh - o.y[i];
        sq += (double)diff * (double)diff;
        if (o.resid) o.resid[i] = o.resid_scale * diff;
    }
}

// The 8 bf16 of a 16-byte load, added as a * w to acc (bf16 -> f32 is exact: the bits shifted up).
__device__ __forceinline__ void fma8(float a, uint4 v, float* acc) {
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        acc[2 * j] = fmaf(a, __uint_as_float(u[j] << 16), acc[2 * j]);
        acc[2 * j + 1] = fmaf(a, __uint_as_float(u[j] & 0xffff0000u), acc[2 * j + 1]);
    }
}

// Two ways through the same sums, in the same order (each output element adds its entries' products in
// source-layer then list order, skipping activations of 0), so both give the same bits:
// - vector path, when d and the row lengths are multiples of 8 and every W_dec is 16-byte aligned: a thread owns 8
//   consecutive outputs and reads each entry's 8 weights with one 16-byte load, DEC_UNROLL entries' loads
//   issued before their FMAs (a block reads a 2,048-wide row slice in one pass, 16 bytes a thread);
// - scalar path otherwise: a thread owns one output per pass of DEC_THREADS.
CLT_KERNEL void __launch_bounds__(DEC_THREADS) sparse_decode(const CltDecodeParams p) {
    __shared__ uint32_t s_feat[DEC_CHUNK];
    __shared__ float s_act[DEC_CHUNK];
    __shared__ double s_red[DEC_THREADS / 32];
    const uint32_t b = blockIdx.x, k = p.first_layer + blockIdx.y;
    const CltLayerView* layers = ptr<const CltLayerView>(p.layers);
    const size_t out0 = ((size_t)b * p.n_layers + k) * p.d;
    const size_t yhat0 = p.yhat_layer_major ? ((size_t)k * p.n_tokens + b) * p.d : out0;
    const DecodeOut o = {
        ptr<const float>(p.b_dec) + (size_t)k * p.d,
        p.y ? ptr<const float>(p.y) + out0 : nullptr,
        p.yhat ? ptr<float>(p.yhat) + yhat0 : nullptr,
        p.resid ? ptr<float>(p.resid) + out0 : nullptr,
        p.resid_scale,
    };
    double sq = 0.0;
    const uint32_t l_first = p.cross_layer ? 0 : k;
    bool vec = p.d % DEC_VEC == 0;
    for (uint32_t l = l_first; l <= k; ++l)
        vec = vec && (layers[l].w_dec & 15u) == 0 && layers[l].row_len % DEC_VEC == 0;
    const uint32_t per_thread = vec ? DEC_VEC : 1;

    for (uint32_t i0 = 0; i0 < p.d; i0 += DEC_THREADS * per_thread) {
        const uint32_t i = i0 + threadIdx.x * per_thread;  // this thread's first output
        float acc[DEC_VEC];
#pragma unroll
        for (int j = 0; j < DEC_VEC; ++j) acc[j] = 0.f;
        for (uint32_t l = l_first; l <= k; ++l) {
            const CltLayerView v = layers[l];
            const uint32_t n = min(ptr<const uint32_t>(v.count)[b], v.cap);
            const uint32_t* feat = ptr<const uint32_t>(v.feat) + (size_t)b * v.cap;
            const float* act = ptr<const float>(v.act) + (size_t)b * v.cap;
            const __nv_bfloat16* w = ptr<const __nv_bfloat16>(v.w_dec) + (size_t)(k - l) * p.d + i;
            for (uint32_t e0 = 0; e0 < n; e0 += DEC_CHUNK) {
                const uint32_t m = min(n - e0, (uint32_t)DEC_CHUNK);
                __syncthreads();
                for (uint32_t t = threadIdx.x; t < m; t += DEC_THREADS) {
                    s_feat[t] = feat[e0 + t];
                    s_act[t] = act[e0 + t];
                }
                __syncthreads();
                if (i >= p.d) continue;
                if (vec) {
                    uint32_t t = 0;
                    for (; t + DEC_UNROLL <= m; t += DEC_UNROLL) {
                        uint4 wv[DEC_UNROLL];
#pragma unroll
                        for (int u = 0; u < DEC_UNROLL; ++u)
                            wv[u] = s_act[t + u] != 0.f
                                        ? *reinterpret_cast<const uint4*>(w + (size_t)s_feat[t + u] * v.row_len)
                                        : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
                        for (int u = 0; u < DEC_UNROLL; ++u)
                            if (s_act[t + u] != 0.f) fma8(s_act[t + u], wv[u], acc);
                    }
                    for (; t < m; ++t)
                        if (s_act[t] != 0.f)
                            fma8(s_act[t], *reinterpret_cast<const uint4*>(w + (size_t)s_feat[t] * v.row_len), acc);
                } else {
                    for (uint32_t t = 0; t < m; ++t) {
                        const float a = s_act[t];
                        if (a != 0.f) acc[0] = fmaf(a, bf(w, (size_t)s_feat[t] * v.row_len), acc[0]);
                    }
                }
            }
        }
        if (i < p.d) {
            if (vec) {
#pragma unroll
                for (int j = 0; j < DEC_VEC; ++j) decode_out(o, i + j, acc[j], sq);  // constant indices: registers
            } else {
                decode_out(o, i, acc[0], sq);
            }
        }
    }
    if (p.sq_err) {
        const double total = block_sum(sq, s_red);
        if (threadIdx.x == 0) ptr<float>(p.sq_err)[(size_t)b * p.n_layers + k] = (float)total;
    }
}

// The residual and squared error of a reconstruction made elsewhere (the all-reduce of the feature shards'
// partials): the same arithmetic, per element and per (token, layer) block, as sparse_decode's epilogue.
CLT_KERNEL void __launch_bounds__(DEC_THREADS) residual(const CltResidualParams p) {
    __shared__ double s_red[DEC_THREADS / 32];
    const uint32_t b = blockIdx.x, k = blockIdx.y;
    const size_t out0 = ((size_t)b * p.n_layers + k) * p.d;
    const size_t yhat0 = p.yhat_layer_major ? ((size_t)k * p.n_tokens + b) * p.d : out0;
    const float* yhat = ptr<const float>(p.yhat) + yhat0;
    const float* y = ptr<const float>(p.y) + out0;
    float* resid = ptr<float>(p.resid) + out0;
    double sq = 0.0;
    for (uint32_t i = threadIdx.x; i < p.d; i += DEC_THREADS) {
        const float diff = yhat[i] - y[i];
        sq += (double)diff * (double)diff;
        resid[i] = p.resid_scale * diff;
    }
    const double total = block_sum(sq, s_red);
    if (threadIdx.x == 0) ptr<float>(p.sq_err)[(size_t)b * p.n_layers + k] = (float)total;
}

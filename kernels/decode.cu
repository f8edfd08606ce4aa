// Sparse cross-layer decode fused with the residual and the squared error; and the residual alone, for a
// reconstruction summed over feature shards after their decode.
// CPU reference: src/backend/cpu/sparse.rs (decode, residual) without the skip connection.
//
// One block per (token, target layer k), over the launch's range of target layers; threads stride over the d
// outputs of layer k. For every source layer l <= k (l == k for per-layer decoders) and every active entry of
// (token, l), the block reads the contiguous d-slice W_dec[l][f][k - l] (bf16, coalesced) and accumulates
// a * w in fp32. The entries are read through shared memory in chunks so that each is fetched once per block.
// A feature shard writes its partial yhat layer-major ([L][B][d]) so that each target layer's block is one
// contiguous buffer for the all-reduce that overlaps the next layer's decode.
#include "common.cuh"

#define DEC_THREADS 256
#define DEC_CHUNK 256

CLT_KERNEL void __launch_bounds__(DEC_THREADS) sparse_decode(const CltDecodeParams p) {
    __shared__ uint32_t s_feat[DEC_CHUNK];
    __shared__ float s_act[DEC_CHUNK];
    __shared__ double s_red[DEC_THREADS / 32];
    const uint32_t b = blockIdx.x, k = p.first_layer + blockIdx.y;
    const CltLayerView* layers = ptr<const CltLayerView>(p.layers);
    const float* b_dec = ptr<const float>(p.b_dec) + (size_t)k * p.d;
    const size_t out0 = ((size_t)b * p.n_layers + k) * p.d;
    const size_t yhat0 = p.yhat_layer_major ? ((size_t)k * p.n_tokens + b) * p.d : out0;
    const float* y = p.y ? ptr<const float>(p.y) + out0 : nullptr;
    float* yhat = p.yhat ? ptr<float>(p.yhat) + yhat0 : nullptr;
    float* resid = p.resid ? ptr<float>(p.resid) + out0 : nullptr;
    double sq = 0.0;
    const uint32_t l_first = p.cross_layer ? 0 : k;

    for (uint32_t i0 = 0; i0 < p.d; i0 += DEC_THREADS) {
        const uint32_t i = i0 + threadIdx.x;
        float acc = 0.f;
        for (uint32_t l = l_first; l <= k; ++l) {
            const CltLayerView v = layers[l];
            const uint32_t n = min(ptr<const uint32_t>(v.count)[b], v.cap);
            const uint32_t* feat = ptr<const uint32_t>(v.feat) + (size_t)b * v.cap;
            const float* act = ptr<const float>(v.act) + (size_t)b * v.cap;
            const __nv_bfloat16* w = ptr<const __nv_bfloat16>(v.w_dec);
            const size_t col = (size_t)(k - l) * p.d + i;
            for (uint32_t e0 = 0; e0 < n; e0 += DEC_CHUNK) {
                const uint32_t m = min(n - e0, (uint32_t)DEC_CHUNK);
                __syncthreads();
                for (uint32_t t = threadIdx.x; t < m; t += DEC_THREADS) {
                    s_feat[t] = feat[e0 + t];
                    s_act[t] = act[e0 + t];
                }
                __syncthreads();
                if (i < p.d) {
                    for (uint32_t t = 0; t < m; ++t) {
                        const float a = s_act[t];
                        if (a != 0.f) acc = fmaf(a, bf(w, (size_t)s_feat[t] * v.row_len + col), acc);
                    }
                }
            }
        }
        if (i < p.d) {
            const float yh = b_dec[i] + acc;
            if (yhat) yhat[i] = yh;
            if (y) {
                const float diff = yh - y[i];
                sq += (double)diff * (double)diff;
                if (resid) resid[i] = p.resid_scale * diff;
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

// Sparse cross-layer decode fused with the residual and the squared error; and the residual alone, for a
// reconstruction summed over feature shards after their decode.
// CPU reference: src/backend/cpu/sparse.rs (decode, residual) without the skip connection.
//
// One block per (token, target layer k), over the launch's range of target layers; threads stride over the d
// outputs of layer k (8 consecutive outputs a thread where rows allow 16-byte loads). For every source layer
// l <= k (l == k for per-layer decoders) and every active entry of (token, l), the block reads the
// contiguous d-slice W_dec[l][f][k - l] (bf16, coalesced) and accumulates a * w in fp32. The entries are
// read through shared memory in chunks so that each is fetched once per block.
// A feature shard writes its partial yhat layer-major ([L][B][d]) so that each target layer's block is one
// contiguous buffer for the all-reduce that overlaps the next layer's decode.
#include "common.cuh"
#include "ptx.cuh"
#include "sort.cuh"

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
// - vector path, when d is a multiple of 8: a thread owns 8 consecutive outputs and reads each entry's 8
//   weights with one 16-byte load, DEC_UNROLL entries' loads issued before their FMAs (a block reads a
//   2,048-wide row slice in one pass, 16 bytes a thread). Every W_dec starts 16-byte aligned (the wrappers
//   check) and its rows and offsets are then multiples of 8 elements;
// - scalar path otherwise: a thread owns one output per pass of DEC_THREADS.
// The `residual` kernel below assigns outputs to threads the same way, so its squared errors are these.
// (`__launch_bounds__(.., 1)`: without a minimum of blocks, CUDA 13's ptxas held the kernel to 48 registers
// and spilled.)
CLT_KERNEL void __launch_bounds__(DEC_THREADS, 1) sparse_decode(const CltDecodeParams p) {
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
    const bool vec = p.d % DEC_VEC == 0;
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

#define DT_TOK 4        // tokens a thread owns in sparse_decode_tiled: a tile of 1,024 tokens a block
#define DT_FCHUNK 2048  // features whose 16-byte weight slices a block stages at a time (two buffers: 64 KB)

// decode_order: for each target layer k of the launch (a block each), the tokens by the number of entries
// sparse_decode_tiled walks for them (their lists' lengths, each capped at its cap, summed over the source
// layers l_first..k), longest first by length_bucket (lengths within 1/8 of each other share a bucket): a
// counting sort, the order within a bucket as the atomics fall. Writes order[k][0..B). At L0 ~ 64 a layer
// most tokens fall in two or three buckets, which is why the sort aggregates its atomics by warp
// (sort.cuh). The bench times it: `decode_order (all layers)`.
CLT_KERNEL void __launch_bounds__(256) decode_order(const CltDecodeParams p) {
    __shared__ uint32_t bins[LENGTH_BUCKETS];
    const uint32_t k = p.first_layer + blockIdx.x;
    const CltLayerView* layers = ptr<const CltLayerView>(p.layers);
    const uint32_t l_first = p.cross_layer ? 0 : k;
    const auto key = [&](uint32_t b) {
        uint32_t n = 0;
        for (uint32_t l = l_first; l <= k; ++l) n += min(ptr<const uint32_t>(layers[l].count)[b], layers[l].cap);
        return LENGTH_BUCKETS - 1 - length_bucket(n);
    };
    block_counting_sort(p.n_tokens, LENGTH_BUCKETS, bins, key, ptr<uint32_t>(p.order) + (size_t)k * p.n_tokens);
}

// Chunk q of sparse_decode_tiled's weight slices (source layer l_first + q / n_fchunks, features from
// (q % n_fchunks) * DT_FCHUNK; nothing past the last chunk) copied into buf by cp.async, this thread's
// share, committed as one group (an empty one past the last chunk, so that every iteration commits one).
__device__ __forceinline__ void dt_stage(const CltDecodeParams& p, const CltLayerView* layers, uint32_t l_first,
                                         uint32_t k, uint32_t c0, uint32_t n_fchunks, uint32_t q, uint4* buf) {
    if (q < (k - l_first + 1) * n_fchunks) {
        const uint32_t l = l_first + q / n_fchunks, f0 = (q % n_fchunks) * DT_FCHUNK;
        const uint32_t nf = min(p.n_features - f0, (uint32_t)DT_FCHUNK);
        const CltLayerView v = layers[l];
        const __nv_bfloat16* w =
            ptr<const __nv_bfloat16>(v.w_dec) + (size_t)f0 * v.row_len + (size_t)(k - l) * p.d + c0;
        for (uint32_t f = threadIdx.x; f < nf; f += DEC_THREADS)
            cp_async16(smem_addr(buf + f), w + (size_t)f * v.row_len, true);
    }
    cp_async_commit();
}

// sparse_decode_tiled: sparse_decode's sums, in the same order, arranged so that a weight is fetched once
// per tile of 1,024 tokens instead of once per token that lists its feature. Grid: (d / 8 column chunks,
// token tiles, target layers from first_layer). For each source layer l <= k and each chunk of DT_FCHUNK
// features, the block stages every feature's 8 weights of columns c0..c0+7 of target k (16 bytes each,
// dynamic shared memory; cp.async into one of two buffers while the threads add from the other) and each
// thread adds its 4 tokens' entries from there into 32 accumulators (4 tokens x 8 columns, registers).
// Each token's list is read once per block through a cursor that a chunk advances (lists are in increasing
// feature order, DeviceCodes' invariant: every encoder path sorts). The 4 tokens' walks go in step, an
// entry of each a round, so that their list loads are in flight together; the next entry's feature is
// loaded with this entry's activation. An output's products are added in source-layer order, then list
// order, so the bits are sparse_decode's.
//
// The tokens: positions b0 + 4 t .. b0 + 4 t + 3 (thread t) of decode_order's order for target k (the
// tokens by the entries this kernel walks for them, longest first), or of the batch where p.order is 0. A
// warp's 128 walks, and a block's, are then of about one length: at each chunk a warp runs as many rounds
// as its longest walk has entries there, and the block waits at the barriers for its slowest warp, so in
// batch order one long list (a sequence's first tokens, rare tokens) holds its block at every chunk while
// the other walks idle. A token's sums do not depend on its position, so the order changes no bit.
//
// What it moves at the issue's 1B shape (docs/cuda.md): the staged slices, B / 1,024 = 16 times the
// decoder (7e10 B), and the lists, 8 bytes an entry for every 8 columns (2.9e11 B, from L2), against
// the gather's 16 bytes of weights an entry for every 8 columns (5.8e11 B).
//
// Writes yhat = b_dec + sum (token-major, or layer-major); the residual kernel gives r and the squared
// error. Needs d a multiple of 8 and W_dec rows 16-byte aligned (the wrapper checks).
CLT_KERNEL void __launch_bounds__(DEC_THREADS) sparse_decode_tiled(const CltDecodeParams p) {
    CLT_DYNAMIC_SHARED(uint4, w_s);  // two buffers of [min(F, DT_FCHUNK)] slices of 8 bf16
    const uint32_t c0 = blockIdx.x * DEC_VEC;
    const uint32_t b0 = blockIdx.y * DEC_THREADS * DT_TOK;
    const uint32_t k = p.first_layer + blockIdx.z;
    const CltLayerView* layers = ptr<const CltLayerView>(p.layers);
    const uint32_t l_first = p.cross_layer ? 0 : k;
    const uint32_t n_fchunks = (p.n_features + DT_FCHUNK - 1) / DT_FCHUNK;
    const uint32_t n_chunks = (k - l_first + 1) * n_fchunks;
    const uint32_t buf_len = min(p.n_features, (uint32_t)DT_FCHUNK);
    float acc[DT_TOK][DEC_VEC];
#pragma unroll
    for (int tt = 0; tt < DT_TOK; ++tt)
#pragma unroll
        for (int j = 0; j < DEC_VEC; ++j) acc[tt][j] = 0.f;
    // The thread's tokens (n_tokens past the batch's end); per token, in the current source layer: its
    // list's length, its cursor (first entry not yet added), and the feature at the cursor.
    const uint32_t* order = p.order ? ptr<const uint32_t>(p.order) + (size_t)k * p.n_tokens : nullptr;
    uint32_t tok[DT_TOK], n[DT_TOK] = {}, e[DT_TOK] = {}, fe[DT_TOK] = {};
#pragma unroll
    for (int tt = 0; tt < DT_TOK; ++tt) {
        const uint32_t pos = b0 + DT_TOK * threadIdx.x + tt;
        tok[tt] = pos >= p.n_tokens ? p.n_tokens : order ? order[pos] : pos;
    }
    dt_stage(p, layers, l_first, k, c0, n_fchunks, 0, w_s);
    for (uint32_t q = 0; q < n_chunks; ++q) {
        const uint32_t l = l_first + q / n_fchunks, f0 = (q % n_fchunks) * DT_FCHUNK;
        const uint32_t nf = min(p.n_features - f0, (uint32_t)DT_FCHUNK);
        const CltLayerView v = layers[l];
        const uint32_t* feat = ptr<const uint32_t>(v.feat);
        const float* act = ptr<const float>(v.act);
        dt_stage(p, layers, l_first, k, c0, n_fchunks, q + 1, w_s + ((q + 1) & 1) * buf_len);
        if (f0 == 0) {  // a new source layer: every cursor at the head of its token's list
#pragma unroll
            for (int tt = 0; tt < DT_TOK; ++tt) {
                n[tt] = tok[tt] < p.n_tokens ? min(ptr<const uint32_t>(v.count)[tok[tt]], v.cap) : 0;
                e[tt] = 0;
                fe[tt] = n[tt] > 0 ? feat[(size_t)tok[tt] * v.cap] : 0;
            }
        }
        cp_async_wait<1>();  // this thread's copies of chunk q have landed
        __syncthreads();     // and every thread's
        const uint4* ws = w_s + (q & 1) * buf_len;
        for (;;) {
            bool more = false;
#pragma unroll
            for (int tt = 0; tt < DT_TOK; ++tt) {
                const uint32_t f = fe[tt] - f0;  // entries before f0 were added by earlier chunks
                if (e[tt] < n[tt] && f < nf) {
                    const size_t at = (size_t)tok[tt] * v.cap + e[tt];
                    const float a = act[at];
                    fe[tt] = ++e[tt] < n[tt] ? feat[at + 1] : 0;
                    if (a != 0.f) fma8(a, ws[f], acc[tt]);
                    more = true;
                }
            }
            if (!more) break;
        }
        __syncthreads();  // every thread is done with buffer q & 1 before chunk q + 2 is copied into it
    }
    const float* b_dec = ptr<const float>(p.b_dec) + (size_t)k * p.d + c0;
#pragma unroll
    for (int tt = 0; tt < DT_TOK; ++tt) {
        const uint32_t b = tok[tt];
        if (b >= p.n_tokens) continue;
        const size_t o = p.yhat_layer_major ? ((size_t)k * p.n_tokens + b) * p.d : ((size_t)b * p.n_layers + k) * p.d;
        float* yhat = ptr<float>(p.yhat) + o + c0;
#pragma unroll
        for (int j = 0; j < DEC_VEC; ++j) yhat[j] = b_dec[j] + acc[tt][j];
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
    // Outputs to threads as in sparse_decode (8 consecutive a thread where d is a multiple of 8), so the
    // squared error is summed in the same order.
    const uint32_t per_thread = p.d % DEC_VEC == 0 ? DEC_VEC : 1;
    for (uint32_t i0 = threadIdx.x * per_thread; i0 < p.d; i0 += DEC_THREADS * per_thread)
        for (uint32_t i = i0; i < i0 + per_thread; ++i) {
            const float diff = yhat[i] - y[i];
            sq += (double)diff * (double)diff;
            resid[i] = p.resid_scale * diff;
        }
    const double total = block_sum(sq, s_red);
    if (threadIdx.x == 0) ptr<float>(p.sq_err)[(size_t)b * p.n_layers + k] = (float)total;
}

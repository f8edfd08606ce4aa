// Encoder: a tiled GEMM h = x W^T + b (bf16 inputs, fp32 accumulation) with a fused epilogue.
// CPU reference: src/backend/cpu/encode.rs (encode_layer, BlockOut::push_token, merge) with every block in
// BlockMode::Near (the near-threshold entries are always listed, as encode_all_with(.., list_near = true)).
//
// Each block computes a CLT_ENC_TB x CLT_ENC_TF tile of tokens x features with 256 threads, 4 x 4 outputs per
// thread. The JumpReLU epilogue never writes the dense tile: active (h > theta) and near-threshold
// (theta - eps/2 < h <= theta) entries go straight to their token's ELL list through a per-token cursor, and
// the per-feature sums the pre-activation loss and threshold gradient need are reduced over the tile's tokens
// and written as one partial per (token tile, feature): no float atomics, summed in tile order afterwards.
// Lists are unordered within a token until encode_sort_lists runs.
#include "common.cuh"
#include "jump_epilogue.cuh"
#include "ptx.cuh"

#define TB CLT_ENC_TB
#define TF CLT_ENC_TF
#define TK CLT_ENC_TK

CLT_KERNEL void __launch_bounds__(256) encode_tile(const CltEncodeParams p) {
    __shared__ float xs[TK][TB + 1];
    __shared__ float ws[TK][TF + 1];
    __shared__ float red_preact[16][TF];
    __shared__ uint32_t red_near[16][TF];
    __shared__ float red_near_h[16][TF];

    const int tx = threadIdx.x & 15;  // feature group: features tx*4 .. tx*4+3 of the tile
    const int ty = threadIdx.x >> 4;  // token group: tokens ty*4 .. ty*4+3 of the tile
    const uint32_t b0 = blockIdx.y * TB;
    const uint32_t f0 = blockIdx.x * TF;
    const __nv_bfloat16* x = ptr<const __nv_bfloat16>(p.x);
    const __nv_bfloat16* w = ptr<const __nv_bfloat16>(p.w);

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    for (uint32_t k0 = 0; k0 < p.d; k0 += TK) {
        // Load TB x TK of x and TF x TK of W (zero outside the matrices), transposed to k-major.
        for (int i = threadIdx.x; i < TB * TK; i += 256) {
            const int r = i / TK, c = i % TK;
            const uint32_t b = b0 + r, k = k0 + c;
            xs[c][r] = (b < p.n_tokens && k < p.d) ? bf(x, (size_t)b * p.x_stride + k) : 0.f;
            const uint32_t f = f0 + r;
            ws[c][r] = (f < p.n_features && k < p.d) ? bf(w, (size_t)f * p.d + k) : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < TK; ++k) {
            float xa[4], wa[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) xa[i] = xs[k][ty * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; ++j) wa[j] = ws[k][tx * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xa[i], wa[j], acc[i][j]);
        }
        __syncthreads();
    }

    const float* bias = ptr<const float>(p.bias);
    if (p.epilogue == CLT_EPI_DENSE) {
        float* dense = ptr<float>(p.dense);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t b = b0 + ty * 4 + i;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t f = f0 + tx * 4 + j;
                if (b < p.n_tokens && f < p.n_features)
                    dense[(size_t)b * p.n_features + f] = acc[i][j] + bias[f];
            }
        }
        return;
    }

    // JumpReLU epilogue.
    const float* theta = ptr<const float>(p.theta);
    const JumpLists lists = jump_lists(p);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint32_t f = f0 + tx * 4 + j;
        float s_pre = 0.f, s_h = 0.f;
        uint32_t s_near = 0;
        if (f < p.n_features) {
            const float th = theta[f], bb = bias[f];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint32_t b = b0 + ty * 4 + i;
                if (b >= p.n_tokens) continue;
                jump_entry(p, lists, acc[i][j] + bb, th, b, f, s_pre, s_near, s_h);
            }
        }
        red_preact[ty][tx * 4 + j] = s_pre;
        red_near[ty][tx * 4 + j] = s_near;
        red_near_h[ty][tx * 4 + j] = s_h;
    }
    __syncthreads();
    if (threadIdx.x < TF) {
        const uint32_t f = f0 + threadIdx.x;
        if (f < p.n_features) {
            float s_pre = 0.f, s_h = 0.f;
            uint32_t s_near = 0;
            for (int r = 0; r < 16; ++r) {
                s_pre += red_preact[r][threadIdx.x];
                s_near += red_near[r][threadIdx.x];
                s_h += red_near_h[r][threadIdx.x];
            }
            const size_t o = (size_t)blockIdx.y * p.n_features + f;
            ptr<float>(p.part_preact)[o] = s_pre;
            ptr<uint32_t>(p.part_near)[o] = s_near;
            ptr<float>(p.part_near_h)[o] = s_h;
        }
    }
}

// Sums the per-tile partials in tile order (f64 accumulation, like the CPU's merge). CPU reference: merge().
CLT_KERNEL void encode_reduce(const CltReduceParams p) {
    const uint32_t f = blockIdx.x * blockDim.x + threadIdx.x;
    if (f >= p.n_features) return;
    double s_pre = 0.0, s_h = 0.0;
    uint32_t s_near = 0;
    for (uint32_t t = 0; t < p.n_tiles; ++t) {
        const size_t o = (size_t)t * p.n_features + f;
        s_pre += ptr<const float>(p.part_preact)[o];
        s_near += ptr<const uint32_t>(p.part_near)[o];
        s_h += ptr<const float>(p.part_near_h)[o];
    }
    ptr<float>(p.preact_sum)[f] = (float)s_pre;
    ptr<uint32_t>(p.near_count)[f] = s_near;
    ptr<float>(p.near_h)[f] = (float)s_h;
}

// Sorts each token's list by feature: one block per token, rank sort through shared memory (features are
// distinct within a token, so ranks are a permutation). Launched with dynamic shared memory of
// cap * 12 bytes. CPU reference: the lists of encode_layer are in increasing feature order per token.
CLT_KERNEL void encode_sort_lists(const CltSortParams p) {
    CLT_DYNAMIC_SHARED(uint32_t, sm);
    const uint32_t b = blockIdx.x;
    if (b >= p.n_tokens) return;
    const uint32_t n = min(ptr<const uint32_t>(p.count)[b], p.cap);
    uint32_t* sf = sm;
    float* sp = reinterpret_cast<float*>(sm + p.cap);
    float* sa = reinterpret_cast<float*>(sm + 2 * p.cap);
    uint32_t* feat = ptr<uint32_t>(p.feat) + (size_t)b * p.cap;
    float* pre = ptr<float>(p.pre) + (size_t)b * p.cap;
    float* act = ptr<float>(p.act) + (size_t)b * p.cap;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
        sf[i] = feat[i];
        sp[i] = pre[i];
        sa[i] = act[i];
    }
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
        const uint32_t fi = sf[i];
        uint32_t rank = 0;
        for (uint32_t j = 0; j < n; ++j) rank += sf[j] < fi;
        feat[rank] = fi;
        pre[rank] = sp[i];
        act[rank] = sa[i];
    }
}

// f32 -> bf16 (round to nearest even).
CLT_KERNEL void to_bf16(const CltToBf16Params p) {
    const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    const float v = ptr<const float>(p.src)[i];
    const __nv_bfloat16 hi = __float2bfloat16_rn(v);
    ptr<__nv_bfloat16>(p.dst)[i] = hi;
    if (p.lo) ptr<__nv_bfloat16>(p.lo)[i] = __float2bfloat16_rn(v - __bfloat162float(hi));
}

// ---------------------------------------------------------------------------------------------------------
// encode_mma: the same GEMM and the same two epilogues on the tensor cores. CPU reference: as encode_tile.
//
// A block computes CLT_ENC_MMA_TB x CLT_ENC_MMA_TF (128 x 128) tokens x features with 8 warps in a 2 x 4
// grid, each warp 64 tokens x 32 features as 4 x 4 tiles of mma.sync.m16n8k16 (bf16 in, fp32 accumulate).
// K advances 32 at a time through CLT_ENC_MMA_STAGES (4) stages in dynamic shared memory, filled by
// cp.async (16-byte copies; the next three K slices load while the tensor cores work on the current one, so
// a slice has three slices' compute to arrive in) and read with ldmatrix. Shared rows are padded
// to 40 bf16 (80 bytes): 16-byte aligned for cp.async/ldmatrix, and the 8 row addresses of an ldmatrix
// phase fall on 8 distinct 4-bank groups (80 bytes = 20 banks; 20 r mod 32 is distinct for r = 0..7).
// Out-of-range tokens, features and K columns are zero-filled by cp.async with a source size of 0 (nothing
// is read), so any shape works as long as rows are 16-byte aligned: d, x_stride and the layer offset are
// multiples of 8 elements (CLT_ENC_MMA_ALIGN; the wrapper checks and otherwise runs encode_tile).
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16): lane = 4 g + t. A (16 x 16, row-major): reg 0 = (row g,
// k 2t..2t+1), reg 1 = (row g+8, same k), reg 2 = (row g, k+8), reg 3 = (row g+8, k+8); ldmatrix.x4 gives
// exactly that when lanes 0..15 point at rows 0..15, column kk and lanes 16..31 at rows 0..15, column kk+8.
// B (16 x 8, "col" = stored n-major with k contiguous, which is W's [F][d] layout): reg 0 = (k 2t..2t+1,
// n g), reg 1 = (k+8); one ldmatrix.x4 loads two n8 tiles: lanes 0..7 -> n 0..7 @ kk, 8..15 -> n 0..7 @ kk+8,
// 16..23 -> n 8..15 @ kk, 24..31 -> n 8..15 @ kk+8. C: c0, c1 = (row g, n 2t, 2t+1), c2, c3 = (row g+8).
//
// The JumpReLU epilogue is encode_tile's: entries go to the token lists through the per-token cursor, and
// the per-feature sums are reduced over the 8 lanes that share a feature (shuffles), then over the 2 warps
// that share it (shared memory), into one partial per (128-token tile, feature).

#define MB CLT_ENC_MMA_TB
#define MF CLT_ENC_MMA_TF
#define MK CLT_ENC_MMA_TK
#define MK_PAD (MK + 8)
#define STAGES CLT_ENC_MMA_STAGES

typedef __nv_bfloat16 MmaRow[MK_PAD];

CLT_KERNEL void __launch_bounds__(256) encode_mma(const CltEncodeParams p) {
    // Stage s: x rows [MB][MK_PAD] then W rows [MF][MK_PAD], at s * CLT_ENC_MMA_STAGE_BYTES.
    CLT_DYNAMIC_SHARED(uint4, stage_mem);
    static_assert(sizeof(MmaRow) * (MB + MF) == CLT_ENC_MMA_STAGE_BYTES, "stage size as in clt_params.h");
    auto xs = [&](int s) {
        return reinterpret_cast<MmaRow*>(reinterpret_cast<char*>(stage_mem) + s * CLT_ENC_MMA_STAGE_BYTES);
    };
    auto ws = [&](int s) { return xs(s) + MB; };
    __shared__ float red_preact[2][MF];
    __shared__ uint32_t red_near[2][MF];
    __shared__ float red_near_h[2][MF];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp & 1;   // the warp's tokens: wm*64 .. wm*64+63 of the tile
    const int wn = warp >> 1;  // the warp's features: wn*32 .. wn*32+31 of the tile
    const uint32_t b0 = blockIdx.y * MB;
    const uint32_t f0 = blockIdx.x * MF;
    const __nv_bfloat16* x = ptr<const __nv_bfloat16>(p.x);
    const __nv_bfloat16* w = ptr<const __nv_bfloat16>(p.w);

    // One stage: 128 rows x 4 chunks of 8 bf16 for x and for W, 512 chunks each, 2 per thread each
    // (chunk i = tid + 256 j: row i / 4, columns (i % 4) * 8 .. +7).
    auto load_stage = [&](int s, uint32_t k0) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int i = tid + 256 * j, r = i >> 2, c = (i & 3) * 8;
            const uint32_t k = k0 + c;  // d % 8 == 0, so k < d means all 8 columns are inside
            const uint32_t b = b0 + r, f = f0 + r;
            const bool okx = b < p.n_tokens && k < p.d;
            const bool okw = f < p.n_features && k < p.d;
            cp_async16(smem_addr(&xs(s)[r][c]), okx ? x + (size_t)b * p.x_stride + k : x, okx);
            cp_async16(smem_addr(&ws(s)[r][c]), okw ? w + (size_t)f * p.d + k : w, okw);
        }
    };

    float acc[4][4][4];  // [m16 tile][n8 tile][c0..c3]
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.f;

    // K slice j goes to stage j % STAGES, in commit group j (groups are committed even when empty, so the
    // count of groups in flight is the same on every iteration).
    const uint32_t nk = (p.d + MK - 1) / MK;
#pragma unroll
    for (uint32_t j = 0; j < STAGES - 1; ++j) {
        if (j < nk) load_stage(j, j * MK);
        cp_async_commit();
    }
    for (uint32_t kt = 0; kt < nk; ++kt) {
        const int s = kt % STAGES;
        cp_async_wait<STAGES - 2>();  // groups 0..kt have landed: slice kt, for this thread's copies
        __syncthreads();  // ... and for every thread's; and every warp is done with slice kt - 1's stage
        const uint32_t next = kt + STAGES - 1;  // refills that stage, (kt - 1) % STAGES
        if (next < nk) load_stage(next % STAGES, next * MK);
        cp_async_commit();
#pragma unroll
        for (int kk = 0; kk < MK; kk += 16) {
            uint32_t a[4][4], bw[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                const int r = wm * 64 + mi * 16 + (lane & 15);
                const int c = kk + (lane >> 4) * 8;
                ldmatrix_x4(smem_addr(&xs(s)[r][c]), a[mi][0], a[mi][1], a[mi][2], a[mi][3]);
            }
#pragma unroll
            for (int nj = 0; nj < 2; ++nj) {
                const int r = wn * 32 + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
                const int c = kk + ((lane >> 3) & 1) * 8;
                ldmatrix_x4(smem_addr(&ws(s)[r][c]), bw[2 * nj][0], bw[2 * nj][1], bw[2 * nj + 1][0],
                            bw[2 * nj + 1][1]);
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_bf16_16816(acc[mi][ni], a[mi], bw[ni][0], bw[ni][1]);
        }
    }

    const int g = lane >> 2, t = lane & 3;
    const float* bias = ptr<const float>(p.bias);
    if (p.epilogue == CLT_EPI_DENSE) {
        float* dense = ptr<float>(p.dense);
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const uint32_t b = b0 + wm * 64 + mi * 16 + g + (c >> 1) * 8;
                    const uint32_t f = f0 + wn * 32 + ni * 8 + t * 2 + (c & 1);
                    if (b < p.n_tokens && f < p.n_features)
                        dense[(size_t)b * p.n_features + f] = acc[mi][ni][c] + bias[f];
                }
        return;
    }

    // JumpReLU epilogue (as encode_tile's).
    const float* theta = ptr<const float>(p.theta);
    const JumpLists lists = jump_lists(p);
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int fl = wn * 32 + ni * 8 + t * 2 + j;  // the feature within the tile
            const uint32_t f = f0 + fl;
            float s_pre = 0.f, s_h = 0.f;
            uint32_t s_near = 0;
            if (f < p.n_features) {
                const float th = theta[f], bb = bias[f];
#pragma unroll
                for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                    for (int hf = 0; hf < 2; ++hf) {
                        const uint32_t b = b0 + wm * 64 + mi * 16 + g + hf * 8;
                        if (b >= p.n_tokens) continue;
                        jump_entry(p, lists, acc[mi][ni][hf * 2 + j] + bb, th, b, f, s_pre, s_near, s_h);
                    }
            }
            jump_sums_over_groups(s_pre, s_near, s_h);
            if (g == 0) {
                red_preact[wm][fl] = s_pre;
                red_near[wm][fl] = s_near;
                red_near_h[wm][fl] = s_h;
            }
        }
    __syncthreads();
    if (tid < MF) {
        const uint32_t f = f0 + tid;
        if (f < p.n_features) {
            const size_t o = (size_t)blockIdx.y * p.n_features + f;
            ptr<float>(p.part_preact)[o] = red_preact[0][tid] + red_preact[1][tid];
            ptr<uint32_t>(p.part_near)[o] = red_near[0][tid] + red_near[1][tid];
            ptr<float>(p.part_near_h)[o] = red_near_h[0][tid] + red_near_h[1][tid];
        }
    }
}

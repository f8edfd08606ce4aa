// encode_wgmma, encode_wgmma_narrow, encode_wgmma_tma: the encoder's GEMM h = x W^T + b and its two
// epilogues (encode.cu's) on Hopper's warpgroup MMA. Compiled for sm_90a only (build.rs), loaded only on a
// device of compute capability 9.x. CPU reference: src/backend/cpu/encode.rs (encode_layer,
// BlockOut::push_token, merge) with every block in BlockMode::Near, as encode_tile and encode_mma.
//
// A block computes 128 tokens x N features with two warpgroups of 4 warps; warpgroup wg owns tokens
// wg*64 .. wg*64+63 of the tile and all N features, as one m64nN accumulator (N / 2 f32 a thread). K advances
// K at a time through 4 stages of dynamic shared memory, filled by cp.async (16-byte copies) and read by
// wgmma.mma_async through matrix descriptors, K / 16 k16 steps a slice. Two tiles (clt_params.h):
// - encode_wgmma: N = 256, K = 64, 4 stages of 48 KB, one block an SM (182 registers): the fewest
//   shared-memory bytes per FLOP (the operands and copies need the SM's whole shared-memory bandwidth at the
//   tensor cores' full rate), but the epilogue runs while the SM's tensor cores idle;
// - encode_wgmma_narrow: N = 128, K = 32, 4 stages of 16 KB, two blocks an SM: one block's epilogue and
//   barriers overlap the other's products, at 1.25 times the shared-memory bytes per FLOP.
// Which is faster is the GPU's to say (docs/cuda.md). encode_wgmma_tma (at the end of this file) is
// encode_wgmma's tile with its stages filled by the Tensor Memory Accelerator instead of cp.async.
//
// Shared layout of a stage: x's 128 rows then W's N rows, each tile in wgmma's canonical K-major layout
// without swizzle: core matrices of 8 rows x 8 bf16 (128 contiguous bytes, a row 16 bytes), the core matrices
// of an 8-row group along K 128 bytes apart (LBO), 8-row groups K * 16 bytes apart (SBO). Chunk i of a tile
// (16 bytes: row (i / K) * 8 + i % 8, columns ((i / 8) % (K / 8)) * 8 .. +7) sits at byte i * 16, so the
// copies write consecutive bytes and wgmma reads whole 128-byte core matrices (no bank conflicts either way).
//
// Pipeline: slices kt + 1 and kt + 2 are in flight (cp.async) while the tensor cores run slice kt, and the
// wgmma group of slice kt - 1 may still be running when slice kt's is issued (wgmma_wait<1>). The stage that
// slice kt + 2 overwrites held slice kt - 2, whose wgmma group every warpgroup has waited for before the
// barrier of iteration kt. Before that barrier each thread makes its landed copies visible to the async proxy
// (fence.proxy.async), through which wgmma reads shared memory.
//
// Out-of-range tokens, features and K columns are zero-filled by cp.async (source size 0), so any shape works
// when rows are 16-byte aligned (d, x_stride and the layer offset multiples of CLT_ENC_MMA_ALIGN; the wrapper
// checks). The JumpReLU epilogue is encode_mma's with the warpgroup's fragment layout (wgmma.cuh): the
// per-feature sums are reduced over the 8 lanes that share a feature (shuffles), then over the 8 warps (shared
// memory, the stages' bytes reused), into one partial per (128-token tile, feature).
#include "common.cuh"
#include "jump_epilogue.cuh"
#include "ptx.cuh"
#include "wgmma.cuh"

#define WB CLT_ENC_WG_TB
#define WSTAGES 4

static_assert(WB == 128, "two warpgroups of 64 tokens");
static_assert(CLT_ENC_WG_STAGES == WSTAGES && CLT_ENC_WGN_STAGES == WSTAGES, "stages as in clt_params.h");
static_assert((WB + CLT_ENC_WG_TF) * CLT_ENC_WG_TK * 2 == CLT_ENC_WG_STAGE_BYTES, "stage size as in clt_params.h");
static_assert((WB + CLT_ENC_WGN_TF) * CLT_ENC_WGN_TK * 2 == CLT_ENC_WGN_STAGE_BYTES, "stage size as in clt_params.h");

#define WG_LBO 128u  // bytes between core matrices adjacent along K

// The two epilogues on a tile's accumulators (tokens b0.., features f0..; token tile `tile_b` of the
// partials): bias and dense output, or the JumpReLU lists and the per-tile partials, reduced through `red`
// (3 x 8 x N words of shared memory) after a barrier that every warpgroup reaches only once done with what
// `red` held before. The two warpgroups (warps 0-7) call it; with `named`, they alone take part in its
// barriers (bar.sync 1, 256: encode_wgmma_tma, whose producer warp does not), else the whole block does
// (__syncthreads).
template <int N>
__device__ __forceinline__ void wgmma_epilogue(const CltEncodeParams& p, const float* acc, float* red, uint32_t b0,
                                               uint32_t f0, uint32_t tile_b, bool named) {
    auto sync = [&] {
        if (named) bar_sync(1, 256);
        else __syncthreads();
    };
    sync();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = warp >> 2, wr = warp & 3;
    const int g = lane >> 2, t = lane & 3;
    const float* bias = ptr<const float>(p.bias);
    const uint32_t row0 = b0 + wg * 64 + wr * 16 + g;  // the thread's tokens: row0 and row0 + 8
    if (p.epilogue == CLT_EPI_DENSE) {
        float* dense = ptr<float>(p.dense);
#pragma unroll
        for (int j = 0; j < N / 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint32_t b = row0 + (i >> 1) * 8, f = f0 + 8 * j + 2 * t + (i & 1);
                if (b < p.n_tokens && f < p.n_features) dense[(size_t)b * p.n_features + f] = acc[4 * j + i] + bias[f];
            }
        return;
    }

    float* red_preact = red;  // [8 warps][N] each
    uint32_t* red_near = reinterpret_cast<uint32_t*>(red_preact + 8 * N);
    float* red_near_h = reinterpret_cast<float*>(red_near + 8 * N);
    const float* theta = ptr<const float>(p.theta);
    const JumpLists lists = jump_lists(p);
#pragma unroll
    for (int j = 0; j < N / 8; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const int fl = 8 * j + 2 * t + c;  // the feature within the tile
            const uint32_t f = f0 + fl;
            float s_pre = 0.f, s_h = 0.f;
            uint32_t s_near = 0;
            if (f < p.n_features) {
                const float th = theta[f], bb = bias[f];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const uint32_t b = row0 + 8 * h;
                    if (b < p.n_tokens) jump_entry(p, lists, acc[4 * j + 2 * h + c] + bb, th, b, f, s_pre, s_near, s_h);
                }
            }
            jump_sums_over_groups(s_pre, s_near, s_h);
            if (g == 0) {
                red_preact[warp * N + fl] = s_pre;
                red_near[warp * N + fl] = s_near;
                red_near_h[warp * N + fl] = s_h;
            }
        }
    sync();
    // One feature a thread (the first N threads): its sums over the 8 warps, in warp order.
    const uint32_t f = f0 + tid;
    if (tid < N && f < p.n_features) {
        float s_pre = 0.f, s_h = 0.f;
        uint32_t s_near = 0;
#pragma unroll
        for (int v = 0; v < 8; ++v) {
            s_pre += red_preact[v * N + tid];
            s_near += red_near[v * N + tid];
            s_h += red_near_h[v * N + tid];
        }
        const size_t o = (size_t)tile_b * p.n_features + f;
        ptr<float>(p.part_preact)[o] = s_pre;
        ptr<uint32_t>(p.part_near)[o] = s_near;
        ptr<float>(p.part_near_h)[o] = s_h;
    }
}

template <int N, int K>
__device__ __forceinline__ void encode_wgmma_body(const CltEncodeParams& p) {
    constexpr uint32_t STAGE = (WB + N) * K * 2, SBO = K * 16;  // SBO: bytes between 8-row groups
    constexpr int XC = WB * K / 8 / 256, WC = N * K / 8 / 256;  // 16-byte chunks a thread copies a stage
    static_assert(K % 16 == 0 && XC * 256 == WB * K / 8 && WC * 256 == N * K / 8, "whole chunks a thread");
    static_assert(3 * 8 * N * 4 <= WSTAGES * STAGE, "the epilogue's sums fit in the stages");
    CLT_DYNAMIC_SHARED(uint4, stage_mem);  // stage s: x chunks [WB * K / 8], then W chunks [N * K / 8]
    const int tid = threadIdx.x, wg = tid >> 7;  // warpgroup: tokens wg * 64 .. + 63 of the tile
    const uint32_t b0 = blockIdx.y * WB, f0 = blockIdx.x * N;
    const __nv_bfloat16* x = ptr<const __nv_bfloat16>(p.x);
    const __nv_bfloat16* w = ptr<const __nv_bfloat16>(p.w);
    const uint32_t smem0 = smem_addr(stage_mem);

    // Slice k0 .. k0 + K - 1 into stage s.
    auto load_stage = [&](int s, uint32_t k0) {
        uint4* xs = stage_mem + (size_t)s * (STAGE / 16);
        uint4* ws = xs + WB * K / 8;
#pragma unroll
        for (int j = 0; j < XC; ++j) {
            const int i = tid + 256 * j, r = (i / K) * 8 + (i & 7);
            const uint32_t k = k0 + ((i >> 3) % (K / 8)) * 8, b = b0 + r;  // d % 8 == 0: 8 columns inside
            const bool ok = b < p.n_tokens && k < p.d;
            cp_async16(smem_addr(xs + i), ok ? x + (size_t)b * p.x_stride + k : x, ok);
        }
#pragma unroll
        for (int j = 0; j < WC; ++j) {
            const int i = tid + 256 * j, r = (i / K) * 8 + (i & 7);
            const uint32_t k = k0 + ((i >> 3) % (K / 8)) * 8, f = f0 + r;
            const bool ok = f < p.n_features && k < p.d;
            cp_async16(smem_addr(ws + i), ok ? w + (size_t)f * p.d + k : w, ok);
        }
    };

    float acc[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;

    // Slice j goes to stage j % WSTAGES in commit group j (committed even when empty, so that the count of
    // groups in flight is the same on every iteration).
    const uint32_t nk = (p.d + K - 1) / K;
#pragma unroll
    for (uint32_t j = 0; j < 2; ++j) {
        if (j < nk) load_stage(j, j * K);
        cp_async_commit();
    }
    for (uint32_t kt = 0; kt < nk; ++kt) {
        const int s = kt % WSTAGES;
        cp_async_wait<1>();   // groups 0..kt have landed: slice kt, for this thread's copies
        fence_proxy_async();  // ... made visible to the async proxy
        __syncthreads();      // ... for every thread's; and every warpgroup has waited for slice kt - 2's wgmma
        const uint32_t a0 = smem0 + s * STAGE + wg * (64 / 8) * SBO;
        const uint32_t w0 = smem0 + s * STAGE + WB * K * 2;
        wgmma_fence();
        wgmma_fence_operands<N / 2>(acc);
#pragma unroll
        for (int ks = 0; ks < K / 16; ++ks)  // k16 step ks: two core matrices along K
            wgmma_bf16<N>(acc, wgmma_desc(a0 + ks * 2 * WG_LBO, WG_LBO, SBO),
                          wgmma_desc(w0 + ks * 2 * WG_LBO, WG_LBO, SBO));
        wgmma_commit();
        wgmma_fence_operands<N / 2>(acc);
        const uint32_t next = kt + 2;  // into the stage of slice kt - 2
        if (next < nk) load_stage(next % WSTAGES, next * K);
        cp_async_commit();
        wgmma_wait<1>();  // slice kt - 1's products are done (slice kt's may still run)
    }
    wgmma_wait<0>();
    wgmma_fence_operands<N / 2>(acc);  // the epilogue reads the accumulators after the wait, not before
    cp_async_wait<0>();                // (only empty groups are left)
    wgmma_epilogue<N>(p, acc, reinterpret_cast<float*>(stage_mem), b0, f0, blockIdx.y, false);
}

CLT_KERNEL void __launch_bounds__(256, 1) encode_wgmma(const CltEncodeParams p) {
    encode_wgmma_body<CLT_ENC_WG_TF, CLT_ENC_WG_TK>(p);
}

CLT_KERNEL void __launch_bounds__(256, 2) encode_wgmma_narrow(const CltEncodeParams p) {
    encode_wgmma_body<CLT_ENC_WGN_TF, CLT_ENC_WGN_TK>(p);
}

// ---- encode_wgmma_tma: encode_wgmma's tile with the stages filled by the Tensor Memory Accelerator ----
//
// A persistent grid (at most one block an SM): block i computes tiles i, i + gridDim.x, ... of the
// ceil(B / 128) x ceil(F / 256) tiles, features fastest. Warps 0-7 are the two consumer warpgroups (wgmma and
// the epilogues, as encode_wgmma); warp 8 is the producer, whose lane 0 alone copies, slice after slice
// through all of the block's tiles: for slice `it` (counted over the tiles) it waits until stage it % 4 is
// free (mbarrier `empty`), announces the stage's bytes on mbarrier `full` and starts two bulk-tensor copies
// (x's 128 x 64 box, W's 256 x 64 box) that complete their bytes on it. A consumer warpgroup waits for
// `full`, issues the slice's four k16 steps and, once the previous slice's products are done
// (wgmma_wait<1>), releases that slice's stage: lane 0 of each of the 8 consumer warps arrives on its
// `empty` (8 arrivals a phase); a tile's last slice is released after its final wait. So the producer runs
// up to 4 slices ahead, across a tile's end too: the next tile's first slices load while the consumers run
// the epilogue, whose reduction has its own shared memory and whose barriers are the consumers' alone
// (bar.sync 1, 256). No thread spends instructions or registers on copies, and the copies and wgmma both go
// through the async proxy, so no proxy fence is needed between them. The tiles land with the 128-byte
// swizzle (a row of 64 bf16 is the swizzle's span), which wgmma reads through wgmma_desc_sw128; the stages
// start 1024-byte aligned.
#define WT_STAGES CLT_ENC_WGT_STAGES
static_assert((WB + CLT_ENC_WGT_TF) * CLT_ENC_WGT_TK * 2 == CLT_ENC_WGT_STAGE_BYTES, "stage size as in clt_params.h");
static_assert(WT_STAGES * CLT_ENC_WGT_STAGE_BYTES + 3 * 8 * CLT_ENC_WGT_TF * 4 + 1024 == CLT_ENC_WGT_SHARED,
              "shared size as in clt_params.h");
static_assert(CLT_ENC_WGT_THREADS == 9 * 32, "two warpgroups and the producer warp");
static_assert(CLT_ENC_WGT_TK * 2 == 128, "a slice's row is the 128-byte swizzle's span");

CLT_KERNEL void __launch_bounds__(CLT_ENC_WGT_THREADS, 1) encode_wgmma_tma(const __grid_constant__ CltEncodeTmaParams q) {
    constexpr int N = CLT_ENC_WGT_TF, K = CLT_ENC_WGT_TK;
    constexpr uint32_t STAGE = CLT_ENC_WGT_STAGE_BYTES, X_BYTES = WB * K * 2, SBO = 8 * K * 2;
    __shared__ uint64_t full[WT_STAGES], empty[WT_STAGES];
    CLT_DYNAMIC_SHARED(uint4, raw);
    const CltEncodeParams& p = q.p;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const uint32_t raw0 = smem_addr(raw), smem0 = (raw0 + 1023u) & ~1023u;  // the swizzle pattern's alignment
    float* red = reinterpret_cast<float*>(raw + (smem0 - raw0 + WT_STAGES * STAGE) / 16);  // after the stages
    const uint32_t nk = (p.d + K - 1) / K, tiles_f = (p.n_features + N - 1) / N;
    const uint32_t tiles = tiles_f * ((p.n_tokens + WB - 1) / WB);
    if (tid == 0) {
        for (int s = 0; s < WT_STAGES; ++s) {
            mbar_init(smem_addr(&full[s]), 1);   // the producer's arrival, with the stage's bytes
            mbar_init(smem_addr(&empty[s]), 8);  // lane 0 of each consumer warp
        }
        fence_mbar_init();
    }
    __syncthreads();

    if (warp == 8) {
        if (lane == 0) {
            uint32_t it = 0;  // slices issued, over the block's tiles
            for (uint32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
                const int f0 = (int)((tile % tiles_f) * N), b0 = (int)((tile / tiles_f) * WB);
                for (uint32_t kt = 0; kt < nk; ++kt, ++it) {
                    const uint32_t s = it % WT_STAGES, bar = smem_addr(&full[s]), dst = smem0 + s * STAGE;
                    // Slice it - 4 was released in phase it / 4 - 1 of `empty`.
                    if (it >= WT_STAGES) mbar_wait(smem_addr(&empty[s]), (it / WT_STAGES + 1) & 1);
                    mbar_arrive_expect_tx(bar, STAGE);
                    tma_load_2d(dst, &q.map_x, (int)(kt * K), b0, bar);
                    tma_load_2d(dst + X_BYTES, &q.map_w, (int)(kt * K), f0, bar);
                }
            }
        }
        __syncwarp();  // (lanes 1-31 wait for lane 0: the warp leaves converged)
        return;        // the copies in flight complete on the barriers the consumers wait for
    }

    const uint32_t wg = warp >> 2;
    uint32_t it = 0;  // slices consumed, over the block's tiles
    for (uint32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const uint32_t f0 = (tile % tiles_f) * N, b0 = (tile / tiles_f) * WB;
        float acc[N / 2];
#pragma unroll
        for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;
        for (uint32_t kt = 0; kt < nk; ++kt, ++it) {
            const uint32_t s = it % WT_STAGES;
            mbar_wait(smem_addr(&full[s]), (it / WT_STAGES) & 1);  // slice it has landed (phase it / 4)
            const uint32_t a0 = smem0 + s * STAGE + wg * 64 * K * 2, w0 = smem0 + s * STAGE + X_BYTES;
            wgmma_fence();
            wgmma_fence_operands<N / 2>(acc);
#pragma unroll
            for (int ks = 0; ks < K / 16; ++ks)  // k16 step ks: 32 bytes further along the rows
                wgmma_bf16<N>(acc, wgmma_desc_sw128(a0 + ks * 32, SBO), wgmma_desc_sw128(w0 + ks * 32, SBO));
            wgmma_commit();
            wgmma_fence_operands<N / 2>(acc);
            wgmma_wait<1>();  // slice it - 1's products are done: its stage is free
            if (kt > 0 && lane == 0) mbar_arrive(smem_addr(&empty[(it - 1) % WT_STAGES]));
        }
        wgmma_wait<0>();
        wgmma_fence_operands<N / 2>(acc);
        if (nk > 0 && lane == 0) mbar_arrive(smem_addr(&empty[(it - 1) % WT_STAGES]));  // the tile's last slice
        wgmma_epilogue<N>(p, acc, red, b0, f0, tile / tiles_f, true);
    }
}

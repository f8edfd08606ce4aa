// The sparse backward pass of one source layer.
// CPU reference: src/backend/cpu/sparse.rs (loss_and_grad: the per-feature loop, the grouping of entries by
// feature, Σ_b x_b, the decoder-bias gradient), with every encoder block in BlockMode::Near.
//
// 1. act_grad: one warp per listed entry, <r_b[l..], W_dec[l][f]> (the activation gradient at active indices
//    only; 16-byte loads, 8 elements a lane, where the rows allow) and, for active entries, the
//    pre-activation gradient with the sparsity term. act_grad_tiled: the same with the token's residual row
//    staged once for all its entries (a block per token), the same bits. act_grad_partial / act_grad_finish:
//    the same with each decoder row staged once per tile of tokens (sums in another order).
// 2. csr_count / csr_scan / csr_fill / csr_sort: the entries grouped per feature (CSR). Counting and the fill
//    cursor use integer atomics (exact); the sort then puts each feature's segment in entry-id order (ranks
//    from a bitmap of the feature's tokens, linear in the segment), so the sums below run in token order and
//    give the same bits every run.
// 3. feature_grads: one block per feature, no atomics: encoder row, decoder row data term, encoder bias,
//    threshold, decoder-norm coefficient, active count, sparsity.
//    row_grad_tiled: its encoder or decoder rows with the rows' slices staged in shared memory, the same
//    bits.
// 4. col_sum: Σ over tokens of x (pre-activation term) or of r (decoder-bias gradient), in token order.
#include "common.cuh"
#include "ptx.cuh"
#include "sort.cuh"

// Entry e's outputs from its dot product: the projection, and for an active entry the pre-activation
// gradient with the sparsity term and the sparsity itself.
__device__ __forceinline__ void act_grad_out(const CltActGradParams& p, uint32_t e, uint32_t f, float dot) {
    const float a = ptr<const float>(p.act)[e];
    float ge = 0.f, sp = 0.f;
    if (a != 0.f) {
        const float nf = ptr<const float>(p.norms)[f];
        const float t = tanhf(p.c * a * nf);
        ge = dot + p.tanh_scale * p.c * nf * (1.f - t * t);
        sp = t;
    }
    ptr<float>(p.proj)[e] = dot;
    ptr<float>(p.ge)[e] = ge;
    ptr<float>(p.sparsity)[e] = sp;
}

// acc + <r, w> for 8 consecutive elements, r as two float4 and w as the 8 bf16 of one 16-byte load
// (bf16 -> f32 is exact: the bits shifted up), added in element order.
__device__ __forceinline__ float dot8(float4 r0, float4 r1, uint4 wv, float acc) {
    acc = fmaf(r0.x, __uint_as_float(wv.x << 16), acc);
    acc = fmaf(r0.y, __uint_as_float(wv.x & 0xffff0000u), acc);
    acc = fmaf(r0.z, __uint_as_float(wv.y << 16), acc);
    acc = fmaf(r0.w, __uint_as_float(wv.y & 0xffff0000u), acc);
    acc = fmaf(r1.x, __uint_as_float(wv.z << 16), acc);
    acc = fmaf(r1.y, __uint_as_float(wv.z & 0xffff0000u), acc);
    acc = fmaf(r1.z, __uint_as_float(wv.w << 16), acc);
    return fmaf(r1.w, __uint_as_float(wv.w & 0xffff0000u), acc);
}

// act_grad: a warp per slot split..slot_end of every token (all slots with split = 0, slot_end = cap; the
// tail of the longest lists where act_grad_partial takes the rest), entry b * cap + s.
CLT_KERNEL void __launch_bounds__(256) act_grad(const CltActGradParams p) {
    const uint32_t warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const uint32_t lane = threadIdx.x & 31;
    const uint32_t width = p.slot_end - p.split;
    if (warp >= p.n_tokens * width) return;
    const uint32_t b = warp / width, s = p.split + warp % width, entry = b * p.cap + s;
    const uint32_t n = min(ptr<const uint32_t>(p.count)[b], p.cap);
    if (s >= n) return;
    const uint32_t f = ptr<const uint32_t>(p.feat)[entry];
    const __nv_bfloat16* w = ptr<const __nv_bfloat16>(p.w_dec) + (size_t)f * p.row_len;
    const float* r = ptr<const float>(p.resid) + (size_t)b * p.resid_stride + p.resid_offset;
    float acc = 0.f;
    // A lane takes 8 consecutive elements at a time (one 16-byte load of weights, two of residuals) where
    // both rows are 16-byte aligned, else one element at a time.
    const bool vec = p.row_len % 8 == 0 && ((p.w_dec | p.resid) & 15u) == 0 && p.resid_stride % 4 == 0 &&
                     p.resid_offset % 4 == 0;
    if (vec) {
#pragma unroll 4
        for (uint32_t j = lane * 8; j < p.row_len; j += 256) {
            const uint4 wv = *reinterpret_cast<const uint4*>(w + j);
            const float4 r0 = *reinterpret_cast<const float4*>(r + j);
            const float4 r1 = *reinterpret_cast<const float4*>(r + j + 4);
            acc = dot8(r0, r1, wv, acc);
        }
    } else {
        for (uint32_t j = lane; j < p.row_len; j += 32) acc = fmaf(r[j], __bfloat162float(w[j]), acc);
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) act_grad_out(p, entry, f, acc);
}

#define AG_CHUNK 2048   // residuals act_grad_tiled stages at a time (8 KB), a multiple of 256
#define AG_PER_WARP 8  // entries a warp carries through the chunks: 64 a block per pass over the row

// act_grad_tiled: act_grad's dot products with the token's residual row staged in shared memory once for
// all its entries, instead of fetched once per entry (one block per token; 8 of its entries a warp, their
// 8 accumulators a lane in registers while the row passes through in chunks of AG_CHUNK). A lane takes the
// same elements in the same order as in act_grad's 16-byte path (chunks are multiples of 256 elements),
// and the warp reduces and writes as act_grad does: the same bits. Per entry it fetches only the decoder
// row (2 bytes an element instead of 2 + 4). Needs the rows of act_grad's vector path (the wrapper checks).
// (`__launch_bounds__(.., 2)`: with no minimum of blocks, ptxas held it to 64 registers and spilled.)
CLT_KERNEL void __launch_bounds__(256, 2) act_grad_tiled(const CltActGradParams p) {
    __shared__ float4 r_s[AG_CHUNK / 4];
    const uint32_t b = blockIdx.x;
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t n = min(ptr<const uint32_t>(p.count)[b], p.cap);
    const float* r = ptr<const float>(p.resid) + (size_t)b * p.resid_stride + p.resid_offset;
    const uint32_t* feat = ptr<const uint32_t>(p.feat) + (size_t)b * p.cap;
    const __nv_bfloat16* w_dec = ptr<const __nv_bfloat16>(p.w_dec);
    for (uint32_t g0 = 0; g0 < n; g0 += 8 * AG_PER_WARP) {  // the same for every thread of the block
        float acc[AG_PER_WARP];
        uint32_t fk[AG_PER_WARP];
#pragma unroll
        for (int k = 0; k < AG_PER_WARP; ++k) {
            const uint32_t s = g0 + warp + 8 * k;
            acc[k] = 0.f;
            fk[k] = s < n ? feat[s] : 0;
        }
        for (uint32_t c0 = 0; c0 < p.row_len; c0 += AG_CHUNK) {
            const uint32_t m = min(p.row_len - c0, (uint32_t)AG_CHUNK);
            __syncthreads();  // every warp is done with the previous chunk
            for (uint32_t t = threadIdx.x; t < m / 4; t += 256)
                r_s[t] = *reinterpret_cast<const float4*>(r + c0 + 4 * t);
            __syncthreads();
#pragma unroll
            for (int k = 0; k < AG_PER_WARP; ++k) {
                if (g0 + warp + 8 * k >= n) break;  // uniform in the warp
                const __nv_bfloat16* w = w_dec + (size_t)fk[k] * p.row_len + c0;
#pragma unroll 4
                for (uint32_t j = lane * 8; j < m; j += 256) {
                    const uint4 wv = *reinterpret_cast<const uint4*>(w + j);
                    acc[k] = dot8(r_s[j / 4], r_s[j / 4 + 1], wv, acc[k]);
                }
            }
        }
#pragma unroll
        for (int k = 0; k < AG_PER_WARP; ++k) {
            const uint32_t s = g0 + warp + 8 * k;
            if (s >= n) break;
            float a_k = acc[k];
            for (int o = 16; o > 0; o >>= 1) a_k += __shfl_down_sync(0xffffffffu, a_k, o);
            if (lane == 0) act_grad_out(p, b * p.cap + s, fk[k], a_k);
        }
    }
}

#define AP_RANGE 512    // columns a block of act_grad_partial covers: one partial sum an entry and range
#define AP_COLS 16      // columns a step: one 32-byte sector of a bf16 row
#define AP_TPT 2        // tokens a thread owns: up to 512 tokens a block
#define AP_AHEAD 4      // feature ids a token's walk holds loaded ahead of its cursor

// Step q of act_grad_partial's staging (columns col0 + (q / n_fchunks) * AP_COLS, features from
// (q % n_fchunks) * feature_chunk; nothing past the last step): every feature's 16 weights of those
// columns copied into buf by cp.async, this thread's share, committed as one group (an empty one past the
// last step).
__device__ __forceinline__ void ap_stage(const CltActGradParams& p, uint32_t col0, uint32_t n_steps,
                                         uint32_t n_fchunks, uint32_t q, uint4* buf) {
    if (q < n_steps * n_fchunks) {
        const uint32_t c0 = col0 + (q / n_fchunks) * AP_COLS, f0 = (q % n_fchunks) * p.feature_chunk;
        const uint32_t nf = min(p.n_features - f0, p.feature_chunk);
        const __nv_bfloat16* w = ptr<const __nv_bfloat16>(p.w_dec) + (size_t)f0 * p.row_len + c0;
        for (uint32_t t = threadIdx.x; t < 2 * nf; t += 256)
            cp_async16(smem_addr(buf + t), w + (size_t)(t / 2) * p.row_len + 8 * (t & 1), true);
    }
    cp_async_commit();
}

#define AP_GROUPS (AP_TPT * 8)  // groups of 32 tokens a tile holds at most: a warp's lanes, AP_TPT a warp
#define PLAN_CHUNK 4096          // groups act_plan packs from shared memory at a time
#define PLAN_BINS CLT_ACT_PLAN_BINS  // list lengths act_plan sorts by: 0..split (the host keeps split below)

// act_plan: act_grad_partial's tiles for one layer's lists. The tokens are sorted by their lists' lengths
// capped at `split` (and cap), shortest first: a counting sort, the order within a length as the atomics
// fall (it changes which tile a token is in, never its sums). A group is 32 consecutive tokens of that
// order (a warp's lanes in act_grad_partial); its rows are its longest list, the last of its 32, so a
// group wastes little on shorter lists; its accumulators are rows x 32 f32, entry e of lane i at 32 e + i
// (a warp's 32 lanes touch 32 consecutive words: no bank conflicts). Tiles are runs of consecutive
// groups, packed greedily in order: a group starts a new tile when its accumulators would not fit in
// `accumulators` with the tile's, or when the tile holds AP_GROUPS groups. So a tile's size follows its
// own tokens' lists, not the batch's longest. Writes, with G groups: plan[0] = the number of tiles,
// plan[1 + t] = tile t's first group (plan[1 + tiles] = G), plan[2 + G + g] = group g's offset in its
// tile's accumulators, plan[2 + 2G + i] = the token at position i of the order. The host sizes `split` so
// that any group fits (32 split <= accumulators) and launches act_grad_partial with a grid no smaller
// than the tiles. One block; thread 0 scans the lengths and packs the groups (a few instructions each).
CLT_KERNEL void __launch_bounds__(256) act_plan(const CltActGradParams p) {
    __shared__ uint32_t bins[PLAN_BINS];  // tokens of each length, then where the next of each goes
    __shared__ uint32_t rows[PLAN_CHUNK];
    uint32_t* plan = ptr<uint32_t>(p.plan);
    const uint32_t* count = ptr<const uint32_t>(p.count);
    const uint32_t n_groups = (p.n_tokens + 31) / 32;
    uint32_t* order = plan + 2 + 2 * n_groups;
    const uint32_t limit = min(min(p.cap, p.split), (uint32_t)PLAN_BINS - 1);
    block_counting_sort(p.n_tokens, limit + 1, bins, [&](uint32_t b) { return min(count[b], limit); }, order);
    uint32_t tiles = 0, used = 0, in_tile = 0;  // thread 0's packing state
    for (uint32_t c0 = 0; c0 < n_groups; c0 += PLAN_CHUNK) {
        const uint32_t nc = min(n_groups - c0, (uint32_t)PLAN_CHUNK);
        for (uint32_t g = threadIdx.x; g < nc; g += 256)
            rows[g] = min(count[order[min(32 * (c0 + g) + 31, p.n_tokens - 1)]], limit);
        __syncthreads();
        if (threadIdx.x == 0) {
            for (uint32_t g = 0; g < nc; ++g) {
                const uint32_t seg = 32 * rows[g];
                if (c0 + g == 0 || used + seg > p.accumulators || in_tile == AP_GROUPS) {
                    plan[1 + tiles++] = c0 + g;
                    used = 0;
                    in_tile = 0;
                }
                plan[2 + n_groups + c0 + g] = used;
                used += seg;
                ++in_tile;
            }
        }
        __syncthreads();  // rows[] is read before the next chunk overwrites it
    }
    if (threadIdx.x == 0) {
        plan[1 + tiles] = n_groups;
        plan[0] = tiles;
    }
}

// act_grad_partial: act_grad's dot products arranged so that a decoder row is fetched once per tile of
// tokens instead of once per token that lists its feature. Grid: (at least act_plan's tiles; blocks past
// them return at once, ranges of AP_RANGE columns). A tile is up to AP_GROUPS groups of 32 tokens in
// act_plan's order (by list length); thread i of the block owns positions i and i + 256 of the tile (a
// warp's lanes: one group each) and holds their tokens' residuals of the current 16 columns in registers;
// for each chunk of feature_chunk features the block stages every feature's 16 weights of those columns
// (32 bytes, dynamic shared memory; cp.async into one of two buffers while the threads add from the
// other), and each thread adds <r, w> into its entries' accumulators (shared memory: each group's rows x 32
// at act_plan's offset, one thread's column alone; a token's first `split` entries: the host chooses split
// so that few tokens list more, and act_grad takes their entries past it), each token's list read once
// per step through a cursor (lists are in increasing feature order, DeviceCodes' invariant). A warp's 32
// tokens have lists of about one length (act_plan's order), so its lanes' walks end about together. The
// two tokens' walks go in step, an entry of each a round, each with the features of its next AP_AHEAD
// entries loaded ahead (a feature id is the only global load of a walk's step: weights and accumulators
// are in shared memory). An entry's sum over its range runs column by column in order; the ranges' sums
// are added in order by act_grad_finish. The same order every run, but not act_grad's: the result
// differs from the gathers' by f32 rounding.
//
// What it moves at the issue's 1B shape (docs/cuda.md): the decoder staged once per tile (a tile of up to
// 512 tokens: 16 groups of lists of 64, or fewer where its lists are longer; B / 512 = 32 times the
// decoder, 1.4e11 B, where the gathers fetch 5.9e11 B) and the lists' feature ids, 4 bytes an entry for
// every 16 columns. Needs row_len a multiple of 16, W_dec and the residual rows 16-byte aligned (the
// wrapper checks).
CLT_KERNEL void __launch_bounds__(256, 1) act_grad_partial(const CltActGradParams p) {
    CLT_DYNAMIC_SHARED(uint4, sm);  // 2 x [2 * min(F, feature_chunk)] weight slices, then the accumulators
    const uint32_t* plan = ptr<const uint32_t>(p.plan);
    if (blockIdx.x >= plan[0]) return;  // (the whole block: the grid is an upper bound on the tiles)
    const uint32_t n_groups = (p.n_tokens + 31) / 32;
    const uint32_t g0 = plan[1 + blockIdx.x], T = 32 * (plan[2 + blockIdx.x] - g0);
    const uint32_t* offset = plan + 2 + n_groups;
    const uint32_t* order = plan + 2 + 2 * n_groups;
    const uint32_t buf_len = 2 * min(p.n_features, p.feature_chunk);
    float* acc = reinterpret_cast<float*>(sm + 2 * buf_len);
    const uint32_t b0 = 32 * g0, range = blockIdx.y;  // b0: the tile's first position in act_plan's order
    const uint32_t col0 = range * AP_RANGE, col1 = min(col0 + AP_RANGE, p.row_len);
    const uint32_t n_steps = (col1 - col0) / AP_COLS;
    const uint32_t n_fchunks = (p.n_features + p.feature_chunk - 1) / p.feature_chunk;
    ap_stage(p, col0, n_steps, n_fchunks, 0, sm);
    uint32_t n[AP_TPT], tok_b[AP_TPT];  // the thread's tokens: their entries here, their index in the batch
    const uint32_t* feat[AP_TPT];
    uint32_t mine[AP_TPT];  // the token's accumulators: entry e at acc[mine + 32 e]
#pragma unroll
    for (int tt = 0; tt < AP_TPT; ++tt) {
        const uint32_t tok = tt * 256 + threadIdx.x, at = b0 + tok;
        const bool in = tok < T && at < p.n_tokens;
        const uint32_t b = in ? order[at] : 0;
        tok_b[tt] = b;
        n[tt] = in ? min(min(ptr<const uint32_t>(p.count)[b], p.cap), p.split) : 0;
        feat[tt] = ptr<const uint32_t>(p.feat) + (size_t)b * p.cap;
        mine[tt] = (in ? offset[g0 + tok / 32] : 0) + (threadIdx.x & 31);
        for (uint32_t e = 0; e < n[tt]; ++e) acc[mine[tt] + 32 * e] = 0.f;
    }
    float rv[AP_TPT][AP_COLS];
    // Per token, at the current columns: its cursor (first entry not yet added) and the features of the
    // AP_AHEAD entries from there (0 past the list), so that a walk keeps AP_AHEAD loads in flight.
    uint32_t e[AP_TPT] = {}, fe[AP_TPT][AP_AHEAD] = {};
    for (uint32_t q = 0; q < n_steps * n_fchunks; ++q) {
        const uint32_t c0 = col0 + (q / n_fchunks) * AP_COLS, f0 = (q % n_fchunks) * p.feature_chunk;
        const uint32_t nf = min(p.n_features - f0, p.feature_chunk);
        ap_stage(p, col0, n_steps, n_fchunks, q + 1, sm + ((q + 1) & 1) * buf_len);
        if (f0 == 0) {  // new columns: the tokens' residuals there, every cursor at the head of its list
#pragma unroll
            for (int tt = 0; tt < AP_TPT; ++tt) {
                const float* r =
                    ptr<const float>(p.resid) + (size_t)tok_b[tt] * p.resid_stride + p.resid_offset + c0;
#pragma unroll
                for (int j = 0; j < AP_COLS / 4; ++j) {
                    const float4 v =
                        n[tt] > 0 ? *reinterpret_cast<const float4*>(r + 4 * j) : make_float4(0.f, 0.f, 0.f, 0.f);
                    rv[tt][4 * j] = v.x;
                    rv[tt][4 * j + 1] = v.y;
                    rv[tt][4 * j + 2] = v.z;
                    rv[tt][4 * j + 3] = v.w;
                }
                e[tt] = 0;
#pragma unroll
                for (uint32_t j = 0; j < AP_AHEAD; ++j) fe[tt][j] = j < n[tt] ? feat[tt][j] : 0;
            }
        }
        cp_async_wait<1>();  // this thread's copies of step q have landed
        __syncthreads();     // and every thread's
        const uint4* w_s = sm + (q & 1) * buf_len;
        for (;;) {
            bool more = false;
#pragma unroll
            for (int tt = 0; tt < AP_TPT; ++tt) {
                const uint32_t f = fe[tt][0] - f0;  // entries before f0 were added by earlier chunks
                if (e[tt] < n[tt] && f < nf) {
                    const uint32_t slot = e[tt]++;
#pragma unroll
                    for (int j = 0; j + 1 < AP_AHEAD; ++j) fe[tt][j] = fe[tt][j + 1];
                    fe[tt][AP_AHEAD - 1] = slot + AP_AHEAD < n[tt] ? feat[tt][slot + AP_AHEAD] : 0;
                    const uint4 lo = w_s[2 * f], hi = w_s[2 * f + 1];
                    const uint32_t u[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
                    float s = acc[mine[tt] + 32 * slot];
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        s = fmaf(rv[tt][2 * j], __uint_as_float(u[j] << 16), s);
                        s = fmaf(rv[tt][2 * j + 1], __uint_as_float(u[j] & 0xffff0000u), s);
                    }
                    acc[mine[tt] + 32 * slot] = s;
                    more = true;
                }
            }
            if (!more) break;
        }
        __syncthreads();  // every thread is done with buffer q & 1 before step q + 2 is copied into it
    }
#pragma unroll
    for (int tt = 0; tt < AP_TPT; ++tt) {
        float* out = ptr<float>(p.partial) + (size_t)tok_b[tt] * p.cap * p.n_ranges + range;
        for (uint32_t e = 0; e < n[tt]; ++e) out[(size_t)e * p.n_ranges] = acc[mine[tt] + 32 * e];
    }
}

// act_grad_finish: an entry's dot product as the sum of act_grad_partial's ranges, in order, then
// act_grad's outputs. One thread per slot (below split).
CLT_KERNEL void act_grad_finish(const CltActGradParams p) {
    const uint32_t e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= p.n_tokens * p.cap) return;
    const uint32_t b = e / p.cap, s = e % p.cap;
    if (s >= min(min(ptr<const uint32_t>(p.count)[b], p.cap), p.split)) return;  // (slots past split: act_grad)
    const float* part = ptr<const float>(p.partial) + (size_t)e * p.n_ranges;
    float dot = 0.f;
    for (uint32_t r = 0; r < p.n_ranges; ++r) dot += part[r];
    act_grad_out(p, e, ptr<const uint32_t>(p.feat)[e], dot);
}

CLT_KERNEL void csr_count(const CltCsrParams p) {
    const uint32_t e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= p.n_tokens * p.cap) return;
    const uint32_t b = e / p.cap, s = e % p.cap;
    if (s >= min(ptr<const uint32_t>(p.count)[b], p.cap)) return;
    atomicAdd(ptr<uint32_t>(p.fcount) + ptr<const uint32_t>(p.feat)[e], 1u);
}

// Exclusive scan of fcount[0..F] in place (fcount[F] becomes the total). One block of 1024 threads.
CLT_KERNEL void __launch_bounds__(1024) csr_scan(const CltCsrParams p) {
    __shared__ uint32_t s[1024];
    __shared__ uint32_t carry;
    uint32_t* c = ptr<uint32_t>(p.fcount);
    if (threadIdx.x == 0) carry = 0;
    for (uint32_t base = 0; base <= p.n_features; base += 1024) {
        const uint32_t i = base + threadIdx.x;
        const uint32_t v = (i < p.n_features) ? c[i] : 0u;
        s[threadIdx.x] = v;
        __syncthreads();
        for (uint32_t o = 1; o < 1024; o <<= 1) {  // Hillis-Steele inclusive scan
            const uint32_t add = threadIdx.x >= o ? s[threadIdx.x - o] : 0u;
            __syncthreads();
            s[threadIdx.x] += add;
            __syncthreads();
        }
        if (i <= p.n_features) c[i] = carry + s[threadIdx.x] - v;
        __syncthreads();
        if (threadIdx.x == 1023) carry += s[1023];
        __syncthreads();
    }
}

CLT_KERNEL void csr_fill(const CltCsrParams p) {
    const uint32_t e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= p.n_tokens * p.cap) return;
    const uint32_t b = e / p.cap, s = e % p.cap;
    if (s >= min(ptr<const uint32_t>(p.count)[b], p.cap)) return;
    const uint32_t f = ptr<const uint32_t>(p.feat)[e];
    const uint32_t at = ptr<const uint32_t>(p.fcount)[f] + atomicAdd(ptr<uint32_t>(p.cursor) + f, 1u);
    ptr<uint32_t>(p.unsorted)[at] = e;
}

// feature_order: the features by their CSR segment's length, longest first (by bucket: a counting sort,
// the order within a bucket as the atomics fall), into by_length[F]. row_grad_tiled gives a thread 4
// features of consecutive ranks, so a warp's lanes walk segments of about one length (with real data a few
// features are active on a large share of the tokens and most on very few: without the order, one such
// feature keeps its warp, and at the chunk barriers its block, walking while the rest idle), and the
// heaviest tiles are launched first. One block, after csr_scan (fcount holds the starts).
CLT_KERNEL void __launch_bounds__(256) feature_order(const CltCsrParams p) {
    __shared__ uint32_t bins[LENGTH_BUCKETS];
    const uint32_t* fstart = ptr<const uint32_t>(p.fcount);
    uint32_t* by_length = ptr<uint32_t>(p.by_length);
    block_counting_sort(
        p.n_features, LENGTH_BUCKETS, bins, [&](uint32_t f) { return LENGTH_BUCKETS - 1 - length_bucket(fstart[f + 1] - fstart[f]); },
        by_length);
}

#define SORT_THREADS 256
#define SORT_WORDS 1024  // bitmap words per tile: 32,768 tokens (8 KB of shared memory with the prefixes)

// One block per feature. A token lists a feature at most once and entry ids grow with the token
// (e = b * cap + slot), so the feature's entries in id order are its tokens in order: an entry's rank in the
// segment is the number of the feature's tokens before its own. The block marks the feature's tokens in a
// bitmap (a tile of 32,768 tokens at a time, in shared memory), scans the words' popcounts, and reads each
// rank as the set bits before the entry's bit. Linear in the segment's length plus the batch's tokens / 32
// (a feature on every token costs as much per entry as a rare one); integer operations only, so exact.
CLT_KERNEL void __launch_bounds__(SORT_THREADS) csr_sort(const CltCsrParams p) {
    __shared__ uint32_t bits[SORT_WORDS];
    __shared__ uint32_t before[SORT_WORDS];  // the tile's set bits in earlier words, plus earlier tiles'
    __shared__ uint32_t warp_total[SORT_THREADS / 32];
    const uint32_t f = blockIdx.x;
    if (f >= p.n_features) return;
    const uint32_t* start = ptr<const uint32_t>(p.fcount);
    const uint32_t s0 = start[f], n = start[f + 1] - s0;
    if (n == 0) return;
    const uint32_t* in = ptr<const uint32_t>(p.unsorted) + s0;
    uint32_t* out = ptr<uint32_t>(p.order) + s0;
    constexpr uint32_t per = SORT_WORDS / SORT_THREADS;  // consecutive words a thread scans
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, w0 = threadIdx.x * per;
    uint32_t carry = 0;  // the feature's entries in earlier tiles
    for (uint32_t t0 = 0; t0 < p.n_tokens; t0 += SORT_WORDS * 32) {
        const uint32_t words = min((p.n_tokens - t0 + 31) / 32, (uint32_t)SORT_WORDS);
        for (uint32_t w = threadIdx.x; w < words; w += SORT_THREADS) bits[w] = 0;
        __syncthreads();
        for (uint32_t i = threadIdx.x; i < n; i += SORT_THREADS) {
            const uint32_t b = in[i] / p.cap - t0;  // wraps past the tile for a token before it
            if (b < SORT_WORDS * 32) atomicOr(&bits[b >> 5], 1u << (b & 31));
        }
        __syncthreads();
        // Exclusive scan of the words' popcounts: a thread's words, then the warp, then the warps in order.
        uint32_t mine = 0;
        for (uint32_t k = 0; k < per; ++k)
            if (w0 + k < words) mine += __popc(bits[w0 + k]);
        uint32_t incl = mine;
        for (uint32_t o = 1; o < 32; o <<= 1) {
            const uint32_t v = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += v;
        }
        if (lane == 31) warp_total[warp] = incl;
        __syncthreads();
        uint32_t run = carry + incl - mine, tile = 0;
        for (uint32_t w = 0; w < SORT_THREADS / 32; ++w) {
            if (w < warp) run += warp_total[w];
            tile += warp_total[w];
        }
        for (uint32_t k = 0; k < per; ++k)
            if (w0 + k < words) {
                before[w0 + k] = run;
                run += __popc(bits[w0 + k]);
            }
        __syncthreads();
        for (uint32_t i = threadIdx.x; i < n; i += SORT_THREADS) {
            const uint32_t e = in[i], b = e / p.cap - t0;
            if (b < SORT_WORDS * 32) out[before[b >> 5] + __popc(bits[b >> 5] & ((1u << (b & 31)) - 1u))] = e;
        }
        carry += tile;
        __syncthreads();  // every rank read before the next tile clears the bitmap
    }
}

#define FG_THREADS 256

// The pre-activation loss's coefficient of feature f (0 where the loss is off for it).
__device__ __forceinline__ float preact_kappa(uint32_t jump, clt_ptr mask, float pre_scale, uint32_t f, float nf) {
    const bool on = jump && (!mask || ptr<const uint8_t>(mask)[f] != 0);
    return on ? pre_scale * nf : 0.f;
}

// acc[0..4] += s * q.
__device__ __forceinline__ void fma4q(float s, float4 q, float* acc) {
    acc[0] = fmaf(s, q.x, acc[0]);
    acc[1] = fmaf(s, q.y, acc[1]);
    acc[2] = fmaf(s, q.z, acc[2]);
    acc[3] = fmaf(s, q.w, acc[3]);
}

// acc[0..4] += s * v[0..4], with one 16-byte load of v.
__device__ __forceinline__ void fma4(float s, const float* v, float* acc) {
    fma4q(s, *reinterpret_cast<const float4*>(v), acc);
}

CLT_KERNEL void __launch_bounds__(FG_THREADS) feature_grads(const CltFeatureGradParams p) {
    __shared__ float s_red[FG_THREADS / 32];
    __shared__ uint32_t s_redu[FG_THREADS / 32];
    __shared__ uint32_t s_tok[FG_THREADS];
    __shared__ float s_a[FG_THREADS];
    __shared__ float s_ge[FG_THREADS];
    const uint32_t f = blockIdx.x;
    const uint32_t* fstart = ptr<const uint32_t>(p.fstart);
    const uint32_t s0 = fstart[f], n = fstart[f + 1] - s0;
    const uint32_t* ents = ptr<const uint32_t>(p.order) + s0;
    const float* act = ptr<const float>(p.act);
    const float* pre = ptr<const float>(p.pre);
    const float* proj = ptr<const float>(p.proj);
    const float* gev = ptr<const float>(p.ge);
    const float nf = ptr<const float>(p.norms)[f];
    const float th = ptr<const float>(p.theta)[f];
    const bool preact_on = p.jump && (!p.preact_mask || ptr<const uint8_t>(p.preact_mask)[f] != 0);
    const float kappa = preact_kappa(p.jump, p.preact_mask, p.pre_scale, f, nf);

    // Scalars: each thread a strided share of the entries, then a fixed-order block reduction.
    float dn = 0.f, dbs = 0.f, near = 0.f, spars = 0.f;
    uint32_t n_active = 0;
    for (uint32_t i = threadIdx.x; i < n; i += FG_THREADS) {
        const uint32_t e = ents[i];
        const float a = act[e], h = pre[e];
        if (a != 0.f) {
            const float t = tanhf(p.c * a * nf);
            const float ge = gev[e];
            dn += p.tanh_scale * p.c * a * (1.f - t * t);
            dbs += ge;
            spars += t;
            n_active += 1;
            if (p.jump && h - th < p.half_bandwidth) near += p.by_h ? ge * h : ge;
        } else {
            near += p.by_h ? proj[e] * h : proj[e];  // a listed near-threshold entry
        }
    }
    dn = block_sum(dn, s_red);
    dbs = block_sum(dbs, s_red);
    near = block_sum(near, s_red);
    spars = block_sum(spars, s_red);
    n_active = block_sum(n_active, s_redu);

    // Vectors: threads own output columns (4 consecutive ones, read with 16-byte loads, where every row is
    // 16-byte aligned; else one); entries are staged through shared memory in token order. Either way a
    // column adds its entries' products in token order.
    const float* x = ptr<const float>(p.x);
    const float* r = ptr<const float>(p.resid);
    float* g_enc = ptr<float>(p.g_w_enc) + (size_t)f * p.d;
    float* g_dec = ptr<float>(p.g_w_dec) + (size_t)f * p.row_len;
    const bool vec = p.d % 4 == 0 && p.row_len % 4 == 0 && p.x_stride % 4 == 0 && p.resid_stride % 4 == 0 &&
                     ((p.x | p.resid | p.g_w_enc | p.g_w_dec) & 15u) == 0;
    const uint32_t per = vec ? 4 : 1;
    // Either kind of row may be left to row_grad_tiled (its output pointer is then 0).
    const bool enc = p.g_w_enc != 0, dec = p.g_w_dec != 0;
    const uint32_t cols = max(enc ? p.d : 0u, dec ? p.row_len : 0u);
    for (uint32_t j0 = 0; j0 < cols; j0 += FG_THREADS * per) {
        const uint32_t j = j0 + threadIdx.x * per;
        float ae[4] = {0.f, 0.f, 0.f, 0.f}, ad[4] = {0.f, 0.f, 0.f, 0.f};
        for (uint32_t c0 = 0; c0 < n; c0 += FG_THREADS) {
            const uint32_t m = min(n - c0, (uint32_t)FG_THREADS);
            __syncthreads();
            if (threadIdx.x < m) {
                const uint32_t e = ents[c0 + threadIdx.x];
                s_tok[threadIdx.x] = e / p.cap;
                s_a[threadIdx.x] = act[e];
                s_ge[threadIdx.x] = gev[e] + kappa;
            }
            __syncthreads();
            for (uint32_t t = 0; t < m; ++t) {
                const float a = s_a[t];
                if (a == 0.f) continue;
                const size_t b = s_tok[t];
                const float g = s_ge[t];
                if (vec) {
                    if (enc && j < p.d) fma4(g, x + b * p.x_stride + j, ae);
                    if (dec && j < p.row_len) fma4(a, r + b * p.resid_stride + j, ad);
                } else {
                    if (enc && j < p.d) ae[0] = fmaf(g, x[b * p.x_stride + j], ae[0]);
                    if (dec && j < p.row_len) ad[0] = fmaf(a, r[b * p.resid_stride + j], ad[0]);
                }
            }
        }
#pragma unroll
        for (uint32_t q = 0; q < 4; ++q) {
            if (q >= per) break;
            const uint32_t jq = j + q;
            if (enc && jq < p.d) g_enc[jq] = kappa != 0.f ? fmaf(-kappa, ptr<const float>(p.xsum)[jq], ae[q]) : ae[q];
            if (dec && jq < p.row_len) g_dec[jq] = ad[q];
        }
    }

    if (threadIdx.x == 0) {
        const float n_inactive = (float)(p.n_tokens - n_active);
        float dlt = 0.f;
        if (p.jump) {
            const float near_count = p.by_h ? ptr<const float>(p.near_h)[f]
                                            : (float)ptr<const uint32_t>(p.near_count)[f];
            near += p.tanh_scale * p.c * nf * near_count;
            dbs -= kappa * n_inactive;
            if (preact_on) dn += p.pre_scale * ptr<const float>(p.preact_sum)[f];
            const float weight = p.by_h ? -1.f / p.bandwidth : -th / p.bandwidth;
            dlt = th * (near * weight + kappa * n_inactive);
        }
        ptr<float>(p.g_b_enc)[f] = dbs;
        ptr<float>(p.g_log_theta)[f] = dlt;
        ptr<float>(p.dec_coef)[f] = nf > 0.f ? dn / nf : 0.f;
        ptr<uint8_t>(p.touched)[f] = n_active > 0;
        ptr<uint32_t>(p.active_count)[f] = n_active;
        ptr<float>(p.feat_sparsity)[f] = spars;
    }
}

#define RG_FEAT 4       // features a thread owns in row_grad_tiled: a tile of 1,024 features a block
#define RG_TCHUNK 1024  // tokens whose row slices a block stages at a time (2 x 16 bytes each; two buffers: 64 KB)

// Chunk q of row_grad_tiled's row slices (tokens from q * RG_TCHUNK; nothing past the last chunk) copied into
// buf by cp.async, this thread's share, committed as one group (an empty one past the last chunk).
__device__ __forceinline__ void rg_stage(const CltRowGradParams& p, const float* src, uint32_t q, float4* buf) {
    const uint32_t t0 = q * RG_TCHUNK;
    if (t0 < p.n_tokens) {
        const uint32_t nt = min(p.n_tokens - t0, (uint32_t)RG_TCHUNK);
        for (uint32_t t = threadIdx.x; t < 2 * nt; t += FG_THREADS)
            cp_async16(smem_addr(buf + t), src + (size_t)(t0 + t / 2) * p.src_stride + 4 * (t & 1), true);
    }
    cp_async_commit();
}

// row_grad_tiled: feature_grads' vector part, one kind of row a launch, out[f][c] = sum over f's active
// entries of coef * src[b][c] in token order (decoder rows: coef = a, src = the residual; encoder rows:
// coef = ge + kappa_f, src = the input, then the pre-activation term), arranged so that a row slice is
// fetched once per tile of 1,024 features instead of once per active entry (the transpose of
// sparse_decode_tiled). Grid: (row_len / 8 column chunks, feature tiles of 1,024 ranks of
// feature_order's, longest segments first; a thread owns 4 consecutive ranks). For each chunk of RG_TCHUNK
// tokens the block stages every token's 8 values of columns c0..c0+7 (dynamic shared memory; cp.async
// into one of two buffers while the threads add from the other) and each thread adds its 4 features'
// entries from there into 32 accumulators (4 features x 8 columns, registers), each feature's CSR segment
// read once per block through a cursor that a chunk advances (segments are in token order: csr_sort). The
// 4 features' walks go in step, an entry of each a round, so that their loads are in flight together; the
// next entry's id is loaded with this entry's activation. A column adds its entries' products in token
// order, skipping activations of 0, and the coefficient and epilogue are feature_grads' own: the same
// bits.
//
// What it moves at the issue's 1B shape (docs/cuda.md): the staged slices, F / 1,024 = 8 times the rows
// (residual: 1.5e11 B; inputs: 1.7e10 B), and the segments, 8 bytes an entry (id, activation) for every 8
// columns, against feature_grads' 32 bytes of row an active entry for every 8 columns (residual:
// 1.17e12 B, inputs: 1.4e11 B, mostly from DRAM: a layer's rows do not fit in the L2).
// Needs row_len a multiple of 8, src and src_stride 16-byte aligned (the wrapper checks).
CLT_KERNEL void __launch_bounds__(FG_THREADS) row_grad_tiled(const CltRowGradParams p) {
    CLT_DYNAMIC_SHARED(float4, r_s);  // two buffers of [2 * min(B, RG_TCHUNK)]: a token's 8 values, as two float4
    const uint32_t c0 = blockIdx.x * 8;
    // The thread's features: ranks r0..r0 + 3 of feature_order's (longest segments first), so that its
    // warp's walks are of about one length.
    const uint32_t r0 = (blockIdx.y * FG_THREADS + threadIdx.x) * RG_FEAT;
    const uint32_t* fstart = ptr<const uint32_t>(p.fstart);
    const uint32_t* order = ptr<const uint32_t>(p.order);
    const float* act = ptr<const float>(p.act);
    const float* ge = ptr<const float>(p.ge);
    const float* src = ptr<const float>(p.src) + c0;
    const uint32_t buf_len = 2 * min(p.n_tokens, (uint32_t)RG_TCHUNK);
    const FastDiv by_cap = fast_div(max(p.cap, 1u));  // an entry's token, once a step of every walk
    float acc[RG_FEAT][8];
    float kappa[RG_FEAT];  // encoder rows: the pre-activation term's coefficient (0 for decoder rows)
    // Per feature: its cursor (first entry of its segment not yet added), the entry id there, the
    // segment's end.
    uint32_t e[RG_FEAT], ent[RG_FEAT], end[RG_FEAT], fid[RG_FEAT];
#pragma unroll
    for (int ff = 0; ff < RG_FEAT; ++ff) {
        const uint32_t f = r0 + ff < p.n_features ? ptr<const uint32_t>(p.by_length)[r0 + ff] : p.n_features;
        fid[ff] = f;
        e[ff] = f < p.n_features ? fstart[f] : 0;
        end[ff] = f < p.n_features ? fstart[f + 1] : 0;
        ent[ff] = e[ff] < end[ff] ? order[e[ff]] : 0;
        kappa[ff] = p.encoder && f < p.n_features
                        ? preact_kappa(p.jump, p.preact_mask, p.pre_scale, f, ptr<const float>(p.norms)[f])
                        : 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[ff][j] = 0.f;
    }
    rg_stage(p, src, 0, r_s);
    for (uint32_t q = 0, t0 = 0; t0 < p.n_tokens; ++q, t0 += RG_TCHUNK) {
        const uint32_t nt = min(p.n_tokens - t0, (uint32_t)RG_TCHUNK);
        rg_stage(p, src, q + 1, r_s + ((q + 1) & 1) * buf_len);
        cp_async_wait<1>();  // this thread's copies of chunk q have landed
        __syncthreads();     // and every thread's
        const float4* rs = r_s + (q & 1) * buf_len;
        for (;;) {
            bool more = false;
#pragma unroll
            for (int ff = 0; ff < RG_FEAT; ++ff) {
                const uint32_t t = divide(ent[ff], by_cap) - t0;  // entries before t0 were added by earlier chunks
                if (e[ff] < end[ff] && t < nt) {
                    const uint32_t x = ent[ff];
                    const float a = act[x];
                    const float gx = p.encoder ? ge[x] : 0.f;
                    ent[ff] = ++e[ff] < end[ff] ? order[e[ff]] : 0;
                    if (a != 0.f) {
                        const float g = p.encoder ? gx + kappa[ff] : a;
                        fma4q(g, rs[2 * t], acc[ff]);
                        fma4q(g, rs[2 * t + 1], acc[ff] + 4);
                    }
                    more = true;
                }
            }
            if (!more) break;
        }
        __syncthreads();  // every thread is done with buffer q & 1 before chunk q + 2 is copied into it
    }
    const float* xsum = ptr<const float>(p.xsum) + c0;
#pragma unroll
    for (int ff = 0; ff < RG_FEAT; ++ff) {
        const uint32_t f = fid[ff];
        if (f >= p.n_features) continue;
        if (kappa[ff] != 0.f)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[ff][j] = fmaf(-kappa[ff], xsum[j], acc[ff][j]);
        float* o = ptr<float>(p.out) + (size_t)f * p.row_len + c0;
        *reinterpret_cast<float4*>(o) = make_float4(acc[ff][0], acc[ff][1], acc[ff][2], acc[ff][3]);
        *reinterpret_cast<float4*>(o + 4) = make_float4(acc[ff][4], acc[ff][5], acc[ff][6], acc[ff][7]);
    }
}

// Column sums in token order with f64 accumulation: Σ_b x_b (pre-activation term) and Σ_b r_b (b_dec grad).
CLT_KERNEL void col_sum(const CltColSumParams p) {
    const uint32_t j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.n) return;
    const float* src = ptr<const float>(p.src);
    double s = 0.0;
    for (uint32_t b = 0; b < p.n_tokens; ++b) s += src[(size_t)b * p.stride + j];
    ptr<float>(p.out)[j] = (float)s;
}

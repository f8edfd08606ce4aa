/* Parameter structs shared by the CUDA kernels (kernels/*.cu) and Rust (src/backend/cuda/ffi.rs).
 *
 * Every kernel takes one of these structs by value. Device addresses are plain 64-bit integers (clt_ptr), so
 * the header is valid C for the host compiler that checks the layout (build.rs compiles ffi/layout.c and the
 * Rust test `ffi::tests::layout_matches_header` compares every size and offset). Fields are ordered 8-byte
 * members first, then 4-byte members, padded to a multiple of 8: no implicit padding anywhere.
 * Element types are named in the comments: bf16 = __nv_bfloat16 (raw u16 on the Rust side). */
#ifndef CLT_PARAMS_H
#define CLT_PARAMS_H

#include <stdint.h>

typedef uint64_t clt_ptr;

/* 128-byte alignment, as CUDA 13 gives CUtensorMap (the only over-aligned member: CltTensorMap.opaque). */
#ifdef __cplusplus
#define CLT_ALIGN128 alignas(128)
#else
#define CLT_ALIGN128 _Alignas(128)
#endif

/* Encoder epilogue kinds (CltEncodeParams.epilogue). */
#define CLT_EPI_JUMPRELU 0u /* active entries h > theta, near-threshold entries, per-tile partials */
#define CLT_EPI_DENSE 1u    /* write h = x W^T + b densely (TopK / BatchTopK select afterwards) */

/* Tile sizes of the encoder (tokens x features per block; K step). */
#define CLT_ENC_TB 64
#define CLT_ENC_TF 64
#define CLT_ENC_TK 32

/* Tile sizes of the tensor-core encoder (encode_mma): 128 tokens x 128 features per block of 256 threads, K step
 * 32, CLT_ENC_MMA_STAGES shared-memory stages of CLT_ENC_MMA_STAGE_BYTES each (both tiles' rows padded to 40
 * bf16), in dynamic shared memory (over the 48 KiB default: the launch opts in). It reads rows with 16-byte
 * copies, so it needs d, x_stride and the layer offset to be multiples of CLT_ENC_MMA_ALIGN elements (the
 * wrapper falls back to encode_tile otherwise). */
#define CLT_ENC_MMA_TB 128
#define CLT_ENC_MMA_TF 128
#define CLT_ENC_MMA_TK 32
#define CLT_ENC_MMA_ALIGN 8
#define CLT_ENC_MMA_STAGES 4
#define CLT_ENC_MMA_STAGE_BYTES 20480 /* (TB + TF) rows x (TK + 8) bf16, checked by encode.cu */

/* Tile sizes of Hopper's warpgroup-MMA encoders (encode_wgmma.cu, sm_90a only): 128 tokens x CLT_ENC_WG_TF
 * features per block of two warpgroups (256 threads), K step CLT_ENC_WG_TK, CLT_ENC_WG_STAGES stages of
 * CLT_ENC_WG_STAGE_BYTES each in dynamic shared memory, both tiles in wgmma's canonical K-major layout without
 * swizzle (8 x 16-byte core matrices); encode_wgmma_narrow the same with the CLT_ENC_WGN_ sizes (two blocks
 * an SM). The same alignment rule as encode_mma (CLT_ENC_MMA_ALIGN). */
#define CLT_ENC_WG_TB 128
#define CLT_ENC_WG_TF 256
#define CLT_ENC_WG_TK 64
#define CLT_ENC_WG_STAGES 4
#define CLT_ENC_WG_STAGE_BYTES 49152 /* (TB + TF) rows x TK bf16, checked by encode_wgmma.cu */
#define CLT_ENC_WGN_TF 128
#define CLT_ENC_WGN_TK 32
#define CLT_ENC_WGN_STAGES 4
#define CLT_ENC_WGN_STAGE_BYTES 16384 /* (TB + TF) rows x TK bf16, checked by encode_wgmma.cu */
/* encode_wgmma_tma (encode_wgmma.cu, sm_90a only): encode_wgmma's 128 x 256 x 64 tile with the stages filled
 * by the Tensor Memory Accelerator (one producer warp, cp.async.bulk.tensor, 128-byte swizzle) and handed over
 * through mbarriers, in a persistent grid (a block loops over tiles): two consumer warpgroups and the
 * producer warp, CLT_ENC_WGT_THREADS threads a block; CLT_ENC_WGT_SHARED bytes of dynamic shared memory (the
 * stages, the epilogue's 24 KB of sums, and 1024 bytes to align the stages to the swizzle pattern). Rows of x and W_enc are read through tensor maps (CltTensorMap), whose row strides must be
 * multiples of 16 bytes: the same alignment rule as encode_mma. */
#define CLT_ENC_WGT_TF 256
#define CLT_ENC_WGT_TK 64
#define CLT_ENC_WGT_STAGES 4
#define CLT_ENC_WGT_STAGE_BYTES 49152 /* (TB + TF) rows x TK bf16 */
#define CLT_ENC_WGT_THREADS 288       /* two warpgroups and one warp */
#define CLT_ENC_WGT_SHARED 222208     /* STAGES x STAGE_BYTES + 3 x 8 x TF x 4 + 1024 */

/* Encoder: h = x W^T + b over one layer, fused epilogue. Lists are ELL: token b owns slots [b*cap, b*cap+cap),
 * count[b] entries were produced (may exceed cap: the host then re-runs with a larger cap). */
typedef struct {
    clt_ptr x;           /* const bf16: token b's input at x + b*x_stride (layer offset applied) */
    clt_ptr w;           /* const bf16 [F][d] */
    clt_ptr bias;        /* const f32 [F] */
    clt_ptr theta;       /* const f32 [F] (JumpReLU) */
    clt_ptr count;       /* u32 [B], zeroed before the launch */
    clt_ptr feat;        /* u32 [B][cap] */
    clt_ptr pre;         /* f32 [B][cap] */
    clt_ptr act;         /* f32 [B][cap] (0 for listed near-threshold entries) */
    clt_ptr part_preact; /* f32 [ceil(B/TB)][F]: per token tile, sum of (theta - h) over inactive tokens
                          * (TB = CLT_ENC_TB for encode_tile, CLT_ENC_MMA_TB for encode_mma,
                          * CLT_ENC_WG_TB for encode_wgmma and encode_wgmma_narrow) */
    clt_ptr part_near;   /* u32 [ceil(B/TB)][F]: inactive near-threshold tokens */
    clt_ptr part_near_h; /* f32 [ceil(B/TB)][F]: sum of h over them */
    clt_ptr dense;       /* f32 [B][F] (CLT_EPI_DENSE) */
    uint32_t n_tokens;
    uint32_t d;
    uint32_t n_features;
    uint32_t x_stride;
    uint32_t cap;
    uint32_t epilogue;
    float half_bandwidth;
    uint32_t pad0;
} CltEncodeParams;

/* A TMA tensor map (CUDA's CUtensorMap: 128 opaque bytes, 128-byte aligned in CUDA 13), encoded on the host
 * by the driver's cuTensorMapEncodeTiled and handed to a kernel inside its parameter struct (a
 * __grid_constant__ parameter, whose address the bulk-tensor copies take). */
typedef struct {
    CLT_ALIGN128 uint64_t opaque[16];
} CltTensorMap;

/* encode_wgmma_tma: the encoder's parameters and the tensor maps of its two operands. */
typedef struct {
    CltTensorMap map_x; /* x: n_tokens rows of d bf16, row stride x_stride; box 128 rows x 64 */
    CltTensorMap map_w; /* W_enc: n_features rows of d bf16; box 256 rows x 64 */
    CltEncodeParams p;
} CltEncodeTmaParams;

/* Sums per-tile partials of the encoder in tile order (deterministic). */
typedef struct {
    clt_ptr part_preact; /* f32 [n_tiles][F] */
    clt_ptr part_near;   /* u32 [n_tiles][F] */
    clt_ptr part_near_h; /* f32 [n_tiles][F] */
    clt_ptr preact_sum;  /* f32 out [F] */
    clt_ptr near_count;  /* u32 out [F] */
    clt_ptr near_h;      /* f32 out [F] */
    uint32_t n_tiles;
    uint32_t n_features;
} CltReduceParams;

/* Sorts each token's ELL list by feature (ties impossible: a feature appears once per token). */
typedef struct {
    clt_ptr count; /* const u32 [B] */
    clt_ptr feat;  /* u32 [B][cap] */
    clt_ptr pre;   /* f32 [B][cap] */
    clt_ptr act;   /* f32 [B][cap] */
    uint32_t n_tokens;
    uint32_t cap;
} CltSortParams;

/* One source layer's sparse codes and decoder, as the decode and backward kernels see it. */
typedef struct {
    clt_ptr count; /* const u32 [B] */
    clt_ptr feat;  /* const u32 [B][cap] */
    clt_ptr act;   /* const f32 [B][cap] */
    clt_ptr w_dec; /* const bf16 [F][row_len]: feature f's rows for target layers l, l+1, ... contiguous */
    uint32_t row_len;
    uint32_t cap; /* slots per token of this layer's lists */
} CltLayerView;

/* Sparse cross-layer decode fused with the residual: for token b and target layer k,
 * yhat = b_dec[k] + sum_{l <= k} sum_{active (b,l,f)} a * W_dec[l][f][k-l], r = scale * (yhat - y).
 * A launch covers the target layers first_layer .. first_layer + gridDim.y - 1 (a feature shard decodes its
 * partials a layer at a time, each summed over the shards while the next decodes). */
typedef struct {
    clt_ptr layers; /* const CltLayerView [L] (device array) */
    clt_ptr b_dec;  /* const f32 [L][d] */
    clt_ptr y;      /* const f32 [B][L][d], or 0 */
    clt_ptr yhat;   /* f32 out [B][L][d] ([L][B][d] with yhat_layer_major), or 0 */
    clt_ptr resid;  /* f32 out [B][L][d], or 0 (needs y) */
    clt_ptr sq_err; /* f32 out [B][L]: sum_i (yhat - y)^2, or 0 (needs y) */
    clt_ptr order;  /* u32 [L][B]: decode_order writes, for each target layer, the tokens by the length of
                     * their lists that it decodes, longest first; sparse_decode_tiled walks them in that
                     * order (0: in batch order) */
    uint32_t n_tokens;
    uint32_t n_layers;
    uint32_t d;
    uint32_t cross_layer; /* 1: layer l writes to l..L-1; 0: to l only */
    float resid_scale;
    uint32_t first_layer;      /* the first target layer of this launch */
    uint32_t yhat_layer_major; /* 1: yhat is [L][B][d], each target layer's block contiguous */
    uint32_t n_features;       /* F, rows of every layer's W_dec (sparse_decode_tiled stages their slices) */
} CltDecodeParams;

/* The residual of a reconstruction summed elsewhere (a feature shard's partials after the all-reduce): for
 * token b and layer k, r = scale * (yhat - y) and sq_err = sum_i (yhat - y)^2, as sparse_decode's epilogue. */
typedef struct {
    clt_ptr yhat;   /* const f32 [B][L][d] ([L][B][d] with yhat_layer_major) */
    clt_ptr y;      /* const f32 [B][L][d] */
    clt_ptr resid;  /* f32 out [B][L][d] */
    clt_ptr sq_err; /* f32 out [B][L] */
    uint32_t n_tokens;
    uint32_t n_layers;
    uint32_t d;
    float resid_scale;
    uint32_t yhat_layer_major;
    uint32_t pad0;
} CltResidualParams;

/* act_plan sorts a layer's tokens by list length, capped at the split, in this many bins: the split must stay
 * below it (the Rust side asserts that the largest act_grad_partial tiling keeps it there). */
#define CLT_ACT_PLAN_BINS 2048

/* dL/da at every listed entry of source layer l: proj = <r_b[l..], W_dec[l][f]>, and for active entries the
 * full pre-activation gradient ge = proj + tanh_scale * c * n_f * (1 - tanh(c a n_f)^2). act_grad_partial
 * writes the dot products' sums per range of columns into `partial` and act_grad_finish adds them, for the
 * slots below `split`; act_grad covers slots split..slot_end (all of them with split = 0, slot_end = cap). */
typedef struct {
    clt_ptr count;    /* const u32 [B] */
    clt_ptr feat;     /* const u32 [B][cap] */
    clt_ptr act;      /* const f32 [B][cap] */
    clt_ptr w_dec;    /* const bf16 [F][row_len] */
    clt_ptr norms;    /* const f32 [F] decoder norms */
    clt_ptr resid;    /* const f32 [B][L][d] */
    clt_ptr proj;     /* f32 out [B][cap] */
    clt_ptr ge;       /* f32 out [B][cap] (0 for inactive entries) */
    clt_ptr sparsity; /* f32 out [B][cap]: tanh(c a n_f) for active entries, 0 otherwise */
    uint32_t n_tokens;
    uint32_t cap;
    uint32_t row_len;
    uint32_t resid_offset; /* l * d */
    uint32_t resid_stride; /* L * d */
    float c;
    float tanh_scale;
    uint32_t n_features;  /* act_grad_partial: features whose slices it stages */
    clt_ptr partial;      /* f32 [B][cap][n_ranges]: act_grad_partial's sums per range of columns */
    clt_ptr plan;         /* u32 [2 + 2 * ceil(B / 32) + B]: act_plan's tiles for act_grad_partial (backward.cu) */
    uint32_t accumulators; /* act_plan, act_grad_partial: f32 accumulators in a block's shared memory */
    uint32_t n_ranges;    /* act_grad_partial: ranges of 512 columns in a row */
    uint32_t feature_chunk; /* act_grad_partial: features whose slices it stages at a time (<= 2048) */
    uint32_t split;    /* slots below it: act_grad_partial / act_grad_finish; act_grad: slots split..slot_end */
    uint32_t slot_end; /* act_grad: one past the last slot it covers (cap, or the longest list) */
    uint32_t pad0;
} CltActGradParams;

/* Grouping of the (token, slot) entries of one layer by feature: CSR by counting, scanning, filling and
 * sorting each feature's segment by entry index (token order). */
typedef struct {
    clt_ptr count;    /* const u32 [B] entries per token */
    clt_ptr feat;     /* const u32 [B][cap] */
    clt_ptr fcount;   /* u32 [F + 1]: zeroed, then counts, then (scan) exclusive starts */
    clt_ptr cursor;   /* u32 [F]: zeroed; fill cursor */
    clt_ptr unsorted; /* u32 [nnz]: entry ids b*cap + s grouped by feature, unordered within a feature */
    clt_ptr order;    /* u32 out [nnz]: the same, in increasing entry id within each feature */
    clt_ptr by_length; /* u32 out [F]: the features, longest segment first (feature_order) */
    uint32_t n_tokens;
    uint32_t cap;
    uint32_t n_features;
    uint32_t pad0;
} CltCsrParams;

/* Per-feature gradients of one layer (one block per feature, no atomics): encoder row and bias, decoder row
 * data term, threshold, decoder-norm coefficient. Mirrors the per-feature loop of cpu::sparse::loss_and_grad
 * with every block in BlockMode::Near. */
typedef struct {
    clt_ptr order;      /* const u32 [nnz] entry ids grouped by feature (CSR) */
    clt_ptr fstart;     /* const u32 [F + 1] */
    clt_ptr act;        /* const f32 [B][cap] */
    clt_ptr pre;        /* const f32 [B][cap] */
    clt_ptr proj;       /* const f32 [B][cap] */
    clt_ptr ge;         /* const f32 [B][cap] */
    clt_ptr x;          /* const f32: token b's layer input at x + b*x_stride (layer offset applied) */
    clt_ptr resid;      /* const f32: token b's residual rows l.. at resid + b*resid_stride (offset applied) */
    clt_ptr xsum;       /* const f32 [d]: sum over the batch of x (the pre-activation term) */
    clt_ptr norms;      /* const f32 [F] */
    clt_ptr theta;      /* const f32 [F] */
    clt_ptr preact_sum; /* const f32 [F] */
    clt_ptr near_count; /* const u32 [F] */
    clt_ptr near_h;     /* const f32 [F] */
    clt_ptr preact_mask; /* const u8 [F] or 0 (all on) */
    clt_ptr g_w_enc;    /* f32 out [F][d], or 0 where row_grad_tiled writes it */
    clt_ptr g_w_dec;    /* f32 out [F][row_len] (data term; zero rows where no entry is active), or 0 where
                         * row_grad_tiled writes it */
    clt_ptr g_b_enc;    /* f32 out [F] */
    clt_ptr g_log_theta; /* f32 out [F] */
    clt_ptr dec_coef;   /* f32 out [F] */
    clt_ptr touched;    /* u8 out [F] */
    clt_ptr active_count; /* u32 out [F] */
    clt_ptr feat_sparsity; /* f32 out [F]: sum of tanh(c a n_f) over the feature's active entries */
    uint32_t n_tokens;
    uint32_t d;
    uint32_t row_len;
    uint32_t x_stride;
    uint32_t resid_stride;
    uint32_t jump;   /* JumpReLU (threshold gradient and pre-activation loss) */
    uint32_t by_h;   /* ThresholdGrad::Preact */
    float c;
    float tanh_scale;   /* lambda / B */
    float pre_scale;    /* lambda_preact / B */
    float half_bandwidth;
    float bandwidth;
    uint32_t cap; /* entry id e = b * cap + slot */
    uint32_t pad0;
} CltFeatureGradParams;

/* One layer's encoder or decoder rows' gradient, tiled (row_grad_tiled): out[f][c] = sum over f's active
 * entries, in token order, of coef(e) * src[b][c], the same sums as feature_grads' vector part. Decoder rows:
 * coef = a, src = the residual rows l... Encoder rows: coef = ge + kappa_f, src = the layer's inputs, then
 * out -= kappa_f * xsum[c] where kappa_f != 0 (kappa_f = pre_scale * norms[f] where the pre-activation loss
 * is on for f). A block owns 2,048 features x 8 columns and stages the rows' 8 columns of 2,048 tokens at a
 * time in shared memory. */
typedef struct {
    clt_ptr order;       /* const u32 [nnz] entry ids grouped by feature, token order within a feature (CSR) */
    clt_ptr fstart;      /* const u32 [F + 1] */
    clt_ptr act;         /* const f32 [B][cap] */
    clt_ptr ge;          /* const f32 [B][cap] (encoder rows; else unused) */
    clt_ptr src;         /* const f32: token b's row at src + b*src_stride (offset applied) */
    clt_ptr xsum;        /* const f32 [row_len] (encoder rows) */
    clt_ptr norms;       /* const f32 [F] (encoder rows) */
    clt_ptr preact_mask; /* const u8 [F] or 0 (all on) (encoder rows) */
    clt_ptr out;         /* f32 out [F][row_len] */
    clt_ptr by_length;   /* const u32 [F]: the features, longest segment first (feature_order) */
    uint32_t n_tokens;
    uint32_t n_features;
    uint32_t row_len;    /* a multiple of 8; src and src_stride 16-byte aligned */
    uint32_t src_stride;
    uint32_t cap;        /* entry id e = b * cap + slot */
    uint32_t encoder;    /* 1: encoder rows; 0: decoder rows */
    uint32_t jump;       /* JumpReLU (the pre-activation loss applies) */
    float pre_scale;     /* lambda_preact / B */
} CltRowGradParams;

/* Column sums over tokens: out[j] = sum_b src[b*stride + j], j < n, in token order (f64 accumulation). */
typedef struct {
    clt_ptr src; /* const f32 (offset applied) */
    clt_ptr out; /* f32 out [n] */
    uint32_t n_tokens;
    uint32_t n;
    uint32_t stride;
    uint32_t pad0;
} CltColSumParams;

/* Per-row top-k (ties to the lower index) with a ReLU, into ELL lists in increasing feature order. */
typedef struct {
    clt_ptr dense; /* const f32 [B][F] */
    clt_ptr count; /* u32 out [B] */
    clt_ptr feat;  /* u32 out [B][cap] */
    clt_ptr pre;   /* f32 out [B][cap] */
    clt_ptr act;   /* f32 out [B][cap] */
    uint32_t n_tokens;
    uint32_t n_features;
    uint32_t k;
    uint32_t cap;
} CltTopkParams;

/* BatchTopK over n values (all layers' dense pre-activations back to back): radix histogram of the keys that
 * match `prefix` on the bits above `shift + 8`, then selection of keys > kth and of the first `ties` keys equal
 * to it, in index order (block tie offsets from a host scan of per-block tie counts). */
typedef struct {
    clt_ptr values;     /* const f32 [n] */
    clt_ptr hist;       /* u32 out [256] (zeroed) */
    clt_ptr block_ties; /* u32 [n_blocks]: ties per block (count pass), exclusive offsets (select pass) */
    clt_ptr mask;       /* u8 out [n]: 1 where selected and > 0 */
    uint64_t n;
    uint32_t prefix;    /* key bits above shift + 8 */
    uint32_t shift;     /* 24, 16, 8, 0 */
    uint32_t kth;       /* the k-th largest key (select / tie passes) */
    uint32_t ties;      /* how many keys equal to kth are selected */
} CltBatchTopkParams;

/* Dense to ELL compaction of a mask (BatchTopK's selection): token b's selected features in order. */
typedef struct {
    clt_ptr dense; /* const f32 [B][F] */
    clt_ptr mask;  /* const u8 [B][F] */
    clt_ptr count; /* u32 out [B] */
    clt_ptr feat;  /* u32 out [B][cap] */
    clt_ptr pre;   /* f32 out [B][cap] */
    clt_ptr act;   /* f32 out [B][cap] */
    uint32_t n_tokens;
    uint32_t n_features;
    uint32_t cap;
    uint32_t pad0;
} CltCompactParams;

/* Adam (PyTorch conventions) with the clipping factor folded into `scale`. */
typedef struct {
    float lr;
    float scale;
    float beta1;
    float beta2;
    float eps;
    float bc1;      /* 1 - beta1^t */
    float bc2_sqrt; /* sqrt(1 - beta2^t) */
    uint32_t pad0;
} CltAdamConsts;

typedef struct {
    clt_ptr p; /* f32 [n] */
    clt_ptr m;
    clt_ptr v;
    clt_ptr g; /* const f32 [n] */
    uint64_t n;
    CltAdamConsts k;
} CltAdamParams;

/* The decoder's fused update: g = touched_f * gs + coef_f * p per row, Adam, bf16 copy, new row norm. */
typedef struct {
    clt_ptr p;       /* f32 [F][row_len] */
    clt_ptr m;
    clt_ptr v;
    clt_ptr gs;      /* const f32 [F][row_len] data term */
    clt_ptr coef;    /* const f32 [F] */
    clt_ptr touched; /* const u8 [F] */
    clt_ptr p_bf16;  /* bf16 out [F][row_len], or 0 */
    clt_ptr norms;   /* f32 out [F] */
    uint32_t n_features;
    uint32_t row_len;
    CltAdamConsts k;
} CltAdamDecoderParams;

/* Row norms of a [rows][row_len] f32 matrix (the decoder norms), and optionally its bf16 copy. */
typedef struct {
    clt_ptr w;      /* const f32 [rows][row_len] */
    clt_ptr norms;  /* f32 out [rows] */
    clt_ptr w_bf16; /* bf16 out, or 0 */
    uint32_t rows;
    uint32_t row_len;
} CltRowNormParams;

/* Sum of squares in per-block partials (the clipping norm); the decoder's rows with their norm terms. */
typedef struct {
    clt_ptr x;        /* const f32 [n] */
    clt_ptr partial;  /* f64 out [gridDim.x] */
    uint64_t n;
} CltSumSqParams;

/* Gradients to and from one packed f32 buffer (the device all-reduce of data-parallel and grid training):
 * n elements of a tensor of kind 0 (f32, packed times scale), 1 (u8 flags: 0/1, unpacked as > 0) or
 * 2 (u32 counts, exact below 2^24), at packed[0..n]. */
typedef struct {
    clt_ptr tensor; /* f32, u8 or u32 [n] */
    clt_ptr packed; /* f32 [n] */
    uint64_t n;
    uint32_t kind;
    uint32_t unpack; /* 0: tensor -> packed; 1: packed -> tensor */
    float scale;
    uint32_t pad0;
} CltPackParams;

typedef struct {
    clt_ptr gs;      /* const f32 [F][row_len] */
    clt_ptr w;       /* const f32 [F][row_len] */
    clt_ptr coef;    /* const f32 [F] */
    clt_ptr touched; /* const u8 [F] */
    clt_ptr out;     /* f64 out [F]: ||g_f||^2 */
    uint32_t n_features;
    uint32_t row_len;
} CltDecGradSqParams;

/* The resident trainer (src/backend/cuda/resident.rs): the sum of a buffer of f64 partials in index order by
 * one block (the clipping norm's squared total, so only one scalar comes back), and exp of the log
 * thresholds after Adam (theta = exp(log theta), the kernels' threshold copy). */
typedef struct {
    clt_ptr x;   /* const f64 [n] */
    clt_ptr out; /* f64 out [1] */
    uint64_t n;
} CltSumF64Params;

typedef struct {
    clt_ptr src; /* const f32 [n] */
    clt_ptr dst; /* f32 out [n]: expf(src) */
    uint64_t n;
} CltExpParams;

/* Dequantisation of an activation-store section (src/store/codec.rs): int8 / int4 rows with one f32 absmax
 * scale per row (all scales first, then the codes; int4 two codes per byte, low nibble first, offset by 8). */
#define CLT_CODEC_INT8 0u
#define CLT_CODEC_INT4 1u
typedef struct {
    clt_ptr section; /* const u8: the whole encoded section */
    clt_ptr out;     /* f32 out [n_rows][d] */
    clt_ptr out_bf16; /* bf16 out [n_rows][d], or 0 */
    uint32_t rows;   /* rows in the section (scales come first) */
    uint32_t d;
    uint32_t r0;     /* first row to decode */
    uint32_t n_rows;
    uint32_t codec;
    uint32_t layers; /* rows per token (row r is layer r % layers), with layer_scale */
    clt_ptr layer_scale; /* const f32 [layers]: every value of row r multiplied by layer_scale[r % layers]
                          * after dequantisation (the trainer's normalisation), or 0 */
} CltDequantParams;

/* f32 -> bf16 conversion (round to nearest even), for inputs and weights; with `lo`, also the rounding's
 * remainder, so that hi + lo carries about 16 bits of the f32 (a GEMM on both is close to an f32 one). */
typedef struct {
    clt_ptr src; /* const f32 [n] */
    clt_ptr dst; /* bf16 out [n]: hi = bf16(src) */
    uint64_t n;
    clt_ptr lo;  /* bf16 out [n]: bf16(src - hi), or 0 */
} CltToBf16Params;

/* The dense baseline (dense.cu; the cuBLAS step a dense trainer runs, timed against the sparse step). */

/* JumpReLU over dense pre-activations, with the sparsity and pre-activation loss sums. */
typedef struct {
    clt_ptr h;      /* f32 [B][F]; in: x W^T (cuBLAS, no bias), out: h = x W^T + b */
    clt_ptr bias;   /* const f32 [F] */
    clt_ptr theta;  /* const f32 [F] */
    clt_ptr norms;  /* const f32 [F]: decoder norms */
    clt_ptr act_bf; /* bf16 out [B][F]: a = h if h > theta else 0 */
    clt_ptr part;   /* f64 out [gridDim.x][2]: per block, sum of tanh(c a n) over active entries and of
                     * relu(theta - h) n over all */
    uint64_t n;     /* B * F */
    uint32_t n_features;
    float c;
} CltDenseActParams;

/* The residual of the dense decode, with the squared-error sum. */
typedef struct {
    clt_ptr yhat;  /* f32 [B][row]; in: the decoders' sum without bias, out: r = scale (yhat + b_dec - y) */
    clt_ptr b_dec; /* const f32 [row] */
    clt_ptr y;     /* const f32 [B][row] */
    clt_ptr r_bf;  /* bf16 out [B][row]: r */
    clt_ptr part;  /* f64 out [gridDim.x]: per block, sum of (yhat + b_dec - y)^2 */
    uint64_t n;    /* B * row */
    uint32_t row;
    float scale;
} CltDenseResidParams;

/* The backward of the dense JumpReLU and its loss terms (rectangle-kernel straight-through threshold). */
typedef struct {
    clt_ptr h;      /* f32 [B][F]; in: pre-activations, out: per-entry d loss / d log theta */
    clt_ptr da;     /* f32 [B][F]; in: d loss / d a from the decoder, out: d loss / d h */
    clt_ptr dh_bf;  /* bf16 out [B][F]: d loss / d h */
    clt_ptr theta;  /* const f32 [F] */
    clt_ptr norms;  /* const f32 [F] */
    uint64_t n;     /* B * F */
    uint32_t n_features;
    float c;
    float lambda_b;  /* lambda / B */
    float lambda_pb; /* lambda_preact / B */
    float bandwidth;
    uint32_t pad0;
} CltDenseActBackParams;

#endif

//! The sparse backward pass of one source layer: activation gradients at listed entries, the grouping of
//! entries by feature (CSR by count, scan, fill and a per-feature sort: no float atomics), and the
//! per-feature gradients (encoder row and bias, decoder row data term, threshold, decoder-norm coefficient),
//! the encoder and decoder rows optionally tiled ([`row_grad_tiled`]).
//!
//! CPU reference: the per-layer loop of [`crate::backend::cpu::sparse::loss_and_grad`] with every encoder
//! block in `BlockMode::Near`.

use super::context::{Gpu, Module, grid_1d, per_item};
use super::encode::{DeviceCodes, WindowStats};
use super::ffi::{
    CLT_ACT_PLAN_BINS, CltActGradParams, CltColSumParams, CltCsrParams, CltFeatureGradParams,
    CltRowGradParams,
};
use super::memory::DBuf;
use crate::backend::grads::{Objective, ThresholdGrad};
use crate::backend::{ActBlocks, SparseKernels};
use crate::{Error, Result};
use cudarc::driver::LaunchConfig;

/// Inputs of one layer's backward pass.
pub struct LayerGradInput<'a> {
    pub codes: &'a DeviceCodes,
    pub window: &'a WindowStats,
    /// bf16 `[F][row_len]`.
    pub w_dec: &'a DBuf<u16>,
    pub row_len: usize,
    pub n_features: usize,
    /// Decoder norms `[F]` and thresholds `exp(log θ)` `[F]`.
    pub norms: &'a DBuf<f32>,
    pub theta: &'a DBuf<f32>,
    /// f32 inputs and residuals `[B][L][d]`; this layer is `layer`.
    pub x: &'a DBuf<f32>,
    pub resid: &'a DBuf<f32>,
    pub layer: usize,
    pub n_layers: usize,
    pub d: usize,
    /// `[F]` (1 = pre-activation loss on), or none for all on.
    pub preact_mask: Option<&'a DBuf<u8>>,
    pub obj: Objective,
    /// JumpReLU (threshold gradient and pre-activation loss).
    pub jump: bool,
}

/// One layer's gradients (see [`crate::backend::Grads`] for the decoder's two-part form).
pub struct LayerGrads {
    pub w_enc: DBuf<f32>,
    pub w_dec: DBuf<f32>,
    pub b_enc: DBuf<f32>,
    pub log_theta: DBuf<f32>,
    pub dec_coef: DBuf<f32>,
    pub touched: DBuf<u8>,
    pub active_count: DBuf<u32>,
    /// Per feature, `Σ tanh(c · a · ‖W_dec‖)` over its active entries (the sparsity loss before λ/B).
    pub sparsity: DBuf<f32>,
}

/// Column sums over tokens, `out[j] = Σ_b src[offset + b·stride + j]` for `j < n` (token order, f64).
pub fn col_sum(
    gpu: &Gpu,
    src: &DBuf<f32>,
    offset: usize,
    stride: usize,
    n_tokens: usize,
    n: usize,
) -> Result<DBuf<f32>> {
    let out = gpu.output::<f32>(n)?;
    let p = CltColSumParams {
        src: src.ptr(gpu) + 4 * offset as u64,
        out: out.ptr(gpu),
        n_tokens: n_tokens as u32,
        n: n as u32,
        stride: stride as u32,
        pad0: 0,
    };
    gpu.launch(Module::Backward, "col_sum", grid_1d(n, 256), &p)?;
    Ok(out)
}

/// Entries grouped by feature: `order[fstart[f]..fstart[f + 1]]` are feature f's entry ids `b·cap + slot`,
/// in increasing order; `by_length`, the features by their segments' lengths, longest first (in buckets
/// of lengths within 1/8 of each other: `feature_order`), which `row_grad_tiled` walks in.
pub struct Csr {
    pub fstart: DBuf<u32>,
    pub order: DBuf<u32>,
    pub by_length: DBuf<u32>,
}

/// Groups a layer's entries by feature.
pub fn group_by_feature(gpu: &Gpu, codes: &DeviceCodes, n_features: usize) -> Result<Csr> {
    let slots = codes.n_tokens * codes.cap;
    let fstart = gpu.zeros::<u32>(n_features + 1)?;
    let cursor = gpu.zeros::<u32>(n_features)?;
    let unsorted = gpu.zeros::<u32>(slots)?;
    let order = gpu.zeros::<u32>(slots)?;
    let by_length = gpu.output::<u32>(n_features)?; // (every entry written: poisoned in tests)
    let p = CltCsrParams {
        count: codes.count.ptr(gpu),
        feat: codes.feat.ptr(gpu),
        fcount: fstart.ptr(gpu),
        cursor: cursor.ptr(gpu),
        unsorted: unsorted.ptr(gpu),
        order: order.ptr(gpu),
        by_length: by_length.ptr(gpu),
        n_tokens: codes.n_tokens as u32,
        cap: codes.cap as u32,
        n_features: n_features as u32,
        pad0: 0,
    };
    gpu.launch(Module::Backward, "csr_count", grid_1d(slots, 256), &p)?;
    gpu.launch(Module::Backward, "csr_scan", per_item(1, 1024), &p)?;
    gpu.launch(Module::Backward, "csr_fill", grid_1d(slots, 256), &p)?;
    gpu.launch(Module::Backward, "csr_sort", per_item(n_features, 256), &p)?;
    gpu.launch(Module::Backward, "feature_order", per_item(1, 256), &p)?;
    // `cursor` and `unsorted` are freed on return: in stream order, after the kernels above (no sync).
    Ok(Csr {
        fstart,
        order,
        by_length,
    })
}

/// `act_grad_partial`: columns a block covers (one partial sum per entry and range).
const ACT_RANGE: usize = 512;

/// How `act_grad_partial` divides its shared memory: `accumulators` f32 for its tile of tokens' entries
/// and the 32-byte slices of `feature_chunk` features staged at a time, in each of two buffers (one is
/// filled while the other is read). A tile is up to 16 groups of 32 consecutive tokens; a group takes 32
/// accumulators for each entry of its longest list (at most [`ActTiling::split`] entries), so the tiles
/// follow their own lists ([`act_plan`]). The default, 128 KB + 2 × 32 KB, makes the largest tiles (the
/// fewest fetches of the decoder) with one block an SM; smaller settings let two or three blocks share an
/// SM. Which is faster is the GPU's to say (`clt bench --cuda` times several).
///
/// `tail`: at most one token in `tail` may list more entries than the split; `act_grad` (a warp per entry)
/// takes their entries past it, so that a few long lists (a sequence's first token, say) do not swell
/// their groups' accumulators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActTiling {
    pub accumulators: usize,
    pub feature_chunk: usize,
    pub tail: usize,
}

impl Default for ActTiling {
    fn default() -> Self {
        ActTiling {
            accumulators: 32 * 1024,
            feature_chunk: 1024,
            tail: 1024,
        }
    }
}

/// Groups of 32 tokens an `act_grad_partial` tile holds at most (its 256 threads own 2 tokens each).
pub const ACT_TILE_GROUPS: usize = 16;

// The split is at most `accumulators / 32` ([`ActTiling::max_rows`]), and `check` keeps the accumulators
// within 227 KB: so the split stays below the lengths `act_plan` sorts by.
const _: () = assert!(227 * 1024 / 4 / 32 < CLT_ACT_PLAN_BINS as usize);

impl ActTiling {
    /// The division `[train] act_blocks` names (`auto`: the default, until the trainer has timed the
    /// others).
    pub fn for_blocks(blocks: ActBlocks) -> Self {
        match blocks {
            ActBlocks::One | ActBlocks::Auto => ActTiling::default(),
            ActBlocks::Two => ActTiling {
                accumulators: 12 * 1024,
                feature_chunk: 1024,
                ..Default::default()
            },
            ActBlocks::Three => ActTiling {
                accumulators: 8 * 1024,
                feature_chunk: 512,
                ..Default::default()
            },
        }
    }

    /// The shared memory a block takes with `n_features` features.
    pub fn shared_bytes(&self, n_features: usize) -> usize {
        2 * 32 * n_features.clamp(1, self.feature_chunk) + 4 * self.accumulators
    }

    /// The most entries a token can get accumulators for: a whole group of 32 such lists fills a tile.
    pub fn max_rows(&self) -> usize {
        (self.accumulators / 32).max(1)
    }

    /// The accumulators a token gets in `act_grad_partial` (its first `split` entries; the kernels'
    /// `split`): [`ActTiling::rows_for`] the list lengths where they were measured
    /// ([`DeviceCodes::lengths`]), else the longest list; at most [`ActTiling::max_rows`].
    pub fn split(&self, codes: &DeviceCodes) -> usize {
        let longest = codes.longest.min(codes.cap);
        let rows = if codes.lengths.len() == longest + 1 {
            self.rows_for(&codes.lengths)
        } else {
            longest.max(1)
        };
        rows.min(self.max_rows())
    }

    /// For `lengths[n]` tokens of `n` entries each (`n` up to the longest list, `lengths.len() - 1`): the
    /// fewest rows that the lists of at most one token in `tail` exceed. At least 1.
    pub fn rows_for(&self, lengths: &[usize]) -> usize {
        let n_tokens: usize = lengths.iter().sum();
        let allowed = n_tokens / self.tail.max(1);
        // `longer`: tokens whose lists are longer than `rows`.
        let (mut rows, mut longer) = (lengths.len().saturating_sub(1), 0);
        while rows > 1 && longer + lengths[rows] <= allowed {
            longer += lengths[rows];
            rows -= 1;
        }
        rows.max(1)
    }

    /// The most tiles [`act_plan`] can make of `n_tokens` tokens at `split` (the grid of
    /// `act_grad_partial`): every tile but the last holds at least the groups of `split`-entry lists that
    /// fit, since the packing closes a tile only when the next group does not fit.
    pub fn tiles_bound(&self, n_tokens: usize, split: usize) -> usize {
        let fit = (self.accumulators / (32 * split.max(1))).clamp(1, ACT_TILE_GROUPS);
        n_tokens.div_ceil(32).div_ceil(fit)
    }

    /// [`act_plan`] on the host, from each token's list length: (each tile's first group, then the number
    /// of groups; each group's offset in its tile's accumulators). The tests' reference. (The order of the
    /// tokens is the kernel's own within a length; the tiles depend only on the sorted lengths.)
    pub fn plan_host(&self, counts: &[u32], cap: usize, split: usize) -> (Vec<u32>, Vec<u32>) {
        let limit = cap.min(split);
        let mut sorted: Vec<usize> = counts.iter().map(|&c| (c as usize).min(limit)).collect();
        sorted.sort_unstable();
        let (mut starts, mut offsets) = (Vec::new(), Vec::new());
        let (mut used, mut in_tile) = (0usize, 0usize);
        for (g, group) in sorted.chunks(32).enumerate() {
            let rows = group[group.len() - 1];
            if g == 0 || used + 32 * rows > self.accumulators || in_tile == ACT_TILE_GROUPS {
                starts.push(g as u32);
                used = 0;
                in_tile = 0;
            }
            offsets.push(used as u32);
            used += 32 * rows;
            in_tile += 1;
        }
        starts.push(counts.len().div_ceil(32) as u32);
        (starts, offsets)
    }

    /// Refuses a setting the kernel cannot run: fewer accumulators than a group of one-entry lists (32), a
    /// feature chunk outside 1..=2,048, or more than 227 KB of shared memory.
    pub fn check(&self) -> Result<()> {
        if self.accumulators < 32
            || self.tail == 0
            || !(1..=2048).contains(&self.feature_chunk)
            || self.shared_bytes(self.feature_chunk) > 227 * 1024
        {
            return Err(Error::Unsupported(format!(
                "act_grad_partial tiling {self:?}: needs at least 32 accumulators, tail > 0, a feature chunk \
                 of 1 to 2,048 and at most 227 KB of shared memory"
            )));
        }
        Ok(())
    }
}

/// `act_plan`'s tiles of one layer's lists on the device (`plan`, as backward.cu describes it) and the
/// grid `act_grad_partial` is launched with (at least the tiles).
pub struct ActPlan {
    pub plan: DBuf<u32>,
    pub grid: usize,
    n_groups: usize,
}

impl ActPlan {
    /// The plan read back: (each tile's first group, then the number of groups; each group's offset, as
    /// [`ActTiling::plan_host`] gives them; the tokens in the kernel's order).
    pub fn to_host(&self, gpu: &Gpu) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>)> {
        let v = gpu.download(&self.plan)?;
        let (tiles, g) = (v[0] as usize, self.n_groups);
        if tiles > self.grid {
            return Err(Error::Cuda {
                what: "act_plan".into(),
                reason: format!("{tiles} tiles, more than the grid of {}", self.grid),
            });
        }
        Ok((
            v[1..2 + tiles].to_vec(),
            v[2 + g..2 + 2 * g].to_vec(),
            v[2 + 2 * g..].to_vec(),
        ))
    }
}

/// Packs one layer's lists (`codes`) into `act_grad_partial`'s tiles with `tiling` and `split` entries a
/// token at most (the `act_plan` kernel, queued; no read-back).
pub fn act_plan(
    gpu: &Gpu,
    codes: &DeviceCodes,
    tiling: &ActTiling,
    split: usize,
) -> Result<ActPlan> {
    let n_groups = codes.n_tokens.div_ceil(32);
    // Every entry act_grad_partial reads is written (poisoned in tests; entries past the last tile's start
    // are neither).
    let plan = gpu.output::<u32>(2 + 2 * n_groups + codes.n_tokens)?;
    let p = CltActGradParams {
        count: codes.count.ptr(gpu),
        plan: plan.ptr(gpu),
        n_tokens: codes.n_tokens as u32,
        cap: codes.cap as u32,
        accumulators: tiling.accumulators as u32,
        split: split as u32,
        ..Default::default()
    };
    gpu.launch(Module::Backward, "act_plan", per_item(1, 256), &p)?;
    Ok(ActPlan {
        plan,
        grid: tiling.tiles_bound(codes.n_tokens, split),
        n_groups,
    })
}

/// Features a block of `row_grad_tiled` owns, and tokens whose row slices it stages at a time.
pub const RG_TILE_FEATURES: usize = 1024;
pub const RG_TILE_TOKENS: usize = 1024;

/// Rows of f32 per token: token b's row starts at element `offset + b·stride` of `buf`.
pub struct TokenRows<'a> {
    pub buf: &'a DBuf<f32>,
    pub offset: usize,
    pub stride: usize,
}

/// Which rows' gradient [`row_grad_tiled`] computes.
pub enum RowTerm<'a> {
    /// The decoder rows' data term: each active entry's activation times the token's residual rows.
    Decoder,
    /// The encoder rows: each active entry's `∂L/∂h + κ_f` times the token's input, then `− κ_f Σ_b x_b`,
    /// with `κ_f = pre_scale · ‖W_dec[f]‖` where the pre-activation loss is on for f (JumpReLU, `mask`).
    Encoder {
        /// `∂L/∂h` per listed entry `[B][cap]` (`act_grad`'s `ge`).
        ge: &'a DBuf<f32>,
        /// `Σ_b x_b` over the row's columns.
        xsum: &'a DBuf<f32>,
        norms: &'a DBuf<f32>,
        preact_mask: Option<&'a DBuf<u8>>,
        pre_scale: f32,
        jump: bool,
    },
}

/// One layer's encoder or decoder rows' gradient, `out[f][c] = Σ coef · rows_b[c]` over feature f's
/// active entries in token order (`feature_grads`' own sums, the same bits), through `row_grad_tiled`: a
/// block owns 1,024 features × 8 columns and stages the rows' 8 columns of 1,024 tokens at a time in
/// shared memory (two buffers: one is filled while the other is read), so a row slice is fetched once
/// per 1,024 features instead of once per active entry (docs/cuda.md, "What the tiled kernels fetch").
/// Needs `row_len` a multiple of 8 and the rows 16-byte aligned (offset and stride multiples of 4).
pub fn row_grad_tiled(
    gpu: &Gpu,
    codes: &DeviceCodes,
    csr: &Csr,
    rows: &TokenRows,
    row_len: usize,
    term: &RowTerm,
    out: &DBuf<f32>,
) -> Result<()> {
    let f_n = csr.fstart.len().saturating_sub(1);
    let b_n = codes.n_tokens;
    if !row_len.is_multiple_of(8)
        || !rows.offset.is_multiple_of(4)
        || !rows.stride.is_multiple_of(4)
    {
        return Err(Error::Unsupported(format!(
            "the tiled row gradient needs rows of a multiple of 8 (got {row_len}) at 16-byte aligned \
             offsets (offset {}, stride {})",
            rows.offset, rows.stride
        )));
    }
    let rows_end = b_n
        .checked_sub(1)
        .map_or(0, |last| rows.offset + last * rows.stride + row_len);
    if out.len() != f_n * row_len || rows.buf.len() < rows_end || row_len > rows.stride {
        return Err(Error::Shape {
            what: "CUDA tiled row gradient (output, row elements, row length)".into(),
            expected: vec![f_n * row_len, rows_end, rows.stride],
            got: vec![out.len(), rows.buf.len(), row_len],
        });
    }
    if let RowTerm::Encoder {
        ge,
        xsum,
        norms,
        preact_mask,
        ..
    } = term
    {
        let mask_len = preact_mask.map_or(f_n, |m| m.len());
        if ge.len() != b_n * codes.cap
            || xsum.len() != row_len
            || norms.len() != f_n
            || mask_len != f_n
        {
            return Err(Error::Shape {
                what: "CUDA tiled encoder-row gradient (ge, xsum, norms, mask)".into(),
                expected: vec![b_n * codes.cap, row_len, f_n, f_n],
                got: vec![ge.len(), xsum.len(), norms.len(), mask_len],
            });
        }
    }
    if f_n * row_len == 0 {
        return Ok(());
    }
    let mut p = CltRowGradParams {
        order: csr.order.ptr(gpu),
        fstart: csr.fstart.ptr(gpu),
        act: codes.act.ptr(gpu),
        ge: 0,
        src: rows.buf.ptr(gpu) + 4 * rows.offset as u64,
        xsum: 0,
        norms: 0,
        preact_mask: 0,
        out: out.ptr(gpu),
        by_length: csr.by_length.ptr(gpu),
        n_tokens: b_n as u32,
        n_features: f_n as u32,
        row_len: row_len as u32,
        src_stride: rows.stride as u32,
        cap: codes.cap as u32,
        encoder: 0,
        jump: 0,
        pre_scale: 0.0,
    };
    if let RowTerm::Encoder {
        ge,
        xsum,
        norms,
        preact_mask,
        pre_scale,
        jump,
    } = term
    {
        p.ge = ge.ptr(gpu);
        p.xsum = xsum.ptr(gpu);
        p.norms = norms.ptr(gpu);
        p.preact_mask = preact_mask.map_or(0, |m| m.ptr(gpu));
        p.encoder = 1;
        p.jump = *jump as u32;
        p.pre_scale = *pre_scale;
    }
    let cfg = LaunchConfig {
        grid_dim: (
            (row_len / 8) as u32,
            f_n.div_ceil(RG_TILE_FEATURES) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: (2 * 32 * b_n.clamp(1, RG_TILE_TOKENS)) as u32,
    };
    gpu.launch(Module::Backward, "row_grad_tiled", cfg, &p)
}

/// One layer's gradients. Where the device's [`SparseKernels`] are the tiled ones and d is a multiple of 8,
/// the encoder rows and decoder rows' data term come from [`row_grad_tiled`] (the same bits as
/// `feature_grads`), and the activation gradients from `act_grad_partial` and `act_grad_finish` (each
/// decoder row staged once per tile of up to 512 tokens; the same sums in another order, so within f32
/// rounding of the gather's) where the row is a multiple of 16 columns, else from `act_grad_tiled` (a
/// block per token, its residual row staged once for all its entries; the same bits). Otherwise
/// `act_grad` (a warp per entry) and `feature_grads`.
pub fn layer_grads(gpu: &Gpu, inp: &LayerGradInput) -> Result<LayerGrads> {
    let (codes, d, rl, f_n) = (inp.codes, inp.d, inp.row_len, inp.n_features);
    let (b_n, cap) = (codes.n_tokens, codes.cap);
    let row = inp.n_layers * d;
    let slots = b_n * cap;
    let bf = b_n.max(1) as f32;
    let obj = &inp.obj;
    let tiled = gpu.sparse_kernels() == SparseKernels::Tiled && super::decode::tiled_applies(d);
    // The decoder rows staged per tile of tokens (act_grad_partial) where rows are whole 16-column steps.
    let partial = tiled && rl.is_multiple_of(16) && slots > 0;
    // 1. ∂L/∂a at every listed entry.
    let proj = gpu.zeros::<f32>(slots)?;
    let ge = gpu.zeros::<f32>(slots)?;
    let spars = gpu.zeros::<f32>(slots)?;
    let ap = CltActGradParams {
        count: codes.count.ptr(gpu),
        feat: codes.feat.ptr(gpu),
        act: codes.act.ptr(gpu),
        w_dec: inp.w_dec.ptr(gpu),
        norms: inp.norms.ptr(gpu),
        resid: inp.resid.ptr(gpu),
        proj: proj.ptr(gpu),
        ge: ge.ptr(gpu),
        sparsity: spars.ptr(gpu),
        n_tokens: b_n as u32,
        cap: cap as u32,
        row_len: rl as u32,
        resid_offset: (inp.layer * d) as u32,
        resid_stride: row as u32,
        c: obj.c,
        tanh_scale: obj.lambda / bf,
        n_features: f_n as u32,
        partial: 0,
        plan: 0,
        accumulators: 0,
        n_ranges: 0,
        feature_chunk: 0,
        split: 0,
        slot_end: cap as u32,
        pad0: 0,
    };
    if partial {
        // Tiles of up to 16 groups of 32 tokens, each group's accumulators (rows for its longest list,
        // capped at `split`) in shared memory (act_plan). The entries past `split` of the few longer lists:
        // act_grad, a warp each.
        let tiling = gpu.act_tiling();
        let longest = codes.longest.min(cap);
        let split = tiling.split(codes);
        let ranges = rl.div_ceil(ACT_RANGE);
        // Every listed entry's ranges are written before they are read (poisoned in tests); freed at the
        // end of this block, in stream order, after the kernels (no sync); so is the plan.
        let partial_sums = gpu.output::<f32>(slots * ranges)?;
        let ap = CltActGradParams {
            partial: partial_sums.ptr(gpu),
            accumulators: tiling.accumulators as u32,
            n_ranges: ranges as u32,
            feature_chunk: tiling.feature_chunk as u32,
            split: split as u32,
            slot_end: longest as u32,
            ..ap
        };
        let plan = act_plan(gpu, codes, &tiling, split)?;
        let ap = CltActGradParams {
            plan: plan.plan.ptr(gpu),
            ..ap
        };
        let cfg = LaunchConfig {
            grid_dim: (plan.grid as u32, ranges as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: tiling.shared_bytes(f_n) as u32,
        };
        gpu.launch(Module::Backward, "act_grad_partial", cfg, &ap)?;
        gpu.launch(
            Module::Backward,
            "act_grad_finish",
            grid_1d(slots, 256),
            &ap,
        )?;
        if longest > split {
            let tail = grid_1d(b_n * (longest - split) * 32, 256);
            gpu.launch(Module::Backward, "act_grad", tail, &ap)?;
        }
    } else if tiled {
        // A block per token, its residual row staged once for all its entries (the same bits).
        gpu.launch(Module::Backward, "act_grad_tiled", per_item(b_n, 256), &ap)?;
    } else {
        gpu.launch(Module::Backward, "act_grad", grid_1d(slots * 32, 256), &ap)?;
    }
    // 2. Entries by feature; Σ_b x_b.
    let csr = group_by_feature(gpu, codes, f_n)?;
    let xsum = col_sum(gpu, inp.x, inp.layer * d, row, b_n, d)?;
    // 3. Per-feature gradients.
    let g = LayerGrads {
        w_enc: gpu.output(f_n * d)?,
        w_dec: gpu.output(f_n * rl)?,
        b_enc: gpu.output(f_n)?,
        log_theta: gpu.output(f_n)?,
        dec_coef: gpu.output(f_n)?,
        touched: gpu.output(f_n)?,
        active_count: gpu.output(f_n)?,
        sparsity: gpu.output(f_n)?,
    };
    let fp = CltFeatureGradParams {
        order: csr.order.ptr(gpu),
        fstart: csr.fstart.ptr(gpu),
        act: codes.act.ptr(gpu),
        pre: codes.pre.ptr(gpu),
        proj: proj.ptr(gpu),
        ge: ge.ptr(gpu),
        x: inp.x.ptr(gpu) + 4 * (inp.layer * d) as u64,
        resid: inp.resid.ptr(gpu) + 4 * (inp.layer * d) as u64,
        xsum: xsum.ptr(gpu),
        norms: inp.norms.ptr(gpu),
        theta: inp.theta.ptr(gpu),
        preact_sum: inp.window.preact_sum.ptr(gpu),
        near_count: inp.window.near_count.ptr(gpu),
        near_h: inp.window.near_h.ptr(gpu),
        preact_mask: inp.preact_mask.map_or(0, |m| m.ptr(gpu)),
        g_w_enc: if tiled { 0 } else { g.w_enc.ptr(gpu) },
        g_w_dec: if tiled { 0 } else { g.w_dec.ptr(gpu) },
        g_b_enc: g.b_enc.ptr(gpu),
        g_log_theta: g.log_theta.ptr(gpu),
        dec_coef: g.dec_coef.ptr(gpu),
        touched: g.touched.ptr(gpu),
        active_count: g.active_count.ptr(gpu),
        feat_sparsity: g.sparsity.ptr(gpu),
        n_tokens: b_n as u32,
        d: d as u32,
        row_len: rl as u32,
        x_stride: row as u32,
        resid_stride: row as u32,
        jump: inp.jump as u32,
        by_h: (obj.threshold_grad == ThresholdGrad::Preact) as u32,
        c: obj.c,
        tanh_scale: obj.lambda / bf,
        pre_scale: obj.lambda_preact / bf,
        half_bandwidth: 0.5 * obj.bandwidth,
        bandwidth: obj.bandwidth,
        cap: cap as u32,
        pad0: 0,
    };
    gpu.launch(Module::Backward, "feature_grads", per_item(f_n, 256), &fp)?;
    if tiled {
        let at = |buf| TokenRows {
            buf,
            offset: inp.layer * d,
            stride: row,
        };
        let enc = RowTerm::Encoder {
            ge: &ge,
            xsum: &xsum,
            norms: inp.norms,
            preact_mask: inp.preact_mask,
            pre_scale: obj.lambda_preact / bf,
            jump: inp.jump,
        };
        row_grad_tiled(gpu, codes, &csr, &at(inp.x), d, &enc, &g.w_enc)?;
        row_grad_tiled(
            gpu,
            codes,
            &csr,
            &at(inp.resid),
            rl,
            &RowTerm::Decoder,
            &g.w_dec,
        )?;
    }
    // The scratch buffers are freed on return, in stream order (no sync).
    Ok(g)
}

//! The encoder: a blocked GEMM whose epilogue turns pre-activations straight into sparse per-token lists.
//!
//! For each layer, tokens are processed in blocks of [`TOKEN_BLOCK`]: one GEMM `h = x W_encᵀ + b_enc` fills a
//! block-sized buffer, and the epilogue keeps only what the rest of the step needs:
//! - the active entries (`h > θ` for JumpReLU, the selected ones for TopK/BatchTopK), with `h`;
//! - for JumpReLU, what the threshold's straight-through gradient needs from the inactive near-threshold
//!   entries `θ − ε/2 < h ≤ θ`. It needs, per feature, the sum of the residuals over those tokens. When they are
//!   few, the block lists them (activation 0). With a wide bandwidth they can be nearly every inactive entry, and
//!   then the block lists the complement instead (the inactive entries at or below `θ − ε/2`, activation 0):
//!   the backward pass takes the block's residual total and subtracts the listed and active tokens. When both
//!   lists are long (a wide bandwidth over a broad pre-activation distribution), the block keeps a bitmask of
//!   its near-threshold entries instead, and the backward pass projects the block's residuals on every decoder
//!   row with one GEMM. Each block picks its [`BlockMode`] from its own counts, so any ε costs at most a dense
//!   projection and usually far less;
//! - for JumpReLU, per feature, `Σ_b ReLU(θ − h)` and the number of inactive tokens, which is all the
//!   pre-activation loss needs from the inactive entries.
//!
//! The dense `[B, F]` pre-activation matrix is never materialised (except for BatchTopK, whose selection is
//! global over the batch). Blocks run in parallel and are merged in token order, so the result is the same
//! for any number of threads.

use super::gemm::{Mat, Threads, matmul};
use crate::clt::{Activation, CltConfig, Params};
use rayon::prelude::*;

/// Tokens per encoder block.
pub const TOKEN_BLOCK: usize = 64;

/// The sparse encoding of one layer for a batch: entries grouped by token (CSR).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerCodes {
    /// `offsets[b]..offsets[b + 1]` are token b's entries.
    pub offsets: Vec<usize>,
    /// Feature index of each entry.
    pub feat: Vec<u32>,
    /// Pre-activation `h` of each entry.
    pub pre: Vec<f32>,
    /// Activation of each entry (0 for near-threshold entries that are not active).
    pub act: Vec<f32>,
    /// Per feature: `Σ_b ReLU(θ − h)` over the batch (JumpReLU only; f64 for an order-independent sum).
    pub preact_sum: Vec<f64>,
    /// Per feature: the number of tokens on which it is active.
    pub active_count: Vec<u32>,
    /// Per feature: the number of inactive near-threshold tokens (`θ − ε/2 < h ≤ θ`), JumpReLU only.
    pub window_inactive: Vec<u32>,
    /// Per feature: the sum of `h` over those tokens.
    pub window_inactive_h: Vec<f64>,
    /// Per block of [`TOKEN_BLOCK`] tokens: what its zero-activation entries are.
    pub block_mode: Vec<BlockMode>,
    /// Per block in [`BlockMode::Bits`]: for each feature, a word whose bit t marks token t of the block as an
    /// inactive near-threshold entry (empty for the other blocks).
    pub block_bits: Vec<Vec<u64>>,
}

/// How a block of tokens records its inactive near-threshold entries (JumpReLU only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BlockMode {
    /// The zero-activation entries are the near-threshold ones (`θ − ε/2 < h ≤ θ`).
    #[default]
    Near,
    /// The zero-activation entries are the far-below ones (`h ≤ θ − ε/2`), the complement.
    Far,
    /// No zero-activation entries; the near-threshold ones are in `block_bits`.
    Bits,
}

impl LayerCodes {
    /// Number of active entries (entries with nonzero activation).
    pub fn n_active(&self) -> usize {
        self.act.iter().filter(|a| **a != 0.0).count()
    }
}

/// Encodes layer `l` of a `[B][L][d]` batch.
///
/// `theta` holds `exp(log θ)` (ignored for TopK/BatchTopK); `bandwidth` is ε. With `list_near` every block
/// lists its near-threshold entries (needed when the threshold gradient weights them individually).
pub fn encode_layer(
    cfg: &CltConfig,
    params: &Params,
    l: usize,
    x: &[f32],
    n_tokens: usize,
    theta: &[f32],
    bandwidth: f32,
    list_near: bool,
) -> LayerCodes {
    let (d, f_n, l_n) = (cfg.d_model, cfg.n_features, cfg.n_layers);
    // (At least two calls per thread, so that every thread has work on short batches.)
    let per_gemm = gemm_blocks(f_n)
        .min(n_tokens.div_ceil(TOKEN_BLOCK * 2 * rayon::current_num_threads()))
        .max(1);
    let n_gemms = n_tokens.div_ceil(per_gemm * TOKEN_BLOCK);
    let w = &params.w_enc[l];
    let bias = &params.b_enc[l];
    let parts: Vec<Vec<BlockOut>> = (0..n_gemms)
        .into_par_iter()
        .map_init(
            || vec![0.0f32; per_gemm * TOKEN_BLOCK * f_n],
            |buf, g| {
                let g0 = g * per_gemm * TOKEN_BLOCK;
                let tg = (per_gemm * TOKEN_BLOCK).min(n_tokens - g0);
                let xs = &x[(g0 * l_n + l) * d..];
                let xm = Mat::strided(xs, tg, d, l_n * d);
                matmul(
                    buf,
                    f_n,
                    xm,
                    Mat::rows(w, f_n, d).t(),
                    0.0,
                    1.0,
                    Threads::One,
                );
                buf[..tg * f_n]
                    .chunks_mut(TOKEN_BLOCK * f_n)
                    .map(|block| {
                        epilogue(
                            cfg.activation,
                            block,
                            f_n,
                            bias,
                            theta,
                            bandwidth,
                            list_near,
                        )
                    })
                    .collect()
            },
        )
        .collect();
    let parts = parts.into_iter().flatten().collect();
    merge(parts, n_tokens, f_n)
}

/// How many [`TOKEN_BLOCK`]s one encoder GEMM covers for `f_n` features: up to 4, within 4 MiB of
/// pre-activations per thread. The GEMM packs the whole `[F, d]` encoder once per call (it reads and writes
/// `8·F·d` bytes for `2·64·F·d` flops at 64 rows), so fewer, taller calls pack it less often. (The product's
/// bits do not depend on it: each element's sum over `d` runs in the same order whatever the number of rows;
/// `tests/sparse_vs_dense.rs` checks it.)
fn gemm_blocks(f_n: usize) -> usize {
    ((1usize << 20) / (TOKEN_BLOCK * f_n.max(1))).clamp(1, 4)
}

/// The epilogue of one [`TOKEN_BLOCK`]: `block` holds its tokens' `x·W_encᵀ` rows (without the bias); the
/// block's active entries and, for JumpReLU, what the threshold gradient needs of the others.
fn epilogue(
    activation: Activation,
    block: &mut [f32],
    f_n: usize,
    bias: &[f32],
    theta: &[f32],
    bandwidth: f32,
    list_near: bool,
) -> BlockOut {
    let tb = block.len() / f_n;
    let mut out = BlockOut::new(tb, f_n, activation);
    if matches!(activation, Activation::JumpRelu) {
        // Which zero-activation list is shorter for this block? (The bias is added on the fly,
        // `h = (x·w) + b` exactly as the dense reference rounds it, so no pass rewrites the buffer.)
        let half = 0.5 * bandwidth;
        let (mut near, mut far) = (0usize, 0usize);
        for row in block.chunks_exact(f_n) {
            for ((&v, &b), &th) in row.iter().zip(bias).zip(theta) {
                let h = v + b;
                near += (h <= th && h > th - half) as usize;
                far += (h <= th - half) as usize;
            }
        }
        out.mode = if list_near {
            BlockMode::Near
        } else if near.min(far) * 8 > tb * f_n {
            out.bits = vec![0; f_n];
            BlockMode::Bits
        } else if far < near {
            BlockMode::Far
        } else {
            BlockMode::Near
        };
    } else {
        for row in block.chunks_exact_mut(f_n) {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
    }
    for (t, row) in block.chunks_exact(f_n).enumerate() {
        out.push_token(activation, t, row, bias, theta, bandwidth);
    }
    out
}

/// Encodes every layer; for BatchTopK the selection is global over the batch (and over layers when
/// `across_layers`).
pub fn encode_all(
    cfg: &CltConfig,
    params: &Params,
    x: &[f32],
    n_tokens: usize,
    thetas: &[Vec<f32>],
    bandwidth: f32,
) -> Vec<LayerCodes> {
    encode_all_with(cfg, params, x, n_tokens, thetas, bandwidth, false)
}

/// [`encode_all`], optionally forcing every block to list its near-threshold entries.
pub fn encode_all_with(
    cfg: &CltConfig,
    params: &Params,
    x: &[f32],
    n_tokens: usize,
    thetas: &[Vec<f32>],
    bandwidth: f32,
    list_near: bool,
) -> Vec<LayerCodes> {
    match cfg.activation {
        Activation::BatchTopK { k, across_layers } => {
            let pre: Vec<Vec<f32>> = (0..cfg.n_layers)
                .map(|l| dense_preact(cfg, params, l, x, n_tokens, Threads::All))
                .collect();
            batch_topk_codes(&pre, n_tokens, cfg.n_features, k, across_layers)
        }
        _ => (0..cfg.n_layers)
            .map(|l| {
                encode_layer(
                    cfg, params, l, x, n_tokens, &thetas[l], bandwidth, list_near,
                )
            })
            .collect(),
    }
}

/// The dense `[B][F]` pre-activations of layer `l` (for BatchTopK and the dense reference).
pub fn dense_preact(
    cfg: &CltConfig,
    params: &Params,
    l: usize,
    x: &[f32],
    n_tokens: usize,
    threads: Threads,
) -> Vec<f32> {
    let (d, f_n, l_n) = (cfg.d_model, cfg.n_features, cfg.n_layers);
    let mut h = vec![0.0f32; n_tokens * f_n];
    if n_tokens == 0 {
        return h;
    }
    let xm = Mat::strided(&x[l * d..], n_tokens, d, l_n * d);
    matmul(
        &mut h,
        f_n,
        xm,
        Mat::rows(&params.w_enc[l], f_n, d).t(),
        0.0,
        1.0,
        threads,
    );
    for row in h.chunks_exact_mut(f_n) {
        row.iter_mut()
            .zip(&params.b_enc[l])
            .for_each(|(v, b)| *v += b);
    }
    h
}

/// The indices of the `k` largest values of `h` (ties broken by the lower index), in increasing index order.
pub fn topk_indices(h: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..h.len() as u32).collect();
    let k = k.min(h.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &u32, b: &u32| h[*b as usize].total_cmp(&h[*a as usize]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// BatchTopK selection over dense per-layer pre-activations: the `k · B` (per layer) or `k · B · L` (across
/// layers) largest values, ties broken by position, then a ReLU.
pub fn batch_topk_codes(
    pre: &[Vec<f32>],
    n_tokens: usize,
    f_n: usize,
    k: usize,
    across_layers: bool,
) -> Vec<LayerCodes> {
    let l_n = pre.len();
    let mut selected: Vec<Vec<bool>> = pre.iter().map(|p| vec![false; p.len()]).collect();
    for g in batch_topk_groups(l_n, across_layers) {
        // Only positive values are candidates: everything ranked before a positive value is positive, so
        // the non-positive ones cannot change which positive ones are among the largest, and the ReLU
        // drops them anyway (most pre-activations are negative: the selection sorts far fewer).
        let mut cand: Vec<(f32, u32, u32)> = Vec::new(); // (value, layer, flat index)
        for &l in &g {
            cand.extend(
                pre[l]
                    .iter()
                    .enumerate()
                    .filter(|&(_, &v)| v > 0.0)
                    .map(|(i, &v)| (v, l as u32, i as u32)),
            );
        }
        let budget = (k * n_tokens * g.len()).min(cand.len());
        if budget == 0 {
            continue;
        }
        let cmp = |a: &(f32, u32, u32), b: &(f32, u32, u32)| {
            b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2)))
        };
        if budget < cand.len() {
            cand.select_nth_unstable_by(budget - 1, cmp);
        }
        for &(v, l, i) in &cand[..budget] {
            if v > 0.0 {
                selected[l as usize][i as usize] = true;
            }
        }
    }
    (0..l_n)
        .map(|l| codes_of_selected(&pre[l], &selected[l], n_tokens, f_n))
        .collect()
}

/// The groups of layers a BatchTopK selection ranks together: all `l_n` at once (`across_layers`), or each
/// alone.
pub fn batch_topk_groups(l_n: usize, across_layers: bool) -> Vec<Vec<usize>> {
    if across_layers {
        vec![(0..l_n).collect()]
    } else {
        (0..l_n).map(|l| vec![l]).collect()
    }
}

/// The codes of a selection over dense `[B][F]` pre-activations: the selected entries, each active with its
/// pre-activation (a BatchTopK or TopK selection, the ReLU already applied by the caller's choice).
pub fn codes_of_selected(
    pre: &[f32],
    selected: &[bool],
    n_tokens: usize,
    f_n: usize,
) -> LayerCodes {
    let mut c = LayerCodes {
        offsets: vec![0],
        active_count: vec![0; f_n],
        preact_sum: vec![0.0; f_n],
        window_inactive: vec![0; f_n],
        window_inactive_h: vec![0.0; f_n],
        block_mode: vec![BlockMode::Near; n_tokens.div_ceil(TOKEN_BLOCK)],
        block_bits: vec![Vec::new(); n_tokens.div_ceil(TOKEN_BLOCK)],
        ..Default::default()
    };
    for b in 0..n_tokens {
        for f in 0..f_n {
            let i = b * f_n + f;
            if selected[i] {
                c.feat.push(f as u32);
                c.pre.push(pre[i]);
                c.act.push(pre[i]);
                c.active_count[f] += 1;
            }
        }
        c.offsets.push(c.feat.len());
    }
    c
}

/// What one token block produces.
struct BlockOut {
    lens: Vec<usize>,
    feat: Vec<u32>,
    pre: Vec<f32>,
    act: Vec<f32>,
    preact_sum: Vec<f64>,
    active_count: Vec<u32>,
    window_inactive: Vec<u32>,
    window_inactive_h: Vec<f64>,
    mode: BlockMode,
    bits: Vec<u64>,
}

impl BlockOut {
    fn new(tb: usize, f_n: usize, act: Activation) -> Self {
        let jump = matches!(act, Activation::JumpRelu);
        BlockOut {
            lens: Vec::with_capacity(tb),
            feat: Vec::new(),
            pre: Vec::new(),
            act: Vec::new(),
            preact_sum: if jump { vec![0.0; f_n] } else { Vec::new() },
            active_count: vec![0; f_n],
            window_inactive: if jump { vec![0; f_n] } else { Vec::new() },
            window_inactive_h: if jump { vec![0.0; f_n] } else { Vec::new() },
            mode: BlockMode::Near,
            bits: Vec::new(),
        }
    }

    /// Records token `t` of the block. For JumpReLU `h` is the product without the bias (added here); for
    /// TopK it already includes it.
    fn push_token(
        &mut self,
        activation: Activation,
        t: usize,
        h: &[f32],
        bias: &[f32],
        theta: &[f32],
        eps: f32,
    ) {
        let start = self.feat.len();
        match activation {
            Activation::JumpRelu => {
                let half = 0.5 * eps;
                for (f, ((&xw, &b), &th)) in h.iter().zip(bias).zip(theta).enumerate() {
                    let v = xw + b;
                    if v > th {
                        self.feat.push(f as u32);
                        self.pre.push(v);
                        self.act.push(v);
                        self.active_count[f] += 1;
                    } else {
                        self.preact_sum[f] += (th - v) as f64;
                        let near = v > th - half;
                        if near {
                            self.window_inactive[f] += 1;
                            self.window_inactive_h[f] += v as f64;
                        }
                        let listed = match self.mode {
                            BlockMode::Near => near,
                            BlockMode::Far => !near,
                            BlockMode::Bits => {
                                if near {
                                    self.bits[f] |= 1u64 << t;
                                }
                                false
                            }
                        };
                        if listed {
                            self.feat.push(f as u32);
                            self.pre.push(v);
                            self.act.push(0.0);
                        }
                    }
                }
            }
            Activation::TopK { k } => {
                for f in topk_indices(h, k) {
                    let v = h[f as usize];
                    if v > 0.0 {
                        self.feat.push(f);
                        self.pre.push(v);
                        self.act.push(v);
                        self.active_count[f as usize] += 1;
                    }
                }
            }
            Activation::BatchTopK { .. } => unreachable!("BatchTopK is encoded densely"),
        }
        self.lens.push(self.feat.len() - start);
    }
}

fn merge(parts: Vec<BlockOut>, n_tokens: usize, f_n: usize) -> LayerCodes {
    let total: usize = parts.iter().map(|p| p.feat.len()).sum();
    let mut c = LayerCodes {
        offsets: Vec::with_capacity(n_tokens + 1),
        feat: Vec::with_capacity(total),
        pre: Vec::with_capacity(total),
        act: Vec::with_capacity(total),
        preact_sum: vec![0.0; f_n],
        active_count: vec![0; f_n],
        window_inactive: vec![0; f_n],
        window_inactive_h: vec![0.0; f_n],
        block_mode: Vec::with_capacity(parts.len()),
        block_bits: Vec::with_capacity(parts.len()),
    };
    c.offsets.push(0);
    for p in parts {
        for len in &p.lens {
            let last = *c.offsets.last().unwrap_or(&0);
            c.offsets.push(last + len);
        }
        c.feat.extend_from_slice(&p.feat);
        c.pre.extend_from_slice(&p.pre);
        c.act.extend_from_slice(&p.act);
        for (s, v) in c.preact_sum.iter_mut().zip(&p.preact_sum) {
            *s += v;
        }
        for (s, v) in c.active_count.iter_mut().zip(&p.active_count) {
            *s += v;
        }
        for (s, v) in c.window_inactive.iter_mut().zip(&p.window_inactive) {
            *s += v;
        }
        for (s, v) in c.window_inactive_h.iter_mut().zip(&p.window_inactive_h) {
            *s += v;
        }
        c.block_mode.push(p.mode);
        c.block_bits.push(p.bits);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BatchTopK against the rule written out: every value of the group sorted (larger first, ties by layer
    /// then flat index), the first `k · B · |group|` taken, the non-positive ones dropped. Values on a coarse
    /// grid, mostly negative, so that ties and groups with fewer positives than the budget both occur.
    #[test]
    fn batch_topk_is_the_sorted_rule() {
        let mut rng = crate::rng::Rng::seed(5);
        for case in 0..40 {
            let (l_n, n, f_n) = (1 + rng.below(3), 1 + rng.below(9), 1 + rng.below(12));
            let k = 1 + rng.below(f_n);
            let across = case % 2 == 1;
            let pre: Vec<Vec<f32>> = (0..l_n)
                .map(|_| {
                    (0..n * f_n)
                        .map(|_| (rng.below(9) as f32 - 6.0) * 0.5)
                        .collect()
                })
                .collect();
            let got = batch_topk_codes(&pre, n, f_n, k, across);
            let groups: Vec<Vec<usize>> = if across {
                vec![(0..l_n).collect()]
            } else {
                (0..l_n).map(|l| vec![l]).collect()
            };
            let mut want = vec![vec![false; n * f_n]; l_n];
            for g in groups {
                let mut all: Vec<(f32, usize, usize)> = g
                    .iter()
                    .flat_map(|&l| pre[l].iter().enumerate().map(move |(i, &v)| (v, l, i)))
                    .collect();
                all.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
                for &(v, l, i) in all.iter().take(k * n * g.len()) {
                    want[l][i] = v > 0.0;
                }
            }
            for l in 0..l_n {
                let want = codes_of_selected(&pre[l], &want[l], n, f_n);
                assert_eq!(got[l], want, "case {case}, layer {l}");
            }
        }
    }
}

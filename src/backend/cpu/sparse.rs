//! The fast CPU training step: sparse decode, loss, and sparse backward.
//!
//! What is subtle here:
//! - Only the active entries of each (token, layer) are decoded: each one adds `a · W_dec[l, f]` (a contiguous
//!   row covering all target layers) into the token's contiguous `[L][d]` reconstruction.
//! - `∂L/∂a` is a dot product of the token's residual with that same row, computed only at the listed entries:
//!   the active ones, and for the threshold's gradient either the near-threshold ones or, in blocks where those
//!   are the majority, the far-below ones, whose projections are subtracted from the block's residual total
//!   (see [`super::encode`]).
//! - The pre-activation loss `λ_p Σ_b ReLU(θ − h) ‖W_dec‖` has a gradient at *every* inactive entry. It is
//!   applied without touching them: `Σ_{b inactive} x_b = Σ_b x_b − Σ_{b active} x_b`, so the encoder
//!   gradient of feature f is `Σ_{b active} (∂L/∂h_b + κ_f) x_b − κ_f Σ_b x_b` with `κ_f = λ_p ‖W_dec[l,f]‖ / B`.
//!   Inactive here means `h ≤ θ` (the subgradient of ReLU(θ − h) at the tie is taken as 1; the dense reference
//!   uses the same convention).
//! - Gradients are grouped per feature (a counting sort of the entries), so each decoder and encoder row is
//!   written by one task, in token order: no atomics, and the same bits for any number of threads.

use super::encode::{BlockMode, LayerCodes, encode_all, encode_all_with};
use super::gemm::{Mat, Threads, matmul};
use crate::backend::grads::{Grads, Objective, StepStats, ThresholdGrad, target_variance};
use crate::clt::{CltConfig, Params};
use rayon::prelude::*;

/// Floats per 64-byte cache line.
const LINE: usize = 16;

/// Asks the CPU to start loading the cache line that holds `v[i]` (a hint: nothing happens when `i` is out of
/// bounds, or on other architectures than x86-64).
///
/// The sparse step gathers whole rows (a feature's decoder row, a token's residual row) in an order the hardware
/// prefetcher cannot guess, and it stops at 4 KiB page boundaries. The `*_ahead` kernels below prefetch the
/// next row of the gather, line for line, while they work on the current one. (On the project's 2-core machine
/// this made no measurable difference, `docs/perf.md`; it costs nothing and may help where memory latency is
/// higher.)
#[inline(always)]
pub fn prefetch(v: &[f32], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = v.get(i) {
        // SAFETY: `_mm_prefetch` needs SSE, which every x86-64 CPU has; a prefetch is a hint that never faults
        // and writes nothing, and the address is that of an element of `v`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                (p as *const f32).cast(),
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (v, i);
}

/// Prefetches the lines of `next` from float `from` on.
#[inline]
fn prefetch_rest(next: &[f32], from: usize) {
    let mut k = from;
    while k < next.len() {
        prefetch(next, k);
        k += LINE;
    }
}

/// `y += a * x`.
#[multiversion::multiversion(targets("x86_64+avx+avx2"))]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

/// [`axpy`] (same result) while prefetching `next`, the row the caller gathers after `x`.
#[multiversion::multiversion(targets("x86_64+avx+avx2"))]
pub fn axpy_ahead(a: f32, x: &[f32], y: &mut [f32], next: &[f32]) {
    let n = x.len().min(y.len());
    let nl = n - n % LINE;
    for (k, (xc, yc)) in x[..nl]
        .chunks_exact(LINE)
        .zip(y[..nl].chunks_exact_mut(LINE))
        .enumerate()
    {
        prefetch(next, k * LINE);
        for i in 0..LINE {
            yc[i] += a * xc[i];
        }
    }
    for i in nl..n {
        y[i] += a * x[i];
    }
    prefetch_rest(next, nl);
}

/// Dot product with eight independent accumulators (vectorises; fixed order, so deterministic).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_ahead(a, b, &[])
}

/// [`dot`] (same order, same bits) while prefetching `next`, the row the caller gathers after `a`.
#[multiversion::multiversion(targets("x86_64+avx+avx2"))]
pub fn dot_ahead(a: &[f32], b: &[f32], next: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n = a.len().min(b.len());
    let n8 = n - n % 8;
    for (k, (x, y)) in a[..n8]
        .chunks_exact(8)
        .zip(b[..n8].chunks_exact(8))
        .enumerate()
    {
        if k % 2 == 0 {
            prefetch(next, k * 8);
        }
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a[n8..n].iter().zip(&b[n8..n]) {
        s += x * y;
    }
    prefetch_rest(next, n8);
    s
}

/// `Σ x·w` (as [`dot`], same order) while adding `a · x` into `y`: one pass over `x`.
#[inline]
pub fn dot_axpy(x: &[f32], w: &[f32], a: f32, y: &mut [f32]) -> f32 {
    dot_axpy_ahead(x, w, a, y, &[])
}

/// [`dot_axpy`] (same bits) while prefetching `next`, the row the caller gathers after `x`.
#[multiversion::multiversion(targets("x86_64+avx+avx2"))]
pub fn dot_axpy_ahead(x: &[f32], w: &[f32], a: f32, y: &mut [f32], next: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n8 = x.len() - x.len() % 8;
    for (k, ((xc, wc), yc)) in x[..n8]
        .chunks_exact(8)
        .zip(w[..n8].chunks_exact(8))
        .zip(y[..n8].chunks_exact_mut(8))
        .enumerate()
    {
        if k % 2 == 0 {
            prefetch(next, k * 8);
        }
        for i in 0..8 {
            acc[i] += xc[i] * wc[i];
            yc[i] += a * xc[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in n8..x.len() {
        s += x[i] * w[i];
        y[i] += a * x[i];
    }
    prefetch_rest(next, n8);
    s
}

/// `exp(log θ)` per layer.
pub fn thresholds(params: &Params) -> Vec<Vec<f32>> {
    params
        .log_theta
        .iter()
        .map(|t| t.iter().map(|v| v.exp()).collect())
        .collect()
}

/// Sparse decode of a batch: `ŷ[b] = b_dec + Σ_l Σ_{f active} a · W_dec[l, f] (+ W_skip x)`, `[B][L][d]`.
pub fn decode(
    cfg: &CltConfig,
    params: &Params,
    codes: &[LayerCodes],
    x: &[f32],
    n_tokens: usize,
) -> Vec<f32> {
    let mut yhat = decode_features(cfg, params, codes, n_tokens, true);
    add_skip(cfg, params, x, n_tokens, &mut yhat);
    yhat
}

/// The features' part of the decode, `[B][L][d]`: `Σ_l Σ_{f active} a · W_dec[l, f]`, starting from `b_dec`
/// when `with_bias` (a feature shard's partial reconstruction starts from zero on all ranks but one).
pub fn decode_features(
    cfg: &CltConfig,
    params: &Params,
    codes: &[LayerCodes],
    n_tokens: usize,
    with_bias: bool,
) -> Vec<f32> {
    let mut yhat = decode_start(cfg, params, n_tokens, with_bias);
    decode_layers(cfg, params, codes, n_tokens, 0..cfg.n_layers, &mut yhat);
    yhat
}

/// The reconstruction before any feature is decoded, `[B][L][d]`: `b_dec` for every token, or zero.
pub fn decode_start(
    cfg: &CltConfig,
    params: &Params,
    n_tokens: usize,
    with_bias: bool,
) -> Vec<f32> {
    let (l_n, d) = (cfg.n_layers, cfg.d_model);
    let mut yhat = crate::hugepages::zeroed(n_tokens * l_n * d);
    if with_bias {
        yhat.par_chunks_mut(l_n * d).for_each(|yr| {
            for (k, bias) in params.b_dec.iter().enumerate() {
                yr[k * d..(k + 1) * d].copy_from_slice(bias);
            }
        });
    }
    yhat
}

/// Bytes of reconstruction rows one decode tile keeps in cache (see [`decode_layers`]).
const DECODE_TILE_BYTES: usize = 6 << 20;

/// Adds the active features of the source layers `layers` into `yhat` (`[B][L][d]`). Each element receives
/// its terms in source-layer order, then in feature order, so decoding `0..L` in one call or in consecutive
/// ranges gives the same bits, for any number of threads; after the range `0..l + 1`, target layer `l` is
/// complete (a source layer writes only its own and later target layers).
///
/// Tokens go in tiles whose reconstruction rows stay in cache (~6 MiB), and within a tile and source layer the
/// active entries are taken feature by feature: a feature's decoder row (up to `L·d` floats, ~20 KiB on a
/// GPT-2-sized model) comes from memory once per tile and serves all the tile's tokens on which it fires,
/// instead of once per (token, feature). With ~1% of features active that reads about half the bytes of a
/// token-by-token gather ([`decode_layers_by_token`]); measured 10–20% faster on the GPT-2-sized benchmark.
pub fn decode_layers(
    cfg: &CltConfig,
    params: &Params,
    codes: &[LayerCodes],
    n_tokens: usize,
    layers: std::ops::Range<usize>,
    yhat: &mut [f32],
) {
    let (l_n, d) = (cfg.n_layers, cfg.d_model);
    let row = l_n * d;
    if row == 0 || n_tokens == 0 {
        return;
    }
    // At least two tiles per thread, so that short batches use every thread.
    let tile = (DECODE_TILE_BYTES / (4 * row))
        .min(n_tokens.div_ceil(2 * rayon::current_num_threads()))
        .max(1);
    yhat[..n_tokens * row]
        .par_chunks_mut(tile * row)
        .enumerate()
        .for_each_init(Vec::new, |ents, (ti, ytile)| {
            let b0 = ti * tile;
            let tb = ytile.len() / row;
            for l in layers.clone() {
                let c = &codes[l];
                let rl = cfg.dec_row_len(l);
                let w = &params.w_dec[l];
                // The tile's active entries as (feature, token in tile, activation), by feature then token.
                ents.clear();
                for b in 0..tb {
                    for e in c.offsets[b0 + b]..c.offsets[b0 + b + 1] {
                        if c.act[e] != 0.0 {
                            ents.push((c.feat[e], b as u32, c.act[e]));
                        }
                    }
                }
                ents.sort_unstable_by_key(|&(f, b, _)| (f, b));
                for (k, &(f, b, a)) in ents.iter().enumerate() {
                    let f = f as usize;
                    // The next different feature's row, prefetched while this one is added.
                    let next = match ents.get(k + 1) {
                        Some(&(g, _, _)) if g as usize != f => {
                            &w[g as usize * rl..(g as usize + 1) * rl]
                        }
                        _ => &[][..],
                    };
                    let o = b as usize * row + l * d;
                    axpy_ahead(a, &w[f * rl..(f + 1) * rl], &mut ytile[o..o + rl], next);
                }
            }
        });
}

/// [`decode_layers`] the simple way: token by token, each active entry's decoder row gathered from memory (the
/// reference the tiled version is tested against, bit for bit, and measured against in `clt bench`).
pub fn decode_layers_by_token(
    cfg: &CltConfig,
    params: &Params,
    codes: &[LayerCodes],
    n_tokens: usize,
    layers: std::ops::Range<usize>,
    yhat: &mut [f32],
) {
    let (l_n, d) = (cfg.n_layers, cfg.d_model);
    let row = l_n * d;
    yhat[..n_tokens * row]
        .par_chunks_mut(row.max(1))
        .enumerate()
        .for_each(|(b, yr)| {
            for l in layers.clone() {
                let c = &codes[l];
                let rl = cfg.dec_row_len(l);
                let w = &params.w_dec[l];
                let mut ents: Vec<(u32, f32)> = (c.offsets[b]..c.offsets[b + 1])
                    .filter(|&e| c.act[e] != 0.0)
                    .map(|e| (c.feat[e], c.act[e]))
                    .collect();
                ents.sort_by_key(|&(f, _)| f);
                for (f, a) in ents {
                    let f = f as usize;
                    axpy(a, &w[f * rl..(f + 1) * rl], &mut yr[l * d..l * d + rl]);
                }
            }
        });
}

/// `ŷ_l += W_skip[l] x_l` for every layer (nothing without skip connections).
pub fn add_skip(cfg: &CltConfig, params: &Params, x: &[f32], n_tokens: usize, yhat: &mut [f32]) {
    let (l_n, d) = (cfg.n_layers, cfg.d_model);
    let row = l_n * d;
    if cfg.skip && n_tokens > 0 {
        for l in 0..l_n {
            let xm = Mat::strided(&x[l * d..], n_tokens, d, row);
            matmul(
                &mut yhat[l * d..],
                row,
                xm,
                Mat::rows(&params.w_skip[l], d, d).t(),
                1.0,
                1.0,
                Threads::All,
            );
        }
    }
}

/// Encodes and decodes a batch (inference): the sparse codes and the reconstruction.
pub fn forward(
    cfg: &CltConfig,
    params: &Params,
    x: &[f32],
    n_tokens: usize,
    bandwidth: f32,
) -> (Vec<LayerCodes>, Vec<f32>) {
    let thetas = thresholds(params);
    let codes = encode_all(cfg, params, x, n_tokens, &thetas, bandwidth);
    let yhat = decode(cfg, params, &codes, x, n_tokens);
    (codes, yhat)
}

/// Writes `L` layer blocks of `[B][d]` (a layer-major reconstruction, as the overlapped all-reduce sums
/// it) into the token-major `[B][L][d]` `yhat`.
pub fn layer_blocks_into(parts: &[Vec<f32>], d: usize, yhat: &mut [f32]) {
    let row = parts.len() * d;
    for (l, part) in parts.iter().enumerate() {
        for (b, p) in part.chunks_exact(d.max(1)).enumerate() {
            yhat[b * row + l * d..][..p.len()].copy_from_slice(p);
        }
    }
}

/// Residual `r = (2/B)(ŷ − y)` and per-layer squared errors.
pub fn residual(
    yhat: &[f32],
    y: &[f32],
    n_tokens: usize,
    l_n: usize,
    d: usize,
) -> (Vec<f32>, Vec<f64>) {
    let row = l_n * d;
    let scale = 2.0 / n_tokens.max(1) as f32;
    let mut r = crate::hugepages::zeroed(yhat.len());
    let per_tok: Vec<Vec<f64>> = r
        .par_chunks_mut(row)
        .enumerate()
        .map(|(b, rr)| {
            let mut sq = vec![0.0f64; l_n];
            for (l, s) in sq.iter_mut().enumerate() {
                let o = b * row + l * d;
                for i in 0..d {
                    let diff = yhat[o + i] - y[o + i];
                    *s += (diff as f64) * (diff as f64);
                    rr[l * d + i] = scale * diff;
                }
            }
            sq
        })
        .collect();
    let mut sq_err = vec![0.0f64; l_n];
    for t in per_tok {
        sq_err.iter_mut().zip(t).for_each(|(s, v)| *s += v);
    }
    (r, sq_err)
}

/// One training step's loss and gradient on the sparse path. `dec_norms` are the current decoder norms.
///
/// Writes the gradient into `grads` (see [`Grads`] for the decoder's two-part form) and returns the step's
/// statistics. `x` and `y` are normalised `[B][L][d]` batches.
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grad(
    cfg: &CltConfig,
    params: &Params,
    dec_norms: &[Vec<f32>],
    x: &[f32],
    y: &[f32],
    n_tokens: usize,
    obj: &Objective,
    preact_mask: Option<&[Vec<bool>]>,
    grads: &mut Grads,
) -> StepStats {
    let by_h = obj.threshold_grad == ThresholdGrad::Preact;
    let thetas = thresholds(params);
    let codes = encode_all_with(cfg, params, x, n_tokens, &thetas, obj.bandwidth, by_h);
    loss_and_grad_of(
        cfg,
        params,
        dec_norms,
        x,
        y,
        n_tokens,
        obj,
        preact_mask,
        &thetas,
        codes,
        grads,
    )
}

/// [`loss_and_grad`] from given `codes` (a selection made elsewhere: across ranks, `dist::select`): the
/// decode and the [`backward`]. `thetas` are [`thresholds`] of `params`.
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grad_of(
    cfg: &CltConfig,
    params: &Params,
    dec_norms: &[Vec<f32>],
    x: &[f32],
    y: &[f32],
    n_tokens: usize,
    obj: &Objective,
    preact_mask: Option<&[Vec<bool>]>,
    thetas: &[Vec<f32>],
    codes: Vec<LayerCodes>,
    grads: &mut Grads,
) -> StepStats {
    let yhat = decode(cfg, params, &codes, x, n_tokens);
    backward(
        cfg,
        params,
        dec_norms,
        x,
        y,
        n_tokens,
        obj,
        preact_mask,
        thetas,
        codes,
        yhat,
        grads,
    )
}

/// The step after the forward: the loss of the reconstruction `yhat` (complete: with bias, skip and, for a
/// feature shard, every rank's features) and the gradient of the features in `codes`, the decoder bias and
/// the skip weights. `thetas` are [`thresholds`] of `params`. The loss terms that are sums over features
/// (sparsity, pre-activation) and the counts in the statistics cover the features of `params` only.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    cfg: &CltConfig,
    params: &Params,
    dec_norms: &[Vec<f32>],
    x: &[f32],
    y: &[f32],
    n_tokens: usize,
    obj: &Objective,
    preact_mask: Option<&[Vec<bool>]>,
    thetas: &[Vec<f32>],
    codes: Vec<LayerCodes>,
    yhat: Vec<f32>,
    grads: &mut Grads,
) -> StepStats {
    let (l_n, d) = (cfg.n_layers, cfg.d_model);
    let row = l_n * d;
    let bf = n_tokens.max(1) as f32;
    let jump = cfg.has_threshold();
    let by_h = obj.threshold_grad == ThresholdGrad::Preact;
    let (r, sq_err) = residual(&yhat, y, n_tokens, l_n, d);
    drop(yhat);

    let tanh_scale = obj.lambda / bf;
    let mut stats = StepStats {
        n_tokens,
        recon: sq_err.iter().sum::<f64>() / bf as f64,
        sq_err,
        target_var: target_variance(y, n_tokens, l_n, d),
        ..Default::default()
    };

    let mut xl = crate::hugepages::zeroed(n_tokens * d);
    for (l, c) in codes.iter().enumerate() {
        let rl = cfg.dec_row_len(l);
        let w_dec = &params.w_dec[l];
        let norms = &dec_norms[l];
        let theta = &thetas[l];
        let nnz = c.feat.len();

        // Loss terms of this layer.
        let mut sparsity = 0.0f64;
        for e in 0..nnz {
            if c.act[e] != 0.0 {
                let n = norms[c.feat[e] as usize];
                sparsity += (obj.c * c.act[e] * n).tanh() as f64;
            }
        }
        stats.sparsity += sparsity * obj.lambda as f64 / bf as f64;
        if jump {
            let p: f64 = c
                .preact_sum
                .iter()
                .zip(norms)
                .enumerate()
                .filter(|(f, _)| preact_mask.is_none_or(|m| m[l][*f]))
                .map(|(_, (s, n))| s * *n as f64)
                .sum();
            stats.preact += p * obj.lambda_preact as f64 / bf as f64;
        }
        let n_active = c.act.iter().filter(|a| **a != 0.0).count();
        stats.n_active.push(n_active);
        stats
            .n_window
            .push(c.window_inactive.iter().map(|v| *v as usize).sum());

        // Group the entries by feature (stable: token order within a feature).
        let mut start = vec![0usize; cfg.n_features + 1];
        for &f in &c.feat {
            start[f as usize + 1] += 1;
        }
        for f in 0..cfg.n_features {
            start[f + 1] += start[f];
        }
        let mut order = vec![(0u32, 0u32); nnz]; // (entry, token)
        let mut fill = start.clone();
        for b in 0..n_tokens {
            for e in c.offsets[b]..c.offsets[b + 1] {
                let f = c.feat[e] as usize;
                order[fill[f]] = (e as u32, b as u32);
                fill[f] += 1;
            }
        }

        // This layer's inputs, gathered once into a contiguous `[B][d]` buffer: the encoder gradient reads a
        // row of it per active entry, and from one small buffer (in huge pages) those reads mostly hit the
        // cache and never miss the TLB, where the `[B][L][d]` batch spreads them over 12× the memory.
        xl.par_chunks_mut(d)
            .enumerate()
            .for_each(|(b, o)| o.copy_from_slice(&x[(b * l_n + l) * d..][..d]));

        // Σ_b x_b for the pre-activation term.
        let mut xsum = vec![0.0f64; d];
        if jump && obj.lambda_preact != 0.0 {
            for xr in xl.chunks_exact(d) {
                xsum.iter_mut().zip(xr).for_each(|(s, v)| *s += *v as f64);
            }
        }
        let xsum: Vec<f32> = xsum.iter().map(|v| *v as f32).collect();

        // The residual total of the blocks that list the complement of the near-threshold entries, and its
        // projection on every feature's decoder row.
        let complement_dot: Vec<f32> = if c.block_mode.contains(&BlockMode::Far) {
            let mut total = vec![0.0f64; rl];
            for b in 0..n_tokens {
                if c.block_mode[b / BACKWARD_BLOCK] == BlockMode::Far {
                    let rr = &r[b * row + l * d..][..rl];
                    total.iter_mut().zip(rr).for_each(|(s, v)| *s += *v as f64);
                }
            }
            let total: Vec<f32> = total.iter().map(|v| *v as f32).collect();
            w_dec.par_chunks(rl).map(|w| dot(w, &total)).collect()
        } else {
            Vec::new()
        };
        // Blocks with a bitmask: project their residuals on every decoder row (one GEMM per block) and sum the
        // projections at the marked entries.
        let bits_dot: Vec<f32> = if c.block_mode.contains(&BlockMode::Bits) {
            let f_n = cfg.n_features;
            let parts: Vec<Vec<f32>> = (0..c.block_mode.len())
                .into_par_iter()
                .filter(|blk| c.block_mode[*blk] == BlockMode::Bits)
                .map(|blk| {
                    let b0 = blk * BACKWARD_BLOCK;
                    let tb = BACKWARD_BLOCK.min(n_tokens - b0);
                    let mut proj = vec![0.0f32; tb * f_n];
                    let rm = Mat::strided(&r[b0 * row + l * d..], tb, rl, row);
                    matmul(
                        &mut proj,
                        f_n,
                        rm,
                        Mat::rows(w_dec, f_n, rl).t(),
                        0.0,
                        1.0,
                        Threads::One,
                    );
                    let bits = &c.block_bits[blk];
                    (0..f_n)
                        .map(|f| {
                            let mut word = bits[f];
                            let mut s = 0.0f32;
                            while word != 0 {
                                let t = word.trailing_zeros() as usize;
                                s += proj[t * f_n + f];
                                word &= word - 1;
                            }
                            s
                        })
                        .collect()
                })
                .collect();
            let mut total = vec![0.0f32; f_n];
            for p in parts {
                total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
            }
            total
        } else {
            Vec::new()
        };

        let half = 0.5 * obj.bandwidth;
        let pre_scale = obj.lambda_preact / bf;
        let gp = &mut grads.p;
        gp.w_enc[l]
            .par_chunks_mut(d)
            .zip(gp.w_dec[l].par_chunks_mut(rl))
            .zip(gp.b_enc[l].par_iter_mut())
            .zip(gp.log_theta[l].par_iter_mut())
            .zip(grads.dec_coef[l].par_iter_mut())
            .zip(grads.dec_touched[l].par_iter_mut())
            .enumerate()
            .for_each(|(f, (((((enc_row, dec_row), db), dlt), coef), touched))| {
                let ents = &order[start[f]..start[f + 1]];
                let w_row = &w_dec[f * rl..(f + 1) * rl];
                let n = norms[f];
                let th = theta[f];
                let preact_on = jump && preact_mask.is_none_or(|m| m[l][f]);
                let kappa = if preact_on { pre_scale * n } else { 0.0 };
                let has_active = ents.iter().any(|&(e, _)| c.act[e as usize] != 0.0);
                if *touched || has_active {
                    dec_row.iter_mut().for_each(|v| *v = 0.0);
                }
                *touched = has_active;
                enc_row.iter_mut().for_each(|v| *v = 0.0);
                let (mut dn, mut dbs) = (0.0f32, 0.0f32);
                // Σ over the near-threshold tokens of ∂L/∂a (without the zero-activation tanh constant), each
                // weighted by h for the `Preact` estimate (whose blocks always list their near entries).
                let mut near = 0.0f32;
                for (k, &(e, b)) in ents.iter().enumerate() {
                    let (e, b) = (e as usize, b as usize);
                    // The residual row of the next entry, prefetched while this one is worked on.
                    let next = ents
                        .get(k + 1)
                        .map_or(&[][..], |&(_, nb)| &r[nb as usize * row + l * d..][..rl]);
                    let (a, h) = (c.act[e], c.pre[e]);
                    // ∂L/∂a: the token's residual projected on the feature's decoder row (read once here, while
                    // the same residual row also feeds the decoder gradient), plus the tanh term when active.
                    let rr = &r[b * row + l * d..b * row + l * d + rl];
                    // Active entries also add a·r_b to the decoder gradient, in the same pass over r_b.
                    let proj = if a != 0.0 {
                        dot_axpy_ahead(rr, w_row, a, dec_row, next)
                    } else {
                        dot_ahead(rr, w_row, next)
                    };
                    let complement = jump && c.block_mode[b / BACKWARD_BLOCK] == BlockMode::Far;
                    if a != 0.0 {
                        let t = (obj.c * a * n).tanh();
                        let tanh_term = tanh_scale * obj.c * n * (1.0 - t * t);
                        let ge = proj + tanh_term;
                        dn += tanh_scale * obj.c * a * (1.0 - t * t);
                        dbs += ge;
                        axpy(ge + kappa, &xl[b * d..][..d], enc_row);
                        if jump && h - th < half {
                            near += if by_h { ge * h } else { ge };
                        }
                        if complement {
                            // The block total counts this active token: take its projection back out.
                            near -= proj;
                        }
                    } else if complement {
                        near -= proj; // a far-below token of a complement block
                    } else {
                        near += if by_h { proj * h } else { proj }; // a listed near-threshold token
                    }
                }
                let n_inactive = (n_tokens - c.active_count[f] as usize) as f32;
                if jump {
                    if let Some(cd) = complement_dot.get(f) {
                        near += cd;
                    }
                    if let Some(bd) = bits_dot.get(f) {
                        near += bd;
                    }
                    let near_count = if by_h {
                        c.window_inactive_h[f] as f32
                    } else {
                        c.window_inactive[f] as f32
                    };
                    near += tanh_scale * obj.c * n * near_count;
                    if kappa != 0.0 {
                        axpy(-kappa, &xsum, enc_row);
                    }
                    dbs -= kappa * n_inactive;
                    if preact_on {
                        dn += pre_scale * c.preact_sum[f] as f32;
                    }
                    let weight = if by_h {
                        -1.0 / obj.bandwidth
                    } else {
                        -th / obj.bandwidth
                    };
                    *dlt = th * (near * weight + kappa * n_inactive);
                } else {
                    *dlt = 0.0;
                }
                *db = dbs;
                *coef = if n > 0.0 { dn / n } else { 0.0 };
            });
    }
    stats.active_count = codes.into_iter().map(|c| c.active_count).collect();

    // Decoder bias and skip gradients.
    for k in 0..l_n {
        let mut s = vec![0.0f64; d];
        for b in 0..n_tokens {
            s.iter_mut()
                .zip(&r[b * row + k * d..][..d])
                .for_each(|(a, v)| *a += *v as f64);
        }
        grads.p.b_dec[k]
            .iter_mut()
            .zip(&s)
            .for_each(|(g, v)| *g = *v as f32);
    }
    if cfg.skip {
        skip_grad(cfg, &r, x, n_tokens, &mut grads.p.w_skip);
    }
    stats
}

/// `dW_skip[l] = R_lᵀ X_l` (as (out, in)).
pub fn skip_grad(cfg: &CltConfig, r: &[f32], x: &[f32], n_tokens: usize, out: &mut [Vec<f32>]) {
    let (l_n, d) = (cfg.n_layers, cfg.d_model);
    let row = l_n * d;
    for (l, g) in out.iter_mut().enumerate() {
        if n_tokens == 0 {
            g.iter_mut().for_each(|v| *v = 0.0);
            continue;
        }
        let rm = Mat::strided(&r[l * d..], n_tokens, d, row);
        let xm = Mat::strided(&x[l * d..], n_tokens, d, row);
        matmul(g, d, rm.t(), xm, 0.0, 1.0, Threads::All);
    }
}

/// Tokens per block in the backward pass: the encoder's block size, since block modes are per encoder block.
const BACKWARD_BLOCK: usize = super::encode::TOKEN_BLOCK;

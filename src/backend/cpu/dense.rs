//! The dense reference training step: the objective written as plainly as possible, with dense matrices.
//!
//! Every (token, feature) pair is decoded and differentiated, as the Python trainers do. It is the oracle the
//! sparse path is tested against and the baseline it is benchmarked against. It shares with the sparse path
//! only the feature selection rule (TopK/BatchTopK tie-breaking), the residual and the metrics.

use super::encode::{batch_topk_codes, dense_preact, topk_indices};
use super::gemm::{Mat, Threads, matmul};
use super::sparse::{residual, skip_grad, thresholds};
use crate::backend::grads::{Grads, Objective, StepStats, ThresholdGrad, target_variance};
use crate::clt::params::decoder_norms;
use crate::clt::{Activation, CltConfig, Params};

/// Dense loss and gradient. Fills `grads` with the full gradient (`dec_coef` zero, every row touched).
pub fn loss_and_grad(
    cfg: &CltConfig,
    params: &Params,
    x: &[f32],
    y: &[f32],
    n_tokens: usize,
    obj: &Objective,
    preact_mask: Option<&[Vec<bool>]>,
    grads: &mut Grads,
) -> StepStats {
    let (l_n, d, f_n) = (cfg.n_layers, cfg.d_model, cfg.n_features);
    let row = l_n * d;
    let bf = n_tokens.max(1) as f32;
    let thetas = thresholds(params);
    let norms = decoder_norms(cfg, &params.w_dec);
    let pre: Vec<Vec<f32>> = (0..l_n)
        .map(|l| dense_preact(cfg, params, l, x, n_tokens, Threads::All))
        .collect();
    let masks = selection_masks(cfg, &pre, &thetas, n_tokens);

    let mut yhat = vec![0.0f32; n_tokens * row];
    for b in 0..n_tokens {
        for k in 0..l_n {
            yhat[b * row + k * d..][..d].copy_from_slice(&params.b_dec[k]);
        }
    }
    let acts: Vec<Vec<f32>> = (0..l_n)
        .map(|l| {
            pre[l]
                .iter()
                .zip(&masks[l])
                .map(|(h, m)| if *m { *h } else { 0.0 })
                .collect()
        })
        .collect();
    for l in 0..l_n {
        let rl = cfg.dec_row_len(l);
        if n_tokens > 0 {
            matmul(
                &mut yhat[l * d..],
                row,
                Mat::rows(&acts[l], n_tokens, f_n),
                Mat::rows(&params.w_dec[l], f_n, rl),
                1.0,
                1.0,
                Threads::All,
            );
        }
    }
    if cfg.skip {
        for l in 0..l_n {
            for b in 0..n_tokens {
                for o in 0..d {
                    let xr = &x[b * row + l * d..][..d];
                    let wr = &params.w_skip[l][o * d..(o + 1) * d];
                    yhat[b * row + l * d + o] += xr.iter().zip(wr).map(|(a, w)| a * w).sum::<f32>();
                }
            }
        }
    }
    let (r, sq_err) = residual(&yhat, y, n_tokens, l_n, d);
    let mut stats = StepStats {
        n_tokens,
        recon: sq_err.iter().sum::<f64>() / bf as f64,
        sq_err,
        target_var: target_variance(y, n_tokens, l_n, d),
        ..Default::default()
    };
    let jump = cfg.has_threshold();
    let half = 0.5 * obj.bandwidth;
    for l in 0..l_n {
        let rl = cfg.dec_row_len(l);
        let (h, a, mask) = (&pre[l], &acts[l], &masks[l]);
        // G = ∂L/∂a = R_l W_dec_lᵀ + tanh term.
        let mut g = vec![0.0f32; n_tokens * f_n];
        if n_tokens > 0 {
            let rm = Mat::strided(&r[l * d..], n_tokens, rl, row);
            matmul(
                &mut g,
                f_n,
                rm,
                Mat::rows(&params.w_dec[l], f_n, rl).t(),
                0.0,
                1.0,
                Threads::All,
            );
        }
        let mut dh = vec![0.0f32; n_tokens * f_n];
        let mut dn = vec![0.0f32; f_n];
        let mut dth = vec![0.0f32; f_n];
        let mut n_inactive = vec![0.0f32; f_n];
        let (mut sparsity, mut preact) = (0.0f64, 0.0f64);
        let mut n_active = 0;
        for b in 0..n_tokens {
            for f in 0..f_n {
                let i = b * f_n + f;
                let (n, th) = (norms[l][f], thetas[l][f]);
                let preact_on = jump && preact_mask.is_none_or(|m| m[l][f]);
                let t = (obj.c * a[i] * n).tanh();
                g[i] += obj.lambda / bf * obj.c * n * (1.0 - t * t);
                sparsity += t as f64;
                dn[f] += obj.lambda / bf * obj.c * a[i] * (1.0 - t * t);
                if mask[i] {
                    dh[i] = g[i];
                    n_active += 1;
                } else if jump {
                    dh[i] = if preact_on {
                        -obj.lambda_preact / bf * n
                    } else {
                        0.0
                    };
                    n_inactive[f] += 1.0;
                }
                if jump {
                    if preact_on {
                        let relu = (th - h[i]).max(0.0);
                        preact += (relu * n) as f64;
                        dn[f] += obj.lambda_preact / bf * relu;
                    }
                    if (h[i] - th).abs() < half {
                        let weight = match obj.threshold_grad {
                            ThresholdGrad::Theta => th,
                            ThresholdGrad::Preact => h[i],
                        };
                        dth[f] += g[i] * (-weight / obj.bandwidth);
                    }
                }
            }
        }
        stats.sparsity += sparsity * obj.lambda as f64 / bf as f64;
        stats.preact += preact * obj.lambda_preact as f64 / bf as f64;
        stats.n_active.push(n_active);
        stats.n_window.push(0);
        stats.active_count.push(
            (0..f_n)
                .map(|f| (0..n_tokens).filter(|b| mask[b * f_n + f]).count() as u32)
                .collect(),
        );

        // Decoder: Aᵀ R_l plus the norm term.
        let gd = &mut grads.p.w_dec[l];
        if n_tokens > 0 {
            let rm = Mat::strided(&r[l * d..], n_tokens, rl, row);
            matmul(
                gd,
                rl,
                Mat::rows(a, n_tokens, f_n).t(),
                rm,
                0.0,
                1.0,
                Threads::All,
            );
        } else {
            gd.iter_mut().for_each(|v| *v = 0.0);
        }
        for f in 0..f_n {
            let n = norms[l][f];
            let coef = if n > 0.0 { dn[f] / n } else { 0.0 };
            for j in 0..rl {
                gd[f * rl + j] += coef * params.w_dec[l][f * rl + j];
            }
        }
        // Encoder: dHᵀ X_l.
        if n_tokens > 0 {
            let xm = Mat::strided(&x[l * d..], n_tokens, d, row);
            matmul(
                &mut grads.p.w_enc[l],
                d,
                Mat::rows(&dh, n_tokens, f_n).t(),
                xm,
                0.0,
                1.0,
                Threads::All,
            );
        } else {
            grads.p.w_enc[l].iter_mut().for_each(|v| *v = 0.0);
        }
        for f in 0..f_n {
            grads.p.b_enc[l][f] = (0..n_tokens).map(|b| dh[b * f_n + f]).sum();
            let th = thetas[l][f];
            let on = preact_mask.is_none_or(|m| m[l][f]);
            let preact_term = if on {
                obj.lambda_preact / bf * norms[l][f] * n_inactive[f]
            } else {
                0.0
            };
            grads.p.log_theta[l][f] = if jump {
                th * (dth[f] + preact_term)
            } else {
                0.0
            };
        }
        grads.dec_coef[l].iter_mut().for_each(|v| *v = 0.0);
        grads.dec_touched[l].iter_mut().for_each(|v| *v = true);
    }
    for k in 0..l_n {
        for i in 0..d {
            grads.p.b_dec[k][i] = (0..n_tokens).map(|b| r[b * row + k * d + i]).sum();
        }
    }
    if cfg.skip {
        skip_grad(cfg, &r, x, n_tokens, &mut grads.p.w_skip);
    }
    stats
}

/// Which (token, feature) pairs are active, per layer, as dense `[B][F]` masks.
pub fn selection_masks(
    cfg: &CltConfig,
    pre: &[Vec<f32>],
    thetas: &[Vec<f32>],
    n_tokens: usize,
) -> Vec<Vec<bool>> {
    let f_n = cfg.n_features;
    match cfg.activation {
        Activation::JumpRelu => pre
            .iter()
            .zip(thetas)
            .map(|(h, th)| {
                h.iter()
                    .enumerate()
                    .map(|(i, v)| *v > th[i % f_n])
                    .collect()
            })
            .collect(),
        Activation::TopK { k } => pre
            .iter()
            .map(|h| {
                let mut m = vec![false; h.len()];
                for (b, hr) in h.chunks_exact(f_n).enumerate() {
                    for f in topk_indices(hr, k) {
                        m[b * f_n + f as usize] = hr[f as usize] > 0.0;
                    }
                }
                m
            })
            .collect(),
        Activation::BatchTopK { k, across_layers } => {
            batch_topk_codes(pre, n_tokens, f_n, k, across_layers)
                .into_iter()
                .map(|c| {
                    let mut m = vec![false; n_tokens * f_n];
                    for b in 0..n_tokens {
                        for e in c.offsets[b]..c.offsets[b + 1] {
                            m[b * f_n + c.feat[e] as usize] = true;
                        }
                    }
                    m
                })
                .collect()
        }
    }
}

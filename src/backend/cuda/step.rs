//! One training step's loss and gradient on the device: the kernels chained on one stream (encode, sparse
//! decode with the residual, each layer's backward, the decoder-bias gradient), with the statistics the
//! CPU step reports.
//!
//! CPU reference: [`crate::backend::cpu::sparse::loss_and_grad`] (same arguments, same [`Grads`] form).
//! This version uploads the parameters on every call and downloads the gradients (a correctness harness
//! for the kernels and the basis for a resident training loop); skip connections are not supported yet.

use super::backward::{self, LayerGradInput, col_sum};
use super::context::Gpu;
use super::decode::{DecodeLayer, sparse_decode};
use super::encode::{self, DeviceCodes, EncodeInput, WindowStats};
use super::memory::DBuf;
use super::topk;
use crate::backend::cpu::sparse::thresholds;
use crate::backend::grads::{Grads, Objective, StepStats, target_variance};
use crate::clt::{Activation, CltConfig, DecoderKind, Params};
use crate::{Error, Result};

/// First guess at the longest per-token list of the JumpReLU encoder (it re-runs with more room).
const CAP_GUESS: usize = 64;

/// The step's loss and gradient, as [`crate::backend::cpu::sparse::loss_and_grad`] computes them.
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grad(
    gpu: &Gpu,
    cfg: &CltConfig,
    params: &Params,
    dec_norms: &[Vec<f32>],
    x: &[f32],
    y: &[f32],
    n_tokens: usize,
    obj: &Objective,
    preact_mask: Option<&[Vec<bool>]>,
    grads: &mut Grads,
) -> Result<StepStats> {
    if cfg.skip {
        return Err(Error::Unsupported(
            "skip connections on the CUDA backend (use --backend cpu)".into(),
        ));
    }
    let (l_n, d, f_n) = (cfg.n_layers, cfg.d_model, cfg.n_features);
    let row = l_n * d;
    let bf = n_tokens.max(1) as f32;
    let jump = cfg.has_threshold();
    let thetas = thresholds(params);

    let x_dev = gpu.upload(x)?;
    let x_bf = encode::to_bf16(gpu, &x_dev)?;
    let y_dev = gpu.upload(y)?;
    let w_enc: Vec<DBuf<u16>> = params
        .w_enc
        .iter()
        .map(|w| gpu.upload_bf16(w))
        .collect::<Result<_>>()?;
    let b_enc: Vec<DBuf<f32>> = params
        .b_enc
        .iter()
        .map(|b| gpu.upload(b))
        .collect::<Result<_>>()?;
    let theta: Vec<DBuf<f32>> = thetas
        .iter()
        .map(|t| gpu.upload(t))
        .collect::<Result<_>>()?;
    let w_dec: Vec<DBuf<u16>> = params
        .w_dec
        .iter()
        .map(|w| gpu.upload_bf16(w))
        .collect::<Result<_>>()?;
    let norms: Vec<DBuf<f32>> = dec_norms
        .iter()
        .map(|n| gpu.upload(n))
        .collect::<Result<_>>()?;
    let input = |l: usize| EncodeInput {
        x: &x_bf,
        x_offset: l * d,
        x_stride: row,
        n_tokens,
        d,
        w: &w_enc[l],
        bias: &b_enc[l],
        n_features: f_n,
    };

    // Encode.
    let empty_window = || -> Result<WindowStats> {
        Ok(WindowStats {
            preact_sum: gpu.zeros(f_n)?,
            near_count: gpu.zeros(f_n)?,
            near_h: gpu.zeros(f_n)?,
        })
    };
    let mut layers: Vec<(DeviceCodes, WindowStats)> = Vec::with_capacity(l_n);
    match cfg.activation {
        Activation::JumpRelu => {
            for l in 0..l_n {
                layers.push(encode::jumprelu(
                    gpu,
                    &input(l),
                    &theta[l],
                    0.5 * obj.bandwidth,
                    CAP_GUESS,
                )?);
            }
        }
        Activation::TopK { k } => {
            for l in 0..l_n {
                let h = encode::dense(gpu, &input(l))?;
                layers.push((topk::topk_rows(gpu, &h, n_tokens, f_n, k)?, empty_window()?));
            }
        }
        Activation::BatchTopK { k, across_layers } => {
            let per = n_tokens * f_n;
            let h = gpu.output::<f32>(l_n * per)?;
            for l in 0..l_n {
                encode::dense_into(gpu, &input(l), &h, l * per)?;
            }
            for c in topk::batch_topk(gpu, &h, l_n, n_tokens, f_n, k, across_layers)? {
                layers.push((c, empty_window()?));
            }
        }
    }

    // Decode, residual, squared errors.
    let cross = cfg.decoder == DecoderKind::CrossLayer;
    let views: Vec<DecodeLayer> = (0..l_n)
        .map(|l| DecodeLayer {
            codes: &layers[l].0,
            w_dec: &w_dec[l],
            row_len: cfg.dec_row_len(l),
        })
        .collect();
    let b_dec_host: Vec<f32> = params.b_dec.concat();
    let b_dec = gpu.upload(&b_dec_host)?;
    let out = sparse_decode(gpu, &views, &b_dec, Some(&y_dev), d, cross, 2.0 / bf)?;
    let resid = out.resid.expect("decode with targets gives residuals");
    let sq = gpu.download(
        &out.sq_err
            .expect("decode with targets gives squared errors"),
    )?;
    let mut sq_err = vec![0.0f64; l_n];
    for b in 0..n_tokens {
        for (k, s) in sq_err.iter_mut().enumerate() {
            *s += sq[b * l_n + k] as f64;
        }
    }
    let mut stats = StepStats {
        n_tokens,
        recon: sq_err.iter().sum::<f64>() / bf as f64,
        sq_err,
        target_var: target_variance(y, n_tokens, l_n, d),
        ..Default::default()
    };

    // Backward, layer by layer.
    let mask_dev: Vec<Option<DBuf<u8>>> = match preact_mask {
        Some(m) => m
            .iter()
            .map(|ml| {
                let bytes: Vec<u8> = ml.iter().map(|v| *v as u8).collect();
                gpu.upload(&bytes).map(Some)
            })
            .collect::<Result<_>>()?,
        None => (0..l_n).map(|_| None).collect(),
    };
    for (l, (codes, window)) in layers.iter().enumerate() {
        let g = backward::layer_grads(
            gpu,
            &LayerGradInput {
                codes,
                window,
                w_dec: &w_dec[l],
                row_len: cfg.dec_row_len(l),
                n_features: f_n,
                norms: &norms[l],
                theta: &theta[l],
                x: &x_dev,
                resid: &resid,
                layer: l,
                n_layers: l_n,
                d,
                preact_mask: mask_dev[l].as_ref(),
                obj: *obj,
                jump,
            },
        )?;
        grads.p.w_enc[l] = gpu.download(&g.w_enc)?;
        grads.p.w_dec[l] = gpu.download(&g.w_dec)?;
        grads.p.b_enc[l] = gpu.download(&g.b_enc)?;
        grads.p.log_theta[l] = gpu.download(&g.log_theta)?;
        grads.dec_coef[l] = gpu.download(&g.dec_coef)?;
        grads.dec_touched[l] = gpu.download(&g.touched)?.iter().map(|t| *t != 0).collect();
        let active = gpu.download(&g.active_count)?;
        let spars: f64 = gpu.download(&g.sparsity)?.iter().map(|v| *v as f64).sum();
        stats.sparsity += spars * obj.lambda as f64 / bf as f64;
        if jump {
            let ps = gpu.download(&window.preact_sum)?;
            let p: f64 = ps
                .iter()
                .zip(&dec_norms[l])
                .enumerate()
                .filter(|(f, _)| preact_mask.is_none_or(|m| m[l][*f]))
                .map(|(_, (s, n))| *s as f64 * *n as f64)
                .sum();
            stats.preact += p * obj.lambda_preact as f64 / bf as f64;
        }
        stats
            .n_active
            .push(active.iter().map(|v| *v as usize).sum());
        let near = gpu.download(&window.near_count)?;
        stats.n_window.push(near.iter().map(|v| *v as usize).sum());
        stats.active_count.push(active);
    }
    for k in 0..l_n {
        grads.p.b_dec[k] = gpu.download(&col_sum(gpu, &resid, k * d, row, n_tokens, d)?)?;
    }
    Ok(stats)
}

//! Data-dependent initialisation: the normalisation scalars and the encoder-bias calibration.

use crate::Result;
use crate::backend::cpu::encode::dense_preact;
use crate::backend::cpu::gemm::Threads;
use crate::clt::{CltConfig, NormScales, Params};
use crate::data::{ActivationSource, Batch};

/// Most tokens kept in memory for calibrating `b_enc`.
pub const MAX_CALIBRATION_TOKENS: usize = 8192;

/// Draws `n_batches` batches of `batch_size` tokens and returns `s = √d / mean ‖·‖` per layer for inputs and
/// targets, plus up to [`MAX_CALIBRATION_TOKENS`] of the (raw) tokens for [`calibrate_b_enc`].
pub fn estimate_norms(
    source: &mut dyn ActivationSource,
    batch_size: usize,
    n_batches: usize,
) -> Result<(NormScales, Batch)> {
    let dims = source.dims();
    let (l_n, d) = (dims.n_layers, dims.d_model);
    let mut sum_in = vec![0.0f64; l_n];
    let mut sum_out = vec![0.0f64; l_n];
    let mut count = 0usize;
    let mut kept = Batch::default();
    let mut batch = Batch::default();
    for _ in 0..n_batches {
        source.next_batch(batch_size, &mut batch)?;
        for (i, (xr, yr)) in batch
            .x
            .chunks_exact(d)
            .zip(batch.y.chunks_exact(d))
            .enumerate()
        {
            let l = i % l_n;
            sum_in[l] += xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            sum_out[l] += yr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        }
        count += batch.n_tokens;
        let room = MAX_CALIBRATION_TOKENS
            .saturating_sub(kept.n_tokens)
            .min(batch.n_tokens);
        kept.x.extend_from_slice(&batch.x[..room * l_n * d]);
        kept.y.extend_from_slice(&batch.y[..room * l_n * d]);
        kept.n_tokens += room;
    }
    let scale = |s: f64| {
        let mean = s / count.max(1) as f64;
        if mean > 0.0 {
            ((d as f64).sqrt() / mean) as f32
        } else {
            1.0
        }
    };
    Ok((
        NormScales {
            input: sum_in.into_iter().map(scale).collect(),
            target: sum_out.into_iter().map(scale).collect(),
        },
        kept,
    ))
}

/// Sets `b_enc` so that, on the calibration tokens `x` (normalised), each feature's pre-activation exceeds the
/// initial threshold θ₀ on a fraction `rate` of tokens: `b_f = θ₀ − q_f`, with `q_f` the `(1 − rate)` quantile
/// of `x · W_enc[f]`. For TopK/BatchTopK (no threshold) θ₀ is taken as 0.
pub fn calibrate_b_enc(
    cfg: &CltConfig,
    params: &mut Params,
    x: &[f32],
    n_tokens: usize,
    rate: f64,
) {
    if n_tokens == 0 {
        return;
    }
    let f_n = cfg.n_features;
    for l in 0..cfg.n_layers {
        params.b_enc[l].iter_mut().for_each(|b| *b = 0.0);
        let h = dense_preact(cfg, params, l, x, n_tokens, Threads::All);
        let theta0 = if cfg.has_threshold() {
            params.log_theta[l][0].exp()
        } else {
            0.0
        };
        let rank = (((1.0 - rate) * n_tokens as f64).floor() as usize).min(n_tokens - 1);
        let mut col = vec![0.0f32; n_tokens];
        for f in 0..f_n {
            for (b, c) in col.iter_mut().enumerate() {
                *c = h[b * f_n + f];
            }
            let (_, q, _) = col.select_nth_unstable_by(rank, |a, b| a.total_cmp(b));
            let th = if cfg.has_threshold() {
                params.log_theta[l][f].exp()
            } else {
                theta0
            };
            params.b_enc[l][f] = th - *q;
        }
    }
}

/// The default calibration firing rate: 10,000 / (L·F), at most 1.
pub fn default_fire_rate(cfg: &CltConfig) -> f64 {
    (10_000.0 / (cfg.n_layers * cfg.n_features) as f64).min(1.0)
}

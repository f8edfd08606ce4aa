//! Conversion of a BatchTopK (or TopK) transcoder into a JumpReLU one, as crosslayer-coding does it.
//!
//! 1. On calibration batches, run the model's own selection and record, per feature and batch, the smallest
//!    pre-activation that was selected; the feature's threshold is the mean of those minima over the batches in
//!    which it was selected (a feature never selected gets a threshold above every pre-activation seen).
//! 2. Per layer, scale the thresholds by one factor, found by bisection, so that the JumpReLU model's L0 on the
//!    calibration tokens matches the L0 of the original selection.

use super::{Activation, Transcoder};
use crate::backend::cpu::encode::{batch_topk_codes, dense_preact, topk_indices};
use crate::backend::cpu::gemm::Threads;
use crate::data::{ActivationSource, Batch};
use crate::{Error, Result};

/// What the conversion measured.
#[derive(Clone, Debug, PartialEq)]
pub struct ConversionReport {
    /// L0 per layer of the original selection on the calibration tokens.
    pub target_l0: Vec<f64>,
    /// L0 per layer of the converted JumpReLU model on the same tokens.
    pub jumprelu_l0: Vec<f64>,
    /// The per-layer threshold scale found by the search.
    pub scale: Vec<f32>,
}

/// Converts `t` (TopK or BatchTopK) to JumpReLU using `n_batches` batches of `batch_size` tokens.
pub fn batchtopk_to_jumprelu(
    t: &Transcoder,
    source: &mut dyn ActivationSource,
    batch_size: usize,
    n_batches: usize,
) -> Result<(Transcoder, ConversionReport)> {
    let cfg = &t.cfg;
    let (l_n, f_n) = (cfg.n_layers, cfg.n_features);
    if matches!(cfg.activation, Activation::JumpRelu) {
        return Err(Error::Unsupported(
            "the transcoder is already JumpReLU".into(),
        ));
    }
    if n_batches == 0 || batch_size == 0 {
        return Err(Error::config(
            "calibration",
            "needs at least one batch of at least one token",
        ));
    }
    let mut sum_min = vec![vec![0.0f64; f_n]; l_n];
    let mut n_sel = vec![vec![0u32; f_n]; l_n];
    let mut max_pre = vec![f32::NEG_INFINITY; l_n];
    let mut selected_total = vec![0usize; l_n];
    let mut all_pre: Vec<Vec<f32>> = vec![Vec::new(); l_n];
    let mut batch = Batch::default();
    let mut tokens = 0usize;
    for _ in 0..n_batches {
        source.next_batch(batch_size, &mut batch)?;
        t.norms.apply(cfg.d_model, &mut batch.x, &mut batch.y);
        let n = batch.n_tokens;
        let pre: Vec<Vec<f32>> = (0..l_n)
            .map(|l| dense_preact(cfg, &t.params, l, &batch.x, n, Threads::All))
            .collect();
        let codes = match cfg.activation {
            Activation::BatchTopK { k, across_layers } => {
                batch_topk_codes(&pre, n, f_n, k, across_layers)
            }
            Activation::TopK { k } => {
                // Per-token selection, expressed as the same CSR.
                pre.iter()
                    .map(|h| {
                        let mut c = crate::backend::cpu::encode::LayerCodes {
                            offsets: vec![0],
                            ..Default::default()
                        };
                        for row in h.chunks_exact(f_n) {
                            for f in topk_indices(row, k) {
                                if row[f as usize] > 0.0 {
                                    c.feat.push(f);
                                    c.pre.push(row[f as usize]);
                                    c.act.push(row[f as usize]);
                                }
                            }
                            c.offsets.push(c.feat.len());
                        }
                        c
                    })
                    .collect()
            }
            Activation::JumpRelu => unreachable!(),
        };
        for l in 0..l_n {
            let mut batch_min = vec![f32::INFINITY; f_n];
            for (f, h) in codes[l].feat.iter().zip(&codes[l].pre) {
                let f = *f as usize;
                batch_min[f] = batch_min[f].min(*h);
            }
            for f in 0..f_n {
                if batch_min[f].is_finite() {
                    sum_min[l][f] += batch_min[f] as f64;
                    n_sel[l][f] += 1;
                }
            }
            selected_total[l] += codes[l].feat.len();
            max_pre[l] = pre[l].iter().fold(max_pre[l], |m, v| m.max(*v));
            all_pre[l].extend_from_slice(&pre[l]);
        }
        tokens += n;
    }
    let mut out = t.clone();
    out.cfg.activation = Activation::JumpRelu;
    let mut report = ConversionReport {
        target_l0: Vec::new(),
        jumprelu_l0: Vec::new(),
        scale: Vec::new(),
    };
    for l in 0..l_n {
        let base: Vec<f32> = (0..f_n)
            .map(|f| {
                if n_sel[l][f] > 0 {
                    (sum_min[l][f] / n_sel[l][f] as f64).max(1e-6) as f32
                } else {
                    (max_pre[l].abs() + 1.0) * 2.0 // above everything seen: never fires
                }
            })
            .collect();
        let target = selected_total[l] as f64 / tokens as f64;
        let l0 = |s: f32| {
            let n = all_pre[l]
                .iter()
                .enumerate()
                .filter(|(i, h)| **h > base[i % f_n] * s)
                .count();
            n as f64 / tokens as f64
        };
        // L0 falls as s grows: bisect in log space on [1/16, 16].
        let (mut lo, mut hi) = ((1.0f32 / 16.0).ln(), 16.0f32.ln());
        for _ in 0..40 {
            let mid = 0.5 * (lo + hi);
            if l0(mid.exp()) > target {
                lo = mid
            } else {
                hi = mid
            }
        }
        let s = (0.5 * (lo + hi)).exp();
        out.params.log_theta[l] = base.iter().map(|b| (b * s).ln()).collect();
        report.target_l0.push(target);
        report.jumprelu_l0.push(l0(s));
        report.scale.push(s);
    }
    Ok((out, report))
}

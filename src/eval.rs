//! Evaluation of a trained transcoder on held-out activations: NMSE, explained variance and L0 per layer.

use crate::Result;
use crate::backend::cpu::sparse::{forward, residual};
use crate::backend::grads::target_variance;
use crate::clt::Transcoder;
use crate::data::{ActivationSource, Batch};

/// Reconstruction quality on a batch.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvalReport {
    pub n_tokens: usize,
    pub nmse: f64,
    pub nmse_per_layer: Vec<f64>,
    pub l0_per_layer: Vec<f64>,
}

/// Evaluates `t` on `n_tokens` tokens drawn from `source` after skipping to token `skip_to` when the source
/// is positionable by a token counter (a held-out region of a synthetic stream); pass 0 to read on.
pub fn evaluate(
    t: &Transcoder,
    source: &mut dyn ActivationSource,
    n_tokens: usize,
    skip_to: u64,
) -> Result<EvalReport> {
    if skip_to > 0 {
        source.restore(&serde_json::json!({ "next_token": skip_to, "cursor": 0 }))?;
    }
    let mut batch = Batch::default();
    source.next_batch(n_tokens, &mut batch)?;
    let cfg = &t.cfg;
    t.norms.apply(cfg.d_model, &mut batch.x, &mut batch.y);
    let (codes, yhat) = forward(cfg, &t.params, &batch.x, n_tokens, 1.0);
    let (_, sq) = residual(&yhat, &batch.y, n_tokens, cfg.n_layers, cfg.d_model);
    let var = target_variance(&batch.y, n_tokens, cfg.n_layers, cfg.d_model);
    Ok(EvalReport {
        n_tokens,
        nmse: sq.iter().sum::<f64>() / var.iter().sum::<f64>().max(1e-30),
        nmse_per_layer: sq.iter().zip(&var).map(|(s, v)| s / v.max(1e-30)).collect(),
        l0_per_layer: codes
            .iter()
            .map(|c| c.n_active() as f64 / n_tokens.max(1) as f64)
            .collect(),
    })
}

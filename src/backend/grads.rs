//! The objective's per-step settings, the statistics a step reports, and the gradient buffers.

use crate::clt::{CltConfig, Params};

/// Which straight-through estimate the threshold gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdGrad {
    /// `∂a/∂θ = −(θ/ε) · 1[|h − θ| < ε/2]` (CLT-Forge, SAELens, the JumpReLU paper).
    #[default]
    Theta,
    /// `∂a/∂θ = −(h/ε) · 1[|h − θ| < ε/2]` (crosslayer-coding). Its window entries are always listed, so a wide
    /// bandwidth makes it slower than `Theta`.
    Preact,
}

/// The loss coefficients in force for one step (λ after its ramp).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Objective {
    /// Sparsity coefficient λ of `Σ tanh(c · a · ‖W_dec‖)`.
    pub lambda: f32,
    /// The tanh scale `c`.
    pub c: f32,
    /// Pre-activation loss coefficient λ_p of `Σ ReLU(θ − h) · ‖W_dec‖`.
    pub lambda_preact: f32,
    /// Bandwidth ε of the rectangle kernel in the threshold's straight-through gradient.
    pub bandwidth: f32,
    /// The threshold's straight-through estimate.
    pub threshold_grad: ThresholdGrad,
}

/// What one forward/backward step measured (sums over the batch, per layer where it says so).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepStats {
    pub n_tokens: usize,
    /// Reconstruction loss `Σ_k ‖ŷ_k − y_k‖²`, averaged over the batch.
    pub recon: f64,
    /// Sparsity loss (with the λ of this step), averaged over the batch.
    pub sparsity: f64,
    /// Pre-activation loss, averaged over the batch.
    pub preact: f64,
    /// Per layer: `Σ_b ‖ŷ_l − y_l‖²`.
    pub sq_err: Vec<f64>,
    /// Per layer: `Σ_b ‖y_l − ȳ_l‖²` (ȳ the batch mean).
    pub target_var: Vec<f64>,
    /// Per layer: number of active (token, feature) pairs.
    pub n_active: Vec<usize>,
    /// Per layer: number of near-threshold (token, feature) pairs that were not active.
    pub n_window: Vec<usize>,
    /// Per layer, per feature: the number of tokens on which the feature fired.
    pub active_count: Vec<Vec<u32>>,
}

impl StepStats {
    /// The total loss.
    pub fn loss(&self) -> f64 {
        self.recon + self.sparsity + self.preact
    }

    /// Normalised MSE (fraction of variance unexplained) of layer `l`.
    pub fn nmse(&self, l: usize) -> f64 {
        self.sq_err[l] / self.target_var[l].max(1e-30)
    }

    /// NMSE over all layers together.
    pub fn nmse_total(&self) -> f64 {
        self.sq_err.iter().sum::<f64>() / self.target_var.iter().sum::<f64>().max(1e-30)
    }

    /// Mean active features per token at layer `l`.
    pub fn l0(&self, l: usize) -> f64 {
        self.n_active[l] as f64 / self.n_tokens.max(1) as f64
    }
}

/// Gradient buffers.
///
/// The decoder gradient is kept in two parts so that a step touches only the rows of features that fired:
/// `p.w_dec` holds the data term `Σ_b a_b r_b` (nonzero only on rows listed in `dec_touched`), and the
/// decoder-norm terms of the loss add `dec_coef[l][f] · W_dec[l, f]` to every row, which the optimiser applies
/// on the fly. [`Grads::materialize`] adds the two for tests and tools.
#[derive(Clone, Debug, PartialEq)]
pub struct Grads {
    pub p: Params,
    /// Per layer, per feature: `∂L/∂‖W_dec[l, f]‖ / ‖W_dec[l, f]‖`.
    pub dec_coef: Vec<Vec<f32>>,
    /// Per layer, per feature: whether `p.w_dec`'s row is (possibly) nonzero.
    pub dec_touched: Vec<Vec<bool>>,
}

impl Grads {
    /// Zero gradients for `cfg`.
    pub fn zeros(cfg: &CltConfig) -> Self {
        Grads {
            p: Params::zeros(cfg),
            dec_coef: (0..cfg.n_layers)
                .map(|_| vec![0.0; cfg.n_features])
                .collect(),
            dec_touched: (0..cfg.n_layers)
                .map(|_| vec![false; cfg.n_features])
                .collect(),
        }
    }

    /// The full gradient as plain tensors (decoder rows with the norm terms added).
    pub fn materialize(&self, cfg: &CltConfig, params: &Params) -> Params {
        let mut g = self.p.clone();
        for l in 0..cfg.n_layers {
            let rl = cfg.dec_row_len(l);
            for (f, (grow, wrow)) in g.w_dec[l]
                .chunks_exact_mut(rl)
                .zip(params.w_dec[l].chunks_exact(rl))
                .enumerate()
            {
                let c = self.dec_coef[l][f];
                grow.iter_mut().zip(wrow).for_each(|(gv, wv)| *gv += c * wv);
            }
        }
        g
    }
}

/// `Σ_b ‖y_l[b] − ȳ_l‖²` per layer of a `[B][L][d]` batch (two passes, f64).
pub fn target_variance(y: &[f32], n_tokens: usize, n_layers: usize, d: usize) -> Vec<f64> {
    (0..n_layers)
        .map(|l| {
            let mut mean = vec![0.0f64; d];
            for b in 0..n_tokens {
                let row = &y[(b * n_layers + l) * d..][..d];
                mean.iter_mut().zip(row).for_each(|(m, v)| *m += *v as f64);
            }
            mean.iter_mut().for_each(|m| *m /= n_tokens.max(1) as f64);
            let mut var = 0.0;
            for b in 0..n_tokens {
                let row = &y[(b * n_layers + l) * d..][..d];
                var += row
                    .iter()
                    .zip(&mean)
                    .map(|(v, m)| (*v as f64 - m).powi(2))
                    .sum::<f64>();
            }
            var
        })
        .collect()
}

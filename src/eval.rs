//! Evaluation of a trained transcoder on held-out activations: NMSE, explained variance and L0 per layer.
//!
//! The tokens are read in batches of at most [`EVAL_BATCH`] and the statistics merged, so memory does not
//! grow with the number of tokens evaluated. A layer's NMSE is its squared reconstruction error over the
//! target's variance about its per-dimension mean, both summed over every evaluated token (the variance
//! merged across batches with Chan et al.'s pairwise update, as exact as one pass over all tokens).

use crate::Result;
use crate::backend::cpu::sparse::{forward, residual};
use crate::clt::Transcoder;
use crate::data::{ActivationSource, Batch};

/// The most tokens evaluated at once.
pub const EVAL_BATCH: usize = 4096;

/// Reconstruction quality on a batch.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvalReport {
    pub n_tokens: usize,
    pub nmse: f64,
    pub nmse_per_layer: Vec<f64>,
    pub l0_per_layer: Vec<f64>,
    /// Features of each layer that fired on none of the evaluated tokens.
    pub dead_per_layer: Vec<usize>,
}

/// Per layer and dimension: the count, mean and sum of squared deviations of the targets seen so far.
struct TargetMoments {
    n: f64,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl TargetMoments {
    fn new(n_layers: usize, d: usize) -> Self {
        TargetMoments {
            n: 0.0,
            mean: vec![0.0; n_layers * d],
            m2: vec![0.0; n_layers * d],
        }
    }

    /// Merges the targets `y` (`[n_tokens][L][d]`) of one batch.
    fn add(&mut self, y: &[f32], n_tokens: usize) {
        if n_tokens == 0 {
            return;
        }
        let row = self.mean.len();
        let nb = n_tokens as f64;
        let mut mean_b = vec![0.0f64; row];
        for t in y.chunks_exact(row).take(n_tokens) {
            mean_b.iter_mut().zip(t).for_each(|(m, v)| *m += *v as f64);
        }
        mean_b.iter_mut().for_each(|m| *m /= nb);
        let mut m2_b = vec![0.0f64; row];
        for t in y.chunks_exact(row).take(n_tokens) {
            m2_b.iter_mut()
                .zip(t)
                .zip(&mean_b)
                .for_each(|((s, v), m)| *s += (*v as f64 - m).powi(2));
        }
        let n = self.n + nb;
        for i in 0..row {
            let delta = mean_b[i] - self.mean[i];
            self.m2[i] += m2_b[i] + delta * delta * self.n * nb / n;
            self.mean[i] += delta * nb / n;
        }
        self.n = n;
    }

    /// The summed variance of each layer's targets (`Σ_b ‖y_bl − ȳ_l‖²`).
    fn per_layer(&self, d: usize) -> Vec<f64> {
        self.m2.chunks_exact(d).map(|c| c.iter().sum()).collect()
    }
}

/// Evaluates `t` on `n_tokens` tokens drawn from `source` after skipping to token `skip_to` when the source
/// is positionable by a token counter (a held-out region of a synthetic stream); pass 0 to read on. The
/// caller keeps `n_tokens` within what the source holds (a store's loader would start another epoch).
pub fn evaluate(
    t: &Transcoder,
    source: &mut dyn ActivationSource,
    n_tokens: usize,
    skip_to: u64,
) -> Result<EvalReport> {
    if skip_to > 0 {
        source.restore(&serde_json::json!({ "next_token": skip_to, "cursor": 0 }))?;
    }
    let cfg = &t.cfg;
    let (l_n, d) = (cfg.n_layers, cfg.d_model);
    let mut moments = TargetMoments::new(l_n, d);
    let mut sq = vec![0.0f64; l_n];
    let mut active = vec![0usize; l_n];
    let mut fired = vec![vec![0u64; cfg.n_features]; l_n];
    let mut batch = Batch::default();
    let mut done = 0;
    while done < n_tokens {
        let n = (n_tokens - done).min(EVAL_BATCH);
        source.next_batch(n, &mut batch)?;
        t.norms.apply(d, &mut batch.x, &mut batch.y);
        let (codes, yhat) = forward(cfg, &t.params, &batch.x, n, 1.0);
        let (_, sq_b) = residual(&yhat, &batch.y, n, l_n, d);
        sq.iter_mut().zip(&sq_b).for_each(|(s, b)| *s += b);
        active
            .iter_mut()
            .zip(&codes)
            .for_each(|(a, c)| *a += c.n_active());
        for (f, c) in fired.iter_mut().zip(&codes) {
            f.iter_mut()
                .zip(&c.active_count)
                .for_each(|(f, a)| *f += *a as u64);
        }
        moments.add(&batch.y, n);
        done += n;
    }
    let var = moments.per_layer(d);
    Ok(EvalReport {
        n_tokens,
        nmse: sq.iter().sum::<f64>() / var.iter().sum::<f64>().max(1e-30),
        nmse_per_layer: sq.iter().zip(&var).map(|(s, v)| s / v.max(1e-30)).collect(),
        l0_per_layer: active
            .iter()
            .map(|a| *a as f64 / n_tokens.max(1) as f64)
            .collect(),
        dead_per_layer: fired
            .iter()
            .map(|f| f.iter().filter(|c| **c == 0).count())
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::grads::target_variance;
    use crate::rng::Rng;

    #[test]
    fn merged_moments_match_one_pass_over_all_tokens() {
        let (l_n, d) = (3, 5);
        let mut rng = Rng::seed(7);
        // Offsets far from zero per layer, so a naive sum of squares would lose digits.
        let y: Vec<f32> = (0..10_000 * l_n * d)
            .map(|i| 1000.0 * ((i / d) % l_n) as f32 + rng.normal() as f32)
            .collect();
        let want = target_variance(&y, 10_000, l_n, d);
        for cuts in [vec![10_000], vec![1, 4095, 4096, 1808], vec![3333, 0, 6667]] {
            let mut m = TargetMoments::new(l_n, d);
            let mut at = 0;
            for c in cuts {
                m.add(&y[at * l_n * d..(at + c) * l_n * d], c);
                at += c;
            }
            for (g, w) in m.per_layer(d).iter().zip(&want) {
                assert!((g - w).abs() <= 1e-9 * w, "{g} vs {w}");
            }
        }
    }
}

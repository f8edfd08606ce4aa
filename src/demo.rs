//! The demonstrations behind `clt demo`: small, complete runs that show the engine working end to end.

use crate::Result;
use crate::clt::{Activation, CltConfig, DecoderKind};
use crate::data::ActDims;
use crate::data::synthetic::{SyntheticConfig, SyntheticGenerator};
use crate::train::{DataConfig, LambdaRamp, RunConfig, TrainConfig, Trainer};
use std::path::Path;

/// The synthetic-ground-truth run: 4 layers of width 32, 24 planted features per layer, a CLT with 64 features
/// per layer. Sized to finish well under two minutes on one core.
pub fn synthetic_config() -> RunConfig {
    RunConfig {
        model: CltConfig {
            n_layers: 4,
            d_model: 32,
            n_features: 64,
            decoder: DecoderKind::CrossLayer,
            activation: Activation::JumpRelu,
            skip: false,
        },
        train: TrainConfig {
            steps: 3000,
            batch_size: 256,
            lr: 2e-3,
            warmup_steps: 100,
            decay_fraction: 0.1,
            lambda_sparsity: 1.0,
            lambda_ramp: LambdaRamp::Cosine,
            lambda_wait_fraction: 0.0,
            lambda_ramp_fraction: 0.8,
            init_fire_rate: Some(0.1),
            // Planted activations are O(5) after normalisation: start the thresholds at 1 rather than 0.03, so
            // that the log-threshold (moved by Adam at about lr per step) reaches its scale within the run.
            theta_init: 1.0,
            log_every: 250,
            ..TrainConfig::default()
        },
        data: DataConfig::Synthetic(SyntheticConfig {
            features_per_layer: 24,
            fire_prob: 0.05,
            max_span: 3,
            noise: 0.01,
            seed: 7,
        }),
    }
}

/// The outcome of the synthetic demo.
#[derive(Clone, Debug)]
pub struct SyntheticReport {
    /// NMSE per layer and overall on a fresh evaluation batch.
    pub nmse_per_layer: Vec<f64>,
    pub nmse: f64,
    pub l0_per_layer: Vec<f64>,
    /// Best decoder cosine similarity of each planted feature.
    pub recovery: Vec<f32>,
    /// Fraction of planted features matched with cosine ≥ 0.9.
    pub recovered_fraction: f64,
    pub seconds: f64,
}

/// Trains on the synthetic ground truth and measures recovery.
pub fn run_synthetic(run: RunConfig, out: &Path, quiet: bool) -> Result<SyntheticReport> {
    let t0 = std::time::Instant::now();
    let mut trainer = Trainer::new(run.clone())?;
    trainer.train(out, quiet)?;
    let DataConfig::Synthetic(s) = &run.data else {
        return Err(crate::Error::config(
            "data.kind",
            "the synthetic demo needs kind = \"synthetic\"",
        ));
    };
    let dims = ActDims {
        n_layers: run.model.n_layers,
        d_model: run.model.d_model,
    };
    let generator = SyntheticGenerator::new(dims, s.clone());
    let recovery = generator.recovery(&run.model, &trainer.params, &trainer.norms);
    let eval = crate::eval::evaluate(
        &trainer.transcoder(),
        &mut SyntheticGenerator::new(
            dims,
            SyntheticConfig {
                seed: s.seed,
                ..s.clone()
            },
        ),
        4096,
        1u64 << 40,
    )?;
    let recovered =
        recovery.iter().filter(|c| **c >= 0.9).count() as f64 / recovery.len().max(1) as f64;
    Ok(SyntheticReport {
        nmse_per_layer: eval.nmse_per_layer,
        nmse: eval.nmse,
        l0_per_layer: eval.l0_per_layer,
        recovery,
        recovered_fraction: recovered,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

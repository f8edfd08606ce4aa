//! Learning-rate and sparsity-coefficient schedules, as functions of the step.

use super::config::{LambdaRamp, TrainConfig};
use crate::backend::Objective;

/// The objective's coefficients at step `t`: the ramped λ and the run's fixed terms.
pub fn objective(cfg: &TrainConfig, t: u64) -> Objective {
    Objective {
        lambda: lambda(cfg, t),
        c: cfg.tanh_c,
        lambda_preact: cfg.lambda_preact,
        bandwidth: cfg.bandwidth,
        threshold_grad: cfg.threshold_grad,
    }
}

/// Learning rate at step `t` (0-based): linear warm-up over `warmup_steps` (reaching the peak at step
/// `warmup_steps − 1`), constant, then a linear decay to zero over the last `decay_fraction` of the run.
pub fn learning_rate(cfg: &TrainConfig, t: u64) -> f32 {
    let warm = if cfg.warmup_steps > 0 {
        ((t + 1) as f64 / cfg.warmup_steps as f64).min(1.0)
    } else {
        1.0
    };
    let decay_steps = (cfg.decay_fraction * cfg.steps as f64).round();
    let decay_start = cfg.steps as f64 - decay_steps;
    let decay = if decay_steps > 0.0 && t as f64 >= decay_start {
        ((cfg.steps as f64 - t as f64) / decay_steps).clamp(0.0, 1.0)
    } else {
        1.0
    };
    (cfg.lr as f64 * warm * decay) as f32
}

/// Sparsity coefficient λ at step `t`.
pub fn lambda(cfg: &TrainConfig, t: u64) -> f32 {
    let total = cfg.steps as f64;
    let wait = cfg.lambda_wait_fraction * total;
    let ramp = cfg.lambda_ramp_fraction * total;
    let u = if ramp > 0.0 {
        ((t as f64 - wait) / ramp).clamp(0.0, 1.0)
    } else if t as f64 >= wait {
        1.0
    } else {
        0.0
    };
    let s = match cfg.lambda_ramp {
        LambdaRamp::Cosine => 0.5 * (1.0 - (std::f64::consts::PI * u).cos()),
        LambdaRamp::Linear => u,
        LambdaRamp::Constant => 1.0,
    };
    (cfg.lambda_sparsity as f64 * s) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_constant_decay() {
        let cfg = TrainConfig {
            steps: 100,
            warmup_steps: 10,
            decay_fraction: 0.2,
            lr: 1.0,
            ..Default::default()
        };
        assert!((learning_rate(&cfg, 0) - 0.1).abs() < 1e-6);
        assert_eq!(learning_rate(&cfg, 9), 1.0);
        assert_eq!(learning_rate(&cfg, 50), 1.0);
        assert!((learning_rate(&cfg, 90) - 0.5).abs() < 1e-6);
        assert!(learning_rate(&cfg, 99) < 0.06);
    }

    #[test]
    fn lambda_ramps() {
        let cfg = TrainConfig {
            steps: 100,
            lambda_sparsity: 2.0,
            lambda_wait_fraction: 0.1,
            lambda_ramp_fraction: 0.8,
            ..Default::default()
        };
        assert_eq!(lambda(&cfg, 5), 0.0);
        assert!((lambda(&cfg, 50) - 1.0).abs() < 1e-6);
        assert_eq!(lambda(&cfg, 95), 2.0);
        let lin = TrainConfig {
            lambda_ramp: LambdaRamp::Linear,
            ..cfg
        };
        assert!((lambda(&lin, 30) - 0.5).abs() < 1e-6);
    }
}

//! Shared helpers for the integration tests: random problems and an independent f64 implementation of the loss.
#![allow(dead_code)]

pub mod gguf;
pub mod hf;
pub mod kv;
pub mod npz;
pub mod runs;
pub mod store;

use clt::backend::Objective;
use clt::clt::{Activation, CltConfig, Params};
use clt::rng::Rng;

/// Random parameters with thresholds in a range where some features fire and some sit near the threshold.
pub fn random_params(cfg: &CltConfig, rng: &mut Rng) -> Params {
    let mut p = Params::zeros(cfg);
    for t in p.tensors_mut() {
        t.iter_mut().for_each(|v| *v = (0.5 * rng.normal()) as f32);
    }
    for t in &mut p.log_theta {
        t.iter_mut()
            .for_each(|v| *v = rng.uniform_range(-2.5, 0.0) as f32);
    }
    p
}

/// A random batch `[B][L][d]`.
pub fn random_batch(cfg: &CltConfig, n_tokens: usize, rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
    let n = n_tokens * cfg.n_layers * cfg.d_model;
    let x = (0..n).map(|_| rng.normal() as f32).collect();
    let y = (0..n).map(|_| rng.normal() as f32).collect();
    (x, y)
}

/// Pre-activations in f64: `h[l][b][f]`.
pub fn preacts(cfg: &CltConfig, p: &Params, x: &[f32], n: usize) -> Vec<Vec<Vec<f64>>> {
    let (l_n, d, f_n) = (cfg.n_layers, cfg.d_model, cfg.n_features);
    (0..l_n)
        .map(|l| {
            (0..n)
                .map(|b| {
                    (0..f_n)
                        .map(|f| {
                            let xs = &x[(b * l_n + l) * d..][..d];
                            let w = &p.w_enc[l][f * d..(f + 1) * d];
                            xs.iter()
                                .zip(w)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                + p.b_enc[l][f] as f64
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// JumpReLU activations `a[l][b][f]` (JumpReLU configs only).
pub fn jump_acts(cfg: &CltConfig, p: &Params, h: &[Vec<Vec<f64>>]) -> Vec<Vec<Vec<f64>>> {
    assert!(matches!(cfg.activation, Activation::JumpRelu));
    h.iter()
        .enumerate()
        .map(|(l, hl)| {
            hl.iter()
                .map(|hb| {
                    hb.iter()
                        .enumerate()
                        .map(|(f, v)| {
                            if *v > (p.log_theta[l][f] as f64).exp() {
                                *v
                            } else {
                                0.0
                            }
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// Decoder norms in f64.
pub fn dec_norms(cfg: &CltConfig, p: &Params) -> Vec<Vec<f64>> {
    (0..cfg.n_layers)
        .map(|l| {
            let rl = cfg.dec_row_len(l);
            p.w_dec[l]
                .chunks_exact(rl)
                .map(|r| r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt())
                .collect()
        })
        .collect()
}

/// The whole objective in f64 from given pre-activations `h`, activations `a` and thresholds `theta`.
#[allow(clippy::too_many_arguments)]
pub fn loss_given(
    cfg: &CltConfig,
    p: &Params,
    x: &[f32],
    y: &[f32],
    n: usize,
    obj: &Objective,
    h: &[Vec<Vec<f64>>],
    a: &[Vec<Vec<f64>>],
    theta: &[Vec<f64>],
) -> f64 {
    let (l_n, d, f_n) = (cfg.n_layers, cfg.d_model, cfg.n_features);
    let norms = dec_norms(cfg, p);
    let mut recon = 0.0;
    for b in 0..n {
        for k in 0..l_n {
            for i in 0..d {
                let mut yh = p.b_dec[k][i] as f64;
                for l in 0..=k {
                    let j = match cfg.decoder {
                        clt::clt::DecoderKind::CrossLayer => k - l,
                        clt::clt::DecoderKind::PerLayer => {
                            if l != k {
                                continue;
                            }
                            0
                        }
                    };
                    let rl = cfg.dec_row_len(l);
                    for f in 0..f_n {
                        yh += a[l][b][f] * p.w_dec[l][f * rl + j * d + i] as f64;
                    }
                }
                if cfg.skip {
                    for q in 0..d {
                        yh += p.w_skip[k][i * d + q] as f64 * x[(b * l_n + k) * d + q] as f64;
                    }
                }
                recon += (yh - y[(b * l_n + k) * d + i] as f64).powi(2);
            }
        }
    }
    let mut sparsity = 0.0;
    let mut preact = 0.0;
    for l in 0..l_n {
        for b in 0..n {
            for f in 0..f_n {
                sparsity += (obj.c as f64 * a[l][b][f] * norms[l][f]).tanh();
                if cfg.has_threshold() {
                    preact += (theta[l][f] - h[l][b][f]).max(0.0) * norms[l][f];
                }
            }
        }
    }
    let bn = n as f64;
    recon / bn + obj.lambda as f64 * sparsity / bn + obj.lambda_preact as f64 * preact / bn
}

/// Thresholds `exp(log θ)` in f64.
pub fn thetas(p: &Params) -> Vec<Vec<f64>> {
    p.log_theta
        .iter()
        .map(|l| l.iter().map(|v| (*v as f64).exp()).collect())
        .collect()
}

/// Elementwise closeness `|a − b| ≤ atol + rtol |b|`, reporting the first mismatch.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g}, want {w} (atol {atol}, rtol {rtol})"
        );
    }
}

/// A small f32 generator (SplitMix64) for the store's tests: their synthetic activations, and the error bounds
/// tuned on them, come from this exact sequence.
pub struct SplitMix(pub u64);

impl SplitMix {
    /// Uniform in (0, 1).
    pub fn unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

//! The transcoder's parameters, their memory layout, and their initialisation.
//!
//! Layout (all row-major f32):
//! - `w_enc[l]`: `[F][d]`, feature-major, so a feature's encoder vector is contiguous (as in circuit-tracer);
//! - `b_enc[l]`, `log_theta[l]`: `[F]`;
//! - `w_dec[l]`: `[F][n_targets(l)][d]`: each feature's decoder rows for all its target layers are contiguous,
//!   slot `j` writing to layer `l + j` (circuit-tracer's `W_dec_{l}` layout), so the sparse decoder gathers one
//!   contiguous row per active feature;
//! - `b_dec[k]`: `[d]`, one bias per target layer;
//! - `w_skip[l]`: `[d][d]` as (out, in), so `ŷ_l += W_skip[l] x_l`.

use super::config::CltConfig;
use crate::rng::Rng;

/// All trainable tensors of a transcoder (also used, with the same shapes, for gradients and Adam moments).
#[derive(Debug, PartialEq)]
pub struct Params {
    pub w_enc: Vec<Vec<f32>>,
    pub b_enc: Vec<Vec<f32>>,
    pub log_theta: Vec<Vec<f32>>,
    pub w_dec: Vec<Vec<f32>>,
    pub b_dec: Vec<Vec<f32>>,
    pub w_skip: Vec<Vec<f32>>,
}

impl Clone for Params {
    /// A copy whose large tensors ask for huge pages, like those of [`Params::zeros`] (see
    /// [`crate::hugepages`]).
    fn clone(&self) -> Self {
        let copy = |ts: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            ts.iter()
                .map(|t| {
                    let mut c = crate::hugepages::zeroed(t.len());
                    c.copy_from_slice(t);
                    c
                })
                .collect()
        };
        Params {
            w_enc: copy(&self.w_enc),
            b_enc: self.b_enc.clone(),
            log_theta: self.log_theta.clone(),
            w_dec: copy(&self.w_dec),
            b_dec: self.b_dec.clone(),
            w_skip: copy(&self.w_skip),
        }
    }
}

/// A named view of one tensor.
pub struct Named<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

impl Params {
    /// All-zero tensors with the shapes of `cfg`.
    pub fn zeros(cfg: &CltConfig) -> Self {
        let (l_n, d, f) = (cfg.n_layers, cfg.d_model, cfg.n_features);
        Params {
            w_enc: (0..l_n).map(|_| crate::hugepages::zeroed(f * d)).collect(),
            b_enc: (0..l_n).map(|_| vec![0.0; f]).collect(),
            log_theta: (0..l_n).map(|_| vec![0.0; f]).collect(),
            w_dec: (0..l_n)
                .map(|l| crate::hugepages::zeroed(f * cfg.dec_row_len(l)))
                .collect(),
            b_dec: (0..l_n).map(|_| vec![0.0; d]).collect(),
            w_skip: if cfg.skip {
                (0..l_n).map(|_| vec![0.0; d * d]).collect()
            } else {
                Vec::new()
            },
        }
    }

    /// The initialisation of CLT-Forge (after Anthropic): `W_enc ~ U(±1/√F)`, `W_dec ~ U(±1/√(L·d))`,
    /// `log θ = ln θ₀`, zero biases and skip weights. `b_enc` is calibrated afterwards from data
    /// (see [`crate::train::init::calibrate_b_enc`]).
    pub fn init(cfg: &CltConfig, theta0: f32, rng: &mut Rng) -> Self {
        let mut p = Params::zeros(cfg);
        let enc_bound = 1.0 / (cfg.n_features as f64).sqrt();
        let dec_bound = 1.0 / ((cfg.n_layers * cfg.d_model) as f64).sqrt();
        for w in &mut p.w_enc {
            w.iter_mut()
                .for_each(|v| *v = rng.uniform_range(-enc_bound, enc_bound) as f32);
        }
        for w in &mut p.w_dec {
            w.iter_mut()
                .for_each(|v| *v = rng.uniform_range(-dec_bound, dec_bound) as f32);
        }
        for t in &mut p.log_theta {
            t.iter_mut().for_each(|v| *v = theta0.ln());
        }
        p
    }

    /// Every tensor with its checkpoint name and shape, in a fixed order.
    pub fn named(&self, cfg: &CltConfig) -> Vec<Named<'_>> {
        let (d, f) = (cfg.d_model, cfg.n_features);
        let mut out = Vec::new();
        for l in 0..cfg.n_layers {
            out.push(Named {
                name: format!("W_enc.{l}"),
                shape: vec![f, d],
                data: &self.w_enc[l],
            });
            out.push(Named {
                name: format!("b_enc.{l}"),
                shape: vec![f],
                data: &self.b_enc[l],
            });
            out.push(Named {
                name: format!("log_threshold.{l}"),
                shape: vec![f],
                data: &self.log_theta[l],
            });
            out.push(Named {
                name: format!("W_dec.{l}"),
                shape: vec![f, cfg.n_targets(l), d],
                data: &self.w_dec[l],
            });
            out.push(Named {
                name: format!("b_dec.{l}"),
                shape: vec![d],
                data: &self.b_dec[l],
            });
            if cfg.skip {
                out.push(Named {
                    name: format!("W_skip.{l}"),
                    shape: vec![d, d],
                    data: &self.w_skip[l],
                });
            }
        }
        out
    }

    /// Mutable access to every tensor, in the order of [`named`](Self::named).
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let n = self.w_enc.len();
        let mut out: Vec<&mut Vec<f32>> = Vec::with_capacity(6 * n);
        let mut skips = self.w_skip.iter_mut();
        for ((((we, be), lt), wd), bd) in self
            .w_enc
            .iter_mut()
            .zip(self.b_enc.iter_mut())
            .zip(self.log_theta.iter_mut())
            .zip(self.w_dec.iter_mut())
            .zip(self.b_dec.iter_mut())
        {
            out.extend([we, be, lt, wd, bd]);
            if let Some(s) = skips.next() {
                out.push(s);
            }
        }
        out
    }

    /// Shared access to every tensor, in the order of [`named`](Self::named).
    pub fn tensors(&self) -> Vec<&Vec<f32>> {
        let mut out = Vec::new();
        for l in 0..self.w_enc.len() {
            out.extend([
                &self.w_enc[l],
                &self.b_enc[l],
                &self.log_theta[l],
                &self.w_dec[l],
                &self.b_dec[l],
            ]);
            if let Some(s) = self.w_skip.get(l) {
                out.push(s);
            }
        }
        out
    }

    /// Total number of scalars.
    pub fn len(&self) -> usize {
        self.tensors().iter().map(|t| t.len()).sum()
    }

    /// True when there are no parameters (never for a validated config).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets every element to zero, keeping the allocations.
    pub fn fill_zero(&mut self) {
        for t in self.tensors_mut() {
            t.iter_mut().for_each(|v| *v = 0.0);
        }
    }
}

/// The norm of each feature's concatenated decoder row, `‖W_dec[l, f]‖ = sqrt(Σ_{k ≥ l} ‖W_dec[l→k][f]‖²)`,
/// per layer.
/// `Σ v²` of one decoder row, in eight interleaved partial sums (so it vectorises; a fixed order, so every
/// caller, the optimizer's norm refresh included, gets the same bits).
#[inline]
pub fn row_sum_sq(r: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n8 = r.len() - r.len() % 8;
    for c in r[..n8].chunks_exact(8) {
        for i in 0..8 {
            acc[i] += c[i] * c[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for v in &r[n8..] {
        s += v * v;
    }
    s
}

pub fn decoder_norms(cfg: &CltConfig, w_dec: &[Vec<f32>]) -> Vec<Vec<f32>> {
    (0..cfg.n_layers)
        .map(|l| {
            let row = cfg.dec_row_len(l);
            w_dec[l]
                .chunks_exact(row)
                .map(|r| row_sum_sq(r).sqrt())
                .collect()
        })
        .collect()
}

/// Per-layer normalisation scalars: inputs are multiplied by `input[l]` and targets by `target[l]` before
/// they reach the transcoder (`s = sqrt(d) / mean ‖x‖`, estimated before training).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NormScales {
    pub input: Vec<f32>,
    pub target: Vec<f32>,
}

impl NormScales {
    /// Scales of one (no normalisation).
    pub fn identity(n_layers: usize) -> Self {
        NormScales {
            input: vec![1.0; n_layers],
            target: vec![1.0; n_layers],
        }
    }

    /// Multiplies a `[B][L][d]` batch in place.
    pub fn apply(&self, d_model: usize, x: &mut [f32], y: &mut [f32]) {
        let n_layers = self.input.len();
        for (i, (xr, yr)) in x
            .chunks_exact_mut(d_model)
            .zip(y.chunks_exact_mut(d_model))
            .enumerate()
        {
            let l = i % n_layers;
            xr.iter_mut().for_each(|v| *v *= self.input[l]);
            yr.iter_mut().for_each(|v| *v *= self.target[l]);
        }
    }
}

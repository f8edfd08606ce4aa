//! The synthetic ground truth: activations with planted cross-layer features.
//!
//! Each layer `l` has `features_per_layer` planted features. A planted feature reads one unit direction
//! `u ∈ R^d` of layer l's input and writes a direction `v_k` into the target of every layer k in a span
//! `l ..= l + s − 1` (s drawn from 1 ..= `max_span`, cut at the last layer). Per token, each feature fires
//! independently with probability `fire_prob`, with a magnitude uniform in `[0.5, 1.5]`:
//!
//! `x_l = Σ_{f planted at l} m_f u_f + σ ε`,   `y_k = Σ_{f planted at l ≤ k} m_f v_{f,k} + σ ε'`.
//!
//! A cross-layer transcoder can represent this exactly, so training should recover every planted feature:
//! [`SyntheticGenerator::recovery`] matches learned decoders to planted ones by cosine similarity.
//! Token t is generated from its own seed (the run seed mixed with t), so any position is reachable in O(1),
//! batches are generated in parallel, and the stream position is just the token counter.

use super::{ActDims, ActivationSource, Batch};
use crate::clt::{CltConfig, NormScales, Params};
use crate::rng::Rng;
use crate::{Error, Result};
use rayon::prelude::*;

/// Parameters of the generator (the `[data]` table with `kind = "synthetic"`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Planted features per layer.
    pub features_per_layer: usize,
    /// Probability that a planted feature fires on a token.
    pub fire_prob: f64,
    /// Largest number of target layers a planted feature writes to.
    pub max_span: usize,
    /// Standard deviation of the per-coordinate Gaussian noise.
    pub noise: f64,
    /// Seed of the planted dictionary and of the token stream.
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            features_per_layer: 16,
            fire_prob: 0.05,
            max_span: 3,
            noise: 0.01,
            seed: 1234,
        }
    }
}

impl SyntheticConfig {
    /// Checks the values against the model they will train.
    pub fn validate(&self, _model: &CltConfig) -> Result<()> {
        if self.features_per_layer == 0 {
            return Err(Error::config(
                "data.features_per_layer",
                "must be at least 1",
            ));
        }
        if !(self.fire_prob > 0.0 && self.fire_prob <= 1.0) {
            return Err(Error::config(
                "data.fire_prob",
                format!("must be in (0, 1], got {}", self.fire_prob),
            ));
        }
        if self.max_span == 0 {
            return Err(Error::config("data.max_span", "must be at least 1"));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(Error::config(
                "data.noise",
                format!("must be non-negative, got {}", self.noise),
            ));
        }
        Ok(())
    }
}

/// One planted feature.
#[derive(Clone, Debug, PartialEq)]
pub struct Planted {
    /// The layer whose input it reads.
    pub layer: usize,
    /// Unit input direction (length d).
    pub input: Vec<f32>,
    /// Output directions, `[n_layers − layer][d]`, zero outside the feature's span.
    pub output: Vec<f32>,
}

/// The generator: a planted dictionary and a token stream.
#[derive(Clone, Debug)]
pub struct SyntheticGenerator {
    dims: ActDims,
    cfg: SyntheticConfig,
    planted: Vec<Planted>,
    next_token: u64,
}

fn unit(rng: &mut Rng, d: usize) -> Vec<f32> {
    let v: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    v.iter().map(|x| (x / n) as f32).collect()
}

fn mix(seed: u64, t: u64) -> u64 {
    // SplitMix64 finaliser of (seed, t): decorrelates neighbouring token seeds.
    let mut z = seed ^ t.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SyntheticGenerator {
    /// Plants the dictionary for `dims` from `cfg.seed`.
    pub fn new(dims: ActDims, cfg: SyntheticConfig) -> Self {
        let mut rng = Rng::seed(cfg.seed);
        let (l_n, d) = (dims.n_layers, dims.d_model);
        let mut planted = Vec::new();
        for layer in 0..l_n {
            for _ in 0..cfg.features_per_layer {
                let input = unit(&mut rng, d);
                let span = 1 + rng.below(cfg.max_span);
                let mut output = vec![0.0f32; (l_n - layer) * d];
                for j in 0..span.min(l_n - layer) {
                    let scale = rng.uniform_range(0.5, 1.5) as f32;
                    let v = unit(&mut rng, d);
                    for (o, vi) in output[j * d..(j + 1) * d].iter_mut().zip(v) {
                        *o = scale * vi;
                    }
                }
                planted.push(Planted {
                    layer,
                    input,
                    output,
                });
            }
        }
        SyntheticGenerator {
            dims,
            cfg,
            planted,
            next_token: 0,
        }
    }

    /// The planted features.
    pub fn planted(&self) -> &[Planted] {
        &self.planted
    }

    /// Writes token `t`'s `[L][d]` input and target rows.
    fn token(&self, t: u64, x: &mut [f32], y: &mut [f32]) {
        let (l_n, d) = (self.dims.n_layers, self.dims.d_model);
        let mut rng = Rng::seed(mix(self.cfg.seed, t));
        x.iter_mut().for_each(|v| *v = 0.0);
        y.iter_mut().for_each(|v| *v = 0.0);
        for p in &self.planted {
            if rng.uniform() < self.cfg.fire_prob {
                let m = rng.uniform_range(0.5, 1.5) as f32;
                for (xv, u) in x[p.layer * d..(p.layer + 1) * d].iter_mut().zip(&p.input) {
                    *xv += m * u;
                }
                for (yv, v) in y[p.layer * d..l_n * d].iter_mut().zip(&p.output) {
                    *yv += m * v;
                }
            }
        }
        if self.cfg.noise > 0.0 {
            for v in x.iter_mut().chain(y.iter_mut()) {
                *v += (self.cfg.noise * rng.normal()) as f32;
            }
        }
    }

    /// For every planted feature, the best cosine similarity between its output directions and the decoder
    /// of a learned feature of the same layer (decoders mapped back to raw units with the target scales).
    pub fn recovery(&self, cfg: &CltConfig, params: &Params, norms: &NormScales) -> Vec<f32> {
        let d = self.dims.d_model;
        self.planted
            .par_iter()
            .map(|p| {
                let l = p.layer;
                let rl = cfg.dec_row_len(l);
                let nt = cfg.n_targets(l);
                let target = &p.output[..rl.min(p.output.len())];
                let tn = target.iter().map(|v| v * v).sum::<f32>().sqrt();
                params.w_dec[l]
                    .chunks_exact(rl)
                    .map(|row| {
                        let mut dotp = 0.0f32;
                        let mut nn = 0.0f32;
                        for j in 0..nt {
                            let s = 1.0 / norms.target[l + j];
                            for i in 0..d {
                                let w = row[j * d + i] * s;
                                dotp += w * target[j * d + i];
                                nn += w * w;
                            }
                        }
                        dotp / (nn.sqrt() * tn).max(1e-12)
                    })
                    .fold(f32::NEG_INFINITY, f32::max)
            })
            .collect()
    }
}

impl ActivationSource for SyntheticGenerator {
    fn dims(&self) -> ActDims {
        self.dims
    }

    fn next_batch(&mut self, n_tokens: usize, batch: &mut Batch) -> Result<()> {
        batch.resize(self.dims, n_tokens);
        let row = self.dims.n_layers * self.dims.d_model;
        let t0 = self.next_token;
        batch
            .x
            .par_chunks_mut(row)
            .zip(batch.y.par_chunks_mut(row))
            .enumerate()
            .for_each(|(i, (x, y))| self.token(t0 + i as u64, x, y));
        self.next_token += n_tokens as u64;
        Ok(())
    }

    fn position(&self) -> serde_json::Value {
        serde_json::json!({ "next_token": self.next_token })
    }

    fn restore(&mut self, position: &serde_json::Value) -> Result<()> {
        self.next_token = position
            .get("next_token")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| Error::Source(format!("bad synthetic-source position {position}")))?;
        Ok(())
    }
}

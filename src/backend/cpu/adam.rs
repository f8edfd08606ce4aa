//! Adam with fp32 moments, global-norm gradient clipping, and the decoder's fused update.
//!
//! The decoder gradient arrives in two parts (see [`Grads`]): a data term on the rows of features that fired,
//! and `coef_f · W_dec[l, f]` on every row. The update applies both in one pass over each row and recomputes
//! the row's norm for the next step, so a step reads and writes each decoder row once.

use crate::backend::grads::Grads;
use crate::clt::params::row_sum_sq;
use crate::clt::{CltConfig, Params};
use rayon::prelude::*;

/// Adam's hyper-parameters (PyTorch's conventions).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamHyper {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl Default for AdamHyper {
    fn default() -> Self {
        AdamHyper {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// Adam's state: first and second moments and the number of updates done.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamState {
    pub m: Params,
    pub v: Params,
    pub t: u64,
}

impl AdamState {
    /// Fresh state for `cfg`.
    pub fn new(cfg: &CltConfig) -> Self {
        AdamState {
            m: Params::zeros(cfg),
            v: Params::zeros(cfg),
            t: 0,
        }
    }
}

const CHUNK: usize = 1 << 14;

fn sum_sq(v: &[f32]) -> f64 {
    let parts: Vec<f64> = v.par_chunks(CHUNK).map(sum_sq_lanes).collect();
    parts.iter().sum()
}

/// `Σ g_i²` in f64, in four interleaved lanes: one running f64 sum waits on its previous add for every element,
/// which held the clipping norm to ~1 element per 4 cycles, well below the memory's speed.
fn sum_sq_lanes(g: &[f32]) -> f64 {
    let mut acc = [0.0f64; 4];
    let mut gc = g.chunks_exact(4);
    for c in &mut gc {
        for j in 0..4 {
            acc[j] += c[j] as f64 * c[j] as f64;
        }
    }
    let mut s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    for v in gc.remainder() {
        s += *v as f64 * *v as f64;
    }
    s
}

/// `Σ (g_i + c·w_i)²` in f64, in the lanes of [`sum_sq_lanes`]: the squared norm of a decoder gradient row
/// whose norm terms are still the factor `c` of the parameter row `w`.
fn sum_sq_shifted(g: &[f32], w: &[f32], c: f64) -> f64 {
    let mut acc = [0.0f64; 4];
    let (mut gc, mut wc) = (g.chunks_exact(4), w.chunks_exact(4));
    for (a, b) in (&mut gc).zip(&mut wc) {
        for j in 0..4 {
            let v = a[j] as f64 + c * b[j] as f64;
            acc[j] += v * v;
        }
    }
    let mut s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    for (a, b) in gc.remainder().iter().zip(wc.remainder()) {
        let v = *a as f64 + c * *b as f64;
        s += v * v;
    }
    s
}

/// The factor that clips a gradient of global norm `grad_norm` to at most `clip_norm` (1 when `clip_norm` is 0,
/// clipping off).
pub fn clip_scale(clip_norm: f32, grad_norm: f64) -> f32 {
    if clip_norm > 0.0 {
        (clip_norm as f64 / (grad_norm + 1e-6)).min(1.0) as f32
    } else {
        1.0
    }
}

/// The global L2 norm of the full gradient (decoder norm terms included).
pub fn grad_norm(cfg: &CltConfig, params: &Params, grads: &Grads, dec_norms: &[Vec<f32>]) -> f64 {
    let (features, shared) = grad_sq_parts(cfg, params, grads, dec_norms);
    (features + shared).sqrt()
}

/// The squared gradient norm in two parts: the per-feature parameters (encoder rows, biases, thresholds,
/// decoder rows: what a feature shard owns) and the parameters every shard replicates (decoder biases, skip).
pub fn grad_sq_parts(
    cfg: &CltConfig,
    params: &Params,
    grads: &Grads,
    dec_norms: &[Vec<f32>],
) -> (f64, f64) {
    let g = &grads.p;
    let (mut total, mut shared) = (0.0f64, 0.0f64);
    for l in 0..cfg.n_layers {
        total += sum_sq(&g.w_enc[l]) + sum_sq(&g.b_enc[l]) + sum_sq(&g.log_theta[l]);
        shared += sum_sq(&g.b_dec[l]);
        if cfg.skip {
            shared += sum_sq(&g.w_skip[l]);
        }
        let rl = cfg.dec_row_len(l);
        let parts: Vec<f64> = (0..cfg.n_features)
            .into_par_iter()
            .map(|f| {
                let c = grads.dec_coef[l][f] as f64;
                if grads.dec_touched[l][f] {
                    let gr = &g.w_dec[l][f * rl..(f + 1) * rl];
                    let wr = &params.w_dec[l][f * rl..(f + 1) * rl];
                    sum_sq_shifted(gr, wr, c)
                } else {
                    c * c * (dec_norms[l][f] as f64).powi(2)
                }
            })
            .collect();
        total += parts.iter().sum::<f64>();
    }
    (total, shared)
}

#[derive(Clone, Copy)]
struct StepConsts {
    lr: f32,
    scale: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    bc1: f32,
    bc2_sqrt: f32,
}

#[inline]
fn update(k: &StepConsts, p: &mut f32, m: &mut f32, v: &mut f32, g: f32) {
    let g = g * k.scale;
    *m = k.b1 * *m + (1.0 - k.b1) * g;
    *v = k.b2 * *v + (1.0 - k.b2) * g * g;
    let denom = v.sqrt() / k.bc2_sqrt + k.eps;
    *p -= (k.lr / k.bc1) * *m / denom;
}

fn dense(k: &StepConsts, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for i in 0..p.len() {
                update(k, &mut p[i], &mut m[i], &mut v[i], g[i]);
            }
        });
}

/// One Adam update of every parameter with the gradient multiplied by `scale` (the clipping factor), at
/// learning rate `lr`. Recomputes `dec_norms` from the updated decoder.
#[allow(clippy::too_many_arguments)]
pub fn step(
    cfg: &CltConfig,
    hp: &AdamHyper,
    params: &mut Params,
    state: &mut AdamState,
    grads: &Grads,
    lr: f32,
    scale: f32,
    dec_norms: &mut [Vec<f32>],
) {
    state.t += 1;
    let t = state.t as i32;
    let k = StepConsts {
        lr,
        scale,
        b1: hp.beta1,
        b2: hp.beta2,
        eps: hp.eps,
        bc1: 1.0 - hp.beta1.powi(t),
        bc2_sqrt: (1.0 - hp.beta2.powi(t)).sqrt(),
    };
    let (m, v, g) = (&mut state.m, &mut state.v, &grads.p);
    for l in 0..cfg.n_layers {
        dense(
            &k,
            &mut params.w_enc[l],
            &mut m.w_enc[l],
            &mut v.w_enc[l],
            &g.w_enc[l],
        );
        dense(
            &k,
            &mut params.b_enc[l],
            &mut m.b_enc[l],
            &mut v.b_enc[l],
            &g.b_enc[l],
        );
        if cfg.has_threshold() {
            dense(
                &k,
                &mut params.log_theta[l],
                &mut m.log_theta[l],
                &mut v.log_theta[l],
                &g.log_theta[l],
            );
        }
        dense(
            &k,
            &mut params.b_dec[l],
            &mut m.b_dec[l],
            &mut v.b_dec[l],
            &g.b_dec[l],
        );
        if cfg.skip {
            dense(
                &k,
                &mut params.w_skip[l],
                &mut m.w_skip[l],
                &mut v.w_skip[l],
                &g.w_skip[l],
            );
        }
        let rl = cfg.dec_row_len(l);
        params.w_dec[l]
            .par_chunks_mut(rl)
            .zip(m.w_dec[l].par_chunks_mut(rl))
            .zip(v.w_dec[l].par_chunks_mut(rl))
            .zip(g.w_dec[l].par_chunks(rl))
            .zip(dec_norms[l].par_iter_mut())
            .enumerate()
            .for_each(|(f, ((((p, m), v), gs), norm))| {
                let coef = grads.dec_coef[l][f];
                let touched = grads.dec_touched[l][f];
                // (The norm is a second pass over the row, still in cache: folded into the update loop, its
                // running sum would keep that loop from vectorising.)
                if touched {
                    for j in 0..rl {
                        let g = gs[j] + coef * p[j];
                        update(&k, &mut p[j], &mut m[j], &mut v[j], g);
                    }
                } else {
                    for j in 0..rl {
                        let g = coef * p[j];
                        update(&k, &mut p[j], &mut m[j], &mut v[j], g);
                    }
                }
                *norm = row_sum_sq(p).sqrt();
            });
    }
}

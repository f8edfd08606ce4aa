//! Gradients against finite differences of an independent f64 implementation of the objective, and the
//! threshold's straight-through gradient against its documented definition.

mod common;
use clt::backend::cpu::{dense, sparse};
use clt::backend::{Grads, Objective, ThresholdGrad};
use clt::clt::params::decoder_norms;
use clt::clt::{Activation, CltConfig, DecoderKind, Params};
use clt::rng::Rng;
use common::*;

fn cfg(decoder: DecoderKind, skip: bool) -> CltConfig {
    CltConfig {
        n_layers: 3,
        d_model: 5,
        n_features: 7,
        decoder,
        activation: Activation::JumpRelu,
        skip,
    }
}

const OBJ: Objective = Objective {
    lambda: 0.7,
    c: 4.0,
    lambda_preact: 0.3,
    bandwidth: 1.0,
    threshold_grad: ThresholdGrad::Theta,
};

fn full_loss(cfg: &CltConfig, p: &Params, x: &[f32], y: &[f32], n: usize) -> f64 {
    let h = preacts(cfg, p, x, n);
    let a = jump_acts(cfg, p, &h);
    loss_given(cfg, p, x, y, n, &OBJ, &h, &a, &thetas(p))
}

/// The active set, to detect finite-difference steps that cross a threshold.
fn mask(cfg: &CltConfig, p: &Params, x: &[f32], n: usize) -> Vec<bool> {
    let h = preacts(cfg, p, x, n);
    jump_acts(cfg, p, &h)
        .into_iter()
        .flatten()
        .flatten()
        .map(|v| v != 0.0)
        .collect()
}

fn check_fd(decoder: DecoderKind, skip: bool, seed: u64, threshold_grad: ThresholdGrad) {
    let obj = Objective {
        threshold_grad,
        ..OBJ
    };
    let cfg = cfg(decoder, skip);
    let n = 6;
    let mut rng = Rng::seed(seed);
    let p = random_params(&cfg, &mut rng);
    let (x, y) = random_batch(&cfg, n, &mut rng);
    let mut g = Grads::zeros(&cfg);
    dense::loss_and_grad(&cfg, &p, &x, &y, n, &obj, None, &mut g);
    let g_dense = g.materialize(&cfg, &p);
    let mut gs = Grads::zeros(&cfg);
    let norms = decoder_norms(&cfg, &p.w_dec);
    sparse::loss_and_grad(&cfg, &p, &norms, &x, &y, n, &obj, None, &mut gs);
    let g_sparse = gs.materialize(&cfg, &p);

    let base_mask = mask(&cfg, &p, &x, n);
    let names: Vec<String> = p.named(&cfg).into_iter().map(|t| t.name).collect();
    let mut checked = 0;
    for (ti, name) in names.iter().enumerate() {
        if name.starts_with("log_threshold") {
            continue; // checked against the pseudo-gradient below
        }
        for i in 0..p.tensors()[ti].len() {
            let eps = 1e-3f32;
            let mut pp = p.clone();
            let orig = pp.tensors()[ti][i];
            pp.tensors_mut()[ti][i] = orig + eps;
            let up_mask = mask(&cfg, &pp, &x, n);
            let lp = full_loss(&cfg, &pp, &x, &y, n);
            let e_up = pp.tensors()[ti][i] - orig;
            pp.tensors_mut()[ti][i] = orig - eps;
            let down_mask = mask(&cfg, &pp, &x, n);
            let lm = full_loss(&cfg, &pp, &x, &y, n);
            let e_down = orig - pp.tensors()[ti][i];
            if up_mask != base_mask || down_mask != base_mask {
                continue; // the step crossed a threshold: the loss is not differentiable there
            }
            let fd = ((lp - lm) / (e_up + e_down) as f64) as f32;
            for (what, gg) in [("dense", &g_dense), ("sparse", &g_sparse)] {
                let got = gg.tensors()[ti][i];
                assert!(
                    (got - fd).abs() <= 2e-3 + 2e-3 * fd.abs(),
                    "{what} {name}[{i}]: analytic {got} vs finite difference {fd}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 100, "too few coordinates checked ({checked})");

    // Threshold: dL/dlogθ_f = θ_f [ Σ_{b: |h−θ|<ε/2} ∂L/∂a_bf · (−θ_f/ε) + ∂L_pre/∂θ_f ], with ∂L/∂a by
    // finite differences of the loss in the activations, and ∂L_pre/∂θ by finite differences in θ with h
    // and a held fixed.
    let h = preacts(&cfg, &p, &x, n);
    let a = jump_acts(&cfg, &p, &h);
    let th = thetas(&p);
    for l in 0..cfg.n_layers {
        for f in 0..cfg.n_features {
            let mut pseudo = 0.0f64;
            for b in 0..n {
                if (h[l][b][f] - th[l][f]).abs() < 0.5 * OBJ.bandwidth as f64 {
                    let e = 1e-6;
                    let mut ap = a.clone();
                    ap[l][b][f] += e;
                    let lp = loss_given(&cfg, &p, &x, &y, n, &OBJ, &h, &ap, &th);
                    ap[l][b][f] -= 2.0 * e;
                    let lm = loss_given(&cfg, &p, &x, &y, n, &OBJ, &h, &ap, &th);
                    let weight = match threshold_grad {
                        ThresholdGrad::Theta => th[l][f],
                        ThresholdGrad::Preact => h[l][b][f],
                    };
                    pseudo += (lp - lm) / (2.0 * e) * (-weight / OBJ.bandwidth as f64);
                }
            }
            let e = 1e-7;
            let mut tp = th.clone();
            tp[l][f] += e;
            let lp = loss_given(&cfg, &p, &x, &y, n, &OBJ, &h, &a, &tp);
            tp[l][f] -= 2.0 * e;
            let lm = loss_given(&cfg, &p, &x, &y, n, &OBJ, &h, &a, &tp);
            let want = (th[l][f] * (pseudo + (lp - lm) / (2.0 * e))) as f32;
            for (what, gg) in [("dense", &g_dense), ("sparse", &g_sparse)] {
                let got = gg.log_theta[l][f];
                assert!(
                    (got - want).abs() <= 1e-4 + 2e-3 * want.abs(),
                    "{what} log_threshold.{l}[{f}]: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn cross_layer_gradients_match_finite_differences() {
    check_fd(DecoderKind::CrossLayer, false, 1, ThresholdGrad::Theta);
}

#[test]
fn per_layer_gradients_with_skip_match_finite_differences() {
    check_fd(DecoderKind::PerLayer, true, 2, ThresholdGrad::Theta);
}

#[test]
fn cross_layer_skip_gradients_match_finite_differences() {
    check_fd(DecoderKind::CrossLayer, true, 3, ThresholdGrad::Theta);
}

#[test]
fn crosslayer_coding_threshold_estimate_matches_its_definition() {
    check_fd(DecoderKind::CrossLayer, false, 4, ThresholdGrad::Preact);
}

//! Property tests: the sparse CPU step equals the dense reference on random, awkward shapes, for every
//! activation function and decoder kind, with and without skip connections.

mod common;
use clt::backend::cpu::{dense, sparse};
use clt::backend::{Grads, Objective, ThresholdGrad};
use clt::clt::params::decoder_norms;
use clt::clt::{Activation, CltConfig, DecoderKind};
use clt::rng::Rng;
use common::*;
use proptest::prelude::*;

fn activation(kind: u8, k: usize) -> Activation {
    match kind {
        0 => Activation::JumpRelu,
        1 => Activation::TopK { k },
        2 => Activation::BatchTopK {
            k,
            across_layers: false,
        },
        _ => Activation::BatchTopK {
            k,
            across_layers: true,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn sparse_step_equals_dense_reference(
        n_layers in 1usize..5,
        d_model in 1usize..11,
        n_features in 1usize..70,
        n_tokens in 0usize..75,
        kind in 0u8..4,
        k_raw in 1usize..8,
        per_layer in any::<bool>(),
        skip in any::<bool>(),
        bandwidth in prop_oneof![Just(1.0f32), Just(0.05f32)],
        by_h in any::<bool>(),
        masked in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let cfg = CltConfig {
            n_layers,
            d_model,
            n_features,
            decoder: if per_layer { DecoderKind::PerLayer } else { DecoderKind::CrossLayer },
            activation: activation(kind, k_raw.min(n_features)),
            skip,
        };
        let mut rng = Rng::seed(seed);
        let p = random_params(&cfg, &mut rng);
        let (x, y) = random_batch(&cfg, n_tokens, &mut rng);
        let threshold_grad = if by_h { ThresholdGrad::Preact } else { ThresholdGrad::Theta };
        let obj = Objective { lambda: 0.9, c: 4.0, lambda_preact: 0.2, bandwidth, threshold_grad };
        let mask: Vec<Vec<bool>> = (0..n_layers).map(|_| (0..n_features).map(|_| rng.below(2) == 0).collect()).collect();
        let mask = masked.then_some(mask.as_slice());
        let mut gd = Grads::zeros(&cfg);
        let sd = dense::loss_and_grad(&cfg, &p, &x, &y, n_tokens, &obj, mask, &mut gd);
        // Two sparse steps on the same buffers: the second must not see stale rows of the first.
        let mut gs = Grads::zeros(&cfg);
        let norms = decoder_norms(&cfg, &p.w_dec);
        let (x2, y2) = random_batch(&cfg, n_tokens, &mut rng);
        sparse::loss_and_grad(&cfg, &p, &norms, &x2, &y2, n_tokens, &obj, None, &mut gs);
        let ss = sparse::loss_and_grad(&cfg, &p, &norms, &x, &y, n_tokens, &obj, mask, &mut gs);

        let rel = |a: f64, b: f64| (a - b).abs() <= 1e-4 * (1.0 + b.abs());
        prop_assert!(rel(ss.recon, sd.recon), "recon {} vs {}", ss.recon, sd.recon);
        prop_assert!(rel(ss.sparsity, sd.sparsity), "sparsity {} vs {}", ss.sparsity, sd.sparsity);
        prop_assert!(rel(ss.preact, sd.preact), "preact {} vs {}", ss.preact, sd.preact);
        prop_assert_eq!(&ss.n_active, &sd.n_active);
        prop_assert_eq!(&ss.active_count, &sd.active_count);

        let a = gs.materialize(&cfg, &p);
        let b = gd.materialize(&cfg, &p);
        for ((name, ta), tb) in p.named(&cfg).iter().map(|t| t.name.clone()).zip(a.tensors()).zip(b.tensors()) {
            let scale = tb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (i, (u, v)) in ta.iter().zip(tb.iter()).enumerate() {
                prop_assert!(
                    (u - v).abs() <= 1e-4 * (1.0 + scale),
                    "{}[{}]: sparse {} vs dense {}", name, i, u, v
                );
            }
        }
    }
}

/// Each way an encoder block can record its near-threshold entries (listed, complement, bitmask) is exercised
/// and gives the dense reference's gradient.
#[test]
fn every_block_mode_matches_the_dense_reference() {
    use clt::backend::cpu::encode::{BlockMode, encode_all};
    let cfg = CltConfig {
        n_layers: 3,
        d_model: 6,
        n_features: 40,
        decoder: DecoderKind::CrossLayer,
        activation: Activation::JumpRelu,
        skip: false,
    };
    let n = 150; // three blocks, the last one short
    for (mode, spread, bandwidth) in [
        (BlockMode::Near, 1.0, 0.05f32),
        (BlockMode::Far, 0.02, 1.0),
        (BlockMode::Bits, 0.4, 1.0),
    ] {
        let mut rng = Rng::seed(11);
        let mut p = random_params(&cfg, &mut rng);
        // Pre-activations spread by `spread` around θ − 0.1.
        for l in 0..cfg.n_layers {
            for f in 0..cfg.n_features {
                let th = p.log_theta[l][f].exp();
                p.b_enc[l][f] = th - 0.1;
                for i in 0..cfg.d_model {
                    p.w_enc[l][f * cfg.d_model + i] *= spread;
                }
            }
        }
        let (x, y) = random_batch(&cfg, n, &mut rng);
        let thetas: Vec<Vec<f32>> = p
            .log_theta
            .iter()
            .map(|t| t.iter().map(|v| v.exp()).collect())
            .collect();
        let codes = encode_all(&cfg, &p, &x, n, &thetas, bandwidth);
        assert!(
            codes.iter().any(|c| c.block_mode.contains(&mode)),
            "{mode:?} not exercised: {:?}",
            codes[0].block_mode
        );
        let obj = Objective {
            lambda: 0.9,
            c: 4.0,
            lambda_preact: 0.2,
            bandwidth,
            threshold_grad: ThresholdGrad::Theta,
        };
        let mut gd = Grads::zeros(&cfg);
        dense::loss_and_grad(&cfg, &p, &x, &y, n, &obj, None, &mut gd);
        let mut gs = Grads::zeros(&cfg);
        sparse::loss_and_grad(
            &cfg,
            &p,
            &decoder_norms(&cfg, &p.w_dec),
            &x,
            &y,
            n,
            &obj,
            None,
            &mut gs,
        );
        let (a, b) = (gs.materialize(&cfg, &p), gd.materialize(&cfg, &p));
        for (ta, tb) in a.tensors().iter().zip(b.tensors()) {
            let scale = tb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_close(&format!("{mode:?}"), ta, tb, 1e-4 * (1.0 + scale), 0.0);
        }
    }
}

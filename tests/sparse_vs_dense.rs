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
        assert_step_matches_dense(&format!("{mode:?}"), &cfg, &p, &x, &y, n, bandwidth);
    }
}

/// One sparse step's gradient equals the dense reference's (θ-weighted threshold gradient, no mask), every
/// tensor within `1e-4 · (1 + its largest magnitude)`.
fn assert_step_matches_dense(
    what: &str,
    cfg: &CltConfig,
    p: &clt::clt::Params,
    x: &[f32],
    y: &[f32],
    n: usize,
    bandwidth: f32,
) {
    let obj = Objective {
        lambda: 0.9,
        c: 4.0,
        lambda_preact: 0.2,
        bandwidth,
        threshold_grad: ThresholdGrad::Theta,
    };
    let mut gd = Grads::zeros(cfg);
    dense::loss_and_grad(cfg, p, x, y, n, &obj, None, &mut gd);
    let mut gs = Grads::zeros(cfg);
    let norms = decoder_norms(cfg, &p.w_dec);
    sparse::loss_and_grad(cfg, p, &norms, x, y, n, &obj, None, &mut gs);
    let (a, b) = (gs.materialize(cfg, p), gd.materialize(cfg, p));
    for (ta, tb) in a.tensors().iter().zip(b.tensors()) {
        let scale = tb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_close(what, ta, tb, 1e-4 * (1.0 + scale), 0.0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// The tiled decode (feature by feature within tiles of tokens) gives the same bits as the plain
    /// token-by-token gather, over the whole layer range and over consecutive sub-ranges.
    #[test]
    fn tiled_decode_equals_token_gather(
        n_layers in 1usize..5,
        d_model in 1usize..11,
        n_features in 1usize..70,
        n_tokens in 0usize..300,
        kind in 0u8..2,
        k_raw in 1usize..8,
        split in 0usize..5,
        seed in any::<u64>(),
    ) {
        let cfg = CltConfig {
            n_layers,
            d_model,
            n_features,
            decoder: DecoderKind::CrossLayer,
            activation: activation(kind, k_raw.min(n_features)),
            skip: false,
        };
        let mut rng = Rng::seed(seed);
        let p = random_params(&cfg, &mut rng);
        let (x, _) = random_batch(&cfg, n_tokens, &mut rng);
        let thetas = sparse::thresholds(&p);
        let codes = clt::backend::cpu::encode::encode_all(&cfg, &p, &x, n_tokens, &thetas, 0.05);
        let split = split.min(n_layers);
        let mut tiled = sparse::decode_start(&cfg, &p, n_tokens, true);
        sparse::decode_layers(&cfg, &p, &codes, n_tokens, 0..split, &mut tiled);
        sparse::decode_layers(&cfg, &p, &codes, n_tokens, split..n_layers, &mut tiled);
        let mut gather = sparse::decode_start(&cfg, &p, n_tokens, true);
        sparse::decode_layers_by_token(&cfg, &p, &codes, n_tokens, 0..n_layers, &mut gather);
        prop_assert!(tiled.iter().zip(&gather).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

/// One encoder GEMM covers several 64-token blocks on long batches; the codes must be those of encoding each
/// block alone (the same bits: a GEMM's element does not depend on how many rows the call has), and the step
/// must still match the dense reference.
#[test]
fn long_batches_encode_like_single_blocks() {
    use clt::backend::cpu::encode::encode_layer;
    let cfg = CltConfig {
        n_layers: 2,
        d_model: 9,
        n_features: 37,
        decoder: DecoderKind::CrossLayer,
        activation: Activation::JumpRelu,
        skip: false,
    };
    let n = 64 * 11 + 13; // several blocks per GEMM call, and a short last block
    let mut rng = Rng::seed(5);
    let p = random_params(&cfg, &mut rng);
    let (x, y) = random_batch(&cfg, n, &mut rng);
    let thetas = sparse::thresholds(&p);
    let row = cfg.n_layers * cfg.d_model;
    for l in 0..cfg.n_layers {
        let whole = encode_layer(&cfg, &p, l, &x, n, &thetas[l], 0.05, false);
        for b0 in (0..n).step_by(64) {
            let nb = 64.min(n - b0);
            let part = encode_layer(&cfg, &p, l, &x[b0 * row..], nb, &thetas[l], 0.05, false);
            for t in 0..nb {
                let (w0, w1) = (whole.offsets[b0 + t], whole.offsets[b0 + t + 1]);
                let (p0, p1) = (part.offsets[t], part.offsets[t + 1]);
                assert_eq!(
                    whole.feat[w0..w1],
                    part.feat[p0..p1],
                    "layer {l} token {}",
                    b0 + t
                );
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&whole.pre[w0..w1]), bits(&part.pre[p0..p1]));
                assert_eq!(bits(&whole.act[w0..w1]), bits(&part.act[p0..p1]));
            }
            assert_eq!(whole.block_mode[b0 / 64], part.block_mode[0]);
        }
    }
    assert_step_matches_dense("long batch", &cfg, &p, &x, &y, n, 0.05);
}

//! Logit effects: which output tokens a feature's decoder direction promotes or suppresses when read straight
//! through the model's unembedding.
//!
//! A feature's direction is its decoder row for one target layer: its own layer for per-layer transcoders, the
//! last layer's slot for cross-layer transcoders (the slot that writes closest to the unembedding). The effect
//! on token `v` is `Σ_i W_U[v, i] · g_i · w_dec[i]`, with `g` the final norm's gain; through a LayerNorm
//! (GPT-2) the direction is centred first (`w_dec − mean(w_dec)`), as the norm's linear part does. The final
//! norm's data-dependent scale is left out, so values compare within a feature, not across models. The top and bottom tokens are selected with the trainer's TopK selection ([`topk_indices`]).

use crate::backend::cpu::encode::topk_indices;
use crate::backend::cpu::gemm::{Mat, Threads, matmul};
use crate::clt::{CltConfig, DecoderKind, Params};
use crate::{Error, Result};
use rayon::prelude::*;

/// The `n` most promoted and most suppressed tokens of one feature, best first, with their effects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogitEffects {
    pub top: Vec<(u32, f32)>,
    pub bottom: Vec<(u32, f32)>,
}

/// Which decoder slot [`logit_effects`] reads for a transcoder of this kind (for the docs and the metadata).
pub fn slot_name(cfg: &CltConfig) -> &'static str {
    match cfg.decoder {
        DecoderKind::CrossLayer => "last layer",
        DecoderKind::PerLayer => "own layer",
    }
}

/// Logit effects of every feature, `[layer][feature]`. `unembedding` is `[vocab][d]`; `gain` the final norm's
/// `[d]` weights, if any; `centre` whether that norm subtracts the mean (a LayerNorm). Features are processed
/// in parallel blocks (one GEMM each).
pub fn logit_effects(
    cfg: &CltConfig,
    params: &Params,
    unembedding: &[f32],
    gain: Option<&[f32]>,
    centre: bool,
    n: usize,
) -> Result<Vec<Vec<LogitEffects>>> {
    let (l_n, d, f_n) = (cfg.n_layers, cfg.d_model, cfg.n_features);
    if unembedding.is_empty() || !unembedding.len().is_multiple_of(d) {
        return Err(Error::Shape {
            what: "unembedding against the transcoder's d_model".into(),
            expected: vec![0, d],
            got: vec![unembedding.len()],
        });
    }
    let vocab = unembedding.len() / d;
    if let Some(g) = gain.filter(|g| g.len() != d) {
        return Err(Error::Shape {
            what: "final norm gain".into(),
            expected: vec![d],
            got: vec![g.len()],
        });
    }
    const BLOCK: usize = 32;
    let mut out = Vec::with_capacity(l_n);
    for l in 0..l_n {
        let rl = cfg.dec_row_len(l);
        let slot = match cfg.decoder {
            DecoderKind::CrossLayer => l_n - 1 - l,
            DecoderKind::PerLayer => 0,
        };
        let w = &params.w_dec[l];
        let layer: Vec<LogitEffects> = (0..f_n.div_ceil(BLOCK))
            .into_par_iter()
            .flat_map_iter(|blk| {
                let f0 = blk * BLOCK;
                let fb = BLOCK.min(f_n - f0);
                let mut dirs = vec![0.0f32; fb * d];
                for i in 0..fb {
                    let src = &w[(f0 + i) * rl + slot * d..][..d];
                    let dst = &mut dirs[i * d..(i + 1) * d];
                    let mean = if centre {
                        src.iter().sum::<f32>() / d as f32
                    } else {
                        0.0
                    };
                    match gain {
                        Some(g) => dst
                            .iter_mut()
                            .zip(src.iter().zip(g))
                            .for_each(|(o, (a, b))| *o = (a - mean) * b),
                        None => dst.iter_mut().zip(src).for_each(|(o, a)| *o = a - mean),
                    }
                }
                let mut logits = vec![0.0f32; fb * vocab];
                matmul(
                    &mut logits,
                    vocab,
                    Mat::rows(&dirs, fb, d),
                    Mat::rows(unembedding, vocab, d).t(),
                    0.0,
                    1.0,
                    Threads::One,
                );
                (0..fb)
                    .map(|i| {
                        let row = &logits[i * vocab..(i + 1) * vocab];
                        let neg: Vec<f32> = row.iter().map(|v| -v).collect();
                        let pick = |h: &[f32]| {
                            let mut idx = topk_indices(h, n);
                            idx.sort_by(|&a, &b| h[b as usize].total_cmp(&h[a as usize]));
                            idx.into_iter().map(|t| (t, row[t as usize])).collect()
                        };
                        LogitEffects {
                            top: pick(row),
                            bottom: pick(&neg),
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        out.push(layer);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effects_match_a_direct_dot_product() {
        let cfg = CltConfig {
            n_layers: 2,
            d_model: 3,
            n_features: 2,
            decoder: DecoderKind::CrossLayer,
            activation: Default::default(),
            skip: false,
        };
        let mut p = Params::zeros(&cfg);
        // Layer 0 feature 1, last-layer slot (1): direction (1, 0, -1).
        p.w_dec[0][3 * 2 + 3..3 * 2 + 6].copy_from_slice(&[1.0, 0.0, -1.0]);
        let wu = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0];
        let e = logit_effects(&cfg, &p, &wu, None, false, 2).unwrap();
        assert_eq!(e[0][1].top, vec![(3, 2.0), (0, 1.0)]);
        assert_eq!(e[0][1].bottom, vec![(2, -1.0), (1, 0.0)]);
        let g = [1.0, 1.0, 3.0];
        let e = logit_effects(&cfg, &p, &wu, Some(&g), false, 1).unwrap();
        assert_eq!(e[0][1].bottom, vec![(2, -3.0)]);
        // Through a LayerNorm: feature 0's direction (2, 2, 5) centred to (-1, -1, 2), times the gain.
        p.w_dec[0][3..6].copy_from_slice(&[2.0, 2.0, 5.0]);
        let e = logit_effects(&cfg, &p, &wu, Some(&g), true, 1).unwrap();
        assert_eq!(e[0][0].top, vec![(2, 6.0)]);
        assert_eq!(e[0][0].bottom, vec![(3, -2.0)]);
    }
}

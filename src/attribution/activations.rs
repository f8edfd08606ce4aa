//! What a transcoder's features do on one prompt (circuit-tracer's `get_activations`, Neuronpedia's "test
//! on text"): every active feature at every (layer, position), the features that fire most at each
//! position, how well the transcoder reconstructs each layer's MLP output on this prompt, and chosen
//! features' pre-activations at every position, so that one sees where a feature fires and how close it
//! comes elsewhere.
//!
//! The features are those of the attribution graph of the same prompt ([`super::prompt_state`]): position
//! 0 (the special token put first) keeps none, and its error is zero.

use super::linear::Attributable;
use super::replacement::{
    ActiveFeatures, Record, ReplacementTranscoder, encode, errors, forward_inputs,
};
use crate::{Error, Result};

/// How well the transcoder reconstructs one layer's MLP output on the prompt (positions ≥ 1).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LayerFit {
    /// Active features per position.
    pub l0: f64,
    /// Squared error over the MLP output's variance about its mean over the prompt's positions (as `clt
    /// eval` defines it over a store; a short prompt's variance is small, so this is noisy).
    pub nmse: f64,
    /// Squared error over the MLP output's squared norm: the share of the output the error nodes carry.
    pub error_share: f64,
    /// Per position, the error's norm over the MLP output's norm (0 at position 0).
    pub error_by_position: Vec<f32>,
}

/// One feature followed over every position of the prompt.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FeatureTrace {
    pub layer: usize,
    pub feature: usize,
    /// Its threshold θ (0 for a ReLU or TopK transcoder): it fires where its pre-activation exceeds θ and 0
    /// (and, for TopK, is among the position's k largest).
    pub threshold: f32,
    /// Its pre-activation `x · W_enc + b_enc` at every position (position 0 included).
    pub pre: Vec<f32>,
    /// Its activation at every position (0 where it does not fire, and at position 0).
    pub activation: Vec<f32>,
}

/// A transcoder's features on one prompt.
#[derive(Clone, Debug)]
pub struct PromptActivations {
    pub tokens: Vec<u32>,
    /// Every active feature, ordered by (layer, position, feature).
    pub features: ActiveFeatures,
    /// Per layer.
    pub layers: Vec<LayerFit>,
    /// The features asked for, in the order asked.
    pub traces: Vec<FeatureTrace>,
}

impl PromptActivations {
    /// The `k` strongest features at position `pos` over all layers, as indices into [`Self::features`]:
    /// by activation, largest first, ties by (layer, feature).
    pub fn top_at(&self, pos: usize, k: usize) -> Vec<usize> {
        let af = &self.features;
        let mut at: Vec<usize> = (0..self.layers.len())
            .flat_map(|l| af.group(l, pos))
            .collect();
        at.sort_by(|&a, &b| af.value[b].total_cmp(&af.value[a]).then(a.cmp(&b)));
        at.truncate(k);
        at
    }
}

/// Parses `LAYER:FEATURE` and checks it against the transcoder's shape.
pub fn parse_feature(s: &str, tc: &ReplacementTranscoder) -> Result<(usize, usize)> {
    let bad = |why: String| Error::config("feature", format!("`{s}`: {why}"));
    let (l, f) = s
        .split_once(':')
        .ok_or_else(|| bad("expected LAYER:FEATURE, e.g. 3:117".into()))?;
    let num = |v: &str, what: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| bad(format!("the {what} `{v}` is not a non-negative integer")))
    };
    let (l, f) = (num(l, "layer")?, num(f, "feature")?);
    if l >= tc.cfg.n_layers {
        return Err(bad(format!(
            "layer {l} is past the transcoder's {} layers",
            tc.cfg.n_layers
        )));
    }
    if f >= tc.cfg.n_features {
        return Err(bad(format!(
            "feature {f} is past the transcoder's {} features per layer",
            tc.cfg.n_features
        )));
    }
    Ok((l, f))
}

/// Runs the model over `tokens` (which should start with its special token) and computes the transcoder's
/// features there, each layer's fit, and the traces of the features `watch` names (`(layer, feature)`,
/// checked by [`parse_feature`] or here).
pub fn prompt_activations(
    model: &dyn Attributable,
    tc: &ReplacementTranscoder,
    tokens: &[u32],
    watch: &[(usize, usize)],
) -> Result<PromptActivations> {
    tc.check_fits(model)?;
    let (l_n, d, f_n) = (tc.cfg.n_layers, tc.cfg.d_model, tc.cfg.n_features);
    if let Some(&(l, f)) = watch.iter().find(|&&(l, f)| l >= l_n || f >= f_n) {
        return Err(Error::config(
            "feature",
            format!("{l}:{f} is not a feature of a transcoder of {l_n} layers × {f_n} features"),
        ));
    }
    let (out, inputs, mlp_out) = forward_inputs(model, tc, tokens, Record::Outputs)?;
    let n = out.n_tokens;
    let features = encode(tc, &inputs, n);
    let err = errors(tc, &features, &inputs, &mlp_out, n);
    let layers = (0..l_n)
        .map(|l| layer_fit(&err[l], &mlp_out[l], n, d, features.layer_range(l).len()))
        .collect();
    let traces = watch
        .iter()
        .map(|&(l, f)| {
            let w = &tc.params.w_enc[l][f * d..(f + 1) * d];
            let pre = (0..n)
                .map(|p| {
                    let x = &inputs[l][p * d..(p + 1) * d];
                    x.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + tc.params.b_enc[l][f]
                })
                .collect();
            // The activations are the encoder's own (the list's), not recomputed from `pre`, whose sum
            // order may differ in the last bit.
            let mut activation = vec![0.0f32; n];
            for p in 1..n {
                let g = features.group(l, p);
                if let Ok(i) = features.index[g.clone()].binary_search(&(f as u32)) {
                    activation[p] = features.value[g.start + i];
                }
            }
            FeatureTrace {
                layer: l,
                feature: f,
                threshold: tc.thresholds[l][f],
                pre,
                activation,
            }
        })
        .collect();
    Ok(PromptActivations {
        tokens: tokens.to_vec(),
        features,
        layers,
        traces,
    })
}

/// One layer's fit from its error nodes `e` and MLP outputs `y` (`[n][d]`), positions ≥ 1.
fn layer_fit(e: &[f32], y: &[f32], n: usize, d: usize, active: usize) -> LayerFit {
    let sq = |v: &[f32]| v.iter().map(|&a| a as f64 * a as f64).sum::<f64>();
    let rows = n.saturating_sub(1);
    let mut mean = vec![0.0f64; d];
    for yp in y.chunks_exact(d).skip(1) {
        mean.iter_mut().zip(yp).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= rows.max(1) as f64);
    let var: f64 = y
        .chunks_exact(d)
        .skip(1)
        .map(|yp| {
            yp.iter()
                .zip(&mean)
                .map(|(&v, m)| (v as f64 - m).powi(2))
                .sum::<f64>()
        })
        .sum();
    let (mut err_sq, mut out_sq) = (0.0f64, 0.0f64);
    let mut error_by_position = vec![0.0f32; n];
    for (p, (ep, yp)) in e.chunks_exact(d).zip(y.chunks_exact(d)).enumerate().skip(1) {
        let (es, ys) = (sq(ep), sq(yp));
        err_sq += es;
        out_sq += ys;
        error_by_position[p] = (es / ys.max(1e-30)).sqrt() as f32;
    }
    LayerFit {
        l0: active as f64 / rows.max(1) as f64,
        nmse: err_sq / var.max(1e-30),
        error_share: err_sq / out_sq.max(1e-30),
        error_by_position,
    }
}

/// The record of a prompt's activations (`clt activations --json`, the viewer's `/api/activations`): the
/// tokens and their pieces, each layer's fit, the `top` strongest features at each position, the traces,
/// and with `all` every active feature as four parallel arrays (layer, position, feature, activation).
/// Features carry their label where `labels` has one.
pub fn activations_json(
    tok: &crate::model::Tokenizer,
    pa: &PromptActivations,
    top: usize,
    labels: Option<&crate::features::labels::Labels>,
    all: bool,
) -> serde_json::Value {
    use serde_json::json;
    let af = &pa.features;
    let label = |l: usize, f: usize| labels.and_then(|ls| ls.get(l, f));
    let top: Vec<Vec<serde_json::Value>> = (0..af.n_pos)
        .map(|p| {
            pa.top_at(p, top)
                .into_iter()
                .map(|i| {
                    let (l, f) = (af.layer[i] as usize, af.index[i] as usize);
                    json!({"layer": l, "feature": f, "activation": af.value[i], "label": label(l, f)})
                })
                .collect()
        })
        .collect();
    let layers: Vec<serde_json::Value> = pa
        .layers
        .iter()
        .enumerate()
        .map(|(l, fit)| {
            json!({"layer": l, "l0": fit.l0, "nmse": fit.nmse, "error_share": fit.error_share,
                   "error_by_position": fit.error_by_position})
        })
        .collect();
    let traces: Vec<serde_json::Value> = pa
        .traces
        .iter()
        .map(|t| {
            json!({"layer": t.layer, "feature": t.feature, "label": label(t.layer, t.feature),
                   "threshold": t.threshold, "pre": t.pre, "activation": t.activation})
        })
        .collect();
    let mut j = json!({
        "tokens": pa.tokens,
        "pieces": pa.tokens.iter().map(|&t| tok.piece(t)).collect::<Vec<_>>(),
        "layers": layers,
        "top": top,
        "traces": traces,
    });
    if all {
        j["active"] = json!({
            "layer": af.layer, "position": af.pos, "feature": af.index, "activation": af.value,
        });
    }
    j
}

//! The local replacement model of one prompt: the model's forward with its nonlinearities recorded for
//! freezing, the transcoder's active features at every (layer, position), and the error nodes.
//!
//! At every layer the MLP's output is split into the transcoder's reconstruction (a sum over active features
//! of activation × decoder row, over every earlier layer whose decoders reach this one, plus the decoder bias
//! and the skip path) and an error term (true output − reconstruction). Position 0 (the beginning-of-sequence
//! token) keeps no features and a zero error, as in circuit-tracer.

use super::linear::Attributable;
use crate::backend::cpu::encode::{LayerCodes, topk_indices};
use crate::backend::cpu::sparse;
use crate::cache::InputHook;
use crate::clt::{Activation, CltConfig, Params, Transcoder};
use crate::model::{ForwardOptions, ForwardRecord, Hooks, Logits, forward};
use crate::{Error, Result};
use rayon::prelude::*;

/// A transcoder in the model's raw units (normalisation scalars folded in), with the hook it reads.
#[derive(Clone, Debug)]
pub struct ReplacementTranscoder {
    pub cfg: CltConfig,
    pub params: Params,
    /// θ per feature per layer (0 for a ReLU or TopK transcoder).
    pub thresholds: Vec<Vec<f32>>,
    /// A TopK transcoder's `k`: at each position the layer's `k` largest pre-activations fire (through a
    /// ReLU, ties to the lower index, as in training) instead of those above their threshold.
    pub topk: Option<usize>,
    pub input_hook: InputHook,
}

impl ReplacementTranscoder {
    /// Folds `t`'s normalisation into its weights. JumpReLU (or ReLU) and TopK transcoders: each
    /// position's features depend on that position's pre-activations only. BatchTopK is refused: its
    /// selection depends on the other tokens of the batch, which a prompt does not have (convert it to
    /// JumpReLU, as its authors do for inference).
    pub fn new(t: &Transcoder, input_hook: InputHook) -> Result<Self> {
        let topk = match t.cfg.activation {
            Activation::JumpRelu => None,
            Activation::TopK { k } => Some(k),
            Activation::BatchTopK { .. } => {
                return Err(Error::Unsupported(
                    "a BatchTopK transcoder selects features over a whole batch, which a prompt does not \
                     have: convert it to JumpReLU first (`clt convert-batchtopk`)"
                        .into(),
                ));
            }
        };
        let params = crate::clt::export::fold_norms(t);
        let thresholds = match topk {
            None => params
                .log_theta
                .iter()
                .map(|l| l.iter().map(|v| v.exp()).collect())
                .collect(),
            Some(_) => vec![vec![0.0; t.cfg.n_features]; t.cfg.n_layers],
        };
        Ok(ReplacementTranscoder {
            cfg: t.cfg.clone(),
            params,
            thresholds,
            topk,
            input_hook,
        })
    }

    /// Layer `k`'s activations at one position, in place, from its pre-activations `h` (`[F]`, encoder
    /// bias included): [`activation`] against each feature's threshold, or the `k` largest through a ReLU
    /// for a TopK transcoder.
    pub fn activate(&self, k: usize, h: &mut [f32]) {
        match self.topk {
            None => h
                .iter_mut()
                .zip(&self.thresholds[k])
                .for_each(|(v, &t)| *v = activation(*v, t)),
            Some(top) => {
                let keep: Vec<(u32, f32)> = (topk_indices(h, top).into_iter())
                    .map(|f| (f, h[f as usize].max(0.0)))
                    .collect();
                h.fill(0.0);
                keep.into_iter().for_each(|(f, a)| h[f as usize] = a);
            }
        }
    }

    /// Checks the transcoder fits `model`.
    pub fn check_fits(&self, model: &dyn Attributable) -> Result<()> {
        let lin = model.linear();
        let (l, d) = (lin.n_layers, lin.d_model);
        if self.cfg.n_layers != l || self.cfg.d_model != d {
            return Err(Error::Shape {
                what: "transcoder (layers, d_model) against the model's".into(),
                expected: vec![l, d],
                got: vec![self.cfg.n_layers, self.cfg.d_model],
            });
        }
        Ok(())
    }

    /// The decoder row of feature `f` of source layer `l` into target layer `k` (`None` when it does not
    /// write there).
    pub fn dec_row(&self, l: usize, f: usize, k: usize) -> Option<&[f32]> {
        let d = self.cfg.d_model;
        if k < l || k - l >= self.cfg.n_targets(l) {
            return None;
        }
        let rl = self.cfg.dec_row_len(l);
        let start = f * rl + (k - l) * d;
        Some(&self.params.w_dec[l][start..start + d])
    }
}

/// The active features of a prompt, ordered by (layer, position, feature index): circuit-tracer's order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActiveFeatures {
    pub layer: Vec<u32>,
    pub pos: Vec<u32>,
    pub index: Vec<u32>,
    pub value: Vec<f32>,
    /// Start of each (layer, position) group: group `l * n + p` is `starts[g]..starts[g + 1]`.
    pub starts: Vec<usize>,
    pub n_pos: usize,
}

impl ActiveFeatures {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The range of features at (`layer`, `pos`).
    pub fn group(&self, layer: usize, pos: usize) -> std::ops::Range<usize> {
        let g = layer * self.n_pos + pos;
        self.starts[g]..self.starts[g + 1]
    }

    /// The range of features of `layer` (all positions).
    pub fn layer_range(&self, layer: usize) -> std::ops::Range<usize> {
        self.starts[layer * self.n_pos]..self.starts[(layer + 1) * self.n_pos]
    }
}

/// Everything the attribution of one prompt needs from its forward pass.
#[derive(Clone, Debug)]
pub struct PromptState {
    pub tokens: Vec<u32>,
    pub n: usize,
    /// Attention patterns and norm scales (frozen in the linearised model).
    pub record: ForwardRecord,
    /// Per layer, the transcoder's input at every position, `[n][d]`.
    pub inputs: Vec<Vec<f32>>,
    /// Per layer, the true MLP output, `[n][d]`.
    pub mlp_out: Vec<Vec<f32>>,
    /// Per layer, the error node vectors `[n][d]` (zero at position 0).
    pub errors: Vec<Vec<f32>>,
    pub features: ActiveFeatures,
    /// Logits of the last position, `[vocab]`.
    pub logits: Vec<f32>,
}

/// Runs the model over `tokens` and computes the replacement model's state.
pub fn prompt_state(
    model: &dyn Attributable,
    tc: &ReplacementTranscoder,
    tokens: &[u32],
) -> Result<PromptState> {
    tc.check_fits(model)?;
    let (out, inputs, mlp_out) = forward_inputs(model, tc, tokens, Record::Frozen)?;
    let (n, record) = (out.n_tokens, out.record);
    let features = encode(tc, &inputs, n);
    let errors = errors(tc, &features, &inputs, &mlp_out, n);
    Ok(PromptState {
        tokens: tokens.to_vec(),
        n,
        record,
        inputs,
        mlp_out,
        errors,
        features,
        logits: out.logits,
    })
}

/// One `[n][d]` array per layer.
type PerLayer = Vec<Vec<f32>>;

/// What [`forward_inputs`] records besides the transcoder's input at every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Record {
    /// Nothing else.
    Inputs,
    /// The MLP outputs too (the error nodes need them).
    Outputs,
    /// The MLP outputs, what attribution freezes (attention patterns, norm scales) and the last position's
    /// logits.
    Frozen,
}

/// One forward over `tokens` recording the transcoder's input at every layer and what `what` asks for.
/// Returns the output (its record stripped of the inputs and MLP outputs), the inputs and the MLP outputs
/// (empty with [`Record::Inputs`]).
pub(super) fn forward_inputs(
    model: &dyn Attributable,
    tc: &ReplacementTranscoder,
    tokens: &[u32],
    what: Record,
) -> Result<(crate::model::ForwardOutput, PerLayer, PerLayer)> {
    let frozen = what == Record::Frozen;
    let outputs = what != Record::Inputs;
    let hooks = Hooks {
        attn_pattern: frozen,
        norm_scales: frozen,
        mlp_out: outputs,
        ..tc.input_hook.hooks()
    };
    let mut out = model.forward_with(
        tokens,
        &ForwardOptions {
            hooks,
            logits: if frozen { Logits::Last } else { Logits::None },
            ..ForwardOptions::default()
        },
    )?;
    let mut inputs = Vec::with_capacity(out.record.layers.len());
    let mut mlp_out = Vec::with_capacity(out.record.layers.len());
    for r in &mut out.record.layers {
        let x = tc.input_hook.take(r);
        inputs
            .push(x.ok_or_else(|| Error::Unsupported("forward did not record the input".into()))?);
        if outputs {
            mlp_out.push(
                r.mlp_out
                    .take()
                    .ok_or_else(|| Error::Unsupported("forward did not record mlp_out".into()))?,
            );
        }
    }
    Ok((out, inputs, mlp_out))
}

/// A feature's activation from its pre-activation `h` (bias included) and threshold `th` (0 for ReLU).
pub fn activation(h: f32, th: f32) -> f32 {
    if h > th && h > 0.0 { h } else { 0.0 }
}

/// Adds layer `k`'s skip path `W_skip[k] · x` to `out` (one position).
pub fn add_skip(tc: &ReplacementTranscoder, k: usize, x: &[f32], out: &mut [f32]) {
    let d = tc.cfg.d_model;
    for (i, o) in out.iter_mut().enumerate() {
        let w = &tc.params.w_skip[k][i * d..(i + 1) * d];
        *o += w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
    }
}

/// Layer `k`'s active features at each of `rows` positions starting at position `first`, from the
/// transcoder's input `x` (`[rows, d]`): per row, (feature, activation) by feature index; none at position 0.
pub fn encode_layer(
    tc: &ReplacementTranscoder,
    k: usize,
    x: &[f32],
    rows: usize,
    first: usize,
) -> Vec<Vec<(u32, f32)>> {
    let (d, f_n) = (tc.cfg.d_model, tc.cfg.n_features);
    let mut pre = vec![0.0f32; rows * f_n];
    forward::matmul_wt(x, rows, d, &tc.params.w_enc[k], f_n, &mut pre);
    let b = &tc.params.b_enc[k];
    pre.par_chunks_mut(f_n.max(1))
        .take(rows)
        .enumerate()
        .map(|(r, h)| {
            if first + r == 0 {
                return Vec::new();
            }
            h.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            tc.activate(k, h);
            h.iter()
                .enumerate()
                .filter(|&(_, &a)| a > 0.0)
                .map(|(f, &a)| (f as u32, a))
                .collect()
        })
        .collect()
}

/// The active features at positions ≥ 1 of every layer: pre-activations above their threshold.
pub fn encode(tc: &ReplacementTranscoder, inputs: &[Vec<f32>], n: usize) -> ActiveFeatures {
    let mut af = ActiveFeatures {
        n_pos: n,
        starts: vec![0],
        ..ActiveFeatures::default()
    };
    for (l, x) in inputs.iter().enumerate() {
        for (p, row) in encode_layer(tc, l, x, n, 0).into_iter().enumerate() {
            for (f, a) in row {
                af.layer.push(l as u32);
                af.pos.push(p as u32);
                af.index.push(f);
                af.value.push(a);
            }
            af.starts.push(af.index.len());
        }
    }
    af
}

/// The transcoder's output at every layer and position ≥ 1 (reconstruction + decoder bias + skip).
pub fn reconstruct(
    tc: &ReplacementTranscoder,
    af: &ActiveFeatures,
    inputs: &[Vec<f32>],
    n: usize,
) -> Vec<Vec<f32>> {
    let (l_n, d) = (tc.cfg.n_layers, tc.cfg.d_model);
    // The training step's sparse decode (`[n][L][d]`, tiles of positions, each active feature's decoder row
    // read once per tile): the active features as its per-layer codes, by position, then feature index.
    let codes: Vec<LayerCodes> = (0..l_n)
        .map(|l| {
            let all = af.layer_range(l);
            LayerCodes {
                offsets: (0..n)
                    .map(|p| af.group(l, p).start - all.start)
                    .chain([all.len()])
                    .collect(),
                feat: af.index[all.clone()].to_vec(),
                act: af.value[all].to_vec(),
                ..LayerCodes::default()
            }
        })
        .collect();
    let mut by_pos = sparse::decode_start(&tc.cfg, &tc.params, n, true);
    sparse::decode_layers(&tc.cfg, &tc.params, &codes, n, 0..l_n, &mut by_pos);
    let row = l_n * d;
    if tc.cfg.skip {
        by_pos
            .par_chunks_mut(row.max(1))
            .enumerate()
            .skip(1)
            .for_each(|(p, out)| {
                for (k, o) in out.chunks_exact_mut(d).enumerate() {
                    add_skip(tc, k, &inputs[k][p * d..(p + 1) * d], o);
                }
            });
    }
    // Layer by layer; position 0 (the special token) has none.
    let mut recon = vec![vec![0.0f32; n * d]; l_n];
    for (p, r) in by_pos.chunks_exact(row.max(1)).enumerate().skip(1) {
        for (k, rk) in recon.iter_mut().enumerate() {
            rk[p * d..(p + 1) * d].copy_from_slice(&r[k * d..(k + 1) * d]);
        }
    }
    recon
}

/// The error nodes: per layer, the true MLP output − the transcoder's output, zero at position 0.
pub(super) fn errors(
    tc: &ReplacementTranscoder,
    af: &ActiveFeatures,
    inputs: &[Vec<f32>],
    mlp_out: &[Vec<f32>],
    n: usize,
) -> Vec<Vec<f32>> {
    let d = tc.cfg.d_model;
    let mut e = reconstruct(tc, af, inputs, n);
    for (ek, yk) in e.iter_mut().zip(mlp_out) {
        ek[..d].fill(0.0);
        for (v, y) in ek[d..].iter_mut().zip(&yk[d..]) {
            *v = y - *v;
        }
    }
    e
}

/// A random JumpReLU CLT for `model` whose thresholds are set, layer by layer, so that about `l0` features
/// per token fire on `tokens`, reading `input_hook`: for timing and memory figures, whose cost depends on
/// the number of active features and the shapes, not on what the features mean, and for the oracle tests
/// on random models. Encoder rows are random unit vectors, decoder rows random with norm ~0.1, biases
/// zero.
pub fn calibrated_transcoder(
    model: &dyn Attributable,
    tokens: &[u32],
    n_features: usize,
    l0: usize,
    seed: u64,
    input_hook: InputHook,
) -> Result<ReplacementTranscoder> {
    let lin = model.linear();
    let (l_n, d) = (lin.n_layers, lin.d_model);
    let cfg = CltConfig {
        n_layers: l_n,
        d_model: d,
        n_features,
        decoder: crate::clt::DecoderKind::CrossLayer,
        activation: Activation::JumpRelu,
        skip: false,
    };
    cfg.validate()?;
    let mut rng = crate::rng::Rng::seed(seed);
    let mut p = Params::zeros(&cfg);
    for w in &mut p.w_enc {
        for row in w.chunks_exact_mut(d) {
            row.iter_mut().for_each(|v| *v = rng.normal() as f32);
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= norm);
        }
    }
    let dec_scale = 0.1 / (d as f64).sqrt();
    for w in &mut p.w_dec {
        w.iter_mut()
            .for_each(|v| *v = (rng.normal() * dec_scale) as f32);
    }
    let mut tc = ReplacementTranscoder {
        cfg,
        params: p,
        thresholds: vec![vec![0.0; n_features]; l_n],
        topk: None,
        input_hook,
    };
    // Thresholds: the (l0 · (n − 1))-th largest pre-activation of each layer over positions ≥ 1.
    let (_, st, _) = forward_inputs(model, &tc, tokens, Record::Inputs)?;
    let n = tokens.len();
    let mut pre = vec![0.0f32; n * n_features];
    for l in 0..l_n {
        forward::matmul_wt(&st[l], n, d, &tc.params.w_enc[l], n_features, &mut pre);
        let mut v: Vec<f32> = pre[n_features..].to_vec();
        let k = (l0 * (n - 1)).clamp(1, v.len());
        v.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let theta = v[k - 1].max(1e-6);
        // θ just below the k-th value, stored as `log_theta` and read back through `exp` as
        // `ReplacementTranscoder::new` does, so an exported copy has the same active features.
        let log_theta = (theta * (1.0 - 1e-6)).ln();
        tc.params.log_theta[l].fill(log_theta);
        tc.thresholds[l].fill(log_theta.exp());
    }
    Ok(tc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topk(k: usize, f_n: usize) -> ReplacementTranscoder {
        let cfg = CltConfig {
            n_layers: 1,
            d_model: 1,
            n_features: f_n,
            decoder: crate::clt::DecoderKind::CrossLayer,
            activation: Activation::TopK { k },
            skip: false,
        };
        let t = Transcoder {
            params: Params::zeros(&cfg),
            norms: crate::clt::NormScales::identity(1),
            cfg,
        };
        ReplacementTranscoder::new(&t, InputHook::MlpInNormed).unwrap()
    }

    #[test]
    fn topk_keeps_the_k_largest_ties_to_the_lower_index_then_a_relu() {
        let tc = topk(3, 6);
        assert_eq!(tc.topk, Some(3));
        assert!(tc.thresholds[0].iter().all(|&t| t == 0.0));
        let mut h = [0.5f32, 2.0, 0.5, -1.0, 0.5, 1.0];
        tc.activate(0, &mut h);
        assert_eq!(h, [0.5, 2.0, 0.0, 0.0, 0.0, 1.0]);
        // Fewer than k positive: the selected negatives are off.
        let mut h = [-3.0f32, 0.25, -1.0, -2.0, -0.5, -4.0];
        tc.activate(0, &mut h);
        assert_eq!(h, [0.0, 0.25, 0.0, 0.0, 0.0, 0.0]);
    }
}

//! The transcoder spliced into the model and scored on text: the model's next-token loss with its MLPs
//! replaced by the transcoder, against the model itself and against the MLPs ablated. NMSE says how well
//! the transcoder fits each MLP's output; this says how much of the model's behaviour the replacement keeps
//! when its errors compound through the layers (SAELens' "CE loss score", the spliced-in loss of
//! Anthropic's CLT papers).
//!
//! A spliced forward runs the model with every MLP output (the value added to the residual stream) replaced
//! by the transcoder's output: each layer's features are encoded from the spliced stream itself, as the
//! layer's MLP would have read it, and decoded with every earlier layer's active features whose decoders
//! reach it, plus the decoder bias and the skip path: the replacement model without its error nodes.
//! Position 0 (the special token) keeps the model's own MLP output at every layer, as in attribution,
//! where it has no features. The baseline replaces every MLP output at positions ≥ 1 by zero.
//!
//! Scores are over the predictions made at positions ≥ 1 (position 0's logits are the same in every run):
//! the mean cross-entropy of the next token (nats), the mean KL divergence `KL(model ‖ spliced)` of the
//! next-token distributions, top-1 agreement with the model, and the fraction of the loss recovered,
//! `(CE_zero − CE_spliced) / (CE_zero − CE_model)` (1: as good as the model; 0: no better than no MLPs).
//! With `per_layer`, each layer is also spliced alone (the other MLPs the model's own, on the changed
//! stream), which shows where the replacement's loss comes from.

use super::linear::Attributable;
use super::replacement::{ReplacementTranscoder, add_skip, encode_layer};
use crate::backend::cpu::encode::LayerCodes;
use crate::backend::cpu::sparse;
use crate::model::{ForwardOptions, Hooks, Intervention, MlpInputs, MlpOverride};
use crate::{Error, Result};
use rayon::prelude::*;
use std::sync::Mutex;

/// Which MLP outputs a spliced forward replaces (at positions ≥ 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Splice {
    /// Every layer's: the transcoder's output.
    All,
    /// Only this layer's (its features, and those of earlier layers whose decoders reach it, encoded from
    /// the stream).
    Layer(usize),
    /// Every layer's, by zero (the ablation baseline).
    Zero,
}

/// What a spliced forward has computed so far: each source layer's active features (as the training
/// step's codes) and their decoded sum into every target layer, `[rows][L][d]` from the decoder bias.
#[derive(Debug, Default)]
struct Decoded {
    codes: Vec<LayerCodes>,
    yhat: Vec<f32>,
}

/// The MLPs of a spliced forward, called layer by layer.
#[derive(Debug)]
struct SplicedMlps<'a> {
    tc: &'a ReplacementTranscoder,
    splice: Splice,
    /// The model's MLP output at position 0 of each layer (`[d]`), when the caller has it from the model's
    /// own run: position 0 sees only itself and keeps the model's MLPs, so its outputs are the same in every
    /// spliced forward, and the forward then need not run the model's MLPs at all (for [`Splice::All`] and
    /// [`Splice::Zero`]: most of a forward's work).
    position0: Option<&'a [Vec<f32>]>,
    /// The layers so far of the forward in progress.
    decoded: Mutex<Decoded>,
}

impl SplicedMlps<'_> {
    /// Layer `k`'s active features at each row as the training step's codes (by row, then feature
    /// index), from its transcoder input `x` (`[rows, d]`); none at position 0.
    fn encode(&self, k: usize, first: usize, x: &[f32], rows: usize) -> LayerCodes {
        let mut codes = LayerCodes {
            offsets: vec![0],
            ..LayerCodes::default()
        };
        for row in encode_layer(self.tc, k, x, rows, first) {
            for (f, a) in row {
                codes.feat.push(f);
                codes.act.push(a);
            }
            codes.offsets.push(codes.feat.len());
        }
        codes
    }
}

impl MlpOverride for SplicedMlps<'_> {
    fn mlp_out(&self, k: usize, inputs: &MlpInputs<'_>) -> Vec<f32> {
        let tc = self.tc;
        let d = tc.cfg.d_model;
        let (first, rows) = (inputs.first_position, inputs.normed.len() / d);
        let mut out = match (inputs.model_mlp, self.position0) {
            (Some(model), _) => model[..rows * d].to_vec(),
            (None, Some(p0)) => {
                let mut out = vec![0.0f32; rows * d];
                if first == 0 && rows > 0 {
                    out[..d].copy_from_slice(&p0[k][..d]);
                }
                out
            }
            (None, None) => unreachable!("wants_model_mlp asked for the model's MLP output"),
        };
        let replaced = match self.splice {
            Splice::Zero => {
                out.par_chunks_mut(d)
                    .enumerate()
                    .filter(|&(r, _)| first + r > 0)
                    .for_each(|(_, o)| o.fill(0.0));
                return out;
            }
            Splice::All => true,
            Splice::Layer(l) => l == k,
        };
        let (cfg, params) = (&tc.cfg, &tc.params);
        let mut dec = self.decoded.lock().unwrap_or_else(|e| e.into_inner());
        if k == 0 {
            dec.codes = vec![LayerCodes::default(); cfg.n_layers];
            dec.yhat = sparse::decode_start(cfg, params, rows, true);
        }
        // Every layer up to the last one replaced is encoded: their decoders reach it. Each is decoded
        // into every later target at once, by the training step's tiled decode (a feature's decoder row
        // read once per tile of positions): target k is complete once layers 0..=k are in.
        let needed = match self.splice {
            Splice::Layer(l) => k <= l,
            _ => true,
        };
        let x = tc.input_hook.of(inputs);
        if needed {
            dec.codes[k] = self.encode(k, first, x, rows);
            let Decoded { codes, yhat } = &mut *dec;
            sparse::decode_layers(cfg, params, codes, rows, k..k + 1, yhat);
        }
        if !replaced {
            return out;
        }
        let (yhat, row) = (&dec.yhat, cfg.n_layers * d);
        out.par_chunks_mut(d)
            .enumerate()
            .filter(|&(r, _)| first + r > 0)
            .for_each(|(r, o)| {
                o.copy_from_slice(&yhat[r * row + k * d..r * row + (k + 1) * d]);
                if cfg.skip {
                    add_skip(tc, k, &x[r * d..(r + 1) * d], o);
                }
            });
        out
    }

    fn wants_model_mlp(&self, _first_position: usize, _n: usize) -> bool {
        // Position 0 keeps it (unless given); a single-layer splice keeps it at the other layers.
        self.position0.is_none() || matches!(self.splice, Splice::Layer(_))
    }
}

/// The logits of every position, `[n, vocab]`, of `tokens` with `splice` applied.
pub fn spliced_logits(
    model: &dyn Attributable,
    tc: &ReplacementTranscoder,
    tokens: &[u32],
    splice: Splice,
) -> Result<Vec<f32>> {
    spliced_logits_with(model, tc, tokens, splice, None)
}

/// [`spliced_logits`], given the model's MLP outputs at position 0 (per layer, `[d]` or more) when the
/// caller has them from the model's own forward over the same tokens: then [`Splice::All`] and
/// [`Splice::Zero`] do not run the model's MLPs.
pub fn spliced_logits_with(
    model: &dyn Attributable,
    tc: &ReplacementTranscoder,
    tokens: &[u32],
    splice: Splice,
    position0: Option<&[Vec<f32>]>,
) -> Result<Vec<f32>> {
    tc.check_fits(model)?;
    if let Splice::Layer(l) = splice
        && l >= tc.cfg.n_layers
    {
        return Err(Error::InvalidData {
            what: format!("spliced layer {l}"),
            reason: format!("the transcoder has {} layers", tc.cfg.n_layers),
        });
    }
    let mlps = SplicedMlps {
        tc,
        splice,
        position0,
        decoded: Mutex::new(Decoded::default()),
    };
    let opts = ForwardOptions {
        intervention: Intervention {
            mlp_fn: Some(&mlps),
            ..Intervention::default()
        },
        ..ForwardOptions::default()
    };
    Ok(model.forward_with(tokens, &opts)?.logits)
}

/// Sums of next-token scores of one kind of forward against the model's, over predictions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scores {
    /// Predictions scored.
    pub n: u64,
    /// Σ cross-entropy of the next token (nats).
    pub ce: f64,
    /// Σ KL(model ‖ this forward) of the next-token distributions (nats).
    pub kl: f64,
    /// Predictions whose most likely token is the model's.
    pub top1: u64,
}

impl Scores {
    pub fn mean_ce(&self) -> f64 {
        self.ce / self.n.max(1) as f64
    }
    pub fn mean_kl(&self) -> f64 {
        self.kl / self.n.max(1) as f64
    }
    pub fn top1_agreement(&self) -> f64 {
        self.top1 as f64 / self.n.max(1) as f64
    }
}

/// `log Σ exp(row)` in f64.
fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv { (i, v) } else { (bi, bv) }
        })
        .0
}

/// The model's next-token distributions over one context's scored positions (`1..n − 1`), kept so that
/// each other forward is scored with one pass over its logits: with `p` the model's probabilities and `o`
/// the other logits, `KL = Σ p log p − Σ p·o + log Σ exp(o)`. It holds the model's logits (f32, as the
/// forward returned them) and each position's `log Σ exp`, and recomputes `p` from them when scoring: no
/// `[positions × vocab]` copy in f64 (1 GB for a 1,024-token context of a 128k vocabulary).
pub struct Reference {
    vocab: usize,
    /// The model's logits `[n, vocab]`.
    clean: Vec<f32>,
    /// Per scored position: the model's `log Σ exp`, `Σ p log p`, cross-entropy of the next token and top
    /// token.
    lse: Vec<f64>,
    neg_entropy: Vec<f64>,
    ce: Vec<f64>,
    top: Vec<usize>,
}

impl Reference {
    /// From the model's logits `[n, vocab]` of `tokens`.
    pub fn new(clean: Vec<f32>, tokens: &[u32], vocab: usize) -> Self {
        let n = tokens.len();
        let rows: Vec<(f64, f64, f64, usize)> = (1..n.saturating_sub(1))
            .into_par_iter()
            .map(|p| {
                let c = &clean[p * vocab..(p + 1) * vocab];
                let lse = log_sum_exp(c);
                let h = c
                    .iter()
                    .map(|&v| {
                        let lp = v as f64 - lse;
                        lp.exp() * lp
                    })
                    .sum();
                (lse, h, lse - c[tokens[p + 1] as usize] as f64, argmax(c))
            })
            .collect();
        let mut r = Reference {
            vocab,
            clean,
            lse: Vec::with_capacity(rows.len()),
            neg_entropy: Vec::with_capacity(rows.len()),
            ce: Vec::with_capacity(rows.len()),
            top: Vec::with_capacity(rows.len()),
        };
        for (lse, h, ce, top) in rows {
            r.lse.push(lse);
            r.neg_entropy.push(h);
            r.ce.push(ce);
            r.top.push(top);
        }
        r
    }

    /// Adds the model's own predictions to `s` (its KL is 0 and its agreement 1 by definition).
    pub fn add_model(&self, s: &mut Scores) {
        s.n += self.ce.len() as u64;
        s.ce += self.ce.iter().sum::<f64>();
        s.top1 += self.ce.len() as u64;
    }

    /// Adds the predictions of `logits` (`[n, vocab]` over the same tokens) to `s`.
    pub fn score(&self, logits: &[f32], tokens: &[u32], s: &mut Scores) {
        let v = self.vocab;
        let rows: Vec<(f64, f64, bool)> = (0..self.ce.len())
            .into_par_iter()
            .map(|i| {
                let pos = i + 1;
                let o = &logits[pos * v..(pos + 1) * v];
                let lse = log_sum_exp(o);
                let (c, lse_c) = (&self.clean[pos * v..(pos + 1) * v], self.lse[i]);
                let po: f64 = c
                    .iter()
                    .zip(o)
                    .map(|(&q, &x)| (q as f64 - lse_c).exp() * x as f64)
                    .sum();
                let kl = self.neg_entropy[i] - po + lse;
                let ce = lse - o[tokens[pos + 1] as usize] as f64;
                (ce, kl.max(0.0), argmax(o) == self.top[i])
            })
            .collect();
        for (ce, kl, same) in rows {
            s.n += 1;
            s.ce += ce;
            s.kl += kl;
            s.top1 += same as u64;
        }
    }
}

/// Adds the predictions of positions `1..n − 1` of `logits` (`[n, vocab]`; position `p` predicts
/// `tokens[p + 1]`) to `s`, against the model's `clean` logits.
pub fn score(clean: &[f32], logits: &[f32], tokens: &[u32], vocab: usize, s: &mut Scores) {
    Reference::new(clean.to_vec(), tokens, vocab).score(logits, tokens, s);
}

/// What [`splice_eval`] measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpliceReport {
    pub contexts: u64,
    /// The model itself (its KL is 0 and its agreement 1 by definition).
    pub model: Scores,
    /// Every MLP replaced by the transcoder.
    pub spliced: Scores,
    /// Every MLP output zero.
    pub zero: Scores,
    /// Each layer replaced alone (empty unless asked for).
    pub per_layer: Vec<Scores>,
}

impl SpliceReport {
    /// `(CE_zero − CE_spliced) / (CE_zero − CE_model)`.
    pub fn loss_recovered(&self) -> f64 {
        let (m, s, z) = (
            self.model.mean_ce(),
            self.spliced.mean_ce(),
            self.zero.mean_ce(),
        );
        (z - s) / (z - m)
    }

    /// The report as JSON (means per prediction).
    pub fn to_json(&self) -> serde_json::Value {
        let scores = |s: &Scores| serde_json::json!({ "ce": s.mean_ce(), "kl": s.mean_kl(), "top1_agreement": s.top1_agreement() });
        serde_json::json!({
            "contexts": self.contexts,
            "predictions": self.model.n,
            "model": { "ce": self.model.mean_ce() },
            "spliced": scores(&self.spliced),
            "zero_ablated": scores(&self.zero),
            "loss_recovered": self.loss_recovered(),
            "per_layer": self.per_layer.iter().map(scores).collect::<Vec<_>>(),
        })
    }
}

/// The contexts of `contexts` that [`splice_eval`] scores (three tokens or more), whole, until they make
/// at least `predictions` predictions (`n − 2` for a context of `n` tokens); errors pass through.
pub fn first_predictions(
    contexts: impl Iterator<Item = Result<Vec<u32>>>,
    predictions: u64,
) -> impl Iterator<Item = Result<Vec<u32>>> {
    let mut planned = 0u64;
    contexts
        .filter(|c| c.as_ref().map_or(true, |t| t.len() >= 3))
        .take_while(move |c| {
            let go = planned < predictions;
            planned += c.as_ref().map_or(0, |t| t.len() as u64 - 2);
            go
        })
}

/// Scores the model, the transcoder spliced in, and the MLPs ablated on every context `contexts` yields
/// (token ids, each starting with the model's special token), and each layer spliced alone with
/// `per_layer`. `progress` is called after each context with the report so far.
pub fn splice_eval(
    model: &dyn Attributable,
    tc: &ReplacementTranscoder,
    contexts: impl IntoIterator<Item = Result<Vec<u32>>>,
    per_layer: bool,
    mut progress: impl FnMut(&SpliceReport),
) -> Result<SpliceReport> {
    tc.check_fits(model)?;
    let mut r = SpliceReport {
        per_layer: vec![Scores::default(); if per_layer { tc.cfg.n_layers } else { 0 }],
        ..SpliceReport::default()
    };
    for tokens in contexts {
        let tokens = tokens?;
        if tokens.len() < 3 {
            continue;
        }
        let hooks = Hooks {
            mlp_out: true,
            ..Hooks::default()
        };
        let run = model.forward_with(
            &tokens,
            &ForwardOptions {
                hooks,
                ..ForwardOptions::default()
            },
        )?;
        let (clean, d) = (run.logits, tc.cfg.d_model);
        let position0: Vec<Vec<f32>> = (run.record.layers.iter())
            .map(|l| l.mlp_out.as_ref().map_or(Vec::new(), |o| o[..d].to_vec()))
            .collect();
        let vocab = clean.len() / tokens.len();
        let reference = Reference::new(clean, &tokens, vocab);
        reference.add_model(&mut r.model);
        let p0 = Some(position0.as_slice());
        let spliced = spliced_logits_with(model, tc, &tokens, Splice::All, p0)?;
        reference.score(&spliced, &tokens, &mut r.spliced);
        let zero = spliced_logits_with(model, tc, &tokens, Splice::Zero, p0)?;
        reference.score(&zero, &tokens, &mut r.zero);
        for l in 0..r.per_layer.len() {
            let one = spliced_logits(model, tc, &tokens, Splice::Layer(l))?;
            reference.score(&one, &tokens, &mut r.per_layer[l]);
        }
        r.contexts += 1;
        progress(&r);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_of_known_distributions() {
        // Two predictions (positions 1 and 2 of four tokens), vocabulary 3.
        let tokens = [0u32, 1, 2, 0];
        let clean = [
            0.0f32, 0.0, 0.0, /**/ 0.0, 0.0, 0.0, /**/ 1.0, 0.0, 0.0, /**/ 0.0, 0.0,
            0.0,
        ];
        let other = [
            9.0f32, 9.0, 9.0, /**/ 0.0, 0.0, 0.0, /**/ 0.0, 0.0, 1.0, /**/ 5.0, 0.0,
            0.0,
        ];
        let mut s = Scores::default();
        score(&clean, &other, &tokens, 3, &mut s);
        assert_eq!(s.n, 2);
        let lse1 = (3.0f64).ln();
        let lse2 = (2.0 + 1f64.exp()).ln();
        // Position 1 predicts token 2 under uniform logits; position 2 predicts token 0 with its logit 0.
        assert!((s.ce - (lse1 + lse2)).abs() < 1e-12, "{}", s.ce);
        // Position 1: both uniform (KL 0); position 2: clean favours token 0, other token 2.
        let pc = [1f64.exp(), 1.0, 1.0].map(|v| v / (2.0 + 1f64.exp()));
        let kl: f64 = pc
            .iter()
            .zip([1.0, 0.0, 0.0])
            .zip([0.0, 0.0, 1.0])
            .map(|((p, c), o)| p * ((c - lse2) - (o - lse2)))
            .sum();
        assert!((s.kl - kl).abs() < 1e-12, "{} against {kl}", s.kl);
        // Uniform rows agree (both argmax 0); the second does not.
        assert_eq!(s.top1, 1);
        let mut same = Scores::default();
        score(&clean, &clean, &tokens, 3, &mut same);
        assert!(same.kl.abs() < 1e-12 && same.top1 == 2, "{same:?}");
        let mut model = Scores::default();
        Reference::new(clean.to_vec(), &tokens, 3).add_model(&mut model);
        assert_eq!((model.n, model.kl, model.top1), (2, 0.0, 2));
        assert!((model.ce - same.ce).abs() < 1e-12);
    }
}

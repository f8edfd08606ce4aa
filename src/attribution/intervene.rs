//! Feature interventions: run the model with chosen features set or scaled and see what it predicts.
//!
//! [`Mode`] says what runs around the edits: by default circuit-tracer's (the model's own MLPs, each edited
//! feature adding its change of activation times its decoder rows, attention patterns frozen at the clean
//! run's), or with attention recomputed, or the local replacement model (every feature recomputed from the
//! edited stream plus the clean run's error nodes), or direct effects only (everything frozen but the
//! edits: the attribution graph's linear model). Without edits every mode reproduces the clean run.
//! Position 0 keeps its clean MLP output.
//!
//! [`intervene_and_generate`] goes on to generate greedily with the edits in place, one token at a time
//! over a KV cache; positions after the prompt have no clean run, so there an edit adds its change of
//! activation times the feature's decoder rows to the model's own MLP output (see `EditedMlps`).

use std::sync::Mutex;

use super::linear::Attributable;
use super::replacement::{
    PromptState, ReplacementTranscoder, activation, add_skip, encode_layer, prompt_state,
};
use crate::model::{
    ForwardOptions, Intervention, KvCache, Logits, MlpInputs, MlpOverride, continue_greedy,
};
use crate::{Error, Result};

/// Which positions an edit applies to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Positions {
    One(usize),
    /// Every position after the first.
    All,
}

/// What an edit does to the feature's activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EditKind {
    /// Set it (0 silences it; a value at a position where it is inactive steers).
    Set(f32),
    /// Multiply it (−1 flips it).
    Scale(f32),
}

/// One edit: `kind` applied to feature `feature` of `layer` at `positions`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Edit {
    pub layer: usize,
    pub positions: Positions,
    pub feature: usize,
    pub kind: EditKind,
}

impl std::str::FromStr for Edit {
    type Err = Error;

    /// `LAYER:POS:FEATURE=VALUE` (set) or `LAYER:POS:FEATURE*=FACTOR` (scale); `POS` may be `*`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::config(
                "intervention",
                format!(
                    "`{s}`: {why} (expected LAYER:POS:FEATURE=VALUE or LAYER:POS:FEATURE*=FACTOR)"
                ),
            )
        };
        let (lhs, rhs) = s.split_once('=').ok_or_else(|| bad("no `=`"))?;
        let (lhs, scale) = match lhs.strip_suffix('*') {
            Some(l) => (l, true),
            None => (lhs, false),
        };
        let parts: Vec<&str> = lhs.split(':').collect();
        if parts.len() != 3 {
            return Err(bad("three `:`-separated fields needed"));
        }
        let num = |p: &str| p.trim().parse::<usize>().map_err(|_| bad("not a number"));
        let value: f32 = rhs.trim().parse().map_err(|_| bad("bad value"))?;
        if !value.is_finite() {
            return Err(bad("value must be finite"));
        }
        Ok(Edit {
            layer: num(parts[0])?,
            positions: if parts[1].trim() == "*" {
                Positions::All
            } else {
                Positions::One(num(parts[1])?)
            },
            feature: num(parts[2])?,
            kind: if scale {
                EditKind::Scale(value)
            } else {
                EditKind::Set(value)
            },
        })
    }
}

/// How the model runs around the edits: circuit-tracer's `feature_intervention` options, and the local
/// replacement model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The model's own MLPs on the edited stream, each edited feature adding its change of activation
    /// times its decoder rows; attention patterns frozen at the clean run's (circuit-tracer's default,
    /// `freeze_attention=True`).
    #[default]
    FrozenAttention,
    /// The same with attention recomputed (`freeze_attention=False`).
    Live,
    /// The local replacement model: every feature recomputed from the edited stream, its reconstruction
    /// plus the clean run's error nodes as the MLP outputs, attention recomputed.
    Replacement,
    /// Direct effects only (circuit-tracer's `constrained_layers` over every layer): attention patterns,
    /// norm scales and MLP outputs frozen at the clean run's, plus each edited feature's change from its
    /// clean activation times its decoder rows (and, for a skip transcoder, the skip path of the input's
    /// change): the linear model the attribution graph describes, so doubling a feature moves each logit
    /// by its edge.
    Direct,
}

/// The MLPs with edits, called layer by layer by the forward.
///
/// At the prompt's positions (`< clean.n`) each [`Mode`] has its rule. Positions after the prompt
/// (generation) have no clean run: there, whatever the mode, the MLP output is the model's own MLP on the
/// edited stream plus, for each edited feature, `(edited − unedited activation) × its decoder rows`, as
/// circuit-tracer's `feature_intervention_generate` does. Without edits every rule gives the model's own
/// forward. Position 0 has no features and keeps the model's MLP output.
#[derive(Debug)]
struct EditedMlps<'a> {
    tc: &'a ReplacementTranscoder,
    clean: &'a PromptState,
    edits: &'a [Edit],
    mode: Mode,
    /// This forward's layers so far: per layer, the (row, feature, value) triples its decoders add
    /// (activations under [`Mode::Replacement`], changes of activation otherwise).
    acts: Mutex<Vec<LayerActs>>,
}

/// (row of the forward, feature, value) triples of one layer.
type LayerActs = Vec<(usize, usize, f32)>;

impl EditedMlps<'_> {
    /// `a`, feature `f` of layer `k`'s activation at position `p`, after the edits that hit it.
    fn edited(&self, k: usize, p: usize, f: usize, mut a: f32) -> f32 {
        for e in self.edits.iter().filter(|e| e.layer == k && e.feature == f) {
            let hit = match e.positions {
                Positions::All => true,
                Positions::One(q) => q == p,
            };
            if hit {
                a = match e.kind {
                    EditKind::Set(v) => v,
                    EditKind::Scale(s) => a * s,
                };
            }
        }
        a
    }

    /// The (row, feature, change) triples of layer `k`'s edited features at the given rows, each row's
    /// activation computed from its transcoder input `x` (`[d]`); position 0 has no features.
    fn changes<'x>(
        &self,
        k: usize,
        rows: impl Iterator<Item = (usize, usize, &'x [f32])>,
    ) -> LayerActs {
        let tc = self.tc;
        let d = tc.cfg.d_model;
        let mut features: Vec<usize> = self
            .edits
            .iter()
            .filter(|e| e.layer == k)
            .map(|e| e.feature)
            .collect();
        features.sort_unstable();
        features.dedup();
        let pre = |x: &[f32], f: usize| {
            let w = &tc.params.w_enc[k][f * d..(f + 1) * d];
            x.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + tc.params.b_enc[k][f]
        };
        let mut out = Vec::new();
        let mut active: Vec<(u32, f32)> = Vec::new();
        for (r, p, x) in rows.filter(|&(_, p, _)| p > 0) {
            // A TopK feature's activation depends on the whole row: the encoder's own selection.
            if tc.topk.is_some() && !features.is_empty() {
                active = encode_layer(tc, k, x, 1, p).pop().unwrap_or_default();
            }
            for &f in &features {
                let a = match tc.topk {
                    None => activation(pre(x, f), tc.thresholds[k][f]),
                    Some(_) => (active.binary_search_by_key(&(f as u32), |e| e.0))
                        .map_or(0.0, |i| active[i].1),
                };
                let change = self.edited(k, p, f, a) - a;
                if change != 0.0 {
                    out.push((r, f, change));
                }
            }
        }
        out
    }

    /// Layer `k`'s prompt rows under [`Mode::Replacement`]: every feature's activation from the current
    /// stream `x`, edited, as (row, feature, activation).
    fn replacement_acts(&self, k: usize, p0: usize, prompt: usize, x: &[f32]) -> LayerActs {
        let tc = self.tc;
        let (d, f_n) = (tc.cfg.d_model, tc.cfg.n_features);
        let mut pre = vec![0.0f32; prompt * f_n];
        crate::model::forward::matmul_wt(x, prompt, d, &tc.params.w_enc[k], f_n, &mut pre);
        let mut acts = Vec::new();
        for r in (0..prompt).filter(|&r| p0 + r > 0) {
            let h = &mut pre[r * f_n..(r + 1) * f_n];
            h.iter_mut()
                .zip(&tc.params.b_enc[k])
                .for_each(|(v, b)| *v += b);
            tc.activate(k, h);
            for (f, &a) in h.iter().enumerate() {
                let a = self.edited(k, p0 + r, f, a);
                if a != 0.0 {
                    acts.push((r, f, a));
                }
            }
        }
        acts
    }
}

impl MlpOverride for EditedMlps<'_> {
    fn mlp_out(&self, k: usize, inputs: &MlpInputs<'_>) -> Vec<f32> {
        let (tc, clean) = (self.tc, self.clean);
        let d = tc.cfg.d_model;
        let (p0, rows) = (inputs.first_position, inputs.normed.len() / d);
        // Rows 0..prompt are the prompt's positions, the rest come after it.
        let prompt = clean.n.saturating_sub(p0).min(rows);
        let x = tc.input_hook.of(inputs);
        let current = |r: usize| (r, p0 + r, &x[r * d..(r + 1) * d]);
        let clean_row = |r: usize| {
            let p = p0 + r;
            (r, p, &clean.inputs[k][p * d..(p + 1) * d])
        };
        // What this layer's decoders add: per mode on the prompt rows, changes on the later ones.
        let mut layer = match self.mode {
            Mode::Replacement => self.replacement_acts(k, p0, prompt, x),
            Mode::Direct => self.changes(k, (0..prompt).map(clean_row)),
            Mode::FrozenAttention | Mode::Live => self.changes(k, (0..prompt).map(current)),
        };
        layer.extend(self.changes(k, (prompt..rows).map(current)));
        let mut acts = self.acts.lock().unwrap_or_else(|e| e.into_inner());
        if k == 0 {
            acts.clear();
        }
        acts.push(layer);

        // The base each row's decoded values are added to.
        let mut out = vec![0.0f32; rows * d];
        let model_mlp = inputs.model_mlp;
        for r in 0..rows {
            let (p, o) = (p0 + r, &mut out[r * d..(r + 1) * d]);
            let uses_model = r >= prompt || matches!(self.mode, Mode::FrozenAttention | Mode::Live);
            if uses_model {
                let m = model_mlp.expect("wants_model_mlp asked for these rows");
                o.copy_from_slice(&m[r * d..(r + 1) * d]);
            } else if p == 0 || self.mode == Mode::Direct {
                o.copy_from_slice(&clean.mlp_out[k][p * d..(p + 1) * d]);
            } else {
                // Replacement: the decoder bias and the clean error; the features are added below.
                o.iter_mut()
                    .zip(&tc.params.b_dec[k])
                    .zip(&clean.errors[k][p * d..(p + 1) * d])
                    .for_each(|((o, b), e)| *o = b + e);
            }
        }
        for (l, la) in acts.iter().enumerate() {
            for &(r, f, a) in la {
                if let Some(row) = tc.dec_row(l, f, k) {
                    out[r * d..(r + 1) * d]
                        .iter_mut()
                        .zip(row)
                        .for_each(|(o, w)| *o += a * w);
                }
            }
        }
        if tc.cfg.skip {
            for r in (0..prompt).filter(|&r| p0 + r > 0) {
                let o = &mut out[r * d..(r + 1) * d];
                match self.mode {
                    Mode::Replacement => add_skip(tc, k, &x[r * d..(r + 1) * d], o),
                    // The skip path of the input's change from the clean run.
                    Mode::Direct => {
                        let (_, _, c) = clean_row(r);
                        let dx: Vec<f32> = x[r * d..(r + 1) * d]
                            .iter()
                            .zip(c)
                            .map(|(a, b)| a - b)
                            .collect();
                        add_skip(tc, k, &dx, o);
                    }
                    // The model's MLP already responds to the input.
                    Mode::FrozenAttention | Mode::Live => {}
                }
            }
        }
        out
    }

    fn wants_model_mlp(&self, first_position: usize, n: usize) -> bool {
        match self.mode {
            Mode::FrozenAttention | Mode::Live => true,
            Mode::Replacement | Mode::Direct => first_position + n > self.clean.n,
        }
    }
}

/// The outcome of an intervention: last-position logits before and after, and the greedy continuations
/// when asked for.
#[derive(Clone, Debug)]
pub struct InterventionResult {
    pub clean_logits: Vec<f32>,
    pub logits: Vec<f32>,
    /// The model's own greedy continuation of the prompt (empty unless generation was asked for).
    pub clean_continuation: Vec<u32>,
    /// The greedy continuation with the edits in place (those at every position, `*`, hold for the new
    /// tokens too).
    pub continuation: Vec<u32>,
    /// The logits each token of `continuation` was chosen from, `[continuation.len(), vocab]` (the first
    /// row is `logits`).
    pub step_logits: Vec<f32>,
}

/// Runs the model over `tokens` with `edits` as `mode` says.
pub fn intervene(
    model: &dyn Attributable,
    tc: &ReplacementTranscoder,
    tokens: &[u32],
    edits: &[Edit],
    mode: Mode,
) -> Result<InterventionResult> {
    intervene_and_generate(model, tc, tokens, edits, mode, 0, None)
}

/// [`intervene`], then `n_new` greedily chosen tokens (stopping early at `stop` or the model's longest
/// sequence) without and with the edits, each through a [`KvCache`]: one forward over the prompt (with the
/// clean run's patterns or state frozen as `mode` says), then one position per token (nothing frozen:
/// the new positions have no clean run).
pub fn intervene_and_generate(
    model: &dyn Attributable,
    tc: &ReplacementTranscoder,
    tokens: &[u32],
    edits: &[Edit],
    mode: Mode,
    n_new: usize,
    stop: Option<u32>,
) -> Result<InterventionResult> {
    for e in edits {
        if e.layer >= tc.cfg.n_layers || e.feature >= tc.cfg.n_features {
            return Err(Error::config(
                "intervention",
                format!(
                    "layer {} feature {} is outside the transcoder ({} layers × {} features)",
                    e.layer, e.feature, tc.cfg.n_layers, tc.cfg.n_features
                ),
            ));
        }
        if let Positions::One(p) = e.positions
            && (p == 0 || p >= tokens.len())
        {
            return Err(Error::config(
                "intervention",
                format!(
                    "position {p} is not in 1..{} (position 0 has no features)",
                    tokens.len()
                ),
            ));
        }
    }
    super::graph::check_recorded_fits(model, tokens.len(), None)?;
    let clean = prompt_state(model, tc, tokens)?;
    let mlps = EditedMlps {
        tc,
        clean: &clean,
        edits,
        mode,
        acts: Mutex::new(Vec::new()),
    };
    let steps = ForwardOptions {
        logits: Logits::Last,
        intervention: Intervention {
            mlp_fn: Some(&mlps),
            ..Intervention::default()
        },
        ..ForwardOptions::default()
    };
    let prompt = ForwardOptions {
        intervention: Intervention {
            frozen: matches!(mode, Mode::FrozenAttention | Mode::Direct).then_some(&clean.record),
            patterns_only: mode == Mode::FrozenAttention,
            ..steps.intervention
        },
        ..steps
    };
    let mut cache = KvCache::new();
    let logits = model.forward_cached(tokens, &mut cache, &prompt)?.logits;
    let clean_continuation = model.generate_greedy(tokens, n_new, stop)?;
    let c = continue_greedy(model, &mut cache, logits.clone(), n_new, stop, &steps)?;
    Ok(InterventionResult {
        clean_logits: clean.logits.clone(),
        logits,
        clean_continuation,
        continuation: c.tokens,
        step_logits: c.logits,
    })
}

//! Feature interventions: run the replacement model with chosen features set or scaled and see what the
//! model predicts.
//!
//! The replacement model here is the model with every MLP replaced by the transcoder's output plus the error
//! of the clean run (so that without edits it reproduces the clean run exactly). Attention and norms run
//! normally, and features of later layers are recomputed from the edited stream, so an edit's effect
//! propagates through the features it excites or silences. Position 0 keeps its clean MLP output.
//!
//! [`intervene_and_generate`] goes on to generate greedily with the edits in place, one token at a time
//! over a KV cache; positions after the prompt have no clean run, so there an edit adds its change of
//! activation times the feature's decoder rows to the model's own MLP output (see `EditedMlps`).

use std::sync::Mutex;

use super::linear::Attributable;
use super::replacement::{PromptState, ReplacementTranscoder, activation, add_skip, prompt_state};
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

/// The replacement MLPs with edits, called layer by layer by the forward.
///
/// At the prompt's positions (`< clean.n`) every feature is recomputed from the edited stream and the
/// MLP output is the transcoder's reconstruction plus the clean run's error. Positions after the prompt
/// (generation) have no clean run: there the MLP output is the model's own MLP on the edited stream plus,
/// for each edited feature, `(edited − unedited activation) × its decoder rows`, i.e. the reconstruction
/// of the edited features plus that position's own error (as circuit-tracer's
/// `feature_intervention_generate` does). Without edits both give the model's own forward.
#[derive(Debug)]
struct EditedMlps<'a> {
    tc: &'a ReplacementTranscoder,
    clean: &'a PromptState,
    edits: &'a [Edit],
    /// This forward's layers so far: per layer, the (row, feature, activation) list of its prompt rows
    /// and the (row, feature, activation change) list of its later rows.
    acts: Mutex<Vec<(LayerActs, LayerActs)>>,
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
}

impl MlpOverride for EditedMlps<'_> {
    fn mlp_out(&self, k: usize, inputs: &MlpInputs<'_>) -> Vec<f32> {
        let tc = self.tc;
        let (d, f_n) = (tc.cfg.d_model, tc.cfg.n_features);
        let (p0, rows) = (inputs.first_position, inputs.normed.len() / d);
        // Rows 0..prompt are the prompt's positions, the rest come after it.
        let prompt = self.clean.n.saturating_sub(p0).min(rows);
        let x = tc.input_hook.of(inputs);
        // The prompt rows' features from the current stream, then the edits.
        let mut pre = vec![0.0f32; prompt * f_n];
        crate::model::forward::matmul_wt(x, prompt, d, &tc.params.w_enc[k], f_n, &mut pre);
        let mut layer_acts = Vec::new();
        for r in (0..prompt).filter(|&r| p0 + r > 0) {
            for f in 0..f_n {
                let h = pre[r * f_n + f] + tc.params.b_enc[k][f];
                let a = self.edited(k, p0 + r, f, activation(h, tc.thresholds[k][f]));
                if a != 0.0 {
                    layer_acts.push((r, f, a));
                }
            }
        }
        // The later rows: only the edited features, as changes of their activation.
        let mut edited_features: Vec<usize> = self
            .edits
            .iter()
            .filter(|e| e.layer == k)
            .map(|e| e.feature)
            .collect();
        edited_features.sort_unstable();
        edited_features.dedup();
        let mut layer_changes = Vec::new();
        for r in prompt..rows {
            let xr = &x[r * d..(r + 1) * d];
            for &f in &edited_features {
                let w = &tc.params.w_enc[k][f * d..(f + 1) * d];
                let h = xr.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + tc.params.b_enc[k][f];
                let a = activation(h, tc.thresholds[k][f]);
                let change = self.edited(k, p0 + r, f, a) - a;
                if change != 0.0 {
                    layer_changes.push((r, f, change));
                }
            }
        }
        let mut acts = self.acts.lock().unwrap_or_else(|e| e.into_inner());
        if k == 0 {
            acts.clear();
        }
        acts.push((layer_acts, layer_changes));
        let mut out = vec![0.0f32; rows * d];
        for r in 0..prompt {
            let (p, o) = (p0 + r, &mut out[r * d..(r + 1) * d]);
            if p == 0 {
                o.copy_from_slice(&self.clean.mlp_out[k][..d]);
                continue;
            }
            o.iter_mut()
                .zip(&tc.params.b_dec[k])
                .zip(&self.clean.errors[k][p * d..(p + 1) * d])
                .for_each(|((o, b), e)| *o = b + e);
        }
        if rows > prompt {
            let model_mlp = inputs
                .model_mlp
                .expect("wants_model_mlp asked for the rows after the prompt");
            out[prompt * d..].copy_from_slice(&model_mlp[prompt * d..rows * d]);
        }
        for (l, (la, lc)) in acts.iter().enumerate() {
            for &(r, f, a) in la.iter().chain(lc) {
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
                add_skip(tc, k, &x[r * d..(r + 1) * d], &mut out[r * d..(r + 1) * d]);
            }
        }
        out
    }

    fn wants_model_mlp(&self, first_position: usize, n: usize) -> bool {
        first_position + n > self.clean.n
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

/// Runs the replacement model over `tokens` with `edits`.
pub fn intervene(
    model: &dyn Attributable,
    tc: &ReplacementTranscoder,
    tokens: &[u32],
    edits: &[Edit],
) -> Result<InterventionResult> {
    intervene_and_generate(model, tc, tokens, edits, 0, None)
}

/// [`intervene`], then `n_new` greedily chosen tokens (stopping early at `stop` or the model's longest
/// sequence) without and with the edits, each through a [`KvCache`]: one forward over the prompt, then
/// one position per token.
pub fn intervene_and_generate(
    model: &dyn Attributable,
    tc: &ReplacementTranscoder,
    tokens: &[u32],
    edits: &[Edit],
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
    let clean = prompt_state(model, tc, tokens)?;
    let mlps = EditedMlps {
        tc,
        clean: &clean,
        edits,
        acts: Mutex::new(Vec::new()),
    };
    let opts = ForwardOptions {
        logits: Logits::Last,
        intervention: Intervention {
            mlp_fn: Some(&mlps),
            ..Intervention::default()
        },
        ..ForwardOptions::default()
    };
    let mut cache = KvCache::new();
    let logits = model.forward_cached(tokens, &mut cache, &opts)?.logits;
    let clean_continuation = model.generate_greedy(tokens, n_new, stop)?;
    let c = continue_greedy(model, &mut cache, logits.clone(), n_new, stop, &opts)?;
    Ok(InterventionResult {
        clean_logits: clean.logits.clone(),
        logits,
        clean_continuation,
        continuation: c.tokens,
        step_logits: c.logits,
    })
}

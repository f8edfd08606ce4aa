//! Feature interventions: run the replacement model with chosen features set or scaled and see what the
//! model predicts.
//!
//! The replacement model here is the model with every MLP replaced by the transcoder's output plus the error
//! of the clean run (so that without edits it reproduces the clean run exactly). Attention and norms run
//! normally, and features of later layers are recomputed from the edited stream, so an edit's effect
//! propagates through the features it excites or silences. Position 0 keeps its clean MLP output.

use std::sync::Mutex;

use super::linear::Attributable;
use super::replacement::{PromptState, ReplacementTranscoder, activation, add_skip, prompt_state};
use crate::model::{ForwardOptions, Intervention, Logits, MlpInputs, MlpOverride};
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
#[derive(Debug)]
struct EditedMlps<'a> {
    tc: &'a ReplacementTranscoder,
    clean: &'a PromptState,
    edits: &'a [Edit],
    /// Per layer, the (position, feature, activation) list computed so far.
    acts: Mutex<Vec<Vec<(usize, usize, f32)>>>,
}

impl MlpOverride for EditedMlps<'_> {
    fn mlp_out(&self, k: usize, inputs: &MlpInputs<'_>) -> Vec<f32> {
        let tc = self.tc;
        let (d, f_n, n) = (tc.cfg.d_model, tc.cfg.n_features, self.clean.n);
        let x = tc.input_hook.of(inputs);
        // This layer's features from the current stream, then the edits.
        let mut pre = vec![0.0f32; n * f_n];
        crate::model::forward::matmul_wt(x, n, d, &tc.params.w_enc[k], f_n, &mut pre);
        let mut layer_acts = Vec::new();
        for p in 1..n {
            for f in 0..f_n {
                let h = pre[p * f_n + f] + tc.params.b_enc[k][f];
                let mut a = activation(h, tc.thresholds[k][f]);
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
                if a != 0.0 {
                    layer_acts.push((p, f, a));
                }
            }
        }
        let mut acts = self.acts.lock().unwrap_or_else(|e| e.into_inner());
        acts.push(layer_acts);
        let mut out = vec![0.0f32; n * d];
        out[..d].copy_from_slice(&self.clean.mlp_out[k][..d]);
        for p in 1..n {
            let o = &mut out[p * d..(p + 1) * d];
            o.iter_mut()
                .zip(&tc.params.b_dec[k])
                .zip(&self.clean.errors[k][p * d..(p + 1) * d])
                .for_each(|((o, b), e)| *o = b + e);
        }
        for (l, la) in acts.iter().enumerate() {
            for &(p, f, a) in la {
                if let Some(row) = tc.dec_row(l, f, k) {
                    out[p * d..(p + 1) * d]
                        .iter_mut()
                        .zip(row)
                        .for_each(|(o, w)| *o += a * w);
                }
            }
        }
        if tc.cfg.skip {
            for p in 1..n {
                add_skip(tc, k, &x[p * d..(p + 1) * d], &mut out[p * d..(p + 1) * d]);
            }
        }
        out
    }
}

/// The outcome of an intervention: last-position logits before and after.
#[derive(Clone, Debug)]
pub struct InterventionResult {
    pub clean_logits: Vec<f32>,
    pub logits: Vec<f32>,
}

/// Runs the replacement model over `tokens` with `edits`.
pub fn intervene(
    model: &dyn Attributable,
    tc: &ReplacementTranscoder,
    tokens: &[u32],
    edits: &[Edit],
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
    let out = model.forward_with(
        tokens,
        &ForwardOptions {
            logits: Logits::Last,
            intervention: Intervention {
                mlp_fn: Some(&mlps),
                ..Intervention::default()
            },
            ..ForwardOptions::default()
        },
    )?;
    Ok(InterventionResult {
        clean_logits: clean.logits.clone(),
        logits: out.logits,
    })
}

//! GPT-2, run on the CPU over a whole prompt at once, with the same hooks and interventions as
//! [`LlamaModel`](super::LlamaModel).
//!
//! Token plus learned position embeddings, pre-LayerNorm blocks (`ln_1`, fused-QKV multi-head causal attention
//! with biases, `ln_2`, an MLP with the tanh-approximated GELU, `gelu_new`), a final `ln_f` and an unembedding
//! tied to the token embedding (or a separate `lm_head` when the checkpoint has one).
//!
//! Layouts are those of [`forward`](super::forward): activations `[n_tokens, width]` row-major, weight matrices
//! `(out, in)` row-major. Hugging Face stores GPT-2's `Conv1D` weights as `(in, out)`; the loader transposes
//! them.
//!
//! Hooks map onto GPT-2 as follows: `resid_pre` enters the block, `resid_mid` = `resid_pre` + attention
//! output, `mlp_in_normed` = `ln_2(resid_mid)` (the MLP input, affine weight and bias applied), `mlp_out` the
//! MLP output (after `c_proj` and its bias). The norm scales are the LayerNorm denominators `1/sqrt(var + eps)`
//! per position of `ln_1` (`attn_norm_scale`), `ln_2` (`mlp_norm_scale`) and `ln_f` (`final_norm_scale`).
//!
//! **Freezing a LayerNorm** (an [`Intervention`] with `frozen`) replaces only that denominator by the recorded
//! value, as circuit-tracer does; the mean is still subtracted from the current input (centring is linear),
//! so every frozen LayerNorm is an affine map of its input and the frozen model is affine in the residual
//! stream between MLPs. Attention patterns are frozen as in the Llama forward.
//!
//! [`Intervention`]: super::Intervention

use std::path::Path;

use super::forward::{
    AttnScores, Blocks, Dims, ForwardOptions, ForwardOutput, Norm, NormKind, attend_over,
    check_length, matmul_wt, run_blocks, run_blocks_cached,
};
use super::kv::{KvCache, LayerKv};
use super::pattern::AttnPattern;
use crate::{Error, Result};

/// The hyper-parameters of a GPT-2 model.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Gpt2Config {
    /// Residual stream width (`n_embd`).
    pub d_model: usize,
    /// Width of the MLP hidden layer (`n_inner`, default `4 * n_embd`).
    pub d_mlp: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub vocab_size: usize,
    /// Number of learned positions (`n_positions`): longer prompts are refused.
    pub max_seq_len: usize,
    /// LayerNorm epsilon (`layer_norm_epsilon`, default 1e-5).
    pub norm_eps: f32,
}

impl Gpt2Config {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Checks the sizes are positive and consistent; `path` names the file they came from.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        for (name, v) in [
            ("d_model", self.d_model),
            ("d_mlp", self.d_mlp),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("vocab_size", self.vocab_size),
            ("max_seq_len", self.max_seq_len),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} is zero")));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(bad(format!(
                "d_model {} is not a multiple of n_heads {}",
                self.d_model, self.n_heads
            )));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return Err(bad(format!("norm_eps {} is invalid", self.norm_eps)));
        }
        Ok(())
    }

    /// Multiply-adds of one forward over `n` tokens, times two (FLOPs), as
    /// [`LlamaConfig::forward_flops`](super::LlamaConfig::forward_flops) counts them.
    pub fn forward_flops(&self, n: usize, n_logits: usize) -> f64 {
        let (d, h) = (self.d_model as f64, self.d_mlp as f64);
        let n_f = n as f64;
        let per_token = 4.0 * d * d + 2.0 * d * h;
        let attn = (n_f * (n_f + 1.0) / 2.0) * d * 2.0;
        2.0 * (self.n_layers as f64 * (per_token * n_f + attn)
            + n_logits as f64 * d * self.vocab_size as f64)
    }
}

/// The weights of one GPT-2 block, matrices `(out, in)` row-major.
#[derive(Clone, Debug, Default)]
pub struct Gpt2LayerWeights {
    /// `ln_1` weight and bias, `[d_model]` each.
    pub ln_1_w: Vec<f32>,
    pub ln_1_b: Vec<f32>,
    /// Fused query, key and value projection `[3 * d_model, d_model]` (rows: all of Q, then K, then V).
    pub w_qkv: Vec<f32>,
    /// `[3 * d_model]`.
    pub b_qkv: Vec<f32>,
    /// Attention output projection `[d_model, d_model]`.
    pub w_o: Vec<f32>,
    pub b_o: Vec<f32>,
    /// `ln_2` weight and bias, `[d_model]` each.
    pub ln_2_w: Vec<f32>,
    pub ln_2_b: Vec<f32>,
    /// `mlp.c_fc`, `[d_mlp, d_model]`.
    pub w_fc: Vec<f32>,
    /// `[d_mlp]`.
    pub b_fc: Vec<f32>,
    /// `mlp.c_proj`, `[d_model, d_mlp]`.
    pub w_proj: Vec<f32>,
    /// `[d_model]`.
    pub b_proj: Vec<f32>,
}

/// A GPT-2 model held in f32.
#[derive(Clone, Debug)]
pub struct Gpt2Model {
    pub config: Gpt2Config,
    /// Token embedding `[vocab_size, d_model]`.
    pub wte: Vec<f32>,
    /// Position embedding `[max_seq_len, d_model]`.
    pub wpe: Vec<f32>,
    pub layers: Vec<Gpt2LayerWeights>,
    /// `ln_f` weight and bias, `[d_model]` each.
    pub ln_f_w: Vec<f32>,
    pub ln_f_b: Vec<f32>,
    /// Separate unembedding `[vocab_size, d_model]`; `None` when it is tied to `wte` (GPT-2's default).
    pub output: Option<Vec<f32>>,
}

/// LayerNorm of each row of `x` (`[rows, d]`) into `out` with weight `w` and bias `b`; returns the
/// denominators `1/sqrt(var + eps)` per row. With `frozen` those are used instead (the mean is still the
/// current row's).
fn layer_norm(
    x: &[f32],
    d: usize,
    w: &[f32],
    b: &[f32],
    eps: f32,
    frozen: Option<&[f32]>,
    out: &mut [f32],
) -> Vec<f32> {
    let rows = x.len() / d;
    let mut scales = Vec::with_capacity(rows);
    for r in 0..rows {
        let row = &x[r * d..(r + 1) * d];
        let mean = row.iter().sum::<f32>() / d as f32;
        let s = match frozen {
            Some(f) => f[r],
            None => {
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
                1.0 / (var + eps).sqrt()
            }
        };
        scales.push(s);
        for (((o, &v), &g), &bi) in out[r * d..(r + 1) * d].iter_mut().zip(row).zip(w).zip(b) {
            *o = (v - mean) * s * g + bi;
        }
    }
    scales
}

/// GELU, tanh approximation (`gelu_new` in `transformers`).
pub fn gelu_new(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

/// Adds `bias` (`[width]`) to every row of `x` (`[rows, width]`).
fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

impl Gpt2Model {
    /// Checks every tensor has the size the config implies; `path` names the file for the error.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let c = &self.config;
        c.validate(path)?;
        let check = |name: String, got: usize, shape: &[usize]| -> Result<()> {
            let want: usize = shape.iter().product();
            if got != want {
                return Err(Error::Tensor {
                    path: path.to_path_buf(),
                    tensor: name,
                    reason: format!("has {got} elements, expected shape {shape:?} ({want})"),
                });
            }
            Ok(())
        };
        let (d, h, v) = (c.d_model, c.d_mlp, c.vocab_size);
        check("wte".into(), self.wte.len(), &[v, d])?;
        check("wpe".into(), self.wpe.len(), &[c.max_seq_len, d])?;
        check("ln_f.weight".into(), self.ln_f_w.len(), &[d])?;
        check("ln_f.bias".into(), self.ln_f_b.len(), &[d])?;
        if let Some(o) = &self.output {
            check("lm_head".into(), o.len(), &[v, d])?;
        }
        if self.layers.len() != c.n_layers {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("{} layers for n_layers = {}", self.layers.len(), c.n_layers),
            });
        }
        for (l, w) in self.layers.iter().enumerate() {
            for (name, t, shape) in [
                ("ln_1.weight", &w.ln_1_w, vec![d]),
                ("ln_1.bias", &w.ln_1_b, vec![d]),
                ("attn.c_attn.weight", &w.w_qkv, vec![3 * d, d]),
                ("attn.c_attn.bias", &w.b_qkv, vec![3 * d]),
                ("attn.c_proj.weight", &w.w_o, vec![d, d]),
                ("attn.c_proj.bias", &w.b_o, vec![d]),
                ("ln_2.weight", &w.ln_2_w, vec![d]),
                ("ln_2.bias", &w.ln_2_b, vec![d]),
                ("mlp.c_fc.weight", &w.w_fc, vec![h, d]),
                ("mlp.c_fc.bias", &w.b_fc, vec![h]),
                ("mlp.c_proj.weight", &w.w_proj, vec![d, h]),
                ("mlp.c_proj.bias", &w.b_proj, vec![d]),
            ] {
                check(format!("h.{l}.{name}"), t.len(), &shape)?;
            }
        }
        Ok(())
    }

    /// The unembedding matrix `[vocab_size, d_model]` (`wte` when tied).
    pub fn unembedding(&self) -> &[f32] {
        self.output.as_deref().unwrap_or(&self.wte)
    }

    /// Token plus position embeddings of `tokens`, `[n_tokens, d_model]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.embed_at(tokens, 0)
    }

    /// Token plus position embeddings of `tokens` at the positions `first..`, `[n_tokens, d_model]`.
    pub fn embed_at(&self, tokens: &[u32], first: usize) -> Result<Vec<f32>> {
        let c = &self.config;
        let d = c.d_model;
        if first + tokens.len() > c.max_seq_len {
            return Err(Error::Unsupported(format!(
                "a sequence of {} tokens exceeds the model's max_seq_len {}",
                first + tokens.len(),
                c.max_seq_len
            )));
        }
        let mut x = Vec::with_capacity(tokens.len() * d);
        for (pos, &t) in (first..).zip(tokens) {
            if t as usize >= c.vocab_size {
                return Err(Error::TokenOutOfRange {
                    id: t,
                    vocab_size: c.vocab_size,
                });
            }
            let te = &self.wte[t as usize * d..(t as usize + 1) * d];
            let pe = &self.wpe[pos * d..(pos + 1) * d];
            x.extend(te.iter().zip(pe).map(|(a, b)| a + b));
        }
        Ok(x)
    }

    /// The full causal forward over `tokens`, with hooks and interventions.
    pub fn forward_with(&self, tokens: &[u32], opts: &ForwardOptions<'_>) -> Result<ForwardOutput> {
        check_length(tokens.len(), 0, self.config.max_seq_len)?;
        let x = self.embed(tokens)?;
        self.forward_embedded(x, opts)
    }

    /// The forward of `tokens` at the positions after those `cache` holds, appending their keys and
    /// values ([`KvCache`]); hooks and interventions as in [`forward_with`](Self::forward_with).
    pub fn forward_cached(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        check_length(tokens.len(), cache.len(), self.config.max_seq_len)?;
        let x = self.embed_at(tokens, cache.len())?;
        run_blocks_cached(self, x, opts, cache)
    }

    /// The forward from given input embeddings `[n_tokens, d_model]` (e.g. [`Gpt2Model::embed`]'s, which
    /// include the position embeddings).
    pub fn forward_embedded(
        &self,
        x: Vec<f32>,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        run_blocks(self, x, opts)
    }
}

/// The GPT-2 block: LayerNorm, fused-QKV multi-head attention with biases, a GELU MLP.
impl Blocks for Gpt2Model {
    type Scratch = Gpt2Scratch;

    fn dims(&self) -> Dims {
        let c = &self.config;
        Dims {
            n_layers: c.n_layers,
            d_model: c.d_model,
            n_heads: c.n_heads,
            vocab_size: c.vocab_size,
            post_norms: false,
            norm: NormKind::Layer,
        }
    }

    fn kv_width(&self) -> usize {
        self.config.d_model
    }

    fn scratch(&self, n: usize, _first: usize) -> Gpt2Scratch {
        let c = &self.config;
        let d = c.d_model;
        Gpt2Scratch {
            q: vec![0.0; n * d],
            k: vec![0.0; n * d],
            v: vec![0.0; n * d],
            attn: vec![0.0; n * d],
            hidden: vec![0.0; n * c.d_mlp],
        }
    }

    fn norm(&self, which: Norm, x: &[f32], frozen: Option<&[f32]>, out: &mut [f32]) -> Vec<f32> {
        let (w, b) = match which {
            Norm::Attn(l) => (&self.layers[l].ln_1_w, &self.layers[l].ln_1_b),
            Norm::Mlp(l) => (&self.layers[l].ln_2_w, &self.layers[l].ln_2_b),
            Norm::Final => (&self.ln_f_w, &self.ln_f_b),
            Norm::PostAttn(_) | Norm::PostMlp(_) => unreachable!("GPT-2 has no post-norms"),
        };
        let c = &self.config;
        layer_norm(x, c.d_model, w, b, c.norm_eps, frozen, out)
    }

    fn attention(
        &self,
        l: usize,
        normed: &[f32],
        n: usize,
        frozen: Option<&AttnPattern>,
        record: bool,
        kv: Option<&mut LayerKv>,
        s: &mut Gpt2Scratch,
        out: &mut [f32],
    ) -> Option<AttnPattern> {
        let (c, w) = (&self.config, &self.layers[l]);
        let d = c.d_model;
        for (i, buf) in [&mut s.q, &mut s.k, &mut s.v].into_iter().enumerate() {
            matmul_wt(normed, n, d, &w.w_qkv[i * d * d..(i + 1) * d * d], d, buf);
            add_bias(buf, &w.b_qkv[i * d..(i + 1) * d]);
        }
        let pattern = attend_over(
            n,
            (c.n_heads, c.n_heads, c.head_dim()),
            AttnScores::plain(c.head_dim()),
            (&s.q, &s.k, &s.v),
            frozen,
            record,
            kv,
            &mut s.attn,
        );
        matmul_wt(&s.attn, n, d, &w.w_o, d, out);
        add_bias(out, &w.b_o);
        pattern
    }

    fn mlp(&self, l: usize, normed: &[f32], n: usize, s: &mut Gpt2Scratch, out: &mut [f32]) {
        let (c, w) = (&self.config, &self.layers[l]);
        let d = c.d_model;
        matmul_wt(normed, n, d, &w.w_fc, c.d_mlp, &mut s.hidden);
        add_bias(&mut s.hidden, &w.b_fc);
        for h in s.hidden.iter_mut() {
            *h = gelu_new(*h);
        }
        matmul_wt(&s.hidden, n, c.d_mlp, &w.w_proj, d, out);
        add_bias(out, &w.b_proj);
    }

    fn unembedding(&self) -> &[f32] {
        Gpt2Model::unembedding(self)
    }
}

/// [`Gpt2Model`]'s buffers for a forward over some number of tokens: Q, K, V, the heads' outputs and
/// the MLP's hidden layer.
pub(crate) struct Gpt2Scratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    hidden: Vec<f32>,
}

impl super::CausalLm for Gpt2Model {
    fn max_seq_len(&self) -> usize {
        self.config.max_seq_len
    }

    fn forward_with(&self, tokens: &[u32], opts: &ForwardOptions<'_>) -> Result<ForwardOutput> {
        Gpt2Model::forward_with(self, tokens, opts)
    }

    fn forward_cached(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        Gpt2Model::forward_cached(self, tokens, cache, opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CausalLm, Hooks, Intervention};

    fn tiny() -> Gpt2Model {
        let c = Gpt2Config {
            d_model: 16,
            d_mlp: 64,
            n_layers: 2,
            n_heads: 4,
            vocab_size: 13,
            max_seq_len: 8,
            norm_eps: 1e-5,
        };
        let mut seed = 0x2545f4914f6cdd1du64;
        let mut r = |len: usize, s: f32| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * s
                })
                .collect()
        };
        let (d, h, v) = (c.d_model, c.d_mlp, c.vocab_size);
        let layers = (0..c.n_layers)
            .map(|_| Gpt2LayerWeights {
                ln_1_w: r(d, 0.5).iter().map(|x| x + 1.0).collect(),
                ln_1_b: r(d, 0.2),
                w_qkv: r(3 * d * d, 1.0),
                b_qkv: r(3 * d, 0.2),
                w_o: r(d * d, 0.5),
                b_o: r(d, 0.2),
                ln_2_w: r(d, 0.5).iter().map(|x| x + 1.0).collect(),
                ln_2_b: r(d, 0.2),
                w_fc: r(h * d, 1.0),
                b_fc: r(h, 0.2),
                w_proj: r(d * h, 0.5),
                b_proj: r(d, 0.2),
            })
            .collect();
        Gpt2Model {
            wte: r(v * d, 2.0),
            wpe: r(c.max_seq_len * d, 1.0),
            ln_f_w: r(d, 0.5).iter().map(|x| x + 1.0).collect(),
            ln_f_b: r(d, 0.2),
            output: None,
            layers,
            config: c,
        }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn prefix_invariance_frozen_replay_and_errors() {
        let m = tiny();
        m.validate(Path::new("tiny")).unwrap();
        let toks = [1u32, 5, 3, 12, 2, 7];
        let all = ForwardOptions {
            hooks: Hooks::all(),
            ..Default::default()
        };
        let full = m.forward_with(&toks, &all).unwrap();
        let prefix = m.forward(&toks[..3]).unwrap();
        assert!(max_diff(&full.logits[..3 * 13], &prefix) < 1e-5);
        assert!(max_diff(&m.next_logits(&toks).unwrap(), &full.logits[5 * 13..]) < 1e-6);
        let mlp: Vec<Vec<f32>> = full
            .record
            .layers
            .iter()
            .map(|l| l.mlp_out.clone().unwrap())
            .collect();
        let again = m
            .forward_with(
                &toks,
                &ForwardOptions {
                    hooks: Hooks::all(),
                    intervention: Intervention {
                        frozen: Some(&full.record),
                        mlp_out: Some(&mlp),
                        mlp_fn: None,
                        patterns_only: false,
                    },
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(max_diff(&full.logits, &again.logits) < 1e-5);
        assert_eq!(full.record.layers.len(), again.record.layers.len());
        assert!(matches!(
            m.forward(&[1, 13]),
            Err(Error::TokenOutOfRange { id: 13, .. })
        ));
        assert!(m.forward(&[1; 9]).is_err());
        assert!(m.forward(&[]).is_err());
        let mut broken = m.clone();
        broken.layers[1].b_fc.pop();
        let e = broken.validate(Path::new("x")).unwrap_err().to_string();
        assert!(e.contains("h.1.mlp.c_fc.bias"), "{e}");
    }

    /// An MLP override that runs GPT-2's own MLP on the normed input it is given (or, `zero`, returns
    /// zeros, or, `short`, one value too few), and keeps what it was called with.
    #[derive(Debug)]
    struct OwnMlp<'a> {
        model: &'a Gpt2Model,
        zero: bool,
        short: bool,
        calls: std::sync::Mutex<Vec<Call>>,
    }

    /// A call to the override: the layer, `resid_mid`, the normed input and the unweighted norm.
    type Call = (usize, Vec<f32>, Vec<f32>, Vec<f32>);

    impl crate::model::MlpOverride for OwnMlp<'_> {
        fn mlp_out(&self, layer: usize, inputs: &crate::model::MlpInputs<'_>) -> Vec<f32> {
            let normed = inputs.normed;
            let mut calls = self.calls.lock().unwrap();
            calls.push((
                layer,
                inputs.resid_mid.to_vec(),
                normed.to_vec(),
                inputs.unweighted.to_vec(),
            ));
            let n = normed.len() / self.model.config.d_model;
            let mut out = vec![0.0; normed.len() - usize::from(self.short)];
            if !self.zero && !self.short {
                let mut s = self.model.scratch(n, 0);
                self.model.mlp(layer, normed, n, &mut s, &mut out);
            }
            out
        }
    }

    /// The MLP override (feature interventions) on GPT-2: called once a layer, in order, with that layer's
    /// `resid_mid`, normed MLP input and unweighted norm (`(x − mean) / sqrt(var + eps)`, recorded the
    /// same by the `mlp_in_unweighted` hook); its own MLP through it gives the plain forward's logits; zeros
    /// through it give what zero `mlp_out` replacements give; an output of the wrong size is an error that
    /// names the layer.
    #[test]
    fn mlp_override_runs_in_the_loop() {
        let m = tiny();
        let toks = [1u32, 5, 3, 12, 2, 7];
        let all = ForwardOptions {
            hooks: Hooks::all(),
            ..Default::default()
        };
        let clean = m.forward_with(&toks, &all).unwrap();
        let with = |o: &OwnMlp| {
            m.forward_with(
                &toks,
                &ForwardOptions {
                    intervention: Intervention {
                        mlp_fn: Some(o),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
        };
        let own = |zero, short| OwnMlp {
            model: &m,
            zero,
            short,
            calls: Default::default(),
        };
        let same = own(false, false);
        let out = with(&same).unwrap();
        assert!(max_diff(&clean.logits, &out.logits) < 1e-6);
        let calls = same.calls.into_inner().unwrap();
        assert_eq!(calls.len(), m.config.n_layers);
        let d = m.config.d_model;
        for (l, (layer, resid_mid, normed, unweighted)) in calls.iter().enumerate() {
            let rec = &clean.record.layers[l];
            assert_eq!(*layer, l);
            assert!(max_diff(resid_mid, rec.resid_mid.as_ref().unwrap()) < 1e-6);
            assert!(max_diff(normed, rec.mlp_in_normed.as_ref().unwrap()) < 1e-6);
            assert!(max_diff(unweighted, rec.mlp_in_unweighted.as_ref().unwrap()) < 1e-6);
            let want: Vec<f32> = resid_mid
                .chunks_exact(d)
                .flat_map(|x| {
                    let mean = x.iter().sum::<f32>() / d as f32;
                    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
                    let s = 1.0 / (var + m.config.norm_eps).sqrt();
                    x.iter().map(move |v| (v - mean) * s).collect::<Vec<_>>()
                })
                .collect();
            assert!(max_diff(unweighted, &want) < 1e-5);
        }
        let zeros = vec![vec![0.0f32; toks.len() * m.config.d_model]; m.config.n_layers];
        let replaced = m
            .forward_with(
                &toks,
                &ForwardOptions {
                    intervention: Intervention {
                        mlp_out: Some(&zeros),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .unwrap();
        let zeroed = with(&own(true, false)).unwrap();
        assert_eq!(zeroed.logits, replaced.logits);
        assert!(max_diff(&zeroed.logits, &clean.logits) > 1e-3);
        let e = with(&own(false, true)).unwrap_err().to_string();
        assert!(e.contains("mlp_fn output of layer 0"), "{e}");
    }

    #[test]
    fn gelu_new_values() {
        // transformers' NewGELUActivation at a few points.
        assert!((gelu_new(0.0)).abs() < 1e-7);
        assert!((gelu_new(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu_new(-1.0) + 0.158_808).abs() < 1e-5);
    }
}

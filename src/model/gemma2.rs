//! Gemma-2, run on the CPU over a whole prompt at once, with the same hooks and interventions as
//! [`LlamaModel`].
//!
//! Gemma-2 is the Llama block (RMSNorm, rotary grouped-query attention without biases, a gated MLP) with
//! these differences, all as `transformers`' `modeling_gemma2.py` defines them:
//! - the input embeddings are scaled by `sqrt(d_model)`;
//! - every RMSNorm multiplies by `1 + w`: the loader stores `1 + w` as the weight, so the norms are Llama's;
//! - the attention output and the MLP output are each normed again before their residual adds
//!   (`post_attention_layernorm`, `post_feedforward_layernorm`);
//! - the MLP is GeGLU with the tanh-approximated GELU;
//! - attention scores are `q · k / sqrt(query_pre_attn_scalar)`, soft-capped as `c · tanh(s / c)` with
//!   `c = attn_logit_softcapping`; every other layer (the even ones, or those `layer_types` names) sees only
//!   the last `sliding_window` positions;
//! - the logits are soft-capped with `final_logit_softcapping`.
//!
//! Hooks: `resid_mid` = `resid_pre` + the post-normed attention output; `mlp_in_normed` =
//! `pre_feedforward_layernorm(resid_mid)`; `mlp_in_unweighted` = that norm before its `(1 + w)` (Gemma
//! Scope's transcoder input, TransformerLens's `ln2.hook_normalized`); `mlp_out` =
//! `post_feedforward_layernorm(MLP)`, the value added to the stream (TransformerLens's `hook_mlp_out`). A
//! replaced MLP output (`Intervention::mlp_out`, `mlp_fn`) stands for the MLP and its post-norm together,
//! which is what a transcoder trained from either norm hook to `mlp_out` replaces. The post-norms' scales are recorded as `attn_post_norm_scale` and
//! `mlp_post_norm_scale`, and frozen like every other norm's.

use std::path::Path;

use super::forward::{
    AttnScores, Blocks, Dims, ForwardOptions, ForwardOutput, Norm, check_length, run_blocks,
    run_blocks_cached,
};
use super::gpt2::gelu_new;
use super::kv::{KvCache, LayerKv};
use super::llama::{LlamaModel, LlamaScratch, rms_norm};
use super::pattern::AttnPattern;
use crate::{Error, Result};

/// What Gemma-2 adds to the Llama hyper-parameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Gemma2Config {
    /// Attention scores are divided by `sqrt(query_pre_attn_scalar)` (256 for Gemma-2 2B and 9B).
    pub query_pre_attn_scalar: f32,
    /// Soft cap of the attention scores (50 in the released models); `None`: none.
    pub attn_logit_softcapping: Option<f32>,
    /// Soft cap of the logits (30 in the released models); `None`: none.
    pub final_logit_softcapping: Option<f32>,
    /// How many positions (the query's own included) a sliding-window layer sees.
    pub sliding_window: Option<usize>,
    /// Per layer, whether it is a sliding-window layer.
    pub sliding_layers: Vec<bool>,
}

/// The norms of one Gemma-2 block that the Llama block lacks, as `1 + w`, `[d_model]` each.
#[derive(Clone, Debug, Default)]
pub struct Gemma2PostNorms {
    /// `post_attention_layernorm`: on the attention output.
    pub attn: Vec<f32>,
    /// `post_feedforward_layernorm`: on the MLP output.
    pub mlp: Vec<f32>,
}

/// A Gemma-2 model held in f32: the Llama-shaped part (its norms' weights stored as `1 + w`: `attn_norm`
/// is `input_layernorm`, `mlp_norm` is `pre_feedforward_layernorm`), the post-norms and the extra
/// hyper-parameters.
#[derive(Clone, Debug)]
pub struct Gemma2Model {
    pub base: LlamaModel,
    pub gemma: Gemma2Config,
    pub post_norms: Vec<Gemma2PostNorms>,
}

impl Gemma2Model {
    /// Checks every tensor has the size the configs imply; `path` names the file for the error.
    pub fn validate(&self, path: &Path) -> Result<()> {
        self.base.validate(path)?;
        let c = &self.base.config;
        let g = &self.gemma;
        let bad = |reason: String| Error::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        if !(g.query_pre_attn_scalar.is_finite() && g.query_pre_attn_scalar > 0.0) {
            return Err(bad(format!(
                "query_pre_attn_scalar {} is not positive",
                g.query_pre_attn_scalar
            )));
        }
        for (name, cap) in [
            ("attn_logit_softcapping", g.attn_logit_softcapping),
            ("final_logit_softcapping", g.final_logit_softcapping),
        ] {
            if let Some(v) = cap.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(bad(format!("{name} {v} is not positive")));
            }
        }
        if g.sliding_window == Some(0) {
            return Err(bad("sliding_window is zero".into()));
        }
        if g.sliding_layers.len() != c.n_layers {
            return Err(bad(format!(
                "{} sliding-layer flags for n_layers = {}",
                g.sliding_layers.len(),
                c.n_layers
            )));
        }
        if self.post_norms.len() != c.n_layers {
            return Err(bad(format!(
                "{} post-norm pairs for n_layers = {}",
                self.post_norms.len(),
                c.n_layers
            )));
        }
        for (l, p) in self.post_norms.iter().enumerate() {
            for (name, t) in [
                ("post_attention_layernorm", &p.attn),
                ("post_feedforward_layernorm", &p.mlp),
            ] {
                if t.len() != c.d_model {
                    return Err(Error::Tensor {
                        path: path.to_path_buf(),
                        tensor: format!("model.layers.{l}.{name}.weight"),
                        reason: format!("has {} elements, expected [{}]", t.len(), c.d_model),
                    });
                }
            }
        }
        Ok(())
    }

    /// The factor of the token embeddings, `sqrt(d_model)`.
    pub fn embed_scale(&self) -> f32 {
        (self.base.config.d_model as f32).sqrt()
    }

    /// The input embeddings of `tokens`: embedding rows times `sqrt(d_model)`, `[n_tokens, d_model]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let scale = self.embed_scale();
        let mut x = self.base.embed(tokens)?;
        x.iter_mut().for_each(|v| *v *= scale);
        Ok(x)
    }

    /// The full causal forward over `tokens`, with hooks and interventions.
    pub fn forward_with(&self, tokens: &[u32], opts: &ForwardOptions<'_>) -> Result<ForwardOutput> {
        check_length(tokens.len(), 0, self.base.config.max_seq_len)?;
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
        check_length(tokens.len(), cache.len(), self.base.config.max_seq_len)?;
        let x = self.embed(tokens)?;
        run_blocks_cached(self, x, opts, cache)
    }

    /// The forward from given input embeddings `[n_tokens, d_model]` (already scaled, as
    /// [`Gemma2Model::embed`]'s are).
    pub fn forward_embedded(
        &self,
        x: Vec<f32>,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        run_blocks(self, x, opts)
    }

    /// How layer `l` forms its attention scores.
    fn scores(&self, l: usize) -> AttnScores {
        let g = &self.gemma;
        AttnScores {
            scale: 1.0 / g.query_pre_attn_scalar.sqrt(),
            softcap: g.attn_logit_softcapping,
            window: g.sliding_window.filter(|_| g.sliding_layers[l]),
        }
    }
}

/// The Gemma-2 block: the Llama block's attention with Gemma's scores, GeGLU, and norms after both.
impl Blocks for Gemma2Model {
    type Scratch = LlamaScratch;

    fn dims(&self) -> Dims {
        Dims {
            post_norms: true,
            ..self.base.dims()
        }
    }

    fn kv_width(&self) -> usize {
        self.base.config.kv_dim()
    }

    fn scratch(&self, n: usize, first: usize) -> LlamaScratch {
        self.base.scratch(n, first)
    }

    fn norm(&self, which: Norm, x: &[f32], frozen: Option<&[f32]>, out: &mut [f32]) -> Vec<f32> {
        let c = &self.base.config;
        let w = match which {
            Norm::PostAttn(l) => &self.post_norms[l].attn,
            Norm::PostMlp(l) => &self.post_norms[l].mlp,
            Norm::Attn(_) | Norm::Mlp(_) | Norm::Final => {
                return self.base.norm(which, x, frozen, out);
            }
        };
        rms_norm(x, c.d_model, w, c.norm_eps, frozen, out)
    }

    fn attention(
        &self,
        l: usize,
        normed: &[f32],
        n: usize,
        frozen: Option<&AttnPattern>,
        record: bool,
        kv: Option<&mut LayerKv>,
        s: &mut LlamaScratch,
        out: &mut [f32],
    ) -> Option<AttnPattern> {
        let scores = self.scores(l);
        self.base
            .attend(l, normed, n, scores, frozen, record, kv, s, out)
    }

    fn mlp(&self, l: usize, normed: &[f32], n: usize, s: &mut LlamaScratch, out: &mut [f32]) {
        self.base.gated_mlp(l, normed, n, gelu_new, s, out);
    }

    fn unembedding(&self) -> &[f32] {
        self.base.unembedding()
    }

    fn logit_softcap(&self) -> Option<f32> {
        self.gemma.final_logit_softcapping
    }
}

impl super::CausalLm for Gemma2Model {
    fn max_seq_len(&self) -> usize {
        self.base.config.max_seq_len
    }

    fn forward_with(&self, tokens: &[u32], opts: &ForwardOptions<'_>) -> Result<ForwardOutput> {
        Gemma2Model::forward_with(self, tokens, opts)
    }

    fn forward_cached(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        Gemma2Model::forward_cached(self, tokens, cache, opts)
    }
}

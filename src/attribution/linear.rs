//! What attribution reads of a model beyond its forward: the weights of its linearisation, for each
//! architecture.
//!
//! With attention patterns and norm scales frozen, every map between MLPs is affine in the residual stream:
//! - a norm with its scale `s` frozen is `x ↦ s γ ⊙ x` (RMSNorm, Llama) or `x ↦ s γ ⊙ (x − mean(x)) + β`
//!   (LayerNorm, GPT-2: the mean is still the current input's, since centring is linear, as in
//!   circuit-tracer). The gradient through it is `s γ ⊙ g`, or `s · centre(γ ⊙ g)` for the LayerNorm
//!   ([`Linear::norm_backward_add`]);
//! - attention with a frozen pattern is linear in its values, so its backward needs only `W_V` and `W_O`
//!   (and, for Gemma-2, the frozen norm on the attention output, `s γ ⊙ x` like any frozen RMSNorm);
//! - biases (GPT-2's projections and LayerNorms) and position embeddings are constants: they move no edge,
//!   and no node carries them, as in circuit-tracer.
//!
//! A token node's vector is the token's embedding row (without position embeddings), times Gemma-2's
//! `sqrt(d_model)`.
//!
//! Gemma-2's soft-capped logits `c · tanh(z / c)` are attributed before the cap: a logit node is the
//! demeaned raw logit `z`, a linear function of the final stream, as in circuit-tracer (the cap is monotone
//! and comes after everything the graph explains); the logits' probabilities are the model's, capped.

use crate::Result;
use crate::model::{
    CausalLm, ForwardOptions, ForwardOutput, Gemma2Model, Gpt2Model, LlamaModel, Model,
};

use crate::model::forward::Blocks;
pub use crate::model::forward::NormKind;

/// The weights of one block that the linearised backward reads, matrices `(out, in)` row-major.
#[derive(Clone, Copy, Debug)]
pub struct LinearLayer<'a> {
    /// The attention norm's weight `γ`, `[d]`.
    pub attn_norm: &'a [f32],
    /// The value projection, `[kv_dim, d]`.
    pub wv: &'a [f32],
    /// The attention output projection, `[d, q_dim]`.
    pub wo: &'a [f32],
    /// The MLP norm's weight `γ`, `[d]`.
    pub mlp_norm: &'a [f32],
    /// The weight `γ` of the RMSNorm on the attention output (Gemma-2's `post_attention_layernorm`, its
    /// scales recorded as `attn_post_norm_scale`), `[d]`; `None` for models without one.
    pub attn_post_norm: Option<&'a [f32]>,
}

/// A model's linearisation: its sizes, its norms' kind and weights, its value and output projections, its
/// embeddings and unembedding. The sizes and the norm are the forward's (`Blocks::dims`).
#[derive(Clone, Debug)]
pub struct Linear<'a> {
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub norm: NormKind,
    pub layers: Vec<LinearLayer<'a>>,
    /// The final norm's weight `γ`, `[d]`.
    pub final_norm: &'a [f32],
    /// The token embedding, `[vocab, d]`.
    pub token_embedding: &'a [f32],
    /// The factor of the token embedding in the input embeddings (Gemma-2's `sqrt(d)`; 1 otherwise).
    pub embed_scale: f32,
    /// The soft cap the model applies to its logits (Gemma-2), which attribution does not go through.
    pub logit_softcap: Option<f32>,
    /// The unembedding, `[vocab, d]`.
    pub unembedding: &'a [f32],
}

impl Linear<'_> {
    /// A token node's vector: token `t`'s embedding row times [`Linear::embed_scale`], `[d]`.
    pub fn token_vector(&self, t: usize) -> Vec<f32> {
        let d = self.d_model;
        self.token_embedding[t * d..(t + 1) * d]
            .iter()
            .map(|v| v * self.embed_scale)
            .collect()
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Adds to `out` the gradient at the input of a frozen norm (weight `gamma`, scale `s`) whose output
    /// has the gradient `g`: `s γ ⊙ g`, or for a LayerNorm `s (γ ⊙ g − mean(γ ⊙ g))`.
    pub fn norm_backward_add(&self, gamma: &[f32], s: f32, g: &[f32], out: &mut [f32]) {
        match self.norm {
            NormKind::Rms => out
                .iter_mut()
                .zip(g)
                .zip(gamma)
                .for_each(|((o, g), w)| *o += g * w * s),
            NormKind::Layer => {
                let mean = g.iter().zip(gamma).map(|(g, w)| g * w).sum::<f32>() / g.len() as f32;
                out.iter_mut()
                    .zip(g)
                    .zip(gamma)
                    .for_each(|((o, g), w)| *o += (g * w - mean) * s);
            }
        }
    }

    /// [`Linear::norm_backward_add`] for the norm without its weight (`γ = 1`): `s g`, or for a LayerNorm
    /// `s (g − mean(g))`.
    pub fn norm_backward_unweighted_add(&self, s: f32, g: &[f32], out: &mut [f32]) {
        let mean = match self.norm {
            NormKind::Rms => 0.0,
            NormKind::Layer => g.iter().sum::<f32>() / g.len() as f32,
        };
        out.iter_mut()
            .zip(g)
            .for_each(|(o, g)| *o += (g - mean) * s);
    }

    /// [`Linear::norm_backward_add`] into a new vector.
    pub fn norm_backward(&self, gamma: &[f32], s: f32, g: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; g.len()];
        self.norm_backward_add(gamma, s, g, &mut out);
        out
    }
}

/// A model that attribution graphs and interventions run through: its forward with hooks and
/// interventions ([`CausalLm`]), its input embeddings, and its linearisation.
pub trait Attributable: CausalLm + Sync {
    /// The input embeddings of `tokens`, `[n, d]` (with the position embeddings where the model has them).
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>>;

    /// The forward from given input embeddings `[n, d]`.
    fn forward_embedded(&self, x: Vec<f32>, opts: &ForwardOptions<'_>) -> Result<ForwardOutput>;

    /// The weights the linearised backward reads.
    fn linear(&self) -> Linear<'_>;
}

impl Attributable for LlamaModel {
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        LlamaModel::embed(self, tokens)
    }

    fn forward_embedded(&self, x: Vec<f32>, opts: &ForwardOptions<'_>) -> Result<ForwardOutput> {
        LlamaModel::forward_embedded(self, x, opts)
    }

    fn linear(&self) -> Linear<'_> {
        let (c, dims) = (&self.config, Blocks::dims(self));
        Linear {
            n_layers: dims.n_layers,
            d_model: dims.d_model,
            n_heads: dims.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            vocab_size: dims.vocab_size,
            norm: dims.norm,
            layers: self
                .layers
                .iter()
                .map(|w| LinearLayer {
                    attn_norm: &w.attn_norm,
                    wv: &w.wv,
                    wo: &w.wo,
                    mlp_norm: &w.mlp_norm,
                    attn_post_norm: None,
                })
                .collect(),
            final_norm: &self.final_norm,
            token_embedding: &self.tok_embeddings,
            embed_scale: 1.0,
            logit_softcap: None,
            unembedding: self.unembedding(),
        }
    }
}

impl Attributable for Gpt2Model {
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        Gpt2Model::embed(self, tokens)
    }

    fn forward_embedded(&self, x: Vec<f32>, opts: &ForwardOptions<'_>) -> Result<ForwardOutput> {
        Gpt2Model::forward_embedded(self, x, opts)
    }

    fn linear(&self) -> Linear<'_> {
        let (c, dims) = (&self.config, Blocks::dims(self));
        let d = dims.d_model;
        Linear {
            n_layers: dims.n_layers,
            d_model: d,
            n_heads: dims.n_heads,
            n_kv_heads: dims.n_heads,
            head_dim: c.head_dim(),
            vocab_size: dims.vocab_size,
            norm: dims.norm,
            layers: self
                .layers
                .iter()
                .map(|w| LinearLayer {
                    attn_norm: &w.ln_1_w,
                    // The fused projection's rows are all of Q, then K, then V.
                    wv: &w.w_qkv[2 * d * d..3 * d * d],
                    wo: &w.w_o,
                    mlp_norm: &w.ln_2_w,
                    attn_post_norm: None,
                })
                .collect(),
            final_norm: &self.ln_f_w,
            token_embedding: &self.wte,
            embed_scale: 1.0,
            logit_softcap: None,
            unembedding: self.unembedding(),
        }
    }
}

impl Attributable for Gemma2Model {
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        Gemma2Model::embed(self, tokens)
    }

    fn forward_embedded(&self, x: Vec<f32>, opts: &ForwardOptions<'_>) -> Result<ForwardOutput> {
        Gemma2Model::forward_embedded(self, x, opts)
    }

    /// Llama's view (its norm weights are Gemma's `1 + w`), the post-attention norms, the embedding
    /// scale and the logit cap. The post-MLP norms are inside what a transcoder replaces.
    fn linear(&self) -> Linear<'_> {
        let mut lin = self.base.linear();
        for (l, p) in lin.layers.iter_mut().zip(&self.post_norms) {
            l.attn_post_norm = Some(&p.attn);
        }
        lin.embed_scale = self.embed_scale();
        lin.logit_softcap = self.gemma.final_logit_softcapping;
        lin
    }
}

impl Attributable for Model {
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        match self {
            Model::Llama(m) => m.embed(tokens),
            Model::Gpt2(m) => m.embed(tokens),
            Model::Gemma2(m) => m.embed(tokens),
        }
    }

    fn forward_embedded(&self, x: Vec<f32>, opts: &ForwardOptions<'_>) -> Result<ForwardOutput> {
        match self {
            Model::Llama(m) => m.forward_embedded(x, opts),
            Model::Gpt2(m) => m.forward_embedded(x, opts),
            Model::Gemma2(m) => m.forward_embedded(x, opts),
        }
    }

    fn linear(&self) -> Linear<'_> {
        match self {
            Model::Llama(m) => m.linear(),
            Model::Gpt2(m) => m.linear(),
            Model::Gemma2(m) => m.linear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The norms' backward against finite differences of the frozen norms themselves.
    #[test]
    fn norm_backward_is_the_frozen_norms_transpose() {
        let d = 7;
        let gamma: Vec<f32> = (0..d).map(|i| 0.5 + 0.1 * i as f32).collect();
        let g: Vec<f32> = (0..d).map(|i| (i as f32 * 1.3).cos()).collect();
        let s = 1.7f32;
        for norm in [NormKind::Rms, NormKind::Layer] {
            let frozen = |x: &[f32]| -> Vec<f32> {
                let mean = match norm {
                    NormKind::Rms => 0.0,
                    NormKind::Layer => x.iter().sum::<f32>() / d as f32,
                };
                x.iter()
                    .zip(&gamma)
                    .map(|(v, w)| s * w * (v - mean))
                    .collect()
            };
            let lin = Linear {
                n_layers: 0,
                d_model: d,
                n_heads: 1,
                n_kv_heads: 1,
                head_dim: d,
                vocab_size: 0,
                norm,
                layers: Vec::new(),
                final_norm: &[],
                token_embedding: &[],
                embed_scale: 1.0,
                logit_softcap: None,
                unembedding: &[],
            };
            let got = lin.norm_backward(&gamma, s, &g);
            // The map is linear: its transpose applied to g, column by column.
            for (i, got) in got.iter().enumerate() {
                let mut e = vec![0.0f32; d];
                e[i] = 1.0;
                let col = frozen(&e);
                let want: f32 = col.iter().zip(&g).map(|(a, b)| a * b).sum();
                assert!((got - want).abs() < 1e-5, "{norm:?} {i}: {got} vs {want}");
            }
            // Without the weight: the transpose of the forward's unweighted norm (scale frozen).
            let mut got = vec![0.0f32; d];
            lin.norm_backward_unweighted_add(s, &g, &mut got);
            for (i, got) in got.iter().enumerate() {
                let mut e = vec![0.0f32; d];
                e[i] = 1.0;
                let col = norm.unweighted(&e, &[s], d);
                let want: f32 = col.iter().zip(&g).map(|(a, b)| a * b).sum();
                assert!(
                    (got - want).abs() < 1e-5,
                    "{norm:?} unweighted {i}: {got} vs {want}"
                );
            }
        }
    }
}

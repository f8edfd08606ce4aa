//! The Llama-family transformer, run on the CPU over a whole prompt at once.
//!
//! This is the forward pass the engine caches activations from and computes attribution graphs through:
//! RMSNorm, rotary position embeddings (adjacent-pair or half-split convention, chosen by the loader),
//! grouped-query causal attention, a SwiGLU MLP and a tied or separate unembedding. It runs the full sequence
//! in one go, with every projection a batched GEMM over all positions, or (generation) the positions after
//! those of a [`KvCache`].
//!
//! Hooks and interventions (recording the stream, freezing attention and norms, replacing the MLPs) are
//! those of the shared loop, `run_blocks` in [`forward`](super::forward); this module supplies the
//! Llama block to it (`Blocks`). Weight matrices are `(out, in)` row-major, as in PyTorch, llama2.c and
//! GGUF.

use std::path::Path;

use super::forward::{
    AttnScores, Blocks, Dims, ForwardOptions, ForwardOutput, Norm, NormKind, attend_over,
    check_length, matmul_wt, run_blocks, run_blocks_cached,
};
use super::kv::{KvCache, LayerKv};
use super::pattern::AttnPattern;
use crate::{Error, Result};

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RopeStyle {
    /// Dimensions `(2i, 2i+1)` rotate together (llama2.c, Meta's original code, GGUF's permuted Q/K weights).
    AdjacentPairs,
    /// Dimensions `(i, i + head_dim/2)` rotate together (Hugging Face `transformers`, "NeoX" style).
    HalfSplit,
}

/// The hyper-parameters of a Llama-family model.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LlamaConfig {
    /// Residual stream width.
    pub d_model: usize,
    /// Width of the SwiGLU hidden layer.
    pub hidden_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Longest sequence the model was trained for (longer prompts are refused).
    pub max_seq_len: usize,
    /// The epsilon added to the mean square in every RMSNorm.
    pub norm_eps: f32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    /// RoPE scaling: a divisor for each of a head's `head_dim / 2` rotary frequencies (Llama 3's
    /// `rope_type: "llama3"`, computed by [`llama3_rope_factors`], or a GGUF file's `rope_freqs.weight`;
    /// `linear` scaling divides them all by its factor). Empty: no scaling.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rope_freq_factors: Vec<f32>,
}

impl LlamaConfig {
    /// Width of the concatenated query heads.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Checks the sizes are positive and consistent; `path` names the file they came from.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        for (name, v) in [
            ("d_model", self.d_model),
            ("hidden_dim", self.hidden_dim),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_seq_len", self.max_seq_len),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} is zero")));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(bad(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(format!("head_dim {} is odd", self.head_dim)));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return Err(bad(format!("norm_eps {} is invalid", self.norm_eps)));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(bad(format!("rope_theta {} is invalid", self.rope_theta)));
        }
        let f = &self.rope_freq_factors;
        if !f.is_empty() && f.len() != self.head_dim / 2 {
            return Err(bad(format!(
                "{} RoPE frequency factors for head_dim {} (want {})",
                f.len(),
                self.head_dim,
                self.head_dim / 2
            )));
        }
        if let Some(v) = f.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
            return Err(bad(format!("RoPE frequency factor {v} is invalid")));
        }
        Ok(())
    }

    /// Multiply-adds of one forward over `n` tokens, times two (FLOPs): projections, MLP, attention scores
    /// and mixing (causal half), and the unembedding of `n_logits` positions.
    pub fn forward_flops(&self, n: usize, n_logits: usize) -> f64 {
        let (d, h, q, kv) = (
            self.d_model as f64,
            self.hidden_dim as f64,
            self.q_dim() as f64,
            self.kv_dim() as f64,
        );
        let n_f = n as f64;
        let per_token = d * q * 2.0 + d * kv * 2.0 + 3.0 * d * h;
        let attn = (n_f * (n_f + 1.0) / 2.0) * q * 2.0;
        2.0 * (self.n_layers as f64 * (per_token * n_f + attn)
            + n_logits as f64 * d * self.vocab_size as f64)
    }
}

/// The weights of one transformer block, matrices `(out, in)` row-major.
#[derive(Clone, Debug, Default)]
pub struct LayerWeights {
    /// RMSNorm weight before attention, `[d_model]`.
    pub attn_norm: Vec<f32>,
    /// `[q_dim, d_model]`.
    pub wq: Vec<f32>,
    /// `[kv_dim, d_model]`.
    pub wk: Vec<f32>,
    /// `[kv_dim, d_model]`.
    pub wv: Vec<f32>,
    /// `[d_model, q_dim]`.
    pub wo: Vec<f32>,
    /// RMSNorm weight before the MLP, `[d_model]`.
    pub mlp_norm: Vec<f32>,
    /// Gate projection (llama2.c `w1`), `[hidden_dim, d_model]`.
    pub w_gate: Vec<f32>,
    /// Up projection (llama2.c `w3`), `[hidden_dim, d_model]`.
    pub w_up: Vec<f32>,
    /// Down projection (llama2.c `w2`), `[d_model, hidden_dim]`.
    pub w_down: Vec<f32>,
}

/// A Llama-family model held in f32.
#[derive(Clone, Debug)]
pub struct LlamaModel {
    pub config: LlamaConfig,
    /// `[vocab_size, d_model]`.
    pub tok_embeddings: Vec<f32>,
    pub layers: Vec<LayerWeights>,
    /// `[d_model]`.
    pub final_norm: Vec<f32>,
    /// Separate unembedding `[vocab_size, d_model]`; `None` when it is tied to `tok_embeddings`.
    pub output: Option<Vec<f32>>,
}

/// RMSNorm of each row of `x` (`[rows, d]`) into `out`, with weight `w`; returns or uses `1/rms` per row.
/// When `frozen` is given its scales are used instead of being computed.
pub(crate) fn rms_norm(
    x: &[f32],
    d: usize,
    w: &[f32],
    eps: f32,
    frozen: Option<&[f32]>,
    out: &mut [f32],
) -> Vec<f32> {
    let rows = x.len() / d;
    let mut scales = Vec::with_capacity(rows);
    for r in 0..rows {
        let row = &x[r * d..(r + 1) * d];
        let s = match frozen {
            Some(f) => f[r],
            None => {
                let ss: f32 = row.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps;
                1.0 / ss.sqrt()
            }
        };
        scales.push(s);
        for ((o, &v), &g) in out[r * d..(r + 1) * d].iter_mut().zip(row).zip(w) {
            *o = g * (s * v);
        }
    }
    scales
}

/// Llama 3's RoPE scaling (`rope_scaling` with `rope_type: "llama3"` in a Hugging Face config) as a
/// divisor of each rotary frequency `θ^(−2i/head_dim)`: 1 for wavelengths under
/// `original_max_position_embeddings / high_freq_factor`, `factor` for wavelengths over
/// `original_max_position_embeddings / low_freq_factor`, and between them the divisor that interpolates
/// the two frequencies linearly in `original_max_position_embeddings / wavelength`. This is
/// `transformers`' `_compute_llama3_parameters`, and the `rope_freqs.weight` that llama.cpp's converter
/// writes into GGUF files.
pub fn llama3_rope_factors(
    head_dim: usize,
    theta: f32,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: f64,
) -> Vec<f32> {
    let (low_wavelen, high_wavelen) = (
        original_max_position_embeddings / low_freq_factor,
        original_max_position_embeddings / high_freq_factor,
    );
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / (theta as f64).powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor as f32
            } else {
                let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

/// Cosine and sine tables `[n, head_dim/2]` for rotary embeddings of the positions `first..first + n`,
/// each frequency divided by its factor in `factors` when there are any.
fn rope_tables(
    first: usize,
    n: usize,
    head_dim: usize,
    theta: f32,
    factors: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for pos in first..first + n {
        for i in 0..half {
            let mut freq = 1.0 / (theta as f64).powf((2 * i) as f64 / head_dim as f64);
            if let Some(&f) = factors.get(i) {
                freq /= f as f64;
            }
            let a = pos as f64 * freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// Rotates every head of `x` (`[n, n_heads * head_dim]`) in place.
fn apply_rope(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    style: RopeStyle,
    cos: &[f32],
    sin: &[f32],
) {
    let half = head_dim / 2;
    let width = n_heads * head_dim;
    for (pos, row) in x.chunks_exact_mut(width).enumerate() {
        let (c, s) = (
            &cos[pos * half..(pos + 1) * half],
            &sin[pos * half..(pos + 1) * half],
        );
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = match style {
                    RopeStyle::AdjacentPairs => (2 * i, 2 * i + 1),
                    RopeStyle::HalfSplit => (i, i + half),
                };
                let (v0, v1) = (head[a], head[b]);
                head[a] = v0 * c[i] - v1 * s[i];
                head[b] = v0 * s[i] + v1 * c[i];
            }
        }
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl LlamaModel {
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
        let (d, h, q, kv, v) = (c.d_model, c.hidden_dim, c.q_dim(), c.kv_dim(), c.vocab_size);
        check("tok_embeddings".into(), self.tok_embeddings.len(), &[v, d])?;
        check("final_norm".into(), self.final_norm.len(), &[d])?;
        if let Some(o) = &self.output {
            check("output".into(), o.len(), &[v, d])?;
        }
        if self.layers.len() != c.n_layers {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("{} layers for n_layers = {}", self.layers.len(), c.n_layers),
            });
        }
        for (l, w) in self.layers.iter().enumerate() {
            check(format!("layers.{l}.attn_norm"), w.attn_norm.len(), &[d])?;
            check(format!("layers.{l}.wq"), w.wq.len(), &[q, d])?;
            check(format!("layers.{l}.wk"), w.wk.len(), &[kv, d])?;
            check(format!("layers.{l}.wv"), w.wv.len(), &[kv, d])?;
            check(format!("layers.{l}.wo"), w.wo.len(), &[d, q])?;
            check(format!("layers.{l}.mlp_norm"), w.mlp_norm.len(), &[d])?;
            check(format!("layers.{l}.w_gate"), w.w_gate.len(), &[h, d])?;
            check(format!("layers.{l}.w_up"), w.w_up.len(), &[h, d])?;
            check(format!("layers.{l}.w_down"), w.w_down.len(), &[d, h])?;
        }
        Ok(())
    }

    /// The unembedding matrix `[vocab_size, d_model]` (the token embedding when tied).
    pub fn unembedding(&self) -> &[f32] {
        self.output.as_deref().unwrap_or(&self.tok_embeddings)
    }

    /// Embeds `tokens` into `[n_tokens, d_model]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let d = self.config.d_model;
        let mut x = Vec::with_capacity(tokens.len() * d);
        for &t in tokens {
            if t as usize >= self.config.vocab_size {
                return Err(Error::TokenOutOfRange {
                    id: t,
                    vocab_size: self.config.vocab_size,
                });
            }
            x.extend_from_slice(&self.tok_embeddings[t as usize * d..(t as usize + 1) * d]);
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
        let x = self.embed(tokens)?;
        run_blocks_cached(self, x, opts, cache)
    }

    /// The forward from given input embeddings `[n_tokens, d_model]` (e.g. [`LlamaModel::embed`]'s).
    pub fn forward_embedded(
        &self,
        x: Vec<f32>,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        run_blocks(self, x, opts)
    }

    /// Layer `l`'s rotary grouped-query attention of the normed stream `[n, d]`, projected by `W_O` into
    /// `out`, with the scores formed as `scores` says (the Llama block's and Gemma-2's).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend(
        &self,
        l: usize,
        normed: &[f32],
        n: usize,
        scores: AttnScores,
        frozen: Option<&AttnPattern>,
        record: bool,
        kv: Option<&mut LayerKv>,
        s: &mut LlamaScratch,
        out: &mut [f32],
    ) -> Option<AttnPattern> {
        let (c, w) = (&self.config, &self.layers[l]);
        let d = c.d_model;
        matmul_wt(normed, n, d, &w.wq, c.q_dim(), &mut s.q);
        matmul_wt(normed, n, d, &w.wk, c.kv_dim(), &mut s.k);
        matmul_wt(normed, n, d, &w.wv, c.kv_dim(), &mut s.v);
        apply_rope(
            &mut s.q,
            c.n_heads,
            c.head_dim,
            c.rope_style,
            &s.cos,
            &s.sin,
        );
        apply_rope(
            &mut s.k,
            c.n_kv_heads,
            c.head_dim,
            c.rope_style,
            &s.cos,
            &s.sin,
        );
        let pattern = attend_over(
            n,
            (c.n_heads, c.n_kv_heads, c.head_dim),
            scores,
            (&s.q, &s.k, &s.v),
            frozen,
            record,
            kv,
            &mut s.attn,
        );
        matmul_wt(&s.attn, n, c.q_dim(), &w.wo, d, out);
        pattern
    }

    /// Layer `l`'s gated MLP `W_down (act(W_gate x) ⊙ W_up x)` of the normed stream `[n, d]` into `out`
    /// (SwiGLU with `silu`; Gemma-2's GeGLU with the tanh GELU).
    pub(crate) fn gated_mlp(
        &self,
        l: usize,
        normed: &[f32],
        n: usize,
        act: fn(f32) -> f32,
        s: &mut LlamaScratch,
        out: &mut [f32],
    ) {
        let (c, w) = (&self.config, &self.layers[l]);
        let d = c.d_model;
        matmul_wt(normed, n, d, &w.w_gate, c.hidden_dim, &mut s.gate);
        matmul_wt(normed, n, d, &w.w_up, c.hidden_dim, &mut s.up);
        for (g, u) in s.gate.iter_mut().zip(&s.up) {
            *g = act(*g) * u;
        }
        matmul_wt(&s.gate, n, c.hidden_dim, &w.w_down, d, out);
    }
}

/// The Llama-family block: RMSNorm, rotary grouped-query attention without biases, a SwiGLU MLP.
impl Blocks for LlamaModel {
    /// Q, K, V and the heads' outputs; the MLP's gate and up projections; the rotary tables.
    type Scratch = LlamaScratch;

    fn dims(&self) -> Dims {
        let c = &self.config;
        Dims {
            n_layers: c.n_layers,
            d_model: c.d_model,
            n_heads: c.n_heads,
            vocab_size: c.vocab_size,
            post_norms: false,
            norm: NormKind::Rms,
        }
    }

    fn kv_width(&self) -> usize {
        self.config.kv_dim()
    }

    fn scratch(&self, n: usize, first: usize) -> LlamaScratch {
        let c = &self.config;
        let (cos, sin) = rope_tables(first, n, c.head_dim, c.rope_theta, &c.rope_freq_factors);
        LlamaScratch {
            q: vec![0.0; n * c.q_dim()],
            k: vec![0.0; n * c.kv_dim()],
            v: vec![0.0; n * c.kv_dim()],
            attn: vec![0.0; n * c.q_dim()],
            gate: vec![0.0; n * c.hidden_dim],
            up: vec![0.0; n * c.hidden_dim],
            cos,
            sin,
        }
    }

    fn norm(&self, which: Norm, x: &[f32], frozen: Option<&[f32]>, out: &mut [f32]) -> Vec<f32> {
        let w = match which {
            Norm::Attn(l) => &self.layers[l].attn_norm,
            Norm::Mlp(l) => &self.layers[l].mlp_norm,
            Norm::Final => &self.final_norm,
            Norm::PostAttn(_) | Norm::PostMlp(_) => unreachable!("Llama has no post-norms"),
        };
        let c = &self.config;
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
        let scores = AttnScores::plain(self.config.head_dim);
        self.attend(l, normed, n, scores, frozen, record, kv, s, out)
    }

    fn mlp(&self, l: usize, normed: &[f32], n: usize, s: &mut LlamaScratch, out: &mut [f32]) {
        self.gated_mlp(l, normed, n, silu, s, out);
    }

    fn unembedding(&self) -> &[f32] {
        LlamaModel::unembedding(self)
    }
}

/// [`LlamaModel`]'s buffers for a forward over some number of tokens.
pub(crate) struct LlamaScratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl super::CausalLm for LlamaModel {
    fn max_seq_len(&self) -> usize {
        self.config.max_seq_len
    }

    fn forward_with(&self, tokens: &[u32], opts: &ForwardOptions<'_>) -> Result<ForwardOutput> {
        LlamaModel::forward_with(self, tokens, opts)
    }

    fn forward_cached(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        LlamaModel::forward_cached(self, tokens, cache, opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CausalLm, ForwardRecord, Hooks, Intervention};

    /// A small random model with distinct, deterministic weights.
    pub(crate) fn tiny(style: RopeStyle, tied: bool) -> LlamaModel {
        let c = LlamaConfig {
            d_model: 16,
            hidden_dim: 24,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 4,
            vocab_size: 11,
            max_seq_len: 32,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_style: style,
            rope_freq_factors: Vec::new(),
        };
        let mut seed = 0x9e3779b97f4a7c15u64;
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
        let (d, h, q, kv, v) = (c.d_model, c.hidden_dim, c.q_dim(), c.kv_dim(), c.vocab_size);
        let layers = (0..c.n_layers)
            .map(|_| LayerWeights {
                attn_norm: r(d, 0.5).iter().map(|x| x + 1.0).collect(),
                wq: r(q * d, 1.0),
                wk: r(kv * d, 1.0),
                wv: r(kv * d, 1.0),
                wo: r(d * q, 1.0),
                mlp_norm: r(d, 0.5).iter().map(|x| x + 1.0).collect(),
                w_gate: r(h * d, 1.0),
                w_up: r(h * d, 1.0),
                w_down: r(d * h, 1.0),
            })
            .collect();
        LlamaModel {
            tok_embeddings: r(v * d, 2.0),
            final_norm: r(d, 0.5).iter().map(|x| x + 1.0).collect(),
            output: (!tied).then(|| r(v * d, 1.0)),
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
    fn causal_prefix_invariance_and_hooks() {
        for style in [RopeStyle::AdjacentPairs, RopeStyle::HalfSplit] {
            let m = tiny(style, false);
            m.validate(Path::new("tiny")).unwrap();
            let toks = [1u32, 5, 3, 9, 2, 7];
            let full = m
                .forward_with(
                    &toks,
                    &ForwardOptions {
                        hooks: Hooks::all(),
                        ..Default::default()
                    },
                )
                .unwrap();
            let prefix = m.forward(&toks[..3]).unwrap();
            assert!(max_diff(&full.logits[..3 * 11], &prefix) < 1e-5);
            let l0 = &full.record.layers[0];
            let l1 = &full.record.layers[1];
            // resid_pre[1] = resid_mid[0] + mlp_out[0].
            let sum: Vec<f32> = l0
                .resid_mid
                .as_ref()
                .unwrap()
                .iter()
                .zip(l0.mlp_out.as_ref().unwrap())
                .map(|(a, b)| a + b)
                .collect();
            assert!(max_diff(&sum, l1.resid_pre.as_ref().unwrap()) < 1e-6);
            // Attention rows sum to one and are causal.
            let p = l0.attn_pattern.as_ref().unwrap().to_dense();
            let n = toks.len();
            for h in 0..4 {
                for t in 0..n {
                    let row = &p[h * n * n + t * n..h * n * n + (t + 1) * n];
                    assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                    assert!(row[t + 1..].iter().all(|&x| x == 0.0));
                }
            }
            let last = m.next_logits(&toks).unwrap();
            assert!(max_diff(&last, &full.logits[5 * 11..]) < 1e-6);
        }
    }

    #[test]
    fn frozen_and_replaced_forward_reproduces_the_original() {
        let m = tiny(RopeStyle::HalfSplit, true);
        let toks = [3u32, 1, 4, 1, 5];
        let base = m
            .forward_with(
                &toks,
                &ForwardOptions {
                    hooks: Hooks::all(),
                    ..Default::default()
                },
            )
            .unwrap();
        let mlp: Vec<Vec<f32>> = base
            .record
            .layers
            .iter()
            .map(|l| l.mlp_out.clone().unwrap())
            .collect();
        let again = m
            .forward_with(
                &toks,
                &ForwardOptions {
                    intervention: Intervention {
                        frozen: Some(&base.record),
                        mlp_out: Some(&mlp),
                        mlp_fn: None,
                        patterns_only: false,
                    },
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(max_diff(&base.logits, &again.logits) < 1e-5);
        // Frozen forward is linear in the replaced MLP outputs: doubling a replacement changes logits linearly.
        let mut zero = mlp.clone();
        zero.iter_mut().for_each(|z| z.fill(0.0));
        let mut twice = mlp.clone();
        twice
            .iter_mut()
            .for_each(|z| z.iter_mut().for_each(|v| *v *= 2.0));
        let run = |r: &[Vec<f32>]| {
            m.forward_with(
                &toks,
                &ForwardOptions {
                    intervention: Intervention {
                        frozen: Some(&base.record),
                        mlp_out: Some(r),
                        mlp_fn: None,
                        patterns_only: false,
                    },
                    ..Default::default()
                },
            )
            .unwrap()
            .logits
        };
        let (l0, l2) = (run(&zero), run(&twice));
        let mid: Vec<f32> = l0.iter().zip(&l2).map(|(a, b)| (a + b) / 2.0).collect();
        assert!(max_diff(&mid, &base.logits) < 1e-4);
    }

    /// Llama 3.2's RoPE scaling (θ = 500000, head_dim 64, factor 32, low and high frequency factors 1 and
    /// 4, 8192 original positions): 1 for the 15 fastest frequencies, 32 from the 19th on, and between
    /// them the ratio of `transformers`' frequency to its smoothed one (values from a Python transcription
    /// of `_compute_llama3_parameters`).
    #[test]
    fn llama3_rope_factors_match_transformers() {
        let f = llama3_rope_factors(64, 500_000.0, 32.0, 1.0, 4.0, 8192.0);
        assert_eq!(f.len(), 32);
        assert!(f[..15].iter().all(|&v| v == 1.0), "{f:?}");
        assert!(f[18..].iter().all(|&v| v == 32.0), "{f:?}");
        for (i, want) in [(15, 1.651329), (16, 3.292262), (17, 9.666729)] {
            assert!((f[i] - want).abs() < 1e-5, "{i}: {} vs {want}", f[i]);
        }
    }

    /// The factors divide the rotary frequencies: a head's pair `i` turns by `pos · θ^(−2i/hd) / f_i`;
    /// factors of one change no bit; a factor list of the wrong length, or a factor of zero, is refused.
    #[test]
    fn rope_factors_divide_the_frequencies() {
        let (hd, theta, n) = (8, 10_000.0f32, 5);
        let factors = [1.0f32, 2.5, 7.0, 32.0];
        let (cos, sin) = rope_tables(0, n, hd, theta, &factors);
        for pos in 0..n {
            for i in 0..hd / 2 {
                let freq =
                    1.0 / (theta as f64).powf((2 * i) as f64 / hd as f64) / factors[i] as f64;
                let a = pos as f64 * freq;
                assert!((cos[pos * hd / 2 + i] as f64 - a.cos()).abs() < 1e-6);
                assert!((sin[pos * hd / 2 + i] as f64 - a.sin()).abs() < 1e-6);
            }
        }
        let m = tiny(RopeStyle::HalfSplit, true);
        let toks = [1u32, 4, 2, 9, 3, 7];
        let plain = m.forward(&toks).unwrap();
        let mut ones = m.clone();
        ones.config.rope_freq_factors = vec![1.0; m.config.head_dim / 2];
        assert_eq!(ones.forward(&toks).unwrap(), plain);
        let mut scaled = m.clone();
        scaled.config.rope_freq_factors = vec![1.0, 4.0];
        assert_ne!(scaled.forward(&toks).unwrap(), plain);
        for bad in [vec![1.0], vec![1.0, 0.0]] {
            let mut c = m.config.clone();
            c.rope_freq_factors = bad;
            let e = c.validate(Path::new("cfg")).unwrap_err().to_string();
            assert!(
                e.contains("RoPE frequency factor") && e.contains("cfg"),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let m = tiny(RopeStyle::AdjacentPairs, true);
        assert!(matches!(
            m.forward(&[1, 11]),
            Err(Error::TokenOutOfRange { id: 11, .. })
        ));
        assert!(m.forward(&[]).is_err());
        let bad = ForwardRecord::default();
        let opts = ForwardOptions {
            intervention: Intervention {
                frozen: Some(&bad),
                mlp_out: None,
                mlp_fn: None,
                patterns_only: false,
            },
            ..Default::default()
        };
        assert!(matches!(
            m.forward_with(&[1, 2], &opts),
            Err(Error::Shape { .. })
        ));
        let mut broken = m.clone();
        broken.layers[1].wk.pop();
        let e = broken.validate(Path::new("x.bin")).unwrap_err();
        assert!(e.to_string().contains("layers.1.wk"), "{e}");
    }
}

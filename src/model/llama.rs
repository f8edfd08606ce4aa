//! The Llama-family transformer, run on the CPU over a whole prompt at once.
//!
//! This is the forward pass the engine caches activations from and computes attribution graphs through:
//! RMSNorm, rotary position embeddings (adjacent-pair or half-split convention, chosen by the loader),
//! grouped-query causal attention, a SwiGLU MLP and a tied or separate unembedding. It runs the full sequence
//! in one go (no KV cache), with every projection a batched GEMM over all positions.
//!
//! Two things make it usable for interpretability work:
//! - **hooks** ([`Hooks`]): per layer it can record `resid_pre`, `resid_mid`, `mlp_in_normed`, `mlp_out`, the
//!   attention patterns and the norm scales (`1/rms` per position of the attention norm, the MLP norm and the
//!   final norm), each only when asked for, into a [`ForwardRecord`];
//! - **interventions** ([`Intervention`]): the same forward can run with the attention patterns and the norm
//!   scales frozen to the values of an earlier record (so that the model becomes linear in the residual
//!   stream between MLPs) and with the MLP outputs replaced by given values (as a replacement model does).
//!
//! Layouts: all activations are token-major, `[n_tokens, width]` row-major; weight matrices are `(out, in)`
//! row-major, as in PyTorch, llama2.c and GGUF; an attention pattern is `[n_heads, n_tokens, n_tokens]`,
//! `pattern[h][t][s]` the weight query position `t` gives key position `s` (zero for `s > t`).

use std::path::Path;

use rayon::prelude::*;

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

/// Which intermediate values a forward records. `Default` records nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hooks {
    pub resid_pre: bool,
    pub resid_mid: bool,
    pub mlp_in_normed: bool,
    pub mlp_out: bool,
    pub attn_pattern: bool,
    /// `1/rms` per position of the attention norm, the MLP norm and the final norm.
    pub norm_scales: bool,
}

impl Hooks {
    /// Records everything.
    pub fn all() -> Self {
        Hooks {
            resid_pre: true,
            resid_mid: true,
            mlp_in_normed: true,
            mlp_out: true,
            attn_pattern: true,
            norm_scales: true,
        }
    }

    /// Records what an intervention needs to freeze the nonlinearities: attention patterns and norm scales.
    pub fn frozen_state() -> Self {
        Hooks {
            attn_pattern: true,
            norm_scales: true,
            ..Hooks::default()
        }
    }
}

/// Which positions get logits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Logits {
    /// Every position: `[n_tokens, vocab_size]`.
    #[default]
    All,
    /// The last position only: `[vocab_size]` (generation).
    Last,
    /// None: skip the unembedding (activation caching).
    None,
}

/// What one block recorded; a field is `Some` exactly when its hook was on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerRecord {
    /// Residual stream entering the block, `[n_tokens, d_model]`.
    pub resid_pre: Option<Vec<f32>>,
    /// `resid_pre` + attention output, `[n_tokens, d_model]`.
    pub resid_mid: Option<Vec<f32>>,
    /// RMSNorm(`resid_mid`) × MLP norm weight: the MLP input, `[n_tokens, d_model]`.
    pub mlp_in_normed: Option<Vec<f32>>,
    /// The MLP output added to the residual stream, `[n_tokens, d_model]`.
    pub mlp_out: Option<Vec<f32>>,
    /// Softmax attention weights, `[n_heads, n_tokens, n_tokens]` (zero above the diagonal).
    pub attn_pattern: Option<Vec<f32>>,
    /// `1/rms` of `resid_pre` per position (attention norm), `[n_tokens]`.
    pub attn_norm_scale: Option<Vec<f32>>,
    /// `1/rms` of `resid_mid` per position (MLP norm), `[n_tokens]`.
    pub mlp_norm_scale: Option<Vec<f32>>,
}

/// Everything a forward recorded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForwardRecord {
    /// One entry per block.
    pub layers: Vec<LayerRecord>,
    /// `1/rms` of the final residual stream per position, `[n_tokens]` (with the `norm_scales` hook).
    pub final_norm_scale: Option<Vec<f32>>,
}

/// Changes to the computation, for linearised and replacement-model forwards.
///
/// - `frozen`: an earlier record (made with at least [`Hooks::frozen_state`] on the same tokens) whose
///   attention patterns and norm scales are used instead of being recomputed; every attention norm, MLP norm,
///   the final norm and every softmax then become fixed linear maps.
/// - `mlp_out`: per layer, `[n_tokens, d_model]` values that replace the MLP's output (the MLP is not run).
/// - `mlp_fn`: computes each layer's MLP output from that layer's inputs instead (a replacement model whose
///   features respond to the stream, as in feature interventions); `mlp_out` wins when both are given.
#[derive(Clone, Copy, Debug, Default)]
pub struct Intervention<'a> {
    pub frozen: Option<&'a ForwardRecord>,
    pub mlp_out: Option<&'a [Vec<f32>]>,
    pub mlp_fn: Option<&'a dyn MlpOverride>,
}

/// A replacement for the MLPs, called once per layer in order during a forward.
pub trait MlpOverride: Sync + std::fmt::Debug {
    /// The MLP output `[n_tokens, d_model]` of `layer`, given the residual stream before the MLP
    /// (`resid_mid`) and the MLP's normed input, both `[n_tokens, d_model]`.
    fn mlp_out(&self, layer: usize, resid_mid: &[f32], normed: &[f32]) -> Vec<f32>;
}

/// Options of [`LlamaModel::forward_with`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardOptions<'a> {
    pub hooks: Hooks,
    pub logits: Logits,
    pub intervention: Intervention<'a>,
}

/// The result of a forward.
#[derive(Clone, Debug, Default)]
pub struct ForwardOutput {
    pub n_tokens: usize,
    /// `[n_tokens, vocab]`, `[vocab]` or empty, per [`Logits`].
    pub logits: Vec<f32>,
    /// The residual stream after the last block, `[n_tokens, d_model]` (before the final norm).
    pub resid_final: Vec<f32>,
    pub record: ForwardRecord,
}

/// `out[m, n] = x[m, k] · wᵀ` with `w` `(n, k)` row-major; `out` is overwritten.
pub fn matmul_wt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    let work = m * n * k;
    let parallelism = if work >= 1 << 18 && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assertion above guarantees every index the strides describe is inside the slices:
    // dst (m, n) with row stride n, lhs (m, k) with row stride k, rhs = wᵀ (k, n) read as w[j * k + p];
    // `out` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// RMSNorm of each row of `x` (`[rows, d]`) into `out`, with weight `w`; returns or uses `1/rms` per row.
/// When `frozen` is given its scales are used instead of being computed.
fn rms_norm(
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

/// Cosine and sine tables `[n, head_dim/2]` for rotary embeddings.
fn rope_tables(n: usize, head_dim: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for pos in 0..n {
        for i in 0..half {
            let freq = 1.0 / (theta as f64).powf((2 * i) as f64 / head_dim as f64);
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
        let n = tokens.len();
        if n == 0 {
            return Err(Error::Unsupported("a forward over zero tokens".into()));
        }
        if n > self.config.max_seq_len {
            return Err(Error::Unsupported(format!(
                "a sequence of {n} tokens exceeds the model's max_seq_len {}",
                self.config.max_seq_len
            )));
        }
        let x = self.embed(tokens)?;
        self.forward_embedded(x, opts)
    }

    /// The forward from given input embeddings `[n_tokens, d_model]` (e.g. [`LlamaModel::embed`]'s).
    pub fn forward_embedded(
        &self,
        mut x: Vec<f32>,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        let c = &self.config;
        let d = c.d_model;
        if x.is_empty() || !x.len().is_multiple_of(d) {
            return Err(Error::Shape {
                what: "input embeddings".into(),
                expected: vec![x.len() / d.max(1), d],
                got: vec![x.len()],
            });
        }
        let n = x.len() / d;
        check_intervention(n, c.n_layers, c.n_heads, d, &opts.intervention)?;
        let hooks = opts.hooks;
        let frozen = opts.intervention.frozen;
        let (cos, sin) = rope_tables(n, c.head_dim, c.rope_theta);

        let mut normed = vec![0.0f32; n * d];
        let mut q = vec![0.0f32; n * c.q_dim()];
        let mut k = vec![0.0f32; n * c.kv_dim()];
        let mut v = vec![0.0f32; n * c.kv_dim()];
        let mut attn = vec![0.0f32; n * c.q_dim()];
        let mut proj = vec![0.0f32; n * d];
        let mut gate = vec![0.0f32; n * c.hidden_dim];
        let mut up = vec![0.0f32; n * c.hidden_dim];
        let mut record = ForwardRecord::default();

        for (l, w) in self.layers.iter().enumerate() {
            let mut rec = LayerRecord::default();
            let fl = frozen.map(|f| &f.layers[l]);
            if hooks.resid_pre {
                rec.resid_pre = Some(x.clone());
            }
            // Attention.
            let s = rms_norm(
                &x,
                d,
                &w.attn_norm,
                c.norm_eps,
                fl.and_then(|f| f.attn_norm_scale.as_deref()),
                &mut normed,
            );
            if hooks.norm_scales {
                rec.attn_norm_scale = Some(s);
            }
            matmul_wt(&normed, n, d, &w.wq, c.q_dim(), &mut q);
            matmul_wt(&normed, n, d, &w.wk, c.kv_dim(), &mut k);
            matmul_wt(&normed, n, d, &w.wv, c.kv_dim(), &mut v);
            apply_rope(&mut q, c.n_heads, c.head_dim, c.rope_style, &cos, &sin);
            apply_rope(&mut k, c.n_kv_heads, c.head_dim, c.rope_style, &cos, &sin);
            let pattern = causal_attention(
                n,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                &q,
                &k,
                &v,
                fl.and_then(|f| f.attn_pattern.as_deref()),
                hooks.attn_pattern,
                &mut attn,
            );
            rec.attn_pattern = pattern;
            matmul_wt(&attn, n, c.q_dim(), &w.wo, d, &mut proj);
            for (xi, pi) in x.iter_mut().zip(&proj) {
                *xi += pi;
            }
            if hooks.resid_mid {
                rec.resid_mid = Some(x.clone());
            }
            // MLP.
            let s = rms_norm(
                &x,
                d,
                &w.mlp_norm,
                c.norm_eps,
                fl.and_then(|f| f.mlp_norm_scale.as_deref()),
                &mut normed,
            );
            if hooks.norm_scales {
                rec.mlp_norm_scale = Some(s);
            }
            if hooks.mlp_in_normed {
                rec.mlp_in_normed = Some(normed.clone());
            }
            let replaced;
            let mlp_out: &[f32] = match (opts.intervention.mlp_out, opts.intervention.mlp_fn) {
                (Some(repl), _) => &repl[l],
                (None, Some(f)) => {
                    replaced = f.mlp_out(l, &x, &normed);
                    if replaced.len() != n * d {
                        return Err(Error::Shape {
                            what: format!("mlp_fn output of layer {l}"),
                            expected: vec![n, d],
                            got: vec![replaced.len()],
                        });
                    }
                    &replaced
                }
                (None, None) => {
                    matmul_wt(&normed, n, d, &w.w_gate, c.hidden_dim, &mut gate);
                    matmul_wt(&normed, n, d, &w.w_up, c.hidden_dim, &mut up);
                    for (g, u) in gate.iter_mut().zip(&up) {
                        *g = silu(*g) * u;
                    }
                    matmul_wt(&gate, n, c.hidden_dim, &w.w_down, d, &mut proj);
                    &proj
                }
            };
            for (xi, mi) in x.iter_mut().zip(mlp_out) {
                *xi += mi;
            }
            if hooks.mlp_out {
                rec.mlp_out = Some(mlp_out.to_vec());
            }
            record.layers.push(rec);
        }

        // Final norm and unembedding.
        let final_frozen = frozen.and_then(|f| f.final_norm_scale.as_deref());
        let s = rms_norm(
            &x,
            d,
            &self.final_norm,
            c.norm_eps,
            final_frozen,
            &mut normed,
        );
        if hooks.norm_scales {
            record.final_norm_scale = Some(s);
        }
        let logits = unembed(&normed, n, d, self.unembedding(), c.vocab_size, opts.logits);
        Ok(ForwardOutput {
            n_tokens: n,
            logits,
            resid_final: x,
            record,
        })
    }
}

/// Checks an intervention fits a forward over `n` tokens of a model with these sizes.
/// The logits of the positions `mode` asks for: the final-normed stream `[n, d]` times the unembedding
/// `[vocab, d]` transposed.
pub(crate) fn unembed(
    normed: &[f32],
    n: usize,
    d: usize,
    unembedding: &[f32],
    vocab: usize,
    mode: Logits,
) -> Vec<f32> {
    let rows = match mode {
        Logits::All => 0..n,
        Logits::Last => n - 1..n,
        Logits::None => n..n,
    };
    let m = rows.len();
    let mut logits = vec![0.0f32; m * vocab];
    if m > 0 {
        matmul_wt(
            &normed[rows.start * d..rows.end * d],
            m,
            d,
            unembedding,
            vocab,
            &mut logits,
        );
    }
    logits
}

pub(crate) fn check_intervention(
    n: usize,
    n_layers: usize,
    n_heads: usize,
    d_model: usize,
    iv: &Intervention<'_>,
) -> Result<()> {
    let shape = |what: String, expected: Vec<usize>, got: usize| Error::Shape {
        what,
        expected,
        got: vec![got],
    };
    if let Some(f) = iv.frozen {
        if f.layers.len() != n_layers {
            return Err(shape(
                "frozen record layers".into(),
                vec![n_layers],
                f.layers.len(),
            ));
        }
        let final_len = f.final_norm_scale.as_ref().map_or(0, Vec::len);
        if final_len != n {
            return Err(shape("frozen final_norm_scale".into(), vec![n], final_len));
        }
        for (l, r) in f.layers.iter().enumerate() {
            let p = r.attn_pattern.as_ref().map_or(0, Vec::len);
            if p != n_heads * n * n {
                return Err(shape(
                    format!("frozen attn_pattern of layer {l}"),
                    vec![n_heads, n, n],
                    p,
                ));
            }
            for (name, s) in [
                ("attn_norm_scale", &r.attn_norm_scale),
                ("mlp_norm_scale", &r.mlp_norm_scale),
            ] {
                let len = s.as_ref().map_or(0, Vec::len);
                if len != n {
                    return Err(shape(format!("frozen {name} of layer {l}"), vec![n], len));
                }
            }
        }
    }
    if let Some(m) = iv.mlp_out {
        if m.len() != n_layers {
            return Err(shape(
                "mlp_out replacement layers".into(),
                vec![n_layers],
                m.len(),
            ));
        }
        for (l, r) in m.iter().enumerate() {
            if r.len() != n * d_model {
                return Err(shape(
                    format!("mlp_out replacement of layer {l}"),
                    vec![n, d_model],
                    r.len(),
                ));
            }
        }
    }
    Ok(())
}

/// Causal grouped-query attention: writes the concatenated head outputs `[n, q_dim]` into `out`;
/// uses `frozen` (`[n_heads, n, n]`) as the pattern when given; returns the pattern when `record`.
pub(crate) fn causal_attention(
    n: usize,
    n_heads: usize,
    n_kv_heads: usize,
    hd: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    frozen: Option<&[f32]>,
    record: bool,
    out: &mut [f32],
) -> Option<Vec<f32>> {
    let (qd, kvd) = (n_heads * hd, n_kv_heads * hd);
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // Per head: pattern [n, n] and output [n, hd].
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..n_heads)
        .into_par_iter()
        .map(|h| {
            let kvh = h / group;
            let mut pat = vec![0.0f32; n * n];
            match frozen {
                Some(f) => pat.copy_from_slice(&f[h * n * n..(h + 1) * n * n]),
                None => {
                    for t in 0..n {
                        let qt = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
                        let row = &mut pat[t * n..t * n + t + 1];
                        let mut max = f32::NEG_INFINITY;
                        for (s, r) in row.iter_mut().enumerate() {
                            let ks = &k[s * kvd + kvh * hd..s * kvd + (kvh + 1) * hd];
                            let dot: f32 = qt.iter().zip(ks).map(|(a, b)| a * b).sum();
                            *r = dot * scale;
                            max = max.max(*r);
                        }
                        let mut sum = 0.0f32;
                        for r in row.iter_mut() {
                            *r = (*r - max).exp();
                            sum += *r;
                        }
                        for r in row.iter_mut() {
                            *r /= sum;
                        }
                    }
                }
            }
            let mut o = vec![0.0f32; n * hd];
            for t in 0..n {
                let ot = &mut o[t * hd..(t + 1) * hd];
                for s in 0..=t {
                    let p = pat[t * n + s];
                    let vs = &v[s * kvd + kvh * hd..s * kvd + (kvh + 1) * hd];
                    for (oi, vi) in ot.iter_mut().zip(vs) {
                        *oi += p * vi;
                    }
                }
            }
            (pat, o)
        })
        .collect();
    let mut patterns = record.then(|| Vec::with_capacity(n_heads * n * n));
    for (h, (pat, o)) in per_head.into_iter().enumerate() {
        for t in 0..n {
            out[t * qd + h * hd..t * qd + (h + 1) * hd].copy_from_slice(&o[t * hd..(t + 1) * hd]);
        }
        if let Some(p) = patterns.as_mut() {
            p.extend_from_slice(&pat);
        }
    }
    patterns
}

/// Index of the first largest value (NaN never wins).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] || x[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Softmax of `x` in f64 for reporting probabilities.
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = x.iter().map(|&v| ((v - max) as f64).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|&v| (v / sum) as f32).collect()
}

impl super::CausalLm for LlamaModel {
    fn max_seq_len(&self) -> usize {
        self.config.max_seq_len
    }

    fn forward_with(&self, tokens: &[u32], opts: &ForwardOptions<'_>) -> Result<ForwardOutput> {
        LlamaModel::forward_with(self, tokens, opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CausalLm;

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
    fn matmul_matches_naive() {
        let (m, k, n) = (5, 7, 3);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut out = vec![0.0; m * n];
        matmul_wt(&x, m, k, &w, n, &mut out);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
                assert!((out[i * n + j] - want).abs() < 1e-5);
            }
        }
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
            let p = l0.attn_pattern.as_ref().unwrap();
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

//! The forward pass both architectures share, and what it takes and returns.
//!
//! `run_blocks` is the per-layer loop of every model: per block, the attention norm, the attention and its
//! residual add, then the MLP norm, the MLP (or its replacement) and its residual add, with the hooks
//! recorded and the interventions applied in one place; then the final norm and the unembedding. An
//! architecture supplies its norms and its blocks' arithmetic through `Blocks` (`llama.rs`: RMSNorm,
//! rotary grouped-query attention, SwiGLU; `gpt2.rs`: LayerNorm, attention with biases, GELU;
//! `gemma2.rs`: Llama's block plus norms after the attention and the MLP, soft-capped attention scores and
//! logits, sliding-window layers).
//!
//! Beside it: the hooks ([`Hooks`]) and what they record ([`ForwardRecord`]), the interventions
//! ([`Intervention`]: frozen attention patterns and norm scales, replaced MLP outputs, an MLP override),
//! and the kernels both architectures use (the GEMM, causal attention, the unembedding).
//!
//! Layouts: all activations are token-major, `[n_tokens, width]` row-major; weight matrices are `(out, in)`
//! row-major, as in PyTorch, llama2.c and GGUF; an attention pattern is an [`AttnPattern`], `P[h][t][s]` the
//! weight query position `t` gives key position `s` (zero for `s > t`), stored as the tiles of its lower
//! triangle.

use rayon::prelude::*;

use super::kv::{KvCache, LayerKv, cached_attention};
use super::pattern::{AttnPattern, block_matmul, block_start, tile_for};
use crate::backend::cpu::gemm::{Mat, Threads, matmul};
use crate::{Error, Result};

/// Which intermediate values a forward records. `Default` records nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hooks {
    pub resid_pre: bool,
    pub resid_mid: bool,
    pub mlp_in_normed: bool,
    pub mlp_in_unweighted: bool,
    pub mlp_out: bool,
    pub attn_pattern: bool,
    /// The norms' scales per position (`1/rms` for RMSNorm, `1/σ` for LayerNorm) of the attention norm, the
    /// MLP norm, the final norm, and the norms after the attention and the MLP where the model has them.
    pub norm_scales: bool,
}

impl Hooks {
    /// Records everything.
    pub fn all() -> Self {
        Hooks {
            resid_pre: true,
            resid_mid: true,
            mlp_in_normed: true,
            mlp_in_unweighted: true,
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
    /// The MLP norm of `resid_mid` (its weight, and its bias if it has one, applied): the MLP input,
    /// `[n_tokens, d_model]`.
    pub mlp_in_normed: Option<Vec<f32>>,
    /// The MLP norm of `resid_mid` without its weight (or bias): `resid_mid / rms` for RMSNorm,
    /// `(resid_mid − mean) / σ` for LayerNorm (TransformerLens's `ln2.hook_normalized` on RMSNorm models),
    /// `[n_tokens, d_model]`.
    pub mlp_in_unweighted: Option<Vec<f32>>,
    /// The MLP output added to the residual stream (after the post-MLP norm where the model has one),
    /// `[n_tokens, d_model]`.
    pub mlp_out: Option<Vec<f32>>,
    /// Softmax attention weights, `[n_heads, n_tokens, n_tokens]` (zero above the diagonal), as lower-triangular
    /// tiles ([`AttnPattern::to_dense`] gives the dense array).
    pub attn_pattern: Option<AttnPattern>,
    /// The attention norm's scale of `resid_pre` per position (`1/rms` or `1/σ`), `[n_tokens]`.
    pub attn_norm_scale: Option<Vec<f32>>,
    /// The MLP norm's scale of `resid_mid` per position, `[n_tokens]`.
    pub mlp_norm_scale: Option<Vec<f32>>,
    /// The scale per position of the norm applied to the attention output before its residual add
    /// (Gemma-2's `post_attention_layernorm`), `[n_tokens]`; `None` for models without one.
    pub attn_post_norm_scale: Option<Vec<f32>>,
    /// The scale per position of the norm applied to the MLP output before its residual add (Gemma-2's
    /// `post_feedforward_layernorm`), `[n_tokens]`; `None` for models without one, and when the MLP was
    /// replaced (the replacement stands for the MLP and its norm).
    pub mlp_post_norm_scale: Option<Vec<f32>>,
}

/// Everything a forward recorded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForwardRecord {
    /// One entry per block.
    pub layers: Vec<LayerRecord>,
    /// The final norm's scale of the last residual stream per position, `[n_tokens]` (with the
    /// `norm_scales` hook).
    pub final_norm_scale: Option<Vec<f32>>,
}

/// Changes to the computation, for linearised and replacement-model forwards.
///
/// - `frozen`: an earlier record (made with at least [`Hooks::frozen_state`] on the same tokens) whose
///   attention patterns and norm scales are used instead of being recomputed; every attention norm, MLP norm,
///   post-attention and post-MLP norm, the final norm and every softmax then become fixed linear maps.
/// - `mlp_out`: per layer, `[n_tokens, d_model]` values that replace the MLP's output, the value added to the
///   residual stream (the MLP, and its post-MLP norm where the model has one, are not run).
/// - `mlp_fn`: computes each layer's MLP output from that layer's inputs instead (a replacement model whose
///   features respond to the stream, as in feature interventions); `mlp_out` wins when both are given.
/// - `patterns_only`: with `frozen`, only its attention patterns are used (the record needs nothing
///   else); the norms run normally (circuit-tracer's `freeze_attention`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Intervention<'a> {
    pub frozen: Option<&'a ForwardRecord>,
    pub mlp_out: Option<&'a [Vec<f32>]>,
    pub mlp_fn: Option<&'a dyn MlpOverride>,
    pub patterns_only: bool,
}

/// What a layer's MLP could read, each `[n_tokens, d_model]`, handed to an [`MlpOverride`].
#[derive(Clone, Copy, Debug)]
pub struct MlpInputs<'a> {
    /// The position of the first row (past the cached positions in a [`KvCache`] forward; else 0).
    pub first_position: usize,
    /// The residual stream before the MLP's norm.
    pub resid_mid: &'a [f32],
    /// The MLP's input: the norm with its weight (and bias) applied.
    pub normed: &'a [f32],
    /// The norm without its weight or bias ([`LayerRecord::mlp_in_unweighted`]).
    pub unweighted: &'a [f32],
    /// The model's own MLP output for these rows (after its post-MLP norm where it has one), when
    /// [`MlpOverride::wants_model_mlp`] asked for it.
    pub model_mlp: Option<&'a [f32]>,
}

/// A replacement for the MLPs, called once per layer in order during a forward.
pub trait MlpOverride: Sync + std::fmt::Debug {
    /// The MLP output `[n_tokens, d_model]` of `layer`, given what the MLP could read.
    fn mlp_out(&self, layer: usize, inputs: &MlpInputs<'_>) -> Vec<f32>;

    /// Whether [`mlp_out`](Self::mlp_out) needs the model's own MLP output ([`MlpInputs::model_mlp`]) for
    /// the `n` rows from `first_position`; the forward then runs the MLP too.
    fn wants_model_mlp(&self, first_position: usize, n: usize) -> bool {
        let _ = (first_position, n);
        false
    }
}

/// Options of a forward ([`crate::model::LlamaModel::forward_with`], [`crate::model::Gpt2Model::forward_with`]).
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

/// Checks a forward over `n` new tokens after `past` cached ones fits a model that accepts `max_seq_len`.
pub(crate) fn check_length(n: usize, past: usize, max_seq_len: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Unsupported("a forward over zero tokens".into()));
    }
    if past + n > max_seq_len {
        let what = if past == 0 {
            format!("a sequence of {n} tokens")
        } else {
            format!("{n} tokens after {past} cached ones")
        };
        return Err(Error::Unsupported(format!(
            "{what} exceeds the model's max_seq_len {max_seq_len}"
        )));
    }
    Ok(())
}

/// Checks an intervention fits a forward over `n` tokens of a model with these sizes.
pub(crate) fn check_intervention(n: usize, dims: &Dims, iv: &Intervention<'_>) -> Result<()> {
    let Dims {
        n_layers,
        d_model,
        n_heads,
        post_norms,
        ..
    } = *dims;
    // The MLPs run (and need their post-norm scales) unless a replacement stands for them.
    let mlp_runs = iv.mlp_out.is_none() && iv.mlp_fn.is_none();
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
        if final_len != n && !iv.patterns_only {
            return Err(shape("frozen final_norm_scale".into(), vec![n], final_len));
        }
        for (l, r) in f.layers.iter().enumerate() {
            let dims = r
                .attn_pattern
                .as_ref()
                .map_or(vec![0, 0], |p| vec![p.n_heads(), p.n()]);
            if dims != [n_heads, n] {
                return Err(Error::Shape {
                    what: format!("frozen attn_pattern of layer {l} (heads, positions)"),
                    expected: vec![n_heads, n],
                    got: dims,
                });
            }
            let scales = [
                ("attn_norm_scale", &r.attn_norm_scale, true),
                ("mlp_norm_scale", &r.mlp_norm_scale, true),
                ("attn_post_norm_scale", &r.attn_post_norm_scale, post_norms),
                (
                    "mlp_post_norm_scale",
                    &r.mlp_post_norm_scale,
                    post_norms && mlp_runs,
                ),
            ];
            let scales = scales.into_iter().filter(|_| !iv.patterns_only);
            for (name, s, _) in scales.filter(|&(_, _, needed)| needed) {
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

/// How attention scores are formed and which keys a query sees.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AttnScores {
    /// The factor of `q · k` (`1/sqrt(head_dim)`, Gemma-2's `query_pre_attn_scalar^-1/2`).
    pub scale: f32,
    /// Scores become `cap · tanh(score / cap)` before the softmax (Gemma-2's `attn_logit_softcapping`).
    pub softcap: Option<f32>,
    /// Query `t` sees key `s` only when `t − s < window` (sliding-window layers).
    pub window: Option<usize>,
}

impl AttnScores {
    /// The first key query position `t` sees (it sees `first_key(t)..=t`).
    pub fn first_key(&self, t: usize) -> usize {
        self.window.map_or(0, |w| (t + 1).saturating_sub(w.max(1)))
    }

    /// `q · k / sqrt(head_dim)` over every earlier position.
    pub fn plain(head_dim: usize) -> Self {
        AttnScores {
            scale: 1.0 / (head_dim as f32).sqrt(),
            softcap: None,
            window: None,
        }
    }
}

/// `cap · tanh(x / cap)`: Gemma-2's soft capping of attention scores and logits.
pub(crate) fn softcap(x: f32, cap: f32) -> f32 {
    (x / cap).tanh() * cap
}

/// Causal grouped-query attention: writes the concatenated head outputs `[n, q_dim]` into `out`;
/// uses `frozen` as the pattern when given; returns the pattern when `record`.
///
/// Heads run in parallel; within a head, a row block of [`super::pattern::TILE`] queries at a time: its scores
/// against every earlier key block (one product per tile), the mask, soft cap and softmax of each row, then
/// its output `P·V` (one product per tile). Without `record` or `frozen`, a head holds only the row block it
/// is on, so attention over `n` tokens needs `O(n)` memory, not `O(n²)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_attention(
    n: usize,
    n_heads: usize,
    n_kv_heads: usize,
    hd: usize,
    scores: AttnScores,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    frozen: Option<&AttnPattern>,
    record: bool,
    out: &mut [f32],
) -> Option<AttnPattern> {
    let (qd, kvd) = (n_heads * hd, n_kv_heads * hd);
    let group = n_heads / n_kv_heads;
    let mut pattern = (record && frozen.is_none()).then(|| AttnPattern::zeros(n_heads, n));
    let tl = tile_for(n);
    let blocks = n.div_ceil(tl);
    // Each head's tiles: in the pattern it records, or (with nothing to keep) in one row block's worth of
    // scratch; none with a frozen pattern.
    let mut scratch: Vec<f32>;
    let heads: Vec<&mut [f32]> = match (pattern.as_mut(), frozen) {
        (Some(p), _) => p.heads_mut().collect(),
        (None, Some(_)) => (0..n_heads).map(|_| <&mut [f32]>::default()).collect(),
        (None, None) => {
            scratch = vec![0.0f32; n_heads * blocks * tl * tl];
            scratch.chunks_mut((blocks * tl * tl).max(1)).collect()
        }
    };
    let per_head: Vec<Vec<f32>> = heads
        .into_par_iter()
        .enumerate()
        .map(|(h, store)| {
            let kvh = h / group;
            let mut o = vec![0.0f32; n * hd];
            let vm = Mat::strided(&v[kvh * hd..], n, hd, kvd);
            if let Some(f) = frozen {
                f.head(h).matmul(vm, &mut o, hd);
                return o;
            }
            for i in 0..blocks {
                // Row block i's tiles: where the pattern keeps them, or the start of the scratch.
                let start = if record { block_start(i) * tl * tl } else { 0 };
                let block = &mut store[start..start + (i + 1) * tl * tl];
                softmax_block(i, tl, n, hd, (h, kvh), (qd, kvd), scores, q, k, block);
                block_matmul(block, i, first_tile(scores, i, tl), tl, n, vm, &mut o, hd);
            }
            o
        })
        .collect();
    for (h, o) in per_head.iter().enumerate() {
        for (t, ot) in o.chunks_exact(hd.max(1)).enumerate() {
            out[t * qd + h * hd..t * qd + (h + 1) * hd].copy_from_slice(ot);
        }
    }
    if let Some(p) = pattern.as_mut() {
        p.find_leading_zeros();
    }
    if record {
        pattern.or_else(|| frozen.cloned())
    } else {
        None
    }
}

/// The first key tile row block `i` (queries `i·tl..`) sees: the tile of its first query's first key (later
/// queries' windows start later). Earlier tiles lie wholly outside every window of the block.
fn first_tile(scores: AttnScores, i: usize, tl: usize) -> usize {
    scores.first_key(i * tl) / tl.max(1)
}

/// The softmax weights of row block `i` (queries `i·tl..`) of head `h` (key/value head `kvh`) into its
/// `(i + 1)` tiles of `tl × tl` in `block`: scores `q·k` times the scale (one product per tile), soft-capped
/// where the model caps them, keys after the query or outside its window masked, each row's softmax.
#[allow(clippy::too_many_arguments)]
fn softmax_block(
    i: usize,
    tl: usize,
    n: usize,
    hd: usize,
    (h, kvh): (usize, usize),
    (qd, kvd): (usize, usize),
    scores: AttnScores,
    q: &[f32],
    k: &[f32],
    block: &mut [f32],
) {
    let AttnScores {
        scale,
        softcap: cap,
        ..
    } = scores;
    let rows = tl.min(n - i * tl);
    // Key tiles wholly before the block's first query's window get no scores: the mask below zeroes them.
    for j in first_tile(scores, i, tl)..=i {
        let cols = tl.min(n - j * tl);
        matmul(
            &mut block[j * tl * tl..],
            tl,
            Mat::strided(&q[i * tl * qd + h * hd..], rows, hd, qd),
            Mat::strided(&k[j * tl * kvd + kvh * hd..], cols, hd, kvd).t(),
            0.0,
            scale,
            Threads::One,
        );
    }
    for r in 0..rows {
        let t = i * tl + r;
        // The keys query t sees: s in first..=t.
        let first = scores.first_key(t);
        let seen = |s: usize| s >= first && s <= t;
        let mut max = f32::NEG_INFINITY;
        for j in 0..=i {
            let cols = tl.min(n - j * tl);
            for (c, x) in block[j * tl * tl + r * tl..][..tl].iter_mut().enumerate() {
                let s = j * tl + c;
                if c < cols && seen(s) {
                    if let Some(cap) = cap {
                        *x = softcap(*x, cap);
                    }
                    max = max.max(*x);
                } else {
                    *x = 0.0;
                }
            }
        }
        let mut sum = 0.0f32;
        for j in 0..=i {
            for (c, x) in block[j * tl * tl + r * tl..][..tl].iter_mut().enumerate() {
                if seen(j * tl + c) && c < tl.min(n - j * tl) {
                    *x = (*x - max).exp();
                    sum += *x;
                }
            }
        }
        for j in 0..=i {
            for x in &mut block[j * tl * tl + r * tl..][..tl] {
                *x /= sum;
            }
        }
    }
    // The padding rows of the last block (past n) stay zero.
    for j in 0..=i {
        block[j * tl * tl + rows * tl..(j + 1) * tl * tl].fill(0.0);
    }
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

/// Which norm of the model [`Blocks::norm`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Norm {
    /// Before layer `l`'s attention.
    Attn(usize),
    /// Before layer `l`'s MLP.
    Mlp(usize),
    /// On layer `l`'s attention output, before its residual add (only with [`Dims::post_norms`]).
    PostAttn(usize),
    /// On layer `l`'s MLP output, before its residual add (only with [`Dims::post_norms`]).
    PostMlp(usize),
    /// After the last block.
    Final,
}

/// How a model normalises (each frozen the same way: the scale recorded, the rest linear).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// `γ ⊙ x / rms(x)`.
    Rms,
    /// `γ ⊙ (x − mean(x)) / σ(x) + β`.
    Layer,
}

impl NormKind {
    /// The norm of each row of `x` (`[n, d]`) with its scale `s` (`[n]`, `1/rms` or `1/σ`) and without
    /// its weight or bias: `x · s`, or `(x − mean(x)) · s`.
    pub fn unweighted(self, x: &[f32], s: &[f32], d: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len());
        for (row, &s) in x.chunks_exact(d).zip(s) {
            let mean = match self {
                NormKind::Rms => 0.0,
                NormKind::Layer => row.iter().sum::<f32>() / d as f32,
            };
            out.extend(row.iter().map(|v| (v - mean) * s));
        }
        out
    }
}

/// The sizes [`run_blocks`] checks inputs against.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub vocab_size: usize,
    /// Whether the attention and MLP outputs are normed before their residual adds
    /// ([`Norm::PostAttn`], [`Norm::PostMlp`]).
    pub post_norms: bool,
    pub norm: NormKind,
}

/// What an architecture supplies to [`run_blocks`]: its norms and its blocks' attention and MLP.
pub(crate) trait Blocks {
    /// The buffers a forward over some number of tokens reuses from block to block.
    type Scratch;

    fn dims(&self) -> Dims;

    /// Buffers for a forward over the `n` tokens at positions `first..first + n`.
    fn scratch(&self, n: usize, first: usize) -> Self::Scratch;

    /// The width of one position's keys (and values) in a layer: key/value heads × head size.
    fn kv_width(&self) -> usize;

    /// Normalises each row of `x` (`[n, d]`) into `out` with `which` norm's weights; returns the scale of
    /// each row, or uses `frozen`'s when given.
    fn norm(&self, which: Norm, x: &[f32], frozen: Option<&[f32]>, out: &mut [f32]) -> Vec<f32>;

    /// Layer `l`'s attention of the normed stream `[n, d]`, projected back into `out` (`[n, d]`, the
    /// residual stream's update): with the pattern `frozen` when given; returns the pattern when `record`.
    /// With `kv`, the new positions' keys and values are appended to it and the queries attend over all of
    /// them ([`attend_over`]; `frozen` and `record` then only with an empty cache).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        l: usize,
        normed: &[f32],
        n: usize,
        frozen: Option<&AttnPattern>,
        record: bool,
        kv: Option<&mut LayerKv>,
        scratch: &mut Self::Scratch,
        out: &mut [f32],
    ) -> Option<AttnPattern>;

    /// Layer `l`'s MLP of the normed stream `[n, d]` into `out` (`[n, d]`).
    fn mlp(&self, l: usize, normed: &[f32], n: usize, scratch: &mut Self::Scratch, out: &mut [f32]);

    /// The unembedding matrix `[vocab_size, d_model]`.
    fn unembedding(&self) -> &[f32];

    /// Logits become `cap · tanh(logit / cap)` (Gemma-2's `final_logit_softcapping`).
    fn logit_softcap(&self) -> Option<f32> {
        None
    }
}

/// The forward of `model` from input embeddings `x` (`[n_tokens, d_model]`), with the hooks and the
/// interventions of `opts`.
pub(crate) fn run_blocks<B: Blocks>(
    model: &B,
    x: Vec<f32>,
    opts: &ForwardOptions<'_>,
) -> Result<ForwardOutput> {
    forward_blocks(model, x, opts, None)
}

/// [`run_blocks`] for the positions after those `cache` holds (`x`'s embeddings must be of those
/// positions), appending their keys and values; on an error the cache is left as it was.
pub(crate) fn run_blocks_cached<B: Blocks>(
    model: &B,
    x: Vec<f32>,
    opts: &ForwardOptions<'_>,
    cache: &mut KvCache,
) -> Result<ForwardOutput> {
    let mark = cache.mark();
    let out = forward_blocks(model, x, opts, Some(&mut *cache));
    if out.is_err() {
        cache.restore(mark);
    }
    out
}

/// The attention step every block shares once its queries, keys and values (`[n, ·]`) are formed: without
/// a cache [`causal_attention`]; with one, the new keys and values appended to it and the queries attending
/// over every cached position (by the tiled [`causal_attention`] when the cache was empty, the prompt's
/// forward; by [`cached_attention`] after).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_over(
    n: usize,
    (n_heads, n_kv_heads, hd): (usize, usize, usize),
    scores: AttnScores,
    (q, k, v): (&[f32], &[f32], &[f32]),
    frozen: Option<&AttnPattern>,
    record: bool,
    kv: Option<&mut LayerKv>,
    out: &mut [f32],
) -> Option<AttnPattern> {
    if let Some(c) = kv {
        let kvd = n_kv_heads * hd;
        let past = c.k.len() / kvd.max(1);
        c.k.extend_from_slice(&k[..n * kvd]);
        c.v.extend_from_slice(&v[..n * kvd]);
        if past > 0 {
            let (ck, cv) = (&c.k, &c.v);
            cached_attention(past, n, n_heads, n_kv_heads, hd, scores, q, ck, cv, out);
            return None;
        }
    }
    causal_attention(
        n, n_heads, n_kv_heads, hd, scores, q, k, v, frozen, record, out,
    )
}

fn forward_blocks<B: Blocks>(
    model: &B,
    mut x: Vec<f32>,
    opts: &ForwardOptions<'_>,
    mut cache: Option<&mut KvCache>,
) -> Result<ForwardOutput> {
    let c = model.dims();
    let d = c.d_model;
    if x.is_empty() || !x.len().is_multiple_of(d) {
        return Err(Error::Shape {
            what: "input embeddings".into(),
            expected: vec![x.len() / d.max(1), d],
            got: vec![x.len()],
        });
    }
    let n = x.len() / d;
    let hooks = opts.hooks;
    let frozen = opts.intervention.frozen;
    // The record whose norm scales are used (none when only the patterns are frozen).
    let frozen_norms = frozen.filter(|_| !opts.intervention.patterns_only);
    let past = cache.as_ref().map_or(0, |k| k.len);
    if let Some(k) = cache.as_mut() {
        if k.layers.is_empty() && k.len == 0 {
            k.layers = vec![LayerKv::default(); c.n_layers];
        }
        let width = model.kv_width();
        let fits = |l: &LayerKv| l.k.len() == past * width && l.v.len() == past * width;
        if k.layers.len() != c.n_layers || !k.layers.iter().all(fits) {
            return Err(Error::Shape {
                what: "KV cache (layers, positions × key width): a cache filled by another model?"
                    .into(),
                expected: vec![c.n_layers, past * width],
                got: vec![k.layers.len(), k.layers.first().map_or(0, |l| l.k.len())],
            });
        }
        if past > 0 && (frozen.is_some() || hooks.attn_pattern) {
            return Err(Error::Unsupported(
                "frozen or recorded attention patterns in a forward after cached positions (they \
                 cover every position: run the whole sequence without a cache)"
                    .into(),
            ));
        }
    }
    check_intervention(n, &c, &opts.intervention)?;
    let mut scratch = model.scratch(n, past);
    let mut normed = vec![0.0f32; n * d];
    let mut proj = vec![0.0f32; n * d];
    // The post-norms' output (models with `post_norms` only).
    let mut post = vec![0.0f32; if c.post_norms { n * d } else { 0 }];
    let mut record = ForwardRecord::default();

    for l in 0..c.n_layers {
        let mut rec = LayerRecord::default();
        let fl = frozen.map(|f| &f.layers[l]);
        let fnorm = frozen_norms.map(|f| &f.layers[l]);
        if hooks.resid_pre {
            rec.resid_pre = Some(x.clone());
        }
        // Attention.
        let frozen_scale = fnorm.and_then(|f| f.attn_norm_scale.as_deref());
        let s = model.norm(Norm::Attn(l), &x, frozen_scale, &mut normed);
        if hooks.norm_scales {
            rec.attn_norm_scale = Some(s);
        }
        rec.attn_pattern = model.attention(
            l,
            &normed,
            n,
            fl.and_then(|f| f.attn_pattern.as_ref()),
            hooks.attn_pattern,
            cache.as_mut().map(|k| &mut k.layers[l]),
            &mut scratch,
            &mut proj,
        );
        if c.post_norms {
            let frozen_scale = fnorm.and_then(|f| f.attn_post_norm_scale.as_deref());
            let s = model.norm(Norm::PostAttn(l), &proj, frozen_scale, &mut post);
            std::mem::swap(&mut proj, &mut post);
            if hooks.norm_scales {
                rec.attn_post_norm_scale = Some(s);
            }
        }
        for (xi, pi) in x.iter_mut().zip(&proj) {
            *xi += pi;
        }
        if hooks.resid_mid {
            rec.resid_mid = Some(x.clone());
        }
        // MLP.
        let frozen_scale = fnorm.and_then(|f| f.mlp_norm_scale.as_deref());
        let s = model.norm(Norm::Mlp(l), &x, frozen_scale, &mut normed);
        let unweighted = (hooks.mlp_in_unweighted || opts.intervention.mlp_fn.is_some())
            .then(|| c.norm.unweighted(&x, &s, d));
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
                let wants = f.wants_model_mlp(past, n);
                if wants {
                    model.mlp(l, &normed, n, &mut scratch, &mut proj);
                    if c.post_norms {
                        model.norm(Norm::PostMlp(l), &proj, None, &mut post);
                        std::mem::swap(&mut proj, &mut post);
                    }
                }
                let model_mlp = wants.then_some(proj.as_slice());
                let inputs = MlpInputs {
                    first_position: past,
                    resid_mid: &x,
                    normed: &normed,
                    unweighted: unweighted.as_deref().unwrap_or_default(),
                    model_mlp,
                };
                replaced = f.mlp_out(l, &inputs);
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
                model.mlp(l, &normed, n, &mut scratch, &mut proj);
                if c.post_norms {
                    let frozen_scale = fnorm.and_then(|f| f.mlp_post_norm_scale.as_deref());
                    let s = model.norm(Norm::PostMlp(l), &proj, frozen_scale, &mut post);
                    std::mem::swap(&mut proj, &mut post);
                    if hooks.norm_scales {
                        rec.mlp_post_norm_scale = Some(s);
                    }
                }
                &proj
            }
        };
        for (xi, mi) in x.iter_mut().zip(mlp_out) {
            *xi += mi;
        }
        if hooks.mlp_out {
            rec.mlp_out = Some(mlp_out.to_vec());
        }
        if hooks.mlp_in_unweighted {
            rec.mlp_in_unweighted = unweighted;
        }
        record.layers.push(rec);
    }
    if let Some(k) = cache {
        k.len += n;
    }

    // Final norm and unembedding.
    let frozen_scale = frozen_norms.and_then(|f| f.final_norm_scale.as_deref());
    let s = model.norm(Norm::Final, &x, frozen_scale, &mut normed);
    if hooks.norm_scales {
        record.final_norm_scale = Some(s);
    }
    let mut logits = unembed(
        &normed,
        n,
        d,
        model.unembedding(),
        c.vocab_size,
        opts.logits,
    );
    if let Some(cap) = model.logit_softcap() {
        logits.iter_mut().for_each(|v| *v = softcap(*v, cap));
    }
    Ok(ForwardOutput {
        n_tokens: n,
        logits,
        resid_final: x,
        record,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

//! The linearised backward pass of the replacement model, batched over many injected vectors, and the edge
//! weights it yields.
//!
//! With attention patterns, norm scales and MLP outputs frozen, the model is linear in the residual stream
//! (affine with GPT-2's biases, which move no edge); the weights it reads are a model's [`Linear`] view.
//! A target's row of the adjacency is one backward pass: inject the target's vector (a feature's encoder
//! direction at its input hook, or a demeaned unembedding column at the final norm's output), propagate the
//! gradient down through the frozen blocks, and at the output of every layer `k`'s MLP read off
//! - each feature source `s` of a layer `l ≤ k` whose decoder reaches `k`: `a_s · W_dec[l→k][f_s] · g_k(p_s)`
//!   (summed over `k`),
//! - each error source `(k, p)`: `error_k(p) · g_k(p)`,
//! - and below layer 0 each token `p`: `embedding(token_p) · g_emb(p)`.
//!
//! A batch of `K` targets sorted by (layer, position) runs only the positions up to its last target's and the
//! layers below its highest target (the causal cone). Feature edges are small GEMMs per (source layer,
//! position) group, `[m × d] × [d × K]`, run in parallel over the groups.

use rayon::prelude::*;

use super::linear::Linear;
use super::replacement::{PromptState, ReplacementTranscoder};
use crate::backend::cpu::gemm::{Mat, Threads, matmul};
use crate::cache::InputHook;

/// A vector entering the linearised model.
#[derive(Clone, Debug)]
pub struct Injection {
    /// `layer < L`: into the residual stream before layer `layer`'s MLP (a feature target of that layer);
    /// `layer == L`: into the final residual stream (a logit target).
    pub layer: usize,
    pub pos: usize,
    /// `[d]`, in residual-stream coordinates (see [`feature_vector`] and [`logit_vector`]).
    pub vector: Vec<f32>,
}

/// The residual-stream vector whose dot product with `resid_mid` of (`layer`, `pos`) is feature `f`'s
/// pre-activation (minus its bias), through the frozen input norm when the transcoder reads the normed input.
pub fn feature_vector(
    lin: &Linear,
    tc: &ReplacementTranscoder,
    st: &PromptState,
    layer: usize,
    pos: usize,
    f: usize,
) -> Vec<f32> {
    let d = tc.cfg.d_model;
    let w = &tc.params.w_enc[layer][f * d..(f + 1) * d];
    let mut out = vec![0.0; d];
    input_backward_add(lin, tc.input_hook, st, layer, pos, w, &mut out);
    out
}

/// `out += J_inᵀ g`: a gradient `g` on the transcoder's input at (`layer`, `pos`) taken back to
/// `resid_mid` through the frozen MLP norm (with its weight for `mlp_in_normed`, without it for
/// `mlp_in_unweighted`), or as it is (`resid_mid`).
fn input_backward_add(
    lin: &Linear,
    hook: InputHook,
    st: &PromptState,
    layer: usize,
    pos: usize,
    g: &[f32],
    out: &mut [f32],
) {
    let scale = || {
        st.record.layers[layer]
            .mlp_norm_scale
            .as_ref()
            .expect("recorded")[pos]
    };
    match hook {
        InputHook::ResidMid => out.iter_mut().zip(g).for_each(|(o, g)| *o += g),
        InputHook::MlpInNormed => {
            lin.norm_backward_add(lin.layers[layer].mlp_norm, scale(), g, out)
        }
        InputHook::MlpInUnweighted => lin.norm_backward_unweighted_add(scale(), g, out),
    }
}

/// The final residual-stream vector whose dot product gives token `v`'s demeaned logit at the last position
/// (through the frozen final norm). `mean_unembed` is the unembedding's mean over the vocabulary.
pub fn logit_vector(lin: &Linear, st: &PromptState, v: usize, mean_unembed: &[f32]) -> Vec<f32> {
    let d = lin.d_model;
    let s = st.record.final_norm_scale.as_ref().expect("recorded")[st.n - 1];
    let u = &lin.unembedding[v * d..(v + 1) * d];
    let demeaned: Vec<f32> = u.iter().zip(mean_unembed).map(|(u, m)| u - m).collect();
    lin.norm_backward(lin.final_norm, s, &demeaned)
}

/// The unembedding's mean row, `[d]` (f64 accumulation).
pub fn mean_unembedding(lin: &Linear) -> Vec<f32> {
    let d = lin.d_model;
    let mut acc = vec![0.0f64; d];
    for row in lin.unembedding.chunks_exact(d) {
        acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64);
    }
    let v = lin.vocab_size as f64;
    acc.iter().map(|a| (a / v) as f32).collect()
}

/// The column layout of an adjacency row over every source: all active features, then the error nodes
/// (layer-major), then the tokens.
#[derive(Clone, Copy, Debug)]
pub struct Columns {
    pub n_features: usize,
    pub n_layers: usize,
    pub n_pos: usize,
}

impl Columns {
    pub fn error(&self, layer: usize, pos: usize) -> usize {
        self.n_features + layer * self.n_pos + pos
    }
    pub fn token(&self, pos: usize) -> usize {
        self.n_features + self.n_layers * self.n_pos + pos
    }
    pub fn len(&self) -> usize {
        self.n_features + (self.n_layers + 1) * self.n_pos
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The rows of one backward batch, each kept only over its causal cone.
///
/// Rows are ordered by target layer, highest first, so that the rows carrying gradient at a layer (those
/// injected at or above it) are a prefix; each row keeps only positions `0..=pos` of its target (later
/// positions receive no gradient in a causal model). The gradient lives in one ragged buffer: row `r`'s
/// positions are buffer rows `off[r]..off[r + 1]`.
struct Ragged {
    /// Input index of each sorted row.
    order: Vec<usize>,
    off: Vec<usize>,
    /// Position of each buffer row.
    pos: Vec<usize>,
    /// Sorted row of each buffer row.
    row: Vec<usize>,
    /// Target layer of each sorted row (descending).
    layer: Vec<usize>,
}

impl Ragged {
    fn new(inj: &[Injection]) -> Self {
        let mut order: Vec<usize> = (0..inj.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(inj[i].layer), inj[i].pos, i));
        let mut off = vec![0];
        let (mut pos, mut row, mut layer) = (Vec::new(), Vec::new(), Vec::new());
        for (r, &i) in order.iter().enumerate() {
            for p in 0..=inj[i].pos {
                pos.push(p);
                row.push(r);
            }
            off.push(pos.len());
            layer.push(inj[i].layer);
        }
        Ragged {
            order,
            off,
            pos,
            row,
            layer,
        }
    }

    /// Rows whose target is at layer `l` or above (a prefix).
    fn rows_from(&self, l: usize) -> usize {
        self.layer.partition_point(|&x| x >= l)
    }

    fn len(&self, r: usize) -> usize {
        self.off[r + 1] - self.off[r]
    }
}

/// Computes the adjacency rows of a batch of injections: returns `[K][columns]`, row `i` the direct effect of
/// every source on injection `i`'s target, and the floating-point operations the products did.
pub fn attribute_batch(
    lin: &Linear,
    tc: &ReplacementTranscoder,
    st: &PromptState,
    inj: &[Injection],
) -> (Vec<f32>, f64) {
    let (l_n, d, n) = (lin.n_layers, lin.d_model, st.n);
    let cols = Columns {
        n_features: st.features.len(),
        n_layers: l_n,
        n_pos: n,
    };
    let k_n = inj.len();
    // Source-major output, `[columns][K]` (sorted rows), so that each (layer, position) group of features
    // owns a contiguous block; transposed into input order at the end.
    let mut out = vec![0.0f32; cols.len() * k_n];
    if k_n == 0 {
        return (out, 0.0);
    }
    let rg = Ragged::new(inj);
    let mut flops = 0.0f64;
    let total = rg.pos.len();
    let top = rg.layer[0];
    let mut g = vec![0.0f32; total * d];
    let inject = |g: &mut [f32], l: usize| {
        for r in 0..k_n {
            let v = &inj[rg.order[r]];
            if v.layer == l {
                let at = (rg.off[r] + v.pos) * d;
                g[at..at + d]
                    .iter_mut()
                    .zip(&v.vector)
                    .for_each(|(g, v)| *g += v);
            }
        }
    };
    inject(&mut g, l_n);
    let width = lin.q_dim().max(lin.kv_dim()).max(d);
    let mut scratch = Scratch {
        a: vec![0.0; total * width],
        b: vec![0.0; total * width],
    };
    for l in (0..l_n.min(top + 1)).rev() {
        // Rows injected above layer l carry gradient at its MLP output.
        let above = rg.rows_from(l + 1);
        if above > 0 {
            flops += emit_layer(tc, st, &cols, &rg, l, &g, above, k_n, &mut out);
            if tc.cfg.skip {
                skip_backward(
                    lin,
                    tc,
                    st,
                    &rg,
                    l,
                    &mut g[..rg.off[above] * d],
                    &mut scratch,
                );
            }
        }
        inject(&mut g, l);
        let from = rg.rows_from(l);
        let t = rg.off[from] as f64;
        flops += 2.0 * t * (d * lin.q_dim() + lin.kv_dim() * d) as f64
            // Pᵀ·ā over the causal triangle, the products the tiles do (less their diagonal tiles' upper halves).
            + (0..from)
                .map(|r| (lin.n_heads * rg.len(r) * (rg.len(r) + 1) * lin.head_dim) as f64)
                .sum::<f64>();
        attention_backward(
            lin,
            st,
            &rg,
            l,
            &mut g[..rg.off[from] * d],
            from,
            &mut scratch,
        );
    }
    // Token embeddings.
    let emb = lin.token_embedding;
    for (t, gt) in g.chunks_exact(d).enumerate() {
        let p = rg.pos[t];
        let tok = st.tokens[p] as usize;
        out[cols.token(p) * k_n + rg.row[t]] =
            lin.embed_scale * dot(&emb[tok * d..(tok + 1) * d], gt);
    }
    // [columns][sorted rows] → [input rows][columns].
    let n_cols = cols.len();
    let mut rows = vec![0.0f32; k_n * n_cols];
    for (col, src) in out.chunks_exact(k_n).enumerate() {
        for (r, &v) in src.iter().enumerate() {
            rows[rg.order[r] * n_cols + col] = v;
        }
    }
    (rows, flops)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Reusable buffers of the backward.
struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
}

/// Edges read at the output of layer `k`'s MLP for the first `rows` sorted rows: from every feature whose
/// decoder writes to `k`, and from the error nodes of layer `k`. Returns the feature products' FLOPs.
fn emit_layer(
    tc: &ReplacementTranscoder,
    st: &PromptState,
    cols: &Columns,
    rg: &Ragged,
    k: usize,
    g: &[f32],
    rows: usize,
    k_n: usize,
    out: &mut [f32],
) -> f64 {
    let d = tc.cfg.d_model;
    let af = &st.features;
    let n_eff = (0..rows).map(|r| rg.len(r)).max().unwrap_or(0);
    // Per position p: the rows reaching p and their gradients there, gathered into [K_p × d].
    let per_pos: Vec<(Vec<usize>, Vec<f32>)> = (0..n_eff)
        .into_par_iter()
        .map(|p| {
            let rs: Vec<usize> = (0..rows).filter(|&r| rg.len(r) > p).collect();
            let mut gp = Vec::with_capacity(rs.len() * d);
            for &r in &rs {
                let t = rg.off[r] + p;
                gp.extend_from_slice(&g[t * d..(t + 1) * d]);
            }
            (rs, gp)
        })
        .collect();
    // Errors of layer k.
    {
        let start = cols.error(k, 0) * k_n;
        let block = &mut out[start..start + n_eff * k_n];
        let e = &st.errors[k];
        block
            .par_chunks_mut(k_n)
            .zip(&per_pos)
            .enumerate()
            .for_each(|(p, (o, (rs, gp)))| {
                let ep = &e[p * d..(p + 1) * d];
                for (j, &r) in rs.iter().enumerate() {
                    o[r] += dot(ep, &gp[j * d..(j + 1) * d]);
                }
            });
    }
    // Features of every source layer l ≤ k whose decoders reach k: one group per (l, p).
    let mut groups: Vec<(usize, usize, &mut [f32])> = Vec::new();
    let mut rest: &mut [f32] = &mut out[..af.len() * k_n];
    let mut offset = 0usize;
    for l in 0..=k {
        if k - l >= tc.cfg.n_targets(l) {
            continue;
        }
        for p in 0..n_eff {
            let r = af.group(l, p);
            if r.is_empty() {
                continue;
            }
            let skip = (r.start - offset) * k_n;
            let tail = std::mem::take(&mut rest);
            let (_, tail) = tail.split_at_mut(skip);
            let (block, tail) = tail.split_at_mut(r.len() * k_n);
            rest = tail;
            offset = r.end;
            groups.push((l, p, block));
        }
    }
    let flops: f64 = groups
        .iter()
        .map(|(l, p, _)| 2.0 * (af.group(*l, *p).len() * d * per_pos[*p].0.len()) as f64)
        .sum();
    groups.into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(dec, tmp), (l, p, block)| {
            let (rs, gp) = &per_pos[p];
            let r = af.group(l, p);
            let (m, kp) = (r.len(), rs.len());
            dec.clear();
            for s in r {
                let row = tc
                    .dec_row(l, af.index[s] as usize, k)
                    .expect("decoder reaches k");
                let a = af.value[s];
                dec.extend(row.iter().map(|w| a * w));
            }
            // tmp[m × K_p] = dec[m × d] · g_pᵀ, scattered into the rows' columns of the block.
            tmp.clear();
            tmp.resize(m * kp, 0.0);
            matmul(
                tmp,
                kp,
                Mat::rows(dec, m, d),
                Mat::rows(gp, kp, d).t(),
                0.0,
                1.0,
                Threads::One,
            );
            for (b, t) in block.chunks_exact_mut(k_n).zip(tmp.chunks_exact(kp)) {
                for (&r, &v) in rs.iter().zip(t.iter()) {
                    b[r] += v;
                }
            }
        },
    );
    flops
}

/// Adds the skip path's gradient, `g_mid += J_inᵀ W_skipᵀ g_post`, to the buffer rows `g`.
fn skip_backward(
    lin: &Linear,
    tc: &ReplacementTranscoder,
    st: &PromptState,
    rg: &Ragged,
    l: usize,
    g: &mut [f32],
    s: &mut Scratch,
) {
    let d = tc.cfg.d_model;
    let rows = g.len() / d;
    let t = &mut s.a[..rows * d];
    matmul(
        t,
        d,
        Mat::rows(g, rows, d),
        Mat::rows(&tc.params.w_skip[l], d, d),
        0.0,
        1.0,
        Threads::All,
    );
    for (i, (gr, tr)) in g.chunks_exact_mut(d).zip(t.chunks_exact(d)).enumerate() {
        input_backward_add(lin, tc.input_hook, st, l, rg.pos[i], tr, gr);
    }
}

/// `g_pre = g_mid + Attnᵀ(g_mid)` through layer `l`'s attention with its pattern and norm scales frozen
/// (the attention norm's, and the post-attention norm's where the model has one), for the first `rows`
/// sorted rows (`g` is their part of the buffer).
fn attention_backward(
    lin: &Linear,
    st: &PromptState,
    rg: &Ragged,
    l: usize,
    g: &mut [f32],
    rows: usize,
    s: &mut Scratch,
) {
    let w = &lin.layers[l];
    let (d, qd, kvd, hd) = (lin.d_model, lin.q_dim(), lin.kv_dim(), lin.head_dim);
    let group = lin.n_heads / lin.n_kv_heads;
    let total = g.len() / d;
    if total == 0 {
        return;
    }
    let rec = &st.record.layers[l];
    let pattern = rec.attn_pattern.as_ref().expect("recorded");
    let scale = rec.attn_norm_scale.as_ref().expect("recorded");
    // The gradient at the attention output: through the frozen post-attention norm, if any.
    let gout: &[f32] = match w.attn_post_norm {
        None => g,
        Some(gamma) => {
            let post = rec.attn_post_norm_scale.as_ref().expect("recorded");
            let gp = &mut s.b[..total * d];
            gp.fill(0.0);
            for (t, (o, gr)) in gp.chunks_exact_mut(d).zip(g.chunks_exact(d)).enumerate() {
                lin.norm_backward_add(gamma, post[rg.pos[t]], gr, o);
            }
            gp
        }
    };
    // ā = g · Wo : [total, q_dim]
    let abar = &mut s.a[..total * qd];
    matmul(
        abar,
        qd,
        Mat::rows(gout, total, d),
        Mat::rows(w.wo, d, qd),
        0.0,
        1.0,
        Threads::All,
    );
    // Per row: v̄[s, kvh] = Σ_{h in group} Σ_t P_h[t, s] ā[t, h] over its own positions.
    let abar: &[f32] = abar;
    let mut chunks: Vec<(usize, &mut [f32])> = Vec::with_capacity(rows);
    let mut rest: &mut [f32] = &mut s.b[..total * kvd];
    for r in 0..rows {
        let (a, b) = std::mem::take(&mut rest).split_at_mut(rg.len(r) * kvd);
        chunks.push((r, a));
        rest = b;
    }
    chunks.into_par_iter().for_each(|(r, vb)| {
        let len = rg.len(r);
        let ai = &abar[rg.off[r] * qd..rg.off[r + 1] * qd];
        vb.fill(0.0);
        for h in 0..lin.n_heads {
            let kvh = h / group;
            let a = Mat::strided(&ai[h * hd..], len, hd, qd);
            pattern
                .head(h)
                .t_matmul_add(len, a, &mut vb[kvh * hd..], kvd);
        }
    });
    // normed̄ = v̄ · Wv : [total, d], then through the frozen norm into the residual.
    let vbar = &s.b[..total * kvd];
    let nbar = &mut s.a[..total * d];
    matmul(
        nbar,
        d,
        Mat::rows(vbar, total, kvd),
        Mat::rows(w.wv, kvd, d),
        0.0,
        1.0,
        Threads::All,
    );
    for (t, (gr, nr)) in g.chunks_exact_mut(d).zip(nbar.chunks_exact(d)).enumerate() {
        lin.norm_backward_add(w.attn_norm, scale[rg.pos[t]], nr, gr);
    }
}

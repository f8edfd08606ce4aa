//! The keys and values of the positions a model has already read, kept between forwards so that generation
//! runs one new token at a time instead of the whole sequence again, and the attention of new queries over
//! them.
//!
//! A [`KvCache`] starts empty; [`crate::model::CausalLm::forward_cached`] runs the new tokens at the
//! positions after the cached ones and appends their keys and values (per layer, after the rotary
//! embedding where the model has one). The first forward into an empty cache runs the ordinary tiled
//! attention ([`super::forward`]), so a prompt costs what an uncached forward costs; later forwards attend
//! each new query over every cached key (`cached_attention`): per token `O(position · heads · head_dim)`
//! work against the `O(position²)` of the full forward. The logits agree with the full forward's to
//! rounding (the dot products are summed in another order).

use rayon::prelude::*;

use super::forward::{AttnScores, softcap};

/// One layer's cached keys and values, each `[positions, n_kv_heads · head_dim]` row-major.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Every layer's keys and values of the positions read so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    pub(crate) len: usize,
}

impl KvCache {
    /// An empty cache (it takes its layers from the first forward).
    pub fn new() -> Self {
        KvCache::default()
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the keys and values.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * std::mem::size_of::<f32>())
            .sum()
    }

    /// Forgets every position (the buffers are kept for reuse).
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keeps the first `len` positions (to branch several continuations from one prompt); no-op when it
    /// holds no more.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        for l in &mut self.layers {
            let width = l.k.len() / self.len;
            l.k.truncate(len * width);
            l.v.truncate(len * width);
        }
        self.len = len;
    }

    /// Each layer's key and value lengths, to [`restore`](Self::restore) after a failed forward.
    pub(crate) fn mark(&self) -> (usize, Vec<(usize, usize)>) {
        (
            self.len,
            self.layers.iter().map(|l| (l.k.len(), l.v.len())).collect(),
        )
    }

    /// Drops whatever a forward appended after [`mark`](Self::mark).
    pub(crate) fn restore(&mut self, (len, lens): (usize, Vec<(usize, usize)>)) {
        self.len = len;
        self.layers.truncate(lens.len());
        for (l, (k, v)) in self.layers.iter_mut().zip(lens) {
            l.k.truncate(k);
            l.v.truncate(v);
        }
    }
}

/// Attention of `n` new queries (`q`, `[n, n_heads · hd]`, at positions `past..past + n`) over the cached
/// keys and values `k`, `v` (`[past + n, n_kv_heads · hd]`, the new positions' included), grouped-query,
/// with `scores`' scale, soft cap and window; writes the heads' outputs `[n, n_heads · hd]` into `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cached_attention(
    past: usize,
    n: usize,
    n_heads: usize,
    n_kv_heads: usize,
    hd: usize,
    scores: AttnScores,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
) {
    let (qd, kvd) = (n_heads * hd, n_kv_heads * hd);
    let group = n_heads / n_kv_heads.max(1);
    assert!(q.len() >= n * qd && out.len() >= n * qd);
    assert!(k.len() >= (past + n) * kvd && v.len() >= (past + n) * kvd);
    out[..n * qd]
        .par_chunks_mut(hd.max(1))
        .enumerate()
        .for_each(|(i, o)| {
            let (r, h) = (i / n_heads, i % n_heads);
            let kvh = h / group;
            let t = past + r;
            let first = scores.first_key(t);
            let qh = &q[r * qd + h * hd..][..hd];
            let mut w: Vec<f32> = (first..=t)
                .map(|s| {
                    let kh = &k[s * kvd + kvh * hd..][..hd];
                    let x = qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() * scores.scale;
                    scores.softcap.map_or(x, |cap| softcap(x, cap))
                })
                .collect();
            let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for x in &mut w {
                *x = (*x - max).exp();
                sum += *x;
            }
            o.fill(0.0);
            for (s, p) in (first..=t).zip(&w) {
                let p = p / sum;
                let vh = &v[s * kvd + kvh * hd..][..hd];
                o.iter_mut().zip(vh).for_each(|(o, v)| *o += p * v);
            }
        });
}

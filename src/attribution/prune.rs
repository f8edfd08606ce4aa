//! Influence, pruning and the graph scores, with circuit-tracer's definitions and tie rules, in memory that
//! grows with the adjacency rather than with its square.
//!
//! Nodes are numbered features, errors, tokens, logits. The adjacency `A[target, source]` has rows only for
//! targets (features and logits; error and token rows are zero) and columns only for sources (logit columns
//! are zero), so [`Adjacency`] stores exactly those `(F + V) × (F + E + T)` numbers.
//!
//! - `Â = |A|` with each row divided by its sum (clamped at 1e-10); the influence of every node on the logits
//!   is `w · (Â + Â² + …)` with `w` the logit probabilities: a power series over a DAG, so it terminates.
//! - Node pruning keeps the nodes whose influence reaches the cumulative share `node_threshold`
//!   ([`find_threshold`]: sort descending, first index whose cumulative share reaches the threshold, ties
//!   kept); tokens and logits are always kept.
//! - Edge pruning scores each edge `Â_pruned[i, j] · (influence_i + w_i)` and keeps the edges that reach the
//!   share `edge_threshold`. circuit-tracer materialises and sorts all N² scores (the cause of its
//!   out-of-memory failures on long prompts); here the threshold is found by an exact two-pass radix
//!   selection over the f32 bit patterns of the scores, recomputed on the fly, so pruning needs O(N) memory
//!   beyond the adjacency itself.
//! - Then, to a fixed point, features and errors without a kept outgoing edge and features without a kept
//!   incoming edge are dropped.

use rayon::prelude::*;

use crate::{Error, Result};

/// The rows of an attribution graph's adjacency that can be non-zero.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Adjacency {
    pub n_features: usize,
    pub n_errors: usize,
    pub n_tokens: usize,
    pub n_logits: usize,
    /// `[n_features + n_logits][n_sources]`: the feature rows, then the logit rows.
    pub rows: Vec<f32>,
}

impl Adjacency {
    /// Sources: features, errors, tokens.
    pub fn n_sources(&self) -> usize {
        self.n_features + self.n_errors + self.n_tokens
    }

    /// All nodes: sources and logits.
    pub fn n_nodes(&self) -> usize {
        self.n_sources() + self.n_logits
    }

    pub fn n_rows(&self) -> usize {
        self.n_features + self.n_logits
    }

    /// The node of stored row `r`.
    pub fn row_node(&self, r: usize) -> usize {
        if r < self.n_features {
            r
        } else {
            self.n_sources() + (r - self.n_features)
        }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        let s = self.n_sources();
        &self.rows[r * s..(r + 1) * s]
    }

    /// `A[target, source]` for any pair of nodes.
    pub fn get(&self, target: usize, source: usize) -> f32 {
        let r = if target < self.n_features {
            target
        } else if target >= self.n_sources() {
            self.n_features + target - self.n_sources()
        } else {
            return 0.0;
        };
        if source >= self.n_sources() {
            return 0.0;
        }
        self.row(r)[source]
    }

    /// The logit weights `w` over all nodes: `probs` on the logit nodes, zero elsewhere.
    pub fn logit_weights(&self, probs: &[f32]) -> Vec<f64> {
        let mut w = vec![0.0f64; self.n_nodes()];
        for (j, &p) in probs.iter().enumerate() {
            w[self.n_sources() + j] = p as f64;
        }
        w
    }
}

/// Columns per parallel block of the influence power series.
const COL_BLOCK: usize = 2048;

/// `max(Σ_j |row_j| over kept columns, clamp)` per stored row; rows of dropped nodes are zero.
fn row_sums(a: &Adjacency, mask: Option<&[bool]>, clamp: f64) -> Vec<f64> {
    (0..a.n_rows())
        .into_par_iter()
        .map(|r| {
            if mask.is_some_and(|m| !m[a.row_node(r)]) {
                return clamp;
            }
            let s: f64 = match mask {
                None => a.row(r).iter().map(|v| v.abs() as f64).sum(),
                Some(m) => a
                    .row(r)
                    .iter()
                    .zip(m)
                    .filter(|(_, k)| **k)
                    .map(|(v, _)| v.abs() as f64)
                    .sum(),
            };
            s.max(clamp)
        })
        .collect()
}

/// `w · (Â + Â² + …)` over all nodes, with `Â` the row-normalised `|A|` restricted to `mask`'s nodes.
fn influence(a: &Adjacency, w: &[f64], mask: Option<&[bool]>, sums: &[f64]) -> Result<Vec<f64>> {
    let n_src = a.n_sources();
    let mut total = vec![0.0f64; a.n_nodes()];
    let mut cur = w.to_vec();
    for _ in 0..1000 {
        let mut next = vec![0.0f64; a.n_nodes()];
        // Each row's weight on the next power; rows of dropped or uninfluenced nodes contribute nothing.
        let weight: Vec<(usize, f64)> = (0..a.n_rows())
            .filter_map(|r| {
                let node = a.row_node(r);
                let c = cur[node];
                (c != 0.0 && mask.is_none_or(|m| m[node])).then(|| (r, c / sums[r]))
            })
            .collect();
        // Column blocks in parallel, rows in order within each: deterministic sums.
        next[..n_src]
            .par_chunks_mut(COL_BLOCK)
            .enumerate()
            .for_each(|(b, out)| {
                let (c0, len) = (b * COL_BLOCK, out.len());
                for &(r, f) in &weight {
                    let row = &a.row(r)[c0..c0 + len];
                    match mask {
                        None => out
                            .iter_mut()
                            .zip(row)
                            .for_each(|(x, v)| *x += f * v.abs() as f64),
                        Some(m) => {
                            out.iter_mut()
                                .zip(row)
                                .zip(&m[c0..c0 + len])
                                .for_each(|((x, v), k)| {
                                    if *k {
                                        *x += f * v.abs() as f64
                                    }
                                })
                        }
                    }
                }
            });
        if next.iter().all(|&v| v == 0.0) {
            return Ok(total);
        }
        total.iter_mut().zip(&next).for_each(|(t, x)| *t += x);
        cur = next;
    }
    Err(Error::InvalidData {
        what: "influence".into(),
        reason: "influence did not converge in 1000 iterations (the adjacency has a cycle)".into(),
    })
}

/// The influence of every node on the logits in the unpruned graph.
pub fn node_influence(a: &Adjacency, probs: &[f32]) -> Result<Vec<f64>> {
    let w = a.logit_weights(probs);
    influence(a, &w, None, &row_sums(a, None, 1e-10))
}

/// Cumulative shares are compared with this much slack, so that a threshold of exactly 1 (or a share that
/// reaches it only up to rounding) selects the same value whatever the order of summation.
const SHARE_EPS: f64 = 1e-12;

/// circuit-tracer's `find_threshold`: the value at the first position of the descending sort whose
/// cumulative share reaches `threshold` (the last value when none does).
pub fn find_threshold(scores: &[f64], threshold: f64) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    let mut s = scores.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    let total: f64 = s.iter().sum();
    let mut cum = 0.0;
    for (i, v) in s.iter().enumerate() {
        cum += v;
        if cum / total >= threshold - SHARE_EPS {
            return s[i];
        }
    }
    s[s.len() - 1]
}

/// The same selection over scores given as a re-runnable stream of non-negative f32 values plus `zeros`
/// implicit zero entries, by an exact two-pass radix selection on the bit patterns (no sort, no copy).
pub fn find_threshold_stream<I, F>(stream: F, zeros: u64, threshold: f64) -> f32
where
    F: Fn() -> I,
    I: Iterator<Item = f32>,
{
    // Pass 1: counts and sums per high half of the bit pattern (non-negative floats order as their bits).
    let mut cnt = vec![0u64; 1 << 16];
    let mut sum = vec![0.0f64; 1 << 16];
    let mut total = 0.0f64;
    let mut n = zeros;
    cnt[0] += zeros;
    for v in stream() {
        let b = v.to_bits() >> 16;
        cnt[b as usize] += 1;
        sum[b as usize] += v as f64;
        total += v as f64;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    // The smallest value present is the answer when no prefix reaches the threshold.
    let smallest = || {
        let hi = cnt.iter().position(|&c| c > 0).unwrap_or(0) as u32;
        let mut lo_min = u32::MAX;
        for v in stream() {
            let b = v.to_bits();
            if b >> 16 == hi {
                lo_min = lo_min.min(b & 0xffff);
            }
        }
        if hi == 0 && (zeros > 0 || lo_min == u32::MAX) {
            return 0.0;
        }
        f32::from_bits((hi << 16) | lo_min.min(0xffff))
    };
    let mut cum = 0.0f64;
    let mut bucket = None;
    for b in (0..(1usize << 16)).rev() {
        if cnt[b] == 0 {
            continue;
        }
        if (cum + sum[b]) / total >= threshold - SHARE_EPS && total > 0.0 {
            bucket = Some(b as u32);
            break;
        }
        cum += sum[b];
    }
    let Some(hi) = bucket else {
        return smallest();
    };
    // Pass 2: within the bucket, counts per low half; walk down to the first value reaching the target.
    let mut cnt2 = vec![0u64; 1 << 16];
    for v in stream() {
        let b = v.to_bits();
        if b >> 16 == hi {
            cnt2[(b & 0xffff) as usize] += 1;
        }
    }
    if hi == 0 {
        cnt2[0] += zeros;
    }
    let mut last = 0.0f32;
    for lo in (0..(1u32 << 16)).rev() {
        let c = cnt2[lo as usize];
        if c == 0 {
            continue;
        }
        let v = f32::from_bits((hi << 16) | lo);
        // The reference adds equal values one by one; whichever copy reaches the threshold, its value is v.
        cum += v as f64 * c as f64;
        last = v;
        if cum / total >= threshold - SHARE_EPS {
            return v;
        }
    }
    // Rounding (the bucket's sum was taken in another order): the crossing is at the bucket's last value.
    last
}

/// What pruning keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct Pruned {
    pub node_mask: Vec<bool>,
    /// An edge `(target, source)` is kept when both its nodes are and its score reaches this value.
    pub edge_threshold_value: f32,
    /// The edge scores' normaliser per stored row: `(influence + w) / row sum` of the pruned matrix.
    pub row_factor: Vec<f64>,
    /// Every node's cumulative influence share, by descending influence (the JSON's `influence`).
    pub cumulative: Vec<f64>,
    /// Node influence on the logits (unpruned graph).
    pub influence: Vec<f64>,
}

impl Pruned {
    /// Whether edge (`row` of the adjacency, `source`) is kept.
    pub fn keeps_edge(&self, a: &Adjacency, row: usize, source: usize) -> bool {
        let node = a.row_node(row);
        self.node_mask[node]
            && self.node_mask[source]
            && (a.row(row)[source].abs() as f64 * self.row_factor[row]) as f32
                >= self.edge_threshold_value
    }
}

/// circuit-tracer's `prune_graph`.
pub fn prune(
    a: &Adjacency,
    probs: &[f32],
    node_threshold: f64,
    edge_threshold: f64,
) -> Result<Pruned> {
    for (name, t) in [
        ("node_threshold", node_threshold),
        ("edge_threshold", edge_threshold),
    ] {
        if !(0.0..=1.0).contains(&t) {
            return Err(Error::config(name, "must be between 0 and 1"));
        }
    }
    let n = a.n_nodes();
    let n_src = a.n_sources();
    let w = a.logit_weights(probs);
    let infl = node_influence(a, probs)?;
    let thr = find_threshold(&infl, node_threshold);
    let mut node_mask: Vec<bool> = infl.iter().map(|&v| v >= thr).collect();
    for m in &mut node_mask[a.n_features + a.n_errors..] {
        *m = true;
    }
    // Edge scores on the node-pruned matrix.
    let sums = row_sums(a, Some(&node_mask), 1e-10);
    let pinfl = influence(a, &w, Some(&node_mask), &sums)?;
    let row_factor: Vec<f64> = (0..a.n_rows())
        .map(|r| {
            let node = a.row_node(r);
            if node_mask[node] {
                (pinfl[node] + w[node]) / sums[r]
            } else {
                0.0
            }
        })
        .collect();
    let pruned_mask = node_mask.clone();
    let score = |r: usize, j: usize| -> f32 {
        if !pruned_mask[j] {
            return 0.0;
        }
        (a.row(r)[j].abs() as f64 * row_factor[r]) as f32
    };
    let stored = (a.n_rows() * n_src) as u64;
    let zeros = (n as u64) * (n as u64) - stored;
    let tau = find_threshold_stream(
        || (0..a.n_rows()).flat_map(move |r| (0..n_src).map(move |j| score(r, j))),
        zeros,
        edge_threshold,
    );
    // Fixed point: sources need a kept outgoing edge, features a kept incoming one. A threshold of zero
    // keeps every edge, including the implicit zero ones, so nothing is dropped (as in the reference).
    if tau > 0.0 {
        let mut first = true;
        loop {
            let mut out_ok = vec![false; n_src];
            let mut in_ok = vec![false; a.n_features];
            for r in 0..a.n_rows() {
                let node = a.row_node(r);
                if !first && !node_mask[node] {
                    continue;
                }
                for j in 0..n_src {
                    if !first && !node_mask[j] {
                        continue;
                    }
                    if score(r, j) >= tau {
                        out_ok[j] = true;
                        if node < a.n_features {
                            in_ok[node] = true;
                        }
                    }
                }
            }
            let old = node_mask.clone();
            for j in 0..a.n_features + a.n_errors {
                node_mask[j] &= out_ok[j];
            }
            for i in 0..a.n_features {
                node_mask[i] &= in_ok[i];
            }
            first = false;
            if node_mask == old {
                break;
            }
        }
    }
    Ok(Pruned {
        cumulative: cumulative_shares(&infl),
        node_mask,
        edge_threshold_value: tau,
        row_factor,
        influence: infl,
    })
}

/// Each value's cumulative share in the descending order (ties in index order).
pub fn cumulative_shares(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    let total: f64 = v.iter().sum();
    let mut out = vec![0.0; v.len()];
    let mut cum = 0.0;
    for i in order {
        cum += v[i];
        out[i] = if total > 0.0 { cum / total } else { f64::NAN };
    }
    out
}

/// The replacement and completeness scores of the unpruned graph.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    /// Σ token influence / (Σ token influence + Σ error influence).
    pub replacement: f64,
    /// Σ_i (1 − Σ_errors Â[i, :]) (influence_i + w_i) / Σ_i (influence_i + w_i).
    pub completeness: f64,
}

pub fn scores(a: &Adjacency, probs: &[f32]) -> Result<Scores> {
    let w = a.logit_weights(probs);
    let sums = row_sums(a, None, 1e-10);
    let infl = influence(a, &w, None, &sums)?;
    let (e0, e1) = (a.n_features, a.n_features + a.n_errors);
    let token: f64 = infl[e1..a.n_sources()].iter().sum();
    let error: f64 = infl[e0..e1].iter().sum();
    let mut num = 0.0;
    let mut den = 0.0;
    for node in 0..a.n_nodes() {
        let out = infl[node] + w[node];
        den += out;
        let err_frac = if node < a.n_features || node >= a.n_sources() {
            let r = if node < a.n_features {
                node
            } else {
                a.n_features + node - a.n_sources()
            };
            a.row(r)[e0..e1].iter().map(|v| v.abs() as f64).sum::<f64>() / sums[r]
        } else {
            0.0
        };
        num += (1.0 - err_frac) * out;
    }
    Ok(Scores {
        replacement: token / (token + error),
        completeness: num / den,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made graph: 2 features, 1 error, 1 token, 1 logit (p = 0.5... here 1.0).
    /// Nodes: f0 = 0, f1 = 1, e = 2, t = 3, logit = 4.
    /// logit ← f1 (2.0), e (1.0), t (1.0);  f1 ← f0 (3.0), t (-1.0);  f0 ← t (1.0).
    fn small() -> Adjacency {
        Adjacency {
            n_features: 2,
            n_errors: 1,
            n_tokens: 1,
            n_logits: 1,
            rows: vec![
                0.0, 0.0, 0.0, 1.0, // f0
                3.0, 0.0, 0.0, -1.0, // f1
                0.0, 2.0, 1.0, 1.0, // logit
            ],
        }
    }

    #[test]
    fn influence_by_hand() {
        let a = small();
        let infl = node_influence(&a, &[1.0]).unwrap();
        // Â rows: f0 [0,0,0,1]; f1 [.75,0,0,.25]; logit [0,.5,.25,.25].
        // w·Â = f1 .5, e .25, t .25; ·Â² = f0 .375, t .125; ·Â³ = t .375.
        let want = [0.375, 0.5, 0.25, 0.25 + 0.125 + 0.375, 0.0];
        for (g, w) in infl.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{infl:?}");
        }
        let s = scores(&a, &[1.0]).unwrap();
        assert!((s.replacement - 0.75 / 1.0).abs() < 1e-12);
        // (1 - err frac) · (infl + w): f0 .375, f1 .5, e .25, t .75, logit (1 - .25) · 1.
        let num = 0.375 + 0.5 + 0.25 + 0.75 + 0.75;
        let den = 0.375 + 0.5 + 0.25 + 0.75 + 1.0;
        assert!((s.completeness - num / den).abs() < 1e-12);
    }

    #[test]
    fn find_threshold_matches_reference_rule() {
        let v = [0.1, 0.4, 0.2, 0.3];
        // Sorted .4 .3 .2 .1: shares .4 .7 .9 1.0.
        assert_eq!(find_threshold(&v, 0.5), 0.3);
        assert_eq!(find_threshold(&v, 0.7), 0.3);
        assert_eq!(find_threshold(&v, 0.71), 0.2);
        assert_eq!(find_threshold(&v, 1.0), 0.1);
        assert_eq!(find_threshold(&v, 0.0), 0.4);
    }

    #[test]
    fn streaming_threshold_equals_sorting() {
        let mut rng = crate::rng::Rng::seed(7);
        for case in 0..200 {
            let n = 1 + case % 37;
            let mut v: Vec<f32> = (0..n)
                .map(|_| (rng.uniform() as f32).powi(3) * if case % 3 == 0 { 1e-3 } else { 10.0 })
                .collect();
            if case % 5 == 0 {
                v.push(v[0]); // ties
            }
            let zeros = (case % 4) as u64;
            for t in [0.0, 0.3, 0.5, 0.8, 0.98, 1.0] {
                let mut all: Vec<f64> = v.iter().map(|&x| x as f64).collect();
                all.extend(std::iter::repeat_n(0.0, zeros as usize));
                let want = find_threshold(&all, t) as f32;
                let got = find_threshold_stream(|| v.iter().copied(), zeros, t);
                assert_eq!(got, want, "case {case} t {t} v {v:?} zeros {zeros}");
            }
        }
    }

    #[test]
    fn pruning_by_hand() {
        let a = small();
        // Influence: f0 .375, f1 .5, e .25, t .75, logit 0: total 1.875; sorted t .75 f1 .5 f0 .375 e .25.
        // Node threshold 0.6 → cumulative .4 .667: keep t, f1 (threshold value .5); tokens and logits kept.
        let p = prune(&a, &[1.0], 0.6, 1.0).unwrap();
        assert_eq!(p.node_mask, vec![false, true, false, true, true]);
        // Threshold 1.0 keeps every edge between kept nodes; f1 keeps its edge from t.
        for (r, j, keep) in [(1, 3, true), (1, 0, false), (2, 1, true), (2, 2, false)] {
            assert_eq!(p.keeps_edge(&a, r, j), keep, "row {r} source {j}");
        }
        // Pruned matrix: logit row [0, 2, 0, 1] (e dropped) → Â .667 .333; f1 row [0, 0, 0, -1] → 1.
        // Influence on it: f1 .667, t .333 + .667 = 1. Scores: logit←f1 .667, logit←t .333, f1←t .667;
        // shares .4, .8, 1: a threshold of .75 keeps the two .667 edges only.
        let p = prune(&a, &[1.0], 0.6, 0.75).unwrap();
        assert!(p.keeps_edge(&a, 2, 1));
        assert!(p.keeps_edge(&a, 1, 3));
        assert!(!p.keeps_edge(&a, 2, 3));
        assert_eq!(p.node_mask, vec![false, true, false, true, true]);
    }

    #[test]
    fn features_without_incoming_edges_are_dropped() {
        // f0 feeds the logit but nothing feeds f0: kept by influence, dropped by the fixed point.
        let a = Adjacency {
            n_features: 1,
            n_errors: 0,
            n_tokens: 1,
            n_logits: 1,
            rows: vec![
                0.0, 0.0, // f0 ← nothing
                1.0, 1.0, // logit ← f0, t
            ],
        };
        let p = prune(&a, &[1.0], 1.0, 0.9).unwrap();
        assert_eq!(p.node_mask, vec![false, true, true]);
    }
}

//! TopK and BatchTopK selection across feature shards. A rank holds some features of every layer and sees
//! only their pre-activations, while the selection ranks all features of a token (TopK) or all (token,
//! feature) pairs of a batch (BatchTopK). No more entries can be selected from one rank than the budget
//! (`k` per token; `k·B` per layer, or `k·B·L` across layers), so each rank sends its own best candidates up
//! to the budget, every rank merges the world's under the single-process order (the larger value first,
//! ties to the lower global position: `topk_indices`, `batch_topk_codes`), and keeps its entries that rank
//! at or before the last selected one, then the ReLU. Only positive values are candidates: whatever ranks
//! before a positive value is positive, so the others cannot change which positive ones are selected, and
//! the ReLU drops them anyway. That is the selection one process makes over the whole model, for any
//! number of ranks: the step then decodes, sums the partials and runs the backward as for JumpReLU (the
//! selected entries pass their gradient straight through).
//!
//! BatchTopK's budget is over the whole batch, so with data-parallel replicas (each holding a slice of the
//! tokens) the same exchange spans the replicas too, positions numbered over the batch.
//!
//! Traffic per rank and step: the world's candidates, 12 bytes each (value, 64-bit position): `N·B·L·k`
//! for TopK, `N·k·B·L` for BatchTopK, gathered by every rank.

use crate::Result;
use crate::backend::cpu::encode::{
    LayerCodes, batch_topk_groups, codes_of_selected, dense_preact, encode_layer,
};
use crate::backend::cpu::gemm::Threads;
use crate::clt::{Activation, CltConfig, Params};
use crate::dist::comm::Comm;
use rayon::prelude::*;
use std::cmp::Ordering;

/// A candidate: its pre-activation and its position in the single-process order's tie-break (TopK: the
/// global feature index; BatchTopK: layer, then token × F + global feature).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Cand {
    v: f32,
    pos: u64,
}

/// A padding slot in a rank's candidates (it had fewer than the budget).
const NONE: u64 = u64::MAX;

/// The single-process order: `Less` when `a` is selected before `b`.
fn order(a: &Cand, b: &Cand) -> Ordering {
    b.v.total_cmp(&a.v).then(a.pos.cmp(&b.pos))
}

fn pack(c: &[Cand], budget: usize, out: &mut Vec<u32>) {
    for i in 0..budget {
        let c = c.get(i).copied().unwrap_or(Cand { v: 0.0, pos: NONE });
        out.extend([c.v.to_bits(), (c.pos >> 32) as u32, c.pos as u32]);
    }
}

fn unpack(w: &[u32]) -> Option<Cand> {
    let pos = ((w[1] as u64) << 32) | w[2] as u64;
    (pos != NONE).then(|| Cand {
        v: f32::from_bits(w[0]),
        pos,
    })
}

/// The last candidate selected from `all` with a budget of `budget` (`None` when all of them are).
fn last_selected(all: &mut [Cand], budget: usize) -> Option<Cand> {
    if budget == 0 || all.len() <= budget {
        return None;
    }
    all.select_nth_unstable_by(budget - 1, order);
    Some(all[budget - 1])
}

/// Whether `c` is selected when `last` is the last selected candidate (every one when `None`), and passes
/// the ReLU.
fn kept(c: &Cand, last: Option<&Cand>) -> bool {
    c.v > 0.0 && last.is_none_or(|t| order(c, t) != Ordering::Greater)
}

/// Where a rank's part of the selection lies: its features are the model's `first_feature..` (out of
/// `n_features`), its tokens the batch's `first_token..` (out of `batch_tokens`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub first_feature: usize,
    pub n_features: usize,
    pub first_token: usize,
    pub batch_tokens: usize,
}

/// The codes of this rank's features (`params`, `cfg` the shard's configuration) on its `n_tokens` tokens
/// (`x`) for a TopK or BatchTopK transcoder, selected over the parts of every rank of `comm`: for TopK the
/// ranks holding the other features of the same tokens, for BatchTopK every rank holding a part of the
/// batch.
pub fn sharded_codes<C: Comm>(
    comm: &C,
    cfg: &CltConfig,
    params: &Params,
    x: &[f32],
    n_tokens: usize,
    part: Part,
) -> Result<Vec<LayerCodes>> {
    match cfg.activation {
        Activation::TopK { k } => topk_codes(comm, cfg, params, x, n_tokens, part.first_feature, k),
        Activation::BatchTopK { k, across_layers } => {
            batch_topk_codes(comm, cfg, params, x, n_tokens, part, k, across_layers)
        }
        Activation::JumpRelu => unreachable!("JumpReLU selects per feature: no exchange"),
    }
}

/// TopK: the shard's own encoder (the training step's, its TopK epilogue fused with the GEMM) lists each
/// token's best `k` of the shard that are positive, which are the candidates: a feature ranked before a
/// positive one is positive too, so the non-positive ones cannot change which positive ones are in the
/// world's top `k`. The token's entries are then those the world's selection keeps.
fn topk_codes<C: Comm>(
    comm: &C,
    cfg: &CltConfig,
    params: &Params,
    x: &[f32],
    n_tokens: usize,
    first: usize,
    k: usize,
) -> Result<Vec<LayerCodes>> {
    let mut out = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        // (TopK reads no thresholds and no bandwidth.)
        let codes = encode_layer(cfg, params, l, x, n_tokens, &[], 0.0, false);
        let cand = |e: usize| Cand {
            v: codes.pre[e],
            pos: (first + codes.feat[e] as usize) as u64,
        };
        let mut send = Vec::with_capacity(3 * n_tokens * k);
        for b in 0..n_tokens {
            let mine: Vec<Cand> = (codes.offsets[b]..codes.offsets[b + 1]).map(cand).collect();
            pack(&mine, k, &mut send);
        }
        let all = comm.gather_u32("all-gather of the TopK candidates", &send)?;
        let (per_rank, world_n) = (3 * n_tokens * k, comm.size());
        let keep: Vec<Vec<bool>> = (0..n_tokens)
            .into_par_iter()
            .map(|b| {
                let mut world: Vec<Cand> = (0..world_n)
                    .flat_map(|r| {
                        let at = r * per_rank + 3 * b * k;
                        all[at..at + 3 * k].chunks_exact(3).filter_map(unpack)
                    })
                    .collect();
                let last = last_selected(&mut world, k);
                (codes.offsets[b]..codes.offsets[b + 1])
                    .map(|e| kept(&cand(e), last.as_ref()))
                    .collect()
            })
            .collect();
        out.push(keep_entries(codes, &keep));
    }
    Ok(out)
}

/// `codes` with only the entries `keep` marks (per token, in entry order), the firing counts recounted.
fn keep_entries(mut codes: LayerCodes, keep: &[Vec<bool>]) -> LayerCodes {
    let (feat, pre, act) = (
        std::mem::take(&mut codes.feat),
        std::mem::take(&mut codes.pre),
        std::mem::take(&mut codes.act),
    );
    let offsets = std::mem::replace(&mut codes.offsets, vec![0]);
    codes.active_count.fill(0);
    for (b, k) in keep.iter().enumerate() {
        for (e, _) in (offsets[b]..offsets[b + 1]).zip(k).filter(|(_, k)| **k) {
            codes.feat.push(feat[e]);
            codes.pre.push(pre[e]);
            codes.act.push(act[e]);
            codes.active_count[feat[e] as usize] += 1;
        }
        codes.offsets.push(codes.feat.len());
    }
    codes
}

/// BatchTopK: the shard's dense pre-activations of its tokens, its best positive ones up to the budget
/// sent (as for TopK, only positive candidates can decide which positive ones are selected).
#[allow(clippy::too_many_arguments)]
fn batch_topk_codes<C: Comm>(
    comm: &C,
    cfg: &CltConfig,
    params: &Params,
    x: &[f32],
    n_tokens: usize,
    part: Part,
    k: usize,
    across_layers: bool,
) -> Result<Vec<LayerCodes>> {
    let (f_n, l_n) = (cfg.n_features, cfg.n_layers);
    let (first, n_features) = (part.first_feature, part.n_features);
    let pre: Vec<Vec<f32>> = (0..l_n)
        .map(|l| dense_preact(cfg, params, l, x, n_tokens, Threads::All))
        .collect();
    let mut selected: Vec<Vec<bool>> = pre.iter().map(|p| vec![false; p.len()]).collect();
    // Positions as one process numbers them: layer, then token × F + feature over the batch.
    let batch = part.batch_tokens;
    let span = (batch * n_features) as u64;
    for g in batch_topk_groups(l_n, across_layers) {
        let budget = (k * batch * g.len()).min(batch * n_features * g.len());
        let mut mine: Vec<Cand> = Vec::new();
        for &l in &g {
            mine.extend(
                (pre[l].iter().enumerate())
                    .filter(|&(_, &v)| v > 0.0)
                    .map(|(i, &v)| {
                        let (b, f) = (part.first_token + i / f_n, first + i % f_n);
                        Cand {
                            v,
                            pos: l as u64 * span + (b * n_features + f) as u64,
                        }
                    }),
            );
        }
        // Only this rank's best `budget` can be selected.
        if mine.len() > budget && budget > 0 {
            mine.select_nth_unstable_by(budget - 1, order);
        }
        mine.truncate(budget);
        let mut send = Vec::with_capacity(3 * budget);
        pack(&mine, budget, &mut send);
        let all = comm.gather_u32("all-gather of the BatchTopK candidates", &send)?;
        let mut world: Vec<Cand> = all.chunks_exact(3).filter_map(unpack).collect();
        let last = last_selected(&mut world, budget);
        for e in mine.iter().filter(|e| kept(e, last.as_ref())) {
            let (l, i) = ((e.pos / span) as usize, (e.pos % span) as usize);
            let b = i / n_features - part.first_token;
            let f = i % n_features - first;
            selected[l][b * f_n + f] = true;
        }
    }
    Ok(pre
        .iter()
        .zip(&selected)
        .map(|(h, s)| codes_of_selected(h, s, n_tokens, f_n))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_order_is_the_single_process_one() {
        let a = Cand { v: 2.0, pos: 7 };
        let b = Cand { v: 1.0, pos: 1 };
        let c = Cand { v: 1.0, pos: 3 };
        assert_eq!(order(&a, &b), Ordering::Less);
        assert_eq!(order(&b, &c), Ordering::Less);
        let mut all = vec![c, a, b];
        assert_eq!(last_selected(&mut all, 2), Some(b));
        assert!(kept(&b, Some(&b)) && !kept(&c, Some(&b)));
        assert_eq!(last_selected(&mut all, 3), None);
        let mut words = Vec::new();
        pack(&[a], 2, &mut words);
        assert_eq!(unpack(&words[..3]), Some(a));
        assert_eq!(unpack(&words[3..]), None);
        assert!(!kept(&Cand { v: 0.0, pos: 0 }, None), "the ReLU");
    }
}

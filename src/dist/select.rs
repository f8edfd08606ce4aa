//! TopK and BatchTopK selection across feature shards. A rank holds some features of every layer and sees
//! only their pre-activations, while the selection ranks all features of a token (TopK) or all (token,
//! feature) pairs of a batch (BatchTopK). No more entries can be selected from one rank than the budget
//! (`k` per token; `k·B` per layer, or `k·B·L` across layers), so each rank sends its own best candidates up
//! to the budget, every rank merges the world's under the single-process order (the larger value first,
//! ties to the lower global position: `topk_indices`, `batch_topk_codes`), and keeps its entries that rank
//! at or before the last selected one, then the ReLU. That is the selection one process makes over the
//! whole model, for any number of ranks: the step then decodes, sums the partials and runs the backward as
//! for JumpReLU (the selected entries pass their gradient straight through).
//!
//! BatchTopK's budget is over the whole batch, so with data-parallel replicas (each holding a slice of the
//! tokens) the same exchange spans the replicas too, positions numbered over the batch.
//!
//! Traffic per rank and step: the world's candidates, 12 bytes each (value, 64-bit position): `N·B·L·k`
//! for TopK, `N·k·B·L` for BatchTopK, gathered by every rank.

use crate::Result;
use crate::backend::cpu::encode::{LayerCodes, codes_of_selected, dense_preact, topk_indices};
use crate::backend::cpu::gemm::Threads;
use crate::clt::{Activation, CltConfig, Params};
use crate::dist::comm::Comm;
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
    let f_n = cfg.n_features;
    let (first, n_features) = (part.first_feature, part.n_features);
    let pre: Vec<Vec<f32>> = (0..cfg.n_layers)
        .map(|l| dense_preact(cfg, params, l, x, n_tokens, Threads::All))
        .collect();
    let mut selected: Vec<Vec<bool>> = pre.iter().map(|p| vec![false; p.len()]).collect();
    match cfg.activation {
        Activation::TopK { k } => {
            for (l, h) in pre.iter().enumerate() {
                let mine: Vec<Vec<Cand>> = h
                    .chunks_exact(f_n)
                    .map(|row| {
                        (topk_indices(row, k).into_iter())
                            .map(|f| Cand {
                                v: row[f as usize],
                                pos: (first + f as usize) as u64,
                            })
                            .collect()
                    })
                    .collect();
                let mut send = Vec::with_capacity(3 * n_tokens * k);
                for c in &mine {
                    pack(c, k, &mut send);
                }
                let all = comm.gather_u32("all-gather of the TopK candidates", &send)?;
                let per_rank = 3 * n_tokens * k;
                for (b, c) in mine.iter().enumerate() {
                    let mut world: Vec<Cand> = (0..comm.size())
                        .flat_map(|r| {
                            let at = r * per_rank + 3 * b * k;
                            all[at..at + 3 * k].chunks_exact(3).filter_map(unpack)
                        })
                        .collect();
                    let last = last_selected(&mut world, k);
                    for e in c.iter().filter(|e| kept(e, last.as_ref())) {
                        selected[l][b * f_n + e.pos as usize - first] = true;
                    }
                }
            }
        }
        Activation::BatchTopK { k, across_layers } => {
            let l_n = cfg.n_layers;
            let groups: Vec<Vec<usize>> = if across_layers {
                vec![(0..l_n).collect()]
            } else {
                (0..l_n).map(|l| vec![l]).collect()
            };
            // Positions as one process numbers them: layer, then token × F + feature over the batch.
            let batch = part.batch_tokens;
            let span = (batch * n_features) as u64;
            for g in groups {
                let budget = (k * batch * g.len()).min(batch * n_features * g.len());
                let mut mine: Vec<Cand> = Vec::with_capacity(n_tokens * f_n * g.len());
                for &l in &g {
                    mine.extend(pre[l].iter().enumerate().map(|(i, &v)| {
                        let (b, f) = (part.first_token + i / f_n, first + i % f_n);
                        Cand {
                            v,
                            pos: l as u64 * span + (b * n_features + f) as u64,
                        }
                    }));
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
        }
        Activation::JumpRelu => unreachable!("JumpReLU selects per feature: no exchange"),
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

//! One streaming pass over an activation store that gathers every feature's dashboard statistics.
//!
//! The store is read in order (shard by shard, block by block), never shuffled, because an example is a window
//! of consecutive tokens of one document. Tokens are gathered into chunks, encoded with the trainer's blocked
//! encoder ([`encode_all`], all threads), and every layer's features are updated in parallel:
//! - the top-k activations, at most one per overlapping window of a document, each with its token window and
//!   the feature's activation on every token of the window. Firings above the current floor go into a pool of
//!   up to `POOL_FACTOR`` · k` entries; a full pool is cut back to its k largest by the trainer's TopK
//!   selection ([`topk_indices`]: the largest values, ties to the earlier firing), which also makes the final
//!   choice, so insertions cost O(1) amortised instead of a scan of the k kept ones;
//! - a uniform reservoir sample of the firings (with windows), grouped afterwards into intervals of the
//!   maximum activation: the lower-quantile examples;
//! - the firing count and a log-spaced histogram of the nonzero activations (quantiles are read off it).
//!
//! What is subtle: a window can reach past the end of a chunk. Each chunk therefore keeps `after` tokens
//! unprocessed at its end and carries them, with `before` tokens of left context, into the next chunk, where
//! they are encoded again (the encoding of a token does not depend on its neighbours, except under BatchTopK,
//! whose batch-global selection then sees a slightly different batch).

use super::record::{Example, ExamplesQuantile, FeatureRecord, QUANTILES, cantor};
use crate::backend::cpu::encode::{LayerCodes, encode_all, topk_indices};
use crate::clt::{Activation, CltConfig, Params};
use crate::rng::Rng;
use crate::store::{BlockReader, Dataset};
use crate::{Error, Result};
use rayon::prelude::*;

/// Histogram bins per decade and the decades covered (`10^LOG_MIN .. 10^LOG_MAX`); values outside land in the
/// first or last bin.
const BINS_PER_DECADE: usize = 8;
const LOG_MIN: i32 = -4;
const LOG_MAX: i32 = 4;
const N_BINS: usize = (LOG_MAX - LOG_MIN) as usize * BINS_PER_DECADE;
/// A feature's pool of top candidates holds up to this many times `top_k` entries before it is cut to `top_k`
/// (each entry holds its window, so this factor is also the top examples' memory over the k kept).
const POOL_FACTOR: usize = 2;

/// How much to keep per feature.
#[derive(Clone, Debug)]
pub struct AnalysisConfig {
    /// Top activating examples per feature.
    pub top_k: usize,
    /// Examples sampled uniformly from the firings (split into lower-quantile groups).
    pub n_samples: usize,
    /// Tokens of left and right context in an example's window.
    pub before: usize,
    pub after: usize,
    /// Tokens encoded at once.
    pub chunk_tokens: usize,
    /// Stop after this many tokens (all when `None`).
    pub max_tokens: Option<u64>,
    /// Seed of the reservoir sampling.
    pub seed: u64,
    /// Hide the progress bar.
    pub quiet: bool,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            top_k: 20,
            n_samples: 24,
            before: 12,
            after: 4,
            chunk_tokens: 4096,
            max_tokens: None,
            seed: 0,
            quiet: true,
        }
    }
}

/// A window of consecutive tokens of one document around a chosen token.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub token_ids: Vec<u32>,
    pub acts: Vec<f32>,
    /// Index in the window of the chosen token.
    pub center: usize,
    pub doc: u64,
    pub position: u32,
}

#[derive(Clone, Debug)]
struct Entry {
    act: f32,
    win: Window,
}

/// The rows of the current chunk: inputs `[T][L][d]` and the token metadata.
#[derive(Default)]
struct Rows {
    x: Vec<f32>,
    tokens: Vec<u32>,
    positions: Vec<u32>,
    docs: Vec<u64>,
}

impl Rows {
    fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether rows `i` and `i + 1` are consecutive tokens of one document.
    fn joined(&self, i: usize) -> bool {
        self.docs[i] == self.docs[i + 1]
            && self.positions[i + 1] == self.positions[i].wrapping_add(1)
    }

    fn drain_front(&mut self, n: usize, row: usize) {
        self.x.drain(..n * row);
        self.tokens.drain(..n);
        self.positions.drain(..n);
        self.docs.drain(..n);
    }
}

/// The running statistics of one layer's features.
struct LayerState {
    count: Vec<u64>,
    min: Vec<f32>,
    max: Vec<f32>,
    hist: Vec<u32>,
    /// Each feature's pool of top candidates, in the order they were taken in (a firing that displaces an
    /// overlapping one of the same document takes its place).
    top: Vec<Vec<Entry>>,
    /// The smallest activation kept by the last cut of the pool (−∞ before the first): nothing at or below it
    /// can reach the top k.
    top_floor: Vec<f32>,
    samples: Vec<Vec<Entry>>,
    rng: Rng,
}

fn bin_of(a: f32) -> usize {
    if a <= 0.0 {
        return 0;
    }
    let b = ((a as f64).log10() - LOG_MIN as f64) * BINS_PER_DECADE as f64;
    (b.floor().max(0.0) as usize).min(N_BINS - 1)
}

fn bin_edge(i: usize) -> f32 {
    10f64.powf(LOG_MIN as f64 + i as f64 / BINS_PER_DECADE as f64) as f32
}

/// The activation of feature `f` on token `t` (0 when it is not in the token's list). With `sorted` (each
/// token's entries in increasing feature order, as the encoder emits them) a binary search, else a scan.
fn act_of(codes: &LayerCodes, sorted: bool, t: usize, f: u32) -> f32 {
    let r = codes.offsets[t]..codes.offsets[t + 1];
    let feats = &codes.feat[r.clone()];
    let i = if sorted {
        feats.binary_search(&f).ok()
    } else {
        feats.iter().position(|&g| g == f)
    };
    i.map_or(0.0, |i| codes.act[r.start + i])
}

/// Whether every token's entries are in increasing feature order.
fn sorted_per_token(codes: &LayerCodes) -> bool {
    codes
        .offsets
        .windows(2)
        .all(|w| codes.feat[w[0]..w[1]].windows(2).all(|p| p[0] < p[1]))
}

impl LayerState {
    fn new(f_n: usize, seed: u64) -> Self {
        LayerState {
            count: vec![0; f_n],
            min: vec![f32::INFINITY; f_n],
            max: vec![f32::NEG_INFINITY; f_n],
            hist: vec![0; f_n * N_BINS],
            top: vec![Vec::new(); f_n],
            top_floor: vec![f32::NEG_INFINITY; f_n],
            samples: vec![Vec::new(); f_n],
            rng: Rng::seed(seed),
        }
    }

    fn window(
        rows: &Rows,
        codes: &LayerCodes,
        sorted: bool,
        t: usize,
        f: u32,
        cfg: &AnalysisConfig,
    ) -> Window {
        let mut lo = t;
        while lo > 0 && t - lo < cfg.before && rows.joined(lo - 1) {
            lo -= 1;
        }
        let mut hi = t;
        while hi + 1 < rows.len() && hi - t < cfg.after && rows.joined(hi) {
            hi += 1;
        }
        Window {
            token_ids: rows.tokens[lo..=hi].to_vec(),
            acts: (lo..=hi).map(|j| act_of(codes, sorted, j, f)).collect(),
            center: t - lo,
            doc: rows.docs[t],
            position: rows.positions[t],
        }
    }

    /// Takes in the firings of tokens `own` of the chunk.
    fn absorb(
        &mut self,
        codes: &LayerCodes,
        rows: &Rows,
        own: std::ops::Range<usize>,
        cfg: &AnalysisConfig,
    ) {
        let span = (cfg.before + cfg.after) as u32;
        let sorted = sorted_per_token(codes);
        for t in own {
            for e in codes.offsets[t]..codes.offsets[t + 1] {
                let a = codes.act[e];
                if a == 0.0 {
                    continue;
                }
                let f = codes.feat[e];
                let fi = f as usize;
                self.count[fi] += 1;
                self.min[fi] = self.min[fi].min(a);
                self.max[fi] = self.max[fi].max(a);
                self.hist[fi * N_BINS + bin_of(a)] += 1;
                if cfg.top_k > 0 && a > self.top_floor[fi] {
                    self.offer_top(fi, a, rows, codes, sorted, t, cfg, span);
                }
                if cfg.n_samples > 0 {
                    let n = self.count[fi];
                    let slot = if self.samples[fi].len() < cfg.n_samples {
                        Some(self.samples[fi].len())
                    } else {
                        Some(self.rng.below(n as usize)).filter(|&j| j < cfg.n_samples)
                    };
                    if let Some(j) = slot {
                        let entry = Entry {
                            act: a,
                            win: Self::window(rows, codes, sorted, t, f, cfg),
                        };
                        if j == self.samples[fi].len() {
                            self.samples[fi].push(entry);
                        } else {
                            self.samples[fi][j] = entry;
                        }
                    }
                }
            }
        }
    }

    fn offer_top(
        &mut self,
        fi: usize,
        a: f32,
        rows: &Rows,
        codes: &LayerCodes,
        sorted: bool,
        t: usize,
        cfg: &AnalysisConfig,
        span: u32,
    ) {
        let (doc, pos) = (rows.docs[t], rows.positions[t]);
        let top = &mut self.top[fi];
        // One example per stretch of a document: a firing whose window overlaps a kept one competes with it.
        let near = top
            .iter()
            .position(|e| e.win.doc == doc && e.win.position.abs_diff(pos) <= span);
        let slot = match near {
            Some(i) if top[i].act >= a => return,
            Some(i) => i,
            None => top.len(),
        };
        let entry = Entry {
            act: a,
            win: Self::window(rows, codes, sorted, t, fi as u32, cfg),
        };
        if slot == top.len() {
            top.push(entry);
        } else {
            top[slot] = entry;
        }
        if top.len() >= POOL_FACTOR * cfg.top_k {
            keep_top(top, cfg.top_k);
            self.top_floor[fi] = top.iter().map(|e| e.act).fold(f32::INFINITY, f32::min);
        }
    }
}

/// The indices (increasing) of the `k` largest activations of `pool`, by the trainer's TopK selection.
fn top_of(pool: &[Entry], k: usize) -> Vec<u32> {
    let acts: Vec<f32> = pool.iter().map(|e| e.act).collect();
    topk_indices(&acts, k)
}

/// Cuts `pool` to its `k` largest activations, keeping the pool's order.
fn keep_top(pool: &mut Vec<Entry>, k: usize) {
    if pool.len() <= k {
        return;
    }
    let keep = top_of(pool, k);
    let mut it = keep.iter().peekable();
    let mut i = 0usize;
    pool.retain(|_| {
        let kept = it.next_if(|&&j| j as usize == i).is_some();
        i += 1;
        kept
    });
}

/// Per-feature results of the pass, before tokens are decoded and logit effects added.
pub struct Analysis {
    pub n_layers: usize,
    pub n_features: usize,
    pub n_tokens: u64,
    /// Top examples kept per feature.
    top_k: usize,
    layers: Vec<LayerState>,
}

/// Streams `ds` once (in order) through the encoder of `params` (in the store's units: fold the normalisation
/// in first, [`crate::clt::export::fold_norms`]).
pub fn analyse(
    cfg: &CltConfig,
    params: &Params,
    ds: &Dataset,
    acfg: &AnalysisConfig,
) -> Result<Analysis> {
    let dims = ds.dims();
    if dims.n_layers != cfg.n_layers || dims.d_model != cfg.d_model {
        return Err(Error::Shape {
            what: format!("store {} against the transcoder", ds.dir().display()),
            expected: vec![cfg.n_layers, cfg.d_model],
            got: vec![dims.n_layers, dims.d_model],
        });
    }
    let (l_n, d, f_n) = (cfg.n_layers, cfg.d_model, cfg.n_features);
    let row = l_n * d;
    let thetas: Vec<Vec<f32>> = match cfg.activation {
        Activation::JumpRelu => params
            .log_theta
            .iter()
            .map(|t| t.iter().map(|v| v.exp()).collect())
            .collect(),
        _ => vec![Vec::new(); l_n],
    };
    let mut layers: Vec<LayerState> = (0..l_n)
        .map(|l| {
            LayerState::new(
                f_n,
                acfg.seed ^ (l as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            )
        })
        .collect();
    let total = acfg
        .max_tokens
        .map_or(ds.n_tokens(), |m| m.min(ds.n_tokens()));
    let bar = if acfg.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total)
    };
    let chunk = acfg.chunk_tokens.max(1);
    let mut rows = Rows::default();
    let mut done = 0usize; // rows at the front of `rows` already taken in (left context only)
    let mut read = 0u64;
    let mut n_tokens = 0u64;
    let mut reader = BlockReader::new()?;
    let blocks: Vec<(usize, usize)> = ds
        .shards()
        .iter()
        .enumerate()
        .flat_map(|(s, sh)| (0..sh.blocks().len()).map(move |b| (s, b)))
        .collect();
    let mut next = 0;
    loop {
        // Fill the chunk.
        while rows.len() < done + chunk + acfg.after && next < blocks.len() && read < total {
            let (s, b) = blocks[next];
            next += 1;
            let block = reader.read(&ds.shards()[s], b)?;
            let n = (block.n_tokens() as u64).min(total - read) as usize;
            let old = rows.x.len();
            rows.x.resize(old + n * row, 0.0);
            block.x_rows(0, &mut rows.x[old..]);
            rows.tokens.extend(block.tokens().take(n));
            rows.positions.extend(block.positions().take(n));
            rows.docs.extend(block.doc_ids().take(n));
            read += n as u64;
        }
        let last = next >= blocks.len() || read >= total;
        let n = rows.len();
        let own_end = if last {
            n
        } else {
            n.saturating_sub(acfg.after)
        };
        if own_end > done {
            let codes = encode_all(cfg, params, &rows.x, n, &thetas, 0.0);
            layers
                .par_iter_mut()
                .zip(codes.par_iter())
                .for_each(|(state, c)| state.absorb(c, &rows, done..own_end, acfg));
            n_tokens += (own_end - done) as u64;
            bar.inc((own_end - done) as u64);
        }
        if last {
            break;
        }
        let drop = own_end.saturating_sub(acfg.before);
        rows.drain_front(drop, row);
        done = own_end - drop;
    }
    bar.finish_and_clear();
    Ok(Analysis {
        n_layers: l_n,
        n_features: f_n,
        n_tokens,
        top_k: acfg.top_k,
        layers,
    })
}

impl Analysis {
    /// The dashboard record of feature `f` of layer `l`, tokens shown by `piece`; logit effects are left empty.
    pub fn record(
        &self,
        l: usize,
        f: usize,
        scan: &str,
        piece: &dyn Fn(u32) -> String,
    ) -> FeatureRecord {
        let s = &self.layers[l];
        let count = s.count[f];
        let example = |e: &Entry| Example {
            tokens: e.win.token_ids.iter().map(|&t| piece(t)).collect(),
            tokens_acts_list: e.win.acts.clone(),
            train_token_ind: e.win.center,
            is_repeated_datapoint: false,
            token_ids: e.win.token_ids.clone(),
            doc_id: e.win.doc,
            position: e.win.position,
        };
        let mut top: Vec<&Entry> = top_of(&s.top[f], self.top_k)
            .into_iter()
            .map(|i| &s.top[f][i as usize])
            .collect();
        top.sort_by(|a, b| b.act.total_cmp(&a.act));
        let mut groups = vec![ExamplesQuantile {
            quantile_name: "Top activations".into(),
            examples: top.iter().map(|e| example(e)).collect(),
        }];
        let max = if count > 0 { s.max[f] } else { 0.0 };
        let mut samples: Vec<&Entry> = s.samples[f].iter().collect();
        samples.sort_by(|a, b| b.act.total_cmp(&a.act));
        for (lo, hi) in [(0.5, 1.0), (0.25, 0.5), (0.0, 0.25)] {
            let ex: Vec<Example> = samples
                .iter()
                .filter(|e| e.act > lo * max && e.act <= hi * max)
                .map(|e| example(e))
                .collect();
            if !ex.is_empty() {
                groups.push(ExamplesQuantile {
                    quantile_name: format!(
                        "Sample: {:.0}–{:.0}% of the maximum activation",
                        lo * 100.0,
                        hi * 100.0
                    ),
                    examples: ex,
                });
            }
        }
        let hist = &s.hist[f * N_BINS..(f + 1) * N_BINS];
        let (first, last) = match (
            hist.iter().position(|&c| c > 0),
            hist.iter().rposition(|&c| c > 0),
        ) {
            (Some(a), Some(b)) => (a, b + 1),
            _ => (0, 0),
        };
        let mut quantile_values = Vec::new();
        if count > 0 {
            for q in QUANTILES {
                let target = q * count as f64;
                let mut acc = 0u64;
                let mut v = s.max[f];
                for (i, &c) in hist.iter().enumerate() {
                    if (acc + c as u64) as f64 >= target && c > 0 {
                        let frac = (target - acc as f64) / c as f64;
                        let (a, b) = (bin_edge(i), bin_edge(i + 1));
                        v = (a + (b - a) * frac as f32).clamp(s.min[f], s.max[f]);
                        break;
                    }
                    acc += c as u64;
                }
                quantile_values.push(v);
            }
        }
        FeatureRecord {
            transcoder_id: scan.to_string(),
            index: cantor(l as u64, f as u64),
            layer: l as u32,
            feature: f as u32,
            examples_quantiles: groups,
            act_min: if count > 0 { s.min[f] } else { 0.0 },
            act_max: max,
            quantile_values,
            histogram: hist[first..last].iter().map(|&c| c as f32).collect(),
            histogram_edges: if last > first {
                (first..=last).map(bin_edge).collect()
            } else {
                Vec::new()
            },
            activation_frequency: if self.n_tokens > 0 {
                count as f64 / self.n_tokens as f64
            } else {
                0.0
            },
            n_active: count,
            n_tokens: self.n_tokens,
            ..FeatureRecord::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_cover_the_range() {
        assert_eq!(bin_of(0.0), 0);
        assert_eq!(bin_of(1e-9), 0);
        assert_eq!(bin_of(1e9), N_BINS - 1);
        let b = bin_of(1.0);
        assert!(bin_edge(b) <= 1.0 && 1.0 < bin_edge(b + 1));
        let b = bin_of(3.7);
        assert!(bin_edge(b) <= 3.7 && 3.7 < bin_edge(b + 1));
    }

    /// The pool's cut keeps the k largest activations (ties to the earlier entry) in pool order, whatever the
    /// order they came in.
    #[test]
    fn pool_cut_keeps_the_largest_in_order() {
        let entry = |act: f32, position: u32| Entry {
            act,
            win: Window {
                token_ids: vec![],
                acts: vec![],
                center: 0,
                doc: 0,
                position,
            },
        };
        let mut rng = Rng::seed(7);
        for n in [0usize, 1, 3, 10, 41] {
            for k in [1usize, 3, 10] {
                // Values on a coarse grid, so ties happen.
                let acts: Vec<f32> = (0..n).map(|_| rng.below(6) as f32 * 0.5).collect();
                let mut pool: Vec<Entry> = acts
                    .iter()
                    .enumerate()
                    .map(|(i, &a)| entry(a, i as u32))
                    .collect();
                keep_top(&mut pool, k);
                let mut want: Vec<usize> = (0..n).collect();
                want.sort_by(|&i, &j| acts[j].total_cmp(&acts[i]).then(i.cmp(&j)));
                want.truncate(k);
                want.sort_unstable();
                let got: Vec<usize> = pool.iter().map(|e| e.win.position as usize).collect();
                assert_eq!(got, want, "n {n} k {k} acts {acts:?}");
            }
        }
    }
}

//! Building an attribution graph: logit targets, then feature targets (all of them, or explored by
//! influence on the logits), each row one batched linearised backward pass.

use std::time::Instant;

use super::backward::{
    Columns, Injection, attribute_batch, feature_vector, logit_vector, mean_unembedding,
};
use super::linear::{Attributable, Linear};
use super::prune::Adjacency;
use super::replacement::{ActiveFeatures, PromptState, ReplacementTranscoder, prompt_state};
use crate::model::AttnPattern;
use crate::{Error, Result};

/// The options of [`attribute`], with circuit-tracer's defaults.
#[derive(Clone, Debug)]
pub struct AttributionConfig {
    /// Most logit targets (`max_n_logits`, 10).
    pub max_n_logits: usize,
    /// Keep the fewest top logits whose probabilities add up to this (`desired_logit_prob`, 0.95).
    pub desired_logit_prob: f64,
    /// Most feature nodes (`max_feature_nodes`; `None`: every active feature).
    pub max_feature_nodes: Option<usize>,
    /// Feature rows per ranking batch during exploration (`batch_size`, 512).
    pub batch_size: usize,
    /// Ranking batches between influence updates (`update_interval`, 4).
    pub update_interval: usize,
    /// Targets per backward pass; 0 picks from the prompt's size (memory for the gradients ≈ 256 MiB).
    pub backward_batch: usize,
    /// Refuse to start when the prompt's recorded forward, or then the adjacency, would need more bytes than
    /// this (default: 90% of the memory available at each check).
    pub memory_limit: Option<u64>,
    /// Show a progress bar.
    pub progress: bool,
    /// The logit rows to attribute; empty: the top tokens (`max_n_logits`, `desired_logit_prob`).
    pub targets: Vec<LogitTarget>,
}

/// What a logit row attributes (circuit-tracer's `attribution_targets`): one token's demeaned logit, or the
/// difference of two tokens' logits (a custom target such as `W_U[Austin] − W_U[Dallas]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitTarget {
    Token(u32),
    /// `logit(a) − logit(b)`.
    Difference(u32, u32),
}

impl Default for AttributionConfig {
    fn default() -> Self {
        AttributionConfig {
            max_n_logits: 10,
            desired_logit_prob: 0.95,
            max_feature_nodes: None,
            batch_size: 512,
            update_interval: 4,
            backward_batch: 0,
            memory_limit: None,
            progress: false,
            targets: Vec::new(),
        }
    }
}

/// Where the time of one graph went.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    pub forward: f64,
    pub logit_rows: f64,
    pub feature_rows: f64,
    pub ranking: f64,
    pub total: f64,
    /// Floating-point operations of the backward passes' products (attention and feature edges).
    pub flops: f64,
}

/// An unpruned attribution graph: circuit-tracer's `Graph`.
#[derive(Clone, Debug)]
pub struct Graph {
    pub tokens: Vec<u32>,
    pub n_layers: usize,
    /// Every active feature of the prompt.
    pub active: ActiveFeatures,
    /// The feature nodes, as indices into `active`, ascending.
    pub selected: Vec<usize>,
    /// Per logit row: its token, or for a [`LogitTarget::Difference`] the id `vocab_size + row` (as
    /// circuit-tracer numbers custom targets).
    pub logit_tokens: Vec<u32>,
    /// Per logit row: its weight in pruning and the scores (a token's probability; 1 for a difference).
    pub logit_probs: Vec<f32>,
    /// What each logit row attributes.
    pub logit_targets: Vec<LogitTarget>,
    pub adjacency: Adjacency,
    pub timings: Timings,
}

impl Graph {
    /// (layer, position, feature index, activation) of feature node `i`.
    pub fn feature(&self, i: usize) -> (usize, usize, usize, f32) {
        let s = self.selected[i];
        let a = &self.active;
        (
            a.layer[s] as usize,
            a.pos[s] as usize,
            a.index[s] as usize,
            a.value[s],
        )
    }

    pub fn n_pos(&self) -> usize {
        self.tokens.len()
    }
}

/// The logit targets: the top `max_n` tokens of the softmax, cut to the fewest whose cumulative
/// probability reaches `desired` (probabilities not renormalised; ties go to the lower token id).
pub fn select_logits(logits: &[f32], max_n: usize, desired: f64) -> Result<(Vec<u32>, Vec<f32>)> {
    if max_n == 0 {
        return Err(Error::config("max_n_logits", "must be at least 1"));
    }
    if logits.is_empty() || logits.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "logits of the last position".into(),
            step: 0,
        });
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let e: Vec<f64> = logits.iter().map(|&v| (v as f64 - max).exp()).collect();
    let z: f64 = e.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| e[b].total_cmp(&e[a]).then(a.cmp(&b)));
    order.truncate(max_n.min(logits.len()));
    let mut cum = 0.0;
    let mut cut = order.len();
    for (i, &t) in order.iter().enumerate() {
        cum += e[t] / z;
        if cum >= desired {
            cut = i + 1;
            break;
        }
    }
    order.truncate(cut);
    Ok((
        order.iter().map(|&t| t as u32).collect(),
        order.iter().map(|&t| (e[t] / z) as f32).collect(),
    ))
}

/// The logit rows of explicit `targets`: each one's token id (`vocab + row` for a difference), and its
/// weight (a token's probability under `logits`; 1 for a difference).
fn resolve_targets(
    targets: &[LogitTarget],
    logits: &[f32],
) -> Result<(Vec<LogitTarget>, Vec<u32>, Vec<f32>)> {
    let vocab = logits.len();
    let probs = crate::model::forward::softmax(logits);
    let check = |t: u32| -> Result<()> {
        if (t as usize) < vocab {
            Ok(())
        } else {
            Err(Error::config(
                "target",
                format!("token {t} is outside the vocabulary of {vocab}"),
            ))
        }
    };
    let (mut ids, mut weights) = (Vec::new(), Vec::new());
    for (j, &t) in targets.iter().enumerate() {
        match t {
            LogitTarget::Token(t) => {
                check(t)?;
                ids.push(t);
                weights.push(probs[t as usize]);
            }
            LogitTarget::Difference(a, b) => {
                check(a)?;
                check(b)?;
                if a == b {
                    return Err(Error::config(
                        "target",
                        format!("the difference of token {a} with itself is zero"),
                    ));
                }
                ids.push((vocab + j) as u32);
                weights.push(1.0);
            }
        }
    }
    Ok((targets.to_vec(), ids, weights))
}

/// A target row to compute.
#[derive(Clone, Copy, Debug)]
enum Target {
    Logit(usize),
    Feature(usize),
}

/// Rows computed during exploration, each kept only over its causal cone: a feature target of layer `l`
/// has non-zero entries only for features of layers below `l`, errors of layers below `l`, and tokens.
struct RowStore {
    data: Vec<f32>,
    rows: Vec<StoredRow>,
}

#[derive(Clone, Copy)]
struct StoredRow {
    target: Target,
    off: usize,
    feat_len: usize,
    err_len: usize,
    abs_sum: f64,
}

impl RowStore {
    fn push(
        &mut self,
        target: Target,
        row: &[f32],
        cols: &Columns,
        feat_len: usize,
        err_len: usize,
    ) {
        let off = self.data.len();
        let n_err = cols.n_layers * cols.n_pos;
        let parts = [
            &row[..feat_len],
            &row[cols.n_features..cols.n_features + err_len],
            &row[cols.n_features + n_err..],
        ];
        let mut abs_sum = 0.0f64;
        for p in parts {
            self.data.extend_from_slice(p);
            abs_sum += p.iter().map(|v| v.abs() as f64).sum::<f64>();
        }
        self.rows.push(StoredRow {
            target,
            off,
            feat_len,
            err_len,
            abs_sum,
        });
    }

    /// Calls `f(column, value)` for every stored entry of row `r`.
    fn for_each(&self, r: &StoredRow, cols: &Columns, mut f: impl FnMut(usize, f32)) {
        let n_err = cols.n_layers * cols.n_pos;
        let d = &self.data[r.off..];
        for (j, &v) in d[..r.feat_len].iter().enumerate() {
            f(j, v);
        }
        for (j, &v) in d[r.feat_len..r.feat_len + r.err_len].iter().enumerate() {
            f(cols.n_features + j, v);
        }
        let t0 = r.feat_len + r.err_len;
        for (j, &v) in d[t0..t0 + cols.n_pos].iter().enumerate() {
            f(cols.n_features + n_err + j, v);
        }
    }
}

/// circuit-tracer's `compute_partial_influences`: the influence on the logits of every source column,
/// through the rows computed so far (rows normalised by their absolute sums, clamped at 1e-8).
fn partial_influence(store: &RowStore, cols: &Columns, probs: &[f32]) -> Result<Vec<f64>> {
    let n_src = cols.len();
    let node = |t: Target| match t {
        Target::Feature(s) => s,
        Target::Logit(j) => n_src + j,
    };
    let mut prod = vec![0.0f64; n_src + probs.len()];
    for (j, &p) in probs.iter().enumerate() {
        prod[n_src + j] = p as f64;
    }
    let mut infl = vec![0.0f64; n_src];
    for _ in 0..128 {
        let mut next = vec![0.0f64; n_src + probs.len()];
        for r in &store.rows {
            let c = prod[node(r.target)];
            if c == 0.0 {
                continue;
            }
            let f = c / r.abs_sum.max(1e-8);
            store.for_each(r, cols, |j, v| next[j] += f * v.abs() as f64);
        }
        if next.iter().all(|&v| v == 0.0) {
            return Ok(infl);
        }
        infl.iter_mut().zip(&next).for_each(|(i, n)| *i += n);
        prod = next;
    }
    Err(Error::InvalidData {
        what: "partial influence".into(),
        reason: "partial influence did not converge in 128 iterations".into(),
    })
}

/// Bytes of what the prompt's forward records for `n` positions: every layer's attention pattern
/// ([`AttnPattern::bytes_for`]) and, per layer and position, the transcoder's input, the MLP's output and the
/// error node's vector (`d` floats each).
pub fn recorded_bytes(lin: &Linear, n: usize) -> u64 {
    let per_layer =
        AttnPattern::bytes_for(lin.n_heads, n) as u64 + 3 * 4 * (n * lin.d_model) as u64;
    lin.n_layers as u64 * per_layer
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Bytes free for the graph: the `MemAvailable` of /proc/meminfo, when readable.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses, before it runs, a prompt of `n` tokens whose recorded forward ([`recorded_bytes`]: every layer's
/// attention pattern and per-position vectors, what attribution and interventions keep) would not fit in
/// `limit` bytes (default: 90% of the memory available), rather than end in the allocator.
pub fn check_recorded_fits(model: &dyn Attributable, n: usize, limit: Option<u64>) -> Result<()> {
    let lin = model.linear();
    let need = recorded_bytes(&lin, n);
    if let Some(limit) = limit.or_else(|| available_memory().map(|b| b / 10 * 9))
        && need > limit
    {
        return Err(Error::config(
            "prompt",
            format!(
                "a prompt of {n} tokens needs about {:.1} GiB for its recorded forward (attention patterns of \
                 {} layers × {} heads, the MLPs' inputs and outputs), more than the {:.1} GiB available: \
                 shorten the prompt",
                gib(need),
                lin.n_layers,
                lin.n_heads,
                gib(limit)
            ),
        ));
    }
    Ok(())
}

/// Computes the attribution graph of `tokens` (which should start with the model's BOS token).
pub fn attribute(
    model: &dyn Attributable,
    tc: &ReplacementTranscoder,
    tokens: &[u32],
    cfg: &AttributionConfig,
) -> Result<Graph> {
    let t_start = Instant::now();
    if cfg.batch_size == 0 || cfg.update_interval == 0 {
        return Err(Error::config(
            "batch_size",
            "batch_size and update_interval must be at least 1",
        ));
    }
    check_recorded_fits(model, tokens.len(), cfg.memory_limit)?;
    let lin = model.linear();
    let st = prompt_state(model, tc, tokens)?;
    let mut timings = Timings {
        forward: t_start.elapsed().as_secs_f64(),
        ..Timings::default()
    };
    let (logit_kinds, logit_tokens, logit_probs) = if cfg.targets.is_empty() {
        let (t, p) = select_logits(&st.logits, cfg.max_n_logits, cfg.desired_logit_prob)?;
        (t.iter().map(|&t| LogitTarget::Token(t)).collect(), t, p)
    } else {
        resolve_targets(&cfg.targets, &st.logits)?
    };
    let l_n = lin.n_layers;
    let n = st.n;
    let n_act = st.features.len();
    let cols = Columns {
        n_features: n_act,
        n_layers: l_n,
        n_pos: n,
    };
    let n_sel = cfg.max_feature_nodes.unwrap_or(n_act).min(n_act);
    let explore = n_sel < n_act;
    let n_rows = n_sel + logit_tokens.len();
    let final_cols = n_sel + (l_n + 1) * n;
    let bytes = if explore {
        (n_rows * cols.len() + n_rows * final_cols) as u64 * 4
    } else {
        (n_rows * final_cols) as u64 * 4
    };
    let limit = cfg
        .memory_limit
        .or_else(|| available_memory().map(|b| b / 10 * 9));
    if let Some(limit) = limit
        && bytes > limit
    {
        return Err(Error::config(
            "max_feature_nodes",
            format!(
                "{n_sel} feature nodes of {n_act} active over {n} positions need about {:.1} GiB for the \
                 adjacency, more than the {:.1} GiB available: lower --max-feature-nodes",
                gib(bytes),
                gib(limit)
            ),
        ));
    }
    let k_batch = if cfg.backward_batch > 0 {
        cfg.backward_batch
    } else {
        let per = 4 * (n * lin.d_model.max(lin.q_dim()) * 3 + cols.len() * 2);
        ((256usize << 20) / per.max(1)).clamp(1, 256)
    };
    let mean_u = mean_unembedding(&lin);
    let bar = progress_bar(cfg.progress, n_rows as u64);

    let injection = |t: Target| -> Injection {
        match t {
            Target::Logit(j) => Injection {
                layer: l_n,
                pos: n - 1,
                vector: match logit_kinds[j] {
                    LogitTarget::Token(t) => logit_vector(&lin, &st, t as usize, &mean_u),
                    LogitTarget::Difference(a, b) => {
                        let va = logit_vector(&lin, &st, a as usize, &mean_u);
                        let vb = logit_vector(&lin, &st, b as usize, &mean_u);
                        va.iter().zip(&vb).map(|(x, y)| x - y).collect()
                    }
                },
            },
            Target::Feature(s) => {
                let (l, p, f) = (
                    st.features.layer[s] as usize,
                    st.features.pos[s] as usize,
                    st.features.index[s] as usize,
                );
                Injection {
                    layer: l,
                    pos: p,
                    vector: feature_vector(&lin, tc, &st, l, p, f),
                }
            }
        }
    };
    // Runs `targets` (sorted by layer and position for tight causal cones) in backward batches and hands
    // each row to `sink`.
    let flops = std::cell::Cell::new(0.0f64);
    let run = |targets: &[Target], sink: &mut dyn FnMut(Target, &[f32])| {
        for chunk in targets.chunks(k_batch) {
            let inj: Vec<Injection> = chunk.iter().map(|&t| injection(t)).collect();
            let (rows, f) = attribute_batch(&lin, tc, &st, &inj);
            flops.set(flops.get() + f);
            for (i, &t) in chunk.iter().enumerate() {
                sink(t, &rows[i * cols.len()..(i + 1) * cols.len()]);
            }
            if let Some(b) = &bar {
                b.inc(chunk.len() as u64);
            }
        }
    };
    let logit_targets: Vec<Target> = (0..logit_tokens.len()).map(Target::Logit).collect();
    let sort_by_cone = |v: &mut Vec<usize>| {
        v.sort_by_key(|&s| (st.features.layer[s], st.features.pos[s], s));
    };

    let (adjacency, selected) = if !explore {
        // Every active feature is a node: rows go straight into the final adjacency.
        let n_src = cols.len();
        let mut a = Adjacency {
            n_features: n_act,
            n_errors: l_n * n,
            n_tokens: n,
            n_logits: logit_tokens.len(),
            rows: vec![0.0; n_rows * n_src],
        };
        let t0 = Instant::now();
        run(&logit_targets, &mut |t, row| {
            if let Target::Logit(j) = t {
                a.rows[(n_act + j) * n_src..(n_act + j + 1) * n_src].copy_from_slice(row);
            }
        });
        timings.logit_rows = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let feats: Vec<Target> = (0..n_act).map(Target::Feature).collect();
        run(&feats, &mut |t, row| {
            if let Target::Feature(s) = t {
                a.rows[s * n_src..(s + 1) * n_src].copy_from_slice(row);
            }
        });
        timings.feature_rows = t0.elapsed().as_secs_f64();
        (a, (0..n_act).collect::<Vec<usize>>())
    } else {
        let mut store = RowStore {
            data: Vec::new(),
            rows: Vec::new(),
        };
        let cone = |t: Target| match t {
            Target::Logit(_) => (n_act, l_n * n),
            Target::Feature(s) => {
                let l = st.features.layer[s] as usize;
                (st.features.layer_range(l).start, l * n)
            }
        };
        let t0 = Instant::now();
        run(&logit_targets, &mut |t, row| {
            let (f, e) = cone(t);
            store.push(t, row, &cols, f, e)
        });
        timings.logit_rows = t0.elapsed().as_secs_f64();
        let mut visited = vec![false; n_act];
        let mut n_visited = 0;
        while n_visited < n_sel {
            let tr = Instant::now();
            let infl = partial_influence(&store, &cols, &logit_probs)?;
            let mut rank: Vec<usize> = (0..n_act).filter(|&s| !visited[s]).collect();
            rank.sort_by(|&a, &b| infl[b].total_cmp(&infl[a]).then(a.cmp(&b)));
            rank.truncate((cfg.update_interval * cfg.batch_size).min(n_sel - n_visited));
            timings.ranking += tr.elapsed().as_secs_f64();
            for &s in &rank {
                visited[s] = true;
            }
            n_visited += rank.len();
            let tf = Instant::now();
            // Within one ranking update the order of computation does not matter: sort by cone.
            sort_by_cone(&mut rank);
            let targets: Vec<Target> = rank.iter().map(|&s| Target::Feature(s)).collect();
            run(&targets, &mut |t, row| {
                let (f, e) = cone(t);
                store.push(t, row, &cols, f, e)
            });
            timings.feature_rows += tf.elapsed().as_secs_f64();
        }
        let selected = (0..n_act).filter(|&s| visited[s]).collect();
        (
            compact(&store, &cols, &visited, logit_tokens.len()),
            selected,
        )
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    timings.total = t_start.elapsed().as_secs_f64();
    timings.flops = flops.get();
    let PromptState {
        tokens, features, ..
    } = st;
    Ok(Graph {
        tokens,
        n_layers: l_n,
        active: features,
        selected,
        logit_tokens,
        logit_probs,
        logit_targets: logit_kinds,
        adjacency,
        timings,
    })
}

/// The final adjacency from the explored rows: feature rows in ascending feature order, then the logit
/// rows; columns restricted to the selected features, then all errors and tokens.
fn compact(store: &RowStore, cols: &Columns, visited: &[bool], n_logits: usize) -> Adjacency {
    let n_sel = visited.iter().filter(|&&v| v).count();
    let mut col_of = vec![usize::MAX; cols.n_features];
    let mut k = 0;
    for (s, &v) in visited.iter().enumerate() {
        if v {
            col_of[s] = k;
            k += 1;
        }
    }
    let n_err = cols.n_layers * cols.n_pos;
    let n_src = n_sel + n_err + cols.n_pos;
    let mut a = Adjacency {
        n_features: n_sel,
        n_errors: n_err,
        n_tokens: cols.n_pos,
        n_logits,
        rows: vec![0.0; (n_sel + n_logits) * n_src],
    };
    for r in &store.rows {
        let row = match r.target {
            Target::Feature(s) => col_of[s],
            Target::Logit(j) => n_sel + j,
        };
        let dst = &mut a.rows[row * n_src..(row + 1) * n_src];
        store.for_each(r, cols, |j, v| {
            if j < cols.n_features {
                if col_of[j] != usize::MAX {
                    dst[col_of[j]] = v;
                }
            } else {
                dst[n_sel + (j - cols.n_features)] = v;
            }
        });
    }
    a
}

fn progress_bar(show: bool, total: u64) -> Option<indicatif::ProgressBar> {
    if !show {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b.set_message("attribute");
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logit_selection_cuts_at_the_desired_probability() {
        // Probabilities ∝ e^logit: 0.5, 0.25, 0.125, 0.125 for logits ln 4, ln 2, 0, 0.
        let l = [4f32.ln(), 2f32.ln(), 0.0, 0.0];
        let (t, p) = select_logits(&l, 10, 0.7).unwrap();
        assert_eq!(t, vec![0, 1]);
        assert!((p[0] - 0.5).abs() < 1e-6 && (p[1] - 0.25).abs() < 1e-6);
        // Exactly reaching the target stops there.
        assert_eq!(select_logits(&l, 10, 0.75).unwrap().0, vec![0, 1]);
        // max_n_logits caps, even when the target is not reached; ties go to the lower id.
        assert_eq!(select_logits(&l, 3, 0.99).unwrap().0, vec![0, 1, 2]);
        // A target above 1 keeps max_n_logits (clamped to the vocabulary).
        assert_eq!(select_logits(&l, 10, 1.5).unwrap().0, vec![0, 1, 2, 3]);
        // A target of 0 keeps the top token only.
        assert_eq!(select_logits(&l, 10, 0.0).unwrap().0, vec![0]);
        assert!(select_logits(&l, 0, 0.9).is_err());
        assert!(select_logits(&[1.0, f32::NAN], 2, 0.9).is_err());
    }
}

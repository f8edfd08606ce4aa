//! Writing graphs: the JSON that circuit-tracer's frontend and Neuronpedia read (pruned), and the raw
//! unpruned adjacency with its node table in one safetensors file for programmatic use.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde::Serialize;

use super::graph::{Graph, LogitTarget};
use super::prune::{Pruned, Scores};
use crate::clt::checkpoint::write_atomic;
use crate::model::Tokenizer;
use crate::{Error, Result};

/// The graph JSON's `metadata`.
#[derive(Clone, Debug, Serialize)]
pub struct Metadata {
    pub slug: String,
    pub scan: String,
    pub transcoder_list: Vec<String>,
    pub prompt_tokens: Vec<String>,
    pub prompt: String,
    pub node_threshold: f64,
    pub schema_version: u32,
    /// Ours: the graph's scores (unpruned).
    pub replacement_score: f64,
    pub completeness_score: f64,
}

#[derive(Clone, Debug, Serialize)]
#[allow(non_snake_case)]
pub struct QParams {
    pub pinnedIds: Vec<String>,
    pub supernodes: Vec<Vec<String>>,
    pub linkType: String,
    pub clickedId: String,
    pub sg_pos: String,
}

/// One node as circuit-tracer's frontend reads it.
#[derive(Clone, Debug, Serialize)]
#[allow(non_snake_case)]
pub struct Node {
    pub node_id: String,
    pub feature: i64,
    pub layer: String,
    pub ctx_idx: usize,
    pub feature_type: String,
    pub token_prob: f64,
    pub is_target_logit: bool,
    pub run_idx: u32,
    pub reverse_ctx_idx: u32,
    pub jsNodeId: String,
    pub clerp: String,
    pub influence: Option<f64>,
    pub activation: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Link {
    pub source: String,
    pub target: String,
    pub weight: f64,
}

#[derive(Clone, Debug, Serialize)]
#[allow(non_snake_case)]
pub struct GraphJson {
    pub metadata: Metadata,
    pub qParams: QParams,
    pub nodes: Vec<Node>,
    pub links: Vec<Link>,
}

/// A token as the frontend shows it (circuit-tracer's `process_token`: visible newlines and tabs).
pub fn display_token(s: &str) -> String {
    s.replace('\n', "⏎").replace('\t', "→").replace('\r', "↵")
}

/// A token's text for display; special tokens (which decode to nothing, like BOS) show their piece.
fn token_text(tok: &Tokenizer, t: u32) -> String {
    let s = tok.decode(&[t]);
    if s.is_empty() {
        display_token(&tok.piece(t))
    } else {
        display_token(&s)
    }
}

fn cantor(x: usize, y: usize) -> i64 {
    ((x + y) * (x + y + 1) / 2 + y) as i64
}

/// The nodes of every index of the graph (features, errors, tokens, logits), as circuit-tracer creates them.
fn make_node(g: &Graph, i: usize, tok: &Tokenizer, influence: f64) -> Node {
    let a = &g.adjacency;
    let n = g.n_pos();
    let base = |node_id: String, feature: i64, layer: String, ctx: usize, ty: &str| Node {
        jsNodeId: String::new(),
        node_id,
        feature,
        layer,
        ctx_idx: ctx,
        feature_type: ty.into(),
        token_prob: 0.0,
        is_target_logit: false,
        run_idx: 0,
        reverse_ctx_idx: 0,
        clerp: String::new(),
        influence: Some(influence),
        activation: None,
    };
    if i < a.n_features {
        let (l, p, f, act) = g.feature(i);
        let mut nd = base(
            format!("{l}_{f}_{p}"),
            cantor(l, f),
            l.to_string(),
            p,
            "cross layer transcoder",
        );
        nd.jsNodeId = format!("{l}_{f}-0");
        nd.activation = Some(act as f64);
        nd
    } else if i < a.n_features + a.n_errors {
        let (l, p) = ((i - a.n_features) / n, (i - a.n_features) % n);
        let mut nd = base(
            format!("{l}_-1_{p}"),
            -1,
            l.to_string(),
            p,
            "mlp reconstruction error",
        );
        nd.jsNodeId = format!("{l}_-1-{p}");
        nd
    } else if i < a.n_sources() {
        let p = i - a.n_features - a.n_errors;
        let t = g.tokens[p];
        let mut nd = base(format!("E_{t}_{p}"), p as i64, "E".into(), p, "embedding");
        nd.jsNodeId = format!("E_{t}-{p}");
        nd
    } else {
        let j = i - a.n_sources();
        let (t, prob) = (g.logit_tokens[j], g.logit_probs[j] as f64);
        let what = match g.logit_targets.get(j) {
            Some(&LogitTarget::Difference(a, b)) => {
                format!("\"{}\" − \"{}\"", token_text(tok, a), token_text(tok, b))
            }
            _ => format!("\"{}\" (p={prob:.3})", token_text(tok, t)),
        };
        let layer = (g.n_layers + 1).to_string();
        let mut nd = base(
            format!("{layer}_{t}_{}", n - 1),
            t as i64,
            layer,
            n - 1,
            "logit",
        );
        nd.jsNodeId = format!("L_{t}-{}", n - 1);
        nd.token_prob = prob;
        nd.is_target_logit = j == 0;
        nd.influence = None;
        nd.clerp = format!("Output {what}");
        nd
    }
}

/// The pruned graph in circuit-tracer's JSON: the kept nodes, the kept edges between them (weights from the
/// unpruned adjacency), then only the nodes an edge touches plus every token and logit.
pub fn graph_json(
    g: &Graph,
    pruned: &Pruned,
    scores: &Scores,
    tok: &Tokenizer,
    slug: &str,
    scan: &str,
    prompt: &str,
    node_threshold: f64,
) -> GraphJson {
    let a = &g.adjacency;
    let nodes: HashMap<usize, Node> = (0..a.n_nodes())
        .filter(|&i| pruned.node_mask[i])
        .map(|i| (i, make_node(g, i, tok, pruned.cumulative[i])))
        .collect();
    let mut links = Vec::new();
    let mut used = vec![false; a.n_nodes()];
    for r in 0..a.n_rows() {
        let t = a.row_node(r);
        if !nodes.contains_key(&t) {
            continue;
        }
        for s in 0..a.n_sources() {
            if nodes.contains_key(&s) && pruned.keeps_edge(a, r, s) {
                links.push(Link {
                    source: nodes[&s].node_id.clone(),
                    target: nodes[&t].node_id.clone(),
                    weight: a.row(r)[s] as f64,
                });
                used[s] = true;
                used[t] = true;
            }
        }
    }
    let mut kept: Vec<usize> = nodes.keys().copied().collect();
    kept.sort_unstable();
    let out_nodes = kept
        .into_iter()
        .filter(|&i| used[i] || i >= a.n_features + a.n_errors)
        .map(|i| nodes[&i].clone())
        .collect();
    GraphJson {
        metadata: Metadata {
            slug: slug.into(),
            scan: scan.into(),
            transcoder_list: Vec::new(),
            prompt_tokens: g.tokens.iter().map(|&t| token_text(tok, t)).collect(),
            prompt: prompt.into(),
            node_threshold,
            schema_version: 1,
            replacement_score: scores.replacement,
            completeness_score: scores.completeness,
        },
        qParams: QParams {
            pinnedIds: Vec::new(),
            supernodes: Vec::new(),
            linkType: "both".into(),
            clickedId: String::new(),
            sg_pos: String::new(),
        },
        nodes: out_nodes,
        links,
    }
}

/// Writes the JSON atomically.
pub fn write_json(path: &Path, j: &GraphJson) -> Result<()> {
    let bytes = serde_json::to_vec(j).map_err(|e| Error::InvalidData {
        what: "graph JSON".into(),
        reason: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}

/// Writes the unpruned graph as safetensors: `adjacency` f32 `[n_feature_rows + n_logits, n_sources]`
/// (rows: the selected features then the logits; columns: selected features, errors layer-major, tokens),
/// `features` i32 `[n_selected, 3]` (layer, position, index), `activations` f32, `input_tokens` i32,
/// `logit_tokens` i32, `logit_probabilities` f32; the metadata names the format and the prompt.
pub fn write_raw(path: &Path, g: &Graph, prompt: &str) -> Result<()> {
    let a = &g.adjacency;
    let mut feats = Vec::with_capacity(a.n_features * 3);
    let mut acts = Vec::with_capacity(a.n_features);
    for i in 0..a.n_features {
        let (l, p, f, v) = g.feature(i);
        feats.extend([l as i32, p as i32, f as i32]);
        acts.push(v);
    }
    let toks: Vec<i32> = g.tokens.iter().map(|&t| t as i32).collect();
    let ltoks: Vec<i32> = g.logit_tokens.iter().map(|&t| t as i32).collect();
    let views: Vec<(&str, Dtype, Vec<usize>, &[u8])> = vec![
        (
            "adjacency",
            Dtype::F32,
            vec![a.n_rows(), a.n_sources()],
            bytemuck::cast_slice(&a.rows),
        ),
        (
            "features",
            Dtype::I32,
            vec![a.n_features, 3],
            bytemuck::cast_slice(&feats),
        ),
        (
            "activations",
            Dtype::F32,
            vec![a.n_features],
            bytemuck::cast_slice(&acts),
        ),
        (
            "input_tokens",
            Dtype::I32,
            vec![toks.len()],
            bytemuck::cast_slice(&toks),
        ),
        (
            "logit_tokens",
            Dtype::I32,
            vec![ltoks.len()],
            bytemuck::cast_slice(&ltoks),
        ),
        (
            "logit_probabilities",
            Dtype::F32,
            vec![g.logit_probs.len()],
            bytemuck::cast_slice(&g.logit_probs),
        ),
    ];
    let tensors = views
        .into_iter()
        .map(|(name, dt, shape, data)| {
            TensorView::new(dt, shape, data)
                .map(|v| (name.to_string(), v))
                .map_err(|e| Error::Tensor {
                    path: path.into(),
                    tensor: name.into(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([
        ("format".to_string(), "clt-attribution-graph".to_string()),
        ("version".to_string(), "1".to_string()),
        ("prompt".to_string(), prompt.to_string()),
        ("n_layers".to_string(), g.n_layers.to_string()),
        (
            "node_order".to_string(),
            "features (layer, position, index), errors (layer-major), tokens, logits".to_string(),
        ),
    ]);
    let bytes = safetensors::serialize(tensors, Some(meta)).map_err(|e| Error::Tensor {
        path: path.into(),
        tensor: String::new(),
        reason: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}

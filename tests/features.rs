//! `clt features`' streaming pass against a dense reference, on a store with documents of awkward lengths:
//! chunking must not change any record, counts and maxima match a direct f64 computation, and every example
//! window is a run of consecutive tokens of one document around its chosen token.

use clt::clt::{Activation, CltConfig, DecoderKind, Params};
use clt::data::ActDims;
use clt::features::analysis::{AnalysisConfig, analyse};
use clt::rng::Rng;
use clt::store::format::ShardMeta;
use clt::store::{Codec, Dataset, DatasetWriter, TokenIds, WriterConfig};

const L: usize = 2;
const D: usize = 8;
const F: usize = 6;
const N: usize = 613;

fn setup(dir: &std::path::Path) -> (CltConfig, Params, Vec<f32>, Vec<u64>, Vec<u32>) {
    let cfg = CltConfig {
        n_layers: L,
        d_model: D,
        n_features: F,
        decoder: DecoderKind::CrossLayer,
        activation: Activation::JumpRelu,
        skip: false,
    };
    let mut rng = Rng::seed(11);
    let mut p = Params::zeros(&cfg);
    for t in p.tensors_mut() {
        t.iter_mut().for_each(|v| *v = (0.5 * rng.normal()) as f32);
    }
    for t in &mut p.log_theta {
        t.iter_mut()
            .for_each(|v| *v = rng.uniform_range(-1.5, 0.5) as f32);
    }
    let x: Vec<f32> = (0..N * L * D).map(|_| rng.normal() as f32).collect();
    // Documents of 1 to 40 tokens.
    let (mut docs, mut pos) = (Vec::new(), Vec::new());
    let (mut doc, mut p_in_doc, mut len) = (0u64, 0u32, 1 + rng.below(40) as u32);
    for _ in 0..N {
        docs.push(doc);
        pos.push(p_in_doc);
        p_in_doc += 1;
        if p_in_doc == len {
            doc += 1;
            p_in_doc = 0;
            len = 1 + rng.below(40) as u32;
        }
    }
    let tokens: Vec<u32> = (0..N as u32).collect();
    let wcfg = WriterConfig {
        codec: Codec::F32,
        block_tokens: 50,
        ..WriterConfig::default()
    };
    let dims = ActDims {
        n_layers: L,
        d_model: D,
    };
    let mut w = DatasetWriter::create(dir, dims, wcfg, ShardMeta::default(), 200).unwrap();
    w.push(
        &x,
        &x,
        Some(TokenIds {
            tokens: &tokens,
            positions: &pos,
            doc_ids: &docs,
        }),
    )
    .unwrap();
    w.finish().unwrap();
    (cfg, p, x, docs, pos)
}

/// Equal up to float rounding: the GEMM's blocking depends on the chunk's row count, so activations may differ
/// in their last bits.
fn close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value::*;
    match (a, b) {
        (Number(x), Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-5 * (1.0 + x.abs().max(y.abs()))
        }
        (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| close(p, q)),
        (Object(x), Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn streaming_pass_matches_dense_reference_for_any_chunking() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, p, x, docs, pos) = setup(dir.path());
    let ds = Dataset::open(dir.path()).unwrap();
    let run = |chunk: usize| {
        let acfg = AnalysisConfig {
            top_k: 4,
            n_samples: 5,
            before: 3,
            after: 2,
            chunk_tokens: chunk,
            ..AnalysisConfig::default()
        };
        let a = analyse(&cfg, &p, &ds, &acfg).unwrap();
        assert_eq!(a.n_tokens, N as u64);
        (0..L)
            .flat_map(|l| (0..F).map(move |f| (l, f)))
            .map(|(l, f)| a.record(l, f, "s", &|t| t.to_string()))
            .collect::<Vec<_>>()
    };
    let whole = run(100_000);
    for chunk in [1, 7, 64, 250] {
        let other = run(chunk);
        for (a, b) in other.iter().zip(&whole) {
            let (va, vb) = (
                serde_json::to_value(a).unwrap(),
                serde_json::to_value(b).unwrap(),
            );
            if !close(&va, &vb) {
                let (ja, jb) = (
                    serde_json::to_string(a).unwrap(),
                    serde_json::to_string(b).unwrap(),
                );
                let at = ja
                    .bytes()
                    .zip(jb.bytes())
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                panic!(
                    "chunk {chunk} changed feature ({}, {}) at byte {at}: {} vs {}",
                    a.layer,
                    a.feature,
                    &ja[at.saturating_sub(150)..(at + 80).min(ja.len())],
                    &jb[at.saturating_sub(150)..(at + 80).min(jb.len())]
                );
            }
        }
    }
    for l in 0..L {
        for f in 0..F {
            let rec = &whole[l * F + f];
            // Dense f64 reference of count and maximum (ties at the threshold are measure-zero here).
            let theta = (p.log_theta[l][f] as f64).exp();
            let mut count = 0u64;
            let mut max = f64::NEG_INFINITY;
            for t in 0..N {
                let xs = &x[(t * L + l) * D..][..D];
                let h: f64 = xs
                    .iter()
                    .zip(&p.w_enc[l][f * D..(f + 1) * D])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    + p.b_enc[l][f] as f64;
                if h > theta {
                    count += 1;
                    max = max.max(h);
                }
            }
            assert_eq!(rec.n_active, count, "layer {l} feature {f}");
            if count > 0 {
                assert!(
                    (rec.act_max as f64 - max).abs() < 1e-4,
                    "{} vs {max}",
                    rec.act_max
                );
            }
            for q in &rec.examples_quantiles {
                for e in &q.examples {
                    let ids: Vec<usize> = e.tokens.iter().map(|t| t.parse().unwrap()).collect();
                    let c = ids[e.train_token_ind];
                    assert_eq!((docs[c], pos[c]), (e.doc_id, e.position));
                    assert!(e.train_token_ind <= 3 && ids.len() - 1 - e.train_token_ind <= 2);
                    for w in ids.windows(2) {
                        assert_eq!(w[1], w[0] + 1);
                        assert_eq!(docs[w[0]], docs[w[1]], "window crosses a document");
                    }
                    // As wide as the document allows.
                    let first = ids[0];
                    assert!(e.train_token_ind == 3 || first == 0 || docs[first - 1] != docs[first]);
                    assert!(e.tokens_acts_list[e.train_token_ind] > 0.0);
                }
            }
            // Top examples: distinct stretches, best first, the best being the maximum.
            let top = &rec.examples_quantiles[0].examples;
            if count > 0 {
                assert_eq!(top[0].tokens_acts_list[top[0].train_token_ind], rec.act_max);
            }
        }
    }
}

#[test]
fn topk_and_batchtopk_transcoders_are_analysed_too() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, p, _, _, _) = setup(dir.path());
    let ds = Dataset::open(dir.path()).unwrap();
    for act in [
        Activation::TopK { k: 2 },
        Activation::BatchTopK {
            k: 2,
            across_layers: false,
        },
    ] {
        cfg.activation = act;
        let acfg = AnalysisConfig {
            chunk_tokens: 100,
            ..AnalysisConfig::default()
        };
        let a = analyse(&cfg, &p, &ds, &acfg).unwrap();
        for l in 0..L {
            let total: u64 = (0..F)
                .map(|f| a.record(l, f, "s", &|t| t.to_string()).n_active)
                .sum();
            // At most k per token (ReLU may zero a selected entry), and most tokens fire.
            assert!(
                total <= (2 * N) as u64 && total > N as u64,
                "{act:?} layer {l}: {total}"
            );
        }
    }
}

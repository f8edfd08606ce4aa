//! GPT-2 against an independent oracle: a tiny random GPT-2 is written as a Hugging Face directory
//! (`config.json`, `model.safetensors` with HF's `Conv1D` `(in, out)` weights, a toy `tokenizer.json`), loaded
//! through `clt::model::load`, and its logits and hooks are compared with `tests/gpt2_reference.py`, a
//! pure-Python (standard library, float64) forward that reads the same files.

mod common;

use std::path::Path;

use clt::model::{self, CausalLm, ForwardOptions, Hooks, Intervention, LoadedModel, Model};
use common::hf::{
    Rng, Tensor, assert_matches_reference, max_diff, python_reference, run_attribute_and_intervene,
    write_safetensors, write_toy_tokenizer,
};

const D: usize = 16;
const N_HEAD: usize = 4;
const N_LAYER: usize = 2;
const VOCAB: usize = 64;
const N_POS: usize = 32;
/// Largest absolute difference allowed between the Rust (f32) and Python (f64) values.
const TOL: f32 = 1e-4;

/// The tensors of a tiny random GPT-2, HF names without prefix, with shapes.
fn tiny_tensors() -> Vec<Tensor> {
    let mut r = Rng(0x853c49e6748fea9b);
    let mut t = vec![
        (
            "wte.weight".to_string(),
            r.vals(VOCAB * D, 2.0),
            vec![VOCAB, D],
        ),
        (
            "wpe.weight".to_string(),
            r.vals(N_POS * D, 1.0),
            vec![N_POS, D],
        ),
    ];
    for l in 0..N_LAYER {
        let p = |s: &str| format!("h.{l}.{s}");
        let gain = |r: &mut Rng| r.vals(D, 0.5).iter().map(|x| x + 1.0).collect::<Vec<_>>();
        t.extend([
            (p("ln_1.weight"), gain(&mut r), vec![D]),
            (p("ln_1.bias"), r.vals(D, 0.2), vec![D]),
            (
                p("attn.c_attn.weight"),
                r.vals(D * 3 * D, 1.0),
                vec![D, 3 * D],
            ),
            (p("attn.c_attn.bias"), r.vals(3 * D, 0.2), vec![3 * D]),
            (p("attn.c_proj.weight"), r.vals(D * D, 0.5), vec![D, D]),
            (p("attn.c_proj.bias"), r.vals(D, 0.2), vec![D]),
            (p("ln_2.weight"), gain(&mut r), vec![D]),
            (p("ln_2.bias"), r.vals(D, 0.2), vec![D]),
            (p("mlp.c_fc.weight"), r.vals(D * 4 * D, 1.0), vec![D, 4 * D]),
            (p("mlp.c_fc.bias"), r.vals(4 * D, 0.2), vec![4 * D]),
            (
                p("mlp.c_proj.weight"),
                r.vals(4 * D * D, 0.5),
                vec![4 * D, D],
            ),
            (p("mlp.c_proj.bias"), r.vals(D, 0.2), vec![D]),
        ]);
    }
    let gain = r.vals(D, 0.5).iter().map(|x| x + 1.0).collect();
    t.push(("ln_f.weight".into(), gain, vec![D]));
    t.push(("ln_f.bias".into(), r.vals(D, 0.2), vec![D]));
    t
}

/// Writes a GPT-2 directory with these tensors, their names prefixed with `prefix`.
fn write_dir(dir: &Path, tensors: &[Tensor], prefix: &str) {
    write_safetensors(dir, tensors, prefix, &[]);
    let cfg = serde_json::json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": D, "n_layer": N_LAYER,
        "n_head": N_HEAD, "n_inner": null, "vocab_size": VOCAB, "n_positions": N_POS, "n_ctx": N_POS,
        "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "eos_token_id": 63,
        "bos_token_id": 63, "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    write_toy_tokenizer(dir);
}

fn seqs() -> Vec<Vec<u32>> {
    vec![
        vec![5],
        vec![1, 17, 42, 3, 63, 0, 9],
        (0..N_POS as u32)
            .map(|i| (i * 37 + 11) % VOCAB as u32)
            .collect(),
    ]
}

fn reference(dir: &Path, seqs: &[Vec<u32>]) -> serde_json::Value {
    python_reference("gpt2_reference.py", dir, seqs)
}

fn load(prefix: &str) -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &tiny_tensors(), prefix);
    let m = model::load(dir.path(), None).unwrap();
    (dir, m)
}

#[test]
fn logits_and_hooks_match_the_python_reference() {
    let (dir, m) = load("");
    assert_eq!(m.format, model::ModelFormat::HfDir);
    assert!(matches!(m.model, Model::Gpt2(_)));
    assert_eq!(m.model.architecture(), "gpt2");
    assert_eq!(
        (
            m.model.n_layers(),
            m.model.d_model(),
            m.model.vocab_size(),
            m.model.max_seq_len()
        ),
        (N_LAYER, D, VOCAB, N_POS)
    );
    let seqs = seqs();
    let want = reference(dir.path(), &seqs);
    let worst = assert_matches_reference(&m.model, &seqs, &want, TOL);
    eprintln!("largest |rust - python| per value: {worst:?}");
    let g = m.model.generate_greedy(&[1, 2, 3], 5, None).unwrap();
    assert_eq!(g.len(), 5);
    // Generation stops at max_seq_len.
    let long: Vec<u32> = (0..N_POS as u32 - 2).collect();
    assert_eq!(m.model.generate_greedy(&long, 10, None).unwrap().len(), 2);
}

#[test]
fn transformer_prefix_loads_the_same_model() {
    let (_d1, a) = load("");
    let (_d2, b) = load("transformer.");
    common::hf::assert_same_forward(&a.model, &b.model, &seqs());
}

/// The KV-cached forward (generation) gives the full forward's logits however the sequence is split,
/// and greedy generation picks the same tokens: positions past the cached ones take their own position embeddings.
#[test]
fn cached_forward_matches_the_full_forward() {
    let (_dir, m) = load("");
    let seq = &seqs()[2];
    let worst = common::kv::assert_cached_forward_matches(&m.model, seq, TOL);
    eprintln!("largest logit difference, cached vs full: {worst}");
}

#[test]
fn frozen_state_forward_reproduces_the_plain_forward() {
    let (_dir, m) = load("");
    let toks = &seqs()[1];
    let base = m
        .model
        .forward_with(
            toks,
            &ForwardOptions {
                hooks: Hooks::all(),
                ..Default::default()
            },
        )
        .unwrap();
    let mlp: Vec<Vec<f32>> = base
        .record
        .layers
        .iter()
        .map(|l| l.mlp_out.clone().unwrap())
        .collect();
    let run = |iv: Intervention<'_>| {
        m.model
            .forward_with(
                toks,
                &ForwardOptions {
                    hooks: Hooks::all(),
                    intervention: iv,
                    ..Default::default()
                },
            )
            .unwrap()
    };
    for iv in [
        Intervention {
            frozen: Some(&base.record),
            mlp_out: None,
            mlp_fn: None,
            patterns_only: false,
        },
        Intervention {
            frozen: Some(&base.record),
            mlp_out: Some(&mlp),
            mlp_fn: None,
            patterns_only: false,
        },
        Intervention {
            frozen: None,
            mlp_out: Some(&mlp),
            mlp_fn: None,
            patterns_only: false,
        },
    ] {
        let again = run(iv);
        assert!(max_diff(&base.logits, &again.logits) < 1e-5);
        for (a, b) in base.record.layers.iter().zip(&again.record.layers) {
            assert!(max_diff(a.resid_mid.as_ref().unwrap(), b.resid_mid.as_ref().unwrap()) < 1e-5);
            assert!(max_diff(a.mlp_out.as_ref().unwrap(), b.mlp_out.as_ref().unwrap()) < 1e-5);
        }
    }
    // With everything frozen the model is affine in the replaced MLP outputs: the midpoint of the logits for
    // zero and doubled replacements is the logits for the recorded ones.
    let scaled = |k: f32| -> Vec<Vec<f32>> {
        mlp.iter()
            .map(|v| v.iter().map(|x| x * k).collect())
            .collect()
    };
    let (zero, twice) = (scaled(0.0), scaled(2.0));
    let l0 = run(Intervention {
        frozen: Some(&base.record),
        mlp_out: Some(&zero),
        mlp_fn: None,
        patterns_only: false,
    })
    .logits;
    let l2 = run(Intervention {
        frozen: Some(&base.record),
        mlp_out: Some(&twice),
        mlp_fn: None,
        patterns_only: false,
    })
    .logits;
    let mid: Vec<f32> = l0.iter().zip(&l2).map(|(a, b)| (a + b) / 2.0).collect();
    assert!(max_diff(&mid, &base.logits) < 1e-4);
    // A record without the frozen state is refused.
    let bare = m
        .model
        .forward_with(toks, &ForwardOptions::default())
        .unwrap();
    let e = m
        .model
        .forward_with(
            toks,
            &ForwardOptions {
                intervention: Intervention {
                    frozen: Some(&bare.record),
                    mlp_out: None,
                    mlp_fn: None,
                    patterns_only: false,
                },
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(e, clt::Error::Shape { .. }), "{e}");
}

#[test]
fn misshapen_c_attn_names_the_tensor_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tiny_tensors();
    let bad = t
        .iter_mut()
        .find(|(n, _, _)| n == "h.1.attn.c_attn.weight")
        .unwrap();
    bad.2 = vec![3 * D, D]; // transposed: PyTorch Linear layout instead of Conv1D
    write_dir(dir.path(), &t, "transformer.");
    let e = model::load(dir.path(), None).unwrap_err().to_string();
    assert!(e.contains("transformer.h.1.attn.c_attn.weight"), "{e}");
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(e.contains("[48, 16]") && e.contains("[16, 48]"), "{e}");
    // A missing tensor is named too.
    let dir = tempfile::tempdir().unwrap();
    let t: Vec<_> = tiny_tensors()
        .into_iter()
        .filter(|(n, _, _)| n != "h.0.mlp.c_fc.bias")
        .collect();
    write_dir(dir.path(), &t, "");
    let e = model::load(dir.path(), None).unwrap_err().to_string();
    assert!(
        e.contains("h.0.mlp.c_fc.bias") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn clt_run_reports_gpt2() {
    let (dir, _) = load("");
    let text = common::hf::clt_run_text(dir.path(), "abab", 3);
    assert!(
        text.contains("gpt2; 2 layers, d_model 16, 4 heads / 4 kv, vocab 64"),
        "{text}"
    );
    assert!(text.contains("generated ids"), "{text}");
}

/// `clt attribute` and `clt intervene` on a GPT-2 directory, with a random transcoder exported in
/// circuit-tracer's format reading `ln2.hook_normalized` (on GPT-2's LayerNorm, TransformerLens records
/// it with the weight and bias applied: the MLP's input): the command encodes the features here found, the
/// graph's JSON is written with token, feature and logit nodes, and the edits print the logits before and
/// after. (The oracle for GPT-2's edges is in `tests/attribution.rs`.)
#[test]
fn the_attribute_and_intervene_commands_run_on_gpt2() {
    use clt::attribution::replacement::calibrated_transcoder;
    use clt::cache::InputHook;
    let (dir, m) = load("");
    let prompt = "abaabbabab";
    let tokens = m.tokenizer.encode(prompt).unwrap();
    let tc = calibrated_transcoder(&m.model, &tokens, 32, 4, 3, InputHook::MlpInNormed).unwrap();
    let v = run_attribute_and_intervene(
        dir.path(),
        &m,
        "gpt2-tiny",
        tc,
        "ln2.hook_normalized",
        prompt,
    );
    // The prompt does not start with a special token: `<|endoftext|>` (63 here) is put first, as
    // circuit-tracer does, so the prompt's first word keeps its features.
    let ids: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"E_63_0"), "{ids:?}");
    assert!(
        ids.contains(&format!("E_{}_1", tokens[0]).as_str()),
        "{ids:?}"
    );
}

/// Activation caching from GPT-2: with no BOS, every position of a context is cached (position 0
/// included), and each row is the forward's `ln_2` output and MLP output at that token.
#[test]
fn gpt2_activations_cache_as_its_hooks() {
    let (dir, m) = load("");
    let hook = clt::cache::InputHook::MlpInNormed;
    common::store::toy_corpus_caches_as_hooks(&m, dir.path(), hook);
}

/// The tiny model as llama.cpp's converter writes a GPT-2: architecture `gpt2`, ggml's names, the `Conv1D`
/// weights transposed to `(out, in)`, the tied embedding written again as `output.weight`, and a byte-level
/// BPE vocabulary (`tokenizer.ggml.model = "gpt2"`) whose last token is `<|endoftext|>`. `edit` may change
/// the tensors `(name, ggml dims, values)` before they are written.
fn write_gguf_of_tiny(path: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<u64>, Vec<f32>)>)) {
    use common::gguf::{Meta, write_gguf};
    let names = [
        ("ln_1", "attn_norm"),
        ("attn.c_attn", "attn_qkv"),
        ("attn.c_proj", "attn_output"),
        ("ln_2", "ffn_norm"),
        ("mlp.c_fc", "ffn_up"),
        ("mlp.c_proj", "ffn_down"),
    ];
    let mut tensors: Vec<(String, Vec<u64>, Vec<f32>)> = Vec::new();
    for (name, v, shape) in tiny_tensors() {
        let (stem, kind) = name.rsplit_once('.').unwrap();
        let gguf = match stem {
            "wte" => "token_embd".to_string(),
            "wpe" => "position_embd".to_string(),
            "ln_f" => "output_norm".to_string(),
            _ => {
                let (l, rest) = stem["h.".len()..].split_once('.').unwrap();
                let (_, g) = names.iter().find(|(h, _)| *h == rest).unwrap();
                format!("blk.{l}.{g}")
            }
        };
        let conv = stem.starts_with("h.") && kind == "weight" && shape.len() == 2;
        let (ne, v) = if conv {
            // HF's `(in, out)` rows become `(out, in)` rows: ggml's dims are then `[in, out]`.
            let (n_in, n_out) = (shape[0], shape[1]);
            let t = (0..n_out * n_in)
                .map(|i| v[(i % n_in) * n_out + i / n_in])
                .collect();
            (vec![n_in as u64, n_out as u64], t)
        } else {
            (shape.iter().rev().map(|&s| s as u64).collect(), v)
        };
        if gguf == "token_embd" {
            tensors.push(("output.weight".into(), ne.clone(), v.clone()));
        }
        tensors.push((format!("{gguf}.{kind}"), ne, v));
    }
    edit(&mut tensors);
    let mut pieces: Vec<String> = ["a", "b", "ab", "Ġ", "Ġab"].map(str::to_string).to_vec();
    while pieces.len() < VOCAB - 1 {
        pieces.push(format!("x{}", pieces.len()));
    }
    pieces.push("<|endoftext|>".into());
    let types: Vec<i32> = (0..VOCAB)
        .map(|i| if i == VOCAB - 1 { 3 } else { 1 })
        .collect();
    let u = |v: usize| Meta::U32(v as u32);
    let meta = [
        ("general.architecture", Meta::Str("gpt2".into())),
        ("gpt2.context_length", u(N_POS)),
        ("gpt2.embedding_length", u(D)),
        ("gpt2.feed_forward_length", u(4 * D)),
        ("gpt2.block_count", u(N_LAYER)),
        ("gpt2.attention.head_count", u(N_HEAD)),
        ("gpt2.attention.layer_norm_epsilon", Meta::F32(1e-5)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("gpt-2".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(pieces)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        (
            "tokenizer.ggml.merges",
            Meta::Strs(vec!["a b".into(), "Ġ ab".into()]),
        ),
        ("tokenizer.ggml.bos_token_id", u(VOCAB - 1)),
        ("tokenizer.ggml.eos_token_id", u(VOCAB - 1)),
    ];
    write_gguf(path, &meta, &tensors);
}

/// A GPT-2 GGUF file loads to the same model as the Hugging Face directory: the same logits and hooks,
/// bit for bit, tied as it is (the converter's copy of the embedding is not kept twice); its byte-level
/// vocabulary merges by rank and ends sequences with `<|endoftext|>`.
#[test]
fn a_gguf_file_loads_the_same_model_as_the_directory() {
    let (_dir, hf) = load("");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-gpt2.gguf");
    write_gguf_of_tiny(&path, |_| {});
    let g = model::load(&path, None).unwrap();
    assert_eq!(g.format, model::ModelFormat::Gguf);
    assert_eq!(g.model.architecture(), "gpt2");
    let gm = g.model.as_gpt2().unwrap();
    assert_eq!(gm.config, hf.model.as_gpt2().unwrap().config);
    assert!(gm.output.is_none(), "the tied unembedding was kept twice");
    common::hf::assert_same_forward(&hf.model, &g.model, &seqs());
    // " ab" is "Ġab": "a b" (rank 0) merges first, then "Ġ ab".
    assert_eq!(g.tokenizer.encode("ab ab").unwrap(), vec![2, 4]);
    assert_eq!(g.tokenizer.decode(&[2, 4]), "ab ab");

    // An unembedding of its own is kept, and used.
    let untied = dir.path().join("untied.gguf");
    write_gguf_of_tiny(&untied, |t| {
        let out = t.iter_mut().find(|(n, _, _)| n == "output.weight").unwrap();
        out.2.iter_mut().for_each(|v| *v *= -0.5);
    });
    let u = model::load(&untied, None).unwrap();
    assert!(u.model.as_gpt2().unwrap().output.is_some());
    let toks = &seqs()[1];
    assert_ne!(
        u.model.forward(toks).unwrap(),
        g.model.forward(toks).unwrap()
    );
}

/// A GPT-2 GGUF file with a misshapen or missing tensor is refused, naming the tensor and the file.
#[test]
fn a_misshapen_gguf_tensor_names_itself_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    write_gguf_of_tiny(&path, |t| {
        let qkv = t
            .iter_mut()
            .find(|(n, _, _)| n == "blk.1.attn_qkv.weight")
            .unwrap();
        qkv.1.reverse(); // HF's Conv1D layout, not transposed
    });
    let e = model::load(&path, None).unwrap_err().to_string();
    assert!(
        e.contains("blk.1.attn_qkv.weight") && e.contains("bad.gguf"),
        "{e}"
    );
    assert!(e.contains("[48, 16]") && e.contains("[16, 48]"), "{e}");
    write_gguf_of_tiny(&path, |t| t.retain(|(n, _, _)| n != "output_norm.bias"));
    let e = model::load(&path, None).unwrap_err().to_string();
    assert!(
        e.contains("output_norm.bias") && e.contains("missing"),
        "{e}"
    );
}

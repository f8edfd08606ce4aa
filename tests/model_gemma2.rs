//! Gemma-2 against an independent oracle: a tiny random Gemma-2 is written as a Hugging Face directory
//! (`config.json`, `model.safetensors` with its embedding in BF16, a toy `tokenizer.json`), loaded through
//! `clt::model::load`, and its logits and hooks are compared with `tests/gemma2_reference.py`, a pure-Python
//! (standard library, float64) forward of `transformers`' Gemma-2 that reads the same files. The tiny model
//! has what sets Gemma-2 apart at sizes where it shows: `head_dim` unlike `d_model / n_heads`, grouped-query
//! attention, `query_pre_attn_scalar` unlike `head_dim`, soft caps small enough to bite, a sliding window
//! shorter than the prompts, norms after the attention and the MLP.

mod common;

use std::path::Path;

use clt::model::{self, CausalLm, ForwardOptions, Hooks, Intervention, LoadedModel, Model};
use common::hf::{
    Rng, Tensor, assert_matches_reference, max_diff, python_reference, run_attribute_and_intervene,
    write_safetensors, write_toy_tokenizer,
};

const D: usize = 16;
const HEAD_DIM: usize = 6;
const N_HEAD: usize = 4;
const N_KV: usize = 2;
const INTER: usize = 24;
const N_LAYER: usize = 3;
const VOCAB: usize = 64;
const N_POS: usize = 32;
const WINDOW: usize = 3;
/// Largest absolute difference allowed between the Rust (f32) and Python (f64) values.
const TOL: f32 = 1e-4;

/// The tensors of a tiny random Gemma-2, HF names without the `model.` prefix, with shapes. Norm weights
/// are Gemma's `w` (the norm multiplies by `1 + w`).
fn tiny_tensors() -> Vec<Tensor> {
    let mut r = Rng(0x9e3779b97f4a7c15);
    let (q, kv) = (N_HEAD * HEAD_DIM, N_KV * HEAD_DIM);
    let mut t = vec![(
        "embed_tokens.weight".to_string(),
        r.vals(VOCAB * D, 1.0),
        vec![VOCAB, D],
    )];
    for l in 0..N_LAYER {
        let p = |s: &str| format!("layers.{l}.{s}.weight");
        t.extend([
            (p("input_layernorm"), r.vals(D, 0.5), vec![D]),
            (p("self_attn.q_proj"), r.vals(q * D, 1.5), vec![q, D]),
            (p("self_attn.k_proj"), r.vals(kv * D, 1.5), vec![kv, D]),
            (p("self_attn.v_proj"), r.vals(kv * D, 1.0), vec![kv, D]),
            (p("self_attn.o_proj"), r.vals(D * q, 0.5), vec![D, q]),
            (p("post_attention_layernorm"), r.vals(D, 0.5), vec![D]),
            (p("pre_feedforward_layernorm"), r.vals(D, 0.5), vec![D]),
            (p("mlp.gate_proj"), r.vals(INTER * D, 1.0), vec![INTER, D]),
            (p("mlp.up_proj"), r.vals(INTER * D, 1.0), vec![INTER, D]),
            (p("mlp.down_proj"), r.vals(D * INTER, 0.5), vec![D, INTER]),
            (p("post_feedforward_layernorm"), r.vals(D, 0.5), vec![D]),
        ]);
    }
    t.push(("norm.weight".into(), r.vals(D, 0.5), vec![D]));
    t
}

/// The tiny model's `config.json`: soft caps that bite (attention scores reach about ±4, logits ±10) and a
/// window of 3 on the even layers.
fn tiny_config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "hidden_size": D,
        "intermediate_size": INTER, "num_hidden_layers": N_LAYER, "num_attention_heads": N_HEAD,
        "num_key_value_heads": N_KV, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
        "max_position_embeddings": N_POS, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "query_pre_attn_scalar": 10, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
        "sliding_window": WINDOW, "hidden_activation": "gelu_pytorch_tanh", "eos_token_id": 63,
        "bos_token_id": 62, "tie_word_embeddings": true
    })
}

/// Writes a Gemma-2 directory: these tensors (names prefixed with `prefix`, the embedding in BF16) and
/// `config`.
fn write_dir(dir: &Path, tensors: &[Tensor], prefix: &str, config: &serde_json::Value) {
    write_safetensors(dir, tensors, prefix, &["embed_tokens.weight"]);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
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

fn load_with(prefix: &str, config: &serde_json::Value) -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &tiny_tensors(), prefix, config);
    let m = model::load(dir.path(), None).unwrap();
    (dir, m)
}

fn load() -> (tempfile::TempDir, LoadedModel) {
    load_with("model.", &tiny_config())
}

/// Logits and every hook (the post-norms' scales included) agree with the Python forward, with the caps
/// and the window on, with `layer_types` choosing other sliding layers and no caps, and with the keys left
/// to their defaults; the three give different logits, so each feature is exercised.
#[test]
fn logits_and_hooks_match_the_python_reference() {
    let mut variants = vec![("caps, window on even layers", tiny_config())];
    let mut other = tiny_config();
    other["layer_types"] =
        serde_json::json!(["full_attention", "sliding_attention", "full_attention"]);
    other["attn_logit_softcapping"] = serde_json::Value::Null;
    other["final_logit_softcapping"] = serde_json::Value::Null;
    variants.push(("no caps, window on layer 1", other));
    let mut defaults = tiny_config();
    for k in [
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "sliding_window",
        "query_pre_attn_scalar",
    ] {
        defaults.as_object_mut().unwrap().remove(k);
    }
    variants.push(("transformers' defaults", defaults));
    let seqs = seqs();
    let mut last_logits: Vec<Vec<f32>> = Vec::new();
    for (name, cfg) in &variants {
        let (dir, m) = load_with("model.", cfg);
        assert_eq!(m.format, model::ModelFormat::HfDir);
        assert!(matches!(m.model, Model::Gemma2(_)));
        assert_eq!(m.model.architecture(), "gemma2");
        assert_eq!(
            (
                m.model.n_layers(),
                m.model.d_model(),
                m.model.n_heads(),
                m.model.n_kv_heads(),
                m.model.vocab_size(),
                m.model.max_seq_len()
            ),
            (N_LAYER, D, N_HEAD, N_KV, VOCAB, N_POS)
        );
        let want = python_reference("gemma2_reference.py", dir.path(), &seqs);
        let worst = assert_matches_reference(&m.model, &seqs, &want, TOL);
        eprintln!("{name}: largest |rust - python| per value: {worst:?}");
        last_logits.push(m.model.forward(&seqs[2]).unwrap());
    }
    for i in 0..variants.len() {
        for j in i + 1..variants.len() {
            let moved = max_diff(&last_logits[i], &last_logits[j]);
            assert!(
                moved > 1e-2,
                "{} and {} give the same logits ({moved})",
                variants[i].0,
                variants[j].0
            );
        }
    }
}

/// The sliding window and the caps as the forward records them: an even layer's query sees exactly its
/// last 3 positions, an odd layer's every earlier one; every logit lies inside the cap.
#[test]
fn the_window_and_the_caps_hold() {
    let (_dir, m) = load();
    let toks = &seqs()[2];
    let n = toks.len();
    let out = m
        .model
        .forward_with(
            toks,
            &ForwardOptions {
                hooks: Hooks {
                    attn_pattern: true,
                    ..Hooks::default()
                },
                ..Default::default()
            },
        )
        .unwrap();
    for (l, rec) in out.record.layers.iter().enumerate() {
        let p = rec.attn_pattern.as_ref().unwrap().to_dense();
        for h in 0..N_HEAD {
            for t in 0..n {
                let row = &p[(h * n + t) * n..(h * n + t + 1) * n];
                let seen = row.iter().filter(|&&w| w > 0.0).count();
                let want = if l % 2 == 0 {
                    (t + 1).min(WINDOW)
                } else {
                    t + 1
                };
                assert_eq!(seen, want, "layer {l} head {h} query {t}");
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
    }
    assert!(out.logits.iter().all(|v| v.abs() < 3.0));
    assert!(out.logits.iter().any(|v| v.abs() > 2.0), "the cap bites");
}

/// The KV-cached forward (generation) gives the full forward's logits however the sequence is split,
/// and greedy generation picks the same tokens: the sliding window (3) counts absolute positions, soft caps apply to each new score.
#[test]
fn cached_forward_matches_the_full_forward() {
    let (_dir, m) = load();
    let seq = &seqs()[2];
    let worst = common::kv::assert_cached_forward_matches(&m.model, seq, TOL);
    eprintln!("largest logit difference, cached vs full: {worst}");
}

/// The same over 230 positions with a window of 70: the full forward's attention runs in four row blocks
/// of 58-position tiles, and the later blocks' first key tiles lie wholly outside the window, while a
/// window of 200 reaches back across tiles; the cached forward attends one query at a time over the keys
/// it sees.
#[test]
fn a_window_across_tiles_matches_the_cached_forward() {
    for window in [70, 200] {
        let mut config = tiny_config();
        config["max_position_embeddings"] = 256.into();
        config["sliding_window"] = window.into();
        let (_dir, m) = load_with("model.", &config);
        let seq: Vec<u32> = (0..230u32).map(|i| (i * 37 + 11) % VOCAB as u32).collect();
        let worst = common::kv::assert_cached_forward_matches(&m.model, &seq, TOL);
        eprintln!("window {window}: largest logit difference, cached vs full: {worst}");
    }
}

#[test]
fn frozen_state_forward_reproduces_the_plain_forward() {
    let (_dir, m) = load();
    let toks = &seqs()[1];
    let all = ForwardOptions {
        hooks: Hooks::all(),
        ..Default::default()
    };
    let base = m.model.forward_with(toks, &all).unwrap();
    let mlp: Vec<Vec<f32>> = base
        .record
        .layers
        .iter()
        .map(|l| l.mlp_out.clone().unwrap())
        .collect();
    let run = |iv: Intervention<'_>| {
        m.model.forward_with(
            toks,
            &ForwardOptions {
                hooks: Hooks::all(),
                intervention: iv,
                ..Default::default()
            },
        )
    };
    let frozen = |mlp_out| Intervention {
        frozen: Some(&base.record),
        mlp_out,
        mlp_fn: None,
        patterns_only: false,
    };
    for iv in [
        frozen(None),
        frozen(Some(&mlp)),
        Intervention {
            mlp_out: Some(&mlp),
            ..Default::default()
        },
    ] {
        let again = run(iv).unwrap();
        assert!(max_diff(&base.logits, &again.logits) < 1e-5);
        for (a, b) in base.record.layers.iter().zip(&again.record.layers) {
            assert!(max_diff(a.resid_mid.as_ref().unwrap(), b.resid_mid.as_ref().unwrap()) < 1e-5);
            assert!(max_diff(a.mlp_out.as_ref().unwrap(), b.mlp_out.as_ref().unwrap()) < 1e-5);
            // A replaced MLP stands for the MLP and its post-norm: no post-MLP scale is recorded.
            assert_eq!(
                b.mlp_post_norm_scale.is_some(),
                iv.mlp_out.is_none(),
                "post-MLP scale"
            );
        }
    }
    // With everything frozen the final stream is affine in the replaced MLP outputs (the logits are not:
    // the soft cap comes after).
    let scaled = |k: f32| -> Vec<Vec<f32>> {
        mlp.iter()
            .map(|v| v.iter().map(|x| x * k).collect())
            .collect()
    };
    let (zero, twice) = (scaled(0.0), scaled(2.0));
    let r0 = run(frozen(Some(&zero))).unwrap().resid_final;
    let r2 = run(frozen(Some(&twice))).unwrap().resid_final;
    let mid: Vec<f32> = r0.iter().zip(&r2).map(|(a, b)| (a + b) / 2.0).collect();
    assert!(max_diff(&mid, &base.resid_final) < 1e-4);
    // A record without the post-norms' scales is refused, naming the one missing (the post-MLP scale only
    // when the MLP runs).
    let mut partial = base.record.clone();
    partial.layers[1].attn_post_norm_scale = None;
    let e = run(Intervention {
        frozen: Some(&partial),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        e.to_string().contains("attn_post_norm_scale of layer 1"),
        "{e}"
    );
    let mut partial = base.record.clone();
    partial.layers[2].mlp_post_norm_scale = None;
    let e = run(Intervention {
        frozen: Some(&partial),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        e.to_string().contains("mlp_post_norm_scale of layer 2"),
        "{e}"
    );
    assert!(
        run(Intervention {
            frozen: Some(&partial),
            mlp_out: Some(&mlp),
            mlp_fn: None,
            patterns_only: false,
        })
        .is_ok()
    );
}

/// What `config.json` leaves out takes `transformers`' defaults; `rope_parameters` (transformers 5) is
/// read like `rope_theta`; what the forward would run wrongly is refused; a misshapen or missing tensor is
/// named with its file.
#[test]
fn config_defaults_refusals_and_damaged_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let write = |cfg: &serde_json::Value| {
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    };
    let mut cfg = tiny_config();
    for k in [
        "head_dim",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "sliding_window",
        "query_pre_attn_scalar",
        "rope_theta",
    ] {
        cfg.as_object_mut().unwrap().remove(k);
    }
    cfg["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 20000.0});
    write(&cfg);
    let (c, g) = model::hf::gemma2_config(dir.path()).unwrap();
    assert_eq!((c.head_dim, c.rope_theta), (256, 20000.0));
    assert_eq!(g.query_pre_attn_scalar, 256.0);
    assert_eq!(g.attn_logit_softcapping, Some(50.0));
    assert_eq!(g.final_logit_softcapping, Some(30.0));
    assert_eq!(g.sliding_window, Some(4096));
    assert_eq!(g.sliding_layers, vec![true, false, true]);
    for (key, value, want) in [
        ("hidden_activation", serde_json::json!("gelu"), "gelu"),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "yarn", "factor": 2.0}),
            "yarn",
        ),
        (
            "layer_types",
            serde_json::json!(["full_attention"]),
            "layer_types",
        ),
        ("attn_logit_softcapping", serde_json::json!(-1.0), "softcap"),
    ] {
        let mut bad = tiny_config();
        bad[key] = value;
        write(&bad);
        let e = model::hf::gemma2_config(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want) && e.contains("config.json"), "{e}");
    }
    // Tensors.
    let dir = tempfile::tempdir().unwrap();
    let mut t = tiny_tensors();
    t.iter_mut()
        .find(|(n, _, _)| n == "layers.2.post_feedforward_layernorm.weight")
        .unwrap()
        .2 = vec![1, D];
    write_dir(dir.path(), &t, "model.", &tiny_config());
    let e = model::load(dir.path(), None).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.2.post_feedforward_layernorm.weight")
            && e.contains("model.safetensors"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let t: Vec<_> = tiny_tensors()
        .into_iter()
        .filter(|(n, _, _)| n != "layers.0.post_attention_layernorm.weight")
        .collect();
    write_dir(dir.path(), &t, "", &tiny_config());
    let e = model::load(dir.path(), None).unwrap_err().to_string();
    assert!(
        e.contains("layers.0.post_attention_layernorm.weight") && e.contains("missing"),
        "{e}"
    );
}

/// Tensor names without `model.` load the same model.
#[test]
fn unprefixed_names_load_the_same_model() {
    let (_d1, a) = load();
    let (_d2, b) = load_with("", &tiny_config());
    common::hf::assert_same_forward(&a.model, &b.model, &seqs());
}

#[test]
fn clt_run_reports_gemma2() {
    let (dir, _) = load();
    let text = common::hf::clt_run_text(dir.path(), "abab", 3);
    assert!(
        text.contains("gemma2; 3 layers, d_model 16, 4 heads / 2 kv, vocab 64"),
        "{text}"
    );
    assert!(text.contains("generated ids"), "{text}");
}

/// Activation caching from Gemma-2 with Gemma Scope's input: each cached row is the MLP norm before its
/// weight and the post-normed MLP output (what the stream receives) at that token.
#[test]
fn gemma2_activations_cache_as_its_hooks() {
    let (dir, m) = load();
    let hook = clt::cache::InputHook::MlpInUnweighted;
    common::store::toy_corpus_caches_as_hooks(&m, dir.path(), hook);
}

/// `clt attribute` and `clt intervene` on a Gemma-2 directory, with a random transcoder exported in
/// circuit-tracer's format reading `ln2.hook_normalized` as Gemma Scope's transcoders do (on an RMSNorm
/// model, the norm before its weight): the command encodes the features here found, the graph's JSON has
/// token, feature and logit nodes, and the edits print the logits before and after. (The oracle for
/// Gemma-2's edges is in `tests/attribution.rs`.)
#[test]
fn the_attribute_and_intervene_commands_run_on_gemma2() {
    use clt::attribution::replacement::calibrated_transcoder;
    use clt::cache::InputHook;
    let (dir, m) = load();
    let prompt = "abaabbabab";
    // The tokens the commands run on (the end-of-text token put first).
    let tokens = m.tokenizer.encode_prompt(prompt).unwrap();
    assert_eq!(tokens[0], 63);
    let mut tc =
        calibrated_transcoder(&m.model, &tokens, 32, 4, 3, InputHook::MlpInUnweighted).unwrap();
    // Gemma-2's post-normed MLP outputs are ~1 per element: decoders of norm ~3 (not the calibrated ~0.1)
    // give features a share of the influence that the errors would otherwise take whole.
    for w in &mut tc.params.w_dec {
        w.iter_mut().for_each(|v| *v *= 30.0);
    }
    run_attribute_and_intervene(
        dir.path(),
        &m,
        "gemma2-tiny",
        tc,
        "ln2.hook_normalized",
        prompt,
    );
    // The same transcoder said to write `mlp.hook_out` (the MLP's output before Gemma-2's post-MLP norm)
    // is refused, naming the hook.
    let yaml = dir.path().join("transcoder/config.yaml");
    let text = std::fs::read_to_string(&yaml).unwrap();
    std::fs::write(&yaml, text.replace("hook_mlp_out", "mlp.hook_out")).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_clt"))
        .args(["attribute", "--model", dir.path().to_str().unwrap()])
        .args([
            "--transcoder",
            dir.path().join("transcoder").to_str().unwrap(),
        ])
        .args([
            "--prompt",
            prompt,
            "--out",
            dir.path().join("h.json").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("feature_output_hook `mlp.hook_out`") && err.contains("post-MLP norm"),
        "{err}"
    );
}

/// The tiny model as llama.cpp's converter writes it: architecture `gemma2`, ggml's names, norm weights
/// stored as `1 + w`, Q/K not permuted, and a SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`,
/// no space prefix, as Gemma's).
fn write_gguf_of_tiny(path: &Path) {
    use common::gguf::{Meta, write_gguf};
    let names = [
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("post_attention_layernorm", "post_attention_norm"),
        ("pre_feedforward_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("post_feedforward_layernorm", "post_ffw_norm"),
    ];
    let tensors: Vec<(String, Vec<u64>, Vec<f32>)> = tiny_tensors()
        .into_iter()
        .map(|(name, mut v, shape)| {
            let gguf = if name == "embed_tokens.weight" {
                // As the HF directory stores it: in BF16.
                v.iter_mut()
                    .for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
                "token_embd.weight".to_string()
            } else if name == "norm.weight" {
                "output_norm.weight".to_string()
            } else {
                let (l, rest) = name["layers.".len()..].split_once('.').unwrap();
                let hf = rest.strip_suffix(".weight").unwrap();
                let (_, g) = names.iter().find(|(h, _)| *h == hf).unwrap();
                format!("blk.{l}.{g}.weight")
            };
            if name.ends_with("norm.weight") {
                v.iter_mut().for_each(|x| *x += 1.0);
            }
            let ne = shape.iter().rev().map(|&s| s as u64).collect();
            (gguf, ne, v)
        })
        .collect();
    let mut pieces: Vec<String> = ["<unk>", "<s>", "</s>", "▁", "a", "b", "ab", "▁a", "▁ab"]
        .map(str::to_string)
        .to_vec();
    while pieces.len() < VOCAB {
        pieces.push(format!("x{}", pieces.len()));
    }
    let scores: Vec<f32> = (0..VOCAB).map(|i| -(i as f32)).collect();
    let types: Vec<i32> = (0..VOCAB)
        .map(|i| match i {
            0 => 2,
            1 | 2 => 3,
            _ => 1,
        })
        .collect();
    let u = |v: usize| Meta::U32(v as u32);
    let meta = [
        ("general.architecture", Meta::Str("gemma2".into())),
        ("gemma2.context_length", u(N_POS)),
        ("gemma2.embedding_length", u(D)),
        ("gemma2.block_count", u(N_LAYER)),
        ("gemma2.feed_forward_length", u(INTER)),
        ("gemma2.attention.head_count", u(N_HEAD)),
        ("gemma2.attention.head_count_kv", u(N_KV)),
        ("gemma2.attention.key_length", u(HEAD_DIM)),
        ("gemma2.attention.value_length", u(HEAD_DIM)),
        ("gemma2.attention.layer_norm_rms_epsilon", Meta::F32(1e-6)),
        ("gemma2.rope.freq_base", Meta::F32(10000.0)),
        ("gemma2.attn_logit_softcapping", Meta::F32(2.0)),
        ("gemma2.final_logit_softcapping", Meta::F32(3.0)),
        ("gemma2.attention.sliding_window", u(WINDOW)),
        ("tokenizer.ggml.model", Meta::Str("llama".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(pieces)),
        ("tokenizer.ggml.scores", Meta::F32s(scores)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.bos_token_id", u(1)),
        ("tokenizer.ggml.eos_token_id", u(2)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(true)),
        ("tokenizer.ggml.add_space_prefix", Meta::Bool(false)),
    ];
    write_gguf(path, &meta, &tensors);
}

/// A Gemma-2 GGUF file loads to the same model as the Hugging Face directory (GGUF has no
/// `query_pre_attn_scalar`: llama.cpp's `head_dim` is used, so the directory here says the same): the
/// same logits and hooks, bit for bit; its SentencePiece vocabulary puts BOS first and merges by score.
#[test]
fn a_gguf_file_loads_the_same_model_as_the_directory() {
    let mut cfg = tiny_config();
    cfg["query_pre_attn_scalar"] = serde_json::json!(HEAD_DIM);
    let (_dir, hf) = load_with("model.", &cfg);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-gemma2.gguf");
    write_gguf_of_tiny(&path);
    let g = model::load(&path, None).unwrap();
    assert_eq!(g.format, model::ModelFormat::Gguf);
    assert_eq!(g.model.architecture(), "gemma2");
    let gm = g.model.as_gemma2().unwrap();
    assert_eq!(gm.gemma, hf.model.as_gemma2().unwrap().gemma);
    common::hf::assert_same_forward(&hf.model, &g.model, &seqs());
    // "ab ab" is "ab▁ab" (no space prefix): "ab" (score −6) merges first, then "▁" + "ab" into "▁ab" (−8).
    assert_eq!(g.tokenizer.encode("ab ab").unwrap(), vec![1, 6, 8]);
    assert_eq!(g.tokenizer.decode(&[1, 6, 8]), "ab ab");
}

/// A Gemma Scope transcoder set as circuit-tracer's Gemma config names it (`params.npz` per layer behind
/// `hf://` URIs, encoders stored `[d, F]`, `feature_input_hook: ln2.hook_normalized`) runs `clt attribute`
/// and `clt intervene` on Gemma-2: read from the norm before its weight, with the features found here.
#[test]
fn a_gemma_scope_transcoder_set_attributes_on_gemma2() {
    use clt::attribution::replacement::{ReplacementTranscoder, calibrated_transcoder};
    use clt::cache::InputHook;
    use clt::clt::{CltConfig, DecoderKind, Params};
    use common::npz::{Layer, write_gemma_scope_set};
    let (dir, m) = load();
    let prompt = "abaabbabab";
    let tokens = m.tokenizer.encode_prompt(prompt).unwrap();
    // The calibrated encoders, each with its cross-layer decoder's first target as its one decoder row
    // (scaled as in the CLT test above).
    let clt =
        calibrated_transcoder(&m.model, &tokens, 32, 4, 5, InputHook::MlpInUnweighted).unwrap();
    let (l_n, d, f) = (clt.cfg.n_layers, clt.cfg.d_model, clt.cfg.n_features);
    let cfg = CltConfig {
        decoder: DecoderKind::PerLayer,
        ..clt.cfg.clone()
    };
    let mut params = Params::zeros(&cfg);
    for l in 0..l_n {
        params.w_enc[l] = clt.params.w_enc[l].clone();
        params.b_enc[l] = clt.params.b_enc[l].clone();
        params.log_theta[l] = clt.params.log_theta[l].clone();
        let rows = clt.params.w_dec[l].chunks_exact((l_n - l) * d);
        params.w_dec[l] = rows.flat_map(|r| r[..d].iter().map(|v| v * 30.0)).collect();
        params.b_dec[l] = (0..d).map(|i| 0.01 * i as f32).collect();
    }
    let tc = ReplacementTranscoder {
        cfg,
        params,
        thresholds: clt.thresholds.clone(),
        topk: None,
        input_hook: InputHook::MlpInUnweighted,
    };
    let layers: Vec<Layer> = (0..l_n)
        .map(|l| Layer {
            w_enc: &tc.params.w_enc[l],
            w_dec: &tc.params.w_dec[l],
            b_enc: &tc.params.b_enc[l],
            b_dec: &tc.params.b_dec[l],
            threshold: &tc.thresholds[l],
        })
        .collect();
    let set = dir.path().join("gemma-scope");
    write_gemma_scope_set(&set, &layers, "ln2.hook_normalized");
    assert_eq!(f, tc.params.b_enc[0].len());
    common::hf::attribute_and_intervene_on(dir.path(), &m, &tc, &set, prompt);
}

/// Feature dashboards over a Gemma-2 store cached from the norm before its weight: a Gemma Scope set
/// (`ln2.hook_normalized`, the same input) is analysed; the same set named for `mlp.hook_in` (the MLP's
/// input) is refused, naming the store and both hooks.
#[test]
fn feature_dashboards_check_the_stores_hook() {
    use common::npz::{Layer, write_gemma_scope_set};
    let (dir, m) = load();
    common::store::toy_corpus_caches_as_hooks(
        &m,
        dir.path(),
        clt::cache::InputHook::MlpInUnweighted,
    );
    let (f, d) = (8, D);
    let w: Vec<f32> = (0..f * d)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
        .collect();
    let (b, bd, th) = (vec![0.0f32; f], vec![0.0f32; d], vec![0.05f32; f]);
    let layers: Vec<Layer> = (0..N_LAYER)
        .map(|_| Layer {
            w_enc: &w,
            w_dec: &w,
            b_enc: &b,
            b_dec: &bd,
            threshold: &th,
        })
        .collect();
    let run = |hook: &str| {
        let set = dir.path().join(format!("set-{}", hook.replace('.', "-")));
        write_gemma_scope_set(&set, &layers, hook);
        clt::features::cli::run(&clt::features::cli::FeaturesArgs {
            transcoder: set,
            store: dir.path().join("store"),
            out: dir.path().join(format!("features-{hook}")),
            model: Some(dir.path().to_path_buf()),
            tokenizer: None,
            top_k: 4,
            samples: 2,
            before: 2,
            after: 1,
            logits: 3,
            max_tokens: None,
            chunk_tokens: 64,
            scan: None,
            json: false,
            quiet: true,
        })
    };
    run("ln2.hook_normalized").unwrap();
    let e = run("mlp.hook_in").unwrap_err().to_string();
    assert!(
        e.contains("MlpInNormed") && e.contains("MlpInUnweighted") && e.contains("store"),
        "{e}"
    );
}

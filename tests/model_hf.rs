//! The Hugging Face directory loader, on stories260K rewritten as a Hugging Face Llama directory (Q/K rows
//! permuted into `transformers`' half-split RoPE order, as `convert_llama_weights_to_hf.py` does): its logits
//! must equal the llama2.c checkpoint's, which checks the half-split RoPE path on a real model.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clt::model::llama::llama3_rope_factors;
use clt::model::{self, CausalLm, LlamaModel, ModelFormat, RopeStyle};
use safetensors::{Dtype, tensor::TensorView};

fn shared() -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared"));
    assert!(
        p.is_dir(),
        "{} is missing: the HF loader test needs it",
        p.display()
    );
    p
}

/// HF's permutation of a Q or K matrix `[n_heads * hd, d]`: row `h*hd + j*hd/2 + i` ← row `h*hd + 2i + j`.
fn permute(w: &[f32], n_heads: usize, hd: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    for h in 0..n_heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let (dst, src) = (h * hd + j * hd / 2 + i, h * hd + 2 * i + j);
                out[dst * d..(dst + 1) * d].copy_from_slice(&w[src * d..(src + 1) * d]);
            }
        }
    }
    out
}

/// Writes `m` as a Hugging Face directory whose config says `intermediate` and `rope_scaling`.
fn write_hf_dir(m: &LlamaModel, dir: &Path, intermediate: usize, rope_scaling: serde_json::Value) {
    let c = &m.config;
    let mut tensors: Vec<(String, Vec<f32>, Vec<usize>)> = vec![
        (
            "model.embed_tokens.weight".into(),
            m.tok_embeddings.clone(),
            vec![c.vocab_size, c.d_model],
        ),
        (
            "model.norm.weight".into(),
            m.final_norm.clone(),
            vec![c.d_model],
        ),
    ];
    let (d, h, q, kv) = (c.d_model, c.hidden_dim, c.q_dim(), c.kv_dim());
    for (l, w) in m.layers.iter().enumerate() {
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        tensors.extend([
            (p("input_layernorm"), w.attn_norm.clone(), vec![d]),
            (
                p("self_attn.q_proj"),
                permute(&w.wq, c.n_heads, c.head_dim, d),
                vec![q, d],
            ),
            (
                p("self_attn.k_proj"),
                permute(&w.wk, c.n_kv_heads, c.head_dim, d),
                vec![kv, d],
            ),
            (p("self_attn.v_proj"), w.wv.clone(), vec![kv, d]),
            (p("self_attn.o_proj"), w.wo.clone(), vec![d, q]),
            (p("post_attention_layernorm"), w.mlp_norm.clone(), vec![d]),
            (p("mlp.gate_proj"), w.w_gate.clone(), vec![h, d]),
            (p("mlp.up_proj"), w.w_up.clone(), vec![h, d]),
            (p("mlp.down_proj"), w.w_down.clone(), vec![d, h]),
        ]);
    }
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .into_iter()
        .map(|(n, v, s)| (n, v.iter().flat_map(|x| x.to_le_bytes()).collect(), s))
        .collect();
    // Two shards, to exercise the multi-file index.
    let (a, b) = bytes.split_at(bytes.len() / 2);
    for (i, part) in [a, b].iter().enumerate() {
        let views: HashMap<String, TensorView<'_>> = part
            .iter()
            .map(|(n, data, s)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), data).unwrap(),
                )
            })
            .collect();
        let file = dir.join(format!("model-0000{}-of-00002.safetensors", i + 1));
        safetensors::serialize_to_file(views, None, &file).unwrap();
    }
    let cfg = serde_json::json!({
        "model_type": "llama", "hidden_size": d, "intermediate_size": intermediate,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_seq_len, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": true, "rope_scaling": rope_scaling, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    common::hf::write_toy_tokenizer(dir);
}

#[test]
fn hf_directory_matches_the_llama2c_checkpoint() {
    let base = model::load(&shared().join("models/stories260K/stories260K.bin"), None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let llama = base.model.as_llama().unwrap();
    write_hf_dir(
        llama,
        dir.path(),
        llama.config.hidden_dim,
        serde_json::Value::Null,
    );
    let hf = model::load(dir.path(), None).unwrap();
    assert_eq!(hf.format, ModelFormat::HfDir);
    assert_eq!(
        hf.model.as_llama().unwrap().config.rope_style,
        RopeStyle::HalfSplit
    );
    assert!(hf.model.as_llama().unwrap().output.is_none());
    assert_eq!(hf.tokenizer.encode("abab").unwrap(), vec![2, 2]);
    assert_eq!(hf.tokenizer.eos(), Some(2));
    let ids = base
        .tokenizer
        .encode("Once upon a time, there was a little girl named Lily.")
        .unwrap();
    let (want, got) = (
        base.model.forward(&ids).unwrap(),
        hf.model.forward(&ids).unwrap(),
    );
    let d = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        d <= 1e-4,
        "HF (half-split RoPE) and llama2.c (adjacent pairs) logits differ by {d}"
    );
}

#[test]
fn shape_disagreeing_with_the_config_names_file_and_tensor() {
    let base = model::load(&shared().join("models/stories260K/stories260K.bin"), None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let llama = base.model.as_llama().unwrap();
    write_hf_dir(
        llama,
        dir.path(),
        llama.config.hidden_dim + 1,
        serde_json::Value::Null,
    );
    let e = model::load(dir.path(), None).unwrap_err().to_string();
    assert!(
        e.contains("mlp.gate_proj") && e.contains(".safetensors") && e.contains("config.json"),
        "{e}"
    );
    let empty = tempfile::tempdir().unwrap();
    let e = model::load(empty.path(), None).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
}

/// Llama 3's RoPE scaling in `config.json` (`rope_type: "llama3"`), on stories260K's four rotary
/// frequencies per head (wavelengths 6.3, 63, 628 and 6,283 positions) with 1,024 original positions and
/// frequency factors 1 and 4: the two fast frequencies kept, the slowest divided by the factor, the third
/// smoothed between. The HF model's logits equal the llama2.c checkpoint's with the same divisors, and
/// differ from the unscaled model's. A scaling the engine does not implement is refused, naming it.
#[test]
fn llama3_rope_scaling_is_applied_and_other_scalings_refused() {
    let base = model::load(&shared().join("models/stories260K/stories260K.bin"), None).unwrap();
    let llama = base.model.as_llama().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let scaling = serde_json::json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024
    });
    write_hf_dir(llama, dir.path(), llama.config.hidden_dim, scaling);
    let hf = model::load(dir.path(), None).unwrap();
    let got = &hf.model.as_llama().unwrap().config.rope_freq_factors;
    let want = llama3_rope_factors(8, 10_000.0, 8.0, 1.0, 4.0, 1024.0);
    assert_eq!(got, &want);
    assert_eq!(&want[..2], &[1.0, 1.0]);
    assert!(want[2] > 1.0 && want[2] < 8.0, "{want:?}");
    assert_eq!(want[3], 8.0);
    let mut scaled = llama.clone();
    scaled.config.rope_freq_factors = want;
    let ids = base
        .tokenizer
        .encode("Once upon a time, there was a little girl named Lily. She liked to play")
        .unwrap();
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    let logits = hf.model.forward(&ids).unwrap();
    let d = max_diff(&logits, &scaled.forward(&ids).unwrap());
    assert!(d <= 1e-4, "scaled HF and llama2.c logits differ by {d}");
    let moved = max_diff(&logits, &llama.forward(&ids).unwrap());
    assert!(moved > 1e-3, "the scaling moved the logits by only {moved}");

    let other = tempfile::tempdir().unwrap();
    let yarn = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    write_hf_dir(llama, other.path(), llama.config.hidden_dim, yarn);
    let e = model::load(other.path(), None).unwrap_err().to_string();
    assert!(e.contains("yarn") && e.contains("config.json"), "{e}");
}

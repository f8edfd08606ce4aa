//! Loading Hugging Face Llama-family model directories: `config.json`, one or more `*.safetensors`
//! (memory-mapped; F32, F16 or BF16) and `tokenizer.json`.
//!
//! Hugging Face checkpoints keep Q/K rows in the order `transformers` rotates them, so these models use
//! [`RopeStyle::HalfSplit`]. Architectures with attention biases (Qwen2), Q/K norms (Qwen3) or RoPE scaling
//! (Llama 3.1+) are refused with an "unsupported" error rather than run wrongly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use super::bpe::BpeTokenizer;
use super::llama::{LayerWeights, LlamaConfig, LlamaModel, RopeStyle};
use crate::{Error, Result};

/// Whether `dir` looks like a Hugging Face model directory.
pub fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file()
}

/// The Llama configuration in `config.json`, and whether the unembedding is tied.
pub fn config(dir: &Path) -> Result<(LlamaConfig, bool)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let j: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: path.clone(),
        offset: 0,
        reason: format!("invalid JSON: {e}"),
    })?;
    let field = |k: &str| Error::Format {
        path: path.clone(),
        offset: 0,
        reason: format!("`{k}` is missing or not a positive integer"),
    };
    let int = |k: &str| {
        j[k].as_u64()
            .filter(|&v| v > 0)
            .map(|v| v as usize)
            .ok_or_else(|| field(k))
    };
    let model_type = j["model_type"].as_str().unwrap_or("");
    if !matches!(model_type, "llama" | "mistral") {
        return Err(Error::Unsupported(format!(
            "{}: model_type `{model_type}` (supported: llama, mistral)",
            path.display()
        )));
    }
    if !j["rope_scaling"].is_null() {
        return Err(Error::Unsupported(format!(
            "{}: rope_scaling is not supported",
            path.display()
        )));
    }
    if j["attention_bias"].as_bool() == Some(true) || j["mlp_bias"].as_bool() == Some(true) {
        return Err(Error::Unsupported(format!(
            "{}: attention or MLP biases",
            path.display()
        )));
    }
    let d = int("hidden_size")?;
    let n_heads = int("num_attention_heads")?;
    let c = LlamaConfig {
        d_model: d,
        hidden_dim: int("intermediate_size")?,
        n_layers: int("num_hidden_layers")?,
        n_heads,
        n_kv_heads: if j["num_key_value_heads"].is_null() {
            n_heads
        } else {
            int("num_key_value_heads")?
        },
        head_dim: if j["head_dim"].is_null() {
            d / n_heads
        } else {
            int("head_dim")?
        },
        vocab_size: int("vocab_size")?,
        max_seq_len: int("max_position_embeddings")?,
        norm_eps: j["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
        rope_theta: j["rope_theta"].as_f64().unwrap_or(10000.0) as f32,
        rope_style: RopeStyle::HalfSplit,
    };
    c.validate(&path)?;
    Ok((c, j["tie_word_embeddings"].as_bool().unwrap_or(false)))
}

/// One memory-mapped safetensors file.
struct Mapped {
    path: PathBuf,
    map: memmap2::Mmap,
}

/// Loads the Llama model in `dir`.
pub fn load_model(dir: &Path) -> Result<LlamaModel> {
    let (c, tied) = config(dir)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: "no *.safetensors file".into(),
        });
    }
    let mut mapped = Vec::with_capacity(files.len());
    for path in files {
        let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the file is mapped read-only and only read while mapped; like every memory-mapped loader we
        // rely on nobody truncating or rewriting a model file while it is being loaded.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
        mapped.push(Mapped { path, map });
    }
    let mut parsed = Vec::with_capacity(mapped.len());
    for m in &mapped {
        let st = SafeTensors::deserialize(&m.map).map_err(|e| Error::Format {
            path: m.path.clone(),
            offset: 0,
            reason: format!("invalid safetensors file: {e}"),
        })?;
        parsed.push((m.path.as_path(), st));
    }
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, (_, st)) in parsed.iter().enumerate() {
        for name in st.names() {
            index.insert(name.to_string(), i);
        }
    }
    let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let &i = index.get(name).ok_or_else(|| Error::Tensor {
            path: dir.to_path_buf(),
            tensor: name.into(),
            reason: "missing from every *.safetensors file".into(),
        })?;
        let (path, st) = &parsed[i];
        let terr = |reason: String| Error::Tensor {
            path: path.to_path_buf(),
            tensor: name.into(),
            reason,
        };
        let view = st.tensor(name).map_err(|e| terr(e.to_string()))?;
        if view.shape() != shape {
            return Err(terr(format!(
                "shape {:?} disagrees with config.json, which implies {shape:?}",
                view.shape()
            )));
        }
        let b = view.data();
        Ok(match view.dtype() {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(terr(format!(
                    "unsupported dtype {other:?} (supported: F32, F16, BF16)"
                )));
            }
        })
    };
    let (d, h, q, kv, v) = (c.d_model, c.hidden_dim, c.q_dim(), c.kv_dim(), c.vocab_size);
    let mut layers = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        layers.push(LayerWeights {
            attn_norm: tensor(&p("input_layernorm"), &[d])?,
            wq: tensor(&p("self_attn.q_proj"), &[q, d])?,
            wk: tensor(&p("self_attn.k_proj"), &[kv, d])?,
            wv: tensor(&p("self_attn.v_proj"), &[kv, d])?,
            wo: tensor(&p("self_attn.o_proj"), &[d, q])?,
            mlp_norm: tensor(&p("post_attention_layernorm"), &[d])?,
            w_gate: tensor(&p("mlp.gate_proj"), &[h, d])?,
            w_up: tensor(&p("mlp.up_proj"), &[h, d])?,
            w_down: tensor(&p("mlp.down_proj"), &[d, h])?,
        });
    }
    let output = if tied && !index.contains_key("lm_head.weight") {
        None
    } else {
        Some(tensor("lm_head.weight", &[v, d])?)
    };
    let model = LlamaModel {
        tok_embeddings: tensor("model.embed_tokens.weight", &[v, d])?,
        final_norm: tensor("model.norm.weight", &[d])?,
        output,
        layers,
        config: c,
    };
    model.validate(dir)?;
    Ok(model)
}

/// The tokenizer of the model in `dir`: `tokenizer` (a `tokenizer.json`) when given, else `dir/tokenizer.json`;
/// the end-of-sequence id comes from `config.json`.
pub fn load_tokenizer(dir: &Path, tokenizer: Option<&Path>) -> Result<BpeTokenizer> {
    let path = tokenizer.map_or_else(|| dir.join("tokenizer.json"), Path::to_path_buf);
    let cfg: serde_json::Value = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let eos = match &cfg["eos_token_id"] {
        serde_json::Value::Array(a) => a.first().and_then(|v| v.as_u64()),
        v => v.as_u64(),
    }
    .map(|v| v as u32);
    BpeTokenizer::from_file(&path, eos)
}

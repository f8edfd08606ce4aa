//! Loading Hugging Face Llama-family, Gemma-2 and GPT-2 model directories: `config.json`, one or more `*.safetensors`
//! (memory-mapped; F32, F16 or BF16) and `tokenizer.json`.
//!
//! Hugging Face checkpoints keep Q/K rows in the order `transformers` rotates them, so these models use
//! [`RopeStyle::HalfSplit`]. RoPE scaling of Llama 3.1+ (`rope_type: "llama3"`) and linear scaling are
//! applied; other scalings (dynamic, YaRN, ...) and architectures with attention biases (Qwen2) or Q/K norms
//! (Qwen3) are refused with an "unsupported" error rather than run wrongly.
//!
//! `model_type: "gemma2"` loads a [`Gemma2Model`] (norm weights stored as `1 + w`; the tanh-GELU MLP only).
//!
//! `model_type: "gpt2"` loads a [`Gpt2Model`] (tensor names with or without `transformer.`; `Conv1D` weights
//! transposed to `(out, in)`); GPT-2 variants with another activation, `scale_attn_by_inverse_layer_idx` or
//! `reorder_and_upcast_attn` are refused likewise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};

use super::Model;
use super::bpe::BpeTokenizer;
use super::gemma2::{Gemma2Config, Gemma2Model, Gemma2PostNorms};
use super::gpt2::{Gpt2Config, Gpt2LayerWeights, Gpt2Model};
use super::llama::{LayerWeights, LlamaConfig, LlamaModel, RopeStyle, llama3_rope_factors};
use crate::{Error, Result};

/// The most layers a `config.json` may state (llama.cpp allows 512): more is a corrupt file, refused before
/// anything is sized by it.
const MAX_LAYERS: usize = 4096;
/// The widest size (hidden, MLP, head, vocabulary, head count) a `config.json` may state, for the same
/// reason: 2^24, beyond any released model by two orders of magnitude.
const MAX_WIDTH: usize = 1 << 24;

/// The positive integer `j[k]` of the `config.json` at `path`, at most `max`.
fn size(path: &Path, j: &serde_json::Value, k: &str, max: usize) -> Result<usize> {
    let v = j[k]
        .as_u64()
        .filter(|&v| v > 0)
        .ok_or_else(|| Error::Format {
            path: path.to_path_buf(),
            offset: 0,
            reason: format!("`{k}` is missing or not a positive integer"),
        })?;
    if v > max as u64 {
        return Err(Error::Format {
            path: path.to_path_buf(),
            offset: 0,
            reason: format!(
                "`{k}` is {v}, more than any model has (at most {max}): a corrupt file?"
            ),
        });
    }
    Ok(v as usize)
}

/// Whether `dir` looks like a Hugging Face model directory.
pub fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file()
}

/// The Llama configuration in `config.json`, and whether the unembedding is tied.
pub fn config(dir: &Path) -> Result<(LlamaConfig, bool)> {
    let (path, j) = config_json(dir)?;
    let model_type = j["model_type"].as_str().unwrap_or("");
    if !matches!(model_type, "llama" | "mistral") {
        return Err(Error::Unsupported(format!(
            "{}: model_type `{model_type}` (supported: llama, mistral, gpt2, gemma2)",
            path.display()
        )));
    }
    if let Some(act) = j["hidden_act"].as_str().filter(|a| *a != "silu") {
        return Err(Error::Unsupported(format!(
            "{}: hidden_act `{act}` (the Llama MLP is SwiGLU: silu)",
            path.display()
        )));
    }
    if j["attention_bias"].as_bool() == Some(true) || j["mlp_bias"].as_bool() == Some(true) {
        return Err(Error::Unsupported(format!(
            "{}: attention or MLP biases",
            path.display()
        )));
    }
    let c = llama_sizes(&path, &j)?;
    Ok((c, j["tie_word_embeddings"].as_bool().unwrap_or(false)))
}

/// The sizes, norm epsilon and RoPE of a Llama-shaped `config.json` (Llama, Mistral, Gemma-2), validated.
fn llama_sizes(path: &Path, j: &serde_json::Value) -> Result<LlamaConfig> {
    let int = |k: &str| size(path, j, k, MAX_WIDTH);
    let d = int("hidden_size")?;
    let n_heads = int("num_attention_heads")?;
    let head_dim = if j["head_dim"].is_null() {
        d / n_heads
    } else {
        int("head_dim")?
    };
    // transformers 5 writes `rope_parameters` (theta, type and scaling in one object); earlier versions
    // `rope_theta` and `rope_scaling`.
    let rope = &j["rope_parameters"];
    let (rope_theta, scaling) = if rope.is_object() {
        (rope["rope_theta"].as_f64(), rope)
    } else {
        (j["rope_theta"].as_f64(), &j["rope_scaling"])
    };
    let rope_theta = rope_theta.unwrap_or(10000.0) as f32;
    let c = LlamaConfig {
        d_model: d,
        hidden_dim: int("intermediate_size")?,
        n_layers: size(path, j, "num_hidden_layers", MAX_LAYERS)?,
        n_heads,
        n_kv_heads: if j["num_key_value_heads"].is_null() {
            n_heads
        } else {
            int("num_key_value_heads")?
        },
        head_dim,
        vocab_size: int("vocab_size")?,
        // (Not a width: the RoPE tables are sized by the prompt.)
        max_seq_len: size(path, j, "max_position_embeddings", usize::MAX)?,
        norm_eps: j["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
        rope_theta,
        rope_style: RopeStyle::HalfSplit,
        rope_freq_factors: rope_scaling(path, scaling, head_dim, rope_theta)?,
    };
    c.validate(path)?;
    Ok(c)
}

/// The Gemma-2 configuration in `config.json`: the Llama-shaped sizes and what Gemma-2 adds
/// (`query_pre_attn_scalar`, the two soft caps, `sliding_window` and which layers use it). A key that is
/// absent takes `transformers`' `Gemma2Config` default (`head_dim` and `query_pre_attn_scalar` 256, soft caps
/// 50 and 30, `sliding_window` 4096); an explicit `null` cap or window turns it off. An MLP activation other
/// than the tanh GELU is refused.
pub fn gemma2_config(dir: &Path) -> Result<(LlamaConfig, Gemma2Config)> {
    let (path, mut j) = config_json(dir)?;
    // Checked first: a `gemma2` model type makes `j` an object, which the defaults below need.
    let model_type = j["model_type"].as_str().unwrap_or("");
    if model_type != "gemma2" {
        return Err(Error::Unsupported(format!(
            "{}: model_type `{model_type}` is not gemma2",
            path.display()
        )));
    }
    for (key, default) in [
        ("head_dim", serde_json::json!(256)),
        ("query_pre_attn_scalar", serde_json::json!(256)),
        ("attn_logit_softcapping", serde_json::json!(50.0)),
        ("final_logit_softcapping", serde_json::json!(30.0)),
        ("sliding_window", serde_json::json!(4096)),
    ] {
        if j.get(key).is_none() {
            j[key] = default;
        }
    }
    let j = j;
    for key in ["hidden_activation", "hidden_act"] {
        if let Some(act) = j[key]
            .as_str()
            .filter(|a| !matches!(*a, "gelu_pytorch_tanh" | "gelu_new" | "gelu_tanh"))
        {
            return Err(Error::Unsupported(format!(
                "{}: {key} `{act}` (Gemma-2's MLP runs the tanh GELU, gelu_pytorch_tanh)",
                path.display()
            )));
        }
        // `hidden_activation` wins when both are given, as in transformers.
        if j[key].is_string() {
            break;
        }
    }
    if j["attention_bias"].as_bool() == Some(true) {
        return Err(Error::Unsupported(format!(
            "{}: attention biases",
            path.display()
        )));
    }
    let c = llama_sizes(&path, &j)?;
    let bad = |reason: String| Error::Format {
        path: path.clone(),
        offset: 0,
        reason,
    };
    let positive = |k: &str| -> Result<Option<f32>> {
        match &j[k] {
            serde_json::Value::Null => Ok(None),
            v => v
                .as_f64()
                .filter(|v| v.is_finite() && *v > 0.0)
                .map(|v| Some(v as f32))
                .ok_or_else(|| bad(format!("`{k}` is not a positive number"))),
        }
    };
    let query_pre_attn_scalar = positive("query_pre_attn_scalar")?
        .ok_or_else(|| bad("`query_pre_attn_scalar` is null".into()))?;
    let sliding_window = match &j["sliding_window"] {
        serde_json::Value::Null => None,
        v => Some(
            v.as_u64()
                .filter(|&w| w > 0)
                .ok_or_else(|| bad("`sliding_window` is not a positive integer".into()))?
                as usize,
        ),
    };
    // transformers: `layer_types` when given, else every even layer slides.
    let sliding_layers = match &j["layer_types"] {
        serde_json::Value::Null => (0..c.n_layers).map(|l| l % 2 == 0).collect(),
        serde_json::Value::Array(a) if a.len() == c.n_layers => a
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(bad(format!(
                    "`layer_types` entry {t} is not sliding_attention or full_attention"
                ))),
            })
            .collect::<Result<Vec<bool>>>()?,
        _ => {
            return Err(bad(format!(
                "`layer_types` is not a list of {} layer types",
                c.n_layers
            )));
        }
    };
    let g = Gemma2Config {
        query_pre_attn_scalar,
        attn_logit_softcapping: positive("attn_logit_softcapping")?,
        final_logit_softcapping: positive("final_logit_softcapping")?,
        sliding_window,
        sliding_layers,
    };
    Ok((c, g))
}

/// The memory-mapped `*.safetensors` files of a model directory, with an index from tensor name to file.
struct Tensors {
    dir: PathBuf,
    /// Per file: its path, its mapping, the byte where its data starts and its parsed header.
    files: Vec<(PathBuf, memmap2::Mmap, usize, Metadata)>,
    index: HashMap<String, usize>,
}

impl Tensors {
    fn open(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                reason: "no *.safetensors file".into(),
            });
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the file is mapped read-only and only read while mapped; like every memory-mapped loader
            // we rely on nobody truncating or rewriting a model file while it is being loaded.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
            // `read_metadata` checks the header's offsets cover the data exactly.
            let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| Error::Format {
                path: path.clone(),
                offset: 0,
                reason: format!("invalid safetensors file: {e}"),
            })?;
            for name in meta.tensors().keys() {
                index.insert(name.clone(), files.len());
            }
            files.push((path, map, 8 + n, meta));
        }
        Ok(Tensors {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The tensor `name` in f32, whose shape must be `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let &i = self.index.get(name).ok_or_else(|| Error::Tensor {
            path: self.dir.clone(),
            tensor: name.into(),
            reason: "missing from every *.safetensors file".into(),
        })?;
        let (path, map, start, meta) = &self.files[i];
        let terr = |reason: String| Error::Tensor {
            path: path.clone(),
            tensor: name.into(),
            reason,
        };
        let info = meta
            .info(name)
            .ok_or_else(|| terr("not in the header".into()))?;
        if info.shape != shape {
            return Err(terr(format!(
                "shape {:?} disagrees with config.json, which implies {shape:?}",
                info.shape
            )));
        }
        let (a, b) = info.data_offsets;
        let b = &map[start + a..start + b];
        Ok(match info.dtype {
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
    }
}

/// The divisors of the rotary frequencies that `config.json`'s `rope_scaling` asks for: none when it is
/// null (or `rope_type: "default"`), Llama 3's (`"llama3"`, [`llama3_rope_factors`]) or linear scaling's (every
/// frequency divided by `factor`); any other kind is refused, naming it.
fn rope_scaling(
    path: &Path,
    s: &serde_json::Value,
    head_dim: usize,
    theta: f32,
) -> Result<Vec<f32>> {
    if s.is_null() {
        return Ok(Vec::new());
    }
    let kind = s["rope_type"].as_str().or_else(|| s["type"].as_str());
    let num = |k: &str| {
        s[k].as_f64()
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or_else(|| Error::Format {
                path: path.to_path_buf(),
                offset: 0,
                reason: format!("rope_scaling.{k} is missing or not a positive number"),
            })
    };
    match kind {
        Some("default") => Ok(Vec::new()),
        Some("linear") => Ok(vec![num("factor")? as f32; head_dim / 2]),
        Some("llama3") => {
            let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
            if high <= low {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    offset: 0,
                    reason: format!(
                        "rope_scaling: high_freq_factor {high} is not above low_freq_factor {low}"
                    ),
                });
            }
            Ok(llama3_rope_factors(
                head_dim,
                theta,
                num("factor")?,
                low,
                high,
                num("original_max_position_embeddings")?,
            ))
        }
        other => Err(Error::Unsupported(format!(
            "{}: rope_scaling of type `{}` (supported: llama3, linear)",
            path.display(),
            other.unwrap_or("none given")
        ))),
    }
}

/// Reads `dir/config.json`.
fn config_json(dir: &Path) -> Result<(PathBuf, serde_json::Value)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let j = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: path.clone(),
        offset: 0,
        reason: format!("invalid JSON: {e}"),
    })?;
    Ok((path, j))
}

/// Loads the model in `dir`: GPT-2 or Gemma-2 when `config.json`'s `model_type` says so, else a
/// Llama-family model.
pub fn load_model(dir: &Path) -> Result<Model> {
    let (_, j) = config_json(dir)?;
    match j["model_type"].as_str() {
        Some("gpt2") => Ok(Model::Gpt2(load_gpt2(dir)?)),
        Some("gemma2") => Ok(Model::Gemma2(load_gemma2(dir)?)),
        _ => Ok(Model::Llama(load_llama(dir)?)),
    }
}

/// Loads the Gemma-2 model in `dir`: tensor names with or without `model.`; every norm's weight `w` stored as
/// `1 + w` (Gemma's RMSNorm multiplies by it); the unembedding tied to the embedding unless the directory
/// has an `lm_head.weight` and `tie_word_embeddings` is false.
pub fn load_gemma2(dir: &Path) -> Result<Gemma2Model> {
    let (c, gemma) = gemma2_config(dir)?;
    let (_, j) = config_json(dir)?;
    let tied = j["tie_word_embeddings"].as_bool().unwrap_or(true);
    let st = Tensors::open(dir)?;
    let prefix = if st.contains("model.embed_tokens.weight") {
        "model."
    } else {
        ""
    };
    let tensor = |name: &str, shape: &[usize]| st.get(&format!("{prefix}{name}"), shape);
    let gain = |name: &str, d: usize| -> Result<Vec<f32>> {
        Ok(tensor(name, &[d])?.into_iter().map(|w| 1.0 + w).collect())
    };
    let (d, h, q, kv, v) = (c.d_model, c.hidden_dim, c.q_dim(), c.kv_dim(), c.vocab_size);
    let mut layers = Vec::with_capacity(c.n_layers);
    let mut post_norms = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let p = |s: &str| format!("layers.{l}.{s}.weight");
        layers.push(LayerWeights {
            attn_norm: gain(&p("input_layernorm"), d)?,
            wq: tensor(&p("self_attn.q_proj"), &[q, d])?,
            wk: tensor(&p("self_attn.k_proj"), &[kv, d])?,
            wv: tensor(&p("self_attn.v_proj"), &[kv, d])?,
            wo: tensor(&p("self_attn.o_proj"), &[d, q])?,
            mlp_norm: gain(&p("pre_feedforward_layernorm"), d)?,
            w_gate: tensor(&p("mlp.gate_proj"), &[h, d])?,
            w_up: tensor(&p("mlp.up_proj"), &[h, d])?,
            w_down: tensor(&p("mlp.down_proj"), &[d, h])?,
        });
        post_norms.push(Gemma2PostNorms {
            attn: gain(&p("post_attention_layernorm"), d)?,
            mlp: gain(&p("post_feedforward_layernorm"), d)?,
        });
    }
    let output = if tied || !st.contains("lm_head.weight") {
        None
    } else {
        Some(st.get("lm_head.weight", &[v, d])?)
    };
    let model = Gemma2Model {
        base: LlamaModel {
            tok_embeddings: tensor("embed_tokens.weight", &[v, d])?,
            final_norm: gain("norm.weight", d)?,
            output,
            layers,
            config: c,
        },
        gemma,
        post_norms,
    };
    model.validate(dir)?;
    Ok(model)
}

/// Loads the Llama model in `dir`.
pub fn load_llama(dir: &Path) -> Result<LlamaModel> {
    let (c, tied) = config(dir)?;
    let st = Tensors::open(dir)?;
    let tensor = |name: &str, shape: &[usize]| st.get(name, shape);
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
    let output = if tied && !st.contains("lm_head.weight") {
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

/// The GPT-2 configuration in `config.json` (`n_embd`, `n_layer`, `n_head`, `n_inner`, `vocab_size`,
/// `n_positions`, `layer_norm_epsilon`); variants this forward does not implement are refused.
pub fn gpt2_config(dir: &Path) -> Result<Gpt2Config> {
    let (path, j) = config_json(dir)?;
    let int = |k: &str| size(&path, &j, k, MAX_WIDTH);
    let model_type = j["model_type"].as_str().unwrap_or("");
    if model_type != "gpt2" {
        return Err(Error::Unsupported(format!(
            "{}: model_type `{model_type}` is not gpt2",
            path.display()
        )));
    }
    let act = j["activation_function"].as_str().unwrap_or("gelu_new");
    if !matches!(act, "gelu_new" | "gelu_pytorch_tanh") {
        return Err(Error::Unsupported(format!(
            "{}: activation_function `{act}` (supported: gelu_new, gelu_pytorch_tanh)",
            path.display()
        )));
    }
    for flag in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
        if j[flag].as_bool() == Some(true) {
            return Err(Error::Unsupported(format!("{}: {flag}", path.display())));
        }
    }
    if j["scale_attn_weights"].as_bool() == Some(false) {
        return Err(Error::Unsupported(format!(
            "{}: scale_attn_weights = false",
            path.display()
        )));
    }
    let d = int("n_embd")?;
    let c = Gpt2Config {
        d_model: d,
        d_mlp: if j["n_inner"].is_null() {
            4 * d
        } else {
            int("n_inner")?
        },
        n_layers: size(&path, &j, "n_layer", MAX_LAYERS)?,
        n_heads: int("n_head")?,
        vocab_size: int("vocab_size")?,
        max_seq_len: int("n_positions")?,
        norm_eps: j["layer_norm_epsilon"].as_f64().unwrap_or(1e-5) as f32,
    };
    c.validate(&path)?;
    Ok(c)
}

/// `w` (`[rows, cols]` row-major) transposed.
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// Loads the GPT-2 model in `dir`; tensor names may carry the `transformer.` prefix of `GPT2LMHeadModel`.
/// `Conv1D` weights (stored `(in, out)`) are transposed to `(out, in)`.
pub fn load_gpt2(dir: &Path) -> Result<Gpt2Model> {
    let c = gpt2_config(dir)?;
    let st = Tensors::open(dir)?;
    let prefix = if st.contains("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let tensor = |name: &str, shape: &[usize]| st.get(&format!("{prefix}{name}"), shape);
    // A Conv1D weight stored `[n_in, n_out]`, returned `(out, in)`.
    let conv = |name: &str, n_in: usize, n_out: usize| -> Result<Vec<f32>> {
        Ok(transpose(&tensor(name, &[n_in, n_out])?, n_in, n_out))
    };
    let (d, h, v) = (c.d_model, c.d_mlp, c.vocab_size);
    let mut layers = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let p = |s: &str| format!("h.{l}.{s}");
        layers.push(Gpt2LayerWeights {
            ln_1_w: tensor(&p("ln_1.weight"), &[d])?,
            ln_1_b: tensor(&p("ln_1.bias"), &[d])?,
            w_qkv: conv(&p("attn.c_attn.weight"), d, 3 * d)?,
            b_qkv: tensor(&p("attn.c_attn.bias"), &[3 * d])?,
            w_o: conv(&p("attn.c_proj.weight"), d, d)?,
            b_o: tensor(&p("attn.c_proj.bias"), &[d])?,
            ln_2_w: tensor(&p("ln_2.weight"), &[d])?,
            ln_2_b: tensor(&p("ln_2.bias"), &[d])?,
            w_fc: conv(&p("mlp.c_fc.weight"), d, h)?,
            b_fc: tensor(&p("mlp.c_fc.bias"), &[h])?,
            w_proj: conv(&p("mlp.c_proj.weight"), h, d)?,
            b_proj: tensor(&p("mlp.c_proj.bias"), &[d])?,
        });
    }
    let output = if st.contains("lm_head.weight") {
        Some(st.get("lm_head.weight", &[v, d])?)
    } else {
        None
    };
    let model = Gpt2Model {
        wte: tensor("wte.weight", &[v, d])?,
        wpe: tensor("wpe.weight", &[c.max_seq_len, d])?,
        ln_f_w: tensor("ln_f.weight", &[d])?,
        ln_f_b: tensor("ln_f.bias", &[d])?,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `config.json`'s fields that change the computation: an MLP activation other than SiLU and a RoPE
    /// scaling other than Llama 3's or linear are refused by name; Llama 3's is read.
    #[test]
    fn config_refuses_what_the_forward_would_run_wrongly() {
        let dir = tempfile::tempdir().unwrap();
        let write = |extra: serde_json::Value| {
            let mut j = serde_json::json!({
                "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
                "max_position_embeddings": 256, "rope_theta": 500000.0
            });
            for (k, v) in extra.as_object().unwrap() {
                j[k] = v.clone();
            }
            std::fs::write(dir.path().join("config.json"), j.to_string()).unwrap();
            config(dir.path())
        };
        assert!(
            write(serde_json::json!({}))
                .unwrap()
                .0
                .rope_freq_factors
                .is_empty()
        );
        let llama3 = serde_json::json!({"rope_scaling": {
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192
        }});
        let (c, _) = write(llama3).unwrap();
        assert_eq!(
            c.rope_freq_factors,
            llama3_rope_factors(16, 500000.0, 32.0, 1.0, 4.0, 8192.0)
        );
        let linear = serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}});
        assert_eq!(write(linear).unwrap().0.rope_freq_factors, vec![2.0; 8]);
        // transformers 5: theta and scaling in `rope_parameters`, which wins over `rope_theta`.
        let v5 = serde_json::json!({"rope_theta": null, "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 250000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
        }});
        let (c, _) = write(v5).unwrap();
        assert_eq!(c.rope_theta, 250000.0);
        assert_eq!(
            c.rope_freq_factors,
            llama3_rope_factors(16, 250000.0, 32.0, 1.0, 4.0, 8192.0)
        );
        for (extra, name) in [
            (serde_json::json!({"hidden_act": "gelu"}), "gelu"),
            (
                serde_json::json!({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
                "dynamic",
            ),
            (
                serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
                "low_freq_factor",
            ),
        ] {
            let e = write(extra).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains("config.json"), "{e}");
        }
    }
}

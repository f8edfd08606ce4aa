//! Reading GGUF v3 files: metadata, the tensor index, tensors dequantised to f32, and the Llama, Gemma-2 and
//! GPT-2 models and the byte-level BPE and SentencePiece tokenizers they hold.
//!
//! Supported tensor types: those of [`ggml_quants`](super::ggml_quants) (F32, F16, BF16, Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0, Q2_K to Q6_K, IQ4_NL, IQ4_XS; dequantised on load); any other type is refused with an "unsupported tensor
//! type" error naming the tensor. llama.cpp's converter permutes the Q and K weights of
//! Llama models so that its rotary embedding rotates adjacent pairs, so GGUF Llama models use
//! [`RopeStyle::AdjacentPairs`]; it leaves Gemma-2's as they are (llama.cpp rotates them NeoX-style,
//! [`RopeStyle::HalfSplit`]), and stores Gemma's norm weights as `1 + w` already. It transposes GPT-2's
//! `Conv1D` weights to `(out, in)` and writes the tied unembedding again as `output.weight`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::Model;
use super::bpe::BpeTokenizer;
use super::gemma2::{Gemma2Config, Gemma2Model, Gemma2PostNorms};
use super::ggml_quants::{SUPPORTED, block_layout, dequantize};
use super::gpt2::{Gpt2Config, Gpt2LayerWeights, Gpt2Model};
use super::llama::{LayerWeights, LlamaConfig, LlamaModel, RopeStyle};
use crate::{Error, Result};

/// The magic bytes at the start of every GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// One entry of the tensor index.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGML dimensions, innermost first (`[in, out]` for a matrix stored `(out, in)` row-major).
    pub dims: Vec<u64>,
    /// GGML type id.
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The name of a GGML type id.
pub fn type_name(t: u32) -> &'static str {
    const NAMES: [&str; 31] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    NAMES.get(t as usize).copied().unwrap_or("unknown")
}

/// A parsed GGUF file held in memory.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_offset: usize,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Format {
            path: self.path.to_path_buf(),
            offset: self.pos as u64,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        match self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()) {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!("truncated while reading {what}"))),
        }
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    /// A count that must fit in the rest of the file at `min_size` bytes per item.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(self.err(format!("{what} = {n} does not fit in the file")));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err(format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(what)?[0]),
            1 => Value::I8(self.arr::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => Value::Bool(self.arr::<1>(what)?[0] != 0),
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 4 {
                    return Err(self.err(format!("{what}: arrays nested too deeply")));
                }
                let et = self.u32(what)?;
                let n = self.count(what, 1)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(et, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            other => return Err(self.err(format!("{what}: unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Reads and indexes the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, bytes)
    }

    /// Indexes a GGUF file held in memory; `path` is used for errors.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let mut c = Cursor {
            path,
            bytes: &bytes,
            pos: 0,
        };
        let magic = c.arr::<4>("the magic")?;
        if &magic != MAGIC {
            return Err(Error::Format {
                path: path.to_path_buf(),
                offset: 0,
                reason: format!("not a GGUF file (magic {magic:?})"),
            });
        }
        let version = c.u32("the version")?;
        if version != 3 && version != 2 {
            return Err(c.err(format!(
                "GGUF version {version} is not supported (only 2 and 3)"
            )));
        }
        let n_tensors = c.count("the tensor count", 8)?;
        let n_kv = c.count("the metadata count", 12)?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key {i}"))?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&format!("the name of tensor {i}"))?;
            let nd = c.u32(&name)?;
            if nd == 0 || nd > 4 {
                return Err(c.err(format!("tensor `{name}` has {nd} dimensions")));
            }
            let dims = (0..nd).map(|_| c.u64(&name)).collect::<Result<Vec<_>>>()?;
            let ggml_type = c.u32(&name)?;
            let offset = c.u64(&name)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_offset = c.pos.div_ceil(align) * align;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_offset,
            bytes,
        })
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn tensor_err(&self, tensor: &str, reason: String) -> Error {
        Error::Tensor {
            path: self.path.clone(),
            tensor: tensor.into(),
            reason,
        }
    }

    /// The tensor `name` dequantised to f32, with its GGML dims (innermost first).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<u64>)> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| self.tensor_err(name, "missing".into()))?;
        let (block, block_bytes) = block_layout(info.ggml_type).ok_or_else(|| {
            self.tensor_err(
                name,
                format!(
                    "unsupported tensor type {} ({}); supported: {SUPPORTED}",
                    type_name(info.ggml_type),
                    info.ggml_type
                ),
            )
        })?;
        let n = info
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n < 1 << 40)
            .ok_or_else(|| self.tensor_err(name, format!("dims {:?} are too large", info.dims)))?;
        if n % block != 0 || info.dims[0] % block != 0 {
            return Err(self.tensor_err(
                name,
                format!(
                    "dims {:?} are not a multiple of the {block}-element block",
                    info.dims
                ),
            ));
        }
        let nbytes = n / block * block_bytes;
        let start = (self.data_offset as u64).checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(nbytes));
        let (start, end) = match (start, end) {
            (Some(s), Some(e)) if e <= self.bytes.len() as u64 => (s as usize, e as usize),
            _ => {
                return Err(self.tensor_err(
                    name,
                    format!(
                        "truncated: {nbytes} bytes at data offset {} run past the end of the file ({} bytes)",
                        info.offset,
                        self.bytes.len()
                    ),
                ));
            }
        };
        let raw = &self.bytes[start..end];
        let mut out = vec![0.0f32; n as usize];
        dequantize(info.ggml_type, raw, &mut out);
        Ok((out, info.dims.clone()))
    }

    /// The tensor `name` as f32, checked to have GGML dims `dims` (innermost first).
    pub fn tensor_shaped(&self, name: &str, dims: &[usize]) -> Result<Vec<f32>> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| self.tensor_err(name, "missing".into()))?;
        let want: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        if info.dims != want {
            return Err(self.tensor_err(
                name,
                format!(
                    "dims {:?} disagree with the config, which implies {want:?}",
                    info.dims
                ),
            ));
        }
        Ok(self.tensor_f32(name)?.0)
    }

    fn meta(&self, key: &str) -> Result<&Value> {
        self.metadata.get(key).ok_or_else(|| Error::Format {
            path: self.path.clone(),
            offset: 0,
            reason: format!("metadata key `{key}` is missing"),
        })
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        self.meta(key)?
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| Error::Format {
                path: self.path.clone(),
                offset: 0,
                reason: format!("metadata key `{key}` is not an unsigned integer"),
            })
    }

    /// The number of blocks under `key`, refused when the tensor index has no tensors of the last one
    /// (`blk.{n - 1}.*`): a corrupted count is an error here, not an allocation sized by it.
    fn block_count(&self, key: &str) -> Result<usize> {
        let n = self.meta_usize(key)?;
        let last = format!("blk.{}.", n.saturating_sub(1));
        if n > self.tensors.len() || !self.tensors.iter().any(|t| t.name.starts_with(&last)) {
            return Err(Error::Format {
                path: self.path.clone(),
                offset: 0,
                reason: format!(
                    "`{key}` is {n}, but the file has no tensors of block {}",
                    n.saturating_sub(1)
                ),
            });
        }
        Ok(n)
    }

    fn meta_strings(&self, key: &str) -> Result<Vec<String>> {
        let bad = || Error::Format {
            path: self.path.clone(),
            offset: 0,
            reason: format!("metadata key `{key}` is not an array of strings"),
        };
        match self.meta(key)? {
            Value::Array(a) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect(),
            _ => Err(bad()),
        }
    }

    /// The architecture in the metadata (`general.architecture`).
    pub fn architecture(&self) -> Result<String> {
        Ok(self
            .meta("general.architecture")?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    /// The architecture in the metadata, refused unless it is `want`.
    fn require_architecture(&self, want: &str) -> Result<String> {
        let arch = self.architecture()?;
        if arch != want {
            return Err(Error::Unsupported(format!(
                "{}: GGUF architecture `{arch}` (not {want})",
                self.path.display()
            )));
        }
        Ok(arch)
    }

    /// The model in this file, dequantised to f32: `llama`, `gemma2` or `gpt2`; other architectures are
    /// refused.
    pub fn model(&self) -> Result<Model> {
        match self.architecture()?.as_str() {
            "llama" => Ok(Model::Llama(self.llama_model()?)),
            "gemma2" => Ok(Model::Gemma2(self.gemma2_model()?)),
            "gpt2" => Ok(Model::Gpt2(self.gpt2_model()?)),
            other => Err(Error::Unsupported(format!(
                "{}: GGUF architecture `{other}` (supported: llama, gemma2, gpt2)",
                self.path.display()
            ))),
        }
    }

    /// The Llama configuration in the metadata (architecture `llama`).
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.require_architecture("llama")?;
        self.llama_shaped_config(&arch, RopeStyle::AdjacentPairs)
    }

    /// The Llama-shaped sizes, norm epsilon and RoPE under `{arch}.` keys.
    fn llama_shaped_config(&self, arch: &str, rope_style: RopeStyle) -> Result<LlamaConfig> {
        let k = |s: &str| format!("{arch}.{s}");
        let d = self.meta_usize(&k("embedding_length"))?;
        let n_heads = self.meta_usize(&k("attention.head_count"))?;
        let n_kv = match self.metadata.get(&k("attention.head_count_kv")) {
            Some(_) => self.meta_usize(&k("attention.head_count_kv"))?,
            None => n_heads,
        };
        let head_dim = match self.metadata.get(&k("attention.key_length")) {
            Some(_) => self.meta_usize(&k("attention.key_length"))?,
            None => d / n_heads.max(1),
        };
        let vocab = match self.metadata.get(&k("vocab_size")) {
            Some(_) => self.meta_usize(&k("vocab_size"))?,
            None => self
                .tensor_info("token_embd.weight")
                .map_or(0, |t| t.dims.get(1).copied().unwrap_or(0) as usize),
        };
        let f = |key: String, default: f64| {
            self.metadata
                .get(&key)
                .and_then(Value::as_f64)
                .unwrap_or(default) as f32
        };
        // The width the heads imply is checked against the query weight's before anything is sized by it
        // (the RoPE factors below are head_dim / 2 long).
        let q_name = "blk.0.attn_q.weight";
        let q_dims = &self
            .tensor_info(q_name)
            .ok_or_else(|| self.tensor_err(q_name, "missing".into()))?
            .dims;
        let q = n_heads.checked_mul(head_dim);
        if q_dims.len() != 2 || q.map(|q| q as u64) != Some(q_dims[1]) {
            return Err(self.tensor_err(
                q_name,
                format!(
                    "dims {q_dims:?} disagree with {n_heads} heads of width {head_dim} \
                     (`{}`, `{}`)",
                    k("attention.head_count"),
                    k("attention.key_length")
                ),
            ));
        }
        let c = LlamaConfig {
            d_model: d,
            hidden_dim: self.meta_usize(&k("feed_forward_length"))?,
            n_layers: self.block_count(&k("block_count"))?,
            n_heads,
            n_kv_heads: n_kv,
            head_dim,
            vocab_size: vocab,
            max_seq_len: self.meta_usize(&k("context_length"))?,
            norm_eps: f(k("attention.layer_norm_rms_epsilon"), 1e-5),
            rope_theta: f(k("rope.freq_base"), 10000.0),
            rope_style,
            rope_freq_factors: self.rope_freq_factors(arch, head_dim)?,
        };
        c.validate(&self.path)?;
        Ok(c)
    }

    /// The divisors of the rotary frequencies: `{arch}.rope.scaling.type` `linear` divides them all by
    /// `{arch}.rope.scaling.factor`, and a `rope_freqs.weight` tensor (`[head_dim / 2]`, which llama.cpp's
    /// converter writes for Llama 3's scaling) divides each by its own; both apply when both are there, as
    /// in llama.cpp. None without either; other scaling types (YaRN) are refused, naming the type.
    fn rope_freq_factors(&self, arch: &str, head_dim: usize) -> Result<Vec<f32>> {
        let key = |s: &str| format!("{arch}.rope.scaling.{s}");
        let kind = self.metadata.get(&key("type")).and_then(Value::as_str);
        let mut factors = match kind {
            None | Some("none") => Vec::new(),
            Some("linear") => {
                let factor = self
                    .metadata
                    .get(&key("factor"))
                    .and_then(Value::as_f64)
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .ok_or_else(|| Error::Format {
                        path: self.path.clone(),
                        offset: 0,
                        reason: format!("`{}` is missing or not positive", key("factor")),
                    })?;
                vec![factor as f32; head_dim / 2]
            }
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "{}: RoPE scaling of type `{other}` (supported: linear, and Llama 3's `rope_freqs`)",
                    self.path.display()
                )));
            }
        };
        if self.tensor_info("rope_freqs.weight").is_some() {
            let per = self.tensor_shaped("rope_freqs.weight", &[head_dim / 2])?;
            if factors.is_empty() {
                factors = per;
            } else {
                factors.iter_mut().zip(&per).for_each(|(f, p)| *f *= p);
            }
        }
        Ok(factors)
    }

    /// The Llama model in this file, dequantised to f32.
    pub fn llama_model(&self) -> Result<LlamaModel> {
        self.llama_shaped_model(self.llama_config()?)
    }

    /// The Gemma-2 model in this file (architecture `gemma2`), dequantised to f32. GGUF has no
    /// `query_pre_attn_scalar`: as llama.cpp, it is `head_dim`, except for the 46-layer 27B model, whose is
    /// `d_model / n_heads`. The soft caps default to Gemma-2's 50 and 30 and the window to 4096 when their
    /// keys are absent; the even layers slide.
    pub fn gemma2_model(&self) -> Result<Gemma2Model> {
        let arch = self.require_architecture("gemma2")?;
        let c = self.llama_shaped_config(&arch, RopeStyle::HalfSplit)?;
        let number = |key: &str, default: f64| -> Result<f64> {
            let key = format!("{arch}.{key}");
            match self.metadata.get(&key) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .ok_or_else(|| Error::Format {
                        path: self.path.clone(),
                        offset: 0,
                        reason: format!("`{key}` is not a positive number"),
                    }),
            }
        };
        let query_pre_attn_scalar = if c.n_layers == 46 {
            (c.d_model / c.n_heads) as f32
        } else {
            c.head_dim as f32
        };
        let gemma = Gemma2Config {
            query_pre_attn_scalar,
            attn_logit_softcapping: Some(number("attn_logit_softcapping", 50.0)? as f32),
            final_logit_softcapping: Some(number("final_logit_softcapping", 30.0)? as f32),
            sliding_window: Some(number("attention.sliding_window", 4096.0)? as usize),
            sliding_layers: (0..c.n_layers).map(|l| l % 2 == 0).collect(),
        };
        let d = c.d_model;
        let post_norms = (0..c.n_layers)
            .map(|l| {
                let t = |name: &str| self.tensor_shaped(&format!("blk.{l}.{name}.weight"), &[d]);
                Ok(Gemma2PostNorms {
                    attn: t("post_attention_norm")?,
                    mlp: t("post_ffw_norm")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let model = Gemma2Model {
            base: self.llama_shaped_model(c)?,
            gemma,
            post_norms,
        };
        model.validate(&self.path)?;
        Ok(model)
    }

    /// The GPT-2 model in this file (architecture `gpt2`), dequantised to f32. The vocabulary's size is the
    /// token embedding's; an `output.weight` equal to it (llama.cpp's converter writes the tied one again)
    /// is dropped, so the model stays tied as Hugging Face's.
    pub fn gpt2_model(&self) -> Result<Gpt2Model> {
        let arch = self.require_architecture("gpt2")?;
        let k = |s: &str| format!("{arch}.{s}");
        let d = self.meta_usize(&k("embedding_length"))?;
        let eps_key = k("attention.layer_norm_epsilon");
        let norm_eps = match self.metadata.get(&eps_key) {
            None => 1e-5,
            Some(v) => v.as_f64().ok_or_else(|| Error::Format {
                path: self.path.clone(),
                offset: 0,
                reason: format!("metadata key `{eps_key}` is not a number"),
            })? as f32,
        };
        let vocab_size = self
            .tensor_info("token_embd.weight")
            .ok_or_else(|| self.tensor_err("token_embd.weight", "missing".into()))?
            .dims
            .get(1)
            .map_or(0, |&v| v as usize);
        let c = Gpt2Config {
            d_model: d,
            d_mlp: self.meta_usize(&k("feed_forward_length"))?,
            n_layers: self.block_count(&k("block_count"))?,
            n_heads: self.meta_usize(&k("attention.head_count"))?,
            vocab_size,
            max_seq_len: self.meta_usize(&k("context_length"))?,
            norm_eps,
        };
        c.validate(&self.path)?;
        let (h, v) = (c.d_mlp, c.vocab_size);
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let t =
                |name: &str, dims: &[usize]| self.tensor_shaped(&format!("blk.{l}.{name}"), dims);
            layers.push(Gpt2LayerWeights {
                ln_1_w: t("attn_norm.weight", &[d])?,
                ln_1_b: t("attn_norm.bias", &[d])?,
                w_qkv: t("attn_qkv.weight", &[d, 3 * d])?,
                b_qkv: t("attn_qkv.bias", &[3 * d])?,
                w_o: t("attn_output.weight", &[d, d])?,
                b_o: t("attn_output.bias", &[d])?,
                ln_2_w: t("ffn_norm.weight", &[d])?,
                ln_2_b: t("ffn_norm.bias", &[d])?,
                w_fc: t("ffn_up.weight", &[d, h])?,
                b_fc: t("ffn_up.bias", &[h])?,
                w_proj: t("ffn_down.weight", &[h, d])?,
                b_proj: t("ffn_down.bias", &[d])?,
            });
        }
        let wte = self.tensor_shaped("token_embd.weight", &[d, v])?;
        let output = match self.tensor_info("output.weight") {
            Some(_) => Some(self.tensor_shaped("output.weight", &[d, v])?).filter(|o| *o != wte),
            None => None,
        };
        let model = Gpt2Model {
            wte,
            wpe: self.tensor_shaped("position_embd.weight", &[d, c.max_seq_len])?,
            ln_f_w: self.tensor_shaped("output_norm.weight", &[d])?,
            ln_f_b: self.tensor_shaped("output_norm.bias", &[d])?,
            output,
            layers,
            config: c,
        };
        model.validate(&self.path)?;
        Ok(model)
    }

    /// The Llama-shaped weights of a model with this configuration (Gemma-2's `ffn_norm` is its
    /// `pre_feedforward_layernorm`).
    fn llama_shaped_model(&self, c: LlamaConfig) -> Result<LlamaModel> {
        let (d, h, q, kv, v) = (c.d_model, c.hidden_dim, c.q_dim(), c.kv_dim(), c.vocab_size);
        let tok_embeddings = self.tensor_shaped("token_embd.weight", &[d, v])?;
        let final_norm = self.tensor_shaped("output_norm.weight", &[d])?;
        let output = match self.tensor_info("output.weight") {
            Some(_) => Some(self.tensor_shaped("output.weight", &[d, v])?),
            None => None,
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let t = |name: &str, dims: &[usize]| {
                self.tensor_shaped(&format!("blk.{l}.{name}.weight"), dims)
            };
            layers.push(LayerWeights {
                attn_norm: t("attn_norm", &[d])?,
                wq: t("attn_q", &[d, q])?,
                wk: t("attn_k", &[d, kv])?,
                wv: t("attn_v", &[d, kv])?,
                wo: t("attn_output", &[q, d])?,
                mlp_norm: t("ffn_norm", &[d])?,
                w_gate: t("ffn_gate", &[d, h])?,
                w_up: t("ffn_up", &[d, h])?,
                w_down: t("ffn_down", &[h, d])?,
            });
        }
        let model = LlamaModel {
            config: c,
            tok_embeddings,
            layers,
            final_norm,
            output,
        };
        model.validate(&self.path)?;
        Ok(model)
    }

    /// An array of numbers in the metadata, as `f64`.
    fn meta_numbers(&self, key: &str) -> Result<Vec<f64>> {
        let bad = || Error::Format {
            path: self.path.clone(),
            offset: 0,
            reason: format!("metadata key `{key}` is not an array of numbers"),
        };
        match self.meta(key)? {
            Value::Array(a) => a.iter().map(|v| v.as_f64().ok_or_else(bad)).collect(),
            _ => Err(bad()),
        }
    }

    /// The tokenizer in the metadata: byte-level BPE (`tokenizer.ggml.model = "gpt2"`) or SentencePiece
    /// BPE (`"llama"`: Llama 1/2, Mistral, Gemma).
    pub fn tokenizer(&self) -> Result<BpeTokenizer> {
        let kind = self.meta("tokenizer.ggml.model")?.as_str().unwrap_or("");
        match kind {
            "gpt2" => self.bpe_tokenizer(),
            "llama" => self.spm_tokenizer(),
            _ => Err(Error::Unsupported(format!(
                "{}: GGUF tokenizer model `{kind}` (supported: the byte-level BPE `gpt2`, the \
                 SentencePiece `llama`)",
                self.path.display()
            ))),
        }
    }

    /// A token id in the metadata, if present.
    fn token_id(&self, key: &str) -> Option<u32> {
        self.metadata
            .get(key)
            .and_then(Value::as_u64)
            .map(|v| v as u32)
    }

    /// The SentencePiece tokenizer: pieces, scores and token types; `add_space_prefix` and
    /// `add_bos_token` default to true, as llama.cpp's SPM vocabulary does.
    fn spm_tokenizer(&self) -> Result<BpeTokenizer> {
        let pieces = self.meta_strings("tokenizer.ggml.tokens")?;
        let scores: Vec<f32> = self
            .meta_numbers("tokenizer.ggml.scores")?
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let types: Vec<u32> = match self.metadata.get("tokenizer.ggml.token_type") {
            Some(_) => self
                .meta_numbers("tokenizer.ggml.token_type")?
                .into_iter()
                .map(|v| v as u32)
                .collect(),
            None => vec![1; pieces.len()],
        };
        let flag = |key: &str| {
            self.metadata
                .get(key)
                .and_then(Value::as_bool)
                .unwrap_or(true)
        };
        let bos = if flag("tokenizer.ggml.add_bos_token") {
            self.token_id("tokenizer.ggml.bos_token_id")
        } else {
            None
        };
        BpeTokenizer::from_spm(
            &self.path,
            pieces,
            &scores,
            &types,
            flag("tokenizer.ggml.add_space_prefix"),
            bos,
            self.token_id("tokenizer.ggml.eos_token_id"),
        )
    }

    /// The byte-level BPE tokenizer: tokens, merges, special tokens and the pre-tokenizer.
    fn bpe_tokenizer(&self) -> Result<BpeTokenizer> {
        let tokens = self.meta_strings("tokenizer.ggml.tokens")?;
        let merges = self.meta_strings("tokenizer.ggml.merges")?;
        let special: Vec<u32> = match self.metadata.get("tokenizer.ggml.token_type") {
            // 3 = control, 4 = user-defined: matched as whole strings before BPE.
            Some(Value::Array(types)) => types
                .iter()
                .enumerate()
                .filter(|(_, t)| matches!(t.as_u64(), Some(3) | Some(4)))
                .map(|(i, _)| i as u32)
                .collect(),
            _ => Vec::new(),
        };
        let pre = self
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let id = |key: &str| self.token_id(key);
        let add_bos = self
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let bos = if add_bos {
            id("tokenizer.ggml.bos_token_id")
        } else {
            None
        };
        BpeTokenizer::from_vocab(
            &self.path,
            tokens,
            &merges,
            &special,
            pre,
            bos,
            id("tokenizer.ggml.eos_token_id"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// A metadata value of a test file.
    #[derive(Clone, Copy)]
    enum Meta<'a> {
        Str(&'a str),
        U32(u32),
        F32(f32),
    }

    /// A minimal GGUF with one metadata key and the given tensors (name, dims, type, payload).
    fn build(tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
        build_with(&[], tensors)
    }

    /// The same with more metadata keys after `general.architecture`.
    fn build_with(meta: &[(&str, Meta)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(MAGIC);
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((1 + meta.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        for (key, v) in meta {
            s(&mut b, key);
            match v {
                Meta::Str(v) => {
                    b.extend(8u32.to_le_bytes());
                    s(&mut b, v);
                }
                Meta::U32(v) => {
                    b.extend(4u32.to_le_bytes());
                    b.extend(v.to_le_bytes());
                }
                Meta::F32(v) => {
                    b.extend(6u32.to_le_bytes());
                    b.extend(v.to_le_bytes());
                }
            }
        }
        let mut off = 0u64;
        for (name, dims, ty, data) in tensors {
            s(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(off.to_le_bytes());
            off += (data.len() as u64).div_ceil(32) * 32;
        }
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for (_, _, _, data) in tensors {
            b.extend(data);
            while b.len() % 32 != 0 {
                b.push(0);
            }
        }
        b
    }

    #[test]
    fn dequantises_the_supported_types() {
        let mut q41 = Vec::new();
        q41.extend(f16::from_f32(0.5).to_le_bytes());
        q41.extend(f16::from_f32(-1.0).to_le_bytes());
        q41.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut q80 = f16::from_f32(0.25).to_le_bytes().to_vec();
        q80.extend((0..32i8).map(|j| (j - 16) as u8));
        let f32s: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let f16s: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        let bf16s: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        // Two Q6_K super-blocks (the k-quant path; every type's arithmetic is checked against ggml in
        // ggml_quants).
        let mut q6k: Vec<u8> = (0..420u32).map(|i| (i * 37 % 251) as u8).collect();
        for at in [208, 418] {
            q6k[at..at + 2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
        }
        // One IQ4_NL block: d = 0.5, every byte 0x8F (low nibble 15 → 113, high nibble 8 → 1).
        let mut iq4nl = f16::from_f32(0.5).to_le_bytes().to_vec();
        iq4nl.extend([0x8Fu8; 16]);
        let file = build(&[
            ("a", vec![32], 3, q41),
            ("b", vec![32], 8, q80),
            ("c", vec![2], 0, f32s),
            ("d", vec![2], 1, f16s),
            ("e", vec![2], 30, bf16s),
            ("f", vec![256], 16, vec![0; 66]),
            ("h", vec![32], 20, iq4nl),
            ("g", vec![512], 14, q6k.clone()),
        ]);
        let g = GgufFile::parse(Path::new("t.gguf"), file).unwrap();
        assert_eq!(g.metadata["general.architecture"].as_str(), Some("llama"));
        let a = g.tensor_f32("a").unwrap().0;
        assert_eq!(a[0], -1.0);
        assert_eq!(a[1], -0.5);
        assert_eq!(a[16], 6.5);
        assert_eq!(a[31], -1.0);
        let b = g.tensor_f32("b").unwrap().0;
        assert_eq!(b[0], -4.0);
        assert_eq!(b[31], 3.75);
        for n in ["c", "d", "e"] {
            assert_eq!(g.tensor_f32(n).unwrap().0, vec![1.5, -2.0]);
        }
        let e = g.tensor_f32("f").unwrap_err().to_string();
        assert!(
            e.contains("unsupported tensor type IQ2_XXS")
                && e.contains("`f`")
                && e.contains("t.gguf"),
            "{e}"
        );
        let h = g.tensor_f32("h").unwrap().0;
        assert_eq!((h[0], h[15], h[16], h[31]), (56.5, 56.5, 0.5, 0.5));
        assert!(matches!(g.tensor_f32("zz"), Err(Error::Tensor { .. })));
        let mut want = vec![0.0f32; 512];
        for (o, b) in want.chunks_mut(256).zip(q6k.chunks(210)) {
            crate::model::ggml_quants::dequantize_block(14, b, o);
        }
        assert_eq!(g.tensor_f32("g").unwrap().0, want);
        assert!(want.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn truncated_and_foreign_files_are_typed_errors() {
        let file = build(&[("a", vec![64], 0, vec![0; 256])]);
        let g = GgufFile::parse(Path::new("t.gguf"), file[..file.len() - 64].to_vec()).unwrap();
        let e = g.tensor_f32("a").unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("`a`"), "{e}");
        for cut in [3, 10, 30, 60] {
            assert!(matches!(
                GgufFile::parse(Path::new("t.gguf"), file[..cut].to_vec()),
                Err(Error::Format { .. })
            ));
        }
        assert!(
            GgufFile::parse(
                Path::new("x.bin"),
                b"\x40\0\0\0xxxxxxxxxxxxxxxxxxxxxxxx".to_vec()
            )
            .is_err()
        );
        let g = GgufFile::parse(Path::new("t.gguf"), file).unwrap();
        assert!(g.llama_config().is_err());
    }

    /// RoPE scaling in a GGUF file: `rope_freqs.weight` gives each frequency's divisor (Llama 3), linear
    /// scaling multiplies them by its factor, a misshapen tensor is named, and another scaling type is
    /// refused by name.
    #[test]
    fn rope_scaling_comes_from_rope_freqs_and_the_scaling_type() {
        let sizes = [
            ("llama.embedding_length", Meta::U32(16)),
            ("llama.attention.head_count", Meta::U32(2)),
            ("llama.feed_forward_length", Meta::U32(32)),
            ("llama.block_count", Meta::U32(1)),
            ("llama.context_length", Meta::U32(64)),
            ("llama.vocab_size", Meta::U32(10)),
        ];
        let freqs = |v: &[f32]| -> (&'static str, Vec<u64>, u32, Vec<u8>) {
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            ("rope_freqs.weight", vec![v.len() as u64], 0, bytes)
        };
        // (The query weight's width is checked against the heads', and block 0 must have tensors.)
        let config = |extra: Vec<(&str, Meta)>, tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]| {
            let mut meta = sizes.to_vec();
            meta.extend(extra);
            let mut tensors = tensors.to_vec();
            tensors.push(("blk.0.attn_q.weight", vec![16, 16], 0, vec![0; 1024]));
            let g = GgufFile::parse(Path::new("r.gguf"), build_with(&meta, &tensors)).unwrap();
            g.llama_config()
        };
        // head_dim 8: four frequencies.
        assert!(config(vec![], &[]).unwrap().rope_freq_factors.is_empty());
        let per = [1.0, 1.0, 2.5, 8.0];
        let c = config(vec![], &[freqs(&per)]).unwrap();
        assert_eq!(c.rope_freq_factors, per);
        let linear = vec![
            ("llama.rope.scaling.type", Meta::Str("linear")),
            ("llama.rope.scaling.factor", Meta::F32(4.0)),
        ];
        let c = config(linear, &[freqs(&per)]).unwrap();
        assert_eq!(c.rope_freq_factors, [4.0, 4.0, 10.0, 32.0]);
        let e = config(vec![], &[freqs(&per[..3])]).unwrap_err().to_string();
        assert!(
            e.contains("rope_freqs.weight") && e.contains("r.gguf"),
            "{e}"
        );
        let yarn = vec![("llama.rope.scaling.type", Meta::Str("yarn"))];
        let e = config(yarn, &[]).unwrap_err().to_string();
        assert!(e.contains("yarn") && e.contains("r.gguf"), "{e}");
    }

    /// Sizes that disagree with the tensor index are refused before anything is sized by them: a block
    /// count past the blocks the file holds, heads whose width is not the query weight's.
    #[test]
    fn counts_beyond_the_tensor_index_are_refused() {
        let sizes = |layers: u32, key_length: u32| {
            vec![
                ("llama.embedding_length", Meta::U32(16)),
                ("llama.attention.head_count", Meta::U32(2)),
                ("llama.attention.key_length", Meta::U32(key_length)),
                ("llama.feed_forward_length", Meta::U32(32)),
                ("llama.block_count", Meta::U32(layers)),
                ("llama.context_length", Meta::U32(64)),
                ("llama.vocab_size", Meta::U32(10)),
            ]
        };
        let q = [("blk.0.attn_q.weight", vec![16, 16], 0, vec![0; 1024])];
        let config = |meta: &[(&str, Meta)]| {
            GgufFile::parse(Path::new("c.gguf"), build_with(meta, &q))
                .unwrap()
                .llama_config()
        };
        assert_eq!(config(&sizes(1, 8)).unwrap().n_layers, 1);
        let e = config(&sizes(0xffff_fff0, 8)).unwrap_err().to_string();
        assert!(
            e.contains("llama.block_count") && e.contains("4294967280") && e.contains("c.gguf"),
            "{e}"
        );
        let e = config(&sizes(2, 8)).unwrap_err().to_string();
        assert!(e.contains("no tensors of block 1"), "{e}");
        let e = config(&sizes(1, 0x7fff_fff0)).unwrap_err().to_string();
        assert!(
            e.contains("blk.0.attn_q.weight") && e.contains("llama.attention.key_length"),
            "{e}"
        );
    }
}

//! Running the language models that CLTs are trained on and attribute through.
//!
//! - [`forward`]: the forward loop both architectures share, with its hooks and interventions;
//! - [`llama`]: the Llama-family block (RMSNorm, rotary grouped-query attention, SwiGLU);
//! - [`gpt2`]: the GPT-2 block (LayerNorm, attention with biases, GELU);
//! - [`gemma2`]: the Gemma-2 block (Llama's, with norms after the attention and the MLP, GeGLU, soft caps and
//!   sliding-window layers);
//! - [`llama2c`]: llama2.c checkpoints and tokenizers;
//! - [`hf`]: Hugging Face model directories (`config.json`, `*.safetensors`, `tokenizer.json`; Llama, Mistral,
//!   GPT-2 and Gemma-2);
//! - [`gguf`]: GGUF v3 files (metadata, tensors; Llama, Gemma-2 and GPT-2 models) and [`bpe`], their
//!   byte-level BPE and SentencePiece tokenizers;
//! - [`kv`]: the keys and values of positions already read, for generation a token at a time;
//! - [`cli`]: `clt run`, which tokenises a prompt, runs the model and prints or dumps the logits.
//!
//! [`load`] opens a model file of any supported kind (detected by its magic bytes and its extension) together
//! with its tokenizer, as a [`LoadedModel`], whose [`Model`] dispatches to the architecture's forward.

pub mod bpe;
pub mod cli;
pub mod forward;
pub mod gemma2;
pub mod ggml_quants;
pub mod gguf;
pub mod gpt2;
pub mod hf;
pub mod kv;
pub mod llama;
pub mod llama2c;
pub mod pattern;

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{Error, Result};
pub use bpe::BpeTokenizer;
pub use forward::{
    ForwardOptions, ForwardOutput, ForwardRecord, Hooks, Intervention, LayerRecord, Logits,
    MlpInputs, MlpOverride,
};
pub use gemma2::{Gemma2Config, Gemma2Model, Gemma2PostNorms};
pub use gpt2::{Gpt2Config, Gpt2LayerWeights, Gpt2Model};
pub use kv::KvCache;
pub use llama::{LayerWeights, LlamaConfig, LlamaModel, RopeStyle};
pub use llama2c::Llama2cTokenizer;
pub use pattern::AttnPattern;

/// The kinds of model file the engine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// A llama2.c "v0" checkpoint (`.bin`, no magic; recognised by a header that matches the file size).
    Llama2c,
    /// A GGUF v2/v3 file (magic `GGUF`).
    Gguf,
    /// A Hugging Face model directory (`config.json`, `*.safetensors`, `tokenizer.json`).
    HfDir,
}

/// Detects the format of the model file at `path`, with an error that says what the file seems to be
/// when it is none of the supported kinds.
pub fn detect_format(path: &Path) -> Result<ModelFormat> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        if hf::is_model_dir(path) {
            return Ok(ModelFormat::HfDir);
        }
        return Err(Error::Format {
            path: path.to_path_buf(),
            offset: 0,
            reason: "a directory without config.json (not a Hugging Face model directory)".into(),
        });
    }
    let mut head = Vec::with_capacity(64);
    std::fs::File::open(path)
        .and_then(|f| f.take(64).read_to_end(&mut head))
        .map_err(|e| Error::io(path, e))?;
    if head.starts_with(gguf::MAGIC) {
        return Ok(ModelFormat::Gguf);
    }
    if llama2c::looks_like_checkpoint(&head, meta.len()) {
        return Ok(ModelFormat::Llama2c);
    }
    let what = if head.starts_with(b"ak42") {
        "a llama2.c v1+ checkpoint (only v0 is supported)".to_string()
    } else if head.starts_with(b"PK\x03\x04") {
        "a zip archive (a PyTorch or wheel file?)".to_string()
    } else if head.len() >= 8
        && u64::from_le_bytes(head[..8].try_into().unwrap_or_default()) < meta.len()
        && head.get(8) == Some(&b'{')
    {
        "a safetensors file (load its model directory instead)".to_string()
    } else {
        "not a llama2.c v0 checkpoint (its header does not match its size)".to_string()
    };
    Err(Error::Format {
        path: path.to_path_buf(),
        offset: 0,
        reason: format!("unrecognised model file: {what}"),
    })
}

/// A tokenizer of any supported kind.
#[derive(Clone, Debug)]
pub enum Tokenizer {
    Llama2c(Llama2cTokenizer),
    Bpe(Box<BpeTokenizer>),
}

impl Tokenizer {
    /// The token ids of `text`, with the model's beginning-of-sequence token when it uses one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Llama2c(t) => Ok(t.encode(text, true)),
            Tokenizer::Bpe(t) => t.encode(text),
        }
    }

    /// The token ids of a prompt to attribute: [`encode`](Self::encode)'s, with a special token put first
    /// when the first one is not special, as circuit-tracer does (`ensure_tokenized`): position 0 keeps
    /// no features, so it should hold a special token rather than the prompt's first word. The model's
    /// BOS, else its EOS (GPT-2's `<|endoftext|>`); nothing when it has neither.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if ids.first().is_some_and(|&t| self.is_special(t)) {
            return Ok(ids);
        }
        if let Some(first) = self.bos().or(self.eos()) {
            ids.insert(0, first);
        }
        Ok(ids)
    }

    /// Whether `token` is one of the tokenizer's special tokens (BOS, EOS, or a special added token).
    pub fn is_special(&self, token: u32) -> bool {
        match self {
            Tokenizer::Llama2c(_) => token == llama2c::BOS || token == llama2c::EOS,
            Tokenizer::Bpe(t) => t.is_special(token),
        }
    }

    /// The text of `tokens` (special tokens dropped).
    pub fn decode(&self, tokens: &[u32]) -> String {
        match self {
            Tokenizer::Llama2c(t) => t.decode(tokens),
            Tokenizer::Bpe(t) => t.decode(tokens),
        }
    }

    /// One token's piece as stored in the vocabulary, for display.
    pub fn piece(&self, token: u32) -> String {
        match self {
            Tokenizer::Llama2c(t) => t.piece(token),
            Tokenizer::Bpe(t) => t.piece(token),
        }
    }

    /// The beginning-of-sequence token that [`encode`](Self::encode) prepends, if any.
    pub fn bos(&self) -> Option<u32> {
        match self {
            Tokenizer::Llama2c(_) => Some(llama2c::BOS),
            Tokenizer::Bpe(t) => t.bos,
        }
    }

    /// The token that ends generation, if the model has one.
    pub fn eos(&self) -> Option<u32> {
        match self {
            Tokenizer::Llama2c(_) => Some(llama2c::EOS),
            Tokenizer::Bpe(t) => t.eos,
        }
    }

    /// The one token `spec` names: `#ID`, or a text the tokenizer reads (alone, special tokens dropped) as
    /// exactly one token. SentencePiece and llama2.c tokenizers put a space before a text, so `Paris` is
    /// `▁Paris`.
    pub fn single_token(&self, spec: &str) -> Result<u32> {
        let bad = |why: String| Error::config("token", format!("{spec:?}: {why}"));
        if let Some(id) = spec.strip_prefix('#') {
            let id: u32 = id.parse().map_err(|_| bad("not a token id".into()))?;
            if id as usize >= self.vocab_size() {
                return Err(bad(format!(
                    "outside the vocabulary of {}",
                    self.vocab_size()
                )));
            }
            return Ok(id);
        }
        let ids: Vec<u32> = self
            .encode(spec)?
            .into_iter()
            .filter(|&t| !self.is_special(t))
            .collect();
        match ids[..] {
            [t] => Ok(t),
            _ => Err(bad(format!(
                "{} tokens ({:?}), not one; name it as #ID",
                ids.len(),
                ids.iter().map(|&t| self.piece(t)).collect::<Vec<_>>()
            ))),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Llama2c(t) => t.vocab_size(),
            Tokenizer::Bpe(t) => t.vocab_size(),
        }
    }
}

/// A causal language model: its full forward, and what follows from it (logits of every position or of the
/// last one, greedy generation), the same for every architecture.
pub trait CausalLm {
    /// Longest sequence the model accepts.
    fn max_seq_len(&self) -> usize;

    /// The full causal forward over `tokens`, with hooks and interventions.
    fn forward_with(&self, tokens: &[u32], opts: &ForwardOptions<'_>) -> Result<ForwardOutput>;

    /// The forward of `tokens` at the positions after those `cache` holds, appending their keys and values
    /// (an empty cache: the prompt); hooks and interventions as in [`forward_with`](Self::forward_with),
    /// except frozen or recorded attention patterns once the cache holds positions. On an error the cache
    /// is left as it was.
    fn forward_cached(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput>;

    /// Logits of every position, `[n_tokens, vocab_size]`.
    fn forward(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        Ok(self
            .forward_with(tokens, &ForwardOptions::default())?
            .logits)
    }

    /// Logits of the last position, `[vocab_size]`.
    fn next_logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let opts = ForwardOptions {
            logits: Logits::Last,
            ..ForwardOptions::default()
        };
        Ok(self.forward_with(tokens, &opts)?.logits)
    }

    /// Appends `n_new` greedily chosen tokens to `tokens` (the first largest logit wins ties), stopping early
    /// at `stop` or at `max_seq_len`; returns only the new tokens. One forward over the prompt, then one
    /// position at a time over a [`KvCache`].
    fn generate_greedy(&self, tokens: &[u32], n_new: usize, stop: Option<u32>) -> Result<Vec<u32>> {
        generate_with(self, tokens, n_new, stop, &ForwardOptions::default())
    }
}

/// Greedy generation as [`CausalLm::generate_greedy`], every forward run with `opts` (e.g. an MLP
/// override whose edits should hold for the new tokens too); `opts.logits` is overridden.
pub fn generate_with<M: CausalLm + ?Sized>(
    model: &M,
    tokens: &[u32],
    n_new: usize,
    stop: Option<u32>,
    opts: &ForwardOptions<'_>,
) -> Result<Vec<u32>> {
    if n_new == 0 || tokens.len() >= model.max_seq_len() {
        return Ok(Vec::new());
    }
    let opts = ForwardOptions {
        logits: Logits::Last,
        ..*opts
    };
    let mut cache = KvCache::new();
    let logits = model.forward_cached(tokens, &mut cache, &opts)?.logits;
    Ok(continue_greedy(model, &mut cache, logits, n_new, stop, &opts)?.tokens)
}

/// A greedy continuation and the logits each of its tokens was chosen from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Continuation {
    pub tokens: Vec<u32>,
    /// `[tokens.len(), vocab]`.
    pub logits: Vec<f32>,
}

/// Continues greedily the sequence `cache` holds, whose last position's logits are `last_logits`: up to
/// `n_new` tokens (the first largest logit wins ties), stopping early at `stop` or at the model's longest
/// sequence, each new token run through `cache` with `opts` (`opts.logits` is overridden).
pub fn continue_greedy<M: CausalLm + ?Sized>(
    model: &M,
    cache: &mut KvCache,
    last_logits: Vec<f32>,
    n_new: usize,
    stop: Option<u32>,
    opts: &ForwardOptions<'_>,
) -> Result<Continuation> {
    let opts = ForwardOptions {
        logits: Logits::Last,
        ..*opts
    };
    let room = n_new.min(model.max_seq_len().saturating_sub(cache.len()));
    let mut c = Continuation::default();
    let mut last = last_logits;
    while c.tokens.len() < room {
        let next = forward::argmax(&last) as u32;
        if Some(next) == stop {
            break;
        }
        c.tokens.push(next);
        c.logits.extend_from_slice(&last);
        if c.tokens.len() < room {
            last = model.forward_cached(&[next], cache, &opts)?.logits;
        }
    }
    Ok(c)
}

impl CausalLm for Model {
    fn max_seq_len(&self) -> usize {
        Model::max_seq_len(self)
    }

    fn forward_with(&self, tokens: &[u32], opts: &ForwardOptions<'_>) -> Result<ForwardOutput> {
        Model::forward_with(self, tokens, opts)
    }

    fn forward_cached(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        opts: &ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        match self {
            Model::Llama(m) => m.forward_cached(tokens, cache, opts),
            Model::Gpt2(m) => m.forward_cached(tokens, cache, opts),
            Model::Gemma2(m) => m.forward_cached(tokens, cache, opts),
        }
    }
}

/// A model of any supported architecture.
#[derive(Clone, Debug)]
pub enum Model {
    Llama(LlamaModel),
    Gpt2(Gpt2Model),
    Gemma2(Gemma2Model),
}

impl From<LlamaModel> for Model {
    fn from(m: LlamaModel) -> Self {
        Model::Llama(m)
    }
}

impl From<Gpt2Model> for Model {
    fn from(m: Gpt2Model) -> Self {
        Model::Gpt2(m)
    }
}

impl From<Gemma2Model> for Model {
    fn from(m: Gemma2Model) -> Self {
        Model::Gemma2(m)
    }
}

impl Model {
    /// The architecture's name: `llama`, `gpt2` or `gemma2`.
    pub fn architecture(&self) -> &'static str {
        match self {
            Model::Llama(_) => "llama",
            Model::Gpt2(_) => "gpt2",
            Model::Gemma2(_) => "gemma2",
        }
    }

    pub fn n_layers(&self) -> usize {
        match self {
            Model::Llama(m) => m.config.n_layers,
            Model::Gpt2(m) => m.config.n_layers,
            Model::Gemma2(m) => m.base.config.n_layers,
        }
    }

    /// Residual stream width.
    pub fn d_model(&self) -> usize {
        match self {
            Model::Llama(m) => m.config.d_model,
            Model::Gpt2(m) => m.config.d_model,
            Model::Gemma2(m) => m.base.config.d_model,
        }
    }

    pub fn n_heads(&self) -> usize {
        match self {
            Model::Llama(m) => m.config.n_heads,
            Model::Gpt2(m) => m.config.n_heads,
            Model::Gemma2(m) => m.base.config.n_heads,
        }
    }

    /// Key/value heads (equal to [`n_heads`](Self::n_heads) without grouped-query attention).
    pub fn n_kv_heads(&self) -> usize {
        match self {
            Model::Llama(m) => m.config.n_kv_heads,
            Model::Gpt2(m) => m.config.n_heads,
            Model::Gemma2(m) => m.base.config.n_kv_heads,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Model::Llama(m) => m.config.vocab_size,
            Model::Gpt2(m) => m.config.vocab_size,
            Model::Gemma2(m) => m.base.config.vocab_size,
        }
    }

    /// Longest sequence the model accepts.
    pub fn max_seq_len(&self) -> usize {
        match self {
            Model::Llama(m) => m.config.max_seq_len,
            Model::Gpt2(m) => m.config.max_seq_len,
            Model::Gemma2(m) => m.base.config.max_seq_len,
        }
    }

    /// The sizes and norm layout the shared forward runs with.
    fn dims(&self) -> forward::Dims {
        use forward::Blocks;
        match self {
            Model::Llama(m) => m.dims(),
            Model::Gpt2(m) => m.dims(),
            Model::Gemma2(m) => m.dims(),
        }
    }

    /// How the model normalises: RMSNorm (Llama, Gemma-2) or LayerNorm (GPT-2).
    pub fn norm(&self) -> forward::NormKind {
        self.dims().norm
    }

    /// Whether a norm follows the MLP before the residual add (Gemma-2's `post_feedforward_layernorm`).
    pub fn post_mlp_norm(&self) -> bool {
        self.dims().post_norms
    }

    /// FLOPs of one forward over `n` tokens with `n_logits` unembedded positions.
    pub fn forward_flops(&self, n: usize, n_logits: usize) -> f64 {
        match self {
            Model::Llama(m) => m.config.forward_flops(n, n_logits),
            Model::Gpt2(m) => m.config.forward_flops(n, n_logits),
            Model::Gemma2(m) => m.base.config.forward_flops(n, n_logits),
        }
    }

    /// The full causal forward over `tokens`, with hooks and interventions.
    pub fn forward_with(&self, tokens: &[u32], opts: &ForwardOptions<'_>) -> Result<ForwardOutput> {
        match self {
            Model::Llama(m) => m.forward_with(tokens, opts),
            Model::Gpt2(m) => m.forward_with(tokens, opts),
            Model::Gemma2(m) => m.forward_with(tokens, opts),
        }
    }

    /// The Llama model, when it is one.
    pub fn as_llama(&self) -> Option<&LlamaModel> {
        match self {
            Model::Llama(m) => Some(m),
            Model::Gpt2(_) | Model::Gemma2(_) => None,
        }
    }

    /// The GPT-2 model, when it is one.
    pub fn as_gpt2(&self) -> Option<&Gpt2Model> {
        match self {
            Model::Gpt2(m) => Some(m),
            Model::Llama(_) | Model::Gemma2(_) => None,
        }
    }

    /// The Gemma-2 model, when it is one.
    pub fn as_gemma2(&self) -> Option<&Gemma2Model> {
        match self {
            Model::Gemma2(m) => Some(m),
            Model::Llama(_) | Model::Gpt2(_) => None,
        }
    }
}

/// A model and its tokenizer, loaded from files.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub format: ModelFormat,
    pub path: PathBuf,
}

/// Loads the model at `path` and its tokenizer: `tokenizer` when given, else the one stored with the model
/// (GGUF) or found beside it (llama2.c: `tok{vocab_size}.bin`, then `tokenizer.bin`).
pub fn load(path: &Path, tokenizer: Option<&Path>) -> Result<LoadedModel> {
    let format = detect_format(path)?;
    match format {
        ModelFormat::Llama2c => {
            let model = llama2c::load_checkpoint(path)?;
            let v = model.config.vocab_size;
            let tok_path = match tokenizer {
                Some(p) => p.to_path_buf(),
                None => {
                    let dir = path.parent().unwrap_or(Path::new("."));
                    let candidates = [dir.join(format!("tok{v}.bin")), dir.join("tokenizer.bin")];
                    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
                        Error::Checkpoint {
                            path: path.to_path_buf(),
                            reason: format!(
                                "no tokenizer given and neither {} nor {} exists (pass --tokenizer)",
                                candidates[0].display(),
                                candidates[1].display()
                            ),
                        }
                    })?
                }
            };
            let tok = Llama2cTokenizer::load(&tok_path, v)?;
            Ok(LoadedModel {
                model: Model::Llama(model),
                tokenizer: Tokenizer::Llama2c(tok),
                format,
                path: path.to_path_buf(),
            })
        }
        ModelFormat::HfDir => Ok(LoadedModel {
            model: hf::load_model(path)?,
            tokenizer: Tokenizer::Bpe(Box::new(hf::load_tokenizer(path, tokenizer)?)),
            format,
            path: path.to_path_buf(),
        }),
        ModelFormat::Gguf => {
            if let Some(t) = tokenizer {
                return Err(Error::Unsupported(format!(
                    "--tokenizer {}: a GGUF model uses the tokenizer stored in it",
                    t.display()
                )));
            }
            let file = gguf::GgufFile::open(path)?;
            let model = file.model()?;
            let tok = file.tokenizer()?;
            Ok(LoadedModel {
                model,
                tokenizer: Tokenizer::Bpe(Box::new(tok)),
                format,
                path: path.to_path_buf(),
            })
        }
    }
}

/// The `k` most probable tokens of `logits` under the softmax, most probable first (ties: lower id first).
pub fn softmax_top(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let p = forward::softmax(logits);
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    order.into_iter().take(k).map(|t| (t, p[t])).collect()
}

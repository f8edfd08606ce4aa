//! Activation caching: run a language model over a corpus and write every layer's MLP inputs and outputs
//! into the activation store.
//!
//! Documents ([`crate::corpus`]: the blocks of plain-text files between blank lines, the text or token-id
//! field of each line of a `.jsonl` file, or the text or token-id column of each row of a `.parquet` or
//! `.arrow` file)
//! are read one at a time and tokenised a batch's worth at a time, in parallel, as the forward needs them:
//! caching reads only as much of the corpus as it caches. Each document is tokenised with the model's
//! beginning-of-sequence token (when it has one; a pretokenised document gets it when it lacks it)
//! and cut into contexts of at most `context` tokens; every context after a document's first starts again with
//! that token, so every context looks like the start of a sequence to the model. The BOS position itself is
//! not cached (its activations are outliers that no transcoder should spend features on, and attribution
//! zeroes it). Contexts are run in parallel batches; tokens reach the store in corpus order, so an interrupted
//! cache resumes by skipping as many tokens as its complete shards hold (tokenised again, not run).

use crate::data::ActDims;
use crate::model::forward::NormKind;
use crate::model::{ForwardOptions, Hooks, LayerRecord, LoadedModel, Logits, MlpInputs};
use crate::store::format::ShardMeta;
use crate::store::{Codec, DatasetWriter, TokenIds, WriterConfig};
use crate::{Error, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Which hook feeds the transcoder's encoders (targets are always the MLP outputs).
///
/// TransformerLens names differ by norm: its LayerNorm records `ln2.hook_normalized` with the weight and
/// bias applied (the MLP's input, [`InputHook::MlpInNormed`]), its RMSNorm before the weight
/// ([`InputHook::MlpInUnweighted`]); [`InputHook::from_hook_name`] resolves a name for a model's norm.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum InputHook {
    /// The MLP's input: its norm of `resid_mid`, the norm's weight (and bias) applied (circuit-tracer's
    /// `mlp.hook_in`; `ln2.hook_normalized` of a LayerNorm model).
    #[default]
    MlpInNormed,
    /// The residual stream before the MLP's norm (circuit-tracer's Llama configs).
    ResidMid,
    /// The MLP's norm of `resid_mid` before its weight: `resid_mid / rms` (TransformerLens's
    /// `ln2.hook_normalized` of an RMSNorm model: Gemma Scope's transcoders on Gemma-2), or
    /// `(resid_mid − mean) / σ` for a LayerNorm.
    MlpInUnweighted,
}

impl InputHook {
    /// The TransformerLens-style hook name recorded in the store's `cache.json`.
    pub fn hook_name(self, layer: usize) -> String {
        match self {
            InputHook::MlpInNormed => format!("blocks.{layer}.mlp.hook_in"),
            InputHook::ResidMid => format!("blocks.{layer}.hook_resid_mid"),
            InputHook::MlpInUnweighted => format!("blocks.{layer}.ln2.hook_normalized"),
        }
    }

    /// The `feature_input_hook` of a circuit-tracer `config.yaml` that reads this hook on a model whose
    /// norm is `norm`; `None` for the unweighted LayerNorm, which circuit-tracer cannot hook (it loads
    /// models with the norms' weights unfolded).
    pub fn circuit_tracer_name(self, norm: NormKind) -> Option<&'static str> {
        match (self, norm) {
            (InputHook::MlpInNormed, _) => Some("mlp.hook_in"),
            (InputHook::ResidMid, _) => Some("hook_resid_mid"),
            (InputHook::MlpInUnweighted, NormKind::Rms) => Some("ln2.hook_normalized"),
            (InputHook::MlpInUnweighted, NormKind::Layer) => None,
        }
    }

    /// The hook a circuit-tracer / TransformerLens `feature_input_hook` name reads on a model whose norm is
    /// `norm` (`blocks.{l}.` prefixes allowed; TransformerLens's `hook_mlp_in`, taken before `ln2`, is
    /// `resid_mid`); `None` for a name the engine does not record.
    pub fn from_hook_name(name: &str, norm: NormKind) -> Option<InputHook> {
        let n = name.trim();
        if n.ends_with("mlp.hook_in") {
            Some(InputHook::MlpInNormed)
        } else if n.ends_with("hook_resid_mid") || n.ends_with("hook_mlp_in") {
            // TransformerLens's `hook_mlp_in` is a copy of `resid_mid` taken before `ln2`.
            Some(InputHook::ResidMid)
        } else if n.ends_with("ln2.hook_normalized") {
            Some(match norm {
                NormKind::Rms => InputHook::MlpInUnweighted,
                NormKind::Layer => InputHook::MlpInNormed,
            })
        } else {
            None
        }
    }

    /// The forward hooks that record this input (and nothing else).
    pub fn hooks(self) -> Hooks {
        Hooks {
            mlp_in_normed: self == InputHook::MlpInNormed,
            resid_mid: self == InputHook::ResidMid,
            mlp_in_unweighted: self == InputHook::MlpInUnweighted,
            ..Hooks::default()
        }
    }

    /// This input in a layer's record (`None` when its hook was off).
    pub fn recorded(self, rec: &LayerRecord) -> Option<&Vec<f32>> {
        match self {
            InputHook::MlpInNormed => rec.mlp_in_normed.as_ref(),
            InputHook::ResidMid => rec.resid_mid.as_ref(),
            InputHook::MlpInUnweighted => rec.mlp_in_unweighted.as_ref(),
        }
    }

    /// Takes this input out of a layer's record.
    pub fn take(self, rec: &mut LayerRecord) -> Option<Vec<f32>> {
        match self {
            InputHook::MlpInNormed => rec.mlp_in_normed.take(),
            InputHook::ResidMid => rec.resid_mid.take(),
            InputHook::MlpInUnweighted => rec.mlp_in_unweighted.take(),
        }
    }

    /// This input among what an MLP override is handed.
    pub fn of<'a>(self, inputs: &MlpInputs<'a>) -> &'a [f32] {
        match self {
            InputHook::MlpInNormed => inputs.normed,
            InputHook::ResidMid => inputs.resid_mid,
            InputHook::MlpInUnweighted => inputs.unweighted,
        }
    }
}

/// What to cache and how.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub corpus: Vec<PathBuf>,
    /// The JSON field or Parquet/Arrow column holding each document (`None`: `text`, `input_ids` or
    /// `tokens`).
    pub column: Option<String>,
    /// Documents at the corpus's start left out (read, not tokenised): a held-out store from the same
    /// corpus as a training store that stopped before them. Document ids stay the corpus's.
    pub skip_documents: u64,
    pub out: PathBuf,
    pub context: usize,
    pub max_tokens: Option<u64>,
    pub input_hook: InputHook,
    pub codec: Codec,
    /// The int8/int8p/int8e error target ([`crate::store::WriterConfig::target_rel_err`]).
    pub target_rel_err: Option<f64>,
    pub shard_tokens: u64,
    pub contexts_per_batch: usize,
    pub quiet: bool,
}

/// The `cache.json` written beside the dataset: where the activations come from.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CacheRecord {
    pub model: String,
    /// xxh3-64 of the model file (hex); for a model directory, of its `config.json`.
    pub model_checksum: String,
    pub tokenizer: String,
    pub corpus: Vec<String>,
    /// The JSON field or Parquet/Arrow column given for the documents (absent: the default names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// Documents left out at the corpus's start.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skip_documents: u64,
    pub context: usize,
    pub input_hook: InputHook,
    /// The model's norm (which decides the circuit-tracer name of `input_hook`); absent in stores written
    /// before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm: Option<NormKind>,
    pub hooks_in: Vec<String>,
    pub hooks_out: Vec<String>,
    pub n_tokens: u64,
    /// The corpus index just past the last document the store holds tokens of: `skip_documents` for a
    /// held-out store from the same corpus (absent in stores written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documents_end: Option<u64>,
    /// Contexts this call ran through the model (not in `cache.json`): a resumed cache runs only those
    /// past its complete shards.
    #[serde(skip)]
    pub contexts_run: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

pub use crate::corpus::{CorpusOptions, Document, Documents, read_documents};

/// The token ids of the corpus's contexts in order, as `clt cache` makes them (each the model's BOS, then up
/// to `context − 1` tokens of one document), after the first `skip_documents` documents: for other passes
/// over the same text (`clt splice`). Documents are read and tokenised as the iterator is consumed.
pub fn corpus_contexts<'a>(
    m: &'a LoadedModel,
    corpus: &[PathBuf],
    column: Option<String>,
    skip_documents: u64,
    context: usize,
) -> Result<impl Iterator<Item = Result<Vec<u32>>> + 'a> {
    if context < 2 {
        return Err(Error::config(
            "context",
            format!("{context} tokens leave no room after the special token"),
        ));
    }
    let docs = open_corpus(m, corpus, column, skip_documents, "skip_documents")?;
    Ok(docs.enumerate().flat_map(move |(i, d)| {
        match d.and_then(|d| doc_contexts(m, skip_documents + i as u64, &d, context)) {
            Ok(cs) => cs.into_iter().map(|c| Ok(c.tokens)).collect::<Vec<_>>(),
            Err(e) => vec![Err(e)],
        }
    }))
}

/// The corpus's documents for `m` (token ids checked against its vocabulary) after the first `skip`
/// (read, not tokenised); `key` names the setting in the error when the corpus holds no more than `skip`.
fn open_corpus(
    m: &LoadedModel,
    corpus: &[PathBuf],
    column: Option<String>,
    skip: u64,
    key: &str,
) -> Result<Documents> {
    let mut docs = Documents::open_with(
        corpus,
        CorpusOptions {
            column,
            vocab: Some(m.model.vocab_size().min(u32::MAX as usize) as u32),
        },
    )?;
    for skipped in 0..skip {
        if docs.next().transpose()?.is_none() {
            return Err(Error::config(
                key,
                format!("the corpus has only {skipped} documents, so skipping {skip} leaves none"),
            ));
        }
    }
    Ok(docs)
}

/// One context: its tokens, the document it comes from and the position of its first token in the document.
struct Context {
    tokens: Vec<u32>,
    doc: u64,
    start: u32,
}

/// The contexts of document `doc` (its index in the corpus): BOS, then up to `context − 1` tokens of its body.
/// A pretokenised document is taken as its body, after the BOS it may start with (so every context starts
/// with the model's BOS, as a text document's do).
fn doc_contexts(
    m: &LoadedModel,
    doc: u64,
    document: &Document,
    context: usize,
) -> Result<Vec<Context>> {
    let ids = match document {
        Document::Text(text) => m.tokenizer.encode(text)?,
        Document::Tokens(ids) => {
            let bos = m.tokenizer.bos();
            bos.filter(|b| ids.first() != Some(b))
                .into_iter()
                .chain(ids.iter().copied())
                .collect()
        }
    };
    let bos = m.tokenizer.bos().filter(|b| ids.first() == Some(b));
    let body = if bos.is_some() { &ids[1..] } else { &ids[..] };
    let room = if bos.is_some() { context - 1 } else { context };
    let mut out = Vec::new();
    for (c, chunk) in body.chunks(room.max(1)).enumerate() {
        let mut tokens = Vec::with_capacity(context);
        tokens.extend(bos);
        tokens.extend_from_slice(chunk);
        if tokens.len() > bos.is_some() as usize {
            out.push(Context {
                tokens,
                doc,
                start: (c * room) as u32,
            });
        }
    }
    Ok(out)
}

/// The corpus's contexts in order, tokenised `group` documents at a time in parallel as they are needed.
struct ContextStream<'a> {
    m: &'a LoadedModel,
    docs: Documents,
    next_doc: u64,
    context: usize,
    group: usize,
    ready: std::collections::VecDeque<Context>,
    docs_done: bool,
}

impl ContextStream<'_> {
    /// Up to `n` next contexts (fewer only at the corpus's end).
    fn take(&mut self, n: usize) -> Result<Vec<Context>> {
        while self.ready.len() < n && !self.docs_done {
            let mut docs = Vec::with_capacity(self.group);
            for doc in self.docs.by_ref().take(self.group) {
                docs.push((self.next_doc, doc?));
                self.next_doc += 1;
            }
            self.docs_done = docs.len() < self.group;
            let (m, context) = (self.m, self.context);
            let ctxs: Vec<Result<Vec<Context>>> = docs
                .par_iter()
                .map(|(i, t)| doc_contexts(m, *i, t, context))
                .collect();
            for c in ctxs {
                self.ready.extend(c?);
            }
        }
        let n = n.min(self.ready.len());
        Ok(self.ready.drain(..n).collect())
    }
}

fn checksum_file(path: &Path) -> Result<String> {
    let target = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let bytes = std::fs::read(&target).map_err(|e| Error::io(&target, e))?;
    Ok(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)))
}

/// Caches the activations; returns the record written to `out/cache.json`.
pub fn cache(m: &LoadedModel, cfg: &CacheConfig) -> Result<CacheRecord> {
    if cfg.context < 2 {
        return Err(Error::config("cache.context", "must be at least 2 tokens"));
    }
    let (l_n, d) = (m.model.n_layers(), m.model.d_model());
    if cfg.context > m.model.max_seq_len() {
        return Err(Error::config(
            "cache.context",
            format!("exceeds the model's max_seq_len {}", m.model.max_seq_len()),
        ));
    }
    let dims = ActDims {
        n_layers: l_n,
        d_model: d,
    };
    let hooks_in: Vec<String> = (0..l_n).map(|l| cfg.input_hook.hook_name(l)).collect();
    let hooks_out: Vec<String> = (0..l_n)
        .map(|l| format!("blocks.{l}.hook_mlp_out"))
        .collect();
    let model_name = m.path.display().to_string();
    let record = |n_tokens, documents_end| -> Result<CacheRecord> {
        Ok(CacheRecord {
            model: model_name.clone(),
            model_checksum: checksum_file(&m.path)?,
            tokenizer: format!("{:?}", m.format),
            corpus: cfg.corpus.iter().map(|p| p.display().to_string()).collect(),
            column: cfg.column.clone(),
            skip_documents: cfg.skip_documents,
            context: cfg.context,
            input_hook: cfg.input_hook,
            norm: Some(m.model.norm()),
            hooks_in: hooks_in.clone(),
            hooks_out: hooks_out.clone(),
            n_tokens,
            documents_end,
            contexts_run: 0,
        })
    };
    if cfg.out.join(crate::store::manifest::MANIFEST_FILE).exists() {
        let ds = crate::store::Dataset::open(&cfg.out)?;
        eprintln!(
            "{} is already complete ({} tokens)",
            cfg.out.display(),
            ds.n_tokens()
        );
        // The record written when it completed says which documents it holds.
        let written: Option<CacheRecord> =
            crate::clt::checkpoint::read_json(&cfg.out.join("cache.json")).ok();
        return record(ds.n_tokens(), written.and_then(|w| w.documents_end));
    }
    let meta = ShardMeta {
        model: model_name.clone(),
        hooks_in: hooks_in.clone(),
        hooks_out: hooks_out.clone(),
        norm: None,
    };
    let wcfg = WriterConfig {
        codec: cfg.codec,
        target_rel_err: cfg.target_rel_err,
        ..WriterConfig::default()
    };
    let (mut writer, done) = DatasetWriter::resume(&cfg.out, dims, wcfg, meta, cfg.shard_tokens)?;
    if done > 0 {
        eprintln!("resuming: {done} tokens already in complete shards");
    }

    let batch_n = cfg.contexts_per_batch.max(1);
    let docs = open_corpus(
        m,
        &cfg.corpus,
        cfg.column.clone(),
        cfg.skip_documents,
        "cache.skip_documents",
    )?;
    let mut stream = ContextStream {
        m,
        docs,
        next_doc: cfg.skip_documents,
        context: cfg.context,
        group: batch_n,
        ready: Default::default(),
        docs_done: false,
    };
    // Tokens to stop at (the corpus may end first): with a budget, the bar counts tokens; without, the
    // corpus's bytes read.
    let total = cfg.max_tokens.unwrap_or(u64::MAX);
    let (len, template) = match cfg.max_tokens {
        Some(t) => (
            t,
            "{bar:30} {pos}/{len} tokens  {per_sec}  [{elapsed_precise} < {eta_precise}]",
        ),
        None => (
            stream.docs.total_bytes(),
            "{bar:30} {bytes}/{total_bytes} of the corpus  [{elapsed_precise} < {eta_precise}]",
        ),
    };
    let bar = if cfg.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(len).with_style(
            indicatif::ProgressStyle::with_template(template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        )
    };
    let show = |bar: &indicatif::ProgressBar, written: u64, stream: &ContextStream| {
        bar.set_position(match cfg.max_tokens {
            Some(t) => written.min(t),
            None => stream.docs.bytes_read(),
        })
    };
    show(&bar, done, &stream);

    let hooks = Hooks {
        mlp_out: true,
        ..cfg.input_hook.hooks()
    };
    let opts = ForwardOptions {
        hooks,
        logits: Logits::None,
        ..Default::default()
    };
    let skip_bos = |c: &Context| m.tokenizer.bos().is_some_and(|b| c.tokens[0] == b) as usize;
    let mut seen = 0u64; // tokens of the stream passed so far (cached earlier or now)
    let mut written = done;
    let mut contexts_run = 0u64;
    let mut documents_end = None;
    while written < total {
        let batch = stream.take(batch_n)?;
        if batch.is_empty() {
            break;
        }
        // Per context, the tokens to write: past those already in the store (resume), within the budget.
        // Contexts with none are not run.
        let mut work = Vec::with_capacity(batch.len());
        let mut planned = written;
        for c in &batch {
            let bos = skip_bos(c);
            let n = c.tokens.len() - bos;
            let already = done.saturating_sub(seen).min(n as u64) as usize;
            seen += n as u64;
            let take = (n - already).min((total - planned) as usize);
            if already + take > 0 {
                documents_end = Some(c.doc + 1);
            }
            if take > 0 {
                planned += take as u64;
                work.push((c, bos + already, take));
            }
        }
        let outs: Vec<Result<(Vec<f32>, Vec<f32>)>> = work
            .par_iter()
            .map(|(c, _, _)| {
                let out = m.model.forward_with(&c.tokens, &opts)?;
                let t = c.tokens.len();
                let mut x = vec![0.0f32; t * l_n * d];
                let mut y = vec![0.0f32; t * l_n * d];
                for (l, rec) in out.record.layers.iter().enumerate() {
                    let xin = cfg.input_hook.recorded(rec);
                    let (Some(xin), Some(yout)) = (xin, rec.mlp_out.as_ref()) else {
                        return Err(Error::Unsupported(
                            "the model did not record the requested hooks".into(),
                        ));
                    };
                    for p in 0..t {
                        x[(p * l_n + l) * d..][..d].copy_from_slice(&xin[p * d..(p + 1) * d]);
                        y[(p * l_n + l) * d..][..d].copy_from_slice(&yout[p * d..(p + 1) * d]);
                    }
                }
                Ok((x, y))
            })
            .collect();
        contexts_run += work.len() as u64;
        for ((c, s, take), res) in work.iter().zip(outs) {
            let (x, y) = res?;
            let (s, e) = (*s, s + take);
            let row = l_n * d;
            let positions: Vec<u32> = (s..e).map(|p| c.start + p as u32).collect();
            let doc_ids = vec![c.doc; *take];
            writer.push(
                &x[s * row..e * row],
                &y[s * row..e * row],
                Some(TokenIds {
                    tokens: &c.tokens[s..e],
                    positions: &positions,
                    doc_ids: &doc_ids,
                }),
            )?;
            written += *take as u64;
        }
        show(&bar, written, &stream);
    }
    bar.finish_and_clear();
    let manifest = writer.finish()?;
    let rec = CacheRecord {
        contexts_run,
        ..record(manifest.n_tokens, documents_end)?
    };
    let json = serde_json::to_vec_pretty(&rec).map_err(|e| Error::InvalidData {
        what: "cache.json".into(),
        reason: e.to_string(),
    })?;
    crate::clt::checkpoint::write_atomic(&cfg.out.join("cache.json"), &json)?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every hook's circuit-tracer name reads back as that hook on a model with the same norm;
    /// `ln2.hook_normalized` is the MLP's input on a LayerNorm model (TransformerLens's LayerNorm applies
    /// its weight and bias before the hook) and the norm before its weight on an RMSNorm model.
    #[test]
    fn hook_names_resolve_by_the_models_norm() {
        use InputHook::*;
        for norm in [NormKind::Rms, NormKind::Layer] {
            for hook in [MlpInNormed, ResidMid, MlpInUnweighted] {
                if let Some(name) = hook.circuit_tracer_name(norm) {
                    assert_eq!(InputHook::from_hook_name(name, norm), Some(hook));
                    let prefixed = format!("blocks.3.{name}");
                    assert_eq!(InputHook::from_hook_name(&prefixed, norm), Some(hook));
                }
            }
        }
        let ln2 = "ln2.hook_normalized";
        assert_eq!(
            InputHook::from_hook_name(ln2, NormKind::Layer),
            Some(MlpInNormed)
        );
        assert_eq!(
            InputHook::from_hook_name(ln2, NormKind::Rms),
            Some(MlpInUnweighted)
        );
        for norm in [NormKind::Rms, NormKind::Layer] {
            assert_eq!(
                InputHook::from_hook_name("blocks.0.hook_mlp_in", norm),
                Some(ResidMid)
            );
        }
        assert_eq!(MlpInUnweighted.circuit_tracer_name(NormKind::Layer), None);
        assert_eq!(
            InputHook::from_hook_name("hook_resid_pre", NormKind::Rms),
            None
        );
        // The store's record names each hook as TransformerLens would with the norms' weights folded.
        assert_eq!(MlpInNormed.hook_name(2), "blocks.2.mlp.hook_in");
        assert_eq!(MlpInUnweighted.hook_name(2), "blocks.2.ln2.hook_normalized");
    }
}

//! `clt features`: one pass over a store, then the features file (and optionally circuit-tracer's per-feature
//! JSON files) as library code.

use super::analysis::{AnalysisConfig, analyse};
use super::file::{FeatureFileWriter, FeaturesMeta, RecordEncoder};
use super::logits::{LogitEffects, logit_effects, slot_name};
use crate::attribution::linear::{Attributable, NormKind};
use crate::clt::Transcoder;
use crate::clt::export::{fold_norms, import_circuit_tracer};
use crate::model::LoadedModel;
use crate::store::Dataset;
use crate::{Error, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// The name of the features file inside the output directory.
pub const FEATURES_FILE: &str = "features.cltf";

/// Arguments of `clt features`.
#[derive(clap::Args, Clone, Debug)]
pub struct FeaturesArgs {
    /// The transcoder: a checkpoint or run directory of ours, or a circuit-tracer directory (config.yaml).
    #[arg(long)]
    pub transcoder: PathBuf,
    /// The activation store (dataset directory) to stream.
    #[arg(long)]
    pub store: PathBuf,
    /// Output directory (features.cltf, and features/ with --json).
    #[arg(long)]
    pub out: PathBuf,
    /// The language model, for token text and logit effects (default: the model recorded in the store's
    /// cache.json, when that file exists).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The tokenizer, for llama2.c checkpoints.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Top activating examples per feature.
    #[arg(long, default_value_t = 20)]
    pub top_k: usize,
    /// Examples sampled from the firings for the lower-quantile groups.
    #[arg(long, default_value_t = 24)]
    pub samples: usize,
    /// Tokens of context before and after an example's token.
    #[arg(long, default_value_t = 12)]
    pub before: usize,
    #[arg(long, default_value_t = 4)]
    pub after: usize,
    /// Promoted and suppressed tokens listed per feature.
    #[arg(long, default_value_t = 10)]
    pub logits: usize,
    /// Stop after this many tokens of the store.
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// Tokens encoded at once.
    #[arg(long, default_value_t = 4096)]
    pub chunk_tokens: usize,
    /// The scan name recorded in the records (default: the transcoder directory's name).
    #[arg(long)]
    pub scan: Option<String>,
    /// Also write circuit-tracer's per-feature JSON files, features/{scan}/{index}.json (index: the Cantor id), where its frontend fetches them.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Refuses a transcoder that says it reads another hook than the one the store's `cache.json` recorded:
/// its dashboards would be computed from activations it was not made for. (Stores without a cache.json, or
/// one that predates recording the model's norm, are not checked.)
fn check_input_hook(args: &FeaturesArgs) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(args.store.join("cache.json")) else {
        return Ok(());
    };
    let Ok(rec) = serde_json::from_str::<crate::cache::CacheRecord>(&text) else {
        return Ok(());
    };
    let Some(norm) = rec.norm else {
        return Ok(());
    };
    match crate::attribution::recorded_input_hook(&args.transcoder, norm)? {
        Some(h) if h != rec.input_hook => Err(Error::config(
            "transcoder",
            format!(
                "{} reads {h:?} but the store {} holds {:?} ({}): the dashboards would be computed from \
                 activations it was not made for",
                args.transcoder.display(),
                args.store.display(),
                rec.input_hook,
                rec.input_hook.hook_name(0)
            ),
        )),
        _ => Ok(()),
    }
}

/// Loads a transcoder directory of either kind: circuit-tracer's (config.yaml) or ours (a checkpoint, native
/// or sharded, or a run directory whose latest checkpoint is taken).
pub fn load_any_transcoder(path: &Path) -> Result<Transcoder> {
    if path.join("config.yaml").exists() {
        import_circuit_tracer(path)
    } else {
        crate::dist::checkpoint::load_transcoder(path)
    }
}

/// The model named by `--model`, else the one the store's cache.json records (when its file is still there).
fn find_model(args: &FeaturesArgs) -> Result<Option<LoadedModel>> {
    if let Some(m) = &args.model {
        return crate::model::load(m, args.tokenizer.as_deref()).map(Some);
    }
    let rec = args.store.join("cache.json");
    let Ok(text) = std::fs::read_to_string(&rec) else {
        return Ok(None);
    };
    let rec: crate::cache::CacheRecord =
        serde_json::from_str(&text).map_err(|e| Error::Format {
            path: rec.clone(),
            offset: 0,
            reason: format!("bad cache.json: {e}"),
        })?;
    let model = PathBuf::from(&rec.model);
    if !model.exists() {
        return Ok(None);
    }
    let tok = Some(PathBuf::from(&rec.tokenizer)).filter(|t| t.is_file());
    crate::model::load(&model, tok.as_deref()).map(Some)
}

/// Runs `clt features`; returns the path of the features file.
pub fn run(args: &FeaturesArgs) -> Result<PathBuf> {
    let t = load_any_transcoder(&args.transcoder)?;
    check_input_hook(args)?;
    let ds = Dataset::open(&args.store)?;
    let model = find_model(args)?;
    let params = fold_norms(&t);
    let acfg = AnalysisConfig {
        top_k: args.top_k,
        n_samples: args.samples,
        before: args.before,
        after: args.after,
        chunk_tokens: args.chunk_tokens,
        max_tokens: args.max_tokens,
        seed: 0,
        quiet: args.quiet,
    };
    let analysis = analyse(&t.cfg, &params, &ds, &acfg)?;
    let effects: Option<Vec<Vec<LogitEffects>>> = match &model {
        Some(m) => {
            let lin = m.model.linear();
            let centre = lin.norm == NormKind::Layer;
            if m.model.d_model() != t.cfg.d_model {
                return Err(Error::Shape {
                    what: "model width against the transcoder's d_model".into(),
                    expected: vec![t.cfg.d_model],
                    got: vec![m.model.d_model()],
                });
            }
            Some(logit_effects(
                &t.cfg,
                &params,
                lin.unembedding,
                Some(lin.final_norm),
                centre,
                args.logits,
            )?)
        }
        None => None,
    };
    let scan = args.scan.clone().unwrap_or_else(|| {
        args.transcoder
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "clt".into())
    });
    // Every vocabulary piece once, so that the parallel record building below only clones strings.
    let pieces: Vec<String> = match &model {
        Some(m) => (0..m.tokenizer.vocab_size() as u32)
            .map(|id| display_piece(&m.tokenizer.piece(id)))
            .collect(),
        None => Vec::new(),
    };
    let piece = |id: u32| {
        pieces
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| format!("#{id}"))
    };
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    let meta = FeaturesMeta {
        scan: scan.clone(),
        transcoder: args.transcoder.display().to_string(),
        store: args.store.display().to_string(),
        model: model.as_ref().map(|m| m.path.display().to_string()),
        n_layers: t.cfg.n_layers,
        n_features: t.cfg.n_features,
        n_tokens: analysis.n_tokens,
        logit_slot: slot_name(&t.cfg).into(),
    };
    let json_dir = args.out.join("features").join(&scan);
    if args.json {
        std::fs::create_dir_all(&json_dir).map_err(|e| Error::io(&json_dir, e))?;
    }
    let mut w = FeatureFileWriter::create(args.out.join(FEATURES_FILE), meta)?;
    for l in 0..t.cfg.n_layers {
        // Records are built, serialised and compressed in parallel, then written in order.
        let frames: Vec<Vec<u8>> = (0..t.cfg.n_features)
            .into_par_iter()
            .map_init(RecordEncoder::new, |enc, f| {
                let enc = enc
                    .as_mut()
                    .map_err(|e| Error::Unsupported(e.to_string()))?;
                let mut rec = analysis.record(l, f, &scan, &piece);
                if let Some(e) = &effects {
                    let e = &e[l][f];
                    rec.top_logits = e.top.iter().map(|&(v, _)| piece(v)).collect();
                    rec.top_logit_values = e.top.iter().map(|&(_, x)| x).collect();
                    rec.bottom_logits = e.bottom.iter().map(|&(v, _)| piece(v)).collect();
                    rec.bottom_logit_values = e.bottom.iter().map(|&(_, x)| x).collect();
                }
                if args.json {
                    let p = json_dir.join(format!("{}.json", rec.index));
                    let bytes = serde_json::to_vec(&rec).map_err(|e| Error::InvalidData {
                        what: "feature record".into(),
                        reason: e.to_string(),
                    })?;
                    std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
                }
                enc.encode(&rec)
            })
            .collect::<Result<_>>()?;
        for (f, frame) in frames.iter().enumerate() {
            w.write_frame(l, f, frame)?;
        }
    }
    w.finish()
}

/// A vocabulary piece as text: SentencePiece's `▁` as a space, byte tokens `<0x0A>` as their character.
pub fn display_piece(p: &str) -> String {
    if let Some(hex) = p.strip_prefix("<0x").and_then(|s| s.strip_suffix('>'))
        && let Ok(b) = u8::from_str_radix(hex, 16)
        && b.is_ascii()
    {
        return (b as char).to_string();
    }
    p.replace('▁', " ")
}

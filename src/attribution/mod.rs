//! Attribution graphs: for one prompt, which transcoder features cause the model's next-token logits, and
//! through which paths — computed exactly as circuit-tracer defines them, on the engine's own forward and
//! kernels.
//!
//! - [`linear`]: what attribution reads of a model (Llama or GPT-2) beyond its forward: its linearisation;
//! - [`replacement`]: the local replacement model of a prompt (forward with frozen state, active features,
//!   error nodes);
//! - [`backward`]: the batched linearised backward and the edges it yields;
//! - [`graph`]: logit targets, feature exploration by influence, the adjacency;
//! - [`prune`](mod@prune): influence, node and edge pruning, replacement and completeness scores;
//! - [`output`]: the frontend's graph JSON and the raw adjacency (safetensors);
//! - [`intervene`]: the replacement model run with chosen features set or scaled;
//! - [`cli`]: `clt attribute` and `clt intervene`.
//!
//! The algorithm and formats are described in `docs/attribution.md`.

pub mod backward;
pub mod cli;
pub mod graph;
pub mod intervene;
pub mod linear;
pub mod output;
pub mod prune;
pub mod replacement;

use std::path::Path;

use crate::cache::InputHook;
use crate::clt::Transcoder;
use crate::{Error, Result};
pub use graph::{AttributionConfig, Graph, attribute, select_logits};
pub use linear::{Attributable, Linear};
pub use prune::{Adjacency, Pruned, Scores, prune, scores};
pub use replacement::{ReplacementTranscoder, prompt_state};

/// Maps a circuit-tracer / TransformerLens feature-input hook name to the hook the engine records.
pub fn input_hook_of(name: &str) -> Option<InputHook> {
    let n = name.trim();
    if n.ends_with("ln2.hook_normalized")
        || n.ends_with("mlp.hook_in")
        || n.ends_with("hook_mlp_in")
    {
        Some(InputHook::MlpInNormed)
    } else if n.ends_with("hook_resid_mid") {
        Some(InputHook::ResidMid)
    } else {
        None
    }
}

/// A transcoder read from any supported place, with the hook it reads and a name for the graph's `scan`.
#[derive(Clone, Debug)]
pub struct LoadedTranscoder {
    pub transcoder: Transcoder,
    pub input_hook: InputHook,
    pub name: String,
}

/// Reads a transcoder for attribution: a circuit-tracer directory (`config.yaml`: its `feature_input_hook`
/// decides the hook), or one of our checkpoints or run directories (the hook from the cache the run trained
/// on, when it can be found; else `mlp_in_normed`). `hook` overrides either.
pub fn load_transcoder(path: &Path, hook: Option<InputHook>) -> Result<LoadedTranscoder> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "transcoder".into());
    let yaml = path.join("config.yaml");
    if yaml.is_file() {
        let t = crate::clt::export::import_circuit_tracer(path)?;
        let (keys, _) = crate::clt::export::read_yaml(&yaml)?;
        let get = |k: &str| keys.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
        let input_hook = match hook {
            Some(h) => h,
            None => {
                let h = get("feature_input_hook").unwrap_or_default();
                input_hook_of(&h).ok_or_else(|| Error::Format {
                    path: yaml.clone(),
                    offset: 0,
                    reason: format!(
                        "feature_input_hook `{h}` is not one the engine records (ln2.hook_normalized, \
                         mlp.hook_in or hook_resid_mid); pass --input-hook"
                    ),
                })?
            }
        };
        let name = get("model_name")
            .map(|m| format!("{m}-{name}"))
            .unwrap_or(name);
        return Ok(LoadedTranscoder {
            transcoder: t,
            input_hook,
            name,
        });
    }
    let dir = crate::train::resolve_checkpoint(path)?;
    let t = crate::clt::checkpoint::load_transcoder(&dir)?;
    let input_hook = hook.unwrap_or_else(|| hook_of_run(&dir).unwrap_or_default());
    Ok(LoadedTranscoder {
        transcoder: t,
        input_hook,
        name,
    })
}

/// The input hook of the store a checkpoint's run trained on, from its `cache.json`.
fn hook_of_run(dir: &Path) -> Option<InputHook> {
    let run = crate::train::trainer::run_config_of(dir).ok()?;
    let crate::train::DataConfig::Store(s) = run.data else {
        return None;
    };
    let base = if s.path.is_dir() {
        s.path.clone()
    } else {
        s.path.parent()?.to_path_buf()
    };
    let text = std::fs::read_to_string(base.join("cache.json")).ok()?;
    let rec: crate::cache::CacheRecord = serde_json::from_str(&text).ok()?;
    Some(rec.input_hook)
}

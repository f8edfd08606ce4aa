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
//! - [`activations`]: which features fire where on a prompt, and how well the transcoder fits it;
//! - [`splice`]: the transcoder spliced into the model, its next-token loss on text against the model's;
//! - [`cli`]: `clt attribute`, `clt intervene`, `clt activations` and `clt splice`.
//!
//! The algorithm and formats are described in `docs/attribution.md`.

pub mod activations;
pub mod backward;
pub mod cli;
pub mod graph;
pub mod intervene;
pub mod linear;
pub mod output;
pub mod prune;
pub mod replacement;
pub mod splice;

use std::path::Path;

use crate::cache::InputHook;
use crate::clt::Transcoder;
use crate::clt::export::{IMPORTED_HOOKS, read_imported_hooks};
use crate::model::forward::NormKind;
use crate::{Error, Result};
pub use graph::{AttributionConfig, Graph, attribute, select_logits};
pub use linear::{Attributable, Linear};
pub use prune::{Adjacency, Pruned, Scores, prune, scores};
pub use replacement::{ReplacementTranscoder, prompt_state};

/// A transcoder read from any supported place, with the hook it reads and a name for the graph's `scan` (a
/// circuit-tracer config's own `scan` where it has one).
#[derive(Clone, Debug)]
pub struct LoadedTranscoder {
    pub transcoder: Transcoder,
    pub input_hook: InputHook,
    pub name: String,
    /// The `feature_output_hook` of a circuit-tracer directory or an imported checkpoint, and the file it
    /// was read from (checked against the model by [`check_output_hook`]); `None` for our own checkpoints,
    /// which always write `hook_mlp_out`.
    pub output_hook: Option<(String, std::path::PathBuf)>,
}

/// Checks that a circuit-tracer `feature_output_hook` (from `yaml`) names what the engine's replacement
/// writes: the MLP's output as the residual stream receives it (`hook_mlp_out`). circuit-tracer's
/// `mlp.hook_out` is the MLP module's own output, the same on models without a norm after the MLP
/// (Llama, GPT-2) but not on Gemma-2 (`post_mlp_norm`), where it comes before that norm.
pub fn check_output_hook(name: &str, post_mlp_norm: bool, yaml: &Path) -> Result<()> {
    let n = name.trim();
    let reason = if n.ends_with("hook_mlp_out") || (n.ends_with("mlp.hook_out") && !post_mlp_norm) {
        return Ok(());
    } else if n.ends_with("mlp.hook_out") {
        "mlp.hook_out is the MLP's output before the model's post-MLP norm; the engine's transcoders write \
         what the residual stream receives after it (hook_mlp_out)"
            .to_string()
    } else {
        "the engine's transcoders write the MLP's output (hook_mlp_out, or mlp.hook_out where no norm \
         follows the MLP)"
            .to_string()
    };
    Err(Error::Format {
        path: yaml.into(),
        offset: 0,
        reason: format!("feature_output_hook `{name}`: {reason}"),
    })
}

/// Reads a transcoder for attribution through a model whose norms are `norm`: a circuit-tracer directory
/// (`config.yaml`: its `feature_input_hook` decides the hook, [`InputHook::from_hook_name`]), or one of our
/// checkpoints (native or sharded) or run directories (the hook from the cache the run trained on, when it
/// can be found, else the name it was imported with, else `mlp_in_normed`). `hook` overrides either.
pub fn load_transcoder(
    path: &Path,
    hook: Option<InputHook>,
    norm: NormKind,
) -> Result<LoadedTranscoder> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "transcoder".into());
    let yaml = path.join("config.yaml");
    if yaml.is_file() {
        let t = crate::clt::export::import_circuit_tracer(path)?;
        let config = crate::clt::export::read_yaml(&yaml)?;
        let get = |k: &str| config.get(k).map(str::to_string);
        let input_hook = match hook {
            Some(h) => h,
            None => recorded_input_hook(path, norm)?.unwrap_or_default(),
        };
        // circuit-tracer's graphs carry the config's `scan` (what Neuronpedia looks features up by).
        let name = match (get("scan").filter(|s| !s.is_empty()), get("model_name")) {
            (Some(scan), _) => scan,
            (None, Some(m)) => format!("{m}-{name}"),
            (None, None) => name,
        };
        return Ok(LoadedTranscoder {
            transcoder: t,
            input_hook,
            name,
            output_hook: get("feature_output_hook").map(|h| (h, yaml.clone())),
        });
    }
    let dir = crate::dist::checkpoint::resolve(path)?;
    let t = crate::dist::checkpoint::load_transcoder(&dir)?;
    let input_hook = match hook {
        Some(h) => h,
        None => recorded_input_hook(&dir, norm)?.unwrap_or_default(),
    };
    let kept = dir.join(IMPORTED_HOOKS);
    let imported = read_imported_hooks(&dir)?;
    Ok(LoadedTranscoder {
        transcoder: t,
        input_hook,
        name,
        output_hook: imported
            .map(|m| (m.feature_output_hook, kept))
            .filter(|(h, _)| !h.is_empty()),
    })
}

/// The input hook a transcoder at `path` says it reads on a model whose norm is `norm`, without loading its
/// weights: a circuit-tracer directory's `feature_input_hook`; for our checkpoints, the hook of the store
/// its run trained on, else the name a `clt import`ed checkpoint kept; `None` when nothing records it (a
/// synthetic run).
pub fn recorded_input_hook(path: &Path, norm: NormKind) -> Result<Option<InputHook>> {
    let yaml = path.join("config.yaml");
    if yaml.is_file() {
        let config = crate::clt::export::read_yaml(&yaml)?;
        let name = config.get("feature_input_hook").unwrap_or("");
        return hook_named(name, norm, &yaml).map(Some);
    }
    let dir = crate::dist::checkpoint::resolve(path)?;
    if let Some(h) = hook_of_run(&dir) {
        return Ok(Some(h));
    }
    match read_imported_hooks(&dir)? {
        Some(m) => hook_named(&m.feature_input_hook, norm, &dir.join(IMPORTED_HOOKS)).map(Some),
        None => Ok(None),
    }
}

/// The hook a `feature_input_hook` name (read from `path`) reads on a model whose norm is `norm`.
fn hook_named(name: &str, norm: NormKind, path: &Path) -> Result<InputHook> {
    InputHook::from_hook_name(name, norm).ok_or_else(|| Error::Format {
        path: path.into(),
        offset: 0,
        reason: format!(
            "feature_input_hook `{name}` is not one the engine records (mlp.hook_in, \
             ln2.hook_normalized or hook_resid_mid); pass --input-hook"
        ),
    })
}

/// The `cache.json` of the store a checkpoint's run trained on, when it can be found.
fn cache_record_of_run(dir: &Path) -> Option<crate::cache::CacheRecord> {
    let data = crate::dist::checkpoint::data_config(dir).ok()??;
    let crate::train::DataConfig::Store(s) = data else {
        return None;
    };
    let base = if s.path.is_dir() {
        s.path.clone()
    } else {
        s.path.parent()?.to_path_buf()
    };
    let text = std::fs::read_to_string(base.join("cache.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The input hook of the store a checkpoint's run trained on, from its `cache.json`.
fn hook_of_run(dir: &Path) -> Option<InputHook> {
    cache_record_of_run(dir).map(|r| r.input_hook)
}

/// The `feature_input_hook` a checkpoint (or run directory) exports under to circuit-tracer: the
/// circuit-tracer name of the hook its run's store recorded ([`InputHook::circuit_tracer_name`]), or the
/// name it was imported with; `None` when neither is found (a synthetic run, a moved store). An error when
/// the hook has no circuit-tracer name (a LayerNorm model's unweighted norm), or the store predates
/// recording its model's norm and the name depends on it.
pub fn exported_input_hook(path: &Path) -> Result<Option<String>> {
    let Some(rec) = cache_record_of_run(path) else {
        let imported = match crate::dist::checkpoint::resolve(path) {
            Ok(dir) => read_imported_hooks(&dir)?,
            Err(_) => None,
        };
        return Ok(imported
            .map(|m| m.feature_input_hook)
            .filter(|h| !h.is_empty()));
    };
    let no_name = |why: &str| {
        Error::config(
            "input_hook",
            format!(
                "the run trained on `{}` ({why}); pass --input-hook with the name to write",
                serde_json::to_string(&rec.input_hook).unwrap_or_default()
            ),
        )
    };
    let norm = match (rec.input_hook, rec.norm) {
        (InputHook::MlpInUnweighted, None) => {
            return Err(no_name(
                "its cache.json does not say whether the model uses RMSNorm or LayerNorm",
            ));
        }
        (_, norm) => norm.unwrap_or(NormKind::Rms),
    };
    match rec.input_hook.circuit_tracer_name(norm) {
        Some(name) => Ok(Some(name.into())),
        None => Err(no_name(
            "circuit-tracer has no hook for a LayerNorm before its weight and bias",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `hook_mlp_out` is what the engine writes on every model; `mlp.hook_out` only where no norm follows
    /// the MLP; anything else is refused naming the file and the hook.
    #[test]
    fn output_hooks_must_be_what_the_stream_receives() {
        let yaml = Path::new("/t/config.yaml");
        for post in [false, true] {
            assert!(check_output_hook("hook_mlp_out", post, yaml).is_ok());
            assert!(check_output_hook("blocks.4.hook_mlp_out", post, yaml).is_ok());
            let e = check_output_hook("hook_resid_post", post, yaml).unwrap_err();
            assert!(
                e.to_string().contains("/t/config.yaml")
                    && e.to_string().contains("hook_resid_post"),
                "{e}"
            );
        }
        assert!(check_output_hook("mlp.hook_out", false, yaml).is_ok());
        let e = check_output_hook("mlp.hook_out", true, yaml).unwrap_err();
        assert!(e.to_string().contains("post-MLP norm"), "{e}");
    }
}

//! circuit-tracer's transcoder formats: export (normalisation folded into the weights) and import.
//!
//! Cross-layer transcoder directory (`model_kind: cross_layer_transcoder`), for each layer i:
//! `W_enc_{i}.safetensors` with `W_enc_{i}` `[F, d]`, `b_enc_{i}` `[F]`, `b_dec_{i}` `[d]`, `threshold_{i}` `[F]`
//! (and, as an extension of ours, `W_skip_{i}` [d, d] when the model has skip connections), and
//! `W_dec_{i}.safetensors` with `W_dec_{i}` [F, L − i, d]. Per-layer transcoders (`model_kind: transcoder_set`):
//! `layer_{i}.safetensors` with `W_enc` [F, d], `W_dec` [F, d], `b_enc`, `b_dec`,
//! `activation_function.threshold`, optional `W_skip` [d, d]; on import, also the files a `transcoders:` list
//! names, Gemma Scope's `params.npz` among them ([`super::transcoder_set`]). Both come with a `config.yaml`.
//!
//! Folding: the transcoder was trained on `x' = s_in x` and `y' = s_out y`. In raw units the encoder rows are
//! multiplied by `s_in[l]`, decoder rows and biases of target k divided by `s_out[k]`, skip weights multiplied
//! by `s_in[l] / s_out[l]`; thresholds are unchanged (pre-activations are the same numbers).

use super::checkpoint::{TensorFile, TensorOut, write_atomic, write_tensors};
use super::{Activation, CltConfig, DecoderKind, NormScales, Params, Transcoder};
use crate::{Error, Result};
use std::path::Path;
use yaml_rust2::{Yaml, YamlLoader};

/// Hook names recorded in `config.yaml` (default: the engine's default input, the MLP's input
/// `mlp.hook_in`, and its output `hook_mlp_out`); `clt import` keeps them beside the native checkpoint
/// ([`IMPORTED_HOOKS`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExportMeta {
    pub model_name: String,
    pub feature_input_hook: String,
    pub feature_output_hook: String,
}

impl Default for ExportMeta {
    fn default() -> Self {
        ExportMeta {
            model_name: "unknown".into(),
            feature_input_hook: "mlp.hook_in".into(),
            feature_output_hook: "hook_mlp_out".into(),
        }
    }
}

/// The file beside a native checkpoint imported from circuit-tracer that keeps its `config.yaml`'s names
/// (an [`ExportMeta`] as JSON), so attribution reads, and export writes, the hooks it was made for.
pub const IMPORTED_HOOKS: &str = "circuit_tracer_hooks.json";

/// The names in a circuit-tracer directory's `config.yaml` (empty where a key is absent).
pub fn read_export_meta(dir: &Path) -> Result<ExportMeta> {
    let yaml = read_yaml(&dir.join("config.yaml"))?;
    let get = |k: &str| yaml.get(k).unwrap_or_default().to_string();
    Ok(ExportMeta {
        model_name: get("model_name"),
        feature_input_hook: get("feature_input_hook"),
        feature_output_hook: get("feature_output_hook"),
    })
}

/// Keeps `meta` beside the native checkpoint at `dir` ([`IMPORTED_HOOKS`]).
pub fn write_imported_hooks(dir: &Path, meta: &ExportMeta) -> Result<()> {
    let json = serde_json::to_vec_pretty(meta).map_err(|e| Error::Checkpoint {
        path: dir.join(IMPORTED_HOOKS),
        reason: e.to_string(),
    })?;
    write_atomic(&dir.join(IMPORTED_HOOKS), &json)
}

/// The names a native checkpoint at `dir` was imported with; `None` when it was not imported.
pub fn read_imported_hooks(dir: &Path) -> Result<Option<ExportMeta>> {
    let path = dir.join(IMPORTED_HOOKS);
    if !path.is_file() {
        return Ok(None);
    }
    crate::clt::checkpoint::read_json(&path).map(Some)
}

/// The parameters in raw (unnormalised) units, normalisation scalars folded in.
pub fn fold_norms(t: &Transcoder) -> Params {
    let cfg = &t.cfg;
    let (d, s) = (cfg.d_model, &t.norms);
    let mut p = t.params.clone();
    for l in 0..cfg.n_layers {
        p.w_enc[l].iter_mut().for_each(|v| *v *= s.input[l]);
        let rl = cfg.dec_row_len(l);
        for row in p.w_dec[l].chunks_exact_mut(rl) {
            for (j, slot) in row.chunks_exact_mut(d).enumerate() {
                let k = l + j;
                slot.iter_mut().for_each(|v| *v /= s.target[k]);
            }
        }
        p.b_dec[l].iter_mut().for_each(|v| *v /= s.target[l]);
        if cfg.skip {
            let f = s.input[l] / s.target[l];
            p.w_skip[l].iter_mut().for_each(|v| *v *= f);
        }
    }
    p
}

/// Writes `t` in circuit-tracer's format into `dir`.
pub fn export_circuit_tracer(t: &Transcoder, dir: &Path, meta: &ExportMeta) -> Result<()> {
    let cfg = &t.cfg;
    if !matches!(cfg.activation, Activation::JumpRelu) {
        return Err(Error::Unsupported(
            "circuit-tracer files hold JumpReLU or ReLU transcoders: convert a TopK/BatchTopK model first \
             (`clt convert-batchtopk`)"
                .into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let p = fold_norms(t);
    let (d, f) = (cfg.d_model, cfg.n_features);
    let thresholds: Vec<Vec<f32>> = p
        .log_theta
        .iter()
        .map(|l| l.iter().map(|v| v.exp()).collect())
        .collect();
    let kind = match cfg.decoder {
        DecoderKind::CrossLayer => "cross_layer_transcoder",
        DecoderKind::PerLayer => "transcoder_set",
    };
    for l in 0..cfg.n_layers {
        match cfg.decoder {
            DecoderKind::CrossLayer => {
                let mut enc = vec![
                    TensorOut {
                        name: format!("W_enc_{l}"),
                        shape: vec![f, d],
                        data: &p.w_enc[l],
                    },
                    TensorOut {
                        name: format!("b_enc_{l}"),
                        shape: vec![f],
                        data: &p.b_enc[l],
                    },
                    TensorOut {
                        name: format!("b_dec_{l}"),
                        shape: vec![d],
                        data: &p.b_dec[l],
                    },
                    TensorOut {
                        name: format!("threshold_{l}"),
                        shape: vec![f],
                        data: &thresholds[l],
                    },
                ];
                if cfg.skip {
                    enc.push(TensorOut {
                        name: format!("W_skip_{l}"),
                        shape: vec![d, d],
                        data: &p.w_skip[l],
                    });
                }
                write_tensors(&dir.join(format!("W_enc_{l}.safetensors")), &enc, None)?;
                let dec = [TensorOut {
                    name: format!("W_dec_{l}"),
                    shape: vec![f, cfg.n_layers - l, d],
                    data: &p.w_dec[l],
                }];
                write_tensors(&dir.join(format!("W_dec_{l}.safetensors")), &dec, None)?;
            }
            DecoderKind::PerLayer => {
                let mut ts = vec![
                    TensorOut {
                        name: "W_enc".into(),
                        shape: vec![f, d],
                        data: &p.w_enc[l],
                    },
                    TensorOut {
                        name: "W_dec".into(),
                        shape: vec![f, d],
                        data: &p.w_dec[l],
                    },
                    TensorOut {
                        name: "b_enc".into(),
                        shape: vec![f],
                        data: &p.b_enc[l],
                    },
                    TensorOut {
                        name: "b_dec".into(),
                        shape: vec![d],
                        data: &p.b_dec[l],
                    },
                    TensorOut {
                        name: "activation_function.threshold".into(),
                        shape: vec![f],
                        data: &thresholds[l],
                    },
                ];
                if cfg.skip {
                    ts.push(TensorOut {
                        name: "W_skip".into(),
                        shape: vec![d, d],
                        data: &p.w_skip[l],
                    });
                }
                write_tensors(&dir.join(format!("layer_{l}.safetensors")), &ts, None)?;
            }
        }
    }
    // circuit-tracer's loader requires a `scan` (the name its graphs carry); the model's name stands in.
    let mut yaml = format!(
        "model_kind: {kind}\nmodel_name: {0}\nscan: {0}\nfeature_input_hook: {1}\nfeature_output_hook: {2}\n",
        yaml_string(&meta.model_name),
        yaml_string(&meta.feature_input_hook),
        yaml_string(&meta.feature_output_hook)
    );
    if cfg.decoder == DecoderKind::PerLayer {
        yaml.push_str("transcoders:\n");
        for l in 0..cfg.n_layers {
            yaml.push_str(&format!("  - layer_{l}.safetensors\n"));
        }
    }
    write_atomic(&dir.join("config.yaml"), yaml.as_bytes())
}

/// A circuit-tracer `config.yaml` (circuit-tracer reads it with `yaml.safe_load`): its top-level scalar
/// values as text, and the items of its `transcoders:` list (other lists and mappings are not read).
pub(crate) struct YamlConfig {
    pairs: Vec<(String, String)>,
    /// The files of a transcoder set, as written.
    pub transcoders: Vec<String>,
}

impl YamlConfig {
    /// The value of `key` as text (`64` for an integer, `true` for a boolean); `None` when the key is
    /// absent or null.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// `s` as a YAML value that reads back as the string `s`: as written where it is a name (letters, digits,
/// `._-/`) that is a plain string both to YAML 1.2 and to PyYAML's YAML 1.1 (which circuit-tracer reads
/// with), else double-quoted (a JSON string is a valid YAML double-quoted scalar). So `7b`, `yes`, `null`,
/// `a: b` or `x # y` stay names.
fn yaml_string(s: &str) -> String {
    let reads_back = matches!(
        YamlLoader::load_from_str(&format!("k: {s}")).as_deref(),
        Ok([Yaml::Hash(m)]) if m.len() == 1
            && m.get(&Yaml::String("k".into())) == Some(&Yaml::String(s.into()))
    );
    // Plain only for names of letters, digits and `._-/` (PyYAML refuses some plain scalars YAML 1.2 takes),
    // starting with a letter or digit (so no sign or dot).
    let simple = s.starts_with(char::is_alphanumeric)
        && s.chars().all(|c| c.is_alphanumeric() || "._-/".contains(c));
    // YAML 1.1's booleans and nulls, and anything starting with a digit (1.1 also reads `1_000`, `0x1f`,
    // `1:30` as numbers).
    let yaml11 = matches!(
        s.to_ascii_lowercase().as_str(),
        "y" | "n" | "yes" | "no" | "on" | "off" | "true" | "false" | "null" | "~"
    ) || s.starts_with(|c: char| c.is_ascii_digit());
    if simple && reads_back && !yaml11 {
        s.to_string()
    } else {
        serde_json::Value::String(s.into()).to_string()
    }
}

/// A YAML scalar as text; `None` for null, lists and mappings.
fn yaml_scalar(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Reads the `config.yaml` at `path` (any YAML: quoting, comments, flow lists); a file that is not YAML, or
/// whose top level is not a mapping, or whose `transcoders:` is not a list of names, is an error naming it.
pub(crate) fn read_yaml(path: &Path) -> Result<YamlConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |offset: usize, reason: String| Error::Format {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    let docs = YamlLoader::load_from_str(&text).map_err(|e| {
        let m = e.marker();
        bad(
            m.index(),
            format!(
                "not YAML (line {}, column {}): {}",
                m.line(),
                m.col() + 1,
                e.info()
            ),
        )
    })?;
    let map = match docs.into_iter().next() {
        Some(Yaml::Hash(map)) => map,
        None | Some(Yaml::Null) => Default::default(),
        Some(other) => {
            return Err(bad(
                0,
                format!("the top level is not a mapping of keys to values: {other:?}"),
            ));
        }
    };
    let mut pairs = Vec::new();
    let mut transcoders = Vec::new();
    for (k, v) in &map {
        let Some(key) = yaml_scalar(k) else {
            continue;
        };
        if key == "transcoders" {
            let items = match v {
                Yaml::Array(items) => items.as_slice(),
                Yaml::Null => &[],
                _ => return Err(bad(0, format!("`transcoders` is not a list: {v:?}"))),
            };
            for (i, item) in items.iter().enumerate() {
                transcoders.push(yaml_scalar(item).ok_or_else(|| {
                    bad(
                        0,
                        format!("`transcoders` item {i} is not a file name: {item:?}"),
                    )
                })?);
            }
        } else if let Some(value) = yaml_scalar(v) {
            pairs.push((key, value));
        }
    }
    Ok(YamlConfig { pairs, transcoders })
}

/// Reads a circuit-tracer transcoder directory (no normalisation: scales of one). Layers are counted from the
/// files present; every tensor's shape is checked and a missing or misshapen one is named in the error.
pub fn import_circuit_tracer(dir: &Path) -> Result<Transcoder> {
    let yaml_path = dir.join("config.yaml");
    let yaml = read_yaml(&yaml_path)?;
    match yaml.get("model_kind").unwrap_or("") {
        "cross_layer_transcoder" => import_clt(dir),
        "transcoder_set" => import_plt(dir, &yaml),
        other => Err(Error::Format {
            path: yaml_path,
            offset: 0,
            reason: format!(
                "model_kind `{other}` is neither cross_layer_transcoder nor transcoder_set"
            ),
        }),
    }
}

fn count_layers(dir: &Path, prefix: &str) -> usize {
    (0..)
        .take_while(|i| dir.join(format!("{prefix}{i}.safetensors")).exists())
        .count()
}

fn import_clt(dir: &Path) -> Result<Transcoder> {
    let l_n = count_layers(dir, "W_enc_");
    if l_n == 0 {
        return Err(Error::Format {
            path: dir.join("W_enc_0.safetensors"),
            offset: 0,
            reason: "missing".into(),
        });
    }
    let mut first = TensorFile::read(&dir.join("W_enc_0.safetensors"))?;
    let shape = first
        .shape("W_enc_0")
        .map(|s| s.to_vec())
        .ok_or_else(|| Error::Tensor {
            path: first.path.clone(),
            tensor: "W_enc_0".into(),
            reason: "missing".into(),
        })?;
    if shape.len() != 2 {
        return Err(Error::Tensor {
            path: first.path.clone(),
            tensor: "W_enc_0".into(),
            reason: format!("shape {shape:?} is not [F, d]"),
        });
    }
    let (f, d) = (shape[0], shape[1]);
    let has_skip = first.has("W_skip_0");
    drop(first.take("W_enc_0", &[f, d])?);
    let cfg = CltConfig {
        n_layers: l_n,
        d_model: d,
        n_features: f,
        decoder: DecoderKind::CrossLayer,
        activation: Activation::JumpRelu,
        skip: has_skip,
    };
    cfg.validate()?;
    let mut p = Params::zeros(&cfg);
    for l in 0..l_n {
        let mut enc = TensorFile::read(&dir.join(format!("W_enc_{l}.safetensors")))?;
        p.w_enc[l] = enc.take(&format!("W_enc_{l}"), &[f, d])?;
        p.b_enc[l] = enc.take(&format!("b_enc_{l}"), &[f])?;
        p.b_dec[l] = enc.take(&format!("b_dec_{l}"), &[d])?;
        p.log_theta[l] = if enc.has(&format!("threshold_{l}")) {
            enc.take(&format!("threshold_{l}"), &[f])?
                .iter()
                .map(|t| t.ln())
                .collect()
        } else {
            vec![f32::NEG_INFINITY; f] // θ = 0: a ReLU transcoder
        };
        if has_skip {
            p.w_skip[l] = enc.take(&format!("W_skip_{l}"), &[d, d])?;
        }
        let mut dec = TensorFile::read(&dir.join(format!("W_dec_{l}.safetensors")))?;
        p.w_dec[l] = dec.take(&format!("W_dec_{l}"), &[f, l_n - l, d])?;
    }
    Ok(Transcoder {
        norms: NormScales::identity(l_n),
        cfg,
        params: p,
    })
}

fn import_plt(dir: &Path, config: &YamlConfig) -> Result<Transcoder> {
    use super::transcoder_set::{read_layer, resolve};
    // circuit-tracer's `activation` key: `relu` ignores any thresholds, `topk` (with `k`) selects the k
    // largest per token; absent, the files' thresholds (JumpReLU) or none (ReLU).
    let yaml = dir.join("config.yaml");
    let (activation, relu) = match config.get("activation").unwrap_or("") {
        "" | "jumprelu" => (Activation::JumpRelu, false),
        "relu" => (Activation::JumpRelu, true),
        "topk" => {
            let k = config
                .get("k")
                .and_then(|k| k.parse::<usize>().ok())
                .ok_or_else(|| Error::Format {
                    path: yaml.clone(),
                    offset: 0,
                    reason: "activation topk without a k".into(),
                })?;
            (Activation::TopK { k }, true)
        }
        other => {
            return Err(Error::Format {
                path: yaml,
                offset: 0,
                reason: format!("activation `{other}` is not jumprelu, relu or topk"),
            });
        }
    };
    let files: Vec<std::path::PathBuf> = if config.transcoders.is_empty() {
        (0..count_layers(dir, "layer_"))
            .map(|i| dir.join(format!("layer_{i}.safetensors")))
            .collect()
    } else {
        config
            .transcoders
            .iter()
            .map(|i| resolve(dir, i))
            .collect::<Result<_>>()?
    };
    if files.is_empty() {
        return Err(Error::Format {
            path: dir.join("layer_0.safetensors"),
            offset: 0,
            reason: "missing".into(),
        });
    }
    let mut set: Option<(CltConfig, Params)> = None;
    for (l, path) in files.iter().enumerate() {
        let layer = read_layer(path)?;
        let (f, d) = (layer.n_features, layer.d_model);
        let (cfg, p) = set.get_or_insert_with(|| {
            let cfg = CltConfig {
                n_layers: files.len(),
                d_model: d,
                n_features: f,
                decoder: DecoderKind::PerLayer,
                activation,
                skip: layer.w_skip.is_some(),
            };
            let p = Params::zeros(&cfg);
            (cfg, p)
        });
        if l == 0 {
            cfg.validate()?;
        }
        if (f, d, layer.w_skip.is_some()) != (cfg.n_features, cfg.d_model, cfg.skip) {
            return Err(Error::Tensor {
                path: path.clone(),
                tensor: "W_enc".into(),
                reason: format!(
                    "layer {l} has {f} features of width {d} (skip: {}), layer 0 {} of width {} (skip: {})",
                    layer.w_skip.is_some(),
                    cfg.n_features,
                    cfg.d_model,
                    cfg.skip
                ),
            });
        }
        p.w_enc[l] = layer.w_enc;
        p.w_dec[l] = layer.w_dec;
        p.b_enc[l] = layer.b_enc;
        p.b_dec[l] = layer.b_dec;
        p.log_theta[l] = match layer.threshold {
            Some(t) if !relu => t.iter().map(|v| v.ln()).collect(),
            _ => vec![f32::NEG_INFINITY; f],
        };
        if let Some(w) = layer.w_skip {
            p.w_skip[l] = w;
        }
    }
    let (cfg, params) = set.expect("at least one layer");
    Ok(Transcoder {
        norms: NormScales::identity(cfg.n_layers),
        cfg,
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<YamlConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, text).unwrap();
        read_yaml(&path)
    }

    /// circuit-tracer's own layout, and what a person editing it may write: quotes, comments, a flow list,
    /// numbers, nested mappings (not read), a document marker.
    #[test]
    fn configs_read_as_yaml() {
        let c = read(
            "---\nmodel_name: \"google/gemma-2-2b\"  # the base model\nmodel_kind: transcoder_set\n\
             feature_input_hook: 'ln2.hook_normalized'\nactivation: topk\nk: 64\n\
             extra:\n  nested: 1\ntranscoders:\n  - \"hf://org/repo/layer_0/params.npz\"\n  # a comment\n\
             \x20 - layer_1.safetensors\n",
        )
        .unwrap();
        assert_eq!(c.get("model_name"), Some("google/gemma-2-2b"));
        assert_eq!(c.get("model_kind"), Some("transcoder_set"));
        assert_eq!(c.get("feature_input_hook"), Some("ln2.hook_normalized"));
        assert_eq!(c.get("k"), Some("64"));
        assert_eq!(
            (c.get("extra"), c.get("nested"), c.get("absent")),
            (None, None, None)
        );
        assert_eq!(
            c.transcoders,
            ["hf://org/repo/layer_0/params.npz", "layer_1.safetensors"]
        );
        let flow = read("model_kind: transcoder_set\ntranscoders: [a.npz, 'b.npz']\n").unwrap();
        assert_eq!(flow.transcoders, ["a.npz", "b.npz"]);
        assert!(read("").unwrap().transcoders.is_empty());
        assert!(read("transcoders:\n").unwrap().transcoders.is_empty());
    }

    #[test]
    fn configs_that_are_not_yaml_or_not_a_mapping_are_named() {
        for (text, says) in [
            ("model_kind: [unclosed\n", "not YAML (line"),
            ("- a\n- b\n", "top level is not a mapping"),
            (
                "transcoders: layer_0.safetensors\n",
                "`transcoders` is not a list",
            ),
            (
                "transcoders:\n  - {a: 1}\n",
                "`transcoders` item 0 is not a file name",
            ),
        ] {
            let e = read(text).err().unwrap().to_string();
            assert!(
                e.contains("config.yaml") && e.contains(says),
                "{text:?}: {e}"
            );
        }
    }

    /// Every name written into an exported `config.yaml` reads back as itself; ordinary names are written
    /// plain.
    #[test]
    fn written_names_read_back_as_themselves() {
        for s in [
            "mlp.hook_in",
            "google/gemma-2-2b",
            "blocks.0.hook_mlp_out",
            "stories260K",
            "",
            "yes",
            "No",
            "null",
            "~",
            "7b",
            "1e3",
            "-1",
            ".5",
            "a: b",
            "x # y",
            "#tag",
            " padded ",
            "[list]",
            "{map}",
            "'quoted'",
            "\"dq\"",
            "back\\slash",
            "tab\there",
            "line\nbreak",
            "é ✓",
            "*alias",
            "&anchor",
            "!tag",
            "- dash",
            "?q",
            "%pct",
            "@at",
            "`tick",
            "|pipe",
            ">gt",
        ] {
            let c = read(&format!("k: {}\n", yaml_string(s))).unwrap();
            assert_eq!(c.get("k"), Some(s), "{s:?} written as {}", yaml_string(s));
        }
        for s in [
            "mlp.hook_in",
            "google/gemma-2-2b",
            "blocks.0.hook_mlp_out",
            "stories260K",
        ] {
            assert_eq!(yaml_string(s), s);
        }
    }
}

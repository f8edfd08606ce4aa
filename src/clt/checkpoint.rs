//! Files: atomic writes, safetensors tensors, and the native transcoder checkpoint.
//!
//! A native transcoder is a directory with `model.safetensors` (tensors named as in [`Params::named`]) and
//! `config.json` (format name and version, the [`CltConfig`], the normalisation scalars). Every file is written
//! to a temporary name in the same directory, synced, and renamed over its final name, so a crash leaves either
//! the old file or the new one, never a torn one.

use super::{CltConfig, NormScales, Params, Transcoder};
use crate::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The `format` value of a native checkpoint's `config.json`.
pub const FORMAT_NAME: &str = "clt-transcoder";
/// The current native format version.
pub const FORMAT_VERSION: u32 = 1;

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync of the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    file.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_dir(dir)
}

/// Syncs a directory so that renames inside it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
    d.sync_all().map_err(|e| Error::io(dir, e))
}

/// One tensor to write.
pub struct TensorOut<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

/// Writes f32 tensors to a safetensors file, atomically.
pub fn write_tensors(
    path: &Path,
    tensors: &[TensorOut<'_>],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let view = TensorView::new(Dtype::F32, t.shape.clone(), bytemuck::cast_slice(t.data))
                .map_err(|e| Error::Tensor {
                path: path.into(),
                tensor: t.name.clone(),
                reason: e.to_string(),
            })?;
            Ok((t.name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, metadata).map_err(|e| Error::Tensor {
        path: path.into(),
        tensor: String::new(),
        reason: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}

/// f32 tensors by name: `(shape, data)`.
pub type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// The f32 tensors of a safetensors file, read in full, by name.
pub struct TensorFile {
    pub path: PathBuf,
    tensors: Tensors,
}

impl TensorFile {
    /// Reads a safetensors file; every tensor must be f32, f16 or bf16 (converted to f32).
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Format {
            path: path.into(),
            offset: 0,
            reason: format!("not a valid safetensors file: {e}"),
        })?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data: Vec<f32> = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                other => {
                    return Err(Error::Tensor {
                        path: path.into(),
                        tensor: name,
                        reason: format!("unsupported dtype {other:?} (expected f32, f16 or bf16)"),
                    });
                }
            };
            tensors.insert(name, (view.shape().to_vec(), data));
        }
        Ok(TensorFile {
            path: path.into(),
            tensors,
        })
    }

    /// Tensors read elsewhere (a NumPy archive).
    pub fn from_tensors(path: &Path, tensors: Tensors) -> Self {
        TensorFile {
            path: path.into(),
            tensors,
        }
    }

    /// Whether a tensor is present.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(s, _)| s.as_slice())
    }

    /// Takes a tensor out, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (s, data) = self.tensors.remove(name).ok_or_else(|| Error::Tensor {
            path: self.path.clone(),
            tensor: name.into(),
            reason: "missing".into(),
        })?;
        if s != shape {
            return Err(Error::Tensor {
                path: self.path.clone(),
                tensor: name.into(),
                reason: format!("shape {s:?}, expected {shape:?}"),
            });
        }
        Ok(data)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ModelMeta {
    format: String,
    version: u32,
    model: CltConfig,
    norms: NormScales,
}

/// Reads tensors named as in [`Params::named`] (with an optional name prefix) from a file into `Params`.
/// Memory is sized by the file's tensors, never by `cfg` alone: a configuration that claims more layers
/// than the file holds is refused, naming the first tensor missing.
pub fn read_params(file: &mut TensorFile, cfg: &CltConfig, prefix: &str) -> Result<Params> {
    let l_n = cfg.n_layers;
    let last = format!("{prefix}W_enc.{}", l_n.saturating_sub(1));
    if l_n > file.tensors.len() || !file.has(&last) {
        return Err(Error::Tensor {
            path: file.path.clone(),
            tensor: last,
            reason: format!("missing (the configuration says {l_n} layers)"),
        });
    }
    let empty = |n: usize| vec![Vec::new(); n];
    let mut p = Params {
        w_enc: empty(l_n),
        b_enc: empty(l_n),
        log_theta: empty(l_n),
        w_dec: empty(l_n),
        b_dec: empty(l_n),
        w_skip: empty(if cfg.skip { l_n } else { 0 }),
    };
    let shapes: Vec<(String, Vec<usize>)> = p
        .named(cfg)
        .into_iter()
        .map(|n| (n.name, n.shape))
        .collect();
    for ((name, shape), t) in shapes.into_iter().zip(p.tensors_mut()) {
        *t = file.take(&format!("{prefix}{name}"), &shape)?;
    }
    Ok(p)
}

/// The tensors of `p`, named with a prefix, ready to write.
pub fn params_out<'a>(p: &'a Params, cfg: &CltConfig, prefix: &str) -> Vec<TensorOut<'a>> {
    p.named(cfg)
        .into_iter()
        .map(|n| TensorOut {
            name: format!("{prefix}{}", n.name),
            shape: n.shape,
            data: n.data,
        })
        .collect()
}

/// Reads a JSON file of ours (a manifest, a record kept beside a checkpoint); errors name the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: path.into(),
        reason: format!("bad JSON: {e}"),
    })
}

/// Saves a transcoder as a native checkpoint directory (created if needed).
pub fn save_transcoder(dir: &Path, t: &Transcoder) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_tensors(
        &dir.join("model.safetensors"),
        &params_out(&t.params, &t.cfg, ""),
        None,
    )?;
    let meta = ModelMeta {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        model: t.cfg.clone(),
        norms: t.norms.clone(),
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Checkpoint {
        path: dir.into(),
        reason: e.to_string(),
    })?;
    write_atomic(&dir.join("config.json"), &json)
}

/// Loads a native checkpoint directory.
pub fn load_transcoder(dir: &Path) -> Result<Transcoder> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let meta: ModelMeta = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: cfg_path.clone(),
        reason: format!("bad config.json: {e}"),
    })?;
    if meta.format != FORMAT_NAME || meta.version != FORMAT_VERSION {
        return Err(Error::Checkpoint {
            path: cfg_path,
            reason: format!(
                "format {} v{} is not {FORMAT_NAME} v{FORMAT_VERSION}",
                meta.format, meta.version
            ),
        });
    }
    meta.model.validate()?;
    let l_n = meta.model.n_layers;
    if meta.norms.input.len() != l_n || meta.norms.target.len() != l_n {
        return Err(Error::Checkpoint {
            path: cfg_path,
            reason: format!("norms must have {l_n} entries per side"),
        });
    }
    let mut file = TensorFile::read(&dir.join("model.safetensors"))?;
    let params = read_params(&mut file, &meta.model, "")?;
    Ok(Transcoder {
        cfg: meta.model,
        params,
        norms: meta.norms,
    })
}

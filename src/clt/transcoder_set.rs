//! The per-layer files of a circuit-tracer transcoder set (`model_kind: transcoder_set`), in the three
//! layouts circuit-tracer reads, each read into circuit-tracer's own names and shapes:
//! - its own `layer_{i}.safetensors`: `W_enc` `[F, d]`, `W_dec` `[F, d]`, `b_enc` `[F]`, `b_dec` `[d]`,
//!   `activation_function.threshold` `[F]` (absent: a ReLU transcoder), optional `W_skip` `[d, d]`;
//! - Gemma Scope's `params.npz` (a NumPy archive): `W_enc` `[d, F]` (transposed on reading),
//!   `W_dec` `[F, d]`, `b_enc`, `b_dec`, `threshold`;
//! - Gemma Scope 2's `params.safetensors`: `w_enc` `[d, F]` (transposed), `w_dec` `[F, d]`, `b_enc`,
//!   `b_dec`, `threshold`, optional `affine_skip_connection` `[d, d]` (transposed into `W_skip`).
//!
//! The config's `transcoders:` list names one file per layer: a path (relative to the set's directory, or
//! absolute) or an `hf://org/repo/path[?revision=…]` URI, which is read from `path` under the directory (the
//! engine does not download; fetch the files there).
//!
//! Tests: `tests/transcoder_set.rs`.

use super::checkpoint::{TensorFile, Tensors};
use crate::{Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// One layer's transcoder in circuit-tracer's names and shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerFile {
    pub path: PathBuf,
    pub n_features: usize,
    pub d_model: usize,
    /// `[F, d]`.
    pub w_enc: Vec<f32>,
    /// `[F, d]`.
    pub w_dec: Vec<f32>,
    pub b_enc: Vec<f32>,
    pub b_dec: Vec<f32>,
    /// The JumpReLU thresholds; `None` for a ReLU transcoder.
    pub threshold: Option<Vec<f32>>,
    /// `[d, d]`, applied as `x W_skipᵀ`.
    pub w_skip: Option<Vec<f32>>,
}

/// The file an entry of `transcoders:` names, under the set's directory `dir`.
pub fn resolve(dir: &Path, item: &str) -> Result<PathBuf> {
    let Some(uri) = item.strip_prefix("hf://") else {
        return Ok(dir.join(item));
    };
    let uri = uri.split_once('?').map_or(uri, |(p, _)| p);
    let mut parts = uri.splitn(3, '/');
    let (Some(_org), Some(_repo), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Error::Format {
            path: dir.join("config.yaml"),
            offset: 0,
            reason: format!("`{item}` is not an hf://org/repo/path URI"),
        });
    };
    let local = dir.join(path);
    if !local.is_file() {
        return Err(Error::Format {
            path: local.clone(),
            offset: 0,
            reason: format!(
                "`{item}` is read from {} (the engine does not download: fetch the file there)",
                local.display()
            ),
        });
    }
    Ok(local)
}

/// Reads one layer's file in any of the three layouts (by its extension and its tensors' names), checking
/// every shape.
pub fn read_layer(path: &Path) -> Result<LayerFile> {
    let npz = path.extension().is_some_and(|e| e == "npz");
    let mut t = if npz {
        TensorFile::from_tensors(path, read_npz(path)?)
    } else {
        TensorFile::read(path)?
    };
    // Gemma Scope (an archive) and Gemma Scope 2 (lowercase names) store the encoder transposed, [d, F].
    let (enc, dec, thr, transposed) = if npz {
        ("W_enc", "W_dec", "threshold", true)
    } else if t.has("w_enc") {
        ("w_enc", "w_dec", "threshold", true)
    } else {
        ("W_enc", "W_dec", "activation_function.threshold", false)
    };
    let (f, d) = match (t.shape("b_enc"), t.shape("b_dec")) {
        (Some(&[f]), Some(&[d])) => (f, d),
        (b_enc, b_dec) => {
            return Err(Error::Tensor {
                path: path.into(),
                tensor: "b_enc, b_dec".into(),
                reason: format!("missing or not vectors: shapes {b_enc:?}, {b_dec:?}"),
            });
        }
    };
    let w_enc = if transposed {
        transpose(&t.take(enc, &[d, f])?, d, f)
    } else {
        t.take(enc, &[f, d])?
    };
    let w_skip = if t.has("affine_skip_connection") {
        Some(transpose(&t.take("affine_skip_connection", &[d, d])?, d, d))
    } else if t.has("W_skip") {
        Some(t.take("W_skip", &[d, d])?)
    } else {
        None
    };
    Ok(LayerFile {
        path: path.into(),
        n_features: f,
        d_model: d,
        w_enc,
        w_dec: t.take(dec, &[f, d])?,
        b_enc: t.take("b_enc", &[f])?,
        b_dec: t.take("b_dec", &[d])?,
        // Gemma Scope's layouts are JumpReLU only (circuit-tracer's loaders require the threshold).
        threshold: if t.has(thr) || transposed {
            Some(t.take(thr, &[f])?)
        } else {
            None
        },
        w_skip,
    })
}

/// `[r, c]` row-major into `[c, r]`, in 64 × 64 tiles (a Gemma Scope encoder is 2304 × 16384 and more:
/// element by element, every write would land on another cache line).
fn transpose(a: &[f32], r: usize, c: usize) -> Vec<f32> {
    const T: usize = 64;
    let mut out = vec![0.0; a.len()];
    for i0 in (0..r).step_by(T) {
        for j0 in (0..c).step_by(T) {
            for i in i0..(i0 + T).min(r) {
                for j in j0..(j0 + T).min(c) {
                    out[j * r + i] = a[i * c + j];
                }
            }
        }
    }
    out
}

/// Every `.npy` member of a NumPy archive, by name without the extension, as f32 in C order.
pub fn read_npz(path: &Path) -> Result<Tensors> {
    let bad = |reason: String| Error::Format {
        path: path.into(),
        offset: 0,
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // No member can inflate to more than deflate's largest ratio (1032:1) of the whole archive.
    let most = file
        .metadata()
        .map_err(|e| Error::io(path, e))?
        .len()
        .saturating_mul(1032);
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(format!("not a NumPy archive (zip): {e}")))?;
    let mut out = Tensors::new();
    for i in 0..zip.len() {
        let mut member = zip
            .by_index(i)
            .map_err(|e| bad(format!("zip member {i}: {e}")))?;
        let Some(name) = member.name().strip_suffix(".npy").map(str::to_owned) else {
            continue;
        };
        // (The declared size is only a hint: a corrupt archive must not make us allocate it.)
        let mut bytes = Vec::with_capacity(member.size().min(most).min(1 << 32) as usize);
        member
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("member {name}.npy: {e}")))?;
        let array = parse_npy(&bytes).map_err(|(offset, reason)| Error::Format {
            path: path.into(),
            offset,
            reason: format!("member {name}.npy: {reason}"),
        })?;
        out.insert(name, array);
    }
    Ok(out)
}

/// A `.npy` file's shape and data (float16/32/64, either byte order, C or Fortran order) as f32 in C order;
/// errors carry the byte offset in the member.
fn parse_npy(b: &[u8]) -> std::result::Result<(Vec<usize>, Vec<f32>), (u64, String)> {
    let (
        crate::npy::Header {
            descr,
            fortran_order: fortran,
            shape,
        },
        end,
    ) = crate::npy::read(b)?;
    let hdr_err = |what: &str| {
        (
            end as u64,
            format!("{descr} array of shape {shape:?}: {what}"),
        )
    };
    let (big, kind) = match descr.as_bytes() {
        [b'<' | b'|' | b'=', rest @ ..] => (false, rest),
        [b'>', rest @ ..] => (true, rest),
        _ => return Err(hdr_err("bad descr")),
    };
    let size = match kind {
        b"f2" => 2,
        b"f4" => 4,
        b"f8" => 8,
        _ => {
            return Err(hdr_err(&format!(
                "dtype {descr} is not float16, float32 or float64"
            )));
        }
    };
    let want = shape
        .iter()
        .try_fold(size, |a: usize, &b| a.checked_mul(b))
        .ok_or_else(|| hdr_err("shape overflows"))?;
    let data = &b[end..];
    if data.len() != want {
        return Err((
            end as u64,
            format!(
                "{} data bytes for shape {shape:?} of {descr} ({want} expected): truncated or corrupt",
                data.len(),
            ),
        ));
    }
    let word = |c: &[u8]| -> f32 {
        let mut w = [0u8; 8];
        w[..size].copy_from_slice(c);
        if big {
            w[..size].reverse();
        }
        match size {
            2 => half::f16::from_le_bytes([w[0], w[1]]).to_f32(),
            4 => f32::from_le_bytes([w[0], w[1], w[2], w[3]]),
            _ => f64::from_le_bytes(w) as f32,
        }
    };
    let values: Vec<f32> = data.chunks_exact(size).map(word).collect();
    let values = match (fortran, shape.as_slice()) {
        (false, _) | (true, [] | [_]) => values,
        // Column-major [r, c] is row-major [c, r].
        (true, &[r, c]) => transpose(&values, c, r),
        (true, _) => {
            return Err(hdr_err(
                "Fortran order is supported for up to two dimensions",
            ));
        }
    };
    Ok((shape, values))
}

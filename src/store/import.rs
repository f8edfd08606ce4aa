//! Importers: activations written by Python tools, as `.npy` arrays or CLT-Forge safetensors splits.
//!
//! Both formats are read in chunks of tokens straight from the file (no whole-file load, no mapping), converted
//! to f32 and streamed into a [`DatasetWriter`]:
//! - `.npy` (format versions 1–3, C order): inputs and targets `[T, L, d]` as `<f4`, `<f2` (or `<f8`), token ids
//!   `[T]` as any little-endian integer type (optional);
//! - CLT-Forge splits: safetensors files holding `act_in` and `act_out` `[T, L, d]` (F32, F16 or BF16) and
//!   optionally `tokens` `[T]` (I64, I32, U32...); several files are appended in order.
//!
//! Positions and document ids are not in either format and are stored as 0.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::writer::{DatasetWriter, TokenIds};
use crate::data::ActDims;
use crate::{Error, Result};

/// Element types the importers understand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    Bf16,
    I64,
    I32,
    I16,
    U32,
    U16,
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::Bf16 | DType::I16 | DType::U16 => 2,
            DType::U8 => 1,
        }
    }

    fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::Bf16)
    }
}

/// An array stored contiguously (C order, little-endian) in a file.
#[derive(Clone, Debug)]
pub struct ArrayFile {
    pub path: PathBuf,
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte offset of the first element.
    pub offset: u64,
}

impl ArrayFile {
    fn tensor_err(&self, reason: impl Into<String>) -> Error {
        Error::Tensor {
            path: self.path.clone(),
            tensor: self.name.clone(),
            reason: reason.into(),
        }
    }

    fn read_bytes(
        &self,
        file: &mut File,
        first_elem: usize,
        n_elems: usize,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let sz = self.dtype.size();
        buf.resize(n_elems * sz, 0);
        file.seek(SeekFrom::Start(self.offset + (first_elem * sz) as u64))
            .and_then(|_| file.read_exact(buf))
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::Format {
                    path: self.path.clone(),
                    offset: self.offset + (first_elem * sz) as u64,
                    reason: format!(
                        "truncated: tensor `{}` ends past the end of the file",
                        self.name
                    ),
                },
                _ => Error::io(&self.path, e),
            })
    }

    /// Reads elements `first .. first + out.len()` as f32.
    pub fn read_f32(
        &self,
        file: &mut File,
        first: usize,
        out: &mut [f32],
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        if !self.dtype.is_float() {
            return Err(self.tensor_err(format!("dtype {:?} is not a float type", self.dtype)));
        }
        self.read_bytes(file, first, out.len(), buf)?;
        match self.dtype {
            DType::F32 => out
                .iter_mut()
                .zip(buf.chunks_exact(4))
                .for_each(|(o, b)| *o = f32::from_le_bytes(b.try_into().unwrap())),
            DType::F64 => out
                .iter_mut()
                .zip(buf.chunks_exact(8))
                .for_each(|(o, b)| *o = f64::from_le_bytes(b.try_into().unwrap()) as f32),
            DType::F16 => out
                .iter_mut()
                .zip(buf.chunks_exact(2))
                .for_each(|(o, b)| *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            _ => out
                .iter_mut()
                .zip(buf.chunks_exact(2))
                .for_each(|(o, b)| *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        }
        Ok(())
    }

    /// Reads elements `first .. first + out.len()` as token ids (integers in `0 ..= u32::MAX`).
    pub fn read_u32(
        &self,
        file: &mut File,
        first: usize,
        out: &mut [u32],
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        if self.dtype.is_float() {
            return Err(self.tensor_err("token ids must be integers"));
        }
        self.read_bytes(file, first, out.len(), buf)?;
        let sz = self.dtype.size();
        for (i, (o, b)) in out.iter_mut().zip(buf.chunks_exact(sz)).enumerate() {
            let v: i128 = match self.dtype {
                DType::I64 => i64::from_le_bytes(b.try_into().unwrap()) as i128,
                DType::I32 => i32::from_le_bytes(b.try_into().unwrap()) as i128,
                DType::I16 => i16::from_le_bytes(b.try_into().unwrap()) as i128,
                DType::U32 => u32::from_le_bytes(b.try_into().unwrap()) as i128,
                DType::U16 => u16::from_le_bytes(b.try_into().unwrap()) as i128,
                _ => b[0] as i128,
            };
            *o = u32::try_from(v).map_err(|_| {
                self.tensor_err(format!("token id {v} at index {} out of range", first + i))
            })?;
        }
        Ok(())
    }
}

fn fmt_err(path: &Path, offset: u64, reason: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// Parses the header of a `.npy` file.
pub fn open_npy(path: &Path) -> Result<ArrayFile> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let fault = |(offset, reason): crate::npy::Fault| fmt_err(path, offset, reason);
    let mut pre = [0u8; 12];
    f.read_exact(&mut pre[..10])
        .map_err(|_| fmt_err(path, 0, "truncated: no .npy preamble"))?;
    let n = crate::npy::preamble_len(pre[6]);
    f.read_exact(&mut pre[10..n])
        .map_err(|_| fmt_err(path, 10, "truncated preamble"))?;
    let (start, hlen) = crate::npy::preamble(&pre[..n]).map_err(fault)?;
    let mut h = vec![0u8; hlen];
    f.read_exact(&mut h)
        .map_err(|_| fmt_err(path, start as u64, "truncated header"))?;
    let header = crate::npy::parse_header(&h, start).map_err(fault)?;
    let bad = |why: &str| {
        fmt_err(
            path,
            start as u64,
            format!("{} array of shape {:?}: {why}", header.descr, header.shape),
        )
    };
    let dtype = match header.descr.as_str() {
        "<f8" => DType::F64,
        "<f4" => DType::F32,
        "<f2" => DType::F16,
        "<i8" => DType::I64,
        "<i4" => DType::I32,
        "<i2" => DType::I16,
        "<u4" => DType::U32,
        "<u2" => DType::U16,
        "|u1" | "<u1" => DType::U8,
        d => {
            return Err(bad(&format!(
                "dtype {d} is not supported (little-endian f2/f4/f8 or integers)"
            )));
        }
    };
    if header.fortran_order {
        return Err(bad("only C-order arrays are supported"));
    }
    let shape = header.shape;
    Ok(ArrayFile {
        path: path.to_path_buf(),
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        dtype,
        shape,
        offset: (start + hlen) as u64,
    })
}

/// Parses the header of a safetensors file and returns its tensors.
pub fn open_safetensors(path: &Path) -> Result<Vec<ArrayFile>> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let flen = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| fmt_err(path, 0, "truncated: no safetensors header length"))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > flen {
        return Err(fmt_err(
            path,
            0,
            format!("header length {n} is invalid for a {flen}-byte file"),
        ));
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h).map_err(|e| Error::io(path, e))?;
    let h: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&h).map_err(|e| fmt_err(path, 8, format!("header JSON: {e}")))?;
    let mut out = Vec::new();
    for (name, t) in h {
        if name == "__metadata__" {
            continue;
        }
        let bad = |why: String| Error::Tensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            reason: why,
        };
        let dtype = match t.get("dtype").and_then(|d| d.as_str()) {
            Some("F64") => DType::F64,
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::Bf16,
            Some("I64") => DType::I64,
            Some("I32") => DType::I32,
            Some("I16") => DType::I16,
            Some("U32") => DType::U32,
            Some("U16") => DType::U16,
            Some("U8") => DType::U8,
            d => return Err(bad(format!("dtype {d:?} is not supported"))),
        };
        let shape: Vec<usize> = t
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|v| v.as_u64().map(|v| v as usize)).collect())
            .ok_or_else(|| bad("bad shape".into()))?;
        let offs: Vec<u64> = t
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|v| v.as_u64()).collect())
            .ok_or_else(|| bad("bad data_offsets".into()))?;
        let elems = shape
            .iter()
            .try_fold(1usize, |a, &s| a.checked_mul(s))
            .ok_or_else(|| bad("shape overflows".into()))?;
        if offs.len() != 2
            || offs[1] < offs[0]
            || offs[1] - offs[0] != (elems * dtype.size()) as u64
            || 8 + n + offs[1] > flen
        {
            return Err(bad(format!(
                "data_offsets {offs:?} disagree with shape {shape:?} or the file size"
            )));
        }
        out.push(ArrayFile {
            path: path.to_path_buf(),
            name,
            dtype,
            shape,
            offset: 8 + n + offs[0],
        });
    }
    Ok(out)
}

/// One source of tokens: inputs, targets and optional token ids.
pub struct ImportSource {
    pub x: ArrayFile,
    pub y: ArrayFile,
    pub tokens: Option<ArrayFile>,
}

impl ImportSource {
    /// Reads `.npy` files.
    pub fn npy(x: &Path, y: &Path, tokens: Option<&Path>) -> Result<Self> {
        Ok(ImportSource {
            x: open_npy(x)?,
            y: open_npy(y)?,
            tokens: tokens.map(open_npy).transpose()?,
        })
    }

    /// Reads a CLT-Forge split (`act_in`, `act_out`, optional `tokens`).
    pub fn clt_forge(path: &Path) -> Result<Self> {
        let mut ts = open_safetensors(path)?;
        let mut take = |n: &str| {
            ts.iter()
                .position(|t| t.name == n)
                .map(|i| ts.swap_remove(i))
        };
        let missing = |n: &str| Error::Tensor {
            path: path.to_path_buf(),
            tensor: n.into(),
            reason: "missing".into(),
        };
        Ok(ImportSource {
            x: take("act_in").ok_or_else(|| missing("act_in"))?,
            y: take("act_out").ok_or_else(|| missing("act_out"))?,
            tokens: take("tokens"),
        })
    }

    /// The dims and token count, checking the arrays agree.
    pub fn dims(&self) -> Result<(ActDims, usize)> {
        let s = &self.x.shape;
        if s.len() != 3 || self.y.shape != *s || s.contains(&0) {
            return Err(Error::Shape {
                what: format!(
                    "inputs {} and targets {} ([T, L, d])",
                    self.x.name, self.y.name
                ),
                expected: s.clone(),
                got: self.y.shape.clone(),
            });
        }
        if let Some(t) = &self.tokens
            && t.shape.iter().product::<usize>() != s[0]
        {
            return Err(Error::Shape {
                what: format!("token ids {}", t.name),
                expected: vec![s[0]],
                got: t.shape.clone(),
            });
        }
        Ok((
            ActDims {
                n_layers: s[1],
                d_model: s[2],
            },
            s[0],
        ))
    }

    /// Streams all tokens into `w` in chunks of `chunk` tokens; returns the number of tokens.
    pub fn copy_into(&self, w: &mut DatasetWriter, dims: ActDims, chunk: usize) -> Result<usize> {
        let (d, t) = self.dims()?;
        if d != dims {
            return Err(Error::Shape {
                what: format!("{} compared with the first source", self.x.path.display()),
                expected: vec![dims.n_layers, dims.d_model],
                got: vec![d.n_layers, d.d_model],
            });
        }
        let row = d.n_layers * d.d_model;
        let open = |a: &ArrayFile| File::open(&a.path).map_err(|e| Error::io(&a.path, e));
        let (mut fx, mut fy) = (open(&self.x)?, open(&self.y)?);
        let mut ft = self.tokens.as_ref().map(open).transpose()?;
        let mut buf = Vec::new();
        let (mut x, mut y, mut tok) = (Vec::new(), Vec::new(), Vec::new());
        let zeros32 = vec![0u32; chunk];
        let zeros64 = vec![0u64; chunk];
        let mut s = 0;
        while s < t {
            let n = chunk.min(t - s);
            x.resize(n * row, 0.0);
            y.resize(n * row, 0.0);
            self.x.read_f32(&mut fx, s * row, &mut x, &mut buf)?;
            self.y.read_f32(&mut fy, s * row, &mut y, &mut buf)?;
            let ids = match (&self.tokens, ft.as_mut()) {
                (Some(a), Some(f)) => {
                    tok.resize(n, 0);
                    a.read_u32(f, s, &mut tok, &mut buf)?;
                    Some(TokenIds {
                        tokens: &tok,
                        positions: &zeros32[..n],
                        doc_ids: &zeros64[..n],
                    })
                }
                _ => None,
            };
            w.push(&x, &y, ids)?;
            s += n;
        }
        Ok(t)
    }
}

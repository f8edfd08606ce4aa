//! The features file: one compressed JSON record per feature and an index, so that a reader fetches one
//! feature's dashboard without loading the whole file.
//!
//! Layout (little-endian; `docs/viewer.md` is the normative description):
//!
//! ```text
//! offset        size          content
//! 0             32            header: magic "CLTFEATS", u32 version (1), u32 n_layers, u32 n_features,
//!                             u32 meta_len, u64 index_offset
//! 32            Σ len         records: one zstd frame of a FeatureRecord's JSON each
//! index_offset  24 · L · F    index, (layer, feature) in row-major order: u64 offset, u64 len, u64 xxh3-64
//!                             of the frame
//! …             meta_len      metadata JSON (FeaturesMeta)
//! ```
//!
//! The file length must equal `index_offset + 24 · L · F + meta_len`. Readers check the header and every index
//! entry when opening, and a record's checksum when reading it; a truncated or damaged file is an
//! [`Error::Format`] or [`Error::Corrupt`] naming the file and the byte offset.

use super::record::FeatureRecord;
use crate::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::xxh3_64;

/// The file's magic bytes.
pub const MAGIC: &[u8; 8] = b"CLTFEATS";
/// The layout version this module reads and writes.
pub const VERSION: u32 = 1;
/// Header size in bytes.
pub const HEADER_LEN: u64 = 32;
/// Index entry size in bytes.
pub const ENTRY_LEN: u64 = 24;
/// The largest record or metadata a reader accepts (decompressed), against corrupt sizes.
const MAX_RECORD: usize = 256 << 20;

/// What the features were computed from (stored after the index).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FeaturesMeta {
    /// The scan / transcoder name records carry as `transcoder_id`.
    pub scan: String,
    pub transcoder: String,
    pub store: String,
    #[serde(default)]
    pub model: Option<String>,
    pub n_layers: usize,
    pub n_features: usize,
    /// Tokens analysed.
    pub n_tokens: u64,
    /// Which decoder slot the logit effects use ("own layer" or "last layer").
    #[serde(default)]
    pub logit_slot: String,
}

/// Writes a features file: records in any order, then [`finish`](Self::finish).
pub struct FeatureFileWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    pos: u64,
    index: Vec<[u64; 3]>,
    meta: FeaturesMeta,
    encoder: RecordEncoder,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

impl FeatureFileWriter {
    /// Starts `path` (written as `path.tmp`, renamed into place by `finish`).
    pub fn create(path: impl AsRef<Path>, meta: FeaturesMeta) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let mut out = BufWriter::new(file);
        out.write_all(&[0u8; HEADER_LEN as usize])
            .map_err(io(&tmp))?;
        Ok(FeatureFileWriter {
            index: vec![[0; 3]; meta.n_layers * meta.n_features],
            path,
            tmp,
            out,
            pos: HEADER_LEN,
            meta,
            encoder: RecordEncoder::new()?,
        })
    }

    /// Stores the record of feature `f` of layer `l` (its layer and feature fields are not consulted).
    pub fn write(&mut self, l: usize, f: usize, rec: &FeatureRecord) -> Result<()> {
        let frame = self.encoder.encode(rec)?;
        self.write_frame(l, f, &frame)
    }

    /// Stores a record already encoded by a [`RecordEncoder`] (so that callers can encode in parallel).
    pub fn write_frame(&mut self, l: usize, f: usize, frame: &[u8]) -> Result<()> {
        let (l_n, f_n) = (self.meta.n_layers, self.meta.n_features);
        if l >= l_n || f >= f_n {
            return Err(Error::InvalidData {
                what: "features file".into(),
                reason: format!("feature ({l}, {f}) outside {l_n} layers × {f_n} features"),
            });
        }
        self.out.write_all(frame).map_err(io(&self.tmp))?;
        self.index[l * f_n + f] = [self.pos, frame.len() as u64, xxh3_64(frame)];
        self.pos += frame.len() as u64;
        Ok(())
    }

    /// Writes the index, the metadata and the header, and renames the file into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        let index_offset = self.pos;
        for e in &self.index {
            for v in e {
                self.out
                    .write_all(&v.to_le_bytes())
                    .map_err(io(&self.tmp))?;
            }
        }
        let meta = serde_json::to_vec(&self.meta).map_err(|e| Error::InvalidData {
            what: "features metadata".into(),
            reason: e.to_string(),
        })?;
        self.out.write_all(&meta).map_err(io(&self.tmp))?;
        let mut h = Vec::with_capacity(HEADER_LEN as usize);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&(self.meta.n_layers as u32).to_le_bytes());
        h.extend_from_slice(&(self.meta.n_features as u32).to_le_bytes());
        h.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        h.extend_from_slice(&index_offset.to_le_bytes());
        let mut file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io(&self.tmp))?;
        file.write_all(&h).map_err(io(&self.tmp))?;
        file.sync_all().map_err(io(&self.tmp))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(io(&self.path))?;
        Ok(self.path)
    }
}

/// Encodes records as stored: one zstd frame of the JSON each. Holds a compression context (megabytes of
/// tables), so reuse one per thread rather than one per record.
pub struct RecordEncoder(zstd::bulk::Compressor<'static>);

impl RecordEncoder {
    pub fn new() -> Result<Self> {
        zstd::bulk::Compressor::new(3)
            .map(RecordEncoder)
            .map_err(|e| Error::Unsupported(format!("zstd compressor: {e}")))
    }

    /// The stored bytes of `rec`.
    pub fn encode(&mut self, rec: &FeatureRecord) -> Result<Vec<u8>> {
        let bad = |reason: String| Error::InvalidData {
            what: "feature record".into(),
            reason,
        };
        let json = serde_json::to_vec(rec).map_err(|e| bad(e.to_string()))?;
        self.0
            .compress(&json)
            .map_err(|e| bad(format!("zstd: {e}")))
    }
}

/// An open features file: header, index and metadata in memory, records read on demand.
#[derive(Debug)]
pub struct FeatureFile {
    path: PathBuf,
    file: File,
    n_layers: usize,
    n_features: usize,
    index: Vec<[u64; 3]>,
    meta: FeaturesMeta,
}

impl FeatureFile {
    /// Opens and checks `path`: header, the index (every record inside the record area) and the metadata.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(io(&path))?;
        let len = file.metadata().map_err(io(&path))?.len();
        let fmt = |offset: u64, reason: String| Error::Format {
            path: path.clone(),
            offset,
            reason,
        };
        if len < HEADER_LEN {
            return Err(fmt(
                len,
                format!("truncated: {len} bytes, the header alone needs {HEADER_LEN}"),
            ));
        }
        let h = read_at(&file, &path, 0, HEADER_LEN as usize)?;
        if &h[..8] != MAGIC {
            return Err(fmt(0, "not a features file (bad magic)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let version = u32_at(8);
        if version != VERSION {
            return Err(fmt(8, format!("version {version} is not supported")));
        }
        let (n_layers, n_features) = (u32_at(12) as usize, u32_at(16) as usize);
        let meta_len = u32_at(20) as u64;
        let index_offset = u64::from_le_bytes(h[24..32].try_into().unwrap_or_default());
        let n = n_layers as u64 * n_features as u64;
        let index_len = n
            .checked_mul(ENTRY_LEN)
            .ok_or_else(|| fmt(12, "dims overflow".into()))?;
        let expected = index_offset
            .checked_add(index_len)
            .and_then(|v| v.checked_add(meta_len))
            .ok_or_else(|| fmt(24, "index offset overflows".into()))?;
        if index_offset < HEADER_LEN || expected != len {
            let at = if len < expected { len } else { 24 };
            return Err(fmt(
                at,
                format!(
                    "truncated or damaged: the header says {expected} bytes (index at {index_offset}, {n} entries, \
                     {meta_len} bytes of metadata), the file has {len}"
                ),
            ));
        }
        let raw = read_at(&file, &path, index_offset, index_len as usize)?;
        let mut index = Vec::with_capacity(n as usize);
        for (i, e) in raw.chunks_exact(ENTRY_LEN as usize).enumerate() {
            let v =
                |k: usize| u64::from_le_bytes(e[k * 8..k * 8 + 8].try_into().unwrap_or_default());
            let (off, rlen) = (v(0), v(1));
            if off < HEADER_LEN || off.saturating_add(rlen) > index_offset {
                return Err(fmt(
                    index_offset + i as u64 * ENTRY_LEN,
                    format!(
                        "index entry {i} points to bytes {off}..+{rlen}, outside the record area"
                    ),
                ));
            }
            index.push([off, rlen, v(2)]);
        }
        let mbytes = read_at(&file, &path, index_offset + index_len, meta_len as usize)?;
        let meta: FeaturesMeta = serde_json::from_slice(&mbytes)
            .map_err(|e| fmt(index_offset + index_len, format!("bad metadata JSON: {e}")))?;
        Ok(FeatureFile {
            path,
            file,
            n_layers,
            n_features,
            index,
            meta,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    pub fn n_features(&self) -> usize {
        self.n_features
    }

    pub fn meta(&self) -> &FeaturesMeta {
        &self.meta
    }

    /// The JSON text of feature `f` of layer `l`, checksummed and decompressed.
    pub fn json(&self, l: usize, f: usize) -> Result<Vec<u8>> {
        if l >= self.n_layers || f >= self.n_features {
            return Err(Error::InvalidData {
                what: format!("feature ({l}, {f})"),
                reason: format!(
                    "{} has {} layers × {} features",
                    self.path.display(),
                    self.n_layers,
                    self.n_features
                ),
            });
        }
        let i = l * self.n_features + f;
        let [off, len, sum] = self.index[i];
        let frame = read_at(&self.file, &self.path, off, len as usize)?;
        let corrupt = |reason: String| Error::Corrupt {
            path: self.path.clone(),
            block: i as u64,
            offset: off,
            reason,
        };
        if xxh3_64(&frame) != sum {
            return Err(corrupt(format!(
                "record of feature ({l}, {f}) fails its checksum"
            )));
        }
        zstd::bulk::decompress(&frame, MAX_RECORD).map_err(|e| corrupt(format!("zstd: {e}")))
    }

    /// The record of feature `f` of layer `l`.
    pub fn get(&self, l: usize, f: usize) -> Result<FeatureRecord> {
        let json = self.json(l, f)?;
        serde_json::from_slice(&json).map_err(|e| Error::Corrupt {
            path: self.path.clone(),
            block: (l * self.n_features + f) as u64,
            offset: self.index[l * self.n_features + f][0],
            reason: format!("bad record JSON: {e}"),
        })
    }
}

fn read_at(file: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    read_exact_at(file, &mut buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Format {
                path: path.to_path_buf(),
                offset,
                reason: format!("truncated: {len} bytes expected at byte {offset}"),
            }
        } else {
            Error::io(path, e)
        }
    })?;
    Ok(buf)
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(not(unix))]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    // Positioned reads without a shared cursor need the Unix API; elsewhere clone the handle and seek.
    use std::io::Read;
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::record::{Example, ExamplesQuantile};

    fn rec(l: usize, f: usize) -> FeatureRecord {
        FeatureRecord {
            transcoder_id: "t".into(),
            index: crate::features::record::cantor(l as u64, f as u64),
            layer: l as u32,
            feature: f as u32,
            examples_quantiles: vec![ExamplesQuantile {
                quantile_name: "Top activations".into(),
                examples: vec![Example {
                    tokens: vec!["a".into(), format!("f{f}")],
                    tokens_acts_list: vec![0.0, l as f32 + 1.0],
                    train_token_ind: 1,
                    ..Example::default()
                }],
            }],
            act_max: l as f32 + 1.0,
            ..FeatureRecord::default()
        }
    }

    fn write(path: &Path, l_n: usize, f_n: usize) {
        let meta = FeaturesMeta {
            scan: "t".into(),
            n_layers: l_n,
            n_features: f_n,
            ..FeaturesMeta::default()
        };
        let mut w = FeatureFileWriter::create(path, meta).unwrap();
        // Out of order on purpose: the index, not the order, finds records.
        for f in (0..f_n).rev() {
            for l in 0..l_n {
                w.write(l, f, &rec(l, f)).unwrap();
            }
        }
        w.finish().unwrap();
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("features.cltf");
        write(&path, 3, 5);
        let file = FeatureFile::open(&path).unwrap();
        assert_eq!((file.n_layers(), file.n_features()), (3, 5));
        assert_eq!(file.meta().scan, "t");
        for l in 0..3 {
            for f in 0..5 {
                assert_eq!(file.get(l, f).unwrap(), rec(l, f));
            }
        }
        assert!(file.get(3, 0).is_err());
        assert!(file.get(0, 5).is_err());
    }

    #[test]
    fn truncated_file_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("features.cltf");
        write(&path, 2, 4);
        let bytes = std::fs::read(&path).unwrap();
        for cut in [10, 40, bytes.len() - 3] {
            let p = dir.path().join(format!("cut{cut}.cltf"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let err = FeatureFile::open(&p).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&format!("cut{cut}.cltf")), "{msg}");
            assert!(msg.contains("truncated"), "{msg}");
            match err {
                Error::Format { offset, .. } => assert_eq!(offset, cut as u64, "{msg}"),
                other => panic!("expected a format error, got {other:?}"),
            }
        }
    }

    #[test]
    fn damaged_record_and_magic_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("features.cltf");
        write(&path, 2, 2);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN as usize + 2] ^= 0xff;
        let p = dir.path().join("flip.cltf");
        std::fs::write(&p, &bytes).unwrap();
        let file = FeatureFile::open(&p).unwrap();
        let errs: Vec<_> = (0..2)
            .flat_map(|l| (0..2).map(move |f| (l, f)))
            .filter_map(|(l, f)| file.get(l, f).err())
            .collect();
        assert_eq!(errs.len(), 1);
        assert!(matches!(errs[0], Error::Corrupt { .. }), "{:?}", errs[0]);
        bytes[0] = b'X';
        std::fs::write(&p, &bytes).unwrap();
        let msg = FeatureFile::open(&p).unwrap_err().to_string();
        assert!(msg.contains("magic"), "{msg}");
    }
}

//! Writing shards and datasets: streaming, blocks encoded and zstd-compressed in parallel, crash-safe.
//!
//! A [`ShardWriter`] accepts tokens in any amounts, cuts them into blocks of `block_tokens`, and encodes and
//! compresses a batch of blocks at a time on a rayon pool, writing the frames in order. The shard is written under a
//! temporary name (`NAME.tmp`), its header is patched in last, and the file is fsynced and renamed (and the directory
//! fsynced), so a crash never leaves a file under the final name that reads as valid. A [`DatasetWriter`] rolls over
//! to a new shard every `shard_tokens` tokens and writes the dataset's `manifest.json` the same way.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use super::codec::{Codec, check_finite};
use super::format::{
    BlockEntry, BlockLayout, Header, INDEX_ENTRY_LEN, NormHints, PREFIX_LEN, ShardMeta, VERSION,
    header_checksum,
};
use super::manifest::{MANIFEST_FILE, Manifest, ShardRecord};
use super::{int8e, predict};
use crate::data::ActDims;
use crate::{Error, Result};

/// How shards are encoded.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WriterConfig {
    pub codec: Codec,
    /// Split 16-bit codes into byte planes before zstd (ignored for other codecs).
    pub byte_planes: bool,
    /// Tokens per block (the unit of random access and of shuffling).
    pub block_tokens: usize,
    /// zstd compression level (1..=22; 3 is zstd's default).
    pub zstd_level: i32,
    /// Threads compressing blocks in parallel (0: rayon's global pool).
    pub threads: usize,
    /// Outlier dimensions per layer kept in bf16 by the int8o codec (1 ≤ k < d_model; ignored by other codecs).
    #[serde(default = "default_outliers")]
    pub outlier_dims: usize,
    /// Error target ε of the int8, int8p and int8e codecs (`None`: int8's absmax step per row; int8e:
    /// [`int8e::DEFAULT_EPS`]). With ε, each row's step is at least `Δ_l = √(12 · ε · E_l)`, `E_l` the block's
    /// mean square of that layer and stream, so each layer's relative error ‖v − v̂‖²/‖v‖² is about ε or less
    /// ([`super::codec::target_steps`]); for int8 and int8p only the encoder uses it (the rows' steps are stored
    /// as always). int8e codes every value at exactly `Δ_l` (stored per block), so its error is about ε per layer.
    #[serde(default)]
    pub target_rel_err: Option<f64>,
}

impl WriterConfig {
    /// The error target the encoder uses: `target_rel_err`, or int8e's default for int8e.
    pub fn effective_target(&self) -> Option<f64> {
        match (self.codec, self.target_rel_err) {
            (Codec::Int8e, None) => Some(int8e::DEFAULT_EPS),
            (_, t) => t,
        }
    }
}

fn default_outliers() -> usize {
    8
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            codec: Codec::Int8,
            byte_planes: true,
            block_tokens: 256,
            zstd_level: 3,
            threads: 0,
            outlier_dims: default_outliers(),
            target_rel_err: None,
        }
    }
}

/// Token ids, positions in their document and document ids, one per token (optional when writing).
#[derive(Clone, Copy, Debug)]
pub struct TokenIds<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    pub doc_ids: &'a [u64],
}

/// A compressed block: frame, raw length, raw xxh3, tokens.
type EncodedBlock = (Vec<u8>, u64, u64, u32);

/// What a finished shard holds (the manifest's record of it).
pub type ShardInfo = ShardRecord;

/// Streams tokens into one shard file.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    cfg: WriterConfig,
    dims: ActDims,
    meta: ShardMeta,
    pool: Option<rayon::ThreadPool>,
    px: Vec<f32>,
    py: Vec<f32>,
    pids: Vec<(u32, u32, u64)>,
    blocks: Vec<BlockEntry>,
    offset: u64,
    n_tokens: u64,
    sums: [Vec<f64>; 4],
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn validate_cfg(cfg: &WriterConfig, dims: ActDims) -> Result<()> {
    if cfg.block_tokens == 0 {
        return Err(Error::config("store.block_tokens", "must be positive"));
    }
    if !(1..=22).contains(&cfg.zstd_level) {
        return Err(Error::config(
            "store.zstd_level",
            format!("{} is outside 1..=22", cfg.zstd_level),
        ));
    }
    if cfg.codec == Codec::Int8o
        && (cfg.outlier_dims == 0 || cfg.outlier_dims >= dims.d_model || dims.d_model > 1 << 16)
    {
        return Err(Error::config(
            "store.outlier_dims",
            format!(
                "int8o needs 1 <= outlier_dims ({}) < d_model ({}) <= 65536",
                cfg.outlier_dims, dims.d_model
            ),
        ));
    }
    if let Some(eps) = cfg.target_rel_err
        && !(matches!(cfg.codec, Codec::Int8 | Codec::Int8p | Codec::Int8e)
            && eps > 0.0
            && eps < 1.0)
    {
        return Err(Error::config(
            "store.target_rel_err",
            format!(
                "{eps} with codec {}: an error target needs int8, int8p or int8e and 0 < ε < 1",
                cfg.codec.name()
            ),
        ));
    }
    if dims.n_layers == 0 || dims.d_model == 0 {
        return Err(Error::config(
            "store.dims",
            "n_layers and d_model must be positive",
        ));
    }
    let raw = BlockLayout::new(
        cfg.codec,
        cfg.byte_planes,
        cfg.outlier_dims,
        dims.n_layers,
        dims.d_model,
        cfg.block_tokens,
    )
    .checked_raw_len();
    if raw.is_none_or(|r| r as u64 > super::format::MAX_BLOCK_RAW)
        || dims.n_layers > u32::MAX as usize
        || dims.d_model > u32::MAX as usize
    {
        return Err(Error::config(
            "store.block_tokens",
            "a block would exceed 2 GiB; use fewer tokens per block",
        ));
    }
    Ok(())
}

impl ShardWriter {
    /// Starts writing the shard `path` (through `path.tmp`).
    pub fn create(
        path: impl AsRef<Path>,
        dims: ActDims,
        cfg: WriterConfig,
        meta: ShardMeta,
    ) -> Result<Self> {
        validate_cfg(&cfg, dims)?;
        let path = path.as_ref().to_path_buf();
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let f = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut file = BufWriter::with_capacity(1 << 20, f);
        file.write_all(&[0u8; PREFIX_LEN]).map_err(io_err(&tmp))?;
        let pool = if cfg.threads > 0 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(cfg.threads)
                    .build()
                    .map_err(|e| Error::config("store.threads", e.to_string()))?,
            )
        } else {
            None
        };
        let l = dims.n_layers;
        Ok(ShardWriter {
            path,
            tmp,
            file: Some(file),
            cfg,
            dims,
            meta,
            pool,
            px: Vec::new(),
            py: Vec::new(),
            pids: Vec::new(),
            blocks: Vec::new(),
            offset: PREFIX_LEN as u64,
            n_tokens: 0,
            sums: [vec![0.0; l], vec![0.0; l], vec![0.0; l], vec![0.0; l]],
        })
    }

    fn outliers(&self) -> u16 {
        if self.cfg.codec == Codec::Int8o {
            self.cfg.outlier_dims as u16
        } else {
            0
        }
    }

    /// Tokens accepted so far.
    pub fn n_tokens(&self) -> u64 {
        self.n_tokens + (self.pids.len() as u64)
    }

    /// Appends `n = x.len() / (L d)` tokens: inputs `x` and targets `y` token-major `[n][L][d]`, all finite.
    pub fn push(&mut self, x: &[f32], y: &[f32], ids: Option<TokenIds<'_>>) -> Result<()> {
        let row = self.dims.n_layers * self.dims.d_model;
        let n = x.len() / row;
        if x.len() != n * row || y.len() != x.len() {
            return Err(Error::Shape {
                what: "tokens pushed to a shard (x, y)".into(),
                expected: vec![n, self.dims.n_layers, self.dims.d_model],
                got: vec![x.len(), y.len()],
            });
        }
        if let Some(ids) = ids
            && (ids.tokens.len() != n || ids.positions.len() != n || ids.doc_ids.len() != n)
        {
            return Err(Error::Shape {
                what: "token ids, positions, document ids".into(),
                expected: vec![n, n, n],
                got: vec![ids.tokens.len(), ids.positions.len(), ids.doc_ids.len()],
            });
        }
        check_finite("shard inputs x", x, self.dims.d_model)?;
        check_finite("shard targets y", y, self.dims.d_model)?;
        if self.cfg.codec == Codec::F16 {
            for (what, v) in [("shard inputs x", x), ("shard targets y", y)] {
                if let Some(i) = v.iter().position(|v| v.abs() > f32::from(half::f16::MAX)) {
                    return Err(Error::InvalidData {
                        what: what.into(),
                        reason: format!(
                            "value {} at index {i} is outside the f16 range; use bf16 or int8",
                            v[i]
                        ),
                    });
                }
            }
        }
        let d = self.dims.d_model;
        for (k, src) in [x, y].into_iter().enumerate() {
            for (i, r) in src.chunks_exact(d).enumerate() {
                let l = i % self.dims.n_layers;
                let (s, s2) = r.iter().fold((0.0f64, 0.0f64), |(a, b), &v| {
                    (a + v as f64, b + (v as f64) * (v as f64))
                });
                self.sums[2 * k][l] += s;
                self.sums[2 * k + 1][l] += s2;
            }
        }
        self.px.extend_from_slice(x);
        self.py.extend_from_slice(y);
        match ids {
            Some(ids) => self
                .pids
                .extend((0..n).map(|i| (ids.tokens[i], ids.positions[i], ids.doc_ids[i]))),
            None => self.pids.extend((0..n).map(|_| (0, 0, 0))),
        }
        let threads = self
            .pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads());
        let batch = self.cfg.block_tokens * (2 * threads).max(1);
        if self.pids.len() >= batch {
            let full = self.pids.len() / self.cfg.block_tokens * self.cfg.block_tokens;
            self.flush(full)?;
        }
        Ok(())
    }

    /// Encodes, compresses and writes the first `n` pending tokens (whole blocks, except at the end).
    fn flush(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let bt = self.cfg.block_tokens;
        let row = self.dims.n_layers * self.dims.d_model;
        let (cfg, dims) = (&self.cfg, self.dims);
        let (px, py, pids) = (&self.px, &self.py, &self.pids);
        let starts: Vec<usize> = (0..n).step_by(bt).collect();
        let work = || -> Vec<std::io::Result<EncodedBlock>> {
            starts
                .par_iter()
                .map_init(
                    || compressor(cfg.zstd_level),
                    |zc, &s| {
                        let e = (s + bt).min(n);
                        let layout = BlockLayout::new(
                            cfg.codec,
                            cfg.byte_planes,
                            cfg.outlier_dims,
                            dims.n_layers,
                            dims.d_model,
                            e - s,
                        );
                        let mut raw = Vec::with_capacity(layout.raw_len());
                        let (bx, by) = (&px[s * row..e * row], &py[s * row..e * row]);
                        let (mut coef, mut tail) = (Vec::new(), Vec::new());
                        if cfg.codec == Codec::Int8e {
                            let (l_n, d) = (dims.n_layers, dims.d_model);
                            let eps = cfg.effective_target().unwrap_or(int8e::DEFAULT_EPS);
                            int8e::encode(bx, by, l_n, d, eps, &mut raw, &mut coef, &mut tail);
                        } else if cfg.codec == Codec::Int8p {
                            let mut ysec = Vec::with_capacity(layout.section.bytes());
                            let (l_n, d) = (dims.n_layers, dims.d_model);
                            let eps = cfg.target_rel_err;
                            predict::encode(bx, by, l_n, d, eps, &mut raw, &mut ysec, &mut coef);
                            raw.extend_from_slice(&ysec);
                        } else {
                            layout.section.encode_with(bx, cfg.target_rel_err, &mut raw);
                            layout.section.encode_with(by, cfg.target_rel_err, &mut raw);
                        }
                        raw.extend(pids[s..e].iter().flat_map(|t| t.0.to_le_bytes()));
                        raw.extend(pids[s..e].iter().flat_map(|t| t.1.to_le_bytes()));
                        raw.extend(pids[s..e].iter().flat_map(|t| t.2.to_le_bytes()));
                        raw.extend_from_slice(&coef);
                        raw.extend_from_slice(&tail);
                        debug_assert_eq!(raw.len(), layout.raw_len() + tail.len());
                        let comp = zc
                            .as_mut()
                            .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?
                            .compress(&raw)?;
                        Ok((comp, raw.len() as u64, xxh3_64(&raw), (e - s) as u32))
                    },
                )
                .collect()
        };
        let out = match &self.pool {
            Some(p) => p.install(work),
            None => work(),
        };
        let file = self.file.as_mut().expect("shard writer used after finish");
        for r in out {
            let (comp, raw_len, raw_xxh3, nt) = r.map_err(io_err(&self.tmp))?;
            file.write_all(&comp).map_err(io_err(&self.tmp))?;
            self.blocks.push(BlockEntry {
                offset: self.offset,
                comp_len: comp.len() as u64,
                raw_len,
                n_tokens: nt,
                comp_xxh3: xxh3_64(&comp),
                raw_xxh3,
            });
            self.offset += comp.len() as u64;
        }
        self.n_tokens += n as u64;
        self.px.drain(..n * row);
        self.py.drain(..n * row);
        self.pids.drain(..n);
        Ok(())
    }

    /// Writes the remaining tokens, the index, the metadata and the header, syncs and renames. Fails on a shard of
    /// zero tokens.
    pub fn finish(mut self) -> Result<ShardInfo> {
        if self.n_tokens() == 0 {
            return Err(Error::InvalidData {
                what: format!("shard {}", self.path.display()),
                reason: "no tokens were written".into(),
            });
        }
        self.flush(self.pids.len())?;
        let n = self.n_tokens as f64;
        let avg = |v: &Vec<f64>| {
            v.iter()
                .map(|s| (s / (n * self.dims.d_model as f64)) as f32)
                .collect::<Vec<_>>()
        };
        let rms = |v: &Vec<f64>| avg(v).into_iter().map(f32::sqrt).collect::<Vec<_>>();
        self.meta.norm = Some(NormHints {
            x_mean: avg(&self.sums[0]),
            x_rms: rms(&self.sums[1]),
            y_mean: avg(&self.sums[2]),
            y_rms: rms(&self.sums[3]),
        });
        let index: Vec<u8> = self.blocks.iter().flat_map(|b| b.to_bytes()).collect();
        debug_assert_eq!(index.len(), self.blocks.len() * INDEX_ENTRY_LEN);
        let meta = serde_json::to_vec(&self.meta).map_err(|e| Error::InvalidData {
            what: "shard metadata".into(),
            reason: e.to_string(),
        })?;
        let mut h = Header {
            version: VERSION,
            codec: self.cfg.codec,
            byte_planes: self.cfg.byte_planes && self.cfg.codec.is_16bit(),
            outliers: self.outliers(),
            n_tokens: self.n_tokens,
            n_layers: self.dims.n_layers as u32,
            d_model: self.dims.d_model as u32,
            block_tokens: self.cfg.block_tokens as u32,
            n_blocks: u32::try_from(self.blocks.len())
                .map_err(|_| Error::config("store.shard_tokens", "more than 2^32 blocks"))?,
            index_offset: self.offset,
            meta_len: meta.len() as u32,
            checksum: 0,
        };
        h.checksum = header_checksum(&h.to_bytes(), &index, &meta);
        let tmp = self.tmp.clone();
        let file = self.file.take().expect("finish called once");
        let write = |mut file: BufWriter<File>| -> Result<()> {
            file.write_all(&index).map_err(io_err(&tmp))?;
            file.write_all(&meta).map_err(io_err(&tmp))?;
            let mut f = file
                .into_inner()
                .map_err(|e| Error::io(&tmp, e.into_error()))?;
            f.seek(SeekFrom::Start(0)).map_err(io_err(&tmp))?;
            f.write_all(&h.to_bytes()).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
            drop(f);
            std::fs::rename(&tmp, &self.path).map_err(io_err(&self.path))
        };
        if let Err(e) = write(file) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        sync_dir(&self.path)?;
        Ok(ShardRecord {
            file: self
                .path
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            n_tokens: self.n_tokens,
            n_blocks: self.blocks.len() as u64,
            bytes: self.offset + (index.len() + meta.len()) as u64,
            checksum: format!("{:016x}", h.checksum),
        })
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        // An unfinished shard leaves no file behind (its temporary name never reads as valid anyway).
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Fsyncs the directory holding `path` so a rename into it is durable (a no-op where directories cannot be opened).
fn sync_dir(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Ok(d) = File::open(dir) {
        d.sync_all().map_err(io_err(dir))?;
    }
    Ok(())
}

/// Streams tokens into a dataset directory of shards `shard-NNNNN.clts` plus `manifest.json`.
pub struct DatasetWriter {
    dir: PathBuf,
    dims: ActDims,
    cfg: WriterConfig,
    meta: ShardMeta,
    shard_tokens: u64,
    current: Option<ShardWriter>,
    shards: Vec<ShardRecord>,
}

impl DatasetWriter {
    /// Creates `dir` (if needed) and prepares to write shards of at most `shard_tokens` tokens each.
    pub fn create(
        dir: impl AsRef<Path>,
        dims: ActDims,
        cfg: WriterConfig,
        meta: ShardMeta,
        shard_tokens: u64,
    ) -> Result<Self> {
        validate_cfg(&cfg, dims)?;
        if shard_tokens == 0 {
            return Err(Error::config("store.shard_tokens", "must be positive"));
        }
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        if dir.join(MANIFEST_FILE).exists() {
            return Err(Error::config(
                "store.out",
                format!("{} already holds a dataset", dir.display()),
            ));
        }
        Ok(DatasetWriter {
            dir,
            dims,
            cfg,
            meta,
            shard_tokens,
            current: None,
            shards: Vec::new(),
        })
    }

    /// Reopens an unfinished dataset (shards written, no manifest yet, as an interrupted writer leaves it):
    /// keeps every complete shard `shard-00000.clts`, `shard-00001.clts`, … in sequence (shards are renamed
    /// into place only when complete, so each one found is whole; each is opened and checked), and returns the
    /// writer positioned after them with the number of tokens they hold. A dataset whose manifest exists is
    /// finished: that is an error naming it.
    pub fn resume(
        dir: impl AsRef<Path>,
        dims: ActDims,
        cfg: WriterConfig,
        meta: ShardMeta,
        shard_tokens: u64,
    ) -> Result<(Self, u64)> {
        let dir = dir.as_ref().to_path_buf();
        if dir.join(MANIFEST_FILE).exists() {
            return Err(Error::config(
                "store.out",
                format!("{} already holds a finished dataset", dir.display()),
            ));
        }
        let mut w = DatasetWriter::create(&dir, dims, cfg, meta, shard_tokens)?;
        let mut tokens = 0u64;
        loop {
            let name = format!("shard-{:05}.clts", w.shards.len());
            let path = dir.join(&name);
            if !path.exists() {
                break;
            }
            let shard = super::reader::Shard::open(&path)?;
            if shard.dims() != dims {
                return Err(Error::Shape {
                    what: format!("resumed shard {}", path.display()),
                    expected: vec![dims.n_layers, dims.d_model],
                    got: vec![shard.dims().n_layers, shard.dims().d_model],
                });
            }
            let h = shard.header();
            let bytes = std::fs::metadata(&path).map_err(io_err(&path))?.len();
            tokens += h.n_tokens;
            w.shards.push(ShardRecord {
                file: name,
                n_tokens: h.n_tokens,
                n_blocks: h.n_blocks as u64,
                bytes,
                checksum: format!("{:016x}", h.checksum),
            });
        }
        Ok((w, tokens))
    }

    /// Appends tokens (see [`ShardWriter::push`]), rolling over to new shards as they fill.
    pub fn push(&mut self, x: &[f32], y: &[f32], ids: Option<TokenIds<'_>>) -> Result<()> {
        let row = self.dims.n_layers * self.dims.d_model;
        if !x.len().is_multiple_of(row) || y.len() != x.len() {
            return Err(Error::Shape {
                what: "tokens pushed to a dataset (x, y)".into(),
                expected: vec![x.len() / row, self.dims.n_layers, self.dims.d_model],
                got: vec![x.len(), y.len()],
            });
        }
        let n = x.len() / row;
        let mut s = 0;
        while s < n {
            if self.current.is_none() {
                let name = format!("shard-{:05}.clts", self.shards.len());
                self.current = Some(ShardWriter::create(
                    self.dir.join(name),
                    self.dims,
                    self.cfg.clone(),
                    self.meta.clone(),
                )?);
            }
            let w = self.current.as_mut().unwrap();
            let room = (self.shard_tokens - w.n_tokens()) as usize;
            let e = (s + room).min(n);
            let sub = ids.map(|i| TokenIds {
                tokens: &i.tokens[s..e],
                positions: &i.positions[s..e],
                doc_ids: &i.doc_ids[s..e],
            });
            w.push(&x[s * row..e * row], &y[s * row..e * row], sub)?;
            if w.n_tokens() == self.shard_tokens {
                let done = self.current.take().unwrap().finish()?;
                self.shards.push(done);
            }
            s = e;
        }
        Ok(())
    }

    /// Finishes the last shard and writes the manifest; returns it.
    pub fn finish(mut self) -> Result<Manifest> {
        if let Some(w) = self.current.take()
            && w.n_tokens() > 0
        {
            self.shards.push(w.finish()?);
        }
        if self.shards.is_empty() {
            return Err(Error::InvalidData {
                what: format!("dataset {}", self.dir.display()),
                reason: "no tokens were written".into(),
            });
        }
        let m = Manifest {
            format_version: VERSION,
            dims: self.dims,
            codec: self.cfg.codec,
            byte_planes: self.cfg.byte_planes && self.cfg.codec.is_16bit(),
            outlier_dims: if self.cfg.codec == Codec::Int8o {
                self.cfg.outlier_dims as u64
            } else {
                0
            },
            block_tokens: self.cfg.block_tokens as u64,
            target_rel_err: self.cfg.effective_target(),
            model: self.meta.model.clone(),
            n_tokens: self.shards.iter().map(|s| s.n_tokens).sum(),
            shards: std::mem::take(&mut self.shards),
        };
        let bytes = serde_json::to_vec_pretty(&m).map_err(|e| Error::InvalidData {
            what: "manifest".into(),
            reason: e.to_string(),
        })?;
        crate::clt::checkpoint::write_atomic(&self.dir.join(MANIFEST_FILE), &bytes)?;
        Ok(m)
    }
}

/// zstd's shortest match in the writer's blocks. Activation codes (and the low bytes of 16-bit ones) are
/// noise-like: the 3- to 6-byte matches zstd finds by default cost about as many bits as the literals they
/// replace, and each is a sequence the decoder must execute. With 7, on SmolLM2's activations at level 3,
/// blocks came out 1-4% smaller for every codec and decompressed 1.3-1.8x faster (`docs/perf-store.md`).
pub const ZSTD_MIN_MATCH: i32 = 7;

/// A compression context at `level` with the writer's parameters ([`ZSTD_MIN_MATCH`]).
fn compressor(level: i32) -> std::io::Result<zstd::bulk::Compressor<'static>> {
    let mut c = zstd::bulk::Compressor::new(level)?;
    c.set_parameter(zstd::zstd_safe::CParameter::MinMatch(ZSTD_MIN_MATCH as u32))?;
    Ok(c)
}

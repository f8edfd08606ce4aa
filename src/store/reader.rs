//! Reading shards and datasets: memory-mapped files, O(1) block access, checksummed decompression.
//!
//! [`Shard::open`] maps a file and validates its header and index ([`super::format::parse`]). A [`BlockReader`]
//! owns a zstd decompression context and one reusable buffer: [`BlockReader::read`] checks the block's compressed
//! checksum, decompresses the frame straight into that buffer (no allocation once it has grown to a block's size),
//! checks the decompressed checksum and returns a [`Block`] view whose `*_rows` methods dequantise into the caller's
//! f32 buffer. [`Dataset::open`] opens a dataset directory and checks its manifest against its shards.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

use super::codec::Codec;
use super::format::{self, BlockEntry, BlockLayout, Header, ShardMeta};
use super::manifest::{MANIFEST_FILE, Manifest, SHARD_EXT};
use super::{int8e, predict};
use crate::data::ActDims;
use crate::{Error, Result};

/// An open, memory-mapped shard with its validated header, index and metadata.
#[derive(Debug)]
pub struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
    header: Header,
    blocks: Vec<BlockEntry>,
    meta: ShardMeta,
}

impl Shard {
    /// Maps `path` and validates its header and index (block contents are checked when read).
    pub fn open(path: impl AsRef<Path>) -> Result<Shard> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < format::PREFIX_LEN as u64 {
            return Err(Error::Format {
                path,
                offset: 0,
                reason: format!(
                    "truncated: {len} bytes, shorter than the {}-byte header",
                    format::PREFIX_LEN
                ),
            });
        }
        // SAFETY: shards are immutable once written (the writer renames a complete, synced file into place and
        // nothing in this crate writes to it afterwards). Another process truncating or rewriting the file while it
        // is mapped is outside what we can guard against, as for any mmap; every byte we interpret is validated
        // (header and index here, blocks by checksum before use), so modified contents surface as typed errors.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let parsed = format::parse(&map, &path)?;
        Ok(Shard {
            path,
            map,
            header: parsed.header,
            blocks: parsed.blocks,
            meta: parsed.meta,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn meta(&self) -> &ShardMeta {
        &self.meta
    }

    /// The block index.
    pub fn blocks(&self) -> &[BlockEntry] {
        &self.blocks
    }

    pub fn n_tokens(&self) -> u64 {
        self.header.n_tokens
    }

    pub fn dims(&self) -> ActDims {
        ActDims {
            n_layers: self.header.n_layers as usize,
            d_model: self.header.d_model as usize,
        }
    }

    /// The compressed bytes of block `b` (bounds were validated at open).
    pub fn compressed(&self, b: usize) -> &[u8] {
        let e = &self.blocks[b];
        &self.map[e.offset as usize..(e.offset + e.comp_len) as usize]
    }

    fn corrupt(&self, b: usize, reason: String) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            block: b as u64,
            offset: self.blocks[b].offset,
            reason,
        }
    }
}

/// A decompressed block: a view into a [`BlockReader`]'s buffer.
#[derive(Clone, Copy, Debug)]
pub struct Block<'a> {
    pub layout: BlockLayout,
    raw: &'a [u8],
    n_layers: usize,
}

impl<'a> Block<'a> {
    /// A view of a block previously decompressed by [`BlockReader::read_into`] (`raw` is its first
    /// `layout.raw_len()` bytes, which the reader checked).
    pub(crate) fn from_parts(layout: BlockLayout, raw: &'a [u8], n_layers: usize) -> Self {
        Block {
            layout,
            raw: &raw[..layout.raw_len()],
            n_layers,
        }
    }

    pub fn n_tokens(&self) -> usize {
        self.layout.n_tokens
    }

    /// Decodes the inputs of tokens `t0 .. t0 + out.len() / (L d)` into `out` (`[T][L][d]`).
    pub fn x_rows(&self, t0: usize, out: &mut [f32]) {
        let r = self.layout.ranges();
        let sec = &self.raw[r[0].clone()];
        let d = self.layout.section.d;
        if self.layout.section.codec == Codec::Int8p {
            predict::decode_x(sec, &self.raw[r[5].clone()], self.n_layers, d, t0, out);
        } else if self.layout.section.codec == Codec::Int8e {
            let (side, tail) = (&self.raw[r[5].clone()], &self.raw[self.layout.tail_range()]);
            int8e::decode_x(sec, side, tail, self.n_layers, d, t0, out);
        } else {
            self.layout
                .section
                .decode_rows(sec, t0 * self.n_layers, out);
        }
    }

    /// Decodes the targets of tokens `t0 ..` into `out`, like [`x_rows`](Self::x_rows). Under int8p and int8e
    /// the targets are predicted from the decoded inputs, which this decodes again one token at a time into a
    /// per-thread buffer: when both are wanted, [`xy_rows`](Self::xy_rows) decodes each once.
    pub fn y_rows(&self, t0: usize, out: &mut [f32]) {
        if !self.predicted() {
            let r = self.layout.ranges();
            self.layout
                .section
                .decode_rows(&self.raw[r[1].clone()], t0 * self.n_layers, out);
            return;
        }
        thread_local! {
            static XHAT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let td = self.n_layers * self.layout.section.d;
        XHAT.with_borrow_mut(|xh| {
            xh.resize(td, 0.0);
            for (i, yt) in out.chunks_exact_mut(td).enumerate() {
                self.x_rows(t0 + i, xh);
                self.y_given_x(t0 + i, xh, yt);
            }
        });
    }

    /// Decodes the inputs and the targets of tokens `t0 .. t0 + x.len() / (L d)` into `x` and `y` (the same
    /// length).
    pub fn xy_rows(&self, t0: usize, x: &mut [f32], y: &mut [f32]) {
        if self.predicted() {
            // Token by token, so that the targets' decoder reads the inputs it just wrote from cache, not from
            // memory (a whole block's inputs do not fit in cache: reading them back cost ~15% of the decode).
            let td = self.n_layers * self.layout.section.d;
            for (i, (xt, yt)) in x.chunks_mut(td).zip(y.chunks_mut(td)).enumerate() {
                self.x_rows(t0 + i, xt);
                self.y_given_x(t0 + i, xt, yt);
            }
        } else {
            self.x_rows(t0, x);
            self.y_rows(t0, y);
        }
    }

    /// True for the codecs whose targets are predicted from the decoded inputs (int8p, int8e).
    fn predicted(&self) -> bool {
        matches!(self.layout.section.codec, Codec::Int8p | Codec::Int8e)
    }

    /// int8p, int8e: the targets of tokens `t0 ..` given their decoded inputs `xhat`.
    fn y_given_x(&self, t0: usize, xhat: &[f32], out: &mut [f32]) {
        let r = self.layout.ranges();
        let (sec, coef) = (&self.raw[r[1].clone()], &self.raw[r[5].clone()]);
        let d = self.layout.section.d;
        if self.layout.section.codec == Codec::Int8e {
            let (n, tail) = (self.layout.n_tokens, &self.raw[self.layout.tail_range()]);
            int8e::decode_y(sec, coef, tail, self.n_layers, d, n, t0, xhat, out);
        } else {
            predict::decode_y(sec, coef, self.n_layers, d, t0, xhat, out);
        }
    }

    /// The block's side area as stored (int8p: prediction coefficients; int8e: coefficients, steps, escape
    /// index; empty for other codecs).
    pub fn coef_bytes(&self) -> &'a [u8] {
        &self.raw[self.layout.ranges()[5].clone()]
    }

    fn u32s(&self, k: usize) -> impl Iterator<Item = u32> + '_ {
        self.raw[self.layout.ranges()[k].clone()]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
    }

    /// Token ids.
    pub fn tokens(&self) -> impl Iterator<Item = u32> + '_ {
        self.u32s(2)
    }

    /// Positions of the tokens in their documents.
    pub fn positions(&self) -> impl Iterator<Item = u32> + '_ {
        self.u32s(3)
    }

    /// Document ids.
    pub fn doc_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.raw[self.layout.ranges()[4].clone()]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
    }
}

/// Decompresses blocks into one reusable buffer, verifying both checksums.
pub struct BlockReader {
    dctx: zstd::bulk::Decompressor<'static>,
    buf: Vec<u8>,
}

impl BlockReader {
    pub fn new() -> Result<Self> {
        Ok(BlockReader {
            dctx: zstd::bulk::Decompressor::new()
                .map_err(|e| Error::Source(format!("zstd decompressor: {e}")))?,
            buf: Vec::new(),
        })
    }

    /// Reads block `b` of `shard`: checksum of the frame, decompression into the reader's buffer, checksum of the
    /// result.
    pub fn read<'a>(&'a mut self, shard: &Shard, b: usize) -> Result<Block<'a>> {
        read_block(&mut self.dctx, shard, b, &mut self.buf)
    }

    /// Like [`read`](Self::read), decompressing into the caller's buffer `buf` (grown as needed, never shrunk), so
    /// that several decompressed blocks can be held at once without allocating per block.
    pub fn read_into<'a>(
        &mut self,
        shard: &Shard,
        b: usize,
        buf: &'a mut Vec<u8>,
    ) -> Result<Block<'a>> {
        read_block(&mut self.dctx, shard, b, buf)
    }
}

fn read_block<'a>(
    dctx: &mut zstd::bulk::Decompressor<'static>,
    shard: &Shard,
    b: usize,
    buf: &'a mut Vec<u8>,
) -> Result<Block<'a>> {
    let Some(e) = shard.blocks.get(b) else {
        return Err(Error::Source(format!(
            "{}: block {b} out of range ({} blocks)",
            shard.path.display(),
            shard.blocks.len()
        )));
    };
    let comp = shard.compressed(b);
    // Under cargo-fuzz (`--cfg fuzzing`) neither checksum is enforced, so that mutated blocks reach the
    // decompressor and the sections' own checks behind them (as `format::parse` lets the header through).
    let sum = xxh3_64(comp);
    if sum != e.comp_xxh3 && !cfg!(fuzzing) {
        return Err(shard.corrupt(
            b,
            format!(
                "compressed checksum {sum:016x}, index says {:016x}",
                e.comp_xxh3
            ),
        ));
    }
    let raw_len = e.raw_len as usize;
    if buf.len() < raw_len {
        buf.resize(raw_len, 0);
    }
    let dst = &mut buf[..raw_len];
    let n = dctx
        .decompress_to_buffer(comp, dst)
        .map_err(|err| shard.corrupt(b, format!("zstd: {err}")))?;
    if n != raw_len {
        return Err(shard.corrupt(
            b,
            format!("decompressed to {n} bytes, index says {raw_len}"),
        ));
    }
    let sum = xxh3_64(dst);
    if sum != e.raw_xxh3 && !cfg!(fuzzing) {
        return Err(shard.corrupt(
            b,
            format!(
                "decompressed checksum {sum:016x}, index says {:016x}",
                e.raw_xxh3
            ),
        ));
    }
    let mut layout = shard.header.block_layout(e.n_tokens as usize);
    // The index's raw length was checked against the layout at open (only int8e blocks have a tail).
    layout.tail = raw_len - layout.raw_len();
    let r = layout.ranges();
    for k in 0..2 {
        layout
            .section
            .validate(&buf[r[k].clone()])
            .map_err(|why| shard.corrupt(b, why))?;
    }
    if layout.section.codec == Codec::Int8e {
        let (l, d) = (layout.section.layers, layout.section.d);
        let tail = &buf[layout.tail_range()];
        int8e::validate(
            &buf[r[0].clone()],
            &buf[r[1].clone()],
            &buf[r[5].clone()],
            tail,
            l,
            d,
            layout.n_tokens,
        )
        .map_err(|why| shard.corrupt(b, why))?;
    }
    Ok(Block {
        layout,
        raw: &buf[..raw_len],
        n_layers: shard.header.n_layers as usize,
    })
}

/// An open dataset: its manifest and its shards, checked against each other.
#[derive(Debug)]
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<Arc<Shard>>,
}

impl Dataset {
    /// Opens the dataset whose directory (or `manifest.json`) is `path`, opening every shard and checking it against
    /// the manifest.
    pub fn open(path: impl AsRef<Path>) -> Result<Dataset> {
        let path = path.as_ref();
        let (dir, mpath) = if path.is_dir() {
            (path.to_path_buf(), path.join(MANIFEST_FILE))
        } else {
            (
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                path.to_path_buf(),
            )
        };
        let bytes = std::fs::read(&mpath).map_err(|e| Error::io(&mpath, e))?;
        let bad = |reason: String| Error::Manifest {
            path: mpath.clone(),
            reason,
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        if manifest.format_version != format::VERSION {
            return Err(bad(format!(
                "format version {} is not supported",
                manifest.format_version
            )));
        }
        if manifest.shards.is_empty() {
            return Err(bad("lists no shards".into()));
        }
        let listed: std::collections::HashSet<&str> =
            manifest.shards.iter().map(|s| s.file.as_str()).collect();
        if listed.len() != manifest.shards.len() {
            return Err(bad("lists a shard twice".into()));
        }
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for ent in entries {
            let ent = ent.map_err(|e| Error::io(&dir, e))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.ends_with(&format!(".{SHARD_EXT}")) && !listed.contains(name.as_str()) {
                return Err(bad(format!(
                    "shard {name} is in the directory but missing from the manifest"
                )));
            }
        }
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut total = 0u64;
        for rec in &manifest.shards {
            if rec.file.contains(['/', '\\']) || rec.file == ".." {
                return Err(bad(format!(
                    "shard name {:?} is not a plain file name",
                    rec.file
                )));
            }
            let sp = dir.join(&rec.file);
            if !sp.exists() {
                return Err(bad(format!("shard {} is listed but missing", rec.file)));
            }
            let s = Shard::open(&sp)?;
            let h = s.header();
            let mut diffs = Vec::new();
            if s.dims() != manifest.dims {
                diffs.push(format!(
                    "dims {:?} (manifest {:?})",
                    s.dims(),
                    manifest.dims
                ));
            }
            if h.codec != manifest.codec || h.byte_planes != manifest.byte_planes {
                diffs.push(format!(
                    "codec {:?}/planes {} (manifest {:?}/{})",
                    h.codec, h.byte_planes, manifest.codec, manifest.byte_planes
                ));
            }
            if h.outliers as u64 != manifest.outlier_dims {
                diffs.push(format!(
                    "outlier_dims {} (manifest {})",
                    h.outliers, manifest.outlier_dims
                ));
            }
            if h.block_tokens as u64 != manifest.block_tokens {
                diffs.push(format!(
                    "block_tokens {} (manifest {})",
                    h.block_tokens, manifest.block_tokens
                ));
            }
            if h.n_tokens != rec.n_tokens || s.blocks().len() as u64 != rec.n_blocks {
                diffs.push(format!(
                    "{} tokens in {} blocks (manifest {} in {})",
                    h.n_tokens,
                    s.blocks().len(),
                    rec.n_tokens,
                    rec.n_blocks
                ));
            }
            if format!("{:016x}", h.checksum) != rec.checksum {
                diffs.push(format!(
                    "checksum {:016x} (manifest {})",
                    h.checksum, rec.checksum
                ));
            }
            if !diffs.is_empty() {
                return Err(bad(format!(
                    "shard {} disagrees: {}",
                    rec.file,
                    diffs.join("; ")
                )));
            }
            total += h.n_tokens;
            shards.push(Arc::new(s));
        }
        if total != manifest.n_tokens {
            return Err(bad(format!(
                "shards hold {total} tokens, manifest says {}",
                manifest.n_tokens
            )));
        }
        Ok(Dataset {
            dir,
            manifest,
            shards,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn shards(&self) -> &[Arc<Shard>] {
        &self.shards
    }

    pub fn dims(&self) -> ActDims {
        self.manifest.dims
    }

    pub fn n_tokens(&self) -> u64 {
        self.manifest.n_tokens
    }
}

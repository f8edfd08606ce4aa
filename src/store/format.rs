//! The on-disk layout of an activation-store shard (format version 1) and its validating parser.
//!
//! `docs/shard-format.md` is the normative description; in short, all integers little-endian:
//!
//! ```text
//! [0, 64)                      fixed prefix (magic, version, codec, dims, block count, index offset, checksum)
//! [64, index_offset)           blocks, contiguous, each one independent zstd frame
//! [index_offset, +48·n_blocks) block index (offset, compressed len, raw len, tokens, xxh3 of both forms)
//! [.., +meta_len)              metadata JSON (model, hook names, normalisation hints)
//! ```
//!
//! The prefix checksum is xxh3-64 over the prefix's first 56 bytes, the index and the metadata, so it covers every
//! block's checksums too: the manifest records it as the shard's checksum. [`parse`] validates everything it reads
//! and returns a typed [`Error::Format`] for any inconsistency; it never panics on any input (a proptest and a
//! cargo-fuzz target exercise it).

use std::path::Path;

use xxhash_rust::xxh3::Xxh3;

use super::codec::{Codec, Section};
use crate::{Error, Result};

/// The first 8 bytes of every shard.
pub const MAGIC: [u8; 8] = *b"CLTSHARD";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Size of the fixed prefix.
pub const PREFIX_LEN: usize = 64;
/// Size of one block-index entry.
pub const INDEX_ENTRY_LEN: usize = 48;
/// Largest decompressed block this build accepts (guards allocations against corrupt headers).
pub const MAX_BLOCK_RAW: u64 = 1 << 31;
/// Largest metadata JSON this build accepts.
pub const MAX_META_LEN: u32 = 16 << 20;
/// Header flag: 16-bit codes split into byte planes.
pub const FLAG_BYTE_PLANES: u8 = 1;

/// Bytes per token of the id columns in a block: token id u32, position u32, document id u64.
pub const IDS_BYTES_PER_TOKEN: usize = 16;

/// Normalisation hints the writer computes: per layer, the mean and RMS of the values of inputs and targets.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NormHints {
    pub x_mean: Vec<f32>,
    pub x_rms: Vec<f32>,
    pub y_mean: Vec<f32>,
    pub y_rms: Vec<f32>,
}

/// Free-form metadata stored as JSON after the index.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardMeta {
    /// The language model the activations come from.
    #[serde(default)]
    pub model: String,
    /// Hook names of the inputs, one per layer (may be empty when unknown).
    #[serde(default)]
    pub hooks_in: Vec<String>,
    /// Hook names of the targets, one per layer (may be empty when unknown).
    #[serde(default)]
    pub hooks_out: Vec<String>,
    /// Per-layer statistics of this shard's values (before encoding).
    #[serde(default)]
    pub norm: Option<NormHints>,
}

/// The fixed-size part of a shard header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub codec: Codec,
    pub byte_planes: bool,
    /// Outlier dimensions per layer (int8o; 0 for other codecs).
    pub outliers: u16,
    pub n_tokens: u64,
    pub n_layers: u32,
    pub d_model: u32,
    pub block_tokens: u32,
    pub n_blocks: u32,
    pub index_offset: u64,
    pub meta_len: u32,
    pub checksum: u64,
}

/// One entry of the block index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockEntry {
    /// Byte offset of the zstd frame in the file.
    pub offset: u64,
    /// Length of the zstd frame.
    pub comp_len: u64,
    /// Length of the decompressed block.
    pub raw_len: u64,
    /// Tokens in the block (`block_tokens`, except possibly the last block).
    pub n_tokens: u32,
    /// xxh3-64 of the compressed bytes.
    pub comp_xxh3: u64,
    /// xxh3-64 of the decompressed bytes.
    pub raw_xxh3: u64,
}

/// The layout of a decompressed block of `n_tokens` tokens: inputs, targets, token ids, positions, document ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    pub n_tokens: usize,
    pub section: Section,
    /// Bytes of the block's variable-length tail after its fixed layout (int8e's escape stream; 0 for other
    /// codecs). [`Header::block_layout`] gives 0; the reader sets it from the index's `raw_len`.
    pub tail: usize,
}

impl BlockLayout {
    /// The layout of a block of `n_tokens` tokens under the header's codec and dims.
    /// `outliers` is the int8o outlier count per layer (ignored for other codecs).
    pub fn new(
        codec: Codec,
        byte_planes: bool,
        outliers: usize,
        n_layers: usize,
        d_model: usize,
        n_tokens: usize,
    ) -> Self {
        BlockLayout {
            n_tokens,
            section: Section {
                codec,
                planes: byte_planes && codec.is_16bit(),
                rows: n_tokens * n_layers,
                d: d_model,
                layers: n_layers,
                outliers: if codec == Codec::Int8o { outliers } else { 0 },
            },
            tail: 0,
        }
    }

    /// Bytes of the block's side area after the id columns (int8p: prediction coefficients; int8e: coefficients,
    /// steps and escape index; 0 for other codecs), or `None` on overflow.
    pub fn checked_coef_len(&self) -> Option<usize> {
        let (l, d) = (self.section.layers, self.section.d);
        match self.section.codec {
            Codec::Int8p => super::predict::coef_bytes(l, d),
            Codec::Int8e => super::int8e::side_bytes(l, d, self.n_tokens),
            _ => Some(0),
        }
    }

    /// Bytes of the block's fixed layout (without the tail), or `None` on overflow.
    pub fn checked_fixed_len(&self) -> Option<usize> {
        self.section
            .checked_bytes()?
            .checked_mul(2)?
            .checked_add(self.n_tokens.checked_mul(IDS_BYTES_PER_TOKEN)?)?
            .checked_add(self.checked_coef_len()?)
    }

    /// Raw bytes of the block (tail included), or `None` on overflow.
    pub fn checked_raw_len(&self) -> Option<usize> {
        self.checked_fixed_len()?.checked_add(self.tail)
    }

    /// Raw bytes of the block.
    pub fn raw_len(&self) -> usize {
        self.checked_raw_len().expect("block size overflows")
    }

    /// Byte range of the variable-length tail (int8e's escapes; empty for other codecs).
    pub fn tail_range(&self) -> std::ops::Range<usize> {
        let f = self.checked_fixed_len().expect("block size overflows");
        f..f + self.tail
    }

    /// Byte ranges of the x section, the y section, token ids, positions, document ids and the side area
    /// (prediction coefficients and, for int8e, steps and escape index; empty but for int8p and int8e).
    pub fn ranges(&self) -> [std::ops::Range<usize>; 6] {
        let s = self.section.bytes();
        let n = self.n_tokens;
        let e = 2 * s + 16 * n;
        [
            0..s,
            s..2 * s,
            2 * s..2 * s + 4 * n,
            2 * s + 4 * n..2 * s + 8 * n,
            2 * s + 8 * n..e,
            e..e + self.checked_coef_len().expect("block size overflows"),
        ]
    }
}

impl Header {
    /// Serialises the 64-byte prefix (the checksum field as given).
    pub fn to_bytes(&self) -> [u8; PREFIX_LEN] {
        let mut b = [0u8; PREFIX_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12] = self.codec as u8;
        b[13] = if self.byte_planes {
            FLAG_BYTE_PLANES
        } else {
            0
        };
        b[14..16].copy_from_slice(&self.outliers.to_le_bytes());
        b[16..24].copy_from_slice(&self.n_tokens.to_le_bytes());
        b[24..28].copy_from_slice(&self.n_layers.to_le_bytes());
        b[28..32].copy_from_slice(&self.d_model.to_le_bytes());
        b[32..36].copy_from_slice(&self.block_tokens.to_le_bytes());
        b[36..40].copy_from_slice(&self.n_blocks.to_le_bytes());
        b[40..48].copy_from_slice(&self.index_offset.to_le_bytes());
        b[48..52].copy_from_slice(&self.meta_len.to_le_bytes());
        b[56..64].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    /// The layout of block `n_tokens` tokens long.
    pub fn block_layout(&self, n_tokens: usize) -> BlockLayout {
        BlockLayout::new(
            self.codec,
            self.byte_planes,
            self.outliers as usize,
            self.n_layers as usize,
            self.d_model as usize,
            n_tokens,
        )
    }
}

impl BlockEntry {
    /// Serialises the entry.
    pub fn to_bytes(&self) -> [u8; INDEX_ENTRY_LEN] {
        let mut b = [0u8; INDEX_ENTRY_LEN];
        b[0..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.comp_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.raw_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.n_tokens.to_le_bytes());
        b[32..40].copy_from_slice(&self.comp_xxh3.to_le_bytes());
        b[40..48].copy_from_slice(&self.raw_xxh3.to_le_bytes());
        b
    }
}

/// The header checksum: xxh3-64 over the prefix's first 56 bytes, the index bytes and the metadata bytes.
pub fn header_checksum(prefix56: &[u8], index: &[u8], meta: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&prefix56[..56]);
    h.update(index);
    h.update(meta);
    h.digest()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A parsed and validated shard header, index and metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedShard {
    pub header: Header,
    pub blocks: Vec<BlockEntry>,
    pub meta: ShardMeta,
}

/// Parses and validates the header, index and metadata of the shard whose bytes are `file` (`path` is used in
/// errors only). Block contents are not read; their checksums are checked when a block is read.
pub fn parse(file: &[u8], path: &Path) -> Result<ParsedShard> {
    let err = |offset: u64, reason: String| Error::Format {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    if file.len() < PREFIX_LEN {
        return Err(err(
            0,
            format!(
                "truncated: {} bytes, shorter than the {PREFIX_LEN}-byte header",
                file.len()
            ),
        ));
    }
    if file[0..8] != MAGIC {
        return Err(err(
            0,
            format!("bad magic {:02x?} (not a clt shard)", &file[0..8]),
        ));
    }
    let version = u32_at(file, 8);
    if version != VERSION {
        return Err(err(
            8,
            format!("format version {version} is not supported (this build reads {VERSION})"),
        ));
    }
    let codec = Codec::from_u8(file[12])
        .ok_or_else(|| err(12, format!("unknown codec byte {}", file[12])))?;
    let flags = file[13];
    if flags & !FLAG_BYTE_PLANES != 0 {
        return Err(err(13, format!("unknown flags {flags:#04x}")));
    }
    if file[52..56] != [0, 0, 0, 0] {
        return Err(err(14, "reserved header bytes are not zero".into()));
    }
    let h = Header {
        version,
        codec,
        byte_planes: flags & FLAG_BYTE_PLANES != 0,
        outliers: u16::from_le_bytes([file[14], file[15]]),
        n_tokens: u64_at(file, 16),
        n_layers: u32_at(file, 24),
        d_model: u32_at(file, 28),
        block_tokens: u32_at(file, 32),
        n_blocks: u32_at(file, 36),
        index_offset: u64_at(file, 40),
        meta_len: u32_at(file, 48),
        checksum: u64_at(file, 56),
    };
    if h.byte_planes && !codec.is_16bit() {
        return Err(err(
            13,
            format!("byte-plane flag set for codec {}", codec.name()),
        ));
    }
    if (codec == Codec::Int8o) != (h.outliers > 0)
        || (codec == Codec::Int8o && (h.outliers as u32 >= h.d_model || h.d_model > 1 << 16))
    {
        return Err(err(
            14,
            format!(
                "{} outlier dims per layer is invalid for codec {} and d_model {}",
                h.outliers,
                codec.name(),
                h.d_model
            ),
        ));
    }
    if h.n_layers == 0 || h.d_model == 0 || h.block_tokens == 0 {
        return Err(err(
            24,
            "n_layers, d_model and block_tokens must be positive".into(),
        ));
    }
    if h.meta_len > MAX_META_LEN {
        return Err(err(
            48,
            format!("metadata length {} exceeds {MAX_META_LEN}", h.meta_len),
        ));
    }
    let full = h.block_layout(h.block_tokens as usize);
    match full.checked_raw_len() {
        Some(n) if (n as u64) <= MAX_BLOCK_RAW => {}
        _ => {
            return Err(err(
                24,
                format!(
                    "a block of {} tokens exceeds {MAX_BLOCK_RAW} bytes",
                    h.block_tokens
                ),
            ));
        }
    }
    let expect_blocks = h.n_tokens.div_ceil(h.block_tokens as u64);
    if expect_blocks != h.n_blocks as u64 {
        return Err(err(
            36,
            format!(
                "{} blocks for {} tokens of {} per block (expected {expect_blocks})",
                h.n_blocks, h.n_tokens, h.block_tokens
            ),
        ));
    }
    let index_len = h.n_blocks as u64 * INDEX_ENTRY_LEN as u64;
    let flen = file.len() as u64;
    let end = (h.index_offset as u128) + index_len as u128 + h.meta_len as u128;
    if h.index_offset < PREFIX_LEN as u64 || end != flen as u128 {
        let reason = if end > flen as u128 {
            format!("truncated: header says {end} bytes, file has {flen}")
        } else {
            format!("file has {flen} bytes, header says {end}")
        };
        return Err(err(40, reason));
    }
    let io = h.index_offset as usize;
    let index = &file[io..io + index_len as usize];
    let meta_bytes = &file[io + index_len as usize..];
    let sum = header_checksum(&file[..56], index, meta_bytes);
    // Under cargo-fuzz (`--cfg fuzzing`) a mismatch is let through, so that mutated inputs reach the index and
    // metadata validation below instead of all stopping here.
    if sum != h.checksum && !cfg!(fuzzing) {
        return Err(err(
            56,
            format!(
                "header checksum {:016x} does not match {:016x}",
                h.checksum, sum
            ),
        ));
    }
    let mut blocks = Vec::with_capacity(h.n_blocks as usize);
    let mut next = PREFIX_LEN as u64;
    let mut tokens = 0u64;
    for (i, e) in index.chunks_exact(INDEX_ENTRY_LEN).enumerate() {
        let at = h.index_offset + (i * INDEX_ENTRY_LEN) as u64;
        let b = BlockEntry {
            offset: u64_at(e, 0),
            comp_len: u64_at(e, 8),
            raw_len: u64_at(e, 16),
            n_tokens: u32_at(e, 24),
            comp_xxh3: u64_at(e, 32),
            raw_xxh3: u64_at(e, 40),
        };
        if u32_at(e, 28) != 0 {
            return Err(err(
                at + 28,
                format!("block {i}: reserved index bytes are not zero"),
            ));
        }
        let last = i + 1 == h.n_blocks as usize;
        let want_tokens = if last {
            h.n_tokens - tokens
        } else {
            h.block_tokens as u64
        };
        if b.n_tokens as u64 != want_tokens || b.n_tokens == 0 {
            return Err(err(
                at + 24,
                format!(
                    "block {i} holds {} tokens, expected {want_tokens}",
                    b.n_tokens
                ),
            ));
        }
        tokens += b.n_tokens as u64;
        let raw = h.block_layout(b.n_tokens as usize).raw_len() as u64;
        // int8e blocks end with a tail of i32 escapes after their fixed layout.
        let tail_ok = codec == Codec::Int8e
            && b.raw_len >= raw
            && (b.raw_len - raw).is_multiple_of(4)
            && b.raw_len <= MAX_BLOCK_RAW;
        if b.raw_len != raw && !tail_ok {
            return Err(err(
                at + 16,
                format!(
                    "block {i}: raw length {} != {raw} for its token count",
                    b.raw_len
                ),
            ));
        }
        if b.offset != next || b.comp_len == 0 || b.comp_len > h.index_offset - next {
            return Err(err(
                at,
                format!(
                    "block {i}: frame [{}, +{}) is not contiguous inside the data area",
                    b.offset, b.comp_len
                ),
            ));
        }
        next = b.offset + b.comp_len;
        blocks.push(b);
    }
    if next != h.index_offset {
        return Err(err(
            40,
            format!(
                "blocks end at {next}, the index starts at {}",
                h.index_offset
            ),
        ));
    }
    let meta: ShardMeta = serde_json::from_slice(meta_bytes)
        .map_err(|e| err(h.index_offset + index_len, format!("metadata JSON: {e}")))?;
    Ok(ParsedShard {
        header: h,
        blocks,
        meta,
    })
}

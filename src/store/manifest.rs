//! The dataset manifest: the JSON list of a dataset's shards with their token counts and checksums.
//!
//! A dataset is a directory holding `manifest.json` and the shard files it lists. [`Manifest`] is the file's
//! schema; [`super::reader::Dataset::open`] checks it against the shards (every listed shard present, no unlisted
//! shard, dims, codec, token and block counts and header checksums equal) and fails with [`crate::Error::Manifest`]
//! naming the shard otherwise.

use crate::data::ActDims;

use super::codec::Codec;

/// The manifest's file name inside a dataset directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The extension of shard files.
pub const SHARD_EXT: &str = "clts";

/// One shard as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardRecord {
    /// File name, relative to the dataset directory.
    pub file: String,
    pub n_tokens: u64,
    pub n_blocks: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// The shard's header checksum (xxh3-64 over header, index and metadata; hex), which covers every block checksum.
    pub checksum: String,
}

/// The manifest of a dataset.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub dims: ActDims,
    pub codec: Codec,
    pub byte_planes: bool,
    /// Outlier dimensions per layer (int8o; 0 otherwise).
    #[serde(default)]
    pub outlier_dims: u64,
    pub block_tokens: u64,
    /// The writer's error target ε (int8, int8p, int8e; absent when none). A record of how the dataset was encoded:
    /// decoding does not need it (the rows' steps are in the blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_rel_err: Option<f64>,
    #[serde(default)]
    pub model: String,
    pub n_tokens: u64,
    pub shards: Vec<ShardRecord>,
}

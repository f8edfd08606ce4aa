//! The activation store: quantised, zstd-compressed, memory-mapped shards and a shuffling loader.
//!
//! Training reads every layer's MLP inputs and outputs for hundreds of millions of tokens; this module stores them
//! compactly and serves them fast:
//! - [`format`](mod@format): the versioned shard layout (header, block index, independent zstd blocks; `docs/shard-format.md`);
//! - [`codec`]: f32, bf16, f16, and int8/int4 with one absmax scale per (token, layer) row, int8o (outlier dims
//!   in bf16), int8p ([`predict`]: int8 of the residual of an inter-layer prediction) and int8e ([`int8e`]: the
//!   same prediction at an error-targeted step per layer, with escapes instead of a range limit);
//! - [`writer`]: streaming, parallel, crash-safe shard and dataset writers, and the dataset [`manifest`];
//! - [`reader`]: memory-mapped shards with O(1), checksummed block access, and datasets checked against their manifest;
//! - [`loader`]: [`loader::ShardLoader`], the deterministic, restorable, globally shuffling
//!   [`crate::data::ActivationSource`] with background decoding and a partition mode;
//! - [`import`]: `.npy` and CLT-Forge safetensors importers;
//! - [`cli`]: the `clt store inspect | verify | convert | import` commands as library code.

pub mod cli;
pub mod codec;
pub mod format;
pub mod import;
pub mod int8e;
pub mod loader;
pub mod manifest;
pub mod predict;
pub mod reader;
pub mod writer;

pub use codec::Codec;
pub use loader::{LoaderConfig, ShardLoader};
pub use manifest::Manifest;
pub use reader::{BlockReader, Dataset, Shard};
pub use writer::{DatasetWriter, ShardWriter, TokenIds, WriterConfig, ZSTD_MIN_MATCH};

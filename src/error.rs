//! The crate's one error type.
//!
//! Every fallible operation in the engine returns [`Result<T>`]. Variants carry the structured context a
//! user needs to act on the failure (the file, the tensor, the layer, the offset, the config field) rather
//! than a pre-formatted string, so callers can match on them and the CLI can print them.

use std::path::PathBuf;

/// Shorthand for `std::result::Result<T, clt::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a named file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A configuration value is out of range or inconsistent; `field` is its dotted TOML path.
    #[error("invalid configuration value `{field}`: {reason}")]
    Config { field: String, reason: String },

    /// A tensor or buffer has a shape other than the one required.
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    Shape {
        what: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// A file that should hold a tensor does not, or holds it with another dtype.
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    /// A file is not in the format it was expected to be in (wrong magic, bad header, truncated).
    #[error("{path}: invalid format at byte {offset}: {reason}")]
    Format {
        path: PathBuf,
        offset: u64,
        reason: String,
    },

    /// A checkpoint cannot be used (missing part, incompatible configuration, unknown version).
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// The requested backend is not available in this build or on this machine.
    #[error("backend `{backend}` unavailable: {reason}")]
    BackendUnavailable { backend: String, reason: String },

    /// A CUDA call failed at run time (the backend was available): what was being done, and the driver's
    /// error.
    #[error("CUDA: {what}: {reason}")]
    Cuda { what: String, reason: String },

    /// A numerical failure during training (a non-finite loss or gradient) at a given step.
    #[error("non-finite {what} at step {step}")]
    NonFinite { what: String, step: u64 },

    /// The activation source ran out of data or could not produce a batch.
    #[error("activation source: {0}")]
    Source(String),

    /// A distributed run failed on, or because of, one rank (a dead or hung peer, a mismatched configuration).
    #[error("distributed run, rank {rank}: {reason}")]
    Distributed { rank: usize, reason: String },

    /// A request that is well-formed but not supported (yet) by this build.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A block of an activation-store shard fails its checksum or does not decompress; `offset` is the
    /// byte offset of the block in the file.
    #[error("{path}: block {block} at byte {offset} is corrupt: {reason}")]
    Corrupt {
        path: PathBuf,
        block: u64,
        offset: u64,
        reason: String,
    },

    /// A dataset manifest disagrees with its shards (missing or unlisted shard, other dims, other counts).
    #[error("dataset manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },

    /// Input data that cannot be stored as given (non-finite values, wrong lengths, inconsistent arrays).
    #[error("invalid data for {what}: {reason}")]
    InvalidData { what: String, reason: String },

    /// A token id outside the model's vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfRange { id: u32, vocab_size: usize },

    /// A remote service (an HTTP endpoint the user configured) failed or answered something unusable.
    #[error("{url}: {reason}")]
    Remote { url: String, reason: String },
}

impl Error {
    /// Wraps an `std::io::Error` with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A configuration error for `field`.
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

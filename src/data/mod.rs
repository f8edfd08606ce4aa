//! Where training activations come from.
//!
//! The trainer knows only the [`ActivationSource`] trait: it asks for batches of `B` tokens, each token holding
//! the encoder inputs `x` and the reconstruction targets `y` of every layer. The in-memory source, the synthetic
//! ground-truth generator and the shard loader of the activation store all implement it.
//!
//! Layout of a [`Batch`]: token-major, `x[b][l][i]` at `(b * n_layers + l) * d_model + i` (the `[T, L, d]` layout
//! that CLT-Forge's activation files use).

pub mod coded;
pub mod memory;
pub mod synthetic;

pub use coded::CodedBatch;

use crate::store::Codec;
use crate::{Error, Result};

/// The sizes of the activations a source produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ActDims {
    /// Number of layers `L`.
    pub n_layers: usize,
    /// Model width `d` (inputs and targets share it).
    pub d_model: usize,
}

/// One batch of activations: inputs and targets for `n_tokens` tokens, token-major `[B][L][d]`.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub n_tokens: usize,
    pub x: Vec<f32>,
    pub y: Vec<f32>,
}

impl Batch {
    /// An empty batch with room for `n_tokens` tokens of the given dims.
    pub fn with_capacity(dims: ActDims, n_tokens: usize) -> Self {
        let n = n_tokens * dims.n_layers * dims.d_model;
        Batch {
            n_tokens,
            x: vec![0.0; n],
            y: vec![0.0; n],
        }
    }

    /// Resizes the buffers for `n_tokens` tokens (contents unspecified afterwards).
    pub fn resize(&mut self, dims: ActDims, n_tokens: usize) {
        let n = n_tokens * dims.n_layers * dims.d_model;
        self.n_tokens = n_tokens;
        self.x.resize(n, 0.0);
        self.y.resize(n, 0.0);
    }
}

/// A stream of activation batches.
///
/// Sources are deterministic given their construction parameters and their [`position`](Self::position): a
/// checkpoint stores the position, and [`restore`](Self::restore) brings a fresh source back to it, so that a
/// resumed training run sees exactly the batches an uninterrupted one would.
pub trait ActivationSource: Send {
    /// The sizes of the activations.
    fn dims(&self) -> ActDims;

    /// Fills `batch` with the next `n_tokens` tokens (resizing it as needed).
    fn next_batch(&mut self, n_tokens: usize, batch: &mut Batch) -> Result<()>;

    /// The source's position in its stream, as JSON (stored in training checkpoints).
    fn position(&self) -> serde_json::Value;

    /// Moves the source to a position previously returned by [`position`](Self::position).
    fn restore(&mut self, position: &serde_json::Value) -> Result<()>;

    /// The codec of the batches [`next_coded`](Self::next_coded) serves, when this source can serve them
    /// still quantised (a store of int8 or int4 rows); `None` otherwise.
    fn coded(&self) -> Option<Codec> {
        None
    }

    /// Fills `batch` with the next `n_tokens` tokens still quantised: the tokens [`next_batch`](Self::next_batch)
    /// would serve, in its order, advancing the position as it does; [`CodedBatch::decode_into`] gives its
    /// values. An error when [`coded`](Self::coded) is `None`.
    fn next_coded(&mut self, n_tokens: usize, batch: &mut CodedBatch) -> Result<()> {
        let _ = (n_tokens, batch);
        Err(Error::Unsupported(
            "serving still-quantised batches from this activation source".into(),
        ))
    }
}

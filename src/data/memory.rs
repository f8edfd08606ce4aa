//! An activation source over arrays held in memory, cycling through them in order.

use super::{ActDims, ActivationSource, Batch};
use crate::{Error, Result};

/// Serves batches from `[T][L][d]` input and target arrays, wrapping around at the end.
#[derive(Clone, Debug)]
pub struct MemorySource {
    dims: ActDims,
    x: Vec<f32>,
    y: Vec<f32>,
    n_tokens: usize,
    cursor: usize,
}

impl MemorySource {
    /// Wraps inputs and targets of `n_tokens = x.len() / (L d)` tokens.
    pub fn new(dims: ActDims, x: Vec<f32>, y: Vec<f32>) -> Result<Self> {
        let row = dims.n_layers * dims.d_model;
        if row == 0 || x.is_empty() || !x.len().is_multiple_of(row) || y.len() != x.len() {
            return Err(Error::Shape {
                what: "in-memory activations (x, y)".into(),
                expected: vec![x.len() / row.max(1), dims.n_layers, dims.d_model],
                got: vec![x.len(), y.len()],
            });
        }
        Ok(MemorySource {
            dims,
            n_tokens: x.len() / row,
            x,
            y,
            cursor: 0,
        })
    }

    /// Number of tokens held.
    pub fn len(&self) -> usize {
        self.n_tokens
    }

    /// True when no tokens are held (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.n_tokens == 0
    }
}

impl ActivationSource for MemorySource {
    fn dims(&self) -> ActDims {
        self.dims
    }

    fn next_batch(&mut self, n_tokens: usize, batch: &mut Batch) -> Result<()> {
        batch.resize(self.dims, n_tokens);
        let row = self.dims.n_layers * self.dims.d_model;
        for b in 0..n_tokens {
            let src = self.cursor * row..(self.cursor + 1) * row;
            batch.x[b * row..(b + 1) * row].copy_from_slice(&self.x[src.clone()]);
            batch.y[b * row..(b + 1) * row].copy_from_slice(&self.y[src]);
            self.cursor = (self.cursor + 1) % self.n_tokens;
        }
        Ok(())
    }

    fn position(&self) -> serde_json::Value {
        serde_json::json!({ "cursor": self.cursor })
    }

    fn restore(&mut self, position: &serde_json::Value) -> Result<()> {
        let cursor = position
            .get("cursor")
            .and_then(|c| c.as_u64())
            .ok_or_else(|| Error::Source(format!("bad memory-source position {position}")))?;
        self.cursor = cursor as usize % self.n_tokens;
        Ok(())
    }
}

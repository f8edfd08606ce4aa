//! A batch still quantised as the activation store holds it (int8 or int4: one f32 scale per row), for a
//! trainer that dequantises where the batch is used: the CUDA trainer copies these bytes to the device (a
//! quarter of the f32 batch's for int8, an eighth for int4) and decodes them there.
//!
//! Layout: per stream (inputs `x`, targets `y`), one encoded section of the batch's `n_tokens · L` rows in
//! the [`Batch`] order (token-major, row `b · L + l`): every row's scale (little-endian f32), then every
//! row's codes, exactly the store's int8 / int4 section layout ([`Section`]). [`CodedBatch::decode_into`]
//! is the host's decode, the reference the device's must match bit for bit.

use super::{ActDims, Batch};
use crate::store::codec::{Codec, Section};

/// One batch of int8 or int4 rows; see the module documentation.
#[derive(Clone, Debug)]
pub struct CodedBatch {
    pub n_tokens: usize,
    pub dims: ActDims,
    /// [`Codec::Int8`] or [`Codec::Int4`].
    pub codec: Codec,
    pub x: Vec<u8>,
    pub y: Vec<u8>,
}

impl Default for CodedBatch {
    fn default() -> Self {
        CodedBatch {
            n_tokens: 0,
            dims: ActDims {
                n_layers: 0,
                d_model: 0,
            },
            codec: Codec::Int8,
            x: Vec::new(),
            y: Vec::new(),
        }
    }
}

impl CodedBatch {
    /// The section layout of one stream of `n_tokens` tokens.
    pub fn section_of(codec: Codec, dims: ActDims, n_tokens: usize) -> Section {
        Section {
            codec,
            planes: false,
            rows: n_tokens * dims.n_layers,
            d: dims.d_model,
            layers: dims.n_layers,
            outliers: 0,
        }
    }

    /// The section layout of each of `x` and `y`.
    pub fn section(&self) -> Section {
        Self::section_of(self.codec, self.dims, self.n_tokens)
    }

    /// Sizes the buffers for `n_tokens` tokens of `dims` under `codec` (contents unspecified afterwards).
    pub fn resize(&mut self, codec: Codec, dims: ActDims, n_tokens: usize) {
        debug_assert!(matches!(codec, Codec::Int8 | Codec::Int4));
        (self.codec, self.dims, self.n_tokens) = (codec, dims, n_tokens);
        let n = self.section().bytes();
        self.x.resize(n, 0);
        self.y.resize(n, 0);
    }

    /// Tokens `lo .. hi` (a data-parallel replica's slice), copied.
    pub fn slice(&self, lo: usize, hi: usize) -> CodedBatch {
        let (l_n, at) = (self.dims.n_layers, self.codes_offset());
        let rb = self.codec.row_code_bytes(self.dims.d_model);
        let part = |v: &[u8]| {
            let mut out = v[4 * lo * l_n..4 * hi * l_n].to_vec();
            out.extend_from_slice(&v[at + lo * l_n * rb..at + hi * l_n * rb]);
            out
        };
        CodedBatch {
            n_tokens: hi - lo,
            dims: self.dims,
            codec: self.codec,
            x: part(&self.x),
            y: part(&self.y),
        }
    }

    /// Byte offset of the codes (after every row's scale).
    pub fn codes_offset(&self) -> usize {
        4 * self.n_tokens * self.dims.n_layers
    }

    /// Dequantises into `batch` as the store's reader does (the values [`super::ActivationSource::next_batch`]
    /// serves for the same tokens).
    pub fn decode_into(&self, batch: &mut Batch) {
        batch.resize(self.dims, self.n_tokens);
        let sec = self.section();
        sec.decode_rows(&self.x, 0, &mut batch.x);
        sec.decode_rows(&self.y, 0, &mut batch.y);
    }

    /// `Σ_b ‖y_l − ȳ_l‖²` per layer of the targets decoded and multiplied by `target_scale[l]` (the
    /// trainer's normalisation), computed as [`crate::backend::grads::target_variance`] computes it on
    /// the f32 batch, to the bit, one layer at a time (a layer's rows, not the whole batch, in f32).
    pub fn target_variance(&self, target_scale: &[f32]) -> Vec<f64> {
        let (l_n, d, b_n) = (self.dims.n_layers, self.dims.d_model, self.n_tokens);
        let sec = self.section();
        let mut rows = vec![0f32; b_n * d];
        (0..l_n)
            .map(|l| {
                for (b, row) in rows.chunks_exact_mut(d.max(1)).enumerate() {
                    sec.decode_rows(&self.y, b * l_n + l, row);
                    row.iter_mut().for_each(|v| *v *= target_scale[l]);
                }
                crate::backend::grads::target_variance(&rows, b_n, 1, d)[0]
            })
            .collect()
    }
}

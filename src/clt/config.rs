//! The architecture of a transcoder: sizes, decoder kind, activation function, skip connection.

use crate::{Error, Result};

/// Which decoders exist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecoderKind {
    /// Cross-layer transcoder: features of layer l write to every layer k ≥ l (L(L+1)/2 decoder blocks).
    #[default]
    CrossLayer,
    /// Per-layer transcoders: features of layer l write to layer l only.
    PerLayer,
}

/// The activation function that turns pre-activations into feature activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Activation {
    /// `a = h · 1[h > θ]` with a learned per-feature threshold θ = exp(log θ).
    #[serde(rename = "jumprelu")]
    #[default]
    JumpRelu,
    /// The `k` largest pre-activations of each (token, layer), passed through a ReLU.
    #[serde(rename = "topk")]
    TopK { k: usize },
    /// The `k · B` largest pre-activations of a batch of `B` tokens, per layer or (with `across_layers`) over
    /// all layers at once, passed through a ReLU.
    #[serde(rename = "batchtopk")]
    BatchTopK {
        k: usize,
        #[serde(default)]
        across_layers: bool,
    },
}

/// The shape and kind of a transcoder.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CltConfig {
    /// Number of layers `L`.
    pub n_layers: usize,
    /// Model width `d`.
    pub d_model: usize,
    /// Features per layer `F`.
    pub n_features: usize,
    /// Cross-layer or per-layer decoders.
    #[serde(default)]
    pub decoder: DecoderKind,
    /// The activation function.
    #[serde(default)]
    pub activation: Activation,
    /// Whether each layer has a linear skip connection `ŷ_l += W_skip[l] x_l`.
    #[serde(default)]
    pub skip: bool,
}

impl CltConfig {
    /// Checks every field; errors name the field (`model.<name>`).
    pub fn validate(&self) -> Result<()> {
        if self.n_layers == 0 {
            return Err(Error::config("model.n_layers", "must be at least 1"));
        }
        if self.d_model == 0 {
            return Err(Error::config("model.d_model", "must be at least 1"));
        }
        if self.n_features == 0 {
            return Err(Error::config("model.n_features", "must be at least 1"));
        }
        if self.n_features > u32::MAX as usize {
            return Err(Error::config("model.n_features", "must fit in 32 bits"));
        }
        match self.activation {
            Activation::TopK { k } | Activation::BatchTopK { k, .. }
                if k == 0 || k > self.n_features =>
            {
                return Err(Error::config(
                    "model.activation.k",
                    format!(
                        "must be in 1..={} (the features per layer), got {k}",
                        self.n_features
                    ),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// Number of target layers the decoder of source layer `l` writes to.
    pub fn n_targets(&self, l: usize) -> usize {
        match self.decoder {
            DecoderKind::CrossLayer => self.n_layers - l,
            DecoderKind::PerLayer => 1,
        }
    }

    /// Length of one feature's concatenated decoder row at source layer `l`.
    pub fn dec_row_len(&self, l: usize) -> usize {
        self.n_targets(l) * self.d_model
    }

    /// Whether the activation has a learned threshold.
    pub fn has_threshold(&self) -> bool {
        matches!(self.activation, Activation::JumpRelu)
    }
}

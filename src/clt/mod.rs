//! The transcoder model: configuration, parameters and their layout, checkpoints, export and import.
//!
//! A [`Transcoder`] bundles a configuration, its parameters and the normalisation scalars it was trained with.

pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod export;
pub mod params;
pub mod transcoder_set;

pub use config::{Activation, CltConfig, DecoderKind};
pub use params::{NormScales, Params};

/// A transcoder ready for inference or further training.
#[derive(Clone, Debug, PartialEq)]
pub struct Transcoder {
    pub cfg: CltConfig,
    pub params: Params,
    pub norms: NormScales,
}

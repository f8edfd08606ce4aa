//! # clt: cross-layer transcoders, fast and exact
//!
//! A single engine for the whole cross-layer-transcoder pipeline: caching a language model's MLP activations,
//! training JumpReLU cross-layer transcoders (CLTs) and per-layer transcoders on them, and analysing the result.
//!
//! The modules follow the data:
//! - [`data`]: the [`data::ActivationSource`] seam and the in-memory and synthetic sources;
//! - [`clt`]: the model (configuration, parameters, initialisation, checkpoints, export/import);
//! - [`backend`]: the operations (encode, sparse decode, backward, Adam) on the CPU, and the CUDA seam;
//! - [`store`]: the activation store (compressed shards, the shuffling shard loader, importers);
//! - [`train`]: the objective, the optimiser, schedules, metrics and the training loop.
//! - [`model`]: the language models (Llama family) that activations come from, their loaders and tokenizers;
//! - [`attribution`]: attribution graphs of prompts (circuit-tracer's algorithm and formats) and interventions;
//! - [`features`]: feature dashboards (top contexts, histograms, logit effects) and their indexed file;
//! - [`viewer`]: the web viewer for attribution graphs and feature dashboards (`clt serve`);
//! - [`dist`]: distributed training (feature-sharded CLTs across MPI ranks; the `mpi` feature), sharded checkpoints.

pub mod attribution;
pub mod backend;
pub mod bench;
pub mod cache;
pub mod clt;
pub mod corpus;
pub mod data;
pub mod demo;
pub mod dist;
pub mod error;
pub mod eval;
pub mod features;
pub mod hugepages;
pub mod model;
pub mod npy;
pub mod rng;
pub mod store;
pub mod train;
pub mod viewer;

pub use error::{Error, Result};

/// The README's examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

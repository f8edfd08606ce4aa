//! The training configuration (a TOML file), with defaults that reproduce CLT-Forge's objective.
//!
//! ```toml
//! [model]
//! n_layers = 5
//! d_model = 64
//! n_features = 4096
//!
//! [train]
//! steps = 1000
//! batch_size = 4096
//!
//! [data]
//! kind = "synthetic"
//! ```
//! Every field of `[train]` has a default; see `docs/objective.md` for what each one means and the
//! alternatives the other trainers use.

use crate::backend::{ActBlocks, BackendKind, EncoderKernel, SparseKernels, ThresholdGrad};
use crate::clt::CltConfig;
use crate::data::synthetic::SyntheticConfig;
use crate::{Error, Result};
use std::path::Path;

/// A whole training run: the model, the optimisation, the data.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: CltConfig,
    #[serde(default)]
    pub train: TrainConfig,
    pub data: DataConfig,
}

/// Where the activations come from.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataConfig {
    /// The synthetic ground-truth generator.
    Synthetic(SyntheticConfig),
    /// A dataset of activation-store shards (`clt cache` or `clt store import` writes them).
    Store(StoreDataConfig),
}

/// The `[data]` table with `kind = "store"`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreDataConfig {
    /// The dataset directory (or its `manifest.json`).
    pub path: std::path::PathBuf,
    /// Seed of the global shuffle.
    #[serde(default)]
    pub seed: u64,
    /// Blocks per shuffle window.
    #[serde(default = "default_window_blocks")]
    pub window_blocks: usize,
    /// Background decoding threads.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Decompressed windows queued per worker, and assembled batches queued.
    #[serde(default = "default_workers")]
    pub prefetch: usize,
}

fn default_window_blocks() -> usize {
    16
}

fn default_workers() -> usize {
    2
}

/// How λ grows from 0 to its final value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LambdaRamp {
    /// CLT-Forge: zero for `lambda_wait_fraction` of the run, then a half-cosine over `lambda_ramp_fraction`.
    Cosine,
    /// Anthropic: linear over `lambda_ramp_fraction` of the run (after the wait).
    Linear,
    /// λ at its final value from the first step.
    Constant,
}

/// Which features the pre-activation loss applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreactScope {
    /// Every feature (CLT-Forge).
    #[default]
    All,
    /// Only features currently counted as dead (SAELens).
    DeadOnly,
}

/// How the ranks of a distributed run (`mpirun -n N clt train`) divide the work; one process ignores it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parallel {
    /// Each rank owns F/N features of every layer; the partial reconstructions are all-reduced.
    #[default]
    Features,
    /// Each rank holds the whole model and takes 1/N of each batch; the gradients are all-reduced.
    Data,
    /// A 2-D grid: `feature_shards` ranks share each data-parallel replica's features, and the N /
    /// `feature_shards` replicas each take their slice of the batch (partials all-reduced within a replica,
    /// each shard's gradients within the ranks holding that shard).
    Grid,
}

/// How a distributed CUDA run sums device buffers over the ranks: the shards' partial reconstructions
/// (`backend = "cuda_host"` or `"cuda"`, feature-sharded or grid) and the resident loop's gradients over
/// the replicas (`backend = "cuda"`, data-parallel or grid). The CPU step always uses MPI.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Collectives {
    /// NCCL where every rank of the group can load it, MPI otherwise (the trainer's log says which).
    #[default]
    Auto,
    /// NCCL on the device (an error at start-up where a rank cannot load libnccl).
    Nccl,
    /// MPI through host memory: each rank downloads its partials, and uploads the sum's residual.
    Mpi,
}

/// Optimisation settings. Defaults follow CLT-Forge's runners (see `docs/objective.md`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Number of optimiser steps.
    pub steps: u64,
    /// Tokens per batch.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Fraction of the run, at its end, over which the learning rate decays linearly to zero.
    pub decay_fraction: f64,
    /// Final sparsity coefficient λ.
    pub lambda_sparsity: f32,
    pub lambda_ramp: LambdaRamp,
    pub lambda_wait_fraction: f64,
    pub lambda_ramp_fraction: f64,
    /// The tanh scale c.
    pub tanh_c: f32,
    /// Pre-activation loss coefficient λ_p.
    pub lambda_preact: f32,
    /// Which features the pre-activation loss applies to.
    pub preact_scope: PreactScope,
    /// The threshold's straight-through estimate (`theta`: −θ/ε, CLT-Forge; `preact`: −h/ε, crosslayer-coding).
    pub threshold_grad: ThresholdGrad,
    /// Bandwidth ε of the threshold's straight-through gradient.
    pub bandwidth: f32,
    /// Initial threshold θ₀.
    pub theta_init: f32,
    /// Target firing rate for the `b_enc` calibration; `None` means 10,000 / (L·F), clamped to 1.
    pub init_fire_rate: Option<f64>,
    /// Batches used to estimate the normalisation scalars and calibrate `b_enc`.
    pub calibration_batches: usize,
    /// Whether inputs and targets are normalised per layer to mean norm √d.
    pub normalize: bool,
    /// Global gradient-norm clipping threshold (0 disables clipping).
    pub clip_norm: f32,
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_eps: f32,
    /// Seed of every random draw (initialisation, synthetic data).
    pub seed: u64,
    /// A feature that has not fired for this many steps counts as dead.
    pub dead_window: u64,
    /// Metrics are logged every this many steps.
    pub log_every: u64,
    /// A checkpoint is written every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// How many checkpoints to keep.
    pub keep_checkpoints: usize,
    /// The backend running the step.
    pub backend: BackendKind,
    /// How the ranks of a distributed run divide the work (`docs/distributed.md`).
    pub parallel: Parallel,
    /// With `parallel = "grid"`: how many ranks share a replica's features (it must divide the number of
    /// ranks); the other modes refuse it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature_shards: Option<usize>,
    /// Start the all-reduce of each layer's partial reconstruction as soon as that layer is decoded, so it
    /// proceeds while the next layers decode (feature-sharded and grid modes; same results as without).
    pub overlap: bool,
    /// How a CUDA run's device buffers are summed over the ranks (`docs/distributed.md`).
    pub collectives: Collectives,
    /// With `--backend cuda` and a store of int8 or int4 rows: batches cross to the device as the store's
    /// codes (a quarter or an eighth of the f32 bytes) and are decoded and normalised there; `false`
    /// decodes them on the host and copies f32. The values, and so the run, are the same either way.
    pub device_dequant: bool,
    /// With a CUDA backend: the step's sparse kernels, `gather` or `tiled` (the same results within f32
    /// rounding; which is faster is the GPU's to say, docs/cuda.md). The CPU backends ignore it.
    pub sparse_kernels: SparseKernels,
    /// With a CUDA backend: the encoder's tensor-core GEMM, `mma` or `wgmma` (Hopper only; the same results
    /// within f32 rounding; which is faster is the GPU's to say, docs/cuda.md). The CPU backends ignore it.
    pub encoder_kernel: EncoderKernel,
    /// With a CUDA backend and the tiled kernels: how many of `act_grad_partial`'s blocks share an SM,
    /// `one`, `two` or `three` (the same results; which is faster is the GPU's to say). The gathers and
    /// the CPU backends ignore it.
    pub act_blocks: ActBlocks,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            batch_size: 4096,
            lr: 2e-4,
            warmup_steps: 1000,
            decay_fraction: 0.05,
            lambda_sparsity: 2.0,
            lambda_ramp: LambdaRamp::Cosine,
            lambda_wait_fraction: 0.0,
            lambda_ramp_fraction: 0.9,
            tanh_c: 4.0,
            lambda_preact: 1e-5,
            preact_scope: PreactScope::All,
            threshold_grad: ThresholdGrad::Theta,
            bandwidth: 1.0,
            theta_init: 0.03,
            init_fire_rate: None,
            calibration_batches: 10,
            normalize: true,
            clip_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            seed: 0,
            dead_window: 250,
            log_every: 50,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            backend: BackendKind::Cpu,
            parallel: Parallel::Features,
            feature_shards: None,
            overlap: false,
            collectives: Collectives::Auto,
            device_dequant: true,
            sparse_kernels: SparseKernels::Gather,
            encoder_kernel: EncoderKernel::Mma,
            act_blocks: ActBlocks::One,
        }
    }
}

impl RunConfig {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text).map_err(|e| match e {
            Error::Config { field, reason } => {
                Error::config(field, format!("{reason} (in {})", path.display()))
            }
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: RunConfig = toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .map(|s| field_at(text, s.start))
                .unwrap_or_default();
            Error::config(field, e.message().to_string())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let t = &self.train;
        let pos = |v: f64, name: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::config(name, format!("must be positive, got {v}")))
            }
        };
        let nonneg = |v: f64, name: &str| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::config(
                    name,
                    format!("must be non-negative, got {v}"),
                ))
            }
        };
        let frac = |v: f64, name: &str| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::config(name, format!("must be in [0, 1], got {v}")))
            }
        };
        if t.steps == 0 {
            return Err(Error::config("train.steps", "must be at least 1"));
        }
        if t.batch_size == 0 {
            return Err(Error::config("train.batch_size", "must be at least 1"));
        }
        pos(t.lr as f64, "train.lr")?;
        frac(t.decay_fraction, "train.decay_fraction")?;
        nonneg(t.lambda_sparsity as f64, "train.lambda_sparsity")?;
        frac(t.lambda_wait_fraction, "train.lambda_wait_fraction")?;
        frac(t.lambda_ramp_fraction, "train.lambda_ramp_fraction")?;
        if t.lambda_wait_fraction + t.lambda_ramp_fraction > 1.0 + 1e-9 {
            return Err(Error::config(
                "train.lambda_ramp_fraction",
                "wait + ramp fractions exceed 1",
            ));
        }
        pos(t.tanh_c as f64, "train.tanh_c")?;
        nonneg(t.lambda_preact as f64, "train.lambda_preact")?;
        pos(t.bandwidth as f64, "train.bandwidth")?;
        pos(t.theta_init as f64, "train.theta_init")?;
        if let Some(r) = t.init_fire_rate
            && !(r > 0.0 && r <= 1.0)
        {
            return Err(Error::config(
                "train.init_fire_rate",
                format!("must be in (0, 1], got {r}"),
            ));
        }
        if t.calibration_batches == 0 {
            return Err(Error::config(
                "train.calibration_batches",
                "must be at least 1",
            ));
        }
        nonneg(t.clip_norm as f64, "train.clip_norm")?;
        frac(t.adam_beta1 as f64, "train.adam_beta1")?;
        frac(t.adam_beta2 as f64, "train.adam_beta2")?;
        pos(t.adam_eps as f64, "train.adam_eps")?;
        if t.log_every == 0 {
            return Err(Error::config("train.log_every", "must be at least 1"));
        }
        if t.keep_checkpoints == 0 {
            return Err(Error::config(
                "train.keep_checkpoints",
                "must be at least 1",
            ));
        }
        match (t.parallel, t.feature_shards) {
            (Parallel::Grid, None) => {
                return Err(Error::config(
                    "train.feature_shards",
                    "parallel = \"grid\" needs the number of ranks sharing a replica's features",
                ));
            }
            (Parallel::Grid, Some(0)) => {
                return Err(Error::config("train.feature_shards", "must be at least 1"));
            }
            (Parallel::Features | Parallel::Data, Some(_)) => {
                return Err(Error::config(
                    "train.feature_shards",
                    "applies only to parallel = \"grid\"",
                ));
            }
            _ => {}
        }
        let device_sums = match t.backend {
            BackendKind::Cuda => true,
            BackendKind::CudaHost => t.parallel != Parallel::Data,
            _ => false,
        };
        if t.collectives == Collectives::Nccl && !device_sums {
            return Err(Error::config(
                "train.collectives",
                "\"nccl\" sums device buffers: the CUDA step's partial reconstructions (backend = \
                 \"cuda_host\" with parallel = \"features\" or \"grid\") or the resident loop's \
                 partials and gradients (backend = \"cuda\")",
            ));
        }
        if t.overlap && t.parallel == Parallel::Data {
            return Err(Error::config(
                "train.overlap",
                "overlaps the partial reconstructions' all-reduce, which parallel = \"data\" does not have",
            ));
        }
        match &self.data {
            DataConfig::Synthetic(s) => s.validate(&self.model),
            DataConfig::Store(s) => {
                if s.window_blocks == 0 {
                    return Err(Error::config("data.window_blocks", "must be at least 1"));
                }
                Ok(())
            }
        }
    }
}

/// The dotted path of the TOML key whose value starts at byte `pos` (best effort, for error messages).
fn field_at(text: &str, pos: usize) -> String {
    let mut table = String::new();
    let mut key = String::new();
    let mut at = 0;
    for line in text.lines() {
        let trimmed = line.trim();
        if at > pos {
            break;
        }
        if trimmed.starts_with('[') {
            table = trimmed
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string();
            key.clear();
        } else if let Some((k, _)) = trimmed.split_once('=') {
            key = k.trim().to_string();
        }
        at += line.len() + 1;
    }
    match (table.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every example in `configs/` reads and validates (a renamed field or a bad value fails here, not in
    /// a researcher's first run); the GPU one asks for the resident loop and `auto` kernels.
    #[test]
    fn every_example_config_reads_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut names = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let run =
                    RunConfig::from_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                run.validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                names.push(p.file_name().unwrap().to_string_lossy().to_string());
                if names.last().is_some_and(|n| n == "smollm2-cuda.toml") {
                    let t = &run.train;
                    assert_eq!(t.backend, BackendKind::Cuda);
                    assert_eq!(
                        (t.encoder_kernel, t.sparse_kernels, t.act_blocks),
                        (EncoderKernel::Auto, SparseKernels::Auto, ActBlocks::Auto)
                    );
                    assert_eq!((run.model.n_layers, run.model.d_model), (30, 576));
                }
            }
        }
        names.sort();
        assert_eq!(
            names,
            ["smollm2-cuda.toml", "stories260k.toml", "synthetic.toml"]
        );
    }
}

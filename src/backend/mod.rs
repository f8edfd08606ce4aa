//! The seam between the algorithms and the hardware.
//!
//! [`Backend`] is the only thing that knows CPU from GPU: the trainer calls its operations (a step's loss and
//! gradient, the optimiser update), never kernels. The CPU backend is always present, in two flavours: the fast
//! sparse path and the dense reference. The CUDA backend exists behind the `cuda` cargo feature; without it
//! (or without a driver) asking for it returns [`crate::Error::BackendUnavailable`]. With it, the step's loss and
//! gradient run on the device ([`cuda::step::loss_and_grad`]: parameters uploaded and gradients downloaded
//! each step); the optimiser, the parameters and their checkpoints stay on the host, exactly the CPU's, so a
//! run resumes on either backend.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod grads;

pub use grads::{Grads, Objective, StepStats, ThresholdGrad};

use crate::Result;
use crate::clt::{CltConfig, Params};

/// Which implementation runs the training step.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Sparse CPU path (the default).
    #[default]
    Cpu,
    /// Dense CPU reference (every feature decoded; for tests and as the benchmark baseline).
    CpuDense,
    /// CUDA (requires the `cuda` feature and an NVIDIA driver).
    Cuda,
}

/// A ready-to-use backend.
#[derive(Debug)]
pub enum Backend {
    Cpu,
    CpuDense,
    /// The device the step runs on.
    #[cfg(feature = "cuda")]
    Cuda(cuda::Gpu),
}

impl Backend {
    /// Opens the requested backend, or explains why it cannot be had.
    pub fn new(kind: BackendKind) -> Result<Self> {
        match kind {
            BackendKind::Cpu => Ok(Backend::Cpu),
            BackendKind::CpuDense => Ok(Backend::CpuDense),
            BackendKind::Cuda => cuda_backend(),
        }
    }

    /// The step's loss and gradient on a normalised batch. `preact_mask`, when given, restricts the
    /// pre-activation loss to the marked features (per layer), as SAELens applies it to dead features only.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grad(
        &self,
        cfg: &CltConfig,
        params: &Params,
        dec_norms: &[Vec<f32>],
        x: &[f32],
        y: &[f32],
        n_tokens: usize,
        obj: &Objective,
        preact_mask: Option<&[Vec<bool>]>,
        grads: &mut Grads,
    ) -> Result<StepStats> {
        Ok(match self {
            Backend::Cpu => cpu::sparse::loss_and_grad(
                cfg,
                params,
                dec_norms,
                x,
                y,
                n_tokens,
                obj,
                preact_mask,
                grads,
            ),
            Backend::CpuDense => {
                cpu::dense::loss_and_grad(cfg, params, x, y, n_tokens, obj, preact_mask, grads)
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(gpu) => cuda::step::loss_and_grad(
                gpu,
                cfg,
                params,
                dec_norms,
                x,
                y,
                n_tokens,
                obj,
                preact_mask,
                grads,
            )?,
        })
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend() -> Result<Backend> {
    Err(crate::Error::BackendUnavailable {
        backend: "cuda".into(),
        reason: "built without CUDA support (rebuild with `--features cuda`)".into(),
    })
}

/// With the feature: device 0, or why it cannot be opened (no driver, no device).
#[cfg(feature = "cuda")]
fn cuda_backend() -> Result<Backend> {
    Ok(Backend::Cuda(cuda::Gpu::open(0)?))
}

//! The seam between the algorithms and the hardware.
//!
//! [`Backend`] is the only thing that knows CPU from GPU: the trainer calls its operations (a step's loss and
//! gradient, the optimiser update), never kernels. The CPU backend is always present, in two flavours: the fast
//! sparse path and the dense reference. The CUDA backend exists behind the `cuda` cargo feature; without it
//! (or without a driver) asking for it returns [`crate::Error::BackendUnavailable`]. With it, `cuda` trains
//! with everything resident on the device ([`Resident`]: parameters, Adam's moments, the whole step; the
//! host downloads parameters and moments only for checkpoints, which are the CPU trainer's own, so a run
//! resumes on either backend). `cuda-host` is the earlier split: only the step's loss and gradient on the
//! device (`cuda::step::loss_and_grad`: parameters uploaded and gradients downloaded each step), the
//! optimiser on the host. Which kernels a CUDA step runs is a setting ([`EncoderKernel`], [`SparseKernels`],
//! [`ActBlocks`]); `auto` chooses them on the device by timing ([`tuning`]).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod grads;
pub mod tuning;

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
    /// CUDA (requires the `cuda` feature and an NVIDIA driver): parameters, Adam and the whole step on the
    /// device, the next batch copied from pinned memory on a second stream while the step runs.
    Cuda,
    /// CUDA for the step's loss and gradient only; parameters and Adam on the host (uploaded and
    /// downloaded every step; the reference the resident trainer is tested against).
    CudaHost,
}

/// Which sparse kernels a CUDA step runs for the decode, the activation gradients and the decoder-weight
/// gradient. They give the same bits except the activation gradients, which the tiled kernels sum in
/// another order where rows are multiples of 16 columns (within f32 rounding); they differ in what they
/// fetch (docs/cuda.md, "What the tiled kernels fetch").
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
pub enum SparseKernels {
    /// Gathers: a decoder, residual or input row fetched once per entry that needs it.
    #[default]
    Gather,
    /// Tiled: decoder slices staged in shared memory once per 2,048 tokens (`sparse_decode_tiled`),
    /// residual and input slices once per 2,048 features (`row_grad_tiled`), and for the activation
    /// gradients decoder slices once per tile of up to 512 tokens (`act_grad_partial`; where a row is not
    /// a multiple of 16 columns, a token's residual row once for all its entries, `act_grad_tiled`).
    /// Used where d is a multiple of 8 (the feature-sharded decode that overlaps each layer's all-reduce
    /// included); the gathers otherwise.
    Tiled,
    /// Whichever of the two is faster on the run's device and first batch, among those that agree with
    /// the gathers there (`backend::cuda::tune`); the choice is kept in the run's checkpoints.
    Auto,
}

impl SparseKernels {
    /// The setting's name in a run's TOML (`[train] sparse_kernels`).
    pub fn name(self) -> &'static str {
        match self {
            SparseKernels::Gather => "gather",
            SparseKernels::Tiled => "tiled",
            SparseKernels::Auto => "auto",
        }
    }
}

/// Which tensor-core kernel computes a CUDA backend's encoder GEMM where rows are 16-byte aligned.
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
pub enum EncoderKernel {
    /// `encode_mma`: `mma.sync` m16n8k16, any device this backend runs on.
    #[default]
    Mma,
    /// `encode_wgmma`: Hopper's warpgroup MMA (`wgmma.mma_async` m64n256k16, 128 × 256 tiles, one block
    /// an SM); compute capability 9.x only (elsewhere setting it is an error). The same sums in another
    /// order: within f32 rounding of `mma`.
    Wgmma,
    /// `encode_wgmma_narrow`: the same with 128 × 128 tiles (m64n128k16), two blocks an SM.
    WgmmaNarrow,
    /// `encode_wgmma_tma`: `wgmma`'s tile with its operands copied by the Tensor Memory Accelerator (a
    /// producer warp and mbarriers instead of every thread's `cp.async`); compute capability 9.x only.
    WgmmaTma,
    /// The fastest of those the device runs (`mma`, and the `wgmma` kernels on compute capability 9.x)
    /// on the run's first batch, among those that agree with `mma` there (`backend::cuda::tune`); the
    /// choice is kept in the run's checkpoints.
    Auto,
}

impl EncoderKernel {
    /// The setting's name in a run's TOML (`[train] encoder_kernel`).
    pub fn name(self) -> &'static str {
        match self {
            EncoderKernel::Mma => "mma",
            EncoderKernel::Wgmma => "wgmma",
            EncoderKernel::WgmmaNarrow => "wgmma_narrow",
            EncoderKernel::WgmmaTma => "wgmma_tma",
            EncoderKernel::Auto => "auto",
        }
    }
}

/// How the tiled kernels' activation gradients (`act_grad_partial`) divide an SM's shared memory: how
/// many of their blocks share an SM. More blocks hide more of each other's latency; fewer hold larger
/// token tiles, so the decoder is staged fewer times (docs/cuda.md, "Occupancy"). The gathers ignore it.
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
pub enum ActBlocks {
    /// One block an SM: 128 KB of accumulators (tiles of about 512 tokens at 64 entries a token) and two
    /// 32 KB buffers of 1,024 features' decoder slices.
    #[default]
    One,
    /// Two: 48 KB of accumulators and two buffers of 32 KB.
    Two,
    /// Three: 32 KB of accumulators and two buffers of 16 KB (512 features).
    Three,
    /// The fastest of the three on the run's first batch, tried where `auto` (or the run) takes the tiled
    /// kernels; `one` otherwise.
    Auto,
}

impl ActBlocks {
    /// The setting's name in a run's TOML (`[train] act_blocks`).
    pub fn name(self) -> &'static str {
        match self {
            ActBlocks::One => "one",
            ActBlocks::Two => "two",
            ActBlocks::Three => "three",
            ActBlocks::Auto => "auto",
        }
    }
}

/// The kernels a CUDA step runs, as `[train] encoder_kernel`, `sparse_kernels` and `act_blocks` name them:
/// what a run set to `auto` resolved to on its device (kept in its checkpoints' `state.json`, so that a
/// resumed run runs the same kernels and so the same sums).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelChoice {
    pub encoder: EncoderKernel,
    pub sparse: SparseKernels,
    /// (Absent in checkpoints written before the setting existed, which ran `one`.)
    #[serde(default)]
    pub act_blocks: ActBlocks,
}

impl KernelChoice {
    /// Whether any setting is still `auto`.
    pub fn is_auto(self) -> bool {
        self.encoder == EncoderKernel::Auto
            || self.sparse == SparseKernels::Auto
            || self.act_blocks == ActBlocks::Auto
    }
}

impl std::fmt::Display for KernelChoice {
    /// `mma + tiled`, with `, act_blocks two` where it is not `one`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} + {}", self.encoder.name(), self.sparse.name())?;
        if self.act_blocks != ActBlocks::One {
            write!(f, ", act_blocks {}", self.act_blocks.name())?;
        }
        Ok(())
    }
}

/// A ready-to-use backend.
#[derive(Debug)]
pub enum Backend {
    Cpu,
    CpuDense,
    /// The device the step runs on.
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<cuda::Gpu>),
}

impl Backend {
    /// Opens the requested backend (a CUDA kind on device 0), or explains why it cannot be had.
    pub fn new(kind: BackendKind) -> Result<Self> {
        Self::new_on(kind, 0)
    }

    /// Opens the requested backend, a CUDA kind on device `ordinal` (the CPU kinds ignore it).
    pub fn new_on(kind: BackendKind, ordinal: usize) -> Result<Self> {
        match kind {
            BackendKind::Cpu => Ok(Backend::Cpu),
            BackendKind::CpuDense => Ok(Backend::CpuDense),
            BackendKind::Cuda | BackendKind::CudaHost => cuda_backend(ordinal),
        }
    }

    /// Which sparse kernels a CUDA backend's step runs (the CPU backends have one kind only); `auto` runs
    /// the gathers until the trainer has timed the candidates.
    pub fn set_sparse_kernels(&self, kernels: SparseKernels) {
        #[cfg(feature = "cuda")]
        if let Backend::Cuda(gpu) = self {
            gpu.set_sparse_kernels(kernels);
        }
        #[cfg(not(feature = "cuda"))]
        let _ = kernels;
    }

    /// Which tensor-core encoder a CUDA backend runs (the CPU backends ignore it); an error where the
    /// device cannot run it. `auto` runs `mma` until the trainer has timed the candidates.
    pub fn set_encoder_kernel(&self, kernel: EncoderKernel) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Backend::Cuda(gpu) = self {
            gpu.set_encoder_kernel(kernel)?;
        }
        #[cfg(not(feature = "cuda"))]
        let _ = kernel;
        Ok(())
    }

    /// How a CUDA backend's `act_grad_partial` divides its shared memory (the CPU backends ignore it);
    /// `auto` runs `one` until the trainer has timed the candidates.
    pub fn set_act_blocks(&self, blocks: ActBlocks) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Backend::Cuda(gpu) = self {
            gpu.set_act_tiling(cuda::backward::ActTiling::for_blocks(blocks))?;
        }
        #[cfg(not(feature = "cuda"))]
        let _ = blocks;
        Ok(())
    }

    /// The `act_blocks` division a CUDA backend's `act_grad_partial` runs; `None` on the CPU backends (and
    /// for a division set otherwise, through `Gpu::set_act_tiling`).
    pub fn act_blocks(&self) -> Option<ActBlocks> {
        match self {
            #[cfg(feature = "cuda")]
            Backend::Cuda(gpu) => {
                let now = gpu.act_tiling();
                [ActBlocks::One, ActBlocks::Two, ActBlocks::Three]
                    .into_iter()
                    .find(|b| cuda::backward::ActTiling::for_blocks(*b) == now)
            }
            _ => None,
        }
    }

    /// The tensor-core encoder a CUDA backend runs; `None` on the CPU backends.
    pub fn encoder_kernel(&self) -> Option<EncoderKernel> {
        match self {
            #[cfg(feature = "cuda")]
            Backend::Cuda(gpu) => Some(gpu.encoder_kernel()),
            _ => None,
        }
    }

    /// The sparse kernels a CUDA backend's step runs; `None` on the CPU backends.
    pub fn sparse_kernels(&self) -> Option<SparseKernels> {
        match self {
            #[cfg(feature = "cuda")]
            Backend::Cuda(gpu) => Some(gpu.sparse_kernels()),
            _ => None,
        }
    }

    /// The device-resident trainer state for `params` and `adam` (the `cuda` backend's training loop).
    #[cfg(feature = "cuda")]
    pub fn resident(
        &self,
        cfg: &CltConfig,
        params: &Params,
        adam: &cpu::adam::AdamState,
        hyper: cpu::adam::AdamHyper,
    ) -> Result<Resident> {
        match self {
            Backend::Cuda(gpu) => Resident::new(gpu.clone(), cfg, params, adam, hyper),
            _ => Err(crate::Error::Unsupported(
                "a resident trainer on a CPU backend".into(),
            )),
        }
    }

    /// Without the `cuda` feature there is no resident trainer (and no CUDA backend to ask for one).
    #[cfg(not(feature = "cuda"))]
    pub fn resident(
        &self,
        _cfg: &CltConfig,
        _params: &Params,
        _adam: &cpu::adam::AdamState,
        _hyper: cpu::adam::AdamHyper,
    ) -> Result<Resident> {
        Err(no_cuda_support())
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

/// The resident CUDA trainer ([`cuda::resident::Resident`]).
#[cfg(feature = "cuda")]
pub use cuda::resident::{Resident, ResidentStep};

/// Without the `cuda` feature: an uninhabited stand-in for the resident CUDA trainer, so the trainer's code
/// is the same with and without the feature.
#[cfg(not(feature = "cuda"))]
pub enum Resident {}

/// What a resident step reports (the stand-in's; never constructed without the feature).
#[cfg(not(feature = "cuda"))]
pub struct ResidentStep {
    pub stats: StepStats,
    pub grad_norm: f64,
}

#[cfg(not(feature = "cuda"))]
impl Resident {
    pub fn adam_t(&self) -> u64 {
        match *self {}
    }
    pub fn staged(&self) -> usize {
        match *self {}
    }
    pub fn download(&self) -> Result<(Params, cpu::adam::AdamState)> {
        match *self {}
    }
    pub fn stage(&mut self, _batch: &crate::data::Batch) -> Result<()> {
        match *self {}
    }
    pub fn stage_coded(
        &mut self,
        _batch: &crate::data::CodedBatch,
        _norms: &crate::clt::NormScales,
    ) -> Result<()> {
        match *self {}
    }
    pub fn decodes(_codec: crate::store::Codec) -> bool {
        false
    }
    pub fn step(
        &mut self,
        _obj: &Objective,
        _preact_mask: Option<&[Vec<bool>]>,
        _lr: f32,
        _clip_norm: f32,
        _step: u64,
    ) -> Result<ResidentStep> {
        match *self {}
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda_support() -> crate::Error {
    crate::Error::BackendUnavailable {
        backend: "cuda".into(),
        reason: "built without CUDA support (rebuild with `--features cuda`)".into(),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(_ordinal: usize) -> Result<Backend> {
    Err(no_cuda_support())
}

/// With the feature: device `ordinal`, or why it cannot be opened (no driver, no such device).
#[cfg(feature = "cuda")]
fn cuda_backend(ordinal: usize) -> Result<Backend> {
    Ok(Backend::Cuda(std::sync::Arc::new(cuda::Gpu::open(
        ordinal,
    )?)))
}

//! `auto` kernels on the device: which encoder GEMM (`[train] encoder_kernel`), which sparse kernels
//! (`sparse_kernels`) and which division of `act_grad_partial`'s shared memory (`act_blocks`) a run's
//! step uses, chosen on the run's own device and first batch ([`crate::backend::tuning`]: the order, the
//! check, the choice).
//!
//! The encoders are tried first (every one the device runs, with the sparse kernels at the gathers or
//! as fixed), then the tiled kernels with the encoder chosen, then, where the tiled kernels are chosen,
//! `act_grad_partial` at two and three blocks an SM: at most seven candidates. Each runs the step
//! once for the check, and one that agrees is timed as the median of three steps after one more warm-up.
//! A candidate whose launch fails is an error naming it: a kernel fault leaves the CUDA context unusable,
//! so there is no trying the next one.

use super::adam::sum_sq;
use super::backward::ActTiling;
use super::bench::{Timer, median_after};
use super::context::Gpu;
use super::decode::tiled_applies;
use super::step::{DeviceBatch, DeviceGrads, DeviceParams, device_loss_and_grad};
use crate::backend::grads::{Objective, StepStats};
use crate::backend::tuning::{Summary, Trial, Tuning, agrees, encoders, fastest};
use crate::backend::{ActBlocks, KernelChoice, SparseKernels};
use crate::clt::CltConfig;
use crate::{Error, Result};

/// The summary of a step's statistics and gradients (the gradients' norms summed on the device).
pub fn summarize(gpu: &Gpu, stats: &StepStats, g: &DeviceGrads) -> Result<Summary> {
    let mut grad_sq = Vec::with_capacity(g.layers.len());
    for (l, lg) in g.layers.iter().enumerate() {
        let mut s = 0.0;
        for buf in [&lg.w_enc, &lg.b_enc, &lg.log_theta, &lg.w_dec] {
            s += sum_sq(gpu, buf)?;
        }
        if let Some(b) = g.b_dec.get(l) {
            s += sum_sq(gpu, b)?;
        }
        grad_sq.push(s);
    }
    Ok(Summary {
        loss: stats.loss(),
        sq_err: stats.sq_err.clone(),
        n_active: stats.n_active.clone(),
        grad_sq,
    })
}

/// Resolves `wanted` on `gpu`: each candidate's step is `run` (the loss and gradient of the same batch
/// with the device's current kernels), checked against the reference's and timed by `timer`. Leaves the
/// device on the chosen kernels. With nothing `auto`, runs nothing and returns `wanted`. Where `tiled` is
/// false (the shape's rows are not what the tiled kernels read: [`tiled_applies`]), the tiled kernels
/// would run the gathers, so `auto` resolves to the gathers and one block without trying them.
pub fn tune(
    gpu: &Gpu,
    wanted: KernelChoice,
    tiled: bool,
    run: &mut dyn FnMut() -> Result<(StepStats, DeviceGrads)>,
    timer: &mut dyn Timer,
) -> Result<Tuning> {
    let device = gpu.describe();
    if !wanted.is_auto() {
        return Ok(Tuning {
            wanted,
            chosen: wanted,
            trials: Vec::new(),
            device,
        });
    }
    let first_sparse = match wanted.sparse {
        SparseKernels::Auto => SparseKernels::Gather,
        s => s,
    };
    let try_tiled = tiled && wanted.sparse == SparseKernels::Auto;
    let first_act = match wanted.act_blocks {
        ActBlocks::Auto => ActBlocks::One,
        b => b,
    };
    let mut trials: Vec<Trial> = Vec::new();
    let mut attempt = |kernels: KernelChoice, trials: &mut Vec<Trial>| -> Result<()> {
        let named = |e: Error| Error::Cuda {
            what: format!(
                "auto kernels: the candidate {kernels} (set encoder_kernel, sparse_kernels and \
                 act_blocks to avoid it)"
            ),
            reason: e.to_string(),
        };
        apply(gpu, kernels)?;
        let summary = run()
            .and_then(|(stats, g)| summarize(gpu, &stats, &g))
            .map_err(named)?;
        let disagrees = match trials.first() {
            None => None,
            Some(r) => agrees(&summary, &r.summary).err(),
        };
        let ms = match disagrees {
            Some(_) => None,
            None => Some(
                timer
                    .time(gpu, &kernels.to_string(), &mut || run().map(|_| ()))
                    .map_err(named)?,
            ),
        };
        trials.push(Trial {
            kernels,
            summary,
            disagrees,
            ms,
        });
        Ok(())
    };
    for encoder in encoders(wanted.encoder, gpu.has_wgmma()) {
        let k = KernelChoice {
            encoder,
            sparse: first_sparse,
            act_blocks: first_act,
        };
        attempt(k, &mut trials)?;
    }
    if try_tiled {
        let k = KernelChoice {
            sparse: SparseKernels::Tiled,
            ..fastest(&trials)
        };
        attempt(k, &mut trials)?;
    }
    let best = fastest(&trials);
    if wanted.act_blocks == ActBlocks::Auto && best.sparse == SparseKernels::Tiled && tiled {
        for act_blocks in [ActBlocks::Two, ActBlocks::Three] {
            attempt(KernelChoice { act_blocks, ..best }, &mut trials)?;
        }
    }
    let chosen = fastest(&trials);
    apply(gpu, chosen)?;
    Ok(Tuning {
        wanted,
        chosen,
        trials,
        device,
    })
}

/// Sets `gpu` to run `kernels` (an `auto` setting as its default: `mma`, the gathers, one block).
pub fn apply(gpu: &Gpu, kernels: KernelChoice) -> Result<()> {
    gpu.set_encoder_kernel(kernels.encoder)?;
    gpu.set_sparse_kernels(kernels.sparse);
    gpu.set_act_tiling(ActTiling::for_blocks(kernels.act_blocks))
}

/// [`tune`] on a batch and parameters on the device: each candidate runs [`device_loss_and_grad`].
#[allow(clippy::too_many_arguments)]
pub fn tune_step(
    gpu: &Gpu,
    wanted: KernelChoice,
    cfg: &CltConfig,
    dp: &DeviceParams,
    batch: &DeviceBatch,
    obj: &Objective,
    preact_mask: Option<&[Vec<bool>]>,
    timer: &mut dyn Timer,
) -> Result<Tuning> {
    tune(
        gpu,
        wanted,
        tiled_applies(cfg.d_model),
        &mut || device_loss_and_grad(gpu, cfg, dp, batch, obj, preact_mask),
        timer,
    )
}

/// The timer `auto` uses: the median of three event-timed steps after one warm-up (the check's run
/// was the first).
pub struct Steps;

impl Timer for Steps {
    fn time(&mut self, gpu: &Gpu, _name: &str, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        median_after(gpu, 1, 3, f)
    }
}

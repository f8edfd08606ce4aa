//! The distributed training step and loop: feature-sharded (the default), data-parallel
//! (`[train] parallel = "data"`: every rank holds the whole model, takes its slice of each batch through the
//! single-process step, and the gradients are summed across ranks, each weighted by its share of the tokens),
//! or both on a 2-D grid (`parallel = "grid"`, `feature_shards = k`: world rank `r` holds feature shard
//! `r mod k` of replica `r / k`; see [`Grid`]).
//!
//! What is subtle here (feature sharding):
//! - The step is the single-process sparse step cut in two ([`crate::backend::cpu::sparse::backward`] after the forward): the local
//!   decode's partial reconstructions are summed across ranks before the residual is taken, so the loss,
//!   the residual, and with them the decoder-bias and skip gradients are the same on every rank. Rank 0's
//!   partial starts from `b_dec` and the skip term is added after the sum, so with one rank the step is the
//!   single-process step bit for bit.
//! - Every rank reads the same batch from its own copy of the source (same configuration, same seed), so no
//!   activations travel; see `docs/distributed.md` for why and what it costs.
//! - Per-feature sums (the sparsity and pre-activation losses, L0 and window counts, dead features, the
//!   squared gradient norm of the feature parameters) are local and summed across ranks in one all-reduce; the
//!   replicated tensors' squared norm is counted once. Clipping therefore uses the global norm.
//! - Every rank runs the same sequence of collectives (logging and checkpoint decisions depend on the step
//!   only), which is what keeps them in lock step.
//!
//! On a grid, the feature-sharded step runs on the replica's slice of the batch with the partials summed over
//! the replica's feature group (`feat`); then each shard's gradient, weighted by the slice's share of the
//! tokens, is summed over the ranks that hold the same shard (`data`), exactly as data-parallel sums whole
//! gradients; the statistics are summed over the whole world, the quantities every shard of a replica holds
//! (reconstruction loss, squared errors) counted by shard 0 only and those every replica holds after the
//! gradient sum (the shard's squared gradient norm) by replica 0 only, so clipping sees the global norm and
//! rank 0 reports what one process would. With `overlap`, the partials' all-reduce runs per target layer,
//! each started as soon as the decode of its source layer completes it ([`Comm::sum_f32_parts`]); the CUDA
//! steps decode a target layer at a time instead, each layer's sum (NCCL on a stream of its own, or MPI
//! from the host) running while the next decodes (`partials_sum`).
//!
//! This file holds the trainer's state, its construction and resumption, the step's outline, the loop and
//! the checkpoints; the parts live beside it: `setup` (the start-up checks, the device, the `auto` kernels
//! agreed across ranks), `grid` (the ranks' arrangement), `grads` (the host-side steps and the sums across
//! ranks) and `device` (the CUDA steps' sums and the resident loop).

use super::checkpoint::{self, Manifest, ShardData};
use super::comm::Comm;
use super::shard::{init_shard, local_config};
use crate::backend::cpu::adam::{self, AdamHyper, AdamState};
use crate::backend::{Backend, Grads, KernelChoice};
use crate::clt::params::decoder_norms;
use crate::clt::{CltConfig, NormScales, Params, Transcoder};
use crate::data::{ActivationSource, Batch};
use crate::rng::Rng;
use crate::train::init::{calibrate_b_enc, default_fire_rate, estimate_norms};
use crate::train::metrics::{Interval, MetricsLine};
use crate::train::trainer::{
    TuningNote, fetch_batch, initial_kernels, make_source, prune_checkpoints, wanted_kernels,
};
use crate::train::{Parallel, PreactScope, RunConfig, StepReport, liveness, schedule};
use crate::{Error, Result};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Seconds spent per phase since the trainer started (this rank).
#[derive(Clone, Debug, Default)]
pub struct Timing {
    pub steps: u64,
    /// Whole steps.
    pub step_s: f64,
    /// Waiting for batches.
    pub data_s: f64,
    /// The all-reduce of the partial reconstructions (data-parallel: of the gradients); with `overlap`, the
    /// time in the collective calls that is not decoding (on the device with NCCL, where decode and
    /// all-reduce are queued together, the whole span).
    pub reduce_s: f64,
    /// The all-reduce of the shards' gradients over the replicas (grid).
    pub grads_s: f64,
    /// The sparse decode of the partial reconstructions (feature-sharded and grid): with `reduce_s`, the
    /// phase that `overlap` shortens.
    pub decode_s: f64,
    /// The all-reduce of statistics and squared gradient norms.
    pub stats_s: f64,
    /// A TopK or BatchTopK shard's encoding with the selection across shards (its candidates' all-gather
    /// included).
    pub select_s: f64,
}

/// A feature-sharded training run on one rank.
pub struct ShardedTrainer<C: Comm> {
    /// The whole run's configuration (the full model).
    pub run: RunConfig,
    pub comm: C,
    /// The features of every layer this rank owns.
    pub range: Range<usize>,
    /// The arrangement of the ranks.
    pub grid: Grid,
    /// The ranks of this rank's replica (they hold its feature shards): the partials' all-reduce.
    feat: C,
    /// The ranks holding this rank's feature shard (one per replica): the gradients' all-reduce.
    data: C,
    /// This rank's parameters (features `range`; replicated decoder biases and skip weights).
    pub params: Params,
    pub norms: NormScales,
    pub step: u64,
    pub tokens_seen: u64,
    pub timing: Timing,
    local: CltConfig,
    adam: AdamState,
    hyper: AdamHyper,
    grads: Grads,
    dec_norms: Vec<Vec<f32>>,
    last_fired: Vec<Vec<u64>>,
    rng: Rng,
    source: Box<dyn ActivationSource>,
    batch: Batch,
    fault: Option<Fault>,
    /// The step's backend: the CPU, or the CUDA step (`cuda-host`).
    backend: Backend,
    /// The CUDA step's sum of the partial reconstructions on the device (NCCL over `feat`), where
    /// [`device_sum_over`] chose it.
    #[cfg(feature = "cuda")]
    device_sum: Option<Box<dyn super::comm::DeviceSum>>,
    /// The resident loop's device state (backend `cuda`): while it exists, it holds the current
    /// parameters and Adam's state, and `params` and `adam` are refreshed from it only by
    /// [`ShardedTrainer::sync_from_device`] (checkpoints do it themselves).
    #[cfg(feature = "cuda")]
    resident: Option<crate::backend::cuda::resident::Resident>,
    /// The resident step's gradients between the loss and the update.
    #[cfg(feature = "cuda")]
    pending: Option<crate::backend::cuda::step::DeviceGrads>,
    /// The resident loop's sum of the gradients over the replicas on the device (NCCL over `data`), where
    /// [`device_sum_over`] chose it; and the packed buffer it sums.
    #[cfg(feature = "cuda")]
    grad_sum: Option<Box<dyn super::comm::DeviceSum>>,
    #[cfg(feature = "cuda")]
    grad_buf: Option<crate::backend::cuda::memory::DBuf<f32>>,
    /// The resident loop's next batch, read and staged on the device during this step (its copy overlaps
    /// the step), with the source's position before it (what a checkpoint records, so that a resumed run
    /// reads it again).
    #[cfg(feature = "cuda")]
    next: Option<(Batch, Option<Vec<f64>>, serde_json::Value)>,
    /// The whole batch's target variance when the resident loop staged it as the store's codes (the host
    /// then holds the f32 targets only where the partials are summed through it); `None` otherwise.
    batch_var: Option<Vec<f64>>,
    /// The kernels the step runs, `auto` settings resolved (the same on every rank); `None` until the
    /// first step resolves them.
    kernels: Option<KernelChoice>,
    /// What resolving `auto` found, until [`ShardedTrainer::train`] prints it (rank 0) and writes
    /// `tuning.json`: the report's lines and the report.
    tuning: Option<TuningNote>,
}

/// A fault injected for the failure tests (`CLT_DIST_FAULT=kill:RANK:STEP` or `hang:RANK:STEP`): the rank
/// dies (SIGABRT), or stops responding, when it reaches the step.
#[derive(Clone, Copy, Debug)]
struct Fault {
    hang: bool,
    rank: usize,
    step: u64,
}

fn fault_from_env() -> Option<Fault> {
    let v = std::env::var("CLT_DIST_FAULT").ok()?;
    let mut it = v.split(':');
    let hang = match it.next()? {
        "hang" => true,
        "kill" => false,
        _ => return None,
    };
    Some(Fault {
        hang,
        rank: it.next()?.parse().ok()?,
        step: it.next()?.parse().ok()?,
    })
}

#[cfg(feature = "cuda")]
mod device;
mod grads;
mod grid;
mod setup;

#[cfg(feature = "cuda")]
use device::device_sum_over;
pub use grid::{Grid, rank_range};
use grid::{check_split, grid_axes};
use setup::{check_backend, step_backend};
pub use setup::{check_same_config, config_hash};

impl<C: Comm> ShardedTrainer<C> {
    /// A fresh run on the source its configuration names (every rank opens its own).
    pub fn new(run: RunConfig, comm: C) -> Result<Self> {
        let source = make_source(&run)?;
        Self::with_source(run, source, comm)
    }

    /// A fresh run on a given source, which must deliver the same batches on every rank.
    pub fn with_source(
        run: RunConfig,
        mut source: Box<dyn ActivationSource>,
        comm: C,
    ) -> Result<Self> {
        run.validate()?;
        check_same_config(&comm, &run)?;
        check_backend(&run)?;
        check_split(&run, comm.size())?;
        let backend = step_backend(&run)?;
        let cfg = &run.model;
        let dims = source.dims();
        if dims.n_layers != cfg.n_layers || dims.d_model != cfg.d_model {
            return Err(Error::Shape {
                what: "activation source vs model".into(),
                expected: vec![cfg.n_layers, cfg.d_model],
                got: vec![dims.n_layers, dims.d_model],
            });
        }
        let t = &run.train;
        let range = rank_range(&run, comm.rank(), comm.size());
        let grid = Grid::of(&run, comm.size());
        let (feat, data_comm) = grid_axes(&comm, grid)?;
        let local = local_config(cfg, &range);
        let mut rng = Rng::seed(t.seed);
        let (mut norms, mut calib) =
            estimate_norms(source.as_mut(), t.batch_size, t.calibration_batches)?;
        if !t.normalize {
            norms = NormScales::identity(cfg.n_layers);
        }
        norms.apply(cfg.d_model, &mut calib.x, &mut calib.y);
        let mut params = init_shard(cfg, t.theta_init, &mut rng, &range);
        let rate = t.init_fire_rate.unwrap_or_else(|| default_fire_rate(cfg));
        calibrate_b_enc(&local, &mut params, &calib.x, calib.n_tokens, rate);
        let data = ShardData {
            m: Params::zeros(&local),
            v: Params::zeros(&local),
            last_fired: vec![vec![0; range.len()]; cfg.n_layers],
            params,
        };
        Self::assemble(
            run,
            [comm, feat, data_comm],
            range,
            data,
            norms,
            [0, 0, 0],
            rng,
            source,
            (backend, None),
        )
    }

    /// Resumes from a run or checkpoint directory (sharded by any number of ranks, or native), on the source
    /// its configuration names. `steps` overrides the run length.
    pub fn resume(path: &Path, steps: Option<u64>, comm: C) -> Result<Self> {
        let dir = checkpoint::resolve(path)?;
        let run = checkpoint::run_config(&dir)?;
        let source = make_source(&run)?;
        Self::resume_with_source(&dir, source, steps, comm)
    }

    /// Resumes from a checkpoint on a given source.
    pub fn resume_with_source(
        path: &Path,
        mut source: Box<dyn ActivationSource>,
        steps: Option<u64>,
        comm: C,
    ) -> Result<Self> {
        let dir = checkpoint::resolve(path)?;
        let run = checkpoint::run_config(&dir)?;
        check_split(&run, comm.size())?;
        let range = rank_range(&run, comm.rank(), comm.size());
        let (m, data): (Manifest, ShardData) = checkpoint::load_state(&dir, &range)?;
        let mut run = m.run;
        if let Some(s) = steps {
            run.train.steps = s;
        }
        run.validate()?;
        check_same_config(&comm, &run)?;
        check_backend(&run)?;
        let backend = step_backend(&run)?;
        source.restore(&m.source_position)?;
        let (feat, data_comm) = grid_axes(&comm, Grid::of(&run, comm.size()))?;
        Self::assemble(
            run,
            [comm, feat, data_comm],
            range,
            data,
            m.norms,
            [m.step, m.adam_t, m.tokens_seen],
            m.rng,
            source,
            (backend, m.kernels),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        run: RunConfig,
        [comm, feat, data_comm]: [C; 3],
        range: Range<usize>,
        data: ShardData,
        norms: NormScales,
        [step, adam_t, tokens_seen]: [u64; 3],
        rng: Rng,
        source: Box<dyn ActivationSource>,
        (backend, recorded): (Backend, Option<KernelChoice>),
    ) -> Result<Self> {
        let local = local_config(&run.model, &range);
        let (mut kernels, tuning) = initial_kernels(&backend, &run, recorded)?;
        // A recorded `auto` choice is kept only where every rank's device runs it: else all time the
        // candidates again, and agree. (A collective only where there is a recorded `auto` choice: the
        // configuration and the checkpoint are the same on every rank, so all of them take this branch.)
        if wanted_kernels(&run).is_auto() && recorded.is_some() {
            let mut unresolved = [f64::from(u8::from(kernels.is_none()))];
            comm.sum_f64(
                "auto kernels: whether every rank keeps the recorded choice",
                &mut unresolved,
            )?;
            if unresolved[0] > 0.0 && kernels.is_some() {
                initial_kernels(&backend, &run, None)?;
                kernels = None;
            }
        }
        #[cfg(feature = "cuda")]
        let (device_sum, grad_sum) = {
            let sharded = run.train.parallel != Parallel::Data;
            let resident = run.train.backend == crate::backend::BackendKind::Cuda;
            (
                device_sum_over(&run, &feat, &backend, sharded, run.train.overlap)?,
                device_sum_over(&run, &data_comm, &backend, resident, false)?,
            )
        };
        let t = &run.train;
        let hyper = AdamHyper {
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_eps,
        };
        let adam = AdamState {
            m: data.m,
            v: data.v,
            t: adam_t,
        };
        let grads = Grads::zeros(&local);
        #[cfg(feature = "cuda")]
        let resident = match &backend {
            Backend::Cuda(gpu) if t.backend == crate::backend::BackendKind::Cuda => {
                Some(crate::backend::cuda::resident::Resident::new(
                    gpu.clone(),
                    &local,
                    &data.params,
                    &adam,
                    hyper,
                )?)
            }
            _ => None,
        };
        // The device holds the moments and the gradients: the host keeps neither (checkpoints and
        // `sync_from_device` download the moments when they need them).
        #[cfg(feature = "cuda")]
        let (grads, adam) = if resident.is_some() {
            use crate::train::trainer::{empty_grads, empty_params};
            let t = adam.t;
            let none = AdamState {
                m: empty_params(),
                v: empty_params(),
                t,
            };
            (empty_grads(), none)
        } else {
            (grads, adam)
        };
        Ok(ShardedTrainer {
            hyper,
            adam,
            grads,
            dec_norms: decoder_norms(&local, &data.params.w_dec),
            params: data.params,
            last_fired: data.last_fired,
            local,
            norms,
            step,
            tokens_seen,
            timing: Timing::default(),
            rng,
            source,
            batch: Batch::default(),
            fault: fault_from_env(),
            backend,
            #[cfg(feature = "cuda")]
            device_sum,
            #[cfg(feature = "cuda")]
            resident,
            #[cfg(feature = "cuda")]
            pending: None,
            #[cfg(feature = "cuda")]
            grad_sum,
            #[cfg(feature = "cuda")]
            grad_buf: None,
            #[cfg(feature = "cuda")]
            next: None,
            batch_var: None,
            kernels,
            tuning,
            grid: Grid::of(&run, comm.size()),
            range,
            comm,
            feat,
            data: data_comm,
            run,
        })
    }

    /// How the resident loop's gradients are summed over the replicas: `"nccl"`, `"mpi"` (through the
    /// host), or `"none"` (no replicas, or not the resident loop).
    pub fn gradients_via(&self) -> &'static str {
        #[cfg(feature = "cuda")]
        if self.resident.is_some() && self.data.size() > 1 {
            return if self.grad_sum.is_some() {
                "nccl"
            } else {
                "mpi"
            };
        }
        "none"
    }

    /// How this rank's partial reconstructions are summed over its feature group: `"mpi"` (the CPU step,
    /// and the CUDA step through host memory), `"nccl"` (the CUDA step on the device), or `"none"` where
    /// there is nothing to sum (data-parallel, or one shard per replica).
    pub fn partials_via(&self) -> &'static str {
        if self.run.train.parallel == Parallel::Data || self.feat.size() == 1 {
            return "none";
        }
        #[cfg(feature = "cuda")]
        if self.device_sum.is_some() {
            return "nccl";
        }
        "mpi"
    }

    /// This rank's shard as a transcoder of `range.len()` features (the replicated tensors included).
    pub fn shard(&self) -> Transcoder {
        Transcoder {
            cfg: self.local.clone(),
            params: self.params.clone(),
            norms: self.norms.clone(),
        }
    }

    /// Runs one optimiser step (a collective: every rank must call it).
    pub fn step(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        if let Some(f) = self.fault
            && f.rank == self.comm.rank()
            && f.step == self.step
        {
            // No rank number here: the tests check that the *other* ranks (or the launcher) name it.
            eprintln!(
                "clt: CLT_DIST_FAULT: {} at step {}",
                if f.hang {
                    "hanging"
                } else {
                    "killing this process"
                },
                f.step
            );
            if f.hang {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            std::process::abort();
        }
        #[cfg(feature = "cuda")]
        let data_wait_s = if self.resident.is_some() {
            self.stage_batches()?
        } else {
            self.fetch_into_batch()?
        };
        #[cfg(not(feature = "cuda"))]
        let data_wait_s = self.fetch_into_batch()?;
        let t = &self.run.train;
        let obj = schedule::objective(t, self.step);
        let dead_mask: Option<Vec<Vec<bool>>> = match t.preact_scope {
            PreactScope::All => None,
            PreactScope::DeadOnly => Some(self.dead_mask()),
        };
        self.resolve_kernels(&obj, dead_mask.as_deref())?;
        let t = &self.run.train;
        let n = self.batch.n_tokens;
        let (clip_norm, lr) = (t.clip_norm, schedule::learning_rate(t, self.step));
        let (stats, grad_norm) = match t.parallel {
            #[cfg(feature = "cuda")]
            _ if self.resident.is_some() => self.resident_grads(&obj, dead_mask.as_deref())?,
            Parallel::Features | Parallel::Grid => {
                self.feature_sharded_grads(&obj, dead_mask.as_deref())?
            }
            Parallel::Data => self.data_parallel_grads(&obj, dead_mask.as_deref())?,
        };
        if !stats.loss().is_finite() {
            return Err(Error::NonFinite {
                what: "loss".into(),
                step: self.step,
            });
        }
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite {
                what: "gradient norm".into(),
                step: self.step,
            });
        }
        let scale = adam::clip_scale(clip_norm, grad_norm);
        #[cfg(feature = "cuda")]
        let on_device = match (self.resident.as_mut(), self.pending.take()) {
            (Some(resident), Some(g)) => {
                resident.apply(&g, lr, scale)?;
                true
            }
            _ => false,
        };
        #[cfg(not(feature = "cuda"))]
        let on_device = false;
        if !on_device {
            adam::step(
                &self.local,
                &self.hyper,
                &mut self.params,
                &mut self.adam,
                &self.grads,
                lr,
                scale,
                &mut self.dec_norms,
            );
        }
        liveness::mark_fired(&mut self.last_fired, &stats.active_count, self.step);
        self.step += 1;
        self.tokens_seen += n as u64;
        self.timing.steps += 1;
        self.timing.data_s += data_wait_s;
        self.timing.step_s += started.elapsed().as_secs_f64();
        Ok(StepReport {
            stats,
            grad_norm,
            lr,
            lambda: obj.lambda,
            data_wait_s,
        })
    }

    /// The kernels the step runs, `auto` settings resolved; `None` until the first step resolves them.
    pub fn kernels(&self) -> Option<KernelChoice> {
        self.kernels
    }

    /// Reads the next batch from the source into `self.batch`, normalised; returns the seconds spent
    /// waiting for it.
    fn fetch_into_batch(&mut self) -> Result<f64> {
        fetch_batch(
            self.source.as_mut(),
            &mut self.batch,
            &self.norms,
            &self.run,
        )
    }

    /// Per layer, per local feature: whether it has not fired in the last `dead_window` steps.
    pub fn dead_mask(&self) -> Vec<Vec<bool>> {
        liveness::dead_mask(&self.last_fired, self.step, self.run.train.dead_window)
    }

    /// Dead features per layer over all ranks (a collective).
    pub fn dead_per_layer(&self) -> Result<Vec<usize>> {
        let mut counts: Vec<f64> = self
            .dead_mask()
            .iter()
            .map(|l| l.iter().filter(|d| **d).count() as f64)
            .collect();
        if self.grid.shards > 1 {
            // The replicas of a shard hold the same clocks (their firing counts are summed every step): sum
            // over the shards of one replica.
            self.feat
                .sum_f64("all-reduce of dead-feature counts", &mut counts)?;
        }
        Ok(counts.into_iter().map(|c| c as usize).collect())
    }

    /// Trains to the configured number of steps. Rank 0 logs to `out/metrics.jsonl` (and the terminal unless
    /// `quiet`); every rank writes its shard of each checkpoint into `out/checkpoints/`.
    pub fn train(&mut self, out: &Path, quiet: bool) -> Result<Option<MetricsLine>> {
        let lead = self.comm.rank() == 0;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let metrics_path = out.join("metrics.jsonl");
        let mut metrics = if lead {
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&metrics_path)
                    .map_err(|e| Error::io(&metrics_path, e))?,
            )
        } else {
            None
        };
        let total = self.run.train.steps;
        let mut iv = Interval::default();
        let mut clock = Instant::now();
        let mut last = None;
        while self.step < total {
            let rep = self.step()?;
            if let Some((lines, report)) = self.tuning.take()
                && lead
            {
                let path = out.join("tuning.json");
                let json = serde_json::to_vec_pretty(&report).map_err(|e| Error::Checkpoint {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                crate::clt::checkpoint::write_atomic(&path, &json)?;
                if !quiet {
                    for line in lines {
                        eprintln!("{line}");
                    }
                }
            }
            iv.add(&rep.stats, rep.grad_norm);
            iv.data_wait_s += rep.data_wait_s;
            let t = &self.run.train;
            if self.step.is_multiple_of(t.log_every) || self.step == total {
                let dead = self.dead_per_layer()?;
                let line = MetricsLine::from_interval(
                    &iv,
                    self.step,
                    self.tokens_seen,
                    rep.lambda,
                    rep.lr,
                    dead,
                    clock.elapsed().as_secs_f64(),
                );
                if let Some(f) = metrics.as_mut() {
                    let json =
                        serde_json::to_string(&line).map_err(|e| Error::Source(e.to_string()))?;
                    writeln!(f, "{json}").map_err(|e| Error::io(&metrics_path, e))?;
                    if !quiet {
                        eprintln!("{}", line.summary());
                    }
                }
                last = Some(line);
                iv = Interval::default();
                clock = Instant::now();
            }
            let every = t.checkpoint_every;
            if (every > 0 && self.step.is_multiple_of(every)) || self.step == total {
                self.save_checkpoint(out)?;
            }
        }
        self.sync_from_device()?;
        Ok(last)
    }

    /// Where a resumed run must read from: before the batch the resident loop has already read for the
    /// next step, else where the source stands.
    fn source_position(&self) -> serde_json::Value {
        #[cfg(feature = "cuda")]
        if let Some((_, _, position)) = &self.next {
            return position.clone();
        }
        self.source.position()
    }

    /// This rank's current parameters and Adam's state: from the device in the resident loop, else the
    /// host's (copies).
    fn current_state(&self) -> Result<(Params, AdamState)> {
        #[cfg(feature = "cuda")]
        if let Some(resident) = &self.resident {
            return resident.download();
        }
        Ok((self.params.clone(), self.adam.clone()))
    }

    /// Refreshes `params`, `adam` and the decoder norms from the device in the resident loop (a no-op
    /// otherwise); [`ShardedTrainer::train`] does it when it finishes.
    pub fn sync_from_device(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(resident) = &self.resident {
            let (params, adam) = resident.download()?;
            self.dec_norms = decoder_norms(&self.local, &params.w_dec);
            self.params = params;
            self.adam = adam;
        }
        Ok(())
    }

    /// Writes a sharded checkpoint of the current state into `out/checkpoints/` and points `LATEST` at it
    /// (a collective: every rank writes its shard, rank 0 the manifest).
    pub fn save_checkpoint(&self, out: &Path) -> Result<PathBuf> {
        let rank = self.comm.rank();
        let root = out.join("checkpoints");
        let name = format!("step_{:08}", self.step);
        let final_dir = root.join(&name);
        let tmp = root.join(format!(".{name}.tmp"));
        if rank == 0 {
            std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            }
            std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        self.comm.barrier("checkpoint: directory created")?;
        let (params, adam) = self.current_state()?;
        let adam_t = adam.t;
        let data = ShardData {
            params,
            m: adam.m,
            v: adam.v,
            last_fired: self.last_fired.clone(),
        };
        // Replicas hold identical shards: replica 0 (world ranks `0..shards`) writes them.
        let writers = self.grid.shards;
        if rank < writers {
            checkpoint::write_shard(&tmp, &self.run.model, rank, &self.range, &data)?;
        }
        self.comm.barrier("checkpoint: shards written")?;
        if rank == 0 {
            let shards = (0..writers)
                .map(|r| {
                    let range = rank_range(&self.run, r, writers);
                    let (tensors, state) = checkpoint::shard_files(r);
                    checkpoint::ShardEntry {
                        rank: r,
                        start: range.start,
                        end: range.end,
                        tensors,
                        state,
                    }
                })
                .collect();
            let m = Manifest {
                format: checkpoint::FORMAT.into(),
                version: checkpoint::VERSION,
                world: writers,
                step: self.step,
                adam_t,
                tokens_seen: self.tokens_seen,
                rng: self.rng.clone(),
                source_position: self.source_position(),
                norms: self.norms.clone(),
                run: self.run.clone(),
                shards,
                kernels: self.kernels,
            };
            checkpoint::write_manifest(&tmp, &m)?;
            if final_dir.exists() {
                std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
            }
            std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
            crate::clt::checkpoint::sync_dir(&root)?;
            crate::clt::checkpoint::write_atomic(&root.join("LATEST"), name.as_bytes())?;
            prune_checkpoints(&root, &name, self.run.train.keep_checkpoints)?;
        }
        self.comm.barrier("checkpoint: manifest written")?;
        Ok(final_dir)
    }
}

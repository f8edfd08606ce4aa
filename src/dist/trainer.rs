//! The distributed training step and loop: feature-sharded (the default), data-parallel
//! (`[train] parallel = "data"`: every rank holds the whole model, takes its slice of each batch through the
//! single-process step, and the gradients are summed across ranks, each weighted by its share of the tokens),
//! or both on a 2-D grid (`parallel = "grid"`, `feature_shards = k`: world rank `r` holds feature shard
//! `r mod k` of replica `r / k`; see [`Grid`]).
//!
//! What is subtle here (feature sharding):
//! - The step is the single-process sparse step cut in two ([`backward`] after the forward): the local
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

use super::checkpoint::{self, Manifest, ShardData};
use super::comm::Comm;
use super::shard::{check_shardable, feature_range, init_shard, local_config};
use crate::backend::cpu::adam::{self, AdamHyper, AdamState};
use crate::backend::cpu::encode::encode_all_with;
use crate::backend::cpu::sparse::{
    add_skip, backward, decode_features, decode_layers, decode_start, thresholds,
};
use crate::backend::grads::target_variance;
use crate::backend::tuning::{Tuning, every_choice};
use crate::backend::{
    Backend, BackendKind, Grads, KernelChoice, Objective, StepStats, ThresholdGrad,
};
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

/// A 64-bit hash of a run configuration, compared across ranks at start-up.
pub fn config_hash(run: &RunConfig) -> u64 {
    let json = serde_json::to_vec(run).unwrap_or_default();
    xxhash_rust::xxh3::xxh3_64(&json)
}

/// Checks that every rank was given the same configuration; the error names the ranks that differ.
pub fn check_same_config<C: Comm>(comm: &C, run: &RunConfig) -> Result<()> {
    let hashes = comm.gather_u64("configuration check", config_hash(run))?;
    let differ: Vec<usize> = (0..hashes.len())
        .filter(|r| hashes[*r] != hashes[0])
        .collect();
    if let Some(&first) = differ.first() {
        let rank = if comm.rank() == 0 { first } else { comm.rank() };
        return Err(Error::Distributed {
            rank,
            reason: format!(
                "the run configuration of rank(s) {differ:?} differs from rank 0's (hashes {:016x} vs \
                 {:016x}): every rank must be started with the same configuration",
                hashes[first], hashes[0]
            ),
        });
    }
    Ok(())
}

/// Sums the shards' partial reconstructions over `feat` (the CPU and the CUDA step alike), timing it.
fn timed_sum<C: Comm>(feat: &C, timing: &mut Timing, what: &str, yhat: &mut [f32]) -> Result<()> {
    let t = Instant::now();
    feat.sum_f32(what, yhat)?;
    timing.reduce_s += t.elapsed().as_secs_f64();
    Ok(())
}

/// The backends distributed training runs: the sparse CPU step; the CUDA step with host-side parameters
/// and Adam (`cuda_host`): data-parallel, each rank runs the single-process step on its slice;
/// feature-sharded and grid, each rank's device encodes and decodes its features, the partial
/// reconstructions are summed (NCCL on the device, or MPI through the host), and the device runs the
/// backward on the residual; and the resident loop (`cuda`: parameters, Adam's moments and the update on
/// the device) in every mode, its gradients summed over replicas on the device. With skip connections,
/// the shard that adds the decoder bias to its partial adds the skip term too. With `overlap`, the
/// device decodes its partials a target layer at a time and each layer's all-reduce (NCCL on a stream of
/// its own, or MPI from the host) runs while the next decodes.
fn check_backend(run: &RunConfig) -> Result<()> {
    let t = &run.train;
    match t.backend {
        BackendKind::Cpu => Ok(()),
        BackendKind::CudaHost | BackendKind::Cuda => Ok(()),
        kind => Err(Error::Unsupported(format!(
            "distributed training runs the sparse CPU step or a CUDA step (cuda, cuda_host); backend \
             {kind:?} is not supported"
        ))),
    }
}

/// The backend this rank's step runs on. With a CUDA backend, the device is `CLT_CUDA_DEVICE` if set, else
/// the rank's index on its node (Open MPI's `OMPI_COMM_WORLD_LOCAL_RANK`, MPICH's `MPI_LOCALRANKID`,
/// Slurm's `SLURM_LOCALID`) modulo the node's device count, so the ranks of a node take one GPU each.
fn step_backend(run: &RunConfig) -> Result<Backend> {
    let kind = run.train.backend;
    if !matches!(kind, BackendKind::CudaHost | BackendKind::Cuda) {
        return Backend::new(kind);
    }
    let env_index = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().and_then(|v| v.parse::<usize>().ok()))
    };
    let ordinal = match env_index(&["CLT_CUDA_DEVICE"]) {
        Some(d) => d,
        None => {
            let local = env_index(&[
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "MPI_LOCALRANKID",
                "SLURM_LOCALID",
            ])
            .unwrap_or(0);
            local % device_count()?.max(1)
        }
    };
    let backend = Backend::new_on(kind, ordinal)?;
    backend.set_sparse_kernels(run.train.sparse_kernels);
    backend.set_encoder_kernel(run.train.encoder_kernel)?;
    Ok(backend)
}

/// The kernels every rank takes after timing the `auto` candidates on its own step: per candidate, the
/// step times summed over the ranks (a candidate that a rank did not time, or found to disagree with its
/// reference, counts as infinitely slow); rank 0 picks the least (the first of equals) and the others take
/// its choice, so that rounding in the sums cannot split them. The reference (the first trial) is timed
/// on every rank, so there is always a choice.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn agree_on_kernels<C: Comm>(comm: &C, tuning: &Tuning) -> Result<KernelChoice> {
    let every = every_choice();
    let mut ms = vec![f64::INFINITY; every.len()];
    for t in &tuning.trials {
        if let (Some(v), None, Some(i)) = (
            t.ms,
            &t.disagrees,
            every.iter().position(|k| *k == t.kernels),
        ) {
            ms[i] = v;
        }
    }
    comm.sum_f64("auto kernels: the candidates' step times", &mut ms)?;
    let mut pick = [0.0];
    if comm.rank() == 0 {
        let mut best: Option<(usize, f64)> = None;
        for (i, &v) in ms.iter().enumerate() {
            if v.is_finite() && best.is_none_or(|(_, b)| v < b) {
                best = Some((i, v));
            }
        }
        let reference = tuning.trials.first().map(|t| t.kernels);
        let fallback = reference.and_then(|r| every.iter().position(|k| *k == r));
        pick[0] = best.map(|(i, _)| i).or(fallback).unwrap_or(0) as f64;
    }
    comm.sum_f64("auto kernels: rank 0's choice", &mut pick)?;
    every
        .get(pick[0] as usize)
        .copied()
        .ok_or_else(|| Error::Source(format!("auto kernels: rank 0 chose {}", pick[0])))
}

#[cfg(feature = "cuda")]
fn device_count() -> Result<usize> {
    crate::backend::cuda::context::device_count()
}

#[cfg(not(feature = "cuda"))]
fn device_count() -> Result<usize> {
    // Without the feature, Backend::new_on reports that CUDA is not built in.
    Ok(1)
}

/// Whether a CUDA run sums device buffers over `group` (the partial reconstructions over `feat`, or the
/// resident loop's gradients over `data`) on the device through NCCL: when the step runs on a GPU, `used`
/// (the run has such a sum), the group has more than one rank, `collectives` allows it and (for `auto`)
/// every rank of the group can load libnccl. Otherwise `None`, and the sum goes through the host and MPI.
/// With `own_stream` (the partials' sum under `overlap`), NCCL runs on a second stream so that its
/// all-reduces overlap the decode. A collective over `group`: every rank reaches the same choice.
#[cfg(feature = "cuda")]
fn device_sum_over<C: Comm>(
    run: &RunConfig,
    group: &C,
    backend: &Backend,
    used: bool,
    own_stream: bool,
) -> Result<Option<Box<dyn super::comm::DeviceSum>>> {
    use crate::train::Collectives;
    let Backend::Cuda(gpu) = backend else {
        return Ok(None);
    };
    let required = match run.train.collectives {
        Collectives::Mpi => return Ok(None),
        _ if !used || group.size() == 1 => return Ok(None),
        Collectives::Nccl => true,
        Collectives::Auto => false,
    };
    match group.device_sum(gpu, required, own_stream)? {
        None if required => Err(Error::Unsupported(
            "collectives = \"nccl\" needs an MPI launch built with the `mpi` and `cuda` features"
                .into(),
        )),
        sum => Ok(sum),
    }
}

/// How a CUDA step's partial reconstruction becomes the whole one: summed over `feat` on the device by
/// `nccl`, or nothing to sum with one shard; else downloaded and summed over MPI. With `overlap`, a target
/// layer at a time, each layer's sum running while the next decodes ([`PartialSum::DeviceParts`],
/// [`PartialSum::HostParts`]).
///
/// Timing: without `overlap` the decode has synchronised the stream, so the time in the sum, added to
/// `timing.reduce_s`, is the all-reduce's alone. With `overlap` through the host, the decode and copy of
/// each layer go to `timing.decode_s` and the rest of the collective's time to `reduce_s`, as on the CPU;
/// on the device the two are queued together, so `reduce_s` takes the whole span (decode included).
#[cfg(feature = "cuda")]
fn partials_sum<'a, C: Comm>(
    feat: &'a C,
    timing: &'a mut Timing,
    nccl: Option<&'a dyn super::comm::DeviceSum>,
    overlap: bool,
) -> crate::backend::cuda::step::PartialSum<'a> {
    use crate::backend::cuda::{memory::DBuf, step::PartialSum};
    const WHAT: &str = "all-reduce of the partial reconstructions";
    match nccl {
        None if feat.size() > 1 && overlap => {
            PartialSum::HostParts(Box::new(move |parts, fill| {
                let mut decode_s = 0.0;
                let started = Instant::now();
                feat.sum_f32_parts(WHAT, parts, &mut |l, part| {
                    let t = Instant::now();
                    fill(l, part);
                    decode_s += t.elapsed().as_secs_f64();
                })?;
                timing.decode_s += decode_s;
                timing.reduce_s += started.elapsed().as_secs_f64() - decode_s;
                Ok(())
            }))
        }
        None if feat.size() > 1 => PartialSum::Host(Box::new(move |yhat: &mut [f32]| {
            timed_sum(feat, timing, WHAT, yhat)
        })),
        Some(nccl) if overlap => PartialSum::DeviceParts(Box::new(move |yhat, parts, decode| {
            let t = Instant::now();
            nccl.sum_parts(WHAT, yhat, parts, decode)?;
            timing.reduce_s += t.elapsed().as_secs_f64();
            Ok(())
        })),
        _ => PartialSum::Device(Box::new(move |yhat: &mut DBuf<f32>| {
            if let Some(nccl) = nccl {
                let t = Instant::now();
                nccl.sum(WHAT, yhat)?;
                timing.reduce_s += t.elapsed().as_secs_f64();
            }
            Ok(())
        })),
    }
}

/// Replica `replica`'s slice of `batch` out of `replicas` (all of it with one), rows of `row` elements.
#[cfg(feature = "cuda")]
fn replica_slice(
    batch: &Batch,
    (replica, replicas, row): (usize, usize, usize),
) -> std::borrow::Cow<'_, Batch> {
    if replicas == 1 {
        return std::borrow::Cow::Borrowed(batch);
    }
    let n = batch.n_tokens;
    let (lo, hi) = (n * replica / replicas, n * (replica + 1) / replicas);
    std::borrow::Cow::Owned(Batch {
        n_tokens: hi - lo,
        x: batch.x[lo * row..hi * row].to_vec(),
        y: batch.y[lo * row..hi * row].to_vec(),
    })
}

/// How the ranks of a run are arranged: `shards` ranks share each replica's features and `replicas`
/// replicas split each batch (feature-sharded: one replica; data-parallel: one shard). World rank `r` holds
/// feature shard `r mod shards` of replica `r / shards`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub shards: usize,
    pub replicas: usize,
}

impl Grid {
    /// The arrangement of `world` ranks that `run` asks for (one process is one shard of one replica).
    pub fn of(run: &RunConfig, world: usize) -> Grid {
        let world = world.max(1);
        match run.train.parallel {
            Parallel::Features => Grid {
                shards: world,
                replicas: 1,
            },
            Parallel::Data => Grid {
                shards: 1,
                replicas: world,
            },
            Parallel::Grid => {
                let k = run.train.feature_shards.unwrap_or(1).clamp(1, world);
                Grid {
                    shards: k,
                    replicas: world / k,
                }
            }
        }
    }

    /// The feature shard world rank `rank` holds.
    pub fn shard(&self, rank: usize) -> usize {
        rank % self.shards
    }

    /// The replica world rank `rank` belongs to.
    pub fn replica(&self, rank: usize) -> usize {
        rank / self.shards
    }
}

/// The features rank `rank` of `world` holds: its shard, or all of them in data-parallel mode.
pub fn rank_range(run: &RunConfig, rank: usize, world: usize) -> Range<usize> {
    let g = Grid::of(run, world);
    feature_range(run.model.n_features, g.shard(rank), g.shards)
}

/// Checks that the model can be split over `world` ranks the way the configuration asks.
fn check_split(run: &RunConfig, world: usize) -> Result<()> {
    if let (Parallel::Grid, Some(k)) = (run.train.parallel, run.train.feature_shards)
        && world > 1
        && !world.is_multiple_of(k)
    {
        return Err(Error::config(
            "train.feature_shards",
            format!("{k} feature shards do not divide the {world} ranks"),
        ));
    }
    let g = Grid::of(run, world);
    check_shardable(&run.model, g.shards)?;
    if g.replicas > 1 {
        if let crate::clt::Activation::BatchTopK { .. } = run.model.activation {
            return Err(Error::Unsupported(
                "data-parallel BatchTopK: its selection spans the whole batch, which no rank sees"
                    .into(),
            ));
        }
        if run.train.batch_size < g.replicas {
            return Err(Error::config(
                "train.batch_size",
                format!(
                    "{} tokens cannot be split over {} data-parallel replicas",
                    run.train.batch_size, g.replicas
                ),
            ));
        }
    }
    Ok(())
}

/// The two axes of the grid as groups of `comm`: the ranks of this rank's replica (ranked by shard), and
/// the ranks holding this rank's shard (ranked by replica).
fn grid_axes<C: Comm>(comm: &C, grid: Grid) -> Result<(C, C)> {
    let (shard, replica) = (grid.shard(comm.rank()), grid.replica(comm.rank()));
    let feat = comm.split(replica, shard)?;
    let data = comm.split(shard, replica)?;
    Ok((feat, data))
}

/// Weights every gradient tensor (the decoder's data term and norm coefficients included) by `w`, and sums
/// them over `comm` in one all-reduce with the touched-row flags and the per-feature firing counts. Every
/// term of the loss is a mean over tokens, so when `w` is each rank's share of the batch the sum is the
/// gradient of the whole batch.
fn sum_gradients<C: Comm>(
    comm: &C,
    cfg: &CltConfig,
    g: &mut Grads,
    active_count: &mut [Vec<u32>],
    w: f64,
) -> Result<()> {
    let mut buf: Vec<f32> = Vec::with_capacity(g.p.len() + 3 * cfg.n_layers * cfg.n_features);
    for t in g.p.tensors() {
        buf.extend(t.iter().map(|v| v * w as f32));
    }
    for c in &g.dec_coef {
        buf.extend(c.iter().map(|v| v * w as f32));
    }
    for t in &g.dec_touched {
        buf.extend(t.iter().map(|b| if *b { 1.0 } else { 0.0 }));
    }
    for c in active_count.iter() {
        buf.extend(c.iter().map(|v| *v as f32));
    }
    comm.sum_f32("all-reduce of the gradients", &mut buf)?;
    let mut it = buf.into_iter();
    for t in g.p.tensors_mut() {
        t.iter_mut().zip(&mut it).for_each(|(v, s)| *v = s);
    }
    for c in g.dec_coef.iter_mut() {
        c.iter_mut().zip(&mut it).for_each(|(v, s)| *v = s);
    }
    for t in g.dec_touched.iter_mut() {
        t.iter_mut().zip(&mut it).for_each(|(v, s)| *v = s > 0.0);
    }
    for c in active_count.iter_mut() {
        c.iter_mut().zip(&mut it).for_each(|(v, s)| *v = s as u32);
    }
    Ok(())
}

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
        let backend = step_backend(&run)?;
        let cfg = &run.model;
        check_split(&run, comm.size())?;
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
            let resident = run.train.backend == BackendKind::Cuda;
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
            Backend::Cuda(gpu) if t.backend == BackendKind::Cuda => {
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

    /// Resolves the run's `auto` kernels, once, before the first step's compute (a collective): every rank
    /// times the candidates on its own step ([`crate::backend::cuda::tune`]), and all take the candidate
    /// whose step times summed over the ranks are least, among those that agreed with the reference on
    /// every rank.
    #[cfg(feature = "cuda")]
    fn resolve_kernels(
        &mut self,
        obj: &Objective,
        preact_mask: Option<&[Vec<bool>]>,
    ) -> Result<()> {
        use crate::train::trainer::{TuneOn, tune_kernels, tuning_note};
        if self.kernels.is_some() {
            return Ok(());
        }
        let wanted = wanted_kernels(&self.run);
        let on = TuneOn {
            resident: self.resident.as_mut(),
            backend: &self.backend,
            cfg: &self.local,
            params: &self.params,
            dec_norms: &self.dec_norms,
            batch: &self.batch,
        };
        let (Some(tuning), Backend::Cuda(gpu)) =
            (tune_kernels(wanted, on, obj, preact_mask)?, &self.backend)
        else {
            self.kernels = Some(wanted);
            return Ok(());
        };
        let chosen = agree_on_kernels(&self.comm, &tuning)?;
        crate::backend::cuda::tune::apply(gpu, chosen)?;
        self.kernels = Some(chosen);
        let line = format!(
            "  over {} rank(s) (rank 0's trials above): {chosen}, the least step time summed over the \
             ranks among the candidates every rank agreed on",
            self.comm.size()
        );
        self.tuning = Some(tuning_note(
            self.tuning.take(),
            &tuning,
            Some((chosen, line)),
        )?);
        Ok(())
    }

    /// Without the `cuda` feature no backend has kernels to choose.
    #[cfg(not(feature = "cuda"))]
    fn resolve_kernels(&mut self, _obj: &Objective, _mask: Option<&[Vec<bool>]>) -> Result<()> {
        self.kernels.get_or_insert(wanted_kernels(&self.run));
        Ok(())
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

    /// The resident loop's batches: this step's (staged during the previous step, or read and staged now
    /// on the first step and after a resume) becomes `self.batch`; then, unless this is the run's last
    /// step, the next one is read and its replica slice staged, its copy to the device overlapping this
    /// step. Returns the seconds spent waiting for the source.
    #[cfg(feature = "cuda")]
    fn stage_batches(&mut self) -> Result<f64> {
        let mut wait_s = 0.0;
        let at = (
            self.data.rank(),
            self.data.size(),
            self.local.n_layers * self.local.d_model,
        );
        match self.next.take() {
            Some((batch, var, _)) => (self.batch, self.batch_var) = (batch, var),
            None => {
                let (batch, var, wait) = self.fetch_staged(at)?;
                (self.batch, self.batch_var) = (batch, var);
                wait_s += wait;
            }
        }
        if self.step + 1 < self.run.train.steps {
            let position = self.source.position();
            let (next, var, wait) = self.fetch_staged(at)?;
            self.next = Some((next, var, position));
            wait_s += wait;
        }
        Ok(wait_s)
    }

    /// Reads the next batch and stages this replica's slice of it on the device: as the store's int8 /
    /// int4 codes, decoded and normalised there (as the single-process trainer does, `train.device_dequant`),
    /// when the source serves them, else normalised f32. Returns the batch as the host keeps it (f32, or,
    /// when staged as codes, only its size, plus the f32 targets where the partials are summed through
    /// the host), the whole batch's target variance when staged as codes, and the seconds spent waiting
    /// for the source.
    #[cfg(feature = "cuda")]
    fn fetch_staged(
        &mut self,
        at: (usize, usize, usize),
    ) -> Result<(Batch, Option<Vec<f64>>, f64)> {
        let no_device = || Error::Unsupported("a resident step without a device".into());
        let mut coded = crate::data::CodedBatch::default();
        let fetched =
            crate::train::trainer::fetch_coded(self.source.as_mut(), &mut coded, &self.run)?;
        let Some(wait) = fetched else {
            let mut batch = Batch::default();
            let wait = fetch_batch(self.source.as_mut(), &mut batch, &self.norms, &self.run)?;
            let resident = self.resident.as_mut().ok_or_else(no_device)?;
            resident.stage(&replica_slice(&batch, at))?;
            return Ok((batch, None, wait));
        };
        let var = coded.target_variance(&self.norms.target);
        let (replica, replicas, _) = at;
        let n = coded.n_tokens;
        let resident = self.resident.as_mut().ok_or_else(no_device)?;
        if replicas == 1 {
            resident.stage_coded(&coded, &self.norms)?;
        } else {
            let (lo, hi) = (n * replica / replicas, n * (replica + 1) / replicas);
            resident.stage_coded(&coded.slice(lo, hi), &self.norms)?;
        }
        let host_sum = self.run.train.parallel != Parallel::Data && self.device_sum.is_none();
        let mut batch = Batch {
            n_tokens: n,
            x: Vec::new(),
            y: Vec::new(),
        };
        if host_sum {
            coded.decode_into(&mut batch);
            self.norms
                .apply(self.local.d_model, &mut batch.x, &mut batch.y);
        }
        Ok((batch, Some(var), wait))
    }

    /// The feature-sharded step's loss and gradient: local encode and decode of this replica's slice of the
    /// batch (all of it without replicas), the partials summed over the replica's ranks, the local backward,
    /// the shard's gradient summed over the replicas (weighted by their shares of the tokens), the
    /// statistics summed.
    fn feature_sharded_grads(
        &mut self,
        obj: &Objective,
        dead_mask: Option<&[Vec<bool>]>,
    ) -> Result<(StepStats, f64)> {
        let local = &self.local;
        let row = local.n_layers * local.d_model;
        let (replica, replicas) = (self.data.rank(), self.data.size());
        let n = self.batch.n_tokens;
        let (lo, hi) = (n * replica / replicas, n * (replica + 1) / replicas);
        let (x, y) = (
            &self.batch.x[lo * row..hi * row],
            &self.batch.y[lo * row..hi * row],
        );
        let nl = hi - lo;
        let with_bias = self.feat.rank() == 0;
        let what = "all-reduce of the partial reconstructions";
        #[cfg(feature = "cuda")]
        if let Backend::Cuda(gpu) = &self.backend {
            let sum = partials_sum(
                &self.feat,
                &mut self.timing,
                self.device_sum.as_deref(),
                self.run.train.overlap,
            );
            let stats = crate::backend::cuda::step::sharded_loss_and_grad(
                gpu,
                local,
                &self.params,
                &self.dec_norms,
                x,
                y,
                nl,
                obj,
                dead_mask,
                with_bias,
                sum,
                &mut self.grads,
            )?;
            return self.finish_sharded(stats, nl);
        }
        let by_h = obj.threshold_grad == ThresholdGrad::Preact;
        let thetas = thresholds(&self.params);
        let codes = encode_all_with(local, &self.params, x, nl, &thetas, obj.bandwidth, by_h);
        let mut yhat = if self.run.train.overlap {
            let (yhat, decode_s, reduce_s) =
                overlapped_partials(&self.feat, what, local, &self.params, &codes, nl, with_bias)?;
            self.timing.reduce_s += reduce_s;
            self.timing.decode_s += decode_s;
            yhat
        } else {
            let decode = Instant::now();
            let mut yhat = decode_features(local, &self.params, &codes, nl, with_bias);
            self.timing.decode_s += decode.elapsed().as_secs_f64();
            timed_sum(&self.feat, &mut self.timing, what, &mut yhat)?;
            yhat
        };
        add_skip(local, &self.params, x, nl, &mut yhat);
        let stats = backward(
            local,
            &self.params,
            &self.dec_norms,
            x,
            y,
            nl,
            obj,
            dead_mask,
            &thetas,
            codes,
            yhat,
            &mut self.grads,
        );
        self.finish_sharded(stats, nl)
    }

    /// The rest of a feature shard's step, after its loss and gradient on its `nl` tokens: the gradients
    /// summed over replicas, the statistics over the world, and the global gradient norm.
    fn finish_sharded(&mut self, mut stats: StepStats, nl: usize) -> Result<(StepStats, f64)> {
        let local = &self.local;
        let replicas = self.data.size();
        let n = self.batch.n_tokens;
        // This slice's share of the batch's tokens (exactly 1 without replicas).
        let w = nl as f64 / n.max(1) as f64;
        if replicas > 1 {
            let t = Instant::now();
            sum_gradients(
                &self.data,
                local,
                &mut self.grads,
                &mut stats.active_count,
                w,
            )?;
            self.timing.grads_s += t.elapsed().as_secs_f64();
            // Every rank holds the whole batch: the target variance needs no communication.
            stats.target_var = self.batch_target_var();
            stats.n_tokens = n;
        }
        let (feat_sq, shared_sq) =
            adam::grad_sq_parts(local, &self.params, &self.grads, &self.dec_norms);
        let stats_t = Instant::now();
        let grad_norm = self.reduce_stats(&mut stats, feat_sq, shared_sq, w)?;
        self.timing.stats_s += stats_t.elapsed().as_secs_f64();
        Ok((stats, grad_norm))
    }

    /// The data-parallel step's loss and gradient: this rank's slice of the batch through the single-process
    /// step, its gradient weighted by its share of the tokens and summed over ranks (one all-reduce of every
    /// gradient tensor), its statistics likewise.
    fn data_parallel_grads(
        &mut self,
        obj: &Objective,
        dead_mask: Option<&[Vec<bool>]>,
    ) -> Result<(StepStats, f64)> {
        let (rank, world) = (self.comm.rank(), self.comm.size());
        let cfg = &self.local;
        let row = cfg.n_layers * cfg.d_model;
        let n = self.batch.n_tokens;
        let (lo, hi) = (n * rank / world, n * (rank + 1) / world);
        let x = &self.batch.x[lo * row..hi * row];
        let y = &self.batch.y[lo * row..hi * row];
        let mut stats = self.backend.loss_and_grad(
            cfg,
            &self.params,
            &self.dec_norms,
            x,
            y,
            hi - lo,
            obj,
            dead_mask,
            &mut self.grads,
        )?;
        // Every term of the loss is a mean over tokens: weighting each rank's mean by its share of the batch
        // and summing gives the mean over the whole batch.
        let w = (hi - lo) as f64 / n.max(1) as f64;
        let reduce = Instant::now();
        sum_gradients(&self.comm, cfg, &mut self.grads, &mut stats.active_count, w)?;
        self.timing.reduce_s += reduce.elapsed().as_secs_f64();
        self.sum_replica_stats(&mut stats, w)?;
        let grad_norm = adam::grad_norm(&self.local, &self.params, &self.grads, &self.dec_norms);
        Ok((stats, grad_norm))
    }

    /// Data-parallel statistics: each replica's means weighted by its share `w` of the tokens and summed
    /// over the world with the squared errors and counts; the target variance from the whole batch every
    /// rank holds.
    fn sum_replica_stats(&mut self, stats: &mut StepStats, w: f64) -> Result<()> {
        let cfg = &self.local;
        let n = self.batch.n_tokens;
        let l_n = cfg.n_layers;
        let mut sums = Vec::with_capacity(3 + 3 * l_n);
        sums.extend([stats.recon * w, stats.sparsity * w, stats.preact * w]);
        sums.extend(stats.sq_err.iter().copied());
        sums.extend(stats.n_active.iter().map(|v| *v as f64));
        sums.extend(stats.n_window.iter().map(|v| *v as f64));
        let stats_t = Instant::now();
        self.comm
            .sum_f64("all-reduce of the step statistics", &mut sums)?;
        self.timing.stats_s += stats_t.elapsed().as_secs_f64();
        stats.recon = sums[0];
        stats.sparsity = sums[1];
        stats.preact = sums[2];
        for l in 0..l_n {
            stats.sq_err[l] = sums[3 + l];
            stats.n_active[l] = sums[3 + l_n + l] as usize;
            stats.n_window[l] = sums[3 + 2 * l_n + l] as usize;
        }
        // Every rank holds the whole batch: the target variance needs no communication.
        stats.target_var = self.batch_target_var();
        stats.n_tokens = n;
        Ok(())
    }

    /// The whole batch's target variance: from the codes it was staged as, else from its f32 targets.
    fn batch_target_var(&self) -> Vec<f64> {
        let (cfg, n) = (&self.local, self.batch.n_tokens);
        self.batch_var
            .clone()
            .unwrap_or_else(|| target_variance(&self.batch.y, n, cfg.n_layers, cfg.d_model))
    }

    /// The resident loop's loss and gradient in every mode: this replica's slice of the batch staged to
    /// the device; the shard's step (partials summed over `feat`, on the device with NCCL or through the
    /// host) or, data-parallel, the whole model's; with replicas, the gradients weighted by the slice's
    /// share of the tokens and summed over `data` ([`ShardedTrainer::sum_device_grads`]); the squared
    /// gradient norm's parts from the device; the statistics as the host-side modes reduce them. The
    /// gradients wait in `pending` for [`crate::backend::cuda::resident::Resident::apply`].
    #[cfg(feature = "cuda")]
    fn resident_grads(
        &mut self,
        obj: &Objective,
        dead_mask: Option<&[Vec<bool>]>,
    ) -> Result<(StepStats, f64)> {
        let mut resident = self.resident.take().expect("the resident loop's state");
        let out = self.resident_grads_on(&mut resident, obj, dead_mask);
        self.resident = Some(resident);
        out
    }

    #[cfg(feature = "cuda")]
    fn resident_grads_on(
        &mut self,
        resident: &mut crate::backend::cuda::resident::Resident,
        obj: &Objective,
        dead_mask: Option<&[Vec<bool>]>,
    ) -> Result<(StepStats, f64)> {
        use crate::backend::cuda::step::ShardSum;
        let (l_n, d) = (self.local.n_layers, self.local.d_model);
        let row = l_n * d;
        let (replica, replicas) = (self.data.rank(), self.data.size());
        let n = self.batch.n_tokens;
        let (lo, hi) = (n * replica / replicas, n * (replica + 1) / replicas);
        let w = (hi - lo) as f64 / n.max(1) as f64;
        // This replica's slice of `self.batch` is the oldest batch staged ([`ShardedTrainer::stage_batches`]).
        let sharded = self.run.train.parallel != Parallel::Data;
        let (mut stats, g) = if sharded {
            let sum = partials_sum(
                &self.feat,
                &mut self.timing,
                self.device_sum.as_deref(),
                self.run.train.overlap,
            );
            let shard = ShardSum {
                // Read only where the partials are summed through the host, which keeps f32 targets.
                y: self.batch.y.get(lo * row..hi * row).unwrap_or(&[]),
                with_bias: self.feat.rank() == 0,
                sum,
            };
            resident.loss_and_grad(obj, dead_mask, Some(shard), self.step)?
        } else {
            resident.loss_and_grad(obj, dead_mask, None, self.step)?
        };
        if replicas > 1 {
            let t = Instant::now();
            self.sum_device_grads(resident.gpu(), &g, w)?;
            let took = t.elapsed().as_secs_f64();
            if sharded {
                self.timing.grads_s += took;
            } else {
                self.timing.reduce_s += took;
            }
            for (l, lg) in g.layers.iter().enumerate() {
                stats.active_count[l] = resident.gpu().download(&lg.active_count)?;
            }
        }
        let (feature_sq, shared_sq) = resident.grad_sq_parts(&g)?;
        self.pending = Some(g);
        let stats_t = Instant::now();
        let grad_norm = if sharded {
            if replicas > 1 {
                stats.target_var = self.batch_target_var();
                stats.n_tokens = n;
            }
            self.reduce_stats(&mut stats, feature_sq, shared_sq, w)?
        } else {
            self.sum_replica_stats(&mut stats, w)?;
            (feature_sq + shared_sq).sqrt()
        };
        self.timing.stats_s += stats_t.elapsed().as_secs_f64();
        Ok((stats, grad_norm))
    }

    /// Sums the device gradients `g`, each replica's weighted by `w`, over `data` (the ranks holding this
    /// shard): packed into one buffer ([`crate::backend::cuda::gradsum`]), summed by NCCL where
    /// `grad_sum` holds it, else downloaded, summed over MPI and uploaded, then unpacked.
    #[cfg(feature = "cuda")]
    fn sum_device_grads(
        &mut self,
        gpu: &crate::backend::cuda::Gpu,
        g: &crate::backend::cuda::step::DeviceGrads,
        w: f64,
    ) -> Result<()> {
        use crate::backend::cuda::gradsum;
        let what = "all-reduce of the gradients";
        let len = gradsum::packed_len(gpu, g);
        if self.grad_buf.as_ref().is_none_or(|b| b.len() != len) {
            self.grad_buf = Some(gpu.zeros(len)?);
        }
        let buf = self.grad_buf.as_mut().expect("allocated above");
        gradsum::pack(gpu, g, w as f32, buf)?;
        match &self.grad_sum {
            Some(nccl) => nccl.sum(what, buf)?,
            None => {
                let mut host = gpu.download(buf)?;
                self.data.sum_f32(what, &mut host)?;
                *buf = gpu.upload(&host)?;
            }
        }
        gradsum::unpack(gpu, buf, g)
    }

    /// Sums the per-feature statistics and the feature parameters' squared gradient norm over the world (one
    /// all-reduce); returns the global gradient norm. Each slice's means are weighted by its share `w` of the
    /// tokens; with replicas, the reconstruction loss and squared errors (the same on every shard of a
    /// replica) come from shard 0 of each replica, and the shard's squared gradient norm (the same on every
    /// replica after the gradient sum) from replica 0.
    fn reduce_stats(
        &self,
        stats: &mut StepStats,
        feat_sq: f64,
        shared_sq: f64,
        w: f64,
    ) -> Result<f64> {
        let l_n = self.local.n_layers;
        let replicas = self.data.size();
        let first_shard = if self.feat.rank() == 0 { 1.0 } else { 0.0 };
        let first_replica = if self.data.rank() == 0 { 1.0 } else { 0.0 };
        let mut buf = Vec::with_capacity(4 + 3 * l_n);
        buf.extend([
            stats.sparsity * w,
            stats.preact * w,
            feat_sq * first_replica,
        ]);
        buf.extend(stats.n_active.iter().map(|v| *v as f64));
        buf.extend(stats.n_window.iter().map(|v| *v as f64));
        if replicas > 1 {
            buf.push(stats.recon * w * first_shard);
            buf.extend(stats.sq_err.iter().map(|v| v * first_shard));
        }
        self.comm
            .sum_f64("all-reduce of the step statistics", &mut buf)?;
        stats.sparsity = buf[0];
        stats.preact = buf[1];
        for l in 0..l_n {
            stats.n_active[l] = buf[3 + l] as usize;
            stats.n_window[l] = buf[3 + l_n + l] as usize;
        }
        if replicas > 1 {
            stats.recon = buf[3 + 2 * l_n];
            stats.sq_err.copy_from_slice(&buf[4 + 2 * l_n..]);
        }
        Ok((buf[2] + shared_sq).sqrt())
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

/// The partial reconstructions of `n` tokens summed over `comm`, one target layer at a time: source layer
/// `l` is decoded, which completes target layer `l`, and that layer's all-reduce starts while layer `l + 1`
/// decodes. The same bits as decoding everything and summing it at once, whenever the sum of a layer's
/// elements over the ranks does not depend on how the buffer is cut (always with two ranks: one addition).
/// Returns the reconstruction, the seconds spent decoding, and those spent in the collective calls but not
/// decoding.
fn overlapped_partials<C: Comm>(
    comm: &C,
    what: &str,
    cfg: &CltConfig,
    params: &Params,
    codes: &[crate::backend::cpu::encode::LayerCodes],
    n: usize,
    with_bias: bool,
) -> Result<(Vec<f32>, f64, f64)> {
    let (l_n, d) = (cfg.n_layers, cfg.d_model);
    let row = l_n * d;
    let mut yhat = decode_start(cfg, params, n, with_bias);
    let mut parts: Vec<Vec<f32>> = (0..l_n).map(|_| vec![0.0; n * d]).collect();
    let mut decode_s = 0.0;
    let started = Instant::now();
    comm.sum_f32_parts(what, &mut parts, &mut |l, part| {
        let t = Instant::now();
        decode_layers(cfg, params, codes, n, l..l + 1, &mut yhat);
        for (b, p) in part.chunks_exact_mut(d).enumerate() {
            p.copy_from_slice(&yhat[b * row + l * d..b * row + (l + 1) * d]);
        }
        decode_s += t.elapsed().as_secs_f64();
    })?;
    let reduce_s = started.elapsed().as_secs_f64() - decode_s;
    crate::backend::cpu::sparse::layer_blocks_into(&parts, d, &mut yhat);
    Ok((yhat, decode_s, reduce_s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::tuning::{Summary, Trial};
    use crate::backend::{ActBlocks, EncoderKernel, SparseKernels};
    use crate::dist::comm::SelfComm;

    /// Over one rank: the least time among the agreeing candidates, whatever the trials' order; the
    /// reference where nothing else agreed.
    #[test]
    fn ranks_agree_on_the_least_time_among_agreeing_candidates() {
        let summary = Summary {
            loss: 1.0,
            sq_err: vec![1.0],
            n_active: vec![1],
            grad_sq: vec![1.0],
        };
        let trial = |encoder, sparse, act_blocks, ms: f64, disagrees: bool| Trial {
            kernels: KernelChoice {
                encoder,
                sparse,
                act_blocks,
            },
            summary: summary.clone(),
            disagrees: disagrees.then(|| "loss".into()),
            ms: (!disagrees).then_some(ms),
        };
        use ActBlocks::{One, Three, Two};
        use EncoderKernel::{Mma, WgmmaNarrow, WgmmaTma};
        use SparseKernels::{Gather, Tiled};
        let auto = KernelChoice {
            encoder: EncoderKernel::Auto,
            sparse: SparseKernels::Auto,
            act_blocks: ActBlocks::Auto,
        };
        let mut t = Tuning {
            wanted: auto,
            chosen: auto,
            trials: vec![
                trial(Mma, Gather, One, 5.0, false),
                trial(WgmmaTma, Gather, One, 1.0, true),
                trial(WgmmaNarrow, Gather, One, 4.0, false),
                trial(WgmmaNarrow, Tiled, One, 3.0, false),
                trial(WgmmaNarrow, Tiled, Two, 3.5, false),
                trial(WgmmaNarrow, Tiled, Three, 2.5, false),
            ],
            device: "a device".into(),
        };
        let got = agree_on_kernels(&SelfComm, &t).unwrap();
        assert_eq!(got, t.trials[5].kernels);
        t.trials.truncate(2);
        assert_eq!(
            agree_on_kernels(&SelfComm, &t).unwrap(),
            t.trials[0].kernels
        );
    }
}

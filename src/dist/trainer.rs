//! The distributed training step and loop: feature-sharded (the default) or data-parallel
//! (`[train] parallel = "data"`: every rank holds the whole model, takes its slice of each batch through the
//! single-process step, and the gradients are summed across ranks, each weighted by its share of the tokens).
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

use super::checkpoint::{self, Manifest, ShardData};
use super::comm::Comm;
use super::shard::{check_shardable, feature_range, init_shard, local_config};
use crate::backend::cpu::adam::{self, AdamHyper, AdamState};
use crate::backend::cpu::encode::encode_all_with;
use crate::backend::cpu::sparse::{add_skip, backward, decode_features, thresholds};
use crate::backend::grads::target_variance;
use crate::backend::{BackendKind, Grads, Objective, StepStats, ThresholdGrad};
use crate::clt::params::decoder_norms;
use crate::clt::{CltConfig, NormScales, Params, Transcoder};
use crate::data::{ActivationSource, Batch};
use crate::rng::Rng;
use crate::train::init::{calibrate_b_enc, default_fire_rate, estimate_norms};
use crate::train::metrics::{Interval, MetricsLine};
use crate::train::trainer::make_source;
use crate::train::{Parallel, PreactScope, RunConfig, StepReport, schedule};
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
    /// The all-reduce of the partial reconstructions.
    pub reduce_s: f64,
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

fn check_backend(run: &RunConfig) -> Result<()> {
    if run.train.backend != BackendKind::Cpu {
        return Err(Error::Unsupported(format!(
            "feature-sharded training runs the sparse CPU step; backend {:?} is not supported",
            run.train.backend
        )));
    }
    Ok(())
}

/// The features rank `rank` of `world` holds: its shard, or all of them in data-parallel mode.
pub fn rank_range(run: &RunConfig, rank: usize, world: usize) -> Range<usize> {
    match run.train.parallel {
        Parallel::Features => feature_range(run.model.n_features, rank, world),
        Parallel::Data => 0..run.model.n_features,
    }
}

/// Checks that the model can be split over `world` ranks the way the configuration asks.
fn check_split(run: &RunConfig, world: usize) -> Result<()> {
    match run.train.parallel {
        Parallel::Features => check_shardable(&run.model, world),
        Parallel::Data => match run.model.activation {
            crate::clt::Activation::BatchTopK { .. } if world > 1 => Err(Error::Unsupported(
                "data-parallel BatchTopK: its selection spans the whole batch, which no rank sees"
                    .into(),
            )),
            _ => Ok(()),
        },
    }
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
        Ok(Self::assemble(
            run, comm, range, data, norms, 0, 0, 0, rng, source,
        ))
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
        source.restore(&m.source_position)?;
        Ok(Self::assemble(
            run,
            comm,
            range,
            data,
            m.norms,
            m.step,
            m.adam_t,
            m.tokens_seen,
            m.rng,
            source,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        run: RunConfig,
        comm: C,
        range: Range<usize>,
        data: ShardData,
        norms: NormScales,
        step: u64,
        adam_t: u64,
        tokens_seen: u64,
        rng: Rng,
        source: Box<dyn ActivationSource>,
    ) -> Self {
        let local = local_config(&run.model, &range);
        let t = &run.train;
        ShardedTrainer {
            hyper: AdamHyper {
                beta1: t.adam_beta1,
                beta2: t.adam_beta2,
                eps: t.adam_eps,
            },
            adam: AdamState {
                m: data.m,
                v: data.v,
                t: adam_t,
            },
            grads: Grads::zeros(&local),
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
            range,
            comm,
            run,
        }
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
        let cfg = &self.run.model;
        let t = &self.run.train;
        let wait = Instant::now();
        self.source.next_batch(t.batch_size, &mut self.batch)?;
        let data_wait_s = wait.elapsed().as_secs_f64();
        self.norms
            .apply(cfg.d_model, &mut self.batch.x, &mut self.batch.y);
        let lambda = schedule::lambda(t, self.step);
        let obj = Objective {
            lambda,
            c: t.tanh_c,
            lambda_preact: t.lambda_preact,
            bandwidth: t.bandwidth,
            threshold_grad: t.threshold_grad,
        };
        let dead_mask: Option<Vec<Vec<bool>>> = match t.preact_scope {
            PreactScope::All => None,
            PreactScope::DeadOnly => Some(self.dead_mask()),
        };
        let n = self.batch.n_tokens;
        let (clip_norm, lr) = (t.clip_norm, schedule::learning_rate(t, self.step));
        let (stats, grad_norm) = match t.parallel {
            Parallel::Features => self.feature_sharded_grads(&obj, dead_mask.as_deref())?,
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
        let scale = if clip_norm > 0.0 {
            (clip_norm as f64 / (grad_norm + 1e-6)).min(1.0) as f32
        } else {
            1.0
        };
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
        for (l, counts) in stats.active_count.iter().enumerate() {
            for (f, c) in counts.iter().enumerate() {
                if *c > 0 {
                    self.last_fired[l][f] = self.step + 1;
                }
            }
        }
        self.step += 1;
        self.tokens_seen += n as u64;
        self.timing.steps += 1;
        self.timing.data_s += data_wait_s;
        self.timing.step_s += started.elapsed().as_secs_f64();
        Ok(StepReport {
            stats,
            grad_norm,
            lr,
            lambda,
            data_wait_s,
        })
    }

    /// The feature-sharded step's loss and gradient: local encode and decode, the partials summed across
    /// ranks, the local backward, the per-feature statistics summed.
    fn feature_sharded_grads(
        &mut self,
        obj: &Objective,
        dead_mask: Option<&[Vec<bool>]>,
    ) -> Result<(StepStats, f64)> {
        let local = &self.local;
        let (x, y, n) = (&self.batch.x, &self.batch.y, self.batch.n_tokens);
        let by_h = obj.threshold_grad == ThresholdGrad::Preact;
        let thetas = thresholds(&self.params);
        let codes = encode_all_with(local, &self.params, x, n, &thetas, obj.bandwidth, by_h);
        let mut yhat = decode_features(local, &self.params, &codes, n, self.comm.rank() == 0);
        let reduce = Instant::now();
        self.comm
            .sum_f32("all-reduce of the partial reconstructions", &mut yhat)?;
        self.timing.reduce_s += reduce.elapsed().as_secs_f64();
        add_skip(local, &self.params, x, n, &mut yhat);
        let mut stats = backward(
            local,
            &self.params,
            &self.dec_norms,
            x,
            y,
            n,
            obj,
            dead_mask,
            &thetas,
            codes,
            yhat,
            &mut self.grads,
        );
        let (feat_sq, shared_sq) =
            adam::grad_sq_parts(local, &self.params, &self.grads, &self.dec_norms);
        let stats_t = Instant::now();
        let grad_norm = self.reduce_stats(&mut stats, feat_sq, shared_sq)?;
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
        let mut stats = crate::backend::cpu::sparse::loss_and_grad(
            cfg,
            &self.params,
            &self.dec_norms,
            x,
            y,
            hi - lo,
            obj,
            dead_mask,
            &mut self.grads,
        );
        // Every term of the loss is a mean over tokens: weighting each rank's mean by its share of the batch
        // and summing gives the mean over the whole batch.
        let w = (hi - lo) as f64 / n.max(1) as f64;
        let g = &mut self.grads;
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
        for c in &stats.active_count {
            buf.extend(c.iter().map(|v| *v as f32));
        }
        let reduce = Instant::now();
        self.comm.sum_f32("all-reduce of the gradients", &mut buf)?;
        self.timing.reduce_s += reduce.elapsed().as_secs_f64();
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
        for c in stats.active_count.iter_mut() {
            c.iter_mut().zip(&mut it).for_each(|(v, s)| *v = s as u32);
        }
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
        stats.target_var = target_variance(&self.batch.y, n, l_n, cfg.d_model);
        stats.n_tokens = n;
        let grad_norm = adam::grad_norm(cfg, &self.params, &self.grads, &self.dec_norms);
        Ok((stats, grad_norm))
    }

    /// Sums the per-feature statistics and the feature parameters' squared gradient norm across ranks (one
    /// all-reduce); returns the global gradient norm.
    fn reduce_stats(&self, stats: &mut StepStats, feat_sq: f64, shared_sq: f64) -> Result<f64> {
        let l_n = self.local.n_layers;
        let mut buf = Vec::with_capacity(3 + 2 * l_n);
        buf.extend([stats.sparsity, stats.preact, feat_sq]);
        buf.extend(stats.n_active.iter().map(|v| *v as f64));
        buf.extend(stats.n_window.iter().map(|v| *v as f64));
        self.comm
            .sum_f64("all-reduce of the step statistics", &mut buf)?;
        stats.sparsity = buf[0];
        stats.preact = buf[1];
        for l in 0..l_n {
            stats.n_active[l] = buf[3 + l] as usize;
            stats.n_window[l] = buf[3 + l_n + l] as usize;
        }
        Ok((buf[2] + shared_sq).sqrt())
    }

    /// Per layer, per local feature: whether it has not fired in the last `dead_window` steps.
    pub fn dead_mask(&self) -> Vec<Vec<bool>> {
        let w = self.run.train.dead_window;
        self.last_fired
            .iter()
            .map(|l| l.iter().map(|s| self.step.saturating_sub(*s) > w).collect())
            .collect()
    }

    /// Dead features per layer over all ranks (a collective).
    pub fn dead_per_layer(&self) -> Result<Vec<usize>> {
        let mut counts: Vec<f64> = self
            .dead_mask()
            .iter()
            .map(|l| l.iter().filter(|d| **d).count() as f64)
            .collect();
        if self.run.train.parallel == Parallel::Features {
            // Data-parallel ranks all hold every feature's clock already.
            self.comm
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
        Ok(last)
    }

    /// Writes a sharded checkpoint of the current state into `out/checkpoints/` and points `LATEST` at it
    /// (a collective: every rank writes its shard, rank 0 the manifest).
    pub fn save_checkpoint(&self, out: &Path) -> Result<PathBuf> {
        let (rank, world) = (self.comm.rank(), self.comm.size());
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
        let data = ShardData {
            params: self.params.clone(),
            m: self.adam.m.clone(),
            v: self.adam.v.clone(),
            last_fired: self.last_fired.clone(),
        };
        // Data-parallel ranks hold identical models: rank 0 writes the one shard.
        let writers = match self.run.train.parallel {
            Parallel::Features => world,
            Parallel::Data => 1,
        };
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
                adam_t: self.adam.t,
                tokens_seen: self.tokens_seen,
                rng: self.rng.clone(),
                source_position: self.source.position(),
                norms: self.norms.clone(),
                run: self.run.clone(),
                shards,
            };
            checkpoint::write_manifest(&tmp, &m)?;
            if final_dir.exists() {
                std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
            }
            std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
            crate::clt::checkpoint::sync_dir(&root)?;
            crate::clt::checkpoint::write_atomic(&root.join("LATEST"), name.as_bytes())?;
            prune(&root, &name, self.run.train.keep_checkpoints)?;
        }
        self.comm.barrier("checkpoint: manifest written")?;
        Ok(final_dir)
    }
}

/// Removes all but the newest `keep` checkpoints (never `keep_latest`).
fn prune(root: &Path, keep_latest: &str, keep: usize) -> Result<()> {
    let mut dirs: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("step_") && n.len() == 13)
        .collect();
    dirs.sort();
    if dirs.len() > keep {
        for d in &dirs[..dirs.len() - keep] {
            if d != keep_latest {
                let p = root.join(d);
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
    }
    Ok(())
}

//! The training loop, its checkpoints, and resuming from them.
//!
//! A run directory holds `metrics.jsonl` and `checkpoints/`: each checkpoint is a directory `step_NNNNNNNN`
//! that is a complete native transcoder (`model.safetensors`, `config.json`) plus `optimizer.safetensors`
//! (Adam's moments) and `state.json` (step, run configuration, data position, dead-feature clocks). It is
//! written under a temporary name and renamed when complete; then `checkpoints/LATEST` is replaced atomically
//! to name it. A resumed run restores everything a step depends on, so it continues bit for bit.
//!
//! With `--backend cuda` the parameters and Adam's moments live on the device ([`Resident`]) and the step
//! runs there whole; the host fields `params` and Adam's state are then refreshed only by
//! [`Trainer::sync_host`] (which [`Trainer::train`] calls before returning), and checkpoints download them.
//! Batch i+1 is fetched and its copy queued before step i runs, so the copy overlaps the step; the
//! checkpoint then records the source's position before that staged batch, so a resumed run reads it again.

use super::config::{DataConfig, PreactScope, RunConfig};
use super::init::{calibrate_b_enc, default_fire_rate, estimate_norms};
use super::metrics::{Interval, MetricsLine};
use super::{liveness, schedule};
use crate::backend::cpu::adam::{self, AdamHyper, AdamState};
use crate::backend::{Backend, BackendKind, Grads, KernelChoice, Objective, Resident, StepStats};
use crate::clt::checkpoint::{
    TensorFile, load_transcoder, params_out, read_params, save_transcoder, write_atomic,
    write_tensors,
};
use crate::clt::params::decoder_norms;
use crate::clt::{NormScales, Params, Transcoder};
use crate::data::synthetic::SyntheticGenerator;
use crate::data::{ActDims, ActivationSource, Batch, CodedBatch};
use crate::rng::Rng;
use crate::{Error, Result};
use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

const STATE_FORMAT: &str = "clt-train-state";
const STATE_VERSION: u32 = 1;

/// Everything that `state.json` holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct TrainState {
    format: String,
    version: u32,
    step: u64,
    adam_t: u64,
    tokens_seen: u64,
    rng: Rng,
    source_position: serde_json::Value,
    last_fired: Vec<Vec<u64>>,
    run: RunConfig,
    /// The kernels the CUDA step ran: what `auto` settings resolved to (absent in checkpoints written
    /// before the first step, or by earlier versions).
    #[serde(default)]
    kernels: Option<KernelChoice>,
}

/// Builds the activation source a configuration names.
pub fn make_source(run: &RunConfig) -> Result<Box<dyn ActivationSource>> {
    let dims = ActDims {
        n_layers: run.model.n_layers,
        d_model: run.model.d_model,
    };
    data_source(dims, &run.data)
}

/// The activation source a data configuration names, for activations of `dims`.
pub fn data_source(dims: ActDims, data: &DataConfig) -> Result<Box<dyn ActivationSource>> {
    match data {
        DataConfig::Synthetic(s) => Ok(Box::new(SyntheticGenerator::new(dims, s.clone()))),
        DataConfig::Store(s) => {
            let cfg = crate::store::LoaderConfig {
                seed: s.seed,
                window_blocks: s.window_blocks,
                workers: s.workers,
                prefetch: s.prefetch,
                rank: 0,
                world: 1,
            };
            Ok(Box::new(crate::store::ShardLoader::open(&s.path, cfg)?))
        }
    }
}

/// A training run in progress.
pub struct Trainer {
    pub run: RunConfig,
    pub params: Params,
    pub norms: NormScales,
    pub step: u64,
    pub tokens_seen: u64,
    adam: AdamState,
    hyper: AdamHyper,
    grads: Grads,
    dec_norms: Vec<Vec<f32>>,
    last_fired: Vec<Vec<u64>>,
    rng: Rng,
    backend: Backend,
    source: Box<dyn ActivationSource>,
    batch: Batch,
    /// The resident loop's batch as the store's codes, when the device decodes them.
    coded: CodedBatch,
    /// The device-resident state (`--backend cuda`), else `None`.
    resident: Option<Resident>,
    /// With a resident state: whether `params` and `adam` on the host may lag the device's.
    host_stale: bool,
    /// The source's position before the batch staged on the device for the next step (resident only).
    staged_position: Option<serde_json::Value>,
    /// The kernels the step runs, `auto` settings resolved; `None` until the first step resolves them on
    /// the device.
    kernels: Option<KernelChoice>,
    /// What resolving `auto` found, until [`Trainer::train`] prints it and writes `tuning.json`.
    tuning: Option<TuningNote>,
}

/// What one step reports.
pub struct StepReport {
    pub stats: StepStats,
    pub grad_norm: f64,
    pub lr: f32,
    pub lambda: f32,
    /// Seconds the step waited for its batch from the activation source.
    pub data_wait_s: f64,
}

impl Trainer {
    /// A fresh run on the source its configuration names.
    pub fn new(run: RunConfig) -> Result<Self> {
        let source = make_source(&run)?;
        Self::with_source(run, source)
    }

    /// A fresh run on a given source: estimates the normalisation, initialises and calibrates the parameters.
    pub fn with_source(run: RunConfig, mut source: Box<dyn ActivationSource>) -> Result<Self> {
        run.validate()?;
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
        let backend = Backend::new(t.backend)?;
        let (kernels, tuning) = initial_kernels(&backend, &run, None)?;
        let mut rng = Rng::seed(t.seed);
        let (mut norms, mut calib) =
            estimate_norms(source.as_mut(), t.batch_size, t.calibration_batches)?;
        if !t.normalize {
            norms = NormScales::identity(cfg.n_layers);
        }
        norms.apply(cfg.d_model, &mut calib.x, &mut calib.y);
        let mut params = Params::init(cfg, t.theta_init, &mut rng);
        let rate = t.init_fire_rate.unwrap_or_else(|| default_fire_rate(cfg));
        calibrate_b_enc(cfg, &mut params, &calib.x, calib.n_tokens, rate);
        let dec_norms = decoder_norms(cfg, &params.w_dec);
        let hyper = AdamHyper {
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_eps,
        };
        let mut trainer = Trainer {
            adam: AdamState::new(cfg),
            hyper,
            grads: Grads::zeros(cfg),
            last_fired: vec![vec![0; cfg.n_features]; cfg.n_layers],
            dec_norms,
            params,
            norms,
            step: 0,
            tokens_seen: 0,
            rng,
            backend,
            source,
            batch: Batch::default(),
            coded: CodedBatch::default(),
            resident: None,
            host_stale: false,
            staged_position: None,
            kernels,
            tuning,
            run,
        };
        trainer.go_resident()?;
        Ok(trainer)
    }

    /// With `--backend cuda`: moves the parameters and Adam's state to the device (the host keeps the
    /// parameters, marked stale, and drops its gradient and moment buffers).
    fn go_resident(&mut self) -> Result<()> {
        if self.run.train.backend != BackendKind::Cuda {
            return Ok(());
        }
        let cfg = &self.run.model;
        let r = self
            .backend
            .resident(cfg, &self.params, &self.adam, self.hyper)?;
        self.resident = Some(r);
        self.host_stale = true;
        self.grads = empty_grads();
        self.adam = AdamState {
            m: empty_params(),
            v: empty_params(),
            t: self.adam.t,
        };
        Ok(())
    }

    /// Resumes from a run directory (its latest checkpoint) or a checkpoint directory, on the source its
    /// configuration names. `steps` overrides the run length (which changes the schedules' end).
    pub fn resume(path: &Path, steps: Option<u64>) -> Result<Self> {
        let dir = resolve_checkpoint(path)?;
        let state = read_state(&dir)?;
        let source = make_source(&state.run)?;
        Self::resume_with_source(&dir, source, steps)
    }

    /// Resumes from a checkpoint directory on a given source.
    pub fn resume_with_source(
        path: &Path,
        mut source: Box<dyn ActivationSource>,
        steps: Option<u64>,
    ) -> Result<Self> {
        let dir = resolve_checkpoint(path)?;
        let mut state = read_state(&dir)?;
        if let Some(s) = steps {
            state.run.train.steps = s;
        }
        state.run.validate()?;
        let t = load_transcoder(&dir)?;
        if t.cfg != state.run.model {
            return Err(Error::Checkpoint {
                path: dir,
                reason: "config.json and state.json disagree on the model".into(),
            });
        }
        let cfg = &t.cfg;
        let mut opt = TensorFile::read(&dir.join("optimizer.safetensors"))?;
        let m = read_params(&mut opt, cfg, "adam.m.")?;
        let v = read_params(&mut opt, cfg, "adam.v.")?;
        if state.last_fired.len() != cfg.n_layers
            || state.last_fired.iter().any(|l| l.len() != cfg.n_features)
        {
            return Err(Error::Checkpoint {
                path: dir,
                reason: "state.json: last_fired has the wrong shape".into(),
            });
        }
        source.restore(&state.source_position)?;
        let backend = Backend::new(state.run.train.backend)?;
        let (kernels, tuning) = initial_kernels(&backend, &state.run, state.kernels)?;
        let tc = &state.run.train;
        let mut trainer = Trainer {
            hyper: AdamHyper {
                beta1: tc.adam_beta1,
                beta2: tc.adam_beta2,
                eps: tc.adam_eps,
            },
            adam: AdamState {
                m,
                v,
                t: state.adam_t,
            },
            grads: Grads::zeros(cfg),
            dec_norms: decoder_norms(cfg, &t.params.w_dec),
            params: t.params,
            norms: t.norms,
            step: state.step,
            tokens_seen: state.tokens_seen,
            last_fired: state.last_fired,
            rng: state.rng,
            backend,
            source,
            batch: Batch::default(),
            coded: CodedBatch::default(),
            resident: None,
            host_stale: false,
            staged_position: None,
            kernels,
            tuning,
            run: state.run,
        };
        trainer.go_resident()?;
        Ok(trainer)
    }

    /// The trained transcoder (a copy). With `--backend cuda`, of the host's parameters: current after
    /// [`Trainer::train`] or [`Trainer::sync_host`].
    pub fn transcoder(&self) -> Transcoder {
        Transcoder {
            cfg: self.run.model.clone(),
            params: self.params.clone(),
            norms: self.norms.clone(),
        }
    }

    /// Adam's state (moments and update count). With `--backend cuda`, the host's copy: current after
    /// [`Trainer::train`] or [`Trainer::sync_host`].
    pub fn adam_state(&self) -> &AdamState {
        &self.adam
    }

    /// The backend the step runs on.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The kernels the step runs (`[train] encoder_kernel`, `sparse_kernels`, `act_blocks`), `auto` settings
    /// resolved; `None` until the first step on the device resolves them.
    pub fn kernels(&self) -> Option<KernelChoice> {
        self.kernels
    }

    /// Resolves the run's `auto` kernels, once, before the first step's compute: on the device, on this
    /// step's batch ([`tune_kernels`]). Leaves the report for [`Trainer::train`].
    #[cfg(feature = "cuda")]
    fn resolve_kernels(
        &mut self,
        obj: &Objective,
        preact_mask: Option<&[Vec<bool>]>,
    ) -> Result<()> {
        if self.kernels.is_some() {
            return Ok(());
        }
        let wanted = wanted_kernels(&self.run);
        let on = TuneOn {
            resident: self.resident.as_mut(),
            backend: &self.backend,
            cfg: &self.run.model,
            params: &self.params,
            dec_norms: &self.dec_norms,
            batch: &self.batch,
        };
        let Some(tuning) = tune_kernels(wanted, on, obj, preact_mask)? else {
            self.kernels = Some(wanted);
            return Ok(());
        };
        self.kernels = Some(tuning.chosen);
        self.tuning = Some(tuning_note(self.tuning.take(), &tuning, None)?);
        Ok(())
    }

    /// Without the `cuda` feature no backend has kernels to choose.
    #[cfg(not(feature = "cuda"))]
    fn resolve_kernels(&mut self, _obj: &Objective, _mask: Option<&[Vec<bool>]>) -> Result<()> {
        self.kernels.get_or_insert(wanted_kernels(&self.run));
        Ok(())
    }

    /// Brings the device-resident parameters and Adam's state back to the host (`params`, the decoder
    /// norms, the moments); nothing to do on the CPU backends or when they are current.
    pub fn sync_host(&mut self) -> Result<()> {
        if let (Some(r), true) = (&self.resident, self.host_stale) {
            let (params, adam) = r.download()?;
            self.dec_norms = decoder_norms(&self.run.model, &params.w_dec);
            self.params = params;
            self.adam = adam;
            self.host_stale = false;
        }
        Ok(())
    }

    /// The parameters and Adam's state as of the last step (downloaded when they live on the device).
    fn current_state(&self) -> Result<(Cow<'_, Params>, Cow<'_, AdamState>)> {
        match &self.resident {
            Some(r) if self.host_stale => {
                let (p, a) = r.download()?;
                Ok((Cow::Owned(p), Cow::Owned(a)))
            }
            _ => Ok((Cow::Borrowed(&self.params), Cow::Borrowed(&self.adam))),
        }
    }

    /// Fetches the next batch from the source into `self.batch` and normalises it; returns the seconds
    /// spent waiting for the source.
    fn fetch_batch(&mut self) -> Result<f64> {
        fetch_batch(
            self.source.as_mut(),
            &mut self.batch,
            &self.norms,
            &self.run,
        )
    }

    /// Fetches the next batch and stages it on the device: as the store's int8 / int4 rows, decoded and
    /// normalised on the device, when the source serves them and `train.device_dequant` allows it; else
    /// decoded and normalised here and staged in f32 (the same values). Returns the seconds spent waiting
    /// for the source.
    fn fetch_and_stage(&mut self) -> Result<f64> {
        if let Some(wait) = fetch_coded(self.source.as_mut(), &mut self.coded, &self.run)? {
            if let Some(r) = self.resident.as_mut() {
                r.stage_coded(&self.coded, &self.norms)?;
            }
            return Ok(wait);
        }
        let wait = self.fetch_batch()?;
        if let Some(r) = self.resident.as_mut() {
            r.stage(&self.batch)?;
        }
        Ok(wait)
    }

    /// One step of the resident loop: stage this step's batch if the previous step did not, fetch and
    /// stage the next one (its copy overlaps this step), then the step on the device.
    fn step_resident(&mut self) -> Result<StepReport> {
        let mut data_wait_s = 0.0;
        if self.resident.as_ref().is_some_and(|r| r.staged() == 0) {
            data_wait_s += self.fetch_and_stage()?;
        }
        // The staged batch is this step's from here on.
        self.staged_position = None;
        if self.step + 1 < self.run.train.steps {
            let position = self.source.position();
            data_wait_s += self.fetch_and_stage()?;
            self.staged_position = Some(position);
        }
        let t = &self.run.train;
        let obj = schedule::objective(t, self.step);
        let dead_mask: Option<Vec<Vec<bool>>> = match t.preact_scope {
            PreactScope::All => None,
            PreactScope::DeadOnly => Some(self.dead_mask()),
        };
        let lr = schedule::learning_rate(t, self.step);
        let (clip, step) = (t.clip_norm, self.step);
        self.resolve_kernels(&obj, dead_mask.as_deref())?;
        let Some(r) = self.resident.as_mut() else {
            return Err(Error::Unsupported(
                "a resident step without a device".into(),
            ));
        };
        self.host_stale = true;
        let rep = r.step(&obj, dead_mask.as_deref(), lr, clip, step)?;
        liveness::mark_fired(&mut self.last_fired, &rep.stats.active_count, self.step);
        self.step += 1;
        self.tokens_seen += rep.stats.n_tokens as u64;
        Ok(StepReport {
            stats: rep.stats,
            grad_norm: rep.grad_norm,
            lr,
            lambda: obj.lambda,
            data_wait_s,
        })
    }

    /// Runs one optimiser step.
    pub fn step(&mut self) -> Result<StepReport> {
        if self.resident.is_some() {
            return self.step_resident();
        }
        let data_wait_s = self.fetch_batch()?;
        let t = &self.run.train;
        let obj = schedule::objective(t, self.step);
        let dead_mask: Option<Vec<Vec<bool>>> = match t.preact_scope {
            PreactScope::All => None,
            PreactScope::DeadOnly => Some(self.dead_mask()),
        };
        self.resolve_kernels(&obj, dead_mask.as_deref())?;
        let cfg = &self.run.model;
        let t = &self.run.train;
        let stats = self.backend.loss_and_grad(
            cfg,
            &self.params,
            &self.dec_norms,
            &self.batch.x,
            &self.batch.y,
            self.batch.n_tokens,
            &obj,
            dead_mask.as_deref(),
            &mut self.grads,
        )?;
        if !stats.loss().is_finite() {
            return Err(Error::NonFinite {
                what: "loss".into(),
                step: self.step,
            });
        }
        let grad_norm = adam::grad_norm(cfg, &self.params, &self.grads, &self.dec_norms);
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite {
                what: "gradient norm".into(),
                step: self.step,
            });
        }
        let scale = adam::clip_scale(t.clip_norm, grad_norm);
        let lr = schedule::learning_rate(t, self.step);
        adam::step(
            cfg,
            &self.hyper,
            &mut self.params,
            &mut self.adam,
            &self.grads,
            lr,
            scale,
            &mut self.dec_norms,
        );
        liveness::mark_fired(&mut self.last_fired, &stats.active_count, self.step);
        self.step += 1;
        self.tokens_seen += self.batch.n_tokens as u64;
        Ok(StepReport {
            stats,
            grad_norm,
            lr,
            lambda: obj.lambda,
            data_wait_s,
        })
    }

    /// Dead features per layer: those that have not fired in the last `dead_window` steps.
    pub fn dead_per_layer(&self) -> Vec<usize> {
        self.dead_mask()
            .iter()
            .map(|l| l.iter().filter(|d| **d).count())
            .collect()
    }

    /// Per layer, per feature: whether the feature has not fired in the last `dead_window` steps.
    pub fn dead_mask(&self) -> Vec<Vec<bool>> {
        liveness::dead_mask(&self.last_fired, self.step, self.run.train.dead_window)
    }

    /// Trains to the configured number of steps, logging to `out/metrics.jsonl` (and the terminal unless
    /// `quiet`) and checkpointing into `out/checkpoints/`.
    pub fn train(&mut self, out: &Path, quiet: bool) -> Result<Option<MetricsLine>> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let metrics_path = out.join("metrics.jsonl");
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| Error::io(&metrics_path, e))?;
        let total = self.run.train.steps;
        let bar = if quiet {
            indicatif::ProgressBar::hidden()
        } else {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  [{elapsed_precise} < {eta_precise}]  {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_position(self.step);
            b
        };
        let mut iv = Interval::default();
        let mut clock = Instant::now();
        let mut last = None;
        while self.step < total {
            let rep = self.step()?;
            if let Some((lines, report)) = self.tuning.take() {
                let path = out.join("tuning.json");
                let json = serde_json::to_vec_pretty(&report).map_err(|e| Error::Checkpoint {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                write_atomic(&path, &json)?;
                if !quiet {
                    for line in lines {
                        say(&bar, &line);
                    }
                }
            }
            iv.add(&rep.stats, rep.grad_norm);
            iv.data_wait_s += rep.data_wait_s;
            bar.inc(1);
            let t = &self.run.train;
            if self.step.is_multiple_of(t.log_every) || self.step == total {
                let line = MetricsLine::from_interval(
                    &iv,
                    self.step,
                    self.tokens_seen,
                    rep.lambda,
                    rep.lr,
                    self.dead_per_layer(),
                    clock.elapsed().as_secs_f64(),
                );
                let json =
                    serde_json::to_string(&line).map_err(|e| Error::Source(e.to_string()))?;
                writeln!(metrics, "{json}").map_err(|e| Error::io(&metrics_path, e))?;
                bar.set_message(format!(
                    "nmse {:.4}  L0 {:.1}",
                    line.nmse,
                    mean(&line.l0_per_layer)
                ));
                if !quiet {
                    say(&bar, &line.summary());
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
        bar.finish_and_clear();
        self.sync_host()?;
        Ok(last)
    }

    /// Writes a checkpoint of the current state into `out/checkpoints/` and points `LATEST` at it.
    pub fn save_checkpoint(&self, out: &Path) -> Result<PathBuf> {
        let root = out.join("checkpoints");
        std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        let name = format!("step_{:08}", self.step);
        let final_dir = root.join(&name);
        let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        let (params, adam) = self.current_state()?;
        let cfg = &self.run.model;
        save_transcoder(
            &tmp,
            &Transcoder {
                cfg: cfg.clone(),
                params: params.into_owned(),
                norms: self.norms.clone(),
            },
        )?;
        let mut opt = params_out(&adam.m, cfg, "adam.m.");
        opt.extend(params_out(&adam.v, cfg, "adam.v."));
        write_tensors(&tmp.join("optimizer.safetensors"), &opt, None)?;
        let state = TrainState {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            step: self.step,
            adam_t: adam.t,
            tokens_seen: self.tokens_seen,
            rng: self.rng.clone(),
            // With a batch already staged on the device for the next step, the position before it.
            source_position: self
                .staged_position
                .clone()
                .unwrap_or_else(|| self.source.position()),
            last_fired: self.last_fired.clone(),
            run: self.run.clone(),
            kernels: self.kernels,
        };
        let json = serde_json::to_vec_pretty(&state).map_err(|e| Error::Checkpoint {
            path: tmp.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&tmp.join("state.json"), &json)?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        write_atomic(&root.join("LATEST"), name.as_bytes())?;
        prune_checkpoints(&root, &name, self.run.train.keep_checkpoints)?;
        Ok(final_dir)
    }
}

/// Removes all but the newest `keep` checkpoints (`step_*` folders) under `root`, never `keep_latest`.
pub(crate) fn prune_checkpoints(root: &Path, keep_latest: &str, keep: usize) -> Result<()> {
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

/// What resolving a run's `auto` kernels found, for the training loop to print and write: the report's
/// lines, and the report (`tuning.json`).
pub(crate) type TuningNote = (Vec<String>, serde_json::Value);

/// Where [`tune_kernels`] runs the candidates' steps: the resident state's oldest staged batch (`cuda`),
/// or `batch` uploaded with `params` (`cuda-host`).
#[cfg(feature = "cuda")]
pub(crate) struct TuneOn<'a> {
    pub resident: Option<&'a mut Resident>,
    pub backend: &'a Backend,
    pub cfg: &'a crate::clt::CltConfig,
    pub params: &'a Params,
    pub dec_norms: &'a [Vec<f32>],
    pub batch: &'a Batch,
}

/// Times the `auto` candidates for `wanted` on this step (`backend::cuda::tune`), leaving the device on
/// the choice; `None` where the backend has no kernels to choose.
#[cfg(feature = "cuda")]
pub(crate) fn tune_kernels(
    wanted: KernelChoice,
    on: TuneOn,
    obj: &Objective,
    preact_mask: Option<&[Vec<bool>]>,
) -> Result<Option<crate::backend::tuning::Tuning>> {
    use crate::backend::cuda::step::{DeviceBatch, DeviceParams};
    use crate::backend::cuda::tune;
    Ok(Some(match (on.resident, on.backend) {
        (Some(r), _) => r.tune(wanted, obj, preact_mask, &mut tune::Steps)?,
        (None, Backend::Cuda(gpu)) => {
            let dp = DeviceParams::upload(gpu, on.params, on.dec_norms)?;
            let b = on.batch;
            let batch = DeviceBatch::upload(gpu, &b.x, &b.y, b.n_tokens)?;
            let timer = &mut tune::Steps;
            tune::tune_step(gpu, wanted, on.cfg, &dp, &batch, obj, preact_mask, timer)?
        }
        _ => return Ok(None),
    }))
}

/// The note for the training loop: the `earlier` lines (a recorded choice that could not be kept), the
/// report's, then `agreed`'s line; and the report, with `agreed` added where given (the ranks' common
/// choice).
#[cfg(feature = "cuda")]
pub(crate) fn tuning_note(
    earlier: Option<TuningNote>,
    tuning: &crate::backend::tuning::Tuning,
    agreed: Option<(KernelChoice, String)>,
) -> Result<TuningNote> {
    let err = |e: serde_json::Error| Error::Source(e.to_string());
    let mut lines = earlier.map(|(l, _)| l).unwrap_or_default();
    lines.extend(tuning.lines());
    let mut report = serde_json::to_value(tuning).map_err(err)?;
    if let Some((k, line)) = agreed {
        lines.push(line);
        report["agreed"] = serde_json::to_value(k).map_err(err)?;
    }
    Ok((lines, report))
}

/// The kernels a run's configuration asks for (either may be `auto`).
pub(crate) fn wanted_kernels(run: &RunConfig) -> KernelChoice {
    KernelChoice {
        encoder: run.train.encoder_kernel,
        sparse: run.train.sparse_kernels,
        act_blocks: run.train.act_blocks,
    }
}

/// Sets `backend`'s kernels for `run` and says which they are: the run's settings where neither is `auto`
/// or the backend has no kernels to choose; else what a checkpoint `recorded` that `auto` resolved to, if
/// the device runs it (so that a resumed run runs the same kernels); else `None`, for the first step to
/// resolve on the device. The second value is a line for the report when a recorded choice could not be
/// kept.
pub(crate) fn initial_kernels(
    backend: &Backend,
    run: &RunConfig,
    recorded: Option<KernelChoice>,
) -> Result<(Option<KernelChoice>, Option<TuningNote>)> {
    let wanted = wanted_kernels(run);
    backend.set_sparse_kernels(wanted.sparse);
    backend.set_act_blocks(wanted.act_blocks)?;
    backend.set_encoder_kernel(wanted.encoder)?;
    if !wanted.is_auto() || backend.sparse_kernels().is_none() {
        return Ok((Some(wanted), None));
    }
    let Some(k) = recorded.filter(|k| !k.is_auto()) else {
        return Ok((None, None));
    };
    match backend.set_encoder_kernel(k.encoder) {
        Ok(()) => {
            backend.set_sparse_kernels(k.sparse);
            backend.set_act_blocks(k.act_blocks)?;
            Ok((Some(k), None))
        }
        Err(e) => {
            backend.set_encoder_kernel(wanted.encoder)?;
            backend.set_act_blocks(wanted.act_blocks)?;
            let line = format!(
                "kernels: the checkpoint's auto choice ({k}) does not run here ({e}): timing the \
                 candidates again"
            );
            Ok((None, Some((vec![line], serde_json::Value::Null))))
        }
    }
}

/// Fetches the next `run.train.batch_size` tokens from `source` into `batch` and normalises them; returns
/// the seconds spent waiting for the source.
pub(crate) fn fetch_batch(
    source: &mut dyn ActivationSource,
    batch: &mut Batch,
    norms: &NormScales,
    run: &RunConfig,
) -> Result<f64> {
    let wait = Instant::now();
    source.next_batch(run.train.batch_size, batch)?;
    let data_wait_s = wait.elapsed().as_secs_f64();
    norms.apply(run.model.d_model, &mut batch.x, &mut batch.y);
    Ok(data_wait_s)
}

/// Fetches the next `run.train.batch_size` tokens still quantised into `coded` when the device decodes
/// them: `train.device_dequant` is on and the source serves int8 or int4 rows ([`Resident::decodes`]).
/// Returns the seconds spent waiting for the source, or `None`, having read nothing, when the batch must
/// come through [`fetch_batch`] instead.
pub(crate) fn fetch_coded(
    source: &mut dyn ActivationSource,
    coded: &mut CodedBatch,
    run: &RunConfig,
) -> Result<Option<f64>> {
    if !(run.train.device_dequant && source.coded().is_some_and(Resident::decodes)) {
        return Ok(None);
    }
    let wait = Instant::now();
    source.next_coded(run.train.batch_size, coded)?;
    Ok(Some(wait.elapsed().as_secs_f64()))
}

pub(crate) fn empty_params() -> Params {
    Params {
        w_enc: Vec::new(),
        b_enc: Vec::new(),
        log_theta: Vec::new(),
        w_dec: Vec::new(),
        b_dec: Vec::new(),
        w_skip: Vec::new(),
    }
}

/// The host gradient buffers of a resident run (unused: the gradients stay on the device).
pub(crate) fn empty_grads() -> Grads {
    Grads {
        p: empty_params(),
        dec_coef: Vec::new(),
        dec_touched: Vec::new(),
    }
}

/// Prints a line above the progress bar, or to stderr where the bar is hidden (not a terminal: a log
/// file, a batch job), which would drop it.
fn say(bar: &indicatif::ProgressBar, line: &str) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// A checkpoint directory from a path that is either one or a run directory (whose `checkpoints/LATEST` names one).
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join("config.json").exists() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("checkpoints").join("LATEST");
    let name = std::fs::read_to_string(&latest).map_err(|e| Error::io(&latest, e))?;
    let dir = path.join("checkpoints").join(name.trim());
    if !dir.join("config.json").exists() {
        return Err(Error::Checkpoint {
            path: dir,
            reason: "named by LATEST but incomplete or missing".into(),
        });
    }
    Ok(dir)
}

/// The run configuration stored in a training checkpoint (a checkpoint or run directory).
pub fn run_config_of(path: &Path) -> Result<RunConfig> {
    Ok(read_state(&resolve_checkpoint(path)?)?.run)
}

fn read_state(dir: &Path) -> Result<TrainState> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: p.clone(),
        reason: format!("bad state.json: {e}"),
    })?;
    if state.format != STATE_FORMAT || state.version != STATE_VERSION {
        return Err(Error::Checkpoint {
            path: p,
            reason: format!(
                "format {} v{} is not {STATE_FORMAT} v{STATE_VERSION}",
                state.format, state.version
            ),
        });
    }
    Ok(state)
}

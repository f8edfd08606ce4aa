//! What `clt train` runs when it was launched by `mpirun` (one process per rank), or asked to resume a
//! sharded checkpoint in a single process.

use super::comm::{Comm, SelfComm};
use super::trainer::ShardedTrainer;
use crate::backend::BackendKind;
use crate::train::RunConfig;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The arguments of `clt train`.
pub struct TrainArgs {
    pub config: Option<PathBuf>,
    pub out: PathBuf,
    pub resume: bool,
    pub steps: Option<u64>,
    pub backend: Option<BackendKind>,
    pub quiet: bool,
}

/// Whether this process was started by an MPI launcher (Open MPI, or any PMI/PMIx one).
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// Whether `clt train` should take the sharded path: under an MPI launcher, or resuming a run whose latest
/// checkpoint is sharded.
pub fn wants_sharded(args: &TrainArgs) -> bool {
    launched_by_mpi()
        || (args.resume
            && super::checkpoint::resolve(&args.out)
                .map(|d| super::checkpoint::is_sharded(&d))
                .unwrap_or(false))
}

/// Trains (or resumes) feature-sharded over the MPI world, or in this process alone.
pub fn train(args: TrainArgs) -> Result<()> {
    if !launched_by_mpi() {
        return train_with(SelfComm, &args);
    }
    #[cfg(feature = "mpi")]
    {
        let world = super::mpi::World::init()?;
        train_with(world.comm(), &args)
    }
    #[cfg(not(feature = "mpi"))]
    Err(Error::Unsupported(
        "started by an MPI launcher, but this build has no MPI support (rebuild with `--features mpi`)"
            .into(),
    ))
}

/// Runs the training on `comm`. An error on one rank of several aborts the whole job at once, after
/// printing it, so the other ranks do not wait for it.
pub fn train_with<C: Comm + Clone>(comm: C, args: &TrainArgs) -> Result<()> {
    let result = run(comm.clone(), args);
    if let Err(e) = &result
        && comm.size() > 1
    {
        eprintln!("error: rank {}: {e}", comm.rank());
        comm.abort(1);
    }
    result
}

fn run<C: Comm>(c: C, args: &TrainArgs) -> Result<()> {
    let mut trainer = if args.resume {
        let t = ShardedTrainer::resume(&args.out, args.steps, c)?;
        if let Some(path) = &args.config {
            let mut given = RunConfig::from_file(path)?;
            given.train.steps = t.run.train.steps;
            if given != t.run {
                return Err(Error::config(
                    "config",
                    format!(
                        "{} differs from the configuration stored in the checkpoint",
                        path.display()
                    ),
                ));
            }
        }
        if t.comm.rank() == 0 {
            eprintln!(
                "resuming at step {} of {} on {} rank(s)",
                t.step,
                t.run.train.steps,
                t.comm.size()
            );
        }
        t
    } else {
        let path = args
            .config
            .as_ref()
            .ok_or_else(|| Error::config("config", "--config is required unless --resume"))?;
        let mut run = RunConfig::from_file(path)?;
        if let Some(s) = args.steps {
            run.train.steps = s;
        }
        if let Some(b) = args.backend {
            run.train.backend = b;
        }
        ShardedTrainer::new(run, c)?
    };
    if trainer.comm.rank() == 0 && trainer.partials_via() != "none" {
        eprintln!(
            "partial reconstructions summed over the feature shards with {}",
            trainer.partials_via()
        );
    }
    if trainer.comm.rank() == 0 && trainer.gradients_via() != "none" {
        eprintln!(
            "gradients summed over the replicas on the device with {}",
            trainer.gradients_via()
        );
    }
    let last = trainer.train(&args.out, args.quiet)?;
    let lead = trainer.comm.rank() == 0;
    let size = trainer.comm.size();
    let t = trainer.timing.clone();
    if lead {
        if let Some(line) = last {
            println!("layer     nmse      L0   dead");
            for l in 0..line.nmse_per_layer.len() {
                println!(
                    "{l:>5}  {:>7.4}  {:>6.1}  {:>5}",
                    line.nmse_per_layer[l], line.l0_per_layer[l], line.dead_per_layer[l]
                );
            }
        }
        let pct = |s: f64| 100.0 * s / t.step_s.max(1e-12);
        let g = trainer.grid;
        let (what, grads) = match trainer.run.train.parallel {
            crate::train::Parallel::Features => ("partials", String::new()),
            crate::train::Parallel::Data => ("gradients", String::new()),
            crate::train::Parallel::Grid => {
                ("partials", format!(", of gradients {:.1}%", pct(t.grads_s)))
            }
        };
        let layout = if trainer.run.train.parallel == crate::train::Parallel::Grid {
            format!(" ({} feature shards x {} replicas)", g.shards, g.replicas)
        } else {
            String::new()
        };
        let overlap = if trainer.run.train.overlap {
            " (overlapped with decoding)"
        } else {
            ""
        };
        println!(
            "{size} rank(s){layout}, {} steps: {:.1} ms/step; all-reduce of {what}{overlap} {:.1}%{grads}, \
             of statistics {:.1}%, data wait {:.1}% of the step (rank 0)",
            t.steps,
            1e3 * t.step_s / t.steps.max(1) as f64,
            pct(t.reduce_s),
            pct(t.stats_s),
            pct(t.data_s)
        );
        if trainer.run.train.parallel != crate::train::Parallel::Data && t.decode_s == 0.0 {
            // The device step's decode is timed apart only where the host waits for it (the overlapped
            // sum through MPI); with `overlap` on NCCL it runs inside the all-reduce's span.
            println!(
                "{} of the partials: {:.1} ms/step",
                if trainer.run.train.overlap && trainer.partials_via() == "nccl" {
                    "decode and all-reduce"
                } else {
                    "all-reduce"
                },
                1e3 * t.reduce_s / t.steps.max(1) as f64,
            );
        } else if trainer.run.train.parallel != crate::train::Parallel::Data {
            println!(
                "decode and all-reduce of the partials: {:.1} ms/step (decode {:.1}, all-reduce {:.1})",
                1e3 * (t.decode_s + t.reduce_s) / t.steps.max(1) as f64,
                1e3 * t.decode_s / t.steps.max(1) as f64,
                1e3 * t.reduce_s / t.steps.max(1) as f64,
            );
        }
        if t.select_s > 0.0 {
            println!(
                "encoding with the {:?} selection across shards (or replicas): {:.1} ms/step",
                trainer.run.model.activation,
                1e3 * t.select_s / t.steps.max(1) as f64,
            );
        }
        println!(
            "checkpoint: {}",
            super::checkpoint::resolve(&args.out)?.display()
        );
    }
    Ok(())
}

/// Whether `path` (a run or checkpoint directory) resolves to a sharded checkpoint.
pub fn is_sharded_run(path: &Path) -> bool {
    super::checkpoint::resolve(path)
        .map(|d| super::checkpoint::is_sharded(&d))
        .unwrap_or(false)
}

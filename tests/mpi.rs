//! Feature-sharded training under `mpirun` (the `mpi` feature; `scripts/test.sh` installs Open MPI and runs
//! these): N ranks equal one process, sharded checkpoints reload into another number of ranks, a dead or
//! hung rank stops the job with an error naming it, mismatched configurations are reported at start-up.
//!
//! Tolerance: losses and every parameter tensor agree with the single-process run to 1e-5 relative (L2 norm
//! per tensor). Not zero: the all-reduce adds the ranks' partial reconstructions in another order than one
//! process sums the features, so results differ by float rounding (about 1e-7 after these few steps).
#![cfg(feature = "mpi")]

mod common;

use clt::clt::Params;
use clt::dist::checkpoint;
use clt::train::RunConfig;
use common::runs::{self, CLT, fork_run, losses, mpirun, mpirun_train, text, write_config};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// One `mpirun` job at a time (the time bounds below assume the machine is not shared with another job).
static ONE_JOB: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_job() -> std::sync::MutexGuard<'static, ()> {
    ONE_JOB.lock().unwrap_or_else(|e| e.into_inner())
}

fn run_config() -> RunConfig {
    let mut run = clt::demo::synthetic_config();
    run.model.n_features = 37;
    run.model.skip = true;
    run.train.steps = 12;
    run.train.batch_size = 128;
    run.train.warmup_steps = 2;
    run.train.log_every = 1;
    run.train.checkpoint_every = 4;
    run.train.keep_checkpoints = 10;
    run.train.calibration_batches = 2;
    run
}

/// `mpirun -n <ranks> clt train --config <cfg> --out <out> --quiet`, which must succeed (`what` names the run in
/// the failure); returns its output.
fn train_job(what: &str, ranks: usize, cfg: impl AsRef<Path>, out: &Path) -> String {
    let (o, _) = mpirun_train(ranks, cfg.as_ref(), out, &[]);
    assert!(
        o.status.success(),
        "{what}: mpirun -n {ranks} failed:\n{}",
        text(&o)
    );
    text(&o)
}

fn clt(args: &[&str]) -> Output {
    let o = Command::new(CLT)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "clt {args:?} failed:\n{}", text(&o));
    o
}

fn params(path: &Path) -> Params {
    checkpoint::load_transcoder(path).unwrap().params
}

fn assert_params_close(what: &str, got: &Params, want: &Params) {
    runs::assert_params_close(what, got, want, 1e-5);
}

#[test]
fn two_ranks_feature_sharded_and_data_parallel_equal_one_process_and_checkpoints_reshard() {
    let _job = one_job();
    let tmp = tempfile::tempdir().unwrap();
    let run = run_config();
    let cfg = write_config(tmp.path(), "run.toml", &run);
    let cfg = cfg.to_str().unwrap();
    let single = tmp.path().join("single");
    clt(&[
        "train",
        "--config",
        cfg,
        "--out",
        single.to_str().unwrap(),
        "--quiet",
    ]);
    let want_loss = losses(&single);
    let want = params(&single);
    assert_eq!(want_loss.len(), 12);

    // 2 ranks, 12 steps.
    let two = tmp.path().join("two");
    let o = train_job("feature-sharded", 2, cfg, &two);
    assert!(o.contains("2 rank(s), 12 steps"), "{o}");
    let got_loss = losses(&two);
    assert_eq!(got_loss.len(), 12, "rank 0 alone writes metrics");
    for (s, (g, w)) in got_loss.iter().zip(&want_loss).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs(),
            "loss at step {}: {g} vs {w}",
            s + 1
        );
    }
    let ck = checkpoint::resolve(&two).unwrap();
    assert!(checkpoint::is_sharded(&ck));
    assert_eq!(checkpoint::read_manifest(&ck).unwrap().world, 2);
    assert_params_close("2 ranks vs 1 process", &params(&two), &want);

    // The same with the partials' all-reduce overlapped with decoding (non-blocking, one per layer): the
    // same bits as the blocking all-reduce (with two ranks each element's sum is one addition).
    let mut ov = run.clone();
    ov.train.overlap = true;
    let ov_cfg = write_config(tmp.path(), "overlap.toml", &ov);
    let ovo = tmp.path().join("overlap");
    let o = train_job("overlapped", 2, &ov_cfg, &ovo);
    assert!(o.contains("overlapped with decoding"), "{o}");
    assert_eq!(losses(&ovo), got_loss, "overlap vs blocking: losses");
    assert!(
        params(&ovo) == params(&two),
        "overlap vs blocking: parameters differ"
    );

    // Data-parallel, 2 ranks: the same run (one process ignores `parallel`).
    let mut dp = run.clone();
    dp.train.parallel = clt::train::Parallel::Data;
    let dp_cfg = write_config(tmp.path(), "dp.toml", &dp);
    let dpo = tmp.path().join("dp");
    train_job("data-parallel", 2, &dp_cfg, &dpo);
    for (s, (g, w)) in losses(&dpo).iter().zip(&want_loss).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs(),
            "data-parallel loss at step {}: {g} vs {w}",
            s + 1
        );
    }
    assert_params_close("data-parallel 2 ranks vs 1 process", &params(&dpo), &want);

    // 2 → 1: a single process resumes the 2-rank checkpoint of step 4 and finishes the run.
    let one = tmp.path().join("one");
    fork_run(&two, 4, &one);
    clt(&[
        "train",
        "--resume",
        "--out",
        one.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(
        checkpoint::read_manifest(&checkpoint::resolve(&one).unwrap())
            .unwrap()
            .world,
        1
    );
    assert_params_close("2 → 1 ranks", &params(&one), &want);

    // 1 → 3: three ranks resume the 1-process checkpoint of step 8.
    let three = tmp.path().join("three");
    fork_run(&one, 8, &three);
    let (o, _) = mpirun(
        3,
        &[
            "train",
            "--resume",
            "--out",
            three.to_str().unwrap(),
            "--quiet",
        ],
        &[],
    );
    assert!(
        o.status.success(),
        "mpirun -n 3 --resume failed:\n{}",
        text(&o)
    );
    assert_params_close("2 → 1 → 3 ranks", &params(&three), &want);

    // A sharded checkpoint exports to circuit-tracer's format.
    let ct = tmp.path().join("ct");
    clt(&[
        "export",
        "--checkpoint",
        three.to_str().unwrap(),
        "--format",
        "circuit-tracer",
        "--out",
        ct.to_str().unwrap(),
    ]);
    assert!(std::fs::read_dir(&ct).unwrap().count() > 0);
    let o = clt(&[
        "eval",
        "--checkpoint",
        three.to_str().unwrap(),
        "--tokens",
        "512",
    ]);
    assert!(text(&o).contains("NMSE"), "{}", text(&o));
}

/// `mpirun -n <ranks> clt train` of `run` for `steps`, then the single-process run; asserts that their
/// losses and parameters agree to 1e-5 and returns the job's output.
fn agrees_with_one_process(run: &RunConfig, ranks: usize) -> String {
    let _job = one_job();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "run.toml", run);
    let cfg = cfg.to_str().unwrap();
    let single = tmp.path().join("single");
    clt(&[
        "train",
        "--config",
        cfg,
        "--out",
        single.to_str().unwrap(),
        "--quiet",
    ]);
    let out = tmp.path().join("ranks");
    let o = train_job(&format!("{ranks} ranks"), ranks, cfg, &out);
    let (got, want) = (losses(&out), losses(&single));
    assert_eq!(got.len(), want.len());
    for (s, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs(),
            "{ranks} ranks: loss at step {}: {g} vs {w}",
            s + 1
        );
    }
    assert_params_close(
        &format!("{ranks} ranks vs 1 process"),
        &params(&out),
        &params(&single),
    );
    o
}

#[test]
fn grids_equal_one_process() {
    let mut run = run_config();
    run.train.steps = 8;
    run.train.checkpoint_every = 0;
    run.train.parallel = clt::train::Parallel::Grid;
    // 2 feature shards x 2 replicas, the partials' all-reduce overlapped.
    run.train.feature_shards = Some(2);
    run.train.overlap = true;
    let log = agrees_with_one_process(&run, 4);
    assert!(
        log.contains("4 rank(s) (2 feature shards x 2 replicas)"),
        "{log}"
    );
    // Degenerate: 1 shard x 2 replicas (data-parallel through the grid's step).
    run.train.feature_shards = Some(1);
    run.train.overlap = false;
    let log = agrees_with_one_process(&run, 2);
    assert!(log.contains("(1 feature shards x 2 replicas)"), "{log}");
}

/// TopK and BatchTopK (across layers) feature-sharded over 2 ranks, and BatchTopK data-parallel: each
/// rank's candidates gathered by MPI (`dist::select`), the same selection, losses and parameters as one
/// process.
#[test]
fn topk_and_batchtopk_shards_equal_one_process() {
    let mut run = run_config();
    run.train.steps = 6;
    run.train.checkpoint_every = 0;
    for activation in [
        clt::clt::Activation::TopK { k: 3 },
        clt::clt::Activation::BatchTopK {
            k: 2,
            across_layers: true,
        },
    ] {
        run.model.activation = activation;
        let log = agrees_with_one_process(&run, 2);
        assert!(log.contains("selection across shards"), "{log}");
    }
    // BatchTopK data-parallel: the batch's budget gathered over the replicas' slices.
    run.train.parallel = clt::train::Parallel::Data;
    let log = agrees_with_one_process(&run, 2);
    assert!(log.contains("selection across shards"), "{log}");
}

fn failing_run(fault: &str) -> (String, Duration, PathBuf, tempfile::TempDir) {
    failing_run_of(&run_config(), 2, fault)
}

fn failing_run_of(
    run: &RunConfig,
    ranks: usize,
    fault: &str,
) -> (String, Duration, PathBuf, tempfile::TempDir) {
    let _job = one_job();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "run.toml", run);
    let out = tmp.path().join("run");
    let (o, took) = mpirun_train(
        ranks,
        &cfg,
        &out,
        &[("CLT_DIST_FAULT", fault), ("CLT_DIST_TIMEOUT_S", "4")],
    );
    assert!(
        !o.status.success(),
        "a job with a failed rank must fail:\n{}",
        text(&o)
    );
    (text(&o), took, out, tmp)
}

#[test]
fn a_rank_that_dies_stops_the_job_naming_it() {
    let (log, took, out, _tmp) = failing_run("kill:1:6");
    // Open MPI's launcher notices the death first ("process rank 1 ... exited on signal"); the survivor's
    // watchdog would name it otherwise.
    assert!(
        log.contains("process rank 1") || log.contains("no answer from rank(s) [1]"),
        "the error must name rank 1:\n{log}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
    last_checkpoint_is_step_4(&out);
}

/// After a failed job: the last complete checkpoint (step 4) is named by LATEST and loads.
fn last_checkpoint_is_step_4(out: &Path) {
    let ck = checkpoint::resolve(out).unwrap();
    assert!(ck.ends_with("step_00000004"), "{}", ck.display());
    checkpoint::load_transcoder(out).unwrap();
}

#[test]
fn a_hung_rank_stops_the_job_within_the_bound_naming_it() {
    let (log, took, out, _tmp) = failing_run("hang:1:6");
    assert!(
        log.contains("no answer from rank(s) [1]"),
        "the watchdog must name rank 1:\n{log}"
    );
    // Bound: twice the 4 s collective timeout, plus start-up and the steps before the fault.
    assert!(took < Duration::from_secs(40), "took {took:?}");
    last_checkpoint_is_step_4(&out);
}

#[test]
fn a_hung_rank_of_an_overlapped_grid_stops_the_job_naming_it() {
    // Rank 3 hangs: rank 2 waits in the overlapped partials' all-reduce (their replica), rank 1 in the
    // gradients' all-reduce (their shard), rank 0 behind rank 2; every live rank answers the probe.
    let mut run = run_config();
    run.train.parallel = clt::train::Parallel::Grid;
    run.train.feature_shards = Some(2);
    run.train.overlap = true;
    let (log, took, out, _tmp) = failing_run_of(&run, 4, "hang:3:6");
    assert!(
        log.contains("no answer from rank(s) [3]"),
        "the watchdog must name rank 3 alone:\n{log}"
    );
    assert!(took < Duration::from_secs(45), "took {took:?}");
    last_checkpoint_is_step_4(&out);
}

#[test]
fn mismatched_configurations_are_reported_at_start_up() {
    let _job = one_job();
    let tmp = tempfile::tempdir().unwrap();
    let run = run_config();
    let a = write_config(tmp.path(), "a.toml", &run);
    let mut other = run.clone();
    other.train.lr *= 2.0;
    let b = write_config(tmp.path(), "b.toml", &other);
    let out = tmp.path().join("run");
    let (mut c, _session) = runs::mpirun_command(120);
    for cfg in [&a, &b] {
        c.args(["-n", "1", CLT, "train", "--config", cfg.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap(), "--quiet"]);
        if cfg == &a {
            c.arg(":");
        }
    }
    let o = c.output().unwrap();
    let log = text(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("rank(s) [1] differs from rank 0"), "{log}");
}

//! Distributed training on the CUDA step (`--backend cuda-host`; the `cuda` and `mpi` features), two ranks
//! under `mpirun` (each on its own device, chosen by its rank on the node) against one process running the
//! same step on the whole model and batch: data-parallel (each rank's device step on half of every batch,
//! the gradients all-reduced over MPI) and feature-sharded (each rank's device encodes and decodes half the
//! features, the partial reconstructions are all-reduced, the device runs the backward on the residual).
//! Runs where a CUDA driver is present: the GPU machine, and CI on the CPU emulator (kernels/emu/, found
//! through `LD_LIBRARY_PATH`, which `mpirun` passes on); without one it prints that it was skipped (and
//! fails under `CLT_REQUIRE_GPU=1`).
//!
//! Tolerance: 1e-4 relative on the losses and on every parameter tensor (L2). Not the 1e-5 of the CPU's
//! tests: the device sums in fp32 in another order when the work is split (a feature's gradient over two
//! halves of the batch, a token's reconstruction over two halves of the features), and the parameters it
//! reads are bf16 roundings of the host's f32 ones, so a difference in the last f32 bit can move a weight by
//! a bf16 step (2⁻⁹ relative).
#![cfg(all(feature = "cuda", feature = "mpi"))]

mod common;

use clt::backend::BackendKind;
use clt::backend::cuda::context::driver_present;
use clt::clt::Params;
use clt::dist::checkpoint;
use clt::train::Parallel;
use common::runs::{assert_params_close, losses, text};
use std::path::Path;
use std::process::Command;

const CLT: &str = env!("CARGO_BIN_EXE_clt");

#[test]
fn two_ranks_on_cuda_host_equal_one_process() {
    if !driver_present() {
        assert!(
            !std::env::var("CLT_REQUIRE_GPU").is_ok_and(|v| v == "1"),
            "CLT_REQUIRE_GPU=1 but no CUDA driver"
        );
        eprintln!("skipped: no CUDA driver");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut run = clt::demo::synthetic_config();
    run.model.n_features = 37; // not a multiple of the number of ranks
    run.model.skip = false; // (the CUDA step has no skip connections)
    run.train.steps = 6;
    run.train.batch_size = 128;
    run.train.warmup_steps = 2;
    run.train.log_every = 1;
    run.train.checkpoint_every = 3;
    run.train.keep_checkpoints = 10;
    run.train.calibration_batches = 2;
    run.train.backend = BackendKind::CudaHost;

    // One process (it ignores `parallel`): the single-process trainer on the same backend.
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, toml::to_string(&run).unwrap()).unwrap();
    let single = tmp.path().join("single");
    let o = Command::new(CLT)
        .args(["train", "--config", cfg.to_str().unwrap()])
        .args(["--out", single.to_str().unwrap(), "--quiet"])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "one process failed:\n{}", text(&o));
    let want = losses(&single);
    assert_eq!(want.len(), 6);
    let want_params = checkpoint::load_transcoder(&single).unwrap().params;

    for parallel in [Parallel::Data, Parallel::Features] {
        run.train.parallel = parallel;
        let cfg = tmp.path().join(format!("{parallel:?}.toml"));
        std::fs::write(&cfg, toml::to_string(&run).unwrap()).unwrap();
        let two = tmp.path().join(format!("{parallel:?}"));
        two_ranks(&cfg, &two, &want, &want_params, parallel);
    }
}

/// A rank that cannot open its device (here `CLT_CUDA_DEVICE=999`) stops the job at start-up with an error
/// naming the rank and the device, before any data is read.
#[test]
fn a_rank_without_its_device_stops_the_job_naming_it() {
    if !driver_present() {
        eprintln!("skipped: no CUDA driver");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut run = clt::demo::synthetic_config();
    run.model.skip = false;
    run.train.steps = 2;
    run.train.backend = BackendKind::CudaHost;
    run.train.parallel = Parallel::Data;
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, toml::to_string(&run).unwrap()).unwrap();
    let o = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "--timeout", "120"])
        .args(["-n", "2", CLT, "train", "--config", cfg.to_str().unwrap()])
        .args(["--out", tmp.path().join("out").to_str().unwrap(), "--quiet"])
        .env("CLT_CUDA_DEVICE", "999")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun not found (scripts/install-mpi.sh installs Open MPI)");
    let log = text(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("cannot open CUDA device 999"), "{log}");
    assert!(log.contains("rank 0") || log.contains("rank 1"), "{log}");
}

/// `mpirun -n 2 clt train` of `cfg` into `two`, then its losses and parameters against one process's.
fn two_ranks(cfg: &Path, two: &Path, want: &[f64], want_params: &Params, parallel: Parallel) {
    let o = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "--timeout", "300"])
        .args(["-n", "2", CLT, "train", "--config", cfg.to_str().unwrap()])
        .args(["--out", two.to_str().unwrap(), "--quiet"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("mpirun not found (scripts/install-mpi.sh installs Open MPI)");
    let log = text(&o);
    assert!(
        o.status.success(),
        "{parallel:?}: mpirun -n 2 failed:\n{log}"
    );
    assert!(log.contains("2 rank(s), 6 steps"), "{parallel:?}: {log}");
    let got = losses(two);
    assert_eq!(got.len(), 6, "rank 0 alone writes metrics");
    for (s, (g, w)) in got.iter().zip(want).enumerate() {
        eprintln!(
            "{parallel:?}, step {}: loss one process {w:.7}, two ranks {g:.7}",
            s + 1
        );
        assert!(
            (g - w).abs() <= 1e-4 * w.abs(),
            "{parallel:?}: loss at step {}: {g} vs {w}",
            s + 1
        );
    }
    let got = checkpoint::load_transcoder(two).unwrap().params;
    let worst = assert_params_close(&format!("{parallel:?}"), &got, want_params, 1e-4);
    eprintln!("{parallel:?}: parameter tensors differ by at most {worst:.1e} (relative L2)");
}

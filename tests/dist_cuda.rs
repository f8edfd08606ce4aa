//! Data-parallel training on the CUDA step (`--backend cuda-host`; the `cuda` and `mpi` features): two
//! ranks under `mpirun`, each running the device step on its half of every batch (its own device, chosen by
//! its rank on the node) with the gradients all-reduced over MPI, equal one process running the same step on
//! the whole batch. Runs where a CUDA driver is present: the GPU machine, and CI on the CPU emulator
//! (kernels/emu/, found through `LD_LIBRARY_PATH`, which `mpirun` passes on); without one it prints that it
//! was skipped (and fails under `CLT_REQUIRE_GPU=1`).
//!
//! Tolerance: 1e-4 relative on the losses and on every parameter tensor (L2). Not the 1e-5 of the CPU's
//! data-parallel test: the device step sums each feature's gradient over its entries in fp32, and two ranks
//! add two half sums; the parameters it reads are bf16 roundings of the host's f32 ones, so a difference in
//! the last f32 bit can move a weight by a bf16 step (2⁻⁹ relative).
#![cfg(all(feature = "cuda", feature = "mpi"))]

use clt::backend::BackendKind;
use clt::backend::cuda::context::driver_present;
use clt::dist::checkpoint;
use clt::train::Parallel;
use std::path::Path;
use std::process::{Command, Output};

const CLT: &str = env!("CARGO_BIN_EXE_clt");

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn losses(run_dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn two_ranks_data_parallel_on_cuda_host_equal_one_process() {
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
    run.model.n_features = 37;
    run.model.skip = false; // (the CUDA step has no skip connections)
    run.train.steps = 6;
    run.train.batch_size = 128;
    run.train.warmup_steps = 2;
    run.train.log_every = 1;
    run.train.checkpoint_every = 3;
    run.train.keep_checkpoints = 10;
    run.train.calibration_batches = 2;
    run.train.backend = BackendKind::CudaHost;
    run.train.parallel = Parallel::Data;
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, toml::to_string(&run).unwrap()).unwrap();
    let cfg = cfg.to_str().unwrap();

    // One process (it ignores `parallel`): the single-process trainer on the same backend.
    let single = tmp.path().join("single");
    let o = Command::new(CLT)
        .args([
            "train",
            "--config",
            cfg,
            "--out",
            single.to_str().unwrap(),
            "--quiet",
        ])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "one process failed:\n{}", text(&o));
    let want = losses(&single);
    assert_eq!(want.len(), 6);

    let two = tmp.path().join("two");
    let o = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--timeout",
            "300",
            "-n",
            "2",
            CLT,
        ])
        .args([
            "train",
            "--config",
            cfg,
            "--out",
            two.to_str().unwrap(),
            "--quiet",
        ])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("mpirun not found (scripts/install-mpi.sh installs Open MPI)");
    let log = text(&o);
    assert!(o.status.success(), "mpirun -n 2 failed:\n{log}");
    assert!(log.contains("2 rank(s), 6 steps"), "{log}");
    let got = losses(&two);
    assert_eq!(got.len(), 6, "rank 0 alone writes metrics");
    for (s, (g, w)) in got.iter().zip(&want).enumerate() {
        eprintln!("step {}: loss one process {w:.7}, two ranks {g:.7}", s + 1);
        assert!(
            (g - w).abs() <= 1e-4 * w.abs(),
            "loss at step {}: {g} vs {w}",
            s + 1
        );
    }
    let got = checkpoint::load_transcoder(&two).unwrap().params;
    let want = checkpoint::load_transcoder(&single).unwrap().params;
    for (i, (g, w)) in got.tensors().iter().zip(want.tensors()).enumerate() {
        let num: f64 = g
            .iter()
            .zip(w.iter())
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum();
        let d = (num / den.max(1e-30)).sqrt();
        assert!(d <= 1e-4, "tensor {i} differs by {d:e} (relative L2)");
    }
}

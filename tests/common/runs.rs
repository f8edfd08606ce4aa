//! Helpers for the tests that run `clt` (under `mpirun` or not) and compare training runs: a process's
//! output as text, a run's losses, parameters compared tensor by tensor, configurations written, jobs
//! started under `mpirun`.

use clt::clt::Params;
use clt::train::RunConfig;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The `clt` binary of this build.
pub const CLT: &str = env!("CARGO_BIN_EXE_clt");

/// Writes `run` as TOML to `dir/name`.
pub fn write_config(dir: &Path, name: &str, run: &RunConfig) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, toml::to_string(run).unwrap()).unwrap();
    p
}

/// `mpirun` as root, oversubscribed, with a job time limit of `timeout_s`, and its session directory under
/// a fresh temporary directory (returned: keep it until the job ends). Open MPI 4.1 makes
/// `/tmp/ompi.<host>.<uid>` for every job, and a job fails at start-up ("Directory: /tmp/ompi.vm.0 Error:
/// File exists") when another starting at the same moment wins the race to create it.
pub fn mpirun_command(timeout_s: u32) -> (Command, tempfile::TempDir) {
    let session = tempfile::tempdir().unwrap();
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "--timeout"])
        .arg(timeout_s.to_string())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_orte_tmpdir_base", session.path());
    (c, session)
}

/// `mpirun -n <n> clt <args>` as root, oversubscribed, one thread per rank, with `env` and a job time
/// limit; the output and how long it took.
pub fn mpirun(n: usize, args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    mpirun_program(n, &[CLT], args, env)
}

/// [`mpirun`] with each rank started as `program` (a command and its first arguments, e.g. a shell that
/// sets a rank's environment before it runs `clt`) followed by `args`.
pub fn mpirun_program(
    n: usize,
    program: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
) -> (Output, Duration) {
    let (mut c, _session) = mpirun_command(180);
    c.args(["-n", &n.to_string()])
        .args(program)
        .args(args)
        .env("RAYON_NUM_THREADS", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    let t = Instant::now();
    let out = c.output().expect(
        "mpirun not found: the mpi tests need Open MPI (scripts/install-mpi.sh installs it)",
    );
    (out, t.elapsed())
}

/// `mpirun -n <n> clt train --config <cfg> --out <out> --quiet` with `env` (it may fail: the caller
/// checks); the output and how long it took.
pub fn mpirun_train(n: usize, cfg: &Path, out: &Path, env: &[(&str, &str)]) -> (Output, Duration) {
    let (cfg, out) = (cfg.to_str().unwrap(), out.to_str().unwrap());
    mpirun(n, &["train", "--config", cfg, "--out", out, "--quiet"], env)
}

/// A finished process's stdout and stderr, one after the other.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The loss of every logged step of a run (its `metrics.jsonl`).
pub fn losses(run_dir: &Path) -> Vec<f64> {
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

/// Every parameter tensor of `got` within `tol` of `want`'s, relative in L2 norm; returns the largest
/// difference.
pub fn assert_params_close(what: &str, got: &Params, want: &Params, tol: f64) -> f64 {
    let mut worst = 0f64;
    for (i, (g, w)) in got.tensors().iter().zip(want.tensors()).enumerate() {
        let num: f64 = g
            .iter()
            .zip(w.iter())
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum();
        let d = (num / den.max(1e-30)).sqrt();
        assert!(
            d <= tol,
            "{what}: tensor {i} differs by {d:e} (relative L2)"
        );
        worst = worst.max(d);
    }
    worst
}

/// Copies checkpoint `step` of `from` into a fresh run directory `to`, named by its `LATEST`.
pub fn fork_run(from: &Path, step: u64, to: &Path) {
    let name = format!("step_{step:08}");
    let src = from.join("checkpoints").join(&name);
    let dst = to.join("checkpoints").join(&name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    std::fs::write(to.join("checkpoints").join("LATEST"), &name).unwrap();
}

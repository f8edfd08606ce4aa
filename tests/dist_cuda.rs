//! Distributed training on the CUDA step (`--backend cuda-host`; the `cuda` and `mpi` features), ranks
//! under `mpirun` (each on its own device, chosen by its rank on the node) against one process running the
//! same step on the whole model and batch: data-parallel on two ranks (each rank's device step on half of
//! every batch, the gradients all-reduced over MPI); feature-sharded on two (each rank's device encodes and
//! decodes half the features, the partial reconstructions are all-reduced, over MPI through host memory or
//! over NCCL on the device, and the device runs the backward on the residual; the two give the same bits);
//! and a 2 x 2 grid on four, its partials summed by NCCL within each replica's group. With `overlap`, the
//! partials summed a target layer at a time while the next decodes give the blocking sums' bits. And the
//! cases where NCCL cannot serve a group: ranks sharing a GPU, a rank that cannot load libnccl.
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

use clt::backend::cuda::context::driver_present;
use clt::backend::{BackendKind, EncoderKernel, KernelChoice, SparseKernels};
use clt::clt::Params;
use clt::dist::checkpoint;
use clt::train::{Collectives, Parallel, RunConfig};
use common::runs::{
    CLT, assert_params_close, fork_run, losses, mpirun, mpirun_program, mpirun_train, text,
    write_config,
};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Whether a CUDA driver is present; without one the test prints that it was skipped (and fails under
/// `CLT_REQUIRE_GPU=1`, which CI sets when it runs the emulator).
fn have_driver() -> bool {
    if driver_present() {
        return true;
    }
    assert!(
        !std::env::var("CLT_REQUIRE_GPU").is_ok_and(|v| v == "1"),
        "CLT_REQUIRE_GPU=1 but no CUDA driver"
    );
    eprintln!("skipped: no CUDA driver");
    false
}

/// The runs compared here: 6 steps of a small synthetic CLT on `backend`, with 37 features (not a multiple
/// of the number of ranks), no skip connections (`skip_connections_on_ranks_equal_one_process` has them), a
/// checkpoint every 3 steps.
fn cuda_run(backend: BackendKind) -> RunConfig {
    let mut run = clt::demo::synthetic_config();
    run.model.n_features = 37;
    run.model.skip = false;
    run.train.steps = 6;
    run.train.batch_size = 128;
    run.train.warmup_steps = 2;
    run.train.log_every = 1;
    run.train.checkpoint_every = 3;
    run.train.keep_checkpoints = 10;
    run.train.calibration_batches = 2;
    run.train.backend = backend;
    run
}

/// `run` in one process (the single-process trainer on the same backend; it ignores `parallel`) into
/// `dir/single`: its losses and final parameters.
fn one_process(dir: &Path, run: &RunConfig) -> (Vec<f64>, Params) {
    let cfg = write_config(dir, "single.toml", run);
    let single = dir.join("single");
    let o = Command::new(CLT)
        .args(["train", "--config", cfg.to_str().unwrap()])
        .args(["--out", single.to_str().unwrap(), "--quiet"])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "one process failed:\n{}", text(&o));
    let want = losses(&single);
    assert_eq!(want.len(), 6);
    (want, checkpoint::load_transcoder(&single).unwrap().params)
}

/// `mpirun -n <n> clt train` of `cfg` into `out`, then its losses and parameters against one process's;
/// returns the job's output.
fn ranks(
    n: usize,
    cfg: &Path,
    out: &Path,
    (want, want_params): &(Vec<f64>, Params),
    label: &str,
) -> String {
    let (o, _) = mpirun_train(n, cfg, out, &[]);
    let log = text(&o);
    assert!(o.status.success(), "{label}: mpirun failed:\n{log}");
    assert!(log.contains(&format!("{n} rank(s)")), "{label}: {log}");
    let got = losses(out);
    assert_eq!(got.len(), 6, "rank 0 alone writes metrics");
    for (s, (g, w)) in got.iter().zip(want).enumerate() {
        eprintln!(
            "{label}, step {}: loss one process {w:.7}, {n} ranks {g:.7}",
            s + 1
        );
        assert!(
            (g - w).abs() <= 1e-4 * w.abs(),
            "{label}: loss at step {}: {g} vs {w}",
            s + 1
        );
    }
    let got = checkpoint::load_transcoder(out).unwrap().params;
    let worst = assert_params_close(label, &got, want_params, 1e-4);
    eprintln!("{label}: parameter tensors differ by at most {worst:.1e} (relative L2)");
    log
}

/// Every tensor of `a` equals `b`'s to the bit.
fn assert_same_bits(what: &str, a: &Params, b: &Params) {
    for (i, (x, y)) in a.tensors().into_iter().zip(b.tensors()).enumerate() {
        assert!(
            x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "tensor {i}: {what}"
        );
    }
}

#[test]
fn ranks_on_cuda_host_equal_one_process() {
    if !have_driver() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut run = cuda_run(BackendKind::CudaHost);
    let want = one_process(tmp.path(), &run);
    // (mode, collectives, ranks, how the partials are summed, overlapped with decoding). The grid is 2
    // feature shards x 2 replicas: NCCL over a group split from the world.
    let modes = [
        (Parallel::Data, Collectives::Auto, 2, "none", false),
        (Parallel::Features, Collectives::Mpi, 2, "mpi", false),
        (Parallel::Features, Collectives::Nccl, 2, "nccl", false),
        (Parallel::Features, Collectives::Mpi, 2, "mpi", true),
        (Parallel::Features, Collectives::Nccl, 2, "nccl", true),
        (Parallel::Grid, Collectives::Auto, 4, "nccl", false),
    ];
    for (parallel, collectives, n, via, overlap) in modes {
        run.train.parallel = parallel;
        run.train.collectives = collectives;
        run.train.feature_shards = (parallel == Parallel::Grid).then_some(2);
        run.train.overlap = overlap;
        let name = format!(
            "{parallel:?}-{collectives:?}{}",
            if overlap { "-overlap" } else { "" }
        );
        let cfg = write_config(tmp.path(), &format!("{name}.toml"), &run);
        let label = format!("{name}, {n} ranks");
        let log = ranks(n, &cfg, &tmp.path().join(&name), &want, &label);
        let said = format!("summed over the feature shards with {via}");
        assert_eq!(log.contains(&said), via != "none", "{label}: {log}");
        assert_eq!(
            log.contains("(overlapped with decoding)"),
            overlap,
            "{label}: {log}"
        );
    }
    // Overlapped (a target layer at a time, each layer's all-reduce while the next decodes) or not, the
    // partials' sums are the same additions: the same bits, through the host and on the device.
    for via in ["Mpi", "Nccl"] {
        let load = |name: String| checkpoint::load_transcoder(&tmp.path().join(name)).unwrap();
        assert_same_bits(
            &format!("{via}: the overlapped run's parameters differ from the blocking run's"),
            &load(format!("Features-{via}")).params,
            &load(format!("Features-{via}-overlap")).params,
        );
    }
    // The same partials summed through host memory or on the device: for two ranks both sums are the one
    // f32 addition a + b, and the residual kernel is the host residual's arithmetic, so every parameter
    // is the same to the bit.
    let via_mpi = checkpoint::load_transcoder(&tmp.path().join("Features-Mpi")).unwrap();
    let via_nccl = checkpoint::load_transcoder(&tmp.path().join("Features-Nccl")).unwrap();
    assert_same_bits(
        "NCCL's parameters differ from MPI's",
        &via_mpi.params,
        &via_nccl.params,
    );
}

/// The resident loop (`backend = "cuda"`: parameters, Adam's moments and the update on each rank's
/// device) against the single-process resident loop, losses and parameters within the same 1e-4 as the
/// host-side step: feature-sharded over two ranks (the partials summed by NCCL), a 2 x 2 grid with the
/// partials' sums overlapped with decoding (on the tiled kernels, `sparse_kernels = "tiled"`), data-parallel over two and a 2 x 2 grid (the gradients summed
/// over the replicas by NCCL, and once through the host). Then a
/// two-rank feature-sharded run resumed from its step-3 checkpoint finishes with the same parameters, to
/// the bit, as the run that went straight through (the checkpoint is the device state, downloaded).
#[test]
fn the_resident_loop_on_two_ranks_equals_one_process_and_resumes_bit_for_bit() {
    if !have_driver() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = cuda_run(BackendKind::Cuda);
    let want = one_process(tmp.path(), &run);
    // (mode, ranks, collectives, what the log says).
    let modes = [
        (
            Parallel::Features,
            2,
            Collectives::Auto,
            "partial reconstructions summed over the feature shards with nccl",
        ),
        (
            Parallel::Grid,
            4,
            Collectives::Auto,
            "(overlapped with decoding)",
        ),
        (
            Parallel::Data,
            2,
            Collectives::Auto,
            "gradients summed over the replicas on the device with nccl",
        ),
        (
            Parallel::Data,
            2,
            Collectives::Mpi,
            "gradients summed over the replicas on the device with mpi",
        ),
        (
            Parallel::Grid,
            4,
            Collectives::Auto,
            "gradients summed over the replicas on the device with nccl",
        ),
    ];
    for (i, (parallel, n, collectives, said)) in modes.into_iter().enumerate() {
        let mut r = run.clone();
        r.train.parallel = parallel;
        r.train.collectives = collectives;
        r.train.feature_shards = (parallel == Parallel::Grid).then_some(2);
        // The second run: a grid whose replicas' partials are summed a target layer at a time, each rank
        // on the tiled kernels (the tiled decode a target layer at a time, and the tiled backward).
        r.train.overlap = i == 1;
        if i == 1 {
            r.train.sparse_kernels = SparseKernels::Tiled;
        }
        let name = format!("resident-{i}-{parallel:?}-{collectives:?}");
        let cfg = write_config(tmp.path(), &format!("{name}.toml"), &r);
        let label = format!("resident, {parallel:?}, {collectives:?}, {n} ranks");
        let log = ranks(n, &cfg, &tmp.path().join(&name), &want, &label);
        assert!(log.contains(said), "{label}: {log}");
    }

    let two = tmp.path().join("resident-0-Features-Auto");
    resume_on_two_ranks_from_step_3(&two, &tmp.path().join("resumed"));
}

/// Forks the run in `straight` at its step-3 checkpoint into `resumed`, resumes it there on two ranks, and
/// checks that it ends with the straight run's parameters, to the bit.
fn resume_on_two_ranks_from_step_3(straight: &Path, resumed: &Path) {
    fork_run(straight, 3, resumed);
    let (o, _) = mpirun(
        2,
        &[
            "train",
            "--resume",
            "--out",
            resumed.to_str().unwrap(),
            "--quiet",
        ],
        &[],
    );
    assert!(o.status.success(), "resume failed:\n{}", text(&o));
    assert_same_bits(
        "the resumed run's parameters differ from the straight run's",
        &checkpoint::load_transcoder(straight).unwrap().params,
        &checkpoint::load_transcoder(resumed).unwrap().params,
    );
}

/// `encoder_kernel` and `sparse_kernels` set to `auto` on two feature-sharded ranks of the resident loop:
/// each rank times the candidates on its own shard's step, and both take the one rank 0 picks from the
/// summed times. Rank 0 writes `tuning.json`, whose agreed choice the checkpoints record; the run resumed
/// from its step-3 checkpoint runs that choice without timing anything again, and ends with the straight
/// run's parameters, to the bit (which it would not if a rank had taken other kernels than before).
#[test]
fn auto_kernels_on_ranks_are_agreed_kept_and_resumed() {
    if !have_driver() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut run = cuda_run(BackendKind::Cuda);
    run.train.parallel = Parallel::Features;
    run.train.encoder_kernel = EncoderKernel::Auto;
    run.train.sparse_kernels = SparseKernels::Auto;
    let cfg = write_config(tmp.path(), "auto.toml", &run);
    let out = tmp.path().join("auto");
    let (o, _) = mpirun_train(2, &cfg, &out, &[]);
    assert!(o.status.success(), "mpirun failed:\n{}", text(&o));
    let report = std::fs::read_to_string(out.join("tuning.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let agreed: KernelChoice = serde_json::from_value(report["agreed"].clone()).unwrap();
    assert!(!agreed.is_auto(), "{report}");
    assert!(
        report["trials"].as_array().is_some_and(|t| t.len() >= 2),
        "{report}"
    );
    let at3 = out.join("checkpoints").join("step_00000003");
    assert_eq!(
        checkpoint::read_manifest(&at3).unwrap().kernels,
        Some(agreed)
    );
    let resumed = tmp.path().join("resumed");
    resume_on_two_ranks_from_step_3(&out, &resumed);
    assert!(
        !resumed.join("tuning.json").exists(),
        "the resumed run timed the candidates again"
    );
}

/// The distributed resident loop on an int8 store: batches staged as the store's codes and decoded on each
/// rank's device (the default, `device_dequant`) give, to the bit, the run that f32 staging gives, with the
/// same losses: feature-sharded with NCCL and overlap, feature-sharded through MPI (the host keeps f32
/// targets for its sums), and data-parallel (each replica stages its slice of the codes).
#[test]
fn the_resident_loop_on_ranks_decodes_store_batches_on_the_device() {
    if !have_driver() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut run = cuda_run(BackendKind::Cuda);
    let store = tmp.path().join("store");
    common::store::synthetic_store(&mut run, &store, clt::store::Codec::Int8, 900, 400);
    let modes = [
        (Parallel::Features, Collectives::Nccl, true),
        (Parallel::Features, Collectives::Mpi, false),
        (Parallel::Data, Collectives::Auto, false),
    ];
    for (parallel, collectives, overlap) in modes {
        let mut out = Vec::new();
        for device_dequant in [true, false] {
            let mut r = run.clone();
            r.train.parallel = parallel;
            r.train.collectives = collectives;
            r.train.overlap = overlap;
            r.train.device_dequant = device_dequant;
            let name = format!("store-{parallel:?}-{collectives:?}-{device_dequant}");
            let cfg = write_config(tmp.path(), &format!("{name}.toml"), &r);
            let dir = tmp.path().join(&name);
            let (o, _) = mpirun_train(2, &cfg, &dir, &[]);
            assert!(o.status.success(), "{name}: mpirun failed:\n{}", text(&o));
            out.push((
                losses(&dir),
                checkpoint::load_transcoder(&dir).unwrap().params,
            ));
        }
        let label = format!("{parallel:?}, {collectives:?}");
        assert_eq!(out[0].0.len(), 6, "{label}");
        assert_eq!(
            out[0].0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            out[1].0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{label}: losses staged as codes {:?}, as f32 {:?}",
            out[0].0,
            out[1].0
        );
        assert_same_bits(
            &format!("{label}: parameters staged as codes differ from f32 staging's"),
            &out[0].1,
            &out[1].1,
        );
    }
}

/// Skip connections on the distributed CUDA steps, two ranks against one process on the same backend, within
/// the same 1e-4: the shard that adds the decoder bias to its partial adds the skip term too (on the device,
/// a target layer at a time under `overlap`), and the skip weights' gradient, from the whole residual, is
/// the same on every shard and summed over the replicas with the rest. Every way the partials are summed:
/// on the device by NCCL a layer at a time (resident, overlap) and at once (`cuda_host`), through the host
/// at once (resident, MPI) and a layer at a time (`cuda_host`, MPI, overlap); and data-parallel (the
/// gradients packed and summed on the device).
#[test]
fn skip_connections_on_ranks_equal_one_process() {
    if !have_driver() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for backend in [BackendKind::Cuda, BackendKind::CudaHost] {
        let mut run = cuda_run(backend);
        run.model.skip = true;
        let dir = tmp.path().join(format!("{backend:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        let want = one_process(&dir, &run);
        let modes: &[(Parallel, Collectives, bool)] = match backend {
            BackendKind::Cuda => &[
                (Parallel::Features, Collectives::Nccl, true),
                (Parallel::Features, Collectives::Mpi, false),
                (Parallel::Data, Collectives::Auto, false),
            ],
            _ => &[
                (Parallel::Features, Collectives::Mpi, true),
                (Parallel::Features, Collectives::Nccl, false),
            ],
        };
        for &(parallel, collectives, overlap) in modes {
            let mut r = run.clone();
            r.train.parallel = parallel;
            r.train.collectives = collectives;
            r.train.overlap = overlap;
            let name = format!("skip-{backend:?}-{parallel:?}-{collectives:?}-{overlap}");
            let cfg = write_config(&dir, &format!("{name}.toml"), &r);
            ranks(2, &cfg, &dir.join(&name), &want, &name);
        }
    }
}

/// Two ranks on one GPU (the emulator's `CLT_EMU_ONE_DEVICE=1`): NCCL refuses such a communicator, so
/// `collectives = "auto"` sums the partials through the host instead (and says so), and `"nccl"` stops
/// at start-up naming the ranks that share the device.
#[test]
fn ranks_sharing_a_gpu_fall_back_to_mpi_or_are_refused() {
    if !have_driver() {
        return;
    }
    let gpu = clt::backend::cuda::Gpu::open(0).unwrap().describe();
    if !gpu.contains("CLT CPU emulator") {
        eprintln!("skipped: needs the emulator's CLT_EMU_ONE_DEVICE (this is {gpu})");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut run = cuda_run(BackendKind::CudaHost);
    run.train.steps = 2;
    run.train.parallel = Parallel::Features;
    let one = [("CLT_EMU_ONE_DEVICE", "1")];
    let cfg = write_config(tmp.path(), "auto.toml", &run);
    let (o, _) = mpirun_train(2, &cfg, &tmp.path().join("auto"), &one);
    let log = text(&o);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("summed over the feature shards with mpi"),
        "{log}"
    );
    run.train.collectives = Collectives::Nccl;
    let cfg = write_config(tmp.path(), "nccl.toml", &run);
    let (o, _) = mpirun_train(2, &cfg, &tmp.path().join("nccl"), &one);
    let log = text(&o);
    assert!(!o.status.success(), "{log}");
    assert!(
        log.contains("rank(s) [0, 1] of the group share a GPU"),
        "{log}"
    );
}

/// Rank 1 cannot load libnccl (its `LD_LIBRARY_PATH` names a copy of the emulator's directory without
/// `libnccl.so`; rank 0 keeps it): `collectives = "auto"` sums the partials through the host instead, on
/// every rank (the choice is collective) and with the same parameters, to the bit, as `"mpi"`; `"nccl"`
/// stops at start-up naming rank 1.
#[test]
fn a_rank_without_libnccl_falls_back_to_mpi_or_is_refused() {
    if !have_driver() {
        return;
    }
    let paths = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let Some(emu) = paths
        .split(':')
        .map(Path::new)
        .find(|d| d.join("libnccl.so").exists() && d.join("libcuda.so").exists())
    else {
        eprintln!(
            "skipped: needs the emulator's directory (libcuda.so, libnccl.so) on LD_LIBRARY_PATH"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let no_nccl = tmp.path().join("no-nccl");
    std::fs::create_dir(&no_nccl).unwrap();
    for entry in std::fs::read_dir(emu).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.starts_with("lib") && name.contains(".so") && !name.starts_with("libnccl") {
            std::os::unix::fs::symlink(&path, no_nccl.join(&name)).unwrap();
        }
    }
    let mut run = cuda_run(BackendKind::CudaHost);
    run.train.steps = 2;
    run.train.parallel = Parallel::Features;
    // Each rank through a shell that gives rank 1 the directory without libnccl.
    let script = format!(
        "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then export LD_LIBRARY_PATH={}; fi; exec {CLT} \"$@\"",
        no_nccl.display()
    );
    let job = |name: &str, run: &RunConfig| {
        let cfg = write_config(tmp.path(), &format!("{name}.toml"), run);
        let out = tmp.path().join(name);
        let (cfg_s, out_s) = (cfg.to_str().unwrap(), out.to_str().unwrap());
        let (o, _) = mpirun_program(
            2,
            &["sh", "-c", &script, "sh"],
            &["train", "--config", cfg_s, "--out", out_s, "--quiet"],
            &[],
        );
        (o, out)
    };
    let (o, auto) = job("auto", &run);
    let log = text(&o);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("summed over the feature shards with mpi"),
        "{log}"
    );
    run.train.collectives = Collectives::Mpi;
    let (o, mpi) = job("mpi", &run);
    assert!(o.status.success(), "{}", text(&o));
    assert_same_bits(
        "auto without libnccl on rank 1 differs from collectives = \"mpi\"",
        &checkpoint::load_transcoder(&auto).unwrap().params,
        &checkpoint::load_transcoder(&mpi).unwrap().params,
    );
    run.train.collectives = Collectives::Nccl;
    let (o, _) = job("nccl", &run);
    let log = text(&o);
    assert!(!o.status.success(), "{log}");
    assert!(
        log.contains("rank(s) [1] of the group cannot load libnccl.so"),
        "{log}"
    );
}

/// A rank that cannot open its device (here `CLT_CUDA_DEVICE=999`) stops the job at start-up with an error
/// naming the rank and the device, before any data is read.
#[test]
fn a_rank_without_its_device_stops_the_job_naming_it() {
    if !have_driver() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut run = cuda_run(BackendKind::CudaHost);
    run.train.parallel = Parallel::Data;
    let cfg = write_config(tmp.path(), "run.toml", &run);
    let out = tmp.path().join("out");
    let (o, _) = mpirun_train(2, &cfg, &out, &[("CLT_CUDA_DEVICE", "999")]);
    let log = text(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("cannot open CUDA device 999"), "{log}");
    assert!(log.contains("rank 0") || log.contains("rank 1"), "{log}");
}

/// A rank that hangs before the partials' NCCL all-reduce: NCCL itself would wait for it forever; the
/// other rank's wait has the MPI deadline (here 4 s), after which the liveness probe names the hung rank
/// and the job ends. (On the emulator, its libnccl gives up after `CLT_EMU_NCCL_TIMEOUT_S` and returns
/// an error, which takes the same way out.)
#[test]
fn a_hung_rank_in_the_nccl_sum_stops_the_job_naming_it() {
    if !have_driver() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut run = cuda_run(BackendKind::CudaHost);
    run.train.parallel = Parallel::Features;
    run.train.collectives = Collectives::Nccl;
    let cfg = write_config(tmp.path(), "run.toml", &run);
    let out = tmp.path().join("out");
    let (o, took) = mpirun_train(
        2,
        &cfg,
        &out,
        &[
            ("CLT_DIST_FAULT", "hang:1:3"),
            ("CLT_DIST_TIMEOUT_S", "4"),
            ("CLT_EMU_NCCL_TIMEOUT_S", "4"),
        ],
    );
    let log = text(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("with nccl"), "{log}");
    assert!(
        log.contains("all-reduce of the partial reconstructions")
            && log.contains("no answer from rank(s) [1]"),
        "the NCCL sum's watchdog must name rank 1:\n{log}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
    eprintln!("took {took:.1?}:\n{log}");
}

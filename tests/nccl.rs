//! NCCL bootstrapped by MPI (the `cuda` and `mpi` features together): without a CUDA driver (or without
//! libnccl) `NcclComm::new` is a clear `BackendUnavailable` error; with a GPU, a one-rank communicator's
//! all-reduce returns its input, and two ranks under `mpirun` (this executable started again as both) sum
//! their buffers. MPI initialises once per process: the one-rank test uses a singleton world, the two-rank
//! test only starts `mpirun`, and its ranks run just their own part. In CI both run on the CPU emulator
//! (kernels/emu/: libcuda.so and libnccl.so of its own, found through `LD_LIBRARY_PATH`).
#![cfg(all(feature = "cuda", feature = "mpi"))]

use clt::Error;
use clt::backend::cuda::context::driver_present;
use clt::dist::nccl::{NcclComm, nccl_present};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// Held by each test for its whole run: the one-rank test's singleton MPI initialisation, running while
/// the other test starts `mpirun` from the same process, made `mpirun` fail with no output about half the
/// time (2026-11-30, Open MPI on the CI image); one after the other, they never did.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn nccl_is_a_clear_error_without_a_gpu_and_sums_with_one() {
    let _serial = one_at_a_time();
    let world = clt::dist::mpi::World::init().unwrap();
    let comm = world.comm();
    match NcclComm::new(&comm, 0) {
        Err(Error::BackendUnavailable { backend, reason }) => {
            assert!(
                !driver_present() || !nccl_present(),
                "BackendUnavailable with a driver and NCCL present: {reason}"
            );
            let want = if driver_present() { "nccl" } else { "cuda" };
            assert_eq!(backend, want, "{reason}");
            assert!(
                reason.contains(if driver_present() {
                    "libnccl"
                } else {
                    "no CUDA driver"
                }),
                "{reason}"
            );
            eprintln!("skipped the GPU part: {reason}");
        }
        Err(other) => panic!("expected BackendUnavailable or a communicator, got {other}"),
        Ok(nccl) => {
            assert_eq!((nccl.rank(), nccl.size()), (0, 1));
            let host: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 3.0).collect();
            let mut dev = nccl.stream().clone_htod(&host).unwrap();
            nccl.sum_f32(&mut dev).unwrap();
            let back = nccl.stream().clone_dtoh(&dev).unwrap();
            assert_eq!(back, host, "a one-rank sum is the identity");
        }
    }
}

/// Two ranks: each sums a buffer that depends on its rank, twice; both get the same sums, the exact ones.
#[test]
fn nccl_sums_over_two_ranks() {
    if std::env::var("CLT_NCCL_RANKS").is_ok_and(|v| v == "2") {
        two_rank_part();
        return;
    }
    let _serial = one_at_a_time();
    if !driver_present() || !nccl_present() {
        assert!(
            !std::env::var("CLT_REQUIRE_GPU").is_ok_and(|v| v == "1"),
            "CLT_REQUIRE_GPU=1 but no CUDA driver or no libnccl"
        );
        eprintln!("skipped: no CUDA driver or no libnccl");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--timeout",
            "120",
            "-n",
            "2",
        ])
        .arg(&exe)
        .args([
            "--exact",
            "nccl_sums_over_two_ranks",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("CLT_NCCL_RANKS", "2")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun not found (scripts/install-mpi.sh installs Open MPI)");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    for r in 0..2 {
        assert!(
            log.contains(&format!("nccl rank {r} of 2: sums exact")),
            "{log}"
        );
    }
}

/// One rank's part of [`nccl_sums_over_two_ranks`], under `mpirun -n 2`.
fn two_rank_part() {
    let world = clt::dist::mpi::World::init().unwrap();
    let comm = world.comm();
    let nccl = NcclComm::new(&comm, 0).unwrap();
    assert_eq!(nccl.size(), 2);
    let r = nccl.rank();
    // Small integers times powers of two: every partial sum is exact in f32.
    let host: Vec<f32> = (0..1000)
        .map(|i| (i % 97) as f32 * (r + 1) as f32)
        .collect();
    let mut dev = nccl.stream().clone_htod(&host).unwrap();
    nccl.sum_f32(&mut dev).unwrap();
    nccl.sum_f32(&mut dev).unwrap(); // the sum again: 2 × (1 + 2) = 6 × the base values
    let back = nccl.stream().clone_dtoh(&dev).unwrap();
    let want: Vec<f32> = (0..1000).map(|i| (i % 97) as f32 * 6.0).collect();
    assert_eq!(back, want, "rank {r}");
    println!("nccl rank {r} of 2: sums exact");
}

//! NCCL bootstrapped by MPI (the `cuda` and `mpi` features together): without a CUDA driver (or without
//! libnccl) `NcclComm::new` is a clear `BackendUnavailable` error; with a GPU, a one-rank communicator's
//! all-reduce returns its input. One test per process: MPI initialises once (a singleton world without
//! `mpirun`).
#![cfg(all(feature = "cuda", feature = "mpi"))]

use clt::Error;
use clt::backend::cuda::context::driver_present;
use clt::dist::nccl::{NcclComm, nccl_present};

#[test]
fn nccl_is_a_clear_error_without_a_gpu_and_sums_with_one() {
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

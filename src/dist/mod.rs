//! Distributed training: a CLT's features sharded across processes.
//!
//! Each of N ranks owns a contiguous range of about F/N features of every layer (their encoder rows, encoder
//! biases, thresholds and all their decoder rows); decoder biases and skip weights are replicated. A step is
//! a local sparse encode and decode into a partial reconstruction, one all-reduce (sum) of the `[B][L][d]`
//! partials, then the loss and its residual, identical on every rank, a local backward and a local Adam step.
//! Data parallelism (`parallel = "data"`) and a 2-D grid of both (`parallel = "grid"`) use the same trainer.
//! See `docs/distributed.md` for the design and measurements, `docs/scaling.md` for the communication model.
//!
//! - [`comm`]: the collectives the trainer needs ([`comm::Comm`]) and the single-process one;
//! - `mpi` (the `mpi` cargo feature): the MPI world, its timed collectives and the dead-rank watchdog;
//! - `nccl` (the `cuda` and `mpi` features together): a device-buffer all-reduce through NCCL, bootstrapped
//!   by MPI, under the MPI deadline: the CUDA step's partials and the resident loop's gradients (run on the
//!   CPU emulator's libnccl, never on a GPU);
//! - [`shard`]: which features a rank owns, and slicing/assembling parameters;
//! - [`select`]: TopK and BatchTopK selection across feature shards (each rank's best candidates gathered);
//! - [`checkpoint`]: sharded checkpoints (a shard per rank, a manifest), loadable into any number of ranks;
//! - [`trainer`]: the distributed training step (feature-sharded, data-parallel, grid) and loop;
//! - [`cli`]: what `clt train` runs when launched by `mpirun` or resuming a sharded checkpoint.
//!
//! ```no_run
//! use clt::dist::{comm::SelfComm, trainer::ShardedTrainer};
//! let run = clt::train::RunConfig::from_file("run.toml".as_ref())?;
//! let mut t = ShardedTrainer::new(run, SelfComm)?; // with MPI: clt::dist::mpi::World::init()?
//! t.train("runs/x".as_ref(), true)?;
//! # Ok::<(), clt::Error>(())
//! ```

pub mod checkpoint;
pub mod cli;
pub mod comm;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(all(feature = "cuda", feature = "mpi"))]
pub mod nccl;
pub mod select;
pub mod shard;
pub mod trainer;

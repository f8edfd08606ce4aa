//! Device-buffer all-reduce through NCCL (the `cuda` and `mpi` features together), bootstrapped by MPI as
//! llm.c does: rank 0 of an MPI group creates NCCL's unique id, MPI broadcasts it (under the usual
//! deadline), and every rank joins the NCCL communicator of the group on its device.
//!
//! ```no_run
//! # fn main() -> clt::Result<()> {
//! let world = clt::dist::mpi::World::init()?;
//! let comm = world.comm();
//! let nccl = clt::dist::nccl::NcclComm::new(&comm, 0)?; // device 0 of this node
//! let mut partials = nccl.stream().alloc_zeros::<f32>(1024).expect("alloc");
//! nccl.sum_f32(&mut partials)?; // queued on the stream; synchronise it before reading on the host
//! # Ok(()) }
//! ```
//!
//! What is subtle here:
//! - Nothing calls this yet: the distributed trainer's CUDA step (`--backend cuda-host`) brings each
//!   shard's partial reconstruction to the host and sums it over MPI; summing it on the device with this is
//!   the next step (docs/distributed.md).
//! - NCCL is loaded at run time (cudarc's dynamic loading). Without a CUDA driver, or without libnccl,
//!   [`NcclComm::new`] returns [`Error::BackendUnavailable`] naming what is missing, before any CUDA or NCCL
//!   call (a call into a library that is not there would panic inside cudarc).
//! - NCCL collectives are asynchronous on the stream: the MPI watchdog's deadline (`CLT_DIST_TIMEOUT_S`)
//!   does not cover them; a hung peer shows as a stream synchronisation that does not return.
//! - Never run on a GPU; CI runs it on the CPU emulator's libnccl.so (kernels/emu/), one rank and two.

use super::comm::Comm;
use super::mpi::MpiComm;
use crate::backend::cuda::context::{cuda_err, driver_present, no_driver};
use crate::{Error, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm as Nccl, Id, ReduceOp};
use std::ffi::c_char;
use std::sync::Arc;

/// Whether libnccl can be opened on this machine.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen libnccl.so and closes it again; no NCCL call is made.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn nccl_err(what: &'static str) -> impl FnOnce(cudarc::nccl::result::NcclError) -> Error {
    move |e| Error::Cuda {
        what: what.into(),
        reason: format!("{e:?}"),
    }
}

/// One rank's NCCL communicator over the ranks of an MPI group, on one device and its stream.
pub struct NcclComm {
    nccl: Nccl,
    stream: Arc<CudaStream>,
}

impl NcclComm {
    /// Joins the NCCL communicator of `group`'s ranks on device `ordinal` (a collective over `group`).
    pub fn new(group: &MpiComm, ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(no_driver());
        }
        if !nccl_present() {
            return Err(Error::BackendUnavailable {
                backend: "nccl".into(),
                reason: "libnccl.so was not found; install NCCL (e.g. the nvidia-nccl-cu13 wheel, with its \
                         lib directory on LD_LIBRARY_PATH) or keep the MPI collectives"
                    .into(),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("creating the CUDA context"))?;
        let stream = ctx.default_stream();
        let mut bytes = [0u8; 128];
        if group.rank() == 0 {
            let id = Id::new().map_err(nccl_err("ncclGetUniqueId"))?;
            for (b, c) in bytes.iter_mut().zip(id.internal()) {
                *b = *c as u8;
            }
        }
        group.broadcast_bytes("broadcast of NCCL's unique id", &mut bytes)?;
        let mut internal = [0 as c_char; 128];
        for (c, b) in internal.iter_mut().zip(bytes) {
            *c = b as c_char;
        }
        let nccl = Nccl::from_rank(
            stream.clone(),
            group.rank(),
            group.size(),
            Id::uninit(internal),
        )
        .map_err(nccl_err("ncclCommInitRank"))?;
        Ok(NcclComm { nccl, stream })
    }

    /// The stream the collectives are queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// This rank in the NCCL communicator (its rank in the MPI group).
    pub fn rank(&self) -> usize {
        self.nccl.rank()
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.nccl.world_size()
    }

    /// Sums `buf` element-wise over the ranks, in place, queued on [`NcclComm::stream`].
    pub fn sum_f32(&self, buf: &mut CudaSlice<f32>) -> Result<()> {
        self.nccl
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map_err(nccl_err("ncclAllReduce"))?;
        Ok(())
    }
}

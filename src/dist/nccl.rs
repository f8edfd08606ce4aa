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
//! - The distributed trainer's CUDA step (`backend = "cuda_host"`, feature-sharded and grid) sums each
//!   shard's partial reconstruction with this ([`NcclComm::on_stream`] on its [`Gpu`]'s stream, through
//!   [`Comm::device_sum`]), so the partials never leave the device (docs/distributed.md).
//! - NCCL is loaded at run time (cudarc's dynamic loading). Without a CUDA driver, or without libnccl,
//!   [`NcclComm::new`] returns [`Error::BackendUnavailable`] naming what is missing, before any CUDA or NCCL
//!   call (a call into a library that is not there would panic inside cudarc).
//! - NCCL collectives are asynchronous on the stream, and a dead or hung peer makes them wait forever. The
//!   trainer's sum ([`DeviceSum::sum`]) therefore polls an event behind the all-reduce under the MPI
//!   deadline (`CLT_DIST_TIMEOUT_S`), and on a timeout or an NCCL error ends the job through the same
//!   liveness probe as a timed-out MPI collective, naming the ranks that no longer answer. The raw
//!   [`NcclComm::sum_f32`] only queues (its caller synchronises).
//! - Never run on a GPU; CI runs it on the CPU emulator's libnccl.so (kernels/emu/), one rank and two, and
//!   the trainer on it with two ranks (tests/dist_cuda.rs).

use super::comm::{Comm, DeviceSum};
use super::mpi::{MpiComm, poll_until};
use crate::backend::cuda::context::{Gpu, cuda_err, driver_present, no_driver};
use crate::backend::cuda::memory::DBuf;
use crate::{Error, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm as Nccl, Id, ReduceOp};
use std::ffi::c_char;
use std::sync::Arc;
use std::time::Instant;

/// Whether libnccl can be opened on this machine.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen libnccl.so and closes it again; no NCCL call is made.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn nccl_err(what: &'static str) -> impl FnOnce(cudarc::nccl::result::NcclError) -> Error {
    move |e| Error::Cuda {
        what: what.into(),
        reason: format!("{:?}", e.0),
    }
}

/// One rank's NCCL communicator over the ranks of an MPI group, on one device and its stream.
pub struct NcclComm {
    nccl: Nccl,
    stream: Arc<CudaStream>,
    /// The stream whose work the sums follow and that follows them ([`DeviceSum`]): `stream` itself, or
    /// the compute stream when the collectives have a stream of their own (ordered by events).
    compute: Arc<CudaStream>,
    /// The MPI group it was made from: the deadline, and the liveness probe when a sum fails.
    group: MpiComm,
}

impl NcclComm {
    /// Joins the NCCL communicator of `group`'s ranks on device `ordinal`'s default stream (a collective
    /// over `group`).
    pub fn new(group: &MpiComm, ordinal: usize) -> Result<Self> {
        check_present()?;
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("creating the CUDA context"))?;
        Self::on_stream(group, ctx.default_stream())
    }

    /// Joins the NCCL communicator of `group`'s ranks with its collectives queued on `stream` (a collective
    /// over `group`), so they are ordered with the kernels on that stream.
    pub fn on_stream(group: &MpiComm, stream: Arc<CudaStream>) -> Result<Self> {
        check_present()?;
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
        Ok(NcclComm {
            nccl,
            compute: stream.clone(),
            stream,
            group: group.clone(),
        })
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

    /// Whether the collectives run on a stream other than the compute stream.
    fn own_stream(&self) -> bool {
        !Arc::ptr_eq(&self.stream, &self.compute)
    }

    /// Makes the collectives' stream wait for the work queued so far on the compute stream.
    fn follow_compute(&self) -> Result<()> {
        if self.own_stream() {
            let ready = self
                .compute
                .record_event(None)
                .map_err(cuda_err("recording an event before the NCCL all-reduce"))?;
            self.stream
                .wait(&ready)
                .map_err(cuda_err("ordering the NCCL all-reduce after the decode"))?;
        }
        Ok(())
    }

    /// Queues the in-place all-reduce of `view`; an NCCL error ends the job through the liveness probe.
    fn queue(&self, what: &str, view: &mut cudarc::driver::CudaViewMut<'_, f32>) {
        if let Err(e) = self.nccl.all_reduce_in_place(view, &ReduceOp::Sum) {
            self.group
                .stop_job(what, &format!("failed in NCCL ({:?})", e.0));
        }
    }

    /// Polls an event recorded after the queued all-reduces until they complete or the group's deadline
    /// passes (then ends the job through the liveness probe); the compute stream then waits for them.
    fn wait_done(&self, what: &str) -> Result<()> {
        let done = self
            .stream
            .record_event(None)
            .map_err(cuda_err("recording an event after the NCCL all-reduce"))?;
        let mut failed = None;
        let finished = poll_until(Instant::now() + self.group.timeout(), || {
            done.try_is_complete().unwrap_or_else(|e| {
                failed = Some(e);
                true
            })
        });
        if let Some(e) = failed {
            return Err(cuda_err("waiting for the NCCL all-reduce")(e));
        }
        if !finished {
            let why = format!(
                "did not complete within {:.0} s (NCCL)",
                self.group.timeout().as_secs_f64()
            );
            self.group.stop_job(what, &why);
        }
        if self.own_stream() {
            self.compute.wait(&done).map_err(cuda_err(
                "ordering the compute stream after the NCCL all-reduce",
            ))?;
        }
        Ok(())
    }
}

impl DeviceSum for NcclComm {
    /// Queues the all-reduce, then polls an event recorded after it until it completes or the group's
    /// deadline (`CLT_DIST_TIMEOUT_S`) passes. NCCL's kernels wait for a dead or hung peer forever; here an
    /// error from NCCL or a missed deadline ends the job through the MPI liveness probe, which names the
    /// ranks that no longer answer ([`MpiComm::stop_job`]).
    fn sum(&self, what: &str, buf: &mut DBuf<f32>) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.follow_compute()?;
        self.queue(what, &mut buf.view_mut());
        self.wait_done(what)
    }

    /// With a stream of its own, block `i`'s all-reduce is queued there behind an event on the compute
    /// stream right after `fill(i)`, so it runs while the compute stream goes on to block `i + 1`; one wait
    /// (under the deadline) covers them all. On the compute stream itself the blocks are still summed one
    /// by one as they are filled (in stream order, so without overlap).
    fn sum_parts(
        &self,
        what: &str,
        buf: &mut DBuf<f32>,
        parts: usize,
        fill: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        let len = buf.len();
        for i in 0..parts {
            fill(i)?;
            let range = len * i / parts..len * (i + 1) / parts;
            if range.is_empty() {
                continue;
            }
            self.follow_compute()?;
            self.queue(what, &mut buf.range_mut(range));
        }
        self.wait_done(what)
    }
}

/// The driver, then libnccl: an error naming what is missing before any call into either.
fn check_present() -> Result<()> {
    if !driver_present() {
        return Err(no_driver());
    }
    if !nccl_present() {
        return Err(Error::BackendUnavailable {
            backend: "nccl".into(),
            reason: "libnccl.so was not found; install NCCL (e.g. the nvidia-nccl-cu13 wheel, with its lib \
                     directory on LD_LIBRARY_PATH) or keep the MPI collectives (collectives = \"mpi\")"
                .into(),
        });
    }
    Ok(())
}

/// NCCL for a group of the trainer's MPI ranks ([`Comm::device_sum`]): on `gpu`'s stream, or with
/// `own_stream` on a second stream of its device, ordered against `gpu`'s by events.
pub(crate) fn on_gpu(group: &MpiComm, gpu: &Gpu, own_stream: bool) -> Result<Box<dyn DeviceSum>> {
    let compute = gpu.stream().clone();
    let stream = if own_stream {
        gpu.new_stream()?
    } else {
        compute.clone()
    };
    let mut nccl = NcclComm::on_stream(group, stream)?;
    nccl.compute = compute;
    Ok(Box::new(nccl))
}

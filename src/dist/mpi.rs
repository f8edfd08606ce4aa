//! The MPI world (the `mpi` feature): one RAII handle that initialises MPI and finalises it on drop, and
//! [`MpiComm`], the trainer's collectives over `MPI_COMM_WORLD` (or a group split from it, one per axis of
//! a 2-D grid) with a deadline.
//!
//! What is subtle here:
//! - No collective blocks without a bound. Each one is started non-blocking (`MPI_Iallreduce`, ...) and
//!   polled until it completes or its deadline passes (`CLT_DIST_TIMEOUT_S`, default 300 s). A rank that
//!   times out then asks every other rank, point to point with a tag of its own, to answer within the same
//!   bound; the ranks that do not answer are named in its message, and it aborts the whole job
//!   (`MPI_Abort`). A dead or hung rank therefore stops the job within twice the timeout, with a message
//!   naming it. (A rank that *exits* is usually noticed sooner by the launcher itself: Open MPI's `mpirun`
//!   ends the job and names the rank as soon as one process exits without finalising.) The probe goes to
//!   every rank of the *world*, also from a split group's collective, and names world ranks: in a grid, a
//!   hung rank stalls its groups' collectives, which stall the other groups a step later at most, so every
//!   live rank times out and answers (the bound assumes the ranks drift apart by less than the timeout).
//! - [`Comm::sum_f32_parts`] keeps one all-reduce per part in flight while the caller fills the next part;
//!   Open MPI progresses non-blocking collectives only inside MPI calls, so each part's start also tests the
//!   ones before it. The wait for the last ones has the same deadline as every other collective.
//! - Only the main thread calls MPI (rayon's workers never do), so `MPI_THREAD_FUNNELED` suffices.
//! - rsmpi's wrappers are safe; this module has no `unsafe` of its own.

use super::comm::Comm;
use crate::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::request::{Request, Scope};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The tag of the liveness probe a rank sends after a collective timed out.
const PROBE_TAG: i32 = 0x7c17;
/// The exit code of a job aborted because a rank timed out.
pub const TIMEOUT_EXIT: i32 = 75;
/// The default deadline of one collective.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The MPI world of this job; MPI is finalised when it is dropped.
pub struct World {
    universe: Universe,
    timeout: Duration,
}

impl World {
    /// Initialises MPI (once per process). The collective deadline comes from `CLT_DIST_TIMEOUT_S`.
    pub fn init() -> Result<Self> {
        let (universe, _) =
            mpi::initialize_with_threading(mpi::Threading::Funneled).ok_or_else(|| {
                Error::Distributed {
                    rank: 0,
                    reason: "MPI is already initialised in this process".into(),
                }
            })?;
        let timeout = match std::env::var("CLT_DIST_TIMEOUT_S") {
            Ok(v) => {
                let s: f64 = v.parse().map_err(|_| {
                    Error::config(
                        "CLT_DIST_TIMEOUT_S",
                        format!("`{v}` is not a number of seconds"),
                    )
                })?;
                if !(s > 0.0 && s.is_finite()) {
                    return Err(Error::config("CLT_DIST_TIMEOUT_S", "must be positive"));
                }
                Duration::from_secs_f64(s)
            }
            Err(_) => DEFAULT_TIMEOUT,
        };
        Ok(World { universe, timeout })
    }

    /// The collectives over the whole world.
    pub fn comm(&self) -> MpiComm {
        let world = Rc::new(self.universe.world());
        MpiComm {
            group: world.clone(),
            world,
            timeout: self.timeout,
        }
    }
}

/// Collectives over a group of ranks (`MPI_COMM_WORLD` or a group split from it), each with a deadline.
#[derive(Clone)]
pub struct MpiComm {
    /// The ranks this handle's collectives span.
    group: Rc<SimpleCommunicator>,
    /// The whole job: liveness probes and aborts.
    world: Rc<SimpleCommunicator>,
    timeout: Duration,
}

type PartRequest<'a, 's> = mpi::request::Request<'a, [f32], &'s mpi::request::LocalScope<'a>>;

/// Tests every pending request once (which also lets MPI progress them); true when none is left.
fn test_all(pending: &mut [Option<PartRequest<'_, '_>>]) -> bool {
    for slot in pending.iter_mut() {
        if let Some(r) = slot.take()
            && let Err(r) = r.test()
        {
            *slot = Some(r);
        }
    }
    pending.iter().all(|s| s.is_none())
}

/// Polls `test` until it reports completion or `deadline` passes; false on timeout. Yields between polls,
/// then sleeps 50 µs once the wait is long (MPI's requests here, NCCL's completion event in `dist::nccl`).
pub(crate) fn poll_until(deadline: Instant, mut test: impl FnMut() -> bool) -> bool {
    let mut spins = 0u32;
    loop {
        if test() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        spins += 1;
        if spins < 1000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl MpiComm {
    /// Waits for the non-blocking collective `what` until its deadline; a timeout ends the job naming the ranks
    /// that no longer answer.
    fn wait<'a, D: ?Sized, S: Scope<'a>>(&self, what: &str, req: Request<'a, D, S>) {
        let deadline = Instant::now() + self.timeout;
        let mut req = Some(req);
        let done = poll_until(deadline, || match req.take().map(|r| r.test()) {
            Some(Ok(_)) | None => true,
            Some(Err(r)) => {
                req = Some(r);
                false
            }
        });
        if !done {
            self.timed_out(what);
        }
    }

    /// The collective `what` did not finish in time: find out which ranks still answer, name the others, and
    /// end the job.
    fn timed_out(&self, what: &str) -> ! {
        let why = format!(
            "did not complete within {:.0} s",
            self.timeout.as_secs_f64()
        );
        self.stop_job(what, &why)
    }

    /// The deadline of this group's collectives (`CLT_DIST_TIMEOUT_S`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A collective outside MPI (NCCL's all-reduce, `what`) failed or missed its deadline (`why`): find out
    /// which ranks still answer, name the others, and end the job, as a timed-out MPI collective does.
    pub fn stop_job(&self, what: &str, why: &str) -> ! {
        let me = self.world.rank() as usize;
        let n = self.world.size() as usize;
        let mine = me as u64;
        let mut replies = vec![u64::MAX; n];
        mpi::request::scope(|scope| {
            let sends: Vec<_> = (0..n)
                .filter(|r| *r != me)
                .map(|r| {
                    self.world
                        .process_at_rank(r as i32)
                        .immediate_send_with_tag(scope, &mine, PROBE_TAG)
                })
                .collect();
            let mut recvs: Vec<(usize, Option<_>)> = replies
                .iter_mut()
                .enumerate()
                .filter(|(r, _)| *r != me)
                .map(|(r, slot)| {
                    let req = self
                        .world
                        .process_at_rank(r as i32)
                        .immediate_receive_into_with_tag(scope, slot, PROBE_TAG);
                    (r, Some(req))
                })
                .collect();
            let deadline = Instant::now() + self.timeout;
            poll_until(deadline, || {
                for (_, slot) in recvs.iter_mut() {
                    if let Some(req) = slot.take() {
                        match req.test() {
                            Ok(_) => {}
                            Err(req) => *slot = Some(req),
                        }
                    }
                }
                recvs.iter().all(|(_, s)| s.is_none())
            });
            let missing: Vec<usize> = recvs
                .iter()
                .filter(|(_, s)| s.is_some())
                .map(|(r, _)| *r)
                .collect();
            let msg = if missing.is_empty() {
                "every rank answered the liveness probe: the ranks are in different collectives"
                    .into()
            } else {
                format!(
                    "no answer from rank(s) {missing:?} within {:.0} s: dead or hung",
                    self.timeout.as_secs_f64()
                )
            };
            eprintln!("error: rank {me}: {what} {why}; {msg}; aborting the job");
            // Requests still pending cannot be completed; the job ends here.
            std::mem::forget(sends);
            std::mem::forget(recvs);
            self.world.abort(TIMEOUT_EXIT)
        });
        self.world.abort(TIMEOUT_EXIT)
    }
}

impl MpiComm {
    /// Rank 0's `buf` on every rank of the group (NCCL's unique id), with the usual deadline.
    pub fn broadcast_bytes(&self, what: &str, buf: &mut [u8]) -> Result<()> {
        let root = self.group.process_at_rank(0);
        mpi::request::scope(|scope| self.wait(what, root.immediate_broadcast_into(scope, buf)));
        Ok(())
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.group.rank() as usize
    }

    fn size(&self) -> usize {
        self.group.size() as usize
    }

    fn sum_f32_parts(
        &self,
        what: &str,
        parts: &mut [Vec<f32>],
        fill: &mut dyn FnMut(usize, &mut [f32]),
    ) -> Result<()> {
        let mut sends: Vec<Vec<f32>> = parts.iter().map(|p| vec![0.0; p.len()]).collect();
        mpi::request::scope(|scope| {
            let mut pending: Vec<Option<PartRequest<'_, '_>>> = Vec::with_capacity(parts.len());
            for (i, (send, recv)) in sends.iter_mut().zip(parts.iter_mut()).enumerate() {
                fill(i, send);
                let send: &[f32] = send;
                pending.push(Some(self.group.immediate_all_reduce_into(
                    scope,
                    send,
                    &mut recv[..],
                    SystemOperation::sum(),
                )));
                test_all(&mut pending);
            }
            let deadline = Instant::now() + self.timeout;
            if !poll_until(deadline, || test_all(&mut pending)) {
                self.timed_out(what);
            }
        });
        Ok(())
    }

    fn sum_f32(&self, what: &str, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        mpi::request::scope(|scope| {
            let req =
                self.group
                    .immediate_all_reduce_into(scope, &send[..], buf, SystemOperation::sum());
            self.wait(what, req)
        });
        Ok(())
    }

    fn sum_f64(&self, what: &str, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        mpi::request::scope(|scope| {
            let req =
                self.group
                    .immediate_all_reduce_into(scope, &send[..], buf, SystemOperation::sum());
            self.wait(what, req)
        });
        Ok(())
    }

    fn gather_u64(&self, what: &str, value: u64) -> Result<Vec<u64>> {
        let mut out = vec![0u64; self.size()];
        mpi::request::scope(|scope| {
            let req = self
                .group
                .immediate_all_gather_into(scope, &value, &mut out[..]);
            self.wait(what, req)
        });
        Ok(out)
    }

    fn gather_u32(&self, what: &str, buf: &[u32]) -> Result<Vec<u32>> {
        let mut out = vec![0u32; buf.len() * self.size()];
        mpi::request::scope(|scope| {
            let req = self
                .group
                .immediate_all_gather_into(scope, buf, &mut out[..]);
            self.wait(what, req)
        });
        Ok(out)
    }

    fn barrier(&self, what: &str) -> Result<()> {
        self.wait(what, self.group.immediate_barrier());
        Ok(())
    }

    fn split(&self, color: usize, key: usize) -> Result<Self> {
        let int = |v: usize, name: &str| {
            i32::try_from(v).map_err(|_| Error::Distributed {
                rank: self.world.rank() as usize,
                reason: format!("communicator split: {name} {v} exceeds an MPI int"),
            })
        };
        let (color, key) = (int(color, "color")?, int(key, "key")?);
        // MPI_Comm_split blocks until every rank of the group calls it: the timed barrier first bounds that
        // wait like every other collective's.
        self.barrier("communicator split")?;
        let group = self
            .group
            .split_by_color_with_key(Color::with_value(color), key)
            .ok_or_else(|| Error::Distributed {
                rank: self.world.rank() as usize,
                reason: "MPI_Comm_split returned no communicator".into(),
            })?;
        Ok(MpiComm {
            group: Rc::new(group),
            world: self.world.clone(),
            timeout: self.timeout,
        })
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    #[cfg(feature = "cuda")]
    fn device_sum(
        &self,
        gpu: &crate::backend::cuda::context::Gpu,
        required: bool,
        own_stream: bool,
    ) -> Result<Option<Box<dyn super::comm::DeviceSum>>> {
        let here = super::nccl::nccl_present() as u64;
        let present = self.gather_u64("check that every rank can load NCCL", here)?;
        let missing: Vec<usize> = (0..present.len()).filter(|r| present[*r] == 0).collect();
        // NCCL refuses two ranks of one communicator on one device: compare the devices' UUIDs (a rank
        // that cannot read its UUID counts as on a device of its own, and still joins the collective).
        let device = gpu.uuid().map_or(u64::MAX - self.rank() as u64, |u| {
            xxhash_rust::xxh3::xxh3_64(&u)
        });
        let devices = self.gather_u64("check that the ranks are on distinct devices", device)?;
        let shared: Vec<usize> = (0..devices.len())
            .filter(|r| devices.iter().filter(|d| **d == devices[*r]).count() > 1)
            .collect();
        let why = if !missing.is_empty() {
            format!("rank(s) {missing:?} of the group cannot load libnccl.so (install NCCL there")
        } else if !shared.is_empty() {
            format!(
                "rank(s) {shared:?} of the group share a GPU, and NCCL needs one GPU per rank (give \
                 each rank its own with CLT_CUDA_DEVICE or fewer ranks per node"
            )
        } else {
            return super::nccl::on_gpu(self, gpu, own_stream).map(Some);
        };
        if !required {
            return Ok(None);
        }
        let named: Vec<usize> = missing.iter().chain(&shared).copied().collect();
        Err(Error::Distributed {
            rank: if named.contains(&self.rank()) {
                self.rank()
            } else {
                named[0]
            },
            reason: format!(
                "collectives = \"nccl\", but {why}, or set collectives = \"mpi\" or \"auto\")"
            ),
        })
    }
}

//! The collectives the sharded trainer needs, as a trait: MPI implements it (`dist::mpi`, the `mpi`
//! feature), and [`SelfComm`] is the world of one process, so the sharded trainer runs and is tested without
//! MPI. Every collective names what it is for (`what`), so a timeout can say where a run stopped. With the
//! `cuda` feature a group may also sum device buffers (`DeviceSum`: NCCL, made by `Comm::device_sum`).

use crate::Result;
#[cfg(feature = "cuda")]
use crate::backend::cuda::{context::Gpu, memory::DBuf};

/// An element-wise sum over a group's ranks of a buffer on the device, in place, on the stream of the
/// [`Gpu`] it was made for (NCCL: `dist::nccl`).
#[cfg(feature = "cuda")]
pub trait DeviceSum {
    /// Sums `buf` over the ranks (`what` names it in errors) and waits for the result under the group's
    /// deadline; a peer that does not join ends the job naming it, as a timed-out MPI collective does.
    fn sum(&self, what: &str, buf: &mut DBuf<f32>) -> Result<()>;

    /// Sums `buf` over the ranks as `parts` contiguous blocks (block `i`: elements `len·i/parts ..
    /// len·(i+1)/parts`), block `i` after `fill(i)` has queued its writes on the [`Gpu`]'s stream; returns with the whole sum done
    /// and ordered before later work on that stream. An implementation with a stream of its own for the
    /// collectives (NCCL made with `own_stream`) sums block `i` there while block `i + 1` is being filled
    /// and computed; this default fills every block, then sums the buffer once ([`DeviceSum::sum`]).
    fn sum_parts(
        &self,
        what: &str,
        buf: &mut DBuf<f32>,
        parts: usize,
        fill: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        for i in 0..parts {
            fill(i)?;
        }
        self.sum(what, buf)
    }
}

/// A group of ranks that train one model together.
pub trait Comm: Sized {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum over all ranks, in place; every rank gets the same result.
    fn sum_f32(&self, what: &str, buf: &mut [f32]) -> Result<()>;
    /// Sums each of `parts` element-wise over all ranks, in place, part `i` first written by `fill(i, part)`.
    /// An implementation may start summing part `i` as soon as it is filled, so that it proceeds while part
    /// `i + 1` is being filled (MPI does, non-blocking); the results are those of [`Comm::sum_f32`] on each
    /// part. This default fills and sums one part after the other.
    fn sum_f32_parts(
        &self,
        what: &str,
        parts: &mut [Vec<f32>],
        fill: &mut dyn FnMut(usize, &mut [f32]),
    ) -> Result<()> {
        for (i, p) in parts.iter_mut().enumerate() {
            fill(i, p);
            self.sum_f32(what, p)?;
        }
        Ok(())
    }
    /// Element-wise sum over all ranks, in place (statistics and counts; exact for integers below 2^53).
    fn sum_f64(&self, what: &str, buf: &mut [f64]) -> Result<()>;
    /// Every rank's `value`, indexed by rank.
    fn gather_u64(&self, what: &str, value: u64) -> Result<Vec<u64>>;
    /// Every rank's `buf` (the same length on every rank), concatenated in rank order: the candidates of a
    /// selection across feature shards (`dist::select`).
    fn gather_u32(&self, what: &str, buf: &[u32]) -> Result<Vec<u32>>;
    /// Waits until every rank has arrived.
    fn barrier(&self, what: &str) -> Result<()>;
    /// Splits the group (a collective): the ranks that pass the same `color` form a new group, ranked by
    /// `key` (ties by rank here). A 2-D grid holds one such group per axis.
    fn split(&self, color: usize, key: usize) -> Result<Self>;
    /// Ends every rank of the job at once (after an error on this one, so the others do not wait for it).
    fn abort(&self, code: i32) -> !;
    /// A device-buffer sum over this group on `gpu`'s stream (a collective: every rank of the group calls
    /// it). `None` where the group has none: the default (the world of one process, which needs none), or
    /// where some rank of the group cannot load NCCL or shares its GPU with another (NCCL refuses that);
    /// with `required`, that is an error naming the ranks.
    /// Every rank of the group gets the same answer. NCCL's unique id travels through this group. With
    /// `own_stream`, the sums run on a stream of their own, ordered against `gpu`'s by events, so that
    /// [`DeviceSum::sum_parts`] overlaps them with the work that fills the next part.
    #[cfg(feature = "cuda")]
    fn device_sum(
        &self,
        _gpu: &Gpu,
        _required: bool,
        _own_stream: bool,
    ) -> Result<Option<Box<dyn DeviceSum>>> {
        Ok(None)
    }
}

/// The world of one process: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SelfComm;

impl Comm for SelfComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _what: &str, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _what: &str, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn gather_u64(&self, _what: &str, value: u64) -> Result<Vec<u64>> {
        Ok(vec![value])
    }
    fn gather_u32(&self, _what: &str, buf: &[u32]) -> Result<Vec<u32>> {
        Ok(buf.to_vec())
    }
    fn barrier(&self, _what: &str) -> Result<()> {
        Ok(())
    }
    fn split(&self, _color: usize, _key: usize) -> Result<Self> {
        Ok(SelfComm)
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

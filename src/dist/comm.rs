//! The collectives the sharded trainer needs, as a trait: MPI implements it (`dist::mpi`, the `mpi`
//! feature), and [`SelfComm`] is the world of one process, so the sharded trainer runs and is tested without
//! MPI. Every collective names what it is for (`what`), so a timeout can say where a run stopped.

use crate::Result;

/// A group of ranks that train one model together.
pub trait Comm {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum over all ranks, in place; every rank gets the same result.
    fn sum_f32(&self, what: &str, buf: &mut [f32]) -> Result<()>;
    /// Element-wise sum over all ranks, in place (statistics and counts; exact for integers below 2^53).
    fn sum_f64(&self, what: &str, buf: &mut [f64]) -> Result<()>;
    /// Every rank's `value`, indexed by rank.
    fn gather_u64(&self, what: &str, value: u64) -> Result<Vec<u64>>;
    /// Waits until every rank has arrived.
    fn barrier(&self, what: &str) -> Result<()>;
    /// Ends every rank of the job at once (after an error on this one, so the others do not wait for it).
    fn abort(&self, code: i32) -> !;
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
    fn barrier(&self, _what: &str) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

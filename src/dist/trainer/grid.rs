//! How the ranks of a run are arranged (feature shards × replicas), which features each holds, and the
//! checks that the model can be split that way.

use crate::dist::comm::Comm;
use crate::dist::shard::{check_shardable, feature_range};
use crate::train::{Parallel, RunConfig};
use crate::{Error, Result};
use std::ops::Range;

/// How the ranks of a run are arranged: `shards` ranks share each replica's features and `replicas`
/// replicas split each batch (feature-sharded: one replica; data-parallel: one shard). World rank `r` holds
/// feature shard `r mod shards` of replica `r / shards`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub shards: usize,
    pub replicas: usize,
}

impl Grid {
    /// The arrangement of `world` ranks that `run` asks for (one process is one shard of one replica).
    pub fn of(run: &RunConfig, world: usize) -> Grid {
        let world = world.max(1);
        match run.train.parallel {
            Parallel::Features => Grid {
                shards: world,
                replicas: 1,
            },
            Parallel::Data => Grid {
                shards: 1,
                replicas: world,
            },
            Parallel::Grid => {
                let k = run.train.feature_shards.unwrap_or(1).clamp(1, world);
                Grid {
                    shards: k,
                    replicas: world / k,
                }
            }
        }
    }

    /// The feature shard world rank `rank` holds.
    pub fn shard(&self, rank: usize) -> usize {
        rank % self.shards
    }

    /// The replica world rank `rank` belongs to.
    pub fn replica(&self, rank: usize) -> usize {
        rank / self.shards
    }
}

/// The features rank `rank` of `world` holds: its shard, or all of them in data-parallel mode.
pub fn rank_range(run: &RunConfig, rank: usize, world: usize) -> Range<usize> {
    let g = Grid::of(run, world);
    feature_range(run.model.n_features, g.shard(rank), g.shards)
}

/// Checks that the model can be split over `world` ranks the way the configuration asks.
pub(super) fn check_split(run: &RunConfig, world: usize) -> Result<()> {
    if let (Parallel::Grid, Some(k)) = (run.train.parallel, run.train.feature_shards)
        && world > 1
        && !world.is_multiple_of(k)
    {
        return Err(Error::config(
            "train.feature_shards",
            format!("{k} feature shards do not divide the {world} ranks"),
        ));
    }
    let g = Grid::of(run, world);
    check_shardable(&run.model, g.shards, run.train.backend)?;
    if g.replicas > 1 {
        if let crate::clt::Activation::BatchTopK { .. } = run.model.activation
            && run.train.backend != crate::backend::BackendKind::Cpu
        {
            return Err(Error::Unsupported(format!(
                "data-parallel BatchTopK on the {:?} backend: its selection spans the whole batch, \
                 which only the CPU step gathers across replicas (backend = \"cpu\")",
                run.train.backend
            )));
        }
        if run.train.batch_size < g.replicas {
            return Err(Error::config(
                "train.batch_size",
                format!(
                    "{} tokens cannot be split over {} data-parallel replicas",
                    run.train.batch_size, g.replicas
                ),
            ));
        }
    }
    Ok(())
}

/// The two axes of the grid as groups of `comm`: the ranks of this rank's replica (ranked by shard), and
/// the ranks holding this rank's shard (ranked by replica).
pub(super) fn grid_axes<C: Comm>(comm: &C, grid: Grid) -> Result<(C, C)> {
    let (shard, replica) = (grid.shard(comm.rank()), grid.replica(comm.rank()));
    let feat = comm.split(replica, shard)?;
    let data = comm.split(shard, replica)?;
    Ok((feat, data))
}

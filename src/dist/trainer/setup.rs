//! What every rank checks and chooses before its first step: that all ranks were given the same
//! configuration, that the backend can run distributed, which device the rank's step runs on, and which
//! kernels the `auto` settings resolve to (timed on every rank, agreed across them).

use super::ShardedTrainer;
use crate::backend::tuning::{Tuning, every_choice};
use crate::backend::{Backend, BackendKind, KernelChoice, Objective};
use crate::dist::comm::Comm;
use crate::train::RunConfig;
use crate::train::trainer::wanted_kernels;
use crate::{Error, Result};

/// A 64-bit hash of a run configuration, compared across ranks at start-up.
pub fn config_hash(run: &RunConfig) -> u64 {
    let json = serde_json::to_vec(run).unwrap_or_default();
    xxhash_rust::xxh3::xxh3_64(&json)
}

/// Checks that every rank was given the same configuration; the error names the ranks that differ.
pub fn check_same_config<C: Comm>(comm: &C, run: &RunConfig) -> Result<()> {
    let hashes = comm.gather_u64("configuration check", config_hash(run))?;
    let differ: Vec<usize> = (0..hashes.len())
        .filter(|r| hashes[*r] != hashes[0])
        .collect();
    if let Some(&first) = differ.first() {
        let rank = if comm.rank() == 0 { first } else { comm.rank() };
        return Err(Error::Distributed {
            rank,
            reason: format!(
                "the run configuration of rank(s) {differ:?} differs from rank 0's (hashes {:016x} vs \
                 {:016x}): every rank must be started with the same configuration",
                hashes[first], hashes[0]
            ),
        });
    }
    Ok(())
}

/// The backends distributed training runs: the sparse CPU step; the CUDA step with host-side parameters
/// and Adam (`cuda_host`): data-parallel, each rank runs the single-process step on its slice;
/// feature-sharded and grid, each rank's device encodes and decodes its features, the partial
/// reconstructions are summed (NCCL on the device, or MPI through the host), and the device runs the
/// backward on the residual; and the resident loop (`cuda`: parameters, Adam's moments and the update on
/// the device) in every mode, its gradients summed over replicas on the device. With skip connections,
/// the shard that adds the decoder bias to its partial adds the skip term too. With `overlap`, the
/// device decodes its partials a target layer at a time and each layer's all-reduce (NCCL on a stream of
/// its own, or MPI from the host) runs while the next decodes.
pub(super) fn check_backend(run: &RunConfig) -> Result<()> {
    let t = &run.train;
    match t.backend {
        BackendKind::Cpu => Ok(()),
        BackendKind::CudaHost | BackendKind::Cuda => Ok(()),
        kind => Err(Error::Unsupported(format!(
            "distributed training runs the sparse CPU step or a CUDA step (cuda, cuda_host); backend \
             {kind:?} is not supported"
        ))),
    }
}

/// The backend this rank's step runs on. With a CUDA backend, the device is `CLT_CUDA_DEVICE` if set, else
/// the rank's index on its node (Open MPI's `OMPI_COMM_WORLD_LOCAL_RANK`, MPICH's `MPI_LOCALRANKID`,
/// Slurm's `SLURM_LOCALID`) modulo the node's device count, so the ranks of a node take one GPU each.
pub(super) fn step_backend(run: &RunConfig) -> Result<Backend> {
    let kind = run.train.backend;
    if !matches!(kind, BackendKind::CudaHost | BackendKind::Cuda) {
        return Backend::new(kind);
    }
    let env_index = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().and_then(|v| v.parse::<usize>().ok()))
    };
    let ordinal = match env_index(&["CLT_CUDA_DEVICE"]) {
        Some(d) => d,
        None => {
            let local = env_index(&[
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "MPI_LOCALRANKID",
                "SLURM_LOCALID",
            ])
            .unwrap_or(0);
            local % device_count()?.max(1)
        }
    };
    let backend = Backend::new_on(kind, ordinal)?;
    backend.set_sparse_kernels(run.train.sparse_kernels);
    backend.set_encoder_kernel(run.train.encoder_kernel)?;
    Ok(backend)
}

/// The kernels every rank takes after timing the `auto` candidates on its own step: per candidate, the
/// step times summed over the ranks (a candidate that a rank did not time, or found to disagree with its
/// reference, counts as infinitely slow); rank 0 picks the least (the first of equals) and the others take
/// its choice, so that rounding in the sums cannot split them. The reference (the first trial) is timed
/// on every rank, so there is always a choice.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn agree_on_kernels<C: Comm>(comm: &C, tuning: &Tuning) -> Result<KernelChoice> {
    let every = every_choice();
    let mut ms = vec![f64::INFINITY; every.len()];
    for t in &tuning.trials {
        if let (Some(v), None, Some(i)) = (
            t.ms,
            &t.disagrees,
            every.iter().position(|k| *k == t.kernels),
        ) {
            ms[i] = v;
        }
    }
    comm.sum_f64("auto kernels: the candidates' step times", &mut ms)?;
    let mut pick = [0.0];
    if comm.rank() == 0 {
        let mut best: Option<(usize, f64)> = None;
        for (i, &v) in ms.iter().enumerate() {
            if v.is_finite() && best.is_none_or(|(_, b)| v < b) {
                best = Some((i, v));
            }
        }
        let reference = tuning.trials.first().map(|t| t.kernels);
        let fallback = reference.and_then(|r| every.iter().position(|k| *k == r));
        pick[0] = best.map(|(i, _)| i).or(fallback).unwrap_or(0) as f64;
    }
    comm.sum_f64("auto kernels: rank 0's choice", &mut pick)?;
    every
        .get(pick[0] as usize)
        .copied()
        .ok_or_else(|| Error::Source(format!("auto kernels: rank 0 chose {}", pick[0])))
}

#[cfg(feature = "cuda")]
fn device_count() -> Result<usize> {
    crate::backend::cuda::context::device_count()
}

#[cfg(not(feature = "cuda"))]
fn device_count() -> Result<usize> {
    // Without the feature, Backend::new_on reports that CUDA is not built in.
    Ok(1)
}

impl<C: Comm> ShardedTrainer<C> {
    /// Resolves the run's `auto` kernels, once, before the first step's compute (a collective): every rank
    /// times the candidates on its own step ([`crate::backend::cuda::tune`]), and all take the candidate
    /// whose step times summed over the ranks are least, among those that agreed with the reference on
    /// every rank.
    #[cfg(feature = "cuda")]
    pub(super) fn resolve_kernels(
        &mut self,
        obj: &Objective,
        preact_mask: Option<&[Vec<bool>]>,
    ) -> Result<()> {
        use crate::train::trainer::{TuneOn, tune_kernels, tuning_note};
        if self.kernels.is_some() {
            return Ok(());
        }
        let wanted = wanted_kernels(&self.run);
        let on = TuneOn {
            resident: self.resident.as_mut(),
            backend: &self.backend,
            cfg: &self.local,
            params: &self.params,
            dec_norms: &self.dec_norms,
            batch: &self.batch,
        };
        let (Some(tuning), Backend::Cuda(gpu)) =
            (tune_kernels(wanted, on, obj, preact_mask)?, &self.backend)
        else {
            self.kernels = Some(wanted);
            return Ok(());
        };
        let chosen = agree_on_kernels(&self.comm, &tuning)?;
        crate::backend::cuda::tune::apply(gpu, chosen)?;
        self.kernels = Some(chosen);
        let line = format!(
            "  over {} rank(s) (rank 0's trials above): {chosen}, the least step time summed over the \
             ranks among the candidates every rank agreed on",
            self.comm.size()
        );
        self.tuning = Some(tuning_note(
            self.tuning.take(),
            &tuning,
            Some((chosen, line)),
        )?);
        Ok(())
    }

    /// Without the `cuda` feature no backend has kernels to choose.
    #[cfg(not(feature = "cuda"))]
    pub(super) fn resolve_kernels(
        &mut self,
        _obj: &Objective,
        _mask: Option<&[Vec<bool>]>,
    ) -> Result<()> {
        self.kernels.get_or_insert(wanted_kernels(&self.run));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::tuning::{Summary, Trial};
    use crate::backend::{ActBlocks, EncoderKernel, SparseKernels};
    use crate::dist::comm::SelfComm;

    /// Over one rank: the least time among the agreeing candidates, whatever the trials' order; the
    /// reference where nothing else agreed.
    #[test]
    fn ranks_agree_on_the_least_time_among_agreeing_candidates() {
        let summary = Summary {
            loss: 1.0,
            sq_err: vec![1.0],
            n_active: vec![1],
            grad_sq: vec![1.0],
        };
        let trial = |encoder, sparse, act_blocks, ms: f64, disagrees: bool| Trial {
            kernels: KernelChoice {
                encoder,
                sparse,
                act_blocks,
            },
            summary: summary.clone(),
            disagrees: disagrees.then(|| "loss".into()),
            ms: (!disagrees).then_some(ms),
        };
        use ActBlocks::{One, Three, Two};
        use EncoderKernel::{Mma, WgmmaNarrow, WgmmaTma};
        use SparseKernels::{Gather, Tiled};
        let auto = KernelChoice {
            encoder: EncoderKernel::Auto,
            sparse: SparseKernels::Auto,
            act_blocks: ActBlocks::Auto,
        };
        let mut t = Tuning {
            wanted: auto,
            chosen: auto,
            trials: vec![
                trial(Mma, Gather, One, 5.0, false),
                trial(WgmmaTma, Gather, One, 1.0, true),
                trial(WgmmaNarrow, Gather, One, 4.0, false),
                trial(WgmmaNarrow, Tiled, One, 3.0, false),
                trial(WgmmaNarrow, Tiled, Two, 3.5, false),
                trial(WgmmaNarrow, Tiled, Three, 2.5, false),
            ],
            device: "a device".into(),
        };
        let got = agree_on_kernels(&SelfComm, &t).unwrap();
        assert_eq!(got, t.trials[5].kernels);
        t.trials.truncate(2);
        assert_eq!(
            agree_on_kernels(&SelfComm, &t).unwrap(),
            t.trials[0].kernels
        );
    }
}

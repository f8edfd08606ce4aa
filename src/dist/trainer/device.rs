//! The CUDA steps' distributed parts (`cuda` feature): where the partial reconstructions and the resident
//! loop's gradients are summed (NCCL on the device, or MPI through the host), and the resident loop's
//! batches (staged a step ahead, as f32 or as the store's codes) and step in every parallel mode.

use super::grads::timed_sum;
use super::{ShardedTrainer, Timing};
use crate::backend::Backend;
use crate::backend::{Objective, StepStats};
use crate::data::Batch;
use crate::dist::comm::Comm;
use crate::train::trainer::fetch_batch;
use crate::train::{Parallel, RunConfig};
use crate::{Error, Result};
use std::time::Instant;

/// Whether a CUDA run sums device buffers over `group` (the partial reconstructions over `feat`, or the
/// resident loop's gradients over `data`) on the device through NCCL: when the step runs on a GPU, `used`
/// (the run has such a sum), the group has more than one rank, `collectives` allows it and (for `auto`)
/// every rank of the group can load libnccl. Otherwise `None`, and the sum goes through the host and MPI.
/// With `own_stream` (the partials' sum under `overlap`), NCCL runs on a second stream so that its
/// all-reduces overlap the decode. A collective over `group`: every rank reaches the same choice.
pub(super) fn device_sum_over<C: Comm>(
    run: &RunConfig,
    group: &C,
    backend: &Backend,
    used: bool,
    own_stream: bool,
) -> Result<Option<Box<dyn crate::dist::comm::DeviceSum>>> {
    use crate::train::Collectives;
    let Backend::Cuda(gpu) = backend else {
        return Ok(None);
    };
    let required = match run.train.collectives {
        Collectives::Mpi => return Ok(None),
        _ if !used || group.size() == 1 => return Ok(None),
        Collectives::Nccl => true,
        Collectives::Auto => false,
    };
    match group.device_sum(gpu, required, own_stream)? {
        None if required => Err(Error::Unsupported(
            "collectives = \"nccl\" needs an MPI launch built with the `mpi` and `cuda` features"
                .into(),
        )),
        sum => Ok(sum),
    }
}

/// How a CUDA step's partial reconstruction becomes the whole one: summed over `feat` on the device by
/// `nccl`, or nothing to sum with one shard; else downloaded and summed over MPI. With `overlap`, a target
/// layer at a time, each layer's sum running while the next decodes ([`PartialSum::DeviceParts`],
/// [`PartialSum::HostParts`]).
///
/// Timing: without `overlap` the decode has synchronised the stream, so the time in the sum, added to
/// `timing.reduce_s`, is the all-reduce's alone. With `overlap` through the host, the decode and copy of
/// each layer go to `timing.decode_s` and the rest of the collective's time to `reduce_s`, as on the CPU;
/// on the device the two are queued together, so `reduce_s` takes the whole span (decode included).
pub(super) fn partials_sum<'a, C: Comm>(
    feat: &'a C,
    timing: &'a mut Timing,
    nccl: Option<&'a dyn crate::dist::comm::DeviceSum>,
    overlap: bool,
) -> crate::backend::cuda::step::PartialSum<'a> {
    use crate::backend::cuda::{memory::DBuf, step::PartialSum};
    const WHAT: &str = "all-reduce of the partial reconstructions";
    match nccl {
        None if feat.size() > 1 && overlap => {
            PartialSum::HostParts(Box::new(move |parts, fill| {
                let mut decode_s = 0.0;
                let started = Instant::now();
                feat.sum_f32_parts(WHAT, parts, &mut |l, part| {
                    let t = Instant::now();
                    fill(l, part);
                    decode_s += t.elapsed().as_secs_f64();
                })?;
                timing.decode_s += decode_s;
                timing.reduce_s += started.elapsed().as_secs_f64() - decode_s;
                Ok(())
            }))
        }
        None if feat.size() > 1 => PartialSum::Host(Box::new(move |yhat: &mut [f32]| {
            timed_sum(feat, timing, WHAT, yhat)
        })),
        Some(nccl) if overlap => PartialSum::DeviceParts(Box::new(move |yhat, parts, decode| {
            let t = Instant::now();
            nccl.sum_parts(WHAT, yhat, parts, decode)?;
            timing.reduce_s += t.elapsed().as_secs_f64();
            Ok(())
        })),
        _ => PartialSum::Device(Box::new(move |yhat: &mut DBuf<f32>| {
            if let Some(nccl) = nccl {
                let t = Instant::now();
                nccl.sum(WHAT, yhat)?;
                timing.reduce_s += t.elapsed().as_secs_f64();
            }
            Ok(())
        })),
    }
}

/// Replica `replica`'s slice of `batch` out of `replicas` (all of it with one), rows of `row` elements.
fn replica_slice(
    batch: &Batch,
    (replica, replicas, row): (usize, usize, usize),
) -> std::borrow::Cow<'_, Batch> {
    if replicas == 1 {
        return std::borrow::Cow::Borrowed(batch);
    }
    let n = batch.n_tokens;
    let (lo, hi) = (n * replica / replicas, n * (replica + 1) / replicas);
    std::borrow::Cow::Owned(Batch {
        n_tokens: hi - lo,
        x: batch.x[lo * row..hi * row].to_vec(),
        y: batch.y[lo * row..hi * row].to_vec(),
    })
}

impl<C: Comm> ShardedTrainer<C> {
    /// The resident loop's batches: this step's (staged during the previous step, or read and staged now
    /// on the first step and after a resume) becomes `self.batch`; then, unless this is the run's last
    /// step, the next one is read and its replica slice staged, its copy to the device overlapping this
    /// step. Returns the seconds spent waiting for the source.
    pub(super) fn stage_batches(&mut self) -> Result<f64> {
        let mut wait_s = 0.0;
        let at = (
            self.data.rank(),
            self.data.size(),
            self.local.n_layers * self.local.d_model,
        );
        match self.next.take() {
            Some((batch, var, _)) => (self.batch, self.batch_var) = (batch, var),
            None => {
                let (batch, var, wait) = self.fetch_staged(at)?;
                (self.batch, self.batch_var) = (batch, var);
                wait_s += wait;
            }
        }
        if self.step + 1 < self.run.train.steps {
            let position = self.source.position();
            let (next, var, wait) = self.fetch_staged(at)?;
            self.next = Some((next, var, position));
            wait_s += wait;
        }
        Ok(wait_s)
    }

    /// Reads the next batch and stages this replica's slice of it on the device: as the store's int8 /
    /// int4 codes, decoded and normalised there (as the single-process trainer does, `train.device_dequant`),
    /// when the source serves them, else normalised f32. Returns the batch as the host keeps it (f32, or,
    /// when staged as codes, only its size, plus the f32 targets where the partials are summed through
    /// the host), the whole batch's target variance when staged as codes, and the seconds spent waiting
    /// for the source.
    fn fetch_staged(
        &mut self,
        at: (usize, usize, usize),
    ) -> Result<(Batch, Option<Vec<f64>>, f64)> {
        let no_device = || Error::Unsupported("a resident step without a device".into());
        let mut coded = crate::data::CodedBatch::default();
        let fetched =
            crate::train::trainer::fetch_coded(self.source.as_mut(), &mut coded, &self.run)?;
        let Some(wait) = fetched else {
            let mut batch = Batch::default();
            let wait = fetch_batch(self.source.as_mut(), &mut batch, &self.norms, &self.run)?;
            let resident = self.resident.as_mut().ok_or_else(no_device)?;
            resident.stage(&replica_slice(&batch, at))?;
            return Ok((batch, None, wait));
        };
        let var = coded.target_variance(&self.norms.target);
        let (replica, replicas, _) = at;
        let n = coded.n_tokens;
        let resident = self.resident.as_mut().ok_or_else(no_device)?;
        if replicas == 1 {
            resident.stage_coded(&coded, &self.norms)?;
        } else {
            let (lo, hi) = (n * replica / replicas, n * (replica + 1) / replicas);
            resident.stage_coded(&coded.slice(lo, hi), &self.norms)?;
        }
        let host_sum = self.run.train.parallel != Parallel::Data && self.device_sum.is_none();
        let mut batch = Batch {
            n_tokens: n,
            x: Vec::new(),
            y: Vec::new(),
        };
        if host_sum {
            coded.decode_into(&mut batch);
            self.norms
                .apply(self.local.d_model, &mut batch.x, &mut batch.y);
        }
        Ok((batch, Some(var), wait))
    }

    /// The resident loop's loss and gradient in every mode: this replica's slice of the batch staged to
    /// the device; the shard's step (partials summed over `feat`, on the device with NCCL or through the
    /// host) or, data-parallel, the whole model's; with replicas, the gradients weighted by the slice's
    /// share of the tokens and summed over `data` ([`ShardedTrainer::sum_device_grads`]); the squared
    /// gradient norm's parts from the device; the statistics as the host-side modes reduce them. The
    /// gradients wait in `pending` for [`crate::backend::cuda::resident::Resident::apply`].
    pub(super) fn resident_grads(
        &mut self,
        obj: &Objective,
        dead_mask: Option<&[Vec<bool>]>,
    ) -> Result<(StepStats, f64)> {
        let mut resident = self.resident.take().expect("the resident loop's state");
        let out = self.resident_grads_on(&mut resident, obj, dead_mask);
        self.resident = Some(resident);
        out
    }

    fn resident_grads_on(
        &mut self,
        resident: &mut crate::backend::cuda::resident::Resident,
        obj: &Objective,
        dead_mask: Option<&[Vec<bool>]>,
    ) -> Result<(StepStats, f64)> {
        use crate::backend::cuda::step::ShardSum;
        let (l_n, d) = (self.local.n_layers, self.local.d_model);
        let row = l_n * d;
        let (replica, replicas) = (self.data.rank(), self.data.size());
        let n = self.batch.n_tokens;
        let (lo, hi) = (n * replica / replicas, n * (replica + 1) / replicas);
        let w = (hi - lo) as f64 / n.max(1) as f64;
        // This replica's slice of `self.batch` is the oldest batch staged ([`ShardedTrainer::stage_batches`]).
        let sharded = self.run.train.parallel != Parallel::Data;
        let (mut stats, g) = if sharded {
            let sum = partials_sum(
                &self.feat,
                &mut self.timing,
                self.device_sum.as_deref(),
                self.run.train.overlap,
            );
            let shard = ShardSum {
                // Read only where the partials are summed through the host, which keeps f32 targets.
                y: self.batch.y.get(lo * row..hi * row).unwrap_or(&[]),
                with_bias: self.feat.rank() == 0,
                sum,
            };
            resident.loss_and_grad(obj, dead_mask, Some(shard), self.step)?
        } else {
            resident.loss_and_grad(obj, dead_mask, None, self.step)?
        };
        if replicas > 1 {
            let t = Instant::now();
            self.sum_device_grads(resident.gpu(), &g, w)?;
            let took = t.elapsed().as_secs_f64();
            if sharded {
                self.timing.grads_s += took;
            } else {
                self.timing.reduce_s += took;
            }
            for (l, lg) in g.layers.iter().enumerate() {
                stats.active_count[l] = resident.gpu().download(&lg.active_count)?;
            }
        }
        let (feature_sq, shared_sq) = resident.grad_sq_parts(&g)?;
        self.pending = Some(g);
        let stats_t = Instant::now();
        let grad_norm = if sharded {
            if replicas > 1 {
                stats.target_var = self.batch_target_var();
                stats.n_tokens = n;
            }
            self.reduce_stats(&mut stats, feature_sq, shared_sq, w)?
        } else {
            self.sum_replica_stats(&mut stats, w)?;
            (feature_sq + shared_sq).sqrt()
        };
        self.timing.stats_s += stats_t.elapsed().as_secs_f64();
        Ok((stats, grad_norm))
    }

    /// Sums the device gradients `g`, each replica's weighted by `w`, over `data` (the ranks holding this
    /// shard): packed into one buffer ([`crate::backend::cuda::gradsum`]), summed by NCCL where
    /// `grad_sum` holds it, else downloaded, summed over MPI and uploaded, then unpacked.
    fn sum_device_grads(
        &mut self,
        gpu: &crate::backend::cuda::Gpu,
        g: &crate::backend::cuda::step::DeviceGrads,
        w: f64,
    ) -> Result<()> {
        use crate::backend::cuda::gradsum;
        let what = "all-reduce of the gradients";
        let len = gradsum::packed_len(gpu, g);
        if self.grad_buf.as_ref().is_none_or(|b| b.len() != len) {
            self.grad_buf = Some(gpu.zeros(len)?);
        }
        let buf = self.grad_buf.as_mut().expect("allocated above");
        gradsum::pack(gpu, g, w as f32, buf)?;
        match &self.grad_sum {
            Some(nccl) => nccl.sum(what, buf)?,
            None => {
                let mut host = gpu.download(buf)?;
                self.data.sum_f32(what, &mut host)?;
                *buf = gpu.upload(&host)?;
            }
        }
        gradsum::unpack(gpu, buf, g)
    }
}

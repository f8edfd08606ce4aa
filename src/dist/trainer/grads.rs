//! The loss and gradient of a step whose parameters live on the host (the CPU step, and the CUDA step
//! with host-side Adam, `cuda_host`): feature-sharded (the partial reconstructions summed over the
//! replica's ranks, at once or a target layer at a time with `overlap`), data-parallel (each rank's slice
//! through the single-process step), and the sums of gradients and statistics across ranks that give every
//! rank the whole batch's figures and the global gradient norm.

#[cfg(feature = "cuda")]
use super::device::partials_sum;
use super::{ShardedTrainer, Timing};
use crate::Result;
#[cfg(feature = "cuda")]
use crate::backend::Backend;
use crate::backend::cpu::adam;
use crate::backend::cpu::encode::encode_all_with;
use crate::backend::cpu::sparse::{
    add_skip, backward, decode_features, decode_layers, decode_start, loss_and_grad_of, thresholds,
};
use crate::backend::grads::target_variance;
use crate::backend::{Grads, Objective, StepStats, ThresholdGrad};
use crate::clt::{Activation, CltConfig, Params};
use crate::dist::comm::Comm;
use crate::dist::select::{Part, sharded_codes};
use std::time::Instant;

/// Sums the shards' partial reconstructions over `feat` (the CPU and the CUDA step alike), timing it.
pub(super) fn timed_sum<C: Comm>(
    feat: &C,
    timing: &mut Timing,
    what: &str,
    yhat: &mut [f32],
) -> Result<()> {
    let t = Instant::now();
    feat.sum_f32(what, yhat)?;
    timing.reduce_s += t.elapsed().as_secs_f64();
    Ok(())
}

/// Weights every gradient tensor (the decoder's data term and norm coefficients included) by `w`, and sums
/// them over `comm` in one all-reduce with the touched-row flags and the per-feature firing counts. Every
/// term of the loss is a mean over tokens, so when `w` is each rank's share of the batch the sum is the
/// gradient of the whole batch.
fn sum_gradients<C: Comm>(
    comm: &C,
    cfg: &CltConfig,
    g: &mut Grads,
    active_count: &mut [Vec<u32>],
    w: f64,
) -> Result<()> {
    let mut buf: Vec<f32> = Vec::with_capacity(g.p.len() + 3 * cfg.n_layers * cfg.n_features);
    for t in g.p.tensors() {
        buf.extend(t.iter().map(|v| v * w as f32));
    }
    for c in &g.dec_coef {
        buf.extend(c.iter().map(|v| v * w as f32));
    }
    for t in &g.dec_touched {
        buf.extend(t.iter().map(|b| if *b { 1.0 } else { 0.0 }));
    }
    for c in active_count.iter() {
        buf.extend(c.iter().map(|v| *v as f32));
    }
    comm.sum_f32("all-reduce of the gradients", &mut buf)?;
    let mut it = buf.into_iter();
    for t in g.p.tensors_mut() {
        t.iter_mut().zip(&mut it).for_each(|(v, s)| *v = s);
    }
    for c in g.dec_coef.iter_mut() {
        c.iter_mut().zip(&mut it).for_each(|(v, s)| *v = s);
    }
    for t in g.dec_touched.iter_mut() {
        t.iter_mut().zip(&mut it).for_each(|(v, s)| *v = s > 0.0);
    }
    for c in active_count.iter_mut() {
        c.iter_mut().zip(&mut it).for_each(|(v, s)| *v = s as u32);
    }
    Ok(())
}

impl<C: Comm> ShardedTrainer<C> {
    /// The feature-sharded step's loss and gradient: local encode and decode of this replica's slice of the
    /// batch (all of it without replicas), the partials summed over the replica's ranks, the local backward,
    /// the shard's gradient summed over the replicas (weighted by their shares of the tokens), the
    /// statistics summed.
    pub(super) fn feature_sharded_grads(
        &mut self,
        obj: &Objective,
        dead_mask: Option<&[Vec<bool>]>,
    ) -> Result<(StepStats, f64)> {
        let local = &self.local;
        let row = local.n_layers * local.d_model;
        let (replica, replicas) = (self.data.rank(), self.data.size());
        let n = self.batch.n_tokens;
        let (lo, hi) = (n * replica / replicas, n * (replica + 1) / replicas);
        let (x, y) = (
            &self.batch.x[lo * row..hi * row],
            &self.batch.y[lo * row..hi * row],
        );
        let nl = hi - lo;
        let with_bias = self.feat.rank() == 0;
        let what = "all-reduce of the partial reconstructions";
        #[cfg(feature = "cuda")]
        if let Backend::Cuda(gpu) = &self.backend {
            let sum = partials_sum(
                &self.feat,
                &mut self.timing,
                self.device_sum.as_deref(),
                self.run.train.overlap,
            );
            let stats = crate::backend::cuda::step::sharded_loss_and_grad(
                gpu,
                local,
                &self.params,
                &self.dec_norms,
                x,
                y,
                nl,
                obj,
                dead_mask,
                with_bias,
                sum,
                &mut self.grads,
            )?;
            return self.finish_sharded(stats, nl);
        }
        let by_h = obj.threshold_grad == ThresholdGrad::Preact;
        let thetas = thresholds(&self.params);
        let codes = match self.exchanged_codes(x, lo, nl)? {
            Some((codes, secs)) => {
                self.timing.select_s += secs;
                codes
            }
            None => encode_all_with(local, &self.params, x, nl, &thetas, obj.bandwidth, by_h),
        };
        let mut yhat = if self.run.train.overlap {
            let (yhat, decode_s, reduce_s) =
                overlapped_partials(&self.feat, what, local, &self.params, &codes, nl, with_bias)?;
            self.timing.reduce_s += reduce_s;
            self.timing.decode_s += decode_s;
            yhat
        } else {
            let decode = Instant::now();
            let mut yhat = decode_features(local, &self.params, &codes, nl, with_bias);
            self.timing.decode_s += decode.elapsed().as_secs_f64();
            timed_sum(&self.feat, &mut self.timing, what, &mut yhat)?;
            yhat
        };
        add_skip(local, &self.params, x, nl, &mut yhat);
        let stats = backward(
            local,
            &self.params,
            &self.dec_norms,
            x,
            y,
            nl,
            obj,
            dead_mask,
            &thetas,
            codes,
            yhat,
            &mut self.grads,
        );
        self.finish_sharded(stats, nl)
    }

    /// The codes of this rank's features on its `nl` tokens from `lo` (`x`) when its selection spans other
    /// ranks (`dist::select`): TopK over several feature shards (the replica's ranks), BatchTopK over
    /// several ranks of any kind (the batch's budget spans every shard and replica); `None` when the
    /// rank's own encode selects alone. With the seconds it took.
    fn exchanged_codes(
        &self,
        x: &[f32],
        lo: usize,
        nl: usize,
    ) -> Result<Option<(Vec<crate::backend::cpu::encode::LayerCodes>, f64)>> {
        let group = match self.local.activation {
            Activation::TopK { .. } if self.feat.size() > 1 => &self.feat,
            Activation::BatchTopK { .. } if self.comm.size() > 1 => &self.comm,
            _ => return Ok(None),
        };
        let part = Part {
            first_feature: self.range.start,
            n_features: self.run.model.n_features,
            first_token: lo,
            batch_tokens: self.batch.n_tokens,
        };
        let t = Instant::now();
        let codes = sharded_codes(group, &self.local, &self.params, x, nl, part)?;
        Ok(Some((codes, t.elapsed().as_secs_f64())))
    }

    /// The rest of a feature shard's step, after its loss and gradient on its `nl` tokens: the gradients
    /// summed over replicas, the statistics over the world, and the global gradient norm.
    fn finish_sharded(&mut self, mut stats: StepStats, nl: usize) -> Result<(StepStats, f64)> {
        let local = &self.local;
        let replicas = self.data.size();
        let n = self.batch.n_tokens;
        // This slice's share of the batch's tokens (exactly 1 without replicas).
        let w = nl as f64 / n.max(1) as f64;
        if replicas > 1 {
            let t = Instant::now();
            sum_gradients(
                &self.data,
                local,
                &mut self.grads,
                &mut stats.active_count,
                w,
            )?;
            self.timing.grads_s += t.elapsed().as_secs_f64();
            // Every rank holds the whole batch: the target variance needs no communication.
            stats.target_var = self.batch_target_var();
            stats.n_tokens = n;
        }
        let (feat_sq, shared_sq) =
            adam::grad_sq_parts(local, &self.params, &self.grads, &self.dec_norms);
        let stats_t = Instant::now();
        let grad_norm = self.reduce_stats(&mut stats, feat_sq, shared_sq, w)?;
        self.timing.stats_s += stats_t.elapsed().as_secs_f64();
        Ok((stats, grad_norm))
    }

    /// The data-parallel step's loss and gradient: this rank's slice of the batch through the single-process
    /// step, its gradient weighted by its share of the tokens and summed over ranks (one all-reduce of every
    /// gradient tensor), its statistics likewise.
    pub(super) fn data_parallel_grads(
        &mut self,
        obj: &Objective,
        dead_mask: Option<&[Vec<bool>]>,
    ) -> Result<(StepStats, f64)> {
        let (rank, world) = (self.comm.rank(), self.comm.size());
        let cfg = &self.local;
        let row = cfg.n_layers * cfg.d_model;
        let n = self.batch.n_tokens;
        let (lo, hi) = (n * rank / world, n * (rank + 1) / world);
        let x = &self.batch.x[lo * row..hi * row];
        let y = &self.batch.y[lo * row..hi * row];
        let mut stats = match self.exchanged_codes(x, lo, hi - lo)? {
            // BatchTopK: the batch's selection, then the single-process step's decode and backward.
            Some((codes, secs)) => {
                self.timing.select_s += secs;
                loss_and_grad_of(
                    cfg,
                    &self.params,
                    &self.dec_norms,
                    x,
                    y,
                    hi - lo,
                    obj,
                    dead_mask,
                    &thresholds(&self.params),
                    codes,
                    &mut self.grads,
                )
            }
            None => self.backend.loss_and_grad(
                cfg,
                &self.params,
                &self.dec_norms,
                x,
                y,
                hi - lo,
                obj,
                dead_mask,
                &mut self.grads,
            )?,
        };
        // Every term of the loss is a mean over tokens: weighting each rank's mean by its share of the batch
        // and summing gives the mean over the whole batch.
        let w = (hi - lo) as f64 / n.max(1) as f64;
        let reduce = Instant::now();
        sum_gradients(&self.comm, cfg, &mut self.grads, &mut stats.active_count, w)?;
        self.timing.reduce_s += reduce.elapsed().as_secs_f64();
        self.sum_replica_stats(&mut stats, w)?;
        let grad_norm = adam::grad_norm(&self.local, &self.params, &self.grads, &self.dec_norms);
        Ok((stats, grad_norm))
    }

    /// Data-parallel statistics: each replica's means weighted by its share `w` of the tokens and summed
    /// over the world with the squared errors and counts; the target variance from the whole batch every
    /// rank holds.
    pub(super) fn sum_replica_stats(&mut self, stats: &mut StepStats, w: f64) -> Result<()> {
        let cfg = &self.local;
        let n = self.batch.n_tokens;
        let l_n = cfg.n_layers;
        let mut sums = Vec::with_capacity(3 + 3 * l_n);
        sums.extend([stats.recon * w, stats.sparsity * w, stats.preact * w]);
        sums.extend(stats.sq_err.iter().copied());
        sums.extend(stats.n_active.iter().map(|v| *v as f64));
        sums.extend(stats.n_window.iter().map(|v| *v as f64));
        let stats_t = Instant::now();
        self.comm
            .sum_f64("all-reduce of the step statistics", &mut sums)?;
        self.timing.stats_s += stats_t.elapsed().as_secs_f64();
        stats.recon = sums[0];
        stats.sparsity = sums[1];
        stats.preact = sums[2];
        for l in 0..l_n {
            stats.sq_err[l] = sums[3 + l];
            stats.n_active[l] = sums[3 + l_n + l] as usize;
            stats.n_window[l] = sums[3 + 2 * l_n + l] as usize;
        }
        // Every rank holds the whole batch: the target variance needs no communication.
        stats.target_var = self.batch_target_var();
        stats.n_tokens = n;
        Ok(())
    }

    /// The whole batch's target variance: from the codes it was staged as, else from its f32 targets.
    pub(super) fn batch_target_var(&self) -> Vec<f64> {
        let (cfg, n) = (&self.local, self.batch.n_tokens);
        self.batch_var
            .clone()
            .unwrap_or_else(|| target_variance(&self.batch.y, n, cfg.n_layers, cfg.d_model))
    }

    /// Sums the per-feature statistics and the feature parameters' squared gradient norm over the world (one
    /// all-reduce); returns the global gradient norm. Each slice's means are weighted by its share `w` of the
    /// tokens; with replicas, the reconstruction loss and squared errors (the same on every shard of a
    /// replica) come from shard 0 of each replica, and the shard's squared gradient norm (the same on every
    /// replica after the gradient sum) from replica 0.
    pub(super) fn reduce_stats(
        &self,
        stats: &mut StepStats,
        feat_sq: f64,
        shared_sq: f64,
        w: f64,
    ) -> Result<f64> {
        let l_n = self.local.n_layers;
        let replicas = self.data.size();
        let first_shard = if self.feat.rank() == 0 { 1.0 } else { 0.0 };
        let first_replica = if self.data.rank() == 0 { 1.0 } else { 0.0 };
        let mut buf = Vec::with_capacity(4 + 3 * l_n);
        buf.extend([
            stats.sparsity * w,
            stats.preact * w,
            feat_sq * first_replica,
        ]);
        buf.extend(stats.n_active.iter().map(|v| *v as f64));
        buf.extend(stats.n_window.iter().map(|v| *v as f64));
        if replicas > 1 {
            buf.push(stats.recon * w * first_shard);
            buf.extend(stats.sq_err.iter().map(|v| v * first_shard));
        }
        self.comm
            .sum_f64("all-reduce of the step statistics", &mut buf)?;
        stats.sparsity = buf[0];
        stats.preact = buf[1];
        for l in 0..l_n {
            stats.n_active[l] = buf[3 + l] as usize;
            stats.n_window[l] = buf[3 + l_n + l] as usize;
        }
        if replicas > 1 {
            stats.recon = buf[3 + 2 * l_n];
            stats.sq_err.copy_from_slice(&buf[4 + 2 * l_n..]);
        }
        Ok((buf[2] + shared_sq).sqrt())
    }
}

/// The partial reconstructions of `n` tokens summed over `comm`, one target layer at a time: source layer
/// `l` is decoded, which completes target layer `l`, and that layer's all-reduce starts while layer `l + 1`
/// decodes. The same bits as decoding everything and summing it at once, whenever the sum of a layer's
/// elements over the ranks does not depend on how the buffer is cut (always with two ranks: one addition).
/// Returns the reconstruction, the seconds spent decoding, and those spent in the collective calls but not
/// decoding.
fn overlapped_partials<C: Comm>(
    comm: &C,
    what: &str,
    cfg: &CltConfig,
    params: &Params,
    codes: &[crate::backend::cpu::encode::LayerCodes],
    n: usize,
    with_bias: bool,
) -> Result<(Vec<f32>, f64, f64)> {
    let (l_n, d) = (cfg.n_layers, cfg.d_model);
    let row = l_n * d;
    let mut yhat = decode_start(cfg, params, n, with_bias);
    let mut parts: Vec<Vec<f32>> = (0..l_n).map(|_| vec![0.0; n * d]).collect();
    let mut decode_s = 0.0;
    let started = Instant::now();
    comm.sum_f32_parts(what, &mut parts, &mut |l, part| {
        let t = Instant::now();
        decode_layers(cfg, params, codes, n, l..l + 1, &mut yhat);
        for (b, p) in part.chunks_exact_mut(d).enumerate() {
            p.copy_from_slice(&yhat[b * row + l * d..b * row + (l + 1) * d]);
        }
        decode_s += t.elapsed().as_secs_f64();
    })?;
    let reduce_s = started.elapsed().as_secs_f64() - decode_s;
    crate::backend::cpu::sparse::layer_blocks_into(&parts, d, &mut yhat);
    Ok((yhat, decode_s, reduce_s))
}

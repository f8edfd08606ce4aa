//! The resident training loop (issue 5, item 5): parameters, Adam's moments and the step all on the device,
//! the next batch copied host-to-device from pinned memory on a second stream while the current step runs.
//! The distributed trainer (`dist::trainer`) runs the same state per rank, calling the step's pieces
//! ([`Resident::loss_and_grad`], [`Resident::grad_sq_parts`], [`Resident::apply`]) with its sums over
//! the ranks between them.
//!
//! What lives where:
//! - Device, for the whole run: the fp32 master weights (`W_enc`, `log θ`, `W_dec`; `b_enc` and `b_dec` are
//!   f32 already and the kernels read them directly), Adam's fp32 `m` and `v` for every tensor, and the
//!   copies the kernels read ([`DeviceParams`]: bf16 `W_enc` and `W_dec`, `θ = exp(log θ)`, the decoder
//!   norms), refreshed on the device after every update (`to_bf16`, `exp_f32`; `adam_decoder` writes the
//!   bf16 decoder rows and their norms itself).
//! - Host: the step counter, the schedules (learning rate, λ), the dead-feature clocks and the statistics.
//!   Per step only the statistics the CPU step also reports and one f64 (the squared gradient norm, for
//!   clipping and the non-finite check) come back; parameters and gradients never leave the device.
//!   [`Resident::download`] brings the parameters and Adam's state back for checkpoints.
//!
//! Streams: every kernel runs on the compute stream ([`Gpu::stream`], in order). Batches go through two
//! staging slots, each a pair of pinned host buffers (x, y) and their device buffers; [`Resident::stage`]
//! writes a batch into the free slot's pinned buffers and queues its copy on the copy stream after waiting
//! for the slot's `consumed` event (the compute stream's last read of it), then records `copied`;
//! [`Resident::step`] makes the compute stream wait for `copied` of the oldest staged slot (only when it
//! needs the batch), runs the step, and records `consumed`. The trainer stages batch i+1 before step i, so
//! its copy overlaps step i. The host's wait before overwriting a pinned buffer is cudarc's (the event it
//! records after each copy from pinned memory). A batch from an int8 or int4 store can be staged as the
//! store's codes instead ([`Resident::stage_coded`]): a quarter or an eighth of the bytes cross the bus,
//! and the step starts by decoding and normalising them on the device (`dequant_rows`), to the bits the
//! host's decode gives.
//!
//! One step, as `Trainer::step` on the CPU: [`device_loss_and_grad`]; the global gradient norm (`sum_sq`
//! and `dec_grad_sq` partials into one buffer, summed by `sum_f64`: one f64 read back); the clipping factor
//! and learning rate on the host ([`crate::backend::cpu::adam::clip_scale`], the schedule); fused Adam on
//! every tensor (`adam_dense`, `adam_decoder`), with `t` counted as the CPU counts it. CPU reference:
//! [`crate::backend::cpu::adam::step`] and [`crate::backend::cpu::adam::grad_norm`].

use super::adam::{self, consts};
use super::bench::Timer;
use super::context::{Gpu, cuda_err};
use super::dequant::{DequantOut, Quant, dequant_into};
use super::encode::to_bf16_into;
use super::memory::{DBuf, Pinned};
use super::step::{
    DeviceBatch, DeviceGrads, DeviceParams, ShardSum, device_loss_and_grad,
    device_sharded_loss_and_grad,
};
use super::tune;
use crate::backend::KernelChoice;
use crate::backend::cpu::adam::{AdamHyper, AdamState, clip_scale};
use crate::backend::grads::{Objective, StepStats, target_variance};
use crate::backend::tuning::Tuning;
use crate::clt::{CltConfig, NormScales, Params};
use crate::data::{Batch, CodedBatch};
use crate::{Error, Result};
use cudarc::driver::{CudaEvent, CudaStream};
use std::collections::VecDeque;
use std::sync::Arc;

/// One tensor group (Adam's `m` or `v`) on the device: per layer, and the decoder biases concatenated
/// `[L][d]` as the kernels read them.
struct Moments {
    w_enc: Vec<DBuf<f32>>,
    b_enc: Vec<DBuf<f32>>,
    log_theta: Vec<DBuf<f32>>,
    w_dec: Vec<DBuf<f32>>,
    b_dec: DBuf<f32>,
    /// `[d][d]` per layer with skip connections, else empty.
    w_skip: Vec<DBuf<f32>>,
}

impl Moments {
    fn upload(gpu: &Gpu, p: &Params) -> Result<Self> {
        let up = |v: &[Vec<f32>]| -> Result<Vec<DBuf<f32>>> {
            v.iter().map(|x| gpu.upload(x)).collect()
        };
        Ok(Moments {
            w_enc: up(&p.w_enc)?,
            b_enc: up(&p.b_enc)?,
            log_theta: up(&p.log_theta)?,
            w_dec: up(&p.w_dec)?,
            b_dec: gpu.upload(&p.b_dec.concat())?,
            w_skip: up(&p.w_skip)?,
        })
    }

    fn zeros(gpu: &Gpu, cfg: &CltConfig) -> Result<Self> {
        let (l_n, d, f_n) = (cfg.n_layers, cfg.d_model, cfg.n_features);
        let z = |n: usize| -> Result<Vec<DBuf<f32>>> { (0..l_n).map(|_| gpu.zeros(n)).collect() };
        Ok(Moments {
            w_enc: z(f_n * d)?,
            b_enc: z(f_n)?,
            log_theta: z(f_n)?,
            w_dec: (0..l_n)
                .map(|l| gpu.zeros(f_n * cfg.dec_row_len(l)))
                .collect::<Result<_>>()?,
            b_dec: gpu.zeros(l_n * d)?,
            w_skip: if cfg.skip { z(d * d)? } else { Vec::new() },
        })
    }

    fn download(&self, gpu: &Gpu, cfg: &CltConfig) -> Result<Params> {
        download_params(
            gpu,
            cfg,
            &self.w_enc,
            &self.b_enc,
            &self.log_theta,
            &self.w_dec,
            &self.b_dec,
            &self.w_skip,
        )
    }
}

fn download_params(
    gpu: &Gpu,
    cfg: &CltConfig,
    w_enc: &[DBuf<f32>],
    b_enc: &[DBuf<f32>],
    log_theta: &[DBuf<f32>],
    w_dec: &[DBuf<f32>],
    b_dec: &DBuf<f32>,
    w_skip: &[DBuf<f32>],
) -> Result<Params> {
    let down =
        |v: &[DBuf<f32>]| -> Result<Vec<Vec<f32>>> { v.iter().map(|x| gpu.download(x)).collect() };
    let b = gpu.download(b_dec)?;
    Ok(Params {
        w_enc: down(w_enc)?,
        b_enc: down(b_enc)?,
        log_theta: down(log_theta)?,
        w_dec: down(w_dec)?,
        b_dec: b.chunks(cfg.d_model.max(1)).map(<[f32]>::to_vec).collect(),
        w_skip: down(w_skip)?,
    })
}

/// The fp32 master copies of the weights the kernels read in another form (bf16 weights, `θ`); `b_enc`
/// and `b_dec` are their own masters (inside [`DeviceParams`]).
pub struct Masters {
    /// `[F][d]` per layer.
    pub w_enc: Vec<DBuf<f32>>,
    /// `[F]` per layer.
    pub log_theta: Vec<DBuf<f32>>,
    /// `[F][row_len]` per source layer.
    pub w_dec: Vec<DBuf<f32>>,
    /// `[d][d]` per layer with skip connections, else empty.
    pub w_skip: Vec<DBuf<f32>>,
}

/// A slot's pinned host buffers: the batch in f32, or as the store's int8 / int4 sections (with the
/// device buffers they are copied into, decoded into the slot's f32 batch by the step).
enum Staging {
    F32 {
        x: Pinned<f32>,
        y: Pinned<f32>,
    },
    Coded {
        quant: Quant,
        x: Pinned<u8>,
        y: Pinned<u8>,
        dev_x: DBuf<u8>,
        dev_y: DBuf<u8>,
    },
}

impl Staging {
    /// The codec staged, `None` for f32.
    fn quant(&self) -> Option<Quant> {
        match self {
            Staging::F32 { .. } => None,
            Staging::Coded { quant, .. } => Some(*quant),
        }
    }
}

/// A staging slot: pinned host buffers, the device batch they are copied into, and the two events that
/// order the slot between the copy stream and the compute stream.
struct Slot {
    staging: Staging,
    batch: DeviceBatch,
    /// Recorded on the copy stream after the batch's copy was queued.
    copied: CudaEvent,
    /// Recorded on the compute stream after the last kernel that reads the slot's batch.
    consumed: CudaEvent,
    /// `Σ_b ‖y_l − ȳ_l‖²` per layer, computed on the host while staging (the statistics' `target_var`).
    target_var: Vec<f64>,
}

/// What one resident step reports: the CPU step's statistics and the gradient's global norm.
pub struct ResidentStep {
    pub stats: StepStats,
    pub grad_norm: f64,
}

/// The device-resident trainer state: parameters, Adam's moments, the staging slots and the copy stream.
pub struct Resident {
    gpu: Arc<Gpu>,
    cfg: CltConfig,
    hyper: AdamHyper,
    /// What the kernels read (bf16 weights, `θ`, norms; `b_enc`, `b_dec` in f32, their own masters).
    kernel: DeviceParams,
    master: Masters,
    m: Moments,
    v: Moments,
    /// Adam's update count.
    t: u64,
    /// f64 partials of the squared gradient norm, and their sum.
    partials: DBuf<f64>,
    /// The partials of the feature parameters alone ([`Resident::grad_sq_parts`]; allocated on first use).
    feature_partials: Option<DBuf<f64>>,
    norm_sq: DBuf<f64>,
    copy: Arc<CudaStream>,
    slots: [Option<Slot>; 2],
    /// Slots holding a staged batch not yet stepped on, oldest first.
    staged: VecDeque<usize>,
    /// The slot the next batch is staged into.
    next_free: usize,
    /// The normalisation's per-layer factors of inputs and targets, on the device for coded batches (the
    /// host's copy, to notice a change).
    layer_scales: Option<(NormScales, DBuf<f32>, DBuf<f32>)>,
}

impl Resident {
    /// Uploads the parameters and Adam's state (a fresh run's or a checkpoint's).
    pub fn new(
        gpu: Arc<Gpu>,
        cfg: &CltConfig,
        params: &Params,
        state: &AdamState,
        hyper: AdamHyper,
    ) -> Result<Self> {
        let master = Masters {
            w_enc: params
                .w_enc
                .iter()
                .map(|w| gpu.upload(w))
                .collect::<Result<_>>()?,
            log_theta: params
                .log_theta
                .iter()
                .map(|w| gpu.upload(w))
                .collect::<Result<_>>()?,
            w_dec: params
                .w_dec
                .iter()
                .map(|w| gpu.upload(w))
                .collect::<Result<_>>()?,
            w_skip: params
                .w_skip
                .iter()
                .map(|w| gpu.upload(w))
                .collect::<Result<_>>()?,
        };
        let up = |v: &[Vec<f32>]| -> Result<Vec<DBuf<f32>>> {
            v.iter().map(|x| gpu.upload(x)).collect()
        };
        let kernel = DeviceParams {
            w_enc: master
                .w_enc
                .iter()
                .map(|w| super::encode::to_bf16(&gpu, w))
                .collect::<Result<_>>()?,
            b_enc: up(&params.b_enc)?,
            // θ = exp(log θ) by the kernel the updates use, so a resumed run's θ is the one it left off with.
            theta: master
                .log_theta
                .iter()
                .map(|lt| {
                    let th = gpu.output::<f32>(lt.len())?;
                    adam::exp_into(&gpu, lt, &th)?;
                    Ok(th)
                })
                .collect::<Result<_>>()?,
            w_dec: master
                .w_dec
                .iter()
                .map(|w| super::encode::to_bf16(&gpu, w))
                .collect::<Result<_>>()?,
            norms: (0..cfg.n_layers)
                .map(|l| adam::row_norms(&gpu, &master.w_dec[l], cfg.dec_row_len(l), None))
                .collect::<Result<_>>()?,
            b_dec: gpu.upload(&params.b_dec.concat())?,
            w_skip: master
                .w_skip
                .iter()
                .map(|w| super::encode::to_bf16(&gpu, w))
                .collect::<Result<_>>()?,
        };
        let (m, v) = (
            Moments::upload(&gpu, &state.m)?,
            Moments::upload(&gpu, &state.v)?,
        );
        Self::from_parts(gpu, cfg, hyper, kernel, master, Some((m, v, state.t)))
    }

    /// A resident state from buffers already on the device (the bench): `kernel` must hold the bf16 copies
    /// of `master` and `θ = exp(log θ)`; Adam starts fresh (zero moments, `t = 0`).
    pub fn from_device(
        gpu: Arc<Gpu>,
        cfg: &CltConfig,
        hyper: AdamHyper,
        kernel: DeviceParams,
        master: Masters,
    ) -> Result<Self> {
        Self::from_parts(gpu, cfg, hyper, kernel, master, None)
    }

    fn from_parts(
        gpu: Arc<Gpu>,
        cfg: &CltConfig,
        hyper: AdamHyper,
        kernel: DeviceParams,
        master: Masters,
        adam_state: Option<(Moments, Moments, u64)>,
    ) -> Result<Self> {
        let (l_n, d, f_n) = (cfg.n_layers, cfg.d_model, cfg.n_features);
        let lens_ok = |v: &[DBuf<f32>], len: &dyn Fn(usize) -> usize| {
            v.len() == l_n && v.iter().enumerate().all(|(l, b)| b.len() == len(l))
        };
        let ok = lens_ok(&master.w_enc, &|_| f_n * d)
            && lens_ok(&master.log_theta, &|_| f_n)
            && lens_ok(&master.w_dec, &|l| f_n * cfg.dec_row_len(l))
            && lens_ok(&kernel.b_enc, &|_| f_n)
            && lens_ok(&kernel.theta, &|_| f_n)
            && lens_ok(&kernel.norms, &|_| f_n)
            && kernel.w_enc.len() == l_n
            && kernel.w_dec.len() == l_n
            && kernel.b_dec.len() == l_n * d;
        let n_skip = if cfg.skip { l_n } else { 0 };
        let skip_ok = master.w_skip.len() == n_skip
            && kernel.w_skip.len() == n_skip
            && master.w_skip.iter().all(|w| w.len() == d * d)
            && kernel.w_skip.iter().all(|w| w.len() == d * d);
        if !ok || !skip_ok {
            return Err(Error::Shape {
                what: "resident CUDA trainer: parameters vs config (layers, d, features)".into(),
                expected: vec![l_n, d, f_n],
                got: vec![master.w_enc.len(), kernel.b_dec.len() / l_n.max(1), f_n],
            });
        }
        let (m, v, t) = match adam_state {
            Some(s) => s,
            None => (Moments::zeros(&gpu, cfg)?, Moments::zeros(&gpu, cfg)?, 0),
        };
        let n_partials: usize = (0..l_n)
            .map(|_| {
                adam::sum_sq_blocks(f_n * d)
                    + 2 * adam::sum_sq_blocks(f_n)
                    + f_n
                    + adam::sum_sq_blocks(d)
                    + if cfg.skip {
                        adam::sum_sq_blocks(d * d)
                    } else {
                        0
                    }
            })
            .sum();
        let partials = gpu.output::<f64>(n_partials)?;
        let norm_sq = gpu.output::<f64>(1)?;
        let copy = gpu.new_stream()?;
        // The uploads above ran on the compute stream; finish them before the copy stream can touch
        // anything.
        gpu.sync()?;
        Ok(Resident {
            gpu,
            cfg: cfg.clone(),
            hyper,
            kernel,
            master,
            m,
            v,
            t,
            partials,
            feature_partials: None,
            norm_sq,
            copy,
            slots: [None, None],
            staged: VecDeque::new(),
            next_free: 0,
            layer_scales: None,
        })
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Adam's update count.
    pub fn adam_t(&self) -> u64 {
        self.t
    }

    /// How many batches are staged and not yet stepped on (0, 1 or 2).
    pub fn staged(&self) -> usize {
        self.staged.len()
    }

    /// The parameters and Adam's state, downloaded (waits for the queued work).
    pub fn download(&self) -> Result<(Params, AdamState)> {
        let (gpu, cfg) = (&*self.gpu, &self.cfg);
        let params = download_params(
            gpu,
            cfg,
            &self.master.w_enc,
            &self.kernel.b_enc,
            &self.master.log_theta,
            &self.master.w_dec,
            &self.kernel.b_dec,
            &self.master.w_skip,
        )?;
        let state = AdamState {
            m: self.m.download(gpu, cfg)?,
            v: self.v.download(gpu, cfg)?,
            t: self.t,
        };
        Ok((params, state))
    }

    /// The decoder norms the kernels read (after the last update), per layer.
    pub fn decoder_norms(&self) -> Result<Vec<Vec<f32>>> {
        self.kernel
            .norms
            .iter()
            .map(|n| self.gpu.download(n))
            .collect()
    }

    /// Makes sure the free slot can hold `n_tokens` tokens staged as `quant` (f32 for `None`), allocating
    /// it the first time, or again when the batch size or the staged form changes.
    fn slot_for(&mut self, n_tokens: usize, quant: Option<Quant>) -> Result<usize> {
        let j = self.next_free;
        let fits = self.slots[j]
            .as_ref()
            .is_some_and(|s| s.batch.n_tokens == n_tokens && s.staging.quant() == quant);
        if !fits {
            // The old slot's buffers may still be read by a queued copy or kernel.
            self.copy
                .synchronize()
                .map_err(cuda_err("synchronising the copy stream"))?;
            self.gpu.sync()?;
            self.slots[j] = None;
            let gpu = &*self.gpu;
            let n = n_tokens * self.cfg.n_layers * self.cfg.d_model;
            let staging = match quant {
                None => Staging::F32 {
                    x: gpu.pinned(n)?,
                    y: gpu.pinned(n)?,
                },
                Some(quant) => {
                    let bytes = n_tokens * self.cfg.n_layers * quant.row_bytes(self.cfg.d_model);
                    Staging::Coded {
                        quant,
                        x: gpu.pinned(bytes)?,
                        y: gpu.pinned(bytes)?,
                        dev_x: gpu.zeros(bytes)?,
                        dev_y: gpu.zeros(bytes)?,
                    }
                }
            };
            self.slots[j] = Some(Slot {
                staging,
                batch: DeviceBatch {
                    n_tokens,
                    x: gpu.zeros(n)?,
                    x_bf: gpu.zeros(n)?,
                    y: gpu.zeros(n)?,
                },
                copied: gpu.new_event()?,
                consumed: gpu.new_event()?,
                target_var: Vec::new(),
            });
            gpu.sync()?;
        }
        Ok(j)
    }

    /// Stages a normalised batch: writes it into the free slot's pinned buffers (waiting for that slot's
    /// previous copy to have read them) and queues its copy to the device on the copy stream, after the
    /// compute stream's last read of the slot. Returns at once; the copy overlaps whatever the compute
    /// stream runs. At most two batches can be staged.
    pub fn stage(&mut self, batch: &Batch) -> Result<()> {
        let (l_n, d) = (self.cfg.n_layers, self.cfg.d_model);
        let n = batch.n_tokens * l_n * d;
        if batch.x.len() != n || batch.y.len() != n {
            return Err(Error::Shape {
                what: "resident CUDA trainer: staged batch (x, y elements)".into(),
                expected: vec![n, n],
                got: vec![batch.x.len(), batch.y.len()],
            });
        }
        self.check_free()?;
        let j = self.slot_for(batch.n_tokens, None)?;
        let gpu = Arc::clone(&self.gpu);
        let copy = Arc::clone(&self.copy);
        let slot = self.slots[j].as_mut().expect("slot allocated above");
        slot.target_var = target_variance(&batch.y, batch.n_tokens, l_n, d);
        let Staging::F32 { x, y } = &mut slot.staging else {
            unreachable!("slot_for(_, None) stages f32")
        };
        x.as_mut_slice()?.copy_from_slice(&batch.x);
        y.as_mut_slice()?.copy_from_slice(&batch.y);
        copy.wait(&slot.consumed).map_err(cuda_err(
            "ordering a batch copy after the step that read the slot",
        ))?;
        gpu.copy_pinned_on(&copy, x, &mut slot.batch.x)?;
        gpu.copy_pinned_on(&copy, y, &mut slot.batch.y)?;
        self.queued(j)
    }

    /// Stages a batch as the store holds it (int8 or int4 rows, see [`CodedBatch`]): writes its bytes into
    /// the free slot's pinned buffers and queues their copy, as [`Resident::stage`] does; the step decodes
    /// them on the device and multiplies each layer by `norms` (the trainer's normalisation), giving the
    /// values `stage` would have been given for the decoded, normalised batch, to the bit. A quarter of
    /// the f32 bytes cross the bus for int8, an eighth for int4.
    pub fn stage_coded(&mut self, batch: &CodedBatch, norms: &NormScales) -> Result<()> {
        let (l_n, d) = (self.cfg.n_layers, self.cfg.d_model);
        let Some(quant) = Quant::of(batch.codec) else {
            return Err(Error::Unsupported(format!(
                "decoding {} batches on the device (int8 and int4 only)",
                batch.codec.name()
            )));
        };
        let n = batch.n_tokens * l_n * quant.row_bytes(d);
        if batch.dims.n_layers != l_n
            || batch.dims.d_model != d
            || batch.x.len() != n
            || batch.y.len() != n
            || norms.input.len() != l_n
            || norms.target.len() != l_n
        {
            return Err(Error::Shape {
                what: "resident CUDA trainer: staged coded batch (layers, d, x bytes, y bytes, scales)"
                    .into(),
                expected: vec![l_n, d, n, n, l_n],
                got: vec![
                    batch.dims.n_layers,
                    batch.dims.d_model,
                    batch.x.len(),
                    batch.y.len(),
                    norms.input.len().min(norms.target.len()),
                ],
            });
        }
        self.check_free()?;
        if self
            .layer_scales
            .as_ref()
            .is_none_or(|(h, _, _)| h != norms)
        {
            // A staged batch is decoded with the factors current at its step: they must not change under it.
            if self.layer_scales.is_some() && !self.staged.is_empty() {
                return Err(Error::Unsupported(
                    "changing the normalisation while a coded batch is staged".into(),
                ));
            }
            // Queued kernels may read the old factors.
            self.gpu.sync()?;
            let (sx, sy) = (
                self.gpu.upload(&norms.input)?,
                self.gpu.upload(&norms.target)?,
            );
            self.gpu.sync()?;
            self.layer_scales = Some((norms.clone(), sx, sy));
        }
        let j = self.slot_for(batch.n_tokens, Some(quant))?;
        let gpu = Arc::clone(&self.gpu);
        let copy = Arc::clone(&self.copy);
        let slot = self.slots[j].as_mut().expect("slot allocated above");
        slot.target_var = batch.target_variance(&norms.target);
        let Staging::Coded {
            x, y, dev_x, dev_y, ..
        } = &mut slot.staging
        else {
            unreachable!("slot_for(_, Some(_)) stages codes")
        };
        x.as_mut_slice()?.copy_from_slice(&batch.x);
        y.as_mut_slice()?.copy_from_slice(&batch.y);
        copy.wait(&slot.consumed).map_err(cuda_err(
            "ordering a batch copy after the step that read the slot",
        ))?;
        gpu.copy_pinned_on(&copy, x, dev_x)?;
        gpu.copy_pinned_on(&copy, y, dev_y)?;
        self.queued(j)
    }

    /// Whether [`Resident::stage_coded`] takes batches of `codec` (int8 and int4).
    pub fn decodes(codec: crate::store::Codec) -> bool {
        Quant::of(codec).is_some()
    }

    /// Refuses a third staged batch.
    fn check_free(&self) -> Result<()> {
        if self.staged.len() >= 2 {
            return Err(Error::Unsupported(
                "staging a third batch before stepping (two staging slots)".into(),
            ));
        }
        Ok(())
    }

    /// Records the end of slot `j`'s copy on the copy stream and queues the slot for a step.
    fn queued(&mut self, j: usize) -> Result<()> {
        let slot = self.slots[j].as_ref().expect("a staged slot is allocated");
        slot.copied
            .record(&self.copy)
            .map_err(cuda_err("recording a batch copy"))?;
        self.staged.push_back(j);
        self.next_free = 1 - j;
        Ok(())
    }

    /// Waits until every staged batch's copy has finished (the bench, to time a step without its copy).
    pub fn wait_staged(&self) -> Result<()> {
        self.copy
            .synchronize()
            .map_err(cuda_err("synchronising the copy stream"))
    }

    /// One training step on the oldest staged batch: loss and gradient, the global gradient norm (one f64
    /// read back), clipping to `clip_norm` (0: off), Adam at learning rate `lr`, and the kernels' copies
    /// refreshed. `step` names the step in errors. A non-finite loss or gradient norm is an error and
    /// leaves the parameters unchanged, as on the CPU. Returns once the update is queued.
    pub fn step(
        &mut self,
        obj: &Objective,
        preact_mask: Option<&[Vec<bool>]>,
        lr: f32,
        clip_norm: f32,
        step: u64,
    ) -> Result<ResidentStep> {
        let (stats, g) = self.loss_and_grad(obj, preact_mask, None, step)?;
        let gpu = Arc::clone(&self.gpu);
        let gpu = &*gpu;
        let cfg = &self.cfg;

        // The global gradient norm: every tensor's partials into one buffer, summed on the device.
        let l_n = cfg.n_layers;
        let mut at = 0;
        for l in 0..l_n {
            at += self.feature_sq_into(&g, l, &self.partials, at)?;
            at += adam::sum_sq_into(gpu, &g.b_dec[l], &self.partials, at)?;
            if let Some(w) = g.w_skip.get(l) {
                at += adam::sum_sq_into(gpu, w, &self.partials, at)?;
            }
        }
        debug_assert_eq!(at, self.partials.len());
        adam::sum_f64(gpu, &self.partials, &self.norm_sq)?;
        let grad_norm = gpu.download(&self.norm_sq)?[0].sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite {
                what: "gradient norm".into(),
                step,
            });
        }
        self.apply(&g, lr, clip_scale(clip_norm, grad_norm))?;
        Ok(ResidentStep { stats, grad_norm })
    }

    /// The squared gradient norm of `g` in two parts (the distributed resident trainer, which sums them
    /// over the ranks for the global clipping norm): the feature parameters (encoder rows and biases,
    /// thresholds, decoder rows with their norm terms) and the replicated decoder bias.
    pub fn grad_sq_parts(&mut self, g: &DeviceGrads) -> Result<(f64, f64)> {
        let gpu = Arc::clone(&self.gpu);
        let gpu = &*gpu;
        let l_n = self.cfg.n_layers;
        if self.feature_partials.is_none() {
            let f_n = self.cfg.n_features;
            let d = self.cfg.d_model;
            let n = l_n * (adam::sum_sq_blocks(f_n * d) + 2 * adam::sum_sq_blocks(f_n) + f_n);
            self.feature_partials = Some(gpu.output::<f64>(n)?);
        }
        let partials = self.feature_partials.as_ref().expect("allocated above");
        let mut at = 0;
        for l in 0..l_n {
            at += self.feature_sq_into(g, l, partials, at)?;
        }
        debug_assert_eq!(at, partials.len());
        adam::sum_f64(gpu, partials, &self.norm_sq)?;
        let feature_sq = gpu.download(&self.norm_sq)?[0];
        let mut shared_sq = 0.0;
        for b in g.b_dec.iter().chain(&g.w_skip) {
            shared_sq += adam::sum_sq(gpu, b)?;
        }
        Ok((feature_sq, shared_sq))
    }

    /// Pops the oldest staged batch and runs the step's loss and gradient on it (a feature shard's with
    /// `shard`), leaving the gradients on the device: the first half of [`Resident::step`], for the
    /// distributed trainer, which sums what it must over the ranks and then calls [`Resident::apply`]. A
    /// non-finite loss is an error.
    pub fn loss_and_grad(
        &mut self,
        obj: &Objective,
        preact_mask: Option<&[Vec<bool>]>,
        shard: Option<ShardSum>,
        step: u64,
    ) -> Result<(StepStats, DeviceGrads)> {
        let Some(j) = self.staged.pop_front() else {
            return Err(Error::Unsupported(
                "a resident CUDA step with no batch staged".into(),
            ));
        };
        self.prepare(j)?;
        let gpu = &*self.gpu;
        let cfg = &self.cfg;
        let slot = self.slots[j].as_ref().expect("a staged slot is allocated");
        let (mut stats, g) = match shard {
            None => device_loss_and_grad(gpu, cfg, &self.kernel, &slot.batch, obj, preact_mask)?,
            Some(s) => device_sharded_loss_and_grad(
                gpu,
                cfg,
                &self.kernel,
                &slot.batch,
                obj,
                preact_mask,
                s,
            )?,
        };
        slot.consumed
            .record(gpu.stream())
            .map_err(cuda_err("recording the end of a batch's use"))?;
        stats.target_var = slot.target_var.clone();
        if !stats.loss().is_finite() {
            return Err(Error::NonFinite {
                what: "loss".into(),
                step,
            });
        }
        Ok((stats, g))
    }

    /// Makes staged slot `j`'s batch ready for the kernels, on the stream: waits for its copy, then writes
    /// its bf16 inputs (from the f32 rows, or decoding the store's codes into both). The same values
    /// each time it runs.
    fn prepare(&self, j: usize) -> Result<()> {
        let gpu = &*self.gpu;
        let cfg = &self.cfg;
        let slot = self.slots[j].as_ref().expect("a staged slot is allocated");
        gpu.stream()
            .wait(&slot.copied)
            .map_err(cuda_err("waiting for the batch copy"))?;
        match &slot.staging {
            Staging::F32 { .. } => to_bf16_into(gpu, &slot.batch.x, &slot.batch.x_bf)?,
            Staging::Coded {
                quant,
                dev_x,
                dev_y,
                ..
            } => {
                let (_, sx, sy) = self
                    .layer_scales
                    .as_ref()
                    .expect("stage_coded uploads the layer scales");
                let rows = slot.batch.n_tokens * cfg.n_layers;
                let into = |out, bf16, layer_scale| DequantOut {
                    out,
                    bf16,
                    layer_scale: Some(layer_scale),
                };
                let (b, d) = (&slot.batch, cfg.d_model);
                dequant_into(
                    gpu,
                    dev_x,
                    *quant,
                    rows,
                    d,
                    0,
                    &into(&b.x, Some(&b.x_bf), sx),
                )?;
                dequant_into(gpu, dev_y, *quant, rows, d, 0, &into(&b.y, None, sy))?;
            }
        }
        Ok(())
    }

    /// Resolves `wanted`'s `auto` settings on the oldest staged batch, which stays staged for the step
    /// ([`tune::tune_step`]: each candidate's loss and gradient checked against the reference's, then
    /// timed); leaves the device on the chosen kernels.
    pub fn tune(
        &mut self,
        wanted: KernelChoice,
        obj: &Objective,
        preact_mask: Option<&[Vec<bool>]>,
        timer: &mut dyn Timer,
    ) -> Result<Tuning> {
        let Some(&j) = self.staged.front() else {
            return Err(Error::Unsupported(
                "tuning a resident CUDA step with no batch staged".into(),
            ));
        };
        self.prepare(j)?;
        let slot = self.slots[j].as_ref().expect("a staged slot is allocated");
        tune::tune_step(
            &self.gpu,
            wanted,
            &self.cfg,
            &self.kernel,
            &slot.batch,
            obj,
            preact_mask,
            timer,
        )
    }

    /// Writes the squared-norm partials of layer `l`'s feature gradients (encoder row and bias, threshold,
    /// decoder rows with their norm terms) into `out[at..]`; returns how many.
    fn feature_sq_into(
        &self,
        g: &DeviceGrads,
        l: usize,
        out: &DBuf<f64>,
        at: usize,
    ) -> Result<usize> {
        let gpu = &*self.gpu;
        let lg = &g.layers[l];
        let mut n = adam::sum_sq_into(gpu, &lg.w_enc, out, at)?;
        n += adam::sum_sq_into(gpu, &lg.b_enc, out, at + n)?;
        n += adam::sum_sq_into(gpu, &lg.log_theta, out, at + n)?;
        n += adam::dec_grad_sq_into(
            gpu,
            &lg.w_dec,
            &self.master.w_dec[l],
            &lg.dec_coef,
            &lg.touched,
            self.cfg.dec_row_len(l),
            out,
            at + n,
        )?;
        Ok(n)
    }

    /// Adam on every tensor with gradient `g`, learning rate `lr` and clipping factor `scale`, then the
    /// kernels' copies (bf16 weights, `θ`, decoder norms). Queued on the stream.
    pub fn apply(&mut self, g: &DeviceGrads, lr: f32, scale: f32) -> Result<()> {
        let gpu = &*self.gpu;
        let cfg = &self.cfg;
        let (d, l_n) = (cfg.d_model, cfg.n_layers);
        self.t += 1;
        let k = consts(&self.hyper, self.t, lr, scale);
        let (kp, ms, m, v) = (&self.kernel, &self.master, &self.m, &self.v);
        for l in 0..l_n {
            let lg = &g.layers[l];
            adam::adam_dense(gpu, &ms.w_enc[l], &m.w_enc[l], &v.w_enc[l], &lg.w_enc, k)?;
            to_bf16_into(gpu, &ms.w_enc[l], &kp.w_enc[l])?;
            adam::adam_dense(gpu, &kp.b_enc[l], &m.b_enc[l], &v.b_enc[l], &lg.b_enc, k)?;
            if cfg.has_threshold() {
                adam::adam_dense(
                    gpu,
                    &ms.log_theta[l],
                    &m.log_theta[l],
                    &v.log_theta[l],
                    &lg.log_theta,
                    k,
                )?;
                adam::exp_into(gpu, &ms.log_theta[l], &kp.theta[l])?;
            }
            adam::adam_dense_at(gpu, &kp.b_dec, &m.b_dec, &v.b_dec, l * d, &g.b_dec[l], k)?;
            if cfg.skip {
                let (w, gw) = (&ms.w_skip[l], &g.w_skip[l]);
                adam::adam_dense(gpu, w, &m.w_skip[l], &v.w_skip[l], gw, k)?;
                to_bf16_into(gpu, w, &kp.w_skip[l])?;
            }
            adam::adam_decoder(
                gpu,
                &ms.w_dec[l],
                &m.w_dec[l],
                &v.w_dec[l],
                &lg.w_dec,
                &lg.dec_coef,
                &lg.touched,
                Some(&kp.w_dec[l]),
                &kp.norms[l],
                cfg.dec_row_len(l),
                k,
            )?;
        }
        Ok(())
    }
}

impl Drop for Resident {
    /// A staged batch's copy may still be writing into a slot's device buffers, which are freed on the
    /// compute stream: let the copy stream finish first.
    fn drop(&mut self) {
        let _ = self.copy.synchronize();
    }
}

//! One training step's loss and gradient on the device: the kernels chained on one stream (encode, sparse
//! decode with the residual, each layer's backward, the decoder-bias gradient), with the statistics the
//! CPU step reports.
//!
//! CPU reference: [`crate::backend::cpu::sparse::loss_and_grad`] (same arguments, same [`Grads`] form).
//! [`device_loss_and_grad`] works on parameters and a batch already on the device ([`DeviceParams`],
//! [`DeviceBatch`]) and leaves the gradients there ([`DeviceGrads`]); [`loss_and_grad`] wraps it for host
//! arrays (uploads the parameters, downloads the gradients: the correctness harness the tests use). A
//! feature shard's step (distributed training) is the same chain with the decode stopped at the partial
//! reconstruction, which a [`ShardSum`] completes (NCCL on the device, or MPI through the host) before the
//! residual: [`sharded_loss_and_grad`] on host arrays, [`device_sharded_loss_and_grad`] on device ones.
//! With `[train] overlap`, the shard decodes one target layer at a time and each layer's all-reduce runs
//! while the next decodes ([`PartialSum::DeviceParts`], [`PartialSum::HostParts`]).
//! Skip connections are not supported yet.

use super::backward::{self, LayerGradInput, LayerGrads, col_sum};
use super::context::Gpu;
use super::decode::{DecodeLayer, PartialDecode, decode, residual};
use super::encode::{self, DeviceCodes, EncodeInput, WindowStats};
use super::memory::DBuf;
use super::topk;
use crate::backend::cpu::sparse::thresholds;
use crate::backend::grads::{Grads, Objective, StepStats, target_variance};
use crate::clt::{Activation, CltConfig, DecoderKind, Params};
use crate::{Error, Result};

/// First guess at the longest per-token list of the JumpReLU encoder (it re-runs with more room).
const CAP_GUESS: usize = 64;

/// The parameters as the kernels read them, on the device: bf16 weights, f32 biases, thresholds and
/// decoder norms.
pub struct DeviceParams {
    /// bf16 `[F][d]` per layer.
    pub w_enc: Vec<DBuf<u16>>,
    pub b_enc: Vec<DBuf<f32>>,
    /// `exp(log θ)` per layer (JumpReLU; the thresholds of other activations are unused).
    pub theta: Vec<DBuf<f32>>,
    /// bf16 `[F][row_len]` per source layer.
    pub w_dec: Vec<DBuf<u16>>,
    /// Decoder norms `[F]` per layer.
    pub norms: Vec<DBuf<f32>>,
    /// `[L][d]`.
    pub b_dec: DBuf<f32>,
    /// bf16 `[d][d]` (out, in) per layer with skip connections, else empty.
    pub w_skip: Vec<DBuf<u16>>,
}

impl DeviceParams {
    /// Uploads `params` (weights rounded to bf16) with their decoder norms.
    pub fn upload(gpu: &Gpu, params: &Params, dec_norms: &[Vec<f32>]) -> Result<Self> {
        let up = |v: &[Vec<f32>]| -> Result<Vec<DBuf<f32>>> {
            v.iter().map(|x| gpu.upload(x)).collect()
        };
        let up_bf = |v: &[Vec<f32>]| -> Result<Vec<DBuf<u16>>> {
            v.iter().map(|x| gpu.upload_bf16(x)).collect()
        };
        Ok(DeviceParams {
            w_enc: up_bf(&params.w_enc)?,
            b_enc: up(&params.b_enc)?,
            theta: up(&thresholds(params))?,
            w_dec: up_bf(&params.w_dec)?,
            norms: up(dec_norms)?,
            b_dec: gpu.upload(&params.b_dec.concat())?,
            w_skip: up_bf(&params.w_skip)?,
        })
    }
}

/// A batch on the device: inputs `[B][L][d]` in f32 and bf16, targets `[B][L][d]` in f32.
pub struct DeviceBatch {
    pub n_tokens: usize,
    pub x: DBuf<f32>,
    pub x_bf: DBuf<u16>,
    pub y: DBuf<f32>,
}

impl DeviceBatch {
    /// Uploads a batch (x is converted to bf16 on the device).
    pub fn upload(gpu: &Gpu, x: &[f32], y: &[f32], n_tokens: usize) -> Result<Self> {
        if x.len() != y.len() || !x.len().is_multiple_of(n_tokens.max(1)) {
            return Err(Error::Shape {
                what: "CUDA batch (x, y)".into(),
                expected: vec![x.len(), x.len()],
                got: vec![x.len(), y.len()],
            });
        }
        let x_dev = gpu.upload(x)?;
        let x_bf = encode::to_bf16(gpu, &x_dev)?;
        Ok(DeviceBatch {
            n_tokens,
            x: x_dev,
            x_bf,
            y: gpu.upload(y)?,
        })
    }
}

/// The gradients, left on the device: per layer as [`backward::layer_grads`] returns them, and the decoder
/// bias per layer.
pub struct DeviceGrads {
    pub layers: Vec<LayerGrads>,
    pub b_dec: Vec<DBuf<f32>>,
    /// `[d][d]` per layer with skip connections, else empty.
    pub w_skip: Vec<DBuf<f32>>,
}

/// The step's loss and gradient, as [`crate::backend::cpu::sparse::loss_and_grad`] computes them.
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grad(
    gpu: &Gpu,
    cfg: &CltConfig,
    params: &Params,
    dec_norms: &[Vec<f32>],
    x: &[f32],
    y: &[f32],
    n_tokens: usize,
    obj: &Objective,
    preact_mask: Option<&[Vec<bool>]>,
    grads: &mut Grads,
) -> Result<StepStats> {
    let dp = DeviceParams::upload(gpu, params, dec_norms)?;
    let batch = DeviceBatch::upload(gpu, x, y, n_tokens)?;
    let (mut stats, g) = device_loss_and_grad(gpu, cfg, &dp, &batch, obj, preact_mask)?;
    stats.target_var = target_variance(y, n_tokens, cfg.n_layers, cfg.d_model);
    download_grads(gpu, &g, grads)?;
    Ok(stats)
}

/// One feature shard's step (distributed training, `cuda-host`): `cfg` and `params` are the shard's
/// features of every layer (with the replicated decoder bias, counted only where `with_bias`, the
/// shard that adds it to the reconstruction, as the CPU's sharded step does). The device encodes and decodes
/// the shard's features; `sum` turns the shard's partial reconstruction (`[B][L][d]`) into the whole one
/// (an all-reduce over the shards: on the host through MPI, or on the device through NCCL); the residual
/// and squared errors are computed from it (on the host or the device, where the sum is), and the device
/// runs the shard's backward on that residual. The statistics are the shard's (sparsity, pre-activation
/// term, firing counts: the caller sums them over shards) except the reconstruction, which is the whole
/// model's.
#[allow(clippy::too_many_arguments)]
pub fn sharded_loss_and_grad(
    gpu: &Gpu,
    cfg: &CltConfig,
    params: &Params,
    dec_norms: &[Vec<f32>],
    x: &[f32],
    y: &[f32],
    n_tokens: usize,
    obj: &Objective,
    preact_mask: Option<&[Vec<bool>]>,
    with_bias: bool,
    sum: PartialSum,
    grads: &mut Grads,
) -> Result<StepStats> {
    let dp = DeviceParams::upload(gpu, params, dec_norms)?;
    let batch = DeviceBatch::upload(gpu, x, y, n_tokens)?;
    let shard = ShardSum { y, with_bias, sum };
    let (mut stats, g) = step_with(gpu, cfg, &dp, &batch, obj, preact_mask, Some(shard))?;
    stats.target_var = target_variance(y, n_tokens, cfg.n_layers, cfg.d_model);
    download_grads(gpu, &g, grads)?;
    Ok(stats)
}

/// Copies the device gradients into the host's [`Grads`].
fn download_grads(gpu: &Gpu, g: &DeviceGrads, grads: &mut Grads) -> Result<()> {
    for (l, lg) in g.layers.iter().enumerate() {
        grads.p.w_enc[l] = gpu.download(&lg.w_enc)?;
        grads.p.w_dec[l] = gpu.download(&lg.w_dec)?;
        grads.p.b_enc[l] = gpu.download(&lg.b_enc)?;
        grads.p.log_theta[l] = gpu.download(&lg.log_theta)?;
        grads.dec_coef[l] = gpu.download(&lg.dec_coef)?;
        grads.dec_touched[l] = gpu.download(&lg.touched)?.iter().map(|t| *t != 0).collect();
    }
    for (k, b) in g.b_dec.iter().enumerate() {
        grads.p.b_dec[k] = gpu.download(b)?;
    }
    for (l, w) in g.w_skip.iter().enumerate() {
        grads.p.w_skip[l] = gpu.download(w)?;
    }
    Ok(())
}

/// Sums a host buffer over the shards in place ([`PartialSum::Host`]).
pub type HostSumFn<'a> = Box<dyn FnMut(&mut [f32]) -> Result<()> + 'a>;
/// Sums a device buffer over the shards in place, on the step's stream ([`PartialSum::Device`]).
pub type DeviceSumFn<'a> = Box<dyn FnMut(&mut DBuf<f32>) -> Result<()> + 'a>;

/// Sums a shard's partials over the shards on the host one target layer at a time ([`PartialSum::HostParts`]):
/// given `L` host blocks of `B·d` and `fill(l, block)`, which decodes target layer `l` on the device and
/// copies it into the block, the closure calls `fill` for every layer in order and returns with every block
/// summed; it may sum block `l` while block `l + 1` is filled (the shape of `Comm::sum_f32_parts`).
pub type HostPartsFn<'a> =
    Box<dyn FnMut(&mut [Vec<f32>], &mut dyn FnMut(usize, &mut [f32])) -> Result<()> + 'a>;
/// Sums a shard's layer-major partials (`[L][B][d]`) over the shards on the device one target layer at a
/// time ([`PartialSum::DeviceParts`]): given the buffer, `L`, and `decode(l)`, which queues target layer
/// `l`'s decode on the step's stream, the closure calls `decode` for every layer in order, queues block
/// `l`'s sum after it (so that it can run while layer `l + 1` decodes), and returns with the sum complete
/// ahead of later work on the step's stream (NCCL on a stream of its own: `DeviceSum::sum_parts`).
pub type DevicePartsFn<'a> =
    Box<dyn FnMut(&mut DBuf<f32>, usize, &mut dyn FnMut(usize) -> Result<()>) -> Result<()> + 'a>;

/// Where a feature shard's partial reconstruction is summed over the shards ([`sharded_loss_and_grad`]).
/// The `*Parts` forms overlap the all-reduce with decoding (`[train] overlap`): the shard decodes one
/// target layer at a time into a layer-major buffer, each layer's block summed while the next decodes. The
/// sum is the same element by element, so the step's result is the same to the bit.
pub enum PartialSum<'a> {
    /// On the host: the partials are downloaded and summed in place by the closure (MPI); the residual is
    /// computed on the host and uploaded.
    Host(HostSumFn<'a>),
    /// On the device: the closure sums the buffer in place on the step's stream (NCCL; nothing for a
    /// single shard); the residual kernel runs on the sum.
    Device(DeviceSumFn<'a>),
    /// [`PartialSum::Host`] a target layer at a time.
    HostParts(HostPartsFn<'a>),
    /// [`PartialSum::Device`] a target layer at a time.
    DeviceParts(DevicePartsFn<'a>),
}

/// A feature shard's way from its partial reconstruction to the whole one.
pub struct ShardSum<'a, 'b> {
    /// The targets, on the host (read where the sum is on the host).
    pub y: &'a [f32],
    /// Whether this shard's partial includes the (replicated) decoder bias: one shard of each group does.
    pub with_bias: bool,
    pub sum: PartialSum<'b>,
}

/// One feature shard's step on device-resident parameters and batch (the distributed resident trainer):
/// [`sharded_loss_and_grad`] without the uploads and downloads. The gradients stay on the device; the
/// statistics leave `target_var` empty, as [`device_loss_and_grad`]'s do.
pub fn device_sharded_loss_and_grad(
    gpu: &Gpu,
    cfg: &CltConfig,
    dp: &DeviceParams,
    batch: &DeviceBatch,
    obj: &Objective,
    preact_mask: Option<&[Vec<bool>]>,
    shard: ShardSum,
) -> Result<(StepStats, DeviceGrads)> {
    step_with(gpu, cfg, dp, batch, obj, preact_mask, Some(shard))
}

/// The step's loss and gradient on device-resident parameters and batch; the gradients stay on the device.
/// The statistics are [`loss_and_grad`]'s except `target_var`, which needs the targets on the host (left
/// empty here).
pub fn device_loss_and_grad(
    gpu: &Gpu,
    cfg: &CltConfig,
    dp: &DeviceParams,
    batch: &DeviceBatch,
    obj: &Objective,
    preact_mask: Option<&[Vec<bool>]>,
) -> Result<(StepStats, DeviceGrads)> {
    step_with(gpu, cfg, dp, batch, obj, preact_mask, None)
}

/// [`device_loss_and_grad`], or with `shard` a feature shard's step ([`sharded_loss_and_grad`]): the
/// decode stops at the partial reconstruction, which `shard` completes, and the residual is computed from
/// the whole one.
fn step_with(
    gpu: &Gpu,
    cfg: &CltConfig,
    dp: &DeviceParams,
    batch: &DeviceBatch,
    obj: &Objective,
    preact_mask: Option<&[Vec<bool>]>,
    shard: Option<ShardSum>,
) -> Result<(StepStats, DeviceGrads)> {
    let (l_n, d, f_n) = (cfg.n_layers, cfg.d_model, cfg.n_features);
    if cfg.skip && (dp.w_skip.len() != l_n || dp.w_skip.iter().any(|w| w.len() != d * d)) {
        return Err(Error::Shape {
            what: "CUDA step: skip weights (layers, elements of the first)".into(),
            expected: vec![l_n, d * d],
            got: vec![dp.w_skip.len(), dp.w_skip.first().map_or(0, DBuf::len)],
        });
    }
    let n_tokens = batch.n_tokens;
    let row = l_n * d;
    let bf = n_tokens.max(1) as f32;
    let jump = cfg.has_threshold();
    if batch.x.len() != n_tokens * row || dp.w_enc.len() != l_n || dp.w_dec.len() != l_n {
        return Err(Error::Shape {
            what: "CUDA step (batch elements, encoder layers, decoder layers)".into(),
            expected: vec![n_tokens * row, l_n, l_n],
            got: vec![batch.x.len(), dp.w_enc.len(), dp.w_dec.len()],
        });
    }
    let (x_bf, w_enc, b_enc, theta, w_dec, norms) = (
        &batch.x_bf,
        &dp.w_enc,
        &dp.b_enc,
        &dp.theta,
        &dp.w_dec,
        &dp.norms,
    );
    let input = |l: usize| EncodeInput {
        x: x_bf,
        x_offset: l * d,
        x_stride: row,
        n_tokens,
        d,
        w: &w_enc[l],
        bias: &b_enc[l],
        n_features: f_n,
    };
    // Encode.
    let empty_window = || -> Result<WindowStats> {
        Ok(WindowStats {
            preact_sum: gpu.zeros(f_n)?,
            near_count: gpu.zeros(f_n)?,
            near_h: gpu.zeros(f_n)?,
        })
    };
    let mut layers: Vec<(DeviceCodes, WindowStats)> = Vec::with_capacity(l_n);
    match cfg.activation {
        Activation::JumpRelu => {
            for l in 0..l_n {
                layers.push(encode::jumprelu(
                    gpu,
                    &input(l),
                    &theta[l],
                    0.5 * obj.bandwidth,
                    CAP_GUESS,
                )?);
            }
        }
        Activation::TopK { k } => {
            for l in 0..l_n {
                let h = encode::dense(gpu, &input(l))?;
                layers.push((topk::topk_rows(gpu, &h, n_tokens, f_n, k)?, empty_window()?));
            }
        }
        Activation::BatchTopK { k, across_layers } => {
            let per = n_tokens * f_n;
            let h = gpu.output::<f32>(l_n * per)?;
            for l in 0..l_n {
                encode::dense_into(gpu, &input(l), &h, l * per)?;
            }
            for c in topk::batch_topk(gpu, &h, l_n, n_tokens, f_n, k, across_layers)? {
                layers.push((c, empty_window()?));
            }
        }
    }

    // Decode, residual, squared errors.
    let cross = cfg.decoder == DecoderKind::CrossLayer;
    let views: Vec<DecodeLayer> = (0..l_n)
        .map(|l| DecodeLayer {
            codes: &layers[l].0,
            w_dec: &w_dec[l],
            row_len: cfg.dec_row_len(l),
        })
        .collect();
    // A shard's partial includes the replicated decoder bias only where `with_bias`.
    let zeros;
    let bias = match &shard {
        Some(s) if !s.with_bias => {
            zeros = gpu.zeros(l_n * d)?;
            &zeros
        }
        _ => &dp.b_dec,
    };
    // A shard's partial carries the skip term where it carries the bias: the sum over the shards is then
    // the whole reconstruction with it (the CPU adds it after the sum; the same terms).
    let skip_here = cfg.skip && shard.as_ref().is_none_or(|s| s.with_bias);
    let skip_layer = |l: usize, out: ((u64, usize), usize, usize)| -> Result<()> {
        if skip_here {
            super::skip::add_skip_layer(gpu, &dp.w_skip, x_bf, l, out, n_tokens, d)?;
        }
        Ok(())
    };
    let (resid, sq_err) = match shard {
        None if cfg.skip => {
            // The skip term joins the reconstruction before the residual (as on the CPU).
            let out = decode(gpu, &views, &dp.b_dec, None, d, cross, 2.0 / bf)?;
            super::skip::add_skip(gpu, &dp.w_skip, x_bf, &out.yhat, n_tokens, d)?;
            let (resid, sq) =
                residual(gpu, &out.yhat, false, &batch.y, n_tokens, l_n, d, 2.0 / bf)?;
            (resid, per_layer_sq_err(&gpu.download(&sq)?, n_tokens, l_n))
        }
        None => {
            let out = decode(gpu, &views, &dp.b_dec, Some(&batch.y), d, cross, 2.0 / bf)?;
            let resid = out.resid.expect("decode with targets gives residuals");
            let sq = gpu.download(
                &out.sq_err
                    .expect("decode with targets gives squared errors"),
            )?;
            (resid, per_layer_sq_err(&sq, n_tokens, l_n))
        }
        Some(ShardSum {
            y,
            sum: PartialSum::Host(mut sum),
            ..
        }) => {
            let out = decode(gpu, &views, bias, None, d, cross, 2.0 / bf)?;
            if skip_here {
                super::skip::add_skip(gpu, &dp.w_skip, x_bf, &out.yhat, n_tokens, d)?;
            }
            let mut yhat = gpu.download(&out.yhat)?;
            sum(&mut yhat)?;
            let (r, sq_err) = crate::backend::cpu::sparse::residual(&yhat, y, n_tokens, l_n, d);
            (gpu.upload(&r)?, sq_err)
        }
        Some(ShardSum {
            sum: PartialSum::Device(mut sum),
            ..
        }) => {
            let mut out = decode(gpu, &views, bias, None, d, cross, 2.0 / bf)?;
            if skip_here {
                super::skip::add_skip(gpu, &dp.w_skip, x_bf, &out.yhat, n_tokens, d)?;
            }
            sum(&mut out.yhat)?;
            let (resid, sq) =
                residual(gpu, &out.yhat, false, &batch.y, n_tokens, l_n, d, 2.0 / bf)?;
            (resid, per_layer_sq_err(&gpu.download(&sq)?, n_tokens, l_n))
        }
        Some(ShardSum {
            y,
            sum: PartialSum::HostParts(mut sum),
            ..
        }) => {
            let yhat_dev = gpu.output::<f32>(n_tokens * row)?;
            let yhat_at = (yhat_dev.ptr(gpu), yhat_dev.len());
            let plan = PartialDecode::new(gpu, &views, bias, d, cross, &yhat_dev)?;
            let block = n_tokens * d;
            let mut parts: Vec<Vec<f32>> = (0..l_n).map(|_| vec![0.0; block]).collect();
            // `fill` cannot fail inside the collective (the other ranks are in it): the first error is
            // kept and returned after it.
            let mut failed: Option<Error> = None;
            sum(&mut parts, &mut |l, part| {
                if failed.is_none()
                    && let Err(e) = plan
                        .layer(l)
                        .and_then(|()| skip_layer(l, (yhat_at, l * block, d)))
                        .and_then(|()| gpu.download_into(&yhat_dev, l * block, part))
                {
                    failed = Some(e);
                }
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
            let mut yhat = vec![0.0; n_tokens * row];
            crate::backend::cpu::sparse::layer_blocks_into(&parts, d, &mut yhat);
            let (r, sq_err) = crate::backend::cpu::sparse::residual(&yhat, y, n_tokens, l_n, d);
            (gpu.upload(&r)?, sq_err)
        }
        Some(ShardSum {
            sum: PartialSum::DeviceParts(mut sum),
            ..
        }) => {
            let mut yhat = gpu.output::<f32>(n_tokens * row)?;
            let plan = PartialDecode::new(gpu, &views, bias, d, cross, &yhat)?;
            // Each layer's skip term goes into its layer-major block (`B·d`, rows `d` apart) while the
            // all-reduce holds the buffer: by address, queued before NCCL's stream follows the compute one.
            let (block, yhat_at) = (n_tokens * d, (yhat.ptr(gpu), yhat.len()));
            sum(&mut yhat, l_n, &mut |l| {
                plan.layer(l)?;
                skip_layer(l, (yhat_at, l * block, d))
            })?;
            let (resid, sq) = residual(gpu, &yhat, true, &batch.y, n_tokens, l_n, d, 2.0 / bf)?;
            (resid, per_layer_sq_err(&gpu.download(&sq)?, n_tokens, l_n))
        }
    };
    let mut stats = StepStats {
        n_tokens,
        recon: sq_err.iter().sum::<f64>() / bf as f64,
        sq_err,
        ..Default::default()
    };

    // Backward, layer by layer.
    let mask_dev: Vec<Option<DBuf<u8>>> = match preact_mask {
        Some(m) => m
            .iter()
            .map(|ml| {
                let bytes: Vec<u8> = ml.iter().map(|v| *v as u8).collect();
                gpu.upload(&bytes).map(Some)
            })
            .collect::<Result<_>>()?,
        None => (0..l_n).map(|_| None).collect(),
    };
    // Every layer's backward and the decoder-bias gradient are queued before any statistic is read back,
    // so the device runs them back to back; the downloads after them wait once for the lot.
    let mut layer_grads = Vec::with_capacity(l_n);
    for (l, (codes, window)) in layers.iter().enumerate() {
        layer_grads.push(backward::layer_grads(
            gpu,
            &LayerGradInput {
                codes,
                window,
                w_dec: &w_dec[l],
                row_len: cfg.dec_row_len(l),
                n_features: f_n,
                norms: &norms[l],
                theta: &theta[l],
                x: &batch.x,
                resid: &resid,
                layer: l,
                n_layers: l_n,
                d,
                preact_mask: mask_dev[l].as_ref(),
                obj: *obj,
                jump,
            },
        )?);
    }
    let b_dec = (0..l_n)
        .map(|k| col_sum(gpu, &resid, k * d, row, n_tokens, d))
        .collect::<Result<_>>()?;
    let w_skip = if cfg.skip {
        super::skip::skip_grads(gpu, &resid, x_bf, n_tokens, l_n, d)?
    } else {
        Vec::new()
    };
    for (l, (g, (_, window))) in layer_grads.iter().zip(&layers).enumerate() {
        let active = gpu.download(&g.active_count)?;
        let spars: f64 = gpu.download(&g.sparsity)?.iter().map(|v| *v as f64).sum();
        stats.sparsity += spars * obj.lambda as f64 / bf as f64;
        if jump {
            let ps = gpu.download(&window.preact_sum)?;
            let p: f64 = ps
                .iter()
                .zip(&gpu.download(&norms[l])?)
                .enumerate()
                .filter(|(f, _)| preact_mask.is_none_or(|m| m[l][*f]))
                .map(|(_, (s, n))| *s as f64 * *n as f64)
                .sum();
            stats.preact += p * obj.lambda_preact as f64 / bf as f64;
        }
        stats
            .n_active
            .push(active.iter().map(|v| *v as usize).sum());
        let near = gpu.download(&window.near_count)?;
        stats.n_window.push(near.iter().map(|v| *v as usize).sum());
        stats.active_count.push(active);
    }
    Ok((
        stats,
        DeviceGrads {
            layers: layer_grads,
            b_dec,
            w_skip,
        },
    ))
}

/// Per layer, the sum over tokens (in token order, f64) of the `[B][L]` squared errors.
fn per_layer_sq_err(sq: &[f32], n_tokens: usize, l_n: usize) -> Vec<f64> {
    let mut sq_err = vec![0.0f64; l_n];
    for b in 0..n_tokens {
        for (k, s) in sq_err.iter_mut().enumerate() {
            *s += sq[b * l_n + k] as f64;
        }
    }
    sq_err
}

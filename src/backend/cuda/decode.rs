//! Sparse cross-layer decode fused with the residual `r = scale · (ŷ − y)` and the per-(token, layer)
//! squared error: one block per (token, target layer), bf16 decoder rows, fp32 accumulation. And
//! [`residual`] alone, for a feature shard whose partial reconstruction is completed by an all-reduce
//! between its decode and its residual; [`PartialDecode`], that partial decoded one target layer at a time
//! (layer-major), so that each layer's all-reduce can run while the next decodes. Under the tiled kernels,
//! [`sparse_decode_tiled`] stages decoder slices in shared memory and walks the tokens in [`decode_order`]'s
//! order (longest lists first), with the same bits as the gather.
//!
//! CPU reference: [`crate::backend::cpu::sparse::decode`] and [`crate::backend::cpu::sparse::residual`]
//! (without the skip connection).

use super::context::{Gpu, Module};
use super::encode::DeviceCodes;
use super::ffi::{CltDecodeParams, CltLayerView, CltResidualParams};
use super::memory::DBuf;
use crate::backend::SparseKernels;
use crate::{Error, Result};
use cudarc::driver::LaunchConfig;

/// One source layer: its codes and its bf16 decoder `[F][row_len]`.
pub struct DecodeLayer<'a> {
    pub codes: &'a DeviceCodes,
    pub w_dec: &'a DBuf<u16>,
    pub row_len: usize,
}

/// What the decode produced: `ŷ`, and with targets the residual and squared errors.
pub struct DecodeOut {
    /// `[B][L][d]`.
    pub yhat: DBuf<f32>,
    /// `[B][L][d]`, `resid_scale · (ŷ − y)`.
    pub resid: Option<DBuf<f32>>,
    /// `[B][L]`, `Σ_i (ŷ − y)²`.
    pub sq_err: Option<DBuf<f32>>,
}

/// Decodes a batch. `b_dec` is `[L][d]`; `y` (optional) is `[B][L][d]`.
pub fn sparse_decode(
    gpu: &Gpu,
    layers: &[DecodeLayer],
    b_dec: &DBuf<f32>,
    y: Option<&DBuf<f32>>,
    d: usize,
    cross_layer: bool,
    resid_scale: f32,
) -> Result<DecodeOut> {
    let (b_n, l_n) = check_layers(layers, b_dec, d, cross_layer)?;
    check_targets(y, b_n * l_n * d)?;
    let views = upload_views(gpu, layers)?;
    let yhat = gpu.output::<f32>(b_n * l_n * d)?;
    let resid = y.map(|_| gpu.output::<f32>(b_n * l_n * d)).transpose()?;
    let sq_err = y.map(|_| gpu.output::<f32>(b_n * l_n)).transpose()?;
    let p = CltDecodeParams {
        y: y.map_or(0, |y| y.ptr(gpu)),
        resid: resid.as_ref().map_or(0, |r| r.ptr(gpu)),
        sq_err: sq_err.as_ref().map_or(0, |r| r.ptr(gpu)),
        resid_scale,
        ..base_params(
            gpu,
            &views,
            layers,
            b_dec,
            &yhat,
            (b_n, l_n, d),
            cross_layer,
        )
    };
    launch_decode(gpu, &p, b_n, l_n)?;
    // `views` is freed on return, in stream order after the launch (no sync).
    Ok(DecodeOut {
        yhat,
        resid,
        sq_err,
    })
}

/// Checks that the targets `y`, where given, hold `n` (= B·L·d) values.
fn check_targets(y: Option<&DBuf<f32>>, n: usize) -> Result<()> {
    match y {
        Some(y) if y.len() != n => Err(Error::Shape {
            what: "CUDA decode y".into(),
            expected: vec![n],
            got: vec![y.len()],
        }),
        _ => Ok(()),
    }
}

/// Checks the layers' shapes against each other and `b_dec`; returns (tokens, layers).
fn check_layers(
    layers: &[DecodeLayer],
    b_dec: &DBuf<f32>,
    d: usize,
    cross_layer: bool,
) -> Result<(usize, usize)> {
    let l_n = layers.len();
    let b_n = layers.first().map_or(0, |l| l.codes.n_tokens);
    for (l, v) in layers.iter().enumerate() {
        let want = if cross_layer { (l_n - l) * d } else { d };
        if v.codes.n_tokens != b_n || v.row_len != want || v.w_dec.len() % want != 0 {
            return Err(Error::Shape {
                what: format!("CUDA decode layer {l} (tokens, row length)"),
                expected: vec![b_n, want],
                got: vec![v.codes.n_tokens, v.row_len],
            });
        }
    }
    if b_dec.len() != l_n * d {
        return Err(Error::Shape {
            what: "CUDA decode b_dec".into(),
            expected: vec![l_n * d],
            got: vec![b_dec.len()],
        });
    }
    Ok((b_n, l_n))
}

/// Rows of the layers' decoders (the most of any layer; a CLT's layers all have the same).
fn n_features(layers: &[DecodeLayer]) -> usize {
    layers
        .iter()
        .map(|v| v.w_dec.len() / v.row_len.max(1))
        .max()
        .unwrap_or(0)
}

/// What every decode launch shares: the layers' views, the bias, ŷ (token-major) and the shape `(B, L, d)`;
/// no targets, no residual, from target layer 0.
fn base_params(
    gpu: &Gpu,
    views: &DBuf<CltLayerView>,
    layers: &[DecodeLayer],
    b_dec: &DBuf<f32>,
    yhat: &DBuf<f32>,
    (b_n, l_n, d): (usize, usize, usize),
    cross_layer: bool,
) -> CltDecodeParams {
    CltDecodeParams {
        layers: views.ptr(gpu),
        b_dec: b_dec.ptr(gpu),
        yhat: yhat.ptr(gpu),
        n_tokens: b_n as u32,
        n_layers: l_n as u32,
        d: d as u32,
        cross_layer: cross_layer as u32,
        n_features: n_features(layers) as u32,
        ..Default::default()
    }
}

/// Whether `sparse_kernels = "tiled"` runs the tiled kernels for rows of `d` columns (the decode's and the
/// backward's): where d is a multiple of 8 (16-byte rows of bf16); the gathers run otherwise.
pub fn tiled_applies(d: usize) -> bool {
    d.is_multiple_of(8)
}

/// The decode the device's [`SparseKernels`] choose: [`sparse_decode_tiled`] where it is chosen and `d` is
/// a multiple of 8, else [`sparse_decode`]. The same bits either way.
pub fn decode(
    gpu: &Gpu,
    layers: &[DecodeLayer],
    b_dec: &DBuf<f32>,
    y: Option<&DBuf<f32>>,
    d: usize,
    cross_layer: bool,
    resid_scale: f32,
) -> Result<DecodeOut> {
    if gpu.sparse_kernels() == SparseKernels::Tiled && tiled_applies(d) {
        sparse_decode_tiled(gpu, layers, b_dec, y, d, cross_layer, resid_scale)
    } else {
        sparse_decode(gpu, layers, b_dec, y, d, cross_layer, resid_scale)
    }
}

/// Tokens per block of `sparse_decode_tiled` (256 threads × 4 tokens each), and features whose weight
/// slices it stages at a time (in each of its two buffers).
pub const TILE_TOKENS: usize = 1024;
pub const TILE_FEATURES: usize = 2048;

/// The order in which `sparse_decode_tiled` hands the tokens to its threads (a thread owns 4 consecutive
/// positions, a block 1,024). Either gives the same bits: a token's sums do not depend on its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenOrder {
    /// [`decode_order`]'s, for each target layer: longest lists first, so that a warp's walks, and a
    /// block's, are of about one length (the default).
    ByLength,
    /// The batch's (the bench's baseline).
    Batch,
}

/// [`sparse_decode`]'s result through `sparse_decode_tiled`, then the `residual` kernel: the same bits
/// (the lists must be in increasing feature order, as [`DeviceCodes`] promises). A block owns
/// 1,024 tokens × 8 columns of one target layer and stages each feature's 8 weights in shared memory once
/// for all its tokens, where `sparse_decode` fetches a weight once per token that lists the feature
/// (docs/cuda.md, "What today's sparse kernels gather"); the tokens in [`decode_order`]'s order. Needs `d`
/// a multiple of 8 and every layer with the same number of features.
pub fn sparse_decode_tiled(
    gpu: &Gpu,
    layers: &[DecodeLayer],
    b_dec: &DBuf<f32>,
    y: Option<&DBuf<f32>>,
    d: usize,
    cross_layer: bool,
    resid_scale: f32,
) -> Result<DecodeOut> {
    let targets = Targets {
        y,
        d,
        cross_layer,
        resid_scale,
    };
    sparse_decode_tiled_in(gpu, layers, b_dec, &targets, TokenOrder::ByLength)
}

/// What a decode reconstructs: its targets `y` (optional, `[B][L][d]`), `d`, the decoder's kind and the
/// residual's scale.
pub struct Targets<'a> {
    pub y: Option<&'a DBuf<f32>>,
    pub d: usize,
    pub cross_layer: bool,
    pub resid_scale: f32,
}

/// [`sparse_decode_tiled`] with the tokens in `order`.
pub fn sparse_decode_tiled_in(
    gpu: &Gpu,
    layers: &[DecodeLayer],
    b_dec: &DBuf<f32>,
    targets: &Targets,
    order: TokenOrder,
) -> Result<DecodeOut> {
    let Targets {
        y,
        d,
        cross_layer,
        resid_scale,
    } = *targets;
    let (b_n, l_n) = check_layers(layers, b_dec, d, cross_layer)?;
    check_tiled(layers, d)?;
    check_targets(y, b_n * l_n * d)?;
    let views = upload_views(gpu, layers)?;
    let yhat = gpu.output::<f32>(b_n * l_n * d)?;
    let order_buf = match order {
        TokenOrder::ByLength => Some(gpu.output::<u32>(l_n * b_n)?),
        TokenOrder::Batch => None,
    };
    let p = CltDecodeParams {
        order: order_buf.as_ref().map_or(0, |o| o.ptr(gpu)),
        ..base_params(
            gpu,
            &views,
            layers,
            b_dec,
            &yhat,
            (b_n, l_n, d),
            cross_layer,
        )
    };
    if order_buf.is_some() {
        launch_decode_order(gpu, &p, l_n)?;
    }
    launch_decode_tiled(gpu, &p, l_n)?;
    let (resid, sq_err) = match y {
        Some(y) => {
            let (r, s) = residual(gpu, &yhat, false, y, b_n, l_n, d, resid_scale)?;
            (Some(r), Some(s))
        }
        None => (None, None),
    };
    Ok(DecodeOut {
        yhat,
        resid,
        sq_err,
    })
}

/// What the tiled decode needs beyond [`check_layers`]: d a multiple of 8 and the same number of features
/// in every layer (so that [`base_params`]' `n_features` is every layer's).
fn check_tiled(layers: &[DecodeLayer], d: usize) -> Result<()> {
    let f_n = n_features(layers);
    if !d.is_multiple_of(8) {
        return Err(Error::Unsupported(format!(
            "the tiled decode needs d to be a multiple of 8 (got {d})"
        )));
    }
    if let Some(l) = layers.iter().position(|v| v.w_dec.len() != f_n * v.row_len) {
        return Err(Error::Shape {
            what: format!("CUDA tiled decode: layer {l}'s decoder rows (features of every layer)"),
            expected: vec![f_n * layers[l].row_len],
            got: vec![layers[l].w_dec.len()],
        });
    }
    Ok(())
}

/// For each target layer k, the tokens in the order `sparse_decode_tiled` walks them (`[L][B]`, row k a
/// permutation of `0..B`): by the number of entries it adds for them (their lists' lengths, each capped at
/// its layer's `cap`, summed over the source layers that reach k), longest first, lengths within an eighth
/// of each other in one bucket (any order inside a bucket). Counts only: the decoders are not read.
pub fn decode_order(gpu: &Gpu, layers: &[DecodeLayer], cross_layer: bool) -> Result<DBuf<u32>> {
    let l_n = layers.len();
    let b_n = layers.first().map_or(0, |l| l.codes.n_tokens);
    if let Some(l) = layers.iter().position(|v| v.codes.n_tokens != b_n) {
        return Err(Error::Shape {
            what: format!("CUDA decode order: layer {l}'s tokens"),
            expected: vec![b_n],
            got: vec![layers[l].codes.n_tokens],
        });
    }
    let views = upload_views(gpu, layers)?;
    let order = gpu.output::<u32>(l_n * b_n)?;
    let p = CltDecodeParams {
        layers: views.ptr(gpu),
        order: order.ptr(gpu),
        n_tokens: b_n as u32,
        n_layers: l_n as u32,
        cross_layer: cross_layer as u32,
        ..Default::default()
    };
    launch_decode_order(gpu, &p, l_n)?;
    Ok(order)
}

/// Queues `decode_order` for `n_targets` target layers from `p.first_layer` (a block each).
fn launch_decode_order(gpu: &Gpu, p: &CltDecodeParams, n_targets: usize) -> Result<()> {
    if p.n_tokens as usize * n_targets == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (n_targets as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.launch(Module::Decode, "decode_order", cfg, p)
}

/// Queues `sparse_decode_tiled` for `n_targets` target layers from `p.first_layer`.
fn launch_decode_tiled(gpu: &Gpu, p: &CltDecodeParams, n_targets: usize) -> Result<()> {
    let (b_n, d, f_n) = (p.n_tokens as usize, p.d as usize, p.n_features as usize);
    if b_n * n_targets * d == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (
            (d / 8) as u32,
            b_n.div_ceil(TILE_TOKENS) as u32,
            n_targets as u32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: (2 * 16 * f_n.clamp(1, TILE_FEATURES)) as u32,
    };
    gpu.launch(Module::Decode, "sparse_decode_tiled", cfg, p)
}

/// The layers' views as the kernel reads them, on the device. The kernels read 8 weights at a time with
/// 16-byte loads where d is a multiple of 8, so every decoder must start 16-byte aligned (a buffer of its
/// own always does).
fn upload_views(gpu: &Gpu, layers: &[DecodeLayer]) -> Result<DBuf<CltLayerView>> {
    if let Some(l) = layers
        .iter()
        .position(|v| !v.w_dec.ptr(gpu).is_multiple_of(16))
    {
        return Err(Error::Unsupported(format!(
            "decoder of layer {l} not 16-byte aligned on the device"
        )));
    }
    let views: Vec<CltLayerView> = layers
        .iter()
        .map(|v| CltLayerView {
            count: v.codes.count.ptr(gpu),
            feat: v.codes.feat.ptr(gpu),
            act: v.codes.act.ptr(gpu),
            w_dec: v.w_dec.ptr(gpu),
            row_len: v.row_len as u32,
            cap: v.codes.cap as u32,
        })
        .collect();
    gpu.upload(&views)
}

/// Queues the decode of `n_targets` target layers from `p.first_layer` (one block per token and layer).
fn launch_decode(gpu: &Gpu, p: &CltDecodeParams, b_n: usize, n_targets: usize) -> Result<()> {
    if b_n * n_targets == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (b_n as u32, n_targets as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.launch(Module::Decode, "sparse_decode", cfg, p)
}

/// A feature shard's partial reconstruction decoded one target layer at a time into a layer-major `[L][B][d]`
/// buffer, so that each layer's block is contiguous and its all-reduce over the shards can run while the next
/// layer decodes. [`PartialDecode::layer`] only queues work on the stream; the buffer is the caller's (the
/// plan keeps its address, so the caller may hand the buffer to the all-reduce while layers decode into it).
/// Under the device's tiled kernels (and d a multiple of 8) each layer goes through `sparse_decode_tiled`:
/// the same bits.
pub struct PartialDecode<'g> {
    gpu: &'g Gpu,
    /// The device array `p.layers` points to (its free on drop is stream-ordered, after the launches).
    _views: DBuf<CltLayerView>,
    /// `[L][B]`: the tiled decode's token order (`p.order` points to it; `decode_order` fills row k before
    /// layer k decodes), where the layers go through the tiled decode.
    _order: Option<DBuf<u32>>,
    p: CltDecodeParams,
    /// Whether each layer goes through the tiled decode.
    tiled: bool,
}

impl<'g> PartialDecode<'g> {
    /// A plan that decodes `layers` (with `b_dec`, which a shard passes as zeros where another adds the
    /// bias) into `yhat`, which must hold `B·L·d` elements.
    pub fn new(
        gpu: &'g Gpu,
        layers: &[DecodeLayer],
        b_dec: &DBuf<f32>,
        d: usize,
        cross_layer: bool,
        yhat: &DBuf<f32>,
    ) -> Result<Self> {
        let kernels = gpu.sparse_kernels();
        Self::with_kernels(gpu, layers, b_dec, d, cross_layer, yhat, kernels)
    }

    /// [`PartialDecode::new`] with the kernels given rather than the device's.
    pub fn with_kernels(
        gpu: &'g Gpu,
        layers: &[DecodeLayer],
        b_dec: &DBuf<f32>,
        d: usize,
        cross_layer: bool,
        yhat: &DBuf<f32>,
        kernels: SparseKernels,
    ) -> Result<Self> {
        let (b_n, l_n) = check_layers(layers, b_dec, d, cross_layer)?;
        if yhat.len() != b_n * l_n * d {
            return Err(Error::Shape {
                what: "CUDA partial decode yhat".into(),
                expected: vec![b_n * l_n * d],
                got: vec![yhat.len()],
            });
        }
        let tiled = kernels == SparseKernels::Tiled && tiled_applies(d);
        if tiled {
            check_tiled(layers, d)?;
        }
        let views = upload_views(gpu, layers)?;
        let order = tiled.then(|| gpu.output::<u32>(l_n * b_n)).transpose()?;
        let p = CltDecodeParams {
            yhat_layer_major: 1,
            order: order.as_ref().map_or(0, |o| o.ptr(gpu)),
            ..base_params(gpu, &views, layers, b_dec, yhat, (b_n, l_n, d), cross_layer)
        };
        Ok(PartialDecode {
            gpu,
            _views: views,
            _order: order,
            p,
            tiled,
        })
    }

    /// The number of target layers.
    pub fn n_layers(&self) -> usize {
        self.p.n_layers as usize
    }

    /// Queues the decode of target layer `k` (block `k` of the layer-major buffer).
    pub fn layer(&self, k: usize) -> Result<()> {
        if k >= self.n_layers() {
            return Err(Error::Shape {
                what: "CUDA partial decode target layer (layers, asked)".into(),
                expected: vec![self.n_layers()],
                got: vec![k],
            });
        }
        let p = CltDecodeParams {
            first_layer: k as u32,
            ..self.p
        };
        if self.tiled {
            launch_decode_order(self.gpu, &p, 1)?;
            launch_decode_tiled(self.gpu, &p, 1)
        } else {
            launch_decode(self.gpu, &p, self.p.n_tokens as usize, 1)
        }
    }
}

/// The residual `scale · (ŷ − y)` (`[B][L][d]`) and the per-(token, layer) squared error (`[B][L]`) of a
/// reconstruction `yhat` made elsewhere: the arithmetic of [`sparse_decode`]'s epilogue, to the bit. With
/// `yhat_layer_major`, `yhat` is `[L][B][d]` ([`PartialDecode`]'s layout); `y` and the outputs are
/// token-major either way.
#[allow(clippy::too_many_arguments)]
pub fn residual(
    gpu: &Gpu,
    yhat: &DBuf<f32>,
    yhat_layer_major: bool,
    y: &DBuf<f32>,
    n_tokens: usize,
    n_layers: usize,
    d: usize,
    resid_scale: f32,
) -> Result<(DBuf<f32>, DBuf<f32>)> {
    let n = n_tokens * n_layers * d;
    if yhat.len() != n || y.len() != n {
        return Err(Error::Shape {
            what: "CUDA residual (yhat, y)".into(),
            expected: vec![n, n],
            got: vec![yhat.len(), y.len()],
        });
    }
    let resid = gpu.output::<f32>(n)?;
    let sq_err = gpu.output::<f32>(n_tokens * n_layers)?;
    if n_tokens * n_layers == 0 {
        return Ok((resid, sq_err));
    }
    let p = CltResidualParams {
        yhat: yhat.ptr(gpu),
        y: y.ptr(gpu),
        resid: resid.ptr(gpu),
        sq_err: sq_err.ptr(gpu),
        n_tokens: n_tokens as u32,
        n_layers: n_layers as u32,
        d: d as u32,
        resid_scale,
        yhat_layer_major: yhat_layer_major as u32,
        pad0: 0,
    };
    let cfg = LaunchConfig {
        grid_dim: (n_tokens as u32, n_layers as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.launch(Module::Decode, "residual", cfg, &p)?;
    Ok((resid, sq_err))
}

//! Sparse cross-layer decode fused with the residual `r = scale · (ŷ − y)` and the per-(token, layer)
//! squared error: one block per (token, target layer), bf16 decoder rows, fp32 accumulation. And
//! [`residual`] alone, for a feature shard whose partial reconstruction is completed by an all-reduce
//! between its decode and its residual.
//!
//! CPU reference: [`crate::backend::cpu::sparse::decode`] and [`crate::backend::cpu::sparse::residual`]
//! (without the skip connection).

use super::context::{Gpu, Module};
use super::encode::DeviceCodes;
use super::ffi::{CltDecodeParams, CltLayerView, CltResidualParams};
use super::memory::DBuf;
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
    if b_dec.len() != l_n * d || y.is_some_and(|y| y.len() != b_n * l_n * d) {
        return Err(Error::Shape {
            what: "CUDA decode b_dec / y".into(),
            expected: vec![l_n * d, b_n * l_n * d],
            got: vec![b_dec.len(), y.map_or(0, |y| y.len())],
        });
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
    let views = gpu.upload(&views)?;
    let yhat = gpu.output::<f32>(b_n * l_n * d)?;
    let resid = y.map(|_| gpu.output::<f32>(b_n * l_n * d)).transpose()?;
    let sq_err = y.map(|_| gpu.output::<f32>(b_n * l_n)).transpose()?;
    let p = CltDecodeParams {
        layers: views.ptr(gpu),
        b_dec: b_dec.ptr(gpu),
        y: y.map_or(0, |y| y.ptr(gpu)),
        yhat: yhat.ptr(gpu),
        resid: resid.as_ref().map_or(0, |r| r.ptr(gpu)),
        sq_err: sq_err.as_ref().map_or(0, |r| r.ptr(gpu)),
        n_tokens: b_n as u32,
        n_layers: l_n as u32,
        d: d as u32,
        cross_layer: cross_layer as u32,
        resid_scale,
        pad0: 0,
    };
    let cfg = LaunchConfig {
        grid_dim: (b_n as u32, l_n as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.launch(Module::Decode, "sparse_decode", cfg, &p)?;
    gpu.sync()?; // `views` is freed on return
    Ok(DecodeOut {
        yhat,
        resid,
        sq_err,
    })
}

/// The residual `scale · (ŷ − y)` (`[B][L][d]`) and the per-(token, layer) squared error (`[B][L]`) of a
/// reconstruction `yhat` made elsewhere: the arithmetic of [`sparse_decode`]'s epilogue, to the bit.
pub fn residual(
    gpu: &Gpu,
    yhat: &DBuf<f32>,
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
    };
    let cfg = LaunchConfig {
        grid_dim: (n_tokens as u32, n_layers as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.launch(Module::Decode, "residual", cfg, &p)?;
    Ok((resid, sq_err))
}

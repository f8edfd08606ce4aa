//! Fused Adam with fp32 moments (the decoder's two-part gradient applied in one pass per row, which also
//! refreshes the bf16 copy and the row norm), decoder norms, and the sums of squares of the clipping norm.
//!
//! CPU reference: [`crate::backend::cpu::adam::step`] and [`crate::backend::cpu::adam::grad_norm`],
//! [`crate::clt::params::decoder_norms`].

use super::context::{Gpu, Module, grid_1d, per_item};
use super::ffi::{
    CltAdamConsts, CltAdamDecoderParams, CltAdamParams, CltDecGradSqParams, CltRowNormParams,
    CltSumSqParams,
};
use super::memory::DBuf;
use crate::backend::cpu::adam::AdamHyper;
use crate::{Error, Result};

/// The constants of update number `t` (1-based) at learning rate `lr`, gradient scaled by `scale`.
pub fn consts(hp: &AdamHyper, t: u64, lr: f32, scale: f32) -> CltAdamConsts {
    let t = t as i32;
    CltAdamConsts {
        lr,
        scale,
        beta1: hp.beta1,
        beta2: hp.beta2,
        eps: hp.eps,
        bc1: 1.0 - hp.beta1.powi(t),
        bc2_sqrt: (1.0 - hp.beta2.powi(t)).sqrt(),
        pad0: 0,
    }
}

fn same_len(what: &str, lens: &[usize]) -> Result<()> {
    if lens.iter().any(|l| *l != lens[0]) {
        return Err(Error::Shape {
            what: what.into(),
            expected: vec![lens[0]; lens.len()],
            got: lens.to_vec(),
        });
    }
    Ok(())
}

/// `p, m, v ← Adam(p, m, v, g)` elementwise.
pub fn adam_dense(
    gpu: &Gpu,
    p: &DBuf<f32>,
    m: &DBuf<f32>,
    v: &DBuf<f32>,
    g: &DBuf<f32>,
    k: CltAdamConsts,
) -> Result<()> {
    same_len(
        "CUDA Adam (p, m, v, g)",
        &[p.len(), m.len(), v.len(), g.len()],
    )?;
    let prm = CltAdamParams {
        p: p.ptr(gpu),
        m: m.ptr(gpu),
        v: v.ptr(gpu),
        g: g.ptr(gpu),
        n: p.len() as u64,
        k,
    };
    let mut cfg = grid_1d(p.len(), 256);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(65_535);
    gpu.launch(Module::Adam, "adam_dense", cfg, &prm)
}

/// The decoder's update: per row, `g = touched · gs + coef · p`, Adam, bf16 copy (when given), new norm.
#[allow(clippy::too_many_arguments)]
pub fn adam_decoder(
    gpu: &Gpu,
    p: &DBuf<f32>,
    m: &DBuf<f32>,
    v: &DBuf<f32>,
    gs: &DBuf<f32>,
    coef: &DBuf<f32>,
    touched: &DBuf<u8>,
    p_bf16: Option<&DBuf<u16>>,
    norms: &DBuf<f32>,
    row_len: usize,
    k: CltAdamConsts,
) -> Result<()> {
    let f_n = coef.len();
    same_len(
        "CUDA decoder Adam (p, m, v, gs, F × row_len)",
        &[p.len(), m.len(), v.len(), gs.len(), f_n * row_len],
    )?;
    same_len(
        "CUDA decoder Adam (coef, touched, norms)",
        &[f_n, touched.len(), norms.len()],
    )?;
    let prm = CltAdamDecoderParams {
        p: p.ptr(gpu),
        m: m.ptr(gpu),
        v: v.ptr(gpu),
        gs: gs.ptr(gpu),
        coef: coef.ptr(gpu),
        touched: touched.ptr(gpu),
        p_bf16: p_bf16.map_or(0, |b| b.ptr(gpu)),
        norms: norms.ptr(gpu),
        n_features: f_n as u32,
        row_len: row_len as u32,
        k,
    };
    gpu.launch(Module::Adam, "adam_decoder", per_item(f_n, 256), &prm)
}

/// Norms of the rows of `w` (`[rows][row_len]`), and its bf16 copy when `w_bf16` is given.
pub fn row_norms(
    gpu: &Gpu,
    w: &DBuf<f32>,
    row_len: usize,
    w_bf16: Option<&DBuf<u16>>,
) -> Result<DBuf<f32>> {
    let rows = w.len() / row_len.max(1);
    let norms = gpu.output::<f32>(rows)?;
    let p = CltRowNormParams {
        w: w.ptr(gpu),
        norms: norms.ptr(gpu),
        w_bf16: w_bf16.map_or(0, |b| b.ptr(gpu)),
        rows: rows as u32,
        row_len: row_len as u32,
    };
    gpu.launch(Module::Adam, "row_norms", per_item(rows, 256), &p)?;
    Ok(norms)
}

/// `Σ x²` (f64 partials per block, summed in block order on the host).
pub fn sum_sq(gpu: &Gpu, x: &DBuf<f32>) -> Result<f64> {
    let blocks = x.len().div_ceil(256).clamp(1, 1024);
    let partial = gpu.output::<f64>(blocks)?;
    let p = CltSumSqParams {
        x: x.ptr(gpu),
        partial: partial.ptr(gpu),
        n: x.len() as u64,
    };
    gpu.launch(Module::Adam, "sum_sq", per_item(blocks, 256), &p)?;
    Ok(gpu.download(&partial)?.iter().sum())
}

/// `Σ_f ‖g_f‖²` of the decoder gradient with its norm terms.
pub fn dec_grad_sq(
    gpu: &Gpu,
    gs: &DBuf<f32>,
    w: &DBuf<f32>,
    coef: &DBuf<f32>,
    touched: &DBuf<u8>,
    row_len: usize,
) -> Result<f64> {
    let f_n = coef.len();
    same_len(
        "CUDA decoder gradient norm",
        &[gs.len(), w.len(), f_n * row_len],
    )?;
    let out = gpu.output::<f64>(f_n)?;
    let p = CltDecGradSqParams {
        gs: gs.ptr(gpu),
        w: w.ptr(gpu),
        coef: coef.ptr(gpu),
        touched: touched.ptr(gpu),
        out: out.ptr(gpu),
        n_features: f_n as u32,
        row_len: row_len as u32,
    };
    gpu.launch(Module::Adam, "dec_grad_sq", per_item(f_n, 256), &p)?;
    Ok(gpu.download(&out)?.iter().sum())
}

//! Fused Adam with fp32 moments (the decoder's two-part gradient applied in one pass per row, which also
//! refreshes the bf16 copy and the row norm), decoder norms, and the sums of squares of the clipping norm.
//!
//! CPU reference: [`crate::backend::cpu::adam::step`] and [`crate::backend::cpu::adam::grad_norm`],
//! [`crate::clt::params::decoder_norms`].

use super::context::{Gpu, Module, grid_1d, per_item};
use super::ffi::{
    CltAdamConsts, CltAdamDecoderParams, CltAdamParams, CltDecGradSqParams, CltExpParams,
    CltRowNormParams, CltSumF64Params, CltSumSqParams,
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
    adam_dense_at(gpu, p, m, v, 0, g, k)
}

/// `p, m, v ← Adam(p, m, v, g)` on elements `at..at + g.len()` of `p`, `m` and `v` (one layer's slice of
/// a concatenated tensor, e.g. the decoder biases `[L][d]`).
pub fn adam_dense_at(
    gpu: &Gpu,
    p: &DBuf<f32>,
    m: &DBuf<f32>,
    v: &DBuf<f32>,
    at: usize,
    g: &DBuf<f32>,
    k: CltAdamConsts,
) -> Result<()> {
    same_len("CUDA Adam (p, m, v)", &[p.len(), m.len(), v.len()])?;
    if at + g.len() > p.len() {
        return Err(Error::Shape {
            what: "CUDA Adam on a slice (offset + gradient length, parameter length)".into(),
            expected: vec![at + g.len(), at + g.len()],
            got: vec![at + g.len(), p.len()],
        });
    }
    let off = 4 * at as u64;
    let prm = CltAdamParams {
        p: p.ptr(gpu) + off,
        m: m.ptr(gpu) + off,
        v: v.ptr(gpu) + off,
        g: g.ptr(gpu),
        n: g.len() as u64,
        k,
    };
    let mut cfg = grid_1d(g.len(), 256);
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

/// The number of f64 partials [`sum_sq_into`] writes for `n` elements.
pub fn sum_sq_blocks(n: usize) -> usize {
    n.div_ceil(256).clamp(1, 1024)
}

fn room(what: &str, out: &DBuf<f64>, at: usize, n: usize) -> Result<()> {
    if at + n > out.len() {
        return Err(Error::Shape {
            what: format!("{what} (partials offset + count, buffer length)"),
            expected: vec![at + n, at + n],
            got: vec![at + n, out.len()],
        });
    }
    Ok(())
}

/// Writes the per-block f64 partials of `Σ x²` to `out[at..at + sum_sq_blocks(x.len())]`; returns their
/// number.
pub fn sum_sq_into(gpu: &Gpu, x: &DBuf<f32>, out: &DBuf<f64>, at: usize) -> Result<usize> {
    let blocks = sum_sq_blocks(x.len());
    room("CUDA sum of squares", out, at, blocks)?;
    let p = CltSumSqParams {
        x: x.ptr(gpu),
        partial: out.ptr(gpu) + 8 * at as u64,
        n: x.len() as u64,
    };
    gpu.launch(Module::Adam, "sum_sq", per_item(blocks, 256), &p)?;
    Ok(blocks)
}

/// `Σ x²` (f64 partials per block, summed in block order on the host).
pub fn sum_sq(gpu: &Gpu, x: &DBuf<f32>) -> Result<f64> {
    let partial = gpu.output::<f64>(sum_sq_blocks(x.len()))?;
    sum_sq_into(gpu, x, &partial, 0)?;
    Ok(gpu.download(&partial)?.iter().sum())
}

/// Writes `‖g_f‖²` of every decoder row (with its norm term) to `out[at..at + F]`; returns F.
#[allow(clippy::too_many_arguments)]
pub fn dec_grad_sq_into(
    gpu: &Gpu,
    gs: &DBuf<f32>,
    w: &DBuf<f32>,
    coef: &DBuf<f32>,
    touched: &DBuf<u8>,
    row_len: usize,
    out: &DBuf<f64>,
    at: usize,
) -> Result<usize> {
    let f_n = coef.len();
    same_len(
        "CUDA decoder gradient norm",
        &[gs.len(), w.len(), f_n * row_len],
    )?;
    same_len(
        "CUDA decoder gradient norm (coef, touched)",
        &[f_n, touched.len()],
    )?;
    room("CUDA decoder gradient norm", out, at, f_n)?;
    let p = CltDecGradSqParams {
        gs: gs.ptr(gpu),
        w: w.ptr(gpu),
        coef: coef.ptr(gpu),
        touched: touched.ptr(gpu),
        out: out.ptr(gpu) + 8 * at as u64,
        n_features: f_n as u32,
        row_len: row_len as u32,
    };
    gpu.launch(Module::Adam, "dec_grad_sq", per_item(f_n, 256), &p)?;
    Ok(f_n)
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
    let out = gpu.output::<f64>(coef.len())?;
    dec_grad_sq_into(gpu, gs, w, coef, touched, row_len, &out, 0)?;
    Ok(gpu.download(&out)?.iter().sum())
}

/// `out[0] = Σ x` over f64 partials, on the device by one block (deterministic order). CPU reference:
/// `x.iter().sum::<f64>()`, equal up to f64 rounding order.
pub fn sum_f64(gpu: &Gpu, x: &DBuf<f64>, out: &DBuf<f64>) -> Result<()> {
    room("CUDA f64 sum (output)", out, 0, 1)?;
    let p = CltSumF64Params {
        x: x.ptr(gpu),
        out: out.ptr(gpu),
        n: x.len() as u64,
    };
    gpu.launch(Module::Adam, "sum_f64", per_item(1, 256), &p)
}

/// `dst = exp(src)` elementwise (the thresholds from the log thresholds). CPU reference:
/// [`crate::backend::cpu::sparse::thresholds`] (`f32::exp`; the device's `expf` is within 2 ulp).
pub fn exp_into(gpu: &Gpu, src: &DBuf<f32>, dst: &DBuf<f32>) -> Result<()> {
    same_len("CUDA exp (src, dst)", &[src.len(), dst.len()])?;
    let p = CltExpParams {
        src: src.ptr(gpu),
        dst: dst.ptr(gpu),
        n: src.len() as u64,
    };
    let mut cfg = grid_1d(src.len(), 256);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(65_535);
    gpu.launch(Module::Adam, "exp_f32", cfg, &p)
}

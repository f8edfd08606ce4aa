//! The dense cuBLAS baseline: one training step's loss and gradient computed the way the Python CLT
//! trainers do it, with dense GEMMs (bf16 inputs, fp32 accumulation, cuBLAS `GemmEx`) through every encoder
//! and every one of the L(L+1)/2 decoder blocks, forward and backward. It exists only to be timed against
//! the sparse step in the same run (issue 5: the sparse step ≥ 5× faster); training never uses it.
//!
//! Per layer l (row-major shapes; cuBLAS sees them transposed, as column-major):
//! - forward: `H_l = X_l W_enc,lᵀ` (GEMM) then `h = H + b`, `a = JumpReLU(h)` in bf16 with the sparsity
//!   and pre-activation sums (`dense_jumprelu`); `Ŷ[:, l·d..] += A_l W_dec,l` (GEMM; source l's row covers
//!   the blocks of every target k ≥ l at once), then `r = 2/B (Ŷ + b_dec − Y)` and `Σ (Ŷ + b_dec − Y)²`
//!   (`dense_residual`);
//! - backward: `∇W_dec,l = A_lᵀ R[:, l·d..]`, `∇A_l = R[:, l·d..] W_dec,lᵀ` (GEMMs), the JumpReLU's backward
//!   with the loss terms (`dense_jumprelu_back`), `∇W_enc,l = ∇H_lᵀ X_l` (GEMM), and column sums for the
//!   biases and the threshold.
//!
//! Its loss equals the sparse step's (`tests/cuda.rs` checks it, within the bf16 rounding of the
//! activations the decode GEMM reads, as autocast does); its gradients are a dense trainer's (rectangle-kernel
//! straight-through threshold) and are not compared with the CPU's. JumpReLU, no skip connection. cuBLAS
//! (`libcublas.so`) is opened at run time like the driver; without it [`Blas::new`] returns
//! [`Error::BackendUnavailable`].

use super::backward::col_sum;
use super::context::{Gpu, Module};
use super::ffi::{CltDenseActBackParams, CltDenseActParams, CltDenseResidParams};
use super::memory::DBuf;
use super::step::{DeviceBatch, DeviceParams};
use crate::backend::grads::Objective;
use crate::clt::{Activation, CltConfig};
use crate::{Error, Result};
use cudarc::cublas::{CudaBlas, result as blas_result, sys as blas_sys};
use cudarc::driver::{DeviceRepr, LaunchConfig};
use std::ffi::c_void;

/// Blocks of the reducing kernels (at most): a fixed grid, so the partials' order depends on the shape only.
const RED_BLOCKS: usize = 1024;

/// A cuBLAS handle on the backend's stream.
pub struct Blas {
    handle: CudaBlas,
}

/// A column-major view of a device matrix for cuBLAS: element (i, j) at `offset + i + j·ld`.
pub(super) struct Mat<'a, T> {
    buf: Source<'a, T>,
    offset: usize,
    rows: usize,
    cols: usize,
    ld: usize,
}

/// Where a [`Mat`]'s elements are: a buffer, or the device address and length of one that another
/// borrow holds (the distributed step's partials, which NCCL holds mutably while the skip GEMM of each
/// layer writes its block, stream-ordered before NCCL reads it).
enum Source<'a, T> {
    Buf(&'a DBuf<T>),
    Raw { addr: u64, len: usize },
}

impl<'a, T: DeviceRepr> Mat<'a, T> {
    /// The `rows × cols` matrix at element `offset` of `buf`, columns `ld` elements apart.
    pub(super) fn new(
        buf: &'a DBuf<T>,
        offset: usize,
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Self {
        Self::at(Source::Buf(buf), offset, rows, cols, ld)
    }

    /// [`Mat::new`] in a buffer of `len` elements at device address `addr` (see [`Source`]).
    pub(super) fn raw(
        (addr, len): (u64, usize),
        offset: usize,
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Self {
        Self::at(Source::Raw { addr, len }, offset, rows, cols, ld)
    }

    fn at(buf: Source<'a, T>, offset: usize, rows: usize, cols: usize, ld: usize) -> Self {
        Mat {
            buf,
            offset,
            rows,
            cols,
            ld,
        }
    }

    /// The address of element (0, 0) after checking that every element lies inside the buffer.
    fn addr(&self, gpu: &Gpu, what: &str) -> Result<u64> {
        let need = if self.rows == 0 || self.cols == 0 {
            0
        } else {
            self.offset + (self.cols - 1) * self.ld + self.rows
        };
        let (base, len) = match self.buf {
            Source::Buf(b) => (b.ptr(gpu), b.len()),
            Source::Raw { addr, len } => (addr, len),
        };
        if self.ld < self.rows.max(1) || need > len || self.ld > i32::MAX as usize {
            return Err(Error::Shape {
                what: format!("cuBLAS operand {what} (rows, cols, ld, offset; buffer length)"),
                expected: vec![self.rows, self.cols, self.ld, self.offset],
                got: vec![len],
            });
        }
        Ok(base + (self.offset * std::mem::size_of::<T>()) as u64)
    }
}

fn op(t: bool) -> blas_sys::cublasOperation_t {
    if t {
        blas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas_sys::cublasOperation_t::CUBLAS_OP_N
    }
}

impl Blas {
    /// Opens cuBLAS on `gpu`'s stream, or explains why not.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let unavailable = |reason: String| Error::BackendUnavailable {
            backend: "cuBLAS".into(),
            reason,
        };
        // SAFETY: only tries to dlopen libcublas.so and closes it again; no cuBLAS call is made.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(unavailable(
                "libcublas.so not found (the dense baseline and skip connections need the CUDA \
                 toolkit's cuBLAS on the library path)"
                    .into(),
            ));
        }
        let stream = gpu.stream().clone();
        let handle = std::panic::catch_unwind(move || CudaBlas::new(stream))
            .map_err(|_| unavailable("libcublas.so could not be used (missing symbols?)".into()))?
            .map_err(|e| unavailable(format!("creating a cuBLAS handle: {e}")))?;
        Ok(Blas { handle })
    }

    /// `C = op(A) op(B) + beta C` (column-major; A, B bf16, C f32, fp32 accumulation), on the stream.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        gpu: &Gpu,
        what: &str,
        a: Mat<u16>,
        ta: bool,
        b: Mat<u16>,
        tb: bool,
        c: Mat<f32>,
        beta: f32,
    ) -> Result<()> {
        let (m, k) = if ta {
            (a.cols, a.rows)
        } else {
            (a.rows, a.cols)
        };
        let (kb, n) = if tb {
            (b.cols, b.rows)
        } else {
            (b.rows, b.cols)
        };
        if kb != k || c.rows != m || c.cols != n || [m, n, k].iter().any(|v| *v > i32::MAX as usize)
        {
            return Err(Error::Shape {
                what: format!("cuBLAS GEMM {what} (m, n, k)"),
                expected: vec![m, n, k],
                got: vec![c.rows, c.cols, kb],
            });
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (pa, pb, pc) = (a.addr(gpu, what)?, b.addr(gpu, what)?, c.addr(gpu, what)?);
        let alpha = 1.0f32;
        // SAFETY: the three operands were checked above to lie inside live device buffers for the shapes and
        // leading dimensions passed (A m×k or k×m, B k×n or n×k, C m×n, column-major); alpha and beta are
        // host scalars (cuBLAS's default pointer mode) read during the call; the handle runs on the backend's
        // one stream, so the GEMM is ordered with the kernels around it, and the buffers outlive the call's
        // queued work (they are freed stream-ordered or after a synchronisation).
        unsafe {
            blas_result::gemm_ex(
                *self.handle.handle(),
                op(ta),
                op(tb),
                m as i32,
                n as i32,
                k as i32,
                (&alpha as *const f32).cast::<c_void>(),
                pa as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                a.ld as i32,
                pb as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                b.ld as i32,
                (&beta as *const f32).cast::<c_void>(),
                pc as *mut c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                c.ld as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(|e| Error::Cuda {
            what: format!("cuBLAS GEMM {what}"),
            reason: e.to_string(),
        })
    }
}

/// `C (n × n, f32) = A Aᵀ` for a bf16 `A` (n × n) through cuBLAS, fp32 accumulation: the bench times it for
/// a measured bf16 GEMM rate to set the encoder against.
pub fn gemm_square(gpu: &Gpu, blas: &Blas, a: &DBuf<u16>, c: &DBuf<f32>, n: usize) -> Result<()> {
    let sq = |buf| Mat::new(buf, 0, n, n, n);
    let out = Mat::new(c, 0, n, n, n);
    blas.gemm(gpu, "square", sq(a), false, sq(a), true, out, 0.0)
}

/// What the dense step computed: the loss terms (as [`crate::backend::StepStats`] names them) and the
/// gradients, on the device.
pub struct DenseStep {
    pub recon: f64,
    pub sparsity: f64,
    pub preact: f64,
    /// Per layer `[F][d]`, `[F][row_len]`, `[F]`, `[F]`; per target layer `[d]`.
    pub w_enc: Vec<DBuf<f32>>,
    pub w_dec: Vec<DBuf<f32>>,
    pub b_enc: Vec<DBuf<f32>>,
    pub log_theta: Vec<DBuf<f32>>,
    pub b_dec: Vec<DBuf<f32>>,
}

impl DenseStep {
    /// The loss: reconstruction + sparsity + pre-activation.
    pub fn loss(&self) -> f64 {
        self.recon + self.sparsity + self.preact
    }
}

/// A grid-stride launch for `n` elements with at most [`RED_BLOCKS`] blocks; returns it and its blocks.
fn red_grid(n: usize) -> (LaunchConfig, usize) {
    let blocks = n.div_ceil(256).min(RED_BLOCKS);
    (
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
        blocks,
    )
}

/// The dense step's loss and gradient on the same device parameters and batch as
/// [`super::step::device_loss_and_grad`].
pub fn dense_loss_and_grad(
    gpu: &Gpu,
    blas: &Blas,
    cfg: &CltConfig,
    dp: &DeviceParams,
    batch: &DeviceBatch,
    obj: &Objective,
) -> Result<DenseStep> {
    if cfg.skip || !matches!(cfg.activation, Activation::JumpRelu) {
        return Err(Error::Unsupported(
            "the dense cuBLAS baseline is written for JumpReLU without skip connections".into(),
        ));
    }
    let (l_n, d, f_n, b_n) = (cfg.n_layers, cfg.d_model, cfg.n_features, batch.n_tokens);
    let row = l_n * d;
    let bf = b_n.max(1) as f64;
    if batch.x_bf.len() != b_n * row
        || batch.y.len() != b_n * row
        || dp.w_enc.len() != l_n
        || dp.w_dec.len() != l_n
    {
        return Err(Error::Shape {
            what: "dense step (x, y, encoder layers, decoder layers)".into(),
            expected: vec![b_n * row, b_n * row, l_n, l_n],
            got: vec![
                batch.x_bf.len(),
                batch.y.len(),
                dp.w_enc.len(),
                dp.w_dec.len(),
            ],
        });
    }
    let n_bf = b_n * f_n;
    let (act_grid, act_blocks) = red_grid(n_bf);
    let part = gpu.output::<f64>(2 * RED_BLOCKS)?;
    let (mut sparsity, mut preact) = (0.0f64, 0.0f64);

    // Forward: encoders (GEMM, then JumpReLU in bf16 with the loss sums).
    let mut h: Vec<DBuf<f32>> = Vec::with_capacity(l_n);
    let mut act: Vec<DBuf<u16>> = Vec::with_capacity(l_n);
    for l in 0..l_n {
        let hl = gpu.output::<f32>(n_bf)?;
        // Hᵀ (F × B) = W_encᵀ-as-stored (d × F)ᵀ · X_lᵀ-as-stored (d × B, ld L·d).
        blas.gemm(
            gpu,
            "encoder",
            Mat::new(&dp.w_enc[l], 0, d, f_n, d),
            true,
            Mat::new(&batch.x_bf, l * d, d, b_n, row),
            false,
            Mat::new(&hl, 0, f_n, b_n, f_n),
            0.0,
        )?;
        let al = gpu.output::<u16>(n_bf)?;
        let p = CltDenseActParams {
            h: hl.ptr(gpu),
            bias: dp.b_enc[l].ptr(gpu),
            theta: dp.theta[l].ptr(gpu),
            norms: dp.norms[l].ptr(gpu),
            act_bf: al.ptr(gpu),
            part: part.ptr(gpu),
            n: n_bf as u64,
            n_features: f_n as u32,
            c: obj.c,
        };
        gpu.launch(Module::Dense, "dense_jumprelu", act_grid, &p)?;
        let parts = gpu.download(&part)?;
        for blk in 0..act_blocks {
            sparsity += parts[2 * blk];
            preact += parts[2 * blk + 1];
        }
        h.push(hl);
        act.push(al);
    }

    // Dense decode: Ŷ[:, l·d .. l·d + row_len] += A_l W_dec,l for every source layer.
    let yhat = gpu.zeros::<f32>(b_n * row)?;
    for l in 0..l_n {
        let rl = cfg.dec_row_len(l);
        // Ŷᵀ block (row_len × B, ld L·d) += W_decᵀ-as-stored (row_len × F) · Aᵀ-as-stored (F × B).
        blas.gemm(
            gpu,
            "decoder",
            Mat::new(&dp.w_dec[l], 0, rl, f_n, rl),
            false,
            Mat::new(&act[l], 0, f_n, b_n, f_n),
            false,
            Mat::new(&yhat, l * d, rl, b_n, row),
            1.0,
        )?;
    }
    let r_bf = gpu.output::<u16>(b_n * row)?;
    let (res_grid, res_blocks) = red_grid(b_n * row);
    let rp = CltDenseResidParams {
        yhat: yhat.ptr(gpu),
        b_dec: dp.b_dec.ptr(gpu),
        y: batch.y.ptr(gpu),
        r_bf: r_bf.ptr(gpu),
        part: part.ptr(gpu),
        n: (b_n * row) as u64,
        row: row as u32,
        scale: (2.0 / bf) as f32,
    };
    gpu.launch(Module::Dense, "dense_residual", res_grid, &rp)?;
    let parts = gpu.download(&part)?;
    let recon: f64 = parts[..res_blocks].iter().sum::<f64>() / bf;
    let resid = yhat; // now r = 2/B (ŷ − y)

    // Backward.
    let mut out = DenseStep {
        recon,
        sparsity: sparsity * obj.lambda as f64 / bf,
        preact: preact * obj.lambda_preact as f64 / bf,
        w_enc: Vec::with_capacity(l_n),
        w_dec: Vec::with_capacity(l_n),
        b_enc: Vec::with_capacity(l_n),
        log_theta: Vec::with_capacity(l_n),
        b_dec: (0..l_n)
            .map(|k| col_sum(gpu, &resid, k * d, row, b_n, d))
            .collect::<Result<_>>()?,
    };
    for l in 0..l_n {
        let rl = cfg.dec_row_len(l);
        // ∇W_decᵀ-as-stored (row_len × F) = R_lᵀ-as-stored (row_len × B) · (Aᵀ-as-stored (F × B))ᵀ.
        let gwd = gpu.output::<f32>(f_n * rl)?;
        blas.gemm(
            gpu,
            "decoder weight gradient",
            Mat::new(&r_bf, l * d, rl, b_n, row),
            false,
            Mat::new(&act[l], 0, f_n, b_n, f_n),
            true,
            Mat::new(&gwd, 0, rl, f_n, rl),
            0.0,
        )?;
        // ∇Aᵀ (F × B) = (W_decᵀ-as-stored (row_len × F))ᵀ · R_lᵀ-as-stored (row_len × B).
        let da = gpu.output::<f32>(n_bf)?;
        blas.gemm(
            gpu,
            "activation gradient",
            Mat::new(&dp.w_dec[l], 0, rl, f_n, rl),
            true,
            Mat::new(&r_bf, l * d, rl, b_n, row),
            false,
            Mat::new(&da, 0, f_n, b_n, f_n),
            0.0,
        )?;
        let dh_bf = gpu.output::<u16>(n_bf)?;
        let bp = CltDenseActBackParams {
            h: h[l].ptr(gpu),
            da: da.ptr(gpu),
            dh_bf: dh_bf.ptr(gpu),
            theta: dp.theta[l].ptr(gpu),
            norms: dp.norms[l].ptr(gpu),
            n: n_bf as u64,
            n_features: f_n as u32,
            c: obj.c,
            lambda_b: (obj.lambda as f64 / bf) as f32,
            lambda_pb: (obj.lambda_preact as f64 / bf) as f32,
            bandwidth: obj.bandwidth,
            pad0: 0,
        };
        gpu.launch(Module::Dense, "dense_jumprelu_back", act_grid, &bp)?;
        // ∇W_encᵀ-as-stored (d × F) = X_lᵀ-as-stored (d × B, ld L·d) · (∇Hᵀ-as-stored (F × B))ᵀ.
        let gwe = gpu.output::<f32>(f_n * d)?;
        blas.gemm(
            gpu,
            "encoder weight gradient",
            Mat::new(&batch.x_bf, l * d, d, b_n, row),
            false,
            Mat::new(&dh_bf, 0, f_n, b_n, f_n),
            true,
            Mat::new(&gwe, 0, d, f_n, d),
            0.0,
        )?;
        out.w_enc.push(gwe);
        out.w_dec.push(gwd);
        out.b_enc.push(col_sum(gpu, &da, 0, f_n, b_n, f_n)?); // da now holds ∇H
        out.log_theta.push(col_sum(gpu, &h[l], 0, f_n, b_n, f_n)?); // h now holds ∂/∂ log θ
    }
    gpu.sync()?;
    Ok(out)
}

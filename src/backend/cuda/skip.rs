//! The skip connection on the device: `ŷ_l += x_l W_skip[l]ᵀ` in the forward pass and
//! `∇W_skip[l] = R_lᵀ x_l` in the backward, two dense `d × d` GEMMs per layer through cuBLAS (bf16
//! operands, fp32 accumulation, the same convention as the encoder's: the bf16 x the encoder reads and
//! the bf16 copy of `W_skip`).
//!
//! The residual R is the step's f32 residual; rounding it to bf16 would cost the gradient 8 bits, so it is
//! split into `hi = bf16(R)` and `lo = bf16(R − hi)` ([`super::encode::split_bf16`]) and both parts are
//! multiplied (two GEMMs, the second accumulating into the first): about 16 bits of R, within ~2⁻¹⁶ of
//! an f32 GEMM on the same x. Using the bf16 x the forward pass used makes this the exact gradient of the
//! loss the device computed.
//!
//! CPU reference: [`crate::backend::cpu::sparse::add_skip`] and [`crate::backend::cpu::sparse::skip_grad`].

use super::context::Gpu;
use super::dense::Mat;
use super::encode::split_bf16;
use super::memory::DBuf;
use crate::Result;

/// `ŷ_l += x_l W_skip[l]ᵀ` for every layer `l`: `yhat` and `x_bf` token-major `[B][L][d]`, `w_skip[l]`
/// bf16 `[d][d]` stored (out, in). Queued on the compute stream.
pub fn add_skip(
    gpu: &Gpu,
    w_skip: &[DBuf<u16>],
    x_bf: &DBuf<u16>,
    yhat: &DBuf<f32>,
    n_tokens: usize,
    d: usize,
) -> Result<()> {
    let row = w_skip.len() * d;
    let out = (yhat.ptr(gpu), yhat.len());
    for l in 0..w_skip.len() {
        add_skip_layer(gpu, w_skip, x_bf, l, (out, l * d, row), n_tokens, d)?;
    }
    Ok(())
}

/// `ŷ_l += x_l W_skip[l]ᵀ` for layer `l` alone, into `out = ((address, length), offset, stride)`, an f32
/// buffer given by its device address and length (the distributed step's partials are held mutably by
/// the all-reduce while each layer's term is queued; the GEMM runs on the compute stream, which NCCL's
/// stream waits on): token `b`'s row at `offset + b · stride` (token-major `[B][L][d]`: `(l·d, L·d)`;
/// layer-major `[L][B][d]`, the partials decoded a layer at a time: `(l·B·d, d)`).
pub fn add_skip_layer(
    gpu: &Gpu,
    w_skip: &[DBuf<u16>],
    x_bf: &DBuf<u16>,
    l: usize,
    (yhat, offset, stride): ((u64, usize), usize, usize),
    n_tokens: usize,
    d: usize,
) -> Result<()> {
    let row = w_skip.len() * d;
    // Ŷ_lᵀ-as-stored (d × B, ld stride) += (W_skipᵀ-as-stored (d × d))ᵀ · X_lᵀ-as-stored (d × B, ld L·d).
    gpu.blas()?.gemm(
        gpu,
        "skip connection",
        Mat::new(&w_skip[l], 0, d, d, d),
        true,
        Mat::new(x_bf, l * d, d, n_tokens, row),
        false,
        Mat::raw(yhat, offset, d, n_tokens, stride),
        1.0,
    )
}

/// `∇W_skip[l] = R_lᵀ x_l` (`[d][d]` stored (out, in), f32) for each of `n_layers` layers, from the
/// residual `resid` (f32) and the inputs `x_bf` (bf16), both token-major `[B][L][d]`.
pub fn skip_grads(
    gpu: &Gpu,
    resid: &DBuf<f32>,
    x_bf: &DBuf<u16>,
    n_tokens: usize,
    n_layers: usize,
    d: usize,
) -> Result<Vec<DBuf<f32>>> {
    if n_tokens == 0 {
        return (0..n_layers).map(|_| gpu.zeros::<f32>(d * d)).collect();
    }
    let blas = gpu.blas()?;
    let row = n_layers * d;
    let (hi, lo) = split_bf16(gpu, resid)?;
    (0..n_layers)
        .map(|l| {
            let g = gpu.output::<f32>(d * d)?;
            // ∇W_skipᵀ-as-stored (d_in × d_out) = X_lᵀ-as-stored (d × B) · (R_lᵀ-as-stored (d × B))ᵀ,
            // for R's two parts.
            for (part, beta) in [(&hi, 0.0), (&lo, 1.0)] {
                blas.gemm(
                    gpu,
                    "skip weight gradient",
                    Mat::new(x_bf, l * d, d, n_tokens, row),
                    false,
                    Mat::new(part, l * d, d, n_tokens, row),
                    true,
                    Mat::new(&g, 0, d, d, d),
                    beta,
                )?;
            }
            Ok(g)
        })
        .collect()
}

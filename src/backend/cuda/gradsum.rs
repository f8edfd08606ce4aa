//! A step's gradients packed into one f32 buffer for the device all-reduce over data-parallel replicas
//! (the distributed resident loop, `parallel = "data"` or `"grid"`), and unpacked from the sum: one NCCL
//! call per step instead of one per tensor.
//!
//! CPU reference: `dist::trainer::grads::sum_gradients`, which packs the host's gradients the same way. Each
//! replica weights its gradients by its share `w` of the batch's tokens while packing (every term of the
//! loss is a mean over tokens, so the sum is the whole batch's gradient); the decoder's touched-row flags
//! travel as 0/1 and come back as "touched anywhere"; the firing counts travel as f32, exact below 2²⁴.

use super::context::{Gpu, Module, grid_1d};
use super::ffi::CltPackParams;
use super::memory::DBuf;
use super::step::DeviceGrads;
use crate::Result;

/// How a tensor is packed (the kernel's `kind`).
#[derive(Clone, Copy)]
enum Kind {
    /// f32, multiplied by the weight.
    F32 = 0,
    /// u8 flags.
    Flags = 1,
    /// u32 counts.
    Counts = 2,
}

/// Every tensor of `g` in packing order, with its device address, length and kind.
fn tensors(gpu: &Gpu, g: &DeviceGrads) -> Vec<(u64, usize, Kind)> {
    let mut out = Vec::with_capacity(7 * g.layers.len() + g.b_dec.len() + g.w_skip.len());
    for lg in &g.layers {
        for t in [&lg.w_enc, &lg.w_dec, &lg.b_enc, &lg.log_theta, &lg.dec_coef] {
            out.push((t.ptr(gpu), t.len(), Kind::F32));
        }
        out.push((lg.touched.ptr(gpu), lg.touched.len(), Kind::Flags));
        out.push((
            lg.active_count.ptr(gpu),
            lg.active_count.len(),
            Kind::Counts,
        ));
    }
    for b in g.b_dec.iter().chain(&g.w_skip) {
        out.push((b.ptr(gpu), b.len(), Kind::F32));
    }
    out
}

/// The packed buffer's length for gradients shaped like `g`.
pub fn packed_len(gpu: &Gpu, g: &DeviceGrads) -> usize {
    tensors(gpu, g).iter().map(|t| t.1).sum()
}

/// Writes `g` into `buf` (at least [`packed_len`] long), the f32 tensors multiplied by `w`.
pub fn pack(gpu: &Gpu, g: &DeviceGrads, w: f32, buf: &DBuf<f32>) -> Result<()> {
    copy(gpu, g, w, buf, false)
}

/// Reads `g` back from `buf` (the sum over the replicas).
pub fn unpack(gpu: &Gpu, buf: &DBuf<f32>, g: &DeviceGrads) -> Result<()> {
    copy(gpu, g, 1.0, buf, true)
}

fn copy(gpu: &Gpu, g: &DeviceGrads, w: f32, buf: &DBuf<f32>, unpack: bool) -> Result<()> {
    let list = tensors(gpu, g);
    let total: usize = list.iter().map(|t| t.1).sum();
    if buf.len() < total {
        return Err(crate::Error::Shape {
            what: "packed gradients (buffer length, gradient elements)".into(),
            expected: vec![total],
            got: vec![buf.len()],
        });
    }
    let base = buf.ptr(gpu);
    let mut at = 0u64;
    for (tensor, n, kind) in list {
        if n > 0 {
            let p = CltPackParams {
                tensor,
                packed: base + 4 * at,
                n: n as u64,
                kind: kind as u32,
                unpack: unpack as u32,
                scale: w,
                pad0: 0,
            };
            gpu.launch(Module::Adam, "pack", grid_1d(n.min(1 << 20), 256), &p)?;
        }
        at += n as u64;
    }
    Ok(())
}

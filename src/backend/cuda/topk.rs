//! TopK and BatchTopK selection on the device, with the ReLU, into per-token ELL lists.
//!
//! CPU reference: [`crate::backend::cpu::encode::topk_indices`] (ties to the lower index) with the ReLU of
//! `BlockOut::push_token`, and [`crate::backend::cpu::encode::batch_topk_codes`] (ties to the lower
//! (layer, position)).

use super::context::{Gpu, Module, per_item};
use super::encode::DeviceCodes;
use super::ffi::{CltBatchTopkParams, CltCompactParams, CltTopkParams};
use super::memory::DBuf;
use crate::{Error, Result};

/// The `k` largest of each row of a dense `[B][F]` matrix (ties to the lower index), kept where > 0.
pub fn topk_rows(
    gpu: &Gpu,
    dense: &DBuf<f32>,
    n_tokens: usize,
    n_features: usize,
    k: usize,
) -> Result<DeviceCodes> {
    check_dense(dense, n_tokens, n_features)?;
    let codes = DeviceCodes::alloc(gpu, n_tokens, k.clamp(1, n_features.max(1)))?;
    let p = CltTopkParams {
        dense: dense.ptr(gpu),
        count: codes.count.ptr(gpu),
        feat: codes.feat.ptr(gpu),
        pre: codes.pre.ptr(gpu),
        act: codes.act.ptr(gpu),
        n_tokens: n_tokens as u32,
        n_features: n_features as u32,
        k: k as u32,
        cap: codes.cap as u32,
    };
    gpu.launch(Module::Topk, "topk_rows", per_item(n_tokens, 256), &p)?;
    Ok(codes)
}

fn check_dense(dense: &DBuf<f32>, n_tokens: usize, n_features: usize) -> Result<()> {
    if dense.len() < n_tokens * n_features {
        return Err(Error::Shape {
            what: "CUDA top-k input".into(),
            expected: vec![n_tokens, n_features],
            got: vec![dense.len()],
        });
    }
    Ok(())
}

const PER_BLOCK: usize = 256 * 8;

/// Marks the `budget` largest of `n` values starting at element `offset` of `values` (ties to the lower
/// index) where they are > 0: `mask[i] = 1`. The k-th key is found by four host-driven radix passes.
pub fn batch_topk_mask(
    gpu: &Gpu,
    values: &DBuf<f32>,
    offset: usize,
    n: usize,
    budget: usize,
) -> Result<DBuf<u8>> {
    let mask = if budget.min(n) == 0 {
        gpu.zeros::<u8>(n)?
    } else {
        gpu.output::<u8>(n)?
    };
    let budget = budget.min(n);
    if budget == 0 {
        return Ok(mask);
    }
    let n_blocks = n.div_ceil(PER_BLOCK);
    let mut hist = gpu.zeros::<u32>(256)?;
    let mut p = CltBatchTopkParams {
        values: values.ptr(gpu) + 4 * offset as u64,
        hist: hist.ptr(gpu),
        mask: mask.ptr(gpu),
        n: n as u64,
        ..Default::default()
    };
    let mut remaining = budget as u32;
    for shift in [24u32, 16, 8, 0] {
        gpu.clear(&mut hist)?;
        p.shift = shift;
        let blocks = n_blocks.min(1024);
        gpu.launch(Module::Topk, "batch_topk_hist", per_item(blocks, 256), &p)?;
        let h = gpu.download(&hist)?;
        let mut digit = 255usize;
        loop {
            if h[digit] >= remaining || digit == 0 {
                break;
            }
            remaining -= h[digit];
            digit -= 1;
        }
        p.prefix |= (digit as u32) << shift;
    }
    p.kth = p.prefix;
    p.ties = remaining;
    let ties = gpu.zeros::<u32>(n_blocks)?;
    p.block_ties = ties.ptr(gpu);
    gpu.launch(Module::Topk, "batch_topk_ties", per_item(n_blocks, 256), &p)?;
    let counts = gpu.download(&ties)?;
    let mut offsets = Vec::with_capacity(n_blocks);
    let mut acc = 0u32;
    for c in counts {
        offsets.push(acc);
        acc += c;
    }
    let offsets = gpu.upload(&offsets)?;
    p.block_ties = offsets.ptr(gpu);
    gpu.launch(
        Module::Topk,
        "batch_topk_select",
        per_item(n_blocks, 256),
        &p,
    )?;
    // The scratch buffers are freed on return, in stream order (no sync).
    Ok(mask)
}

/// Turns a selection mask into lists: token b's selected features of the dense `[B][F]` layer at element
/// `dense_offset`, with the mask's layer at element `mask_offset`, in increasing feature order.
pub fn compact_mask(
    gpu: &Gpu,
    dense: &DBuf<f32>,
    dense_offset: usize,
    mask: &DBuf<u8>,
    mask_offset: usize,
    n_tokens: usize,
    n_features: usize,
) -> Result<DeviceCodes> {
    if dense.len() < dense_offset + n_tokens * n_features
        || mask.len() < mask_offset + n_tokens * n_features
    {
        return Err(Error::Shape {
            what: "CUDA mask compaction (dense, mask)".into(),
            expected: vec![
                dense_offset + n_tokens * n_features,
                mask_offset + n_tokens * n_features,
            ],
            got: vec![dense.len(), mask.len()],
        });
    }
    let mut cap = 64usize.min(n_features.max(1));
    loop {
        let mut codes = DeviceCodes::alloc(gpu, n_tokens, cap)?;
        let p = CltCompactParams {
            dense: dense.ptr(gpu) + 4 * dense_offset as u64,
            mask: mask.ptr(gpu) + mask_offset as u64,
            count: codes.count.ptr(gpu),
            feat: codes.feat.ptr(gpu),
            pre: codes.pre.ptr(gpu),
            act: codes.act.ptr(gpu),
            n_tokens: n_tokens as u32,
            n_features: n_features as u32,
            cap: cap as u32,
            pad0: 0,
        };
        gpu.launch(Module::Topk, "compact_mask", per_item(n_tokens, 256), &p)?;
        let longest = codes.measure(gpu)?;
        if longest <= cap {
            return Ok(codes);
        }
        cap = longest.next_power_of_two().min(n_features);
    }
}

/// BatchTopK codes of every layer from dense pre-activations `[L][B][F]` (one buffer, layers back to back):
/// the `k·B` largest per layer, or the `k·B·L` largest over all layers with `across_layers`.
pub fn batch_topk(
    gpu: &Gpu,
    dense: &DBuf<f32>,
    n_layers: usize,
    n_tokens: usize,
    n_features: usize,
    k: usize,
    across_layers: bool,
) -> Result<Vec<DeviceCodes>> {
    let per = n_tokens * n_features;
    check_dense(dense, n_layers * n_tokens, n_features)?;
    let mut out = Vec::with_capacity(n_layers);
    if across_layers {
        let mask = batch_topk_mask(gpu, dense, 0, per * n_layers, k * n_tokens * n_layers)?;
        for l in 0..n_layers {
            out.push(compact_mask(
                gpu,
                dense,
                l * per,
                &mask,
                l * per,
                n_tokens,
                n_features,
            )?);
        }
    } else {
        for l in 0..n_layers {
            let mask = batch_topk_mask(gpu, dense, l * per, per, k * n_tokens)?;
            out.push(compact_mask(
                gpu,
                dense,
                l * per,
                &mask,
                0,
                n_tokens,
                n_features,
            )?);
        }
    }
    Ok(out)
}
